//! Memory for large I/O buffers, backed by transparent huge pages.
//!
//! A 1 MiB `O_DIRECT` request from or into memory of 4 KiB pages pins 256
//! pages and hands the device (or the hypervisor behind a virtio disk) up to
//! 256 segments; from one huge page it pins one folio and the device sees
//! one segment. io_uring, 1 MiB at depth 32, a buffer per request, on this
//! project's machine: reads 1.0–1.2 GB/s from 4 KiB pages, 2.4–2.6 from huge
//! pages; writes 1.9 and 4.0 (docs/benchmarks.md). The kernel's copies into
//! and out of the page cache and sockets also miss the TLB less.
//!
//! The [`Arena`] maps memory in chunks of [`CHUNK`] bytes aligned to their
//! size and advised `MADV_HUGEPAGE`, which the kernel honours on the default
//! `madvise` setting of `/sys/kernel/mm/transparent_hugepage/enabled`. Each
//! chunk is carved into blocks of one power-of-two size from [`MIN_BLOCK`]
//! to [`CHUNK`], each aligned to its size. A larger buffer gets a mapping of
//! its own, a whole number of chunks, unmapped when it is dropped. Freed
//! blocks are handed out again before any fresh memory; a chunk whose
//! blocks are all free is kept for blocks of any size, up to the arena's
//! `retain` chunks, and unmapped beyond that.
//!
//! Huge pages are an optimisation, never a condition: where the kernel has
//! none to give, the chunk is plain memory; where mapping fails, callers
//! fall back to the heap.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Mutex;

use rustix::mm::{Advice, MapFlags, ProtFlags};

/// The size and alignment of a chunk: a huge page on x86-64 (its PMD size).
pub(crate) const CHUNK: usize = 2 << 20;

/// The smallest block handed out; smaller buffers belong on the heap.
pub(crate) const MIN_BLOCK: usize = 64 << 10;

/// Block sizes: `MIN_BLOCK << class` for class `0..CLASSES`.
const CLASSES: usize = (CHUNK / MIN_BLOCK).trailing_zeros() as usize + 1;

/// Wholly free chunks the process-wide arena keeps mapped (64 MiB).
const RETAIN: usize = 32;

/// The process-wide arena that [`IoBuf`](crate::IoBuf)s come from.
pub(crate) static GLOBAL: Arena = Arena::new(RETAIN);

/// Chunks of huge-page memory, carved into blocks.
pub(crate) struct Arena {
    inner: Mutex<Inner>,
    /// Wholly free chunks kept mapped for reuse.
    retain: usize,
}

struct Inner {
    /// The chunks holding blocks, by base address.
    chunks: BTreeMap<usize, Chunk>,
    /// For each class, the bases of its chunks that have a free block.
    partial: [Vec<usize>; CLASSES],
    /// Bases of wholly free chunks, kept for any class.
    empty: Vec<usize>,
}

/// A chunk carved into blocks of `MIN_BLOCK << class` bytes.
struct Chunk {
    class: usize,
    /// Bit `i` set: block `i` is free.
    free: u32,
}

/// The `free` mask of a chunk of `blocks` blocks, all free.
fn all_free(blocks: usize) -> u32 {
    if blocks >= 32 {
        u32::MAX
    } else {
        (1u32 << blocks) - 1
    }
}

