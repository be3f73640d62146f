//! A job and the registry that runs jobs through QEMU's state machine.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use crate::status::{JobStatus, Verb};

/// A boxed future, as [`JobDriver::run`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where events go: `(name, data)`.
pub type Emit = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// What a job command can fail with, in QEMU's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A job id that another job has.
    #[error("Job ID '{0}' already in use")]
    IdInUse(String),
    /// A job id that breaks QEMU's rules for names.
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    /// `job-*` on an id no job has.
    #[error("Job not found")]
    NotFound,
    /// `block-job-*` on an id no block job has (QMP class
    /// `DeviceNotActive`).
    #[error("Block job '{0}' not found")]
    BlockJobNotFound(String),
    /// A verb the job's state does not allow.
    #[error("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")]
    VerbNotAllowed {
        /// The job.
        id: String,
        /// Its state.
        status: &'static str,
        /// The verb.
        verb: &'static str,
    },
    /// The job's driver refused.
    #[error("{0}")]
    Driver(String),
}

/// The work of a job. The registry calls [`run`](Self::run) once; after it
/// succeeds, [`prepare`](Self::prepare) at finalization (after `pending`,
/// so after `job-finalize` when auto-finalize is off); then exactly one of
/// [`commit`](Self::commit) (run and prepare succeeded) or
/// [`abort`](Self::abort) (a failure or cancel), then [`clean`](Self::clean).
pub trait JobDriver: Send + Sync + 'static {
    /// Does the work; `Err` carries the message users see in `query-jobs`
    /// and `BLOCK_JOB_COMPLETED`. Should await [`Job::pause_point`] between
    /// steps, and return early when [`Job::is_cancelled`].
    fn run(self: Arc<Self>, job: Arc<Job>) -> BoxFuture<'static, Result<(), String>>;
    /// Called by [`Jobs::start`] and [`Jobs::start_paused`] before the job
    /// is seen running (and before [`run`](Self::run)), on the caller's
    /// thread: sets up what QEMU has set by the time the command that
    /// starts a job returns (a backup's total progress, which QEMU's job
    /// sets as its coroutine is first entered, inside that command).
    fn starting(&self, job: &Arc<Job>) {
        let _ = job;
    }
    /// The part of finalization that can still fail (QEMU's `.prepare`:
    /// a mirror's pivot); `Err` fails the job with that message.
    fn prepare(&self) -> Result<(), String> {
        Ok(())
    }
    /// Makes the result final (e.g. a mirror's bitmap hand-back).
    fn commit(&self) {}
    /// Undoes what must not outlive a failed job.
    fn abort(&self) {}
    /// Releases what the job held, either way.
    fn clean(&self) {}
    /// `job-complete` on a ready job.
    fn complete(&self, job: &Job) -> Result<(), Error> {
        Err(Error::Driver(format!(
            "The active block job '{}' cannot be completed",
            job.id()
        )))
    }
    /// A cancel the driver turns into something else: a ready mirror
    /// cancelled without `force` finishes without pivoting, as a success.
    /// Returns `true` when it took the cancel over.
    fn soft_cancel(&self, job: &Job, force: bool) -> bool {
        let _ = (job, force);
        false
    }
    /// `block-job-change` with the job type's options (e.g. a mirror's
    /// `copy-mode`).
    fn change(&self, args: &Value) -> Result<(), Error> {
        let _ = args;
        Err(Error::Driver("Job type does not support change".into()))
    }
    /// Members of `query-block-jobs`' entry that only this job type has
    /// (a mirror's `actively-synced`).
    fn block_job_extra(&self) -> Vec<(&'static str, Value)> {
        Vec::new()
    }
    /// `block-job-set-speed`.
    fn set_speed(&self, speed: u64) -> Result<(), Error> {
        let _ = speed;
        Ok(())
    }
    /// The node the job writes to, if any (QEMU's op blockers keep other
    /// jobs off it).
    fn target_node(&self) -> Option<Arc<block::Node>> {
        None
    }
}

/// Jobs that finish together (QEMU's `JobTxn`: a transaction with
/// `completion-mode=grouped`). A member whose work is done waits
/// (`waiting`) until every member's is; then all go `pending` and are
/// finalized together (one `job-finalize` finalizes all). If one fails or
/// is cancelled, every other is cancelled — also one already waiting — and
/// all abort: their bitmaps stay at their old point in time.
#[derive(Debug, Default)]
pub struct JobGroup {
    inner: Mutex<GroupInner>,
    /// Wakes the member that drives the group's end.
    changed: Notify,
}

