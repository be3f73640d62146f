//! Arbitrary bytes as everything a server sends to our NBD client: the
//! handshake must fail cleanly or succeed, and requests must complete (with
//! data or an error), never panic or hang.

#![no_main]

use block::{IoBuf, SocketAddress};
use libfuzzer_sys::fuzz_target;
use nbd::{Client, ClientOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client_side, mut server) = tokio::io::duplex(1 << 16);
        let options = ClientOptions {
            server: SocketAddress::Unix {
                path: "fuzz".into(),
            },
            export: "e".into(),
            contexts: vec!["qemu:dirty-bitmap:b".into()],
            tls: None,
            tls_hostname: None,
        };
        let (mut rd, mut wr) = tokio::io::split(&mut server);
        let drain = async {
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let feed = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let use_client = async {
            if let Ok(c) = Client::over(client_side, &options).await {
                let len = (c.size() % (1 << 20)) as usize;
                let _ = c.read(0, IoBuf::zeroed(len, 1)).await;
                let _ = c.block_status(0, 4096, false).await;
                let _ = c.flush().await;
                c.disconnect().await;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(drain, feed, use_client)
        })
        .await
        .map_err(|_| panic!("the client hung"));
    });
});
