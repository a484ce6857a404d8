//! The in-memory caches the API serves from: each user's conversation list, each conversation's
//! newest messages, and Cognito `sub` -> `users.uuid`.
//!
//! Entries are loaded on demand (from DynamoDB through a [`ConversationStore`], from PostgreSQL
//! through a [`UserDirectory`]) and then kept fresh by the stream tailer, which calls
//! [`ChangeSink`] on this type. The pieces: what an entry holds ([`entry`]), how long it lives
//! ([`expiry`]), and the race-safe core that orders loads, changes and flushes ([`race`]).
//!
//! # The load/stream race, and the rule that settles it
//!
//! A miss queries DynamoDB while the tailer may be applying a newer change to the same key. If
//! the query read the item before the change and the stream applied the change to the (still
//! absent) key before the load inserted, the older value would win until the TTL.
//!
//! Rule: every write to a groups or messages entry — a load, a stream change, an invalidation —
//! goes through moka's `and_compute_with`, which runs one computation per key at a time. A load
//! therefore holds the key while it queries; a stream change for that key waits, then applies on
//! top of what was loaded. Changes are idempotent (upsert or remove by sort key), so applying
//! one that the query already saw changes nothing, and one the query missed is not lost. A
//! change for a key that is absent and not loading is dropped: the next load reads it from
//! DynamoDB, because the record exists only after the write is durable and loads read
//! consistently.
//!
//! A gap (records possibly lost) bumps an epoch and flushes everything. Every entry carries the
//! epoch its load started under, and one of an older epoch is a miss wherever it is read: a load
//! that a flush overtook serves its caller but is not served again, since changes it missed may
//! be among the lost ones. (The stamp, not the flush, is what guarantees this: moka's
//! `invalidate_all` spares an entry written just after it, which such a load's may be.) The
//! tailer's first positioning at start does the same: a write made before it holds LATEST is in
//! no record it will read, so a load from before then may be stale.
//!
//! The users cache follows the same per-key rule without epochs: a lookup holds its sub's lock,
//! and [`Cache::forget_users`] waits for it, so a mapping read before a change cannot be put
//! back after the change was forgotten.
//!
//! # Staying fresh, and serving through an outage
//!
//! `cache.ttl` (`cache.users_ttl` for mappings) runs from the load, never from a stream change,
//! so an active key is reloaded as often as an idle one: the safety net under the stream. Past
//! it, an entry is reloaded by the next request that wants it (one load for concurrent
//! requests); while that reload fails, the entry is served stale for up to
//! `cache.stale_if_error` more, with its age (the `Age` header), and the next attempt waits
//! [`race::STALE_RETRY_PAUSE`]. A gap flushes stale entries like any other: a gap means an entry
//! may be wrong, not just old.

mod entry;
mod expiry;
mod race;
#[cfg(any(test, feature = "test-support"))]
pub mod scripted;
mod source;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache as Moka;
use tokio::time::Instant;

pub use entry::{GroupRows, MessageWindow, Page};
pub use source::{CacheError, ConversationStore, Loaded, Newest, UserDirectory};

use crate::config::CacheConfig;
use crate::metrics::{CacheLabels, CacheName, CacheResult, Metrics, StoreRead};
use crate::model::{CognitoSub, Item, ItemKey, Message, MessageGroupId, Misfit, Pk, Sk, UserUuid};
use crate::stream::{Change, ChangeRecord, ChangeSink, GapReason};
use expiry::{Expires, Lifetime, LiveTtl};
use race::{Epoch, Fed, Lookup, Stamped};

/// A value as the cache serves it: fresh, or stale (loaded `age` ago, past its TTL, while its
/// reload fails).
#[derive(Debug, Clone)]
pub struct Served<T> {
    pub value: Arc<T>,
    pub stale_age: Option<Duration>,
}

impl<T> Served<T> {
    fn fresh(value: Arc<T>) -> Self {
        Served { value, stale_age: None }
    }
}

pub struct Cache {
    groups: Fed<UserUuid, GroupRows>,
    messages: Fed<MessageGroupId, MessageWindow>,
    users: Fed<CognitoSub, Option<UserUuid>>,
    store: Arc<dyn ConversationStore>,
    directory: Arc<dyn UserDirectory>,
    window: usize,
    /// Flushes of what the stream feeds; the users cache has its own, never raised.
    epoch: Epoch,
    users_epoch: Epoch,
    /// A miss gives up after this, so a hung dependency is a 503 inside the request timeout.
    load_timeout: Duration,
    ttl: LiveTtl,
    users_ttl: LiveTtl,
    stale_if_error: LiveTtl,
    metrics: Arc<Metrics>,
}

