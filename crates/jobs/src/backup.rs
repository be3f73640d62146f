//! The backup job: a copy of a source node as it was when the job was made
//! (its *point in time*), while the source stays in use.
//!
//! When the job is made, the source's in-flight writes are drained and a
//! copy-before-write hook is installed; from then on a write to a cluster
//! not copied yet first copies the cluster's old data to the target (and
//! fails if that copy fails: QEMU's default `break-guest-write`). A
//! background loop copies the other clusters. Both take clusters from one
//! set of "not copied yet" (`todo`) and register what they copy as
//! *active*: an area is copied by exactly one of them, and a write to an
//! area being copied waits until the copy is done.
//!
//! Sync modes: `full` copies everything, `top` what the top layer
//! allocates, `bitmap` the clusters a user bitmap marks, `none` nothing by
//! itself (only the old data of clusters the guest overwrites, until the
//! job is cancelled: image fleecing).
//!
//! With a bitmap, the successor protocol: when the job is made the bitmap
//! is frozen (busy) and a successor records new writes. At the end,
//! `on-success` keeps only the new writes if the job succeeded (else merges
//! them back), `never` always merges them back, `always` merges them into
//! what is left to copy even on failure, so a retry copies only that.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use block::{Edge, Graph, Node, User, WriteHook, WriteRequest};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hbitmap::HBitmap;

pub use crate::copy::OnError;
use crate::copy::{Action, ActiveAreas, Copier, CopyError, MAX_CHUNK, Pace, Policies, overlaps};
use crate::job::{BoxFuture, Error, Job, JobDriver};
pub use crate::mirror::BitmapMode;

/// Which clusters the backup copies (QEMU's `MirrorSyncMode` as backup
/// reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupSync {
    /// Everything the source reads as, through its chain.
    Full,
    /// What the source's top layer allocates.
    Top,
    /// Only the old data of clusters overwritten while the job runs.
    None,
    /// The clusters a user bitmap marks (`bitmap`, `incremental`).
    Bitmap,
}

/// How a backup is set up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The job's id.
    pub id: String,
    /// The graph the target lives in (a target the job made leaves it).
    pub graph: Arc<Graph>,
    /// What is copied.
    pub source: Arc<Node>,
    /// Where it goes; it must have the source's length.
    pub target: Arc<Node>,
    /// The sync mode.
    pub sync: BackupSync,
    /// The user bitmap: what `sync=bitmap` copies, and what the job updates
    /// at its end per `bitmap_mode`.
    pub bitmap: Option<String>,
    /// The bitmap's fate at the end.
    pub bitmap_mode: BitmapMode,
    /// Smallest copy unit (QEMU's `x-perf.min-cluster-size`); the job's
    /// cluster is the largest of this, 64 KiB and the target's cluster.
    pub min_cluster_size: u64,
    /// Largest area one copy moves (0: 1 MiB).
    pub max_chunk: u64,
    /// Write the target's clusters compressed (it must support that).
    pub compress: bool,
    /// When reading the source fails.
    pub on_source_error: OnError,
    /// When writing the target fails.
    pub on_target_error: OnError,
    /// The job made the target (`drive-backup`): it leaves the graph with
    /// the job.
    pub owns_target: bool,
}

/// A running backup (the job's [`JobDriver`]).
pub struct Backup {
    me: Weak<Backup>,
    graph: Arc<Graph>,
    source: Arc<Node>,
    target: Arc<Node>,
    edges: Mutex<Option<(Arc<Edge>, Arc<Edge>)>>,
    copier: Copier,
    policies: Policies,
    cluster: u64,
    max_chunk: u64,
    sync: BackupSync,
    bitmap: Option<String>,
    bitmap_mode: BitmapMode,
    owns_target: bool,
    /// Clusters not copied yet.
    todo: Mutex<HBitmap>,
    /// Areas being copied now (by the loop or a copy-before-write).
    active: ActiveAreas,
    hook: Mutex<Option<Arc<dyn WriteHook>>>,
    /// The job, once it runs (copy-before-write counts its progress).
    job: Mutex<Option<Weak<Job>>>,
    /// The successor of the user bitmap was resolved (abdicated or
    /// reclaimed).
    settled: AtomicBool,
    cleaned: AtomicBool,
}

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup")
            .field("source", &self.source.name())
            .field("target", &self.target.name())
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

/// The copy-before-write hook.
struct CopyBeforeWrite(Weak<Backup>);

