//! The upstream: qmpgate's one QMP session with QEMU.
//!
//! QEMU serves one client per monitor; qmpgate is that client and multiplexes its
//! own clients over it. The upstream task owns the socket. Sessions submit commands
//! through an [`UpstreamHandle`]; the task gives each a gateway-unique id (so replies
//! can be routed whatever id the client chose), sends it, and hands the reply back on
//! the submitter's oneshot channel. Events go to every session through a broadcast
//! channel.
//!
//! QEMU runs in-band commands one at a time and, with OOB enabled, queues at most
//! eight; the task keeps at most [`MAX_IN_FLIGHT`] in-band commands outstanding and
//! lets the rest wait in a bounded channel (back-pressure reaches the clients).
//!
//! When the link drops, every pending command gets a QMP error, sessions get a
//! `QMPGATE_UPSTREAM_LOST` event, and the task reconnects after `reconnect_ms` (like
//! QEMU's `reconnect-ms`) or ends, which stops the gateway.
//!
//! Layout: [`connect`] opens and negotiates (`negotiation`); [`UpstreamHandle`]
//! is the sessions' side; `link::LinkTask` is the task that owns the socket;
//! [`EventLog`] numbers and keeps events; [`RoundTrips`] times QEMU's answers.

use qmpgate_protocol::lock;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use qmpgate_protocol::chardev::ChardevSpec;

use crate::io::{FdTable, SocketError};
use qmpgate_protocol::qmp::{self, Answer, Command, QmpError};
use qmpgate_protocol::schema::QmpSchema;

/// QEMU's own limit on queued in-band commands with OOB enabled
/// (`QMP_REQ_QUEUE_LEN_MAX`); without OOB it runs one at a time anyway.
pub const MAX_IN_FLIGHT: usize = 8;

/// The default of [`Liveness::greeting`] (`--greeting-timeout-ms`), 10 s: how long
/// QEMU may take to accept the connection and greet us. A QEMU that accepts but
/// never greets is almost always serving another client on that monitor (it serves
/// one at a time); a live QEMU greets in milliseconds, even on a loaded host.
pub const DEFAULT_GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// The default of [`Liveness::negotiation`] (`--negotiation-timeout-ms`), 10 s: how
/// long QEMU may take to answer each step of the negotiation that follows its
/// greeting (`qmp_capabilities`, `query-status`, `query-qmp-schema`): milliseconds
/// normally.
pub const DEFAULT_NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered per session before a session that does not keep up is cut off.
const EVENT_BUFFER: usize = 1024;

/// QEMU's messages are small; its replies to big queries reach a few MiB.
const MAX_UPSTREAM_MESSAGE: usize = 64 << 20;

/// How qmpgate notices a QEMU that does not answer. While connecting: one that
/// never greets, or stalls in the negotiation (each step has its deadline, so
/// start-up, `chardev-add` and reconnects cannot hang). Once connected: one that
/// keeps its link open but stopped answering (stopped, wedged, or its monitor
/// chardev taken over from inside): after a quiet
/// period with nothing outstanding it sends a cheap `query-status`; if QEMU says
/// nothing before the deadline, the link counts as lost (clients get
/// `QMPGATE_UPSTREAM_LOST` with the reason, pending commands an error). A command
/// that legitimately takes long is never mistaken for silence: the probe goes out
/// only when nothing else is outstanding, so it is answered first by a live QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Quiet time before a probe; `None` never probes.
    pub quiet: Option<Duration>,
    /// How long a probe may go unanswered.
    pub timeout: Duration,
    /// How long connecting and QEMU's greeting may take, each (a peer that drops
    /// SYNs, or a QEMU busy with another client); [`DEFAULT_GREETING_TIMEOUT`].
    pub greeting: Duration,
    /// How long QEMU may take to answer each negotiation step;
    /// [`DEFAULT_NEGOTIATION_TIMEOUT`].
    pub negotiation: Duration,
}

