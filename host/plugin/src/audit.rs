//! The audit sink: one JSON line per record that a plugin emits with `audit`.
//!
//! Plugins decide *what* to record; the host decides *where*, adds the time, the
//! plugin's name, the upstream (VM) and the client the call was about, which a
//! plugin cannot forge (its own fields of those names are dropped), and writes
//! whole lines so that a crash never leaves half a record.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Records queued for the writer at most: past this many (a stalled disk) new
/// records are refused, and the calls that make them fail closed.
const QUEUE: usize = 4096;

/// Work for the writer thread, and who waits for it to be done.
enum Job {
    /// One record, as a whole line.
    Record(String, tokio::sync::oneshot::Sender<std::io::Result<()>>),
    /// Open the path again (after logrotate moved the file away).
    Reopen(std::sync::mpsc::Sender<std::io::Result<()>>),
}

/// An append-only JSON-lines file, written by a thread of its own: hooks run on
/// the runtime's workers, which a slow disk must not hold.
#[derive(Debug)]
pub struct AuditSink {
    queue: SyncSender<Job>,
    /// How long a hook waits for its record to be written.
    wait: std::time::Duration,
}

/// Opens (creating, 0600) `path` for appending.
fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl AuditSink {
    /// Opens (creating, 0600) the file for appending; a hook's record not
    /// written within `wait` fails its call closed ([`crate::AUDIT_WAIT`] by
    /// default).
    pub fn open(path: &Path, wait: std::time::Duration) -> std::io::Result<Self> {
        let mut file = open_append(path)?;
        let path = path.to_path_buf();
        let (queue, jobs) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("qmpgate-audit".into())
            .spawn(move || {
                // Ends when the sink (the sender) is dropped.
                for job in jobs {
                    match job {
                        Job::Record(line, written) => {
                            let _ = written.send(file.write_all(line.as_bytes()));
                        }
                        // On failure the old file is kept: records still go
                        // somewhere, and the caller says why.
                        Job::Reopen(done) => {
                            let _ = done.send(open_append(&path).map(|new| file = new));
                        }
                    }
                }
            })?;
        Ok(AuditSink { queue, wait })
    }

    /// How long a hook waits for its record to be written.
    pub fn wait(&self) -> std::time::Duration {
        self.wait
    }

    /// Opens the file again by its path, after the records queued before; blocks
    /// (call it off the async workers) for at most the sink's wait, as a hook's
    /// record would: a stalled log fails the reopen rather than holding a reload.
    /// On error the old file stays in use.
    pub fn reopen(&self) -> std::io::Result<()> {
        let stalled = || {
            std::io::Error::other(format!(
                "the audit log did not take the records queued before within {}",
                wait_text(self.wait)
            ))
        };
        let (done, result) = std::sync::mpsc::channel();
        self.queue
            .try_send(Job::Reopen(done))
            .map_err(|e| match e {
                TrySendError::Full(_) => stalled(),
                TrySendError::Disconnected(_) => {
                    std::io::Error::other("the audit writer has stopped")
                }
            })?;
        result.recv_timeout(self.wait).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => stalled(),
            std::sync::mpsc::RecvTimeoutError::Disconnected => {
                std::io::Error::other("the audit writer has stopped")
            }
        })?
    }

    /// Queues one record (a line from [`record`]); the receiver says when it has
    /// been written, and how. `None` when the writer is [`QUEUE`] records behind.
    pub fn write(
        &self,
        record: &str,
    ) -> Option<tokio::sync::oneshot::Receiver<std::io::Result<()>>> {
        let mut line = String::with_capacity(record.len() + 1);
        line.push_str(record);
        line.push('\n');
        let (written, done) = tokio::sync::oneshot::channel();
        match self.queue.try_send(Job::Record(line, written)) {
            Ok(()) => Some(done),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
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

/// A wait as an operator wrote it: whole seconds as `5 s`, else `1500 ms`.
pub(crate) fn wait_text(wait: std::time::Duration) -> String {
    let ms = wait.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
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
