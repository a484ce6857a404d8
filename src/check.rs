//! `cruddur-syncd check`: what the config says, and whether each dependency answers.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::aws::errors::code as sdk_code;
use crate::aws::from_sdk;
use crate::aws::Clients;
use crate::config::LoadedConfig;
use crate::error::{Error, Result};
use crate::pg;

/// Every probe gives up after this, so `check` never hangs on a black-holed address.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Probe {
    pub name: &'static str,
    pub ok: bool,
    pub latency: Duration,
    pub endpoint: String,
    pub detail: String,
}

async fn timed(name: &'static str, endpoint: String, work: impl Future<Output = Result<String>>) -> Probe {
    let started = Instant::now();
    let outcome = match tokio::time::timeout(PROBE_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Unavailable(format!("no answer within {}s", PROBE_TIMEOUT.as_secs()))),
    };
    let (ok, detail) = match outcome {
        Ok(d) => (true, d),
        Err(e) => (false, e.to_string()),
    };
    Probe { name, ok, latency: started.elapsed(), endpoint, detail }
}

/// Runs all probes concurrently, so the slowest bounds the whole check.
pub async fn probes(loaded: &LoadedConfig, clients: &Clients) -> Vec<Probe> {
    let cfg = &loaded.config;
    let table = cfg.dynamodb.table.clone();
    let ddb = timed("dynamodb", clients.endpoints.dynamodb.clone(), probe_dynamodb(clients, &table));
    let streams = timed("streams", clients.endpoints.streams.clone(), probe_streams(clients, &table));
    let cognito = timed("cognito", clients.endpoints.cognito.clone(), probe_cognito(clients, &cfg.auth.user_pool_id));
    let jwks = timed("jwks", cfg.auth.jwks_url.clone(), probe_jwks(&cfg.auth.jwks_url));
    let pg_endpoint = pg::options(&cfg.postgres).map(|o| pg::describe(&o)).unwrap_or_else(|_| "(bad url)".into());
    let postgres = timed("postgres", pg_endpoint, probe_postgres(loaded));
    let (a, b, c, d, e) = tokio::join!(ddb, streams, cognito, jwks, postgres);
    vec![a, b, c, d, e]
}

async fn probe_dynamodb(clients: &Clients, table: &str) -> Result<String> {
    let ep = &clients.endpoints.dynamodb;
    let out = match clients.dynamodb.describe_table().table_name(table).send().await {
        Ok(o) => o,
        Err(e) if sdk_code(&e) == Some("ResourceNotFoundException") => {
            return Err(Error::Failed(format!("table {table} does not exist (run `cruddur-syncd ddb schema-load`)")))
        }
        Err(e) => return Err(from_sdk(format!("DescribeTable {table} at {ep}"), e)),
    };
    let t = out.table.ok_or_else(|| Error::Failed(format!("DescribeTable {table} returned no table")))?;
    let status = t.table_status().map(|s| s.as_str()).unwrap_or("UNKNOWN");
    let stream = t.stream_specification().filter(|s| s.stream_enabled());
    match stream.and_then(|s| s.stream_view_type()) {
        Some(view) => Ok(format!("table {table} {status}, stream {}", view.as_str())),
        None => Err(Error::Failed(format!(
            "table {table} {status} has no stream enabled (run `cruddur-syncd ddb schema-load` to enable it)"
        ))),
    }
}

