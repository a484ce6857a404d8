//! The group projector against real moto (DynamoDB, Streams) and a real PostgreSQL: rows move to
//! the newest message, races end with the newest, replays change nothing, a failing record is
//! skipped without blocking its shard, a killed leader is replaced from its checkpoint, and the
//! local demo shows the newest message.
//!
//! moto strands open iterator chains after a cancelled transaction (GUIDE section 3), so a test
//! that makes a condition fail in moto reads the table afterwards, never the stream. Failures
//! that are not conditions come from the fault proxy, not from moto. moto has one shard per
//! stream, so a message written last and seen moved means every earlier record was handled
//! ([`drain`]).
//!
//! A row's key is its owner and its time, so two conversations of one user never share a time
//! here (their rows would be one item); every conversation gets times of its own.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cruddur_syncd::daemon;
use cruddur_syncd::demo;
use cruddur_syncd::model::{Message, MessageGroup, MessageGroupId, MessageId, Pk, Sk, UserUuid};
use cruddur_syncd::store::Store;
use cruddur_syncd::tools::{self, JsonLines};
use uuid::Uuid;

use crate::support;
use crate::support::app::{conversation_rows, message, App, Setup, User};
use crate::support::daemon::Daemon;
use crate::support::fault_proxy::{Fault, FaultProxy, Rule};
use crate::support::metric;
use crate::support::{wait_until, TestDb};

const DEADLINE: Duration = Duration::from_secs(30);
/// Two daemon processes and a workload on a machine shared with other tests: room, not speed.
const FLEET_DEADLINE: Duration = Duration::from_secs(120);

fn projector(extra: &str) -> Setup {
    Setup {
        extra_config: format!("[projector]\nenabled = true\nlock_check_interval = \"200ms\"\n{extra}"),
        ..Setup::default()
    }
}

fn sk(ms: i64) -> Sk {
    let base: DateTime<Utc> = "2024-05-01T10:00:00Z".parse().unwrap();
    Sk::from_instant(base + chrono::Duration::milliseconds(ms))
}

fn new_group() -> MessageGroupId {
    MessageGroupId(Uuid::new_v4())
}

/// Every row of `group` per owner, read from the table (consistent Query per owner).
async fn rows_of(store: &Store, group: MessageGroupId, owners: &[UserUuid]) -> BTreeMap<UserUuid, Vec<MessageGroup>> {
    let mut out = BTreeMap::new();
    for owner in owners {
        let (rows, misfits) = store.group_rows(*owner).await.unwrap();
        assert!(misfits.is_empty(), "{misfits:?}");
        out.insert(*owner, rows.into_iter().filter(|r| r.message_group_uuid == group).collect());
    }
    out
}

/// Whether every owner's newest row of `group` is at `m` (its instant and text).
async fn rows_at(store: &Store, group: MessageGroupId, owners: &[UserUuid], m: &Message) -> bool {
    rows_of(store, group, owners).await.values().all(|rows| {
        rows.iter()
            .max_by(|a, b| a.sk.cmp(&b.sk))
            .is_some_and(|r| r.sk.instant() == m.sk.instant() && r.message == m.message)
    })
}

/// Waits until both rows of `group` show `m`, then checks there is exactly one row per owner,
/// in the canonical spelling, still naming the other participant.
async fn wait_moved(store: &Store, group: MessageGroupId, owners: &[UserUuid], m: &Message) {
    let what = format!("the rows of {group} show {:?} at {}", m.message, m.sk);
    wait_until(DEADLINE, &what, || rows_at(store, group, owners, m)).await;
    assert_exactly_one_row_each(store, group, owners, m).await;
}

async fn assert_exactly_one_row_each(store: &Store, group: MessageGroupId, owners: &[UserUuid], m: &Message) {
    for (owner, rows) in rows_of(store, group, owners).await {
        assert_eq!(rows.len(), 1, "owner {owner} has {} rows of {group}: {rows:?}", rows.len());
        assert_eq!(rows[0].sk, Sk::from_instant(m.sk.instant()), "written in the canonical spelling");
        assert_eq!(rows[0].message, m.message);
        assert_ne!(rows[0].user_uuid, owner, "a row names the other participant");
    }
}

