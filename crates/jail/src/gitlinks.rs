//! Submodules seen before and after a jail. The owner's `git status` in a repository runs a
//! `git status` in each populated submodule (a gitlink in the index with a `.git` in its
//! directory), which reads that submodule's own configuration: `core.fsmonitor` there runs a
//! program. An existing submodule's `.git` is read-only in the jail, and an unpopulated one
//! cannot be given a `.git` ([`paths`], used by the policy), but with
//! [`crate::policy::GitAccess::Commit`] (`--git-commit`) the agent can add a gitlink (`git
//! init sub`, a config of its own, `git add sub`). Nothing in the kernel can stop that
//! without making the index read-only, so `agentkeys jail` takes a [`Snapshot`] before the
//! jail and, after it, names every gitlink that is new or whose `.git` changed
//! ([`changes`]), for the owner to look at before running git there.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::policy::JailPolicy;

/// Most bytes of `git ls-files` output read (a repository's index listing).
const MAX_LISTING: u64 = 64 << 20;
/// Most hooks read in one submodule's git directory.
const MAX_HOOKS: usize = 256;
/// Longest `git ls-files` may take.
const LISTING_TIME: Duration = Duration::from_secs(20);
/// Most bytes read of each file that tells where a submodule's configuration is.
const MAX_FILE: u64 = 64 << 10;

/// One repository's gitlinks: each path and a digest of what its `.git` holds (`None`: not
/// populated).
pub(crate) type Links = BTreeMap<String, Option<Vec<u8>>>;

/// Per repository (a writable root with a `.git`): its gitlinks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot(pub(crate) Vec<(PathBuf, Links)>);

/// The gitlinks of every repository at a writable root of `policy`. A repository git cannot
/// list (no `git`, a broken index) is left out.
pub fn snapshot(policy: &JailPolicy) -> Snapshot {
    Snapshot(
        policy
            .writable
            .iter()
            .filter(|r| std::fs::symlink_metadata(r.join(".git")).is_ok())
            .filter_map(|r| Some((r.clone(), gitlinks(r)?)))
            .collect(),
    )
}

/// What changed since `before`, one sentence each: a gitlink that is new or whose `.git`
/// (file, or the `config`, `commondir` and hook names of a directory) differs.
pub fn changes(before: &Snapshot, policy: &JailPolicy) -> Vec<String> {
    let after = snapshot(policy);
    let mut out = Vec::new();
    for (root, links) in &after.0 {
        let old = before
            .0
            .iter()
            .find(|(r, _)| r == root)
            .map(|(_, l)| l.clone())
            .unwrap_or_default();
        for (path, state) in links {
            let what = match old.get(path) {
                None => "a submodule the agent added",
                Some(s) if s != state => "a submodule whose .git the agent changed",
                Some(_) => continue,
            };
            // The path comes from the agent: escaped for the terminal.
            let shown = root
                .join(path)
                .display()
                .to_string()
                .escape_debug()
                .to_string();
            out.push(format!(
                "{shown}: {what}: `git status` in {} runs what its git directory's config \
                 says (core.fsmonitor, ...); look at {shown}/.git before running git there \
                 (`git rm --cached PATH` drops a submodule)",
                root.display().to_string().escape_debug()
            ));
        }
    }
    out
}

/// The gitlinks of the repository at `root` (paths relative to it, populated or not), listed
/// before the jail to protect them; none when git cannot list them.
pub fn paths(root: &Path) -> Vec<String> {
    listing(root)
        .map(|l| l.into_keys().collect())
        .unwrap_or_default()
}

/// The gitlinks of the repository at `root` with the state of each `.git`: `None` when `root`
/// has no `.git` or git cannot list it. The policy builder lists each writable root once and
/// keeps the listing as the snapshot [`changes`] compares against after the jail.
pub(crate) fn listing(root: &Path) -> Option<Links> {
    std::fs::symlink_metadata(root.join(".git")).ok()?;
    gitlinks(root)
}

fn gitlinks(root: &Path) -> Option<Links> {
    // The owner's git on the owner's repository; ls-files never enters a submodule.
    let mut child = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["-c", "core.fsmonitor=false", "ls-files", "--stage", "-z"])
        // This repository and no other: without them git would look further up (or take
        // the root for a bare repository) when `.git` is not valid.
        .env("GIT_DIR", root.join(".git"))
        .env("GIT_WORK_TREE", root)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Bounded in size and time: the agent can leave a FIFO where git reads (`.git/index`).
    let mut out = child.stdout.take()?;
    let mut listing = Vec::new();
    let deadline = Instant::now() + LISTING_TIME;
    let complete = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || listing.len() as u64 > MAX_LISTING {
            break false;
        }
        let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => break false,
        }
        let mut chunk = [0u8; 65536];
        match out.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => listing.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break false,
        }
    };
    if !complete {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    if !child.wait().ok()?.success() {
        return None;
    }
    let mut links = BTreeMap::new();
    for entry in listing.split(|&b| b == 0) {
        // `MODE OBJECT STAGE\tPATH`
        let Some(tab) = entry.iter().position(|&b| b == b'\t') else {
            continue;
        };
        if !entry.starts_with(b"160000 ") {
            continue;
        }
        let Ok(path) = std::str::from_utf8(&entry[tab + 1..]) else {
            continue;
        };
        links.insert(path.to_string(), git_state(&root.join(path).join(".git")));
    }
    Some(links)
}

/// A regular file's first bytes (never through a link, never blocking on a FIFO).
fn read_small(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    if !std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()) {
        return v;
    }
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
    {
        let _ = f.take(MAX_FILE).read_to_end(&mut v);
    }
    v
}

fn git_state(dot_git: &Path) -> Option<Vec<u8>> {
    use sha2::Digest;
    let meta = std::fs::symlink_metadata(dot_git).ok()?;
    let mut h = sha2::Sha256::new();
    let mut part = |tag: &[u8], data: &[u8]| {
        h.update((tag.len() as u64).to_le_bytes());
        h.update(tag);
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    };
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(dot_git).unwrap_or_default();
        part(b"link", target.as_os_str().as_encoded_bytes());
    } else if meta.is_file() {
        part(b"file", &read_small(dot_git));
    } else {
        for f in ["config", "config.worktree", "commondir"] {
            part(f.as_bytes(), &read_small(&dot_git.join(f)));
        }
        let mut hooks: Vec<(Vec<u8>, Vec<u8>)> = std::fs::read_dir(dot_git.join("hooks"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .take(MAX_HOOKS)
                    .map(|e| {
                        (
                            e.file_name().as_encoded_bytes().to_vec(),
                            read_small(&e.path()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        hooks.sort();
        for (name, data) in hooks {
            part(&name, &data);
        }
    }
    Some(h.finalize().to_vec())
}
