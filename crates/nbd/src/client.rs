//! The NBD client: one connection, many requests in flight.
//!
//! Guarantees:
//! - requests are pipelined: each gets a fresh cookie and waits only for
//!   its own reply; one task reads every reply and hands it out;
//! - a read's data lands directly in the caller's buffer, from simple
//!   replies or from structured `OFFSET_DATA`/`OFFSET_HOLE` chunks, which
//!   are checked to lie inside the request;
//! - when the connection fails (the server goes away, or breaks the
//!   protocol) every request in flight and every later one fails with
//!   `EIO` and a message saying why; nothing hangs.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use block::{IoBuf, SocketAddress};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::proto::{
    BASE_ALLOCATION, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, Command, FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES, IHAVEOPT, InfoRequest, MAX_PAYLOAD, MetaContextRequest, NBD_MAGIC,
    OptionHeader, OptionReplyHeader, Reader, ReplyStart, Request, chunk, info, opt, rep,
};

/// A byte stream to a server (unix or TCP).
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A read's result, with the buffer handed back.
pub type ReadResult = (Result<()>, IoBuf);

/// Block status descriptors `(length, flags)` per metadata context id.
pub type StatusReply = Vec<(u32, Vec<(u32, u32)>)>;

/// What to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// The server.
    pub server: SocketAddress,
    /// The export's name.
    pub export: String,
    /// Metadata contexts to select besides `base:allocation` (e.g.
    /// `qemu:dirty-bitmap:B`).
    pub contexts: Vec<String>,
    /// Start TLS with these credentials before anything else.
    pub tls: Option<crate::tls::ClientTls>,
    /// The name the server's certificate must carry (QEMU's
    /// `tls-hostname`); by default the server's host, or `localhost` for a
    /// unix socket.
    pub tls_hostname: Option<String>,
}

/// The server's block size constraints for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests must be aligned to this.
    pub minimum: u32,
    /// Requests should be multiples of this.
    pub preferred: u32,
    /// Largest read or write payload.
    pub maximum: u32,
}

/// What a reply delivers to its waiter.
enum Waiter {
    /// A read into `buf[at..at + len]`, for guest offset `offset`.
    Read {
        offset: u64,
        at: usize,
        len: usize,
        buf: IoBuf,
        /// Ranges (relative to `offset`) the chunks filled so far: a
        /// structured reply must cover the read exactly once.
        covered: Vec<(u64, u64)>,
        error: Option<Error>,
        tx: oneshot::Sender<ReadResult>,
    },
    /// Block status descriptors, per context id.
    Status {
        got: StatusReply,
        error: Option<Error>,
        tx: oneshot::Sender<Result<StatusReply>>,
    },
    /// Anything else: success or an error.
    Done {
        error: Option<Error>,
        tx: oneshot::Sender<Result<()>>,
    },
}

impl Waiter {
    fn set_error(&mut self, e: Error) {
        let slot = match self {
            Waiter::Read { error, .. }
            | Waiter::Status { error, .. }
            | Waiter::Done { error, .. } => error,
        };
        slot.get_or_insert(e);
    }

    fn finish(self) {
        match self {
            Waiter::Read {
                buf,
                mut error,
                tx,
                mut covered,
                len,
                ..
            } => {
                covered.sort_unstable();
                let mut end = 0;
                for (from, to) in covered {
                    if from != end {
                        break;
                    }
                    end = to;
                }
                if error.is_none() && end != len as u64 {
                    error = Some(Error::Request {
                        errno: 5,
                        message: format!(
                            "server reply covered the read only partly or twice \
                             ({end} of {len} bytes in order)"
                        ),
                    });
                }
                let _ = tx.send((error.map_or(Ok(()), Err), buf));
            }
            Waiter::Status { got, error, tx } => {
                let _ = tx.send(error.map_or(Ok(got), Err));
            }
            Waiter::Done { error, tx } => {
                let _ = tx.send(error.map_or(Ok(()), Err));
            }
        }
    }
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is gone, once it is.
    dead: Option<String>,
}

