//! A chain: the plugins of one policy, run in order on their own thread, and
//! what they decided about a connection, a command, a reply or an event.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Map, Value};

use qmpgate_protocol::qmp::{Answer, Command, QmpError};
use qmpgate_protocol::schema::QmpSchema;

use crate::faults::{Blame, ClientFaults};
use crate::instance::{Fault, Instance, Loaded, PluginInfo};
use crate::wit::{
    Client, EventVerdict, HmpLine, HmpTranslation, Hooks, ResponseVerdict, Verdict, WitCommand,
    WitDecision, WitError, WitEvent, WitResponse, command_from_wit, command_to_wit, error_answer,
};
use crate::{CHAIN_WAIT, HMP_LINE_MAX, MAX_QUEUED_JOBS, NO_ANSWER, PluginError};

/// The chain's decision on a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send this (possibly rewritten) command upstream.
    Forward(Command),
    /// Refuse with this error.
    Deny(QmpError),
    /// Answer with this `return` value.
    Reply(Value),
}

/// The chain's decision on an event for one client.
#[derive(Debug, Clone, PartialEq)]
pub enum EventDecision {
    /// Deliver as is.
    Deliver,
    /// Deliver with this `data`.
    Rewrite(Value),
    /// Do not deliver to this client.
    Drop,
}

fn fault_error(plugin: &Instance, fault: &Fault, what: &str) -> QmpError {
    QmpError::generic(format!("qmpgate plugin '{}' {fault}; {what}", plugin.name))
}

type Job = Box<dyn FnOnce(&mut [Instance]) + Send>;

/// Where calls about one upstream read QEMU's schema (for the `command-schema`
/// import): it is read anew at each reconnect, so it is asked for per call.
pub type SchemaSource = Arc<dyn Fn() -> Option<Arc<QmpSchema>> + Send + Sync>;

/// The plugins of a chain, run in order on every hook.
///
/// All of a chain's instances live on one OS thread of its own, and a hook runs the
/// whole chain in one trip to that thread: wasm never runs on a tokio worker (a
/// plugin spinning to its deadline stalls no connection), WASI's synchronous stdio
/// (a guest's panic message) may block freely, and the cost of a thread hop is paid
/// once per hook, not once per plugin. Calls from all clients take turns; hooks
/// take microseconds.
#[derive(Clone)]
pub struct PluginChain {
    /// Sends work to the chain's thread; `None` for an empty chain.
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    plugins: Vec<PluginInfo>,
    /// The upstream this handle serves (see [`PluginChain::for_upstream`]).
    upstream: Option<Arc<str>>,
    /// That upstream's schema.
    schema: Option<SchemaSource>,
    /// The hooks at least one plugin implements: a hook none implements costs no
    /// trip to the chain's thread.
    declared: Hooks,
    /// Faults charged to clients, by the chain's thread.
    faults: Arc<ClientFaults>,
    /// How long a caller waits for the chain's thread: [`CHAIN_WAIT`], or twice
    /// the chain's CPU limits together if that is longer.
    wait: Duration,
}

impl PluginChain {
    /// A chain that lets everything through.
    pub fn empty() -> Self {
        PluginChain {
            jobs: None,
            plugins: Vec::new(),
            upstream: None,
            schema: None,
            declared: Hooks::empty(),
            faults: Arc::default(),
            wait: CHAIN_WAIT,
        }
    }

