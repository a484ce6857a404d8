//! The operator tools against a real moto server and a real PostgreSQL.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Output;

use aws_sdk_cognitoidentityprovider::types::{AttributeType, MessageActionType};
use aws_sdk_dynamodb::types::AttributeValue as V;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, PutRequest, ScalarAttributeType, WriteRequest,
};
use serde_json::Value;

use crate::support;
use crate::support::TestDb;

struct Env {
    _dir: tempfile::TempDir,
    config: PathBuf,
    table: String,
    moto: String,
    db: TestDb,
}

async fn env_with(pool_id: &str) -> Env {
    let moto = support::moto_url();
    let dir = tempfile::tempdir().unwrap();
    let table = support::unique("tools-");
    let db = TestDb::create().await;
    let config = support::write_config(dir.path(), &moto, &table, &db.url, pool_id, "client");
    Env { _dir: dir, config, table, moto, db }
}

async fn env() -> Env {
    env_with("us-east-1_unused").await
}

impl Env {
    fn run(&self, args: &[&str]) -> Output {
        let out = support::bin().arg("--config").arg(&self.config).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        out
    }

    /// Runs a command that must succeed and returns its stdout as JSON lines.
    fn json_lines(&self, args: &[&str]) -> Vec<Value> {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?} printed a non-JSON line {l:?}: {e}")))
            .collect()
    }

    async fn ddb(&self) -> aws_sdk_dynamodb::Client {
        support::ddb_client(&support::sdk_config(&self.moto).await)
    }
}

#[tokio::test]
async fn schema_load_is_idempotent_and_creates_stream_and_index() {
    let env = env().await;
    let first = env.json_lines(&["ddb", "schema-load"]);
    assert_eq!(first[0]["created"], true);
    assert_eq!(first[0]["status"], "ACTIVE");
    let second = env.json_lines(&["ddb", "schema-load"]);
    assert_eq!(second[0]["created"], false);
    assert_eq!(second[0]["stream_enabled_now"], false);
    assert_eq!(first[0]["stream_arn"], second[0]["stream_arn"], "a re-run must not replace the stream");

    let t = env.ddb().await.describe_table().table_name(&env.table).send().await.unwrap().table.unwrap();
    let spec = t.stream_specification().unwrap();
    assert!(spec.stream_enabled());
    assert_eq!(spec.stream_view_type().unwrap().as_str(), "NEW_AND_OLD_IMAGES");
    let gsi = &t.global_secondary_indexes()[0];
    assert_eq!(gsi.index_name(), Some("message-group-sk-index"));
    let keys: Vec<_> = gsi.key_schema().iter().map(|k| (k.attribute_name(), k.key_type().as_str())).collect();
    assert_eq!(keys, [("message_group_uuid", "HASH"), ("sk", "RANGE")]);
    let names = String::from_utf8(env.run(&["ddb", "list-tables"]).stdout).unwrap();
    assert!(names.lines().any(|l| l == env.table), "{names}");
    env.db.drop_db().await;
}

#[tokio::test]
async fn schema_load_enables_the_stream_of_an_existing_table() {
    let env = env().await;
    let key = |n: &str, t| KeySchemaElement::builder().attribute_name(n).key_type(t).build().unwrap();
    let attr = |n: &str| {
        AttributeDefinition::builder().attribute_name(n).attribute_type(ScalarAttributeType::S).build().unwrap()
    };
    env.ddb()
        .await
        .create_table()
        .table_name(&env.table)
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("sk", KeyType::Range))
        .attribute_definitions(attr("pk"))
        .attribute_definitions(attr("sk"))
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .unwrap();
    // check names the missing stream
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(69));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("has no stream enabled"), "{stdout}");

    let report = env.json_lines(&["ddb", "schema-load"]);
    assert_eq!(report[0]["created"], false);
    assert_eq!(report[0]["stream_enabled_now"], true);
    assert_eq!(report[0]["index_created_now"], true);
    assert_eq!(report[0]["stream_view_type"], "NEW_AND_OLD_IMAGES");
    env.db.drop_db().await;
}

