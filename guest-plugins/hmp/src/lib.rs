//! The HMP plugin: reads HMP command lines as QEMU does and says what each one is
//! in QMP terms, so that one policy decides both protocols (`quit` typed on an HMP
//! listener is denied exactly when QMP `quit` is).
//!
//! For each line it answers `translate-hmp` with one of:
//! - the QMP command the line corresponds to, with its arguments (`c` is `cont`,
//!   `migrate -d exec:cat` is `migrate {"uri": "exec:cat"}`, `chardev-add
//!   file,id=x,path=/etc/y` is `chardev-add` with a `file` backend, `info status` is
//!   `query-status`);
//! - `hmp-only(NAME)` for a valid command with no QMP equivalent (`gdbserver`,
//!   `o`, `info registers`); the policy sees it as the command `hmp:NAME`;
//! - `invalid(REASON)` for an unknown command or missing arguments, which qmpgate
//!   refuses (QEMU itself would answer "unknown command" as a *success*).
//!
//! Layout: [`tokenize`] splits a line as QEMU's HMP does (quotes, escapes);
//! [`COMMANDS`] is the table (names, aliases, mapping); [`opts`] reads QemuOpts
//! `key=value,...` strings; [`translate`] ties them together.

#![forbid(unsafe_code)]

use qmpgate_plugin_sdk::{Command, HmpTranslation, Plugin, export_plugin};
use serde_json::{Map, Value, json};

struct Hmp;

impl Plugin for Hmp {
    type Config = serde_json::Value;

    fn new(_: Self::Config) -> Result<Self, String> {
        Ok(Hmp)
    }

    fn translate_hmp(&mut self, line: &str) -> HmpTranslation {
        translate(line)
    }
}

export_plugin!(Hmp);

/// What a table entry makes of a parsed line.
enum Meaning {
    Qmp(&'static str, Value),
    HmpOnly(String),
}

/// A parsed line: flags (`-d`), words, and the raw text after the command name.
struct Line<'a> {
    flags: Vec<char>,
    words: Vec<String>,
    rest: &'a str,
}

impl Line<'_> {
    fn flag(&self, c: char) -> bool {
        self.flags.contains(&c)
    }

    fn word(&self, i: usize, what: &str) -> Result<String, String> {
        self.words
            .get(i)
            .cloned()
            .ok_or_else(|| format!("missing argument: {what}"))
    }

    fn int(&self, i: usize, what: &str) -> Result<i64, String> {
        let text = self.word(i, what)?;
        parse_int(&text).ok_or_else(|| format!("invalid number for {what}: '{text}'"))
    }
}

/// A command: its names (the first is canonical), the flags it takes, and how it maps.
struct Entry {
    names: &'static [&'static str],
    flags: &'static str,
    map: fn(&Line) -> Result<Meaning, String>,
}

fn qmp(name: &'static str, args: Value) -> Result<Meaning, String> {
    Ok(Meaning::Qmp(name, args))
}

fn hmp_only(name: &str) -> Result<Meaning, String> {
    Ok(Meaning::HmpOnly(name.to_string()))
}

