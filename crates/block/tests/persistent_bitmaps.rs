//! Persistent bitmaps, both ways between QEMU and us: QEMU's load with
//! exactly QEMU's bits and states; ours (qcow2, and raw images through
//! their sidecar) are listed by `qemu-img info` with QEMU's flags and load
//! in qemu-storage-daemon with the same bits.

use block::Graph;
use serde_json::json;
mod common;
use common::open_qcow2;
use testkit::{StorageDaemon, qemu_img_create_qcow2, qemu_io_writes, require_tool, run};

#[tokio::test]
async fn bitmaps_stored_by_qemu_load_with_the_same_bits() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let image = image.to_str().unwrap();
    // Not a multiple of the granularities: the last granule is partial.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            image,
            "20000K",
        ],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "--granularity", "65536", image, "b64k"],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "--granularity", "512", image, "b512"],
    );
    run("qemu-img", &["bitmap", "--add", "--disable", image, "off"]);
    qemu_io_writes(
        image,
        "qcow2",
        &[
            (0, 4096, Some(1)),
            (5000000, 300000, Some(2)),
            (9000000, 65536, None),
            (20475904, 4096, Some(3)),
        ],
    );

    let g = Graph::new();
    let node = open_qcow2(&g, "q", image, json!({})).await.unwrap();
    let mut info = node.bitmaps().info();
    info.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = info.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["b512", "b64k", "off"]);
    for i in &info {
        assert!(i.persistent && !i.inconsistent, "{i:?}");
        assert_eq!(i.recording, i.name != "off", "{i:?}");
    }
    assert_eq!(info[2].count, 0, "a disabled bitmap recorded nothing");
    assert!(info[0].count > 0 && info[1].count > 0);

    // The same image in qemu-storage-daemon: the same bits and counts.
    let qsd = StorageDaemon::start(
        dir.path(),
        &[
            "--blockdev".into(),
            format!("driver=qcow2,node-name=q,read-only=on,file.driver=file,file.filename={image}"),
        ],
    );
    let mut qmp = qsd.qmp();
    for i in &info {
        let theirs = qmp.execute_ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "q", "name": i.name}),
        );
        assert_eq!(
            theirs["sha256"].as_str(),
            Some(node.bitmaps().sha256(&i.name).unwrap().as_str()),
            "bitmap {}",
            i.name
        );
    }
}

#[tokio::test]
async fn a_bitmap_left_in_use_by_a_crash_loads_inconsistent() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let image = image.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", image, "4M"]);
    run("qemu-img", &["bitmap", "--add", image, "b"]);
    // A writable open marks the bitmap in use; a kill leaves it so.
    let qsd = StorageDaemon::start(
        dir.path(),
        &[
            "--blockdev".into(),
            format!("driver=qcow2,node-name=q,file.driver=file,file.filename={image}"),
        ],
    );
    drop(qsd); // kill -9
    let info = run("qemu-img", &["info", "--force-share", image]);
    assert!(
        info.contains("in-use"),
        "QEMU did not leave the bitmap in use:\n{info}"
    );

    let g = Graph::new();
    let node = open_qcow2(&g, "q", image, json!({})).await.unwrap();
    let info = node.bitmaps().info();
    assert!(info[0].inconsistent && info[0].persistent, "{info:?}");
    assert_eq!(
        node.bitmaps().snapshot("b").unwrap_err().to_string(),
        "Bitmap 'b' is inconsistent and cannot be used"
    );
}

/// The bitmaps of `image` as `qemu-img info` lists them: name, granularity
/// and flags (sorted).
fn qemu_listed(image: &str) -> Vec<(String, u64, Vec<String>)> {
    let out = run(
        "qemu-img",
        &["info", "--force-share", "--output=json", image],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let list = &v["format-specific"]["data"]["bitmaps"];
    let mut listed: Vec<_> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let mut flags: Vec<String> = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect();
            flags.sort();
            (
                b["name"].as_str().unwrap().to_owned(),
                b["granularity"].as_u64().unwrap(),
                flags,
            )
        })
        .collect();
    listed.sort();
    listed
}

