// Shared by the build scripts of `host/plugin` (which embeds the built-in plugins) and
// `tests` (which loads the fixtures): builds the guest workspace for
// wasm32-wasip2 into the outer build's target folder and returns the directory
// holding the `.wasm` components.
//
// It is `include!`d rather than a crate because build scripts cannot share a
// dependency that lives in a workspace they are not part of.

/// Builds every guest plugin (release) and returns the output directory.
fn build_guest_plugins() -> std::path::PathBuf {
    use std::path::PathBuf;
    use std::process::Command;

    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    // The repository's root: the nearest folder up that holds `guest-plugins`.
    let root = manifest_dir
        .ancestors()
        .find(|dir| dir.join("guest-plugins").is_dir())
        .expect("the package lives inside the qmpgate repository");
    let guests = root.join("guest-plugins").canonicalize().unwrap();
    let wit = root.join("wit").canonicalize().unwrap();
    for dir in ["sdk", "qmp-policy", "hmp", "audit", "fixtures", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", guests.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", wit.display());

    // Under the outer build's own target folder (OUT_DIR is
    // <target>/<profile>/build/<package>-<hash>/out), never in the source tree, and
    // shared by both build scripts of one profile, so the guests build once.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out_dir
        .ancestors()
        .nth(3)
        .map(|profile| profile.join("guest-plugins"))
        .unwrap_or_else(|| out_dir.join("guest-plugins"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .args(["build", "--release", "--locked", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags and target are for the host, not for wasm.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("cannot run cargo to build the guest plugins");
    if !status.success() {
        panic!(
            "building the guest plugins failed ({status}); is the target installed? \
             run: rustup target add wasm32-wasip2"
        );
    }
    target_dir.join("wasm32-wasip2/release")
}
