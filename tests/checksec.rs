//! Tests for the release-binary hardening gate `ci/checksec.sh`.
//!
//! Small C programs are built with known-weak and known-hardened flags, and the gate must tell
//! them apart and name what is missing. A test that needs `gcc` or `readelf` prints
//! `SKIP: <reason>` and returns when the tool is absent; it never passes without checking.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use agentkeys_e2e::workspace_root;

/// A program with a local char array filled through a non-inlined function (so
/// `-fstack-protector-strong` emits a canary) and copies whose size is only known at run time
/// into a buffer of known size (so `_FORTIFY_SOURCE=2` turns them into `__*_chk` calls).
const PROGRAM: &str = r#"
#include <stdio.h>
#include <string.h>

__attribute__((noinline)) static void greet(const char *name) {
    char buf[64];
    size_t n = strlen(name);
    if (n >= sizeof buf) {
        n = sizeof buf - 1;
    }
    memcpy(buf, name, n);
    buf[n] = '\0';
    puts(buf);
}

int main(int argc, char **argv) {
    char copy[32];
    strcpy(copy, argc > 1 ? argv[1] : "world");
    greet(copy);
    return 0;
}
"#;

const WEAK_FLAGS: &[&str] = &[
    "-no-pie",
    "-z",
    "norelro",
    "-fno-stack-protector",
    "-z",
    "execstack",
];

const HARDENED_FLAGS: &[&str] = &[
    "-O2",
    "-fPIE",
    "-pie",
    "-fstack-protector-strong",
    "-D_FORTIFY_SOURCE=2",
    "-Wl,-z,relro,-z,now",
    "-Wl,-z,noexecstack",
];

/// Everything hardened except immediate binding: GNU_RELRO without BIND_NOW.
const PARTIAL_RELRO_FLAGS: &[&str] = &[
    "-O2",
    "-fPIE",
    "-pie",
    "-fstack-protector-strong",
    "-D_FORTIFY_SOURCE=2",
    "-Wl,-z,relro",
    "-Wl,-z,lazy",
    "-Wl,-z,noexecstack",
];

const REQUIRED: [&str; 4] = ["PIE", "RELRO", "CANARY", "NX"];

fn script() -> PathBuf {
    workspace_root().join("ci").join("checksec.sh")
}

/// True if `tool --version` runs and succeeds.
fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Returns the name of the first missing tool, so the caller can print a SKIP reason.
fn missing_tool(tools: &[&'static str]) -> Option<&'static str> {
    tools.iter().copied().find(|t| !have(t))
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "agentkeys-checksec-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", dir.display()));
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Compiles `PROGRAM` with `flags` into `dir/name`; a compiler failure is a test failure.
fn compile(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, PROGRAM).expect("write C source");
    let out = dir.join(name);
    let res = Command::new("gcc")
        .args(flags)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run gcc");
    assert!(
        res.status.success(),
        "gcc {flags:?} failed:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(out.is_file(), "gcc produced no {}", out.display());
    out
}

struct Gate {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Gate {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// The table row for `bin`: the cells after the path
    /// (PIE, RELRO, CANARY, NX, then the FORTIFY words).
    fn row(&self, bin: &Path) -> Vec<String> {
        let name = bin.to_str().expect("utf-8 temp path");
        let line = self
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with(' ')))
            .unwrap_or_else(|| panic!("no table row for {name} in:\n{}", self.stdout));
        line.split_whitespace().map(str::to_owned).collect()
    }

    /// The `FAIL: <bin>: <PROPERTY>:` lines, as property names.
    fn failed_properties(&self, bin: &Path) -> BTreeSet<String> {
        let prefix = format!("FAIL: {}: ", bin.display());
        self.all()
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| rest.split(':').next())
            .map(str::to_owned)
            .collect()
    }
}

fn run_gate<I, S>(args: I) -> Gate
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let script = script();
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {} (is it executable?): {e}", script.display()));
    let gate = Gate {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    eprintln!(
        "--- checksec.sh exit {:?}\n{}{}",
        gate.code, gate.stdout, gate.stderr
    );
    gate
}

/// Distinct `__*_chk` function names in `.dynsym`, counted here independently of the script.
fn fortified_imports(bin: &Path) -> BTreeSet<String> {
    let out = Command::new("readelf")
        .env("LC_ALL", "C")
        .args(["-W", "--dyn-syms"])
        .arg(bin)
        .output()
        .expect("run readelf");
    assert!(out.status.success(), "readelf --dyn-syms failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[3] == "FUNC").then(|| f[7].split('@').next().unwrap_or(""))
        })
        .filter(|n| n.starts_with("__") && n.ends_with("_chk") && n.len() > "___chk".len())
        .map(str::to_owned)
        .collect()
}

#[test]
fn weak_binary_fails_gate() {
    if let Some(tool) = missing_tool(&["gcc", "readelf"]) {
        eprintln!("SKIP: weak_binary_fails_gate: `{tool}` not found");
        return;
    }
    let dir = TempDir::new("weak");
    let bin = compile(dir.path(), "weak", WEAK_FLAGS);
    let gate = run_gate([&bin]);

    assert_eq!(gate.code, Some(1), "a weak binary must fail the gate");
    let failed = gate.failed_properties(&bin);
    for prop in REQUIRED {
        assert!(
            failed.contains(prop),
            "{prop} failure not named: {failed:?}"
        );
    }
    let row = gate.row(&bin);
    assert_eq!(&row[..4], ["no", "no", "no", "no"], "row: {row:?}");
    assert_eq!(row[4], "no", "FORTIFY without _FORTIFY_SOURCE: {row:?}");
}

