//! Copies from a file's page cache into a file written with `O_DIRECT`,
//! without the CPU moving the data: the source's cached pages go into a
//! pipe by reference (`splice`), and from the pipe into the target, whose
//! direct I/O has the device read them where they are.
//!
//! A kernel copy between two buffered files (`copy_file_range`; ext4 has no
//! reflinks, and XFS has them only within one file system and with
//! `reflink=1`) copies every byte from page to page, into fresh page-cache
//! pages for the target, which the flusher then writes back: a job copying
//! a disk costs a pass of the CPU over all of it and leaves the host's page
//! cache holding a second, dirty copy. By reference the same 4 GiB copy
//! took 0.3 s of CPU instead of 4.5 s, and less time (`docs/benchmarks.md`).
//!
//! Direct writes are coherent with the target's page cache: the kernel
//! writes back and drops the range's cached pages around each one. They
//! are used for a job's large background copies into a regular file on
//! ext4 or XFS (file systems without data checksums, so the device reading
//! a source page while a guest's write changes it tears nothing but the
//! copy, which the job makes again: that write dirtied the range after the
//! copy began), and for copies into a file the user opened `O_DIRECT`.
//! Small copies go by direct I/O only together ([`Gather`]), where several
//! are contiguous in the target: each direct write waits for the device,
//! where a buffered one only fills the page cache (64 KiB copies one by
//! one took 1.5 times as long by direct I/O).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::io::Errno;
use rustix::pipe::{PipeFlags, SpliceFlags};

/// Bytes a pipe of ours is asked to hold: a job's largest copy
/// (`MAX_CHUNK`), in one direct write.
const PIPE_SIZE: usize = 1 << 20;

/// The least a pipe must hold to be of use: direct writes smaller than
/// this each wait for the device for too little data (a sequential copy
/// in 64 KiB direct writes took longer than one through the page cache).
const MIN_PIPE: usize = 256 << 10;

/// Empty pipes kept for the next copies (one per background pool thread
/// covers every copy in flight).
const KEEP: usize = 16;

/// A pipe, empty whenever it is not inside [`copy`].
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes it holds at most.
    capacity: usize,
}

/// Empty pipes kept for the next copies, and when a new one may be tried
/// again after one could not be had.
#[derive(Debug)]
struct Pipes {
    kept: Mutex<Vec<Pipe>>,
    /// Until this time ([`super::file::clock`]) no new pipe is tried: the
    /// last one could not be had (the system's `fs.pipe-max-size`, the
    /// user's pipe quota, no descriptors left). Copies take the other
    /// ways meanwhile.
    retry_at: AtomicU64,
}

/// How long after a pipe could not be had the next is tried, in
/// nanoseconds.
const PIPE_RETRY: u64 = 1_000_000_000;

/// The process's pipes for direct copies.
static PIPES: Pipes = Pipes::new();

impl Pipes {
    const fn new() -> Pipes {
        Pipes {
            kept: Mutex::new(Vec::new()),
            retry_at: AtomicU64::new(0),
        }
    }

    /// A kept pipe, or one from `make` unless one could not be had less
    /// than [`PIPE_RETRY`] ago (`now`, in nanoseconds of
    /// [`super::file::clock`]).
    fn take(&self, now: u64, make: impl FnOnce() -> Option<Pipe>) -> Option<Pipe> {
        if let Some(pipe) = self.kept.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(pipe);
        }
        if now < self.retry_at.load(Ordering::Relaxed) {
            return None;
        }
        let pipe = make();
        if pipe.is_none() {
            self.retry_at.store(now + PIPE_RETRY, Ordering::Relaxed);
        }
        pipe
    }

    fn give_back(&self, pipe: Pipe) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEEP {
            kept.push(pipe);
        }
    }
}

/// An empty pipe holding at least [`MIN_PIPE`] bytes, kept or new; `None`
/// where none can be had (tried again a second later).
pub(crate) fn take() -> Option<Pipe> {
    PIPES.take(super::file::clock(), new_pipe)
}

