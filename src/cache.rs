//! The in-memory caches the API serves from: each user's conversation list, each conversation's
//! newest messages, and Cognito `sub` -> `users.uuid`.
//!
//! Entries are loaded on demand from DynamoDB (through [`Store`]) or PostgreSQL and then kept
//! fresh by the stream tailer, which calls [`ChangeSink`] on this type.
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache as Moka;
use moka::ops::compute::Op;
use moka::Expiry;
use sqlx::PgPool;

use crate::config::CacheConfig;
use crate::metrics::{CacheLabels, CacheName, CacheResult, Metrics};
use crate::model::{
    conversation_list, CognitoSub, Item, ItemKey, Message, MessageGroup, MessageGroupId, Pk, Sk, UserUuid,
};
use crate::store::{Misfit, Store};
use crate::stream::{Change, ChangeRecord, ChangeSink, GapReason};

/// Unknown subs are remembered this long, so a client retrying with a token of a user who is
/// not provisioned yet costs no query, and a user that reconciliation just mapped waits at most
/// this long even without an explicit invalidation.
pub const NEGATIVE_USER_TTL: Duration = Duration::from_secs(30);

/// What a lookup needs but could not get.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    Unavailable(String),
}

/// A user's group rows, keyed by sort key, with the conversation list derived from them.
#[derive(Debug, Clone, Default)]
pub struct GroupRows {
    rows: BTreeMap<String, MessageGroup>,
    /// One row per conversation, newest first (SPEC section 2).
    view: Arc<[MessageGroup]>,
    /// The rendered first page, made on first request: most clients only ever ask for it, and
    /// any change builds a new `GroupRows`, so it cannot go stale.
    first_page: std::sync::OnceLock<Rendered>,
}

/// A response rendered once and served many times: the body and its header values, ready to
/// be cloned (a reference count each) into every response.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub body: bytes::Bytes,
    pub etag: axum::http::HeaderValue,
    /// The `Link: <...>; rel="next"` value, when there is a next page.
    pub link: Option<axum::http::HeaderValue>,
}

impl GroupRows {
    fn new(rows: impl IntoIterator<Item = MessageGroup>) -> Self {
        let rows: BTreeMap<String, MessageGroup> = rows.into_iter().map(|g| (g.sk.as_str().to_string(), g)).collect();
        let view = conversation_list(rows.values().cloned()).into();
        GroupRows { rows, view, first_page: std::sync::OnceLock::new() }
    }

    fn with(&self, change: impl FnOnce(&mut BTreeMap<String, MessageGroup>)) -> Self {
        let mut rows = self.rows.clone();
        change(&mut rows);
        GroupRows::new(rows.into_values())
    }

    pub fn view(&self) -> &[MessageGroup] {
        &self.view
    }

    /// The first page as `render` makes it from the view, rendered at most once per version.
    pub fn first_page(&self, render: impl FnOnce(&[MessageGroup]) -> Rendered) -> &Rendered {
        self.first_page.get_or_init(|| render(&self.view))
    }

    pub fn contains_group(&self, group: MessageGroupId) -> bool {
        self.view.iter().any(|g| g.message_group_uuid == group)
    }

    fn weight(&self) -> u32 {
        let bytes: usize = self.rows.values().map(group_weight).sum::<usize>() * 2; // rows + view
        u32::try_from(bytes + 64).unwrap_or(u32::MAX)
    }
}

fn group_weight(g: &MessageGroup) -> usize {
    std::mem::size_of::<MessageGroup>()
        + g.sk.as_str().len() * 2
        + g.message.len()
        + g.user_display_name.len()
        + g.user_handle.len()
}

fn message_weight(m: &Message) -> usize {
    std::mem::size_of::<Message>()
        + m.sk.as_str().len()
        + m.message.len()
        + m.user_display_name.len()
        + m.user_handle.len()
}

/// The newest messages of a conversation, oldest first.
#[derive(Debug, Clone, Default)]
pub struct MessageWindow {
    messages: Vec<Message>,
    /// The window holds every message of the conversation, so nothing older exists.
    complete: bool,
}

