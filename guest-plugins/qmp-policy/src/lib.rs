//! The QMP policy plugin: allow or deny commands by name, arguments and client.
//!
//! Configuration (JSON; in qmpgate's TOML it is the plugin's `config` table):
//!
//! ```json
//! {
//!   "profile": "safe",
//!   "default": "allow",
//!   "rules": [
//!     { "action": "deny", "commands": ["quit", "system_*"], "listeners": ["dashboard"] },
//!     { "action": "allow", "commands": ["migrate"], "uids": [0] },
//!     { "action": "deny", "commands": ["migrate"], "arguments": { "uri": "exec:*" },
//!       "desc": "migration to a command is not allowed" }
//!   ]
//! }
//! ```
//!
//! Rules are tried in order, the operator's first, then the profile's; the first whose
//! every condition holds decides. If none does, `default` decides (the profile's own
//! default when unset). Conditions:
//! - `commands`: glob patterns (`*` matches any run of characters) on the command name;
//! - `arguments`: a map from an argument path to a glob on its value. A path is dotted
//!   (`backend.type`); `**` matches any depth (`**.filename` finds `filename` in any
//!   nested object). Strings match as they are, other values as JSON text; `*` matches
//!   any present value;
//! - `uids`, `listeners`: the client's unix uid or listener id is one of these;
//! - `identities`: glob patterns on the names in the client's verified TLS
//!   certificate: each common name as it is (`admin`), each subject alternative
//!   name with its kind (`DNS:*.example.com`, `email:ops@example.com`,
//!   `URI:spiffe://example/*`, `IP:192.0.2.*`); a pattern that starts with a SAN
//!   kind matches SANs only, any other pattern common names only. `*` alone
//!   matches every client that has a certificate, whatever names it holds (a
//!   SAN-only certificate too). A client without a certificate (a listener without `verify-peer`, or
//!   a unix socket) never matches an `identities` condition: a deny rule meant
//!   for every client must not be scoped by identity.
//!
//! Events: `"events": [{ "action": "drop", "events": ["BLOCK_*"], "listeners": ["dashboard"] },
//! { "action": "deliver", "events": ["DEVICE_DELETED"], "redact": ["path"] }]` decides
//! per client which events it sees (first match; default deliver), and can replace
//! values in `data` by `"<redacted>"`.
//!
//! Profiles: `safe` and `readonly` are allowlists ([`allowlist`], the table in
//! `profiles.toml`): a command, argument or union variant the table does not list
//! is refused. `readonly` allows what only reads the VM's state; `safe` adds what
//! changes the VM but cannot make QEMU touch the host. `permissive` has no table:
//! only the operator's rules, then `default` (allow unless set to `deny`).
//! `libvirt` decides as `permissive`: it is the profile of the VM manager's own
//! listener, which the host lets pass fds.
//!
//! Layout: [`Config`] and [`Rule`] are the configuration; [`allowlist`] holds the
//! profiles' table and its checker; [`Policy::decide`] evaluates; [`glob`] and
//! [`values_at`] are the operator rules' matchers.

#![forbid(unsafe_code)]

use qmpgate_plugin_sdk::{
    Client, Command, Event, EventVerdict, HmpLine, Peer, Plugin, QmpError, Verdict,
};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

pub mod allowlist;

use allowlist::{Level, Table};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Built-in rule set appended after the operator's rules.
    #[serde(default)]
    profile: Profile,
    /// What happens when no rule matches, with the `permissive` profile (allow
    /// when unset). `safe` and `readonly` refuse whatever their table does not
    /// allow, so `default` is an error with them.
    default: Option<Action>,
    /// The operator's rules, tried before the profile's.
    #[serde(default)]
    rules: Vec<Rule>,
    /// Which events each client sees; the first matching rule decides, and an event
    /// no rule matches is delivered.
    #[serde(default)]
    events: Vec<EventRule>,
}

/// What an event rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EventAction {
    Deliver,
    Drop,
}

/// One event rule: every condition that is present must hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRule {
    action: EventAction,
    /// Glob patterns on the event name; absent means every event.
    events: Option<Vec<String>>,
    uids: Option<Vec<u32>>,
    listeners: Option<Vec<String>>,
    identities: Option<Vec<String>>,
    /// Dotted paths in `data` whose values are replaced by `"<redacted>"` when the
    /// rule delivers.
    #[serde(default)]
    redact: Vec<String>,
}

impl EventRule {
    fn matches(&self, client: &Client, event: &Event) -> bool {
        if let Some(patterns) = &self.events
            && !patterns.iter().any(|p| glob(p, &event.name))
        {
            return false;
        }
        identity_matches(
            self.uids.as_deref(),
            self.listeners.as_deref(),
            self.identities.as_deref(),
            client,
        )
    }
}

