//! TLS listeners: QEMU's credentials layout, client certificates required when a CA
//! is given, the certificate's names passed to plugins, and QEMU's rule against TLS on
//! a client socket given as an fd.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use std::time::{Duration, Instant};

use qmpgate_tests::{GatewayBuilder, Plugin, Qemu, python, tempdir};
use serde_json::{Value, json};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// A CA, a server certificate for localhost, and client certificates for `admin`
/// and `dashboard`, in QEMU's tls-creds layout.
fn credentials(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=qmpgate test CA",
        ],
    );
    // Extensions make v3 certificates, which WebPKI requires.
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for (name, cn) in [
        ("server", "localhost"),
        ("admin", "admin"),
        ("dashboard", "dashboard"),
    ] {
        let key = format!("{name}-key.pem");
        let csr = format!("{name}.csr");
        let cert = format!("{name}-cert.pem");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        let ext = if name == "server" {
            "server.ext"
        } else {
            "client.ext"
        };
        sign(dir, &csr, &cert, ext);
    }
}

/// Signs request `csr` with the test CA into `cert`, with the extensions in `ext`
/// (extensions make v3 certificates, which WebPKI requires).
fn sign(dir: &Path, csr: &str, cert: &str, ext: &str) {
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "1",
            "-extfile",
            ext,
        ],
    );
}

fn client(port: u16, creds: &Path, who: Option<&str>, commands: &[&str]) -> Value {
    let ca = creds.join("ca-cert.pem");
    let (cert, key) = match who {
        Some(who) => (
            creds.join(format!("{who}-cert.pem")),
            creds.join(format!("{who}-key.pem")),
        ),
        None => ("-".into(), "-".into()),
    };
    let mut args = vec![
        port.to_string(),
        ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    ];
    args.extend(commands.iter().map(|c| c.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serde_json::from_str(&python("tls_client.py", &args)).unwrap()
}

/// `builder` with a TLS listener `tls` on a fresh local TCP port (passed as fd 4)
/// using the credentials in `creds`; returns it and the port.
fn with_tls_listener(builder: GatewayBuilder, creds: &Path) -> (GatewayBuilder, u16) {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let spec = format!("socket,id=tls,fd=4,server=on,tls-creds={}", creds.display());
    (builder.fd(tcp, 4).args(["--listen", &spec]), port)
}

#[test]
fn tls_clients_are_verified_and_their_identity_reaches_the_policy() {
    let qemu = Qemu::start();
    let creds = tempdir();
    credentials(creds.path());
    let builder = GatewayBuilder::new(&qemu.upstream_spec()).plugin(
        Plugin::builtin("policy", "qmp-policy").config(json!({
            "profile": "permissive",
            "rules": [
                {"action": "allow", "commands": ["stop"], "identities": ["admin"]},
                {"action": "deny", "commands": ["stop"], "desc": "only admin may stop the VM"},
            ],
        })),
    );
    let (builder, port) = with_tls_listener(builder, creds.path());
    let gateway = builder.spawn();

    let admin = client(port, creds.path(), Some("admin"), &["query-status", "stop"]);
    assert_eq!(admin[0], json!({"return": {}}));
    assert_eq!(admin[1]["return"]["status"], "prelaunch");
    assert_eq!(admin[2], json!({"return": {}}), "admin may stop: {admin}");

    let dashboard = client(port, creds.path(), Some("dashboard"), &["stop"]);
    assert_eq!(
        dashboard[1]["error"]["desc"],
        "Command 'stop' is denied by policy: only admin may stop the VM"
    );

    // With a CA configured, a client certificate is required.
    let anonymous = client(port, creds.path(), None, &["query-status"]);
    assert!(
        anonymous
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.get("tls-error").is_some()),
        "{anonymous}"
    );
    // The same anonymous client is served by a listener without a CA: the CA is
    // what turned it away.
    let no_ca = tempdir();
    for file in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(creds.path().join(file), no_ca.path().join(file)).unwrap();
    }
    let (builder, port) =
        with_tls_listener(GatewayBuilder::new(&qemu.upstream_spec()), no_ca.path());
    drop(gateway);
    let _gateway = builder.spawn();
    let anonymous = client(port, creds.path(), None, &["query-status"]);
    assert_eq!(anonymous[1]["return"]["status"], "prelaunch", "{anonymous}");
}

