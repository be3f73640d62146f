//! `bitmirror serve` as a process: clean shutdown on `quit`, SIGTERM and
//! SIGINT (images closed, persistent bitmaps stored), serving on while a
//! monitor sends garbage, the stdio monitor and the PID file.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use testkit::{Qmp, StorageDaemon, qemu_img_create_qcow2, require_tool, run};

fn bitmirror() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bitmirror"))
}

fn serve(dir: &Path, args: &[String]) -> StorageDaemon {
    StorageDaemon::start_program(&bitmirror(), &["serve"], dir, args)
}

/// Options for a qcow2 node `disk` over `image`, exported writable as
/// `disk` on a unix NBD socket in `dir`.
fn exported_qcow2(dir: &Path, image: &Path) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
            image.display()
        ),
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
        "--export".into(),
        "type=nbd,id=e0,node-name=disk,name=disk,writable=on".into(),
    ]
}

fn nbd_uri(dir: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display())
}

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    require_tool("qemu-io", "qemu-utils");
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run("qemu-io", &args)
}

fn signal(pid: u32, name: &str) {
    run("kill", &[&format!("-{name}"), &pid.to_string()]);
}

/// Stops the daemon by `how` after writes with a persistent bitmap
/// recording them; the image must be clean and the bitmap stored, not in
/// use, and loadable by qemu-storage-daemon with the same bits.
fn shutdown_stores_bitmaps(how: &str) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let image = dir.path().join("disk.qcow2");
    let image_str = image.to_str().expect("UTF-8 path");
    qemu_img_create_qcow2(image_str, 64 << 20, "");
    let mut daemon = serve(dir.path(), &exported_qcow2(dir.path(), &image));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0", "persistent": true}),
    );
    qemu_io(
        &nbd_uri(dir.path()),
        &["write -P 7 1M 64k", "write -P 8 10M 4k"],
    );
    let ours = qmp.execute_ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "disk", "name": "b0"}),
    );
    match how {
        "quit" => {
            qmp.execute_ok("quit", json!({}));
        }
        sig => signal(daemon.pid(), sig),
    }
    assert_eq!(daemon.wait_exit(), Some(0), "exit code after {how}");

    run("qemu-img", &["check", image_str]);
    let info: Value = serde_json::from_str(&run("qemu-img", &["info", "--output=json", image_str]))
        .expect("qemu-img info prints JSON");
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(
        bitmaps,
        &json!([{"flags": ["auto"], "name": "b0", "granularity": 65536}]),
        "after {how}"
    );
    let qemu_dir = tempfile::tempdir().expect("a temporary directory");
    let mut qsd = StorageDaemon::start(
        qemu_dir.path(),
        &[
            "--blockdev".into(),
            format!("driver=qcow2,node-name=disk,file.driver=file,file.filename={image_str}"),
        ],
    );
    let theirs = qsd.qmp().execute_ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "disk", "name": "b0"}),
    );
    assert_eq!(theirs, ours, "the bits qemu-storage-daemon loads");
    drop(qsd.qmp().execute_ok("quit", json!({})));
    assert_eq!(qsd.wait_exit(), Some(0));
    // The data went through too.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 7 1M 64k",
            "-c",
            "read -P 8 10M 4k",
            image_str,
        ],
    );
}

#[test]
fn sigterm_closes_images_and_stores_bitmaps() {
    shutdown_stores_bitmaps("TERM");
}

#[test]
fn sigint_closes_images_and_stores_bitmaps() {
    shutdown_stores_bitmaps("INT");
}

#[test]
fn quit_closes_images_and_stores_bitmaps() {
    shutdown_stores_bitmaps("quit");
}

