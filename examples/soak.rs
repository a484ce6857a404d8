//! The load of `scripts/soak` (run it through the script, which starts the daemon):
//!
//! ```text
//! soak --config PATH --daemon-pid PID [--duration 10m] [--users 8] [--writes 20] [--reads 100]
//! ```
//!
//! Creates `--users` Cognito users with PostgreSQL rows (so each has a token the daemon maps),
//! three conversations per user, then for `--duration`:
//! - writes through DynamoDB, `--writes` a second: a new message (and both conversation rows
//!   moved to it by delete + put, as the app does), an edit of a message, or a deleted message;
//! - authenticated reads through the API, `--reads` a second: a user's conversation list or
//!   a conversation's newest messages, sometimes with the next page;
//!
//! and prints errors, p50/p99 latencies, the daemon's RSS after the warm-up and at the end, and
//! whether, once the writes stop and the stream drains, every user's conversation list and every
//! conversation's messages as served equal a DynamoDB Query. Exit 1 when a target is missed:
//! any error, any mismatch, or RSS growth of 10% or more after the warm-up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use aws_sdk_cognitoidentityprovider::types::{AttributeType, MessageActionType};
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use clap::Parser;
use cruddur_syncd::config::Config;
use cruddur_syncd::model::{conversation_list, Message, MessageGroup, MessageGroupId, MessageId, Sk, UserUuid};
use cruddur_syncd::store::Store;
use link::next_link;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use support::{ms, quantile, rss_bytes, AnyResult};
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

#[path = "../tests/it/support/link.rs"]
mod link;
mod support;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    config: String,
    /// The daemon whose RSS is measured.
    #[arg(long)]
    daemon_pid: u32,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    duration: Duration,
    /// RSS is first measured after this long (default: a fifth of the duration, at most 2 min).
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    #[arg(long, default_value_t = 8)]
    users: usize,
    /// Writes a second.
    #[arg(long, default_value_t = 20)]
    writes: u32,
    /// Reads a second.
    #[arg(long, default_value_t = 100)]
    reads: u32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const PASSWORD: &str = "Testing123!";
/// A 404 for a conversation whose rows are moving (between a delete and its put, as the app
/// writes them), or moved less than this long ago (the stream's delivery of the put), is the
/// data as it was at that moment, not an error.
const MOVE_GRACE: Duration = Duration::from_secs(3);

struct User {
    uuid: UserUuid,
    handle: String,
    token: String,
}

struct Conversation {
    id: MessageGroupId,
    a: usize,
    b: usize,
    /// Its rows are being moved (a delete done, its put not yet).
    moving: AtomicBool,
    /// Milliseconds since the start when its rows last finished moving (0: never).
    moved_at_ms: AtomicU64,
    state: Mutex<ConvState>,
}

#[derive(Default)]
struct ConvState {
    /// The sk both conversation rows carry now.
    rows_sk: Option<Sk>,
    messages: Vec<Message>,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    moved_404: u64,
    first_errors: Vec<String>,
    latencies: Vec<Duration>,
}

impl Tally {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(what);
        }
    }
}

struct Soak {
    store: Store,
    http: reqwest::Client,
    api: String,
    users: Vec<User>,
    conversations: Vec<Conversation>,
    started: Instant,
    /// Every sk is unique: two rows of one owner must never share a key by accident.
    clock_us: AtomicI64,
    writes: StdMutex<Tally>,
    reads: StdMutex<Tally>,
}

