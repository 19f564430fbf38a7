//! QEMU's HMP command-line reader, ported literally from monitor/hmp.c (identical in
//! QEMU 7.2 and 10.0 for everything ported here): `get_command_name`,
//! `monitor_parse_command` (with the `info` sub-table), `get_str`, `key_get_info`,
//! `is_valid_option` and `monitor_parse_arguments`, which walks a command's
//! `args_type` string.
//!
//! What is not ported is refused (an error, so the line is invalid): expressions
//! in number arguments (`get_expr` evaluates `0x1000+4`, `$eax`, `'a'`; only plain
//! literals are read here), hex or fractional sizes (`qemu_strtosz`, whose corner
//! cases differ between 7.2 and 10.0), and the unused `T` type. Values longer than
//! the 1024-byte buffer QEMU reads them into are refused rather than truncated.
//!
//! Layout: [`Entry`]/[`Args`] (the table's row type, filled by `table.rs`);
//! [`Parsed`], [`Arg`], [`Value`] (a parsed line); [`parse`] (one QEMU version's
//! reading of a line); the byte-level helpers below it.

use crate::opts::{self, Opts};
use crate::table::{COMMANDS, INFO_COMMANDS};

/// QEMU's `char buf[1024]` in `monitor_parse_arguments`: `get_str` keeps at most
/// 1023 bytes of an argument and silently drops the rest, so a longer value would
/// mean something else to QEMU than it says; such values are refused.
pub const ARG_BUF_MAX: usize = 1023;

/// `char cmdname[256]` in `monitor_parse_command`: longer names are truncated
/// before the table lookup (and then match nothing).
const CMDNAME_MAX: usize = 255;

/// Counts in a `/fmt` are accumulated in a C `int`; nine digits cannot overflow it.
const FORMAT_COUNT_DIGITS_MAX: usize = 9;

/// One row of QEMU's command table.
#[derive(Debug)]
pub struct Entry {
    /// `.name`: the primary name and its aliases, `|`-separated.
    pub names: &'static str,
    /// The row as QEMU 7.2 has it; `None` if 7.2 has no such command.
    pub v7_2: Option<Args>,
    /// The row as QEMU 10.0 has it; `None` if 10.0 has no such command.
    pub v10_0: Option<Args>,
}

/// What one QEMU version says about a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Args {
    /// `.args_type`: the grammar of the arguments.
    pub args_type: &'static str,
    /// Whether the table names a handler; rows without one (`info jit`) get theirs
    /// registered at run time, or QEMU says "not available".
    pub has_handler: bool,
    /// Whether the command has a sub-table (`info`).
    pub sub_table: bool,
}

impl Entry {
    /// The primary name (the first of `names`).
    pub fn primary(&self) -> &'static str {
        self.names.split('|').next().unwrap_or(self.names)
    }

    /// This row in `version`, if that version has the command.
    pub fn args(&self, version: Version) -> Option<Args> {
        match version {
            Version::V7_2 => self.v7_2,
            Version::V10_0 => self.v10_0,
        }
    }
}

/// The QEMU versions whose grammar qmpgate follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V7_2,
    V10_0,
}

impl Version {
    pub const ALL: [Version; 2] = [Version::V7_2, Version::V10_0];

    pub fn label(self) -> &'static str {
        match self {
            Version::V7_2 => "7.2",
            Version::V10_0 => "10.0",
        }
    }
}

/// A line as one QEMU version reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The command name as typed (a name or alias of the row).
    pub name: String,
    /// The row's primary name.
    pub primary: &'static str,
    /// For `info X`: X as typed and its row's primary name.
    pub sub: Option<(String, &'static str)>,
    /// The arguments that were present, in `args_type` order.
    pub args: Vec<Arg>,
}

impl Parsed {
    /// The argument named `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.args.iter().find(|a| a.key == key).map(|a| &a.value)
    }
}

/// One parsed argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    /// Its key in `args_type` (`uri`, `detach`).
    pub key: String,
    /// Its type letter in `args_type` (`s`, `F`, `-`, `O`, ...), which decides how
    /// the value is written back.
    pub kind: u8,
    pub value: Value,
}

