//! The daemon's state: the node graph, the NBD server and its exports,
//! user-created objects, monitors, and the way out.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use block::throttle::ThrottleLimits;
use block::{Graph, SocketAddress};
use jobs::Jobs;
use nbd::server::{ExportOptions, ListenAddr, RemoveMode, Server, ServerOptions};
use qmp::{Events, Monitor, MonitorConfig, QmpError};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::args::{BitmapRef, ExportArgs, NbdServerArgs, ObjectArgs};
use super::chardev;
use super::cli::{ChardevBackend, ItemKind, Options};

/// The QEMU version whose storage daemon we stand in for; clients read it
/// from the greeting and `query-version` to decide what they may use.
pub const QEMU_VERSION: (u64, u64, u64) = (10, 0, 0);
/// [`QEMU_VERSION`] as text.
pub const QEMU_VERSION_STRING: &str = "10.0.0";

/// A user-created object (`object-add`).
#[derive(Debug, Clone)]
pub struct QomObject {
    /// Its id.
    pub id: String,
    /// For `tls-creds-x509`: the loaded credentials.
    pub tls: Option<TlsCreds>,
    /// For `authz-simple`: the identity it lets in.
    pub identity: Option<String>,
}

/// A `tls-creds-x509` object.
#[derive(Debug, Clone)]
pub struct TlsCreds {
    /// Loaded for `endpoint=server` (QEMU loads them when the object is
    /// made, and so reports bad files then).
    pub server: Option<nbd::tls::ServerTls>,
}

/// Everything the daemon holds. Commands reach it through QMP
/// (`commands.rs`); the command line carries out the same operations.
pub struct Daemon {
    /// The node graph (shared with jobs that pivot).
    pub graph: Arc<Graph>,
    /// The event stream all monitors receive.
    pub events: Events,
    /// Jobs (`blockdev-create`; mirror and backup to come).
    pub jobs: Jobs,
    nbd: tokio::sync::Mutex<Option<Server>>,
    objects: Mutex<Vec<QomObject>>,
    /// Why the daemon is stopping, once it is.
    shutdown: watch::Sender<Option<String>>,
    /// Turns true when monitors should write their last events and end.
    monitors_stop: watch::Sender<bool>,
    monitor_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pidfile: Mutex<Option<std::path::PathBuf>>,
    /// Opens `driver=nbd` nodes; knows the TLS credentials objects.
    pub nbd_nodes: Arc<nbd::NbdFactory>,
    /// Opens `driver=rbd` nodes; keeps the cluster connections.
    #[cfg(feature = "rbd")]
    pub rbd_nodes: Arc<rbd::RbdFactory>,
}

impl Default for Daemon {
    fn default() -> Daemon {
        Daemon::new()
    }
}

impl Daemon {
    /// A daemon with nothing in it yet.
    pub fn new() -> Daemon {
        let graph = Arc::new(Graph::new());
        let nbd_nodes = nbd::register(&graph);
        #[cfg(feature = "rbd")]
        let rbd_nodes = rbd::RbdFactory::register(&graph);
        #[cfg(not(feature = "rbd"))]
        graph.register_driver("rbd", Arc::new(super::create::NoRbd));
        let events = Events::new();
        let sink = events.clone();
        Daemon {
            graph,
            nbd_nodes,
            #[cfg(feature = "rbd")]
            rbd_nodes,
            jobs: Jobs::new(Arc::new(move |name, data| sink.emit(name, Some(data)))),
            events,
            nbd: tokio::sync::Mutex::new(None),
            objects: Mutex::new(Vec::new()),
            shutdown: watch::channel(None).0,
            monitors_stop: watch::channel(false).0,
            monitor_tasks: Mutex::new(Vec::new()),
            pidfile: Mutex::new(None),
        }
    }

