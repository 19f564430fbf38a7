//! End-to-end against real QEMU: the gateway in front of `qemu-system-x86_64 -M none`.

use qmpgate_tests::{GatewayBuilder, Plugin, QEMU_NONE, Qemu, QmpClient, python, qemu_argv};
use serde_json::{Value, json};

#[test]
fn greeting_negotiation_and_commands_match_qemu() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec()).spawn();
    let mut c = gateway.client();
    assert_eq!(
        c.greeting["QMP"]["version"]["qemu"]["major"],
        qemu.version().major(),
        "QEMU's own version is relayed"
    );
    assert_eq!(c.greeting["QMP"]["capabilities"], json!(["oob"]));

    // Before negotiation, QEMU's exact error.
    assert_eq!(
        c.execute("query-status", json!({})),
        json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
    );
    assert_eq!(
        c.execute("qmp_capabilities", json!({})),
        json!({"return": {}})
    );
    assert_eq!(
        c.execute("qmp_capabilities", json!({})),
        json!({"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}})
    );

    // Any JSON value is a valid id and comes back verbatim.
    for id in [
        json!(1),
        json!("abc"),
        json!({"nested": [1, {"x": null}]}),
        json!([true]),
        json!(null),
    ] {
        c.send(&json!({"execute": "query-status", "id": id}));
        let reply = c.read_reply();
        assert_eq!(reply["return"]["status"], "prelaunch");
        assert_eq!(reply["id"], id);
    }

    // QEMU's own errors pass through.
    let reply = c.execute("no-such-command", json!({}));
    assert_eq!(reply["error"]["class"], "CommandNotFound");
    assert_eq!(
        reply["error"]["desc"],
        "The command no-such-command has not been found"
    );
}

#[test]
fn replies_end_in_crlf_and_back_to_back_commands_without_newlines_work() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec()).spawn();
    let mut c = gateway.negotiated();
    c.send_raw(br#"{"execute":"query-status","id":1}{"execute":"query-name","id":2}{'execute':'query-kvm','id':3}"#);
    for id in 1..=3 {
        let line = c.read_line().unwrap();
        assert!(line.ends_with("}\r\n"), "{line:?}");
        let reply: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["id"], id, "in-band replies keep their order");
        assert!(reply.get("return").is_some(), "{reply}");
    }
    // One byte at a time.
    for b in br#"{"execute": "query-status", "id": "slow"}"# {
        c.send_raw(&[*b]);
    }
    assert_eq!(c.read_reply()["id"], "slow");
}

#[test]
fn official_python_client_works_and_sees_policy_errors() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec()).spawn();
    let steps = json!([
        {"execute": "query-status"},
        {"execute": "screendump", "arguments": {"filename": "/nonexistent/shot.ppm"}},
        {"execute": "migrate", "arguments": {"uri": "exec:true"}},
        {"execute": "query-version"},
    ]);
    let out: Value = serde_json::from_str(&python(
        "qmp_steps.py",
        &[gateway.path.to_str().unwrap(), &steps.to_string()],
    ))
    .unwrap();
    assert_eq!(out[0]["return"]["status"], "prelaunch");
    assert_eq!(out[1]["error"]["class"], "GenericError");
    assert_eq!(
        out[1]["error"]["desc"],
        "Command 'screendump' is refused by the safe profile: it writes a host file named by the client"
    );
    assert!(
        out[2]["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("Command 'migrate' is refused by the safe profile: its URI or channels make QEMU run a host program")
    );
    // (What these would have done to the host is checked in policy.rs.)
    assert_eq!(out[3]["return"]["qemu"]["major"], qemu.version().major());
}

#[test]
fn twenty_python_clients_at_once_get_their_own_replies_and_all_events() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec()).spawn();
    let out: Value = serde_json::from_str(&python(
        "many_clients.py",
        &[gateway.path.to_str().unwrap(), "20", "25"],
    ))
    .unwrap();
    assert_eq!(out["checked"], 20 * 25);
    assert_eq!(out["misrouted"], 0);
    for i in 0..20 {
        assert_eq!(
            out["events"][i.to_string()],
            json!(["RESUME", "STOP"]),
            "client {i}: {out}"
        );
    }
}

