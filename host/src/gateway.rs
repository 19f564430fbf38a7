//! The gateway: upstreams, the listeners bound to each, their plugin chains, and
//! shutdown.
//!
//! One process serves any number of upstreams (QEMU monitors), each named by its
//! chardev id. A [`Hub`] holds them; each upstream is a [`Shared`] with its own link
//! to QEMU, listeners, counters and event history, and the plugin chain its policy
//! selects. Upstreams that select the same policy share one chain, and every chain
//! shares the process's compiled plugins ([`Chains`]).
//!
//! [`Gateway::open_listeners`] opens every listener; [`Gateway::start`] connects to
//! each QEMU once and spawns
//! one accept loop per listener; upstreams and listeners can be added and removed
//! later (the control monitor does). An upstream whose QEMU goes away is removed
//! with its listeners and clients. [`Gateway::run`] waits for a stop request, or for
//! the last upstream to go (unless a control monitor can add more), then drains
//! sessions under a grace deadline (one cancellation token, a task tracker, then
//! force).
//!
//! Layout: [`Metrics`] (counters), [`Shared`] (one upstream: what its listeners and
//! sessions share), [`ListenerContext`] (one listener's view), [`Chains`], [`Hub`],
//! [`Gateway`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chardev::{ChardevSpec, Inherited, Listener, MonitorMode, Policy};
use crate::config::{PluginSource, PluginSpec};
use crate::plugin::{PluginChain, Runtime};
use crate::status::Registry;
use crate::upstream::{self, Outcome, UpstreamError, UpstreamHandle};

/// How long sessions get to finish at shutdown before they are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One upstream's counters.
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
    /// Clients disconnected because their input kept making plugins fail.
    pub faulting_clients: AtomicU64,
    /// Connections refused by the caps on clients and handshakes.
    pub refused_clients: AtomicU64,
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
    /// The listener's own policy (`profile=`/`plugins=` on it), with the chain it
    /// selects; `None`: its clients pass the upstream's chain.
    own: Option<(Policy, Arc<RwLock<PluginChain>>)>,
}

/// Limits every session works under, whichever upstream it serves.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Framing limit on one client message, in bytes.
    pub max_message: usize,
    /// Framing limit on nesting depth.
    pub max_depth: usize,
    /// How long a client waits for QEMU's answer, per command.
    pub timeouts: Timeouts,
    /// Events kept per upstream for clients that reconnect.
    pub event_history: usize,
    /// How each upstream notices a QEMU that stopped answering.
    pub liveness: crate::upstream::Liveness,
    /// Caps on connections.
    pub admission: Admission,
    /// Connections (clients of every listener, status requests) the process may
    /// hold at once: its fd limit less [`Admission::fd_reserve`], so that QEMU
    /// links, listeners and the control monitor always have fds.
    pub connections: Arc<tokio::sync::Semaphore>,
}

/// Caps on connections: no listener or peer can use up the fds and tasks that the
/// others, QEMU's links and the control monitor need.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Clients one listener serves at once (TLS handshakes included).
    pub max_clients: usize,
    /// TLS handshakes in progress on one listener.
    pub max_handshakes: usize,
    /// How long a TLS client may take to complete its handshake.
    pub handshake_timeout: Duration,
    /// Fds kept out of the connections' reach.
    pub fd_reserve: usize,
    /// Connections the status endpoint serves at once.
    pub status_connections: usize,
    /// How long an HTTP client may take to send its request headers.
    pub status_header_timeout: Duration,
    /// `/events` streams served at once.
    pub status_subscribers: usize,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_clients: 64,
            max_handshakes: 16,
            handshake_timeout: Duration::from_secs(5),
            fd_reserve: 512,
            status_connections: 64,
            status_header_timeout: Duration::from_secs(5),
            status_subscribers: 16,
        }
    }
}

impl Admission {
    /// The process-wide connection budget: the soft fd limit less the reserve
    /// (at least 16, so that a tiny limit still serves someone).
    pub fn connection_budget(&self) -> usize {
        use nix::sys::resource::{Resource, getrlimit};
        let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        (usize::try_from(soft).unwrap_or(usize::MAX))
            .saturating_sub(self.fd_reserve)
            .max(16)
    }
}

