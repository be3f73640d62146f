//! Ceph RBD through `bitmirror serve` (built with the `rbd` feature), on the
//! project's one-node test cluster (`scripts/ceph-cluster`): what we write
//! is what `rbd export` reads, what `rbd import` wrote is what we read,
//! block status follows the object map, persistent bitmaps live in the
//! cluster, and mirror and backup jobs copy to and from RBD images.

#![cfg(feature = "rbd")]

mod common;

use std::path::Path;

use common::{
    assert_same, guest, guest_snapshot, nbd_server, nbd_uri, path_str, quit, serve, wait_event,
};
use serde_json::{Value, json};
use testkit::{Qmp, ceph, run};

const MIB: u64 = 1 << 20;

/// `driver=rbd` options for image `name` of the test pool.
fn rbd_node(node: &str, name: &str) -> Value {
    json!({"driver": "rbd", "node-name": node, "pool": ceph::POOL, "image": name,
           "conf": ceph::conf()})
}

/// Runs `blockdev-create` job `id` with `options` to its end; returns its
/// error, if any.
fn create(qmp: &mut Qmp, id: &str, options: Value) -> Option<String> {
    qmp.execute_ok("blockdev-create", json!({"job-id": id, "options": options}));
    loop {
        let e = wait_event(qmp, "JOB_STATUS_CHANGE");
        if e["data"]["id"] == id && e["data"]["status"] == "concluded" {
            break;
        }
    }
    let jobs = qmp.execute_ok("query-jobs", json!({}));
    let job = jobs
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no job {id}: {jobs}"));
    qmp.execute_ok("job-dismiss", json!({"id": id}));
    job["error"].as_str().map(str::to_owned)
}

/// Removes the test's images when it ends, passed or failed.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for name in &self.0 {
            ceph::remove(name);
        }
    }
}

