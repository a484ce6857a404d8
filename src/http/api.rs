//! The JSON routes (SPEC section 5), byte-compatible with the Flask app's
//! `GET /api/message_groups` and `GET /api/messages/{uuid}`.
//!
//! Every request: token -> `sub` -> `users.uuid` (403 when not provisioned) -> the caller's
//! conversation list. A conversation the caller is not in is a 404, exactly like one that does
//! not exist, so its existence is not revealed.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use super::auth::AuthSlot;
use super::error::{finish, ApiError, X_REQUEST_ID};
use super::{cursor, flask_json};
use crate::cache::Cache;
use crate::metrics::{ApiRoute, Metrics};
use crate::model::{ApiEntry, MessageGroup, MessageGroupId, Sk, UserUuid};

pub(crate) const DEFAULT_LIMIT: usize = 20;
pub(crate) const MAX_LIMIT: usize = 100;
/// GETs carry no body; anything beyond this is refused with 413.
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024;

pub(crate) const GROUPS_ROUTE: &str = "/api/message_groups";
pub(crate) const MESSAGES_ROUTE: &str = "/api/messages/{message_group_uuid}";

pub struct ApiState {
    pub cache: Arc<Cache>,
    /// Swapped as a whole when a reload changes `[auth]`.
    pub auth: Arc<AuthSlot>,
    pub metrics: Arc<Metrics>,
    /// The CORS policy of `http.cors_allowed_origins`, consulted per request so that a reload
    /// applies to the next request (`None`: no CORS headers at all).
    cors: RwLock<Option<CorsLayer>>,
    /// `log.access`: one log line per request (live).
    access_log: AtomicBool,
}

impl ApiState {
    pub(crate) fn new(
        cache: Arc<Cache>,
        auth: Arc<AuthSlot>,
        metrics: Arc<Metrics>,
        cors_allowed_origins: &[String],
    ) -> Self {
        ApiState {
            cache,
            auth,
            metrics,
            cors: RwLock::new(cors_layer(cors_allowed_origins)),
            access_log: AtomicBool::new(false),
        }
    }

    /// Turns the access log (`log.access`) on or off from the next request on.
    pub(crate) fn set_access_log(&self, on: bool) {
        self.access_log.store(on, Ordering::Relaxed);
    }

    /// Replaces the CORS policy; the next request sees the new one.
    pub(crate) fn set_cors_allowed_origins(&self, origins: &[String]) {
        let layer = cors_layer(origins);
        *self.cors.write().unwrap_or_else(|e| e.into_inner()) = layer;
    }
}

/// What the API router needs from the config (CORS origins live in [`ApiState`]).
#[derive(Clone, Debug)]
pub(crate) struct ApiOptions {
    pub request_timeout: Duration,
}

pub(crate) fn router(state: Arc<ApiState>, opts: &ApiOptions) -> Router {
    Router::new()
        .route(GROUPS_ROUTE, get(message_groups))
        .route(MESSAGES_ROUTE, get(messages))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, opts.request_timeout))
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        // outermost, so timeouts and refusals are counted and given a JSON body too
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .with_state(state)
}

/// Everything the API does around a route, in one layer rather than one per concern (each
/// `from_fn` costs a boxed future and a service clone per request, measurable on a cached
/// request; docs/benchmarks.md): tower-http's CORS logic with the policy in force at this request, the
/// request metrics by route (the matched template, never the raw path), the request id, the
/// JSON body of every error (with that id), and the access log line.
async fn edge(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let route = match req.extensions().get::<MatchedPath>().map(MatchedPath::as_str) {
        Some(GROUPS_ROUTE) => ApiRoute::MessageGroups,
        Some(MESSAGES_ROUTE) => ApiRoute::Messages,
        _ => ApiRoute::Other,
    };
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let access = state.access_log.load(Ordering::Relaxed).then(|| (req.method().clone(), req.uri().path().to_owned()));
    // CORS only concerns browsers, which always send Origin; API clients and probes skip the
    // policy (and its per-request clone) altogether.
    let cors = match req.headers().contains_key(header::ORIGIN) {
        true => state.cors.read().unwrap_or_else(|e| e.into_inner()).clone(),
        false => None,
    };
    let res = match cors {
        None => next.run(req).await,
        Some(layer) => match layer.layer(next).oneshot(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        },
    };
    let mut res = res;
    let elapsed = started.elapsed();
    state.metrics.http_request(route, res.status().as_u16(), elapsed.as_secs_f64());
    let auth_failure = finish(&mut res, &request_id);
    if let Some((method, path)) = access {
        tracing::info!(
            target: "cruddur_syncd::access",
            %method,
            %path,
            route = route.as_str(),
            status = res.status().as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            request_id = request_id.to_str().unwrap_or_default(),
            auth_failure,
            "request"
        );
    }
    res
}

