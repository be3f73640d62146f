//! Security: NBD over TLS with QEMU's x509 credentials
//! (`tls-creds-x509`), the certificates made in the test with `openssl`
//! (`testkit::pki`). QEMU's own NBD client (`qemu-io`) reads and writes
//! through our TLS export; a plain client and a client whose certificate
//! another CA signed are refused, and the server goes on serving; our
//! client nodes talk TLS to `qemu-nbd`; a migration runs between TLS-only
//! daemons; `tls-authz` admits the same client as `qemu-nbd --tls-authz`;
//! the QMP socket is its owner's only.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Peer, free_port, listens, path_str, quit, serve};
use serde_json::json;
use testkit::pki;
use testkit::require_tool;

/// `qemu-io` with the client credentials in `creds` through an NBD export
/// over TLS: `server` is the `--image-opts` part naming the server and the
/// export. Its exit status (false when a command failed) and output.
fn qemu_io_via(creds: &Path, server: &str, commands: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(require_tool("qemu-io", "qemu-utils"));
    cmd.args([
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            creds.display()
        ),
        "--image-opts",
        &format!("driver=nbd,{server},tls-creds=tls0"),
    ]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.output().expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !text.contains("failed"), text)
}

/// [`qemu_io_via`] export `disk` on TCP `port` of `localhost`.
fn qemu_io_tls(creds: &Path, port: u16, commands: &[&str]) -> (bool, String) {
    let server = format!("server.type=inet,server.host=localhost,server.port={port},export=disk");
    qemu_io_via(creds, &server, commands)
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
    quit(&mut qmp, &mut daemon);
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
    // tls-authz with credentials that ask clients for no certificate.
    qmp.execute_ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "lax", "endpoint": "server",
               "verify-peer": false, "dir": path_str(&dir.join("server"))}),
    );
    qmp.execute_ok(
        "object-add",
        json!({"qom-type": "authz-simple", "id": "auth0", "identity": "CN=x"}),
    );
    let mut args = start("lax");
    args["tls-authz"] = json!("auth0");
    let e = qmp.execute("nbd-server-start", args).expect_err("refused");
    assert!(e.desc.contains("verify-peer=on"), "{e:?}");
    let mut args = start("nosuch");
    args.as_object_mut().map(|o| o.remove("tls-creds"));
    args["tls-authz"] = json!("auth0");
    let e = qmp.execute("nbd-server-start", args).expect_err("refused");
    assert_eq!(e.desc, "tls-authz is not supported without tls-creds");
    // Files that are not there: said when the object is made.
    let e = qmp
        .execute(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "bad", "endpoint": "server",
                   "dir": path_str(&dir.join("nowhere"))}),
        )
        .expect_err("refused");
    assert!(e.desc.contains("server-cert.pem"), "{e:?}");
    quit(&mut qmp, &mut daemon);
}

/// `qemu-nbd --tls-creds` serving `image` on `port`, killed on drop.
fn qemu_nbd_tls(creds: &Path, image: &Path, port: u16) -> Peer {
    Peer::start(
        Command::new(require_tool("qemu-nbd", "qemu-utils")).args([
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={}",
                creds.display()
            ),
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-x",
            "disk",
            "-t",
            path_str(image),
        ]),
        || listens(port),
    )
}

/// Our `driver=nbd` node talks TLS to `qemu-nbd --tls-creds`: a mirror
/// into it lands byte for byte; without credentials, or with another CA's,
/// the node cannot be opened, and says why.
#[test]
fn our_client_nodes_talk_tls_to_qemu_nbd() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    pki::ca(dir, "good");
    pki::ca(dir, "rogue");
    let server = pki::creds(dir, "good", "server", "server");
    let client = pki::creds(dir, "good", "client", "client");
    let rogue = pki::creds(dir, "rogue", "client", "rogue");
    let target = dir.join("target.raw");
    std::fs::write(&target, vec![0u8; 8 << 20]).expect("a target");
    let source = dir.join("source.raw");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i / 4096) as u8 | 1).collect();
    std::fs::write(&source, &data).expect("a source");
    let port = free_port();
    let _peer = qemu_nbd_tls(&server, &target, port);
    let mut daemon = serve(
        dir,
        &[
            "--object".into(),
            format!(
                "tls-creds-x509,id=c0,endpoint=client,dir={}",
                client.display()
            ),
            "--object".into(),
            format!(
                "tls-creds-x509,id=r0,endpoint=client,dir={}",
                rogue.display()
            ),
            "--blockdev".into(),
            format!(
                "driver=raw,node-name=src,file.driver=file,file.filename={}",
                source.display()
            ),
        ],
    );
    let mut qmp = daemon.qmp();
    let node = |creds: Option<&str>| {
        let mut o = json!({"driver": "nbd", "node-name": "t", "export": "disk",
                           "server": {"type": "inet", "host": "localhost",
                                      "port": port.to_string()}});
        if let Some(c) = creds {
            o["tls-creds"] = json!(c);
        }
        o
    };
    let e = qmp
        .execute("blockdev-add", node(None))
        .expect_err("refused");
    assert!(e.desc.to_lowercase().contains("tls"), "{e:?}");
    let e = qmp
        .execute("blockdev-add", node(Some("r0")))
        .expect_err("refused");
    assert!(e.desc.contains("TLS"), "{e:?}");
    let e = qmp
        .execute("blockdev-add", node(Some("nosuch")))
        .expect_err("refused");
    assert_eq!(e.desc, "No TLS credentials with id 'nosuch'");
    qmp.execute_ok("blockdev-add", node(Some("c0")));
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "t", "sync": "full"}),
    );
    common::wait_event(&mut qmp, "BLOCK_JOB_READY");
    qmp.execute_ok("block-job-cancel", json!({"device": "m"}));
    common::wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    quit(&mut qmp, &mut daemon);
    assert!(std::fs::read(&target).expect("the target") == data);
}

