//! The plain socket under a connection, for what a byte stream cannot do:
//! short writes held back for what follows (`MSG_MORE`), and file bytes
//! sent by the kernel (`sendfile`). Both sides use it on a duplicate of
//! the connection's descriptor, registered with the runtime for
//! writability; never under TLS, which must see every byte. And the
//! client's byte stream itself ([`QuietSocket`]), which asks the runtime
//! about writability only while a write waits for room.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::AsyncWrite;
pub(crate) use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A descriptor of `socket`'s own, which stays valid whatever happens to
/// the stream over it; `None` if the process is out of descriptors (the
/// caller then writes through its stream).
pub(crate) fn duplicate(socket: &impl AsFd) -> Option<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(socket, 0).ok()
}

/// `fd` registered with the current runtime for `interest`; `None` if
/// the runtime refuses it. Must be called on a runtime.
pub(crate) fn register(fd: OwnedFd, interest: Interest) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor that stays open, and is
    // the one `as_raw_fd` returns, until it is dropped, which only the
    // `AsyncFd` can do.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.ok()
}

/// A connected, non-blocking stream socket (unix or TCP) as an async byte
/// stream, registered with the runtime for readability only: it asks for
/// writability, through a duplicate descriptor, only once a write finds
/// no room, and lets go of it at the next flush.
///
/// A socket registered for writability has the runtime woken whenever
/// the room in it grows: on a unix socket, every read by the peer that
/// frees some (the kernel's write-space callback, which runs in the
/// peer's `recv`). An NBD client mostly sends small requests into an
/// empty socket, so nearly all those wake-ups were for nothing, and the
/// server paid for each in its own reads (random 4 KiB writes from our
/// client: 8.6k wake-ups of the client per 200k writes, from the server's
/// thread).
pub(crate) struct QuietSocket {
    fd: AsyncFd<OwnedFd>,
    /// A duplicate of `fd` registered for writability, while writes wait
    /// for room (until the next flush).
    writable: Option<AsyncFd<OwnedFd>>,
}

