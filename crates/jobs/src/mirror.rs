//! The mirror job: copies a source node to a target node while the source
//! stays in use, then (on `complete`) moves the source's users to the
//! target. What is copied is a dirty bitmap of the job's own, installed on
//! the source before anything is scanned, so a write racing the job's
//! start is never lost; its initial contents depend on the sync mode:
//! everything (`full`), what the top layer allocates (`top`), nothing
//! (`none`), or a copy of a user's bitmap (`bitmap`, the founding patch's
//! incremental mode).
//!
//! The copy loop takes dirty areas, clears their bits, reads the source and
//! writes the target (write-zeroes for zeroes, nothing when the target is
//! known to read zeroes there); a guest write meanwhile marks its bits
//! again when it completes (the block layer's write tracking), so the area
//! is copied once more. Areas overlapping a copy in flight wait for it,
//! so an older copy never lands after a newer one. The job is READY when
//! nothing is dirty or in flight and the target is flushed. `complete`
//! holds the source's writes (its gate), copies what is left, flushes, and
//! points every user of the source at the target; writes held meanwhile go
//! to the target.
//!
//! In `write-blocking` copy mode (at start, or switched to with
//! `block-job-change`) a guest write completes only once its clusters have
//! been copied too (from the source, serialized with every other copy of
//! those clusters), so the guest cannot outrun the job.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use block::{BitmapId, Check, Edge, Graph, Node, User, WriteHook, WriteRequest};
use futures_util::stream::{FuturesUnordered, StreamExt};

pub use crate::copy::OnError;
use crate::copy::{Action, ActiveAreas, Copier, CopyError, MAX_CHUNK, Pace, Policies, overlaps};
use crate::job::{BoxFuture, Error, Job, JobDriver};

/// Which data the mirror copies at first (QEMU's `MirrorSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorSync {
    /// Everything the source reads as, through its chain.
    Full,
    /// What the source's top layer allocates.
    Top,
    /// Only writes made from now on.
    None,
    /// The clusters a user bitmap marks, plus writes from now on
    /// (`sync=bitmap`, or the founding patch's `incremental`).
    Bitmap,
}

/// What happens to the user bitmap of `sync=bitmap` at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BitmapMode {
    /// Untouched: the job worked on a copy, the bitmap kept recording
    /// (the default, and the founding patch's behaviour).
    #[default]
    Never,
    /// On success, the bitmap becomes what is left to copy (nothing).
    OnSuccess,
    /// On success or failure, the bitmap becomes what is left to copy, so
    /// a failed mirror can be resumed.
    Always,
}

/// How a mirror is set up.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// The job's id.
    pub id: String,
    /// The graph the source and target live in (for the pivot).
    pub graph: Arc<Graph>,
    /// What is copied.
    pub source: Arc<Node>,
    /// Where it goes; the job fails unless it has the source's length.
    pub target: Arc<Node>,
    /// The sync mode.
    pub sync: MirrorSync,
    /// The user bitmap of `sync=bitmap`.
    pub bitmap: Option<String>,
    /// Its fate at the end.
    pub bitmap_mode: BitmapMode,
    /// Bytes per bit of the job's bitmap (a power of two, 512 B to 64 MiB);
    /// the user bitmap's with `sync=bitmap`; by default the target's
    /// cluster size clamped to 4..64 KiB, or 64 KiB.
    pub granularity: Option<u64>,
    /// Most bytes in flight at once (16 MiB by default).
    pub buf_size: Option<u64>,
    /// The target reads as zeroes already: zeroes are not written.
    pub target_is_zero: bool,
    /// Zeroes may be written by deallocating (`unmap`, default on).
    pub unmap: bool,
    /// Start in `write-blocking` copy mode.
    pub write_blocking: bool,
    /// The job made the target (`drive-mirror`): it takes it out of the
    /// graph again unless it pivoted to it.
    pub owns_target: bool,
    /// Switch to write-blocking on its own when the backlog has not
    /// shrunk for [`STALL_WINDOW`] (our extension, off by default).
    pub auto_write_blocking: bool,
    /// The node whose users move to the target at completion (QEMU's
    /// `replaces`; the source by default).
    pub replaces: Option<Arc<Node>>,
    /// When reading the source fails.
    pub on_source_error: OnError,
    /// When writing the target fails.
    pub on_target_error: OnError,
}

