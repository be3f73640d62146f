//! `blockdev-create`: making an image as a job (QEMU's `create` job type),
//! for `file`, `qcow2` and (with the `rbd` feature) `rbd`.

use std::sync::{Arc, Weak};

use block::{Qcow2Create, create_qcow2_on};
use jobs::{BoxFuture, Job, JobDriver};
use qapi::Object;
use qmp::QmpError;

use super::daemon::Daemon;

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOptions {
    /// A host file of `size` bytes (`driver=file`).
    File {
        /// Its path.
        filename: String,
        /// Its length.
        size: u64,
    },
    /// An RBD image (`driver=rbd`).
    Rbd {
        /// Where it goes.
        location: block::options::RbdOptions,
        /// Its length.
        size: u64,
        /// Its object size (librbd's default when `None`).
        cluster_size: Option<u64>,
    },
    /// A qcow2 image written through the existing node `file`.
    Qcow2 {
        /// The protocol node that receives the image.
        file: String,
        /// The image's shape.
        image: Qcow2Create,
    },
}

impl CreateOptions {
    /// Reads `blockdev-create`'s `options` (QAPI's
    /// `BlockdevCreateOptions`).
    pub fn read(o: &mut Object) -> Result<CreateOptions, QmpError> {
        let driver = o.req_str("driver")?;
        let options = match driver.as_str() {
            "file" => {
                let filename = o.req_str("filename")?;
                let size = o.req_size("size")?;
                if let Some(p) = o.opt_str("preallocation")?.filter(|p| p != "off") {
                    return Err(QmpError::generic(format!(
                        "Unsupported preallocation mode '{p}'"
                    )));
                }
                o.opt_bool("nocow")?;
                o.opt_size("extent-size-hint")?;
                CreateOptions::File { filename, size }
            }
            "qcow2" => {
                let file = o.req_str("file")?;
                o.opt_str("data-file")?;
                o.opt_bool("data-file-raw")?;
                o.opt_bool("extended-l2")?;
                let size = o.req_size("size")?;
                let version = o.opt_enum("version", &[("v2", 2), ("v3", 3)])?;
                let backing_file = o.opt_str("backing-file")?;
                let backing_fmt = o.opt_str("backing-fmt")?;
                o.opt_object("encrypt")?;
                let cluster_size = o.opt_size("cluster-size")?.unwrap_or(1 << 16);
                let preallocation = o.opt_str("preallocation")?;
                let lazy_refcounts = o.opt_bool("lazy-refcounts")?;
                let refcount_bits = o.opt_u64("refcount-bits")?;
                let compression =
                    o.opt_enum("compression-type", &[("zlib", true), ("zstd", false)])?;
                let unsupported = |what: &str| {
                    Err(QmpError::generic(format!(
                        "bitmirror creates qcow2 images with {what} only"
                    )))
                };
                if version == Some(2) {
                    return unsupported("version v3");
                }
                if preallocation.is_some_and(|p| p != "off") {
                    return unsupported("preallocation=off");
                }
                if lazy_refcounts == Some(true) {
                    return unsupported("lazy-refcounts=off");
                }
                if refcount_bits.is_some_and(|b| b != 16) {
                    return unsupported("refcount-bits=16");
                }
                if compression == Some(false) {
                    return unsupported("compression-type=zlib");
                }
                if backing_fmt.is_some() && backing_file.is_none() {
                    return Err(QmpError::generic(
                        "Backing format cannot be used without backing file",
                    ));
                }
                let backing =
                    backing_file.map(|f| (f, backing_fmt.unwrap_or_else(|| "raw".into())));
                CreateOptions::Qcow2 {
                    file,
                    image: Qcow2Create {
                        size,
                        cluster_size,
                        backing,
                    },
                }
            }
            "rbd" => {
                let mut location = o.req_object("location")?;
                let rbd = block::options::RbdOptions::read(&mut location)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                location.finish()?;
                let size = o.req_size("size")?;
                let cluster_size = o.opt_size("cluster-size")?;
                if o.has("encrypt") {
                    return Err(QmpError::generic(
                        "bitmirror does not support RBD encryption (encrypt)",
                    ));
                }
                CreateOptions::Rbd {
                    location: rbd,
                    size,
                    cluster_size,
                }
            }
            "null-co" | "null-aio" | "raw" | "nbd" => {
                return Err(QmpError::generic("Driver does not support blockdev-create"));
            }
            other => {
                return Err(qapi::Error::InvalidValue {
                    name: "driver".into(),
                    value: other.into(),
                }
                .into());
            }
        };
        Ok(options)
    }
}

