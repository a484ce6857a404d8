//! The PostgreSQL phase of reconciliation, set-based, against the Flask script's row-by-row way,
//! in one run on the same data. No Cognito: 100,000 (sub, handle) pairs are
//! "already listed".
//!
//! 1. A database of its own on the local server (`BENCH_PG_ADMIN_URL`, default
//!    postgres://postgres@127.0.0.1:5432/postgres), the app's schema (`tools::db::SCHEMA`: no
//!    index on `handle`), `BENCH_USERS` users (default 100,000), `cognito_user_id` empty.
//! 2. Row-by-row on a sample (`BENCH_ROW_SAMPLE`, default 2,000 users spread over the table):
//!    `UPDATE public.users SET cognito_user_id = $1 WHERE handle = $2` and a commit per user,
//!    as the Flask script did. Scaled linearly to all users (each UPDATE scans the whole table,
//!    so its cost does not depend on how many were done before).
//! 3. Reset, `VACUUM FULL ANALYZE`, then the set-based phase ([`reconcile::apply`]: one
//!    transaction, UNNEST into a temporary table, classify, one UPDATE join), which writes every
//!    user; then once more, when every user is unchanged.
//! 4. Drops the database.
//!
//!     scripts/bench-reconcile          (or: cargo bench --bench reconcile)

use std::str::FromStr;
use std::time::{Duration, Instant};

use cruddur_syncd::config::MatchOn;
use cruddur_syncd::reconcile::{self, CognitoUser};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let admin_url = std::env::var("BENCH_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let users = env_usize("BENCH_USERS", 100_000);
    let sample = env_usize("BENCH_ROW_SAMPLE", 2_000).clamp(1, users);

    let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
        eprintln!("bench-reconcile: PostgreSQL does not answer at {admin_url} ({e}); run scripts/ensure-postgres");
        std::process::exit(1);
    });
    let name = format!("syncd_bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
        .execute(&mut admin)
        .await
        .expect("creating the database");
    let opts = PgConnectOptions::from_str(&admin_url).unwrap().database(&name);
    let target = cruddur_syncd::pg::describe(&opts);

    let result = bench(&opts, &target, users, sample).await;

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)))
        .execute(&mut admin)
        .await
        .expect("dropping the database");
    let _ = admin.close().await;
    if let Err(e) = result {
        eprintln!("bench-reconcile: {e}");
        std::process::exit(1);
    }
}

async fn bench(opts: &PgConnectOptions, target: &str, users: usize, sample: usize) -> Result<(), String> {
    let mut conn = PgConnection::connect_with(opts).await.map_err(|e| e.to_string())?;
    let server: String = sqlx::query_scalar("SHOW server_version").fetch_one(&mut conn).await.unwrap();
    println!("reconcile benchmark: PostgreSQL {server} at {target}, {users} users, app schema (no index on handle)");

    sqlx::raw_sql(cruddur_syncd::tools::db::SCHEMA).execute(&mut conn).await.map_err(|e| e.to_string())?;
    sqlx::query(
        "INSERT INTO public.users (display_name, handle, email)
         SELECT 'User ' || i, 'user_' || lpad(i::text, 6, '0'), 'user_' || lpad(i::text, 6, '0') || '@example.com'
         FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(users as i32)
    .execute(&mut conn)
    .await
    .map_err(|e| e.to_string())?;
    sqlx::raw_sql("VACUUM ANALYZE public.users").execute(&mut conn).await.map_err(|e| e.to_string())?;

    // What the Cognito listing would have produced: one (sub, handle) per user.
    let listed: Vec<CognitoUser> = (0..users)
        .map(|i| {
            let handle = format!("user_{i:06}");
            CognitoUser { username: handle.clone(), sub: Some(uuid::Uuid::new_v4().to_string()), value: Some(handle) }
        })
        .collect();

    // Row-by-row, the Flask script's way: one UPDATE and one commit per user.
    let step = users / sample;
    let started = Instant::now();
    for u in listed.iter().step_by(step.max(1)).take(sample) {
        sqlx::query("UPDATE public.users SET cognito_user_id = $1 WHERE handle = $2")
            .bind(u.sub.as_deref())
            .bind(u.value.as_deref())
            .execute(&mut conn) // autocommit: each statement is its own committed transaction
            .await
            .map_err(|e| e.to_string())?;
    }
    let row_by_row = started.elapsed();
    let per_row = row_by_row / sample as u32;
    let scaled = row_by_row.mul_f64(users as f64 / sample as f64);

    // The same starting point for the set-based phase: every id empty, the table compacted.
    for sql in ["UPDATE public.users SET cognito_user_id = NULL", "VACUUM FULL ANALYZE public.users"] {
        sqlx::raw_sql(sql).execute(&mut conn).await.map_err(|e| e.to_string())?;
    }

    let started = Instant::now();
    let (written, _) =
        reconcile::apply(&mut conn, target, &listed, MatchOn::Handle, false, None).await.map_err(|e| e.to_string())?;
    let set_based = started.elapsed();
    if written.updated.count != users {
        return Err(format!("the set-based phase updated {} users, expected {users}", written.updated.count));
    }
    let started = Instant::now();
    let (again, _) =
        reconcile::apply(&mut conn, target, &listed, MatchOn::Handle, false, None).await.map_err(|e| e.to_string())?;
    let set_based_unchanged = started.elapsed();
    if again.unchanged.count != users {
        return Err(format!("the second set-based run found {} unchanged, expected {users}", again.unchanged.count));
    }
    let _ = conn.close().await;

    println!();
    println!("set-based PostgreSQL phase, {users} users all updated:    {}", secs(set_based));
    println!("set-based PostgreSQL phase, {users} users all unchanged:  {}", secs(set_based_unchanged));
    println!(
        "row-by-row (UPDATE + commit per user), {sample} users measured: {} ({:.2} ms a user)",
        secs(row_by_row),
        per_row.as_secs_f64() * 1000.0
    );
    println!(
        "row-by-row scaled linearly to {users} users:                {} (~{:.1} min)",
        secs(scaled),
        scaled.as_secs_f64() / 60.0
    );
    println!(
        "ratio: set-based is {:.0}x faster than row-by-row (target: under 2 s and at least 500x)",
        scaled.as_secs_f64() / set_based.as_secs_f64()
    );
    Ok(())
}
