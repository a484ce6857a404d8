//! The library's error type and the exit codes it maps to (sysexits, SPEC section 3).
//!
//! Every variant carries one finished sentence naming the key, endpoint or item at fault, so the
//! binary can print it as is.

use crate::config::ConfigError;

pub(crate) const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;
pub const EXIT_UNAVAILABLE: u8 = 69;
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A dependency (DynamoDB, Cognito, PostgreSQL, JWKS) could not be reached or timed out.
    #[error("{0}")]
    Unavailable(String),
    /// The command line asked for something that cannot be done as asked.
    #[error("{0}")]
    Usage(String),
    /// An AWS service answered the request with an error `code` that says the request, not the
    /// moment, is at fault (throttling and server errors are [`Error::Unavailable`]).
    #[error("{message}")]
    Service { code: String, message: String },
    /// Anything else: a dependency answered with an error, an item is missing, a check failed.
    #[error("{0}")]
    Failed(String),
    /// Whoever read our output went away (`| head`); nothing is wrong.
    #[error("output closed")]
    OutputClosed,
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => EXIT_CONFIG,
            Error::Unavailable(_) => EXIT_UNAVAILABLE,
            Error::Usage(_) => EXIT_USAGE,
            Error::Service { .. } | Error::Failed(_) => EXIT_FAILURE,
            Error::OutputClosed => EXIT_OK,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
