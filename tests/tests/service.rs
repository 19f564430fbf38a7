//! qmpgate as a host service: what systemd hears over `NOTIFY_SOCKET`, where the
//! compile cache goes under a unit, what the log looks like to a collector, and the
//! audit log across logrotate's SIGHUP.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use qmpgate_tests::{GatewayBuilder, Plugin, Qemu, eventually};

/// A stand-in for systemd's notification socket.
struct Notifications {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl Notifications {
    fn bind(dir: &std::path::Path) -> Notifications {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Notifications { socket, path }
    }

    /// The next datagram, as text.
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a notification within 20 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }
}

#[test]
fn systemd_hears_ready_reloading_and_stopping_with_a_status_line() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(Plugin::builtin("policy", "qmp-policy").config(json!({"profile": "safe"})));
    let notify = Notifications::bind(builder.dir());
    let config = builder.dir().join("plugins.toml");
    let gateway = builder
        .env("NOTIFY_SOCKET", notify.path.to_str().unwrap())
        .spawn();
    assert_eq!(
        notify.next(),
        "READY=1\nSTATUS=1 upstream (1 connected), 1 listener, 0 clients"
    );

    // A reload says it starts, with the monotonic clock Type=notify-reload wants,
    // and then that qmpgate is ready again, with what it serves now.
    let _client = gateway.negotiated();
    gateway.signal(Signal::SIGHUP);
    let reloading = notify.next();
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"))
        .parse()
        .unwrap();
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
    assert!(
        usec <= now && now - usec < 20_000_000,
        "{usec} vs now {now}"
    );
    assert_eq!(
        notify.next(),
        "READY=1\nSTATUS=1 upstream (1 connected), 1 listener, 1 client"
    );

    // A reload that fails leaves the old plugins running, and says so.
    std::fs::write(
        &config,
        "[[plugin]]\nname = \"policy\"\nbuiltin = \"nope\"\n",
    )
    .unwrap();
    gateway.signal(Signal::SIGHUP);
    assert!(notify.next().starts_with("RELOADING=1\n"));
    let failed = notify.next();
    assert!(
        failed.starts_with("READY=1\nSTATUS=reload failed, running the old plugins: ")
            && failed.contains("nope"),
        "{failed:?}"
    );

    gateway.signal(Signal::SIGTERM);
    assert_eq!(notify.next(), "STOPPING=1");
}

/// Under a unit with `CacheDirectory=` (and no `HOME`, as is usual there), plugins
/// are compiled into `$CACHE_DIRECTORY`; the log is JSON lines when asked, and
/// `QMPGATE_LOG=debug` shows qmpgate's debug lines without the wasm compiler's
/// tens of thousands.
#[test]
fn a_unit_gets_its_cache_directory_and_a_readable_debug_log() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec()).default_cache_dir();
    let cache = builder.dir().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let gateway = builder
        .env("CACHE_DIRECTORY", cache.to_str().unwrap())
        .env_remove("HOME")
        .env_remove("XDG_CACHE_HOME")
        .env("QMPGATE_LOG", "debug")
        .args(["--log-format", "json"])
        .spawn();
    let _client = gateway.negotiated();
    let stderr = gateway.logged("client connected");
    let compiled: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".cwasm"))
        .collect();
    assert_eq!(compiled.len(), 2, "hmp and the policy: {compiled:?}");

    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let targets: Vec<&str> = lines.iter().filter_map(|l| l["target"].as_str()).collect();
    assert_eq!(targets.len(), lines.len(), "every line names its target");
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "DEBUG" && l["fields"]["message"] == "plugin compiled"),
        "{stderr}"
    );
    assert!(
        !targets.iter().any(|t| t.starts_with("cranelift")
            || t.starts_with("wasmtime")
            || t.starts_with("regalloc")),
        "{stderr}"
    );
    assert!(lines.len() < 100, "{} lines:\n{stderr}", lines.len());
    assert!(!stderr.contains('\u{1b}'), "no colour codes in a file");

    // Without any cache directory, qmpgate says so instead of compiling silently
    // at every start.
    let quiet = GatewayBuilder::new(&qemu.upstream_spec())
        .default_cache_dir()
        .env_remove("HOME")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("CACHE_DIRECTORY")
        .spawn();
    quiet.logged("no cache directory");
}

/// logrotate moves the audit log away and sends SIGHUP: records go to a new file
/// at the path (0600), none is lost or written to the old one afterwards.
#[test]
fn the_audit_log_is_reopened_on_sighup() {
    let qemu = Qemu::start();
    let builder =
        GatewayBuilder::new(&qemu.upstream_spec()).plugin(Plugin::builtin("audit", "audit"));
    let log = builder.dir().join("audit.jsonl");
    let rotated = builder.dir().join("audit.jsonl.1");
    let gateway = builder.args(["--audit-log", log.to_str().unwrap()]).spawn();
    let mut c = gateway.negotiated();
    assert!(c.execute("query-name", json!({}))["return"].is_object());
    std::fs::rename(&log, &rotated).unwrap();

    gateway.signal(Signal::SIGHUP);
    gateway.logged("reloaded");
    eventually("a new audit log at the path", || log.exists());
    assert!(c.execute("query-status", json!({}))["return"].is_object());

    let commands = |path: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter_map(|r| r["command"].as_str().map(String::from))
            .collect()
    };
    let before = commands(&rotated);
    assert!(before.contains(&"query-name".to_string()), "{before:?}");
    assert!(!before.contains(&"query-status".to_string()), "{before:?}");
    assert!(
        commands(&log).contains(&"query-status".to_string()),
        "{:?}",
        commands(&log)
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

/// The units in `contrib/systemd` pass `systemd-analyze verify` with nothing to
/// say (an unknown or misspelt key is only a warning there, so any output fails),
/// and qmpgate accepts the command line the service runs.
#[test]
fn the_systemd_units_verify_and_their_command_line_parses() {
    let contrib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let dir = qmpgate_tests::tempdir();
    let binary = qmpgate_tests::qmpgate_bin();
    let service = std::fs::read_to_string(contrib.join("qmpgate@.service"))
        .unwrap()
        .replace("/usr/local/bin/qmpgate", binary.to_str().unwrap());
    // verify wants an instance, and the program the unit names to exist.
    std::fs::write(dir.path().join("qmpgate@vm1.service"), &service).unwrap();
    std::fs::copy(
        contrib.join("qmpgate@.socket"),
        dir.path().join("qmpgate@vm1.socket"),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "qmpgate@vm1.service",
            "qmpgate@vm1.socket",
        ])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");

    // ExecStart with its continuation lines, as systemd would run it for vm1.
    let exec = service
        .replace("\\\n", " ")
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .replace("%i", "vm1")
        .replace("${LOGS_DIRECTORY}", dir.path().to_str().unwrap());
    let argv: Vec<&str> = exec.split_whitespace().collect();
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
