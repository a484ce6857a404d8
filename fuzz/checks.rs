//! What each fuzz target checks, shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and by
//! `tests/it/fuzz_regressions.rs`, which replays every kept input (`tests/fixtures/fuzz/<target>/`)
//! in the normal test suite. A check returns normally for any input the code handles correctly
//! and panics, naming the property, when it does not.
//!
//! The targets parse what arrives from outside the process:
//! - `stream_record`: DynamoDB Streams records, in the JSON shape of GetRecords, decoded into the
//!   model (anything a table can hold arrives this way);
//! - `sk_parse`: sort-key timestamps in every spelling, and their ordering;
//! - `cursor`: the `before` cursors a client sends back;
//! - `jwt`: the `Authorization` header and the token's header and claims, before and after the
//!   signature check (inputs of the second kind are signed with the test key, so the claims are
//!   reached).
#![allow(dead_code)]

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, Record, StreamRecord};
use aws_smithy_types::Blob;
use base64::Engine as _;
use chrono::{DateTime, Datelike, Utc};
use cruddur_syncd::config::{AuthConfig, TokenUse};
use cruddur_syncd::http::auth::Authenticator;
use cruddur_syncd::http::cursor;
use cruddur_syncd::metrics::Metrics;
use cruddur_syncd::model::{decode_item, Item, MessageGroupId, Pk, Sk};
use cruddur_syncd::stream::decode::{decode_page, decode_record, describe_keys};
use cruddur_syncd::stream::{Change, ChangeRecord, ShardId};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// stream_record

/// Input: one record or an array of records (a page), as GetRecords returns them:
/// `{"eventName": "INSERT", "dynamodb": {"Keys": {..}, "NewImage": {..}, "OldImage": {..},
/// "SequenceNumber": "..", "ApproximateCreationDateTime": 1714557600.5}}`, attribute values as
/// `{"S": ".."}`, `{"N": ".."}`, `{"M": {..}}` and so on. Parts of the wrong JSON type are left
/// out, as if absent.
pub fn stream_record(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
    let records: Vec<Record> = match &value {
        Value::Array(page) => page.iter().map(record_from_json).collect(),
        one => vec![record_from_json(one)],
    };
    let shard = ShardId::from("shardId-fuzz");
    let metrics = Metrics::new();
    let page = decode_page(&shard, &records, &metrics);

    let mut decoded = Vec::new();
    for record in &records {
        assert!(!describe_keys(record).is_empty());
        match decode_record(&shard, record) {
            Ok(change) => {
                check_change(record, &change);
                decoded.push(change);
            }
            Err(err) => assert!(!err.reason().is_empty() && !err.to_string().is_empty()),
        }
    }
    assert_eq!(page.changes, decoded, "a page decodes to its decodable records, in order");
    let last = records.iter().rev().find_map(|r| r.dynamodb().and_then(|d| d.sequence_number()));
    assert_eq!(page.last_sequence_number.as_deref(), last, "reading resumes after the page's last record");
    assert!(metrics.encode().contains("stream_records"));
}

fn check_change(record: &Record, change: &ChangeRecord) {
    assert_eq!(Some(change.sequence_number.as_str()), record.dynamodb().and_then(|d| d.sequence_number()));
    match &change.change {
        Change::Upsert(item) => {
            // What the stream decoded must read back the same from the item this tool would
            // write (the DynamoDB SDK's types, the Query path the cache loads through).
            let written = match item {
                Item::Group(g) => g.to_item(),
                Item::Message(m) => m.to_item(),
            };
            assert_eq!(decode_item(&written).as_ref(), Ok(item), "stream decode and Query decode disagree");
            let entry = match item {
                Item::Group(g) => g.api_entry(),
                Item::Message(m) => m.api_entry(),
            };
            assert!(serde_json::to_string(&entry).is_ok());
        }
        Change::Remove(key) | Change::Invalidate(key) => {
            assert_eq!(Pk::parse(&key.pk.to_string()), Ok(key.pk), "a pk renders to what parses back to it");
            assert_eq!(Sk::parse(key.sk.as_str()).as_ref(), Ok(&key.sk));
        }
    }
}

fn record_from_json(v: &Value) -> Record {
    let event = v.get("eventName").and_then(Value::as_str).map(OperationType::from);
    let dynamodb = v.get("dynamodb").filter(|d| d.is_object()).map(|d| {
        let image = |name: &str| d.get(name).and_then(Value::as_object).map(attr_map);
        StreamRecord::builder()
            .set_keys(image("Keys"))
            .set_new_image(image("NewImage"))
            .set_old_image(image("OldImage"))
            .set_sequence_number(d.get("SequenceNumber").and_then(Value::as_str).map(str::to_owned))
            .set_approximate_creation_date_time(d.get("ApproximateCreationDateTime").and_then(smithy_time))
            .build()
    });
    Record::builder().set_event_name(event).set_dynamodb(dynamodb).build()
}

