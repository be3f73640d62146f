//! Write payloads from 64 KiB to 4 MiB go from the socket into pipes and
//! on into the file inside the kernel (`splice`), when the export's node
//! is a buffered host file that takes them; the rest, and any write a
//! hook must see, go through memory. Every byte must land where the
//! client wrote it, on unix and TCP sockets, with many writes in flight.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use block::{BoxFuture, IoBuf, Node, WriteHook, WriteKind, WriteRequest};
use common::{Fixture, tool};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Writes of every size around the limits, at aligned and odd places.
const WRITES: [(u64, u64); 9] = [
    (0, 4096),
    (4096 + 512, 64 * 1024 - 512),
    (MIB, 64 * 1024),
    (MIB + 64 * 1024 + 17, 300 * 1024 + 3),
    (2 * MIB, MIB),
    (4 * MIB - 512, 4 * MIB),
    (8 * MIB + 4096, 4 * MIB + 4096),
    (12 * MIB + 512 * 1024, 3 * MIB),
    (SIZE - 65536, 65536),
];

/// A writable export `disk` of an empty image of format `format` (raw or
/// qcow2); the node and the image's path.
fn disk(f: &Fixture, format: &str) -> (Arc<Node>, String) {
    let path = f.path(&format!("disk.{format}"));
    let size = SIZE.to_string();
    testkit::run("qemu-img", &["create", "-q", "-f", format, &path, &size]);
    let node = f.add_node(json!({"driver": format, "node-name": "disk",
        "file": {"driver": "file", "filename": path}}));
    f.export(&node, "disk", true, &[]);
    (node, path)
}

/// The guest-visible bytes of the image at `path`, as QEMU reads them.
fn contents(f: &Fixture, path: &str) -> Vec<u8> {
    let raw = f.path("contents.raw");
    testkit::run("qemu-img", &["convert", "-O", "raw", path, &raw]);
    std::fs::read(&raw).unwrap()
}

/// The bytes of write `n` of round `round`.
fn pattern(round: u64, n: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 509 + n * 31 + round * 7) % 251) as u8 + 1)
        .collect()
}

/// Issues [`WRITES`] at once through `client` (every one in flight
/// together), applies them to `model`, and checks the image.
fn write_all_at_once(f: &Fixture, client: &Arc<Node>, round: u64, model: &mut [u8], path: &str) {
    // Writes in flight together may land in any order, so the model holds
    // only if none overlaps another.
    for (i, &(a, alen)) in WRITES.iter().enumerate() {
        for &(b, blen) in &WRITES[i + 1..] {
            assert!(
                a + alen <= b || b + blen <= a,
                "WRITES overlap at {a} and {b}"
            );
        }
    }
    let writes = WRITES.iter().enumerate().map(|(n, &(offset, len))| {
        let client = client.clone();
        let data = pattern(round, n as u64, len);
        // Every other round asks for FUA on the large writes: those go
        // through memory.
        let fua = round % 2 == 1 && len >= 64 * 1024;
        async move {
            let (r, _) = client.write(offset, IoBuf::copy_from(&data, 1), fua).await;
            r.map(|()| (offset, data))
        }
    });
    let done = f.rt.block_on(futures_util::future::join_all(writes));
    for r in done {
        let (offset, data) = r.expect("the write succeeds");
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    // (A qcow2 image's metadata is on disk after a flush.)
    f.rt.block_on(client.flush()).expect("a flush");
    assert!(
        contents(f, path) == model,
        "round {round}: the image holds every write"
    );
}

#[test]
fn writes_of_every_size_land_in_the_file_over_unix_and_tcp() {
    let f = Fixture::new();
    let (_node, path) = disk(&f, "raw");
    let port = f.listen_tcp();
    let unix = f.unix_client("u", "disk");
    let tcp = f.tcp_client("t", "disk", port);
    let mut model = vec![0u8; SIZE as usize];
    for round in 0..4 {
        let client = if round < 2 { &unix } else { &tcp };
        write_all_at_once(&f, client, round, &mut model, &path);
    }
    // QEMU's client, with its own request sizes, and its own reading back.
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let out = tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 1M 2M",
            "-c",
            "write -P 0x3d 5M 256k",
            "-c",
            "read -P 0x3c 1M 2M",
            "-c",
            "read -P 0x3d 5M 256k",
            &uri,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    model[MIB as usize..3 * MIB as usize].fill(0x3c);
    model[5 * MIB as usize..5 * MIB as usize + 256 * 1024].fill(0x3d);
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk == model, "the file holds qemu-io's writes");
    let out = tool(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "raw", "-F", "raw", &path, &uri],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

/// A hook that records the bytes of every write it sees.
#[derive(Default)]
struct Seeing(AtomicU64);

impl WriteHook for Seeing {
    fn before<'a>(
        &'a self,
        _: &'a Node,
        req: WriteRequest<'a>,
    ) -> BoxFuture<'a, block::Result<()>> {
        if let WriteKind::Data(buf) = req.kind {
            assert_eq!(buf.len() as u64, req.len, "the hook sees the data");
            self.0.fetch_add(req.len, Ordering::Relaxed);
        }
        Box::pin(async { Ok(()) })
    }
    fn after<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// A write hook on the exported node (a backup's copy-before-write, say)
/// must see every write's data: with one in place, large payloads go
/// through memory, and the file still gets every byte; without it again,
/// the kernel path comes back.
#[test]
fn a_write_hook_on_the_export_sees_every_payload() {
    let f = Fixture::new();
    let (node, path) = disk(&f, "raw");
    let client = f.unix_client("u", "disk");
    let mut model = vec![0u8; SIZE as usize];
    let seeing = Arc::new(Seeing::default());
    let hook: Arc<dyn WriteHook> = seeing.clone();
    node.add_write_hook(hook.clone());
    write_all_at_once(&f, &client, 0, &mut model, &path);
    let written: u64 = WRITES.iter().map(|w| w.1).sum();
    assert_eq!(seeing.0.load(Ordering::Relaxed), written);
    node.remove_write_hook(&hook);
    write_all_at_once(&f, &client, 2, &mut model, &path);
    assert_eq!(seeing.0.load(Ordering::Relaxed), written, "unhooked");
}

/// A qcow2 export takes payloads of whole clusters from pipes (into new
/// clusters and over old ones), and partial clusters through memory; the
/// image QEMU reads holds every write and passes `qemu-img check`.
#[test]
fn writes_into_a_qcow2_export_land_whole_and_partial_clusters() {
    let f = Fixture::new();
    let (_node, path) = disk(&f, "qcow2");
    let client = f.unix_client("u", "disk");
    let mut model = vec![0u8; SIZE as usize];
    for round in 0..3 {
        write_all_at_once(&f, &client, round, &mut model, &path);
    }
    f.rt.block_on(f.graph.close_all()).unwrap();
    testkit::run("qemu-img", &["check", "-q", "-f", "qcow2", &path]);
    assert!(contents(&f, &path) == model, "after close");
}
