//! The server side of the fixed newstyle handshake: options until the
//! client picks an export (GO or EXPORT_NAME) or leaves.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::Server;
use super::export::{Context, Export};
use crate::error::{Error, Result};
use crate::proto::{
    self, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    InfoRequest, MAX_OPTION, MAX_PAYLOAD, MetaContextRequest, NBD_MAGIC, OPTION_HEADER_SIZE,
    OptionHeader, info, opt, option_reply, rep,
};

/// What the handshake settled: the export and how replies look.
pub(super) struct Negotiated {
    pub export: Arc<Export>,
    pub client: u64,
    pub close: watch::Receiver<bool>,
    pub structured: bool,
    /// Extended headers: 32-byte requests and replies, no simple replies.
    pub extended: bool,
    pub contexts: Vec<Context>,
}

impl Drop for Negotiated {
    fn drop(&mut self) {
        self.export.detach(self.client);
    }
}

/// The meta contexts a client selected, for one export (this one: an
/// export removed and added again under the same name is another).
struct Selected {
    export: Arc<Export>,
    contexts: Vec<Context>,
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tls {
    /// The server has no TLS credentials.
    Off,
    /// The server requires TLS, and the client has not started it.
    Required,
    /// The option haggling goes on inside TLS.
    Done,
}

/// How the option haggling ended.
pub(super) enum Outcome {
    /// The client picked an export.
    Export(Negotiated),
    /// The client left (ABORT, or asked for an export that does not exist
    /// with EXPORT_NAME, which has no error reply).
    Left,
    /// STARTTLS was acknowledged: the caller runs the TLS handshake on the
    /// connection, then haggles again (with [`Tls::Done`]) from a clean
    /// slate, as the protocol requires.
    StartTls,
}

/// Sends the greeting and reads the client's flags; whether the client
/// asked for no zeroes after the export's flags.
pub(super) async fn greet<R, W>(r: &mut R, w: &mut W) -> Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(w, &hello).await?;
    let client_flags = r.read_u32().await.map_err(lost)?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(Error::Refused(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// Runs the option haggling after [`greet`].
pub(super) async fn negotiate<R, W>(
    server: &Server,
    r: &mut R,
    w: &mut W,
    no_zeroes: bool,
    tls: Tls,
) -> Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut structured = false;
    let mut extended = false;
    let mut selected: Option<Selected> = None;
    loop {
        let mut head = [0u8; OPTION_HEADER_SIZE];
        r.read_exact(&mut head).await.map_err(lost)?;
        let OptionHeader { option, len } = OptionHeader::parse(&head)?;
        if len > MAX_OPTION {
            tokio::io::copy(&mut r.take(u64::from(len)), &mut tokio::io::sink())
                .await
                .map_err(lost)?;
            reply_err(w, option, rep::ERR_TOO_BIG, "option too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await.map_err(lost)?;
        if tls == Tls::Required && option != opt::STARTTLS && option != opt::ABORT {
            let msg = format!("Option {option:#x} not permitted before TLS");
            if option == opt::EXPORT_NAME {
                // No error reply exists for it: hang up.
                return Err(Error::Refused(msg));
            }
            reply_err(w, option, rep::ERR_TLS_REQD, &msg).await?;
            continue;
        }
        match option {
            opt::EXPORT_NAME if extended => {
                return Err(Error::Refused(
                    "EXPORT_NAME after extended headers were negotiated".into(),
                ));
            }
            opt::EXPORT_NAME => {
                let name = String::from_utf8(data)
                    .map_err(|_| Error::Refused("export name is not UTF-8".into()))?;
                let Some(export) = server.find_by_name(&name) else {
                    return Ok(Outcome::Left);
                };
                let Some(node) = export.node() else {
                    return Ok(Outcome::Left);
                };
                let Some((client, close)) = export.attach() else {
                    return Ok(Outcome::Left);
                };
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&node.length().to_be_bytes());
                b.extend_from_slice(&export.transmission_flags(structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                let contexts = take_contexts(&mut selected, &export);
                let n = Negotiated {
                    export,
                    client,
                    close,
                    structured,
                    extended,
                    contexts,
                };
                send(w, &b).await?;
                return Ok(Outcome::Export(n));
            }
            opt::ABORT => {
                let _ = send(w, &option_reply(option, rep::ACK, &[])).await;
                return Ok(Outcome::Left);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply_err(w, option, rep::ERR_INVALID, "no payload expected").await?;
                    continue;
                }
                let mut out = Vec::new();
                for e in server.exports().iter().filter(|e| !e.is_removed()) {
                    let o = e.options();
                    let mut p = Vec::new();
                    proto::put_string32(&mut p, &o.name);
                    p.extend_from_slice(o.description.as_deref().unwrap_or("").as_bytes());
                    out.extend_from_slice(&option_reply(option, rep::SERVER, &p));
                }
                out.extend_from_slice(&option_reply(option, rep::ACK, &[]));
                send(w, &out).await?;
            }
            opt::STARTTLS => match tls {
                Tls::Off => reply_err(w, option, rep::ERR_POLICY, "TLS not configured").await?,
                Tls::Done => reply_err(w, option, rep::ERR_INVALID, "TLS already enabled").await?,
                Tls::Required if !data.is_empty() => {
                    reply_err(w, option, rep::ERR_INVALID, "no payload expected").await?;
                }
                Tls::Required => {
                    send(w, &option_reply(option, rep::ACK, &[])).await?;
                    return Ok(Outcome::StartTls);
                }
            },
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply_err(w, option, rep::ERR_INVALID, "no payload expected").await?;
                } else if extended {
                    let msg = "extended headers already negotiated";
                    reply_err(w, option, rep::ERR_INVALID, msg).await?;
                } else {
                    extended = true;
                    send(w, &option_reply(option, rep::ACK, &[])).await?;
                }
            }
            opt::STRUCTURED_REPLY if extended => {
                let msg = "extended headers already negotiated";
                reply_err(w, option, rep::ERR_EXT_HEADER_REQD, msg).await?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(w, option, rep::ERR_INVALID, "no payload expected").await?;
                } else if structured {
                    reply_err(
                        w,
                        option,
                        rep::ERR_INVALID,
                        "structured reply already negotiated",
                    )
                    .await?;
                } else {
                    structured = true;
                    send(w, &option_reply(option, rep::ACK, &[])).await?;
                }
            }
            opt::INFO | opt::GO => {
                let req = match InfoRequest::parse(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        reply_err(w, option, rep::ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let Some(export) = server.find_by_name(&req.name) else {
                    let msg = format!("export '{}' not present", req.name);
                    reply_err(w, option, rep::ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let replies = structured || extended;
                if option == opt::INFO {
                    send_info(w, option, &export, &req, replies).await?;
                    continue;
                }
                // Attached before the final ACK: once the client has it, the
                // export counts it (safe removal is refused from then on).
                let Some((client, close)) = export.attach() else {
                    let msg = format!("export '{}' not present", req.name);
                    reply_err(w, option, rep::ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let mut n = Negotiated {
                    export: export.clone(),
                    client,
                    close,
                    structured,
                    extended,
                    contexts: Vec::new(),
                };
                if !send_info(w, option, &export, &req, replies).await? {
                    continue; // dropping `n` detaches
                }
                n.contexts = take_contexts(&mut selected, &export);
                return Ok(Outcome::Export(n));
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let listing = option == opt::LIST_META_CONTEXT;
                if !listing {
                    // Every SET replaces the selection, even one that fails.
                    selected = None;
                }
                if !structured && !extended {
                    let msg = "request option when structured reply is not negotiated";
                    reply_err(w, option, rep::ERR_INVALID, msg).await?;
                    continue;
                }
                let req = match MetaContextRequest::parse(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        reply_err(w, option, rep::ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let Some(export) = server.find_by_name(&req.export) else {
                    let msg = format!("export '{}' not present", req.export);
                    reply_err(w, option, rep::ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let mut contexts: Vec<Context> = if listing && req.queries.is_empty() {
                    export.contexts()
                } else {
                    req.queries
                        .iter()
                        .flat_map(|q| export.query(q, listing))
                        .collect()
                };
                contexts.sort();
                contexts.dedup();
                let mut out = Vec::new();
                for c in &contexts {
                    let mut p = c.id().to_be_bytes().to_vec();
                    p.extend_from_slice(export.context_name(*c).as_bytes());
                    out.extend_from_slice(&option_reply(option, rep::META_CONTEXT, &p));
                }
                out.extend_from_slice(&option_reply(option, rep::ACK, &[]));
                send(w, &out).await?;
                if !listing {
                    selected = Some(Selected { export, contexts });
                }
            }
            other => {
                let msg = format!("unsupported option {other}");
                reply_err(w, option, rep::ERR_UNSUP, &msg).await?;
            }
        }
    }
}

/// The contexts selected for `export` (none if they were for another).
fn take_contexts(selected: &mut Option<Selected>, export: &Arc<Export>) -> Vec<Context> {
    match selected.take() {
        Some(s) if Arc::ptr_eq(&s.export, export) => s.contexts,
        _ => Vec::new(),
    }
}

/// Sends the INFO replies for `export` and the final ACK; `false` if an
/// error reply was sent instead.
async fn send_info<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    export: &Export,
    req: &InfoRequest,
    structured: bool,
) -> Result<bool> {
    let Some(node) = export.node() else {
        let msg = format!("export '{}' not present", req.name);
        reply_err(w, option, rep::ERR_UNKNOWN, &msg).await?;
        return Ok(false);
    };
    let asked_block_size = req.requests.contains(&info::BLOCK_SIZE);
    let align = node
        .limits()
        .request_alignment
        .clamp(1, u64::from(MAX_PAYLOAD)) as u32;
    if option == opt::GO && align > 1 && !asked_block_size {
        let msg = "request NBD_INFO_BLOCK_SIZE to use this export";
        reply_err(w, option, rep::ERR_BLOCK_SIZE_REQD, msg).await?;
        return Ok(false);
    }
    let o = export.options();
    let mut out = Vec::new();
    let mut info_reply = |kind: u16, body: &[u8]| {
        let mut p = kind.to_be_bytes().to_vec();
        p.extend_from_slice(body);
        out.extend_from_slice(&option_reply(option, rep::INFO, &p));
    };
    if req.requests.contains(&info::NAME) {
        info_reply(info::NAME, o.name.as_bytes());
    }
    let description = o.description.as_deref().filter(|d| !d.is_empty());
    if let Some(d) = description.filter(|_| req.requests.contains(&info::DESCRIPTION)) {
        info_reply(info::DESCRIPTION, d.as_bytes());
    }
    let min = if option == opt::INFO || asked_block_size {
        align
    } else {
        1
    };
    let mut sizes = Vec::with_capacity(12);
    sizes.extend_from_slice(&min.to_be_bytes());
    sizes.extend_from_slice(&min.max(4096).to_be_bytes());
    sizes.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    info_reply(info::BLOCK_SIZE, &sizes);
    let mut e = node.length().to_be_bytes().to_vec();
    e.extend_from_slice(&export.transmission_flags(structured).to_be_bytes());
    info_reply(info::EXPORT, &e);
    out.extend_from_slice(&option_reply(option, rep::ACK, &[]));
    send(w, &out).await?;
    Ok(true)
}

async fn reply_err<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    error: u32,
    message: &str,
) -> Result<()> {
    send(w, &option_reply(option, error, message.as_bytes())).await
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<()> {
    w.write_all(bytes).await.map_err(lost)?;
    w.flush().await.map_err(lost)
}

fn lost(e: std::io::Error) -> Error {
    Error::Disconnected(e.to_string())
}
