//! Duplicate keys in a JSON object, which QEMU refuses and serde_json hides.
//!
//! QEMU's JSON parser refuses `{"a": 1, "a": 2}` with "JSON parse error, duplicate
//! key" (`qobject/json-parser.c`, `parse_pair()`, the same in 7.2 and 10.0);
//! serde_json silently keeps the last value. A gateway that let such a message
//! through after checking one value would have QEMU refuse it, and one that
//! re-serialised it would send something the client did not mean; either way the
//! policy and QEMU would not read the same message. [`find_duplicate_key`] finds
//! what QEMU would refuse, with a scanner over the raw text that is linear in its
//! length.
//!
//! Layout: [`find_duplicate_key`] and its result [`DuplicateKey`];
//! [`DUPLICATE_KEY_DESC`], QEMU's text; private: the scanner's container stack and
//! the string decoder.

use std::collections::HashSet;

/// QEMU's error `desc` for a duplicate key (class `GenericError`, no `id`: it is a
/// parse error, reported before QEMU knows the message's id).
pub const DUPLICATE_KEY_DESC: &str = "JSON parse error, duplicate key";

/// A key that appears twice in one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// The key, decoded (escapes resolved), lossily as UTF-8: for logs only.
    pub key: String,
    /// Byte offset of the second occurrence's opening quote.
    pub offset: usize,
}

/// One open container.
enum Container {
    Array,
    Object {
        /// The keys of completed pairs, decoded.
        keys: HashSet<Vec<u8>>,
        /// The current pair's key and its offset, until its value ends: QEMU checks
        /// for a duplicate only after parsing the value, so a duplicate inside the
        /// value is the one reported.
        pending: Option<(Vec<u8>, usize)>,
        /// After `{` or `,`: the next string is a key.
        expect_key: bool,
    },
}

