//! `cruddur-syncd run`: wires the components together and owns their lifecycle.
//!
//! Start order: PostgreSQL and the JWKS must answer (exit 69 otherwise: a daemon that cannot
//! authenticate or map a single user is of no use), then the cache, the stream tailer, and the
//! two listeners. The tailer becomes positioned on its own; until then /readyz says so.
//!
//! Shutdown order: /readyz turns 503 at once; the API stops accepting and drains in-flight
//! requests for at most `http.shutdown_grace`; then the tailer, the pinger and the admin
//! listener stop.
//!
//! Reconciliation runs on its own schedule in the background ([`crate::reconcile::schedule`]);
//! its settings come through a watch channel so that a reload can change them between ticks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{Cache, Users};
use crate::config::{LoadedConfig, ReconcileConfig};
use crate::error::{Error, Result};
use crate::http::admin::{AdminState, PgHealth};
use crate::http::api::{ApiOptions, ApiState};
use crate::http::auth::Authenticator;
use crate::http::{self, ServeOptions};
use crate::metrics::Metrics;
use crate::reconcile::{self, Reconciler};
use crate::store::Store;
use crate::stream::aws_source::AwsSource;
use crate::stream::tailer::{Tailer, TailerStatus};
use crate::{aws, pg};

/// How often PostgreSQL is pinged for readiness (SPEC: it must have answered within 30 s).
const PG_PING_INTERVAL: Duration = Duration::from_secs(10);

/// A started daemon: where it listens, and the handle to stop it.
pub struct Running {
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub stream_status: watch::Receiver<TailerStatus>,
    /// The reconcile settings the scheduler reads at every tick (a reload sends new ones).
    pub reconcile_settings: watch::Sender<ReconcileConfig>,
    shutting_down: Arc<AtomicBool>,
    serving: CancellationToken,
    background: CancellationToken,
    api_task: TaskTracker,
    tasks: TaskTracker,
}

pub async fn start(loaded: &LoadedConfig) -> Result<Running> {
    let cfg = &loaded.config;
    let metrics = Arc::new(Metrics::new());
    let clients = aws::clients(&cfg.aws).await;

    let pg_opts = pg::options(&cfg.postgres)?;
    let target = pg::describe(&pg_opts);
    let pool = pg::connect_with(&cfg.postgres, pg_opts.clone()).await?;
    let pg_health = Arc::new(PgHealth::default());
    pg_health.record_ok();

    let http_client =
        reqwest::Client::builder().build().map_err(|e| Error::Failed(format!("cannot build an HTTP client: {e}")))?;
    let auth = Arc::new(Authenticator::new(&cfg.auth, http_client));
    auth.refresh_jwks().await.map_err(|e| match e {
        crate::http::auth::AuthError::JwksUnavailable { detail } => Error::Unavailable(detail),
        other => Error::Failed(format!("cannot load the JWKS from auth.jwks_url {}: {other}", cfg.auth.jwks_url)),
    })?;

    let store = Store::new(clients.dynamodb.clone(), cfg.dynamodb.table.clone(), clients.endpoints.dynamodb.clone());
    let cache =
        Arc::new(Cache::new(&cfg.cache, store, Users { pool: pool.clone(), target: target.clone() }, metrics.clone()));

    let api_listener = bind("http.listen", cfg.http.listen).await?;
    let admin_listener = bind("admin.listen", cfg.admin.listen).await?;
    let api_addr = local_addr("http.listen", &api_listener)?;
    let admin_addr = local_addr("admin.listen", &admin_listener)?;

    let serving = CancellationToken::new();
    let background = CancellationToken::new();
    let shutting_down = Arc::new(AtomicBool::new(false));
    let tasks = TaskTracker::new();
    let api_task = TaskTracker::new();

    let source = Arc::new(AwsSource::new(clients.dynamodb.clone(), clients.streams.clone()));
    let tailer = Tailer::new(source, cfg.dynamodb.table.clone(), cfg.stream.clone(), metrics.clone());
    let stream_status = tailer.status();
    tasks.spawn(tailer.run(cache.clone(), background.child_token()));
    tasks.spawn(ping_postgres(pool, target, pg_health.clone(), background.child_token()));
    // Always spawned: with `enabled = false` it only waits for a reload that turns it on.
    let (reconcile_settings, settings_rx) = watch::channel(cfg.reconcile.clone());
    let reconciler = Reconciler::new(
        clients.cognito.clone(),
        clients.endpoints.cognito.clone(),
        cfg.auth.user_pool_id.clone(),
        pg_opts,
        cfg.postgres.connect_timeout,
        Some(cache.clone()),
    );
    tasks.spawn(reconcile::schedule(reconciler, settings_rx, metrics.clone(), background.child_token()));

    let serve_opts = ServeOptions {
        header_read_timeout: cfg.http.header_read_timeout,
        max_connections: cfg.http.max_connections as usize,
        shutdown_grace: cfg.http.shutdown_grace,
    };
    let api = http::api::router(
        Arc::new(ApiState { cache: cache.clone(), auth: auth.clone(), metrics: metrics.clone() }),
        &ApiOptions {
            cors_allowed_origins: cfg.http.cors_allowed_origins.clone(),
            request_timeout: cfg.http.request_timeout,
        },
    );
    api_task.spawn(http::serve(api_listener, api, serve_opts.clone(), serving.clone()));
    let admin = http::admin::router(Arc::new(AdminState {
        metrics: metrics.clone(),
        cache: cache.clone(),
        auth,
        pg: pg_health,
        stream_status: stream_status.clone(),
        shutting_down: shutting_down.clone(),
    }));
    tasks.spawn(http::serve(admin_listener, admin, serve_opts, background.child_token()));

    tracing::info!(%api_addr, %admin_addr, table = %cfg.dynamodb.table, "serving");
    Ok(Running {
        api_addr,
        admin_addr,
        cache,
        metrics,
        stream_status,
        reconcile_settings,
        shutting_down,
        serving,
        background,
        api_task,
        tasks,
    })
}

