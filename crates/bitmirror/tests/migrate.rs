//! Live storage migration. `block-dirty-bitmap-pull` copies a bitmap from
//! any NBD server that publishes it — `qemu-nbd -B`, qemu-storage-daemon's
//! export, another bitmirror — and the copy has the SHA-256 that
//! qemu-storage-daemon computes for the original. `bitmirror migrate` runs
//! the founding workflow (DESIGN.md §1) between two daemons with a guest
//! writing, and a migration that fails leaves the source in charge.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Peer, allocated_in_top, bitmirror, guest, path_str, quit, serve, wait_event};
use serde_json::{Value, json};
use testkit::{Qmp, StorageDaemon, qemu_img_create_qcow2, require_tool, run};

const MIB: u64 = 1 << 20;

/// `qemu-nbd -r -B bitmap` serving `image` on `sock`.
fn qemu_nbd_with_bitmap(image: &Path, sock: &Path, bitmap: &str) -> Peer {
    Peer::start(
        Command::new(require_tool("qemu-nbd", "qemu-utils"))
            .args(["-r", "-f", "qcow2", "-t", "-B", bitmap, "-k"])
            .args([path_str(sock), path_str(image)]),
        || sock.exists(),
    )
}

fn unix(sock: &Path) -> Value {
    json!({"type": "unix", "path": path_str(sock)})
}

fn sha256(qmp: &mut Qmp, node: &str, name: &str) -> String {
    let r = qmp.execute_ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": node, "name": name}),
    );
    r["sha256"].as_str().expect("a sha256").to_owned()
}

/// A 16 MiB qcow2 image with a persistent bitmap `b0` (64 KiB) that QEMU
/// itself filled, by writing through `qemu-io`.
fn image_with_qemu_bitmap(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("src.qcow2");
    qemu_img_create_qcow2(path_str(&image), 16 * MIB, "");
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "65536", path_str(&image), "b0"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 1M 64k",
            "-c",
            "write -P 2 5M 300k",
            "-c",
            "write -P 3 16380k 4k",
            "-c",
            "write -z 9M 1M",
            path_str(&image),
        ],
    );
    image
}

#[test]
fn bitmaps_pulled_from_qemu_nbd_qsd_and_bitmirror_are_identical() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let image = image_with_qemu_bitmap(dir);

    // qemu-storage-daemon: the reference SHA-256, and an export of b0.
    let qsd_dir = dir.join("qsd");
    std::fs::create_dir(&qsd_dir).expect("a directory");
    let qsd_sock = qsd_dir.join("nbd.sock");
    let mut qsd = StorageDaemon::start(
        &qsd_dir,
        &[
            "--blockdev".into(),
            format!(
                "driver=qcow2,node-name=s,read-only=on,file.driver=file,file.filename={}",
                image.display()
            ),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", qsd_sock.display()),
            "--export".into(),
            "type=nbd,id=e,node-name=s,name=disk,bitmaps.0=b0".into(),
        ],
    );
    let mut qq = qsd.qmp();
    let want = sha256(&mut qq, "s", "b0");

    // qemu-nbd -B b0 on a copy (qemu-nbd and qsd both lock the image).
    let copy = dir.join("copy.qcow2");
    std::fs::copy(&image, &copy).expect("a copy");
    let nbd_sock = dir.join("qemu-nbd.sock");
    let _qemu_nbd = qemu_nbd_with_bitmap(&copy, &nbd_sock, "b0");

    // Our daemon: a node of the same size to pull into, and an export of
    // its own with a bitmap, for the bitmirror-to-bitmirror case.
    let ours_dir = dir.join("ours");
    std::fs::create_dir(&ours_dir).expect("a directory");
    let ours_sock = ours_dir.join("nbd.sock");
    let mut ours = serve(
        &ours_dir,
        &[
            "--blockdev".into(),
            "driver=null-co,node-name=n,size=16777216".into(),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", ours_sock.display()),
        ],
    );
    let mut q = ours.qmp();
    let pull = |q: &mut Qmp, name: &str, sock: &Path, export: &str| {
        q.execute_ok(
            "block-dirty-bitmap-pull",
            json!({"node": "n", "name": name, "server": unix(sock), "export": export,
                   "bitmap": "b0", "granularity": 65536}),
        )
    };
    let from_nbd = pull(&mut q, "from-qemu-nbd", &nbd_sock, "");
    let from_qsd = pull(&mut q, "from-qsd", &qsd_sock, "disk");
    assert_eq!(sha256(&mut q, "n", "from-qemu-nbd"), want);
    assert_eq!(sha256(&mut q, "n", "from-qsd"), want);
    // 64k + 320k (300k rounded to clusters) + 64k + 1M (zeroes written
    // are writes too).
    let expected = (64 + 320 + 64 + 1024) * 1024;
    assert_eq!(from_nbd["count"], expected, "{from_nbd}");
    assert_eq!(from_qsd["count"], expected, "{from_qsd}");

    // bitmirror to bitmirror: publish the pulled copy, pull it again.
    q.execute_ok(
        "block-dirty-bitmap-disable",
        json!({"node": "n", "name": "from-qsd"}),
    );
    q.execute_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "pub", "node-name": "n", "name": "pub",
               "bitmaps": ["from-qsd"]}),
    );
    q.execute_ok(
        "block-dirty-bitmap-pull",
        json!({"node": "n", "name": "again", "server": unix(&ours_sock), "export": "pub",
               "bitmap": "from-qsd", "granularity": 65536, "persistent": false}),
    );
    assert_eq!(sha256(&mut q, "n", "again"), want);

    // Into an existing bitmap, the bits are ORed in.
    q.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "n", "name": "mixed", "granularity": 65536}),
    );
    q.execute_ok(
        "block-dirty-bitmap-merge",
        json!({"node": "n", "target": "mixed", "bitmaps": ["again"]}),
    );
    let r = pull(&mut q, "mixed", &nbd_sock, "");
    assert_eq!(r["count"], expected, "{r}");

    quit(&mut q, &mut ours);
    quit(&mut qq, &mut qsd);
}

