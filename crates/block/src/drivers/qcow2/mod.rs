//! `qcow2`: QEMU's image format (`docs/interop/qcow2.txt`): versions 2 and
//! 3, cluster sizes 512 B to 2 MiB, L1/L2 tables with a bounded L2 cache,
//! zero clusters, zlib-compressed clusters, backing files, refcounts of
//! every width, and persistent dirty bitmaps (see [`persistent`]). Images that
//! need a feature we lack (encryption, an external data file, extended L2
//! entries, zstd) are refused with the feature's name.
//!
//! # Writing
//!
//! Metadata is cached and written back: an allocating write takes clusters
//! from [`Refcounts`] in memory, writes the data (with the parts of its
//! first and last cluster copied from the old contents: the backing chain,
//! zeroes, a compressed or a shared cluster), then points the L2 entries at
//! it in memory. [`Qcow2Driver::write_back`] writes the metadata in the one
//! order that keeps every crash point consistent: refcount blocks, the
//! refcount table, L2 tables, then the L1 table, with a flush of the file
//! between each kind; clusters that lost their last reference are only
//! counted free after the tables that dropped them are durable. A crash
//! can leak clusters, never leave one referenced beyond its refcount.
//!
//! Requests that change a cluster's mapping *claim* its guest clusters, so
//! two of them never allocate the same cluster; requests that read or write
//! a cluster in place hold the *I/O gate*, which freed clusters must pass
//! before they can be reused, so that a late write never lands in a
//! cluster that belongs to someone else by then.

mod activity;
mod header;
mod persistent;
mod refcount;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, RwLock, RwLockReadGuard};

use crate::bitmaps::Bitmaps;
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::node::{
    BoxFuture, BufResult, Driver, Edge, Extent, FormatSpecific, HostRange, ImageInfo, Limits, Node,
    Piped, ZeroFlags,
};

pub(crate) use header::MAGIC;
use header::{AUTOCLEAR_BITMAPS, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, be32, be64, field};
use refcount::Refcounts;

/// Memory for cached L2 tables (QEMU's default maximum): 32 MiB covers
/// 256 GiB of image at 64 KiB clusters.
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Tries for the metadata lock before a request parks on it (a few
/// hundred nanoseconds to a microsecond or two, by the CPU's pause).
const META_SPINS: u32 = 64;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
/// The cluster's refcount is exactly 1: it may be written in place.
const COPIED: u64 = 1 << 63;
const ZERO: u64 = 1;

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Not in this image: the backing node's, or zeroes.
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// At this host offset.
    Data(u64),
    /// Deflated at this host offset, this many bytes.
    Compressed(u64, u64),
}

/// One cached L2 table.
#[derive(Debug)]
struct L2Table {
    entries: Vec<u64>,
    /// Memory is ahead of the file.
    dirty: bool,
}

/// A bounded cache of L2 tables by host offset, first in first out.
#[derive(Debug, Default)]
struct L2Cache {
    tables: HashMap<u64, L2Table>,
    order: VecDeque<u64>,
}

/// The metadata of an open image, behind the driver's lock.
#[derive(Debug)]
struct Meta {
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: L2Cache,
    /// `None` while the image is open read-only.
    refcounts: Option<Refcounts>,
    /// Host clusters that lost a reference in memory: their refcounts drop
    /// once the tables that no longer name them are on disk.
    pending_free: Vec<u64>,
    /// Host clusters the stored bitmaps use (directory, tables, data),
    /// freed when they are stored anew.
    bitmap_clusters: Vec<u64>,
    /// Whether the header has a bitmaps extension now.
    has_bitmaps: bool,
    /// The bitmaps extension as on disk now.
    bitmaps_ext: Option<Vec<u8>>,
    /// The bitmap directory on disk now (0: none), the names of its
    /// bitmaps (sorted) and which of its entries hold consistent bits.
    directory: u64,
    stored_names: Vec<String>,
    stored_consistent: Vec<bool>,
    /// The activity log's areas, once the image has one.
    activity: Option<activity::Areas>,
    /// Where the next compressed cluster may go (0: in a new host cluster):
    /// the free rest of the host cluster the last one went to, whose
    /// refcount counts the compressed clusters in it.
    compressed_tail: u64,
}

/// An open qcow2 image.
#[derive(Debug)]
pub(crate) struct Qcow2Driver {
    node: String,
    file: Arc<Edge>,
    backing: Option<Arc<Edge>>,
    header: Header,
    writable: bool,
    /// L2 tables the cache holds at most.
    l2_capacity: usize,
    /// The metadata. An unfair lock on purpose: tokio's fair mutex hands
    /// the lock to the next waiter on every release, so once a queue forms
    /// (behind an L2 table load) every lookup waits a full round of the
    /// other requests, and a 2-thread runtime did 1.3 threads of reads.
    /// Here the request that runs takes the lock and goes on; the I/O gate
    /// (a tokio lock) spends the task's budget, so none runs forever.
    meta: futures_util::lock::Mutex<Meta>,
    /// Guest cluster ranges `[start, end)` whose mapping a request is
    /// changing.
    claims: Mutex<Vec<(u64, u64)>>,
    claim_released: Notify,
    /// Held shared by requests doing I/O on clusters they looked up, and
    /// exclusively when freed clusters become reusable.
    io_gate: RwLock<()>,
    /// The last compressed cluster inflated, by host offset: small reads
    /// from one compressed cluster inflate it once.
    inflated: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// The activity log's state, and the lock that serialises writing it
    /// (taken before `meta` when both are needed).
    log: Mutex<activity::Log>,
    log_io: tokio::sync::Mutex<()>,
    /// Extents hot in the log's current generation, a bit each.
    hot: Mutex<Vec<u64>>,
}

/// A claim on guest clusters; released (and waiters woken) on drop, also
/// when the request is cancelled.
struct Claim<'a> {
    driver: &'a Qcow2Driver,
    range: (u64, u64),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claims = self.driver.lock_claims();
        if let Some(i) = claims.iter().position(|r| *r == self.range) {
            claims.swap_remove(i);
        }
        drop(claims);
        self.driver.claim_released.notify_waiters();
    }
}

/// What one step of a write does.
enum Step<'a> {
    /// Overwrite `len` bytes at host offset `host`.
    InPlace {
        host: u64,
        len: u64,
        _gate: RwLockReadGuard<'a, ()>,
    },
    /// Write new clusters `first..first + count` at host offset `host`.
    Allocate {
        first: u64,
        count: u64,
        host: u64,
        /// The old entries of the first and the last cluster, for the
        /// bytes the write does not cover.
        head: u64,
        tail: u64,
        _claim: Claim<'a>,
    },
}