async fn probe_streams(clients: &Clients, table: &str) -> Result<String> {
    let ep = &clients.endpoints.dynamodb;
    let t = clients
        .dynamodb
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| from_sdk(format!("DescribeTable {table} at {ep}"), e))?
        .table
        .ok_or_else(|| Error::Failed(format!("DescribeTable {table} returned no table")))?;
    let arn = t
        .latest_stream_arn()
        .filter(|_| t.stream_specification().is_some_and(|s| s.stream_enabled()))
        .ok_or_else(|| Error::Failed(format!("table {table} has no stream")))?;
    let sep = &clients.endpoints.streams;
    let d = clients
        .streams
        .describe_stream()
        .stream_arn(arn)
        .send()
        .await
        .map_err(|e| from_sdk(format!("DescribeStream {arn} at {sep}"), e))?
        .stream_description
        .ok_or_else(|| Error::Failed(format!("DescribeStream {arn} returned no description")))?;
    let status = d.stream_status().map(|s| s.as_str()).unwrap_or("UNKNOWN");
    let more = if d.last_evaluated_shard_id().is_some() { "+" } else { "" };
    Ok(format!("stream {status}, {}{more} shard(s), {arn}", d.shards().len()))
}

async fn probe_cognito(clients: &Clients, pool_id: &str) -> Result<String> {
    let ep = &clients.endpoints.cognito;
    let pool = clients
        .cognito
        .describe_user_pool()
        .user_pool_id(pool_id)
        .send()
        .await
        .map_err(|e| from_sdk(format!("DescribeUserPool {pool_id} at {ep}"), e))?
        .user_pool
        .ok_or_else(|| Error::Failed(format!("DescribeUserPool {pool_id} returned no pool")))?;
    Ok(format!("pool {pool_id} ({})", pool.name().unwrap_or("unnamed")))
}

async fn probe_jwks(url: &str) -> Result<String> {
    let client = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .build()
        .map_err(|e| Error::Failed(format!("cannot build an HTTP client: {e}")))?;
    let resp = client.get(url).send().await.map_err(|e| Error::Unavailable(format!("GET {url}: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(Error::Failed(format!("GET {url} answered {status}")));
    }
    let body: serde_json::Value =
        resp.json().await.map_err(|e| Error::Failed(format!("GET {url} did not return JSON: {e}")))?;
    let keys = body.get("keys").and_then(|k| k.as_array()).map_or(0, Vec::len);
    if keys == 0 {
        return Err(Error::Failed(format!("GET {url} returned no keys")));
    }
    Ok(format!("{keys} key(s)"))
}

async fn probe_postgres(loaded: &LoadedConfig) -> Result<String> {
    let cfg = &loaded.config.postgres;
    let opts = pg::options(cfg)?;
    let target = pg::describe(&opts);
    let pool = pg::connect_with(cfg, opts).await?;
    let found: Result<(Option<String>, i64), sqlx::Error> = async {
        let (table,): (Option<String>,) =
            sqlx::query_as("SELECT to_regclass('public.users')::text").fetch_one(&pool).await?;
        if table.is_none() {
            return Ok((None, 0));
        }
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM public.users").fetch_one(&pool).await?;
        Ok((table, n))
    }
    .await;
    pool.close().await;
    match found.map_err(|e| pg::query_error(&target, "checking public.users", e))? {
        (Some(_), n) => Ok(format!("public.users present, {n} row(s)")),
        (None, _) => {
            Err(Error::Failed("table public.users does not exist (run `cruddur-syncd db schema-load`)".into()))
        }
    }
}

/// Prints the effective config and the probe lines; the result says whether all passed.
pub fn render(loaded: &LoadedConfig, probes: &[Probe], out: &mut impl Write) -> std::io::Result<bool> {
    writeln!(out, "config {}", loaded.path.display())?;
    let entries = loaded.effective();
    let width = entries.iter().map(|e| e.key.len()).max().unwrap_or(0);
    for e in &entries {
        writeln!(out, "  {:width$} = {}  ({})", e.key, e.value, e.source)?;
    }
    writeln!(out, "dependencies")?;
    for p in probes {
        writeln!(
            out,
            "  {:4}  {:8}  {:>6}ms  {}  {}",
            if p.ok { "ok" } else { "FAIL" },
            p.name,
            p.latency.as_millis(),
            p.endpoint,
            p.detail
        )?;
    }
    Ok(probes.iter().all(|p| p.ok))
}
