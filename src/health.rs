//! Health as probes and supervisors see it, in one place for the admin listener and systemd:
//! liveness (the daemon's loops make progress, [`Probes`]) and the PostgreSQL pinger that keeps
//! its [`crate::dependency`] status current ([`ping_postgres`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::dependency::Dependencies;
use crate::heartbeat::Heartbeat;
use crate::stream::TailerStatus;

/// The accept loop beats every second; this much silence means it (or the runtime) is stuck.
pub const HTTP_STALL_LIMIT: Duration = Duration::from_secs(10);
/// How often PostgreSQL is pinged.
pub const PG_PING_INTERVAL: Duration = Duration::from_secs(10);
/// A ping that takes longer counts as failed.
const PG_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What the daemon's loops look like from outside.
#[derive(Clone)]
pub struct Probes {
    pub stream: watch::Receiver<TailerStatus>,
    pub api: Arc<Heartbeat>,
    pub cache: Arc<Cache>,
}

impl Probes {
    /// "serving; 3 shards; 12,345 cached groups"
    pub fn status_line(&self) -> String {
        let shards = self.stream.borrow().shards_reading;
        let groups = self.cache.cached_groups();
        format!(
            "serving; {} shard{}; {} cached group{}",
            shards,
            if shards == 1 { "" } else { "s" },
            thousands(groups),
            if groups == 1 { "" } else { "s" }
        )
    }

    /// Why the daemon is not healthy, or None when both loops made progress recently.
    ///
    /// The stream loop is stuck only when it overran what its own timeouts allow
    /// (`TailerStatus::turn_limit`): an AWS endpoint that does not answer makes every turn as
    /// long as its calls' timeouts, and restarting the daemon would not bring the endpoint back
    /// but would lose the cache that keeps serving meanwhile.
    pub fn stuck(&self, watchdog: Duration) -> Option<String> {
        if let Some(age) = self.stream.borrow().stuck_for(watchdog) {
            return Some(format!("the stream loop made no progress for {}s", age.as_secs()));
        }
        let api_age = self.api.age();
        if api_age > HTTP_STALL_LIMIT.max(watchdog) {
            return Some(format!("the HTTP accept loop made no progress for {}s", api_age.as_secs()));
        }
        None
    }
}

/// Pings PostgreSQL every [`PG_PING_INTERVAL`] until `stop`, reporting each outcome to
/// `health.postgres`. Lookups report too; the ping keeps the status current when no request
/// needs PostgreSQL (every user cached).
pub async fn ping_postgres(pool: sqlx::PgPool, target: String, health: Arc<Dependencies>, stop: CancellationToken) {
    let mut was_ok = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PG_PING_INTERVAL) => {}
        }
        let ping = tokio::time::timeout(PG_PING_TIMEOUT, sqlx::query("SELECT 1").execute(&pool)).await;
        let ok = match ping {
            Ok(Ok(_)) => {
                health.postgres.ok();
                true
            }
            Ok(Err(e)) => {
                health.postgres.failed(format!("PostgreSQL at {target} did not answer: {e}"));
                false
            }
            Err(_) => {
                health.postgres.failed(format!("PostgreSQL at {target} did not answer within {PG_PING_TIMEOUT:?}"));
                false
            }
        };
        // One line per change of state, not one per ping.
        if ok != was_ok {
            if ok {
                tracing::info!(postgres = %target, "PostgreSQL answers again");
            } else {
                tracing::warn!(postgres = %target, "PostgreSQL does not answer");
            }
            was_ok = ok;
        }
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(12_345), "12,345");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
