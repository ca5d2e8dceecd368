//! The layer map of `src/`, checked on every `cargo test --lib`: each module imports only from
//! the layers below it (see ARCHITECTURE.md, "Layers").
//!
//! ```text
//! commands   cli, backtest, demo, consumer, fleet (CLI)           4
//! app        gateway, supervisor, reload, http, web, fleet, ...   3
//! stages     broker, rules, queue, forwarder                      2
//! config     raw TOML -> validated Config                         1
//! core       event, decode, ack, topic, reserved, stamp, ...      0
//! ```
//!
//! Rules the test enforces, reading every `.rs` file under `src/` (comment lines skipped):
//! - a `crate::X` path (or a `super::` path that leaves the file's top module) may name a
//!   module of its own top module, or of a lower layer;
//! - stages are one layer, but a stage imports another only along the pipeline's channels it
//!   writes to or reads from: `rules -> queue` (appends) and `forwarder -> queue` (leases,
//!   acks); the broker imports no other stage (its hand-off sends `core::ack::Inbound`);
//! - the crate root's re-exports (`crate::Config`, `crate::init_crypto`, ...) only from
//!   commands (a lower layer names the module itself);
//! - within `core`, the files import each other without a cycle;
//! - every top module under `src/` has a layer here (a new one fails until it is placed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top module of `src/` and its layer.
const LAYERS: &[(&str, u8)] = &[
    ("core", 0),
    ("config", 1),
    ("broker", 2),
    ("rules", 2),
    ("queue", 2),
    ("forwarder", 2),
    ("app", 3),
    ("commands", 4),
];

/// The imports allowed between stages (same layer): (importer, imported).
const STAGE_EDGES: &[(&str, &str)] = &[("rules", "queue"), ("forwarder", "queue")];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

/// The module path of a file under `src/`: `rules/backtest/score.rs` -> [rules, backtest, score].
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The crate-level paths a line names, as module paths from the root (`crate::core::topic` ->
/// [core, topic]; `crate::{a, b::c}` -> [a], [b, c]; `super::x` resolved against `here`).
fn named_paths(line: &str, here: &[String]) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|seg| {
                seg.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|seg| !seg.is_empty())
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        // `$crate::` and `edgegate_crate::` are not this crate's root.
        let before = rest[..i].chars().last();
        let after = &rest[i + "crate::".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = after.strip_prefix('{') {
            // Top-level items of the group (a nested group names its parent's module first).
            let (mut depth, mut start) = (0usize, 0);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(after));
        }
    }
    let mut rest = line;
    while let Some(i) = rest.find("super::") {
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        rest = &rest[i + "super::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut ups = 0;
        let mut t = tail;
        while let Some(r) = t.strip_prefix("super::") {
            ups += 1;
            t = r;
        }
        // Skip the chain's later `super::`s on the next round.
        rest = t;
        if ups > here.len() {
            continue;
        }
        let mut p = here[..here.len() - ups].to_vec();
        if t.starts_with('*') || t.starts_with('{') {
            // `use super::*` (a test module of its file) or a group: stays where it is.
            if !p.is_empty() {
                out.push(p);
            }
            continue;
        }
        p.extend(ident(t));
        out.push(p);
    }
    out.retain(|p| !p.is_empty());
    out
}