    /// Starts the chain's thread, instantiates every plugin there and calls its
    /// `init`; the first refusal or trap is returned.
    pub fn start(loaded: Vec<Loaded>) -> Result<Self, PluginError> {
        if loaded.is_empty() {
            return Ok(PluginChain::empty());
        }
        let faults = Arc::new(ClientFaults::default());
        let wait = CHAIN_WAIT.max(2 * loaded.iter().map(|l| l.0.limits.cpu).sum::<Duration>());
        let mut workers: Vec<Instance> = loaded
            .into_iter()
            .map(|l| Instance {
                client_faults: faults.clone(),
                ..l.0
            })
            .collect();
        let plugins = workers
            .iter()
            .map(|w| PluginInfo {
                name: w.name.clone(),
                profile: serde_json::from_str::<Value>(&w.config)
                    .ok()
                    .and_then(|c| c.get("profile")?.as_str().map(str::to_string)),
                stats: w.stats.clone(),
            })
            .collect();
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(MAX_QUEUED_JOBS);
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<Hooks, PluginError>>();
        std::thread::Builder::new()
            .name("qmpgate-plugins".into())
            .spawn(move || {
                let mut declared = Hooks::empty();
                for worker in workers.iter_mut() {
                    match worker.instantiate() {
                        Ok(live) => {
                            worker.hooks = live.hooks;
                            declared |= live.hooks;
                            worker.live = Some(live);
                        }
                        Err(reason) => {
                            let _ = ready_tx.send(Err(PluginError::Init {
                                name: worker.name.to_string(),
                                reason,
                            }));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(declared));
                // Ends when the last PluginChain clone (the senders) is dropped.
                while let Ok(job) = queue.recv() {
                    job(&mut workers);
                }
            })
            .map_err(|e| PluginError::Init {
                name: "(chain)".into(),
                reason: format!("cannot start its thread: {e}"),
            })?;
        match ready.recv() {
            Ok(Ok(declared)) => Ok(PluginChain {
                jobs: Some(jobs),
                plugins,
                upstream: None,
                schema: None,
                declared,
                faults,
                wait,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PluginError::Init {
                name: "(chain)".into(),
                reason: "its thread stopped".into(),
            }),
        }
    }

    /// The chain as status and logs show it: each plugin's name, with the profile
    /// it enforces when it has one (`["hmp", "policy (profile=safe)"]`).
    pub fn describe(&self) -> Vec<String> {
        self.plugins()
            .iter()
            .map(|p| match &p.profile {
                Some(profile) => format!("{} (profile={profile})", p.name),
                None => p.name.to_string(),
            })
            .collect()
    }

    /// The plugins, in chain order.
    pub fn plugins(&self) -> &[PluginInfo] {
        &self.plugins
    }

    /// A handle on the same chain (the same instances) for upstream `id`'s traffic:
    /// audit records made during its calls name the upstream, and plugins read
    /// its QEMU's schema from `schema`.
    pub fn for_upstream(&self, id: &str, schema: SchemaSource) -> PluginChain {
        PluginChain {
            upstream: Some(id.into()),
            schema: Some(schema),
            ..self.clone()
        }
    }

    /// Whether a plugin of the chain implements any of `hooks`.
    fn declares(&self, hooks: Hooks) -> bool {
        self.jobs.is_some() && self.declared.intersects(hooks)
    }

    /// Faults `client`'s input (or its principal's, over its connections) caused
    /// in this chain's plugins within [`crate::CLIENT_FAULT_WINDOW`]; a session
    /// disconnects its client at [`crate::CLIENT_FAULT_LIMIT`].
    pub fn client_faults(&self, client: &Client) -> usize {
        self.faults.recent(client)
    }

    /// Whether `other` is a clone of this chain (the same instances).
    pub fn same_as(&self, other: &PluginChain) -> bool {
        match (self.plugins.first(), other.plugins.first()) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a.stats, &b.stats),
            (None, None) => true,
            _ => false,
        }
    }

    /// Runs `job` on the chain's thread and waits for its result; `fallback` if the
    /// thread is gone (callers handle the empty chain before calling).
    async fn run<R: Send + 'static>(
        &self,
        client: &Client,
        fallback: R,
        job: impl FnOnce(&mut [Instance]) -> R + Send + 'static,
    ) -> R {
        let Some(jobs) = &self.jobs else {
            return fallback;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let upstream = self.upstream.clone();
        let schema = self.schema.as_ref().and_then(|source| source());
        let client = Arc::new(client.clone());
        let job: Job = Box::new(move |workers| {
            if tx.is_closed() {
                // Its caller stopped waiting: nothing to decide.
                return;
            }
            for worker in workers.iter_mut() {
                worker.upstream = upstream.clone();
                worker.client = Some(client.clone());
                worker.schema = schema.clone();
            }
            let _ = tx.send(job(workers));
        });
        // A full queue means the thread is far behind: fail closed at once rather
        // than pile up work (and memory) it would reach too late.
        if jobs.try_send(job).is_err() {
            return fallback;
        }
        // The caller never waits without end, whatever holds the chain's thread
        // (hooks cannot wait, but the thread serves every client of the chain).
        match tokio::time::timeout(self.wait, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => fallback,
            Err(_) => {
                tracing::warn!(wait = ?self.wait, chain = ?self.describe(), "the plugin chain did not answer in time; failing closed");
                fallback
            }
        }
    }

    /// A client connected: any plugin may refuse it.
    pub async fn on_connect(&self, client: &Client) -> Result<(), QmpError> {
        if !self.declares(Hooks::ON_CONNECT) {
            return Ok(());
        }
        let client = client.clone();
        let stopped = Err(QmpError::generic(NO_ANSWER));
        self.run(&client.clone(), stopped, move |workers| {
            for worker in workers {
                if !worker.implements(Hooks::ON_CONNECT) {
                    continue;
                }
                match worker.call(Blame::Plugin, |g, s| g.call_on_connect(s, &client)) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        worker.stats.denials.fetch_add(1, Ordering::Relaxed);
                        return Err(QmpError {
                            class: e.class,
                            desc: e.desc,
                        });
                    }
                    Err(fault) => {
                        return Err(fault_error(worker, &fault, "the connection was refused"));
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// A command: each plugin may forward, rewrite, deny or answer it; the first
    /// deny or answer ends the chain. A faulting plugin denies.
    pub async fn on_command(&self, client: &Client, command: Command) -> Decision {
        self.decide(client, command, None).await
    }

    /// As [`PluginChain::on_command`], for a command read from an HMP line.
    async fn decide(&self, client: &Client, command: Command, hmp: Option<HmpLine>) -> Decision {
        if !self.declares(Hooks::ON_COMMAND | Hooks::ON_DECISION) {
            return Decision::Forward(command);
        }
        let client = client.clone();
        let stopped = Decision::Deny(QmpError::generic(NO_ANSWER));
        self.run(&client.clone(), stopped, move |workers| {
            decide(workers, &client, command, hmp.as_ref())
        })
        .await
    }

    /// A client's connection ended: plugins that keep state about it drop it.
    pub async fn on_disconnect(&self, client: &Client) {
        if !self.declares(Hooks::ON_DISCONNECT) {
            return;
        }
        let client = client.clone();
        self.run(&client.clone(), (), move |workers| {
            for worker in workers {
                if worker.implements(Hooks::ON_DISCONNECT) {
                    let _ = worker.call(Blame::Plugin, |g, s| g.call_on_disconnect(s, &client));
                }
            }
        })
        .await
    }

    /// An HMP command line (typed on an HMP listener, or sent with QMP's
    /// `human-monitor-command`): the first plugin that interprets HMP reads it and
    /// rebuilds it canonically, and the chain decides on that reading. `Forward`
    /// carries the `human-monitor-command` that sends QEMU the *canonical* line:
    /// QEMU runs exactly what the policy judged (the typed line is kept for audit
    /// only), and its own HMP output is what the user sees. Without a plugin that
    /// interprets HMP, the chain decides on `human-monitor-command` with the typed
    /// line itself.
    ///
    /// `cpu_index` is `human-monitor-command`'s own argument (the vCPU the line
    /// runs on), passed on as the client gave it.
    pub async fn on_hmp(&self, client: &Client, line: &str, cpu_index: Option<Value>) -> Decision {
        let send = |line: &str| {
            let mut arguments = Map::new();
            arguments.insert("command-line".into(), Value::from(line));
            if let Some(cpu_index) = &cpu_index {
                arguments.insert("cpu-index".into(), cpu_index.clone());
            }
            Command {
                name: "human-monitor-command".into(),
                arguments,
                oob: false,
            }
        };
        if self.jobs.is_none() {
            return Decision::Forward(send(line));
        }
        if line.len() > HMP_LINE_MAX {
            return Decision::Deny(QmpError::generic(format!(
                "HMP command line refused: longer than QEMU's {HMP_LINE_MAX}-byte line buffer"
            )));
        }
        let as_typed = HmpLine {
            typed: line.to_string(),
            canonical: line.to_string(),
        };
        if !self.declares(Hooks::TRANSLATE_HMP) {
            return self.decide(client, send(line), Some(as_typed)).await;
        }
        let owned_line = line.to_string();
        let translation = self
            .run(client, Err(QmpError::generic(NO_ANSWER)), move |workers| {
                translate_hmp(workers, &owned_line)
            })
            .await;
        let reading = match translation {
            Err(error) => return Decision::Deny(error),
            // Nobody interprets HMP: the policy decides on `human-monitor-command` itself.
            Ok(None) => return self.decide(client, send(line), Some(as_typed)).await,
            Ok(Some(HmpTranslation::Reading(reading))) => reading,
            Ok(Some(HmpTranslation::Invalid(reason))) => {
                // QEMU would answer an unknown command with *success* and a message;
                // an unreadable line is refused instead, so nothing slips past policy.
                let denied = Decision::Deny(QmpError::generic(format!(
                    "HMP command line refused: {reason}"
                )));
                let hmp = HmpLine {
                    typed: line.to_string(),
                    canonical: String::new(),
                };
                if self.declares(Hooks::ON_DECISION) {
                    let (client, command, told) =
                        (client.clone(), command_to_wit(&send(line)), denied.clone());
                    self.run(&client.clone(), (), move |workers| {
                        notify_decision(workers, &client, &command, Some(&hmp), &told)
                    })
                    .await;
                }
                return denied;
            }
            Ok(Some(HmpTranslation::NotHandled)) => unreachable!("translate_hmp skips not-handled"),
        };
        let command = match command_from_wit(reading.command) {
            Ok(command) => command,
            Err(fault) => {
                return Decision::Deny(QmpError::generic(format!(
                    "HMP translation returned an invalid result: {fault}"
                )));
            }
        };
        if reading.canonical.len() > HMP_LINE_MAX {
            return Decision::Deny(QmpError::generic(format!(
                "HMP command line refused: its canonical form is longer than QEMU's \
                 {HMP_LINE_MAX}-byte line buffer"
            )));
        }
        let hmp = HmpLine {
            typed: line.to_string(),
            canonical: reading.canonical,
        };
        let canonical = hmp.canonical.clone();
        match self.decide(client, command.clone(), Some(hmp)).await {
            Decision::Forward(judged) if judged == command => Decision::Forward(send(&canonical)),
            // QEMU runs the line, not a QMP command: a rewrite cannot be honoured,
            // and forwarding the line unchanged would run what was not judged.
            Decision::Forward(_) => Decision::Deny(QmpError::generic(format!(
                "HMP command '{}' refused: a plugin rewrote it, and an HMP line cannot be \
                 rewritten",
                command.name
            ))),
            other => other,
        }
    }

    /// QEMU's reply to `command`: plugins may replace it. A faulting plugin turns it
    /// into an error (QEMU did run the command; the client is told the result was
    /// withheld).
    pub async fn on_response(&self, client: &Client, command: &Command, reply: Answer) -> Answer {
        if !self.declares(Hooks::ON_RESPONSE) {
            return reply;
        }
        let (client, command) = (client.clone(), command_to_wit(command));
        let stopped = error_answer(&QmpError::generic(format!(
            "{NO_ANSWER}; the result was withheld"
        )));
        self.run(&client.clone(), stopped, move |workers| {
            respond(workers, &client, &command, reply)
        })
        .await
    }

    /// An event for one client: plugins may drop or rewrite its data. A faulting
    /// plugin drops it (fail closed: an event may carry what a policy hides).
    ///
    /// `asked` is true when the client asked for the event (a replay of the
    /// history): a fault is then charged to it, since it chose when and how often
    /// the hook runs; a live event's fault is the plugin's own.
    pub async fn on_event(
        &self,
        client: &Client,
        name: &str,
        body: &Map<String, Value>,
        asked: bool,
    ) -> EventDecision {
        if !self.declares(Hooks::ON_EVENT) {
            return EventDecision::Deliver;
        }
        let timestamp = body.get("timestamp");
        let field = |k: &str| {
            timestamp
                .and_then(|t| t.get(k))
                .and_then(Value::as_i64)
                .unwrap_or(0)
        };
        let event = WitEvent {
            name: name.to_string(),
            data: body
                .get("data")
                .map(Value::to_string)
                .unwrap_or_else(|| "{}".into()),
            seconds: field("seconds"),
            microseconds: field("microseconds"),
        };
        let client = client.clone();
        let blame = if asked { Blame::Client } else { Blame::Plugin };
        self.run(&client.clone(), EventDecision::Drop, move |workers| {
            filter_event(workers, &client, event, blame)
        })
        .await
    }
}

/// The first interpretation any plugin offers (`None`: no plugin interprets HMP).
fn translate_hmp(workers: &mut [Instance], line: &str) -> Result<Option<HmpTranslation>, QmpError> {
    for worker in workers {
        if !worker.implements(Hooks::TRANSLATE_HMP) {
            continue;
        }
        match worker.call(Blame::Client, |g, s| g.call_translate_hmp(s, line)) {
            Ok(HmpTranslation::NotHandled) => continue,
            Ok(translation) => return Ok(Some(translation)),
            Err(fault) => {
                return Err(fault_error(
                    worker,
                    &fault,
                    "the HMP command was not executed",
                ));
            }
        }
    }
    Ok(None)
}

fn decide(
    workers: &mut [Instance],
    client: &Client,
    command: Command,
    hmp: Option<&HmpLine>,
) -> Decision {
    let mut seen = command_to_wit(&command);
    let decision = run_chain(workers, client, command, hmp, &mut seen);
    notify_decision(workers, client, &seen, hmp, &decision);
    decision
}

/// Tells every plugin what was decided (for audit). Faults are counted and logged
/// by `Instance::call` and change nothing: the decision stands.
fn notify_decision(
    workers: &mut [Instance],
    client: &Client,
    command: &WitCommand,
    hmp: Option<&HmpLine>,
    decision: &Decision,
) {
    let decision = match decision {
        Decision::Forward(_) => WitDecision::Forwarded,
        Decision::Deny(e) => WitDecision::Denied(WitError {
            class: e.class.clone(),
            desc: e.desc.clone(),
        }),
        Decision::Reply(_) => WitDecision::Answered,
    };
    for worker in workers {
        if worker.implements(Hooks::ON_DECISION) {
            let _ = worker.call(Blame::Client, |g, s| {
                g.call_on_decision(s, client, command, hmp, &decision)
            });
        }
    }
}

/// Runs `on-command` through the chain; `seen` ends as the command the deciding
/// plugin saw.
fn run_chain(
    workers: &mut [Instance],
    client: &Client,
    mut command: Command,
    hmp: Option<&HmpLine>,
    seen: &mut WitCommand,
) -> Decision {
    let not_run = "the command was not executed";
    for worker in workers {
        if !worker.implements(Hooks::ON_COMMAND) {
            continue;
        }
        *seen = command_to_wit(&command);
        match worker.call(Blame::Client, |g, s| {
            g.call_on_command(s, client, seen, hmp)
        }) {
            Ok(Verdict::Forward) => {}
            Ok(Verdict::Rewrite(new)) => match command_from_wit(new).map_err(Fault::Invalid) {
                Ok(new) => command = new,
                Err(fault) => {
                    worker.charge(Blame::Client);
                    return Decision::Deny(fault_error(worker, &fault, not_run));
                }
            },
            Ok(Verdict::Deny(e)) => {
                worker.stats.denials.fetch_add(1, Ordering::Relaxed);
                return Decision::Deny(QmpError {
                    class: e.class,
                    desc: e.desc,
                });
            }
            Ok(Verdict::Reply(text)) => {
                return match serde_json::from_str(&text) {
                    Ok(value) => Decision::Reply(value),
                    Err(e) => {
                        worker.stats.traps.fetch_add(1, Ordering::Relaxed);
                        worker.charge(Blame::Client);
                        let fault = Fault::Invalid(format!("reply is not JSON: {e}"));
                        Decision::Deny(fault_error(worker, &fault, not_run))
                    }
                };
            }
            Err(fault) => return Decision::Deny(fault_error(worker, &fault, not_run)),
        }
    }
    Decision::Forward(command)
}

fn respond(
    workers: &mut [Instance],
    client: &Client,
    command: &WitCommand,
    mut reply: Answer,
) -> Answer {
    let withheld = "the result was withheld";
    for worker in workers {
        if !worker.implements(Hooks::ON_RESPONSE) {
            continue;
        }
        // A `return` goes to the plugin as the text QEMU wrote (no tree is built).
        let response = match &reply {
            Answer::Return(text) => WitResponse::Ok(text.to_string()),
            Answer::Object(object) => match (object.get("return"), object.get("error")) {
                (Some(value), _) => WitResponse::Ok(value.to_string()),
                (None, Some(error)) => WitResponse::Error(WitError {
                    class: error
                        .get("class")
                        .and_then(Value::as_str)
                        .unwrap_or("GenericError")
                        .into(),
                    desc: error
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .into(),
                }),
                (None, None) => return reply,
            },
        };
        reply = match worker.call(Blame::Client, |g, s| {
            g.call_on_response(s, client, command, &response)
        }) {
            Ok(ResponseVerdict::Deliver) => continue,
            Ok(ResponseVerdict::Replace(WitResponse::Ok(text))) => {
                match serde_json::from_str::<Value>(&text) {
                    Ok(value) => Answer::returning(&value),
                    Err(e) => {
                        worker.stats.traps.fetch_add(1, Ordering::Relaxed);
                        worker.charge(Blame::Client);
                        let fault = Fault::Invalid(format!("replacement is not JSON: {e}"));
                        error_answer(&fault_error(worker, &fault, withheld))
                    }
                }
            }
            Ok(ResponseVerdict::Replace(WitResponse::Error(e))) => error_answer(&QmpError {
                class: e.class,
                desc: e.desc,
            }),
            Err(fault) => error_answer(&fault_error(worker, &fault, withheld)),
        };
    }
    reply
}

fn filter_event(
    workers: &mut [Instance],
    client: &Client,
    mut event: WitEvent,
    blame: Blame,
) -> EventDecision {
    let mut rewritten = None;
    for worker in workers {
        if !worker.implements(Hooks::ON_EVENT) {
            continue;
        }
        match worker.call(blame, |g, s| g.call_on_event(s, client, &event)) {
            Ok(EventVerdict::Deliver) => {}
            Ok(EventVerdict::Drop) | Err(_) => return EventDecision::Drop,
            Ok(EventVerdict::Rewrite(data)) => match serde_json::from_str::<Value>(&data) {
                Ok(value @ Value::Object(_)) => {
                    event.data = data;
                    rewritten = Some(value);
                }
                _ => {
                    worker.stats.traps.fetch_add(1, Ordering::Relaxed);
                    return EventDecision::Drop;
                }
            },
        }
    }
    match rewritten {
        Some(data) => EventDecision::Rewrite(data),
        None => EventDecision::Deliver,
    }
}
