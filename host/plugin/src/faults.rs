//! Who pays for a fault: the client whose input caused it, or the plugin itself.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use qmpgate_protocol::lock;

use crate::CLIENT_FAULT_WINDOW;
use crate::wit::{Client, Peer};

/// Whose input a hook call is about, and so who a fault in it is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
    /// The client's own input (its command, HMP line, or QEMU's reply to it): the
    /// client is charged, and disconnected after [`CLIENT_FAULT_LIMIT`].
    Client,
    /// Input no client chose (a connection, QEMU's events): the plugin is
    /// charged, and taken down for the upstream after [`RESTART_BUDGET`].
    Plugin,
}

/// Recent faults caused by clients' input, shared by a chain's calls (which
/// records them) and its sessions (which disconnect a client over the limit).
///
/// Faults are kept per principal (the listener and the peer's uid, address or TLS
/// identity), not per connection, and outlive the connection: reconnecting does
/// not buy a fresh budget.
#[derive(Debug, Default)]
pub struct ClientFaults(Mutex<HashMap<String, VecDeque<Instant>>>);

/// Who a client is, for [`ClientFaults`].
fn principal(client: &Client) -> String {
    let peer = match (&client.tls, &client.peer) {
        // The whole subject and the SANs, as JSON (so that no two lists read
        // alike): certificates that share a CN, or have an empty subject, are
        // still different principals.
        (Some(tls), _) => format!(
            "tls:{}",
            serde_json::json!([tls.subject, tls.subject_alt_names, tls.common_names])
        ),
        (None, Peer::Unix(p)) => format!("uid:{}", p.uid),
        (None, Peer::Inet(address)) => {
            // The address without the port: one host is one principal.
            let host = address
                .rsplit_once(':')
                .map_or(address.as_str(), |(h, _)| h);
            format!("inet:{host}")
        }
        (None, Peer::Unknown) => "unknown".to_string(),
    };
    format!("{}/{}/{peer}", client.upstream, client.listener)
}

impl ClientFaults {
    pub(crate) fn charge(&self, client: &Client) {
        let mut map = lock::mutex(&self.0);
        let now = Instant::now();
        // Records of principals with no fault in the window go, so the map stays
        // as small as the set of recent offenders.
        map.retain(|_, times| {
            times
                .back()
                .is_some_and(|t| now.duration_since(*t) <= CLIENT_FAULT_WINDOW)
        });
        map.entry(principal(client)).or_default().push_back(now);
    }

    /// Faults `client`'s principal caused within the last [`CLIENT_FAULT_WINDOW`].
    pub fn recent(&self, client: &Client) -> usize {
        let mut map = lock::mutex(&self.0);
        let Some(times) = map.get_mut(&principal(client)) else {
            return 0;
        };
        let now = Instant::now();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > CLIENT_FAULT_WINDOW)
        {
            times.pop_front();
        }
        times.len()
    }
}
