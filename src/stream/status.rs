//! What the tailer publishes and how it is told where to start: the types every other module
//! imports (readiness, liveness, the projector's checkpoints), apart from the code that reads.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::source::ShardId;

/// The longest a reader or the coordinator waits between two failing attempts.
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How often the status is republished when nothing else happens, so `last_progress` moves.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);

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

/// What the tailer publishes through [`super::Tailer::status`].
#[derive(Debug, Clone)]
pub struct TailerStatus {
    /// Every open shard of the current stream holds a position.
    pub positioned: bool,
    /// `positioned` was true at least once since start (the readiness check: once ready, a
    /// stream that stalls or repositions is a degraded dependency, not an unready daemon).
    pub positioned_once: bool,
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
    /// outage that a restart cannot cure (and lose the cache it still serves from). `MAX` for a
    /// tailer whose bounds were not given (nothing watches it).
    pub turn_limit: Duration,
    pub last_error: Option<String>,
}

impl TailerStatus {
    pub(crate) fn starting(turn_limit: Duration) -> Self {
        TailerStatus {
            positioned: false,
            positioned_once: false,
            state: TailerState::Starting,
            stream_arn: None,
            view_type: None,
            shards_reading: 0,
            shards_finished: 0,
            last_progress: Instant::now(),
            turn_limit,
            last_error: None,
        }
    }

    /// How long the loops have gone without a turn, when that is more than their own timeouts
    /// allow (`turn_limit`) and more than `floor`: then they are stuck, not merely waiting.
    pub fn stuck_for(&self, floor: Duration) -> Option<Duration> {
        let age = self.last_progress.elapsed();
        (age > self.turn_limit.max(floor)).then_some(age)
    }
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

impl TurnBounds {
    /// `TailerStatus::turn_limit` when readers sleep at most `poll_interval` between calls.
    /// A reader's turn is one sleep (the poll interval or an error backoff), one call and one
    /// delivery. The coordinator republishes the readers' progress after each of its own calls
    /// too, so it adds at most one call's worth on top; plus scheduling slack.
    pub(crate) fn turn_limit(&self, poll_interval: Duration) -> Duration {
        poll_interval.max(BACKOFF_CAP) + self.call * 2 + self.delivery + HEARTBEAT * 5
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(age: Duration, turn_limit: Duration) -> TailerStatus {
        TailerStatus {
            positioned: true,
            state: TailerState::Streaming,
            shards_reading: 1,
            // A machine up for less than `age` cannot have a loop that old.
            last_progress: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            ..TailerStatus::starting(turn_limit)
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
        // An unwatched tailer is never stuck.
        assert_eq!(status(Duration::from_secs(95), Duration::MAX).stuck_for(Duration::ZERO), None);
    }
}
