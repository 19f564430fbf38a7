//! Helpers for qmpgate's end-to-end tests: real processes on real sockets.
//!
//! - [`Qemu`]: a real QEMU (`-M none`, TCG) whose monitor is a listening socket the
//!   test created before QEMU started (so connecting cannot race its start-up), of
//!   either version the tests run against ([`QemuVersion`]: Debian's 7.2 and 10.0;
//!   `QMPGATE_TEST_QEMU` picks the one the whole run uses, [`QemuVersion::under_test`]);
//! - [`GatewayBuilder`]: spawns the `qmpgate` binary with inherited fds, the way a
//!   parent process would, with plugins configured as [`Plugin`] entries;
//! - [`QmpClient`]: a small blocking QMP client that shows the bytes a user sees;
//! - [`FakeQemu`]: a scripted QMP server for faults real QEMU will not produce;
//! - [`guest`]: paths of the plugin components built from source by `build.rs`;
//! - [`effects`]: what QEMU did to the host (files, listeners, fds), for security tests;
//! - [`libvirt`]: a small TCG domain driven with `virsh`, on QEMU or through qmpgate.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

pub mod effects;
pub mod libvirt;
use serde_json::{Value, json};

/// How long any single wait in a test may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Polls `check` every 20 ms until it holds; panics naming `what` after [`TIMEOUT`].
/// For effects that follow an action a moment later (a socket closing, a counter
/// in /status); never a substitute for reading the reply that says it happened.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `qmpgate` binary of the same profile as this test.
pub fn qmpgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests live in target/<profile>/deps, binaries (the bench) in target/<profile>.
    let dir = exe.parent().expect("executable has a directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let bin = dir.join("qmpgate");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --release -p qmpgate)",
        bin.display()
    );
    bin
}

/// qmpgate's subcommands as a user types them: each has a line in `--help`, a
/// manual page and a completion.
pub const SUBCOMMANDS: &[&str] = &["run", "plugin", "policy", "completions", "man"];

/// A plugin component built by `build.rs`, e.g. `guest("fixture_spin")`.
pub fn guest(name: &str) -> PathBuf {
    let path = Path::new(env!("QMPGATE_GUEST_DIR")).join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A fresh private directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qmpgate-test-")
        .tempdir()
        .expect("tempdir")
}

/// QEMU's arguments for no machine (TCG, starts in ~30 ms): all that monitor tests
/// need. [`Qemu::start`] runs it; [`qemu_argv`]`(QEMU_NONE)` is its `qmpgate run` form.
pub const QEMU_NONE: &[&str] = &["-M", "none", "-nodefaults", "-display", "none", "-S"];

/// The argv that runs the QEMU under test ([`QemuVersion::under_test`]) with `args`,
/// for `qmpgate run`.
pub fn qemu_argv(args: &[&str]) -> Vec<String> {
    let mut argv = QemuVersion::under_test().argv();
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

/// The QEMU builds the end-to-end tests run against: bookworm's 7.2 (the system's
/// `qemu-system-x86_64`) and bookworm-backports' 10.0, unpacked by
/// `scripts/setup.sh test` under `.qemu/10.0` in the repository.
///
/// One version is *under test* in a run (`QMPGATE_TEST_QEMU`, [`QemuVersion::under_test`]):
/// every helper that starts QEMU without being told a version starts that one, and
/// `./test.sh` runs the suite once per version. A test that names its versions itself
/// (e.g. loops over [`QemuVersion::ALL`]) has `qemu_7_2` or `qemu_10_0` in its name;
/// the 10.0 pass skips such tests, which ran in the 7.2 pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuVersion {
    /// Debian bookworm's QEMU 7.2.
    V7_2,
    /// Debian bookworm-backports' QEMU 10.0.
    V10_0,
}

impl QemuVersion {
    /// Every version, oldest first.
    pub const ALL: [QemuVersion; 2] = [QemuVersion::V7_2, QemuVersion::V10_0];

    /// The environment variable that chooses the version under test: `7.2` (the
    /// default when unset) or `10.0`.
    pub const ENV: &'static str = "QMPGATE_TEST_QEMU";

