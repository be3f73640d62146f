//! `bitmirror demo`: the founding workflow (DESIGN.md §1) end to end on
//! this machine, with nothing to set up. In a temporary directory it makes
//! a disk with realistic content (data that deflates, data that does not,
//! holes), starts two daemons (hosts A and B), and runs a synthetic guest
//! that keeps writing through NBD. Then:
//!
//! 1. a full backup into the shared image R, atomically with a new bitmap;
//! 2. a full-mode mirror of the same disk, cancelled at READY, for scale;
//! 3. an incremental migration A→B onto R while the guest writes; the
//!    guest moves to B; B is checked byte for byte against what the guest
//!    wrote;
//! 4. an incremental backup on B (R catches up, the bitmap resets);
//! 5. an incremental migration B→A; the guest moves back; A is checked.
//!
//! With `--rbd CEPH_CONF` the shared image R is an RBD image in that
//! cluster (removed at the end unless `--keep`), as in the founding patch.
//!
//! It prints what each step copied and took, and exits non-zero when a
//! check fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use block::{IoBuf, SocketAddress};
use nbd::client::{Client, ClientOptions};
use serde_json::json;
use tokio::sync::Mutex;

use crate::backup_cli::human;
use crate::migrate_cli::{self, MigrateArgs};
use crate::qmp_client::QmpClient;

/// The guest's unit of writing, and of checking.
const BLOCK: u64 = 64 << 10;

/// `bitmirror demo`'s options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The disk's size (suffixes K, M, G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Where to work (default: a new directory under the system's
    /// temporary directory, removed at the end).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the working directory (images, daemon logs), and R.
    #[arg(long)]
    keep: bool,
    /// Keep the shared image R on Ceph RBD, in the cluster this
    /// configuration file names (needs a bitmirror built with the `rbd`
    /// feature).
    #[arg(long, value_name = "CEPH_CONF")]
    rbd: Option<PathBuf>,
    /// The pool for R with `--rbd`.
    #[arg(long, default_value = "rbd", requires = "rbd")]
    rbd_pool: String,
}

/// Where the shared image R lives, and how each daemon opens it.
enum Shared {
    /// A qcow2 file.
    File(PathBuf),
    /// An RBD image.
    Rbd {
        pool: String,
        image: String,
        conf: String,
    },
}

impl Shared {
    /// R's node options for `blockdev-add`, named `R`.
    fn node(&self) -> serde_json::Value {
        match self {
            Shared::File(path) => json!({"driver": "qcow2", "node-name": "R",
                                         "file": {"driver": "file",
                                                  "filename": path.display().to_string()}}),
            Shared::Rbd { pool, image, conf } => json!({"driver": "rbd", "node-name": "R",
                                                        "pool": pool, "image": image,
                                                        "conf": conf}),
        }
    }

    /// R as a backing file name, and its format.
    fn backing(&self) -> (String, &'static str) {
        match self {
            Shared::File(path) => (path.display().to_string(), "qcow2"),
            Shared::Rbd { pool, image, conf } => (format!("rbd:{pool}/{image}:conf={conf}"), "raw"),
        }
    }