#[test]
fn tls_on_a_client_socket_given_as_an_fd_is_refused() {
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let dir = tempdir();
    GatewayBuilder::base()
        .fd(ours, 3)
        .args([
            "--upstream",
            "socket,id=qemu,fd=3,tls-creds=/etc/qmpgate/tls",
        ])
        .args([
            "--listen",
            &format!(
                "socket,id=l,path={},server=on",
                dir.path().join("never.sock").display()
            ),
        ])
        .fails_with(
            "TLS is not allowed on a client socket given as an fd: there is no host name to verify",
        );
}

#[test]
fn missing_tls_credentials_stop_start_up_with_the_file_named() {
    let qemu = Qemu::start();
    let empty = tempdir();
    GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--listen",
            &format!(
                "socket,id=tls,host=127.0.0.1,port=0,server=on,tls-creds={}",
                empty.path().display()
            ),
        ])
        .fails_with("cannot read server-cert.pem");
}

#[test]
fn a_tls_listener_can_be_added_at_run_time_from_a_named_fd() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::AsRawFd;

    let qemu = Qemu::start();
    let creds = tempdir();
    credentials(creds.path());
    let builder = GatewayBuilder::new(&qemu.upstream_spec()).args(["--profile", "permissive"]);
    let control_path = builder.dir().join("control.sock");
    let gateway = builder
        .args([
            "--control",
            &format!("socket,id=control,path={}", control_path.display()),
        ])
        .spawn();
    drop(gateway.negotiated());

    let control = std::os::unix::net::UnixStream::connect(&control_path).unwrap();
    control
        .set_read_timeout(Some(qmpgate_tests::TIMEOUT))
        .unwrap();
    let mut replies = BufReader::new(control.try_clone().unwrap()).lines();
    let mut read =
        move || -> Value { serde_json::from_str(&replies.next().unwrap().unwrap()).unwrap() };
    read(); // greeting
    let send = |message: Value, fd: Option<i32>| {
        let bytes = message.to_string();
        let iov = [std::io::IoSlice::new(bytes.as_bytes())];
        match fd {
            Some(fd) => {
                let fds = [fd];
                let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                nix::sys::socket::sendmsg::<()>(
                    control.as_raw_fd(),
                    &iov,
                    &cmsg,
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                )
                .unwrap();
            }
            None => (&control).write_all(bytes.as_bytes()).unwrap(),
        }
    };
    send(json!({"execute": "qmp_capabilities"}), None);
    assert_eq!(read(), json!({"return": {}}));
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    send(
        json!({"execute": "getfd", "arguments": {"fdname": "remote"}}),
        Some(tcp.as_raw_fd()),
    );
    assert_eq!(read(), json!({"return": {}}));
    drop(tcp);
    send(
        json!({"execute": "chardev-add", "arguments": {"id": "remote", "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": "remote"}}, "server": true,
            "tls-creds": creds.path().display().to_string()}}}}),
        None,
    );
    assert_eq!(read(), json!({"return": {}}));
    let admin = client(port, creds.path(), Some("admin"), &["query-status"]);
    assert_eq!(admin[1]["return"]["status"], "prelaunch", "{admin}");
}

