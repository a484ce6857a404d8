//! The projector's consumer of the stream: every message INSERT moves its conversation's rows.
//!
//! Records of a page are handled one by one, in stream order. A record that fails is retried
//! with backoff; a conflict (another writer moved the rows between our read and our write) is
//! read again at once. A record DynamoDB keeps refusing (`projector.max_attempts` error
//! answers), or that keeps failing for any reason for `projector.give_up_after`, is logged with
//! its keys, counted, and skipped, so one record can never hold its shard for long.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::checkpoint::LockConn;
use super::rows::{execute, plan_forward, read_rows, MoveError, Target};
use crate::config::ProjectorConfig;
use crate::metrics::{Metrics, ReasonLabels};
use crate::model::{decode_item, Item, ItemKey, Message, Pk};
use crate::store::Store;
use crate::stream::{Change, ChangeRecord, ChangeSink, GapReason, Progress};

/// First backoff step after a failure; doubled per failure up to [`BACKOFF_CAP`], jittered.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Pause before reading again after a conflict: short, jittered, so two writers drift apart.
const CONFLICT_PAUSE_MAX: Duration = Duration::from_millis(50);

/// What became of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Rows moved (and duplicates dropped).
    Moved { rows: usize },
    /// Every row was already at or after the message: a late or replayed record.
    Stale,
    /// Not a message INSERT (a MODIFY, a REMOVE, a group row, the projector's own writes).
    NotMessage,
    /// The conversation has no rows to move (yet).
    NoGroupRows,
    /// KEYS_ONLY stream and the message is gone from the table.
    Gone,
    /// Given up after retries.
    Failed,
}

impl Outcome {
    /// The `reason` of `projector_records_skipped_total`, for records that moved nothing.
    pub fn skip_reason(self) -> Option<&'static str> {
        match self {
            Outcome::Moved { .. } => None,
            Outcome::Stale => Some("stale"),
            Outcome::NotMessage => Some("not_message"),
            Outcome::NoGroupRows => Some("no_group_rows"),
            Outcome::Gone => Some("gone"),
            Outcome::Failed => Some("failed"),
        }
    }
}

/// Feeds stream records into row moves, and saves checkpoints through the lock connection.
pub struct ProjectorSink {
    store: Store,
    index: String,
    cfg: ProjectorConfig,
    metrics: Arc<Metrics>,
    /// `None` when the caller saves no checkpoints (tests of the projection alone).
    lock: Option<Arc<Mutex<LockConn>>>,
    /// Cancelled when a checkpoint cannot be saved: the lock is probably gone, stop leading.
    lost: CancellationToken,
}

impl ProjectorSink {
    pub fn new(
        store: Store,
        index: impl Into<String>,
        cfg: ProjectorConfig,
        metrics: Arc<Metrics>,
        lock: Option<Arc<Mutex<LockConn>>>,
        lost: CancellationToken,
    ) -> ProjectorSink {
        ProjectorSink { store, index: index.into(), cfg, metrics, lock, lost }
    }

    /// Handles one record to the end: moved, skipped, or given up.
    pub async fn project(&self, record: &ChangeRecord) -> Outcome {
        let started = Instant::now();
        let mut refusals = 0u32;
        let mut failures = 0u32;
        let mut moved = 0usize;
        loop {
            match self.attempt(record).await {
                Ok(Attempt::Done(outcome)) => {
                    return match outcome {
                        Outcome::Stale if moved > 0 => Outcome::Moved { rows: moved },
                        Outcome::Moved { rows } => Outcome::Moved { rows: rows + moved },
                        other => other,
                    };
                }
                Ok(Attempt::Conflict { moved: m, why }) => {
                    moved += m;
                    self.metrics.projector_conflicts.inc();
                    tracing::debug!(keys = %keys(record), "rows changed under the projector, reading again: {why}");
                    if started.elapsed() >= self.cfg.give_up_after {
                        return self.give_up(record, &why, started);
                    }
                    tokio::time::sleep(jitter(CONFLICT_PAUSE_MAX)).await;
                }
                Err(e) => {
                    self.metrics.projector_failures.inc();
                    failures += 1;
                    if matches!(e, MoveError::Rejected(_)) {
                        refusals += 1;
                    }
                    let why = e.to_string();
                    if refusals >= self.cfg.max_attempts || started.elapsed() >= self.cfg.give_up_after {
                        return self.give_up(record, &why, started);
                    }
                    tracing::debug!(keys = %keys(record), attempt = failures, "projecting a record failed, retrying: {why}");
                    let ceiling = BACKOFF_BASE.saturating_mul(1 << failures.min(10)).min(BACKOFF_CAP);
                    // Never sleep past the deadline by much: the last attempt comes at it.
                    let left = self.cfg.give_up_after.saturating_sub(started.elapsed());
                    tokio::time::sleep((ceiling / 2 + jitter(ceiling / 2)).min(left)).await;
                }
            }
        }
    }

