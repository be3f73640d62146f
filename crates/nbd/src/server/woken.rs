//! [`Woken`]: a future polled again only once it asked to be.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Wraps a future so that, after its first poll, it is polled only once
/// its own waker has fired: the polls in between only note who to wake.
///
/// For a future that waits for something rare (the connection being told
/// to close) in a `select!` polled on every request: polling the wait
/// itself each time costs a lock per watched channel (a twelfth of the
/// connection's user time under random 4 KiB writes).
///
/// Guarantees the same output as the future it wraps, no later than the
/// poll that follows the inner future's wake-up.
pub(super) struct Woken<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
    /// The waker last registered in `flag` (compared, not re-registered,
    /// while the same task polls).
    registered: Option<Waker>,
}

/// Whether the inner future was woken since its last poll, and the
/// waker of whoever polls the wrapper.
struct Flag {
    woken: AtomicBool,
    outer: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.outer.wake();
    }
}

impl<F: Future> Woken<F> {
    /// `inner`, to be polled on the first poll and after each of its
    /// wake-ups.
    pub(super) fn new(inner: F) -> Woken<F> {
        Woken {
            inner: Box::pin(inner),
            flag: Arc::new(Flag {
                woken: AtomicBool::new(true),
                outer: AtomicWaker::new(),
            }),
            registered: None,
        }
    }
}

impl<F> Woken<F> {
    /// Whether the inner future was woken since its last poll (or was
    /// never polled): it may be ready, and the caller should poll before
    /// doing more.
    pub(super) fn woken(&self) -> bool {
        self.flag.woken.load(Ordering::Acquire)
    }
}

impl<F: Future> Future for Woken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let woken = self.flag.woken.swap(false, Ordering::AcqRel);
        // A wake-up takes the waker it wakes, so after one the caller's is
        // registered again; else only when another task polls. (A wake-up
        // from now on sets the flag first, then wakes whichever waker it
        // finds: the caller's, which sees the flag on its next poll.)
        let same = self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if woken || !same {
            self.flag.outer.register(cx.waker());
            self.registered = Some(cx.waker().clone());
        }
        if !woken {
            return Poll::Pending;
        }
        let waker = Waker::from(self.flag.clone());
        self.inner
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn polled_once_then_only_after_its_own_wake_ups() {
        let polls = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let inner_waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let (p, d, iw) = (polls.clone(), done.clone(), inner_waker.clone());
        let mut w = Woken::new(std::future::poll_fn(move |cx| {
            p.fetch_add(1, Ordering::SeqCst);
            *iw.lock().unwrap() = Some(cx.waker().clone());
            match d.load(Ordering::SeqCst) {
                true => Poll::Ready(7),
                false => Poll::Pending,
            }
        }));
        let wake_inner = || inner_waker.lock().unwrap().take().unwrap().wake();
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(w.woken(), "never polled");
        assert!(Pin::new(&mut w).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        assert!(!w.woken());
        for _ in 0..100 {
            assert!(Pin::new(&mut w).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled without a wake-up");
        // Woken, not ready: polled again once.
        wake_inner();
        assert!(w.woken(), "a wake-up since the last poll");
        assert!(Pin::new(&mut w).poll(&mut cx).is_pending());
        assert!(!w.woken());
        assert!(Pin::new(&mut w).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        // Ready and woken: done on the next poll.
        done.store(true, Ordering::SeqCst);
        wake_inner();
        assert_eq!(Pin::new(&mut w).poll(&mut cx), Poll::Ready(7));
    }

    #[tokio::test]
    async fn every_wake_up_reaches_the_task_that_polled_last() {
        let (tx, mut rx) = tokio::sync::watch::channel(0);
        let w = Woken::new(async move { rx.wait_for(|v| *v == 2).await.is_ok() });
        let task = tokio::spawn(w);
        tokio::task::yield_now().await;
        // A wake-up that leaves it pending (and takes the registered
        // waker), then the one it waits for.
        tx.send_replace(1);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!task.is_finished());
        tx.send_replace(2);
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
        assert!(done.expect("the wrapper was never woken").unwrap());
    }
}
