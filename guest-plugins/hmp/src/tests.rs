//! End-to-end tests of `translate`: the bypasses of the first version, the one-
//! reading rule, the everyday commands, and a property test (hand-rolled
//! generator) of the canonical form.
//!
//! Layout: helpers; bypass tests; everyday meanings; `roundtrip` (property tests).

use serde_json::{Value as Json, json};

use super::*;

/// The reading of `line`: command name, arguments, and the line QEMU is sent.
fn reading(line: &str) -> (String, Json, String) {
    match translate(line) {
        HmpTranslation::Reading(r) => (
            r.command.name,
            serde_json::from_str(&r.command.arguments).unwrap(),
            r.canonical,
        ),
        other => panic!("{line:?}: {other:?}"),
    }
}

fn command(line: &str) -> (String, Json) {
    let (name, arguments, _) = reading(line);
    (name, arguments)
}

fn invalid(line: &str) -> String {
    match translate(line) {
        HmpTranslation::Invalid(reason) => reason,
        other => panic!("{line:?} should be invalid: {other:?}"),
    }
}

/// The line QEMU is sent instead of `line`, which is not canonical itself; the
/// rebuilt line means the same and is its own canonical form.
fn rewrite(line: &str) -> String {
    let (name, arguments, canonical) = reading(line);
    assert_ne!(canonical, line, "{line:?} is canonical already");
    assert_eq!(
        reading(&canonical),
        (name, arguments, canonical.clone()),
        "{line:?}"
    );
    canonical
}

#[test]
fn glued_and_quoted_migrate_options_are_rebuilt_canonically() {
    assert_eq!(rewrite("migrate -dexec:cmd"), "migrate -d exec:cmd");
    assert_eq!(rewrite("migrate -d\"exec:cmd\""), "migrate -d exec:cmd");
    assert_eq!(
        rewrite("migrate -d\"exec:touch x\""),
        "migrate -d \"exec:touch x\""
    );
    assert_eq!(rewrite("migrate -d \"exec:cmd\""), "migrate -d exec:cmd");
    // QEMU reads `-dexec:touch x` as uri `exec:touch` and then fails on ` x`.
    assert!(invalid("migrate -dexec:touch x").contains("extraneous"));
    // The canonical form means what QEMU reads.
    assert_eq!(
        command("migrate -d \"exec:touch x\""),
        (
            "migrate".into(),
            json!({"uri": "exec:touch x", "detach": true})
        )
    );
    assert_eq!(
        command("migrate -d exec:cmd"),
        ("migrate".into(), json!({"uri": "exec:cmd", "detach": true}))
    );
}

#[test]
fn chardev_add_is_read_as_qemu_opts_after_unquoting() {
    assert_eq!(
        rewrite("chardev-add \"file,id=c,path=/tmp/x\""),
        "chardev-add file,id=c,path=/tmp/x"
    );
    assert_eq!(
        command("chardev-add file,id=c,path=/tmp/x"),
        (
            "chardev-add".into(),
            json!({"id": "c", "backend": {"type": "file", "data": {"path": "/tmp/x"}}})
        )
    );
    // The implied key is `backend`, and QEMU keeps the last repeat: refused.
    assert!(invalid("chardev-add null,id=c,backend=file,path=/x").contains("more than once"));
    assert!(invalid("chardev-add file,id=c,path=/a,path=/b").contains("more than once"));
    // An explicit implied key is moved to the front, bare.
    assert_eq!(
        rewrite("chardev-add id=c,backend=null"),
        "chardev-add null,id=c"
    );
    // Flags are written out.
    assert_eq!(
        rewrite("chardev-add socket,id=s,path=/tmp/s,server,nowait"),
        "chardev-add socket,id=s,path=/tmp/s,server=on,wait=off"
    );
    // Values with spaces are quoted as a whole; commas doubled inside.
    assert_eq!(
        command("chardev-add \"file,id=c,path=/tmp/a b,,c\"").1["backend"]["data"]["path"],
        "/tmp/a b,c"
    );
    assert!(invalid("chardev-add file,id=c,help").contains("help"));
    assert!(invalid("chardev-add file,id=9,path=/x").contains("identifier"));
}

