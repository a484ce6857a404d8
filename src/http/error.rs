//! The API's error model: `{"error": "<code>", "message": "<sentence>", "request_id": "<id>"}`
//! with the status of SPEC section 5, for errors our handlers raise and for those the
//! middleware stack raises (timeouts, body limits, unknown routes and methods), which arrive
//! without a body.
//!
//! A handler's error does not know its request's id, so [`ApiError`] becomes a response with
//! its headers and an [`ErrorBody`] extension; the API's outermost layer ([`finish`]) writes
//! the body once the id is known.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::auth::AuthError;
use crate::cache::CacheError;

/// `Retry-After` of every 503: long enough for a DynamoDB or PostgreSQL blip to pass, short
/// enough that a client does not give up on a conversation.
pub(crate) const RETRY_AFTER_SECONDS: u64 = 5;

/// The `WWW-Authenticate` challenge of a 401 (RFC 6750 section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// `Bearer`: the request sent no credentials, so no error code (section 3.1).
    Plain,
    /// `Bearer error="..."`.
    Error(&'static str),
}

#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The `WWW-Authenticate` challenge of a 401.
    pub challenge: Option<Challenge>,
    /// Why the token check refused the request (`AuthError::reason`), for the access log.
    pub auth_failure: Option<&'static str>,
}

/// What an error response's body says, kept on the response until [`finish`] renders it with
/// the request id.
#[derive(Debug, Clone)]
pub(crate) struct ErrorBody {
    pub code: &'static str,
    pub message: String,
    pub auth_failure: Option<&'static str>,
}

#[derive(Serialize)]
struct Json<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    request_id: &'a str,
}

impl ApiError {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), challenge: None, auth_failure: None }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let reason = Some(e.reason());
        if e.is_unavailable() {
            if let AuthError::JwksUnavailable { detail } = &e {
                tracing::warn!(%detail, "cannot verify tokens: the JWKS is unavailable");
            }
            let mut err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string());
            err.auth_failure = reason;
            return err;
        }
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: e.to_string(),
            challenge: Some(e.www_authenticate_error().map_or(Challenge::Plain, Challenge::Error)),
            auth_failure: reason,
        }
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::Unavailable(detail) => {
                tracing::warn!(%detail, "a cache miss could not be served");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the data store is unavailable; try again later",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = error_head(self.status, self.challenge);
        res.extensions_mut().insert(ErrorBody {
            code: self.code,
            message: self.message,
            auth_failure: self.auth_failure,
        });
        res
    }
}

/// An error response without its body: status and headers.
fn error_head(status: StatusCode, challenge: Option<Challenge>) -> Response {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // An error is never worth keeping, unlike a 200 (whose ETag a client revalidates).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    match challenge {
        None => {}
        Some(Challenge::Plain) => {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        Some(Challenge::Error(err)) => {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer error=\"{err}\"")) {
                h.insert(header::WWW_AUTHENTICATE, v);
            }
        }
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    }
    res
}

fn render(code: &str, message: &str, request_id: &str) -> Body {
    Body::from(serde_json::to_vec(&Json { error: code, message, request_id }).unwrap_or_default())
}

/// The last step of every API response: the body of an [`ApiError`], the same JSON shape for
/// the bodyless errors of the middleware stack (408 from the timeout layer, 413 from the body
/// limit, 405 from method routing), and the request id as `x-request-id`. Returns what the
/// access log reports of a refused token.
pub(crate) fn finish(res: &mut Response, request_id: &HeaderValue) -> Option<&'static str> {
    let id = request_id.to_str().unwrap_or_default();
    let mut auth_failure = None;
    if let Some(e) = res.extensions_mut().remove::<ErrorBody>() {
        *res.body_mut() = render(e.code, &e.message, id);
        auth_failure = e.auth_failure;
    } else {
        let status = res.status();
        if (status.is_client_error() || status.is_server_error()) && !res.headers().contains_key(header::CONTENT_TYPE) {
            let (code, message) = match status {
                StatusCode::METHOD_NOT_ALLOWED => {
                    ("method_not_allowed", "this route only answers GET, HEAD and OPTIONS")
                }
                StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long"),
                StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
                    ("headers_too_large", "the request headers are too large")
                }
                StatusCode::NOT_FOUND => ("not_found", "no such route"),
                s if s.is_server_error() => ("unavailable", "the server cannot answer right now"),
                _ => ("bad_request", "the request is not valid"),
            };
            // Keep what the layer set (Allow on a 405, CORS headers), adding ours.
            let head = error_head(status, None);
            let (parts, _) = head.into_parts();
            for (k, v) in parts.headers {
                if let Some(k) = k {
                    res.headers_mut().insert(k, v);
                }
            }
            *res.body_mut() = render(code, message, id);
        }
    }
    res.headers_mut().insert(X_REQUEST_ID, request_id.clone());
    auth_failure
}

pub(crate) const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");
