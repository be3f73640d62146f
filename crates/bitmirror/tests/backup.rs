//! Backup jobs through `bitmirror serve`, with a guest writing through the
//! source's NBD export while they run: each backup equals the source as it
//! was when the backup started (`qemu-img compare` against a copy taken
//! then), and the bitmap moves as QEMU's successor protocol says.

mod common;

use std::path::{Path, PathBuf};

use common::{
    allocated_in_top, bitmirror, destination, guest, guest_snapshot, nbd_server, path_str, quit,
    serve, wait_event,
};
use serde_json::{Value, json};
use testkit::{Qmp, StorageDaemon, qemu_img_create_qcow2, qemu_io_writes, run};

const MIB: u64 = 1 << 20;

/// A qcow2 source node `src` exported writable as `disk`.
fn source_args(dir: &Path, src: &Path) -> Vec<String> {
    let mut args = vec![
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            src.display()
        ),
    ];
    args.extend(nbd_server(dir));
    args.extend([
        "--export".into(),
        "type=nbd,id=e0,node-name=src,name=disk,writable=on".into(),
    ]);
    args
}

/// The source as the guest sees it now, copied to `dir/name` (raw).
fn snapshot(dir: &Path, name: &str) -> PathBuf {
    guest_snapshot(dir, "disk", name)
}

/// `qemu-img compare` finds the raw `expected` and the qcow2 `image`
/// (through its backing chain) identical.
fn assert_same(expected: &Path, image: &Path) {
    common::assert_same(path_str(expected), "raw", path_str(image), "qcow2");
}

/// The dirty-bitmap entry `name` of node `node`.
fn bitmap(qmp: &mut Qmp, node: &str, name: &str) -> Value {
    let nodes = qmp.execute_ok("query-named-block-nodes", json!({}));
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {name} on {node}: {nodes}"))
}

/// Starts a backup, lets the guest write `writes` while it runs (slowed
/// down so the writes meet clusters not copied yet), then lets it finish;
/// returns `BLOCK_JOB_COMPLETED`.
fn backup_with_writer(qmp: &mut Qmp, dir: &Path, args: Value, writes: &[String]) -> Value {
    let mut a = json!({"speed": 2 * MIB});
    if let (Some(a), Some(extra)) = (a.as_object_mut(), args.as_object()) {
        a.extend(extra.clone());
    }
    qmp.execute_ok("blockdev-backup", a);
    guest(dir, writes);
    qmp.execute_ok(
        "block-job-set-speed",
        json!({"device": args["job-id"], "speed": 0}),
    );
    wait_event(qmp, "BLOCK_JOB_COMPLETED")
}

#[test]
fn incremental_chain_keeps_each_point_in_time() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let src = dir.join("src.qcow2");
    qemu_img_create_qcow2(path_str(&src), 32 * MIB, "");
    qemu_io_writes(
        path_str(&src),
        "qcow2",
        &[(0, 24 * MIB, Some(1)), (28 * MIB, 2 * MIB, Some(2))],
    );
    let mut daemon = serve(dir, &source_args(dir, &src));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0", "granularity": 65536}),
    );

    // Level 0: a full backup that also resets the bitmap (sync=full with
    // on-success), so the bitmap counts what changed since.
    let full = dir.join("full.qcow2");
    qemu_img_create_qcow2(path_str(&full), 32 * MIB, "");
    qmp.execute_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t0",
               "file": {"driver": "file", "filename": path_str(&full)}}),
    );
    let snap0 = snapshot(dir, "snap0.raw");
    let done = backup_with_writer(
        &mut qmp,
        dir,
        json!({"job-id": "full0", "device": "src", "target": "t0", "sync": "full",
               "bitmap": "b0", "bitmap-mode": "on-success"}),
        &[
            "write -P 33 0 1M".into(),
            "write -P 34 20M 2M".into(),
            "write -z 8M 1M".into(),
            "write -P 35 29M 64k".into(),
        ],
    );
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"], "{done}");
    let b0 = bitmap(&mut qmp, "src", "b0");
    assert_eq!(b0["count"], 4 * MIB + 64 * 1024, "{b0}");
    assert_eq!(b0["busy"], false, "{b0}");
    qmp.execute_ok("blockdev-del", json!({"node-name": "t0"}));
    assert_same(&snap0, &full);

    // Levels 1 and 2: incremental, each into an overlay of the level below.
    let mut below = full;
    for level in 1..=2u64 {
        guest(
            dir,
            &[format!("write -P {} {}M 512k", 40 + level, 4 * level)],
        );
        let image = dir.join(format!("inc{level}.qcow2"));
        qemu_img_create_qcow2(
            path_str(&image),
            32 * MIB,
            &format!("backing_file={},backing_fmt=qcow2", below.display()),
        );
        let node = format!("t{level}");
        qmp.execute_ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node,
                   "file": {"driver": "file", "filename": path_str(&image)}}),
        );
        let dirty = bitmap(&mut qmp, "src", "b0")["count"].as_u64().unwrap_or(0);
        let snap = snapshot(dir, &format!("snap{level}.raw"));
        let done = backup_with_writer(
            &mut qmp,
            dir,
            json!({"job-id": format!("inc{level}"), "device": "src", "target": node,
                   "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "on-success"}),
            &[
                format!("write -P {} 24M 1M", 50 + level),
                // Dirty before the job and written again during it.
                format!("write -P {} {}M 64k", 60 + level, 4 * level),
            ],
        );
        assert!(done["data"].get("error").is_none(), "{done}");
        assert_eq!(done["data"]["len"], dirty, "{done}");
        // Only the writes made during the backup are left for the next one.
        let b0 = bitmap(&mut qmp, "src", "b0");
        assert_eq!(b0["count"], MIB + 64 * 1024, "{b0}");
        qmp.execute_ok("blockdev-del", json!({"node-name": node}));
        assert_same(&snap, &image);
        assert!(
            allocated_in_top(&image) <= dirty,
            "level {level} allocated more than the bitmap's {dirty} bytes"
        );
        run("qemu-img", &["check", path_str(&image)]);
        below = image;
    }
    quit(&mut qmp, &mut daemon);
}

