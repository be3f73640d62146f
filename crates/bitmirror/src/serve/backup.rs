//! `blockdev-backup` and `drive-backup`: QEMU's arguments, checked in
//! QEMU's order (`do_backup_common`, then `backup_job_create`) with QEMU's
//! words, so a script sees the same first error from both daemons.

use std::sync::Arc;

use jobs::JobOptions;
use jobs::backup::{Backup, BackupOptions, BackupSync, BitmapMode, OnError};
use jobs::mirror::MirrorSync;
use qapi::Object;
use qmp::QmpError;

use super::commands::{done, job_err};
use super::daemon::Daemon;
use super::mirror::ERROR_POLICIES;

/// The sync modes as given (`incremental` is told apart for its checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    Full,
    Top,
    None,
    Incremental,
    Bitmap,
}

impl Sync {
    fn name(self) -> &'static str {
        match self {
            Sync::Full => "full",
            Sync::Top => "top",
            Sync::None => "none",
            Sync::Incremental => "incremental",
            Sync::Bitmap => "bitmap",
        }
    }
}

const SYNC_MODES: &[(&str, Sync)] = &[
    ("top", Sync::Top),
    ("full", Sync::Full),
    ("none", Sync::None),
    ("incremental", Sync::Incremental),
    ("bitmap", Sync::Bitmap),
];

/// `BackupCommon`'s members, read in QAPI's order.
struct Common {
    job_id: Option<String>,
    device: String,
    sync: Sync,
    speed: i64,
    bitmap: Option<String>,
    bitmap_mode: Option<BitmapMode>,
    compress: bool,
    on_source_error: OnError,
    on_target_error: OnError,
    auto_finalize: bool,
    auto_dismiss: bool,
    filter_node_name: Option<String>,
    discard_source: bool,
    max_workers: Option<i64>,
    max_chunk: Option<i64>,
    min_cluster_size: Option<u64>,
}

fn read_common(args: &mut Object) -> Result<Common, QmpError> {
    let job_id = args.opt_str("job-id")?;
    let device = args.req_str("device")?;
    let sync = args.req_enum("sync", SYNC_MODES)?;
    let speed = args.opt_i64("speed")?.unwrap_or(0);
    let bitmap = args.opt_str("bitmap")?;
    let bitmap_mode = args.opt_enum(
        "bitmap-mode",
        &[
            ("on-success", BitmapMode::OnSuccess),
            ("never", BitmapMode::Never),
            ("always", BitmapMode::Always),
        ],
    )?;
    let compress = args.opt_bool("compress")?.unwrap_or(false);
    let on_source_error = args
        .opt_enum("on-source-error", ERROR_POLICIES)?
        .unwrap_or_default();
    let on_target_error = args
        .opt_enum("on-target-error", ERROR_POLICIES)?
        .unwrap_or_default();
    let auto_finalize = args.opt_bool("auto-finalize")?.unwrap_or(true);
    let auto_dismiss = args.opt_bool("auto-dismiss")?.unwrap_or(true);
    let filter_node_name = args.opt_str("filter-node-name")?;
    let discard_source = args.opt_bool("discard-source")?.unwrap_or(false);
    let (mut max_workers, mut max_chunk, mut min_cluster_size) = (None, None, None);
    if let Some(mut perf) = args.opt_object("x-perf")? {
        let _ = perf.opt_bool("use-copy-range")?;
        max_workers = perf.opt_i64("max-workers")?;
        max_chunk = perf.opt_i64("max-chunk")?;
        min_cluster_size = perf.opt_size("min-cluster-size")?;
        done(&mut perf)?;
    }
    Ok(Common {
        job_id,
        device,
        sync,
        speed,
        bitmap,
        bitmap_mode,
        compress,
        on_source_error,
        on_target_error,
        auto_finalize,
        auto_dismiss,
        filter_node_name,
        discard_source,
        max_workers,
        max_chunk,
        min_cluster_size,
    })
}

fn lookup(daemon: &Daemon, name: &str) -> Result<Arc<block::Node>, QmpError> {
    daemon.graph.find(name).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })
}

/// Where a backup goes.
enum Target {
    /// An existing node (`blockdev-backup`).
    Node(String),
    /// A file `drive-backup` names, created unless `existing`.
    Drive {
        filename: String,
        format: Option<String>,
        existing: bool,
    },
}

/// A backup's arguments, read: a command, or a `transaction` action.
pub(super) struct BackupAction {
    c: Common,
    target: Target,
}

