//! The race rule of the module docs, against the scripted store on tokio's paused clock: a slow
//! load is one that takes a second of virtual time, and everything else happens inside it.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::scripted::{ScriptedStore, ScriptedUsers};
use super::*;
use crate::model::{MessageGroup, MessageId};

const SLOW: Duration = Duration::from_secs(1);

fn user() -> UserUuid {
    UserUuid(Uuid::from_u128(1))
}

fn row(minute: u32, text: &str) -> MessageGroup {
    MessageGroup {
        owner: user(),
        sk: Sk::parse(&format!("2024-01-01T00:{minute:02}:00+00:00")).unwrap(),
        message_group_uuid: MessageGroupId(Uuid::from_u128(100 + minute as u128)),
        message: text.into(),
        user_uuid: UserUuid(Uuid::from_u128(2)),
        user_display_name: "B".into(),
        user_handle: "b".into(),
    }
}

fn message(minute: u32) -> Message {
    Message {
        group: MessageGroupId(Uuid::from_u128(7)),
        sk: Sk::parse(&format!("2024-01-01T00:{minute:02}:00+00:00")).unwrap(),
        message_uuid: MessageId(Uuid::from_u128(minute as u128)),
        message: format!("m{minute}"),
        user_uuid: user(),
        user_display_name: "A".into(),
        user_handle: "a".into(),
    }
}

fn cache(store: &Arc<ScriptedStore>, users: &Arc<ScriptedUsers>) -> Arc<Cache> {
    let cfg = CacheConfig { messages_per_group: 3, ..CacheConfig::default() };
    let store: Arc<dyn ConversationStore> = store.clone();
    let users: Arc<dyn UserDirectory> = users.clone();
    Arc::new(Cache::new(&cfg, Duration::from_secs(5), store, users, Arc::new(Metrics::new())))
}

fn texts(rows: &Served<GroupRows>) -> Vec<String> {
    rows.value.view().iter().map(|g| g.message.clone()).collect()
}

/// `user()`'s conversations, asked for on a task of its own.
fn groups_later(cache: &Arc<Cache>) -> tokio::task::JoinHandle<Result<Served<GroupRows>, CacheError>> {
    let cache = cache.clone();
    tokio::spawn(async move { cache.groups(user()).await })
}

/// `sub`'s user, asked for on a task of its own.
fn user_later(cache: &Arc<Cache>, sub: &CognitoSub) -> tokio::task::JoinHandle<Result<Option<UserUuid>, CacheError>> {
    let (cache, sub) = (cache.clone(), sub.clone());
    tokio::spawn(async move { cache.user(&sub).await.map(|served| *served.value) })
}

/// Lets every task that can run do so, on the paused clock.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_write_applied_during_a_slow_load_is_kept() {
    let (store, users) = (Arc::new(ScriptedStore::new()), Arc::new(ScriptedUsers::new()));
    store.put_group(row(1, "old"));
    store.set_latency(SLOW);
    let cache = cache(&store, &users);
    let load = groups_later(&cache);
    settle().await;
    // The load has read the table; a write lands and its stream record arrives meanwhile.
    store.put_group(row(2, "new"));
    let change = tokio::spawn({
        let cache = cache.clone();
        async move { cache.apply(Change::Upsert(Item::Group(row(2, "new")))).await }
    });
    settle().await;
    assert!(!change.is_finished(), "the change waits for the load of its key");
    tokio::time::advance(SLOW).await;
    assert_eq!(texts(&load.await.unwrap().unwrap()), ["old"], "the load answers what it read");
    change.await.unwrap();
    assert_eq!(texts(&cache.groups(user()).await.unwrap()), ["new", "old"]);
    assert_eq!(store.reads(), 1, "and the change was applied to the loaded entry, not reloaded");
}

