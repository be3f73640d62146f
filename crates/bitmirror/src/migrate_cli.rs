//! `bitmirror migrate`: live storage migration of one node between two
//! running daemons, driven over their QMP sockets (DESIGN.md §1, steps 3
//! and 4). Only QEMU's commands plus `block-dirty-bitmap-pull` are used, so
//! the destination may be qemu-storage-daemon when no bitmap moves.
//!
//! 1. On the destination: an overlay image (`blockdev-create`, backed by
//!    the shared base image when one is given), opened and exported
//!    writable over NBD; a bitmap of the same granularity for each bitmap
//!    that will move, recording from now on.
//! 2. On the source: an NBD node for that export, and a mirror into it —
//!    `sync=bitmap, bitmap-mode=never` from the given bitmap (only what
//!    changed since the base was made), or `sync=full`.
//! 3. READY, then the cut-over (`block-job-complete`): the source's writes
//!    are held, the last dirty blocks copied, and every user of the source
//!    (its exports) moved onto the NBD node, so guest I/O goes on, to the
//!    destination. The pause is reported as the downtime.
//! 4. The bitmaps: disabled on the source (nothing writes there any more),
//!    published on a read-only export, pulled into the destination's.
//!
//! Anything that fails before the cut-over cancels the mirror and removes
//! what was made on both sides: the source stays authoritative and
//! unchanged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::backup_cli::{human, node_info};
use crate::qmp_client::QmpClient;

/// `bitmirror migrate`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// The source daemon's QMP socket.
    #[arg(long, value_name = "PATH")]
    pub(crate) from: PathBuf,
    /// The destination daemon's QMP socket.
    #[arg(long, value_name = "PATH")]
    pub(crate) to: PathBuf,
    /// The node to migrate (on the source; the destination's node gets the
    /// same name).
    #[arg(long)]
    pub(crate) node: String,
    /// The destination's image to create (qcow2).
    #[arg(long, value_name = "PATH")]
    pub(crate) dest_image: PathBuf,
    /// Where the destination's NBD server listens, as the source reaches it:
    /// `unix:PATH` or `HOST:PORT`. Started there if it is not running.
    #[arg(long, value_name = "ADDR")]
    pub(crate) dest_nbd: String,
    /// Migrate incrementally: mirror only what this bitmap marks (the
    /// writes since the base image was made), and move the bitmap along.
    #[arg(long)]
    pub(crate) bitmap: Option<String>,
    /// The shared base image the destination's overlay is backed by (the
    /// full backup), as the destination opens it: a path, or an RBD image
    /// as QEMU names it (`rbd:POOL/IMAGE[:conf=PATH][:id=USER]`).
    #[arg(long, value_name = "PATH|rbd:…")]
    pub(crate) base: Option<String>,
    /// The base image's format.
    #[arg(long, default_value = "qcow2")]
    pub(crate) base_format: String,
    /// Where the source's NBD server listens, as the destination reaches
    /// it (`unix:PATH` or `HOST:PORT`): needed to move bitmaps. Started
    /// there if it is not running.
    #[arg(long, value_name = "ADDR")]
    pub(crate) source_nbd: Option<String>,
    /// Speed limit of the mirror in bytes per second (0: none).
    #[arg(long, default_value_t = 0)]
    pub(crate) speed: u64,
    /// Talk NBD over TLS: the id of a `tls-creds-x509` object with
    /// `endpoint=client` that both daemons have (the source's mirror
    /// connects with it, the destination pulls the bitmaps with it). Both
    /// NBD servers must already run with TLS credentials of their own.
    #[arg(long, value_name = "ID")]
    pub(crate) tls_creds: Option<String>,
}

