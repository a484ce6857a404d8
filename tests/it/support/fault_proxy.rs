//! A fault-injecting HTTP proxy in front of moto: real connections from the daemon's SDK
//! clients, with faults chosen per operation.
//!
//! DynamoDB and DynamoDB Streams speak JSON over `POST /` and name the operation in the
//! `X-Amz-Target` header (`DynamoDB_20120810.Query`, `DynamoDBStreams_20120810.GetRecords`), so
//! a rule is keyed by that header. A request that no rule claims is forwarded to moto as is.
//! Faults: hold the answer back, hang without forwarding (a black hole), close the connection
//! without an answer, answer as DynamoDB does when it throttles, fails or refuses (400
//! `ThrottlingException` / `ProvisionedThroughputExceededException` / `ValidationException`, 500
//! `InternalServerError`), or answer with a body of the test's (an eventually consistent index
//! still showing an older state). A rule can be narrowed to requests whose body contains a
//! string, hit one request in N, and stop after a count, so a storm ends by itself.
//! With `FAULT_PROXY_LOG` set, every forwarded request is printed (operation, status, size, time).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The operation header of the AWS JSON protocols.
const TARGET: &str = "x-amz-target";
/// A rule for every operation.
pub const ANY: &str = "*";

/// What happens to a request a rule claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward it, then hold the answer back this long.
    Delay(Duration),
    /// Do not forward it; hold it until the rule is gone, then close the connection. A network
    /// partition as a client sees it: no answer, no error, until its own timeout.
    Hang,
    /// Do not forward it; close the connection without an answer.
    Drop,
    /// 400 `ThrottlingException`.
    Throttling,
    /// 400 `ProvisionedThroughputExceededException`.
    ProvisionedThroughputExceeded,
    /// 500 `InternalServerError`.
    InternalServerError,
    /// 400 `ValidationException`: DynamoDB refusing the request itself.
    ValidationException,
    /// 200 with this JSON body instead of moto's answer.
    Answer(String),
}

/// A fault for the requests of one operation (or [`ANY`]).
#[derive(Debug, Clone)]
pub struct Rule {
    op: String,
    fault: Fault,
    /// Hit one matching request in this many (the first, then every `one_in`-th).
    one_in: u64,
    /// Stop after this many hits.
    times: Option<u64>,
    /// Only requests whose body contains every one of these.
    body_contains: Vec<String>,
}

impl Rule {
    /// `fault` for every request whose `X-Amz-Target` is `op` ([`ANY`]: every request).
    pub fn on(op: &str, fault: Fault) -> Rule {
        Rule { op: op.to_string(), fault, one_in: 1, times: None, body_contains: Vec::new() }
    }

    /// Only one matching request in `n` (the others pass).
    pub fn one_in(mut self, n: u64) -> Rule {
        self.one_in = n.max(1);
        self
    }

    /// At most `n` hits, then the rule passes everything.
    pub fn times(mut self, n: u64) -> Rule {
        self.times = Some(n);
        self
    }

    /// Only requests whose body contains `needle` (a table, an index, a key value), and every
    /// other needle given before.
    pub fn when_body_contains(mut self, needle: &str) -> Rule {
        self.body_contains.push(needle.to_string());
        self
    }
}

struct Active {
    rule: Rule,
    seen: u64,
    hits: u64,
}

struct State {
    rules: Mutex<Vec<Active>>,
    /// Bumped whenever the rules change, so hanging requests notice their rule is gone.
    generation: watch::Sender<u64>,
    /// Faults injected, per operation.
    injected: Mutex<HashMap<String, u64>>,
    /// Requests forwarded to moto, per operation.
    forwarded: Mutex<HashMap<String, u64>>,
    down: AtomicBool,
    delay_ms: AtomicU64,
}

pub struct FaultProxy {
    pub url: String,
    state: Arc<State>,
}

/// The service's answer when the connection must close without one.
#[derive(Debug)]
struct CloseConnection;

impl std::fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault: close the connection")
    }
}

impl std::error::Error for CloseConnection {}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`http://127.0.0.1:PORT`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            rules: Mutex::default(),
            generation: watch::channel(0).0,
            injected: Mutex::default(),
            forwarded: Mutex::default(),
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
        });
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let upstream = upstream.trim_end_matches('/').to_string();
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if shared.down.load(Ordering::Relaxed) {
                    drop(stream); // "down": every connection is closed at once
                    continue;
                }
                let (state, client, upstream) = (shared.clone(), client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), client.clone(), upstream.clone(), req));
                    // An error here is a fault closing the connection, or the client leaving.
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        FaultProxy { url, state }
    }

    /// Adds a rule; rules are tried in the order they were added, the first that claims a
    /// request decides.
    pub fn inject(&self, rule: Rule) {
        self.state.rules.lock().unwrap().push(Active { rule, seen: 0, hits: 0 });
        self.bump();
    }

    /// Removes every rule; requests hanging in a [`Fault::Hang`] are then closed.
    pub fn clear(&self) {
        self.state.rules.lock().unwrap().clear();
        self.bump();
    }

    /// How many requests of `op` got a fault ([`ANY`]: of all operations).
    pub fn injected(&self, op: &str) -> u64 {
        count(&self.state.injected, op)
    }

    /// How many requests of `op` were forwarded to moto ([`ANY`]: of all operations).
    pub fn forwarded(&self, op: &str) -> u64 {
        count(&self.state.forwarded, op)
    }

    /// While down, every connection is closed at once, new ones at accept and pooled ones at
    /// their next request.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::Relaxed);
    }

    /// Holds every answer back this long (applies to answers already being held, too).
    pub fn set_delay(&self, d: Duration) {
        self.state.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    fn bump(&self) {
        self.state.generation.send_modify(|n| *n += 1);
    }
}

