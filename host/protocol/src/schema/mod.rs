//! QEMU's own QMP schema as the ground truth for what a command may carry.
//!
//! QEMU describes every command, argument type, enum, union and alternate it
//! accepts in the `return` of `query-qmp-schema` (QAPI introspection, QEMU's
//! `docs/devel/qapi-code-gen.rst`, "Client JSON Protocol introspection"). This
//! module reads that description and checks a command's `arguments` the way QEMU's
//! QObject input visitor would (`qapi/qobject-input-visitor.c`,
//! `qapi/qapi-visit-core.c` and the generated `visit_type_*` functions), answering
//! with QEMU's own error texts, so that the gateway refuses exactly what QEMU would
//! refuse and a client cannot tell the two apart. It also lists every union a
//! command's arguments can reach, so a test can check that a policy classified
//! every variant, and describes a command's argument type for plugins that decide
//! by type.
//!
//! Pure: no I/O and no async; the schema arrives as a parsed JSON value.
//!
//! Layout:
//! - [`QmpSchema`]: the resolved schema; [`QmpSchema::from_introspection`] builds it,
//!   [`QmpSchema::check_arguments`] checks one command, [`QmpSchema::unions`] and
//!   [`QmpSchema::describe_command`] describe it;
//! - [`SchemaLimits`]: the bounds that keep a hostile schema or argument cheap;
//! - [`SchemaError`] (a schema QEMU would never send) and [`ArgumentError`]
//!   (arguments QEMU would refuse, or the gateway's limits);
//! - [`UnionSite`]: one union and where it sits in a command's arguments;
//! - private: the type table (`Type`), the loader (`load`), the argument checker
//!   (`Checker`) and the walkers behind `unions` and `describe_command`.
//!
//! What introspection cannot tell, and how this module answers (each checked
//! against QEMU 7.2 and 10.0, whose texts are identical for everything here):
//! - Every integer type (`int8` .. `uint64`, `size`) is introspected as `int`. An
//!   integer member accepts any JSON integer that fits `i64` or `u64`; QEMU then
//!   refuses out-of-range values itself ("Parameter 'x' expects uint8_t"), and a
//!   non-integer for a `uint64`/`size` member is "Parameter 'x' expects uint64" in
//!   QEMU where this module says "Invalid parameter type for 'x', expected:
//!   integer" (the `int64` text).
//! - An alternate's error names its QAPI type ("expected: BlockdevRef"), which
//!   introspection hides behind a number; the alternates QEMU has are recognised
//!   by shape (`ALTERNATE_NAMES`), any other falls back to its masked name.
//! - Commands declared `'gen': false` take members beyond their schema; only
//!   `device_add` is such a command ([`EXTRA_MEMBER_COMMANDS`]). Its declared
//!   members are checked like any others, which is stricter than QEMU: QEMU reads
//!   them by hand, so 7.2 answers `{"driver": 1}` with "'1' is not a valid device
//!   model name" and 10.0 with "Parameter 'driver' is missing", where this module
//!   says "Invalid parameter type for 'driver', expected: string".
//! - When several members are unexpected, QEMU names the first in its hash
//!   table's order; this module names the first in the client's order.
//! - `-0` is an integer to QEMU but a float to serde_json, so it is refused as an
//!   integer here.
//! - Deprecated and unstable members and values are accepted, as QEMU does under
//!   its default `-compat` policy.
//!
//! (This file is about 650 lines, most of it the type table's definitions and the
//! long comment above; the checker and the loader are `check` and `load`.)

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde_json::{Map, Value, json};

use crate::qmp::{ErrorClass, QmpError};

mod check;
mod load;
#[cfg(test)]
mod tests;

use check::Checker;
use load::{list_unions, load};