impl Qcow2Driver {
    /// Reads and checks the header and the L1 table from `file`; for a
    /// writable open also the refcount table, refusing images that must not
    /// be written as they are.
    pub(crate) async fn open(
        node: &str,
        file: Arc<Edge>,
        writable: bool,
        l2_cache_size: Option<u64>,
    ) -> Result<Qcow2Driver> {
        let child = file.node();
        let file_len = child.length();
        let probe = child
            .read(0, (Header::PROBE as u64).min(file_len) as usize)
            .await?;
        let bits = if probe.len() >= 24 {
            be32(probe.as_slice(), 20)
        } else {
            0
        };
        let first_len = (1u64 << bits.clamp(9, 21)).min(file_len);
        let first = child.read(0, first_len as usize).await?;
        let header = Header::parse(node, first.as_slice(), file_len)?;
        let l1_bytes = child
            .read(header.l1_table_offset, header.l1_size as usize * 8)
            .await?;
        let l1 = l1_bytes
            .as_slice()
            .chunks_exact(8)
            .map(|e| be64(e, 0))
            .collect();
        let refcounts = if writable {
            Some(Self::open_writable(node, &child, &header).await?)
        } else {
            None
        };
        // As QEMU: any size is taken, at least two tables are cached.
        let l2_capacity = (l2_cache_size.unwrap_or(L2_CACHE_BYTES) / header.cluster_size()).max(2);
        let bitmaps_ext = header.bitmaps.clone();
        let extents = header.size.div_ceil(1 << activity::EXTENT_BITS);
        let area_bytes = activity::area_bytes(header.size) as usize;
        Ok(Qcow2Driver {
            node: node.to_owned(),
            file,
            backing: None,
            header,
            writable,
            l2_capacity: l2_capacity as usize,
            meta: futures_util::lock::Mutex::new(Meta {
                l1,
                l1_dirty: false,
                l2: L2Cache::default(),
                refcounts,
                pending_free: Vec::new(),
                bitmap_clusters: Vec::new(),
                has_bitmaps: false,
                bitmaps_ext,
                directory: 0,
                stored_names: Vec::new(),
                stored_consistent: Vec::new(),
                activity: None,
                compressed_tail: 0,
            }),
            log: Mutex::new(activity::Log {
                bits: [vec![0; area_bytes], vec![0; area_bytes]],
                ..activity::Log::default()
            }),
            log_io: tokio::sync::Mutex::new(()),
            hot: Mutex::new(vec![0; extents.div_ceil(64) as usize]),
            claims: Mutex::new(Vec::new()),
            claim_released: Notify::new(),
            io_gate: RwLock::new(()),
            inflated: Mutex::new(None),
        })
    }

