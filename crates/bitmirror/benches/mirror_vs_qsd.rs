//! Mirror jobs side by side with qemu-storage-daemon, in one run: the same
//! source, the same target, the same QMP `blockdev-mirror`, each daemon
//! its own process. Reports the time to READY, the daemon's CPU time
//! (user + system, from `/proc/PID/stat`) and the target's allocation, as
//! ratios to QEMU's. Prints markdown for `docs/benchmarks.md`.
//!
//! Run: `cargo bench -p bitmirror --bench mirror_vs_qsd`. Files live in
//! `$BENCH_DIR` (default `/var/tmp`); it needs 24 GiB of (sparse) room.
//! Every figure is the best of `RUNS` runs (the machine is shared).

#![allow(missing_docs)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use testkit::{StorageDaemon, run};

const RUNS: usize = 2;
const GIB: u64 = 1 << 30;

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
        match self {
            Daemon::Ours => StorageDaemon::start_program(
                Path::new(env!("CARGO_BIN_EXE_bitmirror")),
                &["serve"],
                dir,
                args,
            ),
            Daemon::Qemu => StorageDaemon::start(dir, args),
        }
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

struct Outcome {
    wall: f64,
    cpu: f64,
    allocated: u64,
}

/// One mirror of `source` into a fresh sparse raw `target` of the same
/// size, until READY.
fn mirror_once(who: Daemon, dir: &Path, source: &Path, size: u64) -> Outcome {
    let target = dir.join("target.raw");
    let _ = std::fs::remove_file(&target);
    run(
        "truncate",
        &["-s", &size.to_string(), target.to_str().unwrap_or_default()],
    );
    let node = |name: &str, path: &Path| {
        format!(
            "driver=raw,node-name={name},file.driver=file,file.filename={},file.aio=threads",
            path.display()
        )
    };
    let args = vec![
        "--blockdev".to_string(),
        node("src", source),
        "--blockdev".to_string(),
        node("dst", &target),
    ];
    let run_dir = dir.join(who.name().replace(' ', "-"));
    let _ = std::fs::create_dir_all(&run_dir);
    let mut daemon = who.start(&run_dir, &args);
    let mut qmp = daemon.qmp();
    let cpu0 = cpu_seconds(daemon.pid());
    let start = Instant::now();
    qmp.execute_ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full"}),
    );
    loop {
        let m = qmp.read_message();
        if m["event"] == "BLOCK_JOB_READY" {
            break;
        }
        assert!(
            m["event"] != "BLOCK_JOB_COMPLETED",
            "{}: the mirror ended early: {m}",
            who.name()
        );
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(daemon.pid()) - cpu0;
    qmp.execute_ok("block-job-cancel", json!({"device": "m"}));
    qmp.execute_ok("quit", json!({}));
    let _ = daemon.wait_exit();
    let allocated = std::fs::metadata(&target)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    Outcome {
        wall,
        cpu,
        allocated,
    }
}

fn best(who: Daemon, dir: &Path, source: &Path, size: u64) -> Outcome {
    let mut best: Option<Outcome> = None;
    for _ in 0..RUNS {
        let o = mirror_once(who, dir, source, size);
        if best.as_ref().is_none_or(|b| o.wall < b.wall) {
            best = Some(o);
        }
    }
    best.unwrap_or(Outcome {
        wall: f64::NAN,
        cpu: f64::NAN,
        allocated: 0,
    })
}

fn main() {
    let base =
        std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::tempdir_in(base).expect("a bench directory");
    // A 4 GiB source full of data, and a 16 GiB one with 10% data (1 MiB
    // every 10 MiB).
    let full = dir.path().join("full.raw");
    let full_s = full.to_str().unwrap_or_default();
    run("qemu-img", &["create", "-q", "-f", "raw", full_s, "4G"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 90 0 1G",
            "-c",
            "write -P 91 1G 1G",
            "-c",
            "write -P 92 2G 1G",
            "-c",
            "write -P 93 3G 1G",
            full_s,
        ],
    );
    let sparse = dir.path().join("sparse.raw");
    let sparse_s = sparse.to_str().unwrap_or_default();
    run("qemu-img", &["create", "-q", "-f", "raw", sparse_s, "16G"]);
    let writes: Vec<String> = (0..(16 * 1024 / 10))
        .map(|i| format!("write -P 7 {}M 1M", i * 10))
        .collect();
    let mut args = vec!["-f", "raw"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(sparse_s);
    run("qemu-io", &args);

    println!(
        "| case | daemon | time to READY | CPU | target allocated | time vs QEMU | CPU vs QEMU |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (case, source, size) in [
        ("full 4 GiB raw→raw", &full, 4 * GIB),
        ("sparse 16 GiB (10% data) raw→raw", &sparse, 16 * GIB),
    ] {
        let qemu = best(Daemon::Qemu, dir.path(), source, size);
        let ours = best(Daemon::Ours, dir.path(), source, size);
        for (who, o) in [(Daemon::Qemu, &qemu), (Daemon::Ours, &ours)] {
            println!(
                "| {case} | {} | {:.2} s | {:.2} s | {:.2} GiB | {:.2} | {:.2} |",
                who.name(),
                o.wall,
                o.cpu,
                o.allocated as f64 / GIB as f64,
                o.wall / qemu.wall,
                o.cpu / qemu.cpu.max(0.01),
            );
        }
    }
}