/// Commands whose QEMU implementation is hand-written (`'gen': false` in the QAPI
/// schema) and reads members its schema does not declare: `device_add` passes every
/// extra member to the device as a property (`-device virtio-net-pci,mac=...`).
/// Introspection cannot say this (it shows `device_add` as an ordinary
/// `{driver, bus?, id?}` command), so the list lives here. The declared members are
/// still checked; the extra ones may hold any JSON value and are the policy's
/// business. QEMU 7.2 and 10.0 have no other `'gen': false` command.
pub const EXTRA_MEMBER_COMMANDS: &[&str] = &["device_add"];

/// QEMU's QAPI names of the alternates it accepts as input, recognised by the
/// JSON kinds of their alternatives in declaration order, because introspection
/// masks type names and QEMU's error for a value matching no alternative names the
/// type ("Invalid parameter type for 'file', expected: BlockdevRef"). The table
/// covers QEMU 7.2 and 10.0 (`qapi/*.json`, `'alternate'`); the two
/// `[object, string]` shapes differ in whether the string branch is an enum.
const ALTERNATE_NAMES: &[(&[Kind], &str)] = &[
    (&[Kind::Object, Kind::Str], "BlockdevRef"),
    (&[Kind::Object, Kind::Str, Kind::Null], "BlockdevRefOrNull"),
    (&[Kind::Str, Kind::Null], "StrOrNull"),
    (&[Kind::Str, Kind::Object], "BlockDirtyBitmapOrStr"),
    (&[Kind::Object, Kind::Enum], "Qcow2OverlapChecks"),
    (&[Kind::Int, Kind::Bool, Kind::Array], "StatsValue"),
];

/// The bounds on loading a schema and on checking arguments. Each exists because
/// both inputs can be hostile: arguments come from clients, and the schema comes
/// from a QEMU whose guest may have taken it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaLimits {
    /// How deep a check may go: one level per JSON object or array inside the
    /// arguments, plus one per union variant that is itself a union. The checker
    /// recurses, so this bounds its stack; it also stops a schema whose union
    /// branches form a cycle. 64 matches the framer's nesting limit
    /// (`framing::DEFAULT_MAX_DEPTH`), far beyond what real arguments need.
    pub max_depth: usize,
    /// How much work one check may do: one step per argument value visited and per
    /// schema member looked up. The check is linear, but a list of `{}` against a
    /// struct of 37 optional members (QEMU 10.0's largest) costs 37 lookups per
    /// three bytes of input; this caps a check at about a million lookups whatever
    /// the input. Real arguments are a few hundred steps.
    pub max_check_steps: usize,
    /// How many entities a schema may have. QEMU 10.0 has 1172; the bound keeps a
    /// hostile schema from making the gateway build and keep huge tables.
    pub max_entities: usize,
    /// How much work loading may spend listing the unions each command reaches:
    /// one step per member, variant or alternative walked. The walk is linear per
    /// command, so a hostile schema with many commands that each reach every type
    /// would be quadratic; QEMU 7.2 needs about 3 400 steps and 10.0 about 3 800.
    pub max_analysis_steps: usize,
}

impl Default for SchemaLimits {
    fn default() -> Self {
        SchemaLimits {
            max_depth: 64,
            max_check_steps: 1 << 20,
            max_entities: 16 * 1024,
            max_analysis_steps: 1 << 20,
        }
    }
}

/// A schema QEMU would never send: the gateway cannot use it, and refuses it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The `return` of `query-qmp-schema` is a JSON array of entities.
    #[error("the QMP schema is not an array")]
    NotAnArray,
    /// An entity lacks a member or has one of the wrong shape.
    #[error("QMP schema entity {entity}: {reason}")]
    Malformed {
        /// The entity's name, or its index when it has none.
        entity: String,
        /// What is wrong.
        reason: String,
    },
    /// Two entities share a name.
    #[error("QMP schema entity {name} is defined twice")]
    Duplicate {
        /// The name.
        name: String,
    },
    /// A reference to a type the schema does not define.
    #[error("QMP schema entity {entity} refers to undefined type {name}")]
    Undefined {
        /// The referring entity.
        entity: String,
        /// The missing type's name.
        name: String,
    },
    /// More entities than [`SchemaLimits::max_entities`].
    #[error("the QMP schema has {count} entities, more than the limit of {limit}")]
    TooManyEntities {
        /// How many it has.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// Listing the unions took more than [`SchemaLimits::max_analysis_steps`].
    #[error("the QMP schema is too complex to analyse (more than {limit} steps)")]
    TooComplex {
        /// The limit.
        limit: usize,
    },
}

