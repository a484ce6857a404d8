//! The cache's rules end to end (docs/design.md, "Cache"): what a load reads, what a change that no longer
//! fits does, and what clients see while DynamoDB does not answer. A daemon in-process, real
//! moto, real PostgreSQL; the fault proxy stands between the daemon and DynamoDB where a test
//! needs an outage.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
use chrono::{TimeZone, Utc};
use cruddur_syncd::model::{MessageGroupId, Sk};
use serde_json::Value;
use uuid::Uuid;

use crate::support;
use crate::support::app::{conversation_rows, message, App, Setup, User};
use crate::support::fault_proxy::{Fault, FaultProxy, Rule, ANY};
use crate::support::link::next_link;

const DEADLINE: Duration = Duration::from_secs(30);

fn sk_at(secs: i64) -> Sk {
    Sk::from_instant(Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap())
}

async fn items_read(app: &App, read: &str) -> f64 {
    app.metric("cruddur_syncd_store_items_read_total", &[&format!("read=\"{read}\"")]).await
}

/// Alice and bob with one conversation (both rows at 10 s, saying "hi").
async fn alice_and_bob(app: &App) -> (User, User, MessageGroupId) {
    let a = app.user("alice", None, true).await;
    let b = app.user("bob", None, true).await;
    let group = MessageGroupId(Uuid::new_v4());
    for row in conversation_rows(group, sk_at(10), &a, &b, "hi") {
        app.put_group(&row).await;
    }
    (a, b, group)
}

/// A MODIFY whose new image lacks `message`: a fresh load would skip that item as a misfit, so
/// the cache must stop showing it (not keep the old text for as long as the entry lives).
#[tokio::test]
async fn a_message_modified_out_of_the_model_disappears() {
    let app = App::start().await;
    let (a, _b, group) = alice_and_bob(&app).await;
    let kept = message(group, sk_at(20), &a, "kept");
    let broken = message(group, sk_at(30), &a, "about to lose its text");
    app.put_message(&kept).await;
    app.put_message(&broken).await;
    let path = format!("/api/messages/{group}");
    let texts = || async {
        app.list_if_ok(&path, &a.access_token)
            .await
            .map(|v| v.iter().map(|m| m["message"].as_str().unwrap_or_default().to_string()).collect::<Vec<_>>())
    };
    assert_eq!(texts().await.unwrap(), ["kept", "about to lose its text"], "the premise: both cached");
    let skipped_before = app.metric("cruddur_syncd_stream_skipped_records_total", &[]).await;

    let mut item = broken.to_item();
    item.remove("message");
    app.store().client().put_item().table_name(app.store().table()).set_item(Some(item)).send().await.unwrap();

    support::wait_until(DEADLINE, "the misfit message is no longer served", || async {
        texts().await.is_some_and(|t| t == ["kept"])
    })
    .await;
    let skipped = app.metric("cruddur_syncd_stream_skipped_records_total", &[]).await;
    assert!(skipped > skipped_before, "the record is counted as skipped: {skipped_before} -> {skipped}");
    app.stop().await;
}

