//! The code's shape, as docs/design.md states it: `src/`'s top-level modules form no import
//! cycle; only the model spec (`src/model/`) and `src/task/` name an architecture; no source
//! file is over 600 lines; no function is over 100 lines outside the CPU kernels. Read from
//! the source text: `crate::NAME` paths (code and doc links alike) are the imports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 100;

/// Files whose long functions are CPU kernels (loops over raw slices kept in one piece so
/// the compiler vectorises them), exempt from the function-length rule.
const KERNEL_FILES: &[&str] = &[
    "src/model/ops/",
    "src/optim/fused.rs",
    "src/optim/bsfa/cpu.rs",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file below `dir` whose name ends with one of `endings`.
fn files(dir: &Path, endings: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path, endings));
        } else if endings.iter().any(|e| path.to_string_lossy().ends_with(e)) {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// `src/`'s top-level modules (`lib.rs` and `main.rs` aside), each with the source files it
/// owns.
fn top_level_modules() -> BTreeMap<String, Vec<PathBuf>> {
    let src = root().join("src");
    let mut modules = BTreeMap::new();
    for entry in fs::read_dir(&src).unwrap().flatten() {
        let path = entry.path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let owned = if path.is_dir() {
            files(&path, &[".rs"])
        } else if path.extension().is_some_and(|e| e == "rs") {
            vec![path.clone()]
        } else {
            continue;
        };
        modules.entry(name).or_insert_with(Vec::new).extend(owned);
    }
    modules
}

/// The top-level modules a source text names through `crate::NAME` or `crate::{NAME, ..}`.
fn named_modules(text: &str, known: &BTreeMap<String, Vec<PathBuf>>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let group = match rest.strip_prefix('{') {
            Some(inner) => &inner[..inner.find('}').unwrap_or(inner.len())],
            None => rest,
        };
        let mut take = |word: &str| {
            let word: String = word
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if known.contains_key(&word) {
                names.insert(word);
            }
        };
        if rest.starts_with('{') {
            group.split(',').for_each(&mut take);
        } else {
            take(group);
        }
    }
    names
}

/// A cycle in `graph`, as the path that closes it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in &graph[node] {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn top_level_modules_form_no_import_cycle() {
    let modules = top_level_modules();
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|(name, owned)| {
            let mut uses = BTreeSet::new();
            for file in owned {
                uses.extend(named_modules(&fs::read_to_string(file).unwrap(), &modules));
            }
            uses.remove(name);
            (name.clone(), uses)
        })
        .collect();
    assert!(graph.len() > 10, "found only {:?}", graph.keys());
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle among src/'s modules: {}", cycle.join(" -> "));
    }
}

#[test]
fn cycle_finder_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a")]
        .iter()
        .map(|(from, to)| (from.to_string(), BTreeSet::from([to.to_string()])))
        .collect();
    assert_eq!(
        find_cycle(&graph).unwrap(),
        ["a", "b", "c", "a"].map(String::from)
    );
}

#[test]
fn only_the_model_spec_and_tasks_name_an_architecture() {
    let mut offenders = Vec::new();
    for file in files(&root().join("src"), &[".rs"]) {
        let name = relative(&file);
        if name.starts_with("src/model/") || name.starts_with("src/task/") {
            continue;
        }
        // Code only: docs may name the `model.architecture` key.
        let text = fs::read_to_string(&file).unwrap();
        let code: String = text
            .lines()
            .map(|line| line.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        for pattern in ["Architecture", "is_vit", ".architecture"] {
            if code.contains(pattern) {
                offenders.push(format!("{name} ({pattern})"));
            }
        }
    }
    assert!(offenders.is_empty(), "architecture checks in {offenders:?}");
}

#[test]
fn no_source_file_is_over_600_lines() {
    let mut long = Vec::new();
    for dir in ["src", "tests", "scripts"] {
        for file in files(&root().join(dir), &[".rs", ".py", ".sh"]) {
            let lines = fs::read_to_string(&file).unwrap().lines().count();
            if lines > MAX_FILE_LINES {
                long.push(format!("{} ({lines} lines)", relative(&file)));
            }
        }
    }
    assert!(long.is_empty(), "over {MAX_FILE_LINES} lines: {long:?}");
}

/// The Rust functions of `text` and their length in lines: from the line that opens one
/// (`fn name` at the start of a line, after visibility and qualifiers) to the `}` that
/// rustfmt puts at the same indentation.
fn function_lengths(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let mut words = body.split_whitespace().peekable();
        while let Some(w) = words.peek() {
            if w.starts_with("pub") || ["const", "unsafe", "async", "extern"].contains(w) {
                words.next();
            } else {
                break;
            }
        }
        if words.next() != Some("fn") {
            continue;
        }
        let name: String = words
            .next()
            .unwrap_or("")
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The signature ends at the first line ending in `{` (a body follows), `;` (a
        // declaration) or `}` (a body on one line).
        let Some(signature_end) = lines[i..]
            .iter()
            .position(|l| l.trim_end().ends_with(['{', ';', '}']))
        else {
            continue;
        };
        if !lines[i + signature_end].trim_end().ends_with('{') {
            continue;
        }
        let close = format!("{indent}}}");
        if let Some(end) = lines[i + 1..].iter().position(|l| *l == close) {
            out.push((name, end + 2));
        }
    }
    out
}

#[test]
fn no_function_is_over_100_lines_outside_the_cpu_kernels() {
    let mut long = Vec::new();
    for dir in ["src", "tests"] {
        for file in files(&root().join(dir), &[".rs"]) {
            let name = relative(&file);
            if KERNEL_FILES.iter().any(|k| name.starts_with(k)) {
                continue;
            }
            for (function, lines) in function_lengths(&fs::read_to_string(&file).unwrap()) {
                if lines > MAX_FN_LINES {
                    long.push(format!("{name}: {function} ({lines} lines)"));
                }
            }
        }
    }
    assert!(long.is_empty(), "over {MAX_FN_LINES} lines: {long:?}");
}

#[test]
fn function_lengths_count_from_signature_to_closing_brace() {
    let text = "pub(crate) fn a(\n    x: u8,\n) {\n    one();\n}\n    fn b() {}\n    fn c();\n    \
                fn d() {\n    }\n";
    assert_eq!(
        function_lengths(text),
        vec![("a".to_string(), 5), ("d".to_string(), 2)]
    );
}
