//! Clients that break the protocol, stall or vanish: each gets the
//! protocol's error or a disconnect, and every other client keeps being
//! served. Also the export rules (removal, bitmaps, limits).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::Fixture;
use common::raw::Raw;
use nbd::proto::{self, Command, InfoRequest, MetaContextRequest, Request, cflag, errno, opt, rep};
use nbd::{ExportOptions, RemoveMode, ServerOptions};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// A writable 4 MiB raw export `disk` whose bytes are `i % 251`.
fn fixture_with_disk(options: ServerOptions) -> Fixture {
    let f = Fixture::with_options(options);
    let path = f.path("disk.raw");
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let node = f.add_node(json!({"driver": "raw", "node-name": "disk",
        "file": {"driver": "file", "filename": path}}));
    f.export(&node, "disk", true, &[]);
    f
}

/// A read of 4 KiB at `offset` succeeds with the expected bytes.
fn assert_serves(c: &mut Raw, offset: u64) {
    c.request(Command::Read, 0, 7, offset, 4096);
    let (cookie, error, data) = c.reply();
    assert_eq!((cookie, error), (7, 0));
    let want: Vec<u8> = (offset..offset + 4096).map(|i| (i % 251) as u8).collect();
    assert_eq!(data, want);
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let f = fixture_with_disk(ServerOptions::default());
    let (mut c, size, flags) = Raw::open(&f.sock, "disk", &[]);
    assert_eq!(size, 4 * MIB);
    assert_ne!(flags & proto::tflag::CAN_MULTI_CONN, 0);
    let cases: &[(Command, u16, u64, u32, u32)] = &[
        (Command::Read, 0, 4 * MIB - 10, 11, errno::EINVAL),
        (Command::Read, 0, u64::MAX - 1, 4096, errno::EINVAL),
        (Command::Read, 0, 0, 33 * MIB as u32, errno::EINVAL),
        (Command::Read, 1 << 9, 0, 512, errno::EINVAL),
        (Command::Read, cflag::PAYLOAD_LEN, 0, 512, errno::EINVAL),
        (Command::Trim, 0, 4 * MIB, 1, errno::EINVAL),
        (Command::WriteZeroes, 0, 4 * MIB - 1, 2, errno::ENOSPC),
        (Command::WriteZeroes, cflag::REQ_ONE, 0, 512, errno::EINVAL),
        (Command::BlockStatus, 0, 0, 512, errno::EINVAL),
        (Command::Unknown(99), 0, 0, 0, errno::EINVAL),
        (Command::Resize, 0, 0, 0, errno::EINVAL),
    ];
    for (i, &(cmd, fl, offset, len, want)) in cases.iter().enumerate() {
        c.request(cmd, fl, 100 + i as u64, offset, len);
        let (cookie, error, _) = c.reply();
        assert_eq!(
            (cookie, error),
            (100 + i as u64, want),
            "{cmd:?} {offset} {len}"
        );
        assert_serves(&mut c, 4096 * i as u64);
    }
    // A write past the end: the payload is consumed, ENOSPC answered.
    c.request(Command::Write, 0, 200, 4 * MIB - 512, 1024);
    c.send(&[0u8; 1024]);
    assert_eq!(c.reply().1, errno::ENOSPC);
    assert_serves(&mut c, 0);
    // A write larger than 32 MiB: refused, and the connection closes since
    // its payload was not read.
    c.request(Command::Write, 0, 201, 0, 33 * MIB as u32);
    assert_eq!(c.reply().1, errno::EINVAL);
    assert!(c.closed());

    let (mut c, _, _) = Raw::open(&f.sock, "disk", &[]);
    c.send(b"this is not a request header");
    assert!(c.closed(), "bad request magic closes the connection");
}

