//! Fault injection on the upstream link (issue 15, item 4): a fake QEMU whose
//! messages are split and merged at random points, interleaved with events, delayed,
//! and reordered within QEMU's rules. The link must route every reply to its asker,
//! lose nothing, and never hang.
//!
//! The rules the fake keeps: in-band commands are answered in the order they came
//! (QEMU runs them one at a time); with OOB negotiated, an `exec-oob` reply may
//! overtake in-band ones; events come between messages at any time after
//! `qmp_capabilities`; output goes out in writes of any size, from one byte to
//! several messages merged, mostly ended by `\r\n` but framed by JSON structure.
//!
//! Every case follows from its seed (the fake's choices and the commands; how they
//! interleave with the gateway's tasks still varies), the failure names the seed,
//! and each case runs under a hard deadline so that a hang fails the test instead of
//! hanging CI.
//!
//! Layout: `Rng` (seeded choices); `Script`, `FakeQemu` and `Fake` (the fake QEMU);
//! `submitter` and `watch_events` (the gateway's side); the cases (`served`,
//! `cut_off`); the tests.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use qmpgate::io::FdTable;
use qmpgate::protocol::chardev::ChardevSpec;
use qmpgate::protocol::qmp::Command;
use qmpgate::upstream::{self, Liveness, MAX_IN_FLIGHT, Outcome, UpstreamEvent, UpstreamHandle};
use serde_json::{Map, Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long one case may take before it counts as hung. A case takes well under a
/// second; this only has to be far above that and far below CI's patience.
const DEADLINE: Duration = Duration::from_secs(15);

/// Events the gateway keeps in its history: more than any case sends, so the history
/// is the complete record the live stream is checked against.
const HISTORY: usize = 4096;

/// Numbered events a case sends at most: below the broadcast buffer (1024), so a
/// watcher that falls behind for a moment cannot lag and miss some.
const MAX_EVENTS: u64 = 900;

/// The negotiation the gateway performs, in order, each step with `"id": 0`.
const NEGOTIATION: [&str; 3] = ["qmp_capabilities", "query-status", "query-qmp-schema"];

/// A small, deterministic generator (SplitMix64): no dependency, and a case is
/// reproduced from its seed alone.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// An independent generator, for another task.
    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

/// What the fake QEMU does in one case; the rest of its choices follow from `seed`.
#[derive(Debug, Clone, Copy)]
struct Script {
    seed: u64,
    /// Offer OOB in the greeting (QEMU always does; older ones and other monitors do not).
    oob: bool,
    /// Answer `query-qmp-schema` with a small valid schema, or with an error (which
    /// the gateway must tolerate: it then checks no arguments, and still serves).
    schema: bool,
    /// Close the link, in the middle of whatever it was writing, once this many
    /// client commands came in; `None`: serve until told to finish.
    close_after: Option<usize>,
}

/// What the fake saw and did, for the checks that need QEMU's side.
#[derive(Debug, Default)]
struct Report {
    /// Client commands (`echo`) received, in-band and OOB.
    commands: usize,
    /// Of those, sent with `exec-oob`.
    oob_commands: usize,
    /// Liveness probes (`query-status` after negotiation) received.
    probes: usize,
    /// Numbered events sent.
    events: u64,
    /// OOB replies sent while in-band commands were still waiting for theirs.
    overtakes: usize,
    /// Writes of output.
    writes: usize,
    /// Of those, writes of a single byte.
    single_bytes: usize,
}

/// A command as the fake received it.
#[derive(Debug)]
struct Request {
    id: Value,
    name: String,
    arguments: Map<String, Value>,
}

/// A fake QEMU on a unix socket in a fresh directory, serving one connection.
struct FakeQemu {
    /// Holds the socket's directory until the case ends.
    _dir: TempDir,
    spec: ChardevSpec,
    /// Tells the fake the askers are done: it answers what is left, sends `DONE`
    /// (with the number of events it sent) and waits for the link to close.
    finish: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<Report>>,
}

impl FakeQemu {
    fn start(script: Script) -> Result<FakeQemu> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("qemu.sock");
        let listener = UnixListener::bind(&path)?;
        let (finish, finishing) = oneshot::channel();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await?;
            let (read, write) = stream.into_split();
            Fake::new(script).serve(read, write, finishing).await
        });
        Ok(FakeQemu {
            spec: ChardevSpec::parse(&format!("socket,id=qemu,path={}", path.display()))?,
            _dir: dir,
            finish: Some(finish),
            task,
        })
    }

    fn finish(&mut self) {
        if let Some(finish) = self.finish.take() {
            let _ = finish.send(());
        }
    }

    async fn report(self) -> Result<Report> {
        self.task.await?
    }
}

