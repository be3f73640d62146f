//! Cluster refcounts of a writable qcow2 image: the refcount table, the
//! refcount blocks it points to, and the allocator built on them.
//!
//! Refcounts change in memory and reach the file in [`Refcounts::write_back`],
//! which the driver calls before it writes any L2 or L1 table that may
//! reference a newly allocated cluster, so that on disk a cluster's refcount
//! is never below the number of references to it: a crash may leak clusters,
//! never corrupt the image. Every width of the format (1 to 64 bits) is read
//! and written.

use std::collections::HashMap;

use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::node::{BoxFuture, Node};

use super::header::{be64, field};

/// One refcount block as stored, with whether memory is ahead of the file.
#[derive(Debug)]
struct Block {
    data: Vec<u8>,
    dirty: bool,
}

/// The refcounts of one image.
#[derive(Debug)]
pub(crate) struct Refcounts {
    node: String,
    cluster_bits: u32,
    /// log2 of the refcount width in bits.
    order: u32,
    table: Vec<u64>,
    table_offset: u64,
    table_dirty: bool,
    /// Every refcount block read so far, by its index in the table.
    blocks: HashMap<u64, Block>,
    /// No cluster below this one is free.
    free_hint: u64,
    /// One past the highest cluster allocated since open.
    high: u64,
}

impl Refcounts {
    /// Reads the refcount table at `table_offset` (`clusters` long).
    pub(crate) async fn open(
        node: &str,
        file: &Node,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        clusters: u32,
    ) -> Result<Refcounts> {
        let raw = file
            .read(table_offset, (u64::from(clusters) << cluster_bits) as usize)
            .await?;
        Ok(Refcounts {
            node: node.to_owned(),
            cluster_bits,
            order,
            table: raw.as_slice().chunks_exact(8).map(|e| be64(e, 0)).collect(),
            table_offset,
            table_dirty: false,
            blocks: HashMap::new(),
            free_hint: 0,
            high: 0,
        })
    }