fn smithy_time(v: &Value) -> Option<aws_smithy_types::DateTime> {
    if let Some(secs) = v.as_i64() {
        return Some(aws_smithy_types::DateTime::from_secs(secs));
    }
    let f = v.as_f64()?;
    // Whole seconds and nanoseconds, clamped so the harness itself cannot panic.
    let secs = f.floor().clamp(i64::MIN as f64, i64::MAX as f64) as i64;
    let nanos = ((f - f.floor()) * 1e9).clamp(0.0, 999_999_999.0) as u32;
    Some(aws_smithy_types::DateTime::from_secs_and_nanos(secs, nanos))
}

fn attr_map(m: &serde_json::Map<String, Value>) -> HashMap<String, AttributeValue> {
    m.iter().filter_map(|(k, v)| Some((k.clone(), attr(v)?))).collect()
}

fn attr(v: &Value) -> Option<AttributeValue> {
    let (kind, v) = v.as_object()?.iter().next()?;
    let strings = |a: &Vec<Value>| a.iter().filter_map(Value::as_str).map(str::to_owned).collect::<Vec<_>>();
    Some(match (kind.as_str(), v) {
        ("S", Value::String(s)) => AttributeValue::S(s.clone()),
        ("N", Value::String(s)) => AttributeValue::N(s.clone()),
        ("B", Value::String(s)) => AttributeValue::B(Blob::new(s.as_bytes())),
        ("BOOL", Value::Bool(b)) => AttributeValue::Bool(*b),
        ("NULL", Value::Bool(b)) => AttributeValue::Null(*b),
        ("SS", Value::Array(a)) => AttributeValue::Ss(strings(a)),
        ("NS", Value::Array(a)) => AttributeValue::Ns(strings(a)),
        ("BS", Value::Array(a)) => {
            AttributeValue::Bs(strings(a).into_iter().map(|s| Blob::new(s.into_bytes())).collect())
        }
        ("L", Value::Array(a)) => AttributeValue::L(a.iter().filter_map(attr).collect()),
        ("M", Value::Object(m)) => AttributeValue::M(attr_map(m)),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// sk_parse

/// Input: UTF-8 text. The whole text, and the two halves around the first newline, are each
/// parsed; the halves are also compared with each other.
pub fn sk_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (a, b) = text.split_once('\n').unwrap_or((text, ""));
    for s in [text, a, b] {
        check_sk(s);
    }
    if let (Ok(x), Ok(y)) = (Sk::parse(a), Sk::parse(b)) {
        assert_eq!(x.cmp(&y), y.cmp(&x).reverse(), "order is antisymmetric: {a:?} vs {b:?}");
        assert_eq!(x.cmp(&y) == Ordering::Equal, x == y, "Ord agrees with Eq: {a:?} vs {b:?}");
        if x.instant() != y.instant() {
            assert_eq!(x.cmp(&y), x.instant().cmp(&y.instant()), "order is by instant: {a:?} vs {b:?}");
        }
    }
}

fn check_sk(s: &str) {
    let Ok(sk) = Sk::parse(s) else { return };
    assert_eq!(sk.as_str(), s, "the raw spelling is kept");
    assert_eq!(Sk::parse(s).as_ref(), Ok(&sk), "parsing is deterministic");
    // The canonical spelling of the instant (what this tool writes) parses back to itself and
    // names the same instant, to the microsecond.
    let canonical = Sk::from_instant(sk.instant());
    let again = Sk::parse(canonical.as_str())
        .unwrap_or_else(|e| panic!("the canonical spelling {:?} of {s:?} does not parse: {e}", canonical.as_str()));
    assert_eq!(again, canonical, "canonical spelling of {s:?}");
    assert_eq!(canonical.instant(), micros(sk.instant()), "canonical spelling of {s:?} names another instant");
    if (0..=9999).contains(&sk.instant().year()) {
        let c = canonical.as_str();
        assert!(c.len() == 32 && c.ends_with("+00:00") && c.as_bytes()[26] == b'+', "not the canonical shape: {c:?}");
    }
}

fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.timestamp_subsec_nanos();
    t - chrono::Duration::nanoseconds(i64::from(nanos % 1000))
}

// ---------------------------------------------------------------------------------------------
// cursor

/// Input: UTF-8 text, taken as a `before` cursor and as a sort key to build cursors from.
pub fn cursor(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(sk) = cursor::decode_message(text) {
        assert_eq!(cursor::decode_message(&cursor::encode_message(&sk)).as_ref(), Some(&sk));
        assert_eq!(cursor::decode_group(text), None, "a message cursor is not a group cursor");
    }
    if let Some((sk, group)) = cursor::decode_group(text) {
        assert_eq!(cursor::decode_group(&cursor::encode_group(&sk, group)), Some((sk, group)));
    }
    // Any sort key a table holds ends up in a `Link` header: the server must accept its own
    // cursors back.
    if let Ok(sk) = Sk::parse(text) {
        let m = cursor::encode_message(&sk);
        assert_eq!(cursor::decode_message(&m).as_ref(), Some(&sk), "message cursor {m:?} of sk {text:?} is refused");
        let group = MessageGroupId(uuid::Uuid::from_u128(u128::from(data.len() as u64) << 64 | 7));
        let g = cursor::encode_group(&sk, group);
        assert_eq!(cursor::decode_group(&g), Some((sk, group)), "group cursor {g:?} of sk {text:?} is refused");
    }
}

// ---------------------------------------------------------------------------------------------
// jwt

const TEST_PEM: &[u8] = include_bytes!("../tests/fixtures/test-rsa.pem");
const TEST_JWKS: &[u8] = include_bytes!("../tests/fixtures/test-rsa-jwks.json");
const ISSUER: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_fuzz";
const CLIENT_ID: &str = "client-1";

struct JwtHarness {
    rt: tokio::runtime::Runtime,
    auth: Authenticator,
    key: jsonwebtoken::EncodingKey,
}

fn jwt_harness() -> &'static JwtHarness {
    static H: OnceLock<JwtHarness> = OnceLock::new();
    H.get_or_init(|| {
        let cfg = AuthConfig {
            user_pool_id: "us-east-1_fuzz".into(),
            client_id: CLIENT_ID.into(),
            issuer: ISSUER.into(),
            // Nothing listens there: an unknown kid fails its (rate-limited) refetch at once.
            jwks_url: "http://127.0.0.1:9/jwks.json".into(),
            // Both kinds, so both the client_id and the aud paths are reached.
            token_use: TokenUse::Any,
            ..AuthConfig::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let auth = rt
            .block_on(async { Authenticator::builder(&cfg, reqwest::Client::new()).jwks(TEST_JWKS).map(|b| b.build()) })
            .expect("jwks");
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(TEST_PEM).expect("test key");
        JwtHarness { rt, auth, key }
    })
}

/// Input: `r<header value>`: a raw `Authorization` header value (also tried after `Bearer `);
/// nothing unsigned may verify. `s<token header JSON>\0<claims JSON>`: a token signed with the
/// test key whose header and claims are the input; when it verifies, every rule of SPEC
/// section 5 must hold for those claims.
pub fn jwt(data: &[u8]) {
    let h = jwt_harness();
    match data.split_first() {
        Some((b's', rest)) => {
            let (header, claims) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &b""[..]),
            };
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let message = format!("{}.{}", b64(header), b64(claims));
            let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &h.key, jsonwebtoken::Algorithm::RS256)
                .expect("signing with the test key");
            let token = format!("{message}.{signature}");
            match h.rt.block_on(h.auth.verify(Some(&format!("Bearer {token}")))) {
                Ok(v) => check_accepted(header, claims, v.sub.as_str()),
                Err(e) => assert!(!e.is_unavailable(), "a refused token is a 401, not a 503: {e:?}"),
            }
        }
        _ => {
            let raw = String::from_utf8_lossy(data.strip_prefix(b"r").unwrap_or(data));
            for value in [raw.to_string(), format!("Bearer {raw}")] {
                if let Ok(v) = h.rt.block_on(h.auth.verify(Some(&value))) {
                    panic!("an unsigned header value verified as {:?}: {value:?}", v.sub);
                }
            }
        }
    }
}

