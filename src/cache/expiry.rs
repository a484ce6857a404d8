//! How long entries live: `cache.ttl` for conversations, `cache.users_ttl` for user mappings,
//! both changeable at run time (a reload).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;

use crate::model::{CognitoSub, UserUuid};

/// Unknown subs are remembered this long, so a client retrying with a token of a user who is
/// not provisioned yet costs no query, and a user that reconciliation just mapped waits at most
/// this long even without an explicit invalidation.
pub(crate) const NEGATIVE_USER_TTL: Duration = Duration::from_secs(30);

/// A TTL changeable at run time. moka fixes an entry's expiry when it is written, so the TTL in
/// force is applied in three places: at insert and at update (a stream change rewrites the
/// entry and so restarts its TTL, as `time_to_live` would), and at every read, where an entry
/// older than the current TTL is cut short. A shorter TTL therefore holds for old entries too:
/// at worst an entry is served by the one read that finds it too old, and is gone for the next.
#[derive(Clone, Debug)]
pub(crate) struct LiveTtl(Arc<AtomicU64>);

impl LiveTtl {
    pub(crate) fn new(ttl: Duration) -> Self {
        LiveTtl(Arc::new(AtomicU64::new(duration_ms(ttl))))
    }

    pub(crate) fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Acquire))
    }

    pub(crate) fn set(&self, ttl: Duration) {
        self.0.store(duration_ms(ttl), Ordering::Release);
    }

    /// What is left of an entry written at `written` under the TTL in force. An unchanged TTL
    /// returns `left` itself: moka compares the answer with what it had, and any difference
    /// (its clock rounds differently from ours) reschedules the entry's expiry timer, a
    /// housekeeping task on every read of the hot path.
    fn clamp(&self, ttl: Duration, now: Instant, written: Instant, left: Option<Duration>) -> Option<Duration> {
        let remaining = (written + ttl).saturating_duration_since(now);
        match left {
            Some(l) if l <= remaining + CLOCK_SLACK => Some(l),
            _ => Some(remaining),
        }
    }
}

/// More than the rounding between moka's clock and `std::time::Instant`, far less than any TTL.
const CLOCK_SLACK: Duration = Duration::from_millis(5);

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl<K, V> Expiry<K, V> for LiveTtl {
    fn expire_after_create(&self, _: &K, _: &V, _: Instant) -> Option<Duration> {
        Some(self.get())
    }

    fn expire_after_update(&self, _: &K, _: &V, _: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(self.get())
    }

    fn expire_after_read(
        &self,
        _: &K,
        _: &V,
        now: Instant,
        left: Option<Duration>,
        written: Instant,
    ) -> Option<Duration> {
        self.clamp(self.get(), now, written, left)
    }
}

/// `cache.users_ttl` for a mapping, [`NEGATIVE_USER_TTL`] (or `users_ttl` when shorter) for a
/// sub no row carries.
pub(crate) struct UserExpiry {
    pub positive: LiveTtl,
}

impl UserExpiry {
    fn ttl(&self, v: &Option<UserUuid>) -> Duration {
        if v.is_some() {
            self.positive.get()
        } else {
            NEGATIVE_USER_TTL.min(self.positive.get())
        }
    }
}

impl Expiry<CognitoSub, Option<UserUuid>> for UserExpiry {
    fn expire_after_create(&self, _: &CognitoSub, v: &Option<UserUuid>, _: Instant) -> Option<Duration> {
        Some(self.ttl(v))
    }

    fn expire_after_update(
        &self,
        k: &CognitoSub,
        v: &Option<UserUuid>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(k, v, now)
    }

    fn expire_after_read(
        &self,
        _: &CognitoSub,
        v: &Option<UserUuid>,
        now: Instant,
        left: Option<Duration>,
        written: Instant,
    ) -> Option<Duration> {
        self.positive.clamp(self.ttl(v), now, written, left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moka::future::Cache as Moka;

    #[tokio::test]
    async fn a_shorter_live_ttl_cuts_old_entries_short() {
        let ttl = LiveTtl::new(Duration::from_secs(600));
        let cache: Moka<u32, u32> = Moka::builder().expire_after(ttl.clone()).build();
        cache.insert(1, 1).await;
        ttl.set(Duration::from_millis(50));
        cache.insert(2, 2).await; // written under the new TTL
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(cache.get(&2).await, None);
        // The old entry was scheduled for 10 minutes; the read that finds it too old is the last.
        let _ = cache.get(&1).await;
        assert_eq!(cache.get(&1).await, None);
        // A longer TTL again: new entries live by it.
        ttl.set(Duration::from_secs(600));
        cache.insert(3, 3).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(cache.get(&3).await, Some(3));
    }

    #[test]
    fn an_unchanged_live_ttl_leaves_the_expiry_as_moka_has_it() {
        let ttl = LiveTtl::new(Duration::from_secs(600));
        let written = Instant::now();
        let now = written + Duration::from_secs(60);
        // moka's own idea of what is left, a millisecond off ours: returned as is, so moka
        // sees no change and reschedules nothing.
        let left = Some(Duration::from_millis(540_001));
        assert_eq!(ttl.clamp(ttl.get(), now, written, left), left);
        // a TTL that was cut: the entry's rest is cut to it
        assert_eq!(ttl.clamp(Duration::from_secs(120), now, written, left), Some(Duration::from_secs(60)));
        // no expiry yet: the TTL in force sets one
        assert_eq!(ttl.clamp(ttl.get(), now, written, None), Some(Duration::from_secs(540)));
    }
}
