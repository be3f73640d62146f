//! The one error type of this crate.

/// Everything that can go wrong when building, changing or (de)serializing an
/// [`HBitmap`](crate::HBitmap). Every variant carries the numbers needed to
/// understand the failure without a debugger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The granularity (log2 of items per bit) is larger than 63.
    #[error("granularity {0} is out of range: log2(items per bit) must be 0..=63")]
    Granularity(u32),

    /// The bitmap would need more bits than [`MAX_BITS`](crate::MAX_BITS).
    #[error("a bitmap of {bits} bits is larger than the maximum of 2^41 bits")]
    TooLarge {
        /// Number of bits that were asked for.
        bits: u64,
    },

    /// The allocator refused the memory for the bitmap's levels.
    #[error("cannot allocate {bytes} bytes for a dirty bitmap")]
    OutOfMemory {
        /// Size of the allocation that failed.
        bytes: u64,
    },

    /// A range does not lie inside `0..len` (or its end overflows).
    #[error("range {start}+{count} lies outside the bitmap's {len} items")]
    OutOfRange {
        /// First item of the range.
        start: u64,
        /// Number of items in the range.
        count: u64,
        /// Length of the bitmap in items.
        len: u64,
    },

    /// Two bitmaps that must cover the same number of items do not.
    #[error("bitmaps differ in length: {ours} items here, {theirs} in the other")]
    LengthMismatch {
        /// Length of the bitmap being changed.
        ours: u64,
        /// Length of the other bitmap.
        theirs: u64,
    },

    /// A serialization range is not aligned to whole 64-bit words of bits.
    #[error(
        "serialization range {start}+{count} is not aligned to {align} items \
         (only the range that ends at the last bit may have an unaligned length)"
    )]
    Misaligned {
        /// First item of the range.
        start: u64,
        /// Number of items in the range.
        count: u64,
        /// Required alignment in items, see
        /// [`HBitmap::serialization_align`](crate::HBitmap::serialization_align).
        align: u64,
    },

    /// A serialization buffer is shorter than the range needs.
    #[error("serialization buffer holds {have} bytes, the range needs {need}")]
    BufferTooSmall {
        /// Bytes the range needs.
        need: u64,
        /// Bytes the buffer has.
        have: u64,
    },
}
