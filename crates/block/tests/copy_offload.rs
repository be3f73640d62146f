//! Copy offload (`Node::copy_range_to`) and writes from pipes
//! (`Node::write_piped`): bytes moved into a buffered host file inside the
//! kernel land at the target with the target's write tracking, and are
//! refused, with nothing written or taken, wherever a node needs the data
//! to pass through memory.

use std::sync::Arc;

use block::{BlockdevOptions, BoxFuture, Graph, IoBuf, Node, WriteHook, WriteRequest};
use serde_json::{Value, json};

const SIZE: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

/// A `SIZE` file at `path`, filled with `byte` (or sparse for 0).
fn file(path: &std::path::Path, byte: u8) -> String {
    if byte == 0 {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(SIZE))
            .expect("a sparse file");
    } else {
        std::fs::write(path, vec![byte; SIZE as usize]).expect("a full file");
    }
    path.display().to_string()
}

async fn add(g: &Graph, v: Value) -> Arc<Node> {
    let options = BlockdevOptions::from_json(&v).expect("valid options");
    g.add(&options).await.expect("the node opens")
}

/// A `raw` node `name` over a `file` node of `path`; `file` adds options
/// to the file node, `raw` to the raw node.
async fn raw(g: &Graph, name: &str, path: &str, file: Value, raw: Value) -> Arc<Node> {
    let mut f = json!({"driver": "file", "filename": path});
    if let (Value::Object(f), Value::Object(extra)) = (&mut f, file) {
        f.extend(extra);
    }
    let mut v = json!({"driver": "raw", "node-name": name, "file": f});
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, raw) {
        v.extend(extra);
    }
    add(g, v).await
}

/// Node `dst`: the 2 MiB of the file at `path` from 1 MiB on, through
/// `raw`, with a recording bitmap `b` of 64 KiB granularity.
async fn window_with_bitmap(g: &Graph, path: &str) -> Arc<Node> {
    let node = raw(
        g,
        "dst",
        path,
        json!({}),
        json!({"offset": MIB, "size": 2 * MIB}),
    )
    .await;
    node.add_bitmap("b", Some(65536), false, false)
        .await
        .expect("a bitmap");
    node
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

#[test]
fn a_copy_between_buffered_files_lands_with_the_targets_tracking() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let src = file(&dir.path().join("src"), 0x5a);
    let dst = file(&dir.path().join("dst"), 0);
    runtime().block_on(async {
        let g = Graph::new();
        let source = raw(&g, "src", &src, json!({}), json!({})).await;
        // The target is a window of its file: the copy is shifted with it.
        let target = window_with_bitmap(&g, &dst).await;
        assert!(
            source
                .copy_range_to(MIB, MIB, &target, false)
                .await
                .expect("no error")
        );
        let data = target.read(0, (2 * MIB) as usize).await.expect("a read");
        let (copied, rest) = data.as_slice().split_at(MIB as usize);
        assert!(copied.iter().all(|&b| b == 0), "before the copied range");
        assert!(rest.iter().all(|&b| b == 0x5a), "the copied range");
        let on_disk = std::fs::read(&dst).expect("the target file");
        assert!(on_disk[..(2 * MIB) as usize].iter().all(|&b| b == 0));
        assert!(
            on_disk[(2 * MIB) as usize..(3 * MIB) as usize]
                .iter()
                .all(|&b| b == 0x5a)
        );
        let dirty = target.bitmaps().info();
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].count, MIB, "the bitmap marks the copy");
        // Past the end of either node: an error, nothing copied.
        assert!(
            source
                .copy_range_to(SIZE - 4096, 8192, &target, false)
                .await
                .is_err()
        );
        assert!(
            target
                .copy_range_to(MIB, 2 * MIB, &source, false)
                .await
                .is_err()
        );
    });
}

/// A hook that only counts what passes.
struct Counting;

