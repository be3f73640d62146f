//! `bitmirror backup` and `bitmirror verify`: backups of a running daemon's
//! node into a chain of qcow2 files, for humans.
//!
//! A chain lives in one directory: `NODE.0.qcow2` is a full backup,
//! `NODE.N.qcow2` holds what changed between backups N-1 and N and has
//! `NODE.(N-1).qcow2` as its backing file, so the top of the chain reads
//! as the node did when the last backup started. A dirty bitmap on the
//! node (`bitmirror-backup` by default) records the writes since the last
//! backup; each backup resets it atomically at its point in time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::qmp_client::QmpClient;

/// `bitmirror backup`'s options.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The daemon's QMP socket.
    #[arg(long, value_name = "PATH")]
    qmp: PathBuf,
    /// The node to back up.
    #[arg(long)]
    node: String,
    /// The directory that holds the chain (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The dirty bitmap that records the writes between backups.
    #[arg(long, default_value = "bitmirror-backup")]
    bitmap: String,
    /// Make a new bitmap persistent (stored with the image, kept across
    /// daemon restarts).
    #[arg(long)]
    persistent: bool,
    /// Speed limit in bytes per second (0: none).
    #[arg(long, default_value_t = 0)]
    speed: u64,
}

/// `bitmirror verify`'s options.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The image to check (e.g. a chain's top), read through its backing
    /// chain: a file (qcow2 or raw) or an NBD URI.
    image: String,
    /// What it must equal: a file (qcow2 or raw) or an NBD URI
    /// (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`).
    source: String,
}

/// The chain's file for `level`.
fn level_path(dir: &Path, node: &str, level: u64) -> PathBuf {
    dir.join(format!("{node}.{level}.qcow2"))
}

/// The highest level in the chain, if any.
fn top_level(dir: &Path, node: &str) -> anyhow::Result<Option<u64>> {
    let mut top = None;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let level = name
            .strip_prefix(node)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".qcow2"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(l) = level {
            top = top.max(Some(l));
        }
    }
    Ok(top)
}

/// The node's entry in `query-named-block-nodes`.
pub(crate) fn node_info(qmp: &mut QmpClient, node: &str) -> anyhow::Result<Value> {
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"] == node)
        .cloned()
        .with_context(|| format!("the daemon has no node '{node}'"))
}

/// Runs one backup: a full one when the directory holds no chain yet,
/// else the next incremental level.
pub fn backup(a: &BackupArgs) -> anyhow::Result<()> {
    let mut qmp = QmpClient::connect(&a.qmp)?;
    let info = node_info(&mut qmp, &a.node)?;
    let size = info["image"]["virtual-size"]
        .as_u64()
        .context("the daemon did not say the node's size")?;
    let has_bitmap = info["dirty-bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|b| b["name"] == a.bitmap.as_str());
    let top = top_level(&a.dir, &a.node)?;
    let level = match top {
        None => 0,
        Some(_) if !has_bitmap => bail!(
            "node '{}' has no bitmap '{}', so the chain in {} cannot go on (the daemon was \
             restarted without a persistent bitmap?): start a new chain in another directory",
            a.node,
            a.bitmap,
            a.dir.display()
        ),
        Some(t) => t + 1,
    };
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let image = level_path(&a.dir, &a.node, level);
    let image = std::path::absolute(&image).unwrap_or(image);
    let backing = (level > 0).then(|| {
        // Relative, so the chain can move as a whole.
        (
            format!("{}.{}.qcow2", a.node, level - 1),
            "qcow2".to_owned(),
        )
    });
    let create = block::Qcow2Create {
        size,
        cluster_size: 1 << 16,
        backing,
    };
    block::create_qcow2(&image, &create)
        .with_context(|| format!("cannot create {}", image.display()))?;
    let result = run_backup(&mut qmp, a, &image, level, size, has_bitmap);
    if result.is_err() {
        let _ = std::fs::remove_file(&image);
    }
    result
}

fn run_backup(
    qmp: &mut QmpClient,
    a: &BackupArgs,
    image: &Path,
    level: u64,
    size: u64,
    has_bitmap: bool,
) -> anyhow::Result<()> {
    let target = format!("bitmirror-backup-{level}");
    let job = "bitmirror-backup";
    qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": target,
               "file": {"driver": "file", "filename": image.display().to_string()}}),
    )?;
    let mut backup = json!({"job-id": job, "device": a.node, "target": target,
                            "speed": a.speed});
    let actions = match (level, has_bitmap) {
        // A full backup that resets the bitmap at its point in time.
        (0, true) => {
            backup["sync"] = json!("full");
            backup["bitmap"] = json!(a.bitmap);
            backup["bitmap-mode"] = json!("on-success");
            vec![json!({"type": "blockdev-backup", "data": backup})]
        }
        // A full backup and a new bitmap, together.
        (0, false) => {
            backup["sync"] = json!("full");
            vec![
                json!({"type": "block-dirty-bitmap-add",
                       "data": {"node": a.node, "name": a.bitmap, "persistent": a.persistent}}),
                json!({"type": "blockdev-backup", "data": backup}),
            ]
        }
        _ => {
            backup["sync"] = json!("bitmap");
            backup["bitmap"] = json!(a.bitmap);
            backup["bitmap-mode"] = json!("on-success");
            vec![json!({"type": "blockdev-backup", "data": backup})]
        }
    };
    let started = Instant::now();
    let outcome = qmp
        .execute("transaction", json!({ "actions": actions }))
        .and_then(|_| follow(qmp, job));
    let _ = qmp.execute("blockdev-del", json!({"node-name": target}));
    let copied = outcome?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} backup of '{}' (level {level}): copied {} of {} ({:.1}%) in {secs:.1} s → {}",
        if level == 0 { "full" } else { "incremental" },
        a.node,
        human(copied),
        human(size),
        copied as f64 * 100.0 / size.max(1) as f64,
        image.display()
    );
    Ok(())
}

