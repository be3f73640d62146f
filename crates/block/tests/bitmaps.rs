//! Named dirty bitmaps: the state machine, recording, and every error text.

use std::sync::Arc;

use block::{BlockdevOptions, Graph, IoBuf, LoadedState, Node, ZeroFlags};
use hbitmap::HBitmap;
use serde_json::json;

const MIB: u64 = 1 << 20;

async fn null_node(g: &Graph, name: &str, size: u64) -> Arc<Node> {
    let v = json!({"driver": "null-co", "node-name": name, "size": size});
    g.add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap()
}

async fn write(node: &Node, offset: u64, len: usize) {
    let (r, _) = node
        .write(offset, IoBuf::copy_from(&vec![0xa5; len], 1), false)
        .await;
    r.unwrap();
}

fn err<T: std::fmt::Debug>(r: block::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[tokio::test]
async fn add_follows_qemu() {
    let g = Graph::new();
    let n = null_node(&g, "n0", MIB).await;
    let b = n.bitmaps();
    assert_eq!(
        err(b.add("", None, false, false)),
        "Bitmap name cannot be empty"
    );
    for bad in [100, 256, 3 * 512, 1 << 32] {
        assert_eq!(
            err(b.add("a", Some(bad), false, false)),
            "Granularity must be power of 2 and at least 512"
        );
    }
    assert_eq!(
        err(b.add("p", None, true, false)),
        "Can't store persistent bitmaps to n0: Operation not supported"
    );
    let long = "x".repeat(1024);
    assert_eq!(
        err(b.add(&long, None, false, false)),
        format!("Bitmap name too long: {long}")
    );
    b.add(&"y".repeat(1023), None, false, false).unwrap();
    b.add("a", Some(512), false, false).unwrap();
    b.add("big", Some(1 << 31), false, true).unwrap();
    assert_eq!(
        err(b.add("a", None, false, false)),
        "Bitmap already exists: a"
    );
    let info = b.info();
    let names: Vec<&str> = info.iter().map(|i| &i.name[..1]).collect();
    assert_eq!(names, ["b", "a", "y"], "newest first");
    assert_eq!(info[2].granularity, 65536, "default without a cluster size");
    assert!(!info[0].recording && info[1].recording);
    assert!(
        info.iter()
            .all(|i| !i.busy && !i.persistent && !i.inconsistent)
    );
}

#[tokio::test]
async fn missing_bitmaps_are_reported_by_name() {
    let g = Graph::new();
    let n = null_node(&g, "n0", MIB).await;
    let b = n.bitmaps();
    let want = "Dirty bitmap 'zz' not found";
    assert_eq!(err(b.remove("zz")), want);
    assert_eq!(err(b.clear("zz")), want);
    assert_eq!(err(b.enable("zz")), want);
    assert_eq!(err(b.disable("zz")), want);
    assert_eq!(err(b.merge("zz", &[])), want);
    assert_eq!(err(b.snapshot("zz")), want);
    assert_eq!(err(b.sha256("zz")), want);
    assert_eq!(err(b.create_successor("zz")), want);
}

#[tokio::test]
async fn recording_enable_disable_clear() {
    let g = Graph::new();
    let n = null_node(&g, "n0", 16 * MIB).await;
    let b = n.bitmaps();
    b.add("on", None, false, false).unwrap();
    b.add("off", Some(4096), false, true).unwrap();
    write(&n, 100, 10).await;
    n.write_zeroes(3 * MIB, 1, ZeroFlags::default())
        .await
        .unwrap();
    // discard=ignore: marks nothing.
    n.discard(8 * MIB, MIB).await.unwrap();
    let count = |name: &str| b.info().into_iter().find(|i| i.name == name).unwrap().count;
    assert_eq!(count("on"), 2 * 65536);
    assert_eq!(count("off"), 0);
    b.enable("off").unwrap();
    write(&n, 5000, 1).await;
    assert_eq!(count("off"), 4096);
    b.disable("on").unwrap();
    write(&n, 10 * MIB, 1).await;
    assert_eq!(count("on"), 2 * 65536);

    // Clear, write, undo: old bits and the new write both remain.
    let undo = b.clear("on").unwrap();
    assert_eq!(count("on"), 0);
    b.enable("on").unwrap();
    write(&n, 12 * MIB, 1).await;
    b.restore(undo);
    assert_eq!(count("on"), 3 * 65536);
}

#[tokio::test]
async fn discard_marks_when_it_unmaps() {
    let g = Graph::new();
    let v = json!({"driver": "null-co", "node-name": "n", "size": 4 * MIB, "discard": "unmap"});
    let n = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    n.bitmaps().add("b", None, false, false).unwrap();
    n.discard(MIB, MIB).await.unwrap();
    assert_eq!(n.bitmaps().info()[0].count, MIB);
}

#[tokio::test]
async fn busy_readonly_and_inconsistent_bitmaps_are_refused() {
    let g = Graph::new();
    let n = null_node(&g, "n0", MIB).await;
    let b = n.bitmaps();
    b.add("busy", None, false, false).unwrap();
    b.add("t", None, false, false).unwrap();
    b.set_busy("busy", true).unwrap();
    let busy = "Bitmap 'busy' is currently in use by another operation and cannot be used";
    assert_eq!(err(b.remove("busy")), busy);
    assert_eq!(err(b.clear("busy")), busy);
    assert_eq!(err(b.enable("busy")), busy);
    assert_eq!(err(b.disable("busy")), busy);
    assert_eq!(err(b.merge("busy", &[])), busy);
    assert_eq!(err(b.snapshot("busy")), busy);
    assert!(b.info()[1].busy);

    let bits = HBitmap::new(MIB, 16).unwrap();
    let ro = LoadedState {
        readonly: true,
        persistent: true,
        ..LoadedState::default()
    };
    b.add_loaded("ro", bits.try_clone().unwrap(), ro).unwrap();
    let readonly = "Bitmap 'ro' is readonly and cannot be modified";
    assert_eq!(err(b.clear("ro")), readonly);
    assert_eq!(err(b.merge("ro", &[])), readonly);
    assert_eq!(err(b.remove("ro")), readonly);
    b.disable("ro").unwrap();
    b.snapshot("ro").unwrap();
    assert!(b.has_readonly());

    let bad = LoadedState {
        inconsistent: true,
        persistent: true,
        ..LoadedState::default()
    };
    b.add_loaded("bad", bits, bad).unwrap();
    let inconsistent = "Bitmap 'bad' is inconsistent and cannot be used";
    assert_eq!(err(b.clear("bad")), inconsistent);
    assert_eq!(err(b.enable("bad")), inconsistent);
    assert_eq!(err(b.snapshot("bad")), inconsistent);
    let info = b.info();
    assert!(info[0].inconsistent && info[0].persistent);
    b.remove("bad").unwrap();
}

#[tokio::test]
async fn a_node_with_a_readonly_bitmap_refuses_writes() {
    let g = Graph::new();
    let n = null_node(&g, "n0", MIB).await;
    let state = LoadedState {
        readonly: true,
        ..LoadedState::default()
    };
    n.bitmaps()
        .add_loaded("ro", HBitmap::new(MIB, 16).unwrap(), state)
        .unwrap();
    let (r, _) = n.write(0, IoBuf::zeroed(512, 1), false).await;
    assert_eq!(err(r), "Block node 'n0' is read-only");
    assert_eq!(n.bitmaps().info()[0].count, 0);
}

#[tokio::test]
async fn successor_abdicate_and_reclaim() {
    let g = Graph::new();
    let n = null_node(&g, "n0", 8 * MIB).await;
    let b = n.bitmaps();
    b.add("b", None, false, false).unwrap();
    write(&n, 0, 1).await;
    b.create_successor("b").unwrap();
    let info = &b.info()[0];
    assert!(info.busy && info.recording, "{info:?}");
    assert_eq!(
        err(b.create_successor("b")),
        "Cannot create a successor for a bitmap that is in-use by an operation"
    );
    b.set_busy("b", false).unwrap();
    assert_eq!(
        err(b.create_successor("b")),
        "Cannot create a successor for a bitmap that already has one"
    );
    b.set_busy("b", true).unwrap();
    // Writes now land in the successor only.
    write(&n, MIB, 1).await;
    assert_eq!(b.info()[0].count, 65536);
    b.abdicate("b").unwrap();
    let info = &b.info()[0];
    assert_eq!(
        (info.count, info.busy, info.recording),
        (65536, false, true)
    );
    assert_eq!(
        err(b.abdicate("b")),
        "Cannot relinquish control if there's no successor present"
    );
    assert_eq!(
        err(b.reclaim("b")),
        "Cannot reclaim a successor if there's no successor present"
    );

    // Reclaim: the successor's bits come back into the bitmap.
    b.create_successor("b").unwrap();
    write(&n, 2 * MIB, 1).await;
    b.reclaim("b").unwrap();
    let info = &b.info()[0];
    assert_eq!(
        (info.count, info.busy, info.recording),
        (2 * 65536, false, true)
    );
}

#[tokio::test]
async fn merge_across_granularities_and_nodes() {
    let g = Graph::new();
    let n0 = null_node(&g, "n0", 8 * MIB).await;
    let n1 = null_node(&g, "n1", 8 * MIB).await;
    let big = null_node(&g, "big", 16 * MIB).await;
    n0.bitmaps().add("t", Some(1 << 20), false, false).unwrap();
    n1.bitmaps().add("fine", Some(512), false, false).unwrap();
    big.bitmaps().add("x", None, false, false).unwrap();
    n0.bitmaps().disable("t").unwrap();
    write(&n1, 3 * MIB + 5, 1).await;
    let src = n1.bitmaps().snapshot("fine").unwrap();
    n0.bitmaps().merge("t", &[src]).unwrap();
    assert_eq!(n0.bitmaps().info()[0].count, MIB);
    let other = big.bitmaps().snapshot("x").unwrap();
    assert_eq!(
        err(n0.bitmaps().merge("t", &[other])),
        "Bitmaps are of different sizes (destination size is 8388608, source size is 16777216) \
         and can't be merged"
    );
    let sha = n0.bitmaps().sha256("t").unwrap();
    let mut expect = HBitmap::new(8 * MIB, 20).unwrap();
    expect.set(3 * MIB, 1).unwrap();
    assert_eq!(sha, expect.sha256());
}
