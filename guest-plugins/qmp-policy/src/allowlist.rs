//! The built-in profiles as an allowlist: what `safe` and `readonly` let through,
//! per command, per argument and per union variant, and nothing else.
//!
//! The table is data ([`TABLE`], the file `profiles.toml` beside this crate's
//! `Cargo.toml`), one entry per command with the reason it cannot make QEMU touch
//! the host. A command the table does not list is refused, and so is every argument
//! and every union variant (blockdev driver, chardev backend, netdev type, device
//! driver, object type) it does not list: QEMU grows new ones every release, and a
//! denylist is always one release behind.
//!
//! This file is shared: the policy plugin evaluates it, and the host (`qmpgate
//! policy show|check`) includes the same file to print the rules and to check a
//! QEMU schema's coverage, so there is one reading of the table.
//!
//! Layout: [`Table`] is the parsed file; [`Shape`] is an object's allowed members
//! (and its union, if it has one); [`Spec`] is what one member's value may be;
//! [`Table::judge`] decides; [`Refusal`] says why not.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// The table shipped with qmpgate.
pub const TABLE: &str = include_str!("../profiles.toml");

/// Nesting the checker follows before it refuses: the table's shapes are a few
/// levels deep; anything deeper is not something the table allows.
const MAX_DEPTH: usize = 16;

/// Longest string a `str` member takes: management strings (passwords, serials,
/// key names) are short, and a huge one is more likely an attack on something.
const MAX_STR: usize = 4096;

/// Longest reference (`id`, `name`) QEMU users write; ids are identifiers.
const MAX_NAME: usize = 256;

/// How trusted a client must be for an entry: `readonly` entries only read the VM's
/// state, `safe` entries change the VM but cannot touch the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Readonly,
    Safe,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Readonly => "readonly",
            Level::Safe => "safe",
        })
    }
}

/// An object's allowed shape: a command's arguments, a union variant's extra
/// members, or a named type in `[types]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    /// The least trusted profile that allows this (commands; variants may raise it).
    pub profile: Option<Level>,
    /// Why it cannot make QEMU touch the host.
    pub why: Option<String>,
    /// The member whose value picks a variant (`driver`, `type`, `qom-type`).
    pub tag: Option<String>,
    /// Members every variant may carry, and what each may hold ([`Spec`] syntax).
    #[serde(default)]
    pub members: BTreeMap<String, String>,
    /// Allowed variants of the union, each with its own extra members.
    #[serde(default)]
    pub variants: BTreeMap<String, Shape>,
    /// Variants known and refused, with the reason (shown to the client).
    #[serde(default)]
    pub refused: BTreeMap<String, String>,
    /// `members` parsed once by [`Table::parse`], so judging a command does not
    /// re-read the spec syntax on every call.
    #[serde(skip)]
    specs: BTreeMap<String, Spec>,
}

impl Shape {
    /// Parses `members` into `specs`, here and in every variant.
    fn parse_specs(&mut self) -> Result<(), String> {
        self.specs = self
            .members
            .iter()
            .map(|(member, text)| Ok((member.clone(), Spec::parse(text)?)))
            .collect::<Result<_, String>>()?;
        self.variants.values_mut().try_for_each(Shape::parse_specs)
    }
}

/// The whole table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// Commands known and refused, with the reason (shown to the client).
    #[serde(default)]
    pub refused: BTreeMap<String, String>,
    /// Allowed commands.
    #[serde(default)]
    pub commands: BTreeMap<String, Shape>,
    /// Named shapes that members refer to as `@Name`.
    #[serde(default)]
    pub types: BTreeMap<String, Shape>,
}

