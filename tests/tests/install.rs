//! `make install` as a packager runs it: every file where it belongs, manual pages
//! that `man` renders without a warning and that name every subcommand, completion
//! scripts each shell loads, and `make uninstall` leaving nothing behind.
//!
//! The Makefile is given the binary under test (`BIN=`), so nothing is built here.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qmpgate_tests::{SUBCOMMANDS, qmpgate_bin, tempdir};

/// Every file `make install PREFIX=/usr` installs, under DESTDIR.
const INSTALLED: &[&str] = &[
    "usr/bin/qmpgate",
    "usr/share/man/man1/qmpgate.1",
    "usr/share/man/man1/qmpgate-run.1",
    "usr/share/man/man1/qmpgate-plugin.1",
    "usr/share/man/man1/qmpgate-plugin-test.1",
    "usr/share/man/man1/qmpgate-policy.1",
    "usr/share/man/man1/qmpgate-policy-show.1",
    "usr/share/man/man1/qmpgate-policy-check.1",
    "usr/share/man/man1/qmpgate-completions.1",
    "usr/share/man/man1/qmpgate-man.1",
    "usr/share/bash-completion/completions/qmpgate",
    "usr/share/zsh/site-functions/_qmpgate",
    "usr/share/fish/vendor_completions.d/qmpgate.fish",
    "usr/lib/systemd/system/qmpgate@.service",
    "usr/lib/systemd/system/qmpgate@.socket",
];

