//! A hierarchical dirty bitmap: which parts of a disk changed.
//!
//! [`HBitmap`] has QEMU's `HBitmap` semantics (`util/hbitmap.c`), so that
//! bitmaps move between bitmirror and QEMU unchanged, and improves on it where
//! QEMU is slow or unsafe.
//!
//! # Model
//!
//! The bitmap covers `len` *items* (bytes of a disk). One bit stands for a
//! *granule* of `2^granularity` items; the last granule may be partial. A
//! granule is *dirty* when its bit is set. Every query answers in items.
//!
//! - [`set`](HBitmap::set) rounds its range **outwards** to whole granules, as
//!   QEMU does: a write of one byte dirties its whole granule.
//! - [`reset`](HBitmap::reset) rounds its range **inwards**: it clears only the
//!   granules that lie wholly inside the range (the partial last granule counts
//!   as whole when the range reaches `len`). QEMU asserts that reset ranges are
//!   aligned; rounding a partial reset outwards would clean bytes nobody copied.
//!   So a bitmap here may be a superset of the truth, never a subset.
//!
//! # Invariants
//!
//! Stored in levels of 64-bit words. The *bottom* level holds one bit per
//! granule, in QEMU's layout (bit `i` is bit `i % 64` of word `i / 64`). Above
//! it, each level has one bit per word of the level below, in two summaries:
//!
//! 1. `any`: the bit is set iff the word below is non-zero (QEMU's levels).
//! 2. `full`: the bit is set iff the word below is all ones. Bits past the end
//!    of a level count as ones here, so a search for zeroes never finds them.
//! 3. Bottom bits past the last granule (the padding of the last word) are
//!    always zero, so [`sha256`](HBitmap::sha256) and serialization match QEMU.
//! 4. The number of set bottom bits is kept up to date, so
//!    [`count`](HBitmap::count) is O(1).
//! 5. The top level is a single word.
//!
//! # Complexity
//!
//! With `n` bits and `W = 64`: [`set`](HBitmap::set)/[`reset`](HBitmap::reset)
//! of `m` bits cost O(m/W + log_W n) word operations, and one whose bits are
//! already in the wanted state stops after the bottom level.
//! [`next_dirty`](HBitmap::next_dirty) and [`next_zero`](HBitmap::next_zero)
//! are O(log_W n), both hierarchical (QEMU's `hbitmap_next_zero` scans
//! linearly). Iterating all dirty runs costs O(log_W n) per run.
//! [`merge`](HBitmap::merge) and [`copy_from`](HBitmap::copy_from) of equal
//! granularity are O(n/W); across granularities O(runs · log_W n).
//! Memory is the bottom level plus about 3.2% for the two summaries, allocated
//! once; no operation allocates except [`new`](HBitmap::new),
//! [`try_clone`](HBitmap::try_clone) and [`truncate`](HBitmap::truncate). Large
//! bitmaps are allocated as zero pages, which cost nothing until written.
//!
//! # Limits
//!
//! At most [`MAX_BITS`] (2^41) bits, as in QEMU; a bitmap that big needs
//! 256 GiB of memory for its bottom level, so in practice the machine's memory
//! is the limit. Granularity is 0..=63. Requires a 64-bit target.
//!
//! # Example
//!
//! ```
//! use hbitmap::HBitmap;
//!
//! // A 1 GiB disk tracked in 64 KiB granules.
//! let mut dirty = HBitmap::new(1 << 30, 16)?;
//! dirty.set(4096, 512)?; // a small write dirties its whole granule
//! dirty.set(1 << 20, 100 << 10)?;
//! assert_eq!(dirty.runs().collect::<Vec<_>>(), [(0, 64 << 10), (1 << 20, 128 << 10)]);
//! assert_eq!(dirty.count(), 192 << 10);
//!
//! dirty.reset(0, 1000)?; // a partial reset keeps the granule: superset, never subset
//! assert!(dirty.get(0));
//! assert_eq!(dirty.next_zero(1 << 20, 1 << 30), Some((1 << 20) + (128 << 10)));
//! # Ok::<(), hbitmap::Error>(())
//! ```
//!
//! # Thread safety
//!
//! `HBitmap` is `Send` and `Sync` and never blocks or performs I/O. Queries
//! and [`mark`](HBitmap::mark) take `&self`: any number of threads may mark
//! (write tracking) beside each other and beside queries, with atomic word
//! operations and no lock. Every other change takes `&mut self`, so the
//! borrow checker (or the block layer's read-write lock around each node's
//! bitmaps) keeps it apart from marks: writers mark under the read side,
//! jobs clear and merge under the write side.

