//! Upstream faults, with a scripted fake QEMU.

use qmpgate_tests::{FakeAction, FakeQemu, GatewayBuilder};
use serde_json::json;

#[test]
fn losing_qemu_mid_command_answers_every_pending_command_and_tells_clients() {
    let fake = FakeQemu::start(|name| match name {
        "die" => FakeAction::Close,
        "hang" => FakeAction::Ignore,
        _ => FakeAction::Return,
    });
    let mut gateway = GatewayBuilder::new(&fake.upstream_spec())
        .args(["--profile", "permissive"])
        .spawn();
    let mut a = gateway.negotiated();
    let mut b = gateway.negotiated();
    assert_eq!(a.execute("anything", json!({})), json!({"return": {}}));
    b.send(&json!({"execute": "hang", "id": "h"}));
    std::thread::sleep(std::time::Duration::from_millis(200));
    a.send(&json!({"execute": "die", "id": "d"}));

    for c in [&mut a, &mut b] {
        let mut replies = Vec::new();
        let mut lost_event = false;
        while let Some(line) = c.read_line() {
            let message: serde_json::Value = serde_json::from_str(&line).unwrap();
            if message["event"] == "QMPGATE_UPSTREAM_LOST" {
                lost_event = true;
            } else {
                replies.push(message);
            }
        }
        assert!(lost_event, "clients are told the upstream is gone");
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert!(
            replies[0]["error"]["desc"]
                .as_str()
                .unwrap()
                .contains("qmpgate lost the connection to QEMU")
        );
    }
    let (code, stderr) = gateway.wait();
    assert_eq!(
        code,
        Some(1),
        "no reconnect-ms: the gateway exits with an error\n{stderr}"
    );
}

#[test]
fn an_unreachable_upstream_is_one_clear_error_not_a_retry_loop() {
    let dir = qmpgate_tests::tempdir();
    let mut gateway = GatewayBuilder::new(&format!(
        "socket,id=qemu,path={}",
        dir.path().join("nothing.sock").display()
    ))
    .spawn();
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(1));
    assert!(stderr.contains("chardev 'qemu': connect to"), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "{stderr}");
}

#[test]
fn a_qemu_monitor_busy_with_another_client_is_reported_not_waited_on_forever() {
    // QEMU serves one client per monitor; a second connect sits in the backlog and
    // is never greeted. Use a listener nobody accepts on to get the same effect.
    let dir = qmpgate_tests::tempdir();
    let path = dir.path().join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut gateway =
        GatewayBuilder::new(&format!("socket,id=qemu,path={}", path.display())).spawn();
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(
            "sent no QMP greeting within 10s: is another client connected to its monitor?"
        ),
        "{stderr}"
    );
}
