//! Plugin authoring: the template builds as a user would build it, `qmpgate plugin
//! test` runs a plugin over a transcript, the audit plugin writes one record per
//! decision, reloads swap plugins without dropping clients, and a plugin built for
//! another WIT version is refused by name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use qmpgate_tests::{GatewayBuilder, Plugin, Qemu, eventually, guest, qmpgate_bin, tempdir};
use serde_json::{Value, json};

/// Runs `qmpgate plugin test` with a transcript on stdin; returns the output lines.
fn plugin_test(plugin: &Path, config: &Path, transcript: &str) -> (i32, Vec<Value>) {
    let mut child = Command::new(qmpgate_bin())
        .args(["plugin", "test"])
        .arg(plugin)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(transcript.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let lines = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (output.status.code().unwrap(), lines)
}

#[test]
fn plugin_test_prints_a_verdict_per_transcript_line() {
    let dir = tempdir();
    let config = dir.path().join("policy.toml");
    std::fs::write(&config, "profile = \"safe\"\nrules = [{ action = \"deny\", commands = [\"quit\"], desc = \"no\" }]\n").unwrap();
    let transcript = r#"{"execute": "query-status"}
{"execute": "quit"}
{"execute": "migrate", "arguments": {"uri": "exec:true"}}
not json
"#;
    let (code, lines) = plugin_test(&guest("qmp_policy"), &config, transcript);
    assert_eq!(code, 2, "an unreadable line makes the exit status 2");
    assert_eq!(lines[0]["verdict"], "forward");
    assert_eq!(lines[0]["command"]["execute"], "query-status");
    assert_eq!(lines[1]["verdict"], "deny");
    assert_eq!(
        lines[1]["error"]["desc"],
        "Command 'quit' is denied by policy: no"
    );
    assert_eq!(
        lines[2]["error"]["desc"],
        "Command 'migrate' is refused by the safe profile: its URI or channels make QEMU run a host program (exec:), write a host file (file:), use an fd (fd:) or open host sockets"
    );
    assert_eq!(lines[3], json!({"line": 4, "error": "not a JSON object"}));
}

#[test]
fn the_template_builds_on_its_own_and_works() {
    // Build the template as a user who copied it would: its own package, the SDK
    // by path, the same dependency versions as qmpgate's guests.
    let guests = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-plugins")
        .canonicalize()
        .unwrap();
    let work = tempdir();
    let copy = work.path().join("my-plugin");
    std::fs::create_dir_all(copy.join("src")).unwrap();
    std::fs::copy(guests.join("template/src/lib.rs"), copy.join("src/lib.rs")).unwrap();
    std::fs::copy(guests.join("Cargo.lock"), copy.join("Cargo.lock")).unwrap();
    let manifest = std::fs::read_to_string(guests.join("template/Cargo.toml"))
        .unwrap()
        .replace(
            "path = \"../sdk\"",
            &format!("path = \"{}\"", guests.join("sdk").display()),
        );
    std::fs::write(copy.join("Cargo.toml"), manifest).unwrap();
    // A stable target directory, so that later runs reuse the build.
    let target: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/template-build");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&copy)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .unwrap();
    assert!(status.success(), "the template does not build");
    let wasm = target.join("wasm32-wasip2/release/my_plugin.wasm");

    let config = work.path().join("my.toml");
    std::fs::write(
        &config,
        "deny = [\"system_reset\"]\nmessage = \"ask the operator\"\n",
    )
    .unwrap();
    let (code, lines) = plugin_test(
        &wasm,
        &config,
        "{\"execute\": \"system_reset\"}\n{\"execute\": \"cont\"}\n",
    );
    assert_eq!(code, 0);
    assert_eq!(lines[0]["error"]["desc"], "system_reset: ask the operator");
    assert_eq!(lines[1]["verdict"], "forward");

    // A bad configuration is refused at load time with serde's reason.
    std::fs::write(&config, "deny = \"system_reset\"\n").unwrap();
    let output = Command::new(qmpgate_bin())
        .args(["plugin", "test"])
        .arg(&wasm)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("init failed: invalid plugin configuration: invalid type: string \"system_reset\", expected a sequence"), "{stderr}");
}