impl WriteHook for Counting {
    fn before<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn after<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[test]
fn a_copy_is_refused_where_the_data_must_pass_through_memory() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = |name: &str, byte| file(&dir.path().join(name), byte);
    let (src, dst) = (path("src", 0x33), path("dst", 0));
    runtime().block_on(async {
        let g = Graph::new();
        let source = raw(&g, "src", &src, json!({}), json!({})).await;
        let direct_source = raw(
            &g,
            "src-direct",
            &path("src-direct", 0x33),
            json!({"cache": {"direct": true}}),
            json!({}),
        )
        .await;
        let target = raw(&g, "dst", &dst, json!({}), json!({})).await;
        let detecting = raw(
            &g,
            "dst-zeroes",
            &path("dst-zeroes", 0),
            json!({}),
            json!({"detect-zeroes": "on"}),
        )
        .await;
        let read_only = raw(
            &g,
            "dst-ro",
            &path("dst-ro", 0),
            json!({}),
            json!({"read-only": true}),
        )
        .await;
        let null = add(
            &g,
            json!({"driver": "null-co", "node-name": "null", "size": SIZE}),
        )
        .await;

        let refused = |from: &Arc<Node>, to: &Arc<Node>| {
            let (from, to) = (from.clone(), to.clone());
            async move { from.copy_range_to(0, MIB, &to, false).await }
        };
        assert!(!refused(&direct_source, &target).await.expect("no error"));
        assert!(!refused(&source, &detecting).await.expect("no error"));
        assert!(!refused(&source, &null).await.expect("no error"));
        assert!(!refused(&null, &target).await.expect("no error"));
        assert!(refused(&source, &read_only).await.is_err());
        let hook: Arc<dyn WriteHook> = Arc::new(Counting);
        target.add_write_hook(hook.clone());
        assert!(!refused(&source, &target).await.expect("no error"));
        target.remove_write_hook(&hook);
        // Nothing was written by the refused copies.
        for node in [&target, &detecting, &read_only] {
            let data = node.read(0, MIB as usize).await.expect("a read");
            assert!(data.is_zero(), "{} stays zero", node.name());
        }
        // Unhooked, the same copy goes through.
        assert!(refused(&source, &target).await.expect("no error"));
        let data = target.read(0, MIB as usize).await.expect("a read");
        assert_eq!(
            data.as_slice(),
            IoBuf::copy_from(&[0x33; MIB as usize], 1).as_slice()
        );
    });
}

#[test]
fn many_small_background_copies_into_new_qcow2_clusters_land_whole() {
    // A job's pattern: scattered 64 KiB clusters of the source copied at
    // once into new clusters of an image, which the file driver may write
    // together by direct I/O where they are contiguous in the image file.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("src");
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i / 65536 * 7 + i % 251) as u8).collect();
    std::fs::write(&path, &pattern).expect("the source");
    let src = path.display().to_string();
    let image = dir.path().join("t.qcow2").display().to_string();
    testkit::qemu_img_create_qcow2(&image, SIZE, "cluster_size=65536");
    let clusters: Vec<u64> = (0..SIZE / 65536).filter(|c| c % 3 != 1).collect();
    runtime().block_on(async {
        let g = Graph::new();
        let source = raw(&g, "src", &src, json!({}), json!({})).await;
        let target = add(
            &g,
            json!({"driver": "qcow2", "node-name": "t",
                   "file": {"driver": "file", "filename": image}}),
        )
        .await;
        for batch in clusters.chunks(16) {
            let copies = batch.iter().rev().map(|&c| {
                let (source, target) = (source.clone(), target.clone());
                block::class::background(async move {
                    source.copy_range_to(c * 65536, 65536, &target, false).await
                })
            });
            for copied in futures_util::future::join_all(copies).await {
                assert!(copied.expect("no error"), "copied inside the kernel");
            }
        }
        g.close_all().await.expect("the image closes");
    });
    testkit::run("qemu-img", &["check", "-q", "-f", "qcow2", &image]);
    let mut expected = vec![0u8; SIZE as usize];
    for &c in &clusters {
        let r = (c * 65536) as usize..((c + 1) * 65536) as usize;
        expected[r.clone()].copy_from_slice(&pattern[r]);
    }
    assert_qcow2_holds(&image, &expected, dir.path());
}