/// The commands qmpgate understands, with QEMU's names and aliases.
const COMMANDS: &[Entry] = &[
    Entry {
        names: &["quit", "q"],
        flags: "",
        map: |_| qmp("quit", json!({})),
    },
    Entry {
        names: &["stop", "s"],
        flags: "",
        map: |_| qmp("stop", json!({})),
    },
    Entry {
        names: &["cont", "c"],
        flags: "",
        map: |_| qmp("cont", json!({})),
    },
    Entry {
        names: &["system_reset"],
        flags: "",
        map: |_| qmp("system_reset", json!({})),
    },
    Entry {
        names: &["system_powerdown"],
        flags: "",
        map: |_| qmp("system_powerdown", json!({})),
    },
    Entry {
        names: &["system_wakeup"],
        flags: "",
        map: |_| qmp("system_wakeup", json!({})),
    },
    Entry {
        names: &["nmi"],
        flags: "",
        map: |_| qmp("inject-nmi", json!({})),
    },
    Entry {
        names: &["info"],
        flags: "",
        map: info,
    },
    Entry {
        names: &["migrate"],
        flags: "dbir",
        map: |l| {
            qmp(
                "migrate",
                json!({ "uri": l.word(0, "uri")?, "detach": l.flag('d') }),
            )
        },
    },
    Entry {
        names: &["migrate_incoming"],
        flags: "",
        map: |l| qmp("migrate-incoming", json!({ "uri": l.word(0, "uri")? })),
    },
    Entry {
        names: &["migrate_cancel"],
        flags: "",
        map: |_| qmp("migrate_cancel", json!({})),
    },
    Entry {
        names: &["migrate_set_parameter"],
        flags: "",
        map: |l| {
            let (name, value) = (l.word(0, "parameter")?, l.word(1, "value")?);
            qmp("migrate-set-parameters", json!({ name: value }))
        },
    },
    Entry {
        names: &["dump-guest-memory"],
        flags: "pdzlsw",
        map: |l| {
            qmp(
                "dump-guest-memory",
                json!({ "paging": l.flag('p'), "protocol": format!("file:{}", l.word(0, "filename")?) }),
            )
        },
    },
    Entry {
        names: &["screendump"],
        flags: "",
        map: |l| qmp("screendump", json!({ "filename": l.word(0, "filename")? })),
    },
    Entry {
        names: &["memsave"],
        flags: "",
        map: |l| {
            qmp(
                "memsave",
                json!({ "val": l.int(0, "addr")?, "size": l.int(1, "size")?, "filename": l.word(2, "filename")? }),
            )
        },
    },
    Entry {
        names: &["pmemsave"],
        flags: "",
        map: |l| {
            qmp(
                "pmemsave",
                json!({ "val": l.int(0, "addr")?, "size": l.int(1, "size")?, "filename": l.word(2, "filename")? }),
            )
        },
    },
    Entry {
        names: &["chardev-add"],
        flags: "",
        map: |l| chardev_add("chardev-add", l.rest),
    },
    Entry {
        names: &["chardev-change"],
        flags: "",
        map: |l| {
            let (id, spec) = l
                .rest
                .trim()
                .split_once(char::is_whitespace)
                .ok_or("missing argument: args")?;
            let Meaning::Qmp(_, mut args) =
                chardev_add("chardev-change", &format!("{},id={id}", spec.trim()))?
            else {
                unreachable!()
            };
            args["id"] = Value::from(id);
            qmp("chardev-change", args)
        },
    },
    Entry {
        names: &["chardev-remove"],
        flags: "",
        map: |l| qmp("chardev-remove", json!({ "id": l.word(0, "id")? })),
    },
    Entry {
        names: &["chardev-send-break"],
        flags: "",
        map: |l| qmp("chardev-send-break", json!({ "id": l.word(0, "id")? })),
    },
    Entry {
        names: &["device_add"],
        flags: "",
        map: |l| qmp("device_add", opts(l.rest, "driver")?),
    },
    Entry {
        names: &["device_del"],
        flags: "",
        map: |l| qmp("device_del", json!({ "id": l.word(0, "id")? })),
    },
    Entry {
        names: &["object_add"],
        flags: "",
        map: |l| qmp("object-add", opts(l.rest, "qom-type")?),
    },
    Entry {
        names: &["object_del"],
        flags: "",
        map: |l| qmp("object-del", json!({ "id": l.word(0, "id")? })),
    },
    Entry {
        names: &["netdev_add"],
        flags: "",
        map: |l| qmp("netdev_add", opts(l.rest, "type")?),
    },
    Entry {
        names: &["netdev_del"],
        flags: "",
        map: |l| qmp("netdev_del", json!({ "id": l.word(0, "id")? })),
    },
    Entry {
        names: &["getfd"],
        flags: "",
        map: |l| qmp("getfd", json!({ "fdname": l.word(0, "fdname")? })),
    },
    Entry {
        names: &["closefd"],
        flags: "",
        map: |l| qmp("closefd", json!({ "fdname": l.word(0, "fdname")? })),
    },
    Entry {
        names: &["add_client"],
        flags: "",
        map: |l| {
            qmp(
                "add_client",
                json!({ "protocol": l.word(0, "protocol")?, "fdname": l.word(1, "fdname")? }),
            )
        },
    },
    Entry {
        names: &["balloon"],
        flags: "",
        map: |l| qmp("balloon", json!({ "value": l.int(0, "target")? << 20 })),
    },
    Entry {
        names: &["set_link"],
        flags: "",
        map: |l| {
            qmp(
                "set_link",
                json!({ "name": l.word(0, "name")?, "up": on_off(&l.word(1, "up")?)? }),
            )
        },
    },
    Entry {
        names: &["block_resize"],
        flags: "",
        map: |l| {
            qmp(
                "block_resize",
                json!({ "device": l.word(0, "device")?, "size": parse_size(&l.word(1, "size")?)? }),
            )
        },
    },
    Entry {
        names: &["eject"],
        flags: "f",
        map: |l| {
            qmp(
                "eject",
                json!({ "device": l.word(0, "device")?, "force": l.flag('f') }),
            )
        },
    },
    Entry {
        names: &["change"],
        flags: "",
        map: |l| {
            qmp(
                "blockdev-change-medium",
                json!({ "device": l.word(0, "device")?, "filename": l.word(1, "target")? }),
            )
        },
    },
    Entry {
        names: &["snapshot_blkdev"],
        flags: "n",
        map: |l| {
            qmp(
                "blockdev-snapshot-sync",
                json!({ "device": l.word(0, "device")?, "snapshot-file": l.word(1, "snapshot-file")? }),
            )
        },
    },
    Entry {
        names: &["drive_mirror"],
        flags: "fn",
        map: |l| {
            qmp(
                "drive-mirror",
                json!({ "device": l.word(0, "device")?, "target": l.word(1, "target")?, "sync": "full" }),
            )
        },
    },
    Entry {
        names: &["drive_backup"],
        flags: "fnc",
        map: |l| {
            qmp(
                "drive-backup",
                json!({ "device": l.word(0, "device")?, "target": l.word(1, "target")?, "sync": "full" }),
            )
        },
    },
    Entry {
        names: &["sendkey"],
        flags: "",
        map: |l| {
            let keys: Vec<Value> = l
                .word(0, "keys")?
                .split('-')
                .map(|k| json!({"type": "qcode", "data": k}))
                .collect();
            qmp("send-key", json!({ "keys": keys }))
        },
    },
    Entry {
        names: &["qom-list"],
        flags: "",
        map: |l| qmp("qom-list", json!({ "path": l.word(0, "path")? })),
    },
    Entry {
        names: &["qom-get"],
        flags: "",
        map: |l| {
            qmp(
                "qom-get",
                json!({ "path": l.word(0, "path")?, "property": l.word(1, "property")? }),
            )
        },
    },
    Entry {
        names: &["qom-set"],
        flags: "j",
        map: |l| {
            qmp(
                "qom-set",
                json!({ "path": l.word(0, "path")?, "property": l.word(1, "property")?, "value": l.word(2, "value")? }),
            )
        },
    },
    Entry {
        names: &["trace-event"],
        flags: "v",
        map: |l| {
            qmp(
                "trace-event-set-state",
                json!({ "name": l.word(0, "name")?, "enable": on_off(&l.word(1, "option")?)? }),
            )
        },
    },
    Entry {
        names: &["watchdog_action"],
        flags: "",
        map: |l| {
            qmp(
                "watchdog-set-action",
                json!({ "action": l.word(0, "action")? }),
            )
        },
    },
    Entry {
        names: &["announce_self"],
        flags: "",
        map: |_| qmp("announce-self", json!({})),
    },
    Entry {
        names: &["exit_preconfig"],
        flags: "",
        map: |_| qmp("x-exit-preconfig", json!({})),
    },
    Entry {
        names: &["dump-skeys"],
        flags: "",
        map: |l| qmp("dump-skeys", json!({ "filename": l.word(0, "filename")? })),
    },
    // Valid HMP with no QMP equivalent: the policy decides on `hmp:NAME`.
    Entry {
        names: &["gdbserver"],
        flags: "",
        map: |_| hmp_only("gdbserver"),
    },
    Entry {
        names: &["o"],
        flags: "",
        map: |_| hmp_only("o"),
    },
    Entry {
        names: &["i"],
        flags: "",
        map: |_| hmp_only("i"),
    },
    Entry {
        names: &["qemu-io"],
        flags: "d",
        map: |_| hmp_only("qemu-io"),
    },
    Entry {
        names: &["gpa2hva"],
        flags: "",
        map: |_| hmp_only("gpa2hva"),
    },
    Entry {
        names: &["gpa2hpa"],
        flags: "",
        map: |_| hmp_only("gpa2hpa"),
    },
    Entry {
        names: &["gva2gpa"],
        flags: "",
        map: |_| hmp_only("gva2gpa"),
    },
    Entry {
        names: &["logfile"],
        flags: "",
        map: |_| hmp_only("logfile"),
    },
    Entry {
        names: &["log"],
        flags: "",
        map: |_| hmp_only("log"),
    },
    Entry {
        names: &["wavcapture"],
        flags: "",
        map: |_| hmp_only("wavcapture"),
    },
    Entry {
        names: &["stopcapture"],
        flags: "",
        map: |_| hmp_only("stopcapture"),
    },
    Entry {
        names: &["drive_add"],
        flags: "n",
        map: |_| hmp_only("drive_add"),
    },
    Entry {
        names: &["drive_del"],
        flags: "",
        map: |_| hmp_only("drive_del"),
    },
    Entry {
        names: &["hostfwd_add"],
        flags: "",
        map: |_| hmp_only("hostfwd_add"),
    },
    Entry {
        names: &["hostfwd_remove"],
        flags: "",
        map: |_| hmp_only("hostfwd_remove"),
    },
    Entry {
        names: &["commit"],
        flags: "",
        map: |_| hmp_only("commit"),
    },
    Entry {
        names: &["savevm"],
        flags: "",
        map: |_| hmp_only("savevm"),
    },
    Entry {
        names: &["loadvm"],
        flags: "",
        map: |_| hmp_only("loadvm"),
    },
    Entry {
        names: &["delvm"],
        flags: "",
        map: |_| hmp_only("delvm"),
    },
    Entry {
        names: &["singlestep"],
        flags: "",
        map: |_| hmp_only("singlestep"),
    },
    Entry {
        names: &["cpu"],
        flags: "",
        map: |_| hmp_only("cpu"),
    },
    Entry {
        names: &["mouse_move"],
        flags: "",
        map: |_| hmp_only("mouse_move"),
    },
    Entry {
        names: &["mouse_button"],
        flags: "",
        map: |_| hmp_only("mouse_button"),
    },
    Entry {
        names: &["x"],
        flags: "",
        map: |_| hmp_only("x"),
    },
    Entry {
        names: &["xp"],
        flags: "",
        map: |_| hmp_only("xp"),
    },
    Entry {
        names: &["print", "p"],
        flags: "",
        map: |_| hmp_only("print"),
    },
    Entry {
        names: &["sum"],
        flags: "",
        map: |_| hmp_only("sum"),
    },
    Entry {
        names: &["help", "?"],
        flags: "",
        map: |_| hmp_only("help"),
    },
];