    fn bad(&self, reason: String) -> Error {
        Error::BadImage {
            node: self.node.clone(),
            format: "qcow2",
            reason,
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcounts per refcount block.
    fn per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    /// The largest refcount an entry holds.
    pub(crate) fn max(&self) -> u64 {
        u64::MAX >> (64 - (1u32 << self.order))
    }

    /// Makes sure block `index` is in memory if the table has it; whether
    /// it has.
    async fn load(&mut self, file: &Node, index: u64) -> Result<bool> {
        if self.blocks.contains_key(&index) {
            return Ok(true);
        }
        let offset = match self.table.get(index as usize) {
            None | Some(0) => return Ok(false),
            Some(&e) => e & !((1 << 9) - 1),
        };
        let cs = self.cluster_size();
        if offset % cs != 0 || offset.saturating_add(cs) > file.length() {
            return Err(self.bad(format!("refcount block at {offset:#x} is outside the file")));
        }
        let raw = file.read(offset, cs as usize).await?;
        self.blocks.insert(
            index,
            Block {
                data: raw.into_vec(),
                dirty: false,
            },
        );
        Ok(true)
    }

    /// The refcount of host cluster `cluster`.
    pub(crate) async fn get(&mut self, file: &Node, cluster: u64) -> Result<u64> {
        let (index, slot) = (cluster / self.per_block(), cluster % self.per_block());
        if !self.load(file, index).await? {
            return Ok(0);
        }
        Ok(self
            .blocks
            .get(&index)
            .map_or(0, |b| entry(&b.data, slot, self.order)))
    }

    /// Sets the refcount of `cluster`, whose block is in memory.
    fn set_loaded(&mut self, cluster: u64, value: u64) {
        let (index, slot) = (cluster / self.per_block(), cluster % self.per_block());
        let order = self.order;
        if let Some(b) = self.blocks.get_mut(&index) {
            set_entry(&mut b.data, slot, order, value);
            b.dirty = true;
        }
        if value == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
    }

    /// Adds `delta` (+1 or -1) to the refcount of `cluster`.
    pub(crate) async fn update(&mut self, file: &Node, cluster: u64, delta: i64) -> Result<()> {
        let index = cluster / self.per_block();
        if !self.load(file, index).await? {
            if delta < 0 {
                return Err(self.bad(format!(
                    "cluster {cluster} is referenced but has no refcount block"
                )));
            }
            self.create_block(file, index).await?;
        }
        let old = self.get(file, cluster).await?;
        let new = old
            .checked_add_signed(delta)
            .filter(|&n| n <= self.max())
            .ok_or_else(|| {
                self.bad(format!(
                    "refcount of cluster {cluster} would leave 0..={} ({old} {delta:+})",
                    self.max()
                ))
            })?;
        self.set_loaded(cluster, new);
        Ok(())
    }

    /// Allocates the first run of free clusters, at most `n` long (refcount
    /// 1 each); its first cluster's index and its length (at least 1).
    pub(crate) async fn alloc(&mut self, file: &Node, n: u64) -> Result<(u64, u64)> {
        self.alloc_run(file, n, false).await
    }

    /// Allocates `n` contiguous free clusters; the first one's index.
    pub(crate) async fn alloc_exact(&mut self, file: &Node, n: u64) -> Result<u64> {
        Ok(self.alloc_run(file, n, true).await?.0)
    }

    async fn alloc_run(&mut self, file: &Node, n: u64, exact: bool) -> Result<(u64, u64)> {
        'search: loop {
            let mut start = self.free_hint;
            // Free clusters are found by the end of the file (or of what
            // was allocated since); refcounts that claim clusters far past
            // it are damage, which must not make the file grow without end.
            let limit =
                (file.length() >> self.cluster_bits).max(self.high) + self.per_block() + n + 1;
            let mut first = true;
            let len = loop {
                while self.get(file, start).await? != 0 {
                    start += 1;
                    if start > limit {
                        return Err(self.bad(format!(
                            "refcounts claim clusters past the end of the file (cluster {start})"
                        )));
                    }
                }
                if first {
                    // Everything from the hint to here is in use: the next
                    // search need not walk it again (without this, each
                    // allocation walked every cluster allocated since the
                    // hint last moved — quadratic, most of a backup's CPU).
                    self.free_hint = self.free_hint.max(start);
                    first = false;
                }
                let mut len = 1;
                while len < n && self.get(file, start + len).await? == 0 {
                    len += 1;
                }
                if len == n || !exact {
                    break len;
                }
                start += len;
            };
            // Blocks created now may land inside the run: search again.
            let per = self.per_block();
            for index in start / per..=(start + len - 1) / per {
                if !self.load(file, index).await? {
                    self.create_block(file, index).await?;
                    continue 'search;
                }
            }
            for c in start..start + len {
                self.set_loaded(c, 1);
            }
            if start <= self.free_hint {
                self.free_hint = start + len;
            }
            self.high = self.high.max(start + len);
            return Ok((start, len));
        }
    }

    /// Takes host cluster `cluster` (refcount 1) if it is free and its
    /// refcount block exists already; whether it did. Lets compressed data
    /// run on into the cluster after the one it started in.
    pub(crate) async fn take(&mut self, file: &Node, cluster: u64) -> Result<bool> {
        if !self.load(file, cluster / self.per_block()).await?
            || self.get(file, cluster).await? != 0
        {
            return Ok(false);
        }
        self.set_loaded(cluster, 1);
        if self.free_hint == cluster {
            self.free_hint += 1;
        }
        self.high = self.high.max(cluster + 1);
        Ok(true)
    }

    /// Where the refcount table is: its offset and its length in clusters.
    pub(crate) fn table_location(&self) -> (u64, u32) {
        let clusters = (self.table.len() as u64 * 8).div_ceil(self.cluster_size());
        (self.table_offset, clusters as u32)
    }

    /// Creates the missing refcount block `index`, growing the table when
    /// it has no slot for it.
    fn create_block<'a>(&'a mut self, file: &'a Node, index: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.create_block_inner(file, index))
    }

    async fn create_block_inner(&mut self, file: &Node, index: u64) -> Result<()> {
        if index == 0 {
            return Err(self.bad("the first refcount block is missing".into()));
        }
        if index as usize >= self.table.len() {
            return self.grow_table(file, index).await;
        }
        // No cluster of the block's range has a refcount, so none is in
        // use: its first cluster holds the block, which counts itself.
        let cluster = index * self.per_block();
        let mut data = vec![0u8; self.cluster_size() as usize];
        set_entry(&mut data, 0, self.order, 1);
        self.blocks.insert(index, Block { data, dirty: true });
        self.table[index as usize] = cluster << self.cluster_bits;
        self.table_dirty = true;
        Ok(())
    }