/// A second daemon exporting `image` as `backup`, and node `tn` of ours
/// that reaches it over NBD.
fn nbd_target(qmp: &mut Qmp, dir: &Path, image: &Path) -> StorageDaemon {
    let (dest, sock) = destination(dir, image, "backup");
    qmp.execute_ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "tn", "export": "backup",
               "server": {"type": "unix", "path": path_str(&sock)}}),
    );
    dest
}

/// Kills `daemon` with SIGKILL and reaps it.
fn kill9(daemon: &mut StorageDaemon) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &daemon.pid().to_string()])
        .status();
    let _ = daemon.wait_exit();
}

/// A backup into an NBD export of a second daemon that is killed
/// mid-job: the job fails, and the bitmap keeps what the mode says.
fn target_dies(mode: &str) -> (Value, Value, u64) {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (src, tgt) = (dir.join("src.qcow2"), dir.join("tgt.qcow2"));
    for image in [&src, &tgt] {
        qemu_img_create_qcow2(path_str(image), 32 * MIB, "");
        qemu_io_writes(path_str(image), "qcow2", &[(0, 16 * MIB, Some(1))]);
    }
    let mut daemon = serve(dir, &source_args(dir, &src));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0", "granularity": 65536}),
    );
    guest(dir, &["write -P 7 0 3M".into()]);
    let mut dest = nbd_target(&mut qmp, dir, &tgt);
    // Slow: one 1 MiB copy goes at once, the next after a second.
    qmp.execute_ok(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tn", "sync": "bitmap",
               "bitmap": "b0", "bitmap-mode": mode, "speed": MIB}),
    );
    guest(dir, &["write -P 8 16M 1M".into()]);
    kill9(&mut dest);
    let error = wait_event(&mut qmp, "BLOCK_JOB_ERROR");
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    let b0 = bitmap(&mut qmp, "src", "b0");
    let copied = done["data"]["offset"].as_u64().unwrap_or(u64::MAX);
    quit(&mut qmp, &mut daemon);
    assert_eq!(error["data"]["operation"], "write", "{error}");
    assert_eq!(error["data"]["action"], "report", "{error}");
    assert!(done["data"]["error"].is_string(), "{done}");
    (done, b0, copied)
}

#[test]
fn a_dying_target_fails_the_job_and_the_bitmap_keeps_old_and_new() {
    // on-success: the old bits and the new writes.
    let (_, b0, _) = target_dies("on-success");
    assert_eq!(b0["count"], 4 * MIB, "{b0}");
    assert_eq!(b0["busy"], false, "{b0}");
    assert_eq!(b0["recording"], true, "{b0}");
    // always: what was not copied, and the new writes.
    let (done, b0, copied) = target_dies("always");
    assert!((MIB..3 * MIB).contains(&copied), "{done}");
    assert_eq!(b0["count"], 4 * MIB - copied, "{b0} {done}");
}

