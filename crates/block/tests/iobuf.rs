//! `IoBuf` against a model: random sequences of making, cloning, sharing,
//! writing, reusing and dropping buffers, small (heap) and large (the
//! huge-page arena), must keep every buffer's bytes what the model says,
//! its start as aligned as asked, and no buffer's writes visible in another.

use block::IoBuf;
use proptest::prelude::*;

/// Lengths on both sides of the arena's threshold and of its chunk size.
const LENS: [usize; 9] = [
    0,
    1,
    4095,
    4096,
    IoBuf::HUGE_PAGE_MIN - 1,
    IoBuf::HUGE_PAGE_MIN,
    100_000,
    1 << 20,
    (2 << 20) + 1,
];
const ALIGNS: [usize; 3] = [1, 512, 4096];

#[derive(Debug, Clone)]
enum Op {
    New {
        len: usize,
        align: usize,
    },
    Clone(usize),
    Share(usize),
    Write {
        buf: usize,
        at: usize,
        byte: u8,
    },
    Reuse {
        buf: usize,
        len: usize,
        align: usize,
    },
    Drop(usize),
    IntoVec(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let len = proptest::sample::select(LENS.to_vec());
    let align = proptest::sample::select(ALIGNS.to_vec());
    prop_oneof![
        (len.clone(), align.clone()).prop_map(|(len, align)| Op::New { len, align }),
        any::<usize>().prop_map(Op::Clone),
        any::<usize>().prop_map(Op::Share),
        (any::<usize>(), any::<usize>(), any::<u8>()).prop_map(|(buf, at, byte)| Op::Write {
            buf,
            at,
            byte
        }),
        (any::<usize>(), len, align).prop_map(|(buf, len, align)| Op::Reuse { buf, len, align }),
        any::<usize>().prop_map(Op::Drop),
        any::<usize>().prop_map(Op::IntoVec),
    ]
}

/// A buffer, the bytes it must hold (`None`: unspecified, after a reuse
/// that kept the memory) and the alignment it was asked for.
struct Held {
    buf: IoBuf,
    model: Option<Vec<u8>>,
    align: usize,
}

fn check(held: &[Held]) {
    for (i, h) in held.iter().enumerate() {
        assert!(
            h.buf.is_aligned(h.align.max(IoBuf::MIN_ALIGN)),
            "buffer {i} not aligned to {}",
            h.align
        );
        if let Some(model) = &h.model {
            assert_eq!(h.buf.len(), model.len(), "buffer {i}");
            assert!(h.buf.as_slice() == model.as_slice(), "buffer {i}'s bytes");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn buffers_behave_as_vectors_of_their_own(ops in proptest::collection::vec(op(), 1..40)) {
        let mut held: Vec<Held> = Vec::new();
        for op in ops {
            let count = held.len().max(1);
            let pick = |i: usize| i % count;
            match op {
                Op::New { len, align } => {
                    let buf = IoBuf::zeroed(len, align);
                    held.push(Held { buf, model: Some(vec![0; len]), align });
                }
                Op::Clone(i) if !held.is_empty() => {
                    let h = &held[pick(i)];
                    let copy = Held { buf: h.buf.clone(), model: h.model.clone(), align: h.align };
                    held.push(copy);
                }
                Op::Share(i) if !held.is_empty() => {
                    let i = pick(i);
                    let h = held.swap_remove(i);
                    let buf = h.buf.shared();
                    let twin = Held { buf: buf.clone(), model: h.model.clone(), align: h.align };
                    held.push(Held { buf, ..h });
                    held.push(twin);
                }
                Op::Write { buf, at, byte } if !held.is_empty() => {
                    let h = &mut held[pick(buf)];
                    if !h.buf.is_empty() {
                        let at = at % h.buf.len();
                        h.buf.as_mut_slice()[at] = byte;
                        if let Some(model) = &mut h.model {
                            model[at] = byte;
                        }
                    }
                }
                Op::Reuse { buf, len, align } if !held.is_empty() => {
                    let h = held.swap_remove(pick(buf));
                    let kept = h.buf.can_hold(len, align);
                    let buf = h.buf.reuse(len, align);
                    assert_eq!(buf.len(), len);
                    // Kept memory holds whatever it held; new memory is zero.
                    let model = if kept { None } else { Some(vec![0; len]) };
                    held.push(Held { buf, model, align });
                }
                Op::Drop(i) if !held.is_empty() => {
                    held.swap_remove(pick(i));
                }
                Op::IntoVec(i) if !held.is_empty() => {
                    let h = held.swap_remove(pick(i));
                    let bytes = h.buf.as_slice().to_vec();
                    assert_eq!(h.buf.into_vec(), bytes);
                }
                _ => {}
            }
            check(&held);
            // Writing every byte of one buffer changes no other's.
            if let Some(h) = held.last_mut() {
                h.buf.as_mut_slice().fill(0xA5);
                let len = h.buf.len();
                h.model = Some(vec![0xA5; len]);
                check(&held);
            }
        }
    }
}