#[test]
fn a_failed_pull_says_why_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let image = image_with_qemu_bitmap(dir);
    let nbd_sock = dir.join("qemu-nbd.sock");
    let _qemu_nbd = qemu_nbd_with_bitmap(&image, &nbd_sock, "b0");
    let mut ours = serve(
        dir,
        &[
            "--blockdev".into(),
            "driver=null-co,node-name=n,size=16777216".into(),
            "--blockdev".into(),
            "driver=null-co,node-name=small,size=1048576".into(),
        ],
    );
    let mut q = ours.qmp();
    q.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "n", "name": "kept", "granularity": 4096}),
    );
    let attempts = [
        (
            json!({"node": "n", "name": "x", "server": unix(&nbd_sock), "export": "",
                   "bitmap": "nosuch"}),
            "does not publish bitmap 'nosuch'",
        ),
        (
            json!({"node": "small", "name": "x", "server": unix(&nbd_sock), "export": "",
                   "bitmap": "b0"}),
            "they must be the same size",
        ),
        (
            json!({"node": "n", "name": "x", "server": unix(&dir.join("nobody.sock")),
                   "export": "", "bitmap": "b0"}),
            "Cannot pull bitmap 'b0'",
        ),
        (
            json!({"node": "n", "name": "kept", "server": unix(&nbd_sock), "export": "",
                   "bitmap": "b0", "granularity": 65536}),
            "has granularity 4096, not 65536",
        ),
        (
            json!({"node": "nosuch", "name": "x", "server": unix(&nbd_sock), "export": ""}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            json!({"node": "n", "name": "x", "server": {"type": "unix"}, "export": ""}),
            "Parameter 'server.path' is missing",
        ),
    ];
    for (args, words) in attempts {
        let e = q
            .execute("block-dirty-bitmap-pull", args.clone())
            .expect_err("the pull fails");
        assert!(e.desc.contains(words), "{args}: {e:?}");
    }
    // No bitmap was left behind, the existing one is untouched, and the
    // daemon goes on serving.
    let nodes = q.execute_ok("query-named-block-nodes", json!({}));
    let names: Vec<String> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .map(|b| b["name"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(names, ["kept"], "{nodes}");
    let r = q.execute_ok(
        "block-dirty-bitmap-pull",
        json!({"node": "n", "name": "kept", "server": unix(&nbd_sock), "export": "",
               "bitmap": "b0"}),
    );
    assert_eq!(r["count"], (64 + 320 + 64 + 1024) * 1024, "{r}");
    quit(&mut q, &mut ours);
}

/// Host A: a 64 MiB qcow2 node `src` (48 MiB of data) exported writable as
/// `disk` on `dir/nbd.sock`, with bitmap `B` added atomically with a full
/// backup into `dir/base.qcow2` (the shared image); then the guest writes
/// 16 MiB more, which `B` records.
fn host_a_after_full_backup(dir: &Path) -> StorageDaemon {
    let src = dir.join("src.qcow2");
    qemu_img_create_qcow2(path_str(&src), 64 * MIB, "");
    testkit::qemu_io_writes(path_str(&src), "qcow2", &[(0, 48 * MIB, Some(1))]);
    let base = dir.join("base.qcow2");
    qemu_img_create_qcow2(path_str(&base), 64 * MIB, "");
    let daemon = serve(
        dir,
        &[
            "--blockdev".into(),
            format!(
                "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
                src.display()
            ),
            "--nbd-server".into(),
            format!(
                "addr.type=unix,addr.path={}",
                dir.join("nbd.sock").display()
            ),
            "--export".into(),
            "type=nbd,id=e0,node-name=src,name=disk,writable=on".into(),
        ],
    );
    let mut q = daemon.qmp();
    q.execute_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "r",
               "file": {"driver": "file", "filename": path_str(&base)}}),
    );
    q.execute_ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "B", "granularity": 65536, "persistent": true}},
            {"type": "blockdev-backup",
             "data": {"job-id": "full", "device": "src", "target": "r", "sync": "full"}}]}),
    );
    let done = wait_event(&mut q, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    q.execute_ok("blockdev-del", json!({"node-name": "r"}));
    guest(
        dir,
        &[
            "write -P 2 4M 8M".into(),
            "write -P 3 40M 4M".into(),
            "write -P 4 60M 4M".into(),
        ],
    );
    daemon
}