/// A conversation of its own whose message, once seen moved, proves every record before it was
/// handled (moto: one shard, handled in order).
async fn drain(app: &App, a: &User, b: &User) {
    let group = new_group();
    for row in conversation_rows(group, sk(-500), a, b, "drain") {
        app.put_group(&row).await;
    }
    let m = message(group, sk(10_000_000), a, "drained");
    app.put_message(&m).await;
    wait_moved(&app.store(), group, &[a.uuid, b.uuid], &m).await;
}

async fn wait_leading(app: &App) {
    wait_until(DEADLINE, "this instance leads the projector", || async {
        app.metric("cruddur_syncd_projector_leader", &[]).await == 1.0
    })
    .await;
    // What the "projector leaders != 1" alert is gated on (deploy/prometheus/alerts.yaml).
    assert_eq!(app.metric("cruddur_syncd_projector_enabled", &[]).await, 1.0);
}

/// A daemon leading the projector (`extra`: more `[projector]` keys) whose DynamoDB client goes
/// through a fault proxy, and two users, `{prefix}a` and `{prefix}b`.
async fn leading_behind_a_proxy(extra: &str, prefix: &str) -> (FaultProxy, App, User, User) {
    let proxy = FaultProxy::start(&support::moto_url()).await;
    let mut setup = projector(extra);
    setup.dynamodb_endpoint = Some(proxy.url.clone());
    let app = App::start_with(setup).await;
    wait_leading(&app).await;
    let a = app.user(&format!("{prefix}a"), None, true).await;
    let b = app.user(&format!("{prefix}b"), None, true).await;
    (proxy, app, a, b)
}

