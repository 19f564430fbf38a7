#!/usr/bin/env bash
# Runs the whole test suite: set-up, the qmpgate binary (end-to-end tests spawn it),
# every Rust test in release mode (wasm runs ~10x slower in a debug host), and the
# policy plugin's own unit tests.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
cargo build --release --locked --workspace --bins
cargo test --release --locked --workspace
(cd guest-plugins && cargo test --locked -p qmp-policy -p hmp)
