//! Live reload: the config file is watched (its directory, debounced, so an editor that writes
//! a temporary file and renames it over the original is seen like an in-place write) and
//! SIGHUP asks for the same reload.
//!
//! A reload reads and validates the whole file first (`config::load`, the same checks as at
//! start), then prepares what the new values need before anything changes: a changed `[auth]`
//! must load its JWKS (as at start, where the same failure exits 69). A file that fails either
//! step is logged with its reason and counted (`config_reloads_total{result="failure"}`);
//! nothing changes, so a ConfigMap with a typo or an unreachable `jwks_url` cannot take a fleet
//! down. A good one applies every live key at once (the `LIVE` table: the one place that says
//! which keys are live and how each applies) and names, in one warning,
//! the changed keys that only a restart applies. A file deleted while the daemon runs keeps the
//! running config, said once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::EventKindMask;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::config::{self, Config, ConfigError};
use crate::dependency::Dependencies;
use crate::http::api::ApiState;
use crate::http::auth::{AuthSlot, Authenticator};
use crate::metrics::{Metrics, RunLabels, RunResult};
use crate::{logging, reconcile, systemd};

/// Quiet time after the last change of the file before it is read.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(300);
/// How long a reload waits for a new `[auth]`'s JWKS before refusing it.
const JWKS_FETCH_BOUND: Duration = Duration::from_secs(10);

/// A key a running daemon applies at once, and how; `section.*` covers a whole section. This
/// table is the one place that says which keys are live: adding one is adding a row.
struct LiveKey {
    key: &'static str,
    apply: fn(&Live, &Config, &mut Prepared),
}

/// What the reload made ready before changing anything.
#[derive(Default)]
struct Prepared {
    auth: Option<Authenticator>,
}

const LIVE: &[LiveKey] = &[
    LiveKey { key: "log.level", apply: |_, c, _| set_log_level(&c.log.level) },
    LiveKey { key: "log.access", apply: |l, c, _| l.api.set_access_log(c.log.access) },
    LiveKey {
        key: "http.cors_allowed_origins",
        apply: |l, c, _| l.api.set_cors_allowed_origins(&c.http.cors_allowed_origins),
    },
    LiveKey {
        key: "stream.poll_interval",
        apply: |l, c, _| {
            l.poll_interval.send_replace(c.stream.poll_interval);
        },
    },
    LiveKey { key: "cache.ttl", apply: |l, c, _| l.cache.set_ttl(c.cache.ttl) },
    LiveKey { key: "cache.users_ttl", apply: |l, c, _| l.cache.set_users_ttl(c.cache.users_ttl) },
    LiveKey { key: "cache.stale_if_error", apply: |l, c, _| l.cache.set_stale_if_error(c.cache.stale_if_error) },
    LiveKey {
        key: "auth.*",
        apply: |l, _, prepared| {
            if let Some(auth) = prepared.auth.take() {
                auth.spawn_refresh();
                l.auth.replace(auth);
            }
        },
    },
    // The verifier (above) and the reconciler follow one pool: both change in the same reload.
    LiveKey { key: "auth.user_pool_id", apply: send_reconcile_settings },
    LiveKey { key: "reconcile.*", apply: send_reconcile_settings },
];

fn send_reconcile_settings(live: &Live, new: &Config, _: &mut Prepared) {
    live.reconcile.send_replace(reconcile::Settings::of(new));
}

fn set_log_level(level: &str) {
    match logging::set_level(level) {
        Ok(logging::LevelChange::RustLogWins) => {
            tracing::warn!("log.level changed but RUST_LOG is set and stays in force")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("log.level: {e}"),
    }
}

impl LiveKey {
    fn covers(&self, key: &str) -> bool {
        match self.key.strip_suffix('*') {
            Some(section) => key.starts_with(section),
            None => self.key == key,
        }
    }
}

pub(crate) fn is_live(key: &str) -> bool {
    LIVE.iter().any(|live| live.covers(key))
}

fn table(c: &Config) -> toml::Table {
    match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    }
}

/// `new` with the value `old` has for each of `keys` (`section.key`; absent stays absent).
fn with_values_of(new: &Config, old: &Config, keys: &[String]) -> Option<Config> {
    let (mut merged, old) = (table(new), table(old));
    for key in keys {
        let (section, name) = key.split_once('.')?;
        let value = old.get(section).and_then(|s| s.get(name)).cloned();
        let target = merged.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut()?;
        match value {
            Some(v) => target.insert(name.to_string(), v),
            None => target.remove(name),
        };
    }
    toml::Value::Table(merged).try_into().ok()
}

/// Every `section.key` whose value differs between `a` and `b` (absent counts as a value).
pub(crate) fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (a, b) = (table(a), table(b));
    let empty = toml::Table::new();
    let mut sections: Vec<&String> = a.keys().chain(b.keys()).collect();
    sections.sort();
    sections.dedup();
    let mut out = Vec::new();
    for section in sections {
        let sa = a.get(section).and_then(|v| v.as_table()).unwrap_or(&empty);
        let sb = b.get(section).and_then(|v| v.as_table()).unwrap_or(&empty);
        let mut keys: Vec<&String> = sa.keys().chain(sb.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            if sa.get(key) != sb.get(key) {
                out.push(format!("{section}.{key}"));
            }
        }
    }
    out
}

