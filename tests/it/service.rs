//! Running as a service: the real binary under a fake systemd (a `NOTIFY_SOCKET` datagram socket
//! of the test's own), live reload through the file and SIGHUP, bounded shutdown, exit codes.
//! Everything runs against the real moto and PostgreSQL; slowness and hangs are made for real
//! with the fault-injecting HTTP proxy (`support::fault_proxy`) in front of moto.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cruddur_syncd::config;
use cruddur_syncd::model::{MessageGroup, MessageGroupId, Sk, UserUuid};
use cruddur_syncd::store::Store;
use cruddur_syncd::tools::{self, JsonLines};

use crate::support;
use crate::support::daemon::Daemon;
use crate::support::fault_proxy::{Fault, FaultProxy, Rule, ANY};
use crate::support::metric;
use crate::support::TestDb;

const GET_RECORDS: &str = "DynamoDBStreams_20120810.GetRecords";

/// A Cognito pool with one provisioned user, a database, a table and a config file.
struct Fixture {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// The config as written at start, to derive variants from.
    base: toml::Table,
    token: String,
    /// The token's user (`users.uuid`).
    user: uuid::Uuid,
    store: Store,
    db: Option<TestDb>,
}

impl Fixture {
    /// `extra`: TOML sections merged key by key into the base config.
    async fn new(extra: &str) -> Fixture {
        let moto = support::moto_url();
        let sdk = support::sdk_config(&moto).await;
        let cognito = support::cognito_client(&sdk);
        let pool_id = support::create_pool(&cognito, "svc-").await;
        let client_id = support::create_app_client(&cognito, &pool_id, "svc-test").await;
        let db = TestDb::create().await;
        let pg = sqlx::PgPool::connect(&db.url).await.unwrap();
        sqlx::raw_sql(tools::db::SCHEMA).execute(&pg).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let table = support::unique("svc-");
        let path = support::write_config(dir.path(), &moto, &table, &db.url, &pool_id, &client_id);
        let mut doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        support::merge_config(
            &mut doc,
            "[stream]\npoll_interval = \"100ms\"\nshard_sync_interval = \"2s\"\n[log]\nlevel = \"info\"\n",
        );
        support::merge_config(&mut doc, extra);
        std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
        let loaded = config::load(&path).unwrap();
        let store = Store::new(support::ddb_client(&sdk), table, moto.clone());
        tools::ddb::schema_load(&loaded.config, &store, &mut JsonLines::new(Vec::new())).await.unwrap();

        // One user with a token and a users row, so that API requests go all the way through.
        let handle = "svcuser";
        let signed_in = support::sign_up(&cognito, &pool_id, &client_id, handle, &[]).await;
        let user = uuid::Uuid::new_v4();
        sqlx::query("INSERT INTO public.users (uuid, display_name, handle, email, cognito_user_id) VALUES ($1, 'S', $2, 's@example.com', $3)")
            .bind(user)
            .bind(handle)
            .bind(&signed_in.sub)
            .execute(&pg)
            .await
            .unwrap();
        pg.close().await;
        Fixture { dir, config: path, base: doc, token: signed_in.access_token, user, store, db: Some(db) }
    }

    /// The base config with `extra` merged in, as TOML text.
    fn variant(&self, extra: &str) -> String {
        let mut doc = self.base.clone();
        support::merge_config(&mut doc, extra);
        toml::to_string(&doc).unwrap()
    }

    async fn finish(mut self) {
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
    }
}

/// What a fake systemd received on its notify socket, datagram by datagram, line by line.
struct NotifySocket {
    path: PathBuf,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let now = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut l = sink.lock().unwrap();
                l.extend(text.lines().map(|line| (now, line.to_string())));
            }
        });
        NotifySocket { path, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().iter().map(|(_, l)| l.clone()).collect()
    }

    fn times_of(&self, prefix: &str) -> Vec<Instant> {
        self.lines.lock().unwrap().iter().filter(|(_, l)| l.starts_with(prefix)).map(|(t, _)| *t).collect()
    }

    fn position(&self, prefix: &str) -> Option<usize> {
        self.lines().iter().position(|l| l.starts_with(prefix))
    }

    async fn wait_for(&self, prefix: &str, deadline: Duration) {
        let what = format!("{prefix} arrives on the notify socket");
        support::wait_until(deadline, &what, || async { self.position(prefix).is_some() }).await;
    }
}

