//! Configuration: parsing, env overrides, and every validation error, through the library and
//! through the binary (exit code 78, one line per problem naming the key).

use std::path::Path;
use std::time::Duration;

use cruddur_syncd::config::{load_from_str, ConfigError, LoadedConfig, Source};

use crate::support;

const VALID: &str = r#"
[aws]
region = "eu-west-1"
[auth]
user_pool_id = "eu-west-1_abc"
client_id = "client"
[postgres]
url = "postgres://app:secret@db.internal:5432/cruddur"
"#;

fn load(text: &str, env: &[(&str, &str)]) -> Result<LoadedConfig, ConfigError> {
    load_from_str(Path::new("/etc/x/config.toml"), text, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

fn problems(text: &str, env: &[(&str, &str)]) -> Vec<String> {
    match load(text, env) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.problems().iter().map(|p| p.to_string()).collect(),
    }
}

fn assert_problem(problems: &[String], key: &str, needle: &str) {
    assert!(
        problems.iter().any(|p| p.starts_with(key) && p.contains(needle)),
        "no problem for {key} containing {needle:?} in {problems:#?}"
    );
}

#[test]
fn spec_example_parses_with_its_values() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/local.toml")).unwrap();
    let c = load(&text, &[]).unwrap().config;
    assert_eq!(c.stream.poll_interval, Duration::from_millis(250));
    assert_eq!(c.stream.shard_sync_interval, Duration::from_secs(10));
    assert_eq!(c.cache.max_bytes, 64 << 20);
    assert_eq!(c.http.cors_allowed_origins, vec!["http://localhost:3000".to_string()]);
    assert_eq!(c.reconcile.interval, Duration::from_secs(60));
    assert_eq!(c.aws.dynamodb_endpoint(), Some("http://127.0.0.1:5055"));
}

#[test]
fn production_template_is_valid_once_its_credential_file_exists() {
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("pg-url");
    std::fs::write(&url_file, "postgres://app:pw@db:5432/cruddur\n").unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/production.toml"))
        .unwrap()
        .replace("/run/credentials/cruddur-syncd.service/pg-url", url_file.to_str().unwrap());
    let loaded = load(&text, &[]).unwrap();
    assert_eq!(loaded.config.postgres.connection_url(), "postgres://app:pw@db:5432/cruddur");
    assert_eq!(loaded.config.aws.dynamodb_endpoint(), None);
    // The URL read from the file is shown redacted, attributed to the file.
    let url = loaded.effective().into_iter().find(|e| e.key == "postgres.url").unwrap();
    assert!(url.value.contains("REDACTED") && !url.value.contains("pw"), "{url:?}");
    assert_eq!(url.source, Source::File);
}

