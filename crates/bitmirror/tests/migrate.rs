//! Bitmap migration: `block-dirty-bitmap-pull` copies a bitmap from any
//! NBD server that publishes it — `qemu-nbd -B`, qemu-storage-daemon's
//! export, another bitmirror — and the copy has the SHA-256 that
//! qemu-storage-daemon computes for the original.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::{path_str, serve};
use serde_json::{Value, json};
use testkit::{Qmp, StorageDaemon, qemu_img_create_qcow2, require_tool, run};

const MIB: u64 = 1 << 20;

/// Kills a peer process when the test ends, failed or not.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qemu-nbd -r -B bitmap` serving `image` on `sock`.
fn qemu_nbd_with_bitmap(image: &Path, sock: &Path, bitmap: &str) -> Peer {
    let child = Command::new(require_tool("qemu-nbd", "qemu-utils"))
        .args(["-r", "-f", "qcow2", "-t", "-B", bitmap, "-k"])
        .args([path_str(sock), path_str(image)])
        .spawn()
        .expect("qemu-nbd starts");
    let peer = Peer(child);
    for _ in 0..500 {
        if sock.exists() {
            return peer;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("qemu-nbd did not create {}", sock.display());
}

fn unix(sock: &Path) -> Value {
    json!({"type": "unix", "path": path_str(sock)})
}

fn sha256(qmp: &mut Qmp, node: &str, name: &str) -> String {
    let r = qmp.execute_ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": node, "name": name}),
    );
    r["sha256"].as_str().expect("a sha256").to_owned()
}

/// A 16 MiB qcow2 image with a persistent bitmap `b0` (64 KiB) that QEMU
/// itself filled, by writing through `qemu-io`.
fn image_with_qemu_bitmap(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("src.qcow2");
    qemu_img_create_qcow2(path_str(&image), 16 * MIB, "");
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "65536", path_str(&image), "b0"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 1M 64k",
            "-c",
            "write -P 2 5M 300k",
            "-c",
            "write -P 3 16380k 4k",
            "-c",
            "write -z 9M 1M",
            path_str(&image),
        ],
    );
    image
}

#[test]
fn bitmaps_pulled_from_qemu_nbd_qsd_and_bitmirror_are_identical() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let image = image_with_qemu_bitmap(dir);

    // qemu-storage-daemon: the reference SHA-256, and an export of b0.
    let qsd_dir = dir.join("qsd");
    std::fs::create_dir(&qsd_dir).expect("a directory");
    let qsd_sock = qsd_dir.join("nbd.sock");
    let mut qsd = StorageDaemon::start(
        &qsd_dir,
        &[
            "--blockdev".into(),
            format!(
                "driver=qcow2,node-name=s,read-only=on,file.driver=file,file.filename={}",
                image.display()
            ),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", qsd_sock.display()),
            "--export".into(),
            "type=nbd,id=e,node-name=s,name=disk,bitmaps.0=b0".into(),
        ],
    );
    let mut qq = qsd.qmp();
    let want = sha256(&mut qq, "s", "b0");

    // qemu-nbd -B b0 on a copy (qemu-nbd and qsd both lock the image).
    let copy = dir.join("copy.qcow2");
    std::fs::copy(&image, &copy).expect("a copy");
    let nbd_sock = dir.join("qemu-nbd.sock");
    let _qemu_nbd = qemu_nbd_with_bitmap(&copy, &nbd_sock, "b0");

    // Our daemon: a node of the same size to pull into, and an export of
    // its own with a bitmap, for the bitmirror-to-bitmirror case.
    let ours_dir = dir.join("ours");
    std::fs::create_dir(&ours_dir).expect("a directory");
    let ours_sock = ours_dir.join("nbd.sock");
    let mut ours = serve(
        &ours_dir,
        &[
            "--blockdev".into(),
            "driver=null-co,node-name=n,size=16777216".into(),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", ours_sock.display()),
        ],
    );
    let mut q = ours.qmp();
    let pull = |q: &mut Qmp, name: &str, sock: &Path, export: &str| {
        q.execute_ok(
            "block-dirty-bitmap-pull",
            json!({"node": "n", "name": name, "server": unix(sock), "export": export,
                   "bitmap": "b0", "granularity": 65536}),
        )
    };
    let from_nbd = pull(&mut q, "from-qemu-nbd", &nbd_sock, "");
    let from_qsd = pull(&mut q, "from-qsd", &qsd_sock, "disk");
    assert_eq!(sha256(&mut q, "n", "from-qemu-nbd"), want);
    assert_eq!(sha256(&mut q, "n", "from-qsd"), want);
    // 64k + 320k (300k rounded to clusters) + 64k + 1M (zeroes written
    // are writes too).
    let expected = (64 + 320 + 64 + 1024) * 1024;
    assert_eq!(from_nbd["count"], expected, "{from_nbd}");
    assert_eq!(from_qsd["count"], expected, "{from_qsd}");

    // bitmirror to bitmirror: publish the pulled copy, pull it again.
    q.execute_ok(
        "block-dirty-bitmap-disable",
        json!({"node": "n", "name": "from-qsd"}),
    );
    q.execute_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "pub", "node-name": "n", "name": "pub",
               "bitmaps": ["from-qsd"]}),
    );
    q.execute_ok(
        "block-dirty-bitmap-pull",
        json!({"node": "n", "name": "again", "server": unix(&ours_sock), "export": "pub",
               "bitmap": "from-qsd", "granularity": 65536, "persistent": false}),
    );
    assert_eq!(sha256(&mut q, "n", "again"), want);

    // Into an existing bitmap, the bits are ORed in.
    q.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "n", "name": "mixed", "granularity": 65536}),
    );
    q.execute_ok(
        "block-dirty-bitmap-merge",
        json!({"node": "n", "target": "mixed", "bitmaps": ["again"]}),
    );
    let r = pull(&mut q, "mixed", &nbd_sock, "");
    assert_eq!(r["count"], expected, "{r}");

    q.execute_ok("quit", json!({}));
    assert_eq!(ours.wait_exit(), Some(0));
    qq.execute_ok("quit", json!({}));
    assert_eq!(qsd.wait_exit(), Some(0));
}

