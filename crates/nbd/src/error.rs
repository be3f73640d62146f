//! The one error type of the NBD crate.
//!
//! Where QEMU reports the same failure of an export, the text is QEMU's
//! (checked against `qemu-storage-daemon` 10.0).

use std::io;

use crate::proto::ProtoError;

/// Everything that can fail in the NBD server or client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An export name that the server already has.
    #[error("NBD server already has export named '{0}'")]
    ExportNameExists(String),
    /// An export id that the server already has.
    #[error("Block export id '{0}' is already in use")]
    ExportIdExists(String),
    /// An export name longer than the protocol allows.
    #[error("export name '{0}' too long")]
    ExportNameTooLong(String),
    /// A description longer than the protocol allows.
    #[error("description '{0}' too long")]
    DescriptionTooLong(String),
    /// No export with this id.
    #[error("Export '{0}' is not found")]
    ExportNotFound(String),
    /// Safe removal of an export that clients still use.
    #[error("export '{0}' still in use")]
    ExportInUse(String),
    /// A bitmap to publish that is on neither the node nor its backing chain.
    #[error("Bitmap '{0}' is not found")]
    BitmapNotFound(String),
    /// An enabled bitmap on a read-only export of a writable node: the
    /// client would see it change under a "read-only" export.
    #[error("Enabled bitmap '{0}' incompatible with readonly export")]
    EnabledBitmapReadonly(String),
    /// A writable export of a read-only node.
    #[error("Block node is read-only")]
    ReadOnlyNode,
    /// The block layer refused.
    #[error(transparent)]
    Block(#[from] block::Error),
    /// A socket could not be set up.
    #[error("{what}: {source}")]
    Socket {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The peer broke the protocol.
    #[error("NBD protocol error: {0}")]
    Protocol(#[from] ProtoError),
    /// The server refused an option or a request.
    #[error("{0}")]
    Refused(String),
    /// The server answered a request with an error.
    #[error("{message}")]
    Request {
        /// The error number the server sent.
        errno: i32,
        /// What it said.
        message: String,
    },
    /// TLS credentials that cannot be used, or a TLS handshake that
    /// failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The connection failed or was closed.
    #[error("NBD connection lost: {0}")]
    Disconnected(String),
}

impl Error {
    /// This error as the block layer reports it: a server's error number
    /// is kept; a lost connection is `EIO`.
    pub fn into_block(self) -> block::Error {
        match self {
            Error::Block(e) => e,
            Error::Request { errno, message } => block::Error::Peer { errno, message },
            Error::Disconnected(_) => block::Error::Peer {
                errno: EIO,
                message: self.to_string(),
            },
            other => block::Error::Peer {
                errno: EIO,
                message: other.to_string(),
            },
        }
    }
}

const EIO: i32 = 5;

/// A result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
