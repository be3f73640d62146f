//! qcow2 images made by `qemu-img` and `qemu-io` read exactly as
//! `qemu-img convert -O raw` reads them, and block status agrees with
//! `qemu-img map`, down backing chains.

use std::path::Path;

use block::{Graph, IoBuf, Node, ZeroFlags};
use serde_json::{Value, json};
use testkit::{qemu_io_writes, require_tool, run};

mod common;
use common::open_qcow2;

const SIZE: u64 = 8 << 20;

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

/// Asserts that `node` reads like `qemu-img convert -O raw` of `image`.
async fn assert_reads_like_qemu(node: &Node, image: &str, dir: &Path) {
    let raw = path(dir, "converted.raw");
    run("qemu-img", &["convert", "-O", "raw", image, &raw]);
    let want = std::fs::read(&raw).unwrap();
    assert_eq!(node.length(), want.len() as u64);
    let got = node.read(0, want.len()).await.unwrap().into_vec();
    assert!(
        got == want,
        "{image} reads differently from qemu-img convert"
    );
    // Unaligned reads across cluster boundaries too.
    let (off, len) = (want.len() / 3 + 77, 200_000.min(want.len() / 3));
    let part = node.read(off as u64, len).await.unwrap().into_vec();
    assert!(part == want[off..off + len], "partial read differs");
}

/// `(start, len, data, depth)` runs from `qemu-img map`, depth 1-based.
fn qemu_map(image: &str) -> Vec<(u64, u64, bool, u32)> {
    let out = run("qemu-img", &["map", "--output=json", image]);
    let map: Value = serde_json::from_str(&out).unwrap();
    let mut runs: Vec<(u64, u64, bool, u32)> = Vec::new();
    for e in map.as_array().unwrap() {
        let present = e["present"] == true;
        let depth = if present {
            e["depth"].as_u64().unwrap() as u32 + 1
        } else {
            0
        };
        let item = (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"] == true,
            depth,
        );
        merge(&mut runs, item);
    }
    runs
}

fn merge(runs: &mut Vec<(u64, u64, bool, u32)>, item: (u64, u64, bool, u32)) {
    match runs.last_mut() {
        Some(last) if last.0 + last.1 == item.0 && (last.2, last.3) == (item.2, item.3) => {
            last.1 += item.1
        }
        _ => runs.push(item),
    }
}

async fn our_map(node: &Node) -> Vec<(u64, u64, bool, u32)> {
    let mut runs = Vec::new();
    for e in node.block_status(0, node.length()).await.unwrap() {
        merge(&mut runs, (e.offset, e.len, e.data, e.depth));
    }
    runs
}

fn writes() -> Vec<(u64, u64, Option<u8>)> {
    vec![
        (0, 4096, Some(0x11)),
        (65536 + 512, 70_000, Some(0x22)),
        (1 << 20, 1 << 20, Some(0x33)),
        ((1 << 20) + 4096, 65536, None),
        (5 << 20, 3 << 19, None),
        (SIZE - 1024, 1024, Some(0x44)),
    ]
}

#[tokio::test]
async fn images_of_every_cluster_size_and_version_read_like_qemu() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    for compat in ["0.10", "1.1"] {
        for cluster in [512u64, 4096, 65536, 2 << 20] {
            let dir = tempfile::tempdir().unwrap();
            let image = path(dir.path(), "img.qcow2");
            let opts = format!("cluster_size={cluster},compat={compat}");
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    &image,
                    &SIZE.to_string(),
                ],
            );
            qemu_io_writes(&image, "qcow2", &writes());
            let g = Graph::new();
            // Both I/O engines underneath, and O_DIRECT for some.
            let aio = if compat == "1.1" {
                "io_uring"
            } else {
                "threads"
            };
            let file = json!({"driver": "file", "filename": image, "aio": aio,
                              "cache": {"direct": cluster >= 4096}});
            let node = open_qcow2(&g, "q", &image, json!({"file": file}))
                .await
                .unwrap();
            assert_eq!(node.limits().cluster_size, Some(cluster));
            assert_reads_like_qemu(&node, &image, dir.path()).await;
            assert_eq!(
                our_map(&node).await,
                qemu_map(&image),
                "compat {compat} cluster {cluster}"
            );
        }
    }
}

