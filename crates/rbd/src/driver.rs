//! The `rbd` block driver: nodes backed by RBD images, their persistent
//! bitmaps in a sidecar image, and `blockdev-create` for RBD.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use block::options::{DriverOptions, RbdOptions};
use block::{
    BlockdevOptions, BoxFuture, BufResult, Driver, DriverFactory, Extent, Graph, ImageInfo, IoBuf,
    Limits, Sidecar, SidecarStore, ZeroFlags,
};
use hbitmap::HBitmap;

use crate::cluster::{Cluster, ClusterKey, Pool};
use crate::error::{Error, Result};
use crate::image::Image;

/// What the sidecar holding an image's persistent bitmaps is called: the
/// image's name with this suffix, in the same pool and namespace.
pub const SIDECAR_SUFFIX: &str = ".bitmaps";

/// The image metadata key that marks an image as the bitmap sidecar of
/// another, whose id it holds.
const SIDECAR_TAG: &str = "bitmirror.sidecar-of";

/// The snapshot taken when a node with persistent bitmaps closes cleanly:
/// at the next open, whatever was written since (by any client, while no
/// bitmirror had the image) is added to the bitmaps.
pub const BITMAPS_SNAPSHOT: &str = "bitmirror-bitmaps";

/// The longest range one block-status answer looks at: the allocation map
/// is read per object, so a bounded range bounds the work of one call.
const STATUS_WINDOW: u64 = 1 << 30;

/// Opens `driver=rbd` nodes; images opened with the same cluster options
/// share one connection.
#[derive(Debug, Default)]
pub struct RbdFactory {
    clusters: Mutex<HashMap<ClusterKey, Weak<Cluster>>>,
}

impl RbdFactory {
    /// A factory registered with `graph` for `driver=rbd`.
    pub fn register(graph: &Graph) -> Arc<RbdFactory> {
        let factory = Arc::new(RbdFactory::default());
        graph.register_driver("rbd", factory.clone());
        factory
    }

    /// The connection for `key`: a live one if some image uses it, else a
    /// new one.
    pub async fn cluster(&self, key: &ClusterKey) -> Result<Arc<Cluster>> {
        {
            let clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(cluster) = clusters.get(key).and_then(Weak::upgrade) {
                return Ok(cluster);
            }
        }
        let k = key.clone();
        let cluster = blocking(move || Cluster::connect(&k).map(Arc::new)).await?;
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        clusters.retain(|_, c| c.strong_count() > 0);
        // Two connecting at once: keep the first, drop the other.
        if let Some(existing) = clusters.get(key).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        clusters.insert(key.clone(), Arc::downgrade(&cluster));
        Ok(cluster)
    }

    /// The pool of `options`, connected.
    pub async fn pool(&self, options: &RbdOptions, cache: bool) -> Result<Arc<Pool>> {
        let cluster = self.cluster(&ClusterKey::new(options, cache)).await?;
        let (pool, ns) = (options.pool.clone(), options.namespace.clone());
        blocking(move || cluster.pool(&pool, ns.as_deref()).map(Arc::new)).await
    }
}

/// Runs blocking librados/librbd work off the async runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::Invalid(format!("RBD worker failed: {e}"))))
}

impl DriverFactory for RbdFactory {
    fn open<'a>(
        &'a self,
        node: &'a str,
        options: &'a BlockdevOptions,
    ) -> BoxFuture<'a, block::Result<(Box<dyn Driver>, bool)>> {
        Box::pin(async move {
            let DriverOptions::Rbd(rbd) = &options.driver else {
                return Err(block::Error::DriverUnavailable(options.driver.name()));
            };
            // A snapshot opens read-only; asked for writing, it is refused
            // once it has opened, as QEMU does (so a missing snapshot says
            // so first).
            let read_only = options.read_only || rbd.snapshot.is_some();
            let pool = self.pool(rbd, !options.cache_direct).await?;
            let driver = RbdDriver::open(node, pool, rbd, read_only).await?;
            if rbd.snapshot.is_some() && !options.read_only && !options.auto_read_only {
                return Err(block::Error::Peer {
                    errno: 30,
                    message: "rbd snapshots are read-only".into(),
                });
            }
            Ok((Box::new(driver) as Box<dyn Driver>, read_only))
        })
    }
}

