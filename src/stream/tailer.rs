//! The tailer: follows the stream of one table and feeds a [`ChangeSink`]. Built here, run by
//! the [`super::coordinator`], which owns the shard tree and starts one [`super::reader`] per
//! shard that is readable now.
//!
//! Ordering rule for gaps: whenever the tailer repositions after a possible loss, it first holds
//! a position on every affected shard and only then calls [`ChangeSink::gap`]. A flush done
//! before positioning would let the cache load (and keep) a value that a write made between the
//! flush and the new position then changes unseen.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::coordinator::Coordinator;
use super::source::StreamSource;
use super::status::{StartPlan, TailerStatus, TurnBounds};
use super::ChangeSink;
use crate::config::StreamConfig;
use crate::metrics::Metrics;

/// Follows the stream of one table and feeds a [`ChangeSink`].
pub struct Tailer<S> {
    pub(super) source: Arc<S>,
    pub(super) table: String,
    pub(super) cfg: StreamConfig,
    pub(super) metrics: Arc<Metrics>,
    pub(super) status: watch::Sender<TailerStatus>,
    pub(super) poll_interval: watch::Receiver<Duration>,
    pub(super) plan: StartPlan,
    /// `None`: nothing watches this tailer's liveness (the projector's), so no turn limit.
    pub(super) bounds: Option<TurnBounds>,
}

impl<S: StreamSource> Tailer<S> {
    pub fn new(source: Arc<S>, table: impl Into<String>, cfg: StreamConfig, metrics: Arc<Metrics>) -> Self {
        let (status, _) = watch::channel(TailerStatus::starting(Duration::MAX));
        let poll_interval = watch::channel(cfg.poll_interval).1;
        Tailer {
            source,
            table: table.into(),
            cfg,
            metrics,
            status,
            poll_interval,
            plan: StartPlan::default(),
            bounds: None,
        }
    }

    /// How long the source's calls and the sink's deliveries can take at most; with them the
    /// status carries a turn limit that liveness checks can hold the tailer to.
    pub fn with_bounds(mut self, bounds: TurnBounds) -> Self {
        self.bounds = Some(bounds);
        let limit = self.turn_limit();
        self.status.send_modify(|s| s.turn_limit = limit);
        self
    }

    /// Starts as `plan` says instead of at LATEST.
    pub fn with_start(mut self, plan: StartPlan) -> Self {
        self.plan = plan;
        self
    }

    /// Follows `stream.poll_interval` from this channel instead of the value given to `new`:
    /// every reader reads it anew at each wait, so a reload applies to the next empty poll.
    pub fn with_poll_interval(mut self, poll_interval: watch::Receiver<Duration>) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// The live status; `borrow().positioned` is the readiness of the stream.
    pub fn status(&self) -> watch::Receiver<TailerStatus> {
        self.status.subscribe()
    }

    pub(super) fn turn_limit(&self) -> Duration {
        self.bounds.map_or(Duration::MAX, |b| b.turn_limit(*self.poll_interval.borrow()))
    }

    /// Runs until `shutdown` is cancelled; every reader has stopped when this returns.
    pub async fn run<K: ChangeSink>(self, sink: Arc<K>, shutdown: CancellationToken) {
        Coordinator::new(self, sink, shutdown).run().await;
    }
}