/// A running mirror (the job's [`JobDriver`]).
pub struct Mirror {
    graph: Arc<Graph>,
    source: Arc<Node>,
    target: Arc<Node>,
    /// The job's hold on the source and the target, until it cleans up.
    edges: Mutex<Option<(Arc<Edge>, Arc<Edge>)>>,
    dirty: BitmapId,
    granularity: u64,
    buf_size: u64,
    sync: MirrorSync,
    bitmap: Option<String>,
    bitmap_mode: BitmapMode,
    /// Moves the data.
    copier: Copier,
    policies: Policies,
    replaces: Option<Arc<Node>>,
    auto_write_blocking: bool,
    owns_target: bool,
    pivoted: AtomicBool,
    complete: AtomicBool,
    finish_in_place: AtomicBool,
    holding: AtomicBool,
    cleaned: AtomicBool,
    /// Areas being copied now (by the background loop or a guest write in
    /// write-blocking mode).
    active: ActiveAreas,
    /// The write-blocking hook, while the job is in that mode.
    hook: Mutex<Option<Arc<dyn WriteHook>>>,
    ready: AtomicBool,
    /// Itself, for the hook it installs.
    me: Weak<Mirror>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("source", &self.source.name())
            .field("target", &self.target.name())
            .finish_non_exhaustive()
    }
}

/// The write-blocking hook: after a guest write to the source, its
/// clusters are copied before the guest hears back.
struct Active(Weak<Mirror>);

impl WriteHook for Active {
    fn before<'a>(
        &'a self,
        _node: &'a Node,
        _req: WriteRequest<'a>,
    ) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn after<'a>(
        &'a self,
        _node: &'a Node,
        req: WriteRequest<'a>,
    ) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async move {
            if let Some(mirror) = self.0.upgrade() {
                mirror.copy_now(req.offset, req.len).await;
            }
            Ok(())
        })
    }
}

/// How long the backlog may go without a new low before a mirror with
/// `auto-write-blocking` switches to write-blocking.
pub const STALL_WINDOW: Duration = Duration::from_secs(2);

/// Watches the backlog for a new low.
#[derive(Debug)]
struct Stall {
    low: u64,
    since: Instant,
}

impl Stall {
    fn new() -> Stall {
        Stall {
            low: u64::MAX,
            since: Instant::now(),
        }
    }

    /// Whether `backlog` has made no new low for [`STALL_WINDOW`] (and is
    /// not empty).
    fn stalled(&mut self, backlog: u64) -> bool {
        if backlog < self.low {
            self.low = backlog;
            self.since = Instant::now();
            return false;
        }
        backlog > 0 && self.since.elapsed() >= STALL_WINDOW
    }
}

/// One area's copy: its offset, length and outcome.
type CopyFuture = BoxFuture<'static, (u64, u64, Result<u64, CopyError>)>;

/// Bytes the background copy keeps in flight in write-blocking mode: one
/// chunk (two measured 9.6 ms at the guest's p99 into `O_DIRECT`, one
/// 5.0 ms, with no loss in time to READY).
const WRITE_BLOCKING_WINDOW: u64 = MAX_CHUNK;

/// Largest area of a known hole taken at once (zeroing it is cheap).
const MAX_HOLE_CHUNK: u64 = 1 << 30;

