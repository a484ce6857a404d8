//! Stream records -> [`ChangeRecord`]s.
//!
//! What a record means is decided by the record itself, not by the stream's configured view
//! type: an INSERT or MODIFY that carries a new image is an upsert, one that does not (KEYS_ONLY,
//! OLD_IMAGE) can only invalidate. That way a view type changed under a running daemon cannot
//! make it apply the wrong thing.

use std::collections::HashMap;
use std::fmt::Write as _;

use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, Record};
use chrono::{DateTime, Utc};

use super::source::ShardId;
use super::{Change, ChangeRecord};
use crate::metrics::{EventLabels, Metrics, SkipLabels, StreamEvent};
use crate::model::{decode_item, decode_key, DecodeError};

/// Why a record was skipped. [`SkipError::reason`] is the `reason` label of
/// `stream_skipped_records`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipError {
    #[error("the record has no dynamodb section")]
    NoStreamRecord,
    #[error("the record has no sequence number")]
    NoSequenceNumber,
    #[error("unknown event name {0:?}")]
    UnknownEvent(String),
    #[error("the record carries neither keys nor an image")]
    NoKeys,
    #[error(transparent)]
    Model(#[from] DecodeError),
}

impl SkipError {
    pub fn reason(&self) -> &'static str {
        match self {
            SkipError::NoStreamRecord => "no_stream_record",
            SkipError::NoSequenceNumber => "no_sequence_number",
            SkipError::UnknownEvent(_) => "unknown_event",
            SkipError::NoKeys => "missing_key",
            SkipError::Model(DecodeError::Missing(_)) => "missing_attribute",
            SkipError::Model(DecodeError::WrongType { .. }) => "wrong_type",
            SkipError::Model(DecodeError::UnknownPk(_)) => "unknown_pk",
            SkipError::Model(DecodeError::BadUuid { .. }) => "bad_uuid",
            SkipError::Model(DecodeError::BadSk(_)) => "bad_sk",
        }
    }
}

/// The event name of a record, when it is one of the three DynamoDB defines.
pub(crate) fn event_of(record: &Record) -> Result<StreamEvent, SkipError> {
    match record.event_name() {
        Some(OperationType::Insert) => Ok(StreamEvent::INSERT),
        Some(OperationType::Modify) => Ok(StreamEvent::MODIFY),
        Some(OperationType::Remove) => Ok(StreamEvent::REMOVE),
        Some(other) => Err(SkipError::UnknownEvent(other.as_str().to_string())),
        None => Err(SkipError::UnknownEvent(String::new())),
    }
}

/// Decodes one record read from `shard`.
pub fn decode_record(shard: &ShardId, record: &Record) -> Result<ChangeRecord, SkipError> {
    let sr = record.dynamodb().ok_or(SkipError::NoStreamRecord)?;
    let sequence_number = sr.sequence_number().ok_or(SkipError::NoSequenceNumber)?;
    let event = event_of(record)?;
    // Keys are always present on AWS; the images are a fallback for emulators that omit them.
    let keys = sr.keys().or(sr.new_image()).or(sr.old_image());
    let change = match (event, sr.new_image()) {
        (StreamEvent::REMOVE, _) => Change::Remove(decode_key(keys.ok_or(SkipError::NoKeys)?)?),
        (_, Some(image)) => Change::Upsert(decode_item(image)?),
        (_, None) => Change::Invalidate(decode_key(keys.ok_or(SkipError::NoKeys)?)?),
    };
    Ok(ChangeRecord {
        shard_id: shard.0.clone(),
        sequence_number: sequence_number.to_string(),
        event,
        approximate_creation: sr.approximate_creation_date_time().and_then(to_chrono),
        change,
    })
}

