//! Fds a client sends (SCM_RIGHTS) with `getfd`/`add-fd`: on a listener that
//! passes them (`fds=pass`, or the `libvirt` profile's listener) they reach QEMU,
//! which then writes through them (`migrate` to `fd:NAME`, as `virsh save` does);
//! on any other listener they are closed on arrival. Either way qmpgate keeps no
//! copy. And each listener's own command deadline (`timeout-ms=`).

use std::fs::File;
use std::io::Read;
use std::time::Duration;

use qmpgate_tests::effects::fds_open_on;
use qmpgate_tests::{FakeAction, FakeQemu, GatewayBuilder, Qemu, QmpClient, eventually, tempdir};
use serde_json::{Value, json};

/// `getfd` with `file` attached.
fn getfd(client: &mut QmpClient, name: &str, file: &File) -> Value {
    client.send_with_fds(
        &json!({"execute": "getfd", "arguments": {"fdname": name}}),
        &[file],
    );
    client.read_reply()
}

/// Migrates to `fd:NAME` and waits until QEMU says it completed.
fn migrate_to(client: &mut QmpClient, name: &str) {
    let reply = client.execute("migrate", json!({"uri": format!("fd:{name}")}));
    assert_eq!(reply, json!({"return": {}}));
    eventually("the migration completes", || {
        let status = client.execute("query-migrate", json!({}));
        match status["return"]["status"].as_str() {
            Some("completed") => true,
            Some("failed") => panic!("migration failed: {status}"),
            _ => false,
        }
    });
}

/// The first bytes of a migration stream: QEMU's file magic.
fn is_migration_stream(path: &std::path::Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"QEVM"
}

#[test]
fn a_manager_listener_passes_fds_to_qemu_which_writes_through_them() {
    let qemu = Qemu::start();
    let (builder, manager) =
        GatewayBuilder::new(&qemu.upstream_spec()).listener_with("libvirt", 3, "profile=libvirt");
    let gateway = builder.spawn_raw();
    let dir = tempdir();
    let saved = dir.path().join("saved");
    let file = File::create(&saved).unwrap();

    let mut client = QmpClient::negotiated(&manager);
    assert_eq!(getfd(&mut client, "save", &file), json!({"return": {}}));
    // QEMU holds the file now; qmpgate closed its own copy once QEMU had it.
    assert!(!fds_open_on(qemu.pid(), &file).is_empty());
    assert_eq!(fds_open_on(gateway.pid(), &file), Vec::<i32>::new());
    drop(file);
    migrate_to(&mut client, "save");
    assert!(is_migration_stream(&saved), "QEMU did not write the file");

    // `add-fd` takes its fd the same way: QEMU lists it in its fd set.
    let extra = File::create(dir.path().join("extra")).unwrap();
    client.send_with_fds(
        &json!({"execute": "add-fd", "arguments": {"fdset-id": 7, "opaque": "extra"}}),
        &[&extra],
    );
    let reply = client.read_reply();
    assert_eq!(reply["return"]["fdset-id"], 7, "{reply}");
    let sets = client.execute("query-fdsets", json!({}));
    assert_eq!(sets["return"][0]["fds"][0]["opaque"], "extra", "{sets}");
    assert!(!fds_open_on(qemu.pid(), &extra).is_empty());
    assert_eq!(fds_open_on(gateway.pid(), &extra), Vec::<i32>::new());
}

#[test]
fn fds_sent_to_any_other_listener_are_closed_and_never_reach_qemu() {
    let qemu = Qemu::start();
    let (builder, tenant) =
        GatewayBuilder::new(&qemu.upstream_spec()).listener_with("tenant", 3, "profile=permissive");
    let gateway = builder.spawn_raw();
    let file = File::create(tempdir().path().join("f")).unwrap();
    let mut client = QmpClient::negotiated(&tenant);
    let reply = getfd(&mut client, "save", &file);
    assert_eq!(
        reply["error"]["desc"], "No file descriptor supplied via SCM_RIGHTS",
        "{reply}"
    );
    assert_eq!(fds_open_on(qemu.pid(), &file), Vec::<i32>::new());
    assert_eq!(fds_open_on(gateway.pid(), &file), Vec::<i32>::new());
}

#[test]
fn fds_no_command_took_are_closed_when_newer_ones_come_or_the_client_leaves() {
    let qemu = Qemu::start();
    let (builder, manager) = GatewayBuilder::new(&qemu.upstream_spec()).listener_with(
        "m",
        3,
        "fds=pass,profile=permissive",
    );
    let gateway = builder.spawn_raw();
    let dir = tempdir();
    let (first, second) = (
        File::create(dir.path().join("1")).unwrap(),
        File::create(dir.path().join("2")).unwrap(),
    );
    let mut client = QmpClient::negotiated(&manager);
    // Sent with a command that takes none: held, as QEMU holds them...
    client.send_with_fds(&json!({"execute": "query-status"}), &[&first]);
    assert!(client.read_reply()["return"].is_object());
    assert_eq!(fds_open_on(gateway.pid(), &first).len(), 1);
    // ... until newer ones replace them (closed) ...
    client.send_with_fds(&json!({"execute": "query-status"}), &[&second]);
    assert!(client.read_reply()["return"].is_object());
    assert_eq!(fds_open_on(gateway.pid(), &first), Vec::<i32>::new());
    assert_eq!(fds_open_on(gateway.pid(), &second).len(), 1);
    // ... or the client leaves.
    drop(client);
    eventually("qmpgate closes the fds of a client that left", || {
        fds_open_on(gateway.pid(), &second).is_empty()
    });
    assert_eq!(fds_open_on(qemu.pid(), &second), Vec::<i32>::new());
}

