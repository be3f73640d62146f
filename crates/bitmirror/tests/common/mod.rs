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
    let uri = nbd_uri(dir, "disk");
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    run("qemu-io", &args);
}

/// `qemu-img compare` finds the two qcow2 images identical.
pub fn assert_identical(a: &Path, b: &Path) {
    assert_same(path_str(a), "qcow2", path_str(b), "qcow2");
}

/// `qemu-img compare` finds image `a` (in format `a_format`) and image `b`
/// (a file or an NBD URI, in `b_format`) identical.
pub fn assert_same(a: &str, a_format: &str, b: &str, b_format: &str) {
    let cmp = run(
        "qemu-img",
        &["compare", "-f", a_format, "-F", b_format, a, b],
    );
    assert!(cmp.contains("Images are identical"), "{a} and {b}: {cmp}");
}

/// The NBD URI of export `export` on `dir/nbd.sock`.
pub fn nbd_uri(dir: &Path, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        dir.join("nbd.sock").display()
    )
}

/// The export `export` on `dir/nbd.sock` as a guest reads it now, copied
/// to the raw file `dir/file`.
pub fn guest_snapshot(dir: &Path, export: &str, file: &str) -> PathBuf {
    let out = dir.join(file);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &nbd_uri(dir, export),
            path_str(&out),
        ],
    );
    out
}

/// The daemon's options for an NBD server on `dir/nbd.sock`.
pub fn nbd_server(dir: &Path) -> Vec<String> {
    vec![
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
    ]
}

/// `bitmirror demo` exited 0 with every step and check of the workflow in
/// its report, `out`.
pub fn assert_demo_passed(code: Option<i32>, out: &str) {
    assert_eq!(code, Some(0), "{out}");
    for step in [
        "full backup A → R (with bitmap B)",
        "full mirror A → B (for comparison)",
        "incremental migration A → B",
        "incremental backup B → R",
        "incremental migration B → A",
        "host B: the disk reads exactly what the guest wrote",
        "host A: the disk reads exactly what the guest wrote",
        "all checks passed",
    ] {
        assert!(out.contains(step), "{step}: {out}");
    }
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

/// Runs `bitmirror ARGS`; its exit code and its output (both streams).
pub fn bitmirror(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitmirror"))
        .args(args)
        .output()
        .expect("bitmirror runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// Bytes the top layer of `image` allocates (`qemu-img map`, depth 0).
pub fn allocated_in_top(image: &Path) -> u64 {
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", path_str(image)],
    );
    let map: Value = serde_json::from_str(&out).expect("qemu-img map's JSON");
    map.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum()
}

/// `quit` through `qmp`, then the daemon must exit with 0.
pub fn quit(qmp: &mut Qmp, daemon: &mut StorageDaemon) {
    qmp.execute_ok("quit", serde_json::json!({}));
    assert_eq!(daemon.wait_exit(), Some(0));
}

/// A peer process (qemu-nbd, …), killed when the test ends, failed or not.
pub struct Peer(pub std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Peer {
    /// Starts `cmd` and waits until `ready` holds (a socket exists, a port
    /// listens), at most 5 s.
    pub fn start(cmd: &mut std::process::Command, ready: impl Fn() -> bool) -> Peer {
        let peer = Peer(cmd.spawn().expect("the peer starts"));
        for _ in 0..500 {
            if ready() {
                return peer;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the peer {cmd:?} did not get ready");
    }
}

/// Whether something listens on TCP `port` of 127.0.0.1.
pub fn listens(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A TCP port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
