//! HMP: one policy decides both protocols. Every line of the table is tried as QMP
//! `human-monitor-command` and typed on an HMP (`mode=readline`) listener, against
//! real QEMU.

use std::path::Path;

use qmpgate_tests::{GatewayBuilder, HmpClient, Qemu, QemuVersion, QmpClient};
use serde_json::{Value, json};

/// Connects to an HMP listener and checks QEMU's banner.
fn connect(path: &Path) -> HmpClient {
    let hmp = HmpClient::connect(path);
    let version = QemuVersion::under_test().prefix();
    let banner = &hmp.banner;
    assert!(banner.starts_with(&format!("QEMU {version}")), "{banner:?}");
    assert!(
        banner.ends_with("monitor - type 'help' for more information\r\n"),
        "{banner:?}"
    );
    hmp
}

enum Expect {
    /// QEMU ran it (its own output or error text is fine).
    Runs,
    /// qmpgate refused it with an error containing this.
    Refused(&'static str),
}
use Expect::*;

/// What the safe profile says when its table refuses a command.
const SAFE: &str = "is refused by the safe profile: ";
/// What qmpgate says when a line does not parse as QEMU would read it.
const UNREADABLE: &str = "HMP command line refused: ";

/// The safe profile, line by line: each line's meaning is judged by the same table
/// as QMP. This table checks what clients of both protocols read; what the refused
/// lines would do to the host, and that they do it without the policy, is checked
/// in `policy.rs` (its HMP vectors: screendump, dump-guest-memory, memsave, migrate
/// to a program or a socket, chardev-add, object_add, netdev_add and hostfwd_add
/// listeners, gdbserver, drive_add).
const TABLE: &[(&str, Expect)] = &[
    (
        "screendump /nonexistent/shot.ppm",
        Refused(
            "Command 'screendump' is refused by the safe profile: it writes a host file named by the client",
        ),
    ),
    ("dump-guest-memory /nonexistent/dump", Refused(SAFE)),
    ("dump-guest-memory -p /nonexistent/dump", Refused(SAFE)),
    ("memsave 0 4096 \"/nonexistent/mem\"", Refused(SAFE)),
    ("pmemsave 0 4096 \"/nonexistent/pmem\"", Refused(SAFE)),
    (
        "migrate exec:true",
        Refused("Command 'migrate' is refused by the safe profile"),
    ),
    ("migrate -d \"exec:cat > /nonexistent/x\"", Refused(SAFE)),
    ("migrate fd:3", Refused(SAFE)),
    ("migrate file:/nonexistent/mig", Refused(SAFE)),
    ("migrate unix:/nonexistent/mig.sock", Refused(SAFE)),
    ("migrate_incoming exec:true", Refused(SAFE)),
    (
        "chardev-add file,id=f1,path=/nonexistent/file",
        Refused("argument 'backend.type' 'file' is refused: it opens a host file"),
    ),
    (
        "chardev-add pipe,id=p1,path=/nonexistent/pipe",
        Refused(SAFE),
    ),
    (
        "chardev-add socket,id=s1,path=/nonexistent/s.sock,server=on,wait=off",
        Refused(SAFE),
    ),
    (
        "chardev-add udp,id=u1,host=127.0.0.1,port=7777",
        Refused(SAFE),
    ),
    (
        "chardev-add tty,id=t1,path=/dev/null",
        Refused("'serial' is refused"),
    ),
    (
        "chardev-add null,id=n1,logfile=/nonexistent/log",
        Refused("argument 'backend.data.logfile' is not allowed"),
    ),
    ("chardev-remove mon", Refused(SAFE)),
    ("getfd somefd", Refused(SAFE)),
    ("add_client vnc somefd", Refused(UNREADABLE)), // QMP only: no such HMP command
    (
        "object_add memory-backend-file,id=m1,mem-path=/nonexistent/mem,size=1M",
        Refused(SAFE),
    ),
    (
        "object_add secret,id=sec1,file=/etc/shadow",
        Refused("argument 'file' is not allowed"),
    ),
    (
        "netdev_add tap,id=t1,script=/nonexistent/script",
        Refused(SAFE),
    ),
    ("netdev_add tap,id=t2,fd=3", Refused(SAFE)),
    (
        "netdev_add user,id=u2,hostfwd=tcp::2222-:22",
        Refused("argument 'hostfwd' is not allowed"),
    ),
    ("gdbserver tcp::1234", Refused("it opens a host listener")),
    ("o 0x80 1", Refused("it writes to I/O ports directly")),
    ("qemu-io drive0 \"read 0 512\"", Refused(SAFE)),
    ("gpa2hva 0", Refused("it reveals host memory addresses")),
    ("logfile /nonexistent/log", Refused(SAFE)),
    ("wavcapture /nonexistent/x.wav", Refused(UNREADABLE)), // 10.0 also needs an audiodev
    ("drive_add 0 file=/nonexistent/x.img", Refused(SAFE)),
    ("hostfwd_add tcp::2222-:22", Refused(SAFE)),
    ("change ide0 /etc/passwd", Refused(SAFE)),
    ("snapshot_blkdev drive0 /nonexistent/snap", Refused(SAFE)),
    ("drive_mirror drive0 /nonexistent/mirror", Refused(SAFE)),
    ("drive_backup drive0 /nonexistent/backup", Refused(SAFE)),
    ("exit_preconfig", Refused(SAFE)),
    // Lines that look different from how QEMU reads them are judged (and run) as
    // QEMU reads them: here `migrate` to `exec:true`, detached.
    ("migrate -dexec:true", Refused(SAFE)),
    (
        "chardev-add \"file,id=c,path=/nonexistent/x\"",
        Refused("argument 'backend.type' 'file' is refused: it opens a host file"),
    ),
    (
        "chardev-add null,id=c,backend=file,path=/nonexistent/x",
        Refused(UNREADABLE),
    ),
    (
        "object_add {\"qom-type\": \"iothread\", \"id\": \"j1\"}",
        Refused(UNREADABLE),
    ),
    ("info\u{a0}status", Refused(UNREADABLE)),
    ("frobnicate now", Refused(UNREADABLE)),
    ("memsave 0x1000", Refused(UNREADABLE)),
    ("info nosuchthing", Refused(UNREADABLE)),
    ("info status", Runs),
    // Not canonical: QEMU is sent `info status` and `chardev-add null,id=nul2`.
    ("info   status", Runs),
    ("chardev-add \"null,id=nul2\"", Runs),
    ("info version", Runs),
    ("info name", Runs),
    ("info chardev", Runs),
    ("info registers", Runs),
    ("info mtree", Runs),
    ("help", Runs),
    ("stop", Runs),
    ("c", Runs),
    ("s", Runs),
    ("object_add memory-backend-ram,id=ram1,size=1M", Runs),
    ("object_del ram1", Runs),
    ("chardev-add null,id=nul1", Runs),
    ("chardev-remove nul1", Refused(SAFE)),
    ("qom-list /machine", Runs),
    ("x/4x 0", Runs),
];

#[test]
fn one_policy_decides_qmp_and_hmp_alike() {
    let qemu = Qemu::start();
    let (builder, hmp_path) =
        GatewayBuilder::new(&qemu.upstream_spec()).listener_with("hmp", 4, "mode=readline");
    let gateway = builder.spawn();
    let mut qmp = gateway.negotiated();
    let mut hmp = connect(&hmp_path);

    for (line, expect) in TABLE {
        let reply = qmp.execute("human-monitor-command", json!({"command-line": line}));
        let typed = hmp.run(line);
        match expect {
            Runs => {
                assert!(
                    reply["return"].is_string(),
                    "QMP {line:?} should run: {reply}"
                );
                assert!(!typed.contains("refused"), "HMP {line:?}: {typed:?}");
            }
            Refused(why) => {
                let desc = reply["error"]["desc"]
                    .as_str()
                    .unwrap_or_else(|| panic!("QMP {line:?} should be refused: {reply}"));
                assert!(desc.contains(why), "QMP {line:?}: {desc:?} lacks {why:?}");
                assert_eq!(
                    typed,
                    format!("Error: {desc}\r\n"),
                    "HMP {line:?} gets the same refusal"
                );
            }
        }
    }
    // The HMP listener shows QEMU's own output for allowed lines.
    assert_eq!(hmp.run("info status"), "VM status: paused\r\n");
    assert_eq!(hmp.run(""), "");
}

#[test]
fn quit_on_hmp_is_denied_exactly_when_qmp_quit_is() {
    let mut qemu = Qemu::start();
    let (builder, hmp_path) = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--profile", "readonly"])
        .listener_with("hmp", 4, "mode=readline");
    let gateway = builder.spawn();
    let mut qmp = gateway.negotiated();
    let mut hmp = connect(&hmp_path);
    let refusal = "Command 'quit' is refused by the readonly profile: it needs the 'safe' profile";
    assert_eq!(qmp.execute("quit", json!({}))["error"]["desc"], refusal);
    assert_eq!(
        qmp.execute("human-monitor-command", json!({"command-line": "q"}))["error"]["desc"],
        refusal
    );
    assert_eq!(hmp.run("quit"), format!("Error: {refusal}\r\n"));
    assert_eq!(hmp.run("q"), format!("Error: {refusal}\r\n"));
    // Readonly allows queries in both forms, and HMP-only `info` commands.
    assert_eq!(hmp.run("info status"), "VM status: paused (prelaunch)\r\n");
    assert!(hmp.run("info registers").contains("No CPU available"));
    assert_eq!(
        hmp.run("stop"),
        "Error: Command 'stop' is refused by the readonly profile: it needs the 'safe' profile\r\n"
    );
    let version: Value = qmp.execute(
        "human-monitor-command",
        json!({"command-line": "info version"}),
    );
    assert!(
        version["return"]
            .as_str()
            .unwrap()
            .starts_with(qemu.version().prefix()),
        "{version}"
    );
    assert!(qemu.is_running(), "a refused quit stopped QEMU");

    // The same line where no profile stands in the way stops QEMU: the refusal is
    // what kept it running.
    drop((qmp, hmp, gateway));
    let (builder, hmp_path) = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--profile", "permissive"])
        .listener_with("hmp", 4, "mode=readline");
    let _gateway = builder.spawn();
    let mut hmp = connect(&hmp_path);
    hmp.type_line("quit");
    assert!(qemu.wait().success());
}

#[test]
fn an_hmp_listener_survives_bad_input() {
    let qemu = Qemu::start();
    let (builder, hmp_path) = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--max-message", "4096"])
        .listener_with("hmp", 4, "mode=readline");
    let gateway = builder.spawn();
    let mut hmp = connect(&hmp_path);
    assert_eq!(
        hmp.run(&"x".repeat(100_000)),
        "Error: command line exceeds the limit of 4096 bytes\r\n"
    );
    assert!(
        hmp.run("\u{fffd}\u{1}garbage")
            .starts_with("Error: HMP command line refused: unknown command")
    );
    assert_eq!(
        hmp.run("screendump \"unterminated"),
        "Error: HMP command line refused: screendump: filename expected (unterminated string)\r\n"
    );
    assert_eq!(hmp.run("info status"), "VM status: paused (prelaunch)\r\n");
    // QMP clients on the same gateway are unaffected.
    let mut qmp: QmpClient = gateway.negotiated();
    assert_eq!(
        qmp.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

/// Everyday HMP snapshots under `safe`: `savevm`, `info snapshots`, `loadvm` and
/// `delvm` on a qcow2 disk the VM already has, with QEMU's own output, on the HMP
/// listener. The snapshot is really in the image afterwards (and gone after
/// `delvm`), as `qemu-img snapshot -l` shows.
#[test]
fn snapshots_work_under_safe_on_an_image_the_vm_has() {
    let dir = qmpgate_tests::tempdir();
    let disk = dir.path().join("disk.qcow2");
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .status()
        .expect("qemu-img (Debian qemu-utils) is installed by scripts/setup.sh test");
    assert!(created.success());
    let drive = format!("file={},if=none,id=d0,format=qcow2", disk.display());
    let qemu = Qemu::start_with(&["-drive", &drive]);
    let (builder, hmp_path) =
        GatewayBuilder::new(&qemu.upstream_spec()).listener_with("hmp", 4, "mode=readline");
    let gateway = builder.spawn();
    let mut hmp = connect(&hmp_path);
    let snapshots = || {
        let out = std::process::Command::new("qemu-img")
            .args(["snapshot", "-U", "-l"])
            .arg(&disk)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };

    assert_eq!(hmp.run("savevm s1"), "");
    assert!(snapshots().contains(" s1 "), "{}", snapshots());
    let listed = hmp.run("info snapshots");
    assert!(listed.contains(" s1 "), "{listed:?}");
    assert_eq!(hmp.run("loadvm s1"), "");
    assert_eq!(hmp.run("delvm s1"), "");
    assert!(!snapshots().contains(" s1 "), "{}", snapshots());
    assert_eq!(
        hmp.run("info snapshots"),
        "There is no snapshot available.\r\n"
    );
    // The QMP forms go through the same policy.
    let mut qmp = gateway.negotiated();
    assert_eq!(
        qmp.execute(
            "human-monitor-command",
            json!({"command-line": "savevm s2"})
        ),
        json!({"return": ""})
    );
}
