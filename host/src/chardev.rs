//! Chardevs: QEMU-style socket specs, and the sockets they stand for.
//!
//! qmpgate takes socket specs in QEMU's own `-chardev` syntax
//! (`socket,id=qmp,path=/run/vm1/qmp.sock,server=on,wait=off`), so an operator who
//! knows QEMU knows qmpgate. A chardev's socket is one of:
//! - a unix path or a TCP `host=`/`port=` that qmpgate binds or connects;
//! - `fd=N`: a socket the parent process created and left open for us (QEMU's
//!   `-chardev socket,fd=N` idea: the parent owns the socket, so it can connect
//!   exactly once, with no retry loop and no race with our start-up);
//! - `systemd=NAME`: a socket passed by systemd socket activation.
//!
//! An adopted fd is checked before use: it is open, a stream socket, listening when
//! the spec says `server=on` and connected when it says `server=off`; it is then
//! marked close-on-exec (so QEMU and other children never inherit it) and
//! non-blocking.
//!
//! Layout: [`ChardevSpec::parse`] reads a spec; [`Inherited`] holds the fds that came
//! from the parent or systemd; [`ChardevSpec::listen`] and [`ChardevSpec::connect`]
//! produce tokio sockets; the `adopt` submodule is the only `unsafe` code in qmpgate.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// What went wrong with a chardev spec or its socket.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum ChardevError {
    /// The spec does not parse.
    #[error("chardev '{spec}': {reason}")]
    Syntax {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
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
    /// Two chardevs name the same fd.
    #[error("chardev '{id}': fd {fd} is already used by chardev '{other}'")]
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

/// Where a chardev's socket comes from, as shown in status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A unix socket path.
    Path(PathBuf),
    /// A TCP address.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (0: any free port).
        port: u16,
    },
    /// A numeric fd inherited from the parent process.
    Fd(RawFd),
    /// A socket from systemd socket activation, by its LISTEN_FDNAMES name.
    Systemd(String),
    /// A named fd received at run time over SCM_RIGHTS (`getfd`), by name.
    Named(String),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Path(p) => write!(f, "path={}", p.display()),
            Address::Tcp { host, port } => write!(f, "host={host},port={port}"),
            Address::Fd(fd) => write!(f, "fd={fd}"),
            Address::Systemd(name) => write!(f, "systemd={name}"),
            Address::Named(name) => write!(f, "fd={name}"),
        }
    }
}

/// How a monitor listener speaks to its clients (QEMU's `-mon mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MonitorMode {
    /// QMP.
    #[default]
    Control,
    /// HMP (human monitor, line-oriented).
    Readline,
}

/// Which plugin chain traffic passes: qmpgate's own keys `profile=NAME` or
/// `plugins=A:B:C`, on an upstream chardev (for every listener of that VM) or on a
/// listener (for its clients only: a tenant's socket `readonly` beside a
/// management socket). Chardevs that select the same policy share one chain (one
/// set of plugin instances).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// The configured plugins (or, with none configured, the built-in policy).
    #[default]
    Default,
    /// The built-in `hmp` and `qmp-policy` plugins with this profile.
    Profile(String),
    /// These configured plugins, by name, in this order.
    Plugins(Vec<String>),
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Default => write!(f, "default"),
            Policy::Profile(profile) => write!(f, "profile={profile}"),
            Policy::Plugins(names) => write!(f, "plugins={}", names.join(":")),
        }
    }
}

/// Who may reach a unix listener: the socket file's mode and owner, and which peers
/// (by SO_PEERCRED) it serves. qmpgate's own keys `perm=0660`, `owner=`, `group=`
/// (systemd's `SocketMode=`/`SocketUser=`/`SocketGroup=`), `uids=0:1000`,
/// `gids=100`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    /// The socket file's mode; `None`: whatever the umask gives.
    pub perm: Option<u32>,
    /// The socket file's owner.
    pub owner: Option<u32>,
    /// The socket file's group.
    pub group: Option<u32>,
    /// Peers served by uid (empty with `gids` empty: anyone who can connect).
    pub uids: Vec<u32>,
    /// Peers served by primary gid.
    pub gids: Vec<u32>,
}

impl Access {
    /// Whether the spec restricts peers at all.
    pub fn restricts_peers(&self) -> bool {
        !self.uids.is_empty() || !self.gids.is_empty()
    }

    /// Whether `peer` is one of the listed uids or gids.
    pub fn lists(&self, peer: &Peer) -> bool {
        match peer {
            Peer::Unix { uid, gid, .. } => self.uids.contains(uid) || self.gids.contains(gid),
            _ => false,
        }
    }

    /// Whether the socket file needs its mode or owner set.
    fn shapes_file(&self) -> bool {
        self.perm.is_some() || self.owner.is_some() || self.group.is_some()
    }
}

