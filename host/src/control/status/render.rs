//! The renderers: `/status` as JSON and `/metrics` as Prometheus text, from the
//! hub's entries and counters.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use qmpgate_protocol::chardev::Peer;
use qmpgate_protocol::lock;

use crate::gateway::{Hub, Vm};

fn peer_json(peer: &Peer) -> Value {
    match peer {
        Peer::Unix { pid, uid, gid } => json!({ "unix": { "pid": pid, "uid": uid, "gid": gid } }),
        Peer::Inet(address) => json!({ "inet": address }),
        Peer::Unknown => Value::Null,
    }
}

/// How a chardev address came to qmpgate, for status.
fn origin(address: &str) -> &'static str {
    match address.split('=').next().unwrap_or("") {
        "path" => "path",
        "host" => "tcp",
        "systemd" => "systemd",
        // A number came from the command line; anything else is a getfd name.
        "fd" if address[3..].parse::<i32>().is_ok() => "inherited-fd",
        "fd" => "named-fd",
        _ => "other",
    }
}

/// An upstream counter: its key in `/status`, its metric's name, type and help, and
/// how to read it. Both documents come from this one table.
struct Counter {
    key: &'static str,
    metric: &'static str,
    kind: &'static str,
    help: &'static str,
    read: fn(&Vm) -> u64,
}

const COUNTERS: [Counter; 8] = [
    Counter {
        key: "clients_connected",
        metric: "qmpgate_clients_connected",
        kind: "gauge",
        help: "Clients connected now.",
        read: |s| s.metrics.clients_connected.load(Ordering::Relaxed),
    },
    Counter {
        key: "clients_total",
        metric: "qmpgate_clients_total",
        kind: "counter",
        help: "Clients accepted since start.",
        read: |s| s.metrics.clients_total.load(Ordering::Relaxed),
    },
    Counter {
        key: "commands",
        metric: "qmpgate_messages_total",
        kind: "counter",
        help: "Messages received from clients.",
        read: |s| s.metrics.commands.load(Ordering::Relaxed),
    },
    Counter {
        key: "denied",
        metric: "qmpgate_denied_total",
        kind: "counter",
        help: "Commands refused by a plugin.",
        read: |s| s.metrics.denied.load(Ordering::Relaxed),
    },
    Counter {
        key: "late_replies_discarded",
        metric: "qmpgate_late_replies_discarded_total",
        kind: "counter",
        help: "QEMU replies that came after their client stopped waiting.",
        read: |s| s.upstream.discarded_replies(),
    },
    Counter {
        key: "slow_clients",
        metric: "qmpgate_slow_clients_total",
        kind: "counter",
        help: "Clients disconnected for not reading.",
        read: |s| s.metrics.slow_clients.load(Ordering::Relaxed),
    },
    Counter {
        key: "faulting_clients",
        metric: "qmpgate_faulting_clients_total",
        kind: "counter",
        help: "Clients disconnected because their commands kept making plugins fail.",
        read: |s| s.metrics.faulting_clients.load(Ordering::Relaxed),
    },
    Counter {
        key: "refused_clients",
        metric: "qmpgate_refused_clients_total",
        kind: "counter",
        help: "Connections refused by the caps on clients and TLS handshakes.",
        read: |s| s.metrics.refused_clients.load(Ordering::Relaxed),
    },
];

/// The counters of `upstreams`, summed, as a `/status` object.
fn counters_json(upstreams: &[Arc<Vm>]) -> Value {
    Value::Object(
        COUNTERS
            .iter()
            .map(|c| {
                let total: u64 = upstreams.iter().map(|u| (c.read)(u)).sum();
                (c.key.to_string(), Value::from(total))
            })
            .collect(),
    )
}

/// The version of the `/status` document's shape: raised when a field changes
/// meaning or goes away (new fields do not raise it).
pub const STATUS_SCHEMA_VERSION: u64 = 1;

