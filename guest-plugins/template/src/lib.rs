//! A qmpgate plugin template: refuses the commands listed in its configuration,
//! logs every refusal, and lets everything else through.
//!
//! Configuration (the `config` table of its `[[plugin]]` entry):
//! `{ deny = ["quit", "system_reset"], message = "ask the operator" }`

use qmpgate_plugin_sdk::{Client, Command, HmpLine, Plugin, QmpError, Verdict, info};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Command names to refuse.
    deny: Vec<String>,
    /// Shown to the client on refusal.
    #[serde(default = "default_message")]
    message: String,
}

fn default_message() -> String {
    "not allowed here".into()
}

struct MyPlugin {
    config: Config,
}

#[qmpgate_plugin_sdk::plugin]
impl Plugin for MyPlugin {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.deny.is_empty() {
            return Err("'deny' is empty: this plugin would do nothing".into());
        }
        Ok(MyPlugin { config })
    }

    fn on_command(&mut self, client: &Client, command: &Command, _hmp: Option<&HmpLine>) -> Verdict {
        if self.config.deny.contains(&command.name) {
            info!("refusing {} for client {} on {}", command.name, client.id, client.listener);
            return Verdict::Deny(QmpError::generic(format!("{}: {}", command.name, self.config.message)));
        }
        Verdict::Forward
    }
}