/// Keeps `pipe`, which [`copy`] left empty, for a later copy.
pub(crate) fn give_back(pipe: Pipe) {
    PIPES.give_back(pipe);
}

fn new_pipe() -> Option<Pipe> {
    let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).ok()?;
    let capacity = match rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE) {
        Ok(size) => size,
        // Over `fs.pipe-max-size` or the user's quota: what it has.
        Err(_) => rustix::pipe::fcntl_getpipe_size(&write).ok()?,
    };
    (capacity >= MIN_PIPE).then_some(Pipe {
        read,
        write,
        capacity,
    })
}

/// `file` opened once more, for writing with `O_DIRECT`, if it is a
/// regular file on ext4 or XFS (see the module's documentation); `None`
/// where it is not or the kernel refuses.
pub(crate) fn reopen(file: &File) -> Option<File> {
    const EXT4: u32 = 0xef53;
    const XFS: u32 = 0x5846_5342;
    let stat = rustix::fs::fstat(file).ok()?;
    if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file() {
        return None;
    }
    // The magic numbers are 32 bits wide; `f_type`'s width depends on the
    // architecture.
    let fs = rustix::fs::fstatfs(file).ok()?;
    if !matches!(fs.f_type as u32, EXT4 | XFS) {
        return None;
    }
    // The same open file (not the path, which may name another one by now).
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
        .ok()
}

/// Whether a copy of `len` bytes from `from_at` to `to_at` can go by
/// direct I/O as far as alignment goes: whole pages at both ends (each
/// pipe buffer then holds whole pages, which every device's direct I/O
/// takes).
pub(crate) fn aligned(from_at: u64, to_at: u64, len: u64) -> bool {
    let page = rustix::param::page_size() as u64;
    len > 0 && from_at % page == 0 && to_at % page == 0 && len % page == 0
}

/// Copies `len` bytes of `from` at `at` into `to` (opened `O_DIRECT`) at
/// `to_at` through `pipe`, at most its capacity per direct write.
/// `Ok(true)`: all copied, and the pipe is empty again; `Ok(false)`:
/// `from` ended first (a part may be copied). After `Ok(false)` or an
/// error the pipe may hold bytes: the caller drops it.
pub(crate) fn copy(
    from: &File,
    mut at: u64,
    to: &File,
    mut to_at: u64,
    len: u64,
    pipe: &Pipe,
) -> io::Result<bool> {
    let page = rustix::param::page_size();
    let end = at + len;
    while at < end {
        let want = (end - at).min(pipe.capacity as u64) as usize;
        // The pipe is empty and `want` whole pages fit: this never waits
        // for room.
        let filled = loop {
            let flags = SpliceFlags::empty();
            match rustix::pipe::splice(from, Some(&mut at), pipe.write.as_fd(), None, want, flags) {
                Err(Errno::INTR) => {}
                other => break other?,
            }
        };
        // Short of whole pages only at the end of the file.
        if filled == 0 || filled % page != 0 {
            return Ok(false);
        }
        drain(pipe, filled, to, &mut to_at)?;
    }
    Ok(true)
}