/// The `driver=rbd` options of a base named `rbd:…`; `None` for a path.
fn rbd_base(base: &str) -> anyhow::Result<Option<Value>> {
    if !base.starts_with("rbd:") {
        return Ok(None);
    }
    let Some(rbd) = block::options::rbd_filename(base) else {
        bail!("'{base}' is not an RBD image name (rbd:POOL/IMAGE[:conf=PATH][:id=USER])");
    };
    if let Some((key, _)) = rbd.conf_pairs.first() {
        bail!(
            "'{base}': put '{key}' in the Ceph configuration file; only conf= and id= \
             can be given in the name"
        );
    }
    Ok(Some(rbd.to_qapi()))
}

/// QAPI's `SocketAddress` for `unix:PATH` or `HOST:PORT`.
fn socket_address(spec: &str) -> anyhow::Result<Value> {
    if let Some(path) = spec.strip_prefix("unix:") {
        return Ok(json!({"type": "unix", "path": path}));
    }
    match spec.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.is_empty() => {
            Ok(json!({"type": "inet", "host": host.trim_matches(['[', ']']), "port": port}))
        }
        _ => bail!("'{spec}' is not an address: use unix:PATH or HOST:PORT"),
    }
}

/// The legacy form `nbd-server-start` takes.
fn legacy_address(address: &Value) -> Value {
    let mut data = address.clone();
    if let Some(o) = data.as_object_mut() {
        o.remove("type");
    }
    json!({"type": address["type"], "data": data})
}

/// Starts an NBD server on `address` unless one runs; whether it started.
fn ensure_nbd_server(qmp: &mut QmpClient, address: &Value) -> anyhow::Result<bool> {
    match qmp.execute("nbd-server-start", json!({"addr": legacy_address(address)})) {
        Ok(_) => Ok(true),
        Err(e) if e.to_string().contains("already running") => Ok(false),
        Err(e) => Err(e),
    }
}

/// A bitmap of the source node that moves with it.
#[derive(Debug, Clone)]
struct Moving {
    name: String,
    granularity: u64,
    persistent: bool,
}

/// A bitmap that stays behind: its name and why.
type Skipped = (String, String);

/// What the migration made, to undo on failure.
#[derive(Debug, Default)]
struct Made {
    dest_base_node: bool,
    dest_file_node: bool,
    dest_node: bool,
    dest_export: bool,
    dest_server: bool,
    image: Option<PathBuf>,
    source_target: bool,
    job: bool,
    /// `block-job-complete` was sent: from here the switch may have
    /// happened, and the destination may hold the only copy of new writes.
    completing: bool,
}

/// What a migration did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The node's size.
    pub size: u64,
    /// Bytes the mirror copied.
    pub copied: u64,
    /// From the start to the bitmaps' arrival.
    pub duration: Duration,
    /// From `block-job-complete` to the job's end: the longest the
    /// guest's writes were held.
    pub cut_over: Duration,
    /// The bitmaps moved, with their dirty bytes on arrival.
    pub bitmaps: Vec<(String, u64)>,
    /// The export the destination serves the node as.
    pub export: String,
}

/// Set by SIGINT or SIGTERM while `bitmirror migrate` runs: the
/// migration stops before the cut-over and undoes what it made.
fn interrupted() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Fails when the user interrupted the migration.
fn check_interrupted() -> anyhow::Result<()> {
    if interrupted().load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs one migration; prints its summary. The first Ctrl-C (or SIGTERM)
/// before the cut-over stops it and undoes what it made on both daemons;
/// a second one ends the process at once.
pub fn migrate(a: &MigrateArgs) -> anyhow::Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let flag = interrupted().clone();
        signal_hook::flag::register_conditional_shutdown(signal, 130, flag.clone())
            .and_then(|_| signal_hook::flag::register(signal, flag))
            .context("cannot handle Ctrl-C")?;
    }
    let s = run(a)?;
    println!(
        "migrated '{}' ({} mirror): copied {} of {} ({:.1}%) in {:.1} s; cut-over {:.0} ms",
        a.node,
        if a.bitmap.is_some() {
            "incremental"
        } else {
            "full"
        },
        human(s.copied),
        human(s.size),
        s.copied as f64 * 100.0 / s.size.max(1) as f64,
        s.duration.as_secs_f64(),
        s.cut_over.as_secs_f64() * 1e3,
    );
    for (name, count) in &s.bitmaps {
        println!("bitmap '{name}' moved: {} dirty", human(*count));
    }
    println!(
        "guests now reach the disk through the source's exports, forwarded to export '{}' at \
         {}; connect them there directly to retire the source",
        s.export, a.dest_nbd
    );
    Ok(())
}

