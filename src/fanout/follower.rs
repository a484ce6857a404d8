//! The follower: every instance's cache fed from JetStream instead of its own tailer.
//!
//! It reads an ephemeral consumer that delivers what is published from its creation on, and
//! publishes a [`TailerStatus`] like the tailer's, so readiness, liveness and the watchdog do
//! not care which source feeds the cache. Rules:
//!
//! - the consumer's creation is the follower's position: what the cache loaded before it may
//!   predate a message it will never get, so it is dropped (the tailer's "positioned" rule);
//!   every later position (a new consumer after a lost connection or a consumer error) is a
//!   possible gap and flushes the cache instead, counted in `fanout_gaps_total{reason}`;
//! - a JetStream sequence that is not the last one plus one means messages were not received
//!   (the stream's limits dropped them, the consumer was recreated): flush (`missed`);
//! - a gap the relay published (its source lost records): flush (`source`);
//! - a change not newer than the last applied on its shard (a republish after a relay
//!   failover, outside the server's duplicate window) is dropped, so a republished INSERT never
//!   resurrects an item deleted since.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Notice, SequenceNumber};
use super::Nats;
use crate::cache::Cache;
use crate::metrics::{Metrics, ReasonLabels};
use crate::retry::Backoff;
use crate::stream::{ChangeSink, GapReason, TailerState, TailerStatus};

/// How often the status is republished while no message arrives (liveness' heartbeat).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A consumer nobody pulls from is removed by the server after this long (a follower that died).
const INACTIVE: Duration = Duration::from_secs(60);

pub(crate) struct Follower {
    nats: Arc<Nats>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    status: watch::Sender<TailerStatus>,
    /// The newest sequence number (and its repeat) applied per shard.
    applied: HashMap<String, (String, u32)>,
}

/// Why a consumer ended.
enum Ended {
    Stopped,
    /// The connection dropped and came back, or the consumer failed: start a new one.
    Lost(String),
}

impl Follower {
    /// `delivery` bounds one message's handing to the cache (it may wait for loads of its key).
    pub(crate) fn new(nats: Arc<Nats>, cache: Arc<Cache>, metrics: Arc<Metrics>, delivery: Duration) -> Self {
        let (status, _) = watch::channel(TailerStatus::starting(delivery + HEARTBEAT * 5 + super::CONNECT_TIMEOUT * 2));
        Follower { nats, cache, metrics, status, applied: HashMap::new() }
    }

    pub(crate) fn status(&self) -> watch::Receiver<TailerStatus> {
        self.status.subscribe()
    }

    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut positioned_before = false;
        loop {
            let reconnects = *self.nats.reconnects.borrow();
            let messages = match self.subscribe().await {
                Ok(m) => m,
                Err(e) => {
                    self.publish_status(false, TailerState::Unavailable(e.clone()), Some(e.clone()));
                    tracing::warn!("{e}; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    }
                }
            };
            backoff.reset();
            // Positioned: from now on every publication reaches this consumer.
            if positioned_before {
                self.flush("reconnect", "a new consumer after a lost connection or a failed one");
            } else {
                self.cache.positioned().await;
                positioned_before = true;
            }
            self.publish_status(true, TailerState::Streaming, None);
            tracing::info!(nats = %self.nats.url, stream = %self.nats.stream, "following the fan-out stream");
            match self.follow(messages, reconnects, &stop).await {
                Ended::Stopped => break,
                Ended::Lost(why) => {
                    tracing::warn!("fan-out consumer lost ({why}); the cache is flushed once a new one is in place");
                    self.publish_status(false, TailerState::Unavailable(why.clone()), Some(why));
                }
            }
        }
        self.status.send_modify(|s| {
            s.state = TailerState::Stopped;
            s.positioned = false;
        });
    }

