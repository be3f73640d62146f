//! Background jobs with QEMU's job model: one state machine for every job
//! (`created → running → waiting → pending → concluded → null`, with
//! `paused`, `ready`, `standby` and `aborting` on the way), the verbs users
//! may apply in each state, and the events QEMU sends
//! (`JOB_STATUS_CHANGE`, and `BLOCK_JOB_*` for block jobs).
//!
//! A [`JobDriver`] does the work (creating an image, [`mirror`]ing, making a
//! [`backup`]); the [`Jobs`] registry runs it through the states, alone or
//! in a [`JobGroup`] that finishes together. The crate knows nothing of
//! QMP: events leave through a callback, errors are [`Error`]s worded as
//! QEMU words them. Its drivers work on the block layer's nodes.

pub mod backup;
mod copy;
mod job;
pub mod mirror;
mod status;

pub use job::{BoxFuture, Emit, Error, Job, JobDriver, JobGroup, JobOptions, Jobs};
pub use status::{JobStatus, Verb};