impl Mirror {
    /// Checks the options and installs the job's dirty bitmap on the
    /// source: from here on every write to the source is tracked.
    pub fn new(o: MirrorOptions) -> Result<Arc<Mirror>, Error> {
        let fail = |m: String| Error::Driver(m);
        if Arc::ptr_eq(&o.source, &o.target) {
            return Err(fail("Can't mirror node into itself".into()));
        }
        if o.target.is_read_only() {
            return Err(fail(format!(
                "Block node '{}' is read-only",
                o.target.name()
            )));
        }
        let granularity = match (&o.bitmap, o.sync) {
            (Some(_), s) if s != MirrorSync::Bitmap => {
                return Err(fail(
                    "Bitmap can only be given with sync mode 'bitmap'".into(),
                ));
            }
            (None, MirrorSync::Bitmap) => {
                return Err(fail("Sync mode 'bitmap' requires a bitmap".into()));
            }
            (Some(_), _) if o.granularity.is_some() => {
                return Err(fail(
                    "Cannot specify granularity when a bitmap is given: the job uses the \
                     bitmap's"
                        .into(),
                ));
            }
            (Some(name), _) => {
                let check = match o.bitmap_mode {
                    BitmapMode::Never => Check::AllowReadonly,
                    _ => Check::Default,
                };
                o.source
                    .bitmaps()
                    .check(name, check)
                    .map_err(|e| fail(e.to_string()))?;
                o.source
                    .bitmaps()
                    .info()
                    .iter()
                    .find(|i| &i.name == name)
                    .map(|i| i.granularity)
                    .unwrap_or(1 << 16)
            }
            (None, _) => match o.granularity {
                Some(g) if !(512..=(64 << 20)).contains(&g) => {
                    return Err(fail(
                        "Parameter 'granularity' expects a value in range [512B, 64MB]".into(),
                    ));
                }
                Some(g) if !g.is_power_of_two() => {
                    return Err(fail("Parameter 'granularity' expects a power of 2".into()));
                }
                Some(g) => g,
                None => o
                    .target
                    .limits()
                    .cluster_size
                    .map_or(1 << 16, |c| c.clamp(4096, 1 << 16)),
            },
        };
        if let (Some(name), true) = (&o.bitmap, o.bitmap_mode != BitmapMode::Never) {
            o.source
                .bitmaps()
                .set_busy(name, true)
                .map_err(|e| fail(e.to_string()))?;
        }
        let dirty = o
            .source
            .bitmaps()
            .add_anonymous(granularity)
            .map_err(|e| fail(e.to_string()))?;
        let edges = (
            Edge::new(&o.source, User::Job(o.id.clone())),
            Edge::new(&o.target, User::Job(o.id.clone())),
        );
        let buf_size = o.buf_size.filter(|b| *b > 0).unwrap_or(16 << 20);
        let mut copier = Copier::new(
            o.source.clone(),
            o.target.clone(),
            (buf_size / MAX_CHUNK + 1) as usize,
        );
        copier.target_is_zero = o.target_is_zero;
        copier.unmap = o.unmap;
        let mirror = Arc::new_cyclic(|me| Mirror {
            me: me.clone(),
            graph: o.graph,
            source: o.source,
            target: o.target,
            edges: Mutex::new(Some(edges)),
            dirty,
            granularity,
            buf_size,
            copier,
            sync: o.sync,
            bitmap: o.bitmap,
            bitmap_mode: o.bitmap_mode,
            policies: Policies {
                on_source_error: o.on_source_error,
                on_target_error: o.on_target_error,
            },
            replaces: o.replaces,
            auto_write_blocking: o.auto_write_blocking,
            owns_target: o.owns_target,
            pivoted: AtomicBool::new(false),
            complete: AtomicBool::new(false),
            finish_in_place: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            cleaned: AtomicBool::new(false),
            active: ActiveAreas::default(),
            hook: Mutex::new(None),
            ready: AtomicBool::new(false),
        });
        if o.write_blocking {
            mirror.set_write_blocking(true);
        }
        Ok(mirror)
    }

