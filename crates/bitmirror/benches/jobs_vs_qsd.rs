//! Mirror and backup jobs side by side with qemu-storage-daemon, in one
//! run: the same source, the same target, the same QMP command, each
//! daemon its own process. Reports the time to READY, the daemons' CPU time
//! (user + system, from `/proc/PID/stat`), the target's allocation and the
//! latency a guest writing through the source's NBD export sees, as ratios
//! to QEMU's (or, for `sync=bitmap`, which QEMU lacks, to a plain
//! `pread`/`pwrite` loop over the same blocks). Prints markdown for
//! `docs/benchmarks.md`.
//!
//! Run: `cargo bench -p bitmirror --bench jobs_vs_qsd [-- CASE...]` with
//! mirror cases `full`, `direct`, `sparse`, `nbd`, `bitmap`, `latency` and
//! backup cases `backup-full`, `backup-incremental`, `backup-latency`, and
//! `migrate` (`bitmirror migrate`, incremental against full), and `tls`
//! (NBD over TLS against plain, ours and `qemu-nbd`'s; all by default). Files live in `$BENCH_DIR` (default `/var/tmp`); it needs
//! 40 GiB of (mostly sparse) room. Every figure is the best of `RUNS` runs
//! (the machine is shared); with `BENCH_ROUNDS=N` (N > 1) the `full` and
//! `latency` cases instead take N rounds, QEMU and ours in turns, and show
//! the medians of each daemon's figures and of the per-round ratios, with
//! their ranges; so do `backup-incremental` and `bitmap`, with the loop
//! in its turn, `nbd`, with the source's floor in its turn, and `sparse`
//! and `direct`.

#![allow(missing_docs)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use block::SocketAddress;
use nbd::client::{Client, ClientOptions};
use serde_json::{Value, json};
use testkit::{Qmp, StorageDaemon, run};

const RUNS: usize = 2;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// How long a job may take before the benchmark gives up on it.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// The guest's writes: random 64 KiB blocks at 50 MB/s.
const GUEST_BLOCK: u64 = 64 << 10;
const GUEST_RATE: f64 = 50e6;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Ours,
    Qemu,
}

