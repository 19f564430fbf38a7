//! The WIT contract (`wit/`): wasmtime's generated bindings for every version the
//! host supports, and conversions between them and qmpgate's own types.
//!
//! The host works in the types of the newest version (`qmpgate:plugin@0.2.0`);
//! [`v0_1`] adapts plugins built for 0.1.0 to it, so that the chain never needs
//! to know which version a plugin speaks.

use serde_json::Value;

use qmpgate_protocol::qmp::{self, Answer, Command, QmpError};

pub(crate) mod v0_1;

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit/plugin.wit",
        world: "plugin",
        exports: { default: async },
        // An audit record is on disk before the call goes on (see `HostState`).
        imports: { "qmpgate:plugin/host.audit": async | trappable },
    });
}

pub(crate) use bindings::exports::qmpgate::plugin::guest;
pub(crate) use bindings::qmpgate::plugin::host::Level;
pub use bindings::qmpgate::plugin::types::{
    Client, HmpLine, Hooks, Peer, Protocol, TlsIdentity, UnixPeer,
};
pub(crate) use bindings::qmpgate::plugin::types::{
    Command as WitCommand, Decision as WitDecision, Event as WitEvent, EventVerdict, HmpReading,
    HmpTranslation, QmpError as WitError, Response as WitResponse, ResponseVerdict, SchemaLookup,
    Verdict,
};
pub(crate) use bindings::qmpgate::plugin::{host as host_imports, types as types_imports};
pub(crate) use bindings::{Plugin, PluginPre};

/// The contract versions this host supports, newest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.2.0", "0.1.0"];

/// A plugin's contract version, as found in its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V0_1,
    V0_2,
}

impl Version {
    /// The version whose `guest` interface `export` is, if the host supports it.
    pub(crate) fn of_export(export: &str) -> Option<Version> {
        match export {
            "qmpgate:plugin/guest@0.2.0" => Some(Version::V0_2),
            "qmpgate:plugin/guest@0.1.0" => Some(Version::V0_1),
            _ => None,
        }
    }
}

/// A linked plugin of any supported version, ready to instantiate.
pub(crate) enum Pre<T: 'static> {
    V0_1(v0_1::PluginPre<T>),
    V0_2(PluginPre<T>),
}

impl<T: 'static> Clone for Pre<T> {
    fn clone(&self) -> Self {
        match self {
            Pre::V0_1(pre) => Pre::V0_1(pre.clone()),
            Pre::V0_2(pre) => Pre::V0_2(pre.clone()),
        }
    }
}

/// An instance's exports, of whichever version it speaks.
pub(crate) enum Exports {
    V0_1(v0_1::Plugin),
    V0_2(Plugin),
}

impl Exports {
    /// Its hooks, called in the newest version's types.
    pub(crate) fn guest(&self) -> Guest<'_> {
        match self {
            Exports::V0_1(plugin) => Guest::V0_1(plugin.qmpgate_plugin_guest()),
            Exports::V0_2(plugin) => Guest::V0_2(plugin.qmpgate_plugin_guest()),
        }
    }
}