/// A user name or uid, as `owner=` takes it.
fn parse_user(value: &str) -> Result<u32, String> {
    if let Ok(uid) = value.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(value) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        _ => Err(format!("no user '{value}'")),
    }
}

/// A group name or gid, as `group=` takes it.
fn parse_group(value: &str) -> Result<u32, String> {
    if let Ok(gid) = value.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(value) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        _ => Err(format!("no group '{value}'")),
    }
}

/// `0:1000:users`-style lists of uids or gids.
fn parse_ids(
    key: &str,
    value: &str,
    one: fn(&str) -> Result<u32, String>,
) -> Result<Vec<u32>, String> {
    value
        .split(':')
        .map(|part| {
            if part.is_empty() {
                Err(format!(
                    "Parameter '{key}' expects ids separated by ':', got '{value}'"
                ))
            } else {
                one(part)
            }
        })
        .collect()
}

/// A parsed `socket,...` chardev spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSpec {
    /// `id=`: names the chardev in logs, status and plugin context.
    pub id: String,
    /// Where the socket is.
    pub address: Address,
    /// `server=on`: listen for connections; `off`: connect (or adopt a connected fd).
    pub server: bool,
    /// `reconnect-ms=` (or QEMU's older `reconnect=` in seconds): for a client
    /// chardev, how long to wait before reconnecting after the link drops; `None`
    /// means never.
    pub reconnect_ms: Option<u64>,
    /// `mode=`: the monitor protocol on a listener.
    pub mode: MonitorMode,
    /// `tls-creds=DIR`: serve TLS with the credentials in DIR (listeners only).
    pub tls_creds: Option<PathBuf>,
    /// `upstream=ID` (qmpgate's own key, listeners only): the upstream whose clients
    /// this listener accepts; needed once qmpgate has more than one upstream.
    pub upstream: Option<String>,
    /// `profile=`/`plugins=` (qmpgate's own keys): the upstream's policy, or on a
    /// listener the policy of its clients (`Default`: its upstream's).
    pub policy: Policy,
    /// `perm=`, `owner=`, `group=`, `uids=`, `gids=` (qmpgate's own keys, unix
    /// listeners only): who may reach it.
    pub access: Access,
}

impl ChardevSpec {
    /// Parses QEMU's `socket,key=value,...` form, as on the command line: `fd=` is a
    /// number. `,,` is a literal comma in a value.
    pub fn parse(spec: &str) -> Result<Self, ChardevError> {
        ChardevSpec::parse_as(spec, false)
    }

    /// Parses a spec given at run time (on the control monitor): as in QEMU, `fd=`
    /// is then the *name* of an fd received with `getfd`, never a number.
    pub fn parse_runtime(spec: &str) -> Result<Self, ChardevError> {
        ChardevSpec::parse_as(spec, true)
    }

