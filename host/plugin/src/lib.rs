//! The plugin host: WebAssembly components that decide about monitor traffic,
//! run under wasmtime with no ambient authority and bounded CPU and memory.
//!
//! Plugins are untrusted code. Each runs in wasmtime with:
//! - no ambient authority: an empty WASI context (no environment, no files, no
//!   sockets, no arguments); the only host functions are `log`, `audit` and
//!   `command-schema`;
//! - a memory cap per instance, enforced by a `ResourceLimiter`;
//! - a CPU deadline per hook call, enforced by epoch interruption from an OS thread
//!   (a tokio task would stop ticking exactly when a plugin hogs a worker).
//!
//! A trap (panic, deadline, memory cap, bad output) fails closed: the command is
//! refused with a QMP error, the fault is charged (to the client whose input caused
//! it, or to the plugin), and the instance is dropped and recreated on the next
//! call, because an instance that trapped may be in any state.
//!
//! This crate holds everything wasmtime: it is the slowest part of qmpgate to
//! compile and the least often changed, so the gateway above it rebuilds without it.
//!
//! Layout:
//! - [`runtime`]: [`Runtime`], the engine, linker and compile caches (in memory,
//!   and on disk through [`cache`]);
//! - [`instance`]: one plugin instance, its deadline, caps and faults;
//! - [`host`]: what an instance may call (`log`, `audit`) and its WASI context;
//! - [`chain`]: [`PluginChain`], the plugins of one policy, run on the caller's task;
//! - [`faults`]: who a fault is charged to; [`stats`]: counters per plugin;
//! - [`wit`]: the WIT bindings and conversions;
//! - [`spec`]: configured plugins and how a listener's policy selects a chain;
//! - [`builtin`]: the embedded plugins; [`policy_table`]: the built-in policy's
//!   allowlist, for `qmpgate policy show|check`;
//! - [`audit`]: the JSON-lines audit sink.

#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub mod audit;
pub mod builtin;
pub mod cache;
pub mod chain;
pub mod faults;
pub mod host;
pub mod instance;
pub mod policy_table;
pub mod runtime;
pub mod spec;
pub mod stats;
pub mod wit;

pub use chain::{Decision, EventDecision, PluginChain};
pub use instance::{Fault, Loaded, PluginInfo};
pub use runtime::Runtime;
pub use stats::PluginStats;
pub use wit::{Client, HmpLine, Hooks, Peer, Protocol, SUPPORTED_VERSIONS, TlsIdentity, UnixPeer};

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

/// The longest a caller waits for its turn at its chain's instances
/// before the call fails closed, unless the chain's CPU limits need longer.
pub const CHAIN_WAIT: Duration = Duration::from_secs(5);

/// How long a hook's `audit` call waits, by default (`--audit-wait-ms`), for its
/// record to be written before the call fails closed (a stalled audit disk).
pub const AUDIT_WAIT: Duration = CHAIN_WAIT;

/// Calls waiting for one instance set at most; more fail closed at once.
const MAX_QUEUED_JOBS: usize = 4096;

/// What a caller is told when the chain's instances stayed busy.
const NO_ANSWER: &str =
    "qmpgate's plugins did not answer in time (too many calls are waiting for them)";

/// A plugin's JSON texts (a reply, rewritten arguments or event data, a
/// replacement response) may be at most this long: as much as a client may send.
pub const OUTPUT_MAX: usize = qmpgate_protocol::framing::DEFAULT_MAX_MESSAGE;

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
        "plugin '{name}' was built for {found}; this qmpgate supports {}",
        supported_versions()
    )]
    Version { name: String, found: String },
    /// Imports something the host does not provide (e.g. sockets).
    #[error("plugin '{name}': cannot be linked: {reason}")]
    Link { name: String, reason: String },
    /// The engine or its epoch thread could not be set up.
    #[error("cannot start the plugin runtime: {0}")]
    Runtime(String),
    /// `init` refused the configuration, or trapped.
    #[error("plugin '{name}': init failed: {reason}")]
    Init { name: String, reason: String },
}

/// The contract versions this host loads, as `qmpgate:plugin@0.2.0 and
/// qmpgate:plugin@0.1.0`.
pub fn supported_versions() -> String {
    let all: Vec<String> = SUPPORTED_VERSIONS
        .iter()
        .map(|v| format!("qmpgate:plugin@{v}"))
        .collect();
    all.join(" and ")
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