/// One upstream and what its listeners and sessions share.
pub struct Shared {
    /// The QEMU behind this upstream.
    pub upstream: UpstreamHandle,
    /// The upstream chardev's id and address, for status.
    pub upstream_spec: ChardevSpec,
    /// Plugins run on every listener's traffic; replaced whole on reload, while
    /// commands already deciding finish on the chain they started with.
    chain: RwLock<PluginChain>,
    /// Limits for its sessions: the gateway's, shared by every upstream.
    pub limits: Arc<SessionLimits>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Connected clients, QEMU's exit, for status.
    pub registry: Arc<Registry>,
    tracker: TaskTracker,
    /// Cancelled when this upstream is removed or the gateway shuts down.
    shutdown: CancellationToken,
    /// Client ids are unique in the process, across upstreams.
    next_client: Arc<AtomicU64>,
    listeners: Mutex<BTreeMap<String, ListenerEntry>>,
}

/// A listener's view: its id and its upstream's shared state.
pub struct ListenerContext {
    /// The listener chardev's id (shown to plugins as the client's `listener`).
    pub id: String,
    /// QMP or HMP.
    pub mode: MonitorMode,
    /// Set for `tls-creds=` listeners: the handshake comes before the session.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Which peers it serves (`uids=`/`gids=`; by default, anyone who can connect).
    pub access: crate::chardev::Access,
    /// The listener's own chain (its `profile=`/`plugins=`), shared with its entry
    /// so that a reload replaces it; `None`: the upstream's.
    own_chain: Option<Arc<RwLock<PluginChain>>>,
    /// Its clients ([`Admission::max_clients`]).
    clients: Arc<tokio::sync::Semaphore>,
    /// Its TLS handshakes in progress ([`Admission::max_handshakes`]).
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Shared state.
    pub shared: Arc<Shared>,
}

impl ListenerContext {
    /// The chain this listener's clients pass: its own, or its upstream's.
    pub fn chain(&self) -> PluginChain {
        match &self.own_chain {
            Some(chain) => chain.read().unwrap_or_else(|e| e.into_inner()).clone(),
            None => self.shared.chain(),
        }
    }
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
    /// Its own policy, when it has one (else its upstream's applies).
    pub policy: Option<Policy>,
}

impl Shared {
    /// Starts accepting on `listener` as chardev `spec.id`. Callers check that the id
    /// is free ([`Hub::add_listener`] does, across upstreams).
    fn add_listener(
        self: &Arc<Self>,
        spec: &ChardevSpec,
        listener: Listener,
        own_chain: Option<PluginChain>,
    ) -> Result<(), String> {
        let tls = match &spec.tls_creds {
            Some(dir) => Some(crate::tls::acceptor(dir).map_err(|e| e.to_string())?),
            None => None,
        };
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let bound = listener.local_description();
        tracing::info!(listener = %spec.id, upstream = %self.upstream_spec.id, address = %bound, "listening");
        let stop = self.shutdown.child_token();
        let own_chain = own_chain.map(|chain| Arc::new(RwLock::new(chain)));
        listeners.insert(
            spec.id.clone(),
            ListenerEntry {
                stop: stop.clone(),
                address: spec.address.to_string(),
                bound,
                own: own_chain.clone().map(|chain| (spec.policy.clone(), chain)),
            },
        );
        let ctx = Arc::new(ListenerContext {
            id: spec.id.clone(),
            mode: spec.mode,
            tls,
            access: spec.access.clone(),
            own_chain,
            clients: Arc::new(tokio::sync::Semaphore::new(
                self.limits.admission.max_clients,
            )),
            handshakes: Arc::new(tokio::sync::Semaphore::new(
                self.limits.admission.max_handshakes,
            )),
            shared: self.clone(),
        });
        self.tracker.spawn(accept_loop(listener, ctx, stop));
        Ok(())
    }

