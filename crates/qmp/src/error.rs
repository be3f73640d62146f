//! What a command answers when it fails, and what the transport can fail
//! with.

use serde_json::{Value, json};

/// QEMU's error classes: what a client can match on besides the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything without a class of its own.
    GenericError,
    /// The command does not exist (or is not allowed in this state).
    CommandNotFound,
    /// A device (or block job) named by the command does not exist.
    DeviceNotFound,
    /// The device has no active block job.
    DeviceNotActive,
}

impl ErrorClass {
    /// The class as QMP writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// A failed command's answer: `{"error": {"class": …, "desc": …}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The class.
    pub class: ErrorClass,
    /// The human-readable text (QEMU's words where QEMU has the error).
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with `desc`.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of `class` with `desc`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> QmpError {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// The `error` member of the reply.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

impl From<qapi::Error> for QmpError {
    fn from(e: qapi::Error) -> QmpError {
        QmpError::generic(e.to_string())
    }
}