/// Runs `make TARGET PREFIX=/usr DESTDIR=destdir BIN=<the binary under test>` in the
/// repository; panics with make's output if it fails.
fn make(target: &str, destdir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("make")
        .arg("-C")
        .arg(root)
        .arg(target)
        .arg("PREFIX=/usr")
        .arg(format!("DESTDIR={}", destdir.display()))
        .arg(format!("BIN={}", qmpgate_bin().display()))
        .output()
        .expect("make (Debian's make package)");
    assert!(
        out.status.success(),
        "make {target}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh DESTDIR with qmpgate installed in it.
fn installed() -> tempfile::TempDir {
    let destdir = tempdir();
    make("install", destdir.path());
    destdir
}

/// Every file under `dir`, as paths relative to it.
fn files(dir: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, base: &Path, found: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, found);
            } else {
                found.insert(path.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut found = BTreeSet::new();
    walk(dir, dir, &mut found);
    found
}

#[test]
fn make_install_puts_every_file_where_it_belongs_and_uninstall_removes_them() {
    let destdir = installed();
    let root = destdir.path();
    let expected: BTreeSet<String> = INSTALLED.iter().map(|f| f.to_string()).collect();
    assert_eq!(files(root), expected);

    let mode = |file: &str| {
        std::fs::metadata(root.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    for file in INSTALLED {
        let want = if *file == "usr/bin/qmpgate" {
            0o755
        } else {
            0o644
        };
        assert_eq!(mode(file), want, "{file}: {:o}", mode(file));
        assert!(
            std::fs::metadata(root.join(file)).unwrap().len() > 0,
            "{file} is empty"
        );
    }
    assert_eq!(
        std::fs::read(root.join("usr/bin/qmpgate")).unwrap(),
        std::fs::read(qmpgate_bin()).unwrap(),
        "the installed binary is the one given"
    );
    // The service runs the binary where it was installed (PREFIX), not /usr/local's.
    let service =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/qmpgate@.service")).unwrap();
    assert!(
        service.contains("\nExecStart=/usr/bin/qmpgate --config"),
        "{service}"
    );

    make("uninstall", root);
    assert_eq!(files(root), BTreeSet::new(), "uninstall left files behind");
}

/// `man --warnings` says nothing about any page (no line too long to fit, no bad
/// request), and the main page names every subcommand's page.
#[test]
fn the_manual_pages_render_without_warnings_and_name_every_subcommand() {
    let destdir = installed();
    let man1 = destdir.path().join("usr/share/man/man1");
    let render = |page: &Path| -> String {
        // As `MANWIDTH=80 man --warnings -l PAGE`; ASCII, so names are matched as typed.
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(page)
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C")
            .output()
            .expect("man (Debian's man-db package)");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && warnings.is_empty(),
            "{}: {warnings}",
            page.display()
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man1)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    for page in &pages {
        let text = render(page);
        let name = page.file_stem().unwrap().to_str().unwrap();
        // NAME's line: the page's own name, then what it does.
        let what = text
            .split_once("NAME\n")
            .map(|(_, rest)| rest.split_whitespace());
        let what: Vec<&str> = what.into_iter().flatten().take(2).collect();
        assert_eq!(what, [name, "-"], "{name}:\n{text}");
    }
    let main = render(&man1.join("qmpgate.1"));
    for subcommand in SUBCOMMANDS {
        assert!(
            main.contains(&format!("qmpgate-{subcommand}(1)")),
            "qmpgate(1) does not name qmpgate-{subcommand}(1):\n{main}"
        );
    }
    // The help's examples keep their lines, each whole on one line of the page.
    assert!(
        main.contains("\n         qmpgate run --listen socket,id=qmp,path=vm.sock,server=on \\\n"),
        "{main}"
    );
    let policy = render(&man1.join("qmpgate-policy.1"));
    for action in ["show", "check"] {
        assert!(
            policy.contains(&format!("qmpgate-policy-{action}(1)")),
            "{policy}"
        );
    }

    // `qmpgate man` prints the same main page.
    let out = Command::new(qmpgate_bin()).arg("man").output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, std::fs::read(man1.join("qmpgate.1")).unwrap());
}

/// The bash script, sourced as bash-completion would, registers itself for
/// `qmpgate` and completes subcommands, their subcommands, options and values.
#[test]
fn bash_completes_subcommands_options_and_values() {
    let destdir = installed();
    let script = destdir
        .path()
        .join("usr/share/bash-completion/completions/qmpgate");
    // The words typed so far, the last one being completed; what bash offers.
    let complete = |words: &[&str]| -> Vec<String> {
        let out = Command::new("bash")
            .arg("-c")
            .arg(
                r#"source "$1" || exit 1
                complete -p qmpgate >/dev/null || exit 2
                COMP_WORDS=("${@:2}"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
                COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}
                _qmpgate qmpgate "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
                printf '%s\n' "${COMPREPLY[@]}""#,
            )
            .arg("bash")
            .arg(&script)
            .args(words)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{words:?}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(complete(&["qmpgate", "r"]), ["run"]);
    let all = complete(&["qmpgate", ""]);
    for subcommand in SUBCOMMANDS {
        assert!(all.iter().any(|w| w == subcommand), "{subcommand}: {all:?}");
    }
    assert_eq!(complete(&["qmpgate", "policy", "s"]), ["show"]);
    assert_eq!(complete(&["qmpgate", "--upstr"]), ["--upstream"]);
    assert_eq!(complete(&["qmpgate", "run", "--runa"]), ["--runas"]);
    assert_eq!(complete(&["qmpgate", "completions", "z"]), ["zsh"]);
}

/// zsh and fish find their scripts by file name and first line; each names qmpgate
/// and every subcommand. fish checks its script's syntax when it is installed (the
/// tests do not install it).
#[test]
fn zsh_and_fish_scripts_are_the_right_shells_and_name_every_subcommand() {
    let destdir = installed();
    let share = destdir.path().join("usr/share");
    let zsh = std::fs::read_to_string(share.join("zsh/site-functions/_qmpgate")).unwrap();
    assert!(zsh.starts_with("#compdef qmpgate\n"), "{zsh}");
    let fish_path = share.join("fish/vendor_completions.d/qmpgate.fish");
    let fish = std::fs::read_to_string(&fish_path).unwrap();
    assert!(fish.contains("\ncomplete -c qmpgate "), "{fish}");
    for subcommand in SUBCOMMANDS {
        assert!(
            zsh.contains(&format!("'{subcommand}:")),
            "zsh: {subcommand}"
        );
        assert!(
            fish.contains(&format!("-a \"{subcommand}\"")),
            "fish: {subcommand}"
        );
    }
    match Command::new("fish").arg("-n").arg(&fish_path).output() {
        Ok(out) => assert!(
            out.status.success(),
            "fish -n: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("fish not run ({e}): its script's syntax is not checked"),
    }
}
