//! Fan-out through NATS JetStream (`[fanout] nats_url`): a fleet reads the table's stream once.
//!
//! ```text
//!   DynamoDB Streams --(one reader: the relay)--> JetStream stream --> every instance's follower --> its cache
//!                                                                  \-> the projector (durable consumer)
//! ```
//!
//! - [`relay`]: every instance competes for the relay lease ([`crate::lease::RELAY`]); the holder
//!   runs the ordinary stream tailer with a sink that publishes each change, in shard order,
//!   and checkpoints in PostgreSQL once a page is acknowledged, so a successor resumes where the
//!   acknowledged publications end (the server drops a republish with the same `Nats-Msg-Id`
//!   inside its duplicate window; followers drop anything not newer on its shard).
//! - [`follower`]: every instance, the relay included, feeds its cache from an ephemeral
//!   consumer. Whatever it may have missed (a gap the relay published, a JetStream sequence it
//!   did not receive, a lost connection) flushes the cache, as a stream gap does.
//! - [`consume_durable`]: the projector's reader with fan-out on: a durable consumer with
//!   explicit acks, so the fleet has one reader per shard.
//! - [`wire`]: the message format.
//!
//! The client is built without its `server_2_10`+ features: Debian's nats-server is 2.9, and
//! nothing here needs more (one filter subject per consumer, no stream metadata).

pub(crate) mod follower;
pub(crate) mod relay;
pub(crate) mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::FanoutConfig;
use crate::dependency::Dependencies;
use crate::error::{Error, Result};
use crate::stream::ChangeSink;
use wire::Notice;

/// How long a first connection may take before the daemon gives up (exit 69).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// JetStream drops a second message with the same `Nats-Msg-Id` within this window.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A connection to NATS and the fan-out stream's names.
pub(crate) struct Nats {
    pub js: jetstream::Context,
    pub stream: String,
    pub prefix: String,
    /// The URL with its password hidden, for messages.
    pub url: String,
    /// Bumped at every (re)connection after the first: a follower that sees it move may have
    /// missed messages while the connection was down.
    pub reconnects: watch::Receiver<u64>,
}

/// Connects (the first connection must succeed within [`CONNECT_TIMEOUT`]: exit 69 otherwise,
/// naming the URL) and makes sure the stream exists. Connection events are reported to
/// `health.nats`.
pub(crate) async fn connect(cfg: &FanoutConfig, health: Arc<Dependencies>) -> Result<Nats> {
    let raw = cfg.nats_url.clone().unwrap_or_default();
    let url = raw
        .split(',')
        .map(|u| crate::config::redact_url(u.trim()).trim_matches('"').to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut opts = match &cfg.creds_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path).await.map_err(|e| {
            Error::Config(crate::config::ConfigError::Invalid {
                path: path.clone(),
                problems: vec![crate::config::Problem {
                    key: "fanout.creds_file".into(),
                    origin: None,
                    message: format!("is not a usable NATS credentials file: {e}"),
                }],
            })
        })?,
        None => async_nats::ConnectOptions::new(),
    };
    let (reconnect_tx, reconnects) = watch::channel(0u64);
    let events_health = health.clone();
    let events_url = url.clone();
    // Only a connection after a loss counts: the first one's event may arrive late.
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    opts = opts
        .name("cruddur-syncd")
        .connection_timeout(CONNECT_TIMEOUT)
        .require_tls(raw.split(',').any(|u| u.trim().starts_with("tls://")))
        .event_callback(move |event| {
            let (health, url, reconnect_tx) = (events_health.clone(), events_url.clone(), reconnect_tx.clone());
            let lost = lost.clone();
            async move {
                use std::sync::atomic::Ordering;
                match event {
                    async_nats::Event::Connected => {
                        health.nats.ok();
                        if lost.swap(false, Ordering::AcqRel) {
                            reconnect_tx.send_modify(|n| *n += 1);
                            tracing::info!(nats = %url, "connected to NATS again");
                        }
                    }
                    async_nats::Event::Disconnected => {
                        lost.store(true, Ordering::Release);
                        health.nats.failed(format!("the connection to NATS at {url} was lost"));
                        tracing::warn!(nats = %url, "lost the connection to NATS; reconnecting");
                    }
                    other => tracing::debug!(nats = %url, "NATS: {other}"),
                }
            }
        });
    let servers: Vec<&str> = raw.split(',').map(str::trim).collect();
    let client = tokio::time::timeout(CONNECT_TIMEOUT * 2, opts.connect(servers))
        .await
        .map_err(|_| Error::Unavailable(format!("cannot reach NATS at {url} (fanout.nats_url): no answer")))?
        .map_err(|e| Error::Unavailable(format!("cannot reach NATS at {url} (fanout.nats_url): {e}")))?;
    health.nats.ok();
    let js = jetstream::new(client);
    let nats = Nats { js, stream: cfg.stream.clone(), prefix: cfg.subject.clone(), url, reconnects };
    nats.ensure_stream(cfg).await?;
    Ok(nats)
}

