//! The launcher: the process that starts programs for `agentkeys run`.
//!
//! It is forked by agentkeysd early in start-up, before the daemon loads its key or installs its
//! seccomp filter (a filter is inherited across exec, and the daemon may not exec at all). It
//! talks to the daemon alone, over a SOCK_SEQPACKET socketpair, one JSON message per packet,
//! with file descriptors attached. It is single-threaded, which is what makes the work between
//! `fork` and `execve` in the child safe (no lock can be held by another thread).
//!
//! For each [`LaunchSpec`] it receives the child's stdin, stdout and stderr, one secret page
//! per environment secret, and one readable sealed memfd per file secret; it never maps them.
//! The child maps the secret pages, builds its environment, puts its fds in place, marks
//! everything else close-on-exec and `execve`s. Exec failures come back through a
//! close-on-exec pipe as an errno, so the caller can tell "not found" (127) from "cannot
//! execute" (126). Exits are reaped through pidfds and reported as [`FromLauncher::Exited`].

use std::collections::HashMap;
use std::ffi::CString;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::{Deserialize, Serialize};

use crate::errno::cerr;
use crate::process::HardenError;

/// Largest message between daemon and launcher (argv and the caller's environment).
pub const MAX_LAUNCH_MESSAGE: usize = 256 * 1024;
/// Most fds one launch may carry: stdio plus secrets.
pub const MAX_LAUNCH_FDS: usize = 32;

/// What the daemon asks of the launcher.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToLauncher {
    /// Start a program. Fds attached: stdin, stdout, stderr, then one per `secret_env`
    /// name, then one per `files` name, in order.
    Launch(LaunchSpec),
    /// Send a signal to a running program's process group.
    Signal {
        /// The launch id.
        id: u64,
        /// Signal number (SIGINT, SIGTERM, SIGHUP, SIGKILL only).
        signal: i32,
    },
}

/// A program to start. Holds names and plain strings only; secrets travel as fds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// Chosen by the daemon, echoed in every answer.
    pub id: u64,
    /// argv; argv[0] is looked up in the PATH of `env` unless it contains a `/`.
    pub argv: Vec<String>,
    /// Plain `NAME=value` environment entries (the caller's environment).
    pub env: Vec<String>,
    /// Names that get the bytes of the matching secret page as their value.
    pub secret_env: Vec<String>,
    /// Names that get `/dev/fd/N` of the matching readable memfd.
    pub files: Vec<String>,
    /// Working directory.
    pub cwd: Option<String>,
}

/// What the launcher reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FromLauncher {
    /// The program is running (its exec succeeded).
    Started {
        /// The launch id.
        id: u64,
        /// The child's pid.
        pid: u32,
    },
    /// It never ran.
    Failed {
        /// The launch id.
        id: u64,
        /// The errno of the failed step.
        errno: i32,
        /// Which step: `exec`, `chdir`, `secret`, `setup`, `fork`, `request`.
        step: String,
    },
    /// It ended.
    Exited {
        /// The launch id.
        id: u64,
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal number, when a signal killed it.
        signal: Option<i32>,
    },
}

/// The daemon's side of a running launcher.
pub struct Launcher {
    /// The socket to the launcher.
    pub sock: OwnedFd,
    /// The launcher's pid.
    pub pid: u32,
}

