//! Edge cases the model test cannot reach: errors, serialization in parts,
//! sizes near the limits, and the memory bound.

use hbitmap::{Error, HBitmap, MAX_BITS};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[test]
fn bad_arguments_are_errors_and_change_nothing() {
    assert_eq!(HBitmap::new(1, 64).unwrap_err(), Error::Granularity(64));
    let mut bm = HBitmap::new(10 * MIB, 16).unwrap();
    bm.set(0, 1).unwrap();
    let before = bm.sha256();
    let out_of_range = |start, count| Error::OutOfRange {
        start,
        count,
        len: 10 * MIB,
    };
    assert_eq!(bm.set(10 * MIB, 1), Err(out_of_range(10 * MIB, 1)));
    assert_eq!(bm.set(1, u64::MAX), Err(out_of_range(1, u64::MAX)));
    assert_eq!(
        bm.reset(0, 10 * MIB + 1),
        Err(out_of_range(0, 10 * MIB + 1))
    );
    let other = HBitmap::new(10 * MIB + 512, 16).unwrap();
    let mismatch = Error::LengthMismatch {
        ours: 10 * MIB,
        theirs: 10 * MIB + 512,
    };
    assert_eq!(bm.merge(&other), Err(mismatch.clone()));
    assert_eq!(bm.copy_from(&other), Err(mismatch));
    assert_eq!(bm.sha256(), before);
    assert_eq!(bm.count(), 64 * KIB);
    // An empty range at the very end is fine.
    bm.set(10 * MIB, 0).unwrap();
    bm.reset(10 * MIB, 0).unwrap();
    // Messages carry the numbers.
    assert_eq!(
        out_of_range(5, 6).to_string(),
        "range 5+6 lies outside the bitmap's 10485760 items"
    );
}

#[test]
fn serialization_rules_follow_qemu() {
    // 1000 granules of 512 bytes, the last one partial.
    let len = 999 * 512 + 100;
    let bm = HBitmap::new(len, 9).unwrap();
    let align = bm.serialization_align();
    assert_eq!(align, 64 * 512);
    assert_eq!(bm.serialization_size(0, len).unwrap(), 16 * 8);
    assert_eq!(bm.serialization_size(align, align).unwrap(), 8);
    assert_eq!(bm.serialization_size(0, 0).unwrap(), 0);
    // The range that ends in the last granule may have any length.
    assert_eq!(
        bm.serialization_size(15 * align, len - 15 * align).unwrap(),
        8
    );
    assert!(matches!(
        bm.serialization_size(512, align),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        bm.serialization_size(0, align + 512),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        bm.serialization_size(0, len + 512),
        Err(Error::OutOfRange { .. })
    ));
    let mut small = [0u8; 8];
    assert_eq!(
        bm.serialize_part(&mut small, 0, 2 * align),
        Err(Error::BufferTooSmall { need: 16, have: 8 })
    );
}

/// Deterministic pseudo-random numbers (xorshift).
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

#[test]
fn serialize_in_parts_and_load_in_any_order() {
    let mut next = rng(7);
    for (len, gran) in [
        (64 * MIB + 4 * KIB, 12),
        (3 * MIB, 9),
        (1 << 30, 16),
        (8 * MIB + 1, 0),
    ] {
        let mut bm = HBitmap::new(len, gran).unwrap();
        for _ in 0..200 {
            let start = next() % len;
            bm.set(start, (next() % (256 * KIB)).min(len - start))
                .unwrap();
        }
        bm.set(len - 1, 1).unwrap();
        // A run of whole words, so that `ones` has something to stand for.
        let align = bm.serialization_align();
        bm.set(align, 3 * align).unwrap();

        let chunk = 2 * align;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < len {
            let count = chunk.min(len - start);
            let mut buf = vec![0u8; bm.serialization_size(start, count).unwrap() as usize];
            bm.serialize_part(&mut buf, start, count).unwrap();
            parts.push((start, count, buf));
            start += count;
        }
        parts.reverse();

        let mut loaded = HBitmap::new(len, gran).unwrap();
        loaded.set(0, len).unwrap(); // stale contents must be overwritten
        let mut d = loaded.deserializer();
        for (start, count, buf) in &parts {
            if buf.iter().all(|&b| b == 0) {
                d.zeroes(*start, *count).unwrap();
            } else if buf.iter().all(|&b| b == 0xff) {
                d.ones(*start, *count).unwrap();
            } else {
                d.part(buf, *start, *count).unwrap();
            }
        }
        d.finish();
        loaded.check_invariants().unwrap();
        assert_eq!(loaded.sha256(), bm.sha256(), "len {len} gran {gran}");
        assert_eq!(loaded.count(), bm.count());
        assert!(loaded.runs().eq(bm.runs()));
    }
}

