//! The API's error model: `{"error": "<code>", "message": "<sentence>"}` with the status of
//! SPEC section 5, for errors our handlers raise and for those the middleware stack raises
//! (timeouts, body limits, unknown routes and methods), which arrive without a body.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::auth::AuthError;
use crate::cache::CacheError;

#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// RFC 6750 error for `WWW-Authenticate` on a 401.
    pub bearer_error: Option<&'static str>,
}

#[derive(Serialize)]
struct Body_<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), bearer_error: None }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        if e.is_unavailable() {
            if let AuthError::JwksUnavailable { detail } = &e {
                tracing::warn!(%detail, "cannot verify tokens: the JWKS is unavailable");
            }
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string());
        }
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: e.to_string(),
            bearer_error: Some(e.www_authenticate_error()),
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
        json_error(self.status, self.code, &self.message, self.bearer_error)
    }
}

pub(crate) fn json_error(status: StatusCode, code: &str, message: &str, bearer_error: Option<&str>) -> Response {
    let body = serde_json::to_vec(&Body_ { error: code, message }).unwrap_or_default();
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    if let Some(err) = bearer_error {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer error=\"{err}\"")) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
    }
    res
}

/// Gives the bodyless errors of the middleware stack (408 from the timeout layer, 413 from the
/// body limit, 405 from method routing) the same JSON shape as ours.
pub(crate) fn bodyless_errors_as_json(res: Response) -> Response {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) || res.headers().contains_key(header::CONTENT_TYPE) {
        return res;
    }
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this route only answers GET and OPTIONS"),
        StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ("headers_too_large", "the request headers are too large"),
        StatusCode::NOT_FOUND => ("not_found", "no such route"),
        s if s.is_server_error() => ("unavailable", "the server cannot answer right now"),
        _ => ("bad_request", "the request is not valid"),
    };
    let (mut parts, _) = res.into_parts();
    let mut fresh = json_error(status, code, message, None);
    // Keep what the layer set (Allow on a 405, CORS headers), adding ours.
    for (k, v) in fresh.headers_mut().drain() {
        if let Some(k) = k {
            parts.headers.insert(k, v);
        }
    }
    Response::from_parts(parts, fresh.into_body())
}
