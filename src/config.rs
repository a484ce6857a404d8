//! Typed configuration: one TOML file, overridden key by key from the environment.
//!
//! Loading is deliberately two-phase. Each key is first deserialized on its own (so one bad key
//! never hides another), then the whole tree is validated for meaning (ranges, formats, keys that
//! only make sense together). Every problem found in either phase is reported at once, because an
//! operator fixing a config should not have to restart the daemon once per typo.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Env var naming the config file when `--config` is absent.
pub const CONFIG_PATH_ENV: &str = "CRUDDUR_SYNCD_CONFIG";
/// Where a packaged install keeps its config.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cruddur-syncd/config.toml";
/// Prefix of per-key overrides: `CRUDDUR_SYNCD__POSTGRES__URL`.
pub const ENV_PREFIX: &str = "CRUDDUR_SYNCD__";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub aws: AwsConfig,
    pub dynamodb: DynamoDbConfig,
    pub stream: StreamConfig,
    pub cache: CacheConfig,
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub postgres: PostgresConfig,
    pub reconcile: ReconcileConfig,
    pub projector: ProjectorConfig,
    pub log: LogConfig,
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
    pub fn streams_endpoint(&self) -> Option<&str> {
        self.streams_endpoint_url.as_deref().or(self.endpoint_url.as_deref())
    }
    pub fn cognito_endpoint(&self) -> Option<&str> {
        self.cognito_endpoint_url.as_deref().or(self.endpoint_url.as_deref())
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
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            ttl: Duration::from_secs(600),
            messages_per_group: 50,
            users_ttl: Duration::from_secs(60),
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
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

/// Sizes are strings such as `"256MiB"`; a bare integer is taken as bytes.
mod size {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        const UNITS: [(&str, u64); 4] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)];
        let (unit, scale) = UNITS.iter().copied().find(|(_, scale)| bytes % scale == 0).unwrap_or(("B", 1));
        s.serialize_str(&format!("{}{unit}", bytes / scale))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
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

/// Where a value came from, printed by `check` so an operator can see which layer won.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File => f.write_str("file"),
            Source::Env(var) => write!(f, "env {var}"),
        }
    }
}

/// One thing wrong with a configuration, naming where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `section.key`, or the section/file when no single key is at fault.
    pub key: String,
    /// The file or env var that supplied the bad value, when one did.
    pub origin: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) => write!(f, "{} ({origin}): {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path} is not valid TOML: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("{}", render_problems(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!("config {} has {} problem(s):", path.display(), problems.len());
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.to_string());
    }
    out
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// A validated config together with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub config: Config,
    sources: BTreeMap<String, Source>,
}

/// The config path as the CLI contract resolves it: flag, then env, then the packaged default.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os(CONFIG_PATH_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

