//! QEMU-compatible serialization and the bitmap's SHA-256.
//!
//! The serialized form of a range is the bottom level's 64-bit words that
//! cover it, little-endian: the layout QEMU uses in qcow2 bitmap clusters and
//! in bitmap migration. Ranges start on a word boundary of bits
//! ([`HBitmap::serialization_align`]) and, except for the one ending at the
//! last bit, have an aligned length too.

use sha2::{Digest, Sha256};

use crate::words::{WORD_BITS, WORD_SHIFT, word_of};
use crate::{Error, HBitmap};

/// Where a serialization range lies in the bottom level: `words` words from
/// `first`.
struct Chunk {
    first: usize,
    words: usize,
}

impl HBitmap {
    /// Alignment in items of serialization ranges: 64 bits' worth of items
    /// (`64 << granularity`, saturated at 2^63 for granularities above 56).
    pub fn serialization_align(&self) -> u64 {
        1u64 << (self.granularity + WORD_SHIFT).min(63)
    }

    /// Bytes that [`serialize_part`](Self::serialize_part) writes for
    /// `start..start + count`.
    pub fn serialization_size(&self, start: u64, count: u64) -> Result<u64, Error> {
        Ok(self.chunk(start, count)?.words as u64 * 8)
    }

    /// Writes the words covering `start..start + count` into `buf`, as
    /// little-endian 64-bit words; returns the number of bytes written.
    pub fn serialize_part(&self, buf: &mut [u8], start: u64, count: u64) -> Result<usize, Error> {
        let chunk = self.chunk(start, count)?;
        let out = checked_buf_mut(buf, chunk.words)?;
        let words = self.bottom.range(chunk.first..chunk.first + chunk.words);
        for (dst, word) in out.chunks_exact_mut(8).zip(words) {
            dst.copy_from_slice(&word.to_le_bytes());
        }
        Ok(out.len())
    }

    /// SHA-256 of the bottom level, as lowercase hex: the value QEMU's
    /// `x-debug-block-dirty-bitmap-sha256` returns for the same bits.
    pub fn sha256(&self) -> String {
        let mut hasher = Sha256::new();
        let mut block = [0u8; 4096];
        let per_block = block.len() / 8;
        let mut start = 0;
        while start < self.bottom.len() {
            let n = per_block.min(self.bottom.len() - start);
            for (dst, word) in block
                .chunks_exact_mut(8)
                .zip(self.bottom.range(start..start + n))
            {
                dst.copy_from_slice(&word.to_le_bytes());
            }
            hasher.update(&block[..n * 8]);
            start += n;
        }
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Starts filling the bitmap from serialized parts. The bitmap stays
    /// borrowed until the [`Deserializer`] is finished or dropped, which
    /// brings the summaries up to date: nobody can query it half-built.
    pub fn deserializer(&mut self) -> Deserializer<'_> {
        Deserializer {
            bitmap: self,
            touched: None,
        }
    }

    /// Locates `start..start + count` in the bottom level, checking QEMU's
    /// rules: `start` aligned; the last item inside the last granule at most;
    /// `count` aligned unless the range ends in the last granule.
    fn chunk(&self, start: u64, count: u64) -> Result<Chunk, Error> {
        if count == 0 {
            return Ok(Chunk { first: 0, words: 0 });
        }
        let gran_mask = (1u64 << self.granularity) - 1;
        let last = start.checked_add(count - 1);
        let last_bit = last.map(|l| l >> self.granularity);
        let Some(last_bit) = last_bit.filter(|&b| b < self.bits) else {
            return Err(Error::OutOfRange {
                start,
                count,
                len: self.len,
            });
        };
        let first_bit = start >> self.granularity;
        let word_aligned =
            |items: u64| items & gran_mask == 0 && (items >> self.granularity) % WORD_BITS == 0;
        if !word_aligned(start) || (last_bit != self.bits - 1 && !word_aligned(count)) {
            return Err(Error::Misaligned {
                start,
                count,
                align: self.serialization_align(),
            });
        }
        let first = word_of(first_bit);
        Ok(Chunk {
            first,
            words: word_of(last_bit) - first + 1,
        })
    }

