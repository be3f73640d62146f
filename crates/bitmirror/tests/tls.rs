//! NBD over TLS with QEMU's x509 credentials (`tls-creds-x509`), the
//! certificates made in the test with `openssl`: QEMU's own NBD client
//! (`qemu-io`, `qemu-img`) reads and writes through our TLS export; a plain
//! client and a client whose certificate another CA signed are refused,
//! and the server goes on serving.

mod common;

use std::path::Path;
use std::process::Command;

use common::{path_str, serve};
use serde_json::json;
use testkit::pki;
use testkit::require_tool;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `qemu-io` through export `disk` on `port` over TLS with the client
/// credentials in `creds`; its exit status and output.
fn qemu_io_tls(creds: &Path, port: u16, commands: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(require_tool("qemu-io", "qemu-utils"));
    cmd.args([
        "--object",
        &format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", creds.display()),
        "--image-opts",
        &format!(
            "driver=nbd,server.type=inet,server.host=localhost,server.port={port},export=disk,tls-creds=tls0"
        ),
    ]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.output().expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !text.contains("failed"), text)
}

#[test]
fn qemu_clients_use_our_tls_export_and_others_are_refused() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    pki::ca(dir, "good");
    pki::ca(dir, "rogue");
    pki::creds(dir, "good", "server", "server");
    pki::creds(dir, "good", "client", "client");
    pki::creds(dir, "rogue", "client", "rogue");
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; 4 << 20]).expect("an image");
    let port = free_port();
    let mut daemon = serve(
        dir,
        &[
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={}",
                dir.join("server").display()
            ),
            "--blockdev".into(),
            format!(
                "driver=raw,node-name=n,file.driver=file,file.filename={}",
                image.display()
            ),
            "--nbd-server".into(),
            format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0"),
            "--export".into(),
            "type=nbd,id=e,node-name=n,name=disk,writable=on".into(),
        ],
    );
    let (ok, out) = qemu_io_tls(
        &dir.join("client"),
        port,
        &["write -P 7 0 1M", "read -P 7 0 1M"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("read 1048576/1048576"), "{out}");

    // A plain client: refused (TLS first), and told so.
    let plain = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(format!("nbd://127.0.0.1:{port}/disk"))
        .output()
        .expect("qemu-io runs");
    let text = String::from_utf8_lossy(&plain.stderr).to_string()
        + &String::from_utf8_lossy(&plain.stdout);
    assert!(!plain.status.success(), "{text}");
    assert!(text.contains("TLS"), "{text}");

    // A client whose certificate another CA signed: refused.
    let (ok, out) = qemu_io_tls(&dir.join("rogue"), port, &["read 0 4k"]);
    assert!(!ok, "{out}");

    // The server goes on serving; the data is on disk.
    let (ok, out) = qemu_io_tls(&dir.join("client"), port, &["read -P 7 0 1M"]);
    assert!(ok, "{out}");
    let mut qmp = daemon.qmp();
    qmp.execute_ok("quit", json!({}));
    assert_eq!(daemon.wait_exit(), Some(0));
    let data = std::fs::read(&image).expect("the image");
    assert!(data[..1 << 20].iter().all(|&b| b == 7));
}

#[test]
fn tls_credentials_errors_are_qemus() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    pki::ca(dir, "good");
    pki::creds(dir, "good", "server", "server");
    let mut daemon = serve(dir, &[]);
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "client0", "endpoint": "client",
               "dir": path_str(&dir.join("server"))}),
    );
    qmp.execute_ok(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg0"}),
    );
    let start = |creds: &str| {
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
               "tls-creds": creds})
    };
    for (creds, words) in [
        ("nosuch", "No TLS credentials with id 'nosuch'"),
        ("tg0", "Object with id 'tg0' is not TLS credentials"),
        (
            "client0",
            "Expecting TLS credentials with a server endpoint",
        ),
    ] {
        let e = qmp
            .execute("nbd-server-start", start(creds))
            .expect_err("refused");
        assert_eq!(e.desc, words);
    }
    // Files that are not there: said when the object is made.
    let e = qmp
        .execute(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "bad", "endpoint": "server",
                   "dir": path_str(&dir.join("nowhere"))}),
        )
        .expect_err("refused");
    assert!(e.desc.contains("server-cert.pem"), "{e:?}");
    qmp.execute_ok("quit", json!({}));
    assert_eq!(daemon.wait_exit(), Some(0));
}
