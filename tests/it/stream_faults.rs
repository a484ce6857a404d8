//! The tailer against the scripted stream: every fault moto cannot produce.
//!
//! These run on tokio's paused clock: the fake answers at once, so time only moves when every
//! task waits, which makes pacing and backoff countable instead of timing-dependent.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cruddur_syncd::config::StreamConfig;
use cruddur_syncd::metrics::{ErrorLabels, Metrics, StreamErrorKind, StreamEvent};
use cruddur_syncd::model::{Item, Message, MessageGroupId, MessageId, Sk, UserUuid};
use cruddur_syncd::stream::scripted::{Op, ScriptedSource};
use cruddur_syncd::stream::source::{Position, SourceError};
use cruddur_syncd::stream::TurnBounds;
use cruddur_syncd::stream::{
    Change, FreshStart, GapReason, Progress, SavedPositions, ShardId, StartPlan, Tailer, TailerState, TailerStatus,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{wait_until, RecordingSink, SinkEvent};

const DEADLINE: Duration = Duration::from_secs(20);

struct Harness {
    source: Arc<ScriptedSource>,
    sink: Arc<RecordingSink>,
    metrics: Arc<Metrics>,
    status: watch::Receiver<TailerStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

fn start(source: ScriptedSource) -> Harness {
    start_with(source, StreamConfig::default())
}

fn start_with(source: ScriptedSource, cfg: StreamConfig) -> Harness {
    start_planned(source, cfg, StartPlan::default())
}

fn start_planned(source: ScriptedSource, cfg: StreamConfig, plan: StartPlan) -> Harness {
    launch(source, cfg, plan, None)
}

/// A tailer whose turn limit is computed from `bounds`.
fn start_bounded(source: ScriptedSource, bounds: TurnBounds) -> Harness {
    launch(source, StreamConfig::default(), StartPlan::default(), Some(bounds))
}

/// Without `bounds` the tailer is unwatched (no turn limit), as the projector's is.
fn launch(source: ScriptedSource, cfg: StreamConfig, plan: StartPlan, bounds: Option<TurnBounds>) -> Harness {
    let source = Arc::new(source);
    let sink = Arc::new(RecordingSink::default());
    let metrics = Arc::new(Metrics::new());
    let mut tailer = Tailer::new(Arc::clone(&source), "cruddur-messages", cfg, Arc::clone(&metrics)).with_start(plan);
    if let Some(bounds) = bounds {
        tailer = tailer.with_bounds(bounds);
    }
    let status = tailer.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tailer.run(Arc::clone(&sink), shutdown.clone()));
    Harness { source, sink, metrics, status, shutdown, task }
}

impl Harness {
    async fn positioned(&self) {
        let status = self.status.clone();
        wait_until(DEADLINE, "the tailer is positioned", || {
            let ok = status.borrow().positioned;
            async move { ok }
        })
        .await;
    }

    /// Message texts of every upsert delivered, in delivery order.
    fn texts(&self) -> Vec<String> {
        self.sink
            .changes()
            .into_iter()
            .filter_map(|c| match c.change {
                Change::Upsert(Item::Message(m)) => Some(m.message),
                _ => None,
            })
            .collect()
    }

    async fn delivered(&self, expected: &[String]) {
        let what = format!("{expected:?} are delivered");
        wait_until(DEADLINE, &what, || {
            let got: HashSet<String> = self.texts().into_iter().collect();
            let ok = expected.iter().all(|e| got.contains(e));
            async move { ok }
        })
        .await;
    }

    async fn gap_seen(&self, what: &str, pred: impl Fn(&GapReason) -> bool) {
        wait_until(DEADLINE, what, || {
            let ok = self.sink.gaps().iter().any(&pred);
            async move { ok }
        })
        .await;
    }

    fn errors(&self, kind: StreamErrorKind) -> u64 {
        self.metrics.stream_errors.get_or_create(&ErrorLabels { kind }).get()
    }

    /// Stops the tailer and checks that it exits without waiting out a sleep or a backoff.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_millis(50), self.task)
            .await
            .expect("the tailer did not stop promptly")
            .expect("the tailer panicked");
    }
}

