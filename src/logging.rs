//! Logging setup: text, JSON or journald, filtered by `log.level` unless `RUST_LOG` is set.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Logs go to stderr so that tool output on stdout stays
/// machine-readable. Returns a note to log once logging is up (e.g. a journald fallback).
pub fn init(cfg: &LogConfig) -> Option<String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).unwrap_or_else(|_| EnvFilter::new(&cfg.level)),
        _ => EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let mut note = None;
    let layer: Box<dyn Layer<Registry> + Send + Sync> = match cfg.format {
        LogFormat::Text => text_layer(),
        LogFormat::Json => Box::new(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)),
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
    // A second init (tests calling in-process) keeps the first subscriber.
    let _ = Registry::default().with(layer.with_filter(filter)).try_init();
    note
}

fn text_layer() -> Box<dyn Layer<Registry> + Send + Sync> {
    let ansi = std::env::var_os("NO_COLOR").is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    Box::new(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
}
