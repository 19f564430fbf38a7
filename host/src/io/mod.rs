//! Sockets and fds: listeners and streams for chardev specs, the fd table and the
//! adoption of inherited fds (the only `unsafe` code), fds that travel with
//! messages (SCM_RIGHTS), and TLS.
//!
//! An adopted fd is checked before use: it is open, a stream socket, listening when
//! the spec says `server=on` and connected when it says `server=off`; it is then
//! marked close-on-exec (so QEMU and other children never inherit it) and
//! non-blocking.

use std::os::fd::RawFd;
use std::path::PathBuf;

use thiserror::Error;

mod adopt;
pub mod fds;
pub mod pass;
pub mod socket;
pub mod tls;

pub use adopt::recv_with_fds;
pub use fds::{FdTable, PassError};
pub use socket::{Listener, Stream, connect, listen};

/// What went wrong opening or adopting a chardev's socket.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum SocketError {
    /// `fd=N` names an fd that is not open in this process.
    #[error("chardev '{id}': fd {fd} is not open (did the parent process pass it?)")]
    FdNotOpen { id: String, fd: RawFd },
    /// The fd is open but not a socket. `fd` says which, as the user named it
    /// (`fd 3`, `fd 'vm7'`, `systemd socket 'qmp'`).
    #[error("chardev '{id}': {fd} is not a socket")]
    NotASocket { id: String, fd: String },
    /// The socket is not a stream socket.
    #[error("chardev '{id}': {fd} is not a stream socket (SOCK_STREAM)")]
    NotStream { id: String, fd: String },
    /// `server=on` on a socket that is not listening, or the reverse.
    #[error("chardev '{id}': {fd} is {actual}, but the spec says server={expected}")]
    WrongMode {
        id: String,
        fd: String,
        actual: &'static str,
        expected: &'static str,
    },
    /// The socket's family is neither unix nor inet.
    #[error("chardev '{id}': {fd} has unsupported address family {family}")]
    Family {
        id: String,
        fd: String,
        family: String,
    },
    /// Two chardevs, or a chardev and QEMU's arguments (`qmpgate run`), name the
    /// same fd; `other` says who has it (`chardev 'qmp'`, `QEMU's -add-fd ...`).
    #[error("chardev '{id}': fd {fd} is already used by {other}")]
    FdInUse {
        id: String,
        fd: RawFd,
        other: String,
    },
    /// `systemd=NAME` with no such socket from systemd.
    #[error(
        "chardev '{id}': systemd passed no socket named '{name}' (LISTEN_FDNAMES: {available})"
    )]
    NoSystemdFd {
        id: String,
        name: String,
        available: String,
    },
    /// `fd=NAME` at run time with no fd by that name (QEMU's message).
    #[error("File descriptor named '{name}' has not been found")]
    NoNamedFd { id: String, name: String },
    /// A path exists and is not a socket; qmpgate will not delete it.
    #[error("chardev '{id}': {path} exists and is not a socket")]
    PathNotSocket { id: String, path: PathBuf },
    /// A socket at the path accepts connections: it belongs to a live server
    /// (another listener, QEMU's monitor, ...), which qmpgate will not cut off.
    #[error("chardev '{id}': {path} is in use: something accepts connections on it")]
    SocketInUse { id: String, path: PathBuf },
    /// A system call failed.
    #[error("chardev '{id}': {action}")]
    Io {
        id: String,
        action: String,
        #[source]
        source: std::io::Error,
    },
}