/// The parts of a running daemon that a reload changes.
pub struct Live {
    pub api: Arc<ApiState>,
    pub auth: Arc<AuthSlot>,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub poll_interval: watch::Sender<Duration>,
    /// Published for the reconciliation scheduler, which reads it before every run.
    pub reconcile: watch::Sender<reconcile::Settings>,
    pub http_client: reqwest::Client,
    /// Handed to a new authenticator, which reports its JWKS fetches there.
    pub deps: Arc<Dependencies>,
    /// The config in force: the start-up one with every live key as the last good reload set it.
    current: Mutex<Config>,
}

/// What a good reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Applied {
    pub live: Vec<String>,
    pub restart_required: Vec<String>,
}

impl Live {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: &Config,
        api: Arc<ApiState>,
        auth: Arc<AuthSlot>,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        poll_interval: watch::Sender<Duration>,
        reconcile: watch::Sender<reconcile::Settings>,
        http_client: reqwest::Client,
        deps: Arc<Dependencies>,
    ) -> Self {
        Live {
            api,
            auth,
            cache,
            metrics,
            poll_interval,
            reconcile,
            http_client,
            deps,
            current: Mutex::new(config.clone()),
        }
    }

    /// The config in force.
    pub(crate) fn current(&self) -> Config {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies every live key of `new` that differs from the config in force, or none of them
    /// when one cannot be applied (the reason is returned).
    pub(crate) async fn apply(&self, new: &Config) -> Result<Applied, String> {
        let old = self.current();
        let mut applied = Applied::default();
        for key in changed_keys(&old, new) {
            if is_live(&key) {
                applied.live.push(key);
            } else {
                applied.restart_required.push(key);
            }
        }
        // Everything that can fail first: nothing has changed yet.
        let mut prepared = Prepared::default();
        if applied.live.iter().any(|k| k.starts_with("auth.")) {
            prepared.auth = Some(self.prepare_auth(new).await?);
        }
        for live in LIVE.iter().filter(|l| applied.live.iter().any(|k| l.covers(k))) {
            (live.apply)(self, new, &mut prepared);
        }
        // What the daemon runs with now: the new file, but the old value of every key that only
        // a restart applies (so the next reload still sees them as changed).
        let running = with_values_of(new, &old, &applied.restart_required).unwrap_or_else(|| {
            tracing::warn!("cannot merge the restart-only keys into the reloaded config; taking the new file whole");
            new.clone()
        });
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = running;
        Ok(applied)
    }

    /// The authenticator of a new `[auth]`, with its JWKS loaded; an error when the JWKS cannot
    /// be loaded (the authenticator in force stays).
    async fn prepare_auth(&self, new: &Config) -> Result<Authenticator, String> {
        let auth = Authenticator::builder(&new.auth, self.http_client.clone()).metrics(self.metrics.clone()).build();
        match tokio::time::timeout(JWKS_FETCH_BOUND, auth.refresh_jwks()).await {
            Ok(Ok(_)) => {
                auth.report_to(self.deps.clone());
                Ok(auth)
            }
            Ok(Err(e)) => Err(format!(
                "the new [auth] cannot be used: {}",
                match e {
                    crate::http::auth::AuthError::JwksUnavailable { detail } => detail,
                    other => other.to_string(),
                }
            )),
            Err(_) => Err(format!(
                "the new [auth] cannot be used: its JWKS at {} did not load within {JWKS_FETCH_BOUND:?}",
                new.auth.jwks_url
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    File,
    Signal,
}

/// Catches SIGHUP from now on (its default action would end the process): call it before
/// anything slow starts, then hand it to [`spawn`].
pub(crate) fn sighup() -> crate::Result<Signal> {
    signal(SignalKind::hangup()).map_err(|e| crate::Error::Failed(format!("cannot watch SIGHUP: {e}")))
}

/// Watches `path` and SIGHUP until `stop`, reloading on either.
pub(crate) fn spawn(
    path: PathBuf,
    live: Arc<Live>,
    mut hup: Signal,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = watch_file(&path, tx);
    tokio::spawn(async move {
        let _watcher = watcher; // dropping it stops the watch
        let mut reloader = Reloader { last_text: std::fs::read_to_string(&path).ok(), path, live, missing_said: false };
        loop {
            let trigger = tokio::select! {
                _ = stop.cancelled() => return,
                Some(()) = rx.recv() => {
                    // An editor's save is several events: act once they have settled.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    Trigger::File
                }
                _ = hup.recv() => Trigger::Signal,
            };
            reloader.reload(trigger).await;
        }
    })
}

/// The watch of the file's directory; None (said in the log) when it cannot be set up, in which
/// case SIGHUP still works. Events are debounced by the reload loop.
fn watch_file(path: &Path, tx: mpsc::UnboundedSender<()>) -> Option<RecommendedWatcher> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name()?.to_os_string();
    let handler = move |res: notify::Result<notify::Event>| match res {
        Ok(event) => {
            // The file itself, or Kubernetes' `..data` symlink swap of a mounted ConfigMap.
            let ours = event.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| n == name.as_os_str() || n.to_string_lossy().starts_with("..data"))
            });
            if ours {
                let _ = tx.send(());
            }
        }
        Err(e) => tracing::warn!(error = %e, "watching the config file failed"),
    };
    // Changes only: reading the file (the reload itself does) raises open and close-nowrite
    // events, which would wake the reload forever; a close after writing is a change.
    let kinds = EventKindMask::CORE | EventKindMask::ACCESS_CLOSE;
    let mut watcher = match RecommendedWatcher::new(handler, notify::Config::default().with_event_kinds(kinds)) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; reload with SIGHUP");
        return None;
    }
    tracing::debug!(dir = %dir.display(), "watching the config directory");
    Some(watcher)
}