/// `qemu-img check` finds nothing: no corruption, no leak.
fn assert_check_clean(image: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", image])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// qemu-storage-daemon's sha256 of each of `names` in `image`.
fn qemu_sha256(dir: &std::path::Path, image: &str, names: &[&str]) -> Vec<String> {
    let qsd = StorageDaemon::start(
        dir,
        &[
            "--blockdev".into(),
            format!("driver=qcow2,node-name=q,read-only=on,file.driver=file,file.filename={image}"),
        ],
    );
    let mut qmp = qsd.qmp();
    names
        .iter()
        .map(|name| {
            let r = qmp.execute_ok(
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": "q", "name": name}),
            );
            r["sha256"].as_str().unwrap().to_owned()
        })
        .collect()
}

async fn write(node: &block::Node, writes: &[(u64, usize)]) {
    for &(off, len) in writes {
        let (r, _) = node
            .write(off, block::IoBuf::from_vec(vec![7; len]), false)
            .await;
        r.unwrap();
    }
}

/// Bitmaps made by us on a writable image are stored at close: `qemu-img
/// info` lists them with QEMU's flags, qemu-storage-daemon loads the same
/// bits, and the image is clean.
#[tokio::test]
async fn bitmaps_we_store_load_in_qemu_with_the_same_bits() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ours.qcow2");
    let image = image.to_str().unwrap();
    qemu_img_create_qcow2(image, 20_000 << 10, "cluster_size=4096");
    let g = Graph::new();
    let node = open_qcow2(&g, "q", image, json!({"read-only": false}))
        .await
        .unwrap();
    let b = node.bitmaps();
    b.add("b64k", Some(65536), true, false).unwrap();
    b.add("b512", Some(512), true, false).unwrap();
    b.add("off", None, true, true).unwrap();
    b.add("temporary", None, false, false).unwrap();
    write(
        &node,
        &[(0, 4096), (5_000_000, 300_000), (20_475_904, 4096)],
    )
    .await;
    let names = ["b512", "b64k", "off"];
    let ours: Vec<String> = names.iter().map(|n| b.sha256(n).unwrap()).collect();
    drop(node);
    g.remove("q").await.unwrap();

    assert_eq!(
        qemu_listed(image),
        [
            ("b512".to_owned(), 512, vec!["auto".to_owned()]),
            ("b64k".to_owned(), 65536, vec!["auto".to_owned()]),
            ("off".to_owned(), 4096, vec![]),
        ]
    );
    assert_check_clean(image);
    assert_eq!(qemu_sha256(dir.path(), image, &names), ours);
    // And we load them back the same.
    let node = open_qcow2(&g, "r", image, json!({})).await.unwrap();
    let again: Vec<String> = names
        .iter()
        .map(|n| node.bitmaps().sha256(n).unwrap())
        .collect();
    assert_eq!(again, ours);
}

/// QEMU's bitmaps on an image we open writable: marked in use while we
/// write (so a crash cannot leave them looking clean), recording our
/// writes, stored clean at close; one removed meanwhile leaves the image at
/// once, with its clusters, and one added appears at once.
#[tokio::test]
async fn qemu_bitmaps_record_our_writes_and_removed_ones_leave_the_image() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("theirs.qcow2");
    let image = image.to_str().unwrap();
    qemu_img_create_qcow2(image, 8 << 20, "");
    run("qemu-img", &["bitmap", "--add", image, "keep"]);
    run("qemu-img", &["bitmap", "--add", "-g", "512", image, "gone"]);
    qemu_io_writes(image, "qcow2", &[(1 << 20, 70_000, Some(1))]);
    let g = Graph::new();
    let node = open_qcow2(&g, "q", image, json!({"read-only": false}))
        .await
        .unwrap();
    let in_use = vec!["auto".to_owned(), "in-use".to_owned()];
    assert!(
        qemu_listed(image).iter().all(|b| b.2 == in_use),
        "{:?}",
        qemu_listed(image)
    );
    let before = node.bitmaps().info();
    assert!(
        before
            .iter()
            .all(|i| i.recording && i.count > 0 && !i.inconsistent),
        "{before:?}"
    );
    write(&node, &[(6 << 20, 4096)]).await;
    // Added and removed while open: the image follows at once.
    node.remove_bitmap("gone").await.unwrap();
    node.add_bitmap("new", Some(1 << 20), true, false)
        .await
        .unwrap();
    assert_eq!(
        qemu_listed(image),
        [
            ("keep".to_owned(), 65536, in_use.clone()),
            ("new".to_owned(), 1 << 20, in_use.clone()),
        ]
    );
    write(&node, &[(7 << 20, 4096)]).await;
    let ours = node.bitmaps().sha256("keep").unwrap();
    let new = node.bitmaps().sha256("new").unwrap();
    drop(node);
    g.close_all().await.unwrap();

    assert_eq!(
        qemu_listed(image),
        [
            ("keep".to_owned(), 65536, vec!["auto".to_owned()]),
            ("new".to_owned(), 1 << 20, vec!["auto".to_owned()]),
        ]
    );
    assert_check_clean(image);
    assert_eq!(
        qemu_sha256(dir.path(), image, &["keep", "new"]),
        [ours, new]
    );
}

