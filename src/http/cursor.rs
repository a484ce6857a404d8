//! The opaque `before` cursors of the `Link: rel="next"` header. They carry the position of
//! the last item of a page; clients must not build them, and anything that does not decode is
//! a 400, never a 500.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::model::{MessageGroupId, Sk, MAX_SK_BYTES};

/// Longest cursor accepted: the longest this server hands out, a group cursor
/// (`g1|<uuid>|<sk>`, base64) of the longest sk DynamoDB can hold. Usual ones are under 100
/// characters, but an sk is kept as stored, surrounding whitespace included, and the server must
/// accept every cursor it gave out (found by fuzzing: a padded sk made a cursor over the old
/// limit of 512, so its next page was a 400).
pub(crate) const MAX_LEN: usize = (3 + 36 + 1 + MAX_SK_BYTES).div_ceil(3) * 4;

/// Where a page of messages ends: everything older than this sk comes next.
pub fn encode_message(sk: &Sk) -> String {
    URL_SAFE_NO_PAD.encode(format!("m1|{sk}"))
}

pub fn decode_message(cursor: &str) -> Option<Sk> {
    let text = decode(cursor)?;
    Sk::parse(text.strip_prefix("m1|")?).ok()
}

/// Where a page of conversations ends: a sk and, for rows at the same time, the group id.
pub fn encode_group(sk: &Sk, group: MessageGroupId) -> String {
    URL_SAFE_NO_PAD.encode(format!("g1|{group}|{sk}"))
}

pub fn decode_group(cursor: &str) -> Option<(Sk, MessageGroupId)> {
    let text = decode(cursor)?;
    let (group, sk) = text.strip_prefix("g1|")?.split_once('|')?;
    Some((Sk::parse(sk).ok()?, group.parse().ok()?))
}

fn decode(cursor: &str) -> Option<String> {
    if cursor.is_empty() || cursor.len() > MAX_LEN {
        return None;
    }
    String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let sk = Sk::parse("2024-01-01T00:00:00.123456+00:00").unwrap();
        assert_eq!(decode_message(&encode_message(&sk)), Some(sk.clone()));
        let g = MessageGroupId(uuid::Uuid::from_u128(7));
        assert_eq!(decode_group(&encode_group(&sk, g)), Some((sk.clone(), g)));
        assert_eq!(decode_message(&encode_group(&sk, g)), None, "a group cursor is not a message cursor");
        // The longest sk a table can hold still makes a cursor that is accepted back.
        let padded = format!("{:<width$}", "2024-01-01T00:00:00", width = MAX_SK_BYTES);
        let longest = Sk::parse(&padded).unwrap();
        assert_eq!(decode_group(&encode_group(&longest, g)), Some((longest.clone(), g)));
        assert_eq!(decode_message(&encode_message(&longest)), Some(longest));
        assert!(Sk::parse(&format!("{padded} ")).is_err(), "longer than DynamoDB allows");
        for bad in ["", "!!!", "bTF8", &"A".repeat(MAX_LEN + 1), "bTF8bm90LWEtdGltZQ"] {
            assert_eq!(decode_message(bad), None, "{bad}");
            assert_eq!(decode_group(bad), None, "{bad}");
        }
    }
}
