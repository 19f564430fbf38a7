//! The audit sink: one JSON line per record that a plugin emits with `audit`.
//!
//! Plugins decide *what* to record; the host decides *where*, adds the time, the
//! plugin's name, the upstream (VM) and the client the call was about, which a
//! plugin cannot forge (its own fields of those names are dropped), and writes
//! whole lines so that a crash never leaves half a record.

use qmpgate_protocol::lock;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct AuditSink {
    file: Mutex<File>,
}

impl AuditSink {
    /// Opens (creating, 0600) the file for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(AuditSink {
            file: Mutex::new(file),
        })
    }

    /// Appends one record (a line from [`record`]).
    pub fn write(&self, plugin: &str, record: &str) {
        let mut line = String::with_capacity(record.len() + 1);
        line.push_str(record);
        line.push('\n');
        let mut file = lock::mutex(&self.file);
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!(plugin, error = %e, "cannot write audit record");
        }
    }
}

/// The fields the host owns in every record, whatever a plugin puts there.
pub const HOST_FIELDS: [&str; 4] = ["time", "plugin", "upstream", "client"];

/// One audit record as a JSON object on one line: the host's fields first (`time`,
/// `plugin`, `upstream` and `client` (the client as the host knows it), `null` when
/// the call was about none, as in a plugin's `init`), then the plugin's own, minus
/// any that claim to be the host's.
/// An entry that is not a JSON object is kept, as a string, under `"record"`: an
/// audit trail should not lose what a buggy plugin sent.
pub fn record(plugin: &str, upstream: Option<&str>, client: Option<Value>, entry: &str) -> String {
    let mut record = Map::new();
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    record.insert("time".into(), Value::from(time.as_secs_f64()));
    record.insert("plugin".into(), Value::from(plugin));
    record.insert("upstream".into(), upstream.map_or(Value::Null, Value::from));
    record.insert("client".into(), client.unwrap_or(Value::Null));
    match serde_json::from_str::<Value>(entry) {
        Ok(Value::Object(fields)) => {
            for (k, v) in fields {
                if !HOST_FIELDS.contains(&k.as_str()) {
                    record.insert(k, v);
                }
            }
        }
        _ => {
            record.insert("record".into(), Value::from(entry));
        }
    }
    Value::Object(record).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_owns_its_fields() {
        let line = record(
            "audit",
            None,
            None,
            r#"{"upstream": "FORGED-VM", "client": 7, "plugin": "x", "time": 0, "command": "stop"}"#,
        );
        let fields: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(fields["upstream"], Value::Null);
        assert_eq!(fields["client"], Value::Null);
        assert_eq!(fields["plugin"], "audit");
        assert!(fields["time"].as_f64().unwrap() > 1e9);
        assert_eq!(fields["command"], "stop");
        let line = record("audit", Some("vm1"), Some(Value::from(3)), "not json\n");
        assert!(
            line.contains(r#""upstream":"vm1","client":3,"record":"not json\n""#),
            "{line}"
        );
    }
}