    /// The version this run tests against, from [`QemuVersion::ENV`]; panics on a
    /// value that names no version, so a typo cannot silently test 7.2 twice.
    pub fn under_test() -> QemuVersion {
        let value = std::env::var_os(Self::ENV);
        match value.as_ref().map(|v| v.to_str()) {
            None | Some(Some("7.2")) => QemuVersion::V7_2,
            Some(Some("10.0")) => QemuVersion::V10_0,
            Some(_) => panic!("{}={:?}: expected 7.2 or 10.0", Self::ENV, value.unwrap()),
        }
    }

    /// The major version QEMU reports (its greeting's `major`).
    pub fn major(self) -> u64 {
        match self {
            QemuVersion::V7_2 => 7,
            QemuVersion::V10_0 => 10,
        }
    }

    /// The `major.minor.` prefix of the version QEMU reports.
    pub fn prefix(self) -> &'static str {
        match self {
            QemuVersion::V7_2 => "7.2.",
            QemuVersion::V10_0 => "10.0.",
        }
    }

    fn root(self) -> Option<PathBuf> {
        match self {
            QemuVersion::V7_2 => None,
            QemuVersion::V10_0 => Some(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../.qemu/10.0")
                    .canonicalize()
                    .expect("QEMU 10.0 is missing: run scripts/setup.sh test"),
            ),
        }
    }

    /// A command that runs this QEMU: its binary, its own modules (the system's
    /// belong to 7.2) and its own firmware.
    pub fn command(self) -> Command {
        match self.root() {
            None => Command::new("qemu-system-x86_64"),
            Some(root) => {
                let mut cmd = Command::new(root.join("usr/bin/qemu-system-x86_64"));
                cmd.env(
                    "QEMU_MODULE_DIR",
                    root.join("usr/lib/x86_64-linux-gnu/qemu"),
                )
                .arg("-L")
                .arg(root.join("usr/share/qemu"));
                cmd
            }
        }
    }

    /// The argv that runs this QEMU from a plain `execvp` (for `qmpgate run`):
    /// `env` sets its module directory.
    pub fn argv(self) -> Vec<String> {
        match self.root() {
            None => vec!["qemu-system-x86_64".into()],
            Some(root) => vec![
                "env".into(),
                format!(
                    "QEMU_MODULE_DIR={}",
                    root.join("usr/lib/x86_64-linux-gnu/qemu").display()
                ),
                root.join("usr/bin/qemu-system-x86_64")
                    .display()
                    .to_string(),
                "-L".into(),
                root.join("usr/share/qemu").display().to_string(),
            ],
        }
    }
}

/// `7.2` or `10.0`, as [`QemuVersion::ENV`] spells it.
impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.prefix().trim_end_matches('.'))
    }
}

/// The children of process `pid` (from /proc).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A PC machine with nothing attached, paused, TCG: devices, netdevs and display
/// commands exist on it (they do not under `-M none`), so security tests can show
/// a harmful command *would* have worked.
pub const QEMU_PC: &[&str] = &[
    "-M",
    "pc",
    "-accel",
    "tcg",
    "-m",
    "128",
    "-nodefaults",
    "-vga",
    "std",
    "-display",
    "none",
    "-S",
];