/// Writes sent in one go, as a pipelining client sends them: the small
/// ones are done straight from the server's read buffer. Each lands where
/// it says, and one among them that must be refused (past the end, an
/// unknown flag) gets its error with its payload skipped, as when it comes
/// alone; FUA and payloads larger than the read buffer take the usual
/// path beside them.
#[test]
fn writes_sent_together_land_and_refusals_among_them_get_their_errors() {
    let f = fixture_with_disk(ServerOptions::default());
    let (mut c, _, _) = Raw::open(&f.sock, "disk", &[]);
    // (cookie, flags, offset, length, byte, expected error)
    let writes: &[(u64, u16, u64, u32, u8, u32)] = &[
        (1, 0, 0, 4096, 0xa1, 0),
        (2, 0, 4 * MIB - 512, 1024, 0xa2, errno::ENOSPC),
        (3, 0, 8192, 4096, 0xa3, 0),
        (4, 1 << 9, 16384, 4096, 0xa4, errno::EINVAL),
        (5, cflag::FUA, 24576, 4096, 0xa5, 0),
        (6, 0, 32768, 512, 0xa6, 0),
        (7, 0, MIB, 96 * 1024, 0xa7, 0),
        (8, 0, 40960, 8192, 0xa8, 0),
    ];
    let mut all = Vec::new();
    for &(cookie, flags, offset, len, byte, _) in writes {
        let r = Request {
            flags,
            command: Command::Write,
            cookie,
            offset,
            len: u64::from(len),
        };
        all.extend_from_slice(&r.encode());
        all.extend(std::iter::repeat_n(byte, len as usize));
    }
    c.send(&all);
    let mut errors = std::collections::HashMap::new();
    for _ in writes {
        let (cookie, error, _) = c.reply();
        assert!(
            errors.insert(cookie, error).is_none(),
            "two replies to {cookie}"
        );
    }
    for &(cookie, _, offset, len, byte, want) in writes {
        assert_eq!(errors[&cookie], want, "write {cookie}");
        if want != 0 {
            continue;
        }
        c.request(Command::Read, 0, 100 + cookie, offset, len);
        let (_, error, data) = c.reply();
        assert_eq!(error, 0);
        assert!(data.iter().all(|&b| b == byte), "write {cookie} landed");
    }
    // The refused ones left the disk alone.
    assert_serves(&mut c, 16384);
    c.request(Command::Read, 0, 200, 4 * MIB - 4096, 4096);
    let (_, error, data) = c.reply();
    assert_eq!(error, 0);
    let want: Vec<u8> = (4 * MIB - 4096..4 * MIB).map(|i| (i % 251) as u8).collect();
    assert_eq!(data, want);
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let f = Fixture::new();
    let path = f.path("ro.raw");
    std::fs::write(&path, vec![0u8; MIB as usize]).unwrap();
    let node = f.add_node(json!({"driver": "raw", "node-name": "ro",
        "file": {"driver": "file", "filename": path}}));
    f.export(&node, "ro", false, &[]);
    let (mut c, _, flags) = Raw::open(&f.sock, "ro", &[]);
    assert_ne!(flags & proto::tflag::READ_ONLY, 0);
    c.request(Command::Write, 0, 1, 0, 512);
    c.send(&[1u8; 512]);
    assert_eq!(c.reply().1, errno::EPERM);
    c.request(Command::Trim, 0, 2, 0, 512);
    assert_eq!(c.reply().1, errno::EPERM);
    c.request(Command::WriteZeroes, 0, 3, 0, 512);
    assert_eq!(c.reply().1, errno::EPERM);
    c.request(Command::Read, 0, 4, 0, 512);
    assert_eq!(c.reply(), (4, 0, vec![0u8; 512]));
}

