//! The compile cache holds native code that qmpgate runs, so nobody but qmpgate's
//! user may choose what is in it: a cache directory others could write or own is
//! not used (the plugins are compiled, and qmpgate says why); a directory swapped in
//! at the cache's path after start-up is never read or written (reloads keep using
//! the directory checked at start-up); a damaged entry is detected, reported once
//! and rewritten.
//!
//! These tests give qmpgate a cache directory of their own
//! (`GatewayBuilder::cache_dir`) instead of the suite's shared one.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use qmpgate_tests::{Gateway, GatewayBuilder, Plugin, Qemu, QmpClient, eventually, guest, tempdir};
use serde_json::{Value, json};

/// The uid that plays the other local user (`nobody`).
const OTHER_UID: u32 = 65534;

/// qmpgate in front of `qemu`, with its compile cache in `cache` and `args`.
fn spawn(qemu: &Qemu, cache: &Path, args: &[&str]) -> Gateway {
    GatewayBuilder::new(&qemu.upstream_spec())
        .cache_dir(cache)
        .args(args.iter().copied())
        .spawn()
}

/// Sends SIGHUP and waits until the `n`th reload is logged.
fn reload(gate: &Gateway, n: usize) {
    gate.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(&format!("reload {n} to be logged"), || {
        gate.stderr().matches("reloaded").count() >= n
    });
}

/// The safe profile's answer to `screendump`: what the built-in policy must still
/// say whatever lies in the cache.
fn screendump_refused() -> Value {
    json!({"error": {"class": "GenericError", "desc": "Command 'screendump' is refused by the safe profile: it writes a host file named by the client"}})
}

