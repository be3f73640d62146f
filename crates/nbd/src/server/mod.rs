//! The NBD server: exports of block nodes over TCP and unix sockets.
//!
//! Guarantees:
//! - every connection is served by its own task; a client that stalls,
//!   vanishes or sends garbage affects only its own connection;
//! - a connection accepted by a listener is served on a thread of its own
//!   (with a single-threaded runtime), not on the runtime that accepted
//!   it (see `Accepted` for why);
//! - a connection may have up to [`MAX_IN_FLIGHT`] requests in flight,
//!   answered as they complete (out of order);
//! - `CAN_MULTI_CONN` is advertised on every export: all connections go to
//!   one node, so a write that completed is visible to every connection and
//!   a flush on any connection makes every completed write durable;
//! - the handshake must end within [`ServerOptions::handshake_timeout`];
//! - with [`ServerOptions::max_connections`] set, further clients wait in
//!   the listen backlog until a connection ends (as QEMU does).

mod export;
mod handshake;
mod piped;
mod transmission;
mod woken;

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use block::Node;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

pub use export::{Export, ExportOptions};

use crate::error::{Error, Result};
use crate::tls::ServerTls;
use handshake::{Outcome, Tls};

/// A connection whose handshake is done, plain or inside TLS.
enum Ready<S> {
    Plain(
        handshake::Negotiated,
        BufReader<ReadHalf<S>>,
        BufWriter<WriteHalf<S>>,
    ),
    Tls(
        handshake::Negotiated,
        BufReader<ReadHalf<tokio_rustls::server::TlsStream<S>>>,
        BufWriter<WriteHalf<tokio_rustls::server::TlsStream<S>>>,
    ),
}

/// Requests in flight per connection (QEMU's `NBD_MAX_REQUESTS`).
pub const MAX_IN_FLIGHT: usize = 16;

/// Settings of a server (`nbd-server-start`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Most connections at once; 0 means no limit (QEMU's default).
    pub max_connections: u32,
    /// How long a client may take to finish the handshake (QEMU: 10 s).
    pub handshake_timeout: Duration,
    /// TLS credentials: with them, clients must start TLS before anything
    /// else (`NBD_REP_ERR_TLS_REQD`).
    pub tls: Option<ServerTls>,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            max_connections: 0,
            handshake_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP host and port (port 0: any free port).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket path; an existing file there is replaced (as QEMU
    /// does).
    Unix(PathBuf),
}

/// How an export is removed (`block-export-del`'s `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Disconnect the clients (after their requests in flight finish).
    Hard,
}

/// An NBD server: a set of exports and the sockets it listens on.
#[derive(Debug, Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    options: ServerOptions,
    /// In the order they were added (LIST shows them so).
    exports: Mutex<Vec<Arc<Export>>>,
    slots: Option<Arc<Semaphore>>,
    listeners: Mutex<Vec<JoinHandle<()>>>,
    /// Turns true when the server stops: every connection closes.
    stop: watch::Sender<bool>,
}

