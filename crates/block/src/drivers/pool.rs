//! The thread pool that runs blocking file I/O (`aio=threads`).
//!
//! A fixed set of threads, started on first use, takes jobs from one queue;
//! results come back over a oneshot channel. Like QEMU's thread pool, it
//! keeps a request's latency at one queue hop and one wake-up each way,
//! without spawning a thread on a burst.

use std::sync::OnceLock;

use tokio::sync::oneshot;

/// Threads in the pool: QEMU's default maximum for its I/O thread pool.
const THREADS: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

fn queue() -> &'static crossbeam_channel::Sender<Job> {
    static QUEUE: OnceLock<crossbeam_channel::Sender<Job>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        for i in 0..THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("bitmirror-io-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                });
            if let Err(e) = spawned {
                // Fewer threads only means less parallelism.
                tracing::warn!("cannot start I/O thread {i}: {e}");
            }
        }
        tx
    })
}

/// Runs `f` on the pool and waits for its result; `None` if the pool could
/// not run it (no thread could be started, or `f` panicked).
pub(crate) async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    queue().send(job).ok()?;
    rx.await.ok()
}
