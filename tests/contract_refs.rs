//! Every test that docs/filesystem-contract.md names as the proof of a rule exists: each
//! backticked path whose last segment names a function (`file_placement::every_write_drops_the_replicas_first`,
//! `sh::cpu_store_vs_replica_creation`) must be a `fn` somewhere under `tests/` or `src/`. A
//! renamed or deleted test otherwise leaves a rule that names no proof.

use std::collections::BTreeSet;
use std::path::Path;

fn functions(dir: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            functions(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let src = std::fs::read_to_string(&p).unwrap();
            for w in src.split("fn ").skip(1) {
                let name: String = w
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        }
    }
}

/// The last segments of the backticked `a::b` paths of `doc` that name functions (snake case
/// with at least two underscores: test names, not modules or types).
fn named_tests(doc: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, part) in doc.split('`').enumerate() {
        if i % 2 == 0 || !part.contains("::") {
            continue;
        }
        let last = part.rsplit("::").next().unwrap();
        // `a::{b, c}` groups name several.
        let names: Vec<&str> = match last.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
            Some(g) => g.split(',').map(str::trim).collect(),
            None => vec![last],
        };
        for n in names {
            if n.matches('_').count() >= 2
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                out.insert(n.to_string());
            }
        }
    }
    out
}

#[test]
fn every_test_the_filesystem_contract_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/filesystem-contract.md")).unwrap();
    let mut fns = BTreeSet::new();
    functions(&root.join("tests"), &mut fns);
    functions(&root.join("src"), &mut fns);
    let named = named_tests(&doc);
    assert!(
        named.len() > 50,
        "the contract names only {} tests",
        named.len()
    );
    let missing: Vec<&String> = named.iter().filter(|n| !fns.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "docs/filesystem-contract.md names tests that do not exist: {missing:?}"
    );
}
