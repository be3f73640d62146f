//! Write tracking under concurrency: no write is ever missed.
//!
//! Writers hammer a file node while a copier does what a mirror does: clear
//! a block's bit, then read the block and keep the copy. When everything has
//! settled, every block whose bit is clear must hold exactly the copier's
//! last copy: otherwise a write slipped between the clear and the read and
//! its bit was lost (this is what the second mark on completion prevents).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use block::{BlockdevOptions, Graph, IoBuf};
use serde_json::json;

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_bit_never_hides_a_write_threads() {
    cleared_bit_never_hides_a_write("threads").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_bit_never_hides_a_write_io_uring() {
    cleared_bit_never_hides_a_write("io_uring").await;
}

/// The race is timing-dependent: a few rounds make a lost bit likely to show.
async fn cleared_bit_never_hides_a_write(aio: &str) {
    for _ in 0..3 {
        one_round(aio).await;
    }
}

async fn one_round(aio: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(BLOCK * BLOCKS)
        .unwrap();
    let g = Graph::new();
    let v = json!({"driver": "file", "node-name": "f", "filename": path.to_str().unwrap(),
                   "aio": aio});
    let node = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    assert_eq!(node.engine(), Some(aio));
    let id = node.bitmaps().add_anonymous(BLOCK).unwrap();
    node.bitmaps()
        .with_bits(id, |b| b.set(0, BLOCK * BLOCKS))
        .unwrap()
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(1));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (node, stop, counter) = (node.clone(), stop.clone(), counter.clone());
        writers.push(tokio::spawn(async move {
            let mut x = w * 7919 + 1;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let block = (x >> 33) % BLOCKS;
                let stamp = counter.fetch_add(1, Ordering::Relaxed);
                let data = stamp.to_le_bytes().repeat((BLOCK / 8) as usize);
                let (r, _) = node
                    .write(block * BLOCK, IoBuf::from_vec(data), false)
                    .await;
                r.unwrap();
            }
        }));
    }

    // The copier: clear, then read, block after block, many rounds.
    let mut copies = vec![Vec::new(); BLOCKS as usize];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut round = 0;
    while round < 300 || counter.load(Ordering::Relaxed) < 5000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writers made only {} writes in 30 s",
            counter.load(Ordering::Relaxed)
        );
        round += 1;
        for block in 0..BLOCKS {
            let dirty = node
                .bitmaps()
                .with_bits(id, |b| b.get(block * BLOCK))
                .unwrap();
            if !dirty && round > 1 {
                continue;
            }
            node.bitmaps()
                .with_bits(id, |b| b.reset(block * BLOCK, BLOCK))
                .unwrap()
                .unwrap();
            let data = node.read(block * BLOCK, BLOCK as usize).await.unwrap();
            copies[block as usize] = data.into_vec();
        }
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let mut clean = 0;
    for block in 0..BLOCKS {
        let dirty = node
            .bitmaps()
            .with_bits(id, |b| b.get(block * BLOCK))
            .unwrap();
        if !dirty {
            clean += 1;
            let now = node.read(block * BLOCK, BLOCK as usize).await.unwrap();
            assert_eq!(
                now.as_slice(),
                &copies[block as usize][..],
                "block {block} changed after its bit was cleared, and its bit is clear"
            );
        }
    }
    eprintln!("{clean} of {BLOCKS} blocks clean at the end");
}
