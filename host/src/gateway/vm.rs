//! A VM's entry: the QEMU link of one upstream, its listeners (each with its own
//! chain slot when it has its own policy), its chain, counters and client registry.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use qmpgate_plugin_host::PluginChain;
use qmpgate_protocol::chardev::{ChainSelector, ChardevSpec, ListenerTimeout};
use qmpgate_protocol::lock;

use super::accept::{Listening, accept_loop};
use crate::io::Listener;
use crate::session::{self, ClientRegistry, Metrics, SessionLimits};
use crate::upstream::UpstreamHandle;

/// One listener's entry in [`Vm::listeners`].
pub(super) struct ListenerEntry {
    /// Stops this listener's accept loop (sessions already accepted go on).
    stop: CancellationToken,
    /// The spec's address, e.g. `path=/run/vm1.sock` or `fd=3`.
    address: String,
    /// What it is bound to, e.g. `unix:/run/vm1.sock`.
    bound: String,
    /// The listener's own policy (`profile=`/`plugins=` on it), with the chain it
    /// selects; `None`: its clients pass the upstream's chain.
    own: Option<(ChainSelector, Arc<RwLock<PluginChain>>)>,
}

/// One upstream and what its listeners and sessions share.
pub struct Vm {
    /// The QEMU behind this upstream.
    pub upstream: UpstreamHandle,
    /// The upstream chardev's id and address, for status.
    pub upstream_spec: ChardevSpec,
    /// Plugins run on every listener's traffic; replaced whole on reload, while
    /// commands already deciding finish on the chain they started with.
    pub(super) chain: Arc<RwLock<PluginChain>>,
    /// Limits for its sessions: the gateway's, shared by every upstream.
    pub limits: Arc<SessionLimits>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Connected clients, QEMU's exit, for status.
    pub registry: Arc<ClientRegistry>,
    pub(super) tracker: TaskTracker,
    /// Cancelled when this upstream is removed or the gateway shuts down.
    pub(super) shutdown: CancellationToken,
    /// Client ids are unique in the process, across upstreams.
    pub(super) next_client: Arc<AtomicU64>,
    pub(super) listeners: Mutex<BTreeMap<String, ListenerEntry>>,
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
    pub policy: Option<ChainSelector>,
}

/// `chain`'s handle for the traffic of upstream `id`: its audit records name the
/// upstream, and its plugins read that QEMU's schema (as of each call: QEMU may
/// have reconnected with another version).
pub(super) fn chain_for(chain: &PluginChain, id: &str, upstream: &UpstreamHandle) -> PluginChain {
    let upstream = upstream.clone();
    chain.for_upstream(id, Arc::new(move || upstream.schema()))
}

impl Vm {
    /// Starts accepting on `listener` as chardev `spec.id`, with `tls` when the
    /// spec has `tls-creds=`. Callers check that the id is free
    /// ([`super::Hub::add_listener`] does, across upstreams).
    pub(super) fn add_listener(
        self: &Arc<Self>,
        spec: &ChardevSpec,
        listener: Listener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        own_chain: Option<PluginChain>,
    ) {
        let mut listeners = lock::mutex(&self.listeners);
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
        let session = Arc::new(session::Context {
            id: spec.id.clone(),
            mode: spec.mode,
            upstream_id: self.upstream_spec.id.clone(),
            upstream: self.upstream.clone(),
            chain: own_chain.unwrap_or_else(|| self.chain.clone()),
            limits: self.limits.clone(),
            metrics: self.metrics.clone(),
            registry: self.registry.clone(),
            timeouts: match spec.timeout() {
                ListenerTimeout::Gateway => self.limits.timeouts.clone(),
                ListenerTimeout::Every(limit) => session::Timeouts::every(limit),
            },
            pass_fds: spec.passes_fds(),
        });
        let listening = Arc::new(Listening {
            session,
            tls,
            access: spec.access.clone(),
            clients: Arc::new(tokio::sync::Semaphore::new(
                self.limits.admission.max_clients,
            )),
            handshakes: Arc::new(tokio::sync::Semaphore::new(
                self.limits.admission.max_handshakes,
            )),
            tracker: self.tracker.clone(),
            shutdown: self.shutdown.clone(),
            next_client: self.next_client.clone(),
        });
        self.tracker.spawn(accept_loop(listener, listening, stop));
    }

    /// Stops accepting on listener `id` (its clients stay connected); false if
    /// there is no such listener.
    pub(super) fn remove_listener(&self, id: &str) -> bool {
        let removed = lock::mutex(&self.listeners).remove(id);
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
        lock::mutex(&self.listeners)
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
        lock::read(&self.chain).clone()
    }

    /// Puts a new plugin chain in place for every command decided from now on.
    pub(super) fn replace_chain(&self, chain: PluginChain) {
        *lock::write(&self.chain) = chain;
    }

    /// The policies of the listeners that have their own, with their chain slots.
    pub(super) fn own_listener_chains(
        &self,
    ) -> Vec<(String, ChainSelector, Arc<RwLock<PluginChain>>)> {
        lock::mutex(&self.listeners)
            .iter()
            .filter_map(|(id, entry)| {
                let (policy, chain) = entry.own.as_ref()?;
                Some((id.clone(), policy.clone(), chain.clone()))
            })
            .collect()
    }
}
