//! The plugin runtime: WebAssembly components that decide about monitor traffic.
//!
//! Plugins are untrusted code. Each runs in wasmtime with:
//! - no ambient authority: an empty WASI context (no environment, no files, no
//!   sockets, no arguments); the only host functions are `log` and `audit`;
//! - a memory cap per instance, enforced by a [`ResourceLimiter`];
//! - a CPU deadline per hook call, enforced by epoch interruption from an OS thread
//!   (a tokio task would stop ticking exactly when a plugin hogs a worker).
//!
//! A trap (panic, deadline, memory cap, bad output) fails closed: the command is
//! refused with a QMP error, the fault is counted, and the instance is dropped and
//! recreated on the next call, because an instance that trapped may be in any state.
//!
//! Layout: [`Runtime`] owns the engine, the linker and the compile caches (in
//! memory, and on disk through [`crate::cache`]);
//! [`Loaded`] is one compiled and linked component, instantiated with its counters
//! on its chain's thread;
//! [`PluginChain`] runs hooks across the configured plugins in order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use thiserror::Error;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::cache::{CacheKey, CompileCache};
use crate::qmp::{Answer, QmpError};

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
    });
}

use bindings::exports::qmpgate::plugin::guest as wit;
use bindings::qmpgate::plugin::host::Level;
pub use bindings::qmpgate::plugin::types::{Client, Peer, Protocol, UnixPeer};
use bindings::qmpgate::plugin::types::{
    Command as WitCommand, Decision as WitDecision, Event as WitEvent, EventVerdict,
    HmpTranslation, QmpError as WitError, Response as WitResponse, ResponseVerdict, Verdict,
};

/// The WIT package version this host implements. A plugin built against another
/// version is refused at load time with a message naming both.
pub const WIT_VERSION: &str = "0.1.0";

/// Faults of a plugin's own (not caused by one client's input) allowed per
/// `RESTART_WINDOW` on one upstream before the plugin is taken down for that
/// upstream.
pub const RESTART_BUDGET: usize = 10;

/// The window of `RESTART_BUDGET`.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Faults one client's input may cause within `CLIENT_FAULT_WINDOW` before the
/// client is disconnected.
pub const CLIENT_FAULT_LIMIT: usize = 3;

/// The window of `CLIENT_FAULT_LIMIT`.
pub const CLIENT_FAULT_WINDOW: Duration = Duration::from_secs(60);

/// HMP lines longer than this are refused before any plugin reads them: QEMU's
/// readline keeps at most this many bytes of a typed line
/// (include/qemu/readline.h `READLINE_CMD_BUF_SIZE`), and a bound on the input
/// bounds the work a plugin does for one client.
pub const HMP_LINE_MAX: usize = 4095;

/// How often the epoch ticks. Deadlines are whole ticks, so this is their resolution.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The longest a caller waits for its chain's thread (queue and hooks together)
/// before the call fails closed, unless the chain's CPU limits need longer.
pub const CHAIN_WAIT: Duration = Duration::from_secs(5);

/// Calls queued for a chain's thread at most; more fail closed at once.
const MAX_QUEUED_JOBS: usize = 4096;

/// What a caller is told when the chain's thread did not answer.
const NO_ANSWER: &str =
    "qmpgate's plugins did not answer in time (their thread is stuck or stopped)";

/// A plugin's JSON texts (a reply, rewritten arguments or event data, a
/// replacement response) may be at most this long: as much as a client may send.
pub const OUTPUT_MAX: usize = crate::framing::DEFAULT_MAX_MESSAGE;

/// Error classes, descriptions, command names and HMP reasons from a plugin may
/// be at most this long (QEMU's own are one line).
pub const DESC_MAX: usize = 4096;

/// A plugin's log message is cut after this many bytes.
pub const LOG_MESSAGE_MAX: usize = 4096;

/// Log messages a plugin instance may write in a burst; the budget refills at
/// [`LOG_PER_SECOND`]. Messages over it are dropped and counted.
pub const LOG_BURST: u32 = 100;

/// How fast the log budget refills, in messages per second.
pub const LOG_PER_SECOND: u32 = 50;

/// Audit records one hook call may write; more are dropped, counted and logged.
pub const AUDIT_PER_CALL: u32 = 64;

/// An audit entry longer than this is recorded as its size and its first
/// [`DESC_MAX`] bytes.
pub const AUDIT_ENTRY_MAX: usize = 64 << 10;

/// WASI resources (pollables, streams, errors) one instance may hold at once. A
/// plugin has no files or sockets; a few stdio streams is all an honest one needs.
const MAX_RESOURCES: usize = 256;

/// How many hook deadlines instantiation and `init` may take together.
const INIT_DEADLINE_FACTOR: u64 = 20;

/// Errors loading a plugin.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum PluginError {
    /// The file could not be read.
    #[error("plugin '{name}': cannot read {path}")]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not a valid component, or one wasmtime cannot compile.
    #[error("plugin '{name}': not a loadable component: {reason}")]
    Compile { name: String, reason: String },
    /// Built against a WIT version this host does not implement.
    #[error(
        "plugin '{name}' was built for {found}; this qmpgate supports qmpgate:plugin@{WIT_VERSION}"
    )]
    Version { name: String, found: String },
    /// Imports something the host does not provide (e.g. sockets).
    #[error("plugin '{name}': cannot be linked: {reason}")]
    Link { name: String, reason: String },
    /// `init` refused the configuration, or trapped.
    #[error("plugin '{name}': init failed: {reason}")]
    Init { name: String, reason: String },
}

/// Limits applied to every instance of one plugin.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Linear memory cap per instance, in bytes.
    pub memory_bytes: usize,
    /// CPU time allowed per hook call.
    pub cpu: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // A Rust std guest needs ~1-2 MiB; policy state is small.
            memory_bytes: 32 << 20,
            // Hooks run in microseconds; 50 ms means a bug, not a workload.
            cpu: Duration::from_millis(50),
        }
    }
}

/// The shared wasmtime engine, linker and compile caches (in memory, and `.cwasm`
/// files on disk). One per process: a plugin is compiled (or loaded) once, and its
/// code is shared by every chain, upstream and listener.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    /// The checked `.cwasm` directory, held open (`None`: no cache, or it was refused).
    cache: Option<CompileCache>,
    audit: Option<Arc<crate::audit::AuditSink>>,
    /// Components compiled (or loaded) by this process, by cache key: a plugin that
    /// many upstreams' chains use is compiled, and its code mapped, once.
    compiled: Mutex<HashMap<CacheKey, Component>>,
}

