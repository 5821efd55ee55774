//! The documents name the tests that back their claims (docs/threat-model.md: "every claim names
//! its test"; docs/security-tests.md: each attack and its test). A test renamed, moved or lost
//! would leave a claim pointing at nothing: every test file a document names must exist, and
//! every long snake_case name it cites in backticks (a test, or a config key, a field, a metric)
//! must be a word of the source tree. Names of other software (OpenBao's settings) are listed
//! below as such.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The repository root (this package lives in `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Every word (`[A-Za-z0-9_]+`) of the source files below `dir`.
fn words_below(dir: &Path, words: &mut HashSet<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "corpus" && name != "artifacts"
            {
                words_below(&path, words);
            }
        } else if [".rs", ".py", ".sh", ".toml"]
            .iter()
            .any(|e| name.ends_with(e))
            && let Ok(text) = fs::read_to_string(&path)
        {
            for w in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if w.len() > 3 {
                    words.insert(w.to_string());
                }
            }
        }
    }
}

/// The backticked names of `text` with four or more snake_case words (`a_b_c_d`): long enough to
/// be a test's or a setting's name, not prose.
fn cited_names(text: &str) -> Vec<&str> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.split('_').count() >= 4
                && s.split('_').all(|p| {
                    !p.is_empty()
                        && p.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                })
                && s.as_bytes()[0].is_ascii_lowercase()
        })
        .collect()
}

/// The `tests/NAME.rs` files `text` names.
fn cited_test_files(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("tests/") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '/' || c == '.'))
            .unwrap_or(tail.len());
        let path = tail[..end].trim_end_matches('.');
        if path.ends_with(".rs") && !path.contains("/support/") {
            out.push(path);
        }
        rest = &tail[end.max(1)..];
    }
    out
}

/// Names of other software the documents cite (not words of this tree).
const OTHER_SOFTWARE: &[&str] = &[
    // OpenBao/Vault AppRole's setting, in the threat model's backend rows.
    "secret_id_num_uses",
    // Linux system calls the documents discuss.
    "name_to_handle_at",
];

#[test]
fn the_tests_the_documents_name_exist() {
    let root = root();
    let mut words = HashSet::new();
    for dir in ["crates", "tests", "fuzz", "bench", "ci"] {
        words_below(&root.join(dir), &mut words);
    }
    // The workspace's Cargo.toml (its lints).
    let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("the workspace manifest");
    words.extend(
        manifest
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(str::to_string),
    );
    let mut missing = Vec::new();
    let mut checked = 0;
    for doc in [
        "docs/threat-model.md",
        "docs/security-tests.md",
        "docs/architecture.md",
        "README.md",
        "fuzz/README.md",
    ] {
        let text = fs::read_to_string(root.join(doc)).expect("the document exists");
        for name in cited_names(&text) {
            checked += 1;
            if !words.contains(name) && !OTHER_SOFTWARE.contains(&name) {
                missing.push(format!("{doc}: `{name}` is not a name in the source tree"));
            }
        }
        for file in cited_test_files(&text) {
            checked += 1;
            if !root.join(file).is_file() {
                missing.push(format!("{doc}: {file} does not exist"));
            }
        }
    }
    println!("{checked} citations checked");
    assert!(
        missing.is_empty(),
        "documents cite what is not there:\n{}",
        missing.join("\n")
    );
}