/// The `/status` document.
pub fn status_json(hub: &Hub) -> Value {
    let upstreams = hub.upstreams();
    let mut chardevs = Vec::new();
    let mut clients = Vec::new();
    let mut per_upstream = Vec::new();
    for shared in &upstreams {
        let info = shared.upstream.info();
        let spec = &shared.upstream_spec;
        let address = spec.address.to_string();
        chardevs.push(json!({
            "id": spec.id,
            "role": "upstream",
            "origin": origin(&address),
            "address": address,
        }));
        let listeners = shared.listeners();
        for l in &listeners {
            chardevs.push(json!({
                "id": l.id,
                "role": "listener",
                "upstream": spec.id,
                "origin": origin(&l.address),
                "address": l.address,
                "bound": l.bound,
                "policy": l.policy.as_ref().map(ToString::to_string),
            }));
        }
        clients.extend(
            lock::mutex(&shared.registry.clients)
                .iter()
                .map(|(id, c)| json!({ "id": id, "upstream": spec.id, "listener": c.listener, "peer": peer_json(&c.peer), "connected_since": c.since })),
        );
        per_upstream.push(json!({
            "id": spec.id,
            "policy": spec.policy.to_string(),
            "chain": shared.chain().describe(),
            "connected": info.connected,
            "lost": info.lost,
            "qemu": info.version,
            "run_state": info.run_state,
            "oob": info.oob,
            "exit": *lock::mutex(&shared.registry.qemu_exit),
            "listeners": listeners.iter().map(|l| l.id.clone()).collect::<Vec<_>>(),
            "counters": counters_json(std::slice::from_ref(shared)),
        }));
    }
    for service in hub.services() {
        chardevs.push(json!({
            "id": service.id,
            "role": service.role,
            "origin": origin(&service.address),
            "address": service.address,
            "bound": service.bound,
        }));
    }
    clients.sort_by_key(|c| c["id"].as_u64());
    let mut plugins = Vec::new();
    for (chain, _, users) in hub.chains_in_use() {
        for p in chain.plugins() {
            let s = &p.stats;
            let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            plugins.push(json!({
                "name": &*p.name,
                "upstreams": users,
                "calls": load(&s.calls),
                "denials": load(&s.denials),
                "would_deny": load(&s.would_deny),
                "traps": load(&s.traps),
                "deadline_kills": load(&s.deadline_kills),
                "memory_kills": load(&s.memory_kills),
                "restarts": load(&s.restarts),
                "disabled_calls": load(&s.disabled_calls),
                "log_dropped": load(&s.log_dropped),
                "audit_dropped": load(&s.audit_dropped),
                "memory_high_water_bytes": load(&s.memory_high_water),
                "latency_us": { "p50": s.latency_quantile_us(0.5), "p99": s.latency_quantile_us(0.99) },
            }));
        }
    }
    json!({
        "schema_version": STATUS_SCHEMA_VERSION,
        "qmpgate": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": hub.started().elapsed().as_secs(),
        },
        "upstreams": per_upstream,
        "chardevs": chardevs,
        "clients": clients,
        "plugins": plugins,
        "counters": counters_json(&upstreams),
    })
}