    /// Switches between `background` and `write-blocking` copy modes
    /// (`block-job-change`). In write-blocking mode a guest write to the
    /// source completes only once its clusters are on the target too, so
    /// guest writes no longer add to what is left to copy: the job
    /// converges however fast the guest writes.
    pub fn set_write_blocking(&self, on: bool) {
        let mut hook = self.hook.lock().unwrap_or_else(|e| e.into_inner());
        match (on, hook.take()) {
            (true, None) => {
                let h: Arc<dyn WriteHook> = Arc::new(Active(self.me.clone()));
                self.source.add_write_hook(h.clone());
                *hook = Some(h);
            }
            (true, Some(h)) => *hook = Some(h),
            (false, Some(h)) => self.source.remove_write_hook(&h),
            (false, None) => {}
        }
    }

    fn is_write_blocking(&self) -> bool {
        self.hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Copies the clusters of a guest write now (write-blocking mode): waits
    /// for overlapping copies, clears the bits, copies the source's current
    /// contents. On failure the clusters stay dirty for the background loop.
    async fn copy_now(&self, offset: u64, len: u64) {
        let g = self.granularity;
        let start = offset - offset % g;
        let end = (offset + len)
            .div_ceil(g)
            .saturating_mul(g)
            .min(self.source.length());
        if start >= end {
            return;
        }
        let area = (start, end - start);
        self.active
            .claim(area, || Some(self.with_dirty(|d| d.reset(area.0, area.1))))
            .await;
        if let Err(e) = self.copier.copy(area.0, area.1, false).await {
            tracing::warn!(
                "write-blocking copy failed, left to the background: {}",
                e.error
            );
            self.with_dirty(|d| d.set(area.0, area.1));
        }
        self.release_area(area);
    }

    /// How many bytes the background copy may have in flight: `buf-size`,
    /// but in write-blocking mode only [`WRITE_BLOCKING_WINDOW`], so that a
    /// guest write's copy queues behind at most that on the target (a
    /// guest waits for its copies there; a whole `buf-size` ahead of it
    /// cost the guest 80–110 ms at p99 into an `O_DIRECT` file).
    fn background_window(&self) -> u64 {
        match self.is_write_blocking() {
            true => WRITE_BLOCKING_WINDOW.min(self.buf_size),
            false => self.buf_size,
        }
    }

    fn release_area(&self, area: (u64, u64)) {
        self.active.release(area);
    }

    /// The job's bitmap granularity.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    fn with_dirty<R>(&self, f: impl FnOnce(&mut hbitmap::HBitmap) -> R) -> Option<R> {
        self.source.bitmaps().with_bits(self.dirty, f)
    }

    fn dirty_bytes(&self) -> u64 {
        self.source
            .bitmaps()
            .read_bits(self.dirty, |b| b.count())
            .unwrap_or(0)
    }

    /// Marks what the sync mode copies at first.
    async fn initial_set(&self) -> Result<(), String> {
        let len = self.source.length();
        match self.sync {
            MirrorSync::None => {}
            MirrorSync::Bitmap => {
                // The job holds the bitmap (busy) in modes that change it:
                // read it by id, past the busy check.
                let name = self.bitmap.as_deref().unwrap_or_default();
                let bitmaps = self.source.bitmaps();
                let id = bitmaps.id(name).map_err(|e| e.to_string())?;
                let bits = bitmaps
                    .read_bits(id, |b| b.try_clone())
                    .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))?
                    .map_err(|e| e.to_string())?;
                self.with_dirty(|d| d.merge(&bits))
                    .transpose()
                    .map_err(|e| e.to_string())?;
            }
            MirrorSync::Full | MirrorSync::Top => {
                let mut offset = 0;
                while offset < len {
                    let extents = self
                        .source
                        .block_status(offset, len - offset)
                        .await
                        .map_err(|e| e.to_string())?;
                    let Some(last) = extents.last().map(|e| e.offset + e.len) else {
                        break;
                    };
                    for e in extents {
                        let copy = match self.sync {
                            MirrorSync::Top => e.allocated && e.depth <= 1,
                            _ => !(e.zero && self.copier.target_is_zero),
                        };
                        if copy {
                            self.with_dirty(|d| d.set(e.offset, e.len))
                                .transpose()
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    offset = last;
                }
            }
        }
        Ok(())
    }

