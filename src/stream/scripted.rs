//! A scripted [`StreamSource`] for tests and benchmarks: a stream whose shard tree, records and
//! faults are set by the caller.
//!
//! moto has one shard per stream that never closes, iterators that never expire, and no
//! throttling or trimming (see the guide). Everything the tailer must survive beyond that is
//! scripted here: splits and rollovers, expiry, throttling storms, trimmed records, vanished
//! shards, replaced and disabled streams, and paginated DescribeStream. It behaves like the
//! service where the service is specified: sequence numbers grow, a closed shard's last page has
//! no next iterator, LATEST points after the last record, TRIM_HORIZON at the oldest kept one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use aws_sdk_dynamodb::types::AttributeValue as DdbValue;
use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, Record, StreamRecord};

use super::source::{
    Position, RecordsPage, ShardId, ShardInfo, ShardIterator, ShardPage, SourceError, StreamSource, TableStream,
};
use crate::metrics::StreamEvent;
use crate::model::{Item, ItemKey, Message, MessageGroup};

/// Which operation a scripted failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    DescribeTable,
    DescribeStream,
    GetShardIterator,
    GetRecords,
}

#[derive(Debug, Clone)]
enum TableState {
    Enabled(String),
    Disabled,
    Missing,
}

#[derive(Debug)]
struct FakeShard {
    id: ShardId,
    parent: Option<ShardId>,
    closed: bool,
    records: Vec<Record>,
    /// Records before this index are gone (older than the retention).
    trimmed: usize,
    vanished: bool,
    /// Bumped to expire every iterator handed out so far.
    epoch: u64,
}

impl FakeShard {
    fn new(id: &str, parent: Option<&str>) -> Self {
        FakeShard {
            id: ShardId::from(id),
            parent: parent.map(ShardId::from),
            closed: false,
            records: Vec::new(),
            trimmed: 0,
            vanished: false,
            epoch: 0,
        }
    }

    fn seq(&self, index: usize) -> &str {
        self.records[index].dynamodb().and_then(|d| d.sequence_number()).unwrap_or("")
    }
}

#[derive(Debug, Default)]
struct FakeStream {
    shards: Vec<FakeShard>,
}

#[derive(Debug, Clone)]
struct IteratorState {
    arn: String,
    shard: ShardId,
    index: usize,
    epoch: u64,
}

#[derive(Debug, Default)]
struct Calls {
    describe_table: u64,
    describe_stream: u64,
    get_shard_iterator: Vec<(ShardId, Position)>,
    get_records: HashMap<ShardId, u64>,
}

#[derive(Debug)]
struct State {
    table: TableState,
    streams: HashMap<String, FakeStream>,
    iterators: HashMap<String, IteratorState>,
    next_iterator: u64,
    next_sequence: u64,
    describe_page_size: usize,
    records_page_size: usize,
    throttled: bool,
    latency: std::time::Duration,
    failures: HashMap<Op, VecDeque<SourceError>>,
    calls: Calls,
}

/// See the module documentation. All methods panic on a script error (an unknown shard), never
/// on anything the tailer does.
#[derive(Debug)]
pub struct ScriptedSource {
    state: Mutex<State>,
}

