//! An export: a node published under a name, with the metadata contexts it
//! offers and the clients connected to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use block::{BitmapId, ChildRole, Edge, Node, User};
use tokio::sync::{Notify, watch};

use crate::error::{Error, Result};
use crate::proto::{ALLOCATION_DEPTH, BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, MAX_STRING, tflag};

/// What `block-export-add` says about an NBD export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// The export's id (QEMU's `id`), unique on the server.
    pub id: String,
    /// The name clients ask for (QEMU's `name`; defaults to the node name).
    pub name: String,
    /// A human-readable description sent to clients that ask.
    pub description: Option<String>,
    /// Whether clients may write.
    pub writable: bool,
    /// Bitmaps published as `qemu:dirty-bitmap:NAME`, found on the node or
    /// down its backing chain.
    pub bitmaps: Vec<String>,
    /// Whether `qemu:allocation-depth` is published.
    pub allocation_depth: bool,
}

/// A published bitmap: where it lives, and the context name clients use.
#[derive(Debug)]
pub(crate) struct Published {
    pub name: String,
    pub node: Arc<Node>,
    pub id: BitmapId,
}

/// The metadata contexts of an export, by id: 0 is `base:allocation`, 1 is
/// `qemu:allocation-depth`, 2 + i is the i-th published bitmap (QEMU's
/// numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Context {
    BaseAllocation,
    AllocationDepth,
    Bitmap(usize),
}

impl Context {
    pub fn id(self) -> u32 {
        match self {
            Context::BaseAllocation => 0,
            Context::AllocationDepth => 1,
            Context::Bitmap(i) => 2 + i as u32,
        }
    }
}

/// A node published on the server. Lives until removed; while it lives, its
/// node cannot be deleted and its bitmaps are busy.
#[derive(Debug)]
pub struct Export {
    options: ExportOptions,
    /// Taken when the export is released.
    edge: RwLock<Option<Arc<Edge>>>,
    pub(crate) bitmaps: Vec<Published>,
    clients: Mutex<HashMap<u64, watch::Sender<bool>>>,
    next_client: AtomicU64,
    gone: Notify,
    removed: AtomicBool,
}

impl Export {
    /// Publishes `node` as `options` say, marking its bitmaps busy. QEMU's
    /// rules: every bitmap must exist on the node or down its backing chain
    /// and be usable; an enabled bitmap cannot go on a read-only export of
    /// a writable node.
    pub(crate) fn new(node: &Arc<Node>, options: ExportOptions) -> Result<Export> {
        if options.name.len() > MAX_STRING {
            return Err(Error::ExportNameTooLong(options.name));
        }
        if let Some(d) = options
            .description
            .as_ref()
            .filter(|d| d.len() > MAX_STRING)
        {
            return Err(Error::DescriptionTooLong(d.clone()));
        }
        if options.writable && node.is_read_only() {
            return Err(Error::ReadOnlyNode);
        }
        let mut names: Vec<&String> = Vec::new();
        for b in &options.bitmaps {
            if !names.contains(&b) {
                names.push(b);
            }
        }
        let mut found = Vec::new();
        for name in names {
            let holder =
                find_bitmap(node, name).ok_or_else(|| Error::BitmapNotFound(name.clone()))?;
            let bitmaps = holder.bitmaps();
            bitmaps.check(name, block::Check::AllowReadonly)?;
            let enabled = bitmaps
                .info()
                .iter()
                .any(|i| &i.name == name && i.recording);
            if !options.writable && !node.is_read_only() && enabled {
                return Err(Error::EnabledBitmapReadonly(name.clone()));
            }
            found.push(Published {
                name: name.clone(),
                id: bitmaps.id(name)?,
                node: holder,
            });
        }
        for (i, p) in found.iter().enumerate() {
            if let Err(e) = p.node.bitmaps().set_busy(&p.name, true) {
                for q in &found[..i] {
                    let _ = q.node.bitmaps().set_busy(&q.name, false);
                }
                return Err(e.into());
            }
        }
        Ok(Export {
            edge: RwLock::new(Some(Edge::new(node, User::Export(options.id.clone())))),
            options,
            bitmaps: found,
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
            gone: Notify::new(),
            removed: AtomicBool::new(false),
        })
    }

    /// The options it was made with.
    pub fn options(&self) -> &ExportOptions {
        &self.options
    }

    /// The node served now (an export follows its edge when a job pivots);
    /// `None` once the export is released.
    pub fn node(&self) -> Option<Arc<Node>> {
        let edge = self.edge.read().unwrap_or_else(|e| e.into_inner());
        edge.as_ref().map(|e| e.node())
    }

