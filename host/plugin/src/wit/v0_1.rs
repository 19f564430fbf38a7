//! Plugins built for `qmpgate:plugin@0.1.0` (frozen in `wit/deps/plugin-0.1.0`):
//! their bindings, and conversions to and from the newest version's types.
//!
//! What 0.1.0 cannot express is filled in conservatively: such a plugin
//! implements every hook 0.1.0 has; its `hmp-line` is the line QEMU runs (the
//! canonical line, as in 0.1.0 hosts, where only canonical lines ran; the typed
//! line of one refused as unreadable); its client record has no upstream, and its
//! `tls-identity` is the first common name of the certificate (none for a
//! certificate with none); its own HMP readings carry no canonical line, so
//! behind a 0.1.0 HMP interpreter QEMU is sent the line as typed (as 0.1.0 hosts
//! did: such an interpreter must accept only lines QEMU reads as it does).

use serde_json::{Map, Value};

use super::{
    Client, EventVerdict, HmpReading, HmpTranslation, ResponseVerdict, Verdict, WitCommand,
    WitDecision, WitError, WitEvent, WitResponse,
};

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit/deps/plugin-0.1.0/plugin.wit",
        world: "plugin",
        exports: { default: async },
        imports: { "qmpgate:plugin/host.audit": async | trappable },
    });
}

pub(crate) use bindings::exports::qmpgate::plugin::guest;
pub(crate) use bindings::qmpgate::plugin::host::Level;
pub(crate) use bindings::qmpgate::plugin::types as old;
pub(crate) use bindings::qmpgate::plugin::{host as host_imports, types as types_imports};
pub(crate) use bindings::{Plugin, PluginPre};

pub(crate) fn client(client: &Client) -> old::Client {
    old::Client {
        id: client.id,
        listener: client.listener.clone(),
        protocol: match client.protocol {
            super::Protocol::Qmp => old::Protocol::Qmp,
            super::Protocol::Hmp => old::Protocol::Hmp,
        },
        peer: match &client.peer {
            super::Peer::Unix(p) => old::Peer::Unix(old::UnixPeer {
                pid: p.pid,
                uid: p.uid,
                gid: p.gid,
            }),
            super::Peer::Inet(address) => old::Peer::Inet(address.clone()),
            super::Peer::Unknown => old::Peer::Unknown,
        },
        capabilities: client.capabilities.clone(),
        tls_identity: client
            .tls
            .as_ref()
            .and_then(|tls| tls.common_names.first().cloned()),
    }
}

/// The HMP line a 0.1.0 plugin is shown: the one QEMU runs.
pub(crate) fn line(line: &super::HmpLine) -> &str {
    if line.canonical.is_empty() {
        &line.typed
    } else {
        &line.canonical
    }
}

pub(crate) fn command(command: &WitCommand) -> old::Command {
    old::Command {
        name: command.name.clone(),
        arguments: command.arguments.clone(),
        oob: command.oob,
    }
}

fn command_from(command: old::Command) -> WitCommand {
    WitCommand {
        name: command.name,
        arguments: command.arguments,
        oob: command.oob,
    }
}

fn error(error: &WitError) -> old::QmpError {
    old::QmpError {
        class: error.class.clone(),
        desc: error.desc.clone(),
    }
}

pub(crate) fn error_from(error: old::QmpError) -> WitError {
    WitError {
        class: error.class,
        desc: error.desc,
    }
}

pub(crate) fn decision(decision: &WitDecision) -> old::Decision {
    match decision {
        WitDecision::Forwarded => old::Decision::Forwarded,
        WitDecision::Denied(e) => old::Decision::Denied(error(e)),
        WitDecision::Answered => old::Decision::Answered,
    }
}

pub(crate) fn response(response: &WitResponse) -> old::Response {
    match response {
        WitResponse::Ok(text) => old::Response::Ok(text.clone()),
        WitResponse::Error(e) => old::Response::Error(error(e)),
    }
}

fn response_from(response: old::Response) -> WitResponse {
    match response {
        old::Response::Ok(text) => WitResponse::Ok(text),
        old::Response::Error(e) => WitResponse::Error(error_from(e)),
    }
}

pub(crate) fn event(event: &WitEvent) -> old::Event {
    old::Event {
        name: event.name.clone(),
        data: event.data.clone(),
        seconds: event.seconds,
        microseconds: event.microseconds,
    }
}

pub(crate) fn verdict_from(verdict: old::Verdict) -> Verdict {
    match verdict {
        old::Verdict::Forward => Verdict::Forward,
        old::Verdict::Rewrite(c) => Verdict::Rewrite(command_from(c)),
        old::Verdict::Deny(e) => Verdict::Deny(error_from(e)),
        old::Verdict::Reply(text) => Verdict::Reply(text),
    }
}

pub(crate) fn response_verdict_from(verdict: old::ResponseVerdict) -> ResponseVerdict {
    match verdict {
        old::ResponseVerdict::Deliver => ResponseVerdict::Deliver,
        old::ResponseVerdict::Replace(r) => ResponseVerdict::Replace(response_from(r)),
    }
}

pub(crate) fn event_verdict_from(verdict: old::EventVerdict) -> EventVerdict {
    match verdict {
        old::EventVerdict::Deliver => EventVerdict::Deliver,
        old::EventVerdict::Drop => EventVerdict::Drop,
        old::EventVerdict::Rewrite(data) => EventVerdict::Rewrite(data),
    }
}

/// A 0.1.0 reading of `line`: QEMU is sent the line as typed (0.1.0 cannot
/// return a rebuilt one), and `hmp-only(NAME)` becomes the command `hmp:NAME`
/// with the line as its argument.
pub(crate) fn translation_from(translation: old::HmpTranslation, line: &str) -> HmpTranslation {
    let reading = |command| {
        HmpTranslation::Reading(HmpReading {
            command,
            canonical: line.to_string(),
        })
    };
    match translation {
        old::HmpTranslation::NotHandled => HmpTranslation::NotHandled,
        old::HmpTranslation::Command(c) => reading(command_from(c)),
        old::HmpTranslation::HmpOnly(name) => {
            let mut arguments = Map::new();
            arguments.insert("command-line".into(), Value::from(line));
            reading(WitCommand {
                name: format!("hmp:{name}"),
                arguments: Value::Object(arguments).to_string(),
                oob: false,
            })
        }
        old::HmpTranslation::Invalid(reason) => HmpTranslation::Invalid(reason),
    }
}

/// A 0.1.0 log level in the newest version's terms.
pub(crate) fn level(level: Level) -> super::Level {
    match level {
        Level::Trace => super::Level::Trace,
        Level::Debug => super::Level::Debug,
        Level::Info => super::Level::Info,
        Level::Warn => super::Level::Warn,
        Level::Error => super::Level::Error,
    }
}
