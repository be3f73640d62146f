//! `file`: a regular file or block device, through the host kernel.
//!
//! Reads, writes and flushes run as blocking `pread`/`pwrite`/`fdatasync` on
//! a pool of I/O threads, or with `aio=io_uring` on an io_uring (which
//! falls back to the thread pool, with a warning, where the kernel refuses
//! it).
//! With `cache.direct=on` the file is opened `O_DIRECT`; requests must then be
//! aligned in offset and length to what the device accepts (probed at open,
//! as QEMU does: the smallest of 512..=4096 bytes that a read accepts) and in
//! memory to 4 KiB. The node bounces whatever is not.
//! Block status comes from `SEEK_DATA`/`SEEK_HOLE`; write-zeroes and discard
//! use `fallocate`, falling back to writing zeroes where the filesystem
//! refuses.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::Errno;

use super::pool::Lane;
use super::uring::{OpKind, Rings};
use crate::buf::IoBuf;
use crate::class::IoClass;
use crate::error::{Error, Result};
use crate::node::{
    BoxFuture, BufResult, Driver, Extent, FormatSpecific, HostRange, ImageInfo, Limits, Piped,
    ZeroFlags,
};
use crate::options::Aio;

/// Memory alignment for `O_DIRECT`, and the request alignment when probing
/// cannot tell: safe for every device in use today.
const DIRECT_ALIGNMENT: u64 = 4096;
/// Largest zero buffer written at once when `fallocate` cannot zero.
const ZERO_CHUNK: u64 = 1 << 20;

/// An open file.
#[derive(Debug)]
pub(crate) struct FileDriver {
    file: Arc<File>,
    /// Grows when a format driver writes past the end.
    length: AtomicU64,
    writable: bool,
    direct: bool,
    /// Request alignment: 1 when buffered, probed for `O_DIRECT`.
    alignment: u64,
    /// The io_uring engine, when asked for and granted: a ring per
    /// runtime making requests.
    uring: Option<Rings>,
    /// Whether buffered reads and writes are first tried on the calling
    /// thread with `RWF_NOWAIT` (turned off for good where the kernel or
    /// the file system refuses the flag).
    nowait_reads: AtomicBool,
    nowait_writes: AtomicBool,
    /// Whether copies into this file may use `copy_file_range` (turned off
    /// for good where the kernel or the file system refuses it).
    copy_offload: AtomicBool,
    /// Whether writes may come from pipes with `splice` (off for good once
    /// the file refuses it).
    splice_in: AtomicBool,
    /// Where large background copies into the file go by direct I/O
    /// ([`super::direct_copy`]): the file itself when opened `O_DIRECT`,
    /// else the same file opened again with `O_DIRECT`, on first use;
    /// `None` where it cannot be (read-only, not a regular file on ext4 or
    /// XFS, refused).
    direct_target: OnceLock<Option<Arc<File>>>,
    /// Small background copies waiting to be written together by direct
    /// I/O ([`super::direct_copy::Gather`]), and whether the file refused
    /// direct copies for good.
    gather: Arc<super::direct_copy::Gather>,
    /// Buffered writes run one after another. Linux takes the inode's
    /// lock exclusively for each buffered write (ext4, XFS), so concurrent
    /// writers only spin on it: a mirror's parallel 1 MiB writes spent
    /// about a third of the daemon's CPU there, an incremental backup's
    /// 64 KiB ones a fifth (for no gain in time). With the thread pool
    /// they go through one [`Lane`](super::pool::Lane), back to back (and
    /// so do kernel copies into the file, whatever the engine); io_uring
    /// orders buffered writes to one file by itself. `O_DIRECT` and FUA
    /// writes run in parallel. (The `RWF_NOWAIT` attempt on the calling
    /// thread needs neither: it gives up at once when the inode is locked.
    /// A small write runs on the calling thread, [`INLINE_MAX`], when the
    /// lane holds at most that many bytes of writes, beside those of other
    /// threads: one per NBD
    /// connection at most, each on a thread of its own.)
    buffered_lane: Arc<Lane>,
    /// The same for background requests ([`crate::class`]), on the pool's
    /// background threads. Background and foreground writes to one file
    /// are not ordered against each other (no more than two writes in
    /// flight at once are); in practice one side has them all: a mirror's
    /// target gets only the job's writes unless it is write-blocking.
    background_lane: Arc<Lane>,
    /// Whether small writes may run on the calling thread at all
    /// ([`INLINE_MAX`]): buffered, into a local file system or a block
    /// device ([`writes_stay_local`]).
    inline_writes: bool,
    /// Inline writes ([`INLINE_MAX`]) are off until this time
    /// ([`clock`]), after one was slow; 0 when they are not off.
    inline_after: AtomicU64,
    /// How long the next slow inline write turns them off for: from
    /// [`INLINE_BACKOFF`], doubled by each slow one in a row up to
    /// [`INLINE_BACKOFF_MAX`].
    inline_backoff: AtomicU64,
    /// The background writes whose write-back is not started yet.
    write_behind: Arc<std::sync::Mutex<WriteBehind>>,
    /// The path as given.
    path: String,
}

