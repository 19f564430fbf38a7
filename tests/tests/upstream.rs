//! Upstream faults, with a scripted fake QEMU.

use qmpgate_tests::{FakeAction, FakeQemu, GatewayBuilder};
use serde_json::json;

#[test]
fn losing_qemu_mid_command_answers_every_pending_command_and_tells_clients() {
    let fake = FakeQemu::start(|name| match name {
        "die" => FakeAction::Close,
        "hang" => FakeAction::Ignore,
        _ => FakeAction::Return,
    });
    let mut gateway = GatewayBuilder::new(&fake.upstream_spec())
        .args(["--profile", "permissive"])
        .spawn();
    let mut a = gateway.negotiated();
    let mut b = gateway.negotiated();
    assert_eq!(a.execute("anything", json!({})), json!({"return": {}}));
    b.send(&json!({"execute": "hang", "id": "h"}));
    std::thread::sleep(std::time::Duration::from_millis(200));
    a.send(&json!({"execute": "die", "id": "d"}));

    for c in [&mut a, &mut b] {
        let mut replies = Vec::new();
        let mut lost_event = false;
        while let Some(line) = c.read_line() {
            let message: serde_json::Value = serde_json::from_str(&line).unwrap();
            if message["event"] == "QMPGATE_UPSTREAM_LOST" {
                lost_event = true;
            } else {
                replies.push(message);
            }
        }
        assert!(lost_event, "clients are told the upstream is gone");
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert!(
            replies[0]["error"]["desc"]
                .as_str()
                .unwrap()
                .contains("qmpgate lost the connection to QEMU")
        );
    }
    let (code, stderr) = gateway.wait();
    assert_eq!(
        code,
        Some(1),
        "no reconnect-ms: the gateway exits with an error\n{stderr}"
    );
}

#[test]
fn an_unreachable_upstream_is_one_clear_error_not_a_retry_loop() {
    let dir = qmpgate_tests::tempdir();
    let mut gateway = GatewayBuilder::new(&format!(
        "socket,id=qemu,path={}",
        dir.path().join("nothing.sock").display()
    ))
    .spawn();
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(1));
    assert!(stderr.contains("chardev 'qemu': connect to"), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "{stderr}");
}

#[test]
fn a_qemu_monitor_busy_with_another_client_is_reported_not_waited_on_forever() {
    // QEMU serves one client per monitor; a second connect sits in the backlog and
    // is never greeted. Use a listener nobody accepts on to get the same effect.
    let dir = qmpgate_tests::tempdir();
    let path = dir.path().join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // The greeting's deadline shrunk from 10 s: the message names the one given.
    let mut gateway = GatewayBuilder::new(&format!("socket,id=qemu,path={}", path.display()))
        .args(["--greeting-timeout-ms", "300"])
        .spawn();
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(
            "sent no QMP greeting within 300ms: is another client connected to its monitor?"
        ),
        "{stderr}"
    );
}

#[test]
fn a_qemu_that_stalls_in_the_negotiation_is_reported_naming_the_step() {
    // Greets and answers qmp_capabilities and query-status, never the schema query.
    let fake = FakeQemu::start(|name| match name {
        "query-qmp-schema" => FakeAction::Ignore,
        _ => FakeAction::Return,
    });
    let mut gateway = GatewayBuilder::new(&fake.upstream_spec())
        .args(["--profile", "permissive", "--negotiation-timeout-ms", "300"])
        .spawn();
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("QEMU greeted but did not answer query-qmp-schema within 300ms"),
        "{stderr}"
    );
}