struct Shared {
    writer: tokio::sync::Mutex<WriteHalf<Box<dyn Stream>>>,
    /// A duplicate of the socket under `writer` when nothing (TLS) stands
    /// between: file payloads go straight to it with `sendfile`.
    socket: Option<OwnedFd>,
    /// Set when the connection dies or the client goes away: a `sendfile`
    /// waiting for room in the socket gives up.
    closed: AtomicBool,
    pending: Mutex<Pending>,
    next_cookie: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection dead and fails everything in flight.
    fn die(&self, why: String) {
        self.closed.store(true, Ordering::Relaxed);
        let waiters: Vec<Waiter> = {
            let mut p = self.lock();
            p.dead.get_or_insert(why.clone());
            p.waiters.drain().map(|(_, w)| w).collect()
        };
        for mut w in waiters {
            w.set_error(lost(&why));
            w.finish();
        }
    }
}

/// An `EIO` error saying the connection is gone.
fn lost(why: &str) -> Error {
    Error::Disconnected(why.to_owned())
}

/// A connection to one export.
pub struct Client {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    size: u64,
    flags: u16,
    block_sizes: BlockSizes,
    structured: bool,
    contexts: Vec<(u32, String)>,
    description: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.description)
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.reader.abort();
    }
}

impl Client {
    /// Connects, negotiates (fixed newstyle, structured replies, the meta
    /// contexts, block sizes) and starts reading replies.
    pub async fn connect(options: &ClientOptions) -> Result<Client> {
        let (stream, socket): (Box<dyn Stream>, _) = match &options.server {
            SocketAddress::Unix { path } => {
                let s = tokio::net::UnixStream::connect(path).await;
                let s = s.and_then(|s| s.into_std());
                let s = s.map_err(|e| connect_error(&options.server, e))?;
                quiet(OwnedFd::from(s), &options.server)?
            }
            SocketAddress::Inet { host, port } => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| Error::Refused(format!("Invalid port '{port}' for NBD server")))?;
                let s = tokio::net::TcpStream::connect((host.as_str(), port)).await;
                let s = s.map_err(|e| connect_error(&options.server, e))?;
                let _ = s.set_nodelay(true);
                let s = s
                    .into_std()
                    .map_err(|e| connect_error(&options.server, e))?;
                quiet(OwnedFd::from(s), &options.server)?
            }
        };
        let socket = socket.filter(|_| options.tls.is_none());
        Client::negotiate(stream, socket, options).await
    }

    /// Negotiates over an already connected `stream` (`options.server`
    /// only names it); the fuzz target drives the client this way.
    pub async fn over<S>(stream: S, options: &ClientOptions) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Client::negotiate(Box::new(stream), None, options).await
    }

    /// [`over`](Self::over), knowing the plain socket under `stream` when
    /// there is one.
    async fn negotiate(
        stream: Box<dyn Stream>,
        socket: Option<OwnedFd>,
        options: &ClientOptions,
    ) -> Result<Client> {
        let (r, mut w) = tokio::io::split(stream);
        let mut r = BufReader::new(r);
        greeting(&mut r, &mut w).await?;
        let (mut r, mut w) = match &options.tls {
            None => (r, w),
            Some(tls) => start_tls(r, w, tls, options).await?,
        };
        let hs = handshake(&mut r, &mut w, options).await?;
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(w),
            socket,
            closed: AtomicBool::new(false),
            pending: Mutex::new(Pending::default()),
            next_cookie: AtomicU64::new(1),
        });
        let reader = tokio::spawn(read_replies(shared.clone(), r));
        let description = match &options.server {
            SocketAddress::Unix { path } => {
                format!("nbd+unix:///{}?socket={path}", options.export)
            }
            SocketAddress::Inet { host, port } => format!("nbd://{host}:{port}/{}", options.export),
        };
        Ok(Client {
            shared,
            reader,
            size: hs.size,
            flags: hs.flags,
            block_sizes: hs.block_sizes,
            structured: hs.structured,
            contexts: hs.contexts,
            description,
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags (see [`crate::proto::tflag`]).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether the export has transmission flag `flag`.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The server's block size constraints.
    pub fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> &str {
        &self.description
    }

    /// The id of a selected metadata context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(i, _)| *i)
    }

    /// Why the connection is gone, if it is.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().dead.clone()
    }

    /// Registers `waiter`, sends the request (and `payload`), and returns
    /// the cookie; on failure the waiter is finished with the error.
    async fn submit(&self, mut req: Request, payload: Payload<'_>, waiter: Waiter) {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        req.cookie = cookie;
        {
            let mut p = self.shared.lock();
            if let Some(why) = p.dead.clone() {
                drop(p);
                let mut waiter = waiter;
                waiter.set_error(lost(&why));
                waiter.finish();
                return;
            }
            p.waiters.insert(cookie, waiter);
        }
        // If this future is dropped mid-write, the stream is out of step:
        // the guard then fails the connection rather than let the server
        // read the rest of a request as the next one.
        let guard = DieUnlessSent(Some(&self.shared));
        let sent = async {
            let mut w = self.shared.writer.lock().await;
            let header = req.encode();
            let Payload::File(file, at, cached) = payload else {
                w.write_all(&header).await?;
                if let Payload::Bytes(p) = payload {
                    w.write_all(p).await?;
                }
                return w.flush().await;
            };
            let socket = self
                .shared
                .socket
                .as_ref()
                .ok_or_else(|| io::Error::other("no plain socket to send a file payload on"))?;
            // Registered for writability for this payload only (the
            // stream asks for it only when it must, see `QuietSocket`).
            let socket = crate::socket::duplicate(socket)
                .and_then(|fd| crate::socket::register(fd, crate::socket::Interest::WRITABLE))
                .map(Arc::new)
                .ok_or_else(|| io::Error::other("cannot register the socket for a file payload"))?;
            // The writer stays locked: nothing else goes out between the
            // header and its payload. The header waits in the kernel for
            // the payload (`MSG_MORE`) rather than go in a packet alone.
            w.flush().await?;
            crate::socket::More(&socket).write_all(&header).await?;
            let (closed, len) = (&self.shared.closed, req.len);
            if cached {
                return crate::socket::send_cached(&socket, file, at, len, closed).await;
            }
            let (file, shared) = (file.clone(), self.shared.clone());
            tokio::task::spawn_blocking(move || {
                crate::socket::send_blocking(&socket, &file, at, len, &shared.closed)
            })
            .await
            .map_err(io::Error::other)?
        }
        .await;
        guard.disarm();
        if let Err(e) = sent {
            self.shared.die(format!("sending a request failed: {e}"));
        }
    }

    /// Reads `buf.len()` bytes at `offset` (split into pieces of at most
    /// the server's maximum).
    pub async fn read(&self, offset: u64, buf: IoBuf) -> ReadResult {
        let mut buf = buf;
        let max = self.block_sizes.maximum as usize;
        let mut at = 0;
        while at < buf.len() {
            let len = (buf.len() - at).min(max);
            let (tx, rx) = oneshot::channel();
            let req = request(Command::Read, 0, offset + at as u64, len as u32);
            let waiter = Waiter::Read {
                offset: offset + at as u64,
                at,
                len,
                buf,
                covered: Vec::new(),
                error: None,
                tx,
            };
            self.submit(req, Payload::None, waiter).await;
            // The waiter always answers: the reader finishes it, or `die`
            // fails it; a dropped sender means the runtime is going away.
            let Ok((r, b)) = rx.await else {
                return (Err(lost("the reply reader stopped")), IoBuf::zeroed(0, 1));
            };
            buf = b;
            if r.is_err() {
                return (r, buf);
            }
            at += len;
        }
        (Ok(()), buf)
    }

    /// Writes `data` at `offset` (split into pieces of at most the
    /// server's maximum); `fua`: durable when this returns.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { crate::proto::cflag::FUA } else { 0 };
        for (i, piece) in data.chunks(self.block_sizes.maximum as usize).enumerate() {
            let at = offset + (i * self.block_sizes.maximum as usize) as u64;
            let req = request(Command::Write, flags, at, piece.len() as u32);
            self.simple(req, Payload::Bytes(piece)).await?;
        }
        Ok(())
    }

    /// Writes `len` bytes of `file` from `file_offset` at `offset`, sent
    /// from the file to the socket by the kernel (`sendfile`: the data
    /// never passes through our memory). `cached`: the caller found the
    /// page cache holding the range, so the kernel reads it without waiting
    /// for the disk and it is sent from this thread; otherwise from a
    /// blocking thread. `Ok(false)`, with nothing sent, where that cannot be
    /// done: a TLS connection, or a file shorter than the range. A file
    /// that fails to read mid-way fails the connection (its header
    /// promised the bytes).
    pub async fn write_file(
        &self,
        offset: u64,
        file: &Arc<File>,
        file_offset: u64,
        len: u64,
        cached: bool,
    ) -> Result<bool> {
        if self.shared.socket.is_none() {
            return Ok(false);
        }
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if file_offset.checked_add(len).is_none_or(|end| end > size) {
            return Ok(false);
        }
        let max = u64::from(self.block_sizes.maximum);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            let req = request(Command::Write, 0, offset + done, n as u32);
            self.simple(req, Payload::File(file, file_offset + done, cached))
                .await?;
            done += n;
        }
        Ok(true)
    }

    /// A request without data in either direction, for ranges of any
    /// length (split at 4 GiB − 1 MiB, aligned).
    pub async fn ranged(&self, command: Command, flags: u16, offset: u64, len: u64) -> Result<()> {
        const STEP: u64 = (u32::MAX as u64 + 1) - (1 << 20);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(STEP);
            self.simple(
                request(command, flags, offset + done, n as u32),
                Payload::None,
            )
            .await?;
            done += n;
        }
        Ok(())
    }

    /// Flushes the export.
    pub async fn flush(&self) -> Result<()> {
        self.simple(request(Command::Flush, 0, 0, 0), Payload::None)
            .await
    }

    /// Block status of `offset..offset + len` (len < 4 GiB) for every
    /// selected context: `(context id, [(length, flags)])`.
    pub async fn block_status(&self, offset: u64, len: u32, one: bool) -> Result<StatusReply> {
        if !self.structured || self.contexts.is_empty() {
            return Err(Error::Refused("no metadata context was negotiated".into()));
        }
        let flags = if one { crate::proto::cflag::REQ_ONE } else { 0 };
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter::Status {
            got: Vec::new(),
            error: None,
            tx,
        };
        self.submit(
            request(Command::BlockStatus, flags, offset, len),
            Payload::None,
            waiter,
        )
        .await;
        rx.await
            .unwrap_or_else(|_| Err(lost("the reply reader stopped")))
    }

    /// Sends DISC and closes the connection; requests in flight fail.
    pub async fn disconnect(&self) {
        let req = request(Command::Disc, 0, 0, 0);
        let mut w = self.shared.writer.lock().await;
        let _ = w.write_all(&req.encode()).await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
        drop(w);
        self.shared.die("the client disconnected".into());
    }

    async fn simple(&self, req: Request, payload: Payload<'_>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.submit(req, payload, Waiter::Done { error: None, tx })
            .await;
        rx.await
            .unwrap_or_else(|_| Err(lost("the reply reader stopped")))
    }
}

