//! Our server against the real clients: qemu-io, qemu-img, nbdinfo, nbdcopy,
//! judged by QEMU's tools and compared with qemu-nbd serving the same image.

mod common;

use common::{Fixture, Peer, tool};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn qemu_io(args: &[&str]) -> String {
    tool("qemu-io", "qemu-utils", args)
}

fn qemu_img(args: &[&str]) -> String {
    tool("qemu-img", "qemu-utils", args)
}

/// A raw file node of `size` bytes, filled with `qemu-img create`.
fn raw_node(f: &Fixture, name: &str, size: u64) -> (String, std::sync::Arc<block::Node>) {
    let path = f.path(&format!("{name}.raw"));
    qemu_img(&["create", "-q", "-f", "raw", &path, &size.to_string()]);
    let node = f.add_node(json!({"driver": "raw", "node-name": name,
        "file": {"driver": "file", "filename": path}}));
    (path, node)
}

#[test]
fn qemu_io_writes_and_verifies_patterns() {
    let f = Fixture::new();
    let (path, node) = raw_node(&f, "disk", 16 * MIB);
    f.export(&node, "disk", true, &[]);
    let uri = f.uri("disk");
    let out = qemu_io(&[
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -P 0xcd 1M 4k",
        "-c",
        "write -P 0x11 4095 3",
        "-c",
        "write -z 2M 64k",
        "-c",
        "write -f -P 0x22 8M 1M",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 0 4095",
        "-c",
        "read -P 0x11 4095 3",
        "-c",
        "read -P 0xcd 1M 4k",
        "-c",
        "read -P 0 2M 64k",
        "-c",
        "read -P 0x22 8M 1M",
        "-c",
        "aio_write -P 0x33 12M 64k",
        "-c",
        "aio_write -P 0x44 13M 64k",
        "-c",
        "aio_flush",
        "-c",
        "discard 12M 64k",
    ]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The file itself, read by QEMU without us, holds what was written.
    let direct = qemu_io(&[
        "-r",
        "-f",
        "raw",
        &path,
        "-c",
        "read -P 0xab 0 4095",
        "-c",
        "read -P 0x11 4095 3",
        "-c",
        "read -P 0xcd 1M 4k",
        "-c",
        "read -P 0 2M 64k",
        "-c",
        "read -P 0x22 8M 1M",
        "-c",
        "read -P 0x44 13M 64k",
    ]);
    assert!(!direct.contains("Pattern verification failed"), "{direct}");
    qemu_img(&["compare", "-f", "raw", "-F", "raw", &path, &uri]);
}

#[test]
fn reads_past_the_end_and_writes_to_read_only_exports_fail() {
    let f = Fixture::new();
    let (_, node) = raw_node(&f, "disk", MIB);
    f.export(&node, "disk", false, &[]);
    let uri = f.uri("disk");
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write 0 512"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("Permission denied") || text.contains("read-only"),
        "a write to a read-only export must fail: {text}"
    );
    let out = qemu_io(&["-r", "-f", "raw", &uri, "-c", "read -P 0 0 1M"]);
    assert!(!out.contains("failed"), "{out}");
}

/// `qemu-img convert` and `nbdcopy` out of an export equal the source;
/// `nbdcopy` into a writable export writes exactly the file copied.
#[test]
fn convert_and_nbdcopy_both_ways() {
    let f = Fixture::new();
    let src = f.path("src.qcow2");
    testkit::qemu_img_create_qcow2(&src, 32 * MIB, "cluster_size=65536");
    testkit::qemu_io_writes(
        &src,
        "qcow2",
        &[
            (0, 3 * MIB, Some(0x5a)),
            (5 * MIB, 64 * 1024, Some(0x01)),
            (7 * MIB, MIB, None),
            (31 * MIB, MIB, Some(0xee)),
        ],
    );
    let node = f.add_node(
        json!({"driver": "qcow2", "node-name": "src", "read-only": true,
        "file": {"driver": "file", "filename": src}}),
    );
    f.export(&node, "src", false, &[]);
    let uri = f.uri("src");
    let info = qemu_img(&["info", "--output=json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 32 * MIB);

    let converted = f.path("converted.raw");
    qemu_img(&["convert", "-O", "raw", &uri, &converted]);
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &src, &converted]);

    let copied = f.path("copied.raw");
    tool("nbdcopy", "libnbd-bin", &[&uri, &copied]);
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &src, &copied]);

    let (target, tnode) = raw_node(&f, "target", 32 * MIB);
    qemu_io(&["-f", "raw", &target, "-c", "write -P 0x77 0 32M"]);
    f.export(&tnode, "target", true, &[]);
    tool("nbdcopy", "libnbd-bin", &[&copied, &f.uri("target")]);
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &src,
        &f.uri("target"),
    ]);
    f.rt.block_on(tnode.flush()).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &src, &target]);
}

