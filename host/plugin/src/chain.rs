//! A chain: the plugins of one policy, run in order on the caller's task, and
//! what they decided about a connection, a command, a reply or an event.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use serde_json::{Map, Value};

use qmpgate_protocol::qmp::{Answer, Command, QmpError};
use qmpgate_protocol::schema::QmpSchema;

use crate::faults::{Blame, ClientFaults};
use crate::instance::{Fault, Instance, Loaded, PluginInfo, hook};
use crate::wit::{
    Client, EventVerdict, HmpLine, HmpTranslation, Hooks, ResponseVerdict, Verdict, WitCommand,
    WitDecision, WitError, WitEvent, WitResponse, command_from_wit, command_to_wit, error_answer,
};
use crate::{CHAIN_WAIT, EPOCH_TICK, HMP_LINE_MAX, MAX_QUEUED_JOBS, NO_ANSWER, PluginError};

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

/// One instance of each of a chain's plugins, used by one call at a time.
struct InstanceSet {
    instances: tokio::sync::Mutex<Vec<Instance>>,
    /// Calls waiting for the set; past [`MAX_QUEUED_JOBS`] more fail closed at once.
    waiting: AtomicUsize,
}

/// Counts a call in [`InstanceSet::waiting`] until it is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where calls about one upstream read QEMU's schema (for the `command-schema`
/// import): it is read anew at each reconnect, so it is asked for per call.
pub type SchemaSource = Arc<dyn Fn() -> Option<Arc<QmpSchema>> + Send + Sync>;

/// The plugins of a chain, run in order on every hook.
///
/// A hook runs on the task that asks (no thread hop): each plugin call is a
/// wasmtime future that yields at every epoch tick, so a plugin running to its
/// deadline holds no tokio worker for longer than a tick, and is then stopped.
/// A chain has one *instance set* (an instance of each plugin) per core, made
/// when first used; the calls about one upstream always use the same set, so a
/// plugin's state about a VM and its clients stays in one instance, VMs that
/// share a policy are spread over the cores, and calls about one VM take turns.
#[derive(Clone)]
pub struct PluginChain {
    /// The instance sets; `None` for an empty chain.
    sets: Option<Arc<[InstanceSet]>>,
    plugins: Vec<PluginInfo>,
    /// The upstream this handle serves (see [`PluginChain::for_upstream`]).
    upstream: Option<Arc<str>>,
    /// That upstream's schema.
    schema: Option<SchemaSource>,
    /// The hooks at least one plugin implements: a hook none implements costs no
    /// call into the chain's instances.
    declared: Hooks,
    /// Faults charged to clients, by the chain's calls.
    faults: Arc<ClientFaults>,
    /// How long a caller waits for its turn at the instances: [`CHAIN_WAIT`], or twice
    /// the chain's CPU limits together if that is longer.
    wait: Duration,
}

impl PluginChain {
    /// A chain that lets everything through.
    pub fn empty() -> Self {
        PluginChain {
            sets: None,
            plugins: Vec::new(),
            upstream: None,
            schema: None,
            declared: Hooks::empty(),
            faults: Arc::default(),
            wait: CHAIN_WAIT,
        }
    }