/// The fake's state while it serves.
struct Fake {
    script: Script,
    rng: Rng,
    /// Bytes produced and not yet written: whole messages, written in chunks that
    /// ignore message boundaries.
    out: Vec<u8>,
    /// Negotiation commands received so far (at most three), and answered so far:
    /// events may follow the answer to `qmp_capabilities`; numbered ones (which the
    /// gateway must deliver) the answer to `query-qmp-schema`.
    negotiation_received: usize,
    negotiation_answered: usize,
    /// In-band commands not answered yet, oldest first: QEMU answers them in order.
    in_band: VecDeque<Request>,
    /// OOB commands not answered yet.
    oob: VecDeque<Request>,
    /// Every gateway id seen after negotiation: ids are never reused.
    ids: HashSet<u64>,
    report: Report,
}

impl Fake {
    fn new(script: Script) -> Self {
        Fake {
            script,
            rng: Rng::new(script.seed ^ 0xFA4E),
            out: Vec::new(),
            negotiation_received: 0,
            negotiation_answered: 0,
            in_band: VecDeque::new(),
            oob: VecDeque::new(),
            ids: HashSet::new(),
            report: Report::default(),
        }
    }

    async fn serve(
        mut self,
        read: OwnedReadHalf,
        mut write: OwnedWriteHalf,
        mut finish: oneshot::Receiver<()>,
    ) -> Result<Report> {
        let (tx, mut incoming) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_messages(read, tx));
        let capabilities = if self.script.oob {
            json!(["oob"])
        } else {
            json!([])
        };
        self.push(&json!({"QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 10}, "package": "fake"},
            "capabilities": capabilities,
        }}));
        let mut finishing = false;
        let mut done = false;
        loop {
            while let Ok(message) = incoming.try_recv() {
                self.accept(message)?;
            }
            if self
                .script
                .close_after
                .is_some_and(|limit| self.report.commands >= limit)
            {
                // Cut off in the middle of whatever was going out.
                let cut = self.rng.below(self.out.len() + 1);
                write.write_all(&self.out[..cut]).await?;
                reader.abort();
                return Ok(self.report);
            }
            if finishing && !done && self.in_band.is_empty() && self.oob.is_empty() {
                self.push(
                    &json!({"event": "DONE", "data": {"events": self.report.events},
                    "timestamp": {"seconds": 1, "microseconds": 0}}),
                );
                done = true;
            }
            if self.out.is_empty() && self.in_band.is_empty() && self.oob.is_empty() {
                tokio::select! {
                    message = incoming.recv() => match message {
                        Some(message) => self.accept(message)?,
                        // The gateway closed the link (or sent something unreadable).
                        None => break,
                    },
                    _ = &mut finish, if !finishing => finishing = true,
                }
                continue;
            }
            // One step, chosen at random among those possible; the fallbacks make
            // sure every step does something.
            let step = self.rng.below(10);
            if step < 3 && !self.in_band.is_empty() {
                self.answer_in_band();
            } else if step < 5 && !self.oob.is_empty() {
                self.answer_oob();
            } else if step < 6 && self.negotiation_answered > 0 && !done && self.rng.one_in(2) {
                self.event();
            } else if !self.out.is_empty() {
                match self.write_chunk(&mut write).await {
                    Ok(()) => {}
                    // Once `DONE` is out the gateway may leave at any moment, in
                    // the middle of a probe's reply.
                    Err(_) if done => break,
                    Err(e) => return Err(e),
                }
            } else if !self.in_band.is_empty() {
                self.answer_in_band();
            } else {
                self.answer_oob();
            }
        }
        reader.await??;
        ensure!(
            self.script.close_after.is_some() || done,
            "the link closed before the fake was told to finish"
        );
        Ok(self.report)
    }

    /// Checks a message from the gateway and queues it.
    fn accept(&mut self, message: Value) -> Result<()> {
        let Value::Object(mut message) = message else {
            bail!("the gateway sent a non-object: {message}");
        };
        let text = Value::Object(message.clone()).to_string();
        let (name, oob) = match (message.remove("execute"), message.remove("exec-oob")) {
            (Some(Value::String(name)), None) => (name, false),
            (None, Some(Value::String(name))) => (name, true),
            _ => bail!("the gateway sent neither one 'execute' nor one 'exec-oob': {text}"),
        };
        let id = message
            .remove("id")
            .with_context(|| format!("the gateway sent a command without an id: {text}"))?;
        let arguments = match message.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(arguments)) => arguments,
            Some(_) => bail!("the gateway sent arguments that are not an object: {text}"),
        };
        ensure!(message.is_empty(), "unexpected members in {text}");
        let request = Request {
            id,
            name,
            arguments,
        };
        if self.negotiation_received < NEGOTIATION.len() {
            let step = NEGOTIATION[self.negotiation_received];
            ensure!(
                request.name == step && request.id == 0 && !oob,
                "expected {step} with id 0 during negotiation, got {text}"
            );
            if step == "qmp_capabilities" {
                let enable = self
                    .script
                    .oob
                    .then(|| ("enable".to_string(), json!(["oob"])));
                ensure!(
                    request.arguments == enable.into_iter().collect::<Map<_, _>>(),
                    "qmp_capabilities must enable exactly what the greeting offered: {text}"
                );
            }
            self.negotiation_received += 1;
            self.in_band.push_back(request);
            return Ok(());
        }
        let id = request
            .id
            .as_u64()
            .with_context(|| format!("a gateway id is not an integer: {text}"))?;
        ensure!(
            id != 0 && self.ids.insert(id),
            "gateway id {id} reused: {text}"
        );
        match request.name.as_str() {
            "echo" => {
                self.report.commands += 1;
                self.report.oob_commands += usize::from(oob);
            }
            "query-status" if !oob && request.arguments.is_empty() => self.report.probes += 1,
            _ => bail!("unexpected command {text}"),
        }
        if oob {
            ensure!(self.script.oob, "exec-oob without OOB negotiated: {text}");
            self.oob.push_back(request);
        } else {
            self.in_band.push_back(request);
            // QEMU queues at most 8 in-band commands; the gateway keeps at most
            // MAX_IN_FLIGHT of its clients' outstanding (its probe aside).
            let outstanding = self.in_band.iter().filter(|r| r.name == "echo").count();
            ensure!(
                outstanding <= MAX_IN_FLIGHT,
                "{outstanding} in-band commands outstanding, more than {MAX_IN_FLIGHT}"
            );
        }
        Ok(())
    }

    fn answer_in_band(&mut self) {
        let request = self.in_band.pop_front().expect("an in-band command waits");
        if self.negotiation_answered < NEGOTIATION.len() {
            self.negotiation_answered += 1;
        }
        self.answer(request);
    }

    fn answer_oob(&mut self) {
        let request = self.oob.pop_front().expect("an OOB command waits");
        self.report.overtakes += usize::from(!self.in_band.is_empty());
        self.answer(request);
    }

    fn answer(&mut self, request: Request) {
        let body = match request.name.as_str() {
            "qmp_capabilities" => json!({"return": {}}),
            "query-status" => {
                json!({"return": {"status": "running", "singlestep": false, "running": true}})
            }
            "query-qmp-schema" if self.script.schema => json!({"return": schema()}),
            "query-qmp-schema" => json!({"error": {
                "class": "CommandNotFound",
                "desc": "The command query-qmp-schema has not been found",
            }}),
            // Whose arguments, and how many numbered events went out before it: the
            // reply must reach the asker, and fall between those events.
            _ => json!({"return": {"echo": request.arguments, "after": self.report.events}}),
        };
        let mut reply = body;
        reply["id"] = request.id;
        self.push(&reply);
    }

    /// An event, between two messages (never after `DONE`). Until the schema is answered the gateway has
    /// nobody to deliver events to: those are noise it must skip; after it, events
    /// are numbered and every one must reach the watcher, in order.
    fn event(&mut self) {
        if self.negotiation_answered < NEGOTIATION.len() {
            self.push(&json!({"event": "NOISE", "data": {},
                "timestamp": {"seconds": 1, "microseconds": 0}}));
        } else if self.report.events < MAX_EVENTS {
            let n = self.report.events;
            self.report.events += 1;
            self.push(&json!({"event": "X", "data": {"n": n},
                "timestamp": {"seconds": 1_700_000_000 + n, "microseconds": n % 1_000_000}}));
        }
    }

    /// Queues a message: QEMU ends each with `\r\n`; now and then the fake does not,
    /// since framing is by JSON structure.
    fn push(&mut self, message: &Value) {
        self.out
            .extend(serde_json::to_vec(message).expect("a Value serialises"));
        if !self.rng.one_in(8) {
            self.out.extend_from_slice(b"\r\n");
        }
    }

    /// Writes a chunk of the output of random size: a byte, a few, a few hundred, or
    /// everything queued (several messages merged); sometimes pauses after it.
    async fn write_chunk(&mut self, write: &mut OwnedWriteHalf) -> Result<()> {
        let len = match self.rng.below(4) {
            0 => 1,
            1 => 1 + self.rng.below(16),
            2 => 1 + self.rng.below(512),
            _ => self.out.len(),
        }
        .min(self.out.len());
        write.write_all(&self.out[..len]).await?;
        self.out.drain(..len);
        self.report.writes += 1;
        self.report.single_bytes += usize::from(len == 1);
        match self.rng.below(16) {
            0 => {
                let pause = Duration::from_micros(1 + self.rng.below(3000) as u64);
                tokio::time::sleep(pause).await;
            }
            1..=3 => tokio::task::yield_now().await,
            _ => {}
        }
        Ok(())
    }
}

