//! Trying a policy on live traffic: a plugin in audit mode (`--audit-only NAME`, or
//! `mode = "audit"` in its `[[plugin]]` entry) refuses nothing; what it would have
//! refused reaches QEMU and is logged, written to the audit log with the host's
//! fields, and counted. Plugins in enforce mode beside it still refuse.

use qmpgate_tests::{GatewayBuilder, Qemu, QmpClient, http_get, tempdir, with_status};
use serde_json::{Value, json};

/// Whether QEMU has a chardev of this id (asked directly, not through qmpgate).
fn chardevs(c: &mut QmpClient) -> Vec<String> {
    let reply = c.execute("query-chardev", json!({}));
    reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap().to_string())
        .collect()
}

fn audit_records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ringbuf(id: &str) -> Value {
    json!({"id": id, "backend": {"type": "ringbuf", "data": {}}})
}

#[test]
fn the_built_in_policy_in_audit_mode_records_what_it_would_refuse_and_lets_it_run() {
    let qemu = Qemu::start();
    let dir = tempdir();
    let audit = dir.path().join("audit.log");

    // Enforced, readonly refuses chardev-add: QEMU never gets it.
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--profile", "readonly"])
        .spawn();
    let mut c = gateway.negotiated();
    let refused = c.execute("chardev-add", ringbuf("enforced"));
    assert!(
        refused["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("refused by the readonly profile"),
        "{refused}"
    );
    drop((c, gateway));

    // In audit mode the same command runs, and is recorded.
    let (builder, url) = with_status(GatewayBuilder::new(&qemu.upstream_spec()).args([
        "--profile",
        "readonly",
        "--audit-only",
        "policy",
        "--audit-log",
        audit.to_str().unwrap(),
    ]));
    let gateway = builder.spawn();
    gateway.logged("audit mode: its refusals are logged, audited and counted, not enforced");
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("chardev-add", ringbuf("tried")),
        json!({"return": {}})
    );
    assert!(chardevs(&mut c).contains(&"tried".to_string()));
    assert!(!chardevs(&mut c).contains(&"enforced".to_string()));
    // What readonly allows is no audit matter.
    assert!(c.execute("query-status", json!({}))["return"].is_object());
    // An HMP line QEMU would read otherwise is still refused: there is no
    // judged command to run instead of it.
    let hmp = c.execute(
        "human-monitor-command",
        json!({"command-line": "chardev-add null,id=c,backend=file,path=/nonexistent/x"}),
    );
    assert!(
        hmp["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("HMP command line refused"),
        "{hmp}"
    );
    let log = gateway.logged("audit mode: would refuse; let through");
    assert!(log.contains("chardev-add"), "{log}");

    let would: Vec<Value> = audit_records(&audit)
        .into_iter()
        .filter(|r| r.get("would-deny").is_some())
        .collect();
    assert_eq!(would.len(), 1, "{would:?}");
    let record = &would[0];
    assert_eq!(record["would-deny"], "chardev-add");
    assert_eq!(record["mode"], "audit");
    assert_eq!(record["plugin"], "policy");
    assert_eq!(record["upstream"], "qemu");
    assert_eq!(record["client"]["listener"], "qmp");
    assert!(
        record["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("refused by the readonly profile"),
        "{record}"
    );

    let (_, _, metrics) = http_get(&format!("{url}/metrics"));
    let line = metrics
        .lines()
        .find(|l| l.starts_with("qmpgate_plugin_would_deny_total{plugin=\"policy\""))
        .unwrap_or_else(|| panic!("no would-deny series: {metrics}"));
    assert!(line.ends_with(" 1"), "{line}");
    let (_, _, status) = http_get(&format!("{url}/status"));
    let status: Value = serde_json::from_str(&status).unwrap();
    let policy = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "policy")
        .unwrap();
    assert_eq!(
        (policy["would_deny"].as_u64(), policy["denials"].as_u64()),
        (Some(1), Some(0))
    );
}

#[test]
fn a_policy_tried_in_audit_mode_leaves_the_enforced_one_in_place() {
    let qemu = Qemu::start();
    let dir = tempdir();
    let config = dir.path().join("qmpgate.toml");
    std::fs::write(
        &config,
        "[[plugin]]\nname = \"try\"\nbuiltin = \"qmp-policy\"\nmode = \"audit\"\nconfig = { profile = \"readonly\" }\n",
    )
    .unwrap();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["-c", config.to_str().unwrap()])
        .spawn();
    let mut c = gateway.negotiated();
    // The tried (readonly) policy would refuse chardev-add; the enforced default
    // (safe) allows a ringbuf, so it runs and the tried one's refusal is logged.
    assert_eq!(
        c.execute("chardev-add", ringbuf("r1")),
        json!({"return": {}})
    );
    assert!(chardevs(&mut c).contains(&"r1".to_string()));
    let log = gateway.logged("audit mode: would refuse; let through");
    assert!(
        log.contains("plugin=try") || log.contains("\"plugin\":\"try\""),
        "{log}"
    );
    // What safe refuses is still refused, by the enforced policy.
    let refused = c.execute(
        "screendump",
        json!({"filename": dir.path().join("shot.ppm")}),
    );
    assert!(
        refused["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("refused by the safe profile"),
        "{refused}"
    );
    assert!(!dir.path().join("shot.ppm").exists());

    // A mode that does not exist stops start-up.
    std::fs::write(
        &config,
        "[[plugin]]\nname = \"try\"\nbuiltin = \"qmp-policy\"\nmode = \"dry\"\n",
    )
    .unwrap();
    let listen = format!(
        "socket,id=l,path={},server=on",
        dir.path().join("l.sock").display()
    );
    GatewayBuilder::new(&qemu.upstream_spec())
        .args(["-c", config.to_str().unwrap(), "--listen", &listen])
        .fails_with("plugin 'try': mode 'dry' (modes: enforce, audit)");
    GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--audit-only", "polcy", "--listen", &listen])
        .fails_with("--audit-only: no plugin named 'polcy' in the chain (chain: hmp, policy)");
}