/// Persistent bitmaps on a raw image live in `IMAGE.bitmaps.qcow2`, a
/// data-less qcow2 sidecar: QEMU lists and loads them there with the same
/// bits, and we load them back with the image. A raw window of a file (an
/// offset) has no sidecar and refuses them as QEMU refuses them on raw.
#[tokio::test]
async fn raw_image_bitmaps_live_in_a_sidecar_qemu_reads() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(20_000 << 10)
        .unwrap();
    let image = image.to_str().unwrap();
    let sidecar = format!("{image}.bitmaps.qcow2");
    let raw = |name: &str, extra: serde_json::Value| {
        let mut v = json!({"driver": "raw", "node-name": name,
                           "file": {"driver": "file", "filename": image}});
        if let (serde_json::Value::Object(v), serde_json::Value::Object(extra)) = (&mut v, extra) {
            v.extend(extra);
        }
        block::BlockdevOptions::from_json(&v).unwrap()
    };
    let g = Graph::new();
    let node = g.add(&raw("r", json!({}))).await.unwrap();
    node.add_bitmap("b", Some(65536), true, false)
        .await
        .unwrap();
    node.add_bitmap("off", None, true, true).await.unwrap();
    assert!(std::path::Path::new(&sidecar).exists());
    write(
        &node,
        &[(0, 4096), (5_000_000, 300_000), (20_475_904, 4096)],
    )
    .await;
    let names = ["b", "off"];
    let ours: Vec<String> = names
        .iter()
        .map(|n| node.bitmaps().sha256(n).unwrap())
        .collect();
    drop(node);
    g.close_all().await.unwrap();

    assert_eq!(
        qemu_listed(&sidecar),
        [
            ("b".to_owned(), 65536, vec!["auto".to_owned()]),
            ("off".to_owned(), 65536, vec![]),
        ]
    );
    assert_check_clean(&sidecar);
    assert_eq!(qemu_sha256(dir.path(), &sidecar, &names), ours);

    let node = g.add(&raw("again", json!({}))).await.unwrap();
    let again: Vec<String> = names
        .iter()
        .map(|n| node.bitmaps().sha256(n).unwrap())
        .collect();
    assert_eq!(again, ours);
    let info = node.bitmaps().info();
    assert!(
        info.iter().all(|i| i.persistent && !i.inconsistent),
        "{info:?}"
    );

    let window = g
        .add(&raw("w", json!({"offset": 512, "size": 1 << 20})))
        .await
        .unwrap();
    assert_eq!(
        window
            .add_bitmap("x", None, true, false)
            .await
            .unwrap_err()
            .to_string(),
        "Can't store persistent bitmaps to w: Operation not supported"
    );
}

/// A persistent bitmap too large for QEMU to store (512 MiB of bits) is
/// refused with qemu-storage-daemon's words; a coarser one is fine.
#[tokio::test]
async fn a_bitmap_too_large_to_store_is_refused_as_qemu_refuses_it() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.qcow2");
    let image = image.to_str().unwrap();
    qemu_img_create_qcow2(image, 4 << 40, "");
    let args = json!({"node": "q", "name": "b", "granularity": 512, "persistent": true});
    let theirs = {
        let qsd = StorageDaemon::start(
            dir.path(),
            &[
                "--blockdev".into(),
                format!("driver=qcow2,node-name=q,file.driver=file,file.filename={image}"),
            ],
        );
        qsd.qmp()
            .execute("block-dirty-bitmap-add", args)
            .unwrap_err()
            .desc
    };
    let g = Graph::new();
    let node = open_qcow2(&g, "q", image, json!({"read-only": false}))
        .await
        .unwrap();
    let ours = node
        .add_bitmap("b", Some(512), true, false)
        .await
        .unwrap_err();
    assert_eq!(ours.to_string(), theirs);
    node.add_bitmap("b", Some(65536), true, false)
        .await
        .unwrap();
}

