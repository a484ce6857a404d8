//! A conversation's rows and how to move them: the DynamoDB half of the projector, shared with
//! `ddb repair-groups`.
//!
//! Planning is pure ([`plan_forward`] for the projector, [`plan_exact`] for the repair tool);
//! [`execute`] writes one owner's plan. A move is one TransactWriteItems: every old row of the
//! owner is deleted on condition that it still holds what was read (`attribute_exists(pk) AND
//! message = :old`), and the new row is put on condition that its key is free
//! (`attribute_not_exists(pk)`). When another writer got there first a condition fails, the
//! transaction is cancelled as a whole, and [`MoveError::Conflict`] tells the caller to read
//! again; nothing is ever half moved, so the conversation never vanishes from a list.
//!
//! The group index is eventually consistent, so what it returns may be older than the table: a
//! row it shows may be gone (moved back by `ddb repair-groups`, say). Nothing is ever deleted on
//! the index's word alone: dropping duplicates beside a row that stays is one transaction with
//! a `ConditionCheck` that the kept row exists as read, and a plan that keeps a row without
//! writing checks it with a consistent read first ([`confirm`]). When a check fails, the caller
//! reads the owners' partitions consistently ([`read_rows_consistent`]) and plans again.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Delete, Put, TransactWriteItem};

use crate::aws::errors::{code as sdk_code, is_request_fault_code};
use crate::aws::from_sdk;
use crate::error::Error;
use crate::model::Misfit;
use crate::model::{MessageGroup, Pk, Sk, UserUuid};
use crate::store::{decode_all, RawItem, Store};

/// DynamoDB's limit of items in one TransactWriteItems.
pub(crate) const MAX_TRANSACTION_ITEMS: usize = 100;

/// Where a conversation's rows should point: a message's time and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// In the canonical spelling this tool writes.
    pub sk: Sk,
    pub message: String,
}

impl Target {
    pub(crate) fn new(sk: &Sk, message: impl Into<String>) -> Target {
        Target { sk: Sk::from_instant(sk.instant()), message: message.into() }
    }
}

/// What to do about one owner's rows of one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OwnerPlan {
    /// Nothing to write.
    Keep { row: MessageGroup },
    /// The newest row stays; older duplicates beside it are deleted, in one transaction that
    /// checks the kept row is still there as read.
    DropDuplicates { keep: MessageGroup, drop: Vec<MessageGroup> },
    /// One transaction: delete `delete`, put `put`. `replaces` is a row that already has `put`'s
    /// key (only the repair tool rewrites a row in place): the put then requires it unchanged.
    Move { delete: Vec<MessageGroup>, put: MessageGroup, replaces: Option<MessageGroup> },
}

impl OwnerPlan {
    pub(crate) fn owner(&self) -> UserUuid {
        match self {
            OwnerPlan::Keep { row } | OwnerPlan::DropDuplicates { keep: row, .. } => row.owner,
            OwnerPlan::Move { put, .. } => put.owner,
        }
    }

    pub(crate) fn writes(&self) -> bool {
        !matches!(self, OwnerPlan::Keep { .. })
    }
}

/// Every row of a conversation, decoded, through the group index.
pub(crate) async fn read_rows(store: &Store, index: &str, group: crate::model::MessageGroupId) -> Result<Rows, Error> {
    let raw = store.query_group_index(index, group).await?;
    let (items, misfits) = decode_all(raw);
    let rows = items
        .into_iter()
        .filter_map(|i| match i {
            crate::model::Item::Group(g) if g.message_group_uuid == group => Some(g),
            _ => None,
        })
        .collect();
    Ok(Rows { rows, misfits })
}

/// Every row of a conversation that `owners` hold, read from their partitions with consistent
/// reads (the index may lag the table): what a plan is made from again after a check failed.
pub(crate) async fn read_rows_consistent(
    store: &Store,
    group: crate::model::MessageGroupId,
    owners: &[UserUuid],
) -> Result<Rows, Error> {
    let mut out = Rows::default();
    for owner in owners {
        let (items, misfits) = decode_all(store.conversation_rows_of(*owner, group).await?);
        out.rows.extend(items.into_iter().filter_map(|i| match i {
            crate::model::Item::Group(g) => Some(g),
            crate::model::Item::Message(_) => None,
        }));
        out.misfits.extend(misfits);
    }
    Ok(out)
}

