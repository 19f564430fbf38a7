//! Specs in both forms: what parses, what means what, and the texts of refusals.

use serde_json::Value;

use super::*;

fn err(spec: &str) -> String {
    ChardevSpec::parse(spec).unwrap_err().to_string()
}

#[test]
fn parses_qemu_style_specs() {
    let s = ChardevSpec::parse("socket,id=qmp,path=/run/a,,b.sock,server=on,wait=off").unwrap();
    assert_eq!(s.id, "qmp");
    assert_eq!(s.address, Address::Path("/run/a,b.sock".into()));
    assert!(s.server);
    let s = ChardevSpec::parse("socket,id=t,host=::1,port=4444,reconnect=2").unwrap();
    assert_eq!(
        s.address,
        Address::Tcp {
            host: "::1".into(),
            port: 4444
        }
    );
    assert!(!s.server);
    assert_eq!(s.reconnect_ms, Some(2000));
    let s = ChardevSpec::parse("socket,id=f,fd=3,server=on,mode=readline").unwrap();
    assert_eq!(s.address, Address::Fd(3));
    assert_eq!(s.mode, MonitorMode::Readline);
    let s = ChardevSpec::parse("socket,id=sd,systemd=qmp").unwrap();
    assert!(s.server, "systemd sockets listen");
}

#[test]
fn rejects_bad_specs_with_clear_reasons() {
    assert!(err("socket,path=/x").contains("Parameter 'id' is missing"));
    assert!(err("file,id=x,path=/x").contains("backend 'file' is not supported"));
    // QEMU's older spellings get the spelling qmpgate takes.
    let e = err("socket,id=q,path=/x,server,nowait");
    assert!(
        e.ends_with("'server' is not of the form key=value (QEMU's short form: write server=on)"),
        "{e}"
    );
    let e = err("socket,id=q,path=/x,server=on,nowait");
    assert!(e.contains("(QEMU's short form: write wait=off)"), "{e}");
    let e = err("unix:/run/q.sock,server,nowait");
    assert!(e.contains("socket,id=ID,path=/run/q.sock,server=on"), "{e}");
    let e = err("tcp:127.0.0.1:4444,server");
    assert!(
        e.contains("socket,id=ID,host=127.0.0.1,port=4444,server=on"),
        "{e}"
    );
    assert!(err("socket,id=x,fd=3,path=/x").contains("'fd' cannot be combined"));
    assert!(err("socket,id=x,fd=myfd").contains("Unable to parse FD number 'myfd'"));
    assert!(err("socket,id=x,path=/x,server=maybe").contains("expects 'on' or 'off'"));
    assert!(err("socket,id=x,path=/x,colour=red").contains("Invalid parameter 'colour'"));
    assert!(err("socket,id=x").contains("one of 'path'"));
    assert!(err("socket,id=x,path=/a,path=/b").contains("given twice"));
    assert!(err("socket,id=x,host=h").contains("'host' needs 'port'"));
    assert!(err("socket,id=a b,path=/x").contains("expects an identifier"));
}

#[test]
fn upstreams_select_policies_and_listeners_select_upstreams() {
    let s = ChardevSpec::parse("socket,id=vm1,path=/q,profile=readonly").unwrap();
    assert_eq!(s.policy, ChainSelector::Profile("readonly".into()));
    let s = ChardevSpec::parse("socket,id=vm1,path=/q,plugins=hmp:strict").unwrap();
    assert_eq!(
        s.policy,
        ChainSelector::Plugins(vec!["hmp".into(), "strict".into()])
    );
    let s = ChardevSpec::parse("socket,id=g,path=/g,server=on,upstream=vm1").unwrap();
    assert_eq!(s.upstream.as_deref(), Some("vm1"));
    assert_eq!(
        ChardevSpec::parse("socket,id=g,path=/g,server=on,profile=readonly")
            .unwrap()
            .policy,
        ChainSelector::Profile("readonly".into())
    );
    assert!(err("socket,id=q,path=/q,upstream=vm1").contains("this chardev is a client"));
    assert!(err("socket,id=q,path=/q,profile=safe,plugins=a").contains("not both"));
    assert!(err("socket,id=q,path=/q,plugins=a::b").contains("separated by ':'"));
}

