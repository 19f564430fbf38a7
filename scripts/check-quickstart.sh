#!/usr/bin/env bash
# README's quick start as a user runs it: ./run.sh builds qmpgate and serves QMP on
# its socket in front of a fresh QEMU with the safe policy (a query answered by
# QEMU, a screendump refused and no file written), and SIGTERM stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
QMPGATE_SOCKET="$dir/qmpgate.sock" ./run.sh > "$dir/log" 2>&1 &
pid=$!
trap 'kill "$pid" 2> /dev/null || true; rm -rf "$dir"' EXIT
# run.sh may build first: wait for the socket while the gateway lives (10 min at most).
for _ in $(seq 6000); do
    [ -S "$dir/qmpgate.sock" ] && break
    kill -0 "$pid" 2> /dev/null || { cat "$dir/log"; echo "run.sh exited early"; exit 1; }
    sleep 0.1
done
[ -S "$dir/qmpgate.sock" ] || { cat "$dir/log"; echo "no socket from run.sh"; kill "$pid"; exit 1; }
python3 - "$dir" <<'PY'
import os, sys
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp import ExecuteError
d = sys.argv[1]
qmp = QEMUMonitorProtocol(os.path.join(d, "qmpgate.sock"))
qmp.connect()
assert qmp.cmd("query-status")["status"] == "prelaunch"
try:
    qmp.cmd("screendump", filename=os.path.join(d, "shot.ppm"))
    raise SystemExit("screendump was not refused")
except ExecuteError as e:
    assert "refused by the safe profile" in str(e), e
assert not os.path.exists(os.path.join(d, "shot.ppm"))
qmp.close()
PY
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
[ "$status" -eq 0 ] || { cat "$dir/log"; echo "qmpgate exited with $status on SIGTERM"; exit 1; }
grep -q "QEMU exited" "$dir/log" || { cat "$dir/log"; echo "QEMU was not stopped"; exit 1; }
echo "quick start: ok"