#[test]
fn garbage_on_one_monitor_leaves_the_others_serving() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let image = dir.path().join("disk.qcow2");
    qemu_img_create_qcow2(image.to_str().expect("UTF-8 path"), 16 << 20, "");
    let mut args = exported_qcow2(dir.path(), &image);
    args.extend([
        "--chardev".into(),
        format!(
            "socket,id=m1,path={},server=on,wait=off",
            dir.path().join("m1.sock").display()
        ),
        "--monitor".into(),
        "chardev=m1".into(),
    ]);
    let daemon = serve(dir.path(), &args);
    let mut good = daemon.qmp();
    // The garbage sender reads whatever comes back on a thread of its own,
    // as a client must: a monitor writes its replies before reading on.
    let mut bad = UnixStream::connect(dir.path().join("m1.sock")).expect("monitor m1");
    let mut drain = bad.try_clone().expect("a second handle");
    let drained = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = drain.read_to_end(&mut all);
        all
    });
    bad.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .expect("sends");

    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let uri = nbd_uri(dir.path());
    for round in 0..20 {
        // Garbage: random bytes, deep nesting, unbalanced brackets, bad
        // UTF-8, a huge string.
        let mut junk = Vec::new();
        for _ in 0..512 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            junk.push((rng & 0xff) as u8);
        }
        junk.extend_from_slice(b"\xc3\x28 ]]]} {\"execute\": [[[[[[");
        junk.extend(std::iter::repeat_n(b'[', 2000));
        junk.extend_from_slice(b"\n\"");
        junk.extend(std::iter::repeat_n(b'x', 100_000));
        junk.extend_from_slice(b"\"\n");
        bad.write_all(&junk).expect("the monitor keeps reading");
        // The other monitor and NBD clients carry on meanwhile.
        let v = good.execute_ok("query-version", json!({}));
        assert_eq!(v["qemu"]["major"], 10, "round {round}");
        let offset = round * 65536;
        qemu_io(
            &uri,
            &[
                &format!("write -P {round} {offset} 64k"),
                &format!("read -P {round} {offset} 64k"),
            ],
        );
    }
    // 0xff makes the monitor start over (QEMU's resync byte); the session
    // still works.
    bad.write_all(b"\xff{\"execute\": \"query-version\", \"id\": \"after\"}\n")
        .expect("sends");
    bad.shutdown(std::net::Shutdown::Write).expect("half-close");
    let replies = drained.join().expect("the drain thread");
    let replies = String::from_utf8_lossy(&replies);
    let last: Value = replies
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("a JSON reply last");
    assert_eq!(last["id"], "after", "{last}");
    assert_eq!(last["return"]["qemu"]["major"], 10);
    assert!(replies.contains("\"desc\": \"QMP input must be a JSON object\""));
    // The monitor takes the next client.
    let (mut again, _) = Qmp::connect_raw(&dir.path().join("m1.sock"));
    again.send_raw("{\"execute\": \"qmp_capabilities\"}\n");
    assert_eq!(again.read_reply(), json!({"return": {}}));
    let exports = good.execute_ok("query-block-exports", json!({}));
    assert_eq!(exports.as_array().map(Vec::len), Some(1));
}

#[test]
fn stdio_monitor_and_pidfile() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pidfile = dir.path().join("pid");
    let mut child = Command::new(bitmirror())
        .args([
            "serve",
            "--blockdev",
            "null-co,node-name=n0",
            "--chardev",
            "stdio,id=m0",
        ])
        .args(["--monitor", "chardev=m0", "--pidfile"])
        .arg(&pidfile)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("bitmirror starts");
    let mut stdin = child.stdin.take().expect("a stdin pipe");
    let mut stdout = BufReader::new(child.stdout.take().expect("a stdout pipe"));
    // A failed assertion must not leave the daemon running.
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(self.0.to_string()).status();
        }
    }
    let _reap = Reap(child.id());
    let mut line = String::new();
    let mut next = |stdout: &mut BufReader<_>| -> Value {
        line.clear();
        stdout.read_line(&mut line).expect("a line from stdout");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON ({e}): {line}"))
    };
    let greeting = next(&mut stdout);
    assert_eq!(
        greeting["QMP"]["capabilities"],
        json!([]),
        "no oob on stdio, as QEMU"
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("the PID file exists once the monitor greets")
        .trim()
        .parse()
        .expect("a PID");
    assert_eq!(pid, child.id());
    stdin
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-named-block-nodes\", \"arguments\": {\"flat\": true}}\n")
        .expect("writes to stdin");
    assert_eq!(next(&mut stdout), json!({"return": {}}));
    assert_eq!(next(&mut stdout)["return"][0]["node-name"], "n0");
    stdin
        .write_all(b"{\"execute\": \"quit\"}\n")
        .expect("writes to stdin");
    assert_eq!(next(&mut stdout), json!({"return": {}}));
    let status = child.wait().expect("bitmirror exits");
    assert!(status.success(), "{status}");
    assert!(
        !pidfile.exists(),
        "the PID file is removed on exit, as QEMU does"
    );
}

