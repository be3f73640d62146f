//! The write gate of a node: how a job cuts a node over to its replacement
//! without losing a write (mirror's pivot; QEMU's drained section).
//!
//! Every write-type request passes the gate on its way in and holds an
//! entry while it runs. [`Gate::close`] stops new entries and waits for
//! the ones inside; the job then copies what remains and points the
//! node's users at the replacement. When the gate reopens, writes that
//! were held go to the replacement, if one was named, instead of the node
//! they first reached.
//!
//! Closes nest: a transaction holds the writes of its nodes while an
//! action in it (a backup's start) closes and reopens the gate again; the
//! gate opens when the last closer reopens it.
//!
//! Entering an open gate costs two atomic operations and a load (no
//! waiter list is touched unless the gate is closed): the pair
//! (`active` increment, `closers` load) against (`closers` increment,
//! `active` load), all sequentially consistent, guarantees that a request
//! either sees the gate closed or is seen by the closer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::node::Node;

/// A node's write gate.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// How many holders keep the gate closed.
    closers: AtomicU64,
    active: AtomicU64,
    /// Wakes requests held at the closed gate.
    opened: Notify,
    /// Wakes the closer when the last request inside leaves.
    idle: Notify,
    /// Whether `replacement` is set: writes check this flag, not the lock.
    replaced: AtomicBool,
    replacement: Mutex<Option<Weak<Node>>>,
}

/// Where a write-type request goes.
enum Entry<'a> {
    /// Into this node; the request holds the entry while it runs.
    Here(Inside<'a>),
    /// To the node that replaced this one while the request was held.
    Forward(Arc<Node>),
}

/// A request inside the gate.
pub(crate) struct Inside<'a>(&'a Gate);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        if self.0.closers.load(Ordering::SeqCst) > 0 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Gate {
    /// Lets a write-type request in, holding it while the gate is closed.
    async fn enter(&self) -> Entry<'_> {
        loop {
            if let Some(inside) = self.try_enter() {
                return Entry::Here(inside);
            }
            // Closed: registered before the gate is looked at again, so an
            // `open` from then on wakes us, and one before it is seen.
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if self.closers.load(Ordering::SeqCst) != 0 {
                opened.await;
            }
            if let Some(node) = self.replacement() {
                return Entry::Forward(node);
            }
        }
    }

    /// Enters the gate if it is open; `None` (not inside) if it is closed.
    fn try_enter(&self) -> Option<Inside<'_>> {
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.closers.load(Ordering::SeqCst) == 0 {
            return Some(Inside(self));
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.idle.notify_waiters();
        None
    }

    /// Lets a write-type request into this node at once: `None` when the
    /// gate is closed or a replacement was ever named (the request then
    /// takes [`pass`](Self::pass), which waits or forwards it).
    pub(crate) fn try_pass(&self) -> Option<Inside<'_>> {
        if self.replaced.load(Ordering::SeqCst) {
            return None;
        }
        self.try_enter()
    }

    /// Where a write-type request runs: inside this node, holding the entry
    /// (see [`enter`](Self::enter)), or, as `Err`, at the node that replaced
    /// this one, before or while the request was held.
    pub(crate) async fn pass(&self) -> Result<Inside<'_>, Arc<Node>> {
        if let Some(node) = self.replacement() {
            return Err(node);
        }
        match self.enter().await {
            Entry::Here(inside) => Ok(inside),
            Entry::Forward(node) => Err(node),
        }
    }

    /// Closes the gate and waits until no write-type request is inside.
    pub(crate) async fn close(&self) {
        self.closers.fetch_add(1, Ordering::SeqCst);
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Reopens the gate (once every closer has); held and later writes go
    /// to `replacement` when one is given.
    pub(crate) fn open(&self, replacement: Option<&Arc<Node>>) {
        if let Some(node) = replacement {
            *self.replacement.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Arc::downgrade(node));
            self.replaced.store(true, Ordering::SeqCst);
        }
        let was = self
            .closers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .unwrap_or(0);
        if was <= 1 {
            self.opened.notify_waiters();
        }
    }

    /// The node that replaced this one, if any (one atomic load when none
    /// did).
    pub(crate) fn replacement(&self) -> Option<Arc<Node>> {
        if !self.replaced.load(Ordering::SeqCst) {
            return None;
        }
        self.replacement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }
}