#[test]
fn hardened_c_binary_passes_gate() {
    if let Some(tool) = missing_tool(&["gcc", "readelf"]) {
        eprintln!("SKIP: hardened_c_binary_passes_gate: `{tool}` not found");
        return;
    }
    let dir = TempDir::new("hardened");
    let bin = compile(dir.path(), "hardened", HARDENED_FLAGS);
    let gate = run_gate([&bin]);

    assert_eq!(
        gate.code,
        Some(0),
        "a hardened binary must pass:\n{}",
        gate.all()
    );
    assert!(gate.failed_properties(&bin).is_empty());
    let row = gate.row(&bin);
    assert_eq!(&row[..4], ["yes", "full", "yes", "yes"], "row: {row:?}");

    // FORTIFY: "yes (N fortified calls)", with N equal to what readelf shows us directly.
    let expected = fortified_imports(&bin);
    assert!(
        !expected.is_empty(),
        "test program should import __*_chk functions (none found; is _FORTIFY_SOURCE active?)"
    );
    let fortify = row[4..].join(" ");
    assert_eq!(
        fortify,
        format!("yes ({} fortified calls)", expected.len()),
        "imports: {expected:?}"
    );
}

#[test]
fn partial_relro_is_not_full() {
    if let Some(tool) = missing_tool(&["gcc", "readelf"]) {
        eprintln!("SKIP: partial_relro_is_not_full: `{tool}` not found");
        return;
    }
    let dir = TempDir::new("partial");
    let bin = compile(dir.path(), "partial", PARTIAL_RELRO_FLAGS);
    let gate = run_gate([&bin]);

    assert_eq!(gate.code, Some(1), "partial RELRO must fail the gate");
    let failed = gate.failed_properties(&bin);
    assert_eq!(
        failed,
        BTreeSet::from(["RELRO".to_owned()]),
        "only RELRO is missing"
    );
    let row = gate.row(&bin);
    assert_eq!(&row[..4], ["yes", "partial", "yes", "yes"], "row: {row:?}");
}

#[test]
fn gate_reports_every_binary_and_fails_on_one_bad() {
    if let Some(tool) = missing_tool(&["gcc", "readelf"]) {
        eprintln!("SKIP: gate_reports_every_binary_and_fails_on_one_bad: `{tool}` not found");
        return;
    }
    let dir = TempDir::new("mixed");
    let good = compile(dir.path(), "good", HARDENED_FLAGS);
    let bad = compile(dir.path(), "bad", WEAK_FLAGS);
    let gate = run_gate([&good, &bad]);

    assert_eq!(gate.code, Some(1));
    assert!(gate.failed_properties(&good).is_empty());
    assert_eq!(gate.failed_properties(&bad).len(), REQUIRED.len());
    assert_eq!(gate.row(&good)[..4], ["yes", "full", "yes", "yes"]);
    assert_eq!(gate.row(&bad)[..4], ["no", "no", "no", "no"]);
}

#[test]
fn workspace_binaries_pass_gate() {
    if let Some(tool) = missing_tool(&["readelf"]) {
        eprintln!("SKIP: workspace_binaries_pass_gate: `{tool}` not found");
        return;
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir), // join keeps an absolute path as is
        None => workspace_root().join("target"),
    };
    let release = target.join("release");
    let bins: Vec<PathBuf> = ["agentkeysd", "agentkeys"]
        .iter()
        .map(|n| release.join(n))
        .collect();
    let missing: Vec<&PathBuf> = bins.iter().filter(|b| !b.is_file()).collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIP: workspace_binaries_pass_gate: release binaries not built ({missing:?}); \
             `.ci/run` builds release and runs ci/checksec.sh on them itself"
        );
        return;
    }
    let gate = run_gate(&bins);
    assert_eq!(
        gate.code,
        Some(0),
        "release binaries fail the hardening gate:\n{}",
        gate.all()
    );
    for b in &bins {
        assert_eq!(gate.row(b)[..4], ["yes", "full", "yes", "yes"]);
    }
}

#[test]
fn no_arguments_is_usage_error() {
    let gate = run_gate(std::iter::empty::<&str>());
    assert_eq!(gate.code, Some(2));
    assert!(gate.stderr.contains("usage:"), "stderr: {}", gate.stderr);
    assert!(gate.stdout.is_empty(), "no table without arguments");
}

#[test]
fn non_elf_file_is_input_error() {
    if let Some(tool) = missing_tool(&["readelf"]) {
        eprintln!("SKIP: non_elf_file_is_input_error: `{tool}` not found");
        return;
    }
    let dir = TempDir::new("notelf");
    let file = dir.path().join("script.sh");
    std::fs::write(&file, "#!/bin/sh\necho not an ELF binary\n").expect("write file");
    let gate = run_gate([&file]);
    assert_eq!(gate.code, Some(2), "a non-ELF file is an input error");
    assert!(
        gate.stderr.contains("not an ELF file") && gate.stderr.contains("script.sh"),
        "stderr should name the file and the problem: {}",
        gate.stderr
    );
    assert!(gate.stdout.is_empty(), "no table on input errors");
}

#[test]
fn missing_file_is_input_error() {
    if let Some(tool) = missing_tool(&["readelf"]) {
        eprintln!("SKIP: missing_file_is_input_error: `{tool}` not found");
        return;
    }
    let dir = TempDir::new("missing");
    let file = dir.path().join("does-not-exist");
    let gate = run_gate([&file]);
    assert_eq!(gate.code, Some(2));
    assert!(
        gate.stderr.contains("does-not-exist"),
        "stderr: {}",
        gate.stderr
    );
}
