//! Pieces shared by the examples that drive a running daemon (`bench`, `soak`).

use std::time::Duration;

use cruddur_syncd::config::{self, LoadedConfig};
use cruddur_syncd::store::Store;

pub type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub fn load(cfg_path: &str) -> AnyResult<LoadedConfig> {
    Ok(config::load(std::path::Path::new(cfg_path))?)
}

/// The DynamoDB store the daemon's config names.
pub async fn store(loaded: &LoadedConfig) -> Store {
    let clients = cruddur_syncd::aws::clients(&loaded.config.aws).await;
    Store::new(clients.dynamodb, loaded.config.dynamodb.table.clone(), clients.endpoints.dynamodb)
}

/// Resident set size of a process (`self` or a pid), from /proc.
pub fn rss_bytes(pid: &str) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// The `p` quantile (0..=1) of sorted samples; zero when there are none.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
