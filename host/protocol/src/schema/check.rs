//! The argument checker: walks a command's `arguments` the way QEMU's QObject
//! input visitor does, answering with QEMU's own texts.

use super::*;

/// One step of a value's location, as QEMU's `full_name()` renders it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Segment<'a> {
    /// A member of an object: `.name` (no dot at the start).
    Member(&'a str),
    /// An element of a list: `[index]`.
    Index(usize),
}

/// One run of [`QmpSchema::check_arguments`].
pub(super) struct Checker<'a> {
    schema: &'a QmpSchema,
    /// Where the value being checked sits; its last segment is the value itself.
    path: Vec<Segment<'a>>,
    /// Work done so far, against [`SchemaLimits::max_check_steps`].
    steps: usize,
}

impl<'a> Checker<'a> {
    pub(super) fn new(schema: &'a QmpSchema) -> Self {
        Checker {
            schema,
            path: Vec::new(),
            steps: 0,
        }
    }

    fn step(&mut self) -> Result<(), ArgumentError> {
        self.steps += 1;
        let limit = self.schema.limits.max_check_steps;
        if self.steps > limit {
            return Err(ArgumentError::TooLarge { limit });
        }
        Ok(())
    }

    /// The current value's full name, as QEMU's `full_name()`: `a.b[0].c`.
    fn full_name(&self) -> String {
        let mut name = String::new();
        for segment in &self.path {
            match segment {
                Segment::Member(member) => {
                    if !name.is_empty() {
                        name.push('.');
                    }
                    name.push_str(member);
                }
                Segment::Index(index) => {
                    name.push('[');
                    name.push_str(&index.to_string());
                    name.push(']');
                }
            }
        }
        if name.is_empty() {
            name.push_str("<anonymous>");
        }
        name
    }

    /// The current value's own name, as the visitors that report `name` rather
    /// than `full_name()` (enums, alternates) do: `null` for a list element.
    fn short_name(&self) -> String {
        match self.path.last() {
            Some(Segment::Member(member)) => (*member).to_owned(),
            _ => "null".to_owned(),
        }
    }

    fn check_depth(&self, depth: usize) -> Result<(), ArgumentError> {
        let limit = self.schema.limits.max_depth;
        if depth > limit {
            return Err(ArgumentError::TooDeep {
                param: self.full_name(),
                limit,
            });
        }
        Ok(())
    }

    fn invalid_type(&self, expected: &str) -> ArgumentError {
        ArgumentError::InvalidType {
            param: self.full_name(),
            expected: expected.to_owned(),
        }
    }

    /// Checks the value at the current path against `ty`. `depth` counts the
    /// containers entered so far.
    fn value(&mut self, ty: TypeId, value: &'a Value, depth: usize) -> Result<(), ArgumentError> {
        self.step()?;
        let schema = self.schema;
        match &schema.types[ty] {
            Type::Builtin(builtin) => {
                if !builtin.accepts(value) {
                    return Err(self.invalid_type(builtin.expected()));
                }
                Ok(())
            }
            // `input_type_enum()`: a string first, then one of the values.
            Type::Enum(e) => {
                let Some(text) = value.as_str() else {
                    return Err(self.invalid_type("string"));
                };
                if !e.lookup.contains(text) {
                    return Err(ArgumentError::InvalidValue {
                        param: self.short_name(),
                        value: text.to_owned(),
                    });
                }
                Ok(())
            }
            Type::Array(element) => {
                let Some(items) = value.as_array() else {
                    return Err(self.invalid_type("array"));
                };
                self.check_depth(depth + 1)?;
                for (index, item) in items.iter().enumerate() {
                    self.path.push(Segment::Index(index));
                    self.value(*element, item, depth + 1)?;
                    self.path.pop();
                }
                Ok(())
            }
            Type::Object(object) => {
                let Some(map) = value.as_object() else {
                    return Err(self.invalid_type("object"));
                };
                self.object(object, map, depth + 1, false)
            }
            // The generated `visit_type_<Alternate>()`: dispatch on the QType, and
            // name the alternate's QAPI type when nothing matches.
            Type::Alternate(alternate) => {
                let qtype = qtype_of(value);
                let chosen = alternate
                    .alternatives
                    .iter()
                    .copied()
                    .find(|&alt| kind_of(&schema.types[alt]).map(Kind::qtype) == Some(qtype));
                match chosen {
                    // Alternatives are never alternates: this recurses once.
                    Some(alt) => self.value(alt, value, depth),
                    None => Err(ArgumentError::InvalidType {
                        param: self.short_name(),
                        expected: alternate.qemu_name.clone(),
                    }),
                }
            }
            Type::Unknown(meta_type) => Err(ArgumentError::UnknownType {
                param: self.full_name(),
                meta_type: meta_type.clone(),
            }),
        }
    }