#[derive(Debug, Default)]
struct GroupInner {
    members: Vec<Weak<Job>>,
    /// Members whose work has returned (done, failed or cancelled).
    returned: usize,
    /// The first member to fail or be cancelled: its id, its error
    /// (`None` when cancelled).
    failure: Option<(String, Option<String>)>,
    finalize_now: bool,
}

impl JobGroup {
    /// An empty group.
    pub fn new() -> Arc<JobGroup> {
        Arc::new(JobGroup::default())
    }

    /// The members, in the order they joined.
    fn members(&self) -> Vec<Arc<Job>> {
        lock(&self.inner)
            .members
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Records the first failure; cancels the other members. Returns
    /// whether this was the first.
    fn fail(&self, id: &str, error: Option<String>) -> bool {
        let first = {
            let mut g = lock(&self.inner);
            let first = g.failure.is_none();
            if first {
                g.failure = Some((id.to_owned(), error));
            }
            first
        };
        if first {
            for m in self.members() {
                if m.id() != id {
                    lock(&m.state).cancelled = true;
                    m.wake.notify_waiters();
                }
            }
        }
        self.changed.notify_waiters();
        first
    }
}

/// How a job is made.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Its id (unique among live jobs).
    pub id: String,
    /// QEMU's job type (`create`, `mirror`, `backup`, …).
    pub job_type: &'static str,
    /// Finalize on its own once pending (else wait for `job-finalize`).
    pub auto_finalize: bool,
    /// Disappear on its own once concluded (else wait for `job-dismiss`).
    pub auto_dismiss: bool,
    /// A block job: listed by `query-block-jobs`, sends `BLOCK_JOB_*`
    /// events.
    pub block_job: bool,
}

#[derive(Debug)]
struct State {
    status: JobStatus,
    error: Option<String>,
    cancelled: bool,
    user_paused: bool,
    finalize_now: bool,
    /// `io-status`: `ok`, `failed` or `nospace` after an error stopped the
    /// job.
    io_status: &'static str,
}

