//! The two HTTP listeners: the API ([`api`], behind [`auth`]) and the admin plane ([`admin`]).
//! Both are axum routers served by one hyper accept loop, which owns what tower cannot: the
//! header-read timeout, the header size limit, the connection cap and the graceful drain.

pub mod admin;
pub mod api;
pub mod auth;
mod cursor;
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

/// Request heads larger than this are refused with 431 by hyper. Cognito tokens are 1-2 KB.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

/// Serves `router` until `shutdown` is cancelled, then stops accepting and lets in-flight
/// requests finish for at most `shutdown_grace` before closing what is left.
pub async fn serve(listener: TcpListener, router: Router, opts: ServeOptions, shutdown: CancellationToken) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(100);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    loop {
        // A free slot first: past the cap, connections wait in the kernel's backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
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
