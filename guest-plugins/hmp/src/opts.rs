//! The `key=value,...` grammars QEMU reads inside some HMP arguments, ported from
//! util/qemu-option.c (QemuOpts: `opts_parse`, `opts_parse_id`,
//! `get_opt_name_value`, `get_opt_value`, `qemu_opts_create`; identical in 7.2 and
//! 10.0 but for error texts) and util/keyval.c (`keyval_parse_one`; identical).
//!
//! Which arguments use them: `device_add` and `netdev_add` (`O`, QemuOpts lists
//! "device" and "netdev", implied keys `driver` and `type`), `chardev-add` and
//! `chardev-change` (an `s` argument their handlers parse with QemuOpts list
//! "chardev", implied key `backend`), and `object_add` (an `S` argument parsed with
//! keyval, implied key `qom-type`, or as JSON when it starts with `{`).
//!
//! The canonical form ([`Opts::render`]) and what is refused:
//! - every key at most once (QEMU lets the last repeat win, or for QemuOpts `id`
//!   the first): repeats are refused;
//! - the implied value first and bare (`file,id=c`), never as `backend=file`
//!   elsewhere; it must be a plain name (`[A-Za-z0-9_.-]+`);
//! - every other element `key=value` (QemuOpts reads `key` as `key=on` and
//!   `nokey` as `key=off`; those are read, and written back as `key=on`);
//! - `help` and `?` requests, object_add's JSON form, and keyval's dotted keys are
//!   refused.
//!
//! Layout: [`Opts`] (a parsed list); [`parse_qemu_opts`], [`parse_keyval`];
//! [`read_embedded`] (which command arguments hold which grammar).

use std::collections::HashSet;

use crate::parse::{Parsed, Value};

/// keyval.c: `char key_in_cur[128]`, the longest key fragment keyval accepts.
const KEYVAL_KEY_MAX: usize = 127;

/// The two grammars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grammar {
    QemuOpts,
    Keyval,
}

/// A parsed `key=value,...` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opts {
    pub grammar: Grammar,
    /// The key a bare first element stands for (`backend`, `driver`, `type`,
    /// `qom-type`).
    pub implied_key: &'static str,
    /// The implied key's value, wherever it was given.
    pub implied: Option<String>,
    /// Every other key in the order given (each once), values as strings.
    pub pairs: Vec<(String, String)>,
}

impl Opts {
    /// The value of `key` (the implied key included).
    pub fn get(&self, key: &str) -> Option<&str> {
        if key == self.implied_key {
            return self.implied.as_deref();
        }
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All keys and values as a JSON object of strings (QEMU converts later).
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        if let Some(v) = &self.implied {
            map.insert(self.implied_key.into(), v.clone().into());
        }
        for (k, v) in &self.pairs {
            map.insert(k.clone(), v.clone().into());
        }
        serde_json::Value::Object(map)
    }