/// Runs one migration (see the module documentation).
pub fn run(a: &MigrateArgs) -> anyhow::Result<Summary> {
    let mut src = QmpClient::connect(&a.from).context("the source daemon")?;
    let mut dst = QmpClient::connect(&a.to).context("the destination daemon")?;
    let info = node_info(&mut src, &a.node)?;
    let size = info["image"]["virtual-size"]
        .as_u64()
        .context("the source did not say the node's size")?;
    let (moving, skipped) = bitmaps_to_move(&info, a)?;
    if !moving.is_empty() && a.source_nbd.is_none() {
        bail!(
            "bitmaps {} must move with the node: give --source-nbd (where the destination \
             reaches the source's NBD server)",
            names(&moving)
        );
    }
    for (name, why) in &skipped {
        eprintln!("bitmirror: bitmap '{name}' stays behind: {why}");
    }
    let dest_address = socket_address(&a.dest_nbd)?;
    let source_address = a.source_nbd.as_deref().map(socket_address).transpose()?;
    let export = format!("bitmirror-migrate-{}", a.node);
    let mut made = Made::default();
    let started = Instant::now();
    let result = prepare_and_mirror(
        &mut src,
        &mut dst,
        a,
        size,
        &moving,
        &dest_address,
        &export,
        &mut made,
    );
    let (cut_over, copied) = match result {
        Ok(r) => r,
        Err(e) if made.completing && !cut_over_refused(&mut src, &export) => {
            return Err(e.context(format!(
                "the cut-over may have happened, so nothing was removed: see the source's job \
                 '{export}' (query-jobs) and whether its exports now use node '{export}'"
            )));
        }
        Err(e) => {
            undo(&mut src, &mut dst, a, &export, &made);
            return Err(e.context(
                "the migration failed before the cut-over; the source is unchanged and still \
                 in charge",
            ));
        }
    };
    let mut bitmaps = Vec::new();
    if let Some(address) = &source_address {
        bitmaps = move_bitmaps(&mut src, &mut dst, a, &moving, address)
            .context("the node moved, but its bitmaps did not")?;
    }
    Ok(Summary {
        size,
        copied,
        duration: started.elapsed(),
        cut_over,
        bitmaps,
        export,
    })
}

