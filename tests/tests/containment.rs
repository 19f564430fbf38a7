//! Containment: no client, peer or plugin can starve the others. Each test runs an
//! attack and checks that the gateway bounds it and keeps serving everyone else.

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use qmpgate_tests::{
    Control, GatewayBuilder, Plugin, Qemu, QmpClient, eventually, guest, http_get, with_status,
};
use serde_json::{Value, json};

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn desc(reply: &Value) -> &str {
    reply["error"]["desc"].as_str().unwrap_or_default()
}

#[test]
fn named_fds_on_the_control_monitor_are_bounded_and_given_back() {
    let builder = GatewayBuilder::base();
    let control_path = builder.dir().join("control.sock");
    let listener = UnixListener::bind(&control_path).unwrap();
    let gateway = builder
        .fd(listener, 3)
        .args(["--control", "socket,id=control,fd=3,server=on"])
        .spawn_raw();
    let mut first = Control::connect(&control_path);
    let baseline = open_fds(gateway.pid());
    let (fd, _) = UnixStream::pair().unwrap();
    let getfd = |control: &mut Control, name: &str| {
        control.execute(
            json!({"execute": "getfd", "arguments": {"fdname": name}}),
            Some(&fd),
        )
    };

    // One connection: 64 names, not 65; a name given again replaces its fd.
    for n in 0..64 {
        assert_eq!(getfd(&mut first, &format!("f{n}")), json!({"return": {}}));
    }
    assert_eq!(
        desc(&getfd(&mut first, "f64")),
        "Too many named file descriptors: this connection holds 64, the most it may (closefd some first)"
    );
    assert_eq!(getfd(&mut first, "f0"), json!({"return": {}}));
    assert_eq!(open_fds(gateway.pid()), baseline + 64);
    assert_eq!(
        first.execute(
            json!({"execute": "closefd", "arguments": {"fdname": "f1"}}),
            None::<&UnixStream>
        ),
        json!({"return": {}})
    );
    assert_eq!(getfd(&mut first, "f64"), json!({"return": {}}));

    // All connections: 256 in all.
    let mut others: Vec<Control> = (0..3).map(|_| Control::connect(&control_path)).collect();
    for (i, control) in others.iter_mut().enumerate() {
        for n in 0..64 {
            assert_eq!(getfd(control, &format!("c{i}f{n}")), json!({"return": {}}));
        }
    }
    let mut fifth = Control::connect(&control_path);
    assert_eq!(
        desc(&getfd(&mut fifth, "one-more")),
        "Too many named file descriptors: qmpgate's control connections hold 256, the most they may"
    );

    // At most 16 control connections at once; the 17th is told so and closed.
    let mut more: Vec<Control> = (0..11).map(|_| Control::connect(&control_path)).collect();
    let mut refused = UnixStream::connect(&control_path).unwrap();
    refused
        .set_read_timeout(Some(qmpgate_tests::TIMEOUT))
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut refused, &mut text).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(text.trim()).unwrap(),
        json!({"error": {"class": "GenericError", "desc": "qmpgate's control monitor serves at most 16 connections at once"}})
    );

    // Connections that end give their fds back: the gateway holds what it held
    // before (one control connection, no named fd), and the budget is free again.
    drop(more.drain(..));
    drop(others.drain(..));
    drop(first);
    eventually("the named fds closed", || {
        open_fds(gateway.pid()) == baseline
    });
    assert_eq!(getfd(&mut fifth, "again"), json!({"return": {}}));
}