impl Runtime {
    /// Creates the engine and starts the epoch ticker thread. `cache_dir` holds
    /// precompiled plugins (`None` disables the cache); it is checked and opened here,
    /// once (see [`crate::cache`]), and a directory that fails is not used.
    pub fn new(
        cache_dir: Option<PathBuf>,
        audit: Option<Arc<crate::audit::AuditSink>>,
    ) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Plugins recurse little; a small stack turns runaway recursion into a quick trap.
        config.max_wasm_stack(512 << 10);
        let engine = Engine::new(&config)?;

        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("qmpgate-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        forbid_waiting(&mut linker)?;
        bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;

        let cache = cache_dir.and_then(|dir| match CompileCache::open(&dir) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "plugin cache disabled: plugins are compiled instead"
                );
                None
            }
        });
        Ok(Runtime {
            engine,
            linker,
            cache,
            audit,
            compiled: Mutex::new(HashMap::new()),
        })
    }

    /// Drops the in-memory compile cache, so that it holds only what the current
    /// configuration uses: a reload calls this first (components in use live on in
    /// their instances; the `.cwasm` files make reloading them cheap).
    pub fn forget_compiled(&self) {
        self.compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Loads a plugin: compiles (or loads from cache), checks the WIT version and
    /// links it. [`PluginChain::start`] then instantiates it and calls `init`.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        config: &Value,
        limits: Limits,
    ) -> Result<Loaded, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            name: name.into(),
            path: path.to_path_buf(),
            source,
        })?;
        self.load_bytes(name, &bytes, config, limits)
    }

    /// As [`Runtime::load`], from bytes in memory.
    pub fn load_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        config: &Value,
        limits: Limits,
    ) -> Result<Loaded, PluginError> {
        let started = Instant::now();
        let component = self.compile(name, bytes)?;
        check_version(name, &component, &self.engine)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Link {
                name: name.into(),
                reason: format!("{e:#}"),
            })?;
        let pre = bindings::PluginPre::new(pre).map_err(|e| PluginError::Link {
            name: name.into(),
            reason: format!("{e:#}"),
        })?;
        tracing::debug!(
            plugin = name,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "plugin compiled"
        );
        Ok(Loaded(Worker {
            name: name.into(),
            engine: self.engine.clone(),
            pre,
            config: config.to_string(),
            limits,
            audit: self.audit.clone(),
            live: None,
            own_faults: HashMap::new(),
            client_faults: Arc::default(),
            stats: Arc::new(PluginStats::default()),
            upstream: None,
            client: None,
        }))
    }

    fn compile(&self, name: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        let key = CacheKey::new(&self.engine, bytes);
        let compiled = || self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(component) = compiled().get(&key) {
            return Ok(component.clone());
        }
        let component = self.compile_uncached(name, bytes, &key)?;
        compiled().insert(key, component.clone());
        Ok(component)
    }

    fn compile_uncached(
        &self,
        name: &str,
        bytes: &[u8],
        key: &CacheKey,
    ) -> Result<Component, PluginError> {
        if let Some(component) = self.cache.as_ref().and_then(|c| c.load(&self.engine, key)) {
            return Ok(component);
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
            name: name.into(),
            reason: format!("{e:#}"),
        })?;
        if let Some(cache) = &self.cache {
            cache.store(key, &component);
        }
        Ok(component)
    }
}

/// The `wasi:io/poll` wasmtime-wasi implements (guests importing any 0.2.x
/// version are linked to it).
const WASI_POLL: &str = "wasi:io/poll@0.2.12";

/// Replaces WASI's two waiting calls, `poll` and `pollable.block`, with ones that
/// never wait: what is ready is returned at once, and a call that would have to
/// wait traps. A hook cannot block the chain's thread (the epoch deadline only
/// interrupts wasm, not a host call), and a plugin has nothing to wait for: it
/// has no sockets, files or stdin, only clocks (`std::thread::sleep` traps).
fn forbid_waiting(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    use wasmtime::StoreContextMut;
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;
    use wasmtime_wasi::p2::bindings::sync::io::poll::HostPollable;

    const WAIT: &str = "plugins may not wait: a hook cannot block (wasi:io/poll)";
    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_POLL)?;
    poll.func_wrap(
        "poll",
        |mut store: StoreContextMut<'_, HostState>, (pollables,): (Vec<Resource<DynPollable>>,)| {
            let table = &mut store.data_mut().table;
            let mut ready = Vec::new();
            for (index, pollable) in pollables.into_iter().enumerate() {
                if table.ready(pollable)? {
                    ready.push(u32::try_from(index)?);
                }
            }
            if ready.is_empty() {
                return Err(wasmtime::Error::msg(WAIT));
            }
            Ok((ready,))
        },
    )?;
    poll.func_wrap(
        "[method]pollable.block",
        |mut store: StoreContextMut<'_, HostState>, (pollable,): (Resource<DynPollable>,)| {
            if !store.data_mut().table.ready(pollable)? {
                return Err(wasmtime::Error::msg(WAIT));
            }
            Ok(())
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn check_version(name: &str, component: &Component, engine: &Engine) -> Result<(), PluginError> {
    let ty = component.component_type();
    let wanted = format!("qmpgate:plugin/guest@{WIT_VERSION}");
    let mut found = None;
    for (export, _) in ty.exports(engine) {
        if export == wanted {
            return Ok(());
        }
        if let Some(version) = export.strip_prefix("qmpgate:plugin/guest") {
            found = Some(format!("qmpgate:plugin{}", version));
        }
    }
    Err(PluginError::Version {
        name: name.into(),
        found: found
            .unwrap_or_else(|| "something else (it does not export qmpgate:plugin/guest)".into()),
    })
}

/// Per-store host state: the empty WASI context and the plugin's limits.
struct HostState {
    plugin: Arc<str>,
    /// The upstream of the call in progress: the host adds it to audit records, where
    /// a plugin cannot forge it.
    upstream: Option<Arc<str>>,
    /// The client whose traffic the current call is about (none in `init`).
    client: Option<Arc<Client>>,
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryCap,
    audit: Option<Arc<crate::audit::AuditSink>>,
    /// The plugin's counters (dropped log messages and audit records).
    stats: Arc<PluginStats>,
    /// Log messages it may still write now (refilled over time).
    log_tokens: f64,
    /// When `log_tokens` was last refilled.
    log_refilled: Instant,
    /// Audit records written in the current call.
    audits_this_call: u32,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::qmpgate::plugin::types::Host for HostState {}

impl bindings::qmpgate::plugin::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        // Bounded in rate and size: a plugin cannot flood the log (or the memory
        // of a log writer that cannot keep up).
        let now = Instant::now();
        let refill =
            now.duration_since(self.log_refilled).as_secs_f64() * f64::from(LOG_PER_SECOND);
        self.log_tokens = (self.log_tokens + refill).min(f64::from(LOG_BURST));
        self.log_refilled = now;
        if self.log_tokens < 1.0 {
            self.stats.log_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.log_tokens -= 1.0;
        let plugin = &*self.plugin;
        // A plugin's text must not pass for qmpgate's own lines: control
        // characters (newlines, escape sequences) are shown escaped (then cut, so
        // escaping cannot grow a message past the cap).
        let message = escape_controls(&message);
        let message = cut(&message, LOG_MESSAGE_MAX);
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn audit(&mut self, entry: String) {
        self.audits_this_call += 1;
        if self.audits_this_call > AUDIT_PER_CALL {
            self.stats.audit_dropped.fetch_add(1, Ordering::Relaxed);
            if self.audits_this_call == AUDIT_PER_CALL + 1 {
                tracing::warn!(
                    plugin = &*self.plugin,
                    limit = AUDIT_PER_CALL,
                    "plugin wrote too many audit records in one call; dropping the rest of this call's"
                );
            }
            return;
        }
        let client = self.client.as_deref().map(client_json);
        let entry = if entry.len() > AUDIT_ENTRY_MAX {
            serde_json::json!({"oversized-record": {"bytes": entry.len(), "start": cut(&entry, DESC_MAX)}}).to_string()
        } else {
            entry
        };
        let record = crate::audit::record(&self.plugin, self.upstream.as_deref(), client, &entry);
        match &self.audit {
            Some(sink) => sink.write(&self.plugin, &record),
            // Without an audit log, records go to the log under their own target,
            // as one JSON field: never as free text a plugin chose.
            None => tracing::info!(target: "qmpgate::audit", record = %record, "audit"),
        }
    }
}

/// Caps linear memory and remembers that it did, so a trap can be reported as
/// "memory limit" rather than a bare "unreachable".
struct MemoryCap {
    max: usize,
    hit: bool,
    high_water: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.hit = true;
            return Ok(false);
        }
        self.high_water = self.high_water.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; no honest plugin needs this many.
        Ok(desired <= 64 * 1024)
    }
}