#[test]
fn the_audit_plugin_writes_one_record_per_decision() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(Plugin::builtin("hmp", "hmp"))
        .plugin(Plugin::builtin("policy", "qmp-policy"))
        .plugin(Plugin::builtin("audit", "audit").config(json!({"arguments": true})));
    let log = builder.dir().join("audit.jsonl");
    let gateway = builder.args(["--audit-log", log.to_str().unwrap()]).spawn();
    let mut c = gateway.negotiated();
    c.execute("query-status", json!({}));
    c.execute("screendump", json!({"filename": "/tmp/qg-audit.ppm"}));
    c.execute(
        "human-monitor-command",
        json!({"command-line": "info status"}),
    );
    c.execute(
        "human-monitor-command",
        json!({"command-line": "frobnicate"}),
    );

    let records: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 4, "{records:?}");
    for r in &records {
        assert_eq!(r["plugin"], "audit");
        assert!(r["time"].as_f64().unwrap() > 1.7e9);
        assert_eq!(r["client"]["listener"], "qmp");
        assert_eq!(r["client"]["peer"]["unix"]["pid"], std::process::id());
    }
    assert_eq!(
        (&records[0]["command"], &records[0]["verdict"]),
        (&json!("query-status"), &json!("forwarded"))
    );
    assert_eq!(records[1]["verdict"], "denied");
    assert_eq!(
        records[1]["arguments"],
        json!({"filename": "/tmp/qg-audit.ppm"})
    );
    assert!(
        records[1]["error"]
            .as_str()
            .unwrap()
            .contains("refused by the safe profile")
    );
    assert_eq!(
        records[2]["command"], "query-status",
        "HMP is audited as what it means"
    );
    assert_eq!(records[2]["hmp"], "info status");
    assert_eq!(
        (&records[3]["verdict"], &records[3]["hmp"]),
        (&json!("denied"), &json!("frobnicate"))
    );
}

#[test]
fn a_plugin_built_for_another_wit_version_is_refused_by_name() {
    let qemu = Qemu::start();
    GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--plugin",
            &format!("future={}", guest("fixture_future").display()),
        ])
        .args([
            "--listen",
            "socket,id=l,path=/tmp/qmpgate-never.sock,server=on",
        ])
        .fails_with("plugin 'future' was built for qmpgate:plugin@0.9.0; this qmpgate supports qmpgate:plugin@0.2.0 and qmpgate:plugin@0.1.0");
}

#[test]
fn sighup_and_the_control_monitor_reload_plugins_without_dropping_clients() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec());
    let config = builder.dir().join("reload.toml");
    let control = builder.dir().join("control.sock");
    // The file is rewritten while the gateway runs: this test keeps its own.
    let write_rules = |commands: &[&str]| {
        let policy = Plugin::builtin("policy", "qmp-policy").config(json!({
            "profile": "permissive",
            "rules": [{"action": "deny", "commands": commands}],
        }));
        std::fs::write(&config, policy.to_string()).unwrap()
    };
    write_rules(&["quit"]);
    let gateway = builder
        .args(["--config", config.to_str().unwrap()])
        .args([
            "--control",
            &format!("socket,id=control,path={}", control.display()),
        ])
        .spawn();
    let mut c = gateway.negotiated();
    assert!(c.execute("query-name", json!({})).get("return").is_some());

    write_rules(&["quit", "query-name"]);
    gateway.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the new rules to apply after SIGHUP", || {
        c.execute("query-name", json!({})).get("error").is_some()
    });

    // A configuration that does not load keeps the running plugins, and says why.
    std::fs::write(
        &config,
        "[[plugin]]\nname = \"policy\"\nbuiltin = \"qmp-policy\"\nconfig = { profile = \"lax\" }\n",
    )
    .unwrap();
    let mut ctl = qmpgate_tests::QmpClient::connect(&control);
    assert_eq!(
        ctl.execute("qmp_capabilities", json!({})),
        json!({"return": {}})
    );
    let reply = ctl.execute("x-qmpgate-reload", json!({}));
    let desc = reply["error"]["desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains("init failed: invalid plugin configuration: unknown variant `lax`"),
        "{reply}"
    );
    assert!(
        c.execute("query-name", json!({})).get("error").is_some(),
        "the old rules still apply"
    );

    write_rules(&["quit"]);
    assert_eq!(
        ctl.execute("x-qmpgate-reload", json!({})),
        json!({"return": "reloaded plugins: hmp, policy"}),
        "the configuration's own policy, behind the built-in HMP reader"
    );
    assert!(c.execute("query-name", json!({})).get("return").is_some());
}
