//! The relay: the one instance of a fleet that reads DynamoDB Streams, while it holds the relay
//! lease. It runs the ordinary tailer with [`PublishSink`], which publishes every change and
//! waits for JetStream's acknowledgement before the tailer reads on, and checkpoints each
//! acknowledged page in PostgreSQL through the lease's session.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use super::wire::Notice;
use super::Nats;
use crate::config::StreamConfig;
use crate::error::Result;
use crate::lease::{self, Contest, LockConn};
use crate::metrics::{Metrics, RoleLabels};
use crate::retry::Backoff;
use crate::stream::{ChangeRecord, ChangeSink, FreshStart, GapReason, Progress, StartPlan, StreamSource, Tailer};

/// Everything the relay needs.
pub(crate) struct Relay<S> {
    pub source: Arc<S>,
    pub nats: Arc<Nats>,
    pub table: String,
    pub stream: StreamConfig,
    pub poll_interval: watch::Receiver<Duration>,
    pub contest: Contest,
    pub metrics: Arc<Metrics>,
}

impl<S: StreamSource> Relay<S> {
    /// Competes for the relay lease until `stop`; relays while it holds it.
    pub(crate) async fn run(self, stop: CancellationToken) {
        set_role(&self.metrics, false);
        lease::compete(&lease::RELAY, self.contest.clone(), stop.clone(), |lock| {
            let fut: futures::future::BoxFuture<'_, Result<()>> = Box::pin(self.lead(lock, &stop));
            fut
        })
        .await;
    }

    async fn lead(&self, mut lock: LockConn, stop: &CancellationToken) -> Result<()> {
        let saved = async {
            lock.ensure_table().await?;
            lock.load().await
        };
        let saved = match saved.await {
            Ok(saved) => saved,
            Err(e) => {
                lock.release().await;
                return Err(e);
            }
        };
        tracing::info!(
            nats = %self.nats.url,
            resume = saved.is_some(),
            "took the fan-out relay lease; this instance reads the stream for the fleet"
        );
        let lock = Arc::new(Mutex::new(lock));
        let lost = stop.child_token();
        let sink = Arc::new(PublishSink {
            nats: self.nats.clone(),
            last: std::sync::Mutex::new(HashMap::new()),
            lock: lock.clone(),
            lost: lost.clone(),
            metrics: self.metrics.clone(),
        });
        // The stream_* families describe this tailer: with fan-out on, it is the instance's
        // only one.
        let tailer =
            Tailer::new(Arc::clone(&self.source), self.table.clone(), self.stream.clone(), self.metrics.clone())
                .with_poll_interval(self.poll_interval.clone())
                .with_start(StartPlan { fresh: FreshStart::Latest, resume: saved });
        let task = tokio::spawn(tailer.run(sink, lost.clone()));
        set_role(&self.metrics, true);
        let outcome = lease::keep(&lease::RELAY, &lock, &self.contest, &lost).await;
        let _ = task.await;
        set_role(&self.metrics, false);
        lease::release(lock, self.contest.connect_timeout).await;
        match outcome {
            Ok(()) if !stop.is_cancelled() => {
                Err(crate::error::Error::Unavailable("a relay checkpoint could not be saved".into()))
            }
            other => other,
        }
    }
}

fn set_role(metrics: &Metrics, relay: bool) {
    metrics.fanout_role.get_or_create(&RoleLabels { role: "relay" }).set(i64::from(relay));
    metrics.fanout_role.get_or_create(&RoleLabels { role: "follower" }).set(i64::from(!relay));
}

/// Publishes what the relay's tailer reads. Each call returns once JetStream acknowledged the
/// message (retrying with backoff while NATS does not answer), or once the lease is lost.
struct PublishSink {
    nats: Arc<Nats>,
    /// Per shard: the last sequence number published and how often it repeated.
    last: std::sync::Mutex<HashMap<String, (String, u32)>>,
    lock: Arc<Mutex<LockConn>>,
    lost: CancellationToken,
    metrics: Arc<Metrics>,
}

impl PublishSink {
    async fn publish(&self, notice: Notice) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut logged = false;
        loop {
            // Once the lease is lost nothing more is published: a record after one that was
            // abandoned would reach followers first, and the successor's republish of the
            // abandoned one would then look old on its shard and be dropped.
            if self.lost.is_cancelled() {
                return;
            }
            match self.nats.publish(&notice).await {
                Ok(()) => {
                    self.metrics.fanout_published.inc();
                    if logged {
                        tracing::info!(nats = %self.nats.url, "publishing to JetStream again");
                    }
                    return;
                }
                Err(e) => {
                    // One line per outage, not one per retry.
                    if !logged {
                        tracing::warn!("{e}; retrying (the stream is not read further meanwhile)");
                        logged = true;
                    }
                    tokio::select! {
                        _ = self.lost.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }
}

impl ChangeSink for PublishSink {
    async fn apply(&self, record: ChangeRecord) {
        let repeat = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let entry = last.entry(record.shard_id.clone()).or_insert_with(|| (String::new(), 0));
            if entry.0 == record.sequence_number {
                entry.1 += 1;
            } else {
                *entry = (record.sequence_number.clone(), 0);
            }
            entry.1
        };
        self.publish(Notice::Change { record: Box::new(record), repeat }).await;
    }

    async fn gap(&self, reason: GapReason) {
        self.publish(Notice::Gap(reason.to_string())).await;
    }

    async fn positioned(&self) {
        self.publish(Notice::Positioned).await;
    }

    /// Every record up to here was acknowledged by JetStream: a successor resumes after it.
    async fn progress(&self, progress: Progress) {
        if self.lost.is_cancelled() || (progress.last_sequence_number.is_none() && !progress.finished) {
            return;
        }
        let saved = self.lock.lock().await.save(&progress).await;
        if let Err(e) = saved {
            tracing::warn!("cannot save the relay checkpoint; giving up the lease: {e}");
            self.lost.cancel();
        }
    }
}
