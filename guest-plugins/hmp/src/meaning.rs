//! What a parsed HMP command means, in the terms the policy decides on.
//!
//! - Commands with a QMP equivalent become that QMP command with QMP-shaped
//!   arguments built from the parse (`c` is `cont`, `migrate -d URI` is
//!   `migrate {"uri", "detach"}`, `balloon 512` is `balloon {"value": 512 MiB}`,
//!   `chardev-add` is `{"id", "backend": {"type", "data"}}` with the backend type
//!   resolved as QEMU resolves it). Values that come from QemuOpts or keyval stay
//!   strings, as QEMU keeps them until it knows their type.
//! - Every other command becomes `hmp:NAME` (the primary name; `hmp:info NAME`
//!   for info sub-commands) with the parsed arguments keyed by their `args_type`
//!   names (strings, numbers, booleans; `O` as an object of strings; a `/fmt` as
//!   `{"count", "format", "size"}`).
//!
//! Layout: [`meaning`] dispatches on the primary name; [`info`] maps `info X`;
//! [`chardev_backend`] builds a chardev backend from QemuOpts.

use serde_json::{Map, Value as Json, json};

use crate::opts::Opts;
use crate::parse::{Parsed, Value, size_bytes};

/// The meaning of a line: a command name (QMP, or `hmp:...`) and its arguments.
pub type Meaning = (String, Json);

fn str_arg<'a>(p: &'a Parsed, key: &str) -> Option<&'a str> {
    match p.get(key)? {
        Value::Str(s) | Value::Rest(s) | Value::Option { value: s, .. } => Some(s),
        _ => None,
    }
}

fn int_arg(p: &Parsed, key: &str) -> Option<i64> {
    match p.get(key)? {
        Value::Int { value, .. } | Value::Index { value, .. } => Some(*value),
        _ => None,
    }
}

fn flag(p: &Parsed, key: &str) -> bool {
    matches!(p.get(key), Some(Value::Flag(_)))
}

fn opts_arg<'a>(p: &'a Parsed, key: &str) -> Option<&'a Opts> {
    match p.get(key)? {
        Value::Opts(o) => Some(o),
        _ => None,
    }
}

fn missing(p: &Parsed, what: &str) -> String {
    format!("{}: missing {what}", p.primary)
}

/// The parsed arguments as QEMU's QDict holds them, keyed by `args_type` name.
pub fn typed_arguments(p: &Parsed) -> Json {
    let mut map = Map::new();
    for arg in &p.args {
        map.insert(arg.key.clone(), arg.value.to_json(arg.kind));
    }
    Json::Object(map)
}

fn hmp(p: &Parsed) -> Meaning {
    let name = match &p.sub {
        Some((_, sub)) => format!("hmp:info {sub}"),
        None => format!("hmp:{}", p.primary),
    };
    (name, typed_arguments(p))
}

fn qmp(name: &str, args: Json) -> Result<Meaning, String> {
    Ok((name.to_string(), args))
}