/// Whether the page cache holds any of `offset..offset + len` of `file`
/// (`mincore` over a mapping of it).
fn any_cached(file: &str, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).expect("the file opens");
    let page = rustix::param::page_size();
    let mut resident = vec![0u8; (len as usize).div_ceil(page)];
    // SAFETY: a shared read-only mapping of an open file, never
    // dereferenced: `mincore` only reads the page tables, and the mapping
    // is gone before the function returns.
    let rc = unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            offset as libc::off_t,
        );
        assert_ne!(map, libc::MAP_FAILED, "a mapping");
        let rc = libc::mincore(map, len as usize, resident.as_mut_ptr());
        libc::munmap(map, len as usize);
        rc
    };
    assert_eq!(rc, 0, "mincore");
    resident.iter().any(|&r| r & 1 == 1)
}

#[test]
fn a_large_background_copy_goes_by_direct_io_past_the_targets_page_cache() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let src = file(&dir.path().join("src"), 0x6b);
    let dst = file(&dir.path().join("dst"), 0);
    runtime().block_on(async {
        let g = Graph::new();
        let source = raw(&g, "src", &src, json!({}), json!({})).await;
        let target = window_with_bitmap(&g, &dst).await;
        // A guest's copy, and a job's small one: through the page cache.
        assert!(
            source
                .copy_range_to(0, 64 << 10, &target, false)
                .await
                .expect("no error")
        );
        let small =
            block::class::background(source.copy_range_to(128 << 10, 64 << 10, &target, false));
        assert!(small.await.expect("no error"));
        assert!(
            any_cached(&dst, MIB, 64 << 10),
            "a foreground copy fills the cache"
        );
        assert!(any_cached(&dst, MIB + (128 << 10), 64 << 10));
        // A job's copy of 1 MiB: by direct I/O, tracked like any write.
        let large = block::class::background(source.copy_range_to(MIB, MIB, &target, false));
        assert!(large.await.expect("no error"));
        assert!(
            !any_cached(&dst, 2 * MIB, MIB),
            "the target's cache stays empty"
        );
        let data = target.read(0, (2 * MIB) as usize).await.expect("a read");
        let bytes = data.as_slice();
        let at = |r: std::ops::Range<u64>| &bytes[r.start as usize..r.end as usize];
        assert!(at(0..64 << 10).iter().all(|&b| b == 0x6b));
        assert!(at(64 << 10..128 << 10).iter().all(|&b| b == 0));
        assert!(at(128 << 10..192 << 10).iter().all(|&b| b == 0x6b));
        assert!(at(192 << 10..MIB).iter().all(|&b| b == 0));
        assert!(at(MIB..2 * MIB).iter().all(|&b| b == 0x6b));
        let dirty = target.bitmaps().info();
        assert_eq!(
            dirty[0].count,
            MIB + (128 << 10),
            "the bitmap marks every copy"
        );
        // Not whole pages at the source: through the page cache.
        let odd = raw(&g, "odd", &src, json!({}), json!({"offset": 512})).await;
        let unaligned = block::class::background(odd.copy_range_to(0, MIB, &target, false));
        assert!(unaligned.await.expect("no error"));
        assert!(any_cached(&dst, MIB, MIB));
    });
}

#[test]
fn a_copy_into_an_o_direct_file_moves_the_source_pages_by_reference() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let src = file(&dir.path().join("src"), 0x27);
    let dst = file(&dir.path().join("dst"), 0);
    runtime().block_on(async {
        let g = Graph::new();
        let source = raw(&g, "src", &src, json!({}), json!({})).await;
        let direct = raw(
            &g,
            "dst",
            &dst,
            json!({"cache": {"direct": true}}),
            json!({}),
        )
        .await;
        direct
            .add_bitmap("b", Some(65536), false, false)
            .await
            .expect("a bitmap");
        // Any size in whole pages, foreground too.
        assert!(
            source
                .copy_range_to(4096, 8192, &direct, false)
                .await
                .expect("no error")
        );
        assert!(
            source
                .copy_range_to(MIB, 3 * MIB, &direct, false)
                .await
                .expect("no error")
        );
        let data = direct.read(0, SIZE as usize).await.expect("a read");
        let bytes = data.as_slice();
        assert!(bytes[..4096].iter().all(|&b| b == 0));
        assert!(bytes[4096..12288].iter().all(|&b| b == 0x27));
        assert!(bytes[12288..MIB as usize].iter().all(|&b| b == 0));
        assert!(bytes[MIB as usize..].iter().all(|&b| b == 0x27));
        assert!(!any_cached(&dst, 0, SIZE), "nothing went through the cache");
        assert_eq!(direct.bitmaps().info()[0].count, (64 << 10) + 3 * MIB);
    });
}

