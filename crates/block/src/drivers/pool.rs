//! The thread pool that runs blocking file I/O (`aio=threads`).
//!
//! A fixed set of threads, started on first use, takes jobs from one queue;
//! results come back over a oneshot channel. Like QEMU's thread pool, it
//! keeps a request's latency at one queue hop and one wake-up each way,
//! without spawning a thread on a burst.
//!
//! Background requests ([`crate::class`]) have a queue and threads of
//! their own, niced [`BACKGROUND_NICE`] above the daemon's, started on the
//! first such request.
//!
//! A [`Lane`] runs its jobs one after another, back to back on one pool
//! thread: for requests the kernel serialises anyway (buffered writes to
//! one file), without a round trip to the caller between two of them.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use tokio::sync::oneshot;

use crate::class::{BACKGROUND_NICE, IoClass};

/// Threads for foreground requests: QEMU's default maximum for its I/O
/// thread pool.
const THREADS: usize = 64;

/// Threads for background requests: as many as a mirror's default
/// `buf-size` has chunks in flight.
const BACKGROUND_THREADS: usize = 16;

type Job = Box<dyn FnOnce() + Send>;
/// A lane's job: runs, and returns how to hand its result over.
type LaneJob = Box<dyn FnOnce() -> Deliver + Send>;
/// Hands a lane job's result to its caller.
type Deliver = Box<dyn FnOnce() + Send>;

/// Most results a background lane holds back before handing them over
/// (see [`Lane`]).
const BACKGROUND_BATCH: usize = 8;

/// The pool's queue: a plain mutex and condition variable, so idle threads
/// sleep until a job comes. (A channel whose receivers spin and yield
/// before they sleep cost 7% of the daemon's CPU in `sched_yield`, idle
/// threads being woken for every request.)
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    /// Threads that started.
    threads: AtomicUsize,
    /// Its threads yield the core after each job (background ones).
    yields: bool,
}

impl Queue {
    fn new(yields: bool) -> Queue {
        Queue {
            jobs: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            threads: AtomicUsize::new(0),
            yields,
        }
    }

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
            if self.yields {
                std::thread::yield_now();
            }
        }
    }

    /// Starts `count` threads serving the queue, at `nice`.
    fn start(&'static self, name: &str, count: usize, nice: i32) {
        for i in 0..count {
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    if nice != 0 {
                        lower_priority(nice);
                    }
                    self.serve()
                });
            match spawned {
                Ok(_) => {
                    self.threads.fetch_add(1, Ordering::Relaxed);
                }
                // Fewer threads only means less parallelism.
                Err(e) => tracing::warn!("cannot start I/O thread {name}-{i}: {e}"),
            }
        }
    }
}

/// Adds `nice` to the calling thread's nice value (Linux keeps one per
/// thread), up to 19. Raising it needs no privilege; a failure only costs
/// the preference.
fn lower_priority(nice: i32) {
    let me = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(me)).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_process(Some(me), (now + nice).min(19)) {
        tracing::warn!("cannot lower the priority of a background I/O thread: {e}");
    }
}

/// The queue and threads for `class`; `None` when no thread could be
/// started.
fn started(class: IoClass) -> Option<&'static Queue> {
    static FOREGROUND: OnceLock<Queue> = OnceLock::new();
    static BACKGROUND: OnceLock<Queue> = OnceLock::new();
    static STARTED: [OnceLock<()>; 2] = [OnceLock::new(), OnceLock::new()];
    let queue = match class {
        IoClass::Foreground => FOREGROUND.get_or_init(|| Queue::new(false)),
        IoClass::Background => BACKGROUND.get_or_init(|| Queue::new(true)),
    };
    STARTED[class as usize].get_or_init(|| match class {
        IoClass::Foreground => queue.start("bitmirror-io", THREADS, 0),
        IoClass::Background => queue.start("bitmirror-bg", BACKGROUND_THREADS, BACKGROUND_NICE),
    });
    (queue.threads.load(Ordering::Relaxed) > 0).then_some(queue)
}

/// Runs `f` on the pool, on a thread of the calling task's class
/// ([`crate::class::current`]), and waits for its result; `None` if the
/// pool could not run it (no thread could be started, or `f` panicked).
pub(crate) async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let queue = started(crate::class::current())?;
    let (tx, rx) = oneshot::channel();
    queue.push(Box::new(move || {
        let _ = tx.send(f());
    }));
    rx.await.ok()
}

/// Jobs that run in the order they came, one at a time, on the pool.
///
/// While a lane has jobs, one pool thread takes them one after another
/// without going back to the queue or waiting for anyone: the next job
/// starts the moment the last one ends. (A lock held across each job's
/// round trip left the file idle between writes for two thread wake-ups:
/// half of an incremental mirror's time.) Only the results cross back.
/// A lane's jobs run on threads of the lane's class, whoever queues them.
///
/// A background lane hands its results over in batches: while more jobs
/// wait, it holds up to [`BACKGROUND_BATCH`] results back and hands them
/// over together, so that a job copying cluster after cluster wakes the
/// runtime once per batch instead of once per copy (each wake-up costs
/// the runtime's thread a sleep and a switch; an incremental backup's
/// 64 KiB copies spent about a fifth of the daemon's CPU there). Nothing waits
/// for more jobs: once the lane is empty, whatever it holds goes.
#[derive(Default)]
pub(crate) struct Lane {
    state: Mutex<LaneState>,
    /// What the jobs queued or running weigh ([`Lane::run_weighing`]).
    weight: AtomicU64,
    class: IoClass,
}