#[test]
fn chardev_backend_aliases_resolve() {
    let backend = |line: &str| command(line).1["backend"]["type"].clone();
    assert_eq!(backend("chardev-add tty,id=c,path=/dev/ttyS0"), "serial");
    assert_eq!(
        backend("chardev-add parport,id=c,path=/dev/parport0"),
        "parallel"
    );
    assert_eq!(backend("chardev-add memory,id=c"), "ringbuf");
    assert_eq!(backend("chardev-add ringbuf,id=c"), "ringbuf");
    assert_eq!(
        command("chardev-change c0 file,path=/tmp/x"),
        (
            "chardev-change".into(),
            json!({"id": "c0", "backend": {"type": "file", "data": {"path": "/tmp/x"}}})
        )
    );
    assert!(invalid("chardev-change c0 file,id=c,path=/tmp/x").contains("Unexpected 'id'"));
}

#[test]
fn object_add_is_keyval_and_its_json_form_is_refused() {
    assert_eq!(
        command("object_add secret,id=s0,data=abc"),
        (
            "object-add".into(),
            json!({"qom-type": "secret", "id": "s0", "data": "abc"})
        )
    );
    assert!(
        invalid(r#"object_add {"qom-type":"secret","id":"s0","file":"/etc/shadow"}"#)
            .contains("JSON")
    );
    assert!(invalid("object_add secret,id=a,id=b").contains("more than once"));
    assert_eq!(
        rewrite("object_add id=s0,qom-type=secret"),
        "object_add secret,id=s0"
    );
    // `object` is read raw (type S): quotes are not removed, so this is not
    // the canonical spelling of anything.
    assert!(matches!(
        translate("object_add \"secret,id=s0\""),
        HmpTranslation::Invalid(_)
    ));
}

#[test]
fn device_and_netdev_add_are_qemu_opts() {
    assert_eq!(
        command("device_add e1000,id=n1"),
        ("device_add".into(), json!({"driver": "e1000", "id": "n1"}))
    );
    assert_eq!(
        command("netdev_add user,id=u0,hostfwd=tcp::2222-:22"),
        (
            "netdev_add".into(),
            json!({"type": "user", "id": "u0", "hostfwd": "tcp::2222-:22"})
        )
    );
    assert_eq!(
        rewrite("device_add driver=e1000,id=n1"),
        "device_add e1000,id=n1"
    );
    assert!(invalid("device_add e1000,id=n1,driver=virtio-net-pci").contains("more than once"));
    assert!(invalid("netdev_add user,id=u0,type=tap").contains("more than once"));
    assert!(invalid("device_add help").contains("help"));
}

#[test]
fn separators_are_ascii_whitespace_only() {
    assert_eq!(rewrite("stop\t"), "stop");
    assert_eq!(rewrite("delvm\ts1"), "delvm s1");
    assert_eq!(rewrite("  stop"), "stop");
    assert_eq!(rewrite("stop\r\n"), "stop");
    assert_eq!(rewrite("delvm  s1"), "delvm s1");
    // U+00A0 is no separator: `stop\u{a0}` is an unknown command to QEMU.
    assert!(invalid("stop\u{a0}").contains("unknown command"));
    // Inside an argument it is part of the value, which has no canonical form.
    assert!(invalid("delvm a\u{a0}b").contains("non-ASCII"));
    // A tab inside a quoted value is a control character.
    assert!(invalid("delvm \"a\tb\"").contains("control character"));
}

#[test]
fn format_after_the_name_and_cpu_and_info_items() {
    assert_eq!(
        command("x/4x 0"),
        (
            "hmp:x".into(),
            json!({"fmt": {"count": 4, "format": "x", "size": null}, "addr": 0})
        )
    );
    assert_eq!(rewrite("x /4x 0"), "x/4x 0");
    assert_eq!(rewrite("x/4wx 0"), "x/4xw 0");
    assert_eq!(
        command("xp/2xg 0x1000").1,
        json!({"fmt": {"count": 2, "format": "x", "size": 8}, "addr": 4096})
    );
    assert_eq!(command("cpu 1"), ("hmp:cpu".into(), json!({"index": 1})));
    assert_eq!(rewrite("cpu 01"), "cpu 1");
    assert!(invalid("cpu 1+1").contains("expressions"));
    assert_eq!(command("info"), ("hmp:info".into(), json!({})));
    assert_eq!(
        command("info registers"),
        ("hmp:info registers".into(), json!({}))
    );
    assert_eq!(
        command("info registers -a"),
        ("hmp:info registers".into(), json!({"cpustate_all": true}))
    );
    assert_eq!(
        command("info mtree -f"),
        ("hmp:info mtree".into(), json!({"flatview": true}))
    );
    assert!(invalid("info nosuch").contains("unknown command"));
    assert_eq!(
        command("help info"),
        ("hmp:help".into(), json!({"name": "info"}))
    );
    assert_eq!(command("? info").0, "hmp:help");
}

#[test]
fn numbers_followed_by_operators_need_quoting() {
    assert!(invalid("memsave 0 4096 /tmp/m").contains("expressions"));
    assert_eq!(
        command("memsave 0 4096 \"/tmp/m\""),
        (
            "memsave".into(),
            json!({"val": 0, "size": 4096, "filename": "/tmp/m"})
        )
    );
    assert_eq!(rewrite("memsave 0 4096x"), "memsave 0 4096 x");
    assert_eq!(rewrite("memsave 0x1000 010 m"), "memsave 0x1000 8 m");
}

#[test]
fn versions_must_agree_where_both_have_the_command() {
    // 7.2 has `migrate -b`, 10.0 does not.
    assert!(invalid("migrate -b tcp:h:1").contains("7.2 accepts it, 10.0 refuses it"));
    // A command only one version has is read by that version.
    assert_eq!(command("singlestep").0, "hmp:singlestep");
    assert_eq!(command("one-insn-per-tb on").1, json!({"option": "on"}));
    // `info qtree -b` is 10.0 only.
    assert!(invalid("info qtree -b").contains("disagree"));
}

#[test]
fn lines_are_bounded_and_odd_bytes_do_not_panic() {
    assert!(invalid(&format!("delvm {}", "a".repeat(5000))).contains("line buffer"));
    assert!(invalid(&format!("delvm {}", "a".repeat(2000))).contains("buffer"));
    assert!(invalid("").contains("empty"));
    assert!(invalid("   ").contains("empty"));
    assert!(invalid("stop\0").contains("NUL"));
    assert!(invalid("frobnicate").contains("unknown command: 'frobnicate'"));
}

#[test]
fn everyday_commands() {
    let cases: &[(&str, &str, Json)] = &[
        ("info status", "query-status", json!({})),
        ("info registers", "hmp:info registers", json!({})),
        ("stop", "stop", json!({})),
        ("s", "stop", json!({})),
        ("c", "cont", json!({})),
        ("cont", "cont", json!({})),
        ("q", "quit", json!({})),
        ("system_reset", "system_reset", json!({})),
        (
            "sendkey ctrl-alt-f1",
            "send-key",
            json!({"keys": [
                {"type": "qcode", "data": "ctrl"},
                {"type": "qcode", "data": "alt"},
                {"type": "qcode", "data": "f1"}]}),
        ),
        (
            "sendkey \"0x1d-<\" 200",
            "send-key",
            json!({"keys": [{"type": "number", "data": 29}, {"type": "qcode", "data": "less"}], "hold-time": 200}),
        ),
        ("balloon 512", "balloon", json!({"value": 512i64 << 20})),
        ("device_del net0", "device_del", json!({"id": "net0"})),
        ("savevm s1", "hmp:savevm", json!({"name": "s1"})),
        ("savevm", "hmp:savevm", json!({})),
        ("loadvm s1", "hmp:loadvm", json!({"name": "s1"})),
        ("delvm s1", "hmp:delvm", json!({"name": "s1"})),
        (
            "device_add e1000,id=n1",
            "device_add",
            json!({"driver": "e1000", "id": "n1"}),
        ),
        (
            "block_resize drive0 1G",
            "block_resize",
            json!({"device": "drive0", "size": 1i64 << 30}),
        ),
        (
            "block_resize drive0 100",
            "block_resize",
            json!({"device": "drive0", "size": 100i64 << 20}),
        ),
        (
            "set_link net0 off",
            "set_link",
            json!({"name": "net0", "up": false}),
        ),
        (
            "eject -f cd0",
            "eject",
            json!({"device": "cd0", "force": true}),
        ),
        (
            "screendump /tmp/s.png -f png",
            "screendump",
            json!({"filename": "/tmp/s.png", "format": "png"}),
        ),
        (
            "gdbserver tcp::1234",
            "hmp:gdbserver",
            json!({"device": "tcp::1234"}),
        ),
        (
            "qom-set -j /machine x 1 2",
            "hmp:qom-set",
            json!({"json": true, "path": "/machine", "property": "x", "value": "1 2"}),
        ),
    ];
    for (line, name, args) in cases {
        assert_eq!(command(line), (name.to_string(), args.clone()), "{line}");
    }
}

mod roundtrip;
