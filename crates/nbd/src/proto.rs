//! The NBD wire format: constants, and pure encoders and parsers for the
//! handshake and transmission phases (the NBD project's `doc/proto.md`).
//!
//! Nothing here does I/O: parsers take bytes that were read and return a
//! typed value or a [`ProtoError`] saying what is wrong, so every byte a peer
//! sends passes through code that cannot panic on it (the fuzz target and the
//! property tests drive exactly these functions).

use std::fmt;

/// `NBDMAGIC`: the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation; also the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended request (extended headers negotiated).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options a client sends in the handshake.
pub mod opt {
    /// Select an export and enter transmission, old style.
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts for block status.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use 64-bit request and reply headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types; errors have bit 31 set.
pub mod rep {
    /// The option succeeded.
    pub const ACK: u32 = 1;
    /// One export of a LIST.
    pub const SERVER: u32 = 2;
    /// One piece of information of INFO/GO.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown or unsupported option.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Forbidden by the server's policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// The client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    /// The option or its reply is too large.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
    /// Extended headers are required, or already negotiated.
    pub const ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;
}

/// Information types of INFO/GO replies.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// A human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (per export).
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The FUA flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export is on rotational media.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF flag is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// RESIZE is supported.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// The FAST_ZERO flag is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// BLOCK_STATUS may carry a payload (extended headers).
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes without punching holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes only if fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// The request carries a payload length (extended headers).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types.
pub mod chunk {
    /// No payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole (reads as zeroes) at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents of one context.
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status extents of one context, 64-bit lengths (extended
    /// headers only).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// An error with a message.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// An error at an offset, with a message.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
    /// Last chunk of the reply.
    pub const FLAG_DONE: u16 = 1 << 0;
}

/// Error numbers on the wire (the protocol's, not the host's).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Block status flags of `base:allocation`.
pub mod state {
    /// Unallocated (a hole).
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
    /// `qemu:dirty-bitmap:*`: dirty.
    pub const DIRTY: u32 = 1 << 0;
}

/// Largest payload of a read or write: 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest string (export name, description, context name) in bytes.
pub const MAX_STRING: usize = 4096;
/// Largest option payload the server reads; longer ones are skipped and
/// answered with `ERR_TOO_BIG`.
pub const MAX_OPTION: u32 = 1 << 20;
/// Size of a compact request header.
pub const REQUEST_SIZE: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_SIZE: usize = 32;
/// Size of an extended reply header.
pub const EXTENDED_REPLY_SIZE: usize = 32;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_SIZE: usize = 16;
/// The context name prefix of QEMU's dirty bitmaps.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `base:allocation`.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `qemu:allocation-depth`.
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// What is wrong with bytes a peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A magic number that is not the one expected here.
    BadMagic {
        /// Where.
        what: &'static str,
        /// What arrived.
        got: u64,
    },
    /// A payload shorter than its structure.
    Truncated(&'static str),
    /// A payload longer than its structure.
    TrailingBytes(&'static str),
    /// A string longer than [`MAX_STRING`].
    StringTooLong(&'static str),
    /// A string that is not UTF-8.
    NotUtf8(&'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadMagic { what, got } => write!(f, "bad {what} magic {got:#x}"),
            ProtoError::Truncated(what) => write!(f, "{what} is truncated"),
            ProtoError::TrailingBytes(what) => write!(f, "{what} has trailing bytes"),
            ProtoError::StringTooLong(what) => {
                write!(f, "{what} is longer than {MAX_STRING} bytes")
            }
            ProtoError::NotUtf8(what) => write!(f, "{what} is not UTF-8"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// A cursor over a payload that fails instead of panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `data`, naming it `what` in errors.
    pub fn new(data: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { data, what }
    }

    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.data.len() < n {
            return Err(ProtoError::Truncated(self.what));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    /// Takes a big-endian u16.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Takes a big-endian u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Takes a big-endian u64.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_be_bytes(a))
    }

    /// Takes a string of `len` bytes (at most [`MAX_STRING`], UTF-8).
    pub fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(ProtoError::StringTooLong(self.what));
        }
        let b = self.bytes(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::NotUtf8(self.what))
    }

    /// Takes a string preceded by its u32 length.
    pub fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()?;
        self.string(len as usize)
    }

    /// The bytes not taken yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Fails unless everything was taken.
    pub fn finish(self) -> Result<(), ProtoError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes(self.what))
        }
    }
}