impl Nats {
    /// Creates the stream when it is missing; an existing one is used as it is (an operator may
    /// have tuned it), with a warning when its subjects do not cover ours.
    async fn ensure_stream(&self, cfg: &FanoutConfig) -> Result<()> {
        let config = stream::Config {
            name: self.stream.clone(),
            subjects: vec![wire::all_subjects(&self.prefix)],
            max_age: cfg.max_age,
            num_replicas: usize::from(cfg.replicas),
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        let mut stream = self.js.get_or_create_stream(config).await.map_err(|e| {
            Error::Unavailable(format!("cannot create or read JetStream stream {} at {}: {e}", self.stream, self.url))
        })?;
        if let Ok(info) = stream.info().await {
            let wanted = wire::all_subjects(&self.prefix);
            if !info.config.subjects.iter().any(|s| *s == wanted || s == ">") {
                tracing::warn!(
                    stream = %self.stream,
                    subjects = ?info.config.subjects,
                    "the JetStream stream does not take {wanted}; fan-out messages will not be stored"
                );
            }
        }
        Ok(())
    }

    /// Publishes one notice and waits for JetStream's acknowledgement.
    pub(crate) async fn publish(&self, notice: &Notice) -> std::result::Result<(), String> {
        let (subject, headers, body) = wire::encode(&self.prefix, notice);
        let ack = self
            .js
            .publish_with_headers(subject, headers, body)
            .await
            .map_err(|e| format!("publishing to NATS at {}: {e}", self.url))?;
        ack.await.map_err(|e| format!("JetStream at {} did not acknowledge a publication: {e}", self.url))?;
        Ok(())
    }
}

/// Feeds `sink` from the durable consumer `name` (explicit acks: a change is acknowledged once
/// `apply` returned, so a successor resumes at the first unacknowledged one) until `stop`.
/// `fresh` decides where a consumer that does not exist yet starts. Returns an error when the
/// consumer cannot be read (the caller retries).
pub(crate) async fn consume_durable<K: ChangeSink>(
    nats: &Nats,
    name: &str,
    from_start: bool,
    sink: &K,
    stop: &CancellationToken,
) -> Result<()> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        Error::Unavailable(format!("{what} of JetStream stream {} at {}: {e}", nats.stream, nats.url))
    };
    let stream = nats.js.get_stream(&nats.stream).await.map_err(|e| unavailable("reading", &e))?;
    let config = consumer::pull::Config {
        durable_name: Some(name.to_string()),
        filter_subject: wire::changes_subject(&nats.prefix),
        deliver_policy: if from_start { consumer::DeliverPolicy::All } else { consumer::DeliverPolicy::New },
        ack_policy: consumer::AckPolicy::Explicit,
        // A record the projector retries for longer is not redelivered meanwhile: it acks
        // only once, in order.
        ack_wait: Duration::from_secs(30 * 60),
        max_ack_pending: 1,
        ..Default::default()
    };
    let consumer = stream.get_or_create_consumer(name, config).await.map_err(|e| unavailable("a consumer", &e))?;
    let mut messages = consumer.messages().await.map_err(|e| unavailable("reading a consumer", &e))?;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            next = messages.next() => next,
        };
        let message = match next {
            None => return Err(Error::Unavailable(format!("the consumer {name} ended"))),
            Some(Err(e)) => return Err(unavailable("reading a consumer", &e)),
            Some(Ok(m)) => m,
        };
        match wire::decode(message.headers.as_ref(), &message.payload) {
            Ok(Notice::Change { record, .. }) => sink.apply(*record).await,
            Ok(Notice::Gap(reason)) => sink.gap(crate::stream::GapReason::Fanout(reason)).await,
            Ok(Notice::Positioned | Notice::Users(_)) => {}
            Err(e) => tracing::warn!(consumer = %name, "skipping a fan-out message that does not decode: {e}"),
        }
        if stop.is_cancelled() {
            // Not acknowledged: the record may have been abandoned mid-retry.
            return Ok(());
        }
        if let Err(e) = message.ack().await {
            return Err(unavailable("acknowledging a message", &e));
        }
    }
}
