//! The HTTP status endpoint (checked with a real HTTP client), the control monitor
//! with fds passed over SCM_RIGHTS, and `qmpgate run`'s shutdown (sd_notify is in
//! service.rs).

use std::io::{BufRead, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use qmpgate_tests::{
    Control, GatewayBuilder, QEMU_NONE, Qemu, QmpClient, http_get as get, python, qemu_argv,
    tempdir, with_status,
};
use serde_json::{Value, json};

#[test]
fn status_endpoints_report_upstream_chardevs_clients_and_plugins() {
    let qemu = Qemu::start();
    let (builder, url) = with_status(GatewayBuilder::new(&qemu.upstream_spec()));
    let gateway = builder.spawn();
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("screendump", json!({"filename": "/tmp/x"}))["error"]["class"],
        "GenericError"
    );

    // A name QEMU does not have is counted, but not by its name.
    assert_eq!(
        c.execute("x-no-such-command-4711", json!({}))["error"]["class"],
        "CommandNotFound"
    );
    assert!(c.execute("query-status", json!({}))["return"].is_object());

    assert_eq!(
        get(&format!("{url}/healthz")),
        (200, "text/plain; charset=utf-8".into(), "ok\n".into())
    );

    let (code, ctype, body) = get(&format!("{url}/status"));
    assert_eq!((code, ctype.as_str()), (200, "application/json"));
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["schema_version"], 1);
    let upstream = &status["upstreams"][0];
    assert_eq!(upstream["id"], "qemu");
    assert_eq!(upstream["connected"], true);
    assert_eq!(upstream["run_state"], "prelaunch");
    assert_eq!(upstream["qemu"]["qemu"]["major"], qemu.version().major());
    assert_eq!(upstream["policy"], "default");
    assert_eq!(upstream["listeners"], json!(["qmp"]));
    assert_eq!(upstream["counters"]["denied"], 1);
    assert_eq!(status["counters"]["denied"], 1);
    let listener = status["chardevs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "qmp")
        .unwrap();
    assert_eq!(listener["origin"], "inherited-fd");
    assert_eq!(listener["upstream"], "qemu");
    assert_eq!(listener["address"], "fd=3");
    let http = status["chardevs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "http")
        .unwrap();
    assert_eq!(
        (&http["role"], &http["origin"]),
        (&json!("status"), &json!("inherited-fd"))
    );
    // Where it really listens (the parent bound port 0).
    assert_eq!(
        http["bound"].as_str().unwrap(),
        format!("tcp:{}", url.strip_prefix("http://").unwrap())
    );
    let upstream = status["chardevs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["role"] == "upstream")
        .unwrap();
    assert_eq!(upstream["origin"], "path");
    let clients = status["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0]["listener"], "qmp");
    assert_eq!(clients[0]["peer"]["unix"]["pid"], std::process::id());
    assert_eq!(
        clients[0]["peer"]["unix"]["uid"],
        nix::unistd::getuid().as_raw()
    );
    assert_eq!(status["plugins"][0]["name"], "hmp");
    let plugin = &status["plugins"][1];
    assert_eq!(plugin["name"], "policy");
    assert_eq!(plugin["upstreams"], json!(["qemu"]));
    assert_eq!(plugin["denials"], 1);
    // Latency quantiles are bucket bounds (powers of two, in µs): the median is at
    // most the 99th percentile, and calls that ended within the CPU limit (50 ms
    // by default; a call past it is killed) sit at or below 2^16 µs.
    let calls = plugin["calls"].as_u64().unwrap();
    let p50 = plugin["latency_us"]["p50"].as_u64().unwrap();
    let p99 = plugin["latency_us"]["p99"].as_u64().unwrap();
    assert!(p50 <= p99, "{plugin}");
    assert!(p99 <= 50_000u64.next_power_of_two(), "{plugin}");

    let (code, ctype, metrics) = get(&format!("{url}/metrics"));
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    check_metrics_with_promtool(&metrics);
    // Per-upstream series only: a dashboard's sum() must not count twice.
    for family in [
        "qmpgate_denied_total",
        "qmpgate_clients_connected",
        "qmpgate_messages_total",
    ] {
        assert!(
            !metrics.contains(&format!("\n{family} ")),
            "{family}: {metrics}"
        );
    }
    assert!(
        metrics.contains("\nqmpgate_denied_total{upstream=\"qemu\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "\nqmpgate_build_info{{version=\"{}\",plugin_contracts=\"0.2.0,0.1.0\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    for (command, verdict, count) in [
        ("screendump", "denied", 1),
        ("screendump", "forwarded", 0),
        ("query-status", "forwarded", 1),
        ("other", "answered", 1),
    ] {
        assert!(
            metrics.contains(&format!(
                "\nqmpgate_commands_total{{upstream=\"qemu\",command=\"{command}\",verdict=\"{verdict}\"}} {count}\n"
            )),
            "{command} {verdict} {count}: {metrics}"
        );
    }
    assert!(!metrics.contains("4711"), "{metrics}");
    // QEMU's own time: one round trip per command forwarded (query-status).
    assert!(
        metrics.contains("\nqmpgate_qemu_round_trip_seconds_count{upstream=\"qemu\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nqmpgate_upstream_connected{upstream=\"qemu\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("qmpgate_plugin_denials_total{plugin=\"policy\",policy=\"default\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nqmpgate_clients_connected{upstream=\"qemu\"} 1\n"),
        "{metrics}"
    );
    // Every call is in the latency histogram (/status and /metrics agree).
    assert!(
        metrics.contains(&format!(
            "\nqmpgate_plugin_hook_seconds_bucket{{plugin=\"policy\",policy=\"default\",le=\"+Inf\"}} {calls}\n"
        )),
        "{calls} calls in:\n{metrics}"
    );

    // Read-only: nothing answers a POST.
    let out: Value = serde_json::from_str(&python(
        "http_get.py",
        &[&format!("{url}/status"), "--method", "POST"],
    ))
    .unwrap();
    assert_eq!(out["status"], 405);
    assert_eq!(get(&format!("{url}/nope")).0, 404);
}

#[test]
fn healthz_fails_while_qemu_is_away() {
    let mut qemu = Qemu::start();
    let upstream = format!("{},reconnect-ms=100000", qemu.upstream_spec());
    let (builder, url) = with_status(GatewayBuilder::new(&upstream));
    let gateway = builder.spawn();
    let _c = gateway.negotiated();
    qemu.kill();
    std::thread::sleep(Duration::from_millis(300));
    let (code, _, body) = get(&format!("{url}/healthz"));
    assert_eq!((code, body.as_str()), (503, "QEMU is not connected\n"));
}

#[test]
fn events_stream_as_server_sent_events() {
    let qemu = Qemu::start();
    let (builder, url) = with_status(GatewayBuilder::new(&qemu.upstream_spec()));
    let gateway = builder.spawn();
    let mut c = gateway.negotiated();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/http_get.py");
    let mut reader = std::process::Command::new("python3")
        .arg(script)
        .args([&format!("{url}/events"), "--sse", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(reader.stdout.take().unwrap()).lines();
    let head: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(head["content_type"], "text/event-stream");
    assert_eq!(c.execute("cont", json!({})), json!({"return": {}}));
    assert_eq!(c.execute("stop", json!({})), json!({"return": {}}));
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "RESUME");
    assert_eq!(first["data"]["event"], "RESUME");
    assert!(first["data"]["timestamp"]["seconds"].as_u64().is_some());
    assert_eq!(second["event"], "STOP");
    assert!(reader.wait().unwrap().success());
}

#[test]
fn control_monitor_adds_listeners_from_fds_passed_at_run_time() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec());
    let control_path = builder.dir().join("control.sock");
    let gateway = builder
        .args([
            "--control",
            &format!("socket,id=control,path={}", control_path.display()),
        ])
        .spawn();
    let _first = gateway.negotiated(); // the control socket exists once the gateway serves
    let mut control = Control::connect(&control_path);
    let none = None::<&UnixStream>;

    // A listening socket made by this process, handed over with getfd.
    let dir = tempdir();
    let extra_path = dir.path().join("extra.sock");
    let extra = UnixListener::bind(&extra_path).unwrap();
    assert_eq!(
        control.execute(
            json!({"execute": "getfd", "arguments": {"fdname": "extra"}}),
            Some(&extra)
        ),
        json!({"return": {}})
    );
    drop(extra);
    let add = |id: &str, name: &str| {
        json!({"execute": "chardev-add", "arguments": {"id": id, "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": name}}, "server": true}}}})
    };
    assert_eq!(
        control.execute(add("extra", "extra"), none),
        json!({"return": {}})
    );
    let mut client = QmpClient::negotiated(&extra_path);
    assert_eq!(
        client.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );

    let chardevs = control.execute(json!({"execute": "query-chardev"}), none);
    let labels: Vec<&str> = chardevs["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["qemu", "extra", "qmp"]);

    // QEMU's rules and messages.
    let err = |v: Value| v["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        err(control.execute(
            json!({"execute": "getfd", "arguments": {"fdname": "nofd"}}),
            none
        )),
        "No file descriptor supplied via SCM_RIGHTS"
    );
    assert_eq!(
        err(control.execute(add("again", "3"), none)),
        "File descriptor named '3' has not been found"
    );
    assert_eq!(
        err(control.execute(add("extra2", "extra"), none)),
        "File descriptor named 'extra' has not been found",
        "a named fd is used once"
    );
    assert_eq!(
        err(control.execute(add("extra", "extra"), none)),
        "Chardev 'extra' already exists",
        "an id in use is refused before anything else is touched"
    );
    assert_eq!(
        err(control.execute(
            json!({"execute": "closefd", "arguments": {"fdname": "ghost"}}),
            none
        )),
        "File descriptor named 'ghost' not found"
    );
    let tls = json!({"execute": "chardev-add", "arguments": {"id": "t", "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": "x"}}, "server": false, "tls-creds": "tls0"}}}});
    assert_eq!(
        err(control.execute(tls, none)),
        "TLS is not allowed on a client socket given as an fd: there is no host name to verify"
    );

    // The HMP forms.
    let hmp_dir = tempdir();
    let hmp_path = hmp_dir.path().join("hmp-added.sock");
    let hmp_listener = UnixListener::bind(&hmp_path).unwrap();
    let sent = control.execute(
        json!({"execute": "human-monitor-command", "arguments": {"command-line": "getfd viahmp"}}),
        Some(&hmp_listener),
    );
    assert_eq!(sent, json!({"return": ""}));
    drop(hmp_listener);
    assert_eq!(
        control.hmp("chardev-add socket,id=viahmp,fd=viahmp,server=on"),
        json!({"return": ""})
    );
    let mut third = QmpClient::negotiated(&hmp_path);
    assert_eq!(
        third.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    assert!(
        control.hmp("info chardev")["return"]
            .as_str()
            .unwrap()
            .contains("viahmp: filename=socket:fd=viahmp,server=on")
    );
    assert_eq!(
        control.hmp("chardev-add socket,id=bad,fd=7,server=on")["return"],
        "Error: File descriptor named '7' has not been found\r\n"
    );

    // Removing a listener stops new connections; existing clients stay.
    assert_eq!(
        control.execute(
            json!({"execute": "chardev-remove", "arguments": {"id": "extra"}}),
            none
        ),
        json!({"return": {}})
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        UnixStream::connect(&extra_path).is_err(),
        "the removed listener is closed"
    );
    assert_eq!(
        client.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    assert_eq!(
        err(control.execute(
            json!({"execute": "chardev-remove", "arguments": {"id": "extra"}}),
            none
        )),
        "Chardev 'extra' not found"
    );
}

#[test]
fn sigterm_under_run_quits_qemu_through_its_monitor() {
    let dir = tempdir();
    let listener = UnixListener::bind(dir.path().join("gate.sock")).unwrap();
    let mut gateway = GatewayBuilder::base()
        .fd(listener, 3)
        .args(["--listen", "socket,id=qmp,fd=3,server=on"])
        .spawn_run(&qemu_argv(QEMU_NONE));
    let mut c = QmpClient::negotiated(&dir.path().join("gate.sock"));
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    let mut saw_shutdown = false;
    while let Some(line) = c.read_line() {
        let message: Value = serde_json::from_str(&line).unwrap();
        if message["event"] == "SHUTDOWN" {
            saw_shutdown = true;
            assert_eq!(message["data"]["reason"], "host-qmp-quit");
        }
    }
    assert!(saw_shutdown, "clients see QEMU's SHUTDOWN");
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(0), "QEMU quit cleanly\n{stderr}");
}

