//! Chardev specs: QEMU's `-chardev socket,...` language and what each key means.
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
//! This module gives a spec its meaning and checks the rules between its keys; it
//! opens nothing (the host's `io` layer turns a spec into a socket). Both of the
//! control monitor's forms (the QemuOpts string and QAPI's `chardev-add` object)
//! are read by one reader of the keys (`from_keys`; `qapi` turns QAPI's members
//! into keys), so there is one validator.

use std::collections::HashSet;
use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;

use thiserror::Error;

mod qapi;
#[cfg(test)]
mod tests;

/// A spec that does not parse, or whose keys break a rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("chardev '{spec}': {reason}")]
pub struct SpecError {
    /// The spec as given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
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
pub enum ChainSelector {
    /// The configured plugins (or, with none configured, the built-in policy).
    #[default]
    Default,
    /// The built-in `hmp` and `qmp-policy` plugins with this profile.
    Profile(String),
    /// These configured plugins, by name, in this order.
    Plugins(Vec<String>),
}

impl fmt::Display for ChainSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainSelector::Default => write!(f, "default"),
            ChainSelector::Profile(profile) => write!(f, "profile={profile}"),
            ChainSelector::Plugins(names) => write!(f, "plugins={}", names.join(":")),
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
    pub fn shapes_file(&self) -> bool {
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
    pub policy: ChainSelector,
    /// `perm=`, `owner=`, `group=`, `uids=`, `gids=` (qmpgate's own keys, unix
    /// listeners only): who may reach it.
    pub access: Access,
    /// `fds=pass|close` (qmpgate's own key, unix listeners only): whether fds a
    /// client sends with `getfd`/`add-fd` (SCM_RIGHTS) travel on to QEMU. `None`:
    /// the profile's default ([`ChardevSpec::passes_fds`]).
    pub pass_fds: Option<bool>,
    /// `timeout-ms=` (qmpgate's own key, listeners only): how long this listener's
    /// clients wait for QEMU's answer to any command, replacing the gateway's
    /// timeouts; 0: no deadline. `None`: the profile's default
    /// ([`ChardevSpec::timeout`]).
    pub timeout_ms: Option<u64>,
}

/// The profile for the VM's manager (libvirt's own listener): the policy lets
/// everything through, as `permissive`, and the listener passes fds and sets no
/// deadline unless its spec says otherwise. libvirt starts QEMU with whatever
/// command line it likes, so nothing on its monitor can do more than it already
/// can; it sends fds with `getfd`/`add-fd` and keeps its own timeouts.
pub const MANAGER_PROFILE: &str = "libvirt";

/// A listener's command deadline: the gateway's timeouts, or one for every command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerTimeout {
    /// The gateway's per-command timeouts.
    Gateway,
    /// Every command waits at most this long; `None`: no deadline.
    Every(Option<std::time::Duration>),
}

