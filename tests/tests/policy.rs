//! The policy's promise, checked by its effects on the host: through the built-in
//! `safe` profile, no command below makes QEMU run a host program, create, change,
//! open or read a host file, open a listener, connect to a host socket, or change its
//! own fd table; and the gateway's link stays up. Each vector is first run with the
//! policy off, against the same kind of QEMU, to show that it *does* have the effect
//! there (so a passing test means the policy stopped it, not that QEMU could not).
//! Both QEMU versions the project supports are tried (7.2 and 10.0), on `-M pc`.
//! HMP lines are tried twice: through `human-monitor-command` and typed on an HMP
//! listener.
//!
//! The same file checks that `safe` still lets everyday management through, and
//! that the table classifies every command and union variant of both QEMUs' schemas
//! (`qmpgate policy check`).

use qmpgate_tests::effects::{Sandbox, fd_table, free_port, tcp_listening};
use qmpgate_tests::{GatewayBuilder, HmpClient, QEMU_PC, Qemu, QemuVersion, QmpClient};
use serde_json::{Value, json};

/// What a vector does to the host when nothing stops it.
#[derive(Debug, Clone)]
enum Effect {
    /// Creates this sandbox entry (a file, a socket; a program's marker file).
    Creates(&'static str),
    /// Opens or reads this sandbox file or directory.
    Opens(&'static str),
    /// Replaces or rewrites the victim file.
    ChangesVictim,
    /// Listens on this TCP port.
    Listens(u16),
    /// Connects to the sandbox's listening socket.
    Connects,
    /// Opens new fds in QEMU (a pty, a tap device).
    OpensFds,
}

/// One attack: a QMP command (`{"execute": ..., "arguments": ...}`), with commands
/// to run before it that `safe` allows, and its effect.
struct Vector {
    name: &'static str,
    setup: Vec<Value>,
    command: Value,
    effect: Effect,
    /// Versions whose schema has the command (all when empty).
    only: Option<QemuVersion>,
}

fn qmp(name: &str, arguments: Value) -> Value {
    json!({ "execute": name, "arguments": arguments })
}

fn hmp(line: &str) -> Value {
    qmp("human-monitor-command", json!({ "command-line": line }))
}

/// The vectors, with paths in `sb` and free ports.
fn vectors(sb: &Sandbox) -> Vec<Vector> {
    let p = |name: &str| sb.path(name).display().to_string();
    let v = |name, command, effect| Vector {
        name,
        setup: Vec::new(),
        command,
        effect,
        only: None,
    };
    let (port1, port2, port3, port4) = (free_port(), free_port(), free_port(), free_port());
    let (port5, port6) = (free_port(), free_port());
    vec![
        // Programs.
        v(
            "migrate to exec:",
            qmp(
                "migrate",
                json!({"uri": format!("exec:touch {}", p("ran-migrate"))}),
            ),
            Effect::Creates("ran-migrate"),
        ),
        Vector {
            only: Some(QemuVersion::V10_0),
            ..v(
                "migrate channels to exec",
                qmp(
                    "migrate",
                    json!({"channels": [{"channel-type": "main", "addr": {"transport": "exec", "args": ["/usr/bin/touch", p("ran-channels")]}}]}),
                ),
                Effect::Creates("ran-channels"),
            )
        },
        // Host files.
        v(
            "screendump",
            qmp("screendump", json!({"filename": p("new-shot.ppm")})),
            Effect::Creates("new-shot.ppm"),
        ),
        v(
            "dump-guest-memory",
            qmp(
                "dump-guest-memory",
                json!({"paging": false, "protocol": format!("file:{}", p("new-dump")), "begin": 0, "length": 4096}),
            ),
            Effect::Creates("new-dump"),
        ),
        v(
            "memsave",
            qmp(
                "memsave",
                json!({"val": 0, "size": 4096, "filename": p("new-memsave")}),
            ),
            Effect::Creates("new-memsave"),
        ),
        v(
            "pmemsave",
            qmp(
                "pmemsave",
                json!({"val": 0, "size": 4096, "filename": p("new-pmemsave")}),
            ),
            Effect::Creates("new-pmemsave"),
        ),
        v(
            "xen-save-devices-state over a host file",
            qmp(
                "xen-save-devices-state",
                json!({"filename": p("victim"), "live": false}),
            ),
            Effect::ChangesVictim,
        ),
        v(
            "chardev-add file",
            qmp(
                "chardev-add",
                json!({"id": "cf", "backend": {"type": "file", "data": {"out": p("new-chardev-file")}}}),
            ),
            Effect::Creates("new-chardev-file"),
        ),
        v(
            "chardev-add ringbuf with a logfile",
            qmp(
                "chardev-add",
                json!({"id": "cl", "backend": {"type": "ringbuf", "data": {"logfile": p("new-logfile")}}}),
            ),
            Effect::Creates("new-logfile"),
        ),
        v(
            "object-add memory-backend-file",
            qmp(
                "object-add",
                json!({"qom-type": "memory-backend-file", "id": "mf", "mem-path": p("new-mem"), "size": 1048576}),
            ),
            Effect::Creates("new-mem"),
        ),
        v(
            "blockdev-add raw over a host file",
            qmp(
                "blockdev-add",
                json!({"driver": "raw", "node-name": "n1", "file": {"driver": "file", "filename": p("secret")}}),
            ),
            Effect::Opens("secret"),
        ),
        v(
            "blockdev-add blkdebug config=",
            qmp(
                "blockdev-add",
                json!({"driver": "blkdebug", "node-name": "n2", "config": p("secret"), "image": {"driver": "null-co"}}),
            ),
            Effect::Opens("secret"),
        ),
        v(
            "blockdev-add vvfat over a host directory",
            qmp(
                "blockdev-add",
                json!({"driver": "vvfat", "node-name": "n3", "dir": p("dir"), "read-only": true}),
            ),
            Effect::Opens("dir"),
        ),
        v(
            "device_add with romfile=",
            qmp(
                "device_add",
                json!({"driver": "e1000", "id": "rom1", "romfile": p("secret")}),
            ),
            Effect::Opens("secret"),
        ),
        v(
            "object-add rng-random",
            qmp(
                "object-add",
                json!({"qom-type": "rng-random", "id": "rng1", "filename": p("secret")}),
            ),
            Effect::Opens("secret"),
        ),
        v(
            "object-add input-linux",
            qmp(
                "object-add",
                json!({"qom-type": "input-linux", "id": "il1", "evdev": p("secret")}),
            ),
            Effect::Opens("secret"),
        ),
        v(
            "netdev_add vhost-vdpa",
            qmp(
                "netdev_add",
                json!({"type": "vhost-vdpa", "id": "vd1", "vhostdev": p("secret")}),
            ),
            Effect::Opens("secret"),
        ),
        // Host sockets.
        v(
            "netdev_add user hostfwd",
            qmp(
                "netdev_add",
                json!({"type": "user", "id": "u1", "hostfwd": [{"str": format!("tcp:127.0.0.1:{port1}-:22")}]}),
            ),
            Effect::Listens(port1),
        ),
        v(
            "netdev_add socket listen=",
            qmp(
                "netdev_add",
                json!({"type": "socket", "id": "s1", "listen": format!("127.0.0.1:{port2}")}),
            ),
            Effect::Listens(port2),
        ),
        v(
            "netdev_add stream over a host file",
            qmp(
                "netdev_add",
                json!({"type": "stream", "id": "st1", "server": true, "addr": {"type": "unix", "path": p("victim")}}),
            ),
            Effect::ChangesVictim,
        ),
        v(
            "nbd-server-start",
            qmp(
                "nbd-server-start",
                json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port3.to_string()}}}),
            ),
            Effect::Listens(port3),
        ),
        v(
            "blockdev-add nbd to a host socket",
            qmp(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": "n4", "server": {"type": "unix", "path": p("listening.sock")}, "export": "x"}),
            ),
            Effect::Connects,
        ),
        v(
            "chardev-add socket server",
            qmp(
                "chardev-add",
                json!({"id": "cs", "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": p("new-chardev-sock")}}, "server": true, "wait": false}}}),
            ),
            Effect::Creates("new-chardev-sock"),
        ),
        v(
            "chardev-add pty",
            qmp(
                "chardev-add",
                json!({"id": "cp", "backend": {"type": "pty", "data": {}}}),
            ),
            Effect::OpensFds,
        ),
        // HMP lines, read the way QEMU reads them (through human-monitor-command).
        v(
            "HMP migrate with a glued flag",
            hmp(&format!("migrate -d\"exec:touch {}\"", p("ran-hmp-glued"))),
            Effect::Creates("ran-hmp-glued"),
        ),
        v(
            "HMP migrate with a quoted exec: URI",
            hmp(&format!(
                "migrate -d \"exec:touch {}\"",
                p("ran-hmp-quoted")
            )),
            Effect::Creates("ran-hmp-quoted"),
        ),
        v(
            "HMP migrate with a glued flag and no quotes",
            hmp(&format!(
                "migrate -dexec:touch${{IFS}}{}",
                p("ran-hmp-bare")
            )),
            Effect::Creates("ran-hmp-bare"),
        ),
        v(
            "HMP chardev-add with the implied key repeated",
            hmp(&format!(
                "chardev-add null,id=hr,backend=file,path={}",
                p("new-hmp-repeat")
            )),
            Effect::Creates("new-hmp-repeat"),
        ),
        Vector {
            // QEMU 10.0 dropped the aliases.
            only: Some(QemuVersion::V7_2),
            ..v(
                "HMP chardev-add by an alias (tty = serial)",
                hmp(&format!("chardev-add tty,id=ht,path={}", p("secret"))),
                Effect::Opens("secret"),
            )
        },
        Vector {
            only: Some(QemuVersion::V7_2),
            ..v(
                "HMP chardev-add by an alias (parport = parallel)",
                hmp(&format!("chardev-add parport,id=hpp,path={}", p("secret"))),
                Effect::Opens("secret"),
            )
        },
        v(
            "HMP chardev-add with a quoted spec",
            hmp(&format!(
                "chardev-add \"file,id=hq,path={}\"",
                p("new-hmp-quoted")
            )),
            Effect::Creates("new-hmp-quoted"),
        ),
        v(
            "HMP netdev_add hostfwd",
            hmp(&format!(
                "netdev_add user,id=hu,hostfwd=tcp:127.0.0.1:{port4}-:22"
            )),
            Effect::Listens(port4),
        ),
        v(
            "HMP object_add in JSON form",
            hmp(&format!(
                "object_add {{\"qom-type\": \"memory-backend-file\", \"id\": \"hj\", \"mem-path\": \"{}\", \"size\": 1048576}}",
                p("new-hmp-json")
            )),
            Effect::Creates("new-hmp-json"),
        ),
        v(
            "HMP screendump",
            hmp(&format!("screendump {}", p("new-hmp-shot.ppm"))),
            Effect::Creates("new-hmp-shot.ppm"),
        ),
        // The HMP forms of hmp.rs's table, and HMP-only commands.
        v(
            "HMP dump-guest-memory",
            hmp(&format!("dump-guest-memory {} 0 4096", p("new-hmp-dump"))),
            Effect::Creates("new-hmp-dump"),
        ),
        v(
            "HMP memsave",
            hmp(&format!("memsave 0 4096 \"{}\"", p("new-hmp-memsave"))),
            Effect::Creates("new-hmp-memsave"),
        ),
        v(
            "HMP migrate to a host socket",
            hmp(&format!("migrate -d unix:{}", p("listening.sock"))),
            Effect::Connects,
        ),
        v(
            "HMP chardev-add socket server",
            hmp(&format!(
                "chardev-add socket,id=hs,path={},server=on,wait=off",
                p("new-hmp-chardev-sock")
            )),
            Effect::Creates("new-hmp-chardev-sock"),
        ),
        v(
            "HMP object_add secret file=",
            hmp(&format!("object_add secret,id=hsec,file={}", p("secret"))),
            Effect::Opens("secret"),
        ),
        v(
            "HMP gdbserver",
            hmp(&format!("gdbserver tcp:127.0.0.1:{port5}")),
            Effect::Listens(port5),
        ),
        v(
            "HMP drive_add over a host file",
            hmp(&format!(
                "drive_add 0 if=none,id=hd,format=raw,file={}",
                p("secret")
            )),
            Effect::Opens("secret"),
        ),
        Vector {
            setup: vec![qmp("netdev_add", json!({"type": "user", "id": "hf"}))],
            ..v(
                "HMP hostfwd_add",
                hmp(&format!("hostfwd_add hf tcp:127.0.0.1:{port6}-:22")),
                Effect::Listens(port6),
            )
        },
    ]
}

