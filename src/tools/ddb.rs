//! `cruddur-syncd ddb ...`: the messages table.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, GlobalSecondaryIndexUpdate, IndexStatus, KeySchemaElement,
    KeyType, Projection, ProjectionType, ScalarAttributeType, StreamSpecification, StreamViewType, TableDescription,
    TableStatus,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::JsonLines;
use crate::aws::errors::code as sdk_code;
use crate::aws::from_sdk;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::Misfit;
use crate::model::{conversation_list, item_to_json, MessageGroupId, Pk, UserUuid};
use crate::store::Store;
use crate::{demo, pg};

const ACTIVE_DEADLINE: Duration = Duration::from_secs(300);

async fn describe(store: &Store) -> Result<Option<TableDescription>> {
    match store.client().describe_table().table_name(store.table()).send().await {
        Ok(out) => Ok(out.table),
        Err(e) if sdk_code(&e) == Some("ResourceNotFoundException") => Ok(None),
        Err(e) => Err(from_sdk(store.context("DescribeTable"), e)),
    }
}

fn key(name: &str, kind: KeyType) -> Result<KeySchemaElement> {
    KeySchemaElement::builder().attribute_name(name).key_type(kind).build().map_err(build_error)
}

fn attr(name: &str) -> Result<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(build_error)
}

fn build_error(e: aws_sdk_dynamodb::error::BuildError) -> Error {
    Error::Failed(format!("cannot build DynamoDB request: {e}"))
}

fn stream_spec() -> Result<StreamSpecification> {
    StreamSpecification::builder()
        .stream_enabled(true)
        .stream_view_type(StreamViewType::NewAndOldImages)
        .build()
        .map_err(build_error)
}

