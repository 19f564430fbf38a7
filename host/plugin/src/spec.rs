//! Configured plugins, and how a policy (a listener's or an upstream's chain
//! selector) picks and orders them into a chain.

use std::path::PathBuf;

use serde_json::Value;
use thiserror::Error;

use qmpgate_protocol::chardev::ChainSelector;

use crate::{Limits, builtin};

/// A chain that cannot be built as configured.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct ChainError(pub String);

/// Where a plugin's bytes come from.
#[derive(Debug, Clone)]
pub enum PluginSource {
    /// A file.
    File(PathBuf),
    /// Embedded in the binary.
    Builtin(&'static [u8]),
}

/// Whether a plugin's refusals are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Its refusals refuse.
    #[default]
    Enforce,
    /// Its refusals (of a command or a connection) are logged, audited and
    /// counted, and the command goes on through the chain: to try a policy on
    /// live traffic before it refuses anything.
    Audit,
}

/// A plugin ready to load.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// Its name.
    pub name: String,
    /// Its bytes.
    pub source: PluginSource,
    /// Its configuration, as JSON.
    pub config: Value,
    /// Its limits.
    pub limits: Limits,
    /// Whether its refusals are enforced.
    pub mode: Mode,
}

/// The built-in policy's profiles (`libvirt` is the VM manager's: `permissive`'s
/// decisions, and a listener that passes fds and sets no deadline).
pub const PROFILES: [&str; 4] = ["safe", "readonly", "permissive", "libvirt"];

/// The allowlist profile (`safe` or `readonly`) an enforced built-in policy of
/// `chain` runs, if it runs one: such a chain refuses every command that takes an
/// fd, so a listener that passes fds cannot use it.
pub fn allowlist_profile(chain: &[PluginSpec]) -> Option<String> {
    chain
        .iter()
        .filter(|p| is_builtin(p, builtin::POLICY) && p.mode == Mode::Enforce)
        .map(|p| {
            p.config
                .get("profile")
                .and_then(Value::as_str)
                .unwrap_or("safe")
                .to_string()
        })
        .find(|profile| matches!(profile.as_str(), "safe" | "readonly"))
}

/// `profile` if it is one of [`PROFILES`]; otherwise an error that lists them
/// (before the policy plugin would report it in terms of its JSON).
pub fn check_profile(profile: &str) -> Result<&str, ChainError> {
    if PROFILES.contains(&profile) {
        Ok(profile)
    } else {
        Err(ChainError(format!(
            "no profile '{profile}' (profiles: {})",
            PROFILES.join(", ")
        )))
    }
}

/// The plugins `policy` selects from the configured ones, in chain order.
pub fn select(
    plugins: &[PluginSpec],
    policy: &ChainSelector,
) -> Result<Vec<PluginSpec>, ChainError> {
    match policy {
        ChainSelector::Default => Ok(plugins.to_vec()),
        // The profile replaces the built-in policy's; the operator's other plugins
        // (audit, say) stay in the chain.
        ChainSelector::Profile(profile) => {
            check_profile(profile)?;
            let mut chain = plugins.to_vec();
            let mut found = false;
            for p in chain.iter_mut().filter(|p| is_builtin(p, builtin::POLICY)) {
                if let Value::Object(config) = &mut p.config {
                    config.insert("profile".into(), Value::from(profile.as_str()));
                } else {
                    p.config = serde_json::json!({ "profile": profile });
                }
                found = true;
            }
            if found {
                Ok(chain)
            } else {
                let without_builtins = chain
                    .into_iter()
                    .filter(|p| !is_builtin(p, builtin::HMP))
                    .collect();
                compose(without_builtins, Some(profile), false)
            }
        }
        ChainSelector::Plugins(names) => names
            .iter()
            .map(|name| {
                plugins
                    .iter()
                    .find(|p| &p.name == name)
                    .cloned()
                    .ok_or_else(|| {
                        let known: Vec<&str> = plugins.iter().map(|p| p.name.as_str()).collect();
                        ChainError(format!(
                            "no plugin named '{name}' is configured (configured: {})",
                            known.join(", ")
                        ))
                    })
            })
            .collect(),
    }
}

/// Whether `spec` is the embedded plugin `bytes` (configured as `builtin = ...`).
fn is_builtin(spec: &PluginSpec, bytes: &'static [u8]) -> bool {
    matches!(spec.source, PluginSource::Builtin(b) if std::ptr::eq(b, bytes))
}

/// The default chain around the operator's plugins: the built-in HMP interpreter
/// first (so that every plugin sees inside HMP lines), the operator's plugins, then
/// the built-in policy with `profile` last, so that it judges the command as the
/// other plugins left it. Configuring a plugin never drops the policy silently:
/// only `--no-default-policy` does (and an operator who configures the built-in
/// `qmp-policy` or `hmp` themselves places it where they want).
pub fn compose(
    configured: Vec<PluginSpec>,
    profile: Option<&str>,
    no_default_policy: bool,
) -> Result<Vec<PluginSpec>, ChainError> {
    if no_default_policy {
        if profile.is_some() {
            return Err(ChainError(
                "--profile applies to the built-in policy, which --no-default-policy leaves out"
                    .into(),
            ));
        }
        return Ok(configured);
    }
    if let Some(profile) = profile {
        check_profile(profile)?;
    }
    // A policy tried in audit mode refuses nothing: the built-in one stays.
    let own_policy = configured
        .iter()
        .any(|p| is_builtin(p, builtin::POLICY) && p.mode == Mode::Enforce);
    if own_policy && profile.is_some() {
        return Err(ChainError(
            "--profile applies to the built-in policy; the configuration places its own 'qmp-policy' plugin (set its config's profile there)".into(),
        ));
    }
    let [hmp, policy] = <[PluginSpec; 2]>::try_from(builtin_policy(profile.unwrap_or("safe")))
        .expect("the built-in chain has two plugins");
    let mut chain = Vec::new();
    if !configured.iter().any(|p| is_builtin(p, builtin::HMP)) {
        chain.push(hmp);
    }
    chain.extend(configured);
    if !own_policy {
        chain.push(policy);
    }
    if let Some(p) = chain
        .iter()
        .enumerate()
        .find_map(|(i, p)| chain[..i].iter().find(|q| q.name == p.name))
    {
        return Err(ChainError(format!(
            "two plugins are named '{}' (the built-in chain uses 'hmp' and 'policy'; name yours otherwise, or give --no-default-policy)",
            p.name
        )));
    }
    Ok(chain)
}

/// The built-in chain: the HMP interpreter first, so that the policy sees inside HMP
/// lines, then the policy with `profile`.
fn builtin_policy(profile: &str) -> Vec<PluginSpec> {
    vec![
        PluginSpec {
            name: "hmp".into(),
            source: PluginSource::Builtin(builtin::HMP),
            config: serde_json::json!({}),
            limits: Limits::default(),
            mode: Mode::Enforce,
        },
        PluginSpec {
            name: "policy".into(),
            source: PluginSource::Builtin(builtin::POLICY),
            config: serde_json::json!({ "profile": profile }),
            limits: Limits::default(),
            mode: Mode::Enforce,
        },
    ]
}
