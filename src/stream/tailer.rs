//! The tailer: one coordinator that owns the shard tree, and one reader task per shard that is
//! readable now.
//!
//! The coordinator re-reads the tree every `shard_sync_interval` (and sooner when a shard
//! finishes without known children), starts readers, notices a replaced or disabled stream, and
//! publishes [`TailerStatus`]. A reader owns its position: it paces its GetRecords calls, backs
//! off on throttling, recovers from expired iterators and trimmed data, and hands a page's
//! records to the sink one by one before reading the next, which is what keeps records in order
//! per shard.
//!
//! Ordering rule for gaps: whenever the tailer repositions after a possible loss, it first holds
//! a position on every affected shard and only then calls [`ChangeSink::gap`]. A flush done
//! before positioning would let the cache load (and keep) a value that a write made between the
//! flush and the new position then changes unseen.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::decode::decode_page;
use super::source::{Position, ShardId, ShardInfo, ShardIterator, SourceError, StreamSource, TableStream};
use super::{ChangeSink, GapReason, Progress};
use crate::config::StreamConfig;
use crate::metrics::{ErrorLabels, Metrics, ShardLabels, ShardState, StreamErrorKind};

/// DynamoDB Streams allows 5 GetRecords per second per shard; this spacing keeps one reader
/// inside that whatever `poll_interval` says.
pub const MIN_GET_RECORDS_SPACING: Duration = Duration::from_millis(200);
/// First backoff step after throttling or a server error; doubled per failure, fully jittered.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The longest a reader or the coordinator waits between two failing attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How often the status is republished when nothing else happens, so `last_progress` moves.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How soon the tree is re-read after a shard finished without known children. DescribeStream
/// allows about 10 calls a second per account; once a second per tailer stays far below.
const SYNC_SOON: Duration = Duration::from_secs(1);
/// A DescribeStream that keeps returning "more" is broken; stop paging after this many pages.
const MAX_TREE_PAGES: usize = 10_000;
/// Consecutive unexplained GetRecords failures after which a reader drops its iterator.
const OTHER_ERRORS_BEFORE_NEW_ITERATOR: u32 = 3;

/// What the tailer is doing, for the status, readiness and log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailerState {
    /// Not yet positioned on the stream.
    Starting,
    /// Following the stream.
    Streaming,
    /// The table exists but its stream is disabled.
    StreamDisabled,
    /// The table does not exist.
    TableMissing,
    /// The table or the shard tree could not be described.
    Unavailable(String),
    /// `run` returned.
    Stopped,
}

impl fmt::Display for TailerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TailerState::Starting => f.write_str("starting"),
            TailerState::Streaming => f.write_str("streaming"),
            TailerState::StreamDisabled => f.write_str("stream disabled"),
            TailerState::TableMissing => f.write_str("table missing"),
            TailerState::Unavailable(e) => write!(f, "unavailable: {e}"),
            TailerState::Stopped => f.write_str("stopped"),
        }
    }
}

/// What the tailer publishes through [`Tailer::status`].
#[derive(Debug, Clone)]
pub struct TailerStatus {
    /// Every open shard of the current stream holds a position (the readiness check).
    pub positioned: bool,
    pub state: TailerState,
    pub stream_arn: Option<String>,
    pub view_type: Option<String>,
    pub shards_reading: usize,
    /// Finished shards still listed in the tree (remembered so they are not read again).
    pub shards_finished: usize,
    /// The oldest "last loop iteration" of the coordinator and of every reader, as of the last
    /// time the coordinator published.
    pub last_progress: Instant,
    /// How old `last_progress` can get while every loop is healthy but each of its calls times
    /// out: a liveness check must allow this much, or it would restart the daemon for an AWS
    /// outage that a restart cannot cure (and lose the cache it still serves from).
    pub turn_limit: Duration,
    pub last_error: Option<String>,
}

impl TailerStatus {
    /// How long the loops have gone without a turn, when that is more than their own timeouts
    /// allow (`turn_limit`) and more than `floor`: then they are stuck, not merely waiting.
    pub fn stuck_for(&self, floor: Duration) -> Option<Duration> {
        let age = self.last_progress.elapsed();
        (age > self.turn_limit.max(floor)).then_some(age)
    }
}

/// Where the tailer starts on a stream it finds.
#[derive(Debug, Clone, Default)]
pub struct StartPlan {
    /// For a stream without saved positions.
    pub fresh: FreshStart,
    /// Positions saved by an earlier reader of one stream (the projector's checkpoints). Used
    /// only when the table's stream is that one; a replaced stream starts `fresh`.
    pub resume: Option<SavedPositions>,
}

