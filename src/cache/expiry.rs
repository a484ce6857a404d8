//! How long entries live: `cache.ttl` for conversations, `cache.users_ttl` for user mappings,
//! `cache.stale_if_error` past either while a reload fails; all changeable at run time.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;

use super::race::Stamped;
use crate::model::UserUuid;

/// Unknown subs are remembered this long, so a client retrying with a token of a user who is
/// not provisioned yet costs no query, and a user that reconciliation just mapped waits at most
/// this long even without an explicit invalidation.
pub(crate) const NEGATIVE_USER_TTL: Duration = Duration::from_secs(30);

/// A duration changeable at run time (a reload). moka fixes an entry's expiry when it is
/// written, so [`Lifetime`] applies the durations in force at every write and every read: a
/// shorter TTL holds for old entries too.
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
}

/// More than the rounding between moka's clock and `std::time::Instant`, far less than any TTL.
const CLOCK_SLACK: Duration = Duration::from_millis(5);

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What an entry's kind says about its lifetime.
pub(super) trait Expires {
    /// How long this entry is fresh when the cache's TTL is `ttl`.
    fn ttl(&self, ttl: Duration) -> Duration {
        ttl
    }

    /// Whether it may be served past its TTL while its reload fails.
    fn serves_stale(&self) -> bool {
        true
    }
}

/// A sub no row carries is remembered [`NEGATIVE_USER_TTL`] (or `users_ttl` when shorter), and
/// never served stale: during an outage an unknown sub is "unavailable", not "not provisioned".
impl Expires for Option<UserUuid> {
    fn ttl(&self, ttl: Duration) -> Duration {
        if self.is_some() {
            ttl
        } else {
            NEGATIVE_USER_TTL.min(ttl)
        }
    }

    fn serves_stale(&self) -> bool {
        self.is_some()
    }
}

/// How long an entry is fresh (`cache.ttl`, or `cache.users_ttl`), and how long past that it
/// may still be served while its reload fails (`cache.stale_if_error`); both live, both counted
/// from the load. moka evicts an entry at the end of both.
pub(super) struct Lifetime<V> {
    pub ttl: LiveTtl,
    pub stale: LiveTtl,
    _entries: PhantomData<fn(&V)>,
}

impl<V> Clone for Lifetime<V> {
    fn clone(&self) -> Self {
        Lifetime::new(self.ttl.clone(), self.stale.clone())
    }
}

impl<V> Lifetime<V> {
    pub fn new(ttl: LiveTtl, stale: LiveTtl) -> Self {
        Lifetime { ttl, stale, _entries: PhantomData }
    }
}

impl<V: Expires> Lifetime<V> {
    fn ttl_of(&self, v: &V) -> Duration {
        v.ttl(self.ttl.get())
    }

    /// How long after its load an entry is gone for good.
    fn end(&self, v: &V) -> Duration {
        let stale = if v.serves_stale() { self.stale.get() } else { Duration::ZERO };
        self.ttl_of(v) + stale
    }

    pub fn fresh(&self, e: &Stamped<V>) -> bool {
        e.age() < self.ttl_of(&e.value)
    }

    /// Fresh, or stale but within `stale_if_error`.
    pub fn servable(&self, e: &Stamped<V>) -> bool {
        e.age() < self.end(&e.value)
    }

    fn remaining(&self, e: &Stamped<V>) -> Duration {
        self.end(&e.value).saturating_sub(e.age())
    }
}

impl<K, V: Expires> Expiry<K, Stamped<V>> for Lifetime<V> {
    fn expire_after_create(&self, _: &K, v: &Stamped<V>, _: Instant) -> Option<Duration> {
        Some(self.remaining(v))
    }

    /// From the load, not from this write: a stream change does not extend an entry's life.
    fn expire_after_update(&self, _: &K, v: &Stamped<V>, _: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(self.remaining(v))
    }

    /// What moka had, unless a reload of the config shortened it: moka compares the answer with
    /// what it had, and any difference (its clock rounds differently from ours) reschedules the
    /// entry's expiry timer, a housekeeping task on every read of the hot path.
    fn expire_after_read(
        &self,
        _: &K,
        v: &Stamped<V>,
        _: Instant,
        left: Option<Duration>,
        _: Instant,
    ) -> Option<Duration> {
        let remaining = self.remaining(v);
        match left {
            Some(l) if l <= remaining + CLOCK_SLACK => Some(l),
            _ => Some(remaining),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamped(age: Duration, value: Option<UserUuid>) -> Stamped<Option<UserUuid>> {
        let now = tokio::time::Instant::now();
        Stamped { epoch: 0, loaded_at: now.checked_sub(age).unwrap_or(now), retry_at: None, value: Arc::new(value) }
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_then_stale_then_gone_counted_from_the_load() {
        let lifetime = Lifetime::new(LiveTtl::new(Duration::from_secs(60)), LiveTtl::new(Duration::from_secs(600)));
        let user = Some(UserUuid(uuid::Uuid::nil()));
        let e = stamped(Duration::ZERO, user);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(lifetime.fresh(&e));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!lifetime.fresh(&e) && lifetime.servable(&e), "past the TTL, within stale_if_error");
        assert_eq!(lifetime.remaining(&e), Duration::from_secs(570));
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(!lifetime.servable(&e));
        // A shorter TTL applies to entries already there; "0s" turns stale serving off.
        let e = stamped(Duration::from_secs(30), user);
        lifetime.ttl.set(Duration::from_secs(10));
        lifetime.stale.set(Duration::ZERO);
        assert!(!lifetime.servable(&e));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sub_no_row_carries_is_kept_briefly_and_never_served_stale() {
        let lifetime = Lifetime::new(LiveTtl::new(Duration::from_secs(60)), LiveTtl::new(Duration::from_secs(600)));
        let e = stamped(Duration::ZERO, None);
        tokio::time::advance(NEGATIVE_USER_TTL).await;
        assert!(!lifetime.fresh(&e) && !lifetime.servable(&e));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_lifetime_leaves_the_expiry_as_moka_has_it() {
        let lifetime = Lifetime::new(LiveTtl::new(Duration::from_secs(600)), LiveTtl::new(Duration::ZERO));
        let e = stamped(Duration::from_secs(60), Some(UserUuid(uuid::Uuid::nil())));
        let read = |left| Expiry::<u32, _>::expire_after_read(&lifetime, &0, &e, Instant::now(), left, Instant::now());
        // moka's own idea of what is left, a millisecond off ours: returned as is, so moka
        // sees no change and reschedules nothing.
        assert_eq!(read(Some(Duration::from_millis(540_001))), Some(Duration::from_millis(540_001)));
        // a TTL that was cut: the entry's rest is cut to it
        lifetime.ttl.set(Duration::from_secs(120));
        assert_eq!(read(Some(Duration::from_millis(540_001))), Some(Duration::from_secs(60)));
        assert_eq!(read(None), Some(Duration::from_secs(60)));
    }
}
