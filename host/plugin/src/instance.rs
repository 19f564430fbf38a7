//! One plugin instance: its compiled component, live store, deadline and memory
//! cap, the output caps on what it returns, and how its faults are told.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use thiserror::Error;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtx;

use crate::audit::AuditSink;
use crate::faults::{Blame, ClientFaults};
use crate::host::{HostState, MemoryCap, cut};
use crate::stats::PluginStats;
use qmpgate_protocol::schema::QmpSchema;

use crate::wit::{
    self, Client, EventVerdict, Exports, HmpTranslation, Hooks, Pre, ResponseVerdict, Verdict,
    WitCommand, WitError, WitResponse,
};
use crate::{
    DESC_MAX, EPOCH_TICK, INIT_DEADLINE_FACTOR, LOG_BURST, Limits, MAX_RESOURCES, OUTPUT_MAX,
    RESTART_BUDGET, RESTART_WINDOW,
};

/// A live instance and its store.
pub(crate) struct Live {
    store: Store<HostState>,
    exports: Exports,
    /// The hooks its `init` said it implements.
    pub(crate) hooks: Hooks,
}

/// How a hook call failed. Every fault fails closed.
#[derive(Debug, Error)]
pub enum Fault {
    /// The CPU deadline stopped the call.
    #[error("exceeded its CPU time limit ({0} ms)")]
    Deadline(u128),
    /// The call hit the memory cap.
    #[error("exceeded its memory limit ({0} MiB)")]
    Memory(usize),
    /// Any other trap (panic, unreachable, ...).
    #[error("trapped: {0}")]
    Trap(String),
    /// The plugin used up its restart budget and is down for a while.
    #[error("is disabled: it failed {0} times within {1} s")]
    Disabled(usize, u64),
    /// The instance could not be recreated.
    #[error("could not be restarted: {0}")]
    Restart(String),
    /// The audit log did not take a record the call wrote (a stalled disk).
    #[error("could not record its audit entry: the audit log did not take it within {}", crate::audit::wait_text(*.0))]
    AuditStalled(std::time::Duration),
    /// It returned something invalid (e.g. a reply that is not JSON).
    #[error("returned an invalid result: {0}")]
    Invalid(String),
}

/// A hook's result, checked against the output caps ([`OUTPUT_MAX`],
/// [`DESC_MAX`]): `oversized` says what is too long, if anything.
pub(crate) trait Bounded {
    fn oversized(&self) -> Option<String>;
}

fn oversized_json(text: &str, what: &str) -> Option<String> {
    (text.len() > OUTPUT_MAX).then(|| format!("{what} longer than {OUTPUT_MAX} bytes"))
}

fn oversized_text(text: &str, what: &str) -> Option<String> {
    (text.len() > DESC_MAX).then(|| format!("{what} longer than {DESC_MAX} bytes"))
}

fn oversized_error(error: &WitError) -> Option<String> {
    oversized_text(&error.class, "an error class")
        .or_else(|| oversized_text(&error.desc, "an error description"))
}

fn oversized_command(command: &WitCommand) -> Option<String> {
    oversized_text(&command.name, "a command name")
        .or_else(|| oversized_json(&command.arguments, "arguments"))
}

impl Bounded for () {
    fn oversized(&self) -> Option<String> {
        None
    }
}

impl Bounded for Result<(), WitError> {
    fn oversized(&self) -> Option<String> {
        self.as_ref().err().and_then(oversized_error)
    }
}

impl Bounded for Verdict {
    fn oversized(&self) -> Option<String> {
        match self {
            Verdict::Forward => None,
            Verdict::Rewrite(command) => oversized_command(command),
            Verdict::Deny(error) => oversized_error(error),
            Verdict::Reply(text) => oversized_json(text, "a reply"),
        }
    }
}