/// Forks the launcher. Call it single-threaded, before the key is loaded and before seccomp:
/// the launcher keeps every fd open at this moment only if listed in `keep` (none should be).
///
/// # Errors
/// [`HardenError`] naming the failed step.
pub fn spawn() -> Result<Launcher, HardenError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let threads = crate::process::thread_count().map_err(|e| HardenError::Step {
        step: "fork launcher",
        source: e,
    })?;
    if threads != 1 {
        return Err(HardenError::NotSingleThreaded("fork launcher", threads));
    }
    let (daemon_end, launcher_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| HardenError::Step {
        step: "fork launcher (socketpair)",
        source: e.into(),
    })?;
    // SAFETY: single-threaded (checked above): the child inherits no lock held by another thread.
    match unsafe { nix::unistd::fork() }.map_err(|e| HardenError::Step {
        step: "fork launcher",
        source: e.into(),
    })? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(launcher_end);
            Ok(Launcher {
                sock: daemon_end,
                pid: child.as_raw().unsigned_abs(),
            })
        }
        nix::unistd::ForkResult::Child => {
            drop(daemon_end);
            let code = match launcher_main(launcher_end) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: the launcher ends here without running the daemon's destructors.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Sends one message with fds over a SEQPACKET socket.
///
/// # Errors
/// The OS error, or a message over [`MAX_LAUNCH_MESSAGE`].
pub fn send_msg<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    if bytes.len() > MAX_LAUNCH_MESSAGE {
        return Err(std::io::Error::other("launch request too large"));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message with fds (all close-on-exec). `Ok(None)` when the peer closed.
///
/// # Errors
/// The OS error, a truncated message or control data, or JSON that does not parse.
pub fn recv_msg<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> std::io::Result<Option<(T, Vec<OwnedFd>)>> {
    let got = crate::peer::recv_with_fds(sock, buf, MAX_LAUNCH_FDS)?;
    if got.truncated {
        return Err(std::io::Error::other("launcher message truncated"));
    }
    if got.len == 0 && got.fds.is_empty() {
        return Ok(None);
    }
    let parsed = serde_json::from_slice(&buf[..got.len]).map_err(std::io::Error::other)?;
    Ok(Some((parsed, got.fds)))
}

struct Child {
    id: u64,
    pid: nix::unistd::Pid,
    pidfd: OwnedFd,
}

fn pidfd_open(pid: nix::unistd::Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = cerr(unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) })?;
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The launcher's loop: requests from the daemon, exits of children.
fn launcher_main(sock: OwnedFd) -> std::io::Result<()> {
    crate::process::close_inherited_fds(&[sock.as_raw_fd()]).map_err(std::io::Error::other)?;
    // The daemon's own capabilities are not the children's business; with none, a daemon
    // started as root does not hand root's capabilities to agents' programs. If they cannot be
    // dropped the launcher does not serve (fail closed: `run` is then unavailable).
    crate::process::drop_capabilities().map_err(std::io::Error::other)?;
    let mut children: HashMap<u64, Child> = HashMap::new();
    let mut buf = vec![0u8; MAX_LAUNCH_MESSAGE];
    loop {
        let mut polls: Vec<libc::pollfd> = vec![libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ids: Vec<u64> = children.keys().copied().collect();
        for id in &ids {
            polls.push(libc::pollfd {
                fd: children[id].pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `polls` is a valid array of pollfd of the given length for the call.
        let r = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(std::io::Error::last_os_error());
        }
        for (i, id) in ids.iter().enumerate() {
            if polls[i + 1].revents != 0
                && let Some(c) = children.remove(id)
            {
                let msg = reap(&c);
                let _ = send_msg(sock.as_fd(), &msg, &[]);
            }
        }
        if polls[0].revents != 0 {
            match recv_msg::<ToLauncher>(sock.as_fd(), &mut buf) {
                Ok(Some((ToLauncher::Launch(spec), fds))) => {
                    let id = spec.id;
                    match launch(&spec, fds) {
                        Ok(child) => {
                            let pid = child.pid.as_raw().unsigned_abs();
                            children.insert(id, child);
                            let _ = send_msg(sock.as_fd(), &FromLauncher::Started { id, pid }, &[]);
                        }
                        Err((errno, step)) => {
                            let _ = send_msg(
                                sock.as_fd(),
                                &FromLauncher::Failed {
                                    id,
                                    errno,
                                    step: step.to_string(),
                                },
                                &[],
                            );
                        }
                    }
                }
                Ok(Some((ToLauncher::Signal { id, signal }, _))) => {
                    if let Some(c) = children.get(&id)
                        && [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGKILL]
                            .contains(&signal)
                    {
                        // To the whole process group: the program and what it started.
                        // SAFETY: kill takes integers only.
                        unsafe { libc::kill(-c.pid.as_raw(), signal) };
                    }
                }
                Ok(None) => break,
                Err(_) => continue,
            }
        }
    }
    // The daemon is gone: its runs end with it.
    for c in children.values() {
        // SAFETY: kill takes integers only.
        unsafe { libc::kill(-c.pid.as_raw(), libc::SIGTERM) };
    }
    Ok(())
}

fn reap(c: &Child) -> FromLauncher {
    use nix::sys::wait::{WaitStatus, waitpid};
    match waitpid(c.pid, None) {
        Ok(WaitStatus::Exited(_, code)) => FromLauncher::Exited {
            id: c.id,
            code: Some(code),
            signal: None,
        },
        Ok(WaitStatus::Signaled(_, sig, _)) => FromLauncher::Exited {
            id: c.id,
            code: None,
            signal: Some(sig as i32),
        },
        _ => FromLauncher::Exited {
            id: c.id,
            code: Some(255),
            signal: None,
        },
    }
}

/// Step codes written through the error pipe by the child before it gives up.
const STEP_EXEC: u32 = 1;
const STEP_CHDIR: u32 = 2;
const STEP_SECRET: u32 = 3;
const STEP_SETUP: u32 = 4;

fn step_name(code: u32) -> &'static str {
    match code {
        STEP_EXEC => "exec",
        STEP_CHDIR => "chdir",
        STEP_SECRET => "secret",
        _ => "setup",
    }
}

fn launch(spec: &LaunchSpec, fds: Vec<OwnedFd>) -> Result<Child, (i32, &'static str)> {
    let expected = 3 + spec.secret_env.len() + spec.files.len();
    if spec.argv.is_empty() || fds.len() != expected {
        return Err((libc::EINVAL, "request"));
    }
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| (e as i32, "setup"))?;
    // SAFETY: the launcher is single-threaded; the child only runs `child_exec`, which ends in
    // execve or _exit.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err((e as i32, "fork")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(err_r);
            child_exec(spec, &fds, &err_w)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(err_w);
            drop(fds);
            // Blocks until the child's exec closes the pipe (success) or it reports a failure.
            let mut report = [0u8; 8];
            let n = loop {
                match nix::unistd::read(&err_r, &mut report) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other.unwrap_or(0),
                }
            };
            if n == 8 {
                let step = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
                let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
                let _ = nix::sys::wait::waitpid(child, None);
                return Err((errno, step_name(step)));
            }
            let pidfd =
                pidfd_open(child).map_err(|e| (e.raw_os_error().unwrap_or(libc::EIO), "setup"))?;
            Ok(Child {
                id: spec.id,
                pid: child,
                pidfd,
            })
        }
    }
}

