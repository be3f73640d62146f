//! Reads the page cache serves at once never wait, yet a task that reads in
//! a loop must still give its runtime thread back now and then, or the other
//! tasks on that thread (other connections, jobs, QMP) stall behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use block::{BlockdevOptions, Graph, IoBuf};
use serde_json::json;

#[tokio::test(flavor = "current_thread")]
async fn a_task_reading_cached_data_in_a_loop_lets_the_others_run() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("cached.raw");
    // Just written: the page cache holds all of it.
    std::fs::write(&path, vec![7u8; 1 << 20]).expect("the file is written");
    let options = BlockdevOptions::from_json(&json!({
        "driver": "file", "node-name": "f", "filename": path.display().to_string()
    }))
    .expect("valid options");
    let graph = Graph::new();
    let node = graph.add(&options).await.expect("the node opens");

    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                ticks.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    let reader = tokio::spawn(async move {
        let mut buf = IoBuf::zeroed(4096, 1);
        for i in 0..2000u64 {
            let (result, b) = node.read_into((i % 256) * 4096, buf).await;
            result.expect("the read succeeds");
            assert_eq!(b.as_slice()[0], 7, "the file's data");
            buf = b;
        }
    });
    // Both tasks are queued; the ticker can only run while the reader, on
    // the same thread, yields.
    tokio::task::yield_now().await;
    let before = ticks.load(Ordering::Relaxed);
    reader.await.expect("the reader finishes");
    let during = ticks.load(Ordering::Relaxed) - before;
    ticker.abort();
    assert!(
        during >= 5,
        "the other task ran {during} times while 2000 cached reads ran: the reader hogged the thread"
    );
}
