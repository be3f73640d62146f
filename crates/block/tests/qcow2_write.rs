//! Writing qcow2: random operation sequences against a flat model, each
//! image then judged by `qemu-img check` (no errors, no leaks) and `qemu-img
//! compare` (QEMU reads what the model says), over every refcount width,
//! both versions, cluster sizes from 512 B, backing files and compressed
//! clusters (read, and written); plus concurrency inside one cluster,
//! compressed clusters packed by concurrent writers, and refcount-table
//! growth.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use block::{BlockdevOptions, Graph, IoBuf, Node, ZeroFlags};
use proptest::prelude::*;
use serde_json::json;
use testkit::{qemu_img_create_qcow2, qemu_io_writes, require_tool, run};

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

/// Opens `image` writable, with discards passed down.
async fn open_rw(g: &Graph, name: &str, image: &str) -> Arc<Node> {
    open_rw_cached(g, name, image, None).await
}

/// [`open_rw`] with `l2-cache-size` set when given.
async fn open_rw_cached(g: &Graph, name: &str, image: &str, l2_cache: Option<u64>) -> Arc<Node> {
    let mut o = json!({"driver": "qcow2", "node-name": name, "discard": "unmap",
                       "file": {"driver": "file", "filename": image}});
    if let Some(bytes) = l2_cache {
        o["l2-cache-size"] = json!(bytes);
    }
    g.add(&BlockdevOptions::from_json(&o).unwrap())
        .await
        .unwrap()
}

/// `qemu-img check` must find nothing at all: no corruption, no leak.
fn assert_check_clean(image: &str) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", image])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {image}: {}\n{report}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    for key in ["corruptions", "leaks", "check-errors"] {
        assert!(v.get(key).is_none_or(|n| n == 0), "{key} in {report}");
    }
}

/// `qemu-img compare` must find the image equal to `want` (raw).
fn assert_qemu_reads(image: &str, want: &[u8], dir: &Path) {
    let raw = path(dir, "want.raw");
    std::fs::write(&raw, want).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw", image, &raw])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
    },
    /// A compressed write of the whole clusters around `off..off + len`:
    /// data that deflates well, or noise that does not (written plain).
    Compressed {
        off: u64,
        len: u64,
        seed: u8,
        noise: bool,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    Reopen,
}

/// Where the image starts from.
#[derive(Debug, Clone, Copy)]
enum Start {
    Empty,
    /// Backed by a raw file of random bytes.
    RawBacking,
    /// Backed by a qcow2 image with some data.
    Qcow2Backing,
    /// Every cluster compressed (`qemu-img convert -c`).
    Compressed,
}

