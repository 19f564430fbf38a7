//! The gateway: the registries of VMs (upstreams), their listeners and chains;
//! the accept loops; supervision and shutdown.
//!
//! One process serves any number of upstreams (QEMU monitors), each named by its
//! chardev id. A [`Hub`] holds them; each is a [`Vm`] entry with its own link to
//! QEMU, listeners, counters and event history, and the plugin chain its policy
//! selects. Upstreams that select the same policy share one chain, and every chain
//! shares the process's compiled plugins ([`Chains`]).
//!
//! [`Gateway::open_listeners`] opens every listener; [`Gateway::start`] connects to
//! each QEMU once and spawns one accept loop per listener; upstreams and listeners
//! can be added and removed later (the control monitor does). An upstream whose
//! QEMU goes away is removed with its listeners and clients. [`Gateway::run`] waits
//! for a stop request, or for the last upstream to go (unless a control monitor can
//! add more), then drains sessions under a grace deadline (one cancellation token,
//! a task tracker, then force).
//!
//! Layout: [`Hub`] (`hub`), [`Vm`] (`vm`), [`Chains`] (`chains`), the accept loop
//! and admission (`accept`), [`Gateway`] (here).

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

use qmpgate_protocol::chardev::{ChardevSpec, RoleError};

use crate::io::{self, FdTable, Listener, SocketError, tls::TlsError};
use crate::session::SessionLimits;
use crate::upstream::{Outcome, UpstreamError};

mod accept;
mod chains;
mod hub;
mod vm;

pub use chains::{BuildError, Chains, load_chain};
pub use hub::{Hub, Service};
pub use vm::{ListenerInfo, Vm};

/// How long sessions get to finish at shutdown before they are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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

/// Why an upstream or a listener could not be added, or a chain built.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum HubError {
    /// The id names an upstream, a listener or a service already (QEMU's text).
    #[error("Chardev '{0}' already exists")]
    IdInUse(String),
    /// The spec cannot have the role it was given.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// A policy's chain could not be built (its plugins are not configured, or
    /// did not load).
    #[error("{owner}")]
    Chain {
        owner: String,
        #[source]
        source: BuildError,
    },
    /// A listener's TLS credentials did not load.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// QEMU could not be reached or negotiated.
    #[error("upstream '{id}'")]
    Upstream {
        id: String,
        #[source]
        source: UpstreamError,
    },
    /// A request names no upstream there is (status, control monitor).
    #[error("{0}")]
    NoUpstream(String),
}

/// Why the gateway could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// An upstream or a listener could not be added.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// A listener could not be opened.
    #[error(transparent)]
    Listener(#[from] SocketError),
    /// A listener spec is not usable as a listener.
    #[error(transparent)]
    Role(#[from] RoleError),
}

/// A running gateway.
pub struct Gateway {
    hub: Arc<Hub>,
    ended: tokio::sync::mpsc::UnboundedReceiver<Outcome>,
    persistent: bool,
}

impl Gateway {
    /// Opens the listeners' sockets (before anything else starts, so that a listener
    /// that cannot bind fails start-up before QEMU is started). `fds` keeps the fds
    /// no chardev claimed.
    pub fn open_listeners(
        specs: Vec<ChardevSpec>,
        fds: &mut FdTable,
    ) -> Result<Vec<(ChardevSpec, Listener)>, StartError> {
        let mut listeners = Vec::new();
        for spec in specs {
            spec.check_listener()?;
            let listener = io::listen(&spec, fds)?;
            listeners.push((spec, listener));
        }
        Ok(listeners)
    }

    /// Connects every upstream once and starts accepting on `settings.listeners`.
    pub async fn start(settings: Settings, fds: &mut FdTable) -> Result<Gateway, StartError> {
        let listeners = settings.listeners;
        let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(
            settings.chains,
            settings.limits,
            settings.keep_ended,
            ended_tx,
        ));
        // One after another: each connects once, and a failure stops start-up.
        for spec in settings.upstreams {
            if let Err(e) = hub.add_upstream(spec, fds).await {
                hub.shutdown_token().cancel();
                return Err(e.into());
            }
        }
        for (spec, listener) in listeners {
            if let Err(e) = hub.add_listener(&spec, listener).await {
                hub.shutdown_token().cancel();
                return Err(e.into());
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
        self.hub.shutdown_token().cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.hub.drain())
            .await
            .is_err()
        {
            tracing::warn!("sessions did not finish within {SHUTDOWN_GRACE:?}; dropping them");
        }
        outcome
    }
}
