//! Helpers shared by the end-to-end tests: where the built binaries are, temporary homes.
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// The directory holding the binaries built for this test run (`target/<profile>`).
///
/// `cargo test --workspace` / `cargo nextest run --workspace` build `agentkeysd` and
/// `agentkeys` alongside the test executables; `AGENTKEYS_BIN_DIR` overrides the lookup.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AGENTKEYS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current test executable path");
    // target/<profile>/deps/<test-exe> -> target/<profile>
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a workspace binary, with a clear failure if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace --bins` first, or `bash ci/test.sh` (or set AGENTKEYS_BIN_DIR)",
        p.display()
    );
    p
}

/// Root of the workspace checkout (for scripts such as `ci/checksec.sh`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}