/// QEMU (`-M pc`) behind a gateway: with the built-in `safe` profile, or with no
/// policy at all.
struct Target {
    qemu: Qemu,
    _gateway: qmpgate_tests::Gateway,
    client: QmpClient,
    /// A client on the gateway's HMP (`mode=readline`) listener.
    hmp: HmpClient,
}

impl Target {
    fn start(version: QemuVersion, policy: bool) -> Target {
        let qemu = Qemu::start_version(version, QEMU_PC);
        let (mut builder, hmp_path) =
            GatewayBuilder::new(&qemu.upstream_spec()).listener_with("hmp", 4, "mode=readline");
        if !policy {
            builder = builder.args(["--no-default-policy"]);
        }
        let gateway = builder.spawn();
        let client = gateway.negotiated();
        let hmp = HmpClient::connect(&hmp_path);
        Target {
            qemu,
            _gateway: gateway,
            client,
            hmp,
        }
    }

    fn run(&mut self, command: &Value) -> Value {
        let mut command = command.clone();
        command["id"] = json!("vector");
        self.client.send(&command);
        self.client.read_reply()
    }

    fn link_up(&mut self) -> bool {
        let reply = self.run(&qmp("query-status", json!({})));
        reply.get("return").is_some()
    }
}

/// Whether `effect` happened in `sb` (draining what it observed).
fn happened(effect: &Effect, sb: &Sandbox, fds_before: usize, pid: u32) -> bool {
    let opened = sb.opened();
    let connected = sb.connected();
    match effect {
        Effect::Creates(name) => wait_for(|| sb.path(name).exists()),
        Effect::Opens(name) => opened.contains(&sb.path(name)),
        Effect::ChangesVictim => wait_for(|| !sb.victim_intact()),
        Effect::Listens(port) => tcp_listening(*port),
        Effect::Connects => connected || wait_for(|| sb.connected()),
        Effect::OpensFds => fd_table(pid).len() > fds_before,
    }
}