/// The kinds a subject alternative name is written with (see the host's
/// `tls-identity` record).
const SAN_KINDS: &[&str] = &[
    "DNS:",
    "email:",
    "URI:",
    "IP:",
    "DirName:",
    "RID:",
    "othername:",
];

/// An `identities` pattern as the host writes the names it matches: a `DNS:`
/// pattern's host name and an `email:` pattern's mail domain in lower case; any
/// other pattern as it is. Applied once, when the configuration is read.
fn identity_pattern(pattern: &str) -> String {
    if let Some(host) = pattern.strip_prefix("DNS:") {
        return format!("DNS:{}", host.to_lowercase());
    }
    match pattern.rsplit_once('@') {
        Some((local, domain)) if pattern.starts_with("email:") => {
            format!("{local}@{}", domain.to_lowercase())
        }
        _ => pattern.to_string(),
    }
}

/// `patterns` as [`identity_pattern`] writes them.
fn identity_patterns(patterns: &mut Option<Vec<String>>) {
    for pattern in patterns.iter_mut().flatten() {
        *pattern = identity_pattern(pattern);
    }
}

/// Whether the client is one of `uids` (unix peers only) and came through one of
/// `listeners`; an absent list does not constrain.
fn identity_matches(
    uids: Option<&[u32]>,
    listeners: Option<&[String]>,
    identities: Option<&[String]>,
    client: &Client,
) -> bool {
    if let Some(patterns) = identities {
        let Some(tls) = &client.tls else {
            return false;
        };
        // A pattern with a SAN kind matches SANs only, any other pattern CNs only:
        // a CN spelled like a SAN (`DNS:x`) is not taken for one.
        let matches = |pattern: &String| {
            let names = if SAN_KINDS.iter().any(|kind| pattern.starts_with(kind)) {
                &tls.subject_alt_names
            } else {
                &tls.common_names
            };
            pattern == "*" || names.iter().any(|name| glob(pattern, name))
        };
        if !patterns.iter().any(matches) {
            return false;
        }
    }
    if let Some(uids) = uids {
        match &client.peer {
            Peer::Unix(peer) if uids.contains(&peer.uid) => {}
            _ => return false,
        }
    }
    match listeners {
        Some(listeners) => listeners.contains(&client.listener),
        None => true,
    }
}

/// Replaces the value at a dotted path, if present.
fn redact(data: &mut Value, path: &str) -> bool {
    let mut node = data;
    let mut segments = path.split('.').peekable();
    while let Some(segment) = segments.next() {
        let Value::Object(map) = node else {
            return false;
        };
        let Some(child) = map.get_mut(segment) else {
            return false;
        };
        if segments.peek().is_none() {
            *child = Value::from("<redacted>");
            return true;
        }
        node = child;
    }
    false
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Profile {
    #[default]
    Safe,
    Readonly,
    Permissive,
    /// The VM manager's listener (libvirt's): decides as `permissive`; the host
    /// gives that listener fd passing and no deadline.
    Libvirt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    Allow,
    Deny,
}

/// One rule: every condition that is present must hold for the rule to match.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    action: Action,
    /// Glob patterns on the command name; absent means every command.
    commands: Option<Vec<String>>,
    /// Argument path to glob on the value.
    #[serde(default)]
    arguments: BTreeMap<String, String>,
    /// Unix uids of the client (rules with `uids` never match TCP clients).
    uids: Option<Vec<u32>>,
    /// Listener (chardev) ids the client connected through.
    listeners: Option<Vec<String>>,
    /// Glob patterns on the names in the client's TLS certificate (see the
    /// crate's documentation).
    identities: Option<Vec<String>>,
    /// Shown to the client when this rule denies.
    desc: Option<String>,
}

impl Rule {
    fn matches(&self, client: &Client, command: &Command, arguments: &Value) -> bool {
        if let Some(patterns) = &self.commands
            && !patterns.iter().any(|p| glob(p, &command.name))
        {
            return false;
        }
        if !identity_matches(
            self.uids.as_deref(),
            self.listeners.as_deref(),
            self.identities.as_deref(),
            client,
        ) {
            return false;
        }
        self.arguments.iter().all(|(path, pattern)| {
            values_at(arguments, path).iter().any(|value| match value {
                Value::String(s) => glob(pattern, s),
                other => glob(pattern, &other.to_string()),
            })
        })
    }
}