    /// Stops accepting on listener `id` (its clients stay connected); false if
    /// there is no such listener.
    fn remove_listener(&self, id: &str) -> bool {
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
                policy: entry.own.as_ref().map(|(policy, _)| policy.clone()),
            })
            .collect()
    }

    /// The current plugin chain.
    pub fn chain(&self) -> PluginChain {
        self.chain.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts a new plugin chain in place for every command decided from now on.
    fn replace_chain(&self, chain: PluginChain) {
        *self.chain.write().unwrap_or_else(|e| e.into_inner()) = chain;
    }

    /// The policies of the listeners that have their own, with their chain slots.
    fn own_listener_chains(&self) -> Vec<(String, Policy, Arc<RwLock<PluginChain>>)> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(id, entry)| {
                let (policy, chain) = entry.own.as_ref()?;
                Some((id.clone(), policy.clone(), chain.clone()))
            })
            .collect()
    }
}

/// The plugin chains policies select, built on demand and shared: upstreams with the
/// same policy use one chain (one thread, one set of instances), and all chains use
/// the runtime's compiled components.
pub struct Chains {
    wasm: Arc<Runtime>,
    plugins: Vec<PluginSpec>,
    built: HashMap<Policy, PluginChain>,
}

impl Chains {
    /// Chains over `plugins`, the configured plugins (see [`crate::config::select`]).
    pub fn new(wasm: Arc<Runtime>, plugins: Vec<PluginSpec>) -> Self {
        Chains {
            wasm,
            plugins,
            built: HashMap::new(),
        }
    }

    /// The chain for `policy`, started on first use. Blocks while plugins load.
    pub fn get(&mut self, policy: &Policy) -> Result<PluginChain, String> {
        if let Some(chain) = self.built.get(policy) {
            return Ok(chain.clone());
        }
        let specs = crate::config::select(&self.plugins, policy).map_err(|e| e.to_string())?;
        let chain = load_chain(&self.wasm, &specs).map_err(|e| format!("{e:#}"))?;
        self.built.insert(policy.clone(), chain.clone());
        Ok(chain)
    }
}

/// Loads `specs` and starts them as one chain.
pub fn load_chain(wasm: &Runtime, specs: &[PluginSpec]) -> anyhow::Result<PluginChain> {
    let mut plugins = Vec::new();
    for spec in specs {
        plugins.push(match &spec.source {
            PluginSource::File(path) => wasm.load(&spec.name, path, &spec.config, spec.limits)?,
            PluginSource::Builtin(bytes) => {
                wasm.load_bytes(&spec.name, bytes, &spec.config, spec.limits)?
            }
        });
    }
    Ok(PluginChain::start(plugins)?)
}

/// Every upstream, and what they share: services, reloading, chains, shutdown.
pub struct Hub {
    upstreams: Mutex<BTreeMap<String, Arc<Shared>>>,
    chains: Mutex<Chains>,
    limits: Arc<SessionLimits>,
    /// The status endpoint's and control monitor's chardevs: (id, role, address).
    services: Mutex<Vec<(String, &'static str, String)>>,
    /// Where reload requests go (SIGHUP and the control monitor's `x-qmpgate-reload`).
    reload: Mutex<Option<tokio::sync::mpsc::Sender<ReloadRequest>>>,
    /// Upstreams whose QEMU went away stay listed (`qmpgate run`, which reports the
    /// exit to their clients before it stops).
    keep_ended: bool,
    /// How each upstream that went away ended, for [`Gateway::run`].
    ended: tokio::sync::mpsc::UnboundedSender<Outcome>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    next_client: Arc<AtomicU64>,
    started: Instant,
}

/// Why an upstream could not be added.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum AddError {
    /// The id is taken, or the spec cannot be an upstream.
    #[error("{0}")]
    Invalid(String),
    /// Its policy's plugins did not load.
    #[error("upstream '{id}': {reason}")]
    Plugins { id: String, reason: String },
    /// QEMU could not be reached or negotiated.
    #[error("upstream '{id}'")]
    Upstream {
        id: String,
        #[source]
        source: UpstreamError,
    },
}

