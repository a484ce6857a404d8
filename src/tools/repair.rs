//! `cruddur-syncd ddb repair-groups [--apply]`: recomputes every conversation row from the
//! messages, for tables the Lambda left with duplicate or stale rows.
//!
//! One Scan finds every conversation's rows and newest message. Each owner of a conversation
//! must end with exactly one row at the newest message's instant, with its text
//! ([`plan_exact`]); a conversation without any message is left alone. Without `--apply` the
//! plan is printed and nothing is written. With it, each conversation that needs a fix is read
//! again (its rows, then its messages, consistently) and re-planned just before it is written,
//! with the projector's conditional moves: a row that changed since it was read (a message
//! arrived, the projector moved it) cancels that move, which is reported as a conflict and left
//! to the projector or a re-run, never forced.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use serde::Serialize;

use super::JsonLines;
use crate::error::{Error, Result};
use crate::model::{decode_item, Item, Message, MessageGroup, MessageGroupId, UserUuid};
use crate::projector::rows::{execute, plan_exact, read_rows, MoveError, OwnerPlan, Target};
use crate::store::Store;

/// What the scan found about one conversation.
#[derive(Default)]
struct Seen {
    rows: Vec<MessageGroup>,
    newest: Option<Message>,
}

#[derive(Serialize)]
struct RowView<'a> {
    sk: &'a str,
    message: &'a str,
}

impl<'a> From<&'a MessageGroup> for RowView<'a> {
    fn from(r: &'a MessageGroup) -> Self {
        RowView { sk: r.sk.as_str(), message: &r.message }
    }
}

/// One owner's fix, as printed.
#[derive(Serialize)]
struct FixLine<'a> {
    group: MessageGroupId,
    owner: UserUuid,
    /// `move` (delete these rows, put one), `rewrite` (same key, new text), or
    /// `drop_duplicates` (the newest row is right, older ones go).
    action: &'static str,
    rows: Vec<RowView<'a>>,
    to: RowView<'a>,
    /// `planned` (dry run), `fixed`, `conflict` (changed since read: left alone), or
    /// `already_right` (fixed by someone else since the scan).
    result: &'static str,
}

#[derive(Serialize, Default)]
struct Summary {
    dry_run: bool,
    conversations: usize,
    conversations_without_messages: usize,
    rows: usize,
    owners: usize,
    owners_right: usize,
    owners_to_fix: usize,
    fixed: usize,
    conflicts: usize,
}

/// Plans (and with `apply`, writes) the fix of every conversation row.
pub async fn repair_groups(store: &Store, index: &str, apply: bool, out: &mut JsonLines<impl Write>) -> Result<()> {
    let mut seen: HashMap<MessageGroupId, Seen> = HashMap::new();
    let mut misfits = 0usize;
    store
        .scan(None, |raw| match decode_item(&raw) {
            Ok(Item::Group(g)) => seen.entry(g.message_group_uuid).or_default().rows.push(g),
            Ok(Item::Message(m)) => {
                let s = seen.entry(m.group).or_default();
                if s.newest.as_ref().is_none_or(|n| m.sk > n.sk) {
                    s.newest = Some(m);
                }
            }
            Err(error) => {
                misfits += 1;
                let key = |n: &str| raw.get(n).and_then(|v| v.as_s().ok()).cloned();
                tracing::warn!(pk = ?key("pk"), sk = ?key("sk"), %error, "skipped an item that does not fit the model");
            }
        })
        .await?;

    let mut summary = Summary { dry_run: !apply, ..Summary::default() };
    // Sorted, so the output is the same run after run.
    let groups: BTreeMap<MessageGroupId, Seen> = seen.into_iter().filter(|(_, s)| !s.rows.is_empty()).collect();
    for (group, s) in groups {
        summary.conversations += 1;
        summary.rows += s.rows.len();
        let Some(newest) = s.newest else {
            summary.conversations_without_messages += 1;
            tracing::warn!(%group, rows = s.rows.len(), "conversation rows without any message; left alone");
            continue;
        };
        let plans = plan_exact(s.rows, &Target::new(&newest.sk, newest.message));
        summary.owners += plans.len();
        summary.owners_right += plans.iter().filter(|p| !p.writes()).count();
        let to_fix: Vec<&OwnerPlan> = plans.iter().filter(|p| p.writes()).collect();
        summary.owners_to_fix += to_fix.len();
        if to_fix.is_empty() {
            continue;
        }
        if !apply {
            for plan in to_fix {
                out.emit(&fix_line(group, plan, "planned"))?;
            }
            continue;
        }
        // Fresh reads just before writing: rows first, then messages, so that a row ahead of
        // every message read after it really is ahead (a message written in between shows up).
        let rows = read_rows(store, index, group).await?.rows;
        let (messages, _) = store.messages(group).await?;
        let Some(newest) = messages.last() else {
            summary.conversations_without_messages += 1;
            continue;
        };
        let fresh = plan_exact(rows, &Target::new(&newest.sk, newest.message.clone()));
        for planned in to_fix {
            let Some(plan) = fresh.iter().find(|p| p.owner() == planned.owner()) else { continue };
            let result = if !plan.writes() {
                "already_right"
            } else {
                match execute(store, plan).await {
                    Ok(_) => {
                        summary.fixed += 1;
                        "fixed"
                    }
                    Err(MoveError::Conflict(why)) => {
                        tracing::warn!(%group, owner = %plan.owner(), "changed while being repaired; left alone: {why}");
                        summary.conflicts += 1;
                        "conflict"
                    }
                    Err(MoveError::Transient(m)) => return Err(Error::Unavailable(m)),
                    Err(MoveError::Rejected(m)) => return Err(Error::Failed(m)),
                }
            };
            out.emit(&fix_line(group, plan, result))?;
        }
    }
    if misfits > 0 {
        tracing::warn!(items = misfits, "items that do not fit the model were skipped");
    }
    out.emit(&summary)
}

fn fix_line<'a>(group: MessageGroupId, plan: &'a OwnerPlan, result: &'static str) -> FixLine<'a> {
    let (action, rows, to) = match plan {
        OwnerPlan::Keep { row } => ("keep", vec![RowView::from(row)], RowView::from(row)),
        OwnerPlan::DropDuplicates { keep, drop } => {
            ("drop_duplicates", std::iter::once(keep).chain(drop).map(RowView::from).collect(), RowView::from(keep))
        }
        OwnerPlan::Move { delete, put, replaces } => {
            let action = if replaces.is_some() && delete.is_empty() { "rewrite" } else { "move" };
            (action, replaces.iter().chain(delete).map(RowView::from).collect(), RowView::from(put))
        }
    };
    FixLine { group, owner: plan.owner(), action, rows, to, result }
}
