//! HMP: one policy decides both protocols. Every line of the table is tried as QMP
//! `human-monitor-command` and typed on an HMP (`mode=readline`) listener, against
//! real QEMU.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use qmpgate_tests::{GatewayBuilder, Qemu, QmpClient};
use serde_json::{Value, json};

/// A client typing on an HMP listener.
struct Hmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Hmp {
    fn connect(path: &Path) -> Hmp {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(qmpgate_tests::TIMEOUT))
            .unwrap();
        let mut hmp = Hmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let banner = hmp.until_prompt();
        assert!(banner.starts_with("QEMU 7.2."), "{banner:?}");
        assert!(
            banner.ends_with("monitor - type 'help' for more information\r\n"),
            "{banner:?}"
        );
        hmp
    }

    /// Reads up to and without the next `(qemu) ` prompt.
    fn until_prompt(&mut self) -> String {
        let mut out = Vec::new();
        while !out.ends_with(b"(qemu) ") {
            let mut byte = [0u8];
            self.reader
                .read_exact(&mut byte)
                .expect("HMP output ends with a prompt");
            out.push(byte[0]);
        }
        out.truncate(out.len() - 7);
        String::from_utf8(out).unwrap()
    }

    fn run(&mut self, line: &str) -> String {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        self.until_prompt()
    }
}

