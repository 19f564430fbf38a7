//! Reloading: the configuration file and the plugins again, on SIGHUP and on the
//! control monitor's `x-qmpgate-reload`. New chains replace the old ones only once
//! every upstream's and listener's policy loaded; otherwise the old chains stay
//! and the reason is reported. Upstreams and listeners are not reloaded; the
//! audit log is reopened (for logrotate).

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use qmpgate_plugin_host::Runtime;

use super::config::{self, ConfigError, FileConfig, Overrides};
use crate::gateway::{Chains, Hub, HubError};

/// Why a reload changed nothing.
#[derive(Debug, Error)]
pub enum ReloadError {
    /// The configuration file does not load or resolve.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A policy's chain did not load.
    #[error(transparent)]
    Chains(#[from] HubError),
    /// The reloader is gone (the gateway is stopping).
    #[error("the reloader has stopped")]
    Stopped,
    /// What the reloader task reported: the error and its causes, as one line.
    #[error("{0}")]
    Failed(String),
}

type Request = oneshot::Sender<Result<String, String>>;

/// Asks the reloader task for a reload; cheap to clone.
#[derive(Clone)]
pub struct Reloader(mpsc::Sender<Request>);

impl Reloader {
    /// Starts the reloader task: it reloads one request at a time, reading
    /// `config_path` (if any) with `overrides` as at start-up.
    pub fn spawn(
        hub: Arc<Hub>,
        wasm: Arc<Runtime>,
        config_path: Option<PathBuf>,
        overrides: Overrides,
    ) -> Reloader {
        let (requests, mut queue) = mpsc::channel::<Request>(4);
        tokio::spawn(async move {
            while let Some(reply) = queue.recv().await {
                let (hub, wasm, path, overrides) = (
                    hub.clone(),
                    wasm.clone(),
                    config_path.clone(),
                    overrides.clone(),
                );
                super::systemd::reloading();
                // Plugins compile on a cache miss: on a blocking thread.
                let status_hub = hub.clone();
                let reloaded = tokio::task::spawn_blocking(move || {
                    // The audit log first: logrotate's postrotate sends SIGHUP, and
                    // records must not keep going to the rotated file whatever
                    // becomes of the plugins.
                    if let Err(e) = wasm.reopen_audit() {
                        tracing::error!(error = %e, "cannot reopen the audit log; writing to the old file");
                    }
                    reload(&hub, wasm, path.as_deref(), overrides)
                })
                .await
                .expect("reloading does not panic");
                let result = match reloaded {
                    Ok(names) => {
                        tracing::info!(plugins = ?names, "reloaded");
                        Ok(format!("reloaded plugins: {}", names.join(", ")))
                    }
                    Err(e) => Err(super::one_line(&e)),
                };
                let status = match &result {
                    Ok(_) => super::systemd::status_line(&status_hub),
                    Err(reason) => {
                        tracing::error!(%reason, "reload failed; keeping the running plugins");
                        format!("reload failed, running the old plugins: {reason}")
                    }
                };
                super::systemd::notify(&format!("READY=1\nSTATUS={status}"));
                let _ = reply.send(result);
            }
        });
        Reloader(requests)
    }

    /// Reloads now; says what was loaded, or why nothing changed.
    pub async fn reload(&self) -> Result<String, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).await.map_err(|_| ReloadError::Stopped)?;
        rx.await
            .map_err(|_| ReloadError::Stopped)?
            .map_err(ReloadError::Failed)
    }

    /// Reloads on every SIGHUP, one after another, for the life of the process.
    pub fn on_sighup(&self) {
        let reloader = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hangup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                // The reloader logs what happened.
                let _ = reloader.reload().await;
            }
        });
    }
}

/// One reload; the names of the plugins now configured.
fn reload(
    hub: &Hub,
    wasm: Arc<Runtime>,
    path: Option<&std::path::Path>,
    overrides: Overrides,
) -> Result<Vec<String>, ReloadError> {
    let file = match path {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let resolved = config::resolve(file, overrides)?;
    // Otherwise every changed plugin file would stay compiled in memory for the
    // life of the process.
    wasm.forget_compiled();
    let names = resolved.plugins.iter().map(|p| p.name.clone()).collect();
    hub.replace_chains(Chains::new(wasm, resolved.plugins))?;
    Ok(names)
}
