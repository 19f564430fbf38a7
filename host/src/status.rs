//! The status endpoint: read-only HTTP (axum) on a chardev-style address.
//!
//! - `GET /healthz`: `200 ok` while QEMU is connected, `503` otherwise;
//! - `GET /status`: JSON: the upstream (QEMU's version and run state), every
//!   chardev with its origin, every client with its peer credentials, every plugin
//!   with its counters and hook latency;
//! - `GET /metrics`: the same counters in Prometheus text format;
//! - `GET /events`: QEMU's events as a server-sent event stream.
//!
//! Nothing here changes state, so it needs no authentication; bind it where only
//! monitoring can reach it (a unix socket, or an inherited fd).
//!
//! Layout: [`Registry`] (who is connected, how QEMU ended), [`serve`], the
//! handlers, and the renderers [`status_json`] and [`metrics_text`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use serde_json::{Value, json};

use crate::chardev::{Listener, Peer};
use crate::gateway::Shared;

/// Connected clients and how QEMU ended, for status.
#[derive(Debug)]
pub struct Registry {
    started: Instant,
    clients: Mutex<BTreeMap<u64, ClientEntry>>,
    qemu_exit: Mutex<Option<String>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            started: Instant::now(),
            clients: Mutex::new(BTreeMap::new()),
            qemu_exit: Mutex::new(None),
        }
    }
}

#[derive(Debug, Clone)]
struct ClientEntry {
    listener: String,
    peer: Peer,
    since: u64,
}

/// Removes a client from the registry when its session ends.
pub struct ClientGuard {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.registry
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Registry {
    /// Records a connected client until the guard is dropped.
    pub fn client(self: &Arc<Self>, id: u64, listener: &str, peer: &Peer) -> ClientGuard {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                ClientEntry {
                    listener: listener.to_string(),
                    peer: peer.clone(),
                    since,
                },
            );
        ClientGuard {
            registry: self.clone(),
            id,
        }
    }

    /// Records how QEMU exited (`qmpgate run`).
    pub fn set_qemu_exit(&self, description: String) {
        *self.qemu_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(description);
    }
}

/// Serves the status endpoint until the gateway shuts down.
pub async fn serve(listener: Listener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .with_state(shared.clone());
    let shutdown = shared.shutdown_token();
    let stop = async move { shutdown.cancelled().await };
    let result = match listener {
        Listener::Unix { listener, unlink } => {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await;
            drop(unlink);
            result
        }
        Listener::Tcp(listener) => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "status endpoint failed");
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.upstream.info().connected {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "QEMU is not connected\n").into_response()
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(status_json(&shared)).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics_text(&shared),
    )
        .into_response()
}

/// An SSE message for an event; its `id` is the event's sequence number, so a
/// client that reconnects with `Last-Event-ID` (or `?since=`) misses nothing.
fn sse_event(event: &crate::upstream::UpstreamEvent) -> Event {
    let name = event
        .body
        .get("event")
        .and_then(Value::as_str)
        .unwrap_or("event");
    Event::default()
        .id(event.seq.to_string())
        .event(name)
        .data(Value::Object(event.body.clone()).to_string())
}

async fn events(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let since = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("since=")))
        .or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok()))
        .and_then(|s| s.parse::<u64>().ok());
    // Subscribe before reading the history, so nothing falls between the two.
    let rx = shared.upstream.subscribe();
    let backlog = since
        .map(|s| shared.upstream.events_since(s))
        .unwrap_or_default();
    let last = backlog.last().map(|e| e.seq).or(since).unwrap_or(0);
    let replay = futures_util::stream::iter(backlog.into_iter().map(|e| Ok(sse_event(&e))));
    let live = futures_util::stream::unfold(rx, move |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(event) if event.seq <= last => continue,
                Ok(event) => return Some((Ok(sse_event(&event)), rx)),
                // A slow reader misses events rather than holding memory.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(futures_util::StreamExt::chain(replay, live)).keep_alive(KeepAlive::default())
}

fn peer_json(peer: &Peer) -> Value {
    match peer {
        Peer::Unix { pid, uid, gid } => json!({ "unix": { "pid": pid, "uid": uid, "gid": gid } }),
        Peer::Inet(address) => json!({ "inet": address }),
        Peer::Unknown => Value::Null,
    }
}

/// How a chardev address came to qmpgate, for status.
fn origin(address: &str) -> &'static str {
    match address.split('=').next().unwrap_or("") {
        "path" => "path",
        "host" => "tcp",
        "systemd" => "systemd",
        // A number came from the command line; anything else is a getfd name.
        "fd" if address[3..].parse::<i32>().is_ok() => "inherited-fd",
        "fd" => "named-fd",
        _ => "other",
    }
}