/// A small valid introspection: `echo` and `query-status`, their types, and an event.
fn schema() -> Value {
    json!([
        {"name": "echo", "meta-type": "command", "arg-type": "0", "ret-type": "any",
         "allow-oob": true},
        {"name": "query-status", "meta-type": "command", "arg-type": "1", "ret-type": "any"},
        {"name": "X", "meta-type": "event", "arg-type": "1"},
        {"name": "0", "meta-type": "object", "members": [
            {"name": "task", "type": "int"},
            {"name": "i", "type": "int"},
            {"name": "text", "type": "str"},
        ]},
        {"name": "1", "meta-type": "object", "members": []},
        {"name": "int", "meta-type": "builtin", "json-type": "int"},
        {"name": "str", "meta-type": "builtin", "json-type": "string"},
        {"name": "any", "meta-type": "builtin", "json-type": "value"},
    ])
}

/// Reads the gateway's commands as QEMU does, by JSON structure (whatever the line
/// breaks), and passes each on; ends when the gateway closes the link.
async fn read_messages(mut read: OwnedReadHalf, tx: mpsc::UnboundedSender<Value>) -> Result<()> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match read.read(&mut chunk).await {
            // The gateway left with a reply unread (a probe's, at the end): the
            // caller checks whether it was time to leave.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            read => read?,
        };
        if n == 0 {
            ensure!(
                buf.iter().all(u8::is_ascii_whitespace),
                "the gateway left a partial message: {:?}",
                String::from_utf8_lossy(&buf)
            );
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut messages = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        let mut consumed = 0;
        loop {
            match messages.next() {
                Some(Ok(message)) => {
                    consumed = messages.byte_offset();
                    // The fake may be gone already (it cut the link): nothing to do.
                    let _ = tx.send(message);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => bail!("the gateway sent invalid JSON: {e}"),
                None => break,
            }
        }
        buf.drain(..consumed);
    }
}

