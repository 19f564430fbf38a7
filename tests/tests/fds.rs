//! Inherited fds: the parent creates the sockets, qmpgate adopts and checks them.

use std::os::unix::net::{UnixListener, UnixStream};

use command_fds::FdMapping;
use qmpgate_tests::{GatewayBuilder, QEMU_NONE, Qemu, QemuVersion, QmpClient, qemu_argv, tempdir};
use serde_json::json;

#[test]
fn a_preopened_listener_is_connected_exactly_once_without_waiting() {
    let qemu = Qemu::start();
    let dir = tempdir();
    let path = dir.path().join("gate.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let _gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .fd(listener, 3)
        .args(["--listen", "socket,id=qmp,fd=3,server=on,wait=off"])
        .spawn_raw();
    // No retry loop and no sleep: the socket is listening before qmpgate even runs.
    let stream = UnixStream::connect(&path).expect("one connect() suffices");
    let mut c = QmpClient::from_stream(stream);
    assert_eq!(
        c.execute("qmp_capabilities", json!({})),
        json!({"return": {}})
    );
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["running"],
        false
    );
}

#[test]
fn the_upstream_can_be_an_inherited_connected_socket_with_no_path_at_all() {
    // A socketpair: QEMU gets one end (server=off), qmpgate the other. Nobody else
    // can reach this monitor.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = QemuVersion::under_test().command();
    cmd.args(QEMU_NONE)
        .args(["-chardev", "socket,id=mon,fd=3,server=off"])
        .args(["-mon", "chardev=mon,mode=control"]);
    command_fds::CommandFdExt::fd_mappings(
        &mut cmd,
        vec![FdMapping {
            parent_fd: theirs.into(),
            child_fd: 3,
        }],
    )
    .unwrap();
    let mut qemu = cmd.spawn().unwrap();
    drop(cmd);

    let gateway = GatewayBuilder::new("socket,id=qemu,fd=4")
        .fd(ours, 4)
        .spawn();
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    drop(gateway);
    qemu.kill().unwrap();
    qemu.wait().unwrap();
}

fn fails_with(builder: GatewayBuilder, expected: &str) {
    builder.fails_with(expected);
}

#[test]
fn bad_fds_and_specs_are_refused_with_clear_errors() {
    let qemu = Qemu::start();
    let up = qemu.upstream_spec();

    fails_with(
        GatewayBuilder::new(&up).args(["--listen", "socket,id=qmp,fd=250,server=on"]),
        "chardev 'qmp': fd 250 is not open (did the parent process pass it?)",
    );

    let file = std::fs::File::open("/dev/null").unwrap();
    fails_with(
        GatewayBuilder::new(&up)
            .fd(file, 3)
            .args(["--listen", "socket,id=qmp,fd=3,server=on"]),
        "chardev 'qmp': fd 3 is not a socket",
    );

    let (a, _b) = UnixStream::pair().unwrap();
    fails_with(
        GatewayBuilder::new(&up)
            .fd(a, 3)
            .args(["--listen", "socket,id=qmp,fd=3,server=on"]),
        "chardev 'qmp': fd 3 is a connected socket, but the spec says server=on",
    );

    let dir = tempdir();
    let listener = UnixListener::bind(dir.path().join("l.sock")).unwrap();
    fails_with(
        GatewayBuilder::base().fd(listener, 3).args([
            "--upstream",
            "socket,id=qemu,fd=3",
            "--listen",
            "socket,id=qmp,path=/tmp/x.sock,server=on",
        ]),
        "chardev 'qemu': fd 3 is a listening socket, but the spec says server=off",
    );

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    fails_with(
        GatewayBuilder::new(&up)
            .fd(udp, 3)
            .args(["--listen", "socket,id=qmp,fd=3,server=on"]),
        "fd 3 is not a stream socket",
    );

    fails_with(
        GatewayBuilder::new(&up).args(["--listen", "socket,id=qmp,fd=3,path=/tmp/x,server=on"]),
        "'fd' cannot be combined with 'path'",
    );
    fails_with(
        GatewayBuilder::new(&up).args(["--listen", "socket,path=/tmp/x,server=on"]),
        "Parameter 'id' is missing",
    );
    fails_with(
        GatewayBuilder::new(&up).args(["--listen", "socket,id=qmp,fd=myfd,server=on"]),
        "Unable to parse FD number 'myfd'",
    );
    fails_with(
        GatewayBuilder::new(&up).args(["--listen", "socket,id=qmp,path=/tmp/x"]),
        "listener 'qmp': a listener needs server=on",
    );
    fails_with(
        GatewayBuilder::new(&up).args(["--listen", "socket,id=qmp,systemd=qmp"]),
        "systemd passed no socket named 'qmp' (LISTEN_FDNAMES: none)",
    );
}