/// A conversation of 5,000 messages: the miss and the page past the window each read what they
/// return (plus one), not the partition. Counted by `store_items_read_total`, not timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_and_an_older_page_read_only_what_they_return() {
    const MESSAGES: i64 = 5_000;
    const KEPT: usize = 20;
    let app =
        App::start_with(Setup { extra_config: format!("[cache]\nmessages_per_group = {KEPT}\n"), ..Setup::default() })
            .await;
    let (a, _b, group) = alice_and_bob(&app).await;
    let store = app.store();
    let inserts = || app.metric("cruddur_syncd_stream_records_total", &["event=\"INSERT\""]);
    let inserted_before = inserts().await;
    let all: Vec<_> = (0..MESSAGES).map(|i| message(group, sk_at(100 + i), &a, &format!("m{i}"))).collect();
    for chunk in all.chunks(25) {
        let writes = chunk
            .iter()
            .map(|m| {
                WriteRequest::builder()
                    .put_request(PutRequest::builder().set_item(Some(m.to_item())).build().unwrap())
                    .build()
            })
            .collect();
        let out = store.client().batch_write_item().request_items(store.table(), writes).send().await.unwrap();
        assert!(out.unprocessed_items().is_none_or(|u| u.is_empty()), "moto left items unprocessed");
    }
    // Reads start once the stream is quiet, so no delivery races the measured loads.
    support::wait_until(Duration::from_secs(120), "the stream delivered every insert", || async {
        inserts().await >= inserted_before + MESSAGES as f64
    })
    .await;

    let before = items_read(&app, "messages").await;
    let first = app.get(&format!("/api/messages/{group}"), &a.access_token).await;
    assert_eq!(first.status(), 200);
    let next = next_link(first.headers()).expect("a conversation this long has an older page");
    let page: Vec<Value> = first.json().await.unwrap();
    let miss = items_read(&app, "messages").await - before;
    assert_eq!(page.len(), 20);
    assert_eq!(page.last().unwrap()["message"], format!("m{}", MESSAGES - 1), "the newest message last");
    assert!(miss <= (KEPT + 1) as f64, "the miss read {miss} items for a window of {KEPT}");

    let before = items_read(&app, "messages").await;
    let older = app.get(&next, &a.access_token).await;
    assert_eq!(older.status(), 200);
    let page: Vec<Value> = older.json().await.unwrap();
    let past_window = items_read(&app, "messages").await - before;
    assert_eq!(page.len(), 20);
    assert_eq!(page.last().unwrap()["message"], format!("m{}", MESSAGES - 21), "the page before the first");
    assert!(past_window <= 21.0, "the page past the window read {past_window} items for a limit of 20");
    println!("5,000 messages: the miss read {miss} items, the older page {past_window}");
    app.stop().await;
}

/// Stale-if-error: DynamoDB black-holed once the cache is warm, `cache.ttl` 1 s. For 20 s every
/// cached list is still served (200 with `Age`), an uncached one is 503; once DynamoDB answers
/// again the entries reload and `Age` goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_lists_are_served_stale_through_a_dynamodb_outage() {
    const OUTAGE: Duration = Duration::from_secs(20);
    let proxy = FaultProxy::start(&support::moto_url()).await;
    let app = App::start_with(Setup {
        dynamodb_endpoint: Some(proxy.url.clone()),
        extra_config: "[cache]\nttl = \"1s\"\n[http]\nrequest_timeout = \"2s\"\n".into(),
        ..Setup::default()
    })
    .await;
    let (a, b, group) = alice_and_bob(&app).await;
    app.put_message(&message(group, sk_at(20), &a, "hello")).await;
    let lists = ["/api/message_groups".to_string(), format!("/api/messages/{group}")];
    for path in &lists {
        let res = app.get(path, &a.access_token).await;
        assert_eq!(res.status(), 200);
        assert!(!res.headers().contains_key("age"), "fresh from the load: {:?}", res.headers());
    }
    let stale = || app.metric("cruddur_syncd_cache_requests_total", &["result=\"stale\""]);
    let stale_before = stale().await;

    proxy.inject(Rule::on(ANY, Fault::Hang));
    let started = Instant::now();
    let mut oldest_age = 0u64;
    while started.elapsed() < OUTAGE {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for path in &lists {
            let res = app.get(path, &a.access_token).await;
            assert_eq!(res.status(), 200, "{path} {:?} into the outage", started.elapsed());
            let age = res.headers().get("age").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let age = age.unwrap_or_else(|| panic!("{path} past its TTL carries Age: {:?}", res.headers()));
            oldest_age = oldest_age.max(age);
            let body: Vec<Value> = res.json().await.unwrap();
            assert_eq!(body.len(), 1, "{path}: the cached list, whole");
        }
        let miss = app.get("/api/message_groups", &b.access_token).await;
        assert_eq!(miss.status(), 503, "bob's list was never cached");
        let body: Value = miss.json().await.unwrap();
        assert_eq!(body["error"], "unavailable");
    }
    assert!(oldest_age >= 15, "Age counts from the load: {oldest_age}");
    assert!(stale().await > stale_before, "stale answers are counted");

    proxy.clear();
    for path in &lists {
        support::wait_until(DEADLINE, "the entry reloads and Age goes away", || async {
            let res = app.get(path, &a.access_token).await;
            res.status() == 200 && !res.headers().contains_key("age")
        })
        .await;
    }
    assert_eq!(app.get("/api/message_groups", &b.access_token).await.status(), 200);
    println!("dynamodb outage {OUTAGE:?}: cached lists served stale up to Age {oldest_age}");
    app.stop().await;
}