/// A new conversation between `a` and `b` (rows at 0) whose first message, "one" at 1 s, has
/// moved both rows.
async fn a_conversation_moved_once(app: &App, a: &User, b: &User) -> (MessageGroupId, Message) {
    let group = new_group();
    for row in conversation_rows(group, sk(0), a, b, "hi") {
        app.put_group(&row).await;
    }
    let m1 = message(group, sk(1_000), a, "one");
    app.put_message(&m1).await;
    wait_moved(&app.store(), group, &[a.uuid, b.uuid], &m1).await;
    (group, m1)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_message_moves_both_rows_and_the_api_shows_it() {
    let app = App::start_with(projector("")).await;
    wait_leading(&app).await;
    let a = app.user("pa", None, true).await;
    let b = app.user("pb", None, true).await;
    let group = new_group();
    for row in conversation_rows(group, sk(0), &a, &b, "first") {
        app.put_group(&row).await;
    }
    app.put_message(&message(group, sk(0), &a, "first")).await;
    // Cached before the message, so the API's answer below comes from the stream, not a load.
    let before: Vec<serde_json::Value> = app.get("/api/message_groups", &a.access_token).await.json().await.unwrap();
    assert_eq!(before[0]["message"], "first");

    // A naive timestamp, as tables in the wild hold: the rows get the canonical spelling.
    let newest = Message { sk: Sk::parse("2024-05-01T10:00:01.5").unwrap(), ..message(group, sk(0), &b, "newest") };
    app.put_message(&newest).await;
    wait_moved(&app.store(), group, &[a.uuid, b.uuid], &newest).await;

    for user in [&a, &b] {
        wait_until(DEADLINE, "the API shows the newest message", || async {
            let Some(list) = app.list_if_ok("/api/message_groups", &user.access_token).await else { return false };
            list.len() == 1
                && list[0]["message"] == "newest"
                && list[0]["created_at"] == "2024-05-01T10:00:01.500000+00:00"
        })
        .await;
    }
    assert!(app.metric("cruddur_syncd_projector_rows_moved_total", &[]).await >= 2.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_messages_end_with_the_newest_and_late_ones_are_stale() {
    let app = App::start_with(projector("")).await;
    wait_leading(&app).await;
    let a = app.user("ra", None, true).await;
    let b = app.user("rb", None, true).await;
    let owners = [a.uuid, b.uuid];

    // Stream order against time order: the newest message is written first.
    let late = new_group();
    for row in conversation_rows(late, sk(-2), &a, &b, "hi") {
        app.put_group(&row).await;
    }
    let newest = message(late, sk(5_000), &b, "newest, written first");
    app.put_message(&newest).await;
    app.put_message(&message(late, sk(4_000), &a, "older, written second")).await;

    // Twenty writers at once in one conversation, at shuffled times.
    let busy = new_group();
    for row in conversation_rows(busy, sk(-1), &a, &b, "hi") {
        app.put_group(&row).await;
    }
    let mut times: Vec<i64> = (1..=20).map(|i| i * 100).collect();
    times.sort_by_key(|t| (t * 7919) % 23);
    let messages: Vec<Message> =
        times.iter().map(|t| message(busy, sk(*t), if t % 200 == 0 { &a } else { &b }, &format!("at {t}"))).collect();
    futures::future::join_all(messages.iter().map(|m| app.put_message(m))).await;
    let busy_newest = messages.iter().max_by(|x, y| x.sk.cmp(&y.sk)).unwrap().clone();
    assert_eq!(busy_newest.message, "at 2000");

    drain(&app, &a, &b).await;
    assert_exactly_one_row_each(&app.store(), late, &owners, &newest).await;
    assert_exactly_one_row_each(&app.store(), busy, &owners, &busy_newest).await;
    assert!(
        app.metric("cruddur_syncd_projector_records_skipped_total", &["reason=\"stale\""]).await >= 1.0,
        "the older message came after the newest one and must have been skipped as stale"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_stream_changes_nothing() {
    let mut app = App::start_with(projector("")).await;
    wait_leading(&app).await;
    let a = app.user("ya", None, true).await;
    let b = app.user("yb", None, true).await;
    let owners = [a.uuid, b.uuid];
    let mut groups = Vec::new();
    for g in 0..3 {
        let group = new_group();
        for row in conversation_rows(group, sk(-1 - g), &a, &b, "hi") {
            app.put_group(&row).await;
        }
        for i in 1..=4 {
            app.put_message(&message(group, sk(g * 10 + i), &a, &format!("g{g} m{i}"))).await;
        }
        groups.push(group);
    }
    drain(&app, &a, &b).await;
    let snapshot = |store: Store| async move {
        let mut all = Vec::new();
        for owner in owners {
            all.extend(store.query_partition(&Pk::Groups(owner), true, None).await.unwrap());
        }
        all.into_iter().map(|i| cruddur_syncd::model::item_to_json(&i)).collect::<Vec<_>>()
    };
    let before = snapshot(app.store()).await;
    assert_eq!(before.len(), 2 * 4, "3 conversations and the drain's, one row per owner each");

    let first = app.running.take().unwrap();
    let handled = first.metrics.projector_records.get();
    assert!(first.metrics.projector_rows_moved.get() >= 2 * 13);
    assert!(first.stop().await);
    // Without checkpoints the next leader reads the whole stream again: every batch replayed.
    let deleted = sqlx::query("DELETE FROM cruddur_syncd_projector_checkpoint").execute(&app.pg).await.unwrap();
    assert!(deleted.rows_affected() >= 1, "the first leader saved a checkpoint");

    let second = daemon::start(&app.loaded).await.unwrap();
    let metrics = second.metrics.clone();
    app.running = Some(second);
    wait_until(DEADLINE, "the second leader has replayed every record", || {
        let n = metrics.projector_records.get();
        async move { n >= handled }
    })
    .await;
    assert_eq!(metrics.projector_rows_moved.get(), 0, "a replay moves nothing");
    let stale =
        metrics.projector_records_skipped.get_or_create(&cruddur_syncd::metrics::ReasonLabels { reason: "stale" });
    assert!(stale.get() >= 13, "every message was seen again and found stale ({})", stale.get());
    assert_eq!(snapshot(app.store()).await, before, "the table is exactly as before the replay");
    app.stop().await;
}

const TRANSACT: &str = "DynamoDB_20120810.TransactWriteItems";

#[tokio::test(flavor = "multi_thread")]
async fn a_record_dynamodb_refuses_is_skipped_and_the_shard_goes_on() {
    // DynamoDB (not Streams) through a proxy that answers every TransactWriteItems with a
    // ValidationException: a refusal that no retry can cure.
    let (proxy, app, a, b) = leading_behind_a_proxy("max_attempts = 3\n", "f").await;
    let owners = [a.uuid, b.uuid];
    let (group, m1) = a_conversation_moved_once(&app, &a, &b).await;

    proxy.inject(Rule::on(TRANSACT, Fault::ValidationException));
    let m2 = message(group, sk(2_000), &b, "two, never projected");
    app.put_message(&m2).await;
    wait_until(DEADLINE, "the projector gives up on the record", || async {
        app.metric("cruddur_syncd_projector_records_skipped_total", &["reason=\"failed\""]).await >= 1.0
    })
    .await;
    assert_eq!(proxy.injected(TRANSACT), 3, "skipped after projector.max_attempts refusals");
    assert!(rows_at(&app.store(), group, &owners, &m1).await, "the skipped message moved nothing");

    proxy.clear();
    let m3 = message(group, sk(3_000), &a, "three");
    app.put_message(&m3).await;
    wait_moved(&app.store(), group, &owners, &m3).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_longer_than_give_up_after_delays_the_projection_but_loses_nothing() {
    let (proxy, app, a, b) = leading_behind_a_proxy("give_up_after = \"1s\"\n", "o").await;
    let owners = [a.uuid, b.uuid];
    let (group, _) = a_conversation_moved_once(&app, &a, &b).await;

    // DynamoDB fails every write with a 500 for several give_up_after's.
    proxy.inject(Rule::on(TRANSACT, Fault::InternalServerError));
    let m2 = message(group, sk(2_000), &b, "two, written during the outage");
    app.put_message(&m2).await;
    wait_until(DEADLINE, "the projector is retrying", || async {
        app.metric("cruddur_syncd_projector_retrying", &[]).await == 1.0
    })
    .await;
    let retrying_since = std::time::Instant::now();
    let injected = proxy.injected(TRANSACT);
    while retrying_since.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(proxy.injected(TRANSACT) > injected, "still trying after give_up_after");
    assert_eq!(app.metric("cruddur_syncd_projector_records_skipped_total", &["reason=\"failed\""]).await, 0.0);
    // Updated at each failed attempt, whose spacing the SDK's retry pauses make random.
    wait_until(DEADLINE, "the lag shows the outage", || async {
        app.metric("cruddur_syncd_projector_lag_seconds", &[]).await >= 3.0
    })
    .await;

    proxy.clear();
    wait_moved(&app.store(), group, &owners, &m2).await;
    wait_until(DEADLINE, "the retrying gauge is back to 0", || async {
        app.metric("cruddur_syncd_projector_retrying", &[]).await == 0.0
    })
    .await;
    assert_eq!(app.metric("cruddur_syncd_projector_records_skipped_total", &["reason=\"failed\""]).await, 0.0);
    app.stop().await;
}

/// A GSI Query answer (the AWS JSON wire form) holding `rows`: what an eventually consistent
/// index may still return after the table changed.
fn index_answer(rows: &[MessageGroup]) -> String {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let attrs: serde_json::Map<String, serde_json::Value> =
                r.to_item().into_iter().map(|(k, v)| (k, serde_json::json!({ "S": v.as_s().unwrap() }))).collect();
            serde_json::Value::Object(attrs)
        })
        .collect();
    serde_json::json!({ "Items": items, "Count": rows.len(), "ScannedCount": rows.len() }).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_index_read_never_deletes_the_only_real_row() {
    // The table holds R(t2) for both owners: a message at t3 was deleted and `repair-groups`
    // moved the rows back. The index still shows the old R(t3) (beside R(t2) for one owner).
    // A record for t3 (a replay) must not make the projector keep the phantom R(t3) and delete
    // the real R(t2): the conversation would vanish from that owner's list for good.
    let (proxy, app, a, b) = leading_behind_a_proxy("", "s").await;
    let owners = [a.uuid, b.uuid];
    let group = new_group();
    let at_t2 = conversation_rows(group, sk(2_000), &a, &b, "two");
    for row in &at_t2 {
        app.put_group(row).await;
    }
    drain(&app, &a, &b).await;

    let at_t3 = conversation_rows(group, sk(3_000), &a, &b, "three");
    let stale = index_answer(&[at_t3[0].clone(), at_t2[0].clone(), at_t3[1].clone()]);
    proxy.inject(
        Rule::on("DynamoDB_20120810.Query", Fault::Answer(stale))
            .when_body_contains("IndexName")
            .when_body_contains(&group.to_string()),
    );
    let m3 = message(group, sk(3_000), &a, "three");
    app.put_message(&m3).await;
    // Both owners end with exactly one row, at the message: nothing was deleted on the index's
    // word, and the rows the index hid were read from the table.
    wait_moved(&app.store(), group, &owners, &m3).await;
    assert!(proxy.injected("DynamoDB_20120810.Query") >= 1, "the projector read the stale index");
    assert!(
        app.metric("cruddur_syncd_projector_conflicts_total", &[]).await >= 1.0,
        "the check failed and it read again"
    );
    app.stop().await;
}

/// A projector whose DynamoDB goes through a fault proxy, leading, with a conversation between
/// two users whose rows are in the table and every record before it handled.
async fn lagging_index_scene(prefix: &str) -> (FaultProxy, App, [User; 2], MessageGroupId) {
    let (proxy, app, a, b) = leading_behind_a_proxy("", prefix).await;
    let group = new_group();
    for row in conversation_rows(group, sk(0), &a, &b, "hi") {
        app.put_group(&row).await;
    }
    drain(&app, &a, &b).await;
    (proxy, app, [a, b], group)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_that_shows_no_row_yet_is_read_around() {
    // The index returns nothing for a conversation whose rows the table already has (index
    // lag): not "no rows". The participants' partitions hold the truth.
    let (proxy, app, [a, b], group) = lagging_index_scene("la").await;
    proxy.inject(
        Rule::on("DynamoDB_20120810.Query", Fault::Answer(index_answer(&[])))
            .when_body_contains("IndexName")
            .when_body_contains(&group.to_string()),
    );
    let m1 = message(group, sk(1_000), &a, "one");
    app.put_message(&m1).await;
    wait_moved(&app.store(), group, &[a.uuid, b.uuid], &m1).await;
    assert!(proxy.injected("DynamoDB_20120810.Query") >= 1, "the projector read the empty index");
    assert_eq!(app.metric("cruddur_syncd_projector_records_skipped_total", &["reason=\"no_group_rows\""]).await, 0.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_that_shows_one_participant_moves_both() {
    // The index shows A's row but not B's yet: B's row must move too, not stay behind unseen.
    let (proxy, app, [a, b], group) = lagging_index_scene("pa").await;
    let [row_a, _] = conversation_rows(group, sk(0), &a, &b, "hi");
    proxy.inject(
        Rule::on("DynamoDB_20120810.Query", Fault::Answer(index_answer(&[row_a])))
            .when_body_contains("IndexName")
            .when_body_contains(&group.to_string()),
    );
    let m1 = message(group, sk(1_000), &b, "one");
    app.put_message(&m1).await;
    wait_moved(&app.store(), group, &[a.uuid, b.uuid], &m1).await;
    assert!(proxy.injected("DynamoDB_20120810.Query") >= 1, "the projector read the partial index");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_shows_the_newest_message_after_one_is_sent() {
    let app = App::start_with(projector("")).await;
    let [andrew, bayko] = demo::users();
    let a = app.user(andrew.handle, Some(andrew.uuid), true).await;
    let b = app.user(bayko.handle, Some(bayko.uuid), true).await;
    tools::ddb::seed(&app.store(), Utc::now(), &mut JsonLines::new(Vec::new())).await.unwrap();
    let filler = *demo::CONVERSATION.last().unwrap();
    let list: Vec<serde_json::Value> = app.get("/api/message_groups", &a.access_token).await.json().await.unwrap();
    assert_eq!(list[0]["message"], filler, "the seed's rows carry its newest message");

    // What the Flask app does when Andrew sends a message: one PutItem of the message, nothing else.
    let sent = Message {
        group: demo::group_id(),
        sk: Sk::from_instant(Utc::now()),
        message_uuid: MessageId(Uuid::new_v4()),
        message: "Did you see the new Babylon 5 animated film?".into(),
        user_uuid: andrew.uuid,
        user_display_name: andrew.display_name.into(),
        user_handle: andrew.handle.into(),
    };
    app.put_message(&sent).await;
    for (user, other) in [(&a, bayko.handle), (&b, andrew.handle)] {
        wait_until(DEADLINE, "the conversation list shows the message just sent", || async {
            let Some(list) = app.list_if_ok("/api/message_groups", &user.access_token).await else { return false };
            list.len() == 1 && list[0]["message"] == sent.message.as_str() && list[0]["handle"] == other
        })
        .await;
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Two daemons, one leader

/// A table, a database and a config that two daemon processes share.
struct Fleet {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    store: Store,
    streams: aws_sdk_dynamodbstreams::Client,
    pg: sqlx::PgPool,
    db: Option<TestDb>,
}

impl Fleet {
    async fn new() -> Fleet {
        let moto = support::moto_url();
        let sdk = support::sdk_config(&moto).await;
        let cognito = support::cognito_client(&sdk);
        // The daemon loads the pool's JWKS at start; no user signs in here.
        let pool_id = support::create_pool(&cognito, "fleet-").await;
        let db = TestDb::create().await;
        let pg = sqlx::PgPool::connect(&db.url).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let table = support::unique("fleet-");
        let path = support::write_config(dir.path(), &moto, &table, &db.url, &pool_id, "client");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(
            "\n[stream]\npoll_interval = \"100ms\"\n\n[reconcile]\nenabled = false\n\n\
             [projector]\nenabled = true\nlock_check_interval = \"200ms\"\n\n\
             [log]\nlevel = \"info,cruddur_syncd::projector=debug,cruddur_syncd::lease=debug\"\n",
        );
        std::fs::write(&path, text).unwrap();
        let loaded = cruddur_syncd::config::load(&path).unwrap();
        let store = Store::new(support::ddb_client(&sdk), table, moto.clone());
        tools::ddb::schema_load(&loaded.config, &store, &mut JsonLines::new(Vec::new())).await.unwrap();
        Fleet { _dir: dir, config: path, store, streams: support::streams_client(&sdk), pg, db: Some(db) }
    }

    async fn put(&self, item: std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>) {
        self.store.client().put_item().table_name(self.store.table()).set_item(Some(item)).send().await.unwrap();
    }

    /// Every record's sequence number, in stream order (moto: one shard, never closed).
    async fn stream_sequence_numbers(&self) -> Vec<String> {
        let table = self.store.client().describe_table().table_name(self.store.table()).send().await.unwrap();
        let arn = table.table.unwrap().latest_stream_arn.unwrap();
        let stream = self.streams.describe_stream().stream_arn(&arn).send().await.unwrap();
        let shards = stream.stream_description.unwrap().shards.unwrap_or_default();
        assert_eq!(shards.len(), 1);
        let mut it = self
            .streams
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id(shards[0].shard_id().unwrap())
            .shard_iterator_type(aws_sdk_dynamodbstreams::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator;
        let mut out = Vec::new();
        while let Some(current) = it {
            let page = self.streams.get_records().shard_iterator(current).send().await.unwrap();
            let records = page.records.unwrap_or_default();
            if records.is_empty() {
                break;
            }
            out.extend(records.iter().map(|r| r.dynamodb().unwrap().sequence_number().unwrap().to_string()));
            it = page.next_shard_iterator;
        }
        out
    }

    async fn checkpoint(&self) -> Option<String> {
        sqlx::query_scalar("SELECT sequence_number FROM cruddur_syncd_projector_checkpoint")
            .fetch_optional(&self.pg)
            .await
            .unwrap()
            .flatten()
    }
}

async fn leader(d: &Daemon) -> f64 {
    metric(&d.metrics().await, "cruddur_syncd_projector_leader", &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_leader_is_replaced_from_its_checkpoint_losing_and_doubling_nothing() {
    let fleet = Fleet::new().await;
    let first = Daemon::spawn(&fleet.config, &[]).await;
    wait_until(DEADLINE, "the first daemon leads", || async { leader(&first).await == 1.0 }).await;
    let mut second = Daemon::spawn(&fleet.config, &[]).await;
    second
        .wait_log("the second daemon finds the lock taken", DEADLINE, |l| {
            l.contains("another instance holds the projector lock")
        })
        .await;
    assert_eq!(leader(&second).await, 0.0);

    // Four conversations between two users, then 60 messages round robin, each newer than the
    // last, written while the leader is killed and replaced.
    let (a, b) = (UserUuid(Uuid::new_v4()), UserUuid(Uuid::new_v4()));
    let row = |owner: UserUuid, other: UserUuid, group: MessageGroupId, at: i64| MessageGroup {
        owner,
        sk: sk(at),
        message_group_uuid: group,
        message: "hi".into(),
        user_uuid: other,
        user_display_name: format!("User {other}"),
        user_handle: format!("h{}", &other.to_string()[..8]),
    };
    let groups: Vec<MessageGroupId> = (0..4).map(|_| new_group()).collect();
    for (n, g) in groups.iter().enumerate() {
        fleet.put(row(a, b, *g, -1 - n as i64).to_item()).await;
        fleet.put(row(b, a, *g, -1 - n as i64).to_item()).await;
    }
    let messages: Vec<Message> = (1..=60)
        .map(|i| Message {
            group: groups[i % 4],
            sk: sk(i as i64 * 1000),
            message_uuid: MessageId(Uuid::new_v4()),
            message: format!("message {i}"),
            user_uuid: if i % 2 == 0 { a } else { b },
            user_display_name: "someone".into(),
            user_handle: "someone".into(),
        })
        .collect();
    let writer = {
        let (store, messages) = (fleet.store.clone(), messages.clone());
        tokio::spawn(async move {
            for m in messages {
                store.client().put_item().table_name(store.table()).set_item(Some(m.to_item())).send().await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Kill the leader in the middle of the workload, with rows moving.
    wait_until(DEADLINE, "the first leader has moved some rows", || async {
        metric(&first.metrics().await, "cruddur_syncd_projector_rows_moved_total", &[]) >= 20.0
    })
    .await;
    let _ = first.kill9();
    let resumed = second
        .wait_log("the second daemon takes over", DEADLINE, |l| l.contains("resuming from the checkpoints"))
        .await;
    writer.await.unwrap();

    let owners = [a, b];
    for g in &groups {
        let newest = messages.iter().filter(|m| m.group == *g).max_by(|x, y| x.sk.cmp(&y.sk)).unwrap();
        let end = std::time::Instant::now() + FLEET_DEADLINE;
        while !rows_at(&fleet.store, *g, &owners, newest).await {
            assert!(
                std::time::Instant::now() < end,
                "the rows of {g} never showed {:?}; the second daemon's log:\n{}",
                newest.message,
                second.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_exactly_one_row_each(&fleet.store, *g, &owners, newest).await;
    }
    assert_eq!(leader(&second).await, 1.0);

    // The second leader started right after the first one's checkpoint: it handled exactly the
    // records after it, not the whole stream again.
    let from = resumed.split("positions=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap();
    let (_, resumed_after) = from.split_once('@').expect("shard@sequence_number");
    let last = fleet.stream_sequence_numbers().await.last().cloned().unwrap();
    wait_until(FLEET_DEADLINE, "the second leader saved a checkpoint at the end of the stream", || async {
        fleet.checkpoint().await.as_deref() == Some(last.as_str())
    })
    .await;
    let all = fleet.stream_sequence_numbers().await;
    let at = all.iter().position(|s| s == resumed_after).expect("the checkpoint names a record of the stream");
    let after = (all.len() - at - 1) as f64;
    let handled = metric(&second.metrics().await, "cruddur_syncd_projector_records_total", &[]);
    // Had it read the stream from the start, it would have handled all of it.
    assert!(at > 0, "the first leader saved a checkpoint before it was killed");
    assert_eq!(handled, after, "records after the checkpoint: {after}, handled by the second leader: {handled}");

    drop(second);
    fleet.pg.close().await;
    let mut fleet = fleet;
    if let Some(db) = fleet.db.take() {
        db.drop_db().await;
    }
}

// ---------------------------------------------------------------------------------------------
// ddb repair-groups

fn repair(fleet: &Fleet, apply: bool) -> (Vec<serde_json::Value>, serde_json::Value) {
    let mut cmd = support::bin();
    cmd.arg("--config").arg(&fleet.config).args(["ddb", "repair-groups"]);
    if apply {
        cmd.arg("--apply");
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let mut lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary = lines.pop().expect("a summary line");
    (lines, summary)
}

async fn scan_all(store: &Store) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    store.scan(None, |i| all.push(cruddur_syncd::model::item_to_json(&i))).await.unwrap();
    all.sort_by_key(|v| (v["pk"].to_string(), v["sk"].to_string()));
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn repair_groups_plans_by_default_and_applies_with_apply() {
    let fleet = Fleet::new().await;
    let (a, b) = (UserUuid(Uuid::new_v4()), UserUuid(Uuid::new_v4()));
    let row = |owner: UserUuid, group: MessageGroupId, sk: Sk, text: &str| MessageGroup {
        owner,
        sk,
        message_group_uuid: group,
        message: text.into(),
        user_uuid: if owner == a { b } else { a },
        user_display_name: "Other".into(),
        user_handle: "other".into(),
    };
    let msg = |group: MessageGroupId, sk: Sk, text: &str| Message {
        group,
        sk,
        message_uuid: MessageId(Uuid::new_v4()),
        message: text.into(),
        user_uuid: a,
        user_display_name: "A".into(),
        user_handle: "a".into(),
    };
    let [dupes, ahead, right, orphan, retext] = [(); 5].map(|_| new_group());
    let mut newest = BTreeMap::new();
    // What the Lambda leaves behind: duplicates and a row rolled back...
    fleet.put(msg(dupes, sk(1_000), "one").to_item()).await;
    fleet.put(msg(dupes, sk(2_000), "two").to_item()).await;
    newest.insert(dupes, msg(dupes, sk(2_000), "two"));
    fleet.put(row(a, dupes, sk(1_000), "one").to_item()).await;
    fleet.put(row(a, dupes, sk(2_000), "two").to_item()).await;
    fleet.put(row(b, dupes, sk(1_000), "one").to_item()).await;
    // ...a row ahead of every message (the message was deleted), beside a right one in a naive
    // spelling, which stays...
    fleet.put(msg(ahead, sk(5_000), "five").to_item()).await;
    newest.insert(ahead, msg(ahead, sk(5_000), "five"));
    fleet.put(row(a, ahead, sk(9_000), "deleted since").to_item()).await;
    fleet.put(row(b, ahead, Sk::parse("2024-05-01T10:00:05").unwrap(), "five").to_item()).await;
    // ...a conversation that is right...
    fleet.put(msg(right, sk(3_000), "three").to_item()).await;
    newest.insert(right, msg(right, sk(3_000), "three"));
    fleet.put(row(a, right, sk(3_000), "three").to_item()).await;
    fleet.put(row(b, right, sk(3_000), "three").to_item()).await;
    // ...rows without any message (left alone), and a row at the right time with the wrong text.
    fleet.put(row(a, orphan, sk(4_000), "where from?").to_item()).await;
    fleet.put(msg(retext, sk(7_000), "seven").to_item()).await;
    newest.insert(retext, msg(retext, sk(7_000), "seven"));
    fleet.put(row(a, retext, sk(7_000), "not seven").to_item()).await;
    fleet.put(row(b, retext, sk(7_000), "seven").to_item()).await;

    let before = scan_all(&fleet.store).await;
    let (plan, summary) = repair(&fleet, false);
    assert_eq!(summary["dry_run"], true);
    assert_eq!(summary["conversations"], 5);
    assert_eq!(summary["conversations_without_messages"], 1);
    assert_eq!(summary["owners_to_fix"], 4, "{plan:#?}");
    assert_eq!(summary["fixed"], 0);
    assert_eq!(plan.len(), 4);
    assert!(plan.iter().all(|l| l["result"] == "planned"), "{plan:#?}");
    let action = |group: MessageGroupId, owner: UserUuid| {
        plan.iter()
            .find(|l| l["group"] == group.to_string() && l["owner"] == owner.to_string())
            .map(|l| l["action"].as_str().unwrap().to_string())
    };
    assert_eq!(action(dupes, a).as_deref(), Some("move"));
    assert_eq!(action(dupes, b).as_deref(), Some("move"));
    assert_eq!(action(ahead, a).as_deref(), Some("move"));
    assert_eq!(action(retext, a).as_deref(), Some("rewrite"));
    assert_eq!(scan_all(&fleet.store).await, before, "a dry run writes nothing");

    let (fixed, summary) = repair(&fleet, true);
    assert_eq!(summary["dry_run"], false);
    assert_eq!(summary["fixed"], 4, "{fixed:#?}");
    assert_eq!(summary["conflicts"], 0);
    for (group, m) in &newest {
        for (owner, rows) in rows_of(&fleet.store, *group, &[a, b]).await {
            assert_eq!(rows.len(), 1, "{owner} in {group}: {rows:?}");
            assert_eq!(rows[0].sk.instant(), m.sk.instant(), "{owner} in {group}");
            assert_eq!(rows[0].message, m.message, "{owner} in {group}");
        }
    }
    let kept = rows_of(&fleet.store, ahead, &[b]).await;
    assert_eq!(kept[&b][0].sk.as_str(), "2024-05-01T10:00:05", "a right row is not rewritten for its spelling");
    assert_eq!(rows_of(&fleet.store, orphan, &[a]).await[&a].len(), 1, "rows without messages stay");

    let (again, summary) = repair(&fleet, false);
    assert!(again.is_empty(), "{again:#?}");
    assert_eq!(summary["owners_to_fix"], 0);
    fleet.pg.close().await;
    let mut fleet = fleet;
    if let Some(db) = fleet.db.take() {
        db.drop_db().await;
    }
}