    /// The canonical text: implied value bare first, then `key=value` with commas
    /// in values doubled. `Err` when no text reads back the same.
    pub fn render(&self) -> Result<String, String> {
        let mut out = String::new();
        if let Some(v) = &self.implied {
            if !is_plain_name(v) {
                return Err(format!(
                    "{} '{v}' is not a plain name ([A-Za-z0-9_.-])",
                    self.implied_key
                ));
            }
            out.push_str(v);
        }
        for (k, v) in &self.pairs {
            if !is_plain_name(k) {
                return Err(format!("key '{k}' is not a plain name ([A-Za-z0-9_.-])"));
            }
            if !out.is_empty() || self.implied.is_some() {
                out.push(',');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(&v.replace(',', ",,"));
        }
        Ok(out)
    }
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// util/id.c:id_wellformed: a letter, then letters, digits, `-`, `.`, `_`.
fn id_wellformed(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphabetic()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-._".contains(c))
}

/// `is_help_option`.
fn is_help(s: &str) -> bool {
    s == "help" || s == "?"
}

/// `strcspn(s, "=,")`.
fn name_len(s: &[u8]) -> usize {
    s.iter()
        .position(|&b| b == b'=' || b == b',')
        .unwrap_or(s.len())
}

/// `get_opt_value`: up to a single comma, `,,` standing for `,`. Returns the
/// value and the position of the ending comma (or the end).
fn get_opt_value(s: &[u8], mut p: usize) -> (String, usize) {
    let mut value = Vec::new();
    loop {
        let offset = s[p..]
            .iter()
            .position(|&b| b == b',')
            .map_or(s.len(), |i| p + i);
        let doubled = offset < s.len() && s.get(offset + 1) == Some(&b',');
        value.extend_from_slice(&s[p..offset + usize::from(doubled)]);
        if !doubled {
            return (String::from_utf8_lossy(&value).into_owned(), offset);
        }
        p = offset + 2;
    }
}

/// `get_opt_name_value` (without the deprecation warnings): one element.
fn get_opt_name_value(s: &[u8], p: usize, firstname: Option<&str>) -> (String, String, usize) {
    let len = name_len(&s[p..]);
    let (name, value, mut end) = if s.get(p + len) != Some(&b'=') {
        if let Some(first) = firstname {
            let (value, end) = get_opt_value(s, p);
            (first.to_string(), value, end)
        } else {
            let name = String::from_utf8_lossy(&s[p..p + len]).into_owned();
            match name.strip_prefix("no") {
                Some(rest) => (rest.to_string(), "off".to_string(), p + len),
                None => (name, "on".to_string(), p + len),
            }
        }
    } else {
        let name = String::from_utf8_lossy(&s[p..p + len]).into_owned();
        let (value, end) = get_opt_value(s, p + len + 1);
        (name, value, end)
    };
    if s.get(end) == Some(&b',') {
        end += 1;
    }
    (name, value, end)
}

/// QemuOpts `opts_parse(list, params, permit_abbrev = true)`, its elements in order.
/// `accepts_any`: the list has no descriptions (device, netdev), so `help` is an
/// ordinary flag to QEMU; either way it is refused here.
pub fn parse_qemu_opts(
    params: &str,
    implied_key: &'static str,
    accepts_any: bool,
) -> Result<Opts, String> {
    let s = params.as_bytes();
    // opts_parse_id: the first `id` element, read without an implied key.
    let mut id_by_parse_id = None;
    let mut p = 0;
    while p < s.len() {
        let (name, value, next) = get_opt_name_value(s, p, None);
        p = next;
        if name == "id" {
            id_by_parse_id = Some(value);
            break;
        }
    }
    // opts_do_parse, with the implied key for the first element.
    let mut elements = Vec::new();
    let mut p = 0;
    let mut first = Some(implied_key);
    while p < s.len() {
        let bare = s.get(p + name_len(&s[p..])) != Some(&b'=');
        let (name, value, next) = get_opt_name_value(s, p, first);
        if bare && first.is_none() && is_help(&name) {
            return Err(if accepts_any {
                "help requests are not accepted".into()
            } else {
                "help requests are not accepted (QEMU prints help and fails)".into()
            });
        }
        if bare && first.is_some() && is_help(&value) {
            return Err("help requests are not accepted".into());
        }
        first = None;
        p = next;
        elements.push((name, value));
    }
    let id_in_elements = elements
        .iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.clone());
    if id_by_parse_id != id_in_elements {
        return Err("QEMU reads the id from an element that is not id=...".into());
    }
    if let Some(id) = &id_by_parse_id
        && !id_wellformed(id)
    {
        return Err(format!(
            "Parameter 'id' expects an identifier (a letter, then letters, digits, '-', '.', '_'), got '{id}'"
        ));
    }
    collect(Grammar::QemuOpts, implied_key, elements)
}

/// keyval `keyval_parse(params, implied_key)` for flat keys.
pub fn parse_keyval(params: &str, implied_key: &'static str) -> Result<Opts, String> {
    let s = params.as_bytes();
    let mut elements = Vec::new();
    let mut p = 0;
    let mut implied = Some(implied_key);
    while p < s.len() {
        let len = name_len(&s[p..]);
        let key = &s[p..p + len];
        if len > 0 && s.get(p + len) != Some(&b'=') {
            // starts_with_help_option(key) == len
            if key == b"?" || key == b"help" {
                return Err("help requests are not accepted".into());
            }
            if let Some(k) = implied.take() {
                elements.push((k.to_string(), String::from_utf8_lossy(key).into_owned()));
                p += len;
                if s.get(p) == Some(&b',') {
                    p += 1;
                }
                continue;
            }
        }
        implied = None;
        let key = String::from_utf8_lossy(key).into_owned();
        if key.contains('.') {
            return Err(format!("dotted keys ('{key}') are not supported"));
        }
        let b = key.as_bytes();
        let qapi_name = !b.is_empty()
            && b[0].is_ascii_alphabetic()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'));
        if !qapi_name {
            return Err(format!("Invalid parameter '{key}'"));
        }
        if key.len() > KEYVAL_KEY_MAX {
            return Err(format!("Parameter '{key}' is too long"));
        }
        if s.get(p + len) != Some(&b'=') {
            return Err(format!("Expected '=' after parameter '{key}'"));
        }
        p += len + 1;
        let mut value = Vec::new();
        while p < s.len() {
            if s[p] == b',' {
                p += 1;
                if s.get(p) != Some(&b',') {
                    break;
                }
            }
            value.push(s[p]);
            p += 1;
        }
        elements.push((key, String::from_utf8_lossy(&value).into_owned()));
    }
    collect(Grammar::Keyval, implied_key, elements)
}

/// Refuses repeated keys and pulls the implied key out.
fn collect(
    grammar: Grammar,
    implied_key: &'static str,
    elements: Vec<(String, String)>,
) -> Result<Opts, String> {
    let mut seen = HashSet::new();
    let mut opts = Opts {
        grammar,
        implied_key,
        implied: None,
        pairs: Vec::new(),
    };
    for (k, v) in elements {
        if !seen.insert(k.clone()) {
            return Err(format!(
                "'{k}' given more than once (QEMU would keep only one)"
            ));
        }
        if k == implied_key {
            opts.implied = Some(v);
        } else {
            opts.pairs.push((k, v));
        }
    }
    Ok(opts)
}

/// Reads the `s`/`S` arguments that QEMU's handlers parse as QemuOpts or keyval.
pub fn read_embedded(parsed: &mut Parsed) -> Result<(), String> {
    let (key, how) = match (parsed.primary, &parsed.sub) {
        ("chardev-add", None) => ("args", "chardev"),
        ("chardev-change", None) => ("args", "chardev"),
        ("object_add", None) => ("object", "keyval"),
        _ => return Ok(()),
    };
    let Some(arg) = parsed.args.iter_mut().find(|a| a.key == key) else {
        return Ok(());
    };
    let text = match &arg.value {
        Value::Str(s) | Value::Rest(s) => s.clone(),
        _ => return Ok(()),
    };
    let opts = if how == "chardev" {
        // hmp_chardev_add / hmp_chardev_change: qemu_opts_parse_noisily(
        // qemu_find_opts("chardev"), args, true); the list has descriptions.
        let opts = parse_qemu_opts(&text, "backend", false)?;
        if parsed.primary == "chardev-change" && opts.get("id").is_some() {
            return Err("chardev-change: Unexpected 'id' parameter".into());
        }
        opts
    } else {
        // user_creatable_parse_str: JSON when it starts with `{`.
        if text.starts_with('{') {
            return Err(
                "object_add in JSON form is not accepted; write it as qom-type,key=value,..."
                    .into(),
            );
        }
        parse_keyval(&text, "qom-type")?
    };
    arg.value = Value::Opts(opts);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chardev(s: &str) -> Result<Opts, String> {
        parse_qemu_opts(s, "backend", false)
    }

    #[test]
    fn qemu_opts_implied_key_commas_and_flags() {
        let o = chardev("file,id=c,path=/a,,b,logappend,nosignal").unwrap();
        assert_eq!(o.implied.as_deref(), Some("file"));
        assert_eq!(o.get("path"), Some("/a,b"));
        assert_eq!(o.get("logappend"), Some("on"));
        assert_eq!(o.get("signal"), Some("off"));
        assert_eq!(
            o.render().unwrap(),
            "file,id=c,path=/a,,b,logappend=on,signal=off"
        );
        // The implied value may contain doubled commas for QEMU, but is not canonical.
        let o = chardev("fi,,le,id=c").unwrap();
        assert_eq!(o.implied.as_deref(), Some("fi,le"));
        assert!(o.render().is_err());
    }

    #[test]
    fn repeats_and_explicit_implied_keys() {
        // QemuOpts: the implied key is `backend`, and the last repeat wins.
        assert!(
            chardev("null,id=c,backend=file,path=/x")
                .unwrap_err()
                .contains("more than once")
        );
        assert!(
            chardev("file,id=c,path=/a,path=/b")
                .unwrap_err()
                .contains("more than once")
        );
        assert!(
            chardev("file,id=a,id=b")
                .unwrap_err()
                .contains("more than once")
        );
        let o = chardev("id=c,backend=file").unwrap();
        assert_eq!(o.implied.as_deref(), Some("file"));
        assert_eq!(o.render().unwrap(), "file,id=c");
    }

    #[test]
    fn qemu_opts_ids_and_help() {
        assert!(chardev("file,id=1x").unwrap_err().contains("identifier"));
        assert!(chardev("help").is_err());
        assert!(chardev("file,help").is_err());
        assert!(parse_qemu_opts("e1000,?", "driver", true).is_err());
        // opts_parse_id reads a bare first `id` as the flag id=on.
        assert!(chardev("id,path=/x").is_err());
    }

    #[test]
    fn keyval_grammar() {
        let o = parse_keyval("secret,id=s0,data=a,,b", "qom-type").unwrap();
        assert_eq!(o.implied.as_deref(), Some("secret"));
        assert_eq!(o.get("data"), Some("a,b"));
        assert!(
            parse_keyval("secret,id", "qom-type")
                .unwrap_err()
                .contains("Expected '='")
        );
        assert!(
            parse_keyval("secret,a.b=1", "qom-type")
                .unwrap_err()
                .contains("dotted")
        );
        assert!(parse_keyval("secret,id=a,id=b", "qom-type").is_err());
        assert!(parse_keyval("secret,qom-type=x", "qom-type").is_err());
        assert!(parse_keyval("help", "qom-type").is_err());
    }
}