/// Where reading starts on a stream nothing was saved for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FreshStart {
    /// Open shards at LATEST, closed ones ignored: only later changes matter, because the cache
    /// loads everything older from the table.
    #[default]
    Latest,
    /// Every shard from TRIM_HORIZON, parents before children: every retained record counts.
    TrimHorizon,
}

/// What an earlier reader of a stream got through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedPositions {
    pub stream_arn: String,
    /// The last sequence number consumed, per shard: reading resumes after it.
    pub after: HashMap<ShardId, String>,
    /// Shards read to their end: never read again.
    pub finished: HashSet<ShardId>,
}

/// Follows the stream of one table and feeds a [`ChangeSink`].
pub struct Tailer<S> {
    source: Arc<S>,
    table: String,
    cfg: StreamConfig,
    metrics: Arc<Metrics>,
    status: watch::Sender<TailerStatus>,
    poll_interval: watch::Receiver<Duration>,
    plan: StartPlan,
    bounds: TurnBounds,
}

/// What one turn of a stream loop can wait on besides its own sleep.
#[derive(Debug, Clone, Copy)]
pub struct TurnBounds {
    /// The longest one source call can take, retries included (`aws::call_bound`).
    pub call: Duration,
    /// The longest handing one record to the sink can take (the cache may wait for loads of
    /// the same key queued before the change, each of which gives up with its request).
    pub delivery: Duration,
}

impl Default for TurnBounds {
    /// The bounds under the default `aws.call_timeout` and `http.request_timeout`.
    fn default() -> Self {
        TurnBounds {
            call: crate::aws::call_bound(crate::config::AwsConfig::default().call_timeout),
            delivery: crate::config::HttpConfig::default().request_timeout,
        }
    }
}

impl TurnBounds {
    /// `TailerStatus::turn_limit` when readers sleep at most `poll_interval` between calls.
    /// A reader's turn is one sleep (the poll interval or an error backoff), one call and one
    /// delivery. The coordinator republishes the readers' progress after each of its own calls
    /// too, so it adds at most one call's worth on top; plus scheduling slack.
    fn turn_limit(&self, poll_interval: Duration) -> Duration {
        poll_interval.max(BACKOFF_CAP) + self.call * 2 + self.delivery + HEARTBEAT * 5
    }
}

impl<S: StreamSource> Tailer<S> {
    pub fn new(source: Arc<S>, table: impl Into<String>, cfg: StreamConfig, metrics: Arc<Metrics>) -> Self {
        let (status, _) = watch::channel(TailerStatus {
            positioned: false,
            state: TailerState::Starting,
            stream_arn: None,
            view_type: None,
            shards_reading: 0,
            shards_finished: 0,
            last_progress: Instant::now(),
            turn_limit: TurnBounds::default().turn_limit(cfg.poll_interval),
            last_error: None,
        });
        let poll_interval = watch::channel(cfg.poll_interval).1;
        Tailer {
            source,
            table: table.into(),
            cfg,
            metrics,
            status,
            poll_interval,
            plan: StartPlan::default(),
            bounds: TurnBounds::default(),
        }
    }

    /// How long the source's calls and the sink's deliveries can take at most (the defaults
    /// assume the default `aws.call_timeout` and `http.request_timeout`).
    pub fn with_bounds(mut self, bounds: TurnBounds) -> Self {
        self.bounds = bounds;
        let limit = bounds.turn_limit(*self.poll_interval.borrow());
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

    /// Runs until `shutdown` is cancelled; every reader has stopped when this returns.
    pub async fn run<K: ChangeSink>(self, sink: Arc<K>, shutdown: CancellationToken) {
        let mut c = Coordinator {
            generation: shutdown.child_token(),
            shutdown,
            source: self.source,
            sink,
            table: self.table,
            cfg: self.cfg,
            metrics: self.metrics,
            status: self.status,
            poll_interval: self.poll_interval,
            plan: self.plan,
            bounds: self.bounds,
            epoch: Instant::now(),
            notify: Arc::new(Notify::new()),
            ages: Arc::new(AgeBoard::default()),
            state: TailerState::Starting,
            current_arn: None,
            previous_arn: None,
            stream_was_missing: false,
            view_type: None,
            tree: HashMap::new(),
            readers: HashMap::new(),
            task_shards: HashMap::new(),
            tasks: JoinSet::new(),
            finished: HashSet::new(),
            pending_gap: None,
            pending_positioned: false,
            last_error: None,
            sync_backoff: Backoff::default(),
            sync_failing: false,
        };
        c.run().await;
    }
}

/// Why a reader task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderExit {
    /// GetRecords returned no next iterator: the shard was read to its end.
    Finished,
    /// The shard no longer exists; the reader has reported the gap.
    Vanished,
    Cancelled,
}