/// A live instance and its store.
struct Live {
    store: Store<HostState>,
    bindings: bindings::Plugin,
}

/// Counters per plugin, for status and metrics.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Hook calls.
    pub calls: AtomicU64,
    /// Commands denied.
    pub denials: AtomicU64,
    /// Calls that trapped (including deadline and memory kills).
    pub traps: AtomicU64,
    /// Calls stopped by the CPU deadline.
    pub deadline_kills: AtomicU64,
    /// Calls stopped by the memory cap.
    pub memory_kills: AtomicU64,
    /// Instances created after the first (each follows a trap).
    pub restarts: AtomicU64,
    /// Calls refused because the plugin had used up its restart budget.
    pub disabled_calls: AtomicU64,
    /// Log messages dropped over the rate limit.
    pub log_dropped: AtomicU64,
    /// Audit records dropped over the per-call limit.
    pub audit_dropped: AtomicU64,
    /// Largest linear memory any instance reached, in bytes.
    pub memory_high_water: AtomicU64,
    /// Total time in hooks, in nanoseconds.
    pub busy_ns: AtomicU64,
    /// Hook latency histogram: bucket `i` counts calls that took less than 2^i µs
    /// (and at least 2^(i-1)); the last bucket takes everything slower.
    pub latency: [AtomicU64; LATENCY_BUCKETS],
}

/// Buckets of [`PluginStats::latency`]: up to 2^23 µs (8 s), far past any deadline.
pub const LATENCY_BUCKETS: usize = 24;

impl PluginStats {
    fn record_latency(&self, elapsed: Duration) {
        let micros = elapsed.as_micros().max(1) as u64;
        let bucket = (64 - micros.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The latency below which fraction `q` of calls completed, in µs (a bucket's
    /// upper bound, so within a factor of two); `None` before the first call.
    pub fn latency_quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= target {
                return Some(1 << i);
            }
        }
        Some(1 << (LATENCY_BUCKETS - 1))
    }
}

/// How a hook call failed. Every fault fails closed.
#[derive(Debug, Error)]
pub enum Fault {
    /// The CPU deadline stopped the call.
    #[error("exceeded its CPU time limit ({0} ms)")]
    Deadline(u128),
    /// The call hit the memory cap.
    #[error("exceeded its memory limit ({0} MiB)")]
    Memory(usize),
    /// Any other trap (panic, unreachable, ...).
    #[error("trapped: {0}")]
    Trap(String),
    /// The plugin used up its restart budget and is down for a while.
    #[error("is disabled: it failed {0} times within {1} s")]
    Disabled(usize, u64),
    /// The instance could not be recreated.
    #[error("could not be restarted: {0}")]
    Restart(String),
    /// It returned something invalid (e.g. a reply that is not JSON).
    #[error("returned an invalid result: {0}")]
    Invalid(String),
}

/// A hook's result, checked against the output caps ([`OUTPUT_MAX`],
/// [`DESC_MAX`]): `oversized` says what is too long, if anything.
trait Bounded {
    fn oversized(&self) -> Option<String>;
}

fn oversized_json(text: &str, what: &str) -> Option<String> {
    (text.len() > OUTPUT_MAX).then(|| format!("{what} longer than {OUTPUT_MAX} bytes"))
}

fn oversized_text(text: &str, what: &str) -> Option<String> {
    (text.len() > DESC_MAX).then(|| format!("{what} longer than {DESC_MAX} bytes"))
}

fn oversized_error(error: &WitError) -> Option<String> {
    oversized_text(&error.class, "an error class")
        .or_else(|| oversized_text(&error.desc, "an error description"))
}

fn oversized_command(command: &WitCommand) -> Option<String> {
    oversized_text(&command.name, "a command name")
        .or_else(|| oversized_json(&command.arguments, "arguments"))
}

impl Bounded for () {
    fn oversized(&self) -> Option<String> {
        None
    }
}

impl Bounded for Result<(), WitError> {
    fn oversized(&self) -> Option<String> {
        self.as_ref().err().and_then(oversized_error)
    }
}

impl Bounded for Verdict {
    fn oversized(&self) -> Option<String> {
        match self {
            Verdict::Forward => None,
            Verdict::Rewrite(command) => oversized_command(command),
            Verdict::Deny(error) => oversized_error(error),
            Verdict::Reply(text) => oversized_json(text, "a reply"),
        }
    }
}

impl Bounded for ResponseVerdict {
    fn oversized(&self) -> Option<String> {
        match self {
            ResponseVerdict::Deliver => None,
            ResponseVerdict::Replace(WitResponse::Ok(text)) => oversized_json(text, "a response"),
            ResponseVerdict::Replace(WitResponse::Error(error)) => oversized_error(error),
        }
    }
}

impl Bounded for EventVerdict {
    fn oversized(&self) -> Option<String> {
        match self {
            EventVerdict::Rewrite(data) => oversized_json(data, "event data"),
            EventVerdict::Deliver | EventVerdict::Drop => None,
        }
    }
}

impl Bounded for HmpTranslation {
    fn oversized(&self) -> Option<String> {
        match self {
            HmpTranslation::NotHandled => None,
            HmpTranslation::Command(command) => oversized_command(command),
            HmpTranslation::HmpOnly(name) => oversized_text(name, "a command name"),
            HmpTranslation::Invalid(reason) => oversized_text(reason, "a reason"),
        }
    }
}

/// `text` cut to at most `max` bytes (at a character boundary), saying how much
/// was cut.
fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}... ({} more bytes)",
        &text[..end],
        text.len() - end
    ))
}

