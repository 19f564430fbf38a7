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
//! Layout: [`connect`] opens and negotiates; [`UpstreamHandle`] is the sessions'
//! side; `Upstream::run` is the task.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::chardev::{ChardevError, ChardevSpec, Inherited};
use crate::framing::{Frame, Framer};
use crate::plugin::Command;
use crate::qmp::{self, Answer, QmpError, Upstream as Message};
use crate::schema::QmpSchema;

/// QEMU's own limit on queued in-band commands with OOB enabled
/// (`QMP_REQ_QUEUE_LEN_MAX`); without OOB it runs one at a time anyway.
pub const MAX_IN_FLIGHT: usize = 8;

/// How long QEMU may take to greet us. A QEMU that accepts but never greets is
/// almost always serving another client on that monitor (it serves one at a time).
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// How long QEMU may take to answer the negotiation that follows its greeting
/// (`qmp_capabilities`, `query-status`, `query-qmp-schema`): milliseconds normally.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered per session before a session that does not keep up is cut off.
const EVENT_BUFFER: usize = 1024;

/// QEMU's messages are small; its replies to big queries reach a few MiB.
const MAX_UPSTREAM_MESSAGE: usize = 64 << 20;

/// How qmpgate notices a QEMU that keeps its link open but stopped answering
/// (stopped, wedged, or its monitor chardev taken over from inside): after a quiet
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
}