#[test]
fn env_overrides_win_and_are_attributed() {
    let loaded = load(
        VALID,
        &[
            ("CRUDDUR_SYNCD__POSTGRES__URL", "postgres://other@127.0.0.1:5432/x"),
            ("CRUDDUR_SYNCD__POSTGRES__MAX_CONNECTIONS", "9"),
            ("CRUDDUR_SYNCD__STREAM__POLL_INTERVAL", "100ms"),
            ("CRUDDUR_SYNCD__HTTP__CORS_ALLOWED_ORIGINS", r#"["http://a.test", "https://b.test:8443"]"#),
            ("CRUDDUR_SYNCD__RECONCILE__ENABLED", "false"),
            ("CRUDDUR_SYNCD_CONFIG", "/not/an/override"),
            ("UNRELATED", "1"),
        ],
    )
    .unwrap();
    let c = &loaded.config;
    assert_eq!(c.postgres.connection_url(), "postgres://other@127.0.0.1:5432/x");
    assert_eq!(c.postgres.max_connections, 9);
    assert_eq!(c.stream.poll_interval, Duration::from_millis(100));
    assert_eq!(c.http.cors_allowed_origins, ["http://a.test", "https://b.test:8443"]);
    assert!(!c.reconcile.enabled);
    assert_eq!(
        loaded.source_of("postgres.max_connections"),
        Source::Env("CRUDDUR_SYNCD__POSTGRES__MAX_CONNECTIONS".into())
    );
    assert_eq!(loaded.source_of("aws.region"), Source::File);
    assert_eq!(loaded.source_of("cache.ttl"), Source::Default);
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
[aws]
region = ""
endpoint_url = "ftp://nope"
colour = "blue"
[dynamodb]
table = "x"
[stream]
poll_interval = "soon"
shard_sync_interval = "100ms"
[cache]
max_bytes = "lots"
messages_per_group = 0
[http]
listen = "not-an-address"
cors_allowed_origins = ["http://ok.test", "http://bad.test/path"]
request_timeout = 5
[admin]
listen = "127.0.0.1:9177"
[auth]
token_use = "refresh"
[postgres]
max_connections = "five"
[reconcile]
match_on = "phone"
cognito_max_rps = 500
[log]
level = "info,[[["
format = "xml"
[metrics]
enabled = true
"#;
    let p = problems(text, &[]);
    assert_problem(&p, "aws.region", "must not be empty");
    assert_problem(&p, "aws.endpoint_url", "http://");
    assert_problem(&p, "aws.colour", "unknown key");
    assert_problem(&p, "dynamodb.table", "not a DynamoDB name");
    assert_problem(&p, "stream.poll_interval", "soon");
    assert_problem(&p, "stream.shard_sync_interval", "at least 1s");
    assert_problem(&p, "cache.max_bytes", "invalid size");
    assert_problem(&p, "cache.messages_per_group", "between 1 and 1000");
    assert_problem(&p, "http.listen", "");
    assert_problem(&p, "http.cors_allowed_origins", "bad.test/path");
    assert_problem(&p, "http.request_timeout", "");
    assert_problem(&p, "auth.token_use", "refresh");
    assert_problem(&p, "auth.user_pool_id", "is required");
    assert_problem(&p, "auth.client_id", "is required");
    assert_problem(&p, "postgres.max_connections", "");
    assert_problem(&p, "postgres.url", "is required");
    assert_problem(&p, "reconcile.match_on", "phone");
    assert_problem(&p, "reconcile.cognito_max_rps", "between 1 and 50");
    assert_problem(&p, "log.level", "not a tracing filter");
    assert_problem(&p, "log.format", "xml");
    assert_problem(&p, "metrics", "unknown section");
    // Each problem names the file it came from when a value was at fault.
    assert!(p.iter().any(|l| l.contains("/etc/x/config.toml")), "{p:#?}");
}

#[test]
fn env_problems_name_the_variable() {
    let p = problems(
        VALID,
        &[
            ("CRUDDUR_SYNCD__POSTGRES__MAX_CONNECTIONS", "many"),
            ("CRUDDUR_SYNCD__POSTGRES__PASSWORD", "x"),
            ("CRUDDUR_SYNCD__NOSECTIONKEY", "x"),
        ],
    );
    assert_problem(&p, "postgres.max_connections", "env CRUDDUR_SYNCD__POSTGRES__MAX_CONNECTIONS");
    assert_problem(&p, "postgres.password", "unknown key");
    assert_problem(&p, "CRUDDUR_SYNCD__NOSECTIONKEY", "CRUDDUR_SYNCD__<SECTION>__<KEY>");
}

#[test]
fn keys_that_only_make_sense_together() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg-url");
    std::fs::write(&file, "postgres://x@h/d").unwrap();
    let both = VALID.replace("[postgres]", &format!("[postgres]\nurl_file = {:?}", file.to_str().unwrap()));
    assert_problem(&problems(&both, &[]), "postgres.url_file", "not both");

    let no_endpoint = VALID.replace("[aws]", "[aws]\nemulator_credentials = true");
    assert_problem(&problems(&no_endpoint, &[]), "aws.emulator_credentials", "never against real AWS");

    let same_listener = format!("{VALID}\n[http]\nlisten = \"127.0.0.1:8000\"\n[admin]\nlisten = \"127.0.0.1:8000\"\n");
    assert_problem(&problems(&same_listener, &[]), "admin.listen", "also http.listen");
}

#[test]
fn unreadable_url_file_is_named() {
    let text =
        VALID.replace("url = \"postgres://app:secret@db.internal:5432/cruddur\"", "url_file = \"/nonexistent/pg-url\"");
    let p = problems(&text, &[]);
    assert_problem(&p, "postgres.url_file", "cannot read /nonexistent/pg-url: no such file");

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let text = VALID.replace(
        "url = \"postgres://app:secret@db.internal:5432/cruddur\"",
        &format!("url_file = {:?}", empty.to_str().unwrap()),
    );
    assert_problem(&problems(&text, &[]), "postgres.url_file", "is empty");
}

