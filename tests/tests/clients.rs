//! Many clients on one QEMU: per-client event filtering, slow clients, reconnects
//! and the commands that would cut the gateway's own link.

use std::time::{Duration, Instant};

use qmpgate_tests::{GatewayBuilder, Plugin, Qemu, QmpClient};
use serde_json::{Value, json};

/// Reads messages until an event named `name` arrives or `within` passes.
fn wait_event(c: &mut QmpClient, name: &str, within: Duration) -> Option<Value> {
    c.stream().set_read_timeout(Some(within)).unwrap();
    let found = loop {
        let Some(line) = c.read_line_or_timeout() else {
            break None;
        };
        let message: Value = serde_json::from_str(&line).unwrap();
        if message["event"] == name {
            break Some(message);
        }
    };
    c.stream()
        .set_read_timeout(Some(qmpgate_tests::TIMEOUT))
        .unwrap();
    found
}

#[test]
fn events_pass_the_plugin_chain_per_client() {
    let qemu = Qemu::start();
    let (builder, dashboard_path) = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(Plugin::builtin("policy", "qmp-policy").config(json!({
            "profile": "permissive",
            "events": [{"action": "drop", "events": ["STOP"], "listeners": ["dashboard"]}],
        })))
        .listener("dashboard", 4);
    let gateway = builder.spawn();
    let mut admin = gateway.negotiated();
    let mut watcher = gateway.negotiated();
    let mut dashboard = QmpClient::negotiated(&dashboard_path);

    assert_eq!(admin.execute("cont", json!({})), json!({"return": {}}));
    assert_eq!(admin.execute("stop", json!({})), json!({"return": {}}));
    assert_eq!(
        events_through(&mut watcher, "STOP", 1),
        ["RESUME", "STOP"],
        "the qmp listener sees STOP"
    );
    // A second RESUME, after the STOP: events reach a client in order, so once it
    // arrives, a STOP that was delivered would have come before it.
    assert_eq!(admin.execute("cont", json!({})), json!({"return": {}}));
    assert_eq!(
        events_through(&mut dashboard, "RESUME", 2),
        ["RESUME", "RESUME"],
        "the dashboard listener's policy drops STOP, and only STOP"
    );
}

/// The names of the events `c` receives, up to and including the `count`th named
/// `last`.
fn events_through(c: &mut QmpClient, last: &str, count: usize) -> Vec<String> {
    let mut names = Vec::new();
    let mut seen = 0;
    while seen < count {
        let message = c.read();
        let name = message["event"]
            .as_str()
            .unwrap_or_else(|| panic!("an event, not {message}"));
        seen += usize::from(name == last);
        names.push(name.to_string());
    }
    names
}

/// A client that stops reading is cut off once a write has been blocked for the
/// write timeout (shrunk here from 10 s to 2 s), and meanwhile every other client's
/// command is answered in well under that: a stuck client holds nobody up.
#[test]
fn a_client_that_does_not_read_is_cut_off_and_blocks_nobody() {
    const WRITE_TIMEOUT: Duration = Duration::from_millis(2000);
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--write-timeout-ms".to_string(),
            WRITE_TIMEOUT.as_millis().to_string(),
        ])
        .spawn();
    let mut stuck = gateway.negotiated();
    let mut fine = gateway.negotiated();
    // Big replies, never read: the socket buffers fill and qmpgate's writes block.
    for i in 0..200 {
        stuck.send(&json!({"execute": "query-qmp-schema", "id": i}));
    }
    let started = Instant::now();
    let mut commands = 0;
    qmpgate_tests::eventually("the stuck client is cut off", || {
        let t = Instant::now();
        assert_eq!(
            fine.execute("query-status", json!({}))["return"]["status"],
            "prelaunch"
        );
        // Half the write timeout: a command held up behind the stuck client's
        // blocked write would wait about the whole of it.
        assert!(
            t.elapsed() < WRITE_TIMEOUT / 2,
            "another client's command waited {:?}",
            t.elapsed()
        );
        commands += 1;
        gateway.stderr().contains("client does not read")
    });
    let cut_off = started.elapsed();
    assert!(
        cut_off >= WRITE_TIMEOUT / 2 && cut_off < Duration::from_secs(8),
        "cut off after {cut_off:?}: --write-timeout-ms {WRITE_TIMEOUT:?} was not applied (the default is 10 s)"
    );
    assert!(
        commands >= 5,
        "only {commands} commands of the other client ran meanwhile"
    );
    // Draining what the kernel buffered ends in EOF well before all 200 replies.
    let mut replies = 0;
    while stuck.read_line().is_some() {
        replies += 1;
    }
    assert!(
        replies < 200,
        "got all {replies} replies: the stuck client was never cut off"
    );
}

#[test]
fn with_reconnect_ms_clients_survive_a_qemu_restart() {
    let mut qemu = Qemu::start();
    let upstream = format!("{},reconnect-ms=100", qemu.upstream_spec());
    let gateway = GatewayBuilder::new(&upstream).spawn();
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );

    qemu.kill();
    let lost = wait_event(&mut c, "QMPGATE_UPSTREAM_LOST", Duration::from_secs(5))
        .expect("told of the loss");
    assert_eq!(lost["data"]["reason"], "QEMU closed the monitor connection");
    // While QEMU is away, commands fail at once with a clear error.
    let reply = c.execute("query-status", json!({}));
    assert_eq!(
        reply["error"]["desc"],
        "QEMU is not connected; qmpgate is reconnecting"
    );

    qemu.restart();
    assert!(wait_event(&mut c, "QMPGATE_UPSTREAM_RESTORED", Duration::from_secs(5)).is_some());
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

#[test]
fn commands_that_would_cut_the_gateways_link_are_refused_by_default() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec()).spawn();
    let mut c = gateway.negotiated();
    for (name, args) in [
        ("add_client", json!({"protocol": "vnc", "fdname": "x"})),
        (
            "yank",
            json!({"instances": [{"type": "chardev", "id": "mon"}]}),
        ),
        ("chardev-remove", json!({"id": "mon"})),
        ("getfd", json!({"fdname": "x"})),
    ] {
        let reply = c.execute(name, args);
        let desc = reply["error"]["desc"].as_str().unwrap_or_default();
        assert!(
            desc.starts_with(&format!("Command '{name}' is refused by the safe profile")),
            "{name}: {reply}"
        );
    }
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch",
        "the link is intact"
    );
}