/// A real QEMU with its QMP monitor on a socket created by the test.
pub struct Qemu {
    child: Child,
    /// The monitor's path.
    pub monitor: PathBuf,
    /// Which QEMU runs: tests expect its version's replies, and
    /// [`Qemu::restart`] starts the same one again.
    version: QemuVersion,
    /// Its arguments besides the monitor's, which [`Qemu::restart`] passes again.
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Qemu {
    /// Starts the QEMU under test ([`QemuVersion::under_test`]) with [`QEMU_NONE`]
    /// and the monitor on an inherited listening fd.
    pub fn start() -> Qemu {
        Qemu::start_with(&[])
    }

    /// As [`Qemu::start`], with extra QEMU arguments.
    pub fn start_with(extra: &[&str]) -> Qemu {
        Qemu::start_version(QemuVersion::under_test(), &[QEMU_NONE, extra].concat())
    }

    /// The QEMU under test on [`QEMU_PC`]: a machine where the harmful commands a
    /// security test sends would work (a screendump writes its file).
    pub fn start_pc() -> Qemu {
        Qemu::start_version(QemuVersion::under_test(), QEMU_PC)
    }

    /// QEMU `version` with `args` (e.g. [`QEMU_PC`]) instead of [`QEMU_NONE`].
    pub fn start_version(version: QemuVersion, args: &[&str]) -> Qemu {
        let dir = tempdir();
        let monitor = dir.path().join("qemu.sock");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Qemu {
            child: spawn_qemu(version, &monitor, &args),
            monitor,
            version,
            args,
            _dir: dir,
        }
    }

    /// Which QEMU this is.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// The gateway's `--upstream` spec for this QEMU.
    pub fn upstream_spec(&self) -> String {
        format!("socket,id=qemu,path={}", self.monitor.display())
    }

    /// Kills QEMU (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new QEMU on the same monitor path (after [`Qemu::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.monitor);
        self.child = spawn_qemu(self.version, &self.monitor, &self.args);
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for QEMU to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "QEMU did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts QEMU `version` with `args` and its monitor on a listening socket bound at
/// `monitor` by us and passed as fd 3, so the monitor exists before QEMU runs.
fn spawn_qemu(version: QemuVersion, monitor: &Path, args: &[String]) -> Child {
    let listener = UnixListener::bind(monitor).expect("bind QEMU monitor");
    // QEMU sometimes accept()s its listening fd again after the client connected;
    // on a blocking socket that hangs its main loop (see host/src/control/launcher.rs).
    listener.set_nonblocking(true).unwrap();
    let mut cmd = version.command();
    cmd.args(["-chardev", "socket,id=mon,fd=3,server=on,wait=off"])
        .args(["-mon", "chardev=mon,mode=control"])
        .args(args)
        .stdin(Stdio::null());
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: OwnedFd::from(listener),
        child_fd: 3,
    }])
    .unwrap();
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot start QEMU {version:?} ({e}): run scripts/setup.sh test")
    });
    // `cmd` holds our copy of the listener; drop it so QEMU holds the only one.
    drop(cmd);
    child
}

/// Builds a `qmpgate` invocation.
pub struct GatewayBuilder {
    args: Vec<String>,
    fds: Vec<FdMapping>,
    env: Vec<(String, String)>,
    env_removed: Vec<String>,
    /// The umask qmpgate starts with (`None`: the test's).
    umask: Option<u32>,
    /// The configuration file [`GatewayBuilder::plugin`] writes, once it has.
    config: Option<PathBuf>,
    dir: tempfile::TempDir,
}

/// A running `qmpgate` process.
pub struct Gateway {
    child: Child,
    /// The path clients connect to (its listening socket was created by the test).
    pub path: PathBuf,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayBuilder {
    /// A gateway in front of `upstream` (a chardev spec).
    pub fn new(upstream: &str) -> Self {
        GatewayBuilder::base().args(["--upstream", upstream])
    }

    /// A gateway with no upstream yet (for `qmpgate run`, or to test errors).
    pub fn base() -> Self {
        GatewayBuilder {
            args: vec![
                "--cache-dir".into(),
                // Shared between tests: compiling each plugin once is enough.
                std::env::temp_dir()
                    .join("qmpgate-test-cache")
                    .display()
                    .to_string(),
            ],
            fds: Vec::new(),
            env: Vec::new(),
            env_removed: Vec::new(),
            umask: None,
            config: None,
            dir: tempdir(),
        }
    }

    /// Uses `dir` as the compile cache instead of the suite's shared one.
    pub fn cache_dir(mut self, dir: &Path) -> Self {
        let at = self
            .args
            .iter()
            .position(|a| a == "--cache-dir")
            .expect("base() passes --cache-dir");
        self.args[at + 1] = dir.display().to_string();
        self
    }

    /// Leaves the compile cache to qmpgate's defaults (`CACHE_DIRECTORY`,
    /// `XDG_CACHE_HOME`, `HOME`) instead of the suite's shared one.
    pub fn default_cache_dir(mut self) -> Self {
        let at = self
            .args
            .iter()
            .position(|a| a == "--cache-dir")
            .expect("base() passes --cache-dir");
        self.args.drain(at..at + 2);
        self
    }

    /// Configures `plugin`, after any configured before it: its `[[plugin]]` table
    /// goes into a configuration file in the gateway's folder, which the first call
    /// passes as `--config`. (A configuration file of the plugins alone; a test of
    /// other settings, or of a file that does not load, writes its own.)
    pub fn plugin(mut self, plugin: Plugin) -> Self {
        let path = match &self.config {
            Some(path) => path.clone(),
            None => {
                let path = self.dir.path().join("plugins.toml");
                self = self.args(["--config".to_string(), path.display().to_string()]);
                self.config = Some(path.clone());
                path
            }
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        file.write_all(plugin.to_string().as_bytes()).unwrap();
        self
    }

    /// Adds command-line arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the gateway.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the gateway without this environment variable.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env_removed.push(key.into());
        self
    }

    /// Starts qmpgate with this umask (e.g. `0o000`, the careless operator's).
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = Some(mask);
        self
    }