/// `info X`: the QMP query it corresponds to, or `hmp:info X`.
fn info(line: &Line) -> Result<Meaning, String> {
    let what = line.word(0, "item")?;
    let query = match what.as_str() {
        "status" => "query-status",
        "version" => "query-version",
        "name" => "query-name",
        "uuid" => "query-uuid",
        "kvm" => "query-kvm",
        "chardev" => "query-chardev",
        "block" => "query-block",
        "blockstats" => "query-blockstats",
        "block-jobs" => "query-block-jobs",
        "cpus" => "query-cpus-fast",
        "mice" => "query-mice",
        "migrate" => "query-migrate",
        "migrate_capabilities" => "query-migrate-capabilities",
        "migrate_parameters" => "query-migrate-parameters",
        "balloon" => "query-balloon",
        "pci" => "query-pci",
        "vnc" => "query-vnc",
        "spice" => "query-spice",
        "iothreads" => "query-iothreads",
        "memdev" => "query-memdev",
        "hotpluggable-cpus" => "query-hotpluggable-cpus",
        "dump" => "query-dump",
        "rocker" => "query-rocker",
        "tpm" => "query-tpm",
        "qmp-schema" => "query-qmp-schema",
        "snapshots" | "registers" | "mtree" | "qtree" | "qdm" | "network" | "history" | "irq"
        | "pic" | "tlb" | "mem" | "jit" | "opcount" | "roms" | "usb" | "usbhost" | "profile"
        | "capture" | "numa" | "trace-events" | "cmma" | "ramblock" | "vm-generation-id"
        | "lapic" | "sev" | "sync-profile" | "stats" | "qom-tree" | "replay" | "dirty_rate"
        | "via" | "sgx" | "accel" | "firmware" | "mtree_" | "skeys" | "cryptodev" => {
            return hmp_only(&format!("info {what}"));
        }
        other => return Err(format!("unknown info subcommand: '{other}'")),
    };
    qmp(query, json!({}))
}