#[test]
fn what_we_write_rbd_exports_and_what_rbd_imports_we_read() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (new, imported) = (ceph::image_name("rw"), ceph::image_name("imp"));
    let _cleanup = Images(vec![new.clone(), imported.clone()]);

    // An image made by `rbd import` from a file with patterns.
    let file = dir.path().join("imported.raw");
    run("qemu-img", &["create", "-f", "raw", path_str(&file), "32M"]);
    testkit::qemu_io_writes(
        path_str(&file),
        "raw",
        &[(0, MIB, Some(0x5a)), (20 * MIB, 64 << 10, Some(0xc3))],
    );
    ceph::import(&file, &imported);

    let mut daemon = serve(dir.path(), &nbd_server(dir.path()));
    let mut qmp = daemon.qmp();
    let location = json!({"pool": ceph::POOL, "image": new, "conf": ceph::conf()});
    let err = create(
        &mut qmp,
        "c0",
        json!({"driver": "rbd", "location": location, "size": 64 * MIB, "cluster-size": MIB}),
    );
    assert_eq!(err, None);
    assert!(ceph::images().contains(&new), "{:?}", ceph::images());
    // The same again: the image exists.
    let err = create(
        &mut qmp,
        "c1",
        json!({"driver": "rbd", "location": location, "size": MIB}),
    )
    .expect("creating an existing image fails");
    assert!(err.contains("File exists"), "{err}");
    // QEMU's checks of the object size, when the job runs.
    let err = create(
        &mut qmp,
        "c2",
        json!({"driver": "rbd", "location": location, "size": MIB, "cluster-size": 3000}),
    );
    assert_eq!(err.as_deref(), Some("obj size needs to be power of 2"));

    qmp.execute_ok("blockdev-add", rbd_node("disk", &new));
    let mut imp = rbd_node("imp", &imported);
    imp["read-only"] = json!(true);
    qmp.execute_ok("blockdev-add", imp);
    for (id, node, name, writable) in [("e0", "disk", "disk", true), ("e1", "imp", "imp", false)] {
        qmp.execute_ok(
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": node, "name": name,
                   "writable": writable}),
        );
    }
    let nodes = qmp.execute_ok("query-named-block-nodes", json!({"flat": true}));
    let disk = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"] == "disk")
        .cloned()
        .unwrap_or_default();
    assert_eq!(disk["drv"], "rbd", "{disk}");
    assert_eq!(disk["image"]["virtual-size"], 64 * MIB, "{disk}");
    let filename = disk["file"].as_str().unwrap_or_default();
    assert!(
        filename.starts_with("json:") && filename.contains(&new),
        "{filename}"
    );

    // What `rbd import` wrote reads the same through our node.
    assert_same(path_str(&file), "raw", &nbd_uri(dir.path(), "imp"), "raw");

    // Writes, zeroes and discards through our node...
    guest(
        dir.path(),
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 40M 64k".into(),
            "write -P 0x33 50M 2M".into(),
            "write -z 50M 64k".into(),
            "write -z -u 51M 1M".into(),
            "flush".into(),
        ],
    );
    // ...are what `rbd export` reads (the daemon still running).
    let exported = dir.path().join("exported.raw");
    ceph::export(&new, &exported);
    let e = path_str(&exported);
    for check in [
        "read -P 0x11 0 1M",
        "read -P 0 1M 39M",
        "read -P 0x22 40M 64k",
        "read -P 0 50M 64k",
        "read -P 0x33 51264K 960k",
        "read -P 0 51M 1M",
        "read -P 0 52M 12M",
    ] {
        let out = run("qemu-io", &["-f", "raw", "-c", check, e]);
        assert!(
            !out.contains("Pattern verification failed"),
            "{check}: {out}"
        );
    }
    assert_same(e, "raw", &nbd_uri(dir.path(), "disk"), "raw");

    // Block status comes from the object map: the objects written are
    // data, the others holes.
    let map = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "raw",
            &nbd_uri(dir.path(), "disk"),
        ],
    );
    let map: Value = serde_json::from_str(&map).expect("qemu-img map's JSON");
    let data_at = |offset: u64| {
        map.as_array()
            .into_iter()
            .flatten()
            .find(|e| {
                let start = e["start"].as_u64().unwrap_or(u64::MAX);
                start <= offset && offset < start + e["length"].as_u64().unwrap_or(0)
            })
            .map(|e| e["data"] == true)
            .unwrap_or_else(|| panic!("no extent at {offset}: {map}"))
    };
    assert!(data_at(0) && data_at(40 * MIB) && data_at(50 * MIB + 512 * 1024));
    assert!(
        !data_at(10 * MIB) && !data_at(30 * MIB) && !data_at(60 * MIB),
        "{map}"
    );
    quit(&mut qmp, &mut daemon);
}

/// The dirty-bitmap entry `name` of node `node`, if there is one.
fn bitmap(qmp: &mut Qmp, node: &str, name: &str) -> Option<Value> {
    let nodes = qmp.execute_ok("query-named-block-nodes", json!({}));
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .find(|b| b["name"] == name)
}

fn sha256(qmp: &mut Qmp, node: &str, name: &str) -> String {
    let r = qmp.execute_ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": node, "name": name}),
    );
    r["sha256"].as_str().expect("a sha256").to_owned()
}

/// A daemon in `dir` (created) with image `name` as node `disk`, exported
/// writable as `disk`.
fn serve_image(dir: &Path, name: &str) -> testkit::StorageDaemon {
    std::fs::create_dir_all(dir).expect("a directory");
    let mut args = nbd_server(dir);
    args.extend([
        "--blockdev".into(),
        format!(
            "driver=rbd,node-name=disk,pool={},image={name},conf={}",
            ceph::POOL,
            ceph::conf()
        ),
        "--export".into(),
        "type=nbd,id=e0,node-name=disk,name=disk,writable=on".into(),
    ]);
    serve(dir, &args)
}