/// What `p` means for the policy.
pub fn meaning(p: &Parsed) -> Result<Meaning, String> {
    if p.sub.is_some() {
        return Ok(info(p));
    }
    let s = |key: &str| str_arg(p, key).ok_or_else(|| missing(p, key));
    match p.primary {
        "quit" | "stop" | "cont" | "system_reset" | "system_powerdown" | "system_wakeup"
        | "migrate_cancel" => qmp(p.primary, json!({})),
        "nmi" => qmp("inject-nmi", json!({})),
        "exit_preconfig" => qmp("x-exit-preconfig", json!({})),
        "migrate" => {
            let mut args = json!({ "uri": s("uri")?, "detach": flag(p, "detach") });
            for key in ["blk", "inc", "resume"] {
                if flag(p, key) {
                    args[key] = json!(true);
                }
            }
            qmp("migrate", args)
        }
        "migrate_incoming" => qmp("migrate-incoming", json!({ "uri": s("uri")? })),
        "migrate_set_parameter" => {
            let mut args = Map::new();
            args.insert(s("parameter")?.to_string(), json!(s("value")?));
            qmp("migrate-set-parameters", Json::Object(args))
        }
        "dump-guest-memory" => {
            let mut args = json!({
                "protocol": format!("file:{}", s("filename")?),
                "paging": flag(p, "paging"),
                "detach": flag(p, "detach"),
            });
            // hmp_dump_guest_memory: -w, -z, -l, -s pick the format; -R the raw
            // variant of the kdump ones.
            let raw = if flag(p, "raw") { "raw-" } else { "" };
            let format = if flag(p, "windmp") {
                Some("win-dmp".to_string())
            } else if flag(p, "zlib") {
                Some(format!("kdump-{raw}zlib"))
            } else if flag(p, "lzo") {
                Some(format!("kdump-{raw}lzo"))
            } else if flag(p, "snappy") {
                Some(format!("kdump-{raw}snappy"))
            } else {
                None
            };
            if let Some(f) = format {
                args["format"] = json!(f);
            }
            for key in ["begin", "length"] {
                if let Some(n) = int_arg(p, key) {
                    args[key] = json!(n);
                }
            }
            qmp("dump-guest-memory", args)
        }
        "screendump" => {
            let mut args = json!({ "filename": s("filename")? });
            for key in ["format", "device"] {
                if let Some(v) = str_arg(p, key) {
                    args[key] = json!(v);
                }
            }
            if let Some(n) = int_arg(p, "head") {
                args["head"] = json!(n);
            }
            qmp("screendump", args)
        }
        "memsave" | "pmemsave" => qmp(
            p.primary,
            json!({
                "val": int_arg(p, "val").ok_or_else(|| missing(p, "val"))?,
                "size": int_arg(p, "size").ok_or_else(|| missing(p, "size"))?,
                "filename": s("filename")?,
            }),
        ),
        "chardev-add" => {
            let opts = opts_arg(p, "args").ok_or_else(|| missing(p, "args"))?;
            let id = opts.get("id").ok_or("chardev-add: no id specified")?;
            qmp(
                "chardev-add",
                json!({ "id": id, "backend": chardev_backend(opts)? }),
            )
        }
        "chardev-change" => {
            let opts = opts_arg(p, "args").ok_or_else(|| missing(p, "args"))?;
            qmp(
                "chardev-change",
                json!({ "id": s("id")?, "backend": chardev_backend(opts)? }),
            )
        }
        "chardev-remove" | "chardev-send-break" | "device_del" | "netdev_del" => {
            qmp(p.primary, json!({ "id": s("id")? }))
        }
        "object_del" => qmp("object-del", json!({ "id": s("id")? })),
        "device_add" => {
            let opts = opts_arg(p, "device").ok_or_else(|| missing(p, "device"))?;
            opts.get("driver")
                .ok_or("device_add: Parameter 'driver' is missing")?;
            qmp("device_add", opts.to_json())
        }
        "netdev_add" => {
            let opts = opts_arg(p, "netdev").ok_or_else(|| missing(p, "netdev"))?;
            opts.get("type")
                .ok_or("netdev_add: Parameter 'type' is missing")?;
            qmp("netdev_add", opts.to_json())
        }
        "object_add" => {
            let opts = opts_arg(p, "object").ok_or_else(|| missing(p, "object"))?;
            opts.get("qom-type")
                .ok_or("object_add: Parameter 'qom-type' is missing")?;
            qmp("object-add", opts.to_json())
        }
        "getfd" | "closefd" => qmp(p.primary, json!({ "fdname": s("fdname")? })),
        "balloon" => {
            let mib = int_arg(p, "value").ok_or_else(|| missing(p, "value"))?;
            qmp("balloon", json!({ "value": mib.wrapping_mul(1 << 20) }))
        }
        "set_link" => match p.get("up") {
            Some(Value::Bool(up)) => qmp("set_link", json!({ "name": s("name")?, "up": up })),
            _ => Err(missing(p, "up")),
        },
        "block_resize" => match p.get("size") {
            Some(Value::Size { number, suffix }) => qmp(
                "block_resize",
                json!({ "device": s("device")?, "size": size_bytes(*number, *suffix) }),
            ),
            _ => Err(missing(p, "size")),
        },
        "eject" => qmp(
            "eject",
            json!({ "device": s("device")?, "force": flag(p, "force") }),
        ),
        "sendkey" => {
            let mut args = json!({ "keys": send_keys(s("keys")?) });
            if let Some(n) = int_arg(p, "hold-time") {
                args["hold-time"] = json!(n);
            }
            qmp("send-key", args)
        }
        "qom-list" if str_arg(p, "path").is_some() => {
            qmp("qom-list", json!({ "path": s("path")? }))
        }
        "qom-get" => qmp(
            "qom-get",
            json!({ "path": s("path")?, "property": s("property")? }),
        ),
        "watchdog_action" => qmp("watchdog-set-action", json!({ "action": s("action")? })),
        _ => Ok(hmp(p)),
    }
}

/// hmp_sendkey: keys separated by `-`, each a QKeyCode name or a `0x` number;
/// `<` stands for `less`.
fn send_keys(keys: &str) -> Json {
    keys.split('-')
        .map(|k| {
            let k = if k == "<" { "less" } else { k };
            match k
                .strip_prefix("0x")
                .and_then(|h| i64::from_str_radix(h, 16).ok())
            {
                Some(n) => json!({ "type": "number", "data": n }),
                None => json!({ "type": "qcode", "data": k }),
            }
        })
        .collect()
}

/// A chardev backend as QAPI shapes it, from QemuOpts: the type resolved as
/// chardev/char.c resolves it, the other options as data (strings).
fn chardev_backend(opts: &Opts) -> Result<Json, String> {
    let typed = opts.get("backend").ok_or("chardev: missing backend")?;
    // 7.2's chardev_alias_table (tty, parport; 10.0 has no aliases and refuses
    // them), and the `memory` class, a subclass of ringbuf whose parse sets
    // CHARDEV_BACKEND_KIND_RINGBUF (chardev/char-ringbuf.c, both versions).
    let kind = match typed {
        "tty" => "serial",
        "parport" => "parallel",
        "memory" => "ringbuf",
        other => other,
    };
    let mut data = Map::new();
    for (k, v) in &opts.pairs {
        if k != "id" {
            data.insert(k.clone(), json!(v));
        }
    }
    Ok(json!({ "type": kind, "data": data }))
}

/// `info X`: the QMP query it shows, or `hmp:info X`.
fn info(p: &Parsed) -> Meaning {
    let Some((_, sub)) = &p.sub else {
        return hmp(p);
    };
    let query = match *sub {
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
        "tpm" => "query-tpm",
        _ => return hmp(p),
    };
    (query.to_string(), json!({}))
}
