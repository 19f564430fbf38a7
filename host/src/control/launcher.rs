//! `qmpgate run -- qemu-system-x86_64 ...`: start QEMU on a monitor socket that
//! qmpgate created, and connect to it exactly once.
//!
//! [`prepare`] binds a listening unix socket in a fresh private directory (created
//! 0700 and the socket chmod-ed 0600 whatever the umask: whoever reaches QEMU's
//! monitor skips every policy), and claims the inherited fds that QEMU's own
//! arguments name (`-add-fd set=0,fd=30`, found by [`cmdline`]): a parent such as
//! libvirt opens files and sockets for QEMU and names them by number, so those
//! reach QEMU under the same numbers, untouched; every other inherited fd stays
//! qmpgate's, close-on-exec. `main` then checks everything that can fail
//! (configuration, plugins, listeners) before [`Prepared::spawn`] starts QEMU with
//! the socket as an inherited fd (`-chardev socket,id=qmpgate-mon,fd=M,server=on,
//! wait=off -mon chardev=qmpgate-mon,mode=control`, M above every passed fd so the
//! numbers cannot collide) and closes its own copy.
//! Because the socket is listening before QEMU starts, the one `connect()` cannot
//! race QEMU's start-up; and because qmpgate keeps no copy, a QEMU that dies at
//! start-up makes that connect fail at once instead of hanging in the backlog.
//!
//! QEMU never outlives qmpgate: it gets `PR_SET_PDEATHSIG` (SIGKILL), set in the
//! child before `exec` (the signal follows the thread that forked, so [`spawn`] is
//! called from the main thread, which lives as long as the process). And it runs
//! under QEMU's own seccomp sandbox unless its arguments say otherwise:
//! [`DEFAULT_SANDBOX`], as libvirt starts QEMU.
//!
//! [`spawn`]: Prepared::spawn
//! [`cmdline`]: qmpgate_protocol::cmdline

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitStatus;

use command_fds::{CommandFdExt, FdMapping};
use qmpgate_protocol::cmdline;
use thiserror::Error;

use crate::io::{FdTable, PassError};

/// The lowest fd number QEMU sees its monitor socket on: the first after stderr.
/// It is raised above every fd passed to QEMU (see [`monitor_fd`]).
const FIRST_MONITOR_FD: RawFd = 3;