/// Follows job `job` to its end with a progress bar; the bytes it copied.
fn follow(qmp: &mut QmpClient, job: &str) -> anyhow::Result<u64> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        while let Some(e) = qmp.next_event(Duration::from_millis(100))? {
            if e["data"]["device"] != job {
                continue;
            }
            match e["event"].as_str() {
                Some("BLOCK_JOB_COMPLETED") => {
                    bar.finish_and_clear();
                    if let Some(err) = e["data"]["error"].as_str() {
                        bail!("the backup failed: {err}");
                    }
                    return Ok(e["data"]["offset"].as_u64().unwrap_or(0));
                }
                Some("BLOCK_JOB_CANCELLED") => {
                    bar.finish_and_clear();
                    bail!("the backup was cancelled");
                }
                _ => {}
            }
        }
        let jobs = qmp.execute("query-block-jobs", json!({}))?;
        if let Some(j) = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["device"] == job)
        {
            bar.set_length(j["len"].as_u64().unwrap_or(0));
            bar.set_position(j["offset"].as_u64().unwrap_or(0));
        }
    }
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Block-layer options that open `spec` read-only: an NBD URI, or a file
/// (qcow2 when it starts with qcow2's magic, else raw).
fn open_options(spec: &str, name: &str) -> anyhow::Result<block::BlockdevOptions> {
    let file = match crate::serve::nbd_filename(spec) {
        Some(nbd) => nbd,
        None => {
            let mut magic = [0u8; 4];
            std::fs::File::open(spec)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .with_context(|| format!("cannot read {spec}"))?;
            let format = if magic == *b"QFI\xfb" { "qcow2" } else { "raw" };
            json!({"driver": format, "file": {"driver": "file", "filename": spec}})
        }
    };
    let mut o = if file["driver"] == "nbd" {
        json!({"driver": "raw", "file": file})
    } else {
        file
    };
    o["node-name"] = json!(name);
    o["read-only"] = json!(true);
    block::BlockdevOptions::from_json(&o).map_err(|e| anyhow::anyhow!("{spec}: {e}"))
}

/// Compares `image` with `source`, byte for byte; `Ok(true)` when equal.
pub fn verify(a: &VerifyArgs) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async {
        let graph = Arc::new(block::Graph::new());
        nbd::register(&graph);
        let image = graph
            .add(&open_options(&a.image, "image")?)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", a.image))?;
        let source = graph
            .add(&open_options(&a.source, "source")?)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", a.source))?;
        if image.length() != source.length() {
            println!(
                "{} is {} bytes, {} is {}",
                a.image,
                image.length(),
                a.source,
                source.length()
            );
            return Ok(false);
        }
        let len = image.length();
        let chunk = 1u64 << 20;
        let mut at = 0;
        while at < len {
            let n = chunk.min(len - at) as usize;
            let (x, y) = (image.read(at, n).await?, source.read(at, n).await?);
            if let Some(i) = x
                .as_slice()
                .iter()
                .zip(y.as_slice())
                .position(|(p, q)| p != q)
            {
                println!(
                    "{} and {} differ at byte {}",
                    a.image,
                    a.source,
                    at + i as u64
                );
                return Ok(false);
            }
            at += n as u64;
        }
        println!(
            "{} and {} are identical ({})",
            a.image,
            a.source,
            human(len)
        );
        graph.close_all().await?;
        Ok(true)
    })
}
