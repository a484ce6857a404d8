//! `cruddur-syncd run`: wires the components together and owns their lifecycle.
//!
//! Start order: PostgreSQL and the JWKS must answer (exit 69 otherwise: a daemon that cannot
//! authenticate or map a single user is of no use), then the cache, the stream tailer, and the
//! two listeners. The tailer becomes positioned on its own; until then /readyz says so. Once
//! ready, a dependency that fails is reported (`/readyz` checks, `dependency_up`), never a
//! reason for 503: the sidecar's pod would go out of service with it.
//!
//! Shutdown order: /readyz turns 503 at once; the API stops accepting and drains in-flight
//! requests for at most `http.shutdown_grace`; then the tailer, the pinger and the admin
//! listener stop, within [`STOP_DEADLINE`] (a task stuck in a hung call is abandoned), so that
//! SIGTERM always ends the process within `http.shutdown_grace` + `STOP_DEADLINE`.
//!
//! Reconciliation runs on its own schedule in the background ([`crate::reconcile::schedule`]);
//! its settings come through a watch channel so that a reload can change them between ticks.
//! With `[projector] enabled = true` the group projector ([`crate::projector`]) runs beside
//! them: it waits for its lock and, while it holds it, tails the stream with a tailer of its own.
//! With `[fanout] nats_url` set ([`crate::fanout`]) the cache has no tailer: a follower feeds it
//! from JetStream, whoever holds the relay lease tails the stream for the fleet, and the
//! projector reads JetStream too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::Cache;
use crate::config::LoadedConfig;
use crate::dependency::Dependencies;
use crate::error::{Error, Result};
use crate::fanout::follower::Follower;
use crate::fanout::relay::Relay;
use crate::health;
use crate::heartbeat::Heartbeat;
use crate::http::admin::AdminState;
use crate::http::api::{ApiOptions, ApiState};
use crate::http::auth::{AuthSlot, Authenticator};
use crate::http::{self, ServeOptions};
use crate::lease::Contest;
use crate::metrics::Metrics;
use crate::projector::Projector;
use crate::reconcile::{self, Reconciler};
use crate::reload::Live;
use crate::store::Store;
use crate::stream::aws_source::AwsSource;
use crate::stream::{Tailer, TailerStatus, TurnBounds};
use crate::{aws, fanout, pg, reload, systemd};

/// How long stopping waits for the background tasks after the API drained; past it they are
/// abandoned (the process exits around them).
pub(crate) const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// A started daemon: where it listens, and the handle to stop it.
pub struct Running {
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub stream_status: watch::Receiver<TailerStatus>,
    /// Beaten by the API's accept loop (the watchdog's view of it).
    pub api_heartbeat: Arc<Heartbeat>,
    /// What a config reload changes (the reconcile settings among them).
    pub live: Arc<Live>,
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
    // Reported by whoever calls each dependency; read by /readyz and `dependency_up`.
    let deps = Arc::new(if cfg.fanout.enabled() { Dependencies::with_nats() } else { Dependencies::default() });
    deps.postgres.ok();
    // Fan-out on: NATS must answer at start too (exit 69 naming the URL).
    let nats = match cfg.fanout.enabled() {
        true => Some(Arc::new(fanout::connect(&cfg.fanout, deps.clone()).await?)),
        false => None,
    };

    let http_client =
        reqwest::Client::builder().build().map_err(|e| Error::Failed(format!("cannot build an HTTP client: {e}")))?;
    let auth =
        Authenticator::builder(&cfg.auth, http_client.clone()).metrics(metrics.clone()).health(deps.clone()).build();
    auth.refresh_jwks().await.map_err(|e| match e {
        crate::http::auth::AuthError::JwksUnavailable { detail } => Error::Unavailable(detail),
        other => Error::Failed(format!("cannot load the JWKS from auth.jwks_url {}: {other}", cfg.auth.jwks_url)),
    })?;
    auth.spawn_refresh();

