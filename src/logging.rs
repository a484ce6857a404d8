//! Logging setup: text, JSON or journald, filtered by `log.level` unless `RUST_LOG` is set.
//!
//! The filter sits behind a `tracing_subscriber::reload` layer so that a config reload can
//! change `log.level` of a running daemon ([`set_level`]); the format cannot change live.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

/// The handle of the installed filter, and whether `RUST_LOG` chose it (then it stays).
struct Installed {
    handle: reload::Handle<EnvFilter, Registry>,
    from_rust_log: bool,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// What [`set_level`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LevelChange {
    Applied,
    /// `RUST_LOG` is set and wins over `log.level`.
    RustLogWins,
    /// No subscriber of ours is installed (the library used in-process, e.g. by tests).
    NotInstalled,
}

/// Installs the global subscriber. Logs go to stderr so that tool output on stdout stays
/// machine-readable. Returns a note to log once logging is up (e.g. a journald fallback).
pub fn init(cfg: &LogConfig) -> Option<String> {
    let (filter, from_rust_log) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => (EnvFilter::try_new(&v).unwrap_or_else(|_| EnvFilter::new(&cfg.level)), true),
        _ => (EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info")), false),
    };
    let mut note = None;
    let layer: Box<dyn Layer<Filtered> + Send + Sync> = match cfg.format {
        LogFormat::Text => text_layer(),
        // flatten_event: an event's fields sit at the top level of its JSON object (beside
        // `timestamp`, `level`, `target`), where log pipelines index them, not under `fields`.
        LogFormat::Json => {
            Box::new(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(std::io::stderr))
        }
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(l) => Box::new(l),
            Err(e) => {
                note = Some(format!(
                    "log.format = \"journald\" but journald is not reachable ({e}); logging text to stderr"
                ));
                text_layer()
            }
        },
    };
    let (filter, handle) = reload::Layer::new(filter);
    // The filter is a global layer, not a per-layer filter (`layer.with_filter`): per-layer
    // filters hand their verdict to the layer through a thread-local that sqlx's query logger
    // overwrites (it asks `enabled` for its own metadata after every query), so the next event
    // of a callsite cached as "always" was silently dropped (tokio-rs/tracing#2519): e.g. the
    // projector's "lock taken" line right after its checkpoint queries.
    // A second init (tests calling in-process) keeps the first subscriber.
    if Registry::default().with(filter).with(layer).try_init().is_ok() {
        let _ = INSTALLED.set(Installed { handle, from_rust_log });
    }
    note
}

/// Replaces the filter with `level` (already validated as a filter by `Config::validate`).
pub(crate) fn set_level(level: &str) -> Result<LevelChange, String> {
    let Some(installed) = INSTALLED.get() else { return Ok(LevelChange::NotInstalled) };
    if installed.from_rust_log {
        return Ok(LevelChange::RustLogWins);
    }
    let filter = EnvFilter::try_new(level).map_err(|e| format!("{level:?} is not a tracing filter: {e}"))?;
    installed.handle.reload(filter).map_err(|e| format!("cannot change the log filter: {e}"))?;
    Ok(LevelChange::Applied)
}

/// The registry under its (reloadable) filter: what the output layer sits on.
type Filtered = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;

fn text_layer() -> Box<dyn Layer<Filtered> + Send + Sync> {
    let ansi = std::env::var_os("NO_COLOR").is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    Box::new(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
}
