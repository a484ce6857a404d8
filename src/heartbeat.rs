//! When a loop last made a turn, readable from other tasks without a lock: the HTTP accept
//! loop, each stream reader and the PostgreSQL pinger beat one, and the liveness and readiness
//! checks read it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock, so that tests on a paused clock see the beats they advance past.
use tokio::time::Instant;

#[derive(Debug)]
pub struct Heartbeat {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last beat, plus one; 0 until the first beat.
    last_ms: AtomicU64,
}

impl Heartbeat {
    /// A heartbeat that has not beaten yet.
    pub fn new() -> Self {
        Heartbeat { epoch: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    /// A heartbeat that beats now.
    pub fn beating() -> Self {
        let h = Heartbeat::new();
        h.beat();
        h
    }

    pub fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_ms.store(ms + 1, Ordering::Release);
    }

    /// When it last beat, if ever.
    pub fn last(&self) -> Option<Instant> {
        match self.last_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms - 1)),
        }
    }

    /// Time since the last beat (since creation when it never beat).
    pub fn age(&self) -> Duration {
        self.last().unwrap_or(self.epoch).elapsed()
    }

    /// Whether it beat at most `window` ago.
    pub fn beaten_within(&self, window: Duration) -> bool {
        self.last().is_some_and(|at| at.elapsed() <= window)
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn age_counts_from_the_last_beat_or_from_creation() {
        let h = Heartbeat::new();
        assert_eq!(h.last(), None);
        assert!(!h.beaten_within(Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(h.age(), Duration::from_secs(3));
        h.beat();
        assert_eq!(h.age(), Duration::ZERO);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(h.beaten_within(Duration::from_secs(2)));
        assert!(!h.beaten_within(Duration::from_secs(1)));
        assert_eq!(h.age(), Duration::from_millis(1500));
    }
}