impl Cache {
    pub fn new(
        cfg: &CacheConfig,
        load_timeout: Duration,
        store: Arc<dyn ConversationStore>,
        directory: Arc<dyn UserDirectory>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // cache.max_bytes is the total; conversations take most of it, users are small.
        let total = cfg.max_bytes;
        let (ttl, users_ttl) = (LiveTtl::new(cfg.ttl), LiveTtl::new(cfg.users_ttl));
        let stale_if_error = LiveTtl::new(cfg.stale_if_error);
        let conversations = Lifetime::new(ttl.clone(), stale_if_error.clone());
        let groups = Moka::builder()
            .max_capacity(total * 2 / 5)
            .weigher(|_: &UserUuid, v: &Stamped<GroupRows>| v.value.weight())
            .expire_after(conversations.clone())
            .build();
        let messages = Moka::builder()
            .max_capacity(total / 2)
            .weigher(|_: &MessageGroupId, v: &Stamped<MessageWindow>| v.value.weight())
            .expire_after(Lifetime::new(ttl.clone(), stale_if_error.clone()))
            .build();
        let mappings = Lifetime::new(users_ttl.clone(), stale_if_error.clone());
        let users = Moka::builder()
            .max_capacity(total / 10)
            .weigher(|k: &CognitoSub, _: &Stamped<Option<UserUuid>>| 128 + u32::try_from(k.0.len()).unwrap_or(u32::MAX))
            .expire_after(mappings.clone())
            .build();
        Cache {
            groups: Fed { moka: groups, lifetime: conversations },
            messages: Fed { moka: messages, lifetime: Lifetime::new(ttl.clone(), stale_if_error.clone()) },
            users: Fed { moka: users, lifetime: mappings },
            store,
            directory,
            window: cfg.messages_per_group as usize,
            epoch: Epoch::default(),
            users_epoch: Epoch::default(),
            load_timeout,
            ttl,
            users_ttl,
            stale_if_error,
            metrics,
        }
    }

