//! What an AWS SDK error means, decided in one place: the service's error code when it sent
//! one, else the HTTP status or the failure to get an answer at all.

// The three SDKs share these types (they are re-exports of the smithy runtime's).
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::error::Error;

/// The service error code of an SDK error, if the service answered with one.
pub fn code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<&str> {
    match err {
        SdkError::ServiceError(se) => se.err().code(),
        _ => None,
    }
}

/// Error codes that say "slow down", for every service this daemon calls (DynamoDB, Streams,
/// Cognito): the one list of them.
pub fn is_throttling_code(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "Throttling"
            | "RequestLimitExceeded"
            | "LimitExceededException"
            | "TooManyRequestsException"
    )
}

/// Error codes that say "not now" rather than "not this request": throttling, and the
/// services' own failures.
pub fn is_transient_code(code: &str) -> bool {
    is_throttling_code(code)
        || matches!(
            code,
            "InternalServerError"
                | "InternalFailure"
                | "InternalErrorException"
                | "ServiceUnavailable"
                | "ServiceUnavailableException"
                | "TransactionInProgressException"
        )
}

/// How an SDK call failed, by what the caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// No answer at all: the connection failed or the call timed out.
    NoAnswer,
    /// An answer that says "not now": throttling, a limit, a server error.
    Transient,
    /// The service answered with this error code about the request.
    Code,
    /// An answer without a code that is not a server error.
    Other,
}

pub fn classify<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Class {
    let server_error = |r: &HttpResponse| {
        let s = r.status().as_u16();
        s >= 500 || s == 429
    };
    match err {
        // A server error is "not now" whatever its code says; moto answers bad input with an
        // HTML 500 that has no code at all.
        SdkError::ServiceError(se) => match se.err().code() {
            Some(c) if is_transient_code(c) || server_error(se.raw()) => Class::Transient,
            Some(_) => Class::Code,
            None if server_error(se.raw()) => Class::Transient,
            None => Class::Other,
        },
        SdkError::ResponseError(re) if server_error(re.raw()) => Class::Transient,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => Class::NoAnswer,
        _ => Class::Other,
    }
}

/// Turns an AWS SDK error into a sentence: `context` says what was attempted against which
/// endpoint. Connection failures, timeouts and "not now" answers (throttling, 5xx) are
/// [`Error::Unavailable`] (callers retry later, a tool exits 69); any other answer is
/// [`Error::Service`] with the service's own code and message.
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
            if is_transient_code(code) || se.raw().status().is_server_error() {
                return Error::Unavailable(message);
            }
            Error::Service { code: code.to_string(), message }
        }
        _ => Error::Unavailable(format!("{context}: {}", DisplayErrorContext(&err))),
    }
}

/// Error codes that say the request's content is at fault: sending it again can never work.
/// Everything else a service answers (permissions, credentials, a missing table) is about the
/// moment, not the request.
pub fn is_request_fault_code(code: &str) -> bool {
    matches!(code, "ValidationException" | "SerializationException" | "ItemCollectionSizeLimitExceededException")
}