/// The loaded policy.
struct Policy {
    /// The operator's rules, tried first.
    rules: Vec<Rule>,
    /// The profile's table and level; `None` for `permissive`.
    profile: Option<(Table, Level)>,
    /// With `permissive`: what happens when no operator rule matches.
    default: Action,
    events: Vec<EventRule>,
}

impl Policy {
    fn from_config(config: Config) -> Result<Self, String> {
        let level = match config.profile {
            Profile::Safe => Some(Level::Safe),
            Profile::Readonly => Some(Level::Readonly),
            Profile::Permissive | Profile::Libvirt => None,
        };
        if level.is_some() && config.default.is_some() {
            return Err(
                "'default' applies to the permissive profile only: safe and readonly \
                 refuse whatever their allowlist does not list (add 'allow' rules instead)"
                    .into(),
            );
        }
        let (mut rules, mut events) = (config.rules, config.events);
        // Host names and mail domains are matched as the host writes them.
        for rule in &mut rules {
            identity_patterns(&mut rule.identities);
        }
        for rule in &mut events {
            identity_patterns(&mut rule.identities);
        }
        Ok(Policy {
            rules,
            profile: level.map(|level| (Table::builtin(), level)),
            default: config.default.unwrap_or(Action::Allow),
            events,
        })
    }

    fn decide(&self, client: &Client, command: &Command) -> Verdict {
        let arguments = command.arguments_json();
        if let Some(rule) = self
            .rules
            .iter()
            .find(|rule| rule.matches(client, command, &arguments))
        {
            return match rule.action {
                Action::Allow => Verdict::Forward,
                Action::Deny => Verdict::Deny(QmpError::generic(match rule.desc.as_deref() {
                    Some(reason) if !reason.is_empty() => {
                        format!("Command '{}' is denied by policy: {reason}", command.name)
                    }
                    _ => format!("Command '{}' is denied by policy", command.name),
                })),
            };
        }
        match &self.profile {
            None => match self.default {
                Action::Allow => Verdict::Forward,
                Action::Deny => Verdict::Deny(QmpError::generic(format!(
                    "Command '{}' is denied by policy",
                    command.name
                ))),
            },
            Some((table, level)) => match table.judge(*level, &command.name, &arguments) {
                Ok(()) => Verdict::Forward,
                Err(refusal) => Verdict::Deny(QmpError::generic(format!(
                    "Command '{}' is refused by the {level} profile: {refusal}",
                    command.name
                ))),
            },
        }
    }
}

#[qmpgate_plugin_sdk::plugin]
impl Plugin for Policy {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        for (i, rule) in config.rules.iter().enumerate() {
            if let Some(commands) = &rule.commands
                && commands.is_empty()
            {
                return Err(format!(
                    "rule {}: 'commands' is empty and would never match",
                    i + 1
                ));
            }
        }
        Policy::from_config(config)
    }

    fn on_command(
        &mut self,
        client: &Client,
        command: &Command,
        _hmp: Option<&HmpLine>,
    ) -> Verdict {
        self.decide(client, command)
    }

    fn on_event(&mut self, client: &Client, event: &Event) -> EventVerdict {
        let Some(rule) = self.events.iter().find(|r| r.matches(client, event)) else {
            return EventVerdict::Deliver;
        };
        match rule.action {
            EventAction::Drop => EventVerdict::Drop,
            EventAction::Deliver if rule.redact.is_empty() => EventVerdict::Deliver,
            EventAction::Deliver => {
                let mut data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                let mut changed = false;
                for path in &rule.redact {
                    changed |= redact(&mut data, path);
                }
                if changed {
                    EventVerdict::Rewrite(data.to_string())
                } else {
                    EventVerdict::Deliver
                }
            }
        }
    }
}

/// Matches `text` against `pattern`, where `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was and how much text it has swallowed, for backtracking.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Every value at a dotted `path` in `root`; `**` stands for any number of levels.
fn values_at<'a>(root: &'a Value, path: &str) -> Vec<&'a Value> {
    let segments: Vec<&str> = path.split('.').collect();
    let mut found = Vec::new();
    collect(root, &segments, &mut found);
    found
}

