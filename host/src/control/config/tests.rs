//! Resolving files and command lines: chains, ids, services and their refusals.

use super::*;
use qmpgate_protocol::chardev::ChainSelector;

fn cli(upstream: &str, listen: &[&str]) -> Overrides {
    Overrides {
        upstreams: vec![upstream.into()],
        listen: listen.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn defaults_to_the_builtin_safe_policy() {
    let r = resolve(
        FileConfig::default(),
        cli("socket,id=q,path=/q", &["socket,id=l,path=/l,server=on"]),
    )
    .unwrap();
    assert_eq!(r.plugins.len(), 2);
    assert_eq!(r.plugins[0].name, "hmp");
    assert_eq!(r.plugins[1].config, serde_json::json!({"profile": "safe"}));
    assert_eq!(r.max_message, DEFAULT_MAX_MESSAGE);
}

#[test]
fn listeners_can_refer_to_chardevs_by_id() {
    let mut o = cli("socket,id=q,path=/q", &["gate"]);
    o.chardevs = vec!["socket,id=gate,fd=3,server=on".into()];
    let r = resolve(FileConfig::default(), o).unwrap();
    assert_eq!(r.listeners[0].id, "gate");
    let e = resolve(FileConfig::default(), cli("socket,id=q,path=/q", &["nope"])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no chardev with id 'nope' (define it with --chardev)"
    );
}

#[test]
fn toml_plugins_get_json_config() {
    let file: FileConfig = toml::from_str(
        r#"
        upstream = "socket,id=q,path=/q"
        listen = ["socket,id=l,path=/l,server=on"]
        [[plugin]]
        name = "p"
        builtin = "qmp-policy"
        cpu-ms = 10
        config = { profile = "readonly", rules = [{ action = "deny", commands = ["quit"] }] }
        "#,
    )
    .unwrap();
    let r = resolve(file, Overrides::default()).unwrap();
    // The configuration places the built-in policy itself: only the HMP reader
    // is added in front of it.
    let names: Vec<&str> = r.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["hmp", "p"]);
    assert_eq!(r.plugins[1].limits.cpu, Duration::from_millis(10));
    assert_eq!(r.plugins[1].config["rules"][0]["commands"][0], "quit");
}

#[test]
fn a_configured_plugin_does_not_drop_the_builtin_policy() {
    let file = || -> FileConfig {
        toml::from_str(
            r#"
            upstream = "socket,id=q,path=/q"
            listen = ["socket,id=l,path=/l,server=on"]
            [[plugin]]
            name = "audit"
            builtin = "audit"
            "#,
        )
        .unwrap()
    };
    let names =
        |r: &Resolved| -> Vec<String> { r.plugins.iter().map(|p| p.name.clone()).collect() };
    let r = resolve(file(), Overrides::default()).unwrap();
    assert_eq!(names(&r), ["hmp", "audit", "policy"]);
    assert_eq!(r.plugins[2].config, serde_json::json!({"profile": "safe"}));
    let readonly = Overrides {
        profile: Some("readonly".into()),
        ..Default::default()
    };
    let r = resolve(file(), readonly).unwrap();
    assert_eq!(
        r.plugins[2].config,
        serde_json::json!({"profile": "readonly"})
    );
    let bare = Overrides {
        no_default_policy: true,
        ..Default::default()
    };
    assert_eq!(names(&resolve(file(), bare).unwrap()), ["audit"]);
}

#[test]
fn a_file_lists_several_upstreams_and_binds_listeners_to_them() {
    let file: FileConfig = toml::from_str(
        r#"
        upstream = ["socket,id=vm1,path=/q1", "socket,id=vm2,path=/q2,plugins=strict"]
        listen = ["socket,id=g1,path=/g1,server=on,upstream=vm1", "socket,id=g2,path=/g2,server=on,upstream=vm2"]
        [[plugin]]
        name = "strict"
        builtin = "qmp-policy"
        config = { profile = "readonly" }
        [[plugin]]
        name = "audit"
        builtin = "audit"
        "#,
    )
    .unwrap();
    let r = resolve(file, Overrides::default()).unwrap();
    let ids: Vec<(&str, Option<&str>)> = r
        .listeners
        .iter()
        .map(|l| (l.id.as_str(), l.upstream.as_deref()))
        .collect();
    assert_eq!(ids, [("g1", Some("vm1")), ("g2", Some("vm2"))]);
    let names = |policy: &ChainSelector| -> Vec<String> {
        select(&r.plugins, policy)
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect()
    };
    assert_eq!(names(&r.upstreams[0].policy), ["hmp", "strict", "audit"]);
    assert_eq!(names(&r.upstreams[1].policy), ["strict"]);
    // A profile keeps the chain and sets the built-in policy's profile.
    let readonly = select(&r.plugins, &ChainSelector::Profile("safe".into())).unwrap();
    let names_of: Vec<&str> = readonly.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names_of, ["hmp", "strict", "audit"]);
    assert_eq!(readonly[1].config, serde_json::json!({"profile": "safe"}));
}

#[test]
fn a_host_gateway_may_start_with_no_upstream_only_with_a_control_monitor() {
    let e = resolve(FileConfig::default(), Overrides::default()).unwrap_err();
    assert!(e.to_string().starts_with("no upstream"), "{e}");
    let r = resolve(
        FileConfig::default(),
        Overrides {
            control: Some("socket,id=c,path=/c".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(r.upstreams.is_empty() && r.listeners.is_empty());
}

#[test]
fn unknown_keys_are_errors() {
    assert!(toml::from_str::<FileConfig>("listen-on = []").is_err());
}