impl Default for Liveness {
    /// Probe after 10 s of quiet, give up after 10 s of silence: long enough that a
    /// busy host never trips it, short enough that an operator hears of a dead
    /// monitor before a client's own timeout would tell them. Connecting and the
    /// negotiation take [`DEFAULT_GREETING_TIMEOUT`] and
    /// [`DEFAULT_NEGOTIATION_TIMEOUT`].
    fn default() -> Self {
        Liveness {
            quiet: Some(Duration::from_secs(10)),
            timeout: Duration::from_secs(10),
            greeting: DEFAULT_GREETING_TIMEOUT,
            negotiation: DEFAULT_NEGOTIATION_TIMEOUT,
        }
    }
}

/// Errors establishing the upstream session.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// The socket could not be opened.
    #[error(transparent)]
    Chardev(#[from] SocketError),
    /// The connection was not established in time.
    #[error("connecting to QEMU's monitor did not complete within {0:?}")]
    ConnectTimeout(Duration),
    /// QEMU did not greet in time.
    #[error(
        "QEMU accepted the connection but sent no QMP greeting within {0:?}: is another client connected to its monitor?"
    )]
    NoGreeting(Duration),
    /// QEMU greeted but did not answer the negotiation in time.
    #[error("QEMU greeted but did not answer {step} within {timeout:?}")]
    NegotiationTimeout {
        /// The command QEMU did not answer.
        step: &'static str,
        /// The deadline.
        timeout: Duration,
    },
    /// QEMU closed the link during negotiation.
    #[error("QEMU closed the monitor connection during negotiation")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("QEMU sent something that is not QMP: {0}")]
    Protocol(String),
    /// QEMU refused `qmp_capabilities`.
    #[error("QEMU refused qmp_capabilities: {0}")]
    Negotiation(String),
    /// Reading or writing the socket failed.
    #[error("monitor socket")]
    Io(#[from] std::io::Error),
}

/// What sessions need to know about QEMU.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamInfo {
    /// QEMU's `version` object from its greeting.
    pub version: Value,
    /// Whether OOB is enabled upstream (so clients may negotiate it).
    pub oob: bool,
    /// Whether the link is up.
    pub connected: bool,
    /// QEMU's run state (`query-status`'s `status`), kept current from events.
    pub run_state: String,
    /// Why the link was last lost (`None` while it never was), for status.
    pub lost: Option<String>,
    /// QEMU's QMP schema, read at connect (and again at each reconnect: it may be
    /// another QEMU): commands QEMU does not have, or whose arguments do not fit,
    /// are answered by the gateway. `None` if QEMU gave none that could be read.
    pub schema: Option<SchemaRef>,
}

/// A shared, read-only QMP schema; equal when it is the same one.
#[derive(Debug, Clone)]
pub struct SchemaRef(pub Arc<QmpSchema>);

impl PartialEq for SchemaRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// An event from QEMU (or qmpgate's own `QMPGATE_*` events), in arrival order.
#[derive(Debug)]
pub struct UpstreamEvent {
    /// Position in the stream of everything QEMU sent (see [`Reply::seq`]).
    pub seq: u64,
    /// The event object (`event`, `data`, `timestamp`).
    pub body: Map<String, Value>,
    /// The event as written to clients, encoded by the first session that
    /// delivers it unchanged and shared by every other.
    encoded: std::sync::OnceLock<Vec<u8>>,
}

impl UpstreamEvent {
    /// Event number `seq`.
    pub fn new(seq: u64, body: Map<String, Value>) -> Self {
        UpstreamEvent {
            seq,
            body,
            encoded: std::sync::OnceLock::new(),
        }
    }

    /// The event's bytes on the wire (QEMU's encoding, CRLF-terminated), encoded
    /// once for every client that gets it unchanged.
    pub fn encoded(&self) -> &[u8] {
        self.encoded.get_or_init(|| qmp::encode_object(&self.body))
    }
}

mod events;
mod latency;
mod link;
mod negotiation;

pub use events::EventLog;
pub use latency::RoundTrips;
use link::LinkTask;
use negotiation::open;

