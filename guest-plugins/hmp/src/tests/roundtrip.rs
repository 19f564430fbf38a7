//! Property tests with a small hand-rolled generator (no extra dependency):
//! - random commands built from the table's `args_type` grammar: writing one
//!   canonically and reading it back gives the same command, and the written line
//!   is accepted as canonical;
//! - random lines from HMP-ish tokens and random bytes: no panic, and whenever a
//!   line is read, its canonical line reads back to the same command and is its
//!   own canonical form (rendering then re-parsing gives the same command);
//! - pathological lines of the maximal length finish quickly (linear work).
//!
//! Layout: `Rng` (xorshift); `gen_*` (values per args_type letter); the tests.

use std::time::{Duration, Instant};

use crate::opts::{Grammar, Opts};
use crate::parse::{self, Arg, Format, Parsed, Value, Version};
use crate::render;
use crate::table::{COMMANDS, INFO_COMMANDS};
use crate::{HmpTranslation, translate};

/// Deterministic xorshift64*: reproducible failures without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Printable ASCII, weighted towards the characters that matter to the grammar.
fn gen_string(rng: &mut Rng, max: usize) -> String {
    const SPECIAL: &[u8] = b" \"\\',=-/:.@+%*&|^${}<>()~?#";
    let len = rng.below(max + 1);
    (0..len)
        .map(|_| {
            if rng.chance(30) {
                *rng.pick(SPECIAL) as char
            } else if rng.chance(10) {
                (0x20 + rng.below(0x5f) as u8) as char
            } else {
                *rng.pick(b"abcxyz019_") as char
            }
        })
        .collect()
}

fn gen_name(rng: &mut Rng) -> String {
    let mut s = (*rng.pick(b"abcdefghijklmnopqrstuvwxyz") as char).to_string();
    for _ in 0..rng.below(8) {
        s.push(*rng.pick(b"abcxyz019_.-") as char);
    }
    s
}

fn gen_opts(rng: &mut Rng, grammar: Grammar, implied_key: &'static str) -> Opts {
    let mut opts = Opts {
        grammar,
        implied_key,
        implied: rng.chance(90).then(|| gen_name(rng)),
        pairs: Vec::new(),
    };
    let keys = [
        "id", "path", "size", "logfile", "server", "mac", "netdev", "data",
    ];
    for _ in 0..rng.below(4) {
        let key = rng.pick(&keys).to_string();
        if opts.pairs.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let value = if key == "id" {
            gen_name(rng)
        } else {
            gen_string(rng, 10)
        };
        opts.pairs.push((key, value));
    }
    opts
}

fn gen_int(rng: &mut Rng, kind: u8) -> Value {
    let value = match kind {
        b'i' => rng.below(1 << 32) as i64,
        b'M' => rng.below(1 << 40) as i64,
        _ if rng.chance(20) => -(rng.below(1 << 20) as i64),
        _ => rng.next() as i64,
    };
    Value::Int {
        value,
        hex: rng.chance(50),
    }
}

/// One `key:type` of an args_type: the key, the type letter, its modifier.
fn specs(args_type: &str) -> Vec<(&str, u8, &str)> {
    args_type
        .split(',')
        .filter_map(|s| s.split_once(':'))
        .map(|(k, t)| (k, t.as_bytes()[0], &t[1..]))
        .collect()
}

/// A random command of `entry` (and sub-entry), as `version` would read it.
fn gen_command(rng: &mut Rng, version: Version) -> Option<Parsed> {
    let entry = rng.pick(COMMANDS);
    let mut args = entry.args(version)?;
    let names: Vec<&str> = entry.names.split('|').collect();
    let mut parsed = Parsed {
        name: rng.pick(&names).to_string(),
        primary: entry.primary(),
        sub: None,
        args: Vec::new(),
    };
    if args.sub_table && rng.chance(90) {
        let sub = rng.pick(INFO_COMMANDS);
        args = sub.args(version)?;
        let names: Vec<&str> = sub.names.split('|').collect();
        parsed.sub = Some((rng.pick(&names).to_string(), sub.primary()));
    } else if args.sub_table {
        return Some(parsed);
    }
    // Once an optional argument is left out, QEMU reads no later optional one.
    let mut dropped = false;
    for (key, kind, modifier) in specs(args.args_type) {
        let optional = modifier.starts_with('?') || modifier.starts_with('.') || kind == b'O';
        if optional && (dropped || rng.chance(30)) {
            dropped = true;
            continue;
        }
        let value = match kind {
            b's' | b'F' | b'B' => match (parsed.primary, key) {
                ("chardev-add" | "chardev-change", "args") => {
                    let mut o = gen_opts(rng, Grammar::QemuOpts, "backend");
                    if parsed.primary == "chardev-change" {
                        o.pairs.retain(|(k, _)| k != "id");
                    }
                    Value::Opts(o)
                }
                _ => Value::Str(gen_string(rng, 12)),
            },
            b'S' if parsed.primary == "object_add" && parsed.sub.is_none() => {
                Value::Opts(gen_opts(rng, Grammar::Keyval, "qom-type"))
            }
            b'S' => Value::Rest(gen_string(rng, 12)),
            b'O' => Value::Opts(gen_opts(
                rng,
                Grammar::QemuOpts,
                if key == "device" { "driver" } else { "type" },
            )),
            b'i' | b'l' | b'M' => match (gen_int(rng, kind), modifier) {
                (Value::Int { value, hex }, ".") => Value::Index { value, hex },
                (v, _) => v,
            },
            b'o' => Value::Size {
                number: rng.below(100_000) as u64,
                suffix: rng.chance(50).then(|| *rng.pick(b"BKMGT")),
            },
            b'b' => Value::Bool(rng.chance(50)),
            b'/' => Value::Format(Format {
                typed: rng.chance(70),
                count: rng.chance(50).then(|| rng.below(1000) as u32),
                format: rng.chance(50).then(|| *rng.pick(b"oduxic")),
                size: rng.chance(50).then(|| *rng.pick(&[1u8, 2, 4, 8])),
            }),
            b'-' => {
                if rng.chance(50) {
                    continue;
                }
                let letter = modifier.as_bytes()[0];
                if modifier.len() > 1 {
                    Value::Option {
                        letter,
                        value: gen_string(rng, 8),
                    }
                } else {
                    Value::Flag(letter)
                }
            }
            _ => return None,
        };
        parsed.args.push(Arg {
            key: key.to_string(),
            kind,
            value,
        });
    }
    // A format that was not typed reads as such only when nothing else was either.
    if let Some(Arg {
        value: Value::Format(f),
        ..
    }) = parsed.args.first_mut()
        && !f.typed
    {
        *f = Format {
            typed: false,
            count: None,
            format: None,
            size: None,
        };
    }
    Some(parsed)
}