impl Hub {
    /// Connects to QEMU once on `spec` and serves it as upstream `spec.id`.
    pub async fn add_upstream(
        self: &Arc<Self>,
        spec: ChardevSpec,
        inherited: &mut Inherited,
    ) -> Result<Arc<Shared>, AddError> {
        check_upstream(&spec).map_err(AddError::Invalid)?;
        if self.id_in_use(&spec.id) {
            return Err(AddError::Invalid(format!(
                "Chardev '{}' already exists",
                spec.id
            )));
        }
        let hub = self.clone();
        let policy = spec.policy.clone();
        // Loading plugins compiles on a cache miss: keep it off the async workers.
        let chain = tokio::task::spawn_blocking(move || hub.chain_for(&policy))
            .await
            .unwrap_or_else(|e| Err(format!("plugin loader failed: {e}")))
            .map_err(|reason| AddError::Plugins {
                id: spec.id.clone(),
                reason,
            })?;

        let shutdown = self.shutdown.child_token();
        let (handle, task) = upstream::connect(
            spec.clone(),
            inherited,
            self.limits.event_history,
            self.limits.liveness,
            shutdown.clone(),
        )
        .await
        .map_err(|source| AddError::Upstream {
            id: spec.id.clone(),
            source,
        })?;
        let chain = chain.for_upstream(&spec.id);
        let shared = Arc::new(Shared {
            upstream: handle,
            upstream_spec: spec,
            chain: RwLock::new(chain),
            limits: self.limits.clone(),
            metrics: Arc::new(Metrics::default()),
            registry: Arc::new(Registry::default()),
            tracker: self.tracker.clone(),
            shutdown,
            next_client: self.next_client.clone(),
            listeners: Mutex::new(BTreeMap::new()),
        });
        let id = shared.upstream_spec.id.clone();
        {
            let mut upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
            // Another add of the same id may have finished while this one connected.
            if self.id_in_use_locked(&upstreams, &id) {
                shared.shutdown.cancel();
                return Err(AddError::Invalid(format!("Chardev '{id}' already exists")));
            }
            upstreams.insert(id.clone(), shared.clone());
        }
        tracing::info!(
            upstream = %id,
            policy = %shared.upstream_spec.policy,
            chain = %shared.chain().describe().join(" -> "),
            "upstream added"
        );
        let hub = self.clone();
        let watched = shared.clone();
        self.tracker.spawn(async move {
            let outcome = task
                .await
                .unwrap_or_else(|e| Outcome::Lost(format!("upstream task failed: {e}")));
            hub.upstream_ended(&watched, outcome);
        });
        Ok(shared)
    }

    fn upstream_ended(&self, shared: &Arc<Shared>, outcome: Outcome) {
        if self.keep_ended || self.shutdown.is_cancelled() {
            return;
        }
        let id = &shared.upstream_spec.id;
        tracing::info!(upstream = %id, ?outcome, "upstream ended; removing it and its listeners");
        {
            let mut upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
            // Only this instance: the id may have been removed and added again.
            if upstreams.get(id).is_some_and(|u| Arc::ptr_eq(u, shared)) {
                upstreams.remove(id);
            }
        }
        shared.shutdown.cancel();
        let _ = self.ended.send(outcome);
    }

    /// Stops serving upstream `id`: its listeners close and its clients disconnect.
    /// False if there is no such upstream.
    pub fn remove_upstream(&self, id: &str) -> bool {
        let removed = self
            .upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        match removed {
            Some(shared) => {
                tracing::info!(upstream = id, "upstream removed");
                // Clients get the event as their sessions drain, then the link closes.
                shared.upstream.announce(
                    "QMPGATE_UPSTREAM_REMOVED",
                    serde_json::json!({ "upstream": id }),
                );
                shared.shutdown.cancel();
                true
            }
            None => false,
        }
    }

