//! Helpers for `scripts/bench-api` (run through it, not by hand):
//!
//! ```text
//! bench ceiling <listen> <head-file> <body-file> a minimal hyper server answering every request with the
//!                                                daemon's response: its headers (as `curl -D` saved them)
//!                                                and body
//! bench floor <listen> <head-file> <body-file>   the daemon's own accept loop and hyper settings with an axum
//!                                                Router whose one route returns the same response: what the
//!                                                HTTP stack costs before the daemon does any work of its own
//! bench populate <config> <user-uuid> <n>        n extra conversations for a user (a realistic 5 KB list)
//! bench freshness <config> <token> <group> <rate> <seconds> [<host:port>,...]
//!                                                PutItem acknowledged -> visible in the API, p50/p99
//!                                                (on every listed instance; default http.listen)
//! bench memory <groups>                          RSS of the groups cache with that many cached users
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use cruddur_syncd::cache::scripted::{ScriptedStore, ScriptedUsers};
use cruddur_syncd::cache::Cache;
use cruddur_syncd::config::CacheConfig;
use cruddur_syncd::metrics::Metrics;
use cruddur_syncd::model::{Message, MessageGroup, MessageGroupId, MessageId, Sk, UserUuid};
use cruddur_syncd::store::Store;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use support::{ms, quantile, rss_bytes, AnyResult};
use uuid::Uuid;

mod support;

// The same allocator as the daemon (src/main.rs), so the ceiling stays a fair comparison.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["ceiling", listen, head, body] => ceiling(listen, Canned::read(head, body)?).await,
        ["floor", listen, head, body] => floor(listen, Canned::read(head, body)?).await,
        ["populate", cfg, user, n] => populate(cfg, user.parse()?, n.parse()?).await,
        ["freshness", cfg, token, group, rate, secs] => {
            freshness(cfg, token, group.parse()?, rate.parse()?, secs.parse()?, None).await
        }
        ["freshness", cfg, token, group, rate, secs, apis] => {
            freshness(cfg, token, group.parse()?, rate.parse()?, secs.parse()?, Some(apis)).await
        }
        ["memory", n] => memory(n.parse()?).await,
        _ => Err("usage: see the header of examples/bench.rs".into()),
    }
}

/// The daemon's answer, replayed byte for byte (but for `date`, which hyper writes itself) by the
/// ceiling and the floor, so that all three servers send the same bytes.
struct Canned {
    head: HeaderMap,
    body: Bytes,
}

impl Canned {
    /// `head`: a response head as `curl -D` writes it (status line, then `name: value` lines).
    fn read(head: &str, body: &str) -> AnyResult<Canned> {
        let mut map = HeaderMap::new();
        for line in std::fs::read_to_string(head)?.lines().skip(1) {
            let Some((name, value)) = line.split_once(':') else { continue };
            let name = HeaderName::from_bytes(name.trim().as_bytes())?;
            // hyper writes these from the connection and the body.
            if [header::DATE, header::CONTENT_LENGTH, header::CONNECTION, header::TRANSFER_ENCODING].contains(&name) {
                continue;
            }
            map.append(name, HeaderValue::from_str(value.trim())?);
        }
        Ok(Canned { head: map, body: Bytes::from(std::fs::read(body)?) })
    }

    /// The response, built the way the daemon builds its own: the body, then one cheap clone
    /// (a reference count) per header value.
    fn response<B: From<Bytes>>(&self) -> Response<B> {
        let mut res = Response::new(B::from(self.body.clone()));
        let h = res.headers_mut();
        for (name, value) in &self.head {
            h.append(name.clone(), value.clone());
        }
        res
    }
}

