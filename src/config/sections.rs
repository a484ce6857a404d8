//! The sections of the config file, one type each, with their defaults and the checks of
//! meaning that belong to them ([`Validate`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problems;

/// Checks of meaning of one section, run after every key has its type. Checks that involve
/// two sections are `Config::validate`'s.
pub(crate) trait Validate {
    fn validate(&self, p: &mut Problems<'_>);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsConfig {
    pub region: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamodb_endpoint_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams_endpoint_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cognito_endpoint_url: Option<String>,
    /// Fixed dummy credentials for a local emulator (moto accepts any). Only allowed together
    /// with an endpoint override, so it can never silently apply to real AWS.
    pub emulator_credentials: bool,
    /// Per-attempt timeout of every AWS call; a hung connection must not stall a loop.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            endpoint_url: None,
            dynamodb_endpoint_url: None,
            streams_endpoint_url: None,
            cognito_endpoint_url: None,
            emulator_credentials: false,
            call_timeout: Duration::from_secs(10),
        }
    }
}

impl AwsConfig {
    pub fn dynamodb_endpoint(&self) -> Option<&str> {
        self.dynamodb_endpoint_url.as_deref().or(self.endpoint_url.as_deref())
    }
    pub(crate) fn streams_endpoint(&self) -> Option<&str> {
        self.streams_endpoint_url.as_deref().or(self.endpoint_url.as_deref())
    }
    pub(crate) fn cognito_endpoint(&self) -> Option<&str> {
        self.cognito_endpoint_url.as_deref().or(self.endpoint_url.as_deref())
    }
}

impl Validate for AwsConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        if self.region.trim().is_empty() {
            p.bad("region", "must not be empty");
        }
        for (key, value) in [
            ("endpoint_url", &self.endpoint_url),
            ("dynamodb_endpoint_url", &self.dynamodb_endpoint_url),
            ("streams_endpoint_url", &self.streams_endpoint_url),
            ("cognito_endpoint_url", &self.cognito_endpoint_url),
        ] {
            if let Some(Err(e)) = value.as_deref().map(check_http_url) {
                p.bad(key, e);
            }
        }
        let any_endpoint = self.endpoint_url.is_some()
            || self.dynamodb_endpoint_url.is_some()
            || self.streams_endpoint_url.is_some()
            || self.cognito_endpoint_url.is_some();
        if self.emulator_credentials && !any_endpoint {
            p.bad(
                "emulator_credentials",
                "is only allowed with aws.endpoint_url (a local emulator), never against real AWS",
            );
        }
        if self.call_timeout.is_zero() {
            p.bad("call_timeout", "must be greater than 0");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoDbConfig {
    pub table: String,
    pub group_index: String,
}

impl Default for DynamoDbConfig {
    fn default() -> Self {
        Self { table: "cruddur-messages".into(), group_index: "message-group-sk-index".into() }
    }
}

impl Validate for DynamoDbConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        for (key, name) in [("table", &self.table), ("group_index", &self.group_index)] {
            let ok_chars = name.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.'));
            if name.len() < 3 || name.len() > 255 || !ok_chars {
                p.bad(key, format!("{name:?} is not a DynamoDB name (3-255 of a-z A-Z 0-9 _ - .)"));
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub shard_sync_interval: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self { poll_interval: Duration::from_millis(250), shard_sync_interval: Duration::from_secs(10) }
    }
}

impl Validate for StreamConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        if self.poll_interval.is_zero() || self.poll_interval > Duration::from_secs(60) {
            p.bad("poll_interval", "must be between 1ms and 60s");
        }
        if self.shard_sync_interval < Duration::from_secs(1) {
            p.bad("shard_sync_interval", "must be at least 1s (DescribeStream allows about 10 calls a second)");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(with = "size")]
    pub max_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    pub messages_per_group: u32,
    /// How long a `sub -> users.uuid` mapping is kept: every instance of a fleet sees a mapping
    /// changed elsewhere (another instance's reconcile, the CLI) within this.
    #[serde(with = "humantime_serde")]
    pub users_ttl: Duration,
    /// Past its TTL, an entry whose reload fails is served this much longer (with `Age`);
    /// `0s` turns that off.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            ttl: Duration::from_secs(600),
            messages_per_group: 50,
            users_ttl: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(3600),
        }
    }
}