#[test]
fn daemonize_returns_once_started_and_reports_failures() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pidfile = dir.path().join("pid");
    let sock = dir.path().join("qmp.sock");
    let out = Command::new(bitmirror())
        .args([
            "serve",
            "--daemonize",
            "--blockdev",
            "null-co,node-name=n0",
            "--chardev",
        ])
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["--monitor", "m0", "--pidfile"])
        .arg(&pidfile)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("bitmirror runs");
    assert!(out.status.success(), "{out:?}");
    // Started means serving: the PID file and the monitor are there now.
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("the PID file")
        .trim()
        .parse()
        .expect("a PID");
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    assert!(proc_dir.exists(), "the daemon runs on");
    let mut qmp = Qmp::connect(&sock);
    assert_eq!(
        qmp.execute_ok("query-named-block-nodes", json!({"flat": true}))[0]["node-name"],
        "n0"
    );
    qmp.execute_ok("quit", json!({}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while proc_dir.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!pidfile.exists(), "the daemon removed its PID file");

    // A start-up failure: reported by the command itself, exit 1.
    let out = Command::new(bitmirror())
        .args([
            "serve",
            "--daemonize",
            "--blockdev",
            "driver=file,node-name=f,filename=/nonexistent/x",
        ])
        .output()
        .expect("bitmirror runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Could not open '/nonexistent/x': No such file or directory"),
        "{stderr}"
    );
}

#[test]
fn throttle_group_paces_an_export() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // Data, not holes: the NBD server answers holes from block status
    // without reading, and what is not read is not throttled.
    let image = dir.path().join("data.raw");
    let image = image.to_str().expect("UTF-8 path");
    run("qemu-img", &["create", "-q", "-f", "raw", image, "8M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 5 0 8M", image]);
    let args: Vec<String> = [
        "--object",
        "throttle-group,id=tg0,limits.bps-total=4194304",
        "--blockdev",
        &format!("driver=file,node-name=n0,filename={image}"),
        "--blockdev",
        "throttle,node-name=disk,throttle-group=tg0,file=n0",
        "--nbd-server",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!(
            "addr.type=unix,addr.path={}",
            dir.path().join("nbd.sock").display()
        ),
        "--export".into(),
        "nbd,id=e0,node-name=disk,name=disk".into(),
    ])
    .collect();
    let daemon = serve(dir.path(), &args);
    let start = std::time::Instant::now();
    let uri = nbd_uri(dir.path());
    let reads: Vec<String> = (0..8).map(|i| format!("read -P 5 {i}M 1M")).collect();
    let mut args = vec!["-r", "-f", "raw"];
    for r in &reads {
        args.extend(["-c", r]);
    }
    args.push(&uri);
    run("qemu-io", &args);
    let took = start.elapsed().as_secs_f64();
    // Eight 1 MiB reads at 4 MiB/s: each is admitted once the bucket has
    // drained to a tenth of a second's worth (as in QEMU, a request is not
    // split), so the last starts after at least 0.15 + 6 × 0.25 s. A lower
    // bound only: a busy machine only makes it slower.
    assert!(
        took >= 1.6,
        "8 × 1 MiB read in {took:.2} s through a 4 MiB/s group"
    );
    let mut qmp = daemon.qmp();
    let err = qmp.execute("object-del", json!({"id": "tg0"})).unwrap_err();
    assert_eq!(err.desc, "object 'tg0' is in use, can not be deleted");
}

