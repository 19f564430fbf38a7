//! Benchmark: QMP round trips to real QEMU, direct and through relays, in one run.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/qmpgate-bench [ROUNDS]
//! ```
//!
//! For each path to a fresh `qemu-system-x86_64 -M none` it measures
//! - latency: ROUNDS sequential `query-status` round trips (p50, p99);
//! - throughput: 5 x ROUNDS `query-status` with up to 16 in flight on one connection.
//!
//! Paths: QEMU directly; `socat` as a plain byte relay; qmpgate with no plugin; and
//! qmpgate with three plugins (the policy plugin twice, with different profiles,
//! and a forwarding test plugin), which is the cost of a realistic chain.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qmpgate_tests::{GatewayBuilder, Qemu, QmpClient, guest};
use serde_json::json;

struct Measurement {
    name: &'static str,
    p50_us: f64,
    p99_us: f64,
    per_sec: f64,
}

fn measure(name: &'static str, path: &Path, rounds: usize) -> Measurement {
    let mut c = QmpClient::connect(path);
    assert_eq!(
        c.execute("qmp_capabilities", json!({})),
        json!({"return": {}})
    );
    for _ in 0..200 {
        c.execute("query-status", json!({}));
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        let reply = c.execute("query-status", json!({}));
        samples.push(start.elapsed());
        assert!(reply.get("return").is_some(), "{reply}");
    }
    samples.sort();
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };

    let total = rounds * 5;
    let window = 16;
    let start = Instant::now();
    let (mut sent, mut received) = (0, 0);
    while received < total {
        while sent < total && sent - received < window {
            c.send(&json!({"execute": "query-status", "id": sent}));
            sent += 1;
        }
        let reply = c.read_reply();
        assert_eq!(reply["id"], received, "replies in order");
        received += 1;
    }
    let per_sec = total as f64 / start.elapsed().as_secs_f64();
    Measurement {
        name,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        per_sec,
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Socat(Child, PathBuf);

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("ROUNDS is a number"))
        .unwrap_or(5000);
    let mut results = Vec::new();

    let qemu = Qemu::start();
    results.push(measure("QEMU direct", &qemu.monitor, rounds));
    drop(qemu);

    let qemu = Qemu::start();
    let dir = qmpgate_tests::tempdir();
    let relay = dir.path().join("socat.sock");
    // The relay connects to QEMU once per client, like a proxy in front of one VM.
    let child = Command::new("socat")
        .arg(format!("UNIX-LISTEN:{},fork", relay.display()))
        .arg(format!("UNIX-CONNECT:{}", qemu.monitor.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("socat must be installed");
    let socat = Socat(child, relay.clone());
    wait_for(&relay);
    results.push(measure("socat relay", &relay, rounds));
    drop(socat);
    drop(qemu);

    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--no-default-policy"])
        .spawn();
    results.push(measure("qmpgate, 0 plugins", &gateway.path, rounds));
    drop(gateway);
    drop(qemu);

    let qemu = Qemu::start();
    let config = dir.path().join("three.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [[plugin]]
            name = "safe"
            builtin = "qmp-policy"
            config = {{ profile = "safe" }}
            [[plugin]]
            name = "operator-rules"
            builtin = "qmp-policy"
            config = {{ profile = "permissive", rules = [{{ action = "deny", commands = ["quit", "system_*"] }}] }}
            [[plugin]]
            name = "forwarder"
            path = "{}"
            "#,
            guest("fixture_trap").display()
        ),
    )
    .unwrap();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--config", config.to_str().unwrap()])
        .spawn();
    results.push(measure("qmpgate, 3 plugins", &gateway.path, rounds));
    drop(gateway);
    drop(qemu);

    let base = &results[0];
    println!(
        "query-status, {rounds} sequential round trips; throughput with 16 in flight ({} commands)",
        rounds * 5
    );
    println!(
        "| path | p50 latency | p99 latency | throughput | p50 vs direct | throughput vs direct |"
    );
    println!("|---|---|---|---|---|---|");
    for m in &results {
        println!(
            "| {} | {:.0} µs | {:.0} µs | {:.0}/s | {:.2}x | {:.2}x |",
            m.name,
            m.p50_us,
            m.p99_us,
            m.per_sec,
            m.p50_us / base.p50_us,
            m.per_sec / base.per_sec
        );
    }
}