    /// Says where R is.
    fn describe(&self) -> String {
        match self {
            Shared::File(path) => path.display().to_string(),
            Shared::Rbd { pool, image, .. } => format!("RBD image {pool}/{image}"),
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (a number with K, M or G)"))?;
    let size = n
        .checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if size < 16 * BLOCK || size % BLOCK != 0 {
        return Err(format!(
            "the disk must be a multiple of 64 KiB and at least 1 MiB, not {s}"
        ));
    }
    Ok(size)
}

/// A daemon the demo started; killed when dropped.
struct Daemon {
    child: Child,
    qmp: PathBuf,
    nbd: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Asks the daemon to quit and waits (up to 30 s) until it has, so
    /// that it has let go of its images.
    fn quit(&mut self) {
        if let Ok(mut q) = self.qmp() {
            let _ = q.execute("quit", json!({}));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `bitmirror serve` in `dir` with an NBD server and a QMP socket there,
    /// plus `args`; its log in `dir/daemon.log`.
    fn start(dir: &Path, args: &[String]) -> anyhow::Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let exe = std::env::current_exe().context("cannot find this program")?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .args(args)
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                qmp.display()
            ))
            .args(["--monitor", "chardev=qmp"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start a daemon")?;
        let mut daemon = Daemon { child, qmp, nbd };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon.qmp.exists() {
            let exited = daemon.child.try_wait().ok().flatten().is_some();
            if exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
                bail!(
                    "the daemon in {} did not start: {}",
                    dir.display(),
                    log.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }

    fn qmp(&self) -> anyhow::Result<QmpClient> {
        QmpClient::connect(&self.qmp)
    }

    fn nbd_addr(&self) -> String {
        format!("unix:{}", self.nbd.display())
    }
}

/// 64 bits from `x` (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What block `i` holds after the guest's `generation`-th write to it (0:
/// the disk as made): a hole (4 in 10 blocks at first), text-like data (4
/// in 10) or noise.
fn content(i: u64, generation: u32, out: &mut [u8]) {
    let seed = mix(i ^ (u64::from(generation) << 40));
    let kind = if generation == 0 {
        seed % 10
    } else {
        4 + seed % 6
    };
    match kind {
        0..=3 => out.fill(0),
        4..=7 => {
            let line = format!("block {i} generation {generation}: the quick brown fox\n");
            for (o, b) in out.iter_mut().zip(line.bytes().cycle()) {
                *o = b;
            }
        }
        _ => {
            let mut x = seed | 1;
            for chunk in out.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let bytes = x.to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
        }
    }
}

/// The synthetic guest: writes whole blocks through NBD, remembering each
/// block's generation, so the disk's expected contents are known.
struct Guest {
    /// The connection; held by each write, and by [`Guest::pause`].
    client: Arc<Mutex<Client>>,
    generations: Arc<std::sync::Mutex<Vec<u32>>>,
    writes: Arc<AtomicU64>,
    /// The longest write since the last [`Guest::take_longest`], in µs.
    longest: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

impl Guest {
    async fn connect(address: &str, export: &str) -> anyhow::Result<Client> {
        let path = address.strip_prefix("unix:").unwrap_or(address);
        Client::connect(&ClientOptions {
            server: SocketAddress::Unix {
                path: path.to_owned(),
            },
            export: export.to_owned(),
            contexts: Vec::new(),
            tls: None,
            tls_hostname: None,
        })
        .await
        .with_context(|| format!("cannot reach export '{export}' at {address}"))
    }

    /// Starts writing `rate` bytes per second to export `export`.
    fn start(
        rt: &tokio::runtime::Runtime,
        address: &str,
        export: &str,
        size: u64,
        rate: u64,
    ) -> anyhow::Result<Guest> {
        let client = rt.block_on(Guest::connect(address, export))?;
        let guest = Guest {
            client: Arc::new(Mutex::new(client)),
            generations: Arc::new(std::sync::Mutex::new(vec![0; (size / BLOCK) as usize])),
            writes: Arc::new(AtomicU64::new(0)),
            longest: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            error: Arc::new(std::sync::Mutex::new(None)),
        };
        let (client, generations, writes, longest, stop, error) = (
            guest.client.clone(),
            guest.generations.clone(),
            guest.writes.clone(),
            guest.longest.clone(),
            guest.stop.clone(),
            guest.error.clone(),
        );
        let blocks = size / BLOCK;
        let pause = Duration::from_secs_f64(BLOCK as f64 / rate as f64);
        rt.spawn(async move {
            let mut data = vec![0u8; BLOCK as usize];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let i = mix(n ^ 0xd1b5) % blocks;
                let client = client.lock().await;
                let generation = lock(&generations)[i as usize] + 1;
                content(i, generation, &mut data);
                let t = Instant::now();
                let written = client.write(i * BLOCK, &data, false).await;
                longest.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Err(e) = written {
                    *lock(&error) = Some(format!("a guest write failed: {e}"));
                    return;
                }
                lock(&generations)[i as usize] = generation;
                writes.fetch_add(1, Ordering::Relaxed);
                drop(client);
                tokio::time::sleep(pause).await;
            }
        });
        Ok(guest)
    }

    /// Waits for the write in flight and holds the guest until the guard
    /// goes; the guard also lets the connection be replaced.
    fn pause(&self, rt: &tokio::runtime::Runtime) -> tokio::sync::OwnedMutexGuard<Client> {
        rt.block_on(self.client.clone().lock_owned())
    }

    /// The guest reconnects to `export` at `address` (it moved hosts).
    fn move_to(
        &self,
        rt: &tokio::runtime::Runtime,
        address: &str,
        export: &str,
    ) -> anyhow::Result<()> {
        let mut guard = self.pause(rt);
        let client = rt.block_on(Guest::connect(address, export))?;
        let old = std::mem::replace(&mut *guard, client);
        rt.block_on(old.disconnect());
        Ok(())
    }

    /// The longest a write took since the last call.
    fn take_longest(&self) -> Duration {
        Duration::from_micros(self.longest.swap(0, Ordering::Relaxed))
    }

    fn failed(&self) -> Option<String> {
        lock(&self.error).clone()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the whole disk through `export` at `address` and compares each
/// block with what the guest wrote; the first difference, if any.
fn verify(
    rt: &tokio::runtime::Runtime,
    guest: &Guest,
    address: &str,
    export: &str,
) -> anyhow::Result<Option<String>> {
    let _paused = guest.pause(rt);
    let generations = lock(&guest.generations).clone();
    rt.block_on(async {
        let client = Guest::connect(address, export).await?;
        let mut want = vec![0u8; BLOCK as usize];
        let chunk = 16u64;
        let mut first = None;
        for start in (0..generations.len() as u64).step_by(chunk as usize) {
            let n = chunk.min(generations.len() as u64 - start);
            let (r, buf) = client
                .read(start * BLOCK, IoBuf::zeroed((n * BLOCK) as usize, 1))
                .await;
            r.with_context(|| format!("reading {export} at {}", start * BLOCK))?;
            for k in 0..n {
                let i = start + k;
                content(i, generations[i as usize], &mut want);
                let got = &buf.as_slice()[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize];
                if got != want.as_slice() {
                    first = Some(format!(
                        "block at {} differs (expected generation {})",
                        i * BLOCK,
                        generations[i as usize]
                    ));
                    break;
                }
            }
            if first.is_some() {
                break;
            }
        }
        client.disconnect().await;
        Ok(first)
    })
}

/// Makes `path`, a qcow2 disk of `size` bytes with generation-0 contents.
fn make_disk(rt: &tokio::runtime::Runtime, path: &Path, size: u64) -> anyhow::Result<()> {
    block::create_qcow2(path, &block::Qcow2Create::new(size))?;
    rt.block_on(async {
        let graph = block::Graph::new();
        let o = json!({"driver": "qcow2", "node-name": "disk",
                       "file": {"driver": "file", "filename": path.display().to_string()}});
        let node = graph.add(&block::BlockdevOptions::from_json(&o)?).await?;
        let mut data = vec![0u8; BLOCK as usize];
        for i in 0..size / BLOCK {
            content(i, 0, &mut data);
            if data.iter().all(|&b| b == 0) {
                continue;
            }
            node.write(i * BLOCK, IoBuf::copy_from(&data, 1), false)
                .await
                .0?;
        }
        drop(node);
        graph.close_all().await?;
        anyhow::Ok(())
    })
}

/// Waits for job `job`'s `BLOCK_JOB_COMPLETED` (or READY with `ready`);
/// its `offset` (bytes copied).
fn wait_job(qmp: &mut QmpClient, job: &str, ready: bool) -> anyhow::Result<u64> {
    qmp.wait_block_job(job, ready, Duration::from_secs(600))
}

/// One row of the closing table.
struct Row {
    what: &'static str,
    copied: u64,
    took: Duration,
    cut_over: Option<Duration>,
    /// The guest's longest write during the step.
    guest_max: Duration,
}

/// Runs the demo; `Ok(false)` when a check failed.
pub fn demo(a: &DemoArgs) -> anyhow::Result<bool> {
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("bitmirror-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let result = run(a, &dir);
    if !a.keep && a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("the images and the daemons' logs are in {}", dir.display());
    }
    result
}

fn run(a: &DemoArgs, dir: &Path) -> anyhow::Result<bool> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let size = a.size;
    let (dir_a, dir_b, shared) = (dir.join("a"), dir.join("b"), dir.join("shared"));
    for d in [&dir_a, &dir_b, &shared] {
        std::fs::create_dir_all(d)?;
    }
    let disk = dir_a.join("disk0.qcow2");
    println!("making a {} disk with data, text and holes …", human(size));
    make_disk(&rt, &disk, size)?;
    let mut host_a = Daemon::start(
        &dir_a,
        &[
            "--blockdev".into(),
            format!(
                "driver=qcow2,node-name=disk0,file.driver=file,file.filename={}",
                disk.display()
            ),
            "--export".into(),
            "type=nbd,id=guest,node-name=disk0,name=disk0,writable=on".into(),
        ],
    )?;
    let mut host_b = Daemon::start(&dir_b, &[])?;
    // A guest writing about 8 MiB/s, a little over the disk each minute
    // at the default size.
    let guest = Guest::start(&rt, &host_a.nbd_addr(), "disk0", size, 8 << 20)?;

    // 1. A full backup into R, atomically with bitmap B.
    let r = match &a.rbd {
        None => {
            let r = shared.join("R.qcow2");
            block::create_qcow2(&r, &block::Qcow2Create::new(size))?;
            Shared::File(r)
        }
        Some(conf) => {
            let pool = a.rbd_pool.clone();
            let image = format!("bitmirror-demo-R-{}", std::process::id());
            let conf = std::path::absolute(conf)
                .unwrap_or(conf.clone())
                .display()
                .to_string();
            let mut qa = host_a.qmp()?;
            qa.execute(
                "blockdev-create",
                json!({"job-id": "create-R", "options": {"driver": "rbd", "size": size,
                       "location": {"pool": pool, "image": image, "conf": conf}}}),
            )?;
            migrate_cli::wait_concluded(&mut qa, "create-R").context("creating R on RBD")?;
            Shared::Rbd { pool, image, conf }
        }
    };
    println!("the shared image R is {}", r.describe());
    let result = workflow(&rt, a, &r, &host_a, &host_b, &dir_a, &dir_b, started, guest);
    for d in [&mut host_a, &mut host_b] {
        d.quit();
    }
    if !a.keep {
        remove_rbd(&rt, &r);
    }
    result
}

/// Steps 1 to 5 and the closing table.
#[allow(clippy::too_many_arguments)]
fn workflow(
    rt: &tokio::runtime::Runtime,
    a: &DemoArgs,
    r: &Shared,
    host_a: &Daemon,
    host_b: &Daemon,
    dir_a: &Path,
    dir_b: &Path,
    started: Instant,
    guest: Guest,
) -> anyhow::Result<bool> {
    let size = a.size;
    let mut rows = Vec::new();
    let mut ok = true;
    {
        let mut qa = host_a.qmp()?;
        qa.execute("blockdev-add", r.node())?;
        let t = Instant::now();
        qa.execute(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "disk0", "name": "B", "persistent": true,
                          "granularity": BLOCK}},
                {"type": "blockdev-backup",
                 "data": {"job-id": "full-backup", "device": "disk0", "target": "R",
                          "sync": "full"}}]}),
        )?;
        let copied = wait_job(&mut qa, "full-backup", false)?;
        qa.execute("blockdev-del", json!({"node-name": "R"}))?;
        rows.push(Row {
            what: "full backup A → R (with bitmap B)",
            copied,
            took: t.elapsed(),
            cut_over: None,
            guest_max: guest.take_longest(),
        });
    }
    println!("full backup done; the guest keeps writing …");

    // 2. For scale: a full-mode mirror of the same disk into a scratch
    // image on B, cancelled at READY (a point-in-time copy).
    {
        let scratch = dir_b.join("scratch.qcow2");
        block::create_qcow2(&scratch, &block::Qcow2Create::new(size))?;
        let mut qb = host_b.qmp()?;
        qb.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "scratch",
                   "file": {"driver": "file", "filename": scratch.display().to_string()}}),
        )?;
        qb.execute(
            "block-export-add",
            json!({"type": "nbd", "id": "scratch", "node-name": "scratch", "name": "scratch",
                   "writable": true}),
        )?;
        let mut qa = host_a.qmp()?;
        qa.execute(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "scratch-b", "export": "scratch",
                   "server": {"type": "unix", "path": host_b.nbd.display().to_string()}}),
        )?;
        let t = Instant::now();
        qa.execute(
            "blockdev-mirror",
            json!({"job-id": "full-mirror", "device": "disk0", "target": "scratch-b",
                   "sync": "full"}),
        )?;
        wait_job(&mut qa, "full-mirror", true)?;
        qa.execute("block-job-cancel", json!({"device": "full-mirror"}))?;
        let copied = wait_job(&mut qa, "full-mirror", false)?;
        rows.push(Row {
            what: "full mirror A → B (for comparison)",
            copied,
            took: t.elapsed(),
            cut_over: None,
            guest_max: guest.take_longest(),
        });
        qa.execute("blockdev-del", json!({"node-name": "scratch-b"}))?;
        // (A has just let go; its disconnect may not have reached B yet.)
        qb.execute("block-export-del", json!({"id": "scratch", "mode": "hard"}))?;
        qb.execute("blockdev-del", json!({"node-name": "scratch"}))?;
        let _ = std::fs::remove_file(&scratch);
    }

    // 3. Incremental migration A → B while the guest writes.
    let to_b = MigrateArgs {
        from: host_a.qmp.clone(),
        to: host_b.qmp.clone(),
        node: "disk0".into(),
        dest_image: dir_b.join("disk0.qcow2"),
        dest_nbd: host_b.nbd_addr(),
        bitmap: Some("B".into()),
        base: Some(r.backing().0),
        base_format: r.backing().1.into(),
        source_nbd: Some(host_a.nbd_addr()),
        speed: 0,
        tls_creds: None,
    };
    guest.take_longest();
    let s = migrate_cli::run(&to_b).context("migrating A → B")?;
    rows.push(Row {
        what: "incremental migration A → B",
        copied: s.copied,
        took: s.duration,
        cut_over: Some(s.cut_over),
        guest_max: guest.take_longest(),
    });
    // The guest moves to B; A lets go of the old disk.
    guest.move_to(rt, &host_b.nbd_addr(), &s.export)?;
    {
        let mut qa = host_a.qmp()?;
        qa.execute("block-export-del", json!({"id": "guest", "mode": "hard"}))?;
        qa.execute(
            "blockdev-del",
            json!({"node-name": "bitmirror-migrate-disk0"}),
        )?;
        qa.execute("blockdev-del", json!({"node-name": "disk0"}))?;
    }
    ok &= check(rt, &guest, &host_b.nbd_addr(), &s.export, "B")?;

    // 4. An incremental backup on B brings R up to date and resets B.
    {
        let mut qb = host_b.qmp()?;
        qb.execute("blockdev-add", r.node())?;
        let t = Instant::now();
        qb.execute(
            "blockdev-backup",
            json!({"job-id": "incremental-backup", "device": "disk0", "target": "R",
                   "sync": "bitmap", "bitmap": "B", "bitmap-mode": "on-success"}),
        )?;
        let copied = wait_job(&mut qb, "incremental-backup", false)?;
        qb.execute("blockdev-del", json!({"node-name": "R"}))?;
        rows.push(Row {
            what: "incremental backup B → R",
            copied,
            took: t.elapsed(),
            cut_over: None,
            guest_max: guest.take_longest(),
        });
    }
    std::thread::sleep(Duration::from_millis(500));

    // 5. Incremental migration B → A onto the updated R.
    let to_a = MigrateArgs {
        from: host_b.qmp.clone(),
        to: host_a.qmp.clone(),
        dest_image: dir_a.join("disk0.back.qcow2"),
        dest_nbd: host_a.nbd_addr(),
        source_nbd: Some(host_b.nbd_addr()),
        ..to_b
    };
    guest.take_longest();
    let s = migrate_cli::run(&to_a).context("migrating B → A")?;
    rows.push(Row {
        what: "incremental migration B → A",
        copied: s.copied,
        took: s.duration,
        cut_over: Some(s.cut_over),
        guest_max: guest.take_longest(),
    });
    guest.move_to(rt, &host_a.nbd_addr(), &s.export)?;
    ok &= check(rt, &guest, &host_a.nbd_addr(), &s.export, "A")?;

    guest.stop.store(true, Ordering::Relaxed);
    if let Some(e) = guest.failed() {
        println!("FAILED: {e}");
        ok = false;
    }
    let writes = guest.writes.load(Ordering::Relaxed);
    println!();
    println!("| step | copied | time | cut-over | guest's longest write |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let cut = r.cut_over.map_or("—".to_owned(), |c| {
            format!("{:.0} ms", c.as_secs_f64() * 1e3)
        });
        println!(
            "| {} | {} | {:.2} s | {cut} | {:.1} ms |",
            r.what,
            human(r.copied),
            r.took.as_secs_f64(),
            r.guest_max.as_secs_f64() * 1e3,
        );
    }
    println!();
    println!(
        "the guest wrote {} blocks of 64 KiB meanwhile; the demo took {:.1} s: {}",
        writes,
        started.elapsed().as_secs_f64(),
        if ok {
            "all checks passed"
        } else {
            "SOME CHECKS FAILED"
        }
    );
    Ok(ok)
}

