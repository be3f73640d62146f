//! Images we create are clean for `qemu-img check`, look right to
//! `qemu-img info`, take writes from QEMU, and read back through our driver.

use block::{Graph, Qcow2Create, create_qcow2};
use serde_json::{Value, json};
mod common;
use common::open_qcow2;
use testkit::{qemu_io_writes, require_tool, run};

fn info(image: &str) -> Value {
    serde_json::from_str(&run("qemu-img", &["info", "--output=json", image])).unwrap()
}

#[tokio::test]
async fn created_images_are_clean_and_usable() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    for (cluster, size) in [
        (512u64, 10u64 << 30),
        (4096, 1 << 20),
        (65536, 1 << 30),
        (2 << 20, (64 << 20) + 512),
    ] {
        let image = dir.path().join(format!("c{cluster}.qcow2"));
        let image_str = image.to_str().unwrap();
        let opts = Qcow2Create {
            cluster_size: cluster,
            ..Qcow2Create::new(size)
        };
        create_qcow2(&image, &opts).unwrap();
        run("qemu-img", &["check", "-q", image_str]);
        let i = info(image_str);
        assert_eq!(i["virtual-size"].as_u64(), Some(size));
        assert_eq!(i["cluster-size"].as_u64(), Some(cluster));
        assert_eq!(i["format-specific"]["data"]["compat"], "1.1");

        // QEMU writes into it; the refcounts stay right.
        qemu_io_writes(
            image_str,
            "qcow2",
            &[(4096, 70000, Some(0x77)), (size - 512, 512, Some(0x78))],
        );
        run("qemu-img", &["check", "-q", image_str]);

        let g = Graph::new();
        let node = open_qcow2(&g, "c", image_str, json!({})).await.unwrap();
        assert!(node.read(0, 4096).await.unwrap().is_zero());
        assert!(
            node.read(4096, 70000)
                .await
                .unwrap()
                .as_slice()
                .iter()
                .all(|&b| b == 0x77)
        );
        assert!(
            node.read(size - 512, 512)
                .await
                .unwrap()
                .as_slice()
                .iter()
                .all(|&b| b == 0x78)
        );
    }
    // Names that do not fit are an error, not a panic.
    let long = Qcow2Create {
        cluster_size: 512,
        backing: Some(("b".repeat(600), "raw".into())),
        ..Qcow2Create::new(1 << 20)
    };
    assert!(create_qcow2(&dir.path().join("long.qcow2"), &long).is_err());
    // It never overwrites.
    let taken = dir.path().join("c4096.qcow2");
    assert!(create_qcow2(&taken, &Qcow2Create::new(1 << 20)).is_err());
    assert!(
        create_qcow2(
            &dir.path().join("bad.qcow2"),
            &Qcow2Create {
                cluster_size: 3000,
                ..Qcow2Create::new(1 << 20)
            }
        )
        .is_err()
    );
}

#[tokio::test]
async fn created_overlays_see_their_backing_file() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_str = base.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "raw", base_str, "4M"]);
    qemu_io_writes(base_str, "raw", &[(0, 4 << 20, Some(0x31))]);
    let top = dir.path().join("top.qcow2");
    let top_str = top.to_str().unwrap();
    let opts = Qcow2Create {
        backing: Some(("base.raw".into(), "raw".into())),
        ..Qcow2Create::new(4 << 20)
    };
    create_qcow2(&top, &opts).unwrap();
    run("qemu-img", &["check", "-q", top_str]);
    let i = info(top_str);
    assert_eq!(i["backing-filename"], "base.raw");
    assert_eq!(i["backing-filename-format"], "raw");
    qemu_io_writes(top_str, "qcow2", &[(1 << 20, 65536, Some(0x32))]);
    run("qemu-img", &["check", "-q", top_str]);

    let g = Graph::new();
    let node = open_qcow2(&g, "t", top_str, json!({})).await.unwrap();
    let all = node.read(0, 4 << 20).await.unwrap().into_vec();
    let raw = dir.path().join("conv.raw");
    run(
        "qemu-img",
        &["convert", "-O", "raw", top_str, raw.to_str().unwrap()],
    );
    assert!(all == std::fs::read(&raw).unwrap());
    assert_eq!(all[1 << 20], 0x32);
    assert_eq!(all[0], 0x31);
}
