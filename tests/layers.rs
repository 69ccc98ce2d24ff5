//! The modules of `src/` form layers: no module uses, directly or through others, a module that
//! uses it, and the "Modules" table of docs/architecture.md lists them in an order in which each
//! uses only modules above it.
//!
//! "Uses" is read from the source: every `crate::name` path (in `use` items, `crate::{a, b}`
//! groups, and paths written in place), and `super::` paths that climb to the crate root, with
//! comments, doc text, string and character literals left out. A name re-exported at the crate
//! root (`crate::Space`) counts as a use of the module it comes from (`space`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The source with comments and the contents of string and character literals blanked out
/// (lifetimes and labels kept).
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        if c[i] == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c[i] == 'r'
            && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i == 1 || !ident(c[i - 2]))))
            && {
                let mut k = i + 1;
                while at(k) == '#' {
                    k += 1;
                }
                at(k) == '"'
            }
        {
            // A raw string: r"..", r#".."#, br#".."#.
            let mut k = i + 1;
            let mut hashes = 0;
            while at(k) == '#' {
                hashes += 1;
                k += 1;
            }
            k += 1;
            loop {
                if k >= c.len() {
                    break;
                }
                if c[k] == '"' && (1..=hashes).all(|h| at(k + h) == '#') {
                    k += 1 + hashes;
                    break;
                }
                k += 1;
            }
            i = k;
            out.push_str("\"\"");
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\'' && at(i + 1) == '\\' {
            // An escaped character literal: '\n', '\'', '\u{..}'.
            i += 3;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else if c[i] == '\'' && at(i + 2) == '\'' {
            i += 3;
            out.push_str("' '");
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Punct(char),
}

fn tokens(code: &str) -> Vec<Tok> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if c[i].is_alphabetic() || c[i] == '_' {
            let s = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[s..i].iter().collect()));
        } else if c[i].is_whitespace() {
            i += 1;
        } else {
            out.push(Tok::Punct(c[i]));
            i += 1;
        }
    }
    out
}

fn is_path_sep(t: &[Tok], k: usize) -> bool {
    t.get(k) == Some(&Tok::Punct(':')) && t.get(k + 1) == Some(&Tok::Punct(':'))
}

/// The first names of the items of the `{ .. }` group that starts at `t[k]`: `{a::b, c}` gives
/// `a`, `c` (nested groups are skipped).
fn group_heads(t: &[Tok], k: usize) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut want = true;
    for tok in &t[k..] {
        match tok {
            Tok::Punct('{') => {
                depth += 1;
                if depth == 1 {
                    want = true;
                }
            }
            Tok::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Punct(',') if depth == 1 => want = true,
            Tok::Ident(s) if depth == 1 && want => {
                heads.push(s.clone());
                want = false;
            }
            _ if depth == 1 => want = false,
            _ => {}
        }
    }
    heads
}

