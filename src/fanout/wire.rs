//! What travels through JetStream: one message per stream record, per gap, per start at
//! LATEST, and per reconcile run that changed mappings. The relay encodes, every follower (and
//! the projector) decodes; this file is the whole format.
//!
//! Subjects: `{prefix}.changes` (records, gaps, positions) and `{prefix}.users` (changed subs).
//! Headers carry what a consumer needs before the body: `Cruddur-Kind`, and for a record its
//! shard, sequence number, event and creation time (ms since the epoch). `Nats-Msg-Id` is
//! `{shard}:{sequence}` for a record, so a republish inside the stream's duplicate window is
//! dropped by the server; the follower drops what is older on its shard after that.
//! The body of a record is JSON: `{"op":"upsert","item":{attribute: string}}` or
//! `{"op":"remove"|"invalidate","pk":...,"sk":...}`; every attribute of the model is a string.

use std::collections::{BTreeMap, HashMap};

use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::metrics::StreamEvent;
use crate::model::{decode_item, decode_key, Attrs, CognitoSub, Field, Item, ItemKey, Pk, Sk};
use crate::stream::{Change, ChangeRecord};

pub(crate) const KIND: &str = "Cruddur-Kind";
pub(crate) const SHARD: &str = "Cruddur-Shard";
pub(crate) const SEQUENCE: &str = "Cruddur-Sequence";
pub(crate) const EVENT: &str = "Cruddur-Event";
pub(crate) const CREATED: &str = "Cruddur-Created-Ms";
pub(crate) const REPEAT: &str = "Cruddur-Repeat";
const MSG_ID: &str = "Nats-Msg-Id";

/// One message of the fan-out stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    /// One stream record, decoded. `repeat` counts the records before it on its shard that
    /// carried the same sequence number (always 0 from DynamoDB Streams; moto repeats numbers
    /// under concurrent writes), so that such a record is neither deduplicated by the server
    /// nor dropped by a follower as already applied.
    Change { record: Box<ChangeRecord>, repeat: u32 },
    /// The relay's source may have lost records: every follower flushes.
    Gap(String),
    /// A relay started reading at LATEST with no checkpoint: writes before this moment may be
    /// in no message, so what followers loaded before it is dropped (not a gap).
    Positioned,
    /// A reconcile run changed these subs' mappings: forget them now, not at `users_ttl`.
    Users(Vec<CognitoSub>),
}

/// Why a message could not be read; the follower counts it and skips it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("header {header} = {value:?} is not valid")]
    BadHeader { header: &'static str, value: String },
    #[error("the body is not valid: {0}")]
    Body(String),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Body {
    Upsert { item: BTreeMap<String, String> },
    Remove { pk: String, sk: String },
    Invalidate { pk: String, sk: String },
}

impl Attrs for BTreeMap<String, String> {
    fn field(&self, name: &str) -> Field<'_> {
        self.get(name).map_or(Field::Missing, |s| Field::S(s))
    }
}

/// The subjects under a prefix.
pub(crate) fn changes_subject(prefix: &str) -> String {
    format!("{prefix}.changes")
}

pub(crate) fn users_subject(prefix: &str) -> String {
    format!("{prefix}.users")
}

/// Every subject of the fan-out: what the stream stores and a follower reads.
pub(crate) fn all_subjects(prefix: &str) -> String {
    format!("{prefix}.>")
}

/// `(subject, headers, body)` of a notice.
pub(crate) fn encode(prefix: &str, notice: &Notice) -> (String, HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    let (subject, kind, body) = match notice {
        Notice::Change { record, repeat } => {
            let id = match repeat {
                0 => format!("{}:{}", record.shard_id, record.sequence_number),
                n => format!("{}:{}:{n}", record.shard_id, record.sequence_number),
            };
            headers.insert(MSG_ID, id.as_str());
            if *repeat > 0 {
                headers.insert(REPEAT, repeat.to_string().as_str());
            }
            headers.insert(SHARD, record.shard_id.as_str());
            headers.insert(SEQUENCE, record.sequence_number.as_str());
            headers.insert(EVENT, event_name(record.event));
            if let Some(t) = record.approximate_creation {
                headers.insert(CREATED, t.timestamp_millis().to_string().as_str());
            }
            let body = match &record.change {
                Change::Upsert(item) => Body::Upsert { item: attributes(item) },
                Change::Remove(key) => Body::Remove { pk: key.pk.to_string(), sk: key.sk.as_str().into() },
                Change::Invalidate(key) => Body::Invalidate { pk: key.pk.to_string(), sk: key.sk.as_str().into() },
            };
            (changes_subject(prefix), "change", serde_json::to_vec(&body).unwrap_or_default())
        }
        Notice::Gap(reason) => (changes_subject(prefix), "gap", reason.as_bytes().to_vec()),
        Notice::Positioned => (changes_subject(prefix), "positioned", Vec::new()),
        Notice::Users(subs) => {
            let subs: Vec<&str> = subs.iter().map(|s| s.as_str()).collect();
            (users_subject(prefix), "users", serde_json::to_vec(&subs).unwrap_or_default())
        }
    };
    headers.insert(KIND, kind);
    (subject, headers, Bytes::from(body))
}