    /// Moves the refcount table to a larger place that has a slot for block
    /// `index`. The new table and the blocks added with it sit at the start
    /// of the first range no block covered yet, counted by those blocks
    /// themselves. The header points at the new table only once it and
    /// every block it names are on disk; the old table is freed after.
    async fn grow_table(&mut self, file: &Node, index: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per = self.per_block();
        let old_len = self.table.len() as u64;
        let first = old_len * per;
        let mut added = index + 1 - old_len;
        let table_clusters = loop {
            let clusters = ((old_len + added) * 8).div_ceil(cs);
            if added * per >= added + clusters {
                break clusters;
            }
            added += 1;
        };
        if table_clusters * cs > 8 << 20 {
            return Err(self.bad("the refcount table would exceed 8 MiB".into()));
        }
        // Blocks the new table names must be on disk before it is.
        self.write_blocks(file).await?;
        let new_table_offset = (first + added) * cs;
        let mut table = self.table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        for i in 0..added {
            let mut data = vec![0u8; cs as usize];
            let base = (old_len + i) * per;
            for c in first..first + added + table_clusters {
                if (base..base + per).contains(&c) {
                    set_entry(&mut data, c - base, self.order, 1);
                }
            }
            let offset = (first + i) * cs;
            write(file, offset, &data).await?;
            table[(old_len + i) as usize] = offset;
            self.blocks
                .insert(old_len + i, Block { data, dirty: false });
        }
        write(file, new_table_offset, &table_bytes(&table)).await?;
        file.flush().await?;
        let mut fields = Vec::with_capacity(12);
        fields.extend_from_slice(&new_table_offset.to_be_bytes());
        fields.extend_from_slice(&(table_clusters as u32).to_be_bytes());
        write(file, field::REFCOUNT_TABLE, &fields).await?;
        file.flush().await?;
        let (old_offset, old_clusters) = (self.table_offset, (old_len * 8).div_ceil(cs));
        self.table = table;
        self.table_offset = new_table_offset;
        self.table_dirty = false;
        for c in 0..old_clusters {
            self.update(file, (old_offset >> self.cluster_bits) + c, -1)
                .await?;
        }
        Ok(())
    }

    async fn write_blocks(&mut self, file: &Node) -> Result<bool> {
        let mut wrote = false;
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&i, _)| i)
            .collect();
        dirty.sort_unstable();
        for index in dirty {
            let offset = self.table[index as usize] & !((1 << 9) - 1);
            if let Some(b) = self.blocks.get_mut(&index) {
                write(file, offset, &b.data).await?;
                b.dirty = false;
                wrote = true;
            }
        }
        Ok(wrote)
    }

    /// Writes every changed refcount block, then (after a flush, so that
    /// the blocks are durable first) the table if it changed. Whether
    /// anything was written.
    pub(crate) async fn write_back(&mut self, file: &Node) -> Result<bool> {
        let wrote = self.write_blocks(file).await?;
        if self.table_dirty {
            if wrote {
                file.flush().await?;
            }
            write(file, self.table_offset, &table_bytes(&self.table)).await?;
            self.table_dirty = false;
            return Ok(true);
        }
        Ok(wrote)
    }
}

fn table_bytes(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Writes `data` at `offset` of the image file.
pub(crate) async fn write(file: &Node, offset: u64, data: &[u8]) -> Result<()> {
    let buf = IoBuf::copy_from(data, file.limits().memory_alignment);
    file.write_growing(offset, buf, false).await.0
}

/// Refcount `slot` of a block with `1 << order`-bit entries: big-endian for
/// whole bytes, least significant bits first below a byte (as QEMU packs
/// them).
fn entry(data: &[u8], slot: u64, order: u32) -> u64 {
    let slot = slot as usize;
    match order {
        0..=2 => {
            let per_byte = 8 >> order;
            let shift = (slot % per_byte) << order;
            u64::from(data[slot / per_byte] >> shift) & ((1 << (1 << order)) - 1)
        }
        _ => {
            let width = 1usize << (order - 3);
            data[slot * width..(slot + 1) * width]
                .iter()
                .fold(0, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
}

fn set_entry(data: &mut [u8], slot: u64, order: u32, value: u64) {
    let slot = slot as usize;
    match order {
        0..=2 => {
            let per_byte = 8 >> order;
            let shift = (slot % per_byte) << order;
            let mask = (((1u16 << (1 << order)) - 1) as u8) << shift;
            let byte = &mut data[slot / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        _ => {
            let width = 1usize << (order - 3);
            let bytes = value.to_be_bytes();
            data[slot * width..(slot + 1) * width].copy_from_slice(&bytes[8 - width..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Setting one entry of any width changes that entry only.
        #[test]
        fn entries_of_every_width_are_independent(
            order in 0u32..=6,
            slots in prop::collection::vec((0u64..64, any::<u64>()), 1..40),
        ) {
            let mut data = vec![0u8; 512];
            let mut model = [0u64; 64];
            let max = u64::MAX >> (64 - (1u32 << order));
            for (slot, value) in slots {
                set_entry(&mut data, slot, order, value & max);
                model[slot as usize] = value & max;
                for (i, want) in model.iter().enumerate() {
                    prop_assert_eq!(entry(&data, i as u64, order), *want);
                }
            }
        }
    }

    #[test]
    fn sixteen_bit_entries_are_big_endian_and_small_ones_lsb_first() {
        let mut data = vec![0u8; 8];
        set_entry(&mut data, 1, 4, 0x0102);
        assert_eq!(&data[2..4], &[1, 2]);
        let mut data = vec![0u8; 2];
        set_entry(&mut data, 1, 1, 3);
        assert_eq!(data[0], 0b1100);
    }
}