impl MessageWindow {
    /// Keeps the newest `size` of `all` (which is sorted oldest first).
    fn from_all(mut all: Vec<Message>, size: usize) -> Self {
        let complete = all.len() <= size;
        if !complete {
            all.drain(..all.len() - size);
        }
        MessageWindow { messages: all, complete }
    }

    fn upsert(&self, m: Message, size: usize) -> Self {
        let mut messages = self.messages.clone();
        let mut complete = self.complete;
        match messages.binary_search_by(|x| x.sk.cmp(&m.sk)) {
            Ok(i) => messages[i] = m,
            Err(0) if !complete => return self.clone(), // older than the window: not ours to hold
            Err(i) => messages.insert(i, m),
        }
        if messages.len() > size {
            messages.drain(..messages.len() - size);
            complete = false;
        }
        MessageWindow { messages, complete }
    }

    fn remove(&self, sk: &Sk) -> Self {
        let mut messages = self.messages.clone();
        if let Ok(i) = messages.binary_search_by(|x| x.sk.cmp(sk)) {
            messages.remove(i);
        }
        // The rest are still the newest ones; a complete window stays complete.
        MessageWindow { messages, complete: self.complete }
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    pub fn complete(&self) -> bool {
        self.complete
    }

    fn weight(&self) -> u32 {
        let bytes: usize = self.messages.iter().map(message_weight).sum();
        u32::try_from(bytes + 64).unwrap_or(u32::MAX)
    }
}

/// A page of a list and whether more exists beyond it.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub more: bool,
}

/// `cache.ttl`, changeable at run time (a reload). moka fixes an entry's expiry when it is
/// written, so the TTL in force is applied in three places: at insert and at update (a stream
/// change rewrites the entry and so restarts its TTL, as `time_to_live` would), and at every
/// read, where an entry older than the current TTL is cut short. A shorter TTL therefore holds
/// for old entries too: at worst an entry is served by the one read that finds it too old,
/// and is gone for the next.
#[derive(Clone, Debug)]
pub struct LiveTtl(Arc<AtomicU64>);

