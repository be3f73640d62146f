//! Mirror jobs through `bitmirror serve`, with a writer on the source's
//! NBD export: the target ends equal to what the guest wrote, checked with
//! `qemu-io` patterns and `qemu-img compare`.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_identical, destination, guest, path_str, quit, serve, wait_event};
use serde_json::{Value, json};
use testkit::{Qmp, StorageDaemon, qemu_img_create_qcow2, run};

/// `src` and `dst` qcow2 nodes, `src` exported writable as `disk`.
fn setup(dir: &Path, src: &Path, dst: &Path) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            src.display()
        ),
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=dst,file.driver=file,file.filename={}",
            dst.display()
        ),
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
        "--export".into(),
        "type=nbd,id=e0,node-name=src,name=disk,writable=on".into(),
    ]
}

/// A temporary directory holding two empty qcow2 images of `size` bytes,
/// `src.qcow2` and `dst.qcow2`.
fn empty_pair(size: u64) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (src, dst) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"));
    qemu_img_create_qcow2(path_str(&src), size, "");
    qemu_img_create_qcow2(path_str(&dst), size, "");
    (dir, src, dst)
}

/// Completes mirror `job`, expects success, and quits the daemon.
fn complete_and_quit(qmp: &mut Qmp, daemon: &mut StorageDaemon, job: &str) {
    qmp.execute_ok("block-job-complete", json!({ "device": job }));
    let done = wait_event(qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    quit(qmp, daemon);
}

#[test]
fn full_mirror_with_a_writer_then_complete_pivots_the_export() {
    let (dir, src, dst) = empty_pair(64 << 20);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 8M",
            "-c",
            "write -P 2 32M 4M",
            path_str(&src),
        ],
    );
    let mut daemon = serve(dir.path(), &setup(dir.path(), &src, &dst));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "dst", "sync": "full"}),
    );
    // The guest keeps writing while the mirror runs.
    let writes: Vec<String> = (0..16)
        .map(|i| format!("write -P {} {}M 512k", 10 + i, i * 2))
        .collect();
    guest(dir.path(), &writes);
    let ready = wait_event(&mut qmp, "BLOCK_JOB_READY");
    assert_eq!(ready["data"]["device"], "m0");
    assert_eq!(ready["data"]["type"], "mirror");
    let jobs = qmp.execute_ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["ready"], true, "{jobs}");
    assert_eq!(jobs[0]["status"], "ready", "{jobs}");
    guest(dir.path(), &["write -P 99 60M 1M".into()]);
    qmp.execute_ok("block-job-complete", json!({"device": "m0"}));
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["len"], done["data"]["offset"], "{done}");
    // The export now serves the target.
    let exports = qmp.execute_ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["node-name"], "dst", "{exports}");
    guest(dir.path(), &["write -P 77 62M 64k".into()]);
    quit(&mut qmp, &mut daemon);

    run("qemu-img", &["check", path_str(&dst)]);
    let mut reads: Vec<String> = vec![
        "read -P 2 32M 4M".into(),
        "read -P 99 60M 1M".into(),
        "read -P 77 62M 64k".into(),
    ];
    for i in 0..16u64 {
        reads.push(format!("read -P {} {}M 512k", 10 + i, i * 2));
    }
    let mut args = vec!["-f", "qcow2"];
    for r in &reads {
        args.extend(["-c", r.as_str()]);
    }
    args.push(path_str(&dst));
    let out = run("qemu-io", &args);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Everything but the write made after the pivot is on the source too.
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 77 62M 64k", path_str(&src)],
    );
    assert_identical(&src, &dst);
}