    /// Checks that `header` may be written, reads its refcounts and clears
    /// the autoclear features we do not maintain.
    async fn open_writable(node: &str, file: &Node, header: &Header) -> Result<Refcounts> {
        let refuse = |reason: &str| Error::NotWritable {
            node: node.to_owned(),
            reason: reason.to_owned(),
        };
        if header.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(refuse(
                "the image is marked corrupt; repair it with 'qemu-img check -r all'",
            ));
        }
        if header.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(refuse(
                "the image is marked dirty (its lazy refcounts were not written back); \
                 repair it with 'qemu-img check -r all'",
            ));
        }
        if header.nb_snapshots != 0 {
            return Err(Error::UnsupportedFeature {
                node: node.to_owned(),
                feature: "internal snapshots (when writing)".into(),
            });
        }
        let refcounts = Refcounts::open(
            node,
            file,
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
        )
        .await?;
        // Autoclear features are for writers that maintain them: we keep
        // the bitmaps extension valid, and clear the others before the
        // first write.
        let mut keep = 0;
        if header.bitmaps.is_some() {
            keep |= AUTOCLEAR_BITMAPS;
        }
        if header.activity.is_some() {
            keep |= header::AUTOCLEAR_ACTIVITY;
        }
        if header.autoclear & !keep != 0 {
            let autoclear = header.autoclear & keep;
            refcount::write(file, field::AUTOCLEAR, &autoclear.to_be_bytes()).await?;
            file.flush().await?;
        }
        Ok(refcounts)
    }

    /// The backing file name and format the image names, if any.
    pub(crate) fn backing_file(&self) -> Option<(&str, Option<&str>)> {
        let name = self.header.backing_file.as_deref()?;
        Some((name, self.header.backing_format.as_deref()))
    }

    /// Attaches the backing node.
    pub(crate) fn set_backing(&mut self, backing: Arc<Edge>) {
        self.backing = Some(backing);
    }

    fn bad(&self, reason: String) -> Error {
        Error::BadImage {
            node: self.node.clone(),
            format: "qcow2",
            reason,
        }
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn lock_inflated(&self) -> std::sync::MutexGuard<'_, Option<(u64, Arc<Vec<u8>>)>> {
        self.inflated.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The metadata lock. It is mostly held for a lookup of a microsecond,
    /// so a request first tries for a few hundred nanoseconds before it
    /// parks: parking gives the thread away, and on a 2-thread runtime a
    /// parked request whose thread has nothing else to run leaves a core
    /// idle until another thread's wake-up reaches it.
    async fn lock_meta(&self) -> futures_util::lock::MutexGuard<'_, Meta> {
        for _ in 0..META_SPINS {
            if let Some(m) = self.meta.try_lock() {
                return m;
            }
            std::hint::spin_loop();
        }
        self.meta.lock().await
    }

    fn lock_claims(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the metadata once no claim overlaps guest clusters
    /// `start..end`.
    async fn lock_unclaimed(
        &self,
        start: u64,
        end: u64,
    ) -> futures_util::lock::MutexGuard<'_, Meta> {
        loop {
            let meta = self.lock_meta().await;
            let released = self.claim_released.notified();
            tokio::pin!(released);
            {
                let claims = self.lock_claims();
                if !claims.iter().any(|&(s, e)| s < end && start < e) {
                    return meta;
                }
                // Registered before the claim list is unlocked: a release
                // from now on wakes us.
                released.as_mut().enable();
            }
            drop(meta);
            released.await;
        }
    }

    /// Claims guest clusters `start..end`; the caller holds the metadata
    /// lock from [`lock_unclaimed`](Self::lock_unclaimed).
    fn claim(&self, start: u64, end: u64) -> Claim<'_> {
        self.lock_claims().push((start, end));
        Claim {
            driver: self,
            range: (start, end),
        }
    }

    /// Makes sure the L2 table at host offset `offset` is cached, writing
    /// metadata back when the cache is full of changed tables.
    async fn load_l2(&self, m: &mut Meta, offset: u64) -> Result<()> {
        if m.l2.tables.contains_key(&offset) {
            return Ok(());
        }
        let cs = self.cluster_size();
        let file = self.file.node();
        if offset % cs != 0 || offset.saturating_add(cs) > file.length() {
            return Err(self.bad(format!("L2 table at {offset:#x} is outside the file")));
        }
        if m.l2.order.len() >= self.l2_capacity {
            let clean =
                m.l2.order
                    .iter()
                    .position(|o| m.l2.tables.get(o).is_some_and(|t| !t.dirty));
            let victim = match clean {
                Some(i) => i,
                None => {
                    self.write_back(m).await?;
                    0
                }
            };
            if let Some(old) = m.l2.order.remove(victim) {
                m.l2.tables.remove(&old);
            }
        }
        let raw = file.read(offset, cs as usize).await?;
        let entries = raw.as_slice().chunks_exact(8).map(|e| be64(e, 0)).collect();
        m.l2.tables.insert(
            offset,
            L2Table {
                entries,
                dirty: false,
            },
        );
        m.l2.order.push_back(offset);
        Ok(())
    }

    fn l2_index(&self, cluster: u64) -> (usize, usize) {
        let l2_bits = self.header.cluster_bits - 3;
        (
            (cluster >> l2_bits) as usize,
            (cluster & ((1 << l2_bits) - 1)) as usize,
        )
    }

    /// The L1 entry over guest cluster `cluster`, and the cluster's index
    /// in its L2 table.
    fn l1_entry(&self, m: &Meta, cluster: u64) -> Result<(u64, usize, usize)> {
        let (l1_index, l2_index) = self.l2_index(cluster);
        let l1 = *m
            .l1
            .get(l1_index)
            .ok_or_else(|| self.bad(format!("cluster {cluster} is past the L1 table")))?;
        Ok((l1, l1_index, l2_index))
    }

    /// The L2 entry of guest cluster `cluster` (0 where no L2 table is).
    async fn entry(&self, m: &mut Meta, cluster: u64) -> Result<u64> {
        let (l1, _, l2_index) = self.l1_entry(m, cluster)?;
        let l2_offset = l1 & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(0);
        }
        self.load_l2(m, l2_offset).await?;
        Ok(m.l2
            .tables
            .get(&l2_offset)
            .map_or(0, |t| t.entries[l2_index]))
    }

    /// Sets the L2 entry of guest cluster `cluster`, creating its L2 table
    /// if needed; the old entry.
    async fn set_entry(&self, m: &mut Meta, cluster: u64, value: u64) -> Result<u64> {
        let (l1, l1_index, l2_index) = self.l1_entry(m, cluster)?;
        let mut l2_offset = l1 & OFFSET_MASK;
        if l2_offset == 0 {
            let file = self.file.node();
            let refcounts = m.refcounts.as_mut().ok_or_else(|| self.read_only())?;
            l2_offset = refcounts.alloc(&file, 1).await?.0 << self.header.cluster_bits;
            let entries = written_zeroes((self.cluster_size() / 8) as usize);
            m.l2.tables.insert(
                l2_offset,
                L2Table {
                    entries,
                    dirty: true,
                },
            );
            m.l2.order.push_back(l2_offset);
            m.l1[l1_index] = l2_offset | COPIED;
            m.l1_dirty = true;
        } else if l1 & COPIED == 0 {
            return Err(self.bad(format!(
                "L2 table at {l2_offset:#x} is shared (refcount above 1)"
            )));
        }
        self.load_l2(m, l2_offset).await?;
        let table =
            m.l2.tables
                .get_mut(&l2_offset)
                .ok_or_else(|| self.bad(format!("L2 table at {l2_offset:#x} vanished")))?;
        let old = std::mem::replace(&mut table.entries[l2_index], value);
        table.dirty = true;
        Ok(old)
    }

    fn read_only(&self) -> Error {
        Error::ReadOnly(self.node.clone())
    }

    /// What an L2 entry says about its cluster.
    fn decode(&self, entry: u64) -> Result<Mapping> {
        if entry & COMPRESSED != 0 {
            let shift = 62 - (self.header.cluster_bits - 8);
            let host = entry & ((1 << shift) - 1);
            let sectors = ((entry >> shift) & ((1 << (self.header.cluster_bits - 8)) - 1)) + 1;
            return Ok(Mapping::Compressed(host, sectors * 512 - (host & 511)));
        }
        if self.header.version == 3 && entry & ZERO != 0 {
            return Ok(Mapping::Zero);
        }
        match entry & OFFSET_MASK {
            0 => Ok(Mapping::Unallocated),
            host if host % self.cluster_size() != 0 => {
                Err(self.bad(format!("data cluster at {host:#x} is not aligned")))
            }
            host => Ok(Mapping::Data(host)),
        }
    }

    /// Whether a write may overwrite the cluster of `entry` in place.
    fn in_place(&self, entry: u64) -> bool {
        entry & (COMPRESSED | COPIED) == COPIED
            && entry & OFFSET_MASK != 0
            && !(self.header.version == 3 && entry & ZERO != 0)
    }

    /// The host clusters an entry holds a reference to.
    fn referenced(&self, entry: u64) -> Vec<u64> {
        let bits = self.header.cluster_bits;
        match self.decode(entry) {
            Ok(Mapping::Compressed(host, len)) => {
                let start = host & !511;
                let end = host + len;
                ((start >> bits)..end.div_ceil(1 << bits)).collect()
            }
            _ if entry & COMPRESSED == 0 && entry & OFFSET_MASK != 0 => {
                vec![(entry & OFFSET_MASK) >> bits]
            }
            _ => Vec::new(),
        }
    }

    /// How guest bytes from `offset` are stored, and for how many bytes (at
    /// most `max`) they continue the same way: data clusters that follow
    /// each other on the host, zero or unallocated clusters in a row. A
    /// compressed cluster is a run of its own.
    async fn run_at(&self, m: &mut Meta, offset: u64, max: u64) -> Result<(Mapping, u64)> {
        let cs = self.cluster_size();
        let first = offset / cs;
        let mapping = self.decode(self.entry(m, first).await?)?;
        let mut run = (cs - offset % cs).min(max);
        let mut next = first + 1;
        while run < max {
            let continues = match (mapping, self.decode(self.entry(m, next).await?)?) {
                (Mapping::Data(h), Mapping::Data(n)) => n == h + (next - first) * cs,
                (Mapping::Zero, Mapping::Zero) => true,
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            run = (run + cs).min(max);
            next += 1;
        }
        Ok((mapping, run))
    }

    /// Looks up the run at `offset` and enters the I/O gate before the
    /// metadata lock is let go.
    async fn lookup(
        &self,
        offset: u64,
        max: u64,
    ) -> Result<(Mapping, u64, RwLockReadGuard<'_, ()>)> {
        let mut m = self.lock_meta().await;
        let (mapping, run) = self.run_at(&mut m, offset, max).await?;
        let gate = self.io_gate.read().await;
        Ok((mapping, run, gate))
    }

    /// Fills `out` with guest bytes from `offset`, stored as `mapping` says
    /// (a run from [`run_at`](Self::run_at)).
    async fn read_run(&self, offset: u64, mapping: Mapping, out: &mut [u8]) -> Result<()> {
        let cs = self.header.cluster_size();
        let within = offset % cs;
        match mapping {
            Mapping::Zero => out.fill(0),
            Mapping::Data(host) => {
                let data = self.file.node().read(host + within, out.len()).await?;
                out.copy_from_slice(data.as_slice());
            }
            Mapping::Compressed(host, len) => {
                let cached = self
                    .lock_inflated()
                    .as_ref()
                    .filter(|c| c.0 == host)
                    .map(|c| c.1.clone());
                let cluster = match cached {
                    Some(cluster) => cluster,
                    None => {
                        let len = len.min(self.file.node().length().saturating_sub(host));
                        let packed = self.file.node().read(host, len as usize).await?;
                        let cluster = Arc::new(self.inflate(packed.as_slice())?);
                        *self.lock_inflated() = Some((host, cluster.clone()));
                        cluster
                    }
                };
                out.copy_from_slice(&cluster[within as usize..within as usize + out.len()]);
            }
            Mapping::Unallocated => match &self.backing {
                Some(backing) => {
                    let node = backing.node();
                    let have = node.length().saturating_sub(offset).min(out.len() as u64) as usize;
                    if have > 0 {
                        let data = node.read(offset, have).await?;
                        out[..have].copy_from_slice(data.as_slice());
                    }
                    out[have..].fill(0);
                }
                None => out.fill(0),
            },
        }
        Ok(())
    }

    /// Inflates one compressed cluster (raw deflate, as QEMU writes it).
    fn inflate(&self, packed: &[u8]) -> Result<Vec<u8>> {
        let cs = self.header.cluster_size() as usize;
        let mut out = vec![0u8; cs];
        let mut z = flate2::Decompress::new(false);
        match z.decompress(packed, &mut out, flate2::FlushDecompress::Finish) {
            Ok(_) if z.total_out() as usize == cs => Ok(out),
            Ok(_) => Err(self.bad(format!(
                "a compressed cluster inflates to {} bytes, not {cs}",
                z.total_out()
            ))),
            Err(e) => Err(self.bad(format!("a compressed cluster does not inflate: {e}"))),
        }
    }

    async fn read_impl(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let cs = self.cluster_size();
        let len = buf.len() as u64;
        // One run of data clusters: read straight into the caller's buffer.
        match self.lookup(offset, len).await {
            Err(e) => return (Err(e), buf),
            Ok((Mapping::Data(host), run, _gate)) if run == len => {
                return self.file.node().read_into(host + offset % cs, buf).await;
            }
            Ok(_) => {}
        }
        let mut buf = buf;
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let step = match self.lookup(at, len - done).await {
                Ok((mapping, run, _gate)) => {
                    let out = &mut buf.as_mut_slice()[done as usize..(done + run) as usize];
                    self.read_run(at, mapping, out).await.map(|()| run)
                }
                Err(e) => Err(e),
            };
            match step {
                Ok(run) => done += run,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Plans the write of guest bytes `pos..end`: either an in-place run of
    /// clusters, or a run of clusters that need new ones, allocated here.
    async fn plan_write(&self, pos: u64, end: u64) -> Result<Step<'_>> {
        let cs = self.cluster_size();
        let (first, last) = (pos / cs, (end - 1) / cs);
        let mut m = self.lock_unclaimed(first, last + 1).await;
        let entry = self.entry(&mut m, first).await?;
        if self.in_place(entry) {
            let host = entry & OFFSET_MASK;
            if host >= self.file.node().length() {
                return Err(self.bad(format!(
                    "data cluster at {host:#x} is past the end of the file"
                )));
            }
            let mut next = first + 1;
            while next <= last {
                let e = self.entry(&mut m, next).await?;
                if !self.in_place(e) || e & OFFSET_MASK != host + (next - first) * cs {
                    break;
                }
                next += 1;
            }
            let len = (next * cs).min(end) - pos;
            let gate = self.io_gate.read().await;
            return Ok(Step::InPlace {
                host: host + pos % cs,
                len,
                _gate: gate,
            });
        }
        let mut count = 1;
        let mut tail = entry;
        while first + count <= last {
            let e = self.entry(&mut m, first + count).await?;
            if self.in_place(e) {
                break;
            }
            tail = e;
            count += 1;
        }
        let file = self.file.node();
        let refcounts = m.refcounts.as_mut().ok_or_else(|| self.read_only())?;
        let (host, got) = refcounts.alloc(&file, count).await?;
        if got < count {
            // Fewer free clusters in a row than asked for: this step writes
            // as many, and needs the old entry of its own last cluster.
            count = got;
            tail = self.entry(&mut m, first + count - 1).await?;
        }
        let host = host << self.header.cluster_bits;
        let claim = self.claim(first, first + count);
        Ok(Step::Allocate {
            first,
            count,
            host,
            head: entry,
            tail,
            _claim: claim,
        })
    }

    /// Writes `buf` (guest bytes from `offset`), handing it back.
    async fn write_impl(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let cs = self.cluster_size();
        let end = offset + buf.len() as u64;
        let align = self.file.node().limits().memory_alignment;
        let mut buf = buf;
        let mut pos = offset;
        while pos < end {
            let step = match self.plan_write(pos, end).await {
                Ok(step) => step,
                Err(e) => return (Err(e), buf),
            };
            let data = |from: u64, to: u64| {
                &buf.as_slice()[(from - offset) as usize..(to - offset) as usize]
            };
            let result = match step {
                Step::InPlace { host, len, _gate } => {
                    let file = self.file.node();
                    if pos == offset && len == end - offset {
                        return file.write_growing(host, buf, false).await;
                    }
                    let chunk = IoBuf::copy_from(data(pos, pos + len), align);
                    file.write_growing(host, chunk, false).await.0.map(|()| len)
                }
                Step::Allocate {
                    first,
                    count,
                    host,
                    head,
                    tail,
                    _claim,
                } => {
                    let start = first * cs;
                    let stop = (first + count) * cs;
                    let to = stop.min(end);
                    let whole = pos == offset && to == end;
                    let result = if pos == start && to == stop && whole {
                        // Whole clusters: the caller's buffer goes as is.
                        let (r, back) = self.file.node().write_growing(host, buf, false).await;
                        buf = back;
                        r
                    } else {
                        let mut cluster = IoBuf::zeroed((stop - start) as usize, align);
                        let out = cluster.as_mut_slice();
                        out[(pos - start) as usize..(to - start) as usize]
                            .copy_from_slice(data(pos, to));
                        let mut cow = Ok(());
                        if pos > start {
                            cow = self
                                .copy_old(head, start, &mut out[..(pos - start) as usize])
                                .await;
                        }
                        if cow.is_ok() && to < stop {
                            let at = (to - start) as usize;
                            cow = self.copy_old(tail, to, &mut out[at..]).await;
                        }
                        match cow {
                            Ok(()) => self.file.node().write_growing(host, cluster, false).await.0,
                            Err(e) => Err(e),
                        }
                    };
                    self.finish_allocation(first, count, host, result)
                        .await
                        .map(|()| to - pos)
                }
            };
            match result {
                Ok(n) => pos += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Writes `source` at guest `offset` with a kernel copy into the image
    /// file, run by run as [`write_impl`](Self::write_impl) writes: in
    /// place, or into new clusters that are linked in once their data is
    /// there. Whole clusters only: a partial one needs its old bytes around
    /// the new ones, which only memory can put together. `Ok(false)` when
    /// the file will not take the copy (new clusters already taken go
    /// back); the caller then writes the range itself.
    async fn copy_from_impl(&self, offset: u64, source: &HostRange) -> Result<bool> {
        let cs = self.cluster_size();
        let end = offset + source.len;
        if !self.writable || offset % cs != 0 || end % cs != 0 {
            return Ok(false);
        }
        let mut pos = offset;
        while pos < end {
            let step = self.plan_write(pos, end).await?;
            let part = |len: u64| HostRange {
                file: source.file.clone(),
                offset: source.offset + (pos - offset),
                len,
            };
            let file = self.file.node();
            pos += match step {
                Step::InPlace { host, len, _gate } => {
                    if !file.write_copy(host, &part(len), true).await? {
                        return Ok(false);
                    }
                    len
                }
                Step::Allocate {
                    first,
                    count,
                    host,
                    _claim,
                    ..
                } => {
                    // Aligned at both ends: the run is whole clusters.
                    let len = (first + count) * cs - pos;
                    let copied = file.write_copy(host, &part(len), true).await;
                    if let Ok(true) = copied {
                        self.finish_allocation(first, count, host, Ok(())).await?;
                    } else {
                        let undo = Err(Error::NotSupported("copy offload"));
                        let _ = self.finish_allocation(first, count, host, undo).await;
                        return copied;
                    }
                    len
                }
            };
        }
        Ok(true)
    }

    /// Writes the bytes waiting in `data`'s pipes at guest `offset` with
    /// `splice` into the image file, run by run as
    /// [`copy_from_impl`](Self::copy_from_impl) copies (whole clusters
    /// only). `Ok(false)`, with nothing taken from the pipes, when the file
    /// refuses the first run; a refusal after that (a hook came in on the
    /// file midway) is an error, since the bytes before it are gone from
    /// the pipes.
    async fn splice_from_impl(&self, offset: u64, data: &Piped) -> Result<bool> {
        let cs = self.cluster_size();
        let end = offset + data.len();
        if !self.writable || offset % cs != 0 || end % cs != 0 {
            return Ok(false);
        }
        let mut rest = data.clone();
        let mut pos = offset;
        while pos < end {
            let first = pos == offset;
            let refused = || match first {
                true => Ok(false),
                false => Err(Error::NotSupported("splice into the image file midway")),
            };
            let step = self.plan_write(pos, end).await?;
            let file = self.file.node();
            pos += match step {
                Step::InPlace { host, len, _gate } => {
                    if !file.write_piped_at(host, &rest.split_to(len), true).await? {
                        return refused();
                    }
                    len
                }
                Step::Allocate {
                    first: cluster,
                    count,
                    host,
                    _claim,
                    ..
                } => {
                    // Aligned at both ends: the run is whole clusters.
                    let len = (cluster + count) * cs - pos;
                    let spliced = file.write_piped_at(host, &rest.split_to(len), true).await;
                    if let Ok(true) = spliced {
                        self.finish_allocation(cluster, count, host, Ok(())).await?;
                    } else {
                        let undo = Err(Error::NotSupported("splice"));
                        let _ = self.finish_allocation(cluster, count, host, undo).await;
                        spliced?;
                        return refused();
                    }
                    len
                }
            };
        }
        Ok(true)
    }

    /// Writes whole clusters compressed (see [`Driver::write_compressed`]).
    /// Deflating runs on a blocking thread; a cluster it does not shrink
    /// is written as plain data, as QEMU does.
    async fn write_compressed_impl(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let cs = self.cluster_size();
        let len = buf.len() as u64;
        let end = offset + len;
        if offset % cs != 0 || (end % cs != 0 && end != self.header.size) {
            let e = Error::CompressedUnaligned {
                node: self.node.clone(),
                offset,
                len,
                cluster_size: cs,
            };
            return (Err(e), buf);
        }
        let data = buf.as_slice().to_vec();
        let packed = tokio::task::spawn_blocking(move || {
            data.chunks(cs as usize)
                .map(|c| deflate(c, cs as usize))
                .collect::<Vec<_>>()
        })
        .await;
        let packed = match packed {
            Ok(p) => p,
            Err(e) => return (Err(Error::io("compress", std::io::Error::other(e))), buf),
        };
        let align = self.file.node().limits().memory_alignment;
        for (i, packed) in packed.into_iter().enumerate() {
            let at = offset + i as u64 * cs;
            let result = match packed {
                Some(packed) => self.place_compressed(at / cs, &packed).await,
                None => {
                    let from = (at - offset) as usize;
                    let to = ((at + cs).min(end) - offset) as usize;
                    let plain = IoBuf::copy_from(&buf.as_slice()[from..to], align);
                    self.write_impl(at, plain).await.0
                }
            };
            if let Err(e) = result {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// Stores deflated data as guest cluster `cluster`, in whole 512-byte
    /// sectors of its own right after the last compressed cluster when they
    /// fit, dropping the reference the old mapping held.
    async fn place_compressed(&self, cluster: u64, packed: &[u8]) -> Result<()> {
        let bits = self.header.cluster_bits;
        let shift = 62 - (bits - 8);
        let sectors = (packed.len() as u64).div_ceil(512);
        let mut m = self.lock_unclaimed(cluster, cluster + 1).await;
        let _claim = self.claim(cluster, cluster + 1);
        let host = self.alloc_bytes(&mut m, sectors * 512).await?;
        if host >= 1 << shift {
            // Past what an L2 entry can address (petabytes): the bytes stay
            // counted (a leak, the safe direction), and the cluster fails.
            return Err(self.bad(format!(
                "compressed cluster at {host:#x} is past what an L2 entry can address"
            )));
        }
        drop(m);
        let touched = (host >> bits)..=((host + sectors * 512 - 1) >> bits);
        let align = self.file.node().limits().memory_alignment;
        let mut data = IoBuf::zeroed((sectors * 512) as usize, align);
        data.as_mut_slice()[..packed.len()].copy_from_slice(packed);
        let written = self.file.node().write_growing(host, data, false).await.0;
        let mut m = self.lock_meta().await;
        if let Err(e) = written {
            m.compressed_tail = 0;
            let file = self.file.node();
            if let Some(refcounts) = m.refcounts.as_mut() {
                for c in touched {
                    // Failing to give the bytes back only leaks them; the
                    // write's error is the one to report.
                    let _ = refcounts.update(&file, c, -1).await;
                }
            }
            return Err(e);
        }
        let entry = COMPRESSED | ((sectors - 1) << shift) | host;
        {
            // A freed compressed cluster that lived here may still be in
            // the inflated cache.
            let mut cached = self.lock_inflated();
            if cached.as_ref().is_some_and(|c| c.0 == host) {
                *cached = None;
            }
        }
        let old = self.set_entry(&mut m, cluster, entry).await?;
        let freed = self.referenced(old);
        m.pending_free.extend(freed);
        Ok(())
    }

    /// Allocates `len` bytes (whole sectors, less than a cluster) for
    /// compressed data: after the last compressed cluster when they fit in
    /// its host cluster or the one after it is free, else at the start of a
    /// new host cluster. Each host cluster touched gains a reference.
    async fn alloc_bytes(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let file = self.file.node();
        let refcounts = m.refcounts.as_mut().ok_or_else(|| self.read_only())?;
        let tail = m.compressed_tail;
        let host = 'place: {
            if tail != 0 {
                let boundary = (tail >> bits) + 1;
                let room = refcounts.get(&file, tail >> bits).await? < refcounts.max();
                if room
                    && (tail + len <= boundary << bits || refcounts.take(&file, boundary).await?)
                {
                    refcounts.update(&file, tail >> bits, 1).await?;
                    break 'place tail;
                }
            }
            refcounts.alloc(&file, 1).await?.0 << bits
        };
        let next = host + len;
        m.compressed_tail = if next % cs == 0 { 0 } else { next };
        Ok(host)
    }

    /// Fills `out` with the old contents of guest bytes from `offset`, which
    /// the L2 entry `entry` maps.
    async fn copy_old(&self, entry: u64, offset: u64, out: &mut [u8]) -> Result<()> {
        let mapping = self.decode(entry)?;
        let in_image = self
            .header
            .size
            .saturating_sub(offset)
            .min(out.len() as u64) as usize;
        let (inside, beyond) = out.split_at_mut(in_image);
        beyond.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        self.read_run(offset, mapping, inside).await
    }

    /// Points guest clusters `first..first + count` at the new host
    /// clusters from `host` once their data is written (`written` is the
    /// data write's outcome); gives the new clusters back if it failed.
    async fn finish_allocation(
        &self,
        first: u64,
        count: u64,
        host: u64,
        written: Result<()>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let mut m = self.lock_meta().await;
        let file = self.file.node();
        if let Err(e) = written {
            if let Some(refcounts) = m.refcounts.as_mut() {
                for i in 0..count {
                    refcounts
                        .update(&file, (host >> self.header.cluster_bits) + i, -1)
                        .await?;
                }
            }
            return Err(e);
        }
        for i in 0..count {
            let old = self
                .set_entry(&mut m, first + i, (host + i * cs) | COPIED)
                .await?;
            let freed = self.referenced(old);
            m.pending_free.extend(freed);
        }
        Ok(())
    }

    /// The clusters `[start, end)` that a zeroing or discarding request
    /// covers whole; the image's partial last cluster counts as whole when
    /// the request reaches the end of the image.
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.cluster_size();
        let end = offset + len;
        let last = if end == self.header.size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        (offset.div_ceil(cs), last)
    }

    /// Sets the L2 entries of guest clusters `start..end` to what `new`
    /// says for each old entry (`None`: leave it), dropping the references
    /// the old entries held.
    async fn remap(&self, start: u64, end: u64, new: impl Fn(u64) -> Option<u64>) -> Result<()> {
        let mut m = self.lock_unclaimed(start, end).await;
        let _claim = self.claim(start, end);
        for cluster in start..end {
            let old = self.entry(&mut m, cluster).await?;
            let Some(value) = new(old) else {
                continue;
            };
            if value == old {
                continue;
            }
            self.set_entry(&mut m, cluster, value).await?;
            let keeps = value & OFFSET_MASK != 0;
            if !keeps {
                let freed = self.referenced(old);
                m.pending_free.extend(freed);
            }
        }
        Ok(())
    }

    async fn write_zeroes_impl(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let cs = self.cluster_size();
        let end = offset + len;
        let (start, stop) = self.whole_clusters(offset, len);
        let v3 = self.header.version == 3;
        let backing = self.backing.is_some();
        let (mut partial, mut whole) = (Vec::new(), None);
        if start < stop && (v3 || (!backing && flags.may_unmap)) {
            whole = Some((start, stop));
            if offset < start * cs {
                partial.push((offset, start * cs));
            }
            if stop * cs < end {
                partial.push((stop * cs, end));
            }
        } else {
            // Zeroes written as data, a cluster at a time.
            let mut at = offset;
            while at < end {
                let next = ((at / cs + 1) * cs).min(end);
                partial.push((at, next));
                at = next;
            }
        }
        // Parts that already read as zeroes need nothing; the others are
        // written as data, which a fast zeroing request refuses up front.
        let mut writes = Vec::new();
        for (from, to) in partial {
            let reads_zero = {
                let mut m = self.lock_meta().await;
                match self.decode(self.entry(&mut m, from / cs).await?)? {
                    Mapping::Zero => true,
                    Mapping::Unallocated => !backing,
                    _ => false,
                }
            };
            if !reads_zero {
                writes.push((from, to));
            }
        }
        if flags.fast && !writes.is_empty() {
            return Err(Error::NotSupported(
                "fast zeroing of partial qcow2 clusters",
            ));
        }
        if let Some((start, stop)) = whole {
            self.remap(start, stop, |old| {
                if !v3 {
                    return Some(0);
                }
                if old == 0 && !backing {
                    return None;
                }
                if !flags.may_unmap && self.in_place(old) {
                    return Some(old | ZERO);
                }
                Some(ZERO)
            })
            .await?;
        }
        for (from, to) in writes {
            let zeroes = IoBuf::zeroed((to - from) as usize, 1);
            self.write_impl(from, zeroes).await.0?;
        }
        if flags.fua {
            self.flush_impl().await?;
        }
        Ok(())
    }

    async fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        let (start, stop) = self.whole_clusters(offset, len);
        if start >= stop {
            return Ok(());
        }
        // With a backing file, a discarded cluster reads as zeroes rather
        // than showing the backing data again (QEMU does the same).
        let hide = self.header.version == 3 && self.backing.is_some();
        self.remap(start, stop, |old| match old {
            _ if hide => Some(ZERO),
            0 => None,
            _ => Some(0),
        })
        .await
    }

    /// Writes changed metadata back in crash-safe order (see the module
    /// documentation), then lets the clusters freed meanwhile be reused.
    async fn write_back(&self, m: &mut Meta) -> Result<()> {
        let file = self.file.node();
        let cs = self.cluster_size();
        let align = file.limits().memory_alignment;
        loop {
            let Some(refcounts) = m.refcounts.as_mut() else {
                return Ok(());
            };
            let counted = refcounts.write_back(&file).await?;
            let tables: Vec<u64> =
                m.l2.order
                    .iter()
                    .copied()
                    .filter(|o| m.l2.tables.get(o).is_some_and(|t| t.dirty))
                    .collect();
            if counted && (!tables.is_empty() || m.l1_dirty) {
                file.flush().await?;
            }
            for offset in &tables {
                if let Some(t) = m.l2.tables.get_mut(offset) {
                    let bytes: Vec<u8> = t.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
                    debug_assert_eq!(bytes.len() as u64, cs);
                    let (r, _) = file
                        .write_growing(*offset, IoBuf::copy_from(&bytes, align), false)
                        .await;
                    r?;
                    t.dirty = false;
                }
            }
            if m.l1_dirty {
                if !tables.is_empty() {
                    file.flush().await?;
                }
                let bytes: Vec<u8> = m.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
                refcount::write(&file, self.header.l1_table_offset, &bytes).await?;
                m.l1_dirty = false;
            }
            if m.pending_free.is_empty() {
                return Ok(());
            }
            // The tables that dropped these clusters are durable, and no
            // request still does I/O on what it looked up before.
            file.flush().await?;
            let _gate = self.io_gate.write().await;
            let freed = std::mem::take(&mut m.pending_free);
            if m.refcounts.is_none() {
                return Ok(());
            }
            for cluster in freed {
                if cluster == m.compressed_tail >> self.header.cluster_bits {
                    // Its refcount may drop to 0: pack nothing more there.
                    m.compressed_tail = 0;
                }
                if let Some(refcounts) = m.refcounts.as_mut() {
                    refcounts.update(&file, cluster, -1).await?;
                }
            }
        }
    }

    async fn flush_impl(&self) -> Result<()> {
        let mut m = self.lock_meta().await;
        self.write_back(&mut m).await?;
        drop(m);
        self.file.node().flush().await
    }

    /// The status of the run of clusters from `offset` (at most `len`
    /// bytes) that map the same way; unallocated runs take the backing
    /// node's status, one level deeper.
    async fn status_of(&self, offset: u64, len: u64) -> Result<Extent> {
        let cs = self.cluster_size();
        let end = offset + len;
        let (first, run) = {
            let mut m = self.lock_meta().await;
            let first = self.decode(self.entry(&mut m, offset / cs).await?)?;
            if let Mapping::Data(_) = first {
                // Data runs must be contiguous in the file: the file's own
                // status refines them below.
                let (first, run) = self.run_at(&mut m, offset, len).await?;
                drop(m);
                return self.data_status(offset, first, run).await;
            }
            let kind = std::mem::discriminant(&first);
            let mut next = (offset / cs + 1) * cs;
            while next < end
                && std::mem::discriminant(&self.decode(self.entry(&mut m, next / cs).await?)?)
                    == kind
            {
                next += cs;
            }
            (first, next.min(end) - offset)
        };
        let (data, zero, allocated, depth, run) = match first {
            Mapping::Data(_) | Mapping::Compressed(..) => (true, false, true, 1, run),
            Mapping::Zero => (false, true, true, 1, run),
            Mapping::Unallocated => match &self.backing {
                Some(b) if offset < b.node().length() => {
                    let node = b.node();
                    let n = run.min(node.length() - offset);
                    let inner = node.block_status_upto(offset, n, 1).await?;
                    let s = inner
                        .first()
                        .copied()
                        .ok_or(Error::NotSupported("block status of an empty range"))?;
                    let depth = if s.depth == 0 { 0 } else { s.depth + 1 };
                    (s.data, s.zero, false, depth, s.len)
                }
                _ => (false, true, false, 0, run),
            },
        };
        Ok(Extent {
            offset,
            len: run,
            data,
            zero,
            allocated,
            depth,
        })
    }
}

impl Qcow2Driver {
    /// The status of a run of data clusters contiguous in the file: data,
    /// and also zero where the file reads as zeroes there (a hole, or past
    /// its end), cut where the file's status changes — as QEMU reports it.
    async fn data_status(&self, offset: u64, mapping: Mapping, run: u64) -> Result<Extent> {
        let mut e = Extent {
            offset,
            len: run,
            data: true,
            zero: false,
            allocated: true,
            depth: 1,
        };
        let Mapping::Data(host) = mapping else {
            return Ok(e);
        };
        let file = self.file.node();
        let at = host + offset % self.cluster_size();
        if at >= file.length() {
            e.zero = true;
            return Ok(e);
        }
        // Extra information only: a failure leaves the run plain data.
        let inner = file
            .block_status_upto(at, run.min(file.length() - at), 1)
            .await;
        if let Some(first) = inner.ok().and_then(|x| x.first().copied()) {
            e.len = first.len;
            e.zero = first.zero;
        }
        Ok(e)
    }
}

/// Deflates one cluster as QEMU's qcow2 does: raw deflate with a 4 KiB
/// window (QEMU inflates with that window, so a larger one would make
/// images it cannot read); `None` unless the result is shorter than
/// `cluster_size`.
fn deflate(data: &[u8], cluster_size: usize) -> Option<Vec<u8>> {
    let mut z = flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
    let mut whole;
    let data = if data.len() < cluster_size {
        // The image's last cluster, padded as QEMU pads it.
        whole = vec![0; cluster_size];
        whole[..data.len()].copy_from_slice(data);
        &whole[..]
    } else {
        data
    };
    let mut out = Vec::with_capacity(cluster_size);
    match z.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) if out.len() < cluster_size => Some(out),
        _ => None,
    }
}

impl Driver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn image_info(&self) -> ImageInfo {
        let h = &self.header;
        let v3 = h.version >= 3;
        let compatible = if v3 && h.raw.len() >= 88 {
            be64(&h.raw, 80)
        } else {
            0
        };
        ImageInfo {
            actual_size: None,
            cluster_size: Some(self.cluster_size()),
            dirty: Some(h.incompatible & INCOMPAT_DIRTY != 0),
            backing_filename: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            format_specific: Some(FormatSpecific::Qcow2 {
                compat: if v3 { "1.1" } else { "0.10" },
                lazy_refcounts: v3.then_some(compatible & 1 != 0),
                refcount_bits: 1 << h.refcount_order,
                corrupt: v3.then_some(h.incompatible & INCOMPAT_CORRUPT != 0),
                extended_l2: v3.then_some(false),
                compression_type: "zlib",
            }),
            ..ImageInfo::default()
        }
    }

    fn length(&self) -> u64 {
        self.header.size
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: 1,
            memory_alignment: self.file.node().limits().memory_alignment,
            cluster_size: Some(self.cluster_size()),
        }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(self.read_impl(offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            let (result, buf) = self.write_impl(offset, buf).await;
            match result {
                Ok(()) if fua => (self.flush_impl().await, buf),
                other => (other, buf),
            }
        })
    }

    fn copy_from<'a>(&'a self, offset: u64, source: &'a HostRange) -> BoxFuture<'a, Result<bool>> {
        Box::pin(self.copy_from_impl(offset, source))
    }

    fn takes_piped(&self, offset: u64, len: u64) -> bool {
        let cs = self.cluster_size();
        self.writable
            && offset % cs == 0
            && (offset + len) % cs == 0
            && self.file.node().accepts_piped(0, cs)
    }

    fn splice_from<'a>(&'a self, offset: u64, data: &'a Piped) -> BoxFuture<'a, Result<bool>> {
        Box::pin(self.splice_from_impl(offset, data))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.write_zeroes_impl(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.discard_impl(offset, len))
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.flush_impl())
    }

    fn supports_compressed_writes(&self) -> bool {
        true
    }

    fn write_compressed(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(self.write_compressed_impl(offset, buf))
    }

    fn stores_bitmaps(&self) -> bool {
        self.can_store_bitmaps()
    }

    fn log_activity(&self, offset: u64, len: u64) -> Option<BoxFuture<'_, Result<()>>> {
        if !self.can_store_bitmaps() || self.logged(offset, len) {
            return None;
        }
        Some(Box::pin(self.touch(offset, len)))
    }

    fn checkpoint<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.can_store_bitmaps() {
                Qcow2Driver::checkpoint(self, bitmaps).await?;
            }
            Ok(())
        })
    }

    fn close<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut m = self.lock_meta().await;
            let mut stored = Ok(());
            // Stored clean, the bitmaps need no log: the header written
            // below drops it, and its areas are freed, so that a cleanly
            // closed image has nothing QEMU would count as leaked.
            let log = m.activity.take();
            if self.can_store_bitmaps() {
                stored = match bitmaps.to_store() {
                    Ok(saved) if saved.is_empty() && !m.has_bitmaps && log.is_none() => Ok(()),
                    Ok(saved) => self.store_bitmaps(&mut m, saved, false).await,
                    Err(e) => Err(e),
                };
            }
            if let (Ok(()), Some(areas)) = (&stored, log) {
                let clusters = areas.bytes.div_ceil(self.cluster_size());
                for offset in areas.offsets {
                    let first = offset >> self.header.cluster_bits;
                    m.pending_free.extend(first..first + clusters);
                }
            }
            // The data's metadata goes back even if the bitmaps could not
            // be stored (they then stay marked in use: inconsistent).
            let written = self.write_back(&mut m).await;
            drop(m);
            stored?;
            written?;
            self.file.node().flush().await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(self.status_of(offset, len))
    }
}

/// `n` zeroes in memory already written, page by page. A plain
/// `vec![0; n]` of fresh memory maps the kernel's shared zero page: a table
/// read before it is written (an L2 table of new clusters) then takes a
/// copy-on-write fault per page, and each such fault interrupts every
/// other core running one of the daemon's threads to flush its TLB (dear
/// in a VM).
fn written_zeroes(n: usize) -> Vec<u64> {
    let mut v = vec![0u64; n];
    // A store the compiler cannot drop: it cannot know the value.
    for x in v.iter_mut().step_by(512) {
        *x = std::hint::black_box(0);
    }
    v
}