impl Validate for CacheConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        if self.max_bytes < 1024 * 1024 {
            p.bad("max_bytes", "must be at least 1MiB");
        }
        if self.ttl.is_zero() {
            p.bad("ttl", "must be greater than 0");
        }
        if self.users_ttl.is_zero() || self.users_ttl > Duration::from_secs(24 * 3600) {
            p.bad("users_ttl", "must be between 1ms and 24h");
        }
        if self.stale_if_error > Duration::from_secs(7 * 24 * 3600) {
            p.bad("stale_if_error", "must be at most 7d (\"0s\" turns it off)");
        }
        if !(1..=1000).contains(&self.messages_per_group) {
            p.bad("messages_per_group", "must be between 1 and 1000");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub cors_allowed_origins: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections served at once; further ones wait in the kernel's accept queue.
    pub max_connections: u32,
    /// How long a client may take to send its request head (the slowloris guard).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long shutdown waits for in-flight requests before closing them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7077)),
            cors_allowed_origins: Vec::new(),
            request_timeout: Duration::from_secs(5),
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Validate for HttpConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        for origin in &self.cors_allowed_origins {
            if let Err(e) = check_origin(origin) {
                p.bad("cors_allowed_origins", e);
            }
        }
        for (key, d) in [("request_timeout", self.request_timeout), ("header_read_timeout", self.header_read_timeout)] {
            if d.is_zero() {
                p.bad(key, "must be greater than 0");
            }
        }
        if self.max_connections == 0 {
            p.bad("max_connections", "must be at least 1");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9177)) }
    }
}

impl Validate for AdminConfig {
    // Its address is checked against http.listen in `Config::validate`.
    fn validate(&self, _: &mut Problems<'_>) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenUse {
    #[default]
    Access,
    Id,
    Any,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub user_pool_id: String,
    pub client_id: String,
    /// Filled with the pool's AWS issuer after loading when unset.
    pub issuer: String,
    /// Filled with `{issuer}/.well-known/jwks.json` after loading when unset.
    pub jwks_url: String,
    pub token_use: TokenUse,
    /// The JWKS is refetched this often (sooner when its `Cache-Control: max-age` says so), so
    /// that a key the pool stopped publishing stops verifying.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_interval: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            user_pool_id: String::new(),
            client_id: String::new(),
            issuer: String::new(),
            jwks_url: String::new(),
            token_use: TokenUse::default(),
            jwks_refresh_interval: Duration::from_secs(15 * 60),
        }
    }
}

impl Validate for AuthConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        if self.user_pool_id.is_empty() {
            p.bad("user_pool_id", "is required (e.g. \"us-east-1_AbCdEf123\")");
        } else if !self.user_pool_id.contains('_') {
            p.bad("user_pool_id", format!("{:?} is not a Cognito pool id ({{region}}_{{id}})", self.user_pool_id));
        }
        if self.client_id.is_empty() {
            p.bad("client_id", "is required (the app client id of the user pool)");
        }
        if self.jwks_refresh_interval < Duration::from_secs(1)
            || self.jwks_refresh_interval > Duration::from_secs(24 * 3600)
        {
            p.bad("jwks_refresh_interval", "must be between 1s and 24h");
        }
        for (key, url) in [("issuer", &self.issuer), ("jwks_url", &self.jwks_url)] {
            if !url.is_empty() {
                if let Err(e) = check_http_url(url) {
                    p.bad(key, e);
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    pub max_connections: u32,
    /// Bound on connecting and on acquiring a pooled connection; a wrong host fails this fast.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self { url: None, url_file: None, max_connections: 5, connect_timeout: Duration::from_secs(5) }
    }
}

impl PostgresConfig {
    /// The connection URL, whichever key supplied it. `load` guarantees it is present: a
    /// `url_file` is read at load time so an unreadable one fails validation, not first use.
    pub fn connection_url(&self) -> &str {
        self.url.as_deref().unwrap_or_default()
    }
}

impl Validate for PostgresConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        match (&self.url, &self.url_file) {
            (None, None) => p.bad("url", "is required (or postgres.url_file)"),
            (Some(url), _) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    let key = if self.url_file.is_some() { "url_file" } else { "url" };
                    p.bad(key, "must be a postgres:// or postgresql:// URL");
                }
            }
            (None, Some(_)) => {} // the unreadable file was reported where it was read
        }
        if !(1..=100).contains(&self.max_connections) {
            p.bad("max_connections", "must be between 1 and 100");
        }
        if self.connect_timeout.is_zero() {
            p.bad("connect_timeout", "must be greater than 0");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MatchOn {
    #[default]
    Handle,
    Email,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    pub match_on: MatchOn,
    pub cognito_max_rps: u32,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(15 * 60),
            jitter: Duration::from_secs(30),
            match_on: MatchOn::Handle,
            cognito_max_rps: 5,
        }
    }
}