/// QEMU 10.0 aborts on `block-dirty-bitmap-merge` with an empty list; we
/// merge nothing and keep serving.
#[test]
fn merging_an_empty_list_changes_nothing() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let daemon = serve(
        dir.path(),
        &["--blockdev".into(), "null-co,node-name=n0".into()],
    );
    let mut qmp = daemon.qmp();
    qmp.execute_ok("block-dirty-bitmap-add", json!({"node": "n0", "name": "b"}));
    let before = qmp.execute_ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "n0", "name": "b"}),
    );
    let merge = |target: &str| json!({"node": "n0", "target": target, "bitmaps": []});
    assert_eq!(
        qmp.execute_ok("block-dirty-bitmap-merge", merge("b")),
        json!({})
    );
    let err = qmp
        .execute("block-dirty-bitmap-merge", merge("nosuch"))
        .unwrap_err();
    assert_eq!(err.desc, "Dirty bitmap 'nosuch' not found");
    let after = qmp.execute_ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "n0", "name": "b"}),
    );
    assert_eq!(after, before);
}

/// A bad option anywhere fails before any image is opened: the image is
/// not locked, not written, and the daemon does not start.
#[test]
fn a_bad_option_touches_no_image() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let image = dir.path().join("disk.qcow2");
    let image_str = image.to_str().expect("UTF-8 path");
    qemu_img_create_qcow2(image_str, 16 << 20, "");
    let before = std::fs::read(&image).expect("the image");
    let out = Command::new(bitmirror())
        .args(["serve", "--blockdev"])
        .arg(format!(
            "driver=qcow2,node-name=d,file.driver=file,file.filename={image_str}"
        ))
        .args(["--export", "nbd,id=e0,node-name=d,writable=maybe"])
        .output()
        .expect("bitmirror runs");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "bitmirror serve: --export nbd,id=e0,node-name=d,writable=maybe: Parameter 'writable' \
         expects 'on' or 'off'\n"
    );
    assert_eq!(
        std::fs::read(&image).expect("the image"),
        before,
        "the image is untouched"
    );
}

/// A monitor on a TCP chardev, as QEMU's `host=,port=` sockets.
#[test]
fn tcp_monitor() {
    // A free port: bind, read it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new(bitmirror())
        .args(["serve", "--chardev"])
        .arg(format!(
            "socket,id=t0,host=127.0.0.1,port={port},server=on,wait=off"
        ))
        .args(["--monitor", "t0"])
        .stdin(Stdio::null())
        .spawn()
        .expect("bitmirror starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stream = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "no TCP monitor: {e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    };
    let mut reader = BufReader::new(stream.try_clone().expect("a second handle"));
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).expect("the greeting");
    assert!(line.starts_with("{\"QMP\": {\"version\": "), "{line}");
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"quit\", \"id\": 3}")
        .expect("sends");
    let mut replies = Vec::new();
    for _ in 0..2 {
        line.clear();
        reader.read_line(&mut line).expect("a reply");
        replies.push(line.clone());
    }
    assert_eq!(
        replies,
        ["{\"return\": {}}\r\n", "{\"return\": {}, \"id\": 3}\r\n"]
    );
    assert!(child.wait().expect("exits").success());
}

/// Every monitor past negotiation receives every event; one still
/// negotiating receives none.
#[test]
fn events_reach_every_negotiated_monitor() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut args = vec![
        "--blockdev".to_string(),
        "null-co,node-name=n0".into(),
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            dir.path().join("nbd.sock").display()
        ),
    ];
    for m in ["m1", "m2"] {
        args.extend([
            "--chardev".into(),
            format!(
                "socket,id={m},path={},server=on,wait=off",
                dir.path().join(m).display()
            ),
            "--monitor".into(),
            m.into(),
        ]);
    }
    let daemon = serve(dir.path(), &args);
    let mut a = daemon.qmp();
    let mut b = Qmp::connect(&dir.path().join("m1"));
    let (mut c, _) = Qmp::connect_raw(&dir.path().join("m2"));
    a.execute_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0"}),
    );
    a.execute_ok("block-export-del", json!({"id": "e0"}));
    for (name, qmp) in [("issuer", &mut a), ("other", &mut b)] {
        let events = qmp.take_events(1);
        assert_eq!(events[0]["event"], "BLOCK_EXPORT_DELETED", "{name}");
        assert_eq!(events[0]["data"], json!({"id": "e0"}), "{name}");
    }
    // The negotiating session got nothing but its answer.
    let reply = c.request(&json!({"execute": "qmp_capabilities"}));
    assert_eq!(reply, json!({"return": {}}));
    assert!(c.events.is_empty(), "{:?}", c.events);
}