    /// Checks an object's members, then that it has no others (unless
    /// `extra_members`), as the generated `visit_type_<T>()` then
    /// `visit_check_struct()` do.
    pub(super) fn object(
        &mut self,
        object: &'a ObjectType,
        map: &'a Map<String, Value>,
        depth: usize,
        extra_members: bool,
    ) -> Result<(), ArgumentError> {
        self.check_depth(depth)?;
        let mut visited: Vec<&'a str> = Vec::new();
        self.members(object, map, depth, &mut visited)?;
        // Keys are unique, so every key was visited iff the counts agree.
        if extra_members || visited.len() == map.len() {
            return Ok(());
        }
        let visited: HashSet<&str> = visited.into_iter().collect();
        for key in map.keys() {
            self.step()?;
            if !visited.contains(key.as_str()) {
                self.path.push(Segment::Member(key));
                return Err(ArgumentError::Unexpected {
                    param: self.full_name(),
                });
            }
        }
        Ok(())
    }

    /// The generated `visit_type_<T>_members()`: each member in order, then the
    /// selected variant's members. A variant may itself be a union (QEMU 10.0's
    /// `MigrationAddress`), so variants nest; each such level counts towards the
    /// depth, which also ends a schema whose variants form a cycle.
    fn members(
        &mut self,
        object: &'a ObjectType,
        map: &'a Map<String, Value>,
        depth: usize,
        visited: &mut Vec<&'a str>,
    ) -> Result<(), ArgumentError> {
        for member in &object.members {
            self.step()?;
            match map.get_key_value(&member.name) {
                Some((key, value)) => {
                    visited.push(key);
                    self.path.push(Segment::Member(key));
                    self.value(member.ty, value, depth)?;
                    self.path.pop();
                }
                None if member.optional => {}
                None => {
                    self.path.push(Segment::Member(&member.name));
                    return Err(ArgumentError::Missing {
                        param: self.full_name(),
                    });
                }
            }
        }
        let Some(union) = &object.union else {
            return Ok(());
        };
        // The tag is a required enum member and was just checked.
        let tag = map
            .get(&object.members[union.tag].name)
            .and_then(Value::as_str);
        let Some(&variant) = tag.and_then(|tag| union.variants.get(tag)) else {
            return Ok(());
        };
        let Type::Object(variant) = &self.schema.types[variant] else {
            unreachable!("load() checks that variants are objects");
        };
        // Only a variant that is a union can lead to another variant.
        let depth = if variant.union.is_some() {
            self.check_depth(depth + 1)?;
            depth + 1
        } else {
            depth
        };
        self.members(variant, map, depth, visited)
    }
}

/// The kind an alternative matches, or `None` for what cannot be one (`any`,
/// alternates, unknown meta-types).
pub(super) fn kind_of(ty: &Type) -> Option<Kind> {
    Some(match ty {
        Type::Builtin(Builtin::Str) => Kind::Str,
        Type::Builtin(Builtin::Int) => Kind::Int,
        Type::Builtin(Builtin::Number) => Kind::Number,
        Type::Builtin(Builtin::Bool) => Kind::Bool,
        Type::Builtin(Builtin::Null) => Kind::Null,
        Type::Builtin(Builtin::Object) | Type::Object(_) => Kind::Object,
        Type::Builtin(Builtin::Array) | Type::Array(_) => Kind::Array,
        Type::Enum(_) => Kind::Enum,
        Type::Builtin(Builtin::Any) | Type::Alternate(_) | Type::Unknown(_) => return None,
    })
}