/// Whether `row` exists in the table as read (consistent read of its key, same text): a plan
/// that keeps it without writing must not rest on a stale index read.
pub(crate) async fn confirm(store: &Store, row: &MessageGroup) -> Result<(), MoveError> {
    let key = crate::model::ItemKey { pk: Pk::Groups(row.owner), sk: row.sk.clone() };
    let found = store.get_item(&key).await.map_err(MoveError::from)?;
    let attr = |name: &str| found.as_ref().and_then(|item| item.get(name)).and_then(|v| v.as_s().ok()).cloned();
    let same = attr("message").as_ref() == Some(&row.message)
        && attr("message_group_uuid") == Some(row.message_group_uuid.to_string());
    if same {
        Ok(())
    } else {
        Err(MoveError::Conflict(format!(
            "{}: the row the group index showed is not in the table as shown",
            describe(row)
        )))
    }
}

/// A conversation's rows as read, and the items that did not fit the model.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub rows: Vec<MessageGroup>,
    pub misfits: Vec<Misfit>,
}

fn by_owner(rows: Vec<MessageGroup>) -> BTreeMap<UserUuid, Vec<MessageGroup>> {
    let mut owners: BTreeMap<UserUuid, Vec<MessageGroup>> = BTreeMap::new();
    for row in rows {
        owners.entry(row.owner).or_default().push(row);
    }
    for rows in owners.values_mut() {
        // Newest first, by instant (Sk's order), so rows[0] is the one the API shows.
        rows.sort_by(|a, b| b.sk.cmp(&a.sk));
    }
    owners
}

/// The projector's plan: each owner's rows move forward to `target`, never back. An owner whose
/// newest row is already at or after the target's instant keeps it (the record is stale or a
/// replay) and loses only older duplicates.
pub(crate) fn plan_forward(rows: Vec<MessageGroup>, target: &Target) -> Vec<OwnerPlan> {
    by_owner(rows)
        .into_values()
        .map(|mut rows| {
            let newest = rows.remove(0);
            if newest.sk.instant() >= target.sk.instant() {
                if rows.is_empty() {
                    OwnerPlan::Keep { row: newest }
                } else {
                    OwnerPlan::DropDuplicates { keep: newest, drop: rows }
                }
            } else {
                let put = MessageGroup { sk: target.sk.clone(), message: target.message.clone(), ..newest.clone() };
                let mut delete = vec![newest];
                delete.extend(rows);
                OwnerPlan::Move { delete, put, replaces: None }
            }
        })
        .collect()
}

/// The repair tool's plan: each owner ends with exactly one row, at the target's instant with
/// its text, whichever way that is (a row ahead of every message goes back). A single row at
/// the right instant with the right text is kept whatever its spelling.
pub(crate) fn plan_exact(rows: Vec<MessageGroup>, target: &Target) -> Vec<OwnerPlan> {
    by_owner(rows)
        .into_values()
        .map(|rows| {
            let newest = &rows[0];
            if rows.len() == 1 && newest.sk.instant() == target.sk.instant() && newest.message == target.message {
                return OwnerPlan::Keep { row: newest.clone() };
            }
            let put = MessageGroup { sk: target.sk.clone(), message: target.message.clone(), ..newest.clone() };
            let (same_key, delete): (Vec<MessageGroup>, Vec<MessageGroup>) =
                rows.into_iter().partition(|r| r.sk.as_str() == put.sk.as_str());
            OwnerPlan::Move { delete, put, replaces: same_key.into_iter().next() }
        })
        .collect()
}

/// Why a plan could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MoveError {
    /// Another writer changed the rows since they were read: read again.
    #[error("{0}")]
    Conflict(String),
    /// DynamoDB did not answer, throttled, or failed on its side: try again later.
    #[error("{0}")]
    Transient(String),
    /// DynamoDB refused the request itself: trying again will not help.
    #[error("{0}")]
    Rejected(String),
}

