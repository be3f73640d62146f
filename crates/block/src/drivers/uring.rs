//! The io_uring engine of the `file` driver (`aio=io_uring`).
//!
//! The ring is driven from the async runtime, with no thread of its own: a
//! request is pushed and submitted by the task that makes it (one
//! `io_uring_enter`), except a write made on a multi-thread runtime while a
//! submitted request is in flight ([`batches_here`]): that one waits for
//! the tasks ready at the time to push theirs
//! (a yield) and goes in one `io_uring_enter` with them, as QEMU submits
//! the requests its completions start all at once. Batched so, 4 KiB
//! `O_DIRECT` writes at depth 32 ran 20% faster here; reads batched so ran
//! 12% slower (as when an NBD connection batched them: the requests fell
//! into lockstep), so they go alone (docs/benchmarks.md). Completions are
//! reaped by a task of the runtime
//! that waits on an eventfd registered with the ring, which the kernel
//! signals for every completion. Each runtime that makes requests on a
//! file has a ring of its own, reaped there ([`Rings`]: an NBD
//! connection's thread has a runtime of its own). So a request and its completion cost no
//! switch between threads beyond the runtime's own wake-up when it was
//! idle (before, a thread owned the ring: every request crossed to it and
//! every completion back, two wake-ups of another thread per request).
//!
//! Each request's buffer stays in the in-flight table from submission to
//! completion, and the table is not dropped while the kernel may still use
//! a buffer. Short reads and writes are resubmitted for the rest; a read
//! past the end of the file zero-fills.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{IoUring, opcode, types};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::buf::IoBuf;

/// Ring size; also the most requests in flight at once (more wait their
/// turn in a queue).
pub(crate) const ENTRIES: u32 = 128;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    /// A write that is durable when it completes (`RWF_DSYNC`): only its
    /// own range is written back, not every dirty page of the file.
    WriteDsync,
    /// `fdatasync`.
    Flush,
}

type Reply = oneshot::Sender<(io::Result<()>, IoBuf)>;

struct Op {
    kind: OpKind,
    offset: u64,
    buf: IoBuf,
    reply: Reply,
}

/// A request on the ring: its buffer must stay here until its completion.
struct Pending {
    op: Op,
    /// Bytes already transferred.
    done: usize,
}

/// The ring and what it holds, under one lock.
struct Ring {
    ring: IoUring,
    /// Requests on the ring (the kernel's, or pushed and waiting to be
    /// submitted), by `user_data`.
    inflight: HashMap<u64, Pending>,
    /// Requests waiting for room (at most `entries` in flight, so the
    /// completion queue, twice as large, never overflows).
    queued: VecDeque<Op>,
    next_id: u64,
    entries: usize,
    /// Set when the [`Uring`] is dropped: new requests are refused.
    closed: bool,
    /// Submissions made by requests (`io_uring_enter` calls), for tests.
    enters: u64,
}

struct Shared {
    file: Arc<File>,
    ring: Mutex<Ring>,
    /// The ring's eventfd (another descriptor of it), written to wake the
    /// reaper when a submission failed.
    poke: OwnedFd,
}

/// A file's ring.
pub(crate) struct Uring {
    shared: Arc<Shared>,
    reaper: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").finish_non_exhaustive()
    }
}

