//! Benchmark: QMP round trips to real QEMU, direct and through relays, in one run.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/qmpgate-bench [ROUNDS]
//! target/release/qmpgate-bench load [CLIENTS] [COMMANDS]
//! target/release/qmpgate-bench scale [VMS] [ROUNDS]
//! target/release/qmpgate-bench burst [CLIENTS] [REQUESTS]
//! ```
//!
//! `scale` starts VMS QEMU processes and serves them first from one qmpgate (each VM
//! added at run time on the control monitor, with its own listener) and then from
//! one qmpgate process each; it reports the gateways' total memory (RSS and PSS),
//! the time to add a VM (until its first client is served) and round-trip latency.
//!
//! `load` runs CLIENTS concurrent clients, each sending COMMANDS commands one after
//! another with ids no other client uses, through qmpgate (default plugins) to a
//! fast fake QEMU and to a real one; it checks that every reply reaches its asker
//! and reports throughput, p99 latency and the gateway's peak memory.
//!
//! `burst` has CLIENTS clients (8) each pipeline REQUESTS `query-qmp-schema` (32),
//! once reading their replies and once never reading them; it reports qmpgate's
//! RSS at idle, its peak and after the clients have left.
//!
//! QEMU is the version under test of the end-to-end tests: 7.2, or 10.0 with
//! `QMPGATE_TEST_QEMU=10.0` (see `QemuVersion::under_test`).
//!
//! For each path to a fresh `qemu-system-x86_64 -M none` it measures
//! - latency: ROUNDS sequential `query-status` round trips (p50, p99);
//! - throughput: 5 x ROUNDS `query-status` with up to 16 in flight on one connection;
//! - the sporadic pattern: rounds alternating between the paths, with a pause before
//!   each request, so every request meets an idle gateway, as management traffic
//!   does (ratios to direct QEMU and to socat).
//!
//! Paths: QEMU directly; `socat` as a plain byte relay; qmpgate with no plugin;
//! qmpgate with its default chain (hmp reader and the `safe` allowlist); and
//! qmpgate with three plugins (the policy plugin twice, with different profiles,
//! and a forwarding test plugin), which is the cost of a realistic chain.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qmpgate_tests::{GatewayBuilder, Qemu, QemuVersion, QmpClient, guest};
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

fn load(clients: usize, commands: usize) {
    println!("{clients} clients x {commands} commands, through qmpgate with its default plugins");
    println!("| upstream | commands/s | p50 | p99 | misrouted or lost | gateway peak RSS |");
    println!("|---|---|---|---|---|---|");
    let fake = qmpgate_tests::FakeQemu::start(|_| qmpgate_tests::FakeAction::Return);
    let qemu = Qemu::start();
    for (name, upstream, command) in [
        (
            "fast fake QEMU".to_string(),
            fake.upstream_spec(),
            "query-status",
        ),
        (
            format!("QEMU {} (-M none)", QemuVersion::under_test()),
            qemu.upstream_spec(),
            "query-status",
        ),
    ] {
        let gateway = GatewayBuilder::new(&upstream).spawn();
        let path = gateway.path.clone();
        let started = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|client| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut c = QmpClient::connect(&path);
                    assert_eq!(
                        c.execute("qmp_capabilities", json!({})),
                        json!({"return": {}})
                    );
                    let (mut samples, mut bad) = (Vec::with_capacity(commands), 0usize);
                    for i in 0..commands {
                        let id = json!([client, i]);
                        let sent = Instant::now();
                        c.send(&json!({"execute": command, "id": id}));
                        let reply = c.read_reply();
                        samples.push(sent.elapsed());
                        if reply["id"] != id || reply.get("return").is_none() {
                            bad += 1;
                        }
                    }
                    (samples, bad)
                })
            })
            .collect();
        let mut samples = Vec::new();
        let mut bad = 0;
        for worker in workers {
            let (s, b) = worker.join().expect("client thread");
            samples.extend(s);
            bad += b;
        }
        let elapsed = started.elapsed();
        samples.sort();
        let pct = |p: f64| {
            samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64()
                * 1e3
        };
        let status = std::fs::read_to_string(format!("/proc/{}/status", gateway.pid())).unwrap();
        let peak = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap_or("VmHWM: ? kB")
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {bad} | {} MiB |",
            samples.len() as f64 / elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.99),
            peak.parse::<u64>().unwrap_or(0) / 1024
        );
        assert_eq!(bad, 0, "replies were lost or misrouted");
    }
}