impl LiveTtl {
    fn new(ttl: Duration) -> Self {
        LiveTtl(Arc::new(AtomicU64::new(duration_ms(ttl))))
    }

    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Acquire))
    }

    fn set(&self, ttl: Duration) {
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
struct UserExpiry {
    positive: LiveTtl,
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

/// Where `sub -> users.uuid` comes from.
#[derive(Clone, Debug)]
pub struct Users {
    pub pool: PgPool,
    /// `host:port/db`, for messages.
    pub target: String,
}

impl Users {
    async fn lookup(&self, sub: &CognitoSub) -> Result<Option<UserUuid>, CacheError> {
        let rows: Vec<(uuid::Uuid,)> =
            sqlx::query_as("SELECT uuid FROM public.users WHERE cognito_user_id = $1 LIMIT 2")
                .bind(&sub.0)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| CacheError::Unavailable(format!("PostgreSQL at {} did not answer: {e}", self.target)))?;
        match rows.as_slice() {
            [(uuid,)] => Ok(Some(UserUuid(*uuid))),
            [] => Ok(None),
            _ => {
                // Serving either row could show one person another's messages.
                tracing::warn!(%sub, "several users rows carry this cognito_user_id; treating it as not provisioned");
                Ok(None)
            }
        }
    }
}

/// A cached value and the epoch its load started under (the rule in the module docs).
#[derive(Debug)]
struct Stamped<V> {
    epoch: u64,
    value: Arc<V>,
}

impl<V> Clone for Stamped<V> {
    fn clone(&self) -> Self {
        Stamped { epoch: self.epoch, value: Arc::clone(&self.value) }
    }
}

pub struct Cache {
    groups: Moka<UserUuid, Stamped<GroupRows>>,
    messages: Moka<MessageGroupId, Stamped<MessageWindow>>,
    users: Moka<CognitoSub, Option<UserUuid>>,
    users_ttl: LiveTtl,
    store: Store,
    users_source: Users,
    window: usize,
    epoch: AtomicU64,
    /// A miss gives up after this, so a hung dependency is a 503 inside the request timeout.
    load_timeout: Duration,
    ttl: LiveTtl,
    metrics: Arc<Metrics>,
}

impl Cache {
    pub fn new(
        cfg: &CacheConfig,
        load_timeout: Duration,
        store: Store,
        users_source: Users,
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
            groups,
            messages,
            users,
            users_ttl,
            store,
            users_source,
            window: cfg.messages_per_group as usize,
            epoch: AtomicU64::new(0),
            load_timeout,
            ttl,
            metrics,
        }
    }

    /// Applies a new `cache.ttl` to every entry, old and new (see [`LiveTtl`]).
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl.set(ttl);
    }

    /// The `cache.ttl` in force.
    pub fn ttl(&self) -> Duration {
        self.ttl.get()
    }

    /// Applies a new `cache.users_ttl` to every mapping, old and new.
    pub fn set_users_ttl(&self, ttl: Duration) {
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

    /// A lookup under the sub's compute lock, like a conversation's load: concurrent misses
    /// wait for one query, and [`Cache::forget_users`] waits for a lookup in flight, so a mapping
    /// read before a change cannot be put back after the change was forgotten. Errors are not
    /// cached.
    async fn load_user(&self, sub: &CognitoSub) -> Result<Option<UserUuid>, CacheError> {
        let mut loaded: Option<Result<Option<UserUuid>, CacheError>> = None;
        let compute = self.users.entry_by_ref(sub).and_compute_with(|existing| {
            let loaded = &mut loaded;
            async move {
                if existing.is_some() {
                    return Op::Nop; // another request looked it up while we waited
                }
                let lookup = self.users_source.lookup(sub).await;
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
                self.users_source.target, self.load_timeout
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
    pub async fn groups(&self, user: UserUuid) -> Result<Arc<GroupRows>, CacheError> {
        self.get_or_load(&self.groups, CacheName::groups, user, || async {
            let (rows, misfits) = self.store.group_rows(user).await?;
            report_misfits(&misfits);
            Ok(GroupRows::new(rows))
        })
        .await
    }

    /// A hit, or a load under the key's compute lock (the rule in the module docs): concurrent
    /// misses wait for one load, and stream changes for the key wait until it is in place.
    async fn get_or_load<K, V, F, Fut>(
        &self,
        cache: &Moka<K, Stamped<V>>,
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
        if let Some(hit) = cache.get(&key).await.filter(|e| self.is_current(e)) {
            self.count(name, CacheResult::hit);
            return Ok(hit.value);
        }
        self.count(name, CacheResult::miss);
        // One deadline for waiting behind another load of the key and for our own, so a request
        // queued behind a hung load answers 503 in time too. Boxed: the load's state (a
        // DynamoDB call) is kilobytes, and an inline future that size would be copied around on
        // every hit too.
        let described = key.to_string();
        match tokio::time::timeout(self.load_timeout, Box::pin(self.load_into(cache, key, load))).await {
            Ok(r) => r,
            Err(_) => Err(CacheError::Unavailable(format!(
                "{described} could not be loaded: DynamoDB did not answer within {:?}",
                self.load_timeout
            ))),
        }
    }

    fn is_current<V>(&self, entry: &Stamped<V>) -> bool {
        entry.epoch == self.epoch.load(Ordering::Acquire)
    }

    async fn load_into<K, V, F, Fut>(&self, cache: &Moka<K, Stamped<V>>, key: K, load: F) -> Result<Arc<V>, CacheError>
    where
        K: std::hash::Hash + Eq + Clone + std::fmt::Display + Send + Sync + 'static,
        V: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = crate::error::Result<V>>,
    {
        let mut loaded: Option<Result<Arc<V>, CacheError>> = None;
        let result = cache
            .entry(key.clone())
            .and_compute_with(|existing| {
                let loaded = &mut loaded;
                async move {
                    // Read under the key's lock, just before the query starts: requests queued
                    // behind a load that a flush overtook then share one reload, instead of
                    // each making its own and keeping none.
                    let epoch = self.epoch.load(Ordering::Acquire);
                    if existing.is_some_and(|e| e.value().epoch == epoch) {
                        return Op::Nop; // another request loaded it while we waited
                    }
                    match bounded(self.load_timeout, load()).await {
                        Ok(v) => {
                            let value = Arc::new(v);
                            *loaded = Some(Ok(value.clone()));
                            Op::Put(Stamped { epoch, value })
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

    /// Puts a user's rows through a load's per-key path, for the memory benchmark; a row list
    /// already cached is left alone. Stamped with the epoch at the call, not at the caller's
    /// read, so rows read before a flush would pass as current: fine for a benchmark without
    /// a stream, not for serving.
    pub async fn prime_groups(&self, user: UserUuid, rows: Vec<MessageGroup>) {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.groups
            .entry(user)
            .and_compute_with(|existing| async move {
                if existing.is_some_and(|e| self.is_current(e.value())) {
                    Op::Nop
                } else {
                    Op::Put(Stamped { epoch, value: Arc::new(GroupRows::new(rows)) })
                }
            })
            .await;
    }

    /// A conversation's newest messages, loaded on a miss.
    pub async fn window(&self, group: MessageGroupId) -> Result<Arc<MessageWindow>, CacheError> {
        self.get_or_load(&self.messages, CacheName::messages, group, || async {
            // The whole conversation, ordered by instant: a Query in sk order cannot stop
            // early on tables that mix timestamp spellings.
            let (all, misfits) = self.store.messages(group).await?;
            report_misfits(&misfits);
            Ok(MessageWindow::from_all(all, self.window))
        })
        .await
    }

    /// The newest `limit` messages strictly before `before` (all when `None`), oldest first.
    /// Served from the window when it holds them, else from DynamoDB.
    pub async fn messages_page(
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
        let (all, misfits) = bounded(self.load_timeout, self.store.messages(group))
            .await
            .map_err(|e| CacheError::Unavailable(e.to_string()))?;
        report_misfits(&misfits);
        let candidates: Vec<Message> = all.into_iter().filter(|m| older(m)).collect();
        let skip = candidates.len().saturating_sub(limit);
        Ok(Page { items: candidates[skip..].to_vec(), more: skip > 0 })
    }

    /// Applies one decoded stream change.
    pub async fn apply(&self, change: Change) {
        match change {
            Change::Upsert(Item::Group(g)) => {
                let owner = g.owner;
                self.update(&self.groups, owner, move |rows| {
                    rows.with(|r| {
                        r.insert(g.sk.as_str().to_string(), g);
                    })
                })
                .await
            }
            Change::Upsert(Item::Message(m)) => {
                let (group, size) = (m.group, self.window);
                self.update(&self.messages, group, move |w| w.upsert(m, size)).await
            }
            Change::Remove(ItemKey { pk: Pk::Groups(owner), sk }) => {
                self.update(&self.groups, owner, move |rows| {
                    rows.with(|r| {
                        r.remove(sk.as_str());
                    })
                })
                .await
            }
            Change::Remove(ItemKey { pk: Pk::Messages(group), sk }) => {
                self.update(&self.messages, group, move |w| w.remove(&sk)).await
            }
            Change::Invalidate(ItemKey { pk: Pk::Groups(owner), .. }) => {
                // Through the compute lock, so an in-flight load finishes before the removal.
                self.groups.entry(owner).and_compute_with(|_| async { Op::Remove }).await;
            }
            Change::Invalidate(ItemKey { pk: Pk::Messages(group), .. }) => {
                self.messages.entry(group).and_compute_with(|_| async { Op::Remove }).await;
            }
        }
    }

    /// Changes a cached entry in place; an absent one stays absent (the next load reads the
    /// change from DynamoDB), and a stale one stays stale: the change keeps the entry's stamp.
    async fn update<K, V>(&self, cache: &Moka<K, Stamped<V>>, key: K, f: impl FnOnce(&V) -> V)
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
        V: Send + Sync + 'static,
    {
        cache
            .entry(key)
            .and_compute_with(|existing| async move {
                match existing {
                    Some(e) if self.is_current(e.value()) => {
                        let e = e.into_value();
                        Op::Put(Stamped { epoch: e.epoch, value: Arc::new(f(&e.value)) })
                    }
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// Drops everything derived from the stream (users are not: they come from PostgreSQL).
    /// The tailer, which reports the gap, counts it (`stream_resyncs_total`) and logs it.
    pub fn flush(&self, reason: &GapReason) {
        self.forget_stream_derived();
        tracing::debug!(%reason, "flushed the conversation caches");
    }

    fn forget_stream_derived(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.groups.invalidate_all();
        self.messages.invalidate_all();
    }

    /// Brings the entry and weight gauges up to date (called when metrics are scraped).
    pub async fn refresh_gauges(&self) {
        self.groups.run_pending_tasks().await;
        self.messages.run_pending_tasks().await;
        self.users.run_pending_tasks().await;
        let set = |cache: CacheName, entries: u64, weight: u64| {
            let labels = CacheLabels { cache };
            self.metrics.cache_entries.get_or_create(&labels).set(i64::try_from(entries).unwrap_or(i64::MAX));
            self.metrics.cache_weight_bytes.get_or_create(&labels).set(i64::try_from(weight).unwrap_or(i64::MAX));
        };
        set(CacheName::groups, self.groups.entry_count(), self.groups.weighted_size());
        set(CacheName::messages, self.messages.entry_count(), self.messages.weighted_size());
        set(CacheName::users, self.users.entry_count(), self.users.weighted_size());
    }

    /// Number of cached conversation lists (for status lines).
    pub fn cached_groups(&self) -> u64 {
        self.groups.entry_count()
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

/// A store call that gives up after `limit`, as the same error a failed call gives.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = crate::error::Result<T>>,
) -> crate::error::Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r,
        Err(_) => Err(crate::error::Error::Unavailable(format!("DynamoDB did not answer within {limit:?}"))),
    }
}

fn report_misfits(misfits: &[Misfit]) {
    for m in misfits {
        tracing::warn!(pk = ?m.pk, sk = ?m.sk, error = %m.error, "skipped an item that does not fit the model");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn msg(minute: u32) -> Message {
        Message {
            group: MessageGroupId(Uuid::nil()),
            sk: Sk::parse(&format!("2024-01-01T00:{minute:02}:00+00:00")).unwrap(),
            message_uuid: crate::model::MessageId(Uuid::from_u128(minute as u128)),
            message: format!("m{minute}"),
            user_uuid: UserUuid(Uuid::nil()),
            user_display_name: "A".into(),
            user_handle: "a".into(),
        }
    }

    fn minutes(w: &MessageWindow) -> Vec<String> {
        w.messages().iter().map(|m| m.message.clone()).collect()
    }

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

    #[test]
    fn window_keeps_the_newest_and_knows_when_it_is_complete() {
        let w = MessageWindow::from_all((0..5).map(msg).collect(), 3);
        assert_eq!(minutes(&w), ["m2", "m3", "m4"]);
        assert!(!w.complete());
        // older than an incomplete window: ignored
        assert_eq!(minutes(&w.upsert(msg(1), 3)), ["m2", "m3", "m4"]);
        // newer: pushes the oldest out
        assert_eq!(minutes(&w.upsert(msg(9), 3)), ["m3", "m4", "m9"]);
        let small = MessageWindow::from_all(vec![msg(1)], 3);
        assert!(small.complete());
        let grown = small.upsert(msg(0), 3).upsert(msg(2), 3);
        assert_eq!(minutes(&grown), ["m0", "m1", "m2"]);
        assert!(grown.complete());
        let over = grown.upsert(msg(3), 3);
        assert!(!over.complete());
        assert_eq!(minutes(&over.remove(&msg(2).sk)), ["m1", "m3"]);
    }
}