/// Whose input a hook call is about, and so who a fault in it is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    /// The client's own input (its command, HMP line, or QEMU's reply to it): the
    /// client is charged, and disconnected after [`CLIENT_FAULT_LIMIT`].
    Client,
    /// Input no client chose (a connection, QEMU's events): the plugin is
    /// charged, and taken down for the upstream after [`RESTART_BUDGET`].
    Plugin,
}

/// Recent faults caused by clients' input, shared by a chain's thread (which
/// records them) and its sessions (which disconnect a client over the limit).
///
/// Faults are kept per principal (the listener and the peer's uid, address or TLS
/// identity), not per connection, and outlive the connection: reconnecting does
/// not buy a fresh budget.
#[derive(Debug, Default)]
pub struct ClientFaults(Mutex<HashMap<String, std::collections::VecDeque<Instant>>>);

/// Who a client is, for [`ClientFaults`].
fn principal(client: &Client) -> String {
    let peer = match (&client.tls_identity, &client.peer) {
        (Some(identity), _) => format!("tls:{identity}"),
        (None, Peer::Unix(p)) => format!("uid:{}", p.uid),
        (None, Peer::Inet(address)) => {
            // The address without the port: one host is one principal.
            let host = address
                .rsplit_once(':')
                .map_or(address.as_str(), |(h, _)| h);
            format!("inet:{host}")
        }
        (None, Peer::Unknown) => "unknown".to_string(),
    };
    format!("{}/{peer}", client.listener)
}

impl ClientFaults {
    fn charge(&self, client: &Client) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Records of principals with no fault in the window go, so the map stays
        // as small as the set of recent offenders.
        map.retain(|_, times| {
            times
                .back()
                .is_some_and(|t| now.duration_since(*t) <= CLIENT_FAULT_WINDOW)
        });
        map.entry(principal(client)).or_default().push_back(now);
    }

    /// Faults `client`'s principal caused within the last [`CLIENT_FAULT_WINDOW`].
    pub fn recent(&self, client: &Client) -> usize {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(times) = map.get_mut(&principal(client)) else {
            return 0;
        };
        let now = Instant::now();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > CLIENT_FAULT_WINDOW)
        {
            times.pop_front();
        }
        times.len()
    }
}

/// One plugin's compiled component and live instance. Lives on its chain's thread.
struct Worker {
    name: Arc<str>,
    engine: Engine,
    pre: bindings::PluginPre<HostState>,
    config: String,
    limits: Limits,
    audit: Option<Arc<crate::audit::AuditSink>>,
    /// The live instance; `None` after a trap until the next call recreates it.
    live: Option<Live>,
    /// The plugin's own faults within the last `RESTART_WINDOW`, per upstream.
    own_faults: HashMap<Option<Arc<str>>, std::collections::VecDeque<Instant>>,
    /// Faults charged to clients (shared with the chain's sessions).
    client_faults: Arc<ClientFaults>,
    stats: Arc<PluginStats>,
    /// The upstream whose traffic the current job is about, for audit records.
    upstream: Option<Arc<str>>,
    /// The client the current job is about, for audit records.
    client: Option<Arc<Client>>,
}