/// Effects of asynchronous work (a migration's helper program) show up a little
/// after the reply; give them a moment before deciding they did not happen.
fn wait_for(mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How a vector reaches the gateway.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// As a QMP command (HMP lines through `human-monitor-command`).
    Qmp,
    /// Typed on the HMP listener (HMP vectors only).
    HmpListener,
}

impl Vector {
    fn is_hmp(&self) -> bool {
        self.command["execute"] == "human-monitor-command"
    }

    /// The ways this vector can be sent.
    fn vias(&self) -> &'static [Via] {
        if self.is_hmp() {
            &[Via::Qmp, Via::HmpListener]
        } else {
            &[Via::Qmp]
        }
    }
}

/// Sends `vector` to `target` via `via`; returns the reply (QMP) or output (HMP).
fn send(target: &mut Target, vector: &Vector, via: Via) -> String {
    match via {
        Via::Qmp => target.run(&vector.command).to_string(),
        Via::HmpListener => target.hmp.run(
            vector.command["arguments"]["command-line"]
                .as_str()
                .unwrap(),
        ),
    }
}

fn promise_holds(version: QemuVersion) {
    // With the policy off, every vector has its effect, each way it can be sent:
    // the QEMU under test is able to do the harm. Each runs on its own QEMU and
    // sandbox (some change the VM for good).
    for index in 0..vectors(&Sandbox::new()).len() {
        let probe = vectors(&Sandbox::new()).remove(index);
        if probe.only.is_some_and(|only| only != version) {
            continue;
        }
        for &via in probe.vias() {
            let sb = Sandbox::new();
            let vector = vectors(&sb).remove(index);
            let mut open = Target::start(version, false);
            for step in &vector.setup {
                open.run(step);
            }
            let fds = fd_table(open.qemu.pid()).len();
            let answer = send(&mut open, &vector, via);
            assert!(
                happened(&vector.effect, &sb, fds, open.qemu.pid()),
                "QEMU {version:?} without policy ({via:?}): '{}' should have had {:?}, answer {answer}, sandbox {:?}",
                vector.name,
                vector.effect,
                sb.new_entries()
            );
        }
    }

    // Through `safe`: refused by the gateway, and nothing happened on the host. One
    // QEMU takes every vector in turn, each way it can be sent, so effects cannot
    // hide behind a fresh start.
    let sb = Sandbox::new();
    let mut gated = Target::start(version, true);
    for via in [Via::Qmp, Via::HmpListener] {
        for vector in vectors(&sb) {
            if vector.only.is_some_and(|only| only != version)
                || (matches!(via, Via::HmpListener) && !vector.is_hmp())
            {
                continue;
            }
            for step in &vector.setup {
                gated.run(step);
            }
            let pid = gated.qemu.pid();
            let fds = fd_table(pid);
            let answer = send(&mut gated, &vector, via);
            let refused = match via {
                Via::Qmp => serde_json::from_str::<Value>(&answer).unwrap()["error"]["desc"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                Via::HmpListener => answer.strip_prefix("Error: ").unwrap_or_default().into(),
            };
            assert!(
                refused.contains("refused by the safe profile")
                    || refused.contains("HMP command line refused"),
                "QEMU {version:?} ({via:?}): '{}' was not refused: {answer}",
                vector.name
            );
            assert!(
                !happened(&vector.effect, &sb, fds.len(), pid),
                "QEMU {version:?} ({via:?}): '{}' had its effect through safe",
                vector.name
            );
            assert_eq!(
                fd_table(pid),
                fds,
                "QEMU {version:?} ({via:?}): '{}' changed QEMU's fds",
                vector.name
            );
            assert!(gated.link_up(), "'{}' cut the gateway's link", vector.name);
        }
    }
    assert_eq!(sb.new_entries(), Vec::<String>::new());
    assert!(sb.victim_intact());
}

#[test]
fn safe_stops_every_vector_on_qemu_7_2() {
    promise_holds(QemuVersion::V7_2);
}

#[test]
fn safe_stops_every_vector_on_qemu_10_0() {
    promise_holds(QemuVersion::V10_0);
}

/// What `safe` must keep allowing, each answered by QEMU itself.
fn everyday_management_works(version: QemuVersion) {
    let mut t = Target::start(version, true);
    let ok = |t: &mut Target, command: Value| {
        let reply = t.run(&command);
        assert!(
            reply.get("return").is_some(),
            "QEMU {version:?}: {command} was not allowed or failed: {reply}"
        );
        reply["return"].clone()
    };
    assert_eq!(
        ok(&mut t, qmp("query-status", json!({})))["status"],
        "prelaunch"
    );
    ok(&mut t, qmp("cont", json!({})));
    ok(&mut t, qmp("stop", json!({})));
    ok(&mut t, qmp("system_reset", json!({})));
    ok(
        &mut t,
        qmp("netdev_add", json!({"type": "user", "id": "net0"})),
    );
    ok(
        &mut t,
        qmp(
            "device_add",
            json!({"driver": "e1000", "id": "nic0", "netdev": "net0", "mac": "52:54:00:12:34:56"}),
        ),
    );
    ok(
        &mut t,
        qmp("set_link", json!({"name": "nic0", "up": false})),
    );
    ok(
        &mut t,
        qmp(
            "chardev-add",
            json!({"id": "rb0", "backend": {"type": "ringbuf", "data": {"size": 4096}}}),
        ),
    );
    ok(
        &mut t,
        qmp("ringbuf-write", json!({"device": "rb0", "data": "hello"})),
    );
    assert_eq!(
        ok(
            &mut t,
            qmp("ringbuf-read", json!({"device": "rb0", "size": 5}))
        ),
        "hello"
    );
    ok(
        &mut t,
        qmp("object-add", json!({"qom-type": "iothread", "id": "io0"})),
    );
    ok(
        &mut t,
        qmp(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "null0", "size": 1048576}),
        ),
    );
    ok(
        &mut t,
        qmp(
            "send-key",
            json!({"keys": [{"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"}, {"type": "qcode", "data": "f1"}]}),
        ),
    );
    ok(&mut t, hmp("info status"));
    ok(&mut t, hmp("info registers"));
    ok(&mut t, hmp("sendkey ctrl-alt-f1"));
    let pci = ok(&mut t, hmp("info pci"));
    assert!(
        pci.as_str().unwrap().contains("Ethernet controller"),
        "{pci}"
    );
    // QEMU's own error, from QEMU: the command was forwarded.
    let reply = t.run(&qmp("balloon", json!({"value": 536870912})));
    assert_eq!(
        reply["error"]["class"], "DeviceNotActive",
        "balloon without a balloon device: {reply}"
    );
    ok(&mut t, qmp("device_del", json!({"id": "nic0"})));
}

