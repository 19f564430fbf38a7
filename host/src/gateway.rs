//! The gateway: listeners bound to one upstream, their plugin chain, and shutdown.
//!
//! [`Gateway::start`] opens every listener, connects to QEMU once and spawns one
//! accept loop per listener; listeners can be added and removed later (the control
//! monitor does). [`Gateway::run`] waits for a stop request or for the upstream to
//! end, then drains sessions under a grace deadline (one cancellation token, a task
//! tracker, then force).
//!
//! Layout: [`Metrics`] (counters), [`Shared`] (what every listener and session
//! shares, including the set of listeners), [`ListenerContext`] (one listener's
//! view), [`Gateway`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chardev::{ChardevSpec, Inherited, Listener, MonitorMode};
use crate::plugin::PluginChain;
use crate::status::Registry;
use crate::upstream::{self, Outcome, UpstreamError, UpstreamHandle};

/// How long sessions get to finish at shutdown before they are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Clients connected now.
    pub clients_connected: AtomicU64,
    /// Clients accepted since start.
    pub clients_total: AtomicU64,
    /// Messages received from clients.
    pub commands: AtomicU64,
    /// Commands refused by a plugin.
    pub denied: AtomicU64,
    /// Clients disconnected for not reading.
    pub slow_clients: AtomicU64,
}

/// A reload request: the answer says what was loaded, or why nothing changed.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<String, String>>;

/// One listener's entry in [`Shared::listeners`].
struct ListenerEntry {
    /// Stops this listener's accept loop (sessions already accepted go on).
    stop: CancellationToken,
    /// The spec's address, e.g. `path=/run/vm1.sock` or `fd=3`.
    address: String,
    /// What it is bound to, e.g. `unix:/run/vm1.sock`.
    bound: String,
}

/// What all listeners and sessions share.
pub struct Shared {
    /// The QEMU behind this gateway.
    pub upstream: UpstreamHandle,
    /// The upstream chardev's id and address, for status.
    pub upstream_spec: ChardevSpec,
    /// Plugins run on every listener's traffic; replaced whole on reload, while
    /// commands already deciding finish on the chain they started with.
    chain: RwLock<PluginChain>,
    /// Where reload requests go (SIGHUP and the control monitor's `x-qmpgate-reload`).
    reload: Mutex<Option<tokio::sync::mpsc::Sender<ReloadRequest>>>,
    /// Framing limit on one client message, in bytes.
    pub max_message: usize,
    /// Framing limit on nesting depth.
    pub max_depth: usize,
    /// How long a client waits for QEMU's answer, per command.
    pub timeouts: Timeouts,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Connected clients, QEMU's exit, for status.
    pub registry: Arc<Registry>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    next_client: AtomicU64,
    listeners: Mutex<BTreeMap<String, ListenerEntry>>,
    /// The status endpoint's and control monitor's chardevs: (id, role, address).
    services: Mutex<Vec<(String, &'static str, String)>>,
}

/// A listener's view: its id and everything shared.
pub struct ListenerContext {
    /// The listener chardev's id (shown to plugins as the client's `listener`).
    pub id: String,
    /// QMP or HMP.
    pub mode: MonitorMode,
    /// Set for `tls-creds=` listeners: the handshake comes before the session.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Shared state.
    pub shared: Arc<Shared>,
}

impl std::ops::Deref for ListenerContext {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// A listener as status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    /// The chardev id.
    pub id: String,
    /// The spec's address (`path=...`, `fd=3`, `systemd=qmp`, `fd=NAME` for named fds).
    pub address: String,
    /// What it is bound to.
    pub bound: String,
}

impl Shared {
    /// Starts accepting on `listener` as chardev `spec.id`.
    pub fn add_listener(
        self: &Arc<Self>,
        spec: &ChardevSpec,
        listener: Listener,
    ) -> Result<(), String> {
        let tls = match &spec.tls_creds {
            Some(dir) => Some(crate::tls::acceptor(dir).map_err(|e| e.to_string())?),
            None => None,
        };
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if listeners.contains_key(&spec.id) || spec.id == self.upstream_spec.id {
            return Err(format!("Chardev '{}' already exists", spec.id));
        }
        let bound = listener.local_description();
        tracing::info!(listener = %spec.id, address = %bound, "listening");
        let stop = self.shutdown.child_token();
        listeners.insert(
            spec.id.clone(),
            ListenerEntry {
                stop: stop.clone(),
                address: spec.address.to_string(),
                bound,
            },
        );
        let ctx = Arc::new(ListenerContext {
            id: spec.id.clone(),
            mode: spec.mode,
            tls,
            shared: self.clone(),
        });
        self.tracker.spawn(accept_loop(listener, ctx, stop));
        Ok(())
    }

