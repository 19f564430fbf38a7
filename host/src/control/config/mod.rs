//! Configuration: the TOML file, merged with command-line options.
//!
//! ```toml
//! upstream = "socket,id=qemu,path=/run/vm1/qmp.sock"
//! listen = ["socket,id=qmp,path=/run/vm1/gate.sock,server=on,wait=off"]
//! max-message = 1048576
//! max-depth = 64
//! audit-log = "/var/log/qmpgate/vm1.jsonl"
//!
//! [[plugin]]
//! name = "policy"
//! builtin = "qmp-policy"          # or: path = "/usr/lib/qmpgate/my-plugin.wasm"
//! memory-mib = 32
//! cpu-ms = 50
//! config = { profile = "safe", rules = [{ action = "deny", commands = ["quit"] }] }
//! ```
//!
//! `upstream` may also be a list, one QEMU per entry; then each listener names its
//! upstream (`upstream=ID` in its spec), and an upstream may select its own policy
//! (`profile=NAME` or `plugins=A:B` in its spec, see [`select`]).
//!
//! Command-line options add to the file (`--listen`, `--chardev`, `--plugin`) or
//! override it (`--upstream`, limits). With no plugin configured anywhere, the
//! built-in `hmp` and `qmp-policy` plugins run, the policy with `--profile` (default
//! `safe`): the gateway never runs without a policy unless told to
//! (`--no-default-policy`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use qmpgate_plugin_host::Limits;
use qmpgate_plugin_host::builtin;
use qmpgate_plugin_host::spec::{ChainError, Mode, PluginSource, PluginSpec, compose, select};
use qmpgate_protocol::chardev::{ChardevSpec, RoleError, SpecError};
use qmpgate_protocol::framing::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_MESSAGE};

use crate::session::Timeouts;

#[cfg(test)]
mod tests;

/// Configuration errors.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for qmpgate.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A chardev spec is wrong.
    #[error(transparent)]
    Chardev(#[from] SpecError),
    /// A chardev cannot have the role it was given.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// The plugins do not make a chain.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Anything else, described.
    #[error("{0}")]
    Invalid(String),
}

/// The TOML file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// QEMU monitors' chardevs (specs or ids of `chardev` entries): one, or a list.
    #[serde(default)]
    pub upstream: OneOrMany,
    /// Listener chardevs (specs or ids).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Chardevs defined once and referred to by id.
    #[serde(default)]
    pub chardev: Vec<String>,
    /// Limit on one client message, in bytes.
    pub max_message: Option<usize>,
    /// Limit on nesting depth of one client message.
    pub max_depth: Option<usize>,
    /// Where compiled plugins are cached.
    pub cache_dir: Option<PathBuf>,
    /// JSON-lines file for audit records.
    pub audit_log: Option<PathBuf>,
    /// The HTTP status endpoint's chardev (spec or id).
    pub status: Option<String>,
    /// The control monitor's chardev (spec or id; a unix socket).
    pub control: Option<String>,
    /// How long clients wait for QEMU's answer, in ms (0: forever).
    pub command_timeout_ms: Option<u64>,
    /// Events kept for clients that reconnect.
    pub event_history: Option<usize>,
    /// Per-command timeouts in ms (0: forever), e.g. `{ migrate = 600000 }`.
    #[serde(default)]
    pub command_timeouts: HashMap<String, u64>,
    /// Plugins, run in this order.
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// Not given.
    #[default]
    None,
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// One `[[plugin]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginConfig {
    /// Name in logs, status and errors.
    pub name: String,
    /// A `.wasm` component file.
    pub path: Option<PathBuf>,
    /// A plugin embedded in qmpgate (`qmp-policy`).
    pub builtin: Option<String>,
    /// Memory cap per instance, MiB.
    pub memory_mib: Option<usize>,
    /// CPU time per hook call, milliseconds.
    pub cpu_ms: Option<u64>,
    /// `enforce` (the default) or `audit`: refusals logged, audited and counted,
    /// not enforced.
    pub mode: Option<String>,
    /// Handed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
}

impl FileConfig {
    /// Reads and parses a TOML file. Relative paths in it (plugins, the audit log,
    /// the cache directory) are taken from the file's folder, as a configuration
    /// file installed in /etc would expect, not from wherever qmpgate was started.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = folder.join(&*p);
            }
        };
        config
            .plugins
            .iter_mut()
            .filter_map(|p| p.path.as_mut())
            .for_each(anchor);
        config.audit_log.as_mut().map(anchor);
        config.cache_dir.as_mut().map(anchor);
        Ok(config)
    }
}

