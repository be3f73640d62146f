//! Benchmarks of the dirty bitmap on a 1 TiB disk at 64 KiB granularity
//! (16 Mi bits), the figures `docs/benchmarks.md` records.
//!
//! Run: `cargo bench -p hbitmap --bench hbitmap`

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use hbitmap::HBitmap;

const DISK: u64 = 1 << 40;
const GRAN: u32 = 16;
const CLUSTER: u64 = 1 << GRAN;
const BITS: u64 = DISK >> GRAN;

/// Deterministic pseudo-random cluster offsets (xorshift), so every run
/// measures the same pattern.
fn scattered_offsets(n: usize, seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % BITS) * CLUSTER
        })
        .collect()
}

fn new_bitmap() -> HBitmap {
    HBitmap::new(DISK, GRAN).expect("a 1 TiB bitmap fits in memory")
}

/// A bitmap with 1% of its clusters dirtied by scattered 64 KiB writes.
fn one_percent_dirty(seed: u64) -> HBitmap {
    let mut bm = new_bitmap();
    for off in scattered_offsets((BITS / 100) as usize, seed) {
        bm.set(off, CLUSTER).expect("offset is inside the disk");
    }
    bm
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("hbitmap_1TiB_64KiB");

    let mut bm = new_bitmap();
    g.bench_function("set_whole_range", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                bm.reset_all();
                let t = Instant::now();
                bm.set(0, black_box(DISK)).expect("in range");
                total += t.elapsed();
            }
            total
        })
    });

    let offsets = scattered_offsets(1 << 16, 0x9e37_79b9_7f4a_7c15);
    g.bench_function("mark_one_64KiB_write", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                bm.reset_all();
                let n = (iters - done).min(offsets.len() as u64) as usize;
                let t = Instant::now();
                for &off in &offsets[..n] {
                    bm.set(black_box(off), CLUSTER).expect("in range");
                }
                total += t.elapsed();
                done += n as u64;
            }
            total
        })
    });

    let dirty = one_percent_dirty(1);
    let runs = dirty.runs().count();
    eprintln!("iterate_runs_1pct: {runs} runs");
    g.bench_function("iterate_runs_1pct", |b| {
        b.iter(|| black_box(&dirty).runs().count())
    });

    let empty = new_bitmap();
    g.bench_function("next_dirty_on_empty", |b| {
        b.iter(|| black_box(&empty).next_dirty(black_box(0), DISK))
    });

    let mut full = new_bitmap();
    full.set(0, DISK).expect("in range");
    g.bench_function("next_zero_on_full", |b| {
        b.iter(|| black_box(&full).next_zero(black_box(0), DISK))
    });

    let mut target = one_percent_dirty(2);
    // Each iteration merges into a fresh copy: a merge that finds nothing
    // new is much cheaper and would flatter the figure.
    g.bench_function("merge_same_granularity", |b| {
        b.iter_batched_ref(
            || target.try_clone().expect("a copy fits in memory"),
            |t| t.merge(black_box(&dirty)).expect("same length"),
            BatchSize::LargeInput,
        )
    });

    g.bench_function("copy", |b| {
        b.iter(|| target.copy_from(black_box(&dirty)).expect("same length"))
    });

    let mut fine = HBitmap::new(DISK, 12).expect("a 4 KiB-granularity bitmap fits");
    for off in scattered_offsets((BITS / 100) as usize, 3) {
        fine.set(off, 4096).expect("in range");
    }
    g.bench_function("merge_4KiB_into_64KiB_1pct", |b| {
        b.iter_batched_ref(
            || target.try_clone().expect("a copy fits in memory"),
            |t| t.merge(black_box(&fine)).expect("same length"),
            BatchSize::LargeInput,
        )
    });

    g.bench_function("sha256", |b| b.iter(|| black_box(&dirty).sha256()));

    g.finish();

    let ideal = BITS / 8;
    let used = empty.memory_usage() as u64;
    eprintln!(
        "memory: {used} bytes for {BITS} bits = {:.4} x len/granularity/8",
        used as f64 / ideal as f64
    );
}

criterion_group! {
    name = hbitmap;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(hbitmap);