#[test]
fn deserialized_padding_is_dropped() {
    // 70 bits: the second word has 58 bits of padding.
    let mut bm = HBitmap::new(70 * 4096, 12).unwrap();
    let ones = [0xffu8; 16];
    {
        let mut d = bm.deserializer();
        d.part(&ones, 0, 70 * 4096).unwrap();
        // Dropped without finish: still consistent.
    }
    bm.check_invariants().unwrap();
    assert_eq!(bm.dirty_granules(), 70);
    assert_eq!(bm.count(), 70 * 4096);
    assert_eq!(bm.next_zero(0, u64::MAX), None);
    let mut buf = [0u8; 16];
    bm.serialize_part(&mut buf, 0, 70 * 4096).unwrap();
    assert_eq!(buf[8..], [0x3f, 0, 0, 0, 0, 0, 0, 0]);
    bm.deserializer().ones(0, 70 * 4096).unwrap();
    bm.check_invariants().unwrap();
    assert_eq!(bm.dirty_granules(), 70);
    assert_eq!(
        bm.deserializer().part(&ones[..8], 0, 70 * 4096),
        Err(Error::BufferTooSmall { need: 16, have: 8 })
    );
}

#[test]
fn partial_last_granule() {
    // 64 KiB granules over 1 MiB + 1536 bytes: 17 granules, the last has
    // 1536 bytes.
    let len = MIB + 1536;
    let mut bm = HBitmap::new(len, 16).unwrap();
    assert_eq!(bm.bits(), 17);
    bm.set(len - 1, 1).unwrap();
    assert_eq!(bm.count(), 1536);
    assert_eq!(bm.dirty_granules(), 1);
    assert_eq!(bm.runs().collect::<Vec<_>>(), [(MIB, 1536)]);
    assert_eq!(bm.next_zero(MIB, len), None);
    // Resetting part of the last granule keeps it; reaching the end clears it.
    bm.reset(MIB, 1000).unwrap();
    assert!(bm.get(MIB));
    bm.reset(MIB + 512, 1024).unwrap();
    assert!(bm.get(MIB), "a reset that starts inside a granule keeps it");
    bm.reset(MIB, 1536).unwrap();
    assert!(bm.is_empty());
    // Growing keeps the dirty granule, which now covers 64 KiB.
    bm.set(len - 1, 1).unwrap();
    bm.truncate(2 * MIB).unwrap();
    assert_eq!(bm.count(), 64 * KIB);
    bm.truncate(MIB + 1).unwrap();
    assert_eq!(bm.count(), 1);
    bm.truncate(MIB).unwrap();
    assert!(bm.is_empty());
    bm.check_invariants().unwrap();
}

#[test]
fn next_dirty_area_is_bounded() {
    let mut bm = HBitmap::new(16 * MIB, 16).unwrap();
    bm.set(MIB, 3 * MIB).unwrap();
    assert_eq!(
        bm.next_dirty_area(0, 16 * MIB, u64::MAX),
        Some((MIB, 3 * MIB))
    );
    assert_eq!(bm.next_dirty_area(0, 16 * MIB, MIB), Some((MIB, MIB)));
    assert_eq!(
        bm.next_dirty_area(2 * MIB + 7, 3 * MIB, u64::MAX),
        Some((2 * MIB + 7, MIB - 7))
    );
    assert_eq!(bm.next_dirty_area(0, MIB, u64::MAX), None);
    assert_eq!(bm.next_dirty_area(0, 16 * MIB, 0), None);
    assert_eq!(bm.next_dirty_area(4 * MIB, 16 * MIB, 1), None);
}