/// Host B: an empty daemon with an NBD server on `dir/b/nbd.sock`.
fn host_b(dir: &Path) -> (StorageDaemon, std::path::PathBuf) {
    let b = dir.join("b");
    std::fs::create_dir(&b).expect("a directory");
    let sock = b.join("nbd.sock");
    let daemon = serve(
        &b,
        &[
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", sock.display()),
        ],
    );
    (daemon, sock)
}

fn migrate_args(dir: &Path, a: &StorageDaemon, b: &StorageDaemon, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "migrate",
        "--from",
        path_str(a.qmp_path()),
        "--to",
        path_str(b.qmp_path()),
        "--node",
        "src",
        "--dest-image",
        path_str(&dir.join("b").join("src.qcow2")),
        "--dest-nbd",
        &format!("unix:{}", dir.join("b").join("nbd.sock").display()),
        "--source-nbd",
        &format!("unix:{}", dir.join("nbd.sock").display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn the_founding_workflow_migrates_only_what_changed_and_the_bitmap_follows() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let mut a = host_a_after_full_backup(dir);
    let (mut b, b_sock) = host_b(dir);
    let base = dir.join("base.qcow2");
    let args = migrate_args(
        dir,
        &a,
        &b,
        &[
            "--bitmap",
            "B",
            "--base",
            path_str(&base),
            "--speed",
            "4194304",
        ],
    );
    let migration = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bitmirror(&args)
    });
    // The guest goes on writing while the mirror runs (16 MiB at 4 MiB/s).
    std::thread::sleep(Duration::from_millis(300));
    guest(
        dir,
        &["write -P 5 20M 1M".into(), "write -P 6 5M 64k".into()],
    );
    let (code, out) = migration.join().expect("the migration thread");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("migrated 'src' (incremental mirror)"), "{out}");
    assert!(out.contains("bitmap 'B' moved: 17.0 MiB dirty"), "{out}");

    // The bitmap on B is the source's at the cut-over.
    let mut qa = a.qmp();
    let mut qb = b.qmp();
    assert_eq!(sha256(&mut qa, "src", "B"), sha256(&mut qb, "src", "B"));
    // Nothing of the migration's is left on A but the forwarding node.
    let exports = qa.execute_ok("query-block-exports", json!({}));
    assert_eq!(exports.as_array().map(Vec::len), Some(1), "{exports}");
    assert_eq!(exports[0]["id"], "e0", "{exports}");
    assert_eq!(
        exports[0]["node-name"], "bitmirror-migrate-src",
        "{exports}"
    );
    // Guest writes now reach B through A's export, and B records them.
    guest(dir, &["write -P 7 30M 64k".into()]);
    let uri = format!(
        "nbd+unix:///bitmirror-migrate-src?socket={}",
        b_sock.display()
    );
    let out = run("qemu-io", &["-f", "raw", "-c", "read -P 7 30M 64k", &uri]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let nodes = qb.execute_ok("query-named-block-nodes", json!({}));
    let count = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["node-name"] == "src")
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .find(|b| b["name"] == "B")
        .map(|b| b["count"].clone());
    assert_eq!(count, Some(json!(17 * MIB + 65536)), "{nodes}");
    quit(&mut qa, &mut a);
    quit(&mut qb, &mut b);

    // B's overlay over the shared image reads as A's disk did (plus the
    // write made after the cut-over), and holds only what changed since
    // the full backup.
    let dest = dir.join("b").join("src.qcow2");
    run("qemu-img", &["check", path_str(&dest)]);
    testkit::qemu_io_writes(
        path_str(&dir.join("src.qcow2")),
        "qcow2",
        &[(30 * MIB, 64 << 10, Some(7))],
    );
    common::assert_identical(&dir.join("src.qcow2"), &dest);
    let top = allocated_in_top(&dest);
    assert!(
        (17 * MIB..=18 * MIB).contains(&top),
        "{top} bytes in the overlay"
    );
    // B was persistent on A, so it is on B, stored in the overlay.
    let info = run("qemu-img", &["info", "--output=json", path_str(&dest)]);
    let info: Value = serde_json::from_str(&info).expect("qemu-img info's JSON");
    let stored = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(stored[0]["name"], "B", "{info}");
    assert_eq!(stored[0]["granularity"], 65536, "{info}");
}

