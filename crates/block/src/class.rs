//! Who waits for a request: someone now (a guest's write, a read over NBD,
//! a job holding a guest's writes), or nobody in particular (a block job's
//! background copying).
//!
//! The class belongs to the task that makes the request: a job runs its
//! copies inside [`background`], and every request made from there (down
//! through `raw` and `qcow2` to the host file) is a background one. In the
//! `file` driver's thread-pool engine background requests:
//!
//! - run on threads of their own, which the kernel schedules behind the
//!   others ([`BACKGROUND_NICE`] above the daemon's nice value) and which
//!   yield the core after each request (and between the 256 KiB calls of
//!   a kernel copy): on a kernel without
//!   preemption a thread inside a long copy is not interrupted, and back
//!   to back copies kept a core for tens of milliseconds while a guest's
//!   request waited for it;
//! - start the write-back of their buffered writes early, from that same
//!   thread (`sync_file_range`, once a contiguous run reaches 32 MiB or a
//!   write lands elsewhere), instead of leaving gigabytes of dirty
//!   pages to the kernel's flusher threads, which run at normal priority
//!   and hold a core for milliseconds at a time. The job's final flush
//!   still makes the data durable; starting write-back early only changes
//!   who does the work, and when.
//!
//! Measured on the 2-core machine (a guest writing 64 KiB blocks at
//! 50 MB/s through an NBD export during a 4 GiB background mirror into a
//! buffered file, p99 of its write latency): 3.9–4.2 ms before, 1.25–1.89
//! ms with all of the above, 1.95–2.84 ms without the write-back; READY
//! came sooner too. `docs/benchmarks.md` has the runs.
//!
//! The io_uring engine ignores the class: the kernel's workers run its
//! requests.

use std::future::Future;

/// Who waits for a request (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoClass {
    /// Someone waits for it now: the default.
    #[default]
    Foreground,
    /// A job's background work: scheduled behind foreground requests.
    Background,
}

/// What the thread pool's background threads add to the daemon's nice
/// value (up to 19). Enough that a foreground thread that wakes up takes
/// the core from one of them; not more, so that a job still moves on a
/// machine whose cores are busy with guests (a nice-10 thread gets about
/// a tenth of a core against one busy nice-0 thread).
pub const BACKGROUND_NICE: i32 = 10;

tokio::task_local! {
    static CLASS: IoClass;
}

/// Runs `f` with its requests in `class` (nested scopes: the innermost
/// wins).
pub async fn with_class<F: Future>(class: IoClass, f: F) -> F::Output {
    CLASS.scope(class, f).await
}

/// Runs `f` with its requests in the background class.
pub async fn background<F: Future>(f: F) -> F::Output {
    with_class(IoClass::Background, f).await
}

/// The class of the requests the current task makes: foreground outside
/// any scope (and outside a task).
pub fn current() -> IoClass {
    CLASS.try_with(|c| *c).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_innermost_scope_wins_and_none_is_foreground() {
        assert_eq!(current(), IoClass::Foreground);
        background(async {
            assert_eq!(current(), IoClass::Background);
            with_class(IoClass::Foreground, async {
                assert_eq!(current(), IoClass::Foreground);
            })
            .await;
            tokio::task::yield_now().await;
            assert_eq!(current(), IoClass::Background);
        })
        .await;
        assert_eq!(current(), IoClass::Foreground);
        // A spawned task does not inherit the scope.
        background(async {
            let spawned = tokio::spawn(async { current() }).await;
            assert_eq!(spawned.ok(), Some(IoClass::Foreground));
        })
        .await;
    }
}
