//! Interop with the real QEMU: the same writes must give the same bits.
//!
//! A `qemu-storage-daemon` exports a raw disk over NBD with dirty bitmaps at
//! several granularities; `qemu-io` writes to it through NBD; QEMU's
//! `x-debug-block-dirty-bitmap-sha256` must then equal our `sha256()` for
//! the same writes, and QEMU's `count` our `dirty_granules() << granularity`.

use hbitmap::HBitmap;
use serde_json::{Value, json};
use testkit::{StorageDaemon, qemu_io_writes, require_tool, run};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Not a multiple of 4 KiB: the last granule is partial for every bitmap but
/// the 512-byte one.
const DISK: u64 = 64 * MIB + 3 * 512;
const GRANULARITIES: [u64; 4] = [512, 4 * KIB, 64 * KIB, 2 * MIB];

/// The writes: edges of the disk and of words of bits, unaligned ones, and a
/// deterministic scatter. `true` marks a write-zeroes request.
fn writes() -> Vec<(u64, u64, bool)> {
    let mut w = vec![
        (0, 1, false),
        (DISK - 1, 1, false),
        (DISK - 3 * 512, 3 * 512, true),
        (64 * 512 - 1, 2, false),
        (4 * MIB - 100, 200, false),
        (8 * MIB, 2 * MIB, true),
        (13 * MIB + 17, 5 * MIB + 1000, false),
    ];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..150 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let start = x % DISK;
        let len = (1 + (x >> 40) % (300 * KIB)).min(DISK - start);
        w.push((start, len, i % 7 == 0));
    }
    w
}

fn dirty_bitmaps(qmp: &mut testkit::Qmp) -> Vec<Value> {
    let nodes = qmp.execute_ok("query-named-block-nodes", json!({}));
    let node = nodes
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node-name"] == "disk0"))
        .unwrap_or_else(|| panic!("node disk0 missing from {nodes}"));
    node["dirty-bitmaps"]
        .as_array()
        .unwrap_or_else(|| panic!("no dirty-bitmaps in {node}"))
        .clone()
}

#[test]
fn sha256_and_count_match_qemu_for_the_same_writes() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let image = image.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", image, &DISK.to_string()],
    );
    let nbd = dir.path().join("nbd.sock");
    let args: Vec<String> = [
        "--blockdev",
        &format!("driver=file,node-name=file0,filename={image}"),
        "--blockdev",
        "driver=raw,node-name=disk0,file=file0",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", nbd.display()),
        "--export",
        "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let qsd = StorageDaemon::start(dir.path(), &args);
    let mut qmp = qsd.qmp();
    for g in GRANULARITIES {
        qmp.execute_ok(
            "block-dirty-bitmap-add",
            json!({ "node": "disk0", "name": format!("b{g}"), "granularity": g }),
        );
    }

    let writes = writes();
    let io: Vec<(u64, u64, Option<u8>)> = writes
        .iter()
        .map(|&(start, len, zero)| (start, len, (!zero).then_some(0x5a)))
        .collect();
    let target = format!("nbd+unix:///disk0?socket={}", nbd.display());
    qemu_io_writes(&target, "raw", &io);

    let reported = dirty_bitmaps(&mut qmp);
    let mut ours = Vec::new();
    for g in GRANULARITIES {
        let mut bm = HBitmap::new(DISK, g.trailing_zeros()).unwrap();
        for &(start, len, _) in &writes {
            bm.set(start, len).unwrap();
        }
        let name = format!("b{g}");
        let theirs = qmp.execute_ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({ "node": "disk0", "name": name }),
        );
        assert_eq!(
            theirs["sha256"].as_str(),
            Some(bm.sha256().as_str()),
            "bitmap {name}"
        );
        let info = reported
            .iter()
            .find(|b| b["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} missing from {reported:?}"));
        assert_eq!(
            info["count"].as_u64(),
            Some(bm.dirty_granules() << bm.granularity()),
            "count of {name}"
        );
        assert!(!bm.is_empty());
        ours.push(bm);
    }

    // A merge from the finest into a new coarse bitmap, on both sides.
    qmp.execute_ok(
        "block-dirty-bitmap-add",
        json!({ "node": "disk0", "name": "merged", "granularity": MIB }),
    );
    qmp.execute_ok(
        "block-dirty-bitmap-merge",
        json!({ "node": "disk0", "target": "merged", "bitmaps": ["b512"] }),
    );
    let mut merged = HBitmap::new(DISK, 20).unwrap();
    merged.merge(&ours[0]).unwrap();
    let theirs = qmp.execute_ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({ "node": "disk0", "name": "merged" }),
    );
    assert_eq!(theirs["sha256"].as_str(), Some(merged.sha256().as_str()));
}