    /// The next dirty area from `cursor` that overlaps no copy in flight,
    /// with its bits cleared and registered as active; `None` if there is
    /// none right now. Release it with [`release_area`](Self::release_area).
    fn take_area(&self, cursor: &mut u64, max_len: u64) -> Option<(u64, u64)> {
        let len = self.source.length();
        let chunk = max_len.max(MAX_CHUNK).max(self.granularity);
        let mut active = self.active.lock();
        let mut wrapped = false;
        loop {
            let found = self
                .source
                .bitmaps()
                .read_bits(self.dirty, |d| d.next_dirty_area(*cursor, len, chunk))
                .flatten();
            let Some(area) = found else {
                if wrapped || *cursor == 0 {
                    return None;
                }
                wrapped = true;
                *cursor = 0;
                continue;
            };
            if let Some(&(o, l)) = active.iter().find(|&&a| overlaps(a, area)) {
                // Wait for that copy; look beyond it.
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
            // Clear before reading: a write from now on marks the area again.
            self.with_dirty(|d| d.reset(area.0, area.1));
            active.push(area);
            *cursor = area.0 + area.1;
            return Some(area);
        }
    }

    /// Copies whatever is dirty, one area after another (the source's
    /// writes are held).
    async fn drain_dirty(&self, job: &Job) -> Result<(), String> {
        let mut cursor = 0;
        while let Some((o, l)) = self.take_area(&mut cursor, MAX_CHUNK) {
            let r = self.copier.copy(o, l, false).await.map(drop);
            if r.is_err() {
                self.with_dirty(|d| d.set(o, l));
            }
            self.release_area((o, l));
            // The source's writes are held: no pausing here, every error
            // ends the job.
            r.map_err(|e| e.error.to_string())?;
            job.progress_by(l);
        }
        Ok(())
    }

    async fn main_loop(self: &Arc<Self>, job: &Arc<Job>) -> Result<(), String> {
        // QEMU checks this in the job, which then fails.
        if self.source.length() != self.target.length() {
            return Err("Source and target image have different sizes".into());
        }
        self.initial_set().await?;
        job.set_progress(0, self.dirty_bytes());
        let mut cursor = 0u64;
        let mut inflight: Vec<(u64, u64)> = Vec::new();
        let mut running: FuturesUnordered<CopyFuture> = FuturesUnordered::new();
        let mut pace = Pace::default();
        let mut zero_until = 0u64;
        let mut stall = Stall::new();
        loop {
            job.pause_point().await;
            if self.auto_write_blocking
                && !self.is_write_blocking()
                && stall.stalled(self.dirty_bytes())
            {
                tracing::info!(
                    job = job.id(),
                    "the backlog stopped shrinking: switching to write-blocking"
                );
                self.set_write_blocking(true);
            }
            // Fill the pipeline, as far as the speed limit allows.
            while inflight.iter().map(|(_, l)| l).sum::<u64>() < self.background_window()
                && pace.wait(job.speed()).is_none()
            {
                // In a hole the last copy saw going on, take more of it.
                let max_len = if zero_until > cursor {
                    (zero_until - cursor).min(MAX_HOLE_CHUNK)
                } else {
                    MAX_CHUNK
                };
                let Some((o, l)) = self.take_area(&mut cursor, max_len) else {
                    break;
                };
                inflight.push((o, l));
                pace.issued(l);
                let me = self.clone();
                running.push(Box::pin(async move {
                    (o, l, me.copier.copy(o, l, false).await)
                }));
            }
            let in_flight_bytes: u64 = inflight.iter().map(|(_, l)| l).sum();
            let done = job.progress().0;
            job.set_progress(done, done + in_flight_bytes + self.dirty_bytes());
            if running.is_empty() {
                if self.dirty_bytes() > 0 {
                    // Over the speed limit: wait (a verb cuts it short).
                    if let Some(wait) = pace.wait(job.speed()) {
                        job.wait_for_wake(wait).await;
                    }
                    continue;
                }
                if !job.is_ready() {
                    self.target.flush().await.map_err(|e| e.to_string())?;
                    if self.dirty_bytes() > 0 {
                        continue;
                    }
                    job.set_ready();
                    self.ready.store(true, Ordering::SeqCst);
                }
                if self.complete.load(Ordering::SeqCst)
                    || self.finish_in_place.load(Ordering::SeqCst)
                {
                    return self.finish(job).await;
                }
                // Ready and idle: look for new writes now and then, or
                // when a verb touches the job.
                job.wait_for_wake(Duration::from_millis(10)).await;
                continue;
            }
            if let Some((o, l, r)) = running.next().await {
                inflight.retain(|&(a, b)| (a, b) != (o, l));
                if r.is_err() {
                    self.with_dirty(|d| d.set(o, l));
                }
                self.release_area((o, l));
                if let Ok(z) = r {
                    zero_until = zero_until.max(z);
                }
                if let Err(e) = r {
                    match self.policies.on_error(job, &e) {
                        Action::Report => {
                            while let Some((o, l, _)) = running.next().await {
                                self.release_area((o, l));
                            }
                            return Err(e.error.to_string());
                        }
                        // Retried: the area is dirty again. Not at once,
                        // though, if the error persists.
                        Action::Ignore => tokio::time::sleep(Duration::from_millis(10)).await,
                        // The job pauses at the top of the loop, once the
                        // copies in flight have ended (their failures only
                        // leave their areas dirty: a late one must not
                        // pause the job again after the user resumed it).
                        Action::Stop => {
                            while let Some((o, l, r)) = running.next().await {
                                inflight.retain(|&(a, b)| (a, b) != (o, l));
                                if r.is_err() {
                                    self.with_dirty(|d| d.set(o, l));
                                } else {
                                    job.progress_by(l);
                                }
                                self.release_area((o, l));
                            }
                        }
                    }
                    continue;
                }
                job.progress_by(l);
            }
        }
    }

    /// The end of a ready mirror: hold the source's writes, copy what is
    /// left and flush. The writes stay held until [`JobDriver::prepare`]
    /// pivots (or the job aborts), as QEMU keeps the source drained until
    /// then: with auto-finalize off, until `job-finalize`.
    async fn finish(&self, job: &Job) -> Result<(), String> {
        // Guests wait for this: their writes are held.
        block::class::with_class(block::IoClass::Foreground, self.finish_held(job)).await
    }

    /// [`Mirror::finish`] itself, in the foreground.
    async fn finish_held(&self, job: &Job) -> Result<(), String> {
        self.holding.store(true, Ordering::SeqCst);
        self.source.hold_writes().await;
        let result = async {
            self.drain_dirty(job).await?;
            self.target.flush().await.map_err(|e| e.to_string())
        }
        .await;
        if result.is_err() && self.holding.swap(false, Ordering::SeqCst) {
            self.source.release_writes(None);
        }
        result
    }

    /// Moves the users of the source (or of `replaces`) to the target, then
    /// lets the held writes go on — onto the target when the source itself
    /// was replaced.
    fn pivot(&self) -> Result<(), String> {
        let from = self.replaces.as_ref().unwrap_or(&self.source);
        let result = self
            .graph
            .replace(from, &self.target)
            .map_err(|e| e.to_string());
        if result.is_ok() {
            self.pivoted.store(true, Ordering::SeqCst);
        }
        if self.holding.swap(false, Ordering::SeqCst) {
            match (&result, &self.replaces) {
                (Ok(()), None) => self.source.release_writes(Some(&self.target)),
                _ => self.source.release_writes(None),
            }
        }
        result
    }

    /// The user bitmap becomes what is left to copy.
    fn hand_back_bitmap(&self) {
        let Some(name) = &self.bitmap else {
            return;
        };
        let bitmaps = self.source.bitmaps();
        let _ = bitmaps.set_busy(name, false);
        let left = bitmaps
            .read_bits(self.dirty, |d| d.try_clone())
            .and_then(Result::ok);
        if let (Ok(_), Some(left)) = (bitmaps.clear(name), left) {
            if let Err(e) = bitmaps.merge(name, &[left]) {
                tracing::error!(bitmap = name, "cannot hand the bitmap back: {e}");
            }
        }
    }
}

impl Drop for Mirror {
    /// A mirror that never ran (its job could not be made) or has ended
    /// leaves no bitmap of its own and no busy user bitmap behind.
    fn drop(&mut self) {
        self.clean();
    }
}

impl JobDriver for Mirror {
    fn run(self: Arc<Self>, job: Arc<Job>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move { self.main_loop(&job).await })
    }