/// One client's over-long HMP lines used to push the hmp plugin past its deadline
/// until it was disabled for every VM. Lines longer than QEMU's own line buffer are
/// now refused before any plugin reads them, and the longest line a plugin does
/// read is handled well within its deadline.
#[test]
fn huge_hmp_lines_are_refused_before_any_plugin_reads_them() {
    let qemu = Qemu::start();
    let (builder, url) = with_status(GatewayBuilder::new(&qemu.upstream_spec()));
    let gateway = builder.spawn();
    let mut attacker = gateway.negotiated();
    let mut bystander = gateway.negotiated();
    let keys = |bytes: usize| {
        let mut line = String::from("chardev-add socket,id=c");
        let mut n = 0;
        while line.len() + 16 < bytes {
            line.push_str(&format!(",x{n}=1"));
            n += 1;
        }
        line
    };
    let huge = keys(800_000);
    for _ in 0..12 {
        let reply = attacker.execute("human-monitor-command", json!({"command-line": huge}));
        assert_eq!(
            desc(&reply),
            "HMP command line refused: longer than QEMU's 4095-byte line buffer"
        );
        let started = Instant::now();
        assert_eq!(
            bystander.execute("query-status", json!({}))["return"]["status"],
            "prelaunch"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // The longest lines a plugin reads, in shapes that make parsers work hardest.
    let long_lines = [
        keys(4095),
        format!("chardev-add {}", "a,".repeat(2030)),
        format!("sendkey {}", "a-".repeat(2040)),
        format!("device_add {}", "\"\\\\".repeat(1300)),
        format!("info {}", " ".repeat(4080)),
    ];
    for line in &long_lines {
        let reply = attacker.execute("human-monitor-command", json!({"command-line": line}));
        // Not refused for its length: the plugins read it, within their deadline.
        assert!(
            !desc(&reply).contains("line buffer") && !desc(&reply).contains("time limit"),
            "{} bytes, {}: {reply}",
            line.len(),
            &line[..20]
        );
    }
    let (_, _, body) = http_get(&format!("{url}/status"));
    let status: Value = serde_json::from_str(&body).unwrap();
    for plugin in status["plugins"].as_array().unwrap() {
        assert_eq!(plugin["deadline_kills"], 0, "{plugin}");
        assert_eq!(plugin["traps"], 0, "{plugin}");
    }
    assert_eq!(status["counters"]["faulting_clients"], 0);
    assert_eq!(
        attacker.execute("query-status", json!({}))["return"]["status"],
        "prelaunch",
        "refusals are not faults: the client stays"
    );
}

/// A plugin's hooks cannot wait: `std::thread::sleep` used to block the chain's
/// thread in a host call, where the CPU deadline does not reach, and every other
/// client of the chain waited (19.7 s measured). Waiting now traps at once, in a
/// command, an event or `init`; and the host-side resources a plugin can create
/// are bounded.
#[test]
fn a_plugin_cannot_block_the_chain_or_hoard_host_resources() {
    let qemu = Qemu::start();
    let sleeper_plugin = || Plugin::wasm("sleeper", &guest("fixture_sleeper"));
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(sleeper_plugin())
        .spawn();
    let mut sleeper = gateway.negotiated();
    let mut other = gateway.negotiated();

    let started = Instant::now();
    assert_eq!(
        desc(&sleeper.execute("query-name", json!({}))),
        "qmpgate plugin 'sleeper' trapped: plugins may not wait: a hook cannot block (wasi:io/poll); the command was not executed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Pollables it never drops: host-side entries, bounded by count.
    assert_eq!(
        desc(&sleeper.execute("query-version", json!({}))),
        "qmpgate plugin 'sleeper' trapped: resource table has no free keys; the command was not executed"
    );

    // An event whose hook sleeps is dropped (fail closed) without holding anyone up.
    assert_eq!(other.execute("cont", json!({})), json!({"return": {}}));
    let started = Instant::now();
    assert_eq!(other.execute("stop", json!({})), json!({"return": {}}));
    assert_eq!(
        other.execute("query-status", json!({}))["return"]["status"],
        "paused"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    other.send(&json!({"execute": "query-uuid", "id": "marker"}));
    loop {
        let message = other.read();
        assert_ne!(
            message["event"], "STOP",
            "the hook failed: the event is withheld"
        );
        if message["id"] == "marker" {
            break;
        }
    }

    // `init` that sleeps fails at start-up, at once, with the reason.
    let started = Instant::now();
    GatewayBuilder::new(&qemu.upstream_spec())
        .plugin(sleeper_plugin().config(json!({"sleep-in-init": true})))
        .args(["--listen", "socket,id=l,path=/nonexistent/never.sock,server=on"])
        .fails_with("plugin 'sleeper': init failed: trapped: plugins may not wait: a hook cannot block (wasi:io/poll)");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// What a plugin writes costs the host a bounded amount: its log is limited in
/// rate and size (the rest dropped and counted), its audit records per call and
/// in size, and verdicts over the caps are refused (a 20 MB error description
/// used to raise the host's memory by ~100 MB).
#[test]
fn a_plugin_cannot_flood_the_host_with_output() {
    let qemu = Qemu::start();
    let (builder, url) = with_status(GatewayBuilder::new(&qemu.upstream_spec()));
    let audit_log = builder.dir().join("audit.jsonl");
    // CPU time to spare: what stops it must be the output caps, even on a loaded
    // machine (a 20 MB string takes a while to build).
    let gateway = builder
        .plugin(Plugin::wasm("flood", &guest("fixture_flood")).cpu_ms(5000))
        .args(["--audit-log", audit_log.to_str().unwrap()])
        .spawn();
    let mut c = gateway.negotiated();
    let baseline_peak = rss_mib(gateway.pid(), "VmHWM:");

    // 2,000 messages of 10 KB: a burst of 100 is logged, each cut to 4 KiB.
    assert!(c.execute("query-name", json!({}))["return"].is_object());
    let plugin_lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("plugin=\"flood\"") && l.contains("xxxx"))
            .map(str::len)
            .collect::<Vec<_>>()
    };
    let log = gateway.logged("more bytes) plugin=\"flood\"");
    let lines = plugin_lines(&log);
    assert!((100..=110).contains(&lines.len()), "{}", lines.len());
    assert!(lines.iter().all(|&n| n < 4096 + 200), "{lines:?}");

    let refused = |what: &str| {
        format!(
            "qmpgate plugin 'flood' returned an invalid result: {what}; the command was not executed"
        )
    };
    assert_eq!(
        desc(&c.execute("query-version", json!({}))),
        refused("an error description longer than 4096 bytes")
    );
    assert_eq!(
        desc(&c.execute("query-uuid", json!({}))),
        refused("a reply longer than 1048576 bytes")
    );

    // An audit record of 1 MB and 1,000 more: the first 64 of the call are kept,
    // the big one as its size and its start.
    assert!(c.execute("query-kvm", json!({}))["return"].is_object());
    let records: Vec<Value> = std::fs::read_to_string(&audit_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["plugin"] == "flood")
        .collect();
    assert_eq!(records.len(), 64);
    let big = &records[0]["oversized-record"];
    assert_eq!(big["bytes"], (1 << 20) + 10, "{big}");
    assert!(big["start"].as_str().unwrap().starts_with(r#"{"big":"www"#));
    assert_eq!(records[63]["n"], 62);

    let (_, _, body) = http_get(&format!("{url}/status"));
    let status: Value = serde_json::from_str(&body).unwrap();
    let stats = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "flood")
        .unwrap();
    assert!(stats["log_dropped"].as_u64().unwrap() >= 1890, "{stats}");
    assert_eq!(stats["audit_dropped"], 937, "{stats}");
    let grown_mib = rss_mib(gateway.pid(), "VmHWM:") - baseline_peak;
    assert!(grown_mib < 48, "peak RSS grew by {grown_mib} MiB");
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

/// A listener serves a bounded number of clients: the one past the cap is told
/// why and closed, other listeners are not affected, and a place that frees up is
/// taken by the next client.
#[test]
fn a_listener_serves_a_bounded_number_of_clients() {
    let qemu = Qemu::start();
    let (builder, other) = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--max-clients", "3"])
        .listener("other", 4);
    let gateway = builder.spawn();
    let mut served: Vec<QmpClient> = (0..3).map(|_| gateway.negotiated()).collect();
    let refused = UnixStream::connect(&gateway.path).unwrap();
    refused
        .set_read_timeout(Some(qmpgate_tests::TIMEOUT))
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &refused, &mut text).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(text.trim()).unwrap(),
        json!({"error": {"class": "GenericError", "desc": "qmpgate cannot take more clients on listener 'qmp' now; try again later"}})
    );
    let mut elsewhere = QmpClient::negotiated(&other);
    assert_eq!(
        elsewhere.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    for c in &mut served {
        assert_eq!(
            c.execute("query-status", json!({}))["return"]["status"],
            "prelaunch"
        );
    }
    drop(served.pop());
    eventually("a freed place is taken", || {
        let stream = UnixStream::connect(&gateway.path).unwrap();
        stream
            .set_read_timeout(Some(qmpgate_tests::TIMEOUT))
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line).unwrap();
        line.contains("\"QMP\"")
    });
}

/// Connections to the status endpoint are capped, must send their request headers
/// in time and hold no place once answered; `/events` streams are capped too. A
/// flood of unfinished requests used to keep every listener from accepting.
#[test]
fn the_status_endpoint_cannot_be_held_by_unfinished_requests() {
    let qemu = Qemu::start();
    let (builder, url) = with_status(GatewayBuilder::new(&qemu.upstream_spec()).args([
        "--status-max-connections",
        "8",
        "--status-header-timeout-ms",
        "300",
        "--status-max-subscribers",
        "2",
    ]));
    let gateway = builder.spawn();
    let address = url.trim_start_matches("http://").to_string();
    let unfinished: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(&address).unwrap();
            std::io::Write::write_all(&mut stream, b"GET /status HTTP/1.1\r\nHost: x\r\n").unwrap();
            stream
        })
        .collect();
    // QMP clients are served meanwhile.
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    // Every unfinished request is closed: past the cap at once, the others at the
    // header deadline (hyper answers 408 first).
    for stream in &unfinished {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        let started = Instant::now();
        match std::io::Read::read_to_end(&mut &*stream, &mut rest) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let (code, _, _) = http_get(&format!("{url}/status"));
    assert_eq!(code, 200);

    // Two event streams at most.
    let subscribe = || {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        std::io::Write::write_all(
            &mut stream,
            b"GET /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        stream
            .set_read_timeout(Some(qmpgate_tests::TIMEOUT))
            .unwrap();
        let mut head = [0u8; 12];
        std::io::Read::read_exact(&mut &stream, &mut head).unwrap();
        (String::from_utf8_lossy(&head).to_string(), stream)
    };
    let (first, _s1) = subscribe();
    let (second, _s2) = subscribe();
    let (third, _s3) = subscribe();
    assert_eq!(
        [first.as_str(), second.as_str(), third.as_str()],
        ["HTTP/1.1 200", "HTTP/1.1 200", "HTTP/1.1 503"]
    );
}

/// Connections in all are capped below the fd limit, so that however many clients
/// connect, the control monitor (and QEMU's links) still get fds.
#[test]
fn connections_cannot_use_the_fds_the_control_monitor_needs() {
    let qemu = Qemu::start();
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1;
    // A reserve that leaves the smallest budget there is: 16 connections.
    let reserve = limit.to_string();
    let builder = GatewayBuilder::new(&qemu.upstream_spec()).args(["--fd-reserve", &reserve]);
    let control_path = builder.dir().join("control.sock");
    let control_listener = UnixListener::bind(&control_path).unwrap();
    let (builder, other) = builder
        .fd(control_listener, 4)
        .args(["--control", "socket,id=control,fd=4,server=on"])
        .listener("other", 6);
    let gateway = builder.spawn();
    let mut held: Vec<QmpClient> = (0..8).map(|_| gateway.negotiated()).collect();
    held.extend((0..8).map(|_| QmpClient::negotiated(&other)));
    let refused = UnixStream::connect(&other).unwrap();
    refused
        .set_read_timeout(Some(qmpgate_tests::TIMEOUT))
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &refused, &mut text).unwrap();
    assert!(text.contains("qmpgate cannot take more clients"), "{text}");
    let mut control = Control::connect(&control_path);
    assert_eq!(
        control.execute(json!({"execute": "query-chardev"}), None::<&UnixStream>)["return"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    assert_eq!(
        held[0].execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

fn rss_mib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// Replies cost their size, and a client's unread ones are bounded: eight clients
/// that pipeline 32 `query-qmp-schema` each (about 200 KB a reply) and never read
/// used to take qmpgate from 14 MiB to 763 MiB, kept after they left. Replies now
/// travel as QEMU's text, and a client's share of QEMU's queue is given back only
/// once its reply is written, so at most 4 unread replies per client wait in
/// memory.
#[test]
fn clients_that_never_read_large_replies_cost_bounded_memory() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec()).spawn();
    let mut warm = gateway.negotiated();
    assert!(warm.execute("query-qmp-schema", json!({}))["return"].is_array());
    let idle = rss_mib(gateway.pid(), "VmRSS:");
    let clients: Vec<QmpClient> = (0..8)
        .map(|_| {
            let mut c = gateway.negotiated();
            for id in 0..32 {
                c.send(&json!({"execute": "query-qmp-schema", "id": id}));
            }
            c
        })
        .collect();
    // QEMU answers what it is given meanwhile; nobody reads.
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    assert!(warm.execute("query-qmp-schema", json!({}))["return"].is_array());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let peak = rss_mib(gateway.pid(), "VmHWM:");
    assert!(peak < 64, "peak RSS {peak} MiB (idle {idle} MiB)");
    drop(clients);
    eventually("memory given back", || {
        rss_mib(gateway.pid(), "VmRSS:") <= idle + 8
    });
}

/// A client's forwarded commands cost their size until answered, and are bounded:
/// past 2 MiB outstanding the client is not read until replies go out (a command is
/// held, parsed, until its reply is written). Here QEMU is stopped while a client
/// pipelines eight 1 MiB commands: qmpgate stops reading after the budget, holds
/// little, and every command is answered once QEMU resumes.
#[test]
fn a_client_cannot_make_qmpgate_hold_unbounded_input() {
    let qemu = Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--no-default-policy"])
        .spawn();
    let mut c = gateway.negotiated();
    let idle = rss_mib(gateway.pid(), "VmRSS:");
    let pid = nix::unistd::Pid::from_raw(qemu.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let big = "x".repeat((1 << 20) - 100);
    let mut writer = c.stream().try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for id in 0..8 {
            let command = json!({"execute": "qom-get", "arguments": {"path": big, "property": "type"}, "id": id});
            std::io::Write::write_all(&mut writer, command.to_string().as_bytes()).unwrap();
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !sender.is_finished(),
        "qmpgate read all 8 MiB while QEMU was stopped"
    );
    let held = rss_mib(gateway.pid(), "VmRSS:");
    assert!(held < idle + 40, "RSS {held} MiB (idle {idle} MiB)");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    sender.join().unwrap();
    for id in 0..8 {
        let reply = c.read_reply();
        assert_eq!(reply["id"], id, "{reply}");
    }
}

/// A stalled audit log (here a FIFO that nobody reads, so the audit writer blocks
/// once the pipe is full) makes audited commands fail closed after the audit wait
/// (5 s), saying why, instead of going on unrecorded; the fault is the disk's, so
/// the client is not disconnected for it; and it holds up nobody else: a client
/// of a listener whose chain does not audit (`plugins=hmp`) is served throughout
/// (hooks wait for the disk without holding a runtime worker).
#[test]
fn a_stalled_audit_log_fails_audited_commands_closed_and_stalls_nobody_else() {
    use std::os::unix::fs::OpenOptionsExt;

    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec());
    let fifo = builder.dir().join("audit.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // A reader that never reads: qmpgate's open for writing does not block, and
    // its writes stop once the pipe's 64 KiB are full.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let (builder, other) = builder
        .plugin(Plugin::builtin("audit", "audit"))
        .args(["--audit-log", fifo.to_str().unwrap()])
        // The wait is 5 s in production; the test shrinks it.
        .args(["--audit-wait-ms", "1500"])
        .listener_with("other", 4, "plugins=hmp");
    let gateway = builder.spawn();
    let mut audited = gateway.negotiated();
    let mut bystander = QmpClient::negotiated(&other);

    let mut filled = 0;
    let (waited, reply) = loop {
        let started = Instant::now();
        let reply = audited.execute("query-status", json!({}));
        if reply.get("error").is_some() {
            break (started.elapsed(), reply);
        }
        filled += 1;
        assert!(filled < 2000, "the pipe fills within 2000 records");
    };
    assert!(filled > 10, "the first {filled} records fit in the pipe");
    assert!(
        reply["error"]["desc"].as_str().unwrap().contains(
            "could not record its audit entry: the audit log did not take it within 1500 ms; \
             the command was not executed"
        ),
        "{reply}"
    );
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    // While an audited command waits on the log, the other listener's client is
    // served at once.
    audited.send(&json!({"execute": "query-status"}));
    let waiting = Instant::now();
    for _ in 0..5 {
        let reply = bystander.execute("query-status", json!({}));
        assert_eq!(reply["return"]["status"], "prelaunch", "{reply}");
    }
    assert!(
        waiting.elapsed() < Duration::from_millis(1000),
        "the bystander was served while the audited command waited: {:?}",
        waiting.elapsed()
    );
    // The audited client is still connected (the disk's fault is not its own),
    // and is refused again while the log stays stalled.
    let again = audited.read_reply();
    assert!(again["error"]["desc"].as_str().is_some(), "{again}");
    // A reload (logrotate's SIGHUP) cannot reopen a log that takes nothing: it
    // says so within the wait, and the reload itself goes on.
    gateway.signal(nix::sys::signal::Signal::SIGHUP);
    gateway.logged("cannot reopen the audit log");
    gateway.logged("reloaded");
}