    fn give_up(&self, record: &ChangeRecord, why: &str, started: Instant) -> Outcome {
        tracing::warn!(
            keys = %keys(record),
            shard = %record.shard_id,
            sequence_number = %record.sequence_number,
            after = ?started.elapsed(),
            "projector gave up on a record and skipped it (its conversation rows may be behind; \
             `cruddur-syncd ddb repair-groups` recomputes them): {why}"
        );
        Outcome::Failed
    }

    async fn attempt(&self, record: &ChangeRecord) -> Result<Attempt, MoveError> {
        let Some(message) = self.message_of(record).await? else {
            return Ok(Attempt::Done(if is_message_insert(record) { Outcome::Gone } else { Outcome::NotMessage }));
        };
        let read = read_rows(&self.store, &self.index, message.group).await?;
        for m in &read.misfits {
            tracing::warn!(pk = ?m.pk, sk = ?m.sk, error = %m.error, "a conversation row does not fit the model; left alone");
        }
        if read.rows.is_empty() {
            tracing::debug!(group = %message.group, "no conversation rows to move");
            return Ok(Attempt::Done(Outcome::NoGroupRows));
        }
        let target = Target::new(&message.sk, message.message.clone());
        let mut moved = 0;
        for plan in plan_forward(read.rows, &target) {
            match execute(&self.store, &plan).await {
                Ok(w) => moved += w.moved,
                Err(MoveError::Conflict(why)) => return Ok(Attempt::Conflict { moved, why }),
                Err(e) => return Err(e),
            }
        }
        self.metrics.projector_rows_moved.inc_by(moved as u64);
        if moved > 0 {
            tracing::debug!(group = %message.group, sk = %target.sk, rows = moved, "conversation rows moved");
        }
        Ok(Attempt::Done(if moved > 0 { Outcome::Moved { rows: moved } } else { Outcome::Stale }))
    }

    /// The message a record inserted; `None` for anything else. On a KEYS_ONLY stream the
    /// record has no image, so the message is read from the table.
    async fn message_of(&self, record: &ChangeRecord) -> Result<Option<Message>, MoveError> {
        if !is_message_insert(record) {
            return Ok(None);
        }
        match &record.change {
            Change::Upsert(Item::Message(m)) => Ok(Some(m.clone())),
            Change::Invalidate(key @ ItemKey { pk: Pk::Messages(_), .. }) => {
                let Some(raw) = self.store.get_item(key).await? else { return Ok(None) };
                match decode_item(&raw) {
                    Ok(Item::Message(m)) => Ok(Some(m)),
                    Ok(Item::Group(_)) => Ok(None),
                    Err(e) => {
                        Err(MoveError::Rejected(format!("message {} {} does not fit the model: {e}", key.pk, key.sk)))
                    }
                }
            }
            _ => Ok(None),
        }
    }
}

enum Attempt {
    Done(Outcome),
    /// Another writer got there first; `moved` rows were written before that.
    Conflict {
        moved: usize,
        why: String,
    },
}

fn is_message_insert(record: &ChangeRecord) -> bool {
    use crate::metrics::StreamEvent;
    record.event == StreamEvent::INSERT
        && match &record.change {
            Change::Upsert(Item::Message(_)) => true,
            Change::Invalidate(key) => matches!(key.pk, Pk::Messages(_)),
            _ => false,
        }
}

fn keys(record: &ChangeRecord) -> String {
    let key = match &record.change {
        Change::Upsert(item) => item.key(),
        Change::Remove(key) | Change::Invalidate(key) => key.clone(),
    };
    format!("pk={} sk={}", key.pk, key.sk)
}

fn jitter(max: Duration) -> Duration {
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

impl ChangeSink for ProjectorSink {
    async fn apply(&self, record: ChangeRecord) {
        let outcome = self.project(&record).await;
        self.metrics.projector_records.inc();
        if let Some(reason) = outcome.skip_reason() {
            self.metrics.projector_records_skipped.get_or_create(&ReasonLabels { reason }).inc();
        }
        if let Some(at) = record.approximate_creation {
            let age = Utc::now().signed_duration_since(at).num_milliseconds() as f64 / 1000.0;
            self.metrics.projector_lag_seconds.set(age.max(0.0));
        }
    }

    async fn gap(&self, reason: GapReason) {
        tracing::warn!(
            %reason,
            "the projector may have missed messages; `cruddur-syncd ddb repair-groups --apply` recomputes every conversation row"
        );
    }

    async fn progress(&self, progress: Progress) {
        let Some(lock) = &self.lock else { return };
        if progress.last_sequence_number.is_none() && !progress.finished {
            return;
        }
        let saved = lock.lock().await.save(&progress).await;
        if let Err(e) = saved {
            tracing::warn!("cannot save the projector checkpoint; giving up the lead: {e}");
            self.lost.cancel();
        }
    }
}
