//! The transmission phase on the server: requests are read in order, run
//! concurrently (up to [`MAX_IN_FLIGHT`](super::MAX_IN_FLIGHT) per
//! connection) and answered as they complete.

use std::sync::Arc;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use block::{CachedRange, IoBuf, Node, ZeroFlags};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::unix::AsyncFd;
use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
    Interest,
};
use tokio::sync::{Mutex, watch};

use super::MAX_IN_FLIGHT;
use super::export::{Context, Export};
use super::handshake::Negotiated;
use super::piped::{self, Payload, Pool};
use crate::proto::{Command, ProtoError};
use crate::proto::{
    EXTENDED_REQUEST_SIZE, MAX_PAYLOAD, REQUEST_SIZE, Request, cflag, chunk, errno,
    error_chunk_payload, extended_header, simple_reply, state, structured_header,
};

/// Most block status descriptors in one reply chunk (QEMU's limit).
const MAX_EXTENTS: usize = 128 * 1024;

/// A refused request: the wire error number and a message for the log and
/// for structured error chunks.
type Refusal = (u32, String);

/// Reads at least this long are checked for holes, which go back as
/// `OFFSET_HOLE` chunks instead of zero bytes.
const SPARSE_READ_MIN: usize = 64 * 1024;
/// How long requests in flight may take to be answered once the client has
/// left or broken the protocol.
const REPLY_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// Buffers kept per connection for reuse, and the largest one kept.
const POOL_BUFFERS: usize = 16;
const POOL_MAX_BYTES: usize = (4 << 20) + 4096;
/// Replies up to this size go through the write buffer
/// ([`REPLY_BUFFER`]), which is flushed once no other request of the
/// connection is about to reply or [`FLUSH_AFTER`] replies wait (replies
/// that complete together go out in few system calls); larger ones are
/// written with vectored writes.
const SMALL_REPLY: usize = 8192;
/// The capacity of a connection's write buffer: the replies of a batch of
/// 4 KiB reads, which complete together when the page cache serves them.
/// (With tokio's default of 8 KiB, each 4 KiB reply pushed the one before
/// it out: a system call, and a wake-up of the client, per reply.)
pub(super) const REPLY_BUFFER: usize = 64 << 10;
/// The capacity of a connection's read buffer: one `recv` takes a batch
/// of small requests with their payloads (fifteen 4 KiB writes with their
/// headers), where tokio's default of 8 KiB took fewer than two. (Random
/// 4 KiB writes at 16 in flight from `fio`, in turns with 8 KiB: 65–100 k
/// IOPS against 60–74 k, with half the `recv` calls and less CPU per
/// write.)
pub(super) const REQUEST_BUFFER: usize = 64 << 10;
/// Small replies go out once this many wait, without waiting for the rest
/// of a batch: the client can send its next requests while the server
/// still works on the batch's others. (Random 4 KiB reads at 16 in flight,
/// in turns with flushing only at the end of a batch: 1.55–1.63× nbdkit's
/// rate against 1.06–1.09×, and less CPU per read; writes within the noise.)
const FLUSH_AFTER: usize = 4;
/// Reads at least this long that the page cache holds go from it to the
/// socket inside the kernel (`sendfile`): below, a copy through our buffer
/// costs less than the extra system calls.
const SENDFILE_MIN: usize = 64 * 1024;

struct Conn<W> {
    export: Arc<Export>,
    /// Replies in chunks (structured replies or extended headers).
    structured: bool,
    /// Extended headers: 32-byte requests and chunk headers, no simple
    /// replies.
    extended: bool,
    contexts: Vec<Context>,
    writer: Mutex<BufWriter<W>>,
    /// Replies wait in `writer`'s buffer for [`Conn::flush`].
    unflushed: AtomicBool,
    /// How many ([`FLUSH_AFTER`]).
    waiting: AtomicUsize,
    /// The socket under `writer` (a descriptor of its own) when it is a
    /// plain stream socket: large reads the page cache holds are sent to
    /// it with `sendfile` (only while `writer` is locked and empty), and
    /// large write payloads are spliced from it into pipes (only by the
    /// request reader, once its buffer is drained).
    socket: Option<AsyncFd<OwnedFd>>,
    /// Empty pipes for write payloads.
    pipes: Pool,
    /// The last request's payload was spliced: the next header is read
    /// from the socket alone, so that a payload behind it stays there for
    /// the splice instead of being read into the request buffer (and then
    /// copied into the pipe).
    spliced_last: AtomicBool,
    /// Payload buffers of finished requests, for the next ones.
    pool: std::sync::Mutex<Vec<IoBuf>>,
    /// Turns true when unsent replies are to be dropped: sends give up.
    aborted: watch::Receiver<bool>,
}

/// What a request future does.
enum Work {
    /// Run the request.
    Run(Request, Option<Payload>),
    /// Answer it with an error.
    Refuse(Request, Refusal),
    /// Send the reply of a request already done ([`Conn::write_now`]).
    Reply(Request, block::Result<()>),
}

/// What the reader does with one request.
enum Next {
    /// Run it.
    Run(Request, Option<Payload>),
    /// Answer it with an error at once.
    Refuse(Request, Refusal),
    /// Answer it with an error, then close (its payload was not read).
    RefuseAndClose(Request, Refusal),
    /// The client said goodbye.
    Disconnect,
}