#[test]
fn bitmap_mirror_copies_only_what_changed_since_the_backup() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (src, dst) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"));
    qemu_img_create_qcow2(path_str(&src), 64 << 20, "");
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 32M", path_str(&src)],
    );
    // The "backup": a copy of the source, as the shared image would be.
    std::fs::copy(&src, &dst).expect("a copy");
    let mut daemon = serve(dir.path(), &setup(dir.path(), &src, &dst));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0"}),
    );
    guest(
        dir.path(),
        &["write -P 5 1M 64k".into(), "write -P 6 40M 128k".into()],
    );
    let count = qmp
        .execute_ok("query-named-block-nodes", json!({"flat": true}))
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node-name"] == "src").cloned())
        .expect("src")["dirty-bitmaps"][0]["count"]
        .as_u64()
        .expect("a count");
    assert_eq!(count, 192 << 10);
    for bad in [
        json!({"device": "src", "target": "dst", "sync": "bitmap"}),
        json!({"device": "src", "target": "dst", "sync": "full", "bitmap": "b0"}),
        json!({"device": "src", "target": "dst", "sync": "bitmap", "bitmap": "b0", "granularity": 65536}),
        json!({"device": "src", "target": "dst", "sync": "bitmap", "bitmap": "nosuch"}),
    ] {
        assert!(
            qmp.execute("blockdev-mirror", bad.clone()).is_err(),
            "{bad} was accepted"
        );
    }
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m1", "device": "src", "target": "dst", "sync": "bitmap", "bitmap": "b0"}),
    );
    let ready = wait_event(&mut qmp, "BLOCK_JOB_READY");
    // Only the dirty clusters crossed over.
    assert_eq!(ready["data"]["len"], count, "{ready}");
    // Cancel after READY: a point-in-time copy, and a success.
    qmp.execute_ok("block-job-cancel", json!({"device": "m1"}));
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    let exports = qmp.execute_ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["node-name"], "src", "no pivot: {exports}");
    // bitmap-mode=never: the user bitmap is untouched and still recording.
    let nodes = qmp.execute_ok("query-named-block-nodes", json!({"flat": true}));
    let b0 = nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node-name"] == "src").cloned())
        .expect("src")["dirty-bitmaps"][0]
        .clone();
    assert_eq!(b0["count"], count, "{b0}");
    assert_eq!(b0["busy"], false, "{b0}");
    assert_eq!(qmp.execute_ok("query-block-jobs", json!({})), json!([]));
    quit(&mut qmp, &mut daemon);
    assert_identical(&src, &dst);
}

/// Writes in flight while the job starts reach the target (QEMU 10.0 can
/// lose them, gitlab #3273): a writer hammers the source through NBD from
/// before the mirror starts until after it is READY; the target then
/// equals the source.
#[test]
fn writes_racing_the_start_reach_the_target() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (src, dst) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"));
    qemu_img_create_qcow2(path_str(&src), 32 << 20, "");
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 16M", path_str(&src)],
    );
    std::fs::copy(&src, &dst).expect("the backup");
    let mut daemon = serve(dir.path(), &setup(dir.path(), &src, &dst));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0", "granularity": 4096}),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let writes: Vec<String> = (0..32)
                    .map(|i| {
                        let at = ((round * 97 + i * 131) % 8000) * 4096;
                        format!("aio_write -P {} {at} 4k", (round + i) % 250 + 2)
                    })
                    .chain(["aio_flush".to_string()])
                    .collect();
                guest(&dir, &writes);
                round += 1;
            }
            round
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "dst", "sync": "bitmap", "bitmap": "b0"}),
    );
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = writer.join().expect("the writer");
    assert!(rounds >= 2, "the writer ran {rounds} rounds");
    complete_and_quit(&mut qmp, &mut daemon, "m");
    assert_identical(&src, &dst);
}

