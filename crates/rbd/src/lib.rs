//! Ceph RBD for bitmirror: a small hand-written FFI to librados and librbd
//! (Debian's `librbd-dev`, Ceph 16.2), a safe layer over it, and the `rbd`
//! block driver.
//!
//! - [`Cluster`] is one connection to a cluster (librados), shared by every
//!   image opened with the same configuration; [`Pool`] an I/O context on
//!   one pool and namespace.
//! - [`Image`] is an open image. Its requests are asynchronous: each one
//!   hands librbd a completion whose callback owns the request's state (the
//!   buffer and a channel) and only sends it back, so nothing blocks or
//!   panics on librbd's threads, and a request whose caller went away
//!   keeps its buffer alive until librbd is done with it.
//! - [`RbdFactory`] opens `driver=rbd` nodes for a [`block::Graph`]. A
//!   writable node holds the image's exclusive lock, so it is the only
//!   writer. The driver keeps persistent dirty bitmaps in a sidecar image in
//!   the same pool (`IMAGE.bitmaps`, tagged with the image's id; see
//!   [`block::sidecar`]), so any host that opens the image finds them, and
//!   snapshots the image at a clean close ([`BITMAPS_SNAPSHOT`]) so that the
//!   next open adds what anyone wrote in between.
//! - [`create_image`] is `blockdev-create` for `driver=rbd`.
//!
//! Linking needs librbd and librados; the workspace builds this crate only
//! with the `rbd` feature of the `bitmirror` binary.

mod cluster;
mod driver;
mod error;
mod ffi;
mod image;

pub use cluster::{Cluster, ClusterKey, Pool};
pub use driver::{BITMAPS_SNAPSHOT, RbdDriver, RbdFactory, SIDECAR_SUFFIX, create_image};
pub use error::{Error, Result};
pub use image::{Image, Segment};