impl WriteHook for CopyBeforeWrite {
    fn before<'a>(
        &'a self,
        _node: &'a Node,
        req: WriteRequest<'a>,
    ) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(backup) => backup.copy_before_write(req.offset, req.len).await,
                None => Ok(()),
            }
        })
    }

    fn after<'a>(
        &'a self,
        _node: &'a Node,
        _req: WriteRequest<'a>,
    ) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// One background copy: its area and outcome.
type AreaCopy = BoxFuture<'static, (u64, u64, Result<(), CopyError>)>;

/// Copies in flight at once by the background loop.
const WORKERS: usize = 16;

impl Backup {
    /// Checks the options (in QEMU's order, with QEMU's words), freezes the
    /// user bitmap behind a successor, and — with the source's writes
    /// drained — installs copy-before-write: the point in time is now.
    pub async fn new(o: BackupOptions) -> Result<Arc<Backup>, Error> {
        let fail = |m: String| Error::Driver(m);
        if Arc::ptr_eq(&o.source, &o.target) {
            return Err(fail("Source and target cannot be the same".into()));
        }
        if let Some(name) = &o.bitmap {
            if o.bitmap_mode != BitmapMode::Never {
                o.source
                    .bitmaps()
                    .check(name, block::Check::Default)
                    .map_err(|e| fail(e.to_string()))?;
            }
        }
        if o.compress && !o.target.supports_compressed_writes() {
            return Err(fail("Compression is not supported for this drive ".into()));
        }
        if o.source.length() != o.target.length() {
            return Err(fail("Source and target image have different sizes".into()));
        }
        if o.target.is_read_only() {
            return Err(fail(
                "Could not create node: Block node is read-only".into(),
            ));
        }
        let cluster = o
            .target
            .limits()
            .cluster_size
            .unwrap_or(0)
            .max(1 << 16)
            .max(o.min_cluster_size);
        let max_chunk = match o.max_chunk {
            0 => MAX_CHUNK.max(cluster),
            c if c < cluster => {
                return Err(fail(format!(
                    "Required max-chunk ({c}) is less than backup cluster size ({cluster})"
                )));
            }
            c => c.min(MAX_CHUNK.max(cluster)),
        };
        let len = o.source.length();
        // A power of two: the largest of powers of two.
        let todo = HBitmap::new(len, cluster.trailing_zeros()).map_err(|e| fail(e.to_string()))?;
        let edges = (
            Edge::new(&o.source, User::Job(o.id.clone())),
            Edge::new(&o.target, User::Job(o.id.clone())),
        );
        let mut copier = Copier::new(o.source.clone(), o.target.clone(), WORKERS + 1);
        copier.compress = o
            .compress
            .then(|| o.target.limits().cluster_size.unwrap_or(1 << 16));
        let backup = Arc::new_cyclic(|me| Backup {
            me: me.clone(),
            graph: o.graph,
            copier,
            source: o.source,
            target: o.target,
            edges: Mutex::new(Some(edges)),
            policies: Policies {
                on_source_error: o.on_source_error,
                on_target_error: o.on_target_error,
            },
            cluster,
            max_chunk,
            sync: o.sync,
            bitmap: o.bitmap,
            bitmap_mode: o.bitmap_mode,
            owns_target: o.owns_target,
            todo: Mutex::new(todo),
            active: ActiveAreas::default(),
            hook: Mutex::new(None),
            job: Mutex::new(None),
            settled: AtomicBool::new(true),
            cleaned: AtomicBool::new(false),
        });
        // The point in time: nothing in flight on the source while the
        // successor takes over and the hook goes in.
        backup.source.hold_writes().await;
        let started = backup.freeze();
        backup.source.release_writes(None);
        started?;
        Ok(backup)
    }

    /// Under the source's held writes: the successor, the set to copy, the
    /// hook.
    fn freeze(&self) -> Result<(), Error> {
        let fail = |m: String| Error::Driver(m);
        let len = self.source.length();
        let mut todo = self.todo.lock().unwrap_or_else(|e| e.into_inner());
        match self.sync {
            BackupSync::Bitmap => {
                let name = self.bitmap.as_deref().unwrap_or_default();
                let bitmaps = self.source.bitmaps();
                let bits = bitmaps.snapshot(name).map_err(|e| fail(e.to_string()))?;
                todo.merge(&bits).map_err(|e| fail(e.to_string()))?;
            }
            _ => todo.set(0, len).map_err(|e| fail(e.to_string()))?,
        }
        drop(todo);
        if let Some(name) = &self.bitmap {
            self.source
                .bitmaps()
                .create_successor(name)
                .map_err(|e| fail(e.to_string()))?;
            self.settled.store(false, Ordering::SeqCst);
        }
        let hook: Arc<dyn WriteHook> = Arc::new(CopyBeforeWrite(self.me.clone()));
        self.source.add_write_hook(hook.clone());
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
        Ok(())
    }

