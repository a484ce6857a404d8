//! The tailer against moto's real DynamoDB Streams: every write API, every view type.
//!
//! moto's quirks shape the assertions (see the guide): an UpdateItem that creates an item may
//! yield two INSERTs and a write that changes nothing yields a MODIFY, so tests compare each
//! item's sequence of changes with consecutive repeats collapsed, never exact counts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue as V, BillingMode, Delete, DeleteRequest, KeySchemaElement, KeyType, Put,
    PutRequest, ScalarAttributeType, StreamSpecification, StreamViewType, TransactWriteItem, Update, WriteRequest,
};
use chrono::{DateTime, Utc};
use cruddur_syncd::config::StreamConfig;
use cruddur_syncd::metrics::{Metrics, SkipLabels};
use cruddur_syncd::model::{Item, ItemKey, Message, MessageGroup, MessageGroupId, MessageId, Sk, UserUuid};
use cruddur_syncd::stream::{AwsSource, Change, ChangeRecord, Tailer, TailerStatus};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support;
use crate::support::{wait_until, RecordingSink};

const DEADLINE: Duration = Duration::from_secs(30);

struct Env {
    ddb: aws_sdk_dynamodb::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    table: String,
}

async fn table_with_stream(view: StreamViewType) -> Env {
    let sdk = support::sdk_config(&support::moto_url()).await;
    let ddb = support::ddb_client(&sdk);
    let streams = support::streams_client(&sdk);
    let table = support::unique("stream-");
    let key = |n: &str, t| KeySchemaElement::builder().attribute_name(n).key_type(t).build().unwrap();
    let attr = |n: &str| {
        AttributeDefinition::builder().attribute_name(n).attribute_type(ScalarAttributeType::S).build().unwrap()
    };
    ddb.create_table()
        .table_name(&table)
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("sk", KeyType::Range))
        .attribute_definitions(attr("pk"))
        .attribute_definitions(attr("sk"))
        .billing_mode(BillingMode::PayPerRequest)
        .stream_specification(
            StreamSpecification::builder().stream_enabled(true).stream_view_type(view).build().unwrap(),
        )
        .send()
        .await
        .unwrap();
    Env { ddb, streams, table }
}

struct Running {
    sink: Arc<RecordingSink>,
    metrics: Arc<Metrics>,
    status: watch::Receiver<TailerStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Env {
    async fn start_tailer(&self) -> Running {
        let source = Arc::new(AwsSource::new(self.ddb.clone(), self.streams.clone()));
        let metrics = Arc::new(Metrics::new());
        let tailer = Tailer::new(source, self.table.clone(), StreamConfig::default(), Arc::clone(&metrics));
        let status = tailer.status();
        let sink = Arc::new(RecordingSink::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tailer.run(Arc::clone(&sink), shutdown.clone()));
        let running = Running { sink, metrics, status, shutdown, task };
        let status = running.status.clone();
        wait_until(DEADLINE, "the tailer is positioned on moto's stream", || {
            let ok = status.borrow().positioned;
            async move { ok }
        })
        .await;
        running
    }

    async fn put(&self, item: HashMap<String, V>) {
        self.ddb.put_item().table_name(&self.table).set_item(Some(item)).send().await.unwrap();
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("the tailer did not stop").unwrap();
    }

    /// Waits until some delivered change satisfies `pred`.
    async fn wait_for(&self, what: &str, pred: impl Fn(&ChangeRecord) -> bool) {
        wait_until(DEADLINE, what, || {
            let ok = self.sink.changes().iter().any(&pred);
            async move { ok }
        })
        .await;
    }
}

fn sk(n: i64) -> Sk {
    let base: DateTime<Utc> = "2024-05-01T10:00:00Z".parse().unwrap();
    Sk::from_instant(base + chrono::Duration::milliseconds(n))
}

fn message(group: MessageGroupId, n: i64, text: &str) -> Message {
    Message {
        group,
        sk: sk(n),
        message_uuid: MessageId(Uuid::new_v4()),
        message: text.to_string(),
        user_uuid: UserUuid(Uuid::new_v4()),
        user_display_name: "Andrew Brown".into(),
        user_handle: "andrewbrown".into(),
    }
}

fn group_row(owner: UserUuid, n: i64, text: &str) -> MessageGroup {
    MessageGroup {
        owner,
        sk: sk(n),
        message_group_uuid: MessageGroupId(Uuid::new_v4()),
        message: text.to_string(),
        user_uuid: UserUuid(Uuid::new_v4()),
        user_display_name: "Worf".into(),
        user_handle: "worf".into(),
    }
}

fn key_attrs(key: &ItemKey) -> HashMap<String, V> {
    HashMap::from([("pk".into(), V::S(key.pk.to_string())), ("sk".into(), V::S(key.sk.as_str().into()))])
}

/// What one change did to its item, comparable across view types.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Upsert(Item),
    Invalidate,
    Remove,
}