/// For a record whose image does not fit the model although its key decodes: the removal of
/// that key, so the cache stops showing an item a load would skip.
fn removal_of(shard: &ShardId, record: &Record, err: &SkipError) -> Option<ChangeRecord> {
    if !matches!(err, SkipError::Model(_)) {
        return None;
    }
    let sr = record.dynamodb()?;
    let key = decode_key(sr.keys().or(sr.new_image()).or(sr.old_image())?).ok()?;
    Some(ChangeRecord {
        shard_id: shard.0.clone(),
        sequence_number: sr.sequence_number()?.to_string(),
        event: event_of(record).ok()?,
        approximate_creation: sr.approximate_creation_date_time().and_then(to_chrono),
        change: Change::Remove(key),
    })
}

pub(crate) fn to_chrono(t: &aws_smithy_types::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// The keys of a record for a log line: `pk=S:"..." sk=N:"..."`, whatever their types.
pub fn describe_keys(record: &Record) -> String {
    let Some(sr) = record.dynamodb() else { return "(no dynamodb section)".to_string() };
    let Some(keys) = sr.keys().or(sr.new_image()).or(sr.old_image()) else { return "(no keys)".to_string() };
    render_keys(keys)
}

fn render_keys(keys: &HashMap<String, AttributeValue>) -> String {
    let mut names: Vec<&String> = keys.keys().collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        if !out.is_empty() {
            out.push(' ');
        }
        let _ = match &keys[name] {
            AttributeValue::S(s) => write!(out, "{name}=S:{s:?}"),
            AttributeValue::N(n) => write!(out, "{name}=N:{n:?}"),
            AttributeValue::B(b) => write!(out, "{name}=B:({} bytes)", b.as_ref().len()),
            _ => write!(out, "{name}=(other type)"),
        };
    }
    if out.is_empty() {
        out.push_str("(no keys)");
    }
    out
}

/// What a page of raw records amounts to after decoding.
#[derive(Debug, Default)]
pub struct DecodedPage {
    pub changes: Vec<ChangeRecord>,
    /// Sequence number of the last record of the page, skipped or not: reading resumes after it.
    pub last_sequence_number: Option<String>,
    /// Creation time of the newest record of the page, for the iterator age.
    pub newest_creation: Option<DateTime<Utc>>,
}

