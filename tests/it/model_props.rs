//! Property tests: timestamp parsing in every spelling found in the wild, and item decoding.

use chrono::{DateTime, Duration, FixedOffset, TimeZone, Utc};
use cruddur_syncd::model::{decode_item, Item, Message, MessageGroup, MessageGroupId, MessageId, Sk, UserUuid};
use proptest::prelude::*;
use uuid::Uuid;

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    // 2000..2100, microsecond precision (what Python writes).
    (946_684_800i64..4_102_444_800i64, 0u32..1_000_000).prop_map(|(s, us)| Utc.timestamp_opt(s, us * 1000).unwrap())
}

/// Every spelling of an instant the SPEC says must be accepted, with the instant it names.
fn spelling() -> impl Strategy<Value = (String, DateTime<Utc>)> {
    (instant(), -14 * 60..=14 * 60i32, 0..6usize).prop_map(|(t, offset_min, style)| {
        let off = FixedOffset::east_opt(offset_min * 60).unwrap();
        let local = t.with_timezone(&off);
        let whole = t - Duration::nanoseconds(t.timestamp_subsec_nanos() as i64);
        match style {
            0 => (local.format("%Y-%m-%dT%H:%M:%S%.6f%:z").to_string(), t),
            1 => (t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(), t), // naive = UTC
            2 => (local.format("%Y-%m-%dT%H:%M:%S%:z").to_string(), whole),
            3 => (t.format("%Y-%m-%dT%H:%M:%S").to_string(), whole),
            4 => (
                t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                t - Duration::nanoseconds((t.timestamp_subsec_nanos() % 1_000_000) as i64),
            ),
            _ => (local.format("%Y-%m-%d %H:%M:%S%.6f%z").to_string(), t),
        }
    })
}

proptest! {
    #[test]
    fn any_spelling_parses_to_its_instant((raw, expected) in spelling()) {
        let sk = Sk::parse(&raw).unwrap();
        prop_assert_eq!(sk.instant(), expected);
        prop_assert_eq!(sk.as_str(), raw.as_str());
    }

    #[test]
    fn order_follows_the_instant((a, ta) in spelling(), (b, tb) in spelling()) {
        let (a, b) = (Sk::parse(&a).unwrap(), Sk::parse(&b).unwrap());
        if ta != tb {
            prop_assert_eq!(a.cmp(&b), ta.cmp(&tb));
        }
    }

    #[test]
    fn canonical_form_round_trips(t in instant()) {
        let sk = Sk::from_instant(t);
        prop_assert_eq!(sk.as_str().len(), "2023-04-20T22:23:36.123456+00:00".len());
        prop_assert!(sk.as_str().ends_with("+00:00"));
        prop_assert_eq!(Sk::parse(sk.as_str()).unwrap(), sk.clone());
        prop_assert_eq!(sk.instant(), t);
    }

    #[test]
    fn arbitrary_strings_never_panic(s in ".{0,80}") {
        let _ = Sk::parse(&s);
    }

    #[test]
    fn items_round_trip_through_dynamodb_attributes(
        t in instant(), owner in any::<u128>(), other in any::<u128>(), group in any::<u128>(),
        text in ".{0,200}", name in "[A-Za-z ]{1,30}", handle in "[a-z0-9_]{1,20}", is_group in any::<bool>()
    ) {
        let sk = Sk::from_instant(t);
        let item = if is_group {
            Item::Group(MessageGroup {
                owner: UserUuid(Uuid::from_u128(owner)), sk, message_group_uuid: MessageGroupId(Uuid::from_u128(group)),
                message: text, user_uuid: UserUuid(Uuid::from_u128(other)), user_display_name: name, user_handle: handle,
            })
        } else {
            Item::Message(Message {
                group: MessageGroupId(Uuid::from_u128(group)), sk, message_uuid: MessageId(Uuid::from_u128(owner)),
                message: text, user_uuid: UserUuid(Uuid::from_u128(other)), user_display_name: name, user_handle: handle,
            })
        };
        let attrs = match &item { Item::Group(g) => g.to_item(), Item::Message(m) => m.to_item() };
        prop_assert_eq!(decode_item(&attrs).unwrap(), item);
    }
}

#[test]
fn misfits_are_named() {
    use aws_sdk_dynamodb::types::AttributeValue as V;
    use std::collections::HashMap;
    let good: HashMap<String, V> = Message {
        group: MessageGroupId(Uuid::nil()),
        sk: Sk::parse("2024-01-01T00:00:00").unwrap(),
        message_uuid: MessageId(Uuid::nil()),
        message: "hi".into(),
        user_uuid: UserUuid(Uuid::nil()),
        user_display_name: "A".into(),
        user_handle: "a".into(),
    }
    .to_item();
    let with = |k: &str, v: Option<V>| {
        let mut m = good.clone();
        match v {
            Some(v) => m.insert(k.to_string(), v),
            None => m.remove(k),
        };
        decode_item(&m).unwrap_err().to_string()
    };
    assert_eq!(with("pk", None), "attribute pk is missing");
    assert_eq!(with("sk", Some(V::N("1".into()))), "attribute sk is of type N, expected S");
    assert!(with("pk", Some(V::S("USR#x".into()))).contains("neither GRP#<uuid> nor MSG#<uuid>"));
    assert!(with("sk", Some(V::S("tomorrow".into()))).contains("not an ISO 8601 timestamp"));
    assert!(with("message_uuid", Some(V::S("42".into()))).contains("not a uuid"));
}