impl ChardevSpec {
    /// Parses QEMU's `socket,key=value,...` form, as on the command line: `fd=` is a
    /// number. `,,` is a literal comma in a value.
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        ChardevSpec::parse_as(spec, false)
    }

    /// Parses a spec given at run time (on the control monitor): as in QEMU, `fd=`
    /// is then the *name* of an fd received with `getfd`, never a number.
    pub fn parse_runtime(spec: &str) -> Result<Self, SpecError> {
        ChardevSpec::parse_as(spec, true)
    }

    fn parse_as(spec: &str, runtime: bool) -> Result<Self, SpecError> {
        let fail = |reason: String| SpecError {
            spec: spec.to_string(),
            reason,
        };
        let mut parts = crate::qemuopts::split(spec).into_iter();
        match parts.next().as_deref() {
            Some("socket") => {}
            Some("") | None => return Err(fail("empty spec; expected 'socket,id=...'".into())),
            Some(other) if other.contains('=') => {
                return Err(fail(format!(
                    "expected the backend 'socket' first, found '{other}'"
                )));
            }
            // QEMU's older -qmp/-monitor address forms.
            Some(other) if other.starts_with("unix:") || other.starts_with("tcp:") => {
                let (kind, address) = other.split_once(':').expect("checked");
                let keys = match kind {
                    "unix" => format!("path={address}"),
                    _ => match address.rsplit_once(':') {
                        Some((host, port)) => format!("host={host},port={port}"),
                        None => format!("port={address}"),
                    },
                };
                return Err(fail(format!(
                    "'{other}' is QEMU's -qmp address form; qmpgate takes -chardev specs: socket,id=ID,{keys},server=on"
                )));
            }
            Some(other) => {
                return Err(fail(format!(
                    "chardev backend '{other}' is not supported by qmpgate (only 'socket')"
                )));
            }
        }

        let mut pairs = Vec::new();
        for part in parts {
            let Some((key, value)) = part.split_once('=') else {
                // QEMU's short boolean forms (deprecated there since 6.0).
                let hint = match &*part {
                    "server" | "wait" | "nodelay" | "telnet" | "websocket" => {
                        format!(" (QEMU's short form: write {part}=on)")
                    }
                    "nowait" | "noserver" => {
                        format!(" (QEMU's short form: write {}=off)", &part[2..])
                    }
                    _ => String::new(),
                };
                return Err(fail(format!("'{part}' is not of the form key=value{hint}")));
            };
            pairs.push((key.to_string(), value.to_string()));
        }
        ChardevSpec::from_keys(pairs, runtime, "on").map_err(fail)
    }

    /// The spec that `key=value` pairs describe: the one reader of a spec's keys,
    /// whichever form they came in (QemuOpts text or QAPI's `chardev-add`).
    /// `on` is how the caller's syntax spells server=on in messages (`on` in
    /// specs, `true` in QAPI).
    fn from_keys(pairs: Vec<(String, String)>, runtime: bool, on: &str) -> Result<Self, String> {
        // `named` is a socket found by name: systemd's, or (at run time) a getfd name.
        let (mut id, mut path, mut host, mut port, mut fd, mut named) =
            (None, None, None, None, None, None);
        let (mut server, mut reconnect_ms, mut mode) = (None, None, MonitorMode::Control);
        let mut tls_creds = None;
        let (mut upstream, mut policy) = (None, ChainSelector::Default);
        let mut access = Access::default();
        let (mut pass_fds, mut timeout_ms) = (None, None);
        let mut seen = HashSet::new();
        for (key, value) in pairs {
            let key = key.as_str();
            if !seen.insert(key.to_string()) {
                return Err(format!("parameter '{key}' given twice"));
            }
            match key {
                "id" => id = Some(value),
                "path" => path = Some(PathBuf::from(value)),
                "host" => host = Some(value),
                "port" => {
                    port = Some(value.parse::<u16>().map_err(|_| {
                        format!("Parameter 'port' expects a port number, got '{value}'")
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
                            .ok_or_else(|| format!("Unable to parse FD number '{value}'"))?,
                    )
                }
                "systemd" => named = Some(Address::Systemd(value)),
                "server" => server = Some(parse_bool(key, &value)?),
                // A listener never blocks start-up waiting for a client: qmpgate
                // accepts `wait=` for compatibility with QEMU specs and ignores it.
                "wait" => {
                    parse_bool(key, &value)?;
                }
                "tls-creds" => tls_creds = Some(PathBuf::from(value)),
                "upstream" => upstream = Some(value),
                "profile" | "plugins" if policy != ChainSelector::Default => {
                    return Err("give one of 'profile' or 'plugins', not both".into());
                }
                "profile" => policy = ChainSelector::Profile(value),
                "plugins" => {
                    let names: Vec<String> = value.split(':').map(str::to_string).collect();
                    if names.iter().any(String::is_empty) {
                        return Err(format!(
                            "Parameter 'plugins' expects names separated by ':', got '{value}'"
                        ));
                    }
                    policy = ChainSelector::Plugins(names)
                }
                "perm" => access.perm = Some(
                    u32::from_str_radix(&value, 8)
                        .ok()
                        .filter(|m| *m <= 0o777)
                        .ok_or_else(|| {
                            format!(
                                "Parameter 'perm' expects an octal mode such as 0660, got '{value}'"
                            )
                        })?,
                ),
                "owner" => access.owner = Some(parse_user(&value)?),
                "group" => access.group = Some(parse_group(&value)?),
                "uids" => access.uids = parse_ids(key, &value, parse_user)?,
                "gids" => access.gids = parse_ids(key, &value, parse_group)?,
                "fds" => {
                    pass_fds = Some(match value.as_str() {
                        "pass" => true,
                        "close" => false,
                        _ => {
                            return Err(format!(
                                "Parameter 'fds' expects 'pass' or 'close', got '{value}'"
                            ));
                        }
                    })
                }
                "timeout-ms" => timeout_ms = Some(parse_u64(key, &value)?),
                "reconnect-ms" => reconnect_ms = Some(parse_u64(key, &value)?),
                "reconnect" => reconnect_ms = Some(parse_u64(key, &value)?.saturating_mul(1000)),
                "mode" => {
                    mode = match value.as_str() {
                        "control" => MonitorMode::Control,
                        "readline" => MonitorMode::Readline,
                        _ => {
                            return Err(format!(
                                "Parameter 'mode' expects 'control' or 'readline', got '{value}'"
                            ));
                        }
                    }
                }
                _ => return Err(format!("Invalid parameter '{key}'")),
            }
        }

        let id = id
            .filter(|s| !s.is_empty())
            .ok_or_else(|| "Parameter 'id' is missing".to_string())?;
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "Parameter 'id' expects an identifier (letters, digits, '-', '_', '.'), got '{id}'"
            ));
        }
        let address = match (path, host, port, fd, named) {
            (Some(p), None, None, None, None) => Address::Path(p),
            (None, Some(host), Some(port), None, None) => Address::Tcp { host, port },
            (None, None, Some(port), None, None) => Address::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            (None, Some(_), None, None, None) => {
                return Err("'host' needs 'port'".into());
            }
            (None, None, None, Some(fd), None) => Address::Fd(fd),
            (None, None, None, None, Some(address)) => address,
            (None, None, None, None, None) => {
                return Err("one of 'path', 'host'/'port', 'fd' or 'systemd' is required".into());
            }
            (_, _, _, Some(_), _) => {
                return Err(
                    "'fd' cannot be combined with 'path', 'host', 'port' or 'systemd'".into(),
                );
            }
            _ => {
                return Err("give exactly one of 'path', 'host'/'port', 'fd' or 'systemd'".into());
            }
        };
        // QEMU's default is server=off; systemd only ever passes listening sockets.
        let server = server.unwrap_or(matches!(address, Address::Systemd(_)));
        if tls_creds.is_some() && !server {
            // QEMU's rule: no TLS on a client socket given as an fd (there is no host
            // name to check a certificate against).
            return Err(if matches!(address, Address::Fd(_) | Address::Named(_)) {
                "TLS is not allowed on a client socket given as an fd: there is no host name to verify".into()
            } else {
                "tls-creds is for listeners (server=on); qmpgate's link to QEMU does not use TLS"
                    .into()
            });
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
            pass_fds,
            timeout_ms,
        };
        spec.check_own_keys(on)?;
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
        if !self.server && (self.pass_fds.is_some() || self.timeout_ms.is_some()) {
            return Err(format!(
                "'fds' and 'timeout-ms' are for listeners (server={on}); this chardev is a client"
            ));
        }
        if self.pass_fds == Some(true) {
            if self.mode == MonitorMode::Readline {
                return Err(
                    "fds=pass is for QMP listeners (mode=control): HMP has no way to name them"
                        .into(),
                );
            }
            if matches!(self.address, Address::Tcp { .. }) || self.tls_creds.is_some() {
                return Err(
                    "fds=pass needs a unix socket: fds travel over unix sockets only".into(),
                );
            }
            if let ChainSelector::Profile(profile) = &self.policy
                && matches!(profile.as_str(), "safe" | "readonly")
            {
                return Err(format!(
                    "fds=pass: profile '{profile}' refuses every command that takes an fd; \
                     fds are for the VM's manager (profile={MANAGER_PROFILE} or permissive)"
                ));
            }
        }
        Ok(())
    }

    /// Whether the fds this listener's clients send travel on to QEMU: `fds=`, or
    /// for the manager's profile ([`MANAGER_PROFILE`]) yes, otherwise no.
    pub fn passes_fds(&self) -> bool {
        self.pass_fds.unwrap_or_else(|| self.is_manager())
    }

    /// This listener's command deadline: `timeout-ms=`, or for the manager's profile
    /// none (libvirt has its own), otherwise the gateway's.
    pub fn timeout(&self) -> ListenerTimeout {
        match self.timeout_ms {
            Some(0) => ListenerTimeout::Every(None),
            Some(ms) => ListenerTimeout::Every(Some(std::time::Duration::from_millis(ms))),
            None if self.is_manager() => ListenerTimeout::Every(None),
            None => ListenerTimeout::Gateway,
        }
    }

    fn is_manager(&self) -> bool {
        matches!(&self.policy, ChainSelector::Profile(p) if p == MANAGER_PROFILE)
    }
}