/// bitmap-mode: `on-success` leaves the user bitmap with what is left to
/// copy (nothing) after a success; `always` does so after a failure too —
/// here the target's NBD server dies mid-job — so a retry resumes.
#[test]
fn bitmap_modes_hand_back_what_is_left() {
    let (dir, src, dst) = empty_pair(64 << 20);
    let nbd_sock = dir.path().join("target.sock");
    let mut qemu_nbd = std::process::Command::new(testkit::require_tool("qemu-nbd", "qemu-utils"))
        .args([
            "-f",
            "qcow2",
            "-t",
            "-k",
            path_str(&nbd_sock),
            path_str(&dst),
        ])
        .spawn()
        .expect("qemu-nbd starts");
    while !nbd_sock.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let args = vec![
        "--blockdev".to_string(),
        format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            src.display()
        ),
        "--blockdev".into(),
        format!(
            "driver=nbd,node-name=dst,server.type=unix,server.path={}",
            nbd_sock.display()
        ),
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            dir.path().join("nbd.sock").display()
        ),
        "--export".into(),
        "type=nbd,id=e0,node-name=src,name=disk,writable=on".into(),
    ];
    let mut daemon = serve(dir.path(), &args);
    let mut qmp = daemon.qmp();
    let count = |qmp: &mut Qmp| {
        qmp.execute_ok("query-named-block-nodes", json!({"flat": true}))
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node-name"] == "src").cloned())
            .expect("src")["dirty-bitmaps"][0]
            .clone()
    };
    qmp.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b"}),
    );
    guest(dir.path(), &["write -P 3 0 16M".into()]);
    assert_eq!(count(&mut qmp)["count"], 16 << 20);

    // always + a target that dies: the bitmap keeps what was not copied.
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "dst", "sync": "bitmap",
               "bitmap": "b", "bitmap-mode": "always", "speed": 4 << 20}),
    );
    let jobs = qmp.execute_ok("query-jobs", json!({}));
    assert_eq!(
        count(&mut qmp)["busy"],
        true,
        "busy while the job runs: {jobs} {:?}",
        qmp.events
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    qemu_nbd.kill().expect("kill qemu-nbd");
    let _ = qemu_nbd.wait();
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(
        done["data"].get("error").is_some(),
        "the job failed: {done}"
    );
    let left = count(&mut qmp);
    assert_eq!(left["busy"], false, "{left}");
    let left = left["count"].as_u64().expect("a count");
    assert!(
        left > 0 && left < 16 << 20,
        "{left} bytes left of {}",
        16 << 20
    );

    // on-success into a live target (a local file this time): nothing left.
    let local = dir.path().join("local.qcow2");
    qemu_img_create_qcow2(path_str(&local), 64 << 20, "");
    qmp.execute_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "local",
               "file": {"driver": "file", "filename": path_str(&local)}}),
    );
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m2", "device": "src", "target": "local", "sync": "bitmap",
               "bitmap": "b", "bitmap-mode": "on-success"}),
    );
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    qmp.execute_ok("block-job-cancel", json!({"device": "m2"}));
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["len"], left, "only what was left crossed over");
    assert_eq!(count(&mut qmp)["count"], 0);
    quit(&mut qmp, &mut daemon);
}

/// `sync=top` copies what the top layer allocates (the target overlay
/// shares the backing file), `sync=none` only writes made during the job;
/// pause, resume, set-speed and a cancel before READY along the way.
#[test]
fn top_and_none_with_pause_resume_speed_and_cancel() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let base = dir.path().join("base.qcow2");
    let (src, dst) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"));
    qemu_img_create_qcow2(path_str(&base), 32 << 20, "");
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 32M", path_str(&base)],
    );
    let backing = format!("backing_file={},backing_fmt=qcow2", base.display());
    for overlay in [&src, &dst] {
        qemu_img_create_qcow2(path_str(overlay), 32 << 20, &backing);
    }
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 2 4M 2M", path_str(&src)],
    );
    let mut daemon = serve(dir.path(), &setup(dir.path(), &src, &dst));
    let mut qmp = daemon.qmp();

    // A slow job first (into a scratch image): pause, resume, speed, then
    // cancel before READY.
    let scratch = dir.path().join("scratch.qcow2");
    qemu_img_create_qcow2(path_str(&scratch), 32 << 20, "");
    qmp.execute_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "scratch",
               "file": {"driver": "file", "filename": path_str(&scratch)}}),
    );
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "slow", "device": "src", "target": "scratch", "sync": "full",
               "speed": 1 << 20}),
    );
    qmp.execute_ok("block-job-pause", json!({"device": "slow"}));
    let info = |qmp: &mut Qmp| qmp.execute_ok("query-block-jobs", json!({}))[0].clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while info(&mut qmp)["status"] != "paused" {
        assert!(
            std::time::Instant::now() < deadline,
            "never paused: {}",
            info(&mut qmp)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(info(&mut qmp)["paused"], true);
    let err = qmp
        .execute("block-job-complete", json!({"device": "slow"}))
        .unwrap_err();
    assert_eq!(
        err.desc,
        "Job 'slow' in state 'paused' cannot accept command verb 'complete'"
    );
    qmp.execute_ok("block-job-resume", json!({"device": "slow"}));
    qmp.execute_ok(
        "block-job-set-speed",
        json!({"device": "slow", "speed": 2 << 20}),
    );
    assert_eq!(info(&mut qmp)["speed"], 2 << 20);
    qmp.execute_ok("block-job-cancel", json!({"device": "slow"}));
    let cancelled = wait_event(&mut qmp, "BLOCK_JOB_CANCELLED");
    assert_eq!(cancelled["data"]["device"], "slow");
    assert_eq!(qmp.execute_ok("query-block-jobs", json!({})), json!([]));

    // sync=top: only the overlay's 2 MiB.
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "top", "device": "src", "target": "dst", "sync": "top"}),
    );
    let ready = wait_event(&mut qmp, "BLOCK_JOB_READY");
    assert_eq!(ready["data"]["len"], 2 << 20, "{ready}");
    qmp.execute_ok("block-job-cancel", json!({"device": "top"}));
    wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");

    // sync=none: nothing at first, then just the new write.
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "none", "device": "src", "target": "dst", "sync": "none"}),
    );
    let ready = wait_event(&mut qmp, "BLOCK_JOB_READY");
    assert_eq!(ready["data"]["len"], 0, "{ready}");
    guest(dir.path(), &["write -P 9 20M 64k".into()]);
    qmp.execute_ok("block-job-complete", json!({"device": "none"}));
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    // The one cluster written, copied once — or twice, when the copy
    // caught the write between its two marks (see the block layer's write
    // tracking).
    let len = done["data"]["len"].as_u64().unwrap_or(0);
    assert!(len == 64 << 10 || len == 128 << 10, "{done}");
    quit(&mut qmp, &mut daemon);
    assert_identical(&src, &dst);
    // The target's own allocation is only what the top layer had.
    let map = run(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", path_str(&dst)],
    );
    let map: Value = serde_json::from_str(&map).expect("qemu-img map prints JSON");
    let own: u64 = map
        .as_array()
        .expect("extents")
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(own, (2 << 20) + (64 << 10), "{map}");
}

