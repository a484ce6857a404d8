//! Fan-out through NATS JetStream (README "Fleets"): daemon processes sharing one table, one
//! PostgreSQL database and one nats-server of the test's own; real moto, real PostgreSQL.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cruddur_syncd::model::{MessageGroupId, Sk};
use uuid::Uuid;

use crate::support::app::{conversation_rows, message, App, Setup};
use crate::support::daemon::Daemon;
use crate::support::nats::NatsServer;
use crate::support::workload::{converge, ApiClient, Cast, Readers, Workload};
use crate::support::{self, wait_until};

const CONVERGE: Duration = Duration::from_secs(90);
const READY: Duration = Duration::from_secs(30);

async fn metric_of(d: &Daemon, name: &str, needles: &[&str]) -> f64 {
    support::metric(&d.metrics().await, name, needles)
}

async fn get_records_calls(d: &Daemon) -> f64 {
    metric_of(d, "cruddur_syncd_stream_get_records_calls_total", &[]).await
}

async fn is_relay(d: &Daemon) -> bool {
    metric_of(d, "cruddur_syncd_fanout_role", &["role=\"relay\""]).await == 1.0
}

/// No 5xx but 503 (and refused connections only where `dropped_ok`). A 404 is an answer: a
/// conversation whose rows are being moved (delete + put) has none for a moment.
fn assert_served(seen: &BTreeMap<u16, usize>, dropped_ok: bool) {
    for (code, n) in seen {
        let ok = (*code > 0 && *code < 500) || *code == 503 || (*code == 0 && dropped_ok);
        assert!(ok, "{n} answers with status {code}: {seen:?}");
    }
    assert!(seen.get(&200).copied().unwrap_or(0) > 0, "{seen:?}");
}

