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
//! Layout: [`serve`] and the handlers here; the renderers [`status_json`] and
//! [`metrics_text`] in `render`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use serde_json::Value;

use crate::gateway::{Hub, Vm};
use crate::io::Listener;

mod render;

pub use render::{metrics_text, status_json};

/// Serves the status endpoint until the gateway shuts down.
///
/// Its own accept loop rather than `axum::serve`, for the caps (see
/// [`crate::session::Admission`]): at most `status_connections` at once (more are
/// closed at once), request headers within `status_header_timeout`, one request
/// per connection (an idle keep-alive connection would hold a place), and a
/// client that stops reading a response is dropped after the write timeout.
pub async fn serve(listener: Listener, hub: Arc<Hub>) {
    let admission = hub.limits().admission.clone();
    let write_timeout = hub.limits().write_timeout;
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
        let io = hyper_util::rt::TokioIo::new(WriteDeadline::new(stream, write_timeout));
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
/// [`crate::session::SessionLimits::write_timeout`] fails, so a client that does not read
/// cannot hold a connection (an `/events` stream, a large `/metrics`) forever.
struct WriteDeadline<S> {
    inner: S,
    /// How long a write may stay blocked.
    timeout: std::time::Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, timeout: std::time::Duration) -> Self {
        WriteDeadline {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// After a write that could not proceed: fails once it has been stuck too long.
    fn check(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
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
