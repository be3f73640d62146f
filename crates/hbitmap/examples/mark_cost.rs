//! A fixed workload for counting instructions with callgrind, which is
//! repeatable where wall-clock time on a shared machine is not:
//!
//! ```sh
//! cargo build --release -p hbitmap --example mark_cost
//! for n in 0 65536; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/mark_cost $n 2>&1 | grep refs
//! done
//! ```
//!
//! (instructions with N writes − with 0) / N = instructions per marked
//! 64 KiB write on a 1 TiB bitmap at 64 KiB granularity.

use std::hint::black_box;

use hbitmap::HBitmap;

fn main() -> Result<(), hbitmap::Error> {
    let writes: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(65536);
    let mut bm = HBitmap::new(1 << 40, 16)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..writes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bm.set(black_box((x % (1 << 24)) << 16), 1 << 16)?;
    }
    black_box(bm.count());
    Ok(())
}