/// The request's id: the caller's `x-request-id` when it sent a sane one (1 to 64 of
/// `A-Z a-z 0-9 - _ . :`, as a proxy in front would), else a fresh random one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
        let b = v.as_bytes();
        if (1..=64).contains(&b.len()) && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c)) {
            return v.clone();
        }
    }
    let mut buf = [0u8; 16];
    let n: u64 = rand::random();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    // 16 hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // validate() accepted only well-formed origins, so none is dropped here in practice.
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::IF_NONE_MATCH])
            .expose_headers([header::ETAG, header::LINK])
            .max_age(Duration::from_secs(600)),
    )
}

#[derive(Deserialize)]
pub(crate) struct PageParams {
    limit: Option<String>,
    before: Option<String>,
}

fn parse_limit(raw: Option<&str>) -> Result<usize, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!("limit must be an integer from 1 to {MAX_LIMIT}"))),
        },
    }
}

/// `limit` and `before` from the query string. Most requests have none, and then nothing is
/// parsed (the `Query` extractor would run serde over the empty string on every request).
fn params(uri: &Uri) -> Result<(usize, Option<String>), ApiError> {
    if uri.query().is_none() {
        return Ok((DEFAULT_LIMIT, None));
    }
    let Query(p) = Query::<PageParams>::try_from_uri(uri)
        .map_err(|_: QueryRejection| ApiError::bad_request("the query string is not valid"))?;
    Ok((parse_limit(p.limit.as_deref())?, p.before))
}

/// The caller's `users.uuid`, from the token, and how stale the mapping was when it came from
/// an entry served past its TTL.
async fn caller(state: &ApiState, headers: &HeaderMap) -> Result<(UserUuid, Option<Duration>), ApiError> {
    let refused = |e: super::auth::AuthError| {
        state.metrics.auth_failure(e.reason());
        tracing::debug!(reason = e.reason(), "token refused: {e}");
        ApiError::from(e)
    };
    let header = match headers.get(header::AUTHORIZATION) {
        None => None,
        // UTF-8 rather than `to_str`'s visible-ASCII pass over the whole token: the token's
        // own character check (on a cache miss) is stricter than both.
        Some(v) => Some(std::str::from_utf8(v.as_bytes()).map_err(|_| refused(super::auth::AuthError::BadScheme))?),
    };
    let verified = state.auth.current().verify(header).await.map_err(refused)?;
    let served = state.cache.user(&verified.sub).await?;
    match *served.value {
        Some(user) => Ok((user, served.stale_age)),
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "user_not_provisioned",
            "the token is valid but no Cruddur user is linked to it yet",
        )),
    }
}

/// The oldest of the stale ages a response was made from (`Age`, RFC 9111); none when every
/// part was fresh.
fn stale_age(ages: &[Option<Duration>]) -> Option<Duration> {
    ages.iter().flatten().max().copied()
}

// Handlers take the whole request last (not a `HeaderMap`, which axum would clone) and read
// its headers in place.
async fn message_groups(State(state): State<Arc<ApiState>>, req: Request) -> Result<Response, ApiError> {
    let headers = req.headers();
    let (limit, before) = params(req.uri())?;
    let before = match before.as_deref() {
        None => None,
        Some(c) => Some(cursor::decode_group(c).ok_or_else(|| ApiError::bad_request("before is not a valid cursor"))?),
    };
    let (user, user_age) = caller(&state, headers).await?;
    let rows = state.cache.groups(user).await?;
    let age = stale_age(&[user_age, rows.stale_age]);
    if before.is_none() && limit == DEFAULT_LIMIT {
        if let Some(page) = rows.value.memo(|view| groups_page(view, limit, None)) {
            return Ok(respond(headers, page, age));
        }
    }
    Ok(respond(headers, &groups_page(rows.value.view(), limit, before.as_ref()), age))
}

