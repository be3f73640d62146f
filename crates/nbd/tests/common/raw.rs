//! A blocking client that speaks the protocol byte by byte, for tests that
//! break it anywhere or watch exactly what the server sends.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nbd::proto::{
    self, Command, InfoRequest, MetaContextRequest, OptionHeader, OptionReplyHeader, Request, info,
    opt, rep,
};

/// A blocking client that speaks the protocol byte by byte, so tests can
/// break it anywhere.
pub struct Raw {
    pub s: UnixStream,
    /// `OFFSET_HOLE` chunks received so far.
    pub holes: usize,
    /// Command, offset and length of each request sent, by cookie.
    sent: std::collections::HashMap<u64, (Command, u64, u64)>,
}

impl Raw {
    /// Connects and reads the greeting.
    pub fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut raw = Raw {
            s,
            holes: 0,
            sent: Default::default(),
        };
        let mut hello = [0u8; 18];
        raw.s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        raw
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Sends the client flags (fixed newstyle, no zeroes).
    pub fn flags(&mut self) {
        self.send(&3u32.to_be_bytes());
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.send(&h.encode());
        self.send(data);
    }

    pub fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let mut h = [0u8; OptionReplyHeader::SIZE];
        self.s.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::parse(&h).unwrap();
        let mut p = vec![0u8; h.len as usize];
        self.s.read_exact(&mut p).unwrap();
        (h, p)
    }

    /// Structured replies, the given meta contexts, then GO; returns the
    /// export's size and transmission flags.
    pub fn open(sock: &Path, export: &str, contexts: &[&str]) -> (Raw, u64, u16) {
        Raw::open_with(sock, export, contexts, true)
    }

    /// [`open`](Self::open), with simple replies unless `structured`.
    pub fn open_with(
        sock: &Path,
        export: &str,
        contexts: &[&str],
        structured: bool,
    ) -> (Raw, u64, u16) {
        let mut c = Raw::connect(sock);
        c.flags();
        if structured {
            c.option(opt::STRUCTURED_REPLY, &[]);
            assert_eq!(c.option_reply().0.reply, rep::ACK);
        }
        if !contexts.is_empty() {
            let req = MetaContextRequest {
                export: export.into(),
                queries: contexts.iter().map(|s| s.to_string()).collect(),
            };
            c.option(opt::SET_META_CONTEXT, &req.encode());
            while c.option_reply().0.reply != rep::ACK {}
        }
        let req = InfoRequest {
            name: export.into(),
            requests: vec![info::BLOCK_SIZE],
        };
        c.option(opt::GO, &req.encode());
        let (mut size, mut flags) = (0, 0);
        loop {
            let (h, p) = c.option_reply();
            match h.reply {
                rep::ACK => break,
                rep::INFO if p[..2] == info::EXPORT.to_be_bytes() => {
                    size = u64::from_be_bytes(p[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes([p[10], p[11]]);
                }
                rep::INFO => {}
                other => panic!("GO answered {other:#x}: {}", String::from_utf8_lossy(&p)),
            }
        }
        (c, size, flags)
    }

    pub fn request(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.sent.insert(cookie, (command, offset, u64::from(len)));
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            len: u64::from(len),
        };
        self.send(&r.encode());
    }

    /// Reads one whole reply: (cookie, error, data of a read). Structured
    /// read chunks are placed at their offsets; a read whose chunks do not
    /// cover it exactly once fails the test.
    pub fn reply(&mut self) -> (u64, u32, Vec<u8>) {
        let mut data = Vec::new();
        let mut covered: Vec<(u64, u64)> = Vec::new();
        loop {
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h).unwrap();
            match proto::ReplyStart::parse(&h).unwrap() {
                proto::ReplyStart::Simple { error, cookie } => {
                    let sent = self.sent.get(&cookie).copied();
                    if let Some((Command::Read, _, len)) = sent.filter(|_| error == 0) {
                        data.resize(len as usize, 0);
                        self.s.read_exact(&mut data).unwrap();
                    }
                    return (cookie, error, data);
                }
                proto::ReplyStart::Structured {
                    flags,
                    kind,
                    cookie,
                } => {
                    let mut l = [0u8; 4];
                    self.s.read_exact(&mut l).unwrap();
                    let mut p = vec![0u8; u32::from_be_bytes(l) as usize];
                    self.s.read_exact(&mut p).unwrap();
                    let mut error = 0;
                    let (_, base, len) =
                        self.sent
                            .get(&cookie)
                            .copied()
                            .unwrap_or((Command::Read, 0, 0));
                    data.resize(len as usize, 0);
                    let at = |p: &[u8]| u64::from_be_bytes(p[..8].try_into().unwrap()) - base;
                    match kind {
                        proto::chunk::OFFSET_DATA => {
                            let from = at(&p);
                            let n = (p.len() - 8) as u64;
                            data[from as usize..(from + n) as usize].copy_from_slice(&p[8..]);
                            covered.push((from, from + n));
                        }
                        proto::chunk::OFFSET_HOLE => {
                            self.holes += 1;
                            let from = at(&p);
                            let n = u64::from(u32::from_be_bytes(p[8..12].try_into().unwrap()));
                            data[from as usize..(from + n) as usize].fill(0);
                            covered.push((from, from + n));
                        }
                        proto::chunk::ERROR => {
                            error = u32::from_be_bytes(p[..4].try_into().unwrap())
                        }
                        _ => {}
                    }
                    if flags & proto::chunk::FLAG_DONE != 0 {
                        if error == 0 && !covered.is_empty() {
                            covered.sort_unstable();
                            let mut end = 0;
                            for (from, to) in &covered {
                                assert_eq!(
                                    *from, end,
                                    "chunks overlap or leave a gap: {covered:?}"
                                );
                                end = *to;
                            }
                            assert_eq!(end, len, "chunks cover the read: {covered:?}");
                        }
                        if covered.is_empty() {
                            data.clear();
                        }
                        return (cookie, error, data);
                    }
                }
            }
        }
    }

    /// Whether the server closed the connection (within the read timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
