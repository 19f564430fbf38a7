//! The plugin contract's versions, end to end against real QEMU: a plugin built
//! for the frozen 0.1.0 still loads and has every hook called; a 0.2.0 plugin
//! gets only the hooks it declares, the client's upstream, the `command-schema`
//! import, `on-disconnect`, and both forms of an HMP line; an HMP command a
//! plugin rewrites is refused, not run.

use qmpgate_tests::{GatewayBuilder, Plugin, Qemu, QmpClient, guest, http_get, with_status};
use serde_json::{Value, json};

fn desc(reply: &Value) -> &str {
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error: {reply}"))
}

/// Events a watching client receives until (and with) `last`.
fn events_until(watcher: &mut QmpClient, last: &str) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        let message = watcher.read();
        let name = message["event"].as_str().unwrap_or_default().to_string();
        names.push(name.clone());
        if name == last {
            return names;
        }
    }
}

#[test]
fn a_plugin_built_for_0_1_0_still_loads_and_every_hook_is_called() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec());
    let audit = builder.dir().join("audit.jsonl");
    let gateway = builder
        .plugin(Plugin::wasm("legacy", &guest("fixture_legacy")))
        .args(["--audit-log", audit.to_str().unwrap()])
        .spawn();
    let mut watcher = gateway.negotiated();
    let mut c = gateway.negotiated();

    // on-command: its denial and its own answer (with what 0.1.0 sees of the
    // client, and of the HMP line).
    assert_eq!(
        desc(&c.execute("stop", json!({}))),
        "the 0.1.0 plugin denies stop"
    );
    let typed = "info  status";
    let status = c.execute("human-monitor-command", json!({"command-line": typed}));
    assert_eq!(status["return"], "VM status: paused (prelaunch)\r\n");
    // A 0.1.0 plugin is shown the line QEMU runs (the canonical one), as 0.1.0
    // hosts did (they ran only lines that were their own canonical form).
    assert_eq!(
        c.execute("query-name", json!({}))["return"],
        json!({"name": "legacy", "listener": "qmp", "tls-identity": "", "last-hmp": "info status"})
    );
    // on-response: QEMU's answer replaced.
    assert_eq!(c.execute("cont", json!({})), json!({"return": {}}));
    assert_eq!(
        c.execute("query-status", json!({}))["return"],
        json!({"status": "legacy-saw-running"})
    );
    // on-event: RESUME (from `cont`) is dropped, RESET (after it) delivered.
    assert_eq!(c.execute("system_reset", json!({})), json!({"return": {}}));
    assert_eq!(events_until(&mut watcher, "RESET"), ["RESET"]);

    // on-decision: one audit record per decision, with the host's fields.
    let records: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decided: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["client"]["id"] == records.last().unwrap()["client"]["id"])
        .map(|r| {
            (
                r["legacy"].as_str().unwrap(),
                r["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        decided,
        [
            ("stop", "denied"),
            // `info  status` as the built-in hmp plugin reads it.
            ("query-status", "forwarded"),
            ("query-name", "answered"),
            ("cont", "forwarded"),
            ("query-status", "forwarded"),
            ("system_reset", "forwarded"),
        ],
        "{records:?}"
    );
    assert_eq!(records.last().unwrap()["upstream"], "qemu");
}

/// The probe implements `on-command` and `on-disconnect` only.
fn probe(config: Value) -> Plugin {
    Plugin::wasm("probe", &guest("fixture_probe")).config(config)
}

#[test]
fn a_0_2_0_plugin_is_called_only_for_the_hooks_it_declares() {
    let qemu = Qemu::start();
    let (builder, url) = with_status(
        GatewayBuilder::new(&qemu.upstream_spec())
            .plugin(probe(json!({})))
            .args(["--no-default-policy"]),
    );
    let gateway = builder.spawn();
    let mut watcher = gateway.negotiated();
    let mut c = gateway.negotiated();
    for command in ["query-status", "cont", "query-status", "system_reset"] {
        assert!(c.execute(command, json!({}))["return"].is_object());
    }
    // Two events for each of two clients: none reaches the plugin.
    assert_eq!(events_until(&mut watcher, "RESET"), ["RESUME", "RESET"]);
    let (_, _, body) = http_get(&format!("{url}/status"));
    let status: Value = serde_json::from_str(&body).unwrap();
    let calls = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "probe")
        .unwrap_or_else(|| panic!("{status}"))["calls"]
        .clone();
    // qmp_capabilities is the gateway's own: 4 commands, 4 calls (a plugin
    // called for every hook would have had 4 responses and 4 events more).
    assert_eq!(calls, 4, "{status}");
}

#[test]
fn a_plugin_sees_the_upstream_and_its_clients_leave() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(probe(json!({})))
        .spawn();
    let mut a = gateway.negotiated();
    let mut b = gateway.negotiated();
    let seen = |c: &mut QmpClient| c.execute("query-name", json!({}))["return"].clone();
    let first = seen(&mut a);
    assert_eq!(first["upstream"], "qemu");
    assert_eq!(first["tls"], Value::Null);
    let a_id = first["clients"][0].clone();
    let both = seen(&mut b);
    assert_eq!(both["clients"].as_array().unwrap().len(), 2, "{both}");
    drop(a);
    qmpgate_tests::eventually("the plugin is told client a left", || {
        let now = seen(&mut b);
        now["clients"].as_array().unwrap().len() == 1 && now["clients"][0] != a_id
    });
}

