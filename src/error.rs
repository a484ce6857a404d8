//! The library's error type and the exit codes it maps to (sysexits, SPEC section 3).
//!
//! Every variant carries one finished sentence naming the key, endpoint or item at fault, so the
//! binary can print it as is.

// The three SDKs share these types (re-exports of the smithy runtime's).
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::config::ConfigError;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
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

/// Turns an AWS SDK error into a sentence: `context` says what was attempted against which
/// endpoint. Connection failures and timeouts are "unavailable"; an answer that is an error
/// (a missing table, a refused request) is a failure with the service's own code and message.
pub fn from_sdk<E>(context: impl AsRef<str>, err: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let context = context.as_ref();
    match &err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            let code = e.code().unwrap_or("error");
            let message = match e.message() {
                Some(m) if !m.is_empty() => format!("{context}: {code}: {m}"),
                _ => format!("{context}: {code}"),
            };
            // Throttling and the service's own failures pass: the dependency is there but cannot
            // serve now, which callers treat like an unreachable one (retry later, exit 69).
            if is_transient_code(code) || se.raw().status().is_server_error() {
                return Error::Unavailable(message);
            }
            Error::Service { code: code.to_string(), message }
        }
        _ => Error::Unavailable(format!("{context}: {}", DisplayErrorContext(&err))),
    }
}

/// The service error code of an SDK error, if the service answered with one.
pub fn sdk_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<&str> {
    match err {
        SdkError::ServiceError(se) => se.err().code(),
        _ => None,
    }
}

/// Error codes that say the request's content is at fault: sending it again can never work.
/// Everything else an AWS service answers (permissions, credentials, a missing table) is about
/// the moment, not the request.
pub fn is_request_fault_code(code: &str) -> bool {
    matches!(code, "ValidationException" | "SerializationException" | "ItemCollectionSizeLimitExceededException")
}

/// AWS error codes that say "not now" rather than "not this request": throttling, limits and
/// server-side failures.
pub fn is_transient_code(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "Throttling"
            | "RequestLimitExceeded"
            | "LimitExceededException"
            | "TooManyRequestsException"
            | "InternalServerError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "TransactionInProgressException"
    )
}