#[derive(Debug, Clone)]
struct Case {
    cluster_bits: u32,
    refcount_bits: u32,
    compat: &'static str,
    start: Start,
    /// Bytes past a whole number of clusters: a partial last cluster
    /// (a multiple of 512).
    tail: u64,
    /// Cache two L2 tables only, so that changed ones are evicted (and
    /// written back) all the time.
    small_cache: bool,
    ops: Vec<Op>,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size).prop_flat_map(move |off| (Just(off), 1..=(size - off).min(300_000)));
    prop_oneof![
        5 => (range.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        3 => (range.clone(), any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|((off, len), seed, noise)| Op::Compressed { off, len, seed, noise }),
        2 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        2 => range.clone().prop_map(|(off, len)| Op::Discard { off, len }),
        2 => range.prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

const BASE: u64 = 768 << 10;

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(9u32), Just(12), Just(16)],
        prop_oneof![Just(1u32), Just(16), Just(64)],
        prop_oneof![Just("0.10"), Just("1.1")],
        prop_oneof![
            Just(Start::Empty),
            Just(Start::RawBacking),
            Just(Start::Qcow2Backing),
            Just(Start::Compressed)
        ],
        // A qcow2 image's size is whole sectors (`qemu-img` rounds it up),
        // so a partial last cluster is a whole number of sectors.
        prop_oneof![Just(0u64), Just(3 << 10), Just(512)],
        any::<bool>(),
    )
        .prop_flat_map(
            |(cluster_bits, refcount_bits, compat, start, tail, small_cache)| {
                // Version 2 has 16-bit refcounts only.
                let refcount_bits = if compat == "0.10" { 16 } else { refcount_bits };
                let tail = tail % (1 << cluster_bits);
                let size = BASE + tail;
                prop::collection::vec(op(size), 1..24).prop_map(move |ops| Case {
                    cluster_bits,
                    refcount_bits,
                    compat,
                    start,
                    tail,
                    small_cache,
                    ops,
                })
            },
        )
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Bytes that do not deflate (xorshift from `seed`).
fn noise(len: u64, seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Makes the image a case starts from; its initial contents.
fn make_image(c: &Case, dir: &Path, image: &str) -> Vec<u8> {
    let size = BASE + c.tail;
    let cs = 1u64 << c.cluster_bits;
    let opts = format!(
        "cluster_size={cs},compat={},refcount_bits={}",
        c.compat, c.refcount_bits
    );
    let create = |extra: &[&str]| {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[image, &size]);
        run("qemu-img", &args);
    };
    match c.start {
        Start::Empty => {
            create(&[]);
            vec![0; size as usize]
        }
        Start::RawBacking => {
            let backing = path(dir, "backing.raw");
            let data = pattern(size - 1000, 7);
            std::fs::write(&backing, &data).unwrap();
            create(&["-b", "backing.raw", "-F", "raw"]);
            let mut want = data;
            want.resize(size as usize, 0);
            want
        }
        Start::Qcow2Backing => {
            let backing = path(dir, "backing.qcow2");
            run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", &backing, &size.to_string()],
            );
            qemu_io_writes(&backing, "qcow2", &[(4096, 200_000, Some(0x5a))]);
            create(&["-b", "backing.qcow2", "-F", "qcow2"]);
            let mut want = vec![0; size as usize];
            want[4096..204_096].fill(0x5a);
            want
        }
        Start::Compressed => {
            let src = path(dir, "src.raw");
            let data = pattern(size, 3);
            std::fs::write(&src, &data).unwrap();
            run(
                "qemu-img",
                &["convert", "-c", "-O", "qcow2", "-o", &opts, &src, image],
            );
            data
        }
    }
}

/// What `Op`s do to the flat model, given the image's semantics: whole
/// discarded clusters read as zeroes, except in version 2 images with a
/// backing file, where they show the backing data again.
fn run_case(c: Case) {
    let dir = tempfile::tempdir().unwrap();
    let image = path(dir.path(), "img.qcow2");
    let initial = make_image(&c, dir.path(), &image);
    let size = BASE + c.tail;
    let cs = 1u64 << c.cluster_bits;
    let l2_cache = c.small_cache.then_some(2 * cs);
    let backing_data: Option<Vec<u8>> = match c.start {
        Start::RawBacking | Start::Qcow2Backing => Some(initial.clone()),
        _ => None,
    };
    let mut model = initial;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let g = Graph::new();
        let mut node = open_rw_cached(&g, "n", &image, l2_cache).await;
        for op in &c.ops {
            match *op {
                Op::Write { off, len, seed } => {
                    let data = pattern(len, seed);
                    let (r, _) = node.write(off, IoBuf::from_vec(data.clone()), false).await;
                    r.unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                Op::Compressed {
                    off,
                    len,
                    seed,
                    noise: rough,
                } => {
                    let off = off / cs * cs;
                    let end = (off + len).div_ceil(cs).saturating_mul(cs).min(size);
                    let len = end - off;
                    let data = if rough {
                        noise(len, seed)
                    } else {
                        pattern(len, seed)
                    };
                    let buf = IoBuf::from_vec(data.clone());
                    let (r, _) = node.write_compressed(off, buf).await;
                    r.unwrap();
                    model[off as usize..end as usize].copy_from_slice(&data);
                }
                Op::Zero { off, len, unmap } => {
                    let flags = ZeroFlags {
                        may_unmap: unmap,
                        ..ZeroFlags::default()
                    };
                    node.write_zeroes(off, len, flags).await.unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    node.discard(off, len).await.unwrap();
                    let end = off + len;
                    let first = off.div_ceil(cs);
                    let last = if end == size {
                        end.div_ceil(cs)
                    } else {
                        end / cs
                    };
                    for cluster in first..last {
                        let a = (cluster * cs) as usize;
                        let b = ((cluster + 1) * cs).min(size) as usize;
                        match (&backing_data, c.compat) {
                            (Some(bd), "0.10") => model[a..b].copy_from_slice(&bd[a..b]),
                            _ => model[a..b].fill(0),
                        }
                    }
                }
                Op::Read { off, len } => {
                    let got = node.read(off, len as usize).await.unwrap().into_vec();
                    assert!(
                        got == model[off as usize..(off + len) as usize],
                        "read {off}+{len} differs from the model"
                    );
                }
                Op::Flush => node.flush().await.unwrap(),
                Op::Reopen => {
                    drop(node);
                    g.remove("n").await.unwrap();
                    assert_check_clean(&image);
                    node = open_rw_cached(&g, "n", &image, l2_cache).await;
                }
            }
        }
        let got = node.read(0, size as usize).await.unwrap().into_vec();
        assert!(got == model, "the image reads differently from the model");
        drop(node);
        g.close_all().await.unwrap();
    });
    assert_check_clean(&image);
    assert_qemu_reads(&image, &model, dir.path());
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_match_a_flat_model(c in case()) {
        require_tool("qemu-img", "qemu-utils");
        run_case(c);
    }
}