#[cfg(not(target_pointer_width = "64"))]
compile_error!("hbitmap needs a 64-bit target");

mod error;
mod runs;
mod serialize;
mod words;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use words::{
    WORD_BITS, WORD_SHIFT, Words, above, assign_bit, assign_bits, bit_in_word, mask, or_words,
    summary_words, tail_padding, word_of, words_for,
};

pub use error::Error;
pub use runs::Runs;
pub use serialize::Deserializer;

/// Largest number of bits (granules) a bitmap may have: 2^41, QEMU's
/// `HBITMAP_LOG_MAX_SIZE` on 64-bit hosts.
pub const MAX_BITS: u64 = 1 << 41;

/// Largest granularity (log2 of items per bit).
pub const MAX_GRANULARITY: u32 = 63;

/// A hierarchical dirty bitmap over `len` items, one bit per `2^granularity`
/// items. See the [crate documentation](crate) for the model, the invariants
/// and the costs.
pub struct HBitmap {
    /// Length in items.
    len: u64,
    /// log2 of items per bit.
    granularity: u32,
    /// Number of bits (granules): `ceil(len / 2^granularity)`.
    bits: u64,
    /// Number of set bits in `bottom`.
    set_bits: AtomicU64,
    /// Padding mask of the last bottom word (bits past `bits`).
    tail_pad: u64,
    /// One bit per granule.
    bottom: Words,
    /// `any[0]` summarizes `bottom`, `any[k]` summarizes `any[k - 1]`.
    any: Vec<Words>,
    /// Same shape as `any`, for all-ones words; padding bits are set.
    full: Vec<Words>,
}

impl std::fmt::Debug for HBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HBitmap")
            .field("len", &self.len)
            .field("granularity", &self.granularity)
            .field("dirty_granules", &self.dirty_granules())
            .finish_non_exhaustive()
    }
}

/// A summary level and its children, as plain words; see
/// [`HBitmap::level_views`].
struct LevelViews<'a> {
    kids_any: &'a [u64],
    kids_full: &'a [u64],
    pad: u64,
    any: &'a mut [u64],
    full: &'a mut [u64],
}

/// The summary levels for a bottom level of `bottom_words` words.
type Summaries = (Vec<Words>, Vec<Words>);

fn alloc_summaries(bottom_words: u64) -> Result<Summaries, Error> {
    let (mut any, mut full) = (Vec::new(), Vec::new());
    let mut children = bottom_words;
    while children > 1 {
        let words = words_for(children);
        any.push(Words::zeroed(words)?);
        let mut f = Words::zeroed(words)?;
        f.set(f.len() - 1, tail_padding(children));
        full.push(f);
        children = words;
    }
    Ok((any, full))
}

impl HBitmap {
    /// Creates a clean bitmap over `len` items with `2^granularity` items per
    /// bit.
    ///
    /// Fails if the granularity exceeds [`MAX_GRANULARITY`], the bitmap would
    /// need more than [`MAX_BITS`] bits, or the memory cannot be allocated.
    pub fn new(len: u64, granularity: u32) -> Result<Self, Error> {
        if granularity > MAX_GRANULARITY {
            return Err(Error::Granularity(granularity));
        }
        let bits = bits_for(len, granularity);
        if bits > MAX_BITS {
            return Err(Error::TooLarge { bits });
        }
        let bottom = Words::zeroed(words_for(bits))?;
        let (any, full) = alloc_summaries(words_for(bits))?;
        Ok(HBitmap {
            len,
            granularity,
            bits,
            set_bits: AtomicU64::new(0),
            tail_pad: tail_padding(bits),
            bottom,
            any,
            full,
        })
    }

    /// A deep copy, or an error if the memory cannot be allocated.
    pub fn try_clone(&self) -> Result<Self, Error> {
        let mut copy = HBitmap::new(self.len, self.granularity)?;
        copy.copy_from(self)?;
        Ok(copy)
    }

