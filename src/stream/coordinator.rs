//! The coordinator owns the shard tree: it re-reads it every `shard_sync_interval` (and sooner
//! when a shard finishes without known children), starts readers, notices a replaced or
//! disabled stream, reports gaps once every affected reader holds a position, and publishes
//! [`TailerStatus`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::reader::{
    count_error, report_gap, unless_cancelled, AgeBoard, Origin, Reader, ReaderContext, ReaderExit, ReaderShared,
    BACKOFF_BASE,
};
use super::source::{ShardId, ShardInfo, SourceError, StreamSource, TableStream};
use super::status::{FreshStart, TailerState, TailerStatus, BACKOFF_CAP, HEARTBEAT};
use super::tailer::Tailer;
use super::{ChangeSink, GapReason};
use crate::metrics::{ErrorLabels, ShardLabels, ShardState, StreamErrorKind};
use crate::retry::Backoff;

/// How soon the tree is re-read after a shard finished without known children. DescribeStream
/// allows about 10 calls a second per account; once a second per tailer stays far below.
const SYNC_SOON: Duration = Duration::from_secs(1);
/// A DescribeStream that keeps returning "more" is broken; stop paging after this many pages.
const MAX_TREE_PAGES: usize = 10_000;

pub(super) struct Coordinator<S, K> {
    tailer: Tailer<S>,
    readers_ctx: Arc<ReaderContext<S, K>>,
    shutdown: CancellationToken,
    /// Cancels the readers of the current stream only (a replaced stream stops them).
    generation: CancellationToken,
    state: TailerState,
    current_arn: Option<String>,
    /// The stream read before the current one was lost: its return is a gap.
    previous_arn: Option<String>,
    /// The table had no readable stream at some point since start (even before any stream was
    /// read): the cache may have loaded items meanwhile that no stream record will correct.
    stream_was_missing: bool,
    view_type: Option<String>,
    tree: HashMap<ShardId, ShardInfo>,
    readers: HashMap<ShardId, Arc<ReaderShared>>,
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
    /// Sticky; atomic because publishing happens from `&self` between calls.
    positioned_once: std::sync::atomic::AtomicBool,
    sync_backoff: Backoff,
    sync_failing: bool,
}

impl<S: StreamSource, K: ChangeSink> Coordinator<S, K> {
    pub(crate) fn new(tailer: Tailer<S>, sink: Arc<K>, shutdown: CancellationToken) -> Self {
        let readers_ctx = Arc::new(ReaderContext {
            source: Arc::clone(&tailer.source),
            sink,
            metrics: Arc::clone(&tailer.metrics),
            poll_interval: tailer.poll_interval.clone(),
            notify: Arc::new(Notify::new()),
            ages: AgeBoard::default(),
        });
        Coordinator {
            readers_ctx,
            generation: shutdown.child_token(),
            shutdown,
            tailer,
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
            positioned_once: std::sync::atomic::AtomicBool::new(false),
            sync_backoff: Backoff::new(BACKOFF_BASE, BACKOFF_CAP),
            sync_failing: false,
        }
    }

    fn sink(&self) -> &K {
        self.readers_ctx.sink.as_ref()
    }

    pub(crate) async fn run(&mut self) {
        let mut next_sync = Instant::now();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.publish();
            let notify = Arc::clone(&self.readers_ctx.notify);
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    if self.reader_ended(joined) {
                        next_sync = next_sync.min(Instant::now() + SYNC_SOON.min(self.tailer.cfg.shard_sync_interval));
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
            return report_gap(self.sink(), &self.tailer.metrics, &self.shutdown, reason).await;
        }
        if std::mem::take(&mut self.pending_positioned) {
            tracing::debug!(stream = ?self.current_arn, "positioned on every shard at LATEST");
            return unless_cancelled(&self.shutdown, self.sink().positioned()).await.is_some();
        }
        true
    }

    fn all_positioned(&self) -> bool {
        self.readers.values().all(|r| r.positioned.load(Ordering::Acquire))
    }