impl Default for Liveness {
    /// Probe after 10 s of quiet, give up after 10 s of silence: long enough that a
    /// busy host never trips it, short enough that an operator hears of a dead
    /// monitor before a client's own timeout would tell them.
    fn default() -> Self {
        Liveness {
            quiet: Some(Duration::from_secs(10)),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Errors establishing the upstream session.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// The socket could not be opened.
    #[error(transparent)]
    Chardev(#[from] ChardevError),
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
}

/// Every event sessions see, in one numbered stream: QEMU's, and qmpgate's own
/// (`QMPGATE_*`). Keeps the recent ones for clients that reconnect.
pub struct EventLog {
    /// Numbers everything QEMU sends and every event qmpgate raises.
    seq: AtomicU64,
    history: Mutex<VecDeque<Arc<UpstreamEvent>>>,
    /// How many events `history` keeps; 0 keeps none.
    limit: usize,
    sender: broadcast::Sender<Arc<UpstreamEvent>>,
}

impl EventLog {
    fn new(limit: usize) -> Self {
        EventLog {
            seq: AtomicU64::new(0),
            history: Mutex::new(VecDeque::with_capacity(limit.min(4096))),
            limit,
            sender: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    /// The next number in the stream.
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends an event to every session and keeps it.
    fn publish(&self, event: Arc<UpstreamEvent>) {
        if self.limit > 0 {
            let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            if history.len() >= self.limit {
                history.pop_front();
            }
            history.push_back(event.clone());
        }
        let _ = self.sender.send(event);
    }

    /// Numbers and publishes an event.
    fn announce(&self, body: Map<String, Value>) {
        self.publish(Arc::new(UpstreamEvent {
            seq: self.next_seq(),
            body,
        }));
    }
}

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
    /// Events, numbered and kept.
    log: Arc<EventLog>,
}

impl UpstreamHandle {
    /// Queues a command for QEMU. Commands one caller submits reach QEMU in the
    /// order submitted. Waits while the queue is full: callers put a deadline on it.
    /// A command whose [`PendingReply`] is dropped before it is sent is never sent.
    pub async fn submit(&self, command: Command) -> PendingReply {
        let (tx, rx) = oneshot::channel();
        let queue = if command.oob {
            &self.oob
        } else {
            &self.in_band
        };
        if let Err(mpsc::error::SendError(submit)) = queue.send(Submit { command, reply: tx }).await
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
        let history = self.log.history.lock().unwrap_or_else(|e| e.into_inner());
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

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// An open, negotiated link.
struct Link {
    reader: Reader,
    writer: Writer,
    framer: Framer,
    /// Frames read during negotiation after its last reply (events QEMU sent in
    /// the same write): the task handles them first, so none is lost.
    early: VecDeque<Frame>,
    info: UpstreamInfo,
}

/// The negotiation's reader: it owns the frames of each read, so messages QEMU
/// sends together (an event and a reply in one write) are all seen, in order.
struct Negotiation {
    reader: Reader,
    framer: Framer,
    frames: VecDeque<Frame>,
}

impl Negotiation {
    async fn next(&mut self) -> Result<Message, UpstreamError> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return match frame {
                    Frame::Message(bytes) => qmp::parse_upstream(&bytes)
                        .map_err(|e| UpstreamError::Protocol(e.to_string())),
                    _ => Err(UpstreamError::Protocol("oversized message".into())),
                };
            }
            let n = self.reader.read(&mut buf).await?;
            if n == 0 {
                return Err(UpstreamError::Closed);
            }
            let mut frames = Vec::new();
            self.framer.push(&buf[..n], &mut frames);
            self.frames.extend(frames);
        }
    }

    /// Sends `step` (with id 0 and `arguments`) and returns its reply's body, within
    /// [`NEGOTIATION_TIMEOUT`]; events that come first are dropped (nobody is
    /// subscribed yet).
    async fn execute(
        &mut self,
        writer: &mut Writer,
        step: &'static str,
        arguments: Option<Value>,
    ) -> Result<Map<String, Value>, UpstreamError> {
        let mut command = json!({"execute": step, "id": 0});
        if let Some(arguments) = arguments {
            command["arguments"] = arguments;
        }
        let exchange = async {
            writer.write_all(&qmp::encode(&command)).await?;
            loop {
                if let Message::Reply { body, .. } = self.next().await? {
                    return Ok(body.into_object());
                }
            }
        };
        tokio::time::timeout(NEGOTIATION_TIMEOUT, exchange)
            .await
            .map_err(|_| UpstreamError::NegotiationTimeout {
                step,
                timeout: NEGOTIATION_TIMEOUT,
            })?
    }
}

/// Opens the upstream chardev (one attempt, within [`GREETING_TIMEOUT`]), reads
/// the greeting (within [`GREETING_TIMEOUT`]) and negotiates (within [`NEGOTIATION_TIMEOUT`]): a peer
/// that stalls anywhere in it cannot hang start-up, `chardev-add` or a reconnect.
async fn open(spec: &ChardevSpec, inherited: &mut Inherited) -> Result<Link, UpstreamError> {
    // A TCP peer that drops SYNs would hold a connect for minutes: the greeting's
    // deadline covers the connect too.
    let stream = tokio::time::timeout(GREETING_TIMEOUT, spec.connect(inherited))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(GREETING_TIMEOUT))??;
    let (reader, mut writer) = stream.into_split();
    let mut negotiation = Negotiation {
        reader,
        framer: Framer::new(MAX_UPSTREAM_MESSAGE, 1024),
        frames: VecDeque::new(),
    };
    // Each step has its own deadline, so the error names the step that stalled.
    let info = negotiate(&mut negotiation, &mut writer).await?;
    Ok(Link {
        reader: negotiation.reader,
        writer,
        framer: negotiation.framer,
        early: negotiation.frames,
        info,
    })
}

/// The greeting, `qmp_capabilities`, the run state and the schema.
async fn negotiate(
    negotiation: &mut Negotiation,
    writer: &mut Writer,
) -> Result<UpstreamInfo, UpstreamError> {
    let greeting = tokio::time::timeout(GREETING_TIMEOUT, negotiation.next())
        .await
        .map_err(|_| UpstreamError::NoGreeting(GREETING_TIMEOUT))??;
    let Message::Greeting {
        version,
        capabilities,
    } = greeting
    else {
        return Err(UpstreamError::Protocol(format!(
            "expected a greeting, got {greeting:?}"
        )));
    };
    let oob = capabilities.iter().any(|c| c == "oob");
    let enable = oob.then(|| json!({"enable": ["oob"]}));
    let reply = negotiation
        .execute(writer, "qmp_capabilities", enable)
        .await?;
    if !reply.contains_key("return") {
        return Err(UpstreamError::Negotiation(Value::Object(reply).to_string()));
    }
    let reply = negotiation.execute(writer, "query-status", None).await?;
    let run_state = reply
        .get("return")
        .and_then(|r| r.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    let reply = negotiation
        .execute(writer, "query-qmp-schema", None)
        .await?;
    let schema = match reply.get("return").map(QmpSchema::from_introspection) {
        Some(Ok(schema)) => Some(SchemaRef(Arc::new(schema))),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "QEMU's QMP schema is unreadable; commands are not checked against it");
            None
        }
        None => {
            let reply = Value::Object(reply);
            tracing::warn!(%reply, "QEMU did not give its QMP schema; commands are not checked against it");
            None
        }
    };
    Ok(UpstreamInfo {
        version,
        oob,
        connected: true,
        run_state,
        lost: None,
        schema,
    })
}

/// Connects to QEMU once and starts the upstream task. Returns the handle and the
/// task, which ends when the link is lost for good (or at shutdown).
pub async fn connect(
    spec: ChardevSpec,
    inherited: &mut Inherited,
    history_limit: usize,
    liveness: Liveness,
    shutdown: CancellationToken,
) -> Result<(UpstreamHandle, tokio::task::JoinHandle<Outcome>), UpstreamError> {
    let link = open(&spec, inherited).await?;
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
    let log = Arc::new(EventLog::new(history_limit));
    let handle = UpstreamHandle {
        id: spec.id.as_str().into(),
        in_band: in_band_tx,
        oob: oob_tx,
        info,
        discarded: discarded.clone(),
        log: log.clone(),
    };
    let upstream = Upstream {
        spec,
        // An inherited fd is used once: reconnecting needs a path or an address.
        inherited: Inherited::default(),
        in_band,
        oob,
        info: info_tx,
        next_id: 1,
        pending: HashMap::new(),
        in_flight: 0,
        discarded,
        log,
        liveness,
        probe: None,
        shutdown,
    };
    Ok((handle, tokio::spawn(upstream.run(link))))
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

/// A command QEMU has not answered yet.
struct InFlight {
    reply: oneshot::Sender<Reply>,
    /// In-band commands count against `MAX_IN_FLIGHT`; OOB ones do not.
    in_band: bool,
    /// For the error message if the link drops first.
    name: String,
}

/// The upstream task's state.
struct Upstream {
    spec: ChardevSpec,
    inherited: Inherited,
    in_band: mpsc::Receiver<Submit>,
    oob: mpsc::Receiver<Submit>,
    info: watch::Sender<UpstreamInfo>,
    /// Next gateway id; ids are never reused, so a late reply cannot be misrouted.
    next_id: u64,
    /// Commands sent and not yet answered, by gateway id.
    pending: HashMap<u64, InFlight>,
    in_flight: usize,
    discarded: Arc<AtomicU64>,
    /// Numbers replies and events, keeps recent events (QEMU keeps none).
    log: Arc<EventLog>,
    liveness: Liveness,
    /// The liveness probe in flight: its id and when it went out.
    probe: Option<(u64, tokio::time::Instant)>,
    shutdown: CancellationToken,
}

impl Upstream {
    async fn run(mut self, mut link: Link) -> Outcome {
        loop {
            let reason = self.serve(&mut link).await;
            let reason = match reason {
                Ok(outcome) => {
                    // Removed, or the gateway stops: every command still waiting
                    // gets its answer before the sessions close, as when QEMU is lost.
                    if outcome == Outcome::Shutdown {
                        self.answer_remaining();
                    }
                    return outcome;
                }
                Err(reason) => reason,
            };
            self.fail_pending(&reason);
            self.info.send_modify(|i| {
                i.connected = false;
                i.lost = Some(reason.clone());
            });
            let lost_event = self.stamp(gateway_event(
                "QMPGATE_UPSTREAM_LOST",
                json!({ "reason": reason }),
            ));
            self.publish(lost_event);
            let Some(delay) = self.spec.reconnect_ms.map(Duration::from_millis) else {
                tracing::error!(%reason, "lost the connection to QEMU; reconnect-ms is not set, stopping");
                return Outcome::Lost(reason);
            };
            tracing::warn!(%reason, ?delay, "lost the connection to QEMU; reconnecting");
            link = match self.reconnect(delay).await {
                Some(link) => link,
                None => {
                    self.answer_remaining();
                    return Outcome::Shutdown;
                }
            };
            let _ = self.info.send(link.info.clone());
            let restored = self.stamp(gateway_event("QMPGATE_UPSTREAM_RESTORED", json!({})));
            self.publish(restored);
        }
    }

    fn stamp(&mut self, body: Map<String, Value>) -> Arc<UpstreamEvent> {
        Arc::new(UpstreamEvent {
            seq: self.log.next_seq(),
            body,
        })
    }

    /// Retries every `delay` until connected; meanwhile commands get an error at once.
    async fn reconnect(&mut self, delay: Duration) -> Option<Link> {
        loop {
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = self.shutdown.cancelled() => return None,
                    Some(submit) = self.in_band.recv() => {
                        let _ = submit.reply.send(Reply { seq: 0, body: lost("QEMU is not connected; qmpgate is reconnecting") });
                    }
                    Some(submit) = self.oob.recv() => {
                        let _ = submit.reply.send(Reply { seq: 0, body: lost("QEMU is not connected; qmpgate is reconnecting") });
                    }
                }
            }
            match open(&self.spec, &mut self.inherited).await {
                Ok(link) => {
                    tracing::info!(chardev = %self.spec.id, "reconnected to QEMU");
                    return Some(link);
                }
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
        }
    }

    /// Serves one link until it drops (`Err(reason)`) or the gateway stops.
    async fn serve(&mut self, link: &mut Link) -> Result<Outcome, String> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut frames = Vec::new();
        let mut quit_sent = false;
        self.probe = None;
        let mut last_heard = tokio::time::Instant::now();
        for frame in std::mem::take(&mut link.early) {
            self.receive(frame);
        }
        loop {
            // The next liveness step: a probe's deadline, or when to send one.
            let next_check = match (self.probe, self.liveness.quiet) {
                (Some((_, sent)), _) => Some(sent + self.liveness.timeout),
                (None, Some(quiet)) if self.pending.is_empty() && !quit_sent => {
                    Some(last_heard + quiet)
                }
                _ => None,
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Outcome::Shutdown),
                _ = tokio::time::sleep_until(next_check.unwrap_or_else(tokio::time::Instant::now)), if next_check.is_some() => {
                    match self.probe {
                        Some(_) => {
                            let reason = format!(
                                "QEMU stopped answering: no reply to a liveness probe (query-status) within {:?}",
                                self.liveness.timeout
                            );
                            tracing::error!(upstream = %self.spec.id, %reason);
                            return Err(reason);
                        }
                        None => {
                            let id = self.next_id;
                            self.next_id += 1;
                            let probe = qmp::encode(&json!({"execute": "query-status", "id": id}));
                            // A QEMU that does not even read counts as silent too.
                            tokio::time::timeout(self.liveness.timeout, link.writer.write_all(&probe))
                                .await
                                .map_err(|_| "QEMU stopped answering: it does not read its monitor".to_string())?
                                .map_err(|e| format!("writing to QEMU: {e}"))?;
                            self.probe = Some((id, tokio::time::Instant::now()));
                        }
                    }
                }
                Some(submit) = self.oob.recv() => {
                    self.send(link, submit, &mut quit_sent).await?;
                }
                Some(submit) = self.in_band.recv(), if self.in_flight < MAX_IN_FLIGHT => {
                    self.send(link, submit, &mut quit_sent).await?;
                }
                read = link.reader.read(&mut buf) => {
                    let n = match read {
                        Ok(0) if quit_sent => return Ok(Outcome::QemuQuit),
                        Ok(0) => return Err("QEMU closed the monitor connection".into()),
                        // QEMU sometimes resets instead of closing after `quit`.
                        Err(_) if quit_sent => return Ok(Outcome::QemuQuit),
                        // A killed QEMU resets the connection as often as it closes it.
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            return Err("QEMU closed the monitor connection".into());
                        }
                        Err(e) => return Err(format!("reading from QEMU: {e}")),
                        Ok(n) => n,
                    };
                    last_heard = tokio::time::Instant::now();
                    link.framer.push(&buf[..n], &mut frames);
                    for frame in frames.drain(..) {
                        self.receive(frame);
                    }
                }
            }
        }
    }

    async fn send(
        &mut self,
        link: &mut Link,
        submit: Submit,
        quit_sent: &mut bool,
    ) -> Result<(), String> {
        if submit.reply.is_closed() {
            // Its client gave up waiting before its turn came (and was told so):
            // QEMU does not run a command nobody waits for.
            tracing::debug!(command = %submit.command.name, "command withdrawn before it was sent");
            return Ok(());
        }
        let id = self.next_id;
        self.next_id += 1;
        let Command {
            name,
            arguments,
            oob,
        } = submit.command;
        let key = if oob { "exec-oob" } else { "execute" };
        let mut message = Map::new();
        message.insert(key.into(), Value::from(name.clone()));
        if !arguments.is_empty() {
            message.insert("arguments".into(), Value::Object(arguments));
        }
        message.insert("id".into(), Value::from(id));
        *quit_sent |= name == "quit";
        if !oob {
            self.in_flight += 1;
        }
        self.pending.insert(
            id,
            InFlight {
                reply: submit.reply,
                in_band: !oob,
                name,
            },
        );
        // A QEMU that stops reading must not hold this task (and every client
        // behind it) in a write: the liveness deadline bounds writes too.
        tokio::time::timeout(
            self.liveness.timeout,
            link.writer.write_all(&qmp::encode(&Value::Object(message))),
        )
        .await
        .map_err(|_| "QEMU stopped answering: it does not read its monitor".to_string())?
        .map_err(|e| format!("writing to QEMU: {e}"))
    }

    fn receive(&mut self, frame: Frame) {
        let bytes = match frame {
            Frame::Message(bytes) => bytes,
            other => {
                tracing::warn!(?other, "dropping an oversized message from QEMU");
                return;
            }
        };
        let seq = self.log.next_seq();
        match qmp::parse_upstream(&bytes) {
            Ok(Message::Reply { id: Some(id), body }) => {
                let Some(id) = id.as_u64() else {
                    tracing::warn!(%id, "reply with an id qmpgate never sent");
                    return;
                };
                if self.probe.is_some_and(|(probe, _)| probe == id) {
                    self.probe = None;
                    return;
                }
                match self.pending.remove(&id) {
                    Some(in_flight) => {
                        if in_flight.in_band {
                            self.in_flight -= 1;
                        }
                        // The client may have left, or stopped waiting (command timeout):
                        // its reply is then dropped and counted, never given to anyone else.
                        if in_flight.reply.send(Reply { seq, body }).is_err() {
                            self.discarded.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(id, command = %in_flight.name, "late reply discarded");
                        }
                    }
                    None => tracing::warn!(id, "reply to an unknown command id; dropped"),
                }
            }
            Ok(Message::Reply { id: None, body }) => {
                let reply = Value::Object(body.into_object()).to_string();
                tracing::error!(%reply, "QEMU rejected a message from qmpgate");
            }
            Ok(Message::Event { name, body }) => {
                tracing::debug!(event = %name, "event");
                let run_state = match name.as_str() {
                    "STOP" => Some("paused"),
                    "RESUME" => Some("running"),
                    "SHUTDOWN" => Some("shutdown"),
                    "SUSPEND" => Some("suspended"),
                    "GUEST_PANICKED" => Some("guest-panicked"),
                    _ => None,
                };
                if let Some(state) = run_state {
                    self.info.send_modify(|i| i.run_state = state.to_string());
                }
                let event = Arc::new(UpstreamEvent { seq, body });
                self.publish(event);
            }
            Ok(other) => tracing::warn!(message = ?other, "unexpected message from QEMU"),
            Err(e) => tracing::warn!(error = %e, "QEMU sent invalid JSON"),
        }
    }

    fn publish(&mut self, event: Arc<UpstreamEvent>) {
        self.log.publish(event);
    }

    /// When the upstream stops being served (`chardev-remove`, or the gateway
    /// stops): the commands sent to QEMU and not answered, and those still queued
    /// for it, each get an error saying so.
    fn answer_remaining(&mut self) {
        let id = self.spec.id.clone();
        for (_, in_flight) in self.pending.drain() {
            let seq = self.log.next_seq();
            let body = lost(&format!(
                "qmpgate stopped serving upstream '{id}' before '{}' was answered; QEMU may have run it",
                in_flight.name
            ));
            let _ = in_flight.reply.send(Reply { seq, body });
        }
        self.in_flight = 0;
        self.in_band.close();
        self.oob.close();
        while let Ok(submit) = self.in_band.try_recv().or_else(|_| self.oob.try_recv()) {
            let body = not_sent(&id, &submit.command.name);
            let _ = submit.reply.send(Reply { seq: 0, body });
        }
    }

    fn fail_pending(&mut self, reason: &str) {
        for (_, in_flight) in self.pending.drain() {
            let seq = self.log.next_seq();
            let body = lost(&format!(
                "qmpgate lost the connection to QEMU before '{}' was answered ({reason})",
                in_flight.name
            ));
            let _ = in_flight.reply.send(Reply { seq, body });
        }
        self.in_flight = 0;
    }
}