impl FileDriver {
    /// Opens `path`; read-only if `read_only`. With `auto_read_only`, a file
    /// that cannot be opened for writing is opened read-only instead; the
    /// second value says whether that happened.
    pub(crate) fn open(
        path: &str,
        read_only: bool,
        auto_read_only: bool,
        direct: bool,
        aio: Aio,
    ) -> Result<(FileDriver, bool)> {
        let open = |write: bool| {
            let mut options = OpenOptions::new();
            options.read(true).write(write);
            if direct {
                options.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
            }
            options.open(path)
        };
        let (file, read_only) = match open(!read_only) {
            Ok(file) => (file, read_only),
            Err(e)
                if !read_only
                    && auto_read_only
                    && matches!(
                        Errno::from_io_error(&e),
                        Some(Errno::ACCESS | Errno::ROFS | Errno::PERM)
                    ) =>
            {
                (
                    open(false).map_err(|source| Error::Open {
                        path: path.to_owned(),
                        source,
                    })?,
                    true,
                )
            }
            Err(source) => {
                return Err(Error::Open {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let length = rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| Error::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        let inline_writes = !direct && writes_stay_local(&file);
        let file = Arc::new(file);
        let uring = match aio {
            Aio::Threads => None,
            Aio::IoUring => start_uring(path, &file, super::uring::ENTRIES),
        };
        let alignment = if direct {
            probe_alignment(&file, length)
        } else {
            1
        };
        Ok((
            FileDriver {
                file,
                length: AtomicU64::new(length),
                writable: !read_only,
                direct,
                alignment,
                nowait_reads: AtomicBool::new(!direct),
                nowait_writes: AtomicBool::new(!direct),
                copy_offload: AtomicBool::new(!direct),
                splice_in: AtomicBool::new(!direct),
                direct_target: OnceLock::new(),
                gather: Arc::default(),
                buffered_lane: Arc::default(),
                background_lane: Arc::new(Lane::new(IoClass::Background)),
                write_behind: Arc::default(),
                inline_writes,
                inline_after: AtomicU64::new(0),
                inline_backoff: AtomicU64::new(INLINE_BACKOFF),
                uring,
                path: path.to_owned(),
            },
            read_only,
        ))
    }

    /// Writes `buf` at `offset` with the engine in use; with `fua`, durable
    /// at completion (`RWF_DSYNC`, which writes back only this range; a
    /// write and `fdatasync` where the kernel lacks it).
    async fn write_buf(&self, offset: u64, buf: IoBuf, fua: bool) -> BufResult<()> {
        // (A FUA write's sync needs no lane: the kernel syncs after it
        // lets go of the inode, so the writes of others may go on.)
        let serial = !self.direct && !fua;
        // A background write goes to its own threads whatever the page
        // cache holds (and starts write-back there).
        let class = crate::class::current();
        let foreground = class == IoClass::Foreground;
        // A small buffered write goes inline with io_uring as with
        // threads: the ring would hand it to one of its workers (ext4
        // takes no non-blocking buffered writes), a switch each way.
        let (done, at_once) = self.write_at_once(class, offset, buf.as_slice(), fua);
        if let Some(result) = at_once {
            return (result.map_err(|e| Error::io("write", e)), buf);
        }
        if let Some(uring) = &self.uring {
            // No lane: the ring's workers already run buffered writes to
            // one file one at a time (io_uring hashes them by inode), and
            // a lock held across each round trip left one write in flight.
            let kind = if fua {
                OpKind::WriteDsync
            } else {
                OpKind::Write
            };
            let (mut result, buf) = uring.submit(kind, offset, buf).await;
            if fua && result.as_ref().is_err_and(dsync_unsupported) {
                let (again, buf) = uring.submit(OpKind::Write, offset, buf).await;
                result = again;
                if result.is_ok() {
                    result = uring.submit(OpKind::Flush, 0, IoBuf::zeroed(0, 1)).await.0;
                }
                return (result.map_err(|e| Error::io("write", e)), buf);
            }
            return (result.map_err(|e| Error::io("write", e)), buf);
        }
        let at = offset + done as u64;
        let len = (buf.len() - done) as u64;
        let file = self.file.clone();
        // A background buffered write goes in pieces, yielding the core
        // between them, as a background kernel copy does.
        let piece = match serial && !foreground {
            true => BACKGROUND_COPY_PIECE as usize,
            false => usize::MAX,
        };
        let write = move || {
            let rest = &buf.as_slice()[done..];
            let result = if fua {
                write_dsync(&file, rest, at)
            } else {
                write_in_pieces(&file, rest, at, piece)
            };
            (result, buf)
        };
        let task = match serial {
            true => self.on_lane(class, at, len, write).await,
            false => super::pool::run(write).await,
        };
        match task {
            Some((result, buf)) => (result.map_err(|e| Error::io("write", e)), buf),
            None => (Err(Error::io("write", pool_failed())), IoBuf::zeroed(0, 1)),
        }
    }

    /// Does what the calling thread can of a write of `data` at `offset`
    /// made by a request of `class` without waiting: the bytes the kernel
    /// takes with `RWF_NOWAIT` (a foreground write without FUA, where the
    /// file system allows), then, buffered and without FUA, the rest
    /// inline if [`write_here`](Self::write_here) lets it. Returns how many
    /// bytes the first took and, once the whole write is done, its result;
    /// the rest is the caller's (bytes written twice read the same).
    fn write_at_once(
        &self,
        class: IoClass,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> (usize, Option<io::Result<()>>) {
        let mut done = 0;
        if !fua && class == IoClass::Foreground && self.nowait_writes.load(Ordering::Relaxed) {
            done = nowait(&self.nowait_writes, data.len(), |at| {
                let slice = [io::IoSlice::new(&data[at..])];
                rustix::io::pwritev2(&*self.file, &slice, offset + at as u64, NOWAIT)
            });
            if done == data.len() {
                return (done, Some(Ok(())));
            }
        }
        if self.direct || fua {
            return (done, None);
        }
        let (at, rest) = (offset + done as u64, &data[done..]);
        let inline = self.write_here(class, at, rest.len() as u64, || {
            self.file.write_all_at(rest, at)
        });
        (done, inline)
    }

    /// Runs `f`, a buffered write of `offset..offset + len` made by a
    /// request of `class`, on the calling thread if it may ([`INLINE_MAX`]:
    /// small, and at most that much queued on the file's lane); `None`
    /// (`f` not run) if not.
    fn write_here<T>(
        &self,
        class: IoClass,
        offset: u64,
        len: u64,
        f: impl FnOnce() -> T,
    ) -> Option<T> {
        if class != IoClass::Foreground || !self.inline_allowed(offset, len) {
            return None;
        }
        // Not behind queued writes of more than `INLINE_MAX` bytes: the
        // inode's lock would hold this thread for as long as they take.
        // Beside a few small ones, and beside other threads' inline
        // writes: they queue on the inode's lock in the kernel for
        // microseconds. (Kept off while any write was queued, a connection
        // whose writes once went to the lane, after a slow one, stayed
        // there: each of its writes found the lane busy with its earlier
        // ones, and stayed there for long stretches.)
        if self.buffered_lane.weight() > INLINE_MAX {
            return None;
        }
        let slept = voluntary_switches();
        let started = std::time::Instant::now();
        let result = f();
        let took = started.elapsed();
        // A slow write that never slept was only preempted: the kernel
        // did not hold it, and the runtime thread would have lost the
        // processor all the same.
        let waited = took > INLINE_SLOW && voluntary_switches() != slept;
        self.inline_took(waited);
        Some(result)
    }

    /// Notes an inline write that `waited` (slow, and the kernel put the
    /// thread to sleep) or not: one that waited turns inline writes off
    /// for a while, twice as long as the last time if the last inline
    /// write waited too (a file under sustained dirty-page throttling
    /// holds a runtime thread once per period, not once a second); one
    /// that did not resets the period.
    fn inline_took(&self, waited: bool) {
        if waited {
            let backoff = self.inline_backoff.load(Ordering::Relaxed);
            self.inline_after
                .store(clock() + backoff, Ordering::Relaxed);
            self.inline_backoff
                .store((backoff * 2).min(INLINE_BACKOFF_MAX), Ordering::Relaxed);
        } else {
            self.inline_backoff.store(INLINE_BACKOFF, Ordering::Relaxed);
        }
    }

    /// Whether a buffered foreground write of `offset..offset + len` may
    /// run on the calling thread (see [`INLINE_MAX`]): small, whole pages
    /// (no page to read first), and no inline write was slow lately.
    fn inline_allowed(&self, offset: u64, len: u64) -> bool {
        let page = rustix::param::page_size() as u64;
        self.inline_writes
            && len <= INLINE_MAX
            && offset % page == 0
            && len % page == 0
            && self.inline_not_backed_off()
    }

    /// Whether inline writes are not backed off ([`FileDriver::inline_took`])
    /// now. Asks the clock only during a backoff: once it is over, the time
    /// is cleared (unless a new one began meanwhile).
    fn inline_not_backed_off(&self) -> bool {
        let after = self.inline_after.load(Ordering::Relaxed);
        if after == 0 {
            return true;
        }
        if clock() < after {
            return false;
        }
        let _ = self
            .inline_after
            .compare_exchange(after, 0, Ordering::Relaxed, Ordering::Relaxed);
        true
    }

    /// Runs `f`, a buffered write of `offset..offset + len`, on the lane of
    /// `class` (the calling task's; see [`FileDriver::buffered_lane`]). A
    /// background write then starts the write-back of the run of
    /// contiguous background writes it ends, once that run is due (see
    /// [`WriteBehind`]).
    async fn on_lane<T: Send + 'static>(
        &self,
        class: IoClass,
        offset: u64,
        len: u64,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        match class {
            IoClass::Foreground => self.buffered_lane.run_weighing(len, f).await,
            IoClass::Background => {
                let file = self.file.clone();
                let behind = self.write_behind.clone();
                let write = move || {
                    let result = f();
                    behind_wrote(&file, &behind, offset, len);
                    result
                };
                self.background_lane.run(write).await
            }
        }
    }

    /// Copies `source` to `offset` by direct I/O ([`super::direct_copy`])
    /// where that is the way: into a file opened `O_DIRECT`, or a
    /// background copy of at least [`DIRECT_COPY_MIN`] bytes into a
    /// buffered one; whole pages at both ends. `None` where it is not (or
    /// the file refused it just now): the other ways are taken.
    async fn copy_direct(
        &self,
        class: IoClass,
        offset: u64,
        source: &HostRange,
    ) -> Option<Result<bool>> {
        let (at, len) = (source.offset, source.len);
        let wanted = self.direct || class == IoClass::Background;
        if !wanted || self.gather.refused() || !super::direct_copy::aligned(at, offset, len) {
            return None;
        }
        let target = self.direct_target()?;
        if !self.direct && len < DIRECT_COPY_MIN {
            return self.copy_gathered(offset, source, target).await;
        }
        let pipe = super::direct_copy::take()?;
        let from = source.file.clone();
        let (file, behind) = (self.file.clone(), self.write_behind.clone());
        let copy = move || {
            let copied = super::direct_copy::copy(&from, at, &target, offset, len, &pipe);
            if matches!(copied, Ok(true)) {
                super::direct_copy::give_back(pipe);
            }
            // It leaves nothing to write back: the run of background
            // writes before it is as good as ended.
            behind_ended(&file, &behind);
            copied
        };
        // Into a buffered file, after the background writes queued before
        // (and, like them, not beside another); `O_DIRECT` writes run in
        // parallel.
        let copied = match self.direct {
            true => super::pool::run(copy).await,
            false => self.background_lane.run(copy).await,
        };
        match copied {
            Some(Ok(true)) => {
                self.length.fetch_max(offset + len, Ordering::AcqRel);
                Some(Ok(true))
            }
            Some(Err(e)) if super::direct_copy::refused(&e) => {
                tracing::debug!("{}: no direct copies ({e})", self.path);
                self.gather.refuse();
                None
            }
            // A short source, a failed read or write: copied through
            // memory instead, where the error (if it comes again) is told
            // apart as a read's or a write's.
            _ => Some(Ok(false)),
        }
    }

    /// A small background copy of `source` to `offset` of this buffered
    /// file, on the background lane with the others waiting there
    /// ([`super::direct_copy::Gather`]): by direct I/O into `target` when
    /// it joins a run contiguous in the file, else by `copy_file_range`
    /// like any small background copy. `None` where the file refuses
    /// `copy_file_range`: the copy goes through memory.
    async fn copy_gathered(
        &self,
        offset: u64,
        source: &HostRange,
        target: Arc<File>,
    ) -> Option<Result<bool>> {
        if !self.copy_offload.load(Ordering::Relaxed) {
            return None;
        }
        let (at, len) = (source.offset, source.len);
        let id = self.gather.add(source.file.clone(), at, len, offset);
        let gather = self.gather.clone();
        let (file, behind) = (self.file.clone(), self.write_behind.clone());
        let copy = move || {
            let one = |p: &super::direct_copy::Piece| {
                let copied = copy_file(&p.from, p.at, &file, p.to_at, p.len, BACKGROUND_COPY_PIECE);
                behind_wrote(&file, &behind, p.to_at, p.len);
                copied
            };
            gather.run(id, &target, one, || behind_ended(&file, &behind))
        };
        match self.background_lane.run(copy).await {
            Some(Ok(true)) => {
                self.length.fetch_max(offset + len, Ordering::AcqRel);
                Some(Ok(true))
            }
            Some(Err(e)) if cannot_copy(&e) => {
                tracing::debug!("{}: no copy offload ({e})", self.path);
                self.copy_offload.store(false, Ordering::Relaxed);
                Some(Ok(false))
            }
            _ => Some(Ok(false)),
        }
    }

    /// See [`FileDriver::direct_target`].
    fn direct_target(&self) -> Option<Arc<File>> {
        self.direct_target
            .get_or_init(|| match self.direct {
                true => Some(self.file.clone()),
                false => super::direct_copy::reopen(&self.file).map(Arc::new),
            })
            .clone()
    }

    /// Runs `f` on the file in the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let file = self.file.clone();
        match super::pool::run(move || f(&file)).await {
            Some(result) => result.map_err(|e| Error::io(op, e)),
            None => Err(Error::io(op, pool_failed())),
        }
    }

    /// Writes zero buffers over `offset..offset + len`.
    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let align = if self.direct { DIRECT_ALIGNMENT } else { 1 };
        self.blocking("write zeroes", move |file| {
            let zeroes = IoBuf::zeroed(len.min(ZERO_CHUNK) as usize, align as usize);
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(ZERO_CHUNK) as usize;
                file.write_all_at(&zeroes.as_slice()[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        })
        .await
    }

    async fn fallocate(
        &self,
        op: &'static str,
        flags: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        self.blocking(op, move |file| {
            rustix::fs::fallocate(file, flags, offset, len).map_err(io::Error::from)
        })
        .await
    }
}

/// Most bytes one `copy_file_range` call is asked for.
const MAX_COPY: u64 = 1 << 30;

/// Bytes per `copy_file_range` (or buffered `pwrite`) call of a background
/// copy, which yields the core between two: the kernel does not preempt a
/// thread inside the call.
/// (A guest's p99 during a background mirror, six runs each in pairs:
/// 0.8–3.2 ms with 256 KiB calls, 1.4–3.7 ms with 1 MiB ones.)
const BACKGROUND_COPY_PIECE: u64 = 256 << 10;

/// A background copy into a buffered file of at least this many bytes goes
/// by direct I/O ([`super::direct_copy`]); smaller ones fill the page
/// cache, unless several together make a run in the file
/// ([`super::direct_copy::Gather`]). (A sequential 4 GiB copy in pieces of
/// 1 MiB: 3.0 s and 0.3 s of CPU by direct I/O against 3.3–6.3 s and
/// 1.5–5.1 s by `copy_file_range`; in pieces of 256 KiB 3.7 s and 0.8 s;
/// 64 KiB pieces took 1.5 times as long by direct I/O.)
const DIRECT_COPY_MIN: u64 = 512 << 10;

/// A buffered foreground write of at most this many bytes, in whole
/// pages (from memory, or spliced from pipes: an NBD export's writes of up
/// to 256 KiB, `nbdcopy`'s size), runs on the calling thread when the
/// file's lane holds no more than this many bytes of writes (beside other
/// threads' inline writes: two NBD
/// connections' `nbdcopy` writes took 1.70 s per 4 GiB side by side
/// against 2.2 s one at a time), instead of crossing to
/// a pool thread (or, with io_uring, one of the ring's workers: ext4 takes
/// no non-blocking buffered write, so the ring hands every one over) and
/// back. Such a write only copies into the page cache,
/// in microseconds, and the two thread switches of the hop cost more than
/// the copy (random 4 KiB writes over NBD; `nbdcopy`'s 256 KiB writes took
/// 0.33–0.34 s of server CPU per GiB inline against 0.41 with the hop:
/// see `docs/benchmarks.md`). The kernel cannot tell beforehand
/// whether a buffered write will wait (ext4 refuses `RWF_NOWAIT` for them),
/// so each inline write is timed: one slower than [`INLINE_SLOW`] during
/// which the thread slept in the kernel (dirty page throttling, a journal
/// commit; not a preemption, which a busy machine deals out to any thread)
/// sends the file's writes back to the pool for [`INLINE_BACKOFF`], doubled
/// for each such one in a row. (Counted over random 4 KiB writes from fio:
/// one to three slow writes per run of 200 000, two in three of them
/// preempted, not asleep, and each had turned inline writes off for a
/// second.)
const INLINE_MAX: u64 = 256 << 10;
/// See [`INLINE_MAX`].
const INLINE_SLOW: std::time::Duration = std::time::Duration::from_micros(500);
/// See [`INLINE_MAX`], in nanoseconds of [`clock`]: a tenth of a second
/// (the waits seen were a journal's, under a millisecond; a file under
/// sustained throttling doubles it quickly).
const INLINE_BACKOFF: u64 = 100_000_000;
/// The longest [`INLINE_BACKOFF`] gets, doubled (about a minute).
const INLINE_BACKOFF_MAX: u64 = 64_000_000_000;

/// Whether a buffered write to `file` is done by this host alone: a block
/// device, or a file on a local disk file system (ext4, XFS, Btrfs, F2FS),
/// tmpfs or overlayfs. A network or FUSE file system may keep a write
/// waiting on its server for as long as that takes, which must not hold a
/// runtime thread: its writes always go to the pool.
fn writes_stay_local(file: &File) -> bool {
    const EXT4: u32 = 0xef53;
    const XFS: u32 = 0x5846_5342;
    const BTRFS: u32 = 0x9123_683e;
    const F2FS: u32 = 0xf2f5_2010;
    const TMPFS: u32 = 0x0102_1994;
    const OVERLAYFS: u32 = 0x794c_7630;
    if rustix::fs::fstat(file)
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_block_device())
    {
        return true;
    }
    // The magic numbers are 32 bits wide; `f_type`'s width depends on the
    // architecture.
    rustix::fs::fstatfs(file).is_ok_and(|fs| {
        matches!(
            fs.f_type as u32,
            EXT4 | XFS | BTRFS | F2FS | TMPFS | OVERLAYFS
        )
    })
}

/// Nanoseconds of a monotonic clock, counted from its first use.
pub(super) fn clock() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Background writes are written back in runs of up to this many
/// contiguous bytes. (A guest's p99 during a background mirror, in pairs:
/// 1.28–2.59 ms against 1.80–2.94 ms when each write started its own
/// write-back; fewer, larger write-backs leave ext4 fewer extent
/// conversions to run beside the guest.)
const WRITE_BEHIND_BATCH: u64 = 32 << 20;

/// The run of contiguous background writes to a file whose write-back is
/// not started yet. The job's flush makes whatever is left durable.
#[derive(Debug, Default)]
struct WriteBehind {
    start: u64,
    end: u64,
}

impl WriteBehind {
    /// Takes a background write of `offset..offset + len`, which extends
    /// the run or starts a new one; returns the runs (offset, length) whose
    /// write-back is due now: the old run when the write lands elsewhere,
    /// and the run once it reaches [`WRITE_BEHIND_BATCH`].
    fn wrote(&mut self, offset: u64, len: u64) -> [Option<(u64, u64)>; 2] {
        let mut due = [None, None];
        if self.end > self.start && self.end == offset {
            self.end = offset + len;
        } else {
            if self.end > self.start {
                due[0] = Some((self.start, self.end - self.start));
            }
            (self.start, self.end) = (offset, offset + len);
        }
        if self.end - self.start >= WRITE_BEHIND_BATCH {
            due[1] = Some((self.start, self.end - self.start));
            (self.start, self.end) = (0, 0);
        }
        due
    }

    /// Ends the run: returns it (offset, length), if there is one, for
    /// its write-back to start now.
    fn end(&mut self) -> Option<(u64, u64)> {
        let run = (self.end > self.start).then(|| (self.start, self.end - self.start));
        (self.start, self.end) = (0, 0);
        run
    }
}

/// Notes a background write of `offset..offset + len` to `file` in
/// `behind` and starts the write-back of what is due ([`WriteBehind`]).
fn behind_wrote(file: &File, behind: &std::sync::Mutex<WriteBehind>, offset: u64, len: u64) {
    let due = behind
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .wrote(offset, len);
    for (offset, len) in due.into_iter().flatten() {
        start_writeback(file, offset, len);
    }
}

/// Ends the run of background writes to `file` in `behind` and starts its
/// write-back (a write that leaves nothing to write back came after it).
fn behind_ended(file: &File, behind: &std::sync::Mutex<WriteBehind>) {
    let ended = behind.lock().unwrap_or_else(|e| e.into_inner()).end();
    if let Some((offset, len)) = ended {
        start_writeback(file, offset, len);
    }
}

/// `copy_file_range`, at most `piece` bytes per call (yielding the core
/// between calls when that is less than [`MAX_COPY`]): `Ok(false)` if
/// `from` ends first.
fn copy_file(
    from: &File,
    mut at: u64,
    to: &File,
    mut to_at: u64,
    len: u64,
    piece: u64,
) -> io::Result<bool> {
    let end = at + len;
    let first = at;
    while at < end {
        if at != first && piece < MAX_COPY {
            std::thread::yield_now();
        }
        let want = (end - at).min(piece) as usize;
        match rustix::fs::copy_file_range(from, Some(&mut at), to, Some(&mut to_at), want) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Moves the bytes waiting in `parts` (pipe read ends and their byte
/// counts) into `file` at `offset` with `splice`; on failure, how many
/// bytes were moved before it.
fn splice_file(
    parts: &[(Arc<std::os::fd::OwnedFd>, usize)],
    file: &File,
    mut offset: u64,
) -> std::result::Result<(), (u64, io::Error)> {
    let mut moved = 0;
    for (pipe, len) in parts {
        let mut left = *len;
        while left > 0 {
            let flags = rustix::pipe::SpliceFlags::empty();
            match rustix::pipe::splice(&**pipe, None, file, Some(&mut offset), left, flags) {
                Ok(0) => {
                    let e = io::Error::other("a pipe ended before the bytes it was said to hold");
                    return Err((moved, e));
                }
                Ok(n) => {
                    left -= n;
                    moved += n as u64;
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err((moved, e.into())),
            }
        }
    }
    Ok(())
}

/// Whether `copy_file_range` (or `splice`) failed for a reason that will
/// not go away:
/// files on different file systems, a kernel or file system without it,
/// a file it does not take (a pipe, a device).
fn cannot_copy(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(
            Errno::XDEV
                | Errno::INVAL
                | Errno::OPNOTSUPP
                | Errno::NOSYS
                | Errno::BADF
                | Errno::PERM
        )
    )
}

fn pool_failed() -> io::Error {
    io::Error::other("the I/O thread pool could not run the request")
}

/// An io_uring for `file`, or `None` (with a warning) where the kernel
/// refuses one: seccomp or `kernel.io_uring_disabled` (EPERM), an old
/// kernel (ENOSYS), limits (ENOMEM, EINVAL). The caller then uses threads.
fn start_uring(path: &str, file: &Arc<File>, entries: u32) -> Option<Rings> {
    match Rings::new(file.clone(), entries) {
        Ok(rings) => Some(rings),
        Err(e) => {
            tracing::warn!("{path}: io_uring unavailable ({e}), using the thread pool");
            None
        }
    }
}

/// Whether an error says the filesystem cannot do this `fallocate` mode.
fn unsupported(e: &Error) -> bool {
    e.errno() == Errno::OPNOTSUPP.raw_os_error() || e.errno() == Errno::NOSYS.raw_os_error()
}

impl Driver for FileDriver {
    fn name(&self) -> &'static str {
        "file"
    }

    fn length(&self) -> u64 {
        self.length.load(Ordering::Acquire)
    }

    fn can_grow(&self) -> bool {
        self.writable
    }

    fn reads_past_end(&self) -> bool {
        true
    }

    fn limits(&self) -> Limits {
        if self.direct {
            Limits {
                request_alignment: self.alignment,
                memory_alignment: DIRECT_ALIGNMENT as usize,
                cluster_size: None,
            }
        } else {
            Limits::default()
        }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            let mut buf = buf;
            let mut done = 0;
            if self.nowait_reads.load(Ordering::Relaxed) {
                let len = buf.len();
                done = nowait(&self.nowait_reads, len, |at| {
                    let mut slice = [io::IoSliceMut::new(&mut buf.as_mut_slice()[at..])];
                    rustix::io::preadv2(&*self.file, &mut slice, offset + at as u64, NOWAIT)
                });
                if done == len {
                    return (Ok(()), buf);
                }
            }
            if let Some(uring) = &self.uring {
                // The ring reads the whole request (what the fast path got
                // is cached: reading it again is a copy).
                let (result, buf) = uring.submit(OpKind::Read, offset, buf).await;
                return (result.map_err(|e| Error::io("read", e)), buf);
            }
            let file = self.file.clone();
            let task = super::pool::run(move || {
                let mut buf = buf;
                let result =
                    read_full(&file, &mut buf.as_mut_slice()[done..], offset + done as u64);
                (result, buf)
            });
            match task.await {
                Some((result, buf)) => (result.map_err(|e| Error::io("read", e)), buf),
                None => (Err(Error::io("read", pool_failed())), IoBuf::zeroed(0, 1)),
            }
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            let end = offset + buf.len() as u64;
            let (result, buf) = self.write_buf(offset, buf, fua).await;
            if result.is_ok() {
                self.length.fetch_max(end, Ordering::AcqRel);
            }
            (result, buf)
        })
    }

    fn write_now(&self, offset: u64, data: &[u8]) -> Option<Result<()>> {
        if self.direct {
            return None;
        }
        // (A part the kernel took without waiting is written again whole
        // by the slow path, if it comes to that.)
        let (_, result) = self.write_at_once(crate::class::current(), offset, data, false);
        let result = result?;
        if result.is_ok() {
            self.length
                .fetch_max(offset + data.len() as u64, Ordering::AcqRel);
        }
        Some(result.map_err(|e| Error::io("write", e)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let keep = FallocateFlags::KEEP_SIZE;
            let mode = if flags.may_unmap {
                FallocateFlags::PUNCH_HOLE | keep
            } else {
                FallocateFlags::ZERO_RANGE | keep
            };
            let mut result = self.fallocate("write zeroes", mode, offset, len).await;
            if result.as_ref().is_err_and(unsupported) && flags.may_unmap {
                result = self
                    .fallocate(
                        "write zeroes",
                        FallocateFlags::ZERO_RANGE | keep,
                        offset,
                        len,
                    )
                    .await;
            }
            match result {
                Err(e) if unsupported(&e) && flags.fast => {
                    Err(Error::NotSupported("fast zeroing on this file system"))
                }
                Err(e) if unsupported(&e) => self.write_zero_buffers(offset, len).await,
                other => other,
            }?;
            if flags.fua {
                self.blocking("flush", |file| file.sync_data()).await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match self.fallocate("discard", mode, offset, len).await {
                // Discard is advisory: where holes cannot be punched, the
                // data simply stays.
                Err(e) if unsupported(&e) => Ok(()),
                other => other,
            }
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if let Some(uring) = &self.uring {
                let (result, _) = uring.submit(OpKind::Flush, 0, IoBuf::zeroed(0, 1)).await;
                return result.map_err(|e| Error::io("flush", e));
            }
            self.blocking("flush", |file| file.sync_data()).await
        })
    }

    fn filename(&self) -> Option<&str> {
        Some(&self.path)
    }

    fn host_range(&self, offset: u64, len: u64) -> Option<HostRange> {
        // `O_DIRECT` reads bypass the page cache, which a copy in the
        // kernel would not.
        (!self.direct).then(|| HostRange {
            file: self.file.clone(),
            offset,
            len,
        })
    }

    fn copy_from<'a>(&'a self, offset: u64, source: &'a HostRange) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let class = crate::class::current();
            if let Some(copied) = self.copy_direct(class, offset, source).await {
                return copied;
            }
            if !self.copy_offload.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let (from, to) = (source.file.clone(), self.file.clone());
            let (at, len) = (source.offset, source.len);
            let piece = match class {
                IoClass::Foreground => MAX_COPY,
                IoClass::Background => BACKGROUND_COPY_PIECE,
            };
            let copy = move || copy_file(&from, at, &to, offset, len, piece);
            // A buffered write like any other: after the ones queued before.
            let copied = self.on_lane(class, offset, len, copy).await;
            match copied {
                Some(Ok(true)) => {
                    self.length.fetch_max(offset + len, Ordering::AcqRel);
                    Ok(true)
                }
                Some(Err(e)) if cannot_copy(&e) => {
                    tracing::debug!("{}: no copy offload ({e})", self.path);
                    self.copy_offload.store(false, Ordering::Relaxed);
                    Ok(false)
                }
                // A short source, a failed read or write: copied through
                // memory instead, where the error (if it comes again) is
                // told apart as a read's or a write's.
                _ => Ok(false),
            }
        })
    }

    fn takes_piped(&self, _: u64, _: u64) -> bool {
        !self.direct && self.splice_in.load(Ordering::Relaxed)
    }

    fn splice_from<'a>(&'a self, offset: u64, data: &'a Piped) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            if self.direct || !self.splice_in.load(Ordering::Relaxed) {
                return Ok(false);
            }
            // A buffered write like any other: after the ones queued before.
            let class = crate::class::current();
            let here = self.write_here(class, offset, data.len(), || {
                splice_file(data.parts(), &self.file, offset)
            });
            let spliced = match here {
                Some(spliced) => Some(spliced),
                None => {
                    let file = self.file.clone();
                    let parts = data.parts().to_vec();
                    let splice = move || splice_file(&parts, &file, offset);
                    self.on_lane(class, offset, data.len(), splice).await
                }
            };
            match spliced {
                Some(Ok(())) => {
                    self.length.fetch_max(offset + data.len(), Ordering::AcqRel);
                    Ok(true)
                }
                Some(Err((0, e))) if cannot_copy(&e) => {
                    tracing::debug!("{}: no splice into the file ({e})", self.path);
                    self.splice_in.store(false, Ordering::Relaxed);
                    Ok(false)
                }
                Some(Err((_, e))) => Err(Error::io("write", e)),
                None => Err(Error::io("write", pool_failed())),
            }
        })
    }

    fn sidecar_store(&self) -> Option<Box<dyn crate::SidecarStore>> {
        Some(Box::new(crate::sidecar::FileSidecar::new(&self.path)))
    }

    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            actual_size: rustix::fs::fstat(&*self.file)
                .ok()
                .map(|st| st.st_blocks as u64 * 512),
            dirty: Some(false),
            format_specific: Some(FormatSpecific::File),
            ..ImageInfo::default()
        }
    }

    fn engine(&self) -> Option<&'static str> {
        Some(if self.uring.is_some() {
            "io_uring"
        } else {
            "threads"
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            let end = offset + len;
            // On the calling thread, as QEMU does: `lseek` reads the file's
            // extent map, cached by the kernel, and a trip to the thread
            // pool would cost more than the call.
            let (data, stop) =
                seek_status(&self.file, offset, end).map_err(|e| Error::io("block status", e))?;
            Ok(Extent {
                offset,
                len: stop.min(end) - offset,
                data,
                zero: !data,
                allocated: true,
                depth: 1,
            })
        })
    }
}

