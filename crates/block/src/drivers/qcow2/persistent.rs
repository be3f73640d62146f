//! Persistent dirty bitmaps in qcow2, as QEMU stores them (the bitmaps
//! extension, `docs/interop/qcow2.txt`, "Bitmaps extension"): a directory of
//! entries (table offset and size, flags `in_use` and `auto`, granularity,
//! name), each pointing at a bitmap table whose entries point at clusters
//! of serialized bits (0: all clean).
//!
//! A writable open marks every bitmap `in_use` in the image before the first
//! write, so that a crash leaves them inconsistent rather than silently
//! stale; close stores them anew: bits, tables and directory in new
//! clusters, the refcounts that count them made durable, then the header
//! switched to the new directory, then the old clusters freed. A crash at
//! any point leaves either the old directory (in use) or the new one.

use hbitmap::HBitmap;

use super::header::{be32, be64};
use super::{Meta, OFFSET_MASK, Qcow2Driver, refcount};
use crate::bitmaps::{LoadedState, Saved};
use crate::error::Result;

const IN_USE: u32 = 1;
const AUTO: u32 = 2;
/// QEMU's limits: bitmaps per image, and entries per bitmap table.
const MAX_BITMAPS: usize = 65535;
const MAX_TABLE_ENTRIES: usize = 0x800_0000;

impl Qcow2Driver {
    /// Whether close stores persistent bitmaps here: a writable version 3
    /// image.
    pub(super) fn can_store_bitmaps(&self) -> bool {
        self.writable && self.header.version == 3 && self.header.raw.len() >= 104
    }

    /// The host clusters `offset..offset + len` covers.
    fn clusters_of(&self, offset: u64, len: u64) -> impl Iterator<Item = u64> {
        let bits = self.header.cluster_bits;
        (offset >> bits)..(offset + len).div_ceil(1 << bits)
    }