#[test]
fn a_plugin_can_decide_by_qemus_schema() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(probe(json!({"deny-member": "filename"})))
        .args(["--profile", "permissive"])
        .spawn();
    let mut c = gateway.negotiated();
    let dir = qmpgate_tests::tempdir();
    let shot = dir.path().join("shot.ppm");
    // screendump's schema has `filename` (on 7.2 and 10.0): denied by type.
    assert_eq!(
        desc(&c.execute("screendump", json!({"filename": shot}))),
        "QEMU's schema says 'screendump' takes 'filename'"
    );
    // The same through HMP: the plugin decides on the reading.
    let hmp = format!("screendump {}", shot.display());
    assert_eq!(
        desc(&c.execute("human-monitor-command", json!({"command-line": hmp}))),
        "QEMU's schema says 'screendump' takes 'filename'"
    );
    // An HMP-only command is in no QMP schema: the plugin is told so (not
    // "nothing known"), and refuses it.
    assert_eq!(
        desc(&c.execute(
            "human-monitor-command",
            json!({"command-line": "savevm s1"})
        )),
        "no schema for 'hmp:savevm': NoSuchCommand"
    );
    // Commands without it pass.
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

#[test]
fn an_hmp_line_reaches_qemu_in_its_canonical_form_and_plugins_see_both() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(probe(json!({})))
        .spawn();
    let mut c = gateway.negotiated();
    // Spaced out and quoted (QEMU unquotes `chardev-add`'s argument): QEMU is
    // sent the line rebuilt from the reading, and runs it.
    let typed = "chardev-add   \"ringbuf,id=rb9,size=4096\"";
    let hmp = c.execute("human-monitor-command", json!({"command-line": typed}));
    assert_eq!(hmp["return"], "", "{hmp}");
    let seen = c.execute("query-name", json!({}))["return"]["hmp"].clone();
    assert_eq!(
        seen,
        json!({"typed": typed, "canonical": "chardev-add ringbuf,id=rb9,size=4096"})
    );
    let chardevs = c.execute("query-chardev", json!({}));
    assert!(
        chardevs["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["label"] == "rb9" && c["filename"] == "ringbuf"),
        "{chardevs}"
    );
}

#[test]
fn an_hmp_command_a_plugin_rewrites_is_refused_not_run() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(probe(json!({"rewrite-stop": true})))
        .spawn();
    let mut c = gateway.negotiated();
    assert_eq!(c.execute("cont", json!({})), json!({"return": {}}));
    // As QMP, the rewrite is honoured: `stop` becomes `cont`.
    assert_eq!(c.execute("stop", json!({})), json!({"return": {}}));
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "running"
    );
    // As HMP it cannot be: refused, and QEMU ran nothing.
    assert_eq!(
        desc(&c.execute("human-monitor-command", json!({"command-line": "stop"}))),
        "HMP command 'stop' refused: plugin 'probe' rewrote it, and an HMP line cannot be rewritten"
    );
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "running"
    );
}
