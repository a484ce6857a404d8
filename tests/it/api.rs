//! The HTTP API end to end: a daemon in-process, real moto (DynamoDB, Streams, Cognito tokens),
//! real PostgreSQL, real HTTP on a random port.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use cruddur_syncd::demo;
use cruddur_syncd::model::{ApiEntry, Message, MessageGroup, MessageGroupId, Sk};
use cruddur_syncd::tools::{self, JsonLines};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::support;
use crate::support::app::{flask_render, App, Setup, User};
use crate::support::fault_proxy::FaultProxy;

const DEADLINE: Duration = Duration::from_secs(15);

fn sk_at(secs: i64) -> Sk {
    Sk::from_instant(Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap())
}

fn message(group: MessageGroupId, secs: i64, sender: &User, text: &str) -> Message {
    support::app::message(group, sk_at(secs), sender, text)
}

/// Both rows of a conversation between `a` and `b`, at `secs`, saying `text`.
fn group_rows(group: MessageGroupId, secs: i64, a: &User, b: &User, text: &str) -> [MessageGroup; 2] {
    support::app::conversation_rows(group, sk_at(secs), a, b, text)
}

/// A daemon whose DynamoDB client goes through a fault proxy (`extra_config` appended to its
/// config), alice and bob, and a conversation between them (both rows at 10 s, saying `text`).
async fn alice_and_bob_behind_a_proxy(extra_config: &str, text: &str) -> (FaultProxy, App, User, User, MessageGroupId) {
    let proxy = FaultProxy::start(&support::moto_url()).await;
    let app = App::start_with(Setup {
        dynamodb_endpoint: Some(proxy.url.clone()),
        extra_config: extra_config.into(),
        ..Setup::default()
    })
    .await;
    let a = app.user("alice", None, true).await;
    let b = app.user("bob", None, true).await;
    let group = MessageGroupId(Uuid::new_v4());
    for row in group_rows(group, 10, &a, &b, text) {
        app.put_group(&row).await;
    }
    (proxy, app, a, b, group)
}

#[tokio::test]
async fn json_is_byte_for_byte_what_flask_sends_for_the_demo_data() {
    let app = App::start().await;
    let [andrew, bayko] = demo::users();
    let a = app.user(andrew.handle, Some(andrew.uuid), true).await;
    let _b = app.user(bayko.handle, Some(bayko.uuid), true).await;
    let now = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 5).unwrap(); // 1 January: Flask hid these
    tools::ddb::seed(&app.store(), now, &mut JsonLines::new(Vec::new())).await.unwrap();

    let res = app.get("/api/message_groups", &a.access_token).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    // Kept but always revalidated: no-store would stop browsers from ever sending If-None-Match.
    assert_eq!(res.headers()["cache-control"], "private, no-cache");
    let body = res.bytes().await.unwrap();
    let truth = app.truth_groups(a.uuid).await;
    assert_eq!(truth.len(), 1);
    let expected: Vec<ApiEntry> = truth.iter().map(|g| g.api_entry()).collect();
    assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&flask_render(&expected)));

    let group = demo::group_id();
    let res = app.get(&format!("/api/messages/{group}"), &a.access_token).await;
    assert_eq!(res.status(), 200);
    let link = res.headers()["link"].to_str().unwrap().to_string();
    let body = res.bytes().await.unwrap();
    let all = app.truth_messages(group).await;
    let newest20: Vec<ApiEntry> = all[all.len() - 20..].iter().map(|m| m.api_entry()).collect();
    assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&flask_render(&newest20)));
    assert!(
        link.starts_with(&format!("</api/messages/{group}?limit=20&before=")) && link.ends_with(">; rel=\"next\""),
        "{link}"
    );

    // Following the links yields the whole conversation, oldest first within each page.
    let pages = app.all_pages(&format!("/api/messages/{group}?limit=30"), &a.access_token).await;
    assert_eq!(pages.len(), 100);
    let mut seen: Vec<&str> = pages.iter().map(|m| m["uuid"].as_str().unwrap()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 100, "pages overlap");
    app.stop().await;
}