/// Strings that trip a careless framer: brackets and quotes inside strings, escapes
/// (which a chunk may split), multi-byte characters, control characters.
fn awkward_text(rng: &mut Rng) -> String {
    const PIECES: &[&str] = &[
        "{", "}", "[", "]", "\"", "\\", "'", "\r\n", ",", ":", "é", "😀", "\u{0}", "\t", "abc",
        " ", "\\u0041", "}{",
    ];
    (0..rng.below(12))
        .map(|_| PIECES[rng.below(PIECES.len())])
        .collect()
}

/// What one asker got back.
#[derive(Debug, Default)]
struct Tally {
    /// `(seq, after)` of each correct reply: its place in QEMU's stream, and how many
    /// numbered events the fake sent before it.
    replies: Vec<(u64, u64)>,
    /// Error replies (only accepted when the link is cut).
    errors: usize,
}

/// One asker: submits `count` commands in bursts of one to six (a quarter of them OOB
/// when `oob`), then checks that every reply carries its own arguments, and that its
/// in-band replies come in the order it asked. With `cut`, error replies are
/// accepted (and counted): the link is cut under it.
async fn submitter(
    handle: UpstreamHandle,
    task: usize,
    count: usize,
    oob: bool,
    cut: bool,
    mut rng: Rng,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut last_in_band = 0;
    let mut i = 0;
    while i < count {
        let burst = (1 + rng.below(6)).min(count - i);
        let mut waiting = Vec::with_capacity(burst);
        for _ in 0..burst {
            let oob = oob && rng.one_in(4);
            let Value::Object(arguments) =
                json!({"task": task, "i": i, "text": awkward_text(&mut rng)})
            else {
                unreachable!()
            };
            let command = Command {
                name: "echo".into(),
                arguments: arguments.clone(),
                oob,
            };
            waiting.push((arguments, oob, handle.submit(command).await));
            i += 1;
        }
        for (arguments, oob, pending) in waiting {
            let upstream::Reply { seq, body } = pending.reply().await;
            let body = body.into_object();
            let asked = Value::Object(arguments);
            if cut && body.contains_key("error") {
                let error = &body["error"];
                ensure!(
                    body.len() == 1 && error["class"].is_string() && error["desc"].is_string(),
                    "task {task}: {asked} got a malformed error {body:?}"
                );
                tally.errors += 1;
                continue;
            }
            let answer = body.get("return").and_then(Value::as_object);
            ensure!(
                body.len() == 1 && answer.and_then(|a| a.get("echo")) == Some(&asked),
                "task {task}: {asked} got the reply {body:?}"
            );
            let after = answer
                .and_then(|a| a.get("after"))
                .and_then(Value::as_u64)
                .with_context(|| format!("task {task}: no 'after' in {body:?}"))?;
            if !oob {
                ensure!(
                    seq > last_in_band,
                    "task {task}: in-band reply to {asked} (seq {seq}) came before the previous one (seq {last_in_band})"
                );
                last_in_band = seq;
            }
            tally.replies.push((seq, after));
        }
    }
    Ok(tally)
}