#[tokio::test]
async fn backing_chains_read_like_qemu_with_depth() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let base = path(dir.path(), "base.raw");
    let mid = path(dir.path(), "mid.qcow2");
    let top = path(dir.path(), "top.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &base, &SIZE.to_string()],
    );
    qemu_io_writes(&base, "raw", &[(0, 3 << 20, Some(0x01))]);
    // Relative backing names, as management tools write them.
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &mid,
        ],
    );
    qemu_io_writes(&mid, "qcow2", &[(1 << 20, 1 << 20, Some(0x02))]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &top,
        ],
    );
    qemu_io_writes(
        &top,
        "qcow2",
        &[(3 << 19, 1 << 20, Some(0x03)), (6 << 20, 65536, None)],
    );

    let g = Graph::new();
    let node = open_qcow2(&g, "top", &top, json!({})).await.unwrap();
    assert_reads_like_qemu(&node, &top, dir.path()).await;
    let ours = our_map(&node).await;
    assert_eq!(ours, qemu_map(&top));
    // Every layer shows through somewhere; the raw base covers the rest.
    let depths: std::collections::BTreeSet<u32> = ours.iter().map(|r| r.3).collect();
    assert_eq!(depths.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
    // The chain is three implicit nodes deep below `top`.
    assert_eq!(g.nodes().len(), 6);

    // "backing": null cuts the chain: unallocated clusters read as zeroes.
    let alone = open_qcow2(&g, "alone", &top, json!({"backing": null}))
        .await
        .unwrap();
    assert!(alone.read(0, 4096).await.unwrap().is_zero());
    assert_eq!(alone.read(3 << 19, 1).await.unwrap().as_slice(), [0x03]);

    // Deleting the tops takes their whole implicit chains with them.
    g.remove("alone").await.unwrap();
    g.remove("top").await.unwrap();
    assert!(g.nodes().is_empty(), "{:?}", g.nodes());
}

#[tokio::test]
async fn compressed_images_read_like_qemu() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let src = path(dir.path(), "src.raw");
    let comp = path(dir.path(), "comp.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &src, &SIZE.to_string()],
    );
    // Compressible and incompressible data.
    qemu_io_writes(&src, "raw", &[(0, 1 << 20, Some(0x5a))]);
    let noise: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut bytes = std::fs::read(&src).unwrap();
    bytes[(2 << 20)..(3 << 20)].copy_from_slice(&noise);
    std::fs::write(&src, &bytes).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            &src,
            &comp,
        ],
    );
    let g = Graph::new();
    let node = open_qcow2(&g, "c", &comp, json!({})).await.unwrap();
    assert_eq!(node.read(0, SIZE as usize).await.unwrap().into_vec(), bytes);
    // Small reads, several per compressed cluster (served from the one
    // inflated cluster kept), and across cluster edges.
    for off in (0..3 << 20).step_by(4096 + 1000) {
        let got = node.read(off as u64, 4096).await.unwrap().into_vec();
        assert!(got == bytes[off..off + 4096], "read at {off}");
    }
}

