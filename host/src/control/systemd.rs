//! systemd's notification protocol (`sd_notify`): tells a `Type=notify` unit that
//! qmpgate is ready, reloading or stopping, and keeps its status line current.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::gateway::Hub;

/// How often the status line is refreshed (sent only when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Tells systemd (Type=notify) about our state, if it is listening: one or more
/// `KEY=VALUE` lines.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(socket) => socket,
        Err(e) => return tracing::warn!(error = %e, "sd_notify: cannot create a socket"),
    };
    let bytes = path.as_encoded_bytes();
    // A leading '@' names a socket in the abstract namespace.
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `RELOADING=1` with the monotonic time systemd (`Type=notify-reload`) wants
/// with it.
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
}

/// The status line `systemctl status` shows: what is served and to how many.
pub fn status_line(hub: &Hub) -> String {
    let upstreams = hub.upstreams();
    let connected = upstreams
        .iter()
        .filter(|vm| vm.upstream.info().connected)
        .count();
    let listeners: usize = upstreams.iter().map(|vm| vm.listeners().len()).sum();
    let clients: u64 = upstreams
        .iter()
        .map(|vm| vm.metrics.clients_connected.load(Ordering::Relaxed))
        .sum();
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "{} ({connected} connected), {}, {}",
        plural(upstreams.len() as u64, "upstream", "upstreams"),
        plural(listeners as u64, "listener", "listeners"),
        plural(clients, "client", "clients"),
    )
}

/// Keeps systemd's status line current until `stop`; does nothing without a
/// service manager.
pub async fn report_status(hub: Arc<Hub>, stop: CancellationToken) {
    if !enabled() {
        return;
    }
    // READY=1 came with the line as it is now.
    let mut last = status_line(&hub);
    let mut every =
        tokio::time::interval_at(tokio::time::Instant::now() + STATUS_EVERY, STATUS_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let line = status_line(&hub);
        if line != last {
            notify(&format!("STATUS={line}"));
            last = line;
        }
    }
}
