//! The event log: every event sessions see, numbered in one stream with QEMU's
//! replies, with the recent ones kept for clients that reconnect.

use qmpgate_protocol::lock;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::broadcast;

use super::{EVENT_BUFFER, UpstreamEvent};

/// Every event sessions see, in one numbered stream: QEMU's, and qmpgate's own
/// (`QMPGATE_*`). Keeps the recent ones for clients that reconnect.
pub struct EventLog {
    /// Numbers everything QEMU sends and every event qmpgate raises.
    pub(super) seq: AtomicU64,
    pub(super) history: Mutex<VecDeque<Arc<UpstreamEvent>>>,
    /// How many events `history` keeps; 0 keeps none.
    pub(super) limit: usize,
    pub(super) sender: broadcast::Sender<Arc<UpstreamEvent>>,
}

impl EventLog {
    pub(super) fn new(limit: usize) -> Self {
        EventLog {
            seq: AtomicU64::new(0),
            history: Mutex::new(VecDeque::with_capacity(limit.min(4096))),
            limit,
            sender: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    /// The next number in the stream.
    pub(super) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends an event to every session and keeps it.
    pub(super) fn publish(&self, event: Arc<UpstreamEvent>) {
        if self.limit > 0 {
            let mut history = lock::mutex(&self.history);
            if history.len() >= self.limit {
                history.pop_front();
            }
            history.push_back(event.clone());
        }
        let _ = self.sender.send(event);
    }

    /// Numbers and publishes an event.
    pub(super) fn announce(&self, body: Map<String, Value>) {
        self.publish(Arc::new(UpstreamEvent::new(self.next_seq(), body)));
    }
}