impl Arena {
    /// An arena that keeps up to `retain` wholly free chunks mapped.
    pub(crate) const fn new(retain: usize) -> Arena {
        Arena {
            inner: Mutex::new(Inner {
                chunks: BTreeMap::new(),
                partial: [const { Vec::new() }; CLASSES],
                empty: Vec::new(),
            }),
            retain,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A block of at least `len` bytes (`len` ≥ [`MIN_BLOCK`]), aligned to
    /// its size or to [`CHUNK`], whichever is less; its bytes are whatever
    /// they were (zero in fresh memory). `None` when the kernel gives no
    /// memory.
    pub(crate) fn block(&'static self, len: usize) -> Option<Block> {
        if len > CHUNK {
            let size = len.checked_next_multiple_of(CHUNK)?;
            let base = map(size)?;
            return Block::new(base, size, self);
        }
        let size = len.next_power_of_two().max(MIN_BLOCK);
        let class = (size / MIN_BLOCK).trailing_zeros() as usize;
        let mut inner = self.lock();
        let base = match inner.partial[class].last() {
            Some(&base) => base,
            None => {
                let base = match inner.empty.pop() {
                    Some(base) => base,
                    None => map(CHUNK)?,
                };
                let free = all_free(CHUNK / size);
                inner.chunks.insert(base, Chunk { class, free });
                inner.partial[class].push(base);
                base
            }
        };
        let chunk = inner.chunks.get_mut(&base)?;
        let index = chunk.free.trailing_zeros() as usize;
        chunk.free &= !(1 << index);
        if chunk.free == 0 {
            inner.partial[class].pop();
        }
        drop(inner);
        Block::new(base + index * size, size, self)
    }

    /// Takes back the block of `size` bytes at `addr`.
    fn free(&self, addr: usize, size: usize) {
        if size > CHUNK {
            unmap(addr, size);
            return;
        }
        let base = addr & !(CHUNK - 1);
        let mut inner = self.lock();
        let Some(chunk) = inner.chunks.get_mut(&base) else {
            debug_assert!(false, "a block of no chunk");
            return;
        };
        let class = chunk.class;
        let was_full = chunk.free == 0;
        chunk.free |= 1 << ((addr - base) / size);
        if chunk.free == all_free(CHUNK / size) {
            inner.chunks.remove(&base);
            let partial = &mut inner.partial[class];
            if let Some(i) = partial.iter().position(|&b| b == base) {
                partial.swap_remove(i);
            }
            if inner.empty.len() < self.retain {
                inner.empty.push(base);
            } else {
                drop(inner);
                unmap(base, CHUNK);
            }
        } else if was_full {
            inner.partial[class].push(base);
        }
    }

    /// Chunks mapped for blocks of up to [`CHUNK`] bytes: holding blocks,
    /// and wholly free.
    #[cfg(test)]
    fn chunks(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.chunks.len(), inner.empty.len())
    }
}

/// `len` bytes (a multiple of [`CHUNK`]) of new anonymous memory aligned to
/// [`CHUNK`] and advised for huge pages; its address, or `None` when the
/// kernel refuses.
fn map(len: usize) -> Option<usize> {
    let over = len.checked_add(CHUNK)?;
    // SAFETY: a new private anonymous mapping at an address of the kernel's
    // choosing overlaps no memory the program uses.
    let raw = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            over,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }
    .ok()?;
    let addr = raw as usize;
    let start = addr.next_multiple_of(CHUNK);
    let head = start - addr;
    let tail = over - head - len;
    if head > 0 {
        unmap(addr, head);
    }
    if tail > 0 {
        unmap(start + len, tail);
    }
    // SAFETY: advice on memory of the mapping just made, which nothing
    // references yet; it changes no contents.
    let advised = unsafe { rustix::mm::madvise(start as *mut c_void, len, Advice::LinuxHugepage) };
    // A kernel without transparent huge pages refuses the advice; the
    // memory is as good, only slower.
    let _ = advised;
    Some(start)
}

/// Unmaps `len` bytes at `addr`, memory of [`map`]'s that no block holds.
fn unmap(addr: usize, len: usize) {
    // SAFETY: callers pass ranges of mappings made by `map` that nothing
    // references any more (the head and tail trimmed off a new mapping, a
    // dropped block's own mapping, or a wholly free chunk).
    let unmapped = unsafe { rustix::mm::munmap(addr as *mut c_void, len) };
    debug_assert!(unmapped.is_ok(), "munmap of our own mapping failed");
}

/// A block of arena memory, owned: like a `Box<[u8]>` whose memory goes
/// back to its arena when dropped.
pub(crate) struct Block {
    ptr: NonNull<u8>,
    size: usize,
    arena: &'static Arena,
}

// SAFETY: a block is the only handle to its memory (the arena hands each
// block out once until it is dropped), so it can move between threads and
// be shared by reference as a `Box<[u8]>` can.
unsafe impl Send for Block {}
// SAFETY: as above; `&Block` gives only shared access to the bytes.
unsafe impl Sync for Block {}

impl Block {
    fn new(addr: usize, size: usize, arena: &'static Arena) -> Option<Block> {
        let ptr = NonNull::new(addr as *mut u8)?;
        Some(Block { ptr, size, arena })
    }

