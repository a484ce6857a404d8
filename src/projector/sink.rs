//! The projector's consumer of the stream: every message INSERT moves its conversation's rows.
//!
//! Records of a page are handled one by one, in stream order. What goes wrong is sorted by
//! whether trying again can help:
//!
//! - **Not now** ([`MoveError::Transient`]: DynamoDB unreachable, a timeout, throttling, a 5xx,
//!   denied permissions or expired credentials): retried with backoff for as long as it lasts,
//!   with no time limit, so an outage delays the projection but never loses it.
//!   `projector_retrying` is 1 meanwhile and `projector_lag_seconds` keeps growing.
//! - **Never** ([`MoveError::Rejected`]: DynamoDB refuses the request's content, a message that
//!   does not fit): skipped after `projector.max_attempts` refusals, logged with its keys and
//!   counted, so one record can never hold its shard.
//! - **Someone else wrote first** ([`MoveError::Conflict`], or a row the index showed is not in
//!   the table): the participants' rows are read again, consistently, and the record is planned
//!   again; a record whose rows keep changing for `projector.give_up_after` (counted from the
//!   first conflict) is skipped.
//!
//! The group index lags the table: when it does not show a row for every participant of the
//! conversation (the sender, and whoever the rows it shows name), their partitions are read
//! consistently instead of waiting for it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::rows::{
    confirm, execute, plan_forward, read_rows, read_rows_consistent, MoveError, OwnerPlan, Rows, Target,
};
use crate::config::ProjectorConfig;
use crate::lease::LockConn;
use crate::metrics::{Metrics, ReasonLabels};
use crate::model::{decode_item, Item, ItemKey, Message, Pk, UserUuid};
use crate::retry::{jitter, Backoff};
use crate::store::Store;
use crate::stream::{Change, ChangeRecord, ChangeSink, GapReason, Progress};

