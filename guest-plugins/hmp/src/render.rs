//! The canonical form of an HMP line: the one spelling of a parsed command that
//! qmpgate accepts, so that the line the host forwards is read by QEMU exactly as
//! the plugin read it.
//!
//! The form, argument by argument in `args_type` order:
//! - the command name as typed (a name or alias), then for `info` the
//!   sub-command as typed; single ASCII spaces between words, none around;
//! - a `/fmt` right after the name (`x/4xw 0`): count, format letter, size letter
//!   (`b h w g`);
//! - options as separate words (`-d`, `-f png`), never glued to what follows;
//! - numbers in decimal (not negative: `-2` may read as an option or a
//!   subtraction), or `0x` and lower-case hex if typed in hex; `.N` for an
//!   index; sizes as decimal digits and an upper-case suffix if one was typed;
//! - `on`/`off` for booleans;
//! - strings (`s`, `F`, `B`, option values, and the QemuOpts of `O` and
//!   `chardev-add`) bare when made of `[A-Za-z0-9_.:/,=@+%-]`, not starting with
//!   `-`, and not starting with an operator right after a number (where QEMU's
//!   expression reader would take it); otherwise in `"..."` with `\"` and `\\`;
//! - the rest-of-line `S` arguments raw (QEMU does not unquote them).
//!
//! Refused (no canonical form): control characters, non-ASCII, values longer than
//! QEMU's buffers, an `S` value ending in a space, QemuOpts that cannot be
//! written plainly (see `opts`).
//!
//! Layout: [`render`] writes a line; it is checked by reading it back with the
//! same QEMU version.

use crate::parse::{self, ARG_BUF_MAX, Arg, Parsed, Value, Version};

/// Characters that stand bare in a `get_str` argument without changing how QEMU
/// reads it: no space (a separator), no `"` (quoting), no `\`, nothing QEMU's
/// readline or a shell-minded reader would take specially.
fn bare_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"_.:/,=@+%-".contains(&c)
}

/// `get_expr`'s binary operators: after a number, QEMU reads them as more of the
/// expression.
fn is_operator(c: u8) -> bool {
    b"*/%&|^+-".contains(&c)
}

/// Writes `parsed` canonically and checks that `version` reads the result back to
/// the same command.
pub fn render(parsed: &Parsed, version: Version) -> Result<String, String> {
    let line = write(parsed)?;
    match parse::parse(line.as_bytes(), version) {
        Ok(back) if back == *parsed => Ok(line),
        _ => Err("the command has no unambiguous canonical form".into()),
    }
}

pub(crate) fn write(parsed: &Parsed) -> Result<String, String> {
    let mut out = parsed.name.clone();
    if let Some((sub, _)) = &parsed.sub {
        out.push(' ');
        out.push_str(sub);
    }
    let mut after_number = false;
    for Arg { kind, value, .. } in &parsed.args {
        if !matches!(value, Value::Format(_)) {
            out.push(' ');
        }
        match value {
            Value::Str(s) => quote(&mut out, s, after_number)?,
            Value::Rest(s) => {
                if s.is_empty()
                    || s.starts_with(|c: char| c.is_ascii_whitespace())
                    || s.ends_with(|c: char| c.is_ascii_whitespace())
                {
                    return Err("a rest-of-line argument may not start or end in whitespace".into());
                }
                check_printable(s)?;
                out.push_str(s);
            }
            Value::Int { value, hex } => {
                if *value < 0 && !*hex {
                    // `-2` reads as an option where one may stand, and `1 -2` as a
                    // subtraction; hex spells the same 64-bit value unambiguously.
                    return Err(format!(
                        "negative numbers have no canonical form; write {} instead",
                        format_args!("0x{:x}", *value as u64)
                    ));
                }
                number(&mut out, *value, *hex)
            }
            Value::Index { value, hex } => {
                out.push('.');
                number(&mut out, *value, *hex);
            }
            Value::Size { number, suffix } => {
                out.push_str(&number.to_string());
                if let Some(s) = suffix {
                    out.push(*s as char);
                }
            }
            Value::Bool(b) => out.push_str(if *b { "on" } else { "off" }),
            Value::Flag(letter) => {
                out.push('-');
                out.push(*letter as char);
            }
            Value::Option { letter, value } => {
                out.push('-');
                out.push(*letter as char);
                out.push(' ');
                quote(&mut out, value, false)?;
            }
            Value::Opts(o) => {
                let text = o.render()?;
                if *kind == b'S' {
                    if text.is_empty() {
                        return Err("empty options".into());
                    }
                    check_printable(&text)?;
                    out.push_str(&text);
                } else {
                    quote(&mut out, &text, after_number)?;
                }
            }
            Value::Format(f) => {
                if f.typed {
                    out.push('/');
                    if let Some(n) = f.count {
                        out.push_str(&n.to_string());
                    }
                    if let Some(c) = f.format {
                        out.push(c as char);
                    }
                    if let Some(s) = f.size {
                        out.push(match s {
                            1 => 'b',
                            2 => 'h',
                            4 => 'w',
                            _ => 'g',
                        });
                    }
                }
            }
        }
        after_number = matches!(value, Value::Int { .. } | Value::Index { .. });
    }
    Ok(out)
}

fn number(out: &mut String, value: i64, hex: bool) {
    if hex {
        out.push_str(&format!("0x{:x}", value as u64));
    } else {
        out.push_str(&value.to_string());
    }
}

fn check_printable(s: &str) -> Result<(), String> {
    match s.bytes().find(|b| !(0x20..=0x7e).contains(b)) {
        Some(b) if b >= 0x80 => Err("non-ASCII characters have no canonical form".into()),
        Some(b) => Err(format!("control character 0x{b:02x} has no canonical form")),
        None => Ok(()),
    }
}

/// A `get_str` argument: bare if it can be, else quoted.
fn quote(out: &mut String, s: &str, after_number: bool) -> Result<(), String> {
    check_printable(s)?;
    if s.len() > ARG_BUF_MAX {
        return Err(format!(
            "argument longer than QEMU's {ARG_BUF_MAX}-byte buffer"
        ));
    }
    let first = s.bytes().next();
    let bare = !s.is_empty()
        && s.bytes().all(bare_char)
        && first != Some(b'-')
        && !(after_number && first.is_some_and(is_operator));
    if bare {
        out.push_str(s);
        return Ok(());
    }
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(())
}
