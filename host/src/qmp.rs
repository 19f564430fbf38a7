//! QMP message shapes: what clients send, what QEMU sends, and the errors qmpgate
//! answers with.
//!
//! The host checks only a message's *structure* (the checks QEMU makes before it
//! looks a command up), with QEMU's own error messages, so a client sees the same
//! answer through the gateway as it would from QEMU. What a command *means* is for
//! the plugins.
//!
//! Layout: [`Request`] / [`parse_request`] for client input, [`Upstream`] /
//! [`parse_upstream`] for QEMU's output, [`QmpError`] and the `*_response` helpers
//! for what goes back to clients.

use serde_json::{Map, Value, json};

/// QMP error classes qmpgate uses (QEMU's `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Almost every error.
    GenericError,
    /// The command does not exist, or is not available in this protocol phase.
    CommandNotFound,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// An error reply: `{"error": {"class": ..., "desc": ...}, "id": ...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpError {
    /// A QMP error class name; plugins may use any, so this is a string.
    pub class: String,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class: class.as_str().to_string(),
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::GenericError, desc)
    }
}

/// A client's command, structurally valid.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The client's `id`, any JSON value, echoed verbatim on the reply.
    pub id: Option<Value>,
    /// `execute` or `exec-oob`.
    pub name: String,
    /// `arguments`, or an empty object.
    pub arguments: Map<String, Value>,
    /// Sent as `exec-oob`.
    pub oob: bool,
}

/// Why a client message was refused before any plugin saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    /// The message's `id` when it had one; parse errors and non-objects have none.
    pub id: Option<Value>,
    /// What the client is told.
    pub error: QmpError,
}

impl RequestError {
    fn without_id(desc: impl Into<String>) -> Self {
        RequestError {
            id: None,
            error: QmpError::generic(desc),
        }
    }
}

/// Parses one framed client message with QEMU's structural checks and messages.
/// `allow_oob` is whether the client negotiated the `oob` capability: without it,
/// `exec-oob` is an unexpected member, as in QEMU.
pub fn parse_request(bytes: &[u8], allow_oob: bool) -> Result<Request, RequestError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        let desc = if e.is_eof() || e.classify() == serde_json::error::Category::Syntax {
            format!("JSON parse error, {}", describe_json_error(&e))
        } else {
            format!("JSON parse error, {e}")
        };
        RequestError::without_id(desc)
    })?;
    // serde_json keeps the last of repeated keys; QEMU's parser refuses the whole
    // input, so a policy can never judge one reading while QEMU sees another.
    if crate::json_keys::find_duplicate_key(bytes).is_some() {
        return Err(RequestError::without_id(
            crate::json_keys::DUPLICATE_KEY_DESC,
        ));
    }
    let Value::Object(mut object) = value else {
        return Err(RequestError::without_id("QMP input must be a JSON object"));
    };
    let id = object.remove("id");
    let fail = |desc: String| RequestError {
        id: id.clone(),
        error: QmpError::generic(desc),
    };

    let mut exec: Option<(String, bool)> = None;
    let mut arguments = Map::new();
    for (key, value) in object {
        let oob = match key.as_str() {
            "execute" => false,
            "exec-oob" if allow_oob => true,
            "arguments" => {
                let Value::Object(map) = value else {
                    return Err(fail(
                        "QMP input member 'arguments' must be an object".into(),
                    ));
                };
                arguments = map;
                continue;
            }
            _ => return Err(fail(format!("QMP input member '{key}' is unexpected"))),
        };
        let Value::String(name) = value else {
            return Err(fail(format!("QMP input member '{key}' must be a string")));
        };
        if let Some((_, other_oob)) = &exec {
            let other = if *other_oob { "exec-oob" } else { "execute" };
            return Err(fail(format!(
                "QMP input member '{key}' clashes with '{other}'"
            )));
        }
        exec = Some((name, oob));
    }
    let Some((name, oob)) = exec else {
        return Err(fail("QMP input lacks member 'execute'".into()));
    };
    Ok(Request {
        id,
        name,
        arguments,
        oob,
    })
}

/// serde_json's messages name Rust-side expectations; reduce them to the kind of
/// phrase QEMU uses ("expecting value") plus the position, which helps a human.
fn describe_json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let what = text.split(" at line").next().unwrap_or(&text);
    let what = match what {
        "expected value" => "expecting value",
        "EOF while parsing a value" | "EOF while parsing an object" => "unexpected end of input",
        other => other,
    };
    format!("{what} (line {} column {})", e.line(), e.column())
}

/// What QEMU sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// `{"QMP": {"version": ..., "capabilities": [...]}}`
    Greeting {
        /// The `version` object, passed to clients in their own greetings.
        version: Value,
        /// Capabilities QEMU offers (e.g. `oob`).
        capabilities: Vec<String>,
    },
    /// A reply to a command: the whole object (with `return` or `error`).
    Reply {
        /// The `id` the gateway put on the command; `None` for QEMU's id-less
        /// errors (which mean the gateway itself sent something malformed).
        id: Option<Value>,
        /// The reply object without `id`.
        body: Map<String, Value>,
    },
    /// An event: the whole object.
    Event {
        /// The event name, e.g. `STOP`.
        name: String,
        /// The whole event object (`event`, `data`, `timestamp`).
        body: Map<String, Value>,
    },
    /// Anything else (newer QEMU, or garbage): logged and dropped.
    Unknown(Value),
}