#[test]
fn safe_keeps_everyday_management_working_on_qemu_7_2() {
    everyday_management_works(QemuVersion::V7_2);
}

#[test]
fn safe_keeps_everyday_management_working_on_qemu_10_0() {
    everyday_management_works(QemuVersion::V10_0);
}

/// The table classifies every command of both QEMUs and every union variant of the
/// commands it allows; `qmpgate policy check` says so and exits 0.
#[test]
fn the_table_covers_qemu_7_2_and_10_0() {
    for version in QemuVersion::ALL {
        let mut t = Target::start(version, false);
        let schema = t.run(&qmp("query-qmp-schema", json!({})));
        let dir = qmpgate_tests::tempdir();
        let file = dir.path().join("schema.json");
        std::fs::write(&file, schema.to_string()).unwrap();
        let out = std::process::Command::new(qmpgate_tests::qmpgate_bin())
            .args(["policy", "check", "--schema"])
            .arg(&file)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "QEMU {version:?}: the table leaves things unclassified:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(report.contains(" 0 unclassified (refused), 0 unclassified union variants"));
    }
}

/// `policy check` reports what a schema has and the table does not know, and
/// exits 1.
#[test]
fn policy_check_names_what_the_table_does_not_know() {
    let dir = qmpgate_tests::tempdir();
    let file = dir.path().join("schema.json");
    let schema = json!({"return": [
        {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
        {"name": "x-brand-new", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
        {"name": "0", "meta-type": "object", "members": []}
    ]});
    std::fs::write(&file, schema.to_string()).unwrap();
    let out = std::process::Command::new(qmpgate_tests::qmpgate_bin())
        .args(["policy", "check", "--schema"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1 commands allowed (safe), 0 refused by name, 1 unclassified (refused), 0 unclassified union variants (refused)\nunclassified command: x-brand-new\n"
    );
}

/// `policy show` prints what a profile allows, with reasons; `readonly` is a
/// subset of `safe`.
#[test]
fn policy_show_prints_the_profiles() {
    let show = |profile: &str| {
        let out = std::process::Command::new(qmpgate_tests::qmpgate_bin())
            .args(["policy", "show", "--profile", profile])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let safe = show("safe");
    let readonly = show("readonly");
    assert!(safe.contains("\nstop\n    pauses the vCPUs\n"), "{safe}");
    assert!(!readonly.contains("\nstop\n"));
    assert!(readonly.contains("\nquery-status\n    reads the VM's run state\n"));
    assert!(safe.contains("\nscreendump\n    it writes a host file named by the client\n"));
    let unknown = std::process::Command::new(qmpgate_tests::qmpgate_bin())
        .args(["policy", "show", "--profile", "lax"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no profile 'lax'"));
}

/// One VM, three listeners: the management socket permissive, a tenant's socket
/// `readonly`, the default one `safe`; each client gets its listener's profile, and
/// /status says which chain each listener runs.
#[test]
fn each_listener_can_have_its_own_profile() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec());
    let (builder, management) = builder.listener_with("mgmt", 4, "profile=permissive");
    let (builder, tenant) = builder.listener_with("tenant", 6, "profile=readonly");
    let (builder, status) = qmpgate_tests::with_status(builder);
    let gateway = builder.spawn();
    let mut default = gateway.negotiated();
    let mut management = QmpClient::negotiated(&management);
    let mut tenant = QmpClient::negotiated(&tenant);

    let refused = |reply: Value| {
        reply["error"]["desc"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        refused(tenant.execute("stop", json!({}))),
        "Command 'stop' is refused by the readonly profile: it needs the 'safe' profile"
    );
    assert!(
        tenant
            .execute("query-status", json!({}))
            .get("return")
            .is_some()
    );
    assert!(default.execute("stop", json!({})).get("return").is_some());
    assert_eq!(
        refused(default.execute("screendump", json!({"filename": "/nonexistent/x"}))),
        "Command 'screendump' is refused by the safe profile: it writes a host file named by the client"
    );
    // Permissive forwards: QEMU itself answers (and cannot write there).
    let reply = management.execute("screendump", json!({"filename": "/nonexistent/x.ppm"}));
    assert!(
        !refused(reply.clone()).contains("profile"),
        "the management listener is not filtered: {reply}"
    );

    let (code, _, body) = qmpgate_tests::http_get(&format!("{status}/status"));
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&body).unwrap();
    let listener = |id: &str| {
        status["chardevs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(listener("tenant")["policy"], "profile=readonly");
    assert_eq!(listener("mgmt")["policy"], "profile=permissive");
    assert_eq!(listener("qmp")["policy"], Value::Null);
    assert_eq!(
        status["upstreams"][0]["chain"],
        json!(["hmp", "policy (profile=safe)"])
    );
}

/// README's policy table is what `qmpgate policy show --markdown` prints
/// (regenerate with `scripts/update-readme-policy.sh`).
#[test]
fn the_readme_shows_the_table_as_it_is() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let begin = "<!-- policy-table:begin -->\n";
    let start = readme
        .find(begin)
        .expect("README has the policy table markers")
        + begin.len();
    let end = readme.find("<!-- policy-table:end -->").unwrap();
    let out = std::process::Command::new(qmpgate_tests::qmpgate_bin())
        .args(["policy", "show", "--profile", "safe", "--markdown"])
        .output()
        .unwrap();
    assert_eq!(
        readme[start..end].trim_end(),
        String::from_utf8(out.stdout).unwrap().trim_end(),
        "README.md's policy table is stale: run scripts/update-readme-policy.sh"
    );
}
