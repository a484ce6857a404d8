//! Reconciliation (SPEC section 7) against a real moto Cognito and a real PostgreSQL: every test
//! has its own user pool and its own database (or its own throwaway cluster).

use std::collections::HashMap;
use std::process::Output;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_cognitoidentityprovider::Client;
use cruddur_syncd::config::{MatchOn, ReconcileConfig};
use cruddur_syncd::error::Error;
use cruddur_syncd::model::CognitoSub;
use cruddur_syncd::reconcile::{Hook, Phase, Reconciler, Report, Status, LOCK_KEY};
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};
use tokio::sync::Notify;

use crate::support;
use crate::support::app::{App, Setup};
use crate::support::pgcluster::PgCluster;
use crate::support::TestDb;

const DEADLINE: Duration = Duration::from_secs(15);

async fn cognito() -> (String, Client) {
    let moto = support::moto_url();
    let client = support::cognito_client(&support::sdk_config(&moto).await);
    (moto, client)
}

async fn new_pool(client: &Client) -> String {
    client.create_user_pool().pool_name(support::unique("rec-")).send().await.unwrap().user_pool.unwrap().id.unwrap()
}

async fn schema(pg: &PgPool) {
    sqlx::raw_sql(cruddur_syncd::tools::db::SCHEMA).execute(pg).await.unwrap();
}

/// `users` rows: (handle, email, cognito_user_id).
async fn insert_rows(pg: &PgPool, rows: &[(&str, &str, Option<&str>)]) {
    let handles: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let emails: Vec<&str> = rows.iter().map(|r| r.1).collect();
    let subs: Vec<Option<&str>> = rows.iter().map(|r| r.2).collect();
    sqlx::query(
        "INSERT INTO public.users (display_name, handle, email, cognito_user_id)
         SELECT h, h, e, s FROM UNNEST($1::text[], $2::text[], $3::text[]) AS t(h, e, s)",
    )
    .bind(&handles)
    .bind(&emails)
    .bind(&subs)
    .execute(pg)
    .await
    .unwrap();
}

/// handle -> every cognito_user_id of the rows with that handle.
async fn mapping(pg: &PgPool) -> HashMap<String, Vec<Option<String>>> {
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT handle, cognito_user_id FROM public.users ORDER BY handle, cognito_user_id")
            .fetch_all(pg)
            .await
            .unwrap();
    let mut out: HashMap<String, Vec<Option<String>>> = HashMap::new();
    for (h, s) in rows {
        out.entry(h).or_default().push(s);
    }
    out
}

fn reconciler(client: &Client, moto: &str, pool_id: &str, pg_url: &str) -> Reconciler {
    Reconciler::new(
        client.clone(),
        moto,
        pool_id,
        PgConnectOptions::from_str(pg_url).unwrap(),
        Duration::from_secs(5),
        None,
    )
}