/// The crate-root names a file refers to (`crate::x`, `$crate::x`, `crate::{x, y}`, and
/// `super::..::x` climbing from `depth` (1 for `src/a.rs` and `src/a/mod.rs`) to the root).
fn root_names(code: &str, depth: usize) -> BTreeSet<String> {
    let t = tokens(code);
    let mut names = BTreeSet::new();
    // Inline modules (`mod tests { .. }`) deepen `super::`: the brace depths they opened at.
    let mut braces = 0usize;
    let mut inline: Vec<usize> = Vec::new();
    let mut k = 0;
    while k < t.len() {
        match &t[k] {
            Tok::Punct('{') => braces += 1,
            Tok::Punct('}') => {
                braces -= 1;
                if inline.last() == Some(&braces) {
                    inline.pop();
                }
            }
            Tok::Ident(m)
                if m == "mod"
                    && matches!(t.get(k + 1), Some(Tok::Ident(_)))
                    && t.get(k + 2) == Some(&Tok::Punct('{')) =>
            {
                inline.push(braces);
            }
            Tok::Ident(s) if s == "crate" && is_path_sep(&t, k + 1) => match t.get(k + 3) {
                Some(Tok::Ident(n)) => {
                    names.insert(n.clone());
                }
                Some(Tok::Punct('{')) => names.extend(group_heads(&t, k + 3)),
                _ => {}
            },
            Tok::Ident(s)
                if s == "super"
                    && is_path_sep(&t, k + 1)
                    && !matches!(k.checked_sub(1).map(|j| &t[j]), Some(Tok::Punct(':'))) =>
            {
                let mut up = 0;
                let mut j = k;
                while t.get(j) == Some(&Tok::Ident("super".into())) && is_path_sep(&t, j + 1) {
                    up += 1;
                    j += 3;
                }
                if up == depth + inline.len() {
                    match t.get(j) {
                        Some(Tok::Ident(n)) => {
                            names.insert(n.clone());
                        }
                        Some(Tok::Punct('{')) => names.extend(group_heads(&t, j)),
                        _ => {}
                    }
                }
                k = j;
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    names
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

struct Crate {
    /// The top-level modules of `src/lib.rs`.
    modules: BTreeSet<String>,
    /// Which module uses which, and in which file (for the messages).
    uses: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

fn read_crate() -> Crate {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = code_only(&std::fs::read_to_string(root.join("lib.rs")).unwrap());
    let t = tokens(&lib);
    let mut modules = BTreeSet::new();
    // Names re-exported at the root: the module they come from.
    let mut reexport: BTreeMap<String, String> = BTreeMap::new();
    for k in 0..t.len() {
        match (&t[k], t.get(k + 1)) {
            (Tok::Ident(m), Some(Tok::Ident(n))) if m == "mod" => {
                modules.insert(n.clone());
            }
            (Tok::Ident(u), Some(Tok::Ident(from))) if u == "use" => {
                let from = from.clone();
                let mut j = k + 2;
                let mut last = None;
                while j < t.len() && t[j] != Tok::Punct(';') {
                    match &t[j] {
                        Tok::Ident(n) if n != "as" && n != "self" => last = Some(n.clone()),
                        Tok::Punct(',') | Tok::Punct('}') => {
                            if let Some(n) = last.take() {
                                reexport.insert(n, from.clone());
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                if let Some(n) = last {
                    reexport.insert(n, from);
                }
            }
            _ => {}
        }
    }
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut uses: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap();
        let parts: Vec<String> = rel
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        // The binaries use the library as `hetmem`, from outside.
        if (parts.len() == 1 && (parts[0] == "lib.rs" || parts[0] == "main.rs"))
            || parts[0] == "bin"
        {
            continue;
        }
        let top = parts[0].trim_end_matches(".rs").to_string();
        assert!(
            modules.contains(&top),
            "{} is not in a module declared in src/lib.rs",
            rel.display()
        );
        let depth = if parts.last().unwrap() == "mod.rs" {
            parts.len() - 1
        } else {
            parts.len()
        };
        let code = code_only(&std::fs::read_to_string(&f).unwrap());
        for n in root_names(&code, depth) {
            let to = if modules.contains(&n) {
                n
            } else {
                reexport.get(&n).cloned().unwrap_or_else(|| {
                    panic!(
                        "{}: `crate::{n}` is neither a module nor a re-export of src/lib.rs",
                        rel.display()
                    )
                })
            };
            if to != top {
                uses.entry(top.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    Crate { modules, uses }
}

fn deps<'a>(c: &'a Crate, m: &str) -> impl Iterator<Item = &'a String> {
    c.uses.get(m).into_iter().flat_map(|d| d.keys())
}

/// A cycle through `m`, if any (depth-first search).
fn find_cycle(c: &Crate) -> Option<Vec<String>> {
    fn visit(
        c: &Crate,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cyc = path[i..].to_vec();
            cyc.push(m.to_string());
            return Some(cyc);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in deps(c, m) {
            if let Some(cyc) = visit(c, d, path, done) {
                return Some(cyc);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    c.modules
        .iter()
        .find_map(|m| visit(c, m, &mut Vec::new(), &mut done))
}

fn graph(c: &Crate) -> String {
    c.modules
        .iter()
        .map(|m| {
            let d: Vec<&str> = deps(c, m).map(String::as_str).collect();
            format!("  {m} -> {}\n", d.join(" "))
        })
        .collect()
}

#[test]
fn no_module_uses_a_module_that_uses_it() {
    let c = read_crate();
    println!("which module uses which:\n{}", graph(&c));
    if let Some(cyc) = find_cycle(&c) {
        let steps: Vec<String> = cyc
            .windows(2)
            .map(|w| format!("  {} -> {} in {:?}", w[0], w[1], c.uses[&w[0]][&w[1]]))
            .collect();
        panic!(
            "a cycle between modules of src/:\n{}\nthe whole graph:\n{}",
            steps.join("\n"),
            graph(&c)
        );
    }
}

#[test]
fn the_modules_table_of_the_architecture_doc_lists_users_below_what_they_use() {
    let c = read_crate();
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .unwrap();
    let table = doc
        .split("## Modules")
        .nth(1)
        .expect("docs/architecture.md has a Modules section");
    // First column of each row: the module names in backquotes (`space/`, `bench`, `demo`).
    let mut order: Vec<String> = Vec::new();
    for line in table.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let first = line.split('|').nth(1).unwrap_or("");
        for (i, part) in first.split('`').enumerate() {
            let name = part.trim_end_matches('/');
            if i % 2 == 1 && c.modules.contains(name) {
                order.push(name.to_string());
            }
        }
    }
    let missing: Vec<&String> = c.modules.iter().filter(|m| !order.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "modules missing from the Modules table of docs/architecture.md: {missing:?}"
    );
    let pos = |m: &str| order.iter().position(|o| o == m).unwrap();
    let mut wrong = Vec::new();
    for m in &c.modules {
        for d in deps(&c, m) {
            if pos(d) >= pos(m) {
                wrong.push(format!("{m} uses {d}, listed below it"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the Modules table of docs/architecture.md is out of order:\n{}\nthe graph:\n{}",
        wrong.join("\n"),
        graph(&c)
    );
}

#[test]
fn the_reader_sees_paths_and_skips_comments_and_literals() {
    let src = r##"
        use crate::addr::VaRange; // crate::hidden_a
        use crate::{error::{Error, Result}, sync};
        /* crate::hidden_b /* nested crate::hidden_c */ */
        /// doc: [`crate::hidden_d`]
        fn f<'a>(x: &'a str) -> char { let _ = "crate::hidden_e \" crate::hidden_f";
            let _ = r#"crate::hidden_g "quoted" "#; let _ = '"'; let _ = '\''; crate::pool::f(); 'x' }
        mod tests { use super::*; fn g() { super::super::space::h() } }
        fn h() { super::mm::k(); pub(super) fn i() {} }
    "##;
    let got = root_names(&code_only(src), 1);
    let want: BTreeSet<String> = ["addr", "error", "sync", "pool", "space", "mm"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
    // From `src/a/b.rs` (depth 2) one `super` stays inside `a`.
    assert!(root_names(&code_only("use super::x::y;"), 2).is_empty());
}