/// Classifies one framed message from QEMU.
pub fn parse_upstream(bytes: &[u8]) -> Result<Upstream, serde_json::Error> {
    let value: Value = serde_json::from_slice(bytes)?;
    let Value::Object(mut object) = value else {
        return Ok(Upstream::Unknown(value));
    };
    if let Some(Value::Object(qmp)) = object.get("QMP") {
        let version = qmp.get("version").cloned().unwrap_or(Value::Null);
        let capabilities = match qmp.get("capabilities") {
            Some(Value::Array(caps)) => caps
                .iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        return Ok(Upstream::Greeting {
            version,
            capabilities,
        });
    }
    if object.contains_key("return") || object.contains_key("error") {
        let id = object.remove("id");
        return Ok(Upstream::Reply { id, body: object });
    }
    if let Some(Value::String(name)) = object.get("event") {
        let name = name.clone();
        return Ok(Upstream::Event { name, body: object });
    }
    Ok(Upstream::Unknown(Value::Object(object)))
}

/// Serializes a message for the wire, with QEMU's `\r\n` line ending.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).expect("serializing a Value cannot fail");
    bytes.extend_from_slice(b"\r\n");
    bytes
}

/// `{"return": value, "id": id}`.
pub fn return_response(value: Value, id: Option<Value>) -> Value {
    with_id(json!({ "return": value }), id)
}

/// `{"error": {"class": ..., "desc": ...}, "id": id}`.
pub fn error_response(error: &QmpError, id: Option<Value>) -> Value {
    with_id(
        json!({ "error": { "class": error.class, "desc": error.desc } }),
        id,
    )
}

/// Puts `id` last, as QEMU does, when there is one.
pub fn with_id(mut value: Value, id: Option<Value>) -> Value {
    if let (Some(id), Value::Object(map)) = (id, &mut value) {
        map.insert("id".into(), id);
    }
    value
}

/// The greeting a client gets: QEMU's version, qmpgate's capabilities.
pub fn greeting(version: &Value, capabilities: &[String]) -> Value {
    json!({ "QMP": { "version": version, "capabilities": capabilities } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(bytes: &str, oob: bool) -> (Option<Value>, String) {
        let e = parse_request(bytes.as_bytes(), oob).unwrap_err();
        (e.id, e.error.desc)
    }

    #[test]
    fn parses_commands_with_any_id() {
        let r = parse_request(br#"{"execute":"query-status","id":{"a":[1]}}"#, false).unwrap();
        assert_eq!(r.name, "query-status");
        assert_eq!(r.id, Some(json!({"a":[1]})));
        assert!(r.arguments.is_empty());
        assert!(!r.oob);
    }

    #[test]
    fn structural_errors_use_qemus_messages() {
        assert_eq!(
            desc("[1]", false),
            (None, "QMP input must be a JSON object".into())
        );
        assert_eq!(
            desc(r#"{"id": 5}"#, false),
            (Some(json!(5)), "QMP input lacks member 'execute'".into())
        );
        assert_eq!(
            desc(r#"{"execute": 1}"#, false).1,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(r#"{"execute": "a", "arguments": []}"#, false).1,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(r#"{"execute": "a", "foo": 1}"#, false).1,
            "QMP input member 'foo' is unexpected"
        );
        assert_eq!(
            desc(r#"{"exec-oob": "a"}"#, false).1,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            desc(r#"{"execute": "a", "exec-oob": "b"}"#, true).1,
            "QMP input member 'exec-oob' clashes with 'execute'"
        );
    }

    #[test]
    fn duplicate_keys_are_refused_as_qemu_refuses_them() {
        assert_eq!(
            desc(
                r#"{"execute": "migrate", "arguments": {"uri": "tcp:x", "uri": "exec:true"}}"#,
                false
            ),
            (None, "JSON parse error, duplicate key".to_string())
        );
        assert_eq!(
            desc(r#"{"execute": "stop", "execute": "quit"}"#, false),
            (None, "JSON parse error, duplicate key".to_string())
        );
    }

    #[test]
    fn parse_errors_carry_no_id() {
        let (id, desc) = desc(r#"{"execute": , "id": 1}"#, false);
        assert_eq!(id, None);
        assert!(
            desc.starts_with("JSON parse error, expecting value"),
            "{desc}"
        );
    }

    #[test]
    fn classifies_upstream_messages() {
        let g = parse_upstream(
            br#"{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        assert_eq!(
            g,
            Upstream::Greeting {
                version: json!({"qemu": {"major": 7}}),
                capabilities: vec!["oob".into()]
            }
        );
        match parse_upstream(br#"{"return": {}, "id": 7}"#).unwrap() {
            Upstream::Reply { id, body } => {
                assert_eq!(id, Some(json!(7)));
                assert_eq!(Value::Object(body), json!({"return": {}}));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_upstream(br#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#).unwrap(),
            Upstream::Event { name, .. } if name == "STOP"
        ));
    }

    #[test]
    fn error_replies_put_the_id_last_and_end_in_crlf() {
        let bytes = encode(&error_response(&QmpError::generic("no"), Some(json!("x"))));
        assert_eq!(
            bytes,
            b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"no\"},\"id\":\"x\"}\r\n"
        );
    }
}
