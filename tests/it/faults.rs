//! The faults the daemon promises to survive (docs/design.md, "Guarantees"), each against the real moto
//! and PostgreSQL, each ending with the convergence check of SPEC section 8: once the fault is
//! over and the stream drained, every user's conversations and every conversation's messages
//! equal a consistent Query of DynamoDB (the start-up race checks the one list it would
//! leave stale). Every test also checks that the daemon stayed up (or
//! came back) and was ready again within a bounded time.
//!
//! Faults are made for real: SIGKILL of the binary, a moto of the test's own killed and
//! restarted empty, a throwaway PostgreSQL cluster stopped, and a fault-injecting HTTP proxy
//! (`support::fault_proxy`) between the daemon and moto.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cruddur_syncd::model::{MessageGroupId, Sk};
use cruddur_syncd::store::Store;
use serde_json::Value;

use crate::support;
use crate::support::app::{conversation_rows, App, Setup};
use crate::support::daemon::Daemon;
use crate::support::fault_proxy::{Fault, FaultProxy, Rule, ANY};
use crate::support::pgcluster::PgCluster;
use crate::support::wait_until;
use crate::support::workload::{converge, ApiClient, Cast, Readers, Workload};

/// Long enough for a loaded 2-core machine; the stream normally drains in well under a second.
const CONVERGE: Duration = Duration::from_secs(60);
/// How long each outage lasts (the 10 s).
const OUTAGE: Duration = Duration::from_secs(10);
const READY: Duration = Duration::from_secs(30);

const QUERY: &str = "DynamoDB_20120810.Query";
const GET_RECORDS: &str = "DynamoDBStreams_20120810.GetRecords";
const GET_SHARD_ITERATOR: &str = "DynamoDBStreams_20120810.GetShardIterator";
const DESCRIBE_TABLE: &str = "DynamoDB_20120810.DescribeTable";

/// Where every in-process fault test starts: a daemon, a cast of users and conversations, and a
/// first workload written and converged, so the fault hits a warm cache.
struct Scene {
    app: App,
    cast: Arc<Cast>,
    api: ApiClient,
    store: Store,
    workload: Arc<Workload>,
}

impl Scene {
    /// `cast`: name prefix, users, conversations, seed; `writes`: the first workload's size.
    async fn start(setup: Setup, (prefix, users, groups, seed): (&str, usize, usize, u64), writes: usize) -> Scene {
        let app = App::start_with(setup).await;
        let cast = Arc::new(Cast::new(&app, prefix, users, groups, seed).await);
        let (api, store) = (app.api_client(), app.store());
        let workload = Arc::new(Workload::new(cast.clone(), 4));
        workload.run(&store, writes).await;
        converge(&api, &store, &cast, CONVERGE).await;
        Scene { app, cast, api, store, workload }
    }
}

/// A setup whose DynamoDB and Streams traffic goes through `proxy`.
fn through(proxy: &FaultProxy) -> Setup {
    Setup { dynamodb_endpoint: Some(proxy.url.clone()), streams_endpoint: Some(proxy.url.clone()), ..Setup::default() }
}

