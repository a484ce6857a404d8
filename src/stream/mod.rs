//! The DynamoDB Streams tailer: follows every shard of the table's stream and hands decoded
//! changes, in order per shard, to a [`ChangeSink`] (the cache).
//!
//! This file holds the interface between the tailer and its consumer. Beside it: what the
//! tailer publishes ([`status`]), how it is built ([`tailer`]), the shard tree ([`coordinator`])
//! and one shard's reader ([`reader`]), the source trait it reads through ([`source`]) with its
//! AWS implementation ([`aws_source`]), and the record decoding ([`decode`]).

use std::future::Future;

pub(crate) mod aws_source;
mod coordinator;
pub mod decode;
mod reader;
#[cfg(any(test, feature = "test-support"))]
pub mod scripted;
pub mod source;
pub(crate) mod status;
pub(crate) mod tailer;

pub use aws_source::AwsSource;
pub use source::{ShardId, StreamSource};
pub use status::{FreshStart, SavedPositions, StartPlan, TailerState, TailerStatus, TurnBounds};
pub use tailer::Tailer;

use chrono::{DateTime, Utc};

use crate::metrics::StreamEvent;
use crate::model::{Item, ItemKey};

/// What happened to one item, decoded into the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// INSERT or MODIFY with a new image: the item now has this content.
    Upsert(Item),
    /// REMOVE: the item is gone.
    Remove(ItemKey),
    /// INSERT or MODIFY on a KEYS_ONLY stream: the item changed, its content is unknown, so
    /// whatever is cached for its partition must be reloaded.
    Invalidate(ItemKey),
}

/// One stream record, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    pub shard_id: String,
    pub sequence_number: String,
    pub event: StreamEvent,
    pub approximate_creation: Option<DateTime<Utc>>,
    pub change: Change,
}

/// The consumer of the tailer's output. Implemented by the cache; tests record.
pub trait ChangeSink: Send + Sync + 'static {
    /// Applies one record. The tailer hands a shard's records over one at a time, in stream
    /// order, and does not read that shard further until the page's last has returned. Each
    /// return counts as the reader's progress (`TailerStatus::last_progress`): a sink whose
    /// tailer's status is watched (the cache's, by `/livez` and the watchdog) must return within
    /// [`TurnBounds::delivery`]. The projector's retries take longer; nothing watches its
    /// tailer.
    fn apply(&self, record: ChangeRecord) -> impl Future<Output = ()> + Send;

    /// Records may have been lost (trimmed data, a shard gone before it was finished, a new
    /// stream): everything derived from the stream must be dropped.
    fn gap(&self, reason: GapReason) -> impl Future<Output = ()> + Send;

    /// The tailer now holds a position on every open shard of a stream it started reading at
    /// LATEST with no gap to report (a fresh start; a stream that appears or changes later is a
    /// gap instead): every write from now on reaches [`ChangeSink::apply`], while a write made
    /// before may not. Whatever was read from the table before this moment may predate such a
    /// write and stay stale, so the cache drops it. Not a gap: nothing the stream carried was
    /// lost, so it is not counted as a resync.
    fn positioned(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// A shard's reader got this far: every record up to `last_sequence_number` was handed to
    /// [`ChangeSink::apply`] and it returned (records that did not decode included). Called
    /// after each non-empty page and when the shard was read to its end. A sink that saves
    /// positions (the projector) saves them here; the cache needs none.
    fn progress(&self, progress: Progress) -> impl Future<Output = ()> + Send {
        let _ = progress;
        std::future::ready(())
    }
}

/// How far a shard's reader got; see [`ChangeSink::progress`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub stream_arn: String,
    pub shard_id: ShardId,
    /// The last record read from the shard, if any was.
    pub last_sequence_number: Option<String>,
    /// The shard is closed and was read to its end.
    pub finished: bool,
}

/// Why the tailer reported a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapReason {
    TrimmedData {
        shard_id: String,
    },
    ShardVanished {
        shard_id: String,
    },
    NewStream {
        old_arn: Option<String>,
        new_arn: String,
    },
    StreamDisabled,
    /// A shard opened at LATEST lost its iterator before any record was read from it, so the
    /// new LATEST may be past records written meanwhile.
    IteratorExpired {
        shard_id: String,
    },
    /// With fan-out on: the relay published a gap, or the follower may have missed messages.
    Fanout(String),
}

impl std::fmt::Display for GapReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GapReason::TrimmedData { shard_id } => {
                write!(f, "records of shard {shard_id} were trimmed before being read")
            }
            GapReason::ShardVanished { shard_id } => {
                write!(f, "shard {shard_id} vanished before it was read to its end")
            }
            GapReason::NewStream { old_arn, new_arn } => match old_arn {
                Some(old) => write!(f, "the table's stream changed from {old} to {new_arn}"),
                None => write!(f, "the table has a new stream {new_arn}"),
            },
            GapReason::StreamDisabled => write!(f, "the table's stream is disabled or the table is gone"),
            GapReason::IteratorExpired { shard_id } => {
                write!(f, "the iterator of shard {shard_id} expired before any record was read from it")
            }
            GapReason::Fanout(why) => write!(f, "fan-out: {why}"),
        }
    }
}