impl Bounded for ResponseVerdict {
    fn oversized(&self) -> Option<String> {
        match self {
            ResponseVerdict::Deliver => None,
            ResponseVerdict::Replace(WitResponse::Ok(text)) => oversized_json(text, "a response"),
            ResponseVerdict::Replace(WitResponse::Error(error)) => oversized_error(error),
        }
    }
}

impl Bounded for EventVerdict {
    fn oversized(&self) -> Option<String> {
        match self {
            EventVerdict::Rewrite(data) => oversized_json(data, "event data"),
            EventVerdict::Deliver | EventVerdict::Drop => None,
        }
    }
}

impl Bounded for HmpTranslation {
    fn oversized(&self) -> Option<String> {
        match self {
            HmpTranslation::NotHandled => None,
            HmpTranslation::Reading(reading) => oversized_command(&reading.command)
                .or_else(|| oversized_text(&reading.canonical, "a canonical line")),
            HmpTranslation::Invalid(reason) => oversized_text(reason, "a reason"),
        }
    }
}

/// One plugin's compiled component and live instance, in one of its chain's
/// instance sets.
pub(crate) struct Instance {
    pub(crate) name: Arc<str>,
    pub(crate) engine: Engine,
    pub(crate) pre: Pre<HostState>,
    pub(crate) config: String,
    pub(crate) limits: Limits,
    pub(crate) audit: Option<Arc<AuditSink>>,
    /// The live instance; `None` after a trap until the next call recreates it.
    pub(crate) live: Option<Live>,
    /// The plugin's own faults within the last `RESTART_WINDOW`, per upstream.
    pub(crate) own_faults: HashMap<Option<Arc<str>>, VecDeque<Instant>>,
    /// Faults charged to clients (shared with the chain's sessions).
    pub(crate) client_faults: Arc<ClientFaults>,
    pub(crate) stats: Arc<PluginStats>,
    /// The upstream whose traffic the current job is about, for audit records.
    pub(crate) upstream: Option<Arc<str>>,
    /// The client the current job is about, for audit records.
    pub(crate) client: Option<Arc<Client>>,
    /// QEMU's schema on the current job's upstream, for `command-schema`.
    pub(crate) schema: Option<Arc<QmpSchema>>,
    /// The hooks the first instance's `init` declared: the chain calls no other
    /// (later instances of the same component declare the same).
    pub(crate) hooks: Hooks,
    /// A hook call is in progress. Still set when the next call starts, it means
    /// the caller dropped that call half-way (it stopped waiting): the instance
    /// may be in any state, so it is recreated.
    pub(crate) in_call: bool,
    /// Audit mode: its refusals are recorded, not enforced.
    pub(crate) audit_only: bool,
}