#[test]
fn bad_handshakes_get_errors_or_a_disconnect() {
    let f = fixture_with_disk(ServerOptions::default());
    // Unknown client flags.
    let mut c = Raw::connect(&f.sock);
    c.send(&0x80u32.to_be_bytes());
    assert!(c.closed());
    // Bad option magic.
    let mut c = Raw::connect(&f.sock);
    c.flags();
    c.send(&[0u8; 16]);
    assert!(c.closed());
    // Errors that keep the handshake going.
    let mut c = Raw::connect(&f.sock);
    c.flags();
    c.option(4242, b"whatever");
    assert_eq!(c.option_reply().0.reply, rep::ERR_UNSUP);
    c.option(opt::GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.option_reply().0.reply, rep::ERR_INVALID);
    let go = |name: &str| {
        InfoRequest {
            name: name.into(),
            requests: vec![],
        }
        .encode()
    };
    c.option(opt::GO, &go("nope"));
    let (h, msg) = c.option_reply();
    assert_eq!(h.reply, rep::ERR_UNKNOWN);
    assert_eq!(String::from_utf8_lossy(&msg), "export 'nope' not present");
    c.option(opt::LIST, b"x");
    assert_eq!(c.option_reply().0.reply, rep::ERR_INVALID);
    let meta = MetaContextRequest {
        export: "disk".into(),
        queries: vec![],
    };
    c.option(opt::SET_META_CONTEXT, &meta.encode());
    assert_eq!(
        c.option_reply().0.reply,
        rep::ERR_INVALID,
        "meta contexts need structured replies first"
    );
    c.option(opt::STARTTLS, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ERR_POLICY);
    // An option too large to read is skipped and refused.
    let big = vec![0u8; 2 * MIB as usize];
    c.option(opt::INFO, &big);
    assert_eq!(c.option_reply().0.reply, rep::ERR_TOO_BIG);
    // … and the same connection still works.
    c.option(opt::LIST, &[]);
    let (h, p) = c.option_reply();
    assert_eq!(h.reply, rep::SERVER);
    assert_eq!(&p[4..], b"disk");
    assert_eq!(c.option_reply().0.reply, rep::ACK);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ACK);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ERR_INVALID);
    c.option(opt::ABORT, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ACK);
    assert!(c.closed());
    // EXPORT_NAME of an unknown export can only be answered by closing.
    let mut c = Raw::connect(&f.sock);
    c.flags();
    c.option(opt::EXPORT_NAME, b"nope");
    assert!(c.closed());
    // EXPORT_NAME of a known one: size and flags, no zeroes.
    let mut c = Raw::connect(&f.sock);
    c.flags();
    c.option(opt::EXPORT_NAME, b"disk");
    let mut b = [0u8; 10];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 4 * MIB);
    c.request(Command::Read, 0, 9, 4096, 4096);
    assert_eq!(c.reply().1, 0);
}

#[test]
fn stalled_and_vanished_clients_do_not_stop_the_others() {
    let f = fixture_with_disk(ServerOptions::default());
    // Stalls in the handshake, in a request header, in a write payload.
    let mut quiet = Raw::connect(&f.sock);
    quiet.flags();
    let (mut half_header, _, _) = Raw::open(&f.sock, "disk", &[]);
    half_header.send(&[0x25, 0x60]);
    let (mut half_write, _, _) = Raw::open(&f.sock, "disk", &[]);
    half_write.request(Command::Write, 0, 1, 0, 65536);
    half_write.send(&[0u8; 1000]);
    // Vanish with requests in flight.
    for _ in 0..4 {
        let (mut gone, _, _) = Raw::open(&f.sock, "disk", &[]);
        for i in 0..8 {
            gone.request(Command::Read, 0, i, i * 65536, 65536);
        }
        drop(gone);
    }
    let (mut c, _, _) = Raw::open(&f.sock, "disk", &[]);
    for i in 0..16 {
        assert_serves(&mut c, i * 4096);
    }
    // Hard removal disconnects every one of them, stalled or not.
    f.rt.block_on(f.server.remove_export("disk", RemoveMode::Hard))
        .unwrap();
    assert!(half_header.closed());
    assert!(half_write.closed());
    assert!(c.closed());
}

