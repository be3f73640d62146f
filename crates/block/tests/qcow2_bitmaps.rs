//! Persistent bitmaps that QEMU stored in qcow2 images load with exactly
//! QEMU's bits and states.

use block::Graph;
use serde_json::json;
mod common;
use common::open_qcow2;
use testkit::{StorageDaemon, qemu_io_writes, require_tool, run};

#[tokio::test]
async fn bitmaps_stored_by_qemu_load_with_the_same_bits() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let image = image.to_str().unwrap();
    // Not a multiple of the granularities: the last granule is partial.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            image,
            "20000K",
        ],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "--granularity", "65536", image, "b64k"],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "--granularity", "512", image, "b512"],
    );
    run("qemu-img", &["bitmap", "--add", "--disable", image, "off"]);
    qemu_io_writes(
        image,
        "qcow2",
        &[
            (0, 4096, Some(1)),
            (5000000, 300000, Some(2)),
            (9000000, 65536, None),
            (20475904, 4096, Some(3)),
        ],
    );

    let g = Graph::new();
    let node = open_qcow2(&g, "q", image, json!({})).await.unwrap();
    let mut info = node.bitmaps().info();
    info.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = info.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["b512", "b64k", "off"]);
    for i in &info {
        assert!(i.persistent && !i.inconsistent, "{i:?}");
        assert_eq!(i.recording, i.name != "off", "{i:?}");
    }
    assert_eq!(info[2].count, 0, "a disabled bitmap recorded nothing");
    assert!(info[0].count > 0 && info[1].count > 0);

    // The same image in qemu-storage-daemon: the same bits and counts.
    let qsd = StorageDaemon::start(
        dir.path(),
        &[
            "--blockdev".into(),
            format!("driver=qcow2,node-name=q,read-only=on,file.driver=file,file.filename={image}"),
        ],
    );
    let mut qmp = qsd.qmp();
    for i in &info {
        let theirs = qmp.execute_ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "q", "name": i.name}),
        );
        assert_eq!(
            theirs["sha256"].as_str(),
            Some(node.bitmaps().sha256(&i.name).unwrap().as_str()),
            "bitmap {}",
            i.name
        );
    }
}

#[tokio::test]
async fn a_bitmap_left_in_use_by_a_crash_loads_inconsistent() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let image = image.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", image, "4M"]);
    run("qemu-img", &["bitmap", "--add", image, "b"]);
    // A writable open marks the bitmap in use; a kill leaves it so.
    let qsd = StorageDaemon::start(
        dir.path(),
        &[
            "--blockdev".into(),
            format!("driver=qcow2,node-name=q,file.driver=file,file.filename={image}"),
        ],
    );
    drop(qsd); // kill -9
    let info = run("qemu-img", &["info", "--force-share", image]);
    assert!(
        info.contains("in-use"),
        "QEMU did not leave the bitmap in use:\n{info}"
    );

    let g = Graph::new();
    let node = open_qcow2(&g, "q", image, json!({})).await.unwrap();
    let info = node.bitmaps().info();
    assert!(info[0].inconsistent && info[0].persistent, "{info:?}");
    assert_eq!(
        node.bitmaps().snapshot("b").unwrap_err().to_string(),
        "Bitmap 'b' is inconsistent and cannot be used"
    );
}
