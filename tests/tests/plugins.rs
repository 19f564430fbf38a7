//! Misbehaving plugins fail closed: the client gets a QMP error, the gateway keeps
//! serving, and the plugin is restarted for the next call.

use std::time::{Duration, Instant};

use qmpgate_tests::{GatewayBuilder, Plugin, Qemu, QmpClient, guest, http_get, with_status};
use serde_json::json;

fn gateway_with(qemu: &Qemu, fixture: &str) -> qmpgate_tests::Gateway {
    GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--plugin",
            &format!("{fixture}={}", guest(fixture).display()),
        ])
        .spawn()
}

fn desc(reply: &serde_json::Value) -> String {
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_plugin_that_loops_forever_is_stopped_by_its_cpu_deadline() {
    let qemu = Qemu::start();
    let mut gateway = gateway_with(&qemu, "fixture_spin");
    let mut c = gateway.negotiated();
    let started = std::time::Instant::now();
    let reply = c.execute("query-uuid", json!({}));
    assert_eq!(
        desc(&reply),
        "qmpgate plugin 'fixture_spin' exceeded its CPU time limit (50 ms); the command was not executed"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    // The instance was recreated: the next command works.
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    assert!(gateway.is_running());
}

#[test]
fn a_plugin_that_allocates_without_bound_is_stopped_by_its_memory_cap() {
    let qemu = Qemu::start();
    // A generous CPU limit, so that on a loaded machine the memory cap, not the
    // deadline, is what stops it.
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(Plugin::wasm("fixture_hog", &guest("fixture_hog")).cpu_ms(10000))
        .spawn();
    let mut c = gateway.negotiated();
    let mut other = gateway.negotiated();
    assert_eq!(
        desc(&c.execute("query-kvm", json!({}))),
        "qmpgate plugin 'fixture_hog' exceeded its memory limit (32 MiB); the command was not executed"
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
fn a_plugin_that_panics_or_lies_fails_closed() {
    let qemu = Qemu::start();
    let gateway = gateway_with(&qemu, "fixture_trap");
    let mut c = gateway.negotiated();
    let reply = c.execute("query-name", json!({}));
    assert_eq!(
        desc(&reply),
        "qmpgate plugin 'fixture_trap' trapped: wasm trap: wasm `unreachable` instruction executed; the command was not executed"
    );
    // The panic message and `log` records reach the log.
    gateway.logged("plugin panicked: panicked at");
    gateway.logged("boom requested by client 1");
    // The instance was recreated: the next command works.
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    let reply = c.execute("query-version", json!({}));
    assert_eq!(
        desc(&reply),
        "qmpgate plugin 'fixture_trap' returned an invalid result: reply is not JSON: key must be a string at line 1 column 2; the command was not executed",
    );
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

/// A client whose commands make a plugin fail is charged for it: its command is
/// refused, and after three such faults within a minute it is disconnected, and so
/// is its next connection from the same peer (reconnecting buys no new budget).
/// Other clients of the same chain are served throughout, and the plugin is never
/// taken down for them.
#[test]
fn a_client_whose_commands_keep_crashing_a_plugin_is_disconnected_and_nobody_else_suffers() {
    let qemu = Qemu::start();
    let (builder, url) = with_status(GatewayBuilder::new(&qemu.upstream_spec()).args([
        "--plugin",
        &format!("fixture_trap={}", guest("fixture_trap").display()),
    ]));
    let (builder, tenant) = builder.listener("tenant", 4);
    let gateway = builder.spawn();
    let mut bystander = gateway.negotiated();
    let mut attacker = QmpClient::negotiated(&tenant);
    for _ in 0..3 {
        assert!(desc(&attacker.execute("query-name", json!({}))).contains("trapped"));
        let started = Instant::now();
        assert_eq!(
            bystander.execute("query-status", json!({}))["return"]["status"],
            "prelaunch"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    assert!(attacker.closed(), "disconnected after its third fault");
    // Back again from the same peer: the faults are still counted.
    let mut again = QmpClient::connect(&tenant);
    assert!(again.closed(), "no fresh budget for a new connection");

    let (_, _, body) = http_get(&format!("{url}/status"));
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["counters"]["faulting_clients"], 2, "{status}");
    let trap = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "fixture_trap")
        .unwrap();
    assert_eq!(trap["disabled_calls"], 0, "{status}");
    // Others, new clients of the other listener included, are still welcome.
    assert_eq!(
        gateway.negotiated().execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

/// A plugin that fails by itself (here: on every connection to one listener, with
/// no input from the client) uses up its restart budget and stays closed, but only
/// for that upstream: another VM sharing the chain is served as before.
#[test]
fn a_plugin_that_keeps_failing_by_itself_is_taken_down_for_its_upstream_only() {
    let vm1 = Qemu::start();
    let vm2 = Qemu::start();
    let builder = GatewayBuilder::base().args([
        "--upstream",
        &format!("socket,id=vm1,path={}", vm1.monitor.display()),
        "--upstream",
        &format!("socket,id=vm2,path={}", vm2.monitor.display()),
        "--plugin",
        &format!("fixture_trap={}", guest("fixture_trap").display()),
    ]);
    let (builder, doomed) = builder.listener_with("doomed", 3, "upstream=vm1");
    let (builder, fine1) = builder.listener_with("fine1", 4, "upstream=vm1");
    let (builder, fine2) = builder.listener_with("fine2", 5, "upstream=vm2");
    let _gateway = builder.spawn_raw();
    let first_message = |path: &std::path::Path| {
        let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(qmpgate_tests::TIMEOUT))
            .unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stream));
        let first: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        (first, lines.next().is_none())
    };
    for _ in 0..10 {
        let (first, closed) = first_message(&doomed);
        assert!(
            desc(&first).ends_with("; the connection was refused"),
            "{first}"
        );
        assert!(desc(&first).contains("trapped"), "{first}");
        assert!(closed);
    }
    let disabled = "qmpgate plugin 'fixture_trap' is disabled: it failed 10 times within 60 s; the connection was refused";
    for path in [&doomed, &fine1] {
        let (first, closed) = first_message(path);
        assert_eq!(
            desc(&first),
            disabled,
            "fail closed: nothing passes a plugin that is down"
        );
        assert!(closed);
    }
    let mut c = QmpClient::negotiated(&fine2);
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch",
        "vm2 shares the chain and is served"
    );
}

#[test]
fn a_bad_plugin_configuration_stops_start_up_with_the_reason() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec());
    let config = builder.dir().join("bad.toml");
    std::fs::write(
        &config,
        "[[plugin]]\nname = \"policy\"\nbuiltin = \"qmp-policy\"\nconfig = { profile = \"lax\" }\n",
    )
    .unwrap();
    builder
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "socket,id=l,path=/tmp/qmpgate-never.sock,server=on",
        ])
        .fails_with(
            "plugin 'policy': init failed: invalid plugin configuration: unknown variant `lax`",
        );
}