/// Data clusters of a qcow2 image (`qemu-img map`), as (guest offset,
/// length), adjacent runs merged (`map` lists runs apart whose clusters
/// are not contiguous in the file).
fn qcow2_data(image: &str) -> Vec<(u64, u64)> {
    let map = testkit::run("qemu-img", &["map", "--output=json", "-f", "qcow2", image]);
    let extents: Value = serde_json::from_str(&map).expect("qemu-img map prints JSON");
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in extents.as_array().expect("a list of extents") {
        if e["data"] != json!(true) {
            continue;
        }
        let n = |k: &str| e[k].as_u64().expect("a number");
        match data.last_mut() {
            Some(last) if last.0 + last.1 == n("start") => last.1 += n("length"),
            _ => data.push((n("start"), n("length"))),
        }
    }
    data
}

/// `qemu-img compare` finds the qcow2 `image` holding `expected` (written
/// to a raw file in `dir` for it).
fn assert_qcow2_holds(image: &str, expected: &[u8], dir: &std::path::Path) {
    let want = dir.join("expected.raw");
    std::fs::write(&want, expected).expect("the expected image");
    let want = want.display().to_string();
    testkit::run(
        "qemu-img",
        &["compare", "-q", "-f", "qcow2", "-F", "raw", image, &want],
    );
}

#[test]
fn a_copy_into_qcow2_fills_new_clusters_then_overwrites_them_in_place() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (a, b) = (
        file(&dir.path().join("a"), 0x5a),
        file(&dir.path().join("b"), 0x33),
    );
    let image = dir.path().join("t.qcow2").display().to_string();
    testkit::qemu_img_create_qcow2(&image, SIZE, "cluster_size=65536");
    runtime().block_on(async {
        let g = Graph::new();
        let a = raw(&g, "a", &a, json!({}), json!({})).await;
        let b = raw(&g, "b", &b, json!({}), json!({})).await;
        let target = add(
            &g,
            json!({"driver": "qcow2", "node-name": "t",
                   "file": {"driver": "file", "filename": image}}),
        )
        .await;
        target
            .add_bitmap("d", Some(65536), false, false)
            .await
            .expect("a bitmap");
        // New clusters: 1 MiB of them.
        assert!(
            a.copy_range_to(MIB, MIB, &target, false)
                .await
                .expect("no error")
        );
        // In place: one cluster inside that MiB, from the other file.
        assert!(
            b.copy_range_to(MIB + 65536, 65536, &target, false)
                .await
                .expect("no error")
        );
        assert_eq!(
            target.bitmaps().info()[0].count,
            MIB,
            "the bitmap marks the copies"
        );
        // Part of a cluster needs the rest of it from memory: refused,
        // nothing written (the bitmap may mark it: the caller writes it).
        assert!(
            !b.copy_range_to(3 * MIB + 4096, 65536, &target, false)
                .await
                .expect("no error")
        );
        let data = target.read(0, SIZE as usize).await.expect("a read");
        let at = |o: u64, n: u64| &data.as_slice()[o as usize..(o + n) as usize];
        assert!(at(0, MIB).iter().all(|&x| x == 0));
        assert!(at(MIB, 65536).iter().all(|&x| x == 0x5a));
        assert!(at(MIB + 65536, 65536).iter().all(|&x| x == 0x33));
        assert!(
            at(MIB + 2 * 65536, MIB - 2 * 65536)
                .iter()
                .all(|&x| x == 0x5a)
        );
        assert!(at(2 * MIB, 2 * MIB).iter().all(|&x| x == 0));
        g.close_all().await.expect("the image closes");
    });
    testkit::run("qemu-img", &["check", "-q", "-f", "qcow2", &image]);
    assert_eq!(
        qcow2_data(&image),
        vec![(MIB, MIB)],
        "only the copied MiB is allocated"
    );
    let mut expected = vec![0u8; SIZE as usize];
    expected[MIB as usize..(2 * MIB) as usize].fill(0x5a);
    expected[(MIB + 65536) as usize..(MIB + 2 * 65536) as usize].fill(0x33);
    assert_qcow2_holds(&image, &expected, dir.path());
}