#[test]
fn a_failed_pull_says_why_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let image = image_with_qemu_bitmap(dir);
    let nbd_sock = dir.join("qemu-nbd.sock");
    let _qemu_nbd = qemu_nbd_with_bitmap(&image, &nbd_sock, "b0");
    let mut ours = serve(
        dir,
        &[
            "--blockdev".into(),
            "driver=null-co,node-name=n,size=16777216".into(),
            "--blockdev".into(),
            "driver=null-co,node-name=small,size=1048576".into(),
        ],
    );
    let mut q = ours.qmp();
    q.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "n", "name": "kept", "granularity": 4096}),
    );
    let attempts = [
        (
            json!({"node": "n", "name": "x", "server": unix(&nbd_sock), "export": "",
                   "bitmap": "nosuch"}),
            "does not publish bitmap 'nosuch'",
        ),
        (
            json!({"node": "small", "name": "x", "server": unix(&nbd_sock), "export": "",
                   "bitmap": "b0"}),
            "they must be the same size",
        ),
        (
            json!({"node": "n", "name": "x", "server": unix(&dir.join("nobody.sock")),
                   "export": "", "bitmap": "b0"}),
            "Cannot pull bitmap 'b0'",
        ),
        (
            json!({"node": "n", "name": "kept", "server": unix(&nbd_sock), "export": "",
                   "bitmap": "b0", "granularity": 65536}),
            "has granularity 4096, not 65536",
        ),
        (
            json!({"node": "nosuch", "name": "x", "server": unix(&nbd_sock), "export": ""}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            json!({"node": "n", "name": "x", "server": {"type": "unix"}, "export": ""}),
            "Parameter 'server.path' is missing",
        ),
    ];
    for (args, words) in attempts {
        let e = q
            .execute("block-dirty-bitmap-pull", args.clone())
            .expect_err("the pull fails");
        assert!(e.desc.contains(words), "{args}: {e:?}");
    }
    // No bitmap was left behind, the existing one is untouched, and the
    // daemon goes on serving.
    let nodes = q.execute_ok("query-named-block-nodes", json!({}));
    let names: Vec<String> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .map(|b| b["name"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(names, ["kept"], "{nodes}");
    let r = q.execute_ok(
        "block-dirty-bitmap-pull",
        json!({"node": "n", "name": "kept", "server": unix(&nbd_sock), "export": "",
               "bitmap": "b0"}),
    );
    assert_eq!(r["count"], (64 + 320 + 64 + 1024) * 1024, "{r}");
    q.execute_ok("quit", json!({}));
    assert_eq!(ours.wait_exit(), Some(0));
}