/// What a member's value may be. Written in the table as a string:
/// `id`, `name`, `str`, `int`, `size`, `bool`, `number`, `mac`, `one-of:a|b|c`,
/// `list:SPEC`, `@Type`, and `SPEC?` for "or null".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// A new object's id, as QEMU requires ids: a letter, then letters, digits,
    /// `-`, `.`, `_`. Never a path.
    Id,
    /// A reference to something the VM already has (a node, a device, a bus, a
    /// chardev, a QOM path): QEMU looks these up by name and never opens a host
    /// file by them. Printable ASCII without spaces.
    Name,
    /// Any string with no meaning to the host (a password, a serial number).
    Str,
    /// An integer (as JSON, or as the decimal/hex text QemuOpts gives).
    Int,
    /// A size in bytes (an integer, or QemuOpts text with a k/M/G/T suffix).
    Size,
    /// A boolean (as JSON, or `on`/`off`/`yes`/`no`/`true`/`false` text).
    Bool,
    /// Any JSON number.
    Number,
    /// A MAC address `xx:xx:xx:xx:xx:xx`.
    Mac,
    /// One of these strings.
    OneOf(Vec<String>),
    /// A list of values of this spec.
    List(Box<Spec>),
    /// An object of the named shape.
    Type(String),
    /// The inner spec, or `null` (written with a trailing `?`: `int?`), for values a
    /// reader leaves unset (HMP's `/FMT` without a size).
    Nullable(Box<Spec>),
}

impl Spec {
    /// Parses the table's spec syntax.
    pub fn parse(text: &str) -> Result<Spec, String> {
        if let Some(inner) = text.strip_suffix('?') {
            return Ok(Spec::Nullable(Box::new(Spec::parse(inner)?)));
        }
        if let Some(rest) = text.strip_prefix("list:") {
            return Ok(Spec::List(Box::new(Spec::parse(rest)?)));
        }
        if let Some(rest) = text.strip_prefix("one-of:") {
            let values: Vec<String> = rest.split('|').map(str::to_string).collect();
            if values.iter().any(String::is_empty) {
                return Err(format!("empty value in '{text}'"));
            }
            return Ok(Spec::OneOf(values));
        }
        if let Some(name) = text.strip_prefix('@') {
            return Ok(Spec::Type(name.to_string()));
        }
        Ok(match text {
            "id" => Spec::Id,
            "name" => Spec::Name,
            "str" => Spec::Str,
            "int" => Spec::Int,
            "size" => Spec::Size,
            "bool" => Spec::Bool,
            "number" => Spec::Number,
            "mac" => Spec::Mac,
            other => return Err(format!("unknown value spec '{other}'")),
        })
    }
}

/// Why a command is refused; `Display` is the text the client sees after
/// "Command 'NAME' ...".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The table does not know the command.
    Unlisted,
    /// The table refuses the command, for this reason.
    Refused(String),
    /// The command needs a more trusted profile.
    NeedsProfile(Level),
    /// An argument is not allowed (or not of the allowed form), at this path.
    Argument { path: String, problem: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unlisted => f.write_str("it is not in the profile's allowlist"),
            Refusal::Refused(why) => f.write_str(why),
            Refusal::NeedsProfile(level) => write!(f, "it needs the '{level}' profile"),
            Refusal::Argument { path, problem } => write!(f, "argument '{path}' {problem}"),
        }
    }
}