/// What follows a request's header.
#[derive(Clone, Copy)]
enum Payload<'a> {
    None,
    Bytes(&'a [u8]),
    /// The header's length in bytes of the file, from this offset; `true`:
    /// the page cache holds them (they are sent from the runtime's thread).
    File(&'a Arc<File>, u64, bool),
}

/// Fails the connection when dropped armed (see [`Client::submit`]).
struct DieUnlessSent<'a>(Option<&'a Shared>);

impl DieUnlessSent<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DieUnlessSent<'_> {
    fn drop(&mut self) {
        if let Some(shared) = self.0 {
            shared.die("a request was cancelled while being sent".into());
        }
    }
}

fn request(command: Command, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        command,
        cookie: 0,
        offset,
        len: u64::from(len),
    }
}

/// The connected socket `fd` as the connection's byte stream
/// ([`QuietSocket`](crate::socket::QuietSocket)), and a duplicate of it
/// for `sendfile` (none if the process is out of descriptors).
fn quiet(fd: OwnedFd, server: &SocketAddress) -> Result<(Box<dyn Stream>, Option<OwnedFd>)> {
    let dup = crate::socket::duplicate(&fd);
    let stream = crate::socket::QuietSocket::new(fd).map_err(|e| connect_error(server, e))?;
    Ok((Box::new(stream), dup))
}