/// Memory under large replies: `clients` clients each pipeline `requests`
/// `query-qmp-schema` (about 200 KB each from QEMU), either reading their replies
/// or never reading; reports qmpgate's RSS at idle, its peak, and after the
/// clients leave.
fn burst(clients: usize, requests: usize) {
    println!(
        "{clients} clients x {requests} pipelined query-qmp-schema, QEMU {} (-M none), default plugins",
        QemuVersion::under_test()
    );
    println!("| clients | idle RSS | peak RSS | RSS 2 s after they left | schemas returned |");
    println!("|---|---|---|---|---|");
    for reading in [true, false] {
        let qemu = Qemu::start();
        let gateway = GatewayBuilder::new(&qemu.upstream_spec()).spawn();
        let pid = gateway.pid();
        let rss = |field: &str| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
                / 1024
        };
        // Warm up (plugins instantiated, the schema read once) before "idle".
        gateway.negotiated().execute("query-qmp-schema", json!({}));
        std::thread::sleep(Duration::from_millis(500));
        let idle = rss("VmRSS:");
        let path = gateway.path.clone();
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut c = QmpClient::negotiated(&path);
                    for id in 0..requests {
                        c.send(&json!({"execute": "query-qmp-schema", "id": id}));
                    }
                    let mut read = 0;
                    if reading {
                        // Answers or errors (a command still queued when its
                        // deadline passes is refused, not run).
                        for _ in 0..requests {
                            if c.read_reply().get("return").is_some() {
                                read += 1;
                            }
                        }
                    } else {
                        // Never reads: the gateway has to hold or drop what it owes.
                        std::thread::sleep(Duration::from_secs(12));
                    }
                    read
                })
            })
            .collect();
        let read: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
        std::thread::sleep(Duration::from_secs(2));
        let (peak, after) = (rss("VmHWM:"), rss("VmRSS:"));
        println!(
            "| {clients} {} | {idle} MiB | {peak} MiB | {after} MiB | {read} |",
            if reading { "reading" } else { "never reading" }
        );
    }
}

