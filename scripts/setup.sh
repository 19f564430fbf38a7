#!/usr/bin/env bash
# Installs what qmpgate needs on a Debian machine with the Rust toolchain.
#   scripts/setup.sh run    what building and running needs (./run.sh)
#   scripts/setup.sh test   that plus what the tests need (./test.sh): socat, openssl,
#                           qemu-img, systemd-analyze, make, man, promtool, QEMU 10.0
#                           beside 7.2, qemu.qmp, cargo-fuzz, and libvirt with a tiny
#                           guest (scripts/setup-libvirt.sh: starts libvirtd)
# Idempotent: each step is skipped when already done.
set -euo pipefail
mode="${1:-test}"

rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# QEMU is what ./run.sh runs behind the gateway.
if ! command -v qemu-system-x86_64 >/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86
fi
[ "$mode" = run ] && exit 0

# socat is the plain relay in the benchmark; openssl makes the TLS tests' certificates;
# qemu-img (qemu-utils) the qcow2 disks the snapshot tests save into;
# systemd-analyze checks the units in contrib/systemd; make runs `make install` and
# man (man-db) renders the pages it installed.
if ! command -v socat >/dev/null || ! command -v openssl >/dev/null || ! command -v qemu-img >/dev/null \
    || ! command -v systemd-analyze >/dev/null || ! command -v make >/dev/null \
    || ! command -v man >/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        socat openssl qemu-utils systemd make man-db
fi

# promtool checks /metrics; it is unpacked from Debian's prometheus package under
# .tools/prometheus rather than installed, so that no Prometheus server is set up.
prom="$(cd "$(dirname "$0")/.." && pwd)/.tools/prometheus"
if [ ! -x "$prom/usr/bin/promtool" ]; then
    debs="$(mktemp -d)"
    chmod 0777 "$debs"
    # Package lists may be missing on a fresh machine where nothing above installed.
    (cd "$debs" && apt-get download -qq prometheus) \
        || { as_root apt-get update -qq && (cd "$debs" && apt-get download -qq prometheus); }
    mkdir -p "$prom"
    dpkg -x "$debs"/prometheus_*.deb "$prom"
    rm -rf "$debs"
fi

# QEMU 10.0 from bookworm-backports, unpacked side by side under .qemu/10.0 (the
# system's 7.2 stays): the end-to-end tests run against both versions. It runs with
# bookworm's libraries; QEMU_MODULE_DIR and -L point it at its own modules and firmware
# (tests/src/lib.rs does that).
qemu10="$(cd "$(dirname "$0")/.." && pwd)/.qemu/10.0"
if [ ! -x "$qemu10/usr/bin/qemu-system-x86_64" ]; then
    sources=/etc/apt/sources.list.d/qmpgate-backports.sources
    if [ ! -e "$sources" ]; then
        printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
            'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
            | as_root tee "$sources" >/dev/null
    fi
    as_root apt-get update -qq
    debs="$(mktemp -d)"
    # apt-get download writes into the current folder; _apt must be able to write there.
    chmod 0777 "$debs"
    (cd "$debs" && apt-get download -qq qemu-system-x86/bookworm-backports \
        qemu-system-common/bookworm-backports qemu-system-data/bookworm-backports \
        qemu-system-modules-opengl/bookworm-backports qemu-system-modules-spice/bookworm-backports)
    mkdir -p "$qemu10"
    for deb in "$debs"/*.deb; do dpkg -x "$deb" "$qemu10"; done
    rm -rf "$debs"
    "$qemu10/usr/bin/qemu-system-x86_64" --version | head -1
fi

if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
    python3 -m pip install -q qemu.qmp 2>/dev/null \
        || python3 -m pip install -q --break-system-packages qemu.qmp
fi

# cargo-fuzz drives the fuzz targets in host/fuzz (a short run is part of the tests).
if ! command -v cargo-fuzz >/dev/null; then
    cargo install -q --locked cargo-fuzz
fi

# libvirt 9.0 (libvirtd started by hand) and a guest kernel + initramfs for
# tests/tests/libvirt.rs.
"$(dirname "$0")/setup-libvirt.sh"
