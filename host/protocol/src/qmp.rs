//! QMP message shapes: what clients send, what QEMU sends, and the errors qmpgate
//! answers with.
//!
//! The host checks only a message's *structure* (the checks QEMU makes before it
//! looks a command up), with QEMU's own error messages, so a client sees the same
//! answer through the gateway as it would from QEMU. What a command *means* is for
//! the plugins.
//!
//! Layout: [`Request`] / [`parse_request`] for client input, [`Command`] for what
//! goes to QEMU, [`QemuMessage`] /
//! [`parse_qemu_message`] for QEMU's output, [`QmpError`] and the `*_response` helpers
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

/// A command on its way to QEMU: what the plugin chain judged and the upstream
/// link sends (with an id of the link's own), its arguments as a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The command name.
    pub name: String,
    /// The arguments object.
    pub arguments: Map<String, Value>,
    /// `exec-oob`.
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

/// Checks one client message (as [`crate::qjson::Reader`] read it) with QEMU's
/// structural checks and messages, in QEMU's order (its members as QEMU's hash
/// table lists them, so that of two faults the client hears of the one QEMU
/// names). `allow_oob` is whether the client negotiated the `oob` capability:
/// without it, `exec-oob` is an unexpected member, as in QEMU.
pub fn parse_request(value: Value, allow_oob: bool) -> Result<Request, RequestError> {
    let Value::Object(mut object) = value else {
        return Err(RequestError::without_id("QMP input must be a JSON object"));
    };
    let id = object.get("id").cloned();
    let fail = |desc: String| RequestError {
        id: id.clone(),
        error: QmpError::generic(desc),
    };

    let mut exec: Option<(&str, bool)> = None;
    for key in crate::qjson::qdict_order(&object) {
        let value = &object[key.as_str()];
        let oob = match key.as_str() {
            "execute" => false,
            "exec-oob" if allow_oob => true,
            "arguments" if value.is_object() => continue,
            "arguments" => {
                return Err(fail(
                    "QMP input member 'arguments' must be an object".into(),
                ));
            }
            "id" => continue,
            _ => return Err(fail(format!("QMP input member '{key}' is unexpected"))),
        };
        if !value.is_string() {
            return Err(fail(format!("QMP input member '{key}' must be a string")));
        }
        if let Some((other, _)) = exec {
            return Err(fail(format!(
                "QMP input member '{key}' clashes with '{other}'"
            )));
        }
        exec = Some((key.as_str(), oob));
    }
    let Some((key, oob)) = exec else {
        return Err(fail("QMP input lacks member 'execute'".into()));
    };
    let key = key.to_string();
    let Some(Value::String(name)) = object.remove(&key) else {
        unreachable!("checked above")
    };
    let arguments = match object.remove("arguments") {
        Some(Value::Object(arguments)) => arguments,
        _ => Map::new(),
    };
    Ok(Request {
        id,
        name,
        arguments,
        oob,
    })
}

/// What QEMU sends.
#[derive(Debug, Clone, PartialEq)]
pub enum QemuMessage {
    /// `{"QMP": {"version": ..., "capabilities": [...]}}`
    Greeting {
        /// The `version` object, passed to clients in their own greetings.
        version: Value,
        /// Capabilities QEMU offers (e.g. `oob`).
        capabilities: Vec<String>,
    },
    /// A reply to a command (with `return` or `error`).
    Reply {
        /// The `id` the gateway put on the command; `None` for QEMU's id-less
        /// errors (which mean the gateway itself sent something malformed).
        id: Option<Value>,
        /// The reply without `id`.
        body: Answer,
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

/// QEMU's answer to one command, as it travels to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A `return`, as the JSON text QEMU wrote for its value: never a parsed
    /// tree, which costs many times the text (a schema is 200 KB of text and
    /// megabytes as a tree), and written back out as it came.
    Return(Box<str>),
    /// Anything else (an `error`, or an answer qmpgate made): the object, without
    /// `id`.
    Object(Map<String, Value>),
}

impl Answer {
    /// `{"return": value}`, written as QEMU writes it.
    pub fn returning(value: &Value) -> Answer {
        let mut text = Vec::new();
        crate::qjson::write(value, &mut text);
        // The writer emits UTF-8 (non-ASCII as \uXXXX).
        Answer::Return(String::from_utf8_lossy(&text).into())
    }