impl From<Error> for MoveError {
    /// Only an answer that faults the request itself is a refusal; a missing table, a denied
    /// permission or expired credentials are an incident that ends, not a reason to skip.
    fn from(e: Error) -> Self {
        match e {
            Error::Service { ref code, .. } if is_request_fault_code(code) => MoveError::Rejected(e.to_string()),
            Error::Failed(m) => MoveError::Rejected(m),
            other => MoveError::Transient(other.to_string()),
        }
    }
}

/// What [`execute`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Written {
    /// Rows put at a new position (or rewritten in place).
    pub moved: usize,
    /// Rows deleted without a replacement (duplicates).
    pub dropped: usize,
}

/// Writes one owner's plan.
pub(crate) async fn execute(store: &Store, plan: &OwnerPlan) -> Result<Written, MoveError> {
    match plan {
        OwnerPlan::Keep { .. } => Ok(Written::default()),
        OwnerPlan::DropDuplicates { keep, drop } => {
            let room = MAX_TRANSACTION_ITEMS - 1;
            for chunk in drop.chunks(room) {
                transact_drop(store, keep, chunk).await?;
            }
            Ok(Written { moved: 0, dropped: drop.len() })
        }
        OwnerPlan::Move { delete, put, replaces } => {
            // Room for the put; older extras (only a badly broken table has them) go first, one
            // by one, so the transaction itself always fits.
            let room = MAX_TRANSACTION_ITEMS - 1;
            let (in_tx, extra) = delete.split_at(delete.len().min(room));
            for row in extra {
                delete_as_read(store, row).await?;
            }
            transact_move(store, in_tx, put, replaces.as_ref()).await?;
            Ok(Written { moved: 1, dropped: extra.len() })
        }
    }
}

fn key_of(row: &MessageGroup) -> RawItem {
    RawItem::from([
        ("pk".to_string(), AttributeValue::S(Pk::Groups(row.owner).to_string())),
        ("sk".to_string(), AttributeValue::S(row.sk.as_str().to_string())),
    ])
}

fn describe(row: &MessageGroup) -> String {
    format!("{} {}", Pk::Groups(row.owner), row.sk)
}

/// The row is still the one read: same key (pk and sk), conversation and text.
const UNCHANGED: &str = "attribute_exists(pk) AND #m = :old AND #g = :group";

