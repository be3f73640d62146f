//! `kill -9` in the middle of write storms, many rounds on the same image.
//! qcow2: after every kill, `qemu-img check` finds no corruption (leaked
//! clusters are allowed), and everything written before the last completed
//! flush reads back, except where a later request may have changed it; and
//! `qemu-img check` at every point a crash could stop the file writes.
//! Persistent bitmaps (qcow2, and raw with its sidecar) survive every kill
//! as a superset of the writes.
//!
//! The writer is this test binary itself, run again as a child with
//! `--ignored --exact write_storm_child`; the parent kills it at a random
//! moment and judges what it left.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use block::{BlockdevOptions, BoxFuture, Graph, IoBuf, Node, WriteHook, WriteRequest, ZeroFlags};
use serde_json::json;
use testkit::{qemu_img_create_qcow2, require_tool, run};

const SIZE: u64 = 8 << 20;
const IMAGE_ENV: &str = "BITMIRROR_CRASH_IMAGE";
const SEED_ENV: &str = "BITMIRROR_CRASH_SEED";

/// One request of the storm.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Flush,
}

impl Op {
    fn range(self) -> Option<(u64, u64)> {
        match self {
            Op::Write { off, len, .. } | Op::Zero { off, len } | Op::Discard { off, len } => {
                Some((off, off + len))
            }
            Op::Flush => None,
        }
    }
}

/// The storm a seed makes: the same sequence in child and parent.
fn storm(seed: u64, size: u64) -> impl Iterator<Item = Op> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    std::iter::from_fn(move || {
        let kind = next() % 16;
        let off = next() % size;
        let len = (1 + next() % 200_000).min(size - off);
        Some(match kind {
            0 => Op::Flush,
            1 => Op::Zero { off, len },
            2 => Op::Discard { off, len },
            _ => Op::Write {
                off,
                len,
                byte: (next() % 255) as u8 + 1,
            },
        })
    })
}

/// Opens `image` writable (raw if it ends in `.raw`, else qcow2), with
/// discards passed down.
async fn open_rw(g: &Graph, image: &str) -> Arc<Node> {
    let o = json!({"driver": format_of(image), "node-name": "n", "discard": "unmap",
                   "file": {"driver": "file", "filename": image}});
    g.add(&BlockdevOptions::from_json(&o).unwrap())
        .await
        .unwrap()
}

fn format_of(image: &str) -> &'static str {
    if image.ends_with(".raw") {
        "raw"
    } else {
        "qcow2"
    }
}

/// Issues one request of the storm.
async fn apply(node: &Node, op: Op) {
    match op {
        Op::Write { off, len, byte } => {
            let buf = IoBuf::from_vec(vec![byte; len as usize]);
            node.write(off, buf, false).await.0.unwrap();
        }
        Op::Zero { off, len } => {
            let flags = ZeroFlags {
                may_unmap: true,
                ..ZeroFlags::default()
            };
            node.write_zeroes(off, len, flags).await.unwrap();
        }
        Op::Discard { off, len } => node.discard(off, len).await.unwrap(),
        Op::Flush => node.flush().await.unwrap(),
    }
}

/// Run only as the child of [`kill_9_during_a_write_storm`]: writes the
/// storm of `$BITMIRROR_CRASH_SEED` to `$BITMIRROR_CRASH_IMAGE` until killed,
/// printing `S i` before request `i` and `F i` once the flush `i` is done.
#[tokio::test]
#[ignore = "helper: runs as the child of kill_9_during_a_write_storm"]
async fn write_storm_child() {
    storm_until_killed().await;
}

/// The child's work: the storm of the seed, to the image, with progress on
/// standard output.
async fn storm_until_killed() {
    let image = std::env::var(IMAGE_ENV).expect("run by kill_9_during_a_write_storm");
    let seed: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    let g = Graph::new();
    let node = open_rw(&g, &image).await;
    use std::io::Write;
    let mut out = std::io::stdout();
    for (i, op) in storm(seed, node.length()).enumerate() {
        writeln!(out, "S {i}").unwrap();
        out.flush().unwrap();
        apply(&node, op).await;
        if let Op::Flush = op {
            writeln!(out, "F {i}").unwrap();
            out.flush().unwrap();
        }
    }
}