/// The node names and bitmaps `qmp`'s daemon has.
fn nodes_and_jobs(qmp: &mut Qmp) -> (Vec<String>, Value) {
    let nodes = qmp.execute_ok("query-named-block-nodes", json!({}));
    let names = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
        .collect();
    (names, qmp.execute_ok("query-jobs", json!({})))
}

#[test]
fn a_failed_migration_leaves_the_source_in_charge() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let mut a = host_a_after_full_backup(dir);
    let (mut b, _) = host_b(dir);
    // (A QMP socket takes one client at a time, as QEMU's: the CLI needs
    // both sockets free.)
    let (before, nodes_before) = {
        let mut qa = a.qmp();
        (sha256(&mut qa, "src", "B"), nodes_and_jobs(&mut qa).0)
    };

    // A bitmap the node does not have: refused before anything is made.
    let args = migrate_args(dir, &a, &b, &["--bitmap", "nosuch"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out) = bitmirror(&args);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("node 'src' has no bitmap 'nosuch'"), "{out}");
    assert!(!dir.join("b").join("src.qcow2").exists());

    // The destination dies while the mirror runs (1 MiB/s: 16 s to go).
    let args = migrate_args(dir, &a, &b, &["--bitmap", "B", "--speed", "1048576"]);
    let migration = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bitmirror(&args)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-9", &b.pid().to_string()])
        .status();
    let _ = b.wait_exit();
    let (code, out) = migration.join().expect("the migration thread");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("failed before the cut-over"), "{out}");
    assert!(out.contains("the source is unchanged"), "{out}");
    // The source: no job, no NBD node left, the same bitmap, and the
    // guest's writes land on it.
    let mut qa = a.qmp();
    let (nodes, jobs) = nodes_and_jobs(&mut qa);
    assert_eq!(nodes, nodes_before);
    assert_eq!(jobs, json!([]));
    assert_eq!(sha256(&mut qa, "src", "B"), before);
    guest(dir, &["write -P 9 50M 64k".into()]);
    let uri = format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display());
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 9 50M 64k",
            "-c",
            "read -P 2 4M 8M",
            &uri,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // And the image the destination had begun is gone.
    assert!(!dir.join("b").join("src.qcow2").exists());
    quit(&mut qa, &mut a);
}

/// `bitmirror demo` (smaller than its default, for the debug build): every
/// step runs and every check passes, and it says so.
#[test]
fn the_demo_runs_the_workflow_and_its_checks_pass() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let work = tmp.path().join("demo");
    let (code, out) = bitmirror(&["demo", "--size", "64M", "--dir", path_str(&work)]);
    common::assert_demo_passed(code, &out);
    // The incremental migrations copied a fraction of the full mirror.
    let copied = |row: &str| -> f64 {
        let line = out.lines().find(|l| l.contains(row)).expect("the row");
        let cell = line.split('|').nth(2).expect("the copied cell").trim();
        let (n, unit) = cell.split_once(' ').expect("a number and a unit");
        let n: f64 = n.parse().expect("a number");
        n * match unit {
            "KiB" => 1024.0,
            "MiB" => 1048576.0,
            "GiB" => 1073741824.0,
            _ => 1.0,
        }
    };
    let full = copied("full mirror A → B");
    assert!(copied("incremental migration A → B") < full / 4.0, "{out}");
    assert!(copied("incremental migration B → A") < full / 4.0, "{out}");
    // A bad size is refused with a clear error.
    let (code, out) = bitmirror(&["demo", "--size", "3X"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("is not a size"), "{out}");
}

