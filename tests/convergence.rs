//! SPEC section 8's convergence guarantee under a concurrent random workload: 2,000 writes over
//! 50 conversations of 20 users while readers hammer the API; once writes stop and the stream
//! drains, every user's conversations and every conversation's messages equal DynamoDB.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use cruddur_syncd::model::{ApiEntry, Message, MessageGroup, MessageGroupId, Sk};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::app::{conversation_rows, entries_json, message, App, User};
use uuid::Uuid;

const USERS: usize = 20;
const GROUPS: usize = 50;
const WRITES: usize = 2000;
const WRITERS: usize = 8;
const READERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_equals_dynamodb_after_a_concurrent_random_workload() {
    let app = Arc::new(App::start().await);
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(app.user(&format!("user{i:02}"), None, true).await);
    }
    let users = Arc::new(users);
    let mut rng = StdRng::seed_from_u64(7);
    let groups: Vec<(MessageGroupId, usize, usize)> = (0..GROUPS)
        .map(|_| {
            let a = rng.gen_range(0..USERS);
            let b = (a + rng.gen_range(1..USERS)) % USERS;
            (MessageGroupId(Uuid::new_v4()), a, b)
        })
        .collect();
    let groups = Arc::new(groups);

    let stop_readers = Arc::new(AtomicBool::new(false));
    let server_errors = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..READERS {
        let (app, users, groups, stop, errors) =
            (app.clone(), users.clone(), groups.clone(), stop_readers.clone(), server_errors.clone());
        readers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(100 + r as u64);
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let (g, a, _) = groups[rng.gen_range(0..GROUPS)];
                let u = &users[a];
                let path =
                    if rng.gen_bool(0.5) { "/api/message_groups".to_string() } else { format!("/api/messages/{g}") };
                let status = app.get(&path, &u.access_token).await.status();
                if status.is_server_error() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            n
        }));
    }

    // Writers: each owns a slice of the conversations, so per-conversation ordering (rows move
    // forward in time) mirrors the app, while conversations interleave freely.
    let next_second = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (app, users, groups, clock) = (app.clone(), users.clone(), groups.clone(), next_second.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w as u64);
            let mine: Vec<usize> = (0..GROUPS).filter(|i| i % WRITERS == w).collect();
            let mut sent: HashMap<MessageGroupId, Vec<Message>> = HashMap::new();
            let mut rows: HashMap<MessageGroupId, [MessageGroup; 2]> = HashMap::new();
            for _ in 0..WRITES / WRITERS {
                let (g, a, b) = groups[mine[rng.gen_range(0..mine.len())]];
                let secs = clock.fetch_add(1, Ordering::Relaxed);
                let sk = Sk::from_instant(
                    Utc.timestamp_opt(1_700_000_000 + secs, rng.gen_range(0..1_000_000) * 1000).unwrap(),
                );
                let sender = if rng.gen_bool(0.5) { &users[a] } else { &users[b] };
                match rng.gen_range(0..10) {
                    // a new message, and the conversation rows move to it
                    0..=5 => {
                        let m = message(g, sk.clone(), sender, &format!("msg {secs} from {}", sender.handle));
                        app.put_message(&m).await;
                        let new = conversation_rows(g, sk, &users[a], &users[b], &m.message);
                        if let Some(old) = rows.insert(g, new.clone()) {
                            for r in &old {
                                app.delete(format!("GRP#{}", r.owner), &r.sk).await;
                            }
                        }
                        for r in &new {
                            app.put_group(r).await;
                        }
                        sent.entry(g).or_default().push(m);
                    }
                    // an edit of an earlier message
                    6..=7 => {
                        if let Some(list) = sent.get_mut(&g).filter(|l| !l.is_empty()) {
                            let i = rng.gen_range(0..list.len());
                            list[i].message = format!("edited {secs}");
                            app.put_message(&list[i]).await;
                        }
                    }
                    // a deleted message
                    _ => {
                        if let Some(list) = sent.get_mut(&g).filter(|l| !l.is_empty()) {
                            let m = list.remove(rng.gen_range(0..list.len()));
                            app.delete(format!("MSG#{g}"), &m.sk).await;
                        }
                    }
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    stop_readers.store(true, Ordering::Relaxed);
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert_eq!(server_errors.load(Ordering::Relaxed), 0, "5xx answers during the workload");
    assert!(reads > 100, "the readers barely ran ({reads} reads)");

    // Drained: every answer equals a consistent read of DynamoDB.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mismatches = compare(&app, &users, &groups).await;
        if mismatches.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not converged after 60s: {mismatches:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match Arc::try_unwrap(app) {
        Ok(app) => app.stop().await,
        Err(_) => panic!("the app is still shared"),
    }
}

async fn compare(app: &App, users: &[User], groups: &[(MessageGroupId, usize, usize)]) -> Vec<String> {
    let mut out = Vec::new();
    for u in users {
        let rows = app.truth_groups(u.uuid).await;
        let want: Vec<ApiEntry> = rows.iter().map(|g| g.api_entry()).collect();
        let got = app.all_pages("/api/message_groups?limit=7", &u.access_token).await;
        if got != entries_json(&want) {
            out.push(format!("groups of {}: {} served, {} stored", u.handle, got.len(), want.len()));
        }
    }
    for (g, a, _) in groups {
        let token = &users[*a].access_token;
        let listed = app.truth_groups(users[*a].uuid).await.iter().any(|r| r.message_group_uuid == *g);
        if !listed {
            // never written to: a 404 for everyone, like any unknown conversation
            let status = app.get(&format!("/api/messages/{g}"), token).await.status();
            if status != 404 {
                out.push(format!("messages of unlisted {g}: {status}"));
            }
            continue;
        }
        let msgs = app.truth_messages(*g).await;
        let want: Vec<ApiEntry> = msgs.iter().map(|m| m.api_entry()).collect();
        let got = app.all_pages(&format!("/api/messages/{g}?limit=15"), token).await;
        if got != entries_json(&want) {
            out.push(format!("messages of {g}: {} served, {} stored", got.len(), want.len()));
        }
    }
    out
}
