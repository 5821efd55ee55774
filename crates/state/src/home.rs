//! The home directory, and the only ways state files are opened, replaced and locked.
//!
//! - Reading goes through [`open_state_file`], which refuses anything another user could have
//!   written or could read (sudo-rs checks its timestamp and audit files the same way).
//! - Writing goes through [`write_atomic`]: a reader sees the old file or the new one, never a
//!   torn one, also after `kill -9` or a power cut.
//! - Writers serialise on [`StateLock`] and read-modify-write while holding it. Readers (the
//!   daemon) take no lock: atomic replacement is what keeps them consistent, and a
//!   [`FileStamp`] tells them when to read again.

use std::ffi::OsString;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::unistd::geteuid;

use crate::error::StateError;

/// Identity, keystore kind and creation time; its presence marks the home as initialized.
pub const IDENTITY_FILE: &str = "identity.json";
/// The owner's master session, sealed.
pub const SESSION_FILE: &str = "session.enc";
/// The agent registry, sealed.
pub const AGENTS_FILE: &str = "agents.enc";
/// The local vault.
pub const VAULT_FILE: &str = "vault.enc";
/// The DEK when no OS keyring is reachable.
pub const DEK_FILE: &str = "dek.key";
/// The writers' lock.
pub const LOCK_FILE: &str = "state.lock";
/// User configuration (read by the CLI and daemon, not by this crate).
pub const CONFIG_FILE: &str = "config.toml";

/// Every temporary file [`write_atomic`] creates starts with this, so a lock holder can tell
/// stale ones (left by a killed writer) from anything else in the directory.
const TEMP_PREFIX: &str = ".agentkeys-tmp.";

/// How long [`StateLock::acquire`] waits for another writer. Writers hold the lock for one
/// read-seal-write cycle (milliseconds), so this long means a stuck process.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// The agentkeys home: the directory that holds all state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The home from the environment: `$AGENTKEYS_HOME`, else `$HOME/.agentkeys`. An empty
    /// variable counts as unset. Trailing slashes and `.` components are dropped.
    ///
    /// # Errors
    /// [`StateError::InvalidHome`] when the chosen value is relative or contains `..` (a
    /// relative home would silently move with the working directory), or when neither
    /// variable is set.
    pub fn resolve() -> Result<Home, StateError> {
        Home::from_env(std::env::var_os("AGENTKEYS_HOME"), std::env::var_os("HOME"))
    }

    /// [`Home::resolve`] with the two variables passed in (testable without touching the
    /// process environment).
    fn from_env(
        agentkeys_home: Option<OsString>,
        home: Option<OsString>,
    ) -> Result<Home, StateError> {
        let set = |v: Option<OsString>| v.filter(|v| !v.is_empty());
        if let Some(v) = set(agentkeys_home) {
            return Ok(Home::at(absolute("AGENTKEYS_HOME", Path::new(&v))?));
        }
        if let Some(v) = set(home) {
            return Ok(Home::at(
                absolute("HOME", Path::new(&v))?.join(".agentkeys"),
            ));
        }
        Err(StateError::InvalidHome {
            var: "HOME",
            detail:
                "neither AGENTKEYS_HOME nor HOME is set; set AGENTKEYS_HOME to an absolute path"
                    .into(),
        })
    }

    /// A home at `root`, taken as given apart from dropping trailing slashes and `.`
    /// components. Use [`Home::resolve`] for user input: it also rejects relative paths.
    pub fn at(root: impl Into<PathBuf>) -> Home {
        Home {
            root: root.into().components().collect(),
        }
    }

    /// The home directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `file` inside the home.
    pub fn path(&self, file: &str) -> PathBuf {
        self.root.join(file)
    }

    /// Creates the home (mode 0700; missing parents with default modes) or, if it exists,
    /// checks it is a directory owned by us with no group or other permission bits.
    ///
    /// # Errors
    /// [`StateError::Io`] when it cannot be created, [`StateError::UnsafePermissions`] when
    /// it exists with the wrong type, owner or mode.
    pub fn ensure_dir(&self) -> Result<(), StateError> {
        if let Some(parent) = self.root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)
                .map_err(|e| StateError::io("create directory", parent, e))?;
        }
        match fs::DirBuilder::new().mode(0o700).create(&self.root) {
            Ok(()) => {
                // The umask can only clear bits, but a umask of 0700 would leave us a directory
                // we cannot use: set the mode we asked for.
                fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                    .map_err(|e| StateError::io("chmod", &self.root, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StateError::io("create directory", &self.root, e)),
        }
        self.check_dir()
    }

    /// Checks an existing home the way [`Home::ensure_dir`] does, creating nothing.
    ///
    /// # Errors
    /// [`StateError::NotInitialized`] when it does not exist, [`StateError::UnsafePermissions`]
    /// when it has the wrong type, owner or mode, [`StateError::Io`] when it cannot be examined.
    pub fn check_dir(&self) -> Result<(), StateError> {
        // metadata() follows a symlinked home: the user chose where it points, and what we check
        // is the directory we will actually use.
        let meta = match fs::metadata(&self.root) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotInitialized {
                    home: self.root.clone(),
                });
            }
            Err(e) => return Err(StateError::io("examine", &self.root, e)),
        };
        let unsafe_perm = |detail: String| StateError::UnsafePermissions {
            path: self.root.clone(),
            detail,
        };
        if !meta.is_dir() {
            return Err(unsafe_perm(
                "not a directory; point AGENTKEYS_HOME at a directory".into(),
            ));
        }
        check_owner(&self.root, &meta)?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(unsafe_perm(format!(
                "mode {mode:04o} lets group or others in; run `chmod 700 {}`",
                self.root.display()
            )));
        }
        Ok(())
    }

    /// Whether `identity.json` exists (written last by `init`, so it marks a complete init).
    pub fn is_initialized(&self) -> bool {
        fs::symlink_metadata(self.path(IDENTITY_FILE)).is_ok()
    }
}