#[test]
fn requests_run_concurrently_and_replies_come_as_they_complete() {
    let f = fixture_with_disk(ServerOptions::default());
    let (mut c, _, _) = Raw::open(&f.sock, "disk", &[]);
    // 32 pipelined requests of mixed kinds and sizes.
    for i in 0..32u64 {
        if i % 4 == 3 {
            c.request(Command::Write, cflag::FUA, i, 2 * MIB + i * 4096, 4096);
            c.send(&[i as u8; 4096]);
        } else {
            c.request(Command::Read, 0, i, i * 65536, 65536 >> (i % 3));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..32 {
        let (cookie, error, data) = c.reply();
        assert_eq!(error, 0);
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
        if cookie % 4 != 3 {
            let off = cookie * 65536;
            let want: Vec<u8> = (off..off + (65536 >> (cookie % 3)))
                .map(|i| (i % 251) as u8)
                .collect();
            assert_eq!(data, want, "read {cookie}");
        }
    }
    for i in (3..32u64).step_by(4) {
        c.request(Command::Read, 0, 1000 + i, 2 * MIB + i * 4096, 4096);
        assert_eq!(c.reply(), (1000 + i, 0, vec![i as u8; 4096]));
    }
}

#[test]
fn the_handshake_times_out() {
    let f = fixture_with_disk(ServerOptions {
        max_connections: 0,
        handshake_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    });
    let start = Instant::now();
    let mut c = Raw::connect(&f.sock);
    c.flags();
    assert!(c.closed());
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A client that finishes in time stays.
    let (mut ok, _, _) = Raw::open(&f.sock, "disk", &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert_serves(&mut ok, 0);
}

#[test]
fn max_connections_holds_further_clients_back() {
    let f = fixture_with_disk(ServerOptions {
        max_connections: 1,
        ..ServerOptions::default()
    });
    let (mut first, _, _) = Raw::open(&f.sock, "disk", &[]);
    let second = UnixStream::connect(&f.sock).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 8];
    assert!((&second).read_exact(&mut b).is_err(), "no greeting yet");
    first.request(Command::Disc, 0, 0, 0, 0);
    assert!(first.closed());
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (&second).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"NBDMAGIC");
}

#[test]
fn export_rules_follow_qemu() {
    let f = Fixture::new();
    let img = f.path("a.qcow2");
    testkit::qemu_img_create_qcow2(&img, 4 * MIB, "");
    let node = f.add_node(json!({"driver": "qcow2", "node-name": "n",
        "file": {"driver": "file", "filename": img}}));
    let bitmaps = node.bitmaps();
    bitmaps.add("on", None, false, false).unwrap();
    bitmaps.add("off", None, false, true).unwrap();
    let opts = |id: &str, writable: bool, b: &[&str]| ExportOptions {
        id: id.into(),
        name: id.into(),
        description: Some("a disk".into()),
        writable,
        bitmaps: b.iter().map(|s| s.to_string()).collect(),
        allocation_depth: false,
    };
    let err = |o| f.server.add_export(&node, o).unwrap_err().to_string();
    assert_eq!(
        err(opts("e", false, &["on"])),
        "Enabled bitmap 'on' incompatible with readonly export"
    );
    assert_eq!(
        err(opts("e", false, &["nope"])),
        "Bitmap 'nope' is not found"
    );
    f.server
        .add_export(&node, opts("e", false, &["off"]))
        .unwrap();
    assert_eq!(
        err(opts("e", true, &[])),
        "Block export id 'e' is already in use"
    );
    let mut dup = opts("e2", true, &[]);
    dup.name = "e".into();
    assert_eq!(err(dup), "NBD server already has export named 'e'");
    assert_eq!(
        err(opts("e3", false, &["off"])),
        "Bitmap 'off' is currently in use by another operation and cannot be used"
    );
    assert_eq!(
        bitmaps.remove("off").unwrap_err().to_string(),
        "Bitmap 'off' is currently in use by another operation and cannot be used"
    );
    f.server
        .add_export(&node, opts("w", true, &["on"]))
        .unwrap();

    // Safe removal is refused while a client is connected; hard removal
    // disconnects it and frees the bitmap.
    let (mut c, _, _) = Raw::open(&f.sock, "e", &["qemu:dirty-bitmap:off"]);
    let e = f.rt.block_on(f.server.remove_export("e", RemoveMode::Safe));
    assert_eq!(e.unwrap_err().to_string(), "export 'e' still in use");
    assert_eq!(
        f.rt.block_on(f.server.remove_export("x", RemoveMode::Safe))
            .unwrap_err()
            .to_string(),
        "Export 'x' is not found"
    );
    c.request(Command::BlockStatus, 0, 5, 0, 4096);
    assert_eq!(c.reply().1, 0);
    f.rt.block_on(f.server.remove_export("e", RemoveMode::Hard))
        .unwrap();
    assert!(c.closed());
    bitmaps.remove("off").unwrap();
    // The removed export is gone from LIST and GO.
    let mut l = Raw::connect(&f.sock);
    l.flags();
    l.option(opt::LIST, &[]);
    let (h, p) = l.option_reply();
    assert_eq!(h.reply, rep::SERVER);
    assert_eq!(&p[4..5], b"w");
    assert_eq!(&p[5..], b"a disk");
    assert_eq!(l.option_reply().0.reply, rep::ACK);
    // With no client, safe removal works at once.
    f.rt.block_on(f.server.remove_export("w", RemoveMode::Safe))
        .unwrap();
    assert!(f.server.exports().is_empty());
}

/// The multi-conn guarantee: a write completed on one connection is read
/// by every other, and a flush on any connection covers it.
#[test]
fn multi_conn_connections_see_one_export() {
    let f = fixture_with_disk(ServerOptions::default());
    let (mut a, _, flags) = Raw::open(&f.sock, "disk", &[]);
    assert_ne!(flags & proto::tflag::CAN_MULTI_CONN, 0);
    let (mut b, _, _) = Raw::open(&f.sock, "disk", &[]);
    a.request(Command::Write, 0, 1, 65536, 4096);
    a.send(&[0xeeu8; 4096]);
    assert_eq!(a.reply().1, 0);
    b.request(Command::Flush, 0, 2, 0, 0);
    assert_eq!(b.reply().1, 0);
    b.request(Command::Read, 0, 3, 65536, 4096);
    assert_eq!(b.reply(), (3, 0, vec![0xeeu8; 4096]));
    // The write reached the file itself, read behind the server's back.
    // (That the flush made it durable cannot be seen without a crash.)
    let on_disk = std::fs::read(f.path("disk.raw")).unwrap();
    assert_eq!(&on_disk[65536..65536 + 4096], &[0xeeu8; 4096][..]);
}

/// Large reads of sparse ranges send the holes as `OFFSET_HOLE` chunks (and
/// read back right); small reads and reads with DF come as data.
#[test]
fn sparse_reads_send_holes() {
    let f = Fixture::new();
    let path = f.path("sparse.raw");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(4 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[0x42u8; 65536], MIB).unwrap();
    let node = f.add_node(json!({"driver": "raw", "node-name": "sparse",
        "file": {"driver": "file", "filename": path}}));
    f.export(&node, "sparse", false, &[]);
    let (mut c, _, _) = Raw::open(&f.sock, "sparse", &[]);
    c.request(Command::Read, 0, 1, 0, 2 * MIB as u32);
    let (_, error, data) = c.reply();
    assert_eq!(error, 0);
    let mut want = vec![0u8; 2 * MIB as usize];
    want[MIB as usize..MIB as usize + 65536].fill(0x42);
    assert!(data == want);
    assert_eq!(c.holes, 2, "the zeroes before and after the data");
    c.request(Command::Read, cflag::DF, 2, 0, 2 * MIB as u32);
    assert!(c.reply().2 == want);
    c.request(Command::Read, 0, 3, 0, 4096);
    assert_eq!(c.reply().2, vec![0u8; 4096]);
    assert_eq!(c.holes, 2, "no holes with DF or for small reads");
}

/// Reads one extended reply chunk: (flags, type, cookie, offset, payload).
fn extended_chunk(c: &mut Raw) -> (u16, u16, u64, u64, Vec<u8>) {
    let mut h = [0u8; 32];
    c.s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &proto::EXTENDED_REPLY_MAGIC.to_be_bytes());
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
    let len = u64::from_be_bytes(h[24..32].try_into().unwrap());
    let mut p = vec![0u8; len as usize];
    c.s.read_exact(&mut p).unwrap();
    (flags, kind, cookie, offset, p)
}

