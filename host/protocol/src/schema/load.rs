//! The loader: reads `query-qmp-schema`'s entities into the type table, refusing a
//! schema QEMU would never send, and lists the unions a command's arguments reach.

use super::*;
use check::kind_of;

/// An entity's `name`, or its index when it has none, for errors.
pub(super) fn entity_label(index: usize, entity: &Value) -> String {
    match entity.get("name").and_then(Value::as_str) {
        Some(name) => name.to_owned(),
        None => format!("#{index}"),
    }
}

pub(super) fn malformed(entity: &str, reason: impl Into<String>) -> SchemaError {
    SchemaError::Malformed {
        entity: entity.to_owned(),
        reason: reason.into(),
    }
}

pub(super) fn str_member<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    entity: &str,
) -> Result<&'v str, SchemaError> {
    object
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| malformed(entity, format!("member '{key}' is not a string")))
}

pub(super) fn array_member<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    entity: &str,
) -> Result<&'v [Value], SchemaError> {
    object
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .ok_or_else(|| malformed(entity, format!("member '{key}' is not an array")))
}

/// Builds the type table and the command map; [`list_unions`] runs after.
pub(super) fn load(schema: &Value, limits: SchemaLimits) -> Result<QmpSchema, SchemaError> {
    let entities = schema.as_array().ok_or(SchemaError::NotAnArray)?;
    if entities.len() > limits.max_entities {
        return Err(SchemaError::TooManyEntities {
            count: entities.len(),
            limit: limits.max_entities,
        });
    }

    // Pass 1: give every type entity an id, so that references (which may point
    // forward, and are recursive) resolve in pass 2.
    let mut ids: HashMap<&str, TypeId> = HashMap::new();
    let mut type_entities: Vec<(&str, &str, &Map<String, Value>)> = Vec::new();
    let mut command_entities: Vec<(&str, &Map<String, Value>)> = Vec::new();
    for (index, entity) in entities.iter().enumerate() {
        let label = entity_label(index, entity);
        let object = entity
            .as_object()
            .ok_or_else(|| malformed(&label, "not an object"))?;
        let name = str_member(object, "name", &label)?;
        let meta_type = str_member(object, "meta-type", &label)?;
        match meta_type {
            "command" => command_entities.push((name, object)),
            "event" => {}
            _ => {
                if ids.insert(name, type_entities.len()).is_some() {
                    return Err(SchemaError::Duplicate { name: name.into() });
                }
                type_entities.push((name, meta_type, object));
            }
        }
    }
    let resolve = |entity: &str, name: &str| -> Result<TypeId, SchemaError> {
        ids.get(name)
            .copied()
            .ok_or_else(|| SchemaError::Undefined {
                entity: entity.to_owned(),
                name: name.to_owned(),
            })
    };

    // Pass 2: resolve each type.
    let mut types = Vec::with_capacity(type_entities.len());
    for &(name, meta_type, object) in &type_entities {
        let ty = match meta_type {
            "builtin" => {
                let json_type = str_member(object, "json-type", name)?;
                match Builtin::from_json_type(json_type) {
                    Some(builtin) => Type::Builtin(builtin),
                    None => Type::Unknown(format!("builtin {json_type}")),
                }
            }
            "enum" => Type::Enum(load_enum(name, object)?),
            "array" => Type::Array(resolve(name, str_member(object, "element-type", name)?)?),
            "object" => {
                let mut members = Vec::new();
                for member in array_member(object, "members", name)? {
                    let member = member
                        .as_object()
                        .ok_or_else(|| malformed(name, "a member is not an object"))?;
                    members.push(Member {
                        name: str_member(member, "name", name)?.to_owned(),
                        ty: resolve(name, str_member(member, "type", name)?)?,
                        optional: member.contains_key("default"),
                    });
                }
                let union = match object.get("tag") {
                    None => None,
                    Some(_) => {
                        let tag = str_member(object, "tag", name)?;
                        let tag = members.iter().position(|m| m.name == tag).ok_or_else(|| {
                            malformed(name, format!("tag '{tag}' is not a member"))
                        })?;
                        let mut order = Vec::new();
                        for variant in array_member(object, "variants", name)? {
                            let variant = variant
                                .as_object()
                                .ok_or_else(|| malformed(name, "a variant is not an object"))?;
                            order.push((
                                str_member(variant, "case", name)?.to_owned(),
                                resolve(name, str_member(variant, "type", name)?)?,
                            ));
                        }
                        let variants = order.iter().cloned().collect();
                        Some(Union {
                            tag,
                            variants,
                            order,
                        })
                    }
                };
                Type::Object(ObjectType { members, union })
            }
            "alternate" => {
                let mut alternatives = Vec::new();
                for member in array_member(object, "members", name)? {
                    let ty = member
                        .get("type")
                        .and_then(Value::as_str)
                        .ok_or_else(|| malformed(name, "an alternative lacks 'type'"))?;
                    alternatives.push(resolve(name, ty)?);
                }
                Type::Alternate(AlternateType {
                    alternatives,
                    qemu_name: String::new(),
                })
            }
            other => Type::Unknown(other.to_owned()),
        };
        types.push(ty);
    }

    // Pass 3: what needs every type resolved.
    let kinds: Vec<Option<Kind>> = types.iter().map(kind_of).collect();
    let is_object = |types: &[Type], id: TypeId| matches!(types[id], Type::Object(_));
    let mut alternate_names = Vec::new();
    for (id, ty) in types.iter().enumerate() {
        let name = type_entities[id].0;
        match ty {
            Type::Object(object) => {
                if let Some(union) = &object.union {
                    if !matches!(types[object.members[union.tag].ty], Type::Enum(_)) {
                        return Err(malformed(name, "the union's tag is not an enum"));
                    }
                    if union
                        .order
                        .iter()
                        .any(|&(_, variant)| !is_object(&types, variant))
                    {
                        return Err(malformed(name, "a union variant is not an object"));
                    }
                }
            }
            Type::Alternate(alternate) => {
                let mut shape = Vec::new();
                for &alt in &alternate.alternatives {
                    let kind = kinds[alt]
                        .ok_or_else(|| malformed(name, "an alternative cannot be told apart"))?;
                    if shape.iter().any(|k: &Kind| k.qtype() == kind.qtype()) {
                        return Err(malformed(name, "two alternatives have the same JSON type"));
                    }
                    shape.push(kind);
                }
                let qemu_name = ALTERNATE_NAMES
                    .iter()
                    .find(|(known, _)| *known == shape.as_slice())
                    .map_or(name, |(_, qemu_name)| qemu_name);
                alternate_names.push((id, qemu_name.to_owned()));
            }
            _ => {}
        }
    }
    check_array_chains(&types, &type_entities, limits.max_depth)?;
    for (id, qemu_name) in alternate_names {
        if let Type::Alternate(alternate) = &mut types[id] {
            alternate.qemu_name = qemu_name;
        }
    }

    let mut commands = BTreeMap::new();
    for (name, object) in command_entities {
        let arg_type = resolve(name, str_member(object, "arg-type", name)?)?;
        if !is_object(&types, arg_type) {
            return Err(malformed(name, "the argument type is not an object"));
        }
        let command = Command {
            arg_type,
            extra_members: EXTRA_MEMBER_COMMANDS.contains(&name),
        };
        if commands.insert(name.to_owned(), command).is_some() {
            return Err(SchemaError::Duplicate { name: name.into() });
        }
    }

    Ok(QmpSchema {
        types,
        type_names: type_entities
            .iter()
            .map(|(name, ..)| (*name).to_owned())
            .collect(),
        commands,
        unions: Vec::new(),
        limits,
    })
}

