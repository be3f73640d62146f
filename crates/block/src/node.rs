//! A node of the block graph and the requests that enter it.
//!
//! Every request is bounds-checked against the node's length, refused on a
//! read-only node if it writes, and aligned for the driver. Write-type
//! requests (write, write-zeroes, discard) pass the node's *write tracking*:
//! the recording bitmaps are marked before the request is issued and again
//! when it completes, and registered [`WriteHook`]s run around it.

use std::future::Future;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::bitmaps::Bitmaps;
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::inflight::{Inflight, RequestKind};
use crate::options::{DetectZeroes, Discard};

/// A boxed, sendable future: what driver and hook methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A result that also hands back the request's buffer.
pub type BufResult<T> = (Result<T>, IoBuf);

/// Constraints a driver puts on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths must be multiples of this (a power of two).
    pub request_alignment: u64,
    /// Buffer addresses must be multiples of this (a power of two).
    pub memory_alignment: usize,
    /// Cluster size of the format, when it has one.
    pub cluster_size: Option<u64>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            request_alignment: 1,
            memory_alignment: 1,
            cluster_size: None,
        }
    }
}

/// Allocation status of a range, QEMU's `block-status` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// Reading returns data stored here (not a hole).
    pub data: bool,
    /// Reading returns zeroes.
    pub zero: bool,
    /// Allocated in this node (as opposed to a backing node).
    pub allocated: bool,
    /// Number of nodes down the chain where the status comes from (1: this
    /// node).
    pub depth: u32,
}

/// A range of a node whose bytes the page cache of a host file held when
/// [`Node::cached_range`] looked: the kernel can send them to a socket
/// itself (`sendfile`), with no copy through our memory and, as long as the
/// pages stay cached, no wait for the disk.
#[derive(Debug)]
pub struct CachedRange<'a> {
    node: &'a Node,
    offset: u64,
    host: HostRange,
}

impl CachedRange<'_> {
    /// The range's length in bytes.
    pub fn len(&self) -> u64 {
        self.host.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.host.len == 0
    }

    /// Sends bytes `done..` of the range to the stream socket `socket`, as
    /// many as the socket takes without waiting (it must be non-blocking):
    /// the number sent, `Ok(0)` if the file ended first (it shrank), or
    /// `WouldBlock` when the socket is full.
    ///
    /// While the kernel reads, this is a read of the node in flight,
    /// registered as [`Node::read_into`] registers one; not while the caller
    /// waits for room in the socket, so a peer that stops reading holds up
    /// no job. The socket may keep references to the cached pages rather
    /// than copies until the peer receives them, so a write that completes
    /// after this returns may still show in bytes the peer gets: for the
    /// peer, whose read has not completed yet, that is a write overlapping
    /// its read.
    pub async fn send_to(&self, socket: BorrowedFd<'_>, done: u64) -> std::io::Result<usize> {
        let rest = self.host.len.saturating_sub(done);
        if rest == 0 {
            return Ok(0);
        }
        let _req = self
            .node
            .inflight
            .begin(self.offset + done, rest, RequestKind::Read)
            .await;
        let mut at = self.host.offset + done;
        let want = rest.min(1 << 30) as usize;
        loop {
            match rustix::fs::sendfile(socket, &*self.host.file, Some(&mut at), want) {
                Err(rustix::io::Errno::INTR) => continue,
                r => return r.map_err(Into::into),
            }
        }
    }
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// The range may be deallocated instead of written.
    pub may_unmap: bool,
    /// Fail with [`Error::NotSupported`] unless zeroing is fast (no data
    /// written).
    pub fast: bool,
    /// Force unit access: the zeroes are on stable storage at completion.
    pub fua: bool,
}

/// Where a range of a node's bytes lies in a host file that can be read
/// as plain buffered file data: the source side of a copy offload
/// ([`Node::copy_range_to`]). Only the `file` driver makes one (`raw`
/// passes its child's on, shifted); drivers of other crates cannot, but
/// may take one as the source of a write (`nbd` sends it with
/// `sendfile`).
#[derive(Debug, Clone)]
pub struct HostRange {
    pub(crate) file: Arc<std::fs::File>,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl HostRange {
    /// The host file.
    pub fn file(&self) -> &Arc<std::fs::File> {
        &self.file
    }

    /// Where the range starts in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the page cache holds all of the range at the moment of the
    /// call (`cachestat(2)`), so that the kernel reads it without waiting
    /// for the disk: a `sendfile` of it may run on an async runtime's
    /// thread. `false` where the kernel cannot tell.
    pub fn cached(&self) -> bool {
        crate::pagecache::resident(&self.file, self.offset, self.len)
    }
}

/// Bytes waiting in pipes, in order: the payload of a write that came
/// from a socket by `splice(2)` and goes on into a host file the same way
/// ([`Node::write_piped`]), never through memory of ours.
#[derive(Debug, Clone, Default)]
pub struct Piped {
    parts: Vec<(Arc<OwnedFd>, usize)>,
    len: u64,
}

impl Piped {
    /// No bytes yet.
    pub fn new() -> Piped {
        Piped::default()
    }

    /// Adds the next `len` bytes, which wait in the pipe whose read end is
    /// `pipe` (and nothing else does).
    pub fn push(&mut self, pipe: Arc<OwnedFd>, len: usize) {
        self.parts.push((pipe, len));
        self.len += len as u64;
    }

    /// The pipes' read ends and how many bytes each holds, in order.
    pub fn parts(&self) -> &[(Arc<OwnedFd>, usize)] {
        &self.parts
    }