/// A persistent bitmap on an RBD node lives in the cluster, beside the
/// image: another daemon ("another host") finds it with the same bits, and
/// after a `kill -9` it comes back a superset of the writes, not
/// inconsistent.
#[test]
fn persistent_bitmaps_of_rbd_images_live_in_the_cluster_and_survive_kill_9() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let name = ceph::image_name("bm");
    let _cleanup = Images(vec![name.clone()]);
    ceph::rbd(&["create", "--size", "32M", &format!("{}/{name}", ceph::POOL)]);

    // Host A: the bitmap records the guest's writes and is stored at quit.
    let dir_a = tmp.path().join("a");
    let mut a = serve_image(&dir_a, &name);
    let mut qa = a.qmp();
    qa.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0", "granularity": 65536, "persistent": true}),
    );
    guest(
        &dir_a,
        &["write -P 1 1M 64k".into(), "write -P 2 5M 300k".into()],
    );
    let before = bitmap(&mut qa, "disk", "b0").expect("b0");
    assert_eq!(before["count"], 64 * 1024 + 320 * 1024, "{before}");
    let sum = sha256(&mut qa, "disk", "b0");
    quit(&mut qa, &mut a);
    let sidecar = format!("{name}.bitmaps");
    assert!(ceph::images().contains(&sidecar), "{:?}", ceph::images());
    let snaps = ceph::rbd(&["snap", "ls", &format!("{}/{name}", ceph::POOL)]);
    assert!(snaps.contains("bitmirror-bitmaps"), "{snaps}");

    // Another client writes while no bitmirror has the image: 64 KiB at 0.
    ceph::rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "65536",
        "--io-total",
        "65536",
        "--io-pattern",
        "seq",
        &format!("{}/{name}", ceph::POOL),
    ]);

    // Host B opens the image and finds b0 as A left it.
    let dir_b = tmp.path().join("b");
    let mut b = serve_image(&dir_b, &name);
    let mut qb = b.qmp();
    let found = bitmap(&mut qb, "disk", "b0").expect("b0 on host B");
    assert_eq!(found["persistent"], true, "{found}");
    assert_eq!(found["inconsistent"], Value::Null, "{found}");
    assert_eq!(found["recording"], true, "{found}");
    // A's bits, and the other client's write (its whole 4 MiB object).
    let count = found["count"].as_u64().unwrap_or(0);
    assert!(
        count >= before["count"].as_u64().unwrap_or(0) + 65536,
        "{found}"
    );
    assert_ne!(sha256(&mut qb, "disk", "b0"), sum);
    // The snapshot has done its work and is gone while B has the image.
    let snaps = ceph::rbd(&["snap", "ls", &format!("{}/{name}", ceph::POOL)]);
    assert!(!snaps.contains("bitmirror-bitmaps"), "{snaps}");

    // B writes and dies without storing anything.
    guest(&dir_b, &["write -P 3 20M 64k".into(), "flush".into()]);
    let _ = std::process::Command::new("kill")
        .args(["-9", &b.pid().to_string()])
        .status();
    let _ = b.wait_exit();
    drop(qb);

    // Host C: b0 is back, consistent, and holds every write.
    let dir_c = tmp.path().join("c");
    let mut c = serve_image(&dir_c, &name);
    let mut qc = c.qmp();
    let after = bitmap(&mut qc, "disk", "b0").expect("b0 after kill -9");
    assert_eq!(after["inconsistent"], Value::Null, "{after}");
    let count = after["count"].as_u64().unwrap_or(0);
    assert!(
        count >= 64 * 1024 + 320 * 1024 + 64 * 1024,
        "a subset after the crash: {after}"
    );
    // The bits are where the writes were: an export of b0 shows them.
    qc.execute_ok("block-export-del", json!({"id": "e0"}));
    wait_event(&mut qc, "BLOCK_EXPORT_DELETED");
    qc.execute_ok(
        "block-dirty-bitmap-disable",
        json!({"node": "disk", "name": "b0"}),
    );
    qc.execute_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "disk", "name": "disk",
               "bitmaps": ["b0"]}),
    );
    let map = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={},export=disk,\
                 x-dirty-bitmap=qemu:dirty-bitmap:b0",
                dir_c.join("nbd.sock").display()
            ),
        ],
    );
    let map: Value = serde_json::from_str(&map).expect("qemu-img map's JSON");
    // QEMU shows dirty extents as data: false.
    let dirty_at = |offset: u64| {
        map.as_array().into_iter().flatten().any(|e| {
            let start = e["start"].as_u64().unwrap_or(u64::MAX);
            e["data"] == false
                && start <= offset
                && offset < start + e["length"].as_u64().unwrap_or(0)
        })
    };
    for offset in [0, MIB, 5 * MIB, 5 * MIB + 299 * 1024, 20 * MIB] {
        assert!(dirty_at(offset), "{offset} not dirty: {map}");
    }
    assert!(!dirty_at(10 * MIB), "{map}");

    // Removing it removes it from the cluster's copy too.
    qc.execute_ok("block-export-del", json!({"id": "e1"}));
    wait_event(&mut qc, "BLOCK_EXPORT_DELETED");
    qc.execute_ok(
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "b0"}),
    );
    quit(&mut qc, &mut c);
    let mut d = serve_image(&tmp.path().join("d"), &name);
    let mut qd = d.qmp();
    assert_eq!(bitmap(&mut qd, "disk", "b0"), None);
    quit(&mut qd, &mut d);
}

