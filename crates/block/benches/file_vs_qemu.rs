//! The file driver side by side with `qemu-img bench` on the same file, and
//! the cost of write tracking. Prints markdown tables for
//! `docs/benchmarks.md`.
//!
//! Run: `cargo bench -p block --bench file_vs_qemu` (add `-- file`,
//! `-- tracking`, `-- qcow2`, `-- qcow2-write` or `-- qcow2-bitmap` for one
//! of the tables). Needs `qemu-img` (qemu-utils) and, for the file table's
//! reference row, `fio`.
//!
//! Every figure is the best of three runs (five for qcow2 writes), ours and
//! QEMU's taken in turns (the machine is shared); the ratios compare runs
//! made minutes apart at most, in one process. `BENCH_ROW="WORDS"` runs
//! only the rows of the file and qcow2 tables whose cells hold every word,
//! `BENCH_AIO=ENGINE` only that engine's rows.
//! `BENCH_REPEAT=N` makes every run N times as long (the persistent-bitmap
//! table's fixed cost of logging cold extents then weighs 1/N as much).

#![allow(missing_docs)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use block::{BlockdevOptions, Graph, IoBuf, Node};
use serde_json::json;

const IMAGE: u64 = 256 << 20;
const RUNS: usize = 3;

struct Pattern {
    name: &'static str,
    size: u64,
    step: u64,
    count: u64,
}

impl Pattern {
    /// Requests in one run: `count`, times `BENCH_REPEAT` when set.
    fn requests(&self) -> u64 {
        let repeat = std::env::var("BENCH_REPEAT")
            .ok()
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(1)
            .max(1);
        self.count * repeat
    }
}

const PATTERNS: [Pattern; 2] = [
    Pattern {
        name: "sequential 1 MiB, QD 32",
        size: 1 << 20,
        step: 1 << 20,
        count: 2048,
    },
    Pattern {
        name: "scattered 4 KiB, QD 32",
        size: 4096,
        // A prime number of blocks: visits every block in a scattered order.
        step: 4096 * 7919,
        count: 100_000,
    },
];

const DEPTH: u64 = 32;

/// One `qemu-img bench` run; the time it reports for the run itself.
fn qemu(path: &str, p: &Pattern, write: bool, direct: bool, aio: &str) -> Duration {
    qemu_fmt(path, "raw", p, write, direct, aio)
}

/// One `qemu-img bench` run on an image of `format`.
fn qemu_fmt(
    path: &str,
    format: &str,
    p: &Pattern,
    write: bool,
    direct: bool,
    aio: &str,
) -> Duration {
    let mut args: Vec<String> = [
        "bench",
        "-f",
        format,
        "-c",
        &p.requests().to_string(),
        "-d",
        &DEPTH.to_string(),
        "-s",
        &p.size.to_string(),
        "-S",
        &p.step.to_string(),
        "-t",
        if direct { "none" } else { "writeback" },
        "-i",
        aio,
    ]
    .map(String::from)
    .into();
    if write {
        args.push("-w".into());
    }
    args.push(path.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = testkit::run("qemu-img", &args);
    let secs: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.strip_suffix(" seconds."))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected qemu-img bench output: {text}"));
    Duration::from_secs_f64(secs)
}