    /// Length in items.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// log2 of the number of items per bit.
    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Number of bits (granules), the last one possibly partial.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Number of dirty items, O(1): every item of every dirty granule, the
    /// partial last granule counting only its items inside `len`.
    pub fn count(&self) -> u64 {
        let whole = u128::from(self.dirty_granules()) << self.granularity;
        let overhang = if self.last_bit_set() {
            (u128::from(self.bits) << self.granularity) - u128::from(self.len)
        } else {
            0
        };
        // Lossless: the result is at most `len`.
        (whole - overhang) as u64
    }

    /// Number of dirty granules (set bits), O(1). QEMU reports
    /// `dirty_granules() << granularity` as a bitmap's `count`.
    pub fn dirty_granules(&self) -> u64 {
        self.set_bits.load(Relaxed)
    }

    /// Whether no item is dirty, O(1).
    pub fn is_empty(&self) -> bool {
        self.dirty_granules() == 0
    }

    /// Whether `item` is dirty; items at or past `len` are clean.
    pub fn get(&self, item: u64) -> bool {
        if item >= self.len {
            return false;
        }
        let bit = item >> self.granularity;
        self.bottom.get(word_of(bit)) & (1 << bit_in_word(bit)) != 0
    }

    /// Bytes of memory the bitmap holds, all levels included.
    pub fn memory_usage(&self) -> usize {
        let words: usize = self.bottom.len()
            + self.any.iter().map(|l| l.len()).sum::<usize>()
            + self.full.iter().map(|l| l.len()).sum::<usize>();
        words * 8 + size_of::<Self>()
    }

    /// Marks items `start..start + count` dirty, rounding outwards to whole
    /// granules. An empty range changes nothing.
    pub fn set(&mut self, start: u64, count: u64) -> Result<(), Error> {
        let end = self.check_range(start, count)?;
        if count > 0 {
            self.set_bit_range(start >> self.granularity, (end - 1) >> self.granularity);
        }
        Ok(())
    }

    /// Marks items dirty exactly like [`set`](Self::set), through a shared
    /// reference: any number of threads may `mark` at once, beside queries.
    /// Granules already dirty cost one load each and no write. A query that
    /// runs beside a `mark` sees each granule either before or after it (the
    /// summaries catch up when the `mark` returns); every other change needs
    /// `&mut self`, which waits for all of them.
    pub fn mark(&self, start: u64, count: u64) -> Result<(), Error> {
        let end = self.check_range(start, count)?;
        if count == 0 {
            return Ok(());
        }
        let (first, last) = (start >> self.granularity, (end - 1) >> self.granularity);
        let (wlo, whi) = (word_of(first), word_of(last));
        for w in wlo..=whi {
            let lo = if w == wlo { bit_in_word(first) } else { 0 };
            let hi = if w == whi { bit_in_word(last) } else { 63 };
            let m = mask(lo, hi);
            if self.bottom.get(w) & m == m {
                continue;
            }
            let before = self.bottom.fetch_or(w, m);
            let added = m & !before;
            if added == 0 {
                continue;
            }
            self.set_bits
                .fetch_add(u64::from(added.count_ones()), Relaxed);
            let became_full = (before | m | self.pad(w)) == u64::MAX;
            self.mark_summaries(w, before == 0, became_full);
        }
        Ok(())
    }

    /// Sets the summary bits of bottom word `idx` after a `mark` made it
    /// non-zero (`any`) or all ones (`full`), climbing while a summary word
    /// makes the same transition. Exactly one marker sees each transition,
    /// because the bits it adds were clear before its `fetch_or`.
    fn mark_summaries(&self, mut idx: usize, mut any: bool, mut full: bool) {
        for level in 0..self.any.len() {
            if !any && !full {
                return;
            }
            let (word, bit) = (idx >> WORD_SHIFT, 1u64 << bit_in_word(idx as u64));
            if any {
                any = self.any[level].fetch_or(word, bit) == 0;
            }
            if full {
                full = self.full[level].fetch_or(word, bit) | bit == u64::MAX;
            }
            idx = word;
        }
    }

    /// Marks items `start..start + count` clean, rounding inwards: only
    /// granules that lie wholly inside the range are cleared, and the partial
    /// last granule counts as whole when the range reaches `len`.
    pub fn reset(&mut self, start: u64, count: u64) -> Result<(), Error> {
        let end = self.check_range(start, count)?;
        let gran_mask = (1u64 << self.granularity) - 1;
        let first = (start >> self.granularity) + u64::from(start & gran_mask != 0);
        let end_bit = if end == self.len {
            self.bits
        } else {
            end >> self.granularity
        };
        if first < end_bit {
            self.clear_bit_range(first, end_bit - 1);
        }
        Ok(())
    }

