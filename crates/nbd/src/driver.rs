//! `driver=nbd` nodes: a block driver over a [`Client`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use block::{
    BlockdevOptions, BoxFuture, BufResult, Driver, DriverFactory, Extent, Graph, HostRange, IoBuf,
    Limits, ZeroFlags, options::DriverOptions,
};

use crate::client::{Client, ClientOptions};
use crate::proto::{Command, cflag, state, tflag};

/// Opens `driver=nbd` nodes (register it with [`register`]), with the TLS
/// credentials the daemon's `tls-creds-x509` objects hold.
#[derive(Debug, Default)]
pub struct NbdFactory {
    /// Credentials by object id; `None`: an object with a server endpoint.
    creds: Mutex<HashMap<String, Option<crate::tls::ClientTls>>>,
}

impl NbdFactory {
    fn creds(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<crate::tls::ClientTls>>> {
        self.creds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes TLS object `id` known to nodes' `tls-creds`: client
    /// credentials, or `None` for server ones (which nodes refuse).
    pub fn add_creds(&self, id: &str, tls: Option<crate::tls::ClientTls>) {
        self.creds().insert(id.to_owned(), tls);
    }

    /// Forgets TLS object `id` (nodes that use it keep their connection).
    pub fn remove_creds(&self, id: &str) {
        self.creds().remove(id);
    }

    /// The client credentials of object `id`, with QEMU's words when
    /// there are none.
    pub fn client_tls(&self, id: &str) -> block::Result<crate::tls::ClientTls> {
        let refuse = |message: String| block::Error::Peer { errno: 22, message };
        match self.creds().get(id) {
            None => Err(refuse(format!("No TLS credentials with id '{id}'"))),
            Some(None) => Err(refuse(
                "Expecting TLS credentials with a client endpoint".into(),
            )),
            Some(Some(tls)) => Ok(tls.clone()),
        }
    }
}

/// Lets `graph` open `driver=nbd` nodes; the factory, for the daemon to
/// tell it about TLS credentials.
pub fn register(graph: &Graph) -> Arc<NbdFactory> {
    let factory = Arc::new(NbdFactory::default());
    graph.register_driver("nbd", factory.clone());
    factory
}

impl DriverFactory for NbdFactory {
    fn open<'a>(
        &'a self,
        _node: &'a str,
        options: &'a BlockdevOptions,
    ) -> BoxFuture<'a, block::Result<(Box<dyn Driver>, bool)>> {
        Box::pin(async move {
            let DriverOptions::Nbd {
                server,
                export,
                x_dirty_bitmap,
                tls_creds,
                tls_hostname,
            } = &options.driver
            else {
                return Err(block::Error::DriverUnavailable(options.driver.name()));
            };
            let client = Client::connect(&ClientOptions {
                server: server.clone(),
                export: export.clone().unwrap_or_default(),
                contexts: x_dirty_bitmap.iter().cloned().collect(),
                tls: tls_creds
                    .as_deref()
                    .map(|id| self.client_tls(id))
                    .transpose()?,
                tls_hostname: tls_hostname.clone(),
            })
            .await
            .map_err(|e| e.into_block())?;
            let status_context = match x_dirty_bitmap {
                Some(name) => Some(client.context_id(name).ok_or_else(|| block::Error::Peer {
                    errno: 22,
                    message: format!("server does not support metadata context {name}"),
                })?),
                None => client.context_id(crate::proto::BASE_ALLOCATION),
            };
            let read_only = client.has(tflag::READ_ONLY);
            if read_only && !options.read_only && !options.auto_read_only {
                return Err(block::Error::Peer {
                    errno: 1,
                    message: "An NBD export that is read-only cannot be opened read-write".into(),
                });
            }
            let driver = NbdDriver {
                client,
                status_context,
            };
            Ok((Box::new(driver) as Box<dyn Driver>, read_only))
        })
    }
}

/// A node backed by an NBD export.
#[derive(Debug)]
struct NbdDriver {
    client: Client,
    /// The context block status reports (QEMU reads `x-dirty-bitmap` as if
    /// it were `base:allocation`).
    status_context: Option<u32>,
}