impl Server {
    /// A server with no exports that listens nowhere yet.
    pub fn new(options: ServerOptions) -> Server {
        let slots = (options.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(options.max_connections as usize)));
        Server {
            shared: Arc::new(Shared {
                options,
                exports: Mutex::new(Vec::new()),
                slots,
                listeners: Mutex::new(Vec::new()),
                stop: watch::channel(false).0,
            }),
        }
    }

    /// The server's settings.
    pub fn options(&self) -> &ServerOptions {
        &self.shared.options
    }

    fn lock_exports(&self) -> MutexGuard<'_, Vec<Arc<Export>>> {
        self.shared
            .exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `node` (see [`ExportOptions`]); ids and names are unique.
    pub fn add_export(&self, node: &Arc<Node>, options: ExportOptions) -> Result<Arc<Export>> {
        let mut exports = self.lock_exports();
        if exports.iter().any(|e| e.options().id == options.id) {
            return Err(Error::ExportIdExists(options.id));
        }
        if exports.iter().any(|e| e.options().name == options.name) {
            return Err(Error::ExportNameExists(options.name));
        }
        let export = Arc::new(Export::new(node, options)?);
        exports.push(export.clone());
        Ok(export)
    }

    /// The export with this id.
    pub fn export(&self, id: &str) -> Option<Arc<Export>> {
        self.lock_exports()
            .iter()
            .find(|e| e.options().id == id)
            .cloned()
    }

    /// The exports, in the order they were added.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.lock_exports().clone()
    }

    pub(crate) fn find_by_name(&self, name: &str) -> Option<Arc<Export>> {
        self.lock_exports()
            .iter()
            .find(|e| e.options().name == name && !e.is_removed())
            .cloned()
    }

    /// Removes the export with this id. When this returns `Ok`, no client
    /// uses it any more, its node may be deleted and its bitmaps are no
    /// longer busy.
    pub async fn remove_export(&self, id: &str, mode: RemoveMode) -> Result<()> {
        let export = self
            .export(id)
            .filter(|e| !e.is_removed())
            .ok_or_else(|| Error::ExportNotFound(id.to_owned()))?;
        export.shut_down(mode == RemoveMode::Hard).await?;
        self.lock_exports().retain(|e| !Arc::ptr_eq(e, &export));
        export.release();
        Ok(())
    }

    /// Starts listening; returns where (with the real port when 0 was
    /// asked). Connections are served until [`Server::stop`].
    pub async fn listen(&self, addr: &ListenAddr) -> Result<ListenAddr> {
        let (task, bound) = match addr {
            ListenAddr::Tcp { host, port } => {
                let listener =
                    TcpListener::bind((host.as_str(), *port))
                        .await
                        .map_err(|source| Error::Socket {
                            what: format!("Failed to bind socket to {host}:{port}"),
                            source,
                        })?;
                let local = listener.local_addr().map_err(|source| Error::Socket {
                    what: "Failed to read the bound address".into(),
                    source,
                })?;
                let server = self.clone();
                let task = tokio::spawn(async move {
                    server
                        .accept_loop(|| async {
                            listener.accept().await.map(|(s, _)| {
                                let _ = s.set_nodelay(true);
                                s
                            })
                        })
                        .await
                });
                let bound = ListenAddr::Tcp {
                    host: host.clone(),
                    port: local.port(),
                };
                (task, bound)
            }
            ListenAddr::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path).map_err(|source| Error::Socket {
                    what: format!("Failed to bind socket to {}", path.display()),
                    source,
                })?;
                let server = self.clone();
                let task = tokio::spawn(async move {
                    server
                        .accept_loop(|| async {
                            listener.accept().await.map(|(s, _)| {
                                widen_send_buffer(&s);
                                s
                            })
                        })
                        .await
                });
                (task, addr.clone())
            }
        };
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        Ok(bound)
    }

    async fn accept_loop<S, F, Fut>(&self, mut accept: F)
    where
        S: Accepted,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<S>>,
    {
        loop {
            let permit = match &self.shared.slots {
                Some(slots) => match slots.clone().acquire_owned().await {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
                None => None,
            };
            let stream = match accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("NBD server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.spawn_connection(stream, permit);
        }
    }

    /// Serves `stream` on a thread of its own, with a runtime of its own
    /// ([`Accepted`]); on this runtime where no thread or runtime can be
    /// had. `permit` (a `max-connections` slot) goes with the connection.
    fn spawn_connection<S: Accepted>(&self, stream: S, permit: Option<OwnedSemaphorePermit>) {
        let (hand_over, taken) = std::sync::mpsc::channel::<(S::Detached, _)>();
        let server = self.clone();
        let thread = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .and_then(|runtime| {
                std::thread::Builder::new()
                    .name("nbd-connection".into())
                    .spawn(move || {
                        // Nothing comes when the socket could not be let go
                        // of: the thread just ends.
                        let Ok((detached, permit)) = taken.recv() else {
                            return;
                        };
                        runtime.block_on(async move {
                            match S::attach(detached) {
                                Ok(stream) => server.serve_accepted(stream).await,
                                Err(e) => {
                                    tracing::warn!("NBD server: a connection's socket: {e}")
                                }
                            }
                            drop(permit);
                        });
                    })
            });
        if let Err(e) = thread {
            tracing::warn!("NBD server: no thread for a connection, served on the runtime: {e}");
            let server = self.clone();
            tokio::spawn(async move {
                server.serve_accepted(stream).await;
                drop(permit);
            });
            return;
        }
        match stream.detach() {
            // The thread is waiting: it cannot have gone.
            Ok(detached) => {
                let _ = hand_over.send((detached, permit));
            }
            Err(e) => tracing::warn!("NBD server: cannot hand a connection to its thread: {e}"),
        }
    }

    /// Serves an accepted plain stream socket (see [`serve_socket`]).
    async fn serve_accepted<S: Accepted>(&self, stream: S) {
        // A descriptor of the socket's own, for replies the kernel sends
        // from the page cache (`sendfile`).
        let socket = crate::socket::duplicate(&stream);
        self.serve_socket(stream, socket).await;
    }

    /// Serves one client on `stream` until it disconnects, is told to
    /// close, or breaks the protocol. Never panics on what the client
    /// sends.
    pub async fn serve<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_socket(stream, None).await;
    }

    /// [`serve`](Self::serve), with `socket` a descriptor of the same
    /// socket as `stream` when it is a plain stream socket: replies out of
    /// the page cache then go to it with `sendfile` (not inside TLS).
    async fn serve_socket<S>(&self, stream: S, socket: Option<OwnedFd>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut stop = self.shared.stop.subscribe();
        if *stop.borrow() {
            return;
        }
        let handshake = tokio::time::timeout(
            self.shared.options.handshake_timeout,
            self.handshake(stream),
        );
        let ready = tokio::select! {
            r = handshake => match r {
                Ok(Ok(Some(ready))) => ready,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::debug!("NBD handshake ended: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!("NBD client did not finish the handshake in time");
                    return;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        match ready {
            Ready::Plain(n, reader, writer) => {
                transmission::run(n, reader, writer, socket, stop).await
            }
            Ready::Tls(n, reader, writer) => transmission::run(n, reader, writer, None, stop).await,
        }
    }

    /// The greeting and the option haggling, upgrading to TLS on the way
    /// when the server has credentials; `None` when the client left.
    async fn handshake<S>(&self, stream: S) -> Result<Option<Ready<S>>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        let mut reader = BufReader::with_capacity(transmission::REQUEST_BUFFER, reader);
        let mut writer = BufWriter::with_capacity(transmission::REPLY_BUFFER, writer);
        let no_zeroes = handshake::greet(&mut reader, &mut writer).await?;
        let tls = self.shared.options.tls.clone();
        let state = if tls.is_some() {
            Tls::Required
        } else {
            Tls::Off
        };
        match handshake::negotiate(self, &mut reader, &mut writer, no_zeroes, state).await? {
            Outcome::Export(n) => return Ok(Some(Ready::Plain(n, reader, writer))),
            Outcome::Left => return Ok(None),
            Outcome::StartTls => {}
        }
        let Some(tls) = tls else {
            return Ok(None);
        };
        if !reader.buffer().is_empty() {
            return Err(Error::Refused(
                "the client sent data before the TLS handshake".into(),
            ));
        }
        let stream = reader.into_inner().unsplit(writer.into_inner());
        let stream = tls
            .acceptor()
            .accept(stream)
            .await
            .map_err(|e| Error::Tls(format!("handshake with a client failed: {e}")))?;
        tls.authorize(stream.get_ref().1.peer_certificates())?;
        let (reader, writer) = tokio::io::split(stream);
        let mut reader = BufReader::with_capacity(transmission::REQUEST_BUFFER, reader);
        let mut writer = BufWriter::with_capacity(transmission::REPLY_BUFFER, writer);
        match handshake::negotiate(self, &mut reader, &mut writer, no_zeroes, Tls::Done).await? {
            Outcome::Export(n) => Ok(Some(Ready::Tls(n, reader, writer))),
            Outcome::Left | Outcome::StartTls => Ok(None),
        }
    }

    /// Stops listening and disconnects every client.
    pub fn stop(&self) {
        self.shared.stop.send_replace(true);
        for task in self
            .shared
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

/// What a unix-socket connection asks for as its send buffer (the kernel
/// doubles it, capped by `net.core.wmem_max`: 212 992 bytes on a stock
/// kernel, so about 416 KiB there, twice the default).
///
/// Read replies are sent from the page cache, the pages attached to the
/// socket without a copy; the client's copy out of them is the work. With
/// the default buffer (about 208 KiB, a tenth of `qemu-img convert`'s
/// 2 MiB reads) the server waits for room every few dozen microseconds and
/// the client for the server's next bytes as often: `qemu-img convert` read
/// 4 GiB at 2.5–2.7 GB/s (0.72× `nbdkit`, which copies in parallel while
/// it waits); with this, 6.1 GB/s (1.7×). TCP sockets keep the kernel's
/// own sizing, which a fixed size would turn off.
const UNIX_SEND_BUFFER: usize = 2 << 20;

/// Asks for [`UNIX_SEND_BUFFER`] on a unix-socket connection; a refusal
/// leaves the kernel's default.
fn widen_send_buffer(socket: &impl AsFd) {
    if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(socket, UNIX_SEND_BUFFER) {
        tracing::debug!("NBD server: the send buffer stays as it was: {e}");
    }
}

/// An accepted socket that can leave the runtime that accepted it for the
/// runtime of its connection's own thread.
///
/// Why a thread per connection: on a runtime shared by connections, the
/// client's wake-ups of the server go to whichever worker waits on the
/// runtime's one `epoll`, often on another processor than the client's
/// (an interprocessor interrupt, with both sides idle meanwhile), and its
/// requests' writes come from whichever worker runs it. A connection's own
/// thread waits on its own socket: the kernel wakes it beside the client
/// that sent, and the two take turns on one processor, as with `nbdkit`'s
/// thread per connection (`nbdcopy`, two connections, 4 GiB: 1.70 s with
/// 1.1 s of server CPU against 2.2 s and 1.3 s on the shared runtime; see
/// `docs/benchmarks.md`).
trait Accepted: AsyncRead + AsyncWrite + AsFd + Unpin + Send + Sized + 'static {
    /// The socket while it belongs to no runtime.
    type Detached: Send + 'static;
    /// Lets go of the accepting runtime.
    fn detach(self) -> std::io::Result<Self::Detached>;
    /// Registers with the current runtime (must be called on one).
    fn attach(detached: Self::Detached) -> std::io::Result<Self>;
}

impl Accepted for tokio::net::TcpStream {
    type Detached = std::net::TcpStream;
    fn detach(self) -> std::io::Result<Self::Detached> {
        // Left non-blocking, as `from_std` wants it.
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(detached)
    }
}

impl Accepted for tokio::net::UnixStream {
    type Detached = std::os::unix::net::UnixStream;
    fn detach(self) -> std::io::Result<Self::Detached> {
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        tokio::net::UnixStream::from_std(detached)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_unix_connection_gets_a_wider_send_buffer_up_to_the_kernels_cap() {
        let (server, _client) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        let before = rustix::net::sockopt::socket_send_buffer_size(&server).expect("SO_SNDBUF");
        super::widen_send_buffer(&server);
        let after = rustix::net::sockopt::socket_send_buffer_size(&server).expect("SO_SNDBUF");
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .expect("net.core.wmem_max")
            .trim()
            .parse()
            .expect("a number");
        // The kernel doubles what it is asked for (its bookkeeping).
        assert_eq!(
            after,
            2 * super::UNIX_SEND_BUFFER.min(cap),
            "before: {before}"
        );
        assert!(after > before, "{after} <= {before}");
    }
}