/// A message whose text names it; the sk orders messages by `n`.
fn message(text: &str, n: i64) -> Item {
    let base: DateTime<Utc> = "2024-05-01T10:00:00Z".parse().unwrap();
    Item::Message(Message {
        group: MessageGroupId(Uuid::from_u128(7)),
        sk: Sk::from_instant(base + chrono::Duration::seconds(n)),
        message_uuid: MessageId(Uuid::new_v4()),
        message: text.to_string(),
        user_uuid: UserUuid(Uuid::from_u128(1)),
        user_display_name: "Andrew Brown".into(),
        user_handle: "andrewbrown".into(),
    })
}

/// Pushes `count` messages named `{shard}/{i}` onto `shard`; returns their names.
fn push_many(source: &ScriptedSource, shard: &str, from: usize, count: usize) -> Vec<String> {
    (from..from + count)
        .map(|i| {
            let text = format!("{shard}/{i}");
            source.push_upsert(shard, StreamEvent::INSERT, &message(&text, i as i64));
            text
        })
        .collect()
}

fn assert_no_duplicates(texts: &[String]) {
    let mut seen = HashSet::new();
    for t in texts {
        assert!(seen.insert(t), "{t} was delivered twice: {texts:?}");
    }
}

/// The delivery position of each text.
fn index_of(texts: &[String], text: &str) -> usize {
    texts.iter().position(|t| t == text).unwrap_or_else(|| panic!("{text} missing from {texts:?}"))
}