    /// Bytes in all the pipes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the first `len` bytes (at most all) off as a `Piped` of
    /// their own: a pipe may end up in both, its first bytes in the one
    /// taken off, so the two must be drained in order.
    pub(crate) fn split_to(&mut self, len: u64) -> Piped {
        let mut taken = Piped::new();
        while taken.len < len && !self.parts.is_empty() {
            let want = (len - taken.len) as usize;
            let (pipe, n) = &mut self.parts[0];
            if *n <= want {
                let (pipe, n) = self.parts.remove(0);
                taken.push(pipe, n);
            } else {
                taken.push(pipe.clone(), want);
                *n -= want;
            }
        }
        self.len -= taken.len;
        taken
    }
}

/// How [`Node::write_at`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A plain write inside the node.
    Plain,
    /// A format driver's write to its image file, which may grow it.
    Growing,
    /// Compressed clusters.
    Compressed,
}

/// A storage driver: the part of a node that talks to a file, a child or a
/// peer. Requests arrive checked and aligned to [`Driver::limits`].
pub trait Driver: Send + Sync {
    /// QEMU's name of the driver (`file`, `raw`, `null-co`).
    fn name(&self) -> &'static str;
    /// Length in bytes.
    fn length(&self) -> u64;
    /// Alignment constraints and cluster size.
    fn limits(&self) -> Limits;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>>;
    /// Writes `buf` at `offset`.
    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<'_, BufResult<()>>;
    /// Makes `offset..offset + len` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>>;
    /// Deallocates `offset..offset + len` where possible; contents become
    /// unspecified.
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>>;
    /// Makes completed writes durable.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;
    /// The status of the extent that starts at `offset`, at most `len` long.
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>>;
    /// Whether reads past the end succeed (zero-filled), so that the
    /// aligned cover of a read at the end need not be clipped (an
    /// `O_DIRECT` file whose length is not a multiple of the alignment).
    fn reads_past_end(&self) -> bool {
        false
    }
    /// Whether writes past the end extend the node (a writable file), when a
    /// format driver writes its image file past its end.
    fn can_grow(&self) -> bool {
        false
    }
    /// Writes `data` at `offset` (no FUA) on the calling thread, now, if
    /// the driver can without waiting for anything but the kernel's copy
    /// (a small buffered write into the page cache): `Some` with the
    /// result if it wrote, `None` (nothing written) if the write must take
    /// [`write`](Driver::write). The default never writes.
    fn write_now(&self, offset: u64, data: &[u8]) -> Option<Result<()>> {
        let _ = (offset, data);
        None
    }
    /// Whether [`write_compressed`](Driver::write_compressed) works (QEMU's
    /// `bdrv_supports_compressed_writes`).
    fn supports_compressed_writes(&self) -> bool {
        false
    }
    /// Writes `buf` at `offset` compressed: whole clusters (the last one may
    /// end at the end of the node), each stored compressed where that makes
    /// it smaller and as plain data otherwise. Drivers without compression
    /// refuse with [`Error::NotSupported`].
    fn write_compressed(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        let _ = offset;
        Box::pin(async move { (Err(Error::NotSupported("compressed writes")), buf) })
    }
    /// Whether the driver stores persistent bitmaps (at close).
    fn stores_bitmaps(&self) -> bool {
        false
    }
    /// Records durably, before a write-type request on `offset..offset +
    /// len` is issued, that persistent bitmaps may change there (the
    /// activity log that makes them survive a crash): `None` when nothing
    /// needs doing, else what to wait for. Called only while the node has
    /// persistent bitmaps.
    fn log_activity(&self, offset: u64, len: u64) -> Option<BoxFuture<'_, Result<()>>> {
        let _ = (offset, len);
        None
    }
    /// Stores the persistent ones of `bitmaps` if the driver finds it due
    /// (its activity log is getting long, or the set of persistent bitmaps
    /// changed); called after each flush while the node has persistent
    /// bitmaps, and when one is added or removed.
    fn checkpoint<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        let _ = bitmaps;
        Box::pin(async { Ok(()) })
    }
    /// Writes back whatever the driver caches (format metadata) and stores
    /// the persistent ones of `bitmaps` before the node goes away; the node
    /// takes no requests afterwards.
    fn close<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        let _ = bitmaps;
        Box::pin(async { Ok(()) })
    }
    /// How the driver submits I/O (`threads`, `io_uring`), if it does.
    fn engine(&self) -> Option<&'static str> {
        None
    }
    /// The file the driver opened, for protocol drivers that open one.
    fn filename(&self) -> Option<&str> {
        None
    }
    /// Where persistent bitmaps of a format without room for them (`raw`)
    /// over this protocol driver go, if they can go anywhere: see
    /// [`crate::sidecar`].
    fn sidecar_store(&self) -> Option<Box<dyn crate::SidecarStore>> {
        None
    }
    /// The persistent bitmaps the driver found at open, for drivers opened
    /// by a [`crate::DriverFactory`] (the built-in ones load theirs
    /// themselves).
    #[allow(clippy::type_complexity)]
    fn load_bitmaps(
        &self,
    ) -> BoxFuture<'_, Result<Vec<(String, hbitmap::HBitmap, crate::LoadedState)>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// What the driver knows about its image (see [`ImageInfo`]).
    fn image_info(&self) -> ImageInfo {
        ImageInfo::default()
    }
    /// Where `offset..offset + len` lies in a host file a copy offload may
    /// read directly (buffered, no format in between), all of it or
    /// `None`.
    fn host_range(&self, offset: u64, len: u64) -> Option<HostRange> {
        let _ = (offset, len);
        None
    }
    /// Writes the bytes of `source` at `offset` without them passing
    /// through memory of ours (`copy_file_range`, `sendfile`). `Ok(false)` where the
    /// driver cannot: the caller then writes the range itself (a part of
    /// it may have been copied already).
    fn copy_from<'a>(&'a self, offset: u64, source: &'a HostRange) -> BoxFuture<'a, Result<bool>> {
        let _ = (offset, source);
        Box::pin(async { Ok(false) })
    }
    /// Whether [`splice_from`](Driver::splice_from) would take a write of
    /// `offset..offset + len` as things stand (a hint: it may still
    /// refuse).
    fn takes_piped(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
    /// Writes the bytes waiting in `data`'s pipes at `offset` with
    /// `splice`, draining the pipes. `Ok(false)`, with nothing taken from
    /// them, where the driver cannot: the caller then writes the bytes
    /// itself. An error may leave the pipes part drained.
    fn splice_from<'a>(&'a self, offset: u64, data: &'a Piped) -> BoxFuture<'a, Result<bool>> {
        let _ = (offset, data);
        Box::pin(async { Ok(false) })
    }
}

