//! The status endpoint: read-only HTTP (axum) on a chardev-style address.
//!
//! - `GET /healthz`: `200 ok` while every QEMU is connected, `503` otherwise
//!   (`?upstream=ID` asks about one);
//! - `GET /status`: JSON: every upstream (QEMU's version and run state, its policy,
//!   listeners and counters), every chardev with its origin, every client with its
//!   peer credentials, every plugin chain with its counters and hook latency;
//! - `GET /metrics`: the same counters in Prometheus text format, totals and per
//!   upstream;
//! - `GET /events?upstream=ID`: one QEMU's events as a server-sent event stream
//!   (`upstream` may be left out when there is one).
//!
//! Nothing here changes state, so it needs no authentication; bind it where only
//! monitoring can reach it (a unix socket, or an inherited fd).
//!
//! Layout: [`Registry`] (who is connected, how QEMU ended), [`serve`], the
//! handlers, and the renderers [`status_json`] and [`metrics_text`].

use qmpgate_protocol::lock;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use serde_json::{Value, json};

use qmpgate_protocol::chardev::Peer;

use crate::gateway::{Hub, Vm};
use crate::io::Listener;

/// Serves the status endpoint until the gateway shuts down.
///
/// Its own accept loop rather than `axum::serve`, for the caps (see
/// [`crate::gateway::Admission`]): at most `status_connections` at once (more are
/// closed at once), request headers within `status_header_timeout`, one request
/// per connection (an idle keep-alive connection would hold a place), and a
/// client that stops reading a response is dropped after the write timeout.
pub async fn serve(listener: Listener, hub: Arc<Hub>) {
    let admission = hub.limits().admission.clone();
    let subscribers = SseSlots(Arc::new(tokio::sync::Semaphore::new(
        admission.status_subscribers,
    )));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .layer(axum::Extension(subscribers))
        .with_state(hub.clone());
    let connections = Arc::new(tokio::sync::Semaphore::new(admission.status_connections));
    let shutdown = hub.shutdown_token();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!(error = %e, "status accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(place) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = admission.status_connections,
                "status request refused: too many connections"
            );
            continue;
        };
        let Ok(fd) = hub.limits().connections.clone().try_acquire_owned() else {
            tracing::warn!(
                "status request refused: qmpgate holds as many connections as its fd limit allows"
            );
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(admission.status_header_timeout)
            .keep_alive(false);
        let io = hyper_util::rt::TokioIo::new(WriteDeadline::new(stream));
        let connection = builder.serve_connection(io, service);
        let shutdown = shutdown.clone();
        hub.spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "status connection ended");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
            drop((place, fd));
        });
    }
    drop(listener);
}

/// Places for `/events` streams ([`crate::gateway::Admission::status_subscribers`]).
#[derive(Clone)]
struct SseSlots(Arc<tokio::sync::Semaphore>);

