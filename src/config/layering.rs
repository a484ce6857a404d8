//! Layering: the file, then the environment key by key, each key deserialized on its own (so
//! one bad key never hides another), then the keys whose defaults depend on others; and what
//! `check` prints of the result (every value with its source, secrets redacted).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::{Config, ConfigError, Problem, CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH, ENV_PREFIX};

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
        if !Config::SECTIONS.contains(&section.as_str()) {
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
    problems.extend(config.validate());
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

/// Deserializes one key in isolation through its section's own type, so type errors name the
/// key and unknown keys are caught with the same `deny_unknown_fields` the full parse uses.
fn accept_key(section: &str, key: &str, candidates: Vec<toml::Value>) -> Result<toml::Value, String> {
    let Some(check) = Config::probe_key(section) else {
        return Err(format!("unknown section [{section}]"));
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

pub(super) fn probe<T: DeserializeOwned>(t: toml::Table) -> Result<(), String> {
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
                let value = if full == "postgres.url" || full == "fanout.nats_url" {
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
    use std::time::Duration;

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
