//! Owned, aligned I/O buffers.

use std::sync::Arc;

use crate::arena;

/// An owned byte buffer whose start is aligned to a power of two, as
/// `O_DIRECT` needs. Requests take and give buffers by value, so a driver can
/// hand them to a thread or to the kernel (io_uring) without copying.
///
/// A buffer of [`HUGE_PAGE_MIN`](Self::HUGE_PAGE_MIN) bytes or more lives in
/// memory backed by transparent huge pages, aligned to its size (up to
/// 2 MiB); a smaller one over-allocates on the heap by the alignment and
/// starts at the first aligned byte. Every buffer made here (all but
/// [`from_vec`](Self::from_vec)'s) starts on a cache line (64 bytes) at
/// least, whatever it is asked for.
///
/// A buffer made [`shared`](Self::shared) is cloned by reference: many
/// requests can write the same bytes from the same memory at once. Each
/// clone still behaves as a buffer of its own:
/// [`as_mut_slice`](Self::as_mut_slice) on a clone that shares its memory
/// copies it first, so no request ever sees another's bytes change.
pub struct IoBuf {
    storage: Storage,
    start: usize,
    len: usize,
}

impl Clone for IoBuf {
    /// A buffer of its own with the same bytes, as aligned as this one's
    /// (up to a page); a [`shared`](Self::shared) one's clone shares its
    /// memory instead.
    fn clone(&self) -> IoBuf {
        match &self.storage {
            Storage::Shared(v) => IoBuf {
                storage: Storage::Shared(v.clone()),
                start: self.start,
                len: self.len,
            },
            Storage::Owned(_) => IoBuf::copy_from(self.as_slice(), self.alignment()),
        }
    }
}

/// Memory a buffer holds.
enum Mem {
    /// From the heap: small buffers, and [`IoBuf::from_vec`]'s.
    Heap(Vec<u8>),
    /// From the huge-page arena: buffers of [`arena::MIN_BLOCK`] and more.
    Arena(arena::Block),
}

impl Clone for Mem {
    fn clone(&self) -> Mem {
        match self {
            Mem::Heap(v) => Mem::Heap(v.clone()),
            Mem::Arena(b) => match b.try_clone() {
                Some(b) => Mem::Arena(b),
                None => Mem::Heap(b.as_slice().to_vec()),
            },
        }
    }
}

impl Mem {
    fn bytes(&self) -> &[u8] {
        match self {
            Mem::Heap(v) => v,
            Mem::Arena(b) => b.as_slice(),
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Mem::Heap(v) => v,
            Mem::Arena(b) => b.as_mut_slice(),
        }
    }

    /// Where `len` bytes aligned to `align` (a power of two) start in this
    /// memory, if they fit.
    fn place(&self, len: usize, align: usize) -> Option<usize> {
        let start = self.bytes().as_ptr().align_offset(align);
        let end = start.checked_add(len)?;
        (end <= self.bytes().len()).then_some(start)
    }
}

/// The memory behind an [`IoBuf`].
#[derive(Clone)]
enum Storage {
    /// Memory of this buffer alone; a clone copies it.
    Owned(Mem),
    /// Memory clones share; copied on the first write through one of them.
    Shared(Arc<Mem>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(m) => m.bytes(),
            Storage::Shared(m) => m.bytes(),
        }
    }

    /// Whether another clone reads this memory too.
    fn is_shared(&self) -> bool {
        matches!(self, Storage::Shared(v) if Arc::strong_count(v) > 1)
    }

    /// The memory, writable (copied first if a clone shares it; callers
    /// that care where the copy lands make their own first).
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Storage::Owned(m) => m.bytes_mut(),
            Storage::Shared(m) => Arc::make_mut(m).bytes_mut(),
        }
    }

    /// The memory, if no other clone shares it.
    fn into_unshared(self) -> Option<Mem> {
        match self {
            Storage::Owned(m) => Some(m),
            Storage::Shared(m) => Arc::try_unwrap(m).ok(),
        }
    }
}

/// The largest alignment that buffers are asked for (a page).
const MAX_ALIGN: usize = 4096;

impl IoBuf {
    /// The least alignment of a buffer's start: a cache line. The kernel's
    /// copies between user memory and the page cache or a socket run about
    /// a third slower from or into memory that is not aligned to 64 bytes
    /// (a 1 MiB `pwrite` into cached pages: 8.3 GB/s from the heap's
    /// 16-byte alignment, 11.8 GB/s from a cache line; docs/benchmarks.md).
    pub const MIN_ALIGN: usize = 64;

