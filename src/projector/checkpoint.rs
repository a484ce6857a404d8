//! The projector's lock and checkpoints in PostgreSQL.
//!
//! One connection of the projector's own takes the session advisory lock [`LOCK_KEY`]: at most
//! one instance of a fleet holds it, and PostgreSQL releases it when that session ends (the
//! process died, the connection broke). Checkpoints are written through the same connection,
//! so an instance that lost its session can no longer write one: a leader that was replaced
//! cannot move a checkpoint under its successor.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use crate::error::{Error, Result};
use crate::pg;
use crate::stream::SavedPositions;
use crate::stream::{Progress, ShardId};

/// The advisory lock key of the projector ("cruddurP"); reconciliation uses "cruddurR".
pub(crate) const LOCK_KEY: i64 = 0x6372_7564_6475_7250;

/// Where checkpoints live (created when missing, by the instance that holds the lock).
pub(crate) const TABLE: &str = "cruddur_syncd_projector_checkpoint";
// The queries below splice only TABLE into their text (sqlx 0.9 asks for AssertSqlSafe there).

/// The table, for operators who create it by hand (a role without CREATE on the schema).
pub(crate) const DDL: &str = "CREATE TABLE IF NOT EXISTS cruddur_syncd_projector_checkpoint (
    stream_arn text NOT NULL,
    shard_id text NOT NULL,
    sequence_number text,
    finished boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_arn, shard_id)
)";

/// The projector's own PostgreSQL session, holding the lock.
pub(crate) struct LockConn {
    conn: PgConnection,
    target: String,
    /// The stream whose checkpoints were last written: rows of older streams are dropped when
    /// a new one is first saved (they can never be resumed from).
    current_arn: Option<String>,
}

/// Connects and tries the lock: `None` when another session holds it.
///
/// Every future here is boxed: it proves `Send` where the lifetimes are concrete, which sqlx's
/// `Executor` impls need when the caller is generic (the projector is, over its stream source).
pub(crate) async fn try_lock(opts: &PgConnectOptions, connect_timeout: Duration) -> Result<Option<LockConn>> {
    let target = pg::describe(opts);
    let cfg = crate::config::PostgresConfig { connect_timeout, ..Default::default() };
    let mut conn = match tokio::time::timeout(connect_timeout, PgConnection::connect_with(opts)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(pg::connect_error(&target, &e, &cfg)),
        Err(_) => return Err(pg::connect_error(&target, &sqlx::Error::PoolTimedOut, &cfg)),
    };
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut conn)
        .await
        .map_err(|e| pg::query_error(&target, "taking the projector lock", e))?;
    if !locked {
        let _ = conn.close().await;
        return Ok(None);
    }
    Ok(Some(LockConn { conn, target, current_arn: None }))
}

impl LockConn {
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Creates the checkpoint table if it is missing.
    pub(crate) fn ensure_table(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            sqlx::query(DDL).execute(&mut self.conn).await.map_err(|e| {
                let base = pg::query_error(&self.target, &format!("creating table {TABLE}"), e);
                match base {
                    Error::Failed(m) => {
                        Error::Failed(format!("{m} (a role without CREATE can be given the table: {DDL})"))
                    }
                    other => other,
                }
            })?;
            Ok(())
        })
    }

    /// The saved positions of the stream checkpointed last, if any.
    pub fn load(&mut self) -> BoxFuture<'_, Result<Option<SavedPositions>>> {
        Box::pin(async move {
            let rows: Vec<(String, String, Option<String>, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT stream_arn, shard_id, sequence_number, finished FROM {TABLE} \
                 WHERE stream_arn = (SELECT stream_arn FROM {TABLE} ORDER BY updated_at DESC LIMIT 1)"
            )))
            .fetch_all(&mut self.conn)
            .await
            .map_err(|e| pg::query_error(&self.target, &format!("reading {TABLE}"), e))?;
            let Some(arn) = rows.first().map(|r| r.0.clone()) else { return Ok(None) };
            let mut after = HashMap::new();
            let mut finished = HashSet::new();
            for (_, shard, seq, done) in rows {
                if done {
                    finished.insert(ShardId(shard));
                } else if let Some(seq) = seq {
                    after.insert(ShardId(shard), seq);
                }
            }
            self.current_arn = Some(arn.clone());
            Ok(Some(SavedPositions { stream_arn: arn, after, finished }))
        })
    }

    /// Saves how far a shard was applied.
    pub(crate) fn save<'a>(&'a mut self, p: &'a Progress) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.current_arn.as_deref() != Some(p.stream_arn.as_str()) {
                sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {TABLE} WHERE stream_arn <> $1")))
                    .bind(&p.stream_arn)
                    .execute(&mut self.conn)
                    .await
                    .map_err(|e| pg::query_error(&self.target, &format!("dropping old streams from {TABLE}"), e))?;
                self.current_arn = Some(p.stream_arn.clone());
            }
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {TABLE} AS c (stream_arn, shard_id, sequence_number, finished, updated_at) \
                 VALUES ($1, $2, $3, $4, now()) \
                 ON CONFLICT (stream_arn, shard_id) DO UPDATE SET \
                   sequence_number = COALESCE(EXCLUDED.sequence_number, c.sequence_number), \
                   finished = c.finished OR EXCLUDED.finished, updated_at = now()"
            )))
            .bind(&p.stream_arn)
            .bind(p.shard_id.as_str())
            .bind(&p.last_sequence_number)
            .bind(p.finished)
            .execute(&mut self.conn)
            .await
            .map_err(|e| pg::query_error(&self.target, &format!("saving a checkpoint in {TABLE}"), e))?;
            Ok(())
        })
    }

    /// Whether the session (and with it the lock) is still alive.
    pub(crate) fn ping(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&mut self.conn)
                .await
                .map(|_| ())
                .map_err(|e| pg::query_error(&self.target, "checking the projector lock connection", e))
        })
    }

    /// Gives the lock back and ends the session.
    pub(crate) fn release(mut self) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(LOCK_KEY).execute(&mut self.conn).await;
            let _ = self.conn.close().await;
        })
    }
}