#[tokio::test(start_paused = true)]
async fn a_split_reads_the_parent_to_its_end_then_both_children_from_trim_horizon() {
    let source = ScriptedSource::new("arn:stream/1", &["s-0"]);
    source.set_records_page_size(2);
    // The tree is re-read several times while the parent's backlog (6 s of paced reads) drains,
    // so the children are known long before the parent is finished.
    let cfg = StreamConfig { shard_sync_interval: Duration::from_secs(1), ..StreamConfig::default() };
    let h = start_with(source, cfg);
    h.positioned().await;
    assert_eq!(h.source.positions_for("s-0"), [Position::Latest]);

    let mut expected = push_many(&h.source, "s-0", 0, 3);
    h.delivered(&expected).await;
    // Many parent records, then the split, then child records: all of them exist before the
    // parent's remaining records are read.
    let parent_tail = push_many(&h.source, "s-0", 3, 60);
    h.source.split("s-0", &["s-1", "s-2"]);
    let left = push_many(&h.source, "s-1", 0, 3);
    let right = push_many(&h.source, "s-2", 0, 3);
    expected.extend(parent_tail.iter().cloned());
    expected.extend(left.iter().cloned());
    expected.extend(right.iter().cloned());
    h.delivered(&expected).await;

    let texts = h.texts();
    assert_no_duplicates(&texts);
    assert_eq!(texts.len(), expected.len(), "{texts:?}");
    let last_parent = index_of(&texts, parent_tail.last().unwrap());
    for child in left.iter().chain(&right) {
        assert!(index_of(&texts, child) > last_parent, "{child} arrived before the parent's end: {texts:?}");
    }
    for shard in [&parent_tail, &left, &right] {
        let positions: Vec<usize> = shard.iter().map(|t| index_of(&texts, t)).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "out of order within a shard: {texts:?}");
    }
    assert_eq!(h.source.positions_for("s-1"), [Position::TrimHorizon]);
    assert_eq!(h.source.positions_for("s-2"), [Position::TrimHorizon]);
    wait_until(DEADLINE, "the parent counts as finished", || {
        let s = h.status.borrow().clone();
        async move { s.shards_finished == 1 && s.shards_reading == 2 }
    })
    .await;
    assert!(h.sink.gaps().is_empty(), "a split is not a gap: {:?}", h.sink.gaps());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rollover_of_every_shard_loses_and_repeats_nothing() {
    let shards = ["a", "b", "c"];
    let source = ScriptedSource::new("arn:stream/1", &shards);
    source.set_records_page_size(1);
    // Each shard's backlog takes 2 s to read; the tree is re-read every 500 ms meanwhile.
    let cfg = StreamConfig { shard_sync_interval: Duration::from_millis(500), ..StreamConfig::default() };
    let h = start_with(source, cfg);
    h.positioned().await;
    let mut expected = Vec::new();
    for round in 0..2 {
        for shard in shards {
            let id = if round == 0 { shard.to_string() } else { format!("{shard}-{round}") };
            expected.extend(push_many(&h.source, &id, 0, 10));
        }
        for shard in shards {
            let parent = if round == 0 { shard.to_string() } else { format!("{shard}-{round}") };
            let child = format!("{shard}-{}", round + 1);
            h.source.split(&parent, &[&child]);
        }
    }
    for shard in shards {
        expected.extend(push_many(&h.source, &format!("{shard}-2"), 0, 10));
    }
    h.delivered(&expected).await;
    let texts = h.texts();
    assert_no_duplicates(&texts);
    assert_eq!(texts.len(), expected.len());
    for shard in shards {
        let lineage: Vec<usize> = [shard.to_string(), format!("{shard}-1"), format!("{shard}-2")]
            .iter()
            .flat_map(|id| (0..10).map(move |i| format!("{id}/{i}")))
            .map(|t| index_of(&texts, &t))
            .collect();
        assert!(lineage.windows(2).all(|w| w[0] < w[1]), "lineage of {shard} out of order: {texts:?}");
        assert_eq!(h.source.positions_for(&format!("{shard}-1")), [Position::TrimHorizon]);
        assert_eq!(h.source.positions_for(&format!("{shard}-2")), [Position::TrimHorizon]);
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_expired_iterator_resumes_after_the_last_delivered_record() {
    let source = ScriptedSource::new("arn:stream/1", &["s-0"]);
    source.set_records_page_size(2);
    let h = start(source);
    h.positioned().await;

    // Expired before anything was read: re-position where it started, and since the new
    // LATEST may be past writes made meanwhile, report a possible gap.
    h.source.expire_iterators("s-0");
    wait_until(DEADLINE, "the reader re-positions", || {
        let n = h.source.positions_for("s-0").len();
        async move { n >= 2 }
    })
    .await;
    assert_eq!(h.source.positions_for("s-0")[..2], [Position::Latest, Position::Latest]);
    wait_until(DEADLINE, "the possible gap is reported", || {
        let n = h.sink.gaps().len();
        async move { n == 1 }
    })
    .await;
    assert_eq!(h.sink.gaps(), [GapReason::IteratorExpired { shard_id: "s-0".into() }]);

    let first = push_many(&h.source, "s-0", 0, 3);
    h.delivered(&first).await;
    let seqs: Vec<String> = h.sink.changes().iter().map(|c| c.sequence_number.clone()).collect();
    let last = seqs.last().unwrap().clone();

    h.source.expire_iterators("s-0");
    let second = push_many(&h.source, "s-0", 3, 5);
    h.delivered(&second).await;
    let texts = h.texts();
    assert_no_duplicates(&texts);
    assert_eq!(texts, [first, second].concat());
    assert!(
        h.source.positions_for("s-0").contains(&Position::AfterSequenceNumber(last.clone())),
        "expected AFTER_SEQUENCE_NUMBER {last}: {:?}",
        h.source.positions_for("s-0")
    );
    assert!(h.errors(StreamErrorKind::expired_iterator) >= 2);
    assert_eq!(h.sink.gaps().len(), 1, "an expiry after a delivered record is no gap");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_throttling_storm_is_met_with_backoff_not_a_busy_loop() {
    let h = start(ScriptedSource::new("arn:stream/1", &["s-0"]));
    h.positioned().await;
    let before = h.source.get_records_calls();
    h.source.set_throttled(true);
    let storm = Duration::from_secs(60);
    tokio::time::sleep(storm).await;
    let during = h.source.get_records_calls() - before;
    h.source.set_throttled(false);

    // Pacing alone (5 a second) would allow 300 calls; backoff doubling to a 10 s cap with full
    // jitter averages about 20. The bound leaves room for unlucky jitter.
    assert!(during >= 3, "the reader gave up during the storm: {during} calls");
    assert!(during <= 60, "{during} GetRecords calls in a {storm:?} storm: no backoff");
    assert!(h.errors(StreamErrorKind::throttled) >= during - 1);
    assert!(h.status.borrow().positioned, "throttling does not lose the position");

    let after = push_many(&h.source, "s-0", 0, 2);
    h.delivered(&after).await;
    assert!(h.sink.gaps().is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn trimmed_records_are_a_gap_and_reading_goes_on_from_trim_horizon() {
    let h = start(ScriptedSource::new("arn:stream/1", &["s-0"]));
    h.positioned().await;
    let first = push_many(&h.source, "s-0", 0, 2);
    h.delivered(&first).await;

    // Two records pass the retention before the reader gets to them.
    let lost = push_many(&h.source, "s-0", 2, 2);
    h.source.trim("s-0", 4);
    let later = push_many(&h.source, "s-0", 4, 2);
    h.delivered(&later).await;
    h.gap_seen("a trimmed-data gap", |g| matches!(g, GapReason::TrimmedData { shard_id } if shard_id == "s-0")).await;

    let texts = h.texts();
    for t in &lost {
        assert!(!texts.contains(t), "{t} was trimmed, it cannot have been read");
    }
    // The gap comes after the reader holds its new position, before the later records.
    let events = h.sink.events();
    let gap_at = events.iter().position(|e| matches!(e, SinkEvent::Gap(_))).unwrap();
    let later_at = events
        .iter()
        .position(|e| matches!(e, SinkEvent::Apply(c) if matches!(&c.change, Change::Upsert(Item::Message(m)) if m.message == later[0])))
        .unwrap();
    assert!(gap_at < later_at, "{events:?}");
    assert_eq!(h.source.positions_for("s-0").last(), Some(&Position::TrimHorizon));
    assert_eq!(h.metrics.stream_resyncs.get(), 1);
    assert_eq!(h.errors(StreamErrorKind::trimmed), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_expired_iterator_whose_resume_point_was_trimmed_is_a_gap() {
    let h = start(ScriptedSource::new("arn:stream/1", &["s-0"]));
    h.positioned().await;
    let first = push_many(&h.source, "s-0", 0, 2);
    h.delivered(&first).await;
    push_many(&h.source, "s-0", 2, 2);
    h.source.expire_iterators("s-0");
    h.source.trim("s-0", 4);
    let later = push_many(&h.source, "s-0", 4, 1);
    h.delivered(&later).await;
    h.gap_seen("a trimmed-data gap", |g| matches!(g, GapReason::TrimmedData { .. })).await;
    let positions = h.source.positions_for("s-0");
    assert!(matches!(positions[positions.len() - 2], Position::AfterSequenceNumber(_)), "{positions:?}");
    assert_eq!(positions.last(), Some(&Position::TrimHorizon));
    h.stop().await;
}

fn positionings(h: &Harness) -> usize {
    h.sink.events().iter().filter(|e| **e == SinkEvent::Positioned).count()
}

/// The cache serves before the tailer holds LATEST, so it must hear when the tailer does:
/// after every shard's iterator, before readiness, and not as a gap.
#[tokio::test(start_paused = true)]
async fn a_latest_start_reports_positioned_once_every_shard_holds_its_iterator() {
    let source = ScriptedSource::new("arn:stream/1", &["s-0", "s-1"]);
    // Each call takes 2 s and one shard's first try fails: it retries after a backoff (and 2 s
    // more) while the other already holds LATEST.
    source.set_latency(Duration::from_secs(2));
    source.fail_next(Op::GetShardIterator, SourceError::Throttled("LimitExceededException".into()));
    let h = start(source);
    h.sink.set_positioned_latency(Duration::from_secs(10));
    wait_until(DEADLINE, "one shard holds its iterator, the other failed", || {
        let n = h.source.positions_for("s-0").len() + h.source.positions_for("s-1").len();
        async move { n >= 2 }
    })
    .await;
    assert!(!h.status.borrow().positioned);
    assert_eq!(positionings(&h), 0, "not before every shard holds LATEST");
    wait_until(DEADLINE, "the sink hears of the position", || {
        let n = positionings(&h);
        async move { n == 1 }
    })
    .await;
    assert!(!h.status.borrow().positioned, "not ready before the sink has dropped what it loaded");
    h.positioned().await;
    assert_eq!(h.sink.events().first(), Some(&SinkEvent::Positioned), "before any record");
    let later = push_many(&h.source, "s-1", 0, 2);
    h.delivered(&later).await;
    assert_eq!(positionings(&h), 1);
    assert!(h.sink.gaps().is_empty());
    assert_eq!(h.metrics.stream_resyncs.get(), 0, "a start is not a resync");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replaced_stream_is_a_gap_reported_once_positioned_on_the_new_one() {
    let h = start(ScriptedSource::new("arn:stream/1", &["s-0"]));
    h.positioned().await;
    let first = push_many(&h.source, "s-0", 0, 2);
    h.delivered(&first).await;

    h.source.replace_stream("arn:stream/2", &["t-0", "t-1"]);
    h.gap_seen("the new-stream gap", |g| {
        *g == GapReason::NewStream { old_arn: Some("arn:stream/1".into()), new_arn: "arn:stream/2".into() }
    })
    .await;
    assert!(h.status.borrow().positioned);
    assert_eq!(h.status.borrow().stream_arn.as_deref(), Some("arn:stream/2"));
    assert_eq!(h.source.positions_for("t-0"), [Position::Latest]);
    assert_eq!(h.source.positions_for("t-1"), [Position::Latest]);

    let later = [push_many(&h.source, "t-0", 0, 2), push_many(&h.source, "t-1", 0, 2)].concat();
    h.delivered(&later).await;
    assert_eq!(h.metrics.stream_resyncs.get(), 1);
    assert_eq!(h.sink.gaps().len(), 1);
    assert_eq!(positionings(&h), 1, "the first stream's start only: the new one is a gap");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_shard_that_vanishes_before_its_end_is_a_gap_and_the_tailer_goes_on() {
    let h = start(ScriptedSource::new("arn:stream/1", &["s-0"]));
    h.positioned().await;
    let first = push_many(&h.source, "s-0", 0, 2);
    h.delivered(&first).await;

    h.source.vanish("s-0");
    h.source.add_shard("s-1", None);
    h.gap_seen("the vanished-shard gap", |g| *g == GapReason::ShardVanished { shard_id: "s-0".into() }).await;
    assert_eq!(h.errors(StreamErrorKind::not_found), 1);

    let later = push_many(&h.source, "s-1", 0, 2);
    h.delivered(&later).await;
    assert_eq!(h.source.positions_for("s-1"), [Position::TrimHorizon]);
    let s0_calls = h.source.get_records_calls_for("s-0");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.source.get_records_calls_for("s-0"), s0_calls, "a vanished shard is not read again");
    assert_eq!(h.status.borrow().shards_reading, 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn describe_stream_is_read_to_its_last_page() {
    let shards = ["s-0", "s-1", "s-2", "s-3", "s-4"];
    let source = ScriptedSource::new("arn:stream/1", &shards);
    source.set_describe_page_size(2);
    let h = start(source);
    h.positioned().await;
    assert_eq!(h.status.borrow().shards_reading, 5);
    assert!(h.source.describe_stream_calls() >= 3);
    let expected: Vec<String> = shards.iter().flat_map(|s| push_many(&h.source, s, 0, 1)).collect();
    h.delivered(&expected).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_disabled_stream_leaves_the_tailer_unready_until_a_new_one_appears() {
    let cfg = StreamConfig { shard_sync_interval: Duration::from_secs(10), ..StreamConfig::default() };
    let h = start_with(ScriptedSource::new("arn:stream/1", &["s-0"]), cfg);
    h.positioned().await;
    let first = push_many(&h.source, "s-0", 0, 1);
    h.delivered(&first).await;

    h.source.disable_stream();
    wait_until(DEADLINE, "the tailer reports the disabled stream", || {
        let s = h.status.borrow().clone();
        async move { !s.positioned && s.state == TailerState::StreamDisabled && s.shards_reading == 0 }
    })
    .await;
    assert_eq!(h.sink.gaps(), [GapReason::StreamDisabled]);

    // It keeps checking, at the sync interval and not faster.
    let calls = h.source.describe_table_calls();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let checks = h.source.describe_table_calls() - calls;
    assert!((5..=7).contains(&checks), "{checks} DescribeTable calls in 60 s with a 10 s interval");
    assert!(!h.status.borrow().positioned);

    h.source.replace_stream("arn:stream/2", &["t-0"]);
    h.positioned().await;
    assert_eq!(
        h.sink.gaps(),
        [
            GapReason::StreamDisabled,
            GapReason::NewStream { old_arn: Some("arn:stream/1".into()), new_arn: "arn:stream/2".into() }
        ]
    );
    let later = push_many(&h.source, "t-0", 0, 1);
    h.delivered(&later).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_enabled_after_start_is_a_gap_once_positioned() {
    let source = ScriptedSource::new("arn:stream/1", &["s-0"]);
    source.disable_stream();
    let h = start(source);
    wait_until(DEADLINE, "the tailer reports the disabled stream", || {
        let s = h.status.borrow().clone();
        async move { s.state == TailerState::StreamDisabled }
    })
    .await;
    // Nothing was read yet, so nothing to flush yet; whatever the cache loads meanwhile is.
    assert!(h.sink.gaps().is_empty());
    h.source.replace_stream("arn:stream/2", &["t-0"]);
    h.positioned().await;
    assert_eq!(h.sink.gaps(), [GapReason::NewStream { old_arn: None, new_arn: "arn:stream/2".into() }]);
    assert_eq!(positionings(&h), 0, "the gap drops what was loaded");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_deleted_table_leaves_the_tailer_running_and_unready() {
    let h = start(ScriptedSource::new("arn:stream/1", &["s-0"]));
    h.positioned().await;
    h.source.delete_table();
    wait_until(DEADLINE, "the tailer reports the missing table", || {
        let s = h.status.borrow().clone();
        async move { !s.positioned && s.state == TailerState::TableMissing }
    })
    .await;
    assert!(!h.task.is_finished());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failures_at_start_are_retried_and_counted() {
    let source = ScriptedSource::new("arn:stream/1", &["s-0"]);
    source.fail_next(Op::DescribeTable, SourceError::Throttled("ThrottlingException".into()));
    source.fail_next(Op::DescribeStream, SourceError::Other("garbled answer".into()));
    source.fail_next(Op::GetShardIterator, SourceError::Throttled("LimitExceededException".into()));
    source.fail_next(Op::GetRecords, SourceError::Throttled("<html>500</html>".into()));
    let h = start(source);
    h.positioned().await;
    let first = push_many(&h.source, "s-0", 0, 2);
    h.delivered(&first).await;
    assert_eq!(h.errors(StreamErrorKind::throttled), 3);
    assert_eq!(h.errors(StreamErrorKind::other), 1);
    assert!(h.status.borrow().last_error.is_none(), "a recovered error is not reported as current");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_shard_is_polled_at_the_poll_interval() {
    let h = start(ScriptedSource::new("arn:stream/1", &["s-0"]));
    h.positioned().await;
    let before = h.source.get_records_calls();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let polls = h.source.get_records_calls() - before;
    // 250 ms between empty pages: 40 in 10 s.
    assert!((38..=42).contains(&polls), "{polls} polls of an idle shard in 10 s");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_shard_is_read_at_most_five_times_a_second() {
    let source = ScriptedSource::new("arn:stream/1", &["s-0"]);
    source.set_records_page_size(1);
    let h = start(source);
    h.positioned().await;
    let expected = push_many(&h.source, "s-0", 0, 100);
    let before = h.source.get_records_calls();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = h.source.get_records_calls() - before;
    assert!((49..=51).contains(&calls), "{calls} GetRecords in 10 s on a shard with a backlog");
    assert_eq!(h.texts().len(), calls as usize, "every call returned one record");
    h.delivered(&expected).await;
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Start plans (the projector's checkpoints)

fn progress_of(h: &Harness) -> Vec<Progress> {
    h.sink
        .events()
        .into_iter()
        .filter_map(|e| match e {
            SinkEvent::Progress(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn saved_positions_resume_after_their_record_skip_finished_shards_and_start_new_ones_at_trim_horizon() {
    let source = ScriptedSource::new("arn:stream/1", &["a"]);
    source.push_upsert("a", StreamEvent::INSERT, &message("a1", 1));
    let a2 = source.push_upsert("a", StreamEvent::INSERT, &message("a2", 2));
    source.push_upsert("a", StreamEvent::INSERT, &message("a3", 3));
    source.split("a", &["b", "c"]);
    let b1 = source.push_upsert("b", StreamEvent::INSERT, &message("b1", 4));
    source.push_upsert("c", StreamEvent::INSERT, &message("c1", 5));
    let plan = StartPlan {
        fresh: FreshStart::Latest,
        resume: Some(SavedPositions {
            stream_arn: "arn:stream/1".into(),
            after: [(ShardId::from("a"), a2.clone())].into(),
            finished: [ShardId::from("c")].into(),
        }),
    };
    let h = start_planned(source, StreamConfig::default(), plan);
    h.delivered(&["a3".to_string(), "b1".to_string()]).await;
    assert_eq!(h.texts(), ["a3", "b1"], "nothing before the checkpoint, nothing of a finished shard");
    assert_eq!(h.source.positions_for("a"), [Position::AfterSequenceNumber(a2)]);
    assert_eq!(h.source.positions_for("b"), [Position::TrimHorizon], "a shard never read starts at its beginning");
    assert!(h.source.positions_for("c").is_empty());

    // Progress follows every applied page, and says when a shard was read to its end.
    wait_until(DEADLINE, "b's progress is reported", || {
        let ok = progress_of(&h).iter().any(|p| p.shard_id.as_str() == "b");
        async move { ok }
    })
    .await;
    let progress = progress_of(&h);
    let a_done = progress.iter().position(|p| p.shard_id.as_str() == "a" && p.finished).expect("a finished");
    let b_at = progress.iter().position(|p| p.shard_id.as_str() == "b").unwrap();
    assert!(a_done < b_at, "{progress:?}");
    assert_eq!(progress[b_at].last_sequence_number.as_deref(), Some(b1.as_str()));
    assert!(!progress[b_at].finished);
    assert!(progress.iter().all(|p| p.stream_arn == "arn:stream/1"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_trim_horizon_start_reads_every_record_parents_first() {
    let source = ScriptedSource::new("arn:stream/1", &["p"]);
    source.push_upsert("p", StreamEvent::INSERT, &message("p1", 1));
    source.split("p", &["k"]);
    source.push_upsert("k", StreamEvent::INSERT, &message("k1", 2));
    let plan = StartPlan { fresh: FreshStart::TrimHorizon, resume: None };
    let h = start_planned(source, StreamConfig::default(), plan);
    h.delivered(&["p1".to_string(), "k1".to_string()]).await;
    assert_eq!(h.texts(), ["p1", "k1"]);
    assert_eq!(h.source.positions_for("p"), [Position::TrimHorizon]);
    assert_eq!(positionings(&h), 0, "every retained record is replayed: nothing loaded can stay stale");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn saved_positions_of_another_stream_do_not_apply() {
    let source = ScriptedSource::new("arn:stream/new", &["s-0"]);
    let plan = StartPlan {
        fresh: FreshStart::Latest,
        resume: Some(SavedPositions {
            stream_arn: "arn:stream/old".into(),
            after: [(ShardId::from("s-0"), "000000000000000000005".to_string())].into(),
            ..SavedPositions::default()
        }),
    };
    let h = start_planned(source, StreamConfig::default(), plan);
    h.positioned().await;
    assert_eq!(h.source.positions_for("s-0"), [Position::Latest]);
    h.stop().await;
}

/// A slow service that still answers (every call takes nearly its whole bound) and a shard tree
/// of several DescribeStream pages: the progress the tailer publishes never gets older than the
/// turn limit it publishes beside it, so `/livez` and the watchdog do not call a slow loop
/// stuck, however many slow calls the coordinator makes in a row.
#[tokio::test(start_paused = true)]
async fn slow_calls_and_a_paged_tree_stay_within_the_published_turn_limit() {
    let source = ScriptedSource::new("arn:stream/1", &["s-0", "s-1", "s-2", "s-3"]);
    source.set_describe_page_size(1);
    let bounds = TurnBounds { call: Duration::from_secs(33), delivery: Duration::from_secs(5) };
    let h = start_bounded(source, bounds);
    h.positioned().await;
    let (source, sink, status) = (&h.source, &h.sink, &h.status);

    source.set_latency(bounds.call - Duration::from_secs(1));
    let slow_since = tokio::time::Instant::now();
    let mut oldest = Duration::ZERO;
    let mut sent = 0;
    while slow_since.elapsed() < Duration::from_secs(600) {
        push_many(source, &format!("s-{}", sent % 4), sent, 1);
        sent += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = status.borrow().clone();
        let age = s.last_progress.elapsed();
        oldest = oldest.max(age);
        assert!(
            s.stuck_for(Duration::ZERO).is_none(),
            "progress {age:?} old against a turn limit of {:?}",
            s.turn_limit
        );
    }
    assert!(oldest > bounds.call, "the loops were slow ({oldest:?} at most), or the test proves nothing");
    assert!(!sink.changes().is_empty(), "records were delivered meanwhile");
    h.shutdown.cancel();
    h.task.await.unwrap();
}

/// A page whose every record waits nearly a whole delivery bound (a change queued behind slow
/// loads of its key, one key after another): each record applied counts as progress, so a page
/// that takes several turn limits in all is not called stuck.
#[tokio::test(start_paused = true)]
async fn a_page_of_slow_deliveries_stays_within_the_published_turn_limit() {
    let source = ScriptedSource::new("arn:stream/1", &["s-0"]);
    let bounds = TurnBounds { call: Duration::from_secs(33), delivery: Duration::from_secs(5) };
    let h = start_bounded(source, bounds);
    h.positioned().await;
    let (source, sink, status) = (&h.source, &h.sink, &h.status);

    sink.set_apply_latency(bounds.delivery - Duration::from_secs(1));
    let sent = push_many(source, "s-0", 0, 40);
    let since = tokio::time::Instant::now();
    while sink.changes().len() < sent.len() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = status.borrow().clone();
        assert!(
            s.stuck_for(Duration::ZERO).is_none(),
            "progress {:?} old against a turn limit of {:?}, {} of {} records applied",
            s.last_progress.elapsed(),
            s.turn_limit,
            sink.changes().len(),
            sent.len()
        );
    }
    let took = since.elapsed();
    let limit = status.borrow().turn_limit;
    assert!(
        took > limit,
        "the page took {took:?}, not longer than one turn limit ({limit:?}): the test proves nothing"
    );
    let texts: Vec<String> = sink
        .changes()
        .into_iter()
        .filter_map(|c| match c.change {
            Change::Upsert(Item::Message(m)) => Some(m.message),
            _ => None,
        })
        .collect();
    assert_eq!(texts, sent, "in order, each once");
    h.shutdown.cancel();
    h.task.await.unwrap();
}

/// A reload that shortens `stream.poll_interval` cuts an empty poll's wait that is already under
/// way (no reader sleeps longer than the interval in force, which the turn limit counts on).
#[tokio::test(start_paused = true)]
async fn a_shorter_poll_interval_cuts_the_wait_under_way() {
    let source = Arc::new(ScriptedSource::new("arn:stream/1", &["s-0"]));
    let (poll_tx, poll_rx) = watch::channel(Duration::from_secs(60));
    let cfg = StreamConfig { poll_interval: Duration::from_secs(60), ..StreamConfig::default() };
    let tailer =
        Tailer::new(Arc::clone(&source), "cruddur-messages", cfg, Arc::new(Metrics::new())).with_poll_interval(poll_rx);
    let status = tailer.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tailer.run(Arc::new(RecordingSink::default()), shutdown.clone()));
    wait_until(DEADLINE, "the first empty poll", || {
        let ok = status.borrow().positioned && source.get_records_calls() >= 1;
        async move { ok }
    })
    .await;
    let before = source.get_records_calls();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(source.get_records_calls(), before, "waiting out the 60 s poll interval");
    poll_tx.send(Duration::from_millis(250)).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(source.get_records_calls() > before, "the shorter interval applies to the wait under way");
    shutdown.cancel();
    task.await.unwrap();
}