    /// Passes `fd` to the gateway as fd number `child_fd`.
    pub fn fd(mut self, fd: impl Into<OwnedFd>, child_fd: i32) -> Self {
        self.fds.push(FdMapping {
            parent_fd: fd.into(),
            child_fd,
        });
        self
    }

    /// A private directory that lives as long as the gateway.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a listener with this id on an inherited listening socket (as fd `fd`);
    /// returns the path clients connect to.
    pub fn listener(self, id: &str, fd: i32) -> (Self, PathBuf) {
        self.listener_with(id, fd, "mode=control")
    }

    /// As [`GatewayBuilder::listener`], with extra spec options (`mode=readline`).
    pub fn listener_with(self, id: &str, fd: i32, options: &str) -> (Self, PathBuf) {
        let path = self.dir.path().join(format!("{id}.sock"));
        let listener = UnixListener::bind(&path).unwrap();
        let builder = self.fd(listener, fd).args([
            "--listen".to_string(),
            format!("socket,id={id},fd={fd},server=on,{options}"),
        ]);
        (builder, path)
    }

    /// Spawns qmpgate with a QMP listener on an inherited listening socket (fd 3)
    /// bound at a fresh path: clients can connect at once, with no wait.
    pub fn spawn(self) -> Gateway {
        let path = self.dir.path().join("gate.sock");
        let listener = UnixListener::bind(&path).unwrap();
        self.fd(listener, 3)
            .args(["--listen", "socket,id=qmp,fd=3,server=on"])
            .spawn_raw_at(path)
    }

    /// Spawns `qmpgate run ARGS -- QEMU...` (e.g. [`qemu_argv`]`(QEMU_NONE)`).
    pub fn spawn_run<S: AsRef<str>>(mut self, qemu: &[S]) -> Gateway {
        self.args.insert(0, "run".into());
        self.args.push("--".into());
        self.args
            .extend(qemu.iter().map(|s| s.as_ref().to_string()));
        self.spawn_raw()
    }

    /// Spawns qmpgate expecting start-up to fail: exit status 1, and `expected` in
    /// what it printed.
    pub fn fails_with(self, expected: &str) {
        let mut gateway = self.spawn_raw();
        let (code, stderr) = gateway.wait();
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in:\n{stderr}"
        );
    }

    /// Spawns qmpgate with exactly the arguments and fds given.
    pub fn spawn_raw(self) -> Gateway {
        let path = self.dir.path().join("unused");
        self.spawn_raw_at(path)
    }

    fn spawn_raw_at(self, path: PathBuf) -> Gateway {
        let stderr_path = self.dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(qmpgate_bin());
        cmd.args(&self.args)
            .env("QMPGATE_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for key in &self.env_removed {
            cmd.env_remove(key);
        }
        cmd.fd_mappings(self.fds).unwrap();
        if let Some(mask) = self.umask {
            use std::os::unix::process::CommandExt;
            let mode = nix::sys::stat::Mode::from_bits_truncate(mask);
            // SAFETY: umask(2) is async-signal-safe; nothing else runs between
            // fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::stat::umask(mode);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn qmpgate");
        drop(cmd);
        Gateway {
            child,
            path,
            stderr_path,
            _dir: self.dir,
        }
    }
}

/// One `[[plugin]]` entry of qmpgate's configuration file, for
/// [`GatewayBuilder::plugin`]: a built-in plugin or a component file, with its
/// limits and its configuration. `to_string()` gives the table in TOML, for a test
/// that rewrites a configuration file while the gateway runs.
///
/// ```no_run
/// # use qmpgate_tests::{GatewayBuilder, Plugin, guest};
/// # use serde_json::json;
/// GatewayBuilder::new("socket,id=qemu,path=/run/vm/qmp.sock")
///     .plugin(Plugin::builtin("policy", "qmp-policy").config(json!({"profile": "readonly"})))
///     .plugin(Plugin::wasm("spin", &guest("fixture_spin")).cpu_ms(100))
///     .spawn();
/// ```
#[derive(Debug, Clone)]
pub struct Plugin {
    name: String,
    /// `builtin = "..."` or `path = "..."`.
    source: (&'static str, String),
    memory_mib: Option<u64>,
    cpu_ms: Option<u64>,
    config: Option<Value>,
}

impl Plugin {
    /// The plugin embedded in qmpgate as `builtin` (`hmp`, `qmp-policy`, `audit`),
    /// named `name`.
    pub fn builtin(name: &str, builtin: &str) -> Plugin {
        Plugin::new(name, ("builtin", builtin.to_string()))
    }