/// A plugin's configuration from a file: TOML if its name ends in `.toml`,
/// otherwise JSON (`--plugin-config`, `qmpgate plugin test --config`).
pub fn read_plugin_config(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    if path.extension().is_some_and(|e| e == "toml") {
        let table = toml::from_str::<toml::Table>(&text).map_err(|e| parse(e.to_string()))?;
        serde_json::to_value(table).map_err(|e| parse(e.to_string()))
    } else {
        serde_json::from_str(&text).map_err(|e| parse(format!("not JSON: {e}")))
    }
}

/// Events kept per upstream by default: a few minutes of a busy VM's events.
pub const DEFAULT_EVENT_HISTORY: usize = 1000;

/// Everything the gateway needs, resolved.
#[derive(Debug)]
pub struct Resolved {
    /// QEMU monitors, each named by its id.
    pub upstreams: Vec<ChardevSpec>,
    /// Client listeners, each bound to an upstream (`upstream` is always set).
    pub listeners: Vec<ChardevSpec>,
    /// Plugins in order.
    pub plugins: Vec<PluginSpec>,
    /// Framing limit.
    pub max_message: usize,
    /// Framing limit.
    pub max_depth: usize,
    /// Plugin cache directory (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Audit log file.
    pub audit_log: Option<PathBuf>,
    /// The status endpoint.
    pub status: Option<ChardevSpec>,
    /// The control monitor.
    pub control: Option<ChardevSpec>,
    /// Per-command timeouts.
    pub timeouts: Timeouts,
    /// Events kept for clients that reconnect.
    pub event_history: usize,
}