/// The `/metrics` document (Prometheus text format 0.0.4). Per-upstream series
/// carry an `upstream` label and no unlabelled total (a dashboard's `sum()` is
/// the total); per-plugin ones carry `plugin` and `policy` (the chain's).
pub fn metrics_text(hub: &Hub) -> String {
    let mut out = String::new();
    let upstreams = hub.upstreams();
    let _ = writeln!(
        out,
        "# HELP qmpgate_build_info The running qmpgate: its version and the plugin contracts it loads.\n\
         # TYPE qmpgate_build_info gauge\n\
         qmpgate_build_info{{version=\"{}\",plugin_contracts=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        qmpgate_plugin_host::SUPPORTED_VERSIONS.join(","),
    );
    let _ = writeln!(
        out,
        "# HELP qmpgate_upstreams Upstreams served.\n# TYPE qmpgate_upstreams gauge\nqmpgate_upstreams {}",
        upstreams.len()
    );
    let labelled: Vec<(String, &Arc<Vm>)> = upstreams
        .iter()
        .map(|u| (escape_label(&u.upstream_spec.id), u))
        .collect();
    let _ = writeln!(
        out,
        "# HELP qmpgate_upstream_connected Whether QEMU is connected.\n# TYPE qmpgate_upstream_connected gauge"
    );
    for (id, u) in &labelled {
        let _ = writeln!(
            out,
            "qmpgate_upstream_connected{{upstream=\"{id}\"}} {}",
            u.upstream.info().connected as u64
        );
    }
    for Counter {
        metric: name,
        kind,
        help,
        read,
        ..
    } in &COUNTERS
    {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, u) in &labelled {
            let _ = writeln!(out, "{name}{{upstream=\"{id}\"}} {}", read(u));
        }
    }
    let _ = writeln!(
        out,
        "# HELP qmpgate_commands_total Client commands by name and verdict (forwarded to QEMU, \
         denied, or answered without QEMU); names QEMU does not have are counted as \"{other}\".\n\
         # TYPE qmpgate_commands_total counter",
        other = crate::session::OTHER_COMMAND,
    );
    for (id, u) in &labelled {
        for (command, counts) in lock::mutex(&u.metrics.by_command).iter() {
            for verdict in crate::session::Verdict::ALL {
                let _ = writeln!(
                    out,
                    "qmpgate_commands_total{{upstream=\"{id}\",command=\"{}\",verdict=\"{}\"}} {}",
                    escape_label(command),
                    verdict.as_str(),
                    counts[verdict as usize]
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP qmpgate_qemu_round_trip_seconds Time from writing a command to QEMU to reading its reply.\n\
         # TYPE qmpgate_qemu_round_trip_seconds histogram"
    );
    for (id, u) in &labelled {
        let (buckets, count, sum) = u.upstream.round_trips().snapshot();
        for (le, cumulative) in buckets {
            let _ = writeln!(
                out,
                "qmpgate_qemu_round_trip_seconds_bucket{{upstream=\"{id}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "qmpgate_qemu_round_trip_seconds_bucket{{upstream=\"{id}\",le=\"+Inf\"}} {count}\n\
             qmpgate_qemu_round_trip_seconds_sum{{upstream=\"{id}\"}} {sum}\n\
             qmpgate_qemu_round_trip_seconds_count{{upstream=\"{id}\"}} {count}"
        );
    }
    // A chain is named by the policy of the upstreams that share it.
    let chains: Vec<(qmpgate_plugin_host::PluginChain, String)> = hub
        .chains_in_use()
        .into_iter()
        .map(|(chain, policy, _)| (chain, escape_label(&policy.to_string())))
        .collect();
    let per_plugin: [PerPlugin; 11] = [
        (
            "qmpgate_plugin_calls_total",
            "counter",
            "Hook calls.",
            |s| s.calls.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_denials_total",
            "counter",
            "Commands denied.",
            |s| s.denials.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_would_deny_total",
            "counter",
            "Refusals not enforced: the plugin runs in audit mode.",
            |s| s.would_deny.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_traps_total",
            "counter",
            "Hook calls that trapped.",
            |s| s.traps.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_deadline_kills_total",
            "counter",
            "Hook calls stopped by the CPU deadline.",
            |s| s.deadline_kills.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_memory_kills_total",
            "counter",
            "Hook calls stopped by the memory cap.",
            |s| s.memory_kills.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_restarts_total",
            "counter",
            "Instances recreated after a fault.",
            |s| s.restarts.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_disabled_calls_total",
            "counter",
            "Calls refused after the plugin used up its restart budget.",
            |s| s.disabled_calls.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_log_dropped_total",
            "counter",
            "Log messages dropped over the plugin's rate limit.",
            |s| s.log_dropped.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_audit_dropped_total",
            "counter",
            "Audit records dropped over the per-call limit.",
            |s| s.audit_dropped.load(Ordering::Relaxed),
        ),
        (
            "qmpgate_plugin_memory_high_water_bytes",
            "gauge",
            "Largest linear memory of an instance.",
            |s| s.memory_high_water.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, read) in per_plugin {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (chain, policy) in &chains {
            for p in chain.plugins() {
                let _ = writeln!(
                    out,
                    "{name}{{plugin=\"{}\",policy=\"{policy}\"}} {}",
                    escape_label(&p.name),
                    read(&p.stats)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP qmpgate_plugin_hook_seconds Hook latency.\n# TYPE qmpgate_plugin_hook_seconds histogram"
    );
    for (p, policy) in chains
        .iter()
        .flat_map(|(chain, policy)| chain.plugins().iter().map(move |p| (p, policy)))
    {
        let labels = format!("plugin=\"{}\",policy=\"{policy}\"", escape_label(&p.name));
        let mut cumulative = 0;
        for (i, bucket) in p.stats.latency.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = (1u64 << i) as f64 / 1e6;
            let _ = writeln!(
                out,
                "qmpgate_plugin_hook_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "qmpgate_plugin_hook_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
        );
        let sum = p.stats.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "qmpgate_plugin_hook_seconds_sum{{{labels}}} {sum}");
        let _ = writeln!(
            out,
            "qmpgate_plugin_hook_seconds_count{{{labels}}} {cumulative}"
        );
    }
    out
}

/// A per-plugin metric: name, type, help, and how to read it.
type PerPlugin = (
    &'static str,
    &'static str,
    &'static str,
    fn(&qmpgate_plugin_host::PluginStats) -> u64,
);

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
