#!/usr/bin/env bash
# Runs the whole test suite: set-up, the qmpgate binary (end-to-end tests spawn it),
# every Rust test in release mode (wasm runs ~10x slower in a debug host), the guest
# plugins' own unit tests, and a short fuzz run of each parser.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh test
cargo build --release --locked --workspace --bins
cargo test --release --locked --workspace
(cd guest-plugins && cargo test --locked -p qmp-policy -p hmp)
# Short fuzz runs of the parsers that face untrusted bytes. Sanitizer flags are
# nightly-only; RUSTC_BOOTSTRAP lets the stable toolchain (the only one here) use them.
(cd host && for target in framing qmp_request chardev_spec; do
    RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" -- -max_total_time=30 -print_final_stats=1
done)