/// Writes the `len` bytes waiting in `pipe` into `to` at `to_at` (advanced
/// past them).
fn drain(pipe: &Pipe, mut len: usize, to: &File, to_at: &mut u64) -> io::Result<()> {
    while len > 0 {
        let flags = SpliceFlags::empty();
        match rustix::pipe::splice(pipe.read.as_fd(), None, to, Some(&mut *to_at), len, flags) {
            Ok(0) => return Err(io::Error::other("the target took no bytes from the pipe")),
            Ok(n) => len -= n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Least bytes of small copies, contiguous in the target, that are written
/// together by one direct write ([`Gather`]); fewer go through the page
/// cache one by one.
pub(crate) const GATHER_MIN: u64 = 256 << 10;

/// Small background copies into one file, waiting on the file's lane to be
/// written together. A job copying scattered clusters of its source into
/// new clusters of a qcow2 image writes the image file front to back: their
/// source pages go into one pipe, and the pipe into the file by one direct
/// write, where each copy alone would fill the page cache (3× faster and
/// a fifteenth of the CPU for 64 KiB pieces, 16 at a time,
/// `docs/benchmarks.md`).
///
/// Each copy is [`add`](Gather::add)ed, then a job for it runs on the
/// file's lane ([`run`](Gather::run)); the first of those jobs copies every
/// piece waiting and keeps the outcomes, which the later ones pick up. The
/// lane runs them one at a time, in order, so a piece is never copied twice
/// and its outcome is there by the time its own job runs.
#[derive(Debug, Default)]
pub(crate) struct Gather {
    state: Mutex<GatherState>,
    /// Set once the file refused a direct write for good: its copies, large
    /// and small, take the other ways from then on.
    refused: AtomicBool,
}

#[derive(Debug, Default)]
struct GatherState {
    next: u64,
    pending: Vec<Piece>,
    done: HashMap<u64, io::Result<bool>>,
}

/// One copy waiting in a [`Gather`]: `len` bytes of `from` at `at`, to the
/// file's `to_at`.
#[derive(Debug)]
pub(crate) struct Piece {
    id: u64,
    /// The source file.
    pub(crate) from: Arc<File>,
    /// Where the bytes are in the source.
    pub(crate) at: u64,
    /// How many.
    pub(crate) len: u64,
    /// Where they go in the file.
    pub(crate) to_at: u64,
}

impl Gather {
    /// Adds a copy of `len` bytes of `from` at `at` to the file's `to_at`;
    /// returns its ticket for [`run`](Gather::run).
    pub(crate) fn add(&self, from: Arc<File>, at: u64, len: u64, to_at: u64) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let id = state.next;
        state.next += 1;
        state.pending.push(Piece {
            id,
            from,
            at,
            len,
            to_at,
        });
        id
    }

    /// Whether the file refused a direct write for good: no copy into it
    /// should go by direct I/O any more.
    pub(crate) fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Notes that the file refused a direct write for good.
    pub(crate) fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }

    /// The outcome of copy `id` (as [`copy`] reports it), copying first,
    /// unless an earlier call did, every piece waiting: runs of pieces
    /// contiguous in the file of [`GATHER_MIN`] bytes or more by one direct
    /// write each into `direct` (the file opened `O_DIRECT`), then
    /// `after_direct`; the others, and any run whose direct write failed,
    /// piece by piece with `one`. Runs on the file's lane, one call at a
    /// time.
    pub(crate) fn run(
        &self,
        id: u64,
        direct: &File,
        mut one: impl FnMut(&Piece) -> io::Result<bool>,
        mut after_direct: impl FnMut(),
    ) -> io::Result<bool> {
        let mut pieces = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(outcome) = state.done.remove(&id) {
                return outcome;
            }
            std::mem::take(&mut state.pending)
        };
        pieces.sort_by_key(|p| p.to_at);
        let mut pipe = match self.refused() {
            true => None,
            false => take(),
        };
        let room = pipe.as_ref().map_or(0, |p| p.capacity as u64);
        let mut outcomes = Vec::with_capacity(pieces.len());
        let mut start = 0;
        while start < pieces.len() {
            // The run from `start`: contiguous in the file, within a pipe.
            let mut end = start + 1;
            let mut bytes = pieces[start].len;
            while end < pieces.len()
                && pieces[end].to_at == pieces[end - 1].to_at + pieces[end - 1].len
                && bytes + pieces[end].len <= room
            {
                bytes += pieces[end].len;
                end += 1;
            }
            let run = &pieces[start..end];
            let together = match &pipe {
                Some(p) if run.len() > 1 && bytes >= GATHER_MIN => gathered(run, direct, p),
                _ => Ok(false),
            };
            match together {
                Ok(true) => {
                    outcomes.extend(run.iter().map(|p| (p.id, Ok(true))));
                    after_direct();
                }
                failed => {
                    if failed.as_ref().is_err_and(refused) {
                        self.refuse();
                    }
                    if failed.is_err() || run.len() > 1 && bytes >= GATHER_MIN {
                        // The pipe may hold bytes of the run: not reused.
                        pipe = None;
                    }
                    outcomes.extend(run.iter().map(|p| (p.id, one(p))));
                }
            }
            start = end;
        }
        if let Some(pipe) = pipe {
            give_back(pipe);
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut mine = None;
        for (piece, outcome) in outcomes {
            match piece == id {
                true => mine = Some(outcome),
                false => {
                    state.done.insert(piece, outcome);
                }
            }
        }
        mine.unwrap_or_else(|| Err(io::Error::other("a gathered copy was lost")))
    }
}

/// Copies `run` (pieces contiguous in the target, together no more than
/// the pipe holds) into `to`, opened `O_DIRECT`, by one direct write:
/// `Ok(false)` if a source ended first. After anything but `Ok(true)` the
/// pipe may hold bytes.
fn gathered(run: &[Piece], to: &File, pipe: &Pipe) -> io::Result<bool> {
    let page = rustix::param::page_size();
    let mut filled = 0;
    for piece in run {
        let mut at = piece.at;
        let end = piece.at + piece.len;
        while at < end {
            let want = (end - at) as usize;
            let flags = SpliceFlags::empty();
            match rustix::pipe::splice(
                &*piece.from,
                Some(&mut at),
                pipe.write.as_fd(),
                None,
                want,
                flags,
            ) {
                Ok(0) => return Ok(false),
                Ok(n) if n % page != 0 && at < end => return Ok(false),
                Ok(n) => filled += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let mut to_at = run[0].to_at;
    drain(pipe, filled, to, &mut to_at)?;
    Ok(true)
}

/// Whether a direct copy failed for a reason that will not go away, so
/// that the file's copies take the other ways from now on: the file or
/// its file system refuses `splice` or direct I/O of this alignment.
pub(crate) fn refused(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS | Errno::BADF | Errno::PERM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A file of `pages` pages, page `i` filled with byte `i + 1`.
    fn source(dir: &std::path::Path, pages: usize) -> File {
        let page = rustix::param::page_size();
        let bytes: Vec<u8> = (0..pages * page).map(|i| (i / page + 1) as u8).collect();
        std::fs::write(dir.join("src"), &bytes).unwrap();
        File::open(dir.join("src")).unwrap()
    }

    /// An empty file in `dir`, and the same file opened for direct writes.
    fn target(dir: &std::path::Path) -> (File, File) {
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("dst"))
            .unwrap();
        let Some(direct) = reopen(&dst) else {
            panic!(
                "{} is not on ext4 or XFS: direct copies need one",
                dir.display()
            );
        };
        (dst, direct)
    }

    #[test]
    fn a_copy_lands_whole_and_leaves_the_pipe_empty_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let page = rustix::param::page_size();
        let src = source(dir.path(), 600);
        let (dst, direct) = target(dir.path());
        let pipe = take().expect("a pipe of 256 KiB or more");
        // More than the pipe holds, so it takes several direct writes,
        // shifted by a page at the target.
        let len = 600 * page as u64 - page as u64;
        assert!(copy(&src, page as u64, &direct, 2 * page as u64, len, &pipe).unwrap());
        let mut got = vec![0u8; len as usize];
        dst.read_exact_at(&mut got, 2 * page as u64).unwrap();
        let mut want = vec![0u8; len as usize];
        src.read_exact_at(&mut want, page as u64).unwrap();
        assert!(got == want, "the target holds the source's pages");
        assert_eq!(rustix::io::ioctl_fionread(&pipe.read).unwrap(), 0);
        // A copy running past the source's end says so.
        assert!(!copy(&src, 590 * page as u64, &direct, 0, 20 * page as u64, &pipe).unwrap());
    }

    #[test]
    fn small_copies_contiguous_in_the_target_go_by_one_direct_write() {
        let dir = tempfile::tempdir().unwrap();
        let page = rustix::param::page_size() as u64;
        let src = Arc::new(source(dir.path(), 600));
        let (dst, direct) = target(dir.path());
        let gather = Gather::default();
        // Sixteen pages each, from scattered places of the source, into
        // one run of the target (in no order); one more elsewhere; and a
        // short run of two.
        let piece = 16 * page;
        let sources = [400, 16, 200, 64, 300, 120];
        let order = [3, 0, 5, 1, 4, 2];
        let mut ids: Vec<(u64, u64, u64)> = order
            .iter()
            .map(|&k| {
                let (at, to_at) = (sources[k] * page, k as u64 * piece);
                (gather.add(src.clone(), at, piece, to_at), at, to_at)
            })
            .collect();
        let lone = (10 * piece, 500 * page);
        ids.push((
            gather.add(src.clone(), lone.1, piece, lone.0),
            lone.1,
            lone.0,
        ));
        let short = [(20 * piece, 520 * page), (21 * piece, 540 * page)];
        for (to_at, at) in short {
            ids.push((gather.add(src.clone(), at, piece, to_at), at, to_at));
        }
        let mut alone = Vec::new();
        let mut directs = 0;
        let mut outcomes = Vec::new();
        for &(id, _, _) in &ids {
            let one = |p: &Piece| {
                alone.push(p.to_at);
                let mut bytes = vec![0u8; p.len as usize];
                p.from.read_exact_at(&mut bytes, p.at)?;
                dst.write_all_at(&bytes, p.to_at)?;
                Ok(true)
            };
            outcomes.push(gather.run(id, &direct, one, || directs += 1).unwrap());
        }
        assert!(outcomes.iter().all(|&o| o), "every copy succeeded");
        alone.sort();
        assert_eq!(
            alone,
            vec![10 * piece, 20 * piece, 21 * piece],
            "copied alone"
        );
        assert_eq!(directs, 1, "one direct write for the run of six");
        assert!(
            !crate::pagecache::resident(&dst, 0, page),
            "the run went past the cache"
        );
        for &(_, at, to_at) in &ids {
            let (mut got, mut want) = (vec![0u8; piece as usize], vec![0u8; piece as usize]);
            dst.read_exact_at(&mut got, to_at).unwrap();
            src.read_exact_at(&mut want, at).unwrap();
            assert!(got == want, "the piece at {to_at} holds the source's bytes");
        }
        assert!(
            gather.state.lock().unwrap().done.is_empty(),
            "every outcome was picked up"
        );
    }

    #[test]
    fn a_pipe_that_could_not_be_had_is_tried_again_a_second_later() {
        let pipes = Pipes::new();
        let second = PIPE_RETRY;
        assert!(pipes.take(5, || None).is_none());
        let tried = std::cell::Cell::new(false);
        let make = || {
            tried.set(true);
            new_pipe()
        };
        assert!(pipes.take(5 + second - 1, make).is_none());
        assert!(!tried.get(), "tried again within the second");
        let pipe = pipes.take(5 + second, make).expect("a pipe a second later");
        assert!(tried.get());
        pipes.give_back(pipe);
        // A kept pipe comes back without a new one being made.
        assert!(pipes.take(0, || None).is_some());
    }

    #[test]
    fn only_whole_pages_at_both_ends_are_aligned() {
        let page = rustix::param::page_size() as u64;
        assert!(aligned(0, page, 2 * page));
        assert!(!aligned(512, page, 2 * page));
        assert!(!aligned(0, 512, 2 * page));
        assert!(!aligned(0, page, page + 512));
        assert!(!aligned(0, 0, 0));
    }

    #[test]
    fn a_pipe_or_socket_is_not_reopened_for_direct_writes() {
        let (read, _write) = rustix::pipe::pipe().unwrap();
        assert!(reopen(&File::from(read)).is_none());
    }
}
