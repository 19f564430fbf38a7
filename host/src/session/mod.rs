//! Client sessions (QMP and HMP) and the narrow context they run on: one
//! listener's view of its upstream (the QEMU link, the chain its clients pass,
//! limits, counters and the client registry), and running a command in QEMU under
//! its deadline.
//!
//! Nothing here knows the gateway's registries: the gateway builds a [`Context`]
//! per listener and hands each accepted client to [`serve`].
//!
//! Layout: [`Context`]; [`SessionLimits`], [`Admission`] and [`Timeouts`];
//! [`Metrics`] and [`ClientRegistry`] (what status reads); [`serve`], which runs
//! [`qmp`] or [`hmp`]; [`run_command`] and its deadline helpers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use qmpgate_plugin_host::{self as plugin, PluginChain};
use qmpgate_protocol::chardev::{MonitorMode, Peer};
use qmpgate_protocol::qmp::{Command, QmpError, error_response};

use crate::io::Stream;
use crate::io::tls::CertIdentity;
use crate::upstream::{Liveness, Reply, UpstreamHandle};
use qmpgate_protocol::lock;

pub mod hmp;
pub mod qmp;

pub use self::qmp::{CLIENT_INPUT_BUDGET, MAX_CLIENT_QUEUE, MAX_CLIENT_UPSTREAM, QUERY_EVENTS};

/// One listener's view of its upstream: all a session needs.
pub struct Context {
    /// The listener chardev's id (shown to plugins as the client's `listener`).
    pub id: String,
    /// QMP or HMP.
    pub mode: MonitorMode,
    /// The upstream's id.
    pub upstream_id: String,
    /// The QEMU behind the listener.
    pub upstream: UpstreamHandle,
    /// The chain this listener's clients pass (its own, or its upstream's), shared
    /// with the gateway's entry so that a reload replaces it; commands already
    /// deciding finish on the chain they started with.
    pub chain: Arc<RwLock<PluginChain>>,
    /// Limits for its sessions: the gateway's, shared by every upstream.
    pub limits: Arc<SessionLimits>,
    /// The upstream's counters.
    pub metrics: Arc<Metrics>,
    /// The upstream's connected clients.
    pub registry: Arc<ClientRegistry>,
    /// How long this listener's clients wait for QEMU: the gateway's timeouts, or
    /// the listener's own (`timeout-ms=`).
    pub timeouts: Timeouts,
    /// Whether fds its clients send with `getfd`/`add-fd` travel on to QEMU
    /// (`fds=pass`); otherwise the kernel closes them on arrival.
    pub pass_fds: bool,
}

impl Context {
    /// The chain a command starts on now.
    pub fn chain(&self) -> PluginChain {
        lock::read(&self.chain).clone()
    }

    /// Counts `command` (as the client named it) with what became of it.
    pub fn count_command(&self, command: &str, verdict: Verdict) {
        let known = matches!(
            command,
            "qmp_capabilities" | "query-qmpgate-events" | "human-monitor-command"
        ) || self
            .upstream
            .schema()
            .is_some_and(|schema| schema.has_command(command));
        let name = if known { command } else { OTHER_COMMAND };
        let mut counts = lock::mutex(&self.metrics.by_command);
        // No allocation once a name has been seen.
        let slot = match counts.get_mut(name) {
            Some(slot) => slot,
            None => counts.entry(name.to_string()).or_default(),
        };
        slot[verdict as usize] += 1;
    }
}

/// What became of a client's command, for [`Metrics::count_command`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Sent to QEMU (as the plugins left it).
    Forwarded,
    /// Refused by a plugin (or the gateway's own checks).
    Denied,
    /// Answered by a plugin or by qmpgate itself, without QEMU.
    Answered,
}

impl Verdict {
    /// Every verdict, in the order of [`Metrics::by_command`]'s counts.
    pub const ALL: [Verdict; 3] = [Verdict::Forwarded, Verdict::Denied, Verdict::Answered];

    /// The `verdict` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::Denied => "denied",
            Verdict::Answered => "answered",
        }
    }
}

/// The command label for names QEMU's schema does not have: a client chooses the
/// names it sends, and must not grow the label set without bound.
pub const OTHER_COMMAND: &str = "other";

/// One upstream's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Commands by name and verdict. Names are QEMU's (in its schema) or
    /// qmpgate's own; any other is counted as [`OTHER_COMMAND`], so the set is
    /// bounded by QEMU's command set.
    pub by_command: Mutex<BTreeMap<String, [u64; Verdict::ALL.len()]>>,
    /// Clients connected now.
    pub clients_connected: AtomicU64,
    /// Clients accepted since start.
    pub clients_total: AtomicU64,
    /// Messages received from clients.
    pub commands: AtomicU64,
    /// Commands refused by a plugin.
    pub denied: AtomicU64,
    /// Clients disconnected for not reading.
    pub slow_clients: AtomicU64,
    /// Clients disconnected because their input kept making plugins fail.
    pub faulting_clients: AtomicU64,
    /// Connections refused by the caps on clients and handshakes.
    pub refused_clients: AtomicU64,
}