fn names(moving: &[Moving]) -> String {
    moving
        .iter()
        .map(|m| format!("'{}'", m.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bitmaps that move: `--bitmap` and every persistent bitmap of the
/// node; a busy one (a backup is using it) is skipped with a reason
/// rather than failing the whole migration — except `--bitmap`, which the
/// mirror needs.
fn bitmaps_to_move(info: &Value, a: &MigrateArgs) -> anyhow::Result<(Vec<Moving>, Vec<Skipped>)> {
    let all = info["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if let Some(b) = &a.bitmap {
        let Some(bm) = all.iter().find(|x| x["name"] == b.as_str()) else {
            bail!(
                "node '{}' has no bitmap '{b}': migrate without --bitmap (a full mirror)",
                a.node
            );
        };
        if bm["busy"] == true {
            bail!("bitmap '{b}' is in use by another operation (a backup?): try again later");
        }
        if bm["inconsistent"] == true {
            bail!("bitmap '{b}' is inconsistent (a crash?): migrate without --bitmap");
        }
    }
    let (mut moving, mut skipped) = (Vec::new(), Vec::new());
    for bm in &all {
        let Some(name) = bm["name"].as_str() else {
            continue;
        };
        let chosen = a.bitmap.as_deref() == Some(name);
        if !chosen && bm["persistent"] != true {
            continue;
        }
        if bm["busy"] == true {
            skipped.push((name.to_owned(), "it is in use by another operation".into()));
        } else if bm["inconsistent"] == true {
            skipped.push((name.to_owned(), "it is inconsistent".into()));
        } else {
            moving.push(Moving {
                name: name.to_owned(),
                granularity: bm["granularity"].as_u64().unwrap_or(1 << 16),
                persistent: bm["persistent"] == true,
            });
        }
    }
    Ok((moving, skipped))
}

/// Waits for job `id` on `qmp` to conclude; its error, if it had one.
pub(crate) fn wait_concluded(qmp: &mut QmpClient, id: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = qmp.execute("query-jobs", json!({}))?;
        if let Some(j) = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["id"] == id)
        {
            if j["status"] == "concluded" {
                let error = j["error"].as_str().map(str::to_owned);
                qmp.execute("job-dismiss", json!({"id": id}))?;
                return match error {
                    Some(e) => bail!("{e}"),
                    None => Ok(()),
                };
            }
        }
        if Instant::now() > deadline {
            bail!("job '{id}' did not finish within a minute");
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Steps 1 to 3; returns the cut-over's length and the bytes the mirror
/// copied.
#[allow(clippy::too_many_arguments)]
fn prepare_and_mirror(
    src: &mut QmpClient,
    dst: &mut QmpClient,
    a: &MigrateArgs,
    size: u64,
    moving: &[Moving],
    dest_address: &Value,
    export: &str,
    made: &mut Made,
) -> anyhow::Result<(Duration, u64)> {
    let image = std::path::absolute(&a.dest_image).unwrap_or(a.dest_image.clone());
    if image.exists() {
        bail!(
            "{} exists already: choose a new --dest-image",
            image.display()
        );
    }
    let filename = image.display().to_string();
    let file_node = format!("{}-file", a.node);
    dst.execute(
        "blockdev-create",
        json!({"job-id": "bitmirror-create", "options":
               {"driver": "file", "filename": filename, "size": 0}}),
    )?;
    made.image = Some(image.clone());
    wait_concluded(dst, "bitmirror-create").context("creating the destination's file")?;
    dst.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": file_node, "filename": filename}),
    )?;
    made.dest_file_node = true;
    let mut qcow2 = json!({"driver": "qcow2", "file": file_node, "size": size});
    if let Some(base) = &a.base {
        qcow2["backing-file"] = json!(base);
        qcow2["backing-fmt"] = json!(a.base_format);
    }
    // An RBD base is opened here, as the command line names it, rather than
    // from the overlay's header (bitmirror opens protocol names in headers
    // only with x-backing-protocols=on; see docs/security.md).
    let base_node = match a.base.as_deref().map(rbd_base).transpose()?.flatten() {
        Some(rbd) => {
            let name = format!("{}-base", a.node);
            dst.execute(
                "blockdev-add",
                json!({"driver": a.base_format, "node-name": name, "read-only": true,
                       "file": rbd}),
            )
            .context("opening the base image on the destination")?;
            made.dest_base_node = true;
            Some(name)
        }
        None => None,
    };
    dst.execute(
        "blockdev-create",
        json!({"job-id": "bitmirror-create", "options": qcow2}),
    )?;
    wait_concluded(dst, "bitmirror-create").context("creating the destination's overlay")?;
    let mut overlay = json!({"driver": "qcow2", "node-name": a.node, "file": file_node});
    if let Some(base) = &base_node {
        overlay["backing"] = json!(base);
    }
    dst.execute("blockdev-add", overlay)?;
    made.dest_node = true;
    for m in moving {
        // Disabled while the mirror copies (it would mark every block it
        // writes), enabled just before the cut-over.
        dst.execute(
            "block-dirty-bitmap-add",
            json!({"node": a.node, "name": m.name, "granularity": m.granularity,
                   "persistent": m.persistent, "disabled": true}),
        )?;
    }
    made.dest_server = ensure_nbd_server(dst, dest_address)?;
    dst.execute(
        "block-export-add",
        json!({"type": "nbd", "id": export, "node-name": a.node, "name": export,
               "writable": true}),
    )?;
    made.dest_export = true;

    let target = format!("bitmirror-migrate-{}", a.node);
    let mut nbd_node = json!({"driver": "nbd", "node-name": target, "server": dest_address,
                              "export": export});
    if let Some(id) = &a.tls_creds {
        nbd_node["tls-creds"] = json!(id);
    }
    src.execute("blockdev-add", nbd_node)?;
    made.source_target = true;
    let mut mirror = json!({"job-id": target, "device": a.node, "target": target,
                            "speed": a.speed, "auto-dismiss": false});
    match &a.bitmap {
        Some(b) => {
            mirror["sync"] = json!("bitmap");
            mirror["bitmap"] = json!(b);
            mirror["bitmap-mode"] = json!("never");
        }
        None => mirror["sync"] = json!("full"),
    }
    src.execute("blockdev-mirror", mirror)?;
    made.job = true;
    follow_to_ready(src, &target)?;
    // The destination's bitmaps record from now on: what the mirror
    // copied so far is in the source's bitmaps anyway (they are pulled),
    // and guest writes after the switch must be recorded here.
    for m in moving {
        dst.execute(
            "block-dirty-bitmap-enable",
            json!({"node": a.node, "name": m.name}),
        )?;
    }
    let cut = Instant::now();
    made.completing = true;
    src.execute("block-job-complete", json!({"device": target}))?;
    let total = src
        .wait_block_job(&target, false, Duration::from_secs(300))
        .context("the cut-over failed")?;
    let downtime = cut.elapsed();
    made.job = false;
    let _ = src.execute("job-dismiss", json!({"id": target}));
    Ok((downtime, total))
}

/// Follows the mirror with a progress bar (bytes, rate, ETA, and the
/// dirty backlog) until it is READY.
fn follow_to_ready(qmp: &mut QmpClient, job: &str) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, \
             {eta}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        if let Err(e) = check_interrupted() {
            bar.finish_and_clear();
            return Err(e);
        }
        while let Some(e) = qmp.next_event(Duration::from_millis(100))? {
            if e["data"]["device"] != job && e["data"]["id"] != job {
                continue;
            }
            match e["event"].as_str() {
                Some("BLOCK_JOB_READY") => {
                    bar.finish_and_clear();
                    return Ok(());
                }
                Some("BLOCK_JOB_COMPLETED") | Some("BLOCK_JOB_CANCELLED") => {
                    bar.finish_and_clear();
                    let why = e["data"]["error"].as_str().unwrap_or("it was cancelled");
                    bail!("the mirror ended before it was ready: {why}");
                }
                Some("JOB_STATUS_CHANGE") if e["data"]["status"] == "concluded" => {
                    bar.finish_and_clear();
                    bail!("the mirror ended before it was ready");
                }
                _ => {}
            }
        }
        let jobs = qmp.execute("query-block-jobs", json!({}))?;
        let Some(j) = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["device"] == job)
        else {
            bar.finish_and_clear();
            bail!("the mirror is gone");
        };
        let (len, offset) = (
            j["len"].as_u64().unwrap_or(0),
            j["offset"].as_u64().unwrap_or(0),
        );
        bar.set_length(len);
        bar.set_position(offset);
        bar.set_message(format!("backlog {}", human(len.saturating_sub(offset))));
    }
}