    /// The component at `path` (e.g. [`guest`]`("fixture_spin")`), named `name`.
    pub fn wasm(name: &str, path: &Path) -> Plugin {
        Plugin::new(name, ("path", path.display().to_string()))
    }

    fn new(name: &str, source: (&'static str, String)) -> Plugin {
        Plugin {
            name: name.to_string(),
            source,
            memory_mib: None,
            cpu_ms: None,
            config: None,
        }
    }

    /// Its `config` table, given as the JSON its `init` receives (an object).
    pub fn config(mut self, config: Value) -> Plugin {
        assert!(config.is_object(), "a plugin's config is a table: {config}");
        self.config = Some(config);
        self
    }

    /// Its CPU time per hook call (`cpu-ms`).
    pub fn cpu_ms(mut self, ms: u64) -> Plugin {
        self.cpu_ms = Some(ms);
        self
    }

    /// Its memory cap per instance (`memory-mib`).
    pub fn memory_mib(mut self, mib: u64) -> Plugin {
        self.memory_mib = Some(mib);
        self
    }
}

/// The entry as a `[[plugin]]` table.
impl std::fmt::Display for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (key, source) = &self.source;
        writeln!(f, "[[plugin]]")?;
        writeln!(f, "name = {}", toml_value(&json!(self.name)))?;
        writeln!(f, "{key} = {}", toml_value(&json!(source)))?;
        if let Some(mib) = self.memory_mib {
            writeln!(f, "memory-mib = {mib}")?;
        }
        if let Some(ms) = self.cpu_ms {
            writeln!(f, "cpu-ms = {ms}")?;
        }
        if let Some(config) = &self.config {
            writeln!(f, "config = {}", toml_value(config))?;
        }
        Ok(())
    }
}

/// `value` as a TOML value on one line: JSON's strings, numbers and booleans are
/// TOML's; objects become inline tables (keys quoted), arrays arrays.
fn toml_value(value: &Value) -> String {
    match value {
        Value::Null => panic!("TOML has no null"),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => value.to_string(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) if map.is_empty() => "{}".to_string(),
        Value::Object(map) => {
            let members: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{} = {}", Value::from(k.as_str()), toml_value(v)))
                .collect();
            format!("{{ {} }}", members.join(", "))
        }
    }
}

impl Gateway {
    /// Connects a client and reads the greeting.
    pub fn client(&self) -> QmpClient {
        QmpClient::connect(&self.path)
    }

    /// Connects, reads the greeting and negotiates.
    pub fn negotiated(&self) -> QmpClient {
        let mut c = self.client();
        assert_eq!(
            c.execute("qmp_capabilities", json!({})),
            json!({"return": {}})
        );
        c
    }

