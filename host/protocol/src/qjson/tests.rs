//! The reader against QEMU's texts, chunking, limits and recovery; the writer
//! against QEMU's output.

use super::write::format_g17;
use super::*;

#[test]
fn each_value_comes_with_its_size() {
    let mut reader = Reader::new(1 << 20, 64);
    let mut out = Vec::new();
    reader.push(br#"{"a": 1} [2, "xy"] {"#, &mut out);
    assert_eq!(out.len(), 2);
    // `{` `"a"` `:` `1` `}`, then `[` `2` `,` `"xy"` `]`.
    assert_eq!(reader.sizes(), [7, 8]);
    reader.push(b"}", &mut out);
    assert_eq!(reader.sizes(), [2], "sizes are those of the latest push");
}
use serde_json::json;

fn read(input: &[u8]) -> Vec<Input> {
    let mut reader = Reader::new(1 << 20, 64);
    let mut out = Vec::new();
    reader.push(input, &mut out);
    out
}

fn err(desc: &str) -> Input {
    Input::Error(desc.into())
}

#[test]
fn values_back_to_back_and_byte_by_byte() {
    let input = br#"{"execute": "a"}{'execute': 'b\'s "x"'} [1, 2.5, -0, true, null] "#;
    let expected = vec![
        Input::Value(json!({"execute": "a"})),
        Input::Value(json!({"execute": "b's \"x\""})),
        Input::Value(json!([1, 2.5, 0, true, null])),
    ];
    assert_eq!(read(input), expected);
    let mut reader = Reader::new(1 << 20, 64);
    let mut out = Vec::new();
    for b in input {
        reader.push(std::slice::from_ref(b), &mut out);
    }
    assert_eq!(out, expected);
}

#[test]
fn a_number_or_keyword_waits_for_the_byte_after_it() {
    assert_eq!(read(b"42"), vec![]);
    assert_eq!(read(b"42 "), vec![Input::Value(json!(42))]);
    assert_eq!(
        read(b"true{}"),
        vec![Input::Value(json!(true)), Input::Value(json!({}))]
    );
}

#[test]
fn a_stray_byte_is_reported_and_the_partial_message_dropped() {
    // QEMU: the control byte ends the message being read; recovery resumes at
    // the next structural character, so `}` is a message of its own.
    assert_eq!(
        read(b"{\"execute\": \x01 \"query-status\"}{\"execute\": \"x\"}"),
        vec![
            err("JSON parse error, stray '\u{1}'"),
            err("JSON parse error, expecting value"),
            Input::Value(json!({"execute": "x"})),
        ]
    );
    assert_eq!(
        read(b"\xff{}"),
        vec![
            err("JSON parse error, stray '\u{FFFD}'"),
            Input::Value(json!({}))
        ]
    );
    assert_eq!(
        read(b"Xyz {}"),
        vec![err("JSON parse error, stray 'X'"), Input::Value(json!({}))]
    );
    assert_eq!(read(b"01 "), vec![err("JSON parse error, stray '01'")]);
    assert_eq!(
        read(b"\"a\nb\" "),
        vec![err("JSON parse error, stray '\"a\n'")]
    );
}

#[test]
fn parser_errors_use_qemus_texts() {
    let cases: &[(&[u8], &str)] = &[
        (b"{\"a\" 1}", "JSON parse error, missing : in object pair"),
        (b"{\"a\": }", "JSON parse error, expecting value"),
        (b"{1: 2}", "JSON parse error, key is not a string in object"),
        (
            b"{\"a\": 1 \"b\": 2}",
            "JSON parse error, expected separator in dict",
        ),
        (b"[1 2]", "JSON parse error, expected separator in list"),
        (b"[1,]", "JSON parse error, expecting value"),
        (b"{\"a\": 1, \"a\": 2}", "JSON parse error, duplicate key"),
        (b"{\"a\": nul}", "JSON parse error, invalid keyword 'nul'"),
        (b"]", "JSON parse error, expecting value"),
        (b"{]", "JSON parse error, expecting value"),
        (
            b"\"\\x\"",
            "JSON parse error, invalid escape sequence in string",
        ),
        (
            b"\"\\uD800\"",
            "JSON parse error, \\uD800 is not a valid Unicode character",
        ),
        (
            b"\"\\uDC00\"",
            "JSON parse error, \\uDC00 is not a valid Unicode character",
        ),
        (
            b"\"\\uD800\\u0041\"",
            "JSON parse error, \\uD800 is not a valid Unicode character",
        ),
        (
            b"\"\\uFFFF\"",
            "JSON parse error, \\uFFFF is not a valid Unicode character",
        ),
        (
            b"\"\\u12\"",
            "JSON parse error, \\u12\" is not a valid Unicode character",
        ),
        (
            b"\"\xc3\x28\"",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
        (
            b"\"\xed\xa0\x80\"",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
        (
            b"\"\xc1\xbf\"",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
    ];
    for (input, desc) in cases {
        assert_eq!(
            read(input),
            vec![err(desc)],
            "{}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn strings_decode_as_qemu_decodes_them() {
    assert_eq!(
        read(b"[\"\\uD83D\\uDE00\", \"\xc0\x80\", \"\\u0000\", \"\xc3\xa9\\/\"]"),
        vec![Input::Value(json!([
            "\u{1F600}",
            "\u{0}",
            "\u{0}",
            "\u{e9}/"
        ]))]
    );
}

#[test]
fn numbers_are_i64_then_u64_then_double() {
    assert_eq!(
        read(b"[9223372036854775807, 18446744073709551615, 18446744073709551616, -9223372036854775809]"),
        vec![Input::Value(json!([
            i64::MAX,
            u64::MAX,
            18446744073709551616.0,
            -9223372036854775809.0
        ]))]
    );
}

#[test]
fn over_the_limits_one_error_and_the_rest_skipped() {
    let mut reader = Reader::new(32, 4);
    let mut out = Vec::new();
    let big = format!(
        r#"{{"execute": "{}", "x": [1, {{"y": 2}}]}}{{"id": 1}}"#,
        "a".repeat(100)
    );
    reader.push(big.as_bytes(), &mut out);
    assert_eq!(out, vec![Input::TooLarge, Input::Value(json!({"id": 1}))]);
    out.clear();
    reader.push(b"[[[[[[\"]]]]]]\"]]]]]] {}", &mut out);
    assert_eq!(out, vec![Input::TooDeep, Input::Value(json!({}))]);
    assert!(reader.token.capacity() <= 64 * 1024);
}

#[test]
fn memory_stays_bounded_for_an_endless_string() {
    let mut reader = Reader::new(1024, 8);
    let mut out = Vec::new();
    reader.push(b"{\"a\": \"", &mut out);
    for _ in 0..1000 {
        reader.push(&[b'x'; 1024], &mut out);
    }
    assert_eq!(out, vec![Input::TooLarge]);
    assert!(reader.token.capacity() <= 2048);
    assert!(reader.in_message());
}

fn written(value: &Value) -> String {
    let mut out = Vec::new();
    write(value, &mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn writes_as_qemu_does() {
    assert_eq!(
        written(&json!({"return": {}, "id": 1})),
        r#"{"return": {}, "id": 1}"#
    );
    assert_eq!(
        written(&json!({"error": {"class": "GenericError", "desc": "x"}, "id": "a"})),
        r#"{"id": "a", "error": {"class": "GenericError", "desc": "x"}}"#
    );
    assert_eq!(
        written(
            &json!({"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}})
        ),
        r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP", "data": {}}"#
    );
    assert_eq!(
        written(&json!(["é\u{0}\u{1F600}\n\"\\/", [], {}])),
        r#"["\u00E9\u0000\uD83D\uDE00\n\"\\/", [], {}]"#
    );
}

#[test]
fn doubles_print_as_printf_17g() {
    for (x, s) in [
        (1.0, "1"),
        (0.1, "0.10000000000000001"),
        (1.5, "1.5"),
        (-2.5e-5, "-2.5000000000000001e-05"),
        (1e17, "1e+17"),
        (1e16, "10000000000000000"),
        (123456.789, "123456.789"),
        (0.0001, "0.0001"),
        (1.8446744073709552e19, "1.8446744073709552e+19"),
    ] {
        assert_eq!(format_g17(x), s, "{x}");
    }
}
