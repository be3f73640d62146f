//! The storage drivers: `file` (protocol), `raw` (format), `null-co`.

mod file;
mod null;
mod pool;
mod raw;
mod uring;

pub(crate) use file::FileDriver;
pub(crate) use null::NullDriver;
pub(crate) use raw::RawDriver;