#[test]
fn kill_9_during_a_write_storm() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("crash.qcow2");
    let image = image.to_str().unwrap();
    qemu_img_create_qcow2(image, SIZE, "cluster_size=4096");
    let raw = dir.path().join("now.raw");
    let raw = raw.to_str().unwrap();
    let mut contents = vec![0u8; SIZE as usize];
    let mut flushes_seen = 0;
    for round in 0..12u64 {
        let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(round + 1);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "write_storm_child", "--nocapture"])
            .env(IMAGE_ENV, image)
            .env(SEED_ENV, seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + (seed >> 40) % 400));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        let mut started = None;
        let mut flushed = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            let mut w = line.split_whitespace();
            match (w.next(), w.next().and_then(|n| n.parse::<usize>().ok())) {
                (Some("S"), Some(i)) => started = Some(i),
                (Some("F"), Some(i)) => flushed = Some(i),
                _ => {}
            }
        }
        assert!(
            !status.success(),
            "round {round}: the child ended by itself: {:?}",
            child
                .stderr
                .take()
                .map(|e| std::io::read_to_string(e).unwrap())
        );
        // No corruption; leaks are what a crash may leave.
        let out = Command::new("qemu-img")
            .args(["check", "--output=json", image])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("round {round}: {}", String::from_utf8_lossy(&out.stderr)));
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "round {round}: qemu-img check: {report}"
        );
        assert_eq!(
            report.get("corruptions").map_or(0, |n| n.as_u64().unwrap()),
            0
        );
        assert_eq!(
            report
                .get("check-errors")
                .map_or(0, |n| n.as_u64().unwrap()),
            0
        );
        // What the last completed flush made durable is there, where no
        // later request may have touched it.
        let ops: Vec<Op> = storm(seed, SIZE)
            .take(started.map_or(0, |s| s + 1))
            .collect();
        let durable = flushed.map_or(0, |f| f + 1);
        let mut want = contents.clone();
        for op in &ops[..durable] {
            match *op {
                Op::Write { off, len, byte } => {
                    want[off as usize..(off + len) as usize].fill(byte);
                }
                Op::Zero { off, len } => want[off as usize..(off + len) as usize].fill(0),
                Op::Discard { .. } | Op::Flush => {}
            }
        }
        let mut unsure = vec![false; SIZE as usize];
        for op in ops.iter().skip(durable) {
            if let Some((a, b)) = op.range() {
                unsure[a as usize..b as usize].fill(true);
            }
        }
        // Discarded ranges may read as anything the discard allows.
        for op in &ops[..durable] {
            if let Op::Discard { off, len } = *op {
                unsure[off as usize..(off + len) as usize].fill(true);
            }
        }
        run("qemu-img", &["convert", "-O", "raw", image, raw]);
        let got = std::fs::read(raw).unwrap();
        let wrong = (0..SIZE as usize).find(|&i| !unsure[i] && got[i] != want[i]);
        assert!(
            wrong.is_none(),
            "round {round}: byte {wrong:?} lost (flushed through op {durable} of {})",
            ops.len()
        );
        contents = got;
        flushes_seen += usize::from(flushed.is_some());
    }
    assert!(
        flushes_seen >= 6,
        "only {flushes_seen} rounds got as far as a flush: the storm is too slow to judge"
    );
}

/// Checks a copy of the image file before every write the driver issues:
/// the file as a crash at that moment would leave it.
struct CrashPoints {
    image: String,
    copy: String,
    /// Crash points checked, and the reports of those that were corrupt.
    checked: Mutex<(usize, Vec<String>)>,
}

impl WriteHook for CrashPoints {
    fn before<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async move {
            std::fs::copy(&self.image, &self.copy).unwrap();
            let out = Command::new("qemu-img")
                .args(["check", "--output=json", &self.copy])
                .output()
                .unwrap();
            let mut checked = self.checked.lock().unwrap();
            checked.0 += 1;
            if !matches!(out.status.code(), Some(0 | 3)) {
                let report = String::from_utf8_lossy(&out.stdout).into_owned();
                checked.1.push(report);
            }
            Ok(())
        })
    }

    fn after<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Every point of a storm at which a crash could stop the writes to the
/// image file, metadata write-back included, leaves an image without
/// corruption: the order of writes, not luck, keeps it consistent.
#[tokio::test]
async fn every_crash_point_leaves_a_consistent_image() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let image = path("points.qcow2");
    // 512-byte clusters and 64 KiB of refcounts per block: the storm needs
    // new L2 tables, new refcount blocks and a larger refcount table.
    qemu_img_create_qcow2(&image, 12 << 20, "cluster_size=512");
    let g = Graph::new();
    // Two cached L2 tables: changed ones are written back on eviction all
    // the time, and every such write-back is a crash point too.
    let o = json!({"driver": "qcow2", "node-name": "n", "discard": "unmap",
                   "l2-cache-size": 1024,
                   "file": {"driver": "file", "filename": image}});
    let node = g
        .add(&BlockdevOptions::from_json(&o).unwrap())
        .await
        .unwrap();
    let points = Arc::new(CrashPoints {
        image: image.clone(),
        copy: path("copy.qcow2"),
        checked: Mutex::new((0, Vec::new())),
    });
    let file = node.children()[0].1.node();
    file.add_write_hook(points.clone());
    let mut ops = 0;
    for (i, op) in storm(7, SIZE).take(40).enumerate() {
        ops = i;
        apply(&node, op).await;
    }
    // Fill the tail of the image to make the refcount table grow.
    let (r, _) = node
        .write(9 << 20, IoBuf::from_vec(vec![3; 3 << 20]), false)
        .await;
    r.unwrap();
    node.flush().await.unwrap();
    drop((node, file));
    g.close_all().await.unwrap();
    let (checked, corrupt) = std::mem::take(&mut *points.checked.lock().unwrap());
    assert!(
        corrupt.is_empty(),
        "{} of {checked} crash points corrupt, first: {}",
        corrupt.len(),
        corrupt[0]
    );
    assert!(checked > ops, "only {checked} crash points seen");
}