#[test]
fn syntax_errors_name_the_file() {
    match load("[aws\nregion = 1", &[]) {
        Err(ConfigError::Syntax { path, .. }) => assert_eq!(path, Path::new("/etc/x/config.toml")),
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

// ---- through the binary ----------------------------------------------------------------------

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = support::bin();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn bad_config_exits_78_listing_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[aws]\nregion = 5\n[cache]\nttl = \"forever\"\n").unwrap();
    let out = run(&["--config", path.to_str().unwrap(), "ddb", "list-tables"], &[]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["aws.region", "cache.ttl", "auth.user_pool_id", "postgres.url"] {
        assert!(stderr.contains(key), "{key} missing from: {stderr}");
    }
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn missing_file_exits_78_naming_the_path_from_the_env_var() {
    let out = run(&["check"], &[("CRUDDUR_SYNCD_CONFIG", "/nonexistent/cruddur.toml")]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/cruddur.toml") && stderr.contains("no such file"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn flag_wins_over_env_var_and_env_overrides_reach_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, VALID).unwrap();
    // A bad override must fail even though the file is fine: proof the binary applies overrides.
    let out = run(
        &["--config", good.to_str().unwrap(), "ddb", "list-tables"],
        &[("CRUDDUR_SYNCD_CONFIG", "/nonexistent.toml"), ("CRUDDUR_SYNCD__CACHE__TTL", "never")],
    );
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cache.ttl") && stderr.contains("CRUDDUR_SYNCD__CACHE__TTL"), "{stderr}");
    assert!(!stderr.contains("nonexistent"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let out = run(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["ddb", "seed", "--now", "yesterday"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn projector_section_is_validated_key_by_key() {
    let c = load(VALID, &[]).unwrap().config;
    assert!(!c.projector.enabled, "the projector is opt-in");
    let text = format!(
        "{VALID}\n[projector]\nenabled = true\nlock_check_interval = \"10ms\"\nmax_attempts = 0\n\
         give_up_after = \"2d\"\ninitial_position = \"middle\"\nlease = \"5s\"\n"
    );
    let p = problems(&text, &[]);
    assert_problem(&p, "projector.lock_check_interval", "between 100ms and 10m");
    assert_problem(&p, "projector.max_attempts", "between 1 and 100");
    assert_problem(&p, "projector.give_up_after", "between 100ms and 6h");
    assert_problem(&p, "projector.initial_position", "middle");
    assert_problem(&p, "projector.lease", "unknown key");
    let ok = format!("{VALID}\n[projector]\nenabled = true\ninitial_position = \"latest\"\n");
    let c = load(&ok, &[("CRUDDUR_SYNCD__PROJECTOR__GIVE_UP_AFTER", "30s")]).unwrap().config;
    assert!(c.projector.enabled);
    assert_eq!(c.projector.initial_position, cruddur_syncd::config::InitialPosition::Latest);
    assert_eq!(c.projector.give_up_after, Duration::from_secs(30));
}

#[test]
fn fanout_keys_are_validated_each_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("nats.creds");
    std::fs::write(&creds, "not a credentials file").unwrap();
    let text = format!(
        "{VALID}\n[fanout]\nnats_url = \"http://nats:4222\"\nstream = \"has.dots\"\nsubject = \"a.*\"\nreplicas = 0\nmax_age = \"1s\"\nlock_check_interval = \"1ms\"\ncreds_file = \"{}\"\n",
        creds.display()
    );
    let p = problems(&text, &[]);
    assert_problem(&p, "fanout.nats_url", "nats://");
    assert_problem(&p, "fanout.stream", "letters");
    assert_problem(&p, "fanout.subject", "wildcards");
    assert_problem(&p, "fanout.replicas", "between 1 and 5");
    assert_problem(&p, "fanout.max_age", "between 1m and 7d");
    assert_problem(&p, "fanout.lock_check_interval", "between 100ms and 10m");
    assert_problem(&p, "fanout.creds_file", "not a NATS credentials file");
    let good = format!("{VALID}\n[fanout]\nnats_url = \"nats://a:4222, tls://b:4222\"\n");
    let c = load(&good, &[]).unwrap().config;
    assert!(c.fanout.enabled());
    assert_eq!(c.fanout.stream, "cruddur_syncd_changes");
}