// ---------------------------------------------------------------------------------------------
// systemd notify protocol

#[tokio::test(flavor = "multi_thread")]
async fn notify_socket_gets_ready_status_watchdog_then_stopping() {
    let fx = Fixture::new("").await;
    let sock = NotifySocket::bind(fx.dir.path());
    let path = sock.path.to_str().unwrap().to_string();
    let daemon = Daemon::spawn(&fx.config, &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "2000000")]).await;
    sock.wait_for("WATCHDOG=1", Duration::from_secs(30)).await;
    // READY only once the tailer is positioned, i.e. /readyz agrees by then.
    let ready = daemon.http.get(format!("{}/readyz", daemon.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready_at = sock.position("READY=1").expect("READY=1");
    let status_at = sock.position("STATUS=serving;").expect("a STATUS=serving line");
    let watchdog_at = sock.position("WATCHDOG=1").unwrap();
    assert!(ready_at < status_at && status_at < watchdog_at, "{:?}", sock.lines());
    let status = &sock.lines()[status_at];
    assert!(status.contains("1 shard;") && status.contains("cached group"), "{status}");
    // At half of WATCHDOG_USEC (1 s): a few more within 4 s.
    let before = sock.times_of("WATCHDOG=1").len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let more = sock.times_of("WATCHDOG=1").len() - before;
    assert!((2..=6).contains(&more), "{more} WATCHDOG=1 in 4s: {:?}", sock.lines());

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let lines = sock.lines();
    let stopping_at = lines.iter().position(|l| l == "STOPPING=1").unwrap_or_else(|| panic!("{lines:?}"));
    assert!(stopping_at > watchdog_at);
    assert!(!lines[stopping_at..].iter().any(|l| l == "WATCHDOG=1" || l == "READY=1"), "{lines:?}");
    fx.finish().await;
}

/// DynamoDB Streams stops answering (the proxy holds every request: a black hole) for longer
/// than one turn of the stream loop lasts then: with the default `aws.call_timeout` (10 s, three
/// attempts) a GetRecords takes about 33 s to fail. The loop is slow, not stuck, and a restart
/// would only lose the cache: the watchdog pings go on, `/livez` stays 200, the API keeps
/// serving, and a change written during the outage arrives through the stream afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_streams_outage_longer_than_a_turn_is_not_a_stuck_daemon() {
    const OUTAGE: Duration = Duration::from_secs(45);
    let proxy = FaultProxy::start(&support::moto_url()).await;
    let fx = Fixture::new(&format!("[aws]\nstreams_endpoint_url = \"{}\"\n", proxy.url)).await;
    let sock = NotifySocket::bind(fx.dir.path());
    let path = sock.path.to_str().unwrap().to_string();
    let daemon = Daemon::spawn(&fx.config, &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "2000000")]).await;
    sock.wait_for("WATCHDOG=1", Duration::from_secs(30)).await;
    let (client, url) = (reqwest::Client::new(), format!("{}/api/message_groups", daemon.api));
    let groups = || async {
        let res = client.get(&url).bearer_auth(&fx.token).send().await.unwrap();
        assert_eq!(res.status(), 200);
        res.json::<Vec<serde_json::Value>>().await.unwrap()
    };
    assert!(groups().await.is_empty(), "the user starts with no conversation (now cached)");

    proxy.inject(Rule::on(ANY, Fault::Hang));
    let outage = Instant::now();
    // A GetRecords already past the proxy comes back at once; only then is the change written,
    // so that nothing can carry it before the outage ends.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let group = MessageGroupId(uuid::Uuid::new_v4());
    let row = MessageGroup {
        owner: UserUuid(fx.user),
        sk: Sk::from_instant(chrono::Utc::now()),
        message_group_uuid: group,
        message: "written during the outage".into(),
        user_uuid: UserUuid(uuid::Uuid::new_v4()),
        user_display_name: "Other".into(),
        user_handle: "other".into(),
    };
    fx.store.put_if_absent(row.to_item()).await.unwrap();
    let livez = format!("{}/livez", daemon.admin);
    while outage.elapsed() < OUTAGE {
        let res = daemon.http.get(&livez).send().await.unwrap();
        let (code, body) = (res.status(), res.text().await.unwrap());
        assert_eq!(code, 200, "/livez {:?} into the outage: {body}", outage.elapsed());
        assert!(groups().await.is_empty(), "served from the cache; the change has not arrived yet");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let held = proxy.injected(GET_RECORDS);
    assert!(held >= 3, "the tailer kept calling GetRecords (each attempt held until it timed out): {held}");
    let pings: Vec<Instant> = sock.times_of("WATCHDOG=1").into_iter().filter(|t| *t > outage).collect();
    let longest = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(OUTAGE);
    assert!(pings.len() >= 30 && longest < Duration::from_secs(3), "{} pings, longest gap {longest:?}", pings.len());
    assert!(!daemon.log_text().contains("withholding watchdog pings"), "{}", daemon.log_text());

    proxy.clear();
    support::wait_until(Duration::from_secs(60), "the change written during the outage is served", || async {
        groups().await.iter().any(|g| g["uuid"] == group.0.to_string())
    })
    .await;
    println!(
        "streams outage: {held} GetRecords held, {} pings in {OUTAGE:?} (longest gap {longest:?}); caught up {:?} after",
        pings.len(),
        outage.elapsed() - OUTAGE
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    fx.finish().await;
}

// ---------------------------------------------------------------------------------------------
// live reload

#[derive(Clone, Copy, Debug, PartialEq)]
enum How {
    /// Truncate and write the same file (same inode).
    Edit,
    /// Write a temporary file beside it and rename it over the config (editors, config tools).
    Replace,
    /// Edit a file the watcher cannot see (the config path is a symlink into another
    /// directory), then SIGHUP: only the signal can trigger this reload.
    Sighup,
}

const BAD: &str = r#"
[http]
cors_allowed_origins = ["http://b.example", "not an origin"]
[stream]
poll_interval = "0s"
[cache]
bogus = 1
"#;

async fn reload_scenario(how: How) {
    let fx = Fixture::new("").await;
    // For SIGHUP the config path is a symlink into a directory nobody watches.
    let (config_path, target) = if how == How::Sighup {
        let elsewhere = fx.dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let target = elsewhere.join("real.toml");
        std::fs::copy(&fx.config, &target).unwrap();
        let link = fx.dir.path().join("linked.toml");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        (link, target)
    } else {
        (fx.config.clone(), fx.config.clone())
    };
    let mut daemon = Daemon::spawn(&config_path, &[]).await;
    daemon.wait_ready().await;
    let write = |text: &str| match how {
        How::Edit | How::Sighup => std::fs::write(&target, text).unwrap(),
        How::Replace => {
            let tmp = target.with_extension("toml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &target).unwrap();
        }
    };
    let poke = |daemon: &Daemon| {
        if how == How::Sighup {
            daemon.signal("-HUP");
        }
    };
    assert!(!daemon.allows_origin("http://a.example").await);
    assert_eq!(daemon.reloads("success").await, 0.0);

    // 1. valid: a new origin, a quieter log level, and a key that needs a restart
    write(&fx.variant(
        "[http]\ncors_allowed_origins = [\"http://a.example\"]\nrequest_timeout = \"7s\"\n[log]\nlevel = \"warn\"\n",
    ));
    poke(&daemon);
    daemon.wait_reloads("success", 1.0).await;
    assert!(daemon.allows_origin("http://a.example").await, "{}", daemon.log_text());
    assert!(!daemon.allows_origin("http://b.example").await);
    daemon
        .wait_log("restart required is named", Duration::from_secs(5), |l| {
            l.contains("restart required: http.request_timeout")
        })
        .await;

    // 2. invalid: every problem logged, nothing changes
    write(&fx.variant(BAD));
    poke(&daemon);
    daemon.wait_reloads("failure", 1.0).await;
    daemon.wait_log("the last problem is logged", Duration::from_secs(5), |l| l.contains("cache.bogus")).await;
    let log = daemon.log_text();
    for key in ["http.cors_allowed_origins", "stream.poll_interval", "cache.bogus"] {
        assert!(log.lines().any(|l| l.contains("config problem") && l.contains(key)), "{key} not named:\n{log}");
    }
    assert_eq!(daemon.reloads("success").await, 1.0);
    assert!(daemon.allows_origin("http://a.example").await);
    assert!(!daemon.allows_origin("http://b.example").await);
    // level warn hid the info line of reload 1 (the failure's error lines came after it)
    assert!(!log.contains("config reloaded"), "{log}");

    // 3. valid again, back to info: the reload's own info line shows
    write(&fx.variant("[http]\ncors_allowed_origins = [\"http://c.example\"]\n[log]\nlevel = \"info\"\n"));
    poke(&daemon);
    daemon.wait_reloads("success", 2.0).await;
    daemon.wait_log("info is logged again", Duration::from_secs(5), |l| l.contains("config reloaded")).await;
    assert!(daemon.allows_origin("http://c.example").await);
    assert!(!daemon.allows_origin("http://a.example").await);
    assert_eq!(daemon.reloads("failure").await, 1.0);

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_through_in_place_edit() {
    reload_scenario(How::Edit).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_through_rename_over() {
    reload_scenario(How::Replace).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_through_sighup() {
    reload_scenario(How::Sighup).await;
}

async fn status_of(daemon: &Daemon, path: &str, token: &str) -> u16 {
    daemon.http.get(format!("{}{path}", daemon.api)).bearer_auth(token).send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_whose_jwks_cannot_be_fetched_changes_nothing() {
    let fx = Fixture::new("").await;
    let mut daemon = Daemon::spawn(&fx.config, &[]).await;
    daemon.wait_ready().await;
    assert_eq!(status_of(&daemon, "/api/message_groups", &fx.token).await, 200);

    // A new [auth] whose JWKS is unreachable, and a live key beside it.
    let dead = format!("http://127.0.0.1:{}/jwks.json", support::free_port());
    write_config(
        &fx.config,
        &fx.variant(&format!("[auth]\njwks_url = \"{dead}\"\n[http]\ncors_allowed_origins = [\"http://a.example\"]\n")),
    );
    daemon.wait_reloads("failure", 1.0).await;
    let line = daemon
        .wait_log("the refused reload says why", Duration::from_secs(5), |l| {
            l.contains("config reload") && l.contains("rejected")
        })
        .await;
    assert!(line.contains(&dead) && line.contains("JWKS"), "{line}");
    assert_eq!(daemon.reloads("success").await, 0.0);
    // Refused as a whole: the old authenticator verifies, readiness holds, CORS is unchanged.
    assert_eq!(status_of(&daemon, "/api/message_groups", &fx.token).await, 200);
    let ready = daemon.http.get(format!("{}/readyz", daemon.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    assert!(!daemon.allows_origin("http://a.example").await, "no part of the refused reload applies");

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    fx.finish().await;
}

/// Writes a config the way an editor does (a new file renamed over the old one).
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_to_another_user_pool_moves_verifier_and_reconciler_together() {
    let fx = Fixture::new("[reconcile]\ninterval = \"1s\"\njitter = \"0s\"\n").await;
    // A second pool with a user whose users row exists but is not mapped yet.
    let moto = support::moto_url();
    let cognito = support::cognito_client(&support::sdk_config(&moto).await);
    let pool2 = support::create_pool(&cognito, "svc2-").await;
    let client2 = support::create_app_client(&cognito, &pool2, "svc2-test").await;
    let newbie = support::sign_up(&cognito, &pool2, &client2, "newbie", &[("preferred_username", "newbie")]).await;
    let pg = sqlx::PgPool::connect(&fx.db.as_ref().unwrap().url).await.unwrap();
    sqlx::query(
        "INSERT INTO public.users (uuid, display_name, handle, email) VALUES ($1, 'N', 'newbie', 'n@example.com')",
    )
    .bind(uuid::Uuid::new_v4())
    .execute(&pg)
    .await
    .unwrap();

    let daemon = Daemon::spawn(&fx.config, &[]).await;
    daemon.wait_ready().await;
    assert_eq!(status_of(&daemon, "/api/message_groups", &newbie.access_token).await, 401, "another pool's token");

    let issuer = format!("https://cognito-idp.us-east-1.amazonaws.com/{pool2}");
    write_config(
        &fx.config,
        &fx.variant(&format!(
            "[auth]\nuser_pool_id = \"{pool2}\"\nclient_id = \"{client2}\"\nissuer = \"{issuer}\"\n\
         jwks_url = \"{moto}/{pool2}/.well-known/jwks.json\"\n"
        )),
    );
    daemon.wait_reloads("success", 1.0).await;
    // The verifier takes the new pool's tokens at once; the reconciler maps the new pool's users
    // at its next tick (1s), and the mapping reaches the users cache: 200.
    support::wait_until(Duration::from_secs(20), "the new pool's user is served", || async {
        status_of(&daemon, "/api/message_groups", &newbie.access_token).await == 200
    })
    .await;
    let mapped: Option<String> = sqlx::query_scalar("SELECT cognito_user_id FROM public.users WHERE handle = 'newbie'")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(mapped.as_deref(), Some(newbie.sub.as_str()));
    assert_eq!(status_of(&daemon, "/api/message_groups", &fx.token).await, 401, "the old pool's tokens are refused");
    pg.close().await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_config_keeps_the_running_config_and_says_so_once() {
    let fx = Fixture::new("[http]\ncors_allowed_origins = [\"http://a.example\"]\n").await;
    let mut daemon = Daemon::spawn(&fx.config, &[]).await;
    daemon.wait_ready().await;
    assert!(daemon.allows_origin("http://a.example").await);
    std::fs::remove_file(&fx.config).unwrap();
    daemon.wait_log("the removal is logged", Duration::from_secs(10), |l| l.contains("config file was removed")).await;
    // More events in the directory, none for a config: still one line, nothing reloaded.
    std::fs::write(fx.dir.path().join("unrelated.txt"), "x").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(daemon.allows_origin("http://a.example").await);
    assert_eq!(daemon.log().iter().filter(|l| l.contains("config file was removed")).count(), 1);
    assert_eq!(daemon.reloads("success").await + daemon.reloads("failure").await, 0.0);
    // The file comes back with a change: that is a reload like any other.
    std::fs::write(&fx.config, fx.variant("[http]\ncors_allowed_origins = [\"http://c.example\"]\n")).unwrap();
    daemon.wait_reloads("success", 1.0).await;
    assert!(daemon.allows_origin("http://c.example").await);
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    fx.finish().await;
}

// ---------------------------------------------------------------------------------------------
// shutdown and start-up

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_a_slow_request_and_refuses_new_connections() {
    let proxy = FaultProxy::start(&support::moto_url()).await;
    // A request timeout well above the proxy's delay: misses give up at 0.8 of it.
    let fx =
        Fixture::new(&format!("[aws]\ndynamodb_endpoint_url = \"{}\"\n[http]\nrequest_timeout = \"20s\"\n", proxy.url))
            .await;
    let daemon = Daemon::spawn(&fx.config, &[]).await;
    daemon.wait_ready().await;
    // A cache miss now takes a few seconds: every chunk of the Query's answer is held back.
    proxy.set_delay(Duration::from_secs(2));
    let url = format!("{}/api/message_groups", daemon.api);
    let (client, token) = (reqwest::Client::new(), fx.token.clone());
    let in_flight = tokio::spawn(async move { client.get(url).bearer_auth(token).send().await });
    let metrics_url = format!("{}/metrics", daemon.admin);
    support::wait_until(Duration::from_secs(10), "the request misses the groups cache", || async {
        let text = daemon.http.get(&metrics_url).send().await.unwrap().text().await.unwrap();
        metric(&text, "cruddur_syncd_cache_requests_total", &["cache=\"groups\",result=\"miss\""]) >= 1.0
    })
    .await;
    daemon.signal("-TERM");
    // A new connection is refused while the slow one is still being served.
    let api_addr = daemon.api.trim_start_matches("http://").to_string();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match std::net::TcpStream::connect(&api_addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ if Instant::now() > end => panic!("new connections were still accepted 5s after SIGTERM"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(!in_flight.is_finished(), "the slow request ended before new connections were refused");
    let res = in_flight.await.unwrap().expect("the in-flight request was cut off");
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body, serde_json::json!([]));
    let mut daemon = daemon;
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = daemon.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "no exit within 30s of SIGTERM:\n{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", daemon.log_text());
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_config_at_start_exits_78_naming_every_problem() {
    let fx = Fixture::new("").await;
    std::fs::write(&fx.config, fx.variant(BAD)).unwrap();
    let out = support::bin().arg("--config").arg(&fx.config).arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["http.cors_allowed_origins", "stream.poll_interval", "cache.bogus"] {
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    fx.finish().await;
}
