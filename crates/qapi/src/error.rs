//! The one error type of QAPI input.

/// Input that breaks QAPI's rules. The `Display` text is QEMU's, word for
/// word, so that scripts matching on error descriptions keep working.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A member has the wrong JSON type.
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidParameterType {
        /// Dotted name of the member (`null` for the top level).
        name: String,
        /// QAPI's name of the expected type (`boolean`, `string`, …).
        expected: &'static str,
    },
    /// A member that the schema does not have.
    #[error("Parameter '{0}' is unexpected")]
    UnexpectedParameter(String),
    /// A mandatory member is absent.
    #[error("Parameter '{0}' is missing")]
    MissingParameter(String),
    /// An enum member with a value outside its set.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    InvalidValue {
        /// Dotted name of the member.
        name: String,
        /// The value given.
        value: String,
    },
    /// A number (or, in key=value input, a string) that does not convert
    /// to the member's type.
    #[error("Parameter '{name}' expects {expected}")]
    ParameterRange {
        /// Dotted name of the member.
        name: String,
        /// What QEMU says it expects (`uint64`, `integer`, `size`, …).
        expected: &'static str,
    },
    /// key=value syntax: a key that is not a QAPI name or list index.
    #[error("Invalid parameter '{0}'")]
    KeyvalInvalidKey(String),
    /// key=value syntax: a key without `=`.
    #[error("Expected '=' after parameter '{0}'")]
    KeyvalExpectedEquals(String),
    /// key=value syntax: a key fragment of 128 bytes or more.
    #[error("Parameter{} '{key}' is too long", if *.fragment { " fragment" } else { "" })]
    KeyvalKeyTooLong {
        /// The key (or fragment).
        key: String,
        /// Whether it is a fragment of a dotted key.
        fragment: bool,
    },
    /// key=value syntax: the same key used as a value and as an object
    /// (`a=1,a.b=2`), or as a list and an object.
    #[error("Parameters '{0}' used inconsistently")]
    KeyvalInconsistent(String),
    /// key=value syntax: a list with a gap (`a.1=x` without `a.0`).
    #[error("Parameter '{0}' missing")]
    KeyvalMissingIndex(String),
}

/// Results of QAPI input.
pub type Result<T, E = Error> = std::result::Result<T, E>;
