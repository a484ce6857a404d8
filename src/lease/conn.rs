//! One lease's PostgreSQL session: the advisory lock and the checkpoints written through it.
//!
//! The session takes the lease's session advisory lock: at most one instance of a fleet holds
//! it, and PostgreSQL releases it when that session ends (the process died, the connection
//! broke). Checkpoints are written through the same connection, so an instance that lost its
//! session can no longer write one: a leader that was replaced cannot move a checkpoint under
//! its successor.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use super::Lease;
use crate::error::{Error, Result};
use crate::pg;
use crate::stream::SavedPositions;
use crate::stream::{Progress, ShardId};

/// A lease's own PostgreSQL session, holding its lock.
pub(crate) struct LockConn {
    lease: &'static Lease,
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
pub(crate) async fn try_lock(
    lease: &'static Lease,
    opts: &PgConnectOptions,
    connect_timeout: Duration,
) -> Result<Option<LockConn>> {
    let target = pg::describe(opts);
    let cfg = crate::config::PostgresConfig { connect_timeout, ..Default::default() };
    let mut conn = match tokio::time::timeout(connect_timeout, PgConnection::connect_with(opts)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(pg::connect_error(&target, &e, &cfg)),
        Err(_) => return Err(pg::connect_error(&target, &sqlx::Error::PoolTimedOut, &cfg)),
    };
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(lease.key)
        .fetch_one(&mut conn)
        .await
        .map_err(|e| pg::query_error(&target, &format!("taking the {} lock", lease.what), e))?;
    if !locked {
        let _ = conn.close().await;
        return Ok(None);
    }
    Ok(Some(LockConn { lease, conn, target, current_arn: None }))
}

impl LockConn {
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Creates the checkpoint table if it is missing.
    pub(crate) fn ensure_table(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let ddl = self.lease.ddl();
            sqlx::query(sqlx::AssertSqlSafe(ddl.clone())).execute(&mut self.conn).await.map_err(|e| {
                let base = pg::query_error(&self.target, &format!("creating table {}", self.lease.table), e);
                match base {
                    Error::Failed(m) => {
                        Error::Failed(format!("{m} (a role without CREATE can be given the table: {ddl})"))
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
                "SELECT stream_arn, shard_id, sequence_number, finished FROM {table} \
                 WHERE stream_arn = (SELECT stream_arn FROM {table} ORDER BY updated_at DESC LIMIT 1)",
                table = self.lease.table
            )))
            .fetch_all(&mut self.conn)
            .await
            .map_err(|e| pg::query_error(&self.target, &format!("reading {}", self.lease.table), e))?;
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
                let table = self.lease.table;
                sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE stream_arn <> $1")))
                    .bind(&p.stream_arn)
                    .execute(&mut self.conn)
                    .await
                    .map_err(|e| pg::query_error(&self.target, &format!("dropping old streams from {table}"), e))?;
                self.current_arn = Some(p.stream_arn.clone());
            }
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} AS c (stream_arn, shard_id, sequence_number, finished, updated_at) \
                 VALUES ($1, $2, $3, $4, now()) \
                 ON CONFLICT (stream_arn, shard_id) DO UPDATE SET \
                   sequence_number = COALESCE(EXCLUDED.sequence_number, c.sequence_number), \
                   finished = c.finished OR EXCLUDED.finished, updated_at = now()",
                table = self.lease.table
            )))
            .bind(&p.stream_arn)
            .bind(p.shard_id.as_str())
            .bind(&p.last_sequence_number)
            .bind(p.finished)
            .execute(&mut self.conn)
            .await
            .map_err(|e| pg::query_error(&self.target, &format!("saving a checkpoint in {}", self.lease.table), e))?;
            Ok(())
        })
    }

    /// Whether the session (and with it the lock) is still alive.
    pub(crate) fn ping(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&mut self.conn).await.map(|_| ()).map_err(|e| {
                pg::query_error(&self.target, &format!("checking the {} lock connection", self.lease.what), e)
            })
        })
    }

    /// Gives the lock back and ends the session.
    pub(crate) fn release(mut self) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(self.lease.key).execute(&mut self.conn).await;
            let _ = self.conn.close().await;
        })
    }
}
