//! The Cruddur single-table model: what an item of `cruddur-messages` means.
//!
//! Both AWS SDKs (DynamoDB and DynamoDB Streams) have their own `AttributeValue` type; decoding
//! goes through the small [`Attrs`] view so that an item read by a Query and an image read from
//! the stream are decoded by the same code and can never disagree.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use aws_sdk_dynamodb::types::AttributeValue as DdbValue;
use aws_sdk_dynamodbstreams::types::AttributeValue as StreamValue;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::Serialize;
use uuid::Uuid;

macro_rules! uuid_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // hyphenated lower case, as the Python app writes them
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name)
            }
        }
    };
}

uuid_newtype!(
    /// `users.uuid` in PostgreSQL; the `{uuid}` of `GRP#{uuid}`.
    UserUuid
);
uuid_newtype!(
    /// A conversation; the `{uuid}` of `MSG#{uuid}`.
    MessageGroupId
);
uuid_newtype!(
    /// One message.
    MessageId
);

/// A Cognito user's `sub`, the subject of its tokens; `users.cognito_user_id` in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CognitoSub(pub String);

impl CognitoSub {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for CognitoSub {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CognitoSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sort key of every item: a timestamp string as stored, ordered by the instant it names.
///
/// The raw string is kept because the API returns `created_at` exactly as stored, and because
/// the key of an item is the string, not the instant (two spellings of one instant are two
/// items).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sk {
    raw: String,
    instant: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an ISO 8601 timestamp")]
pub struct BadTimestamp(pub String);

impl Sk {
    /// Accepts what tables in the wild hold: RFC 3339 with any offset or `Z`, naive (read as
    /// UTC), with or without fractional seconds, with `T` or a space between date and time.
    pub fn parse(raw: &str) -> Result<Sk, BadTimestamp> {
        let instant = parse_instant(raw).ok_or_else(|| BadTimestamp(raw.to_string()))?;
        Ok(Sk { raw: raw.to_string(), instant })
    }

    /// The canonical spelling this tool writes: six fractional digits, `+00:00`.
    pub fn from_instant(instant: DateTime<Utc>) -> Sk {
        let raw = instant.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string();
        // Truncate to what the string can hold so that parse(raw) == self.
        let instant = parse_instant(&raw).unwrap_or(instant);
        Sk { raw, instant }
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn instant(&self) -> DateTime<Utc> {
        self.instant
    }

    /// How much later than its string's place in DynamoDB's (byte) order this spelling's
    /// instant can be, as far as this one spelling shows. Zero for the spellings the app
    /// writes (`+00:00`, or no offset): within one second, a whole second sorts before its
    /// fractions, as it should. (A positive offset sorts *later* than its instant: never newer
    /// than its place, but past a cursor's bound; see [`crate::store::Store::newest_messages`].) A second for `Z`
    /// (which sorts after every fraction of its second), the offset when it is negative (an
    /// instant later than the wall clock it spells), and a day when date and time are
    /// separated by a space (which sorts below every `T` of the same date).
    pub fn order_skew(&self) -> chrono::Duration {
        let s = self.raw.trim();
        let mut skew = chrono::Duration::zero();
        if s.ends_with(['Z', 'z']) {
            skew += chrono::Duration::seconds(1);
        }
        if let Some(wall) = self.wall() {
            skew += (self.instant - wall).max(chrono::Duration::zero());
        }
        if s.as_bytes().get(10) == Some(&b' ') {
            skew += chrono::Duration::days(1);
        }
        skew
    }

    /// The wall-clock time the string spells (its offset ignored), read as UTC: what DynamoDB's
    /// order of sort keys follows.
    pub fn wall(&self) -> Option<DateTime<Utc>> {
        let s = self.raw.trim();
        let head = s.get(..19)?;
        ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]
            .iter()
            .find_map(|fmt| NaiveDateTime::parse_from_str(head, fmt).ok())
            .map(|naive| naive.and_utc())
    }
}

/// DynamoDB's limit on a sort key: nothing longer is an sk of any table.
pub(crate) const MAX_SK_BYTES: usize = 1024;

fn parse_instant(raw: &str) -> Option<DateTime<Utc>> {
    // The whole string is bounded, not only its trimmed part: the raw spelling travels on in
    // cursors, which have a length limit of their own (found by fuzzing, `cursor` target).
    if raw.len() > MAX_SK_BYTES {
        return None;
    }
    let s = raw.trim();
    if s.len() < 19 || s.len() > 64 {
        return None;
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    // RFC 3339 demands a colon in the offset; Python's strftime('%z') writes "+0000".
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Some(dt.with_timezone(&Utc));
        }
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(naive.and_utc());
        }
    }
    None
}