    /// Stops accepting on listener `id` (its clients stay connected); false if
    /// there is no such listener.
    pub fn remove_listener(&self, id: &str) -> bool {
        let removed = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        match removed {
            Some(entry) => {
                entry.stop.cancel();
                tracing::info!(listener = id, "listener removed");
                true
            }
            None => false,
        }
    }

    /// The listeners, by id.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, entry)| ListenerInfo {
                id: id.clone(),
                address: entry.address.clone(),
                bound: entry.bound.clone(),
            })
            .collect()
    }

    /// Records a service chardev (`status`, `control`) for status.
    pub fn register_service(&self, id: &str, role: &'static str, address: String) {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id.to_string(), role, address));
    }

    /// The service chardevs: (id, role, address).
    pub fn services(&self) -> Vec<(String, &'static str, String)> {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current plugin chain.
    pub fn chain(&self) -> PluginChain {
        self.chain.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts a new plugin chain in place for every command decided from now on.
    pub fn replace_chain(&self, chain: PluginChain) {
        *self.chain.write().unwrap_or_else(|e| e.into_inner()) = chain;
    }

    /// Routes reload requests to `handler` (set once at start-up by `main`).
    pub fn set_reload_handler(&self, handler: tokio::sync::mpsc::Sender<ReloadRequest>) {
        *self.reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    /// Asks for configuration and plugins to be reloaded; returns what happened.
    pub async fn reload(&self) -> Result<String, String> {
        let handler = self
            .reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(handler) = handler else {
            return Err("reloading is not available".into());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        handler
            .send(tx)
            .await
            .map_err(|_| "the reloader has stopped".to_string())?;
        rx.await
            .map_err(|_| "the reloader has stopped".to_string())?
    }

    /// Runs `task` under the gateway's shutdown tracking.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// A token cancelled when the gateway shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Settings for [`Gateway::start`].
pub struct Settings {
    /// QEMU's monitor.
    pub upstream: ChardevSpec,
    /// Where clients connect.
    pub listeners: Vec<ChardevSpec>,
    /// Plugins for every listener.
    pub chain: PluginChain,
    /// Framing limits.
    pub max_message: usize,
    /// Framing limits.
    pub max_depth: usize,
    /// Per-command timeouts.
    pub timeouts: Timeouts,
    /// Events kept for clients that reconnect.
    pub event_history: usize,
}

/// How long a client waits for QEMU's answer to each command. A command that runs
/// out gets a QMP error; QEMU's late reply is discarded and counted.
#[derive(Debug, Clone, Default)]
pub struct Timeouts {
    /// For commands not listed; `None`: wait forever.
    pub default: Option<Duration>,
    /// Per command name; `None`: wait forever.
    pub per_command: std::collections::HashMap<String, Option<Duration>>,
}

impl Timeouts {
    /// Commands that legitimately take long (they write or read whole images, or run
    /// HMP's synchronous `savevm`/`loadvm`), with their default limit.
    pub const SLOW_COMMANDS: &[&str] = &[
        "dump-guest-memory",
        "human-monitor-command",
        "snapshot-save",
        "snapshot-load",
        "snapshot-delete",
        "blockdev-create",
        "block-commit",
    ];

    /// The limit for `command`.
    pub fn for_command(&self, command: &str) -> Option<Duration> {
        match self.per_command.get(command) {
            Some(limit) => *limit,
            None => self.default,
        }
    }
}

/// Waits for `pending`, or answers with a timeout error once `limit` passes.
pub async fn await_reply(
    pending: crate::upstream::PendingReply,
    command: &str,
    limit: Option<Duration>,
) -> crate::upstream::Reply {
    let Some(limit) = limit else {
        return pending.reply().await;
    };
    match tokio::time::timeout(limit, pending.reply()).await {
        Ok(reply) => reply,
        Err(_) => {
            let error = crate::qmp::QmpError::generic(format!(
                "QEMU did not answer '{command}' within {} ms; qmpgate stopped waiting (a late reply will be discarded)",
                limit.as_millis()
            ));
            let serde_json::Value::Object(body) = crate::qmp::error_response(&error, None) else {
                unreachable!("error responses are objects")
            };
            crate::upstream::Reply { seq: 0, body }
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum StartError {
    /// The upstream could not be reached or negotiated.
    #[error("upstream '{id}'")]
    Upstream {
        id: String,
        #[source]
        source: UpstreamError,
    },
    /// A listener could not be opened.
    #[error(transparent)]
    Listener(#[from] crate::chardev::ChardevError),
    /// A listener spec is not usable as a listener.
    #[error("listener '{0}': {1}")]
    Invalid(String, String),
}

/// Checks that a spec can be a QMP listener.
pub fn check_listener(spec: &ChardevSpec) -> Result<(), String> {
    if !spec.server {
        return Err("a listener needs server=on".into());
    }
    Ok(())
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    upstream_task: tokio::task::JoinHandle<Outcome>,
}

impl Gateway {
    /// Opens listeners first (so fd and path errors show before touching QEMU), then
    /// connects to QEMU once, then starts accepting. `inherited` keeps the fds no
    /// chardev claimed.
    pub async fn start(
        settings: Settings,
        inherited: &mut Inherited,
    ) -> Result<Gateway, StartError> {
        let mut listeners = Vec::new();
        for spec in &settings.listeners {
            check_listener(spec).map_err(|e| StartError::Invalid(spec.id.clone(), e))?;
            listeners.push((spec, spec.listen(inherited)?));
        }
        if settings.upstream.server {
            return Err(StartError::Invalid(
                settings.upstream.id.clone(),
                "the upstream must be a client chardev (server=off): qmpgate connects to QEMU's monitor".into(),
            ));
        }

        let shutdown = CancellationToken::new();
        let upstream_id = settings.upstream.id.clone();
        let (upstream, upstream_task) = upstream::connect(
            settings.upstream.clone(),
            inherited,
            settings.event_history,
            shutdown.clone(),
        )
        .await
        .map_err(|source| StartError::Upstream {
            id: upstream_id,
            source,
        })?;

        let shared = Arc::new(Shared {
            upstream,
            upstream_spec: settings.upstream,
            chain: RwLock::new(settings.chain),
            reload: Mutex::new(None),
            max_message: settings.max_message,
            max_depth: settings.max_depth,
            timeouts: settings.timeouts,
            metrics: Arc::new(Metrics::default()),
            registry: Arc::new(Registry::default()),
            tracker: TaskTracker::new(),
            shutdown,
            next_client: AtomicU64::new(1),
            listeners: Mutex::new(BTreeMap::new()),
            services: Mutex::new(Vec::new()),
        });
        for (spec, listener) in listeners {
            shared
                .add_listener(spec, listener)
                .map_err(|e| StartError::Invalid(spec.id.clone(), e))?;
        }
        Ok(Gateway {
            shared,
            upstream_task,
        })
    }

    /// What listeners, sessions, the status endpoint and the control monitor share.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs until `stop` is cancelled or (unless `outlive_upstream`) the upstream
    /// ends; then drains. `qmpgate run` outlives the upstream, to tell clients how
    /// QEMU exited before it stops.
    pub async fn run(mut self, stop: CancellationToken, outlive_upstream: bool) -> Outcome {
        let outcome = tokio::select! {
            _ = stop.cancelled() => Outcome::Shutdown,
            outcome = &mut self.upstream_task, if !outlive_upstream => {
                outcome.unwrap_or_else(|e| Outcome::Lost(format!("upstream task failed: {e}")))
            }
        };
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions did not finish within {SHUTDOWN_GRACE:?}; dropping them");
        }
        outcome
    }
}

async fn accept_loop(listener: Listener, ctx: Arc<ListenerContext>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let id = ctx.next_client.fetch_add(1, Ordering::Relaxed);
                ctx.metrics.clients_total.fetch_add(1, Ordering::Relaxed);
                let shutdown = ctx.shutdown.clone();
                let ctx = ctx.clone();
                // The handshake runs in the client's own task: a slow one holds nobody up.
                ctx.tracker.clone().spawn(async move {
                    let (stream, identity) = match &ctx.tls {
                        None => (stream, None),
                        Some(acceptor) => match crate::tls::accept(acceptor, stream).await {
                            Ok(accepted) => accepted,
                            Err(e) => {
                                tracing::warn!(listener = %ctx.id, ?peer, error = %e, "TLS handshake failed");
                                return;
                            }
                        },
                    };
                    crate::session::serve(stream, peer, identity, id, ctx, shutdown).await
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                tracing::error!(listener = %ctx.id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