/// Starts a guest that writes 64 KiB blocks all over the first 48 MiB
/// through the source's export until `stop`; returns its thread.
fn busy_guest(
    dir: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let mut round = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let writes: Vec<String> = (0..32)
                .map(|i| {
                    let at = ((round * 37 + i * 101) % 768) * 65536;
                    format!("aio_write -P {} {at} 64k", (round + i) % 250 + 2)
                })
                .chain(["aio_flush".to_string()])
                .collect();
            guest(&dir, &writes);
            round += 1;
        }
        round
    })
}

/// What the job has left to copy now.
fn backlog(qmp: &mut Qmp) -> u64 {
    let job = qmp.execute_ok("query-block-jobs", json!({}))[0].clone();
    job["len"].as_u64().unwrap_or(0) - job["offset"].as_u64().unwrap_or(0)
}

/// A guest that writes faster than the background copy (held to 1 MiB/s):
/// in background mode the backlog grows; switched to write-blocking with
/// block-job-change, guest writes copy themselves and nothing new piles
/// up; the mirror completes with the target equal to the source.
#[test]
fn write_blocking_converges_where_background_does_not() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (src, dst) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"));
    qemu_img_create_qcow2(path_str(&src), 64 << 20, "");
    std::fs::copy(&src, &dst).expect("the backup");
    let mut daemon = serve(dir.path(), &setup(dir.path(), &src, &dst));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "dst", "sync": "none",
               "speed": 1 << 20}),
    );
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = busy_guest(dir.path(), stop.clone());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let behind = backlog(&mut qmp);
    assert!(
        behind >= 4 << 20,
        "background mode fell behind by only {behind} bytes"
    );
    assert_eq!(
        qmp.execute_ok("query-block-jobs", json!({}))[0]["actively-synced"],
        false
    );

    qmp.execute_ok(
        "block-job-change",
        json!({"id": "m", "type": "mirror", "copy-mode": "write-blocking"}),
    );
    // What piled up drains at 1 MiB/s; what the guest writes from now on
    // does not pile up: over a second of writing the backlog grows by no
    // more than the guest's writes in flight (32 × 64 KiB).
    let before = backlog(&mut qmp);
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let after = backlog(&mut qmp);
    assert!(
        after <= before + (2 << 20),
        "the backlog grew from {before} to {after} in write-blocking mode"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = writer.join().expect("the writer");
    assert!(rounds > 2, "{rounds} rounds");
    qmp.execute_ok("block-job-set-speed", json!({"device": "m", "speed": 0}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while backlog(&mut qmp) > 0 {
        assert!(std::time::Instant::now() < deadline, "never caught up");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        qmp.execute_ok("query-block-jobs", json!({}))[0]["actively-synced"],
        true
    );
    complete_and_quit(&mut qmp, &mut daemon, "m");
    assert_identical(&src, &dst);
}

/// Error policies against a target that fails writes with ENOSPC while a
/// trigger file exists (nbdkit's error filter): `enospc` stops the job
/// (`BLOCK_JOB_ERROR`, io-status nospace) and resuming after the space
/// "comes back" finishes it; `ignore` retries on its own; `report` fails.
#[test]
fn error_policies_stop_ignore_report() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let src = dir.path().join("src.qcow2");
    qemu_img_create_qcow2(path_str(&src), 16 << 20, "");
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 4 0 4M",
            "-c",
            "write -P 5 8M 1M",
            path_str(&src),
        ],
    );
    let trigger = dir.path().join("full");
    let sock = dir.path().join("target.sock");
    let mut nbdkit = std::process::Command::new(testkit::require_tool("nbdkit", "nbdkit"))
        .args([
            "--foreground",
            "-U",
            path_str(&sock),
            "--filter=error",
            "memory",
            "size=16M",
        ])
        .args(["error-pwrite=ENOSPC", "error-pwrite-rate=100%"])
        .arg(format!("error-pwrite-file={}", trigger.display()))
        .args(["error-zero=ENOSPC", "error-zero-rate=100%"])
        .arg(format!("error-zero-file={}", trigger.display()))
        .spawn()
        .expect("nbdkit starts");
    while !sock.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let args = vec![
        "--blockdev".to_string(),
        format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            src.display()
        ),
        "--blockdev".into(),
        format!(
            "driver=nbd,node-name=dst,server.type=unix,server.path={}",
            sock.display()
        ),
    ];
    let mut daemon = serve(dir.path(), &args);
    let mut qmp = daemon.qmp();
    let job = |qmp: &mut Qmp| qmp.execute_ok("query-block-jobs", json!({}))[0].clone();

    // report: the job fails.
    std::fs::write(&trigger, b"").expect("the trigger");
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "r", "device": "src", "target": "dst", "sync": "full"}),
    );
    let err = wait_event(&mut qmp, "BLOCK_JOB_ERROR");
    assert_eq!(
        err["data"],
        json!({"device": "r", "operation": "write", "action": "report"})
    );
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(
        done["data"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{done}"
    );

    // enospc: stops; resume after the space comes back.
    qmp.events.clear();
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "s", "device": "src", "target": "dst", "sync": "full", "on-target-error": "enospc"}),
    );
    let err = wait_event(&mut qmp, "BLOCK_JOB_ERROR");
    assert_eq!(
        err["data"],
        json!({"device": "s", "operation": "write", "action": "stop"})
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while job(&mut qmp)["status"] != "paused" {
        assert!(
            std::time::Instant::now() < deadline,
            "never paused: {}",
            job(&mut qmp)
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(job(&mut qmp)["io-status"], "nospace");
    std::fs::remove_file(&trigger).expect("space again");
    qmp.execute_ok("block-job-resume", json!({"device": "s"}));
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    assert_eq!(job(&mut qmp)["io-status"], "ok");
    qmp.execute_ok("block-job-cancel", json!({"device": "s"}));
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");

    // ignore: retried until the target takes it.
    qmp.events.clear();
    std::fs::write(&trigger, b"").expect("the trigger");
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "i", "device": "src", "target": "dst", "sync": "full", "on-target-error": "ignore"}),
    );
    let err = wait_event(&mut qmp, "BLOCK_JOB_ERROR");
    assert_eq!(err["data"]["action"], "ignore");
    assert_ne!(job(&mut qmp)["status"], "paused");
    std::fs::remove_file(&trigger).expect("space again");
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    qmp.execute_ok("block-job-cancel", json!({"device": "i"}));
    wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    quit(&mut qmp, &mut daemon);
    let target = format!("nbd+unix:///?socket={}", sock.display());
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            path_str(&src),
            &target,
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
}