/// A pipe of 1 MiB holding `data`: its read end.
fn pipe_with(data: &[u8]) -> Arc<std::os::fd::OwnedFd> {
    let flags = rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK;
    let (read, write) = rustix::pipe::pipe_with(flags).expect("a pipe");
    rustix::pipe::fcntl_setpipe_size(&write, MIB as usize).expect("a 1 MiB pipe");
    let mut at = 0;
    while at < data.len() {
        at += rustix::io::write(&write, &data[at..]).expect("the pipe takes the bytes");
    }
    Arc::new(read)
}

/// Bytes waiting in a pipe.
fn waiting(pipe: &std::os::fd::OwnedFd) -> u64 {
    rustix::io::ioctl_fionread(pipe).expect("FIONREAD on a pipe")
}

#[test]
fn a_piped_write_lands_with_the_nodes_tracking() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let dst = file(&dir.path().join("dst"), 0);
    runtime().block_on(async {
        let g = Graph::new();
        // A window of its file: the write is shifted with it.
        let target = window_with_bitmap(&g, &dst).await;
        let first: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        let second = vec![0x77u8; 64 * 1024];
        let mut data = block::Piped::new();
        data.push(pipe_with(&first), first.len());
        data.push(pipe_with(&second), second.len());
        assert_eq!(data.len(), 320 * 1024);
        assert!(target.accepts_piped(MIB / 2, data.len()));
        assert!(target.write_piped(MIB / 2, &data).await.expect("no error"));
        for (pipe, _) in data.parts() {
            assert_eq!(waiting(pipe), 0, "the pipes are drained");
        }
        let on_disk = std::fs::read(&dst).expect("the target file");
        let at = (MIB + MIB / 2) as usize;
        assert!(on_disk[..at].iter().all(|&b| b == 0), "before the write");
        assert_eq!(&on_disk[at..at + first.len()], &first[..]);
        let at = at + first.len();
        assert_eq!(&on_disk[at..at + second.len()], &second[..]);
        assert!(on_disk[at + second.len()..].iter().all(|&b| b == 0));
        let dirty = target.bitmaps().info();
        assert_eq!(dirty[0].count, 320 * 1024, "the bitmap marks the write");
        // Past the end: an error, nothing taken from the pipe.
        let mut past = block::Piped::new();
        past.push(pipe_with(&[1u8; 8192]), 8192);
        assert!(!target.accepts_piped(2 * MIB - 4096, 8192));
        assert!(target.write_piped(2 * MIB - 4096, &past).await.is_err());
        assert_eq!(waiting(&past.parts()[0].0), 8192);
    });
}

#[test]
fn a_piped_write_is_refused_where_the_data_must_pass_through_memory() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = |name: &str| file(&dir.path().join(name), 0);
    runtime().block_on(async {
        let g = Graph::new();
        let target = raw(&g, "dst", &path("dst"), json!({}), json!({})).await;
        let direct = raw(
            &g,
            "dst-direct",
            &path("dst-direct"),
            json!({"cache": {"direct": true}}),
            json!({}),
        )
        .await;
        let detecting = raw(
            &g,
            "dst-zeroes",
            &path("dst-zeroes"),
            json!({}),
            json!({"detect-zeroes": "on"}),
        )
        .await;
        let read_only = raw(
            &g,
            "dst-ro",
            &path("dst-ro"),
            json!({}),
            json!({"read-only": true}),
        )
        .await;
        let null = add(
            &g,
            json!({"driver": "null-co", "node-name": "null", "size": SIZE}),
        )
        .await;
        let bytes = vec![0x42u8; MIB as usize];
        let refused = |node: &Arc<Node>| {
            let node = node.clone();
            let mut data = block::Piped::new();
            data.push(pipe_with(&bytes), bytes.len());
            async move {
                assert!(!node.accepts_piped(0, MIB), "{}", node.name());
                let r = node.write_piped(0, &data).await;
                assert_eq!(
                    waiting(&data.parts()[0].0),
                    MIB,
                    "{} left the pipe",
                    node.name()
                );
                r
            }
        };
        for node in [&direct, &detecting, &null] {
            assert!(!refused(node).await.expect("no error"), "{}", node.name());
        }
        assert!(refused(&read_only).await.is_err());
        let hook: Arc<dyn WriteHook> = Arc::new(Counting);
        target.add_write_hook(hook.clone());
        assert!(!refused(&target).await.expect("no error"));
        target.remove_write_hook(&hook);
        for node in [&target, &detecting, &read_only] {
            let data = node.read(0, MIB as usize).await.expect("a read");
            assert!(data.is_zero(), "{} stays zero", node.name());
        }
    });
}