/// The policy is the built-in one, and it works: a refusal and an allowed command.
/// (On [`Qemu::start_pc`], where a screendump that got through writes its file.)
fn assert_policy_holds(client: &mut QmpClient, dir: &Path) {
    let shot = dir.join("shot.ppm");
    assert_eq!(
        client.execute("screendump", json!({"filename": shot})),
        screendump_refused()
    );
    assert!(!shot.exists());
    assert_eq!(
        client.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
}

/// The entries in `dir`, by name, with their content.
fn entries(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    entries.sort();
    entries
}

fn names(dir: &Path) -> Vec<String> {
    entries(dir).into_iter().map(|(name, _)| name).collect()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A private directory (`tempdir` follows the umask).
fn private_dir() -> tempfile::TempDir {
    let dir = tempdir();
    chmod(dir.path(), 0o700);
    dir
}

#[test]
fn a_cache_directory_others_could_write_or_own_is_not_used() {
    let top = private_dir();
    let p = |name: &str| top.path().join(name);
    // Open to all; another user's; below a directory open to all (not sticky, so
    // its writers could swap the cache later).
    std::fs::create_dir(p("open")).unwrap();
    chmod(&p("open"), 0o777);
    std::fs::create_dir(p("theirs")).unwrap();
    chmod(&p("theirs"), 0o700);
    std::os::unix::fs::chown(p("theirs"), Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    std::fs::create_dir(p("shared")).unwrap();
    chmod(&p("shared"), 0o777);
    let cases = [
        (
            p("open"),
            format!(
                "{} is writable by group or others (mode 0777)",
                p("open").display()
            ),
        ),
        (
            p("theirs"),
            format!(
                "{} is owned by uid {OTHER_UID}, not by qmpgate's uid {}",
                p("theirs").display(),
                nix::unistd::geteuid()
            ),
        ),
        (
            p("shared/cache"),
            format!(
                "{} is writable by group or others (mode 0777)",
                p("shared").display()
            ),
        ),
    ];
    // Side by side: each compiles the default plugins.
    let running: Vec<_> = cases
        .iter()
        .map(|(cache, _)| {
            let qemu = Qemu::start_pc();
            let gate = spawn(&qemu, cache, &[]);
            (qemu, gate)
        })
        .collect();
    for ((_, reason), (_qemu, gate)) in cases.iter().zip(&running) {
        assert_policy_holds(&mut gate.negotiated(), top.path());
        let stderr = gate.logged(reason.as_str());
        let said: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("plugin cache disabled"))
            .collect();
        assert_eq!(said.len(), 1, "said once:\n{stderr}");
        assert!(
            said[0].contains(reason.as_str()),
            "{reason:?} in {:?}",
            said[0]
        );
    }
    // Nothing was written in them, nor created below the shared one.
    assert!(names(&p("open")).is_empty());
    assert!(names(&p("theirs")).is_empty());
    assert!(names(&p("shared")).is_empty());
}

/// The header of a cache entry (see `host/plugin/src/cache.rs`): magic, key, SHA-256 of the
/// artifact. Public knowledge, so an attacker can forge it.
const MAGIC: &[u8] = b"qmpgate-cwasm-1\n";
const HEADER_LEN: usize = 16 + 32 + 32;

/// An entry named `name` (`<key>.cwasm`) holding `artifact`, with a header that
/// checks out: what an attacker who can write the directory can make.
fn forge(name: &str, artifact: &[u8], scratch: &Path) -> Vec<u8> {
    let hex = |text: &str| -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    };
    let file = scratch.join("artifact");
    std::fs::write(&file, artifact).unwrap();
    let out = Command::new("sha256sum").arg(&file).output().unwrap();
    let digest = String::from_utf8(out.stdout).unwrap();
    let mut entry = MAGIC.to_vec();
    entry.extend(hex(name.trim_end_matches(".cwasm")));
    entry.extend(hex(&digest[..64]));
    entry.extend(artifact);
    entry
}

#[test]
fn a_cache_directory_swapped_in_after_start_up_is_neither_read_nor_written() {
    let top = private_dir();
    let cache = top.path().join("cache");
    let config = top.path().join("qmpgate.toml");
    std::fs::write(&config, "").unwrap();
    let qemu = Qemu::start_pc();
    let gate = spawn(&qemu, &cache, &["--config", config.to_str().unwrap()]);
    let mut client = gate.negotiated();
    assert_policy_holds(&mut client, top.path());
    let legit = names(&cache);
    assert_eq!(legit.len(), 2, "hmp and qmp-policy: {legit:?}");

    // The attacker's code: fixture_trap (it forwards what the policy refuses),
    // compiled by this qmpgate's wasmtime, as a second qmpgate leaves it in its cache.
    let trap_cache = top.path().join("trap-cache");
    {
        let other_qemu = Qemu::start();
        let trap = format!("trap={}", guest("fixture_trap").display());
        let builder = spawn(
            &other_qemu,
            &trap_cache,
            &["--no-default-policy", "--plugin", &trap],
        );
        let _ = builder.negotiated();
    }
    let (_, trap_entry) = entries(&trap_cache)
        .into_iter()
        .find(|(name, _)| !legit.contains(name))
        .expect("fixture_trap's entry");
    let artifact = &trap_entry[HEADER_LEN..];

    // Another user's directory, with every entry qmpgate uses replaced by the trap
    // under a header that checks out, swapped in at the cache's path.
    let evil = top.path().join("evil");
    std::fs::create_dir(&evil).unwrap();
    for name in &legit {
        let mut file = std::fs::File::create(evil.join(name)).unwrap();
        file.write_all(&forge(name, artifact, top.path())).unwrap();
        std::os::unix::fs::fchown(&file, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    }
    std::os::unix::fs::chown(&evil, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    let moved = top.path().join("cache.moved");
    std::fs::rename(&cache, &moved).unwrap();
    std::fs::rename(&evil, &cache).unwrap();
    let planted = entries(&cache);

    // Reload, with one plugin more (the audit plugin, compiled now and cached).
    std::fs::write(&config, Plugin::builtin("audit", "audit").to_string()).unwrap();
    reload(&gate, 1);
    let stderr = gate.stderr();
    assert!(
        stderr.contains(r#"reloaded plugins=["hmp", "audit", "policy"]"#),
        "{stderr}"
    );
    assert_policy_holds(&mut client, top.path());
    assert_eq!(
        entries(&cache),
        planted,
        "nothing written in the swapped-in directory"
    );
    assert_eq!(
        names(&moved).len(),
        3,
        "the audit plugin went where the cache was checked"
    );
    assert!(!stderr.contains("ignoring plugin cache entry"), "{stderr}");

    // The forgery is good: a qmpgate whose own cache holds the same entries runs
    // the trap in place of its policy, and the screendump refused above writes its
    // file. Checking the directory once, at start-up, is what kept it out.
    let trusted = private_dir();
    for (name, content) in &planted {
        std::fs::write(trusted.path().join(name), content).unwrap();
    }
    let qemu = Qemu::start_pc();
    let fooled = spawn(&qemu, trusted.path(), &[]);
    let shot = top.path().join("fooled.ppm");
    assert_eq!(
        fooled
            .negotiated()
            .execute("screendump", json!({"filename": shot})),
        json!({"return": {}})
    );
    eventually("the screendump the trap let through", || shot.exists());
}

#[test]
fn a_damaged_entry_is_detected_reported_once_and_rewritten() {
    let top = private_dir();
    let cache = top.path().join("cache");
    let qemu = Qemu::start();
    let gate = spawn(&qemu, &cache, &[]);
    let mut client = gate.negotiated();
    let good = entries(&cache);
    assert_eq!(good.len(), 2, "hmp and qmp-policy");
    // One bit flipped in the middle of each entry, in its compiled code: wasmtime
    // itself would not notice.
    for (name, bytes) in &good {
        let mut bad = bytes.clone();
        let at = bad.len() / 2;
        bad[at] ^= 1;
        std::fs::write(cache.join(name), bad).unwrap();
    }

    reload(&gate, 1);
    let stderr = gate.stderr();
    for (name, _) in &good {
        let said = stderr
            .lines()
            .filter(|l| l.contains("ignoring plugin cache entry") && l.contains(name.as_str()))
            .collect::<Vec<_>>();
        assert_eq!(said.len(), 1, "{name} in:\n{stderr}");
        assert!(
            said[0].contains("its content does not match its digest (damaged)"),
            "{}",
            said[0]
        );
    }
    assert_policy_holds(&mut client, top.path());
    // Rewritten (compiling is deterministic): the next reload loads them silently.
    assert!(entries(&cache) == good, "the entries were rewritten");
    reload(&gate, 2);
    assert_eq!(
        gate.stderr().matches("ignoring plugin cache entry").count(),
        good.len()
    );
    assert_policy_holds(&mut client, top.path());
}
