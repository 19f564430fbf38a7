//! HMP lines as QEMU reads them, and as qmpgate's HMP reading lets them through.
//!
//! For every line of [`CORPUS`], two QEMUs of the version under test (pairs of
//! throwaway QEMUs, one pair per machine kind, lines in table order):
//! - **A**, reached directly: the raw line goes to its own QMP socket as
//!   `human-monitor-command`;
//! - **B**, behind a qmpgate whose built-in policy runs the `permissive` profile
//!   (so only the HMP reading can refuse a line): the same raw line goes through the
//!   gateway as `human-monitor-command`.
//!
//! Each side is then observed with QMP queries chosen for the line ([`Look`]:
//! `query-status`, `query-chardev` and `/chardevs`, `/objects`, `query-iothreads`,
//! `info network`, `/machine/peripheral`, migration parameters, a block job's
//! speed, files in the test's directory), with the per-instance monitor
//! directories normalised away; the line's own reply is always compared too. The
//! assertion, per line:
//! - the pair agreed *before* the line (the corpus's lines touch disjoint ids, or
//!   bring what they look at to a known state with `setup` lines);
//! - either the gateway let the line through (QEMU B was sent the canonical line
//!   rebuilt from the gateway's reading, never the raw one), and B's reply and
//!   observation equal A's, which ran the raw line: one reading; or the gateway
//!   refused it, and B's observation is what it was just before the line, i.e. no
//!   effect (for the looks at one id, that is what a fresh QEMU shows: no line
//!   touched the id before);
//! - a line marked [`Expect::Accept`] is let through; one marked
//!   [`Expect::Refuse`] (QEMU fails on it too) or [`Expect::NoCanonical`] (QEMU
//!   reads it, but it has no canonical form) is refused.
//!
//! A summary (accepted and refused counts, each refusal's reason) goes to stderr;
//! `--nocapture` shows it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use qmpgate_tests::{
    Gateway, GatewayBuilder, QEMU_NONE, QEMU_PC, Qemu, QemuVersion, QmpClient, tempdir,
};
use serde_json::{Map, Value, json};

/// Which QEMU a line runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Machine {
    /// `-M none` ([`QEMU_NONE`]): chardevs, objects, run state.
    Bare,
    /// `-M pc` with a VGA and one CPU ([`QEMU_PC`]): devices, netdevs, memory.
    Pc,
}

/// What the gateway is expected to do with a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Let it through: QEMU is sent its canonical line (the line itself when it is
    /// canonical already).
    Accept,
    /// Refuse it: QEMU's own reader fails on it too (unknown command, extraneous
    /// characters, an unsupported option or escape, an invalid size...), so there
    /// is no reading to forward.
    Refuse,
    /// Refuse it: QEMU reads it, but it has no canonical form both QEMU versions
    /// read back the same way (non-ASCII or control characters, a repeated
    /// QemuOpts key, `object_add` in JSON form, an expression where a number is
    /// expected...), so the gateway cannot send QEMU a line it judged.
    NoCanonical,
}

