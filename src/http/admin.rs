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
use crate::dependency::{Dependencies, DependencyStatus};
use crate::health::Probes;
use crate::heartbeat::Heartbeat;
use crate::metrics::{DependencyLabels, Metrics};
use crate::stream::TailerStatus;

pub(crate) struct AdminState {
    pub metrics: Arc<Metrics>,
    pub cache: Arc<Cache>,
    pub auth: Arc<AuthSlot>,
    /// How each dependency did at its last call: reported, never a reason to be unready.
    pub deps: Arc<Dependencies>,
    /// The stream tailer's status; ready once it held a position on every open shard.
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

/// "Can serve" (SPEC section 6): the keys are loaded, the tailer positioned itself once, and
/// shutdown has not begun. Dependencies are reported in `checks` but never fail it: this daemon
/// runs as a sidecar, and a 503 here takes the app's pod out with it while cached users could
/// still be served.
async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let mut check = |name: &str, outcome: Result<String, &str>| {
        let text = match outcome {
            Ok(text) => text,
            Err(why) => {
                ready = false;
                why.to_string()
            }
        };
        checks.insert(name.to_string(), json!(text));
    };
    check("shutdown", if s.shutting_down.load(Ordering::Acquire) { Err("shutting down") } else { Ok("ok".into()) });
    let stream = s.stream_status.borrow().clone();
    check(
        "stream",
        match (stream.positioned_once, stream.positioned) {
            (false, _) => Err("the stream tailer has not yet positioned itself on every open shard"),
            (true, true) => Ok("ok".into()),
            (true, false) => Ok(format!(
                "degraded: repositioning ({}{})",
                stream.state,
                stream.last_error.map(|e| format!("; last error: {e}")).unwrap_or_default()
            )),
        },
    );
    for (name, health) in s.deps.all() {
        let status = health.status();
        if name == "jwks" && !s.auth.current().jwks_loaded() {
            check(name, Err("the token signing keys are not loaded"));
            continue;
        }
        check(name, Ok(if status == DependencyStatus::Unknown { "ok".into() } else { status.to_string() }));
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({ "status": if ready { "ready" } else { "not_ready" }, "checks": checks });
    (status, Json(body)).into_response()
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text format for
/// everyone else.
async fn metrics(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    s.cache.refresh_gauges().await;
    for (dependency, health) in s.deps.all() {
        s.metrics.dependency_up.get_or_create(&DependencyLabels { dependency }).set(i64::from(health.status().is_up()));
    }
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