/// Limits every session works under, whichever upstream it serves.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Framing limit on one client message, in bytes.
    pub max_message: usize,
    /// Framing limit on nesting depth.
    pub max_depth: usize,
    /// How long a client waits for QEMU's answer, per command.
    pub timeouts: Timeouts,
    /// Events kept per upstream for clients that reconnect.
    pub event_history: usize,
    /// How each upstream notices a QEMU that stopped answering.
    pub liveness: Liveness,
    /// How long a write to a client (QMP, HMP, control monitor, status endpoint)
    /// may stay blocked before the client is disconnected as one that does not
    /// read; [`DEFAULT_WRITE_TIMEOUT`].
    pub write_timeout: Duration,
    /// Caps on connections.
    pub admission: Admission,
    /// Connections (clients of every listener, status requests) the process may
    /// hold at once: its fd limit less [`Admission::fd_reserve`], so that QEMU
    /// links, listeners and the control monitor always have fds.
    pub connections: Arc<tokio::sync::Semaphore>,
}

/// Caps on connections: no listener or peer can use up the fds and tasks that the
/// others, QEMU's links and the control monitor need.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Clients one listener serves at once (TLS handshakes included).
    pub max_clients: usize,
    /// TLS handshakes in progress on one listener.
    pub max_handshakes: usize,
    /// How long a TLS client may take to complete its handshake.
    pub handshake_timeout: Duration,
    /// Fds kept out of the connections' reach.
    pub fd_reserve: usize,
    /// Connections the status endpoint serves at once.
    pub status_connections: usize,
    /// How long an HTTP client may take to send its request headers.
    pub status_header_timeout: Duration,
    /// `/events` streams served at once.
    pub status_subscribers: usize,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_clients: 64,
            max_handshakes: 16,
            handshake_timeout: Duration::from_secs(5),
            fd_reserve: 512,
            status_connections: 64,
            status_header_timeout: Duration::from_secs(5),
            status_subscribers: 16,
        }
    }
}

impl Admission {
    /// The process-wide connection budget: the soft fd limit less the reserve
    /// (at least 16, so that a tiny limit still serves someone).
    pub fn connection_budget(&self) -> usize {
        use nix::sys::resource::{Resource, getrlimit};
        let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        (usize::try_from(soft).unwrap_or(usize::MAX))
            .saturating_sub(self.fd_reserve)
            .max(16)
    }
}

/// Counters of one upstream's clients, for status (`ClientRegistry` holds who
/// is connected now).
/// One upstream's connected clients and how its QEMU ended, for status.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    pub(crate) clients: Mutex<BTreeMap<u64, ClientEntry>>,
    pub(crate) qemu_exit: Mutex<Option<String>>,
}

#[derive(Debug, Clone)]
pub(crate) struct ClientEntry {
    pub(crate) listener: String,
    pub(crate) peer: Peer,
    pub(crate) since: u64,
}

/// Removes a client from the registry when its session ends.
pub struct ClientGuard {
    registry: Arc<ClientRegistry>,
    id: u64,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        lock::mutex(&self.registry.clients).remove(&self.id);
    }
}

impl ClientRegistry {
    /// Records a connected client until the guard is dropped.
    pub fn client(self: &Arc<Self>, id: u64, listener: &str, peer: &Peer) -> ClientGuard {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        lock::mutex(&self.clients).insert(
            id,
            ClientEntry {
                listener: listener.to_string(),
                peer: peer.clone(),
                since,
            },
        );
        ClientGuard {
            registry: self.clone(),
            id,
        }
    }

    /// Records how QEMU exited (`qmpgate run`).
    pub fn set_qemu_exit(&self, description: String) {
        *lock::mutex(&self.qemu_exit) = Some(description);
    }
}

/// How long a client waits for QEMU's answer to each command. A command that runs
/// out gets a QMP error; QEMU's late reply is discarded and counted.
#[derive(Debug, Clone, Default)]
pub struct Timeouts {
    /// For commands not listed; `None`: wait forever.
    pub default: Option<Duration>,
    /// Per command name; `None`: wait forever.
    pub per_command: std::collections::HashMap<String, Option<Duration>>,
}

impl Timeouts {
    /// One limit for every command (`None`: no deadline), a listener's `timeout-ms=`.
    pub fn every(limit: Option<Duration>) -> Self {
        Timeouts {
            default: limit,
            per_command: Default::default(),
        }
    }

    /// Commands that legitimately take long (they write or read whole images, or run
    /// HMP's synchronous `savevm`/`loadvm`), with their default limit.
    pub const SLOW_COMMANDS: &[&str] = &[
        "dump-guest-memory",
        "human-monitor-command",
        "snapshot-save",
        "snapshot-load",
        "snapshot-delete",
        "blockdev-create",
        "block-commit",
    ];

    /// The limit for `command`.
    pub fn for_command(&self, command: &str) -> Option<Duration> {
        match self.per_command.get(command) {
            Some(limit) => *limit,
            None => self.default,
        }
    }
}

