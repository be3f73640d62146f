//! Property tests: every operation of `HBitmap` against a naive model, a
//! `Vec<bool>` with one entry per granule and item arithmetic in `u128`.

use hbitmap::HBitmap;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

/// The naive model: one `bool` per granule.
#[derive(Debug, Clone)]
struct Model {
    len: u64,
    gran: u32,
    bits: Vec<bool>,
}

impl Model {
    fn new(len: u64, gran: u32) -> Model {
        let n = (u128::from(len)).div_ceil(1u128 << gran) as usize;
        Model {
            len,
            gran,
            bits: vec![false; n],
        }
    }

    /// First and one-past-last item of granule `b`.
    fn granule(&self, b: usize) -> (u64, u64) {
        let start = (b as u128) << self.gran;
        let end = ((b as u128 + 1) << self.gran).min(u128::from(self.len));
        (start as u64, end as u64)
    }

    fn set(&mut self, start: u64, count: u64) {
        if count == 0 {
            return;
        }
        let first = (start >> self.gran) as usize;
        let last = ((start + count - 1) >> self.gran) as usize;
        self.bits[first..=last].fill(true);
    }

    fn reset(&mut self, start: u64, count: u64) {
        for b in 0..self.bits.len() {
            let (s, e) = self.granule(b);
            if s >= start && e <= start + count {
                self.bits[b] = false;
            }
        }
    }

    fn get(&self, item: u64) -> bool {
        item < self.len && self.bits[(item >> self.gran) as usize]
    }

    fn count(&self) -> u64 {
        (0..self.bits.len())
            .filter(|&b| self.bits[b])
            .map(|b| {
                let (s, e) = self.granule(b);
                e - s
            })
            .sum()
    }

    fn next_with(&self, start: u64, end: u64, dirty: bool) -> Option<u64> {
        let end = end.min(self.len);
        if start >= end {
            return None;
        }
        (0..self.bits.len())
            .filter(|&b| self.bits[b] == dirty)
            .map(|b| self.granule(b))
            .find(|&(s, e)| e > start && s < end)
            .map(|(s, _)| s.max(start))
    }

    fn runs_from(&self, start: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in 0..self.bits.len() {
            if !self.bits[b] {
                continue;
            }
            let (s, e) = self.granule(b);
            if e <= start {
                continue;
            }
            let s = s.max(start);
            match runs.last_mut() {
                Some((rs, rl)) if *rs + *rl == s => *rl = e - *rs,
                _ => runs.push((s, e - s)),
            }
        }
        runs
    }

    fn next_dirty_area(&self, start: u64, end: u64, max_len: u64) -> Option<(u64, u64)> {
        if max_len == 0 {
            return None;
        }
        let end = end.min(self.len);
        if start >= end {
            return None;
        }
        let (s, l) = self
            .runs_from(start)
            .into_iter()
            .find(|&(s, l)| s + l > start && s < end)?;
        let stop = (s + l).min(end).min(s.saturating_add(max_len));
        Some((s, stop - s))
    }

    fn truncate(&mut self, len: u64) {
        let n = (u128::from(len)).div_ceil(1u128 << self.gran) as usize;
        self.bits.resize(n, false);
        self.len = len;
    }

    /// QEMU's bottom level as little-endian words, at least one word.
    fn words(&self) -> Vec<u8> {
        let nwords = self.bits.len().div_ceil(64).max(1);
        let mut out = vec![0u8; nwords * 8];
        for (b, &set) in self.bits.iter().enumerate() {
            if set {
                out[b / 8] |= 1 << (b % 8);
            }
        }
        out
    }

