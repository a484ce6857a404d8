//! PostgreSQL connections, bounded in time so that a wrong URL fails fast with a sentence that
//! names the server, instead of the 30 s pool timeout the Flask scripts hit; and the one query
//! the daemon's request path makes ([`PgUsers`]).

use std::str::FromStr;
use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use futures::future::BoxFuture;

use crate::cache::{CacheError, UserDirectory};
use crate::config::PostgresConfig;
use crate::dependency::Dependencies;
use crate::error::{Error, Result};
use crate::model::{CognitoSub, UserUuid};

/// `host:port/database`, for messages; never the password.
pub fn describe(opts: &PgConnectOptions) -> String {
    format!("{}:{}/{}", opts.get_host(), opts.get_port(), opts.get_database().unwrap_or("postgres"))
}

pub(crate) fn options(cfg: &PostgresConfig) -> Result<PgConnectOptions> {
    PgConnectOptions::from_str(cfg.connection_url())
        .map_err(|e| Error::Failed(format!("postgres.url is not a usable connection URL: {e}")))
}

pub async fn connect(cfg: &PostgresConfig) -> Result<PgPool> {
    connect_with(cfg, options(cfg)?).await
}

pub(crate) async fn connect_with(cfg: &PostgresConfig, opts: PgConnectOptions) -> Result<PgPool> {
    let target = describe(&opts);
    connect_raw(cfg, opts).await.map_err(|e| connect_error(&target, &e, cfg))
}

/// Like `connect_with`, but keeps sqlx's error so a caller can react to a SQLSTATE.
pub(crate) async fn connect_raw(
    cfg: &PostgresConfig,
    opts: PgConnectOptions,
) -> std::result::Result<PgPool, sqlx::Error> {
    // One plain connection first: the pool retries refused connections until its timeout,
    // which would turn "connection refused" into a 5 s wait and a vaguer message.
    let probe = tokio::time::timeout(cfg.connect_timeout, PgConnection::connect_with(&opts)).await;
    match probe {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(sqlx::Error::PoolTimedOut),
    }
    let pool = PgPoolOptions::new().max_connections(cfg.max_connections).acquire_timeout(cfg.connect_timeout);
    match tokio::time::timeout(cfg.connect_timeout, pool.connect_with(opts)).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

/// A connection error is "unavailable", except that a server which answers (no such database,
/// authentication failed) is reachable and the config is what is wrong.
pub(crate) fn connect_error(target: &str, e: &sqlx::Error, cfg: &PostgresConfig) -> Error {
    match e {
        sqlx::Error::Database(db) => {
            Error::Failed(format!("PostgreSQL at {target} refused the connection: {}", db.message()))
        }
        sqlx::Error::PoolTimedOut => Error::Unavailable(format!(
            "cannot connect to PostgreSQL at {target}: no answer within {}",
            humantime::format_duration(cfg.connect_timeout)
        )),
        other => Error::Unavailable(format!("cannot connect to PostgreSQL at {target}: {other}")),
    }
}

/// SQLSTATE 3D000: the server is there, the database is not.
pub(crate) fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

/// A query error as a sentence naming the server.
pub(crate) fn query_error(target: &str, what: &str, e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            Error::Unavailable(format!("PostgreSQL at {target} stopped answering while {what}: {e}"))
        }
        // Class 57 (operator intervention: shutdown, crash, not accepting connections) and
        // class 08 (connection exception): the server is going away, not refusing the query.
        sqlx::Error::Database(ref db) if db.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")) => {
            Error::Unavailable(format!("PostgreSQL at {target} went away while {what}: {}", db.message()))
        }
        other => Error::Failed(format!("PostgreSQL at {target} failed while {what}: {other}")),
    }
}

/// `sub -> users.uuid` for the cache, through the daemon's pool.
#[derive(Clone, Debug)]
pub struct PgUsers {
    pub pool: PgPool,
    /// `host:port/db`, for messages.
    pub target: String,
    /// Where each lookup's outcome is reported (`postgres`), beside the pinger's.
    pub health: Option<Arc<Dependencies>>,
}

impl PgUsers {
    async fn find(&self, sub: &CognitoSub) -> std::result::Result<Option<UserUuid>, CacheError> {
        let rows: Vec<(uuid::Uuid,)> =
            sqlx::query_as("SELECT uuid FROM public.users WHERE cognito_user_id = $1 LIMIT 2")
                .bind(&sub.0)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| CacheError::Unavailable(format!("PostgreSQL at {} did not answer: {e}", self.target)))?;
        match rows.as_slice() {
            [(uuid,)] => Ok(Some(UserUuid(*uuid))),
            [] => Ok(None),
            _ => {
                // Serving either row could show one person another's messages.
                tracing::warn!(%sub, "several users rows carry this cognito_user_id; treating it as not provisioned");
                Ok(None)
            }
        }
    }
}

impl UserDirectory for PgUsers {
    fn lookup<'a>(&'a self, sub: &'a CognitoSub) -> BoxFuture<'a, std::result::Result<Option<UserUuid>, CacheError>> {
        Box::pin(async move {
            let found = self.find(sub).await;
            if let Some(h) = &self.health {
                match &found {
                    Ok(_) => h.postgres.ok(),
                    Err(e) => h.postgres.failed(e),
                }
            }
            found
        })
    }

    fn describe(&self) -> &str {
        &self.target
    }
}
