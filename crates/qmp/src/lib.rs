//! The QEMU Machine Protocol (QMP), as `qemu-storage-daemon` speaks it.
//!
//! - [`Monitor`] serves sessions over any byte stream: the greeting,
//!   capability negotiation (`qmp_capabilities`, with `oob` when offered),
//!   QEMU's checks of each request's shape and its error texts, the `id`
//!   echo, and events interleaved with replies.
//! - [`Dispatcher`] is the daemon's side: it runs the commands.
//! - [`Events`] broadcasts events, time-stamped, to every monitor.
//! - [`json`] reads a byte stream as QEMU's JSON streamer does and writes
//!   JSON byte-for-byte as QEMU does.
//!
//! This crate knows nothing of block devices; it depends only on `qapi`
//! (for argument errors).

mod error;
mod events;
pub mod json;
mod monitor;

pub use error::{ErrorClass, QmpError};
pub use events::Events;
pub use monitor::{BoxFuture, Dispatcher, Monitor, MonitorConfig, command_not_found};
