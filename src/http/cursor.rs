//! The opaque `before` cursors of the `Link: rel="next"` header. They carry the position of
//! the last item of a page; clients must not build them, and anything that does not decode is
//! a 400, never a 500.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::model::{MessageGroupId, Sk};

/// Longest cursor accepted; ours are under 200 characters.
const MAX_LEN: usize = 512;

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
        for bad in ["", "!!!", "bTF8", &"A".repeat(600), "bTF8bm90LWEtdGltZQ"] {
            assert_eq!(decode_message(bad), None, "{bad}");
            assert_eq!(decode_group(bad), None, "{bad}");
        }
    }
}
