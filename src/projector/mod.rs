//! The group projector (`[projector] enabled = true`): keeps every conversation's rows at its
//! newest message, from the stream, replacing the Flask app's Lambda.
//!
//! For every message INSERT, both rows of the conversation (`GRP#{owner}`, found through the
//! group index) move to the message's sk and text, one TransactWriteItems per row, only ever
//! forward in time ([`rows`]). The Lambda handled one record per batch, deleted and re-put
//! without a condition (so a conversation vanished for a moment, and racing messages duplicated
//! rows or rolled the last message back), and never ran locally.
//!
//! Exactly one projector runs in a fleet: [`Projector::run`] competes for a lease
//! ([`crate::lease::PROJECTOR`], a PostgreSQL session advisory lock held on a connection of its
//! own). While it holds the lock the
//! instance runs its own stream tailer (the same code as the cache's, with its own sink),
//! started from the checkpoints in PostgreSQL and saving one after every applied page: at least
//! once, and idempotent, so a successor that takes over from the last checkpoint loses nothing
//! and doubles nothing. Losing the session (the checkpoint or the periodic ping fails) stops
//! the tailer; another instance, or this one later, takes over.

pub(crate) mod rows;
pub(crate) mod sink;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::config::{InitialPosition, ProjectorConfig, StreamConfig};
use crate::lease::{self, Contest, LockConn};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::stream::StreamSource;
use crate::stream::{FreshStart, StartPlan, Tailer};
use sink::ProjectorSink;

/// Everything the projector needs, from the daemon's config and clients.
pub(crate) struct Projector<S> {
    pub source: Arc<S>,
    pub store: Store,
    pub group_index: String,
    pub stream: StreamConfig,
    pub poll_interval: watch::Receiver<Duration>,
    pub pg: PgConnectOptions,
    pub connect_timeout: Duration,
    pub cfg: ProjectorConfig,
    /// The daemon's registry: the projector's own families (`projector_*`).
    pub metrics: Arc<Metrics>,
    /// With fan-out on, the projector reads the fan-out stream (a durable consumer) instead of
    /// DynamoDB Streams: one reader per shard for the whole fleet.
    pub fanout: Option<Arc<crate::fanout::Nats>>,
}

/// The projector's durable consumer on the fan-out stream.
const DURABLE: &str = "cruddur_syncd_projector";

