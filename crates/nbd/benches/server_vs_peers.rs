//! Our NBD server side by side with `qemu-nbd` and `nbdkit file` serving the
//! same 4 GiB raw file, driven by the same clients (`nbdcopy`,
//! `qemu-img convert`, and for random 4 KiB requests at QD 16 our client
//! and fio's `nbd` engine, which is libnbd's).
//! Each server runs as its own process; its CPU time (user + system, from
//! `/proc/PID/stat`) is measured around every run. Prints markdown tables
//! for `docs/benchmarks.md`.
//!
//! Run: `cargo bench -p nbd --bench server_vs_peers` (add `-- buffered` or
//! `-- direct` for one cache mode, and a second word to pick the rows whose
//! names contain it). The file lives in `$BENCH_DIR` (default `/var/tmp`);
//! it needs 8 GiB free. `NBD_BENCH_PEERS=bitmirror` (or a comma-separated
//! list of `bitmirror`, `qemu-nbd`, `nbdkit`) runs only those servers, to
//! profile one alone; the others' columns then read `—`.
//!
//! Every figure is the best of `RUNS` runs (`NBD_BENCH_RUNS` to change it;
//! the machine is shared), the three servers taking theirs in turns; the
//! table also gives, per row, the median over the turns of our rate ÷ the
//! best peer's in the same turn. Each run's time and the CPU of both sides
//! (server, and client: this process or the client program) go to stderr
//! as they come.
//!
//! To weigh a change against the build before in the same turns:
//! `NBD_BENCH_ALT='VAR=value …'` adds a fourth server, ours again with
//! that environment, and `NBD_BENCH_ALT_EXE=path` runs it from another
//! build of this benchmark; its per-turn ratio goes to stderr.

#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use block::{BlockdevOptions, Graph, IoBuf, SocketAddress};
use nbd::{Client, ClientOptions, ExportOptions, ListenAddr, Server, ServerOptions};
use serde_json::json;

const SIZE: u64 = 4 << 30;
const GIB: f64 = (1u64 << 30) as f64;
const RUNS: usize = 3;
const RANDOM_OPS: u64 = 200_000;
const DEPTH: u64 = 16;

/// The server process of one row.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Peer {
    Ours,
    QemuNbd,
    Nbdkit,
    /// Our server again, with `NBD_BENCH_ALT`'s environment (`K=V`
    /// words) and `NBD_BENCH_ALT_EXE`'s binary (default: this one), to
    /// weigh a change against the build before in the same turns. Not in
    /// the table: its per-turn ratio goes to stderr.
    Alt,
}

const PEERS: [Peer; 4] = [Peer::Ours, Peer::QemuNbd, Peer::Nbdkit, Peer::Alt];
/// The servers we are weighed against.
const OTHERS: [Peer; 2] = [Peer::QemuNbd, Peer::Nbdkit];

impl Peer {
    /// Its place in [`PEERS`] (and in the arrays of results per server).
    fn index(self) -> usize {
        match self {
            Peer::Ours => 0,
            Peer::QemuNbd => 1,
            Peer::Nbdkit => 2,
            Peer::Alt => 3,
        }
    }

    /// Whether `NBD_BENCH_PEERS` (when set) names this server.
    fn wanted(self) -> bool {
        if self == Peer::Alt {
            return std::env::var_os("NBD_BENCH_ALT").is_some();
        }
        std::env::var("NBD_BENCH_PEERS").map_or(true, |list| {
            list.split(',')
                .any(|w| !w.is_empty() && self.name().starts_with(w.trim()))
        })
    }

