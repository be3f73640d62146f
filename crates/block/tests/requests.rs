//! Requests against a flat model: random batches of concurrent reads,
//! writes, write-zeroes and discards on null, file (buffered and
//! `O_DIRECT`) and raw-over-file nodes. Within a batch no write overlaps
//! another request, so the outcome is defined; batches run one after the
//! other. A dirty bitmap on the node must end up exactly as the model's.

use std::sync::Arc;

use block::{BlockdevOptions, Graph, IoBuf, Node, ZeroFlags};
use hbitmap::HBitmap;
use proptest::prelude::*;
use serde_json::{Value, json};

const SIZE: u64 = 192 * 1024;
const GRAN: u32 = 12;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Null,
    File {
        direct: bool,
        unmap: bool,
        uring: bool,
    },
    RawOverFile {
        direct: bool,
        uring: bool,
    },
}

#[derive(Debug, Clone)]
enum Op {
    Read(u64, u64),
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

impl Op {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Read(o, l) | Op::Write(o, l, _) | Op::Zero(o, l, _) | Op::Discard(o, l) => {
                Some((o, o + l))
            }
            Op::Flush => None,
        }
    }

    fn writes(&self) -> bool {
        matches!(self, Op::Write(..) | Op::Zero(..) | Op::Discard(..))
    }
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Anywhere, any length.
        (0..SIZE, 1u64..20_000),
        // Block-aligned.
        (0..SIZE / 4096, 1u64..8).prop_map(|(b, n)| (b * 4096, n * 4096)),
    ]
    .prop_map(|(o, l)| (o, l.min(SIZE - o).max(1)))
    .prop_filter("inside", |(o, l)| o + l <= SIZE)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => range().prop_map(|(o, l)| Op::Read(o, l)),
        4 => (range(), 1u8..=255).prop_map(|((o, l), b)| Op::Write(o, l, b)),
        2 => (range(), any::<bool>()).prop_map(|((o, l), u)| Op::Zero(o, l, u)),
        1 => range().prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::Flush),
    ]
}

/// Keeps the ops of a batch whose outcome does not depend on their order.
fn independent(batch: Vec<Op>) -> Vec<Op> {
    let mut kept: Vec<Op> = Vec::new();
    for op in batch {
        let clash = op.range().is_some_and(|(s, e)| {
            kept.iter().any(|k| {
                k.range()
                    .is_some_and(|(ks, ke)| s < ke && ks < e && (op.writes() || k.writes()))
            })
        });
        if !clash {
            kept.push(op);
        }
    }
    kept
}

async fn open(g: &Graph, kind: Kind, dir: &tempfile::TempDir) -> Arc<Node> {
    let file = |direct: bool, uring: bool, size: u64| -> Value {
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let aio = if uring { "io_uring" } else { "threads" };
        json!({"driver": "file", "filename": path.to_str().unwrap(), "aio": aio,
               "cache": {"direct": direct}})
    };
    let v = match kind {
        Kind::Null => json!({"driver": "null-co", "node-name": "n", "size": SIZE}),
        Kind::File {
            direct,
            unmap,
            uring,
        } => {
            let mut v = file(direct, uring, SIZE);
            v["node-name"] = json!("n");
            v["discard"] = json!(if unmap { "unmap" } else { "ignore" });
            v
        }
        Kind::RawOverFile { direct, uring } => json!({
            "driver": "raw", "node-name": "n", "offset": 8192, "size": SIZE, "discard": "unmap",
            "file": file(direct, uring, SIZE + 3 * 4096),
        }),
    };
    let node = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    let uring = matches!(
        kind,
        Kind::File { uring: true, .. } | Kind::RawOverFile { uring: true, .. }
    );
    if uring {
        let file = g
            .nodes()
            .into_iter()
            .find(|n| n.driver_name() == "file")
            .unwrap();
        assert_eq!(file.engine(), Some("io_uring"), "io_uring was refused");
    }
    node
}

/// Runs one request; returns what a read read.
async fn run(node: Arc<Node>, op: Op) -> Option<Vec<u8>> {
    match op {
        Op::Read(o, l) => Some(node.read(o, l as usize).await.unwrap().into_vec()),
        Op::Write(o, l, b) => {
            let (r, _) = node
                .write(o, IoBuf::from_vec(vec![b; l as usize]), false)
                .await;
            r.unwrap();
            None
        }
        Op::Zero(o, l, may_unmap) => {
            let flags = ZeroFlags {
                may_unmap,
                ..ZeroFlags::default()
            };
            node.write_zeroes(o, l, flags).await.unwrap();
            None
        }
        Op::Discard(o, l) => {
            node.discard(o, l).await.unwrap();
            None
        }
        Op::Flush => {
            node.flush().await.unwrap();
            None
        }
    }
}