#[test]
fn limits() {
    assert_eq!(
        HBitmap::new(u64::MAX, 22).unwrap_err(),
        Error::TooLarge { bits: 1 << 42 }
    );
    assert_eq!(
        HBitmap::new(((MAX_BITS + 1) << 9) - 1, 9).unwrap_err(),
        Error::TooLarge { bits: MAX_BITS + 1 }
    );
    // The largest bitmap needs 264 GiB; where the machine cannot provide it,
    // creating it is an error, never an abort.
    match HBitmap::new(MAX_BITS << 9, 9) {
        Ok(mut bm) => {
            bm.set((MAX_BITS << 9) - 1, 1).unwrap();
            assert_eq!(bm.next_dirty(0, u64::MAX), Some((MAX_BITS - 1) << 9));
        }
        Err(e) => assert!(matches!(e, Error::OutOfMemory { .. }), "{e}"),
    }
    // Any length works at the top granularity: u64::MAX items in 2 bits.
    let mut bm = HBitmap::new(u64::MAX, 63).unwrap();
    bm.set(u64::MAX - 1, 1).unwrap();
    assert_eq!(bm.count(), u64::MAX - (1 << 63));
    assert_eq!(
        bm.runs().collect::<Vec<_>>(),
        [(1 << 63, u64::MAX - (1 << 63))]
    );
    assert_eq!(bm.next_zero(0, u64::MAX), Some(0));
    bm.set(0, 1).unwrap();
    assert_eq!(bm.count(), u64::MAX);
    assert_eq!(bm.next_zero(0, u64::MAX), None);
}

/// A 2^36-bit bitmap (8 GiB at the bottom level) is allocated as zero pages:
/// only the pages written cost memory, and every search still climbs the
/// levels instead of scanning.
#[test]
fn huge_sparse_bitmap() {
    let bits = 1u64 << 36;
    let mut bm = HBitmap::new(bits, 0).unwrap();
    bm.set(bits - 1, 1).unwrap();
    bm.set(bits / 2 - 3, 5).unwrap();
    assert_eq!(bm.count(), 6);
    assert_eq!(bm.next_dirty(0, bits), Some(bits / 2 - 3));
    assert_eq!(bm.next_dirty(bits / 2 + 2, bits), Some(bits - 1));
    assert_eq!(bm.next_zero(bits / 2 - 3, bits), Some(bits / 2 + 2));
    assert_eq!(
        bm.runs().collect::<Vec<_>>(),
        [(bits / 2 - 3, 5), (bits - 1, 1)]
    );
    bm.reset(bits / 2 - 3, 5).unwrap();
    bm.reset(bits - 1, 1).unwrap();
    assert!(bm.is_empty());
    assert_eq!(bm.next_dirty(0, bits), None);
}

/// Memory is the bits plus at most 5%, and a few hundred bytes of fixed
/// overhead (which only shows on small bitmaps).
#[test]
fn memory_stays_within_five_percent_of_the_bits() {
    for (len, gran) in [
        (1u64 << 40, 16),
        (1 << 30, 9),
        (100 * MIB + 512, 12),
        (1 << 34, 16),
    ] {
        let bm = HBitmap::new(len, gran).unwrap();
        let ideal = (bm.bits().div_ceil(64) * 8) as f64;
        let used = bm.memory_usage() as f64;
        assert!(
            used <= 1.05 * ideal + 256.0,
            "len {len} gran {gran}: {used} bytes for {ideal}"
        );
    }
}

#[test]
fn copy_makes_an_independent_bitmap() {
    let mut a = HBitmap::new(64 * MIB, 16).unwrap();
    a.set(5 * MIB, 300 * KIB).unwrap();
    let b = a.try_clone().unwrap();
    a.reset_all();
    assert!(a.is_empty());
    assert_eq!(b.runs().collect::<Vec<_>>(), [(5 * MIB, 320 * KIB)]);
    // Copy across granularities rounds outwards.
    let mut coarse = HBitmap::new(64 * MIB, 20).unwrap();
    coarse.set(60 * MIB, MIB).unwrap();
    coarse.copy_from(&b).unwrap();
    assert_eq!(coarse.runs().collect::<Vec<_>>(), [(5 * MIB, MIB)]);
}
