#!/usr/bin/env bash
# Builds everything and runs qmpgate in front of a fresh QEMU (-M none, TCG) with the
# built-in "safe" policy. Clients connect to ./qmpgate.sock (or $QMPGATE_SOCKET), e.g.
#   socat - UNIX-CONNECT:qmpgate.sock
# Extra arguments go to qmpgate (see: target/release/qmpgate --help).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh run
cargo build --release --locked -p qmpgate
socket="${QMPGATE_SOCKET:-$PWD/qmpgate.sock}"
echo "qmpgate: clients connect to $socket" >&2
exec target/release/qmpgate run --listen "socket,id=qmp,path=$socket,server=on" "$@" \
    -- qemu-system-x86_64 -M none -nodefaults -display none -S