/// Why a command's arguments are refused. Displays as QEMU's own `desc` text; the
/// last three variants are the gateway's limits, which QEMU does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgumentError {
    /// The schema has no such command (class `CommandNotFound`).
    #[error("The command {command} has not been found")]
    CommandNotFound {
        /// The command name.
        command: String,
    },
    /// A member the type does not declare, named by its full path.
    #[error("Parameter '{param}' is unexpected")]
    Unexpected {
        /// Full path, as QEMU's `full_name()`: `backend.data.foo`, `caps[0].x`.
        param: String,
    },
    /// A required member is absent.
    #[error("Parameter '{param}' is missing")]
    Missing {
        /// Full path.
        param: String,
    },
    /// A value of the wrong JSON type.
    #[error("Invalid parameter type for '{param}', expected: {expected}")]
    InvalidType {
        /// Full path; for an alternate, the member's own name (`null` in a list).
        param: String,
        /// `string`, `integer`, `number`, `boolean`, `null`, `object`, `array`, or
        /// an alternate's QAPI name.
        expected: String,
    },
    /// A string that is not one of an enum's values (also a union's tag).
    #[error("Parameter '{param}' does not accept value '{value}'")]
    InvalidValue {
        /// The member's own name, not its path (`null` for a list element), as
        /// QEMU's `input_type_enum()` reports it.
        param: String,
        /// The refused value.
        value: String,
    },
    /// Nested deeper than [`SchemaLimits::max_depth`].
    #[error("Parameter '{param}' is nested more than {limit} levels deep")]
    TooDeep {
        /// Full path of the value at the limit.
        param: String,
        /// The limit.
        limit: usize,
    },
    /// The check took more than [`SchemaLimits::max_check_steps`].
    #[error("Parameters too large to check (more than {limit} steps)")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The schema gives the value a meta-type this module does not know (a newer
    /// QEMU's); the gateway fails closed.
    #[error("Parameter '{param}' has a type of unknown meta-type '{meta_type}'")]
    UnknownType {
        /// Full path.
        param: String,
        /// The meta-type.
        meta_type: String,
    },
}

impl ArgumentError {
    /// The QMP error class QEMU uses for this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            ArgumentError::CommandNotFound { .. } => ErrorClass::CommandNotFound,
            _ => ErrorClass::GenericError,
        }
    }

    /// The error as QMP sends it.
    pub fn to_qmp_error(&self) -> QmpError {
        QmpError::new(self.class(), self.to_string())
    }
}

/// One union reachable from a command's arguments: the policy must classify each
/// of its `values` (blockdev drivers, chardev backends, netdev types, QOM types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnionSite {
    /// The command.
    pub command: String,
    /// Where the tag sits: `blockdev-add.driver`, `chardev-add.backend.type`,
    /// `migrate.channels[].addr.transport` (`[]` marks a list element). A union
    /// reachable along several paths is listed once per command, at its shortest.
    pub path: String,
    /// The tag member's name (`driver`, `type`, `qom-type`).
    pub tag: String,
    /// Every value the tag accepts, in schema order; each selects a variant.
    pub values: Vec<String>,
    /// The union's masked introspection name: the same union reached from two
    /// commands has the same name in one schema.
    pub union_type: String,
}