/// QEMU's reply to one command.
#[derive(Debug)]
pub struct Reply {
    /// Position in the stream of everything QEMU sent. Sessions use it to keep
    /// QEMU's order between a reply and the events around it (QEMU sends
    /// `SHUTDOWN` before the reply to `quit`), which travel on different channels.
    pub seq: u64,
    /// `{"return": ...}` or `{"error": ...}`, without `id`.
    pub body: Answer,
}

/// A submitted command, waiting for QEMU's reply.
struct Submit {
    command: Command,
    /// Fds sent with it (SCM_RIGHTS), for `getfd` and `add-fd`; closed here once
    /// QEMU has them, or if the command is never sent.
    fds: Vec<OwnedFd>,
    /// Receives the reply. Closed when the submitter stopped waiting (its
    /// deadline passed, or the client left): the command is then not sent at all.
    reply: oneshot::Sender<Reply>,
}

/// QEMU's answer to a submitted command, once it comes.
pub struct PendingReply(oneshot::Receiver<Reply>);

impl PendingReply {
    /// Waits for the reply; a lost link becomes a QMP error reply.
    pub async fn reply(self) -> Reply {
        self.0.await.unwrap_or_else(|_| Reply {
            seq: 0,
            body: lost("qmpgate lost the connection to QEMU before it replied"),
        })
    }
}

/// The sessions' side of the upstream. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamHandle {
    /// The upstream's chardev id, for messages.
    id: Arc<str>,
    in_band: mpsc::Sender<Submit>,
    oob: mpsc::Sender<Submit>,
    info: watch::Receiver<UpstreamInfo>,
    /// Replies that came after their client stopped waiting (timeout or gone).
    discarded: Arc<AtomicU64>,
    /// How long QEMU takes to answer.
    round_trips: Arc<RoundTrips>,
    /// Events, numbered and kept.
    log: Arc<EventLog>,
}

impl UpstreamHandle {
    /// Queues a command for QEMU. Commands one caller submits reach QEMU in the
    /// order submitted. Waits while the queue is full: callers put a deadline on it.
    /// A command whose [`PendingReply`] is dropped before it is sent is never sent.
    pub async fn submit(&self, command: Command) -> PendingReply {
        self.submit_with_fds(command, Vec::new()).await
    }

    /// [`submit`](Self::submit), with fds that travel to QEMU with the command
    /// (`getfd`, `add-fd`). At most one command with fds is in QEMU at a time:
    /// QEMU keeps the latest fds it read until a command takes them, so a second
    /// one read early would replace the first's.
    pub async fn submit_with_fds(&self, command: Command, fds: Vec<OwnedFd>) -> PendingReply {
        let (tx, rx) = oneshot::channel();
        let queue = if command.oob {
            &self.oob
        } else {
            &self.in_band
        };
        if let Err(mpsc::error::SendError(submit)) = queue
            .send(Submit {
                command,
                fds,
                reply: tx,
            })
            .await
        {
            // The upstream is no longer served (removed, or the gateway stops).
            let body = not_sent(&self.id, &submit.command.name);
            let _ = submit.reply.send(Reply { seq: 0, body });
        }
        PendingReply(rx)
    }

    /// Sends a command and waits for QEMU's reply. Never fails: a lost link becomes
    /// a QMP error reply, as the client would expect.
    pub async fn execute(&self, command: Command) -> Map<String, Value> {
        self.submit(command).await.reply().await.body.into_object()
    }