    /// Replaces bottom words from `first` on with `words`, keeping the bit
    /// count and the padding invariant; returns the range of words touched.
    fn store_words(
        &mut self,
        first: usize,
        words: impl Iterator<Item = u64>,
    ) -> Option<(usize, usize)> {
        let last_word = self.bottom.len() - 1;
        let tail_pad = self.tail_pad;
        let mut set_bits = self.dirty_granules();
        let mut touched = None;
        for (i, word) in (first..).zip(words) {
            let word = if i == last_word {
                word & !tail_pad
            } else {
                word
            };
            let slot = self.bottom.word_mut(i);
            set_bits = set_bits - u64::from(slot.count_ones()) + u64::from(word.count_ones());
            *slot = word;
            touched = Some((first, i));
        }
        *self.set_bits.get_mut() = set_bits;
        touched
    }
}

/// Fills an [`HBitmap`] from serialized parts, QEMU's
/// `hbitmap_deserialize_*` family. Parts may come in any order and overwrite
/// what they cover. Dropping it (or [`finish`](Self::finish)) rebuilds the
/// summary levels above the words that were written, so the bitmap is
/// consistent again before anyone else can see it.
#[derive(Debug)]
pub struct Deserializer<'a> {
    bitmap: &'a mut HBitmap,
    /// Bottom words written so far, as an inclusive range.
    touched: Option<(usize, usize)>,
}

impl Deserializer<'_> {
    /// Loads the words covering `start..start + count` from `buf`
    /// (little-endian 64-bit words, as [`HBitmap::serialize_part`] writes
    /// them). Bits past the bitmap's end are ignored.
    pub fn part(&mut self, buf: &[u8], start: u64, count: u64) -> Result<(), Error> {
        let chunk = self.bitmap.chunk(start, count)?;
        let need = chunk.words as u64 * 8;
        let input = buf.get(..chunk.words * 8).ok_or(Error::BufferTooSmall {
            need,
            have: buf.len() as u64,
        })?;
        let words = input
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
        let touched = self.bitmap.store_words(chunk.first, words);
        self.touch(touched);
        Ok(())
    }

    /// Marks the words covering `start..start + count` all clean.
    pub fn zeroes(&mut self, start: u64, count: u64) -> Result<(), Error> {
        self.fill(start, count, 0)
    }

    /// Marks the words covering `start..start + count` all dirty.
    pub fn ones(&mut self, start: u64, count: u64) -> Result<(), Error> {
        self.fill(start, count, u64::MAX)
    }

    /// Ends deserialization; the same as dropping the deserializer.
    pub fn finish(self) {}

    fn fill(&mut self, start: u64, count: u64, word: u64) -> Result<(), Error> {
        let chunk = self.bitmap.chunk(start, count)?;
        let touched = self
            .bitmap
            .store_words(chunk.first, std::iter::repeat_n(word, chunk.words));
        self.touch(touched);
        Ok(())
    }

    fn touch(&mut self, range: Option<(usize, usize)>) {
        if let Some((lo, hi)) = range {
            self.touched = Some(match self.touched {
                Some((a, b)) => (a.min(lo), b.max(hi)),
                None => (lo, hi),
            });
        }
    }
}

impl Drop for Deserializer<'_> {
    fn drop(&mut self) {
        if let Some((lo, hi)) = self.touched.take() {
            self.bitmap.rebuild_summaries(lo, hi);
        }
    }
}

/// The first `words * 8` bytes of `buf`, or an error if it is shorter.
fn checked_buf_mut(buf: &mut [u8], words: usize) -> Result<&mut [u8], Error> {
    let have = buf.len() as u64;
    buf.get_mut(..words * 8).ok_or(Error::BufferTooSmall {
        need: words as u64 * 8,
        have,
    })
}
