//! Helpers the daemon's integration tests share.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use testkit::{Qmp, StorageDaemon, run};

/// Starts `bitmirror serve` in `dir` with `args` (and a QMP monitor).
pub fn serve(dir: &Path, args: &[String]) -> StorageDaemon {
    StorageDaemon::start_program(
        &PathBuf::from(env!("CARGO_BIN_EXE_bitmirror")),
        &["serve"],
        dir,
        args,
    )
}

/// Runs `qemu-io` `commands` against the export `disk` on `dir/nbd.sock`.
pub fn guest(dir: &Path, commands: &[String]) {
    let uri = format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display());
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    run("qemu-io", &args);
}

/// `qemu-img compare` finds the two qcow2 images identical.
pub fn assert_identical(a: &Path, b: &Path) {
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            path_str(a),
            path_str(b),
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

/// Waits for event `name` (other events are kept aside).
pub fn wait_event(qmp: &mut Qmp, name: &str) -> Value {
    loop {
        if let Some(pos) = qmp.events.iter().position(|e| e["event"] == name) {
            return qmp.events.remove(pos);
        }
        let m = qmp.read_message();
        if m.get("event").is_some() {
            qmp.events.push(m);
        } else {
            panic!("unexpected message while waiting for {name}: {m}");
        }
    }
}

/// `p` as UTF-8 (test paths are).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A second daemon in `dir/dest` exporting the qcow2 `image` writable as
/// `export`: a migration's destination. Returns it and its NBD socket.
pub fn destination(dir: &Path, image: &Path, export: &str) -> (StorageDaemon, PathBuf) {
    let dest_dir = dir.join("dest");
    std::fs::create_dir(&dest_dir).expect("a directory");
    let sock = dest_dir.join("nbd.sock");
    let daemon = serve(
        &dest_dir,
        &[
            "--blockdev".into(),
            format!(
                "driver=qcow2,node-name=d,file.driver=file,file.filename={}",
                image.display()
            ),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", sock.display()),
            "--export".into(),
            format!("type=nbd,id=e,node-name=d,name={export},writable=on"),
        ],
    );
    (daemon, sock)
}