/// Where a reader starts when it has read nothing yet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// Open at the time the tailer (re)positioned on a stream: only later changes matter,
    /// because the cache loads everything older from the table.
    Start,
    /// Discovered later (a split or a rollover), or every shard of a [`FreshStart::TrimHorizon`]
    /// stream: every record counts.
    Child,
    /// A saved position: right after this sequence number.
    Resume(String),
}

impl Origin {
    fn position(&self) -> Position {
        match self {
            Origin::Start => Position::Latest,
            Origin::Child => Position::TrimHorizon,
            Origin::Resume(seq) => Position::AfterSequenceNumber(seq.clone()),
        }
    }
}

/// What a reader shares with the coordinator without a message.
#[derive(Debug, Default)]
struct ReaderShared {
    positioned: AtomicBool,
    /// Milliseconds since the coordinator's epoch.
    last_iteration_ms: AtomicU64,
}

/// Each reader's iterator age; the gauge shows the worst.
#[derive(Debug, Default)]
struct AgeBoard {
    ages: Mutex<HashMap<ShardId, f64>>,
}

impl AgeBoard {
    fn update(&self, metrics: &Metrics, shard: &ShardId, age: Option<f64>) {
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

    fn clear(&self, metrics: &Metrics) {
        if let Ok(mut ages) = self.ages.lock() {
            ages.clear();
        }
        metrics.stream_iterator_age_seconds.set(0.0);
    }
}

/// Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And
/// Jitter"): spreads the retries of many readers instead of synchronising them.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_BASE.saturating_mul(1u32 << self.failures.min(16)).min(BACKOFF_CAP);
        self.failures = self.failures.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
    }

    fn reset(&mut self) {
        self.failures = 0;
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

fn count_error(metrics: &Metrics, err: &SourceError) {
    metrics.stream_errors.get_or_create(&ErrorLabels { kind: error_kind(err) }).inc();
}

/// Runs `fut` unless `cancel` fires first.
async fn unless_cancelled<F: Future>(cancel: &CancellationToken, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => None,
        out = fut => Some(out),
    }
}

async fn report_gap<K: ChangeSink>(sink: &K, metrics: &Metrics, cancel: &CancellationToken, reason: GapReason) -> bool {
    tracing::warn!(%reason, "possible gap in the stream: flushing everything derived from it");
    metrics.stream_resyncs.inc();
    unless_cancelled(cancel, sink.gap(reason)).await.is_some()
}

struct ReaderHandle {
    shared: Arc<ReaderShared>,
}

struct Coordinator<S, K> {
    shutdown: CancellationToken,
    /// Cancels the readers of the current stream only (a replaced stream stops them).
    generation: CancellationToken,
    source: Arc<S>,
    sink: Arc<K>,
    table: String,
    cfg: StreamConfig,
    metrics: Arc<Metrics>,
    status: watch::Sender<TailerStatus>,
    poll_interval: watch::Receiver<Duration>,
    plan: StartPlan,
    bounds: TurnBounds,
    epoch: Instant,
    notify: Arc<Notify>,
    ages: Arc<AgeBoard>,
    state: TailerState,
    current_arn: Option<String>,
    /// The stream read before the current one was lost: its return is a gap.
    previous_arn: Option<String>,
    /// The table had no readable stream at some point since start (even before any stream was
    /// read): the cache may have loaded items meanwhile that no stream record will correct.
    stream_was_missing: bool,
    view_type: Option<String>,
    tree: HashMap<ShardId, ShardInfo>,
    readers: HashMap<ShardId, ReaderHandle>,
    task_shards: HashMap<tokio::task::Id, ShardId>,
    tasks: JoinSet<(ShardId, ReaderExit)>,
    /// Shards read to their end (or ignored at start, or vanished): never read again. Pruned to
    /// the shards the tree still lists, which bounds it by the tree's size.
    finished: HashSet<ShardId>,
    /// A gap to report once every reader of a fresh position holds its iterator.
    pending_gap: Option<GapReason>,
    /// A fresh LATEST start without a gap: [`ChangeSink::positioned`] is due once every reader
    /// holds its iterator.
    pending_positioned: bool,
    last_error: Option<String>,
    sync_backoff: Backoff,
    sync_failing: bool,
}