/// QEMU's QMP schema, from the `return` of `query-qmp-schema`.
#[derive(Debug, Clone)]
pub struct QmpSchema {
    /// Every type entity, resolved: references are indices into this table.
    types: Vec<Type>,
    /// The introspection name of each type (a masked number such as "143", or a
    /// builtin's name), for descriptions.
    type_names: Vec<String>,
    /// Commands by name; sorted, for [`QmpSchema::commands`].
    commands: BTreeMap<String, Command>,
    /// Every union each command reaches, computed (within budget) at load.
    unions: Vec<UnionSite>,
    /// The bounds every check runs under.
    limits: SchemaLimits,
}

/// Index into [`QmpSchema::types`].
type TypeId = usize;

/// One command.
#[derive(Debug, Clone)]
struct Command {
    /// The argument type: always an object type, the empty one for no arguments.
    arg_type: TypeId,
    /// Whether members beyond the schema are allowed ([`EXTRA_MEMBER_COMMANDS`]).
    extra_members: bool,
}

/// A resolved type.
#[derive(Debug, Clone)]
enum Type {
    /// A JSON type (`str`, `int`, `number`, `bool`, `null`, `any`, ...).
    Builtin(Builtin),
    /// A string from a fixed set.
    Enum(EnumType),
    /// A list of one element type.
    Array(TypeId),
    /// A struct, possibly a flat union.
    Object(ObjectType),
    /// One of several types, chosen by the value's JSON type.
    Alternate(AlternateType),
    /// A meta-type this module does not know; values of it are refused.
    Unknown(String),
}

/// The builtin JSON types, by introspection `json-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builtin {
    Str,
    Int,
    Number,
    Bool,
    Null,
    /// `any` (json-type `value`): every value.
    Any,
    /// json-type `object`: any JSON object.
    Object,
    /// json-type `array`: any JSON array.
    Array,
}

impl Builtin {
    fn from_json_type(json_type: &str) -> Option<Builtin> {
        Some(match json_type {
            "string" => Builtin::Str,
            "int" => Builtin::Int,
            "number" => Builtin::Number,
            "boolean" => Builtin::Bool,
            "null" => Builtin::Null,
            "value" => Builtin::Any,
            "object" => Builtin::Object,
            "array" => Builtin::Array,
            _ => return None,
        })
    }

    /// Whether QEMU's input visitor takes `value` for this type. Integers: QEMU's
    /// JSON parser makes an integer literal an int64, else a uint64, else a double,
    /// as serde_json does; `int` takes the first two, `number` all three.
    fn accepts(self, value: &Value) -> bool {
        match self {
            Builtin::Str => value.is_string(),
            Builtin::Int => value.is_i64() || value.is_u64(),
            Builtin::Number => value.is_number(),
            Builtin::Bool => value.is_boolean(),
            Builtin::Null => value.is_null(),
            Builtin::Any => true,
            Builtin::Object => value.is_object(),
            Builtin::Array => value.is_array(),
        }
    }

    /// The word QEMU's "Invalid parameter type" message uses.
    fn expected(self) -> &'static str {
        match self {
            Builtin::Str => "string",
            Builtin::Int => "integer",
            Builtin::Number => "number",
            Builtin::Bool => "boolean",
            Builtin::Null => "null",
            Builtin::Any => "any",
            Builtin::Object => "object",
            Builtin::Array => "array",
        }
    }

    /// The name descriptions use.
    fn name(self) -> &'static str {
        match self {
            Builtin::Str => "str",
            Builtin::Int => "int",
            Builtin::Number => "number",
            Builtin::Bool => "bool",
            Builtin::Null => "null",
            Builtin::Any => "any",
            Builtin::Object => "object",
            Builtin::Array => "array",
        }
    }
}

#[derive(Debug, Clone)]
struct EnumType {
    /// In schema order, for descriptions and union sites.
    values: Vec<String>,
    /// For lookups: a client may send a long list of enum values.
    lookup: HashSet<String>,
}

#[derive(Debug, Clone)]
struct ObjectType {
    /// In QEMU's visiting order (base members first), which decides which error a
    /// value with several faults gets.
    members: Vec<Member>,
    /// Present for a flat union.
    union: Option<Union>,
}