/// Many writers at once into the same few clusters of a fresh image (each
/// writing its own 512-byte pieces): allocation must happen once per
/// cluster, and every piece must land.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_into_one_cluster_all_land() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = path(dir.path(), "c.qcow2");
    qemu_img_create_qcow2(&image, 1 << 20, "");
    let g = Graph::new();
    let node = open_rw(&g, "n", &image).await;
    let pieces = 4 * 128; // four 64 KiB clusters of 512-byte pieces
    let mut tasks = Vec::new();
    for piece in 0..pieces {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            // Interleave clusters so that neighbours race for the same one.
            let at = (piece % 4) * 65536 + (piece / 4) * 512;
            let data = vec![(piece % 251) as u8 + 1; 512];
            node.write(at, IoBuf::from_vec(data), false)
                .await
                .0
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut want = vec![0u8; 1 << 20];
    for piece in 0..pieces {
        let at = ((piece % 4) * 65536 + (piece / 4) * 512) as usize;
        want[at..at + 512].fill((piece % 251) as u8 + 1);
    }
    assert!(node.read(0, 1 << 20).await.unwrap().into_vec() == want);
    drop(node);
    g.close_all().await.unwrap();
    assert_check_clean(&image);
    assert_qemu_reads(&image, &want, dir.path());
    // One host cluster per guest cluster: nothing was allocated twice.
    let map = run("qemu-img", &["map", "--output=json", &image]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .collect();
    // (Which host cluster each guest cluster got depends on which write
    // came first; only the total and their distinctness are fixed.)
    let total: u64 = data.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 4 * 65536, "{map}");
    let mut hosts: Vec<u64> = data
        .iter()
        .flat_map(|e| {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            (0..l / 65536).map(move |i| o + i * 65536)
        })
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    assert_eq!(hosts.len(), 4, "{map}");
}

/// Compressed writes from many tasks at once (as a backup's workers issue
/// them), over clusters that held plain data, zeroes and nothing: QEMU
/// reads every cluster back, sees them compressed, and finds the refcounts
/// of the host clusters they share exact; the file holds a fraction of the
/// data; a write of part of a cluster is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_clusters_pack_and_qemu_reads_them() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = path(dir.path(), "z.qcow2");
    let size = 8u64 << 20;
    qemu_img_create_qcow2(&image, size, "");
    qemu_io_writes(&image, "qcow2", &[(0, 1 << 20, Some(0x11))]);
    let g = Graph::new();
    let node = open_rw(&g, "n", &image).await;
    node.write_zeroes(1 << 20, 1 << 20, ZeroFlags::default())
        .await
        .unwrap();
    let mut want = vec![0u8; size as usize];
    let mut tasks = Vec::new();
    for chunk in 0..(size >> 19) {
        // 512 KiB each: eight 64 KiB clusters of a short repeating pattern,
        // which deflates to less than a sector.
        let data: Vec<u8> = (0..512u64 << 10)
            .map(|i| (i % 16) as u8 ^ chunk as u8)
            .collect();
        want[(chunk << 19) as usize..((chunk + 1) << 19) as usize].copy_from_slice(&data);
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            node.write_compressed(chunk << 19, IoBuf::from_vec(data))
                .await
                .0
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let err = node
        .write_compressed(4096, IoBuf::from_vec(vec![1; 65536]))
        .await
        .0
        .unwrap_err();
    assert!(err.to_string().contains("not whole clusters"), "{err}");
    assert!(node.read(0, size as usize).await.unwrap().into_vec() == want);
    drop(node);
    g.close_all().await.unwrap();
    assert_check_clean(&image);
    assert_qemu_reads(&image, &want, dir.path());
    let map = run("qemu-img", &["map", "--output=json", &image]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let compressed: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["compressed"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(compressed, size, "{map}");
    // Packed: the freed 1 MiB of plain data (not punched out of the file),
    // metadata, and a sector per compressed cluster, where one host
    // cluster per guest cluster would take 8 MiB.
    let used = std::fs::metadata(&image).unwrap().len();
    let blocks = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&image).unwrap().blocks() * 512
    };
    assert!(
        blocks < (1 << 20) + (512 << 10),
        "{blocks} bytes allocated (file {used}): {map}"
    );
}

