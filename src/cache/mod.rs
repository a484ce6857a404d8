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
use moka::ops::compute::Op;

pub use entry::{GroupRows, MessageWindow, Page};
pub use source::{CacheError, ConversationStore, Loaded, UserDirectory};

use crate::config::CacheConfig;
use crate::metrics::{CacheLabels, CacheName, CacheResult, Metrics};
use crate::model::{CognitoSub, Item, ItemKey, Message, MessageGroupId, Misfit, Pk, Sk, UserUuid};
use crate::stream::{Change, ChangeRecord, ChangeSink, GapReason};
use expiry::{LiveTtl, UserExpiry};
use race::{Epoch, Fed, Stamped};

pub struct Cache {
    groups: Fed<UserUuid, GroupRows>,
    messages: Fed<MessageGroupId, MessageWindow>,
    users: Moka<CognitoSub, Option<UserUuid>>,
    users_ttl: LiveTtl,
    store: Arc<dyn ConversationStore>,
    directory: Arc<dyn UserDirectory>,
    window: usize,
    epoch: Epoch,
    /// A miss gives up after this, so a hung dependency is a 503 inside the request timeout.
    load_timeout: Duration,
    ttl: LiveTtl,
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
        let ttl = LiveTtl::new(cfg.ttl);
        let groups = Moka::builder()
            .max_capacity(total * 2 / 5)
            .weigher(|_: &UserUuid, v: &Stamped<GroupRows>| v.value.weight())
            .expire_after(ttl.clone())
            .build();
        let messages = Moka::builder()
            .max_capacity(total / 2)
            .weigher(|_: &MessageGroupId, v: &Stamped<MessageWindow>| v.value.weight())
            .expire_after(ttl.clone())
            .build();
        let users_ttl = LiveTtl::new(cfg.users_ttl);
        let users = Moka::builder()
            .max_capacity(total / 10)
            .weigher(|k: &CognitoSub, _: &Option<UserUuid>| 96 + u32::try_from(k.0.len()).unwrap_or(u32::MAX))
            .expire_after(UserExpiry { positive: users_ttl.clone() })
            .build();
        Cache {
            groups: Fed { moka: groups },
            messages: Fed { moka: messages },
            users,
            users_ttl,
            store,
            directory,
            window: cfg.messages_per_group as usize,
            epoch: Epoch::default(),
            load_timeout,
            ttl,
            metrics,
        }
    }

    /// Applies a new `cache.ttl` to every entry, old and new.
    pub(crate) fn set_ttl(&self, ttl: Duration) {
        self.ttl.set(ttl);
    }

    /// Applies a new `cache.users_ttl` to every mapping, old and new.
    pub(crate) fn set_users_ttl(&self, ttl: Duration) {
        self.users_ttl.set(ttl);
    }

    fn count(&self, cache: CacheName, result: CacheResult) {
        self.metrics.cache_request(cache, result);
    }

    /// The `users.uuid` of a token's subject; `None` when no row carries it.
    pub async fn user(&self, sub: &CognitoSub) -> Result<Option<UserUuid>, CacheError> {
        if let Some(hit) = self.users.get(sub).await {
            self.count(CacheName::users, CacheResult::hit);
            return Ok(hit);
        }
        self.count(CacheName::users, CacheResult::miss);
        Box::pin(self.load_user(sub)).await
    }

    /// A lookup under the sub's compute lock (the rule in the module docs). Errors are not
    /// cached.
    async fn load_user(&self, sub: &CognitoSub) -> Result<Option<UserUuid>, CacheError> {
        let mut loaded: Option<Result<Option<UserUuid>, CacheError>> = None;
        let compute = self.users.entry_by_ref(sub).and_compute_with(|existing| {
            let loaded = &mut loaded;
            async move {
                if existing.is_some() {
                    return Op::Nop; // another request looked it up while we waited
                }
                let lookup = self.directory.lookup(sub).await;
                let op = match &lookup {
                    Ok(user) => Op::Put(*user),
                    Err(_) => Op::Nop,
                };
                *loaded = Some(lookup);
                op
            }
        });
        // One deadline for waiting behind another lookup and for our own: a request queued
        // behind a hung one answers 503 in time too, not 408.
        let Ok(result) = tokio::time::timeout(self.load_timeout, compute).await else {
            return Err(CacheError::Unavailable(format!(
                "PostgreSQL at {} did not answer within {:?}",
                self.directory.describe(),
                self.load_timeout
            )));
        };
        match (loaded, result.into_entry()) {
            (Some(lookup), _) => lookup,
            (None, Some(entry)) => Ok(entry.into_value()),
            (None, None) => Err(CacheError::Unavailable(format!("the user of sub {sub} could not be looked up"))),
        }
    }

    /// Forgets mappings that reconciliation just changed, so they apply to the next request.
    /// Each waits for a lookup of its sub in flight, then removes what it put.
    pub async fn forget_users(&self, subs: impl IntoIterator<Item = CognitoSub>) {
        for sub in subs {
            self.users.entry(sub).and_compute_with(|_| async { Op::Remove }).await;
        }
    }

    /// A user's conversation rows, loaded on a miss.
    pub(crate) async fn groups(&self, user: UserUuid) -> Result<Arc<GroupRows>, CacheError> {
        self.get_or_load(&self.groups, CacheName::groups, user, || async {
            let (rows, misfits) = self.store.group_rows(user).await?;
            report_misfits(&misfits);
            Ok(GroupRows::new(rows))
        })
        .await
    }

    /// A conversation's newest messages, loaded on a miss.
    pub(crate) async fn window(&self, group: MessageGroupId) -> Result<Arc<MessageWindow>, CacheError> {
        self.get_or_load(&self.messages, CacheName::messages, group, || async {
            // The whole conversation, ordered by instant: a Query in sk order cannot stop
            // early on tables that mix timestamp spellings.
            let (all, misfits) = self.store.messages(group).await?;
            report_misfits(&misfits);
            Ok(MessageWindow::from_all(all, self.window))
        })
        .await
    }

    /// A hit, or a load under the key's compute lock (the rule in the module docs).
    async fn get_or_load<K, V, F, Fut>(
        &self,
        fed: &Fed<K, V>,
        name: CacheName,
        key: K,
        load: F,
    ) -> Result<Arc<V>, CacheError>
    where
        K: std::hash::Hash + Eq + Clone + std::fmt::Display + Send + Sync + 'static,
        V: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = crate::error::Result<V>>,
    {
        if let Some(hit) = fed.hit(&key, &self.epoch).await {
            self.count(name, CacheResult::hit);
            return Ok(hit);
        }
        self.count(name, CacheResult::miss);
        // One deadline for waiting behind another load of the key and for our own, so a request
        // queued behind a hung load answers 503 in time too. Boxed: the load's state (a
        // DynamoDB call) is kilobytes, and an inline future that size would be copied around on
        // every hit too.
        let described = key.to_string();
        match tokio::time::timeout(self.load_timeout, Box::pin(fed.load(key, &self.epoch, load))).await {
            Ok(r) => r,
            Err(_) => Err(CacheError::Unavailable(format!(
                "{described} could not be loaded: DynamoDB did not answer within {:?}",
                self.load_timeout
            ))),
        }
    }

    /// Puts a user's rows through a load's per-key path, for the memory benchmark; a row list
    /// already cached is left alone. Stamped with the epoch at the call, not at the caller's
    /// read, so rows read before a flush would pass as current: fine for a benchmark without
    /// a stream, not for serving.
    #[cfg(any(test, feature = "test-support"))]
    pub async fn prime_groups(&self, user: UserUuid, rows: Vec<crate::model::MessageGroup>) {
        let _ = self.groups.load(user, &self.epoch, || async { Ok(GroupRows::new(rows)) }).await;
    }

    /// The newest `limit` messages strictly before `before` (all when `None`), oldest first.
    /// Served from the window when it holds them, else from DynamoDB.
    pub(crate) async fn messages_page(
        &self,
        group: MessageGroupId,
        limit: usize,
        before: Option<&Sk>,
    ) -> Result<Page<Message>, CacheError> {
        let window = self.window(group).await?;
        let older = |m: &Message| before.is_none_or(|b| m.sk < *b);
        let candidates: Vec<&Message> = window.messages().iter().filter(|m| older(m)).collect();
        if candidates.len() >= limit || window.complete() {
            let skip = candidates.len().saturating_sub(limit);
            let more = skip > 0 || !window.complete();
            return Ok(Page { items: candidates[skip..].iter().map(|m| (*m).clone()).collect(), more });
        }
        // Beyond the window: read the conversation from DynamoDB (not cached; deep history is
        // rare and would evict the newest pages everyone reads).
        let (all, misfits) = match tokio::time::timeout(self.load_timeout, self.store.messages(group)).await {
            Ok(r) => r.map_err(|e| CacheError::Unavailable(e.to_string()))?,
            Err(_) => {
                return Err(CacheError::Unavailable(format!("DynamoDB did not answer within {:?}", self.load_timeout)))
            }
        };
        report_misfits(&misfits);
        let candidates: Vec<Message> = all.into_iter().filter(|m| older(m)).collect();
        let skip = candidates.len().saturating_sub(limit);
        Ok(Page { items: candidates[skip..].to_vec(), more: skip > 0 })
    }

    /// Applies one decoded stream change.
    pub(crate) async fn apply(&self, change: Change) {
        let epoch = &self.epoch;
        match change {
            Change::Upsert(Item::Group(g)) => {
                let owner = g.owner;
                self.groups
                    .update(owner, epoch, move |rows| {
                        rows.with(|r| {
                            r.insert(g.sk.as_str().to_string(), g);
                        })
                    })
                    .await
            }
            Change::Upsert(Item::Message(m)) => {
                let (group, size) = (m.group, self.window);
                self.messages.update(group, epoch, move |w| w.upsert(m, size)).await
            }
            Change::Remove(ItemKey { pk: Pk::Groups(owner), sk }) => {
                self.groups
                    .update(owner, epoch, move |rows| {
                        rows.with(|r| {
                            r.remove(sk.as_str());
                        })
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
        self.users.run_pending_tasks().await;
        let set = |cache: CacheName, entries: u64, weight: u64| {
            let labels = CacheLabels { cache };
            self.metrics.cache_entries.get_or_create(&labels).set(i64::try_from(entries).unwrap_or(i64::MAX));
            self.metrics.cache_weight_bytes.get_or_create(&labels).set(i64::try_from(weight).unwrap_or(i64::MAX));
        };
        set(CacheName::groups, self.groups.moka.entry_count(), self.groups.moka.weighted_size());
        set(CacheName::messages, self.messages.moka.entry_count(), self.messages.moka.weighted_size());
        set(CacheName::users, self.users.entry_count(), self.users.weighted_size());
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

fn report_misfits(misfits: &[Misfit]) {
    for m in misfits {
        tracing::warn!(pk = ?m.pk, sk = ?m.sk, error = %m.error, "skipped an item that does not fit the model");
    }
}