/// Resident and proportional set size of `pid`, in KiB. PSS splits shared pages
/// (the binary's code, shared libraries) between the processes that map them, so
/// summing it over processes counts each page once.
fn memory_kib(pid: u32) -> (u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| {
        rollup
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// Percentile `p` of sorted samples, in µs.
fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// `rounds` sequential `query-status` round trips on a negotiated client.
fn round_trips(c: &mut QmpClient, rounds: usize, samples: &mut Vec<Duration>) {
    for _ in 0..rounds {
        let start = Instant::now();
        let reply = c.execute("query-status", json!({}));
        samples.push(start.elapsed());
        assert!(reply.get("return").is_some(), "{reply}");
    }
}

/// Host scale: `vms` QEMU processes behind one qmpgate (upstreams added at run time
/// on the control monitor) and behind one qmpgate each.
fn scale(vms: usize, rounds: usize) {
    println!("{vms} QEMU processes (-M none, TCG); {rounds} query-status round trips per VM");
    let started = Instant::now();
    let qemus: Vec<Qemu> = (0..vms).map(|_| Qemu::start()).collect();
    println!(
        "started the QEMUs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let dir = qmpgate_tests::tempdir();

    // Direct, for reference: each QEMU serves one client at a time, so measure before
    // a gateway holds the monitors.
    let mut direct = Vec::new();
    for q in &qemus {
        let mut c = QmpClient::negotiated(&q.monitor);
        round_trips(&mut c, rounds, &mut direct);
    }

    // One gateway for all: start it empty, then add each VM (upstream + listener).
    let control_path = dir.path().join("control.sock");
    let one = GatewayBuilder::base()
        .args([
            "--control",
            &format!("socket,id=control,path={}", control_path.display()),
        ])
        .spawn_raw();
    wait_for(&control_path);
    let mut control = qmpgate_tests::Control::connect(&control_path);
    let empty = memory_kib(one.pid());
    let none = None::<&UnixStream>;
    let mut add_times = Vec::new();
    let mut listeners = Vec::new();
    for (i, q) in qemus.iter().enumerate() {
        let listener = dir.path().join(format!("one-{i}.sock"));
        let start = Instant::now();
        let reply = control.execute(
            json!({"execute": "chardev-add", "arguments": {"id": format!("vm{i}"), "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": q.monitor}}, "server": false}}}}),
            none,
        );
        assert_eq!(reply, json!({"return": {}}));
        let reply = control.execute(
            json!({"execute": "chardev-add", "arguments": {"id": format!("g{i}"), "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": listener}}, "server": true, "upstream": format!("vm{i}")}}}}),
            none,
        );
        assert_eq!(reply, json!({"return": {}}));
        let mut c = QmpClient::negotiated(&listener);
        add_times.push(start.elapsed());
        round_trips(&mut c, 1, &mut Vec::new());
        listeners.push(listener);
    }
    let mut shared_rtt = Vec::new();
    for listener in &listeners {
        let mut c = QmpClient::negotiated(listener);
        round_trips(&mut c, rounds, &mut shared_rtt);
    }
    let one_memory = memory_kib(one.pid());
    drop(control);
    drop(one);

    // One gateway per VM, each started as a unit manager would: spawn, then wait for
    // the first client to be served.
    let mut spawn_times = Vec::new();
    let mut gateways = Vec::new();
    for q in &qemus {
        let start = Instant::now();
        let gateway = GatewayBuilder::new(&q.upstream_spec()).spawn();
        let mut c = gateway.negotiated();
        spawn_times.push(start.elapsed());
        round_trips(&mut c, 1, &mut Vec::new());
        gateways.push(gateway);
    }
    let mut own_rtt = Vec::new();
    for gateway in &gateways {
        let mut c = gateway.negotiated();
        round_trips(&mut c, rounds, &mut own_rtt);
    }
    let (many_rss, many_pss) = gateways
        .iter()
        .map(|g| memory_kib(g.pid()))
        .fold((0, 0), |(r, p), (r2, p2)| (r + r2, p + p2));
    drop(gateways);

    for samples in [
        &mut direct,
        &mut shared_rtt,
        &mut own_rtt,
        &mut add_times,
        &mut spawn_times,
    ] {
        samples.sort();
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "| setup | gateway RSS (sum) | gateway PSS (sum) | per VM (PSS) | adding a VM (p50 / p99) | round trip p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| QEMU direct | - | - | - | - | {:.0} µs | {:.0} µs |",
        percentile_us(&direct, 0.5),
        percentile_us(&direct, 0.99)
    );
    println!(
        "| one qmpgate, {vms} upstreams | {:.1} MiB | {:.1} MiB | {:.2} MiB | {:.2} / {:.2} ms | {:.0} µs | {:.0} µs |",
        mib(one_memory.0),
        mib(one_memory.1),
        mib(one_memory.1.saturating_sub(empty.1)) / vms as f64,
        percentile_us(&add_times, 0.5) / 1e3,
        percentile_us(&add_times, 0.99) / 1e3,
        percentile_us(&shared_rtt, 0.5),
        percentile_us(&shared_rtt, 0.99)
    );
    println!(
        "| {vms} qmpgate processes | {:.1} MiB | {:.1} MiB | {:.2} MiB | {:.2} / {:.2} ms | {:.0} µs | {:.0} µs |",
        mib(many_rss),
        mib(many_pss),
        mib(many_pss) / vms as f64,
        percentile_us(&spawn_times, 0.5) / 1e3,
        percentile_us(&spawn_times, 0.99) / 1e3,
        percentile_us(&own_rtt, 0.5),
        percentile_us(&own_rtt, 0.99)
    );
    println!(
        "one qmpgate vs {vms}: {:.1}x less memory (PSS); adding a VM {:.1}x faster (p50); round trip p50 {:.2}x",
        many_pss as f64 / one_memory.1 as f64,
        percentile_us(&spawn_times, 0.5) / percentile_us(&add_times, 0.5),
        percentile_us(&shared_rtt, 0.5) / percentile_us(&own_rtt, 0.5)
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next();
    if let Some("scale") = mode.as_deref() {
        let vms = args
            .next()
            .map(|n| n.parse().expect("VMS is a number"))
            .unwrap_or(200);
        let rounds = args
            .next()
            .map(|n| n.parse().expect("ROUNDS is a number"))
            .unwrap_or(100);
        return scale(vms, rounds);
    }
    if let Some("burst") = mode.as_deref() {
        let clients = args
            .next()
            .map(|n| n.parse().expect("CLIENTS is a number"))
            .unwrap_or(8);
        let requests = args
            .next()
            .map(|n| n.parse().expect("REQUESTS is a number"))
            .unwrap_or(32);
        return burst(clients, requests);
    }
    if let Some("load") = mode.as_deref() {
        let clients = args
            .next()
            .map(|n| n.parse().expect("CLIENTS is a number"))
            .unwrap_or(200);
        let commands = args
            .next()
            .map(|n| n.parse().expect("COMMANDS is a number"))
            .unwrap_or(1000);
        return load(clients, commands);
    }
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("ROUNDS is a number"))
        .unwrap_or(5000);
    // Every path stays up for the whole run: measured one after another, then
    // together in the sporadic pattern.
    let mut paths: Vec<(&'static str, PathBuf)> = Vec::new();
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();

    let qemu = Qemu::start();
    paths.push(("QEMU direct", qemu.monitor.clone()));
    keep.push(Box::new(qemu));

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
    paths.push(("socat relay", relay.clone()));
    keep.push(Box::new(socat));
    keep.push(Box::new(qemu));

    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--no-default-policy"])
        .spawn();
    paths.push(("qmpgate, 0 plugins", gateway.path.clone()));
    keep.push(Box::new(gateway));
    keep.push(Box::new(qemu));

    // What qmpgate runs by default: the hmp reader and the safe allowlist.
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec()).spawn();
    paths.push(("qmpgate, default chain", gateway.path.clone()));
    keep.push(Box::new(gateway));
    keep.push(Box::new(qemu));

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
    // Exactly these three: without --no-default-policy the built-in hmp reader would
    // join them.
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--config", config.to_str().unwrap(), "--no-default-policy"])
        .spawn();
    paths.push(("qmpgate, 3 plugins", gateway.path.clone()));
    keep.push(Box::new(gateway));
    keep.push(Box::new(qemu));

    let results: Vec<Measurement> = paths
        .iter()
        .map(|(name, path)| measure(name, path, rounds))
        .collect();
    let (direct, socat) = (&results[0], &results[1]);
    println!(
        "query-status, {rounds} sequential round trips; throughput with 16 in flight ({} commands)",
        rounds * 5
    );
    println!(
        "| path | p50 latency | p99 latency | throughput | p50 vs direct | p50 vs socat | throughput vs direct |"
    );
    println!("|---|---|---|---|---|---|---|");
    for m in &results {
        println!(
            "| {} | {:.0} µs | {:.0} µs | {:.0}/s | {:.2}x | {:.2}x | {:.2}x |",
            m.name,
            m.p50_us,
            m.p99_us,
            m.per_sec,
            m.p50_us / direct.p50_us,
            m.p50_us / socat.p50_us,
            m.per_sec / direct.per_sec
        );
    }
    sporadic(&paths, rounds.min(2000));
    drop(keep);
}