/// Storing bitmaps rewrites the header cluster: the backing file name and
/// format, and extensions we do not know, survive it.
#[tokio::test]
async fn storing_bitmaps_keeps_the_backing_file_and_other_extensions() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (base, top) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img_create_qcow2(base, 4 << 20, "");
    qemu_io_writes(base, "qcow2", &[(0, 65536, Some(9))]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top,
        ],
    );
    // An extension nobody knows, after the end of the known ones.
    let mut bytes = std::fs::read(top).unwrap();
    let header_length = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let mut at = header_length.next_multiple_of(8);
    while u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) != 0 {
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at += 8 + len.next_multiple_of(8);
    }
    let backing_at = u64::from_be_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let backing_len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
    let name = bytes[backing_at..backing_at + backing_len].to_vec();
    let unknown = [
        0x12u8, 0x34, 0x56, 0x78, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0,
    ];
    bytes[at..at + 16].copy_from_slice(&unknown);
    bytes[at + 16..at + 24].fill(0);
    bytes[at + 24..at + 24 + name.len()].copy_from_slice(&name);
    bytes[8..16].copy_from_slice(&((at + 24) as u64).to_be_bytes());
    std::fs::write(top, &bytes).unwrap();
    assert_check_clean(top);

    let g = Graph::new();
    let node = open_qcow2(&g, "t", top, json!({"read-only": false}))
        .await
        .unwrap();
    node.add_bitmap("b", None, true, false).await.unwrap();
    write(&node, &[(1 << 20, 4096)]).await;
    drop(node);
    g.close_all().await.unwrap();

    let info = run("qemu-img", &["info", "--output=json", top]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["backing-filename"], "base.qcow2", "{info}");
    assert_eq!(v["backing-filename-format"], "qcow2", "{info}");
    assert_eq!(qemu_listed(top).len(), 1, "{info}");
    assert_check_clean(top);
    let after = std::fs::read(top).unwrap();
    assert!(
        after[..65536].windows(16).any(|w| w == unknown),
        "the unknown extension is gone"
    );
    // QEMU reads the guest data through the backing file as before.
    let raw = dir.path().join("want.raw");
    let mut want = vec![0u8; 4 << 20];
    want[..65536].fill(9);
    want[1 << 20..(1 << 20) + 4096].fill(7);
    std::fs::write(&raw, &want).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            top,
            raw.to_str().unwrap(),
        ],
    );
}

/// Offsets of the writes a node receives.
struct WriteLog(std::sync::Mutex<Vec<u64>>);

impl block::WriteHook for WriteLog {
    fn before<'a>(
        &'a self,
        _: &'a block::Node,
        req: block::WriteRequest<'a>,
    ) -> block::BoxFuture<'a, block::Result<()>> {
        self.0.lock().unwrap().push(req.offset);
        Box::pin(async { Ok(()) })
    }

    fn after<'a>(
        &'a self,
        _: &'a block::Node,
        _: block::WriteRequest<'a>,
    ) -> block::BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The image header's autoclear feature bits, as on disk.
fn autoclear(image: &str) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut bits = [0u8; 8];
    let file = std::fs::File::open(image).unwrap();
    file.read_exact_at(&mut bits, 88).unwrap();
    u64::from_be_bytes(bits)
}

/// A writable image with a persistent bitmap has its activity log (our
/// autoclear bit, 63, in the header) before any write: made when the
/// bitmap is added (`block-dirty-bitmap-add`) or when the image is opened
/// with one. The first write is then logged with one write of a log area;
/// it does not rewrite the header (with the flushes a new log takes)
/// while a guest waits for it. A clean close drops the log.
#[tokio::test]
async fn the_log_is_made_by_a_bitmap_add_or_an_open_not_by_a_write() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("log.qcow2");
    let image = image.to_str().unwrap();
    qemu_img_create_qcow2(image, 64 << 20, "");
    qemu_io_writes(image, "qcow2", &[(0, 64 << 20, Some(7))]);
    let g = Graph::new();
    for (round, at) in [(0, 5 << 20), (1, 9 << 20)] {
        let node = open_qcow2(&g, "q", image, json!({"read-only": false}))
            .await
            .unwrap();
        if round == 0 {
            assert_eq!(autoclear(image) >> 63, 0, "a log before any bitmap");
            node.add_bitmap("b", None, true, false).await.unwrap();
        }
        assert_eq!(autoclear(image) >> 63, 1, "round {round}: no log");
        let file = node.children()[0].1.node();
        let writes = std::sync::Arc::new(WriteLog(Default::default()));
        file.add_write_hook(writes.clone());
        write(&node, &[(at, 4096)]).await;
        let seen = writes.0.lock().unwrap().clone();
        assert!(
            !seen.contains(&0),
            "round {round}: header rewritten: {seen:?}"
        );
        // The data (in place: the image is allocated) and the log area.
        assert_eq!(seen.len(), 2, "round {round}: {seen:?}");
        let info = node.bitmaps().info();
        assert_eq!(
            (info[0].name.as_str(), info[0].count),
            ("b", 65536 * (round + 1))
        );
        drop((node, file));
        g.remove("q").await.unwrap();
        assert_check_clean(image);
        assert_eq!(autoclear(image) >> 63, 0, "the log outlived a clean close");
    }
}