/// What [`Conn::write_buffered`] did with the request at the head of the
/// read buffer.
enum Buffered {
    /// It was a small write, done: its header and payload are consumed,
    /// and its reply (of this result) is what is left.
    Done(Request, block::Result<()>),
    /// A small write, all buffered, that the node could not take at once:
    /// left in the buffer for the usual path, which need not ask again.
    Declined,
    /// Anything else (another command, a payload not all buffered, a
    /// request to refuse): left in the buffer for the usual path.
    NotHere,
}

/// Serves requests until the client disconnects, breaks framing, or the
/// export or the server tells the connection to close; then waits for the
/// requests in flight and closes.
pub(super) async fn run<R, W>(
    n: Negotiated,
    reader: BufReader<R>,
    writer: BufWriter<W>,
    socket: Option<OwnedFd>,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut close = n.close.clone();
    let (abort, aborted) = watch::channel(false);
    let conn = Arc::new(Conn {
        export: n.export.clone(),
        structured: n.structured || n.extended,
        extended: n.extended,
        contexts: n.contexts.clone(),
        writer: Mutex::new(writer),
        unflushed: AtomicBool::new(false),
        spliced_last: AtomicBool::new(false),
        waiting: AtomicUsize::new(0),
        socket: socket
            .and_then(|fd| crate::socket::register(fd, Interest::READABLE | Interest::WRITABLE)),
        pipes: Pool::default(),
        pool: std::sync::Mutex::new(Vec::new()),
        aborted,
    });
    // Requests run as futures of this connection's task, not as tasks of
    // their own: a request the page cache answers completes on its first
    // poll, with no wake-up of another runtime thread.
    let mut inflight = FuturesUnordered::new();
    // Whether the export or the server told the connection to close (a
    // hard close: replies still unsent are dropped).
    let mut told = false;
    {
        // The read of the next request lives across loop turns: it is not
        // cancel-safe (a header may be half read when a request completes).
        let mut reader = Some(reader);
        let mut reading = None;
        // One wait for the end, for the connection's life: made anew each
        // turn, it registered a waiter with both watches and took it back
        // per request. Polled again only once a watch woke it: polling the
        // waits themselves took a lock per watch on every turn.
        let end = super::woken::Woken::new(async {
            tokio::select! {
                _ = close.wait_for(|c| *c) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
        let mut end = std::pin::pin!(end);
        // The node declined the write at the head of the read buffer
        // (`Buffered::Declined`): when the reader returns it, it takes the
        // asynchronous path without asking again.
        let mut declined = false;
        loop {
            // Small writes that came whole in the last read are done from
            // the read buffer, with no future, copy or buffer of their own;
            // not once the connection may have been told to close (the
            // select below looks first).
            if let Some(r) = reader.as_mut() {
                while !declined && inflight.len() < MAX_IN_FLIGHT && !end.woken() {
                    match conn.write_buffered(r) {
                        Buffered::Done(req, Ok(())) if conn.reply_now(&req) => {}
                        Buffered::Done(req, result) => {
                            let work = Work::Reply(req, result);
                            inflight.push(perform(conn.clone(), work));
                        }
                        Buffered::Declined => declined = true,
                        Buffered::NotHere => break,
                    }
                }
            }
            if inflight.len() < MAX_IN_FLIGHT {
                if let Some(r) = reader.take() {
                    let conn = conn.clone();
                    reading = Some(Box::pin(async move {
                        let mut r = r;
                        let next = read_next(&conn, &mut r).await;
                        (r, next)
                    }));
                }
            }
            let (r, next) = tokio::select! {
                biased;
                _ = &mut end => { told = true; break }
                Some(()) = inflight.next(), if !inflight.is_empty() => continue,
                Some(done) = async { Some(reading.as_mut()?.await) }, if reading.is_some() => done,
                // Last: only once no request is ready to reply and no new
                // one has come.
                r = conn.flush(), if conn.unflushed.load(Ordering::Relaxed) => match r {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::debug!("NBD connection ends: {e}");
                        break;
                    }
                },
            };
            reading = None;
            reader = Some(r);
            let next = match next {
                Ok(next) => next,
                Err(e) => {
                    tracing::debug!("NBD connection ends: {e}");
                    break;
                }
            };
            // Refusals are answered by futures like the rest: awaiting the
            // writer here, while the futures holding it are not polled,
            // would deadlock.
            let asked = std::mem::take(&mut declined);
            let (work, last) = match next {
                Next::Run(req, payload) if asked => (Work::Run(req, payload), false),
                Next::Run(req, payload) => match conn.write_now(req, payload) {
                    // Done, and its reply in the write buffer: nothing left.
                    Work::Reply(req, Ok(())) if conn.reply_now(&req) => continue,
                    work => (work, false),
                },
                Next::Refuse(req, refusal) => (Work::Refuse(req, refusal), false),
                Next::RefuseAndClose(req, refusal) => (Work::Refuse(req, refusal), true),
                Next::Disconnect => break,
            };
            inflight.push(perform(conn.clone(), work));
            if last {
                break;
            }
        }
    }
    // Requests in flight finish their I/O. Their replies still go out,
    // unless the connection was told to close or the client does not take
    // them within the grace period (a client that stopped reading must not
    // hold the export forever).
    if told {
        abort.send_replace(true);
    }
    let drained = async {
        while inflight.next().await.is_some() {
            let _ = conn.flush().await;
        }
    };
    let late = async {
        tokio::select! {
            _ = close.wait_for(|c| *c) => {}
            _ = stop.wait_for(|s| *s) => {}
            _ = tokio::time::sleep(REPLY_GRACE) => {}
        }
    };
    tokio::select! {
        _ = drained => {}
        _ = late => {
            abort.send_replace(true);
            while inflight.next().await.is_some() {}
        }
    }
    if !*conn.aborted.borrow() {
        let mut w = conn.writer.lock().await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
    drop(n);
}

/// Runs `work` for the connection (one future type for all the
/// connection's requests in flight).
async fn perform<W: AsyncWrite + Unpin + Send>(conn: Arc<Conn<W>>, work: Work) {
    conn.perform(work).await
}

/// Reads a request header into `head`: through `reader`'s buffer, or with
/// `alone` (the buffer being empty) from the stream under it, no byte past
/// the header.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    head: &mut [u8],
    alone: bool,
) -> std::io::Result<()> {
    match alone && reader.buffer().is_empty() {
        true => reader.get_mut().read_exact(head).await?,
        false => reader.read_exact(head).await?,
    };
    Ok(())
}

async fn read_next<R, W>(conn: &Conn<W>, reader: &mut BufReader<R>) -> std::io::Result<Next>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send,
{
    let bad = |e: ProtoError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    // After a spliced payload, with nothing buffered, the header alone
    // (a client that writes in large pieces sends a payload behind it).
    let header_only = conn.spliced_last.load(Ordering::Relaxed);
    let mut head = [0u8; EXTENDED_REQUEST_SIZE];
    let head = &mut head[..conn.header_size()];
    read_header(reader, head, header_only).await?;
    let (req, announced) = conn.parse_header(head).map_err(bad)?;
    conn.spliced_last.store(false, Ordering::Relaxed);
    if req.command == Command::Disc {
        return Ok(Next::Disconnect);
    }
    // A write always carries a payload (QEMU 10's client does not set
    // PAYLOAD_LEN on writes); any other command that announces one is
    // refused, the payload skipped.
    let has_payload = req.command == Command::Write;
    let checked = conn.check(&req);
    if announced && !has_payload {
        let msg = "PAYLOAD_LEN on a command that takes no payload".to_owned();
        if req.len > u64::from(MAX_PAYLOAD) {
            return Ok(Next::RefuseAndClose(req, (errno::EINVAL, msg)));
        }
        let mut skip = vec![0u8; req.len as usize];
        reader.read_exact(&mut skip).await?;
        return Ok(Next::Refuse(req, (errno::EINVAL, msg)));
    }
    let payload = if has_payload {
        if req.len > u64::from(MAX_PAYLOAD) {
            let msg = format!("len ({}) is larger than max len ({MAX_PAYLOAD})", req.len);
            return Ok(Next::RefuseAndClose(req, (errno::EINVAL, msg)));
        }
        let node = conn.export.node();
        let align = node.as_ref().map_or(1, |n| n.limits().memory_alignment);
        let piped = match (&conn.socket, &node) {
            // Only a write that will run: a refused one's payload is
            // skipped through memory.
            (Some(socket), Some(node))
                if piped::worth(req.len) && req.flags & cflag::FUA == 0 && checked.is_ok() =>
            {
                piped::read(
                    socket,
                    reader,
                    &conn.pipes,
                    node,
                    req.offset,
                    req.len,
                    align,
                )
                .await?
            }
            _ => None,
        };
        match piped {
            Some(payload) => {
                conn.spliced_last.store(true, Ordering::Relaxed);
                Some(payload)
            }
            None => {
                let mut buf = conn.buffer(req.len as usize, align);
                reader.read_exact(buf.as_mut_slice()).await?;
                Some(Payload::Buf(buf))
            }
        }
    } else {
        None
    };
    Ok(match checked {
        Ok(()) => Next::Run(req, payload),
        Err(refusal) => Next::Refuse(req, refusal),
    })
}

impl<W: AsyncWrite + Unpin + Send> Conn<W> {
    /// A buffer of `len` bytes (contents unspecified), from the pool when
    /// one there is large enough.
    fn buffer(&self, len: usize, align: usize) -> IoBuf {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let fit = pool.iter().position(|b| b.can_hold(len, align));
        match fit {
            Some(i) => pool.swap_remove(i).reuse(len, align),
            None => IoBuf::zeroed(len, align),
        }
    }

    /// Gives a finished request's buffer back to the pool.
    fn recycle(&self, buf: IoBuf) {
        if buf.capacity() <= POOL_MAX_BYTES {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOL_BUFFERS {
                pool.push(buf);
            }
        }
    }

    /// A chunk header for `req`'s reply: structured (20 bytes) or
    /// extended (32 bytes, carrying the request's offset).
    fn chunk(&self, flags: u16, kind: u16, req: &Request, len: usize) -> Vec<u8> {
        if self.extended {
            extended_header(flags, kind, req.cookie, req.offset, len as u64).to_vec()
        } else {
            structured_header(flags, kind, req.cookie, len as u32).to_vec()
        }
    }

    /// Reads `len` bytes at `offset` into a pooled buffer.
    async fn read_pooled(&self, node: &Node, offset: u64, len: usize) -> block::Result<IoBuf> {
        let buf = self.buffer(len, node.limits().memory_alignment);
        match node.read_into(offset, buf).await {
            (Ok(()), buf) => Ok(buf),
            (Err(e), buf) => {
                self.recycle(buf);
                Err(e)
            }
        }
    }

    /// Writes a payload waiting in pipes at `offset`: spliced into the
    /// node's file, or, where the node turns that down after all (a hook
    /// came in), read into memory and written. The pipes go back to the
    /// pool once empty.
    async fn write_piped(
        &self,
        node: &Node,
        offset: u64,
        pipes: Vec<piped::Pipe>,
        data: block::Piped,
    ) -> block::Result<()> {
        match node.write_piped(offset, &data).await {
            Ok(true) => {}
            Ok(false) => {
                let mut buf = self.buffer(data.len() as usize, node.limits().memory_alignment);
                let drained = piped::drain(&pipes, &piped::counts(&data), buf.as_mut_slice());
                if let Err(e) = drained {
                    self.recycle(buf);
                    return Err(block::Error::Io {
                        op: "write",
                        source: e,
                    });
                }
                let (r, buf) = node.write(offset, buf, false).await;
                self.recycle(buf);
                r?;
            }
            // The pipes may hold the rest of the payload: not reused.
            Err(e) => return Err(e),
        }
        drop(data);
        self.pipes.give_back(pipes);
        Ok(())
    }

    /// The size of a request header on this connection.
    fn header_size(&self) -> usize {
        match self.extended {
            true => EXTENDED_REQUEST_SIZE,
            false => REQUEST_SIZE,
        }
    }

    /// The request whose header starts `head`, and whether it announced a
    /// payload: with extended headers, `PAYLOAD_LEN`, which is then cleared
    /// from its flags (compact headers have no such flag: set there, it
    /// stays, and the flag check refuses it).
    fn parse_header(&self, head: &[u8]) -> Result<(Request, bool), ProtoError> {
        let truncated = || ProtoError::Truncated("request header");
        let head = head.get(..self.header_size()).ok_or_else(truncated)?;
        if !self.extended {
            let head = head.try_into().map_err(|_| truncated())?;
            return Ok((Request::parse(head)?, false));
        }
        let head = head.try_into().map_err(|_| truncated())?;
        let mut req = Request::parse_extended(head)?;
        let announced = req.flags & cflag::PAYLOAD_LEN != 0;
        req.flags &= !cflag::PAYLOAD_LEN;
        Ok((req, announced))
    }

    /// QEMU's checks, in QEMU's order.
    fn check(&self, req: &Request) -> Result<(), Refusal> {
        match self.export.with_node(|node| self.check_on(node, req)) {
            Some(checked) => checked,
            None => Err((errno::ESHUTDOWN, "export is gone".into())),
        }
    }

    /// [`Conn::check`] against `node`, the export's node.
    fn check_on(&self, node: &Node, req: &Request) -> Result<(), Refusal> {
        if req.command == Command::Read && req.len > u64::from(MAX_PAYLOAD) {
            let msg = format!("len ({}) is larger than max len ({MAX_PAYLOAD})", req.len);
            return Err((errno::EINVAL, msg));
        }
        let writes = matches!(
            req.command,
            Command::Write | Command::WriteZeroes | Command::Trim
        );
        if writes && !self.export.options().writable {
            return Err((errno::EPERM, "Export is read-only".into()));
        }
        let size = node.length();
        let len = req.len;
        // Block status lengths are a hint: one that runs past the end is
        // answered up to the end.
        let hint = req.command == Command::BlockStatus && req.offset < size;
        if !hint && (req.offset > size || len > size - req.offset) {
            let msg = format!(
                "operation past EOF; From: {}, Len: {}, Size: {size}",
                req.offset, req.len
            );
            let e = match req.command {
                Command::Write | Command::WriteZeroes => errno::ENOSPC,
                _ => errno::EINVAL,
            };
            return Err((e, msg));
        }
        let mut valid = cflag::FUA;
        match req.command {
            Command::Read if self.structured => valid |= cflag::DF,
            Command::WriteZeroes => valid |= cflag::NO_HOLE | cflag::FAST_ZERO,
            Command::BlockStatus => valid |= cflag::REQ_ONE,
            _ => {}
        }
        if req.flags & !valid != 0 {
            let msg = format!(
                "unsupported flags for command {:?} (got {:#x})",
                req.command, req.flags
            );
            return Err((errno::EINVAL, msg));
        }
        match req.command {
            Command::BlockStatus if !self.structured || self.contexts.is_empty() => {
                Err((errno::EINVAL, "CMD_BLOCK_STATUS not negotiated".into()))
            }
            Command::BlockStatus if req.len == 0 => {
                Err((errno::EINVAL, "need non-zero length".into()))
            }
            Command::Resize | Command::Unknown(_) => Err((
                errno::EINVAL,
                format!("invalid request type ({}) received", req.command.to_wire()),
            )),
            _ => Ok(()),
        }
    }

    async fn perform(&self, work: Work) {
        match work {
            Work::Run(req, payload) => self.handle(req, payload).await,
            Work::Reply(req, result) => self.reply(&req, result).await,
            Work::Refuse(req, refusal) => {
                tracing::debug!("NBD request refused: {}", refusal.1);
                let _ = self.reply_error(&req, &refusal).await;
            }
        }
    }

    async fn handle(&self, req: Request, payload: Option<Payload>) {
        let Some(node) = self.export.node() else {
            let _ = self
                .reply_error(&req, &(errno::ESHUTDOWN, "export is gone".into()))
                .await;
            return;
        };
        let fua = req.flags & cflag::FUA != 0;
        let (offset, len) = (req.offset, req.len);
        let result = match req.command {
            Command::Read => return self.read(&node, req).await,
            Command::BlockStatus => return self.block_status(&node, req).await,
            Command::Write => match payload {
                Some(Payload::Buf(buf)) if !buf.is_empty() => {
                    let (r, buf) = node.write(offset, buf, fua).await;
                    self.recycle(buf);
                    r
                }
                Some(Payload::Piped(pipes, data)) => {
                    self.write_piped(&node, offset, pipes, data).await
                }
                _ => Ok(()),
            },
            Command::Flush => node.flush().await,
            Command::Trim if len == 0 => Ok(()),
            Command::Trim => match node.discard(offset, len).await {
                Ok(()) if fua => node.flush().await,
                r => r,
            },
            Command::WriteZeroes if len == 0 => Ok(()),
            Command::WriteZeroes => {
                let flags = ZeroFlags {
                    may_unmap: req.flags & cflag::NO_HOLE == 0,
                    fast: req.flags & cflag::FAST_ZERO != 0,
                    fua,
                };
                node.write_zeroes(offset, len, flags).await
            }
            // Advisory: the node's own caches decide what stays warm.
            Command::Cache => Ok(()),
            Command::Disc | Command::Resize | Command::Unknown(_) => Ok(()),
        };
        self.reply(&req, result).await;
    }

    /// Does the request at the head of `reader`'s buffer here and now if it
    /// is a write without FUA whose payload is all in the buffer and the
    /// node takes it at once ([`Node::try_write_now`]), written from the
    /// buffer itself; anything else is left there untouched for
    /// [`read_next`] (which answers refusals and errors in framing as
    /// usual).
    fn write_buffered<R: AsyncRead + Unpin>(&self, reader: &mut BufReader<R>) -> Buffered {
        let data = reader.buffer();
        let size = self.header_size();
        // (A write's payload is its length, announced or not.)
        let Ok((req, _)) = self.parse_header(data) else {
            return Buffered::NotHere;
        };
        if req.command != Command::Write || req.flags & cflag::FUA != 0 || req.len == 0 {
            return Buffered::NotHere;
        }
        let end = usize::try_from(req.len)
            .ok()
            .and_then(|len| len.checked_add(size));
        let Some(payload) = end.and_then(|end| data.get(size..end)) else {
            return Buffered::NotHere;
        };
        let done = self
            .export
            .with_node(|node| match self.check_on(node, &req) {
                Ok(()) => match node.try_write_now(req.offset, payload) {
                    Some(result) => Buffered::Done(req, result),
                    None => Buffered::Declined,
                },
                Err(_) => Buffered::NotHere,
            });
        match done {
            Some(Buffered::Done(req, result)) => {
                let taken = size + payload.len();
                std::pin::Pin::new(reader).consume(taken);
                self.spliced_last.store(false, Ordering::Relaxed);
                Buffered::Done(req, result)
            }
            Some(other) => other,
            None => Buffered::NotHere,
        }
    }

    /// Does a small write here and now, when the node can take it without
    /// waiting ([`Node::try_write_now`]: into the page cache, in
    /// microseconds): what is left is its reply. Any other request, or a
    /// write the node cannot take at once, is left to run as a future of
    /// the connection. (Random 4 KiB writes spent more of the connection's
    /// time in the futures, boxes and wake-ups of the node's asynchronous
    /// path than in the copy.)
    fn write_now(&self, req: Request, payload: Option<Payload>) -> Work {
        let buf = match payload {
            Some(Payload::Buf(buf))
                if matches!(req.command, Command::Write)
                    && req.flags & cflag::FUA == 0
                    && !buf.is_empty() =>
            {
                buf
            }
            payload => return Work::Run(req, payload),
        };
        match self
            .export
            .with_node(|node| node.try_write_now(req.offset, buf.as_slice()))
            .flatten()
        {
            Some(result) => {
                self.recycle(buf);
                Work::Reply(req, result)
            }
            None => Work::Run(req, Some(Payload::Buf(buf))),
        }
    }

    /// Puts the success reply of `req` (a request that carries no data
    /// back) into the write buffer at once, if that needs no wait: the
    /// writer free and room in its buffer; with [`FLUSH_AFTER`] replies
    /// waiting, pushes them out too if the socket takes them now. `false`,
    /// with nothing written, if not (the reply then goes as usual).
    ///
    /// Only from the connection's loop, before it ends: the replies are
    /// never dropped (aborted) while it runs. A flush left undone here
    /// leaves `unflushed` set for the loop's own flush.
    fn reply_now(&self, req: &Request) -> bool {
        let (simple, extended);
        let reply: &[u8] = if self.extended {
            extended = extended_header(chunk::FLAG_DONE, chunk::NONE, req.cookie, req.offset, 0);
            &extended
        } else {
            simple = simple_reply(0, req.cookie);
            &simple
        };
        let Ok(mut w) = self.writer.try_lock() else {
            return false;
        };
        if w.buffer().len() + reply.len() > REPLY_BUFFER {
            return false;
        }
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        // With room in the buffer, `BufWriter` copies the reply there
        // whole, with no I/O.
        match std::pin::Pin::new(&mut *w).poll_write(&mut cx, reply) {
            std::task::Poll::Ready(Ok(n)) if n == reply.len() => {}
            // Not reached with room in the buffer; nothing was taken.
            _ => return false,
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) + 1 >= FLUSH_AFTER
            && matches!(
                std::pin::Pin::new(&mut *w).poll_flush(&mut cx),
                std::task::Poll::Ready(Ok(()))
            )
        {
            self.waiting.store(0, Ordering::Relaxed);
            self.unflushed.store(false, Ordering::Relaxed);
            return true;
        }
        self.unflushed.store(true, Ordering::Relaxed);
        true
    }

    /// Sends the reply of a request that carries no data back: success,
    /// or the error `result` maps to.
    async fn reply(&self, req: &Request, result: block::Result<()>) {
        let _ = match result {
            Ok(()) if self.extended => {
                let h = extended_header(chunk::FLAG_DONE, chunk::NONE, req.cookie, req.offset, 0);
                self.send(&[&h]).await
            }
            Ok(()) => self.send(&[&simple_reply(0, req.cookie)]).await,
            Err(e) => self.reply_error(req, &refusal(&e)).await,
        };
    }

    async fn read(&self, node: &Node, req: Request) {
        let (offset, len) = (req.offset, req.len as usize);
        if !self.structured {
            if let Some(cached) = self.cached(node, offset, len) {
                let head = simple_reply(0, req.cookie);
                let segments = [Segment::Bytes(&head), Segment::File(&cached)];
                let _ = self.send_segments(&segments).await;
                return;
            }
            let _ = match self.read_pooled(node, offset, len).await {
                Ok(data) => {
                    let r = self
                        .send(&[&simple_reply(0, req.cookie), data.as_slice()])
                        .await;
                    self.recycle(data);
                    r
                }
                Err(e) => self.reply_error(&req, &refusal(&e)).await,
            };
            return;
        }
        if len == 0 {
            let _ = self
                .send(&[&self.chunk(chunk::FLAG_DONE, chunk::NONE, &req, 0)])
                .await;
            return;
        }
        // Zeroes are sent as holes unless the client asked for one chunk,
        // or the read is small (asking costs more than the bytes saved).
        let extents = if req.flags & cflag::DF != 0 || len < SPARSE_READ_MIN {
            None
        } else {
            node.block_status(offset, len as u64).await.ok()
        };
        let sparse = extents.filter(|x| x.iter().any(|e| e.zero));
        let Some(extents) = sparse else {
            if let Some(cached) = self.cached(node, offset, len) {
                let mut h = self.chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, &req, 8 + len);
                h.extend_from_slice(&offset.to_be_bytes());
                let _ = self
                    .send_segments(&[Segment::Bytes(&h), Segment::File(&cached)])
                    .await;
                return;
            }
            let _ = match self.read_pooled(node, offset, len).await {
                Ok(data) => {
                    let h = self.chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, &req, 8 + len);
                    let r = self
                        .send(&[&h, &offset.to_be_bytes(), data.as_slice()])
                        .await;
                    self.recycle(data);
                    r
                }
                Err(e) => self.reply_error(&req, &refusal(&e)).await,
            };
            return;
        };
        let mut parts: Vec<(Vec<u8>, Data<'_>)> = Vec::with_capacity(extents.len());
        for (i, e) in extents.iter().enumerate() {
            let flags = if i + 1 == extents.len() {
                chunk::FLAG_DONE
            } else {
                0
            };
            if e.zero {
                let mut h = self.chunk(flags, chunk::OFFSET_HOLE, &req, 12);
                h.extend_from_slice(&e.offset.to_be_bytes());
                h.extend_from_slice(&(e.len as u32).to_be_bytes());
                parts.push((h, Data::Hole));
            } else {
                let n = 8 + e.len as usize;
                let mut h = self.chunk(flags, chunk::OFFSET_DATA, &req, n);
                h.extend_from_slice(&e.offset.to_be_bytes());
                if let Some(cached) = self.cached(node, e.offset, e.len as usize) {
                    parts.push((h, Data::Cached(cached)));
                    continue;
                }
                match self.read_pooled(node, e.offset, e.len as usize).await {
                    Ok(data) => parts.push((h, Data::Memory(data))),
                    Err(err) => {
                        let _ = self.reply_error(&req, &refusal(&err)).await;
                        return;
                    }
                }
            }
        }
        if parts.iter().any(|(_, d)| matches!(d, Data::Cached(_))) {
            let mut segments = Vec::with_capacity(parts.len() * 2);
            for (h, data) in &parts {
                segments.push(Segment::Bytes(h));
                match data {
                    Data::Hole => {}
                    Data::Memory(d) => segments.push(Segment::Bytes(d.as_slice())),
                    Data::Cached(c) => segments.push(Segment::File(c)),
                }
            }
            let _ = self.send_segments(&segments).await;
        } else {
            let mut slices: Vec<&[u8]> = Vec::with_capacity(parts.len() * 2);
            for (h, data) in &parts {
                slices.push(h);
                if let Data::Memory(d) = data {
                    slices.push(d.as_slice());
                }
            }
            let _ = self.send(&slices).await;
        }
        for (_, data) in parts {
            if let Data::Memory(d) = data {
                self.recycle(d);
            }
        }
    }

    async fn block_status(&self, node: &Node, req: Request) {
        // Up to the end of the export, and at most 4 GiB (extended requests
        // may ask for more; a reply may cover less than asked).
        let end = node.length().min(req.offset.saturating_add(req.len));
        let len = end
            .saturating_sub(req.offset)
            .min(u64::from(u32::MAX) & !511);
        if len == 0 {
            // The node shrank, or a pivot put a shorter one here, since
            // the request was checked.
            let refusal = (errno::EINVAL, "operation past EOF".to_owned());
            let _ = self.reply_error(&req, &refusal).await;
            return;
        }
        let offset = req.offset;
        let limit = if req.flags & cflag::REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let mut chunks = Vec::new();
        let mut alloc = None;
        for (i, c) in self.contexts.iter().enumerate() {
            let extents = match c {
                Context::BaseAllocation | Context::AllocationDepth => {
                    if alloc.is_none() {
                        match node.block_status_upto(offset, len, limit).await {
                            Ok(x) => alloc = Some(x),
                            Err(e) => {
                                let _ = self.reply_error(&req, &refusal(&e)).await;
                                return;
                            }
                        }
                    }
                    let x = alloc.as_deref().unwrap_or_default();
                    let base = *c == Context::BaseAllocation;
                    merge(
                        x.iter().map(|e| {
                            let flags = if base {
                                (if e.data { 0 } else { state::HOLE })
                                    | (if e.zero { state::ZERO } else { 0 })
                            } else {
                                e.depth
                            };
                            (e.len, flags)
                        }),
                        limit,
                    )
                }
                Context::Bitmap(b) => self.bitmap_extents(*b, offset, len, limit),
            };
            let mut p = Vec::with_capacity(8 + extents.len() * 16);
            p.extend_from_slice(&c.id().to_be_bytes());
            if self.extended {
                p.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            }
            for (l, f) in extents {
                if self.extended {
                    p.extend_from_slice(&u64::from(l).to_be_bytes());
                    p.extend_from_slice(&0u32.to_be_bytes());
                } else {
                    p.extend_from_slice(&l.to_be_bytes());
                }
                p.extend_from_slice(&f.to_be_bytes());
            }
            let flags = if i + 1 == self.contexts.len() {
                chunk::FLAG_DONE
            } else {
                0
            };
            let kind = if self.extended {
                chunk::BLOCK_STATUS_EXT
            } else {
                chunk::BLOCK_STATUS
            };
            let mut h = self.chunk(flags, kind, &req, p.len());
            h.extend_from_slice(&p);
            chunks.push(h);
        }
        let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let _ = self.send(&slices).await;
    }

    /// Dirty and clean runs of published bitmap `b` over `offset..+len`.
    fn bitmap_extents(&self, b: usize, offset: u64, len: u64, limit: usize) -> Vec<(u32, u32)> {
        let p = &self.export.bitmaps[b];
        let end = offset + len;
        let runs = p.node.bitmaps().read_bits(p.id, |bits| {
            let mut out = Vec::new();
            let mut pos = offset;
            while pos < end && out.len() < limit {
                let dirty = bits.get(pos);
                let next = if pos >= bits.len() {
                    end
                } else if dirty {
                    bits.next_zero(pos, end).unwrap_or(end.min(bits.len()))
                } else {
                    bits.next_dirty(pos, end).unwrap_or(end)
                };
                let next = if next <= pos { end } else { next };
                out.push((next - pos, if dirty { state::DIRTY } else { 0 }));
                pos = next;
            }
            out
        });
        let runs = runs.unwrap_or_else(|| vec![(len, 0)]);
        merge(runs.into_iter(), limit)
    }

    async fn reply_error(&self, req: &Request, (err, msg): &Refusal) -> std::io::Result<()> {
        if self.structured {
            let p = error_chunk_payload(*err, msg);
            let h = self.chunk(chunk::FLAG_DONE, chunk::ERROR, req, p.len());
            self.send(&[&h, &p]).await
        } else {
            self.send(&[&simple_reply(*err, req.cookie)]).await
        }
    }

    /// Writes one reply (all of its parts): small ones into the write
    /// buffer, for the connection to [`flush`](Self::flush), large ones
    /// after the buffer with vectored writes.
    async fn send(&self, parts: &[&[u8]]) -> std::io::Result<()> {
        self.unless_aborted(self.send_now(parts)).await
    }

    /// Runs a send, giving up when the connection is told to drop its
    /// unsent replies.
    async fn unless_aborted(
        &self,
        send: impl std::future::Future<Output = std::io::Result<()>>,
    ) -> std::io::Result<()> {
        let mut aborted = self.aborted.clone();
        tokio::select! {
            // The send first: most go into the write buffer at once, and
            // the watch is then never polled (no waiter registered and
            // taken back per reply).
            biased;
            r = send => r,
            _ = aborted.wait_for(|a| *a) => {
                Err(std::io::Error::other("the connection is closing"))
            }
        }
    }

    /// `offset..offset + len` of `node` as a range the kernel can send
    /// from the page cache, when this connection sends that way and the
    /// read is large enough to gain from it.
    fn cached<'n>(&self, node: &'n Node, offset: u64, len: usize) -> Option<CachedRange<'n>> {
        if self.socket.is_none() || len < SENDFILE_MIN {
            return None;
        }
        node.cached_range(offset, len as u64)
    }

    /// Sends a reply made of `segments`, the cached ranges' bytes with
    /// `sendfile`. A reply cannot be taken back once it started: if it
    /// cannot be finished, the connection is shut down (the client sees
    /// it end, not a reply with wrong bytes).
    async fn send_segments(&self, segments: &[Segment<'_, '_>]) -> std::io::Result<()> {
        self.unless_aborted(self.send_segments_now(segments)).await
    }

    async fn send_segments_now(&self, segments: &[Segment<'_, '_>]) -> std::io::Result<()> {
        let Some(socket) = &self.socket else {
            return Err(std::io::Error::other("no socket to send a file to"));
        };
        // Once the replies before this one left the buffer, the socket is
        // ours while the lock is held.
        let mut writer = self.writer.lock().await;
        writer.flush().await?;
        self.waiting.store(0, Ordering::Relaxed);
        // Dropping this future (an abort) before every byte is out leaves
        // the reply torn: the guard shuts the socket down then.
        let torn = Torn(Some(socket.get_ref()));
        let mut bytes: Vec<&[u8]> = Vec::new();
        for (i, segment) in segments.iter().enumerate() {
            match segment {
                // Runs of bytes go out together, with `MSG_MORE` (what
                // follows is part of the same reply).
                Segment::Bytes(b) => {
                    bytes.push(b);
                    if matches!(segments.get(i + 1), Some(Segment::Bytes(_))) {
                        continue;
                    }
                    write_all_vectored(&mut crate::socket::More(socket), &bytes).await?;
                    bytes.clear();
                }
                Segment::File(cached) => {
                    let mut done = 0;
                    while done < cached.len() {
                        let mut ready = socket.writable().await?;
                        match cached.send_to(socket.get_ref().as_fd(), done).await {
                            Ok(n) if n > 0 => done += n as u64,
                            Ok(_) => {
                                tracing::warn!("NBD read: the file ended before the reply did");
                                return Err(std::io::ErrorKind::UnexpectedEof.into());
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                ready.clear_ready()
                            }
                            Err(e) => {
                                tracing::warn!("NBD read: sending from the page cache failed: {e}");
                                return Err(e);
                            }
                        }
                    }
                }
            }
        }
        torn.disarm();
        Ok(())
    }

    async fn send_now(&self, parts: &[&[u8]]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total <= SMALL_REPLY {
            for p in parts {
                w.write_all(p).await?;
            }
            // Under the writer's lock, as in `flush`.
            if self.waiting.fetch_add(1, Ordering::Relaxed) + 1 >= FLUSH_AFTER {
                w.flush().await?;
                self.waiting.store(0, Ordering::Relaxed);
                self.unflushed.store(false, Ordering::Relaxed);
                return Ok(());
            }
            self.unflushed.store(true, Ordering::Relaxed);
            return Ok(());
        }
        w.flush().await?;
        self.waiting.store(0, Ordering::Relaxed);
        write_all_vectored(w.get_mut(), parts).await
    }

    /// Pushes the replies waiting in the write buffer out.
    async fn flush(&self) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        w.flush().await?;
        // Under the lock: no reply can have come in between.
        self.waiting.store(0, Ordering::Relaxed);
        self.unflushed.store(false, Ordering::Relaxed);
        Ok(())
    }
}

