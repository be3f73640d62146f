//! `transaction`: bitmap actions and backups that happen together or not
//! at all. While it runs, the writes of every node an action names are
//! held (QEMU drains the graph), so a bitmap added with a full backup
//! records exactly the writes after the backup's point in time. Actions
//! are prepared in order; the first failure undoes the prepared ones in
//! reverse; otherwise they are committed (in reverse, as QEMU does) and
//! the jobs start.

use std::sync::Arc;

use block::{ClearUndo, Node};
use jobs::Job;
use qapi::Object;
use qmp::QmpError;
use serde_json::Value;

use super::args::BitmapRef;
use super::backup::{self, BackupAction};
use super::commands::{bitmap_node, merge_sources};
use super::daemon::{Daemon, qerr};

/// A bitmap action on one bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BitmapOp {
    Remove,
    Clear,
    Enable,
    Disable,
}

/// One action of a transaction, read.
pub(super) enum Action {
    Abort,
    BitmapAdd {
        node: String,
        name: String,
        granularity: Option<u32>,
        persistent: bool,
        disabled: bool,
    },
    Bitmap {
        op: BitmapOp,
        node: String,
        name: String,
    },
    BitmapMerge {
        node: String,
        target: String,
        sources: Vec<BitmapRef>,
    },
    BlockdevBackup(Box<BackupAction>),
    DriveBackup(Box<BackupAction>),
}

/// The action types QEMU 10.0 knows, in its schema's order.
const TYPES: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync",
    "drive-backup",
];

impl Action {
    fn type_name(&self) -> &'static str {
        match self {
            Action::Abort => "abort",
            Action::BitmapAdd { .. } => "block-dirty-bitmap-add",
            Action::Bitmap { op, .. } => match op {
                BitmapOp::Remove => "block-dirty-bitmap-remove",
                BitmapOp::Clear => "block-dirty-bitmap-clear",
                BitmapOp::Enable => "block-dirty-bitmap-enable",
                BitmapOp::Disable => "block-dirty-bitmap-disable",
            },
            Action::BitmapMerge { .. } => "block-dirty-bitmap-merge",
            Action::BlockdevBackup(_) => "blockdev-backup",
            Action::DriveBackup(_) => "drive-backup",
        }
    }

    /// The node whose writes the transaction holds for this action.
    fn node(&self) -> Option<&str> {
        match self {
            Action::Abort => None,
            Action::BitmapAdd { node, .. }
            | Action::Bitmap { node, .. }
            | Action::BitmapMerge { node, .. } => Some(node),
            Action::BlockdevBackup(b) | Action::DriveBackup(b) => Some(b.device()),
        }
    }

    /// Reads `{"type", "data"}`, the `index`th action.
    fn read(index: usize, value: &Value) -> Result<Action, QmpError> {
        let prefix = format!("actions[{index}]");
        let mut o = Object::nested(value, &prefix, false)?;
        let kind = o.req_str("type")?;
        if !TYPES.contains(&kind.as_str()) {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{kind}'"
            )));
        }
        let data = o.req("data")?;
        o.finish()?;
        let mut d = Object::nested(&data, &format!("{prefix}.data"), false)?;
        let action = match kind.as_str() {
            "abort" => Action::Abort,
            "block-dirty-bitmap-add" => Action::BitmapAdd {
                node: d.req_str("node")?,
                name: d.req_str("name")?,
                granularity: d.opt_u32("granularity")?,
                persistent: d.opt_bool("persistent")?.unwrap_or(false),
                disabled: d.opt_bool("disabled")?.unwrap_or(false),
            },
            "block-dirty-bitmap-remove"
            | "block-dirty-bitmap-clear"
            | "block-dirty-bitmap-enable"
            | "block-dirty-bitmap-disable" => Action::Bitmap {
                op: match kind.as_str() {
                    "block-dirty-bitmap-remove" => BitmapOp::Remove,
                    "block-dirty-bitmap-clear" => BitmapOp::Clear,
                    "block-dirty-bitmap-enable" => BitmapOp::Enable,
                    _ => BitmapOp::Disable,
                },
                node: d.req_str("node")?,
                name: d.req_str("name")?,
            },
            "block-dirty-bitmap-merge" => {
                let node = d.req_str("node")?;
                let target = d.req_str("target")?;
                let items = d.opt_list("bitmaps")?.ok_or_else(|| d.missing("bitmaps"))?;
                let sources = items
                    .iter()
                    .map(|(name, v)| BitmapRef::read(name, v, false))
                    .collect::<qapi::Result<Vec<_>>>()?;
                Action::BitmapMerge {
                    node,
                    target,
                    sources,
                }
            }
            "blockdev-backup" => Action::BlockdevBackup(Box::new(backup::read_blockdev(&mut d)?)),
            "drive-backup" => Action::DriveBackup(Box::new(backup::read_drive(&mut d)?)),
            other => {
                return Err(QmpError::generic(format!(
                    "Transaction action '{other}' is not supported by bitmirror"
                )));
            }
        };
        d.finish()?;
        Ok(action)
    }
}

