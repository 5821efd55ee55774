//! Helpers shared by the end-to-end tests: where the built binaries are, temporary homes.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

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

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A private agentkeys installation for one test: its own `AGENTKEYS_HOME` and socket in a
/// fresh directory, removed (after stopping any daemon) when dropped.
pub struct TestHome {
    /// The directory holding everything (mode 0755 so other test uids can traverse it).
    pub dir: PathBuf,
    daemons: Vec<Child>,
}

impl TestHome {
    /// A new, empty directory; `init` is not run.
    pub fn new(tag: &str) -> TestHome {
        let dir = std::env::temp_dir().join(format!(
            "ak-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod test dir");
        TestHome {
            dir,
            daemons: Vec::new(),
        }
    }

    /// A new directory with `agentkeys init` already run.
    pub fn initialized(tag: &str) -> TestHome {
        let h = TestHome::new(tag);
        let out = h.run(&["init"]);
        assert!(out.status.success(), "init failed: {}", text(&out));
        h
    }

    /// `$AGENTKEYS_HOME`.
    pub fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    /// The daemon's socket (in its own directory, which the daemon creates 0700).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run").join("agentkeysd.sock")
    }

    /// The environment every command of this test gets.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("AGENTKEYS_HOME", self.home())
            .env("AGENTKEYS_SOCKET", self.socket())
            .env_remove("AGENTKEYS_TOKEN")
            .env_remove("AGENTKEYS_TOKEN_FILE")
            .env_remove("XDG_RUNTIME_DIR")
            .env("AGENTKEYS_LOG", "debug");
    }

    /// `agentkeys ARGS` as the owner.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("agentkeys"));
        c.args(args);
        self.env(&mut c);
        c
    }

    /// Runs `agentkeys ARGS` as the owner with no stdin.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cli(args)
            .stdin(Stdio::null())
            .output()
            .expect("run agentkeys")
    }

    /// Runs `agentkeys ARGS` with `input` on stdin.
    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        run_with_stdin(self.cli(args), input)
    }

    /// Runs `agentkeys ARGS` as an agent holding `token`.
    pub fn run_agent(&self, token: &str, args: &[&str]) -> Output {
        let mut c = self.cli(args);
        c.env("AGENTKEYS_TOKEN", token).stdin(Stdio::null());
        c.output().expect("run agentkeys")
    }

    /// Starts `agentkeysd --foreground ARGS` and waits until it answers `status`.
    pub fn start_daemon(&mut self, args: &[&str]) -> u32 {
        let log = std::fs::File::create(self.dir.join("daemon.log")).expect("daemon log");
        let mut c = Command::new(bin("agentkeysd"));
        c.arg("--foreground").args(args);
        self.env(&mut c);
        let child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn agentkeysd");
        let pid = child.id();
        self.daemons.push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.run(&["status"]).status.success() {
                return pid;
            }
            if let Some(st) = self
                .daemons
                .last_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "agentkeysd exited with {st} during start:\n{}",
                    self.daemon_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agentkeysd did not answer within 20s:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the most recently started daemon is still running.
    pub fn daemon_alive(&mut self) -> bool {
        self.daemons
            .last_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// What the foreground daemon wrote so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Mints an agent and returns its token (the last line of stdout).
    pub fn add_agent(&self, name: &str, scope: &str, extra: &[&str]) -> String {
        let mut args = vec!["agent", "add", name, "--scope", scope];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert!(out.status.success(), "agent add: {}", text(&out));
        let stdout = String::from_utf8(out.stdout).expect("utf8");
        let token = stdout
            .lines()
            .last()
            .expect("a token line")
            .trim()
            .to_string();
        assert!(
            token.starts_with("akt_"),
            "no token on the last line of stdout"
        );
        token
    }
}

impl Drop for TestHome {
    fn drop(&mut self) {
        for c in &mut self.daemons {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for c in &mut self.daemons {
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("AK_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `cmd` with `input` on stdin, written from another thread while the output is read
/// (a program that echoes its input would otherwise fill the pipes and stop).
pub fn run_with_stdin(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // A command that fails before reading stdin closes it: EPIPE is not the test's concern.
        if let Err(e) = stdin.write_all(&input) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
        }
    });
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("stdin writer");
    out
}

/// stdout and stderr together, for assertion messages and leak checks.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every regular file below `dir` with its bytes.
pub fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => {
                    if let Ok(b) = std::fs::read(&p) {
                        out.push((p, b));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether the test runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether `needle` is in any resident, readable page of `pid`, read through /proc/PID/mem
/// (root only). Pages that are not present (mimalloc reserves a large arena it never touches)
/// are skipped via /proc/PID/pagemap; secret pages fail to read (EIO) and are skipped too: that
/// they cannot be read is the point. Each page is read with the next few bytes, so a needle
/// across a page boundary is still found.
pub fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("pagemap");
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.contains("[vvar") || line.contains("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let mut entries = vec![0u8; ((b - a) / PAGE * 8) as usize];
        if pagemap.read_exact_at(&mut entries, a / PAGE * 8).is_err() {
            continue;
        }
        for (i, e) in entries.chunks_exact(8).enumerate() {
            let entry = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
            if entry & (1 << 63) == 0 {
                continue;
            }
            let at = a + i as u64 * PAGE;
            let len = (PAGE + needle.len() as u64).min(b - at) as usize;
            let mut buf = vec![0u8; len];
            if mem.read_exact_at(&mut buf, at).is_ok() && contains(&buf, needle) {
                return true;
            }
        }
    }
    false
}
