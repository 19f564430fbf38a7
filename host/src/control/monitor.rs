//! The control monitor: a QMP socket for managing qmpgate itself.
//!
//! It speaks QMP (greeting, `qmp_capabilities`) and follows QEMU's rules for fds:
//! - `getfd fdname=NAME` takes an fd passed with SCM_RIGHTS *in the same message*
//!   (as in QEMU, only the fds of the latest `recvmsg` are kept); `closefd` drops it;
//! - `chardev-add` (QAPI form, or its HMP form through `human-monitor-command`)
//!   adds a listener (`server=on`, bound to an upstream by qmpgate's `upstream`
//!   member) or an upstream (a client chardev: qmpgate connects to that QEMU once,
//!   with the policy its `profile`/`plugins` members select); at run time `fd=`
//!   names a `getfd` fd, never a number;
//! - `chardev-remove` stops a listener (its clients stay connected) or removes an
//!   upstream (its clients are told and disconnected, its listeners close);
//! - `query-chardev` lists the upstreams and the listeners;
//! - `x-qmpgate-reload` reloads the configuration file and the plugins (as SIGHUP).
//!
//! Named fds belong to the connection that received them, like a QEMU monitor's,
//! and are closed when it ends. Unlike QEMU's, they are bounded: at most
//! [`MAX_NAMED_FDS`] per connection and [`MAX_NAMED_FDS_TOTAL`] in all, over at
//! most [`MAX_CONTROL_CLIENTS`] connections, so that fds handed to qmpgate cannot
//! use up the ones its clients and QEMU links need.
//!
//! Layout: [`serve`] accepts; `ControlSession` handles one connection; the
//! `chardev_add_*` functions turn QAPI and HMP forms into [`ChardevSpec`]s.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use qmpgate_protocol::chardev::{Access, ChardevSpec, Peer};
use qmpgate_protocol::qjson::{Input, Reader};
use qmpgate_protocol::qmp::{self, ErrorClass, QmpError};

use super::reload::Reloader;
use crate::gateway::Hub;
use crate::io::{self, FdTable, Listener, Stream, recv_with_fds};
use crate::session::write_within;

/// Named fds one control connection may hold.
pub const MAX_NAMED_FDS: usize = 64;

/// Named fds all control connections together may hold.
pub const MAX_NAMED_FDS_TOTAL: usize = 256;

/// Fds one message may carry; a message with more has them all closed.
pub const MAX_FDS_PER_MESSAGE: usize = 8;

/// Control connections served at once; more are refused with an error.
pub const MAX_CONTROL_CLIENTS: usize = 16;

/// Named fds held by every control connection of the process.
static NAMED_FDS_HELD: AtomicUsize = AtomicUsize::new(0);

