//! DynamoDB access: the reads the cache loads through and the writes the tools make. Every
//! list paginates to the end (the Flask scripts stopped at the first page).

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::types::{AttributeValue, Select};
use aws_sdk_dynamodb::Client;

use crate::aws::from_sdk;
use crate::cache::{ConversationStore, Loaded, Newest};
use crate::dependency::Dependencies;
use crate::error::Result;
use crate::model::{decode_item, Item, ItemKey, Message, MessageGroup, MessageGroupId, Misfit, Pk, Sk, UserUuid};

pub(crate) type RawItem = HashMap<String, AttributeValue>;

/// The messages table, as seen through one client.
#[derive(Clone, Debug)]
pub struct Store {
    client: Client,
    table: String,
    endpoint: String,
    health: Option<Arc<Dependencies>>,
}

impl Store {
    pub fn new(client: Client, table: impl Into<String>, endpoint: impl Into<String>) -> Self {
        Self { client, table: table.into(), endpoint: endpoint.into(), health: None }
    }

    /// Reports every read the cache makes through this store to `health.dynamodb`.
    pub fn with_health(mut self, health: Arc<Dependencies>) -> Self {
        self.health = Some(health);
        self
    }

    fn report<T>(&self, result: Result<T>) -> Result<T> {
        if let Some(h) = &self.health {
            match &result {
                Ok(_) => h.dynamodb.ok(),
                Err(e) => h.dynamodb.failed(e),
            }
        }
        result
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// "DynamoDB {op} on table {table} at {endpoint}": how every error about this table begins.
    pub(crate) fn context(&self, op: &str) -> String {
        format!("DynamoDB {op} on table {} at {}", self.table, self.endpoint)
    }

    /// Every item of a partition, in sk string order (`forward`) or reverse, stopping once
    /// `limit` items were read.
    pub async fn query_partition(&self, pk: &Pk, forward: bool, limit: Option<usize>) -> Result<Vec<RawItem>> {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(pk.to_string()))
            .scan_index_forward(forward)
            .consistent_read(true)
            .select(Select::AllAttributes);
        self.query_pages(query, &format!("Query {pk}"), limit).await
    }

    /// Every row of one conversation through the group index (`message_group_uuid` HASH): one
    /// row per participant, more when a writer left duplicates. Index reads are eventually
    /// consistent (DynamoDB offers nothing else on a GSI); writers must check what they read.
    pub(crate) async fn query_group_index(&self, index: &str, group: MessageGroupId) -> Result<Vec<RawItem>> {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(index)
            .key_condition_expression("message_group_uuid = :g")
            .expression_attribute_values(":g", AttributeValue::S(group.to_string()));
        self.query_pages(query, &format!("Query {index} for group {group}"), None).await
    }

    /// One owner's rows of one conversation, read consistently from the owner's partition (the
    /// group index may lag the table). The filter matches the conversation id exactly as the
    /// index does; it saves transfer, not read capacity (the whole partition is read).
    pub(crate) async fn conversation_rows_of(&self, owner: UserUuid, group: MessageGroupId) -> Result<Vec<RawItem>> {
        let pk = Pk::Groups(owner);
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .filter_expression("message_group_uuid = :g")
            .expression_attribute_values(":pk", AttributeValue::S(pk.to_string()))
            .expression_attribute_values(":g", AttributeValue::S(group.to_string()))
            .consistent_read(true);
        self.query_pages(query, &format!("Query {pk} for group {group}"), None).await
    }

