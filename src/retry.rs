//! Backoff between retries, one way for every loop that retries: exponential with jitter (AWS
//! Architecture Blog, "Exponential Backoff And Jitter"), which spreads the retries of many
//! callers instead of synchronising them. Full jitter (anywhere from zero to the step) for the
//! stream readers, which are many; equal jitter (at least half the step) where a pause must not
//! shrink to nothing against a service asking us to slow down.

use std::time::Duration;

use rand::RngExt;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
    /// The part of each step that is always waited.
    floor: Floor,
}

#[derive(Debug, Clone, Copy)]
enum Floor {
    /// Full jitter.
    None,
    /// Equal jitter.
    Half,
}

impl Backoff {
    /// Full jitter: the n-th delay (from 0) is a random duration up to `min(cap, base * 2^n)`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, failures: 0, floor: Floor::None }
    }

    /// Equal jitter: half of each step is always waited, the other half is random.
    pub fn with_floor(base: Duration, cap: Duration) -> Self {
        Backoff { floor: Floor::Half, ..Backoff::new(base, cap) }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        match self.floor {
            Floor::None => jitter(ceiling),
            Floor::Half => ceiling / 2 + jitter(ceiling / 2),
        }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.base.saturating_mul(1u32 << self.failures.min(16)).min(self.cap)
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A random duration from zero to `max`, to keep many callers from acting in step.
pub fn jitter(max: Duration) -> Duration {
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_start_over_after_a_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        let mut floored = Backoff::with_floor(Duration::from_millis(100), Duration::from_secs(1));
        for ceiling in [100, 200, 400] {
            let d = floored.next_delay().as_millis();
            assert!((ceiling / 2..=ceiling).contains(&d), "{d} ms against a {ceiling} ms step");
        }
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