/// `value` as an absolute path without `..`, or an error naming `var`.
fn absolute(var: &'static str, value: &Path) -> Result<PathBuf, StateError> {
    if value.starts_with("~") {
        return Err(StateError::InvalidHome {
            var,
            detail: format!(
                "`{}` starts with `~`, which only a shell expands; write $HOME instead of `~`",
                value.display()
            ),
        });
    }
    if !value.is_absolute() {
        return Err(StateError::InvalidHome {
            var,
            detail: format!(
                "`{}` is a relative path; set {var} to an absolute path (e.g. \"$PWD/{}\")",
                value.display(),
                value.display()
            ),
        });
    }
    if value.components().any(|c| c == Component::ParentDir) {
        return Err(StateError::InvalidHome {
            var,
            detail: format!(
                "`{}` contains `..`; give the path without it",
                value.display()
            ),
        });
    }
    Ok(value.components().collect())
}

/// Identifies one version of a file: every [`write_atomic`] creates a new inode, so a changed
/// stamp means "read it again".
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FileStamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Size in bytes.
    pub len: u64,
}

impl FileStamp {
    /// The stamp of already-fetched metadata (e.g. of an open file, so it matches the content).
    pub fn of(meta: &Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            len: meta.len(),
        }
    }

    /// The stamp of the file at `path` (not following a symlink), `None` if it cannot be
    /// examined (usually: it does not exist).
    pub fn of_path(path: &Path) -> Option<FileStamp> {
        fs::symlink_metadata(path).ok().map(|m| FileStamp::of(&m))
    }
}

/// Refuses metadata not owned by our effective uid.
fn check_owner(path: &Path, meta: &Metadata) -> Result<(), StateError> {
    let me = geteuid().as_raw();
    if meta.uid() != me {
        return Err(StateError::UnsafePermissions {
            path: path.to_path_buf(),
            detail: format!(
                "owned by uid {}, not by uid {me} (you); use your own AGENTKEYS_HOME, or `chown` it if it is yours",
                meta.uid()
            ),
        });
    }
    Ok(())
}

/// The directory holding `path` must be ours and not writable by group or others (or they
/// could replace the file between our check and our open).
fn check_parent(path: &Path) -> Result<(), StateError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let meta = fs::metadata(parent).map_err(|e| StateError::io("examine", parent, e))?;
    check_owner(parent, &meta)?;
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(StateError::UnsafePermissions {
            path: parent.to_path_buf(),
            detail: format!(
                "mode {mode:04o} lets group or others replace files in it; run `chmod 700 {}`",
                parent.display()
            ),
        });
    }
    Ok(())
}