/// `replaces`: the mirror of a filter's output replaces the node under
/// the filter; the export keeps its filter, which now reads the target.
#[test]
fn replaces_swaps_the_node_under_a_filter() {
    let (dir, src, dst) = empty_pair(16 << 20);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 8 0 2M", path_str(&src)],
    );
    let args = vec![
        "--object".to_string(),
        "throttle-group,id=tg".into(),
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            src.display()
        ),
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=dst,file.driver=file,file.filename={}",
            dst.display()
        ),
        "--blockdev".into(),
        "throttle,node-name=thr,throttle-group=tg,file=src".into(),
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            dir.path().join("nbd.sock").display()
        ),
        "--export".into(),
        "type=nbd,id=e0,node-name=thr,name=disk,writable=on".into(),
    ];
    let mut daemon = serve(dir.path(), &args);
    let mut qmp = daemon.qmp();
    let bad = qmp
        .execute(
            "blockdev-mirror",
            json!({"device": "thr", "target": "dst", "sync": "full", "replaces": "nosuch"}),
        )
        .unwrap_err();
    assert_eq!(bad.desc, "Node name 'nosuch' not found");
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "thr", "target": "dst", "sync": "full", "replaces": "src"}),
    );
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    qmp.execute_ok("block-job-complete", json!({"device": "m"}));
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    let exports = qmp.execute_ok("query-block-exports", json!({}));
    assert_eq!(
        exports[0]["node-name"], "thr",
        "the export keeps its filter"
    );
    guest(dir.path(), &["write -P 9 4M 64k".into()]);
    quit(&mut qmp, &mut daemon);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 8 0 2M",
            "-c",
            "read -P 9 4M 64k",
            path_str(&dst),
        ],
    );
    let out = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0 4M 64k", path_str(&src)],
    );
    assert!(
        !out.contains("verification failed"),
        "the write after the pivot reached the source: {out}"
    );
}