#[test]
fn systemd_socket_activation_by_name() {
    let qemu = Qemu::start();
    let dir = tempdir();
    let path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let status_listener = UnixListener::bind(dir.path().join("other.sock")).unwrap();
    // LISTEN_PID must be the gateway's own pid, which only a wrapper knows: exec
    // through sh, which keeps its pid, as systemd's own helpers do.
    let bin = qmpgate_tests::qmpgate_bin();
    let script = format!(
        "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=other:qmp exec {} --upstream {} --listen socket,id=gate,systemd=qmp --cache-dir {}",
        bin.display(),
        qemu.upstream_spec(),
        std::env::temp_dir().join("qmpgate-test-cache").display()
    );
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", &script])
        .stderr(std::process::Stdio::null());
    command_fds::CommandFdExt::fd_mappings(
        &mut cmd,
        vec![
            FdMapping {
                parent_fd: status_listener.into(),
                child_fd: 3,
            },
            FdMapping {
                parent_fd: listener.into(),
                child_fd: 4,
            },
        ],
    )
    .unwrap();
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let mut c = QmpClient::negotiated(&path);
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn adopted_fds_are_not_leaked_into_qemu() {
    // `qmpgate run` with an inherited listener: QEMU must not inherit the gateway's
    // client socket (fd 3 here); it sees exactly its own monitor fd.
    let dir = tempdir();
    let listener = UnixListener::bind(dir.path().join("gate.sock")).unwrap();
    // fd 5, not 3: QEMU's own monitor fd is 3 and would hide a leak of ours.
    let mut gateway = GatewayBuilder::base()
        .fd(listener, 5)
        .args([
            "--listen",
            "socket,id=qmp,fd=5,server=on",
            "--profile",
            "permissive",
        ])
        .spawn_run(&qemu_argv(QEMU_NONE));
    let mut c = QmpClient::negotiated(&dir.path().join("gate.sock"));
    // Find QEMU: the gateway's only child.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", gateway.pid())).unwrap();
    let qemu_pid: u32 = children
        .split_whitespace()
        .next()
        .expect("QEMU is running")
        .parse()
        .unwrap();
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{qemu_pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            format!(
                "{}:{}",
                e.file_name().to_string_lossy(),
                std::fs::read_link(e.path()).unwrap().display()
            )
        })
        .collect();
    let sockets = fds.iter().filter(|f| f.contains(":socket:")).count();
    // QEMU's monitor listener, the accepted monitor connection, and nothing of ours:
    // not the listener qmpgate adopted (its fd 5), nor the client's connection.
    let adopted = std::fs::read_link(format!("/proc/{}/fd/5", gateway.pid())).unwrap();
    assert!(
        !fds.iter()
            .any(|f| f.ends_with(&format!(":{}", adopted.display()))),
        "QEMU inherited the adopted listener {}: {fds:?}",
        adopted.display()
    );
    assert!(sockets <= 2, "QEMU has unexpected sockets: {fds:?}");
    c.send(&json!({"execute": "quit"}));
    assert_eq!(gateway.wait().0, Some(0));
}
