//! `cruddur-syncd run`: the long-running daemon.
//!
//! For now it starts, logs its effective config and waits for SIGTERM/SIGINT; the stream
//! tailer, cache and listeners are wired in here as they land.

use crate::config::LoadedConfig;
use crate::error::{Error, Result};

pub async fn run(loaded: LoadedConfig) -> Result<()> {
    tracing::info!(config = %loaded.path.display(), "cruddur-syncd {} starting", env!("CARGO_PKG_VERSION"));
    for e in loaded.effective() {
        tracing::debug!(key = %e.key, value = %e.value, source = %e.source, "effective config");
    }
    shutdown_signal().await?;
    tracing::info!("shutdown requested; exiting");
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Failed(format!("cannot watch SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Failed(format!("cannot watch SIGINT: {e}")))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