/// The numbered events (`X`) a subscriber sees until the event named `until`, as
/// `(seq, n)`. Lagging, or a lost link when not waiting for one, fails.
async fn watch_events(
    mut events: broadcast::Receiver<Arc<UpstreamEvent>>,
    until: &'static str,
) -> Result<Vec<(u64, u64)>> {
    let mut seen = Vec::new();
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(e) => bail!("the event stream failed after {} events: {e}", seen.len()),
        };
        match event.body.get("event").and_then(Value::as_str) {
            Some(name) if name == until => return Ok(seen),
            Some("X") => seen.push((
                event.seq,
                event.body["data"]["n"].as_u64().unwrap_or(u64::MAX),
            )),
            Some("QMPGATE_UPSTREAM_LOST") => bail!("the link was lost: {:?}", event.body),
            _ => {}
        }
    }
}

/// The numbered events in the gateway's history, as `(seq, n)`.
fn numbered(handle: &UpstreamHandle) -> Vec<(u64, u64)> {
    handle
        .events_since(0)
        .iter()
        .filter(|e| e.body.get("event").and_then(Value::as_str) == Some("X"))
        .map(|e| (e.seq, e.body["data"]["n"].as_u64().unwrap_or(u64::MAX)))
        .collect()
}

/// Checks that events 0, 1, 2, ... are there in order, none missing, with rising seqs.
fn check_in_order(events: &[(u64, u64)]) -> Result<()> {
    for (k, window) in events.windows(2).enumerate() {
        ensure!(
            window[0].0 < window[1].0,
            "event seqs do not rise at {k}: {events:?}"
        );
    }
    for (k, &(_, n)) in events.iter().enumerate() {
        ensure!(
            n == k as u64,
            "event {k} is numbered {n}: one was lost or reordered"
        );
    }
    Ok(())
}

