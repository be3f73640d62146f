//! Write payloads received into pipes (`splice(2)` from the socket), to be
//! spliced on into a host file: the bytes never pass through memory of
//! ours. Over TCP the kernel moves the received packets' pages into the
//! pipe without copying them, which saves a quarter of the server's CPU
//! per byte written (docs/benchmarks.md).
//!
//! Guarantees:
//! - a payload is taken only whole, and only for a write the export's
//!   node takes from pipes ([`Node::accepts_piped`]); otherwise, or when
//!   pipes run out midway, the payload ends up in memory as before;
//! - bytes the request reader buffered already go first, so the stream
//!   stays in step;
//! - waiting for the client's bytes never blocks a runtime thread, and a
//!   full pipe (no free slot: a pipe of 1 MiB holds 256 packets, however
//!   small) is told apart from an empty socket: the next pipe takes the
//!   rest.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use block::{IoBuf, Node, Piped};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, BufReader};

/// Payloads at least this long are spliced: below, the system calls cost
/// more than the copy they save.
const MIN: u64 = 64 * 1024;
/// Payloads longer than this go through memory (they would take many
/// pipes).
const MAX: u64 = 4 << 20;
/// Whether a payload of `len` bytes is one to splice (by its length).
pub(super) fn worth(len: u64) -> bool {
    (MIN..=MAX).contains(&len)
}

/// What each pipe is asked to hold (Linux's default limit for
/// unprivileged processes); a pipe the kernel keeps smaller just means
/// more pipes per payload.
const PIPE_SIZE: usize = 1 << 20;
/// Most pipes one payload may take before the rest goes through memory
/// (a client sending tiny packets fills a pipe's slots early, and each
/// slot may pin a page).
const MAX_PIPES: usize = 8;
/// Most pipes open in the process: two descriptors each, and the daemon
/// needs descriptors for connections and images too. Past this, payloads
/// go through memory.
const MAX_OPEN: usize = 256;

/// Pipes open in the process.
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// Empty pipes a connection keeps for its next payloads.
const POOL_PIPES: usize = 16;

/// A pipe: its read end, shared with the [`Piped`] handed to the node,
/// and its write end. Counted in [`OPEN`] while it exists.
pub(super) struct Pipe {
    read: Arc<OwnedFd>,
    write: OwnedFd,
    /// Bytes the pipe holds when full, as the kernel sized it (a process
    /// over the pipe-user-pages-soft limit gets two pages).
    capacity: usize,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's empty pipes.
#[derive(Default)]
pub(super) struct Pool(Mutex<Vec<Pipe>>);

impl Pool {
    /// An empty pipe, from the pool or new; `None` when [`MAX_OPEN`] are
    /// open or the process is out of descriptors.
    fn take(&self) -> Option<Pipe> {
        if let Some(p) = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(p);
        }
        if OPEN.fetch_add(1, Ordering::Relaxed) >= MAX_OPEN {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let flags = rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK;
        let Ok((read, write)) = rustix::pipe::pipe_with(flags) else {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            return None;
        };
        // Best effort: a smaller pipe works too.
        let capacity = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))
            .unwrap_or(0);
        Some(Pipe {
            read: Arc::new(read),
            write,
            capacity,
        })
    }

    /// Keeps `pipes`, which must be empty, for later payloads.
    pub(super) fn give_back(&self, pipes: Vec<Pipe>) {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for p in pipes {
            if pool.len() < POOL_PIPES {
                pool.push(p);
            }
        }
    }
}

/// A write's payload.
pub(super) enum Payload {
    /// In memory.
    Buf(IoBuf),
    /// Waiting in pipes: each of them holds the bytes of the [`Piped`]
    /// part of the same index.
    Piped(Vec<Pipe>, Piped),
}

