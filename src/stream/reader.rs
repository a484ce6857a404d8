//! One shard's reader: it owns its position, paces its GetRecords calls, backs off on
//! throttling, recovers from expired iterators and trimmed data, and hands a page's records to
//! the sink one by one before reading the next, which keeps records in order per shard.
//!
//! Its loop is four named steps: wait for the turn, acquire an iterator (when it has none), read
//! a page, deliver it; a failed call goes to [`Reader::failed`], which decides in one place what
//! the failure means for the position.

use std::collections::HashMap;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::decode::decode_page;
use super::source::{Position, RecordsPage, ShardId, ShardIterator, SourceError, StreamSource};
use super::status::BACKOFF_CAP;
use super::{ChangeSink, GapReason, Progress};
use crate::heartbeat::Heartbeat;
use crate::metrics::{ErrorLabels, Metrics, StreamErrorKind};
use crate::retry::Backoff;

/// DynamoDB Streams allows 5 GetRecords per second per shard; this spacing keeps one reader
/// inside that whatever `poll_interval` says.
pub(crate) const MIN_GET_RECORDS_SPACING: Duration = Duration::from_millis(200);
/// First backoff step after throttling or a server error; doubled per failure.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Consecutive unexplained GetRecords failures after which a reader drops its iterator.
const OTHER_ERRORS_BEFORE_NEW_ITERATOR: u32 = 3;

/// What every reader of one tailer shares.
pub(super) struct ReaderContext<S, K> {
    pub source: Arc<S>,
    pub sink: Arc<K>,
    pub metrics: Arc<Metrics>,
    pub poll_interval: watch::Receiver<Duration>,
    /// Told when a reader's positioned flag changes, so the coordinator re-checks readiness.
    pub notify: Arc<Notify>,
    pub ages: AgeBoard,
}

/// What a reader shares with the coordinator without a message.
#[derive(Debug)]
pub(super) struct ReaderShared {
    pub positioned: AtomicBool,
    /// Beaten at every turn and after every record delivered: the reader's progress.
    pub turn: Heartbeat,
}

impl ReaderShared {
    pub(crate) fn new() -> Self {
        ReaderShared { positioned: AtomicBool::new(false), turn: Heartbeat::beating() }
    }
}

/// Why a reader task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReaderExit {
    /// GetRecords returned no next iterator: the shard was read to its end.
    Finished,
    /// The shard no longer exists; the reader has reported the gap.
    Vanished,
    Cancelled,
}

/// Where a reader starts when it has read nothing yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Origin {
    /// Open at the time the tailer (re)positioned on a stream: only later changes matter,
    /// because the cache loads everything older from the table.
    Start,
    /// Discovered later (a split or a rollover), or every shard of a
    /// [`super::FreshStart::TrimHorizon`] stream: every record counts.
    Child,
    /// A saved position: right after this sequence number.
    Resume(String),
}

impl Origin {
    pub(crate) fn position(&self) -> Position {
        match self {
            Origin::Start => Position::Latest,
            Origin::Child => Position::TrimHorizon,
            Origin::Resume(seq) => Position::AfterSequenceNumber(seq.clone()),
        }
    }
}

/// Each reader's iterator age; the gauge shows the worst.
#[derive(Debug, Default)]
pub(super) struct AgeBoard {
    ages: Mutex<HashMap<ShardId, f64>>,
}

impl AgeBoard {
    pub(crate) fn update(&self, metrics: &Metrics, shard: &ShardId, age: Option<f64>) {
        let Ok(mut ages) = self.ages.lock() else { return };
        match age {
            Some(a) => {
                ages.insert(shard.clone(), a);
            }
            None => {
                ages.remove(shard);
            }
        }
        metrics.stream_iterator_age_seconds.set(ages.values().copied().fold(0.0, f64::max));
    }

    pub(crate) fn clear(&self, metrics: &Metrics) {
        if let Ok(mut ages) = self.ages.lock() {
            ages.clear();
        }
        metrics.stream_iterator_age_seconds.set(0.0);
    }
}