/// `bitmirror demo --rbd`: the founding workflow with the shared image R on
/// RBD — full backup into R, incremental migration onto R, incremental
/// backup into R, incremental migration back — each host checked byte for
/// byte against what the guest wrote; R is removed at the end.
#[test]
fn the_founding_workflow_on_rbd_twice_in_a_row() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let work = tmp.path().join("demo");
    let conf = ceph::conf();
    let (code, out) = common::bitmirror(&[
        "demo",
        "--size",
        "64M",
        "--dir",
        path_str(&work),
        "--rbd",
        &conf,
    ]);
    let image = out
        .lines()
        .find_map(|l| l.strip_prefix("the shared image R is RBD image rbd/"))
        .map(str::to_owned);
    let _cleanup = Images(image.iter().cloned().collect());
    common::assert_demo_passed(code, &out);
    let image = image.expect("the demo names R");
    assert!(!ceph::images().contains(&image), "R is left behind: {out}");
    // The destinations' overlays were backed by R on RBD.
    let info = run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "-U",
            path_str(&work.join("b").join("disk0.qcow2")),
        ],
    );
    assert!(info.contains(&format!("rbd:rbd/{image}:conf=")), "{info}");
}

/// Waits for job `id`'s `BLOCK_JOB_COMPLETED` and checks it succeeded.
fn completed(qmp: &mut Qmp, id: &str) -> Value {
    loop {
        let e = wait_event(qmp, "BLOCK_JOB_COMPLETED");
        if e["data"]["device"] == id {
            assert_eq!(e["data"]["error"], Value::Null, "{e}");
            return e;
        }
    }
}