/// Checks that a subscriber saw the end of the history, unchanged. It subscribes
/// once the link is up, and the link's task may publish the first events before
/// that (those QEMU sent with the schema's reply, or right after it): the history
/// has those too.
fn check_end_of(live: &[(u64, u64)], history: &[(u64, u64)]) -> Result<()> {
    ensure!(
        live.len() <= history.len() && live == &history[history.len() - live.len()..],
        "the live stream ({} events, first {:?}) is not the end of the history ({} events, first {:?})",
        live.len(),
        live.first(),
        history.len(),
        history.first(),
    );
    Ok(())
}

/// Askers in one case.
const TASKS: usize = 8;

/// Opens the link to the fake, negotiates, and starts the link's task.
async fn connect(
    fake: &FakeQemu,
    liveness: Liveness,
    shutdown: &CancellationToken,
) -> Result<(UpstreamHandle, JoinHandle<Outcome>)> {
    Ok(upstream::connect(
        fake.spec.clone(),
        &mut FdTable::default(),
        HISTORY,
        liveness,
        shutdown.clone(),
    )
    .await?)
}

/// One served case: 8 askers x `per_task` commands against a fake QEMU that splits,
/// merges, delays and reorders; every reply must reach its asker and every event the
/// watcher, in QEMU's order.
async fn served(seed: u64, per_task: usize) -> Result<Report> {
    let mut rng = Rng::new(seed);
    let script = Script {
        seed,
        oob: seed.is_multiple_of(2),
        schema: !seed.is_multiple_of(3),
        close_after: None,
    };
    // Some cases probe liveness whenever nothing is outstanding (or after a
    // millisecond of quiet), so probes (the gateway's own commands) mix with its
    // clients'.
    let liveness = Liveness {
        quiet: match seed / 2 % 3 {
            1 => Some(Duration::ZERO),
            2 => Some(Duration::from_millis(1)),
            _ => None,
        },
        timeout: Duration::from_secs(30),
        ..Liveness::default()
    };
    let mut fake = FakeQemu::start(script)?;
    let shutdown = CancellationToken::new();
    let (handle, task) = connect(&fake, liveness, &shutdown).await?;
    let info = handle.info();
    ensure!(info.oob == script.oob, "OOB negotiated: {}", info.oob);
    ensure!(info.run_state == "running", "run state {}", info.run_state);
    ensure!(
        handle.schema().map(|s| s.has_command("echo")) == script.schema.then_some(true),
        "schema read: {}, given: {}",
        handle.schema().is_some(),
        script.schema
    );
    let watcher = tokio::spawn(watch_events(handle.subscribe(), "DONE"));
    let askers: Vec<_> = (0..TASKS)
        .map(|t| {
            let asker = submitter(handle.clone(), t, per_task, script.oob, false, rng.fork());
            tokio::spawn(asker)
        })
        .collect();
    let mut replies = Vec::new();
    for asker in askers {
        replies.extend(asker.await??.replies);
    }
    fake.finish();
    let live = watcher.await??;

    let history = numbered(&handle);
    check_in_order(&history).context("in the history")?;
    check_end_of(&live, &history)?;
    let total = history.len() as u64;
    for &(seq, after) in &replies {
        let index = after as usize;
        ensure!(
            after <= total
                && (after == 0 || history[index - 1].0 < seq)
                && (after == total || seq < history[index].0),
            "a reply (seq {seq}) sent after {after} events is not between events {} and {after}",
            after as i64 - 1
        );
    }

    shutdown.cancel();
    let outcome = task.await?;
    ensure!(
        outcome == Outcome::Shutdown,
        "the link ended with {outcome:?}"
    );
    let report = fake.report().await?;
    ensure!(
        report.events == total,
        "the fake sent {} events, the gateway kept {total}",
        report.events
    );
    ensure!(
        report.commands == TASKS * per_task && replies.len() == TASKS * per_task,
        "{} commands reached QEMU and {} replies came back, of {}",
        report.commands,
        replies.len(),
        TASKS * per_task
    );
    Ok(report)
}