    let store = Store::new(clients.dynamodb.clone(), cfg.dynamodb.table.clone(), clients.endpoints.dynamodb.clone())
        .with_health(deps.clone());
    // Misses give up before the request timeout so that a hung dependency is a 503, not a 408.
    let load_timeout = cfg.http.request_timeout.mul_f64(0.8);
    let users = Arc::new(pg::PgUsers { pool: pool.clone(), target: target.clone(), health: Some(deps.clone()) });
    let cache = Arc::new(Cache::new(&cfg.cache, load_timeout, Arc::new(store), users, metrics.clone()));

    let api_listener = bind("http.listen", cfg.http.listen).await?;
    let admin_listener = bind("admin.listen", cfg.admin.listen).await?;
    let api_addr = local_addr("http.listen", &api_listener)?;
    let admin_addr = local_addr("admin.listen", &admin_listener)?;

    let serving = CancellationToken::new();
    let background = CancellationToken::new();
    let shutting_down = Arc::new(AtomicBool::new(false));
    let tasks = TaskTracker::new();
    let api_task = TaskTracker::new();

    let source = Arc::new(AwsSource::new(clients.dynamodb.clone(), clients.streams.clone()).with_health(deps.clone()));
    // Live-reloadable settings travel in watch channels.
    let (poll_tx, poll_rx) = watch::channel(cfg.stream.poll_interval);
    let (reconcile_tx, reconcile_rx) = watch::channel(reconcile::Settings::of(cfg));
    if cfg.projector.enabled {
        let projector = Projector {
            source: Arc::new(AwsSource::new(clients.dynamodb.clone(), clients.streams.clone())),
            store: Store::new(clients.dynamodb.clone(), cfg.dynamodb.table.clone(), clients.endpoints.dynamodb.clone()),
            group_index: cfg.dynamodb.group_index.clone(),
            stream: cfg.stream.clone(),
            poll_interval: poll_rx.clone(),
            pg: pg_opts.clone(),
            connect_timeout: cfg.postgres.connect_timeout,
            cfg: cfg.projector.clone(),
            metrics: metrics.clone(),
            fanout: nats.clone(),
        };
        tasks.spawn(projector.run(background.child_token()));
    }
    // A delivery waits for the loads of the same key queued before it (the rule in `cache`'s
    // docs); each gives up with its request, so one key waits about a request timeout at most.
    let stream_status = match &nats {
        None => {
            let bounds = TurnBounds { call: aws::call_bound(cfg.aws.call_timeout), delivery: cfg.http.request_timeout };
            let tailer = Tailer::new(source, cfg.dynamodb.table.clone(), cfg.stream.clone(), metrics.clone())
                .with_poll_interval(poll_rx)
                .with_bounds(bounds);
            let status = tailer.status();
            tasks.spawn(tailer.run(cache.clone(), background.child_token()));
            status
        }
        Some(nats) => {
            // One reader of the stream for the fleet (whoever holds the relay lease); every
            // instance's cache follows the fan-out stream.
            let relay = Relay {
                source,
                nats: nats.clone(),
                table: cfg.dynamodb.table.clone(),
                stream: cfg.stream.clone(),
                poll_interval: poll_rx,
                contest: Contest {
                    pg: pg_opts.clone(),
                    connect_timeout: cfg.postgres.connect_timeout,
                    interval: cfg.fanout.lock_check_interval,
                },
                metrics: metrics.clone(),
            };
            tasks.spawn(relay.run(background.child_token()));
            let follower = Follower::new(nats.clone(), cache.clone(), metrics.clone(), cfg.http.request_timeout);
            let status = follower.status();
            tasks.spawn(follower.run(background.child_token()));
            status
        }
    };
    tasks.spawn(health::ping_postgres(pool, target, deps.clone(), background.child_token()));
    // Always spawned: with `enabled = false` it only waits for a reload that turns it on.
    let reconciler = Reconciler::new(
        clients.cognito.clone(),
        clients.endpoints.cognito.clone(),
        cfg.auth.user_pool_id.clone(),
        pg_opts,
        cfg.postgres.connect_timeout,
        Some(cache.clone()),
    );
    let reconciler = match &nats {
        Some(nats) => reconciler.with_fanout(nats.clone()),
        None => reconciler,
    };
    tasks.spawn(reconcile::schedule(reconciler, reconcile_rx, metrics.clone(), background.child_token()));

