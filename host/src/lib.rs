//! qmpgate: a sandboxed gateway for the QEMU monitor.
//!
//! The native host owns the sockets (inherited fds, systemd sockets, paths, TCP),
//! frames QMP traffic and routes it between many clients and one QEMU; every
//! decision about what that traffic means runs in WebAssembly plugins.
//!
//! Layout:
//! - [`chardev`]: QEMU-style socket specs, fd adoption (the only `unsafe` code);
//! - [`framing`]: splitting QEMU's output into JSON messages, with limits;
//! - [`qjson`]: QEMU's JSON dialect, byte for byte: the reader clients get (QEMU's
//!   lexer, recovery and error texts) and the writer replies go out with;
//! - [`qmp`]: QMP message shapes and QEMU's error messages;
//! - [`schema`]: QEMU's QMP schema (`query-qmp-schema`): argument checks with QEMU's texts;
//! - [`plugin`]: the wasmtime runtime, limits and the plugin chain;
//! - [`cache`]: compiled plugins on disk, in a directory checked and held open;
//! - [`upstream`]: the one QMP session with QEMU: id rewriting, events, reconnects;
//! - [`session`]: one client's QMP session: negotiation, ordering, back-pressure;
//! - [`hmp_session`]: one client's HMP session on a `mode=readline` listener;
//! - [`gateway`]: listeners, accept loops, shutdown;
//! - [`launcher`]: `qmpgate run`, which starts QEMU on a pre-opened monitor socket;
//! - [`status`]: the read-only HTTP status endpoint (axum);
//! - [`control`]: the control monitor: named fds over SCM_RIGHTS, run-time listeners;
//! - [`tls`]: TLS listeners, with QEMU's credentials layout;
//! - [`config`]: the TOML file and command-line merging;
//! - [`policy_table`]: the built-in policy's allowlist, for `qmpgate policy show|check`;
//! - [`audit`]: the JSON-lines audit sink.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod cache;
pub mod chardev;
pub mod config;
pub mod control;
pub mod framing;
pub mod gateway;
pub mod hmp_session;
pub mod launcher;
pub mod plugin;
pub mod policy_table;
pub mod qjson;
pub mod qmp;
pub mod schema;
pub mod session;
pub mod status;
pub mod tls;
pub mod upstream;