    /// The least length of a buffer made in memory backed by transparent
    /// huge pages (64 KiB): `O_DIRECT` requests from and into such memory
    /// run up to twice as fast, since the kernel pins one huge page instead
    /// of a page per 4 KiB and the device gets one segment instead of many
    /// (docs/benchmarks.md). Such a buffer holds its length rounded up to a
    /// power of two (to a multiple of 2 MiB above 2 MiB); a smaller one
    /// comes from the heap and holds `len + align.max(Self::MIN_ALIGN) - 1`.
    pub const HUGE_PAGE_MIN: usize = arena::MIN_BLOCK;

    /// A zero-filled buffer of `len` bytes starting at a multiple of `align`
    /// (a power of two; 1 for no constraint) and of a cache line.
    pub fn zeroed(len: usize, align: usize) -> IoBuf {
        let align = align.max(Self::MIN_ALIGN).next_power_of_two();
        if len >= Self::HUGE_PAGE_MIN && align <= len.min(arena::CHUNK) {
            if let Some(mut block) = arena::GLOBAL.block(len) {
                block.as_mut_slice()[..len].fill(0);
                return IoBuf {
                    storage: Storage::Owned(Mem::Arena(block)),
                    start: 0,
                    len,
                };
            }
        }
        let storage = vec![0u8; len + align - 1];
        let start = storage.as_ptr().align_offset(align).min(align - 1);
        IoBuf {
            storage: Storage::Owned(Mem::Heap(storage)),
            start,
            len,
        }
    }

    /// This buffer, its clones sharing its memory from now on (no copy):
    /// for writing the same bytes many times, as a benchmark's requests or
    /// a copy to several places do.
    pub fn shared(self) -> IoBuf {
        let storage = match self.storage {
            Storage::Owned(m) => Storage::Shared(Arc::new(m)),
            shared @ Storage::Shared(_) => shared,
        };
        IoBuf { storage, ..self }
    }

    /// Whether [`reuse`](Self::reuse)`(len, align)` would keep this
    /// buffer's memory: it is large enough and no clone shares it.
    pub fn can_hold(&self, len: usize, align: usize) -> bool {
        let align = align.max(Self::MIN_ALIGN).next_power_of_two();
        let mem = match &self.storage {
            Storage::Owned(m) => m,
            Storage::Shared(m) if Arc::strong_count(m) == 1 => m,
            Storage::Shared(_) => return false,
        };
        mem.place(len, align).is_some()
    }

    /// This buffer's memory, reused for `len` bytes aligned to `align`
    /// when it [can hold](Self::can_hold) them (the bytes are then whatever
    /// they were), else a new zero-filled buffer. Servers keep buffers this
    /// way instead of allocating and clearing one per request.
    pub fn reuse(self, len: usize, align: usize) -> IoBuf {
        let align = align.max(Self::MIN_ALIGN).next_power_of_two();
        let Some(mem) = self.storage.into_unshared() else {
            // Other clones still read this memory.
            return IoBuf::zeroed(len, align);
        };
        match mem.place(len, align) {
            Some(start) => IoBuf {
                storage: Storage::Owned(mem),
                start,
                len,
            },
            None => IoBuf::zeroed(len, align),
        }
    }

    /// Bytes of memory held (at least [`len`](Self::len)).
    pub fn capacity(&self) -> usize {
        self.storage.bytes().len()
    }

