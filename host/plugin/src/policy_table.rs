//! The built-in policy's allowlist, read by the host to show it (`qmpgate policy
//! show`) and to check it against a QEMU's schema (`qmpgate policy check`).
//!
//! The table and its reader live in the policy plugin (`guest-plugins/qmp-policy`);
//! this module includes the same source file, so the host and the plugin read the
//! table one way. Nothing here decides on traffic: the plugin does, in its sandbox.
//!
//! Layout: [`allowlist`] (the shared reader), [`show`] (the rules as text or
//! Markdown), [`check`] (which commands and union variants of a schema the table
//! classifies).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde_json::Value;

#[allow(missing_docs, clippy::all)]
#[path = "../../../guest-plugins/qmp-policy/src/allowlist.rs"]
pub mod allowlist;

use allowlist::{Level, Shape, Table};

/// How [`show`] prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// For a terminal.
    Text,
    /// For the README.
    Markdown,
}

/// The rules of `profile`: what it allows (with each variant and member), then
/// what the table names and refuses.
pub fn show(table: &Table, profile: Level, format: Format) -> String {
    let mut out = String::new();
    let md = format == Format::Markdown;
    let allowed: Vec<(&String, &Shape)> = table.allowed(profile).collect();
    if md {
        let _ = writeln!(
            out,
            "Profile `{profile}` allows {} commands; anything else is refused.\n\n| command | allowed arguments | why it is harmless |\n|---|---|---|",
            allowed.len()
        );
    } else {
        let _ = writeln!(
            out,
            "Profile '{profile}' allows these {} commands; anything else is refused.\n",
            allowed.len()
        );
    }
    for (name, shape) in &allowed {
        let members = members_text(shape);
        let why = shape.why.as_deref().unwrap_or("");
        if md {
            let _ = writeln!(out, "| `{name}` | {} | {why} |", md_escape(&members));
        } else {
            let _ = writeln!(out, "{name}\n    {why}");
            if !members.is_empty() {
                let _ = writeln!(out, "    arguments: {members}");
            }
        }
        if let Some(tag) = &shape.tag {
            for (variant, inner) in &shape.variants {
                if inner.profile.is_some_and(|level| level > profile) {
                    continue;
                }
                let extra = members_text(inner);
                let why = inner.why.as_deref().unwrap_or("");
                if md {
                    let _ = writeln!(
                        out,
                        "| `{name}` {tag}=`{variant}` | {} | {why} |",
                        md_escape(&extra)
                    );
                } else {
                    let _ = writeln!(out, "    {tag}={variant}: {why}");
                    if !extra.is_empty() {
                        let _ = writeln!(out, "        arguments: {extra}");
                    }
                }
            }
        }
    }
    let refused: Vec<(&String, &String)> = table.refused.iter().collect();
    if md {
        let _ = writeln!(
            out,
            "\nCommands the table names and refuses ({}):\n\n| command | why |\n|---|---|",
            refused.len()
        );
        for (name, why) in refused {
            let _ = writeln!(out, "| `{name}` | {why} |");
        }
    } else {
        let _ = writeln!(out, "\nRefused, with the reason clients see:");
        for (name, why) in refused {
            let _ = writeln!(out, "{name}\n    {why}");
        }
    }
    if !md {
        let _ = writeln!(
            out,
            "\nTypes that arguments refer to (@Name) are in the table: guest-plugins/qmp-policy/profiles.toml"
        );
    }
    out
}