impl Table {
    /// Parses and checks a table: every spec parses, every `@Type` exists, every
    /// command says why and at which level.
    pub fn parse(text: &str) -> Result<Table, String> {
        let mut table: Table = toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, shape) in &table.commands {
            if shape.profile.is_none() || shape.why.is_none() {
                return Err(format!("command '{name}' needs 'profile' and 'why'"));
            }
            if table.refused.contains_key(name) {
                return Err(format!("command '{name}' is both allowed and refused"));
            }
            table.check_shape(name, shape)?;
        }
        for (name, shape) in &table.types {
            table.check_shape(&format!("@{name}"), shape)?;
        }
        // Every spec parsed (check_shape said so): keep the parsed forms.
        for shape in table.commands.values_mut().chain(table.types.values_mut()) {
            shape.parse_specs()?;
        }
        Ok(table)
    }

    /// The shipped table (it is checked by a unit test, so this cannot fail in a
    /// released build).
    pub fn builtin() -> Table {
        Table::parse(TABLE).expect("profiles.toml is checked by the tests")
    }

    fn check_shape(&self, at: &str, shape: &Shape) -> Result<(), String> {
        for (member, spec) in &shape.members {
            self.check_spec(&format!("{at}.{member}"), spec)?;
        }
        if shape.tag.is_none() && !(shape.variants.is_empty() && shape.refused.is_empty()) {
            return Err(format!("{at}: variants without a 'tag'"));
        }
        for (variant, inner) in &shape.variants {
            if inner.tag.is_some() {
                return Err(format!(
                    "{at} variant '{variant}': a variant cannot be a union itself"
                ));
            }
            if inner.why.is_none() {
                return Err(format!("{at} variant '{variant}' needs 'why'"));
            }
            if shape.refused.contains_key(variant) {
                return Err(format!(
                    "{at} variant '{variant}' is both allowed and refused"
                ));
            }
            self.check_shape(&format!("{at}[{variant}]"), inner)?;
        }
        Ok(())
    }

    fn check_spec(&self, at: &str, text: &str) -> Result<(), String> {
        let mut spec = Spec::parse(text).map_err(|e| format!("{at}: {e}"))?;
        loop {
            spec = match spec {
                Spec::List(inner) | Spec::Nullable(inner) => *inner,
                Spec::Type(name) if !self.types.contains_key(&name) => {
                    return Err(format!("{at}: no type '@{name}'"));
                }
                _ => return Ok(()),
            }
        }
    }

    /// Whether `profile` allows `command` with `arguments`.
    pub fn judge(&self, profile: Level, command: &str, arguments: &Value) -> Result<(), Refusal> {
        let Some(shape) = self.commands.get(command) else {
            return Err(match self.refused.get(command) {
                Some(why) => Refusal::Refused(why.clone()),
                None => Refusal::Unlisted,
            });
        };
        let level = shape.profile.unwrap_or(Level::Safe);
        if level > profile {
            return Err(Refusal::NeedsProfile(level));
        }
        let empty = Value::Object(Default::default());
        let arguments = if arguments.is_null() {
            &empty
        } else {
            arguments
        };
        self.check_object(shape, profile, arguments, "", 0)
    }

    fn check_object(
        &self,
        shape: &Shape,
        profile: Level,
        value: &Value,
        path: &str,
        depth: usize,
    ) -> Result<(), Refusal> {
        let fail = |at: &str, problem: String| Refusal::Argument {
            path: at.to_string(),
            problem,
        };
        if depth > MAX_DEPTH {
            return Err(fail(path, "is nested too deeply".into()));
        }
        let Value::Object(map) = value else {
            return Err(fail(path, "must be an object".into()));
        };
        let join = |key: &str| {
            if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            }
        };
        let variant = match &shape.tag {
            None => None,
            Some(tag) => {
                let at = join(tag);
                let Some(Value::String(choice)) = map.get(tag) else {
                    return Err(fail(&at, "must be given as a string".into()));
                };
                match shape.variants.get(choice) {
                    Some(variant) => {
                        if let Some(level) = variant.profile
                            && level > profile
                        {
                            return Err(fail(
                                &at,
                                format!("'{choice}' needs the '{level}' profile"),
                            ));
                        }
                        Some(variant)
                    }
                    None => {
                        return Err(fail(
                            &at,
                            match shape.refused.get(choice) {
                                Some(why) => format!("'{choice}' is refused: {why}"),
                                None => format!("'{choice}' is not in the allowlist"),
                            },
                        ));
                    }
                }
            }
        };
        for (key, value) in map {
            if Some(key) == shape.tag.as_ref() {
                continue;
            }
            let spec = shape
                .specs
                .get(key)
                .or_else(|| variant.and_then(|v| v.specs.get(key)));
            let at = join(key);
            let Some(spec) = spec else {
                return Err(fail(&at, "is not allowed".into()));
            };
            self.check_value(spec, profile, value, &at, depth + 1)?;
        }
        Ok(())
    }

    fn check_value(
        &self,
        spec: &Spec,
        profile: Level,
        value: &Value,
        path: &str,
        depth: usize,
    ) -> Result<(), Refusal> {
        let fail = |problem: &str| {
            Err(Refusal::Argument {
                path: path.to_string(),
                problem: problem.to_string(),
            })
        };
        match spec {
            Spec::Id => match value.as_str() {
                Some(s) if is_id(s) => Ok(()),
                _ => fail("must be an id (a letter, then letters, digits, '-', '.', '_')"),
            },
            Spec::Name => match value.as_str() {
                Some(s) if is_name(s) => Ok(()),
                _ => fail("must be the name of something the VM already has"),
            },
            Spec::Str => match value.as_str() {
                Some(s) if s.len() <= MAX_STR => Ok(()),
                _ => fail("must be a string"),
            },
            Spec::Int => match value {
                Value::Number(n) if n.is_i64() || n.is_u64() => Ok(()),
                Value::String(s) if parse_int(s).is_some() => Ok(()),
                _ => fail("must be an integer"),
            },
            Spec::Size => match value {
                Value::Number(n) if n.is_u64() => Ok(()),
                Value::String(s) if parse_size(s) => Ok(()),
                _ => fail("must be a size"),
            },
            Spec::Bool => match value {
                Value::Bool(_) => Ok(()),
                Value::String(s)
                    if matches!(s.as_str(), "on" | "off" | "yes" | "no" | "true" | "false") =>
                {
                    Ok(())
                }
                _ => fail("must be a boolean"),
            },
            Spec::Number => match value {
                Value::Number(_) => Ok(()),
                _ => fail("must be a number"),
            },
            Spec::Mac => match value.as_str() {
                Some(s) if is_mac(s) => Ok(()),
                _ => fail("must be a MAC address"),
            },
            Spec::OneOf(values) => match value.as_str() {
                Some(s) if values.iter().any(|v| v == s) => Ok(()),
                Some(s) => fail(&format!("does not allow '{s}'")),
                None => fail("must be a string"),
            },
            Spec::List(inner) => {
                let Value::Array(items) = value else {
                    return fail("must be a list");
                };
                for (i, item) in items.iter().enumerate() {
                    self.check_value(inner, profile, item, &format!("{path}[{i}]"), depth + 1)?;
                }
                Ok(())
            }
            Spec::Nullable(_) if value.is_null() => Ok(()),
            Spec::Nullable(inner) => self.check_value(inner, profile, value, path, depth),
            Spec::Type(name) => {
                let Some(shape) = self.types.get(name) else {
                    return fail("has a type the table does not define");
                };
                self.check_object(shape, profile, value, path, depth)
            }
        }
    }

    /// Every allowed command at `profile`, sorted.
    pub fn allowed(&self, profile: Level) -> impl Iterator<Item = (&String, &Shape)> {
        self.commands
            .iter()
            .filter(move |(_, shape)| shape.profile.unwrap_or(Level::Safe) <= profile)
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn is_id(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_NAME
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// A reference: printable ASCII, no spaces, quotes or backslashes (so it reads the
/// same in QMP, HMP and QemuOpts), not empty.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\' | b','))
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Integers as QemuOpts text: decimal or `0x` hex, with an optional sign.
fn parse_int(s: &str) -> Option<i128> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let value = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) if !hex.is_empty() && hex.len() <= 16 => i128::from_str_radix(hex, 16).ok()?,
        Some(_) => return None,
        None if !digits.is_empty()
            && digits.len() <= 20
            && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            digits.parse().ok()?
        }
        None => return None,
    };
    Some(if negative { -value } else { value })
}