/// Every sync mode into a target on another daemon, over NBD (the live
/// migration's shape): the target node is `driver=nbd` on the source
/// daemon, the image is a qcow2 overlay exported by a second `bitmirror
/// serve`. A guest writes during each job; after complete the target's
/// image equals the source.
#[test]
fn every_sync_mode_into_an_nbd_target_on_another_daemon() {
    for sync in ["full", "top", "none", "bitmap"] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (src, dst) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"));
        qemu_img_create_qcow2(path_str(&src), 32 << 20, "");
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 8M",
                "-c",
                "write -P 2 16M 4M",
                path_str(&src),
            ],
        );
        // The destination starts as a copy for the modes that copy only
        // part of the disk (as after a full backup), empty otherwise.
        if sync == "full" {
            qemu_img_create_qcow2(path_str(&dst), 32 << 20, "");
        } else {
            std::fs::copy(&src, &dst).expect("the backup");
        }
        let (mut dest, dest_sock) = destination(dir.path(), &dst, "d");
        let args = vec![
            "--blockdev".to_string(),
            format!(
                "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
                src.display()
            ),
            "--blockdev".into(),
            format!(
                "driver=nbd,node-name=dst,server.type=unix,server.path={},export=d",
                dest_sock.display()
            ),
            "--nbd-server".into(),
            format!(
                "addr.type=unix,addr.path={}",
                dir.path().join("nbd.sock").display()
            ),
            "--export".into(),
            "type=nbd,id=e0,node-name=src,name=disk,writable=on".into(),
        ];
        let mut daemon = serve(dir.path(), &args);
        let mut qmp = daemon.qmp();
        let mut mirror = json!({"job-id": "m", "device": "src", "target": "dst", "sync": sync});
        if sync == "bitmap" {
            qmp.execute_ok(
                "block-dirty-bitmap-add",
                json!({"node": "src", "name": "b"}),
            );
            guest(dir.path(), &["write -P 3 2M 1M".into()]);
            mirror["bitmap"] = json!("b");
        }
        qmp.execute_ok("blockdev-mirror", mirror);
        guest(
            dir.path(),
            &["write -P 4 20M 512k".into(), "write -P 5 30M 64k".into()],
        );
        wait_event(&mut qmp, "BLOCK_JOB_READY");
        guest(dir.path(), &["write -P 6 9M 64k".into()]);
        qmp.execute_ok("block-job-complete", json!({"device": "m"}));
        let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
        assert!(done["data"].get("error").is_none(), "{sync}: {done}");
        qmp.execute_ok("quit", json!({}));
        assert_eq!(daemon.wait_exit(), Some(0), "{sync}");
        dest.qmp().execute_ok("quit", json!({}));
        assert_eq!(dest.wait_exit(), Some(0), "{sync}");
        run("qemu-img", &["check", path_str(&dst)]);
        let cmp = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                path_str(&src),
                path_str(&dst),
            ],
        );
        assert!(cmp.contains("Images are identical"), "{sync}: {cmp}");
    }
}

