//! The link task: owns the socket to QEMU, sends commands with ids of its own,
//! routes replies back to their askers, publishes events, probes a quiet QEMU,
//! and reconnects (or ends) when the link drops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use qmpgate_protocol::chardev::ChardevSpec;
use qmpgate_protocol::framing::Frame;
use qmpgate_protocol::qmp::{self, QemuMessage as Message};

use super::negotiation::{Link, open};
use super::*;
use crate::io::FdTable;

/// A command QEMU has not answered yet.
pub(super) struct InFlight {
    reply: oneshot::Sender<Reply>,
    /// In-band commands count against `MAX_IN_FLIGHT`; OOB ones do not.
    in_band: bool,
    /// For the error message if the link drops first.
    name: String,
    /// When it was written to QEMU, for [`RoundTrips`].
    sent: tokio::time::Instant,
}

/// The upstream task's state.
pub(super) struct LinkTask {
    pub(super) spec: ChardevSpec,
    pub(super) fds: FdTable,
    pub(super) in_band: mpsc::Receiver<Submit>,
    pub(super) oob: mpsc::Receiver<Submit>,
    pub(super) info: watch::Sender<UpstreamInfo>,
    /// Next gateway id; ids are never reused, so a late reply cannot be misrouted.
    pub(super) next_id: u64,
    /// Commands sent and not yet answered, by gateway id.
    pub(super) pending: HashMap<u64, InFlight>,
    pub(super) in_flight: usize,
    pub(super) discarded: Arc<AtomicU64>,
    pub(super) round_trips: Arc<RoundTrips>,
    /// Numbers replies and events, keeps recent events (QEMU keeps none).
    pub(super) log: Arc<EventLog>,
    pub(super) liveness: Liveness,
    /// The liveness probe in flight: its id and when it went out.
    pub(super) probe: Option<(u64, tokio::time::Instant)>,
    /// The command with fds QEMU has not answered yet: QEMU keeps the fds it read
    /// last until a command takes them, so a second command's fds must not reach
    /// it before the first command ran.
    pub(super) fd_command: Option<u64>,
    /// A command with fds that waits for [`fd_command`](Self::fd_command)'s reply;
    /// in-band commands queued behind it wait too, so each client's order holds.
    pub(super) held_back: Option<Submit>,
    pub(super) shutdown: CancellationToken,
}

impl LinkTask {
    pub(super) async fn run(mut self, mut link: Link) -> Outcome {
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
        Arc::new(UpstreamEvent::new(self.log.next_seq(), body))
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
            match open(&self.spec, &mut self.fds, &self.liveness).await {
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
                Some(submit) = self.in_band.recv(), if self.in_flight < MAX_IN_FLIGHT && self.held_back.is_none() => {
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
                    if self.fd_command.is_none()
                        && let Some(submit) = self.held_back.take()
                    {
                        self.send(link, submit, &mut quit_sent).await?;
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
        if !submit.fds.is_empty() {
            if !link.writer.passes_fds() {
                let body = lost(&format!(
                    "upstream '{}' is not a unix socket: qmpgate cannot pass fds to QEMU over it",
                    self.spec.id
                ));
                let _ = submit.reply.send(Reply { seq: 0, body });
                return Ok(());
            }
            if self.fd_command.is_some() {
                self.held_back = Some(submit);
                return Ok(());
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let Submit {
            command:
                Command {
                    name,
                    arguments,
                    oob,
                },
            fds,
            reply,
        } = submit;
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
                reply,
                in_band: !oob,
                name,
                sent: tokio::time::Instant::now(),
            },
        );
        // A QEMU that stops reading must not hold this task (and every client
        // behind it) in a write: the liveness deadline bounds writes too.
        let bytes = qmp::encode(&Value::Object(message));
        let write = async {
            if fds.is_empty() {
                link.writer.write_all(&bytes).await
            } else {
                self.fd_command = Some(id);
                link.writer.write_with_fds(&bytes, &fds).await
            }
        };
        // QEMU has its own copies now (or never will): ours close here.
        tokio::time::timeout(self.liveness.timeout, write)
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
        match qmp::parse_qemu_message(&bytes) {
            Ok(Message::Reply { id: Some(id), body }) => {
                let Some(id) = id.as_u64() else {
                    tracing::warn!(%id, "reply with an id qmpgate never sent");
                    return;
                };
                if self.probe.is_some_and(|(probe, _)| probe == id) {
                    self.probe = None;
                    return;
                }
                if self.fd_command == Some(id) {
                    self.fd_command = None;
                }
                match self.pending.remove(&id) {
                    Some(in_flight) => {
                        self.round_trips.observe(in_flight.sent.elapsed());
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
                let event = Arc::new(UpstreamEvent::new(seq, body));
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
        self.fd_command = None;
        self.in_band.close();
        self.oob.close();
        let held_back = self.held_back.take();
        let queued = std::iter::from_fn(|| {
            self.in_band
                .try_recv()
                .or_else(|_| self.oob.try_recv())
                .ok()
        });
        for submit in held_back.into_iter().chain(queued) {
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
        self.fd_command = None;
        // Not sent: its client hears so, and its fds close.
        if let Some(submit) = self.held_back.take() {
            let body = lost(&format!(
                "qmpgate lost the connection to QEMU before '{}' was sent ({reason}); it was not run",
                submit.command.name
            ));
            let _ = submit.reply.send(Reply { seq: 0, body });
        }
    }
}
