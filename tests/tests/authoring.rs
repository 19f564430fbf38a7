//! Plugin authoring: README's tutorial runs as written, the template builds inside
//! and outside the repository, `qmpgate plugin test` runs a plugin, a built-in or a
//! whole chain over a transcript, the audit plugin writes one record per
//! decision, reloads swap plugins without dropping clients, and a plugin built for
//! another WIT version is refused by name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use qmpgate_tests::{GatewayBuilder, Plugin, Qemu, eventually, guest, qmpgate_bin, tempdir};
use serde_json::{Value, json};

/// Runs `qmpgate plugin test ARGS` with a transcript on stdin; returns the exit
/// status and the output lines.
fn plugin_test<S: AsRef<std::ffi::OsStr>>(args: &[S], transcript: &str) -> (i32, Vec<Value>) {
    let mut child = Command::new(qmpgate_bin())
        .args(["plugin", "test"])
        .args(args)
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
    let (code, lines) = plugin_test(
        &[
            guest("qmp_policy").as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        transcript,
    );
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

/// The first fenced block of `kind` after `from` in the README's tutorial section.
fn readme_block(readme: &str, from: usize, kind: &str) -> (String, usize) {
    let open = format!("```{kind}\n");
    let start = readme[from..].find(&open).expect("a fenced block") + from + open.len();
    let end = readme[start..].find("```\n").unwrap() + start;
    (readme[start..end].to_string(), end)
}

#[test]
fn the_tutorial_works_as_written() {
    // README's commands, run as written by bash from the top folder, with qmpgate on
    // PATH and a fresh HOME (where the tutorial puts the plugin): what they print
    // is README's output block, line for line.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let section = readme
        .find("## Writing a plugin in five minutes")
        .expect("the tutorial section");
    let (script, after) = readme_block(&readme, section, "sh");
    let (expected, _) = readme_block(&readme, after, "text");
    let home = tempdir();
    let bin_dir = qmpgate_bin().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&repo)
        .env("HOME", home.path())
        .env("PATH", path)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the tutorial failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout, expected);
    // It built where it says, and nothing landed in the checkout.
    assert!(
        home.path()
            .join("my-plugin/target/wasm32-wasip2/release/my_plugin.wasm")
            .exists()
    );
    assert!(!repo.join("guest-plugins/template/target").exists());
}

#[test]
fn the_template_builds_inside_the_repository_and_refuses_bad_configuration() {
    // Copied into a folder under qmpgate's own workspace (its manifest says it is a
    // workspace of its own, so Cargo does not take it for a stray member).
    let guests = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-plugins")
        .canonicalize()
        .unwrap();
    let inside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/template-inside");
    let _ = std::fs::remove_dir_all(&inside);
    let copy = inside.join("my-plugin");
    std::fs::create_dir_all(copy.join("src")).unwrap();
    for file in ["src/lib.rs", "Cargo.lock"] {
        std::fs::copy(guests.join("template").join(file), copy.join(file)).unwrap();
    }
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
            "--locked",
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
    assert!(
        status.success(),
        "the template does not build inside the repository"
    );
    let wasm = target.join("wasm32-wasip2/release/my_plugin.wasm");

    // A bad configuration is refused at load time with serde's reason.
    let config = inside.join("my.toml");
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
fn plugin_test_runs_the_built_in_plugins_and_whole_chains() {
    let work = tempdir();
    let readonly = work.path().join("readonly.toml");
    std::fs::write(&readonly, "profile = \"readonly\"\n").unwrap();
    let run = |args: &[&str], transcript: &str| -> Vec<Value> {
        let (code, lines) = plugin_test(args, transcript);
        assert_eq!(code, 0, "{args:?}");
        lines
    };
    let desc = |v: &Value| v["error"]["desc"].as_str().unwrap_or_default().to_string();

    // The built-in policy alone, with its configuration file.
    let policy = run(
        &["qmp-policy", "--config", readonly.to_str().unwrap()],
        "{\"execute\": \"stop\"}\n{\"execute\": \"query-status\"}\n",
    );
    assert_eq!(
        desc(&policy[0]),
        "Command 'stop' is refused by the readonly profile: it needs the 'safe' profile"
    );
    assert_eq!(policy[1]["verdict"], "forward");

    // The built-in HMP interpreter alone: the canonical line, and QEMU's reading.
    let hmp = run(&["hmp"], "{\"hmp\": \"info   status\"}\n");
    assert_eq!(
        hmp[0]["command"],
        json!({"execute": "human-monitor-command", "arguments": {"command-line": "info status"}})
    );

    // The default chain: HMP lines are judged by the policy as QEMU reads them.
    let chain = run(
        &["--chain"],
        "{\"hmp\": \"migrate -d\\\"exec:true\\\"\"}\n{\"hmp\": \"stop\"}\n",
    );
    assert!(
        desc(&chain[0]).starts_with("Command 'migrate' is refused by the safe profile"),
        "{chain:?}"
    );
    assert_eq!(chain[1]["verdict"], "forward");
    // The same chain with a profile, and without the built-ins.
    let chain = run(
        &["--chain", "--profile", "readonly"],
        "{\"hmp\": \"stop\"}\n",
    );
    assert!(
        desc(&chain[0]).contains("refused by the readonly profile"),
        "{chain:?}"
    );
    let bare = run(
        &["--chain", "--no-default-policy"],
        "{\"execute\": \"screendump\", \"arguments\": {\"filename\": \"/x\"}}\n",
    );
    assert_eq!(bare[0]["verdict"], "forward");
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