    fn parse_as(spec: &str, runtime: bool) -> Result<Self, ChardevError> {
        let fail = |reason: String| ChardevError::Syntax {
            spec: spec.to_string(),
            reason,
        };
        let mut parts = split_opts(spec).into_iter();
        match parts.next().as_deref() {
            Some("socket") => {}
            Some("") | None => return Err(fail("empty spec; expected 'socket,id=...'".into())),
            Some(other) if other.contains('=') => {
                return Err(fail(format!(
                    "expected the backend 'socket' first, found '{other}'"
                )));
            }
            Some(other) => {
                return Err(fail(format!(
                    "chardev backend '{other}' is not supported by qmpgate (only 'socket')"
                )));
            }
        }

        // `named` is a socket found by name: systemd's, or (at run time) a getfd name.
        let (mut id, mut path, mut host, mut port, mut fd, mut named) =
            (None, None, None, None, None, None);
        let (mut server, mut reconnect_ms, mut mode) = (None, None, MonitorMode::Control);
        let mut tls_creds = None;
        let (mut upstream, mut policy) = (None, Policy::Default);
        let mut access = Access::default();
        let mut seen = HashSet::new();
        for part in parts {
            let Some((key, value)) = part.split_once('=') else {
                return Err(fail(format!("'{part}' is not of the form key=value")));
            };
            if !seen.insert(key.to_string()) {
                return Err(fail(format!("parameter '{key}' given twice")));
            }
            let value = value.to_string();
            match key {
                "id" => id = Some(value),
                "path" => path = Some(PathBuf::from(value)),
                "host" => host = Some(value),
                "port" => {
                    port = Some(value.parse::<u16>().map_err(|_| {
                        fail(format!(
                            "Parameter 'port' expects a port number, got '{value}'"
                        ))
                    })?)
                }
                // QEMU's rule: on the command line an fd is a number; names exist only
                // at run time (getfd).
                "fd" if runtime => named = Some(Address::Named(value)),
                "fd" => {
                    fd = Some(
                        value
                            .parse::<RawFd>()
                            .ok()
                            .filter(|n| *n >= 0)
                            .ok_or_else(|| fail(format!("Unable to parse FD number '{value}'")))?,
                    )
                }
                "systemd" => named = Some(Address::Systemd(value)),
                "server" => server = Some(parse_bool(key, &value).map_err(fail)?),
                // A listener never blocks start-up waiting for a client: qmpgate
                // accepts `wait=` for compatibility with QEMU specs and ignores it.
                "wait" => {
                    parse_bool(key, &value).map_err(fail)?;
                }
                "tls-creds" => tls_creds = Some(PathBuf::from(value)),
                "upstream" => upstream = Some(value),
                "profile" | "plugins" if policy != Policy::Default => {
                    return Err(fail("give one of 'profile' or 'plugins', not both".into()));
                }
                "profile" => policy = Policy::Profile(value),
                "plugins" => {
                    let names: Vec<String> = value.split(':').map(str::to_string).collect();
                    if names.iter().any(String::is_empty) {
                        return Err(fail(format!(
                            "Parameter 'plugins' expects names separated by ':', got '{value}'"
                        )));
                    }
                    policy = Policy::Plugins(names)
                }
                "perm" => access.perm = Some(
                    u32::from_str_radix(&value, 8)
                        .ok()
                        .filter(|m| *m <= 0o777)
                        .ok_or_else(|| {
                            fail(format!(
                                "Parameter 'perm' expects an octal mode such as 0660, got '{value}'"
                            ))
                        })?,
                ),
                "owner" => access.owner = Some(parse_user(&value).map_err(fail)?),
                "group" => access.group = Some(parse_group(&value).map_err(fail)?),
                "uids" => access.uids = parse_ids(key, &value, parse_user).map_err(fail)?,
                "gids" => access.gids = parse_ids(key, &value, parse_group).map_err(fail)?,
                "reconnect-ms" => reconnect_ms = Some(parse_u64(key, &value).map_err(fail)?),
                "reconnect" => {
                    reconnect_ms = Some(parse_u64(key, &value).map_err(fail)?.saturating_mul(1000))
                }
                "mode" => {
                    mode = match value.as_str() {
                        "control" => MonitorMode::Control,
                        "readline" => MonitorMode::Readline,
                        _ => {
                            return Err(fail(format!(
                                "Parameter 'mode' expects 'control' or 'readline', got '{value}'"
                            )));
                        }
                    }
                }
                _ => return Err(fail(format!("Invalid parameter '{key}'"))),
            }
        }

        let id = id
            .filter(|s| !s.is_empty())
            .ok_or_else(|| fail("Parameter 'id' is missing".into()))?;
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(fail(format!(
                "Parameter 'id' expects an identifier (letters, digits, '-', '_', '.'), got '{id}'"
            )));
        }
        let address = match (path, host, port, fd, named) {
            (Some(p), None, None, None, None) => Address::Path(p),
            (None, Some(host), Some(port), None, None) => Address::Tcp { host, port },
            (None, None, Some(port), None, None) => Address::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            (None, Some(_), None, None, None) => {
                return Err(fail("'host' needs 'port'".into()));
            }
            (None, None, None, Some(fd), None) => Address::Fd(fd),
            (None, None, None, None, Some(address)) => address,
            (None, None, None, None, None) => {
                return Err(fail(
                    "one of 'path', 'host'/'port', 'fd' or 'systemd' is required".into(),
                ));
            }
            (_, _, _, Some(_), _) => {
                return Err(fail(
                    "'fd' cannot be combined with 'path', 'host', 'port' or 'systemd'".into(),
                ));
            }
            _ => {
                return Err(fail(
                    "give exactly one of 'path', 'host'/'port', 'fd' or 'systemd'".into(),
                ));
            }
        };
        // QEMU's default is server=off; systemd only ever passes listening sockets.
        let server = server.unwrap_or(matches!(address, Address::Systemd(_)));
        if tls_creds.is_some() && !server {
            // QEMU's rule: no TLS on a client socket given as an fd (there is no host
            // name to check a certificate against).
            return Err(fail(
                if matches!(address, Address::Fd(_) | Address::Named(_)) {
                    "TLS is not allowed on a client socket given as an fd: there is no host name to verify".into()
                } else {
                    "tls-creds is for listeners (server=on); qmpgate's link to QEMU does not use TLS".into()
                },
            ));
        }
        let spec = ChardevSpec {
            id,
            address,
            server,
            reconnect_ms,
            mode,
            tls_creds,
            upstream,
            policy,
            access,
        };
        spec.check_own_keys("on").map_err(fail)?;
        Ok(spec)
    }

    /// qmpgate's own keys each belong to a role: `upstream=` to listeners,
    /// `profile=`/`plugins=` to either. `on` is how the caller's syntax spells
    /// server=on (`on` in specs, `true` in QAPI).
    pub fn check_own_keys(&self, on: &str) -> Result<(), String> {
        if self.access.shapes_file() && !matches!(self.address, Address::Path(_)) {
            return Err("'perm', 'owner' and 'group' set a socket file's mode: give 'path'".into());
        }
        if !self.server && self.upstream.is_some() {
            return Err(format!(
                "'upstream' binds a listener (server={on}) to an upstream; this chardev is a client"
            ));
        }
        Ok(())
    }

    /// Opens the listening socket of a `server=on` chardev.
    pub fn listen(&self, inherited: &mut Inherited) -> Result<Listener, ChardevError> {
        let io = |action: String| {
            let id = self.id.clone();
            move |source| ChardevError::Io { id, action, source }
        };
        match &self.address {
            Address::Path(path) => {
                remove_stale_socket(&self.id, path)?;
                let listener = if self.access.shapes_file() {
                    bind_shaped(path, &self.access)
                        .map_err(io(format!("bind {}", path.display())))?
                } else {
                    UnixListener::bind(path).map_err(io(format!("bind {}", path.display())))?
                };
                let unlink = UnlinkOnDrop::new(path.clone())
                    .map_err(io(format!("stat {}", path.display())))?;
                Ok(Listener::Unix {
                    listener,
                    unlink: Some(unlink),
                })
            }
            Address::Tcp { host, port } => {
                let std = std::net::TcpListener::bind((host.as_str(), *port))
                    .map_err(io(format!("bind {host}:{port}")))?;
                std.set_nonblocking(true)
                    .map_err(io("set non-blocking".into()))?;
                Ok(Listener::Tcp(
                    TcpListener::from_std(std).map_err(io("register with tokio".into()))?,
                ))
            }
            Address::Fd(_) | Address::Systemd(_) | Address::Named(_) => {
                let socket = inherited.take(self)?;
                let socket = adopt::validate(&self.id, &self.address, socket, true)?;
                socket
                    .into_listener()
                    .map_err(io("register with tokio".into()))
            }
        }
    }

    /// Connects a `server=off` chardev (or adopts its connected fd). One attempt:
    /// retrying is the caller's choice (see `reconnect_ms`).
    pub async fn connect(&self, inherited: &mut Inherited) -> Result<Stream, ChardevError> {
        let io = |action: String| {
            let id = self.id.clone();
            move |source| ChardevError::Io { id, action, source }
        };
        match &self.address {
            Address::Path(path) => Ok(Stream::Unix(
                UnixStream::connect(path)
                    .await
                    .map_err(io(format!("connect to {}", path.display())))?,
            )),
            Address::Tcp { host, port } => Ok(Stream::Tcp(
                TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(io(format!("connect to {host}:{port}")))?,
            )),
            Address::Fd(_) | Address::Systemd(_) | Address::Named(_) => {
                let socket = inherited.take(self)?;
                let socket = adopt::validate(&self.id, &self.address, socket, false)?;
                socket
                    .into_stream()
                    .map_err(io("register with tokio".into()))
            }
        }
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!(
            "Parameter '{key}' expects 'on' or 'off', got '{value}'"
        )),
    }
}

