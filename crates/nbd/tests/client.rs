//! Our client (`driver=nbd` nodes) against qemu-nbd, nbdkit and our own
//! server, judged by QEMU's tools.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{IoBuf, Node, ZeroFlags};
use common::{Fixture, Peer, evict, tool};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn nbd_node(f: &Fixture, name: &str, sock: &std::path::Path, export: &str) -> Arc<Node> {
    nbd::register(&f.graph);
    f.add_node(json!({"driver": "nbd", "node-name": name, "export": export,
        "server": {"type": "unix", "path": sock.to_str().unwrap()}}))
}

/// `qemu-nbd` serving raw image `img` as export `e`, for many clients.
fn qemu_nbd_raw(f: &Fixture, img: &str) -> Peer {
    let sock = f.dir.path().join("q.sock");
    Peer::start(
        "qemu-nbd",
        "qemu-utils",
        &[
            "-t",
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "e",
            "-f",
            "raw",
            img,
        ],
        sock.clone(),
    )
}

fn read(f: &Fixture, node: &Node, offset: u64, len: usize) -> Vec<u8> {
    f.rt.block_on(node.read(offset, len))
        .unwrap()
        .as_slice()
        .to_vec()
}

fn write(f: &Fixture, node: &Node, offset: u64, data: &[u8]) {
    let buf = IoBuf::from_vec(data.to_vec());
    f.rt.block_on(node.write(offset, buf, false)).0.unwrap();
}

#[test]
fn reads_and_writes_through_qemu_nbd() {
    let f = Fixture::new();
    let img = f.path("img.qcow2");
    testkit::qemu_img_create_qcow2(&img, 64 * MIB, "");
    testkit::qemu_io_writes(
        &img,
        "qcow2",
        &[(0, 2 * MIB, Some(0x61)), (40 * MIB, MIB, Some(0x62))],
    );
    let sock = f.dir.path().join("q.sock");
    let peer = Peer::start(
        "qemu-nbd",
        "qemu-utils",
        &[
            "-t",
            "-e",
            "4",
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "e",
            "-f",
            "qcow2",
            &img,
        ],
        sock.clone(),
    );
    let node = nbd_node(&f, "remote", &peer.sock, "e");
    assert_eq!(node.length(), 64 * MIB);
    // A read larger than the 32 MiB payload limit is split.
    let all = read(&f, &node, 0, 64 * MIB as usize);
    assert!(all[..2 * MIB as usize].iter().all(|&b| b == 0x61));
    assert!(
        all[40 * MIB as usize..41 * MIB as usize]
            .iter()
            .all(|&b| b == 0x62)
    );
    assert!(
        all[2 * MIB as usize..40 * MIB as usize]
            .iter()
            .all(|&b| b == 0)
    );
    // Block status comes from base:allocation.
    let x = f.rt.block_on(node.block_status(0, 64 * MIB)).unwrap();
    let data: Vec<(u64, u64)> = x
        .iter()
        .filter(|e| e.data)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(data, vec![(0, 2 * MIB), (40 * MIB, MIB)]);
    // Writes, zeroes, discards, flush: many at once.
    let rt = &f.rt;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let buf = IoBuf::from_vec(vec![i as u8 + 1; 65536]);
                node.write(8 * MIB + i * 65536, buf, i % 2 == 0).await.0
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        node.write_zeroes(0, MIB, ZeroFlags::default())
            .await
            .unwrap();
        node.discard(40 * MIB, MIB).await.unwrap();
        node.flush().await.unwrap();
    });
    f.rt.block_on(node.close()).unwrap();
    drop(peer);
    let out = tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-r",
            "-f",
            "qcow2",
            &img,
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0x61 1M 1M",
            "-c",
            "read -P 1 8M 64k",
            "-c",
            "read -P 32 10420224 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    tool("qemu-img", "qemu-utils", &["check", &img]);
}

/// Round `round` of a kernel copy from `src`: a fresh 48 MiB image served
/// by `qemu-nbd` and an nbd node on it; `src` evicted from the page cache
/// unless `cached`.
fn kernel_copy_target(
    f: &Fixture,
    round: u32,
    src: &str,
    cached: bool,
) -> (String, Peer, Arc<Node>) {
    let img = f.path(&format!("img{round}.raw"));
    testkit::run("qemu-img", &["create", "-f", "raw", &img, "48M"]);
    let peer = qemu_nbd_raw(f, &img);
    let node = nbd_node(f, &format!("remote{round}"), &peer.sock, "e");
    if !cached {
        evict(src);
    }
    (img, peer, node)
}

