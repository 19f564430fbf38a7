//! QEMU's command line, read for the fds its arguments name: `qmpgate run` passes
//! exactly those inherited fds on to QEMU, under the same numbers, and keeps every
//! other inherited fd to itself.
//!
//! A parent that starts QEMU (libvirt does) opens files and sockets itself and
//! names them by number in QEMU's arguments: `-add-fd set=0,fd=30` (a file serial
//! console, a disk, through `/dev/fdset/0`), `-chardev socket,id=c,fd=31`,
//! `-netdev tap,fd=32,vhostfd=33` or its JSON form `-netdev
//! {"type":"tap","fd":"32"}`, `-incoming fd:34`. This module finds those numbers
//! with QEMU's own readings of the arguments:
//! - `-add-fd`, `-chardev` and `-drive` are QemuOpts strings; `-netdev`, `-nic`,
//!   `-object`, `-device` and `-blockdev` are QemuOpts/keyval strings or, when they
//!   start with `{`, JSON (read with [`crate::qjson`], QEMU's dialect), flattened
//!   here to keyval's dotted keys (`addr.type`);
//! - a key whose last part is `fd` or `vhostfd` names one fd, `fds` or `vhostfds`
//!   a colon-separated list (QEMU's tap options), and a socket address of `type`
//!   `fd` names one with `str` (QAPI's `SocketAddress`, as in `-netdev stream` and
//!   NBD servers; `data.str` in its legacy form);
//! - `-incoming` names one with `fd:N`, or a JSON channel with a socket address.
//!
//! Only decimal numbers count: on the command line QEMU reads nothing else as an
//! fd (`qemu_parse_fd`), and a value it refuses makes QEMU fail on its own. An
//! option's argument is the word after it, as QEMU reads it; a word is taken as an
//! option only where an option can stand, so the value of an option this module
//! does not know (`-append "-add-fd"`) is misread only if it is itself one of the
//! options above, which no real command line does. Not read: `-readconfig` files
//! and `-set`, which can give an option group keys of their own; an fd named only
//! there does not reach QEMU.

use std::os::fd::RawFd;

use serde_json::Value;

/// One fd that QEMU's arguments name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdUse {
    /// The fd number, as QEMU will look it up in its own fd table.
    pub fd: RawFd,
    /// The option that names it, as written (`-add-fd`), for error messages.
    pub option: String,
    /// That option's argument, as written (`set=0,fd=30`).
    pub argument: String,
}

impl std::fmt::Display for FdUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.option, self.argument)
    }
}

/// How QEMU reads the argument of an option that can name fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    /// QemuOpts only (`-add-fd`, `-chardev`, `-drive`).
    Opts,
    /// QemuOpts/keyval, or JSON when it starts with `{`.
    OptsOrJson,
    /// `-incoming`: a URI (`fd:N`) or a JSON migration channel.
    Incoming,
}

/// The options whose arguments can name fds, without their leading dash.
fn syntax(option: &str) -> Option<Syntax> {
    match option {
        "add-fd" | "chardev" | "drive" => Some(Syntax::Opts),
        "netdev" | "nic" | "object" | "device" | "blockdev" => Some(Syntax::OptsOrJson),
        "incoming" => Some(Syntax::Incoming),
        _ => None,
    }
}

/// Every fd that `args` (QEMU's arguments, without the program) name, in order;
/// an fd named twice is listed twice.
pub fn fds_named(args: &[String]) -> Vec<FdUse> {
    let mut uses = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        // QEMU takes `-opt` and `--opt` alike.
        let Some(name) = word.strip_prefix("--").or_else(|| word.strip_prefix('-')) else {
            continue;
        };
        let Some(syntax) = syntax(name) else {
            continue;
        };
        let Some(argument) = words.next() else {
            break;
        };
        let fds = match syntax {
            Syntax::Opts => keyed_fds(&opts_keys(argument)),
            Syntax::OptsOrJson if argument.starts_with('{') => json_fds(argument),
            Syntax::OptsOrJson => keyed_fds(&opts_keys(argument)),
            Syntax::Incoming if argument.starts_with('{') => json_fds(argument),
            Syntax::Incoming => argument
                .strip_prefix("fd:")
                .and_then(number)
                .into_iter()
                .collect(),
        };
        uses.extend(fds.into_iter().map(|fd| FdUse {
            fd,
            option: word.clone(),
            argument: argument.clone(),
        }));
    }
    uses
}

/// A decimal fd number, as `qemu_parse_fd` reads one.
fn number(text: &str) -> Option<RawFd> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A QemuOpts/keyval string's `key=value` pairs (an element without `=`, such as
/// the implied `socket` of `-chardev socket,...`, names no fd and is left out).
fn opts_keys(argument: &str) -> Vec<(String, String)> {
    crate::qemuopts::split(argument)
        .into_iter()
        .filter_map(|part| {
            let (key, value) = part.split_once('=')?;
            Some((key.to_string(), value.to_string()))
        })
        .collect()
}