impl Ord for Sk {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Instant first (the contract); the raw string breaks ties so that Ord agrees with Eq.
        self.instant.cmp(&other.instant).then_with(|| self.raw.cmp(&other.raw))
    }
}

impl PartialOrd for Sk {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Sk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl Serialize for Sk {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

/// RFC 3339 for log lines and reports, independent of how an item spelled its time.
pub(crate) fn rfc3339(instant: DateTime<Utc>) -> String {
    instant.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The partition key, which says what kind of item this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pk {
    /// `GRP#{owner}`: the conversation list of one user.
    Groups(UserUuid),
    /// `MSG#{group}`: the messages of one conversation.
    Messages(MessageGroupId),
}

pub(crate) const GROUP_PREFIX: &str = "GRP#";
pub(crate) const MESSAGE_PREFIX: &str = "MSG#";

impl Pk {
    pub fn parse(raw: &str) -> Result<Pk, DecodeError> {
        let bad_uuid = |_| DecodeError::BadUuid { attribute: "pk", value: raw.to_string() };
        if let Some(rest) = raw.strip_prefix(GROUP_PREFIX) {
            rest.parse().map(Pk::Groups).map_err(bad_uuid)
        } else if let Some(rest) = raw.strip_prefix(MESSAGE_PREFIX) {
            rest.parse().map(Pk::Messages).map_err(bad_uuid)
        } else {
            Err(DecodeError::UnknownPk(raw.to_string()))
        }
    }
}

impl fmt::Display for Pk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pk::Groups(u) => write!(f, "{GROUP_PREFIX}{u}"),
            Pk::Messages(g) => write!(f, "{MESSAGE_PREFIX}{g}"),
        }
    }
}

/// The primary key of an item.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItemKey {
    pub pk: Pk,
    pub sk: Sk,
}

/// A row of a user's conversation list. The names are the *other* participant's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageGroup {
    pub owner: UserUuid,
    pub sk: Sk,
    pub message_group_uuid: MessageGroupId,
    /// The last message's text.
    pub message: String,
    pub user_uuid: UserUuid,
    pub user_display_name: String,
    pub user_handle: String,
}

/// A message. The names are the sender's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub group: MessageGroupId,
    pub sk: Sk,
    pub message_uuid: MessageId,
    pub message: String,
    pub user_uuid: UserUuid,
    pub user_display_name: String,
    pub user_handle: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Group(MessageGroup),
    Message(Message),
}

impl Item {
    pub fn key(&self) -> ItemKey {
        match self {
            Item::Group(g) => ItemKey { pk: Pk::Groups(g.owner), sk: g.sk.clone() },
            Item::Message(m) => ItemKey { pk: Pk::Messages(m.group), sk: m.sk.clone() },
        }
    }
}

