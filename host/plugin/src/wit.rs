//! The WIT contract (`qmpgate:plugin@0.1.0`, `wit/`): wasmtime's generated
//! bindings, and conversions between them and qmpgate's own types.

use serde_json::Value;

use qmpgate_protocol::qmp::{self, Answer, Command, QmpError};

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "plugin",
    });
}

pub(crate) use bindings::exports::qmpgate::plugin::guest;
pub(crate) use bindings::qmpgate::plugin::host::Level;
pub use bindings::qmpgate::plugin::types::{Client, Peer, Protocol, UnixPeer};
pub(crate) use bindings::qmpgate::plugin::types::{
    Command as WitCommand, Decision as WitDecision, Event as WitEvent, EventVerdict,
    HmpTranslation, QmpError as WitError, Response as WitResponse, ResponseVerdict, Verdict,
};
pub(crate) use bindings::qmpgate::plugin::{host as host_imports, types as types_imports};
pub(crate) use bindings::{Plugin, PluginPre};

/// WIT conversions of [`Command`].
pub(crate) fn command_to_wit(command: &Command) -> WitCommand {
    WitCommand {
        name: command.name.clone(),
        arguments: Value::Object(command.arguments.clone()).to_string(),
        oob: command.oob,
    }
}

/// A command a plugin returned; `Err` says why it is not one (its arguments are
/// not a JSON object).
pub(crate) fn command_from_wit(command: WitCommand) -> Result<Command, String> {
    let arguments = match serde_json::from_str(&command.arguments) {
        Ok(Value::Object(map)) => map,
        _ => {
            return Err(format!(
                "rewritten arguments of '{}' are not a JSON object",
                command.name
            ));
        }
    };
    Ok(Command {
        name: command.name,
        arguments,
        oob: command.oob,
    })
}

/// An error as the reply a client gets.
pub(crate) fn error_answer(error: &QmpError) -> Answer {
    match qmp::error_response(error, None) {
        Value::Object(object) => Answer::Object(object),
        _ => unreachable!("error_response builds an object"),
    }
}

/// The client as audit records show it (the shape the built-in audit plugin
/// uses): id, listener, protocol, peer and TLS identity.
pub(crate) fn client_json(client: &Client) -> Value {
    let peer = match &client.peer {
        Peer::Unix(p) => serde_json::json!({"unix": {"pid": p.pid, "uid": p.uid, "gid": p.gid}}),
        Peer::Inet(address) => serde_json::json!({"inet": address}),
        Peer::Unknown => Value::Null,
    };
    serde_json::json!({
        "id": client.id,
        "listener": client.listener,
        "protocol": match client.protocol { Protocol::Qmp => "qmp", Protocol::Hmp => "hmp" },
        "peer": peer,
        "tls-identity": client.tls_identity,
    })
}
