//! libvirt drives a domain: start, state, suspend/resume, monitor commands (QMP and
//! HMP), shutdown through the guest's ACPI power button, destroy. First on plain
//! QEMU, the baseline; then with qmpgate in front of QEMU's monitor
//! (`contrib/libvirt/qmpgate-emulator`), where libvirt must see no difference.
//!
//! These tests need libvirtd running (`scripts/setup-libvirt.sh`, which
//! `scripts/setup.sh test` runs); without it they fail and say so. They run
//! libvirt's QEMU 7.2 whatever `QMPGATE_TEST_QEMU` says, hence `qemu_7_2` in their
//! names.

use qmpgate_tests::libvirt::{Domain, DomainBuilder, Emulator, GUEST_POWER_OFF};
use serde_json::json;

/// The operations libvirt performs on every VM, checked by their effects.
fn lifecycle(mut domain: Domain) {
    assert_eq!(domain.state(), "shut off");
    let started = std::time::Instant::now();
    domain.start();
    let boot = domain.wait_ready();
    eprintln!(
        "{}: started in {:?}, booted in {boot:?}",
        domain.name,
        started.elapsed() - boot
    );
    assert_eq!(domain.state(), "running");

    domain.run("suspend", &[]);
    assert_eq!(domain.state(), "paused");
    assert_eq!(
        domain.qmp(&json!({"execute": "query-status"}))["return"]["status"],
        "paused"
    );
    domain.run("resume", &[]);
    assert_eq!(domain.state(), "running");

    // libvirt adds its own id (a command with one is refused: "Unable to append
    // command 'id' string") and returns QEMU's reply with it.
    let reply = domain.qmp(&json!({"execute": "query-status"}));
    assert_eq!(reply["return"]["status"], "running", "{reply}");
    assert!(
        reply["id"].as_str().unwrap().starts_with("libvirt-"),
        "{reply}"
    );
    assert_eq!(domain.hmp("info status"), "VM status: running");

    // The guest powers off on the button: libvirt sees QEMU exit.
    let shutdown = std::time::Instant::now();
    domain.run("shutdown", &[]);
    domain.wait_state("shut off");
    eprintln!("{}: shut down in {:?}", domain.name, shutdown.elapsed());
    assert!(
        domain.serial_text().contains(GUEST_POWER_OFF),
        "{}",
        domain.serial_text()
    );

    domain.start();
    domain.wait_ready();
    let destroy = std::time::Instant::now();
    domain.run("destroy", &[]);
    eprintln!("{}: destroyed in {:?}", domain.name, destroy.elapsed());
    assert_eq!(domain.state(), "shut off");
}

#[test]
fn a_domain_on_plain_qemu_7_2_starts_pauses_answers_and_shuts_down() {
    lifecycle(DomainBuilder::new().define());
}

#[test]
fn a_domain_through_qmpgate_qemu_7_2_behaves_as_on_plain_qemu() {
    lifecycle(
        DomainBuilder::new()
            .emulator(Emulator::Qmpgate(Vec::new()))
            .define(),
    );
}