/// What a node's image is like, as QEMU's `query-named-block-nodes`
/// reports it; `None` where the driver has no such notion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// Bytes the image occupies on the host (`actual-size`).
    pub actual_size: Option<u64>,
    /// The format's cluster size.
    pub cluster_size: Option<u64>,
    /// Whether the image is marked dirty (`dirty-flag`).
    pub dirty: Option<bool>,
    /// The backing file name as the image writes it.
    pub backing_filename: Option<String>,
    /// The backing format as the image writes it.
    pub backing_format: Option<String>,
    /// Details of the format.
    pub format_specific: Option<FormatSpecific>,
    /// For a `throttle` filter: its group.
    pub throttle_group: Option<String>,
    /// For `null-co`: its `read-zeroes` option, when given.
    pub read_zeroes: Option<bool>,
    /// For protocol nodes without a file name (`rbd`): the options that
    /// describe the node in a `json:` filename.
    pub description: Option<serde_json::Value>,
    /// The image's snapshots (RBD's), oldest first: name and size.
    pub snapshots: Vec<(String, u64)>,
}

/// Format details (QEMU's `ImageInfoSpecific`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatSpecific {
    /// A host file.
    File,
    /// An RBD image (nothing to say without encryption).
    Rbd,
    /// A qcow2 image.
    Qcow2 {
        /// `0.10` (version 2) or `1.1` (version 3).
        compat: &'static str,
        /// Whether refcount updates may be deferred (version 3 only).
        lazy_refcounts: Option<bool>,
        /// Width of a refcount.
        refcount_bits: u32,
        /// Whether the image was found corrupt (version 3 only).
        corrupt: Option<bool>,
        /// Whether L2 entries have subclusters (version 3 only).
        extended_l2: Option<bool>,
        /// `zlib` or `zstd`.
        compression_type: &'static str,
    },
}

/// What a write-type request does, as hooks see it.
#[derive(Debug, Clone, Copy)]
pub enum WriteKind<'a> {
    /// Data is written.
    Data(&'a IoBuf),
    /// Zeroes are written.
    Zeroes(ZeroFlags),
    /// The range is discarded.
    Discard,
}

/// A write-type request on its way through a node.
#[derive(Debug, Clone, Copy)]
pub struct WriteRequest<'a> {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What is written.
    pub kind: WriteKind<'a>,
}

/// A job's hook on a node's write path. `before` runs after the bitmaps are
/// marked and before the request is issued (copy-before-write saves old data
/// here); `after` runs once it completed, before the request is reported
/// complete (an active mirror writes the same data to its target here).
/// An error from either fails the request.
pub trait WriteHook: Send + Sync {
    /// Runs before the request is issued.
    fn before<'a>(&'a self, node: &'a Node, req: WriteRequest<'a>) -> BoxFuture<'a, Result<()>>;
    /// Runs after the request completed successfully.
    fn after<'a>(&'a self, node: &'a Node, req: WriteRequest<'a>) -> BoxFuture<'a, Result<()>>;
}

/// The role of a child edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildRole {
    /// The protocol layer under a format (`file`).
    File,
    /// The backing image of a format (`backing`).
    Backing,
}

impl ChildRole {
    /// QEMU's name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
        }
    }
}

/// Who holds an [`Edge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    /// Another node, as its child.
    Parent {
        /// The parent's name.
        parent: String,
        /// The child's role.
        role: ChildRole,
    },
    /// An export (NBD), by id.
    Export(String),
    /// A block job, by id.
    Job(String),
}

/// A user's reference to a node. Everything that uses a node (a parent, an
/// export, a job) goes through an edge, so that [`crate::Graph::replace`]
/// can move all users to another node at once (mirror's pivot). While an
/// edge lives, its node cannot be deleted.
#[derive(Debug)]
pub struct Edge {
    node: RwLock<Arc<Node>>,
    user: User,
}

impl Edge {
    /// Attaches `user` to `node`.
    pub fn new(node: &Arc<Node>, user: User) -> Arc<Edge> {
        let edge = Arc::new(Edge {
            node: RwLock::new(node.clone()),
            user,
        });
        node.add_parent(&edge);
        edge
    }

    /// The node this edge points at now.
    pub fn node(&self) -> Arc<Node> {
        self.node.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `f` with the node this edge points at now, which it keeps
    /// pointing at until `f` returns (a [`crate::Graph::replace`] waits):
    /// for short synchronous work, with no reference count taken.
    pub fn with_node<T>(&self, f: impl FnOnce(&Node) -> T) -> T {
        f(&self.node.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Who holds the edge.
    pub fn user(&self) -> &User {
        &self.user
    }

    pub(crate) fn point_at(&self, node: &Arc<Node>) {
        *self.node.write().unwrap_or_else(|e| e.into_inner()) = node.clone();
    }
}

/// Per-node settings from its options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub read_only: bool,
    pub discard: Discard,
    pub detect_zeroes: DetectZeroes,
    pub direct: bool,
    pub no_flush: bool,
}

/// A node of the block graph: a driver, its children, its bitmaps, and the
/// request path with write tracking.
pub struct Node {
    name: String,
    implicit: bool,
    settings: Settings,
    driver: Box<dyn Driver>,
    children: Vec<(ChildRole, Arc<Edge>)>,
    parents: Mutex<Vec<Weak<Edge>>>,
    gate: Gate,
    bitmaps: Bitmaps,
    hooks: RwLock<Vec<Arc<dyn WriteHook>>>,
    inflight: Inflight,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.name())
            .finish_non_exhaustive()
    }
}

