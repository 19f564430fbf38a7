//! The chains in use: one per chain selector (policy), built on first use and
//! shared, over the process's compiled plugins.

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;

use qmpgate_plugin_host::spec::{
    ChainError, Mode, PluginSource, PluginSpec, allowlist_profile, select,
};
use qmpgate_plugin_host::{PluginChain, PluginError, Runtime};
use qmpgate_protocol::chardev::ChainSelector;

/// Why a policy's chain could not be built.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The policy selects plugins that are not configured.
    #[error(transparent)]
    Select(#[from] ChainError),
    /// A plugin did not load or start.
    #[error(transparent)]
    Load(#[from] PluginError),
}

/// The plugin chains policies select, built on demand and shared: upstreams with the
/// same policy use one chain (one thread, one set of instances), and all chains use
/// the runtime's compiled components.
pub struct Chains {
    wasm: Arc<Runtime>,
    plugins: Vec<PluginSpec>,
    built: HashMap<ChainSelector, PluginChain>,
}

impl Chains {
    /// Chains over `plugins`, the configured plugins (see [`select`]).
    pub fn new(wasm: Arc<Runtime>, plugins: Vec<PluginSpec>) -> Self {
        Chains {
            wasm,
            plugins,
            built: HashMap::new(),
        }
    }

    /// The chain for `policy`, started on first use. Blocks while plugins load.
    pub fn get(&mut self, policy: &ChainSelector) -> Result<PluginChain, BuildError> {
        if let Some(chain) = self.built.get(policy) {
            return Ok(chain.clone());
        }
        let specs = select(&self.plugins, policy)?;
        let chain = load_chain(&self.wasm, &specs)?;
        self.built.insert(policy.clone(), chain.clone());
        Ok(chain)
    }

    /// The allowlist profile (`safe`, `readonly`) `policy`'s chain enforces, if any.
    pub fn allowlist_profile(&self, policy: &ChainSelector) -> Option<String> {
        select(&self.plugins, policy)
            .ok()
            .and_then(|specs| allowlist_profile(&specs))
    }
}

/// Loads `specs` and starts them as one chain.
pub fn load_chain(wasm: &Runtime, specs: &[PluginSpec]) -> Result<PluginChain, PluginError> {
    let mut plugins = Vec::new();
    for spec in specs {
        let loaded = match &spec.source {
            PluginSource::File(path) => wasm.load(&spec.name, path, &spec.config, spec.limits)?,
            PluginSource::Builtin(bytes) => {
                wasm.load_bytes(&spec.name, bytes, &spec.config, spec.limits)?
            }
        };
        plugins.push(match spec.mode {
            Mode::Enforce => loaded,
            Mode::Audit => {
                tracing::warn!(
                    plugin = %spec.name,
                    "audit mode: its refusals are logged, audited and counted, not enforced"
                );
                loaded.audit_only()
            }
        });
    }
    PluginChain::start(plugins)
}