/// Refuses an opened state file that is not a regular file of ours with mode 0600 or tighter.
fn check_file(path: &Path, meta: &Metadata) -> Result<(), StateError> {
    if !meta.is_file() {
        return Err(StateError::UnsafePermissions {
            path: path.to_path_buf(),
            detail: "not a regular file; move it away".into(),
        });
    }
    check_owner(path, meta)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StateError::UnsafePermissions {
            path: path.to_path_buf(),
            detail: format!(
                "mode {mode:04o} lets group or others read it; run `chmod 600 {}`",
                path.display()
            ),
        });
    }
    Ok(())
}

/// Opens a state file for reading after checking (sudo-rs style) that it is a regular file,
/// owned by our effective uid, with no group/other permission bits, in a directory owned by us
/// and not group/other-writable. The checks run on the opened file (`fstat`), so the file
/// cannot be swapped between check and use; a symlink is refused, not followed.
///
/// # Errors
/// [`StateError::Io`] when it cannot be opened (check [`StateError::is_not_found`]),
/// [`StateError::UnsafePermissions`] when a check fails.
pub fn open_state_file(path: &Path) -> Result<File, StateError> {
    check_parent(path)?;
    // O_NONBLOCK: opening a FIFO planted in place of a state file must not hang us; it is
    // refused as "not a regular file" right after. Regular files ignore the flag.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(Errno::ELOOP as i32) {
                StateError::UnsafePermissions {
                    path: path.to_path_buf(),
                    detail: "is a symbolic link; state files must be regular files, move it away"
                        .into(),
                }
            } else {
                StateError::io("open", path, e)
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| StateError::io("examine", path, e))?;
    check_file(path, &meta)?;
    Ok(file)
}

/// Reads a whole (non-secret or sealed) state file of at most `max` bytes, with the stamp of
/// the version read. `Ok(None)` when it does not exist.
pub(crate) fn read_state_file(
    path: &Path,
    max: u64,
) -> Result<Option<(Vec<u8>, FileStamp)>, StateError> {
    let file = match open_state_file(path) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file
        .metadata()
        .map_err(|e| StateError::io("examine", path, e))?;
    // Cap before allocating: a huge file planted here must not exhaust memory.
    if meta.len() > max {
        return Err(StateError::TooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
            max,
        });
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| StateError::io("read", path, e))?;
    if buf.len() as u64 > max {
        return Err(StateError::TooLarge {
            path: path.to_path_buf(),
            len: buf.len() as u64,
            max,
        });
    }
    Ok(Some((buf, FileStamp::of(&meta))))
}

/// Atomically replaces `dir/name` with `bytes`: a temporary file in the same directory
/// (`O_CREAT|O_EXCL`, mode 0600, unique name), all bytes written, `fsync`, `rename` over
/// `name`, then `fsync` of the directory so the rename itself survives a crash. On failure the
/// temporary file is removed and `name` is untouched. Callers writing into the home hold
/// [`StateLock`].
///
/// # Errors
/// [`StateError::Io`] naming the step that failed.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StateError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(StateError::io(
            "write",
            dir.join(name),
            io::Error::new(io::ErrorKind::InvalidInput, "not a plain file name"),
        ));
    }
    let target = dir.join(name);
    let tmp = dir.join(format!(
        "{TEMP_PREFIX}{name}.{}.{:016x}",
        std::process::id(),
        getrandom::u64().map_err(StateError::Random)?
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(&tmp)
        .map_err(|e| StateError::io("create", &tmp, e))?;
    let result = (|| {
        file.write_all(bytes)
            .map_err(|e| StateError::io("write", &tmp, e))?;
        file.sync_all()
            .map_err(|e| StateError::io("fsync", &tmp, e))?;
        fs::rename(&tmp, &target).map_err(|e| StateError::io("rename into place", &target, e))?;
        sync_dir(dir)
    })();
    drop(file);
    if result.is_err() {
        // Best effort: after a successful rename this finds nothing, which is fine.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `fsync` a directory, making renames and creations in it durable.
fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StateError::io("fsync directory", dir, e))
}

/// Exclusive `flock` on `<home>/state.lock`, held while this guard lives.
///
/// Every writer of any state file takes it and does its read-modify-write under it, so
/// concurrent `store`s (threads or processes) never lose each other's entries. Readers do not
/// need it. Taking it also removes temporary files left by a writer that was killed mid-write:
/// with the lock held, nobody else can be writing one.
pub struct StateLock {
    _lock: Flock<File>,
    stale_removed: usize,
}

impl StateLock {
    /// Takes the lock, waiting up to [`LOCK_WAIT`] for another writer.
    ///
    /// # Errors
    /// [`StateError::LockTimeout`] when another writer holds it that long;
    /// [`StateError::UnsafePermissions`] / [`StateError::Io`] when the lock file cannot be
    /// opened safely.
    pub fn acquire(home: &Home) -> Result<StateLock, StateError> {
        StateLock::acquire_within(home, LOCK_WAIT)
    }

    /// [`StateLock::acquire`] with a chosen wait.
    ///
    /// # Errors
    /// As [`StateLock::acquire`].
    pub fn acquire_within(home: &Home, wait: Duration) -> Result<StateLock, StateError> {
        let path = home.path(LOCK_FILE);
        check_parent(&path)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(|e| StateError::io("open lock file", &path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| StateError::io("examine", &path, e))?;
        check_file(&path, &meta)?;

        // Non-blocking attempts with a deadline, so a stuck writer gives a clear error instead
        // of a command that hangs forever.
        let start = Instant::now();
        let lock = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => break lock,
                Err((f, Errno::EWOULDBLOCK)) if start.elapsed() < wait => {
                    file = f;
                    thread::sleep(Duration::from_millis(10));
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(StateError::LockTimeout {
                        path,
                        secs: wait.as_secs(),
                    });
                }
                Err((f, Errno::EINTR)) => file = f,
                Err((_, errno)) => {
                    return Err(StateError::io("lock", &path, io::Error::from(errno)));
                }
            }
        };
        let stale_removed = remove_stale_temps(home.root());
        Ok(StateLock {
            _lock: lock,
            stale_removed,
        })
    }

    /// How many stale temporary files taking the lock removed.
    pub fn stale_removed(&self) -> usize {
        self.stale_removed
    }
}