/// The founding workflow's jobs with RBD on either side: a full backup
/// into RBD atomically with a bitmap, an incremental one after guest
/// writes, a mirror out of RBD into a local qcow2, and a mirror of the
/// guest's disk into RBD while the guest writes; each copy equals its
/// source (`rbd export` and `qemu-img compare`).
#[test]
fn backup_and_mirror_to_and_from_rbd() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (r, m) = (ceph::image_name("r"), ceph::image_name("m"));
    let _cleanup = Images(vec![r.clone(), m.clone()]);
    let src = dir.join("src.qcow2");
    testkit::qemu_img_create_qcow2(path_str(&src), 32 * MIB, "");
    testkit::qemu_io_writes(
        path_str(&src),
        "qcow2",
        &[
            (0, 2 * MIB, Some(0x41)),
            (9 * MIB, 3 * MIB, Some(0x42)),
            (31 * MIB, MIB, Some(0x43)),
        ],
    );
    let local = dir.join("local.qcow2");
    testkit::qemu_img_create_qcow2(path_str(&local), 32 * MIB, "");
    let mut args = nbd_server(dir);
    args.extend([
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            src.display()
        ),
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=local,file.driver=file,file.filename={}",
            local.display()
        ),
        "--export".into(),
        "type=nbd,id=e0,node-name=src,name=disk,writable=on".into(),
    ]);
    let mut daemon = serve(dir, &args);
    let mut qmp = daemon.qmp();
    for (id, image) in [("c0", &r), ("c1", &m)] {
        let location = json!({"pool": ceph::POOL, "image": image, "conf": ceph::conf()});
        let err = create(
            &mut qmp,
            id,
            json!({"driver": "rbd", "location": location, "size": 32 * MIB}),
        );
        assert_eq!(err, None);
    }
    qmp.execute_ok("blockdev-add", rbd_node("R", &r));
    qmp.execute_ok("blockdev-add", rbd_node("M", &m));

    // 1. Full backup into RBD, atomically with bitmap b0.
    let at_full = guest_snapshot(dir, "disk", "at-full.raw");
    qmp.execute_ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "b0", "granularity": 65536}},
            {"type": "blockdev-backup",
             "data": {"job-id": "full", "device": "src", "target": "R", "sync": "full"}}]}),
    );
    completed(&mut qmp, "full");
    let exported = dir.join("r-full.raw");
    ceph::export(&r, &exported);
    assert_same(path_str(&at_full), "raw", path_str(&exported), "raw");

    // 2. The guest writes; an incremental backup copies just that.
    guest(
        dir,
        &["write -P 0x51 1M 64k".into(), "write -P 0x52 20M 1M".into()],
    );
    let at_incremental = guest_snapshot(dir, "disk", "at-incremental.raw");
    qmp.execute_ok(
        "blockdev-backup",
        json!({"job-id": "inc", "device": "src", "target": "R", "sync": "bitmap",
               "bitmap": "b0", "bitmap-mode": "on-success"}),
    );
    let e = completed(&mut qmp, "inc");
    assert_eq!(e["data"]["offset"], 64 * 1024 + MIB, "only the writes: {e}");
    let exported = dir.join("r-inc.raw");
    ceph::export(&r, &exported);
    assert_same(path_str(&at_incremental), "raw", path_str(&exported), "raw");

    // 3. A mirror out of RBD into the local qcow2.
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "out", "device": "R", "target": "local", "sync": "full"}),
    );
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    qmp.execute_ok("block-job-complete", json!({"device": "out"}));
    completed(&mut qmp, "out");
    qmp.execute_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "local", "name": "local"}),
    );
    let local_now = guest_snapshot(dir, "local", "local.raw");
    assert_same(
        path_str(&at_incremental),
        "raw",
        path_str(&local_now),
        "raw",
    );

    // 4. The guest's disk mirrored into RBD while the guest writes; after
    // the cut-over the guest's export is on RBD.
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "in", "device": "src", "target": "M", "sync": "full",
               "speed": 8 * MIB}),
    );
    guest(
        dir,
        &[
            "write -P 0x61 3M 64k".into(),
            "write -P 0x62 30M 128k".into(),
            "write -z 9M 1M".into(),
        ],
    );
    qmp.execute_ok("block-job-set-speed", json!({"device": "in", "speed": 0}));
    wait_event(&mut qmp, "BLOCK_JOB_READY");
    qmp.execute_ok("block-job-complete", json!({"device": "in"}));
    completed(&mut qmp, "in");
    guest(dir, &["write -P 0x71 5M 64k".into(), "flush".into()]);
    let now = guest_snapshot(dir, "disk", "now.raw");
    let exported = dir.join("m.raw");
    ceph::export(&m, &exported);
    assert_same(path_str(&now), "raw", path_str(&exported), "raw");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x71 5M 64k",
            path_str(&exported),
        ],
    );
    assert!(!out.contains("verification failed"), "{out}");
    quit(&mut qmp, &mut daemon);
}

