//! The convergence check of SPEC section 8 and the random workload it is checked after, shared
//! by the convergence test and every fault test.
//!
//! The workload writes straight to DynamoDB (it plays the Flask app, which no fault between
//! the daemon and its dependencies touches) while readers hammer the API. The check: every
//! user's conversations and every conversation's messages, as the API serves them page by page,
//! equal a consistent Query of DynamoDB.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue as V;
use chrono::{TimeZone, Utc};
use cruddur_syncd::model::{conversation_list, ApiEntry, Message, MessageGroup, MessageGroupId, Sk};
use cruddur_syncd::store::Store;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::app::{conversation_rows, entries_json, message, App, User};
use super::link::next_link;

/// The API as a client sees it: a base URL and a connection pool.
#[derive(Clone)]
pub struct ApiClient {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

impl ApiClient {
    pub fn new(base: &str) -> ApiClient {
        let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).build().unwrap();
        ApiClient { http, base: base.to_string() }
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.base)).bearer_auth(token).send().await.unwrap()
    }

    /// Every page of a list route, as served; `Err` names the first page that was not a 200.
    pub async fn try_pages(&self, first: &str, token: &str) -> Result<Vec<Vec<serde_json::Value>>, String> {
        let mut out = Vec::new();
        let mut next = Some(first.to_string());
        while let Some(path) = next.take() {
            let res = self.get(&path, token).await;
            if res.status() != 200 {
                return Err(format!("{path}: {}", res.status()));
            }
            next = next_link(res.headers());
            let page: Vec<serde_json::Value> = res.json().await.unwrap();
            out.push(page);
        }
        Ok(out)
    }

    /// Every item of a list route, following `Link: rel="next"`, in the route's order across
    /// pages: conversations newest first; messages oldest first (each page is oldest first
    /// and pages go back in time, so they are put together in reverse).
    pub async fn try_all_pages(&self, first: &str, token: &str) -> Result<Vec<serde_json::Value>, String> {
        let pages = self.try_pages(first, token).await?;
        Ok(if first.starts_with("/api/messages/") {
            pages.into_iter().rev().flatten().collect()
        } else {
            pages.into_iter().flatten().collect()
        })
    }

    pub async fn all_pages(&self, first: &str, token: &str) -> Vec<serde_json::Value> {
        self.try_all_pages(first, token).await.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Users and the conversations between them.
pub struct Cast {
    pub users: Vec<User>,
    /// (conversation, one participant, the other), as indexes into `users`.
    pub groups: Vec<(MessageGroupId, usize, usize)>,
}

impl Cast {
    /// `users` provisioned users (`{prefix}NN`) and `groups` conversations between random pairs.
    pub async fn new(app: &App, prefix: &str, users: usize, groups: usize, seed: u64) -> Cast {
        let mut list = Vec::new();
        for i in 0..users {
            list.push(app.user(&format!("{prefix}{i:02}"), None, true).await);
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let groups = (0..groups)
            .map(|_| {
                let a = rng.random_range(0..users);
                let b = (a + rng.random_range(1..users)) % users;
                (MessageGroupId(Uuid::new_v4()), a, b)
            })
            .collect();
        Cast { users: list, groups }
    }
}

/// What one writer remembers between runs: its conversations' current rows and the messages it
/// sent, so that edits and deletes hit real items.
struct WriterState {
    rng: StdRng,
    /// Indexes of the conversations this writer owns.
    mine: Vec<usize>,
    sent: HashMap<MessageGroupId, Vec<Message>>,
    rows: HashMap<MessageGroupId, [MessageGroup; 2]>,
}

/// A random workload as the app writes: new messages (and the conversation rows moving to
/// them), edits and deletes. Each writer owns a slice of the conversations, so per-conversation
/// ordering (rows move forward in time) mirrors the app, while conversations interleave freely.
pub struct Workload {
    cast: Arc<Cast>,
    writers: Vec<Arc<Mutex<WriterState>>>,
    /// Seconds after the base instant of the next write's sort key, shared by every writer.
    clock: Arc<AtomicI64>,
    /// Writes done so far, over every run.
    pub done: Arc<AtomicUsize>,
}

impl Workload {
    pub fn new(cast: Arc<Cast>, writers: usize) -> Workload {
        let states = (0..writers)
            .map(|w| {
                Arc::new(Mutex::new(WriterState {
                    rng: StdRng::seed_from_u64(w as u64),
                    mine: (0..cast.groups.len()).filter(|i| i % writers == w).collect(),
                    sent: HashMap::new(),
                    rows: HashMap::new(),
                }))
            })
            .collect();
        Workload { cast, writers: states, clock: Arc::new(AtomicI64::new(0)), done: Arc::new(AtomicUsize::new(0)) }
    }

    /// `writes` more writes to `store`'s table, spread over the writers, concurrently.
    pub async fn run(&self, store: &Store, writes: usize) {
        let per = writes.div_ceil(self.writers.len());
        let mut tasks = Vec::new();
        for state in &self.writers {
            let (state, cast, clock, done, store) =
                (state.clone(), self.cast.clone(), self.clock.clone(), self.done.clone(), store.clone());
            tasks.push(tokio::spawn(async move {
                let mut s = state.lock().await;
                for _ in 0..per {
                    write_one(&mut s, &cast, &store, &clock).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}

async fn write_one(s: &mut WriterState, cast: &Cast, store: &Store, clock: &AtomicI64) {
    if s.mine.is_empty() {
        return;
    }
    let (g, a, b) = cast.groups[s.mine[s.rng.random_range(0..s.mine.len())]];
    let users = &cast.users;
    let secs = clock.fetch_add(1, Ordering::Relaxed);
    let sk =
        Sk::from_instant(Utc.timestamp_opt(1_700_000_000 + secs, s.rng.random_range(0..1_000_000) * 1000).unwrap());
    let sender = if s.rng.random_bool(0.5) { &users[a] } else { &users[b] };
    match s.rng.random_range(0..10) {
        // a new message, and the conversation rows move to it
        0..=5 => {
            let m = message(g, sk.clone(), sender, &format!("msg {secs} from {}", sender.handle));
            put(store, m.to_item()).await;
            let new = conversation_rows(g, sk, &users[a], &users[b], &m.message);
            if let Some(old) = s.rows.insert(g, new.clone()) {
                for r in &old {
                    delete(store, format!("GRP#{}", r.owner), &r.sk).await;
                }
            }
            for r in &new {
                put(store, r.to_item()).await;
            }
            s.sent.entry(g).or_default().push(m);
        }
        // an edit of an earlier message
        6..=7 => {
            let i = match s.sent.get(&g) {
                Some(list) if !list.is_empty() => s.rng.random_range(0..list.len()),
                _ => return,
            };
            let list = s.sent.get_mut(&g).unwrap();
            list[i].message = format!("edited {secs}");
            put(store, list[i].to_item()).await;
        }
        // a deleted message
        _ => {
            let i = match s.sent.get(&g) {
                Some(list) if !list.is_empty() => s.rng.random_range(0..list.len()),
                _ => return,
            };
            let m = s.sent.get_mut(&g).unwrap().remove(i);
            delete(store, format!("MSG#{g}"), &m.sk).await;
        }
    }
}

async fn put(store: &Store, item: HashMap<String, V>) {
    store
        .client()
        .put_item()
        .table_name(store.table())
        .set_item(Some(item))
        .send()
        .await
        .unwrap_or_else(|e| panic!("the workload's PutItem failed: {e:?}"));
}

async fn delete(store: &Store, pk: String, sk: &Sk) {
    store
        .client()
        .delete_item()
        .table_name(store.table())
        .key("pk", V::S(pk))
        .key("sk", V::S(sk.as_str().to_string()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("the workload's DeleteItem failed: {e:?}"));
}

/// API readers running until stopped, counting answers by status.
pub struct Readers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<BTreeMap<u16, usize>>>,
}

impl Readers {
    /// `n` readers, each asking for a random participant's conversation list or messages.
    /// Connection failures (the daemon is down) are counted as status 0.
    pub fn start(api: &ApiClient, cast: Arc<Cast>, n: usize) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|r| {
                let (api, cast, stop) = (api.clone(), cast.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(100 + r as u64);
                    let mut seen = BTreeMap::new();
                    while !stop.load(Ordering::Relaxed) {
                        let (g, a, _) = cast.groups[rng.random_range(0..cast.groups.len())];
                        let token = &cast.users[a].access_token;
                        let path = if rng.random_bool(0.5) {
                            "/api/message_groups".to_string()
                        } else {
                            format!("/api/messages/{g}")
                        };
                        let res = api.http.get(format!("{}{path}", api.base)).bearer_auth(token).send().await;
                        let status = match res {
                            Ok(r) => r.status().as_u16(),
                            Err(_) => {
                                // a daemon being killed or restarted: do not spin
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                0
                            }
                        };
                        *seen.entry(status).or_default() += 1;
                    }
                    seen
                })
            })
            .collect();
        Readers { stop, tasks }
    }

    /// Stops the readers; how many answers of each status they got.
    pub async fn stop(self) -> BTreeMap<u16, usize> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = BTreeMap::new();
        for t in self.tasks {
            for (status, n) in t.await.unwrap() {
                *total.entry(status).or_default() += n;
            }
        }
        total
    }
}

/// Every difference between what the API serves and a consistent read of DynamoDB, one line
/// each; empty when they agree. Pages are small so that pagination is part of the check.
pub async fn compare(api: &ApiClient, store: &Store, cast: &Cast) -> Vec<String> {
    let mut out = Vec::new();
    for u in &cast.users {
        let rows = truth_groups(store, u).await;
        let want: Vec<ApiEntry> = rows.iter().map(|g| g.api_entry()).collect();
        match api.try_all_pages("/api/message_groups?limit=7", &u.access_token).await {
            Ok(got) if got == entries_json(&want) => {}
            Ok(got) => out.push(format!("groups of {}: {} served, {} stored", u.handle, got.len(), want.len())),
            Err(e) => out.push(format!("groups of {}: {e}", u.handle)),
        }
    }
    for (g, a, _) in &cast.groups {
        let user = &cast.users[*a];
        let listed = truth_groups(store, user).await.iter().any(|r| r.message_group_uuid == *g);
        if !listed {
            // never written to: a 404 for everyone, like any unknown conversation
            let status = api.get(&format!("/api/messages/{g}"), &user.access_token).await.status();
            if status != 404 {
                out.push(format!("messages of unlisted {g}: {status}"));
            }
            continue;
        }
        let (msgs, misfits) = store.messages(*g).await.unwrap();
        assert!(misfits.is_empty(), "{misfits:?}");
        let want: Vec<ApiEntry> = msgs.iter().map(|m| m.api_entry()).collect();
        match api.try_all_pages(&format!("/api/messages/{g}?limit=15"), &user.access_token).await {
            Ok(got) if got == entries_json(&want) => {}
            Ok(got) => out.push(format!("messages of {g}: {} served, {} stored", got.len(), want.len())),
            Err(e) => out.push(format!("messages of {g}: {e}")),
        }
    }
    out
}

async fn truth_groups(store: &Store, user: &User) -> Vec<MessageGroup> {
    let (rows, misfits) = store.group_rows(user.uuid).await.unwrap();
    assert!(misfits.is_empty(), "{misfits:?}");
    conversation_list(rows)
}

/// Waits until [`compare`] finds nothing (the stream drained); panics with the differences
/// after `deadline`. Returns how long it took.
pub async fn converge(api: &ApiClient, store: &Store, cast: &Cast, deadline: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let mismatches = compare(api, store, cast).await;
        if mismatches.is_empty() {
            return start.elapsed();
        }
        assert!(start.elapsed() < deadline, "not converged after {deadline:?}: {mismatches:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