    /// Runs `query` page by page until the end, or until `limit` items were read.
    async fn query_pages(
        &self,
        query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
        what: &str,
        limit: Option<usize>,
    ) -> Result<Vec<RawItem>> {
        let mut out = Vec::new();
        let mut start: Option<RawItem> = None;
        loop {
            let mut q = query.clone().set_exclusive_start_key(start.take());
            if let Some(limit) = limit {
                q = q.limit((limit - out.len()).clamp(1, 1000) as i32);
            }
            let page = q.send().await.map_err(|e| from_sdk(self.context(what), e))?;
            out.extend(page.items.unwrap_or_default());
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        Ok(out)
    }

    /// One item by its key, read consistently; `None` when there is none.
    pub(crate) async fn get_item(&self, key: &ItemKey) -> Result<Option<RawItem>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.pk.to_string()))
            .key("sk", AttributeValue::S(key.sk.as_str().to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| from_sdk(self.context(&format!("GetItem {} {}", key.pk, key.sk)), e))?;
        Ok(out.item)
    }

    /// A user's group rows, decoded; rows that do not fit the model are returned apart.
    pub async fn group_rows(&self, user: UserUuid) -> Result<(Vec<MessageGroup>, Vec<Misfit>)> {
        let raw = self.query_partition(&Pk::Groups(user), true, None).await?;
        let (items, misfits) = decode_all(raw);
        let groups = items
            .into_iter()
            .filter_map(|i| match i {
                Item::Group(g) => Some(g),
                Item::Message(_) => None,
            })
            .collect();
        Ok((groups, misfits))
    }

    /// Every message of a group, decoded, oldest first by instant.
    pub async fn messages(&self, group: MessageGroupId) -> Result<(Vec<Message>, Vec<Misfit>)> {
        let raw = self.query_partition(&Pk::Messages(group), true, None).await?;
        let (items, misfits) = decode_all(raw);
        let mut messages: Vec<Message> = items
            .into_iter()
            .filter_map(|i| match i {
                Item::Message(m) => Some(m),
                Item::Group(_) => None,
            })
            .collect();
        messages.sort_by(|a, b| a.sk.cmp(&b.sk));
        Ok((messages, misfits))
    }

    /// The newest `n` messages of `group` strictly before `before` (all when `None`), oldest
    /// first, read newest-first so that a read costs about what it returns: pages of `n + 1`,
    /// until no item left unread can be newer than the `n`-th newest read. DynamoDB orders sort
    /// keys as strings, which follow the wall clock a key spells, not its instant; how far the
    /// two can differ is the largest [`Sk::order_skew`] of the keys read (none for the spellings
    /// the app writes), and reading goes on that much past the `n`-th newest. The cursor bounds
    /// the query the same way (`sk < before`, widened by its own skew). A spelling that no key
    /// read shows (`Z`, a negative offset, a space for `T`) and that sorts more than that away
    /// from its instant can be missed, and so can a key with a positive offset just older than
    /// the cursor (it sorts after it). The app writes only `+00:00`; the `scan` tool shows any
    /// other spelling, and a full load (`Store::messages`) orders them all by instant.
    pub async fn newest_messages(&self, group: MessageGroupId, before: Option<&Sk>, n: usize) -> Result<Newest> {
        let pk = Pk::Messages(group);
        let mut query = self
            .client
            .query()
            .table_name(&self.table)
            .expression_attribute_values(":pk", AttributeValue::S(pk.to_string()))
            .scan_index_forward(false)
            .consistent_read(true)
            .limit(i32::try_from(n + 1).unwrap_or(i32::MAX));
        query = match before {
            Some(b) => {
                let skew = b.order_skew();
                let upper = if skew.is_zero() {
                    b.as_str().to_string()
                } else {
                    Sk::from_instant(b.instant() + skew).as_str().into()
                };
                query
                    .key_condition_expression("pk = :pk AND sk < :upper")
                    .expression_attribute_values(":upper", AttributeValue::S(upper))
            }
            None => query.key_condition_expression("pk = :pk"),
        };
        let what = format!("Query {pk} newest first");
        let mut out = Newest::default();
        let mut candidates: Vec<Message> = Vec::new();
        let mut skew = chrono::Duration::zero();
        let mut start: Option<RawItem> = None;
        loop {
            let page = query
                .clone()
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| from_sdk(self.context(&what), e))?;
            let mut last_wall = None;
            for raw in page.items.unwrap_or_default() {
                out.read += 1;
                if let Some(sk) = string_attr(&raw, "sk").and_then(|s| Sk::parse(&s).ok()) {
                    skew = skew.max(sk.order_skew());
                    last_wall = sk.wall().or(last_wall);
                }
                match decode_item(&raw) {
                    Ok(Item::Message(m)) if before.is_none_or(|b| m.sk < *b) => candidates.push(m),
                    Ok(_) => {}
                    Err(error) => {
                        out.misfits.push(Misfit { pk: string_attr(&raw, "pk"), sk: string_attr(&raw, "sk"), error })
                    }
                }
            }
            let more_pages = page.last_evaluated_key.filter(|k| !k.is_empty());
            candidates.sort_by(|a, b| b.sk.cmp(&a.sk));
            let settled = match (candidates.get(n.saturating_sub(1)), last_wall) {
                // Nothing unread sorts above the last key read, so nothing unread is newer than
                // its wall clock plus the skew.
                (Some(nth), Some(wall)) if n > 0 => wall + skew <= nth.sk.instant(),
                _ => false,
            };
            match more_pages {
                Some(k) if !settled => start = Some(k),
                rest => {
                    out.more = candidates.len() > n || rest.is_some();
                    break;
                }
            }
        }
        candidates.truncate(n);
        candidates.reverse();
        out.messages = candidates;
        Ok(out)
    }

    /// Every item of the table, page by page; `each` sees items as they arrive so a scan of a
    /// large table streams instead of buffering. Stops after `limit` items.
    pub async fn scan(&self, limit: Option<usize>, mut each: impl FnMut(RawItem)) -> Result<usize> {
        let mut seen = 0usize;
        let mut start: Option<RawItem> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| from_sdk(self.context("Scan"), e))?;
            for item in page.items.unwrap_or_default() {
                if limit.is_some_and(|l| seen >= l) {
                    return Ok(seen);
                }
                each(item);
                seen += 1;
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(seen),
            }
        }
    }

    /// Puts an item unless one with its key exists; returns whether it was written.
    pub async fn put_if_absent(&self, item: RawItem) -> Result<bool> {
        let res = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if crate::aws::errors::code(&e) == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(from_sdk(self.context("PutItem"), e)),
        }
    }
}

impl ConversationStore for Store {
    fn group_rows(&self, user: UserUuid) -> futures::future::BoxFuture<'_, Result<Loaded<MessageGroup>>> {
        Box::pin(async move { self.report(Store::group_rows(self, user).await) })
    }

    fn newest_messages<'a>(
        &'a self,
        group: MessageGroupId,
        before: Option<&'a Sk>,
        n: usize,
    ) -> futures::future::BoxFuture<'a, Result<Newest>> {
        Box::pin(async move { self.report(Store::newest_messages(self, group, before, n).await) })
    }
}

/// Decodes raw items, separating those that do not fit the model.
pub(crate) fn decode_all(raw: Vec<RawItem>) -> (Vec<Item>, Vec<Misfit>) {
    let mut items = Vec::with_capacity(raw.len());
    let mut misfits = Vec::new();
    for r in raw {
        match decode_item(&r) {
            Ok(i) => items.push(i),
            Err(error) => misfits.push(Misfit { pk: string_attr(&r, "pk"), sk: string_attr(&r, "sk"), error }),
        }
    }
    (items, misfits)
}

fn string_attr(item: &RawItem, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}
