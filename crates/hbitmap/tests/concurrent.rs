//! `mark` from many threads at once ends in the same bitmap as `set` from
//! one, with every invariant intact.

use std::sync::Arc;

use hbitmap::HBitmap;

fn ranges(seed: u64, n: usize, len: u64) -> Vec<(u64, u64)> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let start = x % len;
            // Mostly small writes, some long runs that cross many words.
            let max = if i % 50 == 0 { len / 8 } else { 64 * 1024 };
            (start, (1 + (x >> 32) % max).min(len - start))
        })
        .collect()
}

#[test]
fn concurrent_marks_equal_sequential_sets() {
    for (len, gran) in [(1u64 << 30, 16), (8 << 20, 9), ((64 << 20) + 512, 12)] {
        let shared = Arc::new(HBitmap::new(len, gran).unwrap());
        let work: Vec<Vec<(u64, u64)>> = (0..4).map(|t| ranges(t + 7, 5000, len)).collect();
        std::thread::scope(|scope| {
            for w in &work {
                let bm = shared.clone();
                scope.spawn(move || {
                    for &(s, c) in w {
                        bm.mark(s, c).unwrap();
                    }
                });
            }
        });
        let mut expect = HBitmap::new(len, gran).unwrap();
        for &(s, c) in work.iter().flatten() {
            expect.set(s, c).unwrap();
        }
        shared.check_invariants().unwrap();
        assert_eq!(shared.sha256(), expect.sha256(), "len {len} gran {gran}");
        assert_eq!(shared.count(), expect.count());
        assert!(shared.runs().eq(expect.runs()));
    }
}

#[test]
fn marking_a_whole_bitmap_from_all_sides_fills_it() {
    let len = 1u64 << 26;
    let bm = Arc::new(HBitmap::new(len, 9).unwrap());
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let bm = bm.clone();
            scope.spawn(move || {
                // Interleaved 512-byte granules: every word is completed by
                // several threads' marks.
                let mut g = t;
                while g * 512 < len {
                    bm.mark(g * 512, 512).unwrap();
                    g += 4;
                }
            });
        }
    });
    bm.check_invariants().unwrap();
    assert_eq!(bm.count(), len);
    assert_eq!(bm.next_zero(0, len), None);
}