/// `bitmirror migrate --tls-creds` between two daemons whose NBD servers
/// require TLS: the mirror and the bitmap both cross over TLS.
#[test]
fn a_migration_between_tls_daemons() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    pki::ca(dir, "good");
    let server = pki::creds(dir, "good", "server", "server");
    let client = pki::creds(dir, "good", "client", "client");
    let src = dir.join("src.qcow2");
    testkit::qemu_img_create_qcow2(path_str(&src), 32 << 20, "");
    testkit::qemu_io_writes(path_str(&src), "qcow2", &[(0, 16 << 20, Some(1))]);
    // The "full backup": the disk as it is now.
    let base = dir.join("base.qcow2");
    std::fs::copy(&src, &base).expect("a copy");
    let tls_args = |sock: &Path| -> Vec<String> {
        vec![
            "--object".into(),
            format!(
                "tls-creds-x509,id=srv,endpoint=server,dir={}",
                server.display()
            ),
            "--object".into(),
            format!(
                "tls-creds-x509,id=cli,endpoint=client,dir={}",
                client.display()
            ),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={},tls-creds=srv", sock.display()),
        ]
    };
    let (a_dir, b_dir) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a_dir).expect("a directory");
    std::fs::create_dir_all(&b_dir).expect("a directory");
    let (a_sock, b_sock) = (a_dir.join("nbd.sock"), b_dir.join("nbd.sock"));
    let mut a_args = tls_args(&a_sock);
    a_args.extend([
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=disk0,file.driver=file,file.filename={}",
            src.display()
        ),
        "--export".into(),
        "type=nbd,id=e,node-name=disk0,name=disk0,writable=on".into(),
    ]);
    let mut a = serve(&a_dir, &a_args);
    let mut b = serve(&b_dir, &tls_args(&b_sock));
    {
        let mut qa = a.qmp();
        qa.execute_ok(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "B", "granularity": 65536}),
        );
    }
    // The guest writes over TLS too: A's server requires it.
    let server = format!(
        "server.type=unix,server.path={},export=disk0,tls-hostname=localhost",
        a_sock.display()
    );
    let out = qemu_io_via(
        &client,
        &server,
        &["write -P 2 20M 2M", "write -P 3 1M 64k"],
    );
    assert!(out.0, "{}", out.1);
    let dest = b_dir.join("disk0.qcow2");
    let cli = [
        "migrate",
        "--from",
        path_str(a.qmp_path()),
        "--to",
        path_str(b.qmp_path()),
        "--node",
        "disk0",
        "--dest-image",
        path_str(&dest),
        "--dest-nbd",
        &format!("unix:{}", b_sock.display()),
        "--source-nbd",
        &format!("unix:{}", a_sock.display()),
        "--bitmap",
        "B",
        "--base",
        path_str(&base),
        "--tls-creds",
        "cli",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_bitmirror"))
        .args(cli)
        .output()
        .expect("bitmirror runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("bitmap 'B' moved: 2.1 MiB dirty"), "{text}");
    for d in [&mut a, &mut b] {
        let mut q = d.qmp();
        quit(&mut q, d);
    }
    common::assert_identical(&src, &b_dir.join("disk0.qcow2"));
}

/// `tls-authz` with an `authz-simple` object lets in only the client
/// whose certificate subject is the identity, written as QEMU (GnuTLS)
/// writes distinguished names: the same identity string lets the same
/// client into `qemu-nbd --tls-authz` and into ours, and keeps the same
/// other client out of both.
#[test]
fn tls_authz_admits_the_same_client_as_qemu_nbd() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    pki::ca(dir, "good");
    let server = pki::creds(dir, "good", "server", "server");
    let laptop = pki::creds_for(
        dir,
        "good",
        "client",
        "laptop",
        "/C=GB/O=Example Org, Ltd/CN=laptop",
    );
    let intruder = pki::creds_for(
        dir,
        "good",
        "client",
        "intruder",
        "/C=GB/O=Example Org/CN=intruder",
    );
    let identity = r"C=GB,O=Example Org\, Ltd,CN=laptop";
    let authz =
        json!({"qom-type": "authz-simple", "id": "auth0", "identity": identity}).to_string();
    let creds = json!({"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
                       "dir": path_str(&server)})
    .to_string();
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![5u8; 1 << 20]).expect("an image");

    // QEMU's verdicts.
    let port = free_port();
    let mut qemu = Command::new(require_tool("qemu-nbd", "qemu-utils"));
    qemu.args([
        "--object",
        &creds,
        "--object",
        &authz,
        "--tls-creds",
        "tls0",
        "--tls-authz",
        "auth0",
    ])
    .args([
        "-f",
        "raw",
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-x",
        "disk",
        "-t",
    ])
    .arg(&image);
    let qemu = Peer::start(&mut qemu, || listens(port));
    let (qemu_laptop, out_l) = qemu_io_tls(&laptop, port, &["read -P 5 0 64k"]);
    let (qemu_intruder, _) = qemu_io_tls(&intruder, port, &["read -P 5 0 64k"]);
    drop(qemu);
    assert!(qemu_laptop, "qemu-nbd must admit the laptop: {out_l}");
    assert!(!qemu_intruder, "qemu-nbd must refuse the intruder");

    // Ours, with the same objects.
    let port = free_port();
    let mut daemon = serve(
        dir,
        &[
            "--object".into(),
            creds,
            "--object".into(),
            authz,
            "--blockdev".into(),
            format!(
                "driver=raw,node-name=n,file.driver=file,file.filename={}",
                image.display()
            ),
            "--nbd-server".into(),
            format!(
                "addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0,tls-authz=auth0"
            ),
            "--export".into(),
            "type=nbd,id=e,node-name=n,name=disk,writable=on".into(),
        ],
    );
    let (ours_laptop, out) = qemu_io_tls(&laptop, port, &["read -P 5 0 64k"]);
    assert!(ours_laptop, "{out}");
    let (ours_intruder, out) = qemu_io_tls(&intruder, port, &["read -P 5 0 64k"]);
    assert!(!ours_intruder, "{out}");
    let (again, out) = qemu_io_tls(&laptop, port, &["read -P 5 0 64k"]);
    assert!(again, "{out}");
    let mut qmp = daemon.qmp();
    quit(&mut qmp, &mut daemon);
}