impl Running {
    /// Graceful stop; returns when every task has ended.
    pub async fn stop(self) {
        self.shutting_down.store(true, Ordering::Release);
        self.serving.cancel();
        self.api_task.close();
        self.api_task.wait().await;
        self.background.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

pub async fn run(loaded: LoadedConfig) -> Result<()> {
    tracing::info!(config = %loaded.path.display(), "cruddur-syncd {} starting", env!("CARGO_PKG_VERSION"));
    for e in loaded.effective() {
        tracing::debug!(key = %e.key, value = %e.value, source = %e.source, "effective config");
    }
    // Signals are watched before anything starts, so a SIGTERM during start-up is a clean stop.
    let signal = shutdown_signal()?;
    let running = start(&loaded).await?;
    signal.await;
    tracing::info!("shutdown requested; draining");
    running.stop().await;
    tracing::info!("stopped");
    Ok(())
}

async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Failed(format!("cannot listen on {key} {addr}: {e}")))
}

fn local_addr(key: &str, l: &TcpListener) -> Result<SocketAddr> {
    l.local_addr().map_err(|e| Error::Failed(format!("cannot read the address of {key}: {e}")))
}

async fn ping_postgres(pool: sqlx::PgPool, target: String, health: Arc<PgHealth>, stop: CancellationToken) {
    let mut was_ok = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PG_PING_INTERVAL) => {}
        }
        let ping = tokio::time::timeout(Duration::from_secs(5), sqlx::query("SELECT 1").execute(&pool)).await;
        let ok = matches!(ping, Ok(Ok(_)));
        if ok {
            health.record_ok();
        }
        // One line per change of state, not one per ping.
        if ok != was_ok {
            if ok {
                tracing::info!(postgres = %target, "PostgreSQL answers again");
            } else {
                tracing::warn!(postgres = %target, "PostgreSQL does not answer");
            }
            was_ok = ok;
        }
    }
}

/// Watches SIGTERM and SIGINT from now on; the future resolves on the first of them.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Failed(format!("cannot watch SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Failed(format!("cannot watch SIGINT: {e}")))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