    fn name(self) -> &'static str {
        match self {
            Peer::Ours => "bitmirror",
            Peer::QemuNbd => "qemu-nbd",
            Peer::Nbdkit => "nbdkit file",
            Peer::Alt => "bitmirror (alt)",
        }
    }

    fn start(self, file: &Path, sock: &Path, direct: bool) -> Child {
        let _ = std::fs::remove_file(sock);
        let (f, s) = (file.to_str().unwrap(), sock.to_str().unwrap());
        let mut cmd = match self {
            Peer::Ours | Peer::Alt => {
                let exe = match std::env::var_os("NBD_BENCH_ALT_EXE") {
                    Some(exe) if self == Peer::Alt => PathBuf::from(exe),
                    _ => std::env::current_exe().unwrap(),
                };
                let mut c = Command::new(exe);
                c.env("NBD_BENCH_SERVE", format!("{s}|{f}|{}", u8::from(direct)));
                if self == Peer::Alt {
                    let env = std::env::var("NBD_BENCH_ALT").unwrap_or_default();
                    for (k, v) in env.split_whitespace().filter_map(|w| w.split_once('=')) {
                        c.env(k, v);
                    }
                }
                c
            }
            Peer::QemuNbd => {
                let mut c = Command::new("qemu-nbd");
                c.args(["-t", "-e", "16", "-k", s, "-f", "raw"]);
                if direct {
                    c.args(["--cache=none", "--aio=native"]);
                }
                c.arg(f);
                c
            }
            Peer::Nbdkit => {
                let mut c = Command::new("nbdkit");
                c.args(["--foreground", "--unix", s, "file", f]);
                if direct {
                    // nbdkit's file plugin has no O_DIRECT; this is its
                    // closest setting (page cache dropped behind requests).
                    c.arg("cache=none");
                }
                c
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "{} did not listen", self.name());
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }
}

/// User + system CPU seconds of a process so far; with `children`, also
/// those of the children it waited for (the clients this bench ran).
fn cpu_seconds_of(pid: u32, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let fields = if children { 11..15 } else { 11..13 };
    let ticks: u64 = f[fields].iter().map(|t| t.parse::<u64>().unwrap()).sum();
    ticks as f64 / 100.0
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(pid, false)
}

/// CPU seconds of the client side so far: this process (our client) and
/// the client programs it ran and waited for.
fn client_cpu_seconds() -> f64 {
    cpu_seconds_of(std::process::id(), true)
}