/// The `/status` document.
pub fn status_json(shared: &Shared) -> Value {
    let info = shared.upstream.info();
    let registry = &shared.registry;
    let upstream_address = shared.upstream_spec.address.to_string();
    let mut chardevs = vec![json!({
        "id": shared.upstream_spec.id,
        "role": "upstream",
        "origin": origin(&upstream_address),
        "address": upstream_address,
    })];
    for l in shared.listeners() {
        chardevs.push(json!({
            "id": l.id,
            "role": "listener",
            "origin": origin(&l.address),
            "address": l.address,
            "bound": l.bound,
        }));
    }
    for (id, role, address) in shared.services() {
        chardevs.push(
            json!({ "id": id, "role": role, "origin": origin(&address), "address": address }),
        );
    }
    let clients: Vec<Value> = registry
        .clients
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(id, c)| json!({ "id": id, "listener": c.listener, "peer": peer_json(&c.peer), "connected_since": c.since }))
        .collect();
    let plugins: Vec<Value> = shared
        .chain()
        .plugins()
        .iter()
        .map(|p| {
            let s = &p.stats;
            let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            json!({
                "name": &*p.name,
                "calls": load(&s.calls),
                "denials": load(&s.denials),
                "traps": load(&s.traps),
                "deadline_kills": load(&s.deadline_kills),
                "memory_kills": load(&s.memory_kills),
                "restarts": load(&s.restarts),
                "disabled_calls": load(&s.disabled_calls),
                "memory_high_water_bytes": load(&s.memory_high_water),
                "latency_us": { "p50": s.latency_quantile_us(0.5), "p99": s.latency_quantile_us(0.99) },
            })
        })
        .collect();
    let m = &shared.metrics;
    json!({
        "qmpgate": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": registry.started.elapsed().as_secs(),
        },
        "upstream": {
            "id": shared.upstream_spec.id,
            "connected": info.connected,
            "qemu": info.version,
            "run_state": info.run_state,
            "oob": info.oob,
            "exit": *registry.qemu_exit.lock().unwrap_or_else(|e| e.into_inner()),
        },
        "chardevs": chardevs,
        "clients": clients,
        "plugins": plugins,
        "counters": {
            "clients_connected": m.clients_connected.load(Ordering::Relaxed),
            "clients_total": m.clients_total.load(Ordering::Relaxed),
            "commands": m.commands.load(Ordering::Relaxed),
            "denied": m.denied.load(Ordering::Relaxed),
            "slow_clients": m.slow_clients.load(Ordering::Relaxed),
            "late_replies_discarded": shared.upstream.discarded_replies(),
        },
    })
}

/// The `/metrics` document (Prometheus text format 0.0.4).
pub fn metrics_text(shared: &Shared) -> String {
    let mut out = String::new();
    let m = &shared.metrics;
    let info = shared.upstream.info();
    let mut gauge = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        "qmpgate_upstream_connected",
        "gauge",
        "Whether QEMU is connected.",
        info.connected as u64,
    );
    gauge(
        "qmpgate_clients_connected",
        "gauge",
        "Clients connected now.",
        m.clients_connected.load(Ordering::Relaxed),
    );
    gauge(
        "qmpgate_clients_total",
        "counter",
        "Clients accepted since start.",
        m.clients_total.load(Ordering::Relaxed),
    );
    gauge(
        "qmpgate_messages_total",
        "counter",
        "Messages received from clients.",
        m.commands.load(Ordering::Relaxed),
    );
    gauge(
        "qmpgate_denied_total",
        "counter",
        "Commands refused by a plugin.",
        m.denied.load(Ordering::Relaxed),
    );
    gauge(
        "qmpgate_late_replies_discarded_total",
        "counter",
        "QEMU replies that came after their client stopped waiting.",
        shared.upstream.discarded_replies(),
    );
    gauge(
        "qmpgate_slow_clients_total",
        "counter",
        "Clients disconnected for not reading.",
        m.slow_clients.load(Ordering::Relaxed),
    );
    let chain = shared.chain();
    let plugins = chain.plugins();
    let per_plugin: [PerPlugin; 8] = [
        (
            "qmpgate_plugin_calls_total",
            "counter",
            "Hook calls.",
            |s| s.calls.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_denials_total",
            "counter",
            "Commands denied.",
            |s| s.denials.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_traps_total",
            "counter",
            "Hook calls that trapped.",
            |s| s.traps.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_deadline_kills_total",
            "counter",
            "Hook calls stopped by the CPU deadline.",
            |s| s.deadline_kills.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_memory_kills_total",
            "counter",
            "Hook calls stopped by the memory cap.",
            |s| s.memory_kills.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_restarts_total",
            "counter",
            "Instances recreated after a fault.",
            |s| s.restarts.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_disabled_calls_total",
            "counter",
            "Calls refused after the plugin used up its restart budget.",
            |s| s.disabled_calls.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_memory_high_water_bytes",
            "gauge",
            "Largest linear memory of an instance.",
            |s| s.memory_high_water.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, read) in per_plugin {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in plugins {
            let _ = writeln!(
                out,
                "{name}{{plugin=\"{}\"}} {}",
                escape_label(&p.name),
                read(&p.stats)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP qmpgate_plugin_hook_seconds Hook latency.\n# TYPE qmpgate_plugin_hook_seconds histogram"
    );
    for p in plugins {
        let label = escape_label(&p.name);
        let mut cumulative = 0;
        for (i, bucket) in p.stats.latency.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = (1u64 << i) as f64 / 1e6;
            let _ = writeln!(
                out,
                "qmpgate_plugin_hook_seconds_bucket{{plugin=\"{label}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "qmpgate_plugin_hook_seconds_bucket{{plugin=\"{label}\",le=\"+Inf\"}} {cumulative}"
        );
        let sum = p.stats.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "qmpgate_plugin_hook_seconds_sum{{plugin=\"{label}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "qmpgate_plugin_hook_seconds_count{{plugin=\"{label}\"}} {cumulative}"
        );
    }
    out
}

/// A per-plugin metric: name, type, help, and how to read it.
type PerPlugin = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::plugin::PluginStats) -> u64,
);

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