/// A spec used in a role it cannot have (an upstream that listens, a listener bound
/// to no upstream, ...).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct RoleError(pub String);

impl ChardevSpec {
    /// Checks that the spec can be an upstream (a link to QEMU's monitor).
    pub fn check_upstream(&self) -> Result<(), RoleError> {
        if self.server {
            return Err(RoleError(format!(
                "upstream '{}' must be a client chardev (server=off): qmpgate connects to QEMU's monitor",
                self.id
            )));
        }
        if self.access != Access::default() {
            return Err(RoleError(format!(
                "upstream '{}': 'perm', 'owner', 'group', 'uids' and 'gids' are for listeners",
                self.id
            )));
        }
        Ok(())
    }

    /// Checks that the spec can be a listener.
    pub fn check_listener(&self) -> Result<(), RoleError> {
        if !self.server {
            return Err(RoleError(format!(
                "listener '{}': a listener needs server=on",
                self.id
            )));
        }
        Ok(())
    }

    /// The upstream a listener serves: its `upstream=`, or the only upstream there is.
    pub fn bound_upstream<'a>(
        &self,
        upstream_ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<String, RoleError> {
        let ids: Vec<&str> = upstream_ids.into_iter().collect();
        let listener = &self.id;
        match (&self.upstream, ids.as_slice()) {
            (Some(id), _) if ids.contains(&id.as_str()) => Ok(id.clone()),
            (Some(id), _) => Err(RoleError(format!(
                "listener '{listener}': no upstream '{id}' (upstreams: {})",
                if ids.is_empty() {
                    "none".to_string()
                } else {
                    ids.join(", ")
                }
            ))),
            (None, [only]) => Ok(only.to_string()),
            (None, []) => Err(RoleError(format!(
                "listener '{listener}': there is no upstream to serve"
            ))),
            (None, _) => Err(RoleError(format!(
                "listener '{listener}': give upstream=ID; qmpgate has several upstreams ({})",
                ids.join(", ")
            ))),
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
