//! One client's QMP session through the gateway.
//!
//! Each client gets what QEMU would give it: a greeting (QEMU's version, the
//! capabilities qmpgate can offer), its own `qmp_capabilities` negotiation with QEMU's
//! exact errors, and replies carrying its own ids. Every command passes the plugin
//! chain before it can reach QEMU.
//!
//! Ordering: QEMU answers in-band commands in order, and clients without ids depend
//! on it. A session therefore keeps its in-band replies in a FIFO of futures: a
//! command answered by the gateway itself (a parse error, a denial) waits behind
//! the commands sent before it. `exec-oob` replies overtake, as in QEMU.
//!
//! Bounds: at most [`MAX_CLIENT_QUEUE`] in-band commands per client are outstanding
//! (then the session stops reading, and TCP back-pressure reaches the client); a
//! write that cannot complete within [`super::SessionLimits::write_timeout`] and a client that falls
//! behind the event stream are disconnected, so a stuck client never holds others.
//!
//! Layout: `serve` is the task; `Session` holds the state; `handle_frame` is the
//! per-message logic. (About 650 lines, kept in one file: every part reads and
//! changes the one `Session`, and its ordering rules are easier to check together.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use qmpgate_plugin_host::{self as plugin, Decision, EventDecision};
use qmpgate_protocol::qjson::{Input, Reader};
use qmpgate_protocol::qmp::{self, Answer, Command, ErrorClass, QmpError, Request};

use super::{Context, FAULTING, Verdict, deadline_passed, faulting, within};
use crate::io::Stream;
use crate::io::pass::HeldFds;
use crate::upstream::UpstreamEvent;

/// qmpgate's own command: the events it kept (QEMU drops events while no client
/// is connected; qmpgate is always connected). A `query-` name, so that read-only
/// policies allow it.
pub const QUERY_EVENTS: &str = "query-qmpgate-events";

/// Outstanding in-band commands per client before the session stops reading.
pub const MAX_CLIENT_QUEUE: usize = 32;

/// Bytes of commands one client may have forwarded and not yet answered (a
/// command is held, parsed, until its reply is written); past it the client is not
/// read until replies go out. One command over it still goes alone.
pub const CLIENT_INPUT_BUDGET: usize = 2 << 20;

/// Commands one client may have inside QEMU at once: half of QEMU's queue, so a
/// client that floods QEMU with slow commands leaves room for everyone else.
pub const MAX_CLIENT_UPSTREAM: usize = crate::upstream::MAX_IN_FLIGHT / 2;

/// The commands that take the fds a client sent (SCM_RIGHTS) with them to QEMU.
pub const FD_COMMANDS: &[&str] = &["getfd", "add-fd"];

/// How long a closing session waits for the replies it still owes (the upstream
/// answers them at once when it stops; this bounds a wedged one).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Protocol phase: QMP allows only `qmp_capabilities` until negotiation completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Negotiating,
    Commands { oob: bool },
}

