//! `blockdev-mirror` and `drive-mirror`: QEMU's arguments, plus `bitmap`
//! and `bitmap-mode` (the names Proxmox's patched QEMU uses),
//! `target-is-zero` (QEMU 10.1) and our `auto-write-blocking`.

use std::sync::Arc;

use jobs::JobOptions;
use jobs::mirror::{BitmapMode, Mirror, MirrorOptions, MirrorSync, OnError};
use qapi::Object;
use qmp::QmpError;

use super::commands::{done, job_err};
use super::daemon::{Daemon, qerr};

/// The arguments `blockdev-mirror` and `drive-mirror` share.
struct Common {
    job_id: Option<String>,
    device: String,
    replaces: Option<String>,
    sync: MirrorSync,
    speed: i64,
    granularity: Option<u32>,
    buf_size: Option<i64>,
    on_source_error: OnError,
    on_target_error: OnError,
    write_blocking: bool,
    auto_finalize: bool,
    auto_dismiss: bool,
    target_is_zero: bool,
    unmap: bool,
    bitmap: Option<String>,
    bitmap_mode: BitmapMode,
    auto_write_blocking: bool,
}

/// What the target of a mirror is.
enum Target {
    /// An existing node (`blockdev-mirror`).
    Node(String),
    /// A file or NBD export `drive-mirror` names, to open (and maybe
    /// create) as `format`.
    Drive {
        filename: String,
        format: Option<String>,
        node_name: Option<String>,
        existing: bool,
    },
}

const SYNC_MODES: &[(&str, MirrorSync)] = &[
    ("top", MirrorSync::Top),
    ("full", MirrorSync::Full),
    ("none", MirrorSync::None),
    ("incremental", MirrorSync::Bitmap),
    ("bitmap", MirrorSync::Bitmap),
];

/// `BlockdevOnError`'s values (`auto` is `report` for block jobs), for
/// every job's `on-source-error` and `on-target-error`.
pub(super) const ERROR_POLICIES: &[(&str, OnError)] = &[
    ("report", OnError::Report),
    ("ignore", OnError::Ignore),
    ("enospc", OnError::Enospc),
    ("stop", OnError::Stop),
    ("auto", OnError::Report),
];

/// Reads the members after `sync`, in QEMU's order, and ours.
fn read_rest(
    args: &mut Object,
    job_id: Option<String>,
    device: String,
    replaces: Option<String>,
    sync: MirrorSync,
    drive: bool,
) -> Result<Common, QmpError> {
    let speed = args.opt_i64("speed")?.unwrap_or(0);
    let granularity = args.opt_u32("granularity")?;
    let buf_size = args.opt_i64("buf-size")?;
    let on_source_error = args
        .opt_enum("on-source-error", ERROR_POLICIES)?
        .unwrap_or_default();
    let on_target_error = args
        .opt_enum("on-target-error", ERROR_POLICIES)?
        .unwrap_or_default();
    let unmap = if drive {
        args.opt_bool("unmap")?.unwrap_or(true)
    } else {
        true
    };
    if !drive && args.opt_str("filter-node-name")?.is_some() {
        return Err(QmpError::generic("'filter-node-name' is not supported yet"));
    }
    let write_blocking = args
        .opt_enum(
            "copy-mode",
            &[("background", false), ("write-blocking", true)],
        )?
        .unwrap_or(false);
    let auto_finalize = args.opt_bool("auto-finalize")?.unwrap_or(true);
    let auto_dismiss = args.opt_bool("auto-dismiss")?.unwrap_or(true);
    let target_is_zero = args.opt_bool("target-is-zero")?.unwrap_or(false);
    let bitmap = args.opt_str("bitmap")?;
    let auto_write_blocking = args.opt_bool("auto-write-blocking")?.unwrap_or(false);
    let bitmap_mode = args
        .opt_enum(
            "bitmap-mode",
            &[
                ("never", BitmapMode::Never),
                ("on-success", BitmapMode::OnSuccess),
                ("always", BitmapMode::Always),
            ],
        )?
        .unwrap_or_default();
    done(args)?;
    if speed < 0 {
        return Err(QmpError::generic(
            "Parameter 'speed' expects a non-negative value",
        ));
    }
    Ok(Common {
        job_id,
        device,
        replaces,
        sync,
        speed,
        granularity,
        buf_size,
        on_source_error,
        on_target_error,
        write_blocking,
        auto_finalize,
        auto_dismiss,
        target_is_zero,
        unmap,
        bitmap,
        bitmap_mode,
        auto_write_blocking,
    })
}

