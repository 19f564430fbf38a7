//! The control plane: configuration and reloading, the control monitor, the status
//! endpoint, and `qmpgate run`'s launcher. It reads and changes the gateway
//! through the hub; nothing below it knows it exists.
//!
//! Layout: [`config`] (the TOML file and command-line merging), [`monitor`] (named
//! fds over SCM_RIGHTS, run-time chardevs, reload), [`status`] (read-only HTTP:
//! status, metrics, health, events), [`launcher`] (QEMU on a pre-opened monitor
//! socket).

pub mod config;
pub mod launcher;
pub mod monitor;
pub mod status;