fn members_text(shape: &Shape) -> String {
    shape
        .members
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn md_escape(text: &str) -> String {
    text.replace('|', "\\|")
}

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct Coverage {
    /// Commands `safe` allows.
    pub allowed: BTreeSet<String>,
    /// Commands the table names and refuses.
    pub refused: BTreeSet<String>,
    /// Commands the table does not know (refused, but nobody looked at them).
    pub unclassified: BTreeSet<String>,
    /// Union variants of allowed commands the table does not know, as
    /// `command path=variant` (`blockdev-add driver=io_uring`).
    pub unclassified_variants: BTreeSet<String>,
}

impl Coverage {
    /// Whether every command and every variant is classified.
    pub fn complete(&self) -> bool {
        self.unclassified.is_empty() && self.unclassified_variants.is_empty()
    }

    /// A report for the terminal.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} commands allowed (safe), {} refused by name, {} unclassified (refused), {} unclassified union variants (refused)",
            self.allowed.len(),
            self.refused.len(),
            self.unclassified.len(),
            self.unclassified_variants.len()
        );
        for name in &self.unclassified {
            let _ = writeln!(out, "unclassified command: {name}");
        }
        for name in &self.unclassified_variants {
            let _ = writeln!(out, "unclassified variant: {name}");
        }
        out
    }
}

/// Errors reading a schema file.
#[derive(Debug, thiserror::Error)]
pub enum SchemaFileError {
    /// Not QAPI introspection.
    #[error("not a QMP schema (the return value of query-qmp-schema): {0}")]
    Shape(String),
}

/// Introspection entries by (masked) name.
struct Introspection<'a>(BTreeMap<&'a str, &'a Value>);

impl<'a> Introspection<'a> {
    fn new(schema: &'a Value) -> Result<Self, SchemaFileError> {
        // Accept the bare list, QEMU's reply, or a {"schema": [...]} dump.
        let list = match schema {
            Value::Array(_) => schema,
            Value::Object(map) => map
                .get("return")
                .or_else(|| map.get("schema"))
                .ok_or_else(|| SchemaFileError::Shape("no 'return' member".into()))?,
            _ => return Err(SchemaFileError::Shape("not a list".into())),
        };
        let Value::Array(entries) = list else {
            return Err(SchemaFileError::Shape("not a list".into()));
        };
        let mut by_name = BTreeMap::new();
        for entry in entries {
            let name = entry["name"]
                .as_str()
                .ok_or_else(|| SchemaFileError::Shape("an entry without a name".into()))?;
            by_name.insert(name, entry);
        }
        Ok(Introspection(by_name))
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).copied()
    }

    /// Follows arrays to their element type.
    fn element(&self, name: &str) -> Option<&'a Value> {
        let mut entry = self.get(name)?;
        for _ in 0..8 {
            if entry["meta-type"] == "array" {
                entry = self.get(entry["element-type"].as_str()?)?;
            } else {
                return Some(entry);
            }
        }
        None
    }

    fn enum_values(&self, name: &str) -> Vec<String> {
        let Some(entry) = self.get(name) else {
            return Vec::new();
        };
        // QEMU 7.2 lists `values`; later versions also `members: [{name}]`.
        if let Some(Value::Array(members)) = entry.get("members") {
            return members
                .iter()
                .filter_map(|m| m["name"].as_str().map(str::to_string))
                .collect();
        }
        entry["values"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn member_type(&self, object: &Value, member: &str) -> Option<&'a str> {
        let members = object["members"].as_array()?;
        let found = members.iter().find(|m| m["name"] == member)?;
        let name = found["type"].as_str()?;
        self.get(name).and_then(|e| e["name"].as_str())
    }

    /// The type of `member` in `object` or in any of its variants' types.
    fn member_type_anywhere(&self, object: &Value, member: &str) -> Option<&'a str> {
        if let Some(t) = self.member_type(object, member) {
            return Some(t);
        }
        for variant in object["variants"].as_array()? {
            let inner = self.get(variant["type"].as_str()?)?;
            if let Some(t) = self.member_type(inner, member) {
                return Some(t);
            }
        }
        None
    }
}