#[tokio::test]
async fn unsupported_and_bad_images_are_refused_by_name() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let ext = path(dir.path(), "ext.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            &ext,
            "1M",
        ],
    );
    let g = Graph::new();
    assert_eq!(
        open_qcow2(&g, "e", &ext, json!({}))
            .await
            .unwrap_err()
            .to_string(),
        "Image 'e' uses extended L2 entries, which bitmirror does not support"
    );
    // Readable, but not writable as they are.
    let snap = path(dir.path(), "snap.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &snap, "1M"]);
    run("qemu-img", &["snapshot", "-c", "s1", &snap]);
    let rw = json!({"read-only": false});
    assert_eq!(
        open_qcow2(&g, "s", &snap, rw.clone())
            .await
            .unwrap_err()
            .to_string(),
        "Image 's' uses internal snapshots (when writing), which bitmirror does not support"
    );
    open_qcow2(&g, "s", &snap, json!({})).await.unwrap();
    for (bit, words) in [
        (
            1u8,
            "is marked dirty (its lazy refcounts were not written back); repair it with 'qemu-img check -r all'",
        ),
        (
            2,
            "is marked corrupt; repair it with 'qemu-img check -r all'",
        ),
    ] {
        let flagged = path(dir.path(), &format!("flag{bit}.qcow2"));
        run("qemu-img", &["create", "-q", "-f", "qcow2", &flagged, "1M"]);
        let mut bytes = std::fs::read(&flagged).unwrap();
        bytes[79] |= bit;
        std::fs::write(&flagged, bytes).unwrap();
        let name = format!("f{bit}");
        assert_eq!(
            open_qcow2(&g, &name, &flagged, rw.clone())
                .await
                .unwrap_err()
                .to_string(),
            format!("Image '{name}' cannot be opened read-write: the image {words}")
        );
    }
    g.remove("s").await.unwrap();
    let garbage = path(dir.path(), "garbage.qcow2");
    std::fs::write(&garbage, vec![7u8; 4096]).unwrap();
    assert_eq!(
        open_qcow2(&g, "g", &garbage, json!({}))
            .await
            .unwrap_err()
            .to_string(),
        "Image 'g' is not a valid qcow2 image: no qcow2 magic"
    );
    // Nothing was left behind by the failed opens.
    assert!(g.nodes().is_empty(), "{:?}", g.nodes());
}

/// Damaged images: random bytes flipped in the metadata of real images
/// (header, L1, L2, refcounts, compressed data). Opening and reading them
/// ends in data or in an error, never in a panic or a hang.
#[tokio::test]
async fn damaged_images_fail_cleanly() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let src = path(dir.path(), "src.raw");
    let plain = path(dir.path(), "plain.qcow2");
    let comp = path(dir.path(), "comp.qcow2");
    run("qemu-img", &["create", "-q", "-f", "raw", &src, "1M"]);
    qemu_io_writes(
        &src,
        "raw",
        &[(0, 300_000, Some(0x61)), (600_000, 4096, Some(0x62))],
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &src,
            &plain,
        ],
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &src,
            &comp,
        ],
    );
    // Persistent bitmaps too: their directory and tables are parsed at open.
    run(
        "qemu-img",
        &["bitmap", "--add", "--granularity", "4096", &plain, "b"],
    );
    qemu_io_writes(&plain, "qcow2", &[(8192, 8192, Some(0x63))]);
    let mut x = 0x243f_6a88_85a3_08d3u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut opened, mut failed) = (0, 0);
    for round in 0..300 {
        let original = std::fs::read(if round % 2 == 0 { &plain } else { &comp }).unwrap();
        let mut bytes = original.clone();
        // Most metadata lives in the first clusters; bitmaps go at the end.
        let area = if round % 3 == 2 {
            bytes.len()
        } else {
            bytes.len().min(48 * 1024)
        };
        for _ in 0..1 + next() % 8 {
            let at = (next() as usize) % area;
            bytes[at] = next() as u8;
        }
        let damaged = path(dir.path(), "damaged.qcow2");
        std::fs::write(&damaged, &bytes).unwrap();
        let g = Graph::new();
        let read = async {
            let node = open_qcow2(&g, "d", &damaged, json!({})).await?;
            node.read(0, node.length().min(4 << 20) as usize).await
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
            Ok(Ok(_)) => opened += 1,
            Ok(Err(_)) => failed += 1,
            Err(_) => panic!("round {round}: reading a damaged image hung"),
        }
        // Writing one: errors are fine, panics, hangs and runaway files not.
        let g = Graph::new();
        let write = async {
            let node = open_qcow2(&g, "w", &damaged, json!({"read-only": false})).await?;
            let end = node.length().min(1 << 20);
            for i in 0..8u64 {
                let at = (next() % end.max(1)).min(end.saturating_sub(5000));
                let (r, _) = node
                    .write(at, IoBuf::from_vec(vec![i as u8; 5000]), false)
                    .await;
                r?;
            }
            node.write_zeroes(0, end / 2, ZeroFlags::default()).await?;
            node.flush().await
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), write).await {
            Ok(_) => {}
            Err(_) => panic!("round {round}: writing a damaged image hung"),
        }
        let _ = g.close_all().await;
        let grown = std::fs::metadata(&damaged).unwrap().len();
        assert!(
            grown < 64 << 20,
            "round {round}: the file grew to {grown} bytes"
        );
    }
    // Both outcomes happen: the damage is neither always fatal nor ignored.
    assert!(opened > 0 && failed > 0, "opened {opened}, failed {failed}");
}