fn group_index(name: &str) -> Result<GlobalSecondaryIndex> {
    GlobalSecondaryIndex::builder()
        .index_name(name)
        .key_schema(key("message_group_uuid", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .projection(Projection::builder().projection_type(ProjectionType::All).build())
        .build()
        .map_err(build_error)
}

#[derive(Serialize)]
struct SchemaReport<'a> {
    table: &'a str,
    status: String,
    created: bool,
    stream_enabled_now: bool,
    index_created_now: bool,
    stream_view_type: Option<String>,
    stream_arn: Option<String>,
    group_index: &'a str,
}

/// Creates the table, its GSI and its stream, or adds whichever of them is missing; then waits
/// until table and index are ACTIVE. Running it on a complete table changes nothing.
pub async fn schema_load(cfg: &Config, store: &Store, out: &mut JsonLines<impl Write>) -> Result<()> {
    let index = &cfg.dynamodb.group_index;
    let mut created = false;
    let mut stream_enabled_now = false;
    let mut index_created_now = false;
    match describe(store).await? {
        None => {
            let res = store
                .client()
                .create_table()
                .table_name(store.table())
                .key_schema(key("pk", KeyType::Hash)?)
                .key_schema(key("sk", KeyType::Range)?)
                .attribute_definitions(attr("pk")?)
                .attribute_definitions(attr("sk")?)
                .attribute_definitions(attr("message_group_uuid")?)
                .global_secondary_indexes(group_index(index)?)
                .billing_mode(BillingMode::PayPerRequest)
                .stream_specification(stream_spec()?)
                .send()
                .await;
            match res {
                Ok(_) => created = true,
                // Another schema-load won the race; fall through to the checks below.
                Err(e) if sdk_code(&e) == Some("ResourceInUseException") => {}
                Err(e) => return Err(from_sdk(store.context("CreateTable"), e)),
            }
        }
        Some(table) => {
            let has_stream = table.stream_specification().is_some_and(|s| s.stream_enabled());
            if !has_stream {
                wait_active(store, index, false).await?;
                store
                    .client()
                    .update_table()
                    .table_name(store.table())
                    .stream_specification(stream_spec()?)
                    .send()
                    .await
                    .map_err(|e| from_sdk(store.context("UpdateTable (enable stream)"), e))?;
                stream_enabled_now = true;
            }
            let has_index = table.global_secondary_indexes().iter().any(|g| g.index_name() == Some(index.as_str()));
            if !has_index {
                wait_active(store, index, false).await?;
                let create = aws_sdk_dynamodb::types::CreateGlobalSecondaryIndexAction::builder()
                    .index_name(index)
                    .key_schema(key("message_group_uuid", KeyType::Hash)?)
                    .key_schema(key("sk", KeyType::Range)?)
                    .projection(Projection::builder().projection_type(ProjectionType::All).build())
                    .build()
                    .map_err(build_error)?;
                store
                    .client()
                    .update_table()
                    .table_name(store.table())
                    .attribute_definitions(attr("message_group_uuid")?)
                    .attribute_definitions(attr("sk")?)
                    .global_secondary_index_updates(GlobalSecondaryIndexUpdate::builder().create(create).build())
                    .send()
                    .await
                    .map_err(|e| from_sdk(store.context("UpdateTable (add index)"), e))?;
                index_created_now = true;
            }
        }
    }
    let table = wait_active(store, index, true).await?;
    let spec = table.stream_specification();
    out.emit(&SchemaReport {
        table: store.table(),
        status: table.table_status().map(|s| s.as_str().to_string()).unwrap_or_default(),
        created,
        stream_enabled_now,
        index_created_now,
        stream_view_type: spec.and_then(|s| s.stream_view_type()).map(|v| v.as_str().to_string()),
        stream_arn: table.latest_stream_arn().map(str::to_string),
        group_index: index,
    })
}

/// Polls until the table (and, if asked, the group index) is ACTIVE.
async fn wait_active(store: &Store, index: &str, with_index: bool) -> Result<TableDescription> {
    let started = Instant::now();
    loop {
        let table = describe(store).await?.ok_or_else(|| {
            Error::Failed(format!("table {} at {} disappeared while waiting for it", store.table(), store.endpoint()))
        })?;
        let table_active = table.table_status() == Some(&TableStatus::Active);
        let index_active = !with_index
            || table
                .global_secondary_indexes()
                .iter()
                .any(|g| g.index_name() == Some(index) && g.index_status().is_none_or(|s| *s == IndexStatus::Active));
        if table_active && index_active {
            return Ok(table);
        }
        if started.elapsed() > ACTIVE_DEADLINE {
            return Err(Error::Failed(format!(
                "table {} at {} is not ACTIVE after {}s",
                store.table(),
                store.endpoint(),
                ACTIVE_DEADLINE.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Deletes the table; refuses without `yes` because there is no undo.
pub async fn drop(store: &Store, yes: bool, out: &mut JsonLines<impl Write>) -> Result<()> {
    if !yes {
        return Err(Error::Usage(format!(
            "refusing to delete table {} at {} without --yes",
            store.table(),
            store.endpoint()
        )));
    }
    match store.client().delete_table().table_name(store.table()).send().await {
        Ok(_) => {}
        Err(e) if sdk_code(&e) == Some("ResourceNotFoundException") => {
            return Err(Error::Failed(format!("table {} does not exist at {}", store.table(), store.endpoint())));
        }
        Err(e) => return Err(from_sdk(store.context("DeleteTable"), e)),
    }
    let started = Instant::now();
    while describe(store).await?.is_some() {
        if started.elapsed() > ACTIVE_DEADLINE {
            return Err(Error::Failed(format!("table {} at {} is still deleting", store.table(), store.endpoint())));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    out.emit(&serde_json::json!({ "table": store.table(), "deleted": true }))
}

/// Every table name at the endpoint, one per line.
pub async fn list_tables(store: &Store, out: &mut JsonLines<impl Write>) -> Result<()> {
    let mut start: Option<String> = None;
    loop {
        let page = store
            .client()
            .list_tables()
            .set_exclusive_start_table_name(start.take())
            .send()
            .await
            .map_err(|e| from_sdk(format!("DynamoDB ListTables at {}", store.endpoint()), e))?;
        for name in page.table_names() {
            out.text(name)?;
        }
        match page.last_evaluated_table_name {
            Some(n) => start = Some(n),
            None => return Ok(()),
        }
    }
}

/// Every item, all pages, as plain JSON lines.
pub async fn scan(store: &Store, limit: Option<usize>, out: &mut JsonLines<impl Write>) -> Result<()> {
    let mut write_err = None;
    let n = store
        .scan(limit, |item| {
            if write_err.is_none() {
                if let Err(e) = out.emit(&item_to_json(&item)) {
                    write_err = Some(e);
                }
            }
        })
        .await?;
    if let Some(e) = write_err {
        return Err(e);
    }
    tracing::info!(items = n, table = store.table(), "scan finished");
    Ok(())
}

#[derive(Serialize, Default)]
struct SeedReport {
    messages_written: usize,
    messages_present: usize,
    groups_written: usize,
    groups_present: usize,
}

/// Writes the demo conversation. Items are recognised by their fixed ids, not by their sk, so
/// a second run with another `--now` still adds nothing.
pub async fn seed(store: &Store, now: DateTime<Utc>, out: &mut JsonLines<impl Write>) -> Result<()> {
    let mut report = SeedReport::default();
    let messages = demo::messages(now);
    let present: HashSet<String> = store
        .query_partition(&Pk::Messages(demo::group_id()), true, None)
        .await?
        .iter()
        .filter_map(|i| i.get("message_uuid").and_then(|v| v.as_s().ok()).cloned())
        .collect();
    for m in &messages {
        if present.contains(&m.message_uuid.to_string()) || !store.put_if_absent(m.to_item()).await? {
            report.messages_present += 1;
        } else {
            report.messages_written += 1;
        }
    }
    // Group rows follow the newest stored demo message, which after a re-run is still the first
    // run's one; read it back rather than trusting `now`.
    let (stored, _) = store.messages(demo::group_id()).await?;
    for row in demo::groups(&stored) {
        let (rows, _) = store.group_rows(row.owner).await?;
        if rows.iter().any(|r| r.message_group_uuid == row.message_group_uuid)
            || !store.put_if_absent(row.to_item()).await?
        {
            report.groups_present += 1;
        } else {
            report.groups_written += 1;
        }
    }
    out.emit(&report)
}

/// The newest `limit` messages of a group (all when unset), oldest first, in the API's shape.
pub async fn get_conversation(
    store: &Store,
    group: &str,
    limit: Option<usize>,
    out: &mut JsonLines<impl Write>,
) -> Result<()> {
    let group: MessageGroupId =
        group.parse().map_err(|_| Error::Usage(format!("{group:?} is not a message group uuid")))?;
    // All pages, then order by instant: string order and instant order differ on tables that
    // mix timestamp spellings.
    let (messages, misfits) = store.messages(group).await?;
    report_misfits(&misfits);
    if messages.is_empty() {
        return Err(Error::Failed(format!(
            "no messages for group {group} in table {} at {}",
            store.table(),
            store.endpoint()
        )));
    }
    let skip = limit.map_or(0, |l| messages.len().saturating_sub(l));
    for m in &messages[skip..] {
        out.emit(&m.api_entry())?;
    }
    Ok(())
}

/// A user's conversations, found by handle through PostgreSQL, newest first.
pub async fn list_conversations(
    cfg: &Config,
    store: &Store,
    handle: &str,
    out: &mut JsonLines<impl Write>,
) -> Result<()> {
    let opts = pg::options(&cfg.postgres)?;
    let target = pg::describe(&opts);
    let pool = pg::connect_with(&cfg.postgres, opts).await?;
    let user = user_by_handle(&pool, &target, handle).await;
    pool.close().await;
    let user = user?;
    let (rows, misfits) = store.group_rows(user).await?;
    report_misfits(&misfits);
    for g in conversation_list(rows) {
        out.emit(&g.api_entry())?;
    }
    Ok(())
}

async fn user_by_handle(pool: &PgPool, target: &str, handle: &str) -> Result<UserUuid> {
    let rows: Vec<(uuid::Uuid,)> = sqlx::query_as("SELECT uuid FROM public.users WHERE handle = $1 LIMIT 2")
        .bind(handle)
        .fetch_all(pool)
        .await
        .map_err(|e| pg::query_error(target, "looking up the handle", e))?;
    match rows.as_slice() {
        [(uuid,)] => Ok(UserUuid(*uuid)),
        [] => Err(Error::Failed(format!("no user with handle {handle:?} in public.users at {target}"))),
        _ => Err(Error::Failed(format!("handle {handle:?} names more than one user in public.users at {target}"))),
    }
}

fn report_misfits(misfits: &[Misfit]) {
    for m in misfits {
        tracing::warn!(pk = ?m.pk, sk = ?m.sk, error = %m.error, "skipped an item that does not fit the model");
    }
}