/// A reply on its way to the client.
struct Outgoing {
    /// The client's own id, restored verbatim.
    id: Option<Value>,
    /// What QEMU ran, when the reply came from QEMU (for the response hook).
    command: Option<Command>,
    /// `{"return": ...}` or `{"error": ...}`, without id.
    body: Answer,
    /// Where QEMU's reply stood among QEMU's messages; `None` for gateway answers.
    seq: Option<u64>,
    /// The command's size, counted in the client's input budget until written.
    input: usize,
    /// The command's place in the client's share of QEMU's queue, held until the
    /// reply is written: a client that does not read its replies cannot have
    /// more than its share of them waiting in qmpgate's memory.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

type Pending = Pin<Box<dyn Future<Output = Outgoing> + Send>>;

/// Runs one QMP client's session; returns why it ended.
pub(super) async fn serve(
    stream: Stream,
    client: plugin::Client,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> &'static str {
    let held_fds = ctx.pass_fds.then(HeldFds::default);
    let (reader, writer) = crate::io::pass::split(stream, held_fds.clone());
    let mut session = Session {
        ctx,
        client,
        writer: Box::new(writer),
        held_fds,
        phase: Phase::Negotiating,
        in_band: FuturesOrdered::new(),
        oob: FuturesUnordered::new(),
        events: None,
        held_event: None,
        upstream_slots: Arc::new(tokio::sync::Semaphore::new(MAX_CLIENT_UPSTREAM)),
        last_handover: None,
        input_bytes: 0,
    };
    session.run(reader, shutdown).await
}

struct Session {
    ctx: Arc<Context>,
    /// The client as plugins see it.
    client: plugin::Client,
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// The fds this client sent that no command took yet (`fds=pass` listeners).
    held_fds: Option<HeldFds>,
    phase: Phase,
    /// In-band replies, in the order the commands arrived.
    in_band: FuturesOrdered<Pending>,
    /// OOB replies, in the order QEMU sends them.
    oob: FuturesUnordered<Pending>,
    /// QEMU's events, from negotiation on.
    events: Option<broadcast::Receiver<Arc<UpstreamEvent>>>,
    /// An event taken from the channel early (while ordering a reply) and not yet
    /// delivered.
    held_event: Option<Arc<UpstreamEvent>>,
    /// Limits this client's in-band commands inside QEMU to `MAX_CLIENT_UPSTREAM`;
    /// a slot is given back when QEMU answers or the command's deadline passes.
    upstream_slots: Arc<tokio::sync::Semaphore>,
    /// Resolves when this client's latest in-band command has been handed to the
    /// upstream (or gave up), so that the next one goes after it.
    last_handover: Option<oneshot::Receiver<()>>,
    /// Bytes of this client's forwarded commands whose replies are not written
    /// yet; over [`CLIENT_INPUT_BUDGET`], the client is not read.
    input_bytes: usize,
}

impl Session {
    async fn run(
        &mut self,
        mut reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        shutdown: CancellationToken,
    ) -> &'static str {
        if let Err(error) = self.ctx.chain().on_connect(&self.client).await {
            let _ = self.write(&qmp::error_response(&error, None)).await;
            return "refused by a plugin";
        }
        let info = self.ctx.upstream.info();
        let capabilities: Vec<String> = if info.oob { vec!["oob".into()] } else { vec![] };
        if self
            .write(&qmp::greeting(&info.version, &capabilities))
            .await
            .is_err()
        {
            return "write failed";
        }

