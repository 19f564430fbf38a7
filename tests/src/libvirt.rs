//! libvirt for the end-to-end tests: a small TCG domain defined from generated XML,
//! driven with `virsh` against the libvirtd that `scripts/setup-libvirt.sh` started.
//!
//! Layout: [`Domain`] (define, start, operations, undefine on drop), built by
//! [`DomainBuilder`]; [`Emulator`] says what libvirt runs as QEMU: the real QEMU, or
//! `contrib/libvirt/qmpgate-emulator` in front of it.
//!
//! The guest is Debian's cloud kernel with a busybox initramfs (built by the setup
//! script under `.tools/libvirt-guest`): it prints [`GUEST_READY`] on its serial
//! console, a file the test reads, and powers off when the ACPI power button is
//! pressed, so `virsh shutdown` really reaches a guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What the guest prints on its serial console once it watches the power button.
pub const GUEST_READY: &str = "qmpgate-guest: ready";

/// What the guest prints when the power button was pressed.
pub const GUEST_POWER_OFF: &str = "qmpgate-guest: power button, powering off";

/// The URI of the libvirtd the setup script starts.
const URI: &str = "qemu:///system";

/// The system's QEMU 7.2, which libvirt 9.0 runs.
pub const SYSTEM_QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// The prefix of every test domain's name, followed by the test process's id.
const NAME_PREFIX: &str = "qmpgate-test-";

const SETUP: &str = "run scripts/setup-libvirt.sh (scripts/setup.sh test runs it)";

/// The guest's kernel and initramfs.
fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/libvirt-guest")
}

/// Runs `virsh ARGS` against the tests' libvirtd: stdout, or stderr on failure.
pub fn virsh<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<String, String> {
    let output = Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run virsh ({e}): {SETUP}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// Panics, saying how to set libvirt up, unless libvirtd answers and the guest is
/// built: a machine without libvirt fails these tests rather than skipping them.
/// Also removes domains left by test processes that died without cleaning up.
fn require_libvirt() {
    // Checked once per test process; every test that needs libvirt gets the message.
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        if let Err(e) = virsh(&["version"]) {
            return Err(format!("libvirt is not running here ({e}): {SETUP}"));
        }
        for file in ["vmlinuz", "initrd.img"] {
            let path = guest_dir().join(file);
            if !path.exists() {
                return Err(format!("{} is missing: {SETUP}", path.display()));
            }
        }
        sweep_stale_domains();
        Ok(())
    });
    if let Err(e) = checked {
        panic!("{e}");
    }
}

/// Destroys and undefines test domains whose test process is gone (killed tests
/// leave them; a running one would eat a core).
fn sweep_stale_domains() {
    let Ok(names) = virsh(&["list", "--all", "--name"]) else {
        return;
    };
    for name in names.lines() {
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", name]);
    }
}

/// What libvirt runs as the domain's `<emulator>`.
#[derive(Debug, Clone)]
pub enum Emulator {
    /// The real QEMU ([`SYSTEM_QEMU`]).
    Qemu,
    /// `contrib/libvirt/qmpgate-emulator`, running `qmpgate run` (this build's binary)
    /// in front of [`SYSTEM_QEMU`], with these extra qmpgate options.
    Qmpgate(Vec<String>),
}

/// Builds a [`Domain`].
pub struct DomainBuilder {
    emulator: Emulator,
    /// How long a boot may take before [`Domain::wait_ready`] fails: TCG on a loaded
    /// 2-core machine boots the guest in 3 to 10 s.
    boot_timeout: Duration,
}

impl Default for DomainBuilder {
    fn default() -> Self {
        DomainBuilder {
            emulator: Emulator::Qemu,
            boot_timeout: Duration::from_secs(60),
        }
    }
}

impl DomainBuilder {
    /// A domain on the real QEMU.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs the domain on `emulator`.
    pub fn emulator(mut self, emulator: Emulator) -> Self {
        self.emulator = emulator;
        self
    }

    /// Defines the domain (not started).
    pub fn define(self) -> Domain {
        require_libvirt();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{NAME_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = crate::tempdir();
        let emulator = match &self.emulator {
            Emulator::Qemu => PathBuf::from(SYSTEM_QEMU),
            Emulator::Qmpgate(args) => qmpgate_emulator(args),
        };
        let serial = dir.path().join("serial.log");
        let guest = guest_dir();
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
",
            kernel = guest.join("vmlinuz").display(),
            initrd = guest.join("initrd.img").display(),
            emulator = emulator.display(),
            serial = serial.display(),
        );
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, xml).unwrap();
        if let Err(e) = virsh(&[Path::new("define"), &xml_path]) {
            panic!("virsh define {}: {e}", xml_path.display());
        }
        Domain {
            name,
            serial,
            boots: 0,
            boot_timeout: self.boot_timeout,
            _dir: dir,
        }
    }
}

