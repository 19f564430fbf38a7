//! Counters per plugin, for status and metrics: calls, faults, memory, latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters per plugin, for status and metrics.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Hook calls.
    pub calls: AtomicU64,
    /// Commands denied.
    pub denials: AtomicU64,
    /// Refusals not enforced because the plugin runs in audit mode.
    pub would_deny: AtomicU64,
    /// Calls that trapped (including deadline and memory kills).
    pub traps: AtomicU64,
    /// Calls stopped by the CPU deadline.
    pub deadline_kills: AtomicU64,
    /// Calls stopped by the memory cap.
    pub memory_kills: AtomicU64,
    /// Instances created after the first (each follows a trap).
    pub restarts: AtomicU64,
    /// Calls refused because the plugin had used up its restart budget.
    pub disabled_calls: AtomicU64,
    /// Log messages dropped over the rate limit.
    pub log_dropped: AtomicU64,
    /// Audit records dropped over the per-call limit.
    pub audit_dropped: AtomicU64,
    /// Largest linear memory any instance reached, in bytes.
    pub memory_high_water: AtomicU64,
    /// Total time in hooks, in nanoseconds.
    pub busy_ns: AtomicU64,
    /// Hook latency histogram: bucket `i` counts calls that took less than 2^i µs
    /// (and at least 2^(i-1)); the last bucket takes everything slower.
    pub latency: [AtomicU64; LATENCY_BUCKETS],
}

/// Buckets of [`PluginStats::latency`]: up to 2^23 µs (8 s), far past any deadline.
pub const LATENCY_BUCKETS: usize = 24;

impl PluginStats {
    pub(crate) fn record_latency(&self, elapsed: Duration) {
        let micros = elapsed.as_micros().max(1) as u64;
        let bucket = (64 - micros.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The latency below which fraction `q` of calls completed, in µs (a bucket's
    /// upper bound, so within a factor of two); `None` before the first call.
    pub fn latency_quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= target {
                return Some(1 << i);
            }
        }
        Some(1 << (LATENCY_BUCKETS - 1))
    }
}