/// Whether the source says for sure that the mirror `job` has not
/// switched: it is still there and not ending (the complete was refused),
/// or it concluded with an error (a failed pivot leaves the source in
/// charge). Anything else — finished, gone, or no answer — may mean the
/// switch happened.
fn cut_over_refused(src: &mut QmpClient, job: &str) -> bool {
    let Ok(jobs) = src.execute("query-jobs", json!({})) else {
        return false;
    };
    let Some(j) = jobs
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["id"] == job)
    else {
        return false;
    };
    match j["status"].as_str() {
        Some("concluded") => j.get("error").is_some(),
        Some("running" | "ready" | "paused" | "standby") => true,
        _ => false,
    }
}

/// Step 4: each bitmap, disabled on the source, published there and pulled
/// by the destination; `(name, dirty bytes)` for each. A bitmap that does
/// not arrive is removed on the destination: there it holds only the
/// writes since the cut-over, a subset of the truth, which would make the
/// next incremental backup miss blocks. (The source keeps its copy,
/// disabled.)
fn move_bitmaps(
    src: &mut QmpClient,
    dst: &mut QmpClient,
    a: &MigrateArgs,
    moving: &[Moving],
    address: &Value,
) -> anyhow::Result<Vec<(String, u64)>> {
    if moving.is_empty() {
        return Ok(Vec::new());
    }
    let mut moved = Vec::new();
    let result = pull_bitmaps(src, dst, a, moving, address, &mut moved);
    if let Err(e) = result {
        let lost: Vec<&Moving> = moving
            .iter()
            .filter(|m| !moved.iter().any(|(n, _)| *n == m.name))
            .collect();
        for m in &lost {
            let _ = dst.execute(
                "block-dirty-bitmap-remove",
                json!({"node": a.node, "name": m.name}),
            );
        }
        let names: Vec<String> = lost.iter().map(|m| format!("'{}'", m.name)).collect();
        return Err(e.context(format!(
            "bitmaps {} were removed on the destination (they would miss the writes made \
             before the cut-over): the next backup there must be a full one",
            names.join(", ")
        )));
    }
    Ok(moved)
}