/// Filling an image of 512-byte clusters needs far more refcount blocks
/// than its first refcount table can name: the table moves and grows, and
/// QEMU follows it.
#[tokio::test]
async fn the_refcount_table_grows() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = path(dir.path(), "grow.qcow2");
    let size = 12u64 << 20;
    qemu_img_create_qcow2(&image, size, "cluster_size=512");
    let before = table_clusters(&image);
    let g = Graph::new();
    let node = open_rw(&g, "n", &image).await;
    let want = pattern(size, 9);
    for (i, chunk) in want.chunks(1 << 20).enumerate() {
        let (r, _) = node
            .write((i as u64) << 20, IoBuf::from_vec(chunk.to_vec()), false)
            .await;
        r.unwrap();
    }
    drop(node);
    g.close_all().await.unwrap();
    assert!(table_clusters(&image) > before, "the table did not grow");
    assert_check_clean(&image);
    assert_qemu_reads(&image, &want, dir.path());
}

fn table_clusters(image: &str) -> u32 {
    let h = std::fs::read(image).unwrap();
    u32::from_be_bytes(h[56..60].try_into().unwrap())
}

/// With `cache.direct=on` over a file whose length is not a multiple of the
/// alignment (as `qemu-img create` leaves it), metadata reads and writes at
/// the end of the file work, and the file grows as clusters are allocated.
#[tokio::test]
async fn o_direct_images_are_written_too() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = path(dir.path(), "direct.qcow2");
    qemu_img_create_qcow2(&image, 4 << 20, "");
    assert_ne!(std::fs::metadata(&image).unwrap().len() % 4096, 0);
    let g = Graph::new();
    let o = json!({"driver": "qcow2", "node-name": "d",
                   "file": {"driver": "file", "filename": image, "cache": {"direct": true}}});
    let node = g
        .add(&BlockdevOptions::from_json(&o).unwrap())
        .await
        .unwrap();
    let mut want = vec![0u8; 4 << 20];
    for (off, len, seed) in [
        (1000u64, 70_000u64, 1u8),
        (3 << 20, 65536, 2),
        (65_000, 10, 3),
    ] {
        let data = pattern(len, seed);
        node.write(off, IoBuf::from_vec(data.clone()), false)
            .await
            .0
            .unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    assert!(node.read(0, 4 << 20).await.unwrap().into_vec() == want);
    drop(node);
    g.close_all().await.unwrap();
    assert_check_clean(&image);
    assert_qemu_reads(&image, &want, dir.path());
}

/// Fast zeroing works where only metadata changes (whole clusters) and is
/// refused, before anything changes, where zeroes would have to be written.
#[tokio::test]
async fn fast_zeroing_changes_metadata_only_or_nothing() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = path(dir.path(), "fast.qcow2");
    qemu_img_create_qcow2(&image, 1 << 20, "");
    let g = Graph::new();
    let node = open_rw(&g, "n", &image).await;
    let data = pattern(1 << 20, 5);
    node.write(0, IoBuf::from_vec(data.clone()), false)
        .await
        .0
        .unwrap();
    let fast = ZeroFlags {
        fast: true,
        ..ZeroFlags::default()
    };
    // Half a cluster on each side of two whole ones: refused, unchanged.
    let err = node.write_zeroes(32768, 3 * 65536, fast).await.unwrap_err();
    assert!(matches!(err, block::Error::NotSupported(_)), "{err}");
    assert!(node.read(0, 1 << 20).await.unwrap().into_vec() == data);
    // Whole clusters: done.
    node.write_zeroes(65536, 2 * 65536, fast).await.unwrap();
    let mut want = data;
    want[65536..3 * 65536].fill(0);
    assert!(node.read(0, 1 << 20).await.unwrap().into_vec() == want);
    drop(node);
    g.close_all().await.unwrap();
    assert_check_clean(&image);
    assert_qemu_reads(&image, &want, dir.path());
}
