//! The hub: every VM's entry, and what they share: ids, chains, services,
//! reloading, task supervision and shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use qmpgate_plugin_host::PluginChain;
use qmpgate_protocol::chardev::{ChainSelector, ChardevSpec, RoleError};
use qmpgate_protocol::lock;

use super::HubError;
use super::chains::Chains;
use super::vm::{Vm, chain_for};
use crate::io::{FdTable, Listener, tls};
use crate::session::{ClientRegistry, Metrics, SessionLimits};
use crate::upstream::{self, Outcome};

/// A chardev qmpgate serves for itself (the status endpoint, the control
/// monitor), as status reports it.
#[derive(Debug, Clone)]
pub struct Service {
    /// The chardev id.
    pub id: String,
    /// `status` or `control`.
    pub role: &'static str,
    /// The spec's address (`path=...`, `port=0`, `fd=3`).
    pub address: String,
    /// What it is bound to (`port=0` with the real port).
    pub bound: String,
}

/// Every upstream, and what they share: services, reloading, chains, shutdown.
pub struct Hub {
    upstreams: Mutex<BTreeMap<String, Arc<Vm>>>,
    chains: Mutex<Chains>,
    limits: Arc<SessionLimits>,
    /// The status endpoint's and control monitor's chardevs: (id, role, address).
    services: Mutex<Vec<Service>>,
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

impl Hub {
    /// An empty hub: upstreams and listeners are added next. `ended` hears how each
    /// upstream that went away ended.
    pub(super) fn new(
        chains: Chains,
        limits: SessionLimits,
        keep_ended: bool,
        ended: tokio::sync::mpsc::UnboundedSender<Outcome>,
    ) -> Self {
        Hub {
            upstreams: Mutex::new(BTreeMap::new()),
            chains: Mutex::new(chains),
            limits: Arc::new(limits),
            services: Mutex::new(Vec::new()),
            keep_ended,
            ended,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            next_client: Arc::new(AtomicU64::new(1)),
            started: Instant::now(),
        }
    }