/// Serves the control monitor until shutdown. Only unix sockets can carry fds.
/// Only qmpgate's own uid and the uids/gids `access` lists get the control monitor
/// (it is root-equivalent: it connects to any monitor socket qmpgate can reach and
/// picks its policy). Others get one QMP error and are disconnected.
pub async fn serve(listener: Listener, access: Access, hub: Arc<Hub>, reloader: Reloader) {
    let shutdown = hub.shutdown_token();
    let own_uid = nix::unistd::geteuid().as_raw();
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CLIENTS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((Stream::Unix(mut stream), peer)) => {
                let admitted =
                    matches!(peer, Peer::Unix { uid, .. } if uid == own_uid) || access.lists(&peer);
                if !admitted {
                    tracing::warn!(
                        ?peer,
                        "control client refused: not qmpgate's uid nor listed in uids=/gids="
                    );
                    refuse(
                        &mut stream,
                        "qmpgate's control monitor serves only its own user and the uids/gids it lists",
                    )
                    .await;
                    continue;
                }
                let Ok(permit) = clients.clone().try_acquire_owned() else {
                    tracing::warn!(
                        ?peer,
                        limit = MAX_CONTROL_CLIENTS,
                        "control client refused: too many control connections"
                    );
                    refuse(
                        &mut stream,
                        &format!(
                            "qmpgate's control monitor serves at most {MAX_CONTROL_CLIENTS} connections at once"
                        ),
                    )
                    .await;
                    continue;
                };
                tracing::info!(?peer, "control client connected");
                let session = ControlSession {
                    hub: hub.clone(),
                    reloader: reloader.clone(),
                    named: FdTable::default(),
                    held: 0,
                    received: Vec::new(),
                    negotiated: false,
                };
                hub.spawn(async move {
                    session.run(stream).await;
                    drop(permit);
                });
            }
            Ok((Stream::Tcp(_) | Stream::Tls(_), _)) => {
                tracing::warn!("control connections must be unix sockets")
            }
            Err(e) => {
                tracing::error!(error = %e, "control accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Tells a refused peer why, in one QMP error, then lets it go. Best effort,
/// bounded: the refused peer may not read.
async fn refuse(stream: &mut UnixStream, desc: &str) {
    let refusal = qmp::error_response(&QmpError::generic(desc), None);
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        stream.write_all(&qmp::encode(&refusal)),
    )
    .await;
}

struct ControlSession {
    hub: Arc<Hub>,
    reloader: Reloader,
    /// Fds named with `getfd` on this connection.
    named: FdTable,
    /// How many of them count in [`NAMED_FDS_HELD`].
    held: usize,
    /// Fds that came with the latest message that carried any.
    received: Vec<OwnedFd>,
    negotiated: bool,
}

impl Drop for ControlSession {
    fn drop(&mut self) {
        // Its named fds close with it.
        NAMED_FDS_HELD.fetch_sub(self.held, Ordering::Relaxed);
    }
}

type Reply = Result<Value, QmpError>;

impl ControlSession {
    async fn run(mut self, mut stream: UnixStream) {
        let greeting = qmp::greeting(
            &json!({"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": format!("qmpgate {}", env!("CARGO_PKG_VERSION"))}),
            &[],
        );
        if write_within(
            &mut stream,
            &qmp::encode(&greeting),
            self.hub.limits().write_timeout,
        )
        .await
        .is_err()
        {
            return;
        }
        let mut framer = Reader::new(
            qmpgate_protocol::framing::DEFAULT_MAX_MESSAGE,
            qmpgate_protocol::framing::DEFAULT_MAX_DEPTH,
        );
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let shutdown = self.hub.shutdown_token();
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => return,
                received = recv_with_fds(&stream, &mut buf) => received,
            };
            let (n, fds) = match received {
                Ok((0, _)) | Err(_) => return,
                Ok(read) => read,
            };
            if !fds.is_empty() {
                // QEMU keeps only the fds of the latest message; older unclaimed ones
                // close. A message may carry a few (getfd takes one each), not a
                // kernel's worth: more are closed at once.
                self.received = fds;
                if self.received.len() > MAX_FDS_PER_MESSAGE {
                    tracing::warn!(
                        fds = self.received.len(),
                        limit = MAX_FDS_PER_MESSAGE,
                        "control client passed too many fds in one message; closed them"
                    );
                    self.received.clear();
                }
                self.count_named();
            }
            framer.push(&buf[..n], &mut frames);
            for frame in frames.drain(..) {
                let reply = self.handle(frame).await;
                self.count_named();
                if write_within(
                    &mut stream,
                    &qmp::encode(&reply),
                    self.hub.limits().write_timeout,
                )
                .await
                .is_err()
                {
                    return;
                }
            }
        }
    }

    async fn handle(&mut self, frame: Input) -> Value {
        let value = match frame {
            Input::Value(value) => value,
            Input::Error(desc) => return qmp::error_response(&QmpError::generic(desc), None),
            Input::TooLarge | Input::TooDeep => {
                return qmp::error_response(
                    &QmpError::generic("JSON message exceeds qmpgate's limits"),
                    None,
                );
            }
        };
        let request = match qmp::parse_request(value, false) {
            Ok(request) => request,
            Err(e) => return qmp::error_response(&e.error, e.id),
        };
        let result = match (self.negotiated, request.name.as_str()) {
            (false, "qmp_capabilities") => {
                self.negotiated = true;
                Ok(json!({}))
            }
            (false, _) => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )),
            (true, "qmp_capabilities") => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            (true, "x-qmpgate-reload") => self
                .reloader
                .reload()
                .await
                .map(Value::from)
                .map_err(|e| QmpError::generic(e.to_string())),
            (true, name) => self.execute(name, &request.arguments).await,
        };
        match result {
            Ok(value) => qmp::return_response(value, request.id),
            Err(error) => qmp::error_response(&error, request.id),
        }
    }

    async fn execute(&mut self, name: &str, args: &Map<String, Value>) -> Reply {
        match name {
            "getfd" => self.getfd(string_arg(args, "fdname")?),
            "closefd" => self.closefd(string_arg(args, "fdname")?),
            "chardev-add" => {
                let id = string_arg(args, "id")?;
                let backend = args
                    .get("backend")
                    .ok_or_else(|| QmpError::generic("Parameter 'backend' is missing"))?;
                let spec = ChardevSpec::from_qapi(id, backend).map_err(QmpError::generic)?;
                self.chardev_add(spec).await
            }
            "chardev-remove" => self.chardev_remove(string_arg(args, "id")?),
            "query-chardev" => Ok(self.query_chardev()),
            "human-monitor-command" => Ok(Value::from(
                self.hmp(string_arg(args, "command-line")?).await,
            )),
            other => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                format!("The command {other} has not been found"),
            )),
        }
    }

    /// Brings [`NAMED_FDS_HELD`] up to date with this connection's named fds
    /// (`getfd` adds, `closefd` and `chardev-add fd=` take away).
    fn count_named(&mut self) {
        let now = self.named.named_len() + self.received.len();
        NAMED_FDS_HELD.fetch_add(now, Ordering::Relaxed);
        NAMED_FDS_HELD.fetch_sub(self.held, Ordering::Relaxed);
        self.held = now;
    }

    fn getfd(&mut self, name: &str) -> Reply {
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::generic(
                "Parameter 'fdname' expects a name not starting with a digit",
            ));
        }
        if self.received.is_empty() {
            return Err(QmpError::generic(
                "No file descriptor supplied via SCM_RIGHTS",
            ));
        }
        // A name already in use is replaced (its old fd closed), as in QEMU: no
        // new fd is held then.
        if !self.named.has_named(name) {
            // Held by others, and named here (this message's fds are not held yet).
            let held = NAMED_FDS_HELD
                .load(Ordering::Relaxed)
                .saturating_sub(self.received.len());
            let refusal = if self.named.named_len() >= MAX_NAMED_FDS {
                format!(
                    "Too many named file descriptors: this connection holds {MAX_NAMED_FDS}, the most it may (closefd some first)"
                )
            } else if held >= MAX_NAMED_FDS_TOTAL {
                format!(
                    "Too many named file descriptors: qmpgate's control connections hold {MAX_NAMED_FDS_TOTAL}, the most they may"
                )
            } else {
                String::new()
            };
            if !refusal.is_empty() {
                // The fds offered for it are not kept either.
                self.received.clear();
                self.count_named();
                return Err(QmpError::generic(refusal));
            }
        }
        let fd = self.received.remove(0);
        self.named.add_named(name, fd);
        self.count_named();
        Ok(json!({}))
    }

    fn closefd(&mut self, name: &str) -> Reply {
        if self.named.close_named(name) {
            Ok(json!({}))
        } else {
            Err(QmpError::generic(format!(
                "File descriptor named '{name}' not found"
            )))
        }
    }

    /// A `server=on` chardev becomes a listener; a client chardev, an upstream (qmpgate
    /// connects to that QEMU once, now).
    async fn chardev_add(&mut self, spec: ChardevSpec) -> Reply {
        if !spec.server {
            self.hub
                .add_upstream(spec, &mut self.named)
                .await
                .map_err(|e| QmpError::generic(super::one_line(&e)))?;
            return Ok(json!({}));
        }
        // Everything that can refuse the add is checked before the socket is bound.
        self.hub
            .check_new_listener(&spec)
            .map_err(|e| QmpError::generic(super::one_line(&e)))?;
        // Binding may resolve a host name: on a blocking thread, with the
        // connection's named fds (one of them may be the socket).
        let mut named = std::mem::take(&mut self.named);
        let (listened, named) = tokio::task::spawn_blocking({
            let spec = spec.clone();
            move || (io::listen(&spec, &mut named), named)
        })
        .await
        .expect("binding a socket does not panic");
        self.named = named;
        let listener = listened.map_err(|e| QmpError::generic(super::one_line(&e)))?;
        self.hub
            .add_listener(&spec, listener)
            .await
            .map_err(|e| QmpError::generic(super::one_line(&e)))?;
        Ok(json!({}))
    }

    fn chardev_remove(&mut self, id: &str) -> Reply {
        if self.hub.remove_upstream(id) || self.hub.remove_listener(id) {
            Ok(json!({}))
        } else {
            Err(QmpError::generic(format!("Chardev '{id}' not found")))
        }
    }

    /// As QEMU's, plus qmpgate's own members: `upstream` on listeners, `policy` and
    /// `connected` on upstreams.
    fn query_chardev(&self) -> Value {
        let mut list = Vec::new();
        for shared in self.hub.upstreams() {
            let spec = &shared.upstream_spec;
            let connected = shared.upstream.info().connected;
            list.push(json!({
                "label": spec.id,
                "filename": format!("socket:{},server=off", spec.address),
                "frontend-open": connected,
                "policy": spec.policy.to_string(),
            }));
            for l in shared.listeners() {
                list.push(json!({
                    "label": l.id,
                    "filename": format!("socket:{},server=on", l.address),
                    "frontend-open": true,
                    "upstream": spec.id,
                }));
            }
        }
        Value::Array(list)
    }

    /// HMP forms, as QEMU's HMP prints them: errors come back as text, not QMP errors.
    async fn hmp(&mut self, line: &str) -> String {
        let line = line.trim();
        let (command, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let result = match command {
            "getfd" if !rest.is_empty() => self.getfd(rest).map(|_| String::new()),
            "closefd" if !rest.is_empty() => self.closefd(rest).map(|_| String::new()),
            "chardev-add" if !rest.is_empty() => match ChardevSpec::parse_runtime(rest) {
                Ok(spec) => self.chardev_add(spec).await.map(|_| String::new()),
                Err(e) => Err(QmpError::generic(e.to_string())),
            },
            "chardev-remove" if !rest.is_empty() => {
                self.chardev_remove(rest).map(|_| String::new())
            }
            "info" if rest == "chardev" => Ok(self
                .query_chardev()
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|c| {
                            format!(
                                "{}: filename={}\r\n",
                                c["label"].as_str().unwrap_or(""),
                                c["filename"].as_str().unwrap_or("")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()),
            "getfd" | "closefd" | "chardev-add" | "chardev-remove" => {
                Err(QmpError::generic(format!("{command}: missing argument")))
            }
            _ => Err(QmpError::generic(format!(
                "unknown command: '{command}' (the control monitor knows getfd, closefd, chardev-add, chardev-remove, info chardev)"
            ))),
        };
        match result {
            Ok(text) => text,
            Err(e) => format!("Error: {}\r\n", e.desc),
        }
    }
}

fn string_arg<'a>(args: &'a Map<String, Value>, key: &str) -> Result<&'a str, QmpError> {
    match args.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{key}', expected: string"
        ))),
        None => Err(QmpError::generic(format!("Parameter '{key}' is missing"))),
    }
}