/// Which of a schema's commands and union variants `table` classifies. `schema`
/// is the return value of `query-qmp-schema` (or QEMU's whole reply).
pub fn check(table: &Table, schema: &Value) -> Result<Coverage, SchemaFileError> {
    let intro = Introspection::new(schema)?;
    let mut coverage = Coverage::default();
    for entry in intro.0.values() {
        if entry["meta-type"] != "command" {
            continue;
        }
        let name = entry["name"].as_str().unwrap_or_default().to_string();
        if name == "qmp_capabilities" {
            // The gateway answers it itself; it never reaches a policy.
            continue;
        }
        if let Some(shape) = table.commands.get(&name) {
            coverage.allowed.insert(name.clone());
            if let Some(args) = entry["arg-type"].as_str().and_then(|t| intro.get(t)) {
                walk(&intro, table, shape, args, &name, &mut coverage, 0);
            }
        } else if table.refused.contains_key(&name) {
            coverage.refused.insert(name);
        } else {
            coverage.unclassified.insert(name);
        }
    }
    Ok(coverage)
}

/// Walks a table shape and the schema object it describes side by side, noting
/// union variants the table leaves unclassified.
fn walk(
    intro: &Introspection,
    table: &Table,
    shape: &Shape,
    object: &Value,
    at: &str,
    coverage: &mut Coverage,
    depth: usize,
) {
    if depth > 8 || object["meta-type"] != "object" {
        return;
    }
    if let (Some(tag), Some(schema_tag)) = (&shape.tag, object["tag"].as_str())
        && tag == schema_tag
        && let Some(tag_type) = intro.member_type(object, tag)
    {
        for value in intro.enum_values(tag_type) {
            if !shape.variants.contains_key(&value) && !shape.refused.contains_key(&value) {
                coverage
                    .unclassified_variants
                    .insert(format!("{at} {tag}={value}"));
            }
        }
    }
    let members = shape.members.iter().chain(
        shape
            .variants
            .values()
            .flat_map(|variant| variant.members.iter()),
    );
    for (member, spec) in members {
        let type_name = spec.trim_start_matches("list:").trim_end_matches('?');
        let Some(type_name) = type_name.strip_prefix('@') else {
            continue;
        };
        let (Some(inner_shape), Some(member_type)) = (
            table.types.get(type_name),
            intro.member_type_anywhere(object, member),
        ) else {
            continue;
        };
        if let Some(inner) = intro.element(member_type) {
            walk(
                intro,
                table,
                inner_shape,
                inner,
                &format!("{at} {member}"),
                coverage,
                depth + 1,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn check_finds_unclassified_commands_and_variants() {
        let table = Table::builtin();
        // A tiny schema in QAPI introspection form: one known command with a union
        // whose enum has a value the table does not know, and an unknown command.
        let schema = json!([
            {"name": "netdev_add", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
            {"name": "x-new", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
            {"name": "screendump", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
            {"name": "0", "meta-type": "object", "members": []},
            {"name": "1", "meta-type": "object", "tag": "type",
             "members": [{"name": "id", "type": "str"}, {"name": "type", "type": "2"}],
             "variants": []},
            {"name": "2", "meta-type": "enum", "values": ["user", "tap", "quantum"]},
            {"name": "str", "meta-type": "builtin", "json-type": "string"},
        ]);
        let c = check(&table, &json!({ "return": schema })).unwrap();
        assert_eq!(c.unclassified, BTreeSet::from(["x-new".to_string()]));
        assert_eq!(
            c.unclassified_variants,
            BTreeSet::from(["netdev_add type=quantum".to_string()])
        );
        assert!(c.refused.contains("screendump") && c.allowed.contains("netdev_add"));
        assert!(!c.complete());
    }

    #[test]
    fn show_lists_what_a_profile_allows_and_nothing_it_does_not() {
        let table = Table::builtin();
        let readonly = show(&table, Level::Readonly, Format::Text);
        assert!(readonly.contains("\nquery-status\n"));
        assert!(!readonly.contains("\nstop\n"));
        let safe = show(&table, Level::Safe, Format::Markdown);
        assert!(safe.contains("| `device_add` driver=`e1000` |"));
        assert!(safe.contains("| `screendump` | it writes a host file named by the client |"));
    }
}