#[test]
fn operator_rules_deny_by_name_and_readonly_profile_allows_only_queries() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--profile", "readonly"])
        .spawn();
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    assert_eq!(
        c.execute("cont", json!({}))["error"]["desc"],
        "Command 'cont' is refused by the readonly profile: it needs the 'safe' profile"
    );
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch",
        "the refused cont did not run the VM"
    );

    let mut qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(Plugin::builtin("policy", "qmp-policy").config(json!({
            "profile": "permissive",
            "rules": [{"action": "deny", "commands": ["quit", "system_*"], "desc": "ask the operator"}],
        })))
        .spawn();
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("quit", json!({})),
        json!({"error": {"class": "GenericError", "desc": "Command 'quit' is denied by policy: ask the operator"}})
    );
    assert_eq!(
        c.execute("system_reset", json!({}))["error"]["class"],
        "GenericError"
    );
    assert_eq!(c.execute("cont", json!({})), json!({"return": {}}));
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "running"
    );
    assert!(qemu.is_running(), "the denied quit stopped QEMU");

    // Without the rule, the same quit stops QEMU: the rule is what kept it running.
    drop((c, gateway));
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(Plugin::builtin("policy", "qmp-policy").config(json!({"profile": "permissive"})))
        .spawn();
    let mut c = gateway.negotiated();
    c.send(&json!({"execute": "quit"}));
    assert!(qemu.wait().success());
}

#[test]
fn quit_through_the_gateway_stops_qemu_and_the_gateway_cleanly() {
    let mut qemu = Qemu::start();
    let mut gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--profile", "permissive"])
        .spawn();
    let mut c = gateway.negotiated();
    c.send(&json!({"execute": "quit", "id": "bye"}));
    // SHUTDOWN event, then the reply, as QEMU sends them.
    let mut saw_shutdown = false;
    loop {
        let message = c.read();
        if message["event"] == "SHUTDOWN" {
            saw_shutdown = true;
            continue;
        }
        assert_eq!(message, json!({"return": {}, "id": "bye"}));
        break;
    }
    assert!(saw_shutdown);
    assert!(qemu.wait().success());
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn run_launches_qemu_on_a_preopened_socket_and_passes_its_exit_status() {
    let dir = qmpgate_tests::tempdir();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("gate.sock")).unwrap();
    let mut gateway = GatewayBuilder::base()
        .fd(listener, 3)
        .args([
            "--listen",
            "socket,id=qmp,fd=3,server=on",
            "--profile",
            "permissive",
        ])
        .spawn_run(&qemu_argv(QEMU_NONE));
    let mut c = QmpClient::negotiated(&dir.path().join("gate.sock"));
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    c.send(&json!({"execute": "quit"}));
    let exited = exit_event(&mut c);
    assert_eq!(
        exited["data"],
        json!({"status": "exit status 0", "exit-code": 0})
    );
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(0), "{stderr}");
}

/// Reads until EOF; returns the `QMPGATE_QEMU_EXITED` event.
fn exit_event(c: &mut QmpClient) -> Value {
    let mut found = None;
    while let Some(line) = c.read_line() {
        let message: Value = serde_json::from_str(&line).unwrap();
        if message["event"] == "QMPGATE_QEMU_EXITED" {
            found = Some(message);
        }
    }
    found.expect("clients are told how QEMU exited")
}

#[test]
fn run_reports_a_qemu_killed_under_it() {
    let dir = qmpgate_tests::tempdir();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("gate.sock")).unwrap();
    let mut gateway = GatewayBuilder::base()
        .fd(listener, 3)
        .args(["--listen", "socket,id=qmp,fd=3,server=on"])
        .spawn_run(&qemu_argv(QEMU_NONE));
    let mut c = QmpClient::negotiated(&dir.path().join("gate.sock"));
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", gateway.pid())).unwrap();
    let qemu: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exited = exit_event(&mut c);
    assert_eq!(
        exited["data"],
        json!({"status": "killed by signal 9", "exit-code": 137})
    );
    let (code, _) = gateway.wait();
    assert_eq!(
        code,
        Some(137),
        "qmpgate passes on QEMU's fate, as a shell would"
    );
}

#[test]
fn run_reports_a_qemu_that_fails_at_start_up_at_once() {
    let started = std::time::Instant::now();
    let dir = qmpgate_tests::tempdir();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("gate.sock")).unwrap();
    let mut gateway = GatewayBuilder::base()
        .fd(listener, 3)
        .args(["--listen", "socket,id=qmp,fd=3,server=on"])
        .spawn_run(&qemu_argv(&["-M", "no-such-machine"]));
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("QEMU exited at start-up (exit status 1)"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "no hang"
    );
}