/// `auto-write-blocking` (our extension): a background mirror whose
/// backlog stops shrinking switches itself to write-blocking, so the
/// cut-over stays bounded under a guest faster than the copy.
#[test]
fn auto_write_blocking_switches_when_the_backlog_stalls() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (src, dst) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"));
    qemu_img_create_qcow2(path_str(&src), 64 << 20, "");
    std::fs::copy(&src, &dst).expect("the backup");
    let mut daemon = serve(dir.path(), &setup(dir.path(), &src, &dst));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "blockdev-mirror",
        // 64 KiB/s: slower than the guest below even on a loaded machine
        // (each of its rounds writes 2 MiB and flushes, which can take
        // seconds when the disk is busy).
        json!({"job-id": "m", "device": "src", "target": "dst", "sync": "none",
               "speed": 1 << 16, "auto-write-blocking": true}),
    );
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    let synced =
        |qmp: &mut Qmp| qmp.execute_ok("query-block-jobs", json!({}))[0]["actively-synced"].clone();
    assert_eq!(synced(&mut qmp), false);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = busy_guest(dir.path(), stop.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while synced(&mut qmp) != true {
        assert!(
            std::time::Instant::now() < deadline,
            "never switched to write-blocking"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().expect("the writer");
    qmp.execute_ok("block-job-set-speed", json!({"device": "m", "speed": 0}));
    complete_and_quit(&mut qmp, &mut daemon, "m");
    assert_identical(&src, &dst);
}

/// `drive-mirror`: into a qcow2 it creates (`absolute-paths`), and into
/// an existing NBD export named the way Proxmox names it
/// (`nbd:unix:PATH:exportname=NAME`, `mode=existing`); a target the job
/// made and did not pivot to leaves the graph with the job.
#[test]
fn drive_mirror_creates_or_reuses_its_target() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let src = dir.path().join("src.qcow2");
    qemu_img_create_qcow2(path_str(&src), 16 << 20, "");
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 4M", path_str(&src)],
    );
    let remote = dir.path().join("remote.qcow2");
    qemu_img_create_qcow2(path_str(&remote), 16 << 20, "");
    let (mut dest, dest_sock) = destination(dir.path(), &remote, "drive-scsi0");
    let args = vec![
        "--blockdev".to_string(),
        format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            src.display()
        ),
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            dir.path().join("nbd.sock").display()
        ),
        "--export".into(),
        "type=nbd,id=e0,node-name=src,name=disk,writable=on".into(),
    ];
    let mut daemon = serve(dir.path(), &args);
    let mut qmp = daemon.qmp();
    let names = |qmp: &mut Qmp| -> Vec<String> {
        qmp.execute_ok("query-named-block-nodes", json!({"flat": true}))
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };

    // 1. A new local qcow2, cancelled after READY: a point-in-time copy
    //    stays on disk, the node goes.
    let copy = dir.path().join("copy.qcow2");
    qmp.execute_ok(
        "drive-mirror",
        json!({"job-id": "c", "device": "src", "target": path_str(&copy), "format": "qcow2",
               "node-name": "copy", "sync": "full"}),
    );
    assert!(names(&mut qmp).contains(&"copy".to_string()));
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    qmp.execute_ok("block-job-cancel", json!({"device": "c"}));
    wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while names(&mut qmp).contains(&"copy".to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the target node stayed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    run("qemu-img", &["check", path_str(&copy)]);
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            path_str(&src),
            path_str(&copy),
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");

    // 2. An existing NBD export, Proxmox-style, completed: the export
    //    moves to the NBD node.
    let target = format!("nbd:unix:{}:exportname=drive-scsi0", dest_sock.display());
    qmp.execute_ok(
        "drive-mirror",
        json!({"job-id": "m", "device": "src", "target": target, "format": "raw",
               "mode": "existing", "sync": "full"}),
    );
    guest(dir.path(), &["write -P 2 8M 64k".into()]);
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    qmp.execute_ok("block-job-complete", json!({"device": "m"}));
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    let exports = qmp.execute_ok("query-block-exports", json!({}));
    assert!(
        exports[0]["node-name"].as_str().is_some_and(|n| n != "src"),
        "{exports}"
    );
    quit(&mut qmp, &mut daemon);
    dest.qmp().execute_ok("quit", json!({}));
    assert_eq!(dest.wait_exit(), Some(0));
    assert_identical(&src, &remote);
}