/// A copy from a buffered file into an NBD node goes from the file to
/// the socket inside the kernel (`sendfile`), split at the server's
/// payload limit: from the runtime's thread when the page cache holds the
/// range, from a blocking thread when the disk must be read; qemu-img
/// judges the result.
#[test]
fn file_data_is_sent_to_qemu_nbd_by_the_kernel() {
    let f = Fixture::new();
    let src = f.path("src.raw");
    let data: Vec<u8> = (0..40 * MIB).map(|i| (i / 4096 % 251) as u8 + 1).collect();
    std::fs::write(&src, &data).unwrap();
    let source = f.add_node(json!({"driver": "raw", "node-name": "src",
        "file": {"driver": "file", "filename": src}}));
    for (round, cached) in [(0, true), (1, false)] {
        let (img, peer, node) = kernel_copy_target(&f, round, &src, cached);
        // 40 MiB: more than one 32 MiB payload.
        let copied =
            f.rt.block_on(source.copy_range_to(0, 40 * MIB, &node, false));
        assert!(copied.unwrap(), "the copy went through the kernel");
        f.rt.block_on(node.close()).unwrap();
        drop(peer);
        let got = std::fs::read(&img).unwrap();
        assert!(
            got[..40 * MIB as usize] == data[..],
            "the target holds the source (cached: {cached})"
        );
        assert!(got[40 * MIB as usize..].iter().all(|&b| b == 0));
    }
}

#[test]
fn works_with_nbdkit_memory() {
    let f = Fixture::new();
    let sock = f.dir.path().join("k.sock");
    let peer = Peer::start(
        "nbdkit",
        "nbdkit",
        &[
            "--foreground",
            "--unix",
            sock.to_str().unwrap(),
            "memory",
            "16M",
        ],
        sock.clone(),
    );
    let node = nbd_node(&f, "mem", &peer.sock, "");
    assert_eq!(node.length(), 16 * MIB);
    let pattern: Vec<u8> = (0..3 * MIB).map(|i| (i % 253) as u8).collect();
    write(&f, &node, 4097, &pattern);
    assert_eq!(read(&f, &node, 4097, pattern.len()), pattern);
    f.rt.block_on(node.write_zeroes(
        4096,
        8192,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    ))
    .unwrap();
    assert_eq!(read(&f, &node, 4096, 8192), vec![0u8; 8192]);
    assert_eq!(
        read(&f, &node, 12288, 10),
        pattern[12288 - 4097..12288 - 4097 + 10]
    );
    f.rt.block_on(node.flush()).unwrap();
    // nbdkit's memory plugin reports its holes.
    let x = f.rt.block_on(node.block_status(8 * MIB, MIB)).unwrap();
    assert!(x.iter().all(|e| !e.data && e.zero), "{x:?}");
}

#[test]
fn pulls_a_dirty_bitmap_from_qemu_nbd() {
    let f = Fixture::new();
    let img = f.path("b.qcow2");
    testkit::qemu_img_create_qcow2(&img, 16 * MIB, "");
    tool("qemu-img", "qemu-utils", &["bitmap", "--add", &img, "b"]);
    testkit::qemu_io_writes(
        &img,
        "qcow2",
        &[(MIB, 4096, Some(1)), (5 * MIB, 200 * 1024, Some(2))],
    );
    let sock = f.dir.path().join("q.sock");
    let peer = Peer::start(
        "qemu-nbd",
        "qemu-utils",
        &[
            "-r",
            "-t",
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "e",
            "-B",
            "b",
            "-f",
            "qcow2",
            &img,
        ],
        sock.clone(),
    );
    let client =
        f.rt.block_on(nbd::Client::connect(&nbd::ClientOptions {
            server: block::SocketAddress::Unix {
                path: sock.to_str().unwrap().into(),
            },
            export: "e".into(),
            contexts: vec!["qemu:dirty-bitmap:b".into()],
            tls: None,
            tls_hostname: None,
        }))
        .unwrap();
    let id = client
        .context_id("qemu:dirty-bitmap:b")
        .expect("context selected");
    let replies =
        f.rt.block_on(client.block_status(0, 16 * MIB as u32, false))
            .unwrap();
    let (_, extents) = replies.iter().find(|(c, _)| *c == id).unwrap();
    let mut dirty = Vec::new();
    let mut pos = 0u64;
    for &(len, flags) in extents {
        if flags & 1 != 0 {
            dirty.push((pos, u64::from(len)));
        }
        pos += u64::from(len);
    }
    assert_eq!(pos, 16 * MIB);
    assert_eq!(dirty, vec![(MIB, 64 * 1024), (5 * MIB, 256 * 1024)]);
    drop(peer);
}