fn connect_error(server: &SocketAddress, e: io::Error) -> Error {
    let msg = e.to_string();
    let msg = msg.split(" (os error").next().unwrap_or(&msg).to_owned();
    Error::Refused(format!("Failed to connect to '{server}': {msg}"))
}

/// An error the server sent for a request (`errno` on the wire).
fn server_error(errno: u32, message: &str) -> Error {
    let text = io::Error::from_raw_os_error(errno as i32).to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
    let message = if message.is_empty() {
        format!("server reported: {text}")
    } else {
        format!("server reported: {message} ({text})")
    };
    Error::Request {
        errno: errno as i32,
        message,
    }
}

struct Handshake {
    size: u64,
    flags: u16,
    block_sizes: BlockSizes,
    structured: bool,
    contexts: Vec<(u32, String)>,
}

/// Reads the server's greeting and sends the client's flags (the
/// handshake ends with GO, so whether zeroes follow EXPORT_NAME's reply
/// does not matter).
async fn greeting<R, W>(r: &mut R, w: &mut W) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |e: io::Error| Error::Disconnected(format!("during the handshake: {e}"));
    let magic = r.read_u64().await.map_err(io)?;
    if magic != NBD_MAGIC {
        return Err(Error::Refused("not an NBD server (bad magic)".into()));
    }
    if r.read_u64().await.map_err(io)? != IHAVEOPT {
        return Err(Error::Refused(
            "the server only speaks the oldstyle handshake".into(),
        ));
    }
    let server_flags = r.read_u16().await.map_err(io)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Refused(
            "the server does not speak the fixed newstyle handshake".into(),
        ));
    }
    let mut cflags = CLIENT_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        cflags |= CLIENT_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes()).await.map_err(io)?;
    Ok(())
}

