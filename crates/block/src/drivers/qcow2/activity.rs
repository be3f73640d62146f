//! The activity log that makes persistent bitmaps survive a crash (DRBD's
//! idea, bitmirror's format): the image is cut into 4 MiB *extents*; before
//! the first write-type request into an extent since the last checkpoint,
//! the extent's bit is set in the current log area and made durable; a
//! *checkpoint* stores the bitmaps (still marked in use) and starts a new
//! generation in the other area, clearing the old one once the bitmaps are
//! durable. After a crash, each bitmap stored consistently at the last
//! checkpoint loads with every extent either area names marked dirty: a
//! superset of the writes since, never a subset.
//!
//! On disk: two areas of one bit per extent (allocated when persistent
//! bitmaps are loaded writable or one is added, or else by the first
//! write; freed by a clean close, which stores the bitmaps clean and needs
//! no log), and an extension of ours (type [`EXT_ACTIVITY`]) naming
//! them, the bitmap directory of the last
//! checkpoint and which of its bitmaps were consistent then. It counts only
//! while our autoclear bit is set: QEMU clears it when it opens the image
//! writable, because it cannot keep the log, and then the bitmaps it left in
//! use load inconsistent, as QEMU itself would have them.

use super::header::{AUTOCLEAR_ACTIVITY, AUTOCLEAR_BITMAPS, EXT_ACTIVITY, EXT_BITMAPS, be32, be64};
use super::{Meta, Qcow2Driver, refcount};
use crate::bitmaps::Bitmaps;
use crate::buf::IoBuf;
use crate::error::Result;

/// log2 of the extent size: 4 MiB, DRBD's.
pub(super) const EXTENT_BITS: u32 = 22;
/// Extents logged ahead of a writer that streams through the image.
const LOOK_AHEAD: u64 = 7;
/// Hot extents after which a flush checkpoints: a quarter of the image, at
/// most 256 (1 GiB to count as dirty after a crash on top of what the
/// bitmaps say).
const CHECKPOINT_EXTENTS: u64 = 256;

/// Where the log's two areas are, and their length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Areas {
    pub offsets: [u64; 2],
    pub bytes: u64,
}

/// The log's state in memory, behind a short lock; `log_io` (taken before
/// the metadata lock) serialises the writes of the areas.
#[derive(Debug, Default)]
pub(super) struct Log {
    /// The bits of each area, at least as set as on disk.
    pub bits: [Vec<u8>; 2],
    /// The area of the current generation.
    pub current: usize,
    /// Extents durable in the current generation.
    pub hot: u64,
    /// Requests that set bits, counted; and how many of them are durable.
    pub requested: u64,
    pub durable: u64,
}

/// What the extension says.
#[derive(Debug)]
pub(super) struct Extension {
    pub areas: Areas,
    /// The bitmap directory of the last checkpoint, and which of its
    /// entries were consistent then.
    pub directory: u64,
    pub consistent: Vec<bool>,
}