fn extended_request(c: &mut Raw, command: Command, flags: u16, cookie: u64, offset: u64, len: u64) {
    let r = Request {
        flags,
        command,
        cookie,
        offset,
        len,
    };
    c.send(&r.encode_extended());
}

/// Extended headers: 32-byte requests and replies, PAYLOAD_LEN on writes,
/// no simple replies, 64-bit block status, and the request's offset echoed.
#[test]
fn extended_headers_work_end_to_end() {
    let f = fixture_with_disk(ServerOptions::default());
    let mut c = Raw::connect(&f.sock);
    c.flags();
    c.option(opt::EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ACK);
    c.option(opt::EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ERR_INVALID);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ERR_EXT_HEADER_REQD);
    let meta = MetaContextRequest {
        export: "disk".into(),
        queries: vec!["base:allocation".into()],
    };
    c.option(opt::SET_META_CONTEXT, &meta.encode());
    assert_eq!(c.option_reply().0.reply, rep::META_CONTEXT);
    assert_eq!(c.option_reply().0.reply, rep::ACK);
    let go = InfoRequest {
        name: "disk".into(),
        requests: vec![],
    };
    c.option(opt::GO, &go.encode());
    while c.option_reply().0.reply != rep::ACK {}

    // A write announces its payload.
    extended_request(&mut c, Command::Write, cflag::PAYLOAD_LEN, 1, 8192, 4096);
    c.send(&[0x7au8; 4096]);
    let (flags, kind, cookie, offset, p) = extended_chunk(&mut c);
    assert_eq!(
        (flags, kind, cookie, offset),
        (proto::chunk::FLAG_DONE, proto::chunk::NONE, 1, 8192)
    );
    assert!(p.is_empty());
    // A read comes back as data with the offset in the payload too.
    extended_request(&mut c, Command::Read, 0, 2, 8192, 4096);
    let (flags, kind, cookie, offset, p) = extended_chunk(&mut c);
    assert_eq!(
        (flags, kind, cookie, offset),
        (proto::chunk::FLAG_DONE, proto::chunk::OFFSET_DATA, 2, 8192)
    );
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 8192);
    assert_eq!(&p[8..], &[0x7au8; 4096][..]);
    // Block status of more than 4 GiB is a hint: the reply covers the disk.
    extended_request(&mut c, Command::BlockStatus, 0, 3, 0, 1 << 40);
    let (flags, kind, cookie, _, p) = extended_chunk(&mut c);
    assert_eq!(
        (flags, kind, cookie),
        (proto::chunk::FLAG_DONE, proto::chunk::BLOCK_STATUS_EXT, 3)
    );
    let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
    assert_eq!(p.len(), 8 + 16 * count);
    let total: u64 = (0..count)
        .map(|i| u64::from_be_bytes(p[8 + 16 * i..16 + 16 * i].try_into().unwrap()))
        .sum();
    assert_eq!(total, 4 * MIB);
    // Errors are error chunks.
    extended_request(&mut c, Command::Read, 0, 4, 4 * MIB, 512);
    let (_, kind, cookie, _, p) = extended_chunk(&mut c);
    assert_eq!((kind, cookie), (proto::chunk::ERROR, 4));
    assert_eq!(
        u32::from_be_bytes(p[..4].try_into().unwrap()),
        errno::EINVAL
    );
    // A payload on a command that takes none is refused (and skipped).
    extended_request(&mut c, Command::Flush, cflag::PAYLOAD_LEN, 5, 0, 16);
    c.send(&[0u8; 16]);
    let (_, kind, cookie, _, _) = extended_chunk(&mut c);
    assert_eq!((kind, cookie), (proto::chunk::ERROR, 5));
    extended_request(&mut c, Command::Flush, 0, 6, 0, 0);
    assert_eq!(extended_chunk(&mut c).1, proto::chunk::NONE);
    // QEMU 10's client writes without PAYLOAD_LEN: a write's length is its
    // payload either way.
    extended_request(&mut c, Command::Write, 0, 7, 0, 512);
    c.send(&[0x11u8; 512]);
    assert_eq!(extended_chunk(&mut c).1, proto::chunk::NONE);
    extended_request(&mut c, Command::Read, cflag::DF, 8, 0, 512);
    assert_eq!(&extended_chunk(&mut c).4[8..], &[0x11u8; 512][..]);
}