/// Reads `blockdev-mirror`'s arguments and starts the job.
pub async fn blockdev_mirror(daemon: &Arc<Daemon>, args: &mut Object) -> Result<(), QmpError> {
    let job_id = args.opt_str("job-id")?;
    let device = args.req_str("device")?;
    let target = args.req_str("target")?;
    let replaces = args.opt_str("replaces")?;
    let sync = args.req_enum("sync", SYNC_MODES)?;
    let common = read_rest(args, job_id, device, replaces, sync, false)?;
    start(daemon, common, Target::Node(target)).await
}

/// Reads `drive-mirror`'s arguments and starts the job: the target is a
/// file (created unless `mode=existing`) or an NBD export
/// (`nbd:unix:PATH[:exportname=NAME]`, `nbd:HOST:PORT[:exportname=NAME]`,
/// `nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT/NAME`), always with
/// `mode=existing`.
pub async fn drive_mirror(daemon: &Arc<Daemon>, args: &mut Object) -> Result<(), QmpError> {
    let job_id = args.opt_str("job-id")?;
    let device = args.req_str("device")?;
    let filename = args.req_str("target")?;
    let format = args.opt_str("format")?;
    let node_name = args.opt_str("node-name")?;
    let replaces = args.opt_str("replaces")?;
    let sync = args.req_enum("sync", SYNC_MODES)?;
    let existing = args
        .opt_enum("mode", &[("existing", true), ("absolute-paths", false)])?
        .unwrap_or(false);
    let common = read_rest(args, job_id, device, replaces, sync, true)?;
    let target = Target::Drive {
        filename,
        format,
        node_name,
        existing,
    };
    start(daemon, common, target).await
}

/// QEMU's NBD filenames as an `nbd` node's options.
pub(crate) fn nbd_filename(name: &str) -> Option<serde_json::Value> {
    block::options::nbd_filename(name)
}

/// Opens (creating it first unless it exists already) `drive-mirror`'s
/// target.
pub(super) async fn open_drive(
    daemon: &Arc<Daemon>,
    source: &Arc<block::Node>,
    sync: MirrorSync,
    filename: &str,
    format: Option<String>,
    node_name: Option<String>,
    existing: bool,
) -> Result<Arc<block::Node>, QmpError> {
    use serde_json::json;
    let nbd = nbd_filename(filename);
    let format = match (format, &nbd) {
        (Some(f), _) => f,
        (None, Some(_)) => "raw".to_owned(),
        (None, None) if existing => {
            let mut magic = [0u8; 4];
            let is_qcow2 = std::fs::File::open(filename)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok()
                && magic == *b"QFI\xfb";
            if is_qcow2 { "qcow2" } else { "raw" }.to_owned()
        }
        (None, None) => match source.driver_name() {
            "qcow2" => "qcow2".to_owned(),
            _ => "raw".to_owned(),
        },
    };
    if !matches!(format.as_str(), "raw" | "qcow2") {
        return Err(QmpError::generic(format!(
            "Unknown driver '{format}' (bitmirror's drive-mirror takes raw and qcow2)"
        )));
    }
    if !existing {
        if nbd.is_some() {
            return Err(QmpError::generic(
                "Cannot create an image on an NBD server: use mode 'existing'",
            ));
        }
        create_target(source, sync, filename, &format)?;
    }
    let file = nbd.unwrap_or_else(|| json!({"driver": "file", "filename": filename}));
    let mut options = json!({"driver": format, "file": file});
    if let Some(name) = node_name {
        options["node-name"] = json!(name);
    }
    let options = block::BlockdevOptions::from_json(&options).map_err(qerr)?;
    daemon.graph.add_for_job(&options).await.map_err(qerr)
}

/// Creates `drive-mirror`'s target as QEMU does with `absolute-paths`:
/// the source's size; for `top` the source's backing file as backing, for
/// `none` the source itself, none for `full` and `bitmap`.
fn create_target(
    source: &Arc<block::Node>,
    sync: MirrorSync,
    filename: &str,
    format: &str,
) -> Result<(), QmpError> {
    let size = source.length();
    let fail = |e: std::io::Error| QmpError::generic(format!("Could not create '{filename}': {e}"));
    let _ = std::fs::remove_file(filename);
    if format == "raw" {
        let f = std::fs::File::create(filename).map_err(fail)?;
        return f.set_len(size).map_err(fail);
    }
    let backing = match sync {
        MirrorSync::Top => source
            .children()
            .iter()
            .find(|(r, _)| *r == block::ChildRole::Backing)
            .map(|(_, e)| e.node()),
        MirrorSync::None => Some(source.clone()),
        _ => None,
    };
    let backing = backing.and_then(|b| {
        let name = super::info::filename(&b);
        (!name.starts_with("json:")).then(|| (name, b.driver_name().to_owned()))
    });
    let image = block::Qcow2Create {
        size,
        cluster_size: 1 << 16,
        backing,
    };
    block::create_qcow2(std::path::Path::new(filename), &image).map_err(qerr)
}

