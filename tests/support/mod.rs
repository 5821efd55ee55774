//! Helpers shared by the end-to-end tests: where the built binaries are, temporary homes,
//! figures from `/proc`, memory scans, and the load generator ([`load`]) that `tests/load.rs`
//! and `tests/faults.rs` drive the daemon with, and the HTTPS test server ([`https`]) of the
//! proxy tests.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

pub mod hostile_input;
pub mod https;

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
    /// File systems mounted for this test, unmounted (lazily) once the daemons are gone.
    mounts: Vec<PathBuf>,
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
            mounts: Vec::new(),
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

    /// Runs `agentkeys ARGS` as the agent whose token is in `token_file`.
    pub fn run_agent_file(&self, token_file: &Path, args: &[&str]) -> Output {
        let mut c = self.cli(args);
        c.env("AGENTKEYS_TOKEN_FILE", token_file)
            .stdin(Stdio::null());
        c.output().expect("run agentkeys")
    }

    /// Starts `agentkeysd --foreground ARGS` and waits until it answers `status`.
    pub fn start_daemon(&mut self, args: &[&str]) -> u32 {
        self.start_daemon_under(&[], args)
    }

    /// [`TestHome::start_daemon`] through a wrapper that `exec`s it (`ip netns exec NS`), so
    /// the pid is the daemon's.
    pub fn start_daemon_under(&mut self, wrapper: &[&str], args: &[&str]) -> u32 {
        let log = std::fs::File::create(self.dir.join("daemon.log")).expect("daemon log");
        let mut c = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin("agentkeysd"));
                c
            }
            None => Command::new(bin("agentkeysd")),
        };
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

    /// Mounts a tmpfs of `size` (`"1m"`, `"256m"`) at `path` (mode 0700), unmounted when the
    /// test ends. Needs root; the error says why it could not.
    pub fn mount_tmpfs(&mut self, path: &Path, size: &str) -> Result<(), String> {
        if !is_root() {
            return Err("mounting a tmpfs needs root".into());
        }
        std::fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        self.mounts.push(path.to_path_buf());
        Ok(())
    }

    /// The pid of the most recently started daemon.
    pub fn daemon_pid(&self) -> u32 {
        self.daemons.last().expect("a daemon was started").id()
    }

    /// Kills the most recently started daemon with SIGKILL (`kill -9`) and reaps it. Its
    /// launcher notices the closed socketpair and exits on its own.
    pub fn kill_daemon(&mut self) {
        if let Some(c) = self.daemons.last_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The audit records written so far, parsed (a line that is not JSON, such as one cut by a
    /// crash, is skipped).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.home().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Writes `config.toml` (mode 0600, as the daemon requires).
    pub fn write_config(&self, text: &str) {
        let p = self.home().join("config.toml");
        std::fs::write(&p, text).expect("write config.toml");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
            .expect("chmod config.toml");
    }

    /// What the foreground daemon wrote so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Mints agent `name` with `scope` into a new token file (`agent add --out`), as an MCP
    /// host would be configured; returns the file.
    pub fn agent_token_file(&self, name: &str, scope: &str) -> PathBuf {
        let token_file = self.dir.join(format!("{name}.token"));
        let file = token_file.to_str().expect("utf-8 path");
        let out = self.run(&["agent", "add", name, "--scope", scope, "--out", file]);
        assert!(out.status.success(), "agent add --out: {}", text(&out));
        token_file
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
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
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

/// The approval code from a `pending` answer's message on stderr ("... agentkeys approve
/// XXXXX-XXXXX ...").
pub fn code_from(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let at = err
        .find("agentkeys approve ")
        .unwrap_or_else(|| panic!("no code in: {err}"));
    err[at + "agentkeys approve ".len()..]
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .next()
        .unwrap_or_default()
        .to_string()
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
    memory_find(pid, needle).is_some()
}

/// Like [`memory_contains`], naming where: the `/proc/PID/maps` line of the first region that
/// holds `needle` and the page's offset in it (for messages that must not show the needle).
pub fn memory_find(pid: u32, needle: &[u8]) -> Option<String> {
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
                return Some(format!("{line} (page at +{:#x})", at - a));
            }
        }
    }
    None
}