/// A stream whose writes must make progress: one that stays blocked for
/// [`crate::session::WRITE_TIMEOUT`] fails, so a client that does not read
/// cannot hold a connection (an `/events` stream, a large `/metrics`) forever.
struct WriteDeadline<S> {
    inner: S,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S) -> Self {
        WriteDeadline {
            inner,
            stalled: None,
        }
    }

    /// After a write that could not proceed: fails once it has been stuck too long.
    fn check(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(crate::session::WRITE_TIMEOUT)));
        match stalled.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write(cx, buf) {
            std::task::Poll::Pending => self.check(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_flush(cx) {
            std::task::Poll::Pending => self.check(cx).map_ok(|_| ()),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The value of `key` in a query string.
fn query<'a>(uri: &'a axum::http::Uri, key: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

async fn healthz(State(hub): State<Arc<Hub>>, uri: axum::http::Uri) -> Response {
    let upstreams = match query(&uri, "upstream") {
        Some(id) => match hub.upstream(id) {
            Some(shared) => vec![shared],
            None => {
                return (StatusCode::NOT_FOUND, format!("no upstream '{id}'\n")).into_response();
            }
        },
        None => hub.upstreams(),
    };
    let away: Vec<&str> = upstreams
        .iter()
        .filter(|u| !u.upstream.info().connected)
        .map(|u| u.upstream_spec.id.as_str())
        .collect();
    match (away.as_slice(), upstreams.len()) {
        ([], _) => (StatusCode::OK, "ok\n").into_response(),
        (_, 1) => (StatusCode::SERVICE_UNAVAILABLE, "QEMU is not connected\n").into_response(),
        (away, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("QEMU is not connected on upstreams: {}\n", away.join(", ")),
        )
            .into_response(),
    }
}

async fn status(State(hub): State<Arc<Hub>>) -> Response {
    axum::Json(status_json(&hub)).into_response()
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics_text(&hub),
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
    State(hub): State<Arc<Hub>>,
    axum::Extension(SseSlots(slots)): axum::Extension<SseSlots>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    match hub.pick(query(&uri, "upstream")) {
        Ok(shared) => {
            let Ok(place) = slots.clone().try_acquire_owned() else {
                let message = format!(
                    "qmpgate serves {} event streams already; try again later\n",
                    hub.limits().admission.status_subscribers
                );
                return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
            };
            let since = query(&uri, "since")
                .or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok()))
                .and_then(|s| s.parse::<u64>().ok());
            event_stream(&shared, since, place).into_response()
        }
        Err(reason) => (StatusCode::NOT_FOUND, format!("{reason}\n")).into_response(),
    }
}

/// One upstream's events after `since` (history first), then live ones.
/// The stream holds `place` (its place among the subscribers) while it lives.
fn event_stream(
    shared: &Vm,
    since: Option<u64>,
    place: tokio::sync::OwnedSemaphorePermit,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    // Subscribe before reading the history, so nothing falls between the two.
    let rx = shared.upstream.subscribe();
    let backlog = since
        .map(|s| shared.upstream.events_since(s))
        .unwrap_or_default();
    let last = backlog.last().map(|e| e.seq).or(since).unwrap_or(0);
    let replay = futures_util::stream::iter(backlog.into_iter().map(|e| Ok(sse_event(&e))));
    let live = futures_util::stream::unfold((rx, place), move |(mut rx, place)| async move {
        loop {
            match rx.recv().await {
                Ok(event) if event.seq <= last => continue,
                Ok(event) => return Some((Ok(sse_event(&event)), (rx, place))),
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

/// An upstream counter: its key in `/status`, its metric's name, type and help, and
/// how to read it. Both documents come from this one table.
struct Counter {
    key: &'static str,
    metric: &'static str,
    kind: &'static str,
    help: &'static str,
    read: fn(&Vm) -> u64,
}

const COUNTERS: [Counter; 8] = [
    Counter {
        key: "clients_connected",
        metric: "qmpgate_clients_connected",
        kind: "gauge",
        help: "Clients connected now.",
        read: |s| s.metrics.clients_connected.load(Ordering::Relaxed),
    },
    Counter {
        key: "clients_total",
        metric: "qmpgate_clients_total",
        kind: "counter",
        help: "Clients accepted since start.",
        read: |s| s.metrics.clients_total.load(Ordering::Relaxed),
    },
    Counter {
        key: "commands",
        metric: "qmpgate_messages_total",
        kind: "counter",
        help: "Messages received from clients.",
        read: |s| s.metrics.commands.load(Ordering::Relaxed),
    },
    Counter {
        key: "denied",
        metric: "qmpgate_denied_total",
        kind: "counter",
        help: "Commands refused by a plugin.",
        read: |s| s.metrics.denied.load(Ordering::Relaxed),
    },
    Counter {
        key: "late_replies_discarded",
        metric: "qmpgate_late_replies_discarded_total",
        kind: "counter",
        help: "QEMU replies that came after their client stopped waiting.",
        read: |s| s.upstream.discarded_replies(),
    },
    Counter {
        key: "slow_clients",
        metric: "qmpgate_slow_clients_total",
        kind: "counter",
        help: "Clients disconnected for not reading.",
        read: |s| s.metrics.slow_clients.load(Ordering::Relaxed),
    },
    Counter {
        key: "faulting_clients",
        metric: "qmpgate_faulting_clients_total",
        kind: "counter",
        help: "Clients disconnected because their commands kept making plugins fail.",
        read: |s| s.metrics.faulting_clients.load(Ordering::Relaxed),
    },
    Counter {
        key: "refused_clients",
        metric: "qmpgate_refused_clients_total",
        kind: "counter",
        help: "Connections refused by the caps on clients and TLS handshakes.",
        read: |s| s.metrics.refused_clients.load(Ordering::Relaxed),
    },
];

/// The counters of `upstreams`, summed, as a `/status` object.
fn counters_json(upstreams: &[Arc<Vm>]) -> Value {
    Value::Object(
        COUNTERS
            .iter()
            .map(|c| {
                let total: u64 = upstreams.iter().map(|u| (c.read)(u)).sum();
                (c.key.to_string(), Value::from(total))
            })
            .collect(),
    )
}

/// The `/status` document.
pub fn status_json(hub: &Hub) -> Value {
    let upstreams = hub.upstreams();
    let mut chardevs = Vec::new();
    let mut clients = Vec::new();
    let mut per_upstream = Vec::new();
    for shared in &upstreams {
        let info = shared.upstream.info();
        let spec = &shared.upstream_spec;
        let address = spec.address.to_string();
        chardevs.push(json!({
            "id": spec.id,
            "role": "upstream",
            "origin": origin(&address),
            "address": address,
        }));
        let listeners = shared.listeners();
        for l in &listeners {
            chardevs.push(json!({
                "id": l.id,
                "role": "listener",
                "upstream": spec.id,
                "origin": origin(&l.address),
                "address": l.address,
                "bound": l.bound,
                "policy": l.policy.as_ref().map(ToString::to_string),
            }));
        }
        clients.extend(
            lock::mutex(&shared.registry.clients)
                .iter()
                .map(|(id, c)| json!({ "id": id, "upstream": spec.id, "listener": c.listener, "peer": peer_json(&c.peer), "connected_since": c.since })),
        );
        per_upstream.push(json!({
            "id": spec.id,
            "policy": spec.policy.to_string(),
            "chain": shared.chain().describe(),
            "connected": info.connected,
            "lost": info.lost,
            "qemu": info.version,
            "run_state": info.run_state,
            "oob": info.oob,
            "exit": *lock::mutex(&shared.registry.qemu_exit),
            "listeners": listeners.iter().map(|l| l.id.clone()).collect::<Vec<_>>(),
            "counters": counters_json(std::slice::from_ref(shared)),
        }));
    }
    for (id, role, address) in hub.services() {
        chardevs.push(
            json!({ "id": id, "role": role, "origin": origin(&address), "address": address }),
        );
    }
    clients.sort_by_key(|c| c["id"].as_u64());
    let mut plugins = Vec::new();
    for (chain, _, users) in hub.chains_in_use() {
        for p in chain.plugins() {
            let s = &p.stats;
            let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            plugins.push(json!({
                "name": &*p.name,
                "upstreams": users,
                "calls": load(&s.calls),
                "denials": load(&s.denials),
                "traps": load(&s.traps),
                "deadline_kills": load(&s.deadline_kills),
                "memory_kills": load(&s.memory_kills),
                "restarts": load(&s.restarts),
                "disabled_calls": load(&s.disabled_calls),
                "log_dropped": load(&s.log_dropped),
                "audit_dropped": load(&s.audit_dropped),
                "memory_high_water_bytes": load(&s.memory_high_water),
                "latency_us": { "p50": s.latency_quantile_us(0.5), "p99": s.latency_quantile_us(0.99) },
            }));
        }
    }
    json!({
        "qmpgate": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": hub.started().elapsed().as_secs(),
        },
        "upstreams": per_upstream,
        "chardevs": chardevs,
        "clients": clients,
        "plugins": plugins,
        "counters": counters_json(&upstreams),
    })
}

/// The `/metrics` document (Prometheus text format 0.0.4): totals, then the same per
/// upstream (label `upstream`), then per plugin (labels `plugin`, and `policy` for
/// the chain it runs in).
pub fn metrics_text(hub: &Hub) -> String {
    let mut out = String::new();
    let upstreams = hub.upstreams();
    let _ = writeln!(
        out,
        "# HELP qmpgate_upstreams Upstreams served.\n# TYPE qmpgate_upstreams gauge\nqmpgate_upstreams {}",
        upstreams.len()
    );
    let _ = writeln!(
        out,
        "# HELP qmpgate_upstream_connected Whether QEMU is connected.\n# TYPE qmpgate_upstream_connected gauge"
    );
    for u in &upstreams {
        let _ = writeln!(
            out,
            "qmpgate_upstream_connected{{upstream=\"{}\"}} {}",
            escape_label(&u.upstream_spec.id),
            u.upstream.info().connected as u64
        );
    }
    for Counter {
        metric: name,
        kind,
        help,
        read,
        ..
    } in &COUNTERS
    {
        let total: u64 = upstreams.iter().map(|u| read(u)).sum();
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {total}"
        );
        for u in &upstreams {
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{}\"}} {}",
                escape_label(&u.upstream_spec.id),
                read(u)
            );
        }
    }
    // A chain is named by the policy of the upstreams that share it.
    let chains: Vec<(qmpgate_plugin_host::PluginChain, String)> = hub
        .chains_in_use()
        .into_iter()
        .map(|(chain, policy, _)| (chain, escape_label(&policy.to_string())))
        .collect();
    let per_plugin: [PerPlugin; 10] = [
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
            "qmpgate_plugin_log_dropped_total",
            "counter",
            "Log messages dropped over the plugin's rate limit.",
            |s| s.log_dropped.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_audit_dropped_total",
            "counter",
            "Audit records dropped over the per-call limit.",
            |s| s.audit_dropped.load(Ordering::Relaxed),
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
        for (chain, policy) in &chains {
            for p in chain.plugins() {
                let _ = writeln!(
                    out,
                    "{name}{{plugin=\"{}\",policy=\"{policy}\"}} {}",
                    escape_label(&p.name),
                    read(&p.stats)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP qmpgate_plugin_hook_seconds Hook latency.\n# TYPE qmpgate_plugin_hook_seconds histogram"
    );
    for (p, policy) in chains
        .iter()
        .flat_map(|(chain, policy)| chain.plugins().iter().map(move |p| (p, policy)))
    {
        let labels = format!("plugin=\"{}\",policy=\"{policy}\"", escape_label(&p.name));
        let mut cumulative = 0;
        for (i, bucket) in p.stats.latency.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = (1u64 << i) as f64 / 1e6;
            let _ = writeln!(
                out,
                "qmpgate_plugin_hook_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "qmpgate_plugin_hook_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
        );
        let sum = p.stats.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "qmpgate_plugin_hook_seconds_sum{{{labels}}} {sum}");
        let _ = writeln!(
            out,
            "qmpgate_plugin_hook_seconds_count{{{labels}}} {cumulative}"
        );
    }
    out
}

/// A per-plugin metric: name, type, help, and how to read it.
type PerPlugin = (
    &'static str,
    &'static str,
    &'static str,
    fn(&qmpgate_plugin_host::PluginStats) -> u64,
);

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