    /// Connects to QEMU once on `spec` and serves it as upstream `spec.id`.
    pub async fn add_upstream(
        self: &Arc<Self>,
        spec: ChardevSpec,
        fds: &mut FdTable,
    ) -> Result<Arc<Vm>, HubError> {
        spec.check_upstream()?;
        if self.id_in_use(&spec.id) {
            return Err(HubError::IdInUse(spec.id));
        }
        let chain = self
            .chain_off_workers(&spec.policy, format!("upstream '{}'", spec.id))
            .await?;

        let shutdown = self.shutdown.child_token();
        let (handle, task) = upstream::connect(
            spec.clone(),
            fds,
            self.limits.event_history,
            self.limits.liveness,
            shutdown.clone(),
        )
        .await
        .map_err(|source| HubError::Upstream {
            id: spec.id.clone(),
            source,
        })?;
        let chain = chain_for(&chain, &spec.id, &handle);
        let shared = Arc::new(Vm {
            upstream: handle,
            upstream_spec: spec,
            chain: Arc::new(RwLock::new(chain)),
            limits: self.limits.clone(),
            metrics: Arc::new(Metrics::default()),
            registry: Arc::new(ClientRegistry::default()),
            tracker: self.tracker.clone(),
            shutdown,
            next_client: self.next_client.clone(),
            listeners: Mutex::new(BTreeMap::new()),
        });
        let id = shared.upstream_spec.id.clone();
        {
            let mut upstreams = lock::mutex(&self.upstreams);
            // Another add of the same id may have finished while this one connected.
            if self.id_in_use_locked(&upstreams, &id) {
                shared.shutdown.cancel();
                return Err(HubError::IdInUse(id));
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

    fn upstream_ended(&self, shared: &Arc<Vm>, outcome: Outcome) {
        if self.keep_ended || self.shutdown.is_cancelled() {
            return;
        }
        let id = &shared.upstream_spec.id;
        tracing::info!(upstream = %id, ?outcome, "upstream ended; removing it and its listeners");
        {
            let mut upstreams = lock::mutex(&self.upstreams);
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
        let removed = lock::mutex(&self.upstreams).remove(id);
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
    pub fn upstream(&self, id: &str) -> Option<Arc<Vm>> {
        lock::mutex(&self.upstreams).get(id).cloned()
    }

    /// Every upstream, by id.
    pub fn upstreams(&self) -> Vec<Arc<Vm>> {
        lock::mutex(&self.upstreams).values().cloned().collect()
    }

    /// The upstream a request names, or the only one when it names none.
    pub fn pick(&self, id: Option<&str>) -> Result<Arc<Vm>, HubError> {
        let upstreams = lock::mutex(&self.upstreams);
        match id {
            Some(id) => upstreams
                .get(id)
                .cloned()
                .ok_or_else(|| HubError::NoUpstream(format!("no upstream '{id}'"))),
            None => {
                let mut all = upstreams.values();
                match (all.next(), all.next()) {
                    (Some(only), None) => Ok(only.clone()),
                    (None, _) => Err(HubError::NoUpstream("there is no upstream".into())),
                    _ => Err(HubError::NoUpstream(format!(
                        "name an upstream; there are {}: {}",
                        upstreams.len(),
                        upstreams.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))),
                }
            }
        }
    }

    fn id_in_use(&self, id: &str) -> bool {
        let upstreams = lock::mutex(&self.upstreams);
        self.id_in_use_locked(&upstreams, id)
    }

    /// Whether `id` names an upstream, a listener or a service; callers hold the
    /// upstreams lock, so that the check and the insertion that follows are one step.
    fn id_in_use_locked(&self, upstreams: &BTreeMap<String, Arc<Vm>>, id: &str) -> bool {
        upstreams.contains_key(id)
            || upstreams
                .values()
                .any(|u| lock::mutex(&u.listeners).contains_key(id))
            || lock::mutex(&self.services).iter().any(|s| s.id == id)
    }

    /// Whether `spec` could be added as a listener now (its id is free, it names
    /// an upstream there is): checked before its socket is bound, so that a
    /// refused `chardev-add` touches nothing.
    pub fn check_new_listener(&self, spec: &ChardevSpec) -> Result<(), HubError> {
        spec.check_listener()?;
        let upstreams = lock::mutex(&self.upstreams);
        if self.id_in_use_locked(&upstreams, &spec.id) {
            return Err(HubError::IdInUse(spec.id.clone()));
        }
        spec.bound_upstream(upstreams.keys().map(String::as_str))?;
        Ok(())
    }

    /// Starts accepting on `listener` as chardev `spec.id`, for the upstream its
    /// `upstream=` names (or the only upstream). A listener with its own
    /// `profile=`/`plugins=` gets that chain. Plugins load and TLS credentials are
    /// read on a blocking thread, before any lock is taken.
    pub async fn add_listener(
        self: &Arc<Self>,
        spec: &ChardevSpec,
        listener: Listener,
    ) -> Result<(), HubError> {
        spec.check_listener()?;
        let own_chain = match &spec.policy {
            ChainSelector::Default => None,
            policy => Some(
                self.chain_off_workers(policy, format!("listener '{}'", spec.id))
                    .await?,
            ),
        };
        let tls = match spec.tls_creds.clone() {
            Some(dir) => Some(
                tokio::task::spawn_blocking(move || tls::acceptor(&dir))
                    .await
                    .expect("reading TLS credentials does not panic")?,
            ),
            None => None,
        };
        let upstreams = lock::mutex(&self.upstreams);
        if self.id_in_use_locked(&upstreams, &spec.id) {
            return Err(HubError::IdInUse(spec.id.clone()));
        }
        let id = spec.bound_upstream(upstreams.keys().map(String::as_str))?;
        if spec.passes_fds() {
            self.check_fd_listener(spec, &listener, &upstreams[&id].upstream_spec.policy)?;
        }
        let own_chain = own_chain.map(|chain| chain_for(&chain, &id, &upstreams[&id].upstream));
        if let Some(chain) = &own_chain {
            tracing::info!(
                listener = %spec.id,
                policy = %spec.policy,
                chain = %chain.describe().join(" -> "),
                "listener has its own policy"
            );
        }
        upstreams[&id].add_listener(spec, listener, tls, own_chain);
        Ok(())
    }

    /// A listener that passes fds to QEMU must be a unix socket, and its clients'
    /// policy (its own, else its upstream's) must not be an allowlist profile,
    /// which refuses every command that takes an fd: such a listener is for the
    /// VM's manager.
    fn check_fd_listener(
        &self,
        spec: &ChardevSpec,
        listener: &Listener,
        upstream_policy: &ChainSelector,
    ) -> Result<(), RoleError> {
        if matches!(listener, Listener::Tcp(_)) {
            return Err(RoleError(format!(
                "listener '{}': fds=pass needs a unix socket; {} is TCP",
                spec.id, spec.address
            )));
        }
        let policy = match &spec.policy {
            ChainSelector::Default => upstream_policy,
            own => own,
        };
        match lock::mutex(&self.chains).allowlist_profile(policy) {
            Some(profile) => Err(RoleError(format!(
                "listener '{}': fds=pass, but its clients' policy is profile '{profile}', which \
                 refuses every command that takes an fd; fds are for the VM's manager \
                 (profile={} or permissive)",
                spec.id,
                qmpgate_protocol::chardev::MANAGER_PROFILE
            ))),
            None => Ok(()),
        }
    }

    /// Stops accepting on listener `id` (its clients stay connected); false if
    /// there is no such listener.
    pub fn remove_listener(&self, id: &str) -> bool {
        self.upstreams().iter().any(|u| u.remove_listener(id))
    }

    /// The chain for `policy` (built once, then shared), loaded on a blocking
    /// thread: compiling a plugin on a cache miss takes a quarter of a second.
    async fn chain_off_workers(
        self: &Arc<Self>,
        policy: &ChainSelector,
        owner: String,
    ) -> Result<PluginChain, HubError> {
        let (hub, policy) = (self.clone(), policy.clone());
        tokio::task::spawn_blocking(move || lock::mutex(&hub.chains).get(&policy))
            .await
            .expect("loading plugins does not panic")
            .map_err(|source| HubError::Chain { owner, source })
    }

    /// Replaces every upstream's chain with one built from `chains` (a reloaded
    /// configuration); if any upstream's policy fails to load, nothing changes.
    /// Blocks while plugins load.
    pub fn replace_chains(&self, mut chains: Chains) -> Result<(), HubError> {
        let upstreams = self.upstreams();
        let mut next = Vec::new();
        let mut next_listeners = Vec::new();
        for shared in &upstreams {
            let id = &shared.upstream_spec.id;
            let chain =
                chains
                    .get(&shared.upstream_spec.policy)
                    .map_err(|source| HubError::Chain {
                        owner: format!("upstream '{id}'"),
                        source,
                    })?;
            next.push(chain);
            for (listener, policy, slot) in shared.own_listener_chains() {
                let chain = chains.get(&policy).map_err(|source| HubError::Chain {
                    owner: format!("listener '{listener}'"),
                    source,
                })?;
                next_listeners.push((slot, chain_for(&chain, id, &shared.upstream)));
            }
        }
        let mut current = lock::mutex(&self.chains);
        for (shared, chain) in upstreams.iter().zip(next) {
            shared.replace_chain(chain_for(
                &chain,
                &shared.upstream_spec.id,
                &shared.upstream,
            ));
        }
        for (slot, chain) in next_listeners {
            *lock::write(&slot) = chain;
        }
        *current = chains;
        Ok(())
    }

    /// The distinct chains in use, each with the policy that selected it and the
    /// upstreams that use it.
    /// Listeners with a policy of their own count as users of their chain by
    /// their own id.
    pub fn chains_in_use(&self) -> Vec<(PluginChain, ChainSelector, Vec<String>)> {
        let mut out: Vec<(PluginChain, ChainSelector, Vec<String>)> = Vec::new();
        let mut add = |chain: PluginChain, policy: &ChainSelector, id: String| match out
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
                let chain = lock::read(&slot).clone();
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
    pub fn register_service(&self, service: Service) {
        lock::mutex(&self.services).push(service);
    }

    /// The service chardevs.
    pub fn services(&self) -> Vec<Service> {
        lock::mutex(&self.services).clone()
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

    /// Waits for every task the hub tracks (sessions, accept loops, upstream
    /// watchers) to end; no new task is tracked after this is called.
    pub(super) async fn drain(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// A token cancelled when the gateway shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