#[test]
fn always_mode_lets_a_second_backup_finish_the_image() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (src, tgt) = (dir.join("src.qcow2"), dir.join("tgt.qcow2"));
    for image in [&src, &tgt] {
        qemu_img_create_qcow2(path_str(image), 32 * MIB, "");
        qemu_io_writes(path_str(image), "qcow2", &[(0, 16 * MIB, Some(1))]);
    }
    let mut daemon = serve(dir, &source_args(dir, &src));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0", "granularity": 65536}),
    );
    guest(dir, &["write -P 7 0 6M".into(), "write -z 10M 1M".into()]);
    // First attempt: the target's server dies after the first copies.
    let mut dest = nbd_target(&mut qmp, dir, &tgt);
    qmp.execute_ok(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tn", "sync": "bitmap",
               "bitmap": "b0", "bitmap-mode": "always", "speed": MIB}),
    );
    guest(dir, &["write -P 9 20M 1M".into()]);
    kill9(&mut dest);
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"]["error"].is_string(), "{done}");
    qmp.execute_ok("blockdev-del", json!({"node-name": "tn"}));
    std::fs::remove_dir_all(dir.join("dest")).expect("the old destination's directory");

    // Second attempt, into the same image: copies only what is left.
    let mut dest = nbd_target(&mut qmp, dir, &tgt);
    let left = bitmap(&mut qmp, "src", "b0")["count"].as_u64().unwrap_or(0);
    let snap = snapshot(dir, "snap.raw");
    qmp.execute_ok(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tn", "sync": "bitmap",
               "bitmap": "b0", "bitmap-mode": "always"}),
    );
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["len"], left, "{done}");
    assert_eq!(bitmap(&mut qmp, "src", "b0")["count"], 0);
    quit(&mut qmp, &mut daemon);
    dest.qmp().execute_ok("quit", json!({}));
    assert_eq!(dest.wait_exit(), Some(0));
    assert_same(&snap, &tgt);
}

#[test]
fn a_bitmap_added_with_a_full_backup_misses_no_write() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let src = dir.join("src.qcow2");
    qemu_img_create_qcow2(path_str(&src), 16 * MIB, "");
    qemu_io_writes(path_str(&src), "qcow2", &[(0, 16 * MIB, Some(1))]);
    let mut daemon = serve(dir, &source_args(dir, &src));
    let mut qmp = daemon.qmp();
    let full = dir.join("full.qcow2");
    qemu_img_create_qcow2(path_str(&full), 16 * MIB, "");
    qmp.execute_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t0",
               "file": {"driver": "file", "filename": path_str(&full)}}),
    );
    // A guest writes all the time the transaction runs.
    let uri = format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display());
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for i in 0..600u64 {
        let offset = (i * 7919 * 4096) % (16 * MIB);
        args.extend(["-c".into(), format!("write -P {} {offset} 4k", 2 + i % 200)]);
    }
    args.push(uri);
    let mut writer = std::process::Command::new("qemu-io")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io runs");
    std::thread::sleep(std::time::Duration::from_millis(100));
    qmp.execute_ok(
        "transaction",
        // The backup first, then the bitmap: the transaction holds the
        // source's writes, so none falls between the two.
        json!({"actions": [
            {"type": "blockdev-backup",
             "data": {"job-id": "full0", "device": "src", "target": "t0", "sync": "full"}},
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "b0", "granularity": 65536}}
        ]}),
    );
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert!(writer.wait().expect("qemu-io ends").success());
    qmp.execute_ok("blockdev-del", json!({"node-name": "t0"}));
    // What the bitmap says changed, onto the full backup, is the source.
    let inc = dir.join("inc.qcow2");
    qemu_img_create_qcow2(
        path_str(&inc),
        16 * MIB,
        &format!("backing_file={},backing_fmt=qcow2", full.display()),
    );
    qmp.execute_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t1",
               "file": {"driver": "file", "filename": path_str(&inc)}}),
    );
    let snap = snapshot(dir, "snap.raw");
    qmp.execute_ok(
        "blockdev-backup",
        json!({"job-id": "inc", "device": "src", "target": "t1", "sync": "incremental",
               "bitmap": "b0"}),
    );
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    quit(&mut qmp, &mut daemon);
    assert_same(&snap, &inc);
}