/// In the forked child: never returns.
fn child_exec(spec: &LaunchSpec, fds: &[OwnedFd], err_w: &OwnedFd) -> ! {
    let fail = |step: u32, errno: i32| -> ! {
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&step.to_ne_bytes());
        report[4..].copy_from_slice(&errno.to_ne_bytes());
        let _ = nix::unistd::write(err_w, &report);
        // SAFETY: ends the child without running any destructor of the launcher.
        unsafe {
            libc::_exit(if step == STEP_EXEC && errno == libc::ENOENT {
                127
            } else {
                126
            })
        }
    };
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };

    // Rust starts with SIGPIPE ignored, and ignored signals survive exec: give the program the
    // default dispositions and an empty signal mask.
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: resetting a disposition to the default takes integers only.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // SAFETY: an empty set, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    // Its own process group, so signals forwarded by the CLI reach what it starts too.
    // SAFETY: setpgid takes integers only.
    unsafe { libc::setpgid(0, 0) };

    // The environment: the caller's, then the secrets, read from their pages.
    let mut env: Vec<CString> =
        Vec::with_capacity(spec.env.len() + spec.secret_env.len() + spec.files.len());
    for e in &spec.env {
        match CString::new(e.as_bytes()) {
            Ok(c) => env.push(c),
            Err(_) => fail(STEP_SETUP, libc::EINVAL),
        }
    }
    for (i, name) in spec.secret_env.iter().enumerate() {
        let fd = &fds[3 + i];
        let page = match crate::page::MappedSecret::map(
            fd.try_clone()
                .unwrap_or_else(|_| fail(STEP_SECRET, errno())),
        ) {
            Ok(p) => p,
            Err(_) => fail(STEP_SECRET, libc::EINVAL),
        };
        let mut entry = Vec::with_capacity(name.len() + 1 + page.len() + 1);
        entry.extend_from_slice(name.as_bytes());
        entry.push(b'=');
        entry.extend_from_slice(&page);
        drop(page);
        // A NUL byte cannot be part of an environment variable.
        match CString::new(entry) {
            Ok(c) => env.push(c),
            Err(_) => fail(STEP_SECRET, libc::EILSEQ),
        }
    }
    // Fds: stdio to 0-2, file secrets to 3.. (duplicated high first so no move clobbers another).
    let mut targets: Vec<(RawFd, RawFd)> = Vec::with_capacity(3 + spec.files.len());
    for (k, fd) in fds[..3]
        .iter()
        .chain(&fds[3 + spec.secret_env.len()..])
        .enumerate()
    {
        // SAFETY: F_DUPFD_CLOEXEC on our own fd; integer arguments.
        let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 1024) };
        if high < 0 {
            fail(STEP_SETUP, errno());
        }
        targets.push((high, k as RawFd));
    }
    for (j, name) in spec.files.iter().enumerate() {
        match CString::new(format!("{name}=/dev/fd/{}", 3 + j)) {
            Ok(c) => env.push(c),
            Err(_) => fail(STEP_SETUP, libc::EINVAL),
        }
    }
    for &(high, target) in &targets {
        // SAFETY: dup2 onto a target number; it clears close-on-exec on the target.
        if unsafe { libc::dup2(high, target) } < 0 {
            fail(STEP_SETUP, errno());
        }
    }
    // Everything else closes at exec (the error pipe must stay open until then).
    let first_free = (3 + spec.files.len()) as u32;
    // SAFETY: marks a range of descriptors close-on-exec; nothing is closed now.
    unsafe {
        libc::close_range(
            first_free,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        )
    };

    if let Some(dir) = &spec.cwd {
        let Ok(c) = CString::new(dir.as_bytes()) else {
            fail(STEP_CHDIR, libc::EINVAL)
        };
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::chdir(c.as_ptr()) } != 0 {
            fail(STEP_CHDIR, errno());
        }
    }
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_else(|_| fail(STEP_SETUP, libc::EINVAL)))
        .collect();
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());

    let program = &spec.argv[0];
    let candidates: Vec<CString> = if program.contains('/') {
        vec![argv[0].clone()]
    } else {
        let path = spec
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/bin:/usr/bin:/bin");
        path.split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .filter_map(|d| CString::new(format!("{d}/{program}")).ok())
            .collect()
    };
    let mut last = libc::ENOENT;
    let mut saw_eacces = false;
    for c in &candidates {
        // SAFETY: NUL-terminated path; argv and envp are NULL-terminated arrays of pointers to
        // CStrings that outlive the call (execve only returns on failure).
        unsafe { libc::execve(c.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
        last = errno();
        if last == libc::EACCES {
            saw_eacces = true;
        }
        if !matches!(last, libc::ENOENT | libc::ENOTDIR | libc::EACCES) {
            break;
        }
    }
    fail(
        STEP_EXEC,
        if saw_eacces && last == libc::ENOENT {
            libc::EACCES
        } else {
            last
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_null() -> OwnedFd {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap()
            .into()
    }

    fn run(l: &Launcher, spec: LaunchSpec, extra: Vec<OwnedFd>, out: OwnedFd) -> Vec<FromLauncher> {
        let mut fds = vec![dev_null(), out, dev_null()];
        fds.extend(extra);
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        send_msg(l.sock.as_fd(), &ToLauncher::Launch(spec), &borrowed).unwrap();
        drop(fds);
        let mut buf = vec![0u8; MAX_LAUNCH_MESSAGE];
        let mut got = Vec::new();
        while let Some((m, _)) = recv_msg::<FromLauncher>(l.sock.as_fd(), &mut buf).unwrap() {
            let done = !matches!(m, FromLauncher::Started { .. });
            got.push(m);
            if done {
                break;
            }
        }
        got
    }

    fn spec(id: u64, argv: &[&str]) -> LaunchSpec {
        LaunchSpec {
            id,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            secret_env: vec![],
            files: vec![],
            cwd: None,
        }
    }

    /// The launcher is forked from a child of the test harness, so the harness's threads and
    /// fds are none of its business.
    fn with_launcher(f: impl FnOnce(&Launcher) -> i32) -> nix::sys::wait::WaitStatus {
        crate::testutil::in_child(|| {
            // A forked child of the harness has one thread: the launcher may be forked here.
            let l = spawn().expect("spawn launcher");
            f(&l)
        })
    }

    #[test]
    fn runs_a_program_with_secret_env_and_file_and_reports_exit() {
        let st = with_launcher(|l| {
            let secret = crate::page::SecretPage::from_bytes(
                b"s3cret-env",
                crate::page::PagePolicy::PreferSecret,
            )
            .unwrap();
            let file = crate::page::SecretPage::from_bytes(
                b"s3cret-file",
                crate::page::PagePolicy::ForceFallback,
            )
            .unwrap();
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            let mut s = spec(1, &["sh", "-c", "printf '%s|' \"$T\"; cat \"$F\"; exit 7"]);
            s.secret_env = vec!["T".into()];
            s.files = vec!["F".into()];
            let got = run(l, s, vec![secret.into_fd(), file.into_fd()], w);
            let mut out = String::new();
            use std::io::Read;
            std::fs::File::from(r).read_to_string(&mut out).unwrap();
            let ok = out == "s3cret-env|s3cret-file"
                && matches!(got.first(), Some(FromLauncher::Started { id: 1, .. }))
                && got.last()
                    == Some(&FromLauncher::Exited {
                        id: 1,
                        code: Some(7),
                        signal: None,
                    });
            if ok { 0 } else { 1 }
        });
        assert!(
            matches!(st, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{st:?}"
        );
    }

    #[test]
    fn not_found_and_not_executable_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("ak-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("not-executable");
        let script = dir.join("no-shebang");
        std::fs::write(&plain, "#!/bin/sh\ntrue\n").unwrap();
        std::fs::write(&script, "junk").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (plain, script) = (plain.display().to_string(), script.display().to_string());
        let st = with_launcher(|l| {
            let a = run(
                l,
                spec(2, &["agentkeys-no-such-program"]),
                vec![],
                dev_null(),
            );
            let b = run(l, spec(3, &[&plain]), vec![], dev_null());
            let d = run(l, spec(5, &[&script]), vec![], dev_null());
            let c = run(
                l,
                LaunchSpec {
                    cwd: Some("/nonexistent-dir".into()),
                    ..spec(4, &["true"])
                },
                vec![],
                dev_null(),
            );
            let ok = a
                == vec![FromLauncher::Failed {
                    id: 2,
                    errno: libc::ENOENT,
                    step: "exec".into(),
                }]
                && matches!(b.as_slice(), [FromLauncher::Failed { id: 3, errno, step }] if *errno == libc::EACCES && step == "exec")
                && matches!(c.as_slice(), [FromLauncher::Failed { id: 4, step, .. }] if step == "chdir")
                && matches!(d.as_slice(), [FromLauncher::Failed { id: 5, errno, .. }] if *errno == libc::ENOEXEC);
            if ok { 0 } else { 1 }
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            matches!(st, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{st:?}"
        );
    }
}
