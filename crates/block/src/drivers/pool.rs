//! The thread pool that runs blocking file I/O (`aio=threads`).
//!
//! A fixed set of threads, started on first use, takes jobs from one queue;
//! results come back over a oneshot channel. Like QEMU's thread pool, it
//! keeps a request's latency at one queue hop and one wake-up each way,
//! without spawning a thread on a burst.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use tokio::sync::oneshot;

/// Threads in the pool: QEMU's default maximum for its I/O thread pool.
const THREADS: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

/// The pool's queue: a plain mutex and condition variable, so idle threads
/// sleep until a job comes. (A channel whose receivers spin and yield
/// before they sleep cost 7% of the daemon's CPU in `sched_yield`, idle
/// threads being woken for every request.)
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    /// Threads that started.
    threads: AtomicUsize,
}

impl Queue {
    fn push(&self, job: Job) {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(job);
        self.ready.notify_one();
    }

    /// A pool thread's life: take jobs, run them. A job that panics loses
    /// its result (its caller sees `None`), not the thread.
    fn serve(&self) {
        loop {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let job = loop {
                match jobs.pop_front() {
                    Some(job) => break job,
                    None => jobs = self.ready.wait(jobs).unwrap_or_else(|e| e.into_inner()),
                }
            };
            drop(jobs);
            let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
        }
    }
}

fn queue() -> &'static Queue {
    static QUEUE: OnceLock<Queue> = OnceLock::new();
    static STARTED: OnceLock<()> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| Queue {
        jobs: Mutex::new(VecDeque::new()),
        ready: Condvar::new(),
        threads: AtomicUsize::new(0),
    });
    STARTED.get_or_init(|| {
        for i in 0..THREADS {
            let spawned = std::thread::Builder::new()
                .name(format!("bitmirror-io-{i}"))
                .spawn(move || queue.serve());
            match spawned {
                Ok(_) => {
                    queue.threads.fetch_add(1, Ordering::Relaxed);
                }
                // Fewer threads only means less parallelism.
                Err(e) => tracing::warn!("cannot start I/O thread {i}: {e}"),
            }
        }
    });
    queue
}

/// Runs `f` on the pool and waits for its result; `None` if the pool could
/// not run it (no thread could be started, or `f` panicked).
pub(crate) async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let queue = queue();
    if queue.threads.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let (tx, rx) = oneshot::channel();
    queue.push(Box::new(move || {
        let _ = tx.send(f());
    }));
    rx.await.ok()
}
