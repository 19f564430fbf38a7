//! Many VMs behind one gateway: several upstreams, each with its own listeners and
//! policy, added and removed at run time, and one going away without disturbing the
//! others. Real QEMUs throughout, and a fake one that never answers.

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use qmpgate_tests::{
    Control, FakeAction, FakeQemu, GatewayBuilder, Plugin, Qemu, QmpClient, eventually, http_get,
    python, tempdir, with_status,
};
use serde_json::{Value, json};

fn spec(id: &str, qemu: &Qemu, extra: &str) -> String {
    format!("socket,id={id},path={}{extra}", qemu.monitor.display())
}

fn status(url: &str) -> Value {
    let (code, _, body) = http_get(&format!("{url}/status"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_string())
        .collect()
}

/// Reads until the gateway closes the connection; returns the events seen.
fn events_until_closed(client: &mut QmpClient) -> Vec<String> {
    let mut events = Vec::new();
    while let Some(line) = client.read_line() {
        let message: Value = serde_json::from_str(&line).unwrap();
        if let Some(name) = message["event"].as_str() {
            events.push(name.to_string());
        }
    }
    events
}

#[test]
fn one_gateway_serves_several_qemus_each_with_its_listeners_and_policy() {
    let vm1 = Qemu::start_with(&["-name", "vm1"]);
    let mut vm2 = Qemu::start_with(&["-name", "vm2"]);
    let vm3 = Qemu::start_with(&["-name", "vm3"]);
    let builder = GatewayBuilder::base().args([
        "--upstream",
        &spec("vm1", &vm1, ""),
        "--upstream",
        &spec("vm2", &vm2, ",profile=readonly"),
        "--upstream",
        &spec("vm3", &vm3, ""),
    ]);
    let (builder, g1) = builder.listener_with("g1", 3, "upstream=vm1");
    let (builder, g2) = builder.listener_with("g2", 4, "upstream=vm2");
    let (builder, url) = with_status(builder);
    let (builder, g3) = builder.listener_with("g3", 6, "upstream=vm3");
    let mut gateway = builder.spawn_raw();

    let mut c1 = QmpClient::negotiated(&g1);
    let mut c2 = QmpClient::negotiated(&g2);
    let mut c3 = QmpClient::negotiated(&g3);
    // Each listener reaches its own QEMU.
    for (client, name) in [(&mut c1, "vm1"), (&mut c2, "vm2"), (&mut c3, "vm3")] {
        assert_eq!(
            client.execute("query-name", json!({})),
            json!({"return": {"name": name}})
        );
    }
    // The official Python client sees each VM through its own listener too.
    let steps = json!([{"execute": "query-name"}, {"execute": "cont"}]).to_string();
    let replies: Value =
        serde_json::from_str(&python("qmp_steps.py", &[g2.to_str().unwrap(), &steps])).unwrap();
    assert_eq!(replies[0], json!({"return": {"name": "vm2"}}));
    assert_eq!(replies[1]["error"]["class"], "GenericError", "{replies}");
    // Each upstream has its own policy: vm2's is read-only.
    assert_eq!(c1.execute("cont", json!({})), json!({"return": {}}));
    let denied = c2.execute("cont", json!({}));
    assert_eq!(denied["error"]["class"], "GenericError", "{denied}");
    // Events stay with their VM: only vm1 runs.
    let history = |c: &mut QmpClient| -> Vec<String> {
        c.execute("query-qmpgate-events", json!({}))["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"]["event"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(history(&mut c1), ["RESUME"]);
    assert!(history(&mut c2).is_empty());

    let s = status(&url);
    assert_eq!(ids(&s["upstreams"]), ["vm1", "vm2", "vm3"]);
    let policies: Vec<&str> = s["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["policy"].as_str().unwrap())
        .collect();
    assert_eq!(policies, ["default", "profile=readonly", "default"]);
    assert_eq!(s["upstreams"][1]["listeners"], json!(["g2"]));
    assert_eq!(s["upstreams"][1]["counters"]["denied"], 2);
    assert_eq!(s["counters"]["clients_connected"], 3);
    // vm1 and vm3 share one chain (one set of instances); vm2 has its own.
    let users: Vec<&Value> = s["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "policy")
        .map(|p| &p["upstreams"])
        .collect();
    assert_eq!(users, [&json!(["vm1", "vm3"]), &json!(["vm2"])]);
    let (_, _, metrics) = http_get(&format!("{url}/metrics"));
    assert!(metrics.contains("\nqmpgate_upstreams 3\n"), "{metrics}");
    assert!(
        metrics.contains("\nqmpgate_denied_total{upstream=\"vm2\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "qmpgate_plugin_denials_total{plugin=\"policy\",policy=\"profile=readonly\"} 2\n"
        ),
        "{metrics}"
    );
    // With several upstreams, the event stream must be told which.
    let (code, _, body) = http_get(&format!("{url}/events"));
    assert_eq!(
        (code, body.as_str()),
        (404, "name an upstream; there are 3: vm1, vm2, vm3\n")
    );

    // vm2's QEMU dies: its clients are disconnected and its listener closes; the
    // other VMs' clients notice nothing.
    vm2.kill();
    assert_eq!(events_until_closed(&mut c2), ["QMPGATE_UPSTREAM_LOST"]);
    eventually("vm2 removed from status", || {
        ids(&status(&url)["upstreams"]) == ["vm1", "vm3"]
    });
    assert!(
        UnixStream::connect(&g2).is_err(),
        "vm2's listener is closed"
    );
    assert_eq!(
        c1.execute("query-name", json!({})),
        json!({"return": {"name": "vm1"}})
    );
    assert_eq!(
        c3.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    assert!(gateway.is_running());
    drop((vm1, vm3));
    // The last upstream gone (and no control monitor to add more): qmpgate exits.
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(1), "{stderr}");
}

#[test]
fn listeners_must_name_their_upstream_when_there_are_several() {
    let vm1 = Qemu::start();
    let vm2 = Qemu::start();
    let two = || {
        GatewayBuilder::base().args([
            "--upstream",
            &spec("vm1", &vm1, ""),
            "--upstream",
            &spec("vm2", &vm2, ""),
        ])
    };
    two()
        .listener("g", 3)
        .0
        .fails_with("listener 'g': give upstream=ID; qmpgate has several upstreams (vm1, vm2)");
    two()
        .listener_with("g", 3, "upstream=vm9")
        .0
        .fails_with("listener 'g': no upstream 'vm9' (upstreams: vm1, vm2)");
    GatewayBuilder::base()
        .args(["--upstream", &spec("vm1", &vm1, ",plugins=hmp:nope")])
        .listener("g", 3)
        .0
        .fails_with(
            "upstream 'vm1': no plugin named 'nope' is configured (configured: hmp, policy)",
        );
    GatewayBuilder::base()
        .args([
            "--upstream",
            &spec("vm1", &vm1, ""),
            "--upstream",
            &spec("vm1", &vm2, ""),
        ])
        .listener("g", 3)
        .0
        .fails_with("chardev id 'vm1' is used twice");
    GatewayBuilder::base()
        .args(["--upstream", &spec("vm1", &vm1, ",server=on")])
        .listener("g", 3)
        .0
        .fails_with("upstream 'vm1' must be a client chardev (server=off): qmpgate connects to QEMU's monitor");
}

#[test]
fn the_control_monitor_adds_and_removes_upstreams_at_run_time() {
    let vm7 = Qemu::start_with(&["-name", "vm7"]);
    let vm8 = Qemu::start_with(&["-name", "vm8"]);
    // A host gateway: no upstream at start, only the control monitor.
    let builder = GatewayBuilder::base();
    let control_path = builder.dir().join("control.sock");
    let control_listener = UnixListener::bind(&control_path).unwrap();
    let (builder, url) = with_status(
        builder
            .fd(control_listener, 3)
            .args(["--control", "socket,id=control,fd=3,server=on"]),
    );
    let mut gateway = builder.spawn_raw();
    let mut control = Control::connect(&control_path);
    let none = None::<&UnixStream>;
    let err = |v: Value| v["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(ids(&status(&url)["upstreams"]).is_empty());

    // vm7: the management process connects to QEMU itself and hands qmpgate the
    // connected socket (getfd, then chardev-add of the named fd, server=false).
    let link = UnixStream::connect(&vm7.monitor).unwrap();
    assert_eq!(
        control.execute(
            json!({"execute": "getfd", "arguments": {"fdname": "vm7link"}}),
            Some(&link)
        ),
        json!({"return": {}})
    );
    drop(link);
    let upstream = json!({"execute": "chardev-add", "arguments": {"id": "vm7", "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": "vm7link"}}, "server": false}}}});
    assert_eq!(
        control.execute(upstream.clone(), none),
        json!({"return": {}})
    );
    // vm8: by path, through the HMP form, with its own policy.
    assert_eq!(
        control.hmp(&format!(
            "chardev-add {}",
            spec("vm8", &vm8, ",profile=readonly")
        )),
        json!({"return": ""})
    );

    // A listener for each, from fds passed at run time.
    let dir = tempdir();
    let mut add_listener = |id: &str, upstream: Option<&str>| {
        let path = dir.path().join(format!("{id}.sock"));
        let listener = UnixListener::bind(&path).unwrap();
        control.execute(
            json!({"execute": "getfd", "arguments": {"fdname": id}}),
            Some(&listener),
        );
        let mut data = json!({"addr": {"type": "fd", "data": {"str": id}}, "server": true});
        if let Some(upstream) = upstream {
            data["upstream"] = json!(upstream);
        }
        let reply = control.execute(
            json!({"execute": "chardev-add", "arguments": {"id": id, "backend": {"type": "socket", "data": data}}}),
            none,
        );
        (path, reply)
    };
    let (g7, reply) = add_listener("g7", Some("vm7"));
    assert_eq!(reply, json!({"return": {}}));
    let (g8, reply) = add_listener("g8", Some("vm8"));
    assert_eq!(reply, json!({"return": {}}));
    let (_, reply) = add_listener("lost", None);
    assert_eq!(
        err(reply),
        "listener 'lost': give upstream=ID; qmpgate has several upstreams (vm7, vm8)"
    );
    let mut c7 = QmpClient::negotiated(&g7);
    let mut c8 = QmpClient::negotiated(&g8);
    assert_eq!(
        c7.execute("query-name", json!({})),
        json!({"return": {"name": "vm7"}})
    );
    assert_eq!(c7.execute("cont", json!({})), json!({"return": {}}));
    assert_eq!(
        c8.execute("cont", json!({}))["error"]["class"],
        "GenericError",
        "vm8 is read-only"
    );

    // Clear errors for what cannot be added.
    let mut again = upstream;
    again["arguments"]["id"] = json!("vm7b");
    assert_eq!(
        err(control.execute(again, none)),
        "upstream 'vm7b': File descriptor named 'vm7link' has not been found",
        "a named fd is used once"
    );
    assert_eq!(
        control.hmp(&format!("chardev-add {}", spec("vm7", &vm8, ""))),
        json!({"return": "Error: Chardev 'vm7' already exists\r\n"})
    );
    assert_eq!(
        control.hmp("chardev-add socket,id=vm9,path=/nonexistent/qmp.sock")["return"],
        "Error: upstream 'vm9': chardev 'vm9': connect to /nonexistent/qmp.sock: No such file or directory (os error 2)\r\n"
    );
    assert_eq!(
        control.hmp(&format!(
            "chardev-add {}",
            spec("vm9", &vm8, ",plugins=nope")
        ))["return"],
        "Error: upstream 'vm9': no plugin named 'nope' is configured (configured: hmp, policy)\r\n"
    );
    // qmpgate's own members belong to a role (QAPI form): a listener may have its
    // own profile (this one fails only because its folder does not exist).
    let qapi = |data: Value| json!({"execute": "chardev-add", "arguments": {"id": "x", "backend": {"type": "socket", "data": data}}});
    let unix = json!({"type": "unix", "data": {"path": "/nonexistent/x.sock"}});
    assert_eq!(
        err(control.execute(
            qapi(json!({"addr": unix, "server": true, "profile": "safe", "upstream": "vm7"})),
            none
        )),
        "chardev 'x': bind /nonexistent/x.sock: No such file or directory (os error 2)"
    );
    assert_eq!(
        err(control.execute(
            qapi(json!({"addr": unix, "server": false, "upstream": "vm7"})),
            none
        )),
        "'upstream' binds a listener (server=true) to an upstream; this chardev is a client"
    );
    assert_eq!(
        err(control.execute(
            qapi(json!({"addr": unix, "server": false, "plugins": "hmp"})),
            none
        )),
        "Invalid parameter type for 'plugins', expected: array of names"
    );
    let wrong = UnixListener::bind(dir.path().join("wrong.sock")).unwrap();
    control.execute(
        json!({"execute": "getfd", "arguments": {"fdname": "wrong"}}),
        Some(&wrong),
    );
    assert_eq!(
        control.hmp("chardev-add socket,id=vm9,fd=wrong")["return"],
        "Error: upstream 'vm9': chardev 'vm9': fd 'wrong' is a listening socket, but the spec says server=off\r\n",
        "a listening socket is not a link to QEMU"
    );
    let chardevs = control.execute(json!({"execute": "query-chardev"}), none);
    let labels: Vec<(&str, &str)> = chardevs["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["label"].as_str().unwrap(),
                c["upstream"].as_str().or(c["policy"].as_str()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        labels,
        [
            ("vm7", "default"),
            ("g7", "vm7"),
            ("vm8", "profile=readonly"),
            ("g8", "vm8")
        ]
    );

    // Removing an upstream disconnects its clients and closes its listeners; the
    // gateway and the other VM go on.
    assert_eq!(
        control.execute(
            json!({"execute": "chardev-remove", "arguments": {"id": "vm7"}}),
            none
        ),
        json!({"return": {}})
    );
    assert_eq!(events_until_closed(&mut c7), ["QMPGATE_UPSTREAM_REMOVED"]);
    eventually("vm7's listener closed", || {
        UnixStream::connect(&g7).is_err()
    });
    assert_eq!(ids(&status(&url)["upstreams"]), ["vm8"]);
    assert_eq!(
        c8.execute("query-name", json!({})),
        json!({"return": {"name": "vm8"}})
    );
    // QEMU itself is untouched: it still runs, as vm7's client left it.
    let mut direct = QmpClient::negotiated(&vm7.monitor);
    assert_eq!(
        direct.execute("query-status", json!({}))["return"]["status"],
        "running"
    );

    // With a control monitor, qmpgate outlives its last upstream.
    drop(vm8);
    assert_eq!(events_until_closed(&mut c8), ["QMPGATE_UPSTREAM_LOST"]);
    eventually("vm8 removed", || ids(&status(&url)["upstreams"]).is_empty());
    assert!(gateway.is_running());
    assert_eq!(
        control.execute(json!({"execute": "query-chardev"}), none),
        json!({"return": []})
    );
}

#[test]
fn a_wedged_qemu_delays_only_its_own_clients_and_a_reload_keeps_each_policy() {
    // A QEMU that never answers `query-name`, next to a healthy one.
    let wedged = FakeQemu::start(|command| match command {
        "query-name" => FakeAction::Ignore,
        _ => FakeAction::Return,
    });
    let healthy = Qemu::start();
    let builder = GatewayBuilder::base().args([
        "--upstream".to_string(),
        format!("socket,id=wedged,path={}", wedged.path.display()),
        "--upstream".to_string(),
        spec("healthy", &healthy, ",profile=readonly"),
        "--command-timeout-ms".to_string(),
        "1500".to_string(),
    ]);
    let (builder, gw) = builder.listener_with("gw", 3, "upstream=wedged");
    let (builder, gh) = builder.listener_with("gh", 4, "upstream=healthy");
    let gateway = builder.spawn_raw();
    let mut stuck = QmpClient::negotiated(&gw);
    let mut fine = QmpClient::negotiated(&gh);

    stuck.send(&json!({"execute": "query-name", "id": "hang"}));
    let started = Instant::now();
    for _ in 0..20 {
        let reply = fine.execute("query-status", json!({}));
        assert_eq!(reply["return"]["status"], "prelaunch");
    }
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the healthy VM's clients waited for the wedged one: {:?}",
        started.elapsed()
    );
    let reply = stuck.read_reply();
    assert_eq!(reply["id"], "hang");
    assert_eq!(
        reply["error"]["desc"],
        "QEMU did not answer 'query-name' within 1500 ms; qmpgate stopped waiting (a late reply will be discarded)"
    );

    // SIGHUP rebuilds each upstream's chain from its own policy.
    gateway.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the reload", || gateway.stderr().contains("reloaded"));
    assert_eq!(
        fine.execute("cont", json!({}))["error"]["class"],
        "GenericError",
        "still read-only after the reload"
    );
    assert_eq!(stuck.execute("cont", json!({})), json!({"return": {}}));
}

#[test]
fn audit_records_name_the_vm_even_when_vms_share_a_chain() {
    let vm1 = Qemu::start();
    let vm2 = Qemu::start();
    let builder = GatewayBuilder::base()
        .plugin(Plugin::builtin("policy", "qmp-policy"))
        .plugin(Plugin::builtin("audit", "audit"));
    let log = builder.dir().join("audit.jsonl");
    let builder = builder.args([
        "--audit-log".to_string(),
        log.display().to_string(),
        "--upstream".to_string(),
        spec("vm1", &vm1, ""),
        "--upstream".to_string(),
        spec("vm2", &vm2, ""),
    ]);
    let (builder, g1) = builder.listener_with("g1", 3, "upstream=vm1");
    let (builder, g2) = builder.listener_with("g2", 4, "upstream=vm2");
    let _gateway = builder.spawn_raw();
    let mut c1 = QmpClient::negotiated(&g1);
    let mut c2 = QmpClient::negotiated(&g2);
    c1.execute("query-status", json!({}));
    c2.execute("screendump", json!({"filename": "/tmp/x.ppm"}));
    c1.execute("query-name", json!({}));

    let records: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["upstream"].as_str().unwrap(),
                r["command"].as_str().unwrap(),
                r["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("vm1", "query-status", "forwarded"),
            ("vm2", "screendump", "denied"),
            ("vm1", "query-name", "forwarded"),
        ]
    );
}

/// `chardev-add` never cuts a live server off from its clients: an id in use is
/// refused before the socket path is touched, and a path where something accepts
/// connections (another listener, QEMU's own monitor) is not unlinked. A stale
/// socket file is replaced, as QEMU replaces it.
#[test]
fn a_refused_chardev_add_leaves_live_sockets_alone() {
    let vm = Qemu::start();
    let builder = GatewayBuilder::base();
    let control_path = builder.dir().join("control.sock");
    let control_listener = UnixListener::bind(&control_path).unwrap();
    let dir = tempdir();
    let live = dir.path().join("g.sock");
    let mut gateway = builder
        .fd(control_listener, 3)
        .args(["--control", "socket,id=control,fd=3,server=on"])
        .args(["--upstream", &spec("vm", &vm, "")])
        .args([
            "--listen",
            &format!("socket,id=g,path={},server=on", live.display()),
        ])
        .spawn_raw();
    let mut control = Control::connect(&control_path);
    let works = |path: &std::path::Path| {
        QmpClient::negotiated(path).execute("query-status", json!({}))["return"]["status"]
            == "prelaunch"
    };
    assert!(works(&live));
    let inode = |path: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map(|m| m.ino()).ok()
    };
    let (live_inode, monitor_inode) = (inode(&live), inode(&vm.monitor));

    let add = |control: &mut Control, id: &str, path: &std::path::Path| {
        control.hmp(&format!(
            "chardev-add socket,id={id},path={},server=on",
            path.display()
        ))["return"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        add(&mut control, "g", &live),
        "Error: Chardev 'g' already exists\r\n"
    );
    assert_eq!(
        add(&mut control, "h", &live),
        format!(
            "Error: chardev 'h': {} is in use: something accepts connections on it\r\n",
            live.display()
        )
    );
    assert_eq!(
        add(&mut control, "h", &vm.monitor),
        format!(
            "Error: chardev 'h': {} is in use: something accepts connections on it\r\n",
            vm.monitor.display()
        )
    );
    assert_eq!(
        inode(&live),
        live_inode,
        "the live listener's socket is untouched"
    );
    assert_eq!(
        inode(&vm.monitor),
        monitor_inode,
        "QEMU's monitor socket is untouched"
    );
    assert!(works(&live), "and still serves");

    // A socket file nobody accepts on is stale: replaced, as QEMU does.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert_eq!(add(&mut control, "h", &stale), "");
    assert_ne!(inode(&stale), None);
    assert!(works(&stale));
    assert!(gateway.is_running());
}

#[test]
fn removing_an_upstream_answers_every_command_it_still_owes() {
    // A QEMU that stopped answering (SIGSTOP): whatever the client sent stays
    // pending until the operator removes the upstream.
    let vm = Qemu::start();
    let builder = GatewayBuilder::new(&vm.upstream_spec());
    let control_path = builder.dir().join("control.sock");
    let control_listener = UnixListener::bind(&control_path).unwrap();
    let mut gateway = builder
        .fd(control_listener, 4)
        .args(["--control", "socket,id=control,fd=4,server=on"])
        .spawn();
    let mut client = gateway.negotiated();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.pid() as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    // Six in-band commands: four reach QEMU (a client's share of its queue), two
    // wait for a slot.
    for n in 0..6 {
        client.send(&json!({"execute": "query-name", "id": n}));
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut control = Control::connect(&control_path);
    assert_eq!(
        control.execute(
            json!({"execute": "chardev-remove", "arguments": {"id": "qemu"}}),
            None::<&UnixStream>
        ),
        json!({"return": {}})
    );
    let mut replies = Vec::new();
    let mut events = Vec::new();
    while let Some(line) = client.read_line() {
        let message: Value = serde_json::from_str(&line).unwrap();
        match message["event"].as_str() {
            Some(name) => events.push(name.to_string()),
            None => replies.push(message),
        }
    }
    assert_eq!(events, ["QMPGATE_UPSTREAM_REMOVED"]);
    let sent = "qmpgate stopped serving upstream 'qemu' before 'query-name' was answered; QEMU may have run it";
    let expected: Vec<Value> = (0..6)
        .map(|n| {
            let desc = if n < 4 {
                sent.to_string()
            } else {
                "qmpgate stopped serving upstream 'qemu' before 'query-name' was sent to QEMU; it was not run".to_string()
            };
            json!({"id": n, "error": {"class": "GenericError", "desc": desc}})
        })
        .collect();
    assert_eq!(
        replies, expected,
        "every command answered, in order, before EOF"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.pid() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    assert!(gateway.is_running());
}
