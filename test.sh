#!/usr/bin/env bash
# Runs the whole test suite: set-up, the qmpgate binary (end-to-end tests spawn it),
# `cargo install` of it, README's quick start (run.sh), every Rust test in release
# mode (wasm runs ~10x slower in a debug host) with the end-to-end tests against QEMU
# 7.2, those again against QEMU 10.0, the guest plugins' own unit tests, and a short
# fuzz run of each parser.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh test
cargo build --release --locked --workspace --bins
# `cargo install --path host` as a user runs it, from another folder into a scratch
# root, writes nothing into the source tree. CARGO_TARGET_DIR reuses the build above
# (the members share nix's features for this).
repo="$PWD"
scratch="$(mktemp -d)"
tree_before="$(git status --porcelain --ignored)"
(cd "$scratch" && CARGO_TARGET_DIR="$repo/target" cargo install -q --locked --path "$repo/host" --root "$scratch")
"$scratch/bin/qmpgate" --version >/dev/null
[ "$(git status --porcelain --ignored)" = "$tree_before" ] \
    || { echo "cargo install wrote into the source tree:"; git status --porcelain --ignored; exit 1; }
rm -rf "$scratch"
# README's quick start (./run.sh) serves a client and stops on SIGTERM.
scripts/check-quickstart.sh
# QMPGATE_TEST_QEMU picks the QEMU the end-to-end tests start (tests/src/lib.rs).
QMPGATE_TEST_QEMU=7.2 cargo test --release --locked --workspace
# The end-to-end tests again, against QEMU 10.0; those with qemu_7_2 or qemu_10_0 in
# their name start their versions themselves and have run above.
QMPGATE_TEST_QEMU=10.0 cargo test --release --locked -p qmpgate-tests -- \
    --skip qemu_7_2 --skip qemu_10_0
(cd guest-plugins && cargo test --locked -p qmp-policy -p hmp)
# Short fuzz runs of the parsers that face untrusted bytes. Sanitizer flags are
# nightly-only; RUSTC_BOOTSTRAP lets the stable toolchain (the only one here) use them.
(cd host && for target in framing qjson qmp_request chardev_spec; do
    RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" -- -max_total_time=30 -print_final_stats=1
done)
