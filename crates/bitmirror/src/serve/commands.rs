//! The QMP commands: arguments read with QEMU's rules, carried out on the
//! [`Daemon`], answered as qemu-storage-daemon answers.

use std::sync::{Arc, Weak};

use block::BlockdevOptions;
use jobs::JobOptions;
use nbd::server::RemoveMode;
use qapi::Object;
use qmp::{BoxFuture, Dispatcher, ErrorClass, QmpError, command_not_found};
use serde_json::{Map, Value, json};

use super::args::{BitmapRef, ExportArgs, NbdServerArgs, ObjectArgs};
use super::create::{CreateJob, CreateOptions};
use super::daemon::{Daemon, qerr};
use super::info;

/// Every command we answer besides `qmp_capabilities` (which the monitor
/// answers), in the order `query-commands` lists them.
pub const COMMANDS: &[&str] = &[
    "drive-backup",
    "blockdev-backup",
    "drive-mirror",
    "block-job-change",
    "blockdev-mirror",
    "job-finalize",
    "job-dismiss",
    "job-complete",
    "job-cancel",
    "job-resume",
    "job-pause",
    "query-jobs",
    "query-block-jobs",
    "block-job-finalize",
    "block-job-dismiss",
    "block-job-complete",
    "block-job-resume",
    "block-job-pause",
    "block-job-cancel",
    "block-job-set-speed",
    "blockdev-create",
    "object-del",
    "object-add",
    "quit",
    "query-commands",
    "query-version",
    "qmp_capabilities",
    "transaction",
    "query-block-exports",
    "block-export-del",
    "block-export-add",
    "nbd-server-stop",
    "nbd-server-remove",
    "nbd-server-add",
    "nbd-server-start",
    "blockdev-del",
    "blockdev-add",
    "x-debug-block-dirty-bitmap-sha256",
    "block-dirty-bitmap-pull",
    "block-dirty-bitmap-merge",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-add",
    "query-named-block-nodes",
    "query-block",
];

/// The daemon's [`Dispatcher`].
pub struct Commands {
    daemon: Weak<Daemon>,
}

impl Commands {
    /// Commands that act on `daemon`.
    pub fn new(daemon: &Arc<Daemon>) -> Commands {
        Commands {
            daemon: Arc::downgrade(daemon),
        }
    }
}

impl Dispatcher for Commands {
    fn dispatch(
        &self,
        command: String,
        arguments: Map<String, Value>,
    ) -> BoxFuture<'static, Result<Value, QmpError>> {
        let daemon = self.daemon.clone();
        Box::pin(async move {
            let Some(daemon) = daemon.upgrade() else {
                return Err(QmpError::generic("the daemon is shutting down"));
            };
            let arguments = Value::Object(arguments);
            let mut args = Object::json(&arguments)?;
            let result = run(&daemon, &command, &mut args, &arguments).await?;
            Ok(result)
        })
    }
}

/// A job error as QMP reports it (`DeviceNotActive` for unknown block
/// jobs, as QEMU).
pub fn job_err(e: jobs::Error) -> QmpError {
    match e {
        jobs::Error::BlockJobNotFound(_) => {
            QmpError::new(ErrorClass::DeviceNotActive, e.to_string())
        }
        e => QmpError::generic(e.to_string()),
    }
}

/// The node of a bitmap command that names an existing bitmap (QEMU's
/// words differ from other node lookups).
pub(super) fn bitmap_node(daemon: &Daemon, name: &str) -> Result<Arc<block::Node>, QmpError> {
    daemon
        .graph
        .find(name)
        .ok_or_else(|| qerr(block::Error::BitmapNodeNotFound(name.to_owned())))
}

/// The bits a `block-dirty-bitmap-merge` into bitmap `target` of
/// `target_node` ORs in, once `target` may change: snapshots of `sources`
/// (names on the same node, or `{node, name}`).
pub(super) fn merge_sources(
    daemon: &Daemon,
    target_node: &Arc<block::Node>,
    target: &str,
    sources: Vec<BitmapRef>,
) -> Result<Vec<hbitmap::HBitmap>, QmpError> {
    target_node
        .bitmaps()
        .check(target, block::Check::Default)
        .map_err(qerr)?;
    let mut bits = Vec::with_capacity(sources.len());
    for source in sources {
        let (holder, name) = match source {
            BitmapRef::Local(name) => (target_node.clone(), name),
            BitmapRef::External { node, name } => (bitmap_node(daemon, &node)?, name),
        };
        bits.push(holder.bitmaps().snapshot(&name).map_err(qerr)?);
    }
    Ok(bits)
}

/// Reads no more arguments: the leftovers are unexpected.
pub fn done(args: &mut Object) -> Result<(), QmpError> {
    Ok(args.check_done()?)
}