#[tokio::test]
async fn a_missing_backing_file_is_a_clear_error_and_leaves_nothing() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let base = path(dir.path(), "base.raw");
    let top = path(dir.path(), "top.qcow2");
    run("qemu-img", &["create", "-q", "-f", "raw", &base, "1M"]);
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &top,
        ],
    );
    std::fs::remove_file(&base).unwrap();
    let g = Graph::new();
    let e = open_qcow2(&g, "top", &top, json!({})).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Could not open '{base}': No such file or directory")
    );
    assert!(g.nodes().is_empty(), "{:?}", g.nodes());
}

/// A qcow2 header is data a guest may have written: backing names that are
/// `json:` descriptions or protocols (which could open any host file or
/// reach any server) are refused with the reason; a plain relative name, as
/// QEMU resolves it, still opens.
#[tokio::test]
async fn backing_names_that_are_not_file_names_are_refused() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let secret = path(dir.path(), "secret.raw");
    std::fs::write(&secret, b"host file contents").unwrap();
    let hostile = [
        format!(r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{secret}"}}}}"#),
        format!("file:{secret}"),
        "nbd:unix:/run/somebody.sock".to_owned(),
        "rbd:pool/image".to_owned(),
        "ssh://host/image".to_owned(),
    ];
    for (i, name) in hostile.iter().enumerate() {
        let image = path(dir.path(), &format!("h{i}.qcow2"));
        testkit::qemu_img_create_overlay(&image, name, "raw", "1M");
        let g = Graph::new();
        let o = json!({"driver": "qcow2", "node-name": "n",
                       "file": {"driver": "file", "filename": image}});
        let e = g
            .add(&block::BlockdevOptions::from_json(&o).unwrap())
            .await
            .expect_err("a hostile backing name");
        let text = e.to_string();
        assert!(text.contains("refuses to open"), "{name}: {text}");
    }
    // With x-backing-protocols=on the operator vouches for the image: the
    // json: name opens (NBD and RBD names are tested in the daemon's
    // tests), an RBD name wants the rbd driver (this graph has none), and a
    // protocol we lack is named.
    let g = Graph::new();
    let node = open_qcow2(
        &g,
        "a",
        &path(dir.path(), "h0.qcow2"),
        json!({"x-backing-protocols": true}),
    )
    .await
    .unwrap();
    assert_eq!(
        node.read(0, 18).await.unwrap().into_vec(),
        b"host file contents"
    );
    for (node, image, expected) in [("r", "h3", "Driver 'rbd'"), ("s", "h4", "protocol 'ssh'")] {
        let image = path(dir.path(), &format!("{image}.qcow2"));
        let e = open_qcow2(&g, node, &image, json!({"x-backing-protocols": true}))
            .await
            .expect_err("a backing the graph cannot open");
        assert!(e.to_string().contains(expected), "{e}");
    }
    drop(node);
    let image = path(dir.path(), "plain.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "secret.raw",
            "-F",
            "raw",
            &image,
            "18",
        ],
    );
    let g = Graph::new();
    let node = open_qcow2(&g, "p", &image, json!({})).await.unwrap();
    let got = node.read(0, 18).await.unwrap().into_vec();
    assert_eq!(got, b"host file contents");
}
