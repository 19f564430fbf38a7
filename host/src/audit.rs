//! The audit sink: one JSON line per record that a plugin emits with `audit`.
//!
//! Plugins decide *what* to record; the host decides *where*, adds the time, the
//! plugin's name and the upstream (VM) the call was about, which a plugin cannot
//! forge, and writes whole lines so that a crash never leaves half a record.

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

    /// Writes one record. A record that is not a JSON object is kept, as a string,
    /// under `"record"`: an audit trail should not lose what a buggy plugin sent.
    pub fn write(&self, plugin: &str, upstream: Option<&str>, entry: &str) {
        let mut record = Map::new();
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        record.insert("time".into(), Value::from(time.as_secs_f64()));
        record.insert("plugin".into(), Value::from(plugin));
        if let Some(upstream) = upstream {
            record.insert("upstream".into(), Value::from(upstream));
        }
        match serde_json::from_str::<Value>(entry) {
            Ok(Value::Object(fields)) => {
                for (k, v) in fields {
                    record.entry(k).or_insert(v);
                }
            }
            _ => {
                record.insert("record".into(), Value::from(entry));
            }
        }
        let mut line = Value::Object(record).to_string();
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!(plugin, error = %e, "cannot write audit record");
        }
    }
}