/// The job that creates the image.
pub struct CreateJob {
    daemon: Weak<Daemon>,
    options: CreateOptions,
}

impl CreateJob {
    /// A job creating `options` with `daemon`'s nodes.
    pub fn new(daemon: &Arc<Daemon>, options: CreateOptions) -> CreateJob {
        CreateJob {
            daemon: Arc::downgrade(daemon),
            options,
        }
    }

    async fn create(&self) -> Result<(), String> {
        match &self.options {
            CreateOptions::File { filename, size } => create_file(filename, *size),
            #[cfg(feature = "rbd")]
            CreateOptions::Rbd {
                location,
                size,
                cluster_size,
            } => {
                let daemon = self.daemon.upgrade().ok_or("the daemon is shutting down")?;
                rbd::create_image(&daemon.rbd_nodes, location, *size, *cluster_size)
                    .await
                    .map_err(|e| e.to_string())
            }
            #[cfg(not(feature = "rbd"))]
            CreateOptions::Rbd { .. } => Err(NO_RBD.to_owned()),
            CreateOptions::Qcow2 { file, image } => {
                let daemon = self.daemon.upgrade().ok_or("the daemon is shutting down")?;
                let node = daemon.graph.get(file).map_err(|e| e.to_string())?;
                create_qcow2_on(&node, image)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

impl JobDriver for CreateJob {
    fn run(self: Arc<Self>, job: Arc<Job>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move {
            let r = self.create().await;
            // QEMU counts a create job as one unit of work, done either way.
            job.set_progress(1, 1);
            r
        })
    }
}

/// Creates (or reuses) a host file and sets its length, as QEMU's
/// `file` driver does, with QEMU's messages.
fn create_file(filename: &str, size: u64) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(filename)
        .map_err(|e| format!("Could not create '{filename}': {}", os_text(&e)))?;
    let resize = |len: u64| {
        rustix::fs::ftruncate(&file, len)
            .map_err(|e| format!("Could not resize file: {}", os_text(&e.into())))
    };
    resize(0)?;
    resize(size)
}

/// The OS's text for an error, without Rust's " (os error N)".
fn os_text(e: &std::io::Error) -> String {
    let t = e.to_string();
    t.split(" (os error").next().unwrap_or(&t).to_owned()
}

/// Why `driver=rbd` fails in a build without the `rbd` feature.
#[cfg(not(feature = "rbd"))]
const NO_RBD: &str = "this bitmirror was built without Ceph RBD support \
                      (build it with `cargo build --features rbd`)";

/// The `rbd` driver of a build without the `rbd` feature: refuses every
/// node with a message that says how to get one.
#[cfg(not(feature = "rbd"))]
pub struct NoRbd;

#[cfg(not(feature = "rbd"))]
impl block::DriverFactory for NoRbd {
    fn open<'a>(
        &'a self,
        _node: &'a str,
        _options: &'a block::BlockdevOptions,
    ) -> block::BoxFuture<'a, block::Result<(Box<dyn block::Driver>, bool)>> {
        Box::pin(async {
            Err(block::Error::Peer {
                errno: 95,
                message: NO_RBD.to_owned(),
            })
        })
    }
}