/// A client that keeps asking but never reads the replies fills the socket:
/// hard removal still disconnects it at once, and the export goes away.
#[test]
fn hard_removal_disconnects_a_client_that_stopped_reading() {
    let f = fixture_with_disk(ServerOptions::default());
    let (mut c, _, _) = Raw::open(&f.sock, "disk", &[]);
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Far more reply bytes than any socket buffer holds.
    for i in 0..200u64 {
        let r = Request {
            flags: 0,
            command: Command::Read,
            cookie: i,
            offset: 0,
            len: MIB,
        };
        if c.s.write_all(&r.encode()).is_err() {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    f.rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            f.server.remove_export("disk", RemoveMode::Hard),
        )
        .await
    })
    .expect("hard removal does not wait for the client")
    .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(f.server.exports().is_empty());
}

/// Meta contexts selected for an export do not carry over to another one
/// of the same name (removed and added again before GO), and a failed
/// SET_META_CONTEXT drops the earlier selection.
#[test]
fn selected_contexts_belong_to_one_export() {
    let f = Fixture::new();
    let path = f.path("m.raw");
    std::fs::write(&path, vec![0u8; MIB as usize]).unwrap();
    let node = f.add_node(json!({"driver": "raw", "node-name": "m",
        "file": {"driver": "file", "filename": path}}));
    node.bitmaps().add("b", None, false, false).unwrap();
    f.export(&node, "m", true, &["b"]);
    let set = |c: &mut Raw, export: &str| {
        let req = MetaContextRequest {
            export: export.into(),
            queries: vec!["qemu:dirty-bitmap:b".into()],
        };
        c.option(opt::SET_META_CONTEXT, &req.encode());
        loop {
            let r = c.option_reply().0.reply;
            if r != rep::META_CONTEXT {
                return r;
            }
        }
    };
    let go = |c: &mut Raw, export: &str| {
        let req = InfoRequest {
            name: export.into(),
            requests: vec![],
        };
        c.option(opt::GO, &req.encode());
        while c.option_reply().0.reply != rep::ACK {}
    };
    // Selected, then the export is replaced by one without the bitmap.
    let mut c = Raw::connect(&f.sock);
    c.flags();
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ACK);
    assert_eq!(set(&mut c, "m"), rep::ACK);
    f.rt.block_on(f.server.remove_export("m", RemoveMode::Safe))
        .unwrap();
    f.export(&node, "m", true, &[]);
    go(&mut c, "m");
    c.request(Command::BlockStatus, 0, 1, 0, 4096);
    assert_eq!(c.reply().1, errno::EINVAL, "no context is selected");
    // A failed SET clears what an earlier one selected.
    let mut c = Raw::connect(&f.sock);
    c.flags();
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ACK);
    assert_eq!(set(&mut c, "m"), rep::ACK);
    assert_eq!(set(&mut c, "nope"), rep::ERR_UNKNOWN);
    go(&mut c, "m");
    c.request(Command::BlockStatus, 0, 2, 0, 4096);
    assert_eq!(c.reply().1, errno::EINVAL);
}