async fn status(http: &reqwest::Client, url: &str) -> u16 {
    http.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// GET as `token`: the status and the JSON body (Null when there is none).
async fn api_get(api: &ApiClient, path: &str, token: &str) -> (u16, Value) {
    let res = api.get(path, token).await;
    let code = res.status().as_u16();
    (code, res.json().await.unwrap_or(Value::Null))
}

/// Asserts a 503 `unavailable` answer, the one a client may retry.
fn assert_unavailable(what: &str, (code, body): (u16, Value)) {
    assert_eq!(code, 503, "{what}: {body}");
    assert_eq!(body["error"], "unavailable", "{what}: {body}");
}

/// No answer of the workload's readers was a 5xx other than 503 (a dropped connection counts
/// as 0 and is allowed only where the test says so).
fn assert_no_server_errors(seen: &std::collections::BTreeMap<u16, usize>, allow_dropped: bool) {
    for (code, n) in seen {
        let ok = *code < 500 && (*code != 0 || allow_dropped) || *code == 503;
        assert!(ok, "{n} answers with status {code} during the fault: {seen:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// SIGKILL

/// Listen addresses fixed before the first start, so that clients find the restarted daemon
/// where the killed one was (as behind a systemd unit or a Kubernetes Service).
fn fix_ports(config: &std::path::Path) {
    let mut doc: toml::Table = std::fs::read_to_string(config).unwrap().parse().unwrap();
    for (section, port) in [("http", support::free_port()), ("admin", support::free_port())] {
        let table = doc.get_mut(section).and_then(|v| v.as_table_mut()).unwrap();
        table.insert("listen".into(), toml::Value::String(format!("127.0.0.1:{port}")));
    }
    std::fs::write(config, toml::to_string(&doc).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_mid_workload_then_restart_converges() {
    let app = App::start_with(Setup { external_daemon: true, ..Setup::default() }).await;
    fix_ports(&app.config_path);
    let cast = Arc::new(Cast::new(&app, "kill", 6, 10, 1).await);
    let store = app.store();
    let daemon = Daemon::spawn(&app.config_path, &[]).await;
    daemon.wait_ready().await;
    let api = ApiClient::new(&daemon.api);
    let workload = Arc::new(Workload::new(cast.clone(), 4));
    workload.run(&store, 60).await;
    // Every key cached before the kill.
    converge(&api, &store, &cast, CONVERGE).await;

    let readers = Readers::start(&api, cast.clone(), 3);
    let writing = {
        let (workload, store) = (workload.clone(), store.clone());
        tokio::spawn(async move { workload.run(&store, 300).await })
    };
    wait_until(Duration::from_secs(60), "the workload is under way", || async {
        workload.done.load(std::sync::atomic::Ordering::Relaxed) >= 160
    })
    .await;
    let log = daemon.kill9();
    assert!(!log.contains("panicked"), "{log}");
    let killed_at = Instant::now();

    // The same config, the same addresses: a supervisor's restart.
    let daemon = Daemon::spawn(&app.config_path, &[]).await;
    assert_eq!(daemon.api, api.base, "the restarted daemon listens where the killed one did");
    daemon.wait_ready().await;
    let back_after = killed_at.elapsed();
    writing.await.unwrap();
    let seen = readers.stop().await;
    // Connections cut by the kill (0) are expected; nothing else but 200 and 503.
    assert_no_server_errors(&seen, true);
    assert!(seen.get(&200).copied().unwrap_or(0) > 0, "{seen:?}");

    let took = converge(&api, &store, &cast, CONVERGE).await;
    println!("kill9: ready again {back_after:?} after SIGKILL, converged {took:?} after the writes; reads {seen:?}");
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    app.stop().await;
}

/// The API serves from start, before the tailer holds LATEST (readiness says so). A list loaded
/// then, and changed by a write before LATEST is held, is changed in no record the daemon will
/// read: it must not be kept. (The cause of a stale window after a restart under load.)
#[tokio::test]
async fn a_list_loaded_before_the_stream_is_positioned_is_not_kept() {
    let proxy = FaultProxy::start(&support::moto_url()).await;
    // The tailer's GetShardIterator is held: the daemon serves but is not positioned.
    proxy.inject(Rule::on(GET_SHARD_ITERATOR, Fault::Hang));
    let app =
        App::start_with(Setup { external_daemon: true, streams_endpoint: Some(proxy.url.clone()), ..Setup::default() })
            .await;
    let (a, b) = (app.user("early-a", None, true).await, app.user("early-b", None, true).await);
    let group = MessageGroupId(uuid::Uuid::new_v4());
    let old = conversation_rows(group, Sk::parse("2024-05-01T10:00:00+00:00").unwrap(), &a, &b, "old");
    for row in &old {
        app.put_group(row).await;
    }
    let daemon = Daemon::spawn(&app.config_path, &[]).await;
    let api = ApiClient::new(&daemon.api);
    wait_until(READY, "the tailer asks for its iterator", || async { proxy.injected(GET_SHARD_ITERATOR) > 0 }).await;
    let ready: Value = daemon.http.get(format!("{}/readyz", daemon.admin)).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        ready["checks"]["stream"], "the stream tailer has not yet positioned itself on every open shard",
        "{ready}"
    );
    assert_eq!(ready["status"], "not_ready", "{ready}");
    assert_eq!(ready["checks"]["postgres"], "ok", "the premise: only the stream is not ready: {ready}");
    let (code, list) = api_get(&api, "/api/message_groups", &a.access_token).await;
    assert_eq!((code, list[0]["message"].as_str()), (200, Some("old")), "loaded before the position: {list}");
    let hits = || async {
        let text = daemon.metrics().await;
        support::metric(&text, "cruddur_syncd_cache_requests_total", &["cache=\"groups\",result=\"hit\""])
    };
    let hits_before = hits().await;
    assert_eq!(api_get(&api, "/api/message_groups", &a.access_token).await.0, 200);
    assert!(hits().await > hits_before, "the premise: the list loaded before the position is cached");

    // The Lambda's move of alice's row, before the tailer holds LATEST.
    app.delete(format!("GRP#{}", a.uuid), &old[0].sk).await;
    let new = conversation_rows(group, Sk::parse("2024-05-01T10:05:00+00:00").unwrap(), &a, &b, "new");
    app.put_group(&new[0]).await;
    proxy.clear();
    daemon.wait_ready().await;

    let (code, list) = api_get(&api, "/api/message_groups", &a.access_token).await;
    assert_eq!((code, list[0]["message"].as_str()), (200, Some("new")), "served once ready: {list}");
    let text = daemon.metrics().await;
    assert!(text.contains("cruddur_syncd_stream_resyncs_total"), "{text}");
    assert_eq!(support::metric(&text, "cruddur_syncd_stream_resyncs_total", &[]), 0.0, "a start is no resync");
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// moto restarted

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moto_restart_new_stream_arn_flushes_and_converges() {
    let mut moto = support::spawn_moto();
    let app = App::start_with(Setup { table_moto: Some(moto.url()), ..Setup::default() }).await;
    let cast = Arc::new(Cast::new(&app, "moto", 6, 10, 2).await);
    let (api, store) = (app.api_client(), app.store());
    let workload = Workload::new(cast.clone(), 4);
    workload.run(&store, 120).await;
    converge(&api, &store, &cast, CONVERGE).await;
    let mut items = Vec::new();
    store.scan(None, |i| items.push(i)).await.unwrap();
    assert!(!items.is_empty());
    let resyncs = || app.metric("cruddur_syncd_stream_resyncs_total", &[]);
    let before = resyncs().await;

    // moto dies and comes back empty: no table, no stream.
    tokio::task::block_in_place(|| moto.restart());
    wait_until(READY, "the daemon flushes its caches", || async { resyncs().await > before }).await;
    let flushed = resyncs().await;
    // Ready once is ready until shutdown: the lost stream is reported, the pod stays in service.
    let readyz = format!("{}/readyz", app.admin);
    let check = |name: &'static str| {
        let (http, readyz) = (app.http.clone(), readyz.clone());
        async move {
            let res = http.get(&readyz).send().await.unwrap();
            let code = res.status().as_u16();
            let body: Value = res.json().await.unwrap();
            (code, body["checks"][name].as_str().unwrap_or_default().to_string())
        }
    };
    wait_until(READY, "/readyz reports the stream degraded", || async {
        check("stream").await.1.starts_with("degraded")
    })
    .await;
    let (code, dynamodb) = check("dynamodb").await;
    assert_eq!(code, 200, "a lost stream does not make the daemon unready");
    assert!(dynamodb.contains("does not exist"), "the missing table is named: {dynamodb}");
    assert_eq!(status(&app.http, &format!("{}/livez", app.admin)).await, 200);
    // Nothing is cached any more, and the table is gone: a 503, never a stale answer or a 500.
    let user = &cast.users[0];
    assert_unavailable(
        "a read while the table is missing",
        api_get(&api, "/api/message_groups", &user.access_token).await,
    );

    // The state is rebuilt: the table (a new stream ARN), every item, then more writes.
    let cfg = &app.loaded.config;
    cruddur_syncd::tools::ddb::schema_load(cfg, &store, &mut cruddur_syncd::tools::JsonLines::new(Vec::new()))
        .await
        .unwrap();
    for item in items {
        store.client().put_item().table_name(store.table()).set_item(Some(item)).send().await.unwrap();
    }
    wait_until(READY, "the daemon is positioned on the new stream", || async { check("stream").await.1 == "ok" }).await;
    workload.run(&store, 100).await;
    let took = converge(&api, &store, &cast, CONVERGE).await;
    // One flush for losing the stream, one for the new one (records written before the tailer
    // held a position on it may have been loaded into the cache and missed by the stream).
    let after = resyncs().await;
    assert!(after >= before + 2.0, "stream_resyncs_total went {before} -> {flushed} -> {after}");
    println!(
        "moto restart: stream_resyncs_total {before} -> {flushed} -> {after}; converged {took:?} after the writes"
    );
    app.stop().await;
    drop(moto);
}

// ---------------------------------------------------------------------------------------------
// one gap, one flush, one count

/// A replaced stream (moto cannot disable and re-enable one, so the scripted source plays the
/// stream here) fed into the daemon's real cache: the cache is flushed, and
/// `stream_resyncs_total` counts the gap once (the tailer counts what it reports; the cache
/// does not count the flush again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_stream_flushes_the_real_cache_and_counts_one_resync() {
    use cruddur_syncd::config::StreamConfig;
    use cruddur_syncd::stream::scripted::ScriptedSource;
    use cruddur_syncd::stream::Tailer;

    let app = App::start().await;
    let api = app.api_client();
    let running = app.running.as_ref().unwrap();
    let source = Arc::new(ScriptedSource::new("arn:scripted/1", &["s-0"]));
    let cfg =
        StreamConfig { poll_interval: Duration::from_millis(50), shard_sync_interval: Duration::from_millis(200) };
    let tailer = Tailer::new(source.clone(), "scripted", cfg, running.metrics.clone());
    let status = tailer.status();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(tailer.run(running.cache.clone(), stop.clone()));
    wait_until(READY, "the scripted tailer is positioned", || {
        let ok = status.borrow().positioned;
        async move { ok }
    })
    .await;
    let token = app.user("gapreader", None, true).await.access_token;
    assert_eq!(api_get(&api, "/api/message_groups", &token).await.0, 200);
    let misses = || app.metric("cruddur_syncd_cache_requests_total", &["cache=\"groups\"", "result=\"miss\""]);
    let missed = misses().await;
    assert_eq!(api_get(&api, "/api/message_groups", &token).await.0, 200);
    assert_eq!(misses().await, missed, "the second read is a hit");
    let resyncs = || app.metric("cruddur_syncd_stream_resyncs_total", &[]);
    let before = resyncs().await;

    source.replace_stream("arn:scripted/2", &["t-0"]);
    wait_until(READY, "the tailer is positioned on the new stream", || {
        let s = status.borrow();
        let ok = s.positioned && s.stream_arn.as_deref() == Some("arn:scripted/2");
        async move { ok }
    })
    .await;
    assert_eq!(resyncs().await, before + 1.0);
    assert_eq!(api_get(&api, "/api/message_groups", &token).await.0, 200);
    assert_eq!(misses().await, missed + 1.0, "the cache was flushed: the read after the gap is a miss");
    stop.cancel();
    task.await.unwrap();
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// DynamoDB unreachable

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_unreachable_hits_served_misses_503_then_converges() {
    let proxy = FaultProxy::start(&support::moto_url()).await;
    let Scene { app, cast, api, store, workload } = Scene::start(through(&proxy), ("ddb", 6, 10, 3), 150).await;
    let late = app.user("latecomer", None, true).await;

    // A black hole: requests reach nothing and get no answer.
    proxy.inject(Rule::on(ANY, Fault::Hang));
    let started = Instant::now();
    let writing = {
        let (workload, store) = (workload.clone(), store.clone());
        tokio::spawn(async move { workload.run(&store, 100).await })
    };
    let miss = {
        let (api, token) = (api.clone(), late.access_token.clone());
        tokio::spawn(async move { api_get(&api, "/api/message_groups", &token).await })
    };
    let livez = format!("{}/livez", app.admin);
    let mut rounds = 0;
    while started.elapsed() < OUTAGE {
        for (g, a, _) in cast.groups.iter().take(4) {
            let token = &cast.users[*a].access_token;
            assert_eq!(api_get(&api, "/api/message_groups", token).await.0, 200, "a cached list during the outage");
            assert_eq!(api_get(&api, &format!("/api/messages/{g}"), token).await.0, 200, "cached messages");
        }
        assert_eq!(status(&app.http, &livez).await, 200, "/livez during the outage");
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_unavailable("a miss during the outage", miss.await.unwrap());
    assert!(rounds >= 5, "{rounds}");
    // The tailer kept trying (its calls hang until their attempt timeout, `aws.call_timeout`).
    assert!(proxy.injected(GET_RECORDS) > 0, "the tailer did not read during the outage");
    let hung = proxy.injected(ANY);

    proxy.clear();
    writing.await.unwrap();
    wait_until(READY, "the miss is served once DynamoDB is back", || async {
        api_get(&api, "/api/message_groups", &late.access_token).await.0 == 200
    })
    .await;
    let took = converge(&api, &store, &cast, CONVERGE).await;
    println!("dynamodb unreachable: {rounds} rounds of hits, {hung} requests held, converged {took:?} after");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL stopped

async fn reconcile_runs(app: &App, result: &str) -> f64 {
    app.metric("cruddur_syncd_reconcile_runs_total", &[&format!("result=\"{result}\"")]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_cached_users_served_new_users_503_reconcile_retries() {
    let mut cluster = tokio::task::block_in_place(PgCluster::start);
    let Scene { app, cast, api, store, workload } = Scene::start(
        Setup {
            postgres_url: Some(cluster.url("postgres")),
            extra_config: "[reconcile]\ninterval = \"2s\"\njitter = \"0s\"\ncognito_max_rps = 50\n".into(),
            ..Setup::default()
        },
        ("pg", 4, 6, 4),
        100,
    )
    .await;
    let newcomer = app.user("newcomer", None, true).await;
    wait_until(READY, "a scheduled reconcile succeeds", || async { reconcile_runs(&app, "success").await >= 1.0 })
        .await;
    let failures_before = reconcile_runs(&app, "failure").await;

    tokio::task::block_in_place(|| cluster.stop());
    let started = Instant::now();
    let writing = {
        let (workload, store) = (workload.clone(), store.clone());
        tokio::spawn(async move { workload.run(&store, 100).await })
    };
    let first = {
        let (api, token) = (api.clone(), newcomer.access_token.clone());
        tokio::spawn(async move { api_get(&api, "/api/message_groups", &token).await })
    };
    let livez = format!("{}/livez", app.admin);
    while started.elapsed() < OUTAGE {
        for u in &cast.users {
            assert_eq!(api_get(&api, "/api/message_groups", &u.access_token).await.0, 200, "a known user");
        }
        assert_eq!(status(&app.http, &livez).await, 200, "/livez while PostgreSQL is down");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_unavailable("a new user's first request", first.await.unwrap());
    wait_until(READY, "a reconcile fails and is counted", || async {
        reconcile_runs(&app, "failure").await > failures_before
    })
    .await;

    tokio::task::block_in_place(|| cluster.resume());
    let successes = reconcile_runs(&app, "success").await;
    wait_until(READY, "the new user is served", || async {
        api_get(&api, "/api/message_groups", &newcomer.access_token).await.0 == 200
    })
    .await;
    wait_until(READY, "the next reconcile succeeds", || async { reconcile_runs(&app, "success").await > successes })
        .await;
    writing.await.unwrap();
    let took = converge(&api, &store, &cast, CONVERGE).await;
    let failures = reconcile_runs(&app, "failure").await - failures_before;
    println!("postgres down: {failures} reconcile failures counted, converged {took:?} after");
    app.stop().await;
    drop(cluster);
}

/// A sidecar's readiness is its app's: PostgreSQL stopped for 40 s must not take the pod out.
/// `/readyz` stays 200 naming postgres degraded; a provisioned user whose mapping passed
/// `cache.users_ttl` during the outage is still served (stale-if-error); a sub never looked up
/// gets 503 `unavailable`, not 403; once PostgreSQL is back the gauge says 1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_40s_readiness_holds_and_known_users_are_served() {
    const PG_OUTAGE: Duration = Duration::from_secs(40);
    let mut cluster = tokio::task::block_in_place(PgCluster::start);
    let app = App::start_with(Setup {
        postgres_url: Some(cluster.url("postgres")),
        extra_config: "[cache]\nusers_ttl = \"2s\"\n".into(),
        ..Setup::default()
    })
    .await;
    let api = app.api_client();
    let known = app.user("pg40-known", None, true).await;
    let unknown = app.user("pg40-unknown", None, true).await;
    assert_eq!(api_get(&api, "/api/message_groups", &known.access_token).await.0, 200);
    let up = || app.metric("cruddur_syncd_dependency_up", &["dependency=\"postgres\""]);
    let stale_users = || app.metric("cruddur_syncd_cache_requests_total", &["cache=\"users\",result=\"stale\""]);
    assert_eq!(up().await, 1.0);
    let readyz = format!("{}/readyz", app.admin);

    tokio::task::block_in_place(|| cluster.stop());
    let started = Instant::now();
    let mut degraded_seen = None;
    let mut aged = false;
    while started.elapsed() < PG_OUTAGE {
        let res = app.http.get(&readyz).send().await.unwrap();
        let code = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        assert_eq!(code, 200, "/readyz {:?} into the outage: {body}", started.elapsed());
        let postgres = body["checks"]["postgres"].as_str().unwrap_or_default().to_string();
        if postgres.starts_with("degraded") {
            degraded_seen.get_or_insert(postgres);
        }
        let res = app.get("/api/message_groups", &known.access_token).await;
        assert_eq!(res.status(), 200, "the known user {:?} into the outage", started.elapsed());
        aged |= res.headers().contains_key("age");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let degraded = degraded_seen.expect("/readyz named postgres degraded during the outage");
    assert!(degraded.contains("did not answer"), "{degraded}");
    assert_eq!(up().await, 0.0, "dependency_up{{postgres}} during the outage");
    assert!(stale_users().await > 0.0, "the known user's mapping passed users_ttl and was served stale");
    assert!(aged, "an answer made from a stale mapping carries Age");
    assert_unavailable("a sub never looked up", api_get(&api, "/api/message_groups", &unknown.access_token).await);

    tokio::task::block_in_place(|| cluster.resume());
    wait_until(READY, "dependency_up{postgres} is 1 again", || async { up().await == 1.0 }).await;
    wait_until(READY, "the newcomer is served", || async {
        api_get(&api, "/api/message_groups", &unknown.access_token).await.0 == 200
    })
    .await;
    // A failed reload waits a few seconds before the next try; then the mapping is fresh.
    wait_until(READY, "the known user's answers carry no Age", || async {
        let res = app.get("/api/message_groups", &known.access_token).await;
        res.status() == 200 && !res.headers().contains_key("age")
    })
    .await;
    println!("postgres down 40s: /readyz 200 throughout, first degraded report: {degraded}");
    app.stop().await;
    drop(cluster);
}

// ---------------------------------------------------------------------------------------------
// throttling and 5xx storms

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttling_storm_on_the_stream_backs_off_then_converges() {
    let proxy = FaultProxy::start(&support::moto_url()).await;
    let Scene { app, cast, api, store, workload } = Scene::start(through(&proxy), ("storm", 6, 10, 5), 100).await;
    let throttled = || app.metric("cruddur_syncd_stream_errors_total", &["kind=\"throttled\""]);
    let before = throttled().await;

    // A storm that ends by itself, on the stream's reads: throttling, then 500s, then dropped
    // connections, then slow answers; and 500s on the tailer's DescribeTable. The SDK makes 3
    // attempts a call, so every 3 faults in a row are one failed call the tailer backs off from
    // (the backoff doubles per failed call: a longer storm mostly measures the backoff).
    let storm = [
        (Fault::Throttling, 9),
        (Fault::ProvisionedThroughputExceeded, 3),
        (Fault::InternalServerError, 6),
        (Fault::Drop, 3),
        (Fault::Delay(Duration::from_millis(800)), 3),
    ];
    let total: u64 = storm.iter().map(|(_, n)| n).sum();
    for (fault, n) in storm {
        proxy.inject(Rule::on(GET_RECORDS, fault).times(n));
    }
    proxy.inject(Rule::on(DESCRIBE_TABLE, Fault::InternalServerError).times(6));
    let readers = Readers::start(&api, cast.clone(), 2);
    workload.run(&store, 200).await;
    wait_until(Duration::from_secs(90), "the storm has blown over", || async { proxy.injected(GET_RECORDS) >= total })
        .await;
    let seen = readers.stop().await;
    assert_no_server_errors(&seen, false);
    let after = throttled().await;
    assert!(after > before, "no throttling reached the tailer ({before} -> {after})");
    assert_eq!(status(&app.http, &format!("{}/livez", app.admin)).await, 200);

    let took = converge(&api, &store, &cast, CONVERGE).await;
    println!(
        "stream storm: {} faults injected on GetRecords, {} on DescribeTable; stream_errors_total{{kind=\"throttled\"}} {before} -> {after}; converged {took:?} after",
        proxy.injected(GET_RECORDS),
        proxy.injected(DESCRIBE_TABLE)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn query_storm_misses_are_503_never_500_then_converges() {
    let proxy = FaultProxy::start(&support::moto_url()).await;
    let Scene { app, cast, api, store, workload } = Scene::start(through(&proxy), ("qstorm", 4, 6, 6), 100).await;
    let late = app.user("latecomer", None, true).await;
    let (g, a, _) = cast.groups[0];
    let cached = &cast.users[a];

    for fault in [Fault::Throttling, Fault::ProvisionedThroughputExceeded, Fault::InternalServerError, Fault::Drop] {
        proxy.clear();
        proxy.inject(Rule::on(QUERY, fault.clone()));
        let before = proxy.injected(QUERY);
        assert_unavailable(
            &format!("a miss while every Query gets {fault:?}"),
            api_get(&api, "/api/message_groups", &late.access_token).await,
        );
        assert!(proxy.injected(QUERY) > before, "the miss did not reach the proxy");
        // Hits never touch DynamoDB.
        assert_eq!(api_get(&api, "/api/message_groups", &cached.access_token).await.0, 200);
        assert_eq!(api_get(&api, &format!("/api/messages/{g}"), &cached.access_token).await.0, 200);
    }
    // A storm that only hits one Query in three is ridden out by the SDK's retries.
    proxy.clear();
    proxy.inject(Rule::on(QUERY, Fault::Throttling).one_in(3));
    let (code, body) = api_get(&api, "/api/message_groups", &late.access_token).await;
    assert_eq!(code, 200, "{body}");

    proxy.clear();
    workload.run(&store, 100).await;
    let took = converge(&api, &store, &cast, CONVERGE).await;
    println!("query storm: {} faults injected on Query; converged {took:?} after", proxy.injected(QUERY));
    app.stop().await;
}
