//! QEMU's QAPI input rules, for everything that reads QEMU-shaped arguments:
//! QMP commands, `blockdev-add` options and command-line options.
//!
//! - [`Object`] reads one JSON object member by member, checking each
//!   member's type as QEMU's QObject input visitor does and failing with
//!   QEMU's words ("Parameter 'x' is missing", "Invalid parameter type for
//!   'x', expected: string", "Parameter 'x' is unexpected").
//! - [`keyval::parse`] turns QEMU's `key=value,…` syntax (dotted keys,
//!   list indexes, an implied first key, `,,` escaping) into the JSON it
//!   stands for, where every scalar is a string; an [`Object`] made with
//!   `keyval = true` then converts those strings to the types it expects.
//!
//! This crate knows nothing of blocks, sockets or daemons.

mod error;
pub mod keyval;
mod object;

pub use error::{Error, Result};
pub use object::{Object, parse_size};