/// `transaction`'s arguments: the actions and whether completion is
/// grouped.
pub(super) fn read(args: &mut Object) -> Result<(Vec<Action>, bool), QmpError> {
    let items = args
        .opt_list("actions")?
        .ok_or_else(|| args.missing("actions"))?;
    let mut grouped = false;
    if let Some(mut p) = args.opt_object("properties")? {
        grouped = p
            .opt_enum(
                "completion-mode",
                &[("individual", false), ("grouped", true)],
            )?
            .unwrap_or(false);
        p.finish()?;
    }
    let actions = items
        .iter()
        .enumerate()
        .map(|(i, (_, v))| Action::read(i, v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((actions, grouped))
}

/// What a prepared action needs to commit or to be undone.
enum Prepared {
    Added {
        node: Arc<Node>,
        name: String,
    },
    Removing {
        node: Arc<Node>,
        name: String,
    },
    Replaced {
        node: Arc<Node>,
        undo: ClearUndo,
    },
    Toggled {
        node: Arc<Node>,
        name: String,
        was_disabled: bool,
    },
    Job(Arc<Job>),
}

async fn prepare(daemon: &Arc<Daemon>, action: Action) -> Result<Prepared, QmpError> {
    match action {
        Action::Abort => Err(QmpError::generic("Transaction aborted using Abort action")),
        Action::BitmapAdd {
            node,
            name,
            granularity,
            persistent,
            disabled,
        } => {
            let node = daemon.graph.get(&node).map_err(qerr)?;
            node.add_bitmap(&name, granularity.map(u64::from), persistent, disabled)
                .await
                .map_err(qerr)?;
            Ok(Prepared::Added { node, name })
        }
        Action::Bitmap { op, node, name } => {
            let node = bitmap_node(daemon, &node)?;
            let bitmaps = node.bitmaps();
            match op {
                BitmapOp::Remove => {
                    bitmaps
                        .check(&name, block::Check::AllowInconsistent)
                        .map_err(qerr)?;
                    Ok(Prepared::Removing { node, name })
                }
                BitmapOp::Clear => {
                    let undo = bitmaps.clear(&name).map_err(qerr)?;
                    Ok(Prepared::Replaced { node, undo })
                }
                BitmapOp::Enable | BitmapOp::Disable => {
                    let was_disabled = bitmaps
                        .info()
                        .iter()
                        .find(|i| i.name == name)
                        .is_some_and(|i| !i.recording);
                    match op {
                        BitmapOp::Enable => bitmaps.enable(&name),
                        _ => bitmaps.disable(&name),
                    }
                    .map_err(qerr)?;
                    Ok(Prepared::Toggled {
                        node,
                        name,
                        was_disabled,
                    })
                }
            }
        }
        Action::BitmapMerge {
            node,
            target,
            sources,
        } => {
            let target_node = bitmap_node(daemon, &node)?;
            let bits = merge_sources(daemon, &target_node, &target, sources)?;
            let undo = target_node
                .bitmaps()
                .merge_undoable(&target, &bits)
                .map_err(qerr)?;
            Ok(Prepared::Replaced {
                node: target_node,
                undo,
            })
        }
        Action::BlockdevBackup(b) | Action::DriveBackup(b) => {
            Ok(Prepared::Job(b.prepare(daemon).await?))
        }
    }
}

async fn abort(daemon: &Daemon, p: Prepared) {
    match p {
        Prepared::Removing { .. } => {}
        Prepared::Added { node, name } => {
            if let Err(e) = node.remove_bitmap(&name).await {
                tracing::error!(bitmap = name, "cannot undo adding the bitmap: {e}");
            }
        }
        Prepared::Replaced { node, undo } => node.bitmaps().revert(undo),
        Prepared::Toggled {
            node,
            name,
            was_disabled,
        } => {
            let bitmaps = node.bitmaps();
            let _ = if was_disabled {
                bitmaps.disable(&name)
            } else {
                bitmaps.enable(&name)
            };
        }
        Prepared::Job(job) => daemon.jobs.abort_unstarted(&job),
    }
}

/// Runs `actions` as one transaction. With `grouped` completion the jobs
/// finish together or fail together ([`jobs::JobGroup`]); it is refused
/// for anything but backups, as in QEMU.
pub(super) async fn run(
    daemon: &Arc<Daemon>,
    actions: Vec<Action>,
    grouped: bool,
) -> Result<(), QmpError> {
    if grouped {
        if let Some(a) = actions
            .iter()
            .find(|a| !matches!(a, Action::BlockdevBackup(_) | Action::DriveBackup(_)))
        {
            return Err(QmpError::generic(format!(
                "Action '{}' does not support transaction property completion-mode = grouped",
                a.type_name()
            )));
        }
    }
    let group = grouped.then(jobs::JobGroup::new);
    // Hold the writes of every node an action names, each once.
    let mut held: Vec<Arc<Node>> = Vec::new();
    for name in actions.iter().filter_map(Action::node) {
        if let Some(node) = daemon.graph.find(name) {
            if !held.iter().any(|h| Arc::ptr_eq(h, &node)) {
                node.hold_writes().await;
                held.push(node);
            }
        }
    }
    let mut prepared = Vec::with_capacity(actions.len());
    let mut failure = None;
    for action in actions {
        match prepare(daemon, action).await {
            Ok(p) => {
                if let (Prepared::Job(job), Some(group)) = (&p, &group) {
                    daemon.jobs.join_group(job, group);
                }
                prepared.push(p)
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failure {
        for p in prepared.into_iter().rev() {
            abort(daemon, p).await;
        }
        for node in &held {
            node.release_writes(None);
        }
        return Err(e);
    }
    // Commit, newest first as QEMU does; jobs start paused (their nodes
    // are still held) and run once the writes flow again.
    let mut jobs = Vec::new();
    for p in prepared.into_iter().rev() {
        match p {
            Prepared::Removing { node, name } => {
                if let Err(e) = node.remove_bitmap(&name).await {
                    tracing::error!(bitmap = name, "cannot remove the bitmap: {e}");
                }
            }
            Prepared::Job(job) => {
                daemon.jobs.start_paused(&job);
                jobs.push(job);
            }
            _ => {}
        }
    }
    for node in &held {
        node.release_writes(None);
    }
    for job in &jobs {
        daemon.jobs.resume_started(job);
    }
    Ok(())
}
