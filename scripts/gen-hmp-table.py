#!/usr/bin/env python3
"""Generate guest-plugins/hmp/src/table.rs: QEMU's HMP command tables.

The HMP plugin parses command lines with QEMU's own grammar, so it needs QEMU's
own command table: every command's names (`quit|q`), its `args_type` string (the
grammar of its arguments, read by monitor/hmp.c:monitor_parse_arguments) and,
for `info`, the sub-table. Those come from hmp-commands.hx and
hmp-commands-info.hx, which differ between QEMU versions; qmpgate supports the
QEMU of Debian bookworm (7.2) and bookworm-backports (10.0), so the table
records each command's args_type for each version (absent where the version
has no such command).

Usage:
    apt-get source qemu                       # bookworm: qemu-7.2+dfsg
    apt-get source -t bookworm-backports qemu # qemu-10.0.2+ds
    scripts/gen-hmp-table.py QEMU_7_2_SRC QEMU_10_0_SRC > guest-plugins/hmp/src/table.rs

Entries under `#if defined(TARGET_...)` are kept only when the condition names
TARGET_I386 (the x86_64 system emulator is built from the i386 target); entries
under a CONFIG_* condition are kept, since Debian's x86 build may enable it and
a command QEMU lacks only makes QEMU answer "unknown command".
"""

import os
import re
import sys

VERSIONS = [("7.2", "v7_2"), ("10.0", "v10_0")]


def condition_holds(cond):
    """Whether an #if condition can hold for Debian's qemu-system-x86_64."""
    targets = re.findall(r"TARGET_\w+", cond)
    if targets:
        return "TARGET_I386" in targets
    return True


def read_hx(path):
    """Yields (names, args_type, has_cmd, is_sub_table, condition) per entry."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    conds = []
    in_doc = False
    block = None
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("SRST"):
            in_doc = True
            continue
        if line.startswith("ERST"):
            in_doc = False
            continue
        if in_doc or line.startswith("HXCOMM"):
            continue
        if line.startswith("#if"):
            cond = line
            while cond.endswith("\\"):
                cond = cond[:-1] + " " + lines[i].strip()
                i += 1
            conds.append(cond)
            continue
        if line.startswith("#endif"):
            conds.pop()
            continue
        if line.startswith("#else") or line.startswith("#elif"):
            raise SystemExit(f"{path}: unsupported {line!r}")
        stripped = line.strip()
        if stripped == "{":
            block = []
            continue
        if stripped in ("},", "}") and block is not None:
            text = "\n".join(block)
            block = None
            fields = {}
            for m in re.finditer(r"\.(\w+)\s*=\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+|[^,\n]+)", text):
                value = m.group(2).strip()
                if value.startswith('"'):
                    value = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", value))
                fields[m.group(1)] = value
            if "name" not in fields:
                continue
            cond = " && ".join(c for c in conds)
            if not all(condition_holds(c) for c in conds):
                continue
            yield (
                fields["name"],
                fields.get("args_type", ""),
                "cmd" in fields or "cmd_info_hrt" in fields,
                "sub_table" in fields,
                cond,
            )
            continue
        if block is not None:
            block.append(line)


def merge(sources, hx):
    """One row per names string: {version: (args_type, has_cmd, sub, cond)}."""
    rows = {}
    order = []
    for (version, _), src in zip(VERSIONS, sources):
        seen = set()
        for names, args, has_cmd, sub, cond in read_hx(os.path.join(src, hx)):
            for name in names.split("|"):
                if name in seen:
                    raise SystemExit(f"{version} {hx}: duplicate name {name}")
                seen.add(name)
            if names not in rows:
                rows[names] = {}
                order.append(names)
            rows[names][version] = (args, has_cmd, sub, cond)
    return [(names, rows[names]) for names in sorted(order)]


def rust_str(s):
    if "\\" in s or '"' in s:
        raise SystemExit(f"unexpected escape in {s!r}")
    return '"' + s + '"'


def emit(name, rows):
    out = [f"pub const {name}: &[Entry] = &["]
    for names, per in rows:
        out.append("    Entry {")
        out.append(f"        names: {rust_str(names)},")
        for version, field in VERSIONS:
            if version in per:
                args, has_cmd, sub, cond = per[version]
                out.append(
                    f"        {field}: Some(Args {{ args_type: {rust_str(args)}, "
                    f"has_handler: {'true' if has_cmd else 'false'}, "
                    f"sub_table: {'true' if sub else 'false'} }}),"
                )
            else:
                out.append(f"        {field}: None,")
        conds = sorted({per[v][3] for v, _ in VERSIONS if v in per and per[v][3]})
        if conds:
            out.append(f"        // {' / '.join(conds)}")
        out.append("    },")
    out.append("];")
    return "\n".join(out)


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sources = sys.argv[1:]
    print(
        """//! QEMU's HMP command tables (hmp-commands.hx, hmp-commands-info.hx) for QEMU
//! 7.2 and 10.0: one row per names string (`quit|q`), with each version's
//! `args_type` (`None`: that version has no such command).
//!
//! @generated by scripts/gen-hmp-table.py; do not edit. The sources are those of
//! Debian bookworm (7.2, `apt-get source qemu`) and bookworm-backports (10.0,
//! `apt-get source -t bookworm-backports qemu`); regenerate with
//!
//! ```text
//! scripts/gen-hmp-table.py qemu-7.2.0 qemu-10.0.2 > guest-plugins/hmp/src/table.rs
//! (cd guest-plugins && cargo fmt -p hmp)
//! ```
//!
//! Layout: [`COMMANDS`] (the top level), [`INFO_COMMANDS`] (the sub-table of
//! `info`). Rows under `#if defined(TARGET_...)` without TARGET_I386 are left out
//! (qmpgate fronts qemu-system-x86_64); the condition of every other conditional
//! row is noted beside it."""
    )
    print()
    print("#![allow(clippy::all)]")
    print()
    print("use crate::parse::{Args, Entry};")
    print()
    print("/// hmp-commands.hx: the top-level commands.")
    print(emit("COMMANDS", merge(sources, "hmp-commands.hx")))
    print()
    print("/// hmp-commands-info.hx: the sub-commands of `info`.")
    print(emit("INFO_COMMANDS", merge(sources, "hmp-commands-info.hx")))


if __name__ == "__main__":
    main()