/// The ceiling: the same bytes from the thinnest server hyper allows.
async fn ceiling(listen: &str, canned: Canned) -> AnyResult<()> {
    let canned = Arc::new(canned);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let canned = canned.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let res = canned.response::<Full<Bytes>>();
                async move { Ok::<_, Infallible>(res) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// The floor: what `cruddur_syncd::http::serve` and an axum `Router` cost with nothing behind
/// them, under the daemon's defaults (header-read timeout, connection cap). No middleware, no
/// auth, no cache: the gap between this and the ceiling is the price of the chosen stack.
async fn floor(listen: &str, canned: Canned) -> AnyResult<()> {
    let canned = Arc::new(canned);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let router = axum::Router::new().route(
        "/api/message_groups",
        axum::routing::get(move || {
            let res = canned.response::<axum::body::Body>();
            async move { res }
        }),
    );
    let opts = cruddur_syncd::http::ServeOptions::from(&cruddur_syncd::config::HttpConfig::default());
    cruddur_syncd::http::serve(listener, router, opts, tokio_util::sync::CancellationToken::new()).await;
    Ok(())
}

async fn store(cfg_path: &str) -> AnyResult<Store> {
    Ok(support::store(&support::load(cfg_path)?).await)
}

fn group_row(owner: UserUuid, i: usize) -> MessageGroup {
    MessageGroup {
        owner,
        sk: Sk::from_instant(Utc::now() - chrono::Duration::minutes(10 + i as i64)),
        message_group_uuid: MessageGroupId(Uuid::new_v4()),
        message: format!("Conversation {i}: see you at the watch club on Friday, bring the \"Rules\"."),
        user_uuid: UserUuid(Uuid::new_v4()),
        user_display_name: format!("Friend Number {i}"),
        user_handle: format!("friend{i}"),
    }
}

async fn populate(cfg: &str, user: Uuid, n: usize) -> AnyResult<()> {
    let store = store(cfg).await?;
    for i in 0..n {
        store.put_if_absent(group_row(UserUuid(user), i).to_item()).await?;
    }
    println!("wrote {n} conversations for {user}");
    Ok(())
}

/// Writes `rate` messages a second for `secs` seconds; for each, the time from PutItem's
/// acknowledgement until `GET /api/messages/{group}` shows it.
async fn freshness(
    cfg_path: &str,
    token: &str,
    group: Uuid,
    rate: u64,
    secs: u64,
    apis: Option<&str>,
) -> AnyResult<()> {
    let loaded = support::load(cfg_path)?;
    let store = support::store(&loaded).await;
    // The newest 40 (inside the cached window of 50): at 50 writes/s a probe stays in that
    // page for most of a second, longer than it takes to appear.
    let listen = loaded.config.http.listen.to_string();
    let bases: Vec<String> = apis.unwrap_or(&listen).split(',').map(|a| a.trim().to_string()).collect();
    let urls: Arc<Vec<String>> =
        Arc::new(bases.iter().map(|b| format!("http://{b}/api/messages/{group}?limit=40")).collect());
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut probes = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        let m = Message {
            group: MessageGroupId(group),
            sk: Sk::from_instant(Utc::now()),
            message_uuid: MessageId(Uuid::new_v4()),
            message: "freshness probe".into(),
            user_uuid: UserUuid(Uuid::nil()),
            user_display_name: "Bench".into(),
            user_handle: "bench".into(),
        };
        let (store, http, urls, token) = (store.clone(), http.clone(), urls.clone(), token.to_string());
        probes.push(tokio::spawn(async move {
            let want = m.message_uuid.to_string();
            store.client().put_item().table_name(store.table()).set_item(Some(m.to_item())).send().await.ok()?;
            let acked = Instant::now();
            // Every instance polled until it shows the write: one latency per instance.
            let mut seen: Vec<Option<Duration>> = vec![None; urls.len()];
            while acked.elapsed() < Duration::from_secs(10) && seen.iter().any(Option::is_none) {
                for (i, url) in urls.iter().enumerate() {
                    if seen[i].is_some() {
                        continue;
                    }
                    let Ok(res) = http.get(url).bearer_auth(&token).send().await else { continue };
                    if res.text().await.is_ok_and(|body| body.contains(&want)) {
                        seen[i] = Some(acked.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Some(seen)
        }));
    }
    let mut per_instance: Vec<Vec<Duration>> = vec![Vec::new(); bases.len()];
    let mut lost = 0;
    for p in probes {
        match p.await? {
            Some(seen) => {
                for (i, s) in seen.into_iter().enumerate() {
                    match s {
                        Some(d) => per_instance[i].push(d),
                        None => lost += 1,
                    }
                }
            }
            None => lost += bases.len(),
        }
    }
    let mut all: Vec<Duration> = per_instance.iter().flatten().copied().collect();
    all.sort();
    for (base, lat) in bases.iter().zip(per_instance.iter_mut()) {
        lat.sort();
        if bases.len() > 1 {
            println!("  {base}: p50 {:.1} ms, p99 {:.1} ms", ms(quantile(lat, 0.50)), ms(quantile(lat, 0.99)));
        }
    }
    println!(
        "freshness: {} writes at {rate}/s for {secs}s on {} instance(s); ack->visible p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; not seen within 10 s: {lost}",
        all.len() / bases.len().max(1),
        bases.len(),
        ms(quantile(&all, 0.50)),
        ms(quantile(&all, 0.99)),
        ms(all.last().copied().unwrap_or_default()),
    );
    Ok(())
}

/// The groups cache holding `n` users' lists of 5 conversations each, filled through the same
/// entry path a load takes.
async fn memory(n: usize) -> AnyResult<()> {
    // Nothing is loaded: every entry is primed, so the in-process store and directory are
    // never read.
    let cfg = CacheConfig { max_bytes: 8 << 30, ..CacheConfig::default() };
    let cache = Arc::new(Cache::new(
        &cfg,
        Duration::from_secs(5),
        Arc::new(ScriptedStore::new()),
        Arc::new(ScriptedUsers::new()),
        Arc::new(Metrics::new()),
    ));
    let before = rss_bytes("self");
    for i in 0..n {
        let user = UserUuid(Uuid::from_u128(i as u128 + 1));
        cache.prime_groups(user, (0..5).map(|j| group_row(user, j)).collect()).await;
    }
    cache.refresh_gauges().await;
    let after = rss_bytes("self");
    println!(
        "memory: {n} cached users x 5 conversations: RSS +{:.1} MiB = {} bytes per cached user ({} per conversation row); cached entries {}",
        (after - before) as f64 / (1 << 20) as f64,
        (after - before) / n.max(1) as u64,
        (after - before) / (n.max(1) as u64 * 5),
        cache.cached_groups(),
    );
    Ok(())
}
