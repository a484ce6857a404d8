//! The race-safe core of the conversation caches: how a load, a stream change and a flush of
//! the same key are ordered so that an older value can never win (the rule in the
//! [module docs](super)).

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moka::future::Cache as Moka;
use moka::ops::compute::Op;

use super::source::CacheError;

/// Raised by every flush; an entry stamped with an older value is never served again.
#[derive(Debug, Default)]
pub(super) struct Epoch(AtomicU64);

impl Epoch {
    pub(crate) fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// A cached value and the epoch its load started under.
#[derive(Debug)]
pub(super) struct Stamped<V> {
    pub epoch: u64,
    pub value: Arc<V>,
}

impl<V> Clone for Stamped<V> {
    fn clone(&self) -> Self {
        Stamped { epoch: self.epoch, value: Arc::clone(&self.value) }
    }
}

/// A moka cache whose entries are loaded on demand and changed by the stream.
pub(super) struct Fed<K, V> {
    pub moka: Moka<K, Stamped<V>>,
}

impl<K, V> Fed<K, V>
where
    K: Hash + Eq + Clone + std::fmt::Display + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// The value of a current entry; an entry of an older epoch is a miss.
    pub(crate) async fn hit(&self, key: &K, epoch: &Epoch) -> Option<Arc<V>> {
        self.moka.get(key).await.filter(|e| e.epoch == epoch.current()).map(|e| e.value)
    }

    /// Loads `key` under its compute lock: concurrent misses wait for one load, and stream
    /// changes for the key wait until it is in place. A load's error is not cached.
    pub async fn load<F, Fut>(&self, key: K, epoch: &Epoch, load: F) -> Result<Arc<V>, CacheError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = crate::error::Result<V>>,
    {
        let mut loaded: Option<Result<Arc<V>, CacheError>> = None;
        let result = self
            .moka
            .entry(key.clone())
            .and_compute_with(|existing| {
                let loaded = &mut loaded;
                async move {
                    // Read under the key's lock, just before the query starts: requests queued
                    // behind a load that a flush overtook then share one reload, instead of
                    // each making its own and keeping none.
                    let now = epoch.current();
                    if existing.is_some_and(|e| e.value().epoch == now) {
                        return Op::Nop; // another request loaded it while we waited
                    }
                    match load().await {
                        Ok(v) => {
                            let value = Arc::new(v);
                            *loaded = Some(Ok(value.clone()));
                            Op::Put(Stamped { epoch: now, value })
                        }
                        Err(e) => {
                            *loaded = Some(Err(CacheError::Unavailable(e.to_string())));
                            Op::Nop
                        }
                    }
                }
            })
            .await;
        match (loaded, result.into_entry()) {
            (Some(value), _) => value,
            (None, Some(entry)) => Ok(entry.into_value().value),
            // Nop on an absent entry without a load: cannot happen, but never panic for it.
            (None, None) => Err(CacheError::Unavailable(format!("{key} could not be loaded"))),
        }
    }

    /// Changes a current entry in place; an absent one stays absent (the next load reads the
    /// change from DynamoDB), and a stale one stays stale: the change keeps the entry's stamp.
    pub(crate) async fn update(&self, key: K, epoch: &Epoch, f: impl FnOnce(&V) -> V) {
        self.moka
            .entry(key)
            .and_compute_with(|existing| async move {
                match existing {
                    Some(e) if e.value().epoch == epoch.current() => {
                        let e = e.into_value();
                        Op::Put(Stamped { epoch: e.epoch, value: Arc::new(f(&e.value)) })
                    }
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// Drops `key` through its compute lock, so a load in flight finishes before the removal.
    pub(crate) async fn remove(&self, key: K) {
        self.moka.entry(key).and_compute_with(|_| async { Op::Remove }).await;
    }
}