/// One case where the fake cuts the link after `close_after` commands, in the middle
/// of whatever it was writing: every asker gets either its own reply or an error,
/// none hangs, and the watcher hears of the loss.
async fn cut_off(seed: u64, per_task: usize) -> Result<()> {
    let mut rng = Rng::new(seed);
    let script = Script {
        seed,
        oob: seed.is_multiple_of(2),
        schema: true,
        close_after: Some(1 + rng.below(TASKS * per_task * 3 / 4)),
    };
    let mut fake = FakeQemu::start(script)?;
    let shutdown = CancellationToken::new();
    // The fake stops reading when it cuts the link, while it writes its last bytes:
    // if the gateway is writing to it then, both wait on the other until the
    // gateway's write deadline (the liveness timeout) ends the link. A short one
    // keeps that case well inside DEADLINE on a loaded machine.
    let liveness = Liveness {
        quiet: None,
        timeout: Duration::from_secs(2),
        ..Liveness::default()
    };
    let (handle, task) = connect(&fake, liveness, &shutdown).await?;
    let watcher = tokio::spawn(watch_events(handle.subscribe(), "QMPGATE_UPSTREAM_LOST"));
    let askers: Vec<_> = (0..TASKS)
        .map(|t| {
            let asker = submitter(handle.clone(), t, per_task, script.oob, true, rng.fork());
            tokio::spawn(asker)
        })
        .collect();
    let mut errors = 0;
    let mut answered = 0;
    for asker in askers {
        let tally = asker.await??;
        errors += tally.errors;
        answered += tally.replies.len();
    }
    ensure!(
        errors > 0,
        "the link was cut, yet all {answered} commands were answered"
    );
    let outcome = task.await?;
    ensure!(
        matches!(outcome, Outcome::Lost(_)),
        "the link ended with {outcome:?}"
    );
    handle.lost().await;
    ensure!(
        !handle.info().connected,
        "the link still counts as connected"
    );
    let live = watcher.await??;
    let history = numbered(&handle);
    check_in_order(&history).context("in the history")?;
    check_end_of(&live, &history)?;
    fake.finish();
    let report = fake.report().await?;
    ensure!(
        answered <= report.commands,
        "{answered} answers for {} commands",
        report.commands
    );
    Ok(())
}