impl Uring {
    /// Sets up a ring for `file`, reaped by a task of the current runtime
    /// (so its requests complete while that runtime runs: [`Rings`] gives
    /// each runtime its own). Fails where the kernel refuses io_uring
    /// (EPERM under seccomp, ENOSYS on old kernels) or outside a runtime;
    /// the caller falls back.
    pub(crate) fn new(file: Arc<File>, entries: u32) -> io::Result<Uring> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| io::Error::other("no async runtime to reap completions"))?;
        let ring = IoUring::new(entries)?;
        let event = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let poke = rustix::io::fcntl_dupfd_cloexec(&event, 0)?;
        // SAFETY: an `OwnedFd` is an open descriptor that stays open, and is
        // the one `as_raw_fd` returns, until it is dropped, which only the
        // `AsyncFd` can do.
        let event =
            unsafe { AsyncFd::register_with_interest(event, tokio::io::Interest::READABLE) }?;
        let shared = Arc::new(Shared {
            file,
            ring: Mutex::new(Ring {
                ring,
                inflight: HashMap::new(),
                queued: VecDeque::new(),
                next_id: 0,
                entries: entries as usize,
                closed: false,
                enters: 0,
            }),
            poke,
        });
        let reaper = runtime.spawn(reap(shared.clone(), event));
        Ok(Uring { shared, reaper })
    }

    /// Whether the reaper still runs (its runtime has not ended).
    fn reaped(&self) -> bool {
        !self.reaper.is_finished()
    }

    /// Runs one request on the ring, handing the buffer back.
    pub(crate) async fn submit(
        &self,
        kind: OpKind,
        offset: u64,
        buf: IoBuf,
    ) -> (io::Result<()>, IoBuf) {
        let (reply, answer) = oneshot::channel();
        let op = Op {
            kind,
            offset,
            buf,
            reply,
        };
        let deferred = {
            let mut r = self.shared.lock();
            if r.closed {
                return (Err(closed()), op.buf);
            }
            if r.inflight.len() >= r.entries {
                r.queued.push_back(op);
                false
            } else {
                // A write joins the next batch when a request the kernel
                // has taken is still in flight (its completion makes the
                // reaper submit whatever waits on the ring).
                let deferred = op.kind == OpKind::Write
                    && r.inflight.len() > r.ring.submission().len()
                    && batches_here();
                if let Err((e, op)) = r.start(&self.shared.file, op) {
                    return (Err(e), op.buf);
                }
                if !deferred {
                    self.shared.submit(&mut r);
                }
                deferred
            }
        };
        if deferred {
            // The tasks that are ready now (those woken by the same reap,
            // above all) push theirs meanwhile; the first back submits all.
            tokio::task::yield_now().await;
            let mut r = self.shared.lock();
            if !r.ring.submission().is_empty() {
                self.shared.submit(&mut r);
            }
        }
        answer
            .await
            .unwrap_or_else(|_| (Err(closed()), IoBuf::zeroed(0, 1)))
    }
}

/// The rings of one file: one for each runtime that makes requests on it,
/// reaped there.
///
/// An NBD connection runs on a thread of its own with a runtime of its own
/// (`nbd::server`). With one ring reaped on the opener's runtime, each of
/// its completions woke that runtime's thread, which woke the connection's:
/// two wake-ups of other threads per request (random 4 KiB `O_DIRECT`
/// writes at depth 16 over NBD: 29–30k IOPS against `qemu-nbd`'s 36–37k).
/// With a ring of its own, the kernel wakes the connection's thread itself.
pub(crate) struct Rings {
    file: Arc<File>,
    entries: u32,
    /// The opener's runtime and its ring.
    home: (tokio::runtime::Id, Arc<Uring>),
    /// Rings of other runtimes, made at their first request. Those whose
    /// runtime ended go when another is made (dropping one waits for its
    /// requests in flight, see `Ring`'s `Drop`).
    away: Mutex<Vec<(tokio::runtime::Id, Arc<Uring>)>>,
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings").finish_non_exhaustive()
    }
}

impl Rings {
    /// The rings of `file`, the first on the current runtime (see
    /// [`Uring::new`], whose errors this returns).
    pub(crate) fn new(file: Arc<File>, entries: u32) -> io::Result<Rings> {
        let home = Arc::new(Uring::new(file.clone(), entries)?);
        let id = tokio::runtime::Handle::try_current()
            .map_err(|_| io::Error::other("no async runtime to reap completions"))?
            .id();
        Ok(Rings {
            file,
            entries,
            home: (id, home),
            away: Mutex::new(Vec::new()),
        })
    }

    /// Runs one request on the calling runtime's ring (see
    /// [`Uring::submit`]); on the opener's where this runtime cannot have
    /// one.
    pub(crate) async fn submit(
        &self,
        kind: OpKind,
        offset: u64,
        buf: IoBuf,
    ) -> (io::Result<()>, IoBuf) {
        self.here().submit(kind, offset, buf).await
    }