    /// Marks every item clean.
    pub fn reset_all(&mut self) {
        self.bottom.fill(0);
        for level in &mut self.any {
            level.fill(0);
        }
        let mut children = self.bottom.len() as u64;
        for level in &mut self.full {
            level.fill(0);
            level.set(level.len() - 1, tail_padding(children));
            children = level.len() as u64;
        }
        *self.set_bits.get_mut() = 0;
    }

    /// The first dirty item in `start..end` (`end` is clamped to `len`).
    pub fn next_dirty(&self, start: u64, end: u64) -> Option<u64> {
        let end = end.min(self.len);
        if start >= end {
            return None;
        }
        let bit = self.find_set_from(start >> self.granularity)?;
        Some(start.max(bit << self.granularity)).filter(|&item| item < end)
    }

    /// The first clean item in `start..end` (`end` is clamped to `len`).
    pub fn next_zero(&self, start: u64, end: u64) -> Option<u64> {
        let end = end.min(self.len);
        if start >= end {
            return None;
        }
        let bit = self.find_zero_from(start >> self.granularity)?;
        Some(start.max(bit << self.granularity)).filter(|&item| item < end)
    }

    /// The first dirty area in `start..end`: its first item and its length,
    /// which stops at the next clean item, at `end`, or after `max_len` items,
    /// whichever comes first. `None` if nothing is dirty there or `max_len` is
    /// zero.
    pub fn next_dirty_area(&self, start: u64, end: u64, max_len: u64) -> Option<(u64, u64)> {
        if max_len == 0 {
            return None;
        }
        let end = end.min(self.len);
        let first = self.next_dirty(start, end)?;
        let limit = end.min(first.saturating_add(max_len));
        let stop = self.next_zero(first, limit).unwrap_or(limit);
        Some((first, stop - first))
    }