/// The in-process server the bench re-executes itself as.
fn serve(spec: &str) {
    let parts: Vec<&str> = spec.split('|').collect();
    let (sock, file, direct) = (parts[0], parts[1], parts[2] == "1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let graph = Graph::new();
        let o = BlockdevOptions::from_json(&json!({"driver": "raw", "node-name": "disk",
            "file": {"driver": "file", "filename": file, "cache": {"direct": direct},
                // With O_DIRECT, each side's asynchronous engine (qemu-nbd
                // runs `--aio=native`); buffered, the default threads.
                "aio": if direct { "io_uring" } else { "threads" }}}))
        .unwrap();
        let node = graph.add(&o).await.unwrap();
        let server = Server::new(ServerOptions::default());
        server
            .add_export(
                &node,
                ExportOptions {
                    id: "disk".into(),
                    name: String::new(),
                    description: None,
                    writable: true,
                    bitmaps: vec![],
                    allocation_depth: false,
                },
            )
            .unwrap();
        server
            .listen(&ListenAddr::Unix(PathBuf::from(sock)))
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
}

/// Drops the page cache's clean pages of `file` (after a `sync`, all of
/// them).
fn drop_cached(file: &Path) {
    let f = std::fs::File::open(file).expect("the served file opens");
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .expect("the kernel takes the advice");
}

/// Random 4 KiB requests at QD 16 with our client; returns the time taken.
fn random_4k(rt: &tokio::runtime::Runtime, sock: &Path, write: bool) -> Duration {
    rt.block_on(async {
        let client = Arc::new(
            Client::connect(&ClientOptions {
                server: SocketAddress::Unix {
                    path: sock.to_str().unwrap().into(),
                },
                export: String::new(),
                contexts: vec![],
                tls: None,
                tls_hostname: None,
            })
            .await
            .unwrap(),
        );
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..DEPTH)
            .map(|w| {
                let (client, next) = (client.clone(), next.clone());
                tokio::spawn(async move {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ w;
                    let data = vec![0x5au8; 4096];
                    let mut buf = IoBuf::zeroed(4096, 1);
                    while next.fetch_add(1, Ordering::Relaxed) < RANDOM_OPS {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let offset = (x % (SIZE / 4096)) * 4096;
                        if write {
                            client.write(offset, &data, false).await.unwrap();
                        } else {
                            let (r, b) = client.read(offset, buf).await;
                            r.unwrap();
                            buf = b;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let took = start.elapsed();
        client.disconnect().await;
        took
    })
}

/// Random 4 KiB requests at QD 16 from fio's `nbd` engine (libnbd), one
/// connection; returns the time fio's own rate gives for `RANDOM_OPS`.
fn fio_4k(uri: &str, write: bool) -> Duration {
    let out = testkit::run(
        "fio",
        &[
            "--name=random",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            if write {
                "--rw=randwrite"
            } else {
                "--rw=randread"
            },
            "--bs=4k",
            &format!("--iodepth={DEPTH}"),
            &format!("--number_ios={RANDOM_OPS}"),
            &format!("--size={SIZE}"),
            "--randrepeat=0",
            "--output-format=json",
        ],
    );
    // fio says "connected to NBD server" on stdout before its JSON.
    let json = &out[out.find('{').expect("fio's JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio's JSON");
    let iops = v["jobs"][0][if write { "write" } else { "read" }]["iops"]
        .as_f64()
        .filter(|i| *i > 0.0)
        .unwrap_or_else(|| panic!("no rate in fio's output: {v}"));
    Duration::from_secs_f64(RANDOM_OPS as f64 / iops)
}

struct Row {
    name: &'static str,
    /// Bytes (or operations) per run.
    amount: f64,
    unit: &'static str,
    /// Best time and the server CPU seconds of that run, per peer (`None`
    /// for a server not run).
    results: Vec<Option<(Duration, f64)>>,
    /// Ours ÷ the best peer, turn by turn ([`turn_ratios`]).
    per_turn: Option<PerTurn>,
}

fn main() {
    if let Ok(spec) = std::env::var("NBD_BENCH_SERVE") {
        serve(&spec);
        return;
    }
    let mut filters = std::env::args().skip(1).filter(|a| !a.starts_with('-'));
    let filter: Option<String> = filters.next();
    // A second word picks the workloads whose names contain it.
    let rows_wanted: Option<String> = filters.next();
    for tool in ["qemu-nbd", "nbdkit", "nbdcopy", "qemu-img", "fio"] {
        testkit::require_tool(
            tool,
            if tool == "nbdcopy" {
                "libnbd-bin"
            } else {
                tool
            },
        );
    }
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(base).unwrap();
    let file = dir.path().join("disk.raw");
    let source = dir.path().join("source.raw");
    let sock = dir.path().join("nbd.sock");
    // The files an earlier run deleted may still be being discarded.
    testkit::settle_discards(&file);
    eprintln!("writing {} GiB of data…", SIZE >> 30);
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 1u64;
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&source).unwrap());
        for _ in 0..SIZE >> 20 {
            for b in chunk.chunks_mut(8) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            f.write_all(&chunk).unwrap();
        }
    }
    std::fs::copy(&source, &file).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let (f, src) = (file.to_str().unwrap(), source.to_str().unwrap());
    for direct in [false, true] {
        let mode = if direct { "direct" } else { "buffered" };
        if filter.as_deref().is_some_and(|f| f != mode) {
            continue;
        }
        type Job<'a> = Box<dyn Fn() -> Duration + 'a>;
        let timed = |program: &'static str, args: Vec<String>| -> Job<'_> {
            Box::new(move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                let t = Instant::now();
                testkit::run(program, &a);
                t.elapsed()
            })
        };
        let jobs: Vec<(&'static str, f64, &'static str, Job)> = vec![
            (
                "sequential read, nbdcopy → null:",
                SIZE as f64,
                "MB/s",
                timed("nbdcopy", vec![uri.clone(), "null:".into()]),
            ),
            (
                "sequential write, nbdcopy file →",
                SIZE as f64,
                "MB/s",
                timed("nbdcopy", vec![src.into(), uri.clone()]),
            ),
            (
                "sequential read, qemu-img convert → null-co",
                SIZE as f64,
                "MB/s",
                timed(
                    "qemu-img",
                    vec![
                        "convert".into(),
                        "-n".into(),
                        "-f".into(),
                        "raw".into(),
                        uri.clone(),
                        "--target-image-opts".into(),
                        format!("driver=null-co,size={SIZE}"),
                    ],
                ),
            ),
            (
                "sequential write, qemu-img convert file →",
                SIZE as f64,
                "MB/s",
                timed(
                    "qemu-img",
                    vec![
                        "convert".into(),
                        "-n".into(),
                        "-f".into(),
                        "raw".into(),
                        "-O".into(),
                        "raw".into(),
                        src.into(),
                        uri.clone(),
                    ],
                ),
            ),
            (
                "random 4 KiB read, QD 16",
                RANDOM_OPS as f64,
                "IOPS",
                Box::new(|| random_4k(&rt, &sock, false)),
            ),
            (
                "random 4 KiB write, QD 16",
                RANDOM_OPS as f64,
                "IOPS",
                Box::new(|| random_4k(&rt, &sock, true)),
            ),
            (
                "random 4 KiB read, QD 16, fio (libnbd)",
                RANDOM_OPS as f64,
                "IOPS",
                Box::new(|| fio_4k(&uri, false)),
            ),
            (
                "random 4 KiB write, QD 16, fio (libnbd)",
                RANDOM_OPS as f64,
                "IOPS",
                Box::new(|| fio_4k(&uri, true)),
            ),
        ];
        let mut rows = Vec::new();
        for (name, amount, unit, job) in &jobs {
            if rows_wanted.as_deref().is_some_and(|w| !name.contains(w)) {
                continue;
            }
            // The servers take their runs in turns (each started afresh),
            // so that a slow spell of the machine falls on all of them.
            let mut best: [Option<(Duration, f64)>; PEERS.len()] = [None; PEERS.len()];
            let runs = std::env::var("NBD_BENCH_RUNS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(RUNS);
            // Each turn's times, for the per-turn ratios.
            let mut turns = Vec::new();
            for k in 0..runs {
                let mut turn = [None; PEERS.len()];
                // Each turn starts with the next server: none always
                // comes first (or right after a given other).
                for i in (0..PEERS.len()).map(|i| (i + k) % PEERS.len()) {
                    let peer = PEERS[i];
                    let best = &mut best[peer.index()];
                    if !peer.wanted() {
                        continue;
                    }
                    // Every run starts with nothing dirty: the files this
                    // benchmark wrote and the runs before it (the last
                    // server's writes too) are written back first, not
                    // beside whichever server comes next.
                    testkit::run("sync", &[]);
                    if direct {
                        // And nothing of the served file cached: the
                        // first `O_DIRECT` server of a row would otherwise
                        // pay for dropping what the runs before it left.
                        drop_cached(Path::new(f));
                    }
                    let mut child = peer.start(Path::new(f), &sock, direct);
                    let (c0, k0) = (cpu_seconds(child.id()), client_cpu_seconds());
                    let t = job();
                    let cpu = cpu_seconds(child.id()) - c0;
                    eprintln!(
                        "  {}: {t:.3?}, server {cpu:.2} s CPU, client {:.2} s",
                        peer.name(),
                        client_cpu_seconds() - k0
                    );
                    turn[peer.index()] = Some(t);
                    let _ = child.kill();
                    let _ = child.wait();
                    if best.is_none_or(|b| t < b.0) {
                        *best = Some((t, cpu));
                    }
                }
                turns.push(turn);
            }
            if let Some(alt) = turn_ratios(&turns, Peer::Alt) {
                eprintln!("{mode} {name}: bitmirror (alt) ÷ best peer per turn: {alt}");
            }
            let mut results = Vec::new();
            for (peer, best) in PEERS.iter().zip(best) {
                // (None: a server left out by `NBD_BENCH_PEERS`.)
                if let Some((t, cpu)) = best {
                    eprintln!("{mode} {name} {}: {t:?}, {cpu:.1} s CPU", peer.name());
                }
                results.push(best);
            }
            let per_turn = turn_ratios(&turns, Peer::Ours);
            if let Some(p) = per_turn {
                eprintln!("{mode} {name}: bitmirror ÷ best peer per turn: {p}");
            }
            rows.push(Row {
                name,
                amount: *amount,
                unit,
                results,
                per_turn,
            });
        }
        print_table(mode, &rows);
    }
}

/// Over the turns where `peer` (ours or the alternative) and a peer ran:
/// the median of its rate ÷ the best peer's rate in the same turn, the
/// lowest and the highest, and how many turns. Steadier than the ratio of
/// the bests when the machine's speed drifts between turns: a lucky run
/// of one server does not decide the row alone.
fn turn_ratios(turns: &[[Option<Duration>; PEERS.len()]], peer: Peer) -> Option<PerTurn> {
    let mut ratios: Vec<f64> = turns
        .iter()
        .filter_map(|t| {
            let ours = t[peer.index()]?;
            let best = OTHERS.iter().filter_map(|p| t[p.index()]).min()?;
            Some(best.as_secs_f64() / ours.as_secs_f64())
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = match n {
        0 => return None,
        _ if n % 2 == 1 => ratios[n / 2],
        _ => (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0,
    };
    Some(PerTurn {
        median,
        low: ratios[0],
        high: ratios[n - 1],
        turns: n,
    })
}

/// See [`turn_ratios`].
#[derive(Clone, Copy)]
struct PerTurn {
    median: f64,
    low: f64,
    high: f64,
    turns: usize,
}

impl std::fmt::Display for PerTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} ({:.2}–{:.2}, {})",
            self.median, self.low, self.high, self.turns
        )
    }
}

fn print_table(mode: &str, rows: &[Row]) {
    println!("\n#### {mode}\n");
    println!(
        "| workload | bitmirror | qemu-nbd | nbdkit file | ours ÷ best peer | per turn: median (range, turns) | server CPU s/GiB (or per 100k ops): bitmirror / qemu-nbd / nbdkit |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let rate = |d: Duration| {
            let per_s = r.amount / d.as_secs_f64();
            if r.unit == "MB/s" { per_s / 1e6 } else { per_s }
        };
        let rates: Vec<Option<f64>> = r.results.iter().map(|x| x.map(|(d, _)| rate(d))).collect();
        let shown =
            |x: Option<f64>, digits: usize| x.map_or("—".to_owned(), |v| format!("{v:.digits$}"));
        let best_peer = OTHERS
            .iter()
            .filter_map(|p| rates[p.index()])
            .max_by(f64::total_cmp);
        let ratio = rates[Peer::Ours.index()]
            .zip(best_peer)
            .map(|(ours, peer)| ours / peer);
        // (The alternative build is not in the table.)
        let cpu: Vec<String> = [Peer::Ours, Peer::QemuNbd, Peer::Nbdkit]
            .iter()
            .map(|p| r.results[p.index()])
            .map(|x| {
                shown(
                    x.map(|(_, c)| {
                        if r.unit == "MB/s" {
                            c / (r.amount / GIB)
                        } else {
                            c / (r.amount / 100_000.0)
                        }
                    }),
                    2,
                )
            })
            .collect();
        println!(
            "| {} ({}) | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.unit,
            shown(rates[Peer::Ours.index()], 0),
            shown(rates[Peer::QemuNbd.index()], 0),
            shown(rates[Peer::Nbdkit.index()], 0),
            shown(ratio, 2),
            r.per_turn.map_or("—".to_owned(), |p| p.to_string()),
            cpu.join(" / ")
        );
    }
}
