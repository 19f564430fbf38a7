//! The writer: values as QEMU's monitor prints them, keys in QDict's order.

use serde_json::{Map, Value};

/// QEMU's QDict bucket for a key (qdict.c's `tdb_hash` modulo 512): QEMU writes
/// an object's members bucket by bucket.
pub fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add((b as u32) << ((i as u32 * 5) % 24));
    }
    1103515243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// The keys of `object` in the order QEMU iterates them: by bucket, and within a
/// bucket the latest inserted first (as QEMU builds a dict it parses).
pub fn qdict_order(object: &Map<String, Value>) -> Vec<&String> {
    by_bucket(object, true)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// `object`'s members sorted by QDict bucket; within a bucket the latest first or
/// in `object`'s order.
fn by_bucket(object: &Map<String, Value>, latest_first: bool) -> Vec<(&String, &Value)> {
    let mut members: Vec<(u32, usize, (&String, &Value))> = object
        .iter()
        .enumerate()
        .map(|(i, member)| {
            let rank = if latest_first { usize::MAX - i } else { i };
            (qdict_bucket(member.0), rank, member)
        })
        .collect();
    members.sort_unstable_by_key(|&(bucket, rank, _)| (bucket, rank));
    members.into_iter().map(|(_, _, member)| member).collect()
}

/// `value` as QEMU's monitor writes it (without the line ending).
pub fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                out.extend_from_slice(format_g17(n.as_f64().unwrap_or(f64::NAN)).as_bytes());
            }
        }
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::Object(object) => write_object(object, out),
    }
}

/// Writes an object as QEMU's writer does (see [`write()`]), without wrapping it in
/// a [`Value`] first.
pub fn write_object(object: &Map<String, Value>, out: &mut Vec<u8>) {
    out.push(b'{');
    // By bucket, as QEMU iterates; within a bucket the order the object came in,
    // which for QEMU's own objects passed on is QEMU's order.
    for (i, (key, value)) in by_bucket(object, false).into_iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        write_str(key, out);
        out.extend_from_slice(b": ");
        write(value, out);
    }
    out.push(b'}');
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    use std::io::Write;
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            ' '..='~' => out.push(c as u8),
            c if (c as u32) > 0xFFFF => {
                let cp = c as u32 - 0x10000;
                let _ = write!(
                    out,
                    "\\u{:04X}\\u{:04X}",
                    0xD800 + (cp >> 10),
                    0xDC00 + (cp & 0x3FF)
                );
            }
            c => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
        }
    }
    out.push(b'"');
}

/// C's `printf("%.17g", x)`: 17 significant digits, trailing zeros removed,
/// exponent form below 1e-4 and from 1e17 on.
pub(super) fn format_g17(x: f64) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // 17 significant digits, rounded as printf rounds (exactly, half to even on
    // the binary value, which Rust's formatting also does).
    let sci = format!("{x:.16e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e}'s exponent is a number");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if negative { "-" } else { "" };
    if !(-4..17).contains(&exp) {
        let mut m = format!("{}.{}", &digits[..1], &digits[1..]);
        trim_fraction(&mut m);
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{m}e{esign}{:02}", exp.abs());
    }
    let mut fixed = if exp >= 0 {
        let point = exp as usize + 1;
        format!("{}.{}", &digits[..point], &digits[point..])
    } else {
        format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
    };
    trim_fraction(&mut fixed);
    format!("{sign}{fixed}")
}

fn trim_fraction(s: &mut String) {
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
}