/// Decodes a page, counts `stream_records{event}` and `stream_skipped_records{reason}`, and logs
/// each skipped record once with its keys and sequence number.
pub fn decode_page(shard: &ShardId, records: &[Record], metrics: &Metrics) -> DecodedPage {
    let mut page = DecodedPage { changes: Vec::with_capacity(records.len()), ..DecodedPage::default() };
    let mut counts = [0u64; 3];
    for record in records {
        let sr = record.dynamodb();
        if let Some(seq) = sr.and_then(|s| s.sequence_number()) {
            page.last_sequence_number = Some(seq.to_string());
        }
        if let Some(t) = sr.and_then(|s| s.approximate_creation_date_time()).and_then(to_chrono) {
            page.newest_creation = Some(page.newest_creation.map_or(t, |n| n.max(t)));
        }
        if let Ok(event) = event_of(record) {
            counts[event as usize] += 1;
        }
        match decode_record(shard, record) {
            Ok(change) => page.changes.push(change),
            Err(err) => {
                metrics.stream_skipped_records.get_or_create(&SkipLabels { reason: err.reason().to_string() }).inc();
                // The item no longer fits, but its key does: a fresh load would leave it out, so
                // whatever is cached for it goes too.
                let removal = removal_of(shard, record, &err);
                tracing::warn!(
                    shard = %shard,
                    sequence_number = sr.and_then(|s| s.sequence_number()).unwrap_or("(none)"),
                    keys = %describe_keys(record),
                    reason = err.reason(),
                    "skipping a stream record that does not fit the model{}: {err}",
                    if removal.is_some() { " (its item is dropped from the cache)" } else { "" }
                );
                page.changes.extend(removal);
            }
        }
    }
    // One atomic add per event and page rather than per record: the family lookup takes a lock.
    for (event, n) in [StreamEvent::INSERT, StreamEvent::MODIFY, StreamEvent::REMOVE].into_iter().zip(counts) {
        if n > 0 {
            metrics.stream_records.get_or_create(&EventLabels { event }).inc_by(n);
        }
    }
    page
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodbstreams::types::StreamRecord;

    use super::*;
    use crate::model::{Item, Pk};

    const GROUP: &str = "5ae290ed-55d1-47a0-bc6d-fe2bc2700399";
    const USER: &str = "b3b2c7b0-7d5e-4f47-9a55-0b8d3a3cf7a1";
    const MSG: &str = "9d3c6a4e-0d8f-4a4c-8a36-8a3ab2c6c3d1";
    const SK: &str = "2024-05-01T10:00:00.123456+00:00";

    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.to_string())
    }

    fn message_image() -> HashMap<String, AttributeValue> {
        HashMap::from([
            ("pk".to_string(), s(&format!("MSG#{GROUP}"))),
            ("sk".to_string(), s(SK)),
            ("message_uuid".to_string(), s(MSG)),
            ("message".to_string(), s("hello")),
            ("user_uuid".to_string(), s(USER)),
            ("user_display_name".to_string(), s("Andrew Brown")),
            ("user_handle".to_string(), s("andrewbrown")),
        ])
    }

    fn keys_of(image: &HashMap<String, AttributeValue>) -> HashMap<String, AttributeValue> {
        image.iter().filter(|(k, _)| *k == "pk" || *k == "sk").map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn record(
        event: Option<OperationType>,
        keys: Option<HashMap<String, AttributeValue>>,
        new_image: Option<HashMap<String, AttributeValue>>,
    ) -> Record {
        let sr = StreamRecord::builder()
            .sequence_number("000000000000000000042")
            .set_keys(keys)
            .set_new_image(new_image)
            .approximate_creation_date_time(aws_smithy_types::DateTime::from_secs(1_714_557_600))
            .build();
        Record::builder().set_event_name(event).dynamodb(sr).build()
    }

    fn shard() -> ShardId {
        ShardId::from("shardId-1")
    }

    #[test]
    fn insert_with_new_image_is_an_upsert_of_the_decoded_item() {
        let image = message_image();
        let rec = record(Some(OperationType::Insert), Some(keys_of(&image)), Some(image.clone()));
        let change = decode_record(&shard(), &rec).unwrap();
        assert_eq!(change.event, StreamEvent::INSERT);
        assert_eq!(change.sequence_number, "000000000000000000042");
        assert_eq!(change.shard_id, "shardId-1");
        assert_eq!(change.approximate_creation.map(|t| t.timestamp()), Some(1_714_557_600));
        match change.change {
            Change::Upsert(Item::Message(m)) => {
                assert_eq!(m.group.to_string(), GROUP);
                assert_eq!(m.message_uuid.to_string(), MSG);
                assert_eq!(m.sk.as_str(), SK);
                assert_eq!(m.user_handle, "andrewbrown");
            }
            other => panic!("expected a message upsert, got {other:?}"),
        }
    }

    #[test]
    fn remove_is_decoded_from_the_keys() {
        let image = message_image();
        let rec = record(Some(OperationType::Remove), Some(keys_of(&image)), None);
        let change = decode_record(&shard(), &rec).unwrap();
        match change.change {
            Change::Remove(key) => {
                assert!(matches!(key.pk, Pk::Messages(g) if g.to_string() == GROUP));
                assert_eq!(key.sk.as_str(), SK);
            }
            other => panic!("expected a remove, got {other:?}"),
        }
    }

    #[test]
    fn keys_only_insert_and_modify_invalidate() {
        let image = message_image();
        for event in [OperationType::Insert, OperationType::Modify] {
            let rec = record(Some(event.clone()), Some(keys_of(&image)), None);
            let change = decode_record(&shard(), &rec).unwrap();
            assert!(matches!(change.change, Change::Invalidate(ref k) if k.sk.as_str() == SK), "{event:?}: {change:?}");
        }
    }

    #[test]
    fn records_that_do_not_fit_are_errors_with_a_reason() {
        let good = message_image();
        let mut unknown_pk = good.clone();
        unknown_pk.insert("pk".into(), s("USR#x"));
        let mut numeric_sk = good.clone();
        numeric_sk.insert("sk".into(), AttributeValue::N("12".into()));
        let mut no_user = good.clone();
        no_user.remove("user_uuid");
        let mut bad_sk = good.clone();
        bad_sk.insert("sk".into(), s("yesterday"));

        let cases = [
            (record(Some(OperationType::Insert), Some(keys_of(&unknown_pk)), Some(unknown_pk)), "unknown_pk"),
            (record(Some(OperationType::Modify), Some(keys_of(&numeric_sk)), Some(numeric_sk)), "wrong_type"),
            (record(Some(OperationType::Insert), Some(keys_of(&no_user)), Some(no_user)), "missing_attribute"),
            (record(Some(OperationType::Remove), Some(keys_of(&bad_sk)), None), "bad_sk"),
            (record(Some(OperationType::Remove), None, None), "missing_key"),
            (record(Some(OperationType::from("UPSERT")), Some(keys_of(&good)), Some(good.clone())), "unknown_event"),
            (record(None, Some(keys_of(&good)), Some(good.clone())), "unknown_event"),
            (Record::builder().event_name(OperationType::Insert).build(), "no_stream_record"),
        ];
        for (rec, reason) in cases {
            let err = decode_record(&shard(), &rec).expect_err(reason);
            assert_eq!(err.reason(), reason, "{err}");
        }
    }

    #[test]
    fn a_page_skips_bad_records_counts_them_and_keeps_the_rest_in_order() {
        let metrics = Metrics::new();
        let good = message_image();
        let mut bad = good.clone();
        bad.insert("pk".into(), s("USR#x"));
        let mut later = good.clone();
        later.insert("message".into(), s("later"));
        let mut records = vec![
            record(Some(OperationType::Insert), Some(keys_of(&good)), Some(good.clone())),
            record(Some(OperationType::Insert), Some(keys_of(&bad)), Some(bad)),
            record(Some(OperationType::Modify), Some(keys_of(&later)), Some(later)),
        ];
        for (i, r) in records.iter_mut().enumerate() {
            if let Some(sr) = r.dynamodb.as_mut() {
                sr.sequence_number = Some(format!("{:03}", i + 1));
            }
        }
        let page = decode_page(&shard(), &records, &metrics);
        let seqs: Vec<&str> = page.changes.iter().map(|c| c.sequence_number.as_str()).collect();
        assert_eq!(seqs, ["001", "003"]);
        assert_eq!(page.last_sequence_number.as_deref(), Some("003"), "a skipped record still moves the position");
        let text = metrics.encode();
        assert!(text.contains(r#"stream_skipped_records_total{reason="unknown_pk"} 1"#), "{text}");
        assert!(text.contains(r#"stream_records_total{event="INSERT"} 2"#), "{text}");
        assert!(text.contains(r#"stream_records_total{event="MODIFY"} 1"#), "{text}");
    }

    #[test]
    fn an_image_that_no_longer_fits_removes_its_key() {
        let metrics = Metrics::new();
        let mut broken = message_image();
        broken.remove("message");
        let mut r = record(Some(OperationType::Modify), Some(keys_of(&broken)), Some(broken));
        if let Some(sr) = r.dynamodb.as_mut() {
            sr.sequence_number = Some("007".into());
        }
        let page = decode_page(&shard(), &[r], &metrics);
        assert_eq!(page.changes.len(), 1);
        assert_eq!(page.changes[0].sequence_number, "007");
        let Change::Remove(key) = &page.changes[0].change else { panic!("{:?}", page.changes[0]) };
        assert_eq!((key.pk.to_string(), key.sk.as_str()), (format!("MSG#{GROUP}"), SK));
        assert!(metrics.encode().contains(r#"stream_skipped_records_total{reason="missing_attribute"} 1"#));
    }

    #[test]
    fn keys_are_rendered_for_logs_whatever_their_type() {
        let keys = HashMap::from([("pk".to_string(), s("USR#x")), ("sk".to_string(), AttributeValue::N("12".into()))]);
        assert_eq!(render_keys(&keys), r#"pk=S:"USR#x" sk=N:"12""#);
    }
}