/// A kernel copy into a server that stops reading waits for room on the
/// socket; when the server then dies, the copy fails instead of hanging,
/// and the node reports the lost connection. Both ways: from the page
/// cache on the runtime's thread, and from the disk on a blocking thread.
#[test]
fn a_kernel_copy_into_a_stalled_server_fails_when_the_server_dies() {
    let f = Fixture::new();
    let src = f.path("src.raw");
    std::fs::write(&src, vec![9u8; 40 * MIB as usize]).unwrap();
    let source = f.add_node(json!({"driver": "raw", "node-name": "src",
        "file": {"driver": "file", "filename": src}}));
    for (round, cached) in [(0, true), (1, false)] {
        let (_, peer, node) = kernel_copy_target(&f, round, &src, cached);
        peer.signal("STOP");
        let stalled = Duration::from_secs(2);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(stalled);
            peer.signal("KILL");
            peer
        });
        let start = Instant::now();
        let copied = f.rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(30),
                source.copy_range_to(0, 40 * MIB, &node, false),
            )
            .await
        });
        let took = start.elapsed();
        drop(killer.join().unwrap());
        let e = copied
            .expect("the copy gives up when the server dies")
            .expect_err("a copy into a dead server fails");
        assert_eq!(e.errno(), 5, "cached: {cached}: {e}");
        assert!(
            took >= stalled,
            "the copy waited for the stalled server (cached: {cached}): {took:?}"
        );
        assert!(took < stalled + Duration::from_secs(10), "{took:?}");
        let e = f.rt.block_on(node.read(0, 4096)).unwrap_err();
        assert!(e.to_string().contains("NBD connection lost"), "{e}");
    }
}

/// How many sockets the process's epoll instances watch for room
/// (`EPOLLOUT` in `/proc/self/fdinfo`).
fn sockets_watched_for_room() -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_str() == Some("anon_inode:[eventpoll]"));
        if !is_epoll {
            continue;
        }
        let name = entry.file_name();
        let info = format!("/proc/self/fdinfo/{}", name.to_str().unwrap());
        let Ok(info) = std::fs::read_to_string(info) else {
            continue;
        };
        // "tfd: FD events: MASK data: …", one line per watched descriptor.
        for line in info.lines().filter(|l| l.starts_with("tfd:")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let mask = u32::from_str_radix(words[3], 16).unwrap();
            let socket = std::fs::read_link(format!("/proc/self/fd/{}", words[1]))
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            if socket && mask & 0x4 != 0 {
                n += 1;
            }
        }
    }
    n
}