impl Soak {
    fn next_sk(&self) -> Sk {
        let now = Utc::now().timestamp_micros();
        let mut last = self.clock_us.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.clock_us.compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Sk::from_instant(DateTime::from_timestamp_micros(next).unwrap_or_default()),
                Err(seen) => last = seen,
            }
        }
    }

    fn rows(&self, c: &Conversation, sk: &Sk, text: &str) -> [MessageGroup; 2] {
        let (a, b) = (&self.users[c.a], &self.users[c.b]);
        let row = |owner: &User, other: &User| MessageGroup {
            owner: owner.uuid,
            sk: sk.clone(),
            message_group_uuid: c.id,
            message: text.to_string(),
            user_uuid: other.uuid,
            user_display_name: format!("Soak {}", other.handle),
            user_handle: other.handle.clone(),
        };
        [row(a, b), row(b, a)]
    }

    async fn put(&self, item: HashMap<String, AttributeValue>) -> Result<(), String> {
        let req = self.store.client().put_item().table_name(self.store.table()).set_item(Some(item));
        req.send().await.map(|_| ()).map_err(|e| format!("PutItem: {e}"))
    }

    async fn delete(&self, pk: String, sk: &Sk) -> Result<(), String> {
        let req = self
            .store
            .client()
            .delete_item()
            .table_name(self.store.table())
            .key("pk", AttributeValue::S(pk))
            .key("sk", AttributeValue::S(sk.as_str().to_string()));
        req.send().await.map(|_| ()).map_err(|e| format!("DeleteItem: {e}"))
    }

    /// One write on a random conversation; the conversation's lock keeps its writes in order.
    async fn write(&self, rng: &mut StdRng) -> Result<(), String> {
        let c = &self.conversations[rng.random_range(0..self.conversations.len())];
        let mut st = c.state.lock().await;
        let roll = rng.random_range(0..10);
        if roll < 6 || st.messages.is_empty() {
            self.new_message(c, &mut st, rng).await?;
        } else if roll < 8 {
            let i = rng.random_range(0..st.messages.len());
            st.messages[i].message = format!("edited at {}", Utc::now().to_rfc3339());
            let item = st.messages[i].to_item();
            self.put(item).await?;
        } else {
            let i = rng.random_range(0..st.messages.len());
            let m = st.messages.remove(i);
            self.delete(format!("MSG#{}", c.id), &m.sk).await?;
        }
        Ok(())
    }

    /// A new message, and both conversation rows moved to it: the old row deleted, the new put.
    async fn new_message(&self, c: &Conversation, st: &mut ConvState, rng: &mut StdRng) -> Result<(), String> {
        let sk = self.next_sk();
        let sender = &self.users[if rng.random_bool(0.5) { c.a } else { c.b }];
        let m = Message {
            group: c.id,
            sk: sk.clone(),
            message_uuid: MessageId(Uuid::new_v4()),
            message: format!("soak message {} from {}", sk.as_str(), sender.handle),
            user_uuid: sender.uuid,
            user_display_name: format!("Soak {}", sender.handle),
            user_handle: sender.handle.clone(),
        };
        self.put(m.to_item()).await?;
        // Move both rows: delete the old one, put the new one.
        c.moving.store(true, Ordering::SeqCst);
        let moved = async {
            for row in self.rows(c, &sk, &m.message) {
                if let Some(old) = &st.rows_sk {
                    self.delete(format!("GRP#{}", row.owner), old).await?;
                }
                self.put(row.to_item()).await?;
            }
            Ok::<_, String>(())
        }
        .await;
        c.moved_at_ms.store(self.started.elapsed().as_millis() as u64, Ordering::SeqCst);
        c.moving.store(false, Ordering::SeqCst);
        moved?;
        st.rows_sk = Some(sk);
        st.messages.push(m);
        Ok(())
    }

    /// One read of a random user: the conversation list or one of its conversations.
    async fn read(&self, rng: &mut StdRng) {
        let c = &self.conversations[rng.random_range(0..self.conversations.len())];
        let user = &self.users[if rng.random_bool(0.5) { c.a } else { c.b }];
        let path = if rng.random_bool(0.5) {
            ["/api/message_groups", "/api/message_groups?limit=2"][rng.random_range(0..2)].to_string()
        } else {
            format!("/api/messages/{}?limit={}", c.id, [20, 5][rng.random_range(0..2)])
        };
        let follow = rng.random_bool(0.2);
        let mut next = Some(path);
        while let Some(path) = next.take() {
            let t = Instant::now();
            let res = self.http.get(format!("{}{path}", self.api)).bearer_auth(&user.token).send().await;
            let res = match res {
                Ok(r) => r,
                Err(e) => {
                    self.reads.lock().unwrap_or_else(|e| e.into_inner()).error(format!("GET {path}: {e}"));
                    return;
                }
            };
            let status = res.status().as_u16();
            let link = next_link(res.headers());
            let body = res.bytes().await;
            let elapsed = t.elapsed();
            let mut tally = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            tally.latencies.push(elapsed);
            match (status, body) {
                (200, Ok(b)) if serde_json::from_slice::<Vec<serde_json::Value>>(&b).is_ok() => tally.ok += 1,
                (404, Ok(_)) if path.starts_with("/api/messages/") && self.moved_recently(c) => tally.moved_404 += 1,
                (status, body) => {
                    let text = body.map(|b| String::from_utf8_lossy(&b).chars().take(200).collect::<String>());
                    let since = (self.started.elapsed().as_millis() as u64)
                        .saturating_sub(c.moved_at_ms.load(Ordering::SeqCst));
                    tally.error(format!(
                        "GET {path} as {}: {status} {text:?} (its rows last moved {:.1} s ago)",
                        user.handle,
                        since as f64 / 1e3
                    ));
                }
            }
            if follow {
                next = link;
            }
        }
    }

    fn moved_recently(&self, c: &Conversation) -> bool {
        let at = c.moved_at_ms.load(Ordering::SeqCst);
        c.moving.load(Ordering::SeqCst)
            || (at > 0 && self.started.elapsed().saturating_sub(Duration::from_millis(at)) < MOVE_GRACE)
    }

    /// Every page of a list route, as served (message pages reversed into oldest-first order).
    async fn all_pages(&self, first: &str, token: &str) -> Result<Vec<serde_json::Value>, String> {
        let mut pages = Vec::new();
        let mut next = Some(first.to_string());
        while let Some(path) = next.take() {
            let res = self.http.get(format!("{}{path}", self.api)).bearer_auth(token).send().await;
            let res = res.map_err(|e| format!("GET {path}: {e}"))?;
            if res.status() == 404 {
                break; // a conversation with no rows left: nothing served, compared as empty
            }
            if res.status() != 200 {
                return Err(format!("GET {path}: {}", res.status()));
            }
            next = next_link(res.headers());
            pages.push(res.json::<Vec<serde_json::Value>>().await.map_err(|e| format!("GET {path}: {e}"))?);
        }
        if first.starts_with("/api/messages/") {
            pages.reverse();
        }
        Ok(pages.into_iter().flatten().collect())
    }

    /// Served vs stored, for every user and every conversation; the differences found.
    async fn compare(&self) -> Vec<String> {
        let mut out = Vec::new();
        for u in &self.users {
            let stored = match self.store.group_rows(u.uuid).await {
                Ok((rows, _)) => conversation_list(rows),
                Err(e) => return vec![format!("query of GRP#{}: {e}", u.uuid)],
            };
            let want: Vec<serde_json::Value> =
                stored.iter().map(|g| serde_json::to_value(g.api_entry()).unwrap_or_default()).collect();
            match self.all_pages("/api/message_groups?limit=100", &u.token).await {
                Ok(got) if got == want => {}
                Ok(got) => out.push(format!("groups of {}: {} served, {} stored", u.handle, got.len(), want.len())),
                Err(e) => out.push(e),
            }
        }
        for c in &self.conversations {
            let mut stored = match self.store.messages(c.id).await {
                Ok((msgs, _)) => msgs,
                Err(e) => return vec![format!("query of MSG#{}: {e}", c.id)],
            };
            stored.sort_by(|x, y| x.sk.cmp(&y.sk));
            let listed = self.store.group_rows(self.users[c.a].uuid).await.map(|(rows, _)| rows).unwrap_or_default();
            let want: Vec<serde_json::Value> = if listed.iter().any(|r| r.message_group_uuid == c.id) {
                stored.iter().map(|m| serde_json::to_value(m.api_entry()).unwrap_or_default()).collect()
            } else {
                Vec::new() // not in the user's list: a 404, served as nothing
            };
            let token = &self.users[c.a].token;
            match self.all_pages(&format!("/api/messages/{}?limit=100", c.id), token).await {
                Ok(got) if got == want => {}
                Ok(got) => out.push(format!("messages of {}: {} served, {} stored", c.id, got.len(), want.len())),
                Err(e) => out.push(e),
            }
        }
        out
    }
}