/// A JSON argument flattened to keyval's dotted keys with its string values (QEMU
/// reads fds only from strings); one that does not parse names no fd (QEMU will
/// refuse it itself).
fn json_fds(argument: &str) -> Vec<RawFd> {
    let mut reader = crate::qjson::Reader::new(argument.len() + 1, 1024);
    let mut inputs = Vec::new();
    reader.push(argument.as_bytes(), &mut inputs);
    let Some(crate::qjson::Input::Value(value)) = inputs.into_iter().next() else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    flatten("", &value, &mut keys);
    keyed_fds(&keys)
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match value {
        Value::Object(members) => {
            for (k, v) in members {
                flatten(&key(k), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&key(&i.to_string()), v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        _ => {}
    }
}

/// The fds that dotted `key=value` pairs name.
fn keyed_fds(keys: &[(String, String)]) -> Vec<RawFd> {
    let value_of = |wanted: &str| {
        keys.iter()
            .find(|(k, _)| k == wanted)
            .map(|(_, v)| v.as_str())
    };
    let mut fds = Vec::new();
    for (key, value) in keys {
        let (parent, last) = match key.rsplit_once('.') {
            Some((parent, last)) => (Some(parent), last),
            None => (None, key.as_str()),
        };
        let join = |k: &str| match parent {
            Some(p) => format!("{p}.{k}"),
            None => k.to_string(),
        };
        match last {
            "fd" | "vhostfd" => fds.extend(number(value)),
            "fds" | "vhostfds" => fds.extend(value.split(':').filter_map(number)),
            // SocketAddress {"type": "fd", "str": N}, and its legacy form
            // {"type": "fd", "data": {"str": N}}.
            "str" => {
                let legacy = match parent {
                    Some("data") => Some("type".to_string()),
                    Some(p) => p.strip_suffix(".data").map(|outer| format!("{outer}.type")),
                    None => None,
                };
                let of_type_fd = |k: &str| value_of(k) == Some("fd");
                if of_type_fd(&join("type")) || legacy.is_some_and(|k| of_type_fd(&k)) {
                    fds.extend(number(value));
                }
            }
            _ => {}
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds(args: &[&str]) -> Vec<RawFd> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        fds_named(&args).into_iter().map(|u| u.fd).collect()
    }

    #[test]
    fn libvirts_file_serial_console_and_sockets() {
        // As libvirt 9.0 starts QEMU 7.2 (the monitor is taken out by the wrapper).
        let args = [
            "-name",
            "guest=vm,debug-threads=on",
            "-add-fd",
            "set=0,fd=30,opaque=serial0-source",
            "-chardev",
            "file,id=charserial0,path=/dev/fdset/0,append=on",
            "-chardev",
            "socket,id=charchannel0,fd=31,server=on,wait=off",
            "-append",
            "console=ttyS0 fd=9",
        ];
        assert_eq!(fds(&args), [30, 31]);
        let uses = fds_named(&args.map(String::from));
        assert_eq!(
            uses[0].to_string(),
            "-add-fd set=0,fd=30,opaque=serial0-source"
        );
    }

    #[test]
    fn tap_and_vhost_fds_in_both_syntaxes() {
        assert_eq!(
            fds(&["-netdev", "tap,id=n0,fds=10:11,vhost=on,vhostfds=12:13"]),
            [10, 11, 12, 13]
        );
        assert_eq!(
            fds(&[
                "-netdev",
                r#"{"type":"tap","fd":"32","vhost":true,"vhostfd":"33","id":"hostnet0"}"#
            ]),
            [32, 33]
        );
        // QEMU's JSON dialect: single quotes.
        assert_eq!(fds(&["--netdev", "{'type':'tap','fd':'7','id':'n'}"]), [7]);
        assert_eq!(fds(&["-nic", "tap,fd=8"]), [8]);
        assert_eq!(
            fds(&[
                "-device",
                r#"{"driver":"vhost-vsock-pci","vhostfd":"40","guest-cid":3}"#
            ]),
            [40]
        );
        assert_eq!(fds(&["-object", "iommufd,id=i0,fd=41"]), [41]);
    }

    #[test]
    fn socket_addresses_of_type_fd() {
        assert_eq!(
            fds(&["-netdev", "stream,id=s,server=off,addr.type=fd,addr.str=20"]),
            [20]
        );
        assert_eq!(
            fds(&[
                "-netdev",
                r#"{"type":"dgram","id":"d","local":{"type":"fd","str":"21"}}"#
            ]),
            [21]
        );
        assert_eq!(
            fds(&[
                "-blockdev",
                r#"{"driver":"nbd","node-name":"n","server":{"type":"fd","str":"22"},"export":"e"}"#
            ]),
            [22]
        );
        // A unix address's `path` is no fd, nor is a `str` of another type.
        assert_eq!(
            fds(&[
                "-netdev",
                "stream,id=s,addr.type=unix,addr.path=/x,addr.str=5"
            ]),
            [] as [RawFd; 0]
        );
    }

    #[test]
    fn incoming_migration_from_an_fd() {
        assert_eq!(fds(&["-incoming", "fd:24"]), [24]);
        assert_eq!(fds(&["-incoming", "defer"]), [] as [RawFd; 0]);
        assert_eq!(
            fds(&[
                "-incoming",
                r#"{"channel-type":"main","addr":{"transport":"socket","type":"fd","str":"25"}}"#
            ]),
            [25]
        );
    }

    #[test]
    fn only_decimal_numbers_in_the_options_that_take_fds_count() {
        assert_eq!(
            fds(&[
                "-chardev",
                "socket,id=c,fd=myname,server=on",
                "-add-fd",
                "fd=-1,set=1",
                "-device",
                r#"{"driver":"vfio-pci","fd":3}"#,
                "-netdev",
                "{not json",
                "-mon",
                "chardev=c,fd=5",
                "-add-fd",
            ]),
            [] as [RawFd; 0]
        );
        // `,,` is a comma inside a value, not a new key.
        assert_eq!(
            fds(&["-chardev", "file,id=f,path=/a,,fd=9"]),
            [] as [RawFd; 0]
        );
    }
}
