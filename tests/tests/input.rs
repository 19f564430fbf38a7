//! Bad input from clients: every case gets a clear QMP error, the connection stays
//! usable, and other clients are unaffected.

use qmpgate_tests::{GatewayBuilder, Qemu, eventually};
use serde_json::json;

fn gateway(qemu: &Qemu, extra: &[&str]) -> qmpgate_tests::Gateway {
    GatewayBuilder::new(&qemu.upstream_spec())
        .args(extra.iter().copied())
        .spawn()
}

#[test]
fn malformed_messages_get_qemus_errors_and_the_session_survives() {
    let qemu = Qemu::start();
    let gateway = gateway(&qemu, &[]);
    let mut c = gateway.negotiated();
    let cases: &[(&[u8], serde_json::Value)] = &[
        (
            b"[1, 2]",
            json!({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
        ),
        (
            b"42 ",
            json!({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
        ),
        (
            br#"{"id": 7}"#,
            json!({"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 7}),
        ),
        (
            br#"{"execute": 5, "id": 8}"#,
            json!({"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}, "id": 8}),
        ),
        (
            br#"{"execute": "query-status", "arguments": [], "id": 9}"#,
            json!({"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}, "id": 9}),
        ),
        (
            br#"{"execute": "query-status", "bogus": 1, "id": 10}"#,
            json!({"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}, "id": 10}),
        ),
        (
            br#"{"exec-oob": "query-status", "id": 11}"#,
            json!({"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}, "id": 11}),
        ),
    ];
    for (input, expected) in cases {
        c.send_raw(input);
        assert_eq!(
            &c.read_reply(),
            expected,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
    c.send_raw(br#"{"execute": , "id": 12}"#);
    assert_eq!(
        c.read_reply(),
        json!({"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}),
        "parse errors carry no id and no position, as in QEMU"
    );
    // Each byte that can start nothing is an error of its own, as in QEMU (0xFE
    // and 0xFF never occur in UTF-8; QEMU resumes right after each), and the `{}`
    // after them another.
    c.send_raw(b"\xff\xfe{}");
    for _ in 0..2 {
        assert_eq!(
            c.read_reply(),
            json!({"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u{FFFD}'"}})
        );
    }
    assert_eq!(
        c.read_reply()["error"]["desc"],
        "QMP input lacks member 'execute'"
    );
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch",
        "still usable"
    );
}

/// A byte that opens a string or a list and then one QEMU's lexer rejects: QEMU
/// reports it and reads the next command; so must qmpgate, not wait for the
/// string or list to close.
#[test]
fn a_stray_byte_does_not_wedge_the_client() {
    let qemu = Qemu::start();
    let gateway = gateway(&qemu, &[]);
    let mut c = gateway.negotiated();
    for (stray, shown) in [(&b"\"\x00"[..], "\""), (&b"[\x01"[..], "\u{1}")] {
        c.send_raw(stray);
        c.send_raw(br#"{"execute": "query-status", "id": "next"}"#);
        assert_eq!(
            c.read_reply(),
            json!({"error": {"class": "GenericError", "desc": format!("JSON parse error, stray '{shown}'")}})
        );
        let reply = c.read_reply();
        assert_eq!(reply["id"], "next", "{reply}");
        assert_eq!(reply["return"]["status"], "prelaunch", "{reply}");
    }
}

#[test]
fn oversized_and_deeply_nested_messages_are_refused_with_bounded_memory() {
    let qemu = Qemu::start();
    let gateway = gateway(&qemu, &["--max-message", "65536", "--max-depth", "16"]);
    let mut other = gateway.negotiated();
    let mut c = gateway.negotiated();

    // 8 MiB of one string: refused without being buffered (the limit is 64 KiB).
    let big = format!(
        r#"{{"execute": "query-status", "arguments": {{"x": "{}"}}, "id": 1}}"#,
        "a".repeat(8 << 20)
    );
    c.send_raw(big.as_bytes());
    assert_eq!(
        c.read_reply(),
        json!({"error": {"class": "GenericError", "desc": "JSON message exceeds the limit of 65536 bytes"}})
    );
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    c.send_raw(deep.as_bytes());
    assert_eq!(
        c.read_reply(),
        json!({"error": {"class": "GenericError", "desc": "JSON nesting exceeds the limit of 16 levels"}})
    );
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    assert_eq!(
        other.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

#[test]
fn unknown_commands_are_qemus_command_not_found() {
    let qemu = Qemu::start();
    let gateway = gateway(&qemu, &[]);
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("definitely-not-a-command", json!({})),
        json!({"error": {"class": "CommandNotFound", "desc": "The command definitely-not-a-command has not been found"}})
    );
}

#[test]
fn a_client_that_leaves_mid_command_costs_nobody_else_anything() {
    let qemu = Qemu::start();
    let gateway = gateway(&qemu, &[]);
    let mut a = gateway.negotiated();
    let mut b = gateway.negotiated();
    for i in 0..20 {
        a.send(&json!({"execute": "query-status", "id": i}));
    }
    drop(a);
    for i in 0..20 {
        b.send(&json!({"execute": "query-name", "id": i}));
    }
    for i in 0..20 {
        let reply = b.read_reply();
        assert_eq!(reply["id"], i);
        assert!(reply.get("return").is_some(), "{reply}");
    }
}

#[test]
fn oob_commands_are_relayed_to_clients_that_negotiated_oob() {
    let qemu = Qemu::start();
    let gateway = gateway(&qemu, &[]);
    let mut c = gateway.client();
    assert_eq!(
        c.execute("qmp_capabilities", json!({"enable": ["oob"]})),
        json!({"return": {}})
    );
    // query-status does not allow OOB: QEMU's own error comes back with our id.
    c.send(&json!({"exec-oob": "query-status", "id": "o1"}));
    let reply = c.read_reply();
    assert_eq!(reply["id"], "o1");
    assert_eq!(
        reply["error"]["desc"],
        "The command query-status does not support OOB"
    );
    // An unknown capability is refused as QEMU refuses it.
    let mut d = gateway.client();
    assert_eq!(
        d.execute("qmp_capabilities", json!({"enable": ["telepathy"]}))["error"]["desc"],
        "Parameter 'enable[0]' does not accept value 'telepathy'"
    );
}

/// Open fds of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn ten_thousand_connects_leave_no_fd_behind() {
    let qemu = Qemu::start();
    let gateway = gateway(&qemu, &[]);
    drop(gateway.negotiated());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = fd_count(gateway.pid());
    for i in 0..10_000 {
        let mut c = gateway.client();
        // Every tenth client also runs a command, so sessions end in several states.
        if i % 10 == 0 {
            c.execute("qmp_capabilities", json!({}));
            c.send(&json!({"execute": "query-status"}));
        }
    }
    eventually(
        &format!("the gateway's {before} open fds after 10,000 connections"),
        || fd_count(gateway.pid()) == before,
    );
    assert_eq!(
        gateway.negotiated().execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

#[test]
fn a_100_mib_message_is_refused_without_being_buffered() {
    let qemu = Qemu::start();
    let gateway = gateway(&qemu, &[]);
    let mut c = gateway.negotiated();
    let before = rss_kib(gateway.pid());
    let chunk = vec![b'a'; 1 << 20];
    c.send_raw(br#"{"execute": "query-status", "arguments": {"x": ""#);
    for _ in 0..100 {
        c.send_raw(&chunk);
    }
    c.send_raw(br#""}, "id": 1}"#);
    assert_eq!(
        c.read_reply(),
        json!({"error": {"class": "GenericError", "desc": "JSON message exceeds the limit of 1048576 bytes"}})
    );
    let grown = rss_kib(gateway.pid()).saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "the gateway grew by {grown} KiB for a 100 MiB message"
    );
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}