/// The bytes of a read reply's chunk.
enum Data<'n> {
    /// None: the chunk is a hole.
    Hole,
    /// Read into a buffer.
    Memory(IoBuf),
    /// For the kernel to send from the page cache.
    Cached(CachedRange<'n>),
}

/// A piece of a reply sent by [`Conn::send_segments`].
enum Segment<'a, 'n> {
    Bytes(&'a [u8]),
    File(&'a CachedRange<'n>),
}

/// Shuts a socket down when dropped armed: a reply that started going out
/// and did not finish.
struct Torn<'a>(Option<&'a OwnedFd>);

impl Torn<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Torn<'_> {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
        }
    }
}

/// Writes every byte of `parts`, in order, with as few syscalls as the
/// socket takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let (mut idx, mut off) = (0, 0);
    loop {
        while idx < parts.len() && off == parts[idx].len() {
            idx += 1;
            off = 0;
        }
        if idx == parts.len() {
            return Ok(());
        }
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&parts[idx][off..])
            .chain(parts[idx + 1..].iter().copied())
            .take(64)
            .map(std::io::IoSlice::new)
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let rest = parts[idx].len() - off;
            if n >= rest {
                n -= rest;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
}

/// Merges neighbours with equal flags, splits lengths to fit u32, and stops
/// after `limit` descriptors.
fn merge(runs: impl Iterator<Item = (u64, u32)>, limit: usize) -> Vec<(u32, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for (len, flags) in runs {
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += len,
            _ => {
                if out.len() == limit {
                    break;
                }
                out.push((len, flags));
            }
        }
    }
    // Request lengths are u32, so a merged run never exceeds u32::MAX.
    out.into_iter()
        .map(|(l, f)| (l.min(u64::from(u32::MAX)) as u32, f))
        .collect()
}

