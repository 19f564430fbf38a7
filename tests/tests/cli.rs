//! The command line as an operator meets it: errors that name what was written
//! and how to write it, plugin configuration from the command line, and paths in
//! a configuration file taken from the file's folder.

use std::process::Command;

use serde_json::json;

use qmpgate_tests::{GatewayBuilder, Qemu, QmpClient, SUBCOMMANDS, guest, qmpgate_bin, tempdir};

/// Runs qmpgate with `args`; returns its exit code and what it printed on stderr.
fn qmpgate(args: &[&str], cwd: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(qmpgate_bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `qmpgate --help` lists every subcommand, each with what it does, and no other
/// but `help`.
#[test]
fn help_lists_every_subcommand_with_what_it_does() {
    let out = Command::new(qmpgate_bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let commands = help
        .split_once("\nCommands:\n")
        .and_then(|(_, rest)| rest.split_once("\n\n"))
        .map(|(commands, _)| commands)
        .unwrap_or_else(|| panic!("no Commands section:\n{help}"));
    // `  NAME  description`; a description's continuation lines start with spaces only.
    let listed: Vec<(&str, &str)> = commands
        .lines()
        .filter_map(|line| line.strip_prefix("  "))
        .filter(|line| !line.starts_with(' '))
        .map(|line| line.split_once(' ').unwrap_or((line, "")))
        .map(|(name, description)| (name, description.trim()))
        .collect();
    let names: Vec<&str> = listed.iter().map(|(name, _)| *name).collect();
    let mut expected = SUBCOMMANDS.to_vec();
    expected.push("help");
    assert_eq!(names, expected, "{help}");
    for (name, description) in listed {
        assert!(description.len() > 10, "{name} has no description:\n{help}");
    }
}

#[test]
fn start_up_errors_name_what_was_written_and_how_to_write_it() {
    let dir = tempdir();
    let listen = format!(
        "socket,id=qmp,path={}/gate.sock,server=on",
        dir.path().display()
    );
    let upstream = "socket,id=qemu,path=/nonexistent/qmp.sock";
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "--profile",
                "saf",
                "--upstream",
                upstream,
                "--listen",
                &listen,
            ],
            "qmpgate: no profile 'saf' (profiles: safe, readonly, permissive, libvirt)\n",
        ),
        (
            &[
                "--upstream",
                upstream,
                "--listen",
                &format!("{listen},nowait"),
            ],
            "'nowait' is not of the form key=value (QEMU's short form: write wait=off)\n",
        ),
        (
            &[
                "--upstream",
                upstream,
                "--listen",
                "unix:/run/vm.sock,server,nowait",
            ],
            "'unix:/run/vm.sock' is QEMU's -qmp address form; qmpgate takes -chardev specs: socket,id=ID,path=/run/vm.sock,server=on\n",
        ),
        (
            &[
                "--plugin",
                "mine=notes.txt",
                "--upstream",
                upstream,
                "--listen",
                &listen,
            ],
            "qmpgate: plugin 'mine': not a loadable component: the file is not WebAssembly (it does not start with \\0asm); build the plugin with `cargo build --release --target wasm32-wasip2`\n",
        ),
        (
            &[
                "--plugin-config",
                "mine=notes.txt",
                "--upstream",
                upstream,
                "--listen",
                &listen,
            ],
            "qmpgate: --plugin-config: no plugin named 'mine' is configured (configured: none; the built-in policy takes --profile)\n",
        ),
    ];
    std::fs::write(dir.path().join("notes.txt"), "not a plugin\n").unwrap();
    for (args, expected) in cases {
        let (code, stderr) = qmpgate(args, dir.path());
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.ends_with(expected), "{args:?}:\n{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
}

/// `--plugin-config NAME=FILE` gives a `--plugin` its configuration (TOML here),
/// and a configuration file's relative plugin path is taken from the file's
/// folder, wherever qmpgate is started.
#[test]
fn plugins_get_their_configuration_and_paths_from_where_the_operator_wrote_them() {
    let qemu = Qemu::start();
    let builder = GatewayBuilder::new(&qemu.upstream_spec());
    let etc = builder.dir().join("etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::copy(guest("fixture_probe"), etc.join("probe.wasm")).unwrap();
    std::fs::write(
        etc.join("gate.toml"),
        "[[plugin]]\nname = \"probe\"\npath = \"probe.wasm\"\n",
    )
    .unwrap();
    std::fs::write(etc.join("probe.toml"), "deny-member = \"path\"\n").unwrap();
    let config = etc.join("gate.toml");
    let probe_config = format!("probe={}", etc.join("probe.toml").display());

    // Started from another folder (the builder's cwd is the test's).
    let gateway = builder
        .args(["--config", config.to_str().unwrap()])
        .args(["--plugin-config", &probe_config])
        .spawn();
    let mut c = gateway.negotiated();
    assert_eq!(
        c.execute("qom-list", json!({"path": "/"}))["error"]["desc"],
        "QEMU's schema says 'qom-list' takes 'path'"
    );
    assert!(c.execute("query-status", json!({}))["return"].is_object());

    // Without --plugin-config, the same plugin lets qom-list through.
    let other = Qemu::start();
    let plain = GatewayBuilder::new(&other.upstream_spec())
        .args(["--config", config.to_str().unwrap()])
        .spawn();
    let mut c: QmpClient = plain.negotiated();
    assert!(
        c.execute("qom-list", json!({"path": "/"}))["return"].is_array(),
        "qom-list passes without the configuration"
    );
}