/// Idle TCP connections to a TLS listener used to fill the fd limit until every
/// listener stopped accepting. Handshakes in progress are capped per listener (more
/// connections are closed at once) and each has a deadline; the other listeners,
/// and a real TLS client after the flood, are served.
#[test]
fn idle_tls_handshakes_cannot_starve_the_gateway() {
    let qemu = Qemu::start();
    let creds = tempdir();
    credentials(creds.path());
    let (builder, port) =
        with_tls_listener(GatewayBuilder::new(&qemu.upstream_spec()), creds.path());
    let gateway = builder
        .args([
            "--max-tls-handshakes",
            "4",
            "--tls-handshake-timeout-ms",
            "500",
        ])
        .spawn();
    let idle: Vec<std::net::TcpStream> = (0..50)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // The unix listener is served while they sit there.
    let started = Instant::now();
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // Past the cap: closed at once; within it: closed at the handshake deadline.
    let closed_within = |stream: &std::net::TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        let started = Instant::now();
        let eof = matches!(std::io::Read::read(&mut &*stream, &mut byte), Ok(0))
            || matches!(std::io::Read::read(&mut &*stream, &mut byte), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        assert!(eof, "the connection stays open");
        started.elapsed()
    };
    for stream in &idle[4..] {
        assert!(closed_within(stream) < Duration::from_millis(300));
    }
    for stream in &idle[..4] {
        assert!(closed_within(stream) < Duration::from_secs(2));
    }
    let admin = client(port, creds.path(), Some("admin"), &["query-status"]);
    assert_eq!(admin[1]["return"]["status"], "prelaunch", "{admin}");
}

/// Client certificates whose names older code could not read: a CN written as a
/// BMPString (UTF-16), and a certificate with no CN at all, only SANs.
fn unusual_client_certificates(dir: &Path) {
    std::fs::write(
        dir.join("san.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n\
         subjectAltName=DNS:ops.example.com,email:ops@example.com\n",
    )
    .unwrap();
    for (name, dn, mask) in [
        ("bmp", "CN = admin\nO = Example\n", "MASK:0x800"),
        ("sanonly", "O = Example\n", "utf8only"),
    ] {
        std::fs::write(
            dir.join(format!("{name}.cnf")),
            format!(
                "[req]\nprompt = no\nstring_mask = {mask}\ndistinguished_name = dn\n[dn]\n{dn}"
            ),
        )
        .unwrap();
        let (key, csr, cert, cnf) = (
            format!("{name}-key.pem"),
            format!("{name}.csr"),
            format!("{name}-cert.pem"),
            format!("{name}.cnf"),
        );
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-config",
                &cnf,
            ],
        );
        let ext = if name == "sanonly" {
            "san.ext"
        } else {
            "client.ext"
        };
        sign(dir, &csr, &cert, ext);
    }
}

#[test]
fn every_name_in_a_certificate_reaches_plugins_and_identity_rules_do_not_fail_open() {
    let qemu = Qemu::start();
    let creds = tempdir();
    credentials(creds.path());
    unusual_client_certificates(creds.path());
    let builder = GatewayBuilder::new(&qemu.upstream_spec())
        // Answers query-name with the client's `tls` record.
        .plugin(Plugin::wasm(
            "probe",
            &qmpgate_tests::guest("fixture_probe"),
        ))
        .plugin(Plugin::builtin("policy", "qmp-policy").config(json!({
            "profile": "permissive",
            "rules": [
                {"action": "allow", "commands": ["stop"], "identities": ["admin"]},
                {"action": "deny", "commands": ["stop"], "identities": ["*"],
                 "desc": "only admin may stop the VM"},
            ],
        })));
    let (builder, port) = with_tls_listener(builder, creds.path());
    let _gateway = builder.spawn();

    // A BMPString CN is read: the allow rule for `admin` applies.
    let bmp = client(port, creds.path(), Some("bmp"), &["query-name", "stop"]);
    let tls = &bmp[1]["return"]["tls"];
    assert_eq!(tls["common-names"], json!(["admin"]), "{bmp}");
    assert_eq!(tls["subject"], "O=Example,CN=admin", "{bmp}");
    assert_eq!(bmp[2], json!({"return": {}}), "{bmp}");

    // A certificate without a CN still has an identity: its SANs, with their
    // kinds, and `*` matches it, so the deny rule applies.
    let san = client(port, creds.path(), Some("sanonly"), &["query-name", "stop"]);
    let tls = &san[1]["return"]["tls"];
    assert_eq!(tls["common-names"], json!([]), "{san}");
    assert_eq!(
        tls["subject-alt-names"],
        json!(["DNS:ops.example.com", "email:ops@example.com"]),
        "{san}"
    );
    assert_eq!(tls["subject"], "O=Example", "{san}");
    assert_eq!(
        san[2]["error"]["desc"], "Command 'stop' is denied by policy: only admin may stop the VM",
        "{san}"
    );
}