    async fn subscribe(&self) -> Result<consumer::pull::Stream, String> {
        let stream = self
            .nats
            .js
            .get_stream(&self.nats.stream)
            .await
            .map_err(|e| format!("cannot read JetStream stream {} at {}: {e}", self.nats.stream, self.nats.url))?;
        let config = consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::None,
            filter_subject: wire::all_subjects(&self.nats.prefix),
            inactive_threshold: INACTIVE,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| format!("cannot create a consumer on {} at {}: {e}", self.nats.stream, self.nats.url))?;
        consumer.messages().await.map_err(|e| format!("cannot read a consumer at {}: {e}", self.nats.url))
    }

    async fn follow(
        &mut self,
        mut messages: consumer::pull::Stream,
        reconnects: u64,
        stop: &CancellationToken,
    ) -> Ended {
        let mut reconnected = self.nats.reconnects.clone();
        let mut last_sequence: Option<u64> = None;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return Ended::Stopped,
                _ = heartbeat.tick() => {
                    self.status.send_modify(|s| s.last_progress = Instant::now());
                    continue;
                }
                changed = reconnected.changed() => {
                    if changed.is_ok() && *reconnected.borrow() != reconnects {
                        return Ended::Lost("the NATS connection was lost and re-established".into());
                    }
                    continue;
                }
                next = messages.next() => next,
            };
            let message = match next {
                None => return Ended::Lost("the consumer ended".into()),
                Some(Err(e)) => return Ended::Lost(e.to_string()),
                Some(Ok(m)) => m,
            };
            self.metrics.fanout_received.inc();
            if let Ok(info) = message.info() {
                let sequence = info.stream_sequence;
                if last_sequence.is_some_and(|last| sequence != last + 1) {
                    self.flush(
                        "missed",
                        &format!(
                            "stream sequence {sequence} follows {}: messages in between were not received",
                            last_sequence.unwrap_or(0)
                        ),
                    );
                }
                last_sequence = Some(sequence);
            }
            match wire::decode(message.headers.as_ref(), &message.payload) {
                Ok(notice) => self.apply(notice).await,
                Err(e) => {
                    self.metrics
                        .stream_skipped_records
                        .get_or_create(&crate::metrics::SkipLabels { reason: "fanout_message".into() })
                        .inc();
                    tracing::warn!(subject = %message.subject, "skipping a fan-out message that does not decode: {e}");
                }
            }
            self.status.send_modify(|s| s.last_progress = Instant::now());
        }
    }

    async fn apply(&mut self, notice: Notice) {
        match notice {
            Notice::Change { record, repeat } => {
                let newer = self.applied.get(&record.shard_id).is_none_or(|(seq, last_repeat)| {
                    (SequenceNumber(&record.sequence_number), repeat) > (SequenceNumber(seq), *last_repeat)
                });
                if !newer {
                    tracing::debug!(shard = %record.shard_id, seq = %record.sequence_number, "dropping a change already applied");
                    return;
                }
                self.applied.insert(record.shard_id.clone(), (record.sequence_number.clone(), repeat));
                if let Some(created) = record.approximate_creation {
                    let lag = (chrono::Utc::now() - created).num_milliseconds().max(0) as f64 / 1000.0;
                    self.metrics.fanout_lag_seconds.set(lag);
                }
                self.cache.apply(record.change).await;
            }
            Notice::Gap(reason) => self.flush("source", &reason),
            Notice::Positioned => self.cache.positioned().await,
            Notice::Users(subs) => self.cache.forget_users(subs).await,
        }
    }

    /// Drops everything derived from the stream, counted as a resync and by `reason`.
    fn flush(&self, reason: &'static str, why: &str) {
        self.metrics.fanout_gaps.get_or_create(&ReasonLabels { reason }).inc();
        self.metrics.stream_resyncs.inc();
        tracing::warn!(reason, "fan-out: {why}; flushing the conversation caches");
        self.cache.flush(&GapReason::Fanout(why.to_string()));
    }

    fn publish_status(&self, positioned: bool, state: TailerState, last_error: Option<String>) {
        self.status.send_modify(|s| {
            s.positioned = positioned;
            s.positioned_once |= positioned;
            s.state = state;
            s.last_error = last_error;
            s.shards_reading = usize::from(positioned);
            s.last_progress = Instant::now();
        });
    }
}