/// The bitmap cannot be fetched after the cut-over (the destination is
/// told a source address nobody listens on): the disk has moved, and the
/// destination drops its partial bitmap rather than keep a subset of the
/// truth; the migration says so and fails.
#[test]
fn a_bitmap_that_cannot_follow_is_removed_not_left_partial() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let mut a = host_a_after_full_backup(dir);
    let (mut b, _) = host_b(dir);
    let mut args = migrate_args(dir, &a, &b, &["--bitmap", "B"]);
    let at = args
        .iter()
        .position(|x| x == "--source-nbd")
        .expect("the option")
        + 1;
    args[at] = format!("unix:{}", dir.join("nobody.sock").display());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out) = bitmirror(&args);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("the node moved, but its bitmaps did not"),
        "{out}"
    );
    assert!(
        out.contains("the next backup there must be a full one"),
        "{out}"
    );
    let mut qb = b.qmp();
    let nodes = qb.execute_ok("query-named-block-nodes", json!({}));
    let dest = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"] == "src")
        .cloned()
        .expect("the migrated node on B");
    // (QEMU leaves the member out when there are none.)
    assert!(dest.get("dirty-bitmaps").is_none(), "{dest}");
    // The source keeps its copy (disabled), for the operator.
    let mut qa = a.qmp();
    sha256(&mut qa, "src", "B");
    quit(&mut qa, &mut a);
    quit(&mut qb, &mut b);
}

/// The destination may be qemu-storage-daemon itself when no bitmap
/// moves: `bitmirror migrate` only uses QEMU's commands there.
#[test]
fn a_full_migration_into_qemu_storage_daemon() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let mut a = host_a_after_full_backup(dir);
    let b_dir = dir.join("b");
    std::fs::create_dir(&b_dir).expect("a directory");
    let b_sock = b_dir.join("nbd.sock");
    let mut b = StorageDaemon::start(
        &b_dir,
        &[
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", b_sock.display()),
        ],
    );
    // B is persistent on A: a full migration without --source-nbd must
    // say it cannot move it, so drop it first (QEMU's daemon could not
    // pull it anyway).
    a.qmp().execute_ok(
        "block-dirty-bitmap-remove",
        json!({"node": "src", "name": "B"}),
    );
    let dest = b_dir.join("src.qcow2");
    let (code, out) = bitmirror(&[
        "migrate",
        "--from",
        path_str(a.qmp_path()),
        "--to",
        path_str(b.qmp_path()),
        "--node",
        "src",
        "--dest-image",
        path_str(&dest),
        "--dest-nbd",
        &format!("unix:{}", b_sock.display()),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("migrated 'src' (full mirror)"), "{out}");
    let mut qa = a.qmp();
    quit(&mut qa, &mut a);
    let mut qb = b.qmp();
    quit(&mut qb, &mut b);
    run("qemu-img", &["check", path_str(&dest)]);
    common::assert_identical(&dir.join("src.qcow2"), &dest);
}

/// Ctrl-C (SIGINT) while the mirror runs: the migration stops, undoes what
/// it made on both daemons, and says the source is still in charge.
#[test]
fn an_interrupted_migration_undoes_itself() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let mut a = host_a_after_full_backup(dir);
    let (mut b, _) = host_b(dir);
    let nodes_before = nodes_and_jobs(&mut a.qmp()).0;
    let args = migrate_args(dir, &a, &b, &["--bitmap", "B", "--speed", "1048576"]);
    let child = Command::new(env!("CARGO_BIN_EXE_bitmirror"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bitmirror runs");
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().expect("bitmirror ends");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("interrupted"), "{text}");
    assert!(text.contains("the source is unchanged"), "{text}");
    let mut qa = a.qmp();
    let (nodes, jobs) = nodes_and_jobs(&mut qa);
    assert_eq!(nodes, nodes_before);
    assert_eq!(jobs, json!([]));
    assert!(!dir.join("b").join("src.qcow2").exists());
    let mut qb = b.qmp();
    assert_eq!(nodes_and_jobs(&mut qb).0, Vec::<String>::new());
    quit(&mut qa, &mut a);
    quit(&mut qb, &mut b);
}