async fn create_users(cfg: &Config, n: usize) -> AnyResult<Vec<User>> {
    let clients = cruddur_syncd::aws::clients(&cfg.aws).await;
    let cognito = &clients.cognito;
    let pool_id = &cfg.auth.user_pool_id;
    let pg = cruddur_syncd::pg::connect(&cfg.postgres).await?;
    let attr = |k: &str, v: &str| AttributeType::builder().name(k).value(v).build();
    let mut users = Vec::new();
    for i in 0..n {
        let handle = format!("soak{i:02}_{}", std::process::id());
        cognito
            .admin_create_user()
            .user_pool_id(pool_id)
            .username(&handle)
            .user_attributes(attr("preferred_username", &handle)?)
            .user_attributes(attr("email", &format!("{handle}@example.com"))?)
            .message_action(MessageActionType::Suppress)
            .send()
            .await?;
        cognito
            .admin_set_user_password()
            .user_pool_id(pool_id)
            .username(&handle)
            .password(PASSWORD)
            .permanent(true)
            .send()
            .await?;
        let got = cognito.admin_get_user().user_pool_id(pool_id).username(&handle).send().await?;
        let sub = got.user_attributes().iter().find(|a| a.name() == "sub").and_then(|a| a.value()).unwrap_or_default();
        let uuid = UserUuid(Uuid::new_v4());
        sqlx::query(
            "INSERT INTO public.users (uuid, display_name, handle, email, cognito_user_id) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(uuid.0)
        .bind(format!("Soak {handle}"))
        .bind(&handle)
        .bind(format!("{handle}@example.com"))
        .bind(sub)
        .execute(&pg)
        .await?;
        let token =
            cruddur_syncd::tools::cognito::token(cfg, cognito, &clients.endpoints.cognito, &handle, PASSWORD).await?;
        users.push(User { uuid, handle, token });
    }
    Ok(users)
}

/// Runs `op` `rate` times a second until `stop`, at most `in_flight` at once.
async fn paced<F, Fut>(rate: u32, in_flight: usize, stop: Arc<AtomicBool>, seed: u64, op: F)
where
    F: Fn(StdRng) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if rate == 0 {
        return;
    }
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tasks = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let fut = op(StdRng::seed_from_u64(rng.random()));
        tasks.spawn(async move {
            fut.await;
            drop(slot);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

#[tokio::main]
async fn main() -> AnyResult<()> {
    let args = Args::parse();
    let loaded = support::load(&args.config)?;
    let cfg = loaded.config.clone();
    let warmup = args.warmup.unwrap_or_else(|| (args.duration / 5).min(Duration::from_secs(120)));
    let pid = args.daemon_pid.to_string();

    let users = create_users(&cfg, args.users.max(2)).await?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let conversations = (0..users.len() * 3)
        .map(|i| {
            let a = i % users.len();
            let b = (a + rng.random_range(1..users.len())) % users.len();
            Conversation {
                id: MessageGroupId(Uuid::new_v4()),
                a,
                b,
                moving: AtomicBool::new(false),
                moved_at_ms: AtomicU64::new(0),
                state: Mutex::new(ConvState::default()),
            }
        })
        .collect();
    let soak = Arc::new(Soak {
        store: support::store(&loaded).await,
        http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
        api: format!("http://{}", cfg.http.listen),
        users,
        conversations,
        started: Instant::now(),
        clock_us: AtomicI64::new(0),
        writes: StdMutex::new(Tally::default()),
        reads: StdMutex::new(Tally::default()),
    });
    // Every conversation starts with a message, so both participants list it from the start.
    for c in &soak.conversations {
        let mut st = c.state.lock().await;
        soak.new_message(c, &mut st, &mut rng).await?;
    }
    println!(
        "soak: {:?} ({:?} warm-up), {} users, {} conversations, {} writes/s, {} reads/s, daemon pid {pid}",
        args.duration,
        warmup,
        soak.users.len(),
        soak.conversations.len(),
        args.writes,
        args.reads
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (soak, stop) = (soak.clone(), stop.clone());
        tokio::spawn(paced(args.writes, 32, stop, args.seed + 1, move |mut rng| {
            let soak = soak.clone();
            async move {
                let t = Instant::now();
                let r = soak.write(&mut rng).await;
                let mut tally = soak.writes.lock().unwrap_or_else(|e| e.into_inner());
                tally.latencies.push(t.elapsed());
                match r {
                    Ok(()) => tally.ok += 1,
                    Err(e) => tally.error(e),
                }
            }
        }))
    };
    let reader = {
        let (soak, stop) = (soak.clone(), stop.clone());
        tokio::spawn(paced(args.reads, 64, stop, args.seed + 2, move |mut rng| {
            let soak = soak.clone();
            async move { soak.read(&mut rng).await }
        }))
    };

    let mut rss_start = None;
    let progress = Duration::from_secs(30);
    let mut next_report = progress;
    while soak.started.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let t = soak.started.elapsed();
        if rss_start.is_none() && t >= warmup {
            rss_start = Some(rss_bytes(&pid));
        }
        if t >= next_report {
            next_report += progress;
            let (w, r) = (
                soak.writes.lock().map(|t| (t.ok, t.errors)).unwrap_or_default(),
                soak.reads.lock().map(|t| (t.ok, t.errors)).unwrap_or_default(),
            );
            println!(
                "  {:>4}s  writes {} ({} errors)  reads {} ({} errors)  daemon RSS {:.1} MiB",
                t.as_secs(),
                w.0,
                w.1,
                r.0,
                r.1,
                rss_bytes(&pid) as f64 / (1 << 20) as f64
            );
        }
    }
    let rss_end = rss_bytes(&pid);
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    reader.await?;

    // Drained: poll until served equals stored, for at most a minute.
    let drained_at = Instant::now();
    let mut mismatches = soak.compare().await;
    let mut rounds = 1;
    while !mismatches.is_empty() && drained_at.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        mismatches = soak.compare().await;
        rounds += 1;
    }
    let converged_in = drained_at.elapsed();

    let loaded_secs = args.duration.as_secs_f64();
    let report = |name: &str, tally: &StdMutex<Tally>| {
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        t.latencies.sort();
        println!(
            "  {name:<7} {:>8} ok ({:>5.1}/s)  {:>4} errors  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms{}",
            t.ok,
            t.ok as f64 / loaded_secs,
            t.errors,
            ms(quantile(&t.latencies, 0.50)),
            ms(quantile(&t.latencies, 0.99)),
            ms(t.latencies.last().copied().unwrap_or_default()),
            if t.moved_404 > 0 {
                format!("  (+{} 404s between a row's delete and put)", t.moved_404)
            } else {
                String::new()
            },
        );
        for e in &t.first_errors {
            println!("          error: {e}");
        }
        t.errors
    };
    println!("results after {:?}:", soak.started.elapsed() - converged_in);
    let errors = report("writes", &soak.writes) + report("reads", &soak.reads);
    let start = rss_start.unwrap_or(rss_end);
    let growth = (rss_end as f64 - start as f64) / start.max(1) as f64 * 100.0;
    println!(
        "  RSS     {:.1} MiB after the {:?} warm-up, {:.1} MiB at the end: {growth:+.1}%",
        start as f64 / (1 << 20) as f64,
        warmup,
        rss_end as f64 / (1 << 20) as f64,
    );
    let groups_total = soak.users.len() + soak.conversations.len();
    if mismatches.is_empty() {
        println!(
            "  convergence: all {} conversation lists and {} conversations equal DynamoDB (comparison {rounds}, {:.1} s after the writes stopped; one comparison reads everything through both)",
            soak.users.len(),
            soak.conversations.len(),
            converged_in.as_secs_f64()
        );
    } else {
        println!("  convergence: {} of {groups_total} lists differ after 60 s:", mismatches.len());
        for m in mismatches.iter().take(10) {
            println!("    {m}");
        }
    }
    let met = errors == 0 && mismatches.is_empty() && growth < 10.0;
    println!("target (0 errors, 0 mismatches, RSS growth < 10%): {}", if met { "met" } else { "NOT met" });
    if !met {
        std::process::exit(1);
    }
    Ok(())
}