/// The client asks the runtime about room in its socket only while a
/// write waits for it: registered for it all along, the client's runtime
/// was woken by every read the server made (`socket::QuietSocket`).
#[test]
fn the_client_watches_its_socket_for_room_only_while_a_write_waits() {
    let f = Fixture::new();
    let img = f.path("img.raw");
    std::fs::write(&img, vec![0u8; 32 * MIB as usize]).unwrap();
    let peer = qemu_nbd_raw(&f, &img);
    // The fixture's own server (listener) may be watched already.
    let before = sockets_watched_for_room();
    let node = nbd_node(&f, "n", &peer.sock, "e");
    write(&f, &node, 0, &[7u8; 4096]);
    assert_eq!(read(&f, &node, 0, 4096), vec![7u8; 4096]);
    assert_eq!(
        sockets_watched_for_room(),
        before,
        "a client between requests"
    );

    // 16 MiB into a stopped server: more than the socket holds.
    peer.signal("STOP");
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 251) as u8).collect();
    let writing = {
        let (node, buf) = (node.clone(), IoBuf::from_vec(data.clone()));
        f.rt.spawn(async move { node.write(MIB, buf, false).await.0 })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while sockets_watched_for_room() == before {
        assert!(
            Instant::now() < deadline,
            "the stalled write never waited for room"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    peer.signal("CONT");
    f.rt.block_on(writing).unwrap().unwrap();
    assert_eq!(
        sockets_watched_for_room(),
        before,
        "after the write went out"
    );
    assert!(
        read(&f, &node, MIB, 16 * MIB as usize) == data,
        "the data read back"
    );
    let file = std::fs::read(&img).unwrap();
    assert!(
        file[MIB as usize..17 * MIB as usize] == data[..],
        "the data in the image"
    );
}

#[test]
fn requests_fail_with_eio_when_the_server_goes_away() {
    let f = Fixture::new();
    let img = f.path("gone.raw");
    std::fs::write(&img, vec![7u8; 4 * MIB as usize]).unwrap();
    let peer = qemu_nbd_raw(&f, &img);
    let node = nbd_node(&f, "remote", &peer.sock, "e");
    assert_eq!(read(&f, &node, 0, 4096), vec![7u8; 4096]);
    drop(peer);
    let start = Instant::now();
    let e = f.rt.block_on(node.read(0, 4096)).unwrap_err();
    assert_eq!(e.errno(), 5, "{e}");
    assert!(e.to_string().contains("NBD connection lost"), "{e}");
    let e = f.rt.block_on(node.flush()).unwrap_err();
    assert_eq!(e.errno(), 5, "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn open_errors_are_clear() {
    let f = Fixture::new();
    nbd::register(&f.graph);
    let o = block::BlockdevOptions::from_json(&json!({"driver": "nbd", "node-name": "x",
        "server": {"type": "unix", "path": f.path("nothing.sock")}}))
    .unwrap();
    let e = f.rt.block_on(f.graph.add(&o)).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "Failed to connect to '{}': No such file or directory",
            f.path("nothing.sock")
        )
    );
    let (_, node) = {
        let path = f.path("d.raw");
        std::fs::write(&path, vec![0u8; MIB as usize]).unwrap();
        let n = f.add_node(json!({"driver": "raw", "node-name": "d", "file": {"driver": "file", "filename": path}}));
        (path, n)
    };
    f.export(&node, "d", false, &[]);
    let o = block::BlockdevOptions::from_json(&json!({"driver": "nbd", "node-name": "y",
        "export": "nope", "server": {"type": "unix", "path": f.sock.to_str().unwrap()}}))
    .unwrap();
    let e = f.rt.block_on(f.graph.add(&o)).unwrap_err().to_string();
    assert_eq!(
        e,
        "Requested export not available: server reported: export 'nope' not present"
    );
    // A read-only export opens read-only only when asked to.
    let o = block::BlockdevOptions::from_json(&json!({"driver": "nbd", "node-name": "z",
        "export": "d", "server": {"type": "unix", "path": f.sock.to_str().unwrap()}}))
    .unwrap();
    let e = f.rt.block_on(f.graph.add(&o)).unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
    let n = f.add_node(
        json!({"driver": "nbd", "node-name": "z", "export": "d", "read-only": true,
        "server": {"type": "unix", "path": f.sock.to_str().unwrap()}}),
    );
    assert!(n.is_read_only());
    // Unknown options are refused as QEMU refuses them.
    let e = block::BlockdevOptions::from_json(&json!({"driver": "nbd", "node-name": "w",
        "server": {"type": "vsock", "cid": "1"}}))
    .unwrap_err()
    .to_string();
    assert_eq!(e, "Parameter 'type' does not accept value 'vsock'");
}

/// Our client and our server, with a dirty bitmap read as block status
/// (QEMU's `x-dirty-bitmap`).
#[test]
fn our_client_reads_our_bitmap_export() {
    let f = Fixture::new();
    let path = f.path("s.raw");
    std::fs::write(&path, vec![0u8; 8 * MIB as usize]).unwrap();
    let src = f.add_node(json!({"driver": "raw", "node-name": "s",
        "file": {"driver": "file", "filename": path}}));
    src.bitmaps().add("b", Some(65536), false, false).unwrap();
    write(&f, &src, 3 * MIB + 5, &[1, 2, 3]);
    f.export(&src, "s", true, &["b"]);
    nbd::register(&f.graph);
    let remote = f.add_node(json!({"driver": "nbd", "node-name": "r", "export": "s",
        "x-dirty-bitmap": "qemu:dirty-bitmap:b",
        "server": {"type": "unix", "path": f.sock.to_str().unwrap()}}));
    let x = f.rt.block_on(remote.block_status(0, 8 * MIB)).unwrap();
    let dirty: Vec<(u64, u64)> = x
        .iter()
        .filter(|e| !e.data)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(dirty, vec![(3 * MIB, 65536)]);
    write(&f, &remote, 6 * MIB, &[9; 100]);
    let x = f.rt.block_on(remote.block_status(0, 8 * MIB)).unwrap();
    let dirty: Vec<(u64, u64)> = x
        .iter()
        .filter(|e| !e.data)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(dirty, vec![(3 * MIB, 65536), (6 * MIB, 65536)]);
    assert_eq!(read(&f, &src, 6 * MIB, 100), vec![9; 100]);
}