#[test]
fn a_file_that_is_not_a_component_is_refused() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec());
    let bogus = builder.dir().join("bogus.wasm");
    std::fs::write(&bogus, b"\0asm this is not a component").unwrap();
    builder
        .args(["--plugin", &format!("bogus={}", bogus.display())])
        .args([
            "--listen",
            "socket,id=l,path=/tmp/qmpgate-never.sock,server=on",
        ])
        .fails_with("plugin 'bogus': not a loadable component");
}

/// A plugin cannot pass its words off as the host's: in its audit records the
/// host's fields (`time`, `plugin`, `upstream`, `client`) are the host's, from
/// `init` too; its log messages stay on one line, with control characters escaped;
/// and without an audit log its records reach the log as one JSON field.
#[test]
fn a_plugin_cannot_forge_audit_fields_or_log_lines() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec());
    let log = builder.dir().join("audit.jsonl");
    let plugin = format!("forger={}", guest("fixture_forger").display());
    let gateway = builder
        .args(["--plugin", &plugin, "--audit-log", log.to_str().unwrap()])
        .spawn();
    let mut c = gateway.negotiated();
    assert!(c.execute("query-name", json!({}))["return"].is_object());

    let records: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let fields: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r["when"].as_str().unwrap(),
                r["plugin"].clone(),
                r["upstream"].clone(),
                r["client"]["listener"].is_string(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            ("init", json!("forger"), json!(null), false),
            ("command", json!("forger"), json!("qemu"), true),
        ],
        "{records:?}"
    );
    for r in &records {
        assert!(r["time"].as_f64().unwrap() > 1e9, "{r}");
        // The host's client, not the plugin's 4242: null in `init`, which serves
        // no client (and the command's client is an object, checked above).
        assert_eq!(
            r.get("client") == Some(&serde_json::Value::Null),
            r["when"] == "init",
            "{r}"
        );
        assert_eq!(r["client"]["id"].is_u64(), r["when"] == "command", "{r}");
    }

    // The message is there, escaped.
    let stderr = gateway.logged(
        r"ok\n2026-01-01T00:00:00Z  INFO qmpgate::gateway: FORGED line\r\u{1b}[2Kstill forged",
    );
    for line in stderr.lines() {
        assert!(!line.starts_with("2026-01-01"), "a forged line: {line}");
        assert!(!line.starts_with("still forged"), "a forged line: {line}");
    }
    assert!(
        !stderr.contains('\u{1b}'),
        "no terminal escapes reach the log"
    );

    // Without an audit log: records are one JSON field of a log line. (QEMU
    // serves one monitor client at a time: the first gateway goes first.)
    drop(c);
    drop(gateway);
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--plugin", &plugin])
        .spawn();
    let _ = gateway.negotiated();
    let stderr = gateway.logged("qmpgate::audit");
    let line = stderr
        .lines()
        .find(|l| l.contains("qmpgate::audit"))
        .unwrap_or_else(|| panic!("no audit line:\n{stderr}"));
    assert!(
        line.contains(r#"record={"time":"#)
            && line.contains(r#""plugin":"forger","upstream":null,"client":null,"when":"init"}"#),
        "{line}"
    );
}