    /// Iterates over the maximal dirty runs as `(start, len)` in items, in
    /// order; the last run stops at `len`.
    pub fn runs(&self) -> Runs<'_> {
        Runs::new(self, 0)
    }

    /// Like [`runs`](Self::runs), from item `start` on (a run that began
    /// before `start` is reported from `start`).
    pub fn runs_from(&self, start: u64) -> Runs<'_> {
        Runs::new(self, start)
    }

    /// ORs `other` into `self`. Both must cover the same number of items; the
    /// granularities may differ, in which case every dirty run of `other` is
    /// set here, rounded outwards to this bitmap's granules (a superset).
    pub fn merge(&mut self, other: &HBitmap) -> Result<(), Error> {
        self.check_same_len(other)?;
        if other.is_empty() {
            return Ok(());
        }
        if other.granularity != self.granularity {
            for (start, count) in other.runs() {
                self.set(start, count)?;
            }
            return Ok(());
        }
        let (added, changed) = or_words(self.bottom.as_mut_slice(), other.bottom.iter());
        *self.set_bits.get_mut() += added;
        if let Some((lo, hi)) = changed {
            self.rebuild_summaries(lo, hi);
        }
        Ok(())
    }

    /// Makes `self` an exact copy of `src`'s dirty items: the founding patch's
    /// `hbitmap_copy`. Both must cover the same number of items. With equal
    /// granularities this is a plain copy; otherwise `self` is cleared and
    /// `src` merged in (rounded outwards to this bitmap's granules).
    pub fn copy_from(&mut self, src: &HBitmap) -> Result<(), Error> {
        self.check_same_len(src)?;
        if src.granularity != self.granularity {
            self.reset_all();
            return self.merge(src);
        }
        self.bottom.copy_prefix(&src.bottom, src.bottom.len());
        for (ours, theirs) in self.any.iter_mut().zip(&src.any) {
            ours.copy_prefix(theirs, theirs.len());
        }
        for (ours, theirs) in self.full.iter_mut().zip(&src.full) {
            ours.copy_prefix(theirs, theirs.len());
        }
        *self.set_bits.get_mut() = src.dirty_granules();
        Ok(())
    }

    /// Changes the length to `len` items. Growing adds clean items (a dirty
    /// partial last granule stays dirty and now covers more items); shrinking
    /// drops the granules past the new end, keeping the one the new end falls
    /// in. On error the bitmap is unchanged.
    pub fn truncate(&mut self, len: u64) -> Result<(), Error> {
        let bits = bits_for(len, self.granularity);
        if bits > MAX_BITS {
            return Err(Error::TooLarge { bits });
        }
        if bits == self.bits {
            self.len = len;
            return Ok(());
        }
        let words = words_for(bits);
        let mut bottom = Words::zeroed(words)?;
        let (any, full) = alloc_summaries(words)?;
        bottom.copy_prefix(&self.bottom, self.bottom.len());
        let tail_pad = tail_padding(bits);
        *bottom.word_mut(bottom.len() - 1) &= !tail_pad;
        *self.set_bits.get_mut() = bottom.iter().map(|w| u64::from(w.count_ones())).sum();
        self.len = len;
        self.bits = bits;
        self.tail_pad = tail_pad;
        self.bottom = bottom;
        self.any = any;
        self.full = full;
        self.rebuild_summaries(0, self.bottom.len() - 1);
        Ok(())
    }

    // ---- internals -------------------------------------------------------

    /// Checks `start..start + count` against `len`; returns the end.
    fn check_range(&self, start: u64, count: u64) -> Result<u64, Error> {
        start
            .checked_add(count)
            .filter(|&end| end <= self.len)
            .ok_or(Error::OutOfRange {
                start,
                count,
                len: self.len,
            })
    }

    fn check_same_len(&self, other: &HBitmap) -> Result<(), Error> {
        if self.len == other.len {
            Ok(())
        } else {
            Err(Error::LengthMismatch {
                ours: self.len,
                theirs: other.len,
            })
        }
    }

    fn last_bit_set(&self) -> bool {
        self.bits > 0 && {
            let bit = self.bits - 1;
            self.bottom.get(word_of(bit)) & (1 << bit_in_word(bit)) != 0
        }
    }

    /// Padding mask of bottom word `w`.
    #[inline]
    fn pad(&self, w: usize) -> u64 {
        if w + 1 == self.bottom.len() {
            self.tail_pad
        } else {
            0
        }
    }

    /// Sets bottom bits `first..=last`, both below `bits`.
    fn set_bit_range(&mut self, first: u64, last: u64) {
        let (wlo, whi) = (word_of(first), word_of(last));
        if wlo == whi {
            let word = &mut self.bottom.as_mut_slice()[wlo];
            let old = *word;
            let new = old | mask(bit_in_word(first), bit_in_word(last));
            if new == old {
                return;
            }
            *word = new;
            *self.set_bits.get_mut() += u64::from((new ^ old).count_ones());
            let full = new | self.pad(wlo) == u64::MAX;
            self.propagate_word(wlo, true, full);
            return;
        } else {
            let mut added = 0u64;
            let mut or_word = |w: &mut u64, m: u64| {
                added += u64::from((m & !*w).count_ones());
                *w |= m;
            };
            or_word(self.bottom.word_mut(wlo), mask(bit_in_word(first), 63));
            for w in self.bottom.range_mut(wlo + 1..whi) {
                or_word(w, u64::MAX);
            }
            or_word(self.bottom.word_mut(whi), mask(0, bit_in_word(last)));
            *self.set_bits.get_mut() += added;
        }
        self.propagate(wlo, whi, true);
    }

    /// Clears bottom bits `first..=last`, both below `bits`.
    fn clear_bit_range(&mut self, first: u64, last: u64) {
        let (wlo, whi) = (word_of(first), word_of(last));
        if wlo == whi {
            let word = &mut self.bottom.as_mut_slice()[wlo];
            let old = *word;
            let new = old & !mask(bit_in_word(first), bit_in_word(last));
            if new == old {
                return;
            }
            *word = new;
            *self.set_bits.get_mut() -= u64::from((new ^ old).count_ones());
            self.propagate_word(wlo, new != 0, false);
            return;
        } else {
            let mut removed = 0u64;
            let mut clear_word = |w: &mut u64, m: u64| {
                removed += u64::from((m & *w).count_ones());
                *w &= !m;
            };
            clear_word(self.bottom.word_mut(wlo), mask(bit_in_word(first), 63));
            for w in self.bottom.range_mut(wlo + 1..whi) {
                clear_word(w, u64::MAX);
            }
            clear_word(self.bottom.word_mut(whi), mask(0, bit_in_word(last)));
            *self.set_bits.get_mut() -= removed;
        }
        self.propagate(wlo, whi, false);
    }

    /// Plain views of summary level `level` (writable) and of the level
    /// below it, its children; `pad` is the padding of the last child.
    fn level_views(&mut self, level: usize) -> LevelViews<'_> {
        let (any_lower, any_upper) = self.any.split_at_mut(level);
        let (full_lower, full_upper) = self.full.split_at_mut(level);
        let (kids_any, kids_full, pad): (&[u64], &[u64], u64) = match level {
            0 => {
                let bottom: &[u64] = self.bottom.as_mut_slice();
                (bottom, bottom, self.tail_pad)
            }
            _ => (
                any_lower[level - 1].as_mut_slice(),
                full_lower[level - 1].as_mut_slice(),
                0,
            ),
        };
        LevelViews {
            kids_any,
            kids_full,
            pad,
            any: any_upper[0].as_mut_slice(),
            full: full_upper[0].as_mut_slice(),
        }
    }

    /// Brings the summaries up to date after bottom words `lo..=hi` changed,
    /// where every word strictly between `lo` and `hi` became `uniform`
    /// (all ones or all zeroes). Stops as soon as a level is unchanged.
    fn propagate(&mut self, mut lo: usize, mut hi: usize, uniform: bool) {
        for level in 0..self.any.len() {
            let v = self.level_views(level);
            // Children strictly inside the range are uniform, and so are the
            // parent words strictly inside it at every level above.
            let mut changed = hi > lo + 1;
            if changed {
                assign_bits(v.any, lo + 1, hi - 1, uniform);
                assign_bits(v.full, lo + 1, hi - 1, uniform);
            }
            let edges = [lo, hi];
            for &edge in &edges[..if lo == hi { 1 } else { 2 }] {
                let pad = if edge + 1 == v.kids_full.len() {
                    v.pad
                } else {
                    0
                };
                changed |= assign_bit(v.any, edge, v.kids_any[edge] != 0);
                changed |= assign_bit(v.full, edge, v.kids_full[edge] | pad == u64::MAX);
            }
            if !changed {
                return;
            }
            lo >>= WORD_SHIFT;
            hi >>= WORD_SHIFT;
        }
    }

    /// Brings the summaries up to date after one bottom word changed and is
    /// now non-zero (`any`) and/or all ones (`full`): the common case of a
    /// small write, one bit per level, stopping at the first level that
    /// does not change.
    fn propagate_word(&mut self, mut idx: usize, mut any: bool, mut full: bool) {
        for level in 0..self.any.len() {
            let (word, bit) = (idx >> WORD_SHIFT, 1u64 << bit_in_word(idx as u64));
            let a = &mut self.any[level].as_mut_slice()[word];
            let old_any = *a;
            *a = if any { old_any | bit } else { old_any & !bit };
            let new_any = *a;
            let f = &mut self.full[level].as_mut_slice()[word];
            let old_full = *f;
            *f = if full {
                old_full | bit
            } else {
                old_full & !bit
            };
            if new_any == old_any && *f == old_full {
                return;
            }
            any = new_any != 0;
            full = *f == u64::MAX;
            idx = word;
        }
    }

    /// Recomputes every summary word above bottom words `lo..=hi`.
    fn rebuild_summaries(&mut self, mut lo: usize, mut hi: usize) {
        for level in 0..self.any.len() {
            let (plo, phi) = (lo >> WORD_SHIFT, hi >> WORD_SHIFT);
            let v = self.level_views(level);
            let children = v.kids_any.len();
            for parent in plo..=phi {
                let first = parent << WORD_SHIFT;
                let kids = first..(first + WORD_BITS as usize).min(children);
                let pad = if kids.end == children { v.pad } else { 0 };
                let (any, full) = summary_words(&v.kids_any[kids.clone()], &v.kids_full[kids], pad);
                v.any[parent] = any;
                v.full[parent] = full;
            }
            lo = plo;
            hi = phi;
        }
    }

    /// The first set bottom bit at or after `bit`.
    fn find_set_from(&self, bit: u64) -> Option<u64> {
        if bit >= self.bits {
            return None;
        }
        let mut idx = word_of(bit);
        let m = self.bottom.get(idx) & (u64::MAX << bit_in_word(bit));
        if m != 0 {
            return Some(((idx as u64) << WORD_SHIFT) | u64::from(m.trailing_zeros()));
        }
        // Climb until a summary shows a non-zero word after the current one.
        let mut level = 0;
        loop {
            let summary = self.any.get(level)?;
            let m = summary.get(idx >> WORD_SHIFT) & above(bit_in_word(idx as u64));
            if m != 0 {
                idx = ((idx >> WORD_SHIFT) << WORD_SHIFT) | m.trailing_zeros() as usize;
                break;
            }
            idx >>= WORD_SHIFT;
            level += 1;
        }
        // Descend along the lowest set bits.
        while level > 0 {
            level -= 1;
            idx = (idx << WORD_SHIFT) | self.any[level].get(idx).trailing_zeros() as usize;
        }
        Some(((idx as u64) << WORD_SHIFT) | u64::from(self.bottom.get(idx).trailing_zeros()))
    }

    /// The first clear bottom bit at or after `bit`.
    fn find_zero_from(&self, bit: u64) -> Option<u64> {
        if bit >= self.bits {
            return None;
        }
        let mut idx = word_of(bit);
        let m = !(self.bottom.get(idx) | self.pad(idx)) & (u64::MAX << bit_in_word(bit));
        if m != 0 {
            return Some(((idx as u64) << WORD_SHIFT) | u64::from(m.trailing_zeros()));
        }
        let mut level = 0;
        loop {
            let summary = self.full.get(level)?;
            let m = !summary.get(idx >> WORD_SHIFT) & above(bit_in_word(idx as u64));
            if m != 0 {
                idx = ((idx >> WORD_SHIFT) << WORD_SHIFT) | m.trailing_zeros() as usize;
                break;
            }
            idx >>= WORD_SHIFT;
            level += 1;
        }
        while level > 0 {
            level -= 1;
            idx = (idx << WORD_SHIFT) | (!self.full[level].get(idx)).trailing_zeros() as usize;
        }
        let w = self.bottom.get(idx) | self.pad(idx);
        Some(((idx as u64) << WORD_SHIFT) | u64::from((!w).trailing_zeros()))
    }
}