impl<S: StreamSource, K: ChangeSink> Coordinator<S, K> {
    async fn run(&mut self) {
        let mut next_sync = Instant::now();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.publish();
            let notify = Arc::clone(&self.notify);
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    if self.reader_ended(joined) {
                        next_sync = next_sync.min(Instant::now() + SYNC_SOON.min(self.cfg.shard_sync_interval));
                    }
                }
                _ = sleep_until(next_sync) => {
                    let delay = self.sync().await;
                    next_sync = Instant::now() + delay;
                }
                _ = notify.notified() => {}
                _ = heartbeat.tick() => {}
            }
            if !self.emit_pending().await {
                break;
            }
        }
        self.stop_readers().await;
        self.state = TailerState::Stopped;
        self.publish();
    }

    /// Reports the pending gap, or the pending first positioning, once every reader is
    /// positioned. False when shutting down.
    async fn emit_pending(&mut self) -> bool {
        if !self.all_positioned() {
            return true;
        }
        if let Some(reason) = self.pending_gap.take() {
            return report_gap(self.sink.as_ref(), &self.metrics, &self.shutdown, reason).await;
        }
        if std::mem::take(&mut self.pending_positioned) {
            tracing::debug!(stream = ?self.current_arn, "positioned on every shard at LATEST");
            return unless_cancelled(&self.shutdown, self.sink.positioned()).await.is_some();
        }
        true
    }

    fn all_positioned(&self) -> bool {
        self.readers.values().all(|r| r.shared.positioned.load(Ordering::Acquire))
    }

    fn publish(&self) {
        let now = Instant::now();
        let mut oldest = now;
        for r in self.readers.values() {
            let at = self.epoch + Duration::from_millis(r.shared.last_iteration_ms.load(Ordering::Relaxed));
            oldest = oldest.min(at);
        }
        let positioned = self.current_arn.is_some()
            && self.state == TailerState::Streaming
            && self.pending_gap.is_none()
            && !self.pending_positioned
            && self.all_positioned();
        self.metrics
            .stream_shards
            .get_or_create(&ShardLabels { state: ShardState::reading })
            .set(self.readers.len() as i64);
        self.metrics
            .stream_shards
            .get_or_create(&ShardLabels { state: ShardState::finished })
            .set(self.finished.len() as i64);
        self.status.send_replace(TailerStatus {
            positioned,
            state: self.state.clone(),
            stream_arn: self.current_arn.clone(),
            view_type: self.view_type.clone(),
            shards_reading: self.readers.len(),
            shards_finished: self.finished.len(),
            last_progress: oldest,
            turn_limit: self.bounds.turn_limit(*self.poll_interval.borrow()),
            last_error: self.last_error.clone(),
        });
    }

    /// One line per change of state, however often the same state is seen again.
    fn set_state(&mut self, state: TailerState) {
        // Unavailable carries the latest error text; a new text is not a new state.
        if std::mem::discriminant(&self.state) == std::mem::discriminant(&state) {
            self.state = state;
            return;
        }
        match &state {
            TailerState::Streaming => tracing::info!(
                table = %self.table,
                stream = self.current_arn.as_deref().unwrap_or(""),
                view_type = self.view_type.as_deref().unwrap_or("unknown"),
                shards = self.tree.len(),
                "tailing the table's stream"
            ),
            TailerState::StreamDisabled => tracing::warn!(
                table = %self.table,
                "the table's stream is disabled; not ready, checking again every {:?}",
                self.cfg.shard_sync_interval
            ),
            TailerState::TableMissing => tracing::warn!(
                table = %self.table,
                "the table does not exist; not ready, checking again every {:?}",
                self.cfg.shard_sync_interval
            ),
            TailerState::Unavailable(e) => {
                tracing::warn!(table = %self.table, "cannot describe the table's stream, retrying: {e}")
            }
            TailerState::Starting | TailerState::Stopped => {}
        }
        self.state = state;
    }

    fn source_failed(&mut self, err: &SourceError) -> Duration {
        count_error(&self.metrics, err);
        self.last_error = Some(err.to_string());
        if self.current_arn.is_none() {
            self.set_state(TailerState::Unavailable(err.to_string()));
        } else if !self.sync_failing {
            tracing::warn!(table = %self.table, "re-reading the shard tree failed, readers go on: {err}");
        }
        self.sync_failing = true;
        self.sync_backoff.next_delay().max(BACKOFF_BASE).min(self.cfg.shard_sync_interval)
    }

    /// Describes the table and the tree and acts on what changed. Returns when to sync next.
    async fn sync(&mut self) -> Duration {
        let interval = self.cfg.shard_sync_interval;
        let described = unless_cancelled(&self.shutdown, self.source.describe_table(&self.table)).await;
        // After every call, not only between syncs: the turn limit allows one call of ours.
        self.publish();
        let (arn, view_type) = match described {
            None => return interval,
            Some(Err(err)) => return self.source_failed(&err),
            Some(Ok(TableStream::Enabled { arn, view_type })) => (arn, view_type),
            Some(Ok(lost @ (TableStream::Disabled | TableStream::TableMissing))) => {
                self.stream_was_missing = true;
                self.lose_stream().await;
                self.sync_backoff.reset();
                self.sync_failing = false;
                self.set_state(if lost == TableStream::Disabled {
                    TailerState::StreamDisabled
                } else {
                    TailerState::TableMissing
                });
                return interval;
            }
        };

        if self.current_arn.as_ref().is_some_and(|current| *current != arn) {
            tracing::warn!(table = %self.table, new = %arn, "the table's stream was replaced");
            self.stop_current_stream().await;
        }
        let tree = match self.read_tree(&arn).await {
            None => return interval,
            Some(Err(err)) => return self.source_failed(&err),
            Some(Ok(tree)) => tree,
        };
        if self.sync_failing && self.current_arn.is_some() {
            tracing::info!(table = %self.table, "reading the shard tree works again");
        }
        self.sync_backoff.reset();
        self.sync_failing = false;
        self.last_error = None;
        self.tree = tree;
        self.view_type = view_type;

        if self.current_arn.is_none() {
            self.position_fresh(arn);
        } else {
            self.finished.retain(|id| self.tree.contains_key(id));
            self.start_readable_children();
        }
        self.set_state(TailerState::Streaming);
        interval
    }

    /// Reads every page of DescribeStream.
    async fn read_tree(&self, arn: &str) -> Option<Result<HashMap<ShardId, ShardInfo>, SourceError>> {
        let mut tree = HashMap::new();
        let mut after: Option<ShardId> = None;
        for _ in 0..MAX_TREE_PAGES {
            let page = match unless_cancelled(&self.shutdown, self.source.describe_stream(arn, after.as_ref())).await? {
                Ok(page) => page,
                Err(err) => return Some(Err(err)),
            };
            self.publish();
            for shard in page.shards {
                tree.insert(shard.id.clone(), shard);
            }
            match page.last_evaluated_shard_id {
                // A page that points back at where it started would loop forever.
                Some(next) if after.as_ref() != Some(&next) => after = Some(next),
                _ => return Some(Ok(tree)),
            }
        }
        Some(Err(SourceError::Other(format!("DescribeStream {arn}: more than {MAX_TREE_PAGES} pages of shards"))))
    }

    /// Positions on a stream not read before (at start, or after it was replaced or re-enabled)
    /// as the [`StartPlan`] says: by default open shards at LATEST, closed ones ignored.
    fn position_fresh(&mut self, arn: String) {
        let old_arn = self.previous_arn.take();
        if old_arn.is_some() || std::mem::take(&mut self.stream_was_missing) {
            self.pending_gap = Some(GapReason::NewStream { old_arn, new_arn: arn.clone() });
        }
        self.current_arn = Some(arn.clone());
        // Saved positions apply once, to their own stream; a later stream starts fresh.
        if let Some(saved) = self.plan.resume.take().filter(|s| s.stream_arn == arn) {
            self.finished = saved.finished;
            let mut resume: Vec<(ShardId, String)> = saved
                .after
                .into_iter()
                .filter(|(id, _)| self.tree.contains_key(id) && !self.finished.contains(id))
                .collect();
            resume.sort();
            for (id, seq) in resume {
                self.spawn_reader(id, Origin::Resume(seq));
            }
            // Shards never read: from TRIM_HORIZON, parents first.
            self.start_readable_children();
            return;
        }
        match self.plan.fresh {
            FreshStart::TrimHorizon => {
                self.finished.clear();
                self.start_readable_children();
            }
            FreshStart::Latest => {
                // Anything loaded from the table until these readers hold LATEST may miss a
                // write made meanwhile, which no record will bring.
                self.pending_positioned = self.pending_gap.is_none();
                self.finished = self.tree.values().filter(|s| !s.is_open()).map(|s| s.id.clone()).collect();
                let mut open: Vec<ShardId> = self.tree.values().filter(|s| s.is_open()).map(|s| s.id.clone()).collect();
                open.sort();
                for id in open {
                    self.spawn_reader(id, Origin::Start);
                }
            }
        }
    }

    /// Starts every shard whose parent is done: finished, or no longer in the tree and not
    /// being read.
    fn start_readable_children(&mut self) {
        let mut ready: Vec<ShardId> = self
            .tree
            .values()
            .filter(|s| !self.readers.contains_key(&s.id) && !self.finished.contains(&s.id))
            .filter(|s| match &s.parent {
                None => true,
                Some(p) => self.finished.contains(p) || (!self.tree.contains_key(p) && !self.readers.contains_key(p)),
            })
            .map(|s| s.id.clone())
            .collect();
        ready.sort();
        for id in ready {
            self.spawn_reader(id, Origin::Child);
        }
    }

    fn spawn_reader(&mut self, shard: ShardId, origin: Origin) {
        let Some(arn) = self.current_arn.clone() else { return };
        tracing::debug!(shard = %shard, position = %origin.position(), "starting a shard reader");
        let shared = Arc::new(ReaderShared::default());
        shared.last_iteration_ms.store(millis_since(self.epoch), Ordering::Relaxed);
        let reader = Reader {
            source: Arc::clone(&self.source),
            sink: Arc::clone(&self.sink),
            metrics: Arc::clone(&self.metrics),
            arn,
            shard: shard.clone(),
            origin,
            poll_interval: self.poll_interval.clone(),
            shared: Arc::clone(&shared),
            epoch: self.epoch,
            ages: Arc::clone(&self.ages),
            notify: Arc::clone(&self.notify),
            cancel: self.generation.clone(),
        };
        let handle = self.tasks.spawn(async move {
            let id = reader.shard.clone();
            (id, reader.run().await)
        });
        self.task_shards.insert(handle.id(), shard.clone());
        self.readers.insert(shard, ReaderHandle { shared });
    }

    /// Handles a reader that ended. True when the tree should be re-read soon.
    fn reader_ended(
        &mut self,
        joined: Result<(tokio::task::Id, (ShardId, ReaderExit)), tokio::task::JoinError>,
    ) -> bool {
        let (shard, exit) = match joined {
            Ok((task, (shard, exit))) => {
                self.task_shards.remove(&task);
                (shard, exit)
            }
            Err(err) => {
                let shard = self.task_shards.remove(&err.id());
                // A panic (in the sink, say) loses the reader's position; the shard is not
                // finished, so the next sync restarts it from TRIM_HORIZON: records repeat, none
                // are lost.
                tracing::error!(shard = ?shard, "a shard reader failed: {err}");
                self.metrics.stream_errors.get_or_create(&ErrorLabels { kind: StreamErrorKind::other }).inc();
                if let Some(shard) = shard {
                    self.readers.remove(&shard);
                    self.ages.update(&self.metrics, &shard, None);
                }
                return true;
            }
        };
        self.readers.remove(&shard);
        self.ages.update(&self.metrics, &shard, None);
        match exit {
            ReaderExit::Cancelled => false,
            ReaderExit::Finished | ReaderExit::Vanished => {
                tracing::debug!(shard = %shard, ?exit, "shard reader done");
                self.finished.insert(shard.clone());
                self.start_readable_children();
                let has_known_child = self.tree.values().any(|s| s.parent.as_ref() == Some(&shard));
                exit == ReaderExit::Vanished || !has_known_child
            }
        }
    }

    async fn stop_readers(&mut self) {
        self.generation.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.generation = self.shutdown.child_token();
        self.readers.clear();
        self.task_shards.clear();
        self.ages.clear(&self.metrics);
    }

    /// Forgets the current stream (replaced): its successor will be a gap.
    async fn stop_current_stream(&mut self) {
        self.stop_readers().await;
        self.tree.clear();
        self.finished.clear();
        self.pending_gap = None;
        self.pending_positioned = false;
        self.previous_arn = self.current_arn.take().or(self.previous_arn.take());
    }

    /// The stream is disabled or the table is gone: nothing derived from it stays fresh.
    async fn lose_stream(&mut self) {
        if self.current_arn.is_none() {
            return;
        }
        self.stop_current_stream().await;
        report_gap(self.sink.as_ref(), &self.metrics, &self.shutdown, GapReason::StreamDisabled).await;
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn age_seconds(newest: DateTime<Utc>) -> f64 {
    let age = Utc::now().signed_duration_since(newest);
    (age.num_milliseconds() as f64 / 1000.0).max(0.0)
}

/// Reads one shard from its origin to its end, or until cancelled.
struct Reader<S, K> {
    source: Arc<S>,
    sink: Arc<K>,
    metrics: Arc<Metrics>,
    arn: String,
    shard: ShardId,
    origin: Origin,
    poll_interval: watch::Receiver<Duration>,
    shared: Arc<ReaderShared>,
    epoch: Instant,
    ages: Arc<AgeBoard>,
    notify: Arc<Notify>,
    cancel: CancellationToken,
}

impl<S: StreamSource, K: ChangeSink> Reader<S, K> {
    fn set_positioned(&self, positioned: bool) {
        if self.shared.positioned.swap(positioned, Ordering::AcqRel) != positioned {
            self.notify.notify_one();
        }
    }

    async fn gap(&self, reason: GapReason) -> bool {
        report_gap(self.sink.as_ref(), &self.metrics, &self.cancel, reason).await
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

    async fn run(self) -> ReaderExit {
        // The last record handed to the sink: ExpiredIterator resumes right after it.
        let mut last_sequence: Option<String> = None;
        let mut iterator: Option<ShardIterator> = None;
        // Set after trimmed data: the next iterator comes from here, whatever was read before.
        let mut reposition: Option<Position> = None;
        let mut pending_gap: Option<GapReason> = None;
        let mut backoff = Backoff::default();
        let mut other_errors = 0u32;
        let mut next_call = Instant::now();
        // Set while the wait is an empty poll's: a reload that shortens the poll interval
        // shortens the wait under way too, so no reader sleeps longer than the interval in force
        // (the turn limit counts on it).
        let mut polling_since: Option<Instant> = None;
        let mut poll_interval = self.poll_interval.clone();

        loop {
            self.shared.last_iteration_ms.store(millis_since(self.epoch), Ordering::Relaxed);
            loop {
                tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => return ReaderExit::Cancelled,
                    _ = sleep_until(next_call) => break,
                    Ok(()) = poll_interval.changed(), if polling_since.is_some() => {
                        let wait = (*poll_interval.borrow_and_update()).max(MIN_GET_RECORDS_SPACING);
                        next_call = next_call.min(polling_since.map_or(next_call, |since| since + wait));
                    }
                }
            }
            polling_since = None;

            let current = match iterator.take() {
                Some(it) => it,
                None => {
                    let position = reposition
                        .clone()
                        .or_else(|| last_sequence.clone().map(Position::AfterSequenceNumber))
                        .unwrap_or_else(|| self.origin.position());
                    // Pacing covers GetShardIterator too, so no failure path can spin.
                    next_call = Instant::now() + MIN_GET_RECORDS_SPACING;
                    let got = unless_cancelled(
                        &self.cancel,
                        self.source.get_shard_iterator(&self.arn, &self.shard, &position),
                    )
                    .await;
                    match got {
                        None => return ReaderExit::Cancelled,
                        Some(Ok(it)) => {
                            tracing::debug!(shard = %self.shard, %position, "positioned");
                            reposition = None;
                            self.set_positioned(true);
                            if let Some(reason) = pending_gap.take() {
                                if !self.gap(reason).await {
                                    return ReaderExit::Cancelled;
                                }
                            }
                            iterator = Some(it);
                            continue;
                        }
                        Some(Err(err)) => {
                            count_error(&self.metrics, &err);
                            match err {
                                SourceError::ResourceNotFound(_) => return self.vanished(&err).await,
                                SourceError::TrimmedDataAccess(_) => {
                                    tracing::warn!(shard = %self.shard, %position, "position already trimmed: {err}");
                                    self.set_positioned(false);
                                    reposition = Some(Position::TrimHorizon);
                                    last_sequence = None;
                                    pending_gap = Some(GapReason::TrimmedData { shard_id: self.shard.0.clone() });
                                }
                                SourceError::Throttled(_) => {}
                                SourceError::ExpiredIterator(_) | SourceError::Other(_) => {
                                    tracing::warn!(shard = %self.shard, %position, "GetShardIterator failed: {err}");
                                }
                            }
                            next_call = next_call.max(Instant::now() + backoff.next_delay());
                            continue;
                        }
                    }
                }
            };

            next_call = Instant::now() + MIN_GET_RECORDS_SPACING;
            let page = match unless_cancelled(&self.cancel, self.source.get_records(&current)).await {
                None => return ReaderExit::Cancelled,
                Some(Ok(page)) => page,
                Some(Err(err)) => {
                    count_error(&self.metrics, &err);
                    match err {
                        SourceError::ExpiredIterator(_) => {
                            tracing::info!(
                                shard = %self.shard,
                                after = last_sequence.as_deref().unwrap_or("(nothing read yet)"),
                                "iterator expired; getting a new one"
                            );
                            if last_sequence.is_none() && matches!(self.origin, Origin::Start) {
                                // A new LATEST iterator would skip whatever arrived after the
                                // expired one's position: a possible gap.
                                self.set_positioned(false);
                                pending_gap = Some(GapReason::IteratorExpired { shard_id: self.shard.0.clone() });
                            }
                        }
                        SourceError::TrimmedDataAccess(_) => {
                            tracing::warn!(shard = %self.shard, "records were trimmed before being read: {err}");
                            self.set_positioned(false);
                            reposition = Some(Position::TrimHorizon);
                            last_sequence = None;
                            pending_gap = Some(GapReason::TrimmedData { shard_id: self.shard.0.clone() });
                        }
                        SourceError::ResourceNotFound(_) => return self.vanished(&err).await,
                        SourceError::Throttled(_) => iterator = Some(current),
                        SourceError::Other(_) => {
                            tracing::warn!(shard = %self.shard, "GetRecords failed: {err}");
                            other_errors += 1;
                            // The iterator itself may be what the service chokes on.
                            if other_errors < OTHER_ERRORS_BEFORE_NEW_ITERATOR {
                                iterator = Some(current);
                            } else {
                                other_errors = 0;
                                if last_sequence.is_none() && matches!(self.origin, Origin::Start) {
                                    self.set_positioned(false);
                                    pending_gap = Some(GapReason::IteratorExpired { shard_id: self.shard.0.clone() });
                                }
                            }
                        }
                    }
                    next_call = next_call.max(Instant::now() + backoff.next_delay());
                    continue;
                }
            };
            backoff.reset();
            other_errors = 0;

            let empty = page.records.is_empty();
            let mut moved = false;
            if !empty {
                let decoded = decode_page(&self.shard, &page.records, &self.metrics);
                if let Some(newest) = decoded.newest_creation {
                    self.ages.update(&self.metrics, &self.shard, Some(age_seconds(newest)));
                }
                // One record at a time, each counted as progress: a page that touches many keys
                // whose loads are slow waits up to a delivery bound per key, which a whole page
                // could not be held to.
                for change in decoded.changes {
                    if unless_cancelled(&self.cancel, self.sink.apply(change)).await.is_none() {
                        return ReaderExit::Cancelled;
                    }
                    self.shared.last_iteration_ms.store(millis_since(self.epoch), Ordering::Relaxed);
                }
                if decoded.last_sequence_number.is_some() {
                    last_sequence = decoded.last_sequence_number;
                    moved = true;
                }
            } else if page.next_iterator.is_some() {
                self.ages.update(&self.metrics, &self.shard, Some(0.0));
            }
            let finished = page.next_iterator.is_none();
            // After the page is applied, never before: a saved position must not run ahead of
            // what the sink has done.
            if moved || finished {
                let progress = Progress {
                    stream_arn: self.arn.clone(),
                    shard_id: self.shard.clone(),
                    last_sequence_number: last_sequence.clone(),
                    finished,
                };
                if unless_cancelled(&self.cancel, self.sink.progress(progress)).await.is_none() {
                    return ReaderExit::Cancelled;
                }
            }
            match page.next_iterator {
                None => {
                    tracing::debug!(shard = %self.shard, "shard read to its end");
                    return ReaderExit::Finished;
                }
                Some(next) => iterator = Some(next),
            }
            if empty {
                let wait = *poll_interval.borrow();
                next_call = next_call.max(Instant::now() + wait);
                polling_since = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(age: Duration, turn_limit: Duration) -> TailerStatus {
        TailerStatus {
            positioned: true,
            state: TailerState::Streaming,
            stream_arn: None,
            view_type: None,
            shards_reading: 1,
            shards_finished: 0,
            // A machine up for less than `age` cannot have a loop that old.
            last_progress: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            turn_limit,
            last_error: None,
        }
    }

    #[test]
    fn stuck_only_past_the_turn_limit_or_the_floor() {
        let limit = Duration::from_secs(90);
        assert_eq!(status(Duration::from_secs(60), limit).stuck_for(Duration::ZERO), None);
        if Instant::now().checked_sub(Duration::from_secs(95)).is_some() {
            assert!(status(Duration::from_secs(95), limit).stuck_for(Duration::ZERO).is_some());
        }
        // A watchdog interval longer than the limit raises it.
        assert_eq!(status(Duration::from_secs(95), limit).stuck_for(Duration::from_secs(120)), None);
    }
}