fn parse_u64(key: &str, value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| format!("Parameter '{key}' expects a number, got '{value}'"))
}

/// Splits QemuOpts-style `a,b=c,,d` into `["a", "b=c,d"]`.
fn split_opts(spec: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("never empty").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("never empty").push(c);
        }
    }
    parts
}

/// QEMU unlinks any socket at the path before binding; qmpgate unlinks only a
/// stale one (nothing accepts on it), so that a mistaken or malicious
/// `chardev-add` cannot cut a live server (QEMU's monitor, another listener) off
/// from its clients, and never anything that is not a socket.
fn remove_stale_socket(id: &str, path: &Path) -> Result<(), ChardevError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                // Refused: a socket file whose server is gone.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                _ => {
                    return Err(ChardevError::SocketInUse {
                        id: id.to_string(),
                        path: path.to_path_buf(),
                    });
                }
            }
            std::fs::remove_file(path).map_err(|source| ChardevError::Io {
                id: id.to_string(),
                action: format!("remove stale socket {}", path.display()),
                source,
            })
        }
        Ok(_) => Err(ChardevError::PathNotSocket {
            id: id.to_string(),
            path: path.to_path_buf(),
        }),
        Err(_) => Ok(()),
    }
}

/// Binds a unix socket at `path` with `access`'s mode and owner and no moment in
/// which it is wider: bound in a fresh 0700 directory beside `path` (nobody else
/// can reach into it), given its mode and owner there, then renamed into place.
fn bind_shaped(path: &Path, access: &Access) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".qmpgate-bind-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)?;
    let staged = private.path().join("socket");
    let listener = UnixListener::bind(&staged)?;
    if let Some(mode) = access.perm {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    }
    if access.owner.is_some() || access.group.is_some() {
        std::os::unix::fs::chown(&staged, access.owner, access.group)?;
    }
    // Never over something that appeared at the path meanwhile.
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &staged,
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )?;
    Ok(listener)
}