#[test]
fn a_command_qemu_does_not_answer_in_time_gets_an_error_and_its_late_reply_goes_nowhere() {
    let fake = qmpgate_tests::FakeQemu::start(|name| match name {
        "slow" => qmpgate_tests::FakeAction::Delay(Duration::from_millis(1500)),
        _ => qmpgate_tests::FakeAction::Return,
    });
    let builder = GatewayBuilder::new(&fake.upstream_spec());
    let config = builder.dir().join("timeouts.toml");
    std::fs::write(&config, "command-timeouts = { slow = 300 }\n").unwrap();
    let (builder, url) = with_status(builder.args([
        "--config",
        config.to_str().unwrap(),
        "--profile",
        "permissive",
    ]));
    let gateway = builder.spawn();
    let mut c = gateway.negotiated();
    let started = std::time::Instant::now();
    c.send(&json!({"execute": "slow", "id": 1}));
    let reply = c.read();
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "the error comes in time"
    );
    assert_eq!(reply["id"], 1);
    assert_eq!(
        reply["error"]["desc"],
        "QEMU did not answer 'slow' within 300 ms; qmpgate stopped waiting (a late reply will be discarded)"
    );
    // The next command waits behind the slow one inside QEMU; the late reply to
    // `slow` must not be taken for its answer.
    c.send(&json!({"execute": "fast", "id": 2}));
    assert_eq!(c.read(), json!({"return": {}, "id": 2}));
    let (_, _, body) = get(&format!("{url}/status"));
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["counters"]["late_replies_discarded"], 1);
}