/// A node backed by an RBD image.
#[derive(Debug)]
pub struct RbdDriver {
    image: Arc<Image>,
    size: AtomicU64,
    /// Serialises growing the image (a format driver writing past its end).
    grow: tokio::sync::Mutex<()>,
    fast_diff: bool,
    /// Opened for writing (and holding the exclusive lock).
    writable: bool,
    /// The unit of allocation, to which block-status queries are aligned.
    object_size: u64,
    /// Where persistent bitmaps go (not for snapshots).
    sidecar: Option<Sidecar>,
    /// The options as a `json:` filename shows them.
    description: serde_json::Value,
}

impl RbdDriver {
    /// Opens image `options.image` of `pool` for node `node`.
    pub async fn open(
        node: &str,
        pool: Arc<Pool>,
        options: &RbdOptions,
        read_only: bool,
    ) -> Result<RbdDriver> {
        let (p, name, snap) = (
            pool.clone(),
            options.image.clone(),
            options.snapshot.clone(),
        );
        let image = blocking(move || {
            let image = Image::open(&p, &name, snap.as_deref(), read_only)?;
            if !read_only {
                // One writer at a time, so that every write is in this
                // node's bitmaps (and only this process writes the sidecar).
                match image.lock_exclusive() {
                    Ok(()) => {}
                    Err(Error::Call { errno: 22, .. }) => tracing::warn!(
                        "RBD image {}/{name} has no exclusive-lock feature: other clients \
                         may write to it unseen by its dirty bitmaps",
                        p.spec()
                    ),
                    Err(e) => return Err(e),
                }
            }
            Ok(image)
        })
        .await?;
        let size = image.size()?;
        let sidecar = match options.snapshot {
            Some(_) => None,
            None => {
                let store = RbdSidecar {
                    pool: pool.clone(),
                    name: format!("{}{SIDECAR_SUFFIX}", options.image),
                    location: format!("rbd:{}/{}{SIDECAR_SUFFIX}", pool.spec(), options.image),
                    owner: format!("{}/{}", pool.spec(), options.image),
                    owner_id: image.id()?,
                };
                Some(Sidecar::new(node, size, Box::new(store), !read_only))
            }
        };
        RbdDriver::new(image, !read_only, sidecar, options.to_qapi())
    }

    /// An image without a sidecar (a sidecar itself), read and written
    /// without the exclusive lock of its own.
    fn plain(image: Image) -> Result<RbdDriver> {
        let description = serde_json::json!({"driver": "rbd", "image": image.name()});
        RbdDriver::new(image, false, None, description)
    }

    fn new(
        image: Image,
        writable: bool,
        sidecar: Option<Sidecar>,
        description: serde_json::Value,
    ) -> Result<RbdDriver> {
        Ok(RbdDriver {
            size: AtomicU64::new(image.size()?),
            fast_diff: image.has_fast_diff(),
            object_size: image.object_size()?,
            image: Arc::new(image),
            grow: tokio::sync::Mutex::new(()),
            writable,
            sidecar,
            description,
        })
    }

    /// Grows the image to hold `end` bytes.
    async fn grow_to(&self, end: u64) -> Result<()> {
        let _one = self.grow.lock().await;
        if end <= self.size.load(Ordering::Acquire) {
            return Ok(());
        }
        let image = self.image.clone();
        blocking(move || image.resize(end)).await?;
        self.size.store(end, Ordering::Release);
        Ok(())
    }
}

