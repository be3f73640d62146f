//! Arbitrary bytes as everything a client sends to our NBD server, from the
//! first handshake byte on: the server must answer or hang up, never panic.

#![no_main]

use std::sync::{Arc, OnceLock};

use block::{BlockdevOptions, Graph, Node};
use libfuzzer_sys::fuzz_target;
use nbd::{ExportOptions, Server, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    rt: tokio::runtime::Runtime,
    server: Server,
    _node: Arc<Node>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let graph = Graph::new();
        let options = BlockdevOptions::from_json(&serde_json::json!({
            "driver": "null-co", "node-name": "n", "size": 1 << 20, "read-zeroes": true
        }))
        .expect("options");
        let node = rt.block_on(graph.add(&options)).expect("node");
        node.bitmaps()
            .add("b", Some(4096), false, false)
            .expect("bitmap");
        let server = Server::new(ServerOptions::default());
        for (name, writable, bitmaps) in [("", true, vec!["b".to_string()]), ("ro", false, vec![])]
        {
            let export = ExportOptions {
                id: name.into(),
                name: name.into(),
                description: Some("fuzz".into()),
                writable,
                bitmaps,
                allocation_depth: true,
            };
            server.add_export(&node, export).expect("export");
        }
        World {
            rt,
            server,
            _node: node,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(async {
        let (mut client, server_side) = tokio::io::duplex(1 << 16);
        let server = w.server.clone();
        let serving = tokio::spawn(async move { server.serve(server_side).await });
        let (mut rd, mut wr) = tokio::io::split(&mut client);
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
        tokio::join!(drain, feed);
        serving.await.expect("the server task does not panic");
    });
});