    /// The answer as an object (`{"return": ...}` or `{"error": ...}`), for the
    /// few that need a tree (small replies: HMP output, negotiation).
    pub fn into_object(self) -> Map<String, Value> {
        match self {
            Answer::Return(text) => {
                let value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let mut object = Map::new();
                object.insert("return".into(), value);
                object
            }
            Answer::Object(object) => object,
        }
    }

    /// Bytes in memory, roughly: what a queued answer costs.
    pub fn size(&self) -> usize {
        match self {
            Answer::Return(text) => text.len(),
            Answer::Object(object) => Value::Object(object.clone()).to_string().len(),
        }
    }

    /// The message for the client, with its `id`, as QEMU writes it (CRLF ended).
    pub fn encode(&self, id: Option<Value>) -> Vec<u8> {
        match self {
            Answer::Return(text) => {
                // QEMU's writer puts `return` before `id` (its dict order).
                let mut bytes = Vec::with_capacity(text.len() + 32);
                bytes.extend_from_slice(b"{\"return\": ");
                bytes.extend_from_slice(text.as_bytes());
                if let Some(id) = id {
                    bytes.extend_from_slice(b", \"id\": ");
                    crate::qjson::write(&id, &mut bytes);
                }
                bytes.extend_from_slice(b"}\r\n");
                bytes
            }
            Answer::Object(object) => encode(&with_id(Value::Object(object.clone()), id)),
        }
    }
}

impl From<Map<String, Value>> for Answer {
    fn from(object: Map<String, Value>) -> Answer {
        Answer::Object(object)
    }
}

/// A reply read without building a tree of its `return` value (nothing but
/// `return` and `id`: anything else goes the long way, so nothing is dropped).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReply<'a> {
    #[serde(rename = "return", borrow)]
    returned: &'a serde_json::value::RawValue,
    #[serde(borrow)]
    id: Option<&'a serde_json::value::RawValue>,
}

/// Classifies one framed message from QEMU.
pub fn parse_qemu_message(bytes: &[u8]) -> Result<QemuMessage, serde_json::Error> {
    // The common case, a `return`, keeps its value as text. (Any other member, or
    // anything unusual, goes the long way below.)
    if let Ok(raw) = serde_json::from_slice::<RawReply<'_>>(bytes) {
        let id = raw
            .id
            .map(|id| serde_json::from_str(id.get()))
            .transpose()?;
        return Ok(QemuMessage::Reply {
            id,
            body: Answer::Return(raw.returned.get().into()),
        });
    }
    let value: Value = serde_json::from_slice(bytes)?;
    let Value::Object(mut object) = value else {
        return Ok(QemuMessage::Unknown(value));
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
        return Ok(QemuMessage::Greeting {
            version,
            capabilities,
        });
    }
    if object.contains_key("return") || object.contains_key("error") {
        let id = object.remove("id");
        return Ok(QemuMessage::Reply {
            id,
            body: Answer::Object(object),
        });
    }
    if let Some(Value::String(name)) = object.get("event") {
        let name = name.clone();
        return Ok(QemuMessage::Event { name, body: object });
    }
    Ok(QemuMessage::Unknown(Value::Object(object)))
}

/// Serializes a message for the wire as QEMU writes it (see [`crate::qjson`]),
/// with QEMU's `\r\n` line ending.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64);
    crate::qjson::write(value, &mut bytes);
    bytes.extend_from_slice(b"\r\n");
    bytes
}

/// As [`encode`], for an object held by reference (an event shared by every
/// client: written without a copy per client).
pub fn encode_object(object: &Map<String, Value>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64);
    crate::qjson::write_object(object, &mut bytes);
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