/// The same requests through a node, `DEPTH` at a time.
async fn ours(node: &Arc<Node>, p: &Pattern, write: bool) -> Duration {
    let next = Arc::new(AtomicU64::new(0));
    let align = node.limits().memory_alignment;
    let (size, step, count) = (p.size, p.step, p.requests());
    // Writes go out from one buffer, as `qemu-img bench` 10.0 sends every
    // request (its `bench_cb` passes the first of its `nrreq` I/O vectors to
    // each): one hot 1 MiB source rather than 32 cold ones. Touched, as its
    // `memset` touches it, so that the pages are not the kernel's zero page.
    let mut source = IoBuf::zeroed(size as usize, align);
    source.as_mut_slice().fill(std::hint::black_box(0));
    let source = source.shared();
    let start = Instant::now();
    let workers: Vec<_> = (0..DEPTH)
        .map(|_| {
            let (node, next) = (node.clone(), next.clone());
            let source = source.clone();
            tokio::spawn(async move {
                // Reads land in a buffer per worker: our requests own their
                // buffers, and 32 reads into one would not be.
                let mut buf = if write {
                    source
                } else {
                    IoBuf::zeroed(size as usize, align)
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    // A requester spends budget per request, as an export's
                    // socket does. Without it a worker whose reads the page
                    // cache serves never yields: one of the 32 did every
                    // read, into one cache-hot buffer, where `qemu-img
                    // bench` turns over all 32 of its buffers.
                    tokio::task::consume_budget().await;
                    // qemu-img bench 10.0's sequence: the offset advances by
                    // the step and wraps at the image size.
                    let len = node.length();
                    let offset = ((i * step) % len).min(len - size);
                    let (r, b) = if write {
                        node.write(offset, buf, false).await
                    } else {
                        node.read_into(offset, buf).await
                    };
                    r.expect("request succeeds");
                    buf = b;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker finishes");
    }
    start.elapsed()
}

/// Opens the node `v` describes.
fn open(rt: &tokio::runtime::Runtime, v: &serde_json::Value) -> Arc<Node> {
    let options = BlockdevOptions::from_json(v).expect("options");
    rt.block_on(Graph::new().add(&options))
        .expect("the node opens")
}

fn cache_name(direct: bool) -> &'static str {
    if direct {
        "none (O_DIRECT)"
    } else {
        "writeback"
    }
}

/// One table row: the leading cells, then both rates and their ratio.
fn row(cells: &[&str], p: &Pattern, theirs: Duration, mine: Duration) {
    println!(
        "| {} | {} | {} | {:.2} |",
        cells.join(" | "),
        rate(p, theirs),
        rate(p, mine),
        theirs.as_secs_f64() / mine.as_secs_f64()
    );
}

/// Whether the row of `cells` is one to run: `BENCH_AIO=ENGINE` keeps that
/// engine's rows, `BENCH_ROW="WORDS"` the rows whose cells hold every one
/// of the words, whole (`BENCH_ROW="sequential write none"`).
fn wanted_row(cells: &[&str]) -> bool {
    let label = cells.join(" ");
    let aio = std::env::var("BENCH_AIO").map_or(true, |a| cells.contains(&a.as_str()));
    let words = std::env::var("BENCH_ROW").unwrap_or_default();
    aio && words
        .split_whitespace()
        .all(|w| label.split_whitespace().any(|l| l == w))
}

/// The best of `runs` runs of each, taken in turns, so that drift on the
/// shared machine hits both alike.
fn best_in_turns(
    runs: usize,
    mut a: impl FnMut() -> Duration,
    mut b: impl FnMut() -> Duration,
) -> (Duration, Duration) {
    let (mut best_a, mut best_b) = (Duration::MAX, Duration::MAX);
    for _ in 0..runs {
        best_a = best_a.min(a());
        best_b = best_b.min(b());
    }
    (best_a, best_b)
}

fn rate(p: &Pattern, d: Duration) -> String {
    let per_sec = p.requests() as f64 / d.as_secs_f64();
    if p.size >= 1 << 20 {
        format!("{:.0} MiB/s", per_sec * p.size as f64 / f64::from(1 << 20))
    } else {
        format!("{:.0} k IOPS", per_sec / 1000.0)
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("bench.raw");
    // Real data everywhere, so that reads are not served from holes.
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let mut data = Vec::with_capacity(IMAGE as usize);
    while (data.len() as u64) < IMAGE {
        data.extend_from_slice(&chunk);
    }
    std::fs::write(&path, &data).expect("the image is written");
    // The write benchmarks overwrite `bench.raw` with zeroes; qcow2 images
    // are made from this untouched copy, so that they hold real data.
    let source = dir.path().join("source.raw");
    std::fs::write(&source, &data).expect("the source is written");
    drop(data);
    let path = path.to_str().expect("utf-8 path").to_owned();
    let source = source.to_str().expect("utf-8 path").to_owned();

    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |table: &str| only.is_empty() || only.iter().any(|o| o == table);
    if wants("file") {
        file_vs_qemu(&rt, &path);
    }
    if wants("tracking") {
        tracking(&rt, &path);
    }
    if wants("qcow2") {
        qcow2_reads(&rt, &source);
    }
    if wants("qcow2-write") {
        qcow2_writes(&rt, &source);
    }
    if wants("qcow2-bitmap") {
        qcow2_bitmap_cost(&rt, &source);
    }
}

/// Reads from a fully allocated qcow2 image (64 KiB clusters) made from the
/// same data, side by side with `qemu-img bench -f qcow2`.
fn qcow2_reads(rt: &tokio::runtime::Runtime, raw: &str) {
    let image = format!("{raw}.qcow2");
    let made = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2", raw, &image])
        .status()
        .expect("qemu-img runs (install qemu-utils)");
    assert!(made.success(), "qemu-img convert failed");
    println!();
    println!("| qcow2 read pattern | cache | aio | qemu-img bench | bitmirror | ratio |");
    println!("|---|---|---|---|---|---|");
    for p in &PATTERNS {
        for direct in [false, true] {
            for aio in ["threads", "io_uring"] {
                let cells = [p.name, cache_name(direct), aio];
                if !wanted_row(&cells) {
                    continue;
                }
                let v = json!({"driver": "qcow2", "node-name": "q", "read-only": true,
                               "file": {"driver": "file", "filename": image, "aio": aio,
                                        "cache": {"direct": direct}}});
                let node = open(rt, &v);
                let (theirs, mine) = best_in_turns(
                    RUNS,
                    || qemu_fmt(&image, "qcow2", p, false, direct, aio),
                    || rt.block_on(ours(&node, p, false)),
                );
                row(&cells, p, theirs, mine);
            }
        }
    }
}

fn file_vs_qemu(rt: &tokio::runtime::Runtime, path: &str) {
    println!("| pattern | op | cache | aio | qemu-img bench | bitmirror | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for p in &PATTERNS {
        for write in [false, true] {
            for direct in [false, true] {
                for aio in ["threads", "io_uring"] {
                    let op = if write { "write" } else { "read" };
                    let cells = [p.name, op, cache_name(direct), aio];
                    if !wanted_row(&cells) {
                        continue;
                    }
                    let v = json!({"driver": "file", "node-name": "f", "filename": path,
                                   "aio": aio, "cache": {"direct": direct}});
                    let node = open(rt, &v);
                    let (theirs, mine) = best_in_turns(
                        RUNS,
                        || qemu(path, p, write, direct, aio),
                        || rt.block_on(ours(&node, p, write)),
                    );
                    row(&cells, p, theirs, mine);
                }
            }
        }
    }
    fio_reference(rt, path);
}

/// Sequential `O_DIRECT` reads against fio, whose requests each read into
/// a buffer of their own as ours do. `qemu-img bench` reads every request
/// into one buffer (its callback passes the first of its I/O vectors to
/// each), which a virtual disk serves faster; fio is the like-for-like
/// reference for those rows.
fn fio_reference(rt: &tokio::runtime::Runtime, path: &str) {
    let p = &PATTERNS[0];
    let cells = [p.name, "read", cache_name(true), "io_uring"];
    if !wanted_row(&cells) {
        return;
    }
    let v = json!({"driver": "file", "node-name": "f", "filename": path,
                   "aio": "io_uring", "cache": {"direct": true}});
    let node = open(rt, &v);
    let (theirs, mine) = best_in_turns(
        RUNS,
        || fio_read(path, p),
        || rt.block_on(ours(&node, p, false)),
    );
    println!();
    println!("| pattern | op | cache | aio | fio (a buffer per request) | bitmirror | ratio |");
    println!("|---|---|---|---|---|---|---|");
    row(&cells, p, theirs, mine);
}

/// fio's sequential reads of the pattern's requests, `O_DIRECT` on
/// io_uring, all in flight at once; the time they took.
fn fio_read(path: &str, p: &Pattern) -> Duration {
    let out = testkit::run(
        "fio",
        &[
            "--name=reference",
            &format!("--filename={path}"),
            "--rw=read",
            "--direct=1",
            "--ioengine=io_uring",
            &format!("--bs={}", p.size),
            &format!("--iodepth={DEPTH}"),
            &format!("--size={IMAGE}"),
            &format!("--io_size={}", p.requests() * p.size),
            "--output-format=json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("fio's JSON");
    let ms = v["jobs"][0]["read"]["runtime"]
        .as_f64()
        .expect("fio reports a runtime");
    Duration::from_secs_f64(ms / 1000.0)
}

fn tracking(rt: &tokio::runtime::Runtime, path: &str) {
    println!();
    println!("| node | recording bitmaps | 4 KiB scattered writes, QD 32 | vs none |");
    println!("|---|---|---|---|");
    let p = &PATTERNS[1];
    for (label, v) in [
        (
            "null-co",
            json!({"driver": "null-co", "node-name": "n", "size": IMAGE}),
        ),
        (
            "file, io_uring, writeback",
            json!({"driver": "file", "node-name": "n", "filename": path, "aio": "io_uring"}),
        ),
    ] {
        // One node per configuration, measured in interleaved rounds so that
        // a change in the machine's load hits all of them alike.
        let configs = [0, 1, 8];
        let nodes: Vec<Arc<Node>> = configs
            .iter()
            .map(|&bitmaps| {
                let node = open(rt, &v);
                for i in 0..bitmaps {
                    node.bitmaps()
                        .add(&format!("b{i}"), None, false, false)
                        .expect("bitmap added");
                }
                node
            })
            .collect();
        let mut times = vec![Duration::MAX; configs.len()];
        for _ in 0..2 * RUNS {
            for (t, node) in times.iter_mut().zip(&nodes) {
                *t = (*t).min(rt.block_on(ours(node, p, true)));
            }
        }
        for (bitmaps, t) in configs.iter().zip(&times) {
            println!(
                "| {label} | {bitmaps} | {} | {:.2} |",
                rate(p, *t),
                times[0].as_secs_f64() / t.as_secs_f64()
            );
        }
    }
}

/// Writes to a fresh (empty) and to a fully allocated qcow2 image (64 KiB
/// clusters), side by side with `qemu-img bench -w -f qcow2`; each run gets
/// its own copy of the image, so fresh stays fresh.
fn qcow2_writes(rt: &tokio::runtime::Runtime, raw: &str) {
    let allocated = format!("{raw}.full.qcow2");
    let image = format!("{raw}.w.qcow2");
    let made = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2", raw, &allocated])
        .status()
        .expect("qemu-img runs (install qemu-utils)");
    assert!(made.success(), "qemu-img convert failed");
    let fresh = |image: &str| {
        let _ = std::fs::remove_file(image);
        testkit::settle_discards(Path::new(image));
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", image, &IMAGE.to_string()])
            .status()
            .expect("qemu-img runs");
        assert!(made.success(), "qemu-img create failed");
    };
    let copy = |image: &str| {
        std::fs::copy(&allocated, image).expect("the image is copied");
        // On disk before the run: else an `O_DIRECT` run starts by writing
        // back the copy's dirty pages, and times that.
        std::fs::File::open(image)
            .and_then(|f| f.sync_all())
            .expect("the copy is synced");
        // And the blocks the overwritten copy freed are discarded.
        testkit::settle_discards(Path::new(image));
    };
    println!();
    println!("| qcow2 write pattern | image | cache | qemu-img bench | bitmirror | ratio |");
    println!("|---|---|---|---|---|---|");
    for p in &PATTERNS {
        for (state, prepare) in [("fresh", &fresh as &dyn Fn(&str)), ("allocated", &copy)] {
            for direct in [false, true] {
                let cells = [p.name, state, cache_name(direct)];
                if !wanted_row(&cells) {
                    continue;
                }
                let theirs = || {
                    prepare(&image);
                    qemu_fmt(&image, "qcow2", p, true, direct, "threads")
                };
                let mine = || {
                    prepare(&image);
                    let g = Graph::new();
                    let v = json!({"driver": "qcow2", "node-name": "q",
                                   "file": {"driver": "file", "filename": image,
                                            "cache": {"direct": direct}}});
                    let options = BlockdevOptions::from_json(&v).expect("options");
                    let node = rt.block_on(g.add(&options)).expect("the node opens");
                    let took = rt.block_on(ours(&node, p, true));
                    drop(node);
                    rt.block_on(g.close_all()).expect("the image closes");
                    took
                };
                let (theirs, mine) = best_in_turns(5, theirs, mine);
                row(&cells, p, theirs, mine);
            }
        }
    }
}

/// The cost of a persistent recording bitmap (with its activity log) on
/// writes to an allocated qcow2 image: the same run with and without one.
fn qcow2_bitmap_cost(rt: &tokio::runtime::Runtime, raw: &str) {
    let allocated = format!("{raw}.full.qcow2");
    let image = format!("{raw}.b.qcow2");
    let made = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2", raw, &allocated])
        .status()
        .expect("qemu-img runs (install qemu-utils)");
    assert!(made.success(), "qemu-img convert failed");
    println!();
    println!("| qcow2 write pattern | cache | no bitmap | persistent bitmap | ratio |");
    println!("|---|---|---|---|---|");
    for p in &PATTERNS {
        for direct in [false, true] {
            let run = |bitmap: bool| {
                std::fs::copy(&allocated, &image).expect("the image is copied");
                // On disk before the run, as an image at rest is: else the
                // log's first flush writes back the whole copy, and the run
                // with a bitmap times that.
                std::fs::File::open(&image)
                    .and_then(|f| f.sync_all())
                    .expect("the copy is synced");
                testkit::settle_discards(Path::new(&image));
                let g = Graph::new();
                let v = json!({"driver": "qcow2", "node-name": "q",
                               "file": {"driver": "file", "filename": image,
                                        "cache": {"direct": direct}}});
                let options = BlockdevOptions::from_json(&v).expect("options");
                let node = rt.block_on(g.add(&options)).expect("the node opens");
                if bitmap {
                    // As `block-dirty-bitmap-add` does it: stored at once,
                    // and the image's activity log made.
                    rt.block_on(node.add_bitmap("b", None, true, false))
                        .expect("the bitmap is added");
                }
                let took = rt.block_on(ours(&node, p, true));
                drop(node);
                rt.block_on(g.close_all()).expect("the image closes");
                took
            };
            let (without, with) = best_in_turns(5, || run(false), || run(true));
            row(&[p.name, cache_name(direct)], p, without, with);
        }
    }
}
