#!/usr/bin/env bash
# Installs what building and testing qmpgate needs on a Debian machine with the
# Rust toolchain. Idempotent: each step is skipped when already done.
set -euo pipefail

rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# QEMU is the real upstream in tests; socat the plain relay in the benchmark; openssl
# makes the TLS tests' certificates.
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v socat >/dev/null || ! command -v openssl >/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 socat openssl
fi

if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
    python3 -m pip install -q qemu.qmp 2>/dev/null \
        || python3 -m pip install -q --break-system-packages qemu.qmp
fi

# cargo-fuzz drives the fuzz targets in host/fuzz (a short run is part of the tests).
if ! command -v cargo-fuzz >/dev/null; then
    cargo install -q --locked cargo-fuzz
fi