/// The names and values [`UNCHANGED`] refers to, for `row`.
struct AsRead {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

fn as_read(row: &MessageGroup) -> AsRead {
    AsRead {
        names: HashMap::from([("#m".into(), "message".into()), ("#g".into(), "message_group_uuid".into())]),
        values: HashMap::from([
            (":old".into(), AttributeValue::S(row.message.clone())),
            (":group".into(), AttributeValue::S(row.message_group_uuid.to_string())),
        ]),
    }
}

/// A delete of `row` that only happens while it is exactly as read.
fn conditional_delete(store: &Store, row: &MessageGroup) -> Result<TransactWriteItem, MoveError> {
    let AsRead { names, values } = as_read(row);
    let d = Delete::builder()
        .table_name(store.table())
        .set_key(Some(key_of(row)))
        .condition_expression(UNCHANGED)
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .build()
        .map_err(build_error)?;
    Ok(TransactWriteItem::builder().delete(d).build())
}

fn build_error(e: aws_sdk_dynamodb::error::BuildError) -> MoveError {
    MoveError::Rejected(format!("cannot build a request: {e}"))
}

/// Deletes `drop` beside `keep` in one transaction: every row as read, and `keep` still there
/// as read (a ConditionCheck), or nothing at all.
async fn transact_drop(store: &Store, keep: &MessageGroup, drop: &[MessageGroup]) -> Result<(), MoveError> {
    let AsRead { names, values } = as_read(keep);
    let check = ConditionCheck::builder()
        .table_name(store.table())
        .set_key(Some(key_of(keep)))
        .condition_expression(UNCHANGED)
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .build()
        .map_err(build_error)?;
    let mut request = store
        .client()
        .transact_write_items()
        .transact_items(TransactWriteItem::builder().condition_check(check).build());
    for row in drop {
        request = request.transact_items(conditional_delete(store, row)?);
    }
    let what = format!("TransactWriteItems dropping duplicates of {}", describe(keep));
    match request.send().await {
        Ok(_) => Ok(()),
        Err(err) => {
            let codes = cancellation_codes(&err);
            Err(classify_transaction(store, &what, err, &codes))
        }
    }
}

async fn transact_move(
    store: &Store,
    delete: &[MessageGroup],
    put: &MessageGroup,
    replaces: Option<&MessageGroup>,
) -> Result<(), MoveError> {
    let mut request = store.client().transact_write_items();
    for row in delete {
        request = request.transact_items(conditional_delete(store, row)?);
    }
    let mut p = Put::builder().table_name(store.table()).set_item(Some(put.to_item()));
    p = match replaces {
        None => p.condition_expression("attribute_not_exists(pk)"),
        Some(old) => {
            let AsRead { names, values } = as_read(old);
            p.condition_expression(UNCHANGED)
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(Some(values))
        }
    };
    request = request.transact_items(TransactWriteItem::builder().put(p.build().map_err(build_error)?).build());
    let what = format!("TransactWriteItems moving {} to {}", Pk::Groups(put.owner), put.sk);
    let err = match request.send().await {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let codes = cancellation_codes(&err);
    let err = classify_transaction(store, &what, err, &codes);
    // Only the put failed and every row to delete was as read: the key may belong to another
    // conversation of the same owner at the very same instant (pk + sk is the key). Reading
    // again would find the same plan forever, so say so instead.
    let only_put = codes.last().is_some_and(|c| c == "ConditionalCheckFailed")
        && codes[..codes.len() - 1].iter().all(|c| c == "None");
    if matches!(err, MoveError::Conflict(_)) && replaces.is_none() && only_put {
        let key = crate::model::ItemKey { pk: Pk::Groups(put.owner), sk: put.sk.clone() };
        if let Some(other) = store.get_item(&key).await.map_err(MoveError::from)? {
            let theirs = other.get("message_group_uuid").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            if theirs != put.message_group_uuid.to_string() {
                return Err(MoveError::Rejected(format!(
                    "{}: conversation {theirs:?} of the same owner already has a row at that instant",
                    store.context(&what)
                )));
            }
        }
    }
    Err(err)
}

/// The reason codes of a cancelled transaction, in item order ("None" for an item that passed).
fn cancellation_codes<R>(err: &SdkError<TransactWriteItemsError, R>) -> Vec<String> {
    match err.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(cancel)) => {
            cancel.cancellation_reasons().iter().map(|r| r.code().unwrap_or("None").to_string()).collect()
        }
        _ => Vec::new(),
    }
}

fn classify_transaction(
    store: &Store,
    what: &str,
    err: SdkError<TransactWriteItemsError, HttpResponse>,
    codes: &[String],
) -> MoveError {
    if let Some(TransactWriteItemsError::TransactionCanceledException(_)) = err.as_service_error() {
        let sentence = format!("{}: cancelled ({})", store.context(what), codes.join(", "));
        let racing = |c: &String| matches!(c.as_str(), "ConditionalCheckFailed" | "TransactionConflict");
        let faulty = |c: &String| matches!(c.as_str(), "ValidationError" | "ItemCollectionSizeLimitExceeded");
        // No reasons at all: nothing says the request itself is wrong, so read again.
        return if codes.iter().any(racing) || codes.iter().all(|c| c == "None") {
            MoveError::Conflict(sentence)
        } else if codes.iter().any(faulty) {
            MoveError::Rejected(sentence)
        } else {
            // Throttled, or a reason this code does not know: not the request's fault.
            MoveError::Transient(sentence)
        };
    }
    from_sdk(store.context(what), err).into()
}