impl Extension {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.areas.offsets[0].to_be_bytes());
        out.extend_from_slice(&self.areas.offsets[1].to_be_bytes());
        out.extend_from_slice(&self.areas.bytes.to_be_bytes());
        out.extend_from_slice(&EXTENT_BITS.to_be_bytes());
        out.extend_from_slice(&(self.consistent.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.directory.to_be_bytes());
        let mut flags = vec![0u8; self.consistent.len().div_ceil(8)];
        for (i, &c) in self.consistent.iter().enumerate() {
            if c {
                flags[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&flags);
        out
    }

    /// Parses the extension; `None` if it is not one this version wrote.
    pub(super) fn decode(data: &[u8]) -> Option<Extension> {
        if data.len() < 40 || be32(data, 24) != EXTENT_BITS {
            return None;
        }
        let count = be32(data, 28) as usize;
        let flags = data.get(40..40 + count.div_ceil(8))?;
        Some(Extension {
            areas: Areas {
                offsets: [be64(data, 0), be64(data, 8)],
                bytes: be64(data, 16),
            },
            directory: be64(data, 32),
            consistent: (0..count)
                .map(|i| flags[i / 8] & (1 << (i % 8)) != 0)
                .collect(),
        })
    }
}

/// Bytes of one log area for an image of `size` bytes: a bit per extent,
/// whole 512-byte sectors.
pub(super) fn area_bytes(size: u64) -> u64 {
    size.div_ceil(1 << EXTENT_BITS)
        .div_ceil(8)
        .next_multiple_of(512)
}

impl Qcow2Driver {
    fn area_bytes(&self) -> u64 {
        area_bytes(self.header.size)
    }

    /// The extents `offset..offset + len` touches.
    fn extents(offset: u64, len: u64) -> std::ops::Range<u64> {
        (offset >> EXTENT_BITS)..(offset + len.max(1)).div_ceil(1 << EXTENT_BITS)
    }

    /// Whether every extent of `offset..offset + len` is hot already.
    pub(super) fn logged(&self, offset: u64, len: u64) -> bool {
        self.all_hot(Self::extents(offset, len))
    }

    /// Makes the extents of `offset..offset + len` durable in the log before
    /// a write-type request there is issued. Requests arriving while the
    /// log is being written are made durable together by the next write
    /// (group commit).
    pub(super) async fn touch(&self, offset: u64, len: u64) -> Result<()> {
        let extents = Self::extents(offset, len);
        // A writer streaming through the image (the extent before is hot)
        // gets the next extents logged now too: one durable write per
        // LOOK_AHEAD + 1 extents instead of one each.
        let total = self.header.size.div_ceil(1 << EXTENT_BITS);
        let streaming = extents.start > 0 && self.is_hot(extents.start - 1);
        let end = if streaming {
            (extents.end + LOOK_AHEAD).min(total)
        } else {
            extents.end
        };
        let mine = {
            let mut log = self.lock_log();
            let current = log.current;
            for e in extents.start..end {
                if let Some(b) = log.bits[current].get_mut((e / 8) as usize) {
                    *b |= 1 << (e % 8);
                }
            }
            log.requested += 1;
            log.requested
        };
        loop {
            let _io = self.log_io.lock().await;
            if self.lock_log().durable >= mine {
                return Ok(());
            }
            self.write_current_area().await?;
        }
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the current area as it is in memory, durably, giving the image
    /// a log first if it has none; the caller holds `log_io`.
    async fn write_current_area(&self) -> Result<()> {
        if self.lock_meta().await.activity.is_none() {
            self.enable_log().await?;
        }
        let Some(areas) = self.lock_meta().await.activity else {
            return Ok(());
        };
        let (current, bytes, seq) = {
            let log = self.lock_log();
            (log.current, log.bits[log.current].clone(), log.requested)
        };
        let file = self.file.node();
        // A DSYNC write of the area alone, not a flush of every dirty page
        // of the image.
        let buf = IoBuf::copy_from(&bytes, file.limits().memory_alignment);
        file.write_growing(areas.offsets[current], buf, true)
            .await
            .0?;
        let mut log = self.lock_log();
        if log.current == current {
            log.durable = log.durable.max(seq);
            log.hot = bytes.iter().map(|b| u64::from(b.count_ones())).sum();
            let mut hot = self.lock_hot();
            for (w, chunk) in hot.iter_mut().zip(bytes.chunks(8)) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                *w = u64::from_le_bytes(word);
            }
        }
        Ok(())
    }

    fn lock_hot(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.hot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn all_hot(&self, mut extents: std::ops::Range<u64>) -> bool {
        let hot = self.lock_hot();
        extents.all(|e| {
            hot.get((e / 64) as usize)
                .is_some_and(|w| w & (1 << (e % 64)) != 0)
        })
    }

    fn is_hot(&self, e: u64) -> bool {
        self.all_hot(e..e + 1)
    }

    /// Gives the image a log: two zeroed areas, then the extension and our
    /// autoclear bit, pointing at the bitmaps stored now (those loaded
    /// consistent at open are a checkpoint as good as any). The caller
    /// holds `log_io`.
    async fn enable_log(&self) -> Result<()> {
        let mut m = self.lock_meta().await;
        let file = self.file.node();
        let bytes = self.area_bytes();
        let clusters = bytes.div_ceil(self.cluster_size());
        let zeroes = vec![0u8; bytes as usize];
        let mut offsets = [0u64; 2];
        for offset in &mut offsets {
            let refcounts = m.refcounts.as_mut().ok_or_else(|| self.read_only())?;
            let first = refcounts.alloc_exact(&file, clusters).await?;
            *offset = first << self.header.cluster_bits;
            refcount::write(&file, *offset, &zeroes).await?;
        }
        let areas = Areas { offsets, bytes };
        let ext = Extension {
            areas,
            directory: m.directory,
            consistent: m.stored_consistent.clone(),
        };
        m.activity = Some(areas);
        self.rewrite_header(&mut m, Some(ext)).await
    }

    /// Makes the areas and everything else durable, then writes the header
    /// with the current bitmaps extension and `activity`.
    pub(super) async fn rewrite_header(
        &self,
        m: &mut Meta,
        activity: Option<Extension>,
    ) -> Result<()> {
        let file = self.file.node();
        self.write_back(m).await?;
        file.flush().await?;
        let refcounts = m.refcounts.as_ref().ok_or_else(|| self.read_only())?;
        let mut autoclear = 0;
        if m.bitmaps_ext.is_some() {
            autoclear |= AUTOCLEAR_BITMAPS;
        }
        let activity = activity.map(|a| a.encode());
        if activity.is_some() {
            autoclear |= AUTOCLEAR_ACTIVITY;
        }
        let header = self.header.rewrite(
            &self.node,
            refcounts.table_location(),
            autoclear,
            &[
                (EXT_BITMAPS, m.bitmaps_ext.as_deref()),
                (EXT_ACTIVITY, activity.as_deref()),
            ],
        )?;
        refcount::write(&file, 0, &header).await?;
        file.flush().await
    }

    /// Starts a new log generation and stores the bitmaps if enough
    /// extents are hot, or if the set of persistent bitmaps changed since
    /// they were last stored (a new one is crash-safe from its first
    /// checkpoint on).
    pub(super) async fn checkpoint(&self, bitmaps: &Bitmaps) -> Result<()> {
        let io = self.log_io.lock().await;
        let names = bitmaps.persistent_names();
        let changed = names != self.lock_meta().await.stored_names;
        let extents = self.header.size.div_ceil(1 << EXTENT_BITS);
        let due = CHECKPOINT_EXTENTS.min((extents / 4).max(1));
        let (hot, pending) = {
            let log = self.lock_log();
            (log.hot, log.requested > log.durable)
        };
        if hot < due && !changed {
            return Ok(());
        }
        // What requests asked for is durable before the generation moves on.
        if pending {
            self.write_current_area().await?;
        }
        // Writes from now on go to the other area: whatever the snapshot
        // below misses, the new generation has.
        let old = {
            let mut log = self.lock_log();
            let old = log.current;
            log.current ^= 1;
            log.hot = 0;
            old
        };
        self.lock_hot().fill(0);
        drop(io);
        let saved = bitmaps.to_store()?;
        let mut m = self.lock_meta().await;
        self.store_bitmaps(&mut m, saved, true).await?;
        let areas = m.activity;
        drop(m);
        // The stored bitmaps cover everything the old generation named.
        if let Some(areas) = areas {
            let _io = self.log_io.lock().await;
            let zeroes = {
                let mut log = self.lock_log();
                log.bits[old].fill(0);
                log.bits[old].clone()
            };
            let file = self.file.node();
            let buf = IoBuf::copy_from(&zeroes, file.limits().memory_alignment);
            file.write_growing(areas.offsets[old], buf, true).await.0?;
        } else if !names.is_empty() {
            self.ensure_log().await?;
        }
        Ok(())
    }

    /// Gives the image a log now if it has none: called when a persistent
    /// bitmap is added or loaded writable, so that the first write pays
    /// for one durable write of a log area, not for the flushes and the
    /// header a new log takes while a guest waits for it.
    pub(super) async fn ensure_log(&self) -> Result<()> {
        let _io = self.log_io.lock().await;
        if self.lock_meta().await.activity.is_none() {
            self.enable_log().await?;
        }
        Ok(())
    }

    /// The extents the log names (both areas), if the image has a valid
    /// log whose checkpoint is the directory at `directory`; and which
    /// directory entries were consistent at that checkpoint.
    pub(super) async fn recover(&self, directory: u64) -> Result<Option<(Vec<u64>, Vec<bool>)>> {
        let Some(data) = &self.header.activity else {
            return Ok(None);
        };
        let Some(ext) = Extension::decode(data) else {
            return Ok(None);
        };
        let file = self.file.node();
        let bytes = ext.areas.bytes;
        let fits = |o: u64| {
            o % self.cluster_size() == 0 && o.checked_add(bytes).is_some_and(|e| e <= file.length())
        };
        if ext.directory != directory
            || bytes != self.area_bytes()
            || !ext.areas.offsets.iter().all(|&o| fits(o))
        {
            return Ok(None);
        }
        let mut extents = Vec::new();
        let mut bits: [Vec<u8>; 2] = Default::default();
        for (i, &offset) in ext.areas.offsets.iter().enumerate() {
            let area = file.read(offset, bytes as usize).await?.into_vec();
            for (byte, &b) in area.iter().enumerate() {
                for bit in 0..8 {
                    if b & (1 << bit) != 0 {
                        extents.push(byte as u64 * 8 + bit);
                    }
                }
            }
            bits[i] = area;
        }
        if self.writable {
            {
                let mut log = self.lock_log();
                log.bits = bits;
                log.current = 0;
            }
            self.lock_meta().await.activity = Some(ext.areas);
        }
        extents.sort_unstable();
        extents.dedup();
        Ok(Some((extents, ext.consistent)))
    }
}
