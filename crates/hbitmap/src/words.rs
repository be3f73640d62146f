//! Word-level helpers shared by every level of the bitmap.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::Error;

/// Bits in one storage word.
pub(crate) const WORD_BITS: u64 = u64::BITS as u64;
/// log2 of [`WORD_BITS`]: shifting an index right by this moves one level up.
pub(crate) const WORD_SHIFT: u32 = 6;
const WORD_MASK: u64 = WORD_BITS - 1;

/// Index of the word that holds `bit`.
#[inline]
pub(crate) fn word_of(bit: u64) -> usize {
    // Lossless: bit counts are capped at 2^41, so word indices fit in 35 bits.
    (bit >> WORD_SHIFT) as usize
}

/// Position of `bit` inside its word.
#[inline]
pub(crate) fn bit_in_word(bit: u64) -> u32 {
    (bit & WORD_MASK) as u32
}

/// Mask with bits `lo..=hi` set (`lo <= hi < 64`).
#[inline]
pub(crate) fn mask(lo: u32, hi: u32) -> u64 {
    debug_assert!(lo <= hi && hi < 64);
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// Mask of the bits strictly above `bit` (`bit < 64`).
#[inline]
pub(crate) fn above(bit: u32) -> u64 {
    (u64::MAX << bit) << 1
}

/// Number of words needed for `bits` bits; at least one, as in QEMU, so that
/// even an empty bitmap has a word to hash and to search.
#[inline]
pub(crate) fn words_for(bits: u64) -> u64 {
    bits.div_ceil(WORD_BITS).max(1)
}

/// Mask of the bits of the last word that lie beyond `bits` (the padding).
/// An empty bitmap's only word is all padding.
#[inline]
pub(crate) fn tail_padding(bits: u64) -> u64 {
    match bit_in_word(bits) {
        0 if bits == 0 => u64::MAX,
        0 => 0,
        r => u64::MAX << r,
    }
}

/// One level of the bitmap: words that `&mut` methods change in place and
/// that [`HBitmap::mark`](crate::HBitmap::mark) sets atomically through a
/// shared reference. Plain accesses compile to plain loads and stores.
pub(crate) struct Words(Box<[AtomicU64]>);

impl Words {
    /// `n` zeroed words, allocated without touching them: large allocations
    /// come from the kernel as zero pages that cost nothing until written,
    /// and a refusal is an error instead of an abort.
    pub(crate) fn zeroed(n: u64) -> Result<Words, Error> {
        let bytes = n.saturating_mul(8);
        let len = usize::try_from(n).map_err(|_| Error::OutOfMemory { bytes })?;
        bytemuck::allocation::try_zeroed_slice_box(len)
            .map(Words)
            .map_err(|()| Error::OutOfMemory { bytes })
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> u64 {
        self.0[i].load(Relaxed)
    }

    #[inline]
    pub(crate) fn set(&mut self, i: usize, value: u64) {
        *self.0[i].get_mut() = value;
    }

    #[inline]
    pub(crate) fn word_mut(&mut self, i: usize) -> &mut u64 {
        self.0[i].get_mut()
    }

    /// Atomically ORs `mask` into word `i`; returns the word before.
    #[inline]
    pub(crate) fn fetch_or(&self, i: usize, mask: u64) -> u64 {
        self.0[i].fetch_or(mask, Relaxed)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().map(|w| w.load(Relaxed))
    }

    /// Words `range`, read.
    pub(crate) fn range(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = u64> + '_ {
        self.0[range].iter().map(|w| w.load(Relaxed))
    }

    /// All words as plain integers, for the `&mut self` methods: they may
    /// use plain (vectorizable) loops.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u64] {
        let len = self.0.len();
        let ptr = self.0.as_mut_ptr().cast::<u64>();
        // SAFETY: `AtomicU64` has the size, alignment (on the 64-bit targets
        // this crate requires) and bit validity of `u64`, and `&mut self`
        // rules out every other access, atomic or not, for the lifetime of
        // the slice: what the unstable `AtomicU64::get_mut_slice` does.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// Words `range`, writable.
    pub(crate) fn range_mut(
        &mut self,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = &mut u64> {
        self.as_mut_slice()[range].iter_mut()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut u64> {
        self.as_mut_slice().iter_mut()
    }

    pub(crate) fn fill(&mut self, value: u64) {
        self.as_mut_slice().fill(value);
    }

    /// Copies the first `n` words of `src`.
    pub(crate) fn copy_prefix(&mut self, src: &Words, n: usize) {
        for (dst, w) in self.iter_mut().zip(src.iter()).take(n) {
            *dst = w;
        }
    }
}

/// The `any` and `full` summary words of up to 64 children: `any_kids[j]`
/// and `full_kids[j]` are child `j`'s words in the two summaries (the same
/// words at the bottom). `last_pad` is the padding of the last child when it
/// is the bottom level's last word.
pub(crate) fn summary_words(any_kids: &[u64], full_kids: &[u64], last_pad: u64) -> (u64, u64) {
    let n = any_kids.len();
    // Plain passes over slices, which the compiler can vectorize.
    let mut full = tail_padding(n as u64);
    for (j, &w) in full_kids.iter().enumerate() {
        full |= u64::from(w == u64::MAX) << j;
    }
    let mut any = 0u64;
    for (j, &w) in any_kids.iter().enumerate() {
        any |= u64::from(w != 0) << j;
    }
    if let (Some(&last), true) = (full_kids.last(), last_pad != 0) {
        full |= u64::from(last | last_pad == u64::MAX) << (n - 1);
    }
    (any, full)
}

/// ORs `src` into `dst` word by word. Returns the number of bits that were
/// added and the first and last index of the words that changed.
pub(crate) fn or_words(
    dst: &mut [u64],
    src: impl Iterator<Item = u64>,
) -> (u64, Option<(usize, usize)>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU has the popcnt instruction, checked just above.
        return unsafe { or_words_popcnt(dst, src) };
    }
    or_words_portable(dst, src)
}

/// [`or_words`] compiled with the `popcnt` instruction, which the portable
/// x86-64 baseline lacks (its bit count is a dozen instructions).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn or_words_popcnt(
    dst: &mut [u64],
    src: impl Iterator<Item = u64>,
) -> (u64, Option<(usize, usize)>) {
    or_words_portable(dst, src)
}

#[inline(always)]
fn or_words_portable(
    dst: &mut [u64],
    src: impl Iterator<Item = u64>,
) -> (u64, Option<(usize, usize)>) {
    let (mut added, mut lo, mut hi) = (0u64, usize::MAX, 0usize);
    for (i, (word, theirs)) in dst.iter_mut().zip(src).enumerate() {
        let new_bits = theirs & !*word;
        *word |= theirs;
        added += u64::from(new_bits.count_ones());
        // Branch-free: which words change is as random as the bitmaps.
        let hit = new_bits != 0;
        lo = if hit { lo.min(i) } else { lo };
        hi = if hit { i } else { hi };
    }
    (added, (lo <= hi).then_some((lo, hi)))
}

/// Sets bit `i` of `arr` to `value`; returns whether it changed.
#[inline]
pub(crate) fn assign_bit(arr: &mut [u64], i: usize, value: bool) -> bool {
    let w = &mut arr[i >> WORD_SHIFT];
    let m = 1u64 << (i as u64 & WORD_MASK);
    let old = *w;
    *w = if value { old | m } else { old & !m };
    *w != old
}

/// Sets bits `lo..=hi` of `arr` to `value`.
pub(crate) fn assign_bits(arr: &mut [u64], lo: usize, hi: usize, value: bool) {
    debug_assert!(lo <= hi);
    let (wlo, whi) = (lo >> WORD_SHIFT, hi >> WORD_SHIFT);
    let (blo, bhi) = (bit_in_word(lo as u64), bit_in_word(hi as u64));
    let fill = if value { u64::MAX } else { 0 };
    let apply = |w: &mut u64, m: u64| *w = if value { *w | m } else { *w & !m };
    if wlo == whi {
        apply(&mut arr[wlo], mask(blo, bhi));
        return;
    }
    apply(&mut arr[wlo], mask(blo, 63));
    arr[wlo + 1..whi].fill(fill);
    apply(&mut arr[whi], mask(0, bhi));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask(0, 63), u64::MAX);
        assert_eq!(mask(0, 0), 1);
        assert_eq!(mask(63, 63), 1 << 63);
        assert_eq!(mask(4, 7), 0xf0);
        assert_eq!(above(63), 0);
        assert_eq!(above(0), u64::MAX - 1);
        assert_eq!(tail_padding(0), u64::MAX);
        assert_eq!(tail_padding(64), 0);
        assert_eq!(tail_padding(65), u64::MAX - 1);
        assert_eq!(words_for(0), 1);
        assert_eq!(words_for(64), 1);
        assert_eq!(words_for(65), 2);
    }

    #[test]
    fn assign_bits_across_words() {
        let mut a = Words::zeroed(4).unwrap();
        let words = |a: &Words| a.iter().collect::<Vec<_>>();
        assign_bits(a.as_mut_slice(), 60, 200, true);
        assert_eq!(
            words(&a),
            [0xf << 60, u64::MAX, u64::MAX, mask(0, 200 - 192)]
        );
        assign_bits(a.as_mut_slice(), 61, 199, false);
        assert_eq!(words(&a), [1 << 60, 0, 0, 1 << 8]);
        assert!(assign_bit(a.as_mut_slice(), 1, true));
        assert!(!assign_bit(a.as_mut_slice(), 1, true));
        assert_eq!(a.get(0), (1 << 60) | 2);
        assert_eq!(a.fetch_or(3, 1), 1 << 8);
        assert_eq!(a.get(3), (1 << 8) | 1);
    }
}
