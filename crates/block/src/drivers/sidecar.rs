//! Persistent bitmaps for raw images, beside them: `IMAGE.bitmaps.qcow2`, a
//! qcow2 image of the same size that holds no data, only the bitmaps (in
//! QEMU's bitmaps extension) and the activity log that makes them survive a
//! crash. So raw images get exactly what qcow2 images get, and
//! `qemu-img info IMAGE.bitmaps.qcow2` lists them.
//!
//! The sidecar is created when the first persistent bitmap is added and
//! opened with the image when it exists.

use std::path::Path;
use std::sync::Arc;

use hbitmap::HBitmap;

use super::file::FileDriver;
use super::qcow2::Qcow2Driver;
use crate::bitmaps::{Bitmaps, LoadedState};
use crate::create::{Qcow2Create, create_qcow2};
use crate::error::{Error, Result};
use crate::node::{BoxFuture, ChildRole, Driver, Edge, Node, Settings, User};
use crate::options::{Aio, DetectZeroes, Discard};

/// The sidecar of one raw node.
pub(crate) struct Sidecar {
    /// The node whose bitmaps it keeps, and that node's length.
    node: String,
    size: u64,
    path: String,
    writable: bool,
    store: tokio::sync::OnceCell<Qcow2Driver>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("path", &self.path)
            .field("open", &self.store.initialized())
            .finish_non_exhaustive()
    }
}

impl Sidecar {
    /// The sidecar of node `node` (`size` bytes) whose image is the file
    /// `image`.
    pub(crate) fn new(node: &str, size: u64, image: &str, writable: bool) -> Sidecar {
        Sidecar {
            node: node.to_owned(),
            size,
            path: format!("{image}.bitmaps.qcow2"),
            writable,
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// Opens the sidecar file as a qcow2 image and checks that it is one
    /// for a disk of this size.
    async fn open(&self) -> Result<Qcow2Driver> {
        let (file, read_only) =
            FileDriver::open(&self.path, !self.writable, false, false, Aio::Threads)?;
        let settings = Settings {
            read_only,
            discard: Discard::Ignore,
            detect_zeroes: DetectZeroes::Off,
            direct: false,
            no_flush: false,
        };
        let name = format!("{}#bitmaps", self.node);
        let file = Arc::new(Node::new(
            format!("{name}-file"),
            true,
            settings,
            Box::new(file),
            Vec::new(),
        ));
        let edge = Edge::new(
            &file,
            User::Parent {
                parent: name.clone(),
                role: ChildRole::File,
            },
        );
        let store = Qcow2Driver::open(&name, edge, self.writable, None).await?;
        if store.length() != self.size {
            return Err(Error::BadImage {
                node: self.node.clone(),
                format: "qcow2",
                reason: format!(
                    "bitmap sidecar {} is for a disk of {} bytes, not {}",
                    self.path,
                    store.length(),
                    self.size
                ),
            });
        }
        Ok(store)
    }

    /// The bitmaps stored beside the image, if a sidecar exists.
    pub(crate) async fn load(&self) -> Result<Vec<(String, HBitmap, LoadedState)>> {
        if !Path::new(&self.path).exists() {
            return Ok(Vec::new());
        }
        let store = self.store.get_or_try_init(|| self.open()).await?;
        store.load_bitmaps().await
    }

    /// The open sidecar, created first if there is none.
    async fn created(&self) -> Result<&Qcow2Driver> {
        self.store
            .get_or_try_init(|| async {
                if !Path::new(&self.path).exists() {
                    create_qcow2(Path::new(&self.path), &Qcow2Create::new(self.size))?;
                }
                self.open().await
            })
            .await
    }

    /// [`Driver::log_activity`] of the sidecar, once it exists.
    pub(crate) fn log_activity(&self, offset: u64, len: u64) -> Option<BoxFuture<'_, Result<()>>> {
        self.store.get()?.log_activity(offset, len)
    }

    /// [`Driver::checkpoint`]: creates the sidecar for the first persistent
    /// bitmap.
    pub(crate) fn checkpoint<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if !self.writable {
                return Ok(());
            }
            self.created().await?.checkpoint(bitmaps).await
        })
    }

    /// [`Driver::close`]: stores the bitmaps in the sidecar (created if a
    /// persistent bitmap needs one).
    pub(crate) fn close<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.store.initialized() || (self.writable && bitmaps.has_persistent()) {
                self.created().await?.close(bitmaps).await?;
            }
            Ok(())
        })
    }
}
