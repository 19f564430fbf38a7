//! qmpgate: a sandboxed gateway for the QEMU monitor.
//!
//! The native host owns the sockets (inherited fds, systemd sockets, paths, TCP),
//! frames QMP traffic and routes it between many clients and one QEMU; every
//! decision about what that traffic means runs in WebAssembly plugins.
//!
//! Layers, each using only those below it (`scripts/check-layers.sh` checks it):
//! - [`protocol`] (crate `qmpgate-protocol`): framing, QEMU's JSON, QMP messages,
//!   QEMU's schema, chardev specs; no I/O;
//! - [`io`]: sockets, the fd table and fd adoption (the only `unsafe` code), TLS;
//! - [`upstream`]: the link to one QEMU (negotiation, id mux, timeouts, events)
//!   and [`plugin`] (crate `qmpgate-plugin-host`): wasmtime, instances, chains;
//! - [`session`]: one client's QMP or HMP session, on a narrow context;
//! - [`gateway`]: registries of VMs, listeners and chains; accept loops;
//!   supervision and shutdown;
//! - [`control`]: configuration, reload, the control monitor, the status
//!   endpoint, `qmpgate run`'s launcher;
//! - the binary (`main.rs`): the command line and dispatch.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub use qmpgate_plugin_host as plugin;
pub use qmpgate_protocol as protocol;

pub mod control;
pub mod gateway;
pub mod io;
pub mod session;
pub mod upstream;
