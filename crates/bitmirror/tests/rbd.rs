//! Ceph RBD through `bitmirror serve` (built with the `rbd` feature), on the
//! project's one-node test cluster (`scripts/ceph-cluster`): what we write
//! is what `rbd export` reads, what `rbd import` wrote is what we read,
//! block status follows the object map, persistent bitmaps live in the
//! cluster, and mirror and backup jobs copy to and from RBD images.

#![cfg(feature = "rbd")]

mod common;

use std::path::Path;

use common::{guest, path_str, quit, serve, wait_event};
use serde_json::{Value, json};
use testkit::{Qmp, ceph, run};

const MIB: u64 = 1 << 20;

/// The daemon's arguments for an NBD server on `dir/nbd.sock`.
fn nbd_server(dir: &Path) -> Vec<String> {
    vec![
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
    ]
}

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

/// The NBD URI of export `name` on `dir/nbd.sock`.
fn uri(dir: &Path, name: &str) -> String {
    format!(
        "nbd+unix:///{name}?socket={}",
        dir.join("nbd.sock").display()
    )
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
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            path_str(&file),
            &uri(dir.path(), "imp"),
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");

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
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            e,
            &uri(dir.path(), "disk"),
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");

    // Block status comes from the object map: the objects written are
    // data, the others holes.
    let map = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "raw",
            &uri(dir.path(), "disk"),
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