/// The smallest request size an `O_DIRECT` file accepts: the first of 512,
/// 1024, 2048 and 4096 bytes that a read at offset 0 takes. A file too short
/// to tell gets 4096.
fn probe_alignment(file: &File, length: u64) -> u64 {
    let mut buf = IoBuf::zeroed(DIRECT_ALIGNMENT as usize, DIRECT_ALIGNMENT as usize);
    for align in [512u64, 1024, 2048, 4096] {
        if length < align {
            break;
        }
        if file
            .read_at(&mut buf.as_mut_slice()[..align as usize], 0)
            .is_ok()
        {
            return align;
        }
    }
    DIRECT_ALIGNMENT
}

/// Whether `offset` is in data (else in a hole), and where that run ends.
/// Files that cannot tell report everything as data.
fn seek_status(file: &File, offset: u64, end: u64) -> io::Result<(bool, u64)> {
    match rustix::fs::seek(file, SeekFrom::Data(offset)) {
        Ok(data) if data == offset => match rustix::fs::seek(file, SeekFrom::Hole(offset)) {
            Ok(hole) => Ok((true, hole.max(offset + 1))),
            Err(_) => Ok((true, end)),
        },
        Ok(data) => Ok((false, data)),
        // No data at or after `offset`: a hole to the end.
        Err(Errno::NXIO) => Ok((false, end)),
        Err(Errno::INVAL | Errno::OPNOTSUPP) => Ok((true, end)),
        Err(e) => Err(e.into()),
    }
}

