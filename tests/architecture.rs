//! The layering of `src/`, checked by reachability, not only by direct imports: a module
//! "knows" every module it can reach through `crate::…` and `super::…` paths.
//!
//! - Storage (the ledger) knows no HTTP server, no request path and no client protocol.
//! - The domain (budgets, routing, tokens, metering) knows no HTTP server and no request path.
//! - The transport (`upstream/`) knows neither the record nor the client protocols.
//! - The server layers (`server/`) know no response body and no protocol.
//!
//! `python3 ../shared/tools/import-cycles.py src --folders-ok` keeps the folders free of
//! cycles; this keeps them in their layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each source file's module path (`ledger::sqlite`) and the code that is not a test.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|e| e != "rs") || p.file_name().unwrap() == "tests.rs" {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let code = match text.find("#[cfg(test)]") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            out.insert(parts.join("::"), code);
        }
    }
    out
}

/// The modules a file names, resolved to the longest module path that exists.
fn references(module: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let parent: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", parent[..parent.len().saturating_sub(1)].to_vec()),
    ] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            // `super::` in `crate::a::super::` does not occur; a word before it is not ours.
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let path: Vec<&str> = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or("")
                .split("::")
                .filter(|s| !s.is_empty())
                .collect();
            let mut full: Vec<&str> = base.clone();
            full.extend(path);
            while !full.is_empty() {
                let candidate = full.join("::");
                if known.contains(&candidate) {
                    out.insert(candidate);
                    break;
                }
                full.pop();
            }
        }
    }
    out.remove(module);
    out
}

fn reach(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(m) = todo.pop() {
        for next in graph.get(&m).into_iter().flatten() {
            if seen.insert(next.clone()) {
                todo.push(next.clone());
            }
        }
    }
    seen
}

fn in_layer(module: &str, layer: &str) -> bool {
    module == layer || module.starts_with(&format!("{layer}::"))
}

#[test]
fn layers_know_only_what_is_below_them() {
    let src: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    let graph: BTreeMap<String, BTreeSet<String>> = mods
        .iter()
        .map(|(m, code)| (m.clone(), references(m, code, &known)))
        .collect();
    assert!(
        graph["pipeline"].contains("record") && graph["record"].contains("ledger"),
        "the reader sees the references it should"
    );
    let request_path = [
        "server", "pipeline", "send", "body", "answer", "api", "admin", "app",
    ];
    let rules: [(&str, &[&str]); 6] = [
        ("ledger", &request_path),
        (
            "budget",
            &[
                "server", "pipeline", "send", "body", "answer", "admin", "app",
            ],
        ),
        (
            "route",
            &[
                "server", "pipeline", "send", "body", "answer", "admin", "app", "record",
            ],
        ),
        (
            "tokens",
            &[
                "server", "pipeline", "send", "body", "answer", "admin", "app", "record",
            ],
        ),
        (
            "meter",
            &[
                "server", "pipeline", "send", "body", "answer", "admin", "app", "record",
            ],
        ),
        (
            "upstream",
            &[
                "record",
                "pipeline",
                "send",
                "answer",
                "api::openai",
                "api::error",
            ],
        ),
    ];
    let mut broken = Vec::new();
    for (layer, forbidden) in rules {
        for module in known.iter().filter(|m| in_layer(m, layer)) {
            for reached in reach(&graph, module) {
                if forbidden.iter().any(|f| in_layer(&reached, f)) {
                    broken.push(format!("{module} reaches {reached}"));
                }
            }
        }
    }
    for module in known.iter().filter(|m| in_layer(m, "server")) {
        for direct in &graph[module] {
            if in_layer(direct, "body") || in_layer(direct, "api") {
                broken.push(format!("{module} imports {direct}"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "layering broken:\n  {}",
        broken.join("\n  ")
    );
}