/// A listening socket, ready to accept.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Removes the path qmpgate bound when dropped (not an inherited socket's
        /// path: the parent owns that).
        unlink: Option<UnlinkOnDrop>,
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Waits for the next client.
    pub async fn accept(&self) -> std::io::Result<(Stream, Peer)> {
        match self {
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred() {
                    Ok(cred) => Peer::Unix {
                        pid: cred.pid().unwrap_or(0),
                        uid: cred.uid(),
                        gid: cred.gid(),
                    },
                    Err(_) => Peer::Unknown,
                };
                Ok((Stream::Unix(stream), peer))
            }
            Listener::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                // QMP is request/response with small messages: Nagle only adds latency.
                let _ = stream.set_nodelay(true);
                Ok((Stream::Tcp(stream), Peer::Inet(addr.to_string())))
            }
        }
    }

    /// The bound address, for logs (`port=0` becomes the real port).
    pub fn local_description(&self) -> String {
        match self {
            Listener::Unix { listener, .. } => match listener.local_addr() {
                Ok(addr) => match addr.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".into(),
                },
                Err(_) => "unix:?".into(),
            },
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(addr) => format!("tcp:{addr}"),
                Err(_) => "tcp:?".into(),
            },
        }
    }
}

pub(crate) use adopt::recv_with_fds;

/// Removes the socket qmpgate bound at a path when dropped, if the path is still
/// that socket (not one another process bound there since).
#[derive(Debug)]
pub struct UnlinkOnDrop {
    path: PathBuf,
    /// The bound socket's device and inode.
    identity: (u64, u64),
}