/// An enum's values: newer QEMU lists `members: [{"name": ..}]` (which can carry
/// features), older QEMU only `values: [..]`, and 7.2 and 10.0 send both; read
/// whichever is there, preferring `members`.
pub(super) fn load_enum(name: &str, object: &Map<String, Value>) -> Result<EnumType, SchemaError> {
    let values: Vec<String> = if object.contains_key("members") {
        array_member(object, "members", name)?
            .iter()
            .map(|m| {
                m.get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| malformed(name, "an enum member lacks 'name'"))
            })
            .collect::<Result<_, _>>()?
    } else {
        array_member(object, "values", name)?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| malformed(name, "an enum value is not a string"))
            })
            .collect::<Result<_, _>>()?
    };
    let lookup = values.iter().cloned().collect();
    Ok(EnumType { values, lookup })
}

/// Refuses arrays whose element chain loops (`[a]` of `[a]`) or nests deeper than
/// `max_depth`: describing a type follows these chains recursively. Each array is
/// walked once, so this is linear.
pub(super) fn check_array_chains(
    types: &[Type],
    type_entities: &[(&str, &str, &Map<String, Value>)],
    max_depth: usize,
) -> Result<(), SchemaError> {
    let mut checked = vec![false; types.len()];
    for (start, &(name, ..)) in type_entities.iter().enumerate() {
        let mut chain = Vec::new();
        let mut id = start;
        while let Type::Array(element) = types[id] {
            if checked[id] {
                break;
            }
            if chain.contains(&id) || chain.len() >= max_depth {
                return Err(malformed(name, "array element types loop or nest too deep"));
            }
            chain.push(id);
            id = element;
        }
        for id in chain {
            checked[id] = true;
        }
    }
    Ok(())
}

