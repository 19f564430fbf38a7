#!/usr/bin/env bash
# Regenerates README.md's policy table from the built-in policy's own table
# (qmpgate policy show --markdown); tests/tests/policy.rs checks they match.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${QMPGATE:-target/release/qmpgate}"
table="$("$bin" policy show --profile safe --markdown)"
python3 - "$table" <<'PY'
import sys
begin, end = "<!-- policy-table:begin -->\n", "<!-- policy-table:end -->"
text = open("README.md").read()
a, b = text.index(begin) + len(begin), text.index(end)
open("README.md", "w").write(text[:a] + sys.argv[1] + "\n" + text[b:])
PY
