//! Builds the guest plugins so the binary can embed its default plugins.

include!("../../guest-plugins/build_support.rs");

fn main() {
    let out = build_guest_plugins();
    println!(
        "cargo:rustc-env=QMPGATE_BUILTIN_POLICY={}",
        out.join("qmp_policy.wasm").display()
    );
    for (var, file) in [
        ("QMPGATE_BUILTIN_HMP", "hmp.wasm"),
        ("QMPGATE_BUILTIN_AUDIT", "audit.wasm"),
    ] {
        println!("cargo:rustc-env={var}={}", out.join(file).display());
    }
}