#[test]
fn the_backup_verb_makes_a_chain_that_verify_and_qemu_accept() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let src = dir.join("src.qcow2");
    qemu_img_create_qcow2(path_str(&src), 16 * MIB, "");
    qemu_io_writes(path_str(&src), "qcow2", &[(0, 8 * MIB, Some(1))]);
    let mut daemon = serve(dir, &source_args(dir, &src));
    let qmp_sock = daemon.qmp_path().to_path_buf();
    let chain = dir.join("chain");
    let backup = || {
        bitmirror(&[
            "backup",
            "--qmp",
            path_str(&qmp_sock),
            "--node",
            "src",
            "--dir",
            path_str(&chain),
        ])
    };
    let (code, out) = backup();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("full backup of 'src' (level 0)"), "{out}");
    guest(dir, &["write -P 5 1M 1M".into(), "write -z 4M 64k".into()]);
    let (code, out) = backup();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("incremental backup of 'src' (level 1): copied 1.1 MiB"),
        "{out}"
    );
    let top = chain.join("src.1.qcow2");
    let info = run("qemu-img", &["info", path_str(&top)]);
    assert!(info.contains("backing file: src.0.qcow2"), "{info}");
    run("qemu-img", &["check", path_str(&top)]);
    // The top equals the source, by our verify and by qemu-img.
    let snap = snapshot(dir, "snap.raw");
    assert_same(&snap, &top);
    let (code, out) = bitmirror(&["verify", path_str(&top), path_str(&snap)]);
    assert_eq!(code, Some(0), "{out}");
    let uri = format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display());
    let (code, out) = bitmirror(&["verify", path_str(&top), &uri]);
    assert_eq!(code, Some(0), "{out}");
    // A write not backed up yet: verify says where.
    guest(dir, &["write -P 6 12M 4k".into()]);
    let (code, out) = bitmirror(&["verify", path_str(&top), &uri]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("differ at byte {}", 12 * MIB)),
        "{out}"
    );
    // Clear errors.
    let (code, out) = bitmirror(&[
        "backup",
        "--qmp",
        path_str(&qmp_sock),
        "--node",
        "nosuch",
        "--dir",
        path_str(&chain),
    ]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("the daemon has no node 'nosuch'"), "{out}");
    let mut qmp = daemon.qmp();
    quit(&mut qmp, &mut daemon);
}

#[test]
fn a_failed_copy_before_write_fails_the_guest_write() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (src, tgt) = (dir.join("src.qcow2"), dir.join("tgt.qcow2"));
    qemu_img_create_qcow2(path_str(&src), 16 * MIB, "");
    qemu_io_writes(path_str(&src), "qcow2", &[(0, 16 * MIB, Some(1))]);
    qemu_img_create_qcow2(path_str(&tgt), 16 * MIB, "");
    let mut daemon = serve(dir, &source_args(dir, &src));
    let mut qmp = daemon.qmp();
    let mut dest = nbd_target(&mut qmp, dir, &tgt);
    // At 1 byte/s only the first copy goes: the rest waits.
    qmp.execute_ok(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tn", "sync": "full", "speed": 1}),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    kill9(&mut dest);
    // A guest write to a cluster not copied yet: its old data cannot be
    // saved, so the write fails (QEMU's break-guest-write) …
    let uri = format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display());
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 9 8M 64k", &uri])
        .output()
        .expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    // … and the source keeps its data; the job is still there to cancel.
    let jobs = qmp.execute_ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["device"], "b", "{jobs}");
    qmp.execute_ok("block-job-cancel", json!({"device": "b"}));
    wait_event(&mut qmp, "BLOCK_JOB_CANCELLED");
    let out = run("qemu-io", &["-f", "raw", "-c", "read -P 1 8M 64k", &uri]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    quit(&mut qmp, &mut daemon);
}