    /// The ring of the calling runtime, made if need be.
    fn here(&self) -> Arc<Uring> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.home.1.clone();
        };
        let id = runtime.id();
        if id == self.home.0 {
            return self.home.1.clone();
        }
        let mut away = self.away.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, ring)) = away.iter().find(|(i, _)| *i == id) {
            return ring.clone();
        }
        match Uring::new(self.file.clone(), self.entries) {
            Ok(ring) => {
                let ring = Arc::new(ring);
                let (live, ended): (Vec<_>, Vec<_>) = std::mem::take(&mut *away)
                    .into_iter()
                    .partition(|(_, r)| r.reaped());
                *away = live;
                away.push((id, ring.clone()));
                drop(away);
                // Outside the lock: a ring with requests in flight waits for
                // them as it goes.
                drop(ended);
                ring
            }
            Err(e) => {
                tracing::debug!("io_uring: no ring of this runtime's own ({e})");
                self.home.1.clone()
            }
        }
    }

    /// How many rings there are (the opener's included).
    #[cfg(test)]
    fn count(&self) -> usize {
        1 + self.away.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.reaper.abort();
        // What is still in flight completes when the last handle on the
        // ring goes (the reaper's, once the runtime drops it): see `Ring`'s
        // `Drop`.
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits what waits on the ring (one `io_uring_enter`).
    fn submit(&self, r: &mut Ring) {
        r.enters += 1;
        if let Err(e) = r.ring.submit() {
            // The entries stay on the ring (the kernel may take them yet,
            // so their buffers stay in flight): the reaper submits them
            // again.
            tracing::debug!("io_uring: submit failed, left to the reaper: {e}");
            let _ = rustix::io::write(&self.poke, &1u64.to_ne_bytes());
        }
    }
}

impl Ring {
    /// Pushes a new request; on failure hands it back with the error.
    fn start(&mut self, file: &File, op: Op) -> Result<(), (io::Error, Op)> {
        self.next_id += 1;
        let id = self.next_id;
        let mut p = Pending { op, done: 0 };
        let e = entry(file, id, &mut p);
        match push(&mut self.ring, &e) {
            Ok(()) => {
                self.inflight.insert(id, p);
                Ok(())
            }
            Err(err) => Err((err, p.op)),
        }
    }

    /// Takes every completion the ring holds: finished requests go into
    /// `done` with their outcome, short ones are pushed again for the
    /// rest, and queued requests take the room freed (all to be
    /// submitted).
    fn reap(&mut self, file: &File, done: &mut Vec<(Reply, io::Result<()>, IoBuf)>) {
        let completed: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, res) in completed {
            let Some(mut p) = self.inflight.remove(&id) else {
                continue;
            };
            let len = p.op.buf.len();
            let outcome = if res < 0 {
                Some(Err(io::Error::from_raw_os_error(-res)))
            } else if p.op.kind == OpKind::Flush {
                Some(Ok(()))
            } else if res == 0 && p.op.kind == OpKind::Read {
                // End of file: the rest reads as zeroes.
                p.op.buf.as_mut_slice()[p.done..].fill(0);
                Some(Ok(()))
            } else if res == 0 {
                Some(Err(io::Error::new(io::ErrorKind::WriteZero, "short write")))
            } else {
                p.done += res as usize;
                (p.done >= len).then_some(Ok(()))
            };
            match outcome {
                Some(result) => done.push((p.op.reply, result, p.op.buf)),
                None => {
                    // Short transfer: the rest under the same id.
                    let e = entry(file, id, &mut p);
                    match push(&mut self.ring, &e) {
                        Ok(()) => {
                            self.inflight.insert(id, p);
                        }
                        Err(err) => done.push((p.op.reply, Err(err), p.op.buf)),
                    }
                }
            }
        }
        while self.inflight.len() < self.entries {
            let Some(op) = self.queued.pop_front() else {
                break;
            };
            if let Err((err, op)) = self.start(file, op) {
                done.push((op.reply, Err(err), op.buf));
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still read or write the buffers of requests in
        // flight: wait for their completions before the table goes.
        while !self.inflight.is_empty() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INTR.raw_os_error()) => {}
                Err(e) => {
                    // Nothing more can be learnt from this ring; leak the
                    // buffers rather than free memory the kernel may use.
                    tracing::error!("io_uring: waiting for requests in flight failed: {e}");
                    std::mem::forget(std::mem::take(&mut self.inflight));
                    return;
                }
            }
            let ids: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for id in ids {
                if let Some(p) = self.inflight.remove(&id) {
                    let _ = p.op.reply.send((Err(closed()), p.op.buf));
                }
            }
        }
        for op in self.queued.drain(..) {
            let _ = op.reply.send((Err(closed()), op.buf));
        }
    }
}