/// How many descriptors `pid` has open (needs root for a non-dumpable process such as the
/// daemon; `None` when /proc does not let us look).
pub fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// A `SOCK_SEQPACKET` pair for `agentkeys mcp --fd-channel`: our end close-on-exec, the child's
/// end inheritable (its number goes on the command line).
pub fn fd_channel_pair() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::empty(),
    )
    .expect("socketpair");
    fcntl(&ours, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).expect("FD_CLOEXEC");
    (ours, theirs)
}

/// What each open fd of `pid` points to (for failure messages).
pub fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The daemon's fd count once it has been the same for 200 ms (connections of the commands
/// that just ran closed); `None` without root.
pub fn settled_fds(pid: u32) -> Option<usize> {
    let mut last = open_fds(pid)?;
    let mut same_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    while same_since.elapsed() < Duration::from_millis(200) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = open_fds(pid)?;
        if now != last {
            last = now;
            same_since = Instant::now();
        }
    }
    Some(last)
}

/// A `kB` figure of `/proc/PID/status` (`VmRSS`, `VmHWM`, `VmLck`); 0 when absent.
pub fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small deterministic generator (xorshift64*) for randomized tests: the seed is printed, and
/// `AK_TEST_SEED` replays a run.
pub struct Prng(u64);

impl Prng {
    /// Seeded from `AK_TEST_SEED`, else from the clock; prints the seed under `what`.
    pub fn from_env(what: &str) -> Prng {
        let seed = std::env::var("AK_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("{what}: seed {seed} (rerun with AK_TEST_SEED={seed})");
        Prng::new(seed)
    }

    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> Prng {
        Prng(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// The load generator: agents that each hold one connection and send a stream of mixed
/// requests (`get_credential` by fd, `list_services`, `run`), checking every answer.
pub mod load {
    use std::collections::BTreeMap;
    use std::os::fd::AsFd;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use agentkeys_proto::client::Client;
    use agentkeys_proto::wire::{RequestBody, ResponseBody};
    use secrecy::SecretString;

    use super::Prng;

    /// Services with their values, shared by the agents.
    pub type Services = Arc<Vec<(String, Vec<u8>)>>;

    /// What the agents got done (successful requests only).
    #[derive(Default)]
    pub struct Tally {
        /// `get_credential` answered with an fd whose page held the expected value.
        pub reads: AtomicU64,
        /// `list_services` answered.
        pub lists: AtomicU64,
        /// `run` started and exited 0 (its program saw the secret in its environment).
        pub runs: AtomicU64,
    }

    impl Tally {
        /// Deliveries the clients received: one per read, one per run (one secret each).
        pub fn deliveries(&self) -> u64 {
            self.reads.load(Ordering::Relaxed) + self.runs.load(Ordering::Relaxed)
        }

        /// Every successful request.
        pub fn total(&self) -> u64 {
            self.deliveries() + self.lists.load(Ordering::Relaxed)
        }
    }

    /// The share of each request kind, out of 1000 (the rest are `list`).
    #[derive(Clone, Copy)]
    pub struct Mix {
        /// `get_credential` (fd delivery), per mille.
        pub read: u64,
        /// `run` (`sh -c 'test -n "$T"'` with one secret in `T`), per mille.
        pub run: u64,
    }

    /// One agent: `requests` requests on one connection, the kind of each drawn from `mix`, the
    /// service from `services` (name, expected value). Stops at the first failure and says
    /// which request failed and how (never with a value in the message).
    pub async fn agent(
        socket: PathBuf,
        token: SecretString,
        services: Services,
        requests: usize,
        mix: Mix,
        seed: u64,
        tally: Arc<Tally>,
    ) -> Result<(), String> {
        let mut rng = Prng::new(seed);
        let (mut c, _) = Client::connect_with(&socket, &token)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let null_in = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
        let null_out = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| e.to_string())?;
        for i in 0..requests {
            let (name, value) = &services[rng.below(services.len() as u64) as usize];
            let roll = rng.below(1000);
            if roll < mix.read {
                let d = c
                    .get_credential(name, false)
                    .await
                    .map_err(|e| format!("request {i}: read {name}: {e}"))?;
                if d.bytes() != value.as_slice() {
                    return Err(format!("request {i}: read {name}: wrong value"));
                }
                tally.reads.fetch_add(1, Ordering::Relaxed);
            } else if roll < mix.read + mix.run {
                let body = RequestBody::Run {
                    argv: vec!["/bin/sh".into(), "-c".into(), "test -n \"$T\"".into()],
                    env: BTreeMap::from([("T".to_string(), name.clone())]),
                    files: BTreeMap::new(),
                    proxy: BTreeMap::new(),
                    caller_env: vec!["PATH=/usr/bin:/bin".into()],
                    cwd: Some("/".into()),
                    masking: true,
                    umask: None,
                };
                let fds = [null_in.as_fd(), null_out.as_fd(), null_out.as_fd()];
                c.send(body, &fds)
                    .await
                    .map_err(|e| format!("request {i}: run {name}: {e}"))?;
                for want in ["run_started", "run_exit"] {
                    let a = c
                        .recv()
                        .await
                        .map_err(|e| format!("request {i}: run {name}: {e}"))?;
                    let ok = match &a.body {
                        ResponseBody::RunStarted { .. } => want == "run_started",
                        ResponseBody::RunExit { code, .. } => {
                            want == "run_exit" && *code == Some(0)
                        }
                        _ => false,
                    };
                    if !ok {
                        return Err(format!(
                            "request {i}: run {name}: got {} while waiting for {want}",
                            a.body.kind()
                        ));
                    }
                }
                tally.runs.fetch_add(1, Ordering::Relaxed);
            } else {
                match c.call(RequestBody::ListServices {}).await {
                    Ok(a) if matches!(a.body, ResponseBody::Services { .. }) => {}
                    Ok(a) => return Err(format!("request {i}: list: got {}", a.body.kind())),
                    Err(e) => return Err(format!("request {i}: list: {e}")),
                }
                tally.lists.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Stores `services` services (`svc0`..; `svc0` with a one-minute cache, so cache hits are
    /// in the mix) and adds `agents` agents of scope `*`; returns the services with their values
    /// and the agents' tokens.
    pub fn setup(
        h: &super::TestHome,
        services: usize,
        agents: usize,
    ) -> (Services, Vec<SecretString>) {
        let mut list = Vec::new();
        for i in 0..services {
            let name = format!("svc{i}");
            let value = format!("ak-load-value-{i}-{}", "x".repeat(i * 7)).into_bytes();
            let mut args = vec!["store", name.as_str()];
            if i == 0 {
                args.extend(["--cache-ttl", "1m"]);
            }
            let out = h.run_stdin(&args, &value);
            assert!(out.status.success(), "store: {}", super::text(&out));
            list.push((name, value));
        }
        let tokens = (0..agents)
            .map(|i| SecretString::from(h.add_agent(&format!("agent{i}"), "*", &[])))
            .collect();
        (Arc::new(list), tokens)
    }

    /// Runs one [`agent`] per token concurrently (a two-thread runtime, like the daemon's) and
    /// returns each agent's result and the wall time.
    pub fn run_agents(
        socket: &std::path::Path,
        tokens: &[SecretString],
        services: &Services,
        requests: usize,
        mix: Mix,
        rng: &mut Prng,
        tally: &Arc<Tally>,
    ) -> (Vec<Result<(), String>>, std::time::Duration) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let start = std::time::Instant::now();
        let results = rt.block_on(async {
            let tasks: Vec<_> = tokens
                .iter()
                .map(|t| {
                    tokio::spawn(agent(
                        socket.to_path_buf(),
                        t.clone(),
                        services.clone(),
                        requests,
                        mix,
                        rng.next_u64(),
                        tally.clone(),
                    ))
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap_or_else(|e| Err(format!("agent task: {e}"))));
            }
            out
        });
        (results, start.elapsed())
    }
}