fn error_kind(err: &SourceError) -> StreamErrorKind {
    match err {
        SourceError::ExpiredIterator(_) => StreamErrorKind::expired_iterator,
        SourceError::TrimmedDataAccess(_) => StreamErrorKind::trimmed,
        SourceError::ResourceNotFound(_) => StreamErrorKind::not_found,
        SourceError::Throttled(_) => StreamErrorKind::throttled,
        SourceError::Other(_) => StreamErrorKind::other,
    }
}

pub(super) fn count_error(metrics: &Metrics, err: &SourceError) {
    metrics.stream_errors.get_or_create(&ErrorLabels { kind: error_kind(err) }).inc();
}

/// Runs `fut` unless `cancel` fires first.
pub(super) async fn unless_cancelled<F: Future>(cancel: &CancellationToken, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => None,
        out = fut => Some(out),
    }
}

/// Tells the sink about a possible gap, counted and logged. False when cancelled meanwhile.
pub(super) async fn report_gap<K: ChangeSink>(
    sink: &K,
    metrics: &Metrics,
    cancel: &CancellationToken,
    reason: GapReason,
) -> bool {
    tracing::warn!(%reason, "possible gap in the stream: flushing everything derived from it");
    metrics.stream_resyncs.inc();
    unless_cancelled(cancel, sink.gap(reason)).await.is_some()
}

fn age_seconds(newest: DateTime<Utc>) -> f64 {
    let age = Utc::now().signed_duration_since(newest);
    (age.num_milliseconds() as f64 / 1000.0).max(0.0)
}

/// Which call failed, for [`Reader::failed`].
enum Call {
    GetShardIterator(Position),
    /// GetRecords with this iterator, which a retry may reuse.
    GetRecords(ShardIterator),
}

/// Reads one shard from its origin to its end, or until cancelled.
pub(super) struct Reader<S, K> {
    ctx: Arc<ReaderContext<S, K>>,
    arn: String,
    shard: ShardId,
    origin: Origin,
    shared: Arc<ReaderShared>,
    cancel: CancellationToken,
    /// The last record handed to the sink: ExpiredIterator resumes right after it.
    last_sequence: Option<String>,
    iterator: Option<ShardIterator>,
    /// Set after trimmed data: the next iterator comes from here, whatever was read before.
    reposition: Option<Position>,
    /// A gap to report once a new position is held (the tailer's ordering rule).
    pending_gap: Option<GapReason>,
    backoff: Backoff,
    other_errors: u32,
    next_call: Instant,
    /// Set while the wait is an empty poll's: a reload that shortens the poll interval shortens
    /// the wait under way too, so no reader sleeps longer than the interval in force (the turn
    /// limit counts on it).
    polling_since: Option<Instant>,
    poll_interval: watch::Receiver<Duration>,
}