impl Validate for ReconcileConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        if self.interval < Duration::from_secs(1) {
            p.bad("interval", "must be at least 1s");
        }
        if !(1..=50).contains(&self.cognito_max_rps) {
            p.bad("cognito_max_rps", "must be between 1 and 50");
        }
    }
}

/// Where the projector reads a stream it has no checkpoint for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitialPosition {
    /// Every record still retained (24 h): nothing written before the first start is missed.
    #[default]
    TrimHorizon,
    /// Only records written from now on.
    Latest,
}

/// The group projector (`src/projector/`): moves conversation rows to the newest message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectorConfig {
    pub enabled: bool,
    /// How often a standby instance tries to take the projector lock, and how often the leader
    /// checks that its lock connection is still alive.
    #[serde(with = "humantime_serde")]
    pub lock_check_interval: Duration,
    pub initial_position: InitialPosition,
    /// Refusals of a record by DynamoDB (an error answer that retrying cannot fix) before it is
    /// skipped. Transient failures (unreachable, throttled, 5xx) never count: they are retried
    /// until they stop.
    pub max_attempts: u32,
    /// A record whose rows keep changing under the projector (another writer wins every time)
    /// is skipped after this long, so a shard is never blocked for good.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            lock_check_interval: Duration::from_secs(5),
            initial_position: InitialPosition::TrimHorizon,
            max_attempts: 5,
            give_up_after: Duration::from_secs(600),
        }
    }
}

impl Validate for ProjectorConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        if self.lock_check_interval < Duration::from_millis(100) || self.lock_check_interval > Duration::from_secs(600)
        {
            p.bad("lock_check_interval", "must be between 100ms and 10m");
        }
        if !(1..=100).contains(&self.max_attempts) {
            p.bad("max_attempts", "must be between 1 and 100");
        }
        if self.give_up_after < Duration::from_millis(100) || self.give_up_after > Duration::from_secs(6 * 3600) {
            p.bad(
                "give_up_after",
                "must be between 100ms and 6h (stream records are kept 24h; a shard must never wait that long)",
            );
        }
    }
}

/// Fan-out through NATS JetStream (`src/fanout/`): one instance of a fleet reads the stream and
/// publishes every change; every instance's cache follows the JetStream stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FanoutConfig {
    /// `nats://`, `tls://` (TLS required) or a comma-separated list of them; may carry
    /// `user:password@`. Unset: every instance reads DynamoDB Streams itself.
    pub nats_url: Option<String>,
    /// The JetStream stream's name.
    pub stream: String,
    /// Subject prefix: changes go to `{subject}.changes`, changed users to `{subject}.users`.
    pub subject: String,
    /// Copies of the stream in a NATS cluster (1 on a single server, 3 in production).
    pub replicas: u8,
    /// How long JetStream keeps a change (DynamoDB Streams keeps records 24 h).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How often a follower tries the relay lock, and the relay checks its lock connection.
    #[serde(with = "humantime_serde")]
    pub lock_check_interval: Duration,
    /// A NATS credentials file (JWT + nkey seed), read at start.
    pub creds_file: Option<PathBuf>,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            nats_url: None,
            stream: "cruddur_syncd_changes".into(),
            subject: "cruddur_syncd".into(),
            replicas: 1,
            max_age: Duration::from_secs(24 * 3600),
            lock_check_interval: Duration::from_secs(5),
            creds_file: None,
        }
    }
}

