//! Large reads the page cache holds go from it to the socket inside the
//! kernel (`sendfile`); the rest are read into memory and sent from there.
//! Both must give the file's bytes, on unix and TCP sockets, with simple and
//! structured replies.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::{Fixture, evict};
use nbd::proto::Command;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// The byte at `i` of the test file.
fn byte(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

/// A writable raw export `disk` of `size` bytes of [`byte`], just written
/// (so in the page cache); returns the file's path.
fn disk(f: &Fixture, size: u64) -> String {
    let path = f.path("disk.raw");
    let data: Vec<u8> = (0..size).map(byte).collect();
    std::fs::write(&path, &data).unwrap();
    let node = f.add_node(json!({"driver": "raw", "node-name": "disk",
        "file": {"driver": "file", "filename": path}}));
    f.export(&node, "disk", true, &[]);
    path
}

/// `qemu-img compare` finds the raw file at `path` and the export at
/// `uri` identical.
fn assert_identical(path: &str, uri: &str) {
    let out = common::tool(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "raw", "-F", "raw", path, uri],
    );
    assert!(out.contains("Images are identical"), "{uri}: {out}");
}

/// Waits until `n` bytes of reply wait in the client's socket: the server
/// has sent all of them.
fn wait_queued(c: &Raw, n: usize) {
    let start = Instant::now();
    while rustix::io::ioctl_fionread(&c.s).unwrap() < n as u64 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the reply never arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the client receives tells the two paths apart: a reply sent from
/// the page cache holds references to the cached pages, so a write to the
/// file after the server sent the reply, before the client reads it, shows
/// in it; a reply copied through the server's memory keeps the bytes of
/// the moment it was read. A large cached read must take the first path,
/// a small one or one from the disk the second, with both reply kinds.
#[test]
fn large_cached_reads_go_from_the_page_cache_to_the_socket() {
    let f = Fixture::new();
    let path = disk(&f, 4 * MIB);
    let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for structured in [true, false] {
        // (length, whether the page cache holds it, sent from the cache)
        for (len, cached, by_kernel) in [
            (64 * 1024, true, true),
            (MIB, false, false),
            (4096, true, false),
        ] {
            let offset = MIB + 4096;
            if !cached {
                evict(&path);
            }
            let (mut c, _, _) = Raw::open_with(&f.sock, "disk", &[], structured);
            let head = if structured { 20 + 8 } else { 16 };
            c.request(Command::Read, 0, 1, offset, len as u32);
            // A MiB does not fit the socket: the server is still sending
            // when the file changes, and the test reads what it got.
            if len < MIB {
                wait_queued(&c, head + len as usize);
            } else {
                std::thread::sleep(Duration::from_millis(200));
            }
            writer
                .write_all_at(&vec![0xee; len as usize], offset)
                .unwrap();
            let (cookie, error, data) = c.reply();
            assert_eq!((cookie, error), (1, 0));
            let old: Vec<u8> = (offset..offset + len).map(byte).collect();
            let what = format!("{len} bytes, cached {cached}, structured {structured}");
            if by_kernel {
                assert!(
                    data.iter().all(|&b| b == 0xee),
                    "{what}: the reply is the page cache's pages"
                );
            } else if len < MIB {
                assert!(data == old, "{what}: the reply is a copy");
            } else {
                // Whatever the socket did not hold yet may be either.
                assert!(
                    data[..64 * 1024] == old[..64 * 1024],
                    "{what}: the reply is a copy"
                );
            }
            writer.write_all_at(&old, offset).unwrap();
        }
    }
}

/// Reads of every size around the threshold, at odd places, cached and
/// not, through our client on unix and TCP, and `qemu-img compare` of the
/// whole export against the file: every byte is the file's.
#[test]
fn cached_and_uncached_reads_give_the_files_bytes_over_unix_and_tcp() {
    let f = Fixture::new();
    let size = 8 * MIB;
    let path = disk(&f, size);
    let port = f.listen_tcp();
    let unix = f.unix_client("u", "disk");
    let tcp = f.tcp_client("t", "disk", port);
    let reads = [
        (0, 4096),
        (512, 64 * 1024 - 512),
        (4096, 64 * 1024),
        (MIB - 512, 64 * 1024 + 512),
        (MIB + 512, 3 * MIB),
        (0, size),
    ];
    for cached in [true, false] {
        for (client, uri) in [
            (
                &unix,
                format!("nbd+unix:///disk?socket={}", f.sock.display()),
            ),
            (&tcp, format!("nbd://127.0.0.1:{port}/disk")),
        ] {
            for (offset, len) in reads {
                if !cached {
                    evict(&path);
                }
                let data = f.rt.block_on(client.read(offset, len as usize)).unwrap();
                let want: Vec<u8> = (offset..offset + len).map(byte).collect();
                assert!(
                    data.as_slice() == want.as_slice(),
                    "{uri}: {len} bytes at {offset}, cached {cached}"
                );
            }
            if !cached {
                evict(&path);
            }
            assert_identical(&path, &uri);
        }
    }
}

/// A read with holes sends them as `OFFSET_HOLE` chunks and its data
/// extents as `OFFSET_DATA` chunks: the large cached ones from the page
/// cache (a write after the reply went out shows in them), the small one
/// through memory; our client and `qemu-img compare` over TCP read the
/// file's bytes.
#[test]
fn sparse_reads_send_cached_data_extents_from_the_page_cache() {
    let f = Fixture::new();
    let path = f.path("sparse.raw");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(4 * MIB).unwrap();
    let extents = [
        (MIB, 256 * 1024),
        (2 * MIB, 4096),
        (3 * MIB - 64 * 1024, 64 * 1024),
    ];
    for (offset, len) in extents {
        let data: Vec<u8> = (offset..offset + len).map(byte).collect();
        file.write_all_at(&data, offset).unwrap();
    }
    let node = f.add_node(json!({"driver": "raw", "node-name": "sparse",
        "file": {"driver": "file", "filename": path}}));
    f.export(&node, "sparse", true, &[]);
    let mut want = vec![0u8; 4 * MIB as usize];
    for (offset, len) in extents {
        for i in offset..offset + len {
            want[i as usize] = byte(i);
        }
    }

    let (mut c, _, _) = Raw::open(&f.sock, "sparse", &[]);
    c.request(Command::Read, 0, 1, 0, 4 * MIB as u32);
    let (_, error, data) = c.reply();
    assert_eq!(error, 0);
    assert!(data == want, "the whole read gives the file's bytes");
    assert_eq!(c.holes, 4, "the zeroes around the three data extents");

    // One hole and the cached 64 KiB extent.
    let (offset, len) = (3 * MIB - 128 * 1024, 128 * 1024u64);
    c.request(Command::Read, 0, 2, offset, len as u32);
    wait_queued(&c, (20 + 12) + (20 + 8 + 64 * 1024));
    file.write_all_at(&[0xee; 64 * 1024], 3 * MIB - 64 * 1024)
        .unwrap();
    let (_, error, data) = c.reply();
    assert_eq!(error, 0);
    assert!(data[..64 * 1024].iter().all(|&b| b == 0));
    assert!(
        data[64 * 1024..].iter().all(|&b| b == 0xee),
        "the data extent went from the page cache"
    );
    assert_eq!(c.holes, 5);
    let old: Vec<u8> = (3 * MIB - 64 * 1024..3 * MIB).map(byte).collect();
    file.write_all_at(&old, 3 * MIB - 64 * 1024).unwrap();

    let port = f.listen_tcp();
    let uri = format!("nbd://127.0.0.1:{port}/sparse");
    let tcp = f.tcp_client("t", "sparse", port);
    let got = f.rt.block_on(tcp.read(0, 4 * MIB as usize)).unwrap();
    assert!(got.as_slice() == want.as_slice(), "{uri}: our client");
    assert_identical(&path, &uri);
}

/// A client that stops reading in the middle of replies sent from the
/// page cache holds up no job: its reads count as in flight only while the
/// kernel reads, so waiting for the requests on the range (what a job does
/// before it copies) ends at once.
#[test]
fn a_client_that_stops_reading_holds_up_no_job() {
    let f = Fixture::new();
    let path = f.path("disk.raw");
    let data: Vec<u8> = (0..4 * MIB).map(byte).collect();
    std::fs::write(&path, &data).unwrap();
    let node = f.add_node(json!({"driver": "raw", "node-name": "disk",
        "file": {"driver": "file", "filename": path}}));
    f.export(&node, "disk", true, &[]);
    let (mut c, _, _) = Raw::open(&f.sock, "disk", &[]);
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Far more reply bytes than the socket holds; the client reads none.
    for i in 0..16u64 {
        c.request(Command::Read, 0, i, 0, 4 * MIB as u32);
    }
    std::thread::sleep(Duration::from_millis(300));
    let quiet = f.rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(2),
            node.wait_for_overlapping(0, 4 * MIB),
        )
        .await
    });
    assert!(quiet.is_ok(), "a stalled reply kept the range busy");
    // The stalled client still gets every byte once it reads.
    for _ in 0..16 {
        let (_, error, got) = c.reply();
        assert_eq!(error, 0);
        assert!(got == data);
    }
}