    /// Applies a new `cache.ttl` to every entry, old and new.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl.set(ttl);
    }

    /// Applies a new `cache.users_ttl` to every mapping, old and new.
    pub fn set_users_ttl(&self, ttl: Duration) {
        self.users_ttl.set(ttl);
    }

    /// Applies a new `cache.stale_if_error` to every entry, old and new.
    pub fn set_stale_if_error(&self, stale: Duration) {
        self.stale_if_error.set(stale);
    }

    fn count(&self, cache: CacheName, result: CacheResult) {
        self.metrics.cache_request(cache, result);
    }

    /// The `users.uuid` of a token's subject; `None` when no row carries it.
    pub async fn user(&self, sub: &CognitoSub) -> Result<Served<Option<UserUuid>>, CacheError> {
        let directory = &self.directory;
        self.get_or_load(&self.users, &self.users_epoch, CacheName::users, sub.clone(), || async move {
            directory.lookup(sub).await
        })
        .await
    }

    /// Forgets mappings that reconciliation just changed, so they apply to the next request.
    /// Each waits for a lookup of its sub in flight, then removes what it put.
    pub async fn forget_users(&self, subs: impl IntoIterator<Item = CognitoSub>) {
        for sub in subs {
            self.users.remove(sub).await;
        }
    }

    /// A user's conversation rows, loaded on a miss.
    pub async fn groups(&self, user: UserUuid) -> Result<Served<GroupRows>, CacheError> {
        self.get_or_load(&self.groups, &self.epoch, CacheName::groups, user, || async {
            let (rows, misfits) = self.store.group_rows(user).await.map_err(unavailable)?;
            self.metrics.store_items_read(StoreRead::groups, rows.len() + misfits.len());
            report_misfits(&misfits);
            Ok(GroupRows::new(rows))
        })
        .await
    }

    /// A conversation's newest messages, loaded on a miss.
    pub async fn window(&self, group: MessageGroupId) -> Result<Served<MessageWindow>, CacheError> {
        self.get_or_load(&self.messages, &self.epoch, CacheName::messages, group, || async {
            let newest = self.store.newest_messages(group, None, self.window).await.map_err(unavailable)?;
            self.metrics.store_items_read(StoreRead::messages, newest.read);
            report_misfits(&newest.misfits);
            Ok(MessageWindow::new(newest.messages, !newest.more))
        })
        .await
    }

    /// A fresh hit; else a load (or the reload of a stale entry) under the key's compute lock
    /// (the rule in the module docs); else, while that fails, the stale entry.
    async fn get_or_load<K, V, F, Fut>(
        &self,
        fed: &Fed<K, V>,
        epoch: &Epoch,
        name: CacheName,
        key: K,
        load: F,
    ) -> Result<Served<V>, CacheError>
    where
        K: std::hash::Hash + Eq + Clone + std::fmt::Display + Send + Sync + 'static,
        V: Expires + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, CacheError>>,
    {
        let stale = match fed.lookup(&key, epoch).await {
            Lookup::Fresh(value) => {
                self.count(name, CacheResult::hit);
                return Ok(Served::fresh(value));
            }
            Lookup::Stale(e) if e.retry_at.is_some_and(|at| at > Instant::now()) => {
                return Ok(self.serve_stale(name, &e));
            }
            Lookup::Stale(e) => Some(e),
            Lookup::Miss => None,
        };
        self.count(name, CacheResult::miss);
        // One deadline for waiting behind another load of the key and for our own, so a request
        // queued behind a hung load answers in time too. Boxed: the load's state (a DynamoDB
        // call) is kilobytes, and an inline future that size would be copied around on every
        // hit too.
        let deadline = Instant::now() + self.load_timeout;
        let described = key.to_string();
        let loaded = tokio::time::timeout_at(deadline, Box::pin(fed.load(key, epoch, deadline, load))).await;
        let (err, still) = match loaded {
            Ok(Ok(value)) => return Ok(Served::fresh(value)),
            Ok(Err(failed)) => (failed.error, failed.stale),
            Err(_) => (CacheError::Unavailable(format!("{described} could not be loaded in time")), None),
        };
        match still.or(stale).filter(|e| fed.lifetime.servable(e)) {
            Some(e) => {
                tracing::debug!(key = %described, "serving a stale entry while its reload fails: {err}");
                Ok(self.serve_stale(name, &e))
            }
            None => Err(err),
        }
    }

    fn serve_stale<V>(&self, name: CacheName, e: &Stamped<V>) -> Served<V> {
        self.count(name, CacheResult::stale);
        Served { value: Arc::clone(&e.value), stale_age: Some(e.age()) }
    }

    /// Puts a user's rows through a load's per-key path, for the memory benchmark; a row list
    /// already cached is left alone. Stamped with the epoch at the call, not at the caller's
    /// read, so rows read before a flush would pass as current: fine for a benchmark without
    /// a stream, not for serving.
    #[cfg(any(test, feature = "test-support"))]
    pub async fn prime_groups(&self, user: UserUuid, rows: Vec<crate::model::MessageGroup>) {
        let deadline = Instant::now() + self.load_timeout;
        let _ = self.groups.load(user, &self.epoch, deadline, || async { Ok(GroupRows::new(rows)) }).await;
    }

    /// The newest `limit` messages strictly before `before` (all when `None`), oldest first.
    /// Served from the window when it holds them, else read from DynamoDB starting at the
    /// cursor (not cached: deep history is rare and would evict the newest pages everyone reads).
    pub async fn messages_page(
        &self,
        group: MessageGroupId,
        limit: usize,
        before: Option<&Sk>,
    ) -> Result<Served<Page<Message>>, CacheError> {
        let window = self.window(group).await?;
        let older = |m: &Message| before.is_none_or(|b| m.sk < *b);
        let candidates: Vec<&Message> = window.value.messages().iter().filter(|m| older(m)).collect();
        if candidates.len() >= limit || window.value.complete() {
            let skip = candidates.len().saturating_sub(limit);
            let more = skip > 0 || !window.value.complete();
            let items = candidates[skip..].iter().map(|m| (*m).clone()).collect();
            return Ok(Served { value: Arc::new(Page { items, more }), stale_age: window.stale_age });
        }
        // The window holds fewer: start where it leaves off (its oldest) or at the cursor.
        let from = window.value.messages().first().map(|m| &m.sk).into_iter().chain(before).min();
        let read = self.store.newest_messages(group, from, limit - candidates.len());
        let newest = match tokio::time::timeout(self.load_timeout, read).await {
            Ok(r) => r.map_err(unavailable)?,
            Err(_) => {
                return Err(CacheError::Unavailable(format!("DynamoDB did not answer within {:?}", self.load_timeout)))
            }
        };
        self.metrics.store_items_read(StoreRead::messages, newest.read);
        report_misfits(&newest.misfits);
        let mut items: Vec<Message> = newest.messages;
        items.extend(candidates.into_iter().cloned());
        Ok(Served::fresh(Arc::new(Page { items, more: newest.more })))
    }

    /// Applies one decoded stream change.
    pub async fn apply(&self, change: Change) {
        let epoch = &self.epoch;
        match change {
            Change::Upsert(Item::Group(g)) => {
                let owner = g.owner;
                self.groups
                    .update(owner, epoch, move |rows| {
                        Some(rows.with(|r| {
                            r.insert(g.sk.as_str().to_string(), g);
                        }))
                    })
                    .await
            }
            Change::Upsert(Item::Message(m)) => {
                let (group, size) = (m.group, self.window);
                self.messages.update(group, epoch, move |w| Some(w.upsert(m, size))).await
            }
            Change::Remove(ItemKey { pk: Pk::Groups(owner), sk }) => {
                self.groups
                    .update(owner, epoch, move |rows| {
                        Some(rows.with(|r| {
                            r.remove(sk.as_str());
                        }))
                    })
                    .await
            }
            Change::Remove(ItemKey { pk: Pk::Messages(group), sk }) => {
                self.messages.update(group, epoch, move |w| w.remove(&sk)).await
            }
            Change::Invalidate(ItemKey { pk: Pk::Groups(owner), .. }) => self.groups.remove(owner).await,
            Change::Invalidate(ItemKey { pk: Pk::Messages(group), .. }) => self.messages.remove(group).await,
        }
    }

    /// Drops everything derived from the stream (users are not: they come from PostgreSQL).
    /// The tailer, which reports the gap, counts it (`stream_resyncs_total`) and logs it.
    pub fn flush(&self, reason: &GapReason) {
        self.forget_stream_derived();
        tracing::debug!(%reason, "flushed the conversation caches");
    }

    fn forget_stream_derived(&self) {
        self.epoch.bump();
        self.groups.moka.invalidate_all();
        self.messages.moka.invalidate_all();
    }

    /// Brings the entry and weight gauges up to date (called when metrics are scraped).
    pub async fn refresh_gauges(&self) {
        self.groups.moka.run_pending_tasks().await;
        self.messages.moka.run_pending_tasks().await;
        self.users.moka.run_pending_tasks().await;
        let set = |cache: CacheName, entries: u64, weight: u64| {
            let labels = CacheLabels { cache };
            self.metrics.cache_entries.get_or_create(&labels).set(i64::try_from(entries).unwrap_or(i64::MAX));
            self.metrics.cache_weight_bytes.get_or_create(&labels).set(i64::try_from(weight).unwrap_or(i64::MAX));
        };
        set(CacheName::groups, self.groups.moka.entry_count(), self.groups.moka.weighted_size());
        set(CacheName::messages, self.messages.moka.entry_count(), self.messages.moka.weighted_size());
        set(CacheName::users, self.users.moka.entry_count(), self.users.moka.weighted_size());
    }

    /// Number of cached conversation lists (for status lines).
    pub fn cached_groups(&self) -> u64 {
        self.groups.moka.entry_count()
    }
}

impl ChangeSink for Cache {
    async fn apply(&self, record: ChangeRecord) {
        Cache::apply(self, record.change).await;
    }

    async fn gap(&self, reason: GapReason) {
        self.flush(&reason);
    }

    /// The API serves before the tailer holds LATEST (readiness says so), so loads made until
    /// now may predate a write no record will bring: they go, and loads still running carry the
    /// old epoch, so what they put is never served.
    async fn positioned(&self) {
        self.forget_stream_derived();
        tracing::debug!("positioned on the stream: dropped what was loaded before");
    }
}

fn unavailable(e: crate::error::Error) -> CacheError {
    CacheError::Unavailable(e.to_string())
}

fn report_misfits(misfits: &[Misfit]) {
    for m in misfits {
        tracing::warn!(pk = ?m.pk, sk = ?m.sk, error = %m.error, "skipped an item that does not fit the model");
    }
}