impl QuietSocket {
    /// Takes `fd`, a connected non-blocking stream socket; must be called
    /// on a runtime.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<QuietSocket> {
        let fd = register(fd, Interest::READABLE)
            .ok_or_else(|| io::Error::other("the runtime refused the socket"))?;
        Ok(QuietSocket { fd, writable: None })
    }

    /// Sends what fits of `bufs` (without waiting); `WouldBlock` if
    /// nothing does.
    fn send(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut control = rustix::net::SendAncillaryBuffer::default();
        let flags = rustix::net::SendFlags::NOSIGNAL;
        loop {
            match rustix::net::sendmsg(self.fd.get_ref(), bufs, &mut control, flags) {
                Err(rustix::io::Errno::INTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }
}

impl AsFd for QuietSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl tokio::io::AsyncRead for QuietSocket {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        loop {
            let mut ready = std::task::ready!(self.fd.poll_read_ready(cx))?;
            let read = ready.try_io(|fd| {
                let unfilled = buf.initialize_unfilled();
                loop {
                    match rustix::net::recv(
                        fd.get_ref(),
                        &mut *unfilled,
                        rustix::net::RecvFlags::empty(),
                    ) {
                        Err(rustix::io::Errno::INTR) => continue,
                        r => return r.map_err(io::Error::from),
                    }
                }
            });
            match read {
                Ok(Ok(n)) => {
                    buf.advance(n.0);
                    return std::task::Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return std::task::Poll::Ready(Err(e)),
                // Not readable after all: readiness cleared, wait again.
                Err(_) => continue,
            }
        }
    }
}

impl AsyncWrite for QuietSocket {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        loop {
            if let Some(writable) = &self.writable {
                let mut ready = std::task::ready!(writable.poll_write_ready(cx))?;
                match ready.try_io(|_| self.send(bufs)) {
                    Ok(r) => return std::task::Poll::Ready(r),
                    Err(_) => continue,
                }
            }
            match self.send(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The duplicate's registration reports the room there
                    // is by then (epoll looks when a descriptor is added),
                    // so none freed meanwhile is missed.
                    let dup = duplicate(&self.fd)
                        .ok_or_else(|| io::Error::other("out of file descriptors"))?;
                    let registered = register(dup, Interest::WRITABLE)
                        .ok_or_else(|| io::Error::other("the runtime refused the socket"))?;
                    self.writable = Some(registered);
                }
                r => return std::task::Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        // Nothing is buffered here; what waited for room went out.
        self.writable = None;
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let r = rustix::net::shutdown(self.fd.get_ref(), rustix::net::Shutdown::Write);
        std::task::Poll::Ready(match r {
            Err(rustix::io::Errno::NOTCONN) => Ok(()),
            r => r.map_err(io::Error::from),
        })
    }
}

/// Writes to a socket with `MSG_MORE`: the kernel may hold a short write
/// back for what follows (TCP), instead of sending it in a packet of its
/// own.
pub(crate) struct More<'a>(pub(crate) &'a AsyncFd<OwnedFd>);

impl AsyncWrite for More<'_> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        loop {
            let mut ready = std::task::ready!(self.0.poll_write_ready(cx))?;
            let sent = ready.try_io(|fd| {
                let mut control = rustix::net::SendAncillaryBuffer::default();
                let more = rustix::net::SendFlags::MORE;
                Ok(rustix::net::sendmsg(fd, bufs, &mut control, more)?)
            });
            if let Ok(result) = sent {
                return std::task::Poll::Ready(result);
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Sends `len` bytes of `file` from `at` to `socket` with `sendfile`, on
/// the calling runtime thread: for a range the page cache holds, which the
/// kernel reads without waiting for the disk. Waits for room in the socket
/// as long as it takes, giving up within a second once `closed` is set.
/// An error after some bytes went out leaves the stream torn: the caller
/// fails the connection.
pub(crate) async fn send_cached(
    socket: &AsyncFd<OwnedFd>,
    file: &File,
    mut at: u64,
    len: u64,
    closed: &AtomicBool,
) -> io::Result<()> {
    let end = at + len;
    while at < end {
        let Ok(ready) = tokio::time::timeout(Duration::from_secs(1), socket.writable()).await
        else {
            if closed.load(Ordering::Relaxed) {
                return Err(io::Error::other("the connection was closed"));
            }
            continue;
        };
        let sent = ready?.try_io(|fd| {
            send_some(fd.get_ref().as_fd(), file, &mut at, end).map_err(io::Error::from)
        });
        match sent {
            Ok(Ok(0)) => return Err(ended()),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(())
}

/// [`send_cached`] on a blocking thread, for a range some of which may
/// come from the disk: waits for room in the socket with `poll`, giving
/// up within a second once `closed` is set.
pub(crate) fn send_blocking(
    socket: &AsyncFd<OwnedFd>,
    file: &File,
    mut at: u64,
    len: u64,
    closed: &AtomicBool,
) -> io::Result<()> {
    let socket = socket.get_ref().as_fd();
    let second = rustix::event::Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    let end = at + len;
    while at < end {
        match send_some(socket, file, &mut at, end) {
            Ok(0) => return Err(ended()),
            Ok(_) => {}
            Err(rustix::io::Errno::AGAIN) => {
                let mut fds = [rustix::event::PollFd::new(
                    &socket,
                    rustix::event::PollFlags::OUT,
                )];
                match rustix::event::poll(&mut fds, Some(&second)) {
                    Ok(0) if closed.load(Ordering::Relaxed) => {
                        return Err(io::Error::other("the connection was closed"));
                    }
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One `sendfile` of what is left of `*at..end` (retried when
/// interrupted), moving `*at` on: the bytes sent, 0 if the file ended.
fn send_some(
    socket: std::os::fd::BorrowedFd<'_>,
    file: &File,
    at: &mut u64,
    end: u64,
) -> rustix::io::Result<usize> {
    let want = (end - *at).min(1 << 30) as usize;
    loop {
        match rustix::fs::sendfile(socket, file, Some(&mut *at), want) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r,
        }
    }
}

/// The error of a file shorter than the payload its header announced.
fn ended() -> io::Error {
    io::Error::other("the file ended before the payload")
}
