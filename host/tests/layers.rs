//! The module graph of qmpgate's three crates: the host's layers depend downward
//! only, no two modules import each other (directly or round a longer cycle), and
//! every module opens with a sentence saying what it owns.
//!
//! A module's imports are read from its source: every `crate::a::b` and
//! `super::sibling` path outside comments. A module may use its own children and
//! its ancestors (a parent re-exports what its children define; children share
//! their parent's types and constants); any other edge counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The host crate's layers, bottom first. `protocol` and `plugin` are crates of
/// their own below `upstream`, so they cannot name the host at all.
const HOST_LAYERS: &[&str] = &["io", "upstream", "session", "gateway", "control"];

type Module = Vec<String>;

/// Every `.rs` file under `src`, with its module path (`io/socket.rs` is
/// `["io", "socket"]`, `io/mod.rs` is `["io"]`, `lib.rs` is `[]`).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Module, PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let mut module = prefix.to_vec();
            if path.is_dir() {
                module.push(name);
                walk(&path, &module, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                match name.as_str() {
                    "lib" | "mod" => {}
                    // The binary is the top layer: it may use everything.
                    "main" => continue,
                    _ => module.push(name),
                }
                out.insert(module, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The source without comments (doc links name modules without importing them).
fn code(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifier paths after each `prefix::` in `code`, with `{a::b, c}` groups
/// expanded (one level of grouping, which is all the sources use after a prefix).
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .collect()
    };
    let mut out = Vec::new();
    let needle = format!("{prefix}::");
    let mut rest = code;
    while let Some(at) = rest.find(&needle) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + needle.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            let mut depth = 0;
            let mut start = 0;
            let inner = &group[..end];
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(&inner[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            out.push(ident(&inner[start..]));
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The longest module path in `known` that `path` starts with.
fn resolve(path: &[String], known: &BTreeMap<Module, PathBuf>) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| known.contains_key(m))
}

fn related(a: &Module, b: &Module) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Each module's imports of modules other than its ancestors and descendants.
fn graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let known = modules(src);
    let mut graph = BTreeMap::new();
    for (module, path) in &known {
        let code = code(&std::fs::read_to_string(path).unwrap());
        let mut edges = BTreeSet::new();
        for p in paths_after(&code, "crate") {
            if let Some(target) = resolve(&p, &known) {
                edges.insert(target);
            }
        }
        // `super` is the parent of a `mod.rs`'s module and of a file's own module.
        let is_mod_file = path.file_name().is_some_and(|n| n == "mod.rs");
        let parent: Module = if is_mod_file || module.is_empty() {
            module[..module.len().saturating_sub(1)].to_vec()
        } else {
            module[..module.len() - 1].to_vec()
        };
        for p in paths_after(&code, "super") {
            let full: Vec<String> = parent.iter().cloned().chain(p).collect();
            if let Some(target) = resolve(&full, &known) {
                edges.insert(target);
            }
        }
        edges.retain(|t| !related(module, t));
        graph.insert(module.clone(), edges);
    }
    graph
}

/// A cycle in `graph`, if there is one, as the modules round it.
fn cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        node: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        stack: &mut Vec<Module>,
        done: &mut BTreeSet<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = stack.iter().position(|m| m == node) {
            return Some(stack[at..].to_vec());
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, stack, done) {
                return Some(found);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name).join("src")
}

fn show(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    for src in [crate_src(""), crate_src("protocol"), crate_src("plugin")] {
        let graph = graph(&src);
        assert!(graph.len() > 5, "{}: found only {graph:?}", src.display());
        if let Some(cycle) = cycle(&graph) {
            let names: Vec<String> = cycle.iter().map(show).collect();
            panic!(
                "{}: import cycle: {} -> {}",
                src.display(),
                names.join(" -> "),
                names[0]
            );
        }
    }
}

#[test]
fn the_host_layers_depend_downward_only() {
    let rank = |m: &Module| {
        HOST_LAYERS
            .iter()
            .position(|l| Some(*l) == m.first().map(String::as_str))
    };
    let graph = graph(&crate_src(""));
    let mut upward = Vec::new();
    for (from, targets) in graph.iter().filter(|(m, _)| !m.is_empty()) {
        let Some(from_rank) = rank(from) else {
            panic!("module {} is in no layer of {HOST_LAYERS:?}", show(from));
        };
        for to in targets {
            if rank(to).is_some_and(|to_rank| to_rank > from_rank) {
                upward.push(format!("{} -> {}", show(from), show(to)));
            }
        }
    }
    assert!(upward.is_empty(), "imports up the layers: {upward:#?}");
}

#[test]
fn every_module_opens_with_what_it_owns() {
    for src in [crate_src(""), crate_src("protocol"), crate_src("plugin")] {
        let mut files: Vec<PathBuf> = modules(&src).into_values().collect();
        files.push(src.join("main.rs"));
        for path in files.into_iter().filter(|p| p.exists()) {
            let text = std::fs::read_to_string(&path).unwrap();
            let first = text.lines().next().unwrap_or_default();
            assert!(
                first.starts_with("//! ") && first.len() > 20,
                "{} does not open with a //! sentence: {first:?}",
                path.display()
            );
        }
    }
}

/// The check itself can fail: a cycle and an upward import are found.
#[test]
fn the_checker_sees_cycles_and_upward_imports() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("io")).unwrap();
    std::fs::write(
        dir.path().join("lib.rs"),
        "//! x\npub mod io;\npub mod control;\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("io/mod.rs"), "//! x\nmod a;\nmod b;\n").unwrap();
    std::fs::write(dir.path().join("io/a.rs"), "//! x\nuse super::b::B;\n").unwrap();
    std::fs::write(
        dir.path().join("io/b.rs"),
        "//! x\nuse crate::{io::a::A, control};\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("control.rs"),
        "//! x\n// crate::io is only a comment\n",
    )
    .unwrap();
    let graph = graph(dir.path());
    let control: Module = vec!["control".into()];
    let a: Module = vec!["io".into(), "a".into()];
    let b: Module = vec!["io".into(), "b".into()];
    assert_eq!(graph[&b], BTreeSet::from([a.clone(), control.clone()]));
    assert!(graph[&control].is_empty(), "comments are not imports");
    let found = cycle(&graph).expect("a <-> b is a cycle");
    assert!(found.contains(&a) && found.contains(&b), "{found:?}");
}