/// A parsed argument value, with what is needed to write it back as typed where
/// QEMU offers more than one spelling (hex numbers, size suffixes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `s`, `F`, `B`: read by `get_str`.
    Str(String),
    /// `S`: the rest of the line, raw.
    Rest(String),
    /// `i`, `l`, `M`: a literal (`hex`: it was written `0x...`). `M` is in MiB.
    Int { value: i64, hex: bool },
    /// `i` after a `.` (`index:i.`): written `.N`.
    Index { value: i64, hex: bool },
    /// `o`: decimal digits and an optional suffix (upper case; none means MiB).
    Size { number: u64, suffix: Option<u8> },
    /// `b`: `on` or `off`.
    Bool(bool),
    /// `-x`: the option (its letter) was given.
    Flag(u8),
    /// `-x value` (an `-xs` option): its letter and its value, read by `get_str`.
    Option { letter: u8, value: String },
    /// `O` (QemuOpts), and the `s`/`S` arguments QEMU reads as QemuOpts or keyval
    /// (`chardev-add`'s, `object_add`'s).
    Opts(Opts),
    /// `/`: a format as typed (`/4xw`).
    Format(Format),
}

/// A `/count format size` as typed; QEMU fills what is missing from the previous
/// command's format (monitor state the gateway cannot see).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    /// Whether a `/` was typed at all.
    pub typed: bool,
    pub count: Option<u32>,
    /// `o d u x i c` (the last one typed).
    pub format: Option<u8>,
    /// Unit size in bytes, 1 2 4 8 (`b h w g`/`L`, the last one typed).
    pub size: Option<u8>,
}

impl Value {
    /// The value as JSON for the policy: the typed reading, as QEMU's QDict has it.
    pub fn to_json(&self, kind: u8) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::Str(s) | Value::Rest(s) | Value::Option { value: s, .. } => json!(s),
            Value::Int { value, .. } | Value::Index { value, .. } => {
                if kind == b'M' {
                    json!(value.wrapping_mul(1 << 20))
                } else {
                    json!(value)
                }
            }
            Value::Size { number, suffix } => json!(size_bytes(*number, *suffix)),
            Value::Bool(b) => json!(b),
            Value::Flag(_) => json!(true),
            Value::Opts(o) => o.to_json(),
            Value::Format(f) => json!({
                "count": f.count.unwrap_or(1),
                "format": f.format.map(|c| (c as char).to_string()),
                "size": f.size,
            }),
        }
    }
}

/// The bytes a `Size` stands for (checked when parsed, so it fits).
pub fn size_bytes(number: u64, suffix: Option<u8>) -> u64 {
    number.saturating_mul(suffix_mul(suffix.unwrap_or(b'M')).unwrap_or(1))
}

/// util/cutils.c:suffix_mul with unit 1024.
fn suffix_mul(c: u8) -> Option<u64> {
    let shift = match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Why QEMU (or this port) does not read a line.
pub type Error = String;

/// C's `isspace` in the C locale (QEMU's `qemu_isspace`); bytes above 0x7f are not
/// spaces (U+00A0 is two bytes neither of which is a space in a UTF-8 or C locale).
pub fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// C's `isgraph` in the C locale.
fn is_graph(c: u8) -> bool {
    (0x21..=0x7e).contains(&c)
}

/// A NUL-terminated view of a byte string, as the C code walks it: reading past
/// the end yields 0.
struct Cursor<'a> {
    s: &'a [u8],
    p: usize,
}

impl Cursor<'_> {
    fn at(&self, i: usize) -> u8 {
        self.s.get(i).copied().unwrap_or(0)
    }

    fn cur(&self) -> u8 {
        self.at(self.p)
    }

    fn skip_spaces(&mut self) {
        while is_space(self.cur()) {
            self.p += 1;
        }
    }
}

/// Looks a name up in a table as `search_dispatch_table`/`hmp_compare_cmd` do.
fn lookup(
    table: &'static [Entry],
    name: &[u8],
    version: Version,
) -> Option<(&'static Entry, Args)> {
    table.iter().find_map(|e| {
        let args = e.args(version)?;
        e.names
            .split('|')
            .any(|n| n.as_bytes() == name)
            .then_some((e, args))
    })
}