enum Expect {
    /// QEMU ran it (its own output or error text is fine).
    Runs,
    /// qmpgate refused it with an error containing this.
    Refused(&'static str),
}
use Expect::*;

const HOST_FILE: &str = "denied by policy: it writes or reads a file on the QEMU host";
const SPAWNS: &str = "denied by policy: it makes QEMU run a host program";
const LISTENER: &str = "denied by policy: it opens a host socket, file or device";
const FDS: &str = "denied by policy: it injects file descriptors into QEMU";
const LINK: &str = "denied by policy: it can cut or bypass the gateway's own monitor link";

/// The safe profile, line by line.
const TABLE: &[(&str, Expect)] = &[
    ("screendump /tmp/qg-shot.ppm", Refused(HOST_FILE)),
    ("dump-guest-memory /tmp/qg-dump", Refused(HOST_FILE)),
    ("dump-guest-memory -p /tmp/qg-dump", Refused(HOST_FILE)),
    ("memsave 0 4096 /tmp/qg-mem", Refused(HOST_FILE)),
    ("pmemsave 0 4096 /tmp/qg-pmem", Refused(HOST_FILE)),
    ("migrate exec:touch /tmp/qg-pwned", Refused(SPAWNS)),
    ("migrate -d \"exec:cat > /tmp/qg-pwned\"", Refused(SPAWNS)),
    ("migrate fd:3", Refused(FDS)),
    ("migrate file:/tmp/qg-mig", Refused(HOST_FILE)),
    ("migrate unix:/tmp/qg-mig.sock", Refused(LISTENER)),
    ("migrate_incoming exec:touch /tmp/qg-pwned", Refused(SPAWNS)),
    (
        "chardev-add file,id=f1,path=/tmp/qg-file",
        Refused(HOST_FILE),
    ),
    (
        "chardev-add pipe,id=p1,path=/tmp/qg-pipe",
        Refused(HOST_FILE),
    ),
    (
        "chardev-add socket,id=s1,path=/tmp/qg-s.sock,server=on,wait=off",
        Refused(LISTENER),
    ),
    (
        "chardev-add udp,id=u1,host=127.0.0.1,port=7777",
        Refused(LISTENER),
    ),
    (
        "chardev-add null,id=n1,logfile=/tmp/qg-log",
        Refused(HOST_FILE),
    ),
    ("chardev-remove mon", Refused(LINK)),
    ("getfd somefd", Refused(FDS)),
    ("add_client vnc somefd", Refused(LINK)),
    (
        "object_add memory-backend-file,id=m1,mem-path=/tmp/qg-mem,size=1M",
        Refused(HOST_FILE),
    ),
    (
        "object_add secret,id=sec1,file=/etc/shadow",
        Refused(HOST_FILE),
    ),
    (
        "netdev_add tap,id=t1,script=/tmp/qg-script",
        Refused(SPAWNS),
    ),
    ("netdev_add tap,id=t2,fd=3", Refused(FDS)),
    ("gdbserver tcp::1234", Refused(LISTENER)),
    ("o 0x80 1", Refused("it accesses I/O ports directly")),
    (
        "qemu-io drive0 \"read 0 512\"",
        Refused("it runs qemu-io commands on block devices"),
    ),
    ("gpa2hva 0", Refused("it reveals host memory addresses")),
    ("logfile /tmp/qg-log", Refused(HOST_FILE)),
    ("wavcapture /tmp/qg.wav", Refused(HOST_FILE)),
    ("drive_add 0 file=/tmp/qg.img", Refused(HOST_FILE)),
    ("hostfwd_add tcp::2222-:22", Refused(LISTENER)),
    ("change ide0 /etc/passwd", Refused(HOST_FILE)),
    ("snapshot_blkdev drive0 /tmp/qg-snap", Refused(HOST_FILE)),
    ("drive_mirror drive0 /tmp/qg-mirror", Refused(HOST_FILE)),
    ("drive_backup drive0 /tmp/qg-backup", Refused(HOST_FILE)),
    ("dump-skeys /tmp/qg-skeys", Refused(HOST_FILE)),
    (
        "exit_preconfig",
        Refused("experimental commands are not allowed"),
    ),
    (
        "frobnicate now",
        Refused("HMP command line refused: unknown command: 'frobnicate'"),
    ),
    (
        "memsave 0x1000",
        Refused("HMP command line refused: memsave: missing argument: size"),
    ),
    (
        "info nosuchthing",
        Refused("HMP command line refused: info: unknown info subcommand"),
    ),
    ("info status", Runs),
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
    ("chardev-remove nul1", Refused(LINK)),
    ("qom-list /machine", Runs),
    ("print 1+2", Runs),
];

#[test]
fn one_policy_decides_qmp_and_hmp_alike() {
    assert!(TABLE.len() >= 40);
    let qemu = Qemu::start();
    let (builder, hmp_path) =
        GatewayBuilder::new(&qemu.upstream_spec()).listener_with("hmp", 4, "mode=readline");
    let gateway = builder.spawn();
    let mut qmp = gateway.negotiated();
    let mut hmp = Hmp::connect(&hmp_path);

    for (line, expect) in TABLE {
        let reply = qmp.execute("human-monitor-command", json!({"command-line": line}));
        let typed = hmp.run(line);
        match expect {
            Runs => {
                assert!(
                    reply["return"].is_string(),
                    "QMP {line:?} should run: {reply}"
                );
                assert!(
                    !typed.contains("denied by policy") && !typed.contains("refused"),
                    "HMP {line:?}: {typed:?}"
                );
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
    // What the refused lines would have done did not happen.
    for path in [
        "/tmp/qg-pwned",
        "/tmp/qg-shot.ppm",
        "/tmp/qg-dump",
        "/tmp/qg-mem",
        "/tmp/qg-file",
        "/tmp/qg-log",
    ] {
        assert!(!Path::new(path).exists(), "{path} exists");
    }
    // The HMP listener shows QEMU's own output for allowed lines.
    assert_eq!(hmp.run("info status"), "VM status: paused\r\n");
    assert_eq!(hmp.run(""), "");
}

#[test]
fn quit_on_hmp_is_denied_exactly_when_qmp_quit_is() {
    let qemu = Qemu::start();
    let (builder, hmp_path) = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--profile", "readonly"])
        .listener_with("hmp", 4, "mode=readline");
    let gateway = builder.spawn();
    let mut qmp = gateway.negotiated();
    let mut hmp = Hmp::connect(&hmp_path);
    let refusal = "Command 'quit' is denied by policy";
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
        "Error: Command 'stop' is denied by policy\r\n"
    );
    let version: Value = qmp.execute(
        "human-monitor-command",
        json!({"command-line": "info version"}),
    );
    assert!(
        version["return"].as_str().unwrap().starts_with("7.2."),
        "{version}"
    );
}

#[test]
fn an_hmp_listener_survives_bad_input() {
    let qemu = Qemu::start();
    let (builder, hmp_path) = GatewayBuilder::new(&qemu.upstream_spec())
        .args(["--max-message", "4096"])
        .listener_with("hmp", 4, "mode=readline");
    let gateway = builder.spawn();
    let mut hmp = Hmp::connect(&hmp_path);
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
        "Error: HMP command line refused: unterminated string\r\n"
    );
    assert_eq!(hmp.run("info status"), "VM status: paused (prelaunch)\r\n");
    // QMP clients on the same gateway are unaffected.
    let mut qmp: QmpClient = gateway.negotiated();
    assert_eq!(
        qmp.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}