#[test]
fn an_oob_reply_overtakes_an_in_band_one_and_each_reaches_its_client() {
    let fake = FakeQemu::start(|name| match name {
        "slow-in-band" => FakeAction::Defer,
        _ => FakeAction::Return,
    });
    let gateway = GatewayBuilder::new(&fake.upstream_spec())
        .args(["--profile", "permissive"])
        .spawn();
    let mut a = gateway.client();
    assert_eq!(
        a.execute("qmp_capabilities", json!({"enable": ["oob"]})),
        json!({"return": {}})
    );
    let mut b = gateway.client();
    assert_eq!(
        b.execute("qmp_capabilities", json!({"enable": ["oob"]})),
        json!({"return": {}})
    );
    // Both clients use the same id; qmpgate tells them apart upstream.
    a.send(&json!({"execute": "slow-in-band", "id": "x"}));
    std::thread::sleep(std::time::Duration::from_millis(100));
    b.send(&json!({"exec-oob": "fast-oob", "id": "x"}));
    assert_eq!(
        b.read(),
        json!({"return": {}, "id": "x"}),
        "the OOB reply comes first"
    );
    assert_eq!(a.read(), json!({"return": {"deferred": true}, "id": "x"}));

    // Within one client too: its OOB reply overtakes its own in-band one.
    a.send(&json!({"execute": "slow-in-band", "id": 1}));
    std::thread::sleep(std::time::Duration::from_millis(100));
    a.send(&json!({"exec-oob": "fast-oob", "id": 2}));
    assert_eq!(a.read()["id"], 2);
    assert_eq!(a.read()["id"], 1);
}

/// A QEMU that sends an event and a reply in one write during negotiation (as QEMU
/// may when an event fires at that moment): the gateway sees both, starts, and
/// serves. (Before the negotiation owned its frames, the reply was dropped and
/// start-up hung for good.)
#[test]
fn negotiation_sees_every_message_of_a_write() {
    use std::io::{BufRead, BufReader, Write};
    let dir = qmpgate_tests::tempdir();
    let path = dir.path().join("qemu.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        writer
            .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 99}, \"package\": \"\"}, \"capabilities\": []}}\r\n")
            .unwrap();
        let event =
            "{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\r\n";
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let message: serde_json::Value = serde_json::from_str(&line).unwrap();
            let reply = json!({"return": {"status": "running"}, "id": message["id"]});
            // The event and the reply together, in one write.
            if writer
                .write_all(format!("{event}{reply}\r\n").as_bytes())
                .is_err()
            {
                return;
            }
        }
    });
    let gateway = GatewayBuilder::new(&format!("socket,id=fake,path={}", path.display()))
        .args(["--profile", "permissive"])
        .spawn();
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "running"
    );
    drop(c);
    drop(gateway);
    let _ = server.join();
}

/// A QEMU that keeps the link open but stops answering is noticed by a liveness
/// probe: clients get `QMPGATE_UPSTREAM_LOST` with the reason, and a command waiting
/// on it gets an error, long before its own timeout.
#[test]
fn a_qemu_that_stops_answering_is_noticed_and_reported() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let statuses = AtomicUsize::new(0);
    // Answers the negotiation's query-status, then nothing that asks for the status.
    let fake = FakeQemu::start(move |name| match name {
        "query-status" if statuses.fetch_add(1, Ordering::SeqCst) > 0 => FakeAction::Ignore,
        "hang" => FakeAction::Ignore,
        _ => FakeAction::Return,
    });
    let mut gateway = GatewayBuilder::new(&fake.upstream_spec())
        .args(["--profile", "permissive"])
        .args(["--probe-after-ms", "100", "--probe-timeout-ms", "300"])
        .args(["--command-timeout-ms", "20000"])
        .spawn();
    let mut c = gateway.negotiated();
    let started = std::time::Instant::now();
    let mut lost = None;
    while let Some(line) = c.read_line() {
        let message: serde_json::Value = serde_json::from_str(&line).unwrap();
        if message["event"] == "QMPGATE_UPSTREAM_LOST" {
            lost = Some(message);
            break;
        }
    }
    let lost = lost.expect("the client is told");
    assert_eq!(
        lost["data"]["reason"],
        "QEMU stopped answering: no reply to a liveness probe (query-status) within 300ms"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "noticed after {:?}",
        started.elapsed()
    );
    let (code, stderr) = gateway.wait();
    assert_eq!(
        code,
        Some(1),
        "without reconnect-ms a lost upstream ends qmpgate"
    );
    assert!(stderr.contains("QEMU stopped answering"), "{stderr}");
}