#[test]
fn events_raised_while_nobody_listens_are_kept_for_the_next_client() {
    let qemu = Qemu::start();
    let (builder, url) = with_status(GatewayBuilder::new(&qemu.upstream_spec()));
    let gateway = builder.spawn();
    {
        let mut a = gateway.negotiated();
        assert_eq!(a.execute("cont", json!({})), json!({"return": {}}));
        assert_eq!(a.execute("stop", json!({})), json!({"return": {}}));
    }
    // A client that connects afterwards asks qmpgate for what it missed.
    let mut b = gateway.negotiated();
    let kept = b.execute("query-qmpgate-events", json!({}));
    let list = kept["return"]
        .as_array()
        .unwrap_or_else(|| panic!("{kept}"));
    let names: Vec<&str> = list
        .iter()
        .map(|e| e["event"]["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["RESUME", "STOP"]);
    let first = list[0]["seq"].as_u64().unwrap();
    assert!(list[1]["seq"].as_u64().unwrap() > first);
    assert!(list[0]["event"]["timestamp"]["seconds"].as_u64().is_some());
    let after = b.execute("query-qmpgate-events", json!({"since": first}));
    assert_eq!(after["return"].as_array().unwrap().len(), 1);
    assert_eq!(after["return"][0]["event"]["event"], "STOP");
    assert_eq!(
        b.execute("query-qmpgate-events", json!({"since": "yesterday"}))["error"]["desc"],
        "Invalid parameter type for 'since', expected: integer"
    );

    // The SSE stream replays the same history from `since`, with the seq as its id.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/http_get.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([&format!("{url}/events?since=0"), "--sse", "2"])
        .output()
        .unwrap();
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[1]["event"], "RESUME");
    assert_eq!(lines[2]["event"], "STOP");
}

/// `promtool check metrics` (Prometheus' own linter) finds nothing to say.
fn check_metrics_with_promtool(metrics: &str) {
    use std::io::Write;
    let promtool = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/prometheus/usr/bin/promtool");
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} (scripts/setup.sh test): {e}", promtool.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{metrics}"
    );
}
