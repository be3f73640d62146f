//! Persistent bitmaps for images without a format to hold them (raw files,
//! RBD images), beside them: a *sidecar*, a qcow2 image of the same size
//! that holds no data, only the bitmaps (in QEMU's bitmaps extension) and
//! the activity log that makes them survive a crash. So these images get
//! exactly what qcow2 images get, and `qemu-img info` of the sidecar lists
//! the bitmaps.
//!
//! Where the sidecar lives is the image's protocol's business (a
//! [`SidecarStore`]): `IMAGE.bitmaps.qcow2` beside a file, an RBD image
//! `IMAGE.bitmaps` in the same pool. It is created when the first
//! persistent bitmap is added and opened with the image when it exists.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use hbitmap::HBitmap;

use crate::bitmaps::{Bitmaps, LoadedState};
use crate::create::{Qcow2Create, layout};
use crate::drivers::{FileDriver, Qcow2Driver};
use crate::error::{Error, Result};
use crate::node::{BoxFuture, ChildRole, Driver, Edge, Node, Settings, User};
use crate::options::{Aio, DetectZeroes, Discard};

/// Where the sidecar of an image lives: a protocol driver's answer to
/// [`Driver::sidecar_store`].
pub trait SidecarStore: Send + Sync {
    /// The sidecar's name for messages (a path, `rbd:POOL/IMAGE`).
    fn location(&self) -> &str;
    /// Opens the sidecar as a protocol driver (read-only unless
    /// `writable`); `None` when it does not exist.
    fn open(&self, writable: bool) -> BoxFuture<'_, Result<Option<Box<dyn Driver>>>>;
    /// Creates the sidecar holding `pieces` (`(offset, bytes)`, the rest
    /// reading as zeroes) and at least `len` bytes long. Either the whole
    /// sidecar appears or none does, even across a crash: a half-written
    /// one would make the image unopenable.
    fn create(&self, pieces: Vec<(u64, Vec<u8>)>, len: u64) -> BoxFuture<'_, Result<()>>;
}

/// The sidecar of a host file: `IMAGE.bitmaps.qcow2` beside it.
pub(crate) struct FileSidecar {
    path: String,
}

impl FileSidecar {
    /// The sidecar of image file `image`.
    pub(crate) fn new(image: &str) -> FileSidecar {
        FileSidecar {
            path: format!("{image}.bitmaps.qcow2"),
        }
    }
}

impl SidecarStore for FileSidecar {
    fn location(&self) -> &str {
        &self.path
    }

    fn open(&self, writable: bool) -> BoxFuture<'_, Result<Option<Box<dyn Driver>>>> {
        Box::pin(async move {
            if !Path::new(&self.path).exists() {
                return Ok(None);
            }
            let (file, _) = FileDriver::open(&self.path, !writable, false, false, Aio::Threads)?;
            Ok(Some(Box::new(file) as Box<dyn Driver>))
        })
    }

    fn create(&self, pieces: Vec<(u64, Vec<u8>)>, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // Written under a temporary name and renamed into place.
            let tmp = format!("{}.tmp", self.path);
            let io = |e| Error::Open {
                path: tmp.clone(),
                source: e,
            };
            let file = std::fs::File::create(&tmp).map_err(io)?;
            for (offset, bytes) in &pieces {
                file.write_all_at(bytes, *offset).map_err(io)?;
            }
            file.set_len(len).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &self.path).map_err(io)?;
            Ok(())
        })
    }
}

/// The persistent bitmaps of one node, kept in a sidecar.
pub struct Sidecar {
    /// The node whose bitmaps it keeps, and that node's length.
    node: String,
    size: u64,
    location: Box<dyn SidecarStore>,
    writable: bool,
    store: tokio::sync::OnceCell<Qcow2Driver>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("location", &self.location.location())
            .field("open", &self.store.initialized())
            .finish_non_exhaustive()
    }
}

impl Sidecar {
    /// The sidecar of node `node` (`size` bytes), kept in `location`.
    pub fn new(node: &str, size: u64, location: Box<dyn SidecarStore>, writable: bool) -> Sidecar {
        Sidecar {
            node: node.to_owned(),
            size,
            location,
            writable,
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// Opens the sidecar as a qcow2 image and checks that it is one for a
    /// disk of this size; `None` when there is none.
    async fn open(&self) -> Result<Option<Qcow2Driver>> {
        let Some(file) = self.location.open(self.writable).await? else {
            return Ok(None);
        };
        let settings = Settings {
            read_only: !self.writable,
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
            file,
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
                    self.location.location(),
                    store.length(),
                    self.size
                ),
            });
        }
        Ok(Some(store))
    }

    /// The bitmaps stored beside the image, if a sidecar exists.
    pub async fn load(&self) -> Result<Vec<(String, HBitmap, LoadedState)>> {
        if let Some(store) = self.store.get() {
            return store.load_bitmaps().await;
        }
        let Some(store) = self.open().await? else {
            return Ok(Vec::new());
        };
        let store = self.store.get_or_init(|| async { store }).await;
        store.load_bitmaps().await
    }

    /// The open sidecar, created first if there is none.
    async fn created(&self) -> Result<&Qcow2Driver> {
        self.store
            .get_or_try_init(|| async {
                if let Some(store) = self.open().await? {
                    return Ok(store);
                }
                let layout = layout(&self.node, &Qcow2Create::new(self.size))?;
                self.location.create(layout.pieces, layout.length).await?;
                self.open().await?.ok_or_else(|| Error::BadImage {
                    node: self.node.clone(),
                    format: "qcow2",
                    reason: format!(
                        "bitmap sidecar {} vanished after it was created",
                        self.location.location()
                    ),
                })
            })
            .await
    }

    /// [`Driver::log_activity`] of the sidecar, once it exists.
    pub fn log_activity(&self, offset: u64, len: u64) -> Option<BoxFuture<'_, Result<()>>> {
        self.store.get()?.log_activity(offset, len)
    }

    /// [`Driver::checkpoint`]: creates the sidecar for the first persistent
    /// bitmap.
    pub fn checkpoint<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if !self.writable {
                return Ok(());
            }
            self.created().await?.checkpoint(bitmaps).await
        })
    }

    /// [`Driver::close`]: stores the bitmaps in the sidecar (created if a
    /// persistent bitmap needs one).
    pub fn close<'a>(&'a self, bitmaps: &'a Bitmaps) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.store.initialized() || (self.writable && bitmaps.has_persistent()) {
                self.created().await?.close(bitmaps).await?;
            }
            Ok(())
        })
    }
}