#[test]
fn differential_backups_with_never_keep_everything_since_the_full() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let src = dir.join("src.qcow2");
    qemu_img_create_qcow2(path_str(&src), 16 * MIB, "");
    qemu_io_writes(path_str(&src), "qcow2", &[(0, 16 * MIB, Some(1))]);
    let mut daemon = serve(dir, &source_args(dir, &src));
    let mut qmp = daemon.qmp();
    let full = dir.join("full.qcow2");
    qemu_img_create_qcow2(path_str(&full), 16 * MIB, "");
    qmp.execute_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t0",
               "file": {"driver": "file", "filename": path_str(&full)}}),
    );
    qmp.execute_ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "b0", "granularity": 65536}},
            {"type": "blockdev-backup",
             "data": {"job-id": "full", "device": "src", "target": "t0", "sync": "full"}}
        ]}),
    );
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    qmp.execute_ok("blockdev-del", json!({"node-name": "t0"}));
    // Two differential backups, each onto the full one: the second holds
    // the first's changes too, and the bitmap keeps growing.
    let mut expected_dirty = 0;
    for (n, write) in [(1, "write -P 21 1M 1M"), (2, "write -P 22 9M 512k")] {
        guest(dir, &[write.into()]);
        expected_dirty += if n == 1 { MIB } else { 512 * 1024 };
        let image = dir.join(format!("diff{n}.qcow2"));
        qemu_img_create_qcow2(
            path_str(&image),
            16 * MIB,
            &format!("backing_file={},backing_fmt=qcow2", full.display()),
        );
        qmp.execute_ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "td",
                   "file": {"driver": "file", "filename": path_str(&image)}}),
        );
        let snap = snapshot(dir, &format!("snap{n}.raw"));
        qmp.execute_ok(
            "blockdev-backup",
            json!({"job-id": "diff", "device": "src", "target": "td", "sync": "bitmap",
                   "bitmap": "b0", "bitmap-mode": "never"}),
        );
        let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
        assert!(done["data"].get("error").is_none(), "{done}");
        assert_eq!(done["data"]["len"], expected_dirty, "{done}");
        assert_eq!(bitmap(&mut qmp, "src", "b0")["count"], expected_dirty);
        qmp.execute_ok("blockdev-del", json!({"node-name": "td"}));
        assert_same(&snap, &image);
    }
    quit(&mut qmp, &mut daemon);
}

/// `compress=true` into a qcow2 target that `drive-backup` creates, with a
/// guest writing meanwhile: QEMU reads the point in time back, `qemu-img
/// check` finds the packed clusters' refcounts exact, clusters that deflate
/// are stored compressed and noise (which does not) as plain data, and the
/// file is smaller than the data it holds.
#[test]
fn compressed_backups_are_qcow2_that_qemu_reads() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; (16 * MIB) as usize];
    for (i, b) in data[..(8 * MIB) as usize].iter_mut().enumerate() {
        // Text-like: deflates well.
        *b = b"bitmirror keeps dirty bitmaps; "[i % 31] ^ (i / 65536) as u8;
    }
    // Noise (xorshift): does not deflate.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in &mut data[(8 * MIB) as usize..(9 * MIB) as usize] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&raw, &data).expect("the source's data is written");
    let src = dir.join("src.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            path_str(&raw),
            path_str(&src),
        ],
    );
    let mut daemon = serve(dir, &source_args(dir, &src));
    let mut qmp = daemon.qmp();
    let target = dir.join("z.qcow2");
    let snap = snapshot(dir, "snap.raw");
    qmp.execute_ok(
        "drive-backup",
        json!({"job-id": "z", "device": "src", "target": path_str(&target),
               "format": "qcow2", "sync": "full", "compress": true, "speed": 2 * MIB}),
    );
    guest(
        dir,
        &[
            "write -P 7 1M 1M".into(),
            "write -P 8 8M 512k".into(),
            "write -z 4M 64k".into(),
        ],
    );
    qmp.execute_ok("block-job-set-speed", json!({"device": "z", "speed": 0}));
    let done = wait_event(&mut qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    quit(&mut qmp, &mut daemon);
    run("qemu-img", &["check", path_str(&target)]);
    assert_same(&snap, &target);
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", path_str(&target)],
    );
    let map: Value = serde_json::from_str(&out).expect("qemu-img map's JSON");
    let sum = |compressed: bool| -> u64 {
        map.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["data"] == true && e["compressed"] == compressed)
            .map(|e| e["length"].as_u64().unwrap_or(0))
            .sum()
    };
    // 8 MiB of text, less the 64 KiB zeroed after the backup started (the
    // backup holds the old data): compressed; the 1 MiB of noise: plain.
    assert_eq!(sum(true), 8 * MIB, "{out}");
    assert_eq!(sum(false), MIB, "{out}");
    let size = std::fs::metadata(&target).expect("the target exists").len();
    assert!(size < 4 * MIB, "{size} bytes for 9 MiB of data");
}