/// Runs `case` for each seed, each under [`DEADLINE`], and names the seed that fails.
async fn for_seeds<F, T>(seeds: std::ops::Range<u64>, case: impl Fn(u64) -> F) -> Result<Vec<T>>
where
    F: Future<Output = Result<T>>,
{
    let mut results = Vec::new();
    for seed in seeds {
        let result = tokio::time::timeout(DEADLINE, case(seed))
            .await
            .map_err(|_| anyhow::anyhow!("hung for {DEADLINE:?}"))
            .and_then(|r| r)
            .with_context(|| format!("seed {seed}"))?;
        results.push(result);
    }
    Ok(results)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_merged_delayed_and_reordered_output_still_reaches_every_asker_in_order() -> Result<()>
{
    let reports = for_seeds(0..20, |seed| served(seed, 200)).await?;
    // The faults did happen: OOB replies overtook in-band ones, output went out one
    // byte at a time and merged, probes mixed in.
    let sum = |f: fn(&Report) -> usize| reports.iter().map(f).sum::<usize>();
    ensure!(
        sum(|r| r.overtakes) > 0,
        "no OOB reply overtook an in-band one"
    );
    ensure!(sum(|r| r.oob_commands) > 0, "no OOB command was sent");
    ensure!(sum(|r| r.single_bytes) > 0, "no single-byte write");
    ensure!(sum(|r| r.probes) > 0, "no liveness probe mixed in");
    ensure!(
        reports.iter().all(|r| r.events > 0),
        "a case sent no events"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_cut_mid_stream_answers_every_pending_asker_with_an_error() -> Result<()> {
    for_seeds(0..10, |seed| cut_off(seed, 60)).await?;
    Ok(())
}

/// QEMU may send an event in the same write as a negotiation reply, before or after
/// it, and the schema's reply may share a write with the first events and part of the
/// next: start-up must not hang, the events after negotiation must all be delivered,
/// and an error in place of the schema is tolerated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sharing_writes_with_negotiation_replies_neither_hang_nor_get_lost() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("qemu.sock");
    let listener = UnixListener::bind(&path)?;
    let event = |name: &str, n: u64| {
        serde_json::to_vec(&json!({"event": name, "data": {"n": n},
            "timestamp": {"seconds": 1, "microseconds": 0}}))
        .expect("a Value serialises")
    };
    let reply = |value: Value| {
        let mut bytes =
            serde_json::to_vec(&json!({"return": value, "id": 0})).expect("a Value serialises");
        bytes.extend_from_slice(b"\r\n");
        bytes
    };
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        let (read, mut write) = stream.into_split();
        let (tx, mut incoming) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_messages(read, tx));
        let mut expect = async |name: &str| -> Result<Value> {
            let message = incoming.recv().await.context("the gateway closed")?;
            ensure!(message["execute"] == name, "expected {name}, got {message}");
            Ok(message)
        };
        // The greeting, in two writes split inside a member name.
        let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
        write.write_all(&greeting[..12]).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
        write
            .write_all(&[&greeting[12..], b"\r\n"].concat())
            .await?;
        // The reply, then an event, in one write.
        expect("qmp_capabilities").await?;
        write
            .write_all(&[reply(json!({})), event("NOISE", 0)].concat())
            .await?;
        // An event, then the reply, merged with no line break.
        expect("query-status").await?;
        write
            .write_all(&[event("NOISE", 1), reply(json!({"status": "running"}))].concat())
            .await?;
        // An event, an error for the schema, the first numbered event, and the first
        // half of the second: all in one write.
        expect("query-qmp-schema").await?;
        let second = [event("X", 1), b"\r\n".to_vec()].concat();
        let (head, tail) = second.split_at(second.len() / 2);
        let error = br#"{"error": {"class": "CommandNotFound", "desc": "The command query-qmp-schema has not been found"}, "id": 0}"#;
        write
            .write_all(
                &[
                    &event("NOISE", 2),
                    &b"\r\n"[..],
                    error,
                    b"\r\n",
                    &event("X", 0),
                    head,
                ]
                .concat(),
            )
            .await?;
        // The rest of the event and the first command's reply, in one write.
        let command = expect("echo").await?;
        let answer = json!({"return": {"echo": command["arguments"]}, "id": command["id"]});
        write
            .write_all(&[tail, &serde_json::to_vec(&answer)?, b"\r\n"].concat())
            .await?;
        while incoming.recv().await.is_some() {}
        reader.await?
    });

    tokio::time::timeout(DEADLINE, async {
        let spec = ChardevSpec::parse(&format!("socket,id=qemu,path={}", path.display()))?;
        let shutdown = CancellationToken::new();
        let (handle, task) = upstream::connect(
            spec,
            &mut FdTable::default(),
            HISTORY,
            Liveness::default(),
            shutdown.clone(),
        )
        .await?;
        ensure!(handle.info().oob, "OOB was offered");
        ensure!(handle.schema().is_none(), "an error is no schema");
        let Value::Object(arguments) = json!({"text": "}{\"\\"}) else {
            unreachable!()
        };
        let command = Command {
            name: "echo".into(),
            arguments: arguments.clone(),
            oob: false,
        };
        let upstream::Reply { seq, body } = handle.submit(command).await.reply().await;
        let body = body.into_object();
        ensure!(
            body.get("return") == Some(&json!({"echo": arguments})),
            "reply {body:?}"
        );
        let events = numbered(&handle);
        check_in_order(&events)?;
        ensure!(events.len() == 2, "events after negotiation: {events:?}");
        ensure!(events[1].0 < seq, "the reply came after both events");
        shutdown.cancel();
        ensure!(task.await? == Outcome::Shutdown);
        server.await?
    })
    .await
    .context("hung")?
}