/// The sporadic pattern of management traffic: rounds alternate between the
/// paths, one `query-status` each with a pause between, so every request meets a
/// gateway (and a QEMU) that has been idle, with cold caches and parked threads.
fn sporadic(paths: &[(&'static str, PathBuf)], rounds: usize) {
    const PAUSE: Duration = Duration::from_millis(2);
    let mut clients: Vec<QmpClient> = paths
        .iter()
        .map(|(_, path)| QmpClient::negotiated(path))
        .collect();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); paths.len()];
    for _ in 0..rounds {
        for (client, samples) in clients.iter_mut().zip(&mut samples) {
            std::thread::sleep(PAUSE);
            let start = Instant::now();
            let reply = client.execute("query-status", json!({}));
            samples.push(start.elapsed());
            assert!(reply.get("return").is_some(), "{reply}");
        }
    }
    for s in &mut samples {
        s.sort();
    }
    let p50: Vec<f64> = samples.iter().map(|s| percentile_us(s, 0.5)).collect();
    println!(
        "\nsporadic: {rounds} rounds, each path in turn with {} ms of quiet before every request",
        PAUSE.as_millis()
    );
    println!("| path | p50 latency | p99 latency | p50 vs direct | p50 vs socat |");
    println!("|---|---|---|---|---|");
    for (i, (name, _)) in paths.iter().enumerate() {
        println!(
            "| {name} | {:.0} µs | {:.0} µs | {:.2}x | {:.2}x |",
            p50[i],
            percentile_us(&samples[i], 0.99),
            p50[i] / p50[0],
            p50[i] / p50[1]
        );
    }
}