impl FanoutConfig {
    /// Fan-out is on.
    pub fn enabled(&self) -> bool {
        self.nats_url.is_some()
    }
}

/// A NATS name (stream) or subject token: letters, digits, `-` and `_`.
fn is_nats_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Validate for FanoutConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        if let Some(url) = &self.nats_url {
            for one in url.split(',').map(str::trim) {
                let parsed = reqwest::Url::parse(one);
                if !parsed.as_ref().is_ok_and(|u| matches!(u.scheme(), "nats" | "tls") && u.host_str().is_some()) {
                    p.bad(
                        "nats_url",
                        "must be nats://host:port or tls://host:port (comma-separated for several servers)",
                    );
                    break;
                }
            }
        }
        if !is_nats_token(&self.stream) {
            p.bad("stream", "must be 1 to 64 letters, digits, '-' or '_'");
        }
        if !self.subject.split('.').all(is_nats_token) {
            p.bad("subject", "must be dot-separated tokens of letters, digits, '-' or '_' (no wildcards)");
        }
        if !(1..=5).contains(&self.replicas) {
            p.bad("replicas", "must be between 1 and 5 (JetStream's limit)");
        }
        if self.max_age < Duration::from_secs(60) || self.max_age > Duration::from_secs(7 * 24 * 3600) {
            p.bad("max_age", "must be between 1m and 7d");
        }
        if self.lock_check_interval < Duration::from_millis(100) || self.lock_check_interval > Duration::from_secs(600)
        {
            p.bad("lock_check_interval", "must be between 100ms and 10m");
        }
        if let Some(path) = &self.creds_file {
            match std::fs::read_to_string(path) {
                Err(e) => p.bad("creds_file", format!("cannot be read ({}): {e}", path.display())),
                Ok(text) => {
                    if let Err(e) = async_nats::ConnectOptions::with_credentials(&text) {
                        p.bad("creds_file", format!("is not a NATS credentials file ({}): {e}", path.display()));
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
    Journald,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    /// One line per API request (method, path, route, status, duration, request id), at
    /// `info` under the target `cruddur_syncd::access`.
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text, access: false }
    }
}

impl Validate for LogConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.level) {
            p.bad("level", format!("{:?} is not a tracing filter: {e}", self.level));
        }
    }
}

/// Sizes are strings such as `"256MiB"`; a bare integer is taken as bytes.
mod size {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        const UNITS: [(&str, u64); 4] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)];
        let (unit, scale) = UNITS.iter().copied().find(|(_, scale)| bytes % scale == 0).unwrap_or(("B", 1));
        s.serialize_str(&format!("{}{unit}", bytes / scale))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(b),
            Raw::Text(t) => t
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| b.0)
                .map_err(|_| serde::de::Error::custom(format!("invalid size {t:?}, expected e.g. \"256MiB\""))),
        }
    }
}

pub(super) fn check_http_url(url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(format!("{url:?} must be an http:// or https:// URL with a host")),
        Err(e) => Err(format!("{url:?} is not a URL: {e}")),
    }
}

fn check_origin(origin: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(origin).map_err(|e| format!("{origin:?} is not an origin: {e}"))?;
    let bare = parsed.path() == "/" && parsed.query().is_none() && !origin.ends_with('/');
    if (parsed.scheme() == "http" || parsed.scheme() == "https") && parsed.host().is_some() && bare {
        Ok(())
    } else {
        Err(format!("{origin:?} is not an origin (scheme://host[:port], no path or trailing slash)"))
    }
}