const NOWAIT: rustix::io::ReadWriteFlags = rustix::io::ReadWriteFlags::NOWAIT;

/// Runs `op(at)` (a `RWF_NOWAIT` read or write of the bytes from `at` on)
/// on the calling thread until `len` bytes are done or it would block;
/// returns the bytes done. The page cache serves such requests without
/// waiting for a device, so cached data costs no trip to the thread pool.
/// A kernel or file system that refuses the flag turns the fast path off
/// through `enabled`. A read that meets the end of the file stops short;
/// the slow path zero-fills it (and reports errors).
fn nowait(
    enabled: &AtomicBool,
    len: usize,
    mut op: impl FnMut(usize) -> rustix::io::Result<usize>,
) -> usize {
    let mut done = 0;
    while done < len {
        match op(done) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                enabled.store(false, Ordering::Relaxed);
                break;
            }
            // EAGAIN: it would wait. Anything else: the slow path retries
            // and reports it.
            Err(_) => break,
        }
    }
    done
}

/// Writes all of `data` at `offset`, at most `piece` bytes per call,
/// yielding the core between calls when `data` takes more than one.
fn write_in_pieces(file: &File, data: &[u8], offset: u64, piece: usize) -> io::Result<()> {
    let mut at = offset;
    for (i, part) in data.chunks(piece.max(1)).enumerate() {
        if i > 0 {
            std::thread::yield_now();
        }
        file.write_all_at(part, at)?;
        at += part.len() as u64;
    }
    Ok(())
}