impl Driver for RbdDriver {
    fn name(&self) -> &'static str {
        "rbd"
    }

    fn length(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn limits(&self) -> Limits {
        Limits::default()
    }

    fn can_grow(&self) -> bool {
        // As QEMU's rbd driver: a write past the end resizes the image (a
        // qcow2 image kept on RBD, a bitmap sidecar).
        true
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            let (r, buf) = self.image.read(offset, buf).await;
            (r.map_err(block::Error::from), buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> BoxFuture<'_, BufResult<()>> {
        Box::pin(async move {
            let end = offset + buf.len() as u64;
            if end > self.length() {
                if let Err(e) = self.grow_to(end).await {
                    return (Err(e.into()), buf);
                }
            }
            let (r, buf) = self.image.write(offset, buf).await;
            if let Err(e) = r {
                return (Err(e.into()), buf);
            }
            if fua {
                if let Err(e) = self.image.flush().await {
                    return (Err(e.into()), buf);
                }
            }
            (Ok(()), buf)
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> BoxFuture<'_, block::Result<()>> {
        Box::pin(async move {
            if flags.fast {
                // librbd does not say whether zeroing is fast (QEMU's rbd
                // driver has no BDRV_REQ_NO_FALLBACK either).
                return Err(block::Error::NotSupported("fast write-zeroes on RBD"));
            }
            self.image
                .write_zeroes(offset, len, !flags.may_unmap)
                .await?;
            if flags.fua {
                self.image.flush().await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, block::Result<()>> {
        Box::pin(async move { Ok(self.image.discard(offset, len).await?) })
    }

    fn flush(&self) -> BoxFuture<'_, block::Result<()>> {
        Box::pin(async move { Ok(self.image.flush().await?) })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, block::Result<Extent>> {
        Box::pin(async move {
            let len = len.min(STATUS_WINDOW);
            let data = |len| Extent {
                offset,
                len,
                data: true,
                zero: false,
                allocated: true,
                depth: 1,
            };
            if !self.fast_diff {
                // Without an object map every object would be asked: say
                // data, as QEMU does.
                return Ok(data(len));
            }
            // Asked from the start of the object (older librbd 16.2
            // releases report wrong offsets in whole-object mode for a
            // start inside an object), and checked: segments out of order
            // or overlapping make the answer "data".
            let from = offset - offset % self.object_size;
            let image = self.image.clone();
            let mut segments =
                blocking(move || image.diff(None, from, offset + len - from, true, 64)).await?;
            let ordered = segments
                .windows(2)
                .all(|w| w[0].offset + w[0].len <= w[1].offset);
            if !ordered {
                return Ok(data(len));
            }
            // What ends before `offset` does not matter.
            segments.retain(|s| s.offset + s.len > offset);
            let end = offset + len;
            let Some(first) = segments.first() else {
                return Ok(Extent {
                    zero: true,
                    data: false,
                    ..data(len)
                });
            };
            if first.offset > offset {
                return Ok(Extent {
                    zero: true,
                    data: false,
                    ..data(first.offset.min(end) - offset)
                });
            }
            // Adjacent segments of the same kind make one extent.
            let mut stop = first.offset + first.len;
            for s in &segments[1..] {
                if s.offset != stop || s.exists != first.exists {
                    break;
                }
                stop = s.offset + s.len;
            }
            let len = stop.min(end).max(offset + 1) - offset;
            Ok(Extent {
                data: first.exists,
                zero: !first.exists,
                ..data(len)
            })
        })
    }

    fn stores_bitmaps(&self) -> bool {
        self.sidecar.is_some()
    }

    fn load_bitmaps(
        &self,
    ) -> BoxFuture<'_, block::Result<Vec<(String, HBitmap, block::LoadedState)>>> {
        Box::pin(async move {
            let Some(sidecar) = &self.sidecar else {
                return Ok(Vec::new());
            };
            let mut loaded = sidecar.load().await?;
            if loaded.is_empty() {
                return Ok(loaded);
            }
            // Writes since the last clean close, by anyone: into every
            // bitmap, and into the activity log before the snapshot goes.
            let image = self.image.clone();
            let size = self.length();
            let since = blocking(move || {
                if !image.has_snapshot(BITMAPS_SNAPSHOT)? {
                    return Ok(None);
                }
                image
                    .diff(Some(BITMAPS_SNAPSHOT), 0, size, true, usize::MAX)
                    .map(Some)
            })
            .await?;
            let Some(since) = since else {
                return Ok(loaded);
            };
            // (A disabled bitmap stands for a past span of time, and an
            // inconsistent one is unusable anyway.)
            for (_, bits, state) in &mut loaded {
                if state.disabled || state.inconsistent {
                    continue;
                }
                for s in &since {
                    let end = (s.offset + s.len).min(bits.len());
                    if s.offset < end {
                        bits.set(s.offset, end - s.offset)
                            .map_err(|e| block::Error::Peer {
                                errno: 22,
                                message: format!("marking writes since the last close: {e}"),
                            })?;
                    }
                }
            }
            if self.writable {
                for s in &since {
                    if let Some(logged) = sidecar.log_activity(s.offset, s.len) {
                        logged.await?;
                    }
                }
                let image = self.image.clone();
                blocking(move || image.remove_snapshot(BITMAPS_SNAPSHOT)).await?;
            }
            Ok(loaded)
        })
    }

    fn log_activity(&self, offset: u64, len: u64) -> Option<BoxFuture<'_, block::Result<()>>> {
        self.sidecar.as_ref()?.log_activity(offset, len)
    }

    fn checkpoint<'a>(&'a self, bitmaps: &'a block::Bitmaps) -> BoxFuture<'a, block::Result<()>> {
        match &self.sidecar {
            Some(sidecar) => sidecar.checkpoint(bitmaps),
            None => Box::pin(async { Ok(()) }),
        }
    }

    fn close<'a>(&'a self, bitmaps: &'a block::Bitmaps) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async move {
            if let Some(sidecar) = &self.sidecar {
                sidecar.close(bitmaps).await?;
            }
            self.image.flush().await?;
            if self.sidecar.is_some() && self.writable {
                // The point the stored bitmaps are true at, for the next
                // open (see BITMAPS_SNAPSHOT); none without bitmaps.
                let image = self.image.clone();
                let keep = bitmaps.has_persistent();
                blocking(move || {
                    if image.has_snapshot(BITMAPS_SNAPSHOT)? {
                        image.remove_snapshot(BITMAPS_SNAPSHOT)?;
                    }
                    if keep {
                        image.create_snapshot(BITMAPS_SNAPSHOT)?;
                    }
                    Ok(())
                })
                .await?;
            }
            Ok(())
        })
    }

    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            // QEMU reports the object size as the cluster size.
            cluster_size: Some(self.object_size),
            dirty: Some(false),
            format_specific: Some(block::FormatSpecific::Rbd),
            // As QEMU's query shows them (a failure shows none).
            snapshots: self.image.snapshots().unwrap_or_default(),
            description: Some(self.description.clone()),
            ..ImageInfo::default()
        }
    }
}

