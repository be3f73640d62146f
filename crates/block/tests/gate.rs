//! The write gate: writes held while a node is cut over go to its
//! replacement, and none is lost or lands on the old node afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use block::{BlockdevOptions, Graph, IoBuf, Node};
use serde_json::json;

async fn file_node(g: &Graph, name: &str, path: &std::path::Path) -> Arc<Node> {
    std::fs::write(path, vec![0u8; 1 << 20]).expect("an image file");
    let o = BlockdevOptions::from_json(&json!({
        "driver": "file", "node-name": name, "filename": path.to_str().expect("UTF-8"),
    }))
    .expect("options");
    g.add(&o).await.expect("node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_writes_go_to_the_replacement() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let g = Graph::new();
    let a = file_node(&g, "a", &dir.path().join("a")).await;
    let b = file_node(&g, "b", &dir.path().join("b")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));

    // Writers keep writing to `a` through a reference taken before the
    // cut-over, as a user that looked the node up would; each block's
    // byte counts up.
    let mut writers = Vec::new();
    for i in 0..8u64 {
        let (a, stop, done) = (a.clone(), stop.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            let mut byte = 0u8;
            while !stop.load(Ordering::SeqCst) {
                byte = byte.wrapping_add(1).max(1);
                let buf = IoBuf::copy_from(&[byte; 4096], 1);
                a.write(i * 4096, buf, false).await.0.expect("write");
                done.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
            byte
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    a.hold_writes().await;
    // A write that left the gate just before may not have counted itself
    // yet: let it.
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let at_hold = done.load(Ordering::SeqCst);
    // Nothing writes to `a` now: copy its final contents over.
    let snapshot = a.read(0, 8 * 4096).await.expect("read");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(done.load(Ordering::SeqCst), at_hold, "writes were held");
    b.write(0, snapshot, false).await.0.expect("copy");
    g.replace(&a, &b).expect("pivot");
    a.release_writes(Some(&b));
    let frozen = a.read(0, 8 * 4096).await.expect("read");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    stop.store(true, Ordering::SeqCst);
    let mut last = Vec::new();
    for w in writers {
        last.push(w.await.expect("writer"));
    }
    assert!(
        done.load(Ordering::SeqCst) > at_hold,
        "writes went on after the cut-over"
    );
    // `a` did not change after the cut-over; `b` has every writer's last
    // write.
    assert_eq!(
        a.read(0, 8 * 4096).await.expect("read").as_slice(),
        frozen.as_slice()
    );
    let now = b.read(0, 8 * 4096).await.expect("read");
    for (i, want) in last.iter().enumerate() {
        assert!(
            now.as_slice()[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|x| x == want),
            "block {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_nest() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let g = Graph::new();
    let a = file_node(&g, "a", &dir.path().join("a")).await;
    a.hold_writes().await;
    a.hold_writes().await;
    let writer = {
        let a = a.clone();
        tokio::spawn(async move {
            let buf = IoBuf::copy_from(&[7u8; 4096], 1);
            a.write(0, buf, false).await.0.expect("write");
        })
    };
    a.release_writes(None);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(
        !writer.is_finished(),
        "one holder left, yet the write went on"
    );
    a.release_writes(None);
    tokio::time::timeout(std::time::Duration::from_secs(5), writer)
        .await
        .expect("the write goes on once both holders let go")
        .expect("writer");
    assert_eq!(
        a.read(0, 4096).await.expect("read").as_slice(),
        &[7u8; 4096]
    );
}