impl<S: StreamSource, K: ChangeSink> Reader<S, K> {
    pub(crate) fn new(
        ctx: Arc<ReaderContext<S, K>>,
        arn: String,
        shard: ShardId,
        origin: Origin,
        shared: Arc<ReaderShared>,
        cancel: CancellationToken,
    ) -> Self {
        let poll_interval = ctx.poll_interval.clone();
        Reader {
            ctx,
            arn,
            shard,
            origin,
            shared,
            cancel,
            last_sequence: None,
            iterator: None,
            reposition: None,
            pending_gap: None,
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_CAP),
            other_errors: 0,
            next_call: Instant::now(),
            polling_since: None,
            poll_interval,
        }
    }

    pub(crate) fn shard(&self) -> &ShardId {
        &self.shard
    }

    pub(crate) async fn run(mut self) -> ReaderExit {
        loop {
            self.shared.turn.beat();
            if !self.wait_for_turn().await {
                return ReaderExit::Cancelled;
            }
            let step = match self.iterator.take() {
                None => self.acquire_iterator().await,
                Some(iterator) => self.read(iterator).await,
            };
            if let ControlFlow::Break(exit) = step {
                return exit;
            }
        }
    }

    /// Sleeps until the next call is due. False when cancelled.
    async fn wait_for_turn(&mut self) -> bool {
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return false,
                _ = sleep_until(self.next_call) => break,
                Ok(()) = self.poll_interval.changed(), if self.polling_since.is_some() => {
                    let wait = (*self.poll_interval.borrow_and_update()).max(MIN_GET_RECORDS_SPACING);
                    let since = self.polling_since.unwrap_or(self.next_call);
                    self.next_call = self.next_call.min(since + wait);
                }
            }
        }
        self.polling_since = None;
        true
    }

    async fn acquire_iterator(&mut self) -> ControlFlow<ReaderExit> {
        let position = self
            .reposition
            .clone()
            .or_else(|| self.last_sequence.clone().map(Position::AfterSequenceNumber))
            .unwrap_or_else(|| self.origin.position());
        // Pacing covers GetShardIterator too, so no failure path can spin.
        self.next_call = Instant::now() + MIN_GET_RECORDS_SPACING;
        let got = unless_cancelled(&self.cancel, self.ctx.source.get_shard_iterator(&self.arn, &self.shard, &position));
        match got.await {
            None => ControlFlow::Break(ReaderExit::Cancelled),
            Some(Ok(iterator)) => {
                tracing::debug!(shard = %self.shard, %position, "positioned");
                self.reposition = None;
                self.set_positioned(true);
                if let Some(reason) = self.pending_gap.take() {
                    if !self.gap(reason).await {
                        return ControlFlow::Break(ReaderExit::Cancelled);
                    }
                }
                self.iterator = Some(iterator);
                ControlFlow::Continue(())
            }
            Some(Err(err)) => self.failed(err, Call::GetShardIterator(position)).await,
        }
    }

    async fn read(&mut self, iterator: ShardIterator) -> ControlFlow<ReaderExit> {
        self.next_call = Instant::now() + MIN_GET_RECORDS_SPACING;
        self.ctx.metrics.stream_get_records_calls.inc();
        match unless_cancelled(&self.cancel, self.ctx.source.get_records(&iterator)).await {
            None => ControlFlow::Break(ReaderExit::Cancelled),
            Some(Ok(page)) => {
                self.backoff.reset();
                self.other_errors = 0;
                self.deliver(page).await
            }
            Some(Err(err)) => self.failed(err, Call::GetRecords(iterator)).await,
        }
    }

    /// Hands a page's records to the sink one by one, then its progress.
    async fn deliver(&mut self, page: RecordsPage) -> ControlFlow<ReaderExit> {
        let ctx = Arc::clone(&self.ctx);
        let empty = page.records.is_empty();
        let mut moved = false;
        if !empty {
            let decoded = decode_page(&self.shard, &page.records, &ctx.metrics);
            if let Some(newest) = decoded.newest_creation {
                ctx.ages.update(&ctx.metrics, &self.shard, Some(age_seconds(newest)));
            }
            // One record at a time, each counted as progress: a page that touches many keys
            // whose loads are slow waits up to a delivery bound per key, which a whole page
            // could not be held to.
            for change in decoded.changes {
                if unless_cancelled(&self.cancel, ctx.sink.apply(change)).await.is_none() {
                    return ControlFlow::Break(ReaderExit::Cancelled);
                }
                self.shared.turn.beat();
            }
            if decoded.last_sequence_number.is_some() {
                self.last_sequence = decoded.last_sequence_number;
                moved = true;
            }
        } else if page.next_iterator.is_some() {
            ctx.ages.update(&ctx.metrics, &self.shard, Some(0.0));
        }
        let finished = page.next_iterator.is_none();
        // After the page is applied, never before: a saved position must not run ahead of what
        // the sink has done.
        if moved || finished {
            let progress = Progress {
                stream_arn: self.arn.clone(),
                shard_id: self.shard.clone(),
                last_sequence_number: self.last_sequence.clone(),
                finished,
            };
            if unless_cancelled(&self.cancel, ctx.sink.progress(progress)).await.is_none() {
                return ControlFlow::Break(ReaderExit::Cancelled);
            }
        }
        let Some(next) = page.next_iterator else {
            tracing::debug!(shard = %self.shard, "shard read to its end");
            return ControlFlow::Break(ReaderExit::Finished);
        };
        self.iterator = Some(next);
        if empty {
            let wait = *self.poll_interval.borrow();
            self.next_call = self.next_call.max(Instant::now() + wait);
            self.polling_since = Some(Instant::now());
        }
        ControlFlow::Continue(())
    }

    /// What a failed call means for the position, for both calls in one place; then back off.
    async fn failed(&mut self, err: SourceError, call: Call) -> ControlFlow<ReaderExit> {
        count_error(&self.ctx.metrics, &err);
        match (&err, call) {
            (SourceError::ResourceNotFound(_), _) => return ControlFlow::Break(self.vanished(&err).await),
            (SourceError::TrimmedDataAccess(_), _) => self.trimmed(&err),
            (SourceError::Throttled(_), Call::GetRecords(iterator)) => self.iterator = Some(iterator),
            (SourceError::Throttled(_), Call::GetShardIterator(_)) => {}
            (SourceError::ExpiredIterator(_), Call::GetRecords(_)) => {
                tracing::info!(
                    shard = %self.shard,
                    after = self.last_sequence.as_deref().unwrap_or("(nothing read yet)"),
                    "iterator expired; getting a new one"
                );
                self.lost_latest_if_unread();
            }
            (SourceError::Other(_), Call::GetRecords(iterator)) => {
                tracing::warn!(shard = %self.shard, "GetRecords failed: {err}");
                self.other_errors += 1;
                // The iterator itself may be what the service chokes on.
                if self.other_errors < OTHER_ERRORS_BEFORE_NEW_ITERATOR {
                    self.iterator = Some(iterator);
                } else {
                    self.other_errors = 0;
                    self.lost_latest_if_unread();
                }
            }
            (SourceError::ExpiredIterator(_) | SourceError::Other(_), Call::GetShardIterator(position)) => {
                tracing::warn!(shard = %self.shard, %position, "GetShardIterator failed: {err}");
            }
        }
        self.next_call = self.next_call.max(Instant::now() + self.backoff.next_delay());
        ControlFlow::Continue(())
    }

    /// Records were trimmed before this reader got to them: start over from TRIM_HORIZON, and
    /// report the gap once positioned there.
    fn trimmed(&mut self, err: &SourceError) {
        tracing::warn!(shard = %self.shard, "records were trimmed before being read: {err}");
        self.set_positioned(false);
        self.reposition = Some(Position::TrimHorizon);
        self.last_sequence = None;
        self.pending_gap = Some(GapReason::TrimmedData { shard_id: self.shard.0.clone() });
    }

    /// The iterator is lost before any record was read from a shard opened at LATEST: a new
    /// LATEST may be past records written meanwhile, a possible gap.
    fn lost_latest_if_unread(&mut self) {
        if self.last_sequence.is_none() && self.origin == Origin::Start {
            self.set_positioned(false);
            self.pending_gap = Some(GapReason::IteratorExpired { shard_id: self.shard.0.clone() });
        }
    }

    fn set_positioned(&self, positioned: bool) {
        if self.shared.positioned.swap(positioned, Ordering::AcqRel) != positioned {
            self.ctx.notify.notify_one();
        }
    }

    async fn gap(&self, reason: GapReason) -> bool {
        report_gap(self.ctx.sink.as_ref(), &self.ctx.metrics, &self.cancel, reason).await
    }

    async fn vanished(&self, err: &SourceError) -> ReaderExit {
        tracing::warn!(shard = %self.shard, "the shard is gone before it was read to its end: {err}");
        self.set_positioned(false);
        if self.gap(GapReason::ShardVanished { shard_id: self.shard.0.clone() }).await {
            ReaderExit::Vanished
        } else {
            ReaderExit::Cancelled
        }
    }
}
