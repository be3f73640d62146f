//! `qcow2`: QEMU's image format (`docs/interop/qcow2.txt`), read-only for
//! now: versions 2 and 3, cluster sizes 512 B to 2 MiB, L1/L2 tables with a
//! bounded L2 cache, zero clusters, zlib-compressed clusters and backing
//! files. Images that need a feature we lack (encryption, an external data
//! file, extended L2 entries, zstd) are refused with the feature's name.
//! Writing (with refcounts and preserved unknown header extensions) and
//! persistent bitmaps come next.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use hbitmap::HBitmap;

use crate::bitmaps::LoadedState;
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::node::{BoxFuture, BufResult, Driver, Edge, Extent, Limits, ZeroFlags};

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
/// Memory for cached L2 tables (QEMU's default maximum): 32 MiB covers
/// 256 GiB of image at 64 KiB clusters.
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Largest L1 table accepted (QEMU's `QCOW_MAX_L1_SIZE`), so that a hostile
/// header cannot make us allocate without bound.
const MAX_L1_BYTES: u64 = 32 << 20;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;

/// A header extension, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The parsed image header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The bitmaps extension, when the autoclear bit says it is valid.
    pub bitmaps: Option<Vec<u8>>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

impl Header {
    /// Bytes of the fixed header needed to learn the cluster size.
    pub(crate) const PROBE: usize = 104;

    /// Parses the header from `first`, the image's first cluster (or all of
    /// the file if shorter). Checks everything later reads rely on.
    pub(crate) fn parse(node: &str, first: &[u8], file_len: u64) -> Result<Header> {
        let bad = |reason: String| Error::BadImage {
            node: node.to_owned(),
            format: "qcow2",
            reason,
        };
        let unsupported = |feature: String| Error::UnsupportedFeature {
            node: node.to_owned(),
            feature,
        };
        if first.len() < 72 || be32(first, 0) != MAGIC {
            return Err(bad("no qcow2 magic".into()));
        }
        let version = be32(first, 4);
        if !(2..=3).contains(&version) {
            return Err(unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(first, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster bits {cluster_bits} outside 9..=21")));
        }
        let cluster_size = 1usize << cluster_bits;
        let (incompatible, header_length, compression_type) = if version == 3 {
            if first.len() < Self::PROBE {
                return Err(bad("version 3 header is truncated".into()));
            }
            let header_length = be32(first, 100);
            let compression = if header_length > 104 && first.len() > 104 {
                first[104]
            } else {
                0
            };
            (be64(first, 72), header_length as usize, compression)
        } else {
            (0, 72, 0)
        };
        let autoclear = if version == 3 { be64(first, 88) } else { 0 };
        if header_length < 72 || header_length > first.len().min(cluster_size) {
            return Err(bad(format!("header length {header_length}")));
        }
        let crypt_method = be32(first, 32);
        // Extensions follow the header, in the first cluster.
        let mut extensions = Vec::new();
        let mut at = header_length.next_multiple_of(8);
        if version == 3 || at < first.len() {
            while at + 8 <= first.len().min(cluster_size) {
                let (kind, len) = (be32(first, at), be32(first, at + 4) as usize);
                if kind == EXT_END {
                    break;
                }
                let data = first
                    .get(at + 8..(at + 8).saturating_add(len))
                    .ok_or_else(|| bad(format!("header extension {kind:#x} is truncated")))?;
                extensions.push(Extension {
                    kind,
                    data: data.to_vec(),
                });
                at = at.saturating_add(8 + len.next_multiple_of(8));
            }
        }
        let feature_name = |kind: u8, bit: u32| -> Option<String> {
            let table = extensions.iter().find(|e| e.kind == EXT_FEATURE_NAMES)?;
            table.data.chunks_exact(48).find_map(|entry| {
                (entry[0] == kind && u32::from(entry[1]) == bit).then(|| {
                    let name = &entry[2..];
                    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    String::from_utf8_lossy(&name[..end]).into_owned()
                })
            })
        };
        if crypt_method != 0 {
            return Err(unsupported("encryption".into()));
        }
        for bit in 0..64u32 {
            if incompatible & (1 << bit) == 0 {
                continue;
            }
            match bit {
                // Dirty (refcounts may be stale) and corrupt images are
                // readable; writing will have to repair or refuse them.
                0 | 1 => {}
                2 => return Err(unsupported("an external data file".into())),
                3 if compression_type != 0 => {
                    return Err(unsupported(format!(
                        "compression type {compression_type} (only zlib is supported)"
                    )));
                }
                3 => {}
                4 => return Err(unsupported("extended L2 entries".into())),
                _ => {
                    let name = feature_name(0, bit)
                        .unwrap_or_else(|| format!("incompatible feature bit {bit}"));
                    return Err(unsupported(name));
                }
            }
        }
        let size = be64(first, 24);
        let l1_size = be32(first, 36);
        let l1_table_offset = be64(first, 40);
        let l2_entries = (cluster_size / 8) as u64;
        let needed = size.div_ceil(cluster_size as u64).div_ceil(l2_entries);
        if u64::from(l1_size) < needed {
            return Err(bad(format!(
                "L1 table of {l1_size} entries is too small for {size} bytes"
            )));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(format!("L1 table of {l1_size} entries is too large")));
        }
        let l1_end = u64::from(l1_size)
            .checked_mul(8)
            .and_then(|n| n.checked_add(l1_table_offset));
        if l1_table_offset % cluster_size as u64 != 0 || l1_end.is_none_or(|e| e > file_len) {
            return Err(bad(format!(
                "L1 table at {l1_table_offset:#x} is outside the file"
            )));
        }
        let backing_file = match (be64(first, 8), be32(first, 16) as usize) {
            (0, _) | (_, 0) => None,
            (offset, len) => {
                let bytes = usize::try_from(offset)
                    .ok()
                    .and_then(|o| first.get(o..o.checked_add(len)?))
                    .ok_or_else(|| bad("backing file name is outside the first cluster".into()))?;
                Some(String::from_utf8_lossy(bytes).into_owned())
            }
        };
        let backing_format = extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned());
        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            backing_file,
            backing_format,
            // Autoclear bit 0: a writer that did not know the extension
            // would have cleared it, so the extension is stale without it.
            bitmaps: extensions
                .iter()
                .find(|e| e.kind == EXT_BITMAPS && autoclear & 1 != 0)
                .map(|e| e.data.clone()),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

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

/// A bounded cache of L2 tables, first in first out.
#[derive(Debug, Default)]
struct L2Cache {
    tables: HashMap<u64, Arc<[u64]>>,
    order: VecDeque<u64>,
}

/// A read-only qcow2 image.
#[derive(Debug)]
pub(crate) struct Qcow2Driver {
    node: String,
    file: Arc<Edge>,
    backing: Option<Arc<Edge>>,
    header: Header,
    l1: Vec<u64>,
    l2: Mutex<L2Cache>,
    /// The last compressed cluster inflated, by host offset: small reads
    /// from one compressed cluster inflate it once.
    inflated: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl Qcow2Driver {
    /// Reads and checks the header and the L1 table from `file`.
    pub(crate) async fn open(node: &str, file: Arc<Edge>) -> Result<Qcow2Driver> {
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
        Ok(Qcow2Driver {
            node: node.to_owned(),
            file,
            backing: None,
            header,
            l1,
            l2: Mutex::new(L2Cache::default()),
            inflated: Mutex::new(None),
        })
    }

    /// The backing file name and format the image names, if any.
    pub(crate) fn backing_file(&self) -> Option<(&str, Option<&str>)> {
        let name = self.header.backing_file.as_deref()?;
        Some((name, self.header.backing_format.as_deref()))
    }

    /// The persistent dirty bitmaps stored in the image, as QEMU stores
    /// them: a bitmap marked in use was not saved cleanly and loads empty
    /// and inconsistent; one without the `auto` flag loads disabled. The
    /// image is open read-only, so every bitmap is readonly.
    pub(crate) async fn load_bitmaps(&self) -> Result<Vec<(String, HBitmap, LoadedState)>> {
        let Some(ext) = &self.header.bitmaps else {
            return Ok(Vec::new());
        };
        if ext.len() < 24 {
            return Err(self.bad("bitmaps extension is truncated".into()));
        }
        let count = be32(ext, 0) as usize;
        let (dir_size, dir_offset) = (be64(ext, 8), be64(ext, 16));
        if count > 65535 || dir_size > 64 << 20 {
            return Err(self.bad(format!(
                "bitmap directory of {count} entries, {dir_size} bytes"
            )));
        }
        let file = self.file.node();
        let dir = file.read(dir_offset, dir_size as usize).await?;
        let dir = dir.as_slice();
        let cs = self.header.cluster_size();
        let mut out = Vec::new();
        let mut at = 0usize;
        for _ in 0..count {
            let entry = dir
                .get(at..at + 24)
                .ok_or_else(|| self.bad("bitmap directory is truncated".into()))?;
            let table_offset = be64(entry, 0);
            let table_size = be32(entry, 8) as usize;
            let flags = be32(entry, 12);
            let (kind, gran_bits) = (entry[16], u32::from(entry[17]));
            let name_size = usize::from(u16::from_be_bytes([entry[18], entry[19]]));
            let extra = be32(entry, 20) as usize;
            let name_at = at + 24 + extra;
            let name = dir
                .get(name_at..name_at + name_size)
                .ok_or_else(|| self.bad("bitmap name is outside the directory".into()))?;
            let name = String::from_utf8_lossy(name).into_owned();
            at = (name_at + name_size).next_multiple_of(8);
            if kind != 1 || !(9..=31).contains(&gran_bits) || name_size == 0 || name_size > 1023 {
                return Err(self.bad(format!("bitmap '{name}' has an invalid directory entry")));
            }
            let in_use = flags & 1 != 0;
            let state = LoadedState {
                disabled: flags & 2 == 0,
                readonly: true,
                persistent: true,
                inconsistent: in_use,
            };
            let mut bits = HBitmap::new(self.header.size, gran_bits)?;
            if !in_use {
                let bits_per_cluster = cs * 8;
                let need = bits.bits().div_ceil(bits_per_cluster) as usize;
                // QEMU's limit on a bitmap table, so that no header makes
                // us read without bound.
                if table_size != need || table_size > 0x800_0000 {
                    return Err(self.bad(format!(
                        "bitmap '{name}' has a table of {table_size} entries, not {need}"
                    )));
                }
                let table = file.read(table_offset, table_size * 8).await?;
                let items_per_cluster = bits_per_cluster << gran_bits;
                let mut d = bits.deserializer();
                for (i, e) in table.as_slice().chunks_exact(8).enumerate() {
                    let entry = be64(e, 0);
                    let start = i as u64 * items_per_cluster;
                    let count = items_per_cluster.min(self.header.size - start);
                    match entry & OFFSET_MASK {
                        0 if entry & 1 != 0 => d.ones(start, count)?,
                        0 => d.zeroes(start, count)?,
                        data => {
                            let cluster = file.read(data, cs as usize).await?;
                            d.part(cluster.as_slice(), start, count)?;
                        }
                    }
                }
                d.finish();
            }
            out.push((name, bits, state));
        }
        Ok(out)
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

    async fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>> {
        if let Some(t) = self.lock_l2().tables.get(&offset) {
            return Ok(t.clone());
        }
        let cs = self.header.cluster_size();
        if offset % cs != 0 || offset + cs > self.file.node().length() {
            return Err(self.bad(format!("L2 table at {offset:#x} is outside the file")));
        }
        let raw = self.file.node().read(offset, cs as usize).await?;
        let table: Arc<[u64]> = raw.as_slice().chunks_exact(8).map(|e| be64(e, 0)).collect();
        let mut cache = self.lock_l2();
        let capacity = (L2_CACHE_BYTES / cs).max(1) as usize;
        if cache.order.len() >= capacity {
            if let Some(old) = cache.order.pop_front() {
                cache.tables.remove(&old);
            }
        }
        if cache.tables.insert(offset, table.clone()).is_none() {
            cache.order.push_back(offset);
        }
        Ok(table)
    }

    fn lock_inflated(&self) -> std::sync::MutexGuard<'_, Option<(u64, Arc<Vec<u8>>)>> {
        self.inflated.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_l2(&self) -> std::sync::MutexGuard<'_, L2Cache> {
        self.l2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where guest cluster `index` is.
    async fn map(&self, index: u64) -> Result<Mapping> {
        let l2_bits = self.header.cluster_bits - 3;
        let l1_index = (index >> l2_bits) as usize;
        let l1 = *self
            .l1
            .get(l1_index)
            .ok_or_else(|| self.bad(format!("cluster {index} is past the L1 table")))?;
        let l2_offset = l1 & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        let table = self.l2_table(l2_offset).await?;
        let entry = table[(index & ((1 << l2_bits) - 1)) as usize];
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
            host if host % self.header.cluster_size() != 0 => {
                Err(self.bad(format!("data cluster at {host:#x} is not aligned")))
            }
            host => Ok(Mapping::Data(host)),
        }
    }

    /// How guest bytes from `offset` are stored, and for how many bytes (at
    /// most `max`) they continue the same way: data clusters that follow
    /// each other on the host, zero or unallocated clusters in a row. A
    /// compressed cluster is a run of its own.
    async fn run_at(&self, offset: u64, max: u64) -> Result<(Mapping, u64)> {
        let cs = self.header.cluster_size();
        let first = offset / cs;
        let mapping = self.map(first).await?;
        let mut run = (cs - offset % cs).min(max);
        let mut next = first + 1;
        while run < max {
            let continues = match (mapping, self.map(next).await?) {
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

    /// The status of the run of clusters from `offset` (at most `len`
    /// bytes) that map the same way; unallocated runs take the backing
    /// node's status, one level deeper.
    async fn status_of(&self, offset: u64, len: u64) -> Result<Extent> {
        let cs = self.header.cluster_size();
        let end = offset + len;
        let first = self.map(offset / cs).await?;
        let kind = std::mem::discriminant(&first);
        let mut next = (offset / cs + 1) * cs;
        while next < end && std::mem::discriminant(&self.map(next / cs).await?) == kind {
            next += cs;
        }
        let run = next.min(end) - offset;
        let (data, zero, allocated, depth, run) = match first {
            Mapping::Data(_) | Mapping::Compressed(..) => (true, false, true, 1, run),
            Mapping::Zero => (false, true, true, 1, run),
            Mapping::Unallocated => match &self.backing {
                Some(b) if offset < b.node().length() => {
                    let node = b.node();
                    let n = run.min(node.length() - offset);
                    let inner = node.block_status(offset, n).await?;
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

impl Driver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn length(&self) -> u64 {
        self.header.size
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: 1,
            memory_alignment: self.file.node().limits().memory_alignment,
            cluster_size: Some(self.header.cluster_size()),
        }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            let cs = self.header.cluster_size();
            let len = buf.len() as u64;
            // One run of data clusters: read straight into the caller's
            // buffer.
            match self.run_at(offset, len).await {
                Err(e) => return (Err(e), buf),
                Ok((Mapping::Data(host), run)) if run == len => {
                    return self.file.node().read_into(host + offset % cs, buf).await;
                }
                Ok(_) => {}
            }
            let mut buf = buf;
            let mut done = 0u64;
            while done < len {
                let at = offset + done;
                let step = match self.run_at(at, len - done).await {
                    Ok((mapping, run)) => {
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
        })
    }

    fn write(&self, _: u64, buf: IoBuf, _: bool) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move { (Err(Error::Qcow2ReadOnly(self.node.clone())), buf) })
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { Err(Error::Qcow2ReadOnly(self.node.clone())) })
    }

    fn discard(&self, _: u64, _: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { Err(Error::Qcow2ReadOnly(self.node.clone())) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.file.node().flush().await })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(self.status_of(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A plausible version 3 header for a 1 MiB image, 64 KiB clusters.
    fn header() -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&65536u64.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    #[test]
    fn a_plain_header_parses() {
        let h = Header::parse("n", &header(), 1 << 20).unwrap();
        assert_eq!(
            (h.version, h.cluster_bits, h.size, h.l1_size),
            (3, 16, 1 << 20, 1)
        );
        assert!(h.backing_file.is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 4000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Any bytes anywhere in the first cluster: an error or a header,
        /// never a panic, an overflow or a huge allocation.
        #[test]
        fn hostile_headers_never_panic(
            edits in prop::collection::vec((0usize..256, any::<u8>()), 1..24),
            extension_edits in prop::collection::vec((104usize..400, any::<u8>()), 0..24),
            truncate in prop::option::of(0usize..300),
            file_len in prop_oneof![Just(1u64 << 20), any::<u64>()],
        ) {
            let mut h = header();
            for (at, b) in edits.into_iter().chain(extension_edits) {
                h[at] = b;
            }
            if let Some(n) = truncate {
                h.truncate(n);
            }
            let _ = Header::parse("n", &h, file_len);
        }
    }
}