#[test]
fn the_qapi_form_means_what_the_same_keys_mean_in_a_spec() {
    let qapi = |data: Value| {
        ChardevSpec::from_qapi("g", &serde_json::json!({"type": "socket", "data": data}))
    };
    let spec = qapi(serde_json::json!({
        "addr": {"type": "unix", "data": {"path": "/run/a,b.sock"}},
        "server": true, "wait": false, "upstream": "vm1", "plugins": ["hmp", "strict"],
        "perm": "0660", "uids": [0, "root"],
    }))
    .unwrap();
    assert_eq!(
        spec,
        ChardevSpec::parse_runtime(
            "socket,id=g,path=/run/a,,b.sock,server=on,wait=off,upstream=vm1,plugins=hmp:strict,perm=0660,uids=0:root"
        )
        .unwrap()
    );
    // The same rules, in QAPI's words where the syntax differs.
    let e = qapi(
        serde_json::json!({"addr": {"type": "unix", "data": {"path": "/q"}}, "upstream": "vm1"}),
    );
    assert_eq!(
        e.unwrap_err(),
        "'upstream' binds a listener (server=true) to an upstream; this chardev is a client"
    );
    let e = qapi(serde_json::json!({"addr": {"type": "fd", "data": {"str": "x"}}, "perm": "0600"}));
    assert_eq!(
        e.unwrap_err(),
        "'perm', 'owner' and 'group' set a socket file's mode: give 'path'"
    );
    let e = qapi(
        serde_json::json!({"addr": {"type": "unix", "data": {"path": "/q"}}, "plugins": ["a:b"]}),
    );
    assert_eq!(
        e.unwrap_err(),
        "Invalid parameter type for 'plugins', expected: array of names"
    );
    let e = qapi(serde_json::json!({"addr": {"type": "unix", "data": {}}}));
    assert_eq!(e.unwrap_err(), "Parameter 'addr.data.path' is missing");
}

#[test]
fn listeners_pass_fds_and_set_deadlines_when_told_or_for_the_manager() {
    let s = ChardevSpec::parse("socket,id=m,path=/m,server=on").unwrap();
    assert!(!s.passes_fds());
    assert_eq!(s.timeout(), ListenerTimeout::Gateway);
    let s = ChardevSpec::parse("socket,id=m,path=/m,server=on,profile=libvirt").unwrap();
    assert!(s.passes_fds());
    assert_eq!(s.timeout(), ListenerTimeout::Every(None));
    let s = ChardevSpec::parse(
        "socket,id=m,path=/m,server=on,profile=libvirt,fds=close,timeout-ms=30000",
    )
    .unwrap();
    assert!(!s.passes_fds());
    assert_eq!(
        s.timeout(),
        ListenerTimeout::Every(Some(std::time::Duration::from_secs(30)))
    );
    let s = ChardevSpec::parse("socket,id=m,fd=3,server=on,fds=pass,timeout-ms=0").unwrap();
    assert!(s.passes_fds());
    assert_eq!(s.timeout(), ListenerTimeout::Every(None));

    assert!(err("socket,id=m,path=/m,server=on,fds=yes").contains("expects 'pass' or 'close'"));
    assert!(err("socket,id=m,path=/m,server=on,timeout-ms=soon").contains("expects a number"));
    assert!(
        err("socket,id=q,path=/q,fds=pass").contains("'fds' and 'timeout-ms' are for listeners")
    );
    assert!(err("socket,id=m,port=4444,server=on,fds=pass").contains("needs a unix socket"));
    assert!(
        err("socket,id=m,path=/m,server=on,fds=pass,mode=readline").contains("for QMP listeners")
    );
    let e = err("socket,id=m,path=/m,server=on,fds=pass,profile=safe");
    assert!(
        e.contains("profile 'safe' refuses every command that takes an fd"),
        "{e}"
    );
    // The QAPI form has the same keys.
    let spec = ChardevSpec::from_qapi(
        "m",
        &serde_json::json!({"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": "/m"}}, "server": true,
            "fds": "pass", "timeout-ms": 0,
        }}),
    )
    .unwrap();
    assert!(spec.passes_fds());
    assert_eq!(spec.timeout(), ListenerTimeout::Every(None));
}
