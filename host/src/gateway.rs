//! The gateway: listeners bound to one upstream, their plugin chain, and shutdown.
//!
//! [`Gateway::start`] connects to QEMU once, opens every listener and spawns one
//! accept loop per listener; [`Gateway::run`] waits for a signal or for the upstream
//! to end, then drains sessions under a grace deadline (one cancellation token, a
//! task tracker, then force).
//!
//! Layout: [`Metrics`] (counters shown by status and metrics), [`ListenerContext`]
//! (what a session needs), [`Gateway`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chardev::{ChardevSpec, Inherited, Listener, MonitorMode};
use crate::plugin::PluginChain;
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

/// What every session on one listener shares.
pub struct ListenerContext {
    /// The listener chardev's id (shown to plugins as the client's `listener`).
    pub id: String,
    /// Plugins run on this listener's traffic.
    pub chain: PluginChain,
    /// The QEMU this listener leads to.
    pub upstream: UpstreamHandle,
    /// Framing limit on one client message, in bytes.
    pub max_message: usize,
    /// Framing limit on nesting depth.
    pub max_depth: usize,
    /// Gateway-wide counters.
    pub metrics: Arc<Metrics>,
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

/// A running gateway.
pub struct Gateway {
    shutdown: CancellationToken,
    tracker: TaskTracker,
    upstream_task: tokio::task::JoinHandle<Outcome>,
    /// Counters, for status.
    pub metrics: Arc<Metrics>,
    /// The bound listeners, as (`id`, address) for logs and tests.
    pub bound: Vec<(String, String)>,
}

impl Gateway {
    /// Opens listeners first (so fd and path errors show before touching QEMU), then
    /// connects to QEMU once, then starts accepting.
    pub async fn start(
        settings: Settings,
        mut inherited: Inherited,
    ) -> Result<Gateway, StartError> {
        let mut listeners = Vec::new();
        for spec in &settings.listeners {
            if !spec.server {
                return Err(StartError::Invalid(
                    spec.id.clone(),
                    "a listener needs server=on".into(),
                ));
            }
            if spec.mode == MonitorMode::Readline {
                return Err(StartError::Invalid(
                    spec.id.clone(),
                    "mode=readline (HMP) listeners are not supported yet; use mode=control".into(),
                ));
            }
            listeners.push((spec.id.clone(), spec.listen(&mut inherited)?));
        }
        if settings.upstream.server {
            return Err(StartError::Invalid(
                settings.upstream.id.clone(),
                "the upstream must be a client chardev (server=off): qmpgate connects to QEMU's monitor".into(),
            ));
        }

        let shutdown = CancellationToken::new();
        let upstream_id = settings.upstream.id.clone();
        let (upstream, upstream_task) =
            upstream::connect(settings.upstream, inherited, shutdown.clone())
                .await
                .map_err(|source| StartError::Upstream {
                    id: upstream_id,
                    source,
                })?;

        let metrics = Arc::new(Metrics::default());
        let tracker = TaskTracker::new();
        let next_client = Arc::new(AtomicU64::new(1));
        let mut bound = Vec::new();
        for (id, listener) in listeners {
            let address = listener.local_description();
            tracing::info!(listener = %id, %address, "listening");
            bound.push((id.clone(), address));
            let ctx = Arc::new(ListenerContext {
                id,
                chain: settings.chain.clone(),
                upstream: upstream.clone(),
                max_message: settings.max_message,
                max_depth: settings.max_depth,
                metrics: metrics.clone(),
            });
            tracker.spawn(accept_loop(
                listener,
                ctx,
                next_client.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        Ok(Gateway {
            shutdown,
            tracker,
            upstream_task,
            metrics,
            bound,
        })
    }

    /// A token that stops the gateway when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until `stop` is cancelled or the upstream ends; then drains.
    pub async fn run(mut self, stop: CancellationToken) -> Outcome {
        let outcome = tokio::select! {
            _ = stop.cancelled() => Outcome::Shutdown,
            outcome = &mut self.upstream_task => outcome.unwrap_or_else(|e| Outcome::Lost(format!("upstream task failed: {e}"))),
        };
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions did not finish within {SHUTDOWN_GRACE:?}; dropping them");
        }
        outcome
    }
}

async fn accept_loop(
    listener: Listener,
    ctx: Arc<ListenerContext>,
    next_client: Arc<AtomicU64>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let id = next_client.fetch_add(1, Ordering::Relaxed);
                ctx.metrics.clients_total.fetch_add(1, Ordering::Relaxed);
                tracker.spawn(crate::session::serve(
                    stream,
                    peer,
                    id,
                    ctx.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                tracing::error!(listener = %ctx.id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