#[tokio::test]
async fn etag_304_cors_and_limits() {
    let app = App::start_with(Setup { extra_config: "\n".to_string(), ..Setup::default() }).await;
    let a = app.user("alice", None, true).await;
    let b = app.user("bob", None, true).await;
    let group = MessageGroupId(Uuid::new_v4());
    for row in group_rows(group, 10, &a, &b, "hi") {
        app.put_group(&row).await;
    }
    let res = app.get("/api/message_groups", &a.access_token).await;
    let etag = res.headers()["etag"].to_str().unwrap().to_string();
    let res = app
        .http
        .get(format!("{}/api/message_groups", app.api))
        .bearer_auth(&a.access_token)
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304);
    assert_eq!(res.headers()["etag"], etag.as_str());

    // limit and cursor validation
    for (path, what) in [
        ("/api/message_groups?limit=0", "limit"),
        ("/api/message_groups?limit=101", "limit"),
        ("/api/message_groups?limit=abc", "limit"),
        ("/api/message_groups?before=garbage", "before"),
        ("/api/messages/not-a-uuid", "uuid"),
    ] {
        let res = app.get(path, &a.access_token).await;
        assert_eq!(res.status(), 400, "{path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"], "bad_request");
        assert!(v["message"].as_str().unwrap().contains(what), "{path}: {v}");
    }
    // method and route
    let res =
        app.http.post(format!("{}/api/message_groups", app.api)).bearer_auth(&a.access_token).send().await.unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.json::<Value>().await.unwrap()["error"], "method_not_allowed");
    let res = app.get("/api/nope", &a.access_token).await;
    assert_eq!(res.status(), 404);
    assert_eq!(res.json::<Value>().await.unwrap()["error"], "not_found");

    // groups pagination: 3 conversations, pages of 2
    for i in 0..2 {
        let other = app.user(&format!("carol{i}"), None, true).await;
        for row in group_rows(MessageGroupId(Uuid::new_v4()), 20 + i, &a, &other, "yo") {
            app.put_group(&row).await;
        }
    }
    support::wait_until(DEADLINE, "three conversations are listed", || async {
        app.all_pages("/api/message_groups?limit=2", &a.access_token).await.len() == 3
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn cors_preflight_answers_configured_origins_only() {
    let app = App::start_with(Setup {
        extra_config: "\n[http]\ncors_allowed_origins = [\"http://localhost:3000\"]\n".into(),
        ..Setup::default()
    })
    .await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, format!("{}/api/message_groups", app.api))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
            .header("Access-Control-Request-Headers", "authorization")
            .send()
    };
    let ok = preflight("http://localhost:3000").await.unwrap();
    assert_eq!(ok.headers()["access-control-allow-origin"], "http://localhost:3000");
    assert!(ok.headers()["access-control-allow-methods"].to_str().unwrap().contains("GET"));
    let other = preflight("http://evil.test").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    app.stop().await;
}