/// A job: its identity, state and progress.
pub struct Job {
    options: JobOptions,
    state: Mutex<State>,
    current: AtomicU64,
    total: AtomicU64,
    speed: AtomicU64,
    /// The job waits in [`Job::wait_for_wake`] (QEMU's `busy` is false
    /// while a job sleeps).
    sleeping: AtomicBool,
    changed: watch::Sender<()>,
    wake: Notify,
    driver: Arc<dyn JobDriver>,
    /// The jobs this one finishes with, if any.
    group: std::sync::OnceLock<Arc<JobGroup>>,
    registry: Weak<Inner>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.options.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

struct Inner {
    jobs: Mutex<Vec<Arc<Job>>>,
    emit: Emit,
    /// Held while a job ends (abort or commit, its events, `concluded`,
    /// `null`) and while anyone looks jobs up, so the end is one step to
    /// them, as under QEMU's big lock: a client that saw
    /// `BLOCK_JOB_CANCELLED` never finds the job still `aborting`.
    settling: Mutex<()>,
}

/// The live jobs. Cloning shares the registry.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.`, `_`.
fn well_formed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl Jobs {
    /// An empty registry whose events go to `emit`.
    pub fn new(emit: Emit) -> Jobs {
        Jobs {
            inner: Arc::new(Inner {
                jobs: Mutex::new(Vec::new()),
                settling: Mutex::new(()),
                emit,
            }),
        }
    }

    /// Registers a job in state `created` (not started yet).
    pub fn create(
        &self,
        options: JobOptions,
        driver: Arc<dyn JobDriver>,
    ) -> Result<Arc<Job>, Error> {
        if !well_formed(&options.id) {
            return Err(Error::InvalidId(options.id));
        }
        let mut jobs = lock(&self.inner.jobs);
        if jobs.iter().any(|j| j.options.id == options.id) {
            return Err(Error::IdInUse(options.id));
        }
        let job = Arc::new(Job {
            options,
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                error: None,
                cancelled: false,
                user_paused: false,
                finalize_now: false,
                io_status: "ok",
            }),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            speed: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            changed: watch::channel(()).0,
            wake: Notify::new(),
            driver,
            group: std::sync::OnceLock::new(),
            registry: Arc::downgrade(&self.inner),
        });
        jobs.push(job.clone());
        drop(jobs);
        job.transition(JobStatus::Created);
        Ok(job)
    }

    /// Starts a created job on the runtime.
    pub fn start(&self, job: &Arc<Job>) {
        job.driver.starting(job);
        let job = job.clone();
        tokio::spawn(async move { job.life().await });
    }

    /// Starts a created job as QEMU starts one made by a transaction
    /// action (`blockdev-backup` is one), whose nodes are drained until the
    /// transaction ends: the job is seen running, then paused. Resume it
    /// with [`resume_started`](Self::resume_started) when the transaction
    /// is over.
    pub fn start_paused(&self, job: &Arc<Job>) {
        job.driver.starting(job);
        job.transition(JobStatus::Running);
        job.transition(JobStatus::Paused);
    }

    /// Runs a job [`start_paused`](Self::start_paused) left paused.
    pub fn resume_started(&self, job: &Arc<Job>) {
        job.transition(JobStatus::Running);
        self.start(job);
    }

    /// Undoes a created job whose transaction failed: it aborts and goes
    /// away (`aborting`, `concluded`, `null`; no `BLOCK_JOB_CANCELLED`, as
    /// in QEMU).
    pub fn abort_unstarted(&self, job: &Arc<Job>) {
        lock(&job.state).error = Some("Operation canceled".into());
        job.transition(JobStatus::Aborting);
        job.driver.abort();
        job.driver.clean();
        job.transition(JobStatus::Concluded);
        job.transition(JobStatus::Null);
    }

    /// Makes `job` (created, not started) a member of `group`.
    pub fn join_group(&self, job: &Arc<Job>, group: &Arc<JobGroup>) {
        if job.group.set(group.clone()).is_ok() {
            lock(&group.inner).members.push(Arc::downgrade(job));
        }
    }

    /// Takes a created job that will not start out of the registry (QEMU's
    /// `job_early_fail`): it goes to `null` directly.
    pub fn early_fail(&self, job: &Arc<Job>) {
        job.driver.clean();
        job.transition(JobStatus::Null);
    }

    /// The job called `id`.
    pub fn find(&self, id: &str) -> Result<Arc<Job>, Error> {
        let _settled = lock(&self.inner.settling);
        lock(&self.inner.jobs)
            .iter()
            .find(|j| j.options.id == id)
            .cloned()
            .ok_or(Error::NotFound)
    }

    /// The block job called `id` (for `block-job-*`).
    pub fn find_block_job(&self, id: &str) -> Result<Arc<Job>, Error> {
        let _settled = lock(&self.inner.settling);
        lock(&self.inner.jobs)
            .iter()
            .find(|j| j.options.id == id && j.options.block_job)
            .cloned()
            .ok_or_else(|| Error::BlockJobNotFound(id.to_owned()))
    }

    /// Every live job, oldest first.
    pub fn all(&self) -> Vec<Arc<Job>> {
        let _settled = lock(&self.inner.settling);
        lock(&self.inner.jobs).clone()
    }

    /// `query-jobs`.
    pub fn query(&self) -> Value {
        // Newest first, as QEMU lists them.
        Value::Array(self.all().iter().rev().map(|j| j.info()).collect())
    }

    /// Cancels every job and waits until each has concluded (or is gone):
    /// what the daemon does on its way out.
    pub async fn cancel_all(&self) {
        for job in self.all() {
            let _ = job.cancel(true);
        }
        for job in self.all() {
            job.wait_until(|s| matches!(s, JobStatus::Concluded | JobStatus::Null))
                .await;
        }
    }
}