/// How the i-th key of a test spells its instant.
type Spelling = dyn Fn(usize, chrono::DateTime<Utc>) -> String;

/// The bounded newest-first read gives what reading the whole partition and sorting by instant
/// gives, for every cursor and page size, when a table mixes the UTC spellings whose string
/// order follows their instants (`+00:00` with and without fractions, no offset), and when a
/// table spells everything with `Z` (a second of skew, read past).
#[tokio::test]
async fn the_bounded_read_agrees_with_a_whole_partition_read() {
    let app = App::start().await;
    let (a, _b, _) = alice_and_bob(&app).await;
    let store = app.store();
    let base = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    // Instants that share seconds, with whole seconds beside their fractions.
    let offsets_ms = [0, 250, 999, 1_000, 1_000, 1_001, 1_500, 2_000, 5_000, 5_300, 5_999, 6_000, 60_000, 60_400];
    let mixed = |i: usize, t: chrono::DateTime<Utc>| match i % 3 {
        0 => t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string(),
        1 => t.format("%Y-%m-%dT%H:%M:%S%.f+00:00").to_string(),
        _ => t.format("%Y-%m-%dT%H:%M:%S%.f").to_string(),
    };
    let zulu = |i: usize, t: chrono::DateTime<Utc>| match i % 2 {
        0 => t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        _ => t.format("%Y-%m-%dT%H:%M:%S%.fZ").to_string(),
    };
    let spellings: [(&str, &Spelling); 2] = [("mixed", &mixed), ("Z", &zulu)];
    for (name, spell) in spellings {
        let group = MessageGroupId(Uuid::new_v4());
        for (i, ms) in offsets_ms.iter().enumerate() {
            let sk = Sk::parse(&spell(i, base + chrono::Duration::milliseconds(*ms))).unwrap();
            app.put_message(&message(group, sk, &a, &format!("{name}{i}"))).await;
        }
        let (truth, misfits) = store.messages(group).await.unwrap();
        assert!(misfits.is_empty() && truth.len() == offsets_ms.len(), "{name}: {} items, {misfits:?}", truth.len());
        let mut cursors: Vec<Option<&Sk>> = vec![None];
        cursors.extend(truth.iter().map(|m| Some(&m.sk)));
        for before in cursors {
            for n in [1, 2, 3, 7, 20] {
                let expected: Vec<&str> = {
                    let older: Vec<_> = truth.iter().filter(|m| before.is_none_or(|b| m.sk < *b)).collect();
                    older[older.len().saturating_sub(n)..].iter().map(|m| m.message.as_str()).collect()
                };
                let got = store.newest_messages(group, before, n).await.unwrap();
                let got_texts: Vec<&str> = got.messages.iter().map(|m| m.message.as_str()).collect();
                assert_eq!(got_texts, expected, "{name}: n={n} before={:?}", before.map(|b| b.as_str()));
            }
        }
    }
    app.stop().await;
}