    /// Waits for the gateway to exit; returns its exit code and stderr.
    pub fn wait(&mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "qmpgate did not exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the gateway is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// What the gateway logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The log, once it shows `needle` (qmpgate writes its log from a thread of
    /// its own, so a line may land a moment after the reply that followed it);
    /// panics with the log if it never does.
    pub fn logged(&self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let stderr = self.stderr();
            if stderr.contains(needle) {
                return stderr;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never logged:\n{stderr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the gateway said (cargo test prints it with the
        // test's output).
        if std::thread::panicking() {
            eprintln!("--- qmpgate's stderr ---\n{}", self.stderr());
        }
    }
}

/// A blocking QMP client that reads the gateway's CRLF-terminated lines.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The greeting it received.
    pub greeting: Value,
}

impl QmpClient {
    /// Connects and reads the greeting.
    pub fn connect(path: &Path) -> QmpClient {
        let stream =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        QmpClient::from_stream(stream)
    }

    /// Connects, reads the greeting and negotiates.
    pub fn negotiated(path: &Path) -> QmpClient {
        let mut c = QmpClient::connect(path);
        assert_eq!(
            c.execute("qmp_capabilities", json!({})),
            json!({"return": {}})
        );
        c
    }

    /// Wraps a connected stream and reads the greeting.
    pub fn from_stream(stream: UnixStream) -> QmpClient {
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut client = QmpClient {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
        };
        client.greeting = client.read();
        assert!(
            client.greeting.get("QMP").is_some(),
            "expected a greeting, got {}",
            client.greeting
        );
        client
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Sends a JSON value (no newline, like qemu.qmp).
    pub fn send(&mut self, message: &Value) {
        self.send_raw(message.to_string().as_bytes());
    }

    /// Sends a JSON value with `fds` attached (SCM_RIGHTS), as libvirt sends
    /// `getfd` and `add-fd`.
    pub fn send_with_fds(&mut self, message: &Value, fds: &[&dyn std::os::fd::AsRawFd]) {
        send_with_fds(&self.writer, message.to_string().as_bytes(), fds);
    }

    /// Reads one message; panics on timeout or EOF.
    pub fn read(&mut self) -> Value {
        let line = self
            .read_line()
            .expect("connection closed while waiting for a message");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    /// Reads one raw line (with its CRLF); `None` at EOF.
    pub fn read_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// Reads one raw line; `None` at EOF or when the read timeout passes.
    pub fn read_line_or_timeout(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }

    /// Reads messages until one that is not an event; returns it.
    pub fn read_reply(&mut self) -> Value {
        loop {
            let message = self.read();
            if message.get("event").is_none() {
                return message;
            }
        }
    }

    /// Sends `{"execute": name, "arguments": args}` and returns the reply.
    pub fn execute(&mut self, name: &str, arguments: Value) -> Value {
        self.send(&json!({ "execute": name, "arguments": arguments }));
        self.read_reply()
    }

    /// Whether the peer closes the connection (EOF or reset) within `TIMEOUT`,
    /// with nothing more to read: false if it sends more, or stays open.
    pub fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.reader.read(&mut byte) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    /// The underlying stream, for tests that shut it down.
    pub fn stream(&self) -> &UnixStream {
        &self.writer
    }
}

/// A client typing on an HMP (`mode=readline`) listener.
pub struct HmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The banner before the first prompt.
    pub banner: String,
}

impl HmpClient {
    /// Connects and reads the banner up to the first prompt.
    pub fn connect(path: &Path) -> HmpClient {
        let stream =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut hmp = HmpClient {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            banner: String::new(),
        };
        hmp.banner = hmp.until_prompt();
        hmp
    }

    /// Reads up to and without the next `(qemu) ` prompt.
    pub fn until_prompt(&mut self) -> String {
        let mut out = Vec::new();
        while !out.ends_with(b"(qemu) ") {
            let mut byte = [0u8];
            self.reader
                .read_exact(&mut byte)
                .expect("HMP output ends with a prompt");
            out.push(byte[0]);
        }
        out.truncate(out.len() - 7);
        String::from_utf8(out).unwrap()
    }

    /// Types `line` without waiting for what it prints.
    pub fn type_line(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
    }

    /// Types `line` and returns what was printed before the next prompt.
    pub fn run(&mut self, line: &str) -> String {
        self.type_line(line);
        self.until_prompt()
    }
}

/// A scripted QMP server on one connection, for faults real QEMU will not produce.
pub struct FakeQemu {
    /// The listening path.
    pub path: PathBuf,
    handle: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// What the fake does with a command it receives.
pub enum FakeAction {
    /// Reply `{"return": {}}`.
    Return,
    /// Close the connection without replying.
    Close,
    /// Do nothing (the command hangs).
    Ignore,
    /// Reply `{"return": {}}` after this long (the fake is as single-threaded as QEMU).
    Delay(Duration),
    /// Reply `{"return": {"deferred": true}}` only after the next message has been
    /// answered, as QEMU answers an OOB command while an in-band one still runs.
    Defer,
}

impl FakeQemu {
    /// Serves one connection; `script` decides per command name.
    pub fn start(script: impl Fn(&str) -> FakeAction + Send + 'static) -> FakeQemu {
        let dir = tempdir();
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut writer = stream.try_clone().unwrap();
            // It offers OOB, as QEMU does on socket monitors.
            let greeting = json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 99}, "package": "fake"}, "capabilities": ["oob"]}});
            writer
                .write_all(format!("{greeting}\r\n").as_bytes())
                .unwrap();
            let reader = BufReader::new(stream);
            let mut de = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
            // A deferred reply goes out after the next message has been answered.
            let mut deferred: Option<Value> = None;
            while let Some(Ok(message)) = de.next() {
                let name = message["execute"]
                    .as_str()
                    .or_else(|| message["exec-oob"].as_str())
                    .unwrap_or("")
                    .to_string();
                let id = message.get("id").cloned().unwrap_or(Value::Null);
                let action = if name == "qmp_capabilities" {
                    FakeAction::Return
                } else {
                    script(&name)
                };
                match action {
                    FakeAction::Return => {
                        let reply = json!({"return": {}, "id": id});
                        if writer.write_all(format!("{reply}\r\n").as_bytes()).is_err() {
                            return;
                        }
                    }
                    FakeAction::Close => return,
                    FakeAction::Ignore => {}
                    FakeAction::Delay(wait) => {
                        std::thread::sleep(wait);
                        let reply = json!({"return": {}, "id": id});
                        if writer.write_all(format!("{reply}\r\n").as_bytes()).is_err() {
                            return;
                        }
                    }
                    FakeAction::Defer => {
                        deferred = Some(json!({"return": {"deferred": true}, "id": id}));
                        continue;
                    }
                }
                if let Some(reply) = deferred.take()
                    && writer.write_all(format!("{reply}\r\n").as_bytes()).is_err()
                {
                    return;
                }
            }
        });
        FakeQemu {
            path,
            handle: Some(handle),
            _dir: dir,
        }
    }

    /// The gateway's `--upstream` spec for this fake.
    pub fn upstream_spec(&self) -> String {
        format!("socket,id=fake,path={}", self.path.display())
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        // The thread ends when its connection closes; don't wait for that here.
        drop(self.handle.take());
    }
}