/// The emulator libvirt runs for [`Emulator::Qmpgate`]: a script that sets the
/// wrapper's variables (libvirt clears the environment) and runs the wrapper.
///
/// Its path is named after its content and the file is never rewritten: libvirt
/// probes every new emulator (starting QEMU twice, ~4 s) and probes again when the
/// file's ctime changes, so tests with the same script share one probe.
fn qmpgate_emulator(args: &[String]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::PermissionsExt;
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/libvirt/qmpgate-emulator");
    let cache = std::env::temp_dir().join("qmpgate-test-cache");
    let script = format!(
        "#!/bin/sh\nexport QMPGATE='{qmpgate}' QMPGATE_QEMU='{SYSTEM_QEMU}' QMPGATE_LOG=info\n\
         export QMPGATE_ARGS='--cache-dir {cache} {args}'\nexec '{wrapper}' \"$@\"\n",
        qmpgate = crate::qmpgate_bin().display(),
        cache = cache.display(),
        args = args.join(" "),
        wrapper = wrapper.display(),
    );
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    script.hash(&mut hasher);
    let dir = std::env::temp_dir().join("qmpgate-test-libvirt");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("emulator-{:016x}", hasher.finish()));
    if !path.exists() {
        // Written whole under another name first: libvirt may run it at once.
        let partial = dir.join(format!("emulator.{}.partial", std::process::id()));
        std::fs::write(&partial, script).unwrap();
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&partial, &path).unwrap();
    }
    path
}

/// A libvirt domain, destroyed and undefined when dropped.
pub struct Domain {
    /// Its unique name: [`NAME_PREFIX`], the test process's id, a counter.
    pub name: String,
    /// The file serial console's output (`append='on'`: kept across boots, where
    /// libvirt would truncate it at every start).
    pub serial: PathBuf,
    /// How many boots the serial log showed when the domain was last started, so
    /// [`Domain::wait_ready`] waits for this boot's marker.
    boots: usize,
    boot_timeout: Duration,
    /// Holds the XML and the serial log.
    _dir: tempfile::TempDir,
}

impl Domain {
    /// `virsh CMD DOMAIN ARGS...`.
    pub fn virsh(&self, command: &str, args: &[&str]) -> Result<String, String> {
        let mut argv = vec![command, &self.name];
        argv.extend_from_slice(args);
        virsh(&argv)
    }

    /// As [`Domain::virsh`], panicking (with the domain's log) on failure.
    pub fn run(&self, command: &str, args: &[&str]) -> String {
        self.virsh(command, args).unwrap_or_else(|e| {
            panic!(
                "virsh {command} {} {args:?}: {e}\n--- domain log ---\n{}",
                self.name,
                self.log()
            )
        })
    }

    /// Starts the domain.
    pub fn start(&mut self) {
        self.boots = self.serial_text().matches(GUEST_READY).count();
        self.run("start", &[]);
    }

    /// Waits until this boot's guest printed [`GUEST_READY`]; returns how long it took.
    pub fn wait_ready(&self) -> Duration {
        let started = Instant::now();
        while self.serial_text().matches(GUEST_READY).count() <= self.boots {
            assert!(
                started.elapsed() < self.boot_timeout,
                "the guest did not boot within {:?}\n--- serial ---\n{}\n--- domain log ---\n{}",
                self.boot_timeout,
                self.serial_text(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        started.elapsed()
    }

    /// `virsh domstate`: `running`, `paused`, `shut off`...
    pub fn state(&self) -> String {
        self.run("domstate", &[])
    }

    /// Waits until `virsh domstate` says `state`.
    pub fn wait_state(&self, state: &str) {
        let deadline = Instant::now() + self.boot_timeout;
        loop {
            let now = self.state();
            if now == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the domain stayed {now:?}, not {state:?}\n--- serial ---\n{}\n--- domain log ---\n{}",
                self.serial_text(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A QMP command through libvirt (`virsh qemu-monitor-command`): QEMU's reply.
    pub fn qmp(&self, command: &Value) -> Value {
        let reply = self.run("qemu-monitor-command", &[&command.to_string()]);
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply}: {e}"))
    }

    /// An HMP command line through libvirt (`virsh qemu-monitor-command --hmp`).
    pub fn hmp(&self, line: &str) -> String {
        self.run("qemu-monitor-command", &["--hmp", line])
    }

    /// What the guest wrote on its serial console so far.
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// libvirt's log of this domain: the command lines it ran, and QEMU's (and
    /// qmpgate's) stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", self.name))
            .unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = self.virsh("destroy", &[]);
        let _ = self.virsh("undefine", &[]);
        let _ = std::fs::remove_file(format!("/var/log/libvirt/qemu/{}.log", self.name));
    }
}