    /// Runs `f` with the node served now, which stays served until `f`
    /// returns (a release waits; other connections' lookups do not): for
    /// short synchronous work, with no reference count taken. `None` (`f`
    /// not run) once the export is released.
    pub(crate) fn with_node<T>(&self, f: impl FnOnce(&Node) -> T) -> Option<T> {
        let edge = self.edge.read().unwrap_or_else(|e| e.into_inner());
        edge.as_ref().map(|e| e.with_node(f))
    }

    /// Lets go of the node and the bitmaps (once; later calls do nothing, so
    /// a bitmap a job took meanwhile stays busy).
    pub(crate) fn release(&self) {
        let edge = self.edge.write().unwrap_or_else(|e| e.into_inner()).take();
        if edge.is_some() {
            for p in &self.bitmaps {
                let _ = p.node.bitmaps().set_busy(&p.name, false);
            }
        }
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.lock_clients().len()
    }

    /// The transmission flags clients see.
    pub(crate) fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::SEND_CACHE
            | tflag::CAN_MULTI_CONN;
        if structured {
            f |= tflag::SEND_DF;
        }
        if self.options.writable {
            f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
        } else {
            f |= tflag::READ_ONLY;
        }
        f
    }

    /// Every context the export offers, in id order.
    pub(crate) fn contexts(&self) -> Vec<Context> {
        let mut v = vec![Context::BaseAllocation];
        if self.options.allocation_depth {
            v.push(Context::AllocationDepth);
        }
        v.extend((0..self.bitmaps.len()).map(Context::Bitmap));
        v
    }

    /// The name of a context.
    pub(crate) fn context_name(&self, c: Context) -> String {
        match c {
            Context::BaseAllocation => BASE_ALLOCATION.to_owned(),
            Context::AllocationDepth => ALLOCATION_DEPTH.to_owned(),
            Context::Bitmap(i) => format!("{DIRTY_BITMAP_PREFIX}{}", self.bitmaps[i].name),
        }
    }

    /// The contexts a query selects (QEMU's matching): a full name selects
    /// that context; a bare namespace (`base:`, `qemu:`,
    /// `qemu:dirty-bitmap:`) selects all of it when listing and nothing
    /// when setting.
    pub(crate) fn query(&self, query: &str, listing: bool) -> Vec<Context> {
        let all = self.contexts();
        let bitmaps = || {
            all.iter()
                .copied()
                .filter(|c| matches!(c, Context::Bitmap(_)))
        };
        match query {
            "base:" if listing => vec![Context::BaseAllocation],
            "qemu:" if listing => all
                .iter()
                .copied()
                .filter(|c| *c != Context::BaseAllocation)
                .collect(),
            DIRTY_BITMAP_PREFIX if listing => bitmaps().collect(),
            q => all
                .iter()
                .copied()
                .filter(|c| self.context_name(*c) == q)
                .collect(),
        }
    }

    fn lock_clients(&self) -> MutexGuard<'_, HashMap<u64, watch::Sender<bool>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a client; the receiver turns true when it must close.
    /// `None` once the export is being removed.
    pub(crate) fn attach(&self) -> Option<(u64, watch::Receiver<bool>)> {
        let mut clients = self.lock_clients();
        if self.removed.load(Ordering::Acquire) {
            return None;
        }
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        clients.insert(id, tx);
        Some((id, rx))
    }

    /// Deregisters a client whose connection has ended.
    pub(crate) fn detach(&self, id: u64) {
        let mut clients = self.lock_clients();
        clients.remove(&id);
        if clients.is_empty() {
            self.gone.notify_waiters();
        }
    }

    /// Stops taking clients. Safe mode refuses while any is connected;
    /// hard mode tells every client to close and waits until all have
    /// (their requests in flight finish first).
    pub(crate) async fn shut_down(&self, hard: bool) -> Result<()> {
        {
            let clients = self.lock_clients();
            if !hard && !clients.is_empty() {
                return Err(Error::ExportInUse(self.options.id.clone()));
            }
            self.removed.store(true, Ordering::Release);
            for tx in clients.values() {
                let _ = tx.send(true);
            }
        }
        loop {
            let gone = self.gone.notified();
            if self.lock_clients().is_empty() {
                break;
            }
            gone.await;
        }
        Ok(())
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.release();
    }
}

/// The node holding bitmap `name`: `node` itself or one down its chain of
/// backing files (and the `file` child of a `raw` node, which is what QEMU
/// treats as a filter).
fn find_bitmap(node: &Arc<Node>, name: &str) -> Option<Arc<Node>> {
    let mut cur = node.clone();
    loop {
        if cur.bitmaps().id(name).is_ok() {
            return Some(cur);
        }
        let next = cur.children().iter().find_map(|(role, edge)| {
            let follow = *role == ChildRole::Backing
                || (*role == ChildRole::File && cur.driver_name() == "raw");
            follow.then(|| edge.node())
        })?;
        cur = next;
    }
}
