//! `raw`: the format without a format. Passes every request to its `file`
//! child, shifted by `offset` and confined to `size`.

use std::sync::Arc;

use hbitmap::HBitmap;

use crate::bitmaps::{Bitmaps, LoadedState};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::node::{
    BoxFuture, BufResult, Driver, Edge, Extent, HostRange, ImageInfo, Limits, Piped, ZeroFlags,
};
use crate::sidecar::Sidecar;

/// A window `offset..offset + size` of the child node.
#[derive(Debug)]
pub(crate) struct RawDriver {
    file: Arc<Edge>,
    offset: u64,
    size: u64,
    /// Where persistent bitmaps go: beside the image file, for a raw node
    /// that is all of a `file` node.
    sidecar: Option<Sidecar>,
}

impl RawDriver {
    /// Checks the window against the child, with QEMU's messages.
    pub(crate) fn new(
        node: &str,
        file: Arc<Edge>,
        offset: u64,
        size: Option<u64>,
        writable: bool,
    ) -> Result<RawDriver> {
        let file_size = file.node().length();
        if offset > file_size {
            return Err(Error::RawOffsetTooLarge { offset, file_size });
        }
        let size = match size {
            Some(size) if size % 512 != 0 => return Err(Error::RawSizeAlignment),
            Some(size) if file_size - offset < size => {
                return Err(Error::RawRangeTooLarge {
                    offset,
                    size,
                    file_size,
                });
            }
            Some(size) => size,
            None => file_size - offset,
        };
        let sidecar = match file.node().sidecar_store() {
            Some(store) if offset == 0 && size == file_size => {
                Some(Sidecar::new(node, size, store, writable))
            }
            _ => None,
        };
        Ok(RawDriver {
            file,
            offset,
            size,
            sidecar,
        })
    }

    /// The persistent bitmaps stored beside the image.
    pub(crate) async fn load_bitmaps(&self) -> Result<Vec<(String, HBitmap, LoadedState)>> {
        match &self.sidecar {
            Some(sidecar) => sidecar.load().await,
            None => Ok(Vec::new()),
        }
    }
}

impl Driver for RawDriver {
    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            dirty: Some(false),
            ..ImageInfo::default()
        }
    }

    fn name(&self) -> &'static str {
        "raw"
    }

    fn length(&self) -> u64 {
        self.size
    }

    fn stores_bitmaps(&self) -> bool {
        self.sidecar.is_some()
    }

    fn log_activity(&self, offset: u64, len: u64) -> Option<BoxFuture<'_, Result<()>>> {
        self.sidecar.as_ref()?.log_activity(offset, len)
    }

    fn checkpoint<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        match &self.sidecar {
            Some(sidecar) => sidecar.checkpoint(bitmaps),
            None => Box::pin(async { Ok(()) }),
        }
    }

    fn close<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        match &self.sidecar {
            Some(sidecar) => sidecar.close(bitmaps),
            None => Box::pin(async { Ok(()) }),
        }
    }

    fn limits(&self) -> Limits {
        self.file.with_node(|file| file.limits())
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move { self.file.node().read_into(self.offset + offset, buf).await })
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move { self.file.node().write(self.offset + offset, buf, fua).await })
    }

    fn write_now(&self, offset: u64, data: &[u8]) -> Option<Result<()>> {
        self.file
            .with_node(|file| file.try_write_now(self.offset + offset, data))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.file
                .node()
                .write_zeroes(self.offset + offset, len, flags)
                .await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.file.node().discard(self.offset + offset, len).await })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.file.node().flush().await })
    }

    fn host_range(&self, offset: u64, len: u64) -> Option<HostRange> {
        self.file.node().host_range(self.offset + offset, len)
    }

    fn copy_from<'a>(&'a self, offset: u64, source: &'a HostRange) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.file
                .node()
                .write_copy(self.offset + offset, source, false)
                .await
        })
    }

    fn takes_piped(&self, offset: u64, len: u64) -> bool {
        self.file.node().accepts_piped(self.offset + offset, len)
    }

    fn splice_from<'a>(&'a self, offset: u64, data: &'a Piped) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.file
                .node()
                .write_piped(self.offset + offset, data)
                .await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            let node = self.file.node();
            let first = node
                .block_status_upto(self.offset + offset, len, 1)
                .await?
                .into_iter()
                .next();
            let e = first.ok_or(Error::NotSupported("block status of an empty range"))?;
            Ok(Extent {
                offset,
                len: e.len,
                data: e.data,
                zero: e.zero,
                allocated: true,
                depth: 1,
            })
        })
    }
}