impl Instance {
    fn deadline_ticks(&self) -> u64 {
        (self.limits.cpu.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }

    /// Instantiation and `init` run once per instance, not per command: they get
    /// [`INIT_DEADLINE_FACTOR`] times a hook's limit (at least a second), since the
    /// deadline is wall time and a loaded host can keep the plugin thread off the
    /// CPU for longer than a hook's 50 ms.
    fn init_deadline_ticks(&self) -> u64 {
        let ticks_per_second = (1000 / EPOCH_TICK.as_millis()) as u64;
        (self.deadline_ticks() * INIT_DEADLINE_FACTOR).max(ticks_per_second)
    }

    /// Another instance of the same plugin, not instantiated yet (for another
    /// instance set of the chain): same component, configuration, limits, counters,
    /// declared hooks and mode; its own faults.
    pub(crate) fn spare(&self) -> Instance {
        Instance {
            name: self.name.clone(),
            engine: self.engine.clone(),
            pre: self.pre.clone(),
            config: self.config.clone(),
            limits: self.limits,
            audit: self.audit.clone(),
            live: None,
            own_faults: HashMap::new(),
            client_faults: self.client_faults.clone(),
            stats: self.stats.clone(),
            upstream: None,
            client: None,
            schema: None,
            hooks: self.hooks,
            in_call: false,
            audit_only: self.audit_only,
        }
    }

    /// Instantiates the component and calls `init`. Takes `&mut self` although it
    /// changes nothing: its future holds the instance across awaits, and an
    /// `Instance` is `Send` but not `Sync` (WASI's context is not).
    pub(crate) async fn instantiate(&mut self) -> Result<Live, String> {
        let state = HostState {
            plugin: self.name.clone(),
            upstream: None,
            client: None,
            schema: None,
            // No environment, arguments, preopened directories, sockets or stdin.
            // Random bytes come from one host call the deadline cannot interrupt:
            // a small cap keeps that call short.
            wasi: WasiCtx::builder().max_random_size(4096).build(),
            table: {
                // Host-side entries (pollables, streams) live outside the plugin's
                // memory cap: bounded by count instead.
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_RESOURCES);
                table
            },
            memory: MemoryCap {
                max: self.limits.memory_bytes,
                hit: false,
                high_water: 0,
            },
            audit: self.audit.clone(),
            stats: self.stats.clone(),
            log_tokens: f64::from(LOG_BURST),
            log_refilled: Instant::now(),
            audits_this_call: 0,
            ticks_left: 0,
            audit_stalled: false,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        // At every epoch tick the call yields to the executor (other tasks run),
        // until its budget of ticks is spent: then it traps, as a deadline.
        store.epoch_deadline_callback(|mut store| {
            let left = &mut store.data_mut().ticks_left;
            if *left == 0 {
                return Err(Trap::Interrupt.into());
            }
            *left -= 1;
            Ok(UpdateDeadline::Yield(1))
        });
        store.data_mut().ticks_left = self.init_deadline_ticks().saturating_sub(1);
        store.set_epoch_deadline(1);
        let exports = match &self.pre {
            Pre::V0_1(pre) => pre.instantiate_async(&mut store).await.map(Exports::V0_1),
            Pre::V0_2(pre) => pre.instantiate_async(&mut store).await.map(Exports::V0_2),
        }
        .map_err(|e| self.describe(&store, e).to_string())?;
        store.data_mut().ticks_left = self.init_deadline_ticks().saturating_sub(1);
        store.set_epoch_deadline(1);
        match exports.guest().call_init(&mut store, &self.config).await {
            Ok(Ok(hooks)) => Ok(Live {
                store,
                exports,
                hooks,
            }),
            Ok(Err(reason)) => Err(cut(&reason, DESC_MAX).into_owned()),
            Err(e) => Err(self.describe(&store, e).to_string()),
        }
    }

    fn describe(&self, store: &Store<HostState>, error: wasmtime::Error) -> Fault {
        if store.data().memory.hit {
            return Fault::Memory(self.limits.memory_bytes >> 20);
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Fault::Deadline(self.limits.cpu.as_millis()),
            // The trap's own words; the wasm backtrace goes to the log, not to clients.
            Some(trap) => {
                tracing::debug!(plugin = &*self.name, error = %format!("{error:#}"), "trap details");
                Fault::Trap(trap.to_string())
            }
            // A host function's error (the outermost context is wasmtime's
            // backtrace note): its own first line.
            None => Fault::Trap(
                error
                    .root_cause()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("unknown error")
                    .to_string(),
            ),
        }
    }

    /// Whether the plugin's own faults have used up its budget on the current
    /// job's upstream (other upstreams sharing the chain are not affected).
    fn disabled(&mut self) -> bool {
        let Some(times) = self.own_faults.get_mut(&self.upstream) else {
            return false;
        };
        let now = Instant::now();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            times.pop_front();
        }
        times.len() >= RESTART_BUDGET
    }

    /// Charges a fault to whoever's input caused it (see [`Blame`]).
    pub(crate) fn charge(&mut self, blame: Blame) {
        match (blame, &self.client) {
            (Blame::Client, Some(client)) => self.client_faults.charge(client),
            _ => self
                .own_faults
                .entry(self.upstream.clone())
                .or_default()
                .push_back(Instant::now()),
        }
    }