/// The reaper: waits for the ring's eventfd, then takes the completions.
async fn reap(shared: Arc<Shared>, event: AsyncFd<OwnedFd>) {
    let mut done = Vec::new();
    loop {
        let mut ready = match event.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                tracing::error!("io_uring: cannot wait for completions: {e}");
                return;
            }
        };
        // Reset the counter before looking at the ring: a completion posted
        // after this read signals the eventfd again, which the runtime sees
        // as a new readiness (`clear_ready` does not clear one that came
        // after `ready` was handed out).
        let mut counter = [0u8; 8];
        match rustix::io::read(event.get_ref(), &mut counter) {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
            Err(e) => {
                tracing::error!("io_uring: cannot read the completion eventfd: {e}");
                return;
            }
        }
        // Reap, submit what that pushed, hand the outcomes over; where the
        // kernel refuses the submission for now (EAGAIN, EBUSY), try again
        // shortly: the entries stay on the ring, and nothing else would
        // wake this task for them.
        loop {
            let refused = {
                let mut r = shared.lock();
                r.reap(&shared.file, &mut done);
                if r.ring.submission().is_empty() {
                    None
                } else {
                    r.ring.submit().err()
                }
            };
            for (reply, result, buf) in done.drain(..) {
                let _ = reply.send((result, buf));
            }
            match refused {
                None => break,
                Some(e) => {
                    tracing::debug!("io_uring: submit failed, trying again: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
    }
}

fn closed() -> io::Error {
    io::Error::other("the file's io_uring is closed")
}

/// Pushes one entry, flushing the queue to the kernel first if it is full.
fn push(ring: &mut IoUring, entry: &io_uring::squeue::Entry) -> io::Result<()> {
    // SAFETY: every entry built here points at a buffer owned by the
    // `Pending` in the in-flight table (its heap storage does not move when
    // the table does), which is dropped only after the request's completion
    // has been reaped (`Ring`'s `Drop` waits for it), and at the file, which
    // the ring's `Shared` keeps open as long.
    if unsafe { ring.submission().push(entry) }.is_ok() {
        return Ok(());
    }
    ring.submit()?;
    // SAFETY: as above.
    unsafe { ring.submission().push(entry) }
        .map_err(|_| io::Error::other("io_uring submission queue is full"))
}

/// The entry for the remaining part of a request.
fn entry(file: &File, id: u64, p: &mut Pending) -> io_uring::squeue::Entry {
    let fd = types::Fd(file.as_raw_fd());
    let offset = p.op.offset + p.done as u64;
    let len = |rest: &[u8]| rest.len().min(u32::MAX as usize) as u32;
    // A write only reads its buffer, which clones may share.
    let rest = &p.op.buf.as_slice()[p.done..];
    match p.op.kind {
        OpKind::Read => {
            let rest = &mut p.op.buf.as_mut_slice()[p.done..];
            opcode::Read::new(fd, rest.as_mut_ptr(), len(rest))
                .offset(offset)
                .build()
        }
        OpKind::Write => opcode::Write::new(fd, rest.as_ptr(), len(rest))
            .offset(offset)
            .build(),
        OpKind::WriteDsync => opcode::Write::new(fd, rest.as_ptr(), len(rest))
            .offset(offset)
            .rw_flags(rustix::io::ReadWriteFlags::DSYNC.bits() as i32)
            .build(),
        OpKind::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
    .user_data(id)
}

/// Whether a write made here may wait for others to join its submission:
/// on a multi-thread runtime (the daemon's, where many tasks make
/// requests), not on a current-thread one. An NBD connection's thread runs
/// a runtime of its own whose one task makes all its requests: there the
/// wait cost a turn of the runtime's I/O driver, and the connection's
/// other requests waited behind it (4 KiB `O_DIRECT` writes at 16 in
/// flight, in turns: 1.00–1.09× qemu-nbd's rate submitted at once, against
/// 0.94–0.98× batched; docs/benchmarks.md).
fn batches_here() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::os::unix::fs::FileExt;

    fn filled(len: usize, seed: u8) -> IoBuf {
        let mut b = IoBuf::zeroed(len, 1);
        for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
            *x = seed.wrapping_add((i / 512) as u8);
        }
        b
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_requests_than_the_ring_holds_wait_their_turn_and_all_land() {
        let file = Arc::new(tempfile::tempfile().expect("a file"));
        let ring = Arc::new(Uring::new(file.clone(), 4).expect("a ring"));
        // 64 writes of 64 KiB at once on a ring of 4.
        let writes = (0..64u64).map(|i| {
            let ring = ring.clone();
            tokio::spawn(async move {
                let (r, _) = ring
                    .submit(OpKind::Write, i * 65536, filled(65536, i as u8))
                    .await;
                r
            })
        });
        for w in futures_util::future::join_all(writes).await {
            w.expect("the task").expect("the write");
        }
        let (r, _) = ring.submit(OpKind::Flush, 0, IoBuf::zeroed(0, 1)).await;
        r.expect("the flush");
        for i in 0..64u64 {
            let mut back = vec![0u8; 65536];
            file.read_exact_at(&mut back, i * 65536)
                .expect("the file reads");
            assert!(back == filled(65536, i as u8).as_slice(), "write {i}");
        }
        // And read back through the ring, as many at once.
        let reads = (0..64u64).map(|i| {
            let ring = ring.clone();
            tokio::spawn(async move {
                let (r, buf) = ring
                    .submit(OpKind::Read, i * 65536, IoBuf::zeroed(65536, 1))
                    .await;
                r.map(|()| (i, buf))
            })
        });
        for r in futures_util::future::join_all(reads).await {
            let (i, buf) = r.expect("the task").expect("the read");
            assert!(
                buf.as_slice() == filled(65536, i as u8).as_slice(),
                "read {i}"
            );
        }
    }

    #[test]
    fn each_runtime_gets_a_ring_reaped_on_it_and_an_ended_ones_ring_goes() {
        let file = Arc::new(tempfile::tempfile().expect("a file"));
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
        };
        let home = runtime();
        let rings = Arc::new(
            home.block_on(async { Rings::new(file.clone(), 8) })
                .expect("rings"),
        );
        let (r, _) = home.block_on(rings.submit(OpKind::Write, 0, filled(4096, 1)));
        r.expect("a write on the opener's runtime");
        assert_eq!(rings.count(), 1);
        // Another runtime, on another thread, while the opener's runtime
        // does not run (nothing drives it outside `block_on`): its
        // requests complete all the same, reaped there.
        let away = |seed: u8| {
            let rings = rings.clone();
            std::thread::spawn(move || {
                runtime().block_on(async {
                    let within = |f| tokio::time::timeout(std::time::Duration::from_secs(10), f);
                    let (r, _) = within(rings.submit(OpKind::Write, 4096, filled(4096, seed)))
                        .await
                        .expect("a write away from the opener's runtime hung");
                    r.expect("the write");
                    let (r, back) =
                        within(rings.submit(OpKind::Read, 4096, IoBuf::zeroed(4096, 1)))
                            .await
                            .expect("a read away from the opener's runtime hung");
                    r.expect("the read");
                    assert!(back.as_slice() == filled(4096, seed).as_slice());
                    rings.count()
                })
            })
            .join()
            .expect("the other thread")
        };
        assert_eq!(away(2), 2, "no ring of the other runtime's own");
        // That runtime ended: its ring goes when the next one is made.
        assert_eq!(away(3), 2, "an ended runtime's ring stayed");
        let (r, _) = home.block_on(rings.submit(OpKind::Flush, 0, IoBuf::zeroed(0, 1)));
        r.expect("a flush on the opener's runtime");
        assert_eq!(rings.count(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_started_together_are_submitted_together() {
        let file = Arc::new(tempfile::tempfile().expect("a file"));
        let ring = Arc::new(Uring::new(file, ENTRIES).expect("a ring"));
        let writes: Vec<_> = (0..32u64)
            .map(|i| {
                let ring = ring.clone();
                tokio::spawn(async move {
                    ring.submit(OpKind::Write, i * 4096, filled(4096, i as u8))
                        .await
                })
            })
            .collect();
        for w in writes {
            let (r, _) = w.await.expect("write task");
            r.expect("write");
        }
        let enters = ring.shared.lock().enters;
        assert!(enters <= 8, "32 writes took {enters} submissions");
        // Reads go alone: the kernel may take each before the next is made.
        let before = ring.shared.lock().enters;
        let reads: Vec<_> = (0..8u64)
            .map(|i| ring.submit(OpKind::Read, i * 4096, IoBuf::zeroed(4096, 1)))
            .collect();
        let results = futures_util::future::join_all(reads).await;
        for (i, (r, buf)) in results.into_iter().enumerate() {
            r.expect("read");
            assert_eq!(buf.as_slice(), filled(4096, i as u8).as_slice());
        }
        assert_eq!(ring.shared.lock().enters - before, 8);
    }

    #[tokio::test]
    async fn on_a_current_thread_runtime_writes_go_at_once() {
        let file = Arc::new(tempfile::tempfile().expect("a file"));
        let ring = Arc::new(Uring::new(file, ENTRIES).expect("a ring"));
        let writes: Vec<_> = (0..8u64)
            .map(|i| ring.submit(OpKind::Write, i * 4096, filled(4096, i as u8)))
            .collect();
        for (r, _) in futures_util::future::join_all(writes).await {
            r.expect("write");
        }
        assert_eq!(ring.shared.lock().enters, 8, "one submission per write");
    }

    #[tokio::test]
    async fn a_read_past_the_end_of_the_file_reads_zeroes_there() {
        let file = Arc::new(tempfile::tempfile().expect("a file"));
        file.write_all_at(&[7u8; 1000], 0).expect("the file writes");
        let ring = Uring::new(file, 8).expect("a ring");
        let (r, buf) = ring.submit(OpKind::Read, 0, filled(4096, 1)).await;
        r.expect("the read");
        assert!(buf.as_slice()[..1000].iter().all(|&b| b == 7));
        assert!(buf.as_slice()[1000..].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn a_ring_dropped_with_a_request_in_flight_waits_for_it() {
        let file = Arc::new(tempfile::tempfile().expect("a file"));
        file.set_len(1 << 20).expect("a sized file");
        let ring = Uring::new(file, 8).expect("a ring");
        // Submitted, then abandoned by its caller: the buffer is the ring's
        // until the kernel is done with it.
        let shared = Arc::downgrade(&ring.shared);
        let mut read = Box::pin(ring.submit(OpKind::Read, 0, IoBuf::zeroed(1 << 20, 1)));
        // One poll submits it (it may complete at once: then it is gone
        // from the table).
        let answered = (&mut read).now_or_never().is_some();
        let inflight = ring.shared.lock().inflight.len();
        assert_eq!(inflight, usize::from(!answered), "the read on the ring");
        drop(read);
        drop(ring);
        // The reaper goes with the runtime's next turns; the table, waiting
        // for the read's completion, with the last handle.
        for _ in 0..100 {
            if shared.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the ring outlived its handle");
    }

    #[test]
    fn outside_a_runtime_there_is_no_ring() {
        let file = Arc::new(tempfile::tempfile().expect("a file"));
        assert!(
            Uring::new(file, 8).is_err(),
            "no runtime to reap completions"
        );
    }
}
