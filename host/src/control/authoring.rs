//! `qmpgate plugin test`: a plugin's verdicts, or a whole chain's, over a transcript
//! of commands, HMP lines and events read from stdin, one JSON line each, for plugin
//! authors and for operators trying a policy.

use serde_json::{Value, json};
use thiserror::Error;
use tokio::io::AsyncBufReadExt;

use qmpgate_plugin_host::spec::{Mode, PluginSource, PluginSpec};
use qmpgate_plugin_host::{
    Client, Decision, EventDecision, Limits, Peer, PluginError, Protocol, Runtime, UnixPeer,
    builtin,
};
use qmpgate_protocol::qmp;

/// Why a transcript could not be run.
#[derive(Debug, Error)]
pub enum TranscriptError {
    /// The plugin's configuration file cannot be read or parsed.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// The plugin does not load or start.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Reading the transcript failed.
    #[error("cannot read the transcript from stdin")]
    Stdin(#[source] std::io::Error),
}

/// One plugin to test alone: a built-in's name (`hmp`, `qmp-policy`, `audit`) or a
/// component's path, with its configuration file.
pub fn single(
    plugin: &std::path::Path,
    config: Option<&std::path::Path>,
) -> Result<PluginSpec, TranscriptError> {
    let config: Value = match config {
        None => json!({}),
        Some(file) => super::config::read_plugin_config(file)?,
    };
    let text = plugin.to_str().unwrap_or_default();
    let (name, source) = match builtin::by_name(text) {
        Some(bytes) => (text.to_string(), PluginSource::Builtin(bytes)),
        None => (
            plugin
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("plugin")
                .to_string(),
            PluginSource::File(plugin.to_path_buf()),
        ),
    };
    Ok(PluginSpec {
        name,
        source,
        config,
        limits: Limits::default(),
        mode: Mode::Enforce,
    })
}

/// Runs `specs` as one chain over stdin's transcript, as a client of `listener`
/// with `uid`; exit status 2 if a line was not understood.
pub async fn plugin_test(
    specs: Vec<PluginSpec>,
    listener: &str,
    uid: u32,
) -> Result<u8, TranscriptError> {
    let wasm = Runtime::new(None, None)?;
    let chain = crate::gateway::load_chain(&wasm, &specs)?;
    let client = |protocol| Client {
        id: 1,
        listener: listener.to_string(),
        protocol,
        peer: Peer::Unix(UnixPeer {
            pid: 0,
            uid,
            gid: uid,
        }),
        capabilities: vec![],
        // A transcript has no VM: the plugin sees this upstream id.
        upstream: "test".to_string(),
        tls: None,
    };
    let verdict = |decision: Decision| match decision {
        Decision::Forward(c) => {
            json!({"verdict": "forward", "command": {"execute": c.name, "arguments": c.arguments}})
        }
        Decision::Deny(e) => {
            json!({"verdict": "deny", "error": {"class": e.class, "desc": e.desc}})
        }
        Decision::Reply(v) => json!({"verdict": "reply", "return": v}),
    };
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut number = 0;
    let mut bad = 0;
    while let Some(line) = lines.next_line().await.map_err(TranscriptError::Stdin)? {
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let input: Value = match serde_json::from_str(&line) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                bad += 1;
                println!("{}", json!({"line": number, "error": "not a JSON object"}));
                continue;
            }
        };
        let mut out = if let Some(Value::String(hmp)) = input.get("hmp") {
            verdict(chain.on_hmp(&client(Protocol::Hmp), hmp, None).await)
        } else if let Some(Value::String(event)) = input.get("event") {
            let body = input.as_object().cloned().unwrap_or_default();
            match chain
                .on_event(&client(Protocol::Qmp), event, &body, false)
                .await
            {
                EventDecision::Deliver => json!({"verdict": "deliver"}),
                EventDecision::Drop => json!({"verdict": "drop"}),
                EventDecision::Rewrite(data) => json!({"verdict": "rewrite", "data": data}),
            }
        } else {
            match qmp::parse_request(input.clone(), true) {
                Ok(request) => {
                    let command = qmp::Command {
                        name: request.name,
                        arguments: request.arguments,
                        oob: request.oob,
                    };
                    verdict(chain.on_command(&client(Protocol::Qmp), command).await)
                }
                Err(e) => {
                    bad += 1;
                    json!({"error": e.error.desc})
                }
            }
        };
        out["line"] = Value::from(number);
        out["input"] = input;
        println!("{out}");
    }
    Ok(if bad > 0 { 2 } else { 0 })
}
