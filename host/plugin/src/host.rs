//! What a plugin instance may call: the host imports (`log`, `audit`,
//! `command-schema`) with their rate and size caps, its empty WASI context, and
//! its memory cap.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use qmpgate_protocol::schema::QmpSchema;

use crate::audit::AuditSink;
use crate::stats::PluginStats;
use crate::wit::{self, Client, Level, v0_1};
use crate::{
    AUDIT_ENTRY_MAX, AUDIT_PER_CALL, DESC_MAX, LOG_BURST, LOG_MESSAGE_MAX, LOG_PER_SECOND,
};

/// Per-store host state: the empty WASI context and the plugin's limits.
pub(crate) struct HostState {
    pub(crate) plugin: Arc<str>,
    /// The upstream of the call in progress: the host adds it to audit records, where
    /// a plugin cannot forge it.
    pub(crate) upstream: Option<Arc<str>>,
    /// The client whose traffic the current call is about (none in `init`).
    pub(crate) client: Option<Arc<Client>>,
    /// QEMU's schema on the current call's upstream, for `command-schema`.
    pub(crate) schema: Option<Arc<QmpSchema>>,
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) memory: MemoryCap,
    pub(crate) audit: Option<Arc<AuditSink>>,
    /// The plugin's counters (dropped log messages and audit records).
    pub(crate) stats: Arc<PluginStats>,
    /// Log messages it may still write now (refilled over time).
    pub(crate) log_tokens: f64,
    /// When `log_tokens` was last refilled.
    pub(crate) log_refilled: Instant,
    /// Audit records written in the current call.
    pub(crate) audits_this_call: u32,
    /// Epoch ticks the current call may still run past its next one (its CPU
    /// deadline, counted at each yield).
    pub(crate) ticks_left: u64,
    /// The audit log did not take a record of this call: its fault is charged
    /// to nobody.
    pub(crate) audit_stalled: bool,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::types_imports::Host for HostState {}
impl v0_1::types_imports::Host for HostState {}

impl v0_1::host_imports::Host for HostState {
    fn log(&mut self, level: v0_1::Level, message: String) {
        wit::host_imports::Host::log(self, v0_1::level(level), message);
    }

    async fn audit(&mut self, entry: String) -> wasmtime::Result<()> {
        wit::host_imports::Host::audit(self, entry).await
    }
}

impl wit::host_imports::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        // Bounded in rate and size: a plugin cannot flood the log (or the memory
        // of a log writer that cannot keep up).
        let now = Instant::now();
        let refill =
            now.duration_since(self.log_refilled).as_secs_f64() * f64::from(LOG_PER_SECOND);
        self.log_tokens = (self.log_tokens + refill).min(f64::from(LOG_BURST));
        self.log_refilled = now;
        if self.log_tokens < 1.0 {
            self.stats.log_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.log_tokens -= 1.0;
        let plugin = &*self.plugin;
        // A plugin's text must not pass for qmpgate's own lines: control
        // characters (newlines, escape sequences) are shown escaped (then cut, so
        // escaping cannot grow a message past the cap).
        let message = escape_controls(&message);
        let message = cut(&message, LOG_MESSAGE_MAX);
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    /// Waits until the record is on disk (yielding the task meanwhile): no
    /// decision goes on unrecorded. A log that does not take a record within the
    /// sink's wait ([`crate::AUDIT_WAIT`] by default) fails the call closed; that
    /// fault is the disk's, charged to nobody.
    async fn audit(&mut self, entry: String) -> wasmtime::Result<()> {
        self.audits_this_call += 1;
        if self.audits_this_call > AUDIT_PER_CALL {
            self.stats.audit_dropped.fetch_add(1, Ordering::Relaxed);
            if self.audits_this_call == AUDIT_PER_CALL + 1 {
                tracing::warn!(
                    plugin = &*self.plugin,
                    limit = AUDIT_PER_CALL,
                    "plugin wrote too many audit records in one call; dropping the rest of this call's"
                );
            }
            return Ok(());
        }
        let client = self.client.as_deref().map(wit::client_json);
        let entry = if entry.len() > AUDIT_ENTRY_MAX {
            serde_json::json!({"oversized-record": {"bytes": entry.len(), "start": cut(&entry, DESC_MAX)}}).to_string()
        } else {
            entry
        };
        let record = crate::audit::record(&self.plugin, self.upstream.as_deref(), client, &entry);
        let Some(sink) = &self.audit else {
            // Without an audit log, records go to the log under their own target,
            // as one JSON field: never as free text a plugin chose.
            tracing::info!(target: "qmpgate::audit", record = %record, "audit");
            return Ok(());
        };
        let wait = sink.wait();
        let stalled = |store: &mut Self| {
            store.audit_stalled = true;
            wasmtime::Error::msg(format!(
                "the audit log did not take the record within {}",
                crate::audit::wait_text(wait)
            ))
        };
        let Some(written) = sink.write(&record) else {
            return Err(stalled(self));
        };
        // Outside a runtime (a chain's start) there is no timer: wait.
        let result = match tokio::runtime::Handle::try_current() {
            Ok(_) => match tokio::time::timeout(wait, written).await {
                Ok(result) => result,
                Err(_) => return Err(stalled(self)),
            },
            Err(_) => written.await,
        };
        match result {
            Ok(Ok(())) => Ok(()),
            // As a full disk: logged, and the call goes on (the record is lost).
            Ok(Err(e)) => {
                tracing::error!(plugin = &*self.plugin, error = %e, "cannot write audit record");
                Ok(())
            }
            Err(_) => Err(stalled(self)),
        }
    }

    fn command_schema(&mut self, name: String) -> wit::SchemaLookup {
        match &self.schema {
            None => wit::SchemaLookup::Unknown,
            Some(schema) => match schema.describe_command(&name) {
                Some(description) => wit::SchemaLookup::Found(description.to_string()),
                None => wit::SchemaLookup::NoSuchCommand,
            },
        }
    }
}

/// Caps linear memory and remembers that it did, so a trap can be reported as
/// "memory limit" rather than a bare "unreachable".
pub(crate) struct MemoryCap {
    pub(crate) max: usize,
    pub(crate) hit: bool,
    pub(crate) high_water: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.hit = true;
            return Ok(false);
        }
        self.high_water = self.high_water.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; no honest plugin needs this many.
        Ok(desired <= 64 * 1024)
    }
}

/// `text` cut to at most `max` bytes (at a character boundary), saying how much
/// was cut.
pub(crate) fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}... ({} more bytes)",
        &text[..end],
        text.len() - end
    ))
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`, ...), so that it
/// stays on one log line and carries no terminal escape sequences.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}
