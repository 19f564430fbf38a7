//! Who may connect: the control monitor's socket is the owner's alone whatever the
//! umask, and only qmpgate's uid and the listed uids/gids get it; listeners take
//! `perm=`/`owner=`/`group=` for their socket file and `uids=`/`gids=` for their
//! peers. A second uid (`nobody`, through `setpriv`) plays the other local user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use qmpgate_tests::{GatewayBuilder, Qemu, tempdir};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// What user `nobody` reads after connecting to `path` (the first line, or what
/// went wrong).
fn as_nobody(path: &Path) -> String {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    data = s.makefile("rb").readline().decode()
    print(data.strip() if data else "EOF")
except Exception as e:
    print(type(e).__name__)
"#;
    // Debian's python3: the test runner's own may live where nobody cannot reach.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(script)
        .arg(path)
        .output()
        .expect("setpriv (util-linux) and python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Whether user `nobody` gets a QMP greeting on `path`.
fn greets_nobody(path: &Path) -> bool {
    serde_json::from_str::<serde_json::Value>(&as_nobody(path))
        .is_ok_and(|greeting| greeting.get("QMP").is_some())
}

/// A folder `nobody` can reach into.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn the_control_socket_is_the_owners_alone_whatever_the_umask() {
    let qemu = Qemu::start();
    let dir = shared_dir();
    let control = dir.path().join("control.sock");
    let plain = dir.path().join("plain.sock");
    let shaped = dir.path().join("shaped.sock");
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .umask(0o000)
        .args([
            "--control",
            &format!("socket,id=ctl,path={}", control.display()),
            "--listen",
            &format!("socket,id=plain,path={},server=on", plain.display()),
            "--listen",
            &format!(
                "socket,id=shaped,path={},server=on,perm=0660,group=nogroup",
                shaped.display()
            ),
        ])
        .spawn();
    let _ = gateway.negotiated();
    assert_eq!(mode(&control), 0o600);
    assert_eq!(mode(&shaped), 0o660);
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
    assert_eq!(
        std::fs::metadata(&shaped).unwrap().gid(),
        nogroup.gid.as_raw()
    );
    // A listener without perm= follows the umask, as QEMU's sockets do.
    assert_eq!(mode(&plain), 0o777);
    // The file system keeps nobody out of the control monitor (and the socket's
    // mode is all that does: through the umask's 0777 socket, nobody is greeted)...
    assert_eq!(as_nobody(&control), "PermissionError");
    assert!(greets_nobody(&plain));
    // ...and no staging folder is left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".qmpgate-bind-")),
        "{names:?}"
    );
}

#[test]
fn the_control_monitor_serves_only_qmpgates_uid_and_the_listed_ones() {
    let qemu = Qemu::start();
    let dir = shared_dir();
    let open = dir.path().join("open.sock");
    let listed = dir.path().join("listed.sock");
    // Two gateways: a world-connectable control socket that lists nobody, and one
    // that lists uid 65534.
    let first = GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--control",
            &format!("socket,id=ctl,path={},perm=0666", open.display()),
        ])
        .spawn();
    let _ = first.negotiated();
    let refusal: serde_json::Value = serde_json::from_str(&as_nobody(&open)).unwrap();
    assert_eq!(
        refusal,
        serde_json::json!({"error": {"class": "GenericError", "desc": "qmpgate's control monitor serves only its own user and the uids/gids it lists"}})
    );
    first.logged("control client refused");
    // qmpgate's own user (root here) is served.
    let mut own = qmpgate_tests::Control::connect(&open);
    let _ = own.hmp("info chardev");
    drop(first);

    let qemu = Qemu::start();
    let second = GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--control",
            &format!(
                "socket,id=ctl,path={},perm=0666,uids=nobody",
                listed.display()
            ),
        ])
        .spawn();
    let _ = second.negotiated();
    assert!(greets_nobody(&listed), "a listed uid gets the greeting");
}

#[test]
fn a_listener_with_uids_serves_only_those_peers() {
    let qemu = Qemu::start();
    let dir = shared_dir();
    let path = dir.path().join("tenant.sock");
    let open = dir.path().join("open.sock");
    let gateway = GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--listen",
            &format!(
                "socket,id=tenant,path={},server=on,perm=0666,uids=0",
                path.display()
            ),
            "--listen",
            &format!("socket,id=open,path={},server=on,perm=0666", open.display()),
        ])
        .spawn();
    let _ = gateway.negotiated();
    assert_eq!(as_nobody(&path), "EOF", "no greeting for an unlisted uid");
    // The same listener without uids= greets nobody: uids= is what turned it away.
    assert!(greets_nobody(&open));
    let mut root = qmpgate_tests::QmpClient::negotiated(&path);
    assert!(
        root.execute("query-status", serde_json::json!({}))
            .get("return")
            .is_some()
    );
    gateway.logged("not in the listener's uids=/gids=");
}

#[test]
fn access_keys_are_checked_where_they_are_given() {
    let qemu = Qemu::start();
    GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--listen",
            "socket,id=l,path=/nonexistent/l.sock,server=on,perm=999",
        ])
        .fails_with("Parameter 'perm' expects an octal mode such as 0660, got '999'");
    GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--listen",
            "socket,id=l,path=/nonexistent/l.sock,server=on,owner=no-such-user-x",
        ])
        .fails_with("no user 'no-such-user-x'");
    GatewayBuilder::new(&qemu.upstream_spec())
        .args([
            "--listen",
            "socket,id=l,host=127.0.0.1,port=0,server=on,perm=0600",
        ])
        .fails_with("'perm', 'owner' and 'group' set a socket file's mode: give 'path'");
}