impl Job {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.options.id
    }

    /// QEMU's job type.
    pub fn job_type(&self) -> &'static str {
        self.options.job_type
    }

    /// The current state.
    pub fn status(&self) -> JobStatus {
        lock(&self.state).status
    }

    /// Whether the job was cancelled: drivers stop as soon as they can.
    pub fn is_cancelled(&self) -> bool {
        lock(&self.state).cancelled
    }

    /// The speed limit in bytes per second (0: none).
    pub fn speed(&self) -> u64 {
        self.speed.load(Ordering::Relaxed)
    }

    /// Sets progress: `current` of `total` units of work done.
    pub fn set_progress(&self, current: u64, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.current.store(current, Ordering::Relaxed);
    }

    /// Adds `n` units to the work done.
    pub fn progress_by(&self, n: u64) {
        self.current.fetch_add(n, Ordering::Relaxed);
    }

    /// `(current, total)` progress.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.current.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// Adds `n` units to the work to do.
    pub fn add_work(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Moves a running job to `ready` and sends `BLOCK_JOB_READY` (mirror:
    /// the copy has caught up).
    pub fn set_ready(&self) {
        if self.status() == JobStatus::Running {
            self.transition(JobStatus::Ready);
            self.block_job_event("BLOCK_JOB_READY", None);
        }
    }

    /// Whether the job has been ready (it stays so through `standby`).
    pub fn is_ready(&self) -> bool {
        matches!(self.status(), JobStatus::Ready | JobStatus::Standby)
    }

    /// Wakes the job's driver where it waits in [`wait_for_wake`](Self::wait_for_wake).
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Waits until a verb (pause, resume, cancel, complete, …) or
    /// [`wake`](Self::wake) touches the job, or `timeout` passes.
    pub async fn wait_for_wake(&self, timeout: std::time::Duration) {
        self.sleeping.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// `query-block-jobs`' entry (QEMU's `BlockJobInfo`).
    pub fn block_job_info(&self) -> Value {
        let state = lock(&self.state);
        let status = state.status;
        let mut v = json!({
            "type": self.options.job_type,
            "device": self.options.id,
            "len": self.total.load(Ordering::Relaxed),
            "offset": self.current.load(Ordering::Relaxed),
            "busy": status == JobStatus::Running && !self.sleeping.load(Ordering::Relaxed),
            "paused": state.user_paused,
            "speed": self.speed(),
            "io-status": state.io_status,
            "ready": matches!(status, JobStatus::Ready | JobStatus::Standby),
            "status": status.as_str(),
            "auto-finalize": self.options.auto_finalize,
            "auto-dismiss": self.options.auto_dismiss,
        });
        if let Some(e) = &state.error {
            v["error"] = json!(e);
        }
        drop(state);
        for (k, extra) in self.driver.block_job_extra() {
            v[k] = extra;
        }
        v
    }

    /// Sends `BLOCK_JOB_ERROR` for a failed `operation` (`read`, `write`)
    /// and the `action` taken (`report`, `ignore`, `stop`).
    pub fn block_job_error(&self, operation: &str, action: &str) {
        self.emit(
            "BLOCK_JOB_ERROR",
            json!({"device": self.options.id, "operation": operation, "action": action}),
        );
    }

    /// Pauses the job after an error (the `stop` policies); `resume`
    /// retries.
    pub fn pause_on_error(&self, nospace: bool) {
        let mut s = lock(&self.state);
        s.user_paused = true;
        s.io_status = if nospace { "nospace" } else { "failed" };
    }

    /// Whether this is a block job.
    pub fn is_block_job(&self) -> bool {
        self.options.block_job
    }

    /// `query-jobs`' entry.
    pub fn info(&self) -> Value {
        let state = lock(&self.state);
        let mut v = json!({
            "id": self.options.id,
            "type": self.options.job_type,
            "status": state.status.as_str(),
            "current-progress": self.current.load(Ordering::Relaxed),
            "total-progress": self.total.load(Ordering::Relaxed),
        });
        if let Some(e) = &state.error {
            v["error"] = json!(e);
        }
        v
    }

    fn emit(&self, name: &str, data: Value) {
        if let Some(r) = self.registry.upgrade() {
            (r.emit)(name, data);
        }
    }

    /// Moves to `to` (asserting QEMU's table in debug builds) and sends
    /// `JOB_STATUS_CHANGE`.
    fn transition(&self, to: JobStatus) {
        {
            let mut state = lock(&self.state);
            if state.status == to {
                return;
            }
            debug_assert!(
                state.status.can_become(to),
                "job {}: {:?} → {to:?}",
                self.options.id,
                state.status
            );
            state.status = to;
        }
        self.emit(
            "JOB_STATUS_CHANGE",
            json!({"status": to.as_str(), "id": self.options.id}),
        );
        self.changed.send_replace(());
        if to == JobStatus::Null {
            if let Some(r) = self.registry.upgrade() {
                lock(&r.jobs).retain(|j| !std::ptr::eq(Arc::as_ptr(j), self));
            }
        }
    }

    /// Waits until the state satisfies `pred`.
    pub async fn wait_until(&self, pred: impl Fn(JobStatus) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if pred(self.status()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Where a running job may be paused: returns at once unless the user
    /// paused it, else when resumed (or cancelled).
    pub async fn pause_point(&self) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let paused = {
                let s = lock(&self.state);
                s.user_paused && !s.cancelled
            };
            let status = self.status();
            if !paused {
                match status {
                    JobStatus::Paused => self.transition(JobStatus::Running),
                    JobStatus::Standby => self.transition(JobStatus::Ready),
                    _ => {}
                }
                return;
            }
            match status {
                JobStatus::Running => self.transition(JobStatus::Paused),
                JobStatus::Ready => self.transition(JobStatus::Standby),
                _ => {}
            }
            notified.await;
        }
    }

    fn check_verb(&self, verb: Verb) -> Result<(), Error> {
        let status = self.status();
        if verb.allowed_in(status) {
            Ok(())
        } else {
            Err(Error::VerbNotAllowed {
                id: self.options.id.clone(),
                status: status.as_str(),
                verb: verb.as_str(),
            })
        }
    }

    /// `job-pause`.
    pub fn pause(&self) -> Result<(), Error> {
        self.check_verb(Verb::Pause)?;
        lock(&self.state).user_paused = true;
        // A job sleeping out its speed limit pauses now, not when the
        // sleep ends (at 1 B/s that could be days), as QEMU's does.
        self.wake.notify_waiters();
        Ok(())
    }

    /// `job-resume`.
    pub fn resume(&self) -> Result<(), Error> {
        self.check_verb(Verb::Resume)?;
        let mut s = lock(&self.state);
        if !s.user_paused {
            return Err(Error::Driver(
                "Can't resume a job that was not paused".into(),
            ));
        }
        s.user_paused = false;
        s.io_status = "ok";
        drop(s);
        self.wake.notify_waiters();
        Ok(())
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, speed: u64) -> Result<(), Error> {
        self.check_verb(Verb::SetSpeed)?;
        self.driver.set_speed(speed)?;
        self.speed.store(speed, Ordering::Relaxed);
        // A job waiting out the old limit goes on at the new one.
        self.wake.notify_waiters();
        Ok(())
    }

    /// The node the job writes to, if any.
    pub fn target_node(&self) -> Option<Arc<block::Node>> {
        self.driver.target_node()
    }

    /// `block-job-change`.
    pub fn change(&self, args: &Value) -> Result<(), Error> {
        self.check_verb(Verb::Change)?;
        self.driver.change(args)
    }

    /// `job-complete`.
    pub fn complete(&self) -> Result<(), Error> {
        self.check_verb(Verb::Complete)?;
        self.driver.complete(self)
    }

    /// `job-cancel`; `force` matters to ready mirrors only (see
    /// [`JobDriver::soft_cancel`]).
    pub fn cancel(&self, force: bool) -> Result<(), Error> {
        self.check_verb(Verb::Cancel)?;
        if self.driver.soft_cancel(self, force) {
            self.wake.notify_waiters();
            return Ok(());
        }
        lock(&self.state).cancelled = true;
        self.wake.notify_waiters();
        if let Some(group) = self.group.get() {
            // A member already waiting for the others fails the group now.
            if self.status() == JobStatus::Waiting {
                group.fail(self.id(), None);
            }
            group.changed.notify_waiters();
        }
        Ok(())
    }

    /// `job-finalize` of a pending job (of every member of its group).
    pub fn finalize(&self) -> Result<(), Error> {
        self.check_verb(Verb::Finalize)?;
        lock(&self.state).finalize_now = true;
        self.wake.notify_waiters();
        if let Some(group) = self.group.get() {
            lock(&group.inner).finalize_now = true;
            group.changed.notify_waiters();
        }
        Ok(())
    }

    /// `job-dismiss` of a concluded job.
    pub fn dismiss(&self) -> Result<(), Error> {
        self.check_verb(Verb::Dismiss)?;
        self.transition(JobStatus::Null);
        Ok(())
    }

    /// The whole life of a started job.
    async fn life(self: Arc<Self>) {
        self.transition(JobStatus::Running);
        let driver = self.driver.clone();
        let result = {
            // A job's own copying is background work: guests' requests
            // go first (`block::class`). Work a guest waits for (a
            // write-blocking copy, a copy-before-write) runs in the
            // guest's task, in the foreground.
            let work = block::class::background(driver.clone().run(self.clone()));
            tokio::pin!(work);
            loop {
                let notified = self.wake.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.is_cancelled() {
                    break Err(String::new());
                }
                tokio::select! {
                    r = &mut work => break r,
                    () = notified => {}
                }
            }
        };
        // A job cancelled while paused (or resumed, before its pause point
        // saw it) runs again on its way out, as QEMU's does: the states
        // allow no step from `paused` or `standby` to `aborting`.
        match self.status() {
            JobStatus::Paused => self.transition(JobStatus::Running),
            JobStatus::Standby => self.transition(JobStatus::Ready),
            _ => {}
        }
        let cancelled = self.is_cancelled();
        if let Some(group) = self.group.get().cloned() {
            return self.end_in_group(&group, result, cancelled).await;
        }
        match result {
            Ok(()) if !cancelled => {
                self.transition(JobStatus::Waiting);
                self.transition(JobStatus::Pending);
                // QEMU announces a pending block job only when it waits
                // for `job-finalize`.
                if self.options.block_job && !self.options.auto_finalize {
                    self.emit(
                        "BLOCK_JOB_PENDING",
                        json!({"type": self.options.job_type, "id": self.options.id}),
                    );
                }
                if !self.options.auto_finalize {
                    loop {
                        let notified = self.wake.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        let (now, cancel) = {
                            let s = lock(&self.state);
                            (s.finalize_now, s.cancelled)
                        };
                        if cancel {
                            return self.conclude_failed(None, true);
                        }
                        if now {
                            break;
                        }
                        notified.await;
                    }
                }
                let registry = self.registry.upgrade();
                let _settled = registry.as_ref().map(|r| lock(&r.settling));
                if let Err(e) = driver.prepare() {
                    return self.conclude_failed_settled(Some(e), false);
                }
                driver.commit();
                driver.clean();
                self.block_job_event("BLOCK_JOB_COMPLETED", None);
                self.conclude();
            }
            Ok(()) => self.conclude_failed(None, true),
            Err(e) => {
                let cancelled = self.is_cancelled();
                self.conclude_failed((!cancelled).then_some(e), cancelled);
            }
        }
    }

    /// The end of a grouped job's work. The member whose work returns last
    /// drives the group's end: success (all pending, finalized together)
    /// or failure (all abort; the first to fail reports its error, the
    /// others are cancelled).
    async fn end_in_group(
        &self,
        group: &Arc<JobGroup>,
        result: Result<(), String>,
        cancelled: bool,
    ) {
        let ok = result.is_ok() && !cancelled;
        if ok {
            self.transition(JobStatus::Waiting);
        } else {
            let error = match result {
                Err(e) if !cancelled => Some(e),
                _ => None,
            };
            group.fail(self.id(), error);
        }
        let last = {
            let mut g = lock(&group.inner);
            g.returned += 1;
            g.returned == g.members.len()
        };
        if !last {
            return;
        }
        let members = group.members();
        if lock(&group.inner).failure.is_none() {
            for m in &members {
                m.transition(JobStatus::Pending);
                if m.options.block_job && !m.options.auto_finalize {
                    m.emit(
                        "BLOCK_JOB_PENDING",
                        json!({"type": m.options.job_type, "id": m.options.id}),
                    );
                }
            }
            if !self.options.auto_finalize {
                loop {
                    let notified = group.changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let cancelled = members.iter().find(|m| m.is_cancelled());
                    if let Some(m) = cancelled {
                        group.fail(m.id(), None);
                        break;
                    }
                    if lock(&group.inner).finalize_now {
                        break;
                    }
                    notified.await;
                }
            }
        }
        self.settle_group(group, &members);
    }

    /// The group's end proper, in one step for lookups (see
    /// `Inner::settling`): every member prepared and committed, or, once
    /// one failed, all aborted.
    fn settle_group(&self, group: &Arc<JobGroup>, members: &[Arc<Job>]) {
        let registry = self.registry.upgrade();
        let _settled = registry.as_ref().map(|r| lock(&r.settling));
        if lock(&group.inner).failure.is_none() {
            for m in members {
                if let Err(e) = m.driver.prepare() {
                    group.fail(m.id(), Some(e));
                    break;
                }
            }
        }
        if lock(&group.inner).failure.is_none() {
            for m in members {
                m.driver.commit();
                m.driver.clean();
                m.block_job_event("BLOCK_JOB_COMPLETED", None);
                m.conclude();
            }
            return;
        }
        let Some((failed_id, error)) = lock(&group.inner).failure.clone() else {
            return;
        };
        let failing = members.iter().find(|m| m.id() == failed_id);
        let others: Vec<&Arc<Job>> = members.iter().filter(|m| m.id() != failed_id).collect();
        if let Some(f) = failing {
            lock(&f.state).error =
                Some(error.clone().unwrap_or_else(|| "Operation canceled".into()));
            f.transition(JobStatus::Aborting);
        }
        for m in &others {
            lock(&m.state).error = Some("Operation canceled".into());
            m.transition(JobStatus::Aborting);
        }
        for m in &others {
            m.driver.abort();
            m.driver.clean();
            m.block_job_event("BLOCK_JOB_CANCELLED", None);
            m.conclude();
        }
        if let Some(f) = failing {
            f.driver.abort();
            f.driver.clean();
            match error {
                Some(e) => f.block_job_event("BLOCK_JOB_COMPLETED", Some(e)),
                None => f.block_job_event("BLOCK_JOB_CANCELLED", None),
            }
            f.conclude();
        }
    }

    fn conclude_failed(&self, error: Option<String>, cancelled: bool) {
        let registry = self.registry.upgrade();
        let _settled = registry.as_ref().map(|r| lock(&r.settling));
        self.conclude_failed_settled(error, cancelled);
    }

    /// [`conclude_failed`](Self::conclude_failed) for a caller that holds
    /// the registry's settling lock.
    fn conclude_failed_settled(&self, error: Option<String>, cancelled: bool) {
        lock(&self.state).error =
            Some(error.clone().unwrap_or_else(|| "Operation canceled".into()));
        self.transition(JobStatus::Aborting);
        self.driver.abort();
        self.driver.clean();
        if cancelled {
            self.block_job_event("BLOCK_JOB_CANCELLED", None);
        } else {
            self.block_job_event("BLOCK_JOB_COMPLETED", error);
        }
        self.conclude();
    }

    fn conclude(&self) {
        self.transition(JobStatus::Concluded);
        if self.options.auto_dismiss {
            self.transition(JobStatus::Null);
        }
    }

    fn block_job_event(&self, name: &str, error: Option<String>) {
        if !self.options.block_job {
            return;
        }
        let total = self.total.load(Ordering::Relaxed);
        let mut data = json!({
            "type": self.options.job_type,
            "device": self.options.id,
            "len": total,
            "offset": self.current.load(Ordering::Relaxed),
            "speed": self.speed(),
        });
        if let Some(e) = error {
            data["error"] = json!(e);
        }
        self.emit(name, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Work {
        fail: bool,
        committed: AtomicBool,
        aborted: AtomicBool,
        gate: Notify,
        wait: bool,
    }

    impl JobDriver for Work {
        fn run(self: Arc<Self>, job: Arc<Job>) -> BoxFuture<'static, Result<(), String>> {
            Box::pin(async move {
                if self.wait {
                    self.gate.notified().await;
                }
                job.pause_point().await;
                job.set_progress(1, 1);
                if self.fail {
                    Err("it broke".into())
                } else {
                    Ok(())
                }
            })
        }
        fn commit(&self) {
            self.committed.store(true, Ordering::SeqCst);
        }
        fn abort(&self) {
            self.aborted.store(true, Ordering::SeqCst);
        }
    }

    fn work(fail: bool, wait: bool) -> Arc<Work> {
        Arc::new(Work {
            fail,
            committed: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            gate: Notify::new(),
            wait,
        })
    }

    fn registry() -> (Jobs, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let jobs = Jobs::new(Arc::new(move |name, data| {
            let what = match name {
                "JOB_STATUS_CHANGE" => data["status"].as_str().unwrap_or("?").to_owned(),
                other => other.to_owned(),
            };
            lock(&l).push(what);
        }));
        (jobs, log)
    }

    fn opts(id: &str, auto: bool, block: bool) -> JobOptions {
        JobOptions {
            id: id.into(),
            job_type: "create",
            auto_finalize: auto,
            auto_dismiss: auto,
            block_job: block,
        }
    }

    /// A job that knows its length before it runs.
    struct KnownLength;

    impl JobDriver for KnownLength {
        fn run(self: Arc<Self>, job: Arc<Job>) -> BoxFuture<'static, Result<(), String>> {
            Box::pin(async move {
                job.progress_by(7);
                Ok(())
            })
        }
        fn starting(&self, job: &Arc<Job>) {
            job.set_progress(0, 7);
        }
    }

    #[tokio::test]
    async fn a_jobs_length_is_set_before_it_is_seen_running() {
        let (jobs, log) = registry();
        let job = jobs
            .create(opts("j1", true, true), Arc::new(KnownLength))
            .unwrap();
        jobs.start(&job);
        // Nothing has run on the runtime yet (one thread, not yielded to).
        assert_eq!(job.progress(), (0, 7));
        assert_eq!(lock(&log).as_slice(), ["created"]);
        let paused = jobs
            .create(opts("j2", true, true), Arc::new(KnownLength))
            .unwrap();
        jobs.start_paused(&paused);
        assert_eq!(paused.progress(), (0, 7));
        jobs.resume_started(&paused);
        for j in [&job, &paused] {
            j.wait_until(|s| s == JobStatus::Null).await;
            assert_eq!(j.progress(), (7, 7));
        }
    }

    #[tokio::test]
    async fn success_goes_through_qemus_states() {
        let (jobs, log) = registry();
        let w = work(false, false);
        let job = jobs.create(opts("j0", true, false), w.clone()).unwrap();
        assert_eq!(
            jobs.create(opts("j0", true, false), w.clone())
                .unwrap_err()
                .to_string(),
            "Job ID 'j0' already in use"
        );
        assert_eq!(
            jobs.create(opts("0j", true, false), w.clone())
                .unwrap_err()
                .to_string(),
            "Invalid job ID '0j'"
        );
        jobs.start(&job);
        job.wait_until(|s| s == JobStatus::Null).await;
        assert_eq!(
            *lock(&log),
            [
                "created",
                "running",
                "waiting",
                "pending",
                "concluded",
                "null"
            ]
        );
        assert!(w.committed.load(Ordering::SeqCst) && !w.aborted.load(Ordering::SeqCst));
        assert_eq!(jobs.find("j0").unwrap_err(), Error::NotFound);
    }

    #[tokio::test]
    async fn failure_and_manual_dismiss() {
        let (jobs, log) = registry();
        let w = work(true, false);
        let job = jobs.create(opts("j1", false, true), w.clone()).unwrap();
        jobs.start(&job);
        job.wait_until(|s| s == JobStatus::Concluded).await;
        assert_eq!(
            *lock(&log),
            [
                "created",
                "running",
                "aborting",
                "BLOCK_JOB_COMPLETED",
                "concluded"
            ]
        );
        assert_eq!(job.info()["error"], "it broke");
        assert_eq!(
            job.cancel(false).unwrap_err().to_string(),
            "Job 'j1' in state 'concluded' cannot accept command verb 'cancel'"
        );
        job.dismiss().unwrap();
        assert!(jobs.all().is_empty());
        assert!(w.aborted.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn manual_finalize_pause_and_cancel() {
        let (jobs, log) = registry();
        let w = work(false, true);
        let job = jobs.create(opts("j2", false, true), w.clone()).unwrap();
        jobs.start(&job);
        job.wait_until(|s| s == JobStatus::Running).await;
        job.pause().unwrap();
        w.gate.notify_one();
        job.wait_until(|s| s == JobStatus::Paused).await;
        job.resume().unwrap();
        job.wait_until(|s| s == JobStatus::Pending).await;
        assert_eq!(
            job.complete().unwrap_err().to_string(),
            "Job 'j2' in state 'pending' cannot accept command verb 'complete'"
        );
        job.finalize().unwrap();
        job.wait_until(|s| s == JobStatus::Concluded).await;
        assert_eq!(
            *lock(&log),
            [
                "created",
                "running",
                "paused",
                "running",
                "waiting",
                "pending",
                "BLOCK_JOB_PENDING",
                "BLOCK_JOB_COMPLETED",
                "concluded"
            ]
        );
        job.dismiss().unwrap();

        lock(&log).clear();
        let w = work(false, true);
        let job = jobs.create(opts("j3", true, true), w.clone()).unwrap();
        jobs.start(&job);
        job.wait_until(|s| s == JobStatus::Running).await;
        job.cancel(false).unwrap();
        job.wait_until(|s| s == JobStatus::Null).await;
        assert_eq!(
            *lock(&log),
            [
                "created",
                "running",
                "aborting",
                "BLOCK_JOB_CANCELLED",
                "concluded",
                "null"
            ]
        );
        assert!(w.aborted.load(Ordering::SeqCst) && !w.committed.load(Ordering::SeqCst));
    }
}