    /// The block's bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + size` is mapped, readable memory that this
        // block alone holds until it is dropped; every byte was initialised
        // (fresh anonymous memory reads as zero).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.size) }
    }

    /// The block's bytes, writable.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only
        // reference to the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.size) }
    }

    /// A block as large (so as aligned) with the same bytes, `None` when
    /// the kernel gives no memory.
    pub(crate) fn try_clone(&self) -> Option<Block> {
        let mut copy = self.arena.block(self.size)?;
        copy.as_mut_slice().copy_from_slice(self.as_slice());
        Some(copy)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.arena.free(self.ptr.as_ptr() as usize, self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena(retain: usize) -> &'static Arena {
        Box::leak(Box::new(Arena::new(retain)))
    }

    #[test]
    fn blocks_are_sized_aligned_and_disjoint() {
        let arena = arena(1);
        let mut blocks = Vec::new();
        for (i, len) in [MIN_BLOCK, 100_000, 1 << 20, CHUNK, CHUNK + 1, 5 << 20]
            .into_iter()
            .cycle()
            .take(40)
            .enumerate()
        {
            let mut b = arena.block(len).expect("memory");
            let size = b.as_slice().len();
            assert!(
                size >= len && size < 2 * len.max(MIN_BLOCK),
                "{len}: {size}"
            );
            assert_eq!(b.ptr.as_ptr() as usize % size.min(CHUNK), 0, "{len}");
            b.as_mut_slice().fill(i as u8);
            blocks.push((i as u8, b));
        }
        for (i, b) in &blocks {
            assert!(
                b.as_slice().iter().all(|x| x == i),
                "a block was overwritten"
            );
        }
    }

    #[test]
    fn freed_blocks_are_reused_and_free_chunks_kept_up_to_the_limit() {
        let arena = arena(1);
        let a = arena.block(MIN_BLOCK).expect("memory");
        let addr = a.ptr;
        drop(a);
        assert_eq!(arena.chunks(), (0, 1), "a wholly free chunk is kept");
        let b = arena.block(1 << 20).expect("memory");
        assert_eq!(b.ptr, addr, "the kept chunk serves another size");
        let c = arena.block(1 << 20).expect("memory");
        assert_eq!(arena.chunks(), (1, 0), "two 1 MiB blocks share a chunk");
        let d = arena.block(1 << 20).expect("memory");
        assert_eq!(arena.chunks(), (2, 0));
        drop((b, c, d));
        assert_eq!(arena.chunks(), (0, 1), "beyond the limit, unmapped");
        // A freed block is handed out again before fresh memory.
        let mut blocks: Vec<_> = (0..5).map(|_| arena.block(MIN_BLOCK)).collect();
        let third = blocks.remove(2).map(|b| b.ptr);
        assert_eq!(arena.block(MIN_BLOCK).map(|b| b.ptr), third);
        assert_eq!(arena.chunks(), (1, 0));
    }

    #[test]
    fn many_threads_allocate_and_free_without_sharing_a_byte() {
        let arena = arena(2);
        std::thread::scope(|s| {
            for t in 0..4u8 {
                s.spawn(move || {
                    for round in 0..200usize {
                        let len = MIN_BLOCK << (round % 4);
                        let mut b = arena.block(len).expect("memory");
                        b.as_mut_slice().fill(t);
                        let copy = b.try_clone().expect("memory");
                        std::thread::yield_now();
                        assert!(b.as_slice().iter().all(|&x| x == t));
                        assert_eq!(copy.as_slice(), b.as_slice());
                    }
                });
            }
        });
        assert_eq!(arena.chunks().0, 0, "every block went back");
    }

    /// Whether the kernel offers transparent huge pages to memory that asks.
    fn huge_pages_offered() -> bool {
        let path = "/sys/kernel/mm/transparent_hugepage/enabled";
        std::fs::read_to_string(path).is_ok_and(|s| !s.contains("[never]"))
    }

    #[test]
    fn chunks_are_eligible_for_huge_pages() {
        let b = GLOBAL.block(1 << 20).expect("memory");
        let addr = b.ptr.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        // The mapping holding the block, and its THPeligible line.
        let mut inside = false;
        let mut eligible = None;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            let parsed = range.and_then(|(lo, hi)| {
                Some((
                    usize::from_str_radix(lo, 16).ok()?,
                    usize::from_str_radix(hi, 16).ok()?,
                ))
            });
            if let Some((lo, hi)) = parsed {
                inside = (lo..hi).contains(&addr);
            } else if let Some(v) = line.strip_prefix("THPeligible:").filter(|_| inside) {
                eligible = Some(v.trim() == "1");
            }
        }
        let eligible = eligible.expect("no THPeligible line for the block's mapping");
        assert_eq!(eligible, huge_pages_offered());
    }
}