#[test]
fn clients_passing_fds_at_once_each_get_their_own_in_qemu() {
    // QEMU keeps the fds it read last until a command takes them: if the second
    // getfd's fd reached QEMU before the first getfd ran, the first would take the
    // second's file and the second would find none. qmpgate lets one command with
    // fds into QEMU at a time.
    let qemu = Qemu::start();
    let (builder, manager) =
        GatewayBuilder::new(&qemu.upstream_spec()).listener_with("m", 3, "profile=libvirt");
    let _gateway = builder.spawn_raw();
    let dir = tempdir();
    let mut clients: Vec<QmpClient> = (0..4).map(|_| QmpClient::negotiated(&manager)).collect();
    let files: Vec<File> = (0..clients.len())
        .map(|i| File::create(dir.path().join(format!("f{i}"))).unwrap())
        .collect();
    for round in 0..5 {
        // QEMU's main loop busy with a long answer while its monitor thread reads on:
        // the getfds behind it are read (with their fds) before any of them runs.
        for _ in 0..3 {
            clients[0].send(&json!({"execute": "query-cpu-definitions"}));
        }
        for (i, client) in clients.iter_mut().enumerate() {
            client.send_with_fds(
                &json!({"execute": "getfd", "arguments": {"fdname": format!("c{i}r{round}")}}),
                &[&files[i]],
            );
        }
        for _ in 0..3 {
            assert!(clients[0].read_reply()["return"].is_array());
        }
        for client in &mut clients {
            assert_eq!(client.read_reply(), json!({"return": {}}));
        }
    }
    // Every name holds its own client's file.
    for (i, file) in files.iter().enumerate() {
        assert_eq!(
            fds_open_on(qemu.pid(), file).len(),
            5,
            "QEMU holds file {i} under each of its 5 names"
        );
    }
}

#[test]
fn a_listener_that_passes_fds_needs_a_unix_socket_and_a_policy_that_takes_them() {
    let qemu = Qemu::start();
    GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--listen",
            "socket,id=m,path=/tmp/unused-qmpgate.sock,server=on,fds=pass,profile=safe",
        ])
        .fails_with("fds=pass: profile 'safe' refuses every command that takes an fd");
    // The built-in policy's default profile is safe: the listener's clients would
    // get every getfd refused, so the spec is refused instead.
    let (builder, _) = GatewayBuilder::new(&qemu.upstream_spec()).listener_with("m", 3, "fds=pass");
    builder.fails_with(
        "listener 'm': fds=pass, but its clients' policy is profile 'safe', which refuses every command that takes an fd",
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    GatewayBuilder::new(&qemu.upstream_spec())
        .fd(port, 4)
        .args([
            "--listen",
            "socket,id=t,fd=4,server=on,fds=pass,profile=permissive",
        ])
        .fails_with("listener 't': fds=pass needs a unix socket; fd=4 is TCP");
}

#[test]
fn each_listener_has_its_own_command_deadline() {
    // QEMU takes 1.5 s to answer `slow`; the gateway's deadline is 500 ms.
    let fake = FakeQemu::start(|name| match name {
        "slow" => FakeAction::Delay(Duration::from_millis(1500)),
        _ => FakeAction::Return,
    });
    let (builder, gateway_default) = GatewayBuilder::new(&fake.upstream_spec())
        .args(["--profile", "permissive", "--command-timeout-ms", "500"])
        .listener("tenant", 3);
    let (builder, manager) = builder.listener_with("libvirt", 4, "profile=libvirt");
    let (builder, patient) = builder.listener_with("patient", 5, "timeout-ms=0");
    let (builder, hasty) = builder.listener_with("hasty", 6, "timeout-ms=100");
    let _gateway = builder.spawn_raw();

    let desc = |reply: Value| reply["error"]["desc"].as_str().unwrap_or("").to_string();
    let mut c = QmpClient::negotiated(&gateway_default);
    let started = std::time::Instant::now();
    assert!(
        desc(c.execute("slow", json!({}))).contains("QEMU did not answer 'slow' within 500 ms"),
    );
    assert!(started.elapsed() < Duration::from_millis(1400));
    // The manager's listener and timeout-ms=0 wait as long as QEMU takes.
    for path in [&manager, &patient] {
        let mut c = QmpClient::negotiated(path);
        assert_eq!(c.execute("slow", json!({})), json!({"return": {}}));
    }
    let mut c = QmpClient::negotiated(&hasty);
    assert!(desc(c.execute("slow", json!({}))).contains("within 100 ms"));
}