/// Why an item or stream image does not fit the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("attribute {0} is missing")]
    Missing(&'static str),
    #[error("attribute {attribute} is of type {found}, expected S")]
    WrongType { attribute: &'static str, found: &'static str },
    #[error("pk {0:?} is neither GRP#<uuid> nor MSG#<uuid>")]
    UnknownPk(String),
    #[error("attribute {attribute} = {value:?} is not a uuid")]
    BadUuid { attribute: &'static str, value: String },
    #[error("attribute sk: {0}")]
    BadSk(#[from] BadTimestamp),
}

/// An item that does not fit the model, kept for reporting (it is not served).
#[derive(Debug, Clone)]
pub struct Misfit {
    pub pk: Option<String>,
    pub sk: Option<String>,
    pub error: DecodeError,
}

/// What an attribute holds, seen through either SDK's type.
pub enum Field<'a> {
    Missing,
    S(&'a str),
    Other(&'static str),
}

/// A read-only view of an item's attributes.
pub trait Attrs {
    fn field(&self, name: &str) -> Field<'_>;

    fn s(&self, name: &'static str) -> Result<&str, DecodeError> {
        match self.field(name) {
            Field::S(s) => Ok(s),
            Field::Missing => Err(DecodeError::Missing(name)),
            Field::Other(found) => Err(DecodeError::WrongType { attribute: name, found }),
        }
    }

    fn uuid<T: FromStr>(&self, name: &'static str) -> Result<T, DecodeError> {
        let raw = self.s(name)?;
        raw.parse().map_err(|_| DecodeError::BadUuid { attribute: name, value: raw.to_string() })
    }
}

impl Attrs for HashMap<String, DdbValue> {
    fn field(&self, name: &str) -> Field<'_> {
        match self.get(name) {
            None => Field::Missing,
            Some(DdbValue::S(s)) => Field::S(s),
            Some(other) => Field::Other(ddb_type_name(other)),
        }
    }
}

impl Attrs for HashMap<String, StreamValue> {
    fn field(&self, name: &str) -> Field<'_> {
        match self.get(name) {
            None => Field::Missing,
            Some(StreamValue::S(s)) => Field::S(s),
            Some(StreamValue::N(_)) => Field::Other("N"),
            Some(StreamValue::B(_)) => Field::Other("B"),
            Some(StreamValue::Bool(_)) => Field::Other("BOOL"),
            Some(StreamValue::Null(_)) => Field::Other("NULL"),
            Some(StreamValue::L(_)) => Field::Other("L"),
            Some(StreamValue::M(_)) => Field::Other("M"),
            Some(StreamValue::Ss(_)) => Field::Other("SS"),
            Some(StreamValue::Ns(_)) => Field::Other("NS"),
            Some(StreamValue::Bs(_)) => Field::Other("BS"),
            Some(_) => Field::Other("unknown"),
        }
    }
}

fn ddb_type_name(v: &DdbValue) -> &'static str {
    match v {
        DdbValue::S(_) => "S",
        DdbValue::N(_) => "N",
        DdbValue::B(_) => "B",
        DdbValue::Bool(_) => "BOOL",
        DdbValue::Null(_) => "NULL",
        DdbValue::L(_) => "L",
        DdbValue::M(_) => "M",
        DdbValue::Ss(_) => "SS",
        DdbValue::Ns(_) => "NS",
        DdbValue::Bs(_) => "BS",
        _ => "unknown",
    }
}

/// Decodes only the primary key (all a KEYS_ONLY stream or a REMOVE carries for certain).
pub(crate) fn decode_key(attrs: &impl Attrs) -> Result<ItemKey, DecodeError> {
    let pk = Pk::parse(attrs.s("pk")?)?;
    let sk = Sk::parse(attrs.s("sk")?)?;
    Ok(ItemKey { pk, sk })
}

/// Decodes a whole item.
pub fn decode_item(attrs: &impl Attrs) -> Result<Item, DecodeError> {
    let ItemKey { pk, sk } = decode_key(attrs)?;
    let message = attrs.s("message")?.to_string();
    let user_uuid = attrs.uuid("user_uuid")?;
    let user_display_name = attrs.s("user_display_name")?.to_string();
    let user_handle = attrs.s("user_handle")?.to_string();
    Ok(match pk {
        Pk::Groups(owner) => Item::Group(MessageGroup {
            owner,
            sk,
            message_group_uuid: attrs.uuid("message_group_uuid")?,
            message,
            user_uuid,
            user_display_name,
            user_handle,
        }),
        Pk::Messages(group) => Item::Message(Message {
            group,
            sk,
            message_uuid: attrs.uuid("message_uuid")?,
            message,
            user_uuid,
            user_display_name,
            user_handle,
        }),
    })
}

fn s(v: impl Into<String>) -> DdbValue {
    DdbValue::S(v.into())
}