    /// Instantiates every plugin and calls its `init` (the first instance set;
    /// the others are made on first use); the first refusal or trap is returned.
    pub fn start(loaded: Vec<Loaded>) -> Result<Self, PluginError> {
        if loaded.is_empty() {
            return Ok(PluginChain::empty());
        }
        let faults = Arc::new(ClientFaults::default());
        let wait = CHAIN_WAIT.max(2 * loaded.iter().map(|l| l.0.limits.cpu).sum::<Duration>());
        let mut first: Vec<Instance> = loaded
            .into_iter()
            .map(|l| Instance {
                client_faults: faults.clone(),
                ..l.0
            })
            .collect();
        let plugins = first
            .iter()
            .map(|w| PluginInfo {
                name: w.name.clone(),
                profile: serde_json::from_str::<Value>(&w.config)
                    .ok()
                    .and_then(|c| c.get("profile")?.as_str().map(str::to_string)),
                stats: w.stats.clone(),
            })
            .collect();
        let declared = block_on(async {
            let mut declared = Hooks::empty();
            for worker in first.iter_mut() {
                match worker.instantiate().await {
                    Ok(live) => {
                        worker.hooks = live.hooks;
                        declared |= live.hooks;
                        worker.live = Some(live);
                    }
                    Err(reason) => {
                        return Err(PluginError::Init {
                            name: worker.name.to_string(),
                            reason,
                        });
                    }
                }
            }
            Ok(declared)
        })?;
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        let spares: Vec<Vec<Instance>> = (1..count)
            .map(|_| first.iter().map(Instance::spare).collect())
            .collect();
        let sets: Vec<InstanceSet> = std::iter::once(first)
            .chain(spares)
            .map(|instances| InstanceSet {
                instances: tokio::sync::Mutex::new(instances),
                waiting: AtomicUsize::new(0),
            })
            .collect();
        Ok(PluginChain {
            sets: Some(sets.into()),
            plugins,
            upstream: None,
            schema: None,
            declared,
            faults,
            wait,
        })
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
        self.sets.is_some() && self.declared.intersects(hooks)
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

    /// This upstream's instance set, ready for a call about `client`; `None` if
    /// the chain is empty, too many calls are waiting, or the set stayed busy
    /// past the chain's wait (the caller then fails closed).
    async fn instances(
        &self,
        client: &Client,
    ) -> Option<tokio::sync::MutexGuard<'_, Vec<Instance>>> {
        let sets = self.sets.as_ref()?;
        let index = match &self.upstream {
            Some(upstream) => {
                let mut hasher = std::hash::DefaultHasher::new();
                upstream.hash(&mut hasher);
                (hasher.finish() % sets.len() as u64) as usize
            }
            None => 0,
        };
        let set = &sets[index];
        // Far behind: fail closed at once rather than pile up waiting calls.
        if set.waiting.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_JOBS {
            set.waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let waiting = Waiting(&set.waiting);
        // The caller never waits without end for its turn (each call in front of
        // it is bounded by its plugins' deadlines).
        let Ok(mut instances) = tokio::time::timeout(self.wait, set.instances.lock()).await else {
            tracing::warn!(wait = ?self.wait, chain = ?self.describe(), "the plugin chain did not answer in time; failing closed");
            return None;
        };
        drop(waiting);
        let schema = self.schema.as_ref().and_then(|source| source());
        let client = Arc::new(client.clone());
        for worker in instances.iter_mut() {
            worker.upstream = self.upstream.clone();
            worker.client = Some(client.clone());
            worker.schema = schema.clone();
        }
        Some(instances)
    }

    /// A client connected: any plugin may refuse it.
    pub async fn on_connect(&self, client: &Client) -> Result<(), QmpError> {
        if !self.declares(Hooks::ON_CONNECT) {
            return Ok(());
        }
        let Some(mut workers) = self.instances(client).await else {
            return Err(QmpError::generic(NO_ANSWER));
        };
        for worker in workers.iter_mut() {
            if !worker.implements(Hooks::ON_CONNECT) {
                continue;
            }
            match hook!(worker, Blame::Plugin, |g, s| g.call_on_connect(s, client)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) if worker.audit_only => {
                    if let Err(why) = worker.record_would_deny(client, "connection", &e).await {
                        return Err(QmpError::generic(format!(
                            "plugin '{}' (audit mode) could not record its refusal: {why}; \
                             the connection was refused",
                            worker.name
                        )));
                    }
                }
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
        let Some(mut workers) = self.instances(client).await else {
            return Decision::Deny(QmpError::generic(NO_ANSWER));
        };
        decide(&mut workers, client, command, hmp.as_ref()).await
    }

    /// A client's connection ended: plugins that keep state about it drop it.
    pub async fn on_disconnect(&self, client: &Client) {
        if !self.declares(Hooks::ON_DISCONNECT) {
            return;
        }
        let Some(mut workers) = self.instances(client).await else {
            return;
        };
        for worker in workers.iter_mut() {
            if worker.implements(Hooks::ON_DISCONNECT) {
                let _ = hook!(worker, Blame::Plugin, |g, s| g
                    .call_on_disconnect(s, client));
            }
        }
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
        if self.sets.is_none() {
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
        let translation = match self.instances(client).await {
            Some(mut workers) => translate_hmp(&mut workers, line).await,
            None => Err(QmpError::generic(NO_ANSWER)),
        };
        // A line refused before the chain decided is still told to every plugin.
        let refuse = async |reason: String| {
            let denied = Decision::Deny(QmpError::generic(format!(
                "HMP command line refused: {reason}"
            )));
            let hmp = HmpLine {
                typed: line.to_string(),
                canonical: String::new(),
            };
            if self.declares(Hooks::ON_DECISION)
                && let Some(mut workers) = self.instances(client).await
            {
                let command = command_to_wit(&send(line));
                let _ = notify_decision(&mut workers, client, &command, Some(&hmp), &denied).await;
            }
            denied
        };
        let reading = match translation {
            Err(error) => return refuse(error.desc).await,
            // Nobody interprets HMP: the policy decides on `human-monitor-command` itself.
            Ok(None) => return self.decide(client, send(line), Some(as_typed)).await,
            Ok(Some(HmpTranslation::Reading(reading))) => reading,
            // QEMU would answer an unknown command with *success* and a message; an
            // unreadable line is refused instead, so nothing slips past policy.
            Ok(Some(HmpTranslation::Invalid(reason))) => return refuse(reason).await,
            Ok(Some(HmpTranslation::NotHandled)) => unreachable!("translate_hmp skips not-handled"),
        };
        let command = match command_from_wit(reading.command) {
            Ok(command) => command,
            Err(fault) => {
                return refuse(format!("its translation is invalid: {fault}")).await;
            }
        };
        if reading.canonical.len() > HMP_LINE_MAX {
            return refuse(format!(
                "its canonical form is longer than QEMU's {HMP_LINE_MAX}-byte line buffer"
            ))
            .await;
        }
        // One line, and nothing QEMU's line editor would take specially.
        if reading.canonical.chars().any(char::is_control) {
            return refuse("its canonical form has control characters".into()).await;
        }
        let hmp = HmpLine {
            typed: line.to_string(),
            canonical: reading.canonical,
        };
        let canonical = hmp.canonical.clone();
        match self.decide(client, command.clone(), Some(hmp)).await {
            Decision::Forward(judged) if judged == command => Decision::Forward(send(&canonical)),
            // `run_chain` refuses any rewrite of a command read from HMP; should one
            // get through anyway, QEMU must not run a line nobody judged.
            Decision::Forward(_) => Decision::Deny(QmpError::generic(format!(
                "HMP command '{}' refused: it was changed after the policy judged it",
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
        let Some(mut workers) = self.instances(client).await else {
            return error_answer(&QmpError::generic(format!(
                "{NO_ANSWER}; the result was withheld"
            )));
        };
        respond(&mut workers, client, &command_to_wit(command), reply).await
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
        let blame = if asked { Blame::Client } else { Blame::Plugin };
        let Some(mut workers) = self.instances(client).await else {
            return EventDecision::Drop;
        };
        filter_event(&mut workers, client, event, blame).await
    }
}

/// The first interpretation any plugin offers (`None`: no plugin interprets HMP).
async fn translate_hmp(
    workers: &mut [Instance],
    line: &str,
) -> Result<Option<HmpTranslation>, QmpError> {
    for worker in workers {
        if !worker.implements(Hooks::TRANSLATE_HMP) {
            continue;
        }
        match hook!(worker, Blame::Client, |g, s| g.call_translate_hmp(s, line)) {
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

async fn decide(
    workers: &mut [Instance],
    client: &Client,
    command: Command,
    hmp: Option<&HmpLine>,
) -> Decision {
    // Filled in by `run_chain` (the command as the deciding plugin saw it).
    let mut seen = WitCommand {
        name: String::new(),
        arguments: String::new(),
        oob: false,
    };
    let decision = run_chain(workers, client, command, hmp, &mut seen).await;
    let recorded = notify_decision(workers, client, &seen, hmp, &decision).await;
    match (decision, recorded) {
        (decision, Ok(())) | (decision @ Decision::Deny(_), Err(_)) => decision,
        // No decision goes on unrecorded: a stalled audit log refuses the command.
        (_, Err(error)) => Decision::Deny(error),
    }
}

/// Tells every plugin what was decided (for audit). Faults are counted and logged
/// by `Instance::leave` and change nothing, except that a record the audit log
/// did not take is an `Err`: the caller refuses the command rather than run it
/// unrecorded.
async fn notify_decision(
    workers: &mut [Instance],
    client: &Client,
    command: &WitCommand,
    hmp: Option<&HmpLine>,
    decision: &Decision,
) -> Result<(), QmpError> {
    let decision = match decision {
        Decision::Forward(_) => WitDecision::Forwarded,
        Decision::Deny(e) => WitDecision::Denied(WitError {
            class: e.class.clone(),
            desc: e.desc.clone(),
        }),
        Decision::Reply(_) => WitDecision::Answered,
    };
    let mut recorded = Ok(());
    for worker in workers {
        if worker.implements(Hooks::ON_DECISION)
            && let Err(fault @ Fault::AuditStalled(_)) = hook!(worker, Blame::Client, |g, s| g
                .call_on_decision(s, client, command, hmp, &decision))
        {
            recorded = Err(fault_error(worker, &fault, "the command was not executed"));
        }
    }
    recorded
}

/// Runs `on-command` through the chain; `seen` ends as the command the deciding
/// plugin saw.
async fn run_chain(
    workers: &mut [Instance],
    client: &Client,
    mut command: Command,
    hmp: Option<&HmpLine>,
    seen: &mut WitCommand,
) -> Decision {
    let not_run = "the command was not executed";
    // Serialised once for every plugin, and again only after a rewrite.
    *seen = command_to_wit(&command);
    for worker in workers {
        if !worker.implements(Hooks::ON_COMMAND) {
            continue;
        }
        match hook!(worker, Blame::Client, |g, s| g
            .call_on_command(s, client, seen, hmp))
        {
            Ok(Verdict::Forward) => {}
            // QEMU runs an HMP line, not a QMP command: a rewrite cannot be
            // honoured, and running the line would run what the chain did not
            // judge. Refused here, before the plugins are told the decision.
            Ok(Verdict::Rewrite(_)) if hmp.is_some() => {
                return Decision::Deny(QmpError::generic(format!(
                    "HMP command '{}' refused: plugin '{}' rewrote it, and an HMP line \
                     cannot be rewritten",
                    command.name, worker.name
                )));
            }
            Ok(Verdict::Rewrite(new)) => match command_from_wit(new).map_err(Fault::Invalid) {
                Ok(new) => {
                    command = new;
                    *seen = command_to_wit(&command);
                }
                Err(fault) => {
                    worker.charge(Blame::Client);
                    return Decision::Deny(fault_error(worker, &fault, not_run));
                }
            },
            Ok(Verdict::Deny(e)) if worker.audit_only => {
                if let Err(why) = worker.record_would_deny(client, &command.name, &e).await {
                    return Decision::Deny(QmpError::generic(format!(
                        "plugin '{}' (audit mode) could not record its refusal: {why}; {not_run}",
                        worker.name
                    )));
                }
            }
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

async fn respond(
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
        reply = match hook!(worker, Blame::Client, |g, s| g
            .call_on_response(s, client, command, &response))
        {
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

async fn filter_event(
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
        match hook!(worker, blame, |g, s| g.call_on_event(s, client, &event)) {
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

/// Runs `future` to completion on this thread, for what runs outside any task
/// (a chain's start: instantiation and `init`). Plugin calls wait for nothing
/// (hooks cannot block, and an epoch yield wakes its task), so parking the thread
/// for at most a tick between polls is all they need.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park_timeout(EPOCH_TICK);
    }
}
