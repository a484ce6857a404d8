//! An in-process [`ConversationStore`] and [`UserDirectory`] whose reads take a scripted time on
//! tokio's clock, so the race rule can be tested on a paused clock in milliseconds. A read sees
//! the data as it was when the read started, like a Query that has already been answered but
//! whose answer is still on its way.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;

use super::source::{CacheError, ConversationStore, Loaded, Newest, UserDirectory};
use crate::model::{CognitoSub, Message, MessageGroup, MessageGroupId, Sk, UserUuid};

#[derive(Default)]
struct Tables {
    groups: BTreeMap<UserUuid, BTreeMap<String, MessageGroup>>,
    messages: BTreeMap<MessageGroupId, BTreeMap<Sk, Message>>,
}

/// Conversations in memory.
#[derive(Default)]
pub struct ScriptedStore {
    tables: Mutex<Tables>,
    latency_ms: AtomicU64,
    reads: AtomicU64,
}

impl ScriptedStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// How long every read takes from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_ms.store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// Reads started so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    pub fn put_group(&self, g: MessageGroup) {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        t.groups.entry(g.owner).or_default().insert(g.sk.as_str().to_string(), g);
    }

    pub fn delete_group(&self, owner: UserUuid, sk: &Sk) {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rows) = t.groups.get_mut(&owner) {
            rows.remove(sk.as_str());
        }
    }

    pub fn put_message(&self, m: Message) {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        t.messages.entry(m.group).or_default().insert(m.sk.clone(), m);
    }

    pub fn delete_message(&self, group: MessageGroupId, sk: &Sk) {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(all) = t.messages.get_mut(&group) {
            all.remove(sk);
        }
    }

    async fn answer<T>(&self, snapshot: T) -> crate::Result<Loaded<T::Item>>
    where
        T: IntoIterator,
    {
        self.reads.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(self.latency_ms.load(Ordering::Relaxed))).await;
        Ok((snapshot.into_iter().collect(), Vec::new()))
    }
}

impl ConversationStore for ScriptedStore {
    fn group_rows(&self, user: UserUuid) -> BoxFuture<'_, crate::Result<Loaded<MessageGroup>>> {
        let snapshot: Vec<MessageGroup> = {
            let t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
            t.groups.get(&user).map(|rows| rows.values().cloned().collect()).unwrap_or_default()
        };
        Box::pin(self.answer(snapshot))
    }

    /// Reads the newest `n + 1` (as the real store does at best), so `read` is what a bounded
    /// read costs.
    fn newest_messages<'a>(
        &'a self,
        group: MessageGroupId,
        before: Option<&'a Sk>,
        n: usize,
    ) -> BoxFuture<'a, crate::Result<Newest>> {
        let older: Vec<Message> = {
            let t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
            let all = t.messages.get(&group);
            all.map(|all| all.values().filter(|m| before.is_none_or(|b| m.sk < *b)).cloned().collect())
                .unwrap_or_default()
        };
        Box::pin(async move {
            let (mut all, _) = self.answer(older).await?;
            let read = all.len().min(n + 1);
            let more = all.len() > n;
            let newest = all.split_off(all.len().saturating_sub(n));
            Ok(Newest { messages: newest, more, read, misfits: Vec::new() })
        })
    }
}

/// `sub -> users.uuid` in memory.
#[derive(Default)]
pub struct ScriptedUsers {
    map: Mutex<HashMap<CognitoSub, UserUuid>>,
    latency_ms: AtomicU64,
    lookups: AtomicU64,
}

impl ScriptedUsers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, sub: &CognitoSub, user: Option<UserUuid>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match user {
            Some(u) => map.insert(sub.clone(), u),
            None => map.remove(sub),
        };
    }

    pub fn set_latency(&self, latency: Duration) {
        self.latency_ms.store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }
}

impl UserDirectory for ScriptedUsers {
    fn lookup<'a>(&'a self, sub: &'a CognitoSub) -> BoxFuture<'a, Result<Option<UserUuid>, CacheError>> {
        let seen = self.map.lock().unwrap_or_else(|e| e.into_inner()).get(sub).copied();
        self.lookups.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(self.latency_ms.load(Ordering::Relaxed))).await;
            Ok(seen)
        })
    }

    fn describe(&self) -> &str {
        "scripted"
    }
}