/// Writes `bytes` in one `sendmsg` with `fds` attached (SCM_RIGHTS).
pub fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[&dyn std::os::fd::AsRawFd]) {
    let fds: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let sent = nix::sys::socket::sendmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(stream),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(sent, bytes.len(), "a short sendmsg");
}

/// Runs `python3 tests/py/<script>` with arguments; returns stdout (asserting exit 0).
pub fn python(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(script);
    let output = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{script} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A gateway with its status endpoint on an inherited TCP listener; returns its base URL.
pub fn with_status(builder: GatewayBuilder) -> (GatewayBuilder, String) {
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", http.local_addr().unwrap());
    (
        builder
            .fd(http, 5)
            .args(["--status", "socket,id=http,fd=5,server=on"]),
        url,
    )
}

/// GETs `url` with a real HTTP client (Python's urllib): (status, content type, body).
pub fn http_get(url: &str) -> (u16, String, String) {
    let out: Value = serde_json::from_str(&python("http_get.py", &[url])).unwrap();
    (
        out["status"].as_u64().unwrap() as u16,
        out["content_type"].as_str().unwrap_or_default().to_string(),
        out["body"].as_str().unwrap().to_string(),
    )
}

/// A control-monitor client that can pass fds with a command.
pub struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    /// Connects and negotiates.
    pub fn connect(path: &std::path::Path) -> Control {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut control = Control {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        };
        let greeting = control.read();
        assert_eq!(greeting["QMP"]["version"]["package"], "qmpgate 0.1.0");
        assert_eq!(
            control.execute(json!({"execute": "qmp_capabilities"}), None::<&UnixStream>),
            json!({"return": {}})
        );
        control
    }

    /// Reads one message.
    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Sends a command, with `fd` attached to the same message when given.
    pub fn execute(&mut self, command: Value, fd: Option<&impl std::os::fd::AsRawFd>) -> Value {
        let bytes = command.to_string();
        match fd {
            Some(fd) => send_with_fds(&self.stream, bytes.as_bytes(), &[fd]),
            None => self.stream.write_all(bytes.as_bytes()).unwrap(),
        }
        self.read()
    }

    /// Runs an HMP command line through `human-monitor-command`.
    pub fn hmp(&mut self, line: &str) -> Value {
        self.execute(
            json!({"execute": "human-monitor-command", "arguments": {"command-line": line}}),
            None::<&UnixStream>,
        )
    }
}