/// A notice from a message's headers and body.
pub(crate) fn decode(headers: Option<&HeaderMap>, body: &[u8]) -> Result<Notice, WireError> {
    let header = |name: &'static str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
    let required = |name: &'static str| header(name).ok_or(WireError::Missing(name));
    let bad = |header: &'static str, value: &str| WireError::BadHeader { header, value: value.to_string() };
    match required(KIND)?.as_str() {
        "change" => {
            let shard_id = required(SHARD)?;
            let sequence_number = required(SEQUENCE)?;
            if sequence_number.is_empty() || !sequence_number.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(SEQUENCE, &sequence_number));
            }
            let event = required(EVENT)?;
            let event = parse_event(&event).ok_or_else(|| bad(EVENT, &event))?;
            let approximate_creation = match header(CREATED) {
                None => None,
                Some(ms) => Some(
                    ms.parse::<i64>()
                        .ok()
                        .and_then(DateTime::<Utc>::from_timestamp_millis)
                        .ok_or_else(|| bad(CREATED, &ms))?,
                ),
            };
            let body: Body = serde_json::from_slice(body).map_err(|e| WireError::Body(e.to_string()))?;
            let key = |pk: &str, sk: &str| -> Result<ItemKey, WireError> {
                let pk = Pk::parse(pk).map_err(|e| WireError::Body(e.to_string()))?;
                let sk = Sk::parse(sk).map_err(|e| WireError::Body(e.to_string()))?;
                Ok(ItemKey { pk, sk })
            };
            let change = match body {
                Body::Upsert { item } => match decode_item(&item) {
                    Ok(item) => Change::Upsert(item),
                    // The relay sends only what decoded; a misfit here still names its key.
                    Err(e) => match decode_key(&item) {
                        Ok(key) => Change::Remove(key),
                        Err(_) => return Err(WireError::Body(e.to_string())),
                    },
                },
                Body::Remove { pk, sk } => Change::Remove(key(&pk, &sk)?),
                Body::Invalidate { pk, sk } => Change::Invalidate(key(&pk, &sk)?),
            };
            let repeat = match header(REPEAT) {
                None => 0,
                Some(n) => n.parse().map_err(|_| bad(REPEAT, &n))?,
            };
            Ok(Notice::Change {
                record: Box::new(ChangeRecord { shard_id, sequence_number, event, approximate_creation, change }),
                repeat,
            })
        }
        "gap" => Ok(Notice::Gap(String::from_utf8_lossy(body).into_owned())),
        "positioned" => Ok(Notice::Positioned),
        "users" => {
            let subs: Vec<String> = serde_json::from_slice(body).map_err(|e| WireError::Body(e.to_string()))?;
            Ok(Notice::Users(subs.into_iter().map(CognitoSub).collect()))
        }
        other => Err(bad(KIND, other)),
    }
}

/// A DynamoDB Streams sequence number (decimal digits, up to 40), ordered as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SequenceNumber<'a>(pub &'a str);

impl Ord for SequenceNumber<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self.0.trim_start_matches('0'), other.0.trim_start_matches('0'));
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    }
}

impl PartialOrd for SequenceNumber<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn attributes(item: &Item) -> BTreeMap<String, String> {
    let raw: HashMap<String, aws_sdk_dynamodb::types::AttributeValue> = match item {
        Item::Group(g) => g.to_item(),
        Item::Message(m) => m.to_item(),
    };
    raw.into_iter().filter_map(|(k, v)| v.as_s().ok().map(|s| (k, s.clone()))).collect()
}

