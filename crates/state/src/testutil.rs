//! Test helpers: unique, self-removing temporary homes.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::home::Home;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh 0700 directory under the system temp dir, removed (with its content) on drop.
pub struct TempHome {
    dir: PathBuf,
}

impl TempHome {
    pub fn new(tag: &str) -> TempHome {
        let dir = std::env::temp_dir().join(format!(
            "agentkeys-state-{tag}-{}-{}-{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            getrandom::u32().unwrap()
        ));
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        TempHome { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A home at the directory itself.
    pub fn home(&self) -> Home {
        Home::at(&self.dir)
    }
}

impl Drop for TempHome {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Every file under `dir`, recursively, with its bytes.
pub fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        let meta = fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            out.extend(all_files(&p));
        } else if meta.is_file() {
            out.push((p.clone(), fs::read(&p).unwrap()));
        }
    }
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