    fn objects(&self) -> MutexGuard<'_, Vec<QomObject>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out the command line in order. The first failure is
    /// returned with the option it came from.
    pub async fn start(self: &Arc<Self>, options: &Options) -> Result<(), String> {
        let mut chardevs: Vec<(String, ChardevBackend)> = Vec::new();
        let mut stdio_used = false;
        let mut stdio_monitor: Option<String> = None;
        for item in &options.items {
            let fail = |e: String| format!("{}: {e}", item.origin);
            match &item.kind {
                ItemKind::Blockdev(o) => {
                    self.graph.add(o).await.map_err(|e| fail(e.to_string()))?;
                }
                ItemKind::Chardev(c) => {
                    if chardevs.iter().any(|(id, _)| *id == c.id) {
                        return Err(fail(format!("attempt to add duplicate chardev '{}'", c.id)));
                    }
                    chardevs.push((c.id.clone(), c.backend.clone()));
                }
                ItemKind::Monitor { chardev } => {
                    let Some(pos) = chardevs.iter().position(|(id, _)| id == chardev) else {
                        return Err(fail(format!("chardev \"{chardev}\" not found")));
                    };
                    let (_, backend) = chardevs.remove(pos);
                    if backend == ChardevBackend::Stdio {
                        if stdio_used {
                            return Err(fail(
                                "cannot use stdio by multiple character devices".into(),
                            ));
                        }
                        stdio_used = true;
                        // Greets at once: after the PID file, below.
                        stdio_monitor = Some(item.origin.clone());
                        continue;
                    }
                    self.start_monitor(backend).await.map_err(fail)?;
                }
                ItemKind::NbdServer(a) => {
                    self.nbd_server_start(a).await.map_err(|e| fail(e.desc))?;
                }
                ItemKind::Export(a) => {
                    self.export_add(a).await.map_err(|e| fail(e.desc))?;
                }
                ItemKind::Object(a) => {
                    self.object_add(a).map_err(|e| fail(e.desc))?;
                }
            }
        }
        if let Some(path) = &options.pidfile {
            write_pidfile(path)
                .map_err(|e| format!("cannot create PID file: {}: {e}", path.display()))?;
            *self.pidfile.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.clone());
        }
        // A stdio monitor greets as soon as it starts: once everything is
        // up, as qemu-storage-daemon's does from its main loop.
        if let Some(origin) = stdio_monitor {
            self.start_monitor(ChardevBackend::Stdio)
                .await
                .map_err(|e| format!("{origin}: {e}"))?;
        }
        Ok(())
    }

    /// Starts a QMP monitor on a chardev.
    async fn start_monitor(self: &Arc<Self>, backend: ChardevBackend) -> Result<(), String> {
        let monitor = Arc::new(Monitor::new(
            MonitorConfig {
                version: self.version(),
                oob: backend != ChardevBackend::Stdio,
            },
            Arc::new(super::commands::Commands::new(self)),
            self.events.clone(),
        ));
        let task = chardev::serve(backend, monitor, self.monitors_stop.subscribe()).await?;
        self.monitor_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        Ok(())
    }

    /// The `version` object of the greeting and `query-version`.
    pub fn version(&self) -> Value {
        let (major, minor, micro) = QEMU_VERSION;
        json!({
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": format!("bitmirror {}", env!("CARGO_PKG_VERSION")),
        })
    }

    /// Asks the daemon to stop, for `reason` (logged; QEMU's words:
    /// `host-qmp-quit`, `host-signal`).
    pub fn request_shutdown(&self, reason: &str) {
        self.shutdown.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason.to_owned());
                true
            } else {
                false
            }
        });
    }

    /// Waits for `quit`, SIGTERM, SIGINT or SIGHUP; the reason.
    pub async fn wait_for_shutdown(&self) -> String {
        let mut rx = self.shutdown.subscribe();
        let signal = async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                tracing::error!("cannot catch signals; stop the daemon with `quit`");
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        };
        tokio::select! {
            r = rx.wait_for(Option::is_some) => {
                if let Ok(r) = r {
                    return r.clone().unwrap_or_default();
                }
            }
            () = signal => self.request_shutdown("host-signal"),
        }
        self.shutdown.borrow().clone().unwrap_or_default()
    }

    /// The way out: jobs cancelled, exports removed (`BLOCK_EXPORT_DELETED`
    /// each), nodes closed (persistent bitmaps stored), monitors flushed.
    /// Like qemu-storage-daemon, no `SHUTDOWN` event: clients see the
    /// monitor close.
    pub async fn close(&self) {
        self.jobs.cancel_all().await;
        if let Some(server) = self.nbd.lock().await.take() {
            self.stop_server(&server).await;
        }
        if let Err(e) = self.graph.close_all().await {
            tracing::error!("closing the nodes failed: {e}");
        }
        self.monitors_stop.send_replace(true);
        let tasks: Vec<_> = self
            .monitor_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        // The PID file goes with the process, as QEMU's.
        if let Some(path) = self
            .pidfile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = std::fs::remove_file(path);
        }
    }

    // ---- NBD -------------------------------------------------------------

    /// `nbd-server-start` / `--nbd-server`.
    pub async fn nbd_server_start(&self, args: &NbdServerArgs) -> Result<(), QmpError> {
        let mut nbd = self.nbd.lock().await;
        if nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let tls = match (&args.tls_creds, &args.tls_authz) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(QmpError::generic(
                    "tls-authz is not supported without tls-creds",
                ));
            }
            (Some(id), None) => Some(self.server_tls(id)?),
            (Some(id), Some(authz)) => {
                let creds = self.server_tls(id)?;
                if !creds.verify_peer() {
                    // QEMU skips the check then and lets everyone in;
                    // refusing says so instead of locking everyone out.
                    return Err(QmpError::generic(format!(
                        "tls-authz needs TLS credentials with verify-peer=on ('{id}' has it off)"
                    )));
                }
                let identity = self
                    .objects()
                    .iter()
                    .find(|o| o.id == *authz)
                    .map(|o| o.identity.clone());
                match identity {
                    Some(Some(identity)) => Some(creds.with_identity(&identity)),
                    Some(None) => {
                        return Err(QmpError::generic(format!(
                            "Object with id '{authz}' is not an authorization object"
                        )));
                    }
                    None => {
                        return Err(QmpError::generic(format!(
                            "Authorization object '{authz}' not found"
                        )));
                    }
                }
            }
        };
        let server = Server::new(ServerOptions {
            max_connections: args.max_connections,
            handshake_timeout: match args.handshake_max_seconds {
                0 => Duration::MAX,
                s => Duration::from_secs(s.into()),
            },
            tls,
        });
        let addr = match &args.addr {
            SocketAddress::Unix { path } => ListenAddr::Unix(path.into()),
            SocketAddress::Inet { host, port } => ListenAddr::Tcp {
                host: host.clone(),
                port: port.parse().map_err(|_| {
                    QmpError::generic(format!("Service '{port}' is not a valid port number"))
                })?,
            },
        };
        server
            .listen(&addr)
            .await
            .map_err(|e| QmpError::generic(e.to_string()))?;
        *nbd = Some(server);
        Ok(())
    }

    /// Removes every export (`BLOCK_EXPORT_DELETED` each) but keeps the
    /// server listening: what `quit` does before it answers, as
    /// qemu-storage-daemon.
    pub async fn remove_exports(&self) {
        if let Some(server) = self.nbd.lock().await.as_ref() {
            remove_all(self, server).await;
        }
    }

    /// `nbd-server-stop`: removes every NBD export (clients are
    /// disconnected) and stops listening.
    pub async fn nbd_server_stop(&self) -> Result<(), QmpError> {
        let server = self
            .nbd
            .lock()
            .await
            .take()
            .ok_or_else(|| QmpError::generic("NBD server not running"))?;
        self.stop_server(&server).await;
        Ok(())
    }

    /// Removes every export, newest first (QEMU's order), then stops
    /// listening.
    async fn stop_server(&self, server: &Server) {
        remove_all(self, server).await;
        server.stop();
    }

    fn export_deleted(&self, id: &str) {
        self.events
            .emit("BLOCK_EXPORT_DELETED", Some(json!({"id": id})));
    }

    /// `block-export-add` / `--export`.
    pub async fn export_add(&self, args: &ExportArgs) -> Result<(), QmpError> {
        let node = self.graph.find(&args.node_name).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='' nor node-name='{}'",
                args.node_name
            ))
        })?;
        let nbd = self.nbd.lock().await;
        let server = nbd
            .as_ref()
            .ok_or_else(|| QmpError::generic("NBD server not running"))?;
        let mut bitmaps = Vec::new();
        for b in &args.bitmaps {
            match b {
                BitmapRef::Local(name) => bitmaps.push(name.clone()),
                BitmapRef::External { node: n, name } => {
                    if n != &args.node_name {
                        return Err(QmpError::generic(format!(
                            "Bitmap '{name}' on node '{n}' is not on the exported node; \
                             bitmirror publishes bitmaps of the exported node and its \
                             backing chain"
                        )));
                    }
                    bitmaps.push(name.clone());
                }
            }
        }
        let name = args.name.clone().unwrap_or_else(|| args.node_name.clone());
        server
            .add_export(
                &node,
                ExportOptions {
                    id: args.id.clone(),
                    name,
                    description: args.description.clone(),
                    writable: args.writable,
                    bitmaps,
                    allocation_depth: args.allocation_depth,
                },
            )
            .map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(())
    }

    /// `block-export-del`.
    pub async fn export_del(&self, id: &str, mode: RemoveMode) -> Result<(), QmpError> {
        let nbd = self.nbd.lock().await;
        let Some(server) = nbd.as_ref() else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        server
            .remove_export(id, mode)
            .await
            .map_err(|e| QmpError::generic(e.to_string()))?;
        self.export_deleted(id);
        Ok(())
    }

    /// `query-block-exports`.
    pub async fn exports(&self) -> Vec<Value> {
        let nbd = self.nbd.lock().await;
        let Some(server) = nbd.as_ref() else {
            return Vec::new();
        };
        server
            .exports()
            .iter()
            .map(|e| {
                json!({
                    "type": "nbd",
                    "id": e.options().id,
                    "node-name": e.node().map(|n| n.name().to_owned()).unwrap_or_default(),
                    "shutting-down": false,
                })
            })
            .collect()
    }

    // ---- objects ---------------------------------------------------------

    /// `object-add` / `--object`.
    pub fn object_add(&self, args: &ObjectArgs) -> Result<(), QmpError> {
        let mut props = qapi::Object::nested(&Value::Object(args.props.clone()), "", args.keyval)?;
        let mut throttle = None;
        let mut tls = None;
        let mut identity = None;
        match args.qom_type.as_str() {
            "authz-simple" => {
                identity = Some(props.req_str("identity")?);
            }
            "tls-creds-x509" => {
                let dir = props.opt_str("dir")?;
                let server = props
                    .opt_enum("endpoint", &[("server", true), ("client", false)])?
                    .unwrap_or(false);
                let verify_peer = props.opt_bool("verify-peer")?.unwrap_or(true);
                props.opt_str("priority")?;
                props.opt_str("passwordid")?;
                props.opt_bool("loaded")?;
                props.opt_bool("sanity-check")?;
                let Some(dir) = dir else {
                    return Err(QmpError::generic(
                        "Unable to access credentials: the 'dir' property is missing",
                    ));
                };
                let path = std::path::Path::new(&dir);
                let tls_error = |e: nbd::Error| QmpError::generic(e.to_string());
                let (server_creds, client_creds) = if server {
                    let creds = nbd::tls::ServerTls::load(path, verify_peer).map_err(tls_error)?;
                    (Some(creds), None)
                } else {
                    (
                        None,
                        Some(nbd::tls::ClientTls::load(path).map_err(tls_error)?),
                    )
                };
                tls = Some((
                    TlsCreds {
                        server: server_creds,
                    },
                    client_creds,
                ));
            }
            // Accepted and mapped onto the runtime's threads: every node is
            // served by all of them.
            "iothread" => {
                props.opt_i64("poll-max-ns")?;
                props.opt_i64("poll-grow")?;
                props.opt_i64("poll-shrink")?;
                props.opt_i64("aio-max-batch")?;
                props.opt_i64("thread-pool-min")?;
                props.opt_i64("thread-pool-max")?;
            }
            "throttle-group" => {
                let limits = match props.opt_object("limits")? {
                    Some(mut l) => {
                        let limits = ThrottleLimits::read(&mut l, "").map_err(qerr)?;
                        l.finish()?;
                        limits
                    }
                    None => ThrottleLimits::read(&mut props, "x-").map_err(qerr)?,
                };
                throttle = Some(limits);
            }
            other => {
                return Err(QmpError::generic(format!(
                    "object type '{other}' is not supported yet"
                )));
            }
        };
        props.finish()?;
        let mut objects = self.objects();
        if objects.iter().any(|o| o.id == args.id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                args.id
            )));
        }
        if let Some(limits) = throttle {
            self.graph.add_throttle_group(&args.id, limits);
        }
        let tls = tls.map(|(creds, client)| {
            self.nbd_nodes.add_creds(&args.id, client);
            creds
        });
        objects.push(QomObject {
            id: args.id.clone(),
            tls,
            identity,
        });
        Ok(())
    }

    /// The server credentials of `tls-creds-x509` object `id`, with QEMU's
    /// words when there are none.
    fn server_tls(&self, id: &str) -> Result<nbd::tls::ServerTls, QmpError> {
        let objects = self.objects();
        let Some(object) = objects.iter().find(|o| o.id == id) else {
            return Err(QmpError::generic(format!(
                "No TLS credentials with id '{id}'"
            )));
        };
        let Some(creds) = &object.tls else {
            return Err(QmpError::generic(format!(
                "Object with id '{id}' is not TLS credentials"
            )));
        };
        creds
            .server
            .clone()
            .ok_or_else(|| QmpError::generic("Expecting TLS credentials with a server endpoint"))
    }

    /// `object-del`.
    pub fn object_del(&self, id: &str) -> Result<(), QmpError> {
        let mut objects = self.objects();
        if objects.iter().any(|o| o.id == id) {
            self.graph.remove_throttle_group(id).map_err(qerr)?;
        }
        let before = objects.len();
        objects.retain(|o| o.id != id);
        self.nbd_nodes.remove_creds(id);
        if objects.len() == before {
            return Err(QmpError::generic(format!("object '{id}' not found")));
        }
        Ok(())
    }
}

/// A block-layer error as QMP reports it.
pub fn qerr(e: block::Error) -> QmpError {
    QmpError::generic(e.to_string())
}

/// Removes `server`'s exports, newest first (QEMU's order), each with its
/// `BLOCK_EXPORT_DELETED`.
async fn remove_all(daemon: &Daemon, server: &Server) {
    for export in server.exports().into_iter().rev() {
        let id = export.options().id.clone();
        match server.remove_export(&id, RemoveMode::Hard).await {
            Ok(()) => daemon.export_deleted(&id),
            Err(e) => tracing::error!(export = id, "removing the export failed: {e}"),
        }
    }
}

fn write_pidfile(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id()))
}