/// Where an RBD image's sidecar lives: image `IMAGE.bitmaps` in its pool,
/// tagged (metadata `bitmirror.sidecar-of`) with the id of the image whose
/// bitmaps it holds, so that a sidecar left by a removed image of the same
/// name is not taken for this one's, and an unrelated image that happens to
/// have the name is never touched.
struct RbdSidecar {
    pool: Arc<Pool>,
    name: String,
    location: String,
    /// The image whose bitmaps it holds: `POOL/IMAGE`, and its id.
    owner: String,
    owner_id: String,
}

/// Whose sidecar an existing image is.
enum Claim {
    /// None there.
    Absent,
    /// Ours.
    Ours(Image),
    /// Left by an image that no longer exists (the id no image has).
    Orphan,
    /// Not a sidecar, or another live image's: never touched.
    Foreign(String),
}

impl RbdSidecar {
    /// Who `name` in the pool belongs to. Blocks.
    fn claim(pool: &Arc<Pool>, name: &str, owner_id: &str, writable: bool) -> Result<Claim> {
        let image = match Image::open(pool, name, None, !writable) {
            Ok(image) => image,
            Err(Error::Call { errno: 2, .. }) => return Ok(Claim::Absent),
            Err(e) => return Err(e),
        };
        match image.metadata(SIDECAR_TAG)? {
            Some(id) if id == owner_id => Ok(Claim::Ours(image)),
            Some(id) if !pool.has_image_id(&id)? => Ok(Claim::Orphan),
            Some(id) => Ok(Claim::Foreign(format!(
                "it holds the bitmaps of another image (id {id})"
            ))),
            None => Ok(Claim::Foreign(
                "it is not a bitmirror bitmap sidecar".into(),
            )),
        }
    }
}

impl SidecarStore for RbdSidecar {
    fn location(&self) -> &str {
        &self.location
    }