/// Finds the first key that QEMU's parser would refuse as a duplicate, in QEMU's
/// order: keys are compared after decoding (`"a"`, `'a'` and `"\u0061"` are the
/// same key), and a duplicate within a pair's value is found before the pair's own.
///
/// `bytes` is QMP input: JSON with QEMU's single-quoted strings allowed. Input that
/// is not JSON gives no promise beyond linear time and no panic: the parser that
/// reads it refuses it. The container stack lives on the heap, so deep nesting
/// costs memory proportional to the input, never the call stack.
pub fn find_duplicate_key(bytes: &[u8]) -> Option<DuplicateKey> {
    let mut stack: Vec<Container> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        match byte {
            b'"' | b'\'' => {
                let start = i;
                let (decoded, end) = decode_string(bytes, i);
                i = end;
                if let Some(Container::Object {
                    pending,
                    expect_key,
                    ..
                }) = stack.last_mut()
                    && *expect_key
                {
                    *pending = Some((decoded, start));
                    *expect_key = false;
                }
                continue;
            }
            b'{' => stack.push(Container::Object {
                keys: HashSet::new(),
                pending: None,
                expect_key: true,
            }),
            b'[' => stack.push(Container::Array),
            b',' => {
                if let Some(Container::Object {
                    keys,
                    pending,
                    expect_key,
                }) = stack.last_mut()
                {
                    if let Some(duplicate) = complete_pair(keys, pending) {
                        return Some(duplicate);
                    }
                    *expect_key = true;
                }
            }
            b'}' => {
                if let Some(Container::Object { keys, pending, .. }) = stack.last_mut()
                    && let Some(duplicate) = complete_pair(keys, pending)
                {
                    return Some(duplicate);
                }
                stack.pop();
            }
            b']' => {
                stack.pop();
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Ends the current pair of an object: its key joins the object's keys, unless it
/// is already there.
fn complete_pair(
    keys: &mut HashSet<Vec<u8>>,
    pending: &mut Option<(Vec<u8>, usize)>,
) -> Option<DuplicateKey> {
    let (key, offset) = pending.take()?;
    if keys.contains(&key) {
        return Some(DuplicateKey {
            key: String::from_utf8_lossy(&key).into_owned(),
            offset,
        });
    }
    keys.insert(key);
    None
}

/// Decodes the string whose opening quote is at `start`, as QEMU's
/// `parse_string()` does, and returns it with the offset just past the closing
/// quote (or the end of input). An invalid escape is kept as written: the parser
/// refuses it anyway.
fn decode_string(bytes: &[u8], start: usize) -> (Vec<u8>, usize) {
    let quote = bytes[start];
    let mut out = Vec::new();
    let mut i = start + 1;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == quote {
            return (out, i + 1);
        }
        if byte != b'\\' {
            out.push(byte);
            i += 1;
            continue;
        }
        let Some(&escape) = bytes.get(i + 1) else {
            out.push(byte);
            return (out, bytes.len());
        };
        let simple = match escape {
            b'"' => Some(b'"'),
            b'\'' => Some(b'\''),
            b'\\' => Some(b'\\'),
            b'/' => Some(b'/'),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            _ => None,
        };
        if let Some(decoded) = simple {
            out.push(decoded);
            i += 2;
            continue;
        }
        if escape == b'u'
            && let Some((c, len)) = decode_unicode_escape(&bytes[i..])
        {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            i += len;
            continue;
        }
        // An invalid escape: keep the backslash; the next byte is read normally.
        out.push(byte);
        i += 1;
    }
    (out, bytes.len())
}

/// `\uXXXX`, or a surrogate pair `\uD83D\uDE00`, at the start of `bytes`: the
/// character and how many bytes it took. `None` for what QEMU refuses (bad hex, a
/// lone surrogate).
fn decode_unicode_escape(bytes: &[u8]) -> Option<(char, usize)> {
    let high = hex4(bytes.get(2..6)?)?;
    if (0xD800..=0xDBFF).contains(&high) {
        if bytes.get(6..8)? != b"\\u" {
            return None;
        }
        let low = hex4(bytes.get(8..12)?)?;
        if !(0xDC00..=0xDFFF).contains(&low) {
            return None;
        }
        let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
        return Some((char::from_u32(code)?, 12));
    }
    Some((char::from_u32(high)?, 6))
}

fn hex4(digits: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(digits).ok()?;
    if text.len() != 4 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(text: &str) -> Option<(String, usize)> {
        find_duplicate_key(text.as_bytes()).map(|d| (d.key, d.offset))
    }

    #[test]
    fn a_repeated_key_is_found_at_its_second_occurrence() {
        assert_eq!(duplicate(r#"{"a":1,"a":2}"#), Some(("a".into(), 7)));
        assert_eq!(
            duplicate(r#"{"execute":"query-status","arguments":{"x":1,"x":2}}"#),
            Some(("x".into(), 45))
        );
    }

    #[test]
    fn distinct_keys_and_keys_of_different_objects_are_fine() {
        assert_eq!(duplicate(r#"{"a":1,"b":{"a":2}}"#), None);
        assert_eq!(duplicate(r#"[{"a":1},{"a":1}]"#), None);
        assert_eq!(duplicate(r#"{"a":1}{"a":1}"#), None);
        assert_eq!(duplicate(r#"{}"#), None);
        assert_eq!(duplicate(r#""a""#), None);
    }

    #[test]
    fn string_values_are_not_keys() {
        assert_eq!(duplicate(r#"{"a":"a","b":"a"}"#), None);
        assert_eq!(duplicate(r#"{"a":["b","b"],"b":1}"#), None);
    }

    #[test]
    fn structure_inside_strings_is_ignored() {
        assert_eq!(duplicate(r#"{"a":"},{\"a\":1","b":1}"#), None);
        assert_eq!(
            duplicate(r#"{"a\"b":1,"a\"b":2}"#),
            Some(("a\"b".into(), 10))
        );
    }

    #[test]
    fn keys_are_compared_after_decoding() {
        assert_eq!(duplicate(r#"{"a":1,"\u0061":2}"#), Some(("a".into(), 7)));
        assert_eq!(duplicate(r#"{'a':1,"a":2}"#), Some(("a".into(), 7)));
        assert_eq!(
            duplicate(r#"{"it's":1,'it\'s':2}"#),
            Some(("it's".into(), 10))
        );
        assert_eq!(
            duplicate("{\"\\ud83d\\ude00\":1,\"\u{1F600}\":2}"),
            Some(("\u{1F600}".into(), 18))
        );
        assert_eq!(duplicate(r#"{"a\/b":1,"a/b":2}"#), Some(("a/b".into(), 10)));
    }

    #[test]
    fn a_duplicate_in_a_value_is_found_before_the_pairs_own_as_qemu_does() {
        assert_eq!(
            duplicate(r#"{"a":1,"a":{"b":1,"b":2}}"#),
            Some(("b".into(), 18))
        );
    }

    #[test]
    fn broken_input_neither_panics_nor_recurses() {
        for text in [
            "{\"a",
            "{\"a\\",
            "}}]]",
            "{\"\\u12",
            "{'a':1,'a",
            "{\"a\":1,\"a\"",
        ] {
            let _ = duplicate(text);
        }
        let deep = "[".repeat(1 << 20);
        assert_eq!(duplicate(&deep), None);
    }

    #[test]
    fn many_keys_are_checked_in_linear_time() {
        let pairs: Vec<String> = (0..100_000).map(|i| format!("\"k{i}\":{i}")).collect();
        let text = format!("{{{}}}", pairs.join(","));
        assert_eq!(duplicate(&text), None);
        let text = format!("{{{},\"k5\":0}}", pairs.join(","));
        assert_eq!(duplicate(&text).map(|(key, _)| key), Some("k5".into()));
    }
}