fn count(map: &Mutex<HashMap<String, u64>>, op: &str) -> u64 {
    let map = map.lock().unwrap();
    if op == ANY {
        map.values().sum()
    } else {
        map.get(op).copied().unwrap_or(0)
    }
}

fn bump_count(map: &Mutex<HashMap<String, u64>>, op: &str) {
    *map.lock().unwrap().entry(op.to_string()).or_default() += 1;
}

/// The fault for a request of `op` with `body`, if a rule claims it.
fn pick(state: &State, op: &str, body: &[u8]) -> Option<Fault> {
    let mut rules = state.rules.lock().unwrap();
    for a in rules.iter_mut() {
        if a.rule.op != ANY && a.rule.op != op {
            continue;
        }
        let has = |needle: &String| body.windows(needle.len()).any(|w| w == needle.as_bytes());
        if !a.rule.body_contains.iter().all(has) {
            continue;
        }
        if a.rule.times.is_some_and(|t| a.hits >= t) {
            continue;
        }
        let turn = a.seen % a.rule.one_in == 0;
        a.seen += 1;
        if turn {
            a.hits += 1;
            return Some(a.rule.fault.clone());
        }
    }
    None
}

async fn handle(
    state: Arc<State>,
    client: reqwest::Client,
    upstream: String,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, CloseConnection> {
    if state.down.load(Ordering::Relaxed) {
        return Err(CloseConnection);
    }
    // Subscribed before the rule is picked, so a clear that comes right after is not missed.
    let mut generation = state.generation.subscribe();
    let op = req.headers().get(TARGET).and_then(|v| v.to_str().ok()).unwrap_or("(none)").to_string();
    let started = tokio::time::Instant::now();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| CloseConnection)?.to_bytes();
    let fault = pick(&state, &op, &body);
    if let Some(f) = &fault {
        bump_count(&state.injected, &op);
        match f {
            Fault::Hang => {
                // Held until the rules change (cleared, or replaced); then the connection dies.
                let _ = generation.changed().await;
                return Err(CloseConnection);
            }
            Fault::Drop => return Err(CloseConnection),
            Fault::Throttling => {
                return Ok(aws_error(400, "ThrottlingException", "Rate of requests exceeds the allowed throughput."))
            }
            Fault::ProvisionedThroughputExceeded => {
                return Ok(aws_error(
                    400,
                    "ProvisionedThroughputExceededException",
                    "The level of configured provisioned throughput for the table was exceeded.",
                ))
            }
            Fault::InternalServerError => return Ok(aws_error(500, "InternalServerError", "Internal server error")),
            Fault::ValidationException => {
                return Ok(aws_error(400, "ValidationException", "One or more parameter values were invalid"))
            }
            Fault::Answer(json) => {
                let mut res = Response::new(Full::new(Bytes::from(json.clone())));
                let h = res.headers_mut();
                h.insert("content-type", "application/x-amz-json-1.0".parse().unwrap());
                h.insert("x-amzn-requestid", uuid::Uuid::new_v4().to_string().parse().unwrap());
                return Ok(res);
            }
            Fault::Delay(_) => {}
        }
    }

    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = client.request(parts.method.clone(), format!("{upstream}{path}"));
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str()) {
            out = out.header(name, value);
        }
    }
    // moto unreachable: the daemon sees what it would see without the proxy, a dead connection.
    let answer = out.body(body).send().await.map_err(|_| CloseConnection)?;
    bump_count(&state.forwarded, &op);
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.map_err(|_| CloseConnection)?;
    if std::env::var_os("FAULT_PROXY_LOG").is_some() {
        eprintln!("fault proxy: {op} {status} {} bytes in {:?}", bytes.len(), started.elapsed());
    }

    // Hold the answer back: a rule's delay, and the global one as it is now (it may change while
    // we wait, so that lowering it releases answers already held).
    let rule_delay = match fault {
        Some(Fault::Delay(d)) => d,
        _ => Duration::ZERO,
    };
    loop {
        let global = Duration::from_millis(state.delay_ms.load(Ordering::Relaxed));
        let until = started + rule_delay.max(global);
        let now = tokio::time::Instant::now();
        if now >= until {
            break;
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
    }
    if state.down.load(Ordering::Relaxed) {
        return Err(CloseConnection);
    }

    let mut res = Response::new(Full::new(bytes));
    *res.status_mut() = status;
    for (name, value) in &headers {
        if !is_hop_by_hop(name.as_str()) {
            res.headers_mut().append(name, value.clone());
        }
    }
    Ok(res)
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "host" | "connection" | "keep-alive" | "transfer-encoding" | "content-length" | "te" | "trailer" | "upgrade"
    )
}

/// An error answer in the AWS JSON 1.0 shape the SDKs parse (`__type` names the code).
fn aws_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "__type": format!("com.amazonaws.dynamodb.v20120810#{code}"),
        "message": message,
    });
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    let h = res.headers_mut();
    h.insert("content-type", "application/x-amz-json-1.0".parse().unwrap());
    h.insert("x-amzn-errortype", code.parse().unwrap());
    h.insert("x-amzn-requestid", uuid::Uuid::new_v4().to_string().parse().unwrap());
    res
}