/// The wire error for a block layer error (QEMU's mapping: unknown errors
/// become EINVAL).
fn refusal(e: &block::Error) -> Refusal {
    const EROFS: i32 = 30;
    const EFBIG: i32 = 27;
    const EDQUOT: i32 = 122;
    const EOPNOTSUPP: i32 = 95;
    let wire = match e.errno() {
        1 | EROFS => errno::EPERM,
        5 => errno::EIO,
        12 => errno::ENOMEM,
        28 | EFBIG | EDQUOT => errno::ENOSPC,
        75 => errno::EOVERFLOW,
        EOPNOTSUPP => errno::ENOTSUP,
        108 => errno::ESHUTDOWN,
        _ => errno::EINVAL,
    };
    (wire, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_header_read_alone_leaves_the_payload_behind_it_in_the_stream() {
        let mut stream = vec![7u8; REQUEST_SIZE];
        stream.extend_from_slice(&[9u8; 100_000]);
        for alone in [true, false] {
            let mut reader = BufReader::with_capacity(REQUEST_BUFFER, &stream[..]);
            let mut head = [0u8; REQUEST_SIZE];
            read_header(&mut reader, &mut head, alone).await.unwrap();
            assert_eq!(head, [7u8; REQUEST_SIZE]);
            let left = reader.get_ref().len();
            match alone {
                true => {
                    assert!(reader.buffer().is_empty());
                    assert_eq!(left, 100_000, "the payload stays in the stream");
                }
                false => assert_eq!(reader.buffer().len() + left, 100_000),
            }
            // Either way the next bytes read are the payload's.
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, vec![9u8; 100_000]);
        }
        // With bytes buffered already, they come first, alone or not.
        let mut reader = BufReader::with_capacity(REQUEST_BUFFER, &stream[..]);
        let mut first = [0u8; 4];
        reader.read_exact(&mut first).await.unwrap();
        let mut head = [0u8; REQUEST_SIZE - 4];
        read_header(&mut reader, &mut head, true).await.unwrap();
        assert_eq!(head, [7u8; REQUEST_SIZE - 4]);
    }
}