/// A qcow2 overlay over a qcow2 base, with bitmap `b` recording the writes
/// made to the overlay: data, zeroes and holes at two depths.
fn layered_image(f: &Fixture) -> String {
    let base = f.path("base.qcow2");
    let top = f.path("top.qcow2");
    testkit::qemu_img_create_qcow2(&base, 8 * MIB, "cluster_size=65536");
    testkit::qemu_io_writes(
        &base,
        "qcow2",
        &[(0, MIB, Some(0x10)), (4 * MIB, 256 * 1024, Some(0x20))],
    );
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top, "8M",
    ]);
    qemu_img(&["bitmap", "--add", &top, "b"]);
    testkit::qemu_io_writes(
        &top,
        "qcow2",
        &[
            (512 * 1024, 192 * 1024, Some(0x30)),
            (2 * MIB, 128 * 1024, None),
            (6 * MIB + 4096, 4096, Some(0x40)),
        ],
    );
    top
}

/// `nbdinfo --map` of every context, and `qemu-img map` of a dirty bitmap,
/// read the same from our export as from `qemu-nbd` serving the same image.
#[test]
fn block_status_matches_qemu_nbd() {
    let f = Fixture::new();
    let top = layered_image(&f);
    let node = f.add_node(
        json!({"driver": "qcow2", "node-name": "top", "read-only": true,
        "file": {"driver": "file", "filename": top}}),
    );
    f.export(&node, "top", false, &["b"]);
    let qsock = f.dir.path().join("qemu-nbd.sock");
    let qsock_s = qsock.to_str().unwrap().to_owned();
    let peer = Peer::start(
        "qemu-nbd",
        "qemu-utils",
        &[
            "-r", "-t", "-e", "4", "-k", &qsock_s, "-x", "top", "-f", "qcow2", "-A", "-B", "b",
            &top,
        ],
        qsock,
    );
    for map in [
        "--map",
        "--map=qemu:allocation-depth",
        "--map=qemu:dirty-bitmap:b",
    ] {
        let ours = tool("nbdinfo", "libnbd-bin", &[map, &f.uri("top")]);
        let theirs = tool("nbdinfo", "libnbd-bin", &[map, &peer.uri("top")]);
        assert_eq!(ours, theirs, "nbdinfo {map}");
        assert!(ours.lines().count() > 2, "{map} shows the layers: {ours}");
    }
    let opts = |sock: &str| {
        format!(
            "driver=nbd,server.type=unix,server.path={sock},export=top,x-dirty-bitmap=qemu:dirty-bitmap:b"
        )
    };
    let ours = qemu_img(&[
        "map",
        "--output=json",
        "--image-opts",
        &opts(f.sock.to_str().unwrap()),
    ]);
    let theirs = qemu_img(&["map", "--output=json", "--image-opts", &opts(&qsock_s)]);
    assert_eq!(ours, theirs);
    // The dirty extents show as `data: false`: exactly the overlay's writes.
    let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
    let dirty: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        dirty,
        vec![
            (512 * 1024, 192 * 1024),
            (2 * MIB, 128 * 1024),
            (6 * MIB, 64 * 1024)
        ]
    );
    let list = |uri: &str| {
        tool("nbdinfo", "libnbd-bin", &["--list", uri])
            .lines()
            .filter(|l| !l.contains("uri:"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(list(&f.uri("top")), list(&peer.uri("top")));
}

/// TCP listeners serve the same as unix ones, to QEMU and to our client.
#[test]
fn tcp_listener_serves_qemu_io_and_our_client() {
    let f = Fixture::new();
    let (_, node) = raw_node(&f, "disk", 4 * MIB);
    f.export(&node, "disk", true, &[]);
    let port = f.listen_tcp();
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let out = qemu_io(&[
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x3c 4k 8k",
        "-c",
        "read -P 0x3c 4k 8k",
    ]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    nbd::register(&f.graph);
    let remote = f.add_node(json!({"driver": "nbd", "node-name": "r", "export": "disk",
        "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}));
    let data = f.rt.block_on(remote.read(4096, 8192)).unwrap();
    assert_eq!(data.as_slice(), &[0x3cu8; 8192][..]);
}
