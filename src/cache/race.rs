//! The race-safe core of the caches: how a load, a stream change and a flush of the same key
//! are ordered so that an older value can never win (the rule in the [module docs](super)), and
//! how an entry past its TTL is reloaded, or served stale while its reload fails.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache as Moka;
use moka::ops::compute::Op;
// tokio's clock, so that tests on a paused clock can age entries.
use tokio::time::Instant;

use super::expiry::{Expires, Lifetime};
use super::source::CacheError;

/// After a failed reload of a stale entry, no request tries again for this long: they are
/// served the stale entry at once instead of each waiting for a load that fails.
pub(super) const STALE_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Raised by every flush; an entry stamped with an older value is never served again.
#[derive(Debug, Default)]
pub(super) struct Epoch(AtomicU64);

impl Epoch {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// A cached value, the epoch its load started under, and when that load started.
#[derive(Debug)]
pub(super) struct Stamped<V> {
    pub epoch: u64,
    /// `cache.ttl` and `cache.stale_if_error` run from here; a stream change keeps it, so an
    /// active key is reloaded as often as an idle one.
    pub loaded_at: Instant,
    /// After a failed reload: the next attempt is not before this.
    pub retry_at: Option<Instant>,
    pub value: Arc<V>,
}

impl<V> Clone for Stamped<V> {
    fn clone(&self) -> Self {
        Stamped {
            epoch: self.epoch,
            loaded_at: self.loaded_at,
            retry_at: self.retry_at,
            value: Arc::clone(&self.value),
        }
    }
}

impl<V> Stamped<V> {
    /// How long ago the value was loaded.
    pub fn age(&self) -> Duration {
        self.loaded_at.elapsed()
    }
}

/// What a key holds for a request.
pub(super) enum Lookup<V> {
    Fresh(Arc<V>),
    /// Past its TTL but still within `stale_if_error`: to be reloaded, or served while the
    /// reload fails.
    Stale(Stamped<V>),
    Miss,
}

/// Why a load gave no fresh value, and the stale entry still held for the key, if any.
pub(super) struct LoadFailed<V> {
    pub error: CacheError,
    pub stale: Option<Stamped<V>>,
}

/// A moka cache whose entries are loaded on demand (and, for the conversation caches, changed
/// by the stream).
pub(super) struct Fed<K, V> {
    pub moka: Moka<K, Stamped<V>>,
    pub lifetime: Lifetime<V>,
}

impl<K, V> Fed<K, V>
where
    K: Hash + Eq + Clone + std::fmt::Display + Send + Sync + 'static,
    V: Expires + Send + Sync + 'static,
{
    /// What `key` holds now. An entry of an older epoch is a miss, as is one past its TTL and
    /// `stale_if_error` that moka has not evicted yet.
    pub async fn lookup(&self, key: &K, epoch: &Epoch) -> Lookup<V> {
        match self.moka.get(key).await.filter(|e| e.epoch == epoch.current()) {
            Some(e) if self.lifetime.fresh(&e) => Lookup::Fresh(e.value),
            Some(e) if self.lifetime.servable(&e) => Lookup::Stale(e),
            _ => Lookup::Miss,
        }
    }

    /// Loads `key` under its compute lock (a first load, or the reload of a stale entry):
    /// concurrent requests wait for one load, and stream changes for the key wait until it is in
    /// place. The load must finish by `deadline`. On failure, a stale entry still held is
    /// returned beside the error (and not tried again for [`STALE_RETRY_PAUSE`]); an error is
    /// never cached.
    pub async fn load<F, Fut>(&self, key: K, epoch: &Epoch, deadline: Instant, load: F) -> Result<Arc<V>, LoadFailed<V>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, CacheError>>,
    {
        let described = key.to_string();
        let mut outcome: Option<Result<Arc<V>, LoadFailed<V>>> = None;
        self.moka
            .entry(key.clone())
            .and_compute_with(|existing| {
                let outcome = &mut outcome;
                async move {
                    // Read under the key's lock, just before the query starts: requests queued
                    // behind a load that a flush overtook then share one reload, instead of
                    // each making its own and keeping none.
                    let now = epoch.current();
                    let current = existing.map(|e| e.into_value()).filter(|e| e.epoch == now);
                    let stale = match current {
                        Some(e) if self.lifetime.fresh(&e) => {
                            // Another request loaded it while we waited.
                            *outcome = Some(Ok(e.value));
                            return Op::Nop;
                        }
                        Some(e) if e.retry_at.is_some_and(|at| at > Instant::now()) => {
                            // Another request's reload just failed: no second try yet.
                            let error = CacheError::Unavailable(format!("{key}: a reload failed moments ago"));
                            *outcome = Some(Err(LoadFailed { error, stale: Some(e) }));
                            return Op::Nop;
                        }
                        Some(e) if self.lifetime.servable(&e) => Some(e),
                        _ => None,
                    };
                    let loaded_at = Instant::now();
                    let result = match tokio::time::timeout_at(deadline, load()).await {
                        Ok(r) => r,
                        Err(_) => Err(CacheError::Unavailable(format!(
                            "{key} could not be loaded in time: the store did not answer"
                        ))),
                    };
                    match result {
                        Ok(v) => {
                            let value = Arc::new(v);
                            *outcome = Some(Ok(value.clone()));
                            Op::Put(Stamped { epoch: now, loaded_at, retry_at: None, value })
                        }
                        Err(error) => match stale {
                            Some(mut e) => {
                                e.retry_at = Some(Instant::now() + STALE_RETRY_PAUSE);
                                *outcome = Some(Err(LoadFailed { error, stale: Some(e.clone()) }));
                                Op::Put(e)
                            }
                            None => {
                                *outcome = Some(Err(LoadFailed { error, stale: None }));
                                Op::Nop
                            }
                        },
                    }
                }
            })
            .await;
        // Nop on an absent entry without a load: cannot happen, but never panic for it.
        outcome.unwrap_or_else(|| {
            Err(LoadFailed { error: CacheError::Unavailable(format!("{described} could not be loaded")), stale: None })
        })
    }

    /// Changes a current entry in place; an absent one stays absent (the next load reads the
    /// change from DynamoDB), and a stale one stays stale: the change keeps the entry's stamp
    /// and load time. `f` returning `None` drops the entry (the next read reloads it).
    pub async fn update(&self, key: K, epoch: &Epoch, f: impl FnOnce(&V) -> Option<V>) {
        self.moka
            .entry(key)
            .and_compute_with(|existing| async move {
                match existing {
                    Some(e) if e.value().epoch == epoch.current() => {
                        let e = e.into_value();
                        match f(&e.value) {
                            Some(v) => Op::Put(Stamped { value: Arc::new(v), ..e }),
                            None => Op::Remove,
                        }
                    }
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// Drops `key` through its compute lock, so a load in flight finishes before the removal.
    pub async fn remove(&self, key: K) {
        self.moka.entry(key).and_compute_with(|_| async { Op::Remove }).await;
    }
}