/// What to look at after a line, on both QEMUs.
#[derive(Debug, Clone, Copy)]
enum Look {
    /// `query-status`.
    Status,
    /// The chardev with this id: its class (under `/chardevs`), its
    /// `query-chardev` entry, and for ring buffers how much of 5000 written bytes
    /// reads back (the ring's size).
    Chardev(&'static str),
    /// The object with this id: its class (under `/objects`) and these properties.
    Object(&'static str, &'static [&'static str]),
    /// The iothread with this id in `query-iothreads` (without its thread id).
    Iothread(&'static str),
    /// The lines of `info network` that name this id (netdevs and NICs).
    Network(&'static str),
    /// The device with this id: its class (under `/machine/peripheral`) and these
    /// properties.
    Device(&'static str, &'static [&'static str]),
    /// This member of `query-migrate-parameters`.
    MigrateParameter(&'static str),
    /// This capability's state in `query-migrate-capabilities`.
    MigrateCapability(&'static str),
    /// The speed of the block job with this id (`query-block-jobs`).
    JobSpeed(&'static str),
    /// Not a query: the line's reply is compared as a set of blank-line-separated
    /// blocks, for output whose order differs between runs of QEMU.
    Unordered,
    /// The files the line created in the test's directory (name, size, hash of the
    /// contents); they are removed once seen.
    Files,
}

/// One corpus line. `{dir}` in `line` and `setup` stands for the test's directory.
#[derive(Debug, Clone, Copy)]
struct Case {
    machine: Machine,
    line: &'static str,
    look: &'static [Look],
    expect: Expect,
    /// Run on both sides first (on B through the gateway), to bring what the line
    /// changes to a known state: HMP lines, or QMP commands written as JSON
    /// (`{"execute": ...}`). They must succeed on both.
    setup: &'static [&'static str],
}

const fn case(machine: Machine, line: &'static str, look: &'static [Look], expect: Expect) -> Case {
    Case {
        machine,
        line,
        look,
        expect,
        setup: &[],
    }
}

impl Case {
    const fn after(self, setup: &'static [&'static str]) -> Case {
        Case { setup, ..self }
    }
}

use Expect::{Accept, NoCanonical, Refuse};
use Look::{
    Chardev, Device, Files, Iothread, JobSpeed, MigrateCapability, MigrateParameter, Network,
    Object, Status, Unordered,
};
use Machine::{Bare, Pc};

/// The corpus. Lines that only print (their reply is always compared) look at
/// nothing else and come first in their machine's run, before lines that change
/// state; lines that change state touch ids no other line touches (or set up what
/// they look at), so that a line A ran and the gateway refused cannot make the pair
/// disagree about a later one.
const CORPUS: &[Case] = &[
    // --- -M none: lines that only print ---
    // The canonical query.
    case(Bare, "info status", &[Status], Accept),
    // Two spaces between `info` and its sub-command.
    case(Bare, "info  status", &[Status], Accept),
    // U+00A0 between the words: QEMU's separators are ASCII; it is one unknown word.
    case(Bare, "info\u{a0}status", &[Status], Refuse),
    // The command name ends at `/`: QEMU reads `info` and then an empty sub-command.
    case(Bare, "info/status", &[Status], Refuse),
    // An optional argument omitted, and present.
    case(Bare, "info qom-tree", &[], Accept),
    case(Bare, "info qom-tree /objects", &[], Accept),
    // Output that names the monitor's (per-instance) socket path.
    case(Bare, "info chardev", &[], Accept),
    // Flags: none, separate, glued (`-o-D` is `-o -D`), and in an order QEMU
    // refuses (`-D -o`: QEMU skips `-o` to take `-D`, then finds `-o` left over).
    // QEMU lists address spaces in an order that differs between runs. (Not `-f`:
    // it also numbers the flat views in that order.)
    case(Bare, "info mtree", &[Unordered], Accept),
    case(Bare, "info mtree -o", &[Unordered], Accept),
    case(Bare, "info mtree -o -D", &[Unordered], Accept),
    case(Bare, "info mtree -o-D", &[Unordered], Accept),
    case(Bare, "info mtree -D -o", &[Unordered], Refuse),
    // `-nv`: QEMU takes `-n`, then reads `v` as the optional device name.
    case(Bare, "info block -n -v", &[], Accept),
    case(Bare, "info block -nv", &[], Accept),
    // `info` with no sub-command (it lists them), and with a trailing space.
    case(Bare, "info", &[], Accept),
    case(Bare, "info ", &[], Accept),
    // A flag only QEMU 10.0 has (`-b`): refused, as 7.2 reads the line otherwise.
    case(Bare, "info qtree", &[], Accept),
    case(Bare, "info qtree -b", &[], NoCanonical),
    // A sub-command ending at `/`: QEMU reads `/x` as the optional vCPU number.
    case(Bare, "info registers/x", &[], Refuse),
    // An optional argument of `help`, and `help`'s alias.
    case(Bare, "help info", &[], Accept),
    case(Bare, "? info", &[], Accept),
    // A quoted argument that needs no quotes.
    case(Bare, "info qom-tree \"/objects\"", &[], Accept),
    // `-v -n`: QEMU skips `-n` (it comes later in the table), takes `-v`, and
    // reads `-n` as the device name.
    case(Bare, "info block -v -n", &[], Accept),
    // Something after a command that takes nothing.
    case(Bare, "info chardev extra", &[], Refuse),
    // Numbers, through `print`: formats typed and not (QEMU then uses the last
    // one's: set it first), octal and upper-case hex literals, the largest
    // values, and what QEMU's expression reader takes besides literals.
    case(Bare, "p/d 42", &[], Accept),
    case(Bare, "print/x 255", &[], Accept),
    case(Bare, "p 4294967296", &[], Accept).after(&["p/x 0"]),
    case(Bare, "p 010", &[], Accept).after(&["p/x 0"]),
    case(Bare, "p 00", &[], Accept).after(&["p/x 0"]),
    case(Bare, "p 0X1F", &[], Accept).after(&["p/x 0"]),
    case(Bare, "p 0xffffffffffffffff", &[], Accept).after(&["p/d 0"]),
    case(Bare, "p 18446744073709551615", &[], NoCanonical).after(&["p/x 0"]),
    case(Bare, "p 9223372036854775808", &[], NoCanonical).after(&["p/x 0"]),
    case(Bare, "p -1", &[], NoCanonical).after(&["p/x 0"]),
    case(Bare, "p -0x10", &[], Accept).after(&["p/x 0"]),
    case(Bare, "p 'a'", &[], NoCanonical).after(&["p/x 0"]),
    case(Bare, "p 1+1", &[], NoCanonical).after(&["p/x 0"]),
    case(Bare, "p", &[], Refuse).after(&["p/x 0"]),
    case(Bare, "p /x 255", &[], Accept),
    case(Bare, "p/x  255", &[], Accept),
    case(Bare, "p/c 65", &[], Accept),
    // A count (print ignores it), two format letters (the last wins), a size
    // letter alone and its alias `L`.
    case(Bare, "p/2x 1", &[], Accept),
    case(Bare, "p/xd 10", &[], Accept),
    case(Bare, "p/g 1", &[], Accept).after(&["p/x 0"]),
    case(Bare, "p/L 1", &[], Accept).after(&["p/x 0"]),
    // --- -M none: run state, from a known state each time ---
    case(Bare, "stop", &[Status], Accept).after(&["cont"]),
    case(Bare, "cont", &[Status], Accept).after(&["stop"]),
    // Aliases: `c` is `cont`, `s` is `stop`.
    case(Bare, "c", &[Status], Accept).after(&["stop"]),
    case(Bare, "s", &[Status], Accept).after(&["cont"]),
    // Leading, trailing and tab whitespace.
    case(Bare, "  stop", &[Status], Accept).after(&["cont"]),
    case(Bare, "stop   ", &[Status], Accept).after(&["cont"]),
    case(Bare, "\tcont\t", &[Status], Accept).after(&["stop"]),
    // A command ending at `/`: QEMU finds extraneous characters and does nothing.
    case(Bare, "stop/", &[Status], Refuse).after(&["cont"]),
    // U+00A0 glued to the name: an unknown command.
    case(Bare, "cont\u{a0}", &[Status], Refuse).after(&["stop"]),
    // An argument to a command that takes none.
    case(Bare, "stop now", &[Status], Refuse).after(&["cont"]),
    // Other ASCII whitespace QEMU skips (vertical tab, form feed, CR LF).
    case(Bare, "stop\u{b}", &[Status], Accept).after(&["cont"]),
    case(Bare, "\u{c}cont", &[Status], Accept).after(&["stop"]),
    case(Bare, "stop\r\n", &[Status], Accept).after(&["cont"]),
    // A control character that is not whitespace, and a NUL.
    case(Bare, "stop\u{1}", &[Status], Refuse).after(&["cont"]),
    case(Bare, "cont\u{0}x", &[Status], Refuse).after(&["stop"]),
    // A second command after a newline is no second command.
    case(Bare, "stop\ncont", &[Status], Refuse).after(&["cont"]),
    // Names are case-sensitive, and quotes do not make a name.
    case(Bare, "STOP", &[Status], Refuse).after(&["cont"]),
    case(Bare, "\"stop\"", &[Status], Refuse).after(&["cont"]),
    // A command only one of the two versions has (7.2's `singlestep`, 10.0's
    // `one-insn-per-tb`): read with that version's grammar; the other QEMU answers
    // "unknown command".
    case(Bare, "singlestep on", &[Status], Accept).after(&["stop"]),
    case(Bare, "one-insn-per-tb on", &[Status], Accept).after(&["stop"]),
    // --- -M none: migration parameters and capabilities (no migration runs) ---
    case(
        Bare,
        "migrate_set_parameter downtime-limit 500",
        &[MigrateParameter("downtime-limit")],
        Accept,
    ),
    case(
        Bare,
        "migrate_set_parameter max-bandwidth 1G",
        &[MigrateParameter("max-bandwidth")],
        Accept,
    ),
    // A string value with a space (quoted), one quoted without need, an empty one.
    case(
        Bare,
        "migrate_set_parameter tls-hostname \"my host\"",
        &[MigrateParameter("tls-hostname")],
        Accept,
    ),
    case(
        Bare,
        "migrate_set_parameter tls-authz \"authz0\"",
        &[MigrateParameter("tls-authz")],
        Accept,
    ),
    case(
        Bare,
        "migrate_set_parameter tls-creds \"\"",
        &[MigrateParameter("tls-creds")],
        Accept,
    )
    .after(&["migrate_set_parameter tls-creds x"]),
    // Booleans: `on`, quoted (not a boolean to QEMU), and after a tab.
    case(
        Bare,
        "migrate_set_capability events on",
        &[MigrateCapability("events")],
        Accept,
    ),
    case(
        Bare,
        "migrate_set_capability auto-converge \"on\"",
        &[MigrateCapability("auto-converge")],
        Refuse,
    ),
    case(
        Bare,
        "migrate_set_capability auto-converge\ton",
        &[MigrateCapability("auto-converge")],
        Accept,
    ),
    // --- -M none: sizes, as the speed of a block job (a mirror between two
    // null-co nodes, which waits, ready, for ever) ---
    case(Bare, "block_job_set_speed job0 2M", &[JobSpeed("job0")], Accept).after(&[
        "drive_add 0 if=none,id=src0,driver=null-co,size=1M",
        r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "dst0", "size": 1048576}}"#,
        r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "job0", "device": "src0", "target": "dst0", "sync": "full"}}"#,
    ]),
    // No suffix (MiB), bytes, a lower-case suffix, leading zeros, zero.
    case(Bare, "block_job_set_speed job0 4", &[JobSpeed("job0")], Accept),
    case(Bare, "block_job_set_speed job0 5B", &[JobSpeed("job0")], Accept),
    case(Bare, "block_job_set_speed job0 3k", &[JobSpeed("job0")], Accept),
    case(Bare, "block_job_set_speed job0 010", &[JobSpeed("job0")], Accept),
    case(Bare, "block_job_set_speed job0 0", &[JobSpeed("job0")], Accept),
    // The largest size QEMU takes, and one past it.
    case(
        Bare,
        "block_job_set_speed job0 9223372036854775807B",
        &[JobSpeed("job0")],
        Accept,
    ),
    case(
        Bare,
        "block_job_set_speed job0 8E",
        &[JobSpeed("job0")],
        Refuse,
    )
    .after(&["block_job_set_speed job0 1M"]),
    // A fraction and hex (QEMU takes both; the gateway does not, as 7.2 and 10.0
    // differ in their corner cases), a space before the suffix, a suffix QEMU does
    // not have, a sign.
    case(Bare, "block_job_set_speed job0 1.5M", &[JobSpeed("job0")], NoCanonical)
        .after(&["block_job_set_speed job0 1M"]),
    case(Bare, "block_job_set_speed job0 0x10", &[JobSpeed("job0")], NoCanonical)
        .after(&["block_job_set_speed job0 1M"]),
    case(Bare, "block_job_set_speed job0 2 M", &[JobSpeed("job0")], Refuse)
        .after(&["block_job_set_speed job0 1M"]),
    case(Bare, "block_job_set_speed job0 1KiB", &[JobSpeed("job0")], Refuse)
        .after(&["block_job_set_speed job0 1M"]),
    case(Bare, "block_job_set_speed job0 -1", &[JobSpeed("job0")], Refuse)
        .after(&["block_job_set_speed job0 1M"]),
    // --- -M none: chardevs ---
    // Canonical, with the implied key (`backend`) first.
    case(Bare, "chardev-add ringbuf,id=c1", &[Chardev("c1")], Accept),
    case(Bare, "chardev-add ringbuf,id=c2,size=1024", &[Chardev("c2")], Accept),
    // A size with a suffix (QemuOpts reads it as a size: 1024).
    case(Bare, "chardev-add ringbuf,id=c3,size=1K", &[Chardev("c3")], Accept),
    // The whole spec quoted (get_str unquotes it before QemuOpts reads it).
    case(Bare, "chardev-add \"ringbuf,id=q1\"", &[Chardev("q1")], Accept),
    case(Bare, "chardev-add \"ringbuf,id=q2,size=2048\"", &[Chardev("q2")], Accept),
    // QemuOpts repeats: the last `size` wins in QEMU.
    case(
        Bare,
        "chardev-add ringbuf,id=r2,size=1024,size=2048",
        &[Chardev("r2")],
        NoCanonical,
    ),
    // A repeated id: QEMU takes the first.
    case(
        Bare,
        "chardev-add ringbuf,id=r3,id=r4",
        &[Chardev("r3"), Chardev("r4")],
        NoCanonical,
    ),
    // The implied key: bare `null`, explicit `backend=` first, explicit later, and
    // both (the later `backend=ringbuf` wins in QEMU).
    case(Bare, "chardev-add null,id=n1", &[Chardev("n1")], Accept),
    case(Bare, "chardev-add backend=null,id=n2", &[Chardev("n2")], Accept),
    case(
        Bare,
        "chardev-add id=n3,backend=ringbuf,size=4096",
        &[Chardev("n3")],
        Accept,
    ),
    case(
        Bare,
        "chardev-add null,id=n4,backend=ringbuf",
        &[Chardev("n4")],
        NoCanonical,
    ),
    // A backend that is not first and not `backend=`: QEMU reads a flag
    // `ringbuf=on`, which chardevs do not have.
    case(Bare, "chardev-add id=n5,ringbuf", &[Chardev("n5")], NoCanonical),
    // The alias QEMU resolves: `memory` is a ringbuf (class chardev-memory).
    case(Bare, "chardev-add memory,id=m1", &[Chardev("m1")], Accept),
    case(Bare, "chardev-add memory,id=m2,size=1024", &[Chardev("m2")], Accept),
    // `,,` in a value (a path with a comma) and in an id.
    case(
        Bare,
        "chardev-add null,id=f1,logfile={dir}/a,,b.log",
        &[Chardev("f1"), Files],
        Accept,
    ),
    case(Bare, "chardev-add ringbuf,id=c4,,x", &[Chardev("c4"), Chardev("c4,x")], NoCanonical),
    // Quoted values: a space, `\"` and `\\` inside the quotes.
    case(
        Bare,
        "chardev-add \"null,id=f2,logfile={dir}/x y.log\"",
        &[Chardev("f2"), Files],
        Accept,
    ),
    case(
        Bare,
        r#"chardev-add "null,id=f3,logfile={dir}/q\"uote.log""#,
        &[Chardev("f3"), Files],
        Accept,
    ),
    case(
        Bare,
        r#"chardev-add "null,id=f4,logfile={dir}/back\\slash.log""#,
        &[Chardev("f4"), Files],
        Accept,
    ),
    // `\'`, an escape QEMU reads that the canonical form does not write.
    case(
        Bare,
        r#"chardev-add "null,id=f5,logfile={dir}/it\'s.log""#,
        &[Chardev("f5"), Files],
        Accept,
    ),
    // `\t`, an escape QEMU does not have: an error, nothing added.
    case(
        Bare,
        r#"chardev-add "null,id=f6,logfile={dir}/tab\tx.log""#,
        &[Chardev("f6"), Files],
        Refuse,
    ),
    // Something glued after the closing quote, and spaces after it.
    case(Bare, "chardev-add \"ringbuf,id=q5\"x", &[Chardev("q5")], Refuse),
    case(Bare, "chardev-add \"ringbuf,id=q6\"  ", &[Chardev("q6")], Accept),
    // A trailing comma; the id after another option; `=` inside a value.
    case(Bare, "chardev-add ringbuf,id=c5,", &[Chardev("c5")], Accept),
    case(Bare, "chardev-add ringbuf,size=1024,id=c6", &[Chardev("c6")], Accept),
    case(
        Bare,
        "chardev-add null,id=f9,logfile={dir}/a=b.log",
        &[Chardev("f9"), Files],
        Accept,
    ),
    // `noid`: the flag `id=off`, which QEMU takes as the id.
    case(Bare, "chardev-add ringbuf,noid", &[Chardev("off")], Accept),
    // Quotes and backslashes inside a bare word are ordinary characters; a
    // quote in the middle does not protect a space.
    case(
        Bare,
        "chardev-add null,id=f11,logfile={dir}/a\"b.log",
        &[Chardev("f11"), Files],
        Accept,
    ),
    case(
        Bare,
        r"chardev-add null,id=f12,logfile={dir}/a\b.log",
        &[Chardev("f12"), Files],
        Accept,
    ),
    case(
        Bare,
        "chardev-add null,id=f13,logfile={dir}/\"a b\".log",
        &[Chardev("f13"), Files],
        Refuse,
    ),
    // `,,` and a space inside quotes.
    case(
        Bare,
        "chardev-add \"null,id=f14,logfile={dir}/c,,d e.log\"",
        &[Chardev("f14"), Files],
        Accept,
    ),
    // An empty quoted spec.
    case(Bare, "chardev-add \"\"", &[], NoCanonical),
    // An unterminated quote.
    case(Bare, "chardev-add \"ringbuf,id=q3", &[Chardev("q3")], Refuse),
    // Something after the (only) argument.
    case(Bare, "chardev-add ringbuf,id=q4 extra", &[Chardev("q4")], Refuse),
    // UTF-8 and U+00A0 inside a value.
    case(
        Bare,
        "chardev-add null,id=f7,logfile={dir}/caf\u{e9}.log",
        &[Chardev("f7"), Files],
        NoCanonical,
    ),
    case(
        Bare,
        "chardev-add null,id=f8,logfile={dir}/nb\u{a0}sp.log",
        &[Chardev("f8"), Files],
        NoCanonical,
    ),
    // A tab inside quotes (kept by QEMU).
    case(
        Bare,
        "chardev-add \"null,id=f15,logfile={dir}/t\tab.log\"",
        &[Chardev("f15"), Files],
        NoCanonical,
    ),
    // `,,` right after the implied value: QEMU's id pass finds `id=c40`, the
    // backend is `null,id=c40`.
    case(Bare, "chardev-add null,,id=c40", &[Chardev("c40")], NoCanonical),
    // U+00A0 inside an id (not an identifier to QEMU), and between the words.
    case(Bare, "chardev-add null,id=w\u{a0}1", &[Chardev("w\u{a0}1")], NoCanonical),
    case(Bare, "chardev-add\u{a0}null,id=w2", &[Chardev("w2")], Refuse),
    // Odd whitespace: a tab, several spaces, trailing and leading spaces.
    case(Bare, "chardev-add\tnull,id=w3", &[Chardev("w3")], Accept),
    case(Bare, "chardev-add   null,id=w4", &[Chardev("w4")], Accept),
    case(Bare, "chardev-add null,id=w5   ", &[Chardev("w5")], Accept),
    case(Bare, "   chardev-add null,id=w6", &[Chardev("w6")], Accept),
    // QemuOpts flags: `mux` is `mux=on` (a chardev-mux over `l1-base`), `nomux`
    // is `mux=off`.
    case(
        Bare,
        "chardev-add null,id=l1,mux",
        &[Chardev("l1"), Chardev("l1-base")],
        Accept,
    ),
    case(
        Bare,
        "chardev-add null,id=l2,nomux",
        &[Chardev("l2"), Chardev("l2-base")],
        Accept,
    ),
    case(
        Bare,
        "chardev-add null,id=l3,mux=on",
        &[Chardev("l3"), Chardev("l3-base")],
        Accept,
    ),
    // --- -M none: objects ---
    // key=value (keyval, implied key `qom-type`).
    case(
        Bare,
        "object_add iothread,id=io1",
        &[Iothread("io1"), Object("io1", &[])],
        Accept,
    ),
    case(
        Bare,
        "object_add iothread,id=io2,poll-max-ns=1000,aio-max-batch=8",
        &[Iothread("io2")],
        Accept,
    ),
    // The JSON form (QEMU reads a spec starting with `{` as JSON), with a number,
    // and with the single quotes QEMU's JSON parser also takes.
    case(
        Bare,
        r#"object_add {"qom-type":"iothread","id":"io3"}"#,
        &[Iothread("io3")],
        NoCanonical,
    ),
    case(
        Bare,
        r#"object_add {"qom-type": "iothread", "id": "io4", "poll-max-ns": 2000}"#,
        &[Iothread("io4")],
        NoCanonical,
    ),
    case(
        Bare,
        "object_add {'qom-type':'iothread','id':'io5'}",
        &[Iothread("io5")],
        NoCanonical,
    ),
    // JSON is typed: a string where an integer belongs is an error in QEMU.
    case(
        Bare,
        r#"object_add {"qom-type":"iothread","id":"io6","poll-max-ns":"300"}"#,
        &[Iothread("io6")],
        NoCanonical,
    ),
    // keyval repeats: the last wins in QEMU.
    case(
        Bare,
        "object_add iothread,id=io7,poll-max-ns=100,poll-max-ns=200",
        &[Iothread("io7")],
        NoCanonical,
    ),
    // The implied key given explicitly, first and later.
    case(
        Bare,
        "object_add qom-type=iothread,id=io8",
        &[Iothread("io8")],
        Accept,
    ),
    case(
        Bare,
        "object_add id=io9,qom-type=iothread",
        &[Iothread("io9")],
        Accept,
    ),
    // Several spaces before a rest-of-line argument, and a trailing space in it
    // (the rest of the line is the value: the id is `io11 `, which QEMU refuses;
    // canonical, as the value is written as it is).
    case(Bare, "object_add   iothread,id=io10", &[Iothread("io10")], Accept),
    case(
        Bare,
        "object_add iothread,id=io11 ",
        &[Iothread("io11"), Object("io11 ", &[])],
        Accept,
    ),
    // String values: plain, with `,,`, with quotes (data in a rest-of-line
    // argument), with a space, UTF-8 and U+00A0.
    case(
        Bare,
        "object_add authz-simple,id=az1,identity=alice",
        &[Object("az1", &["identity"])],
        Accept,
    ),
    case(
        Bare,
        "object_add authz-simple,id=az2,identity=a,,b",
        &[Object("az2", &["identity"])],
        Accept,
    ),
    case(
        Bare,
        "object_add authz-simple,id=az3,identity=\"q\"",
        &[Object("az3", &["identity"])],
        Accept,
    ),
    case(
        Bare,
        "object_add authz-simple,id=az4,identity=a b",
        &[Object("az4", &["identity"])],
        Accept,
    ),
    case(
        Bare,
        "object_add authz-simple,id=az5,identity=caf\u{e9}",
        &[Object("az5", &["identity"])],
        NoCanonical,
    ),
    case(
        Bare,
        "object_add authz-simple,id=az6,identity=a\u{a0}b",
        &[Object("az6", &["identity"])],
        NoCanonical,
    ),
    // A 4-byte UTF-8 character, DEL, and a tab inside a value.
    case(
        Bare,
        "object_add authz-simple,id=az9,identity=\u{1f600}",
        &[Object("az9", &["identity"])],
        NoCanonical,
    ),
    case(
        Bare,
        "object_add authz-simple,id=az10,identity=a\u{7f}b",
        &[Object("az10", &["identity"])],
        NoCanonical,
    ),
    case(
        Bare,
        "object_add authz-simple,id=az11,identity=a\tb",
        &[Object("az11", &["identity"])],
        NoCanonical,
    ),
    // JSON with escapes in a string.
    case(
        Bare,
        r#"object_add {"qom-type":"authz-simple","id":"az7","identity":"x,y \"z\""}"#,
        &[Object("az7", &["identity"])],
        NoCanonical,
    ),
    // A key without `=` after the first element.
    case(
        Bare,
        "object_add iothread,id=io20,poll-max-ns",
        &[Iothread("io20")],
        NoCanonical,
    ),
    // A repeated id (the last wins in keyval), a trailing comma, an empty value.
    case(
        Bare,
        "object_add iothread,id=io13,id=io14",
        &[Iothread("io13"), Iothread("io14")],
        NoCanonical,
    ),
    case(Bare, "object_add iothread,id=io12,", &[Iothread("io12")], Accept),
    case(
        Bare,
        "object_add authz-simple,id=az8,identity=",
        &[Object("az8", &["identity"])],
        Accept,
    ),
    // A repeated key in the JSON form.
    case(
        Bare,
        r#"object_add {"qom-type":"iothread","id":"io15","id":"io16"}"#,
        &[Iothread("io15"), Iothread("io16")],
        NoCanonical,
    ),
    // keyval's dotted keys (a nested struct), and the flat alias of the same.
    case(
        Bare,
        "object_add throttle-group,id=tg1,limits.iops-total=100",
        &[Object("tg1", &["limits"])],
        NoCanonical,
    ),
    case(
        Bare,
        "object_add throttle-group,id=tg2,x-iops-total=100",
        &[Object("tg2", &["limits"])],
        Accept,
    ),
    // An HMP query of what an earlier line set.
    case(Bare, "qom-get /objects/az2 identity", &[], Accept),
    // A size property.
    case(
        Bare,
        "object_add memory-backend-ram,id=mem1,size=1M",
        &[Object("mem1", &["size"])],
        Accept,
    ),
    case(
        Bare,
        "object_add memory-backend-ram,id=mem2,size=1M,size=2M",
        &[Object("mem2", &["size"])],
        NoCanonical,
    ),
    // Removing an object the corpus added (canonically, so both sides have it).
    case(
        Bare,
        "object_del io1",
        &[Iothread("io1"), Object("io1", &[])],
        Accept,
    ),
    // qom-set: plain, `-j` (the value is JSON), `-j` glued to the path, and a
    // trailing space in the rest-of-line value.
    case(
        Bare,
        "qom-set /objects/qs1 poll-max-ns 500",
        &[Iothread("qs1")],
        Accept,
    )
    .after(&["object_add iothread,id=qs1"]),
    case(
        Bare,
        "qom-set -j /objects/qs2 poll-grow 3",
        &[Iothread("qs2")],
        Accept,
    )
    .after(&["object_add iothread,id=qs2"]),
    case(
        Bare,
        "qom-set -j/objects/qs3 poll-shrink 2",
        &[Iothread("qs3")],
        Accept,
    )
    .after(&["object_add iothread,id=qs3"]),
    case(
        Bare,
        "qom-set /objects/qs4 poll-max-ns 16 ",
        &[Iothread("qs4")],
        NoCanonical,
    )
    .after(&["object_add iothread,id=qs4"]),
    // A quoted path glued to `-j`, an option qom-set does not have, and a quoted
    // value (the rest of the line is the value, quotes and all).
    case(
        Bare,
        "qom-set -j\"/objects/qs5\" poll-max-ns 9",
        &[Iothread("qs5")],
        Accept,
    )
    .after(&["object_add iothread,id=qs5"]),
    case(
        Bare,
        "qom-set -x /objects/qs6 poll-max-ns 9",
        &[Iothread("qs6")],
        Refuse,
    )
    .after(&["object_add iothread,id=qs6"]),
    case(
        Bare,
        "qom-set /objects/qs7 poll-max-ns \"9\"",
        &[Iothread("qs7")],
        Accept,
    )
    .after(&["object_add iothread,id=qs7"]),
    // --- -M pc: memory reads, and commands ending at `/` ---
    // `x` with a format right after the name, with a space before it, with a
    // size letter, with the letters in another order, and with an empty format
    // (QEMU then uses the last command's format: set it first).
    case(Pc, "x/4x 0", &[], Accept).after(&["x/1xw 0"]),
    case(Pc, "x /4x 0", &[], Accept).after(&["x/1xw 0"]),
    case(Pc, "x/4xb 0", &[], Accept),
    case(Pc, "xp/2wx 0", &[], Accept),
    case(Pc, "x/4x 0x0", &[], Accept).after(&["x/1xw 0"]),
    case(Pc, "x/4x\t0", &[], Accept).after(&["x/1xw 0"]),
    case(Pc, "x/ 0", &[], Accept).after(&["x/2xb 0"]),
    // No format at all: the last one's count is not kept, its format and size are.
    case(Pc, "x 0", &[], Accept).after(&["x/2xh 0"]),
    // Size letters: `L` is `g`, and the last one wins; a count with leading
    // zeros; a count of 0; the `i` (disassembly) format.
    case(Pc, "x/2xL 0", &[], Accept),
    case(Pc, "x/2xgb 0", &[], Accept),
    case(Pc, "x/00004x 0", &[], Accept).after(&["x/1xw 0"]),
    case(Pc, "x/0x 0", &[], Accept).after(&["x/1xw 0"]),
    case(Pc, "x/2i 0", &[], Accept),
    // An octal address.
    case(Pc, "x/4xb 010", &[], Accept),
    // A checksum of guest memory.
    case(Pc, "sum 0 16", &[], Accept),
    // A format glued to the address, and no address.
    case(Pc, "x/4x0", &[], Refuse).after(&["x/1xw 0"]),
    case(Pc, "x/4x", &[], Refuse).after(&["x/1xw 0"]),
    // An expression where QEMU reads an address (refused unread by the gateway).
    case(Pc, "x/4x 1+1", &[], NoCanonical).after(&["x/1xw 0"]),
    // Registers, with the optional flag and vCPU omitted and present.
    case(Pc, "info registers", &[], Accept),
    case(Pc, "info registers -a", &[], Accept),
    case(Pc, "info registers 0", &[], Accept),
    case(Pc, "info registers -a 0", &[], Accept),
    case(Pc, "info registers -a0", &[], Accept),
    // Host files in the test's directory: a path after a number must be quoted
    // (unquoted, `/` continues QEMU's expression).
    case(Pc, "memsave 0 16 \"{dir}/m.bin\"", &[Files], Accept),
    case(Pc, "memsave 0 16 {dir}/m2.bin", &[Files], NoCanonical),
    case(Pc, "pmemsave 0x0 16 \"{dir}/p.bin\"", &[Files], Accept),
    // Single quotes are no quotes to QEMU: a relative path starting with `'`.
    case(Pc, "memsave 0 16 '{dir}/m5.bin'", &[Files], Accept),
    // Something after the last argument.
    case(Pc, "pmemsave 0 16 \"{dir}/p2.bin\" extra", &[Files], Refuse),
    // Options come in the table's order: before the filename, `-f` is the
    // filename, `png` the device, and the path an expression.
    case(Pc, "screendump -f png {dir}/s5.png", &[Files], NoCanonical),
    // An option with a value, separate and glued.
    case(Pc, "screendump {dir}/s.ppm", &[Files], Accept),
    case(Pc, "screendump \"{dir}/s0 x.ppm\"", &[Files], Accept),
    case(Pc, "screendump {dir}/s1.png -f png", &[Files], Accept),
    case(Pc, "screendump {dir}/s2.png -fpng", &[Files], Accept),
    case(Pc, "screendump {dir}/s6.png -f \"png\"", &[Files], Accept),
    // --- -M pc: netdevs and devices ---
    case(Pc, "netdev_add user,id=nu1", &[Network("nu1")], Accept),
    case(
        Pc,
        "netdev_add user,id=nu2,net=10.5.0.0/24",
        &[Network("nu2")],
        Accept,
    ),
    // The implied key (`type`) given explicitly.
    case(Pc, "netdev_add type=user,id=nu3", &[Network("nu3")], Accept),
    // A repeat: the last `net` wins in QEMU.
    case(
        Pc,
        "netdev_add user,id=nu4,net=10.6.0.0/24,net=10.7.0.0/24",
        &[Network("nu4")],
        NoCanonical,
    ),
    // QemuOpts flags: `restrict` and `norestrict`.
    case(Pc, "netdev_add user,id=nu5,restrict", &[Network("nu5")], Accept),
    case(Pc, "netdev_add user,id=nu6,norestrict", &[Network("nu6")], Accept),
    case(
        Pc,
        "netdev_add user,id=nu7,restrict=on",
        &[Network("nu7")],
        Accept,
    ),
    // The whole spec quoted.
    case(Pc, "netdev_add \"user,id=nu8\"", &[Network("nu8")], Accept),
    // `,,` in an id (not an identifier to QEMU).
    case(
        Pc,
        "netdev_add user,id=nu9,,x",
        &[Network("nu9"), Network("nu9,x")],
        NoCanonical,
    ),
    // Removing a netdev.
    case(Pc, "netdev_del nu2", &[Network("nu2")], Accept),
    // Devices: canonical, the implied key (`driver`) given explicitly, a repeat.
    case(
        Pc,
        "device_add e1000,id=nic1,netdev=nu1,mac=52:54:00:12:34:01",
        &[Device("nic1", &["mac", "netdev"]), Network("nic1")],
        Accept,
    ),
    case(
        Pc,
        "device_add driver=e1000,id=nic2,mac=52:54:00:12:34:02",
        &[Device("nic2", &["mac"])],
        Accept,
    ),
    case(
        Pc,
        "device_add e1000,id=nic3,mac=52:54:00:12:34:03,mac=52:54:00:12:34:04",
        &[Device("nic3", &["mac"])],
        NoCanonical,
    ),
    case(
        Pc,
        "device_add   e1000,id=nic4,mac=52:54:00:12:34:05",
        &[Device("nic4", &["mac"])],
        Accept,
    ),
    // A driver alias QEMU resolves (`virtio-net` is `virtio-net-pci` on a PC).
    case(
        Pc,
        "device_add virtio-net,id=nic6,mac=52:54:00:12:34:07",
        &[Device("nic6", &["mac"]), Network("nic6")],
        Accept,
    ),
    // A netdev already in use: QEMU's own error.
    case(
        Pc,
        "device_add e1000,id=nic5,netdev=nu1,mac=52:54:00:12:34:06",
        &[Device("nic5", &["mac"])],
        Accept,
    ),
];

/// One side: a QEMU and a QMP client to it (directly, or through a gateway).
struct Side {
    qemu: Qemu,
    client: QmpClient,
    _gateway: Option<Gateway>,
}

impl Side {
    fn direct(machine: Machine) -> Side {
        let qemu = Qemu::start_version(QemuVersion::under_test(), args(machine));
        let client = QmpClient::negotiated(&qemu.monitor);
        Side {
            qemu,
            client,
            _gateway: None,
        }
    }

    fn gated(machine: Machine) -> Side {
        let qemu = Qemu::start_version(QemuVersion::under_test(), args(machine));
        let gateway = GatewayBuilder::new(&qemu.upstream_spec())
            .args(["--profile", "permissive"])
            .spawn();
        let client = gateway.negotiated();
        Side {
            qemu,
            client,
            _gateway: Some(gateway),
        }
    }

    fn execute(&mut self, name: &str, arguments: Value) -> Value {
        self.client.execute(name, arguments)
    }

    /// Sends an HMP line as `human-monitor-command`; the reply with the QEMU's
    /// monitor directory normalised.
    fn hmp(&mut self, line: &str) -> Value {
        let reply = self.execute("human-monitor-command", json!({ "command-line": line }));
        self.normalise(reply)
    }

    /// As [`Side::hmp`], without the deprecation warnings QEMU prints for
    /// spellings it still reads (`mux` for `mux=on`): a line and its
    /// canonical form differ in those and nothing else.
    fn hmp_output(&mut self, line: &str) -> Value {
        let mut reply = self.hmp(line);
        if let Some(text) = reply["return"].as_str() {
            let mut kept = Vec::new();
            let mut lines = text.split_inclusive('\n').peekable();
            while let Some(l) = lines.next() {
                if l.starts_with("warning: short-form boolean option ") {
                    lines.next_if(|next| next.starts_with("Please use "));
                } else {
                    kept.push(l);
                }
            }
            reply["return"] = json!(kept.concat());
        }
        reply
    }

    /// `value` with this QEMU's monitor directory written as `<monitor-dir>`.
    fn normalise(&self, value: Value) -> Value {
        let dir = self.qemu.monitor.parent().unwrap().display().to_string();
        serde_json::from_str(&value.to_string().replace(&dir, "<monitor-dir>")).unwrap()
    }

    /// What `looks` see now.
    fn observe(&mut self, looks: &[Look], files: &Path) -> Value {
        let mut seen = Map::new();
        for look in looks {
            let value = match *look {
                Look::Status => self.execute("query-status", json!({})),
                Look::Chardev(id) => self.chardev(id),
                Look::Object(id, properties) => self.qom("/objects", id, properties),
                Look::Iothread(id) => {
                    let reply = self.execute("query-iothreads", json!({}));
                    let mut entry = entry(&reply, "id", id);
                    if let Some(entry) = entry.as_object_mut() {
                        entry.remove("thread-id");
                    }
                    entry
                }
                Look::Network(id) => {
                    let reply = self.hmp("info network");
                    let text = reply["return"].as_str().unwrap_or_default();
                    let lines: Vec<&str> = text
                        .lines()
                        .filter(|l| {
                            l.trim_start_matches([' ', '\\'])
                                .starts_with(&format!("{id}:"))
                        })
                        .collect();
                    json!(lines)
                }
                Look::Device(id, properties) => self.qom("/machine/peripheral", id, properties),
                Look::MigrateParameter(name) => {
                    self.execute("query-migrate-parameters", json!({}))["return"][name].clone()
                }
                Look::MigrateCapability(name) => entry(
                    &self.execute("query-migrate-capabilities", json!({})),
                    "capability",
                    name,
                ),
                Look::JobSpeed(id) => {
                    entry(&self.execute("query-block-jobs", json!({})), "device", id)["speed"]
                        .clone()
                }
                Look::Files => take_files(files),
                Look::Unordered => continue,
            };
            seen.insert(format!("{look:?}"), value);
        }
        self.normalise(Value::Object(seen))
    }

    fn chardev(&mut self, id: &str) -> Value {
        let class = self.child_type("/chardevs", id);
        let info = entry(&self.execute("query-chardev", json!({})), "label", id);
        let mut seen = json!({ "class": class, "query-chardev": info });
        if class
            .as_str()
            .is_some_and(|c| c.contains("ringbuf") || c.contains("memory"))
        {
            // The ring's size: how much of 5000 bytes written reads back.
            let write = self.execute(
                "ringbuf-write",
                json!({ "device": id, "data": "x".repeat(5000) }),
            );
            let read = self.execute("ringbuf-read", json!({ "device": id, "size": 65536 }));
            seen["ring"] = json!({
                "write": write,
                "read": read["return"].as_str().map(str::len),
            });
        }
        seen
    }

    /// The type of child `id` of `parent` (`child<...>`), or null.
    fn child_type(&mut self, parent: &str, id: &str) -> Value {
        let list = self.execute("qom-list", json!({ "path": parent }));
        entry(&list, "name", id)
            .get("type")
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn qom(&mut self, parent: &str, id: &str, properties: &[&str]) -> Value {
        let class = self.child_type(parent, id);
        let mut seen = json!({ "class": class });
        if !class.is_null() {
            for property in properties {
                seen[*property] = self.execute(
                    "qom-get",
                    json!({ "path": format!("{parent}/{id}"), "property": property }),
                );
            }
        }
        seen
    }
}

fn args(machine: Machine) -> &'static [&'static str] {
    match machine {
        Machine::Bare => QEMU_NONE,
        Machine::Pc => QEMU_PC,
    }
}

/// The element of `reply["return"]` (an array) whose `key` is `value`, or null.
fn entry(reply: &Value, key: &str, value: &str) -> Value {
    reply["return"]
        .as_array()
        .unwrap_or_else(|| panic!("expected a list: {reply}"))
        .iter()
        .find(|e| e[key] == value)
        .cloned()
        .unwrap_or(Value::Null)
}

/// The files in `dir` (name: size and FNV-1a hash of the contents), removed.
fn take_files(dir: &Path) -> Value {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let bytes = std::fs::read(e.path()).unwrap_or_default();
        let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        files.insert(
            e.file_name().to_string_lossy().into_owned(),
            json!({ "size": bytes.len(), "fnv1a": format!("{hash:016x}") }),
        );
        std::fs::remove_file(e.path()).unwrap();
    }
    json!(files)
}

/// A reply's text as its sorted blank-line-separated blocks.
fn blocks(mut reply: Value) -> Value {
    if let Some(text) = reply["return"].as_str() {
        let mut blocks: Vec<&str> = text.split("\r\n\r\n").collect();
        blocks.sort_unstable();
        reply["return"] = json!(blocks);
    }
    reply
}

/// What happened to one line.
struct Outcome {
    line: String,
    /// The gateway's refusal, if it refused.
    refused: Option<String>,
}

/// Runs one case on the pair; pushes what went wrong to `failures`.
fn run_case(
    case: &Case,
    a: &mut Side,
    b: &mut Side,
    dir: &Path,
    failures: &mut Vec<String>,
) -> Outcome {
    let fill = |s: &str| s.replace("{dir}", &dir.display().to_string());
    let line = fill(case.line);
    for setup in case.setup {
        let setup = fill(setup);
        for side in [&mut *a, &mut *b] {
            let reply = if setup.starts_with('{') {
                let command: Value = serde_json::from_str(&setup).unwrap();
                side.execute(
                    command["execute"].as_str().unwrap(),
                    command["arguments"].clone(),
                )
            } else {
                side.hmp(&setup)
            };
            let failed = |text: &str| {
                ["Error", "unknown command", "Try \"help"]
                    .iter()
                    .any(|e| text.contains(e))
            };
            assert!(
                reply.get("return").is_some() && !reply["return"].as_str().is_some_and(failed),
                "setup {setup:?} (for {line:?}) failed: {reply}"
            );
        }
    }
    // A first, then B: they share the directory files are observed in.
    let a_before = a.observe(case.look, dir);
    let unordered = case.look.iter().any(|l| matches!(l, Look::Unordered));
    let output = |side: &mut Side, line: &str| {
        let reply = side.hmp_output(line);
        if unordered { blocks(reply) } else { reply }
    };
    let a_reply = output(a, &line);
    let a_after = a.observe(case.look, dir);
    let b_before = b.observe(case.look, dir);
    let b_reply = output(b, &line);
    let b_after = b.observe(case.look, dir);

    let mut fail = |what: String| failures.push(format!("{line:?}: {what}"));
    if a_before != b_before {
        fail(format!(
            "the pair disagreed before the line (a corpus error):\n  A: {a_before}\n  B: {b_before}"
        ));
    }
    let refused = match b_reply.get("return") {
        Some(_) => {
            if (&b_reply, &b_after) != (&a_reply, &a_after) {
                fail(format!(
                    "let through, and QEMU behind the gateway differs from QEMU reached directly:\n  A reply {a_reply}\n  B reply {b_reply}\n  A saw {a_after}\n  B saw {b_after}"
                ));
            }
            None
        }
        None => {
            let reason = b_reply["error"]["desc"]
                .as_str()
                .unwrap_or_else(|| panic!("{line:?}: neither a reply nor an error: {b_reply}"))
                .to_string();
            if b_after != b_before {
                fail(format!(
                    "refused ({reason}), but had an effect:\n  before {b_before}\n  after  {b_after}"
                ));
            }
            Some(reason)
        }
    };
    match (case.expect, &refused) {
        (Expect::Accept, Some(reason)) => {
            fail(format!("expected to be let through, refused: {reason}"))
        }
        (Expect::Refuse | Expect::NoCanonical, None) => {
            fail(format!("expected to be refused, let through: {b_reply}"))
        }
        _ => {}
    }
    Outcome { line, refused }
}

#[test]
fn the_gateway_reads_hmp_lines_as_qemu_does() {
    let started = Instant::now();
    let version = QemuVersion::under_test();
    let dir = tempdir();
    let mut failures = Vec::new();
    let mut outcomes = Vec::new();
    for machine in [Machine::Bare, Machine::Pc] {
        let mut a = Side::direct(machine);
        let mut b = Side::gated(machine);
        for case in CORPUS.iter().filter(|c| c.machine == machine) {
            outcomes.push(run_case(case, &mut a, &mut b, dir.path(), &mut failures));
        }
    }

    let refused: Vec<&Outcome> = outcomes.iter().filter(|o| o.refused.is_some()).collect();
    eprintln!(
        "HMP corpus on QEMU {version}: {} lines, {} let through, {} refused ({:.1} s)",
        outcomes.len(),
        outcomes.len() - refused.len(),
        refused.len(),
        started.elapsed().as_secs_f64()
    );
    for o in &refused {
        eprintln!("  refused {:?}: {}", o.line, o.refused.as_deref().unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of {} lines failed on QEMU {version}:\n{}",
        failures.len(),
        CORPUS.len(),
        failures.join("\n")
    );
}
