//! How each dependency did at its last call, reported by whoever calls it (the PostgreSQL
//! pinger, the DynamoDB store, the stream source, the authenticator) and read by `/readyz` and
//! the `dependency_up` gauge. A degraded dependency never fails readiness: cached users can
//! still be served, and a sidecar that reported NotReady would take its app out too.

use std::fmt;
use std::sync::Mutex;

use crate::heartbeat::Heartbeat;

/// One dependency's latest news.
#[derive(Debug, Default)]
pub struct DependencyHealth {
    ok: Heartbeat,
    failed: Heartbeat,
    reason: Mutex<Option<String>>,
}

/// What [`DependencyHealth::status`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DependencyStatus {
    /// Not called yet.
    Unknown,
    Ok,
    /// Its last call failed, for this reason.
    Degraded(String),
}

impl DependencyStatus {
    /// For the gauge: only a failed last call counts as down.
    pub fn is_up(&self) -> bool {
        !matches!(self, DependencyStatus::Degraded(_))
    }
}

impl fmt::Display for DependencyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DependencyStatus::Unknown => f.write_str("unknown"),
            DependencyStatus::Ok => f.write_str("ok"),
            DependencyStatus::Degraded(why) => write!(f, "degraded: {why}"),
        }
    }
}

impl DependencyHealth {
    pub fn ok(&self) {
        self.ok.beat();
    }

    pub fn failed(&self, reason: impl fmt::Display) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        self.failed.beat();
    }

    pub fn status(&self) -> DependencyStatus {
        match (self.ok.last(), self.failed.last()) {
            (_, Some(failed)) if self.ok.last().is_none_or(|ok| failed >= ok) => DependencyStatus::Degraded(
                self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default(),
            ),
            (Some(_), _) => DependencyStatus::Ok,
            _ => DependencyStatus::Unknown,
        }
    }
}

/// Every dependency the daemon reports on, by its `dependency` label.
#[derive(Debug, Default)]
pub struct Dependencies {
    pub postgres: DependencyHealth,
    pub dynamodb: DependencyHealth,
    pub streams: DependencyHealth,
    pub jwks: DependencyHealth,
    /// Reported only with fan-out on ([`Dependencies::with_nats`]).
    pub nats: DependencyHealth,
    uses_nats: bool,
}

impl Dependencies {
    /// The dependencies of a daemon with fan-out on: NATS is one of them.
    pub fn with_nats() -> Self {
        Dependencies { uses_nats: true, ..Default::default() }
    }

    /// `(label, health)` in report order.
    pub fn all(&self) -> Vec<(&'static str, &DependencyHealth)> {
        let mut all = vec![
            ("postgres", &self.postgres),
            ("dynamodb", &self.dynamodb),
            ("streams", &self.streams),
            ("jwks", &self.jwks),
        ];
        if self.uses_nats {
            all.push(("nats", &self.nats));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_latest_call_decides() {
        let h = DependencyHealth::default();
        assert_eq!(h.status(), DependencyStatus::Unknown);
        assert!(h.status().is_up());
        h.ok();
        assert_eq!(h.status(), DependencyStatus::Ok);
        tokio::time::advance(std::time::Duration::from_millis(10)).await;
        h.failed("connection refused");
        assert_eq!(h.status(), DependencyStatus::Degraded("connection refused".into()));
        assert!(!h.status().is_up());
        assert_eq!(h.status().to_string(), "degraded: connection refused");
        tokio::time::advance(std::time::Duration::from_millis(10)).await;
        h.ok();
        assert_eq!(h.status(), DependencyStatus::Ok);
    }
}
