//! The block layer: a graph of named nodes, the requests that enter them,
//! their named dirty bitmaps, and write tracking.
//!
//! - [`Graph`] holds the nodes by name; [`BlockdevOptions`] describes one, as
//!   QEMU's `blockdev-add` does. Users (parents, exports, jobs) reach a node
//!   through an [`Edge`], so that [`Graph::replace`] can swap it under them.
//! - [`Node`] is where requests enter: read, write, write-zeroes, discard,
//!   flush and block status, all async, bounds-checked and aligned for the
//!   driver. Write-type requests mark the node's recording bitmaps before
//!   they are issued and again when they complete (DESIGN.md §3), so a
//!   bitmap is always a superset of the writes, and run the [`WriteHook`]s
//!   that jobs install.
//! - [`Bitmaps`] are the node's named dirty bitmaps, with QEMU's states
//!   (recording, busy, readonly, inconsistent, persistent, successor) and
//!   QEMU's error texts.
//! - Drivers: `file` (thread pool or io_uring, `O_DIRECT`,
//!   `SEEK_DATA`/`SEEK_HOLE`, `fallocate`), `raw` (with `offset`/`size`),
//!   `qcow2` (with backing chains; writable with crash-safe metadata) and
//!   `null-co`.
//!
//! Dependencies point down: this crate knows `hbitmap` and the OS, nothing
//! of NBD, QMP or jobs.

mod arena;
pub mod bitmaps;
mod buf;
pub mod class;
mod create;
mod drivers;
mod error;
mod gate;
mod graph;
mod inflight;
mod node;
pub mod options;
mod pagecache;
pub mod sidecar;
pub mod throttle;

pub use bitmaps::{BitmapId, BitmapInfo, Bitmaps, Check, ClearUndo, LoadedState, MarkTicket};
pub use buf::IoBuf;
pub use class::IoClass;
pub use create::{Qcow2Create, create_qcow2, create_qcow2_on};
pub use error::{Error, Result};
pub use graph::{DriverFactory, Graph};
pub use node::{
    BoxFuture, BufResult, CachedRange, ChildRole, Driver, Edge, Extent, FormatSpecific, HostRange,
    ImageInfo, Limits, Node, Piped, User, WriteHook, WriteKind, WriteRequest, ZeroFlags,
};
pub use options::{BlockdevOptions, SocketAddress};
pub use sidecar::{Sidecar, SidecarStore};