/// QemuOpts `backend,key=value,...` to a QAPI-shaped `chardev-add`: the backend
/// type, and every option as data (enough for a policy to see files and logs).
fn chardev_add(name: &'static str, text: &str) -> Result<Meaning, String> {
    let mut options = opts(text, "type")?;
    let map = options.as_object_mut().expect("opts builds an object");
    let id = map.remove("id").ok_or("Parameter 'id' is missing")?;
    let backend = map.remove("type").ok_or("missing argument: backend")?;
    let data = Value::Object(std::mem::take(map));
    qmp(
        name,
        json!({ "id": id, "backend": { "type": backend, "data": data } }),
    )
}

/// Parses QemuOpts (`first,key=value,key=value`, `,,` for a comma). A leading bare
/// word is `implied` (the driver, the object type, the backend). Values stay strings,
/// as QEMU's keyval parser leaves them until it knows the type.
fn opts(text: &str, implied: &str) -> Result<Value, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("missing argument: options".into());
    }
    let mut map = Map::new();
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                parts.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    for (i, part) in parts.into_iter().enumerate() {
        match part.split_once('=') {
            Some((key, value)) => {
                map.insert(key.to_string(), Value::from(value));
            }
            None if i == 0 => {
                map.insert(implied.to_string(), Value::from(part));
            }
            None => {
                map.insert(part, Value::from("on"));
            }
        }
    }
    Ok(Value::Object(map))
}

