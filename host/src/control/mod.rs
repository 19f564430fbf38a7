//! The control plane: configuration and reloading, the control monitor, the status
//! endpoint, and `qmpgate run`'s launcher. It reads and changes the gateway
//! through the hub; nothing below it knows it exists.
//!
//! Layout: [`config`] (the TOML file and command-line merging), [`reload`]
//! (SIGHUP and `x-qmpgate-reload`), [`monitor`] (named fds over SCM_RIGHTS,
//! run-time chardevs), [`status`] (read-only HTTP: status, metrics, health,
//! events), [`launcher`] (QEMU on a pre-opened monitor socket), [`systemd`]
//! (readiness), [`logging`] (qmpgate's own log), [`authoring`] (`qmpgate plugin test`).

pub mod authoring;
pub mod config;
pub mod launcher;
pub mod logging;
pub mod monitor;
pub mod reload;
pub mod status;
pub mod systemd;

/// An error and its causes as one line (`a: b: c`), as the control monitor and
/// the reloader report them.
pub(crate) fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
