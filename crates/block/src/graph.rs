//! The graph of named nodes: adding (`blockdev-add`), finding, deleting
//! (`blockdev-del`) and replacing nodes.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::drivers::{FileDriver, NullDriver, QCOW2_MAGIC, Qcow2Driver, RawDriver, ThrottleDriver};
use crate::error::{Error, Result};
use crate::node::{BoxFuture, ChildRole, Driver, Edge, Node, Settings, User};
use crate::options::{
    Aio, BlockdevOptions, ChildRef, DriverOptions, check_node_name, check_node_name_length,
};
use crate::throttle::{ThrottleGroup, ThrottleLimits};

#[derive(Debug, Default)]
struct Inner {
    /// Newest first, as QEMU lists them.
    nodes: Vec<Arc<Node>>,
    /// For naming inline children `#blockNNN`.
    implicit_counter: u64,
}

impl Inner {
    fn find(&self, name: &str) -> Option<&Arc<Node>> {
        self.nodes.iter().find(|n| n.name() == name)
    }
}

/// All nodes of a daemon. Cheap to share behind an `Arc`. Lookups, removal
/// and replacement lock briefly and never wait for I/O; [`add`](Self::add)
/// is async, because opening a driver may read (a format's header) or
/// connect (a network client), and adds run one at a time.
#[derive(Debug, Default)]
pub struct Graph {
    inner: Mutex<Inner>,
    adding: tokio::sync::Mutex<()>,
    factories: Mutex<Factories>,
    throttle_groups: Mutex<Vec<Arc<ThrottleGroup>>>,
}

/// Opens the nodes of a driver that lives outside this crate (the NBD
/// client lives in the `nbd` crate, which depends on this one).
pub trait DriverFactory: Send + Sync {
    /// Opens node `node` with `options` (whose driver is this factory's).
    /// Returns the driver and whether the node must be read-only (e.g. the
    /// peer only allows reading).
    fn open<'a>(
        &'a self,
        node: &'a str,
        options: &'a BlockdevOptions,
    ) -> BoxFuture<'a, Result<(Box<dyn Driver>, bool)>>;
}