/// Starts the write-back of the dirty pages of `offset..offset + len`
/// from the calling thread, without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`; it may wait for room in the
/// device's queue). Advice only: an error is ignored here, and a failed
/// write-back shows at the next flush as it would have anyway.
fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: `sync_file_range` takes no pointers, and the descriptor
    // stays open while `file` is borrowed.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

/// How many times the calling thread has slept in the kernel (voluntary
/// context switches, `getrusage(RUSAGE_THREAD)`); `None` if the kernel
/// does not say. Two equal counts around a call mean it never waited.
fn voluntary_switches() -> Option<i64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable `rusage`, which the kernel
    // fills on success; it is read only then.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    // SAFETY: zeroed is a valid `rusage` (plain integers), and the call
    // succeeded, so the kernel wrote it.
    (r == 0).then(|| unsafe { usage.assume_init() }.ru_nvcsw)
}

/// Whether a `RWF_DSYNC` write failed only because the kernel or the file
/// system does not take the flag.
fn dsync_unsupported(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL)
    )
}

/// Writes all of `data` at `offset`, durable at return: `RWF_DSYNC` where
/// the kernel has it, else a write and `fdatasync`.
fn write_dsync(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let slice = [io::IoSlice::new(&data[done..])];
        match rustix::io::pwritev2(
            file,
            &slice,
            offset + done as u64,
            rustix::io::ReadWriteFlags::DSYNC,
        ) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) if dsync_unsupported(&e.into()) => {
                file.write_all_at(&data[done..], offset + done as u64)?;
                return file.sync_data();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset`, zero-filling past the end of the
/// file (the last block of an `O_DIRECT` file may be short).
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_ring_falls_back_to_threads() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        // The kernel refuses a ring of 0 entries (EINVAL), as it refuses any
        // ring under seccomp (EPERM): either way, no engine and no panic.
        assert!(start_uring("test", &file, 0).is_none());
        // Where io_uring works at all (this machine and CI), a real ring.
        assert!(start_uring("test", &file, 8).is_some());
    }

    #[tokio::test]
    async fn background_writes_start_their_write_back_and_foreground_ones_do_not() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("target");
        std::fs::write(&path, []).unwrap();
        let path = path.to_str().unwrap();
        let (f, _) = FileDriver::open(path, false, false, false, Aio::Threads).unwrap();
        let sized = |fill, len: u64| IoBuf::from_vec(vec![fill; len as usize]);
        let data = |fill| sized(fill, 4 * MIB);
        let source = dir.path().join("source");
        std::fs::write(&source, vec![3u8; 4 * MIB as usize]).unwrap();
        let source = HostRange {
            file: Arc::new(File::open(&source).unwrap()),
            offset: 0,
            len: 4 * MIB,
        };
        let dirty = |offset, len| crate::pagecache::dirty(&f.file, offset, len).unwrap();
        let background_write = |offset, fill| {
            let write = crate::class::background(f.write(offset, data(fill), false));
            async move { write.await.0.unwrap() }
        };

        // A job's writes, through memory and by kernel copy (small ones:
        // larger ones go by direct I/O), in one run: written back once the
        // run reaches the batch.
        for i in 0..7 {
            background_write(i * 4 * MIB, 1).await;
        }
        // Two small copies of half the direct threshold each end the run.
        let rest = 4 * MIB - DIRECT_COPY_MIN;
        let write = crate::class::background(f.write(28 * MIB, sized(1, rest), false));
        write.await.0.unwrap();
        for i in 0..2 {
            let small = HostRange {
                len: DIRECT_COPY_MIN / 2,
                ..source.clone()
            };
            let at = 28 * MIB + rest + i * small.len;
            let copied = crate::class::background(f.copy_from(at, &small)).await;
            assert!(copied.unwrap(), "the kernel copied");
            assert!(
                crate::pagecache::resident(&f.file, at, small.len),
                "into the page cache"
            );
        }
        assert_eq!(WRITE_BEHIND_BATCH, 32 * MIB);
        assert_eq!(dirty(0, 32 * MIB), 0, "a full run left dirty pages");
        // A short run: written back once a write lands elsewhere.
        background_write(40 * MIB, 1).await;
        assert!(dirty(40 * MIB, 4 * MIB) > 0, "a short run was written back");
        background_write(48 * MIB, 1).await;
        assert_eq!(dirty(40 * MIB, 4 * MIB), 0, "an ended run left dirty pages");
        // Or once a copy by direct I/O follows it, which dirties nothing.
        let copied = crate::class::background(f.copy_from(52 * MIB, &source)).await;
        assert!(copied.unwrap(), "copied by direct I/O");
        assert_eq!(
            dirty(48 * MIB, 8 * MIB),
            0,
            "a run ended by a direct copy left dirty pages"
        );
        assert!(
            !crate::pagecache::resident(&f.file, 52 * MIB, 4096),
            "past the page cache"
        );

        // A guest's: left to the kernel's write-back.
        let (written, _) = f.write(64 * MIB, data(2), false).await;
        written.unwrap();
        assert!(f.copy_from(68 * MIB, &source).await.unwrap());
        assert!(
            dirty(64 * MIB, 4 * MIB) > 0,
            "the foreground write was written back"
        );
        assert!(
            dirty(68 * MIB, 4 * MIB) > 0,
            "the foreground copy was written back"
        );

        let mut back = vec![0u8; 72 * MIB as usize];
        f.file.read_exact_at(&mut back, 0).unwrap();
        let want = |at: u64| match at / (4 * MIB) {
            7 if at >= 28 * MIB + rest => 3,
            0..=7 | 10 | 12 => 1u8,
            13 | 17 => 3,
            16 => 2,
            _ => 0,
        };
        const PIECE: u64 = 256 << 10;
        for (i, piece) in back.chunks(PIECE as usize).enumerate() {
            let fill = want(i as u64 * PIECE);
            assert!(piece.iter().all(|&b| b == fill), "piece {i}");
        }
    }

    /// A buffered driver on a new file of `len` zeroes (in a directory
    /// that lives as long as the first value).
    fn zeroed_disk(len: usize, aio: Aio) -> (tempfile::TempDir, FileDriver) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let (f, _) = FileDriver::open(path.to_str().unwrap(), false, false, false, aio).unwrap();
        (dir, f)
    }

    #[tokio::test]
    async fn with_io_uring_small_writes_run_inline_and_large_ones_on_the_ring() {
        use futures_util::FutureExt;
        let (_dir, f) = zeroed_disk(4 << 20, Aio::IoUring);
        assert!(f.uring.is_some(), "this kernel gives no io_uring");
        let page = rustix::param::page_size();
        let (written, _) = f
            .write(0, IoBuf::from_vec(vec![5; page]), false)
            .now_or_never()
            .expect("a small write went to the ring");
        written.unwrap();
        let mut large = f.write(1 << 20, IoBuf::from_vec(vec![6; 1 << 20]), false);
        assert!(
            (&mut large).now_or_never().is_none(),
            "a 1 MiB write ran inline"
        );
        large.await.0.unwrap();
        let mut back = vec![0u8; 1 << 20];
        f.file.read_exact_at(&mut back[..page], 0).unwrap();
        assert!(back[..page].iter().all(|&b| b == 5));
        f.file.read_exact_at(&mut back, 1 << 20).unwrap();
        assert!(back.iter().all(|&b| b == 6));
    }

    #[test]
    fn inline_writes_of_two_threads_run_side_by_side() {
        let (_dir, f) = zeroed_disk(1 << 20, Aio::Threads);
        let page = rustix::param::page_size() as u64;
        let (inside_tx, inside) = std::sync::mpsc::channel::<()>();
        let (go_on, go_on_rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            let f = &f;
            let first = s.spawn(move || {
                f.write_here(IoClass::Foreground, 0, page, || {
                    inside_tx.send(()).unwrap();
                    go_on_rx.recv_timeout(std::time::Duration::from_secs(10))
                })
            });
            inside
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the first inline write did not start");
            // The first thread is inside its write: a second one goes on
            // here all the same.
            let second = f.write_here(IoClass::Foreground, page, page, || 7);
            go_on.send(()).unwrap();
            assert_eq!(second, Some(7), "an inline write waited for another");
            let first = first.join().unwrap().expect("the first write ran");
            assert!(first.is_ok(), "the first write was not let go");
        });
        // Beside a small write queued on the lane, a write is made inline;
        // behind more than `INLINE_MAX` bytes of them, it is not.
        f.inline_after.store(0, Ordering::Relaxed);
        let rt = tokio::runtime::Runtime::new().unwrap();
        for (queued, inline) in [(page, true), (INLINE_MAX + page, false)] {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let lane = f.buffered_lane.clone();
            let busy =
                rt.spawn(async move { lane.run_weighing(queued, move || rx.recv().is_ok()).await });
            while f.buffered_lane.idle() {
                std::thread::yield_now();
            }
            assert_eq!(f.buffered_lane.weight(), queued);
            let here = f.write_here(IoClass::Foreground, 0, page, || 7);
            assert_eq!(here.is_some(), inline, "behind {queued} bytes");
            tx.send(()).unwrap();
            assert_eq!(rt.block_on(busy).unwrap(), Some(true));
            assert_eq!(f.buffered_lane.weight(), 0, "the job's weight stays");
        }
    }

    #[tokio::test]
    async fn small_whole_page_writes_run_on_the_calling_thread_until_one_is_slow() {
        use futures_util::FutureExt;
        let (_dir, f) = zeroed_disk(1 << 20, Aio::Threads);
        let page = rustix::param::page_size();
        let data = |fill| IoBuf::from_vec(vec![fill; page]);
        // Done at the first poll: no trip to a pool thread and back.
        let (written, _) = f
            .write(page as u64, data(7), false)
            .now_or_never()
            .expect("a small write waited for the pool");
        written.unwrap();
        let mut back = vec![0u8; 3 * page];
        f.file.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..page].iter().all(|&b| b == 0));
        assert!(back[page..2 * page].iter().all(|&b| b == 7));
        assert!(back[2 * page..].iter().all(|&b| b == 0));
        // Only small writes of whole pages, to local files.
        assert!(writes_stay_local(&f.file), "a temporary file is local");
        let page = page as u64;
        assert!(f.inline_allowed(0, INLINE_MAX));
        assert!(!f.inline_allowed(0, INLINE_MAX + page));
        assert!(!f.inline_allowed(512, page));
        assert!(!f.inline_allowed(0, page + 512));

        // Behind a large write on the lane, a write waits for it, on the
        // pool.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let lane = f.buffered_lane.clone();
        let busy = tokio::spawn(async move {
            lane.run_weighing(INLINE_MAX + page as u64, move || rx.recv().is_ok())
                .await
        });
        while f.buffered_lane.idle() {
            tokio::task::yield_now().await;
        }
        let mut write = f.write(0, data(9), false);
        assert!((&mut write).now_or_never().is_none(), "wrote past the lane");
        tx.send(()).unwrap();
        write.await.0.unwrap();
        assert_eq!(busy.await.unwrap(), Some(true));
        f.file.read_exact_at(&mut back[..1], 0).unwrap();
        assert_eq!(back[0], 9);

        // A write that did not wait keeps the path; one that waited turns
        // it off for a while.
        f.inline_took(false);
        assert!(f.inline_allowed(0, page));
        f.inline_took(true);
        assert!(
            !f.inline_allowed(0, page),
            "a write that waited left inline writes on"
        );
        let after = f.inline_after.load(Ordering::Relaxed);
        assert!(after > clock() + INLINE_BACKOFF / 2);
        assert!(after <= clock() + INLINE_BACKOFF);
        // Slow ones in a row: twice as long each time, up to a minute.
        let mut want = INLINE_BACKOFF;
        for _ in 0..10 {
            want = (want * 2).min(INLINE_BACKOFF_MAX);
            f.inline_took(true);
            let off = f.inline_after.load(Ordering::Relaxed) - clock();
            assert!(
                off > want - INLINE_BACKOFF / 2 && off <= want,
                "{off} {want}"
            );
        }
        assert_eq!(want, INLINE_BACKOFF_MAX);
        // One that did not wait starts over.
        f.inline_took(false);
        f.inline_took(true);
        let off = f.inline_after.load(Ordering::Relaxed) - clock();
        assert!(off <= INLINE_BACKOFF, "{off}");
        f.inline_after.store(0, Ordering::Relaxed);
        assert!(f.inline_allowed(0, page));
        // Not where the kernel's page cache is not the last word: `/proc`
        // stands in for a network file system here.
        let proc = File::open("/proc/self/stat").unwrap();
        assert!(!writes_stay_local(&proc));
    }

    #[test]
    fn a_thread_that_sleeps_counts_a_voluntary_switch_and_one_that_spins_does_not() {
        // What tells an inline write that waited from one preempted.
        let before = voluntary_switches().expect("the kernel counts switches");
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        let spun = voluntary_switches().expect("the kernel counts switches");
        assert_eq!(spun, before, "a busy thread slept");
        std::thread::sleep(std::time::Duration::from_millis(1));
        let slept = voluntary_switches().expect("the kernel counts switches");
        assert!(slept > spun, "a sleep was not counted");
    }

    #[test]
    fn write_behind_starts_runs_when_full_or_ended() {
        let mut w = WriteBehind::default();
        let batch = WRITE_BEHIND_BATCH;
        // Contiguous writes grow one run, due once it reaches the batch.
        assert_eq!(w.wrote(0, batch / 2), [None, None]);
        assert_eq!(w.wrote(batch / 2, batch / 2), [None, Some((0, batch))]);
        // A write elsewhere ends the run before it.
        assert_eq!(w.wrote(5 * batch, 4096), [None, None]);
        assert_eq!(w.wrote(5 * batch + 4096, 4096), [None, None]);
        assert_eq!(w.wrote(0, 4096), [Some((5 * batch, 8192)), None]);
        // A single write of a batch or more is due at once.
        assert_eq!(
            w.wrote(4096, 2 * batch),
            [None, Some((0, 2 * batch + 4096))]
        );
        assert_eq!(w.wrote(0, 512), [None, None]);
    }
}
