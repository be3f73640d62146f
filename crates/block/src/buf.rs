//! Owned, aligned I/O buffers.

/// An owned byte buffer whose start is aligned to a power of two, as
/// `O_DIRECT` needs. Requests take and give buffers by value, so a driver can
/// hand them to a thread or to the kernel (io_uring) without copying.
///
/// Alignment is reached without `unsafe`: the buffer over-allocates by the
/// alignment and starts at the first aligned byte.
#[derive(Clone)]
pub struct IoBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes starting at a multiple of `align`
    /// (a power of two; 1 for no constraint).
    pub fn zeroed(len: usize, align: usize) -> IoBuf {
        let align = align.max(1).next_power_of_two();
        let storage = vec![0u8; len + align - 1];
        let start = storage.as_ptr().align_offset(align).min(align - 1);
        IoBuf {
            storage,
            start,
            len,
        }
    }

    /// This buffer's memory, reused for `len` bytes aligned to `align`
    /// when it is large enough (the bytes are then whatever they were),
    /// else a new zero-filled buffer. Servers keep buffers this way instead
    /// of allocating and clearing one per request.
    pub fn reuse(self, len: usize, align: usize) -> IoBuf {
        let align = align.max(1).next_power_of_two();
        let start = self.storage.as_ptr().align_offset(align);
        if start
            .checked_add(len)
            .is_some_and(|end| end <= self.storage.len())
        {
            IoBuf {
                storage: self.storage,
                start,
                len,
            }
        } else {
            IoBuf::zeroed(len, align)
        }
    }

    /// Bytes of memory held (at least [`len`](Self::len)).
    pub fn capacity(&self) -> usize {
        self.storage.len()
    }

    /// Wraps `data` without copying; its alignment is whatever the allocator
    /// gave.
    pub fn from_vec(data: Vec<u8>) -> IoBuf {
        let len = data.len();
        IoBuf {
            storage: data,
            start: 0,
            len,
        }
    }

    /// A copy of `data` aligned to `align`.
    pub fn copy_from(data: &[u8], align: usize) -> IoBuf {
        let mut buf = IoBuf::zeroed(data.len(), align);
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the first byte's address is a multiple of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.as_slice().as_ptr().align_offset(align.max(1)) == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        let mut chunks = self.as_slice().chunks_exact(16);
        let words_zero = chunks
            .by_ref()
            .all(|c| c.try_into().is_ok_and(|w| u128::from_ne_bytes(w) == 0));
        words_zero && chunks.remainder().iter().all(|&b| b == 0)
    }

    /// The bytes as a `Vec`, copying only if the buffer is offset.
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.start == 0 {
            self.storage.truncate(self.len);
            self.storage
        } else {
            self.as_slice().to_vec()
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zero() {
        for align in [1, 512, 4096] {
            let mut b = IoBuf::zeroed(10_000, align);
            assert!(b.is_aligned(align));
            assert_eq!(b.len(), 10_000);
            assert!(b.is_zero());
            b.as_mut_slice()[9_999] = 1;
            assert!(!b.is_zero());
            b.as_mut_slice()[9_999] = 0;
            b.as_mut_slice()[3] = 1;
            assert!(!b.is_zero());
        }
        assert_eq!(IoBuf::copy_from(b"abc", 64).into_vec(), b"abc");
        assert!(IoBuf::zeroed(0, 4096).is_empty());
    }

    #[test]
    fn reuse_keeps_large_enough_memory_aligned() {
        let mut b = IoBuf::zeroed(8192, 512);
        b.as_mut_slice()[0] = 9;
        let cap = b.capacity();
        // Exactly what `zeroed` would hold is enough to reuse.
        let same = IoBuf::zeroed(4096, 4096);
        let ptr = same.as_slice().as_ptr();
        assert_eq!(same.reuse(4096, 4096).as_slice().as_ptr(), ptr);
        let r = b.reuse(4096, 4096);
        assert_eq!(r.len(), 4096);
        assert!(r.is_aligned(4096) || r.capacity() != cap);
        let big = r.reuse(1 << 20, 512);
        assert_eq!(big.len(), 1 << 20);
        assert!(big.is_aligned(512));
        assert!(big.is_zero(), "a new buffer when the old one is too small");
    }
}