    /// The upstream named `id`.
    pub fn upstream(&self, id: &str) -> Option<Arc<Shared>> {
        self.upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every upstream, by id.
    pub fn upstreams(&self) -> Vec<Arc<Shared>> {
        self.upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The upstream a request names, or the only one when it names none.
    pub fn pick(&self, id: Option<&str>) -> Result<Arc<Shared>, String> {
        let upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        match id {
            Some(id) => upstreams
                .get(id)
                .cloned()
                .ok_or_else(|| format!("no upstream '{id}'")),
            None => {
                let mut all = upstreams.values();
                match (all.next(), all.next()) {
                    (Some(only), None) => Ok(only.clone()),
                    (None, _) => Err("there is no upstream".into()),
                    _ => Err(format!(
                        "name an upstream; there are {}: {}",
                        upstreams.len(),
                        upstreams.keys().cloned().collect::<Vec<_>>().join(", ")
                    )),
                }
            }
        }
    }

    fn id_in_use(&self, id: &str) -> bool {
        let upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        self.id_in_use_locked(&upstreams, id)
    }

    /// Whether `id` names an upstream, a listener or a service; callers hold the
    /// upstreams lock, so that the check and the insertion that follows are one step.
    fn id_in_use_locked(&self, upstreams: &BTreeMap<String, Arc<Shared>>, id: &str) -> bool {
        upstreams.contains_key(id)
            || upstreams.values().any(|u| {
                u.listeners
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(id)
            })
            || self
                .services
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|(s, _, _)| s == id)
    }

    /// Whether `spec` could be added as a listener now (its id is free, it names
    /// an upstream there is): checked before its socket is bound, so that a
    /// refused `chardev-add` touches nothing.
    pub fn check_new_listener(&self, spec: &ChardevSpec) -> Result<(), String> {
        check_listener(spec).map_err(|e| format!("chardev '{}': {e}", spec.id))?;
        let upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        if self.id_in_use_locked(&upstreams, &spec.id) {
            return Err(format!("Chardev '{}' already exists", spec.id));
        }
        crate::config::bound_upstream(spec, upstreams.keys().map(String::as_str))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Starts accepting on `listener` as chardev `spec.id`, for the upstream its
    /// `upstream=` names (or the only upstream).
    /// A listener with its own `profile=`/`plugins=` gets that chain (blocks while
    /// its plugins load, before any lock is taken).
    pub fn add_listener(&self, spec: &ChardevSpec, listener: Listener) -> Result<(), String> {
        check_listener(spec).map_err(|e| format!("chardev '{}': {e}", spec.id))?;
        let own_chain = match &spec.policy {
            Policy::Default => None,
            policy => Some(
                self.chain_for(policy)
                    .map_err(|e| format!("listener '{}': {e}", spec.id))?,
            ),
        };
        let upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        if self.id_in_use_locked(&upstreams, &spec.id) {
            return Err(format!("Chardev '{}' already exists", spec.id));
        }
        let id = crate::config::bound_upstream(spec, upstreams.keys().map(String::as_str))
            .map_err(|e| e.to_string())?;
        let own_chain = own_chain.map(|chain| chain.for_upstream(&id));
        if let Some(chain) = &own_chain {
            tracing::info!(
                listener = %spec.id,
                policy = %spec.policy,
                chain = %chain.describe().join(" -> "),
                "listener has its own policy"
            );
        }
        upstreams[&id].add_listener(spec, listener, own_chain)
    }

    /// Stops accepting on listener `id` (its clients stay connected); false if
    /// there is no such listener.
    pub fn remove_listener(&self, id: &str) -> bool {
        self.upstreams().iter().any(|u| u.remove_listener(id))
    }

    /// The chain for `policy` (built once, then shared). Blocks while plugins load.
    fn chain_for(&self, policy: &Policy) -> Result<PluginChain, String> {
        self.chains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(policy)
    }

    /// Replaces every upstream's chain with one built from `chains` (a reloaded
    /// configuration); if any upstream's policy fails to load, nothing changes.
    /// Blocks while plugins load.
    pub fn replace_chains(&self, mut chains: Chains) -> Result<(), String> {
        let upstreams = self.upstreams();
        let mut next = Vec::new();
        let mut next_listeners = Vec::new();
        for shared in &upstreams {
            let id = &shared.upstream_spec.id;
            let chain = chains
                .get(&shared.upstream_spec.policy)
                .map_err(|e| format!("upstream '{id}': {e}"))?;
            next.push(chain);
            for (listener, policy, slot) in shared.own_listener_chains() {
                let chain = chains
                    .get(&policy)
                    .map_err(|e| format!("listener '{listener}': {e}"))?;
                next_listeners.push((slot, chain.for_upstream(id)));
            }
        }
        let mut current = self.chains.lock().unwrap_or_else(|e| e.into_inner());
        for (shared, chain) in upstreams.iter().zip(next) {
            shared.replace_chain(chain.for_upstream(&shared.upstream_spec.id));
        }
        for (slot, chain) in next_listeners {
            *slot.write().unwrap_or_else(|e| e.into_inner()) = chain;
        }
        *current = chains;
        Ok(())
    }

    /// The distinct chains in use, each with the policy that selected it and the
    /// upstreams that use it.
    /// Listeners with a policy of their own count as users of their chain by
    /// their own id.
    pub fn chains_in_use(&self) -> Vec<(PluginChain, Policy, Vec<String>)> {
        let mut out: Vec<(PluginChain, Policy, Vec<String>)> = Vec::new();
        let mut add = |chain: PluginChain, policy: &Policy, id: String| match out
            .iter_mut()
            .find(|(c, _, _)| c.same_as(&chain))
        {
            Some((_, _, ids)) => ids.push(id),
            None => out.push((chain, policy.clone(), vec![id])),
        };
        for shared in self.upstreams() {
            add(
                shared.chain(),
                &shared.upstream_spec.policy,
                shared.upstream_spec.id.clone(),
            );
            for (listener, policy, slot) in shared.own_listener_chains() {
                let chain = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
                add(chain, &policy, listener);
            }
        }
        out
    }

    /// When the gateway started.
    pub fn started(&self) -> Instant {
        self.started
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

    /// The limits every session and connection works under.
    pub fn limits(&self) -> &SessionLimits {
        &self.limits
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
    /// QEMU monitors.
    pub upstreams: Vec<ChardevSpec>,
    /// Where clients connect, each already listening ([`Gateway::open_listeners`]);
    /// each spec names its upstream in `upstream`.
    pub listeners: Vec<(ChardevSpec, Listener)>,
    /// Plugin chains for the upstreams' policies.
    pub chains: Chains,
    /// Limits for every session.
    pub limits: SessionLimits,
    /// Keep running with no upstream (a control monitor can add them).
    pub persistent: bool,
    /// Keep upstreams whose QEMU went away (`qmpgate run`).
    pub keep_ended: bool,
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

/// Runs `command` in QEMU and waits for the answer, all within `limit` (counted
/// from now): a full queue and a QEMU that does not answer both end in a QMP
/// error once the deadline passes. A command still queued then is never sent.
pub async fn run_command(
    upstream: &crate::upstream::UpstreamHandle,
    command: crate::plugin::Command,
    limit: Option<Duration>,
) -> crate::upstream::Reply {
    let deadline = limit.map(|limit| tokio::time::Instant::now() + limit);
    let name = command.name.clone();
    let Some(pending) = within(deadline, upstream.submit(command)).await else {
        return deadline_passed(&name, limit, false);
    };
    match within(deadline, pending.reply()).await {
        Some(reply) => reply,
        None => deadline_passed(&name, limit, true),
    }
}

/// `future`'s output, or `None` if `deadline` passes first; no deadline waits.
pub async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    future: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future).await.ok(),
        None => Some(future.await),
    }
}

/// The reply to a command whose deadline passed: `sent` says whether QEMU got it
/// (then its late reply is discarded and counted) or not (then it never will).
pub fn deadline_passed(
    command: &str,
    limit: Option<Duration>,
    sent: bool,
) -> crate::upstream::Reply {
    let ms = limit.unwrap_or_default().as_millis();
    let desc = if sent {
        format!(
            "QEMU did not answer '{command}' within {ms} ms; qmpgate stopped waiting (a late reply will be discarded)"
        )
    } else {
        format!(
            "'{command}' did not reach QEMU within {ms} ms (QEMU is still busy with earlier commands); it was not run"
        )
    };
    let serde_json::Value::Object(body) =
        crate::qmp::error_response(&crate::qmp::QmpError::generic(desc), None)
    else {
        unreachable!("error responses are objects")
    };
    crate::upstream::Reply {
        seq: 0,
        body: body.into(),
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum StartError {
    /// An upstream could not be added.
    #[error(transparent)]
    Upstream(#[from] AddError),
    /// A listener could not be opened.
    #[error(transparent)]
    Listener(#[from] crate::chardev::ChardevError),
    /// A listener spec is not usable as a listener.
    #[error("listener '{0}': {1}")]
    Invalid(String, String),
}

/// Checks that a spec can be an upstream (a link to QEMU's monitor).
pub fn check_upstream(spec: &ChardevSpec) -> Result<(), String> {
    if spec.server {
        return Err(format!(
            "upstream '{}' must be a client chardev (server=off): qmpgate connects to QEMU's monitor",
            spec.id
        ));
    }
    if spec.access != crate::chardev::Access::default() {
        return Err(format!(
            "upstream '{}': 'perm', 'owner', 'group', 'uids' and 'gids' are for listeners",
            spec.id
        ));
    }
    Ok(())
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
    hub: Arc<Hub>,
    ended: tokio::sync::mpsc::UnboundedReceiver<Outcome>,
    persistent: bool,
}

impl Gateway {
    /// Opens listeners first (so fd and path errors show before touching QEMU), then
    /// connects to each QEMU once, then starts accepting. `inherited` keeps the fds
    /// no chardev claimed.
    /// Opens the listeners' sockets (before anything else starts, so that a listener
    /// that cannot bind fails start-up before QEMU is started).
    pub fn open_listeners(
        specs: Vec<ChardevSpec>,
        inherited: &mut Inherited,
    ) -> Result<Vec<(ChardevSpec, Listener)>, StartError> {
        let mut listeners = Vec::new();
        for spec in specs {
            check_listener(&spec).map_err(|e| StartError::Invalid(spec.id.clone(), e))?;
            let listener = spec.listen(inherited)?;
            listeners.push((spec, listener));
        }
        Ok(listeners)
    }

    /// Connects every upstream once and starts accepting on `settings.listeners`.
    pub async fn start(
        settings: Settings,
        inherited: &mut Inherited,
    ) -> Result<Gateway, StartError> {
        let listeners = settings.listeners;
        let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
        let hub = Arc::new(Hub {
            upstreams: Mutex::new(BTreeMap::new()),
            chains: Mutex::new(settings.chains),
            limits: Arc::new(settings.limits),
            services: Mutex::new(Vec::new()),
            reload: Mutex::new(None),
            keep_ended: settings.keep_ended,
            ended: ended_tx,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            next_client: Arc::new(AtomicU64::new(1)),
            started: Instant::now(),
        });
        // One after another: each connects once, and a failure stops start-up.
        for spec in settings.upstreams {
            if let Err(e) = hub.add_upstream(spec, inherited).await {
                hub.shutdown.cancel();
                return Err(e.into());
            }
        }
        for (spec, listener) in listeners {
            if let Err(e) = hub.add_listener(&spec, listener) {
                hub.shutdown.cancel();
                return Err(StartError::Invalid(spec.id.clone(), e));
            }
        }
        Ok(Gateway {
            hub,
            ended,
            persistent: settings.persistent,
        })
    }

    /// The upstreams and what they share.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Runs until `stop` is cancelled or, unless the gateway is persistent, the last
    /// upstream has gone; then drains. Returns how the last upstream ended.
    pub async fn run(mut self, stop: CancellationToken) -> Outcome {
        let outcome = loop {
            tokio::select! {
                _ = stop.cancelled() => break Outcome::Shutdown,
                Some(outcome) = self.ended.recv() => {
                    if !self.persistent && self.hub.upstreams().is_empty() {
                        break outcome;
                    }
                }
            }
        };
        self.hub.shutdown.cancel();
        self.hub.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.hub.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions did not finish within {SHUTDOWN_GRACE:?}; dropping them");
        }
        outcome
    }
}

/// A client's places: in the process's connection budget, in its listener's
/// clients and, during a TLS handshake, in its listener's handshakes.
struct Admitted {
    _connection: tokio::sync::OwnedSemaphorePermit,
    _client: tokio::sync::OwnedSemaphorePermit,
    handshake: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Takes a new client's places, or says why there are none (logged, counted).
fn admit(ctx: &ListenerContext, peer: &crate::chardev::Peer) -> Option<Admitted> {
    let refused = |why: &str| {
        ctx.metrics.refused_clients.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(listener = %ctx.id, ?peer, "client refused: {why}");
        None
    };
    let Ok(client) = ctx.clients.clone().try_acquire_owned() else {
        return refused(&format!(
            "the listener serves {} clients already",
            ctx.limits.admission.max_clients
        ));
    };
    let handshake = match &ctx.tls {
        None => None,
        Some(_) => match ctx.handshakes.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                return refused(&format!(
                    "{} TLS handshakes are in progress on the listener already",
                    ctx.limits.admission.max_handshakes
                ));
            }
        },
    };
    let Ok(connection) = ctx.limits.connections.clone().try_acquire_owned() else {
        return refused("qmpgate holds as many connections as its fd limit allows");
    };
    Some(Admitted {
        _connection: connection,
        _client: client,
        handshake,
    })
}

/// Closes a refused client's connection; a plaintext one is told why first, as
/// QEMU tells a client it cannot serve (best effort: the socket is not waited on).
fn refuse(ctx: &ListenerContext, stream: crate::chardev::Stream) {
    if ctx.tls.is_some() {
        return;
    }
    let message = format!(
        "qmpgate cannot take more clients on listener '{}' now; try again later",
        ctx.id
    );
    let bytes = match ctx.mode {
        MonitorMode::Control => crate::qmp::encode(&crate::qmp::error_response(
            &crate::qmp::QmpError::generic(message),
            None,
        )),
        MonitorMode::Readline => format!("Error: {message}\r\n").into_bytes(),
    };
    stream.try_write_once(&bytes);
}

async fn accept_loop(listener: Listener, ctx: Arc<ListenerContext>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) if ctx.access.restricts_peers() && !ctx.access.lists(&peer) => {
                // Not one of the listed uids/gids: no greeting, no session.
                tracing::warn!(listener = %ctx.id, ?peer, "client refused: not in the listener's uids=/gids=");
                drop(stream);
            }
            Ok((stream, peer)) => {
                let Some(admitted) = admit(&ctx, &peer) else {
                    refuse(&ctx, stream);
                    continue;
                };
                let id = ctx.next_client.fetch_add(1, Ordering::Relaxed);
                ctx.metrics.clients_total.fetch_add(1, Ordering::Relaxed);
                let shutdown = ctx.shutdown.clone();
                let ctx = ctx.clone();
                // The handshake runs in the client's own task: a slow one holds nobody up.
                ctx.tracker.clone().spawn(async move {
                    let mut admitted = admitted;
                    let (stream, identity) = match &ctx.tls {
                        None => (stream, None),
                        Some(acceptor) => {
                            let timeout = ctx.limits.admission.handshake_timeout;
                            match crate::tls::accept(acceptor, stream, timeout).await {
                                Ok(accepted) => accepted,
                                Err(e) => {
                                    tracing::warn!(listener = %ctx.id, ?peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                            }
                        }
                    };
                    // Handshake done: the place in the handshakes goes back.
                    admitted.handshake = None;
                    crate::session::serve(stream, peer, identity, id, ctx, shutdown).await;
                    drop(admitted);
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
