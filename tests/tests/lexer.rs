//! Malformed input, read as QEMU reads it: a corpus of bad bytes goes to QEMU
//! directly and through qmpgate (in front of a QEMU of the same version), whole
//! and one byte per write, and the replies must be the same bytes.
//!
//! After each entry the client sends 0xFF (QEMU's documented way to reset its
//! parser: it always yields exactly one `stray` error) and a sentinel command; the
//! replies up to the sentinel's are compared. Greetings are compared too.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use qmpgate_tests::{GatewayBuilder, Qemu, QemuVersion};

const NO_MACHINE: &[&str] = &["-M", "none", "-nodefaults", "-display", "none", "-S"];

const SENTINEL: &[u8] = b"\xff{\"execute\": \"query-status\", \"id\": \"sentinel\"}";

/// Each entry: what it exercises, and the bytes a client sends after negotiating.
fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let long_string = format!(
        r#"{{"execute": "query-status", "id": "{}"}}"#,
        "x".repeat(100_000)
    );
    vec![
        ("valid", br#"{"execute": "query-status", "id": 1}"#.to_vec()),
        ("valid, no id", br#"{"execute": "query-status"}"#.to_vec()),
        ("back to back", br#"{"execute":"query-status","id":1}{"execute":"query-status","id":2}"#.to_vec()),
        ("single quotes", br#"{'execute': 'query-status', 'id': 'it\'s "x"'}"#.to_vec()),
        ("float id", br#"{"execute": "query-status", "id": 0.1}"#.to_vec()),
        ("big ids", br#"{"execute": "query-status", "id": [18446744073709551615, -9223372036854775809, 1e300, -0.0]}"#.to_vec()),
        ("non-ASCII id", "{\"execute\": \"query-status\", \"id\": \"é\\u00e9\\uD83D\\uDE00\\/\\u0000\"}".as_bytes().to_vec()),
        ("modified UTF-8 NUL", b"{\"execute\": \"query-status\", \"id\": \"a\xc0\x80b\"}".to_vec()),
        ("control byte outside a string", b"{\"execute\": \x01 \"query-status\"}".to_vec()),
        ("control byte inside a string", b"{\"execute\": \"query\x02status\"}".to_vec()),
        ("newline inside a string", b"{\"execute\": \"query\nstatus\", \"id\": 3}".to_vec()),
        ("NUL byte", b"{\"execute\"\x00: \"query-status\"}".to_vec()),
        ("a stray quote, then a control byte", b"\"\x00{\"execute\": \"query-status\", \"id\": 20}".to_vec()),
        ("a stray bracket, then a control byte", b"[\x01{\"execute\": \"query-status\", \"id\": 21}".to_vec()),
        ("0xFE lead byte", b"{\"execute\": \"\xfe\"}".to_vec()),
        ("invalid UTF-8 in a string", b"{\"execute\": \"\xc3\x28\", \"id\": 4}".to_vec()),
        ("overlong UTF-8", b"{\"execute\": \"\xc1\xbf\"}".to_vec()),
        ("UTF-8 surrogate", b"{\"execute\": \"\xed\xa0\x80\"}".to_vec()),
        ("UTF-8 noncharacter", b"{\"execute\": \"\xef\xbf\xbf\"}".to_vec()),
        ("lone leading surrogate", br#"{"execute": "\uD800"}"#.to_vec()),
        ("lone trailing surrogate", br#"{"execute": "\uDC00x"}"#.to_vec()),
        ("surrogate then non-surrogate", br#"{"execute": "\uD800\u0041"}"#.to_vec()),
        ("escaped noncharacter", br#"{"execute": "\uFDD0"}"#.to_vec()),
        ("short \\u escape", br#"{"execute": "\u12"}"#.to_vec()),
        ("bad escape", br#"{"execute": "\x41"}"#.to_vec()),
        ("unbalanced closers", br#"]}{"execute": "query-status", "id": 5}"#.to_vec()),
        ("mismatched brackets", br#"{"execute": "query-status"]"#.to_vec()),
        ("bracket in the wrong place", br#"{"a": [}"#.to_vec()),
        ("missing colon", br#"{"execute" "query-status"}"#.to_vec()),
        ("missing value", br#"{"execute": }"#.to_vec()),
        ("missing separator", br#"{"execute": "query-status" "id": 1}"#.to_vec()),
        ("trailing comma", br#"{"execute": "query-status", "arguments": [1,], "id": 1}"#.to_vec()),
        ("key not a string", br#"{1: 2}"#.to_vec()),
        ("duplicate key", br#"{"execute": "query-status", "execute": "stop"}"#.to_vec()),
        ("nested duplicate key", br#"{"execute": "x", "arguments": {"a": 1, "a": 2}, "id": 6}"#.to_vec()),
        ("bad keyword", br#"{"execute": "query-status", "id": nul}"#.to_vec()),
        ("uppercase keyword", br#"{"execute": "query-status", "id": True}"#.to_vec()),
        ("leading zero", br#"{"execute": "query-status", "id": 01}"#.to_vec()),
        ("bad exponent", br#"{"execute": "query-status", "id": 1e+}"#.to_vec()),
        ("garbage between objects", br#"{"execute": "query-status", "id": 7} garbage {"execute": "query-status", "id": 8}"#.to_vec()),
        ("bare values", b"42 true \"s\" null [1] ".to_vec()),
        ("not an object", br#"["execute", "query-status"]"#.to_vec()),
        ("no execute", br#"{"id": 9}"#.to_vec()),
        ("execute not a string", br#"{"execute": 1, "id": 10}"#.to_vec()),
        ("arguments not an object", br#"{"execute": "query-status", "arguments": [], "id": 11}"#.to_vec()),
        ("unexpected member", br#"{"execute": "query-status", "foo": 1, "id": 12}"#.to_vec()),
        ("two faults, QEMU's order", br#"{"foo": 1, "execute": 2, "id": 13}"#.to_vec()),
        ("exec-oob without the capability", br#"{"exec-oob": "query-status", "id": 14}"#.to_vec()),
        ("unknown command", br#"{"execute": "no-such-command", "id": 15}"#.to_vec()),
        ("unknown argument", br#"{"execute": "query-status", "arguments": {"x": 1}, "id": 16}"#.to_vec()),
        ("second qmp_capabilities", br#"{"execute": "qmp_capabilities", "id": 17}"#.to_vec()),
        ("open string at the end", br#"{"execute": "query-st"#.to_vec()),
        ("open object at the end", br#"{"execute": "query-status", "id": "#.to_vec()),
        ("a long token", long_string.into_bytes()),
        ("whitespace and CRLF", b" \t\r\n{ \"execute\" :\r\n\"query-status\" , \"id\" : 18 }\r\n".to_vec()),
    ]
}

/// Connects, reads the greeting, negotiates; returns the stream and the greeting.
fn negotiated(path: &Path) -> (UnixStream, BufReader<UnixStream>, String) {
    let stream = UnixStream::connect(path).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let greeting = read_line(&mut reader);
    let mut writer = stream;
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\"}")
        .unwrap();
    assert_eq!(read_line(&mut reader), "{\"return\": {}}\r\n");
    (writer, reader, greeting)
}

fn read_line(reader: &mut BufReader<UnixStream>) -> String {
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .expect("a reply within 10 s");
    String::from_utf8(line).expect("replies are ASCII")
}

/// What a client sending `input` sees, up to and including the sentinel's reply.
fn replies(path: &Path, input: &[u8], byte_by_byte: bool) -> Vec<String> {
    let (mut writer, mut reader, _) = negotiated(path);
    if byte_by_byte {
        for b in input {
            writer.write_all(std::slice::from_ref(b)).unwrap();
        }
    } else {
        writer.write_all(input).unwrap();
    }
    writer.write_all(SENTINEL).unwrap();
    let mut lines = Vec::new();
    loop {
        let line = read_line(&mut reader);
        assert!(!line.is_empty(), "connection closed; got {lines:?}");
        let done = line.contains("\"id\": \"sentinel\"");
        lines.push(line);
        if done {
            return lines;
        }
    }
}

#[test]
fn malformed_input_gets_qemus_own_replies_qemu_7_2_and_qemu_10_0() {
    for version in QemuVersion::ALL {
        let direct = Qemu::start_version(version, NO_MACHINE);
        let behind = Qemu::start_version(version, NO_MACHINE);
        let gateway = GatewayBuilder::new(&behind.upstream_spec()).spawn();

        let (_, _, qemu_greeting) = negotiated(&direct.monitor);
        let (_, _, gateway_greeting) = negotiated(&gateway.path);
        assert_eq!(gateway_greeting, qemu_greeting, "{version:?}: greeting");

        let mut failures = Vec::new();
        for (what, input) in corpus() {
            for byte_by_byte in [false, true] {
                let expected = replies(&direct.monitor, &input, byte_by_byte);
                let got = replies(&gateway.path, &input, byte_by_byte);
                if got != expected {
                    failures.push(format!(
                        "{version:?} {what} (byte by byte: {byte_by_byte}):\n  QEMU:    {expected:?}\n  qmpgate: {got:?}"
                    ));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} differences:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