    /// Subscribes to QEMU's events (and qmpgate's own `QMPGATE_*` events).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<UpstreamEvent>> {
        self.log.sender.subscribe()
    }

    /// The events kept in the history ring with `seq` greater than `since`, oldest first.
    pub fn events_since(&self, since: u64) -> Vec<Arc<UpstreamEvent>> {
        let history = lock::mutex(&self.log.history);
        history.iter().filter(|e| e.seq > since).cloned().collect()
    }

    /// Raises a qmpgate event (`QMPGATE_*`) to every session, in QEMU's format.
    pub fn announce(&self, name: &str, data: Value) {
        self.log.announce(gateway_event(name, data));
    }

    /// Replies QEMU sent after their client stopped waiting, since start.
    pub fn discarded_replies(&self) -> u64 {
        self.discarded.load(Ordering::Relaxed)
    }

    /// How long QEMU has taken to answer commands, since start.
    pub fn round_trips(&self) -> &RoundTrips {
        &self.round_trips
    }

    /// QEMU's QMP schema, when it gave one.
    pub fn schema(&self) -> Option<Arc<QmpSchema>> {
        self.info.borrow().schema.as_ref().map(|s| s.0.clone())
    }

    /// Waits until the link is down (lost, or QEMU stopped answering).
    pub async fn lost(&self) {
        let mut info = self.info.clone();
        let _ = info.wait_for(|i| !i.connected).await;
    }

    /// The latest facts about QEMU.
    pub fn info(&self) -> UpstreamInfo {
        self.info.borrow().clone()
    }
}

/// The answer to a command that was never sent because its upstream stopped
/// being served.
fn not_sent(upstream: &str, command: &str) -> Answer {
    lost(&format!(
        "qmpgate stopped serving upstream '{upstream}' before '{command}' was sent to QEMU; it was not run"
    ))
}

fn lost(desc: &str) -> Answer {
    match qmp::error_response(&QmpError::generic(desc), None) {
        Value::Object(map) => Answer::Object(map),
        _ => unreachable!("error_response builds an object"),
    }
}

/// A gateway event in QEMU's format.
fn gateway_event(name: &str, data: Value) -> Map<String, Value> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let Value::Object(map) = json!({
        "event": name,
        "data": data,
        "timestamp": { "seconds": now.as_secs(), "microseconds": now.subsec_micros() },
    }) else {
        unreachable!()
    };
    map
}

/// Connects to QEMU once and starts the upstream task. Returns the handle and the
/// task, which ends when the link is lost for good (or at shutdown).
pub async fn connect(
    spec: ChardevSpec,
    fds: &mut FdTable,
    history_limit: usize,
    liveness: Liveness,
    shutdown: CancellationToken,
) -> Result<(UpstreamHandle, tokio::task::JoinHandle<Outcome>), UpstreamError> {
    let link = open(&spec, fds, &liveness).await?;
    let qemu = link
        .info
        .version
        .get("qemu")
        .map(|v| v.to_string())
        .unwrap_or_default();
    tracing::info!(
        chardev = %spec.id,
        address = %spec.address,
        %qemu,
        oob = link.info.oob,
        "connected to QEMU"
    );
    let (in_band_tx, in_band) = mpsc::channel(256);
    let (oob_tx, oob) = mpsc::channel(64);
    let (info_tx, info) = watch::channel(link.info.clone());
    let discarded = Arc::new(AtomicU64::new(0));
    let round_trips = Arc::new(RoundTrips::default());
    let log = Arc::new(EventLog::new(history_limit));
    let handle = UpstreamHandle {
        id: spec.id.as_str().into(),
        in_band: in_band_tx,
        oob: oob_tx,
        info,
        discarded: discarded.clone(),
        round_trips: round_trips.clone(),
        log: log.clone(),
    };
    let task = LinkTask {
        spec,
        // An inherited fd is used once: reconnecting needs a path or an address.
        fds: FdTable::default(),
        in_band,
        oob,
        info: info_tx,
        next_id: 1,
        pending: HashMap::new(),
        in_flight: 0,
        discarded,
        round_trips,
        log,
        liveness,
        probe: None,
        fd_command: None,
        held_back: None,
        shutdown,
    };
    Ok((handle, tokio::spawn(task.run(link))))
}

/// How the upstream task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Shutdown was requested.
    Shutdown,
    /// QEMU closed the link after a `quit` went through.
    QemuQuit,
    /// The link was lost and reconnecting is not configured (or failed for good).
    Lost(String),
}
