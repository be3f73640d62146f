//! Our `rbd` driver against librbd's own tools and QEMU's rbd driver on the
//! same one-node test cluster, in one run: `rbd bench`, fio's `rbd` engine
//! and `qemu-img bench` (Debian's `qemu-block-extra`). Sequential
//! 4 MiB and random 4 KiB writes and reads, 16 requests in flight, through
//! a `driver=rbd` node of the block layer (bitmaps, write tracking and all)
//! for ours. Prints markdown for `docs/benchmarks.md`: throughput or IOPS,
//! and ours as a ratio of each peer's.
//!
//! Run: `cargo bench -p rbd --bench rbd_vs_peers [-- WORD…]` (words pick
//! workloads by name, e.g. `random write`). The cluster is the
//! tests' (`BITMIRROR_TEST_CEPH_CONF`, or `scripts/ceph-cluster` started on
//! first use). Every figure is the median of `RUNS` runs, the peers' and
//! ours interleaved (the machine is shared).

#![allow(missing_docs)]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use block::{BlockdevOptions, Graph, IoBuf, Node};
use serde_json::{Value, json};
use testkit::{ceph, require_tool, run};

const RUNS: usize = 3;
const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 1 << 30;
const DEPTH: usize = 16;

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    block: u64,
    total: u64,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "sequential write 4 MiB",
        write: true,
        random: false,
        block: 4 * MIB,
        total: 1 << 30,
    },
    Workload {
        name: "sequential read 4 MiB",
        write: false,
        random: false,
        block: 4 * MIB,
        total: 1 << 30,
    },
    Workload {
        name: "random write 4 KiB",
        write: true,
        random: true,
        block: 4096,
        total: 64 * MIB,
    },
    Workload {
        name: "random read 4 KiB",
        write: false,
        random: true,
        block: 4096,
        total: 64 * MIB,
    },
];

/// Operations per second through our node, opened for the run (a writable
/// node holds the image's exclusive lock, which the peers need too).
fn ours(
    rt: &tokio::runtime::Runtime,
    graph: &Graph,
    options: &BlockdevOptions,
    w: Workload,
) -> f64 {
    let node = rt.block_on(graph.add(options)).expect("the rbd node");
    let ops_per_second = run_ours(rt, &node, w);
    drop(node);
    rt.block_on(graph.remove("bench")).expect("the node goes");
    ops_per_second
}

fn run_ours(rt: &tokio::runtime::Runtime, node: &Arc<Node>, w: Workload) -> f64 {
    let ops = w.total / w.block;
    let blocks = IMAGE_SIZE / w.block;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..DEPTH {
            let (node, next) = (node.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = IoBuf::zeroed(w.block as usize, 4096);
                buf.as_mut_slice().fill(0x5a ^ t as u8);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ops {
                        break;
                    }
                    let block = if w.random {
                        // A multiplicative hash spreads the blocks.
                        i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % blocks
                    } else {
                        i % blocks
                    };
                    let (r, b) = if w.write {
                        node.write(block * w.block, buf, false).await
                    } else {
                        node.read_into(block * w.block, buf).await
                    };
                    r.expect("a request");
                    buf = b;
                }
            }));
        }
        for t in tasks {
            t.await.expect("a worker");
        }
        node.flush().await.expect("a flush");
    });
    ops as f64 / start.elapsed().as_secs_f64()
}

/// Operations per second by `rbd bench`.
fn rbd_bench(conf: &str, image: &str, w: Workload) -> f64 {
    let out = run(
        "rbd",
        &[
            "-c",
            conf,
            "bench",
            "--io-type",
            if w.write { "write" } else { "read" },
            "--io-size",
            &w.block.to_string(),
            "--io-threads",
            &DEPTH.to_string(),
            "--io-total",
            &w.total.to_string(),
            "--io-pattern",
            if w.random { "rand" } else { "seq" },
            &format!("{}/{image}", ceph::POOL),
        ],
    );
    // The last line: "elapsed: S  ops: N  ops/sec: X  bytes/sec: …".
    let last = out
        .lines()
        .rev()
        .find(|l| l.contains("ops/sec:"))
        .unwrap_or("");
    let field = last
        .split("ops/sec:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    field.unwrap_or_else(|| panic!("no ops/sec in rbd bench's output: {out}"))
}

/// Operations per second by `qemu-img bench` through QEMU's rbd driver.
/// QEMU's bench has no random pattern: 4 KiB runs stride by a prime
/// number of blocks instead, which visits every block once per pass.
fn qemu_img(conf: &str, image: &str, w: Workload) -> f64 {
    let count = w.total / w.block;
    let step = if w.random { w.block * 7919 } else { w.block };
    let mut args = vec![
        "bench".to_owned(),
        "-f".into(),
        "raw".into(),
        "-c".into(),
        count.to_string(),
        "-d".into(),
        DEPTH.to_string(),
        "-s".into(),
        w.block.to_string(),
        "-S".into(),
        step.to_string(),
    ];
    if w.write {
        args.push("-w".into());
    }
    args.push(format!("rbd:{}/{image}:conf={conf}", ceph::POOL));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-img", &args);
    let seconds: f64 = out
        .split("Run completed in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no time in qemu-img bench's output: {out}"));
    count as f64 / seconds
}