impl Daemon {
    fn name(self) -> &'static str {
        match self {
            Daemon::Ours => "bitmirror serve",
            Daemon::Qemu => "qemu-storage-daemon",
        }
    }

    fn start(self, dir: &Path, args: &[String]) -> StorageDaemon {
        let dir = dir.join(self.name().replace(' ', "-"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a daemon directory");
        match self {
            Daemon::Ours => StorageDaemon::start_program(
                Path::new(env!("CARGO_BIN_EXE_bitmirror")),
                &["serve"],
                &dir,
                args,
            ),
            Daemon::Qemu => StorageDaemon::start(&dir, args),
        }
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (user + system) the calling thread has used.
fn thread_cpu_seconds() -> f64 {
    stat_cpu_seconds("/proc/thread-self/stat")
}

/// CPU seconds the whole machine has been busy (user, nice, system, irq
/// and softirq time of every core, from `/proc/stat`): with the kernel's
/// own threads, such as the flusher writing back a buffered target.
fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq ...
    (at(0) + at(1) + at(2) + at(5) + at(6)) / 100.0
}

/// User + system time from a `/proc` `stat` file, in seconds.
fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

/// `--blockdev` options of a raw node over a file, plus `extra` file options.
fn raw_node(name: &str, path: &Path, extra: &str) -> [String; 2] {
    [
        "--blockdev".into(),
        format!(
            "driver=raw,node-name={name},file.driver=file,file.filename={},file.aio=threads{extra}",
            path.display()
        ),
    ]
}

/// A fresh sparse file of `size` bytes.
/// A fresh sparse file of `size` bytes at `path`. An old file there is
/// removed first and its blocks' release waited for: on a file system
/// mounted with `discard` (this machine's root) freeing gigabytes sends the
/// device discards from a kernel worker for a while, which would weigh on
/// whichever daemon runs next.
fn sparse_file(path: &Path, size: u64) {
    if std::fs::remove_file(path).is_ok() {
        run("sync", &[]);
        testkit::settle_discards(path);
    }
    let f = std::fs::File::create(path).expect("a target file");
    f.set_len(size).expect("a sparse target");
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Waits for the only job's `BLOCK_JOB_READY` (up to [`JOB_TIMEOUT`]).
fn wait_ready(qmp: &mut Qmp, who: &str) {
    loop {
        // Events, not polling: a poll's interval would add up to itself to
        // each daemon's time, which the loops it is compared with do not pay.
        let event = qmp.next_event(JOB_TIMEOUT);
        match event["event"].as_str() {
            Some("BLOCK_JOB_READY") => return,
            Some("BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED") => {
                panic!("{who}: the mirror ended early: {event}")
            }
            _ => {}
        }
    }
}

fn mirror_args(extra: Value) -> Value {
    let mut a = json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full"});
    if let (Some(a), Some(e)) = (a.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    a
}

fn cancel_and_quit(qmp: &mut Qmp, daemon: &mut StorageDaemon) {
    let _ = qmp.execute("block-job-cancel", json!({"device": "m", "force": true}));
    qmp.execute_ok("quit", json!({}));
    let _ = daemon.wait_exit();
}

struct Outcome {
    wall: f64,
    cpu: f64,
    /// The NBD server's CPU, when the target is on another daemon.
    peer_cpu: f64,
    /// The whole machine's busy CPU over the same span.
    machine: f64,
    allocated: u64,
}

/// One local mirror of `source` into a fresh sparse raw target, until READY.
fn mirror_local(who: Daemon, dir: &Path, source: &Path, size: u64, extra: &str) -> Outcome {
    let target = dir.join("target.raw");
    sparse_file(&target, size);
    let mut args = raw_node("src", source, extra).to_vec();
    args.extend(raw_node("dst", &target, extra));
    let mut daemon = who.start(dir, &args);
    let mut qmp = daemon.qmp();
    let (cpu0, machine0) = (cpu_seconds(daemon.pid()), machine_cpu_seconds());
    let start = Instant::now();
    qmp.execute_ok("blockdev-mirror", mirror_args(json!({})));
    wait_ready(&mut qmp, who.name());
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(daemon.pid()) - cpu0;
    let machine = machine_cpu_seconds() - machine0;
    cancel_and_quit(&mut qmp, &mut daemon);
    Outcome {
        wall,
        cpu,
        peer_cpu: 0.0,
        machine,
        allocated: allocated(&target),
    }
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One mirror of `source` into an NBD export of a second daemon of the
/// same kind over TCP on loopback, until READY.
fn mirror_nbd(who: Daemon, dir: &Path, source: &Path, size: u64) -> Outcome {
    let target = dir.join("target.raw");
    sparse_file(&target, size);
    let port = free_port();
    let mut args = raw_node("dst", &target, "").to_vec();
    args.extend([
        "--nbd-server".into(),
        format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "--export".into(),
        "type=nbd,id=e,node-name=dst,name=t,writable=on".into(),
    ]);
    let peer_dir = dir.join("peer");
    let _ = std::fs::create_dir_all(&peer_dir);
    let mut peer = who.start(&peer_dir, &args);
    let mut daemon = who.start(dir, &raw_node("src", source, ""));
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "dst", "export": "t",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
    );
    let (cpu0, peer0) = (cpu_seconds(daemon.pid()), cpu_seconds(peer.pid()));
    let machine0 = machine_cpu_seconds();
    let start = Instant::now();
    qmp.execute_ok("blockdev-mirror", mirror_args(json!({})));
    wait_ready(&mut qmp, who.name());
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(daemon.pid()) - cpu0;
    let peer_cpu = cpu_seconds(peer.pid()) - peer0;
    let machine = machine_cpu_seconds() - machine0;
    cancel_and_quit(&mut qmp, &mut daemon);
    peer.qmp().execute_ok("quit", json!({}));
    let _ = peer.wait_exit();
    Outcome {
        wall,
        cpu,
        peer_cpu,
        machine,
        allocated: allocated(&target),
    }
}

/// `BENCH_ROUNDS`: how many rounds the cases that take rounds take (see
/// the top of the file; 1 when unset or not a number above 0).
fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// The median of `v` (NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median of `v`, and its range when it has more than one value.
fn spread(v: Vec<f64>, digits: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let many = v.len() > 1;
    let m = median(v);
    match many {
        true => format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})"),
        false => format!("{m:.digits$}"),
    }
}

/// The times of `(time, CPU)` runs.
fn times(runs: &[(f64, f64)]) -> Vec<f64> {
    runs.iter().map(|r| r.0).collect()
}

/// The CPU seconds of `(time, CPU)` runs.
fn cpus(runs: &[(f64, f64)]) -> Vec<f64> {
    runs.iter().map(|r| r.1).collect()
}

/// The fastest of `(time, CPU)` runs.
fn fastest(runs: &[(f64, f64)]) -> (f64, f64) {
    runs.iter()
        .copied()
        .fold((f64::INFINITY, 0.0), |a, b| if b.0 < a.0 { b } else { a })
}

fn best(mut once: impl FnMut() -> Outcome) -> Outcome {
    let mut best: Option<Outcome> = None;
    for _ in 0..RUNS {
        let o = once();
        if best.as_ref().is_none_or(|b| o.wall < b.wall) {
            best = Some(o);
        }
    }
    best.unwrap_or(Outcome {
        wall: f64::NAN,
        cpu: f64::NAN,
        peer_cpu: f64::NAN,
        machine: f64::NAN,
        allocated: 0,
    })
}

/// Rows of one local case, QEMU first; with `floors`, also two plain
/// one-thread copy loops as yardsticks (time to the end of their
/// `fdatasync` against time to READY, which includes the target's flush).
fn local_case(case: &str, dir: &Path, source: &Path, size: u64, extra: &str, floors: bool) {
    if rounds() > 1 {
        return local_case_in_rounds(case, dir, source, size, extra, floors);
    }
    let qemu = best(|| mirror_local(Daemon::Qemu, dir, source, size, extra));
    let ours = best(|| mirror_local(Daemon::Ours, dir, source, size, extra));
    let mut rows = vec![(Daemon::Qemu.name(), qemu), (Daemon::Ours.name(), ours)];
    if floors {
        for (name, how) in [
            ("pread/pwrite loop, 1 MiB, one thread", Floor::ReadWrite),
            (
                "copy_file_range loop, 1 MiB, one thread",
                Floor::CopyFileRange,
            ),
        ] {
            rows.push((name, best(|| copy_floor(dir, source, size, how))));
        }
    }
    let qemu = (rows[0].1.wall, rows[0].1.cpu.max(0.01), rows[0].1.machine);
    for (who, o) in &rows {
        println!(
            "| {case} | {who} | {:.2} s | {:.2} s | {:.2} GiB | {:.2} | {:.2} | {:.2} s | {:.2} |",
            o.wall,
            o.cpu,
            o.allocated as f64 / GIB as f64,
            o.wall / qemu.0,
            o.cpu / qemu.1,
            o.machine,
            o.machine / qemu.2.max(0.01),
        );
    }
}

/// [`local_case`] in [`rounds`]: QEMU and ours (and with `floors`, a
/// `copy_file_range` loop) in turns; each one's medians, and the medians
/// (and ranges) of the per-round ratios to QEMU's.
fn local_case_in_rounds(
    case: &str,
    dir: &Path,
    source: &Path,
    size: u64,
    extra: &str,
    floors: bool,
) {
    let mut runs: [Vec<Outcome>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds() {
        runs[0].push(mirror_local(Daemon::Qemu, dir, source, size, extra));
        runs[1].push(mirror_local(Daemon::Ours, dir, source, size, extra));
        if floors {
            runs[2].push(copy_floor(dir, source, size, Floor::CopyFileRange));
        }
    }
    let field = |r: &[Outcome], f: fn(&Outcome) -> f64| r.iter().map(f).collect::<Vec<_>>();
    let ratio = |o: &[Outcome], f: fn(&Outcome) -> f64| {
        runs[0]
            .iter()
            .zip(o)
            .map(|(q, o)| f(o) / f(q).max(0.01))
            .collect::<Vec<_>>()
    };
    let mut rows = vec![
        (Daemon::Qemu.name(), &runs[0]),
        (Daemon::Ours.name(), &runs[1]),
    ];
    if floors {
        rows.push(("copy_file_range loop, 1 MiB, one thread", &runs[2]));
    }
    for (i, (who, r)) in rows.into_iter().enumerate() {
        let vs = |f: fn(&Outcome) -> f64| match i {
            0 => "1.00".into(),
            _ => spread(ratio(r, f), 2),
        };
        println!(
            "| {case} | {who} | {} s | {} s | {:.2} GiB | {} | {} | {} s | {} |",
            spread(field(r, |o| o.wall), 2),
            spread(field(r, |o| o.cpu), 2),
            median(field(r, |o| o.allocated as f64)) / GIB as f64,
            vs(|o| o.wall),
            vs(|o| o.cpu),
            spread(field(r, |o| o.machine), 2),
            vs(|o| o.machine),
        );
    }
}

/// The source side's yardstick: `source` (cached) sent whole with
/// `sendfile`, 512 KiB at a time, to a TCP socket on loopback that another
/// thread drains into a buffer; the sender thread's CPU. On loopback the
/// sender also pays for the receiving side's TCP processing, as a mirror's
/// source does.
fn send_floor(source: &Path, size: u64) -> Outcome {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let addr = listener.local_addr().expect("its address");
    let drain = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("a connection");
        let mut buf = vec![0u8; MIB as usize];
        while std::io::Read::read(&mut conn, &mut buf).is_ok_and(|n| n > 0) {}
    });
    let socket = std::net::TcpStream::connect(addr).expect("a connection");
    let _ = socket.set_nodelay(true);
    let src = std::fs::File::open(source).expect("the source");
    let cpu0 = thread_cpu_seconds();
    let start = Instant::now();
    let mut at = 0;
    while at < size {
        let want = (size - at).min(512 << 10) as usize;
        let n = rustix::fs::sendfile(&socket, &src, Some(&mut at), want).expect("a sendfile");
        assert!(n > 0, "the source ended early");
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu0;
    drop(socket);
    let _ = drain.join();
    Outcome {
        wall,
        cpu,
        peer_cpu: f64::NAN,
        machine: f64::NAN,
        allocated: 0,
    }
}

fn nbd_case(dir: &Path, source: &Path, size: u64) {
    if rounds() > 1 {
        return nbd_case_in_rounds(dir, source, size);
    }
    let qemu = best(|| mirror_nbd(Daemon::Qemu, dir, source, size));
    let ours = best(|| mirror_nbd(Daemon::Ours, dir, source, size));
    let floor = best(|| send_floor(source, size));
    for (who, o) in [(Daemon::Qemu, &qemu), (Daemon::Ours, &ours)] {
        println!(
            "| full 4 GiB raw→NBD (TCP loopback)→raw | {} | {:.2} s | {:.2} s + {:.2} s | {:.2} GiB | {:.2} | {:.2} / {:.2} | {:.2} s | {:.2} |",
            who.name(),
            o.wall,
            o.cpu,
            o.peer_cpu,
            o.allocated as f64 / GIB as f64,
            o.wall / qemu.wall,
            o.cpu / qemu.cpu.max(0.01),
            o.peer_cpu / qemu.peer_cpu.max(0.01),
            o.machine,
            o.machine / qemu.machine.max(0.01),
        );
    }
    println!(
        "| full 4 GiB raw→NBD (TCP loopback)→raw | sendfile loop to a draining socket, 512 KiB, one thread (the source's floor) | {:.2} s | {:.2} s + — | — | {:.2} | {:.2} / — | — | — |",
        floor.wall,
        floor.cpu,
        floor.wall / qemu.wall,
        floor.cpu / qemu.cpu.max(0.01),
    );
}

/// [`nbd_case`] in [`rounds`]: QEMU, ours and the source's floor in
/// turns; each one's medians, and the medians (and ranges) of the
/// per-round ratios to QEMU's.
fn nbd_case_in_rounds(dir: &Path, source: &Path, size: u64) {
    let mut runs: [Vec<Outcome>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds() {
        runs[0].push(mirror_nbd(Daemon::Qemu, dir, source, size));
        runs[1].push(mirror_nbd(Daemon::Ours, dir, source, size));
        runs[2].push(send_floor(source, size));
    }
    let field = |r: &[Outcome], f: fn(&Outcome) -> f64| r.iter().map(f).collect::<Vec<_>>();
    let ratio = |r: &[Outcome], f: fn(&Outcome) -> f64| {
        let ratios = runs[0].iter().zip(r).map(|(q, o)| f(o) / f(q).max(0.01));
        spread(ratios.collect(), 2)
    };
    let case = "full 4 GiB raw→NBD (TCP loopback)→raw";
    for (who, r) in [(Daemon::Qemu, &runs[0]), (Daemon::Ours, &runs[1])] {
        println!(
            "| {case} | {} | {} s | {} s + {} s | {:.2} GiB | {} | {} / {} | {} s | {} |",
            who.name(),
            spread(field(r, |o| o.wall), 2),
            spread(field(r, |o| o.cpu), 2),
            spread(field(r, |o| o.peer_cpu), 2),
            median(field(r, |o| o.allocated as f64)) / GIB as f64,
            ratio(r, |o| o.wall),
            ratio(r, |o| o.cpu),
            ratio(r, |o| o.peer_cpu),
            spread(field(r, |o| o.machine), 2),
            ratio(r, |o| o.machine),
        );
    }
    let floor = &runs[2];
    println!(
        "| {case} | sendfile loop to a draining socket, 512 KiB, one thread (the source's floor) | {} s | {} s + — | — | {} | {} / — | — | — |",
        spread(field(floor, |o| o.wall), 2),
        spread(field(floor, |o| o.cpu), 2),
        ratio(floor, |o| o.wall),
        ratio(floor, |o| o.cpu),
    );
}

/// A small xorshift generator: the same "random" blocks on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `count` distinct random 64 KiB blocks of a disk of `size` bytes, sorted.
fn random_blocks(size: u64, count: usize, seed: u64) -> Vec<u64> {
    let blocks = size / GUEST_BLOCK;
    let mut rng = Rng(seed);
    let mut set = std::collections::BTreeSet::new();
    while set.len() < count {
        set.insert(rng.next() % blocks);
    }
    set.into_iter().map(|b| b * GUEST_BLOCK).collect()
}

/// A connection to export `name` on the unix socket `sock`, on its own
/// single-threaded runtime.
fn nbd_client(rt: &tokio::runtime::Runtime, sock: &Path, name: &str) -> Client {
    rt.block_on(Client::connect(&ClientOptions {
        server: SocketAddress::Unix {
            path: sock.display().to_string(),
        },
        export: name.into(),
        contexts: Vec::new(),
        tls: None,
        tls_hostname: None,
    }))
    .expect("an NBD connection to the source's export")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// `who` serving `source` (exported, see [`exported_source`]) and
/// `target`, after a guest wrote `blocks` through the export while bitmap
/// `b0` (64 KiB granularity) recorded them; the writes are on disk (for
/// the plain loops the cases compare with, alike).
fn dirty(
    who: Daemon,
    dir: &Path,
    source: &Path,
    target: [String; 2],
    blocks: &[u64],
) -> (StorageDaemon, Qmp) {
    let (sock, args) = exported_source(dir, source, target);
    let daemon = who.start(dir, &args);
    let mut qmp = daemon.qmp();
    qmp.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0", "granularity": GUEST_BLOCK}),
    );
    guest_writes(&sock, blocks);
    run("sync", &[]);
    (daemon, qmp)
}

/// Daemon arguments: raw node `src` over `source`, exported writable as
/// `disk` on `dir/src.sock`, plus `target`'s. Returns the socket too.
fn exported_source(dir: &Path, source: &Path, target: [String; 2]) -> (PathBuf, Vec<String>) {
    let sock = dir.join("src.sock");
    let mut args = raw_node("src", source, "").to_vec();
    args.extend(target);
    args.extend([
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", sock.display()),
        "--export".into(),
        "type=nbd,id=e,node-name=src,name=disk,writable=on".into(),
    ]);
    (sock, args)
}

/// A guest writes 64 KiB of data at each of `blocks` through the export
/// on `sock` (64 in flight), then flushes: a bitmap on the node records
/// them.
fn guest_writes(sock: &Path, blocks: &[u64]) {
    let rt = runtime();
    let client = nbd_client(&rt, sock, "disk");
    let data = vec![0x5au8; GUEST_BLOCK as usize];
    rt.block_on(async {
        for chunk in blocks.chunks(64) {
            let writes = chunk.iter().map(|&o| client.write(o, &data, false));
            for r in futures_util::future::join_all(writes).await {
                r.expect("a guest write");
            }
        }
        client.flush().await.expect("a flush");
    });
}

/// The yardstick: `pread`/`pwrite` of `blocks` from `source` into a fresh
/// sparse `target` of `size` bytes, then `fdatasync`; seconds (after a
/// `sync`, so earlier writeback does not land here).
/// Also returns the loop's CPU seconds (the kernel's copying, mostly).
fn copy_loop(source: &Path, target: &Path, size: u64, blocks: &[u64]) -> (f64, f64) {
    sparse_file(target, size);
    run("sync", &[]);
    let cpu0 = thread_cpu_seconds();
    let start = Instant::now();
    let src = std::fs::File::open(source).expect("the source");
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .expect("the target");
    let mut buf = vec![0u8; GUEST_BLOCK as usize];
    for &o in blocks {
        src.read_exact_at(&mut buf, o).expect("a read");
        dst.write_all_at(&buf, o).expect("a write");
    }
    dst.sync_data().expect("a sync");
    (start.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu0)
}

/// How a whole-file copy moves its data.
#[derive(Clone, Copy)]
enum Floor {
    /// `pread` and `pwrite` of 1 MiB.
    ReadWrite,
    /// `copy_file_range` of 1 MiB.
    CopyFileRange,
}

/// A plain copy as a yardstick: `source` copied whole into a fresh sparse
/// file on one thread, then `fdatasync`, as `Outcome` (CPU of this
/// thread).
fn copy_floor(dir: &Path, source: &Path, size: u64, how: Floor) -> Outcome {
    let target = dir.join("target.raw");
    sparse_file(&target, size);
    run("sync", &[]);
    let src = std::fs::File::open(source).expect("the source");
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .expect("the target");
    let (cpu0, machine0) = (thread_cpu_seconds(), machine_cpu_seconds());
    let start = Instant::now();
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < size {
        match how {
            Floor::ReadWrite => {
                src.read_exact_at(&mut buf, at).expect("a read");
                dst.write_all_at(&buf, at).expect("a write");
                at += MIB;
            }
            Floor::CopyFileRange => {
                let (mut from, mut to) = (at, at);
                let n = rustix::fs::copy_file_range(
                    &src,
                    Some(&mut from),
                    &dst,
                    Some(&mut to),
                    MIB as usize,
                )
                .expect("a copy");
                assert!(n > 0, "the source ended early");
                at += n as u64;
            }
        }
    }
    dst.sync_data().expect("a sync");
    Outcome {
        wall: start.elapsed().as_secs_f64(),
        cpu: thread_cpu_seconds() - cpu0,
        peer_cpu: 0.0,
        machine: machine_cpu_seconds() - machine0,
        allocated: allocated(&target),
    }
}

/// `sync=bitmap` with `fraction` of a 16 GiB disk dirty, against a loop
/// that reads and writes the same blocks with `pread`/`pwrite` and syncs.
fn bitmap_case(dir: &Path, fraction: f64) {
    let size = 16 * GIB;
    let source = dir.join("bitmap-src.raw");
    sparse_file(&source, size);
    let count = (size as f64 * fraction / GUEST_BLOCK as f64) as usize;
    let blocks = random_blocks(size, count, 0x5eed + count as u64);
    let mut mirror_times: Vec<(f64, f64)> = Vec::new();
    let mut loop_times: Vec<(f64, f64)> = Vec::new();
    let runs = if rounds() > 1 { rounds() } else { RUNS };
    for _ in 0..runs {
        let target = dir.join("target.raw");
        sparse_file(&target, size);
        let target_node = raw_node("dst", &target, "");
        let (mut daemon, mut qmp) = dirty(Daemon::Ours, dir, &source, target_node, &blocks);
        let cpu0 = cpu_seconds(daemon.pid());
        let start = Instant::now();
        qmp.execute_ok(
            "blockdev-mirror",
            mirror_args(json!({"sync": "bitmap", "bitmap": "b0"})),
        );
        wait_ready(&mut qmp, "bitmirror serve");
        mirror_times.push((
            start.elapsed().as_secs_f64(),
            cpu_seconds(daemon.pid()) - cpu0,
        ));
        cancel_and_quit(&mut qmp, &mut daemon);
        assert!(
            allocated(&target) <= count as u64 * GUEST_BLOCK + 16 * MIB,
            "the mirror copied more than the bitmap"
        );

        loop_times.push(copy_loop(&source, &target, size, &blocks));
    }
    if rounds() > 1 {
        // Medians, and the range of the per-round ratios.
        let ratios = mirror_times
            .iter()
            .zip(&loop_times)
            .map(|(m, l)| m.0 / l.0)
            .collect();
        println!(
            "| sync=bitmap, {:.0}% of 16 GiB dirty ({count} × 64 KiB), {runs} rounds | {} s (CPU {} s) | {} s (CPU {} s) | {} |",
            fraction * 100.0,
            spread(times(&mirror_times), 2),
            spread(cpus(&mirror_times), 2),
            spread(times(&loop_times), 2),
            spread(cpus(&loop_times), 2),
            spread(ratios, 2),
        );
        return;
    }
    // The fastest run of each, with its CPU.
    let (m, l) = (fastest(&mirror_times), fastest(&loop_times));
    println!(
        "| sync=bitmap, {:.0}% of 16 GiB dirty ({count} × 64 KiB) | {:.2} s (CPU {:.2} s) | {:.2} s (CPU {:.2} s) | {:.2} |",
        fraction * 100.0,
        m.0,
        m.1,
        l.0,
        l.1,
        m.0 / l.0
    );
}

/// Write latencies a guest sees, in microseconds, sorted.
struct Latencies(Vec<f64>);

impl Latencies {
    fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let i = ((p * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len()) - 1;
        self.0[i]
    }
}

/// A guest on its own thread: random 64 KiB writes to the export, one at a
/// time, at [`GUEST_RATE`] at most (a slow write delays the next one, as in
/// a guest waiting on its disk), each timed from issue to completion,
/// until `stop`.
fn guest_writer(
    sock: PathBuf,
    size: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Latencies> {
    std::thread::spawn(move || {
        let rt = runtime();
        let client = nbd_client(&rt, &sock, "disk");
        let interval = Duration::from_secs_f64(GUEST_BLOCK as f64 / GUEST_RATE);
        let mut rng = Rng(0x9e37_79b9);
        let data = vec![0xa5u8; GUEST_BLOCK as usize];
        let mut lat = Vec::new();
        rt.block_on(async {
            let start = tokio::time::Instant::now();
            let mut due = start;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep_until(due).await;
                let o = rng.next() % (size / GUEST_BLOCK) * GUEST_BLOCK;
                let issued = tokio::time::Instant::now();
                client.write(o, &data, false).await.expect("a guest write");
                lat.push(issued.elapsed().as_secs_f64() * 1e6);
                // Behind schedule (a slow write): go on at once, without
                // trying to catch up.
                due = (due + interval).max(tokio::time::Instant::now());
            }
        });
        lat.sort_by(f64::total_cmp);
        Latencies(lat)
    })
}

/// The guest's latencies during one phase: none (no mirror for 5 s), or a
/// mirror in `copy_mode` until READY (whose time is returned too), into a
/// target with `target_extra` file options.
fn latency_once(
    who: Daemon,
    dir: &Path,
    source: &Path,
    copy_mode: Option<&str>,
    target_extra: &str,
) -> (Latencies, f64) {
    let size = std::fs::metadata(source).map(|m| m.len()).unwrap_or(0);
    let target = dir.join("target.raw");
    sparse_file(&target, size);
    let (sock, args) = exported_source(dir, source, raw_node("dst", &target, target_extra));
    let mut daemon = who.start(dir, &args);
    let mut qmp = daemon.qmp();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = guest_writer(sock, size, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    match copy_mode {
        None => std::thread::sleep(Duration::from_secs(5)),
        Some(mode) => {
            qmp.execute_ok("blockdev-mirror", mirror_args(json!({"copy-mode": mode})));
            wait_ready(&mut qmp, who.name());
        }
    }
    let ready = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let lat = writer.join().expect("the guest thread");
    if copy_mode.is_some() {
        cancel_and_quit(&mut qmp, &mut daemon);
    } else {
        qmp.execute_ok("quit", json!({}));
        let _ = daemon.wait_exit();
    }
    (lat, ready)
}

fn latency_case(dir: &Path, source: &Path) {
    const DIRECT: &str = ",file.cache.direct=on";
    for (mode, extra) in [
        (None, ""),
        (Some("background"), ""),
        (Some("write-blocking"), ""),
        (Some("background"), DIRECT),
        (Some("write-blocking"), DIRECT),
    ] {
        let mut runs: [Vec<(Latencies, f64)>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..rounds() {
            runs[0].push(latency_once(Daemon::Qemu, dir, source, mode, extra));
            runs[1].push(latency_once(Daemon::Ours, dir, source, mode, extra));
        }
        let p99 = |r: &[(Latencies, f64)]| r.iter().map(|(l, _)| l.pct(0.99)).collect::<Vec<_>>();
        let ratios: Vec<f64> = p99(&runs[1])
            .iter()
            .zip(p99(&runs[0]))
            .map(|(o, q)| o / q)
            .collect();
        for (who, r) in [(Daemon::Qemu, &runs[0]), (Daemon::Ours, &runs[1])] {
            let ms = |v: Vec<f64>| v.into_iter().map(|x| x / 1e3).collect::<Vec<_>>();
            let ready = r.iter().map(|(_, ready)| *ready).collect::<Vec<_>>();
            println!(
                "| {}{} | {} | {:.0} | {} ms | {} ms | {} | {} |",
                mode.unwrap_or("no mirror"),
                if extra.is_empty() {
                    ""
                } else {
                    ", O_DIRECT target"
                },
                who.name(),
                median(r.iter().map(|(l, _)| l.0.len() as f64).collect()),
                spread(ms(r.iter().map(|(l, _)| l.pct(0.5)).collect()), 2),
                spread(ms(p99(r)), 2),
                match who {
                    Daemon::Ours => spread(ratios.clone(), 2),
                    Daemon::Qemu => "1.00".into(),
                },
                if mode.is_some() {
                    format!("{} s", spread(ready, 2))
                } else {
                    "—".into()
                },
            );
        }
    }
}

/// Waits for job `m`'s `BLOCK_JOB_COMPLETED` (up to [`JOB_TIMEOUT`]);
/// panics if it failed.
fn wait_completed(qmp: &mut Qmp, who: &str) {
    loop {
        let event = qmp.next_event(JOB_TIMEOUT);
        match event["event"].as_str() {
            Some("BLOCK_JOB_COMPLETED") => {
                assert!(
                    event["data"].get("error").is_none(),
                    "{who}: the job failed: {event}"
                );
                return;
            }
            Some("BLOCK_JOB_CANCELLED") => panic!("{who}: the job was cancelled: {event}"),
            _ => {}
        }
    }
}

/// A qcow2 node `dst` over a fresh image of `size` bytes, with `extra`
/// file options.
fn qcow2_target(dir: &Path, size: u64, extra: &str) -> (PathBuf, [String; 2]) {
    let image = dir.join("target.qcow2");
    let _ = std::fs::remove_file(&image);
    block::create_qcow2(&image, &block::Qcow2Create::new(size)).expect("a qcow2 target");
    let opts = [
        "--blockdev".into(),
        format!(
            "driver=qcow2,node-name=dst,file.driver=file,file.filename={},file.aio=threads{extra}",
            image.display()
        ),
    ];
    (image, opts)
}

/// A full backup of `source` into a fresh `O_DIRECT` qcow2 image.
fn backup_full_once(who: Daemon, dir: &Path, source: &Path, size: u64) -> Outcome {
    let (image, target) = qcow2_target(dir, size, ",file.cache.direct=on");
    let mut args = raw_node("src", source, "").to_vec();
    args.extend(target);
    let mut daemon = who.start(dir, &args);
    let mut qmp = daemon.qmp();
    let cpu0 = cpu_seconds(daemon.pid());
    let start = Instant::now();
    qmp.execute_ok("blockdev-backup", mirror_args(json!({})));
    wait_completed(&mut qmp, who.name());
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(daemon.pid()) - cpu0;
    qmp.execute_ok("quit", json!({}));
    let _ = daemon.wait_exit();
    Outcome {
        wall,
        cpu,
        peer_cpu: 0.0,
        machine: f64::NAN,
        allocated: allocated(&image),
    }
}

/// `dd` of `source` into a fresh file with `oflag=direct`: the yardstick.
fn dd_direct(dir: &Path, source: &Path) -> f64 {
    let out = dir.join("dd.raw");
    let _ = std::fs::remove_file(&out);
    let start = Instant::now();
    run(
        "dd",
        &[
            &format!("if={}", source.display()),
            &format!("of={}", out.display()),
            "bs=1M",
            "oflag=direct",
            "status=none",
        ],
    );
    let t = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    t
}

fn backup_full_case(dir: &Path, source: &Path, size: u64) {
    let dd = (0..RUNS)
        .map(|_| dd_direct(dir, source))
        .fold(f64::INFINITY, f64::min);
    let qemu = best(|| backup_full_once(Daemon::Qemu, dir, source, size));
    let ours = best(|| backup_full_once(Daemon::Ours, dir, source, size));
    for (who, o) in [(Daemon::Qemu, &qemu), (Daemon::Ours, &ours)] {
        println!(
            "| full backup 4 GiB raw→qcow2 (O_DIRECT) | {} | {:.2} s | {:.2} s | {:.2} | {:.2} | {:.2} |",
            who.name(),
            o.wall,
            o.cpu,
            o.wall / dd,
            o.wall / qemu.wall,
            o.cpu / qemu.cpu.max(0.01),
        );
    }
    println!("| (`dd bs=1M oflag=direct` of the same source) | — | {dd:.2} s | — | 1.00 | — | — |");
}

/// An incremental backup (`sync=bitmap`) of `fraction` of a 16 GiB disk
/// into a fresh qcow2 image, for both daemons, against the loop.
fn backup_incremental_case(dir: &Path, fraction: f64) {
    let size = 16 * GIB;
    let source = dir.join("bitmap-src.raw");
    sparse_file(&source, size);
    let count = (size as f64 * fraction / GUEST_BLOCK as f64) as usize;
    let blocks = random_blocks(size, count, 0x5eed + count as u64);
    let once = |who: Daemon| {
        let (_, target) = qcow2_target(dir, size, "");
        let (mut daemon, mut qmp) = dirty(who, dir, &source, target, &blocks);
        let cpu0 = cpu_seconds(daemon.pid());
        let start = Instant::now();
        qmp.execute_ok(
            "blockdev-backup",
            mirror_args(json!({"sync": "bitmap", "bitmap": "b0", "bitmap-mode": "on-success"})),
        );
        wait_completed(&mut qmp, who.name());
        let t = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds(daemon.pid()) - cpu0;
        qmp.execute_ok("quit", json!({}));
        let _ = daemon.wait_exit();
        (t, cpu)
    };
    // The same blocks by hand.
    let by_hand = || copy_loop(&source, &dir.join("loop.raw"), size, &blocks);
    if rounds() > 1 {
        // In turns, QEMU, ours and the loop; medians, and the ranges of
        // the per-round ratios.
        let mut runs: [Vec<(f64, f64)>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds() {
            runs[0].push(once(Daemon::Qemu));
            runs[1].push(once(Daemon::Ours));
            runs[2].push(by_hand());
        }
        let per_round = |a: Vec<f64>, b: Vec<f64>| {
            a.iter()
                .zip(b)
                .map(|(a, b)| a / b.max(0.01))
                .collect::<Vec<_>>()
        };
        println!(
            "| incremental backup, {:.0}% of 16 GiB dirty ({count} × 64 KiB), {} rounds | {} s ({}× loop, CPU {} s) | {} s ({}× loop, CPU {} s) | {} s (CPU {} s) | {} |",
            fraction * 100.0,
            rounds(),
            spread(times(&runs[0]), 2),
            spread(per_round(times(&runs[0]), times(&runs[2])), 2),
            spread(cpus(&runs[0]), 2),
            spread(times(&runs[1]), 2),
            spread(per_round(times(&runs[1]), times(&runs[2])), 2),
            spread(cpus(&runs[1]), 2),
            spread(times(&runs[2]), 2),
            spread(cpus(&runs[2]), 2),
            spread(per_round(cpus(&runs[1]), cpus(&runs[0])), 2),
        );
        return;
    }
    let best_of = |f: &dyn Fn() -> (f64, f64)| fastest(&(0..RUNS).map(|_| f()).collect::<Vec<_>>());
    let q = best_of(&|| once(Daemon::Qemu));
    let o = best_of(&|| once(Daemon::Ours));
    let (loop_best, loop_cpu) = best_of(&by_hand);
    println!(
        "| incremental backup, {:.0}% of 16 GiB dirty ({count} × 64 KiB) | {:.2} s ({:.2}× loop, CPU {:.2} s) | {:.2} s ({:.2}× loop, CPU {:.2} s) | {loop_best:.2} s (CPU {loop_cpu:.2} s) | {:.2} |",
        fraction * 100.0,
        q.0,
        q.0 / loop_best,
        q.1,
        o.0,
        o.0 / loop_best,
        o.1,
        o.1 / q.1.max(0.01),
    );
}

/// Guest latencies during a full backup of `source` (copy-before-write's
/// cost), until it ends; and the backup's time.
fn backup_latency_once(who: Daemon, dir: &Path, source: &Path) -> (Latencies, f64) {
    let size = std::fs::metadata(source).map(|m| m.len()).unwrap_or(0);
    let (_, target) = qcow2_target(dir, size, "");
    let (sock, args) = exported_source(dir, source, target);
    let mut daemon = who.start(dir, &args);
    let mut qmp = daemon.qmp();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = guest_writer(sock, size, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    qmp.execute_ok("blockdev-backup", mirror_args(json!({})));
    wait_completed(&mut qmp, who.name());
    let took = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let lat = writer.join().expect("the guest thread");
    qmp.execute_ok("quit", json!({}));
    let _ = daemon.wait_exit();
    (lat, took)
}

fn backup_latency_case(dir: &Path, source: &Path) {
    let qemu = backup_latency_once(Daemon::Qemu, dir, source);
    let ours = backup_latency_once(Daemon::Ours, dir, source);
    for (who, (lat, took)) in [(Daemon::Qemu, &qemu), (Daemon::Ours, &ours)] {
        println!(
            "| full backup of 4 GiB | {} | {} | {:.2} ms | {:.2} ms | {:.2} | {took:.2} s |",
            who.name(),
            lat.0.len(),
            lat.pct(0.5) / 1e3,
            lat.pct(0.99) / 1e3,
            lat.pct(0.99) / qemu.0.pct(0.99),
        );
    }
}

/// `bitmirror migrate` between two daemons on this machine (NBD over a
/// unix socket) of a 16 GiB raw disk holding 4 GiB of data, `fraction` of
/// the disk rewritten since its full backup (the destination overlay's
/// base): incremental (`--bitmap`) against full; the bytes the mirror
/// moved, the wall time, and the cut-over. One run each.
fn migrate_case(dir: &Path, fraction: f64) {
    let size = 16 * GIB;
    let base = dir.join("migrate-base.raw");
    if !base.exists() {
        sparse_file(&base, size);
        let p = base.to_str().unwrap_or_default();
        let writes: Vec<String> = (0..4)
            .map(|i| format!("write -P {} {}G 1G", 60 + i, 4 * i))
            .collect();
        let mut args = vec!["-f", "raw"];
        for w in &writes {
            args.extend(["-c", w.as_str()]);
        }
        args.push(p);
        run("qemu-io", &args);
    }
    let source = dir.join("migrate-src.raw");
    run(
        "cp",
        &[
            "--sparse=always",
            base.to_str().unwrap_or_default(),
            source.to_str().unwrap_or_default(),
        ],
    );
    let count = (size as f64 * fraction / GUEST_BLOCK as f64) as usize;
    let blocks = random_blocks(size, count, 0x316 + count as u64);
    let mut rows = Vec::new();
    for incremental in [true, false] {
        let a_dir = dir.join("migrate-a");
        let b_dir = dir.join("migrate-b");
        for d in [&a_dir, &b_dir] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).expect("a directory");
        }
        let a_sock = a_dir.join("nbd.sock");
        let b_sock = b_dir.join("nbd.sock");
        let mut args = raw_node("src", &source, "").to_vec();
        args.extend([
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", a_sock.display()),
            "--export".into(),
            "type=nbd,id=e,node-name=src,name=disk,writable=on".into(),
        ]);
        let mut a = Daemon::Ours.start(&a_dir, &args);
        let mut b = Daemon::Ours.start(
            &b_dir,
            &[
                "--nbd-server".into(),
                format!("addr.type=unix,addr.path={}", b_sock.display()),
            ],
        );
        {
            let mut qa = a.qmp();
            qa.execute_ok(
                "block-dirty-bitmap-add",
                json!({"node": "src", "name": "B", "granularity": GUEST_BLOCK}),
            );
        }
        if incremental {
            // The writes since the backup, once: the bitmap records them
            // (the full run migrates the same disk).
            guest_writes(&a_sock, &blocks);
        }
        run("sync", &[]);
        let dest = b_dir.join("dest.qcow2");
        let mut cli = vec![
            "migrate".to_string(),
            "--from".into(),
            a.qmp_path().display().to_string(),
            "--to".into(),
            b.qmp_path().display().to_string(),
            "--node".into(),
            "src".into(),
            "--dest-image".into(),
            dest.display().to_string(),
            "--dest-nbd".into(),
            format!("unix:{}", b_sock.display()),
            "--base".into(),
            base.display().to_string(),
            "--base-format".into(),
            "raw".into(),
            "--source-nbd".into(),
            format!("unix:{}", a_sock.display()),
        ];
        if incremental {
            cli.extend(["--bitmap".into(), "B".into()]);
        }
        let start = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitmirror"))
            .args(&cli)
            .output()
            .expect("bitmirror migrate runs");
        let took = start.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("migrated"))
            .unwrap_or_default()
            .to_owned();
        let copied = line
            .split("copied ")
            .nth(1)
            .and_then(|r| r.split(" of ").next())
            .unwrap_or("?")
            .to_owned();
        let cut = line.split("cut-over ").nth(1).unwrap_or("?").to_owned();
        // Bytes that crossed: what the destination's overlay holds.
        let moved = allocated(&dest);
        rows.push((incremental, copied, moved, took, cut));
        for d in [&mut a, &mut b] {
            let mut qmp = d.qmp();
            qmp.execute_ok("quit", json!({}));
            let _ = d.wait_exit();
        }
    }
    let full_time = rows.iter().find(|r| !r.0).map_or(f64::NAN, |r| r.3);
    for (incremental, progress, moved, took, cut) in rows {
        println!(
            "| {:.0}% of 16 GiB rewritten ({count} × 64 KiB) | {} | {:.1} MiB | {progress} | {took:.2} s | {:.2} | {cut} |",
            fraction * 100.0,
            if incremental { "incremental" } else { "full" },
            moved as f64 / MIB as f64,
            took / full_time,
        );
    }
}

/// A server for the TLS case, killed on drop: its process.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    for _ in 0..1000 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on port {port}");
}

/// NBD throughput over TLS against plain TCP on loopback: `nbdcopy` (one
/// client for all) reads the whole 4 GiB `source` to `null:` from our
/// server and from `qemu-nbd`, each plain and with `tls-creds`. Best of
/// `RUNS`, with the server's CPU.
fn tls_case(dir: &Path, source: &Path) {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).expect("a directory");
    testkit::pki::ca(&pki, "bench");
    let server = testkit::pki::creds(&pki, "bench", "server", "server");
    let client = testkit::pki::creds(&pki, "bench", "client", "client");
    let size = std::fs::metadata(source).map(|m| m.len()).unwrap_or(0);
    let mut rows = Vec::new();
    for (who, tls) in [
        ("bitmirror serve", false),
        ("bitmirror serve", true),
        ("qemu-nbd", false),
        ("qemu-nbd", true),
    ] {
        let port = free_port();
        let creds = format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={}",
            server.display()
        );
        let child = if who == "qemu-nbd" {
            let mut c = std::process::Command::new("qemu-nbd");
            if tls {
                c.args(["--object", &creds, "--tls-creds", "tls0"]);
            }
            c.args([
                "-f",
                "raw",
                "-r",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-x",
                "disk",
                "-t",
            ])
            .arg(source)
            .spawn()
            .expect("qemu-nbd starts")
        } else {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_bitmirror"));
            c.arg("serve");
            if tls {
                c.args(["--object", &creds]);
            }
            c.args([
                "--blockdev",
                &format!(
                    "driver=raw,node-name=n,file.driver=file,file.filename={}",
                    source.display()
                ),
                "--nbd-server",
                &format!(
                    "addr.type=inet,addr.host=127.0.0.1,addr.port={port}{}",
                    if tls { ",tls-creds=tls0" } else { "" }
                ),
                "--export",
                "type=nbd,id=e,node-name=n,name=disk",
            ])
            .spawn()
            .expect("bitmirror serve starts")
        };
        let served = Served(child);
        wait_port(port);
        let uri = if tls {
            format!(
                "nbds://localhost:{port}/disk?tls-certificates={}",
                client.display()
            )
        } else {
            format!("nbd://127.0.0.1:{port}/disk")
        };
        let mut best = (f64::INFINITY, 0.0);
        for _ in 0..RUNS {
            let cpu0 = cpu_seconds(served.0.id());
            let t = Instant::now();
            run("nbdcopy", &[&uri, "null:"]);
            let took = t.elapsed().as_secs_f64();
            if took < best.0 {
                best = (took, cpu_seconds(served.0.id()) - cpu0);
            }
        }
        rows.push((who, tls, best));
    }
    let ours_plain = rows[0].2.0;
    let qemu_tls = rows[3].2.0;
    for (who, tls, (took, cpu)) in rows {
        println!(
            "| {who} | {} | {:.0} MB/s | {cpu:.2} s | {:.2} | {:.2} |",
            if tls { "TLS" } else { "plain" },
            size as f64 / took / 1e6,
            took / ours_plain,
            took / qemu_tls,
        );
    }
}

/// A raw file of `size` bytes, written through with `pattern` runs of 1 GiB.
fn full_source(path: &Path, size: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size && m.blocks() * 512 >= size) {
        return;
    }
    sparse_file(path, size);
    let p = path.to_str().unwrap_or_default();
    let writes: Vec<String> = (0..size / GIB)
        .map(|i| format!("write -P {} {}G 1G", 90 + i, i))
        .collect();
    let mut args = vec!["-f", "raw"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(p);
    run("qemu-io", &args);
}

/// Prints a markdown table's header row and the separator under it.
fn table(header: &str) {
    println!("{header}");
    println!("|{}", "---|".repeat(header.matches('|').count() - 1));
}

fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |case: &str| wanted.is_empty() || wanted.iter().any(|w| w == case);
    let base =
        std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::tempdir_in(base).expect("a bench directory");
    let dir = dir.path();
    let full = dir.join("full.raw");

    if want("full") || want("direct") || want("sparse") || want("nbd") {
        table(
            "| case | daemon | time to READY | CPU | target allocated | time vs QEMU | CPU vs QEMU | machine CPU | machine CPU vs QEMU |",
        );
    }
    if [
        "full",
        "direct",
        "nbd",
        "latency",
        "backup-full",
        "backup-latency",
    ]
    .iter()
    .any(|c| want(c))
    {
        full_source(&full, 4 * GIB);
    }
    if want("full") {
        local_case("full 4 GiB raw→raw", dir, &full, 4 * GIB, "", true);
    }
    if want("direct") {
        local_case(
            "full 4 GiB raw→raw, O_DIRECT",
            dir,
            &full,
            4 * GIB,
            ",file.cache.direct=on",
            false,
        );
    }
    if want("sparse") {
        // 16 GiB with 10% data: 1 MiB every 10 MiB.
        let sparse = dir.join("sparse.raw");
        sparse_file(&sparse, 16 * GIB);
        let writes: Vec<String> = (0..(16 * 1024 / 10))
            .map(|i| format!("write -P 7 {}M 1M", i * 10))
            .collect();
        let mut args = vec!["-f", "raw"];
        for w in &writes {
            args.extend(["-c", w.as_str()]);
        }
        let s = sparse.display().to_string();
        args.push(&s);
        run("qemu-io", &args);
        local_case(
            "sparse 16 GiB (10% data) raw→raw",
            dir,
            &sparse,
            16 * GIB,
            "",
            false,
        );
    }
    if want("nbd") {
        nbd_case(dir, &full, 4 * GIB);
    }
    if want("bitmap") {
        println!();
        table("| case | mirror to READY | pread/pwrite loop | ratio |");
        for fraction in [0.01, 0.10] {
            bitmap_case(dir, fraction);
        }
    }
    if want("latency") {
        println!();
        table("| copy mode | daemon | guest writes | p50 | p99 | p99 vs QEMU | time to READY |");
        latency_case(dir, &full);
    }
    if want("backup-full") {
        println!();
        table("| case | daemon | time | CPU | time vs dd | time vs QEMU | CPU vs QEMU |");
        backup_full_case(dir, &full, 4 * GIB);
    }
    if want("backup-incremental") {
        println!();
        table("| case | qemu-storage-daemon | bitmirror serve | pread/pwrite loop | CPU vs QEMU |");
        for fraction in [0.01, 0.10] {
            backup_incremental_case(dir, fraction);
        }
    }
    if want("tls") {
        full_source(&full, 4 * GIB);
        println!();
        table(
            "| server | transport | nbdcopy read of 4 GiB | server CPU | time vs ours plain | time vs qemu-nbd TLS |",
        );
        tls_case(dir, &full);
    }
    if want("migrate") {
        println!();
        table(
            "| changed since the backup | migration | moved (overlay) | job progress | time | vs full | cut-over |",
        );
        for fraction in [0.01, 0.10] {
            migrate_case(dir, fraction);
        }
    }
    if want("backup-latency") {
        println!();
        table("| during | daemon | guest writes | p50 | p99 | p99 vs QEMU | backup took |");
        backup_latency_case(dir, &full);
    }
}
