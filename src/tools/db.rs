//! `cruddur-syncd db ...`: the app's `users` table, for local development.

use std::io::Write;

use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;

use super::JsonLines;
use crate::config::PostgresConfig;
use crate::error::{Error, Result};
use crate::{demo, pg};

/// The app's schema, made idempotent: the Flask script dropped the table first, which is not
/// something an operator tool should ever do by accident.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS public.users (
  uuid UUID DEFAULT gen_random_uuid() PRIMARY KEY,
  display_name text NOT NULL,
  handle text NOT NULL,
  email text NOT NULL,
  cognito_user_id text,
  created_at TIMESTAMP DEFAULT current_timestamp NOT NULL
);
"#;

/// Connects, creating the database first when the server says it does not exist.
async fn connect_creating(cfg: &PostgresConfig) -> Result<(PgPool, String, bool)> {
    let opts = pg::options(cfg)?;
    let target = pg::describe(&opts);
    match pg::connect_raw(cfg, opts.clone()).await {
        Ok(pool) => Ok((pool, target, false)),
        Err(e) if pg::is_missing_database(&e) => {
            let name = opts.get_database().unwrap_or("postgres").to_string();
            create_database(cfg, opts.clone(), &name, &target).await?;
            let pool = pg::connect_with(cfg, opts).await?;
            Ok((pool, target, true))
        }
        Err(e) => Err(pg::connect_error(&target, &e, cfg)),
    }
}

async fn create_database(cfg: &PostgresConfig, opts: PgConnectOptions, name: &str, target: &str) -> Result<()> {
    let admin = pg::connect_with(cfg, opts.database("postgres")).await?;
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    // The name is a quoted identifier (embedded quotes doubled): safe to splice.
    let res = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&admin).await;
    admin.close().await;
    match res {
        Ok(_) => Ok(()),
        // 42P04: created meanwhile by someone else, which is what we wanted.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(()),
        Err(e) => Err(pg::query_error(target, "creating the database", e)),
    }
}

pub async fn schema_load(cfg: &PostgresConfig, out: &mut JsonLines<impl Write>) -> Result<()> {
    let (pool, target, database_created) = connect_creating(cfg).await?;
    let res = sqlx::raw_sql(SCHEMA).execute(&pool).await;
    pool.close().await;
    res.map_err(|e| pg::query_error(&target, "loading the schema", e))?;
    out.emit(&serde_json::json!({ "database": target, "database_created": database_created, "table": "public.users" }))
}

#[derive(Serialize)]
struct SeedReport {
    inserted: u64,
    present: u64,
}

/// The demo users, with the same fixed uuids the DynamoDB seed uses. `cognito_user_id` is left
/// for reconciliation to fill, as it would be in production.
pub async fn seed(cfg: &PostgresConfig, out: &mut JsonLines<impl Write>) -> Result<()> {
    let opts = pg::options(cfg)?;
    let target = pg::describe(&opts);
    let pool = pg::connect_with(cfg, opts).await?;
    let users = demo::users();
    let res = sqlx::query(
        "INSERT INTO public.users (uuid, display_name, handle, email)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[])
         ON CONFLICT (uuid) DO NOTHING",
    )
    .bind(users.iter().map(|u| u.uuid.0).collect::<Vec<_>>())
    .bind(users.iter().map(|u| u.display_name).collect::<Vec<_>>())
    .bind(users.iter().map(|u| u.handle).collect::<Vec<_>>())
    .bind(users.iter().map(|u| u.email).collect::<Vec<_>>())
    .execute(&pool)
    .await;
    pool.close().await;
    let inserted = res
        .map_err(|e| match e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Error::Failed(format!(
                "table public.users does not exist at {target} (run `cruddur-syncd db schema-load` first)"
            )),
            other => pg::query_error(&target, "seeding users", other),
        })?
        .rows_affected();
    out.emit(&SeedReport { inserted, present: users.len() as u64 - inserted })
}
