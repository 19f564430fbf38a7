//! The audit plugin: one structured record per decision.
//!
//! For every command a client sends, after the chain has decided, it emits one
//! record through the host's `audit` import; the host adds the time, the plugin's
//! name, the upstream and the client (fields a plugin cannot set: its own of those
//! names are dropped) and appends it as a JSON line to `--audit-log` (or logs it).
//!
//! ```json
//! {"time": 1764012345.12, "plugin": "audit", "upstream": "vm1", "client": {"id": 3,
//!  "upstream": "vm1", "listener": "qmp", "protocol": "qmp",
//!  "peer": {"unix": {"pid": 4242, "uid": 1000, "gid": 1000}}, "tls": null},
//!  "command": "screendump", "verdict": "denied", "error": "Command 'screendump' is ..."}
//! ```
//!
//! Configuration: `{"arguments": true}` also records each command's arguments
//! (off by default: they may hold secrets); `{"verdicts": ["denied"]}` records only
//! those verdicts (default: all three, `forwarded`, `denied`, `answered`).

#![forbid(unsafe_code)]

use qmpgate_plugin_sdk::{Client, Command, Decision, HmpLine, Plugin, audit};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Record command arguments too.
    #[serde(default)]
    arguments: bool,
    /// Which verdicts to record.
    #[serde(default = "all_verdicts")]
    verdicts: Vec<String>,
}

fn all_verdicts() -> Vec<String> {
    vec!["forwarded".into(), "denied".into(), "answered".into()]
}

struct Audit(Config);

#[qmpgate_plugin_sdk::plugin]
impl Plugin for Audit {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if let Some(bad) = config.verdicts.iter().find(|v| !all_verdicts().contains(v)) {
            return Err(format!(
                "unknown verdict '{bad}' (expected forwarded, denied or answered)"
            ));
        }
        Ok(Audit(config))
    }

    fn on_decision(
        &mut self,
        _client: &Client,
        command: &Command,
        hmp: Option<&HmpLine>,
        decision: &Decision,
    ) {
        let (verdict, error) = match decision {
            Decision::Forwarded => ("forwarded", None),
            Decision::Denied(e) => ("denied", Some(e.desc.clone())),
            Decision::Answered => ("answered", None),
        };
        if !self.0.verdicts.iter().any(|v| v == verdict) {
            return;
        }
        // The host adds who the client is (`client`, `upstream`): a plugin cannot
        // set those fields.
        let mut record = json!({
            "command": command.name,
            "verdict": verdict,
        });
        if let Some(line) = hmp {
            // What the client typed, and (when it was not refused as unreadable)
            // the line QEMU was sent instead.
            record["hmp"] = Value::from(line.typed.as_str());
            if !line.canonical.is_empty() {
                record["hmp-canonical"] = Value::from(line.canonical.as_str());
            }
        }
        if let Some(error) = error {
            record["error"] = Value::from(error);
        }
        if self.0.arguments {
            record["arguments"] = command.arguments_json();
        }
        audit(&record);
    }
}