type Halves = (
    BufReader<tokio::io::ReadHalf<Box<dyn Stream>>>,
    tokio::io::WriteHalf<Box<dyn Stream>>,
);

/// STARTTLS, then the TLS handshake; the halves of the TLS stream.
async fn start_tls(
    mut r: BufReader<tokio::io::ReadHalf<Box<dyn Stream>>>,
    mut w: tokio::io::WriteHalf<Box<dyn Stream>>,
    tls: &crate::tls::ClientTls,
    options: &ClientOptions,
) -> Result<Halves> {
    let (h, p) = option(&mut r, &mut w, opt::STARTTLS, &[]).await?;
    if h.reply != rep::ACK {
        return Err(Error::Tls(format!(
            "the server refused to start TLS: {}",
            String::from_utf8_lossy(&p)
        )));
    }
    if !r.buffer().is_empty() {
        return Err(Error::Refused(
            "the server sent data before the TLS handshake".into(),
        ));
    }
    let name = match (&options.tls_hostname, &options.server) {
        (Some(h), _) => h.clone(),
        (None, SocketAddress::Inet { host, .. }) => host.clone(),
        (None, SocketAddress::Unix { .. }) => "localhost".to_owned(),
    };
    let server_name = rustls_pki_types::ServerName::try_from(name.clone())
        .map_err(|_| Error::Tls(format!("'{name}' is not a host name for TLS")))?;
    let stream = r.into_inner().unsplit(w);
    let stream = tls
        .connector()
        .connect(server_name, stream)
        .await
        .map_err(|e| Error::Tls(format!("handshake with the server failed: {e}")))?;
    let stream: Box<dyn Stream> = Box::new(stream);
    let (r, w) = tokio::io::split(stream);
    Ok((BufReader::new(r), w))
}