/// Five daemons on one table: one of them reads the stream (GetRecords from the instances' own
/// metrics), all of them converge under 2,000 random writes (moves by delete + put, deletes,
/// edits) with readers on every instance; the
/// relay is SIGKILLed mid-workload, another takes over within the lock interval and a poll,
/// and the fleet converges with nothing lost or resurrected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_of_five_reads_the_stream_once_and_survives_its_relay() {
    let nats = NatsServer::start();
    let app = App::start_with(Setup { external_daemon: true, extra_config: nats.config(), ..Setup::default() }).await;
    let cast = Arc::new(Cast::new(&app, "fleet", 8, 12, 7).await);
    let store = app.store();
    let mut fleet = Vec::new();
    for _ in 0..5 {
        fleet.push(Daemon::spawn(&app.config_path, &[]).await);
    }
    for d in &fleet {
        d.wait_ready().await;
    }
    let apis: Vec<ApiClient> = fleet.iter().map(|d| ApiClient::new(&d.api)).collect();
    // One writer: moto numbers the stream records of concurrent writes racily (the same
    // sequence number twice, and out of order), which DynamoDB Streams never does and which
    // defeats any dedup by sequence number; the reads and the stream stay concurrent.
    let workload = Arc::new(Workload::new(cast.clone(), 1));
    let readers: Vec<Readers> = apis.iter().map(|a| Readers::start(a, cast.clone(), 1)).collect();
    workload.run(&store, 1000).await;
    for api in &apis {
        converge(api, &store, &cast, CONVERGE).await;
    }
    let mut calls = Vec::new();
    for d in &fleet {
        calls.push(get_records_calls(d).await);
    }
    let readers_of_the_stream: Vec<usize> = (0..5).filter(|i| calls[*i] > 0.0).collect();
    assert_eq!(readers_of_the_stream.len(), 1, "GetRecords calls per instance: {calls:?}");
    let relay = readers_of_the_stream[0];
    assert!(is_relay(&fleet[relay]).await, "the instance that reads is the relay");
    for (i, d) in fleet.iter().enumerate() {
        let received = metric_of(d, "cruddur_syncd_fanout_received_total", &[]).await;
        assert!(received >= 1000.0, "instance {i} received {received} messages for 1000 writes");
    }

    // SIGKILL the relay in the middle of the next 1,000 writes.
    let writing = {
        let (workload, store) = (workload.clone(), store.clone());
        tokio::spawn(async move { workload.run(&store, 1000).await })
    };
    wait_until(Duration::from_secs(60), "the workload is under way", || async {
        workload.done.load(Ordering::Relaxed) >= 1300
    })
    .await;
    let mut readers = readers;
    let killed_readers = readers.remove(relay);
    let killed_api = apis[relay].clone();
    let log = fleet.remove(relay).kill9();
    assert!(!log.contains("panicked"), "{log}");
    let killed_at = Instant::now();
    let mut took = None;
    while took.is_none() && killed_at.elapsed() < READY {
        for d in &fleet {
            if is_relay(d).await {
                took = Some(killed_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = took.expect("another instance becomes relay");
    // lock_check_interval (500 ms) + one poll (250 ms), with slack for the metric polling and
    // a loaded machine; the figure is printed.
    assert!(took < Duration::from_secs(5), "took the relay over after {took:?}");
    writing.await.unwrap();
    let _ = killed_readers.stop().await;
    for r in readers {
        assert_served(&r.stop().await, false);
    }
    let apis: Vec<ApiClient> = apis.into_iter().filter(|a| a.base != killed_api.base).collect();
    let mut slowest = Duration::ZERO;
    for api in &apis {
        slowest = slowest.max(converge(api, &store, &cast, CONVERGE).await);
    }
    let mut readers_now = 0;
    for d in &fleet {
        readers_now += usize::from(get_records_calls(d).await > 0.0);
    }
    assert_eq!(readers_now, 1, "one reader of the stream after the failover");
    println!(
        "fleet of 5: one reader of the stream; relay SIGKILLed, taken over after {took:?}; 4 instances converged within {slowest:?}"
    );
    for d in fleet {
        let (code, log) = d.terminate().await;
        assert_eq!(code, Some(0), "{log}");
    }
    app.stop().await;
}

/// nats-server killed and restarted (same port, same store) in the middle of writes: every
/// follower flushes (`fanout_gaps_total{reason="reconnect"}`), follows again, and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_flushes_followers_which_reconnect_and_converge() {
    let mut nats = NatsServer::start();
    let app = App::start_with(Setup { external_daemon: true, extra_config: nats.config(), ..Setup::default() }).await;
    let cast = Arc::new(Cast::new(&app, "natsrestart", 6, 8, 3).await);
    let store = app.store();
    let fleet = [Daemon::spawn(&app.config_path, &[]).await, Daemon::spawn(&app.config_path, &[]).await];
    for d in &fleet {
        d.wait_ready().await;
    }
    let apis: Vec<ApiClient> = fleet.iter().map(|d| ApiClient::new(&d.api)).collect();
    // One writer: moto numbers the stream records of concurrent writes racily (the same
    // sequence number twice, and out of order), which DynamoDB Streams never does and which
    // defeats any dedup by sequence number; the reads and the stream stay concurrent.
    let workload = Arc::new(Workload::new(cast.clone(), 1));
    workload.run(&store, 200).await;
    for api in &apis {
        converge(api, &store, &cast, CONVERGE).await;
    }
    let reconnects = |d: &Daemon| {
        let d = d.admin.clone();
        async move {
            let text = reqwest::get(format!("{d}/metrics")).await.unwrap().text().await.unwrap();
            support::metric(&text, "cruddur_syncd_fanout_gaps_total", &["reason=\"reconnect\""])
        }
    };
    let before = [reconnects(&fleet[0]).await, reconnects(&fleet[1]).await];

    let writing = {
        let (workload, store) = (workload.clone(), store.clone());
        tokio::spawn(async move { workload.run(&store, 300).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| nats.stop());
    // Serving goes on from the cache meanwhile.
    for api in &apis {
        let user = &cast.users[0];
        assert_eq!(api.get("/api/message_groups", &user.access_token).await.status(), 200, "served while NATS is down");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| nats.resume());
    writing.await.unwrap();
    for (i, d) in fleet.iter().enumerate() {
        wait_until(READY, "the follower flushed after reconnecting", || async { reconnects(d).await > before[i] })
            .await;
    }
    workload.run(&store, 100).await;
    let mut slowest = Duration::ZERO;
    for api in &apis {
        slowest = slowest.max(converge(api, &store, &cast, CONVERGE).await);
    }
    println!("nats restart: both followers flushed and converged within {slowest:?} after the writes");
    for d in fleet {
        let (code, log) = d.terminate().await;
        assert_eq!(code, Some(0), "{log}");
    }
    app.stop().await;
}

/// A record published again after a failover, past the server's duplicate window (here: the
/// same message under another `Nats-Msg-Id`), is older than what its shard already applied:
/// an INSERT republished after the item's REMOVE must not bring the item back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_insert_after_a_delete_does_not_resurrect_the_item() {
    let nats = NatsServer::start();
    let app = App::start_with(Setup { extra_config: nats.config(), ..Setup::default() }).await;
    let a = app.user("alice", None, true).await;
    let b = app.user("bob", None, true).await;
    let group = MessageGroupId(Uuid::new_v4());
    for row in conversation_rows(group, Sk::parse("2024-05-01T10:00:00+00:00").unwrap(), &a, &b, "hi") {
        app.put_group(&row).await;
    }
    let path = format!("/api/messages/{group}");
    assert_eq!(app.list_if_ok(&path, &a.access_token).await.unwrap().len(), 0, "cached, empty");
    let m = message(group, Sk::parse("2024-05-01T10:00:01+00:00").unwrap(), &a, "soon deleted");
    app.put_message(&m).await;
    wait_until(READY, "the message arrives through the fan-out", || async {
        app.list_if_ok(&path, &a.access_token).await.is_some_and(|v| v.len() == 1)
    })
    .await;

    // Find the INSERT's message in the stream before deleting.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream("cruddur_syncd_changes").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut insert = None;
    for seq in (1..=last).rev() {
        let Ok(raw) = stream.get_raw_message(seq).await else { continue };
        let body = String::from_utf8_lossy(&raw.payload).to_string();
        if body.contains("soon deleted") && raw.headers.get("Cruddur-Event").map(|v| v.as_str()) == Some("INSERT") {
            insert = Some(raw);
            break;
        }
    }
    let insert = insert.expect("the INSERT was published");
    app.delete(format!("MSG#{group}"), &m.sk).await;
    wait_until(READY, "the delete arrives", || async {
        app.list_if_ok(&path, &a.access_token).await.is_some_and(|v| v.is_empty())
    })
    .await;

    let received = || app.metric("cruddur_syncd_fanout_received_total", &[]);
    let before = received().await;
    let mut headers = insert.headers.clone();
    headers.insert("Nats-Msg-Id", format!("republished-{}", Uuid::new_v4()).as_str());
    js.publish_with_headers(insert.subject.to_string(), headers, insert.payload.clone()).await.unwrap().await.unwrap();
    wait_until(READY, "the republished INSERT is received", || async { received().await > before }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = app.list_if_ok(&path, &a.access_token).await.unwrap();
    assert!(v.is_empty(), "the deleted message came back: {v:?}");
    app.stop().await;
}

/// An unreachable NATS at start is exit 69 naming the URL; a credentials file that is not one
/// is exit 78 naming `fanout.creds_file`.
#[tokio::test]
async fn bad_fanout_config_unreachable_nats_is_69_and_bad_creds_are_78() {
    let app = App::start_with(Setup { external_daemon: true, ..Setup::default() }).await;
    let dead = format!("nats://127.0.0.1:{}", support::free_port());
    let out = support::bin()
        .arg("--config")
        .arg(&app.config_path)
        .arg("run")
        .env("CRUDDUR_SYNCD__FANOUT__NATS_URL", &dead)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains(&dead) && stderr.contains("fanout.nats_url"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("bad.creds");
    std::fs::write(&creds, "not a credentials file\n").unwrap();
    let out = support::bin()
        .arg("--config")
        .arg(&app.config_path)
        .arg("run")
        .env("CRUDDUR_SYNCD__FANOUT__NATS_URL", &dead)
        .env("CRUDDUR_SYNCD__FANOUT__CREDS_FILE", creds.to_str().unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("fanout.creds_file"), "{stderr}");
    app.stop().await;
}

/// With fan-out on, the projector reads the fan-out stream through its durable consumer (not a
/// DynamoDB Streams reader of its own): a message still moves both conversation rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_reads_the_fan_out_stream() {
    let nats = NatsServer::start();
    let extra = format!("{}[projector]\nenabled = true\nlock_check_interval = \"200ms\"\n", nats.config());
    let app = App::start_with(Setup { extra_config: extra, ..Setup::default() }).await;
    let a = app.user("alice", None, true).await;
    let b = app.user("bob", None, true).await;
    let group = MessageGroupId(Uuid::new_v4());
    for row in conversation_rows(group, Sk::parse("2024-05-01T10:00:00+00:00").unwrap(), &a, &b, "hi") {
        app.put_group(&row).await;
    }
    wait_until(READY, "the projector leads", || async {
        app.metric("cruddur_syncd_projector_leader", &[]).await == 1.0
    })
    .await;
    app.put_message(&message(group, Sk::parse("2024-05-01T10:05:00+00:00").unwrap(), &a, "moved")).await;
    for owner in [&a, &b] {
        wait_until(READY, "the projector moved the row", || async {
            app.truth_groups(owner.uuid).await.first().is_some_and(|g| g.message == "moved")
        })
        .await;
    }
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("cruddur_syncd_changes").await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer("cruddur_syncd_projector").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert!(info.ack_floor.stream_sequence > 0, "the projector acknowledged what it applied: {info:?}");
    app.stop().await;
}