/// What `op` does to the model's bytes and dirty bitmap.
fn apply(kind: Kind, align: u64, model: &mut [u8], dirty: &mut HBitmap, op: &Op) {
    let fill = |model: &mut [u8], o: u64, l: u64, b: u8| {
        model[o as usize..(o + l) as usize].fill(b);
    };
    match *op {
        Op::Write(o, l, b) => {
            fill(model, o, l, b);
            dirty.set(o, l).unwrap();
        }
        Op::Zero(o, l, _) => {
            fill(model, o, l, 0);
            dirty.set(o, l).unwrap();
        }
        Op::Discard(o, l) => {
            let unmap = match kind {
                Kind::Null => false,
                Kind::File { unmap, .. } => unmap,
                Kind::RawOverFile { .. } => true,
            };
            let (s, e) = (o.div_ceil(align) * align, (o + l) / align * align);
            if unmap && s < e {
                // Holes read as zeroes on ext4; the null device has no data.
                fill(model, s, e - s, 0);
                dirty.set(s, e - s).unwrap();
            }
        }
        Op::Read(..) | Op::Flush => {}
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Null),
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(direct, unmap, uring)| {
            Kind::File {
                direct,
                unmap,
                uring,
            }
        }),
        (any::<bool>(), any::<bool>())
            .prop_map(|(direct, uring)| Kind::RawOverFile { direct, uring }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn requests_behave_like_a_flat_disk(
        kind in kind(),
        batches in prop::collection::vec(prop::collection::vec(op(), 1..10), 1..8),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let g = Graph::new();
        let node = rt.block_on(open(&g, kind, &dir));
        node.bitmaps().add("b", Some(1 << GRAN), false, false).unwrap();
        let align = node.limits().request_alignment;
        let mut model = vec![0u8; SIZE as usize];
        let mut dirty = HBitmap::new(SIZE, GRAN).unwrap();
        let null = matches!(kind, Kind::Null);
        for batch in batches {
            let batch = independent(batch);
            let results = rt.block_on(async {
                let tasks: Vec<_> = batch
                    .iter()
                    .map(|op| tokio::spawn(run(node.clone(), op.clone())))
                    .collect();
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.unwrap());
                }
                out
            });
            for (op, read) in batch.iter().zip(results) {
                if let (Op::Read(o, l), Some(data)) = (op, read) {
                    let want = if null {
                        vec![0; *l as usize]
                    } else {
                        model[*o as usize..(*o + *l) as usize].to_vec()
                    };
                    prop_assert!(data == want, "read {}+{} differs", o, l);
                }
            }
            for op in &batch {
                apply(kind, align, &mut model, &mut dirty, op);
            }
        }
        let all = rt.block_on(node.read(0, SIZE as usize)).unwrap().into_vec();
        if !null {
            prop_assert!(all == model, "final contents differ");
        }
        prop_assert_eq!(node.bitmaps().sha256("b").unwrap(), dirty.sha256());
        // Whatever block status calls zero reads as zeroes.
        let extents = rt.block_on(node.block_status(0, SIZE)).unwrap();
        prop_assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), SIZE);
        for e in extents.iter().filter(|e| e.zero) {
            let zeroes = all[e.offset as usize..(e.offset + e.len) as usize].iter().all(|&b| b == 0);
            prop_assert!(zeroes || null, "extent {:?} is not zero", e);
        }
    }
}

#[tokio::test]
async fn out_of_range_and_read_only_requests_fail_cleanly() {
    let g = Graph::new();
    let v = json!({"driver": "null-co", "node-name": "n", "size": 4096});
    let n = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    let e = n.read(4000, 100).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Request 4000+100 is beyond the end of node 'n' (4096 bytes)"
    );
    assert_eq!(e.errno(), 22);
    let (r, buf) = n.write(u64::MAX, IoBuf::zeroed(2, 1), false).await;
    assert!(r.is_err());
    assert_eq!(buf.len(), 2, "the buffer comes back");
    assert!(n.write_zeroes(4096, 1, ZeroFlags::default()).await.is_err());
    assert!(n.discard(1, u64::MAX).await.is_err());
    assert!(n.block_status(0, 4097).await.is_err());

    let v = json!({"driver": "null-co", "node-name": "ro", "size": 4096, "read-only": true});
    let ro = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    let (r, _) = ro.write(0, IoBuf::zeroed(1, 1), false).await;
    let e = r.unwrap_err();
    assert_eq!(e.to_string(), "Block node 'ro' is read-only");
    assert_eq!(e.errno(), 1);
    assert!(ro.read(0, 4096).await.is_ok());
}