#[derive(Debug, Clone)]
struct Member {
    name: String,
    ty: TypeId,
    /// Introspection marks an optional member with a `default` (always null).
    optional: bool,
}

#[derive(Debug, Clone)]
struct Union {
    /// Index of the tag in [`ObjectType::members`]; its type is an enum.
    tag: usize,
    /// Case (an enum value) to variant object type, whose members are merged into
    /// the union's. A value without a variant adds no members.
    variants: HashMap<String, TypeId>,
    /// The same, in schema order, for descriptions.
    order: Vec<(String, TypeId)>,
}

#[derive(Debug, Clone)]
struct AlternateType {
    /// The alternatives in declaration order; validated to have distinct JSON
    /// kinds and none an alternate, so choosing one never recurses.
    alternatives: Vec<TypeId>,
    /// QEMU's name for it in errors ([`ALTERNATE_NAMES`]).
    qemu_name: String,
}

/// What an alternative matches, by QEMU's `QType` (`alternate_qtype()`), with
/// strings split into free strings and enums only to tell alternates apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Enum,
    Int,
    Number,
    Bool,
    Null,
    Object,
    Array,
}

impl Kind {
    /// The QType a value of this kind has: QEMU dispatches on it.
    fn qtype(self) -> QType {
        match self {
            Kind::Str | Kind::Enum => QType::String,
            Kind::Int | Kind::Number => QType::Num,
            Kind::Bool => QType::Bool,
            Kind::Null => QType::Null,
            Kind::Object => QType::Dict,
            Kind::Array => QType::List,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QType {
    String,
    Num,
    Bool,
    Null,
    Dict,
    List,
}

fn qtype_of(value: &Value) -> QType {
    match value {
        Value::String(_) => QType::String,
        Value::Number(_) => QType::Num,
        Value::Bool(_) => QType::Bool,
        Value::Null => QType::Null,
        Value::Object(_) => QType::Dict,
        Value::Array(_) => QType::List,
    }
}

impl QmpSchema {
    /// Reads the `return` of `query-qmp-schema`, with [`SchemaLimits::default`].
    pub fn from_introspection(schema: &Value) -> Result<Self, SchemaError> {
        Self::from_introspection_with_limits(schema, SchemaLimits::default())
    }

    /// Reads the `return` of `query-qmp-schema` under the given limits.
    pub fn from_introspection_with_limits(
        schema: &Value,
        limits: SchemaLimits,
    ) -> Result<Self, SchemaError> {
        let mut schema = load(schema, limits)?;
        schema.unions = list_unions(&schema)?;
        Ok(schema)
    }

    /// The limits checks run under.
    pub fn limits(&self) -> SchemaLimits {
        self.limits
    }

    /// Whether QEMU has this command.
    pub fn has_command(&self, name: &str) -> bool {
        self.commands.contains_key(name)
    }

    /// Every command, sorted by name.
    pub fn commands(&self) -> impl Iterator<Item = &str> {
        self.commands.keys().map(String::as_str)
    }

    /// Checks a command's `arguments` against the command's argument type, the way
    /// QEMU's QObject input visitor would, and returns QEMU's own error on mismatch:
    /// members in schema order (a missing or mistyped one stops the check), union
    /// variants after the union's own members, and unexpected members once an
    /// object's members are all visited. Absent `arguments` are an empty object.
    pub fn check_arguments(
        &self,
        command: &str,
        arguments: &Map<String, Value>,
    ) -> Result<(), ArgumentError> {
        let Some(cmd) = self.commands.get(command) else {
            return Err(ArgumentError::CommandNotFound {
                command: command.to_owned(),
            });
        };
        let Type::Object(object) = &self.types[cmd.arg_type] else {
            unreachable!("load() checks that argument types are objects");
        };
        Checker::new(self).object(object, arguments, 0, cmd.extra_members)
    }

    /// Every union reachable from any command's arguments, by command then path.
    pub fn unions(&self) -> Vec<UnionSite> {
        self.unions.clone()
    }

    /// The command's argument type as a self-contained JSON description, for
    /// plugins that decide by type:
    ///
    /// ```json
    /// {"command": "chardev-add", "arguments": {"type": "91"}, "extra-members": false,
    ///  "types": {"91": {"meta-type": "object",
    ///                   "members": [{"name": "id", "type": "str", "optional": false}, ..]},
    ///            "372": {"meta-type": "object", "members": [..], "tag": "type",
    ///                    "variants": {"file": "629", ..}}, ..}}
    /// ```
    ///
    /// A type reference is a builtin's name (`str`, `int`, `number`, `bool`, `null`,
    /// `any`, `object`, `array`), an inline `{"enum": [values]}`, an inline
    /// `{"array": reference}`, or `{"type": name}` for an object or alternate
    /// described under `types` (names are introspection's masked numbers, so
    /// recursive types such as `BlockdevOptions` stay finite). Alternates list
    /// their `alternatives` and their QEMU name; an `extra-members` command takes
    /// members beyond its schema ([`EXTRA_MEMBER_COMMANDS`]).
    pub fn describe_command(&self, name: &str) -> Option<Value> {
        let cmd = self.commands.get(name)?;
        let mut types = Map::new();
        let mut queue = VecDeque::from([cmd.arg_type]);
        let mut seen = HashSet::from([cmd.arg_type]);
        while let Some(id) = queue.pop_front() {
            let mut referenced = Vec::new();
            let description = match &self.types[id] {
                Type::Object(object) => {
                    let members: Vec<Value> = object
                        .members
                        .iter()
                        .map(|m| {
                            json!({
                                "name": m.name,
                                "type": self.type_ref(m.ty, &mut referenced),
                                "optional": m.optional,
                            })
                        })
                        .collect();
                    let mut d = json!({"meta-type": "object", "members": members});
                    if let Some(union) = &object.union {
                        d["tag"] = json!(object.members[union.tag].name);
                        let variants: Map<String, Value> = union
                            .order
                            .iter()
                            .map(|(case, ty)| {
                                referenced.push(*ty);
                                (case.clone(), json!(self.type_names[*ty]))
                            })
                            .collect();
                        d["variants"] = Value::Object(variants);
                    }
                    d
                }
                Type::Alternate(alternate) => {
                    let alternatives: Vec<Value> = alternate
                        .alternatives
                        .iter()
                        .map(|ty| self.type_ref(*ty, &mut referenced))
                        .collect();
                    json!({
                        "meta-type": "alternate",
                        "alternatives": alternatives,
                        "qemu-name": alternate.qemu_name,
                    })
                }
                _ => unreachable!("only objects and alternates are queued"),
            };
            types.insert(self.type_names[id].clone(), description);
            for ty in referenced {
                if seen.insert(ty) {
                    queue.push_back(ty);
                }
            }
        }
        Some(json!({
            "command": name,
            "arguments": {"type": self.type_names[cmd.arg_type]},
            "extra-members": cmd.extra_members,
            "types": types,
        }))
    }

    /// A type reference for [`QmpSchema::describe_command`]; objects and
    /// alternates it meets are pushed on `referenced`. Array chains are acyclic
    /// and at most `max_depth` long (checked at load), so this recursion is bounded.
    fn type_ref(&self, id: TypeId, referenced: &mut Vec<TypeId>) -> Value {
        match &self.types[id] {
            Type::Builtin(builtin) => json!(builtin.name()),
            Type::Enum(e) => json!({"enum": e.values}),
            Type::Array(element) => json!({"array": self.type_ref(*element, referenced)}),
            Type::Object(_) | Type::Alternate(_) => {
                referenced.push(id);
                json!({"type": self.type_names[id]})
            }
            Type::Unknown(meta_type) => json!({"unknown": meta_type}),
        }
    }
}
