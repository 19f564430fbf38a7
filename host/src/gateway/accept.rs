//! Accepting clients: the peer check, the caps on clients and handshakes (and a
//! word to those turned away), the TLS handshake, then a session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use qmpgate_protocol::chardev::{Access, MonitorMode, Peer};
use qmpgate_protocol::qmp;

use crate::io::{Listener, Stream, tls};
use crate::session;

/// A listener being accepted on: the session context its clients get, and what
/// the gateway checks before a session starts.
pub(super) struct Listening {
    /// What each of its sessions runs on.
    pub(super) session: Arc<session::Context>,
    /// Set for `tls-creds=` listeners: the handshake comes before the session.
    pub(super) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Which peers it serves (`uids=`/`gids=`; by default, anyone who can connect).
    pub(super) access: Access,
    /// Its clients ([`session::Admission::max_clients`]).
    pub(super) clients: Arc<tokio::sync::Semaphore>,
    /// Its TLS handshakes in progress ([`session::Admission::max_handshakes`]).
    pub(super) handshakes: Arc<tokio::sync::Semaphore>,
    /// Where its sessions run, and when they stop: its VM's task tracker and
    /// shutdown token.
    pub(super) tracker: TaskTracker,
    pub(super) shutdown: CancellationToken,
    /// Client ids, unique in the process.
    pub(super) next_client: Arc<AtomicU64>,
}

/// A client's places: in the process's connection budget, in its listener's
/// clients and, during a TLS handshake, in its listener's handshakes.
struct Admitted {
    _connection: tokio::sync::OwnedSemaphorePermit,
    _client: tokio::sync::OwnedSemaphorePermit,
    handshake: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Takes a new client's places, or says why there are none (logged, counted).
fn admit(ctx: &Listening, peer: &Peer) -> Option<Admitted> {
    let refused = |why: &str| {
        ctx.session
            .metrics
            .refused_clients
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(listener = %ctx.session.id, ?peer, "client refused: {why}");
        None
    };
    let Ok(client) = ctx.clients.clone().try_acquire_owned() else {
        return refused(&format!(
            "the listener serves {} clients already",
            ctx.session.limits.admission.max_clients
        ));
    };
    let handshake = match &ctx.tls {
        None => None,
        Some(_) => match ctx.handshakes.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                return refused(&format!(
                    "{} TLS handshakes are in progress on the listener already",
                    ctx.session.limits.admission.max_handshakes
                ));
            }
        },
    };
    let Ok(connection) = ctx.session.limits.connections.clone().try_acquire_owned() else {
        return refused("qmpgate holds as many connections as its fd limit allows");
    };
    Some(Admitted {
        _connection: connection,
        _client: client,
        handshake,
    })
}

/// Closes a refused client's connection; a plaintext one is told why first, as
/// QEMU tells a client it cannot serve (best effort: the socket is not waited on).
fn refuse(ctx: &Listening, stream: Stream) {
    if ctx.tls.is_some() {
        return;
    }
    let message = format!(
        "qmpgate cannot take more clients on listener '{}' now; try again later",
        ctx.session.id
    );
    let bytes = match ctx.session.mode {
        MonitorMode::Control => {
            qmp::encode(&qmp::error_response(&qmp::QmpError::generic(message), None))
        }
        MonitorMode::Readline => format!("Error: {message}\r\n").into_bytes(),
    };
    stream.try_write_once(&bytes);
}

pub(super) async fn accept_loop(listener: Listener, ctx: Arc<Listening>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) if ctx.access.restricts_peers() && !ctx.access.lists(&peer) => {
                // Not one of the listed uids/gids: no greeting, no session.
                tracing::warn!(listener = %ctx.session.id, ?peer, "client refused: not in the listener's uids=/gids=");
                drop(stream);
            }
            Ok((stream, peer)) => {
                let Some(admitted) = admit(&ctx, &peer) else {
                    refuse(&ctx, stream);
                    continue;
                };
                let id = ctx.next_client.fetch_add(1, Ordering::Relaxed);
                ctx.session
                    .metrics
                    .clients_total
                    .fetch_add(1, Ordering::Relaxed);
                let shutdown = ctx.shutdown.clone();
                let ctx = ctx.clone();
                // The handshake runs in the client's own task: a slow one holds nobody up.
                ctx.tracker.clone().spawn(async move {
                    let mut admitted = admitted;
                    let (stream, identity) = match &ctx.tls {
                        None => (stream, None),
                        Some(acceptor) => {
                            let timeout = ctx.session.limits.admission.handshake_timeout;
                            match tls::accept(acceptor, stream, timeout).await {
                                Ok(accepted) => accepted,
                                Err(e) => {
                                    tracing::warn!(listener = %ctx.session.id, ?peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                            }
                        }
                    };
                    // Handshake done: the place in the handshakes goes back.
                    admitted.handshake = None;
                    session::serve(stream, peer, identity, id, ctx.session.clone(), shutdown).await;
                    drop(admitted);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                tracing::error!(listener = %ctx.session.id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