#[tokio::test]
async fn file_block_status_sees_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let g = Graph::new();
    let v = json!({"driver": "file", "node-name": "f", "filename": path.to_str().unwrap()});
    let f = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    let (r, _) = f
        .write(1 << 20, IoBuf::from_vec(vec![7; 65536]), false)
        .await;
    r.unwrap();
    let extents = f.block_status(0, 4 << 20).await.unwrap();
    let data: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.data)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(data, [(1 << 20, 65536)], "{extents:?}");
    assert!(extents.iter().all(|e| e.data != e.zero));
}

/// tmpfs cannot `FALLOC_FL_ZERO_RANGE`: write-zeroes falls back to writing
/// zero buffers, and a fast zero request says it cannot be fast.
#[tokio::test]
async fn write_zeroes_falls_back_where_fallocate_cannot_zero() {
    let shm = std::path::Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "this test needs /dev/shm (tmpfs) to exercise the fallocate fallback"
    );
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("zeroes.img");
    std::fs::write(&path, vec![0xaa; 1 << 20]).unwrap();
    let g = Graph::new();
    let v = json!({"driver": "file", "node-name": "f", "filename": path.to_str().unwrap(),
                   "discard": "unmap"});
    let f = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    let fast = ZeroFlags {
        fast: true,
        ..ZeroFlags::default()
    };
    let e = f.write_zeroes(0, 65536, fast).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Operation not supported: fast zeroing on this file system"
    );
    assert!(
        f.read(0, 65536)
            .await
            .unwrap()
            .as_slice()
            .iter()
            .all(|&b| b == 0xaa)
    );
    f.write_zeroes(0, 65536, ZeroFlags::default())
        .await
        .unwrap();
    assert!(f.read(0, 65536).await.unwrap().is_zero());
    let unmap = ZeroFlags {
        may_unmap: true,
        ..ZeroFlags::default()
    };
    f.write_zeroes(65536, 65536, unmap).await.unwrap();
    assert!(f.read(65536, 65536).await.unwrap().is_zero());
    assert!(
        f.read(131072, 4096)
            .await
            .unwrap()
            .as_slice()
            .iter()
            .all(|&b| b == 0xaa)
    );
}

/// An `O_DIRECT` image whose size is a multiple of 512 but not of 4096 (a
/// common raw image) takes unaligned writes up to its last byte.
#[tokio::test]
async fn direct_io_reaches_the_last_sector() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    let size = (1 << 20) + 1536;
    std::fs::write(&path, vec![5u8; size]).unwrap();
    let g = Graph::new();
    let v = json!({"driver": "file", "node-name": "f", "filename": path.to_str().unwrap(),
                   "cache": {"direct": true}});
    let f = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    let at = size as u64 - 700;
    let (r, _) = f.write(at, IoBuf::from_vec(vec![6; 700]), true).await;
    r.unwrap();
    let tail = f.read(at - 10, 710).await.unwrap().into_vec();
    assert_eq!(&tail[..10], &[5; 10]);
    assert!(tail[10..].iter().all(|&b| b == 6));
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        size as u64,
        "the file did not grow"
    );
}

/// Buffered reads try the page cache on the calling thread first and fall
/// back to the thread pool for what is not cached: data dropped from the
/// cache, half-cached requests and the end of the file all read right.
#[tokio::test]
async fn reads_partly_out_of_the_page_cache_read_right() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cold.img");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 241) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    file.sync_all().unwrap();
    let g = Graph::new();
    let v = json!({"driver": "file", "node-name": "f", "filename": path.to_str().unwrap()});
    let f = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    let evict = || {
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    };
    for (offset, len) in [(0u64, 8usize << 20), (4096, 1 << 20), (3 << 20, 3 << 20)] {
        evict();
        // Warm the first half only.
        let _ = f.read(offset, len / 2).await.unwrap();
        let got = f.read(offset, len).await.unwrap();
        assert!(
            got.as_slice() == &data[offset as usize..offset as usize + len],
            "{offset}+{len}"
        );
    }
    evict();
    let tail = f.read((8 << 20) - 100, 100).await.unwrap();
    assert_eq!(tail.as_slice(), &data[(8 << 20) - 100..]);
}