#[test]
fn without_auto_finalize_the_pivot_waits_for_finalize_and_holds_the_guest() {
    let (dir, src, dst) = empty_pair(16 << 20);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 4M", path_str(&src)],
    );
    let mut daemon = serve(dir.path(), &setup(dir.path(), &src, &dst));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "dst", "sync": "full",
               "auto-finalize": false}),
    );
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    qmp.execute_ok("block-job-complete", json!({"device": "m0"}));
    let pending = wait_event(&mut qmp, "BLOCK_JOB_PENDING");
    assert_eq!(pending["data"]["id"], "m0", "{pending}");
    // Pending: not pivoted yet, and the source drained as in QEMU, so a
    // guest write waits.
    let exports = qmp.execute_ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["node-name"], "src", "{exports}");
    let uri = format!(
        "nbd+unix:///disk?socket={}",
        dir.path().join("nbd.sock").display()
    );
    let mut writer = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 55 0 64k", &uri])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io runs");
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(
        writer.try_wait().expect("a child").is_none(),
        "a guest write completed while the mirror was pending"
    );
    qmp.execute_ok("job-finalize", json!({"id": "m0"}));
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert!(writer.wait().expect("qemu-io ends").success());
    let exports = qmp.execute_ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["node-name"], "dst", "{exports}");
    quit(&mut qmp, &mut daemon);
    // The held write went to the target only.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 55 0 64k",
            "-c",
            "read -P 1 64k 4032k",
            path_str(&dst),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let out = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 1 0 4M", path_str(&src)],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// Write-blocking mode puts a guest write's copy close to the front: the
/// background keeps one chunk (1 MiB) in flight instead of `buf-size`
/// (16 MiB), so a guest write's copy queues behind at most that. The
/// target is throttled to 4 MiB/s: behind 16 MiB a guest write would take
/// 4 s, behind 1 MiB about a quarter of a second.
#[test]
fn write_blocking_puts_guest_writes_ahead_of_the_background_copy() {
    let (dir, src, dst) = empty_pair(64 << 20);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 3 0 64M", path_str(&src)],
    );
    let mut args = setup(dir.path(), &src, &dst);
    args.extend([
        "--object".into(),
        "throttle-group,id=tg,limits.bps-write=4194304".into(),
        "--blockdev".into(),
        "throttle,node-name=slow,throttle-group=tg,file=dst".into(),
    ]);
    let mut daemon = serve(dir.path(), &args);
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "slow", "sync": "full",
               "copy-mode": "write-blocking"}),
    );
    // Let the background fill its pipeline first.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..4u64 {
        let started = std::time::Instant::now();
        guest(
            dir.path(),
            &[format!("write -P {} {} 64k", 10 + i, (40 + i * 5) << 20)],
        );
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < std::time::Duration::from_millis(2000),
        "a guest write took {slowest:?} behind the background copy"
    );
    qmp.execute_ok("block-job-set-speed", json!({"device": "m", "speed": 0}));
    qmp.execute_ok("block-job-cancel", json!({"device": "m", "force": true}));
    wait_event(&mut qmp, "BLOCK_JOB_CANCELLED");
    quit(&mut qmp, &mut daemon);
    // The guest's writes reached the target before they completed.
    for i in 0..4u64 {
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("read -P {} {} 64k", 10 + i, (40 + i * 5) << 20),
                path_str(&dst),
            ],
        );
    }
}

/// `(name, nice, CPU ticks)` of each thread of process `pid`.
fn threads(pid: u32) -> Vec<(String, i64, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    let mut found = Vec::new();
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // After the `(comm)`: state is field 3, utime 14, stime 15, nice 19.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("", |(_, n)| n).to_owned();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        found.push((name, num(19), (num(14) + num(15)) as u64));
    }
    found
}

/// A job's copying runs on the background I/O threads, niced 10 below the
/// daemon's other threads (`block::class`), so a guest's requests go
/// first; the copy is still whole.
#[test]
fn a_mirror_copies_on_niced_background_threads() {
    let (dir, src, dst) = empty_pair(256 << 20);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 5 0 256M", path_str(&src)],
    );
    let mut daemon = serve(dir.path(), &setup(dir.path(), &src, &dst));
    let mut qmp = daemon.qmp();
    let before = threads(daemon.pid());
    assert!(
        !before.iter().any(|t| t.0.starts_with("bitmirror-bg")),
        "background threads before any job: {before:?}"
    );
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full"}),
    );
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    let all = threads(daemon.pid());
    let main_nice = all.first().expect("the main thread").1;
    let background: Vec<_> = all
        .iter()
        .filter(|t| t.0.starts_with("bitmirror-bg"))
        .collect();
    assert!(!background.is_empty(), "no background threads: {all:?}");
    for t in &background {
        assert_eq!(t.1, (main_nice + 10).min(19), "{t:?}");
    }
    let ticks: u64 = background.iter().map(|t| t.2).sum();
    assert!(ticks > 0, "the background threads did no work: {all:?}");
    complete_and_quit(&mut qmp, &mut daemon, "m");
    assert_identical(&src, &dst);
}