async fn handshake<R, W>(r: &mut R, w: &mut W, options: &ClientOptions) -> Result<Handshake>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (h, _) = option(r, w, opt::STRUCTURED_REPLY, &[]).await?;
    let structured = h.reply == rep::ACK;
    let mut contexts = Vec::new();
    if structured {
        let mut queries = vec![BASE_ALLOCATION.to_owned()];
        queries.extend(options.contexts.iter().cloned());
        let req = MetaContextRequest {
            export: options.export.clone(),
            queries,
        };
        let (mut h, mut p) = option(r, w, opt::SET_META_CONTEXT, &req.encode()).await?;
        while h.reply == rep::META_CONTEXT {
            let mut rd = Reader::new(&p, "meta context reply");
            let id = rd.u32()?;
            let name = String::from_utf8_lossy(rd.rest()).into_owned();
            contexts.push((id, name));
            (h, p) = read_option_reply(r, opt::SET_META_CONTEXT).await?;
        }
    }
    let req = InfoRequest {
        name: options.export.clone(),
        requests: vec![info::BLOCK_SIZE],
    };
    let (mut h, mut p) = option(r, w, opt::GO, &req.encode()).await?;
    let mut export = None;
    let mut block_sizes = BlockSizes {
        minimum: 1,
        preferred: 4096,
        maximum: MAX_PAYLOAD,
    };
    loop {
        match h.reply {
            rep::ACK => break,
            rep::INFO => {
                let mut rd = Reader::new(&p, "INFO reply");
                match rd.u16()? {
                    info::EXPORT => export = Some((rd.u64()?, rd.u16()?)),
                    info::BLOCK_SIZE => {
                        let (minimum, preferred, maximum) = (rd.u32()?, rd.u32()?, rd.u32()?);
                        if !minimum.is_power_of_two() || minimum > 64 * 1024 || maximum < minimum {
                            return Err(Error::Refused(format!(
                                "the server sent invalid block sizes \
                                 {minimum}/{preferred}/{maximum}"
                            )));
                        }
                        block_sizes = BlockSizes {
                            minimum,
                            preferred,
                            // A multiple of the minimum, at most 32 MiB.
                            maximum: maximum.min(MAX_PAYLOAD) / minimum * minimum,
                        };
                    }
                    _ => {}
                }
            }
            rep::ERR_UNKNOWN => {
                return Err(Error::Refused(format!(
                    "Requested export not available: server reported: {}",
                    String::from_utf8_lossy(&p)
                )));
            }
            other if other & (1 << 31) != 0 => {
                return Err(Error::Refused(format!(
                    "server refused the export ({other:#x}): {}",
                    String::from_utf8_lossy(&p)
                )));
            }
            _ => {}
        }
        (h, p) = read_option_reply(r, opt::GO).await?;
    }
    let (size, flags) =
        export.ok_or_else(|| Error::Refused("the server sent no export size".into()))?;
    Ok(Handshake {
        size,
        flags,
        block_sizes,
        structured,
        contexts,
    })
}

/// Sends an option and reads the first reply to it.
async fn option<R, W>(
    r: &mut R,
    w: &mut W,
    option: u32,
    data: &[u8],
) -> Result<(OptionReplyHeader, Vec<u8>)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |e: io::Error| Error::Disconnected(format!("during the handshake: {e}"));
    let h = OptionHeader {
        option,
        len: data.len() as u32,
    };
    w.write_all(&h.encode()).await.map_err(io)?;
    w.write_all(data).await.map_err(io)?;
    w.flush().await.map_err(io)?;
    read_option_reply(r, option).await
}

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    option: u32,
) -> Result<(OptionReplyHeader, Vec<u8>)> {
    let io = |e: io::Error| Error::Disconnected(format!("during the handshake: {e}"));
    let mut b = [0u8; OptionReplyHeader::SIZE];
    r.read_exact(&mut b).await.map_err(io)?;
    let h = OptionReplyHeader::parse(&b)?;
    if h.option != option {
        return Err(Error::Refused(format!(
            "the server answered option {} to option {option}",
            h.option
        )));
    }
    if h.len > crate::proto::MAX_OPTION {
        return Err(Error::Refused("option reply too long".into()));
    }
    let mut p = vec![0u8; h.len as usize];
    r.read_exact(&mut p).await.map_err(io)?;
    Ok((h, p))
}

/// The reply reader: runs until the connection fails, then fails every
/// request in flight.
async fn read_replies(shared: Arc<Shared>, mut r: BufReader<ReadHalf<Box<dyn Stream>>>) {
    let why = loop {
        if let Err(e) = read_reply(&shared, &mut r).await {
            break e;
        }
    };
    shared.die(why);
}

/// Reads one reply (or one chunk) and delivers it. An `Err` is fatal for the
/// connection.
async fn read_reply<R: AsyncRead + Unpin>(
    shared: &Shared,
    r: &mut R,
) -> std::result::Result<(), String> {
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
        _ => e.to_string(),
    };
    let mut head = [0u8; 16];
    r.read_exact(&mut head).await.map_err(io)?;
    let start = ReplyStart::parse(&head).map_err(|e| e.to_string())?;
    let cookie = match start {
        ReplyStart::Simple { cookie, .. } | ReplyStart::Structured { cookie, .. } => cookie,
    };
    let mut waiter = shared
        .lock()
        .waiters
        .remove(&cookie)
        .ok_or_else(|| format!("reply to unknown cookie {cookie}"))?;
    let done = deliver(r, start, &mut waiter).await;
    match done {
        Ok(true) => waiter.finish(),
        Ok(false) => {
            shared.lock().waiters.insert(cookie, waiter);
        }
        Err(e) => {
            // Back in the map, so that failing the connection answers it
            // (with the caller's buffer).
            shared.lock().waiters.insert(cookie, waiter);
            return Err(e);
        }
    }
    Ok(())
}