/// Runs `command` in QEMU and waits for the answer, all within `limit` (counted
/// from now): a full queue and a QEMU that does not answer both end in a QMP
/// error once the deadline passes. A command still queued then is never sent.
pub async fn run_command(
    upstream: &UpstreamHandle,
    command: Command,
    limit: Option<Duration>,
) -> Reply {
    let deadline = limit.map(|limit| tokio::time::Instant::now() + limit);
    let name = command.name.clone();
    let Some(pending) = within(deadline, upstream.submit(command)).await else {
        return deadline_passed(&name, limit, false);
    };
    match within(deadline, pending.reply()).await {
        Some(reply) => reply,
        None => deadline_passed(&name, limit, true),
    }
}

/// `future`'s output, or `None` if `deadline` passes first; no deadline waits.
pub async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    future: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future).await.ok(),
        None => Some(future.await),
    }
}

/// The reply to a command whose deadline passed: `sent` says whether QEMU got it
/// (then its late reply is discarded and counted) or not (then it never will).
pub fn deadline_passed(command: &str, limit: Option<Duration>, sent: bool) -> Reply {
    let ms = limit.unwrap_or_default().as_millis();
    let desc = if sent {
        format!(
            "QEMU did not answer '{command}' within {ms} ms; qmpgate stopped waiting (a late reply will be discarded)"
        )
    } else {
        format!(
            "'{command}' did not reach QEMU within {ms} ms (QEMU is still busy with earlier commands); it was not run"
        )
    };
    let serde_json::Value::Object(body) = error_response(&QmpError::generic(desc), None) else {
        unreachable!("error responses are objects")
    };
    Reply {
        seq: 0,
        body: body.into(),
    }
}

/// Serves one client until it leaves, misbehaves, or the gateway stops: registers
/// it, runs its QMP or HMP session, and says why it ended.
pub async fn serve(
    stream: Stream,
    peer: Peer,
    tls_identity: Option<CertIdentity>,
    client_id: u64,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) {
    let protocol = match ctx.mode {
        MonitorMode::Control => plugin::Protocol::Qmp,
        MonitorMode::Readline => plugin::Protocol::Hmp,
    };
    let client = plugin::Client {
        id: client_id,
        listener: ctx.id.clone(),
        protocol,
        peer: match &peer {
            Peer::Unix { pid, uid, gid } => plugin::Peer::Unix(plugin::UnixPeer {
                pid: *pid,
                uid: *uid,
                gid: *gid,
            }),
            Peer::Inet(addr) => plugin::Peer::Inet(addr.clone()),
            Peer::Unknown => plugin::Peer::Unknown,
        },
        capabilities: Vec::new(),
        upstream: ctx.upstream_id.clone(),
        tls: tls_identity.map(|cert| plugin::TlsIdentity {
            common_names: cert.common_names,
            subject_alt_names: cert.subject_alt_names,
            subject: cert.subject,
        }),
    };
    let _registered = ctx.registry.client(client_id, &ctx.id, &peer);
    ctx.metrics
        .clients_connected
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(client = client_id, listener = %ctx.id, ?peer, "client connected");
    let reason = match ctx.mode {
        MonitorMode::Readline => hmp::serve(stream, client.clone(), ctx.clone(), shutdown).await,
        MonitorMode::Control => {
            self::qmp::serve(stream, client.clone(), ctx.clone(), shutdown).await
        }
    };
    // Plugins that keep state about the client drop it (bounded by the chain's
    // own wait, like every call).
    ctx.chain().on_disconnect(&client).await;
    ctx.metrics
        .clients_connected
        .fetch_sub(1, Ordering::Relaxed);
    tracing::info!(client = client_id, reason, "client disconnected");
}

/// The default of [`SessionLimits::write_timeout`] (`--write-timeout-ms`), 10 s: a
/// client that cannot take a write for this long is disconnected. Long enough for
/// a client that is merely busy or on a slow link, short enough that a stuck one
/// does not hold its replies (and QEMU's queue slots) for long.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client whose input keeps making plugins fail was disconnected.
pub const FAULTING: &str = "its commands kept making plugins fail";

/// Whether `client`'s input has made the chain's plugins fail
/// [`plugin::CLIENT_FAULT_LIMIT`] times within the window: such a client is
/// disconnected (counted, and logged with its listener), so that it cannot keep a
/// chain that other clients and VMs share busy recreating instances.
pub fn faulting(ctx: &Context, client: &plugin::Client) -> bool {
    let faults = ctx.chain().client_faults(client);
    if faults < plugin::CLIENT_FAULT_LIMIT {
        return false;
    }
    ctx.metrics.faulting_clients.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        client = client.id,
        listener = %ctx.id,
        faults,
        window_s = plugin::CLIENT_FAULT_WINDOW.as_secs(),
        "disconnecting a client: its commands kept making plugins fail"
    );
    true
}

/// Writes to a client within `timeout` ([`SessionLimits::write_timeout`]); a client
/// that does not read gets `TimedOut`, and its task drops it rather than waiting for
/// ever (HMP and control clients; QMP sessions also count it, in `Session::write`).
pub(crate) async fn write_within(
    writer: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    tokio::time::timeout(timeout, writer.write_all(bytes))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
