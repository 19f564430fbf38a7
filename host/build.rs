//! Builds the guest plugins so the binary can embed its default plugins.

include!("../guest-plugins/build_support.rs");

fn main() {
    let out = build_guest_plugins();
    println!(
        "cargo:rustc-env=QMPGATE_BUILTIN_POLICY={}",
        out.join("qmp_policy.wasm").display()
    );
    println!(
        "cargo:rustc-env=QMPGATE_BUILTIN_HMP={}",
        out.join("hmp.wasm").display()
    );
}
