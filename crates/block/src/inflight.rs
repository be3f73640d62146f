//! In-flight request tracking: who is touching which bytes right now.
//!
//! Every request registers its range for its duration. Ordinary requests run
//! concurrently even when they overlap (as on a disk); a *serialising*
//! request (a read-modify-write of an unaligned write) waits for every
//! overlapping request and makes later overlapping ones wait for it, so no
//! write can slip between its read and its write. Jobs wait here for the
//! requests that overlap a range before they copy it.

use std::sync::Mutex;

use tokio::sync::Notify;

/// How a request interacts with overlapping ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    /// A read.
    Read,
    /// A write-type request.
    Write,
    /// A read-modify-write: excludes every overlapping request.
    Serialising,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    kind: RequestKind,
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    next_id: u64,
}

/// The requests in flight on one node.
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    state: Mutex<State>,
    changed: Notify,
}

/// Keeps a request registered until dropped.
pub(crate) struct Guard<'a> {
    inflight: &'a Inflight,
    id: u64,
}

impl Inflight {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request on `offset..offset + len`, first waiting for the
    /// overlapping requests it must not run beside.
    pub(crate) async fn begin(&self, offset: u64, len: u64, kind: RequestKind) -> Guard<'_> {
        let (start, end) = (offset, offset.saturating_add(len));
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.lock();
                let blocked = state.entries.iter().any(|e| {
                    e.start < end
                        && start < e.end
                        && (e.kind == RequestKind::Serialising || kind == RequestKind::Serialising)
                });
                if !blocked {
                    state.next_id += 1;
                    let id = state.next_id;
                    state.entries.push(Entry {
                        id,
                        start,
                        end,
                        kind,
                    });
                    return Guard { inflight: self, id };
                }
            }
            changed.await;
        }
    }

    /// Waits until no registered request overlaps `offset..offset + len`.
    pub(crate) async fn wait_idle(&self, offset: u64, len: u64) {
        let (start, end) = (offset, offset.saturating_add(len));
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self
                .lock()
                .entries
                .iter()
                .any(|e| e.start < end && start < e.end)
            {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let mut state = self.inflight.lock();
        if let Some(i) = state.entries.iter().position(|e| e.id == self.id) {
            state.entries.swap_remove(i);
        }
        drop(state);
        self.inflight.changed.notify_waiters();
    }
}