        let mut framer = Reader::new(self.ctx.limits.max_message, self.ctx.limits.max_depth);
        let mut frames = std::collections::VecDeque::new();
        let mut scratch = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let mut eof = false;
        loop {
            while self.in_band.len() < MAX_CLIENT_QUEUE
                && self.input_bytes < CLIENT_INPUT_BUDGET
                && let Some((frame, size)) = frames.pop_front()
            {
                // Checked before each command (OOB ones are not held back by the
                // queue bound): a client over its fault budget sends no more.
                if faulting(&self.ctx, &self.client) {
                    self.flush().await;
                    return FAULTING;
                }
                self.handle_frame(frame, size).await;
            }
            if eof && frames.is_empty() && self.in_band.is_empty() && self.oob.is_empty() {
                return "end of input";
            }
            if faulting(&self.ctx, &self.client) {
                self.flush().await;
                return FAULTING;
            }
            if let Some(event) = self.held_event.take()
                && let Err(e) = self.deliver_event(&event).await
            {
                return write_failed(e);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.flush().await;
                    return "gateway shutting down";
                }
                Some(out) = self.oob.next() => {
                    if let Err(e) = self.deliver(out).await { return write_failed(e); }
                }
                Some(out) = self.in_band.next() => {
                    if let Err(e) = self.deliver(out).await { return write_failed(e); }
                }
                event = recv_event(&mut self.events) => match event {
                    Ok(event) => {
                        if let Err(e) = self.deliver_event(&event).await { return write_failed(e); }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        self.ctx.metrics.slow_clients.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(client = self.client.id, missed, "client fell behind the event stream");
                        return "too slow to take events";
                    }
                    Err(broadcast::error::RecvError::Closed) => self.events = None,
                },
                read = reader.read(&mut buf), if !eof && frames.is_empty() => match read {
                    // As in QEMU, a value still open at the end of input is dropped.
                    Ok(0) | Err(_) => eof = true,
                    Ok(n) => {
                        framer.push(&buf[..n], &mut scratch);
                        // Each command with its size in bytes, for the input budget.
                        let mut sizes = framer.sizes().iter().copied();
                        frames.extend(scratch.drain(..).map(|frame| {
                            let size = match frame {
                                Input::Value(_) => sizes.next().unwrap_or(0),
                                _ => 0,
                            };
                            (frame, size)
                        }));
                    }
                },
            }
        }
    }

    /// At shutdown: deliver every reply still owed (the upstream answers the
    /// commands it will not run at once, saying why) and the events before them,
    /// within [`FLUSH_TIMEOUT`].
    async fn flush(&mut self) {
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        while let Ok(Some(out)) = tokio::time::timeout_at(deadline, self.oob.next()).await {
            if self.deliver(out).await.is_err() {
                return;
            }
        }
        while let Ok(Some(out)) = tokio::time::timeout_at(deadline, self.in_band.next()).await {
            if self.deliver(out).await.is_err() {
                return;
            }
        }
        let _ = self.deliver_events_before(u64::MAX).await;
    }

    /// Decides what to do with one message (or one error in the input).
    /// `size` is the command's size in bytes: a forwarded command counts against
    /// the client's input budget until its reply is written.
    async fn handle_frame(&mut self, frame: Input, size: usize) {
        self.ctx.metrics.commands.fetch_add(1, Ordering::Relaxed);
        let value = match frame {
            Input::Value(value) => value,
            // QEMU's parse errors carry no id (there is no message to take one from).
            Input::Error(desc) => return self.answer(None, error(desc)),
            Input::TooLarge => {
                return self.answer(
                    None,
                    error(format!(
                        "JSON message exceeds the limit of {} bytes",
                        self.ctx.limits.max_message
                    )),
                );
            }
            Input::TooDeep => {
                return self.answer(
                    None,
                    error(format!(
                        "JSON nesting exceeds the limit of {} levels",
                        self.ctx.limits.max_depth
                    )),
                );
            }
        };
        let allow_oob = matches!(self.phase, Phase::Commands { oob: true });
        let request = match qmp::parse_request(value, allow_oob) {
            Ok(request) => request,
            Err(e) => return self.answer(e.id, qmp::error_response(&e.error, None)),
        };
        let Request {
            id,
            name,
            arguments,
            oob,
        } = request;

        match (self.phase, name.as_str()) {
            (Phase::Negotiating, "qmp_capabilities") => {
                let reply = self.negotiate(&arguments);
                self.answer(id, reply)
            }
            (Phase::Negotiating, _) => self.answer(
                id,
                qmp::error_response(
                    &QmpError::new(
                        ErrorClass::CommandNotFound,
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    ),
                    None,
                ),
            ),
            (Phase::Commands { .. }, "qmp_capabilities") => self.answer(
                id,
                qmp::error_response(
                    &QmpError::new(
                        ErrorClass::CommandNotFound,
                        "Capabilities negotiation is already complete, command ignored",
                    ),
                    None,
                ),
            ),
            (Phase::Commands { .. }, _) => {
                // QEMU's schema first: a command QEMU does not have, or arguments
                // that do not fit it, get QEMU's own answer before any plugin sees
                // them (qmpgate's own command has its own checks).
                let label = name.clone();
                if name == QUERY_EVENTS {
                    if let Err(error) = check_query_events(&arguments) {
                        self.ctx.count_command(&label, Verdict::Answered);
                        return self.answer(id, error);
                    }
                } else if let Some(schema) = self.ctx.upstream.schema()
                    && let Err(error) = schema.check_arguments(&name, &arguments)
                {
                    self.ctx.count_command(&label, Verdict::Answered);
                    return self.answer(id, qmp::error_response(&error.to_qmp_error(), None));
                }
                // HMP inside QMP gets the same interpretation and policy as an HMP
                // listener's lines, so it is no way around the policy.
                let hmp_line = match (name.as_str(), arguments.get("command-line")) {
                    ("human-monitor-command", Some(Value::String(line))) => Some(line.clone()),
                    _ => None,
                };
                let decision = match hmp_line {
                    Some(line) => {
                        // QEMU's own members only: the line and the vCPU it runs on.
                        match arguments
                            .keys()
                            .find(|k| !matches!(k.as_str(), "command-line" | "cpu-index"))
                        {
                            Some(extra) => Decision::Deny(QmpError::generic(format!(
                                "Parameter '{extra}' is unexpected"
                            ))),
                            None => {
                                let cpu_index = arguments.get("cpu-index").cloned();
                                self.ctx
                                    .chain()
                                    .on_hmp(&self.client, &line, cpu_index)
                                    .await
                            }
                        }
                    }
                    None => {
                        let command = Command {
                            name,
                            arguments,
                            oob,
                        };
                        self.ctx.chain().on_command(&self.client, command).await
                    }
                };
                match decision {
                    Decision::Forward(command) if command.name == QUERY_EVENTS => {
                        self.ctx.count_command(&label, Verdict::Answered);
                        let reply = self.query_events(&command.arguments).await;
                        self.answer(id, reply)
                    }
                    Decision::Forward(command) => {
                        self.ctx.count_command(&label, Verdict::Forwarded);
                        self.forward(id, command, size)
                    }
                    Decision::Deny(e) => {
                        self.ctx.count_command(&label, Verdict::Denied);
                        self.ctx.metrics.denied.fetch_add(1, Ordering::Relaxed);
                        self.answer_as(id, qmp::error_response(&e, None), oob)
                    }
                    Decision::Reply(value) => {
                        self.ctx.count_command(&label, Verdict::Answered);
                        self.answer_as(id, qmp::return_response(value, None), oob)
                    }
                }
            }
        }
    }

    /// `query-qmpgate-events {"since": SEQ}`: the events qmpgate kept, after SEQ
    /// (default: all), as this client's plugins let it see them, each with its `seq`.
    async fn query_events(&mut self, arguments: &Map<String, Value>) -> Value {
        if let Err(error) = check_query_events(arguments) {
            return error;
        }
        let since = arguments.get("since").and_then(Value::as_u64).unwrap_or(0);
        let mut list = Vec::new();
        for event in self.ctx.upstream.events_since(since) {
            let name = event
                .body
                .get("event")
                .and_then(Value::as_str)
                .unwrap_or("");
            let body = match self
                .ctx
                .chain()
                .on_event(&self.client, name, &event.body, true)
                .await
            {
                EventDecision::Deliver => Value::Object(event.body.clone()),
                EventDecision::Drop => continue,
                EventDecision::Rewrite(data) => {
                    let mut body = event.body.clone();
                    body.insert("data".into(), data);
                    Value::Object(body)
                }
            };
            list.push(json!({ "seq": event.seq, "event": body }));
        }
        qmp::return_response(Value::Array(list), None)
    }

    /// `qmp_capabilities`: the gateway negotiates with each client itself.
    fn negotiate(&mut self, arguments: &Map<String, Value>) -> Value {
        let offered_oob = self.ctx.upstream.info().oob;
        let mut oob = false;
        if let Some(enable) = arguments.get("enable") {
            let Some(list) = enable.as_array() else {
                return error("Invalid parameter type for 'enable', expected: array".into());
            };
            for (i, cap) in list.iter().enumerate() {
                match cap.as_str() {
                    Some("oob") if offered_oob => oob = true,
                    Some("oob") => return error("Capability 'oob' not available".into()),
                    Some(other) => {
                        return error(format!(
                            "Parameter 'enable[{i}]' does not accept value '{other}'"
                        ));
                    }
                    None => {
                        return error(format!(
                            "Invalid parameter type for 'enable[{i}]', expected: string"
                        ));
                    }
                }
            }
        }
        if let Some(key) = arguments.keys().find(|k| *k != "enable") {
            return error(format!("Parameter '{key}' is unexpected"));
        }
        self.phase = Phase::Commands { oob };
        if oob {
            self.client.capabilities = vec!["oob".into()];
        }
        self.events = Some(self.ctx.upstream.subscribe());
        json!({ "return": {} })
    }

    /// Queues the command for QEMU without waiting: the wait for its turn, for a
    /// slot in QEMU's queue and for QEMU's answer runs in the reply's future, under
    /// the command's deadline, so the session keeps serving this client (replies,
    /// events, timeouts, shutdown) meanwhile.
    ///
    /// Order: one client's in-band commands reach QEMU in the order it sent them;
    /// each is handed to the upstream only after the one before it was (or gave up).
    fn forward(&mut self, id: Option<Value>, command: Command, size: usize) {
        self.input_bytes += size;
        let oob = command.oob;
        // The commands that take fds take the ones this client sent last, as in QEMU.
        let fds = match &self.held_fds {
            Some(held) if FD_COMMANDS.contains(&command.name.as_str()) => held.take(),
            _ => Vec::new(),
        };
        let limit = self.ctx.timeouts.for_command(&command.name);
        let deadline = limit.map(|limit| tokio::time::Instant::now() + limit);
        let upstream = self.ctx.upstream.clone();
        // OOB commands bypass QEMU's queue, so they bypass the turn and the share too.
        let (turn, slots, handed_over) = if oob {
            (None, None, None)
        } else {
            let (handed_over, next) = oneshot::channel::<()>();
            let turn = self.last_handover.replace(next);
            (turn, Some(self.upstream_slots.clone()), Some(handed_over))
        };
        let pending: Pending = Box::pin(async move {
            let name = command.name.clone();
            let queued = within(deadline, async {
                if let Some(turn) = turn {
                    // Sent, or given up: either way it is this command's turn.
                    let _ = turn.await;
                }
                let slot = match slots {
                    Some(slots) => slots.acquire_owned().await.ok(),
                    None => None,
                };
                let pending = upstream.submit_with_fds(command.clone(), fds).await;
                drop(handed_over);
                (slot, pending)
            })
            .await;
            let (reply, slot) = match queued {
                // The slot is held until the reply is written to the client; a
                // command whose deadline passed gives it back at once (QEMU's late
                // reply is discarded, never queued here).
                Some((slot, pending)) => match within(deadline, pending.reply()).await {
                    Some(reply) => (reply, slot),
                    None => (deadline_passed(&name, limit, true), None),
                },
                None => (deadline_passed(&name, limit, false), None),
            };
            Outgoing {
                id,
                command: Some(command),
                body: reply.body,
                seq: Some(reply.seq),
                input: size,
                _slot: slot,
            }
        });
        if oob {
            self.oob.push(pending);
        } else {
            self.in_band.push_back(pending);
        }
    }

    /// Queues a gateway-made in-band answer behind earlier commands.
    fn answer(&mut self, id: Option<Value>, reply: Value) {
        self.answer_as(id, reply, false)
    }

    fn answer_as(&mut self, id: Option<Value>, reply: Value, oob: bool) {
        let Value::Object(body) = reply else {
            unreachable!("replies are objects")
        };
        let out = Outgoing {
            id,
            command: None,
            body: Answer::Object(body),
            seq: None,
            input: 0,
            _slot: None,
        };
        let ready: Pending = Box::pin(std::future::ready(out));
        if oob {
            self.oob.push(ready);
        } else {
            self.in_band.push_back(ready);
        }
    }

    async fn deliver(&mut self, out: Outgoing) -> std::io::Result<()> {
        self.input_bytes -= out.input;
        if let Some(seq) = out.seq {
            self.deliver_events_before(seq).await?;
        }
        let body = match &out.command {
            Some(command) => {
                self.ctx
                    .chain()
                    .on_response(&self.client, command, out.body)
                    .await
            }
            None => out.body,
        };
        self.write_bytes(&body.encode(out.id)).await
        // `out`'s slot goes back here, once the reply is written.
    }

    /// Delivers the queued events QEMU sent before the message numbered `seq`, so
    /// that a reply never overtakes an event QEMU sent first; keeps the first later
    /// event for the main loop.
    async fn deliver_events_before(&mut self, seq: u64) -> std::io::Result<()> {
        loop {
            let event = match self.held_event.take() {
                Some(event) => event,
                None => match self.events.as_mut().map(|rx| rx.try_recv()) {
                    Some(Ok(event)) => event,
                    Some(Err(broadcast::error::TryRecvError::Lagged(_))) => {
                        self.ctx
                            .metrics
                            .slow_clients
                            .fetch_add(1, Ordering::Relaxed);
                        return Err(std::io::Error::other("client fell behind the event stream"));
                    }
                    _ => return Ok(()),
                },
            };
            if event.seq >= seq {
                self.held_event = Some(event);
                return Ok(());
            }
            self.deliver_event(&event).await?;
        }
    }

    async fn deliver_event(&mut self, event: &UpstreamEvent) -> std::io::Result<()> {
        let name = event
            .body
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("");
        match self
            .ctx
            .chain()
            .on_event(&self.client, name, &event.body, false)
            .await
        {
            EventDecision::Deliver => self.write_bytes(event.encoded()).await,
            EventDecision::Drop => Ok(()),
            EventDecision::Rewrite(data) => {
                let mut event = event.body.clone();
                event.insert("data".into(), data);
                self.write(&Value::Object(event)).await
            }
        }
    }

    async fn write(&mut self, message: &Value) -> std::io::Result<()> {
        self.write_bytes(&qmp::encode(message)).await
    }

    async fn write_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let timeout = self.ctx.limits.write_timeout;
        match tokio::time::timeout(timeout, self.writer.write_all(bytes)).await {
            Ok(result) => result,
            Err(_) => {
                self.ctx
                    .metrics
                    .slow_clients
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    client = self.client.id,
                    ?timeout,
                    "client does not read; disconnecting it"
                );
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client does not read",
                ))
            }
        }
    }
}

fn write_failed(e: std::io::Error) -> &'static str {
    tracing::debug!(error = %e, "write to client failed");
    match e.kind() {
        std::io::ErrorKind::TimedOut => "does not read",
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => "went away",
        _ => "write failed",
    }
}

fn error(desc: String) -> Value {
    qmp::error_response(&QmpError::generic(desc), None)
}

/// `query-qmpgate-events`'s arguments, with QEMU's texts: `since`, an integer.
fn check_query_events(arguments: &Map<String, Value>) -> Result<(), Value> {
    if let Some(since) = arguments.get("since")
        && since.as_u64().is_none()
    {
        return Err(error(
            "Invalid parameter type for 'since', expected: integer".into(),
        ));
    }
    match arguments.keys().find(|k| *k != "since") {
        Some(key) => Err(error(format!("Parameter '{key}' is unexpected"))),
        None => Ok(()),
    }
}

async fn recv_event(
    events: &mut Option<broadcast::Receiver<Arc<UpstreamEvent>>>,
) -> Result<Arc<UpstreamEvent>, broadcast::error::RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