    /// The persistent dirty bitmaps stored in the image, as QEMU stores
    /// them: a bitmap marked in use was not saved cleanly and loads empty
    /// and inconsistent; one without the `auto` flag loads disabled. On a
    /// read-only image every bitmap is readonly and the image untouched; on
    /// a writable one, every bitmap is marked in use in the image before
    /// this returns.
    pub(crate) async fn load_bitmaps(&self) -> Result<Vec<(String, HBitmap, LoadedState)>> {
        let Some(ext) = &self.header.bitmaps else {
            return Ok(Vec::new());
        };
        if ext.len() < 24 {
            return Err(self.bad("bitmaps extension is truncated".into()));
        }
        let count = be32(ext, 0) as usize;
        let (dir_size, dir_offset) = (be64(ext, 8), be64(ext, 16));
        if count > MAX_BITMAPS || dir_size > 64 << 20 {
            return Err(self.bad(format!(
                "bitmap directory of {count} entries, {dir_size} bytes"
            )));
        }
        let file = self.file.node();
        let inside = dir_offset
            .checked_add(dir_size)
            .is_some_and(|e| e <= file.length());
        if dir_offset % self.cluster_size() != 0 || !inside {
            return Err(self.bad(format!(
                "bitmap directory at {dir_offset:#x} is outside the file"
            )));
        }
        let dir = file.read(dir_offset, dir_size as usize).await?;
        let mut dir = dir.into_vec();
        // A crash left bitmaps in use: those our activity log vouches for
        // load with every extent it names marked dirty.
        let recovered = self.recover(dir_offset).await?;
        let mut names = Vec::new();
        let mut consistent_now = Vec::new();
        let cs = self.cluster_size();
        let mut clusters: Vec<u64> = self.clusters_of(dir_offset, dir_size).collect();
        let mut out = Vec::new();
        let mut at = 0usize;
        for index in 0..count {
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
            let flags_at = at + 12;
            at = (name_at + name_size).next_multiple_of(8);
            if kind != 1 || !(9..=31).contains(&gran_bits) || name_size == 0 || name_size > 1023 {
                return Err(self.bad(format!("bitmap '{name}' has an invalid directory entry")));
            }
            let vouched = recovered
                .as_ref()
                .is_some_and(|(_, ok)| ok.get(index).copied().unwrap_or(false));
            let in_use = flags & IN_USE != 0 && !vouched;
            let state = LoadedState {
                disabled: flags & AUTO == 0,
                readonly: !self.writable,
                persistent: true,
                inconsistent: in_use,
            };
            let mut bits = HBitmap::new(self.header.size, gran_bits)?;
            let bits_per_cluster = cs * 8;
            let need = bits.bits().div_ceil(bits_per_cluster) as usize;
            // QEMU's limit on a bitmap table, so that no header makes us
            // read without bound.
            let table_ok = table_size == need && table_size <= MAX_TABLE_ENTRIES;
            if !in_use && !table_ok {
                return Err(self.bad(format!(
                    "bitmap '{name}' has a table of {table_size} entries, not {need}"
                )));
            }
            if table_ok {
                let table = file.read(table_offset, table_size * 8).await?;
                clusters.extend(self.clusters_of(table_offset, table_size as u64 * 8));
                let items_per_cluster = bits_per_cluster << gran_bits;
                let mut d = bits.deserializer();
                for (i, e) in table.as_slice().chunks_exact(8).enumerate() {
                    let entry = be64(e, 0);
                    let data = entry & OFFSET_MASK;
                    if data != 0 {
                        clusters.push(data >> self.header.cluster_bits);
                    }
                    if in_use {
                        continue;
                    }
                    let start = i as u64 * items_per_cluster;
                    let count = items_per_cluster.min(self.header.size - start);
                    match data {
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
            if flags & IN_USE != 0 && vouched {
                if let Some((extents, _)) = &recovered {
                    for &e in extents {
                        let start = e << super::activity::EXTENT_BITS;
                        if start < self.header.size {
                            let len = (1u64 << super::activity::EXTENT_BITS)
                                .min(self.header.size - start);
                            bits.set(start, len)?;
                        }
                    }
                }
            }
            names.push(name.clone());
            consistent_now.push(!in_use);
            if self.writable {
                let marked = flags | IN_USE;
                dir[flags_at..flags_at + 4].copy_from_slice(&marked.to_be_bytes());
            }
            out.push((name, bits, state));
        }
        if self.writable {
            // In use from now until stored: a crash must not leave them
            // looking clean while writes went unrecorded in the image.
            refcount::write(&file, dir_offset, &dir).await?;
            file.flush().await?;
            let mut m = self.lock_meta().await;
            m.bitmap_clusters = clusters;
            m.has_bitmaps = true;
            m.directory = dir_offset;
            names.sort();
            m.stored_names = names;
            m.stored_consistent = consistent_now;
        }
        if self.can_store_bitmaps() && !out.is_empty() {
            self.ensure_log().await?;
        }
        Ok(out)
    }

    /// Stores `saved` as the image's bitmaps (none: removes the extension),
    /// replacing what was stored before; marked in use if `in_use` (a
    /// checkpoint while the image stays open), else clean.
    pub(super) async fn store_bitmaps(
        &self,
        m: &mut Meta,
        saved: Vec<Saved>,
        in_use: bool,
    ) -> Result<()> {
        if saved.len() > MAX_BITMAPS {
            return Err(self.bad(format!("{} bitmaps are too many to store", saved.len())));
        }
        let file = self.file.node();
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let mut clusters = Vec::new();
        let mut dir = Vec::new();
        for b in &saved {
            let gran = b.bits.granularity();
            let items_per_cluster = (cs * 8) << gran;
            let table_size = b.bits.bits().div_ceil(cs * 8);
            let mut table = vec![0u64; table_size as usize];
            if !b.inconsistent {
                for (i, slot) in table.iter_mut().enumerate() {
                    let start = i as u64 * items_per_cluster;
                    let count = items_per_cluster.min(self.header.size - start);
                    if b.bits.next_dirty(start, start + count).is_none() {
                        continue;
                    }
                    let mut data = vec![0u8; cs as usize];
                    b.bits.serialize_part(&mut data, start, count)?;
                    let refcounts = m.refcounts.as_mut().ok_or_else(|| self.read_only())?;
                    let cluster = refcounts.alloc_exact(&file, 1).await?;
                    clusters.push(cluster);
                    refcount::write(&file, cluster << bits, &data).await?;
                    *slot = cluster << bits;
                }
            }
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            let table_offset = self.alloc_written(m, &bytes, &mut clusters).await?;
            let in_use_flag = if b.inconsistent || in_use { IN_USE } else { 0 };
            let flags = in_use_flag | if b.recording { AUTO } else { 0 };
            dir.extend_from_slice(&table_offset.to_be_bytes());
            dir.extend_from_slice(&(table_size as u32).to_be_bytes());
            dir.extend_from_slice(&flags.to_be_bytes());
            dir.push(1);
            dir.push(gran as u8);
            dir.extend_from_slice(&(b.name.len() as u16).to_be_bytes());
            dir.extend_from_slice(&0u32.to_be_bytes());
            dir.extend_from_slice(b.name.as_bytes());
            dir.resize(dir.len().next_multiple_of(8), 0);
        }
        let extension = if saved.is_empty() {
            None
        } else {
            let dir_offset = self.alloc_written(m, &dir, &mut clusters).await?;
            let mut ext = Vec::with_capacity(24);
            ext.extend_from_slice(&(saved.len() as u32).to_be_bytes());
            ext.extend_from_slice(&0u32.to_be_bytes());
            ext.extend_from_slice(&(dir.len() as u64).to_be_bytes());
            ext.extend_from_slice(&dir_offset.to_be_bytes());
            Some(ext)
        };
        // Everything the new directory names, and the refcounts that count
        // it, are durable before the header points at it (and the log's
        // checkpoint with it, in the same write).
        let directory = extension.as_ref().map_or(0, |e| be64(e, 16));
        let consistent: Vec<bool> = saved.iter().map(|b| !b.inconsistent).collect();
        let activity = m.activity.map(|areas| super::activity::Extension {
            areas,
            directory,
            consistent: consistent.clone(),
        });
        m.bitmaps_ext = extension.clone();
        self.rewrite_header(m, activity).await?;
        m.directory = directory;
        let mut names: Vec<String> = saved.iter().map(|b| b.name.clone()).collect();
        names.sort();
        m.stored_names = names;
        m.stored_consistent = consistent;
        // The old directory, tables and bits are no longer named.
        let mut old = std::mem::replace(&mut m.bitmap_clusters, clusters);
        old.sort_unstable();
        old.dedup();
        m.pending_free.extend(old);
        m.has_bitmaps = extension.is_some();
        self.write_back(m).await
    }

    /// Writes `bytes` into newly allocated clusters (at least one); their
    /// offset. The clusters are added to `clusters`.
    async fn alloc_written(
        &self,
        m: &mut Meta,
        bytes: &[u8],
        clusters: &mut Vec<u64>,
    ) -> Result<u64> {
        let file = self.file.node();
        let n = (bytes.len() as u64).div_ceil(self.cluster_size()).max(1);
        let refcounts = m.refcounts.as_mut().ok_or_else(|| self.read_only())?;
        let first = refcounts.alloc_exact(&file, n).await?;
        clusters.extend(first..first + n);
        let offset = first << self.header.cluster_bits;
        if !bytes.is_empty() {
            refcount::write(&file, offset, bytes).await?;
        }
        Ok(offset)
    }
}