fn on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(format!("expected 'on' or 'off', got '{other}'")),
    }
}

/// Integers as HMP reads them: decimal, `0x` hex, `0` octal.
fn parse_int(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let value = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        i64::from_str_radix(hex, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        i64::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse().ok()?
    };
    Some(if negative { -value } else { value })
}

/// Sizes as HMP reads them: a number with an optional k/M/G/T suffix (bytes).
fn parse_size(text: &str) -> Result<i64, String> {
    let (digits, shift) = match text.chars().last() {
        Some('k' | 'K') => (&text[..text.len() - 1], 10),
        Some('M') => (&text[..text.len() - 1], 20),
        Some('G') => (&text[..text.len() - 1], 30),
        Some('T') => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    parse_int(digits)
        .map(|n| n << shift)
        .ok_or_else(|| format!("invalid size '{text}'"))
}

/// Splits a line into words as HMP does: whitespace-separated, `"..."` quoting
/// with backslash escapes.
fn tokenize(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated string".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => word.push('\n'),
                        Some('r') => word.push('\r'),
                        Some(c) => word.push(c),
                        None => return Err("unterminated string".into()),
                    },
                    Some(c) => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push(word);
    }
    Ok(words)
}

/// Interprets one HMP command line.
fn translate(line: &str) -> HmpTranslation {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return HmpTranslation::Invalid("empty command line".into());
    }
    let (name, rest) = trimmed
        .split_once(char::is_whitespace)
        .unwrap_or((trimmed, ""));
    let Some(entry) = COMMANDS.iter().find(|e| e.names.contains(&name)) else {
        return HmpTranslation::Invalid(format!("unknown command: '{name}'"));
    };
    let tokens = match tokenize(rest) {
        Ok(tokens) => tokens,
        Err(e) => return HmpTranslation::Invalid(e),
    };
    let mut flags = Vec::new();
    let mut words = Vec::new();
    for token in tokens {
        match token.strip_prefix('-') {
            Some(f) if f.len() == 1 && entry.flags.contains(f) && words.is_empty() => {
                flags.push(f.chars().next().expect("one char"));
            }
            _ => words.push(token),
        }
    }
    let parsed = Line { flags, words, rest };
    match (entry.map)(&parsed) {
        Ok(Meaning::Qmp(name, arguments)) => HmpTranslation::Command(Command {
            name: name.to_string(),
            arguments: arguments.to_string(),
            oob: false,
        }),
        Ok(Meaning::HmpOnly(name)) => HmpTranslation::HmpOnly(name),
        Err(reason) => HmpTranslation::Invalid(format!("{}: {reason}", entry.names[0])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(line: &str) -> (String, Value) {
        match translate(line) {
            HmpTranslation::Command(c) => (c.name, serde_json::from_str(&c.arguments).unwrap()),
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn aliases_map_to_the_same_qmp_command() {
        assert_eq!(command("q").0, "quit");
        assert_eq!(command("quit").0, "quit");
        assert_eq!(command("c").0, "cont");
        assert_eq!(command("  s  ").0, "stop");
        assert_eq!(command("info status").0, "query-status");
    }

    #[test]
    fn arguments_are_read_as_qemu_reads_them() {
        assert_eq!(
            command("migrate -d \"exec:cat > /tmp/x\"").1,
            json!({"uri": "exec:cat > /tmp/x", "detach": true})
        );
        assert_eq!(
            command("memsave 0x1000 4096 /tmp/m").1,
            json!({"val": 4096, "size": 4096, "filename": "/tmp/m"})
        );
        assert_eq!(
            command("chardev-add file,id=f,path=/etc/x,,y,logfile=/tmp/l").1,
            json!({"id": "f", "backend": {"type": "file", "data": {"path": "/etc/x,y", "logfile": "/tmp/l"}}})
        );
        assert_eq!(
            command("object_add memory-backend-file,id=m,mem-path=/dev/shm/x,size=1M").1["mem-path"],
            "/dev/shm/x"
        );
        assert_eq!(command("block_resize drive0 1G").1["size"], 1i64 << 30);
        assert_eq!(
            command("set_link net0 off").1,
            json!({"name": "net0", "up": false})
        );
    }

    #[test]
    fn hmp_only_and_invalid_lines_are_told_apart() {
        assert_eq!(
            translate("gdbserver tcp::1234"),
            HmpTranslation::HmpOnly("gdbserver".into())
        );
        assert_eq!(
            translate("info registers"),
            HmpTranslation::HmpOnly("info registers".into())
        );
        assert!(
            matches!(translate("frobnicate"), HmpTranslation::Invalid(r) if r == "unknown command: 'frobnicate'")
        );
        assert!(
            matches!(translate("memsave 0x1000"), HmpTranslation::Invalid(r) if r == "memsave: missing argument: size")
        );
        assert!(matches!(
            translate("screendump \"unterminated"),
            HmpTranslation::Invalid(_)
        ));
    }
}
