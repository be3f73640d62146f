//! Errors of the RBD layer.

/// What went wrong talking to a Ceph cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A librados or librbd call failed; `what` says what was being done,
    /// in QEMU's words where QEMU has them ("error opening pool rbd").
    #[error("{what}: {}", errno_text(*.errno))]
    Call {
        /// What was being done.
        what: String,
        /// The positive errno librados/librbd returned (negated).
        errno: i32,
    },
    /// A name given to librados/librbd contains a NUL byte.
    #[error("{what} '{}' contains a NUL byte", .value.escape_debug())]
    Nul {
        /// Which name.
        what: &'static str,
        /// The name.
        value: String,
    },
    /// Options that the RBD layer does not accept.
    #[error("{0}")]
    Invalid(String),
}

/// The RBD layer's results.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno an NBD client or a QMP error should see.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Call { errno, .. } => *errno,
            Error::Nul { .. } | Error::Invalid(_) => libc_einval(),
        }
    }

    /// An error for the librados/librbd return value `ret` (negative).
    pub(crate) fn call(what: impl Into<String>, ret: i64) -> Error {
        Error::Call {
            what: what.into(),
            errno: i32::try_from(-ret).unwrap_or(5),
        }
    }
}

const fn libc_einval() -> i32 {
    22
}

/// The OS's text for `errno`, without Rust's "(os error N)" suffix.
fn errno_text(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

impl From<Error> for block::Error {
    fn from(e: Error) -> block::Error {
        block::Error::Peer {
            errno: e.errno(),
            message: e.to_string(),
        }
    }
}