    /// The job's cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    fn todo(&self) -> std::sync::MutexGuard<'_, HBitmap> {
        self.todo.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release_area(&self, area: (u64, u64)) {
        self.active.release(area);
    }

    fn progress_by(&self, n: u64) {
        let job = self.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job.and_then(|j| j.upgrade()) {
            job.progress_by(n);
        }
    }

    /// Before a write to `offset..offset + len`: copies the old data of the
    /// clusters not copied yet, or waits for the copy that is at it. An
    /// error fails the guest's write; the clusters stay to copy.
    async fn copy_before_write(&self, offset: u64, len: u64) -> block::Result<()> {
        let c = self.cluster;
        let start = offset - offset % c;
        let end = (offset + len)
            .div_ceil(c)
            .saturating_mul(c)
            .min(self.source.length());
        if start >= end {
            return Ok(());
        }
        let area = (start, end - start);
        let claimed = self.active.claim(area, || {
            let mut todo = self.todo();
            let mut runs = Vec::new();
            let mut at = start;
            while let Some((o, l)) = todo.next_dirty_area(at, end, end - at) {
                runs.push((o, l));
                at = o + l;
            }
            for &(o, l) in &runs {
                let _ = todo.reset(o, l);
            }
            (!runs.is_empty()).then_some(runs)
        });
        // Nothing left to copy there (or it was copied while we waited).
        let Some(runs) = claimed.await else {
            return Ok(());
        };
        let mut result = Ok(());
        for &(o, l) in &runs {
            match self.copier.copy(o, l, true).await {
                Ok(_) => self.progress_by(l),
                Err(e) => {
                    let _ = self.todo().set(o, l);
                    result = Err(e.error);
                }
            }
        }
        self.release_area(area);
        result
    }

    /// The next area from `cursor` still to copy that overlaps no copy in
    /// flight, with its bits cleared and registered active.
    fn take_area(&self, cursor: &mut u64) -> Option<(u64, u64)> {
        let len = self.source.length();
        let mut active = self.active.lock();
        let todo = self.todo.lock().unwrap_or_else(|e| e.into_inner());
        let mut wrapped = false;
        loop {
            let Some(area) = todo.next_dirty_area(*cursor, len, self.max_chunk) else {
                if wrapped || *cursor == 0 {
                    return None;
                }
                wrapped = true;
                *cursor = 0;
                continue;
            };
            if let Some(&(o, l)) = active.iter().find(|&&a| overlaps(a, area)) {
                *cursor = o + l;
                if *cursor >= len {
                    if wrapped {
                        return None;
                    }
                    wrapped = true;
                    *cursor = 0;
                }
                continue;
            }
            drop(todo);
            let _ = self.todo().reset(area.0, area.1);
            active.push(area);
            *cursor = area.0 + area.1;
            return Some(area);
        }
    }

    /// One background copy: `top` skips what the top layer does not
    /// allocate. Returns the bytes copied (counted as progress).
    async fn copy_area(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        if self.sync == BackupSync::Top {
            let mut at = offset;
            while at < offset + len {
                let extents = self
                    .source
                    .block_status(at, offset + len - at)
                    .await
                    .map_err(|error| CopyError {
                        write: false,
                        error,
                    })?;
                let Some(last) = extents.last().map(|e| e.offset + e.len) else {
                    break;
                };
                for e in extents {
                    let e_end = (e.offset + e.len).min(offset + len);
                    if e.allocated && e.depth <= 1 && e_end > e.offset {
                        self.copier.copy(e.offset, e_end - e.offset, true).await?;
                    }
                }
                at = last.max(at + 1);
            }
            return Ok(());
        }
        self.copier.copy(offset, len, true).await.map(drop)
    }

    fn remaining(&self) -> u64 {
        self.todo().count()
    }