/// Reads the rest of a reply that starts with `start` into `waiter`;
/// whether it was the last chunk.
async fn deliver<R: AsyncRead + Unpin>(
    r: &mut R,
    start: ReplyStart,
    waiter: &mut Waiter,
) -> std::result::Result<bool, String> {
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
        _ => e.to_string(),
    };
    Ok(match start {
        ReplyStart::Simple { error, .. } => {
            if error != 0 {
                waiter.set_error(server_error(error, ""));
            } else if let Waiter::Read {
                at,
                len,
                buf,
                covered,
                ..
            } = waiter
            {
                r.read_exact(&mut buf.as_mut_slice()[*at..*at + *len])
                    .await
                    .map_err(io)?;
                covered.push((0, *len as u64));
            }
            true
        }
        ReplyStart::Structured { flags, kind, .. } => {
            let len = r.read_u32().await.map_err(io)?;
            read_chunk(r, waiter, kind, len).await?;
            flags & chunk::FLAG_DONE != 0
        }
    })
}

/// Whether `o..o + n` lies inside the read `offset..offset + len`.
fn inside(o: u64, n: u64, offset: u64, len: usize) -> bool {
    o >= offset
        && o.checked_add(n)
            .is_some_and(|end| end <= offset + len as u64)
}

async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    waiter: &mut Waiter,
    kind: u16,
    len: u32,
) -> std::result::Result<(), String> {
    let io = |e: io::Error| e.to_string();
    match (kind, &mut *waiter) {
        (
            chunk::OFFSET_DATA | chunk::OFFSET_HOLE,
            Waiter::Read {
                offset,
                at,
                len: want,
                buf,
                covered,
                ..
            },
        ) => {
            let data = kind == chunk::OFFSET_DATA;
            if !data && len != 12 {
                return Err("bad hole chunk".into());
            }
            let o = r.read_u64().await.map_err(io)?;
            let n = if data {
                u64::from(len.checked_sub(8).ok_or("data chunk too short")?)
            } else {
                u64::from(r.read_u32().await.map_err(io)?)
            };
            if !inside(o, n, *offset, *want) {
                return Err(format!("chunk {o}+{n} outside the read"));
            }
            let from = *at + (o - *offset) as usize;
            let target = &mut buf.as_mut_slice()[from..from + n as usize];
            if data {
                r.read_exact(target).await.map_err(io)?;
            } else {
                target.fill(0);
            }
            covered.push((o - *offset, o - *offset + n));
        }
        (chunk::BLOCK_STATUS, Waiter::Status { got, .. }) => {
            if len < 4 || (len - 4) % 8 != 0 || len > 8 * 1024 * 1024 {
                return Err("bad block status chunk".into());
            }
            let mut p = vec![0u8; len as usize];
            r.read_exact(&mut p).await.map_err(io)?;
            let mut rd = Reader::new(&p, "block status chunk");
            let id = rd.u32().map_err(|e| e.to_string())?;
            let mut extents = Vec::with_capacity((len as usize - 4) / 8);
            while let (Ok(l), Ok(f)) = (rd.u32(), rd.u32()) {
                extents.push((l, f));
            }
            got.push((id, extents));
        }
        (chunk::ERROR | chunk::ERROR_OFFSET, _) => {
            if !(6..=64 * 1024).contains(&len) {
                return Err("bad error chunk".into());
            }
            let mut p = vec![0u8; len as usize];
            r.read_exact(&mut p).await.map_err(io)?;
            let mut rd = Reader::new(&p, "error chunk");
            let errno = rd.u32().map_err(|e| e.to_string())?;
            let n = rd.u16().map_err(|e| e.to_string())?;
            let msg = rd
                .bytes(usize::from(n))
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .map_err(|e| e.to_string())?;
            waiter.set_error(server_error(errno.max(1), &msg));
        }
        (chunk::NONE, _) if len == 0 => {}
        (k, _) if k & (1 << 15) != 0 => {
            return Err(format!("unknown error chunk type {k}"));
        }
        (k, _) => {
            // A chunk this request cannot have: the server is confused.
            return Err(format!("unexpected chunk type {k} of {len} bytes"));
        }
    }
    Ok(())
}
