//! What one cache entry holds: a user's conversation rows with the list derived from them, or a
//! conversation's newest messages. Entries are immutable: a change builds a new one.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use super::expiry::Expires;
use crate::model::{conversation_list, Message, MessageGroup, MessageGroupId, Sk};

/// A user's group rows, keyed by sort key, with the conversation list derived from them.
#[derive(Debug, Default)]
pub struct GroupRows {
    rows: BTreeMap<String, MessageGroup>,
    /// One row per conversation, newest first (SPEC section 2).
    view: Arc<[MessageGroup]>,
    /// Something a reader derived from this version and keeps with it (the API keeps its
    /// rendered first page here: most clients only ever ask for it). Any change builds a new
    /// `GroupRows`, so what is kept cannot go stale.
    memo: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl GroupRows {
    pub(super) fn new(rows: impl IntoIterator<Item = MessageGroup>) -> Self {
        let rows: BTreeMap<String, MessageGroup> = rows.into_iter().map(|g| (g.sk.as_str().to_string(), g)).collect();
        let view = conversation_list(rows.values().cloned()).into();
        GroupRows { rows, view, memo: OnceLock::new() }
    }

    pub(super) fn with(&self, change: impl FnOnce(&mut BTreeMap<String, MessageGroup>)) -> Self {
        let mut rows = self.rows.clone();
        change(&mut rows);
        GroupRows::new(rows.into_values())
    }

    pub fn view(&self) -> &[MessageGroup] {
        &self.view
    }

    /// What `derive` makes of the view, made at most once per version. `None` only if a value
    /// of another type was kept first.
    pub fn memo<T: Any + Send + Sync>(&self, derive: impl FnOnce(&[MessageGroup]) -> T) -> Option<&T> {
        self.memo.get_or_init(|| Box::new(derive(&self.view))).downcast_ref()
    }

    pub fn contains_group(&self, group: MessageGroupId) -> bool {
        self.view.iter().any(|g| g.message_group_uuid == group)
    }

    pub(super) fn weight(&self) -> u32 {
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
    /// The newest messages as read (oldest first); `complete` when nothing older exists.
    pub(super) fn new(messages: Vec<Message>, complete: bool) -> Self {
        MessageWindow { messages, complete }
    }

    pub(super) fn upsert(&self, m: Message, size: usize) -> Self {
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

    /// The window without the message at `sk`; `None` when that leaves an incomplete window
    /// short of the newest messages it should hold (older ones it never had would now belong
    /// in it, so it must be loaded again rather than follow the conversation with a hole).
    pub(super) fn remove(&self, sk: &Sk) -> Option<Self> {
        let Ok(i) = self.messages.binary_search_by(|x| x.sk.cmp(sk)) else {
            return Some(self.clone());
        };
        if !self.complete {
            return None;
        }
        let mut messages = self.messages.clone();
        messages.remove(i);
        // A complete window stays complete: nothing older exists.
        Some(MessageWindow { messages, complete: true })
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    pub fn complete(&self) -> bool {
        self.complete
    }

    pub(super) fn weight(&self) -> u32 {
        let bytes: usize = self.messages.iter().map(message_weight).sum();
        u32::try_from(bytes + 64).unwrap_or(u32::MAX)
    }
}

impl Expires for GroupRows {}
impl Expires for MessageWindow {}

/// A page of a list and whether more exists beyond it.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub more: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UserUuid;
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

    #[test]
    fn window_keeps_the_newest_and_knows_when_it_is_complete() {
        let w = MessageWindow::new((2..5).map(msg).collect(), false);
        assert_eq!(minutes(&w), ["m2", "m3", "m4"]);
        // older than an incomplete window: ignored
        assert_eq!(minutes(&w.upsert(msg(1), 3)), ["m2", "m3", "m4"]);
        // newer: pushes the oldest out
        assert_eq!(minutes(&w.upsert(msg(9), 3)), ["m3", "m4", "m9"]);
        let small = MessageWindow::new(vec![msg(1)], true);
        let grown = small.upsert(msg(0), 3).upsert(msg(2), 3);
        assert_eq!(minutes(&grown), ["m0", "m1", "m2"]);
        assert!(grown.complete());
        let over = grown.upsert(msg(3), 3);
        assert!(!over.complete());
        assert!(over.remove(&msg(2).sk).is_none(), "an incomplete window that loses a message is loaded again");
        assert_eq!(minutes(&over.remove(&msg(7).sk).unwrap()), ["m1", "m2", "m3"], "a message it does not hold");
        assert_eq!(minutes(&grown.remove(&msg(1).sk).unwrap()), ["m0", "m2"], "a complete one stays complete");
    }

    #[test]
    fn a_memo_is_made_once_per_version() {
        let rows = GroupRows::new([]);
        let mut made = 0;
        assert_eq!(
            rows.memo(|v| {
                made += 1;
                v.len()
            }),
            Some(&0)
        );
        assert_eq!(rows.memo(|_| 7usize), Some(&0), "kept from the first call");
        assert_eq!(made, 1);
        assert_eq!(rows.memo(|_| "another type"), None);
    }
}