async fn run(
    daemon: &Arc<Daemon>,
    command: &str,
    args: &mut Object,
    raw: &Value,
) -> Result<Value, QmpError> {
    match command {
        "query-version" => {
            done(args)?;
            Ok(daemon.version())
        }
        "query-commands" => {
            done(args)?;
            Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({"name": c})).collect(),
            ))
        }
        "quit" => {
            done(args)?;
            // qemu-storage-daemon deletes the exports before it answers.
            daemon.remove_exports().await;
            daemon.request_shutdown("host-qmp-quit");
            Ok(json!({}))
        }
        "blockdev-add" => {
            let options = BlockdevOptions::from_json(raw).map_err(qerr)?;
            daemon.graph.add(&options).await.map_err(qerr)?;
            Ok(json!({}))
        }
        "blockdev-del" => {
            let name = args.req_str("node-name")?;
            done(args)?;
            daemon.graph.remove(&name).await.map_err(qerr)?;
            Ok(json!({}))
        }
        "query-named-block-nodes" => {
            let flat = args.opt_bool("flat")?.unwrap_or(false);
            done(args)?;
            Ok(Value::Array(
                daemon
                    .graph
                    .nodes()
                    .iter()
                    .map(|n| info::block_device_info(n, flat))
                    .collect(),
            ))
        }
        // qemu-storage-daemon has no guest devices, hence no named block
        // backends: always empty, as there.
        "query-block" => {
            done(args)?;
            Ok(json!([]))
        }
        "block-dirty-bitmap-add" => {
            let node = args.req_str("node")?;
            let name = args.req_str("name")?;
            let granularity = args.opt_u32("granularity")?;
            let persistent = args.opt_bool("persistent")?.unwrap_or(false);
            let disabled = args.opt_bool("disabled")?.unwrap_or(false);
            done(args)?;
            let node = daemon.graph.get(&node).map_err(qerr)?;
            node.add_bitmap(&name, granularity.map(u64::from), persistent, disabled)
                .await
                .map_err(qerr)?;
            Ok(json!({}))
        }
        "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable"
        | "x-debug-block-dirty-bitmap-sha256" => {
            let node = args.req_str("node")?;
            let name = args.req_str("name")?;
            done(args)?;
            let node = bitmap_node(daemon, &node)?;
            let bitmaps = node.bitmaps();
            match command {
                "block-dirty-bitmap-remove" => node.remove_bitmap(&name).await.map(drop),
                "block-dirty-bitmap-clear" => bitmaps.clear(&name).map(drop),
                "block-dirty-bitmap-enable" => bitmaps.enable(&name),
                "block-dirty-bitmap-disable" => bitmaps.disable(&name),
                _ => {
                    let sha = bitmaps.sha256(&name).map_err(qerr)?;
                    return Ok(json!({"sha256": sha}));
                }
            }
            .map_err(qerr)?;
            Ok(json!({}))
        }
        "block-dirty-bitmap-pull" => super::pull::pull(daemon, args).await,
        "block-dirty-bitmap-merge" => {
            let node = args.req_str("node")?;
            let target = args.req_str("target")?;
            let items = args
                .opt_list("bitmaps")?
                .ok_or_else(|| args.missing("bitmaps"))?;
            let sources = items
                .iter()
                .map(|(name, v)| BitmapRef::read(name, v, false))
                .collect::<qapi::Result<Vec<_>>>()?;
            done(args)?;
            let target_node = bitmap_node(daemon, &node)?;
            let bits = merge_sources(daemon, &target_node, &target, sources)?;
            // An empty list merges nothing (QEMU 10.0 crashes on it).
            if !bits.is_empty() {
                target_node.bitmaps().merge(&target, &bits).map_err(qerr)?;
            }
            Ok(json!({}))
        }
        "nbd-server-start" => {
            let a = NbdServerArgs::read(args, true).map_err(qerr)?;
            done(args)?;
            daemon.nbd_server_start(&a).await?;
            Ok(json!({}))
        }
        "nbd-server-stop" => {
            done(args)?;
            daemon.nbd_server_stop().await?;
            Ok(json!({}))
        }
        "nbd-server-add" => {
            let device = args.req_str("device")?;
            let name = args.opt_str("name")?;
            let description = args.opt_str("description")?;
            let writable = args.opt_bool("writable")?.unwrap_or(false);
            let bitmap = args.opt_str("bitmap")?;
            done(args)?;
            let name = name.unwrap_or_else(|| device.clone());
            daemon
                .export_add(&ExportArgs {
                    id: name.clone(),
                    node_name: device,
                    writable,
                    name: Some(name),
                    description,
                    bitmaps: bitmap.into_iter().map(BitmapRef::Local).collect(),
                    allocation_depth: false,
                })
                .await?;
            Ok(json!({}))
        }
        "nbd-server-remove" | "block-export-del" => {
            let id = args.req_str(if command == "nbd-server-remove" {
                "name"
            } else {
                "id"
            })?;
            let mode = args
                .opt_enum(
                    "mode",
                    &[("safe", RemoveMode::Safe), ("hard", RemoveMode::Hard)],
                )?
                .unwrap_or(RemoveMode::Safe);
            done(args)?;
            daemon.export_del(&id, mode).await?;
            Ok(json!({}))
        }
        "block-export-add" => {
            let a = ExportArgs::read(args)?;
            done(args)?;
            daemon.export_add(&a).await?;
            Ok(json!({}))
        }
        "query-block-exports" => {
            done(args)?;
            Ok(Value::Array(daemon.exports().await))
        }
        "blockdev-create" => {
            let job_id = args.req_str("job-id")?;
            let mut o = args.req_object("options")?;
            let options = CreateOptions::read(&mut o)?;
            o.finish()?;
            done(args)?;
            let job = daemon
                .jobs
                .create(
                    JobOptions {
                        id: job_id,
                        job_type: "create",
                        auto_finalize: true,
                        auto_dismiss: false,
                        block_job: false,
                    },
                    Arc::new(CreateJob::new(daemon, options)),
                )
                .map_err(job_err)?;
            daemon.jobs.start(&job);
            Ok(json!({}))
        }
        "query-jobs" => {
            done(args)?;
            Ok(daemon.jobs.query())
        }
        "query-block-jobs" => {
            done(args)?;
            Ok(Value::Array(
                daemon
                    .jobs
                    .all()
                    .iter()
                    // Newest first, as QEMU lists them.
                    .rev()
                    .filter(|j| j.is_block_job())
                    .map(|j| j.block_job_info())
                    .collect(),
            ))
        }
        "blockdev-mirror" => {
            super::mirror::blockdev_mirror(daemon, args).await?;
            Ok(json!({}))
        }
        "transaction" => {
            let (actions, grouped) = super::transaction::read(args)?;
            done(args)?;
            super::transaction::run(daemon, actions, grouped).await?;
            Ok(json!({}))
        }
        "blockdev-backup" => {
            super::backup::blockdev_backup(daemon, args).await?;
            Ok(json!({}))
        }
        "drive-backup" => {
            super::backup::drive_backup(daemon, args).await?;
            Ok(json!({}))
        }
        "drive-mirror" => {
            super::mirror::drive_mirror(daemon, args).await?;
            Ok(json!({}))
        }
        "block-job-change" => {
            super::mirror::block_job_change(daemon, args)?;
            Ok(json!({}))
        }
        "job-pause" | "job-resume" | "job-complete" | "job-finalize" | "job-dismiss"
        | "job-cancel" => {
            let id = args.req_str("id")?;
            done(args)?;
            let job = daemon.jobs.find(&id).map_err(job_err)?;
            match command {
                "job-pause" => job.pause(),
                "job-resume" => job.resume(),
                "job-complete" => job.complete(),
                "job-finalize" => job.finalize(),
                "job-dismiss" => job.dismiss(),
                _ => job.cancel(false),
            }
            .map_err(job_err)?;
            Ok(json!({}))
        }
        "block-job-pause"
        | "block-job-resume"
        | "block-job-complete"
        | "block-job-cancel"
        | "block-job-set-speed"
        | "block-job-finalize"
        | "block-job-dismiss" => {
            let key = match command {
                "block-job-finalize" | "block-job-dismiss" => "id",
                _ => "device",
            };
            let id = args.req_str(key)?;
            let force = if command == "block-job-cancel" {
                args.opt_bool("force")?.unwrap_or(false)
            } else {
                false
            };
            let speed = if command == "block-job-set-speed" {
                Some(args.req_i64("speed")?)
            } else {
                None
            };
            done(args)?;
            let job = daemon.jobs.find_block_job(&id).map_err(job_err)?;
            match command {
                "block-job-pause" => job.pause(),
                "block-job-resume" => job.resume(),
                "block-job-complete" => job.complete(),
                "block-job-finalize" => job.finalize(),
                "block-job-dismiss" => job.dismiss(),
                "block-job-set-speed" => match u64::try_from(speed.unwrap_or(0)) {
                    Ok(s) => job.set_speed(s),
                    Err(_) => {
                        return Err(QmpError::generic(
                            "Parameter 'speed' expects a non-negative value",
                        ));
                    }
                },
                _ => job.cancel(force),
            }
            .map_err(job_err)?;
            Ok(json!({}))
        }
        "object-add" => {
            let a = ObjectArgs::read(args)?;
            daemon.object_add(&a)?;
            Ok(json!({}))
        }
        "object-del" => {
            let id = args.req_str("id")?;
            done(args)?;
            daemon.object_del(&id)?;
            Ok(json!({}))
        }
        other => Err(command_not_found(other)),
    }
}