impl Worker {
    fn deadline_ticks(&self) -> u64 {
        (self.limits.cpu.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }

    /// Instantiation and `init` run once per instance, not per command: they get
    /// [`INIT_DEADLINE_FACTOR`] times a hook's limit (at least a second), since the
    /// deadline is wall time and a loaded host can keep the plugin thread off the
    /// CPU for longer than a hook's 50 ms.
    fn init_deadline_ticks(&self) -> u64 {
        let ticks_per_second = (1000 / EPOCH_TICK.as_millis()) as u64;
        (self.deadline_ticks() * INIT_DEADLINE_FACTOR).max(ticks_per_second)
    }

    fn instantiate(&self) -> Result<Live, String> {
        let state = HostState {
            plugin: self.name.clone(),
            upstream: None,
            client: None,
            // No environment, arguments, preopened directories, sockets or stdin.
            // Random bytes come from one host call the deadline cannot interrupt:
            // a small cap keeps that call short.
            wasi: WasiCtx::builder().max_random_size(4096).build(),
            table: {
                // Host-side entries (pollables, streams) live outside the plugin's
                // memory cap: bounded by count instead.
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_RESOURCES);
                table
            },
            memory: MemoryCap {
                max: self.limits.memory_bytes,
                hit: false,
                high_water: 0,
            },
            audit: self.audit.clone(),
            stats: self.stats.clone(),
            log_tokens: f64::from(LOG_BURST),
            log_refilled: Instant::now(),
            audits_this_call: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.init_deadline_ticks());
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.describe(&store, e).to_string())?;
        store.set_epoch_deadline(self.init_deadline_ticks());
        match bindings
            .qmpgate_plugin_guest()
            .call_init(&mut store, &self.config)
        {
            Ok(Ok(())) => Ok(Live { store, bindings }),
            Ok(Err(reason)) => Err(cut(&reason, DESC_MAX).into_owned()),
            Err(e) => Err(self.describe(&store, e).to_string()),
        }
    }

    fn describe(&self, store: &Store<HostState>, error: wasmtime::Error) -> Fault {
        if store.data().memory.hit {
            return Fault::Memory(self.limits.memory_bytes >> 20);
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Fault::Deadline(self.limits.cpu.as_millis()),
            // The trap's own words; the wasm backtrace goes to the log, not to clients.
            Some(trap) => {
                tracing::debug!(plugin = &*self.name, error = %format!("{error:#}"), "trap details");
                Fault::Trap(trap.to_string())
            }
            // A host function's error (the outermost context is wasmtime's
            // backtrace note): its own first line.
            None => Fault::Trap(
                error
                    .root_cause()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("unknown error")
                    .to_string(),
            ),
        }
    }

    /// Whether the plugin's own faults have used up its budget on the current
    /// job's upstream (other upstreams sharing the chain are not affected).
    fn disabled(&mut self) -> bool {
        let Some(times) = self.own_faults.get_mut(&self.upstream) else {
            return false;
        };
        let now = Instant::now();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            times.pop_front();
        }
        times.len() >= RESTART_BUDGET
    }

    /// Charges a fault to whoever's input caused it (see [`Blame`]).
    fn charge(&mut self, blame: Blame) {
        match (blame, &self.client) {
            (Blame::Client, Some(client)) => self.client_faults.charge(client),
            _ => self
                .own_faults
                .entry(self.upstream.clone())
                .or_default()
                .push_back(Instant::now()),
        }
    }

    /// Runs one hook on the live instance (recreating it if a trap killed it).
    /// A fault is charged as `blame` says.
    fn call<R: Bounded>(
        &mut self,
        blame: Blame,
        hook: impl FnOnce(&wit::Guest, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        let started = Instant::now();
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        // A plugin that keeps failing by itself stays down on this upstream (every
        // call refused) until the window has passed, or a reload.
        if self.disabled() {
            self.stats.disabled_calls.fetch_add(1, Ordering::Relaxed);
            return Err(Fault::Disabled(RESTART_BUDGET, RESTART_WINDOW.as_secs()));
        }
        if self.live.is_none() {
            self.stats.restarts.fetch_add(1, Ordering::Relaxed);
            match self.instantiate() {
                Ok(live) => self.live = Some(live),
                Err(reason) => {
                    self.charge(Blame::Plugin);
                    return Err(Fault::Restart(reason));
                }
            }
        }
        let deadline = self.deadline_ticks();
        let live = self.live.as_mut().expect("just ensured");
        live.store.set_epoch_deadline(deadline);
        live.store.data_mut().upstream = self.upstream.clone();
        live.store.data_mut().client = self.client.clone();
        live.store.data_mut().audits_this_call = 0;
        let result = hook(live.bindings.qmpgate_plugin_guest(), &mut live.store);
        let high_water = live.store.data().memory.high_water as u64;
        self.stats
            .memory_high_water
            .fetch_max(high_water, Ordering::Relaxed);
        let result = match result {
            Ok(value) => match value.oversized() {
                None => Ok(value),
                Some(what) => {
                    // Dropped at once: the caps bound what a plugin's output
                    // costs the host after it was copied out.
                    drop(value);
                    self.stats.traps.fetch_add(1, Ordering::Relaxed);
                    self.charge(blame);
                    Err(Fault::Invalid(what))
                }
            },
            Err(e) => {
                let live = self.live.take().expect("still there");
                let fault = self.describe(&live.store, e);
                self.stats.traps.fetch_add(1, Ordering::Relaxed);
                match fault {
                    Fault::Deadline(_) => self.stats.deadline_kills.fetch_add(1, Ordering::Relaxed),
                    Fault::Memory(_) => self.stats.memory_kills.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                self.charge(blame);
                tracing::warn!(
                    plugin = &*self.name,
                    upstream = self.upstream.as_deref(),
                    client = self.client.as_ref().map(|c| c.id),
                    ?blame,
                    error = %fault,
                    "plugin fault; the instance will be recreated"
                );
                Err(fault)
            }
        };
        let elapsed = started.elapsed();
        self.stats
            .busy_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.stats.record_latency(elapsed);
        result
    }
}

/// A compiled, linked plugin, not instantiated yet.
pub struct Loaded(Worker);

/// A plugin in a running chain, as status reports it.
#[derive(Clone)]
pub struct PluginInfo {
    /// The configured name.
    pub name: Arc<str>,
    /// The `profile` of its configuration, when it has one (the built-in policy's),
    /// so that status shows which profile a chain enforces.
    pub profile: Option<String>,
    /// Its counters.
    pub stats: Arc<PluginStats>,
}

/// A command as plugins see it, with its arguments as a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The command name.
    pub name: String,
    /// The arguments object.
    pub arguments: Map<String, Value>,
    /// `exec-oob`.
    pub oob: bool,
}

impl Command {
    fn to_wit(&self) -> WitCommand {
        WitCommand {
            name: self.name.clone(),
            arguments: Value::Object(self.arguments.clone()).to_string(),
            oob: self.oob,
        }
    }

    fn from_wit(command: WitCommand) -> Result<Self, Fault> {
        let arguments = match serde_json::from_str(&command.arguments) {
            Ok(Value::Object(map)) => map,
            _ => {
                return Err(Fault::Invalid(format!(
                    "rewritten arguments of '{}' are not a JSON object",
                    command.name
                )));
            }
        };
        Ok(Command {
            name: command.name,
            arguments,
            oob: command.oob,
        })
    }
}

/// The chain's decision on a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send this (possibly rewritten) command upstream.
    Forward(Command),
    /// Refuse with this error.
    Deny(QmpError),
    /// Answer with this `return` value.
    Reply(Value),
}

/// The chain's decision on an event for one client.
#[derive(Debug, Clone, PartialEq)]
pub enum EventDecision {
    /// Deliver as is.
    Deliver,
    /// Deliver with this `data`.
    Rewrite(Value),
    /// Do not deliver to this client.
    Drop,
}

fn fault_error(plugin: &Worker, fault: &Fault, what: &str) -> QmpError {
    QmpError::generic(format!("qmpgate plugin '{}' {fault}; {what}", plugin.name))
}

type Job = Box<dyn FnOnce(&mut [Worker]) + Send>;