/// Command-line additions and overrides, already parsed by the CLI.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--chardev`.
    pub chardevs: Vec<String>,
    /// `--listen`.
    pub listen: Vec<String>,
    /// `--upstream` (repeatable; replaces the file's).
    pub upstreams: Vec<String>,
    /// `--plugin NAME=PATH`.
    pub plugins: Vec<String>,
    /// `--plugin-config NAME=FILE`.
    pub plugin_configs: Vec<String>,
    /// `--audit-only NAME`.
    pub audit_only: Vec<String>,
    /// `--profile`.
    pub profile: Option<String>,
    /// `--no-default-policy`.
    pub no_default_policy: bool,
    /// `--max-message`.
    pub max_message: Option<usize>,
    /// `--max-depth`.
    pub max_depth: Option<usize>,
    /// `--cache-dir`.
    pub cache_dir: Option<PathBuf>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--audit-log`.
    pub audit_log: Option<PathBuf>,
    /// `--status`.
    pub status: Option<String>,
    /// `--control`.
    pub control: Option<String>,
    /// `--command-timeout-ms`.
    pub command_timeout_ms: Option<u64>,
    /// `--event-history`.
    pub event_history: Option<usize>,
}

/// Merges the file (if any) and the command line.
pub fn resolve(file: FileConfig, cli: Overrides) -> Result<Resolved, ConfigError> {
    let chardevs = Chardevs::new(&file.chardev, &cli.chardevs)?;
    let mut ids = Ids::default();
    let control_given = cli.control.is_some() || file.control.is_some();

    let upstream_texts = if cli.upstreams.is_empty() {
        file.upstream.into_vec()
    } else {
        cli.upstreams.clone()
    };
    if upstream_texts.is_empty() && !control_given {
        return Err(ConfigError::Invalid(
            "no upstream: give --upstream (QEMU's QMP socket), use 'qmpgate run', or give --control to add upstreams at run time".into(),
        ));
    }
    let mut upstreams: Vec<ChardevSpec> = Vec::new();
    for text in &upstream_texts {
        let spec = chardevs.lookup(text)?;
        ids.claim(&spec.id)?;
        spec.check_upstream()?;
        upstreams.push(spec);
    }
    let mut listeners = Vec::new();
    for text in file.listen.iter().chain(&cli.listen) {
        let mut spec = chardevs.lookup(text)?;
        ids.claim(&spec.id)?;
        spec.upstream = Some(spec.bound_upstream(upstreams.iter().map(|u| u.id.as_str()))?);
        listeners.push(spec);
    }
    if listeners.is_empty() && !control_given {
        return Err(ConfigError::Invalid(
            "no listener: give at least one --listen".into(),
        ));
    }

    let plugins = plugin_chain(file.plugins, &cli)?;

    for upstream in &upstreams {
        select(&plugins, &upstream.policy)
            .map_err(|e| ConfigError::Invalid(format!("upstream '{}': {e}", upstream.id)))?;
    }

    let status = service(
        &chardevs,
        &mut ids,
        cli.status.or(file.status),
        "status endpoint",
    )?;
    let mut control = service(
        &chardevs,
        &mut ids,
        cli.control.or(file.control),
        "control monitor",
    )?;
    // The control monitor is root-equivalent: its socket is the owner's alone unless
    // the operator says otherwise (perm=, with uids=/gids= for the peers it serves).
    if let Some(spec) = &mut control
        && matches!(spec.address, qmpgate_protocol::chardev::Address::Path(_))
        && spec.access.perm.is_none()
    {
        spec.access.perm = Some(0o600);
    }

    let cache_dir = if cli.no_cache {
        None
    } else {
        cli.cache_dir.or(file.cache_dir).or_else(default_cache_dir)
    };
    Ok(Resolved {
        upstreams,
        listeners,
        plugins,
        max_message: cli
            .max_message
            .or(file.max_message)
            .unwrap_or(DEFAULT_MAX_MESSAGE),
        max_depth: cli
            .max_depth
            .or(file.max_depth)
            .unwrap_or(DEFAULT_MAX_DEPTH),
        cache_dir,
        audit_log: cli.audit_log.or(file.audit_log),
        status,
        control,
        timeouts: timeouts(
            cli.command_timeout_ms.or(file.command_timeout_ms),
            &file.command_timeouts,
        ),
        event_history: cli
            .event_history
            .or(file.event_history)
            .unwrap_or(DEFAULT_EVENT_HISTORY),
    })
}

/// The `chardev` entries, by id: upstreams, listeners and services may name one
/// instead of giving a spec.
struct Chardevs(HashMap<String, ChardevSpec>);

impl Chardevs {
    fn new(file: &[String], cli: &[String]) -> Result<Self, ConfigError> {
        let mut chardevs = HashMap::new();
        for text in file.iter().chain(cli) {
            let spec = ChardevSpec::parse(text)?;
            if chardevs.insert(spec.id.clone(), spec.clone()).is_some() {
                return Err(ConfigError::Invalid(format!(
                    "chardev id '{}' is defined twice",
                    spec.id
                )));
            }
        }
        Ok(Chardevs(chardevs))
    }

    /// A spec as given, or the `chardev` entry it names.
    fn lookup(&self, text: &str) -> Result<ChardevSpec, ConfigError> {
        if text.contains(',') || text.starts_with("socket") {
            Ok(ChardevSpec::parse(text)?)
        } else {
            self.0.get(text).cloned().ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "no chardev with id '{text}' (define it with --chardev)"
                ))
            })
        }
    }
}

/// The chardev ids in use: each names one upstream, listener or service.
#[derive(Default)]
struct Ids(std::collections::HashSet<String>);

impl Ids {
    fn claim(&mut self, id: &str) -> Result<(), ConfigError> {
        if self.0.insert(id.to_string()) {
            Ok(())
        } else {
            Err(ConfigError::Invalid(format!(
                "chardev id '{id}' is used twice"
            )))
        }
    }
}

/// The status endpoint's or the control monitor's chardev, which always listens.
fn service(
    chardevs: &Chardevs,
    ids: &mut Ids,
    text: Option<String>,
    what: &str,
) -> Result<Option<ChardevSpec>, ConfigError> {
    let Some(text) = text else { return Ok(None) };
    let mut spec = chardevs.lookup(&text)?;
    if !text.contains("server=") {
        spec.server = true;
    }
    if !spec.server {
        return Err(ConfigError::Invalid(format!(
            "{what} '{}' must listen (server=on)",
            spec.id
        )));
    }
    ids.claim(&spec.id)?;
    Ok(Some(spec))
}

/// The plugins a gateway runs, in chain order: the file's and `--plugin`'s, with
/// `--plugin-config` applied, composed with the built-in chain (`--profile`,
/// `--no-default-policy`). `qmpgate plugin test --chain` runs the same list.
pub fn plugin_chain(
    file_plugins: Vec<PluginConfig>,
    cli: &Overrides,
) -> Result<Vec<PluginSpec>, ConfigError> {
    let mut configured = configured_plugins(file_plugins, &cli.plugins)?;
    for text in &cli.plugin_configs {
        let (name, path) = text.split_once('=').ok_or_else(|| {
            ConfigError::Invalid(format!("--plugin-config expects NAME=FILE, got '{text}'"))
        })?;
        let known: Vec<&str> = configured.iter().map(|p| p.name.as_str()).collect();
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        let plugin = configured
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "--plugin-config: no plugin named '{name}' is configured (configured: {known}; \
                     the built-in policy takes --profile)"
                ))
            })?;
        plugin.config = read_plugin_config(Path::new(path))?;
    }
    let mut chain = compose(configured, cli.profile.as_deref(), cli.no_default_policy)?;
    for name in &cli.audit_only {
        let names: Vec<&str> = chain.iter().map(|p| p.name.as_str()).collect();
        let names = names.join(", ");
        let plugin = chain.iter_mut().find(|p| &p.name == name).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "--audit-only: no plugin named '{name}' in the chain (chain: {names})"
            ))
        })?;
        plugin.mode = Mode::Audit;
    }
    Ok(chain)
}

/// The file's `[[plugin]]` tables, then `--plugin NAME=PATH`s, in order.
fn configured_plugins(
    file: Vec<PluginConfig>,
    cli: &[String],
) -> Result<Vec<PluginSpec>, ConfigError> {
    let mut plugins = Vec::new();
    for p in file {
        let source = match (&p.path, &p.builtin) {
            (Some(path), None) => PluginSource::File(path.clone()),
            (None, Some(name)) => PluginSource::Builtin(builtin::by_name(name).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "plugin '{}': no built-in plugin '{name}' (built in: qmp-policy, hmp, audit)",
                    p.name
                ))
            })?),
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "plugin '{}': give exactly one of 'path' or 'builtin'",
                    p.name
                )));
            }
        };
        let mode = match p.mode.as_deref() {
            None | Some("enforce") => Mode::Enforce,
            Some("audit") => Mode::Audit,
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "plugin '{}': mode '{other}' (modes: enforce, audit)",
                    p.name
                )));
            }
        };
        let defaults = Limits::default();
        plugins.push(PluginSpec {
            name: p.name,
            source,
            config: serde_json::to_value(&p.config)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            limits: Limits {
                memory_bytes: p
                    .memory_mib
                    .map(|m| m << 20)
                    .unwrap_or(defaults.memory_bytes),
                cpu: p.cpu_ms.map(Duration::from_millis).unwrap_or(defaults.cpu),
            },
            mode,
        });
    }
    for text in cli {
        let (name, path) = text.split_once('=').ok_or_else(|| {
            ConfigError::Invalid(format!("--plugin expects NAME=PATH, got '{text}'"))
        })?;
        plugins.push(PluginSpec {
            name: name.into(),
            source: PluginSource::File(path.into()),
            config: Value::Object(Default::default()),
            limits: Limits::default(),
            mode: Mode::Enforce,
        });
    }
    if plugins
        .iter()
        .enumerate()
        .any(|(i, p)| plugins[..i].iter().any(|q| q.name == p.name))
    {
        return Err(ConfigError::Invalid(
            "two plugins have the same name".into(),
        ));
    }
    Ok(plugins)
}

/// Default: 5 s, and 5 min for the commands in `Timeouts::SLOW_COMMANDS`; 0 means
/// no limit; the file's per-command entries override both.
fn timeouts(default_ms: Option<u64>, per_command: &HashMap<String, u64>) -> Timeouts {
    let limit = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    let default = limit(default_ms.unwrap_or(5_000));
    let mut table: HashMap<String, Option<Duration>> = Timeouts::SLOW_COMMANDS
        .iter()
        .map(|c| {
            (
                c.to_string(),
                default.map(|d| d.max(Duration::from_secs(300))),
            )
        })
        .collect();
    for (command, ms) in per_command {
        table.insert(command.clone(), limit(*ms));
    }
    Timeouts {
        default,
        per_command: table,
    }
}

/// `$CACHE_DIRECTORY` (systemd's `CacheDirectory=`; the first if it lists
/// several), else `$XDG_CACHE_HOME/qmpgate`, else `$HOME/.cache/qmpgate`.
fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dirs) = std::env::var_os("CACHE_DIRECTORY") {
        let first = dirs.as_encoded_bytes().split(|&b| b == b':').next();
        if let Some(first) = first.filter(|d| !d.is_empty()) {
            use std::os::unix::ffi::OsStrExt;
            return Some(PathBuf::from(std::ffi::OsStr::from_bytes(first)));
        }
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("qmpgate"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/qmpgate"))
}