impl ScriptedSource {
    /// A table whose stream `arn` has the given open root shards.
    pub fn new(arn: &str, shards: &[&str]) -> Self {
        let stream = FakeStream { shards: shards.iter().map(|id| FakeShard::new(id, None)).collect() };
        ScriptedSource {
            state: Mutex::new(State {
                table: TableState::Enabled(arn.to_string()),
                streams: HashMap::from([(arn.to_string(), stream)]),
                iterators: HashMap::new(),
                next_iterator: 0,
                next_sequence: 1,
                describe_page_size: 100,
                records_page_size: 1000,
                throttled: false,
                latency: std::time::Duration::ZERO,
                failures: HashMap::new(),
                calls: Calls::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; keep going for the rest.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream the table currently points at.
    pub fn current_arn(&self) -> Option<String> {
        match &self.lock().table {
            TableState::Enabled(arn) => Some(arn.clone()),
            _ => None,
        }
    }

    /// At most `n` shards per DescribeStream page.
    pub fn set_describe_page_size(&self, n: usize) {
        self.lock().describe_page_size = n.max(1);
    }

    /// At most `n` records per GetRecords page.
    pub fn set_records_page_size(&self, n: usize) {
        self.lock().records_page_size = n.max(1);
    }

    /// Adds an open shard to the current stream (a child when `parent` is given).
    pub fn add_shard(&self, id: &str, parent: Option<&str>) {
        let mut st = self.lock();
        let stream = current_stream_mut(&mut st);
        stream.shards.push(FakeShard::new(id, parent));
    }

    /// Closes a shard: no more records; its last page will have no next iterator.
    pub fn close_shard(&self, id: &str) {
        let mut st = self.lock();
        shard_mut(&mut st, id).closed = true;
    }

    /// Closes `parent` and opens `children` with it as their parent.
    pub fn split(&self, parent: &str, children: &[&str]) {
        self.close_shard(parent);
        for child in children {
            self.add_shard(child, Some(parent));
        }
    }

    /// Appends a record to an open shard of the current stream, assigning its sequence number
    /// and creation time. Returns the sequence number.
    pub fn push(&self, shard: &str, mut record: Record) -> String {
        let mut st = self.lock();
        let seq = format!("{:021}", st.next_sequence);
        st.next_sequence += 1;
        let fake = shard_mut(&mut st, shard);
        assert!(!fake.closed, "script error: shard {shard} is closed");
        let mut sr = record.dynamodb.take().unwrap_or_else(|| StreamRecord::builder().build());
        sr.sequence_number = Some(seq.clone());
        if sr.approximate_creation_date_time.is_none() {
            sr.approximate_creation_date_time =
                Some(aws_smithy_types::DateTime::from_millis(chrono::Utc::now().timestamp_millis()));
        }
        record.dynamodb = Some(sr);
        fake.records.push(record);
        seq
    }

    /// INSERT (or MODIFY) of `item` with a NEW_AND_OLD_IMAGES-style record.
    pub fn push_upsert(&self, shard: &str, event: StreamEvent, item: &Item) -> String {
        self.push(shard, upsert_record(event, item))
    }

    /// REMOVE of `key`.
    pub fn push_remove(&self, shard: &str, key: &ItemKey) -> String {
        self.push(shard, remove_record(key))
    }

    /// Every iterator handed out for `shard` so far is expired.
    pub fn expire_iterators(&self, shard: &str) {
        let mut st = self.lock();
        shard_mut(&mut st, shard).epoch += 1;
    }

    /// The oldest `count` records of `shard` pass the retention period.
    pub fn trim(&self, shard: &str, count: usize) {
        let mut st = self.lock();
        let fake = shard_mut(&mut st, shard);
        fake.trimmed = count.min(fake.records.len());
    }

    /// The shard disappears from the tree and every call about it is ResourceNotFound.
    pub fn vanish(&self, shard: &str) {
        let mut st = self.lock();
        shard_mut(&mut st, shard).vanished = true;
    }

    /// While set, every GetRecords is throttled (LimitExceededException).
    pub fn set_throttled(&self, on: bool) {
        self.lock().throttled = on;
    }

    /// Every call answers only after `latency` (a slow service that still answers; under
    /// tokio's paused clock this costs no real time).
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.lock().latency = latency;
    }

    async fn answer_late(&self) {
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// The next call of `op` fails with `err` (queued after earlier scripted failures).
    pub fn fail_next(&self, op: Op, err: SourceError) {
        self.lock().failures.entry(op).or_default().push_back(err);
    }

    /// The table gets a new stream with the given open root shards (disable + enable). The old
    /// stream stays readable, as on AWS, but receives nothing any more.
    pub fn replace_stream(&self, new_arn: &str, shards: &[&str]) {
        let mut st = self.lock();
        for stream in st.streams.values_mut() {
            for shard in &mut stream.shards {
                shard.closed = true;
            }
        }
        let stream = FakeStream { shards: shards.iter().map(|id| FakeShard::new(id, None)).collect() };
        st.streams.insert(new_arn.to_string(), stream);
        st.table = TableState::Enabled(new_arn.to_string());
    }

    /// The table's stream is disabled (its shards close).
    pub fn disable_stream(&self) {
        let mut st = self.lock();
        for stream in st.streams.values_mut() {
            for shard in &mut stream.shards {
                shard.closed = true;
            }
        }
        st.table = TableState::Disabled;
    }

    /// The table is deleted.
    pub fn delete_table(&self) {
        self.disable_stream();
        self.lock().table = TableState::Missing;
    }

    pub fn describe_table_calls(&self) -> u64 {
        self.lock().calls.describe_table
    }

    pub fn describe_stream_calls(&self) -> u64 {
        self.lock().calls.describe_stream
    }

    pub fn get_records_calls(&self) -> u64 {
        self.lock().calls.get_records.values().sum()
    }

    pub fn get_records_calls_for(&self, shard: &str) -> u64 {
        self.lock().calls.get_records.get(&ShardId::from(shard)).copied().unwrap_or(0)
    }

    /// Every GetShardIterator call so far, in order.
    pub fn iterator_requests(&self) -> Vec<(ShardId, Position)> {
        self.lock().calls.get_shard_iterator.clone()
    }

    /// The GetShardIterator positions asked for `shard`, in order.
    pub fn positions_for(&self, shard: &str) -> Vec<Position> {
        self.lock()
            .calls
            .get_shard_iterator
            .iter()
            .filter(|(s, _)| s.as_str() == shard)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

fn current_stream_mut(st: &mut State) -> &mut FakeStream {
    let TableState::Enabled(arn) = st.table.clone() else { panic!("script error: the table has no stream") };
    st.streams.get_mut(&arn).unwrap_or_else(|| panic!("script error: no stream {arn}"))
}

fn shard_mut<'a>(st: &'a mut State, id: &str) -> &'a mut FakeShard {
    current_stream_mut(st)
        .shards
        .iter_mut()
        .find(|s| s.id.as_str() == id)
        .unwrap_or_else(|| panic!("script error: no shard {id} in the current stream"))
}

fn take_failure(st: &mut State, op: Op) -> Option<SourceError> {
    st.failures.get_mut(&op).and_then(VecDeque::pop_front)
}

fn find_shard<'a>(st: &'a State, arn: &str, shard: &ShardId) -> Result<&'a FakeShard, SourceError> {
    st.streams
        .get(arn)
        .and_then(|s| s.shards.iter().find(|f| f.id == *shard && !f.vanished))
        .ok_or_else(|| SourceError::ResourceNotFound(format!("shard {shard} of {arn}")))
}

impl StreamSource for ScriptedSource {
    async fn describe_table(&self, table: &str) -> Result<TableStream, SourceError> {
        self.answer_late().await;
        let mut st = self.lock();
        st.calls.describe_table += 1;
        if let Some(err) = take_failure(&mut st, Op::DescribeTable) {
            return Err(err);
        }
        let _ = table;
        Ok(match &st.table {
            TableState::Enabled(arn) => {
                TableStream::Enabled { arn: arn.clone(), view_type: Some("NEW_AND_OLD_IMAGES".to_string()) }
            }
            TableState::Disabled => TableStream::Disabled,
            TableState::Missing => TableStream::TableMissing,
        })
    }

    async fn describe_stream(
        &self,
        stream_arn: &str,
        exclusive_start: Option<&ShardId>,
    ) -> Result<ShardPage, SourceError> {
        self.answer_late().await;
        let mut st = self.lock();
        st.calls.describe_stream += 1;
        if let Some(err) = take_failure(&mut st, Op::DescribeStream) {
            return Err(err);
        }
        let stream = st.streams.get(stream_arn).ok_or_else(|| SourceError::ResourceNotFound(stream_arn.to_string()))?;
        let listed: Vec<&FakeShard> = stream.shards.iter().filter(|s| !s.vanished).collect();
        let start = match exclusive_start {
            Some(after) => listed.iter().position(|s| s.id == *after).map_or(0, |i| i + 1),
            None => 0,
        };
        let end = (start + st.describe_page_size).min(listed.len());
        let shards: Vec<ShardInfo> = listed[start..end]
            .iter()
            .map(|s| ShardInfo {
                id: s.id.clone(),
                parent: s.parent.clone(),
                starting_sequence_number: Some(s.records.first().map_or("0", |_| s.seq(0)).to_string()),
                ending_sequence_number: s
                    .closed
                    .then(|| s.records.last().map_or("0", |_| s.seq(s.records.len() - 1)).to_string()),
            })
            .collect();
        let last_evaluated_shard_id = (end < listed.len()).then(|| listed[end - 1].id.clone());
        Ok(ShardPage { shards, last_evaluated_shard_id })
    }

    async fn get_shard_iterator(
        &self,
        stream_arn: &str,
        shard: &ShardId,
        position: &Position,
    ) -> Result<ShardIterator, SourceError> {
        self.answer_late().await;
        let mut st = self.lock();
        st.calls.get_shard_iterator.push((shard.clone(), position.clone()));
        if let Some(err) = take_failure(&mut st, Op::GetShardIterator) {
            return Err(err);
        }
        let fake = find_shard(&st, stream_arn, shard)?;
        let seq_index = |seq: &str, inclusive: bool| {
            (0..fake.records.len()).find(|&i| if inclusive { fake.seq(i) >= seq } else { fake.seq(i) > seq })
        };
        let index = match position {
            Position::TrimHorizon => fake.trimmed,
            Position::Latest => fake.records.len(),
            Position::AfterSequenceNumber(seq) => seq_index(seq, false).unwrap_or(fake.records.len()),
            Position::AtSequenceNumber(seq) => seq_index(seq, true).unwrap_or(fake.records.len()),
        };
        if index < fake.trimmed {
            return Err(SourceError::TrimmedDataAccess(format!("{position} on {shard} is before the trim horizon")));
        }
        let state = IteratorState { arn: stream_arn.to_string(), shard: shard.clone(), index, epoch: fake.epoch };
        Ok(issue_iterator(&mut st, state))
    }

    async fn get_records(&self, iterator: &ShardIterator) -> Result<RecordsPage, SourceError> {
        self.answer_late().await;
        let mut st = self.lock();
        let Some(it) = st.iterators.get(&iterator.0).cloned() else {
            return Err(SourceError::Other(format!("unknown iterator {iterator:?}")));
        };
        *st.calls.get_records.entry(it.shard.clone()).or_default() += 1;
        if st.throttled {
            return Err(SourceError::Throttled("LimitExceededException: scripted throttling".to_string()));
        }
        if let Some(err) = take_failure(&mut st, Op::GetRecords) {
            return Err(err);
        }
        let fake = find_shard(&st, &it.arn, &it.shard)?;
        if it.epoch != fake.epoch {
            return Err(SourceError::ExpiredIterator(format!("iterator of {} expired", it.shard)));
        }
        if it.index < fake.trimmed {
            return Err(SourceError::TrimmedDataAccess(format!("records of {} were trimmed", it.shard)));
        }
        let end = (it.index + st.records_page_size).min(fake.records.len());
        let records = fake.records[it.index..end].to_vec();
        let finished = fake.closed && end == fake.records.len();
        let epoch = fake.epoch;
        let next_iterator =
            (!finished).then(|| issue_iterator(&mut st, IteratorState { index: end, epoch, ..it.clone() }));
        Ok(RecordsPage { records, next_iterator })
    }
}

fn issue_iterator(st: &mut State, state: IteratorState) -> ShardIterator {
    st.next_iterator += 1;
    let token = format!("it-{}-{}-{}", state.shard, state.index, st.next_iterator);
    st.iterators.insert(token.clone(), state);
    ShardIterator(token)
}

/// The stream form of a DynamoDB attribute map (only what the model's items hold).
pub fn to_stream_image(item: &HashMap<String, DdbValue>) -> HashMap<String, AttributeValue> {
    item.iter()
        .filter_map(|(k, v)| {
            let v = match v {
                DdbValue::S(s) => AttributeValue::S(s.clone()),
                DdbValue::N(n) => AttributeValue::N(n.clone()),
                DdbValue::Bool(b) => AttributeValue::Bool(*b),
                _ => return None,
            };
            Some((k.clone(), v))
        })
        .collect()
}

/// The attribute map of a model item.
pub fn item_image(item: &Item) -> HashMap<String, AttributeValue> {
    match item {
        Item::Group(g) => to_stream_image(&MessageGroup::to_item(g)),
        Item::Message(m) => to_stream_image(&Message::to_item(m)),
    }
}

fn key_image(key: &ItemKey) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("pk".to_string(), AttributeValue::S(key.pk.to_string())),
        ("sk".to_string(), AttributeValue::S(key.sk.as_str().to_string())),
    ])
}

fn operation(event: StreamEvent) -> OperationType {
    match event {
        StreamEvent::INSERT => OperationType::Insert,
        StreamEvent::MODIFY => OperationType::Modify,
        StreamEvent::REMOVE => OperationType::Remove,
    }
}

/// A NEW_AND_OLD_IMAGES record of an INSERT or MODIFY of `item` (no sequence number yet).
pub fn upsert_record(event: StreamEvent, item: &Item) -> Record {
    let image = item_image(item);
    let sr = StreamRecord::builder()
        .set_keys(Some(key_image(&item.key())))
        .set_new_image(Some(image))
        .stream_view_type(aws_sdk_dynamodbstreams::types::StreamViewType::NewAndOldImages)
        .build();
    Record::builder().event_name(operation(event)).event_source("aws:dynamodb").dynamodb(sr).build()
}

/// A REMOVE record of `key` (no sequence number yet).
pub fn remove_record(key: &ItemKey) -> Record {
    let sr = StreamRecord::builder().set_keys(Some(key_image(key))).build();
    Record::builder().event_name(OperationType::Remove).event_source("aws:dynamodb").dynamodb(sr).build()
}