    let serve_opts = ServeOptions::from(&cfg.http);
    let auth = Arc::new(AuthSlot::new(auth));
    let api_state =
        Arc::new(ApiState::new(cache.clone(), auth.clone(), metrics.clone(), &cfg.http.cors_allowed_origins));
    api_state.set_access_log(cfg.log.access);
    let api = http::api::router(api_state.clone(), &ApiOptions { request_timeout: cfg.http.request_timeout });
    let api_heartbeat = Arc::new(Heartbeat::new());
    api_task.spawn(http::serve_with_heartbeat(
        api_listener,
        api,
        serve_opts.clone(),
        serving.clone(),
        api_heartbeat.clone(),
    ));
    let admin = http::admin::router(Arc::new(AdminState {
        metrics: metrics.clone(),
        cache: cache.clone(),
        auth: auth.clone(),
        deps: deps.clone(),
        stream_status: stream_status.clone(),
        shutting_down: shutting_down.clone(),
        api_heartbeat: api_heartbeat.clone(),
    }));
    tasks.spawn(http::serve(admin_listener, admin, serve_opts, background.child_token()));
    let live = Arc::new(Live::new(
        cfg,
        api_state,
        auth,
        cache.clone(),
        metrics.clone(),
        poll_tx,
        reconcile_tx,
        http_client,
        deps,
    ));

    tracing::info!(%api_addr, %admin_addr, table = %cfg.dynamodb.table, "serving");
    Ok(Running {
        api_addr,
        admin_addr,
        cache,
        metrics,
        stream_status,
        api_heartbeat,
        live,
        shutting_down,
        serving,
        background,
        api_task,
        tasks,
    })
}

impl Running {
    /// Graceful stop: the API drains for at most `http.shutdown_grace`, the other tasks get
    /// [`STOP_DEADLINE`] more; returns false when some had to be abandoned.
    pub async fn stop(self) -> bool {
        self.shutting_down.store(true, Ordering::Release);
        self.serving.cancel();
        self.api_task.close();
        self.api_task.wait().await;
        self.background.cancel();
        self.tasks.close();
        if tokio::time::timeout(STOP_DEADLINE, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                "{} background task(s) did not stop within {STOP_DEADLINE:?} (a hung call?); abandoning them",
                self.tasks.len()
            );
            return false;
        }
        true
    }

    /// What the systemd supervisor watches.
    pub(crate) fn probes(&self) -> health::Probes {
        health::Probes {
            stream: self.stream_status.clone(),
            api: self.api_heartbeat.clone(),
            cache: self.cache.clone(),
        }
    }
}

pub async fn run(loaded: LoadedConfig) -> Result<()> {
    tracing::info!(config = %loaded.path.display(), "cruddur-syncd {} starting", crate::version::LONG);
    for e in loaded.effective() {
        tracing::debug!(key = %e.key, value = %e.value, source = %e.source, "effective config");
    }
    // Signals are watched before anything starts, so a SIGTERM during start-up is a clean stop.
    let signal = shutdown_signal()?;
    let hup = reload::sighup()?;
    let running = start(&loaded).await?;
    let supervisor = CancellationToken::new();
    reload::spawn(loaded.path.clone(), running.live.clone(), hup, supervisor.clone());
    tokio::spawn(systemd::supervise(running.probes(), supervisor.clone()));
    signal.await;
    systemd::stopping();
    supervisor.cancel();
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

/// Watches SIGTERM and SIGINT from now on; the future resolves on the first of them.
pub(crate) fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
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
