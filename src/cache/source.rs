//! Where the cache loads from: two small traits, so that the race rule can be tested against an
//! in-process store on tokio's paused clock ([`super::scripted`]) as well as against DynamoDB.

use futures::future::BoxFuture;

use crate::model::{CognitoSub, Message, MessageGroup, MessageGroupId, Misfit, Sk, UserUuid};

/// What a lookup needs but could not get.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    Unavailable(String),
}

/// Rows read, and the items that did not fit the model (reported, not served).
pub type Loaded<T> = (Vec<T>, Vec<Misfit>);

/// The newest messages of a conversation before some point, as [`ConversationStore`] read them.
#[derive(Debug, Default)]
pub struct Newest {
    /// Oldest first.
    pub messages: Vec<Message>,
    /// Older messages exist.
    pub more: bool,
    /// Items the store read for this (`store_items_read_total`).
    pub read: usize,
    pub misfits: Vec<Misfit>,
}

/// The two reads the cache makes of the messages table (the DynamoDB `Store` implements it).
pub trait ConversationStore: Send + Sync + 'static {
    /// Every group row of `user` (`GRP#{user}`), read consistently.
    fn group_rows(&self, user: UserUuid) -> BoxFuture<'_, crate::Result<Loaded<MessageGroup>>>;

    /// The newest `n` messages of `group` strictly before `before` (all when `None`), read
    /// consistently, reading about as many as it returns.
    fn newest_messages<'a>(
        &'a self,
        group: MessageGroupId,
        before: Option<&'a Sk>,
        n: usize,
    ) -> BoxFuture<'a, crate::Result<Newest>>;
}

/// Where `sub -> users.uuid` comes from (PostgreSQL's `PgUsers` implements it).
pub trait UserDirectory: Send + Sync + 'static {
    /// The user whose row carries `sub`; `None` when no row (or more than one) does.
    fn lookup<'a>(&'a self, sub: &'a CognitoSub) -> BoxFuture<'a, Result<Option<UserUuid>, CacheError>>;

    /// Where the lookups go, for messages (`host:port/db`).
    fn describe(&self) -> &str;
}