/// Read, override from the process environment, and validate.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Read { path: path.to_path_buf(), reason: io_reason(&e) })?;
    load_from_str(path, &text, std::env::vars())
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file (pass --config or set CRUDDUR_SYNCD_CONFIG)".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// The pure core of `load`, with the environment passed in so tests need not mutate the process.
pub fn load_from_str(
    path: &Path,
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<LoadedConfig, ConfigError> {
    let file_table: toml::Table = toml::from_str(text)
        .map_err(|e| ConfigError::Syntax { path: path.to_path_buf(), reason: one_line(&e.to_string()) })?;
    let file_origin = path.display().to_string();
    let mut problems = Vec::new();
    let mut sources = BTreeMap::new();
    // section -> key -> candidate values, in the order they should be tried
    let mut merged: BTreeMap<String, BTreeMap<String, (Vec<toml::Value>, String)>> = BTreeMap::new();

    for (section, value) in file_table {
        match value {
            toml::Value::Table(keys) => {
                for (key, v) in keys {
                    sources.insert(format!("{section}.{key}"), Source::File);
                    merged.entry(section.clone()).or_default().insert(key, (vec![v], file_origin.clone()));
                }
            }
            _ => problems.push(Problem {
                key: section,
                origin: Some(file_origin.clone()),
                message: "expected a [section] table".into(),
            }),
        }
    }

    let mut env: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    env.sort();
    for (var, raw) in env {
        let rest = &var[ENV_PREFIX.len()..];
        let Some((section, key)) = rest.split_once("__") else {
            problems.push(Problem {
                key: var.clone(),
                origin: None,
                message: "override variables are named CRUDDUR_SYNCD__<SECTION>__<KEY>".into(),
            });
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        sources.insert(format!("{section}.{key}"), Source::Env(var.clone()));
        merged.entry(section).or_default().insert(key, (env_candidates(&raw), format!("env {var}")));
    }

    let mut tree = toml::Table::new();
    for (section, keys) in merged {
        if !SECTIONS.contains(&section.as_str()) {
            let origins: std::collections::BTreeSet<String> = keys.into_values().map(|(_, origin)| origin).collect();
            for origin in origins {
                problems.push(Problem {
                    key: section.clone(),
                    origin: Some(origin),
                    message: "unknown section".into(),
                });
            }
            continue;
        }
        let mut accepted = toml::Table::new();
        for (key, (candidates, origin)) in keys {
            match accept_key(&section, &key, candidates) {
                Ok(v) => {
                    accepted.insert(key, v);
                }
                Err(message) => {
                    sources.remove(&format!("{section}.{key}"));
                    problems.push(Problem { key: format!("{section}.{key}"), origin: Some(origin), message });
                }
            }
        }
        tree.insert(section, toml::Value::Table(accepted));
    }

    // Every key in `tree` was accepted on its own, so this cannot fail on a single key; a
    // failure here would be a bug in accept_key, reported rather than unwrapped.
    let mut config: Config = match toml::Value::Table(tree).try_into() {
        Ok(c) => c,
        Err(e) => {
            problems.push(Problem {
                key: "config".into(),
                origin: Some(file_origin),
                message: one_line(&e.to_string()),
            });
            Config::default()
        }
    };

    resolve_derived(&mut config, &mut sources, &mut problems);
    problems.extend(validate(&config));
    if problems.is_empty() {
        Ok(LoadedConfig { path: path.to_path_buf(), config, sources })
    } else {
        Err(ConfigError::Invalid { path: path.to_path_buf(), problems })
    }
}

/// Env values are strings; a string-typed key takes them verbatim, other keys take them as a
/// TOML literal (`5`, `true`, `["a","b"]`). Trying both keeps `CLIENT_ID=12345` a string.
fn env_candidates(raw: &str) -> Vec<toml::Value> {
    let mut out = vec![toml::Value::String(raw.to_string())];
    if let Ok(t) = format!("v = {raw}").parse::<toml::Table>() {
        if let Some(v) = t.get("v") {
            out.push(v.clone());
        }
    }
    out
}

const SECTIONS: &[&str] =
    &["aws", "dynamodb", "stream", "cache", "http", "admin", "auth", "postgres", "reconcile", "projector", "log"];

/// Deserializes one key in isolation through its section's own type, so type errors name the
/// key and unknown keys are caught with the same `deny_unknown_fields` the full parse uses.
fn accept_key(section: &str, key: &str, candidates: Vec<toml::Value>) -> Result<toml::Value, String> {
    let check: fn(toml::Table) -> Result<(), String> = match section {
        "aws" => probe::<AwsConfig>,
        "dynamodb" => probe::<DynamoDbConfig>,
        "stream" => probe::<StreamConfig>,
        "cache" => probe::<CacheConfig>,
        "http" => probe::<HttpConfig>,
        "admin" => probe::<AdminConfig>,
        "auth" => probe::<AuthConfig>,
        "postgres" => probe::<PostgresConfig>,
        "reconcile" => probe::<ReconcileConfig>,
        "projector" => probe::<ProjectorConfig>,
        "log" => probe::<LogConfig>,
        _ => return Err(format!("unknown section [{section}]")),
    };
    let mut first_err = None;
    for v in candidates {
        let mut t = toml::Table::new();
        t.insert(key.to_string(), v.clone());
        match check(t) {
            Ok(()) => return Ok(v),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| "no value".into()))
}

fn probe<T: DeserializeOwned>(t: toml::Table) -> Result<(), String> {
    toml::Value::Table(t).try_into::<T>().map(|_| ()).map_err(|e| {
        let msg = one_line(&e.to_string());
        if msg.contains("unknown field") {
            "unknown key".to_string()
        } else {
            msg
        }
    })
}

fn one_line(s: &str) -> String {
    // toml's errors span several lines: the message, a caret diagram, "in `key`". Keep the
    // message; the key is named by the caller.
    let kept: Vec<&str> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.starts_with('^') && !l.starts_with("in `"))
        .filter(|l| !l.starts_with("TOML parse error"))
        .collect();
    let line = if kept.is_empty() { s.trim().to_string() } else { kept.join("; ") };
    line.trim_end_matches('.').to_string()
}

/// Fills keys whose defaults depend on other keys, and reads `postgres.url_file`.
fn resolve_derived(c: &mut Config, sources: &mut BTreeMap<String, Source>, problems: &mut Vec<Problem>) {
    if c.auth.issuer.is_empty() && !c.auth.user_pool_id.is_empty() {
        c.auth.issuer = format!("https://cognito-idp.{}.amazonaws.com/{}", c.aws.region, c.auth.user_pool_id);
    }
    if c.auth.jwks_url.is_empty() && !c.auth.issuer.is_empty() {
        c.auth.jwks_url = format!("{}/.well-known/jwks.json", c.auth.issuer.trim_end_matches('/'));
    }
    if let (None, Some(file)) = (&c.postgres.url, &c.postgres.url_file) {
        match std::fs::read_to_string(file) {
            Ok(text) if !text.trim().is_empty() => c.postgres.url = Some(text.trim().to_string()),
            Ok(_) => problems.push(Problem {
                key: "postgres.url_file".into(),
                origin: None,
                message: format!("{} is empty", file.display()),
            }),
            Err(e) => problems.push(Problem {
                key: "postgres.url_file".into(),
                origin: None,
                message: format!("cannot read {}: {}", file.display(), io_reason_plain(&e)),
            }),
        }
        // The url now shown is derived from the file, which is where it came from.
        if let Some(src) = sources.get("postgres.url_file").cloned() {
            sources.insert("postgres.url".into(), src);
        }
    } else if c.postgres.url.is_some() && c.postgres.url_file.is_some() {
        problems.push(Problem {
            key: "postgres.url_file".into(),
            origin: None,
            message: "set either postgres.url or postgres.url_file, not both".into(),
        });
    }
}

fn io_reason_plain(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Checks of meaning, run after every key has its type.
pub fn validate(c: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut bad = |key: &str, message: String| p.push(Problem { key: key.into(), origin: None, message });

    if c.aws.region.trim().is_empty() {
        bad("aws.region", "must not be empty".into());
    }
    for (key, value) in [
        ("aws.endpoint_url", &c.aws.endpoint_url),
        ("aws.dynamodb_endpoint_url", &c.aws.dynamodb_endpoint_url),
        ("aws.streams_endpoint_url", &c.aws.streams_endpoint_url),
        ("aws.cognito_endpoint_url", &c.aws.cognito_endpoint_url),
    ] {
        if let Some(url) = value {
            if let Err(e) = check_http_url(url) {
                bad(key, e);
            }
        }
    }
    if c.aws.emulator_credentials
        && c.aws.endpoint_url.is_none()
        && c.aws.dynamodb_endpoint_url.is_none()
        && c.aws.streams_endpoint_url.is_none()
        && c.aws.cognito_endpoint_url.is_none()
    {
        bad(
            "aws.emulator_credentials",
            "is only allowed with aws.endpoint_url (a local emulator), never against real AWS".into(),
        );
    }
    if c.aws.call_timeout.is_zero() {
        bad("aws.call_timeout", "must be greater than 0".into());
    }
    for (key, name) in [("dynamodb.table", &c.dynamodb.table), ("dynamodb.group_index", &c.dynamodb.group_index)] {
        let ok_chars = name.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.'));
        if name.len() < 3 || name.len() > 255 || !ok_chars {
            bad(key, format!("{name:?} is not a DynamoDB name (3-255 of a-z A-Z 0-9 _ - .)"));
        }
    }
    if c.stream.poll_interval.is_zero() || c.stream.poll_interval > Duration::from_secs(60) {
        bad("stream.poll_interval", "must be between 1ms and 60s".into());
    }
    if c.stream.shard_sync_interval < Duration::from_secs(1) {
        bad("stream.shard_sync_interval", "must be at least 1s (DescribeStream allows about 10 calls a second)".into());
    }
    if c.cache.max_bytes < 1024 * 1024 {
        bad("cache.max_bytes", "must be at least 1MiB".into());
    }
    if c.cache.ttl.is_zero() {
        bad("cache.ttl", "must be greater than 0".into());
    }
    if c.cache.users_ttl.is_zero() || c.cache.users_ttl > Duration::from_secs(24 * 3600) {
        bad("cache.users_ttl", "must be between 1ms and 24h".into());
    }
    if !(1..=1000).contains(&c.cache.messages_per_group) {
        bad("cache.messages_per_group", "must be between 1 and 1000".into());
    }
    for origin in &c.http.cors_allowed_origins {
        if let Err(e) = check_origin(origin) {
            bad("http.cors_allowed_origins", e);
        }
    }
    for (key, d) in
        [("http.request_timeout", c.http.request_timeout), ("http.header_read_timeout", c.http.header_read_timeout)]
    {
        if d.is_zero() {
            bad(key, "must be greater than 0".into());
        }
    }
    if c.http.max_connections == 0 {
        bad("http.max_connections", "must be at least 1".into());
    }
    if c.http.listen.port() != 0 && c.http.listen == c.admin.listen {
        bad(
            "admin.listen",
            format!("{} is also http.listen; the admin listener needs its own address", c.admin.listen),
        );
    }
    if c.auth.user_pool_id.is_empty() {
        bad("auth.user_pool_id", "is required (e.g. \"us-east-1_AbCdEf123\")".into());
    } else if !c.auth.user_pool_id.contains('_') {
        bad("auth.user_pool_id", format!("{:?} is not a Cognito pool id ({{region}}_{{id}})", c.auth.user_pool_id));
    }
    if c.auth.client_id.is_empty() {
        bad("auth.client_id", "is required (the app client id of the user pool)".into());
    }
    if c.auth.jwks_refresh_interval < Duration::from_secs(1)
        || c.auth.jwks_refresh_interval > Duration::from_secs(24 * 3600)
    {
        bad("auth.jwks_refresh_interval", "must be between 1s and 24h".into());
    }
    for (key, url) in [("auth.issuer", &c.auth.issuer), ("auth.jwks_url", &c.auth.jwks_url)] {
        if !url.is_empty() {
            if let Err(e) = check_http_url(url) {
                bad(key, e);
            }
        }
    }
    match (&c.postgres.url, &c.postgres.url_file) {
        (None, None) => bad("postgres.url", "is required (or postgres.url_file)".into()),
        (Some(url), _) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                bad(
                    if c.postgres.url_file.is_some() { "postgres.url_file" } else { "postgres.url" },
                    "must be a postgres:// or postgresql:// URL".into(),
                );
            }
        }
        (None, Some(_)) => {} // the unreadable file was reported where it was read
    }
    if !(1..=100).contains(&c.postgres.max_connections) {
        bad("postgres.max_connections", "must be between 1 and 100".into());
    }
    if c.postgres.connect_timeout.is_zero() {
        bad("postgres.connect_timeout", "must be greater than 0".into());
    }
    if c.reconcile.interval < Duration::from_secs(1) {
        bad("reconcile.interval", "must be at least 1s".into());
    }
    if !(1..=50).contains(&c.reconcile.cognito_max_rps) {
        bad("reconcile.cognito_max_rps", "must be between 1 and 50".into());
    }
    if c.projector.lock_check_interval < Duration::from_millis(100)
        || c.projector.lock_check_interval > Duration::from_secs(600)
    {
        bad("projector.lock_check_interval", "must be between 100ms and 10m".into());
    }
    if !(1..=100).contains(&c.projector.max_attempts) {
        bad("projector.max_attempts", "must be between 1 and 100".into());
    }
    if c.projector.give_up_after < Duration::from_millis(100)
        || c.projector.give_up_after > Duration::from_secs(6 * 3600)
    {
        bad(
            "projector.give_up_after",
            "must be between 100ms and 6h (stream records are kept 24h; a shard must never wait that long)".into(),
        );
    }
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&c.log.level) {
        bad("log.level", format!("{:?} is not a tracing filter: {e}", c.log.level));
    }
    p
}