struct Reloader {
    path: PathBuf,
    live: Arc<Live>,
    /// The text last read, so that an event that changed nothing (a touch, the second half of
    /// an editor's save) is not a reload.
    last_text: Option<String>,
    missing_said: bool,
}

impl Reloader {
    async fn reload(&mut self, trigger: Trigger) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && trigger == Trigger::File => {
                if !self.missing_said {
                    tracing::warn!(
                        config = %self.path.display(),
                        "the config file was removed; the running config stays in force"
                    );
                    self.missing_said = true;
                }
                return;
            }
            Err(e) => {
                systemd::reloading();
                self.fail(&ConfigError::Read { path: self.path.clone(), reason: e.to_string() }.to_string(), &[]);
                return;
            }
        };
        self.missing_said = false;
        if trigger == Trigger::File && self.last_text.as_deref() == Some(text.as_str()) {
            tracing::debug!(config = %self.path.display(), "config file event without a change");
            return;
        }
        self.last_text = Some(text.clone());
        systemd::reloading();
        let how = if trigger == Trigger::Signal { "SIGHUP" } else { "file change" };
        match config::load_from_str(&self.path, &text, std::env::vars()) {
            Err(e) => {
                let problems: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
                let headline = match &e {
                    ConfigError::Invalid { problems, .. } => format!(
                        "config reload ({how}) rejected: {} has {} problem(s); the running config stays in force",
                        self.path.display(),
                        problems.len()
                    ),
                    other => format!("config reload ({how}) rejected: {other}; the running config stays in force"),
                };
                self.fail(&headline, &problems);
            }
            Ok(loaded) => {
                let applied = match self.live.apply(&loaded.config).await {
                    Ok(applied) => applied,
                    Err(reason) => {
                        // Not remembered as read: any event on the file (a touch) tries it again.
                        self.last_text = None;
                        let headline =
                            format!("config reload ({how}) rejected: {reason}; the running config stays in force");
                        self.fail(&headline, &[]);
                        return;
                    }
                };
                if applied.live.is_empty() {
                    tracing::info!(config = %self.path.display(), "config reloaded ({how}); no live key changed");
                } else {
                    tracing::info!(
                        config = %self.path.display(),
                        "config reloaded ({how}); applied {}",
                        applied.live.join(", ")
                    );
                }
                if !applied.restart_required.is_empty() {
                    tracing::warn!("restart required: {}", applied.restart_required.join(", "));
                }
                self.live.metrics.config_reloads.get_or_create(&RunLabels { result: RunResult::success }).inc();
                systemd::reloaded("serving; config reloaded");
            }
        }
    }

    fn fail(&self, headline: &str, problems: &[String]) {
        tracing::error!("{headline}");
        for p in problems {
            tracing::error!("config problem: {p}");
        }
        self.live.metrics.config_reloads.get_or_create(&RunLabels { result: RunResult::failure }).inc();
        systemd::reloaded("serving; the last config reload failed, the previous config stays in force");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_and_restart_keys_are_told_apart() {
        let a = Config::default();
        let mut b = a.clone();
        b.http.cors_allowed_origins = vec!["http://a.example".into()];
        b.cache.ttl = Duration::from_secs(5);
        b.http.listen = "127.0.0.1:1".parse().unwrap();
        b.dynamodb.table = "other".into();
        b.aws.endpoint_url = Some("http://127.0.0.1:9".into());
        b.reconcile.interval = Duration::from_secs(60);
        let changed = changed_keys(&a, &b);
        let (live, restart): (Vec<_>, Vec<_>) = changed.iter().partition(|k| is_live(k));
        assert_eq!(live, ["cache.ttl", "http.cors_allowed_origins", "reconcile.interval"]);
        assert_eq!(restart, ["aws.endpoint_url", "dynamodb.table", "http.listen"]);
        assert!(changed_keys(&a, &a).is_empty());
    }
}