fn pull_bitmaps(
    src: &mut QmpClient,
    dst: &mut QmpClient,
    a: &MigrateArgs,
    moving: &[Moving],
    address: &Value,
    moved: &mut Vec<(String, u64)>,
) -> anyhow::Result<()> {
    let started = ensure_nbd_server(src, address)?;
    let export = format!("bitmirror-bitmaps-{}", a.node);
    let result = (|| {
        for m in moving {
            src.execute(
                "block-dirty-bitmap-disable",
                json!({"node": a.node, "name": m.name}),
            )?;
        }
        let names: Vec<&str> = moving.iter().map(|m| m.name.as_str()).collect();
        src.execute(
            "block-export-add",
            json!({"type": "nbd", "id": export, "node-name": a.node, "name": export,
                   "writable": false, "bitmaps": names}),
        )?;
        for m in moving {
            let mut pull = json!({"node": a.node, "name": m.name, "server": address,
                                  "export": export, "bitmap": m.name,
                                  "granularity": m.granularity});
            if let Some(id) = &a.tls_creds {
                pull["tls-creds"] = json!(id);
            }
            let r = dst.execute("block-dirty-bitmap-pull", pull)?;
            moved.push((m.name.clone(), r["count"].as_u64().unwrap_or(0)));
        }
        anyhow::Ok(())
    })();
    // (The destination has just disconnected; that may not have landed.)
    let _ = src.execute("block-export-del", json!({"id": export, "mode": "hard"}));
    if started {
        let _ = src.execute("nbd-server-stop", json!({}));
    }
    result
}