/// Operations per second by fio's `rbd` engine.
fn fio(conf: &str, image: &str, w: Workload) -> f64 {
    require_tool("fio", "fio");
    let out = Command::new("fio")
        .env("CEPH_CONF", conf)
        .args([
            "--output-format=json",
            "--name=bench",
            "--ioengine=rbd",
            "--clientname=admin",
            &format!("--pool={}", ceph::POOL),
            &format!("--rbdname={image}"),
            &format!(
                "--rw={}",
                match (w.write, w.random) {
                    (true, false) => "write",
                    (false, false) => "read",
                    (true, true) => "randwrite",
                    (false, true) => "randread",
                }
            ),
            &format!("--bs={}", w.block),
            &format!("--iodepth={DEPTH}"),
            &format!("--io_size={}", w.total),
            &format!("--size={IMAGE_SIZE}"),
            "--invalidate=0",
            "--norandommap",
        ])
        .output()
        .expect("fio runs");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("fio's JSON");
    let side = if w.write { "write" } else { "read" };
    v["jobs"][0][side]["iops"]
        .as_f64()
        .unwrap_or_else(|| panic!("no iops in fio's output: {v}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rate(w: Workload, ops: f64) -> String {
    if w.random {
        format!("{ops:.0} IOPS")
    } else {
        format!("{:.0} MB/s", ops * w.block as f64 / 1e6)
    }
}

fn main() {
    // Every client reads one configuration, so that librbd's cache works
    // alike for all: write-back from the first request. (Its default,
    // write-through until the first flush, favoured whichever client had
    // flushed before, and the `rbd` tool, which starts in write-back.)
    let conf = {
        let cluster = ceph::conf();
        let text = std::fs::read_to_string(&cluster).expect("the cluster's ceph.conf");
        let bench = std::env::temp_dir().join(format!("rbd-bench-{}.conf", std::process::id()));
        let text = text.replacen(
            "[global]\n",
            "[global]\nrbd cache writethrough until flush = false\n",
            1,
        );
        std::fs::write(&bench, text).expect("a bench ceph.conf");
        bench.to_string_lossy().into_owned()
    };
    let image = ceph::image_name("bench");
    ceph::rbd(&[
        "create",
        "--size",
        &(IMAGE_SIZE / MIB).to_string(),
        &format!("{}/{image}", ceph::POOL),
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let graph = Graph::new();
    rbd::RbdFactory::register(&graph);
    let options = BlockdevOptions::from_json(&json!({
        "driver": "rbd", "node-name": "bench", "pool": ceph::POOL, "image": image,
        "conf": conf,
    }))
    .expect("options");

    println!(
        "| workload | bitmirror | rbd bench | fio rbd | qemu-img bench | vs rbd bench | vs fio | vs QEMU |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Arguments pick workloads by a word of their name ("random", "write").
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for w in WORKLOADS {
        if !wanted.iter().all(|word| w.name.contains(word.as_str())) {
            continue;
        }
        let (mut o, mut r, mut f, mut q) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            r.push(rbd_bench(&conf, &image, w));
            o.push(ours(&rt, &graph, &options, w));
            f.push(fio(&conf, &image, w));
            q.push(qemu_img(&conf, &image, w));
        }
        let (o, r, f, q) = (median(o), median(r), median(f), median(q));
        println!(
            "| {} | {} | {} | {} | {} | {:.2}× | {:.2}× | {:.2}× |",
            w.name,
            rate(w, o),
            rate(w, r),
            rate(w, f),
            rate(w, q),
            o / r,
            o / f,
            o / q
        );
    }
    ceph::remove(&image);
    let _ = std::fs::remove_file(&conf);
}