#[tokio::test]
async fn authorization_every_fault_and_never_dynamodb() {
    let app = App::start_with(Setup { extra_config: "\n".into(), ..Setup::default() }).await;
    let a = app.user("alice", None, true).await;
    let b = app.user("bob", None, true).await;
    let c = app.user("carol", None, true).await;
    let ghost = app.user("ghost", None, false).await;
    let group = MessageGroupId(Uuid::new_v4());
    for row in group_rows(group, 10, &a, &b, "secret") {
        app.put_group(&row).await;
    }
    app.put_message(&message(group, 10, &a, "secret")).await;

    // not a participant: 404, exactly like a group that does not exist
    let res = app.get(&format!("/api/messages/{group}"), &c.access_token).await;
    assert_eq!(res.status(), 404);
    let missing = app.get(&format!("/api/messages/{}", Uuid::new_v4()), &c.access_token).await;
    assert_eq!(missing.status(), 404);
    // The same body but for the request id each answer carries.
    let without_id = |mut v: Value| {
        assert!(v["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{v}");
        v.as_object_mut().unwrap().remove("request_id");
        v
    };
    assert_eq!(without_id(res.json().await.unwrap()), without_id(missing.json().await.unwrap()));
    assert_eq!(app.get(&format!("/api/messages/{group}"), &b.access_token).await.status(), 200);

    // valid token, no users row
    let res = app.get("/api/message_groups", &ghost.access_token).await;
    assert_eq!(res.status(), 403);
    assert_eq!(res.json::<Value>().await.unwrap()["error"], "user_not_provisioned");

    let loads_before = app.metric("cruddur_syncd_cache_requests_total", &["cache=\"groups\""]).await;
    let faults: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("wrong scheme", Some(format!("Basic {}", a.access_token))),
        ("garbage", Some("Bearer not.a.token".into())),
        ("alg none", Some(format!("Bearer {}", unsigned(&a.access_token)))),
        ("id token where access is required", Some(format!("Bearer {}", a.id_token))),
        ("tampered claims", Some(format!("Bearer {}", tampered(&a.access_token)))),
    ];
    for (what, header) in faults {
        let mut req = app.http.get(format!("{}/api/message_groups", app.api));
        if let Some(h) = header {
            req = req.header("Authorization", h);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{what}");
        let challenge = res.headers()["www-authenticate"].to_str().unwrap().to_string();
        if what == "no header" {
            // RFC 6750 section 3.1: no credentials sent, so no error code.
            assert_eq!(challenge, "Bearer", "{what}");
        } else {
            assert!(challenge.starts_with("Bearer error="), "{what}: {challenge}");
        }
        let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"], "unauthorized", "{what}");
        assert_eq!(v["request_id"], id.as_str(), "{what}: the body names the request id of the header");
    }
    let loads_after = app.metric("cruddur_syncd_cache_requests_total", &["cache=\"groups\""]).await;
    assert_eq!(loads_before, loads_after, "a rejected token reached the cache");
    // Every refusal is counted by its reason.
    for (reason, count) in [("missing", 1.0), ("bad_scheme", 1.0), ("token_use", 1.0), ("expired", 0.0)] {
        let label = format!("reason=\"{reason}\"");
        assert_eq!(app.metric("cruddur_syncd_auth_failures_total", &[&label]).await, count, "{reason}");
    }
    let refused = app.metric("cruddur_syncd_auth_failures_total", &[]).await;
    assert_eq!(refused, 6.0, "six requests were refused");
    app.stop().await;
}

/// The token with `alg` set to `none` and no signature.
fn unsigned(token: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (_, claims) = (parts.next().unwrap(), parts.next().unwrap());
    format!("{}.{claims}.", b64.encode(br#"{"alg":"none","typ":"JWT"}"#))
}

/// The token with one claim changed and the original signature.
fn tampered(token: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = Value::String("someone-else".into());
    format!("{}.{}.{}", parts[0], b64.encode(claims.to_string()), parts[2])
}

#[tokio::test]
async fn writes_reach_the_api_for_cached_and_uncached_keys() {
    let app = App::start().await;
    let a = app.user("alice", None, true).await;
    let b = app.user("bob", None, true).await;
    let cached = MessageGroupId(Uuid::new_v4());
    let uncached = MessageGroupId(Uuid::new_v4());
    for row in group_rows(cached, 10, &a, &b, "first") {
        app.put_group(&row).await;
    }
    for row in group_rows(uncached, 5, &a, &b, "other") {
        app.put_group(&row).await;
    }
    let m1 = message(cached, 10, &a, "first");
    app.put_message(&m1).await;
    // warm the caches for alice and the cached group
    assert_eq!(app.get("/api/message_groups", &a.access_token).await.status(), 200);
    assert_eq!(app.get(&format!("/api/messages/{cached}"), &a.access_token).await.status(), 200);

    // a new message, and both group rows moved the way the Lambda does it (delete + put)
    let m2 = message(cached, 20, &b, "second \"quoted\"");
    app.put_message(&m2).await;
    for (old, new) in
        group_rows(cached, 10, &a, &b, "first").iter().zip(group_rows(cached, 20, &a, &b, "second \"quoted\""))
    {
        app.delete(format!("GRP#{}", old.owner), &old.sk).await;
        app.put_group(&new).await;
    }
    let path = format!("/api/messages/{cached}");
    support::wait_until(DEADLINE, "the new message is served", || async {
        let Some(v) = app.list_if_ok(&path, &a.access_token).await else { return false };
        v.len() == 2 && v[1]["message"] == "second \"quoted\""
    })
    .await;
    support::wait_until(DEADLINE, "the moved group row is served once, newest first", || async {
        let Some(v) = app.list_if_ok("/api/message_groups", &a.access_token).await else { return false };
        v.len() == 2 && v[0]["uuid"] == cached.to_string() && v[0]["message"] == "second \"quoted\""
    })
    .await;
    // a deleted message disappears
    app.delete(format!("MSG#{cached}"), &m1.sk).await;
    support::wait_until(DEADLINE, "the deleted message is gone", || async {
        let Some(v) = app.list_if_ok(&path, &a.access_token).await else { return false };
        v.len() == 1 && v[0]["uuid"] == m2.message_uuid.to_string()
    })
    .await;
    // bob was never cached: his first read already sees everything
    let v: Vec<Value> = app.get("/api/message_groups", &b.access_token).await.json().await.unwrap();
    assert_eq!(v[0]["message"], "second \"quoted\"");
    let v: Vec<Value> = app.get(&format!("/api/messages/{uncached}"), &b.access_token).await.json().await.unwrap();
    assert!(v.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_write_during_a_slow_load_wins() {
    let (proxy, app, a, b, group) = alice_and_bob_behind_a_proxy("", "old").await;
    // Every DynamoDB answer to the daemon now takes 1.5 s: its load of alice's list reads the
    // old row, then waits; meanwhile the row moves and the stream (direct to moto) delivers it.
    proxy.set_delay(Duration::from_millis(1500));
    let reader = {
        let (http, url, token) = (app.http.clone(), format!("{}/api/message_groups", app.api), a.access_token.clone());
        tokio::spawn(async move {
            http.get(url).bearer_auth(token).send().await.unwrap().json::<Vec<Value>>().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = &group_rows(group, 10, &a, &b, "old")[0];
    app.delete(format!("GRP#{}", old.owner), &old.sk).await;
    app.put_group(&group_rows(group, 30, &a, &b, "new")[0]).await;
    let first = reader.await.unwrap();
    assert_eq!(first[0]["message"], "old", "the premise: the slow load read the old row");
    proxy.set_delay(Duration::ZERO);
    // The newer value must win without any further write or a TTL expiry.
    support::wait_until(DEADLINE, "the newer row replaces the loaded one", || async {
        let Some(v) = app.list_if_ok("/api/message_groups", &a.access_token).await else { return false };
        v.len() == 1 && v[0]["message"] == "new"
    })
    .await;
    app.stop().await;
}

/// Requests queued behind a load that a flush overtook share one reload: the first of them
/// loads under the new epoch and the rest are served what it loaded, so a burst on a hot key
/// after a gap is not a chain of slow Queries.
#[tokio::test]
async fn misses_queued_behind_a_load_a_flush_overtook_share_one_reload() {
    const QUERY: &str = "DynamoDB_20120810.Query";
    // Each load takes 3 s, and the second waits for the first: requests get 20 s.
    let (proxy, app, a, _, _) = alice_and_bob_behind_a_proxy("[http]\nrequest_timeout = \"20s\"\n", "hello").await;
    let misses = || app.metric("cruddur_syncd_cache_requests_total", &["cache=\"groups\"", "result=\"miss\""]);
    let misses_before = misses().await;
    proxy.set_delay(Duration::from_secs(3));
    let before = proxy.forwarded(QUERY);
    let read = || {
        let (http, url, token) = (app.http.clone(), format!("{}/api/message_groups", app.api), a.access_token.clone());
        tokio::spawn(async move {
            let res = http.get(url).bearer_auth(token).send().await.unwrap();
            (res.status(), res.json::<Vec<Value>>().await.unwrap_or_default())
        })
    };
    let mut readers = vec![read()];
    // Its Query has been answered and is held by the proxy: the load is under way.
    support::wait_until(DEADLINE, "the first load queries", || async { proxy.forwarded(QUERY) > before }).await;
    for _ in 0..3 {
        readers.push(read());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    support::wait_until(DEADLINE, "all four missed", || async { misses().await - misses_before == 4.0 }).await;
    // The premise: the others wait for that load, which is still held, before the gap.
    assert_eq!(proxy.forwarded(QUERY) - before, 1);
    assert!(!readers[0].is_finished(), "the first load ended before the gap: the test proves nothing");
    let cache = &app.running.as_ref().unwrap().cache;
    cache.flush(&cruddur_syncd::stream::GapReason::StreamDisabled);
    for r in readers {
        let (status, list) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0]["message"], "hello");
    }
    let queries = proxy.forwarded(QUERY) - before;
    assert_eq!(queries, 2, "the overtaken load and one reload under the new epoch");
    proxy.set_delay(Duration::ZERO);
    assert_eq!(app.get("/api/message_groups", &a.access_token).await.status(), 200);
    assert_eq!(proxy.forwarded(QUERY) - before, 2, "the reload is kept: the next read is a hit");
    app.stop().await;
}

#[tokio::test]
async fn oversized_headers_and_slowloris_are_refused() {
    let app =
        App::start_with(Setup { extra_config: "\n[http]\nheader_read_timeout = \"1s\"\n".into(), ..Setup::default() })
            .await;
    let a = app.user("alice", None, true).await;
    let res = app
        .http
        .get(format!("{}/api/message_groups", app.api))
        .bearer_auth(&a.access_token)
        .header("X-Big", "x".repeat(32 * 1024))
        .send()
        .await;
    match res {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => panic!("expected a 431, got {e}"),
    }
    // A client that trickles its request head is cut off after header_read_timeout.
    let addr = app.api.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /api/message_groups HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(6) {
        // one header byte every 200 ms, never finishing
        if s.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut chunk = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    assert!(closed, "the trickling connection is still open after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(4), "cut off only after {:?}", started.elapsed());
    let head = String::from_utf8_lossy(&buf);
    assert!(head.is_empty() || head.starts_with("HTTP/1.1 408"), "{head}");
    app.stop().await;
}

#[tokio::test]
async fn readiness_metrics_and_graceful_stop() {
    let app = App::start().await;
    let ready: Value = app.http.get(format!("{}/readyz", app.admin)).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    for check in ["stream", "postgres", "dynamodb", "streams", "jwks", "shutdown"] {
        assert_eq!(ready["checks"][check], "ok", "{ready}");
    }
    assert_eq!(app.http.get(format!("{}/livez", app.admin)).send().await.unwrap().status(), 200);
    let metrics = app.metrics().await;
    assert!(metrics.contains("cruddur_syncd_stream_records_total{event=\"INSERT\"}"), "{metrics}");
    for family in [
        "cruddur_syncd_stream_records",
        "cruddur_syncd_stream_iterator_age_seconds",
        "cruddur_syncd_stream_shards",
        "cruddur_syncd_cache_entries",
        "cruddur_syncd_cache_weight_bytes",
        "cruddur_syncd_build_info",
    ] {
        assert!(metrics.contains(&format!("# TYPE {family}")), "{family} missing");
    }
    let a = app.user("alice", None, true).await;
    app.get("/api/message_groups", &a.access_token).await;
    let m = app.metrics().await;
    assert!(m.contains("cruddur_syncd_http_requests_total{route=\"/api/message_groups\",status=\"200\"} 1"), "{m}");
    assert!(m.contains("cruddur_syncd_http_request_duration_seconds_count{route=\"/api/message_groups\"} 1"), "{m}");

    // promtool (scripts/promtool provides it) accepts the exposition, lint included.
    let promtool = concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/promtool");
    assert!(std::path::Path::new(promtool).exists(), "run scripts/promtool first (scripts/test does)");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Prometheus itself asks for OpenMetrics and gets it.
    let om = app
        .http
        .get(format!("{}/metrics", app.admin))
        .header("Accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(om.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    assert!(om.text().await.unwrap().ends_with("# EOF\n"));
    app.stop().await;
}

#[tokio::test]
async fn dynamodb_down_misses_are_503_and_hits_are_still_served() {
    let (proxy, app, a, b, _) = alice_and_bob_behind_a_proxy("", "hi").await;
    assert_eq!(app.get("/api/message_groups", &a.access_token).await.status(), 200);
    // Every connection is closed, pooled ones at their next request.
    proxy.set_down(true);
    let hit = app.get("/api/message_groups", &a.access_token).await;
    assert_eq!(hit.status(), 200, "a cached list must be served while DynamoDB is down");
    let miss = app.get("/api/message_groups", &b.access_token).await;
    assert_eq!(miss.status(), 503);
    assert_eq!(miss.headers()["retry-after"], "5", "a 503 says when to try again");
    let v: Value = miss.json().await.unwrap();
    assert_eq!(v["error"], "unavailable");
    proxy.set_down(false);
    support::wait_until(Duration::from_secs(30), "misses are served again", || async {
        app.get("/api/message_groups", &b.access_token).await.status() == 200
    })
    .await;
    app.stop().await;
}