/// Each item's changes in delivery order, consecutive repeats collapsed (moto repeats some).
fn per_item(changes: &[ChangeRecord]) -> HashMap<ItemKey, Vec<Seen>> {
    let mut out: HashMap<ItemKey, Vec<Seen>> = HashMap::new();
    for c in changes {
        let (key, seen) = match &c.change {
            Change::Upsert(item) => (item.key(), Seen::Upsert(item.clone())),
            Change::Invalidate(key) => (key.clone(), Seen::Invalidate),
            Change::Remove(key) => (key.clone(), Seen::Remove),
        };
        let list = out.entry(key).or_default();
        if list.last() != Some(&seen) {
            list.push(seen);
        }
    }
    out
}

/// Every write API, then the per-item history the tailer delivered.
async fn every_write_api_arrives_in_order(view: StreamViewType) {
    let env = table_with_stream(view.clone()).await;
    let run = env.start_tailer().await;
    let images = view != StreamViewType::KeysOnly;

    let group = MessageGroupId(Uuid::new_v4());
    let owner = UserUuid(Uuid::new_v4());
    let m1 = message(group, 1, "first");
    let m2 = message(group, 2, "second");
    let m3 = message(group, 3, "third");
    let m4 = message(group, 4, "fourth");
    let m5 = message(group, 5, "created by update");
    let g = group_row(owner, 1, "first");

    // PutItem, then UpdateItem of an existing item.
    env.put(m1.to_item()).await;
    let m1_edited = Message { message: "first, edited".into(), ..m1.clone() };
    env.ddb
        .update_item()
        .table_name(&env.table)
        .set_key(Some(key_attrs(&Item::Message(m1.clone()).key())))
        .update_expression("SET message = :m")
        .expression_attribute_values(":m", V::S(m1_edited.message.clone()))
        .send()
        .await
        .unwrap();
    // UpdateItem that creates the item (moto: two INSERTs).
    let mut m5_values = m5.to_item();
    let m5_key = Item::Message(m5.clone()).key();
    m5_values.retain(|k, _| k != "pk" && k != "sk");
    let mut update = env.ddb.update_item().table_name(&env.table).set_key(Some(key_attrs(&m5_key)));
    let mut sets = Vec::new();
    for (i, (name, value)) in m5_values.into_iter().enumerate() {
        sets.push(format!("#n{i} = :v{i}"));
        update = update
            .expression_attribute_names(format!("#n{i}"), name)
            .expression_attribute_values(format!(":v{i}"), value);
    }
    update.update_expression(format!("SET {}", sets.join(", "))).send().await.unwrap();
    // BatchWriteItem.
    let put =
        |item| WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build().unwrap()).build();
    env.ddb
        .batch_write_item()
        .request_items(&env.table, vec![put(g.to_item()), put(m2.to_item()), put(m3.to_item())])
        .send()
        .await
        .unwrap();
    // TransactWriteItems: a put, an update and a delete in one transaction.
    let m2_edited = Message { message: "second, edited in a transaction".into(), ..m2.clone() };
    env.ddb
        .transact_write_items()
        .transact_items(
            TransactWriteItem::builder()
                .put(Put::builder().table_name(&env.table).set_item(Some(m4.to_item())).build().unwrap())
                .build(),
        )
        .transact_items(
            TransactWriteItem::builder()
                .update(
                    Update::builder()
                        .table_name(&env.table)
                        .set_key(Some(key_attrs(&Item::Message(m2.clone()).key())))
                        .update_expression("SET message = :m")
                        .expression_attribute_values(":m", V::S(m2_edited.message.clone()))
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .transact_items(
            TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&env.table)
                        .set_key(Some(key_attrs(&Item::Message(m3.clone()).key())))
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    // BatchWriteItem delete, then DeleteItem last: its REMOVE marks the end of the history.
    env.ddb
        .batch_write_item()
        .request_items(
            &env.table,
            vec![WriteRequest::builder()
                .delete_request(
                    DeleteRequest::builder().set_key(Some(key_attrs(&Item::Group(g.clone()).key()))).build().unwrap(),
                )
                .build()],
        )
        .send()
        .await
        .unwrap();
    let m1_key = Item::Message(m1.clone()).key();
    env.ddb.delete_item().table_name(&env.table).set_key(Some(key_attrs(&m1_key))).send().await.unwrap();

    run.wait_for("the final DeleteItem arrives", |c| c.change == Change::Remove(m1_key.clone())).await;
    let changes = run.sink.changes();

    // Sequence numbers grow in delivery order (one shard in moto).
    let seqs: Vec<u128> = changes.iter().map(|c| c.sequence_number.parse().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequence numbers out of order: {seqs:?}");
    assert!(changes.iter().all(|c| c.approximate_creation.is_some()));

    let history = per_item(&changes);
    let up = |m: &Message| if images { Seen::Upsert(Item::Message(m.clone())) } else { Seen::Invalidate };
    let expect = |key: &ItemKey, want: Vec<Seen>| {
        assert_eq!(history.get(key), Some(&want), "history of {key:?} ({view:?})");
    };
    let m1_history =
        if images { vec![up(&m1), up(&m1_edited), Seen::Remove] } else { vec![Seen::Invalidate, Seen::Remove] };
    expect(&m1_key, m1_history);
    let m2_history = if images { vec![up(&m2), up(&m2_edited)] } else { vec![Seen::Invalidate] };
    expect(&Item::Message(m2.clone()).key(), m2_history);
    expect(&Item::Message(m3.clone()).key(), vec![up(&m3), Seen::Remove]);
    expect(&Item::Message(m4.clone()).key(), vec![up(&m4)]);
    // moto's first INSERT of an UpdateItem that creates the item carries only the keys: a
    // misfit whose key decodes, so it removes that key (nothing cached is kept for it).
    let m5_history = if images { vec![Seen::Remove, up(&m5)] } else { vec![up(&m5)] };
    expect(&m5_key, m5_history);
    let g_up = if images { Seen::Upsert(Item::Group(g.clone())) } else { Seen::Invalidate };
    expect(&Item::Group(g.clone()).key(), vec![g_up, Seen::Remove]);
    assert_eq!(history.len(), 6, "{history:?}");

    let text = run.metrics.encode();
    assert!(text.contains("cruddur_syncd_stream_records_total{event=\"INSERT\"}"), "{text}");
    assert!(text.contains("cruddur_syncd_stream_records_total{event=\"REMOVE\"}"), "{text}");
    assert!(text.contains("cruddur_syncd_stream_shards{state=\"reading\"} 1"), "{text}");
    assert!(run.status.borrow().stream_arn.as_deref().is_some_and(|a| a.contains(&env.table)));
    run.stop().await;
}

#[tokio::test]
async fn new_and_old_images_every_write_api_arrives_decoded_in_order() {
    every_write_api_arrives_in_order(StreamViewType::NewAndOldImages).await;
}

#[tokio::test]
async fn new_image_every_write_api_arrives_decoded_in_order() {
    every_write_api_arrives_in_order(StreamViewType::NewImage).await;
}

#[tokio::test]
async fn keys_only_every_write_api_arrives_as_invalidations_and_removes() {
    every_write_api_arrives_in_order(StreamViewType::KeysOnly).await;
}

#[tokio::test]
async fn records_that_do_not_fit_the_model_are_counted_and_skipped() {
    let env = table_with_stream(StreamViewType::NewAndOldImages).await;
    let run = env.start_tailer().await;
    let bad_pk = HashMap::from([
        ("pk".to_string(), V::S("USR#x".into())),
        ("sk".to_string(), V::S(sk(1).as_str().into())),
        ("message".to_string(), V::S("not ours".into())),
    ]);
    env.put(bad_pk).await;
    // The table declares sk as S, so DynamoDB itself refuses a numeric sk; the wrong-type case
    // that can reach the stream is an attribute the model needs, here user_uuid as a number.
    let wrong = message(MessageGroupId(Uuid::new_v4()), 2, "wrong type");
    let mut wrong_type = wrong.to_item();
    wrong_type.insert("user_uuid".into(), V::N("12".into()));
    env.put(wrong_type).await;
    let good = message(MessageGroupId(Uuid::new_v4()), 3, "good");
    env.put(good.to_item()).await;

    run.wait_for("the good record after the bad ones arrives", |c| {
        c.change == Change::Upsert(Item::Message(good.clone()))
    })
    .await;
    // The record with an unknown pk is skipped outright; the one whose key decodes but whose
    // image does not fit removes its key, as a fresh load would leave that item out.
    let delivered: Vec<Change> = run.sink.changes().into_iter().map(|c| c.change).collect();
    assert_eq!(
        delivered,
        [Change::Remove(Item::Message(wrong.clone()).key()), Change::Upsert(Item::Message(good.clone()))],
        "only the good record and the misfit's removal are delivered"
    );
    let skipped =
        |reason: &str| run.metrics.stream_skipped_records.get_or_create(&SkipLabels { reason: reason.into() }).get();
    assert_eq!(skipped("unknown_pk"), 1);
    assert_eq!(skipped("wrong_type"), 1);
    run.stop().await;
}

#[tokio::test]
async fn a_write_right_after_the_tailer_is_positioned_is_never_missed() {
    let env = table_with_stream(StreamViewType::NewImage).await;
    let group = MessageGroupId(Uuid::new_v4());
    // Writes before a tailer starts are not its business (the cache loads them); writes after it
    // is positioned always are. Several fresh tailers on one table, each checked at once.
    env.put(message(group, 0, "before every tailer").to_item()).await;
    for i in 1..=3 {
        let run = env.start_tailer().await;
        let m = message(group, i, &format!("write {i}"));
        env.put(m.to_item()).await;
        run.wait_for(&format!("write {i} arrives"), |c| c.change == Change::Upsert(Item::Message(m.clone()))).await;
        assert!(
            run.sink
                .changes()
                .iter()
                .all(|c| !matches!(&c.change, Change::Upsert(Item::Message(m)) if m.message == "before every tailer")),
            "a write from before the start was delivered"
        );
        run.stop().await;
    }
}