/// Every import that breaks the layer map, as `file:line: why`.
fn violations(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut bad = Vec::new();
    let mut core_graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in files {
        let here = module_path(rel);
        let Some(top) = here.first().cloned() else {
            continue;
        };
        if top == "lib" || top == "main" || top == "layers" {
            continue;
        }
        let Some(from) = layer(&top) else {
            bad.push(format!(
                "{}: module `{top}` has no layer in src/layers.rs",
                rel.display()
            ));
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for path in named_paths(line, &here) {
                let target = &path[0];
                let at = format!("{}:{}", rel.display(), n + 1);
                if *target == top {
                    if top == "core" && here.len() > 1 && path.len() > 1 && path[1] != here[1] {
                        core_graph
                            .entry(here[1].clone())
                            .or_default()
                            .insert(path[1].clone());
                    }
                    continue;
                }
                match layer(target) {
                    None if from == 4 => {}
                    None => bad.push(format!(
                        "{at}: `crate::{target}` (a root re-export): name the module instead"
                    )),
                    Some(to) if to < from => {}
                    Some(to) if to == from && STAGE_EDGES.contains(&(top.as_str(), target)) => {}
                    Some(to) if to == from => bad.push(format!(
                        "{at}: stage `{top}` imports stage `{target}` (allowed: {STAGE_EDGES:?})"
                    )),
                    Some(_) => bad.push(format!(
                        "{at}: `{top}` (layer {from}) imports `{target}` from a higher layer"
                    )),
                }
            }
        }
    }
    // No cycle among core's files (depth-first search for a back edge).
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        bad: &mut Vec<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(i) = stack.iter().position(|s| s == node) {
            bad.push(format!("core cycle: {} -> {node}", stack[i..].join(" -> ")));
            return;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, stack, done, bad);
        }
        stack.pop();
        done.insert(node.to_string());
    }
    let mut done = BTreeSet::new();
    for node in core_graph.keys() {
        visit(node, &core_graph, &mut Vec::new(), &mut done, &mut bad);
    }
    bad
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            sources(&p, root, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            out.push((p.strip_prefix(root).unwrap_or(&p).to_path_buf(), text));
        }
    }
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &src, &mut files);
    assert!(
        files.len() > 40,
        "read {} files from {}",
        files.len(),
        src.display()
    );
    // Every top module the crate declares has a layer.
    for (rel, _) in &files {
        let top = module_path(rel)[0].clone();
        assert!(
            ["lib", "main", "layers"].contains(&top.as_str()) || layer(&top).is_some(),
            "{top} has no layer"
        );
    }
    let bad = violations(&files);
    assert!(
        bad.is_empty(),
        "imports against the layers:\n{}",
        bad.join("\n")
    );
}

/// The checker itself sees what it is meant to (so the test above can fail).
#[test]
fn the_checker_sees_upward_and_sideways_imports() {
    let f = |path: &str, text: &str| vec![(PathBuf::from(path), text.to_string())];
    let none =
        |path: &str, text: &str| assert_eq!(violations(&f(path, text)), Vec::<String>::new());
    let one = |path: &str, text: &str| assert_eq!(violations(&f(path, text)).len(), 1, "{text}");
    none("queue/store.rs", "use crate::core::topic::matches;");
    none("rules/stage.rs", "use crate::queue::QueueHandle;");
    none(
        "app/gateway.rs",
        "use crate::{broker::Broker, queue, rules::Engine};",
    );
    none(
        "app/gateway.rs",
        "use crate::{rules::{stage, Engine}, queue};",
    );
    none("queue/store.rs", "// see crate::app::gateway");
    none("core/topic.rs", "mod tests { use super::*; }");
    one("queue/store.rs", "use crate::app::gateway::lock_data_dir;");
    one("core/event.rs", "    x: crate::config::Config,");
    one("config/mod.rs", "use crate::{core::topic, rules::Engine};");
    one("queue/mod.rs", "use crate::rules::Engine;");
    one("broker/guard.rs", "use crate::queue::Store;");
    one("rules/mod.rs", "use super::app::fleet;");
    one(
        "rules/backtest/score.rs",
        "use super::super::super::commands::cli::exit;",
    );
    one("forwarder/mod.rs", "let c = crate::Config::defaults();");
    one("gadgets/mod.rs", "");
    none("commands/demo.rs", "crate::init_crypto();");
    let cycle = [
        (
            PathBuf::from("core/event.rs"),
            "use crate::core::decode::Payload;".to_string(),
        ),
        (
            PathBuf::from("core/decode.rs"),
            "use crate::core::event::Data;".to_string(),
        ),
    ];
    assert_eq!(violations(&cycle).len(), 1, "{:?}", violations(&cycle));
}
