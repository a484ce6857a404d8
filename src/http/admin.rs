//! The admin listener (SPEC section 6): liveness, readiness with named checks, and metrics.
//! It runs on its own address so probes and scrapes never compete with API clients.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

use super::auth::AuthSlot;
use crate::cache::Cache;
use crate::health::{PgHealth, Probes, POSTGRES_FRESHNESS};
use crate::heartbeat::Heartbeat;
use crate::metrics::Metrics;
use crate::stream::TailerStatus;

pub(crate) struct AdminState {
    pub metrics: Arc<Metrics>,
    pub cache: Arc<Cache>,
    pub auth: Arc<AuthSlot>,
    pub pg: Arc<PgHealth>,
    /// The stream tailer's status; ready when it holds a position on every open shard.
    pub stream_status: watch::Receiver<TailerStatus>,
    /// Set when shutdown begins; readiness fails from then on.
    pub shutting_down: Arc<AtomicBool>,
    /// Beaten by the API's accept loop; with the tailer's progress, what liveness looks at.
    pub api_heartbeat: Arc<Heartbeat>,
}

pub(crate) fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// 200 while the stream loop and the API's accept loop make progress (the same view as the
/// systemd watchdog, without dependency checks): a wedged daemon is restarted by its
/// orchestrator. A daemon that is shutting down is on its way out and stays "alive".
async fn livez(State(s): State<Arc<AdminState>>) -> Response {
    let probes = Probes { stream: s.stream_status.clone(), api: s.api_heartbeat.clone(), cache: s.cache.clone() };
    match probes.stuck(Duration::ZERO) {
        Some(why) if !s.shutting_down.load(Ordering::Acquire) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "stuck", "reason": why }))).into_response()
        }
        _ => Json(json!({ "status": "alive" })).into_response(),
    }
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    let checks = [
        ("shutdown", !s.shutting_down.load(Ordering::Acquire), "shutting down"),
        ("stream", s.stream_status.borrow().positioned, "the stream tailer is not positioned on every open shard"),
        ("postgres", s.pg.answered_within(POSTGRES_FRESHNESS), "PostgreSQL has not answered in the last 30s"),
        ("jwks", s.auth.current().jwks_loaded(), "the token signing keys are not loaded"),
    ];
    let ready = checks.iter().all(|(_, ok, _)| *ok);
    let detail: serde_json::Map<String, serde_json::Value> =
        checks.iter().map(|(name, ok, why)| (name.to_string(), if *ok { json!("ok") } else { json!(why) })).collect();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({ "status": if ready { "ready" } else { "not_ready" }, "checks": detail });
    (status, Json(body)).into_response()
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text format for
/// everyone else.
async fn metrics(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    s.cache.refresh_gauges().await;
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let (body, content_type) = if openmetrics {
        (s.metrics.encode(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
    } else {
        (s.metrics.encode_prometheus(), "text/plain; version=0.0.4; charset=utf-8")
    };
    let mut res = body.into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}