/// Adds `id`, when there is one (the writer puts it where QEMU does).
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

    /// What a client sending `text` is told: a parse error from the reader, or
    /// a structural error from `parse_request`.
    fn desc(text: &str, oob: bool) -> (Option<Value>, String) {
        let mut reader = crate::qjson::Reader::new(1 << 20, 64);
        let mut inputs = Vec::new();
        reader.push(text.as_bytes(), &mut inputs);
        match inputs.pop().expect("one message") {
            crate::qjson::Input::Value(value) => {
                let e = parse_request(value, oob).unwrap_err();
                (e.id, e.error.desc)
            }
            crate::qjson::Input::Error(desc) => (None, desc),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_commands_with_any_id() {
        let r = parse_request(json!({"execute":"query-status","id":{"a":[1]}}), false).unwrap();
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
            // QEMU looks at "exec-oob" first (its hash bucket comes first).
            "QMP input member 'execute' clashes with 'exec-oob'"
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
        let g = parse_qemu_message(
            br#"{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        assert_eq!(
            g,
            QemuMessage::Greeting {
                version: json!({"qemu": {"major": 7}}),
                capabilities: vec!["oob".into()]
            }
        );
        match parse_qemu_message(br#"{"return": {}, "id": 7}"#).unwrap() {
            QemuMessage::Reply { id, body } => {
                assert_eq!(id, Some(json!(7)));
                assert_eq!(body, Answer::Return("{}".into()));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_qemu_message(br#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#).unwrap(),
            QemuMessage::Event { name, .. } if name == "STOP"
        ));
    }

    /// A `return` travels as QEMU's text and is written back byte for byte, its
    /// id restored where QEMU puts it; anything else takes the object path.
    #[test]
    fn a_return_is_passed_on_as_the_text_qemu_wrote() {
        for text in [
            r#"{"return": {}, "id": 1}"#,
            r#"{"return": {"status": "prelaunch", "singlestep": false, "running": false}, "id": "x"}"#,
            r#"{"return": [1, 2.5, "\u00e9", null, {"a": [true]}], "id": {"k": [1]}}"#,
            r#"{"return": {}}"#,
        ] {
            let QemuMessage::Reply { id, body } = parse_qemu_message(text.as_bytes()).unwrap()
            else {
                panic!("{text}")
            };
            assert!(matches!(body, Answer::Return(_)), "{text}");
            assert_eq!(
                String::from_utf8(body.encode(id)).unwrap(),
                format!("{text}\r\n")
            );
        }
        for text in [
            r#"{"return": {}, "id": 1, "extra": 2}"#,
            r#"{"return": {}, "return": {}}"#,
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "no"}}"#,
        ] {
            match parse_qemu_message(text.as_bytes()) {
                Ok(QemuMessage::Reply { body, .. }) => {
                    assert!(matches!(body, Answer::Object(_)), "{text}")
                }
                other => assert!(other.is_err(), "{text}: {other:?}"),
            }
        }
        assert_eq!(
            Answer::returning(&json!({"b": 1, "a": "é"})).encode(Some(json!(3))),
            encode(&json!({"return": {"b": 1, "a": "é"}, "id": 3}))
        );
    }

    #[test]
    fn replies_are_written_as_qemu_writes_them() {
        let bytes = encode(&error_response(&QmpError::generic("no"), Some(json!("x"))));
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "{\"id\": \"x\", \"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\r\n"
        );
        let bytes = encode(&return_response(json!({}), Some(json!(1))));
        assert_eq!(bytes, b"{\"return\": {}, \"id\": 1}\r\n");
    }

    #[test]
    fn of_two_faults_the_one_qemu_names_first_is_reported() {
        // QEMU checks members in its hash table's order: "id" (bucket 486) after
        // "execute", and an unknown member before or after depending on its bucket.
        assert_eq!(
            desc(r#"{"foo": 1, "execute": 2}"#, false).1,
            "QMP input member 'execute' must be a string"
        );
    }
}