/// Reads `blockdev-backup`'s arguments (the caller checks for leftovers).
pub(super) fn read_blockdev(args: &mut Object) -> Result<BackupAction, QmpError> {
    let c = read_common(args)?;
    let target = Target::Node(args.req_str("target")?);
    Ok(BackupAction { c, target })
}

/// Reads `drive-backup`'s arguments (the caller checks for leftovers).
pub(super) fn read_drive(args: &mut Object) -> Result<BackupAction, QmpError> {
    let c = read_common(args)?;
    let filename = args.req_str("target")?;
    let format = args.opt_str("format")?;
    let existing = args
        .opt_enum("mode", &[("existing", true), ("absolute-paths", false)])?
        .unwrap_or(false);
    Ok(BackupAction {
        c,
        target: Target::Drive {
            filename,
            format,
            existing,
        },
    })
}

/// `blockdev-backup`: a transaction of one action, as in QEMU.
pub async fn blockdev_backup(daemon: &Arc<Daemon>, args: &mut Object) -> Result<(), QmpError> {
    let action = read_blockdev(args)?;
    done(args)?;
    let action = super::transaction::Action::BlockdevBackup(Box::new(action));
    super::transaction::run(daemon, vec![action], false).await
}

/// `drive-backup`: the target is a file, created first (with the source's
/// size and format, or `format`) unless `mode=existing`. As in QEMU, a
/// file created before a later check fails stays on disk.
pub async fn drive_backup(daemon: &Arc<Daemon>, args: &mut Object) -> Result<(), QmpError> {
    let action = read_drive(args)?;
    done(args)?;
    let action = super::transaction::Action::DriveBackup(Box::new(action));
    super::transaction::run(daemon, vec![action], false).await
}

impl BackupAction {
    /// The node backed up, by name.
    pub(super) fn device(&self) -> &str {
        &self.c.device
    }

    /// Checks everything and makes the job (`created`), not started: the
    /// point in time is now.
    pub(super) async fn prepare(self, daemon: &Arc<Daemon>) -> Result<Arc<jobs::Job>, QmpError> {
        let mut c = self.c;
        let source = lookup(daemon, &c.device)?;
        match self.target {
            Target::Node(name) => {
                let target = lookup(daemon, &name)?;
                prepare_on(daemon, c, source, target, false).await
            }
            Target::Drive {
                filename,
                format,
                existing,
            } => {
                source_busy(daemon, &source)?;
                let has_backing = source
                    .children()
                    .iter()
                    .any(|(r, _)| *r == block::ChildRole::Backing);
                if c.sync == Sync::Top && !has_backing {
                    c.sync = Sync::Full;
                }
                let create_as = match c.sync {
                    Sync::Top => MirrorSync::Top,
                    Sync::None => MirrorSync::None,
                    _ => MirrorSync::Full,
                };
                let target = super::mirror::open_drive(
                    daemon, &source, create_as, &filename, format, None, existing,
                )
                .await?;
                let result = prepare_on(daemon, c, source, target.clone(), true).await;
                if result.is_err() {
                    daemon.graph.remove_unused(&target).await;
                }
                result
            }
        }
    }
}

/// QEMU's op blockers on a backup's source: a mirror holds its source,
/// and any job its target (another backup may read the same source).
fn source_busy(daemon: &Daemon, source: &block::Node) -> Result<(), QmpError> {
    node_busy(daemon, source, |job| {
        job.job_type() == "mirror"
            || job
                .target_node()
                .is_some_and(|t| std::ptr::eq(Arc::as_ptr(&t), source))
    })
}