    fn open(&self, writable: bool) -> BoxFuture<'_, block::Result<Option<Box<dyn Driver>>>> {
        Box::pin(async move {
            let (pool, name, id) = (self.pool.clone(), self.name.clone(), self.owner_id.clone());
            match blocking(move || RbdSidecar::claim(&pool, &name, &id, writable)).await? {
                Claim::Ours(image) => {
                    Ok(Some(Box::new(RbdDriver::plain(image)?) as Box<dyn Driver>))
                }
                Claim::Absent => Ok(None),
                Claim::Orphan | Claim::Foreign(_) => {
                    // Not this image's bitmaps: it has none (yet).
                    tracing::warn!(
                        "{} is not the bitmap sidecar of {}; its bitmaps are not loaded",
                        self.location,
                        self.owner
                    );
                    Ok(None)
                }
            }
        })
    }

    fn create(&self, pieces: Vec<(u64, Vec<u8>)>, len: u64) -> BoxFuture<'_, block::Result<()>> {
        Box::pin(async move {
            // Written under a temporary name and renamed into place, so a
            // crash leaves no half-made sidecar under the real name.
            let tmp = format!("{}.tmp", self.name);
            let (pool, t, name) = (self.pool.clone(), tmp.clone(), self.name.clone());
            let (id, location) = (self.owner_id.clone(), self.location.clone());
            let image = blocking(move || {
                // The real name: free, or an orphan to replace.
                match RbdSidecar::claim(&pool, &name, &id, true)? {
                    Claim::Absent => {}
                    Claim::Orphan => pool.remove(&name)?,
                    Claim::Ours(_) => {
                        return Err(Error::Invalid(format!(
                            "{location} appeared while it was being created"
                        )));
                    }
                    Claim::Foreign(why) => {
                        return Err(Error::Invalid(format!(
                            "cannot keep persistent bitmaps in {location}: {why}; \
                             rename or remove that image"
                        )));
                    }
                }
                // A temporary left by a crash: ours or an orphan's only.
                match RbdSidecar::claim(&pool, &t, &id, true)? {
                    Claim::Absent => {}
                    Claim::Ours(image) => {
                        drop(image);
                        pool.remove(&t)?;
                    }
                    Claim::Orphan => pool.remove(&t)?,
                    Claim::Foreign(why) => {
                        return Err(Error::Invalid(format!(
                            "cannot create {location}: {}/{t} is in the way ({why})",
                            pool.spec()
                        )));
                    }
                }
                pool.create(&t, len, None)?;
                let image = Image::open(&pool, &t, None, false)?;
                image.set_metadata(SIDECAR_TAG, &id)?;
                Ok(image)
            })
            .await?;
            for (offset, bytes) in pieces {
                image.write(offset, IoBuf::from_vec(bytes)).await.0?;
            }
            image.flush().await?;
            // Closing blocks until librbd has written everything back.
            blocking(move || {
                drop(image);
                Ok(())
            })
            .await?;
            let (pool, name) = (self.pool.clone(), self.name.clone());
            blocking(move || pool.rename(&tmp, &name)).await?;
            Ok(())
        })
    }
}

/// `blockdev-create` for `driver=rbd`: creates image `location.image` of
/// `size` bytes with objects of `cluster_size` bytes (librbd's default,
/// 4 MiB, when `None`), with QEMU's checks and messages.
pub async fn create_image(
    factory: &RbdFactory,
    location: &RbdOptions,
    size: u64,
    cluster_size: Option<u64>,
) -> Result<()> {
    let order = match cluster_size {
        None => None,
        Some(cs) if !cs.is_power_of_two() => {
            return Err(Error::Invalid("obj size needs to be power of 2".into()));
        }
        Some(cs) if cs < 4096 => return Err(Error::Invalid("obj size too small".into())),
        Some(cs) => Some(cs.trailing_zeros()),
    };
    if location.snapshot.is_some() {
        return Err(Error::Invalid(
            "Can't use snapshot name for image creation".into(),
        ));
    }
    let pool = factory.pool(location, true).await?;
    let name = location.image.clone();
    blocking(move || pool.create(&name, size, order)).await
}
