//! Builds the guest plugins and test fixtures that the end-to-end tests load.

include!("../guest-plugins/build_support.rs");

fn main() {
    let out = build_guest_plugins();
    println!("cargo:rustc-env=QMPGATE_GUEST_DIR={}", out.display());
}