#[test]
fn written_commands_read_back_the_same() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut written, mut refused) = (0, 0);
    for _ in 0..40_000 {
        let version = *rng.pick(&Version::ALL);
        let Some(command) = gen_command(&mut rng, version) else {
            continue;
        };
        // The writer alone (without render's read-back guard) must be faithful.
        let Ok(line) = render::write(&command) else {
            refused += 1;
            continue;
        };
        written += 1;
        let back = parse::parse(line.as_bytes(), version)
            .unwrap_or_else(|e| panic!("{line:?} ({}) does not parse: {e}", version.label()));
        assert_eq!(back, command, "{line:?} ({})", version.label());
        // And it is canonical: writing the reading again gives the same line.
        assert_eq!(render::render(&back, version).as_deref(), Ok(line.as_str()));
        // translate sends it as it is, unless the versions disagree about it.
        if let HmpTranslation::Reading(reading) = translate(&line) {
            assert_eq!(reading.canonical, line);
        }
    }
    // The generator makes some unwritable values (control-free but e.g. opts with
    // odd implied names); most must be written.
    assert!(
        written > 3 * refused,
        "written {written}, refused {refused}"
    );
}

/// Lines from HMP-ish pieces, to reach deep into the grammar.
fn gen_line(rng: &mut Rng) -> String {
    let mut line = String::new();
    if rng.chance(10) {
        let lead: &&str = rng.pick(&[" ", "\t", "\u{a0}"]);
        line.push_str(lead);
    }
    let entry = rng.pick(COMMANDS);
    let names: Vec<&str> = entry.names.split('|').collect();
    let name: &&str = rng.pick(&names);
    line.push_str(name);
    if entry.primary() == "info" && rng.chance(80) {
        line.push(' ');
        line.push_str(rng.pick(INFO_COMMANDS).primary());
    }
    const PIECES: &[&str] = &[
        " ", "  ", "\t", "-d", "-f", "-", "\"", "\\", "\\\"", ",", ",,", "=", "id=", "x", "0x1f",
        "12", "010", "+", "/", "/4x", ".", "on", "off", "file", "help", "?", "exec:", "{", "1G",
        "\u{a0}", "\r\n",
    ];
    for _ in 0..rng.below(10) {
        let piece: &&str = rng.pick(PIECES);
        line.push_str(piece);
    }
    line
}

#[test]
fn canonical_lines_read_back_to_the_same_command() {
    let mut rng = Rng(0x0dd_ba11_c0ff_ee42);
    for i in 0..60_000 {
        let line = if i % 4 == 0 {
            let bytes: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            gen_line(&mut rng)
        };
        if let HmpTranslation::Reading(reading) = translate(&line) {
            let again = translate(&reading.canonical);
            assert_eq!(
                again,
                HmpTranslation::Reading(reading.clone()),
                "{line:?} -> {:?}",
                reading.canonical
            );
        }
    }
}

#[test]
fn maximal_lines_take_linear_time() {
    let n = crate::READLINE_CMD_BUF_SIZE;
    let fill = |prefix: &str, unit: &str| {
        let mut s = prefix.to_string();
        while s.len() + unit.len() <= n {
            s.push_str(unit);
        }
        s
    };
    let lines = [
        fill("chardev-add ", ",,"),
        fill("chardev-add null", ",a"),
        fill("device_add ", "a=,"),
        fill("object_add ", ",,"),
        fill("delvm \"", "\\\\"),
        fill("x/", "x"),
        fill("help ", " "),
        fill("", " "),
        fill("migrate ", "-d"),
        fill("memsave ", "1 "),
        fill("info ", "x"),
    ];
    let start = Instant::now();
    for _ in 0..20 {
        for line in &lines {
            let _ = translate(line);
        }
    }
    // 220 lines of 4 KiB: linear work is well under a millisecond each even in a
    // debug build; quadratic work would be seconds.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // Far longer lines are refused before parsing.
    let huge = "a".repeat(800 * 1024);
    let start = Instant::now();
    assert!(matches!(translate(&huge), HmpTranslation::Invalid(_)));
    assert!(start.elapsed() < Duration::from_millis(100));
}