fn event_name(event: StreamEvent) -> &'static str {
    match event {
        StreamEvent::INSERT => "INSERT",
        StreamEvent::MODIFY => "MODIFY",
        StreamEvent::REMOVE => "REMOVE",
    }
}

fn parse_event(name: &str) -> Option<StreamEvent> {
    match name {
        "INSERT" => Some(StreamEvent::INSERT),
        "MODIFY" => Some(StreamEvent::MODIFY),
        "REMOVE" => Some(StreamEvent::REMOVE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, MessageGroupId, MessageId, UserUuid};

    fn record(change: Change) -> ChangeRecord {
        ChangeRecord {
            shard_id: "shardId-000001".into(),
            sequence_number: "49668000000000000000000001".into(),
            event: StreamEvent::MODIFY,
            approximate_creation: DateTime::from_timestamp_millis(1_700_000_000_123),
            change,
        }
    }

    fn message() -> Message {
        Message {
            group: MessageGroupId(uuid::Uuid::new_v4()),
            sk: Sk::parse("2024-05-01T10:00:00.123456+00:00").unwrap(),
            message_uuid: MessageId(uuid::Uuid::new_v4()),
            message: "héllo \"quoted\"".into(),
            user_uuid: UserUuid(uuid::Uuid::new_v4()),
            user_display_name: "Andrew".into(),
            user_handle: "andrew".into(),
        }
    }

    #[test]
    fn every_notice_survives_the_trip() {
        let m = message();
        let key = Item::Message(m.clone()).key();
        let notices = [
            Notice::Change { record: Box::new(record(Change::Upsert(Item::Message(m)))), repeat: 0 },
            Notice::Change { record: Box::new(record(Change::Remove(key.clone()))), repeat: 2 },
            Notice::Change { record: Box::new(record(Change::Invalidate(key))), repeat: 0 },
            Notice::Gap("records of shard x were trimmed".into()),
            Notice::Positioned,
            Notice::Users(vec![CognitoSub("a".into()), CognitoSub("b".into())]),
        ];
        for notice in notices {
            let (subject, headers, body) = encode("cruddur", &notice);
            let expected = if matches!(notice, Notice::Users(_)) { "cruddur.users" } else { "cruddur.changes" };
            assert_eq!(subject, expected);
            assert_eq!(decode(Some(&headers), &body).unwrap(), notice);
        }
    }

    #[test]
    fn a_record_is_deduplicated_by_shard_and_sequence() {
        let change = record(Change::Remove(Item::Message(message()).key()));
        let (_, headers, _) = encode("p", &Notice::Change { record: Box::new(change.clone()), repeat: 0 });
        assert_eq!(headers.get(MSG_ID).unwrap().as_str(), "shardId-000001:49668000000000000000000001");
        let (_, headers, _) = encode("p", &Notice::Change { record: Box::new(change), repeat: 1 });
        assert_eq!(headers.get(MSG_ID).unwrap().as_str(), "shardId-000001:49668000000000000000000001:1");
    }

    #[test]
    fn what_does_not_decode_is_an_error_not_a_panic() {
        let change = record(Change::Remove(Item::Message(message()).key()));
        let (_, headers, body) = encode("p", &Notice::Change { record: Box::new(change), repeat: 0 });
        assert!(matches!(decode(None, &body), Err(WireError::Missing(KIND))));
        assert!(matches!(decode(Some(&headers), b"{not json"), Err(WireError::Body(_))));
        let mut bad_seq = headers.clone();
        bad_seq.insert(SEQUENCE, "12a");
        assert!(matches!(decode(Some(&bad_seq), &body), Err(WireError::BadHeader { header: SEQUENCE, .. })));
        let mut bad_kind = headers;
        bad_kind.insert(KIND, "other");
        assert!(matches!(decode(Some(&bad_kind), &body), Err(WireError::BadHeader { header: KIND, .. })));
    }

    #[test]
    fn sequence_numbers_order_as_numbers() {
        assert!(SequenceNumber("9") < SequenceNumber("10"));
        assert!(SequenceNumber("100") > SequenceNumber("99"));
        assert!(SequenceNumber("0012") == SequenceNumber("0012"));
        assert_eq!(SequenceNumber("012").cmp(&SequenceNumber("12")), std::cmp::Ordering::Equal);
    }
}