/// The header of a client option; `len` payload bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (see [`opt`]).
    pub option: u32,
    /// Length of the payload.
    pub len: u32,
}

impl OptionHeader {
    /// Parses the 16 bytes of an option header.
    pub fn parse(b: &[u8; OPTION_HEADER_SIZE]) -> Result<OptionHeader, ProtoError> {
        let mut r = Reader::new(b, "option header");
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                got: magic,
            });
        }
        Ok(OptionHeader {
            option: r.u32()?,
            len: r.u32()?,
        })
    }

    /// The 16 bytes of this header.
    pub fn encode(&self) -> [u8; OPTION_HEADER_SIZE] {
        let mut b = [0u8; OPTION_HEADER_SIZE];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The payload of INFO and GO: an export name and the information asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export.
    pub name: String,
    /// Information types asked for (see [`info`]).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses an INFO/GO payload.
    pub fn parse(data: &[u8]) -> Result<InfoRequest, ProtoError> {
        let mut r = Reader::new(data, "INFO/GO payload");
        let name = r.string32()?;
        let n = r.u16()?;
        let mut requests = Vec::with_capacity(usize::from(n).min(r.data.len() / 2));
        for _ in 0..n {
            requests.push(r.u16()?);
        }
        r.finish()?;
        Ok(InfoRequest { name, requests })
    }

    /// The payload of this request.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string32(&mut b, &self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for i in &self.requests {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }
}

/// The payload of LIST_META_CONTEXT and SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export.
    pub export: String,
    /// The queries (context names or namespace prefixes).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses a LIST/SET_META_CONTEXT payload.
    pub fn parse(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
        let mut r = Reader::new(data, "meta context payload");
        let export = r.string32()?;
        let n = r.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(r.string32()?);
        }
        r.finish()?;
        Ok(MetaContextRequest { export, queries })
    }

    /// The payload of this request.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string32(&mut b, &self.export);
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string32(&mut b, q);
        }
        b
    }
}

/// Appends a u32 length and the bytes of `s`.
pub fn put_string32(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// An option reply: header and payload.
pub fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// The header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// The reply type (see [`rep`]).
    pub reply: u32,
    /// Length of the payload that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Size on the wire.
    pub const SIZE: usize = 20;

    /// Parses the 20 bytes of an option reply header.
    pub fn parse(b: &[u8; Self::SIZE]) -> Result<OptionReplyHeader, ProtoError> {
        let mut r = Reader::new(b, "option reply");
        let magic = r.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                got: magic,
            });
        }
        Ok(OptionReplyHeader {
            option: r.u32()?,
            reply: r.u32()?,
            len: r.u32()?,
        })
    }
}

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read.
    Read,
    /// Write (payload follows the header).
    Write,
    /// Disconnect.
    Disc,
    /// Flush.
    Flush,
    /// Trim (discard).
    Trim,
    /// Prefetch.
    Cache,
    /// Write zeroes.
    WriteZeroes,
    /// Block status.
    BlockStatus,
    /// Resize.
    Resize,
    /// Anything else.
    Unknown(u16),
}

impl Command {
    /// The command with this wire number.
    pub fn from_wire(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            8 => Command::Resize,
            other => Command::Unknown(other),
        }
    }

    /// The wire number of this command.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Resize => 8,
            Command::Unknown(v) => v,
        }
    }
}

/// A transmission request header (a write's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (see [`cflag`]).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Chosen by the client, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (32 bits on the wire unless extended headers were
    /// negotiated).
    pub len: u64,
}