/// Checks the nodes and starts the job.
async fn start(daemon: &Arc<Daemon>, c: Common, target: Target) -> Result<(), QmpError> {
    let lookup = |name: &str| {
        daemon.graph.find(name).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    };
    let source = lookup(&c.device)?;
    let (target, owns_target) = match target {
        Target::Node(name) => (lookup(&name)?, false),
        Target::Drive {
            filename,
            format,
            node_name,
            existing,
        } => {
            let node = open_drive(
                daemon, &source, c.sync, &filename, format, node_name, existing,
            )
            .await?;
            (node, true)
        }
    };
    let result = start_on(daemon, c, source, target.clone(), owns_target);
    if result.is_err() && owns_target {
        daemon.graph.remove_unused(&target).await;
    }
    result
}

fn start_on(
    daemon: &Arc<Daemon>,
    c: Common,
    source: Arc<block::Node>,
    target: Arc<block::Node>,
    owns_target: bool,
) -> Result<(), QmpError> {
    let replaces = match c.replaces {
        Some(name) => Some(
            daemon
                .graph
                .find(&name)
                .ok_or_else(|| QmpError::generic(format!("Node name '{name}' not found")))?,
        ),
        None => None,
    };
    // QEMU mirrors root nodes only; a running job puts a filter above its
    // source, so that one is no root either.
    let in_use = source
        .users()
        .iter()
        .any(|e| matches!(e.user(), block::User::Parent { .. } | block::User::Job(_)));
    if in_use {
        return Err(QmpError::generic("Need a root block node"));
    }
    let id = c.job_id.unwrap_or_else(|| c.device.clone());
    let mirror = Mirror::new(MirrorOptions {
        id: id.clone(),
        graph: daemon.graph.clone(),
        source,
        target,
        sync: c.sync,
        bitmap: c.bitmap,
        bitmap_mode: c.bitmap_mode,
        granularity: c.granularity.map(u64::from),
        buf_size: c.buf_size.and_then(|b| u64::try_from(b).ok()),
        target_is_zero: c.target_is_zero,
        unmap: c.unmap,
        write_blocking: c.write_blocking,
        auto_write_blocking: c.auto_write_blocking,
        owns_target,
        replaces,
        on_source_error: c.on_source_error,
        on_target_error: c.on_target_error,
    })
    .map_err(job_err)?;
    let job = daemon
        .jobs
        .create(
            JobOptions {
                id,
                job_type: "mirror",
                auto_finalize: c.auto_finalize,
                auto_dismiss: c.auto_dismiss,
                block_job: true,
            },
            mirror,
        )
        .map_err(job_err)?;
    if c.speed > 0 {
        job.set_speed(c.speed as u64).map_err(job_err)?;
    }
    daemon.jobs.start(&job);
    Ok(())
}

/// `block-job-change`: `{"id", "type": "mirror", "copy-mode"}`.
pub fn block_job_change(daemon: &Arc<Daemon>, args: &mut Object) -> Result<(), QmpError> {
    let id = args.req_str("id")?;
    let job_type = args.req_enum(
        "type",
        &[
            ("mirror", "mirror"),
            ("commit", "commit"),
            ("stream", "stream"),
            ("backup", "backup"),
            ("create", "create"),
        ],
    )?;
    let copy_mode = if job_type == "mirror" {
        args.opt_enum(
            "copy-mode",
            &[
                ("background", "background"),
                ("write-blocking", "write-blocking"),
            ],
        )?
    } else {
        None
    };
    done(args)?;
    // As QEMU, the job's own type decides; `type` only selects which
    // options may be given.
    let job = daemon.jobs.find_block_job(&id).map_err(job_err)?;
    let mut change = serde_json::Map::new();
    if let Some(mode) = copy_mode {
        change.insert("copy-mode".into(), mode.into());
    }
    job.change(&serde_json::Value::Object(change))
        .map_err(job_err)
}