/// Delays writes at one offset (a slow disk region).
struct SlowAt(u64);

impl block::WriteHook for SlowAt {
    fn before<'a>(
        &'a self,
        _node: &'a block::Node,
        req: block::WriteRequest<'a>,
    ) -> block::BoxFuture<'a, block::Result<()>> {
        Box::pin(async move {
            if req.offset == self.0 {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            Ok(())
        })
    }

    fn after<'a>(
        &'a self,
        _node: &'a block::Node,
        _req: block::WriteRequest<'a>,
    ) -> block::BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Replies come as requests complete, not in the order they were sent: a
/// slow write does not hold back the reads behind it.
#[test]
fn a_slow_request_does_not_hold_back_the_next_ones() {
    let f = Fixture::new();
    let path = f.path("slow.raw");
    std::fs::write(&path, vec![0u8; MIB as usize]).unwrap();
    let node = f.add_node(json!({"driver": "raw", "node-name": "slow",
        "file": {"driver": "file", "filename": path}}));
    node.add_write_hook(std::sync::Arc::new(SlowAt(0)));
    f.export(&node, "slow", true, &[]);
    let (mut c, _, _) = Raw::open(&f.sock, "slow", &[]);
    c.request(Command::Write, 0, 1, 0, 4096);
    c.send(&[1u8; 4096]);
    for i in 0..4 {
        c.request(Command::Read, 0, 10 + i, 65536, 4096);
    }
    let order: Vec<u64> = (0..5).map(|_| c.reply().0).collect();
    assert_eq!(
        order.last(),
        Some(&1),
        "the slow write answers last: {order:?}"
    );
}

/// A refused request while earlier replies are still being sent (the
/// client reads them only afterwards): every reply arrives (the fuzzer
/// found a deadlock here).
#[test]
fn a_refusal_behind_large_replies_does_not_deadlock() {
    let f = fixture_with_disk(ServerOptions::default());
    let (mut c, _, _) = Raw::open(&f.sock, "disk", &[]);
    for i in 0..8u64 {
        c.request(Command::Read, 0, i, 0, MIB as u32);
    }
    c.request(Command::Unknown(77), 0, 100, 0, 0);
    c.request(Command::Read, 0, 101, 0, 4096);
    std::thread::sleep(Duration::from_millis(200));
    let mut got = Vec::new();
    for _ in 0..10 {
        let (cookie, error, _) = c.reply();
        got.push((cookie, error));
    }
    got.sort_unstable();
    assert_eq!(got[8], (100, errno::EINVAL));
    assert_eq!(got[9], (101, 0));
    assert!(got[..8].iter().all(|&(_, e)| e == 0));
}

