//! The same writes through qemu-io and through our file driver must give
//! images that `qemu-img compare` calls identical, with the same allocation
//! as `qemu-img map` sees it; and our block status must agree with
//! `qemu-img map` on our image.

use block::{BlockdevOptions, Graph, IoBuf, ZeroFlags};
use serde_json::{Value, json};
use testkit::{qemu_io_writes, require_tool, run};

const SIZE: u64 = 8 << 20;

/// `(offset, len, Some(pattern))` writes data, `None` writes zeroes.
fn ops() -> Vec<(u64, u64, Option<u8>)> {
    let mut ops = vec![
        (0, 4096, Some(0x11)),
        (65536, 1 << 20, Some(0x22)),
        (300_000, 7, Some(0x33)),
        (2 << 20, 1 << 20, None),
        ((2 << 20) + 4096, 8192, Some(0x44)),
        (SIZE - 512, 512, Some(0x55)),
    ];
    let mut x = 0x9e37_79b9u64;
    for i in 0..40u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = ((x >> 20) % (SIZE / 4096)) * 4096;
        let len = (1 + (x >> 50) % 16) * 4096;
        let len = len.min(SIZE - off);
        ops.push((off, len, (i % 5 != 0).then_some((i as u8) | 0x80)));
    }
    ops
}

fn data_ranges(map: &Value) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().unwrap() {
        if e["data"] == true {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match out.last_mut() {
                Some((ps, pl)) if *ps + *pl == s => *pl += l,
                _ => out.push((s, l)),
            }
        }
    }
    out
}

fn qemu_map(path: &str) -> Value {
    serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", path],
    ))
    .unwrap()
}

async fn check(aio: &str, direct: bool) {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs.raw");
    let ours = dir.path().join("ours.raw");
    let (theirs, ours) = (theirs.to_str().unwrap(), ours.to_str().unwrap());
    for p in [theirs, ours] {
        run(
            "qemu-img",
            &["create", "-q", "-f", "raw", p, &SIZE.to_string()],
        );
    }

    qemu_io_writes(theirs, "raw", &ops());

    let g = Graph::new();
    let v = json!({"driver": "file", "node-name": "f", "filename": ours, "aio": aio,
                   "cache": {"direct": direct}});
    let node = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    for (off, len, pattern) in ops() {
        match pattern {
            Some(p) => {
                let (r, _) = node
                    .write(off, IoBuf::from_vec(vec![p; len as usize]), false)
                    .await;
                r.unwrap();
            }
            None => node
                .write_zeroes(off, len, ZeroFlags::default())
                .await
                .unwrap(),
        }
    }
    node.flush().await.unwrap();

    run(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "raw", theirs, ours],
    );
    let their_map = qemu_map(theirs);
    let our_map = qemu_map(ours);
    assert_eq!(
        data_ranges(&their_map),
        data_ranges(&our_map),
        "allocation differs"
    );

    let extents = node.block_status(0, SIZE).await.unwrap();
    let ours_status: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.data)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(
        ours_status,
        data_ranges(&our_map),
        "block status differs from qemu-img map"
    );
}

#[tokio::test]
async fn same_image_as_qemu_threads() {
    check("threads", false).await;
}

#[tokio::test]
async fn same_image_as_qemu_io_uring_direct() {
    check("io_uring", true).await;
}