    /// Wraps `data` without copying; its alignment is whatever the allocator
    /// gave.
    pub fn from_vec(data: Vec<u8>) -> IoBuf {
        let len = data.len();
        IoBuf {
            storage: Storage::Owned(Mem::Heap(data)),
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
        &self.storage.bytes()[self.start..self.start + self.len]
    }

    /// The bytes, writable. A buffer whose memory clones share gets a copy
    /// of its own first.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.storage.is_shared() {
            *self = IoBuf::copy_from(self.as_slice(), self.alignment());
        }
        let range = self.start..self.start + self.len;
        &mut self.storage.bytes_mut()[range]
    }

    /// The alignment of the first byte's address, up to a page: what a
    /// copy of this buffer keeps.
    fn alignment(&self) -> usize {
        let addr = self.as_slice().as_ptr() as usize;
        (1usize << addr.trailing_zeros().min(63)).min(MAX_ALIGN)
    }

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        let mut chunks = self.as_slice().chunks_exact(16);
        let words_zero = chunks
            .by_ref()
            .all(|c| c.try_into().is_ok_and(|w| u128::from_ne_bytes(w) == 0));
        words_zero && chunks.remainder().iter().all(|&b| b == 0)
    }

    /// The bytes as a `Vec`, copying only if the buffer is offset or clones
    /// share its memory.
    pub fn into_vec(self) -> Vec<u8> {
        match self.storage {
            Storage::Owned(Mem::Heap(mut v)) if self.start == 0 => {
                v.truncate(self.len);
                v
            }
            _ => self.as_slice().to_vec(),
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
        // A clone is a copy of its own, as aligned.
        let mut b = IoBuf::zeroed(8192, 4096);
        b.as_mut_slice()[5] = 5;
        let mut c = b.clone();
        assert!(c.is_aligned(4096));
        c.as_mut_slice()[5] = 6;
        assert_eq!((b.as_slice()[5], c.as_slice()[5]), (5, 6));
        // Never less than a cache line, whatever is asked.
        for len in [1, 100, 4096, 1 << 20] {
            assert!(IoBuf::zeroed(len, 1).is_aligned(IoBuf::MIN_ALIGN));
            assert!(
                IoBuf::zeroed(len, 1)
                    .reuse(len / 2, 1)
                    .is_aligned(IoBuf::MIN_ALIGN)
            );
        }
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

    #[test]
    fn large_buffers_live_in_huge_page_memory_aligned_to_their_size() {
        let mut b = IoBuf::zeroed(1 << 20, 512);
        assert_eq!(b.capacity(), 1 << 20, "a block of the arena");
        assert!(b.is_aligned(1 << 20));
        assert!(b.is_zero());
        b.as_mut_slice().fill(3);
        let ptr = b.as_slice().as_ptr();
        // A clone is a block of its own.
        let c = b.clone();
        assert!(c.is_aligned(1 << 20) && c.as_slice() == b.as_slice());
        assert_ne!(c.as_slice().as_ptr(), ptr);
        // Reused for anything that fits, and zeroed when new again.
        assert!(b.can_hold(1 << 20, 4096) && !b.can_hold((1 << 20) + 1, 1));
        let r = b.reuse(4096, 4096);
        assert_eq!((r.as_slice().as_ptr(), r.as_slice()[0]), (ptr, 3));
        drop(r);
        assert!(
            IoBuf::zeroed(1 << 20, 1).is_zero(),
            "freed memory is cleared"
        );
        // Just under the threshold stays on the heap; 3 MiB takes 4.
        assert!(IoBuf::zeroed(IoBuf::HUGE_PAGE_MIN - 1, 1).capacity() < IoBuf::HUGE_PAGE_MIN + 64);
        let big = IoBuf::zeroed(3 << 20, 4096);
        assert!(big.capacity() == 4 << 20 && big.is_aligned(2 << 20) && big.is_zero());
        assert_eq!(big.clone().into_vec().len(), 3 << 20);
        // Shared memory is held by none alone.
        let s = IoBuf::zeroed(1 << 16, 1).shared();
        let t = s.clone();
        assert!(!s.can_hold(1, 1));
        drop(t);
        assert!(s.can_hold(1 << 16, 1));
    }

    #[test]
    fn shared_clones_read_one_memory_and_copy_before_a_write() {
        let mut b = IoBuf::zeroed(8192, 4096);
        b.as_mut_slice().fill(7);
        let shared = b.shared();
        let mut clone = shared.clone();
        assert_eq!(clone.as_slice().as_ptr(), shared.as_slice().as_ptr());
        clone.as_mut_slice()[0] = 1;
        assert_ne!(clone.as_slice().as_ptr(), shared.as_slice().as_ptr());
        assert!(clone.is_aligned(4096), "the copy keeps the alignment");
        assert_eq!(shared.as_slice()[0], 7, "the others' bytes do not change");
        assert_eq!(clone.as_slice()[..2], [1, 7]);
        // The last holder writes in place, and gets the memory back whole.
        let ptr = shared.as_slice().as_ptr();
        let mut last = shared.clone();
        drop(shared);
        last.as_mut_slice()[1] = 2;
        assert_eq!(last.as_slice().as_ptr(), ptr);
        let other = last.clone().shared();
        assert!(
            last.clone().reuse(4096, 512).is_zero(),
            "shared memory is not reused"
        );
        drop(other);
        assert_eq!(last.reuse(4096, 4096).as_slice().as_ptr(), ptr);
        let v = IoBuf::from_vec(vec![1, 2, 3]).shared();
        let w = v.clone();
        assert_eq!(v.into_vec(), [1, 2, 3]);
        assert_eq!(w.into_vec(), [1, 2, 3]);
    }
}