/// Lists the unions each command reaches, breadth first so that each is listed at
/// its shortest path, each type walked once per command.
pub(super) fn list_unions(schema: &QmpSchema) -> Result<Vec<UnionSite>, SchemaError> {
    let limit = schema.limits.max_analysis_steps;
    let mut steps = 0usize;
    let mut step = || {
        steps += 1;
        if steps > limit {
            return Err(SchemaError::TooComplex { limit });
        }
        Ok(())
    };
    let mut sites = Vec::new();
    for (command, cmd) in &schema.commands {
        let mut queue = VecDeque::from([(cmd.arg_type, command.clone())]);
        let mut seen = HashSet::from([cmd.arg_type]);
        let mut enqueue = |queue: &mut VecDeque<(TypeId, String)>, ty: TypeId, path: String| {
            if seen.insert(ty) {
                queue.push_back((ty, path));
            }
        };
        while let Some((id, path)) = queue.pop_front() {
            step()?;
            match &schema.types[id] {
                Type::Object(object) => {
                    for member in &object.members {
                        step()?;
                        enqueue(&mut queue, member.ty, format!("{path}.{}", member.name));
                    }
                    if let Some(union) = &object.union {
                        let tag = &object.members[union.tag];
                        let Type::Enum(values) = &schema.types[tag.ty] else {
                            unreachable!("load() checks that tags are enums");
                        };
                        sites.push(UnionSite {
                            command: command.clone(),
                            path: format!("{path}.{}", tag.name),
                            tag: tag.name.clone(),
                            values: values.values.clone(),
                            union_type: schema.type_names[id].clone(),
                        });
                        // A variant's members sit beside the union's own.
                        for &(_, variant) in &union.order {
                            step()?;
                            enqueue(&mut queue, variant, path.clone());
                        }
                    }
                }
                Type::Array(element) => enqueue(&mut queue, *element, format!("{path}[]")),
                // An alternative sits where the alternate does.
                Type::Alternate(alternate) => {
                    for &alt in &alternate.alternatives {
                        step()?;
                        enqueue(&mut queue, alt, path.clone());
                    }
                }
                Type::Builtin(_) | Type::Enum(_) | Type::Unknown(_) => {}
            }
        }
    }
    Ok(sites)
}