impl UnlinkOnDrop {
    /// Remembers the socket now at `path`.
    fn new(path: PathBuf) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&path)?;
        Ok(UnlinkOnDrop {
            path,
            identity: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Who connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Kernel-verified credentials of a unix-socket peer (SO_PEERCRED).
    Unix {
        /// Process id (0 if unknown).
        pid: i32,
        /// User id.
        uid: u32,
        /// Group id.
        gid: u32,
    },
    /// A TCP peer address.
    Inet(String),
    /// Nothing known.
    Unknown,
}

/// A connected byte stream.
#[derive(Debug)]
pub enum Stream {
    /// Unix stream socket.
    Unix(UnixStream),
    /// TCP stream.
    Tcp(TcpStream),
    /// TLS over either (listeners with `tls-creds=`).
    Tls(Box<tokio_rustls::server::TlsStream<Stream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Stream {
    /// Writes what the socket takes at once, without waiting (a last word to a
    /// peer that is being turned away); TLS streams are left alone.
    pub fn try_write_once(&self, bytes: &[u8]) {
        let _ = match self {
            Stream::Unix(s) => s.try_write(bytes),
            Stream::Tcp(s) => s.try_write(bytes),
            Stream::Tls(_) => Ok(0),
        };
    }

    /// Splits into owned read and write halves.
    pub fn into_split(
        self,
    ) -> (
        Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    ) {
        match self {
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// Fds this process was given at start. qmpgate takes ownership of every one of
/// them before it opens anything itself (so `fd=N` can never name one of qmpgate's
/// own descriptors) and marks them close-on-exec (so none leaks into QEMU). Each
/// is then claimed at most once, by an `fd=N` or `systemd=NAME` chardev.
#[derive(Debug, Default)]
pub struct Inherited {
    /// Inherited fds not claimed yet.
    fds: HashMap<RawFd, OwnedFd>,
    /// systemd's fds with their LISTEN_FDNAMES names, not yet claimed.
    systemd: Vec<(String, RawFd)>,
    /// Every fd claimed so far, with the chardev that claimed it.
    claimed: Vec<(RawFd, String)>,
    /// Fds received at run time with `getfd`, by name.
    named: HashMap<String, OwnedFd>,
}

impl Inherited {
    /// Takes every fd above stderr and reads systemd's LISTEN_PID / LISTEN_FDS /
    /// LISTEN_FDNAMES (ignored when LISTEN_PID is another process's, as
    /// sd_listen_fds does). Call first thing in `main`, before any file is opened.
    pub fn from_process() -> Self {
        let vars = |k: &str| std::env::var(k).ok();
        let mut inherited = Inherited::from_vars(
            vars("LISTEN_PID").as_deref(),
            vars("LISTEN_FDS").as_deref(),
            vars("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        );
        inherited.fds = adopt::take_all_inherited();
        inherited
    }

    /// Inherited fds from a list (for embedding qmpgate, and tests).
    pub fn from_fds(fds: impl IntoIterator<Item = OwnedFd>) -> Self {
        Inherited {
            fds: fds.into_iter().map(|fd| (fd.as_raw_fd(), fd)).collect(),
            ..Default::default()
        }
    }

    /// Stores an fd under a name (`getfd`); an fd already under that name is closed,
    /// as QEMU does.
    pub fn add_named(&mut self, name: &str, fd: OwnedFd) {
        self.named.insert(name.to_string(), fd);
    }

    /// Closes a named fd (`closefd`); false if there is none by that name.
    pub fn close_named(&mut self, name: &str) -> bool {
        self.named.remove(name).is_some()
    }

    /// Whether an fd is held under `name`.
    pub fn has_named(&self, name: &str) -> bool {
        self.named.contains_key(name)
    }

    /// How many named fds are held.
    pub fn named_len(&self) -> usize {
        self.named.len()
    }

    /// The names of the fds held, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.named.keys().cloned().collect();
        names.sort();
        names
    }

    fn from_vars(pid: Option<&str>, fds: Option<&str>, names: Option<&str>, our_pid: u32) -> Self {
        /// systemd passes fds from 3 (SD_LISTEN_FDS_START).
        const FIRST: RawFd = 3;
        let mut inherited = Inherited::default();
        if pid.and_then(|p| p.parse::<u32>().ok()) != Some(our_pid) {
            return inherited;
        }
        let count = fds.and_then(|n| n.parse::<RawFd>().ok()).unwrap_or(0);
        let names: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
        for i in 0..count.max(0) {
            let name = names.get(i as usize).copied().unwrap_or("unknown");
            inherited.systemd.push((name.to_string(), FIRST + i));
        }
        inherited
    }

    /// Claims the fd of an `fd=` or `systemd=` chardev.
    fn take(&mut self, spec: &ChardevSpec) -> Result<OwnedFd, ChardevError> {
        let fd = match &spec.address {
            Address::Fd(fd) => *fd,
            Address::Systemd(name) => {
                let Some(pos) = self.systemd.iter().position(|(n, _)| n == name) else {
                    let available: Vec<&str> =
                        self.systemd.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(ChardevError::NoSystemdFd {
                        id: spec.id.clone(),
                        name: name.clone(),
                        available: if available.is_empty() {
                            "none".into()
                        } else {
                            available.join(":")
                        },
                    });
                };
                self.systemd.remove(pos).1
            }
            Address::Named(name) => {
                let fd = self
                    .named
                    .remove(name)
                    .ok_or_else(|| ChardevError::NoNamedFd {
                        id: spec.id.clone(),
                        name: name.clone(),
                    })?;
                return Ok(fd);
            }
            _ => unreachable!("only fd= and systemd= chardevs claim inherited fds"),
        };
        if let Some((_, other)) = self.claimed.iter().find(|(c, _)| *c == fd) {
            return Err(ChardevError::FdInUse {
                id: spec.id.clone(),
                fd,
                other: other.clone(),
            });
        }
        let owned = self
            .fds
            .remove(&fd)
            .ok_or_else(|| ChardevError::FdNotOpen {
                id: spec.id.clone(),
                fd,
            })?;
        self.claimed.push((fd, spec.id.clone()));
        Ok(owned)
    }
}

/// Adopting raw fds: the only `unsafe` code in qmpgate.
mod adopt {
    #![allow(unsafe_code)]

    use super::*;
    use nix::sys::socket::{
        AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
    };
    use nix::sys::stat::{SFlag, fstat};
    use std::os::fd::{AsFd, FromRawFd};

    /// A checked socket of a known family.
    pub(super) enum Socket {
        Unix(OwnedFd),
        Inet(OwnedFd),
    }

    /// Takes ownership of every open fd above stderr, marking each close-on-exec.
    pub(super) fn take_all_inherited() -> HashMap<RawFd, OwnedFd> {
        // Listing /proc/self/fd opens a descriptor of its own; collect the numbers
        // first, close the listing, then keep only what is still open.
        let numbers: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
            Ok(dir) => dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut fds = HashMap::new();
        for fd in numbers {
            // SAFETY: F_GETFD reads the descriptor flags and nothing else; an fd that is
            // not open (the listing's own) fails with EBADF and is left alone.
            if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } < 0 {
                continue;
            }
            // SAFETY: this runs first thing in `main`, before qmpgate opens any file, so
            // every open fd above stderr was inherited from the parent and nothing else
            // in the process owns it; each number is taken once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = nix::fcntl::fcntl(
                owned.as_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            fds.insert(fd, owned);
        }
        fds
    }

    /// Checks that the fd is a stream socket in the mode the spec wants, and marks it
    /// close-on-exec and non-blocking.
    pub(super) fn validate(
        id: &str,
        address: &Address,
        owned: OwnedFd,
        listening: bool,
    ) -> Result<Socket, ChardevError> {
        // Name the fd as the user did: a number, a getfd name, a systemd name.
        let fd = match address {
            Address::Systemd(name) => format!("systemd socket '{name}'"),
            Address::Named(name) => format!("fd '{name}'"),
            _ => format!("fd {}", owned.as_raw_fd()),
        };
        let io = |action: &str| {
            let (id, action) = (id.to_string(), action.to_string());
            move |e: nix::Error| ChardevError::Io {
                id,
                action,
                source: std::io::Error::from(e),
            }
        };
        let stat = fstat(owned.as_fd()).map_err(io("fstat"))?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
            return Err(ChardevError::NotASocket {
                id: id.to_string(),
                fd,
            });
        }
        if getsockopt(&owned, sockopt::SockType).map_err(io("getsockopt(SO_TYPE)"))?
            != SockType::Stream
        {
            return Err(ChardevError::NotStream {
                id: id.to_string(),
                fd,
            });
        }
        let accepting =
            getsockopt(&owned, sockopt::AcceptConn).map_err(io("getsockopt(SO_ACCEPTCONN)"))?;
        let connected = !accepting
            && nix::sys::socket::getpeername::<SockaddrStorage>(owned.as_raw_fd()).is_ok();
        if listening != accepting || (!listening && !connected) {
            let actual = if accepting {
                "a listening socket"
            } else if connected {
                "a connected socket"
            } else {
                "neither listening nor connected"
            };
            return Err(ChardevError::WrongMode {
                id: id.to_string(),
                fd,
                actual,
                expected: if listening { "on" } else { "off" },
            });
        }
        nix::fcntl::fcntl(
            owned.as_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(io("set close-on-exec"))?;
        let flags = nix::fcntl::fcntl(owned.as_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(io("get flags"))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(owned.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(io("set non-blocking"))?;
        let addr: SockaddrStorage = getsockname(owned.as_raw_fd()).map_err(io("getsockname"))?;
        match addr.family() {
            Some(AddressFamily::Unix) => Ok(Socket::Unix(owned)),
            Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => Ok(Socket::Inet(owned)),
            other => Err(ChardevError::Family {
                id: id.to_string(),
                fd,
                family: format!("{other:?}"),
            }),
        }
    }

    /// Reads bytes and any fds passed with them (SCM_RIGHTS). Received fds are
    /// close-on-exec from the start (MSG_CMSG_CLOEXEC).
    pub(crate) async fn recv_with_fds(
        stream: &UnixStream,
        buf: &mut [u8],
    ) -> std::io::Result<(usize, Vec<OwnedFd>)> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};
        use std::io::IoSliceMut;
        loop {
            stream.readable().await?;
            let result = stream.try_io(tokio::io::Interest::READABLE, || {
                let mut cmsg = nix::cmsg_space!([RawFd; 16]);
                let mut iov = [IoSliceMut::new(buf)];
                let msg = recvmsg::<UnixAddr>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for message in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = message {
                        for fd in raw {
                            // SAFETY: the kernel just installed this fd in our table for this
                            // message; nothing else in the process knows its number.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                Ok((msg.bytes, fds))
            });
            match result {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    impl Socket {
        pub(super) fn into_listener(self) -> std::io::Result<Listener> {
            match self {
                Socket::Unix(fd) => Ok(Listener::Unix {
                    listener: UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))?,
                    unlink: None,
                }),
                Socket::Inet(fd) => Ok(Listener::Tcp(TcpListener::from_std(
                    std::net::TcpListener::from(fd),
                )?)),
            }
        }

        pub(super) fn into_stream(self) -> std::io::Result<Stream> {
            match self {
                Socket::Unix(fd) => Ok(Stream::Unix(UnixStream::from_std(
                    std::os::unix::net::UnixStream::from(fd),
                )?)),
                Socket::Inet(fd) => Ok(Stream::Tcp(TcpStream::from_std(
                    std::net::TcpStream::from(fd),
                )?)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(spec: &str) -> String {
        ChardevSpec::parse(spec).unwrap_err().to_string()
    }

    #[test]
    fn parses_qemu_style_specs() {
        let s = ChardevSpec::parse("socket,id=qmp,path=/run/a,,b.sock,server=on,wait=off").unwrap();
        assert_eq!(s.id, "qmp");
        assert_eq!(s.address, Address::Path("/run/a,b.sock".into()));
        assert!(s.server);
        let s = ChardevSpec::parse("socket,id=t,host=::1,port=4444,reconnect=2").unwrap();
        assert_eq!(
            s.address,
            Address::Tcp {
                host: "::1".into(),
                port: 4444
            }
        );
        assert!(!s.server);
        assert_eq!(s.reconnect_ms, Some(2000));
        let s = ChardevSpec::parse("socket,id=f,fd=3,server=on,mode=readline").unwrap();
        assert_eq!(s.address, Address::Fd(3));
        assert_eq!(s.mode, MonitorMode::Readline);
        let s = ChardevSpec::parse("socket,id=sd,systemd=qmp").unwrap();
        assert!(s.server, "systemd sockets listen");
    }

    #[test]
    fn rejects_bad_specs_with_clear_reasons() {
        assert!(err("socket,path=/x").contains("Parameter 'id' is missing"));
        assert!(err("file,id=x,path=/x").contains("backend 'file' is not supported"));
        assert!(err("socket,id=x,fd=3,path=/x").contains("'fd' cannot be combined"));
        assert!(err("socket,id=x,fd=myfd").contains("Unable to parse FD number 'myfd'"));
        assert!(err("socket,id=x,path=/x,server=maybe").contains("expects 'on' or 'off'"));
        assert!(err("socket,id=x,path=/x,colour=red").contains("Invalid parameter 'colour'"));
        assert!(err("socket,id=x").contains("one of 'path'"));
        assert!(err("socket,id=x,path=/a,path=/b").contains("given twice"));
        assert!(err("socket,id=x,host=h").contains("'host' needs 'port'"));
        assert!(err("socket,id=a b,path=/x").contains("expects an identifier"));
    }

    #[test]
    fn upstreams_select_policies_and_listeners_select_upstreams() {
        let s = ChardevSpec::parse("socket,id=vm1,path=/q,profile=readonly").unwrap();
        assert_eq!(s.policy, Policy::Profile("readonly".into()));
        let s = ChardevSpec::parse("socket,id=vm1,path=/q,plugins=hmp:strict").unwrap();
        assert_eq!(
            s.policy,
            Policy::Plugins(vec!["hmp".into(), "strict".into()])
        );
        let s = ChardevSpec::parse("socket,id=g,path=/g,server=on,upstream=vm1").unwrap();
        assert_eq!(s.upstream.as_deref(), Some("vm1"));
        assert_eq!(
            ChardevSpec::parse("socket,id=g,path=/g,server=on,profile=readonly")
                .unwrap()
                .policy,
            Policy::Profile("readonly".into())
        );
        assert!(err("socket,id=q,path=/q,upstream=vm1").contains("this chardev is a client"));
        assert!(err("socket,id=q,path=/q,profile=safe,plugins=a").contains("not both"));
        assert!(err("socket,id=q,path=/q,plugins=a::b").contains("separated by ':'"));
    }

    #[test]
    fn systemd_fds_are_ignored_when_meant_for_another_process() {
        assert!(
            Inherited::from_vars(Some("1"), Some("2"), None, 99)
                .systemd
                .is_empty()
        );
        let i = Inherited::from_vars(Some("99"), Some("2"), Some("qmp:status"), 99);
        assert_eq!(
            i.systemd,
            vec![("qmp".to_string(), 3), ("status".to_string(), 4)]
        );
    }

    #[tokio::test]
    async fn adopting_bad_fds_fails_clearly() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let raw = file.as_raw_fd();
        let mut inherited = Inherited::from_fds([OwnedFd::from(file)]);
        let spec = ChardevSpec::parse("socket,id=x,fd=999,server=on").unwrap();
        assert!(matches!(
            spec.listen(&mut inherited),
            Err(ChardevError::FdNotOpen { fd: 999, .. })
        ));
        let spec = ChardevSpec::parse(&format!("socket,id=x,fd={raw},server=on")).unwrap();
        assert!(
            matches!(spec.listen(&mut inherited), Err(ChardevError::NotASocket { fd, .. }) if fd == format!("fd {raw}"))
        );
    }

    #[tokio::test]
    async fn adopting_a_listener_as_a_client_is_a_mode_error() {
        let dir = std::env::temp_dir().join(format!("qmpgate-chardev-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let listener = std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
        let raw = listener.as_raw_fd();
        let mut inherited = Inherited::from_fds([OwnedFd::from(listener)]);
        let spec = ChardevSpec::parse(&format!("socket,id=x,fd={raw}")).unwrap();
        let e = spec.connect(&mut inherited).await.unwrap_err().to_string();
        assert!(
            e.contains("is a listening socket, but the spec says server=off"),
            "{e}"
        );
        // The fd was claimed: a second chardev cannot take it again.
        let again = ChardevSpec::parse(&format!("socket,id=y,fd={raw},server=on")).unwrap();
        assert!(matches!(
            again.listen(&mut inherited),
            Err(ChardevError::FdInUse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