/// Removes what a failed migration made, newest first; the source keeps
/// its node, exports and bitmaps as they were.
fn undo(src: &mut QmpClient, dst: &mut QmpClient, a: &MigrateArgs, export: &str, made: &Made) {
    let target = format!("bitmirror-migrate-{}", a.node);
    if made.job {
        let _ = src.execute("block-job-cancel", json!({"device": target, "force": true}));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let jobs = src.execute("query-jobs", json!({})).unwrap_or(json!([]));
            let job = jobs
                .as_array()
                .into_iter()
                .flatten()
                .find(|j| j["id"] == target.as_str())
                .cloned();
            match job {
                None => break,
                Some(j) if j["status"] == "concluded" => {
                    let _ = src.execute("job-dismiss", json!({"id": target}));
                    break;
                }
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    if made.source_target {
        let _ = src.execute("blockdev-del", json!({"node-name": target}));
    }
    if made.dest_export {
        let _ = dst.execute("block-export-del", json!({"id": export, "mode": "hard"}));
    }
    if made.dest_server {
        let _ = dst.execute("nbd-server-stop", json!({}));
    }
    if made.dest_node {
        let _ = dst.execute("blockdev-del", json!({"node-name": a.node}));
    }
    if made.dest_file_node {
        let _ = dst.execute(
            "blockdev-del",
            json!({"node-name": format!("{}-file", a.node)}),
        );
    }
    if made.dest_base_node {
        let _ = dst.execute(
            "blockdev-del",
            json!({"node-name": format!("{}-base", a.node)}),
        );
    }
    if let Some(image) = &made.image {
        remove_image(image);
    }
}

/// Deletes the destination's image when this host sees it (the daemons'
/// QMP sockets are local, so normally it does).
fn remove_image(image: &Path) {
    if let Err(e) = std::fs::remove_file(image) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("bitmirror: cannot remove {}: {e}", image.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(bitmap: Option<&str>) -> MigrateArgs {
        MigrateArgs {
            from: "a".into(),
            to: "b".into(),
            node: "disk0".into(),
            dest_image: "d.qcow2".into(),
            dest_nbd: "unix:/b".into(),
            bitmap: bitmap.map(str::to_owned),
            base: None,
            base_format: "qcow2".into(),
            source_nbd: Some("unix:/a".into()),
            speed: 0,
            tls_creds: None,
        }
    }

    fn bitmap(name: &str, persistent: bool, busy: bool, inconsistent: bool) -> Value {
        json!({"name": name, "granularity": 65536, "persistent": persistent, "busy": busy,
               "inconsistent": inconsistent, "recording": true, "count": 0})
    }

    #[test]
    fn busy_bitmaps_stay_behind_and_the_others_move() {
        let info = json!({"node-name": "disk0", "dirty-bitmaps": [
            bitmap("B", false, false, false),
            bitmap("busy", true, true, false),
            bitmap("kept", true, false, false),
            bitmap("scratch", false, false, false),
            bitmap("broken", true, false, true),
        ]});
        let (moving, skipped) = bitmaps_to_move(&info, &args(Some("B"))).unwrap();
        let moving: Vec<_> = moving.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(moving, ["B", "kept"]);
        assert_eq!(
            skipped,
            [
                ("busy".into(), "it is in use by another operation".into()),
                ("broken".into(), "it is inconsistent".into())
            ]
        );
        // The mirror's own bitmap cannot be skipped: that fails early.
        let info = json!({"dirty-bitmaps": [bitmap("B", true, true, false)]});
        let e = bitmaps_to_move(&info, &args(Some("B"))).unwrap_err();
        assert!(e.to_string().contains("in use by another operation"), "{e}");
        let e = bitmaps_to_move(&info, &args(Some("C"))).unwrap_err();
        assert!(e.to_string().contains("has no bitmap 'C'"), "{e}");
    }

    #[test]
    fn addresses_are_unix_paths_or_host_and_port() {
        assert_eq!(
            socket_address("unix:/run/b.sock").unwrap(),
            json!({"type": "unix", "path": "/run/b.sock"})
        );
        assert_eq!(
            socket_address("[::1]:10809").unwrap(),
            json!({"type": "inet", "host": "::1", "port": "10809"})
        );
        assert!(socket_address("nowhere").is_err());
        assert_eq!(
            legacy_address(&json!({"type": "unix", "path": "/s"})),
            json!({"type": "unix", "data": {"path": "/s"}})
        );
    }
}
