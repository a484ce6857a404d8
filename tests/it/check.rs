//! `cruddur-syncd check` against a healthy local stack and with each dependency down.

use std::net::TcpListener;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::support;
use crate::support::TestDb;

/// A healthy stack: table with stream, Cognito pool, users table.
async fn healthy(dir: &Path) -> (std::path::PathBuf, TestDb) {
    let moto = support::moto_url();
    let cognito = support::cognito_client(&support::sdk_config(&moto).await);
    let pool_id = support::create_pool(&cognito, "check-").await;
    let db = TestDb::create().await;
    let config = support::write_config(dir, &moto, &support::unique("check-"), &db.url, &pool_id, "client");
    for args in [["ddb", "schema-load"], ["db", "schema-load"]] {
        let out = support::bin().arg("--config").arg(&config).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (config, db)
}

fn check(config: &Path, env: &[(&str, &str)]) -> (Output, String, Duration) {
    let started = Instant::now();
    let mut cmd = support::bin();
    cmd.arg("--config").arg(config).arg("check");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    (out, stdout, started.elapsed())
}

fn line<'a>(stdout: &'a str, probe: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(probe))
        .unwrap_or_else(|| panic!("no {probe} line in:\n{stdout}"))
}

#[tokio::test]
async fn healthy_stack_passes_every_probe_and_shows_sources() {
    let dir = tempfile::tempdir().unwrap();
    let (config, db) = healthy(dir.path()).await;
    let (out, stdout, _) = check(&config, &[("CRUDDUR_SYNCD__CACHE__TTL", "3m")]);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for probe in ["dynamodb", "streams", "cognito", "jwks", "postgres"] {
        let l = line(&stdout, probe);
        assert!(l.trim_start().starts_with("ok"), "{l}");
        assert!(l.contains("ms"), "no latency: {l}");
    }
    assert!(line(&stdout, "dynamodb").contains("NEW_AND_OLD_IMAGES"));
    assert!(line(&stdout, "jwks").contains("1 key(s)"));
    assert!(line(&stdout, "postgres").contains("127.0.0.1:5432"));
    // Every value with its source.
    assert!(stdout.contains("cache.ttl") && stdout.contains("\"3m\"  (env CRUDDUR_SYNCD__CACHE__TTL)"), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains("dynamodb.table") && l.ends_with("(file)")));
    assert!(stdout.lines().any(|l| l.contains("stream.poll_interval") && l.ends_with("(default)")));
    db.drop_db().await;
}

#[tokio::test]
async fn password_is_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let (config, db) = healthy(dir.path()).await;
    let (_, stdout, _) = check(&config, &[("CRUDDUR_SYNCD__POSTGRES__URL", "postgres://app:hunter2@127.0.0.1:1/x")]);
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(stdout.contains("postgres://app:REDACTED@127.0.0.1:1/x"));
    db.drop_db().await;
}

#[tokio::test]
async fn aws_endpoint_down_fails_those_probes_with_69() {
    let dir = tempfile::tempdir().unwrap();
    let (config, db) = healthy(dir.path()).await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // dropped: nothing listens there now
    let endpoint = format!("http://127.0.0.1:{closed}");
    let (out, stdout, took) = check(
        &config,
        &[
            ("CRUDDUR_SYNCD__AWS__ENDPOINT_URL", &endpoint),
            ("CRUDDUR_SYNCD__AUTH__JWKS_URL", &format!("{endpoint}/jwks.json")),
        ],
    );
    assert_eq!(out.status.code(), Some(69), "{stdout}");
    for probe in ["dynamodb", "streams", "cognito", "jwks"] {
        let l = line(&stdout, probe);
        assert!(l.trim_start().starts_with("FAIL") && l.contains(&endpoint), "{l}");
    }
    assert!(line(&stdout, "postgres").trim_start().starts_with("ok"));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    db.drop_db().await;
}

#[tokio::test]
async fn wrong_postgres_port_fails_fast_naming_host_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let (config, db) = healthy(dir.path()).await;
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://postgres@127.0.0.1:{closed}/cruddur");
    let (out, stdout, took) = check(&config, &[("CRUDDUR_SYNCD__POSTGRES__URL", &url)]);
    assert_eq!(out.status.code(), Some(69));
    let l = line(&stdout, "postgres");
    assert!(l.contains("FAIL") && l.contains(&format!("127.0.0.1:{closed}")) && l.contains("refused"), "{l}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    db.drop_db().await;
}

#[tokio::test]
async fn silent_postgres_never_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let (config, db) = healthy(dir.path()).await;
    // Accepts connections and never says a word: the black hole a firewall or a wrong host makes.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/cruddur");
    let (out, stdout, took) = check(&config, &[("CRUDDUR_SYNCD__POSTGRES__URL", &url)]);
    assert_eq!(out.status.code(), Some(69));
    let l = line(&stdout, "postgres");
    assert!(l.contains("FAIL") && l.contains(&format!("127.0.0.1:{port}")) && l.contains("no answer within 5s"), "{l}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    drop(silent);
    db.drop_db().await;
}

#[tokio::test]
async fn missing_table_pool_and_users_table_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (config, db) = healthy(dir.path()).await;
    let fresh = TestDb::create().await; // no users table
    let (out, stdout, _) = check(
        &config,
        &[
            ("CRUDDUR_SYNCD__DYNAMODB__TABLE", "no-such-table"),
            ("CRUDDUR_SYNCD__AUTH__USER_POOL_ID", "us-east-1_doesnotexist"),
            ("CRUDDUR_SYNCD__POSTGRES__URL", &fresh.url),
        ],
    );
    assert_eq!(out.status.code(), Some(69));
    assert!(line(&stdout, "dynamodb").contains("no-such-table does not exist"), "{stdout}");
    assert!(line(&stdout, "streams").contains("FAIL"), "{stdout}");
    assert!(line(&stdout, "cognito").contains("us-east-1_doesnotexist"), "{stdout}");
    assert!(line(&stdout, "postgres").contains("public.users does not exist"), "{stdout}");
    fresh.drop_db().await;
    db.drop_db().await;
}
