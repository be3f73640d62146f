//! `block-dirty-bitmap-pull`, a command of ours: copies a dirty bitmap from
//! any NBD server that publishes it as the `qemu:dirty-bitmap:NAME`
//! metadata context (bitmirror, `qemu-nbd -B`, qemu-storage-daemon's
//! `block-export-add` with `bitmaps`) into a bitmap of a local node. This
//! is how a bitmap follows a disk to another host (DESIGN.md §3, "Bitmap
//! migration").

use std::sync::Arc;

use block::SocketAddress;
use hbitmap::HBitmap;
use nbd::client::{Client, ClientOptions};
use qapi::Object;
use qmp::QmpError;
use serde_json::{Value, json};

use super::commands::done;
use super::daemon::{Daemon, qerr};

/// `NBD_STATE_DIRTY`: the flag of a dirty extent in a
/// `qemu:dirty-bitmap:` context.
const STATE_DIRTY: u32 = 1;

/// How long the server may take to connect or to answer one request.
const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The largest block-status request: under 4 GiB, a multiple of any
/// alignment a server asks for.
const MAX_STATUS: u64 = 1 << 31;

/// The arguments, as `docs/qmp.md` lists them.
struct PullArgs {
    node: String,
    name: String,
    server: SocketAddress,
    export: String,
    bitmap: String,
    granularity: Option<u32>,
    persistent: bool,
    disabled: bool,
    tls_creds: Option<String>,
    tls_hostname: Option<String>,
}

impl PullArgs {
    fn read(args: &mut Object) -> Result<PullArgs, QmpError> {
        let node = args.req_str("node")?;
        let name = args.req_str("name")?;
        let mut server = args.req_object("server")?;
        let address = SocketAddress::read(&mut server).map_err(qerr)?;
        server.finish()?;
        let export = args.req_str("export")?;
        let bitmap = args.opt_str("bitmap")?.unwrap_or_else(|| name.clone());
        let granularity = args.opt_u32("granularity")?;
        let persistent = args.opt_bool("persistent")?.unwrap_or(false);
        let disabled = args.opt_bool("disabled")?.unwrap_or(false);
        let tls_creds = args.opt_str("tls-creds")?;
        let tls_hostname = args.opt_str("tls-hostname")?;
        done(args)?;
        Ok(PullArgs {
            node,
            name,
            server: address,
            export,
            bitmap,
            granularity,
            persistent,
            disabled,
            tls_creds,
            tls_hostname,
        })
    }
}

/// Runs `block-dirty-bitmap-pull`: ORs the remote bitmap's dirty extents
/// into bitmap `name` of `node`, creating it first when it does not exist
/// (as `block-dirty-bitmap-add` would, with `granularity`, `persistent`
/// and `disabled`). A bitmap it created is removed again if the pull
/// fails; an existing one is left as it was (the bits are merged at the
/// end, all at once). Returns `{"count": dirty bytes pulled}`.
pub async fn pull(daemon: &Arc<Daemon>, args: &mut Object) -> Result<Value, QmpError> {
    let a = PullArgs::read(args)?;
    let node = daemon.graph.get(&a.node).map_err(qerr)?;
    let context = format!("qemu:dirty-bitmap:{}", a.bitmap);
    let fail = |m: String| QmpError::generic(m);
    let options = ClientOptions {
        server: a.server.clone(),
        export: a.export.clone(),
        contexts: vec![context.clone()],
        tls: a
            .tls_creds
            .as_deref()
            .map(|id| daemon.nbd_nodes.client_tls(id))
            .transpose()
            .map_err(qerr)?,
        tls_hostname: a.tls_hostname.clone(),
    };
    // The local bitmap first: its checks (granularity, name) come before
    // any network traffic, and its granularity sizes what is read.
    let local = || node.bitmaps().info().into_iter().find(|b| b.name == a.name);
    let existing = local();
    let granularity = match (&existing, a.granularity) {
        (Some(b), Some(g)) if b.granularity != u64::from(g) => {
            return Err(fail(format!(
                "Bitmap '{}' has granularity {}, not {g}",
                a.name, b.granularity
            )));
        }
        (Some(b), _) => b.granularity,
        (None, g) => {
            node.add_bitmap(&a.name, g.map(u64::from), a.persistent, a.disabled)
                .await
                .map_err(qerr)?;
            local().map_or(1 << 16, |b| b.granularity)
        }
    };
    let merged = async {
        let connected = tokio::time::timeout(PEER_TIMEOUT, Client::connect(&options))
            .await
            .unwrap_or_else(|_| Err(nbd::Error::Refused("no answer within 30 seconds".into())));
        let client = connected.map_err(|e| {
            fail(format!(
                "Cannot pull bitmap '{}' from export '{}' at {}: {e}",
                a.bitmap, a.export, a.server
            ))
        })?;
        let result = read_remote(&client, &context, &a, node.length(), granularity).await;
        client.disconnect().await;
        let remote = result.map_err(fail)?;
        node.bitmaps().merge(&a.name, &[remote]).map_err(qerr)
    }
    .await;
    match merged {
        Ok(_) => {
            let count = local().map_or(0, |b| b.count);
            Ok(json!({"count": count}))
        }
        Err(e) => {
            if existing.is_none() {
                let _ = node.remove_bitmap(&a.name).await;
            }
            Err(e)
        }
    }
}

/// The dirty extents the server reports for `context` over the whole
/// export, which must be `len` bytes long, as a bitmap of `granularity`
/// (its size is fixed by `len`, whatever the server sends).
async fn read_remote(
    client: &Client,
    context: &str,
    a: &PullArgs,
    len: u64,
    granularity: u64,
) -> Result<HBitmap, String> {
    let Some(id) = client.context_id(context) else {
        return Err(format!(
            "Export '{}' at {} does not publish bitmap '{}' (no metadata context '{context}')",
            a.export, a.server, a.bitmap
        ));
    };
    if client.size() != len {
        return Err(format!(
            "Export '{}' is {} bytes, node '{}' is {len}: they must be the same size",
            a.export,
            client.size(),
            a.node
        ));
    }
    let mut dirty = HBitmap::new(len, granularity.trailing_zeros()).map_err(|e| e.to_string())?;
    let mut at = 0u64;
    while at < len {
        let ask = (len - at).min(MAX_STATUS) as u32;
        let reply = tokio::time::timeout(PEER_TIMEOUT, client.block_status(at, ask, false))
            .await
            .unwrap_or_else(|_| Err(nbd::Error::Refused("no answer within 30 seconds".into())))
            .map_err(|e| format!("Reading bitmap '{}' at offset {at} failed: {e}", a.bitmap))?;
        let extents = reply
            .into_iter()
            .find(|(c, _)| *c == id)
            .map(|(_, e)| e)
            .unwrap_or_default();
        let before = at;
        for (length, flags) in extents {
            let length = u64::from(length).min(len - at);
            if length == 0 {
                break;
            }
            if flags & STATE_DIRTY != 0 {
                dirty.set(at, length).map_err(|e| e.to_string())?;
            }
            at += length;
            if at >= len {
                break;
            }
        }
        if at == before {
            return Err(format!(
                "The server answered no extent for bitmap '{}' at offset {at}",
                a.bitmap
            ));
        }
    }
    Ok(dirty)
}
