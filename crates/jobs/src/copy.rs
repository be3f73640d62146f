//! What copying jobs share: moving an area from a source node to a target
//! node (zeroes as write-zeroes, nothing where the target reads zeroes
//! already; data inside the kernel from a buffered host file to another
//! or to an NBD server), the error policies, and the speed limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use block::{IoBuf, Node, ZeroFlags};
use tokio::sync::Notify;

use crate::job::Job;

/// Whether the areas `(offset, len)` `a` and `b` share a byte.
pub(crate) fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

/// The areas being copied now, none overlapping another: a cluster is
/// copied by one copier at a time, so a newer copy never lands before an
/// older one.
#[derive(Debug, Default)]
pub(crate) struct ActiveAreas {
    areas: Mutex<Vec<(u64, u64)>>,
    /// Wakes copiers waiting for an overlapping copy to end.
    done: Notify,
}

impl ActiveAreas {
    /// The list, locked (to pick an area that overlaps none and push it).
    pub fn lock(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.areas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no active area overlaps `area`, then runs `claim`
    /// under the lock: `Some` makes `area` active (release it with
    /// [`release`](Self::release)) and is returned; `None` leaves nothing.
    pub async fn claim<R>(&self, area: (u64, u64), claim: impl FnOnce() -> Option<R>) -> Option<R> {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            {
                let mut areas = self.lock();
                if !areas.iter().any(|&a| overlaps(a, area)) {
                    let claimed = claim();
                    if claimed.is_some() {
                        areas.push(area);
                    }
                    return claimed;
                }
            }
            done.await;
        }
    }

    /// Ends the copy of `area`.
    pub fn release(&self, area: (u64, u64)) {
        self.lock().retain(|&a| a != area);
        self.done.notify_waiters();
    }
}

/// Largest area one copy request moves.
pub(crate) const MAX_CHUNK: u64 = 1 << 20;

/// What is read of a piece of data before it is copied inside the kernel:
/// when that reads as zeroes, the piece is read whole to see whether it is
/// all zeroes (and written as zeroes, keeping the target sparse).
const OFFLOAD_SAMPLE: u64 = 4096;

/// `ENOSPC`, for the `enospc` policy.
const ENOSPC: i32 = 28;

/// What a job does when reading the source or writing the target fails
/// (QEMU's `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// The job fails (the default).
    #[default]
    Report,
    /// The area is retried, the job goes on.
    Ignore,
    /// The job pauses (`BLOCK_JOB_ERROR`, `io-status` failed or nospace);
    /// resuming retries.
    Stop,
    /// `stop` on ENOSPC, `report` otherwise.
    Enospc,
}

/// What the job does about a failed copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Report,
    Ignore,
    Stop,
}

/// A failed copy: the side that failed, and how.
#[derive(Debug)]
pub(crate) struct CopyError {
    /// Writing the target failed (else reading the source).
    pub write: bool,
    pub error: block::Error,
}

/// The policies of a job for both sides.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Policies {
    pub on_source_error: OnError,
    pub on_target_error: OnError,
}

impl Policies {
    /// What the policies say to do about `e`; sends `BLOCK_JOB_ERROR` and,
    /// for `stop`, pauses the job (at its next pause point).
    pub fn on_error(&self, job: &Job, e: &CopyError) -> Action {
        let policy = if e.write {
            self.on_target_error
        } else {
            self.on_source_error
        };
        let nospace = e.error.errno() == ENOSPC;
        let action = match policy {
            OnError::Report => Action::Report,
            OnError::Ignore => Action::Ignore,
            OnError::Stop => Action::Stop,
            OnError::Enospc if nospace => Action::Stop,
            OnError::Enospc => Action::Report,
        };
        let name = match action {
            Action::Report => "report",
            Action::Ignore => "ignore",
            Action::Stop => "stop",
        };
        job.block_job_error(if e.write { "write" } else { "read" }, name);
        if action == Action::Stop {
            job.pause_on_error(nospace);
        }
        action
    }
}

/// The speed limit: bytes issued since the limit last changed.
#[derive(Debug)]
pub(crate) struct Pace {
    speed: u64,
    since: Instant,
    bytes: u64,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            speed: 0,
            since: Instant::now(),
            bytes: 0,
        }
    }
}