#[derive(Default)]
struct LaneState {
    jobs: VecDeque<LaneJob>,
    /// A pool thread is draining the lane.
    draining: bool,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").finish_non_exhaustive()
    }
}

impl Lane {
    /// An empty lane whose jobs run on threads of `class`.
    pub(crate) fn new(class: IoClass) -> Lane {
        Lane {
            state: Mutex::default(),
            weight: AtomicU64::new(0),
            class,
        }
    }

    /// Runs `f` after the lane's earlier jobs and waits for its result;
    /// `None` if the pool could not run it (no thread could be started, or
    /// `f` panicked).
    pub(crate) async fn run<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let queue = started(self.class)?;
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut state = self.lock();
            state.jobs.push_back(Box::new(move || {
                let result = f();
                Box::new(move || {
                    let _ = tx.send(result);
                })
            }));
            !std::mem::replace(&mut state.draining, true)
        };
        if start {
            let lane = self.clone();
            queue.push(Box::new(move || lane.drain()));
        }
        rx.await.ok()
    }

    /// [`run`](Self::run), counting `weight` (the bytes of a write, say)
    /// in the lane's [`weight`](Self::weight) until the job has run (or
    /// was dropped unrun).
    pub(crate) async fn run_weighing<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        weight: u64,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        /// Takes its weight off the lane when dropped.
        struct Weighing(std::sync::Arc<Lane>, u64);
        impl Drop for Weighing {
            fn drop(&mut self) {
                self.0.weight.fetch_sub(self.1, Ordering::AcqRel);
            }
        }
        self.weight.fetch_add(weight, Ordering::AcqRel);
        let weighing = Weighing(self.clone(), weight);
        self.run(move || {
            let _weighing = weighing;
            f()
        })
        .await
    }

    /// What the jobs queued or running weigh, as their callers counted
    /// ([`run_weighing`](Self::run_weighing)); a moment's answer.
    pub(crate) fn weight(&self) -> u64 {
        self.weight.load(Ordering::Acquire)
    }

    /// Whether the lane has no job queued or running (a moment's answer:
    /// a job may be queued right after).
    #[cfg(test)]
    pub(crate) fn idle(&self) -> bool {
        !self.lock().draining
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the lane's jobs until it is empty (on a pool thread). A job
    /// that panics loses its result, not the others.
    fn drain(&self) {
        let batch = match self.class {
            IoClass::Foreground => 1,
            IoClass::Background => BACKGROUND_BATCH,
        };
        let mut held: Vec<Deliver> = Vec::new();
        loop {
            let job = {
                let mut state = self.lock();
                match state.jobs.pop_front() {
                    Some(job) => job,
                    None => {
                        state.draining = false;
                        drop(state);
                        held.drain(..).for_each(|deliver| deliver());
                        return;
                    }
                }
            };
            if let Ok(deliver) = std::panic::catch_unwind(AssertUnwindSafe(job)) {
                held.push(deliver);
            }
            if held.len() >= batch {
                held.drain(..).for_each(|deliver| deliver());
            }
            if self.class == IoClass::Background {
                // Let a thread that woke meanwhile have the core: the
                // kernel does not preempt the lane's thread inside a long
                // copy, and back to back jobs would keep it for tens of
                // milliseconds (measured: a guest's p99 1.5–1.8 ms with
                // this, 2.8–3.3 ms without). The pool's background threads
                // do the same between their own jobs.
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_lane_runs_its_jobs_in_order_one_at_a_time() {
        let lane = Arc::new(Lane::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let busy = Arc::new(AtomicUsize::new(0));
        let runs = (0..200).map(|i| {
            let (log, busy) = (log.clone(), busy.clone());
            lane.run(move || {
                assert_eq!(busy.fetch_add(1, Ordering::SeqCst), 0, "two jobs at once");
                std::thread::yield_now();
                log.lock().unwrap().push(i);
                busy.fetch_sub(1, Ordering::SeqCst);
                i * 2
            })
        });
        let results = futures_util::future::join_all(runs).await;
        assert_eq!(results, (0..200).map(|i| Some(i * 2)).collect::<Vec<_>>());
        assert_eq!(*log.lock().unwrap(), (0..200).collect::<Vec<_>>());
        // A panicking job loses its own result only; the lane goes on.
        assert_eq!(lane.run(|| panic!("a job that panics")).await, None::<()>);
        assert_eq!(lane.run(|| 7).await, Some(7));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lane_is_idle_only_with_no_job_queued_or_running() {
        let lane = Arc::new(Lane::default());
        assert!(lane.idle());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let lane2 = lane.clone();
        let busy = tokio::spawn(async move { lane2.run(move || rx.recv().is_ok()).await });
        while !lane.lock().draining {
            tokio::task::yield_now().await;
        }
        assert!(!lane.idle(), "a lane running a job said idle");
        tx.send(()).unwrap();
        assert_eq!(busy.await.unwrap(), Some(true));
        // Idle again once the job's thread lets go.
        while !lane.idle() {
            tokio::task::yield_now().await;
        }
        assert!(lane.lock().jobs.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lane_weighs_its_jobs_until_they_ran_even_once_nobody_waits() {
        let lane = Arc::new(Lane::default());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ran_tx, ran) = std::sync::mpsc::channel::<()>();
        let (running_tx, running) = std::sync::mpsc::channel::<()>();
        let first = {
            let lane = lane.clone();
            tokio::spawn(async move {
                lane.run_weighing(100, move || {
                    running_tx.send(()).is_ok() && rx.recv().is_ok()
                })
                .await
            })
        };
        running
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the first job did not start");
        assert_eq!(lane.weight(), 100);
        // Queued behind it, then given up by its caller: still weighed
        // until it has run.
        let second = {
            let lane = lane.clone();
            tokio::spawn(
                async move { lane.run_weighing(20, move || ran_tx.send(()).is_ok()).await },
            )
        };
        while lane.weight() != 120 {
            tokio::task::yield_now().await;
        }
        second.abort();
        assert!(second.await.is_err(), "the wait was not given up");
        assert_eq!(lane.weight(), 120);
        tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Some(true));
        ran.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the given-up job did not run");
        let unweighed = async {
            while lane.weight() != 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), unweighed)
            .await
            .expect("a job that ran still weighs on the lane");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_background_lane_holds_back_at_most_a_batch_and_nothing_once_idle() {
        let lane = Arc::new(Lane::new(IoClass::Background));
        // Alone: handed over at once.
        assert_eq!(lane.run(|| 1).await, Some(1));
        let queued = |n: usize| {
            let lane = lane.clone();
            async move {
                while lane.lock().jobs.len() != n {
                    tokio::task::yield_now().await;
                }
            }
        };
        let spawn = |f: Box<dyn FnOnce() -> usize + Send>| {
            let lane = lane.clone();
            tokio::spawn(async move { lane.run(f).await })
        };
        // A job that waits, a batch of quick ones behind it, and another
        // that waits.
        let (go_a, wait_a) = std::sync::mpsc::channel::<()>();
        let a = spawn(Box::new(move || wait_a.recv().map_or(0, |()| 100)));
        while !(lane.lock().draining && lane.lock().jobs.is_empty()) {
            tokio::task::yield_now().await;
        }
        let mut quick = Vec::new();
        for i in 0..BACKGROUND_BATCH {
            quick.push(spawn(Box::new(move || i)));
            queued(i + 1).await;
        }
        let (go_b, wait_b) = std::sync::mpsc::channel::<()>();
        let b = spawn(Box::new(move || wait_b.recv().map_or(0, |()| 200)));
        queued(BACKGROUND_BATCH + 1).await;
        go_a.send(()).unwrap();
        // The first batch (the first job and all quick ones but the last)
        // arrives while the last job still waits.
        let last = quick.pop().unwrap();
        let within = |t| tokio::time::timeout(std::time::Duration::from_secs(10), t);
        assert_eq!(within(a).await.unwrap().unwrap(), Some(100));
        for (i, q) in quick.into_iter().enumerate() {
            assert_eq!(within(q).await.unwrap().unwrap(), Some(i));
        }
        // The last quick one is held back until the lane runs dry.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !last.is_finished(),
            "a result past the batch was handed over"
        );
        go_b.send(()).unwrap();
        assert_eq!(
            within(last).await.unwrap().unwrap(),
            Some(BACKGROUND_BATCH - 1)
        );
        assert_eq!(within(b).await.unwrap().unwrap(), Some(200));
    }

    /// The name and nice value of the thread running this.
    fn whoami() -> (String, i32) {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        let me = rustix::thread::gettid();
        (
            name,
            rustix::process::getpriority_process(Some(me)).unwrap(),
        )
    }

    #[tokio::test]
    async fn background_requests_run_on_niced_threads_of_their_own() {
        let (name, nice) = run(whoami).await.unwrap();
        assert!(name.starts_with("bitmirror-io-"), "{name}");
        let (name, bg_nice) = crate::class::background(run(whoami)).await.unwrap();
        assert!(name.starts_with("bitmirror-bg-"), "{name}");
        assert_eq!(bg_nice, (nice + BACKGROUND_NICE).min(19));
        // A lane runs on its own class's threads, whoever queues.
        let lane = Arc::new(Lane::new(IoClass::Background));
        let (name, _) = lane.run(whoami).await.unwrap();
        assert!(name.starts_with("bitmirror-bg-"), "{name}");
        let lane = Arc::new(Lane::default());
        let (name, _) = crate::class::background(lane.run(whoami)).await.unwrap();
        assert!(name.starts_with("bitmirror-io-"), "{name}");
    }
}