/// Sizes as QemuOpts text: a number with an optional `k`/`M`/`G`/`T` suffix.
fn parse_size(s: &str) -> bool {
    let digits = s
        .strip_suffix(['k', 'K', 'M', 'G', 'T', 'b', 'B'])
        .unwrap_or(s);
    parse_int(digits).is_some_and(|n| n >= 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> Table {
        Table::parse(TABLE).unwrap_or_else(|e| panic!("profiles.toml: {e}"))
    }

    #[test]
    fn the_shipped_table_parses_and_every_entry_says_why() {
        let t = table();
        assert!(
            t.commands
                .values()
                .all(|c| c.why.as_deref().is_some_and(|w| !w.is_empty()))
        );
        assert!(t.refused.values().all(|w| !w.is_empty()));
    }

    #[test]
    fn specs_read_and_reject_as_documented() {
        assert_eq!(
            Spec::parse("list:@KeyValue").unwrap(),
            Spec::List(Box::new(Spec::Type("KeyValue".into())))
        );
        assert!(Spec::parse("path").is_err());
        assert_eq!(
            Spec::parse("int?").unwrap(),
            Spec::Nullable(Box::new(Spec::Int))
        );
        assert!(is_id("net0") && !is_id("0net") && !is_id("a/b") && !is_id(""));
        assert!(is_name("/machine/peripheral/net0") && !is_name("a b") && !is_name("a,b"));
        assert_eq!(parse_int("0x10"), Some(16));
        assert_eq!(parse_int("1e3"), None);
        assert!(parse_size("512M") && !parse_size("-1") && !parse_size("M"));
    }

    #[test]
    fn unknown_commands_arguments_and_variants_are_refused() {
        let t = table();
        assert_eq!(
            t.judge(Level::Safe, "x-brand-new", &json!({})),
            Err(Refusal::Unlisted)
        );
        assert!(matches!(
            t.judge(Level::Safe, "screendump", &json!({"filename": "/x"})),
            Err(Refusal::Refused(_))
        ));
        assert!(t.judge(Level::Safe, "query-status", &json!({})).is_ok());
        assert!(matches!(
            t.judge(Level::Safe, "query-status", &json!({"bogus": 1})),
            Err(Refusal::Argument { path, .. }) if path == "bogus"
        ));
        assert!(
            t.judge(
                Level::Safe,
                "netdev_add",
                &json!({"type": "user", "id": "n"})
            )
            .is_ok()
        );
        assert!(matches!(
            t.judge(Level::Safe, "netdev_add", &json!({"type": "user", "id": "n", "guestfwd": [{"str": "tcp:1.2.3.4:80-cmd:id"}]})),
            Err(Refusal::Argument { path, .. }) if path == "guestfwd"
        ));
        assert!(matches!(
            t.judge(Level::Safe, "netdev_add", &json!({"type": "tap", "id": "n"})),
            Err(Refusal::Argument { path, problem }) if path == "type" && problem.contains("refused")
        ));
        assert!(matches!(
            t.judge(Level::Safe, "netdev_add", &json!({"type": "brand-new", "id": "n"})),
            Err(Refusal::Argument { problem, .. }) if problem.contains("not in the allowlist")
        ));
    }

    #[test]
    fn nested_unions_are_checked_per_variant() {
        let t = table();
        let ringbuf = json!({"id": "c", "backend": {"type": "ringbuf", "data": {"size": 4096}}});
        assert!(t.judge(Level::Safe, "chardev-add", &ringbuf).is_ok());
        let logged =
            json!({"id": "c", "backend": {"type": "ringbuf", "data": {"logfile": "/tmp/x"}}});
        assert!(matches!(
            t.judge(Level::Safe, "chardev-add", &logged),
            Err(Refusal::Argument { path, .. }) if path == "backend.data.logfile"
        ));
        let file = json!({"id": "c", "backend": {"type": "file", "data": {"out": "/tmp/x"}}});
        assert!(t.judge(Level::Safe, "chardev-add", &file).is_err());
        let keys =
            json!({"keys": [{"type": "qcode", "data": "a"}, {"type": "number", "data": 30}]});
        assert!(t.judge(Level::Safe, "send-key", &keys).is_ok());
        assert!(
            t.judge(
                Level::Safe,
                "send-key",
                &json!({"keys": [{"type": "qcode", "data": "a", "x": 1}]})
            )
            .is_err()
        );
    }

    #[test]
    fn readonly_is_a_subset_of_safe() {
        let t = table();
        assert!(t.judge(Level::Readonly, "query-block", &json!({})).is_ok());
        assert_eq!(
            t.judge(Level::Readonly, "stop", &json!({})),
            Err(Refusal::NeedsProfile(Level::Safe))
        );
        assert!(t.judge(Level::Safe, "stop", &json!({})).is_ok());
        let readonly: Vec<_> = t.allowed(Level::Readonly).map(|(n, _)| n.clone()).collect();
        assert!(
            readonly
                .iter()
                .all(|n| t.allowed(Level::Safe).any(|(m, _)| m == n))
        );
    }
}