/// A server with TLS credentials: every option but STARTTLS and ABORT gets
/// `NBD_REP_ERR_TLS_REQD` and the connection goes on; EXPORT_NAME, which has
/// no error reply, is hung up on; STARTTLS with a payload is invalid; a
/// STARTTLS is acknowledged, and a client that then sends plain text
/// instead of a TLS handshake is dropped — while others are still served
/// (over TLS: here nobody is, so the server must still accept them).
#[test]
fn a_tls_server_refuses_everything_before_starttls() {
    let pki = tempfile::tempdir().unwrap();
    testkit::pki::ca(pki.path(), "ca");
    let creds = testkit::pki::creds(pki.path(), "ca", "server", "server");
    let tls = nbd::tls::ServerTls::load(&creds, true).unwrap();
    let f = fixture_with_disk(ServerOptions {
        tls: Some(tls),
        ..ServerOptions::default()
    });
    let mut c = Raw::connect(&f.sock);
    c.flags();
    for option in [opt::LIST, opt::STRUCTURED_REPLY, opt::GO, opt::INFO] {
        c.option(option, &[]);
        let (h, text) = c.option_reply();
        assert_eq!((h.option, h.reply), (option, rep::ERR_TLS_REQD));
        assert!(
            String::from_utf8_lossy(&text).contains("not permitted before TLS"),
            "{text:?}"
        );
    }
    c.option(opt::STARTTLS, b"x");
    assert_eq!(c.option_reply().0.reply, rep::ERR_INVALID);
    c.option(opt::EXPORT_NAME, b"disk");
    assert!(c.closed());
    // STARTTLS, then garbage instead of a ClientHello: dropped.
    let mut c = Raw::connect(&f.sock);
    c.flags();
    c.option(opt::STARTTLS, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ACK);
    c.send(b"this is not TLS at all, just some text to upset the handshake");
    // At most a TLS alert (record type 21) comes back, then the end.
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty() || rest[0] == 21, "{rest:?}");
    // The server still greets newcomers and answers their options.
    let mut c = Raw::connect(&f.sock);
    c.flags();
    c.option(opt::LIST, &[]);
    assert_eq!(c.option_reply().0.reply, rep::ERR_TLS_REQD);
}

/// Sets the flag when dropped (also when the test fails), letting go of
/// the runtime's workers it holds.
struct Release(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn connections_are_served_on_threads_of_their_own_not_the_accepting_runtime() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let f = fixture_with_disk(ServerOptions::default());
    let (mut a, _, _) = Raw::open(&f.sock, "disk", &[]);
    let (mut b, _, _) = Raw::open(&f.sock, "disk", &[]);
    assert_serves(&mut a, 0);
    // Both workers of the runtime that accepted the clients are held
    // (the fixture's runtime has two).
    let release = Release(Arc::new(AtomicBool::new(false)));
    let held = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let (go, held) = (release.0.clone(), held.clone());
        f.rt.spawn(async move {
            held.fetch_add(1, Ordering::SeqCst);
            while !go.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the runtime's workers were not held"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Both connections are served all the same (a read that hung would
    // fail after the client's 10 s timeout).
    assert_serves(&mut a, 4096);
    assert_serves(&mut b, 8192);
    drop(release);
}

#[test]
fn nodes_opened_on_the_accepting_runtime_serve_connections_on_their_threads() {
    // Nodes whose drivers keep tasks on the runtime that opened them: an
    // io_uring file (the ring's reaper) and an NBD client (its reply
    // reader, here on this server's own export). The connections that
    // reach them run on threads of their own.
    let f = fixture_with_disk(ServerOptions::default());
    let path = f.path("ring.raw");
    std::fs::write(&path, vec![0u8; 4 * MIB as usize]).unwrap();
    let ring = f.add_node(json!({"driver": "raw", "node-name": "ring",
        "file": {"driver": "file", "filename": path, "aio": "io_uring",
            "cache": {"direct": false}}}));
    f.export(&ring, "ring", true, &[]);
    let chained = f.unix_client("chained", "disk");
    f.export(&chained, "chained", true, &[]);
    for name in ["ring", "chained"] {
        let (mut c, size, _) = Raw::open(&f.sock, name, &[]);
        assert_eq!(size, 4 * MIB, "{name}");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
        c.request(Command::Write, 0, 11, 65536, data.len() as u32);
        c.send(&data);
        let (cookie, error, _) = c.reply();
        assert_eq!((cookie, error), (11, 0), "{name}: the write");
        c.request(Command::Read, 0, 12, 65536, 65536);
        let (cookie, error, back) = c.reply();
        assert_eq!((cookie, error), (12, 0), "{name}: the read");
        assert!(back == data, "{name}: read back other bytes");
    }
    // The chained export wrote through to `disk`.
    let mut c = Raw::open(&f.sock, "disk", &[]).0;
    c.request(Command::Read, 0, 13, 65536, 4096);
    let (_, error, back) = c.reply();
    assert_eq!(error, 0);
    assert!(back.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8));
}