impl Node {
    pub(crate) fn new(
        name: String,
        implicit: bool,
        settings: Settings,
        driver: Box<dyn Driver>,
        children: Vec<(ChildRole, Arc<Edge>)>,
    ) -> Node {
        let bitmaps = Bitmaps::new(&name, driver.length(), driver.limits().cluster_size);
        if driver.stores_bitmaps() && !settings.read_only {
            bitmaps.allow_persistence();
        }
        Node {
            name,
            implicit,
            settings,
            driver,
            children,
            parents: Mutex::new(Vec::new()),
            gate: Gate::default(),
            bitmaps,
            hooks: RwLock::new(Vec::new()),
            inflight: Inflight::default(),
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the node was created inline as another node's child (QEMU:
    /// not owned by the monitor).
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// QEMU's name of the driver.
    pub fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    /// Length in bytes.
    pub fn length(&self) -> u64 {
        self.driver.length()
    }

    /// The file the node's driver opened, if it opened one.
    pub fn filename(&self) -> Option<&str> {
        self.driver.filename()
    }

    /// Where a `raw` parent keeps persistent bitmaps ([`Driver::sidecar_store`]).
    pub fn sidecar_store(&self) -> Option<Box<dyn crate::SidecarStore>> {
        self.driver.sidecar_store()
    }

    /// How the node's driver submits I/O (`threads`, `io_uring`), if it
    /// does I/O itself.
    pub fn engine(&self) -> Option<&'static str> {
        self.driver.engine()
    }

    /// What the node's image is like; the host size comes from the `file`
    /// child when the driver does not know it.
    pub fn image_info(&self) -> ImageInfo {
        let mut info = self.driver.image_info();
        if info.actual_size.is_none() {
            info.actual_size = self
                .children
                .iter()
                .find(|(role, _)| *role == ChildRole::File)
                .and_then(|(_, edge)| edge.node().image_info().actual_size);
        }
        info
    }

    /// The driver's constraints.
    pub fn limits(&self) -> Limits {
        self.driver.limits()
    }

    /// Whether every write is refused.
    pub fn is_read_only(&self) -> bool {
        self.settings.read_only
    }

    /// The node's `detect-zeroes` setting.
    pub fn detect_zeroes(&self) -> DetectZeroes {
        self.settings.detect_zeroes
    }

    /// The node's cache settings: (`cache.direct`, `cache.no-flush`).
    pub fn cache(&self) -> (bool, bool) {
        (self.settings.direct, self.settings.no_flush)
    }

    /// The children, with their roles.
    pub fn children(&self) -> &[(ChildRole, Arc<Edge>)] {
        &self.children
    }

    /// The named and anonymous dirty bitmaps of this node.
    pub fn bitmaps(&self) -> &Bitmaps {
        &self.bitmaps
    }

    /// `block-dirty-bitmap-add`: [`Bitmaps::add`], and a persistent bitmap
    /// is stored with the image at once (so it is crash-safe from now on,
    /// where the driver keeps an activity log).
    pub async fn add_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Result<()> {
        self.bitmaps.add(name, granularity, persistent, disabled)?;
        if persistent {
            self.driver.checkpoint(&self.bitmaps).await?;
        }
        Ok(())
    }

    /// `block-dirty-bitmap-remove`: [`Bitmaps::remove`], and a persistent
    /// bitmap leaves the image at once, as in QEMU.
    pub async fn remove_bitmap(&self, name: &str) -> Result<()> {
        let persistent = self
            .bitmaps
            .info()
            .iter()
            .any(|i| i.name == name && i.persistent);
        self.bitmaps.remove(name)?;
        if persistent {
            self.driver.checkpoint(&self.bitmaps).await?;
        }
        Ok(())
    }

    /// The live edges that point at this node.
    pub fn users(&self) -> Vec<Arc<Edge>> {
        let mut parents = self.parents.lock().unwrap_or_else(|e| e.into_inner());
        parents.retain(|w| w.strong_count() > 0);
        parents.iter().filter_map(Weak::upgrade).collect()
    }

    fn add_parent(&self, edge: &Arc<Edge>) {
        let mut parents = self.parents.lock().unwrap_or_else(|e| e.into_inner());
        parents.retain(|w| w.strong_count() > 0);
        parents.push(Arc::downgrade(edge));
    }

    pub(crate) fn take_parents(&self) -> Vec<Weak<Edge>> {
        std::mem::take(&mut *self.parents.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn adopt_parents(&self, edges: impl IntoIterator<Item = Weak<Edge>>) {
        let mut parents = self.parents.lock().unwrap_or_else(|e| e.into_inner());
        parents.extend(edges);
    }

    /// Registers a hook on the write path; it stays until removed.
    pub fn add_write_hook(&self, hook: Arc<dyn WriteHook>) {
        self.hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    /// Removes a hook added with [`add_write_hook`](Self::add_write_hook).
    pub fn remove_write_hook(&self, hook: &Arc<dyn WriteHook>) {
        self.hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|h| !Arc::ptr_eq(h, hook));
    }

    fn hooks(&self) -> Vec<Arc<dyn WriteHook>> {
        self.hooks.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until, at some moment, no request overlapping
    /// `offset..offset + len` is in flight. New requests may start right
    /// after; a caller that needs the range to stay quiet must keep them out
    /// itself (a job does, through its write hook).
    pub async fn wait_for_overlapping(&self, offset: u64, len: u64) {
        self.inflight.wait_idle(offset, len).await;
    }

    /// Holds new write-type requests (writes, write-zeroes, discards) at
    /// the node's gate and waits until none is running: the quiet moment
    /// a job needs to cut the node over (mirror's pivot). Reads go on.
    /// Holds nest: writes go on once every holder released them.
    pub async fn hold_writes(&self) {
        self.gate.close().await;
    }

    /// Lets write-type requests in again. With `replacement`, the held
    /// ones and every later one that still reaches this node go to
    /// `replacement` instead: users that looked the node up before a
    /// [`Graph::replace`](crate::Graph::replace) lose no write.
    pub fn release_writes(&self, replacement: Option<&Arc<Node>>) {
        self.gate.open(replacement);
    }

    /// Waits until no request at all is in flight.
    pub async fn drain(&self) {
        self.inflight.wait_idle(0, u64::MAX).await;
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.length();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                node: self.name.clone(),
                offset,
                len,
                size,
            }),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.settings.read_only || self.bitmaps.has_readonly() {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        self.check_range(offset, len)
    }

    /// [`check_write`](Self::check_write), past the end too when `growing`
    /// and the driver grows.
    fn check_write_growing(&self, offset: u64, len: u64, growing: bool) -> Result<()> {
        if !(growing && self.driver.can_grow()) {
            return self.check_write(offset, len);
        }
        if self.settings.read_only || self.bitmaps.has_readonly() {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        match offset.checked_add(len) {
            Some(end) if end <= i64::MAX as u64 => Ok(()),
            _ => Err(Error::OutOfRange {
                node: self.name.clone(),
                offset,
                len,
                size: self.length(),
            }),
        }
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        let a = self.limits().request_alignment;
        offset % a == 0 && len % a == 0
    }

    /// Reads `len` bytes at `offset` into a new buffer.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        let buf = IoBuf::zeroed(len, self.limits().memory_alignment);
        let (result, buf) = self.read_into(offset, buf).await;
        result.map(|()| buf)
    }

    /// Fills `buf` from `offset`, handing the buffer back.
    pub async fn read_into(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let len = buf.len() as u64;
        if let Err(e) = self.check_range(offset, len) {
            return (Err(e), buf);
        }
        if len == 0 {
            return (Ok(()), buf);
        }
        let _req = self.inflight.begin(offset, len, RequestKind::Read).await;
        self.read_untracked(offset, buf).await
    }

    /// Reads `len` bytes at `offset` from inside a [`WriteHook`]: the write
    /// that runs the hook already keeps conflicting requests out of its
    /// range (and may hold it exclusively, for a read-modify-write), so this
    /// read does not register itself, and cannot wait for its own write.
    /// Copy-before-write reads the old data with it.
    pub async fn read_in_hook(&self, offset: u64, len: usize) -> Result<IoBuf> {
        let buf = IoBuf::zeroed(len, self.limits().memory_alignment);
        let (result, buf) = self.read_in_hook_into(offset, buf).await;
        result.map(|()| buf)
    }

    /// [`read_in_hook`](Self::read_in_hook) into `buf`, handing it back.
    pub async fn read_in_hook_into(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        if let Err(e) = self.check_range(offset, buf.len() as u64) {
            return (Err(e), buf);
        }
        self.read_untracked(offset, buf).await
    }

    /// A checked, non-empty read, without in-flight registration.
    async fn read_untracked(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return (Ok(()), buf);
        }
        let limits = self.limits();
        if self.aligned(offset, len) && buf.is_aligned(limits.memory_alignment) {
            return self.driver.read(offset, buf).await;
        }
        // Bounce: read the aligned cover, copy out the part asked for.
        let (start, end) = self.cover(offset, len, self.driver.reads_past_end());
        let bounce = IoBuf::zeroed((end - start) as usize, limits.memory_alignment);
        let (result, bounce) = self.driver.read(start, bounce).await;
        let mut buf = buf;
        if result.is_ok() {
            let skip = (offset - start) as usize;
            buf.as_mut_slice()
                .copy_from_slice(&bounce.as_slice()[skip..skip + len as usize]);
        }
        (result, buf)
    }

    /// The aligned range that covers `offset..offset + len`, clipped to the
    /// node's length unless `past_end` (a read the driver zero-fills, a
    /// write that may grow the node).
    fn cover(&self, offset: u64, len: u64, past_end: bool) -> (u64, u64) {
        let a = self.limits().request_alignment;
        let start = offset - offset % a;
        let end = (offset + len).div_ceil(a).saturating_mul(a);
        if past_end {
            return (start, end);
        }
        (start, end.min(self.length()))
    }

    /// Writes `buf` at `offset`, handing the buffer back. With `fua`, the
    /// data is durable when this returns. All-zero data becomes a
    /// write-zeroes request when the node has `detect-zeroes`.
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BufResult<()> {
        self.write_at(offset, buf, fua, Mode::Plain).await
    }

    /// Whether [`write_compressed`](Self::write_compressed) works here.
    pub fn supports_compressed_writes(&self) -> bool {
        self.driver.supports_compressed_writes()
    }

    /// Writes `buf` at `offset` compressed (QEMU's
    /// `BDRV_REQ_WRITE_COMPRESSED`): `offset` and the length must be whole
    /// clusters of the node, except that the last cluster may end at the
    /// end of the node. A cluster compression does not shrink is written as
    /// plain data. Tracking and hooks see an ordinary write.
    pub async fn write_compressed(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        self.write_at(offset, buf, false, Mode::Compressed).await
    }

    /// [`write`](Self::write) for a format driver writing its image file:
    /// past the end too, growing the node, when the driver can grow (a
    /// writable `file`); other nodes refuse that as `write` does. Guests and
    /// exports never write through this.
    pub(crate) async fn write_growing(&self, offset: u64, buf: IoBuf, fua: bool) -> BufResult<()> {
        self.write_at(offset, buf, fua, Mode::Growing).await
    }

    /// Writes `data` at `offset` (no FUA) on the calling thread, now,
    /// when nothing on the way needs a wait: the gate open, the range not
    /// held by a read-modify-write, no write hook (a job's), no
    /// persistent bitmap's activity to log, no `detect-zeroes`, aligned,
    /// and the driver able to write at once ([`Driver::write_now`]; a
    /// `raw` node asks its child the same). Then it does all that
    /// [`write`](Self::write) does (checks, in-flight range, dirty bitmaps
    /// marked before and after) and returns the result; else `None`,
    /// having written nothing, and the caller calls `write`. (Bitmaps may
    /// have been marked: a superset, as a bitmap may be.)
    ///
    /// For requests that the page cache takes in microseconds, where the
    /// futures, boxes and wake-ups of `write` cost more than the copy: an
    /// NBD connection's small writes.
    pub fn try_write_now(&self, offset: u64, data: &[u8]) -> Option<Result<()>> {
        let _inside = self.gate.try_pass()?;
        let len = data.len() as u64;
        if let Err(e) = self.check_write(offset, len) {
            return Some(Err(e));
        }
        if len == 0 || self.settings.detect_zeroes != DetectZeroes::Off {
            return None;
        }
        let a = self.limits().request_alignment;
        if offset % a != 0 || len % a != 0 {
            return None;
        }
        let _req = self.inflight.try_begin(offset, len, RequestKind::Write)?;
        if !self
            .hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return None;
        }
        let ticket = self.bitmaps.mark(offset, len);
        if self.bitmaps.has_persistent() {
            return None;
        }
        let result = self.driver.write_now(offset, data)?;
        self.bitmaps.mark_again(offset, len, ticket);
        Some(result)
    }

    fn write_at(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
        mode: Mode,
    ) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            let _inside = match self.gate.pass().await {
                Ok(inside) => inside,
                Err(node) => return node.write_at(offset, buf, fua, mode).await,
            };
            self.write_inside(offset, buf, fua, mode).await
        })
    }

    async fn write_inside(&self, offset: u64, buf: IoBuf, fua: bool, mode: Mode) -> BufResult<()> {
        let growing = mode == Mode::Growing;
        /// Returns the error together with the buffer.
        macro_rules! check {
            ($e:expr, $buf:expr) => {
                if let Err(e) = $e {
                    return (Err(e), $buf);
                }
            };
        }
        let len = buf.len() as u64;
        check!(self.check_write_growing(offset, len, growing), buf);
        if len == 0 {
            return (Ok(()), buf);
        }
        // (Zeroes past the end of a growing file are written as data.)
        let inside = offset + len <= self.length();
        if self.settings.detect_zeroes != DetectZeroes::Off && inside && buf.is_zero() {
            let may_unmap = self.settings.detect_zeroes == DetectZeroes::Unmap
                && self.settings.discard == Discard::Unmap;
            let flags = ZeroFlags {
                may_unmap,
                fast: false,
                fua,
            };
            return (self.write_zeroes_inside(offset, len, flags).await, buf);
        }
        // Once per request: a passthrough driver (`raw`) asks its child.
        let limits = self.limits();
        let serialising =
            offset % limits.request_alignment != 0 || len % limits.request_alignment != 0;
        let _req = self.begin_write(offset, len, growing, serialising).await;
        let hooks = self.hooks();
        let ticket = match self.mark(offset, len).await {
            Ok(ticket) => ticket,
            Err(e) => return (Err(e), buf),
        };
        for hook in &hooks {
            let req = WriteRequest {
                offset,
                len,
                kind: WriteKind::Data(&buf),
            };
            check!(hook.before(self, req).await, buf);
        }
        let (result, buf) = if mode == Mode::Compressed {
            if buf.is_aligned(limits.memory_alignment) {
                self.driver.write_compressed(offset, buf).await
            } else {
                let copy = IoBuf::copy_from(buf.as_slice(), limits.memory_alignment);
                (self.driver.write_compressed(offset, copy).await.0, buf)
            }
        } else if serialising {
            (self.write_unaligned(offset, &buf, fua, growing).await, buf)
        } else if buf.is_aligned(limits.memory_alignment) {
            self.driver.write(offset, buf, fua).await
        } else {
            let copy = IoBuf::copy_from(buf.as_slice(), limits.memory_alignment);
            (self.driver.write(offset, copy, fua).await.0, buf)
        };
        self.bitmaps.mark_again(offset, len, ticket);
        check!(result, buf);
        for hook in &hooks {
            let req = WriteRequest {
                offset,
                len,
                kind: WriteKind::Data(&buf),
            };
            check!(hook.after(self, req).await, buf);
        }
        (Ok(()), buf)
    }

    /// Registers a write-type request, `serialising` if it is unaligned
    /// ([`aligned`](Self::aligned)): such a one will read, modify and write
    /// its aligned cover, so it excludes every request on that cover until
    /// it is done; an aligned one runs beside others.
    async fn begin_write(
        &self,
        offset: u64,
        len: u64,
        growing: bool,
        serialising: bool,
    ) -> crate::inflight::Guard<'_> {
        if !serialising {
            self.inflight.begin(offset, len, RequestKind::Write).await
        } else {
            let (start, end) = self.cover(offset, len, growing && self.driver.can_grow());
            self.inflight
                .begin(start, end - start, RequestKind::Serialising)
                .await
        }
    }

    /// Read-modify-write of the aligned cover of an unaligned write; the
    /// caller holds a serialising in-flight entry over it.
    async fn write_unaligned(
        &self,
        offset: u64,
        data: &IoBuf,
        fua: bool,
        growing: bool,
    ) -> Result<()> {
        let past_end = growing && self.driver.can_grow();
        let (start, end) = self.cover(offset, data.len() as u64, past_end);
        let limits = self.limits();
        let bounce = IoBuf::zeroed((end - start) as usize, limits.memory_alignment);
        let (result, mut bounce) = self.driver.read(start, bounce).await;
        result?;
        let skip = (offset - start) as usize;
        bounce.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data.as_slice());
        self.driver.write(start, bounce, fua).await.0
    }

    /// Copies `offset..offset + len` of this node to the same range of
    /// `target` inside the kernel (no copy in or out of our memory), when
    /// this node reads the range as a buffered host file (`file`, perhaps
    /// behind `raw`), the target's driver takes such a range (a buffered
    /// `file` with `copy_file_range`, an `nbd` node with `sendfile`) and
    /// nothing on the target's write path needs the data (no
    /// `detect-zeroes`, no write hooks). It is a read of this node (registered as one
    /// unless `in_hook`, see [`read_in_hook`](Self::read_in_hook)) and a
    /// write of the target, with the target's write tracking: its bitmaps
    /// are marked and its gate and in-flight requests respected.
    /// `Ok(false)`: not possible here, and the caller copies through
    /// memory (a part of the range may have been copied already).
    pub async fn copy_range_to(
        &self,
        offset: u64,
        len: u64,
        target: &Node,
        in_hook: bool,
    ) -> Result<bool> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(true);
        }
        let _req = match in_hook {
            true => None,
            false => Some(self.inflight.begin(offset, len, RequestKind::Read).await),
        };
        match self.host_range(offset, len) {
            Some(source) => target.write_copy(offset, &source, false).await,
            None => Ok(false),
        }
    }

    /// Where `offset..offset + len` lies in a host file (see
    /// [`Driver::host_range`]), for a checked, aligned range.
    pub(crate) fn host_range(&self, offset: u64, len: u64) -> Option<HostRange> {
        if self.check_range(offset, len).is_err() || !self.aligned(offset, len) {
            return None;
        }
        self.driver.host_range(offset, len)
    }

    /// `offset..offset + len` of this node as a range of a host file the
    /// page cache holds all of right now (see [`CachedRange`]), or `None`:
    /// the node is not a buffered host file (perhaps behind `raw`), the
    /// range is out of bounds or unaligned, or some of it would come from
    /// the disk.
    pub fn cached_range(&self, offset: u64, len: u64) -> Option<CachedRange<'_>> {
        let host = self.host_range(offset, len)?;
        crate::pagecache::resident(&host.file, host.offset, host.len).then_some(CachedRange {
            node: self,
            offset,
            host,
        })
    }

    /// The write side of [`copy_range_to`](Self::copy_range_to): `source`'s
    /// bytes written at `offset` through the driver's
    /// [`copy_from`](Driver::copy_from); past the end too when `growing`,
    /// as [`write_growing`](Self::write_growing) writes (a format driver
    /// copying into new clusters of its image file).
    pub(crate) fn write_copy<'a>(
        &'a self,
        offset: u64,
        source: &'a HostRange,
        growing: bool,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let _inside = match self.gate.pass().await {
                Ok(inside) => inside,
                Err(node) => return node.write_copy(offset, source, growing).await,
            };
            self.write_moved(offset, source.len, growing, || {
                self.driver.copy_from(offset, source)
            })
            .await
        })
    }

    /// Inside the gate, a write whose data the kernel moves
    /// ([`write_copy`](Self::write_copy), [`write_piped_at`](Self::write_piped_at)):
    /// the checks, the registration and the tracking around `moved`, which
    /// has the driver move the data. `Ok(false)`, before `moved` runs,
    /// where the data must pass through memory.
    async fn write_moved<'a>(
        &'a self,
        offset: u64,
        len: u64,
        growing: bool,
        moved: impl FnOnce() -> BoxFuture<'a, Result<bool>>,
    ) -> Result<bool> {
        self.check_write_growing(offset, len, growing)?;
        if len == 0 {
            return Ok(true);
        }
        if self.settings.detect_zeroes != DetectZeroes::Off || !self.aligned(offset, len) {
            return Ok(false);
        }
        let _req = self
            .begin_write(offset, len, growing, !self.aligned(offset, len))
            .await;
        // Hooks see the data of a write: those writes go through memory.
        if !self.hooks().is_empty() {
            return Ok(false);
        }
        let ticket = self.mark(offset, len).await?;
        let result = moved().await;
        self.bitmaps.mark_again(offset, len, ticket);
        result
    }

    /// Whether a write of `offset..offset + len` may come as pipes
    /// ([`write_piped`](Self::write_piped)) right now: a writable
    /// buffered host file (perhaps behind `raw`), or whole clusters of a
    /// qcow2 image in one; no zero detection, no write hook, an aligned
    /// range inside the node. A caller that checked may still get
    /// `Ok(false)` (a hook came in between).
    pub fn accepts_piped(&self, offset: u64, len: u64) -> bool {
        self.check_write(offset, len).is_ok()
            && self.settings.detect_zeroes == DetectZeroes::Off
            && self.hooks().is_empty()
            && self.aligned(offset, len)
            && self.driver.takes_piped(offset, len)
    }

    /// Writes the bytes waiting in `data`'s pipes at `offset`, moved into
    /// the host file's page cache by the kernel (`splice`), with the
    /// node's write tracking (bitmaps marked, in-flight requests and the
    /// gate respected) as [`write`](Self::write) has. `Ok(false)`, with
    /// nothing taken from the pipes, where that cannot be done (see
    /// [`accepts_piped`](Self::accepts_piped)): the caller then reads them
    /// and writes the bytes itself. After an error the pipes may be part
    /// drained: the bytes are lost, and the range's contents undefined, as
    /// after any failed write.
    pub fn write_piped<'a>(&'a self, offset: u64, data: &'a Piped) -> BoxFuture<'a, Result<bool>> {
        self.write_piped_at(offset, data, false)
    }

    /// [`write_piped`](Self::write_piped); past the end too when
    /// `growing`, as [`write_growing`](Self::write_growing) writes (a
    /// format driver splicing into new clusters of its image file).
    pub(crate) fn write_piped_at<'a>(
        &'a self,
        offset: u64,
        data: &'a Piped,
        growing: bool,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let _inside = match self.gate.pass().await {
                Ok(inside) => inside,
                Err(node) => return node.write_piped_at(offset, data, growing).await,
            };
            self.write_moved(offset, data.len(), growing, || {
                self.driver.splice_from(offset, data)
            })
            .await
        })
    }

    /// Makes `offset..offset + len` read as zeroes.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let _inside = match self.gate.pass().await {
                Ok(inside) => inside,
                Err(node) => return node.write_zeroes(offset, len, flags).await,
            };
            self.write_zeroes_inside(offset, len, flags).await
        })
    }

    async fn write_zeroes_inside(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.settings.discard == Discard::Unmap,
            ..flags
        };
        let _req = self
            .begin_write(offset, len, false, !self.aligned(offset, len))
            .await;
        let req = WriteRequest {
            offset,
            len,
            kind: WriteKind::Zeroes(flags),
        };
        self.tracked(req, self.write_zeroes_aligned(offset, len, flags))
            .await
    }

    /// Zeroes an arbitrary range: the aligned middle through the driver,
    /// unaligned edges as writes of zero bytes.
    async fn write_zeroes_aligned(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let a = self.limits().request_alignment;
        let end = offset + len;
        let mid_start = offset.div_ceil(a).saturating_mul(a).min(end);
        let mid_end = (end - end % a).max(mid_start);
        for (s, e) in [(offset, mid_start), (mid_end, end)] {
            if s < e {
                if flags.fast {
                    return Err(Error::NotSupported("fast zeroing of an unaligned range"));
                }
                self.write_unaligned(s, &IoBuf::zeroed((e - s) as usize, 1), flags.fua, false)
                    .await?;
            }
        }
        if mid_start < mid_end {
            self.driver
                .write_zeroes(mid_start, mid_end - mid_start, flags)
                .await?;
        }
        Ok(())
    }

    /// Discards `offset..offset + len`. With `discard=ignore` (the default)
    /// this does nothing and marks no bitmap, as in QEMU.
    pub fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let _inside = match self.gate.pass().await {
                Ok(inside) => inside,
                Err(node) => return node.discard(offset, len).await,
            };
            self.discard_inside(offset, len).await
        })
    }

    async fn discard_inside(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 || self.settings.discard == Discard::Ignore {
            return Ok(());
        }
        // Only whole aligned blocks can be discarded; the rest stays.
        let a = self.limits().request_alignment;
        let start = offset.div_ceil(a).saturating_mul(a);
        let end = (offset + len) - (offset + len) % a;
        if start >= end {
            return Ok(());
        }
        let _req = self
            .inflight
            .begin(start, end - start, RequestKind::Write)
            .await;
        let req = WriteRequest {
            offset: start,
            len: end - start,
            kind: WriteKind::Discard,
        };
        self.tracked(req, self.driver.discard(start, end - start))
            .await
    }

    /// The first half of write tracking, before a write-type request on
    /// `offset..offset + len` is issued: the recording bitmaps are marked,
    /// and with persistent ones the driver's activity log records the
    /// range durably. The request then ends with `mark_again` and the
    /// ticket.
    async fn mark(&self, offset: u64, len: u64) -> Result<crate::bitmaps::MarkTicket> {
        let ticket = self.bitmaps.mark(offset, len);
        if self.bitmaps.has_persistent() {
            if let Some(logged) = self.driver.log_activity(offset, len) {
                logged.await?;
            }
        }
        Ok(ticket)
    }

    /// Runs a write-type request between the two bitmap marks and the hooks.
    async fn tracked(
        &self,
        req: WriteRequest<'_>,
        request: impl Future<Output = Result<()>>,
    ) -> Result<()> {
        let hooks = self.hooks();
        let ticket = self.mark(req.offset, req.len).await?;
        for hook in &hooks {
            hook.before(self, req).await?;
        }
        let result = request.await;
        self.bitmaps.mark_again(req.offset, req.len, ticket);
        result?;
        for hook in &hooks {
            hook.after(self, req).await?;
        }
        Ok(())
    }

    /// Makes completed writes durable (a no-op with `cache.no-flush`).
    pub async fn flush(&self) -> Result<()> {
        if self.settings.no_flush {
            return Ok(());
        }
        self.driver.flush().await?;
        if self.bitmaps.has_persistent() {
            self.driver.checkpoint(&self.bitmaps).await?;
        }
        Ok(())
    }

    /// Writes back what the driver caches once in-flight requests are
    /// done: the graph calls it when the node is deleted or the graph
    /// closes. Unlike [`flush`](Self::flush), `cache.no-flush` does not
    /// skip it.
    pub async fn close(&self) -> Result<()> {
        self.drain().await;
        self.driver.close(&self.bitmaps).await
    }

    /// The status of `offset..offset + len` as a list of extents that cover
    /// it exactly, in order.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.block_status_upto(offset, len, usize::MAX).await
    }

    /// Like [`block_status`](Self::block_status), but stops after `max`
    /// extents (at least one): they cover a prefix of the range, each
    /// whole (the walk goes on until the status changes). What servers
    /// answer a bounded query with.
    pub async fn block_status_upto(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut extents: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let mut e = self.driver.block_status(pos, end - pos).await?;
            e.offset = pos;
            e.len = e.len.clamp(1, end - pos);
            pos += e.len;
            let full = extents.len() >= max.max(1);
            match extents.last_mut() {
                Some(last) if same_status(last, &e) => last.len += e.len,
                _ if full => break,
                _ => extents.push(e),
            }
        }
        Ok(extents)
    }
}

fn same_status(a: &Extent, b: &Extent) -> bool {
    (a.data, a.zero, a.allocated, a.depth) == (b.data, b.zero, b.allocated, b.depth)
}