impl Request {
    /// Parses the 28 bytes of a request header.
    pub fn parse(b: &[u8; REQUEST_SIZE]) -> Result<Request, ProtoError> {
        let mut r = Reader::new(b, "request");
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                got: u64::from(magic),
            });
        }
        Ok(Request {
            flags: r.u16()?,
            command: Command::from_wire(r.u16()?),
            cookie: r.u64()?,
            offset: r.u64()?,
            len: u64::from(r.u32()?),
        })
    }

    /// Parses the 32 bytes of an extended request header.
    pub fn parse_extended(b: &[u8; EXTENDED_REQUEST_SIZE]) -> Result<Request, ProtoError> {
        let mut r = Reader::new(b, "extended request");
        let magic = r.u32()?;
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "extended request",
                got: u64::from(magic),
            });
        }
        Ok(Request {
            flags: r.u16()?,
            command: Command::from_wire(r.u16()?),
            cookie: r.u64()?,
            offset: r.u64()?,
            len: r.u64()?,
        })
    }

    /// The 28 bytes of this header (a compact header: `len` must fit in
    /// 32 bits; larger lengths are cut to them).
    pub fn encode(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&(self.len as u32).to_be_bytes());
        b
    }

    /// The 32 bytes of this header as an extended header.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_SIZE] {
        let mut b = [0u8; EXTENDED_REQUEST_SIZE];
        b[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The 16 bytes of a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The 20 bytes of a structured reply chunk header.
pub fn structured_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// The 32 bytes of an extended reply chunk header; `offset` is the
/// request's.
pub fn extended_header(flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> [u8; 32] {
    let mut b = [0u8; EXTENDED_REPLY_SIZE];
    b[..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of a reply as a client reads it: the first 16 bytes tell a
/// simple reply from a structured chunk (whose last 4 bytes follow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStart {
    /// A simple reply.
    Simple {
        /// Error number (0: success).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured chunk; its 4-byte length follows.
    Structured {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
    },
}

impl ReplyStart {
    /// Parses the first 16 bytes of a reply.
    pub fn parse(b: &[u8; 16]) -> Result<ReplyStart, ProtoError> {
        let mut r = Reader::new(b, "reply");
        match r.u32()? {
            SIMPLE_REPLY_MAGIC => Ok(ReplyStart::Simple {
                error: r.u32()?,
                cookie: r.u64()?,
            }),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyStart::Structured {
                flags: r.u16()?,
                kind: r.u16()?,
                cookie: r.u64()?,
            }),
            other => Err(ProtoError::BadMagic {
                what: "reply",
                got: u64::from(other),
            }),
        }
    }
}

/// The payload of an error chunk: error number and message.
pub fn error_chunk_payload(error: u32, message: &str) -> Vec<u8> {
    // At most MAX_STRING bytes, cut at a character boundary.
    let mut cut = message.len().min(MAX_STRING);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    let mut b = Vec::with_capacity(6 + msg.len());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn requests_round_trip(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32, big: u64) {
            let r = Request { flags, command: Command::from_wire(cmd), cookie, offset, len: u64::from(len) };
            prop_assert_eq!(Request::parse(&r.encode()), Ok(r));
            let r = Request { len: big, ..r };
            prop_assert_eq!(Request::parse_extended(&r.encode_extended()), Ok(r));
        }

        #[test]
        fn info_requests_round_trip(name in "\\PC{0,40}", requests in prop::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { name, requests };
            prop_assert_eq!(InfoRequest::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn meta_requests_round_trip(export in "\\PC{0,20}", queries in prop::collection::vec("\\PC{0,30}", 0..5)) {
            let r = MetaContextRequest { export, queries };
            prop_assert_eq!(MetaContextRequest::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn parsers_never_panic(data in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = InfoRequest::parse(&data);
            let _ = MetaContextRequest::parse(&data);
        }
    }

    #[test]
    fn error_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_STRING); // 2 bytes each
        let p = error_chunk_payload(5, &long);
        let n = usize::from(u16::from_be_bytes([p[4], p[5]]));
        assert_eq!(n, MAX_STRING);
        assert!(std::str::from_utf8(&p[6..]).is_ok());
        let odd = format!("x{long}");
        let p = error_chunk_payload(5, &odd);
        assert_eq!(
            usize::from(u16::from_be_bytes([p[4], p[5]])),
            MAX_STRING - 1
        );
        assert!(std::str::from_utf8(&p[6..]).is_ok());
    }

    #[test]
    fn bad_payloads_are_named() {
        assert_eq!(
            InfoRequest::parse(&[0, 0, 0, 5, b'a']),
            Err(ProtoError::Truncated("INFO/GO payload"))
        );
        let mut long = InfoRequest {
            name: "a".into(),
            requests: vec![],
        }
        .encode();
        long.push(0);
        assert_eq!(
            InfoRequest::parse(&long),
            Err(ProtoError::TrailingBytes("INFO/GO payload"))
        );
        assert_eq!(
            MetaContextRequest::parse(&[0, 0, 0x10, 1]),
            Err(ProtoError::StringTooLong("meta context payload"))
        );
        let bad = Request {
            flags: 0,
            command: Command::Read,
            cookie: 1,
            offset: 0,
            len: 1,
        };
        let mut b = bad.encode();
        b[0] = 0;
        assert!(matches!(
            Request::parse(&b),
            Err(ProtoError::BadMagic {
                what: "request",
                ..
            })
        ));
    }
}