fn collect<'a>(value: &'a Value, segments: &[&str], found: &mut Vec<&'a Value>) {
    let Some((first, rest)) = segments.split_first() else {
        found.push(value);
        return;
    };
    if *first == "**" {
        // Zero levels here, or one more level down with `**` still in force.
        collect(value, rest, found);
        match value {
            Value::Object(map) => map.values().for_each(|v| collect(v, segments, found)),
            Value::Array(items) => items.iter().for_each(|v| collect(v, segments, found)),
            _ => {}
        }
    } else if let Value::Object(map) = value
        && let Some(child) = map.get(*first)
    {
        collect(child, rest, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qmpgate_plugin_sdk::{Protocol, TlsIdentity, UnixPeer};
    use serde_json::json;

    /// A TLS client with these common names and subject alternative names.
    fn tls_client(common_names: &[&str], sans: &[&str]) -> Client {
        Client {
            peer: Peer::Inet("192.0.2.1:5000".into()),
            tls: Some(TlsIdentity {
                common_names: common_names.iter().map(|s| s.to_string()).collect(),
                subject_alt_names: sans.iter().map(|s| s.to_string()).collect(),
                subject: String::new(),
            }),
            ..client(0, "tls")
        }
    }

    #[test]
    fn identity_patterns_match_any_name_and_star_any_certificate() {
        let matches = |patterns: &[&str], client: &Client| {
            // As the configuration is read.
            let patterns: Vec<String> = patterns.iter().map(|s| identity_pattern(s)).collect();
            identity_matches(None, None, Some(&patterns), client)
        };
        let admin = tls_client(&["ops", "admin"], &["DNS:a.example.com"]);
        assert!(matches(&["admin"], &admin), "any CN, not only the first");
        assert!(matches(&["DNS:*.example.com"], &admin));
        assert!(!matches(&["a.example.com"], &admin), "a SAN needs its kind");
        let san_only = tls_client(&[], &["DNS:ops.example.com"]);
        assert!(
            matches(&["*"], &san_only),
            "a SAN-only certificate is an identity"
        );
        assert!(!matches(&["admin"], &san_only));
        // A CN spelled like a SAN is not taken for one, nor a SAN for a CN.
        let lookalike = tls_client(&["DNS:ops.example.com"], &["email:admin"]);
        assert!(!matches(&["DNS:ops.example.com"], &lookalike));
        assert!(!matches(&["*admin"], &lookalike));
        assert!(matches(&["DNS:*"], &admin));
        // Host names are matched without case (the host writes them lower case).
        assert!(matches(&["DNS:A.Example.COM"], &admin));
        // No certificate: no identities condition holds, `*` included.
        assert!(!matches(&["*"], &client(0, "qmp")));
        // The configuration's patterns are written that way when it is read.
        let strict = policy(json!({"profile": "permissive", "rules": [
            {"action": "deny", "commands": ["stop"], "identities": ["DNS:A.Example.COM"]}]}));
        let stop = command("stop", json!({}));
        assert!(matches!(strict.decide(&admin, &stop), Verdict::Deny(_)));
        assert!(matches!(strict.decide(&san_only, &stop), Verdict::Forward));
    }

    fn client(uid: u32, listener: &str) -> Client {
        Client {
            id: 1,
            upstream: "vm".into(),
            listener: listener.into(),
            protocol: Protocol::Qmp,
            peer: Peer::Unix(UnixPeer {
                pid: 1,
                uid,
                gid: uid,
            }),
            capabilities: vec![],
            tls: None,
        }
    }

    fn command(name: &str, arguments: Value) -> Command {
        Command {
            name: name.into(),
            arguments: arguments.to_string(),
            oob: false,
        }
    }

    fn policy(config: Value) -> Policy {
        Policy::from_config(serde_json::from_value(config).unwrap()).unwrap()
    }

    fn denied(p: &Policy, name: &str, args: Value) -> bool {
        matches!(
            p.decide(&client(1000, "qmp"), &command(name, args)),
            Verdict::Deny(_)
        )
    }

    #[test]
    fn glob_matches_like_a_shell() {
        assert!(glob("query-*", "query-status"));
        assert!(glob("*", ""));
        assert!(glob("x-*-y", "x-a-b-y"));
        assert!(!glob("query-*", "quit"));
        assert!(!glob("exec:*", "tcp:exec:"));
    }

    #[test]
    fn safe_profile_refuses_host_access_but_allows_management() {
        let p = policy(json!({}));
        assert!(!denied(&p, "query-status", json!({})));
        assert!(!denied(&p, "stop", json!({})));
        assert!(!denied(
            &p,
            "device_add",
            json!({"driver": "e1000", "id": "n1"})
        ));
        assert!(denied(
            &p,
            "device_add",
            json!({"driver": "e1000", "id": "n1", "romfile": "/etc/shadow"})
        ));
        assert!(denied(
            &p,
            "device_add",
            json!({"driver": "vhost-vsock-pci", "vhostfd": "4"})
        ));
        assert!(denied(&p, "migrate", json!({"uri": "tcp:10.0.0.1:4444"})));
        assert!(denied(&p, "migrate", json!({"uri": "exec:cat > /tmp/x"})));
        assert!(denied(&p, "screendump", json!({"filename": "/tmp/x.ppm"})));
        assert!(denied(
            &p,
            "chardev-add",
            json!({"id": "c", "backend": {"type": "file", "data": {"out": "/etc/x"}}})
        ));
        assert!(!denied(
            &p,
            "chardev-add",
            json!({"id": "c", "backend": {"type": "ringbuf", "data": {}}})
        ));
        assert!(denied(
            &p,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": "/etc/shadow"}})
        ));
        assert!(denied(
            &p,
            "blockdev-add",
            json!({"driver": "raw", "node-name": "n", "file": {"driver": "file", "filename": "/etc/shadow"}})
        ));
        assert!(!denied(
            &p,
            "blockdev-add",
            json!({"driver": "raw", "node-name": "n", "file": "disk0"})
        ));
        assert!(denied(
            &p,
            "netdev_add",
            json!({"type": "user", "id": "u", "hostfwd": [{"str": "tcp::2222-:22"}]})
        ));
        assert!(denied(&p, "x-exit-preconfig", json!({})));
        assert!(denied(&p, "a-command-from-qemu-12", json!({})));
        match p.decide(
            &client(1000, "qmp"),
            &command("screendump", json!({"filename": "x"})),
        ) {
            Verdict::Deny(e) => assert_eq!(
                e.desc,
                "Command 'screendump' is refused by the safe profile: it writes a host file named by the client"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn default_applies_to_permissive_only() {
        let config = |v: Value| serde_json::from_value::<Config>(v).unwrap();
        assert!(Policy::from_config(config(json!({"default": "allow"}))).is_err());
        let p = policy(
            json!({"profile": "permissive", "default": "deny", "rules": [{"action": "allow", "commands": ["query-*"]}]}),
        );
        assert!(!denied(&p, "query-status", json!({})));
        assert!(denied(&p, "stop", json!({})));
        assert!(!denied(
            &policy(json!({"profile": "permissive"})),
            "screendump",
            json!({"filename": "x"})
        ));
    }

    #[test]
    fn operator_rules_come_first_and_can_use_identity() {
        let p = policy(json!({
            "rules": [
                {"action": "allow", "commands": ["screendump"], "uids": [0]},
                {"action": "deny", "commands": ["quit"], "listeners": ["qmp"], "desc": "not here"}
            ]
        }));
        assert!(matches!(
            p.decide(
                &client(0, "qmp"),
                &command("screendump", json!({"filename": "x"}))
            ),
            Verdict::Forward
        ));
        assert!(denied(&p, "screendump", json!({"filename": "x"})));
        match p.decide(&client(0, "qmp"), &command("quit", json!({}))) {
            Verdict::Deny(e) => assert_eq!(e.desc, "Command 'quit' is denied by policy: not here"),
            other => panic!("expected deny, got {other:?}"),
        }
        assert!(matches!(
            p.decide(&client(0, "other"), &command("quit", json!({}))),
            Verdict::Forward
        ));
    }

    #[test]
    fn readonly_profile_allows_only_queries() {
        let p = policy(json!({"profile": "readonly"}));
        assert!(!denied(&p, "query-block", json!({})));
        assert!(denied(&p, "stop", json!({})));
        assert!(denied(&p, "cont", json!({})));
    }

    #[test]
    fn event_rules_drop_and_redact_per_client() {
        let mut p = policy(json!({
            "events": [
                {"action": "drop", "events": ["STOP"], "listeners": ["dashboard"]},
                {"action": "deliver", "events": ["DEVICE_*"], "redact": ["path", "missing.key"]}
            ]
        }));
        let event = |name: &str, data: Value| Event {
            name: name.into(),
            data: data.to_string(),
            seconds: 0,
            microseconds: 0,
        };
        assert_eq!(
            p.on_event(&client(0, "dashboard"), &event("STOP", json!({}))),
            EventVerdict::Drop
        );
        assert_eq!(
            p.on_event(&client(0, "qmp"), &event("STOP", json!({}))),
            EventVerdict::Deliver
        );
        match p.on_event(
            &client(0, "qmp"),
            &event(
                "DEVICE_DELETED",
                json!({"device": "d", "path": "/machine/x"}),
            ),
        ) {
            EventVerdict::Rewrite(data) => {
                assert_eq!(
                    serde_json::from_str::<Value>(&data).unwrap(),
                    json!({"device": "d", "path": "<redacted>"})
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_configuration_keys_are_rejected() {
        assert!(serde_json::from_value::<Config>(json!({"rulez": []})).is_err());
        assert!(serde_json::from_value::<Config>(json!({"profile": "lax"})).is_err());
    }
}