/// The QMP socket only lets its owner in (mode 0600 under the usual umask
/// 022): whoever can connect controls the daemon.
#[test]
fn the_qmp_socket_is_the_owners_only() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut daemon = serve(tmp.path(), &[]);
    let mode = std::fs::metadata(daemon.qmp_path())
        .expect("the socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode & 0o077, 0, "group or others may connect: {mode:o}");
    assert_eq!(mode & 0o600, 0o600, "{mode:o}");
    let mut qmp = daemon.qmp();
    quit(&mut qmp, &mut daemon);
}

/// An overlay whose header names its backing file as an NBD URI: refused
/// by default (a guest may have written that header), read through our
/// NBD client when the node says `x-backing-protocols=on`.
#[test]
fn nbd_backing_names_open_only_when_allowed() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x42u8; 1 << 20]).expect("a base");
    let sock = dir.join("base.sock");
    let mut peer = Command::new(require_tool("qemu-nbd", "qemu-utils"));
    peer.args([
        "-r",
        "-f",
        "raw",
        "-t",
        "-k",
        path_str(&sock),
        path_str(&base),
    ]);
    let _peer = Peer::start(&mut peer, || sock.exists());
    let overlay = dir.join("overlay.qcow2");
    let name = format!("nbd+unix:///?socket={}", sock.display());
    testkit::qemu_img_create_overlay(path_str(&overlay), &name, "raw", "1M");
    let nbd_sock = dir.join("nbd.sock");
    let mut daemon = serve(
        dir,
        &[
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", nbd_sock.display()),
        ],
    );
    let mut qmp = daemon.qmp();
    let node = |allow: bool| {
        json!({"driver": "qcow2", "node-name": "o", "x-backing-protocols": allow,
               "file": {"driver": "file", "filename": path_str(&overlay)}})
    };
    let e = qmp
        .execute("blockdev-add", node(false))
        .expect_err("refused");
    assert!(e.desc.contains("x-backing-protocols=on"), "{e:?}");
    qmp.execute_ok("blockdev-add", node(true));
    qmp.execute_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "o", "name": "o"}),
    );
    let uri = format!("nbd+unix:///o?socket={}", nbd_sock.display());
    let out = testkit::run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x42 0 1M", &uri],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    quit(&mut qmp, &mut daemon);
}