fn settings(match_on: MatchOn, rps: u32) -> ReconcileConfig {
    ReconcileConfig { match_on, cognito_max_rps: rps, ..Default::default() }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn counts(r: &Report) -> [usize; 5] {
    let o = &r.outcomes;
    [o.updated.count, o.unchanged.count, o.unmatched.count, o.skipped.count, o.conflict.count]
}

#[tokio::test]
async fn five_hundred_users_over_many_pages_are_mapped_then_unchanged() {
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    let handles: Vec<String> = (0..500).map(|i| format!("user-{i:03}")).collect();
    let subs: HashMap<String, String> = futures::stream::iter(handles.clone())
        .map(|h| {
            let (client, pool_id) = (client.clone(), pool_id.clone());
            async move {
                let sub = support::create_user(&client, &pool_id, &h, &[("preferred_username", &h)]).await;
                (h, sub)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    let emails: Vec<String> = handles.iter().map(|h| format!("{h}@example.com")).collect();
    let rows: Vec<(&str, &str, Option<&str>)> =
        handles.iter().zip(&emails).map(|(h, e)| (h.as_str(), e.as_str(), None)).collect();
    insert_rows(&pg, &rows).await;

    let r = reconciler(&client, &moto, &pool_id, &db.url);
    // 500 users at 60 a page: at least 9 ListUsers calls, 100 ms apart at 10 calls a second.
    let first = r.run(&settings(MatchOn::Handle, 10), false).await.unwrap();
    assert_eq!(first.status, Status::Completed);
    assert_eq!(first.cognito_users, 500);
    assert_eq!(counts(&first), [500, 0, 0, 0, 0]);
    assert_eq!(first.outcomes.updated.first, names(&["user-000", "user-001", "user-002", "user-003", "user-004"]));
    assert!(first.cognito_seconds >= 0.8, "9 pages at 10 calls/s cannot take {}s", first.cognito_seconds);
    assert_eq!(first.changed_subs.len(), 500);
    let m = mapping(&pg).await;
    for (h, sub) in &subs {
        assert_eq!(m[h], vec![Some(sub.clone())], "row {h}");
    }

    let second = r.run(&settings(MatchOn::Handle, 50), false).await.unwrap();
    assert_eq!(counts(&second), [0, 500, 0, 0, 0]);
    assert!(second.changed_subs.is_empty());
    assert_eq!(mapping(&pg).await, m);
    pg.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn every_outcome_is_counted_named_and_conflicts_are_not_written() {
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    let pu = |h: &'static str| [("preferred_username", h)];
    let alice = support::create_user(&client, &pool_id, "alice", &pu("alice")).await;
    let bob = support::create_user(&client, &pool_id, "bob", &pu("bob")).await;
    support::create_user(&client, &pool_id, "carol", &pu("carol")).await;
    support::create_user(&client, &pool_id, "dave", &[("email", "dave@example.com")]).await;
    support::create_user(&client, &pool_id, "erin1", &pu("erin")).await;
    support::create_user(&client, &pool_id, "erin2", &pu("erin")).await;
    support::create_user(&client, &pool_id, "frank", &pu("frank")).await;
    let gina = support::create_user(&client, &pool_id, "gina", &pu("gina")).await;

    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    insert_rows(
        &pg,
        &[
            ("alice", "a@x", None),
            ("bob", "b@x", Some(&bob)),
            ("erin", "e@x", None),
            ("frank", "f1@x", None),
            ("frank", "f2@x", None),
            ("gina", "g@x", Some("stale-sub")),
            ("henry", "h@x", None),
        ],
    )
    .await;

    let r = reconciler(&client, &moto, &pool_id, &db.url);
    let report = r.run(&settings(MatchOn::Handle, 50), false).await.unwrap();
    assert_eq!(report.cognito_users, 8);
    let o = &report.outcomes;
    assert_eq!((o.updated.count, o.updated.first.clone()), (2, names(&["alice", "gina"])));
    assert_eq!((o.unchanged.count, o.unchanged.first.clone()), (1, names(&["bob"])));
    assert_eq!((o.unmatched.count, o.unmatched.first.clone()), (1, names(&["carol"])));
    assert_eq!((o.skipped.count, o.skipped.first.clone()), (1, names(&["dave"])));
    assert_eq!((o.conflict.count, o.conflict.first.clone()), (3, names(&["erin", "frank"])));
    let changed: Vec<&str> = report.changed_subs.iter().map(|s| s.as_str()).collect();
    for sub in [alice.as_str(), gina.as_str(), "stale-sub"] {
        assert!(changed.contains(&sub), "{sub} missing from the changed subs {changed:?}");
    }

    let m = mapping(&pg).await;
    assert_eq!(m["alice"], vec![Some(alice)]);
    assert_eq!(m["bob"], vec![Some(bob)]);
    assert_eq!(m["gina"], vec![Some(gina)]);
    assert_eq!(m["erin"], vec![None], "two Cognito users claim erin: neither is written");
    assert_eq!(m["frank"], vec![None, None], "frank is in two rows: neither is written");
    assert_eq!(m["henry"], vec![None]);

    let mut text = Vec::new();
    report.write_text(&mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    for needle in ["reconcile completed", "alice, gina", "erin, frank", "carol", "dave", "listed in", "postgres phase"]
    {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }
    pg.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn dry_run_writes_nothing_but_reports_what_it_would_write() {
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    let alice = support::create_user(&client, &pool_id, "alice", &[("preferred_username", "alice")]).await;
    let gina = support::create_user(&client, &pool_id, "gina", &[("preferred_username", "gina")]).await;
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    insert_rows(&pg, &[("alice", "a@x", None), ("gina", "g@x", Some("stale-sub"))]).await;
    let before = mapping(&pg).await;

    let r = reconciler(&client, &moto, &pool_id, &db.url);
    let dry = r.run(&settings(MatchOn::Handle, 50), true).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(counts(&dry), [2, 0, 0, 0, 0]);
    assert_eq!(dry.outcomes.updated.first, names(&["alice", "gina"]));
    assert!(dry.changed_subs.is_empty());
    assert_eq!(mapping(&pg).await, before, "a dry run wrote to PostgreSQL");
    let mut text = Vec::new();
    dry.write_text(&mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("dry run: nothing written") && text.contains("would update"), "{text}");

    let real = r.run(&settings(MatchOn::Handle, 50), false).await.unwrap();
    assert_eq!(counts(&real), counts(&dry));
    let m = mapping(&pg).await;
    assert_eq!((m["alice"].clone(), m["gina"].clone()), (vec![Some(alice)], vec![Some(gina)]));
    pg.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn concurrent_runs_one_is_skipped_and_the_result_is_correct() {
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    let mut subs = HashMap::new();
    for h in ["ann", "ben", "cat"] {
        subs.insert(h.to_string(), support::create_user(&client, &pool_id, h, &[("preferred_username", h)]).await);
    }
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    insert_rows(&pg, &[("ann", "a@x", None), ("ben", "b@x", None), ("cat", "c@x", None)]).await;

    // Run A holds the lock until run B has finished.
    let (locked, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let hook: Hook = {
        let (locked, release) = (locked.clone(), release.clone());
        Arc::new(move |phase| {
            let (locked, release) = (locked.clone(), release.clone());
            async move {
                if phase == Phase::Locked {
                    locked.notify_one();
                    release.notified().await;
                }
            }
            .boxed()
        })
    };
    let a = reconciler(&client, &moto, &pool_id, &db.url);
    let run_a = tokio::spawn(async move { a.run_with_hook(&settings(MatchOn::Handle, 50), false, Some(&hook)).await });
    tokio::time::timeout(DEADLINE, locked.notified()).await.expect("run A never took the lock");

    let b = reconciler(&client, &moto, &pool_id, &db.url);
    let skipped = b.run(&settings(MatchOn::Handle, 50), false).await.unwrap();
    assert_eq!(skipped.status, Status::Skipped);
    assert_eq!(skipped.cognito_users, 0, "a skipped run must not even list Cognito");
    assert_eq!(counts(&skipped), [0; 5]);
    assert!(mapping(&pg).await.values().all(|v| v == &vec![None]), "nothing may be written while A waits");

    release.notify_one();
    let done = tokio::time::timeout(DEADLINE, run_a).await.unwrap().unwrap().unwrap();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(counts(&done), [3, 0, 0, 0, 0]);
    let m = mapping(&pg).await;
    for (h, sub) in &subs {
        assert_eq!(m[h], vec![Some(sub.clone())]);
    }
    // A released the lock: the next run gets it.
    let again = b.run(&settings(MatchOn::Handle, 50), false).await.unwrap();
    assert_eq!((again.status, counts(&again)), (Status::Completed, [0, 3, 0, 0, 0]));
    pg.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_stopped_mid_run_writes_nothing_and_the_next_run_succeeds() {
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    let ann = support::create_user(&client, &pool_id, "ann", &[("preferred_username", "ann")]).await;
    let ben = support::create_user(&client, &pool_id, "ben", &[("preferred_username", "ben")]).await;

    let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let url = cluster.url("postgres");
    let pg = PgPool::connect(&url).await.unwrap();
    schema(&pg).await;
    insert_rows(&pg, &[("ann", "a@x", None), ("ben", "b@x", Some("old-ben"))]).await;
    pg.close().await;

    // Every statement has run inside the transaction; the server dies before COMMIT.
    let cluster = Arc::new(Mutex::new(cluster));
    let hook: Hook = {
        let cluster = cluster.clone();
        Arc::new(move |phase| {
            let cluster = cluster.clone();
            async move {
                if phase == Phase::BeforeCommit {
                    tokio::task::spawn_blocking(move || cluster.lock().unwrap().stop()).await.unwrap();
                }
            }
            .boxed()
        })
    };
    let r = reconciler(&client, &moto, &pool_id, &url);
    let err = r.run_with_hook(&settings(MatchOn::Handle, 50), false, Some(&hook)).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "PostgreSQL going away must be 'unavailable': {err}");
    assert_eq!(err.exit_code(), 69);
    assert!(err.to_string().contains(&format!("127.0.0.1:{}", cluster.lock().unwrap().port())), "{err}");

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.lock().unwrap().resume()).await.unwrap();
    let pg = PgPool::connect(&url).await.unwrap();
    let m = mapping(&pg).await;
    assert_eq!((m["ann"].clone(), m["ben"].clone()), (vec![None], vec![Some("old-ben".to_string())]));

    let report = r.run(&settings(MatchOn::Handle, 50), false).await.unwrap();
    assert_eq!(counts(&report), [2, 0, 0, 0, 0]);
    let m = mapping(&pg).await;
    assert_eq!((m["ann"].clone(), m["ben"].clone()), (vec![Some(ann)], vec![Some(ben)]));
    pg.close().await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.lock().unwrap().stop()).await.unwrap();
}

#[tokio::test]
async fn match_on_email() {
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    // preferred_username deliberately disagrees with the handle: only email may match.
    let ann =
        support::create_user(&client, &pool_id, "ann", &[("email", "ann@example.com"), ("preferred_username", "nope")])
            .await;
    support::create_user(&client, &pool_id, "ben", &[("preferred_username", "ben")]).await;
    support::create_user(&client, &pool_id, "cat", &[("email", "cat@example.com")]).await;
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    insert_rows(&pg, &[("ann", "ann@example.com", None), ("ben", "ben@example.com", None)]).await;

    let r = reconciler(&client, &moto, &pool_id, &db.url);
    let report = r.run(&settings(MatchOn::Email, 50), false).await.unwrap();
    assert_eq!(report.match_on, MatchOn::Email);
    assert_eq!(counts(&report), [1, 0, 1, 1, 0]);
    assert_eq!(report.outcomes.updated.first, names(&["ann@example.com"]));
    assert_eq!(report.outcomes.unmatched.first, names(&["cat@example.com"]));
    assert_eq!(report.outcomes.skipped.first, names(&["ben"]));
    let m = mapping(&pg).await;
    assert_eq!((m["ann"].clone(), m["ben"].clone()), (vec![Some(ann)], vec![None]));
    pg.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_users_table_without_the_column_stops_the_run_naming_table_and_column() {
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    support::create_user(&client, &pool_id, "ann", &[("preferred_username", "ann"), ("email", "ann@x")]).await;
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    let r = reconciler(&client, &moto, &pool_id, &db.url);

    let err = r.run(&settings(MatchOn::Handle, 50), false).await.unwrap_err();
    assert!(err.to_string().contains("table public.users does not exist"), "{err}");

    sqlx::raw_sql("CREATE TABLE public.users (uuid uuid PRIMARY KEY, email text, cognito_user_id text)")
        .execute(&pg)
        .await
        .unwrap();
    let err = r.run(&settings(MatchOn::Handle, 50), false).await.unwrap_err();
    assert!(matches!(err, Error::Failed(_)), "{err}");
    assert!(err.to_string().contains("table public.users") && err.to_string().contains("no column handle"), "{err}");

    sqlx::raw_sql("ALTER TABLE public.users DROP COLUMN cognito_user_id").execute(&pg).await.unwrap();
    let err = r.run(&settings(MatchOn::Email, 50), false).await.unwrap_err();
    assert!(err.to_string().contains("no column cognito_user_id"), "{err}");
    pg.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn cognito_down_is_unavailable_and_releases_the_lock() {
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    // Nothing listens on a port we just bound and released.
    let dead = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let down_client = support::cognito_client(&support::sdk_config(&dead).await);
    let err = reconciler(&down_client, &dead, &pool_id, &db.url).run(&settings(MatchOn::Handle, 50), false).await;
    let err = err.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains(&dead), "the sentence names the endpoint: {err}");
    // The failed run's lock died with its connection.
    let ok = reconciler(&client, &moto, &pool_id, &db.url).run(&settings(MatchOn::Handle, 50), false).await.unwrap();
    assert_eq!(ok.status, Status::Completed);
    pg.close().await;
    db.drop_db().await;
}

fn run_cli(config: &std::path::Path, args: &[&str]) -> Output {
    let out = support::bin().arg("--config").arg(config).args(args).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[tokio::test]
async fn cli_prints_the_report_and_exits_by_outcome() {
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    let ann = support::create_user(&client, &pool_id, "ann", &[("preferred_username", "ann")]).await;
    support::create_user(&client, &pool_id, "zed", &[("preferred_username", "zed")]).await;
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    insert_rows(&pg, &[("ann", "a@x", None)]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), &moto, "unused", &db.url, &pool_id, "client");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[reconcile]\ncognito_max_rps = 50\n");
    std::fs::write(&config, text).unwrap();

    // Dry run, text.
    let out = run_cli(&config, &["reconcile", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("dry run: nothing written") && stdout.contains("would update"), "{stdout}");
    assert!(stdout.contains("ann") && stdout.contains("zed"), "{stdout}");
    assert_eq!(mapping(&pg).await["ann"], vec![None]);

    // For real, JSON.
    let out = run_cli(&config, &["reconcile", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["dry_run"], false);
    assert_eq!(v["match_on"], "handle");
    assert_eq!(v["cognito_users"], 2);
    assert_eq!(v["outcomes"]["updated"]["count"], 1);
    assert_eq!(v["outcomes"]["updated"]["first"], serde_json::json!(["ann"]));
    assert_eq!(v["outcomes"]["unmatched"]["first"], serde_json::json!(["zed"]));
    assert!(v["cognito_seconds"].is_f64() && v["postgres_seconds"].is_f64(), "{v}");
    assert_eq!(mapping(&pg).await["ann"], vec![Some(ann)]);

    // Another instance holds the lock: skipped, exit 1, one sentence.
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)").bind(LOCK_KEY).execute(&mut holder).await.unwrap();
    let out = run_cli(&config, &["reconcile", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "skipped");
    assert!(String::from_utf8_lossy(&out.stderr).contains("another instance holds the reconcile lock"));
    holder.close().await.unwrap();

    // PostgreSQL down: 69, naming the server.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = dir.path().join("pg-down.toml");
    let text =
        std::fs::read_to_string(&config).unwrap().replace(&db.url, &format!("postgres://postgres@127.0.0.1:{port}/x"));
    std::fs::write(&down, text).unwrap();
    let out = run_cli(&down, &["reconcile"]);
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("127.0.0.1:{port}")));

    // Cognito down: 69, naming the endpoint.
    let dead = format!("http://127.0.0.1:{port}");
    let down = dir.path().join("cognito-down.toml");
    std::fs::write(&down, std::fs::read_to_string(&config).unwrap().replace(&moto, &dead)).unwrap();
    let out = run_cli(&down, &["reconcile", "--json"]);
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ListUsers"));
    assert!(out.stdout.is_empty());
    pg.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn changed_mappings_reach_the_daemon_users_cache_at_once() {
    // The schedule is off: only the run below may map the user.
    let app =
        App::start_with(Setup { extra_config: "[reconcile]\nenabled = false\n".into(), ..Default::default() }).await;
    let user = app.user("rita", None, false).await;
    assert_eq!(app.get("/api/message_groups", &user.access_token).await.status(), 403);
    insert_rows(&app.pg, &[("rita", "rita@example.com", None)]).await;
    // Still 403: "not provisioned" is cached (30 s), so only an invalidation can make it 200 now.
    assert_eq!(app.get("/api/message_groups", &user.access_token).await.status(), 403);

    let cache = app.running.as_ref().unwrap().cache.clone();
    let url = app.db.as_ref().unwrap().url.clone();
    let r = Reconciler::new(
        app.cognito.clone(),
        app.moto.clone(),
        app.pool_id.clone(),
        PgConnectOptions::from_str(&url).unwrap(),
        Duration::from_secs(5),
        Some(cache),
    );
    let report = r.run(&settings(MatchOn::Handle, 50), false).await.unwrap();
    assert_eq!(report.outcomes.updated.first, names(&["rita"]));
    assert_eq!(app.get("/api/message_groups", &user.access_token).await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn the_daemon_reconciles_on_its_schedule_and_records_metrics() {
    let app = App::start_with(Setup {
        extra_config: "[reconcile]\ninterval = \"1s\"\njitter = \"0s\"\ncognito_max_rps = 50\n".into(),
        ..Default::default()
    })
    .await;
    let user = app.user("sam", None, false).await;
    assert_eq!(app.get("/api/message_groups", &user.access_token).await.status(), 403);
    insert_rows(&app.pg, &[("sam", "sam@example.com", None)]).await;
    // Well inside the 30 s negative-cache TTL: the scheduled run's invalidation did it.
    support::wait_until(DEADLINE, "the scheduled reconcile maps sam", || async {
        app.get("/api/message_groups", &user.access_token).await.status() == 200
    })
    .await;
    support::wait_until(DEADLINE, "a run that found sam mapped is recorded", || async {
        app.metric("cruddur_syncd_reconcile_users", &["outcome=\"unchanged\""]).await >= 1.0
    })
    .await;
    assert!(app.metric("cruddur_syncd_reconcile_runs_total", &["result=\"success\""]).await >= 2.0);
    assert_eq!(app.metric("cruddur_syncd_reconcile_runs_total", &["result=\"failure\""]).await, 0.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let last = app.metric("cruddur_syncd_reconcile_last_success_timestamp_seconds", &[]).await;
    assert!((now - last).abs() < 60.0, "last success {last}, now {now}");
    app.stop().await;
}

#[tokio::test]
async fn a_sub_already_on_another_row_is_a_conflict_and_the_mapping_that_works_stays() {
    // Alice was mapped under her old handle; she renamed herself in Cognito, and a new users row
    // with the new handle exists. Writing her sub there would leave two rows with one sub: the
    // API serves such a sub to nobody.
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    let alice = support::create_user(&client, &pool_id, "alice", &[("preferred_username", "alice_new")]).await;
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    insert_rows(&pg, &[("alice", "a@x", Some(&alice)), ("alice_new", "a2@x", None)]).await;

    let r = reconciler(&client, &moto, &pool_id, &db.url);
    let report = r.run(&settings(MatchOn::Handle, 50), false).await.unwrap();
    assert_eq!(counts(&report), [0, 0, 0, 0, 1], "{report:?}");
    assert_eq!(report.outcomes.conflict.first, names(&["alice_new (its sub is already on alice)"]));
    assert!(report.changed_subs.is_empty());
    let m = mapping(&pg).await;
    assert_eq!(m["alice"], vec![Some(alice.clone())], "the mapping that works stays");
    assert_eq!(m["alice_new"], vec![None], "nothing is written for a conflict");
    let mut text = Vec::new();
    report.write_text(&mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("alice_new (its sub is already on alice)"), "{text}");
    pg.close().await;
    db.drop_db().await;
}

/// A cache of the daemon's kind whose PostgreSQL connection goes through `proxy`: one
/// connection, no ping before use, so the only answer on the wire is a lookup's.
async fn cache_through(
    proxy: &support::tcp_proxy::TcpProxy,
    db: &TestDb,
    users_ttl: Duration,
) -> cruddur_syncd::cache::Cache {
    use cruddur_syncd::cache::scripted::ScriptedStore;
    use cruddur_syncd::cache::Cache;
    use cruddur_syncd::pg::PgUsers;
    // Without TLS, so the proxy can see which statement an answer is for.
    let url = format!("{}?sslmode=disable", db.url.replace("127.0.0.1:5432", &proxy.addr.to_string()));
    let pool =
        sqlx::postgres::PgPoolOptions::new().max_connections(1).test_before_acquire(false).connect(&url).await.unwrap();
    let cfg = cruddur_syncd::config::CacheConfig { users_ttl, ..Default::default() };
    let metrics = Arc::new(cruddur_syncd::metrics::Metrics::new());
    let users = Arc::new(PgUsers { pool, target: "proxied".into(), health: None });
    // Room for the held answer on a loaded machine: the lookup's deadline runs meanwhile. The
    // conversations store is never read here.
    Cache::new(&cfg, Duration::from_secs(60), Arc::new(ScriptedStore::new()), users, metrics)
}

async fn user_row(pg: &PgPool, handle: &str, sub: Option<&str>) -> uuid::Uuid {
    sqlx::query_scalar("INSERT INTO public.users (display_name, handle, email, cognito_user_id) VALUES ($1, $1, $1, $2) RETURNING uuid")
        .bind(handle)
        .bind(sub)
        .fetch_one(pg)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_lookup_in_flight_when_its_mapping_is_forgotten_is_not_kept() {
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    let old_row = user_row(&pg, "before", Some("sub-1")).await;
    user_row(&pg, "warm", Some("sub-warm")).await;
    let proxy = support::tcp_proxy::TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let cache = Arc::new(cache_through(&proxy, &db, Duration::from_secs(600)).await);
    // The lookup's statement is prepared on the one connection, so the next lookup sends one
    // flight (bind, execute) and gets one answer.
    assert!(cache.user(&CognitoSub("sub-warm".into())).await.unwrap().value.is_some());
    // The tail of that answer (ReadyForQuery) may still be on its way.
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.hold_responses(true);
    let sub = CognitoSub("sub-1".into());
    let slow = tokio::spawn({
        let (cache, sub) = (cache.clone(), sub.clone());
        async move { cache.user(&sub).await }
    });
    // The server answered (the old mapping); the answer is on the wire, held.
    support::wait_until(DEADLINE, "the lookup's answer is held", || async { proxy.held_contains(b"SELECT 1") }).await;
    // Meanwhile the mapping moves to another row, and is forgotten (as reconcile does).
    sqlx::query("UPDATE public.users SET cognito_user_id = NULL WHERE uuid = $1")
        .bind(old_row)
        .execute(&pg)
        .await
        .unwrap();
    let new_row = user_row(&pg, "after", Some("sub-1")).await;
    let forget = tokio::spawn({
        let (cache, sub) = (cache.clone(), sub.clone());
        async move { cache.forget_users([sub]).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!forget.is_finished(), "the invalidation waits for the lookup in flight");
    proxy.hold_responses(false);

    let seen = slow.await.unwrap().unwrap();
    assert_eq!(seen.value.map(|u| u.0), Some(old_row), "a lookup started before the change answers what it read");
    forget.await.unwrap();
    let next = cache.user(&sub).await.unwrap();
    assert_eq!(next.value.map(|u| u.0), Some(new_row), "the next request sees the new mapping");
    pg.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_mapping_changed_elsewhere_is_seen_within_users_ttl() {
    // Another instance's reconcile, or the CLI's, changes a mapping: nothing tells this cache.
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    schema(&pg).await;
    let old_row = user_row(&pg, "before", Some("sub-2")).await;
    let proxy = support::tcp_proxy::TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let cache = cache_through(&proxy, &db, Duration::from_millis(500)).await;
    let sub = CognitoSub("sub-2".into());
    assert_eq!(cache.user(&sub).await.unwrap().value.map(|u| u.0), Some(old_row));
    sqlx::query("UPDATE public.users SET cognito_user_id = NULL WHERE uuid = $1")
        .bind(old_row)
        .execute(&pg)
        .await
        .unwrap();
    let new_row = user_row(&pg, "after", Some("sub-2")).await;
    support::wait_until(DEADLINE, "the new mapping is served", || async {
        cache.user(&sub).await.unwrap().value.map(|u| u.0) == Some(new_row)
    })
    .await;
    pg.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_sub_on_a_row_without_a_name_is_still_a_conflict() {
    // A schema of another app: matched on email, the handle column may be NULL.
    let (moto, client) = cognito().await;
    let pool_id = new_pool(&client).await;
    let bea = support::create_user(&client, &pool_id, "bea", &[("email", "bea@x")]).await;
    let db = TestDb::create().await;
    let pg = PgPool::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE public.users (uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(), handle text, email text, cognito_user_id text)",
    )
    .execute(&pg)
    .await
    .unwrap();
    let nameless: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO public.users (email, cognito_user_id) VALUES ('old@x', $1) RETURNING uuid")
            .bind(&bea)
            .fetch_one(&pg)
            .await
            .unwrap();
    sqlx::query("INSERT INTO public.users (handle, email) VALUES ('bea', 'bea@x')").execute(&pg).await.unwrap();

    let report = reconciler(&client, &moto, &pool_id, &db.url).run(&settings(MatchOn::Email, 50), false).await.unwrap();
    assert_eq!(counts(&report), [0, 0, 0, 0, 1], "{report:?}");
    assert_eq!(report.outcomes.conflict.first, vec![format!("bea (its sub is already on {nameless})")]);
    let carriers: i64 = sqlx::query_scalar("SELECT count(*) FROM public.users WHERE cognito_user_id = $1")
        .bind(&bea)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(carriers, 1, "never two rows with one sub");
    pg.close().await;
    db.drop_db().await;
}
