//! QAPI's `chardev-add` form: its members' JSON types checked, then turned into
//! the keys a QemuOpts spec would give, for the one reader of keys.

use serde_json::{Map, Value};

use super::ChardevSpec;

impl ChardevSpec {
    /// Reads QAPI's `chardev-add` (`{"id": ..., "backend": {"type": "socket",
    /// "data": {...}}}`, as on the control monitor): the members' JSON types are
    /// checked here, then the spec means what the same keys mean in a QemuOpts
    /// spec given at run time ([`ChardevSpec::parse_runtime`]): one reader of
    /// the keys for both forms. qmpgate's own members (`upstream`, `profile`,
    /// `plugins`, `perm`, `owner`, `group`, `uids`, `gids`, `fds`, `timeout-ms`)
    /// sit beside QEMU's in `data`; members qmpgate has no use for (`nodelay`,
    /// `logfile`, ...) are ignored.
    pub fn from_qapi(id: &str, backend: &Value) -> Result<Self, String> {
        let kind = backend.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "socket" {
            return Err(format!(
                "chardev backend '{kind}' is not supported by qmpgate (only 'socket')"
            ));
        }
        let empty = Map::new();
        let data = backend
            .get("data")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let mut pairs = vec![("id".to_string(), id.to_string())];
        let mut pair = |key: &str, value: String| pairs.push((key.to_string(), value));
        let wrong = |key: &str, expected: &str| {
            format!("Invalid parameter type for '{key}', expected: {expected}")
        };

        let addr = data
            .get("addr")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let addr_data = addr
            .get("data")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let field = |k: &str| match addr_data.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) if n.is_u64() => Ok(n.to_string()),
            _ => Err(format!("Parameter 'addr.data.{k}' is missing")),
        };
        match addr.get("type").and_then(Value::as_str).unwrap_or("") {
            "unix" => pair("path", field("path")?),
            "inet" => {
                pair("host", field("host")?);
                pair("port", field("port")?);
            }
            "fd" => pair("fd", field("str")?),
            other => return Err(format!("socket address type '{other}' is not supported")),
        }
        for key in ["server", "wait"] {
            match data.get(key) {
                None => {}
                Some(Value::Bool(b)) => pair(key, if *b { "on" } else { "off" }.into()),
                Some(_) => return Err(wrong(key, "boolean")),
            }
        }
        for key in ["reconnect-ms", "reconnect", "timeout-ms"] {
            match data.get(key) {
                None => {}
                Some(Value::Number(n)) if n.is_u64() => pair(key, n.to_string()),
                Some(_) => return Err(wrong(key, "integer")),
            }
        }
        // QEMU's `tls-creds` names a credentials object; qmpgate's is the directory
        // such an object would load (server-cert.pem, server-key.pem, ca-cert.pem).
        for key in [
            "tls-creds",
            "upstream",
            "profile",
            "owner",
            "group",
            "perm",
            "fds",
        ] {
            match data.get(key) {
                None => {}
                Some(Value::String(text)) if !text.is_empty() => pair(key, text.clone()),
                // A uid, gid or mode may be given as a number (a mode in octal digits).
                Some(Value::Number(n))
                    if n.is_u64() && matches!(key, "owner" | "group" | "perm") =>
                {
                    pair(key, n.to_string())
                }
                Some(_) => return Err(wrong(key, "string")),
            }
        }
        for (key, what) in [
            ("plugins", "array of names"),
            ("uids", "array of users"),
            ("gids", "array of groups"),
        ] {
            let Some(items) = data.get(key) else { continue };
            let names: Option<Vec<String>> =
                items.as_array().filter(|a| !a.is_empty()).and_then(|a| {
                    a.iter()
                        .map(|item| match item {
                            Value::String(s) if !s.is_empty() && !s.contains(':') => {
                                Some(s.clone())
                            }
                            Value::Number(n) if n.is_u64() && key != "plugins" => {
                                Some(n.to_string())
                            }
                            _ => None,
                        })
                        .collect()
                });
            match names {
                Some(names) => pair(key, names.join(":")),
                None => return Err(wrong(key, what)),
            }
        }
        ChardevSpec::from_keys(pairs, true, "true")
    }
}