/// Number of granules of `2^granularity` items needed for `len` items.
fn bits_for(len: u64, granularity: u32) -> u64 {
    let whole = len >> granularity;
    whole + u64::from(len & ((1u64 << granularity) - 1) != 0)
}

impl HBitmap {
    /// Checks every invariant of the [crate documentation](crate) by brute
    /// force, O(bits); returns the first violation found. For tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let last = self.bottom.len() - 1;
        if self.bottom.get(last) & self.tail_pad != 0 {
            return Err(format!(
                "padding bits set in the last word: {:#x}",
                self.bottom.get(last)
            ));
        }
        let counted: u64 = self.bottom.iter().map(|w| u64::from(w.count_ones())).sum();
        if counted != self.dirty_granules() {
            return Err(format!(
                "count is {} but {counted} bits are set",
                self.dirty_granules()
            ));
        }
        let mut children = self.bottom.len();
        for level in 0..self.any.len() {
            for parent in 0..self.any[level].len() {
                let first = parent << WORD_SHIFT;
                let n = (children - first).min(WORD_BITS as usize);
                let (kids_any, kids_full) = match level {
                    0 => (&self.bottom, &self.bottom),
                    _ => (&self.any[level - 1], &self.full[level - 1]),
                };
                let a: Vec<u64> = kids_any.range(first..first + n).collect();
                let f: Vec<u64> = kids_full.range(first..first + n).collect();
                let pad = if level == 0 && first + n == children {
                    self.tail_pad
                } else {
                    0
                };
                let (any, full) = summary_words(&a, &f, pad);
                if self.any[level].get(parent) != any || self.full[level].get(parent) != full {
                    return Err(format!(
                        "summary level {level} word {parent}: any {:#x} full {:#x}, \
                         expected {any:#x} {full:#x}",
                        self.any[level].get(parent),
                        self.full[level].get(parent)
                    ));
                }
            }
            children = self.any[level].len();
        }
        if self.any.last().is_some_and(|top| top.len() != 1) {
            return Err("the top level is not a single word".into());
        }
        Ok(())
    }
}