/// QEMU's seccomp sandbox as libvirt starts QEMU: no obsolete system calls, no
/// privilege changes, no new processes, no resource-control calls. It does not stop
/// file access (the policy must); it does stop a policy gap from running programs.
pub const DEFAULT_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Errors launching QEMU.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum LaunchError {
    /// Creating the private directory or socket failed.
    #[error("cannot create the monitor socket")]
    Socket(#[source] std::io::Error),
    /// The program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The `--runas` user cannot be used.
    #[error("--runas: {0}")]
    User(String),
    /// Mapping the fds into the child failed.
    #[error("cannot pass the monitor socket to QEMU: {0}")]
    Fd(String),
    /// An fd that QEMU's arguments name cannot be passed to it.
    #[error(transparent)]
    Pass(#[from] PassError),
}

/// The monitor socket, bound and listening, before QEMU starts.
pub struct Prepared {
    listener: std::os::unix::net::UnixListener,
    /// Inherited fds that QEMU's arguments name, to reach QEMU under these numbers.
    passed: Vec<(RawFd, OwnedFd)>,
    /// The monitor socket's path, in a private directory.
    pub monitor: PathBuf,
    /// Removed when dropped (with the socket in it).
    dir: tempfile::TempDir,
}

/// A QEMU process started on a pre-opened monitor socket.
pub struct Launched {
    /// The running QEMU.
    pub child: tokio::process::Child,
    /// The monitor socket's path, in a private directory.
    pub monitor: PathBuf,
    /// Removed when dropped.
    _dir: tempfile::TempDir,
}

/// Claims from `fds` the inherited fds that `argv` (QEMU's program and arguments)
/// names, then creates the private directory and binds the monitor socket in it.
/// An fd named but not inherited, or already a chardev's, is an error naming it.
pub fn prepare(argv: &[String], fds: &mut FdTable) -> Result<Prepared, LaunchError> {
    let mut passed: Vec<(RawFd, OwnedFd)> = Vec::new();
    for named in cmdline::fds_named(argv.get(1..).unwrap_or_default()) {
        // QEMU inherits qmpgate's stdin, stdout and stderr anyway; and an fd named
        // twice (two -add-fd of one file) is passed once.
        if named.fd <= 2 || passed.iter().any(|(fd, _)| *fd == named.fd) {
            continue;
        }
        let owned = fds.take_for_qemu(named.fd, &named.to_string())?;
        passed.push((named.fd, owned));
    }
    if !passed.is_empty() {
        let numbers: Vec<RawFd> = passed.iter().map(|(fd, _)| *fd).collect();
        tracing::info!(fds = ?numbers, "passing the fds QEMU's arguments name");
    }
    // mkdir's mode is masked by the umask, so 0700 is never widened; the chmod
    // that follows also undoes a umask that took the owner's own bits.
    let dir = tempfile::Builder::new()
        .prefix("qmpgate-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .map_err(LaunchError::Socket)?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(LaunchError::Socket)?;
    let path: PathBuf = dir.path().join("monitor.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).map_err(LaunchError::Socket)?;
    // Non-blocking before QEMU inherits it: QEMU (7.2 and 10.0 alike) sometimes
    // calls accept() on its listening monitor fd a second time after the one client
    // connected, and on a blocking socket that call never returns. QEMU's main loop
    // then hangs (the greeting went out, no command is ever answered); seen about
    // once in 300 starts.
    listener
        .set_nonblocking(true)
        .map_err(LaunchError::Socket)?;
    // Nobody else can reach into the directory; the socket is the owner's alone too.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(LaunchError::Socket)?;
    Ok(Prepared {
        listener,
        passed,
        monitor: path,
        dir,
    })
}

/// The fd number QEMU gets its monitor socket on: [`FIRST_MONITOR_FD`], or the
/// number after the highest fd passed, so that the monitor never takes the number
/// of an fd QEMU's arguments name.
fn monitor_fd(passed: &[RawFd]) -> RawFd {
    passed
        .iter()
        .map(|fd| fd + 1)
        .max()
        .unwrap_or(FIRST_MONITOR_FD)
        .max(FIRST_MONITOR_FD)
}

/// Whether QEMU's own arguments choose its sandbox.
fn sets_sandbox(args: &[String]) -> bool {
    args.iter()
        .any(|a| a == "-sandbox" || a == "--sandbox" || a.starts_with("-sandbox="))
}

/// The user QEMU runs as (`--runas`): its ids and groups, looked up before the fork.
#[derive(Debug, Clone)]
pub struct RunAs {
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
    groups: Vec<nix::unistd::Gid>,
}

impl RunAs {
    /// A user by name or uid; the group is the user's primary group, and the
    /// supplementary groups are the user's (from the group database).
    pub fn lookup(user: &str) -> Result<RunAs, LaunchError> {
        use nix::unistd::User;
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(nix::unistd::Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        };
        let user = match found {
            Ok(Some(user)) => user,
            _ => return Err(LaunchError::User(format!("no user '{user}'"))),
        };
        let name = std::ffi::CString::new(user.name.clone())
            .map_err(|_| LaunchError::User("user name with a NUL byte".into()))?;
        let groups = nix::unistd::getgrouplist(&name, user.gid)
            .map_err(|e| LaunchError::User(format!("groups of '{}': {e}", user.name)))?;
        Ok(RunAs {
            uid: user.uid,
            gid: user.gid,
            groups,
        })
    }
}

impl Prepared {
    /// Starts `argv` (QEMU's program and arguments) with the monitor appended, and
    /// [`DEFAULT_SANDBOX`] unless `argv` has a `-sandbox` of its own; as `runas`
    /// when given. The fds [`prepare`] claimed reach QEMU under their numbers.
    pub fn spawn(self, argv: &[String], runas: Option<RunAs>) -> Result<Launched, LaunchError> {
        let (program, args) = argv
            .split_first()
            .expect("clap requires the QEMU command line");
        let numbers: Vec<RawFd> = self.passed.iter().map(|(fd, _)| *fd).collect();
        let monitor_fd = monitor_fd(&numbers);
        let mut command = tokio::process::Command::new(program);
        command.args(args);
        if !sets_sandbox(args) {
            command.arg("-sandbox").arg(DEFAULT_SANDBOX);
        }
        command
            .arg("-chardev")
            .arg(format!(
                "socket,id=qmpgate-mon,fd={monitor_fd},server=on,wait=off"
            ))
            .arg("-mon")
            .arg("chardev=qmpgate-mon,mode=control")
            // Socket activation variables were for us, not for QEMU.
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("NOTIFY_SOCKET")
            .kill_on_drop(true);
        in_child(&mut command, runas);
        // Each passed fd keeps its number (command_fds clears its close-on-exec flag
        // in the child only); distinct numbers, so the mappings cannot collide.
        let mut mappings: Vec<FdMapping> = self
            .passed
            .into_iter()
            .map(|(fd, owned)| FdMapping {
                parent_fd: owned,
                child_fd: fd,
            })
            .collect();
        mappings.push(FdMapping {
            parent_fd: OwnedFd::from(self.listener),
            child_fd: monitor_fd,
        });
        command
            .fd_mappings(mappings)
            .map_err(|e| LaunchError::Fd(e.to_string()))?;
        let child = command.spawn().map_err(|source| LaunchError::Spawn {
            program: program.clone(),
            source,
        })?;
        // `command` (and with it our copy of the listening socket and of every passed
        // fd) is dropped here, so QEMU holds the only copies: if it dies, connecting
        // fails instead of hanging, and a passed socket's peer sees it close.
        drop(command);
        Ok(Launched {
            child,
            monitor: self.monitor,
            _dir: self.dir,
        })
    }
}

/// Sets up the child before `exec`: drops to `runas`'s ids when given, then makes
/// the child get SIGKILL when qmpgate dies, however it dies (`kill -9`, the OOM
/// killer): a QEMU with nobody gating its monitor must not run on. The death
/// signal comes last because the kernel clears it when the credentials change.
#[allow(unsafe_code)]
fn in_child(command: &mut tokio::process::Command, runas: Option<RunAs>) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: setgroups(2), setgid(2), setuid(2),
    // prctl(2) and getppid(2) are system calls with no allocation and no locks (the
    // group list was built before the fork).
    unsafe {
        command.pre_exec(move || {
            if let Some(user) = &runas {
                nix::unistd::setgroups(&user.groups)?;
                nix::unistd::setgid(user.gid)?;
                nix::unistd::setuid(user.uid)?;
            }
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // qmpgate may have died before prctl took effect.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(std::io::Error::other("qmpgate exited while starting QEMU"));
            }
            Ok(())
        });
    }
}

/// Describes how a process ended, for logs and errors.
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The exit code qmpgate passes on for QEMU's exit (128+signal for signals, as shells do).
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monitor_fd_is_above_every_passed_fd() {
        assert_eq!(monitor_fd(&[]), 3);
        assert_eq!(monitor_fd(&[3]), 4);
        assert_eq!(monitor_fd(&[30, 4, 31]), 32);
    }
}