/// A QEMU that answers is never taken for a silent one, however often it is probed.
#[test]
fn a_live_quiet_qemu_passes_every_probe() {
    let qemu = qmpgate_tests::Qemu::start();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--probe-after-ms", "20", "--probe-timeout-ms", "3000"])
        .spawn();
    let mut c = gateway.negotiated();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // Dozens of probes later, still connected.
    c.send(&json!({"execute": "query-status", "id": 1}));
    let reply = c.read_reply();
    assert_eq!(reply["return"]["status"], "prelaunch", "{reply}");
    assert!(!gateway.stderr().contains("stopped answering"));
}

/// QEMU stopped (SIGSTOP) with commands pipelined behind it: every command still
/// gets its answer at its own deadline, including those waiting for the client's
/// share of QEMU's queue; a command that never reached QEMU is never run, and a
/// slot whose command timed out is given back. Checked on the host: QEMU's chardevs.
#[test]
fn a_stopped_qemu_cannot_silence_a_clients_timeouts() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::time::{Duration, Instant};

    let qemu = qmpgate_tests::Qemu::start();
    let dir = qmpgate_tests::tempdir();
    let config = dir.path().join("qmpgate.toml");
    std::fs::write(
        &config,
        "command-timeout-ms = 1000\ncommand-timeouts = { query-status = 2500 }\n",
    )
    .unwrap();
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--profile", "permissive", "--probe-after-ms", "0"])
        .args(["--config", config.to_str().unwrap()])
        .spawn();
    let mut c = gateway.negotiated();
    let qemu_pid = Pid::from_raw(qemu.pid() as i32);
    struct Resume(Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }
    kill(qemu_pid, Signal::SIGSTOP).unwrap();
    let resume = Resume(qemu_pid);

    // Four commands fill the client's share of QEMU's queue (MAX_CLIENT_UPSTREAM);
    // three more wait for a slot, with a shorter deadline than the four.
    let started = Instant::now();
    for i in 1..=4 {
        c.send(&json!({"execute": "query-status", "id": format!("s{i}")}));
    }
    let ringbuf = |id: &str| json!({"id": id, "backend": {"type": "ringbuf", "data": {}}});
    for i in 5..=7 {
        let id = format!("c{i}");
        c.send(&json!({"execute": "chardev-add", "arguments": ringbuf(&id), "id": id}));
    }
    for i in 1..=4 {
        assert_eq!(
            c.read_reply(),
            json!({"error": {"class": "GenericError", "desc": "QEMU did not answer 'query-status' within 2500 ms; qmpgate stopped waiting (a late reply will be discarded)"}, "id": format!("s{i}")})
        );
    }
    for i in 5..=7 {
        assert_eq!(
            c.read_reply(),
            json!({"error": {"class": "GenericError", "desc": "'chardev-add' did not reach QEMU within 1000 ms (QEMU is still busy with earlier commands); it was not run"}, "id": format!("c{i}")})
        );
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(2500 + 1500),
        "seven answers took {waited:?}; the longest deadline was 2.5 s"
    );

    // The timed-out commands gave their slots back: the next one reaches QEMU.
    c.send(&json!({"execute": "chardev-add", "arguments": ringbuf("c8"), "id": "c8"}));
    assert_eq!(
        c.read_reply(),
        json!({"error": {"class": "GenericError", "desc": "QEMU did not answer 'chardev-add' within 1000 ms; qmpgate stopped waiting (a late reply will be discarded)"}, "id": "c8"})
    );

    drop(resume);
    // QEMU's late replies go nowhere; this client's next answer is its own.
    let chardevs = c.execute("query-chardev", json!({}));
    let labels: Vec<&str> = chardevs["return"]
        .as_array()
        .unwrap_or_else(|| panic!("a late reply was given to the wrong command: {chardevs}"))
        .iter()
        .filter_map(|c| c["label"].as_str())
        .collect();
    assert!(labels.contains(&"c8"), "QEMU ran what it got: {labels:?}");
    for never_sent in ["c5", "c6", "c7"] {
        assert!(
            !labels.contains(&never_sent),
            "{never_sent} was reported as not run, but QEMU has it: {labels:?}"
        );
    }
}