impl MessageGroup {
    pub fn to_item(&self) -> HashMap<String, DdbValue> {
        HashMap::from([
            ("pk".to_string(), s(Pk::Groups(self.owner).to_string())),
            ("sk".to_string(), s(self.sk.as_str())),
            ("message_group_uuid".to_string(), s(self.message_group_uuid.to_string())),
            ("message".to_string(), s(&self.message)),
            ("user_uuid".to_string(), s(self.user_uuid.to_string())),
            ("user_display_name".to_string(), s(&self.user_display_name)),
            ("user_handle".to_string(), s(&self.user_handle)),
        ])
    }
}

impl Message {
    pub fn to_item(&self) -> HashMap<String, DdbValue> {
        HashMap::from([
            ("pk".to_string(), s(Pk::Messages(self.group).to_string())),
            ("sk".to_string(), s(self.sk.as_str())),
            ("message_uuid".to_string(), s(self.message_uuid.to_string())),
            ("message".to_string(), s(&self.message)),
            ("user_uuid".to_string(), s(self.user_uuid.to_string())),
            ("user_display_name".to_string(), s(&self.user_display_name)),
            ("user_handle".to_string(), s(&self.user_handle)),
        ])
    }
}

/// The JSON shape of both API routes and of the conversation tools, field order as the Flask
/// app emits it: `uuid` is the group's id in a list of groups and the message's id in a list
/// of messages; the names are the other participant's or the sender's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiEntry<'a> {
    pub uuid: String,
    pub display_name: &'a str,
    pub handle: &'a str,
    pub message: &'a str,
    pub created_at: &'a str,
}

impl MessageGroup {
    pub fn api_entry(&self) -> ApiEntry<'_> {
        ApiEntry {
            uuid: self.message_group_uuid.to_string(),
            display_name: &self.user_display_name,
            handle: &self.user_handle,
            message: &self.message,
            created_at: self.sk.as_str(),
        }
    }
}

impl Message {
    pub fn api_entry(&self) -> ApiEntry<'_> {
        ApiEntry {
            uuid: self.message_uuid.to_string(),
            display_name: &self.user_display_name,
            handle: &self.user_handle,
            message: &self.message,
            created_at: self.sk.as_str(),
        }
    }
}

/// A user's conversation list as the contract defines it: one row per `message_group_uuid`
/// (the newest sk wins when several rows share one), newest first by instant.
pub fn conversation_list(rows: impl IntoIterator<Item = MessageGroup>) -> Vec<MessageGroup> {
    let mut newest: HashMap<MessageGroupId, MessageGroup> = HashMap::new();
    for row in rows {
        match newest.get(&row.message_group_uuid) {
            Some(kept) if kept.sk >= row.sk => {}
            _ => {
                newest.insert(row.message_group_uuid, row);
            }
        }
    }
    let mut list: Vec<MessageGroup> = newest.into_values().collect();
    list.sort_by(|a, b| b.sk.cmp(&a.sk).then_with(|| a.message_group_uuid.cmp(&b.message_group_uuid)));
    list
}

/// Plain JSON of any item (for `ddb scan`): numbers stay numbers, binaries become base64, so
/// the output pipes into jq without DynamoDB's type wrappers.
pub fn item_to_json(item: &HashMap<String, DdbValue>) -> serde_json::Value {
    let mut keys: Vec<&String> = item.keys().collect();
    keys.sort();
    let map = keys.into_iter().map(|k| (k.clone(), value_to_json(&item[k]))).collect();
    serde_json::Value::Object(map)
}

