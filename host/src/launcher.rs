//! `qmpgate run -- qemu-system-x86_64 ...`: start QEMU on a monitor socket that
//! qmpgate created, and connect to it exactly once.
//!
//! qmpgate binds a listening unix socket in a fresh private directory (mode 0700:
//! nobody else can reach QEMU's monitor), hands it to QEMU as an inherited fd with
//! `-chardev socket,id=qmpgate-mon,fd=3,server=on,wait=off -mon
//! chardev=qmpgate-mon,mode=control`, and closes its own copy. Because the socket
//! is listening before QEMU starts, the one `connect()` cannot race QEMU's start-up;
//! and because qmpgate keeps no copy, a QEMU that dies at start-up makes that
//! connect fail at once instead of hanging in the backlog.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitStatus;

use command_fds::{CommandFdExt, FdMapping};
use thiserror::Error;

/// The fd number QEMU sees its monitor socket on.
const QEMU_MONITOR_FD: i32 = 3;

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
    /// Mapping the fd into the child failed.
    #[error("cannot pass the monitor socket to QEMU: {0}")]
    Fd(String),
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

/// Starts `argv` (QEMU's program and arguments) with the monitor appended.
pub fn launch(argv: &[String]) -> Result<Launched, LaunchError> {
    let (program, args) = argv
        .split_first()
        .expect("clap requires the QEMU command line");
    let dir = tempfile::Builder::new()
        .prefix("qmpgate-")
        .tempdir()
        .map_err(LaunchError::Socket)?;
    let path: PathBuf = dir.path().join("monitor.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).map_err(LaunchError::Socket)?;

    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .arg("-chardev")
        .arg(format!(
            "socket,id=qmpgate-mon,fd={QEMU_MONITOR_FD},server=on,wait=off"
        ))
        .arg("-mon")
        .arg("chardev=qmpgate-mon,mode=control")
        // Socket activation variables were for us, not for QEMU.
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .kill_on_drop(true);
    command
        .fd_mappings(vec![FdMapping {
            parent_fd: OwnedFd::from(listener),
            child_fd: QEMU_MONITOR_FD,
        }])
        .map_err(|e| LaunchError::Fd(e.to_string()))?;
    let child = command.spawn().map_err(|source| LaunchError::Spawn {
        program: program.clone(),
        source,
    })?;
    // `command` (and with it our copy of the listening socket) is dropped here, so
    // QEMU holds the only copy: if it dies, connecting fails instead of hanging.
    drop(command);
    Ok(Launched {
        child,
        monitor: path,
        _dir: dir,
    })
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