fn check_http_url(url: &str) -> Result<(), String> {
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

/// One line of the effective config as `check` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveEntry {
    pub key: String,
    pub value: String,
    pub source: Source,
}

impl LoadedConfig {
    pub fn source_of(&self, key: &str) -> Source {
        self.sources.get(key).cloned().unwrap_or(Source::Default)
    }

    /// Every set key with its value (secrets redacted) and where it came from.
    pub fn effective(&self) -> Vec<EffectiveEntry> {
        let mut out = Vec::new();
        let Ok(toml::Value::Table(tree)) = toml::Value::try_from(&self.config) else {
            return out;
        };
        for (section, keys) in tree {
            let toml::Value::Table(keys) = keys else { continue };
            for (key, value) in keys {
                let full = format!("{section}.{key}");
                let value = if full == "postgres.url" {
                    value.as_str().map(redact_url).unwrap_or_default()
                } else {
                    value.to_string()
                };
                out.push(EffectiveEntry { source: self.source_of(&full), key: full, value });
            }
        }
        out
    }
}

/// Hides the password of a connection URL but keeps what an operator needs to see: user,
/// host, port and database.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("REDACTED"));
            }
            format!("{:?}", u.to_string())
        }
        Err(_) => "\"(unparseable, hidden)\"".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[auth]
