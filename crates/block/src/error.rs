//! The one error type of the block layer.
//!
//! Where QEMU has a message for the same failure, the `Display` text is
//! QEMU's, word for word (checked against `qemu-storage-daemon` 10.0), so
//! that scripts which match on error descriptions keep working.

use std::io;

/// Everything that can fail in the block layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- options ---------------------------------------------------------
    /// Options that break QAPI's rules (missing, unexpected or ill-typed
    /// members).
    #[error(transparent)]
    Qapi(#[from] qapi::Error),
    /// `detect-zeroes=unmap` without `discard=unmap`.
    #[error(
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
    )]
    DetectZeroesUnmap,
    /// A raw node's `size` that is not a multiple of 512.
    #[error("Specified size is not multiple of 512")]
    RawSizeAlignment,
    /// A raw node's `offset` past the end of its child.
    #[error("Offset ({offset}) cannot be greater than size of the containing file ({file_size})")]
    RawOffsetTooLarge {
        /// The `offset` option.
        offset: u64,
        /// Length of the child.
        file_size: u64,
    },
    /// A raw node's `offset` + `size` past the end of its child. (QEMU's text
    /// has the double space.)
    #[error(
        "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  \
         actual size of the containing file ({file_size})"
    )]
    RawRangeTooLarge {
        /// The `offset` option.
        offset: u64,
        /// The `size` option.
        size: u64,
        /// Length of the child.
        file_size: u64,
    },

    /// Throttle limits that break QEMU's rules.
    #[error("{0}")]
    Throttle(String),
    /// A `throttle` node naming a group that does not exist.
    #[error("Throttle group '{0}' does not exist")]
    NoThrottleGroup(String),
    /// Deleting a throttle group that nodes still use.
    #[error("object '{0}' is in use, can not be deleted")]
    ThrottleGroupInUse(String),

    // ---- graph -----------------------------------------------------------
    /// A root node added without a name.
    #[error("'node-name' must be specified for the root node")]
    NodeNameMissing,
    /// A node name that breaks QEMU's rules.
    #[error("Invalid node-name: '{0}'")]
    InvalidNodeName(String),
    /// A node name longer than 31 bytes.
    #[error("Node name too long")]
    NodeNameTooLong,
    /// A node name that is taken.
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNode(String),
    /// A reference to a node that does not exist.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NodeNotFound(String),
    /// `blockdev-del` of a node that does not exist.
    #[error("Failed to find node with node-name='{0}'")]
    NoSuchNodeToDelete(String),
    /// Deleting a node that an export or a job uses.
    #[error("Node {0} is in use")]
    NodeInUse(String),
    /// Deleting a node that another node uses as a child.
    #[error("Block device {0} is in use")]
    NodeHasParents(String),
    /// Deleting a node that was created implicitly, as another's child.
    #[error("Node {0} is not owned by the monitor")]
    NodeNotOwned(String),
    /// Replacing a node by one of a different length, or by itself.
    #[error("Cannot replace node '{from}' with '{to}': {reason}")]
    CannotReplace {
        /// The node being replaced.
        from: String,
        /// Its replacement.
        to: String,
        /// Why not.
        reason: &'static str,
    },
    /// An image that is not what its format says, or damaged.
    #[error("Image '{node}' is not a valid {format} image: {reason}")]
    BadImage {
        /// The node.
        node: String,
        /// The format (`qcow2`).
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An image that uses a feature bitmirror does not implement.
    #[error("Image '{node}' uses {feature}, which bitmirror does not support")]
    UnsupportedFeature {
        /// The node.
        node: String,
        /// The feature, as the format's documentation names it.
        feature: String,
    },
    /// An image that can be read but not opened for writing as it is.
    #[error("Image '{node}' cannot be opened read-write: {reason}")]
    NotWritable {
        /// The node.
        node: String,
        /// Why, and what to do about it.
        reason: String,
    },
    /// A driver that this process has not registered (see
    /// [`crate::Graph::register_driver`]).
    #[error("Driver '{0}' is not available here")]
    DriverUnavailable(&'static str),
    /// A driver talking to a peer failed, with the peer's or the driver's
    /// words (e.g. an NBD server refusing an export or a request).
    #[error("{message}")]
    Peer {
        /// The POSIX errno protocols should report.
        errno: i32,
        /// What went wrong.
        message: String,
    },
    /// Opening an image file failed.
    #[error("Could not open '{path}': {}", os_message(.source))]
    Open {
        /// The file name as given.
        path: String,
        /// What the OS said.
        source: io::Error,
    },

    // ---- requests --------------------------------------------------------
    /// A write-type request on a read-only node.
    #[error("Block node '{0}' is read-only")]
    ReadOnly(String),
    /// A request that reaches past the end of the node.
    #[error("Request {offset}+{len} is beyond the end of node '{node}' ({size} bytes)")]
    OutOfRange {
        /// The node.
        node: String,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Length of the node.
        size: u64,
    },
    /// A compressed write that is not made of whole clusters.
    #[error(
        "Compressed write {offset}+{len} on node '{node}' is not whole clusters of {cluster_size} bytes"
    )]
    CompressedUnaligned {
        /// The node.
        node: String,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// The node's cluster size.
        cluster_size: u64,
    },
    /// The driver cannot do this request (e.g. a fast zero it cannot make
    /// fast).
    #[error("Operation not supported: {0}")]
    NotSupported(&'static str),
    /// An I/O error from the OS or a peer.
    #[error("{op} failed: {}", os_message(.source))]
    Io {
        /// The operation (`read`, `write`, …).
        op: &'static str,
        /// What the OS said; [`Error::errno`] maps it for protocols.
        source: io::Error,
    },

    // ---- dirty bitmaps ---------------------------------------------------
    /// A bitmap name that is empty.
    #[error("Bitmap name cannot be empty")]
    BitmapNameEmpty,
    /// A bitmap name longer than 1023 bytes.
    #[error("Bitmap name too long: {0}")]
    BitmapNameTooLong(String),
    /// A granularity that is not a power of two in 512..=2^31.
    #[error("Granularity must be power of 2 and at least 512")]
    BitmapGranularity,
    /// A bitmap name that is taken on this node.
    #[error("Bitmap already exists: {0}")]
    BitmapExists(String),
    /// No bitmap of this name on the node.
    #[error("Dirty bitmap '{0}' not found")]
    BitmapNotFound(String),
    /// The node named in a bitmap command does not exist.
    #[error("Node '{0}' not found")]
    BitmapNodeNotFound(String),
    /// The bitmap is used by a job or has a successor.
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    BitmapBusy(String),
    /// The bitmap was loaded read-only.
    #[error("Bitmap '{0}' is readonly and cannot be modified")]
    BitmapReadonly(String),
    /// The bitmap was not saved cleanly and cannot be trusted.
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    BitmapInconsistent(String),
    /// Merging bitmaps of different disk sizes.
    #[error(
        "Bitmaps are of different sizes (destination size is {dest}, source size is {src}) \
         and can't be merged"
    )]
    BitmapSizeMismatch {
        /// Size covered by the target.
        dest: u64,
        /// Size covered by the source.
        src: u64,
    },
    /// Creating a successor for a busy bitmap.
    #[error("Cannot create a successor for a bitmap that is in-use by an operation")]
    SuccessorOfBusy,
    /// Creating a second successor.
    #[error("Cannot create a successor for a bitmap that already has one")]
    SuccessorExists,
    /// Abdicating or reclaiming without a successor.
    #[error("Cannot {0} if there's no successor present")]
    NoSuccessor(&'static str),
    /// A persistent bitmap on a node that cannot store one.
    #[error("Can't store persistent bitmaps to {0}: Operation not supported")]
    PersistenceUnsupported(String),
    /// A persistent bitmap whose stored bits would exceed QEMU's limit
    /// (512 MiB).
    #[error(
        "Can't make bitmap '{name}' persistent in '{node}': Too much space will be occupied by \
         the bitmap. Use larger granularity"
    )]
    BitmapTooLarge {
        /// The bitmap.
        name: String,
        /// The node.
        node: String,
    },
    /// The bitmap engine refused (e.g. out of memory).
    #[error(transparent)]
    Bitmap(#[from] hbitmap::Error),
}

impl Error {
    /// The POSIX errno that protocols (NBD) should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::Open { source, .. } => source
                .raw_os_error()
                .unwrap_or(rustix::io::Errno::IO.raw_os_error()),
            Error::ReadOnly(_) => rustix::io::Errno::PERM.raw_os_error(),
            Error::Peer { errno, .. } => *errno,
            Error::OutOfRange { .. } => rustix::io::Errno::INVAL.raw_os_error(),
            Error::NotSupported(_) => rustix::io::Errno::NOTSUP.raw_os_error(),
            Error::Bitmap(hbitmap::Error::OutOfMemory { .. }) => {
                rustix::io::Errno::NOMEM.raw_os_error()
            }
            _ => rustix::io::Errno::INVAL.raw_os_error(),
        }
    }

    /// An [`Error::Io`] for `op` from an OS error.
    pub(crate) fn io(op: &'static str, source: io::Error) -> Error {
        Error::Io { op, source }
    }
}

/// The OS's message for an I/O error without Rust's " (os error N)" suffix,
/// the way QEMU prints `strerror()`.
fn os_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

/// Results of the block layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