    fn publish(&self) {
        let now = Instant::now();
        let oldest = self.readers.values().filter_map(|r| r.turn.last()).fold(now, Instant::min);
        let positioned = self.current_arn.is_some()
            && self.state == TailerState::Streaming
            && self.pending_gap.is_none()
            && !self.pending_positioned
            && self.all_positioned();
        let positioned_once = self.positioned_once.fetch_or(positioned, Ordering::Relaxed) || positioned;
        let metrics = &self.tailer.metrics;
        metrics.stream_shards.get_or_create(&ShardLabels { state: ShardState::reading }).set(self.readers.len() as i64);
        metrics
            .stream_shards
            .get_or_create(&ShardLabels { state: ShardState::finished })
            .set(self.finished.len() as i64);
        self.tailer.status.send_replace(TailerStatus {
            positioned,
            positioned_once,
            state: self.state.clone(),
            stream_arn: self.current_arn.clone(),
            view_type: self.view_type.clone(),
            shards_reading: self.readers.len(),
            shards_finished: self.finished.len(),
            last_progress: oldest,
            turn_limit: self.tailer.turn_limit(),
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
        let (table, every) = (&self.tailer.table, self.tailer.cfg.shard_sync_interval);
        match &state {
            TailerState::Streaming => tracing::info!(
                %table,
                stream = self.current_arn.as_deref().unwrap_or(""),
                view_type = self.view_type.as_deref().unwrap_or("unknown"),
                shards = self.tree.len(),
                "tailing the table's stream"
            ),
            TailerState::StreamDisabled => {
                tracing::warn!(%table, "the table's stream is disabled; not ready, checking again every {every:?}")
            }
            TailerState::TableMissing => {
                tracing::warn!(%table, "the table does not exist; not ready, checking again every {every:?}")
            }
            TailerState::Unavailable(e) => tracing::warn!(%table, "cannot describe the table's stream, retrying: {e}"),
            TailerState::Starting | TailerState::Stopped => {}
        }
        self.state = state;
    }

    fn source_failed(&mut self, err: &SourceError) -> Duration {
        count_error(&self.tailer.metrics, err);
        self.last_error = Some(err.to_string());
        if self.current_arn.is_none() {
            self.set_state(TailerState::Unavailable(err.to_string()));
        } else if !self.sync_failing {
            tracing::warn!(table = %self.tailer.table, "re-reading the shard tree failed, readers go on: {err}");
        }
        self.sync_failing = true;
        self.sync_backoff.next_delay().max(BACKOFF_BASE).min(self.tailer.cfg.shard_sync_interval)
    }

    /// Describes the table and the tree and acts on what changed. Returns when to sync next.
    async fn sync(&mut self) -> Duration {
        let interval = self.tailer.cfg.shard_sync_interval;
        let described = unless_cancelled(&self.shutdown, self.tailer.source.describe_table(&self.tailer.table)).await;
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
            tracing::warn!(table = %self.tailer.table, new = %arn, "the table's stream was replaced");
            self.stop_current_stream().await;
        }
        let tree = match self.read_tree(&arn).await {
            None => return interval,
            Some(Err(err)) => return self.source_failed(&err),
            Some(Ok(tree)) => tree,
        };
        if self.sync_failing && self.current_arn.is_some() {
            tracing::info!(table = %self.tailer.table, "reading the shard tree works again");
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
            let described = self.tailer.source.describe_stream(arn, after.as_ref());
            let page = match unless_cancelled(&self.shutdown, described).await? {
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
    /// as the start plan says: by default open shards at LATEST, closed ones ignored.
    fn position_fresh(&mut self, arn: String) {
        let old_arn = self.previous_arn.take();
        if old_arn.is_some() || std::mem::take(&mut self.stream_was_missing) {
            self.pending_gap = Some(GapReason::NewStream { old_arn, new_arn: arn.clone() });
        }
        self.current_arn = Some(arn.clone());
        // Saved positions apply once, to their own stream; a later stream starts fresh.
        if let Some(saved) = self.tailer.plan.resume.take().filter(|s| s.stream_arn == arn) {
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
        match self.tailer.plan.fresh {
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
        let shared = Arc::new(ReaderShared::new());
        let reader = Reader::new(
            Arc::clone(&self.readers_ctx),
            arn,
            shard.clone(),
            origin,
            Arc::clone(&shared),
            self.generation.clone(),
        );
        let handle = self.tasks.spawn(async move {
            let id = reader.shard().clone();
            (id, reader.run().await)
        });
        self.task_shards.insert(handle.id(), shard.clone());
        self.readers.insert(shard, shared);
    }

    /// Handles a reader that ended. True when the tree should be re-read soon.
    fn reader_ended(
        &mut self,
        joined: Result<(tokio::task::Id, (ShardId, ReaderExit)), tokio::task::JoinError>,
    ) -> bool {
        let metrics = Arc::clone(&self.tailer.metrics);
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
                metrics.stream_errors.get_or_create(&ErrorLabels { kind: StreamErrorKind::other }).inc();
                if let Some(shard) = shard {
                    self.readers.remove(&shard);
                    self.readers_ctx.ages.update(&metrics, &shard, None);
                }
                return true;
            }
        };
        self.readers.remove(&shard);
        self.readers_ctx.ages.update(&metrics, &shard, None);
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
        self.readers_ctx.ages.clear(&self.tailer.metrics);
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
        report_gap(self.sink(), &self.tailer.metrics, &self.shutdown, GapReason::StreamDisabled).await;
    }
}
