//! The io_uring engine of the `file` driver (`aio=io_uring`).
//!
//! One thread per file owns the ring. Requests reach it over a channel, and
//! an eventfd that the ring itself reads wakes it when new ones arrive, so
//! the thread only ever sleeps in `io_uring_enter`. Each request's buffer
//! stays in the thread's in-flight table from submission to completion.
//! Short reads and writes are resubmitted for the rest; a read past the end
//! of the file zero-fills.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, types};
use tokio::sync::oneshot;

use crate::buf::IoBuf;

/// Ring size; also the most requests in flight at once.
pub(crate) const ENTRIES: u32 = 128;
/// `user_data` of the eventfd read.
const WAKE: u64 = u64::MAX;

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

/// Handle of a file's io_uring thread.
pub(crate) struct Uring {
    tx: Option<mpsc::Sender<Op>>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").finish_non_exhaustive()
    }
}

impl Uring {
    /// Sets up a ring for `file`. Fails where the kernel refuses io_uring
    /// (EPERM under seccomp, ENOSYS on old kernels); the caller falls back.
    pub(crate) fn new(file: Arc<File>, entries: u32) -> io::Result<Uring> {
        let ring = IoUring::new(entries)?;
        let wake = Arc::new(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC,
        )?);
        let (tx, rx) = mpsc::channel();
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new()
            .name("bitmirror-uring".into())
            .spawn(move || run(ring, entries as usize, &file, &thread_wake, &rx))?;
        Ok(Uring {
            tx: Some(tx),
            wake,
            thread: Some(thread),
        })
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
        let Some(tx) = &self.tx else {
            return (Err(closed()), op.buf);
        };
        if let Err(mpsc::SendError(op)) = tx.send(op) {
            return (Err(closed()), op.buf);
        }
        if let Err(e) = rustix::io::write(&*self.wake, &1u64.to_ne_bytes()) {
            return (Err(e.into()), IoBuf::zeroed(0, 1));
        }
        answer
            .await
            .unwrap_or_else(|_| (Err(closed()), IoBuf::zeroed(0, 1)))
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Closing the channel and waking the thread makes it finish what is
        // in flight and exit.
        self.tx = None;
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn closed() -> io::Error {
    io::Error::other("the io_uring thread has stopped")
}

/// Pushes one entry, flushing the queue to the kernel first if it is full.
fn push(ring: &mut IoUring, entry: &io_uring::squeue::Entry) -> io::Result<()> {
    // SAFETY: every entry built here points at memory that outlives the
    // request: a buffer owned by the `Pending` in the in-flight table (its
    // heap storage does not move when the table does) or the thread's boxed
    // eventfd counter, both dropped only after the request's completion has
    // been reaped; and at file descriptors kept open by the same thread.
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
    let rest = &mut p.op.buf.as_mut_slice()[p.done..];
    let len = rest.len().min(u32::MAX as usize) as u32;
    match p.op.kind {
        OpKind::Read => opcode::Read::new(fd, rest.as_mut_ptr(), len)
            .offset(offset)
            .build(),
        OpKind::Write => opcode::Write::new(fd, rest.as_ptr(), len)
            .offset(offset)
            .build(),
        OpKind::WriteDsync => opcode::Write::new(fd, rest.as_ptr(), len)
            .offset(offset)
            .rw_flags(rustix::io::ReadWriteFlags::DSYNC.bits() as i32)
            .build(),
        OpKind::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
    .user_data(id)
}

fn arm_wake(ring: &mut IoUring, wake: &OwnedFd, counter: &mut [u8; 8]) -> io::Result<()> {
    let e = opcode::Read::new(types::Fd(wake.as_fd().as_raw_fd()), counter.as_mut_ptr(), 8)
        .build()
        .user_data(WAKE);
    push(ring, &e)
}

/// The ring thread.
fn run(mut ring: IoUring, entries: usize, file: &File, wake: &OwnedFd, rx: &mpsc::Receiver<Op>) {
    let mut counter = Box::new([0u8; 8]);
    let mut inflight: HashMap<u64, Pending> = HashMap::new();
    let mut next_id = 0u64;
    let mut open = true;
    if let Err(e) = arm_wake(&mut ring, wake, &mut counter) {
        tracing::error!("io_uring: cannot arm the wake-up read: {e}");
        return;
    }
    let mut wake_armed = true;
    loop {
        // Take new requests while there is room on the ring.
        while open && inflight.len() < entries - 1 {
            match rx.try_recv() {
                Ok(op) => {
                    next_id += 1;
                    let mut p = Pending { op, done: 0 };
                    let e = entry(file, next_id, &mut p);
                    match push(&mut ring, &e) {
                        Ok(()) => {
                            inflight.insert(next_id, p);
                        }
                        Err(err) => {
                            let _ = p.op.reply.send((Err(err), p.op.buf));
                        }
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        if !open && inflight.is_empty() && !wake_armed {
            return;
        }
        if !open && wake_armed && inflight.is_empty() {
            // Complete our own eventfd read so its buffer can be freed.
            let _ = rustix::io::write(wake, &1u64.to_ne_bytes());
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() == Some(rustix::io::Errno::INTR.raw_os_error()) {
                continue;
            }
            tracing::error!("io_uring: submit failed: {e}");
            for (_, p) in inflight.drain() {
                let _ =
                    p.op.reply
                        .send((Err(io::Error::other(e.to_string())), p.op.buf));
            }
            return;
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, res) in done {
            if id == WAKE {
                wake_armed = false;
                if open {
                    wake_armed = arm_wake(&mut ring, wake, &mut counter).is_ok();
                }
                continue;
            }
            let Some(mut p) = inflight.remove(&id) else {
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
                Some(result) => {
                    let _ = p.op.reply.send((result, p.op.buf));
                }
                None => {
                    // Short transfer: submit the rest under the same id.
                    let e = entry(file, id, &mut p);
                    match push(&mut ring, &e) {
                        Ok(()) => {
                            inflight.insert(id, p);
                        }
                        Err(err) => {
                            let _ = p.op.reply.send((Err(err), p.op.buf));
                        }
                    }
                }
            }
        }
    }
}