/// Backoff after a failed attempt: up to this, doubling per failure up to [`BACKOFF_CAP`].
const BACKOFF_BASE: Duration = Duration::from_millis(200);
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
    pub(crate) fn skip_reason(self) -> Option<&'static str> {
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
pub(crate) struct ProjectorSink {
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
    pub(crate) fn new(
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
    pub(crate) async fn project(&self, record: &ChangeRecord) -> Outcome {
        let started = Instant::now();
        let mut refusals = 0u32;
        let mut failures = 0u32;
        let mut moved = 0usize;
        // After a conflict, the participants whose partitions are read consistently from then on.
        let mut reread: Option<Vec<UserUuid>> = None;
        let mut conflicts_since: Option<Instant> = None;
        let mut transient_streak = false;
        let mut backoff = Backoff::with_floor(BACKOFF_BASE, BACKOFF_CAP);
        let outcome = loop {
            match self.attempt(record, reread.as_deref()).await {
                Ok(Attempt::Done(outcome)) => {
                    break match outcome {
                        Outcome::Stale if moved > 0 => Outcome::Moved { rows: moved },
                        Outcome::Moved { rows } => Outcome::Moved { rows: rows + moved },
                        other => other,
                    };
                }
                Ok(Attempt::Conflict { moved: m, why, owners }) => {
                    moved += m;
                    self.metrics.projector_conflicts.inc();
                    tracing::debug!(keys = %keys(record), "rows changed under the projector, reading again: {why}");
                    // From the first conflict: time spent waiting out an outage does not count.
                    if conflicts_since.get_or_insert_with(Instant::now).elapsed() >= self.cfg.give_up_after {
                        break self.give_up(record, &why, started);
                    }
                    reread = Some(owners);
                    tokio::time::sleep(jitter(CONFLICT_PAUSE_MAX)).await;
                }
                Err(e) => {
                    self.metrics.projector_failures.inc();
                    failures += 1;
                    let why = e.to_string();
                    match e {
                        MoveError::Rejected(_) => {
                            refusals += 1;
                            if refusals >= self.cfg.max_attempts {
                                break self.give_up(record, &why, started);
                            }
                            tracing::debug!(keys = %keys(record), refusals, "DynamoDB refused a write, retrying: {why}");
                        }
                        _ => {
                            // Not now: retried for as long as it lasts; said once per streak.
                            if !transient_streak {
                                tracing::warn!(keys = %keys(record), "projecting a record failed for now, retrying until it works: {why}");
                                transient_streak = true;
                                self.metrics.projector_retrying.set(1);
                            } else {
                                tracing::debug!(keys = %keys(record), attempt = failures, "still failing: {why}");
                            }
                            self.record_lag(record);
                        }
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        if transient_streak {
            self.metrics.projector_retrying.set(0);
            tracing::info!(keys = %keys(record), attempts = failures + 1, after = ?started.elapsed(), "projecting the record works again");
        }
        outcome
    }

    fn record_lag(&self, record: &ChangeRecord) {
        if let Some(at) = record.approximate_creation {
            let age = Utc::now().signed_duration_since(at).num_milliseconds() as f64 / 1000.0;
            self.metrics.projector_lag_seconds.set(age.max(0.0));
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

    /// One try: read the rows, plan, write.
    async fn attempt(&self, record: &ChangeRecord, reread: Option<&[UserUuid]>) -> Result<Attempt, MoveError> {
        let Some(message) = self.message_of(record).await? else {
            return Ok(Attempt::Done(if is_message_insert(record) { Outcome::Gone } else { Outcome::NotMessage }));
        };
        let read = self.rows_of(&message, reread).await?;
        for m in &read.misfits {
            tracing::warn!(pk = ?m.pk, sk = ?m.sk, error = %m.error, "a conversation row does not fit the model; left alone");
        }
        if read.rows.is_empty() {
            tracing::debug!(group = %message.group, "no conversation rows to move");
            return Ok(Attempt::Done(Outcome::NoGroupRows));
        }
        let owners = participants(&read, message.user_uuid);
        let target = Target::new(&message.sk, message.message.clone());
        let mut moved = 0;
        for plan in plan_forward(read.rows, &target) {
            let written = match &plan {
                // A row kept without a write must be in the table, not only in the index.
                OwnerPlan::Keep { row } => confirm(&self.store, row).await.map(|()| Default::default()),
                _ => execute(&self.store, &plan).await,
            };
            match written {
                Ok(w) => moved += w.moved,
                Err(MoveError::Conflict(why)) => return Ok(Attempt::Conflict { moved, why, owners }),
                Err(e) => return Err(e),
            }
        }
        self.metrics.projector_rows_moved.inc_by(moved as u64);
        if moved > 0 {
            tracing::debug!(group = %message.group, sk = %target.sk, rows = moved, "conversation rows moved");
        }
        Ok(Attempt::Done(if moved > 0 { Outcome::Moved { rows: moved } } else { Outcome::Stale }))
    }

    /// The rows of the message's conversation: through the index when it shows a row for every
    /// participant it names (and for the sender); else, and after a conflict (`reread`), from
    /// the participants' partitions with consistent reads.
    async fn rows_of(&self, message: &Message, reread: Option<&[UserUuid]>) -> Result<Rows, MoveError> {
        let (group, sender) = (message.group, message.user_uuid);
        if let Some(owners) = reread {
            return Ok(read_rows_consistent(&self.store, group, owners).await?);
        }
        let indexed = read_rows(&self.store, &self.index, group).await?;
        let expected = participants(&indexed, sender);
        if expected.iter().all(|p| indexed.rows.iter().any(|r| r.owner == *p)) {
            return Ok(indexed);
        }
        tracing::debug!(%group, "the group index does not show every participant's row; reading their partitions");
        let mut rows = read_rows_consistent(&self.store, group, &expected).await?;
        // The sender's own row may name a participant the index did not show at all.
        let named = participants(&rows, sender);
        if named != expected {
            rows = read_rows_consistent(&self.store, group, &named).await?;
        }
        Ok(rows)
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
    /// Another writer got there first (or the index showed a row the table does not have);
    /// `moved` rows were written before that. `owners` are read again, consistently.
    Conflict {
        moved: usize,
        why: String,
        owners: Vec<UserUuid>,
    },
}

/// Everyone whose partition should hold a row of the conversation: the sender, and the owner
/// and the other participant of every row read (a row names the participant it is not about).
fn participants(read: &Rows, sender: UserUuid) -> Vec<UserUuid> {
    let mut all: Vec<UserUuid> =
        std::iter::once(sender).chain(read.rows.iter().flat_map(|r| [r.owner, r.user_uuid])).collect();
    all.sort();
    all.dedup();
    all
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

impl ChangeSink for ProjectorSink {
    async fn apply(&self, record: ChangeRecord) {
        let outcome = self.project(&record).await;
        self.metrics.projector_records.inc();
        if let Some(reason) = outcome.skip_reason() {
            self.metrics.projector_records_skipped.get_or_create(&ReasonLabels { reason }).inc();
        }
        self.record_lag(&record);
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