impl Pace {
    /// How long to wait before issuing more at `speed` bytes per second
    /// (0: no limit); `None` when more may go now.
    pub fn wait(&mut self, speed: u64) -> Option<Duration> {
        if speed != self.speed {
            *self = Pace {
                speed,
                ..Pace::default()
            };
        }
        if speed == 0 {
            return None;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / speed as f64);
        due.checked_sub(self.since.elapsed())
            .filter(|w| !w.is_zero())
    }

    /// Counts `bytes` as issued.
    pub fn issued(&mut self, bytes: u64) {
        self.bytes += bytes;
    }
}

/// Copies areas of one node to another at the same offsets.
pub(crate) struct Copier {
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    /// The target reads as zeroes already: zeroes are not written.
    pub target_is_zero: bool,
    /// Zeroes may be written by deallocating.
    pub unmap: bool,
    /// Write data compressed, in whole clusters of this size (the
    /// target's): a copy covers the clusters its area touches, and only
    /// whole clusters of zeroes are written as zeroes.
    pub compress: Option<u64>,
    /// Buffers kept for the next copies (at most `keep`): allocating and
    /// clearing a fresh 1 MiB buffer per copy cost an eighth of the CPU of
    /// a mirror between `O_DIRECT` files.
    buffers: Mutex<Vec<IoBuf>>,
    keep: usize,
    /// Whether data may still be copied inside the kernel
    /// ([`Node::copy_range_to`]); off for good once the nodes refuse it.
    offload: AtomicBool,
    /// Bytes copied inside the kernel so far.
    offloaded: AtomicU64,
}

impl Copier {
    /// A copier that keeps up to `keep` buffers.
    pub fn new(source: Arc<Node>, target: Arc<Node>, keep: usize) -> Copier {
        Copier {
            source,
            target,
            target_is_zero: false,
            unmap: true,
            compress: None,
            buffers: Mutex::new(Vec::new()),
            keep,
            offload: AtomicBool::new(true),
            offloaded: AtomicU64::new(0),
        }
    }

