//! The four DynamoDB Streams operations the tailer needs, behind a trait.
//!
//! The tailer is generic over [`StreamSource`] so that the same code runs against AWS (or moto)
//! through [`super::aws_source::AwsSource`] and against [`super::scripted::ScriptedSource`],
//! which scripts the faults moto cannot produce (splits, expiry, trimming, throttling).

use std::fmt;
use std::future::Future;

use aws_sdk_dynamodbstreams::types::Record;

/// A shard of a stream, as DynamoDB names it (`shardId-...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub String);

impl ShardId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ShardId {
    fn from(s: &str) -> Self {
        ShardId(s.to_string())
    }
}

/// What the table's description says about its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableStream {
    /// The stream is enabled; `arn` is the table's `LatestStreamArn`.
    Enabled { arn: String, view_type: Option<String> },
    /// The table exists but has no enabled stream.
    Disabled,
    /// The table does not exist (deleted, or never created).
    TableMissing,
}

/// One shard of the tree, as DescribeStream lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: ShardId,
    pub parent: Option<ShardId>,
    pub starting_sequence_number: Option<String>,
    /// Set once the shard is closed: no record will be added to it any more.
    pub ending_sequence_number: Option<String>,
}

impl ShardInfo {
    pub(crate) fn is_open(&self) -> bool {
        self.ending_sequence_number.is_none()
    }
}

/// One page of DescribeStream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardPage {
    pub shards: Vec<ShardInfo>,
    /// Pass as `exclusive_start` to get the next page; `None` on the last page.
    pub last_evaluated_shard_id: Option<ShardId>,
}

/// Where a new shard iterator points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    TrimHorizon,
    Latest,
    AfterSequenceNumber(String),
    AtSequenceNumber(String),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::TrimHorizon => f.write_str("TRIM_HORIZON"),
            Position::Latest => f.write_str("LATEST"),
            Position::AfterSequenceNumber(s) => write!(f, "AFTER_SEQUENCE_NUMBER {s}"),
            Position::AtSequenceNumber(s) => write!(f, "AT_SEQUENCE_NUMBER {s}"),
        }
    }
}

/// An opaque shard iterator.
#[derive(Clone, PartialEq, Eq)]
pub struct ShardIterator(pub String);

impl fmt::Debug for ShardIterator {
    // Real iterators are ~1 KB of base64; a prefix is enough to tell two apart in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self.0.char_indices().nth(24).map_or(self.0.len(), |(i, _)| i);
        write!(f, "ShardIterator({}..)", &self.0[..end])
    }
}

/// One page of GetRecords.
#[derive(Debug, Clone, Default)]
pub struct RecordsPage {
    pub records: Vec<Record>,
    /// `None` when the shard is closed and every record has been returned: the shard is finished.
    pub next_iterator: Option<ShardIterator>,
}

/// How a stream operation failed, sorted by what the tailer must do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The iterator is older than 15 minutes: get a new one after the last applied record.
    #[error("expired iterator: {0}")]
    ExpiredIterator(String),
    /// The position lies before the 24 h retention: records were lost.
    #[error("trimmed data access: {0}")]
    TrimmedDataAccess(String),
    /// The stream, shard or table does not exist (any more).
    #[error("resource not found: {0}")]
    ResourceNotFound(String),
    /// Throttling, a limit, or a server-side failure: retry later with backoff.
    #[error("throttled or server error: {0}")]
    Throttled(String),
    /// Anything else (a dispatch failure, an answer that breaks the API's promises).
    #[error("{0}")]
    Other(String),
}

/// The stream operations the tailer reads through.
///
/// Every future is `Send` so that one reader task per shard can be spawned on the runtime.
pub trait StreamSource: Send + Sync + 'static {
    /// DescribeTable: the table's latest stream, if enabled.
    fn describe_table(&self, table: &str) -> impl Future<Output = Result<TableStream, SourceError>> + Send;

    /// DescribeStream: one page of the shard tree, after `exclusive_start`.
    fn describe_stream(
        &self,
        stream_arn: &str,
        exclusive_start: Option<&ShardId>,
    ) -> impl Future<Output = Result<ShardPage, SourceError>> + Send;

    /// GetShardIterator.
    fn get_shard_iterator(
        &self,
        stream_arn: &str,
        shard: &ShardId,
        position: &Position,
    ) -> impl Future<Output = Result<ShardIterator, SourceError>> + Send;

    /// GetRecords.
    fn get_records(&self, iterator: &ShardIterator) -> impl Future<Output = Result<RecordsPage, SourceError>> + Send;
}