impl NbdDriver {
    async fn ranged(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> block::Result<()> {
        self.client
            .ranged(command, flags, offset, len)
            .await
            .map_err(|e| e.into_block())
    }

    async fn flush_impl(&self) -> block::Result<()> {
        if !self.client.has(tflag::SEND_FLUSH) {
            return Ok(());
        }
        self.client.flush().await.map_err(|e| e.into_block())
    }
}

impl Driver for NbdDriver {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn length(&self) -> u64 {
        self.client.size()
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: u64::from(self.client.block_sizes().minimum),
            memory_alignment: 1,
            cluster_size: None,
        }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            let (r, buf) = self.client.read(offset, buf).await;
            (r.map_err(|e| e.into_block()), buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            let native = fua && self.client.has(tflag::SEND_FUA);
            let mut r = self
                .client
                .write(offset, buf.as_slice(), native)
                .await
                .map_err(|e| e.into_block());
            if r.is_ok() && fua && !native {
                r = self.flush_impl().await;
            }
            (r, buf)
        })
    }

    fn copy_from<'a>(
        &'a self,
        offset: u64,
        source: &'a HostRange,
    ) -> BoxFuture<'a, block::Result<bool>> {
        Box::pin(async move {
            self.client
                .write_file(
                    offset,
                    source.file(),
                    source.offset(),
                    source.len(),
                    source.cached(),
                )
                .await
                .map_err(|e| e.into_block())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> BoxFuture<'_, block::Result<()>> {
        Box::pin(async move {
            let c = &self.client;
            if !c.has(tflag::SEND_WRITE_ZEROES) || (flags.fast && !c.has(tflag::SEND_FAST_ZERO)) {
                if flags.fast {
                    return Err(block::Error::NotSupported("fast zeroing over NBD"));
                }
                // Write zeroes as data, a bounded buffer at a time.
                let step = u64::from(c.block_sizes().maximum).min(4 << 20);
                let zeroes = vec![0u8; step as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(step) as usize;
                    c.write(offset + done, &zeroes[..n], false)
                        .await
                        .map_err(|e| e.into_block())?;
                    done += n as u64;
                }
                return if flags.fua {
                    self.flush_impl().await
                } else {
                    Ok(())
                };
            }
            let mut f = 0;
            if !flags.may_unmap {
                f |= cflag::NO_HOLE;
            }
            if flags.fast {
                f |= cflag::FAST_ZERO;
            }
            if flags.fua && c.has(tflag::SEND_FUA) {
                f |= cflag::FUA;
            }
            self.ranged(Command::WriteZeroes, f, offset, len).await?;
            if flags.fua && !c.has(tflag::SEND_FUA) {
                self.flush_impl().await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, block::Result<()>> {
        Box::pin(async move {
            if !self.client.has(tflag::SEND_TRIM) {
                return Ok(());
            }
            self.ranged(Command::Trim, 0, offset, len).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, block::Result<()>> {
        Box::pin(self.flush_impl())
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, block::Result<Extent>> {
        Box::pin(async move {
            let plain = Extent {
                offset,
                len,
                data: true,
                zero: false,
                allocated: true,
                depth: 1,
            };
            let Some(id) = self.status_context else {
                return Ok(plain);
            };
            let align = u64::from(self.client.block_sizes().minimum);
            let ask = len.min((u64::from(u32::MAX) / align) * align) as u32;
            let replies = self
                .client
                .block_status(offset, ask, true)
                .await
                .map_err(|e| e.into_block())?;
            let first = replies
                .iter()
                .find(|(ctx, _)| *ctx == id)
                .and_then(|(_, x)| x.first().copied());
            match first {
                Some((l, flags)) if l > 0 => Ok(Extent {
                    len: u64::from(l).min(len),
                    data: flags & state::HOLE == 0,
                    zero: flags & state::ZERO != 0,
                    ..plain
                }),
                _ => Ok(plain),
            }
        })
    }

    fn close<'a>(&'a self, _bitmaps: &'a block::Bitmaps) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async move {
            self.client.disconnect().await;
            Ok(())
        })
    }

    fn filename(&self) -> Option<&str> {
        Some(self.client.uri())
    }
}