/// A delete outside a transaction, still only of the row as read.
async fn delete_as_read(store: &Store, row: &MessageGroup) -> Result<(), MoveError> {
    let what = format!("DeleteItem {}", describe(row));
    let AsRead { names, values } = as_read(row);
    let result = store
        .client()
        .delete_item()
        .table_name(store.table())
        .set_key(Some(key_of(row)))
        .condition_expression(UNCHANGED)
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .send()
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(e) if sdk_code(&e) == Some("ConditionalCheckFailedException") => {
            Err(MoveError::Conflict(format!("{}: the row changed since it was read", store.context(&what))))
        }
        // Throttling and server errors come back as Unavailable, which is Transient.
        Err(e) => Err(MoveError::from(from_sdk(store.context(&what), e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MessageGroupId;
    use uuid::Uuid;

    fn sk(s: &str) -> Sk {
        Sk::parse(s).unwrap()
    }

    fn row(owner: u128, at: &str, text: &str) -> MessageGroup {
        MessageGroup {
            owner: UserUuid(Uuid::from_u128(owner)),
            sk: sk(at),
            message_group_uuid: MessageGroupId(Uuid::from_u128(99)),
            message: text.into(),
            user_uuid: UserUuid(Uuid::from_u128(1000 + owner)),
            user_display_name: format!("user {owner}"),
            user_handle: format!("u{owner}"),
        }
    }

    #[test]
    fn forward_moves_every_owner_behind_the_target_and_writes_canonical_sk() {
        let target = Target::new(&sk("2024-05-01T10:00:05.5"), "new");
        assert_eq!(target.sk.as_str(), "2024-05-01T10:00:05.500000+00:00");
        let plans = plan_forward(
            vec![row(1, "2024-05-01T10:00:00+00:00", "a"), row(2, "2024-05-01T10:00:00+00:00", "a")],
            &target,
        );
        assert_eq!(plans.len(), 2);
        for p in &plans {
            let OwnerPlan::Move { delete, put, replaces } = p else { panic!("{p:?}") };
            assert_eq!(delete.len(), 1);
            assert_eq!(put.sk, target.sk);
            assert_eq!(put.message, "new");
            // the other participant's names are kept
            assert_eq!(put.user_handle, delete[0].user_handle);
            assert!(replaces.is_none());
        }
    }

    #[test]
    fn forward_never_moves_back_and_a_replay_keeps() {
        let target = Target::new(&sk("2024-05-01T10:00:00+00:00"), "old");
        // one owner ahead (another spelling of a later instant), one exactly at the target
        let plans = plan_forward(
            vec![row(1, "2024-05-01T12:00:01+02:00", "newer"), row(2, "2024-05-01T10:00:00.000000+00:00", "old")],
            &target,
        );
        assert!(plans.iter().all(|p| matches!(p, OwnerPlan::Keep { .. })), "{plans:?}");
    }

    #[test]
    fn forward_folds_duplicates_into_the_move_or_drops_them_beside_a_current_row() {
        let target = Target::new(&sk("2024-05-01T10:00:09+00:00"), "x");
        let plans = plan_forward(
            vec![
                row(1, "2024-05-01T10:00:01+00:00", "a"),
                row(1, "2024-05-01T10:00:03+00:00", "b"),
                row(2, "2024-05-01T10:00:10+00:00", "c"),
                row(2, "2024-05-01T10:00:02+00:00", "d"),
            ],
            &target,
        );
        let OwnerPlan::Move { delete, put, .. } = &plans[0] else { panic!("{plans:?}") };
        assert_eq!(delete.len(), 2, "both rows of owner 1 go in the move");
        assert_eq!(put.user_handle, "u1");
        let OwnerPlan::DropDuplicates { keep, drop } = &plans[1] else { panic!("{plans:?}") };
        assert_eq!(keep.message, "c");
        assert_eq!(drop.len(), 1);
        assert_eq!(drop[0].message, "d");
    }

    #[test]
    fn exact_goes_back_rewrites_in_place_and_keeps_a_correct_row() {
        let target = Target::new(&sk("2024-05-01T10:00:00+00:00"), "last");
        let plans = plan_exact(
            vec![
                // ahead of every message: goes back
                row(1, "2024-05-01T11:00:00+00:00", "deleted since"),
                // right key, wrong text: rewritten in place
                row(2, "2024-05-01T10:00:00.000000+00:00", "stale text"),
                // right instant and text in another spelling: kept
                row(3, "2024-05-01T10:00:00", "last"),
            ],
            &target,
        );
        let OwnerPlan::Move { delete, replaces: None, .. } = &plans[0] else { panic!("{plans:?}") };
        assert_eq!(delete.len(), 1);
        let OwnerPlan::Move { delete, replaces: Some(old), put } = &plans[1] else { panic!("{plans:?}") };
        assert!(delete.is_empty());
        assert_eq!(old.message, "stale text");
        assert_eq!(put.message, "last");
        assert!(matches!(plans[2], OwnerPlan::Keep { .. }));
    }
}