/// A plugin's hooks, called in the newest version's types whatever version the
/// plugin speaks.
pub(crate) enum Guest<'a> {
    V0_1(&'a v0_1::guest::Guest),
    V0_2(&'a guest::Guest),
}

/// One hook call's result, in wasmtime's terms.
type Call<R> = wasmtime::Result<R>;

impl Guest<'_> {
    /// `init`: the hooks the plugin implements (a 0.1.0 plugin implements all).
    pub(crate) async fn call_init<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        config: &str,
    ) -> Call<Result<Hooks, String>> {
        match self {
            // Every hook 0.1.0 has: all but `on-disconnect`.
            Guest::V0_1(g) => Ok(g
                .call_init(store, config)
                .await?
                .map(|()| Hooks::all() & !Hooks::ON_DISCONNECT)),
            Guest::V0_2(g) => g.call_init(store, config).await,
        }
    }

    pub(crate) async fn call_on_connect<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        client: &Client,
    ) -> Call<Result<(), WitError>> {
        match self {
            Guest::V0_1(g) => Ok(g
                .call_on_connect(store, &v0_1::client(client))
                .await?
                .map_err(v0_1::error_from)),
            Guest::V0_2(g) => g.call_on_connect(store, client).await,
        }
    }

    pub(crate) async fn call_on_command<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        client: &Client,
        command: &WitCommand,
        hmp: Option<&HmpLine>,
    ) -> Call<Verdict> {
        match self {
            Guest::V0_1(g) => Ok(v0_1::verdict_from(
                g.call_on_command(
                    store,
                    &v0_1::client(client),
                    &v0_1::command(command),
                    hmp.map(v0_1::line),
                )
                .await?,
            )),
            Guest::V0_2(g) => g.call_on_command(store, client, command, hmp).await,
        }
    }

    pub(crate) async fn call_on_decision<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        client: &Client,
        command: &WitCommand,
        hmp: Option<&HmpLine>,
        decision: &WitDecision,
    ) -> Call<()> {
        match self {
            Guest::V0_1(g) => {
                g.call_on_decision(
                    store,
                    &v0_1::client(client),
                    &v0_1::command(command),
                    hmp.map(v0_1::line),
                    &v0_1::decision(decision),
                )
                .await
            }
            Guest::V0_2(g) => {
                g.call_on_decision(store, client, command, hmp, decision)
                    .await
            }
        }
    }

    pub(crate) async fn call_on_response<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        client: &Client,
        command: &WitCommand,
        response: &WitResponse,
    ) -> Call<ResponseVerdict> {
        match self {
            Guest::V0_1(g) => Ok(v0_1::response_verdict_from(
                g.call_on_response(
                    store,
                    &v0_1::client(client),
                    &v0_1::command(command),
                    &v0_1::response(response),
                )
                .await?,
            )),
            Guest::V0_2(g) => g.call_on_response(store, client, command, response).await,
        }
    }

    pub(crate) async fn call_on_event<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        client: &Client,
        event: &WitEvent,
    ) -> Call<EventVerdict> {
        match self {
            Guest::V0_1(g) => Ok(v0_1::event_verdict_from(
                g.call_on_event(store, &v0_1::client(client), &v0_1::event(event))
                    .await?,
            )),
            Guest::V0_2(g) => g.call_on_event(store, client, event).await,
        }
    }

    pub(crate) async fn call_on_disconnect<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        client: &Client,
    ) -> Call<()> {
        match self {
            // 0.1.0 has no such hook (and is never said to implement it).
            Guest::V0_1(_) => Ok(()),
            Guest::V0_2(g) => g.call_on_disconnect(store, client).await,
        }
    }

    pub(crate) async fn call_translate_hmp<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        line: &str,
    ) -> Call<HmpTranslation> {
        match self {
            Guest::V0_1(g) => Ok(v0_1::translation_from(
                g.call_translate_hmp(store, line).await?,
                line,
            )),
            Guest::V0_2(g) => g.call_translate_hmp(store, line).await,
        }
    }
}

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
/// uses): id, upstream, listener, protocol, peer and TLS identity.
pub(crate) fn client_json(client: &Client) -> Value {
    let peer = match &client.peer {
        Peer::Unix(p) => serde_json::json!({"unix": {"pid": p.pid, "uid": p.uid, "gid": p.gid}}),
        Peer::Inet(address) => serde_json::json!({"inet": address}),
        Peer::Unknown => Value::Null,
    };
    serde_json::json!({
        "id": client.id,
        "upstream": client.upstream,
        "listener": client.listener,
        "protocol": match client.protocol { Protocol::Qmp => "qmp", Protocol::Hmp => "hmp" },
        "peer": peer,
        "tls": client.tls.as_ref().map(|t| serde_json::json!({
            "subject": t.subject,
            "common-names": t.common_names,
            "subject-alt-names": t.subject_alt_names,
        })),
    })
}