/// A qcow2 overlay whose header names its backing image on RBD — as QEMU
/// writes it (`rbd:POOL/IMAGE:conf=…`) or as a `json:` name — opens with
/// `x-backing-protocols=on` and reads through to RBD; without it the
/// header is not trusted.
#[test]
fn qcow2_overlays_backed_by_rbd_images() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let base = ceph::image_name("base");
    let _cleanup = Images(vec![base.clone()]);
    let file = dir.join("base.raw");
    run("qemu-img", &["create", "-f", "raw", path_str(&file), "16M"]);
    testkit::qemu_io_writes(
        path_str(&file),
        "raw",
        &[(0, MIB, Some(0x0b)), (8 * MIB, MIB, Some(0x0c))],
    );
    ceph::import(&file, &base);
    let names = [
        format!("rbd:{}/{base}:conf={}", ceph::POOL, ceph::conf()),
        format!(
            r#"json:{{"driver": "raw", "file": {{{}}}}}"#,
            ceph::node_json(&base)
        ),
    ];
    let mut daemon = serve(dir, &nbd_server(dir));
    let mut qmp = daemon.qmp();
    for (i, name) in names.iter().enumerate() {
        let overlay = dir.join(format!("ov{i}.qcow2"));
        testkit::qemu_img_create_overlay(path_str(&overlay), name, "raw", "16M");
        let node = |id: &str, protocols: bool| {
            json!({"driver": "qcow2", "node-name": id, "x-backing-protocols": protocols,
                   "file": {"driver": "file", "filename": path_str(&overlay)}})
        };
        let err = qmp
            .execute("blockdev-add", node(&format!("no{i}"), false))
            .expect_err("a protocol backing name from a header");
        assert!(err.desc.contains("x-backing-protocols"), "{}", err.desc);
        let id = format!("ov{i}");
        qmp.execute_ok("blockdev-add", node(&id, true));
        qmp.execute_ok(
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": id, "name": id, "writable": true}),
        );
        // Reads come from RBD; writes stay in the overlay.
        assert_same(path_str(&file), "raw", &nbd_uri(dir, &id), "raw");
        let out = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x0d 8M 64k",
                "-c",
                "read -P 0x0c 8256k 960k",
                &nbd_uri(dir, &id),
            ],
        );
        assert!(!out.contains("verification failed"), "{out}");
    }
    // librados settings beyond how to reach the cluster are not taken
    // from a header, even with x-backing-protocols=on.
    let overlay = dir.join("hostile.qcow2");
    let hostile = format!(
        "rbd:{}/{base}:conf={}:log_file=/tmp/written-by-a-header",
        ceph::POOL,
        ceph::conf()
    );
    testkit::qemu_img_create_overlay(path_str(&overlay), &hostile, "raw", "16M");
    let err = qmp
        .execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "h", "x-backing-protocols": true,
                   "file": {"driver": "file", "filename": path_str(&overlay)}}),
        )
        .expect_err("a header setting log_file");
    assert!(err.desc.contains("'log_file'"), "{}", err.desc);
    quit(&mut qmp, &mut daemon);
    // The base on RBD was only read.
    let exported = dir.join("base-after.raw");
    ceph::export(&base, &exported);
    assert_same(path_str(&file), "raw", path_str(&exported), "raw");
}

/// Bad RBD options get clear errors and the daemon goes on serving;
/// snapshots open read-only and read the image as it was.
#[test]
fn bad_rbd_options_are_refused_and_snapshots_are_read_only() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let name = ceph::image_name("snap");
    let _cleanup = Images(vec![name.clone()]);
    let spec = format!("{}/{name}", ceph::POOL);
    let file = dir.join("v1.raw");
    run("qemu-img", &["create", "-f", "raw", path_str(&file), "8M"]);
    testkit::qemu_io_writes(path_str(&file), "raw", &[(0, MIB, Some(0x01))]);
    ceph::import(&file, &name);
    ceph::rbd(&["snap", "create", &format!("{spec}@v1")]);

    let mut daemon = serve(dir, &nbd_server(dir));
    let mut qmp = daemon.qmp();
    let conf = ceph::conf();
    let bad = |options: &Value| {
        let mut o = options.clone();
        o["driver"] = json!("rbd");
        o["node-name"] = json!("x");
        o
    };
    for (options, expected) in [
        (
            json!({"pool": ceph::POOL, "image": "no-such-image", "conf": conf}),
            "error reading header from no-such-image: No such file or directory",
        ),
        (
            json!({"pool": "no-such-pool", "image": name, "conf": conf}),
            "error opening pool no-such-pool: No such file or directory",
        ),
        (
            json!({"pool": ceph::POOL, "image": name, "conf": "/nonexistent/ceph.conf"}),
            "error reading conf file /nonexistent/ceph.conf",
        ),
        (
            json!({"pool": ceph::POOL, "image": name, "conf": conf, "snapshot": "v1"}),
            "rbd snapshots are read-only",
        ),
        (
            json!({"pool": ceph::POOL, "image": name, "conf": conf, "encrypt": {"format": "luks"}}),
            "encryption",
        ),
        (json!({"pool": ceph::POOL}), "Parameter 'image' is missing"),
    ] {
        let err = qmp
            .execute("blockdev-add", bad(&options))
            .expect_err("bad options");
        assert!(err.desc.contains(expected), "{options}: {}", err.desc);
        assert_eq!(err.class, "GenericError", "{options}");
    }

    // The snapshot, read-only, reads v1 while the image moves on.
    qmp.execute_ok("blockdev-add", rbd_node("head", &name));
    let mut snap = rbd_node("v1", &name);
    snap["snapshot"] = json!("v1");
    snap["read-only"] = json!(true);
    qmp.execute_ok("blockdev-add", snap);
    for (id, node, writable) in [("e0", "head", true), ("e1", "v1", false)] {
        qmp.execute_ok(
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": node, "name": node,
                   "writable": writable}),
        );
    }
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x02 0 64k",
            &nbd_uri(dir, "head"),
        ],
    );
    let out = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x01 0 1M",
            &nbd_uri(dir, "v1"),
        ],
    );
    assert!(!out.contains("verification failed"), "{out}");
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 3 0 4k", &nbd_uri(dir, "v1")])
        .output()
        .expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "{text}"
    );
    // And the daemon still serves.
    qmp.execute_ok("query-version", json!({}));
    quit(&mut qmp, &mut daemon);
}