    async fn main_loop(self: &Arc<Self>, job: &Arc<Job>) -> Result<(), String> {
        if self.sync == BackupSync::None {
            // Copy-before-write only, until cancelled.
            loop {
                job.pause_point().await;
                job.wait_for_wake(Duration::from_secs(1)).await;
            }
        }
        let mut cursor = 0u64;
        let mut running: FuturesUnordered<AreaCopy> = FuturesUnordered::new();
        let mut pace = Pace::default();
        loop {
            job.pause_point().await;
            while running.len() < WORKERS && pace.wait(job.speed()).is_none() {
                let Some((o, l)) = self.take_area(&mut cursor) else {
                    break;
                };
                pace.issued(l);
                let me = self.clone();
                running.push(Box::pin(async move { (o, l, me.copy_area(o, l).await) }));
            }
            if running.is_empty() {
                if self.remaining() == 0 {
                    // Copy-before-writes still at work finish first.
                    let pending = !self.active.lock().is_empty();
                    if !pending {
                        break;
                    }
                    job.wait_for_wake(Duration::from_millis(5)).await;
                    continue;
                }
                // Over the speed limit, or everything left is being
                // copied by a copy-before-write.
                let wait = pace.wait(job.speed()).unwrap_or(Duration::from_millis(5));
                job.wait_for_wake(wait).await;
                continue;
            }
            let Some((o, l, r)) = running.next().await else {
                continue;
            };
            if r.is_err() {
                let _ = self.todo().set(o, l);
            }
            self.release_area((o, l));
            match r {
                Ok(()) => job.progress_by(l),
                Err(e) => match self.policies.on_error(job, &e) {
                    Action::Report => {
                        while let Some((o, l, r)) = running.next().await {
                            if r.is_err() {
                                let _ = self.todo().set(o, l);
                            }
                            self.release_area((o, l));
                        }
                        return Err(e.error.to_string());
                    }
                    Action::Ignore => tokio::time::sleep(Duration::from_millis(10)).await,
                    Action::Stop => {
                        while let Some((o, l, r)) = running.next().await {
                            match r {
                                Ok(()) => job.progress_by(l),
                                Err(_) => {
                                    let _ = self.todo().set(o, l);
                                }
                            }
                            self.release_area((o, l));
                        }
                    }
                },
            }
        }
        self.target.flush().await.map_err(|e| e.to_string())
    }

    /// Resolves the user bitmap's successor: `keep_new_only` drops the
    /// frozen bits (the backup covered them), else the successor's bits
    /// are merged back — after, for `always`, the frozen bits became what
    /// is left to copy.
    fn settle_bitmap(&self, succeeded: bool) {
        let Some(name) = &self.bitmap else {
            return;
        };
        if self.settled.swap(true, Ordering::SeqCst) {
            return;
        }
        let bitmaps = self.source.bitmaps();
        let keep_new_only = (succeeded || self.bitmap_mode == BitmapMode::Always)
            && self.bitmap_mode != BitmapMode::Never;
        if keep_new_only && succeeded {
            if let Err(e) = bitmaps.abdicate(name) {
                tracing::error!(bitmap = name, "cannot hand the bitmap over: {e}");
            }
            return;
        }
        if keep_new_only {
            // `always` after a failure: the frozen bits become what was
            // not copied (areas in flight count as not copied).
            let mut left = match self.todo().try_clone() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(bitmap = name, "cannot keep what is left: {e}");
                    let _ = bitmaps.reclaim(name);
                    return;
                }
            };
            for &(o, l) in self.active.lock().iter() {
                let _ = left.set(o, l);
            }
            let updated = bitmaps.id(name).ok().and_then(|id| {
                bitmaps.with_bits(id, |bits| {
                    bits.reset_all();
                    bits.merge(&left)
                })
            });
            if !matches!(updated, Some(Ok(()))) {
                tracing::error!(bitmap = name, "cannot set the bitmap to what is left");
            }
        }
        if let Err(e) = bitmaps.reclaim(name) {
            tracing::error!(bitmap = name, "cannot reclaim the bitmap: {e}");
        }
    }
}

impl Drop for Backup {
    /// A backup whose job could not be made gives the bitmap back and
    /// takes its hook out.
    fn drop(&mut self) {
        self.clean();
    }
}

impl JobDriver for Backup {
    fn run(self: Arc<Self>, job: Arc<Job>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move { self.main_loop(&job).await })
    }

    /// Counts what is to copy as the job's total, and copy-before-write's
    /// copies as its progress from now on.
    fn starting(&self, job: &Arc<Job>) {
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(job));
        let (current, _) = job.progress();
        job.set_progress(current, current + self.remaining());
    }

    fn commit(&self) {
        self.settle_bitmap(true);
    }

    fn target_node(&self) -> Option<Arc<Node>> {
        Some(self.target.clone())
    }

    fn abort(&self) {
        self.settle_bitmap(false);
    }

    fn clean(&self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(h) = self.hook.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.source.remove_write_hook(&h);
        }
        // Never made it to commit or abort: as a failure.
        self.settle_bitmap(false);
        drop(self.edges.lock().unwrap_or_else(|e| e.into_inner()).take());
        if self.owns_target {
            let (graph, target) = (self.graph.clone(), self.target.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    graph.remove_unused(&target).await;
                });
            }
        }
    }
}
