//! `throttle`: a filter that passes every request to its `file` child once
//! its throttle group admits it. Flushes and block status pass freely.

use std::sync::Arc;

use crate::buf::IoBuf;
use crate::error::Result;
use crate::node::{BoxFuture, BufResult, Driver, Edge, Extent, ImageInfo, Limits, ZeroFlags};
use crate::throttle::ThrottleGroup;

/// The child, and the group whose pace it keeps.
#[derive(Debug)]
pub(crate) struct ThrottleDriver {
    file: Arc<Edge>,
    group: Arc<ThrottleGroup>,
}

impl ThrottleDriver {
    pub(crate) fn new(file: Arc<Edge>, group: Arc<ThrottleGroup>) -> ThrottleDriver {
        ThrottleDriver { file, group }
    }
}

impl Driver for ThrottleDriver {
    fn name(&self) -> &'static str {
        "throttle"
    }

    fn length(&self) -> u64 {
        self.file.node().length()
    }

    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            throttle_group: Some(self.group.name().to_owned()),
            ..ImageInfo::default()
        }
    }

    fn limits(&self) -> Limits {
        self.file.node().limits()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            self.group.admit(false, buf.len() as u64).await;
            self.file.node().read_into(offset, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            self.group.admit(true, buf.len() as u64).await;
            self.file.node().write(offset, buf, fua).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.group.admit(true, len).await;
            self.file.node().write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.group.admit(true, len).await;
            self.file.node().discard(offset, len).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.file.node().flush().await })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            let first = self
                .file
                .node()
                .block_status_upto(offset, len, 1)
                .await?
                .into_iter()
                .next();
            first.ok_or(crate::error::Error::NotSupported(
                "block status of an empty range",
            ))
        })
    }
}