/// `get_command_name`: skip spaces, then the name runs to `/`, a space or the end.
fn get_command_name(c: &mut Cursor) -> Option<Vec<u8>> {
    c.skip_spaces();
    if c.cur() == 0 {
        return None;
    }
    let start = c.p;
    while c.cur() != 0 && c.cur() != b'/' && !is_space(c.cur()) {
        c.p += 1;
    }
    let end = c.p.min(start + CMDNAME_MAX);
    Some(c.s[start..end].to_vec())
}

/// Whether `version` has the command (and `info` sub-command) the line names, so
/// that its failure to parse the line counts as a reading of it.
pub fn command_exists(line: &[u8], version: Version) -> bool {
    let mut c = Cursor { s: line, p: 0 };
    let Some(name) = get_command_name(&mut c) else {
        return false;
    };
    let Some((_, args)) = lookup(COMMANDS, &name, version) else {
        return false;
    };
    c.skip_spaces();
    if !args.sub_table || c.cur() == 0 {
        return true;
    }
    get_command_name(&mut c).is_some_and(|sub| lookup(INFO_COMMANDS, &sub, version).is_some())
}

/// QEMU `version`'s reading of `line` (`handle_hmp_command` up to the handler).
pub fn parse(line: &[u8], version: Version) -> Result<Parsed, Error> {
    if line.contains(&0) {
        // QEMU reads the line as a C string: a NUL ends it early.
        return Err("NUL byte in the command line".into());
    }
    let mut c = Cursor { s: line, p: 0 };
    let name = get_command_name(&mut c).ok_or("empty command line")?;
    let typed = text(&name);
    let (entry, mut args) =
        lookup(COMMANDS, &name, version).ok_or_else(|| format!("unknown command: '{typed}'"))?;
    c.skip_spaces();
    let mut sub = None;
    if args.sub_table && c.cur() != 0 {
        let sub_name = get_command_name(&mut c).ok_or("empty command line")?;
        let sub_typed = text(&sub_name);
        let (sub_entry, sub_args) = lookup(INFO_COMMANDS, &sub_name, version)
            .ok_or_else(|| format!("unknown command: '{typed} {sub_typed}'"))?;
        c.skip_spaces();
        sub = Some((sub_typed, sub_entry.primary()));
        args = sub_args;
    }
    let args = parse_arguments(&mut c, args.args_type, entry.primary())?;
    let mut parsed = Parsed {
        name: typed,
        primary: entry.primary(),
        sub,
        args,
    };
    opts::read_embedded(&mut parsed)?;
    Ok(parsed)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `key_get_info`: the next `key:` of the type string and what follows the colon.
fn key_get_info(t: &[u8]) -> Option<(&[u8], &[u8])> {
    let t = t.strip_prefix(b",").unwrap_or(t);
    let colon = t.iter().position(|&b| b == b':')?;
    Some((&t[..colon], &t[colon + 1..]))
}

/// `is_valid_option`: whether `-c` occurs anywhere in the rest of the type string
/// (a plain substring search, as QEMU does; `c` is 0 at the end of the line).
fn is_valid_option(c: u8, t: &[u8]) -> bool {
    let option: &[u8] = if c == 0 { b"-" } else { &[b'-', c] };
    t.windows(option.len()).any(|w| w == option)
}

/// `monitor_parse_arguments`.
fn parse_arguments(c: &mut Cursor, args_type: &str, cmd: &str) -> Result<Vec<Arg>, Error> {
    let mut out = Vec::new();
    let mut t: &[u8] = args_type.as_bytes();
    // Whether the previous argument was a number: `get_expr` would read an
    // operator after it as part of the expression.
    while let Some((key, rest)) = key_get_info(t) {
        let key = text(key);
        let kind = rest.first().copied().unwrap_or(0);
        t = rest.get(1..).unwrap_or(&[]);
        let opt = |t: &mut &[u8], ch: u8| -> bool {
            if t.first() == Some(&ch) {
                *t = &t[1..];
                true
            } else {
                false
            }
        };
        match kind {
            b'F' | b'B' | b's' => {
                c.skip_spaces();
                if opt(&mut t, b'?') && c.cur() == 0 {
                    continue;
                }
                let value = get_str(c).map_err(|e| {
                    let what = match kind {
                        b'F' => "filename expected",
                        b'B' => "block device name expected",
                        _ => "string expected",
                    };
                    format!(
                        "{cmd}: {what}{}",
                        e.map(|e| format!(" ({e})")).unwrap_or_default()
                    )
                })?;
                out.push(Arg {
                    key,
                    kind,
                    value: Value::Str(value),
                });
            }
            b'O' => {
                // qemu_find_opts(key): the lists HMP reads with `O` accept any key.
                let implied = match key.as_str() {
                    "device" => "driver",
                    "netdev" => "type",
                    _ => return Err(format!("{cmd}: unknown type 'O'")),
                };
                c.skip_spaces();
                if c.cur() == 0 {
                    continue;
                }
                let value = get_str(c).map_err(|e| {
                    format!("{cmd}: {}", e.unwrap_or_else(|| "string expected".into()))
                })?;
                let opts = opts::parse_qemu_opts(&value, implied, true)?;
                out.push(Arg {
                    key,
                    kind,
                    value: Value::Opts(opts),
                });
            }
            b'/' => {
                c.skip_spaces();
                let mut f = Format {
                    typed: false,
                    count: None,
                    format: None,
                    size: None,
                };
                if c.cur() == b'/' {
                    f.typed = true;
                    c.p += 1;
                    if c.cur().is_ascii_digit() {
                        let start = c.p;
                        while c.cur().is_ascii_digit() {
                            c.p += 1;
                        }
                        if c.p - start > FORMAT_COUNT_DIGITS_MAX {
                            return Err(format!("{cmd}: format count too large"));
                        }
                        let digits = std::str::from_utf8(&c.s[start..c.p]).unwrap_or("0");
                        f.count = Some(digits.parse().unwrap_or(0));
                    }
                    loop {
                        match c.cur() {
                            ch @ (b'o' | b'd' | b'u' | b'x' | b'i' | b'c') => f.format = Some(ch),
                            b'b' => f.size = Some(1),
                            b'h' => f.size = Some(2),
                            b'w' => f.size = Some(4),
                            b'g' | b'L' => f.size = Some(8),
                            _ => break,
                        }
                        c.p += 1;
                    }
                    if c.cur() != 0 && !is_space(c.cur()) {
                        return Err(format!("invalid char in format: '{}'", c.cur() as char));
                    }
                }
                out.push(Arg {
                    key,
                    kind,
                    value: Value::Format(f),
                });
            }
            b'i' | b'l' | b'M' => {
                c.skip_spaces();
                let mut index = false;
                if opt(&mut t, b'?') {
                    if c.cur() == 0 {
                        continue;
                    }
                } else if opt(&mut t, b'.') {
                    if c.cur() == b'.' {
                        c.p += 1;
                        c.skip_spaces();
                        index = true;
                    } else {
                        continue;
                    }
                }
                let (value, hex) = get_number(c)?;
                if kind == b'i' && (value >> 32) & 0xffff_ffff != 0 {
                    return Err(format!("'{cmd}' has failed: integer is for 32-bit values"));
                }
                if kind == b'M' && value < 0 {
                    return Err("enter a positive value".into());
                }
                let value = if index {
                    Value::Index { value, hex }
                } else {
                    Value::Int { value, hex }
                };
                out.push(Arg { key, kind, value });
            }
            b'o' => {
                c.skip_spaces();
                if opt(&mut t, b'?') && c.cur() == 0 {
                    continue;
                }
                let value = get_size(c)?;
                out.push(Arg { key, kind, value });
            }
            b'b' => {
                c.skip_spaces();
                let start = c.p;
                while is_graph(c.cur()) {
                    c.p += 1;
                }
                let value = match &c.s[start..c.p] {
                    b"on" => true,
                    b"off" => false,
                    _ => return Err("Expected 'on' or 'off'".into()),
                };
                out.push(Arg {
                    key,
                    kind,
                    value: Value::Bool(value),
                });
            }
            b'-' => {
                let letter = t.first().copied().unwrap_or(0);
                if letter == 0 {
                    return Err(format!("{cmd}: unknown type '-'"));
                }
                t = &t[1..];
                let tmp = c.p;
                c.skip_spaces();
                if c.cur() == b'-' {
                    c.p += 1;
                    let typed = c.cur();
                    if letter != typed {
                        if !is_valid_option(typed, t) {
                            return Err(format!("{cmd}: unsupported option -{}", typed as char));
                        }
                        // skip_key: this option is not the one typed; QEMU
                        // rewinds and leaves `t` as it is (even before an `s`).
                        c.p = tmp;
                    } else if opt(&mut t, b's') {
                        c.p += 1;
                        c.skip_spaces();
                        let value = get_str(c).map_err(|_| {
                            format!("{cmd}: value expected for -{}", letter as char)
                        })?;
                        out.push(Arg {
                            key,
                            kind,
                            value: Value::Option { letter, value },
                        });
                    } else {
                        c.p += 1;
                        out.push(Arg {
                            key,
                            kind,
                            value: Value::Flag(letter),
                        });
                    }
                } else {
                    opt(&mut t, b's');
                }
            }
            b'S' => {
                c.skip_spaces();
                if opt(&mut t, b'?') && c.cur() == 0 {
                    continue;
                }
                if c.cur() == 0 {
                    return Err(format!("{cmd}: string expected"));
                }
                let value = text(&c.s[c.p..]);
                c.p = c.s.len();
                out.push(Arg {
                    key,
                    kind,
                    value: Value::Rest(value),
                });
            }
            other => {
                // `T` (a duration) is used by no command of 7.2 or 10.0.
                return Err(format!("{cmd}: unknown type '{}'", other as char));
            }
        }
    }
    c.skip_spaces();
    if c.cur() != 0 {
        return Err(format!("{cmd}: extraneous characters at the end of line"));
    }
    Ok(out)
}

/// `get_str`: a bare word up to a space, or a `"..."` string with the escapes
/// `\n \r \\ \' \"`. `Err(None)`: nothing there; `Err(Some(why))`: malformed.
fn get_str(c: &mut Cursor) -> Result<String, Option<String>> {
    c.skip_spaces();
    if c.cur() == 0 {
        return Err(None);
    }
    let mut buf = Vec::new();
    if c.cur() == b'"' {
        c.p += 1;
        while c.cur() != 0 && c.cur() != b'"' {
            if c.cur() == b'\\' {
                c.p += 1;
                let e = c.cur();
                c.p += 1;
                buf.push(match e {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b'\\' | b'\'' | b'"' => e,
                    _ => {
                        return Err(Some(format!("unsupported escape code: '\\{}'", e as char)));
                    }
                });
            } else {
                buf.push(c.cur());
                c.p += 1;
            }
        }
        if c.cur() != b'"' {
            return Err(Some("unterminated string".into()));
        }
        c.p += 1;
    } else {
        while c.cur() != 0 && !is_space(c.cur()) {
            buf.push(c.cur());
            c.p += 1;
        }
    }
    if buf.len() > ARG_BUF_MAX {
        return Err(Some(format!(
            "argument longer than QEMU's {ARG_BUF_MAX}-byte buffer (QEMU would truncate it)"
        )));
    }
    Ok(text(&buf))
}

/// A literal where QEMU's `get_expr` reads an expression: an optional `-`, then what
/// `strtoull(p, &end, 0)` reads (`0x` hex, leading-`0` octal, decimal), then spaces.
/// Anything that would make it an expression (an operator after the literal, `(`,
/// `~`, `'c'`, `$reg`) is refused.
fn get_number(c: &mut Cursor) -> Result<(i64, bool), Error> {
    const EXPR: &str = "expressions are not supported here; write a plain number";
    c.skip_spaces();
    let negative = c.cur() == b'-';
    if negative {
        // expr_unary: `-` then next(), which skips spaces.
        c.p += 1;
        c.skip_spaces();
    }
    match c.cur() {
        0 => return Err("unexpected end of expression".into()),
        b'+' | b'-' | b'~' | b'(' | b'\'' | b'$' => return Err(EXPR.into()),
        _ => {}
    }
    let (magnitude, hex) = strtoull(c)?;
    c.skip_spaces();
    if matches!(
        c.cur(),
        b'*' | b'/' | b'%' | b'&' | b'|' | b'^' | b'+' | b'-'
    ) {
        return Err(EXPR.into());
    }
    let value = magnitude as i64;
    Ok((
        if negative {
            value.wrapping_neg()
        } else {
            value
        },
        hex,
    ))
}

/// glibc `strtoull(p, &end, 0)` at a non-space, non-sign character.
fn strtoull(c: &mut Cursor) -> Result<(u64, bool), Error> {
    let (radix, hex) = if c.cur() == b'0'
        && matches!(c.at(c.p + 1), b'x' | b'X')
        && c.at(c.p + 2).is_ascii_hexdigit()
    {
        c.p += 2;
        (16, true)
    } else if c.cur() == b'0' {
        (8, false)
    } else {
        (10, false)
    };
    let start = c.p;
    while (c.cur() as char).is_digit(radix) {
        c.p += 1;
    }
    if c.p == start {
        return Err(format!("invalid char '{}' in expression", c.cur() as char));
    }
    let digits = std::str::from_utf8(&c.s[start..c.p]).unwrap_or("");
    let value = u64::from_str_radix(digits, radix).map_err(|_| "number too large".to_string())?;
    Ok((value, hex))
}

/// `qemu_strtosz_MiB` for plain decimal sizes with an optional suffix (no suffix:
/// MiB); hex and fractions are refused (their corner cases differ by version).
fn get_size(c: &mut Cursor) -> Result<Value, Error> {
    let start = c.p;
    while c.cur().is_ascii_digit() {
        c.p += 1;
    }
    if c.p == start {
        return Err("invalid size".into());
    }
    let digits = std::str::from_utf8(&c.s[start..c.p]).unwrap_or("");
    let number: u64 = digits.parse().map_err(|_| "invalid size".to_string())?;
    if matches!(c.cur(), b'x' | b'X' | b'.') {
        return Err(
            "invalid size: only decimal sizes with an optional suffix are supported".into(),
        );
    }
    let suffix = suffix_mul(c.cur()).map(|_| c.cur().to_ascii_uppercase());
    if suffix.is_some() {
        c.p += 1;
    }
    let mul = suffix_mul(suffix.unwrap_or(b'M')).unwrap_or(1);
    match number.checked_mul(mul) {
        Some(bytes) if bytes <= i64::MAX as u64 => Ok(Value::Size { number, suffix }),
        _ => Err("invalid size".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Parsed, Error> {
        parse(line.as_bytes(), Version::V10_0)
    }

    fn args(line: &str) -> Vec<(String, Value)> {
        p(line)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .args
            .into_iter()
            .map(|a| (a.key, a.value))
            .collect()
    }

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    #[test]
    fn a_glued_flag_is_taken_and_the_next_argument_starts_right_after_it() {
        let expected = vec![
            ("detach".into(), Value::Flag(b'd')),
            ("uri".into(), s("exec:cmd")),
        ];
        assert_eq!(args("migrate -dexec:cmd"), expected);
        assert_eq!(args("migrate -d\"exec:cmd\""), expected);
        assert_eq!(args("migrate -d exec:cmd"), expected);
        // The flag letter need not be followed by anything in particular.
        assert_eq!(
            args("migrate -d\"exec:touch x\""),
            vec![
                ("detach".into(), Value::Flag(b'd')),
                ("uri".into(), s("exec:touch x"))
            ]
        );
        // `-dexec:touch x`: the uri is `exec:touch`, and ` x` is extraneous.
        assert!(
            p("migrate -dexec:touch x")
                .unwrap_err()
                .contains("extraneous")
        );
    }

    #[test]
    fn options_are_read_in_args_type_order() {
        // `-r -d`: QEMU skips `detach`, takes `resume`, then reads `-d` as the uri.
        assert!(p("migrate -r -d x").is_err());
        assert_eq!(
            args("migrate -r x"),
            vec![("resume".into(), Value::Flag(b'r')), ("uri".into(), s("x"))]
        );
        assert!(
            p("migrate -q x")
                .unwrap_err()
                .contains("unsupported option -q")
        );
    }

    #[test]
    fn get_str_unquotes_with_its_own_escapes() {
        assert_eq!(
            args(r#"delvm "a \"b\" \\ c""#),
            vec![("name".into(), s(r#"a "b" \ c"#))]
        );
        assert!(
            p(r#"delvm "a\tb""#)
                .unwrap_err()
                .contains("unsupported escape")
        );
        assert!(p(r#"delvm "abc"#).unwrap_err().contains("unterminated"));
        // A quote inside a bare word is an ordinary character.
        assert_eq!(args(r#"delvm a"b"#), vec![("name".into(), s(r#"a"b"#))]);
        assert!(
            p(&format!("delvm {}", "a".repeat(1024)))
                .unwrap_err()
                .contains("buffer")
        );
        assert!(p(&format!("delvm {}", "a".repeat(1023))).is_ok());
    }

    #[test]
    fn separators_are_ascii_whitespace_only() {
        assert_eq!(args("delvm\ta"), vec![("name".into(), s("a"))]);
        assert_eq!(args("delvm \x0b\x0c a"), vec![("name".into(), s("a"))]);
        // U+00A0 is not a separator: it is part of the name.
        assert!(p("delvm\u{a0}a").unwrap_err().contains("unknown command"));
        assert_eq!(args("delvm a\u{a0}b"), vec![("name".into(), s("a\u{a0}b"))]);
    }

    #[test]
    fn a_command_name_ends_at_a_slash() {
        let parsed = p("x/4x 0").unwrap();
        assert_eq!(parsed.primary, "x");
        assert_eq!(
            parsed.args[0].value,
            Value::Format(Format {
                typed: true,
                count: Some(4),
                format: Some(b'x'),
                size: None
            })
        );
        assert_eq!(
            parsed.args[1].value,
            Value::Int {
                value: 0,
                hex: false
            }
        );
        assert!(p("x/4q 0").unwrap_err().contains("invalid char in format"));
        assert_eq!(
            p("xp /2wx 0x1000").unwrap().args[0].value,
            Value::Format(Format {
                typed: true,
                count: Some(2),
                format: Some(b'x'),
                size: Some(4)
            })
        );
    }

    #[test]
    fn numbers_are_literals_and_expressions_are_refused() {
        assert_eq!(
            args("cpu 010"),
            vec![(
                "index".into(),
                Value::Int {
                    value: 8,
                    hex: false
                }
            )]
        );
        assert_eq!(
            args("cpu 0x1F"),
            vec![(
                "index".into(),
                Value::Int {
                    value: 31,
                    hex: true
                }
            )]
        );
        assert!(p("cpu 1+1").unwrap_err().contains("expressions"));
        assert!(p("cpu $eax").unwrap_err().contains("expressions"));
        assert!(p("cpu 0x100000000").unwrap_err().contains("32-bit"));
        assert!(p("cpu -1").unwrap_err().contains("32-bit"));
        assert!(
            p("cpu 99999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
        // After a number, an operator continues the expression: a filename that
        // starts with `/` must be quoted.
        assert!(p("memsave 0 4096 /tmp/m").is_err());
        assert_eq!(
            args("memsave 0 4096 \"/tmp/m\"")[2],
            ("filename".into(), s("/tmp/m"))
        );
        // A number ends where strtoull stops; the next argument starts there.
        assert_eq!(args("memsave 0 4096x")[2], ("filename".into(), s("x")));
    }

    #[test]
    fn sizes_and_mib() {
        assert_eq!(
            args("block_resize d 10G")[1].1,
            Value::Size {
                number: 10,
                suffix: Some(b'G')
            }
        );
        assert_eq!(size_bytes(10, None), 10 << 20);
        assert!(p("block_resize d 0x10").is_err());
        assert!(p("block_resize d 1.5G").is_err());
        assert!(p("block_resize d 99999999999E").is_err());
        assert_eq!(
            args("balloon 512"),
            vec![(
                "value".into(),
                Value::Int {
                    value: 512,
                    hex: false
                }
            )]
        );
        assert!(p("balloon -1").is_err());
    }

    #[test]
    fn info_reads_its_sub_table() {
        let parsed = p("info registers").unwrap();
        assert_eq!(
            (parsed.primary, parsed.sub.clone()),
            ("info", Some(("registers".into(), "registers")))
        );
        assert!(p("info").unwrap().sub.is_none());
        assert!(
            p("info nosuch")
                .unwrap_err()
                .contains("unknown command: 'info nosuch'")
        );
        assert_eq!(p("info qtree -b").unwrap().args[0].value, Value::Flag(b'b'));
        assert!(parse(b"info qtree -b", Version::V7_2).is_err());
    }

    #[test]
    fn version_differences_come_from_the_table() {
        assert!(parse(b"migrate -b x", Version::V7_2).is_ok());
        assert!(parse(b"migrate -b x", Version::V10_0).is_err());
        assert!(parse(b"singlestep", Version::V10_0).is_err());
        assert!(parse(b"one-insn-per-tb", Version::V7_2).is_err());
    }
}
