//! The storage drivers: `file` (protocol), `raw` and `qcow2` (formats),
//! `null-co`, and the `throttle` filter.

mod direct_copy;
mod file;
mod null;
mod pool;
mod qcow2;
mod raw;
mod throttle;
mod uring;

pub(crate) use file::FileDriver;
pub(crate) use null::NullDriver;
pub(crate) use qcow2::{MAGIC as QCOW2_MAGIC, Qcow2Driver};
pub(crate) use raw::RawDriver;
pub(crate) use throttle::ThrottleDriver;
