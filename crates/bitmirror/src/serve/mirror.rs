//! `blockdev-mirror`: QEMU's arguments, plus `bitmap` and `bitmap-mode`
//! (the names Proxmox's patched QEMU uses) and `target-is-zero` (QEMU
//! 10.1).

use std::sync::Arc;

use jobs::JobOptions;
use jobs::mirror::{BitmapMode, Mirror, MirrorOptions, MirrorSync, OnError};
use qapi::Object;
use qmp::QmpError;

use super::commands::{done, job_err};
use super::daemon::Daemon;

/// Reads `blockdev-mirror`'s arguments and starts the job.
pub fn blockdev_mirror(daemon: &Arc<Daemon>, args: &mut Object) -> Result<(), QmpError> {
    let job_id = args.opt_str("job-id")?;
    let device = args.req_str("device")?;
    let target = args.req_str("target")?;
    let replaces = args.opt_str("replaces")?;
    let sync = args.req_enum(
        "sync",
        &[
            ("top", MirrorSync::Top),
            ("full", MirrorSync::Full),
            ("none", MirrorSync::None),
            ("incremental", MirrorSync::Bitmap),
            ("bitmap", MirrorSync::Bitmap),
        ],
    )?;
    let speed = args.opt_i64("speed")?.unwrap_or(0);
    let granularity = args.opt_u32("granularity")?;
    let buf_size = args.opt_i64("buf-size")?;
    let errors = [
        ("report", OnError::Report),
        ("ignore", OnError::Ignore),
        ("enospc", OnError::Enospc),
        ("stop", OnError::Stop),
        ("auto", OnError::Report),
    ];
    let on_source_error = args
        .opt_enum("on-source-error", &errors)?
        .unwrap_or_default();
    let on_target_error = args
        .opt_enum("on-target-error", &errors)?
        .unwrap_or_default();
    let filter_node_name = args.opt_str("filter-node-name")?;
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

    let not_yet = |what: &str| Err(QmpError::generic(format!("{what} is not supported yet")));
    if filter_node_name.is_some() {
        return not_yet("'filter-node-name'");
    }
    if speed < 0 {
        return Err(QmpError::generic(
            "Parameter 'speed' expects a non-negative value",
        ));
    }
    let lookup = |name: &str| {
        daemon.graph.find(name).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    };
    let source = lookup(&device)?;
    let target = lookup(&target)?;
    let replaces = match replaces {
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
    let id = job_id.unwrap_or_else(|| device.clone());
    let mirror = Mirror::new(MirrorOptions {
        id: id.clone(),
        graph: daemon.graph.clone(),
        source,
        target,
        sync,
        bitmap,
        bitmap_mode,
        granularity: granularity.map(u64::from),
        buf_size: buf_size.and_then(|b| u64::try_from(b).ok()),
        target_is_zero,
        unmap: true,
        write_blocking,
        auto_write_blocking,
        replaces,
        on_source_error,
        on_target_error,
    })
    .map_err(job_err)?;
    let job = daemon
        .jobs
        .create(
            JobOptions {
                id,
                job_type: "mirror",
                auto_finalize,
                auto_dismiss,
                block_job: true,
            },
            mirror,
        )
        .map_err(job_err)?;
    if speed > 0 {
        job.set_speed(speed as u64).map_err(job_err)?;
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