/// Run only as the child of [`kill_9_keeps_persistent_bitmaps_a_superset`]:
/// the storm of [`write_storm_child`] on an image whose persistent bitmap
/// records it.
#[tokio::test]
#[ignore = "helper: runs as the child of kill_9_keeps_persistent_bitmaps_a_superset"]
async fn bitmap_storm_child() {
    storm_until_killed().await;
}

/// `kill -9` during write storms on a qcow2 image with a persistent
/// recording bitmap, many rounds: after each, the bitmap loads consistent
/// (not "inconsistent", as QEMU would have it) and marks every range a
/// completed request of the round changed: a superset of the writes.
#[test]
fn kill_9_keeps_persistent_bitmaps_a_superset() {
    bitmap_crash_rounds("bitmap.qcow2");
}

/// The same for a raw image, whose bitmaps live in a qcow2 sidecar.
#[test]
fn kill_9_keeps_raw_image_bitmaps_a_superset() {
    bitmap_crash_rounds("bitmap.raw");
}

fn bitmap_crash_rounds(name: &str) {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(name);
    let image = image.to_str().unwrap();
    // Large enough that a round's writes leave most of the bitmap clean.
    let size = 256 << 20;
    if format_of(image) == "raw" {
        std::fs::File::create(image).unwrap().set_len(size).unwrap();
    } else {
        qemu_img_create_qcow2(image, size, "cluster_size=4096");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let g = Graph::new();
        let node = open_rw(&g, image).await;
        node.add_bitmap("b", Some(4096), true, false).await.unwrap();
        g.close_all().await.unwrap();
    });
    let mut checkpoints_crossed = 0;
    for round in 0..10u64 {
        // Each round starts from a clean bitmap, so that what it finds
        // dirty is this round's doing.
        rt.block_on(async {
            let g = Graph::new();
            let node = open_rw(&g, image).await;
            node.bitmaps().clear("b").unwrap();
            g.close_all().await.unwrap();
        });
        let seed = 0x2545_f491_4f6c_dd1du64.wrapping_mul(round + 3);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "bitmap_storm_child", "--nocapture"])
            .env(IMAGE_ENV, image)
            .env(SEED_ENV, seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + (seed >> 40) % 400));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let mut started = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            let mut w = line.split_whitespace();
            match (w.next(), w.next().and_then(|n| n.parse::<usize>().ok())) {
                (Some("S"), Some(i)) => started = Some(i),
                (Some("F"), Some(_)) => checkpoints_crossed += 1,
                _ => {}
            }
        }
        assert!(
            !status.success(),
            "round {round}: the child ended by itself"
        );
        // Every request before the last one started has completed; the last
        // one may have been killed before it reached the image (or after:
        // it cannot be judged).
        let ops: Vec<Op> = storm(seed, size).take(started.unwrap_or(0)).collect();
        let written: Vec<(u64, u64)> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Discard { .. } | Op::Flush => None,
                op => op.range().map(|(a, b)| (a, b - a)),
            })
            .collect();
        let checked = if format_of(image) == "raw" {
            format!("{image}.bitmaps.qcow2")
        } else {
            image.to_owned()
        };
        let out = Command::new("qemu-img")
            .args(["check", "--output=json", &checked])
            .output()
            .unwrap();
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "round {round}: qemu-img check: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Read-only: recovery reads the log and changes nothing.
        rt.block_on(async {
            let g = Graph::new();
            let o = json!({"driver": format_of(image), "node-name": "r", "read-only": true,
                           "file": {"driver": "file", "filename": image}});
            let node = g
                .add(&BlockdevOptions::from_json(&o).unwrap())
                .await
                .unwrap();
            let info = node.bitmaps().info();
            assert!(
                info.len() == 1 && !info[0].inconsistent,
                "round {round}: {info:?}"
            );
            let bits = node.bitmaps().snapshot("b").unwrap();
            for &(off, len) in &written {
                let clean = bits.next_zero(off, off + len);
                assert!(
                    clean.is_none(),
                    "round {round}: {off}+{len} was written but byte {clean:?} is clean"
                );
            }
        });
    }
    assert!(
        checkpoints_crossed >= 5,
        "only {checkpoints_crossed} flushes reached: too slow to judge"
    );
}