fn groups_page(view: &[MessageGroup], limit: usize, before: Option<&(Sk, MessageGroupId)>) -> Rendered {
    let after_cursor = |g: &&MessageGroup| match before {
        None => true,
        Some((sk, id)) => g.sk < *sk || (g.sk == *sk && g.message_group_uuid > *id),
    };
    let mut page = view.iter().filter(after_cursor);
    let items: Vec<_> = page.by_ref().take(limit).collect();
    let next = match (items.last(), page.next()) {
        (Some(last), Some(_)) => Some(cursor::encode_group(&last.sk, last.message_group_uuid)),
        _ => None,
    };
    let entries: Vec<ApiEntry> = items.iter().map(|g| g.api_entry()).collect();
    render(&entries, next.map(|c| format!("{GROUPS_ROUTE}?limit={limit}&before={c}")))
}

async fn messages(
    State(state): State<Arc<ApiState>>,
    Path(group): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers();
    let group: MessageGroupId =
        group.parse().map_err(|_| ApiError::bad_request("the message group id is not a uuid"))?;
    let (limit, before) = params(req.uri())?;
    let before = match before.as_deref() {
        None => None,
        Some(c) => {
            Some(cursor::decode_message(c).ok_or_else(|| ApiError::bad_request("before is not a valid cursor"))?)
        }
    };
    let (user, user_age) = caller(&state, headers).await?;
    let rows = state.cache.groups(user).await?;
    if !rows.value.contains_group(group) {
        return Err(ApiError::not_found("no such conversation"));
    }
    let served = state.cache.messages_page(group, limit, before.as_ref()).await?;
    let age = stale_age(&[user_age, rows.stale_age, served.stale_age]);
    let page = &served.value;
    let next = match (page.more, page.items.first()) {
        (true, Some(oldest)) => Some(cursor::encode_message(&oldest.sk)),
        _ => None,
    };
    let entries: Vec<ApiEntry> = page.items.iter().map(|m| m.api_entry()).collect();
    let link = next.map(|c| format!("/api/messages/{group}?limit={limit}&before={c}"));
    Ok(respond(headers, &render(&entries, link), age))
}

/// A response rendered once and served many times: the body and its header values, ready to
/// be cloned (a reference count each) into every response.
#[derive(Debug, Clone)]
pub(crate) struct Rendered {
    pub body: bytes::Bytes,
    pub etag: HeaderValue,
    /// The `Link: <...>; rel="next"` value, when there is a next page.
    pub link: Option<HeaderValue>,
}

/// The body, its validator and the next page's link.
fn render(entries: &[ApiEntry], next: Option<String>) -> Rendered {
    let body = flask_json::body(entries);
    // Both values are ASCII by construction (hex digits; a path, uuids and base64url), so
    // `from_str` cannot refuse them; `None` would only drop the header, never the page.
    Rendered {
        etag: HeaderValue::from_str(&etag(&body)).unwrap_or_else(|_| HeaderValue::from_static("\"\"")),
        link: next.and_then(|url| HeaderValue::from_str(&format!("<{url}>; rel=\"next\"")).ok()),
        body: body.into(),
    }
}

/// A 200 with ETag, Cache-Control and Link, or a 304 when the client already has it; with
/// `Age` when it was made from an entry served stale.
fn respond(headers: &HeaderMap, page: &Rendered, stale_age: Option<Duration>) -> Response {
    let mut res = if if_none_match(headers, page.etag.as_bytes()) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = page.body.clone().into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    let h = res.headers_mut();
    // Kept, but revalidated every time (If-None-Match -> 304): no-store would stop a browser
    // from ever revalidating the ETag.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
    h.insert(header::ETAG, page.etag.clone());
    if let Some(link) = &page.link {
        h.insert(header::LINK, link.clone());
    }
    if let Some(age) = stale_age {
        h.insert(header::AGE, HeaderValue::from(age.as_secs()));
    }
    res
}

/// A strong validator of the exact bytes (a keyed hash is not needed: it only has to change
/// when the body does).
fn etag(body: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    format!("\"{:016x}{:08x}\"", h.finish(), body.len())
}

fn if_none_match(headers: &HeaderMap, etag: &[u8]) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').map(|t| t.trim().as_bytes()).any(|t| t == b"*" || t == etag || t.strip_prefix(b"W/") == Some(etag))
    })
}