    /// Bytes copied inside the kernel so far (they never passed through
    /// our memory).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn offloaded(&self) -> u64 {
        self.offloaded.load(Ordering::Relaxed)
    }

    /// Copies `offset..offset + len` as the source reads now. Returns where
    /// the last run of zeroes it met ends (past `offset + len` when the run
    /// goes on), so the caller can take the rest of a hole in one step.
    /// `in_hook`: called from a write hook of the source, whose write keeps
    /// conflicting requests out already (see [`Node::read_in_hook`]).
    pub async fn copy(&self, offset: u64, len: u64, in_hook: bool) -> Result<u64, CopyError> {
        let read = |error: block::Error| CopyError {
            write: false,
            error,
        };
        let write = |error: block::Error| CopyError { write: true, error };
        let (mut at, end) = self.whole(offset, offset + len);
        let mut zero_until = 0;
        while at < end {
            // A read the page cache serves, and a write a file system takes
            // without waiting (or a `null-co` target), complete on this
            // thread and spend no budget: spend a unit per piece, so that a
            // job copying a cached disk still lets the thread's other tasks
            // (QMP, exports) run.
            tokio::task::consume_budget().await;
            // The whole extent at `at`, even past `end`: one query.
            let extent = self
                .source
                .block_status_upto(at, self.source.length() - at, 1)
                .await
                .map_err(read)?
                .into_iter()
                .next()
                .ok_or(read(block::Error::NotSupported(
                    "block status returned nothing",
                )))?;
            let run = extent.len.min(end - at).max(1);
            // Compressed, zeroes count only as whole clusters (`at` is at
            // the start of one): a cluster with data in it is written whole.
            let zeroes = match self.compress {
                Some(unit) if at + run != self.source.length() => (at + run) / unit * unit - at,
                _ => run,
            };
            if extent.zero && zeroes > 0 {
                self.write_zeroes(at, zeroes).await.map_err(write)?;
                zero_until = match self.compress {
                    Some(_) => at + zeroes,
                    None => at + extent.len,
                };
                at += zeroes;
                continue;
            }
            let piece = self.whole(at, at + run.min(MAX_CHUNK)).1 - at;
            if self.try_offload(at, piece, in_hook).await.map_err(read)? {
                at += piece;
                continue;
            }
            let buf = self.buffer(piece as usize);
            let (result, buf) = if in_hook {
                self.source.read_in_hook_into(at, buf).await
            } else {
                self.source.read_into(at, buf).await
            };
            let buf = match result {
                Ok(()) if buf.is_zero() => {
                    self.write_zeroes(at, piece).await.map_err(write)?;
                    buf
                }
                Ok(()) if self.compress.is_some() => {
                    let (result, buf) = self.target.write_compressed(at, buf).await;
                    result.map_err(write)?;
                    buf
                }
                Ok(()) => {
                    let (result, buf) = self.target.write(at, buf, false).await;
                    result.map_err(write)?;
                    buf
                }
                Err(e) => return Err(read(e)),
            };
            self.give_back(buf);
            at += piece;
        }
        Ok(zero_until)
    }

    /// Copies the data piece `at..at + piece` inside the kernel where the
    /// nodes allow it (`true`), unless it starts with
    /// [`OFFLOAD_SAMPLE`] bytes of zeroes (then, and where the nodes do
    /// not allow it, `false`: the caller copies through memory, and sees
    /// whether it is all zeroes). A buffered `pread`/`pwrite` pair costs
    /// the kernel about twice the CPU of `copy_file_range` between the
    /// same page caches (docs/benchmarks.md).
    async fn try_offload(&self, at: u64, piece: u64, in_hook: bool) -> block::Result<bool> {
        if self.compress.is_some() || !self.offload.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let buf = self.buffer(piece.min(OFFLOAD_SAMPLE) as usize);
        let (result, buf) = if in_hook {
            self.source.read_in_hook_into(at, buf).await
        } else {
            self.source.read_into(at, buf).await
        };
        let zero = buf.is_zero();
        self.give_back(buf);
        result?;
        if zero {
            return Ok(false);
        }
        match self
            .source
            .copy_range_to(at, piece, &self.target, in_hook)
            .await
        {
            Ok(true) => {
                self.offloaded.fetch_add(piece, Ordering::Relaxed);
                Ok(true)
            }
            // Through memory from now on, where errors are told apart as
            // the source's or the target's.
            Ok(false) | Err(_) => {
                self.offload.store(false, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    /// `start..end` widened to whole compressed clusters (the last one may
    /// end at the end of the source); as is without compression.
    fn whole(&self, start: u64, end: u64) -> (u64, u64) {
        match self.compress {
            Some(unit) => (
                start / unit * unit,
                end.div_ceil(unit)
                    .saturating_mul(unit)
                    .min(self.source.length()),
            ),
            None => (start, end),
        }
    }

    /// A buffer of `len` bytes (at most [`MAX_CHUNK`]) aligned for both
    /// nodes, from the kept ones when there is one.
    fn buffer(&self, len: usize) -> IoBuf {
        let align = self
            .source
            .limits()
            .memory_alignment
            .max(self.target.limits().memory_alignment);
        let kept = self.buffers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match kept {
            Some(buf) => buf.reuse(len, align),
            None => IoBuf::zeroed(MAX_CHUNK as usize, align).reuse(len, align),
        }
    }

    /// Keeps `buf` for a later copy.
    fn give_back(&self, buf: IoBuf) {
        let mut kept = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        if buf.capacity() >= MAX_CHUNK as usize && kept.len() < self.keep {
            kept.push(buf);
        }
    }

    /// Makes `offset..offset + len` of the target read as zeroes, writing
    /// only where it does not already (so a sparse target stays sparse).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> block::Result<()> {
        if self.target_is_zero {
            return Ok(());
        }
        let flags = ZeroFlags {
            may_unmap: self.unmap,
            ..ZeroFlags::default()
        };
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let extents = self.target.block_status(at, end - at).await?;
            let Some(last) = extents.last().map(|e| (e.offset + e.len).min(end)) else {
                // No status: write the zeroes.
                return self.target.write_zeroes(at, end - at, flags).await;
            };
            for e in extents {
                let e_end = (e.offset + e.len).min(end);
                if !e.zero && e_end > e.offset {
                    self.target
                        .write_zeroes(e.offset, e_end - e.offset, flags)
                        .await?;
                }
            }
            at = last.max(at + 1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use block::{BlockdevOptions, Graph};
    use serde_json::{Value, json};

    use super::*;

    const MIB: u64 = 1 << 20;

    async fn add(g: &Graph, v: Value) -> Arc<Node> {
        let options = BlockdevOptions::from_json(&v).expect("valid options");
        g.add(&options).await.expect("the node opens")
    }

    /// A source of four 1 MiB pieces: data; zeroes written as data; 4 KiB
    /// of zeroes, then data; a hole.
    fn source(path: &std::path::Path) {
        let file = std::fs::File::create(path).expect("a file");
        file.set_len(4 * MIB).expect("a length");
        file.write_all_at(&vec![0xa5; MIB as usize], 0)
            .expect("data");
        file.write_all_at(&vec![0; MIB as usize], MIB)
            .expect("zeroes");
        let mut third = vec![0x5a; MIB as usize];
        third[..4096].fill(0);
        file.write_all_at(&third, 2 * MIB)
            .expect("zeroes, then data");
    }

    /// A directory with a source (see [`source`]) and an empty sparse
    /// target of the same size.
    fn files() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        source(&src);
        std::fs::File::create(&dst)
            .and_then(|f| f.set_len(4 * MIB))
            .expect("a sparse target");
        (dir, src, dst)
    }

    /// Whether `node` has data allocated anywhere in `offset..offset + len`.
    async fn allocated(node: &Node, offset: u64, len: u64) -> bool {
        let extents = node.block_status(offset, len).await.expect("status");
        extents.iter().any(|e| e.data)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    #[test]
    fn a_copy_that_never_waits_still_lets_other_tasks_run() {
        let (_dir, src, _dst) = files();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let g = Graph::new();
            // Just written, so cached: every read completes at once, and so
            // does every write to `null-co`.
            let source = add(
                &g,
                json!({"driver": "file", "node-name": "src",
                       "filename": src.display().to_string()}),
            )
            .await;
            let target = add(
                &g,
                json!({"driver": "null-co", "node-name": "dst", "size": 4 * MIB}),
            )
            .await;
            let ticks = Arc::new(AtomicU64::new(0));
            let ticker = {
                let ticks = ticks.clone();
                tokio::spawn(async move {
                    loop {
                        ticks.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                })
            };
            let job = tokio::spawn(async move {
                let copier = Copier::new(source, target, 2);
                for _ in 0..200 {
                    copier.copy(0, MIB, false).await.expect("the copy");
                }
            });
            tokio::task::yield_now().await;
            let before = ticks.load(Ordering::Relaxed);
            job.await.expect("the job finishes");
            let during = ticks.load(Ordering::Relaxed) - before;
            ticker.abort();
            assert!(
                during > 0,
                "the other task never ran during 200 copies that never waited"
            );
        });
    }

    #[test]
    fn data_is_copied_inside_the_kernel_and_zeroes_stay_holes() {
        let (_dir, src, dst) = files();
        runtime().block_on(async {
            let g = Graph::new();
            let raw = |name: &str, path: &std::path::Path| {
                json!({"driver": "raw", "node-name": name,
                       "file": {"driver": "file", "filename": path.display().to_string()}})
            };
            let source = add(&g, raw("src", &src)).await;
            let target = add(&g, raw("dst", &dst)).await;
            let copier = Copier::new(source.clone(), target.clone(), 2);
            copier.copy(0, 4 * MIB, false).await.expect("the copy");
            // Only the piece that starts with data went through the kernel.
            assert_eq!(copier.offloaded(), MIB);
            let (want, got) = (
                source.read(0, (4 * MIB) as usize).await.expect("a read"),
                std::fs::read(&dst).expect("the target"),
            );
            assert!(
                want.as_slice() == got.as_slice(),
                "the target equals the source"
            );
            assert!(allocated(&target, 0, MIB).await);
            assert!(!allocated(&target, MIB, MIB).await, "zeroes stay a hole");
            assert!(allocated(&target, 2 * MIB, MIB).await);
            assert!(!allocated(&target, 3 * MIB, MIB).await, "a hole stays one");
        });
    }

    #[test]
    fn a_target_that_refuses_the_kernel_copy_is_written_through_memory() {
        let (_dir, src, dst) = files();
        runtime().block_on(async {
            let g = Graph::new();
            let source = add(
                &g,
                json!({"driver": "raw", "node-name": "src",
                       "file": {"driver": "file", "filename": src.display().to_string()}}),
            )
            .await;
            // Zero detection needs the data in memory.
            let target = add(
                &g,
                json!({"driver": "raw", "node-name": "dst", "detect-zeroes": "on",
                       "file": {"driver": "file", "filename": dst.display().to_string()}}),
            )
            .await;
            let copier = Copier::new(source.clone(), target.clone(), 2);
            copier.copy(0, 4 * MIB, false).await.expect("the copy");
            assert_eq!(copier.offloaded(), 0);
            let want = source.read(0, (4 * MIB) as usize).await.expect("a read");
            let got = target.read(0, (4 * MIB) as usize).await.expect("a read");
            assert!(
                want.as_slice() == got.as_slice(),
                "the target equals the source"
            );
        });
    }
}