/// Reads a write payload of `len` bytes (between [`MIN`] and [`MAX`]) for
/// `node` at `offset`: into pipes when the node takes them and pipes can
/// be had, `None` (nothing read) otherwise; into memory (aligned to
/// `align`) when the pipes ran out midway. `socket` is the connection's
/// own descriptor, under `reader`.
pub(super) async fn read<R: AsyncRead + Unpin>(
    socket: &AsyncFd<OwnedFd>,
    reader: &mut BufReader<R>,
    pool: &Pool,
    node: &Node,
    offset: u64,
    len: u64,
    align: usize,
) -> io::Result<Option<Payload>> {
    if !worth(len) || !node.accepts_piped(offset, len) {
        return Ok(None);
    }
    let Some(first) = pool.take() else {
        return Ok(None);
    };
    let len = len as usize;
    // What the reader holds already goes first, in one write into the
    // empty pipe: where the pipe cannot take it whole, the payload goes
    // through memory.
    let buffered = reader.buffer();
    let early = buffered.len().min(len);
    if early > first.capacity {
        pool.give_back(vec![first]);
        return Ok(None);
    }
    let mut pipes = vec![first];
    let mut counts = vec![0usize];
    if early > 0 {
        let n = rustix::io::write(&pipes[0].write, &buffered[..early])?;
        if n != early {
            return Err(io::Error::other("an empty pipe took a short write"));
        }
        std::pin::Pin::new(&mut *reader).consume(early);
        counts[0] = early;
    }
    let mut left = len - early;
    // Times in a row the socket said "nothing" while it held bytes and
    // the pipe had room: bytes arriving in between (the next try moves
    // them), or a kernel that will not splice them (after a few tries the
    // rest goes through memory).
    let mut odd = 0;
    while left > 0 {
        let mut ready = socket.readable().await?;
        let last = pipes.len() - 1;
        let flags = rustix::pipe::SpliceFlags::NONBLOCK | rustix::pipe::SpliceFlags::MORE;
        match rustix::pipe::splice(
            socket.get_ref(),
            None,
            &pipes[last].write,
            None,
            left,
            flags,
        ) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                left -= n;
                counts[last] += n;
                odd = 0;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                // Either the socket has nothing yet, or the pipe is full
                // (it has no free slot: not writable). Only we write to it.
                if !full(&pipes[last].write)? {
                    let queued = rustix::io::ioctl_fionread(socket.get_ref()).unwrap_or(0);
                    if queued == 0 {
                        ready.clear_ready();
                        continue;
                    }
                    odd += 1;
                    if odd <= 3 {
                        continue;
                    }
                }
                let next = (odd <= 3 && pipes.len() < MAX_PIPES).then(|| pool.take());
                match next.flatten() {
                    Some(p) => {
                        pipes.push(p);
                        counts.push(0);
                    }
                    None => {
                        let buf = into_memory(reader, &pipes, &counts, len, align).await?;
                        pool.give_back(pipes);
                        return Ok(Some(Payload::Buf(buf)));
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (mut used, mut empty, mut piped) = (Vec::new(), Vec::new(), Piped::new());
    for (p, n) in pipes.into_iter().zip(counts) {
        if n > 0 {
            piped.push(p.read.clone(), n);
            used.push(p);
        } else {
            empty.push(p);
        }
    }
    pool.give_back(empty);
    Ok(Some(Payload::Piped(used, piped)))
}

/// Whether the pipe whose write end is `write` has no room left.
fn full(write: &OwnedFd) -> io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(
        write,
        rustix::event::PollFlags::OUT,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(_) => return Ok(!fds[0].revents().contains(rustix::event::PollFlags::OUT)),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The payload of `len` bytes in memory: what `pipes` hold (`counts`),
/// then the rest from `reader`. The pipes are left empty.
async fn into_memory<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    pipes: &[Pipe],
    counts: &[usize],
    len: usize,
    align: usize,
) -> io::Result<IoBuf> {
    let mut buf = IoBuf::zeroed(len, align);
    let piped: usize = counts.iter().sum();
    drain(pipes, counts, &mut buf.as_mut_slice()[..piped])?;
    reader.read_exact(&mut buf.as_mut_slice()[piped..]).await?;
    Ok(buf)
}

/// Reads what `pipes` hold (`counts`, in order, `out.len()` in all) into
/// `out`, leaving them empty: the bytes are there already, so this never
/// waits.
pub(super) fn drain(pipes: &[Pipe], counts: &[usize], out: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    for (p, n) in pipes.iter().zip(counts) {
        let end = at + n;
        while at < end {
            match rustix::io::read(&*p.read, &mut out[at..end]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => at += k,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// The byte counts of `piped`'s parts, for [`drain`].
pub(super) fn counts(piped: &Piped) -> Vec<usize> {
    piped.parts().iter().map(|(_, n)| *n).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use block::{BlockdevOptions, Graph, Node};
    use tokio::io::{AsyncReadExt, BufReader};

    use super::*;

    const KIB: usize = 1024;

    /// Held by every test here: one of them takes all the process's pipes.
    static PIPES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn pipes_to_myself() -> std::sync::MutexGuard<'static, ()> {
        PIPES.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection's two ends: the server's side as the request reader
    /// sees it (a buffered reader and the registered descriptor), and the
    /// client's, a blocking stream.
    fn connection() -> (
        BufReader<tokio::net::UnixStream>,
        AsyncFd<OwnedFd>,
        std::os::unix::net::UnixStream,
    ) {
        let (server, client) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        server.set_nonblocking(true).expect("a non-blocking socket");
        let server = tokio::net::UnixStream::from_std(server).expect("a tokio socket");
        let fd = crate::socket::duplicate(&server).expect("a descriptor");
        let socket =
            crate::socket::register(fd, tokio::io::Interest::READABLE).expect("registered");
        let reader = BufReader::with_capacity(super::super::transmission::REQUEST_BUFFER, server);
        (reader, socket, client)
    }

    async fn node(dir: &std::path::Path) -> Arc<Node> {
        let path = dir.join("disk");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(8 << 20))
            .expect("a sparse file");
        let g = Graph::new();
        let v = serde_json::json!({"driver": "raw", "node-name": "n",
            "file": {"driver": "file", "filename": path}});
        let options = BlockdevOptions::from_json(&v).expect("valid options");
        g.add(&options).await.expect("the node opens")
    }

    /// The payload after a request header, sent in pieces of `piece`
    /// bytes by a thread: `len` bytes of a pattern, then `tail`.
    fn send(
        mut client: std::os::unix::net::UnixStream,
        len: usize,
        piece: usize,
        tail: &'static [u8],
    ) -> (
        Vec<u8>,
        std::thread::JoinHandle<std::os::unix::net::UnixStream>,
    ) {
        let payload: Vec<u8> = (0..len).map(|i| (i / 512 % 253) as u8 + 1).collect();
        let mut bytes = b"HEADER".to_vec();
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(tail);
        let sender = std::thread::spawn(move || {
            for p in bytes.chunks(piece) {
                client.write_all(p).expect("the server takes the bytes");
            }
            client
        });
        (payload, sender)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// Runs `test` with every pipe of the process to itself, on a node
    /// over a new sparse file and a new [`connection`].
    fn with_connection(
        test: impl AsyncFnOnce(
            Arc<Node>,
            BufReader<tokio::net::UnixStream>,
            AsyncFd<OwnedFd>,
            std::os::unix::net::UnixStream,
        ),
    ) {
        let _pipes = pipes_to_myself();
        let dir = tempfile::tempdir().expect("a temporary directory");
        runtime().block_on(async {
            let node = node(dir.path()).await;
            let (reader, socket, client) = connection();
            test(node, reader, socket, client).await;
        });
    }

    /// Reads the header, then the payload with [`read`]; then what follows
    /// the payload must come next from the reader.
    async fn receive(
        reader: &mut BufReader<tokio::net::UnixStream>,
        socket: &AsyncFd<OwnedFd>,
        pool: &Pool,
        node: &Node,
        len: usize,
    ) -> Payload {
        let mut header = [0u8; 6];
        reader.read_exact(&mut header).await.expect("a header");
        assert_eq!(&header, b"HEADER");
        let payload = read(socket, reader, pool, node, 0, len as u64, 1)
            .await
            .expect("no error")
            .expect("a payload the node takes is read");
        let mut tail = [0u8; 4];
        reader.read_exact(&mut tail).await.expect("the next bytes");
        assert_eq!(&tail, b"TAIL", "the stream stays in step");
        payload
    }

    /// The bytes a payload holds.
    fn bytes(payload: &Payload) -> Vec<u8> {
        match payload {
            Payload::Buf(buf) => buf.as_slice().to_vec(),
            Payload::Piped(pipes, data) => {
                let mut out = vec![0u8; data.len() as usize];
                drain(pipes, &counts(data), &mut out).expect("the pipes hold the bytes");
                out
            }
        }
    }

    #[test]
    fn a_payload_goes_into_pipes_after_the_bytes_the_reader_holds() {
        with_connection(async |node, mut reader, socket, client| {
            let pool = Pool::default();
            // One write: the reader's buffer takes the header and the
            // first bytes of the payload.
            let (sent, sender) = send(client, 512 * KIB, 1 << 20, b"TAIL");
            let payload = receive(&mut reader, &socket, &pool, &node, 512 * KIB).await;
            assert!(matches!(payload, Payload::Piped(..)), "spliced");
            assert_eq!(bytes(&payload), sent);
            drop(sender.join());
        });
    }

    #[test]
    fn a_full_pipe_is_followed_by_another_and_too_many_fall_back_to_memory() {
        with_connection(async |node, mut reader, socket, client| {
            let pool = Pool::default();
            // 512-byte packets: each takes a slot of a pipe, which has 256
            // at most (1 MiB), so 512 KiB take several pipes.
            let (sent, sender) = send(client, 512 * KIB, 512, b"TAIL");
            let payload = receive(&mut reader, &socket, &pool, &node, 512 * KIB).await;
            match &payload {
                Payload::Piped(pipes, _) => assert!(pipes.len() > 1, "{} pipes", pipes.len()),
                Payload::Buf(_) => panic!("512 KiB fit in 8 pipes"),
            }
            assert_eq!(bytes(&payload), sent);
            let client = sender.join().expect("the sender");
            // 4 MiB in 128-byte packets need more than 8 pipes: the
            // payload ends up in memory, whole and in order.
            let (sent, sender) = send(client, 4 << 20, 128, b"TAIL");
            let payload = receive(&mut reader, &socket, &pool, &node, 4 << 20).await;
            assert!(matches!(payload, Payload::Buf(_)), "too many pipes");
            assert_eq!(bytes(&payload), sent);
            drop(sender.join());
        });
    }

    #[test]
    fn what_the_reader_holds_past_an_empty_pipes_capacity_leaves_the_payload_to_it() {
        with_connection(async |node, mut reader, socket, client| {
            // A pipe of one page, as a process past its pipe budget may get.
            let pool = Pool::default();
            let mut small = pool.take().expect("a pipe");
            small.capacity =
                rustix::pipe::fcntl_setpipe_size(&small.write, 4096).expect("a pipe of one page");
            assert_eq!(small.capacity, 4096);
            pool.give_back(vec![small]);
            // One write: the reader's buffer fills with header and payload.
            let (sent, sender) = send(client, 256 * KIB, 1 << 20, b"TAIL");
            let mut header = [0u8; 6];
            reader.read_exact(&mut header).await.expect("a header");
            assert!(
                reader.buffer().len() > 4096,
                "the reader holds more than the pipe"
            );
            let r = read(&socket, &mut reader, &pool, &node, 0, 256 * KIB as u64, 1).await;
            assert!(r.expect("no error").is_none(), "left to the reader");
            assert_eq!(pool.0.lock().expect("the pool").len(), 1, "the pipe kept");
            let mut payload = vec![0u8; 256 * KIB];
            reader.read_exact(&mut payload).await.expect("the payload");
            assert!(payload == sent, "the payload whole, in order");
            let mut tail = [0u8; 4];
            reader.read_exact(&mut tail).await.expect("the next bytes");
            assert_eq!(&tail, b"TAIL");
            drop(sender.join());
        });
    }

    #[test]
    fn a_payload_the_node_does_not_take_is_left_to_the_reader() {
        with_connection(async |node, mut reader, socket, _client| {
            let pool = Pool::default();
            for (offset, len) in [(0, MIN - 512), (0, MAX + 512), (8 << 20, MIN)] {
                // Nothing comes from the client: a read that took the
                // payload would wait for it.
                let r = read(&socket, &mut reader, &pool, &node, offset, len, 1);
                let r = tokio::time::timeout(std::time::Duration::from_secs(5), r)
                    .await
                    .expect("left to the reader, not waited for");
                assert!(r.expect("no error").is_none(), "{offset} {len}");
            }
        });
    }

    #[test]
    fn past_the_process_budget_of_pipes_payloads_are_left_to_the_reader() {
        with_connection(async |node, mut reader, socket, client| {
            // Every pipe the budget allows, and not one more.
            let hoard = Pool::default();
            let mut held = Vec::new();
            while let Some(p) = hoard.take() {
                held.push(p);
                assert!(held.len() <= MAX_OPEN, "past the budget");
            }
            assert_eq!(
                OPEN.load(Ordering::Relaxed),
                MAX_OPEN,
                "out of descriptors first"
            );
            assert_eq!(held.len(), MAX_OPEN);
            // A payload worth splicing is left to the reader, unread.
            let pool = Pool::default();
            let r = read(&socket, &mut reader, &pool, &node, 0, MIN, 1);
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), r)
                .await
                .expect("left to the reader, not waited for");
            assert!(r.expect("no error").is_none(), "a pipe past the budget");
            // Pipes let go of count no more; the next payload is spliced.
            drop(held);
            assert_eq!(OPEN.load(Ordering::Relaxed), 0);
            let (sent, sender) = send(client, 256 * KIB, 1 << 20, b"TAIL");
            let payload = receive(&mut reader, &socket, &pool, &node, 256 * KIB).await;
            assert!(matches!(payload, Payload::Piped(..)), "spliced");
            assert_eq!(bytes(&payload), sent);
            drop(sender.join());
        });
    }
}