#[derive(Default)]
struct Factories(Vec<(&'static str, Arc<dyn DriverFactory>)>);

impl std::fmt::Debug for Factories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Graph {
        Graph::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets nodes of driver `name` be opened by `factory` (replacing an
    /// earlier registration).
    pub fn register_driver(&self, name: &'static str, factory: Arc<dyn DriverFactory>) {
        let mut f = self.factories.lock().unwrap_or_else(|e| e.into_inner());
        f.0.retain(|(n, _)| *n != name);
        f.0.push((name, factory));
    }

    /// Adds throttle group `name` (the `throttle-group` object), which
    /// `throttle` nodes can then name.
    pub fn add_throttle_group(&self, name: &str, limits: ThrottleLimits) -> Arc<ThrottleGroup> {
        let group = Arc::new(ThrottleGroup::new(name, limits));
        self.groups().push(group.clone());
        group
    }

    /// The throttle group called `name`.
    pub fn throttle_group(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.groups().iter().find(|g| g.name() == name).cloned()
    }

    /// Removes throttle group `name`; refused while a node uses it.
    /// Returns whether there was one.
    pub fn remove_throttle_group(&self, name: &str) -> Result<bool> {
        let mut groups = self.groups();
        let Some(pos) = groups.iter().position(|g| g.name() == name) else {
            return Ok(false);
        };
        if Arc::strong_count(&groups[pos]) > 1 {
            return Err(Error::ThrottleGroupInUse(name.to_owned()));
        }
        groups.remove(pos);
        Ok(true)
    }

    fn groups(&self) -> MutexGuard<'_, Vec<Arc<ThrottleGroup>>> {
        self.throttle_groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn factory(&self, name: &'static str) -> Result<Arc<dyn DriverFactory>> {
        let f = self.factories.lock().unwrap_or_else(|e| e.into_inner());
        f.0.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f.clone())
            .ok_or(Error::DriverUnavailable(name))
    }

    /// Opens a node and its inline children (`blockdev-add`). The root must
    /// be named. On error nothing is added.
    pub async fn add(&self, options: &BlockdevOptions) -> Result<Arc<Node>> {
        if options.node_name.is_none() {
            return Err(Error::NodeNameMissing);
        }
        let _one_at_a_time = self.adding.lock().await;
        let mut created = Vec::new();
        let node = self.open(options, false, &mut created).await?;
        let mut inner = self.lock();
        // Children first in `created`; newest first in the list.
        for n in created {
            inner.nodes.insert(0, n);
        }
        Ok(node)
    }

    /// Opens a node that a job made rather than the user (`drive-mirror`'s
    /// target): named as asked, or `#blockNNN` — then, as QEMU's, not
    /// deletable with `blockdev-del` ("not owned by the monitor"); its job
    /// takes it away with [`remove_unused`](Self::remove_unused).
    pub async fn add_for_job(&self, options: &BlockdevOptions) -> Result<Arc<Node>> {
        let _one_at_a_time = self.adding.lock().await;
        let mut created = Vec::new();
        let implicit = options.node_name.is_none();
        let node = self.open(options, implicit, &mut created).await?;
        let mut inner = self.lock();
        for n in created {
            inner.nodes.insert(0, n);
        }
        Ok(node)
    }

    /// Takes `node` and its inline children out of the graph and closes
    /// them, if nothing uses it any more (a job's target it did not pivot
    /// to). Returns whether it did.
    pub async fn remove_unused(&self, node: &Arc<Node>) -> bool {
        let doomed = {
            let mut inner = self.lock();
            if !node.users().is_empty() || !inner.nodes.iter().any(|n| Arc::ptr_eq(n, node)) {
                return false;
            }
            let mut doomed = vec![node.clone()];
            let mut i = 0;
            while i < doomed.len() {
                let n = doomed[i].clone();
                inner.nodes.retain(|m| !Arc::ptr_eq(m, &n));
                for (_, edge) in n.children() {
                    let child = edge.node();
                    if child.is_implicit() && child.users().len() == 1 {
                        doomed.push(child);
                    }
                }
                i += 1;
            }
            doomed
        };
        for n in doomed {
            if let Err(e) = n.close().await {
                tracing::error!(node = n.name(), "closing the node failed: {e}");
            }
        }
        true
    }

    /// The name `options` asks for, checked, or a new `#blockNNN` one.
    fn claim_name(&self, options: &BlockdevOptions, created: &[Arc<Node>]) -> Result<String> {
        let mut inner = self.lock();
        match &options.node_name {
            Some(name) => {
                check_node_name(name)?;
                let taken = inner.find(name).is_some() || created.iter().any(|n| n.name() == name);
                if taken {
                    return Err(Error::DuplicateNode(name.clone()));
                }
                check_node_name_length(name)?;
                Ok(name.clone())
            }
            None => {
                inner.implicit_counter += 1;
                Ok(format!("#block{:03}", inner.implicit_counter))
            }
        }
    }

    /// Opens or finds the child `child` of node `parent` and attaches it.
    /// Inline children take the options they leave out from `options`.
    fn open_child<'a>(
        &'a self,
        child: &'a ChildRef,
        options: &'a BlockdevOptions,
        parent: &'a str,
        role: ChildRole,
        created: &'a mut Vec<Arc<Node>>,
    ) -> BoxFuture<'a, Result<Arc<Edge>>> {
        Box::pin(async move {
            let user = User::Parent {
                parent: parent.to_owned(),
                role,
            };
            match child {
                // The edge is made under the lookup's lock, so that a
                // concurrent `remove` sees the child in use.
                ChildRef::Reference(name) => {
                    let inner = self.lock();
                    let node = inner
                        .find(name)
                        .ok_or_else(|| Error::NodeNotFound(name.clone()))?;
                    Ok(Edge::new(node, user))
                }
                ChildRef::Inline(child_options) => {
                    let mut child_options = (**child_options).clone();
                    child_options.inherit_from(options);
                    let implicit = child_options.node_name.is_none();
                    let node = self.open(&child_options, implicit, created).await?;
                    Ok(Edge::new(&node, user))
                }
            }
        })
    }

    /// Opens `options` and its inline children, pushing every new node
    /// (children before parents) to `created`; registers none of them.
    fn open<'a>(
        &'a self,
        options: &'a BlockdevOptions,
        implicit: bool,
        created: &'a mut Vec<Arc<Node>>,
    ) -> BoxFuture<'a, Result<Arc<Node>>> {
        Box::pin(async move {
            let name = self.claim_name(options, created)?;
            let mut read_only = options.read_only;
            let mut children = Vec::new();
            let mut loaded = Vec::new();
            let driver: Box<dyn Driver> = match &options.driver {
                DriverOptions::NullCo { size, read_zeroes } => {
                    Box::new(NullDriver::new(*size, *read_zeroes))
                }
                DriverOptions::Nbd { .. } | DriverOptions::Rbd { .. } => {
                    let factory = self.factory(options.driver.name())?;
                    let (driver, ro) = factory.open(&name, options).await?;
                    read_only |= ro;
                    loaded = driver.load_bitmaps().await?;
                    driver
                }
                DriverOptions::File { filename, aio } => {
                    let (driver, ro) = FileDriver::open(
                        filename,
                        options.read_only,
                        options.auto_read_only,
                        options.cache_direct,
                        *aio,
                    )?;
                    read_only = ro;
                    Box::new(driver)
                }
                DriverOptions::Throttle { file, group } => {
                    let group = self
                        .throttle_group(group)
                        .ok_or_else(|| Error::NoThrottleGroup(group.clone()))?;
                    let edge = self
                        .open_child(file, options, &name, ChildRole::File, created)
                        .await?;
                    read_only |= edge.node().is_read_only();
                    children.push((ChildRole::File, edge.clone()));
                    Box::new(ThrottleDriver::new(edge, group))
                }
                DriverOptions::Raw { file, offset, size } => {
                    let edge = self
                        .open_child(file, options, &name, ChildRole::File, created)
                        .await?;
                    children.push((ChildRole::File, edge.clone()));
                    let driver = RawDriver::new(&name, edge, *offset, *size, !read_only)?;
                    loaded = driver.load_bitmaps().await?;
                    Box::new(driver)
                }
                DriverOptions::Qcow2 {
                    file,
                    backing,
                    l2_cache_size,
                    backing_protocols,
                } => {
                    let edge = self
                        .open_child(file, options, &name, ChildRole::File, created)
                        .await?;
                    children.push((ChildRole::File, edge.clone()));
                    let file_read_only = edge.node().is_read_only();
                    if file_read_only && !read_only && !options.auto_read_only {
                        return Err(Error::ReadOnly(edge.node().name().to_owned()));
                    }
                    read_only |= file_read_only;
                    let mut driver =
                        Qcow2Driver::open(&name, edge.clone(), !read_only, *l2_cache_size).await?;
                    loaded = driver.load_bitmaps().await?;
                    let backing = match backing {
                        Some(child) => child.clone(),
                        None => match driver.backing_file() {
                            Some((file_name, format)) => Some(backing_from_header(
                                &name,
                                &edge,
                                file_name,
                                format,
                                *backing_protocols,
                            )?),
                            None => None,
                        },
                    };
                    if let Some(child) = backing {
                        let edge = self
                            .open_child(&child, options, &name, ChildRole::Backing, created)
                            .await?;
                        children.push((ChildRole::Backing, edge.clone()));
                        driver.set_backing(edge);
                    }
                    Box::new(driver)
                }
            };
            let settings = Settings {
                read_only,
                discard: options.discard,
                detect_zeroes: options.detect_zeroes,
                direct: options.cache_direct,
                no_flush: options.cache_no_flush,
            };
            let node = Arc::new(Node::new(name, implicit, settings, driver, children));
            for (bitmap, bits, state) in loaded {
                node.bitmaps().add_loaded(&bitmap, bits, state)?;
            }
            created.push(node.clone());
            Ok(node)
        })
    }

    /// The node called `name`, or QEMU's "Cannot find device=… nor
    /// node-name=…" error.
    pub fn get(&self, name: &str) -> Result<Arc<Node>> {
        self.find(name)
            .ok_or_else(|| Error::NodeNotFound(name.to_owned()))
    }

    /// The node called `name`, if any.
    pub fn find(&self, name: &str) -> Option<Arc<Node>> {
        self.lock().find(name).cloned()
    }

    /// All nodes, newest first.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.lock().nodes.clone()
    }

    /// Deletes a node added with [`add`](Self::add) (`blockdev-del`), with
    /// its inline children. Refused while an export or job uses it, while
    /// another node has it as a child, or for inline children themselves.
    /// Each removed node is closed (its driver writes back what it caches);
    /// a failure there is logged, as QEMU does, since the node is gone.
    pub async fn remove(&self, name: &str) -> Result<()> {
        for node in self.unlink(name)? {
            if let Err(e) = node.close().await {
                tracing::error!(node = node.name(), "closing the node failed: {e}");
            }
        }
        Ok(())
    }

    /// Takes `name` and its inline children out of the graph; them, parents
    /// first.
    fn unlink(&self, name: &str) -> Result<Vec<Arc<Node>>> {
        let mut inner = self.lock();
        let node = inner
            .find(name)
            .cloned()
            .ok_or_else(|| Error::NoSuchNodeToDelete(name.to_owned()))?;
        let users = node.users();
        if users
            .iter()
            .any(|e| matches!(e.user(), User::Export(_) | User::Job(_)))
        {
            return Err(Error::NodeInUse(name.to_owned()));
        }
        if node.is_implicit() {
            return Err(Error::NodeNotOwned(name.to_owned()));
        }
        if !users.is_empty() {
            return Err(Error::NodeHasParents(name.to_owned()));
        }
        let mut doomed = vec![node];
        let mut removed = Vec::new();
        while let Some(n) = doomed.pop() {
            inner.nodes.retain(|m| !Arc::ptr_eq(m, &n));
            removed.push(n.clone());
            for (_, edge) in n.children() {
                let child = edge.node();
                // Inline children die with their parent unless someone else
                // took them over meanwhile.
                if child.is_implicit() && child.users().len() == 1 {
                    doomed.push(child);
                }
            }
        }
        Ok(removed)
    }

    /// Closes every node, parents before their children, and empties the
    /// graph: what the daemon does when it exits. The first failure, after
    /// trying them all.
    pub async fn close_all(&self) -> Result<()> {
        let nodes = std::mem::take(&mut self.lock().nodes);
        let mut first_error = None;
        // Newest first: a node is always newer than its children.
        for node in nodes {
            if let Err(e) = node.close().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Moves every user of `from` (parents, exports, jobs) to `to`: mirror's
    /// pivot. Edges from `to` itself (e.g. `to` backed by `from`) stay, so no
    /// cycle forms. The caller drains `from` first if it needs a quiet cut.
    pub fn replace(&self, from: &Arc<Node>, to: &Arc<Node>) -> Result<()> {
        if Arc::ptr_eq(from, to) {
            return Err(Error::CannotReplace {
                from: from.name().to_owned(),
                to: to.name().to_owned(),
                reason: "a node cannot replace itself",
            });
        }
        let _inner = self.lock();
        let mut moved = Vec::new();
        let mut kept = Vec::new();
        for weak in from.take_parents() {
            let Some(edge) = weak.upgrade() else {
                continue;
            };
            let from_to = matches!(edge.user(), User::Parent { parent, .. } if parent == to.name());
            if from_to {
                kept.push(weak);
            } else {
                edge.point_at(to);
                moved.push(weak);
            }
        }
        from.adopt_parents(kept);
        to.adopt_parents(moved);
        Ok(())
    }
}

/// Whether a backing name from an image header is more than a file name:
/// `json:{…}` options, or a protocol (`nbd:…`, `rbd:…`, `file:…`; QEMU's
/// rule: a colon before any slash). What it is, if so.
fn special_backing_name(name: &str) -> Option<&'static str> {
    if name.starts_with("json:") {
        return Some("json: description");
    }
    let colon = name.find(':')?;
    let prefix = &name[..colon];
    let protocol = !prefix.is_empty()
        && !prefix.contains('/')
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_'));
    protocol.then_some("protocol name")
}