    fn sha256(&self) -> String {
        Sha256::digest(self.words())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Compares everything observable of `bm` with `model`, probing queries at
/// the given items.
fn assert_same(bm: &HBitmap, model: &Model, probes: &[u64]) {
    bm.check_invariants().unwrap();
    assert_eq!(bm.len(), model.len);
    assert_eq!(bm.bits(), model.bits.len() as u64);
    assert_eq!(bm.count(), model.count(), "count");
    assert_eq!(
        bm.dirty_granules(),
        model.bits.iter().filter(|&&b| b).count() as u64
    );
    assert_eq!(bm.is_empty(), model.count() == 0);
    assert_eq!(bm.runs().collect::<Vec<_>>(), model.runs_from(0), "runs");
    assert_eq!(bm.sha256(), model.sha256(), "sha256");
    for &p in probes {
        let p = scale(p, model.len);
        let q = scale(p.rotate_left(17), model.len);
        assert_eq!(bm.get(p), model.get(p), "get({p})");
        for (s, e) in [(p, model.len), (p, q), (0, p)] {
            assert_eq!(
                bm.next_dirty(s, e),
                model.next_with(s, e, true),
                "next_dirty({s}, {e})"
            );
            assert_eq!(
                bm.next_zero(s, e),
                model.next_with(s, e, false),
                "next_zero({s}, {e})"
            );
            let max_len = q.max(1);
            assert_eq!(
                bm.next_dirty_area(s, e, max_len),
                model.next_dirty_area(s, e, max_len),
                "next_dirty_area({s}, {e}, {max_len})"
            );
        }
        assert_eq!(
            bm.runs_from(p).collect::<Vec<_>>(),
            model.runs_from(p),
            "runs_from({p})"
        );
    }
}

/// Maps a random `u64` onto `0..=len`, favouring the interesting places: the
/// ends, granule and word boundaries.
fn scale(x: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    match x % 8 {
        0 => 0,
        1 => len,
        2 => len - 1,
        _ => x % (len + 1).max(1),
    }
}

/// A bitmap geometry: `(len, granularity)`. Mostly small granularities with
/// up to a few thousand bits (often a partial last granule, often exactly
/// word-sized); sometimes huge lengths near `u64::MAX` with huge granules.
fn geometry() -> impl Strategy<Value = (u64, u32)> {
    prop_oneof![
        4 => (0u32..=20, 0u64..3000, any::<u64>()).prop_map(|(g, whole, tail)| {
            let tail = if tail % 3 == 0 { 0 } else { tail % (1u64 << g) };
            ((whole << g) + tail, g)
        }),
        1 => (0u32..=20, prop::sample::select(vec![0u64, 1, 63, 64, 65, 4095, 4096, 4097, 262_144])).prop_map(|(g, bits)| (bits << g, g)),
        1 => (52u32..=63, any::<u64>()).prop_map(|(g, len)| (len | (1 << 63), g)),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64),
    /// `mark`: the shared-reference `set`.
    Mark(u64, u64),
    Reset(u64, u64),
    ResetAll,
    Truncate(u64),
    /// Merge a bitmap of the same length built from `Set`s, at a granularity
    /// shifted by the given amount.
    Merge(i8, Vec<(u64, u64)>),
    /// Same as `Merge`, but `copy_from`.
    Copy(i8, Vec<(u64, u64)>),
    /// Serialize everything and load it into a fresh bitmap.
    RoundTrip,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (any::<u64>(), any::<u64>());
    prop_oneof![
        4 => range.prop_map(|(a, b)| Op::Set(a, b)),
        3 => range.prop_map(|(a, b)| Op::Mark(a, b)),
        4 => range.prop_map(|(a, b)| Op::Reset(a, b)),
        1 => Just(Op::ResetAll),
        1 => any::<u64>().prop_map(Op::Truncate),
        1 => (-3i8..=3, prop::collection::vec(range, 0..6)).prop_map(|(d, r)| Op::Merge(d, r)),
        1 => (-3i8..=3, prop::collection::vec(range, 0..6)).prop_map(|(d, r)| Op::Copy(d, r)),
        1 => Just(Op::RoundTrip),
    ]
}

/// Maps random numbers to a range `start..start + count` inside `0..=len`.
fn range_in(len: u64, (a, b): (u64, u64)) -> (u64, u64) {
    let start = scale(a, len);
    let count = scale(b, len - start);
    (start, count)
}

/// A bitmap of `len` items at `gran`, and its model, with `ranges` set.
fn built(len: u64, gran: u32, ranges: &[(u64, u64)]) -> (HBitmap, Model) {
    let mut bm = HBitmap::new(len, gran).unwrap();
    let mut model = Model::new(len, gran);
    for &r in ranges {
        let (s, c) = range_in(len, r);
        bm.set(s, c).unwrap();
        model.set(s, c);
    }
    (bm, model)
}

fn shifted_granularity(gran: u32, len: u64, delta: i8) -> u32 {
    let g = (i64::from(gran) + i64::from(delta)).clamp(0, 63) as u32;
    // Keep the other bitmap's bit count within what the model can hold.
    let mut g = g;
    while (u128::from(len) >> g) > 1 << 20 {
        g += 1;
    }
    g
}

fn merge_into_model(model: &mut Model, other: &Model) {
    for (s, l) in other.runs_from(0) {
        model.set(s, l);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn behaves_like_the_model(
        (len, gran) in geometry(),
        ops in prop::collection::vec(op(), 1..25),
        probes in prop::collection::vec(any::<u64>(), 4),
    ) {
        let mut bm = HBitmap::new(len, gran).unwrap();
        let mut model = Model::new(len, gran);
        assert_same(&bm, &model, &probes);
        for op in ops {
            match op {
                Op::Set(a, b) => {
                    let (s, c) = range_in(model.len, (a, b));
                    bm.set(s, c).unwrap();
                    model.set(s, c);
                }
                Op::Mark(a, b) => {
                    let (s, c) = range_in(model.len, (a, b));
                    bm.mark(s, c).unwrap();
                    model.set(s, c);
                }
                Op::Reset(a, b) => {
                    let (s, c) = range_in(model.len, (a, b));
                    bm.reset(s, c).unwrap();
                    model.reset(s, c);
                }
                Op::ResetAll => {
                    bm.reset_all();
                    model = Model::new(model.len, gran);
                }
                Op::Truncate(x) => {
                    // Stay within a size the model can hold.
                    let max = (model.len / 2).saturating_add(3 << gran).min(len.saturating_mul(2).max(1 << gran));
                    let new_len = x % max.max(1);
                    bm.truncate(new_len).unwrap();
                    model.truncate(new_len);
                }
                Op::Merge(delta, ranges) => {
                    let g2 = shifted_granularity(gran, model.len, delta);
                    let (other, other_model) = built(model.len, g2, &ranges);
                    bm.merge(&other).unwrap();
                    merge_into_model(&mut model, &other_model);
                }
                Op::Copy(delta, ranges) => {
                    let g2 = shifted_granularity(gran, model.len, delta);
                    let (other, other_model) = built(model.len, g2, &ranges);
                    bm.copy_from(&other).unwrap();
                    model = Model::new(model.len, gran);
                    merge_into_model(&mut model, &other_model);
                }
                Op::RoundTrip => {
                    let size = bm.serialization_size(0, bm.len()).unwrap();
                    let mut buf = vec![0u8; size as usize];
                    prop_assert_eq!(bm.serialize_part(&mut buf, 0, bm.len()).unwrap() as u64, size);
                    prop_assert_eq!(&buf[..], &model.words()[..size as usize]);
                    let mut fresh = HBitmap::new(bm.len(), gran).unwrap();
                    fresh.deserializer().part(&buf, 0, bm.len()).unwrap();
                    assert_same(&fresh, &model, &probes);
                    bm = fresh;
                }
            }
            assert_same(&bm, &model, &probes);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Deserialization parses untrusted bytes (qcow2 clusters, migration
    /// streams): any bytes at any aligned place give a consistent bitmap
    /// holding exactly those bits, padding dropped.
    #[test]
    fn loads_arbitrary_words(
        (len, gran) in geometry(),
        data in prop::collection::vec(any::<u8>(), 1..2048),
        at in any::<u64>(),
        probes in prop::collection::vec(any::<u64>(), 4),
    ) {
        let mut bm = HBitmap::new(len, gran).unwrap();
        let mut model = Model::new(len, gran);
        prop_assume!(len > 0);
        let words = model.bits.len().div_ceil(64) as u64;
        let first_bit = (at % words) * 64;
        let start = (u128::from(first_bit) << gran) as u64;
        let count = len - start;
        let size = bm.serialization_size(start, count).unwrap() as usize;
        let buf: Vec<u8> = data.iter().copied().cycle().take(size).collect();
        bm.deserializer().part(&buf, start, count).unwrap();
        for b in first_bit as usize..model.bits.len() {
            let i = b - first_bit as usize;
            model.bits[b] = buf[i / 8] & (1 << (i % 8)) != 0;
        }
        assert_same(&bm, &model, &probes);
    }
}
