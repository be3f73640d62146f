//! In-flight request tracking: who is touching which bytes right now.
//!
//! Every request registers its range for its duration. Ordinary requests run
//! concurrently even when they overlap (as on a disk); a *serialising*
//! request (a read-modify-write of an unaligned write) waits for every
//! overlapping request and makes later overlapping ones wait for it, so no
//! write can slip between its read and its write. Jobs wait here for the
//! requests that overlap a range before they copy it.

use std::pin::Pin;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

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
    /// Requests and waits parked until something ends: only then does an
    /// ending request wake anyone (the common case touches no `Notify`).
    waiters: usize,
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
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            let _waiting = {
                let mut state = self.lock();
                if let Some(guard) = self.register(&mut state, offset, len, kind) {
                    return guard;
                }
                self.park(&mut state, changed.as_mut())
            };
            changed.await;
        }
    }

    /// Registers a request on `offset..offset + len` if no overlapping
    /// request keeps it out; `None` (not registered) if one does.
    pub(crate) fn try_begin(&self, offset: u64, len: u64, kind: RequestKind) -> Option<Guard<'_>> {
        self.register(&mut self.lock(), offset, len, kind)
    }

    /// [`try_begin`](Self::try_begin) under the state lock.
    fn register(
        &self,
        state: &mut State,
        offset: u64,
        len: u64,
        kind: RequestKind,
    ) -> Option<Guard<'_>> {
        let (start, end) = (offset, offset.saturating_add(len));
        let blocked = state.entries.iter().any(|e| {
            e.start < end
                && start < e.end
                && (e.kind == RequestKind::Serialising || kind == RequestKind::Serialising)
        });
        if blocked {
            return None;
        }
        state.next_id += 1;
        let id = state.next_id;
        state.entries.push(Entry {
            id,
            start,
            end,
            kind,
        });
        Some(Guard { inflight: self, id })
    }

    /// Registers a wait for the next request to end, under the state lock
    /// the caller found its range blocked with: a request that ends after
    /// the lock is let go sees the count and wakes `changed`.
    fn park(&self, state: &mut State, changed: Pin<&mut Notified<'_>>) -> Waiting<'_> {
        changed.enable();
        state.waiters += 1;
        Waiting { inflight: self }
    }

    /// Waits until no registered request overlaps `offset..offset + len`.
    pub(crate) async fn wait_idle(&self, offset: u64, len: u64) {
        let (start, end) = (offset, offset.saturating_add(len));
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            let _waiting = {
                let mut state = self.lock();
                if !state.entries.iter().any(|e| e.start < end && start < e.end) {
                    return;
                }
                self.park(&mut state, changed.as_mut())
            };
            changed.await;
        }
    }
}

/// One parked wait, counted in [`State::waiters`] until dropped (woken or
/// cancelled).
struct Waiting<'a> {
    inflight: &'a Inflight,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.inflight.lock().waiters -= 1;
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let mut state = self.inflight.lock();
        if let Some(i) = state.entries.iter().position(|e| e.id == self.id) {
            state.entries.swap_remove(i);
        }
        let wake = state.waiters > 0;
        drop(state);
        if wake {
            self.inflight.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn a_serialising_request_waits_for_overlapping_ones_and_nothing_else() {
        let inflight = Inflight::default();
        let read = inflight
            .begin(0, 4096, RequestKind::Read)
            .now_or_never()
            .expect("nothing is in flight");
        // Elsewhere: no wait.
        let other = inflight
            .begin(8192, 4096, RequestKind::Serialising)
            .now_or_never()
            .expect("no overlap");
        drop(other);
        let mut rmw = Box::pin(inflight.begin(2048, 4096, RequestKind::Serialising));
        assert!(rmw.as_mut().now_or_never().is_none(), "the read overlaps");
        assert_eq!(inflight.lock().waiters, 1);
        drop(read);
        let rmw = rmw
            .as_mut()
            .now_or_never()
            .expect("woken once the read ended");
        assert_eq!(inflight.lock().waiters, 0);
        // Now it is the serialising one that keeps overlapping reads out.
        let mut late = Box::pin(inflight.begin(0, 4096, RequestKind::Read));
        assert!(late.as_mut().now_or_never().is_none());
        drop(rmw);
        assert!(late.as_mut().now_or_never().is_some());
    }

    #[test]
    fn waits_wake_all_together_and_a_cancelled_wait_is_not_counted() {
        let inflight = Inflight::default();
        let write = inflight
            .begin(0, 1 << 20, RequestKind::Write)
            .now_or_never()
            .expect("nothing is in flight");
        let mut idle = Box::pin(inflight.wait_idle(4096, 4096));
        let mut rmw = Box::pin(inflight.begin(0, 512, RequestKind::Serialising));
        let mut cancelled = Box::pin(inflight.wait_idle(0, 1));
        assert!(idle.as_mut().now_or_never().is_none());
        assert!(rmw.as_mut().now_or_never().is_none());
        assert!(cancelled.as_mut().now_or_never().is_none());
        assert_eq!(inflight.lock().waiters, 3);
        drop(cancelled);
        assert_eq!(inflight.lock().waiters, 2);
        drop(write);
        assert!(idle.as_mut().now_or_never().is_some());
        assert!(rmw.as_mut().now_or_never().is_some());
        assert_eq!(inflight.lock().waiters, 0);
    }
}