    fn prepare(&self) -> Result<(), String> {
        if self.complete.load(Ordering::SeqCst) {
            return self.pivot();
        }
        if self.holding.swap(false, Ordering::SeqCst) {
            self.source.release_writes(None);
        }
        Ok(())
    }

    fn commit(&self) {
        if self.bitmap_mode != BitmapMode::Never {
            self.hand_back_bitmap();
        }
    }

    fn abort(&self) {
        // A cancel cannot leave the source's writes held.
        if self.holding.swap(false, Ordering::SeqCst) {
            self.source.release_writes(None);
        }
        if self.bitmap_mode == BitmapMode::Always {
            self.hand_back_bitmap();
        }
    }

    fn clean(&self) {
        // Once: a later drop must not free a bitmap another job took since.
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(h) = self.hook.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.source.remove_write_hook(&h);
        }
        self.source.bitmaps().remove_anonymous(self.dirty);
        if let (Some(name), true) = (&self.bitmap, self.bitmap_mode != BitmapMode::Never) {
            let _ = self.source.bitmaps().set_busy(name, false);
        }
        drop(self.edges.lock().unwrap_or_else(|e| e.into_inner()).take());
        // A target the job made and did not pivot to goes away with it.
        if self.owns_target && !self.pivoted.load(Ordering::SeqCst) {
            let (graph, target) = (self.graph.clone(), self.target.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    graph.remove_unused(&target).await;
                });
            }
        }
    }

    fn complete(&self, job: &Job) -> Result<(), Error> {
        // QEMU: a cancel was asked for (a ready mirror finishing in place).
        if self.finish_in_place.load(Ordering::SeqCst) {
            return Err(Error::Driver(format!(
                "The active block job '{}' cannot be completed",
                job.id()
            )));
        }
        self.complete.store(true, Ordering::SeqCst);
        job.wake();
        Ok(())
    }

    fn change(&self, args: &serde_json::Value) -> Result<(), Error> {
        // QEMU's rules: the same mode is a no-op, background may become
        // write-blocking, not back (an absent copy-mode means background).
        let blocking = matches!(
            args.get("copy-mode").and_then(|m| m.as_str()),
            Some("write-blocking")
        );
        if blocking == self.is_write_blocking() {
            return Ok(());
        }
        if !blocking {
            return Err(Error::Driver(
                "Change to copy mode 'background' is not implemented".into(),
            ));
        }
        self.set_write_blocking(true);
        Ok(())
    }

    fn target_node(&self) -> Option<Arc<Node>> {
        Some(self.target.clone())
    }

    fn block_job_extra(&self) -> Vec<(&'static str, serde_json::Value)> {
        // In sync: write-blocking, and everything copied once (READY).
        let synced = self.is_write_blocking() && self.ready.load(Ordering::SeqCst);
        vec![("actively-synced", serde_json::Value::Bool(synced))]
    }

    fn soft_cancel(&self, job: &Job, force: bool) -> bool {
        // Completing already: the cut-over runs to its end.
        if self.complete.load(Ordering::SeqCst) {
            return true;
        }
        if job.is_ready() && !force {
            self.finish_in_place.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }
}