impl<S: StreamSource> Projector<S> {
    /// Tries the lock every `lock_check_interval`; leads while it holds it; returns when `stop`
    /// is cancelled, with the lock released.
    ///
    /// Boxed so that the future's `Send` is proven here, where its lifetimes are concrete (the
    /// daemon spawns it).
    pub(crate) fn run(self, stop: CancellationToken) -> BoxFuture<'static, ()> {
        Box::pin(self.run_inner(stop))
    }

    async fn run_inner(self, stop: CancellationToken) {
        self.metrics.projector_enabled.set(1);
        let contest = self.contest();
        lease::compete(&lease::PROJECTOR, contest, stop.clone(), |lock| boxed(self.lead(lock, &stop))).await;
    }

    fn contest(&self) -> Contest {
        Contest { pg: self.pg.clone(), connect_timeout: self.connect_timeout, interval: self.cfg.lock_check_interval }
    }

    /// A table without the group index would fail every record: refuse to lead instead. A
    /// missing table is the tailer's to report (it waits for it).
    async fn check_index(&self) -> crate::error::Result<()> {
        let described = self.store.client().describe_table().table_name(self.store.table()).send().await;
        let table = match described {
            Ok(out) => out.table,
            Err(e) if crate::aws::errors::code(&e) == Some("ResourceNotFoundException") => return Ok(()),
            Err(e) => return Err(crate::aws::from_sdk(self.store.context("DescribeTable"), e)),
        };
        let has_index = table.as_ref().is_some_and(|t| {
            t.global_secondary_indexes().iter().any(|g| g.index_name() == Some(self.group_index.as_str()))
        });
        if table.is_some() && !has_index {
            return Err(crate::error::Error::Failed(format!(
                "table {} at {} has no index {} (dynamodb.group_index); `cruddur-syncd ddb schema-load` adds it",
                self.store.table(),
                self.store.endpoint(),
                self.group_index
            )));
        }
        Ok(())
    }

    /// Runs the projector's tailer while the lock holds.
    async fn lead(&self, mut lock: LockConn, stop: &CancellationToken) -> crate::error::Result<()> {
        let setup = async {
            self.check_index().await?;
            lock.ensure_table().await?;
            lock.load().await
        };
        let saved = match setup.await {
            Ok(saved) => saved,
            Err(e) => {
                lock.release().await;
                return Err(e);
            }
        };
        let fresh = match self.cfg.initial_position {
            InitialPosition::TrimHorizon => FreshStart::TrimHorizon,
            InitialPosition::Latest => FreshStart::Latest,
        };
        match &saved {
            Some(s) => tracing::info!(
                postgres = %lock.target(),
                stream = %s.stream_arn,
                positions = %positions(s),
                finished = s.finished.len(),
                "projector lock taken; resuming from the checkpoints"
            ),
            None => tracing::info!(
                postgres = %lock.target(),
                initial_position = ?self.cfg.initial_position,
                "projector lock taken; no checkpoint yet"
            ),
        }
        let lock = Arc::new(Mutex::new(lock));
        let lost = stop.child_token();
        let sink = Arc::new(ProjectorSink::new(
            self.store.clone(),
            self.group_index.clone(),
            self.cfg.clone(),
            self.metrics.clone(),
            Some(lock.clone()),
            lost.clone(),
        ));
        let task = match &self.fanout {
            Some(nats) => {
                let (nats, lost, from_start) =
                    (nats.clone(), lost.clone(), self.cfg.initial_position == InitialPosition::TrimHorizon);
                tokio::spawn(async move {
                    tracing::info!(consumer = DURABLE, "the projector reads the fan-out stream");
                    while !lost.is_cancelled() {
                        if let Err(e) = crate::fanout::consume_durable(&nats, DURABLE, from_start, &*sink, &lost).await
                        {
                            tracing::warn!("the projector's fan-out consumer failed ({e}); retrying");
                            tokio::select! {
                                _ = lost.cancelled() => {}
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                })
            }
            None => {
                // The tailer gets a registry of its own: the stream_* families describe the
                // cache's tailer, and two writers would make its gauges flap.
                let tailer = Tailer::new(
                    Arc::clone(&self.source),
                    self.store.table().to_string(),
                    self.stream.clone(),
                    Arc::new(Metrics::new()),
                )
                .with_poll_interval(self.poll_interval.clone())
                .with_start(StartPlan { fresh, resume: saved });
                tokio::spawn(tailer.run(sink, lost.clone()))
            }
        };
        self.metrics.projector_leader.set(1);
        let mut outcome = lease::keep(&lease::PROJECTOR, &lock, &self.contest(), &lost).await;
        let _ = task.await;
        self.metrics.projector_leader.set(0);
        // A record being retried when the tailer stopped is abandoned with it.
        self.metrics.projector_retrying.set(0);
        lease::release(lock, self.connect_timeout).await;
        if !stop.is_cancelled() && outcome.is_ok() {
            outcome = Err(crate::error::Error::Unavailable("a projector checkpoint could not be saved".into()));
        }
        outcome
    }
}

/// `shard@sequence_number,...` for the log line of a takeover (sorted, so it reads the same).
fn positions(saved: &crate::stream::SavedPositions) -> String {
    let mut all: Vec<String> = saved.after.iter().map(|(shard, seq)| format!("{shard}@{seq}")).collect();
    all.sort();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(",")
    }
}

/// Pins a future as `Send` at a point where its lifetimes are concrete (the compiler cannot
/// prove `Send` for some borrowing futures inside a generic `async fn` otherwise).
fn boxed<'a, T>(f: impl std::future::Future<Output = T> + Send + 'a) -> BoxFuture<'a, T> {
    Box::pin(f)
}