#[test]
fn a_piped_write_into_qcow2_fills_new_clusters_and_overwrites_old_ones_in_place() {
    const CLUSTER: u64 = 65536;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let image = dir.path().join("t.qcow2").display().to_string();
    testkit::qemu_img_create_qcow2(&image, SIZE, "cluster_size=65536");
    let mut expected = vec![0u8; SIZE as usize];
    let mut put = |at: u64, bytes: &[u8]| {
        expected[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    };
    runtime().block_on(async {
        let g = Graph::new();
        let target = add(
            &g,
            json!({"driver": "qcow2", "node-name": "t",
                   "file": {"driver": "file", "filename": image}}),
        )
        .await;
        target
            .add_bitmap("d", Some(CLUSTER), false, false)
            .await
            .expect("a bitmap");
        // One cluster allocated first: the piped writes around it run
        // new, in place, new.
        let old = vec![0x11u8; CLUSTER as usize];
        let (r, _) = target
            .write(MIB + CLUSTER, IoBuf::copy_from(&old, 1), false)
            .await;
        r.expect("a write");
        put(MIB + CLUSTER, &old);
        // Three clusters from one pipe, split across the three runs.
        let three: Vec<u8> = (0..3 * CLUSTER).map(|i| (i % 241) as u8 + 1).collect();
        let mut data = block::Piped::new();
        data.push(pipe_with(&three), three.len());
        assert!(target.accepts_piped(MIB, 3 * CLUSTER));
        assert!(target.write_piped(MIB, &data).await.expect("no error"));
        assert_eq!(waiting(&data.parts()[0].0), 0, "the pipe is drained");
        put(MIB, &three);
        // Four clusters from two pipes whose boundary is inside a cluster,
        // overwriting the end of the first write and going on into new
        // clusters.
        let (a, b) = (vec![0x61u8; 100 * 1024], vec![0x62u8; 156 * 1024]);
        let mut data = block::Piped::new();
        data.push(pipe_with(&a), a.len());
        data.push(pipe_with(&b), b.len());
        assert!(
            target
                .write_piped(MIB + 2 * CLUSTER, &data)
                .await
                .expect("no error")
        );
        put(MIB + 2 * CLUSTER, &a);
        put(MIB + 2 * CLUSTER + a.len() as u64, &b);
        assert_eq!(
            target.bitmaps().info()[0].count,
            6 * CLUSTER,
            "the bitmap marks the writes"
        );
        // Part of a cluster needs the rest of it from memory: refused,
        // nothing taken from the pipe.
        let mut part = block::Piped::new();
        part.push(pipe_with(&[0x77u8; 65536]), 65536);
        assert!(!target.accepts_piped(3 * MIB + 4096, 65536));
        assert!(
            !target
                .write_piped(3 * MIB + 4096, &part)
                .await
                .expect("no error")
        );
        assert_eq!(waiting(&part.parts()[0].0), 65536);
        g.close_all().await.expect("the image closes");
    });
    testkit::run("qemu-img", &["check", "-q", "-f", "qcow2", &image]);
    assert_eq!(
        qcow2_data(&image),
        vec![(MIB, 6 * CLUSTER)],
        "only the written clusters are allocated"
    );
    assert_qcow2_holds(&image, &expected, dir.path());
}
