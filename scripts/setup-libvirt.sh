#!/usr/bin/env bash
# libvirt for the end-to-end tests in tests/tests/libvirt.rs, on a Debian machine with
# no systemd (a container, CI): Debian's libvirt 9.0 daemon started by hand, and a
# tiny guest that boots under TCG and answers the ACPI power button.
#   scripts/setup-libvirt.sh          install, configure, start libvirtd, build the guest
#   scripts/setup-libvirt.sh stop     stop the libvirtd this script started
# Idempotent: each step is skipped when already done; a second run takes a second.
#
# libvirtd runs as root with the system's paths. libvirt has no way to give a
# privileged daemon its own state directories (`libvirtd --config` moves only
# libvirtd.conf; qemu.conf, /run/libvirt and /var/lib/libvirt are fixed when uid 0),
# and the unprivileged "session" daemon would run QEMU as another user who cannot
# read the tests' private directories. So this script writes /etc/libvirt/qemu.conf,
# but refuses to replace one it did not write: on a host with a libvirt of its own,
# run the tests elsewhere.
set -euo pipefail
mode="${1:-start}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pidfile=/run/qmpgate-libvirtd.pid
running() { [ -s "$pidfile" ] && as_root kill -0 "$(cat "$pidfile")" 2>/dev/null; }
stop() {
    if running; then
        local pid
        pid="$(cat "$pidfile")"
        as_root kill "$pid"
        # libvirtd removes its pidfile first and exits seconds later: wait for the process.
        for _ in $(seq 300); do as_root kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
}
if [ "$mode" = stop ]; then stop; exit 0; fi

# The daemon, virsh, and busybox for the guest's initramfs.
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
if ! installed libvirt-daemon || ! installed libvirt-daemon-driver-qemu \
    || ! installed libvirt-clients || ! installed busybox-static; then
    as_root apt-get update -qq
    # busybox-static replaces (conflicts with) busybox; both carry the applets used.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients busybox-static
fi

# libvirt's QEMU driver looks its default user up at start even when qemu.conf names
# another; Debian's libvirt-daemon-system (not installed: it wants systemd) creates it.
if ! getent passwd libvirt-qemu >/dev/null; then
    as_root useradd --system --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin libvirt-qemu
fi

# QEMU runs as root, with none of what a container lacks or forbids: no security
# driver (no AppArmor/SELinux), no cgroups, no mount namespaces, no ownership
# bookkeeping in extended attributes. stdio_handler = "file": QEMU's stdout/stderr go
# straight to the domain's log file, not through virtlogd (one daemon fewer).
marker="# Written by qmpgate's scripts/setup-libvirt.sh; it rewrites this file."
qemu_conf="$marker
user = \"root\"
group = \"root\"
security_driver = \"none\"
cgroup_controllers = [ ]
namespaces = [ ]
remember_owner = 0
stdio_handler = \"file\""
# libvirtd's own settings, kept apart from the package's (-f): a log file a failed CI
# run can show, and no TCP.
libvirtd_conf="$marker
log_outputs = \"3:file:/var/log/qmpgate-libvirtd.log\"
log_filters = \"1:qemu.qemu_process 1:qemu.qemu_monitor_json 3:util 3:rpc\""
changed=no
write_conf() { # path content
    local path="$1" content="$2"
    if [ -e "$path" ] && [ "$(cat "$path")" = "$content" ]; then return; fi
    if [ -e "$path" ] && ! grep -qxF "$marker" "$path"; then
        echo "setup-libvirt: $path exists and was not written by this script; not replacing it" >&2
        echo "setup-libvirt: (this host has a libvirt of its own: run the libvirt tests elsewhere)" >&2
        exit 1
    fi
    as_root mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" | as_root tee "$path" >/dev/null
    changed=yes
}
write_conf /etc/libvirt/qemu.conf "$qemu_conf"
write_conf /etc/libvirt/qmpgate-libvirtd.conf "$libvirtd_conf"
if [ "$changed" = yes ]; then stop; fi

if ! running; then
    as_root libvirtd -d -f /etc/libvirt/qmpgate-libvirtd.conf -p "$pidfile"
    # Ready when it answers (the QEMU driver probes the system's QEMU first).
    for _ in $(seq 100); do
        as_root virsh -q -c qemu:///system version >/dev/null 2>&1 && break
        sleep 0.2
    done
    as_root virsh -q -c qemu:///system version >/dev/null \
        || { echo "setup-libvirt: libvirtd did not start; see /var/log/qmpgate-libvirtd.log" >&2; exit 1; }
fi

# The guest: Debian's cloud kernel (virtio, serial console, ACPI; few modules) and an
# initramfs of busybox whose /init prints a marker on the serial console and powers
# off when the ACPI power button is pressed (`virsh shutdown`). The button driver and
# evdev are modules in that kernel (CONFIG_ACPI_BUTTON=m, CONFIG_INPUT_EVDEV=m, no
# dependencies), so the initramfs loads them. Rebuilt when this recipe changes.
guest="$repo/.tools/libvirt-guest"
read -r -d '' init <<'EOF' || true
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in /lib/modules/*.ko; do insmod "$module"; done
# Open every power button's event device here, before the marker, so that a press
# right after the marker is not lost: evdev queues events from the open on.
n=3
for dev in /sys/class/input/event*; do
    [ "$(cat "$dev/device/name" 2>/dev/null)" = "Power Button" ] || continue
    eval "exec $n</dev/input/${dev##*/}"
    # One input event (24 bytes) from the button is a press.
    (dd bs=24 count=1 of=/dev/null <&$n 2>/dev/null
     echo "qmpgate-guest: power button, powering off"
     poweroff -f) &
    n=$((n + 1))
done
[ "$n" -gt 3 ] || echo "qmpgate-guest: no ACPI power button"
echo "qmpgate-guest: ready"
while :; do sleep 3600; done
EOF
modules="kernel/drivers/acpi/button.ko kernel/drivers/input/evdev.ko"
kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
stamp="$(printf '%s\n' "$init" "$modules" "$kernel_pkg" | sha256sum | cut -c1-16)"
if [ "$(cat "$guest/stamp" 2>/dev/null)" != "$stamp" ]; then
    [ -n "$kernel_pkg" ] || { as_root apt-get update -qq;
        kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')"; }
    work="$(mktemp -d)"
    # apt-get download writes into the current folder; _apt must be able to write there.
    chmod 0777 "$work"
    (cd "$work" && apt-get download -qq "$kernel_pkg")
    dpkg -x "$work"/linux-image-*.deb "$work/kernel"
    mkdir -p "$work/initramfs"/{bin,dev,proc,sys,lib/modules}
    cp /bin/busybox "$work/initramfs/bin/busybox"
    printf '%s\n' "$init" >"$work/initramfs/init"
    chmod 0755 "$work/initramfs/init"
    for module in $modules; do
        cp "$work"/kernel/lib/modules/*/"$module" "$work/initramfs/lib/modules/"
    done
    mkdir -p "$guest"
    cp "$work"/kernel/boot/vmlinuz-* "$guest/vmlinuz"
    (cd "$work/initramfs" && find . | /bin/busybox cpio -o -H newc | gzip -1) >"$guest/initrd.img"
    echo "$kernel_pkg" >"$guest/kernel-package"
    echo "$stamp" >"$guest/stamp"
    rm -rf "$work"
fi