/// The token was accepted: its header and claims must say so.
fn check_accepted(header: &[u8], claims: &[u8], sub: &str) {
    let header: Value = serde_json::from_slice(header).expect("an accepted token's header is JSON");
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], "test-key");
    let c: Value = serde_json::from_slice(claims).expect("an accepted token's claims are JSON");
    assert_eq!(c["sub"].as_str(), Some(sub), "sub");
    assert!(!sub.is_empty(), "an empty sub was accepted");
    assert_eq!(c["iss"], ISSUER, "iss");
    match c["token_use"].as_str() {
        Some("access") => assert_eq!(c["client_id"], CLIENT_ID, "client_id of an access token"),
        Some("id") => {
            let aud_ok = match &c["aud"] {
                Value::String(a) => a == CLIENT_ID,
                Value::Array(all) => all.iter().any(|a| a == CLIENT_ID),
                _ => false,
            };
            assert!(aud_ok, "aud of an id token: {c}");
        }
        other => panic!("token_use {other:?} was accepted"),
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
    let exp = c["exp"].as_f64().expect("an accepted token has a numeric exp");
    assert!(exp + 60.0 >= now, "an expired token (exp {exp}) was accepted");
    if let Some(nbf) = c.get("nbf") {
        let nbf = nbf.as_f64().expect("an accepted token's nbf is numeric");
        assert!(nbf - 60.0 <= now, "a token not valid before {nbf} was accepted");
    }
}