/// The backing child a qcow2 image names in its header, as QEMU resolves
/// it: a relative name is relative to the image's directory; the format is
/// the header's, or probed (qcow2 magic, else raw). It opens read-only.
/// `json:` and protocol names (`nbd:…`, `nbd://…`, `nbd+unix://…`,
/// `file:…`) only with `protocols` (the node's `x-backing-protocols`): a
/// guest may have written the header, and such a name could make us open
/// any host file or reach any server.
fn backing_from_header(
    node: &str,
    file: &Arc<Edge>,
    name: &str,
    format: Option<&str>,
    protocols: bool,
) -> Result<ChildRef> {
    let bad = |reason: String| Error::BadImage {
        node: node.to_owned(),
        format: "qcow2",
        reason,
    };
    let mut name = name;
    let mut protocol_file = None;
    if let Some(kind) = special_backing_name(name) {
        if !protocols {
            return Err(bad(format!(
                "its backing file name '{name}' is a {kind}, which bitmirror refuses to open \
                 from an image header unless the node has x-backing-protocols=on (see \
                 docs/security.md); or give the backing node in the options"
            )));
        }
        if let Some(json) = name.strip_prefix("json:") {
            let value: serde_json::Value = serde_json::from_str(json)
                .map_err(|e| bad(format!("its json: backing file name does not parse: {e}")))?;
            let mut options = BlockdevOptions::from_json(&value)?;
            options.read_only = true;
            options.explicit.read_only = true;
            return Ok(ChildRef::Inline(Box::new(options)));
        }
        if let Some(path) = name.strip_prefix("file:") {
            name = path;
        } else if let Some(nbd) = crate::options::nbd_filename(name) {
            protocol_file = Some(BlockdevOptions::from_json(&nbd)?);
        } else if name.starts_with("rbd:") {
            let rbd = crate::options::rbd_filename(name).ok_or_else(|| {
                bad(format!(
                    "its backing file name '{name}' is not a well-formed RBD name \
                     (rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:KEY=VALUE…])"
                ))
            })?;
            // A header's librados settings could make the daemon write files
            // or talk to other monitors (log_file, admin_socket, keyring):
            // only those that say how to reach the cluster pass.
            if let Some((key, _)) = rbd
                .conf_pairs
                .iter()
                .find(|(k, _)| !HEADER_RBD_SETTINGS.contains(&k.as_str()))
            {
                return Err(bad(format!(
                    "its backing file name sets the librados option '{key}', which bitmirror \
                     does not take from an image header (allowed: {})",
                    HEADER_RBD_SETTINGS.join(", ")
                )));
            }
            protocol_file = Some(BlockdevOptions::new(None, DriverOptions::Rbd(rbd)));
        } else {
            let protocol = name.split(':').next().unwrap_or(name);
            return Err(Error::UnsupportedFeature {
                node: node.to_owned(),
                feature: format!("a backing file over protocol '{protocol}'"),
            });
        }
    }
    let (file, format) = match protocol_file {
        Some(protocol) => (
            ChildRef::Inline(Box::new(protocol)),
            format.unwrap_or("raw").to_owned(),
        ),
        None => {
            let path = std::path::Path::new(name);
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                let image = file.node();
                let dir = image
                    .filename()
                    .and_then(|f| std::path::Path::new(f).parent().map(|p| p.to_path_buf()))
                    .ok_or_else(|| {
                        bad(format!("cannot resolve the relative backing file '{name}'"))
                    })?;
                dir.join(path)
            };
            let filename = path.to_string_lossy().into_owned();
            let format = match format {
                Some(f) => f.to_owned(),
                None => probe_format(&filename),
            };
            let file = ChildRef::Inline(Box::new(BlockdevOptions::new(
                None,
                DriverOptions::File {
                    filename,
                    aio: Aio::Threads,
                },
            )));
            (file, format)
        }
    };
    let driver = match format.as_str() {
        "raw" => DriverOptions::Raw {
            file,
            offset: 0,
            size: None,
        },
        "qcow2" => DriverOptions::Qcow2 {
            file,
            backing: None,
            l2_cache_size: None,
            backing_protocols: false,
        },
        other => {
            return Err(Error::UnsupportedFeature {
                node: node.to_owned(),
                feature: format!("a backing file in format '{other}'"),
            });
        }
    };
    let mut options = BlockdevOptions::new(None, driver);
    options.read_only = true;
    options.explicit.read_only = true;
    Ok(ChildRef::Inline(Box::new(options)))
}

/// The librados settings an `rbd:` backing name in an image header may set
/// (besides `conf` and `id`).
const HEADER_RBD_SETTINGS: &[&str] = &[
    "mon_host",
    "mon_addr",
    "auth_client_required",
    "auth_supported",
    "client_mount_timeout",
    "rbd_cache",
];

/// `qcow2` if the file starts with the qcow2 magic, else `raw`.
fn probe_format(path: &str) -> String {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && u32::from_be_bytes(magic) == QCOW2_MAGIC;
    if is_qcow2 { "qcow2" } else { "raw" }.to_owned()
}
