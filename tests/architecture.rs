//! The crate's module structure, checked: shared parts are leaves, and no two top-level
//! modules import each other, directly or round a loop (docs/architecture.md draws the
//! layers).
//!
//! Reads `src/` as text: every `crate::a::..` path and every `super::` path outside comments
//! and test modules is an edge from the file's top-level module (`bridge` for
//! `src/bridge/link.rs`) to the one it names. Doc links and test code may point anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules every component may use and that use no component: they import nothing from the
/// crate but other leaves.
const LEAVES: &[&str] = &[
    "board",
    "clock",
    "component",
    "form",
    "marks",
    "metrics",
    "pacing",
    "password",
    "problem",
    "sparkplug",
    "tls",
    "topic",
    "watchdog",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src/") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `src/bridge/mod.rs` -> ["bridge"], `src/store/wal.rs` ->
/// ["store", "wal"], `src/lib.rs` -> [].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src/");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts
        .last()
        .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
    {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its inline test module (`#[cfg(test)]
/// mod x {`, by the crate's convention the file's last item). A declaration of a test file
/// (`#[cfg(test)] mod tests;`) cuts nothing: that file is skipped on its own.
fn code_of(text: &str) -> String {
    let cut = text
        .match_indices("#[cfg(test)]\nmod ")
        .map(|(i, _)| i)
        .find(|&i| {
            let line = text[i..].lines().nth(1).unwrap_or("");
            line.trim_end().ends_with('{')
        })
        .unwrap_or(text.len());
    text[..cut]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| match l.find(" // ") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment after each occurrence of `prefix` (e.g. `crate::`) in `code`; for a
/// group (`crate::{a, b::c}`) the first segment of each item.
fn segments_after(code: &str, prefix: &str) -> Vec<String> {
    let ident = |s: &str| {
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        s[..end].to_string()
    };
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        // A whole path segment: not `foo_crate::`.
        if i > 0 {
            let b = code.as_bytes()[i - 1];
            if b.is_ascii_alphanumeric() || b == b'_' {
                continue;
            }
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Items at the group's top level, separated by commas outside nested braces.
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(ident(group[start..j].trim_start()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(group[start..j].trim_start()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Top-level module -> the top-level modules it imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut tops = BTreeSet::new();
    for f in &files {
        if let Some(t) = module_of(&src, f).first() {
            tops.insert(t.clone());
        }
    }
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let module = module_of(&src, f);
        let Some(top) = module.first().cloned() else {
            continue; // lib.rs and main.rs sit above everything.
        };
        // Unit-test files of a folder (`src/store/tests.rs`).
        if module.last().is_some_and(|m| m == "tests") {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(f).expect("read a source file"));
        let mut targets = segments_after(&code, "crate::");
        // In `src/x.rs` and `src/x/mod.rs`, `super` is the crate root; deeper, it stays
        // inside the folder.
        if module.len() == 1 {
            targets.extend(segments_after(&code, "super::"));
        }
        let entry = g.entry(top.clone()).or_default();
        for t in targets {
            if t != top && tops.contains(&t) {
                entry.insert(t);
            }
        }
    }
    g
}

#[test]
fn leaves_import_only_leaves() {
    let g = graph();
    let mut bad = Vec::new();
    for leaf in LEAVES {
        let deps = g.get(*leaf).cloned().unwrap_or_default();
        for d in deps {
            if !LEAVES.contains(&d.as_str()) {
                bad.push(format!("{leaf} -> {d}"));
            }
        }
    }
    assert!(bad.is_empty(), "a leaf imports a component: {bad:?}");
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let g = graph();
    let edges: usize = g.values().map(BTreeSet::len).sum();
    assert!(
        edges > 30,
        "the scan found {edges} edges, too few to mean anything: {g:?}"
    );
    // Depth-first search; a back edge is a cycle, reported as its path.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                0 => visit(m, g, state, path, cycles),
                1 => {
                    let from = path.iter().position(|p| p == m).unwrap_or(0);
                    let mut c = path[from..].to_vec();
                    c.push(m.clone());
                    cycles.push(c.join(" -> "));
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = Vec::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            visit(n, &g, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn the_scanner_reads_paths_and_groups() {
    let code = "use crate::store::Store;\nuse crate::{clock, pacing::{Backoff, TokenBucket}, tls};\nlet x = foo_crate::bar;";
    assert_eq!(
        segments_after(code, "crate::"),
        vec!["store", "clock", "pacing", "tls"]
    );
}

#[test]
fn the_scan_sees_known_edges() {
    // The checks above are only as good as the scan: it must see edges that exist.
    let g = graph();
    let has = |a: &str, b: &str| g.get(a).is_some_and(|s| s.contains(b));
    assert!(has("gateway", "store"), "{g:?}");
    assert!(has("ingest", "store"), "{g:?}");
    assert!(has("store", "clock"), "{g:?}");
    // After a `#[cfg(test)] mod tests;` declaration (src/ota/manager/mod.rs).
    assert!(has("ota", "clock"), "{g:?}");
    // From a folder's root file (src/frontend/mod.rs) and from deeper in it.
    assert!(has("frontend", "ingest"), "{g:?}");
    assert!(has("sources", "local"), "{g:?}");
    assert!(!has("store", "gateway"), "{g:?}");
}