/// Removes R from the cluster.
fn remove_rbd(rt: &tokio::runtime::Runtime, r: &Shared) {
    let Shared::Rbd { pool, image, conf } = r else {
        return;
    };
    #[cfg(feature = "rbd")]
    let result = rt.block_on(async {
        let options = block::options::RbdOptions {
            pool: pool.clone(),
            image: image.clone(),
            conf: Some(conf.clone()),
            ..Default::default()
        };
        let pool = rbd::RbdFactory::default().pool(&options, true).await?;
        let name = image.clone();
        tokio::task::spawn_blocking(move || pool.remove(&name))
            .await
            .map_err(|e| rbd::Error::Invalid(e.to_string()))?
    });
    #[cfg(not(feature = "rbd"))]
    let result: Result<(), String> = {
        let _ = (rt, conf);
        Err("this bitmirror was built without RBD support".into())
    };
    if let Err(e) = result {
        println!("could not remove the RBD image {pool}/{image}: {e}; remove it with `rbd rm`");
    }
}

/// Verifies the disk behind `export` and says so.
fn check(
    rt: &tokio::runtime::Runtime,
    guest: &Guest,
    address: &str,
    export: &str,
    host: &str,
) -> anyhow::Result<bool> {
    match verify(rt, guest, address, export)? {
        None => {
            println!("host {host}: the disk reads exactly what the guest wrote");
            Ok(true)
        }
        Some(diff) => {
            println!("FAILED on host {host}: {diff}");
            Ok(false)
        }
    }
}