/// The plugins of a chain, run in order on every hook.
///
/// All of a chain's instances live on one OS thread of its own, and a hook runs the
/// whole chain in one trip to that thread: wasm never runs on a tokio worker (a
/// plugin spinning to its deadline stalls no connection), WASI's synchronous stdio
/// (a guest's panic message) may block freely, and the cost of a thread hop is paid
/// once per hook, not once per plugin. Calls from all clients take turns; hooks
/// take microseconds.
#[derive(Clone)]
pub struct PluginChain {
    /// Sends work to the chain's thread; `None` for an empty chain.
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    plugins: Vec<PluginInfo>,
    /// The upstream this handle serves (see [`PluginChain::for_upstream`]).
    upstream: Option<Arc<str>>,
    /// Faults charged to clients, by the chain's thread.
    faults: Arc<ClientFaults>,
    /// How long a caller waits for the chain's thread: [`CHAIN_WAIT`], or twice
    /// the chain's CPU limits together if that is longer.
    wait: Duration,
}

impl PluginChain {
    /// A chain that lets everything through.
    pub fn empty() -> Self {
        PluginChain {
            jobs: None,
            plugins: Vec::new(),
            upstream: None,
            faults: Arc::default(),
            wait: CHAIN_WAIT,
        }
    }

    /// Starts the chain's thread, instantiates every plugin there and calls its
    /// `init`; the first refusal or trap is returned.
    pub fn start(loaded: Vec<Loaded>) -> Result<Self, PluginError> {
        if loaded.is_empty() {
            return Ok(PluginChain::empty());
        }
        let faults = Arc::new(ClientFaults::default());
        let wait = CHAIN_WAIT.max(2 * loaded.iter().map(|l| l.0.limits.cpu).sum::<Duration>());
        let mut workers: Vec<Worker> = loaded
            .into_iter()
            .map(|l| Worker {
                client_faults: faults.clone(),
                ..l.0
            })
            .collect();
        let plugins = workers
            .iter()
            .map(|w| PluginInfo {
                name: w.name.clone(),
                profile: serde_json::from_str::<Value>(&w.config)
                    .ok()
                    .and_then(|c| c.get("profile")?.as_str().map(str::to_string)),
                stats: w.stats.clone(),
            })
            .collect();
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(MAX_QUEUED_JOBS);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("qmpgate-plugins".into())
            .spawn(move || {
                for worker in workers.iter_mut() {
                    match worker.instantiate() {
                        Ok(live) => worker.live = Some(live),
                        Err(reason) => {
                            let _ = ready_tx.send(Err(PluginError::Init {
                                name: worker.name.to_string(),
                                reason,
                            }));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                // Ends when the last PluginChain clone (the senders) is dropped.
                while let Ok(job) = queue.recv() {
                    job(&mut workers);
                }
            })
            .map_err(|e| PluginError::Init {
                name: "(chain)".into(),
                reason: format!("cannot start its thread: {e}"),
            })?;
        match ready.recv() {
            Ok(Ok(())) => Ok(PluginChain {
                jobs: Some(jobs),
                plugins,
                upstream: None,
                faults,
                wait,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PluginError::Init {
                name: "(chain)".into(),
                reason: "its thread stopped".into(),
            }),
        }
    }

    /// The chain as status and logs show it: each plugin's name, with the profile
    /// it enforces when it has one (`["hmp", "policy (profile=safe)"]`).
    pub fn describe(&self) -> Vec<String> {
        self.plugins()
            .iter()
            .map(|p| match &p.profile {
                Some(profile) => format!("{} (profile={profile})", p.name),
                None => p.name.to_string(),
            })
            .collect()
    }

    /// The plugins, in chain order.
    pub fn plugins(&self) -> &[PluginInfo] {
        &self.plugins
    }

    /// A handle on the same chain (the same instances) for upstream `id`'s traffic:
    /// audit records made during its calls name the upstream.
    pub fn for_upstream(&self, id: &str) -> PluginChain {
        PluginChain {
            upstream: Some(id.into()),
            ..self.clone()
        }
    }

    /// Faults `client`'s input (or its principal's, over its connections) caused
    /// in this chain's plugins within [`CLIENT_FAULT_WINDOW`]; a session
    /// disconnects its client at [`CLIENT_FAULT_LIMIT`].
    pub fn client_faults(&self, client: &Client) -> usize {
        self.faults.recent(client)
    }

    /// Whether `other` is a clone of this chain (the same instances).
    pub fn same_as(&self, other: &PluginChain) -> bool {
        match (self.plugins.first(), other.plugins.first()) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a.stats, &b.stats),
            (None, None) => true,
            _ => false,
        }
    }

    /// Runs `job` on the chain's thread and waits for its result; `fallback` if the
    /// thread is gone (callers handle the empty chain before calling).
    async fn run<R: Send + 'static>(
        &self,
        client: &Client,
        fallback: R,
        job: impl FnOnce(&mut [Worker]) -> R + Send + 'static,
    ) -> R {
        let Some(jobs) = &self.jobs else {
            return fallback;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let upstream = self.upstream.clone();
        let client = Arc::new(client.clone());
        let job: Job = Box::new(move |workers| {
            if tx.is_closed() {
                // Its caller stopped waiting: nothing to decide.
                return;
            }
            for worker in workers.iter_mut() {
                worker.upstream = upstream.clone();
                worker.client = Some(client.clone());
            }
            let _ = tx.send(job(workers));
        });
        // A full queue means the thread is far behind: fail closed at once rather
        // than pile up work (and memory) it would reach too late.
        if jobs.try_send(job).is_err() {
            return fallback;
        }
        // The caller never waits without end, whatever holds the chain's thread
        // (hooks cannot wait, but the thread serves every client of the chain).
        match tokio::time::timeout(self.wait, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => fallback,
            Err(_) => {
                tracing::warn!(wait = ?self.wait, chain = ?self.describe(), "the plugin chain did not answer in time; failing closed");
                fallback
            }
        }
    }

    /// A client connected: any plugin may refuse it.
    pub async fn on_connect(&self, client: &Client) -> Result<(), QmpError> {
        if self.jobs.is_none() {
            return Ok(());
        }
        let client = client.clone();
        let stopped = Err(QmpError::generic(NO_ANSWER));
        self.run(&client.clone(), stopped, move |workers| {
            for worker in workers {
                match worker.call(Blame::Plugin, |g, s| g.call_on_connect(s, &client)) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        worker.stats.denials.fetch_add(1, Ordering::Relaxed);
                        return Err(QmpError {
                            class: e.class,
                            desc: e.desc,
                        });
                    }
                    Err(fault) => {
                        return Err(fault_error(worker, &fault, "the connection was refused"));
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// A command: each plugin may forward, rewrite, deny or answer it; the first
    /// deny or answer ends the chain. A faulting plugin denies.
    pub async fn on_command(
        &self,
        client: &Client,
        command: Command,
        hmp_line: Option<&str>,
    ) -> Decision {
        if self.jobs.is_none() {
            return Decision::Forward(command);
        }
        let (client, hmp_line) = (client.clone(), hmp_line.map(str::to_string));
        let stopped = Decision::Deny(QmpError::generic(NO_ANSWER));
        self.run(&client.clone(), stopped, move |workers| {
            decide(workers, &client, command, hmp_line.as_deref())
        })
        .await
    }

    /// An HMP command line (typed on an HMP listener, or sent with QMP's
    /// `human-monitor-command`): the first plugin that interprets HMP says what it
    /// is in QMP terms, then the chain decides on that, with the line attached.
    /// `Forward` carries the `human-monitor-command` to send: QEMU runs the line
    /// itself, so its HMP output is what the user sees.
    ///
    /// `cpu_index` is `human-monitor-command`'s own argument (the vCPU the line
    /// runs on), passed on as the client gave it.
    pub async fn on_hmp(&self, client: &Client, line: &str, cpu_index: Option<Value>) -> Decision {
        let mut arguments = Map::new();
        arguments.insert("command-line".into(), Value::from(line));
        if let Some(cpu_index) = cpu_index {
            arguments.insert("cpu-index".into(), cpu_index);
        }
        let passthrough = Command {
            name: "human-monitor-command".into(),
            arguments,
            oob: false,
        };
        if self.jobs.is_none() {
            return Decision::Forward(passthrough);
        }
        if line.len() > HMP_LINE_MAX {
            return Decision::Deny(QmpError::generic(format!(
                "HMP command line refused: longer than QEMU's {HMP_LINE_MAX}-byte line buffer"
            )));
        }
        let owned_line = line.to_string();
        let translation = self
            .run(client, Err(QmpError::generic(NO_ANSWER)), move |workers| {
                translate_hmp(workers, &owned_line)
            })
            .await;
        let policy_command = match translation {
            Err(error) => return Decision::Deny(error),
            // Nobody interprets HMP: the policy decides on `human-monitor-command` itself.
            Ok(None) => passthrough.clone(),
            Ok(Some(HmpTranslation::Command(command))) => match Command::from_wit(command) {
                Ok(command) => command,
                Err(fault) => {
                    return Decision::Deny(QmpError::generic(format!("HMP translation {fault}")));
                }
            },
            Ok(Some(HmpTranslation::HmpOnly(name))) => Command {
                name: format!("hmp:{name}"),
                arguments: passthrough.arguments.clone(),
                oob: false,
            },
            Ok(Some(HmpTranslation::Invalid(reason))) => {
                // QEMU would answer an unknown command with *success* and a message;
                // an unparsable line is refused instead, so nothing slips past policy.
                let denied = Decision::Deny(QmpError::generic(format!(
                    "HMP command line refused: {reason}"
                )));
                let (client, command, line, told) = (
                    client.clone(),
                    passthrough.to_wit(),
                    line.to_string(),
                    denied.clone(),
                );
                self.run(&client.clone(), (), move |workers| {
                    notify_decision(workers, &client, &command, Some(&line), &told)
                })
                .await;
                return denied;
            }
            Ok(Some(HmpTranslation::NotHandled)) => unreachable!("translate_hmp skips not-handled"),
        };
        match self.on_command(client, policy_command, Some(line)).await {
            Decision::Forward(_) => Decision::Forward(passthrough),
            other => other,
        }
    }

    /// QEMU's reply to `command`: plugins may replace it. A faulting plugin turns it
    /// into an error (QEMU did run the command; the client is told the result was
    /// withheld).
    pub async fn on_response(&self, client: &Client, command: &Command, reply: Answer) -> Answer {
        if self.jobs.is_none() {
            return reply;
        }
        let (client, command) = (client.clone(), command.to_wit());
        let stopped = error_answer(&QmpError::generic(format!(
            "{NO_ANSWER}; the result was withheld"
        )));
        self.run(&client.clone(), stopped, move |workers| {
            respond(workers, &client, &command, reply)
        })
        .await
    }

    /// An event for one client: plugins may drop or rewrite its data. A faulting
    /// plugin drops it (fail closed: an event may carry what a policy hides).
    ///
    /// `asked` is true when the client asked for the event (a replay of the
    /// history): a fault is then charged to it, since it chose when and how often
    /// the hook runs; a live event's fault is the plugin's own.
    pub async fn on_event(
        &self,
        client: &Client,
        name: &str,
        body: &Map<String, Value>,
        asked: bool,
    ) -> EventDecision {
        if self.jobs.is_none() {
            return EventDecision::Deliver;
        }
        let timestamp = body.get("timestamp");
        let field = |k: &str| {
            timestamp
                .and_then(|t| t.get(k))
                .and_then(Value::as_i64)
                .unwrap_or(0)
        };
        let event = WitEvent {
            name: name.to_string(),
            data: body
                .get("data")
                .map(Value::to_string)
                .unwrap_or_else(|| "{}".into()),
            seconds: field("seconds"),
            microseconds: field("microseconds"),
        };
        let client = client.clone();
        let blame = if asked { Blame::Client } else { Blame::Plugin };
        self.run(&client.clone(), EventDecision::Drop, move |workers| {
            filter_event(workers, &client, event, blame)
        })
        .await
    }
}

/// The first interpretation any plugin offers (`None`: no plugin interprets HMP).
fn translate_hmp(workers: &mut [Worker], line: &str) -> Result<Option<HmpTranslation>, QmpError> {
    for worker in workers {
        match worker.call(Blame::Client, |g, s| g.call_translate_hmp(s, line)) {
            Ok(HmpTranslation::NotHandled) => continue,
            Ok(translation) => return Ok(Some(translation)),
            Err(fault) => {
                return Err(fault_error(
                    worker,
                    &fault,
                    "the HMP command was not executed",
                ));
            }
        }
    }
    Ok(None)
}

fn decide(
    workers: &mut [Worker],
    client: &Client,
    command: Command,
    hmp_line: Option<&str>,
) -> Decision {
    let mut seen = command.to_wit();
    let decision = run_chain(workers, client, command, hmp_line, &mut seen);
    notify_decision(workers, client, &seen, hmp_line, &decision);
    decision
}

/// Tells every plugin what was decided (for audit). Faults are counted and logged
/// by `Worker::call` and change nothing: the decision stands.
fn notify_decision(
    workers: &mut [Worker],
    client: &Client,
    command: &WitCommand,
    hmp_line: Option<&str>,
    decision: &Decision,
) {
    let decision = match decision {
        Decision::Forward(_) => WitDecision::Forwarded,
        Decision::Deny(e) => WitDecision::Denied(WitError {
            class: e.class.clone(),
            desc: e.desc.clone(),
        }),
        Decision::Reply(_) => WitDecision::Answered,
    };
    for worker in workers {
        let _ = worker.call(Blame::Client, |g, s| {
            g.call_on_decision(s, client, command, hmp_line, &decision)
        });
    }
}

/// Runs `on-command` through the chain; `seen` ends as the command the deciding
/// plugin saw.
fn run_chain(
    workers: &mut [Worker],
    client: &Client,
    mut command: Command,
    hmp_line: Option<&str>,
    seen: &mut WitCommand,
) -> Decision {
    let not_run = "the command was not executed";
    for worker in workers {
        *seen = command.to_wit();
        match worker.call(Blame::Client, |g, s| {
            g.call_on_command(s, client, seen, hmp_line)
        }) {
            Ok(Verdict::Forward) => {}
            Ok(Verdict::Rewrite(new)) => match Command::from_wit(new) {
                Ok(new) => command = new,
                Err(fault) => {
                    worker.charge(Blame::Client);
                    return Decision::Deny(fault_error(worker, &fault, not_run));
                }
            },
            Ok(Verdict::Deny(e)) => {
                worker.stats.denials.fetch_add(1, Ordering::Relaxed);
                return Decision::Deny(QmpError {
                    class: e.class,
                    desc: e.desc,
                });
            }
            Ok(Verdict::Reply(text)) => {
                return match serde_json::from_str(&text) {
                    Ok(value) => Decision::Reply(value),
                    Err(e) => {
                        worker.stats.traps.fetch_add(1, Ordering::Relaxed);
                        worker.charge(Blame::Client);
                        let fault = Fault::Invalid(format!("reply is not JSON: {e}"));
                        Decision::Deny(fault_error(worker, &fault, not_run))
                    }
                };
            }
            Err(fault) => return Decision::Deny(fault_error(worker, &fault, not_run)),
        }
    }
    Decision::Forward(command)
}

fn error_answer(error: &QmpError) -> Answer {
    match crate::qmp::error_response(error, None) {
        Value::Object(object) => Answer::Object(object),
        _ => unreachable!("error_response builds an object"),
    }
}

fn respond(
    workers: &mut [Worker],
    client: &Client,
    command: &WitCommand,
    mut reply: Answer,
) -> Answer {
    let withheld = "the result was withheld";
    for worker in workers {
        // A `return` goes to the plugin as the text QEMU wrote (no tree is built).
        let response = match &reply {
            Answer::Return(text) => WitResponse::Ok(text.to_string()),
            Answer::Object(object) => match (object.get("return"), object.get("error")) {
                (Some(value), _) => WitResponse::Ok(value.to_string()),
                (None, Some(error)) => WitResponse::Error(WitError {
                    class: error
                        .get("class")
                        .and_then(Value::as_str)
                        .unwrap_or("GenericError")
                        .into(),
                    desc: error
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .into(),
                }),
                (None, None) => return reply,
            },
        };
        reply = match worker.call(Blame::Client, |g, s| {
            g.call_on_response(s, client, command, &response)
        }) {
            Ok(ResponseVerdict::Deliver) => continue,
            Ok(ResponseVerdict::Replace(WitResponse::Ok(text))) => {
                match serde_json::from_str::<Value>(&text) {
                    Ok(value) => Answer::returning(&value),
                    Err(e) => {
                        worker.stats.traps.fetch_add(1, Ordering::Relaxed);
                        worker.charge(Blame::Client);
                        let fault = Fault::Invalid(format!("replacement is not JSON: {e}"));
                        error_answer(&fault_error(worker, &fault, withheld))
                    }
                }
            }
            Ok(ResponseVerdict::Replace(WitResponse::Error(e))) => error_answer(&QmpError {
                class: e.class,
                desc: e.desc,
            }),
            Err(fault) => error_answer(&fault_error(worker, &fault, withheld)),
        };
    }
    reply
}

fn filter_event(
    workers: &mut [Worker],
    client: &Client,
    mut event: WitEvent,
    blame: Blame,
) -> EventDecision {
    let mut rewritten = None;
    for worker in workers {
        match worker.call(blame, |g, s| g.call_on_event(s, client, &event)) {
            Ok(EventVerdict::Deliver) => {}
            Ok(EventVerdict::Drop) | Err(_) => return EventDecision::Drop,
            Ok(EventVerdict::Rewrite(data)) => match serde_json::from_str::<Value>(&data) {
                Ok(value @ Value::Object(_)) => {
                    event.data = data;
                    rewritten = Some(value);
                }
                _ => {
                    worker.stats.traps.fetch_add(1, Ordering::Relaxed);
                    return EventDecision::Drop;
                }
            },
        }
    }
    match rewritten {
        Some(data) => EventDecision::Rewrite(data),
        None => EventDecision::Deliver,
    }
}

/// The client as audit records show it (the shape the built-in audit plugin
/// uses): id, listener, protocol, peer and TLS identity.
fn client_json(client: &Client) -> Value {
    let peer = match &client.peer {
        Peer::Unix(p) => serde_json::json!({"unix": {"pid": p.pid, "uid": p.uid, "gid": p.gid}}),
        Peer::Inet(address) => serde_json::json!({"inet": address}),
        Peer::Unknown => Value::Null,
    };
    serde_json::json!({
        "id": client.id,
        "listener": client.listener,
        "protocol": match client.protocol { Protocol::Qmp => "qmp", Protocol::Hmp => "hmp" },
        "peer": peer,
        "tls-identity": client.tls_identity,
    })
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`, ...), so that it
/// stays on one log line and carries no terminal escape sequences.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_is_compiled_once_per_process() {
        let runtime = Runtime::new(None, None).unwrap();
        let bytes = crate::config::BUILTIN_POLICY;
        let first = runtime.compile("a", bytes).unwrap();
        let second = runtime.compile("b", bytes).unwrap();
        // The same compiled code, mapped once, whatever name or configuration.
        assert_eq!(first.image_range(), second.image_range());
        let other = runtime.compile("hmp", crate::config::BUILTIN_HMP).unwrap();
        assert_ne!(first.image_range(), other.image_range());
        // After a reload forgets them, nothing keeps old components in memory.
        runtime.forget_compiled();
        let again = runtime.compile("a", bytes).unwrap();
        assert_ne!(first.image_range(), again.image_range());
    }
}