#[tokio::test(start_paused = true)]
async fn a_load_that_a_flush_overtook_is_not_served_again() {
    let (store, users) = (Arc::new(ScriptedStore::new()), Arc::new(ScriptedUsers::new()));
    store.put_group(row(1, "old"));
    store.set_latency(SLOW);
    let cache = cache(&store, &users);
    let load = groups_later(&cache);
    settle().await;
    // A write whose record is lost (the reason for the flush), then the gap.
    store.put_group(row(2, "new"));
    ChangeSink::gap(cache.as_ref(), GapReason::StreamDisabled).await;
    tokio::time::advance(SLOW).await;
    assert_eq!(texts(&load.await.unwrap().unwrap()), ["old"]);
    let next = groups_later(&cache);
    tokio::time::advance(SLOW).await;
    assert_eq!(texts(&next.await.unwrap().unwrap()), ["new", "old"], "reloaded after the gap");
    assert_eq!(store.reads(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_load_from_before_the_first_position_is_dropped() {
    let (store, users) = (Arc::new(ScriptedStore::new()), Arc::new(ScriptedUsers::new()));
    store.put_group(row(1, "old"));
    let cache = cache(&store, &users);
    assert_eq!(texts(&cache.groups(user()).await.unwrap()), ["old"]);
    // Written before the tailer held LATEST: no record will bring it.
    store.put_group(row(2, "new"));
    ChangeSink::positioned(cache.as_ref()).await;
    assert_eq!(texts(&cache.groups(user()).await.unwrap()), ["new", "old"]);
    assert_eq!(store.reads(), 2);
}

#[tokio::test(start_paused = true)]
async fn misses_queued_behind_a_load_a_flush_overtook_share_one_reload() {
    let (store, users) = (Arc::new(ScriptedStore::new()), Arc::new(ScriptedUsers::new()));
    store.put_group(row(1, "old"));
    store.set_latency(SLOW);
    let cache = cache(&store, &users);
    let requests: Vec<_> = (0..4).map(|_| groups_later(&cache)).collect();
    settle().await;
    cache.flush(&GapReason::StreamDisabled);
    tokio::time::advance(SLOW * 3).await;
    for r in requests {
        assert!(r.await.unwrap().is_ok());
    }
    assert_eq!(store.reads(), 2, "the overtaken load and one reload under the new epoch");
    let _ = cache.groups(user()).await.unwrap();
    assert_eq!(store.reads(), 2, "the reload is kept: the next read is a hit");
}

#[tokio::test(start_paused = true)]
async fn a_miss_queued_behind_a_hung_load_answers_within_the_load_timeout() {
    let (store, users) = (Arc::new(ScriptedStore::new()), Arc::new(ScriptedUsers::new()));
    store.set_latency(Duration::from_secs(3600));
    let cache = cache(&store, &users);
    let first = groups_later(&cache);
    settle().await;
    let queued = groups_later(&cache);
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    assert!(matches!(first.await.unwrap(), Err(CacheError::Unavailable(_))));
    assert!(matches!(queued.await.unwrap(), Err(CacheError::Unavailable(_))), "not stuck behind the first");
}

#[tokio::test(start_paused = true)]
async fn stream_changes_keep_a_window_to_the_newest_messages() {
    let (store, users) = (Arc::new(ScriptedStore::new()), Arc::new(ScriptedUsers::new()));
    for m in 0..5 {
        store.put_message(message(m));
    }
    let cache = cache(&store, &users);
    let group = message(0).group;
    let window = cache.window(group).await.unwrap();
    assert_eq!(window.value.messages().len(), 3);
    store.put_message(message(9));
    cache.apply(Change::Upsert(Item::Message(message(9)))).await;
    let now: Vec<String> =
        cache.window(group).await.unwrap().value.messages().iter().map(|m| m.message.clone()).collect();
    assert_eq!(now, ["m3", "m4", "m9"]);
    assert_eq!(store.reads(), 1, "the change was applied, not reloaded");
}

#[tokio::test(start_paused = true)]
async fn a_window_emptied_by_deletes_is_loaded_again_not_left_empty() {
    let (store, users) = (Arc::new(ScriptedStore::new()), Arc::new(ScriptedUsers::new()));
    for m in 0..10 {
        store.put_message(message(m));
    }
    let cache = cache(&store, &users);
    let group = message(0).group;
    let page = |served: Served<Page<Message>>| served.value.items.iter().map(|m| m.message.clone()).collect::<Vec<_>>();
    assert_eq!(page(cache.messages_page(group, 3, None).await.unwrap()), ["m7", "m8", "m9"]);
    // The window's three messages are deleted, then one more is written.
    for m in 7..10 {
        store.delete_message(group, &message(m).sk);
        cache.apply(Change::Remove(ItemKey { pk: Pk::Messages(group), sk: message(m).sk })).await;
    }
    store.put_message(message(20));
    cache.apply(Change::Upsert(Item::Message(message(20)))).await;
    let reads = store.reads();
    for _ in 0..5 {
        assert_eq!(page(cache.messages_page(group, 3, None).await.unwrap()), ["m5", "m6", "m20"]);
    }
    assert_eq!(store.reads(), reads + 1, "one reload, then hits: not a DynamoDB read per request");
}

#[tokio::test]
async fn the_ttl_runs_from_the_load_so_an_active_key_is_reloaded() {
    // Real time: moka's clock is not tokio's.
    let (store, users) = (Arc::new(ScriptedStore::new()), Arc::new(ScriptedUsers::new()));
    store.put_group(row(1, "first"));
    let cfg = CacheConfig { ttl: Duration::from_millis(300), ..CacheConfig::default() };
    let cache = Cache::new(&cfg, Duration::from_secs(5), store.clone(), users, Arc::new(Metrics::new()));
    let started = std::time::Instant::now();
    let mut minute = 2;
    while started.elapsed() < Duration::from_secs(2) {
        let _ = cache.groups(user()).await.unwrap();
        // A change every 100 ms: each rewrites the entry, none may extend its life.
        store.put_group(row(minute, "more"));
        cache.apply(Change::Upsert(Item::Group(row(minute, "more")))).await;
        minute = (minute + 1) % 60;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(store.reads() >= 5, "reloaded {} times in 2 s with a 300 ms TTL", store.reads());
}

#[tokio::test(start_paused = true)]
async fn a_user_lookup_in_flight_when_its_mapping_is_forgotten_is_not_kept() {
    let (store, users) = (Arc::new(ScriptedStore::new()), Arc::new(ScriptedUsers::new()));
    let sub = CognitoSub("sub-1".into());
    let (before, after) = (UserUuid(Uuid::from_u128(10)), UserUuid(Uuid::from_u128(11)));
    users.set(&sub, Some(before));
    users.set_latency(SLOW);
    let cache = cache(&store, &users);
    let lookup = user_later(&cache, &sub);
    settle().await;
    users.set(&sub, Some(after));
    let forget = tokio::spawn({
        let (cache, sub) = (cache.clone(), sub.clone());
        async move { cache.forget_users([sub]).await }
    });
    settle().await;
    assert!(!forget.is_finished(), "the invalidation waits for the lookup in flight");
    tokio::time::advance(SLOW).await;
    assert_eq!(lookup.await.unwrap().unwrap(), Some(before));
    forget.await.unwrap();
    let next = user_later(&cache, &sub);
    tokio::time::advance(SLOW).await;
    assert_eq!(next.await.unwrap().unwrap(), Some(after));
    assert_eq!(users.lookups(), 2);
}
