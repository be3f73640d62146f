//! NBD: the protocol, a server that exports block nodes, and a client.
//!
//! - [`proto`]: the wire format, as pure encoders and parsers.
//! - [`server`]: exports of [`block::Node`]s over TCP and unix sockets, with
//!   structured replies, block status (`base:allocation`,
//!   `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`), many clients and
//!   many requests in flight per client.
//!
//! The crate knows the block layer (it serves nodes) and nothing of QMP,
//! jobs or the daemon.

pub mod client;
mod driver;
mod error;
pub mod proto;
pub mod server;
mod socket;
pub mod tls;

pub use client::{Client, ClientOptions};
pub use driver::{NbdFactory, register};
pub use error::{Error, Result};
pub use server::{Export, ExportOptions, ListenAddr, RemoveMode, Server, ServerOptions};