/// `Node '%s' is busy` when a job `blocks` accepts uses `node`.
fn node_busy(
    daemon: &Daemon,
    node: &block::Node,
    blocks: impl Fn(&jobs::Job) -> bool,
) -> Result<(), QmpError> {
    for edge in node.users() {
        if let block::User::Job(id) = edge.user() {
            if let Ok(job) = daemon.jobs.find(id) {
                if blocks(&job) {
                    return Err(QmpError::generic(format!(
                        "Node '{}' is busy: block device is in use by block job: {}",
                        node.name(),
                        job.job_type()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// `do_backup_common`'s bitmap checks; returns the sync mode and the
/// bitmap mode to run with.
fn check_bitmap(source: &block::Node, c: &Common) -> Result<(BackupSync, BitmapMode), QmpError> {
    let fail = |m: String| Err(QmpError::generic(m));
    let mut sync = c.sync;
    let mut mode = c.bitmap_mode;
    if matches!(sync, Sync::Bitmap | Sync::Incremental) && c.bitmap.is_none() {
        return fail(format!(
            "must provide a valid bitmap name for '{}' sync mode",
            sync.name()
        ));
    }
    if sync == Sync::Incremental {
        if mode.is_some_and(|m| m != BitmapMode::OnSuccess) {
            return fail(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'".into(),
            );
        }
        sync = Sync::Bitmap;
        mode = Some(BitmapMode::OnSuccess);
    }
    match (&c.bitmap, mode) {
        (Some(name), mode) => {
            let bitmaps = source.bitmaps();
            if !bitmaps.info().iter().any(|i| &i.name == name) {
                return fail(format!("Bitmap '{name}' could not be found"));
            }
            let Some(mode) = mode else {
                return fail("Bitmap sync mode must be given when providing a bitmap".into());
            };
            bitmaps
                .check(name, block::Check::AllowReadonly)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            if sync == Sync::None {
                return fail("sync mode 'none' does not produce meaningful bitmap outputs".into());
            }
            if mode == BitmapMode::Never && sync != Sync::Bitmap {
                return fail(format!(
                    "Bitmap sync mode 'never' has no meaningful effect when combined with sync \
                     mode '{}'",
                    sync.name()
                ));
            }
            Ok((backup_sync(sync), mode))
        }
        (None, Some(_)) => fail("Cannot specify bitmap sync mode without a bitmap".into()),
        (None, None) => Ok((backup_sync(sync), BitmapMode::Never)),
    }
}

fn backup_sync(s: Sync) -> BackupSync {
    match s {
        Sync::Full => BackupSync::Full,
        Sync::Top => BackupSync::Top,
        Sync::None => BackupSync::None,
        Sync::Incremental | Sync::Bitmap => BackupSync::Bitmap,
    }
}

/// `backup_job_create`'s checks, then the job (created, not started).
async fn prepare_on(
    daemon: &Arc<Daemon>,
    c: Common,
    source: Arc<block::Node>,
    target: Arc<block::Node>,
    owns_target: bool,
) -> Result<Arc<jobs::Job>, QmpError> {
    let fail = |m: &str| Err(QmpError::generic(m));
    let (sync, bitmap_mode) = check_bitmap(&source, &c)?;
    if Arc::ptr_eq(&source, &target) {
        return fail("Source and target cannot be the same");
    }
    if c.compress {
        // QEMU names the target's device, which has none in a storage
        // daemon: hence the trailing space.
        if !target.supports_compressed_writes() {
            return fail("Compression is not supported for this drive ");
        }
    }
    source_busy(daemon, &source)?;
    node_busy(daemon, &target, |_| true)?;
    if c.max_workers
        .is_some_and(|w| !(1..=i64::from(i32::MAX)).contains(&w))
    {
        return fail("max-workers must be between 1 and 2147483647");
    }
    if c.max_chunk.is_some_and(|m| m < 0) {
        return fail("max-chunk must be zero (which means no limit) or positive");
    }
    if c.discard_source {
        return fail("'discard-source' is not supported by bitmirror yet");
    }
    if c.filter_node_name.is_some() {
        return fail("'filter-node-name' is not supported by bitmirror yet");
    }
    let min_cluster_size = c.min_cluster_size.unwrap_or(0);
    if min_cluster_size > i64::MAX as u64 {
        return fail(&format!(
            "min-cluster-size too large: {min_cluster_size} > {}",
            i64::MAX
        ));
    }
    if min_cluster_size != 0 && !min_cluster_size.is_power_of_two() {
        return fail(
            "Could not create node: Cannot create block-copy-state: min-cluster-size needs to be \
             a power of 2",
        );
    }
    let id = c.job_id.clone().unwrap_or_default();
    let backup = Backup::new(BackupOptions {
        id: id.clone(),
        graph: daemon.graph.clone(),
        source,
        target,
        sync,
        bitmap: c.bitmap.clone(),
        bitmap_mode,
        min_cluster_size,
        max_chunk: c.max_chunk.unwrap_or(0).max(0) as u64,
        compress: c.compress,
        on_source_error: c.on_source_error,
        on_target_error: c.on_target_error,
        owns_target,
    })
    .await
    .map_err(job_err)?;
    let job = daemon
        .jobs
        .create(
            JobOptions {
                id,
                job_type: "backup",
                auto_finalize: c.auto_finalize,
                auto_dismiss: c.auto_dismiss,
                block_job: true,
            },
            backup,
        )
        .map_err(job_err)?;
    if c.speed < 0 {
        daemon.jobs.early_fail(&job);
        return fail("Parameter 'speed' expects a non-negative value");
    }
    if c.speed > 0 {
        job.set_speed(c.speed as u64).map_err(job_err)?;
    }
    Ok(job)
}
