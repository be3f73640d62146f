//! `null-co`: reads zeroes, forgets writes. For tests and benchmarks.

use crate::buf::IoBuf;
use crate::error::Result;
use crate::node::{BoxFuture, BufResult, Driver, Extent, ImageInfo, Limits, ZeroFlags};

/// A device of a given length that reads as zeroes and discards writes.
#[derive(Debug)]
pub(crate) struct NullDriver {
    size: u64,
    /// `read-zeroes` as given (reads are zeroes either way).
    read_zeroes: Option<bool>,
}

impl NullDriver {
    pub(crate) fn new(size: u64, read_zeroes: Option<bool>) -> NullDriver {
        NullDriver { size, read_zeroes }
    }
}

impl Driver for NullDriver {
    fn name(&self) -> &'static str {
        "null-co"
    }

    fn length(&self) -> u64 {
        self.size
    }

    fn limits(&self) -> Limits {
        Limits::default()
    }

    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            actual_size: Some(0),
            read_zeroes: self.read_zeroes,
            ..ImageInfo::default()
        }
    }

    fn read(&self, _offset: u64, mut buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        buf.as_mut_slice().fill(0);
        Box::pin(async move { (Ok(()), buf) })
    }

    fn write(&self, _offset: u64, buf: IoBuf, _fua: bool) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move { (Ok(()), buf) })
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, _: u64, _: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            Ok(Extent {
                offset,
                len,
                data: false,
                zero: true,
                allocated: true,
                depth: 1,
            })
        })
    }
}
