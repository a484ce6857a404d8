//! The two HTTP listeners: the API ([`api`], behind [`auth`]) and the admin plane ([`admin`]).
//! Both are axum routers served by one hyper accept loop, which owns what tower cannot: the
//! header-read timeout, the header size limit, the connection cap and the graceful drain.

pub(crate) mod admin;
pub(crate) mod api;
pub mod auth;
/// Public for the fuzz targets (`fuzz/`); the API is its only user.
pub mod cursor;
mod error;
mod flask_json;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::heartbeat::Heartbeat;

/// Request heads larger than this are refused with 431 by hyper. Cognito tokens are 1-2 KB.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl From<&crate::config::HttpConfig> for ServeOptions {
    fn from(http: &crate::config::HttpConfig) -> Self {
        ServeOptions {
            header_read_timeout: http.header_read_timeout,
            max_connections: http.max_connections as usize,
            shutdown_grace: http.shutdown_grace,
        }
    }
}

/// How often a serving accept loop records that it is still turning.
pub(crate) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Serves `router` until `shutdown` is cancelled, then stops accepting and lets in-flight
/// requests finish for at most `shutdown_grace` before closing what is left.
pub async fn serve(listener: TcpListener, router: Router, opts: ServeOptions, shutdown: CancellationToken) {
    serve_with_heartbeat(listener, router, opts, shutdown, Arc::new(Heartbeat::new())).await
}

/// [`serve`], beating `heartbeat` from inside the accept loop while it runs.
pub(crate) async fn serve_with_heartbeat(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    shutdown: CancellationToken,
    heartbeat: Arc<Heartbeat>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(100);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.beat();
    loop {
        // A free slot first: past the cap, connections wait in the kernel's backlog. A full
        // server still beats: it is busy, not stuck.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = ticker.tick() => { heartbeat.beat(); continue; }
            _ = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            _ = ticker.tick() => { heartbeat.beat(); continue; }
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(opts.shutdown_grace) => {
            tracing::warn!("shutdown grace of {:?} elapsed; closing the remaining connections", opts.shutdown_grace);
        }
    }
}