fn value_to_json(v: &DdbValue) -> serde_json::Value {
    use base64::Engine as _;
    use serde_json::Value as J;
    let number =
        |n: &str| serde_json::from_str::<serde_json::Number>(n).map(J::Number).unwrap_or_else(|_| J::String(n.into()));
    let b64 = |b: &[u8]| J::String(base64::engine::general_purpose::STANDARD.encode(b));
    match v {
        DdbValue::S(s) => J::String(s.clone()),
        DdbValue::N(n) => number(n),
        DdbValue::B(b) => b64(b.as_ref()),
        DdbValue::Bool(b) => J::Bool(*b),
        DdbValue::Null(_) => J::Null,
        DdbValue::L(l) => J::Array(l.iter().map(value_to_json).collect()),
        DdbValue::M(m) => item_to_json(m),
        DdbValue::Ss(ss) => J::Array(ss.iter().cloned().map(J::String).collect()),
        DdbValue::Ns(ns) => J::Array(ns.iter().map(|n| number(n)).collect()),
        DdbValue::Bs(bs) => J::Array(bs.iter().map(|b| b64(b.as_ref())).collect()),
        _ => J::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_in_the_wild_parses_to_its_instant() {
        let utc = |s: &str| Sk::parse(s).unwrap().instant().to_rfc3339_opts(SecondsFormat::Micros, true);
        assert_eq!(utc("2023-04-20T22:23:36.123456+00:00"), "2023-04-20T22:23:36.123456Z");
        assert_eq!(utc("2023-04-20T22:23:36.123456"), "2023-04-20T22:23:36.123456Z");
        assert_eq!(utc("2023-04-20T22:23:36"), "2023-04-20T22:23:36.000000Z");
        assert_eq!(utc("2023-04-20T22:23:36Z"), "2023-04-20T22:23:36.000000Z");
        assert_eq!(utc("2023-04-21T00:23:36.5+02:00"), "2023-04-20T22:23:36.500000Z");
        assert_eq!(utc("2023-04-20 22:23:36.123456"), "2023-04-20T22:23:36.123456Z");
        assert_eq!(utc("2023-04-20T22:23:36.123456+0000"), "2023-04-20T22:23:36.123456Z");
    }

    #[test]
    fn the_order_skew_of_a_spelling() {
        let skew = |s: &str| Sk::parse(s).unwrap().order_skew().num_seconds();
        assert_eq!(skew("2024-01-01T10:00:00.123456+00:00"), 0, "what the app writes sorts as it happened");
        assert_eq!(skew("2024-01-01T10:00:00+00:00"), 0, "a whole second sorts before its fractions");
        assert_eq!(skew("2024-01-01T10:00:00Z"), 1, "Z sorts after every fraction of its second");
        assert_eq!(skew("2024-01-01T10:00:00"), 0);
        assert_eq!(skew("2024-01-01T10:00:00+02:00"), 0, "a positive offset makes it older, not newer");
        assert_eq!(skew("2024-01-01T10:00:00-05:00"), 5 * 3600);
        assert_eq!(skew("2024-01-01 10:00:00"), 24 * 3600);
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in ["", "yesterday", "2023-04-20", "2023-13-20T22:23:36", "2023-04-20T25:00:00+00:00"] {
            assert!(Sk::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn ordering_is_by_instant_not_by_string() {
        let earlier = Sk::parse("2023-04-21T00:00:00+05:00").unwrap(); // 2023-04-20T19:00Z
        let later = Sk::parse("2023-04-20T20:00:00").unwrap();
        assert!(earlier.as_str() > later.as_str());
        assert!(earlier < later);
    }

    #[test]
    fn canonical_spelling_round_trips() {
        let sk = Sk::from_instant(DateTime::parse_from_rfc3339("2024-01-01T00:00:00.1234567Z").unwrap().into());
        assert_eq!(sk.as_str(), "2024-01-01T00:00:00.123456+00:00");
        assert_eq!(Sk::parse(sk.as_str()).unwrap(), sk);
    }

    #[test]
    fn pk_prefixes() {
        let u = "8f5e3c2a-1111-4222-8333-944455556666";
        assert!(matches!(Pk::parse(&format!("GRP#{u}")), Ok(Pk::Groups(_))));
        assert!(matches!(Pk::parse(&format!("MSG#{u}")), Ok(Pk::Messages(_))));
        assert!(matches!(Pk::parse(&format!("USR#{u}")), Err(DecodeError::UnknownPk(_))));
        assert!(matches!(Pk::parse("GRP#nope"), Err(DecodeError::BadUuid { .. })));
    }
}
