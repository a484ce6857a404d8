//! Leases: one instance of a fleet does a job (the projector, the fan-out relay) while it holds
//! a PostgreSQL session advisory lock, and writes its stream checkpoints through that session.
//!
//! [`compete`] is the standby loop (try the lock every interval, lead while it holds, try again
//! after losing it); [`keep`] is the leader's side (ping the lock connection every interval; a
//! failed ping ends the lead). Each job is a [`Lease`]: its lock key, its checkpoint table.

mod conn;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

pub(crate) use conn::LockConn;

use crate::error::{Error, Result};

/// One job that a single instance of a fleet does at a time.
#[derive(Debug)]
pub(crate) struct Lease {
    /// The session advisory lock's key.
    pub key: i64,
    /// Where this job's stream checkpoints live (created when missing by the holder).
    pub table: &'static str,
    /// For messages: "projector", "fan-out relay".
    pub what: &'static str,
}

/// The group projector ("cruddurP"); reconciliation's lock is "cruddurR".
pub(crate) static PROJECTOR: Lease =
    Lease { key: 0x6372_7564_6475_7250, table: "cruddur_syncd_projector_checkpoint", what: "projector" };

/// The fan-out relay ("cruddurF"): the one reader of the stream for a fleet.
pub(crate) static RELAY: Lease =
    Lease { key: 0x6372_7564_6475_7246, table: "cruddur_syncd_relay_checkpoint", what: "fan-out relay" };

impl Lease {
    /// The checkpoint table, for the holder to create and for operators who create it by hand
    /// (a role without CREATE on the schema).
    pub(crate) fn ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
    stream_arn text NOT NULL,
    shard_id text NOT NULL,
    sequence_number text,
    finished boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_arn, shard_id)
)",
            self.table
        )
    }
}

/// Where and how often to compete for a lease.
#[derive(Clone)]
pub(crate) struct Contest {
    pub pg: PgConnectOptions,
    pub connect_timeout: Duration,
    /// How often a standby tries the lock, and the leader pings its connection.
    pub interval: Duration,
}

/// Tries `lease` every `contest.interval`, runs `lead` with the lock whenever it is taken, and
/// returns when `stop` is cancelled. `lead` returns when it stops leading (an error says why).
pub(crate) async fn compete<F, Fut>(lease: &'static Lease, contest: Contest, stop: CancellationToken, mut lead: F)
where
    F: FnMut(LockConn) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let target = crate::pg::describe(&contest.pg);
    tracing::info!(postgres = %target, "{} enabled; waiting for its lock", lease.what);
    let mut last_error: Option<String> = None;
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = conn::try_lock(lease, &contest.pg, contest.connect_timeout) => r,
        };
        let failed = match attempt {
            Ok(Some(lock)) => lead(lock).await.err().map(|e| format!("the {} stopped leading: {e}", lease.what)),
            Ok(None) => {
                tracing::debug!(postgres = %target, "another instance holds the {} lock", lease.what);
                None
            }
            Err(e) => Some(format!("cannot try the {} lock: {e}", lease.what)),
        };
        // One line per change of error, not one per retry.
        if failed.is_some() && failed != last_error {
            tracing::warn!("{}; retrying every {:?}", failed.as_deref().unwrap_or_default(), contest.interval);
        }
        last_error = failed;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(contest.interval) => {}
        }
    }
}

/// The leader's watch over its lock: pings the lock connection every `contest.interval` until
/// `lost` is cancelled (by the job, or here when a ping fails: the error is returned).
pub(crate) async fn keep(
    lease: &'static Lease,
    lock: &Arc<Mutex<LockConn>>,
    contest: &Contest,
    lost: &CancellationToken,
) -> Result<()> {
    loop {
        tokio::select! {
            _ = lost.cancelled() => return Ok(()),
            _ = tokio::time::sleep(contest.interval) => {}
        }
        let ping = tokio::time::timeout(contest.connect_timeout, async { lock.lock().await.ping().await }).await;
        let failed = match ping {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => Error::Unavailable(format!(
                "the {} lock connection did not answer within {:?}",
                lease.what, contest.connect_timeout
            )),
        };
        lost.cancel();
        return Err(failed);
    }
}

/// Gives the lock back once nothing else holds its connection (the job has stopped); bounded,
/// since a hung PostgreSQL must not hold up a stop (dropping the connection ends the session,
/// and the lock, anyway).
pub(crate) async fn release(lock: Arc<Mutex<LockConn>>, connect_timeout: Duration) {
    if let Ok(lock) = Arc::try_unwrap(lock) {
        let _ = tokio::time::timeout(connect_timeout, lock.into_inner().release()).await;
    }
}
