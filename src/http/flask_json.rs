//! JSON exactly as the Flask app sends it, so the daemon is a drop-in for its routes: Flask's
//! default provider sorts keys, escapes everything outside printable ASCII (`ensure_ascii`,
//! surrogate pairs included), uses compact separators and ends the body with a newline.

use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};

use crate::model::ApiEntry;

/// An API entry with its fields in Flask's (sorted) order.
#[derive(Serialize)]
struct Sorted<'a> {
    created_at: &'a str,
    display_name: &'a str,
    handle: &'a str,
    message: &'a str,
    uuid: &'a str,
}

/// The body of a list response.
pub(crate) fn body(entries: &[ApiEntry<'_>]) -> Vec<u8> {
    let sorted: Vec<Sorted> = entries
        .iter()
        .map(|e| Sorted {
            created_at: e.created_at,
            display_name: e.display_name,
            handle: e.handle,
            message: e.message,
            uuid: &e.uuid,
        })
        .collect();
    let mut out = Vec::with_capacity(64 + entries.len() * 256);
    let mut ser = Serializer::with_formatter(&mut out, AsciiOnly);
    // Serializing &str fields into a Vec cannot fail.
    let _ = sorted.serialize(&mut ser);
    out.push(b'\n');
    out
}

/// Python's `json.dumps(ensure_ascii=True)` escaping.
struct AsciiOnly;

impl Formatter for AsciiOnly {
    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        let mut start = 0;
        for (i, ch) in fragment.char_indices() {
            if (' '..='~').contains(&ch) {
                continue;
            }
            w.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            start = i + ch.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + io::Write>(&mut self, w: &mut W, escape: CharEscape) -> io::Result<()> {
        // Same as serde_json's, except the lower-case hex Python writes for control characters.
        let s: &[u8] = match escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"\\/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => return write!(w, "\\u{byte:04x}"),
        };
        w.write_all(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_flask_byte_for_byte() {
        let e = ApiEntry {
            uuid: "u".into(),
            display_name: "Ä \"q\"",
            handle: "h",
            message: "m\u{7f}\u{2603} \u{1F600}\n\u{1}",
            created_at: "c",
        };
        // What Flask 3.1's app.json.response() returned for the same list.
        let flask = "[{\"created_at\":\"c\",\"display_name\":\"\\u00c4 \\\"q\\\"\",\"handle\":\"h\",\"message\":\"m\\u007f\\u2603 \\ud83d\\ude00\\n\\u0001\",\"uuid\":\"u\"}]\n";
        assert_eq!(String::from_utf8(body(&[e])).unwrap(), flask);
        assert_eq!(body(&[]), b"[]\n");
    }
}