/// Removes our own leftover temporary files from `dir`; best effort (a file we cannot remove
/// only costs space and is tried again next time). Returns how many went.
fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let me = geteuid().as_raw();
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .as_encoded_bytes()
                .starts_with(TEMP_PREFIX.as_bytes())
        })
        .filter(|e| {
            // DirEntry::metadata does not follow symlinks: only our regular files go.
            e.metadata().is_ok_and(|m| m.is_file() && m.uid() == me)
        })
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempHome;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn relative_and_dotdot_homes_are_refused() {
        let err = Home::from_env(Some("rel/home".into()), Some("/root".into())).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("AGENTKEYS_HOME") && msg.contains("relative"),
            "{msg}"
        );
        let err = Home::from_env(Some("/a/../b".into()), None).unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
        let err = Home::from_env(Some("~/.agentkeys".into()), None).unwrap_err();
        assert!(err.to_string().contains("$HOME"), "{err}");
        let err = Home::from_env(None, Some("relative".into())).unwrap_err();
        assert!(err.to_string().contains("HOME"), "{err}");
        assert!(Home::from_env(None, None).is_err());
    }

    #[test]
    fn trailing_slash_and_defaults() {
        let h = Home::from_env(Some("/x/y//".into()), None).unwrap();
        assert_eq!(h.root(), Path::new("/x/y"));
        let h = Home::from_env(Some("/x/./y/".into()), None).unwrap();
        assert_eq!(h.root(), Path::new("/x/y"));
        // Empty counts as unset.
        let h = Home::from_env(Some("".into()), Some("/home/me/".into())).unwrap();
        assert_eq!(h.root(), Path::new("/home/me/.agentkeys"));
        assert_eq!(
            Home::at("/a/b/").path("vault.enc"),
            Path::new("/a/b/vault.enc")
        );
    }

    #[test]
    fn ensure_dir_creates_0700_and_checks_existing() {
        let t = TempHome::new("ensure");
        let home = Home::at(t.path().join("deep/er/home"));
        home.ensure_dir().unwrap();
        let mode = fs::metadata(home.root()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        home.ensure_dir().unwrap();

        fs::set_permissions(home.root(), fs::Permissions::from_mode(0o755)).unwrap();
        let err = home.ensure_dir().unwrap_err();
        assert!(matches!(err, StateError::UnsafePermissions { .. }), "{err}");
        assert!(err.to_string().contains("chmod 700"), "{err}");

        let file_home = Home::at(t.path().join("afile"));
        fs::write(file_home.root(), b"x").unwrap();
        assert!(matches!(
            file_home.ensure_dir(),
            Err(StateError::UnsafePermissions { .. })
        ));
    }

    #[test]
    fn open_state_file_checks_mode_type_and_parent() {
        let t = TempHome::new("open");
        let home = t.home();
        let p = home.path("x.json");
        write_atomic(home.root(), "x.json", b"{}").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        open_state_file(&p).unwrap();

        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = open_state_file(&p).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("0644") && msg.contains("chmod 600"), "{msg}");

        // A symlink is refused, not followed.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let link = home.path("link.json");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(
            open_state_file(&link),
            Err(StateError::UnsafePermissions { .. })
        ));

        // A directory is not a regular file.
        let d = home.path("dir");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(
            open_state_file(&d),
            Err(StateError::UnsafePermissions { .. })
        ));

        // Group-writable parent.
        fs::set_permissions(home.root(), fs::Permissions::from_mode(0o770)).unwrap();
        assert!(matches!(
            open_state_file(&p),
            Err(StateError::UnsafePermissions { .. })
        ));
        fs::set_permissions(home.root(), fs::Permissions::from_mode(0o700)).unwrap();

        let missing = open_state_file(&home.path("missing")).unwrap_err();
        assert!(missing.is_not_found());
    }

    #[test]
    fn files_owned_by_someone_else_are_refused() {
        if !geteuid().is_root() {
            eprintln!("skipped: needs root to chown a file to another uid");
            return;
        }
        let t = TempHome::new("owner");
        let home = t.home();
        write_atomic(home.root(), "x.json", b"{}").unwrap();
        let p = home.path("x.json");
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        let err = open_state_file(&p).unwrap_err();
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        std::os::unix::fs::chown(home.root(), Some(65534), None).unwrap();
        assert!(matches!(
            home.ensure_dir(),
            Err(StateError::UnsafePermissions { .. })
        ));
        std::os::unix::fs::chown(home.root(), Some(0), None).unwrap();
    }

    #[test]
    fn oversized_file_is_refused_before_reading() {
        let t = TempHome::new("big");
        let home = t.home();
        write_atomic(home.root(), "big", &[0u8; 100]).unwrap();
        assert!(matches!(
            read_state_file(&home.path("big"), 99),
            Err(StateError::TooLarge {
                len: 100,
                max: 99,
                ..
            })
        ));
        assert_eq!(
            read_state_file(&home.path("big"), 100)
                .unwrap()
                .unwrap()
                .0
                .len(),
            100
        );
        assert!(read_state_file(&home.path("none"), 100).unwrap().is_none());
    }

    #[test]
    fn write_atomic_replaces_and_changes_stamp() {
        let t = TempHome::new("atomic");
        let home = t.home();
        write_atomic(home.root(), "f", b"one").unwrap();
        let s1 = FileStamp::of_path(&home.path("f")).unwrap();
        write_atomic(home.root(), "f", b"two").unwrap();
        let s2 = FileStamp::of_path(&home.path("f")).unwrap();
        assert_ne!(s1, s2, "a new inode for every write");
        assert_eq!(fs::read(home.path("f")).unwrap(), b"two");
        assert!(write_atomic(home.root(), "../f", b"x").is_err());
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(home.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("f")]);
    }

    #[test]
    fn stale_temp_files_are_removed_by_the_lock() {
        let t = TempHome::new("stale");
        let home = t.home();
        let stale = home.path(&format!("{TEMP_PREFIX}vault.enc.4242.00000000deadbeef"));
        fs::write(&stale, b"half a vault").unwrap();
        let other = home.path("keep.me");
        fs::write(&other, b"x").unwrap();
        let lock = StateLock::acquire(&home).unwrap();
        assert_eq!(lock.stale_removed(), 1);
        assert!(!stale.exists());
        assert!(other.exists());
        let mode = fs::metadata(home.path(LOCK_FILE)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn lock_excludes_and_times_out() {
        let t = TempHome::new("lock");
        let home = t.home();
        let held = StateLock::acquire(&home).unwrap();
        let err = StateLock::acquire_within(&home, Duration::from_millis(50))
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, StateError::LockTimeout { .. }), "{err}");
        drop(held);
        StateLock::acquire_within(&home, Duration::from_millis(50)).unwrap();
    }
}