#[tokio::test]
async fn drop_refuses_without_yes() {
    let env = env().await;
    env.json_lines(&["ddb", "schema-load"]);
    let out = env.run(&["ddb", "drop"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&env.table) && stderr.contains("--yes"), "{stderr}");
    assert!(env.ddb().await.describe_table().table_name(&env.table).send().await.is_ok(), "table was deleted");

    env.json_lines(&["ddb", "drop", "--yes"]);
    assert!(env.ddb().await.describe_table().table_name(&env.table).send().await.is_err(), "table survived");
    // A second drop names the missing table instead of pretending.
    let out = env.run(&["ddb", "drop", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    env.db.drop_db().await;
}

#[tokio::test]
async fn seed_is_deterministic_and_idempotent_across_runs_at_different_times() {
    let env = env().await;
    env.json_lines(&["ddb", "schema-load"]);
    let first = env.json_lines(&["ddb", "seed", "--now", "2024-01-01T00:00:30Z"]);
    assert_eq!(first[0]["messages_written"], 100);
    assert_eq!(first[0]["groups_written"], 2);
    let scan1 = env.json_lines(&["ddb", "scan"]);
    assert_eq!(scan1.len(), 102);

    let second = env.json_lines(&["ddb", "seed", "--now", "2025-06-01T12:00:00Z"]);
    assert_eq!(second[0]["messages_written"], 0);
    assert_eq!(second[0]["groups_written"], 0);
    let scan2 = env.json_lines(&["ddb", "scan"]);
    assert_eq!(scan2.len(), 102, "a second seed added items");

    // Same ids and times as the first run: deterministic.
    let ids = |scan: &[Value]| scan.iter().map(|i| format!("{}|{}", i["pk"], i["sk"])).collect::<HashSet<_>>();
    assert_eq!(ids(&scan1), ids(&scan2));
    // The newest message is at --now, written in the canonical form.
    let newest = scan1.iter().filter_map(|i| i["sk"].as_str()).max().unwrap();
    assert_eq!(newest, "2024-01-01T00:00:30.000000+00:00");
    // Realistic text, quotes included, survives the round trip.
    assert!(scan1.iter().any(|i| i["message"].as_str().is_some_and(|m| m.contains('"'))));
    env.db.drop_db().await;
}

#[tokio::test]
async fn conversations_through_postgres_and_dynamodb() {
    let env = env().await;
    env.json_lines(&["ddb", "schema-load"]);
    env.json_lines(&["ddb", "seed", "--now", "2024-03-01T10:00:00Z"]);
    let db = env.json_lines(&["db", "schema-load"]);
    assert_eq!(db[0]["database_created"], false);
    assert_eq!(env.json_lines(&["db", "seed"])[0]["inserted"], 2);
    assert_eq!(env.json_lines(&["db", "seed"])[0]["inserted"], 0, "db seed is not idempotent");

    let groups = env.json_lines(&["ddb", "list-conversations", "bayko"]);
    assert_eq!(groups.len(), 1);
    let g = groups[0].as_object().unwrap();
    // Field order as the Flask app emits it (serde_json's Map sorts keys, so read the raw line).
    let raw = String::from_utf8(env.run(&["ddb", "list-conversations", "bayko"]).stdout).unwrap();
    let at = |k: &str| raw.find(&format!("\"{k}\":")).unwrap_or_else(|| panic!("{k} missing in {raw}"));
    let order = ["uuid", "display_name", "handle", "message", "created_at"].map(at);
    assert!(order.windows(2).all(|w| w[0] < w[1]), "fields out of order: {raw}");
    assert_eq!(g.len(), 5);
    assert_eq!(g["handle"], "andrewbrown", "a group row names the other participant");
    assert_eq!(g["created_at"], "2024-03-01T10:00:00.000000+00:00");

    let group = g["uuid"].as_str().unwrap();
    let page = env.json_lines(&["ddb", "get-conversation", group, "--limit", "5"]);
    assert_eq!(page.len(), 5);
    let times: Vec<&str> = page.iter().map(|m| m["created_at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "messages come oldest first");
    assert_eq!(*times.last().unwrap(), "2024-03-01T10:00:00.000000+00:00", "the page is the newest five");
    assert_eq!(env.json_lines(&["ddb", "get-conversation", group]).len(), 100);

    // Bad input: a clear sentence and the right exit code.
    let out = env.run(&["ddb", "list-conversations", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user with handle \"nobody\""));
    let out = env.run(&["ddb", "get-conversation", "not-a-uuid"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a message group uuid"));
    env.db.drop_db().await;
}

#[tokio::test]
async fn db_schema_load_creates_a_missing_database() {
    let env = env().await;
    let name = support::unique("syncd_test_new_");
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let out = support::bin()
        .arg("--config")
        .arg(&env.config)
        .args(["db", "schema-load"])
        .env("CRUDDUR_SYNCD__POSTGRES__URL", &url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["database_created"], true);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM public.users").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 0);
    pool.close().await;
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(support::PG_ADMIN_URL).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE \"{name}\" WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
    env.db.drop_db().await;
}

/// Items of about 4 KB: 400 of them are 1.6 MB, past DynamoDB's 1 MB page.
async fn write_big_conversation(client: &aws_sdk_dynamodb::Client, table: &str, group: &str, n: usize) {
    let filler = "x".repeat(4000);
    let items: Vec<WriteRequest> = (0..n)
        .map(|i| {
            let item = [
                ("pk", format!("MSG#{group}")),
                ("sk", format!("2024-05-01T00:{:02}:{:02}.000000+00:00", i / 60, i % 60)),
                ("message_uuid", uuid::Uuid::new_v4().to_string()),
                ("message", format!("{i} {filler}")),
                ("user_uuid", uuid::Uuid::new_v4().to_string()),
                ("user_display_name", "Big Talker".to_string()),
                ("user_handle", "big".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), V::S(v)))
            .collect();
            WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build().unwrap()).build()
        })
        .collect();
    for chunk in items.chunks(25) {
        client.batch_write_item().request_items(table, chunk.to_vec()).send().await.unwrap();
    }
}

#[tokio::test]
async fn scan_and_query_paginate_past_one_megabyte() {
    let env = env().await;
    env.json_lines(&["ddb", "schema-load"]);
    let client = env.ddb().await;
    let group = uuid::Uuid::new_v4().to_string();
    write_big_conversation(&client, &env.table, &group, 400).await;

    // The premise: one page does not hold them all.
    let page = client.scan().table_name(&env.table).send().await.unwrap();
    assert!(page.last_evaluated_key.is_some(), "moto returned everything in one page; the test proves nothing");

    let scan = env.json_lines(&["ddb", "scan"]);
    assert_eq!(scan.len(), 400);
    assert_eq!(env.json_lines(&["ddb", "scan", "--limit", "7"]).len(), 7);

    let conversation = env.json_lines(&["ddb", "get-conversation", &group]);
    assert_eq!(conversation.len(), 400);
    assert!(conversation[0]["message"].as_str().unwrap().starts_with("0 "));
    assert!(conversation[399]["message"].as_str().unwrap().starts_with("399 "));
    env.db.drop_db().await;
}

#[tokio::test]
async fn cognito_list_users_reads_every_page() {
    let moto = support::moto_url();
    let cognito = support::cognito_client(&support::sdk_config(&moto).await);
    let pool = cognito.create_user_pool().pool_name(support::unique("pool-")).send().await.unwrap();
    let pool_id = pool.user_pool.unwrap().id.unwrap();
    let env = env_with(&pool_id).await;
    let n = 130;
    let creates = (0..n).map(|i| {
        let cognito = cognito.clone();
        let pool_id = pool_id.clone();
        async move {
            let attr = |k: &str, v: String| AttributeType::builder().name(k).value(v).build().unwrap();
            cognito
                .admin_create_user()
                .user_pool_id(pool_id)
                .username(format!("user{i:03}"))
                .user_attributes(attr("preferred_username", format!("handle{i:03}")))
                .user_attributes(attr("email", format!("user{i:03}@example.com")))
                .message_action(MessageActionType::Suppress)
                .send()
                .await
                .unwrap();
        }
    });
    futures::future::join_all(creates).await;

    // The premise: a page holds at most 60.
    let page = cognito.list_users().user_pool_id(&pool_id).limit(60).send().await.unwrap();
    assert_eq!(page.users().len(), 60);
    assert!(page.pagination_token.is_some());

    let users = env.json_lines(&["cognito", "list-users"]);
    assert_eq!(users.len(), n);
    let subs: HashSet<&str> = users.iter().map(|u| u["sub"].as_str().unwrap()).collect();
    assert_eq!(subs.len(), n, "every user once, each with its sub");
    assert!(users.iter().any(|u| u["preferred_username"] == "handle129"));
    env.db.drop_db().await;
}

#[tokio::test]
async fn cognito_seed_is_idempotent_and_refuses_real_aws() {
    let env = env().await;
    let first = env.json_lines(&["cognito", "seed"]);
    let second = env.json_lines(&["cognito", "seed"]);
    assert_eq!(first[0]["user_pool_id"], second[0]["user_pool_id"]);
    assert_eq!(first[0]["client_id"], second[0]["client_id"]);
    assert_eq!(second[0]["users_created"], 0);
    assert_eq!(second[0]["users_present"], 2);

    // cognito token: a real access token for a demo user of that pool
    let out = support::bin()
        .arg("--config")
        .arg(&env.config)
        .args(["cognito", "token", "bayko"])
        .env("CRUDDUR_SYNCD__AUTH__USER_POOL_ID", first[0]["user_pool_id"].as_str().unwrap())
        .env("CRUDDUR_SYNCD__AUTH__CLIENT_ID", first[0]["client_id"].as_str().unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3, "{token}");

    let real = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace(&format!("endpoint_url = \"{}\"\nemulator_credentials = true\n", env.moto), "");
    let path = env.config.with_file_name("real.toml");
    std::fs::write(&path, real).unwrap();
    let out = support::bin().arg("--config").arg(&path).args(["cognito", "seed"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("local emulator"));
    env.db.drop_db().await;
}

#[tokio::test]
async fn log_format_and_rust_log() {
    let env = env().await;
    env.json_lines(&["ddb", "schema-load"]);
    let run = |envs: &[(&str, &str)]| {
        let mut cmd = support::bin();
        cmd.arg("--config").arg(&env.config).args(["ddb", "scan"]);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        assert!(out.stdout.is_empty(), "logs leaked into stdout");
        String::from_utf8(out.stderr).unwrap()
    };
    // json: every line is a JSON object with the event's fields at its top level (flattened,
    // where log pipelines index them)
    let json = run(&[("CRUDDUR_SYNCD__LOG__FORMAT", "json")]);
    let line = json.lines().find(|l| l.contains("scan finished")).unwrap_or_else(|| panic!("{json}"));
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["items"], 0, "{v}");
    assert!(v.get("fields").is_none(), "{v}");
    assert!(v["message"].as_str().unwrap().contains("scan finished"), "{v}");
    // log.level filters; RUST_LOG wins over it
    assert!(!run(&[("CRUDDUR_SYNCD__LOG__LEVEL", "warn")]).contains("scan finished"));
    assert!(run(&[("CRUDDUR_SYNCD__LOG__LEVEL", "warn"), ("RUST_LOG", "info")]).contains("scan finished"));
    // journald without a journal falls back to text on stderr, saying so
    // (where a journal runs, the lines go there instead and this part has nothing to check)
    if !std::path::Path::new("/run/systemd/journal/socket").exists() {
        let fallback = run(&[("CRUDDUR_SYNCD__LOG__FORMAT", "journald")]);
        assert!(fallback.contains("journald is not reachable") && fallback.contains("scan finished"), "{fallback}");
    }
    env.db.drop_db().await;
}

#[tokio::test]
async fn run_serves_until_sigterm_and_exits_0() {
    use std::io::BufRead;
    let env = env().await;
    env.json_lines(&["ddb", "schema-load"]);
    env.json_lines(&["db", "schema-load"]);
    let mut child = support::bin()
        .arg("--config")
        .arg(&env.config)
        .arg("run")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // Start-up ends with one "serving" line naming both listeners.
    while !seen.contains("serving") {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("run exited before serving: {seen}");
        }
        seen.push_str(&line);
    }
    assert!(seen.contains("api_addr=127.0.0.1:") && seen.contains("admin_addr=127.0.0.1:"), "{seen}");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{seen}{rest}");
    assert!(rest.contains("shutdown requested") && rest.contains("stopped"), "{rest}");
    env.db.drop_db().await;
}

#[tokio::test]
async fn run_exits_69_when_postgres_is_down_at_start() {
    let env = env().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = support::bin()
        .arg("--config")
        .arg(&env.config)
        .arg("run")
        .env("CRUDDUR_SYNCD__POSTGRES__URL", format!("postgres://postgres@127.0.0.1:{closed}/x"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{closed}")), "{stderr}");
    env.db.drop_db().await;
}