user_pool_id = "us-east-1_abc"
client_id = "client"
[postgres]
url = "postgres://postgres@127.0.0.1:5432/cruddur"
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<LoadedConfig, ConfigError> {
        load_from_str(Path::new("/t/config.toml"), text, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_fill_everything_but_the_required_keys() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.config.stream.poll_interval, Duration::from_millis(250));
        assert_eq!(c.config.cache.max_bytes, 256 * 1024 * 1024);
        assert_eq!(c.config.auth.issuer, "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_abc");
        assert_eq!(
            c.config.auth.jwks_url,
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_abc/.well-known/jwks.json"
        );
        assert_eq!(c.source_of("auth.client_id"), Source::File);
        assert_eq!(c.source_of("cache.ttl"), Source::Default);
    }

    #[test]
    fn env_string_key_keeps_digits_as_string() {
        let c = load(MINIMAL, &[("CRUDDUR_SYNCD__AUTH__CLIENT_ID", "12345")]).unwrap();
        assert_eq!(c.config.auth.client_id, "12345");
        assert_eq!(c.source_of("auth.client_id"), Source::Env("CRUDDUR_SYNCD__AUTH__CLIENT_ID".into()));
    }

    #[test]
    fn sizes_and_durations_parse_from_strings() {
        let text = format!("{MINIMAL}\n[cache]\nmax_bytes = \"64MiB\"\nttl = \"1h 30m\"\n");
        let c = load(&text, &[]).unwrap();
        assert_eq!(c.config.cache.max_bytes, 64 * 1024 * 1024);
        assert_eq!(c.config.cache.ttl, Duration::from_secs(5400));
    }

    #[test]
    fn redaction_hides_only_the_password() {
        assert_eq!(redact_url("postgres://u:secret@db:5432/x"), "\"postgres://u:REDACTED@db:5432/x\"");
        assert_eq!(redact_url("postgres://u@db:5432/x"), "\"postgres://u@db:5432/x\"");
    }
}