    /// Runs one hook on the live instance (recreating it if a trap killed it).
    /// A fault is charged as `blame` says.
    /// Whether the plugin said it implements `hook`.
    pub(crate) fn implements(&self, hook: Hooks) -> bool {
        self.hooks.contains(hook)
    }

    /// Readies a hook call: refuses it if the plugin is down on this upstream,
    /// (re)creates the instance when a trap or a dropped call killed it, and arms
    /// the deadline. The call itself is made by [`hook!`], which then hands the
    /// result to [`Instance::leave`]; `Ok` carries when the call started.
    pub(crate) async fn enter(&mut self) -> Result<Instant, Fault> {
        let started = Instant::now();
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        // A plugin that keeps failing by itself stays down on this upstream (every
        // call refused) until the window has passed, or a reload.
        if self.disabled() {
            self.stats.disabled_calls.fetch_add(1, Ordering::Relaxed);
            return Err(Fault::Disabled(RESTART_BUDGET, RESTART_WINDOW.as_secs()));
        }
        if std::mem::take(&mut self.in_call) {
            // The last call was dropped half-way: start afresh.
            self.live = None;
        }
        if self.live.is_none() {
            self.stats.restarts.fetch_add(1, Ordering::Relaxed);
            self.in_call = true;
            let instantiated = self.instantiate().await;
            self.in_call = false;
            match instantiated {
                Ok(live) => self.live = Some(live),
                Err(reason) => {
                    self.charge(Blame::Plugin);
                    return Err(Fault::Restart(reason));
                }
            }
        }
        let deadline = self.deadline_ticks();
        let (upstream, client, schema) = (
            self.upstream.clone(),
            self.client.clone(),
            self.schema.clone(),
        );
        let live = self.live.as_mut().expect("just ensured");
        live.store.set_epoch_deadline(1);
        let data = live.store.data_mut();
        data.ticks_left = deadline.saturating_sub(1);
        data.upstream = upstream;
        data.client = client;
        data.schema = schema;
        data.audits_this_call = 0;
        data.audit_stalled = false;
        self.in_call = true;
        Ok(started)
    }