/// Block status of an RBD node, asked through the block layer from
/// offsets inside objects: objects written are data from their start,
/// others holes; a clone reports its parent's data; without a valid
/// `fast-diff` everything is data (nothing is ever skipped).
#[test]
fn block_status_per_object_from_any_offset_with_parents() {
    let (parent, child, plain) = (
        ceph::image_name("bsp"),
        ceph::image_name("bsc"),
        ceph::image_name("bsn"),
    );
    let _cleanup = Images(vec![child.clone(), parent.clone(), plain.clone()]);
    for image in [&parent, &plain] {
        ceph::rbd(&[
            "create",
            "--size",
            "16M",
            "--object-size",
            "1M",
            &format!("{}/{image}", ceph::POOL),
        ]);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let graph = block::Graph::new();
    rbd::RbdFactory::register(&graph);
    let open = |node: &str, image: &str| {
        let options = block::BlockdevOptions::from_json(&rbd_node(node, image)).expect("options");
        rt.block_on(graph.add(&options)).expect("an rbd node")
    };
    let status = |node: &std::sync::Arc<block::Node>, offset: u64| {
        let e = rt
            .block_on(node.block_status_upto(offset, 16 * MIB - offset, 1))
            .expect("block status");
        (e[0].offset, e[0].len, e[0].data)
    };
    let p = open("p", &parent);
    for offset in [3 * MIB, 9 * MIB + 512 * 1024] {
        let buf = block::IoBuf::copy_from(&[7u8; 65536], 4096);
        rt.block_on(p.write(offset, buf, false)).0.expect("a write");
    }
    rt.block_on(p.flush()).expect("a flush");
    // From inside a written object: data to the object's end.
    assert_eq!(
        status(&p, 3 * MIB + 4096),
        (3 * MIB + 4096, MIB - 4096, true)
    );
    // From inside an untouched one: a hole up to the next written object.
    assert_eq!(
        status(&p, 4 * MIB + 100),
        (4 * MIB + 100, 5 * MIB - 100, false)
    );
    assert_eq!(
        status(&p, 9 * MIB + 4096),
        (9 * MIB + 4096, MIB - 4096, true)
    );
    assert_eq!(status(&p, 10 * MIB), (10 * MIB, 6 * MIB, false));
    drop(p);
    rt.block_on(graph.remove("p")).expect("node p goes");

    // A clone reports its parent's data as its own reads see it.
    let snap = format!("{}/{parent}@s", ceph::POOL);
    ceph::rbd(&["snap", "create", &snap]);
    ceph::rbd(&["snap", "protect", &snap]);
    ceph::rbd(&["clone", &snap, &format!("{}/{child}", ceph::POOL)]);
    let c = open("c", &child);
    assert_eq!(status(&c, 3 * MIB + 1), (3 * MIB + 1, MIB - 1, true));
    assert!(!status(&c, 5 * MIB).2);
    drop(c);
    rt.block_on(graph.remove("c")).expect("node c goes");

    // Without fast-diff: all data, never a hole.
    ceph::rbd(&[
        "feature",
        "disable",
        &format!("{}/{plain}", ceph::POOL),
        "fast-diff",
    ]);
    let n = open("n", &plain);
    assert_eq!(status(&n, 4096), (4096, 16 * MIB - 4096, true));
    drop(n);
    rt.block_on(graph.remove("n")).expect("node n goes");
    ceph::remove(&child);
    ceph::rbd(&["snap", "unprotect", &snap]);
}

/// A writable RBD node holds the image's exclusive lock, so a second
/// writer is refused rather than writing behind the bitmaps' back; the
/// sidecar names the image it belongs to, so an image made again under the
/// same name does not inherit stale bitmaps, and an unrelated image that
/// has the sidecar's name is never used or touched.
#[test]
fn sidecars_belong_to_one_image_and_one_writer() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let (name, other) = (ceph::image_name("own"), ceph::image_name("oth"));
    let _cleanup = Images(vec![name.clone(), other.clone()]);
    let spec = format!("{}/{name}", ceph::POOL);
    ceph::rbd(&["create", "--size", "8M", &spec]);

    let mut a = serve_image(&tmp.path().join("a"), &name);
    let mut qa = a.qmp();
    qa.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0", "persistent": true}),
    );
    // The sidecar is tagged with the image's id.
    let info: Value =
        serde_json::from_str(&ceph::rbd(&["info", "--format", "json", &spec])).expect("JSON");
    let id = info["id"].as_str().expect("an image id").to_owned();
    let tag = ceph::rbd(&[
        "image-meta",
        "get",
        &format!("{spec}.bitmaps"),
        "bitmirror.sidecar-of",
    ]);
    assert_eq!(tag.trim(), id);

    // A second daemon cannot open the image for writing meanwhile.
    let dir_b = tmp.path().join("b");
    std::fs::create_dir_all(&dir_b).expect("a directory");
    let mut b = serve(&dir_b, &[]);
    let mut qb = b.qmp();
    let err = qb
        .execute("blockdev-add", rbd_node("disk", &name))
        .expect_err("a second writer");
    assert!(err.desc.contains("exclusive lock"), "{}", err.desc);
    // Reading is fine.
    let mut ro = rbd_node("ro", &name);
    ro["read-only"] = json!(true);
    qb.execute_ok("blockdev-add", ro);
    qb.execute_ok("blockdev-del", json!({"node-name": "ro"}));
    quit(&mut qa, &mut a);

    // The image is made again under its name: the old sidecar is not its.
    // (Its snapshot bitmirror-bitmaps goes first, as with any snapshot.)
    ceph::rbd(&["snap", "purge", "--no-progress", &spec]);
    ceph::rbd(&["rm", "--no-progress", &spec]);
    ceph::rbd(&["create", "--size", "8M", &spec]);
    qb.execute_ok("blockdev-add", rbd_node("disk", &name));
    assert_eq!(bitmap(&mut qb, "disk", "b0"), None);
    // A new persistent bitmap replaces the orphan.
    qb.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b1", "persistent": true}),
    );
    qb.execute_ok("blockdev-del", json!({"node-name": "disk"}));
    qb.execute_ok("blockdev-add", rbd_node("disk", &name));
    assert!(bitmap(&mut qb, "disk", "b1").is_some());
    assert_eq!(bitmap(&mut qb, "disk", "b0"), None);
    qb.execute_ok("blockdev-del", json!({"node-name": "disk"}));

    // An unrelated image called OTHER.bitmaps: OTHER opens, its persistent
    // bitmap is refused with the reason, and the unrelated image is intact.
    let other_spec = format!("{}/{other}", ceph::POOL);
    ceph::rbd(&["create", "--size", "8M", &other_spec]);
    ceph::rbd(&["create", "--size", "1M", &format!("{other_spec}.bitmaps")]);
    qb.execute_ok("blockdev-add", rbd_node("other", &other));
    let err = qb
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "other", "name": "b0", "persistent": true}),
        )
        .expect_err("the sidecar's name is taken");
    assert!(
        err.desc.contains("not a bitmirror bitmap sidecar"),
        "{}",
        err.desc
    );
    let info = ceph::rbd(&["info", "--format", "json", &format!("{other_spec}.bitmaps")]);
    assert!(info.contains("\"size\":1048576"), "{info}");
    quit(&mut qb, &mut b);
}