    /// Ends a hook call begun with [`Instance::enter`]: checks the result
    /// against the output caps, turns a trap into a [`Fault`] (dropping the
    /// instance) and charges faults as `blame` says.
    pub(crate) fn leave<R: Bounded>(
        &mut self,
        started: Instant,
        blame: Blame,
        result: wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        self.in_call = false;
        let live = self.live.as_mut().expect("entered");
        let high_water = live.store.data().memory.high_water as u64;
        self.stats
            .memory_high_water
            .fetch_max(high_water, Ordering::Relaxed);
        let result = match result {
            Ok(value) => match value.oversized() {
                None => Ok(value),
                Some(what) => {
                    // Dropped at once: the caps bound what a plugin's output
                    // costs the host after it was copied out.
                    drop(value);
                    self.stats.traps.fetch_add(1, Ordering::Relaxed);
                    self.charge(blame);
                    Err(Fault::Invalid(what))
                }
            },
            Err(e) => {
                let live = self.live.take().expect("still there");
                let stalled = live.store.data().audit_stalled;
                let fault = if stalled {
                    let wait = live.store.data().audit.as_ref().map(|a| a.wait());
                    Fault::AuditStalled(wait.unwrap_or(crate::AUDIT_WAIT))
                } else {
                    self.describe(&live.store, e)
                };
                self.stats.traps.fetch_add(1, Ordering::Relaxed);
                match fault {
                    Fault::Deadline(_) => self.stats.deadline_kills.fetch_add(1, Ordering::Relaxed),
                    Fault::Memory(_) => self.stats.memory_kills.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                // A stalled audit log is nobody's doing.
                if !stalled {
                    self.charge(blame);
                }
                tracing::warn!(
                    plugin = &*self.name,
                    upstream = self.upstream.as_deref(),
                    client = self.client.as_ref().map(|c| c.id),
                    ?blame,
                    error = %fault,
                    "plugin fault; the instance will be recreated"
                );
                Err(fault)
            }
        };
        let elapsed = started.elapsed();
        self.stats
            .busy_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.stats.record_latency(elapsed);
        result
    }

    /// The live instance's hooks and store, between `enter` and `leave`.
    pub(crate) fn live(&mut self) -> (wit::Guest<'_>, &mut Store<HostState>) {
        let live = self.live.as_mut().expect("entered");
        (live.exports.guest(), &mut live.store)
    }
}

/// Runs one hook on an [`Instance`]: `hook!(worker, blame, |g, s| CALL)` with
/// `CALL` a `g.call_*(s, ...)` future; a fault is charged as `blame` says, and the
/// result is `Result<_, Fault>`. (A macro rather than a method taking an async
/// closure: the call borrows the instance's exports and store across an await.)
macro_rules! hook {
    ($worker:expr, $blame:expr, |$g:ident, $s:ident| $call:expr) => {{
        let worker: &mut $crate::instance::Instance = $worker;
        match worker.enter().await {
            Err(fault) => Err(fault),
            Ok(started) => {
                let result = {
                    let ($g, $s) = worker.live();
                    $call.await
                };
                worker.leave(started, $blame, result)
            }
        }
    }};
}
pub(crate) use hook;

/// A compiled, linked plugin, not instantiated yet.
pub struct Loaded(pub(crate) Instance);

/// A plugin in a running chain, as status reports it.
#[derive(Clone)]
pub struct PluginInfo {
    /// The configured name.
    pub name: Arc<str>,
    /// The `profile` of its configuration, when it has one (the built-in policy's),
    /// so that status shows which profile a chain enforces.
    pub profile: Option<String>,
    /// Its counters.
    pub stats: Arc<PluginStats>,
}

impl Loaded {
    /// Runs the plugin in audit mode: its refusals are recorded, not enforced.
    pub fn audit_only(mut self) -> Self {
        self.0.audit_only = true;
        self
    }
}

impl Instance {
    /// Records a refusal this audit-mode plugin would have made (`what`: the
    /// command or `connection`): a warning in the log, a record in the audit log
    /// (or the log's audit target), and its counter. `Err` when the audit log did
    /// not take the record in time: as for any decision, nothing goes on
    /// unrecorded, so the caller refuses. `&mut self` for the same reason as
    /// [`Instance::instantiate`]: its future holds the instance across an await.
    pub(crate) async fn record_would_deny(
        &mut self,
        client: &Client,
        what: &str,
        error: &WitError,
    ) -> Result<(), String> {
        self.stats.would_deny.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            plugin = &*self.name,
            client = client.id,
            listener = %client.listener,
            upstream = %client.upstream,
            what,
            reason = %error.desc,
            "audit mode: would refuse; let through"
        );
        let entry = serde_json::json!({
            "would-deny": what,
            "error": {"class": &error.class, "desc": &error.desc},
            "mode": "audit",
        });
        let record = crate::audit::record(
            &self.name,
            Some(&client.upstream),
            Some(wit::client_json(client)),
            &entry.to_string(),
        );
        let Some(sink) = &self.audit else {
            tracing::info!(target: "qmpgate::audit", record = %record, "audit");
            return Ok(());
        };
        let stalled = || {
            format!(
                "the audit log did not take the record within {}",
                crate::audit::wait_text(sink.wait())
            )
        };
        let written = sink.write(&record).ok_or_else(stalled)?;
        match tokio::time::timeout(sink.wait(), written).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("the audit log could not be written: {e}")),
            Ok(Err(_)) => Err("the audit writer has stopped".into()),
            Err(_) => Err(stalled()),
        }
    }
}
