//! The launcher: the process that starts programs for `agentkeys run`, and stops them.
//!
//! It is forked by agentkeysd early in start-up, before the daemon loads its key or installs its
//! seccomp filter (a filter is inherited across exec, and the daemon may not exec at all). It
//! talks to the daemon alone, over a SOCK_SEQPACKET socketpair, one JSON message per packet,
//! with file descriptors attached. It is single-threaded, which is what makes the work between
//! `fork` and `execve` in its children safe (no lock can be held by another thread).
//!
//! For each [`LaunchSpec`] it receives the child's stdin, stdout and stderr, one secret page
//! per environment secret, and one readable sealed memfd per file secret; it never maps them.
//!
//! **A run is the program and everything it starts.** Each launch forks a *supervisor*: a
//! small single-threaded process, a child subreaper (`PR_SET_CHILD_SUBREAPER`), that forks the
//! program and closes every descriptor but its link to the launcher. Whatever the program
//! starts stays below the supervisor, even after `setsid` or a double fork: an orphan is
//! reparented to its nearest subreaper. The program's child maps the secret pages, builds its
//! environment, puts its fds in place, marks everything else close-on-exec and `execve`s. Exec
//! failures come back through a close-on-exec pipe as an errno, so the caller can tell "not
//! found" (127) from "cannot execute" (126).
//!
//! **Stopping** (a [`ToLauncher::Stop`], a launch deadline, the program's own exit with
//! processes left behind, or the launcher gone): SIGTERM (then SIGCONT) to the program's process
//! group while the program is not reaped, and to every process of the supervisor's subtree
//! ([`crate::proctree`], through pidfds); after the grace period SIGKILL to everything still
//! there, repeated every 10 ms until the subtree is empty. A process that has SIGKILL pending
//! cannot fork any more, so each round leaves only processes forked before it, and a fork loop
//! cannot outrun it. Only then does the supervisor report the program's exit status and
//! exit, and the launcher reports [`FromLauncher::Exited`].
//!
//! The launcher is a subreaper too: if a supervisor is killed (a process of the same uid may
//! do that), what it supervised is reparented to the launcher, which stops it the same way
//! before it reports the run ended ([`RunEnd::lost`]). A supervisor that does not finish a
//! stop within the grace period plus [`SUPERVISOR_SLACK`] is killed, and the same happens.
//! When the daemon's end of the socketpair closes, the launcher stops every run and exits
//! only once nothing it started is left.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::MsgFlags;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::errno::cerr;
use crate::process::HardenError;
use crate::proctree;

/// Largest message between daemon and launcher (argv and the caller's environment).
pub const MAX_LAUNCH_MESSAGE: usize = 256 * 1024;
/// Most fds one launch may carry: stdio plus secrets.
pub const MAX_LAUNCH_FDS: usize = 32;
/// The grace period between SIGTERM and SIGKILL when a request does not name one.
pub const DEFAULT_KILL_GRACE_MS: u64 = 5_000;
/// The grace periods the launcher accepts; others are clamped into this range.
pub const KILL_GRACE_RANGE_MS: (u64, u64) = (100, 60_000);
/// How long past a run's grace period the launcher waits for its supervisor to report before
/// it kills the supervisor and stops what is left itself.
pub const SUPERVISOR_SLACK: Duration = Duration::from_secs(1);
/// How often the SIGKILL round repeats until a subtree is empty.
const KILL_ROUND: Duration = Duration::from_millis(10);
/// How long the SIGKILL rounds go on at most. They end long before for anything this uid can
/// kill; this bounds a subtree holding processes nobody here can kill or reap (a zombie whose
/// parent runs as another uid).
const KILL_ROUNDS_MAX: Duration = Duration::from_secs(5);
/// How long the launcher waits for a new supervisor to report its program's pid.
const SUPERVISOR_REPORT: Duration = Duration::from_secs(5);

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
    /// Stop a run: SIGTERM to the program's group and every process of the run, SIGKILL to
    /// whatever is left after the grace period. Answered by `exited` once nothing is left.
    Stop {
        /// The launch id.
        id: u64,
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
    /// The file-mode creation mask the program gets (the caller's); none: the launcher's 077.
    #[serde(default)]
    pub umask: Option<u32>,
    /// Milliseconds between SIGTERM and SIGKILL when the run is stopped (clamped to
    /// [`KILL_GRACE_RANGE_MS`]).
    #[serde(default = "default_grace")]
    pub kill_grace_ms: u64,
    /// Stop the run after this many milliseconds (the approval hook's timeout).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// The jail policy of the session that asked (`agentkeys jail`): the program is confined
    /// by the hook set with [`set_confine_hook`] before its environment is built. `None`: a
    /// run from outside any jail, unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confine: Option<serde_json::Value>,
    /// With `confine`: the last fd attached is a user namespace made by `agentkeys jail` for
    /// the jail's runs (a sibling of the agent's), which the program's process joins instead
    /// of making one (a launcher of a root daemon may not map uid 0 itself).
    #[serde(default)]
    pub confine_userns: bool,
}

/// Confines the process that is about to become a run's program (crate `agentkeys-jail`):
/// returns only in the confined process; every failure, in that process or in a helper it
/// forked, goes through `fail` (a failed step's name and errno), which never returns (hence
/// `Infallible`). Helpers
/// must close every descriptor above 2 once their own set-up is done, so the exec error pipe
/// reports the program's `execve` alone.
pub type ConfineHook = fn(
    policy: &serde_json::Value,
    userns: Option<BorrowedFd<'_>>,
    fail: &dyn Fn(&'static str, i32) -> std::convert::Infallible,
);

static CONFINE: std::sync::OnceLock<ConfineHook> = std::sync::OnceLock::new();

/// Sets the hook that confines runs of jailed sessions. Call it before [`spawn`]; without it,
/// a launch that carries a policy fails (`confine`, `ENOSYS`) rather than run unconfined.
pub fn set_confine_hook(hook: ConfineHook) {
    let _ = CONFINE.set(hook);
}

fn default_grace() -> u64 {
    DEFAULT_KILL_GRACE_MS
}

impl LaunchSpec {
    fn grace(&self) -> Duration {
        let (lo, hi) = KILL_GRACE_RANGE_MS;
        Duration::from_millis(self.kill_grace_ms.clamp(lo, hi))
    }
}

/// What the launcher reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FromLauncher {
    /// The program is running (its exec succeeded).
    Started {
        /// The launch id.
        id: u64,
        /// The program's pid (also its process group).
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
    /// The run ended: the program and every process it started are gone.
    Exited {
        /// The launch id.
        id: u64,
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal number, when a signal killed it.
        signal: Option<i32>,
        /// How it ended.
        #[serde(default)]
        end: RunEnd,
    },
}

/// How a run ended, beyond the program's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnd {
    /// Stopped on request (a `stop`, a deadline, or the daemon gone) while the program ran.
    #[serde(default)]
    pub stopped: bool,
    /// The program had exited and left processes behind, which were stopped.
    #[serde(default)]
    pub leftovers: bool,
    /// SIGKILL was needed.
    #[serde(default)]
    pub killed: bool,
    /// The supervisor disappeared (it was killed); the launcher stopped what was left.
    #[serde(default)]
    pub lost: bool,
    /// Processes this uid may not signal (a setuid program that changed its real uid), left
    /// running.
    #[serde(default)]
    pub unkillable: u32,
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
    crate::peer::send_packet(sock, &bytes, fds, MsgFlags::empty())?;
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

// --- The link between launcher and supervisor ------------------------------------------------
//
// A SOCK_SEQPACKET socketpair per run; fixed little binary messages (no parser to get wrong).
// Supervisor to launcher: `P` + pid (the program is forked), `D` + status (the run is over).
// Launcher to supervisor: `S` + signal (forward to the program's group), `T` (stop the run).
// The launcher never blocks on a supervisor: its sends are non-blocking, and a supervisor that
// does not read is killed at the stop deadline.

const MSG_PID: u8 = b'P';
const MSG_DONE: u8 = b'D';
const MSG_SIGNAL: u8 = b'S';
const MSG_STOP: u8 = b'T';

/// How the program ended, as the supervisor saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Code(i32),
    Signal(i32),
    Unknown,
}

impl Status {
    fn of(ws: WaitStatus) -> Option<(Pid, Status)> {
        match ws {
            WaitStatus::Exited(pid, code) => Some((pid, Status::Code(code))),
            WaitStatus::Signaled(pid, sig, _) => Some((pid, Status::Signal(sig as i32))),
            _ => None,
        }
    }

    fn exited(self, id: u64, end: RunEnd) -> FromLauncher {
        let (code, signal) = match self {
            Status::Code(c) => (Some(c), None),
            Status::Signal(s) => (None, Some(s)),
            Status::Unknown => (None, None),
        };
        FromLauncher::Exited {
            id,
            code,
            signal,
            end,
        }
    }
}

fn encode_done(status: Status, end: &RunEnd) -> [u8; 12] {
    let (kind, value) = match status {
        Status::Code(c) => (0u8, c),
        Status::Signal(s) => (1, s),
        Status::Unknown => (2, 0),
    };
    let flags = u8::from(end.stopped)
        | u8::from(end.leftovers) << 1
        | u8::from(end.killed) << 2
        | u8::from(end.lost) << 3;
    let mut m = [0u8; 12];
    m[0] = MSG_DONE;
    m[1] = kind;
    m[2] = flags;
    m[4..8].copy_from_slice(&value.to_le_bytes());
    m[8..12].copy_from_slice(&end.unkillable.to_le_bytes());
    m
}

fn decode_done(m: &[u8]) -> Option<(Status, RunEnd)> {
    if m.len() != 12 || m[0] != MSG_DONE {
        return None;
    }
    let value = i32::from_le_bytes(m[4..8].try_into().ok()?);
    let status = match m[1] {
        0 => Status::Code(value),
        1 => Status::Signal(value),
        _ => Status::Unknown,
    };
    let flags = m[2];
    let end = RunEnd {
        stopped: flags & 1 != 0,
        leftovers: flags & 2 != 0,
        killed: flags & 4 != 0,
        lost: flags & 8 != 0,
        unkillable: u32::from_le_bytes(m[8..12].try_into().ok()?),
    };
    Some((status, end))
}

/// Sends a small message without blocking (and without SIGPIPE).
fn send_small(fd: &OwnedFd, msg: &[u8]) -> bool {
    nix::sys::socket::send(
        fd.as_raw_fd(),
        msg,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    )
    .is_ok()
}

/// Blocks SIGCHLD and returns a signalfd for it, so that a poll loop learns of exits.
fn sigchld_fd() -> std::io::Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block()?;
    Ok(SignalFd::with_flags(
        &set,
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )?)
}

fn drain(sigfd: &SignalFd) {
    while let Ok(Some(_)) = sigfd.read_signal() {}
}

fn set_child_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cerr(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) })?;
    Ok(())
}

/// `kill(2)` by number, for pids that cannot have been reused: our own unreaped children, and
/// the process group of a program its supervisor has not reaped yet.
fn kill_raw(pid: i32, sig: i32) {
    // SAFETY: kill takes integers only.
    unsafe { libc::kill(pid, sig) };
}

/// Polls `fds` for input; `None` waits forever. Returns the `revents`, all 0 on a timeout or
/// an interruption.
fn poll_in(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Vec<i16> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        None => -1,
        // Rounded up, so a deadline is never polled for just before it passes.
        Some(t) => i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
    };
    // SAFETY: `polls` is a valid array of pollfd of the given length for the call.
    let r = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
    if r <= 0 {
        return vec![0; polls.len()];
    }
    polls.iter().map(|p| p.revents).collect()
}

// --- The launcher's loop ---------------------------------------------------------------------

/// One run, as the launcher sees it.
struct Run {
    id: u64,
    /// The supervisor: our child, so its pid is ours until we reap it.
    sup: Pid,
    sup_reaped: bool,
    /// Our end of the supervisor link; `None` once it closed.
    ctl: Option<OwnedFd>,
    /// The program (the supervisor's child); known to us for a lost run's status.
    prog: i32,
    grace: Duration,
    /// When the supervisor was asked to stop the run.
    stop_sent: Option<Instant>,
    /// When the run must be stopped (the approval hook's timeout).
    deadline: Option<Instant>,
    /// The program's status, when we reaped it ourselves (its supervisor was gone).
    prog_status: Option<Status>,
    /// The supervisor died without reporting: its processes are ours to stop.
    lost: bool,
    /// The supervisor was killed for missing its stop deadline: no second grace period.
    overdue: bool,
    /// Its start failed and was reported as such: nothing more is said about it.
    silent: bool,
}

/// Stopping processes that were reparented to the launcher (see [`Launcher::tick`]).
#[derive(Default)]
struct Strays {
    /// SIGTERM was sent; SIGKILL rounds start at this time.
    kill_at: Option<Instant>,
    /// SIGKILL was needed.
    killed: bool,
}

struct LauncherState {
    runs: HashMap<u64, Run>,
    strays: Strays,
    daemon_gone: bool,
}

/// The launcher's loop: requests from the daemon, reports of supervisors, exits of children.
fn launcher_main(sock: OwnedFd) -> std::io::Result<()> {
    crate::process::close_inherited_fds(&[sock.as_raw_fd()]).map_err(std::io::Error::other)?;
    // The daemon's own capabilities are not the children's business; with none, a daemon
    // started as root does not hand root's capabilities to agents' programs. If they cannot be
    // dropped the launcher does not serve (fail closed: `run` is then unavailable).
    crate::process::drop_capabilities().map_err(std::io::Error::other)?;
    // Orphans of a killed supervisor come to us, not to init: we can still stop them.
    set_child_subreaper()?;
    let sigchld = sigchld_fd()?;
    let mut l = LauncherState {
        runs: HashMap::new(),
        strays: Strays::default(),
        daemon_gone: false,
    };
    let mut buf = vec![0u8; MAX_LAUNCH_MESSAGE];
    loop {
        l.reap(sock.as_fd());
        let wake = l.tick(sock.as_fd());
        if l.daemon_gone && l.runs.is_empty() && l.strays.kill_at.is_none() {
            // Every run was stopped and reported; nothing this uid can stop is left.
            return Ok(());
        }
        let mut fds: Vec<BorrowedFd<'_>> = vec![sigchld.as_fd()];
        if !l.daemon_gone {
            fds.push(sock.as_fd());
        }
        let ids: Vec<u64> = l
            .runs
            .values()
            .filter(|r| r.ctl.is_some())
            .map(|r| r.id)
            .collect();
        for id in &ids {
            if let Some(c) = l.runs.get(id).and_then(|r| r.ctl.as_ref()) {
                fds.push(c.as_fd());
            }
        }
        let revents = poll_in(&fds, wake);
        drain(&sigchld);
        let first_run = if l.daemon_gone { 1 } else { 2 };
        for (i, id) in ids.iter().enumerate() {
            if revents.get(first_run + i).is_some_and(|r| *r != 0) {
                l.read_ctl(*id, sock.as_fd());
            }
        }
        if !l.daemon_gone && revents.get(1).is_some_and(|r| *r != 0) {
            match recv_msg::<ToLauncher>(sock.as_fd(), &mut buf) {
                Ok(Some((ToLauncher::Launch(spec), fds))) => l.launch(spec, fds, sock.as_fd()),
                Ok(Some((ToLauncher::Signal { id, signal }, _))) => {
                    if [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGKILL].contains(&signal)
                        && let Some(r) = l.runs.get(&id)
                        && let Some(c) = &r.ctl
                    {
                        let mut m = [MSG_SIGNAL, 0, 0, 0, 0];
                        m[1..].copy_from_slice(&signal.to_le_bytes());
                        send_small(c, &m);
                    }
                }
                Ok(Some((ToLauncher::Stop { id }, _))) => l.stop(id),
                Ok(None) => {
                    // The daemon is gone (stopped or killed): its runs end with it, but only
                    // once every process of theirs is gone.
                    l.daemon_gone = true;
                    let ids: Vec<u64> = l.runs.keys().copied().collect();
                    for id in ids {
                        l.stop(id);
                    }
                }
                Err(_) => {}
            }
        }
    }
}

impl LauncherState {
    fn launch(&mut self, spec: LaunchSpec, fds: Vec<OwnedFd>, sock: BorrowedFd<'_>) {
        let id = spec.id;
        match launch(&spec, fds) {
            Ok(Launched::Running(run)) => {
                let pid = run.prog.unsigned_abs();
                self.runs.insert(id, run);
                let _ = send_msg(sock, &FromLauncher::Started { id, pid }, &[]);
            }
            Ok(Launched::Unaccounted(run)) => {
                // The supervisor went silent after the program may have started: stop whatever
                // it left, report the start as failed.
                self.runs.insert(id, run);
                let _ = send_msg(
                    sock,
                    &FromLauncher::Failed {
                        id,
                        errno: libc::EIO,
                        step: "setup".into(),
                    },
                    &[],
                );
            }
            Err((errno, step)) => {
                let _ = send_msg(
                    sock,
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

    /// Asks a run's supervisor to stop it (once).
    fn stop(&mut self, id: u64) {
        if let Some(r) = self.runs.get_mut(&id)
            && r.stop_sent.is_none()
            && !r.lost
        {
            r.stop_sent = Some(Instant::now());
            if let Some(c) = &r.ctl {
                // If this does not arrive (a supervisor that does not read), the deadline
                // below kills the supervisor and the launcher stops the rest.
                send_small(c, &[MSG_STOP]);
            }
        }
    }

    /// Reads a supervisor's reports; on `done` the run is reported and forgotten.
    fn read_ctl(&mut self, id: u64, sock: BorrowedFd<'_>) {
        let Some(r) = self.runs.get_mut(&id) else {
            return;
        };
        let Some(ctl) = &r.ctl else { return };
        let mut m = [0u8; 16];
        loop {
            match nix::sys::socket::recv(ctl.as_raw_fd(), &mut m, MsgFlags::MSG_DONTWAIT) {
                Ok(12) => {
                    if let Some((status, end)) = decode_done(&m[..12]) {
                        if !r.silent {
                            let _ = send_msg(sock, &status.exited(id, end), &[]);
                        }
                        if !r.sup_reaped {
                            // It has nothing left to do; a supervisor stopped by someone must
                            // not linger.
                            kill_raw(r.sup.as_raw(), libc::SIGKILL);
                        }
                        self.runs.remove(&id);
                        return;
                    }
                }
                Ok(0) => {
                    r.ctl = None;
                    return;
                }
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    r.ctl = None;
                    return;
                }
            }
        }
    }

    /// Reaps every child that ended: supervisors (a supervisor that did not report first
    /// leaves a lost run), programs of lost runs, and strays.
    fn reap(&mut self, sock: BorrowedFd<'_>) {
        loop {
            let ws = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(_) => return,
                Ok(ws) => ws,
            };
            let Some((pid, status)) = Status::of(ws) else {
                continue;
            };
            if let Some(id) = self
                .runs
                .values()
                .find(|r| r.sup == pid && !r.sup_reaped)
                .map(|r| r.id)
            {
                // Its last report may be queued behind its exit.
                self.read_ctl(id, sock);
                if let Some(r) = self.runs.get_mut(&id) {
                    r.sup_reaped = true;
                    r.lost = true;
                    r.ctl = None;
                }
            } else if let Some(r) = self
                .runs
                .values_mut()
                .find(|r| r.lost && r.prog == pid.as_raw())
            {
                r.prog_status = Some(status);
            }
        }
    }

    /// Deadlines and strays; returns how long the loop may sleep.
    ///
    /// Strays are the launcher's children that are not live supervisors: what a lost run left,
    /// reparented to us. While a lost run is open (or the daemon is gone), they are stopped like
    /// a run: SIGTERM and SIGCONT to each and everything below it, then after the grace period
    /// SIGKILL rounds until none is left. Then every lost run is reported.
    fn tick(&mut self, sock: BorrowedFd<'_>) -> Option<Duration> {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        let mut soonest = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        let due: Vec<u64> = self
            .runs
            .values()
            .filter(|r| r.deadline.is_some_and(|d| d <= now))
            .map(|r| r.id)
            .collect();
        for id in due {
            self.stop(id);
        }
        for r in self.runs.values_mut() {
            if let Some(d) = r.deadline
                && r.stop_sent.is_none()
            {
                soonest(d);
            }
            if let Some(t) = r.stop_sent
                && !r.sup_reaped
            {
                let limit = t + r.grace + SUPERVISOR_SLACK;
                if now >= limit {
                    // A supervisor that did not finish in time (stopped, or not reading): kill
                    // it; its processes come to us and are killed without a second grace.
                    kill_raw(r.sup.as_raw(), libc::SIGKILL);
                    r.overdue = true;
                } else {
                    soonest(limit);
                }
            }
        }
        let lost: Vec<u64> = self
            .runs
            .values()
            .filter(|r| r.lost && r.sup_reaped)
            .map(|r| r.id)
            .collect();
        if lost.is_empty() && !self.daemon_gone {
            self.strays = Strays::default();
            return wake.map(|w| w.saturating_duration_since(now));
        }
        let live: Vec<i32> = self
            .runs
            .values()
            .filter(|r| !r.sup_reaped)
            .map(|r| r.sup.as_raw())
            .collect();
        let procs = proctree::descendants(&live);
        let mut refused = 0;
        let empty = match self.strays.kill_at {
            None if !procs.is_empty() => {
                let t = proctree::signal_all(&procs, libc::SIGTERM);
                proctree::signal_all(&procs, libc::SIGCONT);
                let grace = self
                    .runs
                    .values()
                    .filter(|r| lost.contains(&r.id))
                    .map(|r| if r.overdue { Duration::ZERO } else { r.grace })
                    .min()
                    .unwrap_or(Duration::ZERO);
                self.strays.kill_at = Some(now + grace);
                t.delivered == 0
            }
            Some(at) if now >= at => {
                let t = proctree::signal_all(&procs, libc::SIGKILL);
                self.strays.killed |= t.delivered > 0;
                refused = t.refused;
                t.delivered == 0 || now >= at + KILL_ROUNDS_MAX
            }
            _ => procs.is_empty(),
        };
        if empty {
            for id in lost {
                if let Some(r) = self.runs.remove(&id)
                    && !r.silent
                {
                    let end = RunEnd {
                        stopped: r.stop_sent.is_some(),
                        leftovers: false,
                        killed: self.strays.killed,
                        lost: true,
                        unkillable: u32::try_from(refused).unwrap_or(u32::MAX),
                    };
                    let status = r.prog_status.unwrap_or(Status::Unknown);
                    let _ = send_msg(sock, &status.exited(id, end), &[]);
                }
            }
            self.strays = Strays::default();
            return wake.map(|w| w.saturating_duration_since(now));
        }
        match self.strays.kill_at {
            Some(at) if at > now => soonest(at),
            _ => soonest(now + KILL_ROUND),
        }
        wake.map(|w| w.saturating_duration_since(now))
    }
}

/// A launch that got as far as a supervisor.
enum Launched {
    /// The program runs under its supervisor.
    Running(Run),
    /// The supervisor did not report the program's pid (it was stopped or killed): the run is
    /// treated as lost, so whatever it started is stopped.
    Unaccounted(Run),
}

/// Step codes written through the error pipe by the child before it gives up.
const STEP_EXEC: u32 = 1;
const STEP_CHDIR: u32 = 2;
const STEP_SECRET: u32 = 3;
const STEP_SETUP: u32 = 4;
const STEP_FORK: u32 = 5;
const STEP_CONFINE: u32 = 6;

fn step_name(code: u32) -> &'static str {
    match code {
        STEP_EXEC => "exec",
        STEP_CHDIR => "chdir",
        STEP_SECRET => "secret",
        STEP_FORK => "fork",
        STEP_CONFINE => "confine",
        _ => "setup",
    }
}

/// Writes a failed step and its errno to the error pipe and ends the process (the program's
/// child, or a supervisor that could not start it).
fn report_failure(err_w: &OwnedFd, step: u32, errno: i32) -> ! {
    let mut report = [0u8; 8];
    report[..4].copy_from_slice(&step.to_ne_bytes());
    report[4..].copy_from_slice(&errno.to_ne_bytes());
    let _ = nix::unistd::write(err_w, &report);
    // SAFETY: ends the process without running any destructor of the launcher.
    unsafe {
        libc::_exit(if step == STEP_EXEC && errno == libc::ENOENT {
            127
        } else {
            126
        })
    }
}

fn launch(spec: &LaunchSpec, fds: Vec<OwnedFd>) -> Result<Launched, (i32, &'static str)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let expected = 3 + spec.secret_env.len() + spec.files.len() + usize::from(spec.confine_userns);
    if spec.argv.is_empty() || fds.len() != expected {
        return Err((libc::EINVAL, "request"));
    }
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| (e as i32, "setup"))?;
    let (ctl, sup_ctl) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| (e as i32, "setup"))?;
    // SAFETY: the launcher is single-threaded; the supervisor only runs `supervise`, which
    // ends in _exit.
    let sup = match unsafe { nix::unistd::fork() } {
        Err(e) => return Err((e as i32, "fork")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(err_r);
            drop(ctl);
            supervise(spec, fds, err_w, sup_ctl)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => child,
    };
    drop(err_w);
    drop(sup_ctl);
    drop(fds);
    // Blocks until the program's exec closes the pipe (success) or a failure is reported (by
    // the program's child, or by the supervisor that could not start it).
    let mut report = [0u8; 8];
    let n = loop {
        match nix::unistd::read(&err_r, &mut report) {
            Err(Errno::EINTR) => continue,
            other => break other.unwrap_or(0),
        }
    };
    if n == 8 {
        let step = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
        let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
        // The supervisor reaps the failed child and exits; we reap it as any other child.
        return Err((errno, step_name(step)));
    }
    let mut run = Run {
        id: spec.id,
        sup,
        sup_reaped: false,
        ctl: None,
        prog: 0,
        grace: spec.grace(),
        stop_sent: None,
        deadline: spec
            .deadline_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms)),
        prog_status: None,
        lost: false,
        overdue: false,
        silent: false,
    };
    // The supervisor sent the pid right after its fork, before the program could exec.
    let mut m = [0u8; 8];
    let got = if poll_in(&[ctl.as_fd()], Some(SUPERVISOR_REPORT))[0] != 0 {
        nix::sys::socket::recv(ctl.as_raw_fd(), &mut m, MsgFlags::MSG_DONTWAIT).unwrap_or(0)
    } else {
        0
    };
    if got == 5 && m[0] == MSG_PID {
        run.prog = i32::from_le_bytes(m[1..5].try_into().expect("4 bytes"));
        run.ctl = Some(ctl);
        return Ok(Launched::Running(run));
    }
    kill_raw(sup.as_raw(), libc::SIGKILL);
    run.lost = true;
    run.overdue = true;
    run.silent = true;
    Ok(Launched::Unaccounted(run))
}

/// The supervisor, in the forked child of the launcher: starts the program, forwards signals
/// to its group, stops the run when asked (or when the launcher is gone, or the program exited
/// and left processes behind), reports, and exits. Never returns.
fn supervise(spec: &LaunchSpec, fds: Vec<OwnedFd>, err_w: OwnedFd, ctl: OwnedFd) -> ! {
    // Nothing of the launcher's stays open here: not the daemon's socket, not other runs'
    // links (a supervisor holding one would keep another from seeing the launcher go). The
    // objects owning them are never dropped in this process (it ends in _exit).
    let mut keep: Vec<RawFd> = vec![err_w.as_raw_fd(), ctl.as_raw_fd()];
    keep.extend(fds.iter().map(|f| f.as_raw_fd()));
    if crate::process::close_inherited_fds(&keep).is_err() {
        report_failure(&err_w, STEP_SETUP, libc::EBADF);
    }
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    if set_child_subreaper().is_err() {
        report_failure(&err_w, STEP_SETUP, errno());
    }
    // A name for `ps`; failure is harmless.
    // SAFETY: prctl with a NUL-terminated name of at most 16 bytes.
    unsafe {
        libc::prctl(
            libc::PR_SET_NAME,
            c"agentkeys-sup".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // SIGCHLD is blocked (inherited from the launcher) before the fork: no exit is missed.
    let sigchld = match sigchld_fd() {
        Ok(f) => f,
        Err(e) => report_failure(&err_w, STEP_SETUP, e.raw_os_error().unwrap_or(libc::EIO)),
    };
    // SAFETY: single-threaded (a fork of the single-threaded launcher); the child only runs
    // `child_exec`, which ends in execve or _exit.
    let prog = match unsafe { nix::unistd::fork() } {
        Err(e) => report_failure(&err_w, STEP_FORK, e as i32),
        Ok(nix::unistd::ForkResult::Child) => child_exec(spec, &fds, &err_w),
        Ok(nix::unistd::ForkResult::Parent { child }) => child,
    };
    // Its own process group, set from both sides so a signal sent before the child got that
    // far still reaches the group (EACCES once it has exec'd: it did it itself).
    let _ = nix::unistd::setpgid(prog, prog);
    // The program's stdio, pipes and secret fds must not stay open here, or the daemon's
    // output pumps would never see EOF.
    drop(fds);
    drop(err_w);
    let mut m = [MSG_PID, 0, 0, 0, 0];
    m[1..].copy_from_slice(&prog.as_raw().to_le_bytes());
    send_small(&ctl, &m);
    let (status, end) = supervise_loop(prog, &ctl, &sigchld, spec.grace());
    send_small(&ctl, &encode_done(status, &end));
    // SAFETY: ends the supervisor without running any destructor of the launcher.
    unsafe { libc::_exit(0) }
}

/// The supervisor's loop. Returns once this process has no child left: the program and
/// everything below it are gone (or only processes it may not signal remain, or the SIGKILL
/// rounds ran out of time).
fn supervise_loop(
    prog: Pid,
    ctl: &OwnedFd,
    sigchld: &SignalFd,
    grace: Duration,
) -> (Status, RunEnd) {
    let mut status: Option<Status> = None;
    let mut end = RunEnd::default();
    let mut stop_began: Option<Instant> = None;
    let mut ctl_open = true;
    // The group is the program's pid, which is ours until we reap the program: only then is
    // `kill(-pgid)` safe. After that, the subtree walk alone reaches what is left.
    let begin_stop = |status: &Option<Status>| {
        if status.is_none() {
            kill_raw(-prog.as_raw(), libc::SIGTERM);
            kill_raw(-prog.as_raw(), libc::SIGCONT);
        }
        let procs = proctree::descendants(&[]);
        proctree::signal_all(&procs, libc::SIGTERM);
        // A stopped process acts on SIGTERM only once continued.
        proctree::signal_all(&procs, libc::SIGCONT);
    };
    loop {
        let mut empty = false;
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(ws) => {
                    if let Some((pid, st)) = Status::of(ws)
                        && pid == prog
                    {
                        status = Some(st);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(_) => {
                    empty = true;
                    break;
                }
            }
        }
        if empty {
            break;
        }
        let now = Instant::now();
        if status.is_some() && stop_began.is_none() {
            // The program exited and left processes behind: a background process must not
            // outlive the run with the secret in its environment.
            end.leftovers = true;
            stop_began = Some(now);
            begin_stop(&status);
        }
        let mut wait = None;
        if let Some(t) = stop_began {
            let spent = now.saturating_duration_since(t);
            if spent >= grace {
                if status.is_none() {
                    kill_raw(-prog.as_raw(), libc::SIGKILL);
                }
                let procs = proctree::descendants(&[]);
                let t = proctree::signal_all(&procs, libc::SIGKILL);
                end.killed |= t.delivered > 0 || status.is_none();
                if (t.delivered == 0 && t.refused > 0) || spent >= grace + KILL_ROUNDS_MAX {
                    // Only processes we may not signal (or cannot reap) are left: say so.
                    end.unkillable = u32::try_from(procs.len()).unwrap_or(u32::MAX);
                    break;
                }
                wait = Some(KILL_ROUND);
            } else {
                wait = Some(grace - spent);
            }
        }
        let mut fds = vec![sigchld.as_fd()];
        if ctl_open {
            fds.push(ctl.as_fd());
        }
        let revents = poll_in(&fds, wait);
        drain(sigchld);
        if ctl_open && revents[1] != 0 {
            let mut m = [0u8; 8];
            loop {
                match nix::sys::socket::recv(ctl.as_raw_fd(), &mut m, MsgFlags::MSG_DONTWAIT) {
                    Ok(5) if m[0] == MSG_SIGNAL => {
                        let sig = i32::from_le_bytes(m[1..5].try_into().expect("4 bytes"));
                        // Forwarded signals are for the running program's group only.
                        if status.is_none() && stop_began.is_none() {
                            kill_raw(-prog.as_raw(), sig);
                        }
                    }
                    Ok(1) if m[0] == MSG_STOP => {
                        if stop_began.is_none() {
                            end.stopped = true;
                            stop_began = Some(Instant::now());
                            begin_stop(&status);
                        }
                    }
                    Ok(0) => {
                        // The launcher is gone: nobody will ask us to stop, so stop now.
                        ctl_open = false;
                        if stop_began.is_none() {
                            end.stopped = true;
                            stop_began = Some(Instant::now());
                            begin_stop(&status);
                        }
                        break;
                    }
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(_) => break,
                }
            }
        }
    }
    (status.unwrap_or(Status::Unknown), end)
}

/// In the forked child: never returns.
fn child_exec(spec: &LaunchSpec, fds: &[OwnedFd], err_w: &OwnedFd) -> ! {
    let fail = |step: u32, errno: i32| -> ! { report_failure(err_w, step, errno) };
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

    // A jailed session's run: confined like the jail (a user, mount and PID namespace of its
    // own, the same filesystem rules, Landlock, seccomp) before anything secret is mapped.
    // The jail's agent cannot name it: it is in another PID namespace.
    if let Some(policy) = &spec.confine {
        match CONFINE.get() {
            Some(hook) => {
                let userns = spec
                    .confine_userns
                    .then(|| fds.last().map(|f| f.as_fd()))
                    .flatten();
                hook(policy, userns, &|_step, errno| fail(STEP_CONFINE, errno))
            }
            None => fail(STEP_CONFINE, libc::ENOSYS),
        }
    }

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
        .chain(&fds[3 + spec.secret_env.len()..3 + spec.secret_env.len() + spec.files.len()])
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
    // The caller's file-mode creation mask, not the daemon's 077.
    if let Some(mask) = spec.umask {
        crate::process::set_umask(mask & 0o777);
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
            umask: None,
            kill_grace_ms: DEFAULT_KILL_GRACE_MS,
            deadline_ms: None,
            confine: None,
            confine_userns: false,
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
                        end: RunEnd::default(),
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

    // --- Stopping -------------------------------------------------------------------------

    /// A program that ignores SIGTERM (and so does everything it starts), with a descendant in
    /// a session of its own and the orphan of a double fork; prints "ready" once all run.
    const STUBBORN: &str = "trap '' TERM
setsid sh -c 'while :; do sleep 1; done' &
sh -c '(while :; do sleep 1; done) & exit 0' &
sleep 0.2
echo ready
while :; do sleep 1; done";

    /// Guards the tests against a hang; never a measure of speed.
    const HANG_GUARD: Duration = Duration::from_secs(30);

    fn marker(tag: &str) -> String {
        format!("ak-launch-{tag}-{}", std::process::id())
    }

    /// Pids whose environment holds `AK_MARK=<marker>`.
    fn marked(marker: &str) -> Vec<i32> {
        let needle = format!("AK_MARK={marker}");
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/environ"))
                            .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills whatever a failed test left behind.
    fn cleanup(marker: &str) {
        for pid in marked(marker) {
            kill_raw(pid, libc::SIGKILL);
        }
    }

    /// The next message from the launcher, or `None` after [`HANG_GUARD`].
    fn next(l: &Launcher) -> Option<FromLauncher> {
        if poll_in(&[l.sock.as_fd()], Some(HANG_GUARD))[0] == 0 {
            return None;
        }
        let mut buf = vec![0u8; MAX_LAUNCH_MESSAGE];
        recv_msg::<FromLauncher>(l.sock.as_fd(), &mut buf)
            .ok()
            .flatten()
            .map(|(m, _)| m)
    }

    /// Launches `script` with the marker in its environment and stdout on a pipe; returns the
    /// program's pid once "ready" was printed (or at once when `wait_ready` is false).
    fn launch_marked(
        l: &Launcher,
        id: u64,
        marker: &str,
        script: &str,
        grace_ms: u64,
        wait_ready: bool,
    ) -> Option<(u32, OwnedFd)> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut s = spec(id, &["sh", "-c", script]);
        s.env.push(format!("AK_MARK={marker}"));
        s.kill_grace_ms = grace_ms;
        let fds = [dev_null(), w, dev_null()];
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        send_msg(l.sock.as_fd(), &ToLauncher::Launch(s), &borrowed).unwrap();
        drop(fds);
        let Some(FromLauncher::Started { pid, .. }) = next(l) else {
            return None;
        };
        if wait_ready {
            let mut seen = Vec::new();
            let mut buf = [0u8; 64];
            while !seen.windows(5).any(|w| w == b"ready") {
                if poll_in(&[r.as_fd()], Some(HANG_GUARD))[0] == 0 {
                    return None;
                }
                let n = nix::unistd::read(&r, &mut buf).unwrap_or(0);
                if n == 0 {
                    return None;
                }
                seen.extend_from_slice(&buf[..n]);
            }
        }
        Some((pid, r))
    }

    fn exited_ok(st: nix::sys::wait::WaitStatus) {
        assert!(
            matches!(st, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{st:?}"
        );
    }

    /// `stop`: SIGTERM is ignored everywhere, so SIGKILL after the grace period ends the
    /// program, the process that called setsid and the orphan of a double fork alike.
    #[test]
    fn a_stop_kills_a_program_that_ignores_sigterm_and_what_left_its_group() {
        let m = marker("stop");
        let st = with_launcher(|l| {
            let Some((_, _out)) = launch_marked(l, 1, &m, STUBBORN, 300, true) else {
                return 2;
            };
            let before = marked(&m);
            send_msg(l.sock.as_fd(), &ToLauncher::Stop { id: 1 }, &[]).unwrap();
            let got = next(l);
            let after = marked(&m);
            let want = FromLauncher::Exited {
                id: 1,
                code: None,
                signal: Some(libc::SIGKILL),
                end: RunEnd {
                    stopped: true,
                    killed: true,
                    ..RunEnd::default()
                },
            };
            if before.len() >= 3 && got == Some(want) && after.is_empty() {
                0
            } else {
                eprintln!("before {before:?} got {got:?} after {after:?}");
                1
            }
        });
        cleanup(&m);
        exited_ok(st);
    }

    /// A program that exits leaving a background process: the process is stopped, then the
    /// run ends with the program's status.
    #[test]
    fn processes_left_behind_by_a_program_are_stopped_before_the_run_ends() {
        let m = marker("leftover");
        let st = with_launcher(|l| {
            // TERM is ignored before the fork, so the background process cannot be
            // caught before its own `trap`.
            let script = "trap '' TERM; (while :; do sleep 1; done) & echo ready; exit 3";
            if launch_marked(l, 1, &m, script, 300, true).is_none() {
                return 2;
            }
            let got = next(l);
            let after = marked(&m);
            let want = FromLauncher::Exited {
                id: 1,
                code: Some(3),
                signal: None,
                end: RunEnd {
                    leftovers: true,
                    killed: true,
                    ..RunEnd::default()
                },
            };
            if got == Some(want) && after.is_empty() {
                0
            } else {
                eprintln!("got {got:?} after {after:?}");
                1
            }
        });
        cleanup(&m);
        exited_ok(st);
    }

    /// A supervisor killed with SIGKILL (any process of the same uid can): its processes are
    /// reparented to the launcher, which stops them and reports the run as lost.
    #[test]
    fn a_killed_supervisor_leaves_nothing_behind() {
        let m = marker("lost");
        let st = with_launcher(|l| {
            let Some((pid, _out)) = launch_marked(l, 1, &m, STUBBORN, 300, true) else {
                return 2;
            };
            let Some(sup) = proctree::parent_of(pid as i32) else {
                return 3;
            };
            kill_raw(sup, libc::SIGKILL);
            let got = next(l);
            let after = marked(&m);
            let ok = matches!(
                got,
                Some(FromLauncher::Exited {
                    id: 1,
                    signal: Some(libc::SIGKILL),
                    end: RunEnd {
                        lost: true,
                        killed: true,
                        ..
                    },
                    ..
                })
            );
            if ok && after.is_empty() {
                0
            } else {
                eprintln!("got {got:?} after {after:?}");
                1
            }
        });
        cleanup(&m);
        exited_ok(st);
    }

    /// A supervisor that a process of the same uid stopped (SIGSTOP) cannot stop the run: the
    /// launcher kills it at the deadline (grace + slack) and stops its processes itself.
    #[test]
    fn a_frozen_supervisor_is_killed_and_its_run_stopped_anyway() {
        let m = marker("frozen");
        let st = with_launcher(|l| {
            let Some((pid, _out)) = launch_marked(l, 1, &m, STUBBORN, 300, true) else {
                return 2;
            };
            let Some(sup) = proctree::parent_of(pid as i32) else {
                return 3;
            };
            kill_raw(sup, libc::SIGSTOP);
            send_msg(l.sock.as_fd(), &ToLauncher::Stop { id: 1 }, &[]).unwrap();
            let got = next(l);
            let after = marked(&m);
            let ok = matches!(
                got,
                Some(FromLauncher::Exited {
                    id: 1,
                    end: RunEnd {
                        stopped: true,
                        lost: true,
                        killed: true,
                        ..
                    },
                    ..
                })
            );
            if ok && after.is_empty() {
                0
            } else {
                eprintln!("got {got:?} after {after:?}");
                1
            }
        });
        cleanup(&m);
        exited_ok(st);
    }

    /// The launcher killed (a process of the same uid can): each supervisor sees its link
    /// close and stops its run on its own.
    #[test]
    fn supervisors_stop_their_runs_when_the_launcher_is_killed() {
        let m = marker("nolauncher");
        let st = with_launcher(|l| {
            let Some((_, _out)) = launch_marked(l, 1, &m, STUBBORN, 300, true) else {
                return 2;
            };
            let before = marked(&m).len();
            kill_raw(l.pid as i32, libc::SIGKILL);
            let _ = waitpid(Pid::from_raw(l.pid as i32), None);
            let deadline = Instant::now() + HANG_GUARD;
            while !marked(&m).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let after = marked(&m);
            if before >= 3 && after.is_empty() {
                0
            } else {
                eprintln!("before {before} after {after:?}");
                1
            }
        });
        cleanup(&m);
        exited_ok(st);
    }

    /// A loop that forks as fast as it can cannot outrun the SIGKILL rounds.
    #[test]
    fn a_fork_loop_is_stopped() {
        let m = marker("forkloop");
        let st = with_launcher(|l| {
            let script = "trap '' TERM; echo ready; while :; do sleep 100 & done";
            if launch_marked(l, 1, &m, script, 300, true).is_none() {
                return 2;
            }
            std::thread::sleep(Duration::from_millis(200));
            let before = marked(&m).len();
            send_msg(l.sock.as_fd(), &ToLauncher::Stop { id: 1 }, &[]).unwrap();
            let got = next(l);
            let after = marked(&m);
            let ok = matches!(
                got,
                Some(FromLauncher::Exited {
                    id: 1,
                    end: RunEnd {
                        stopped: true,
                        killed: true,
                        ..
                    },
                    ..
                })
            );
            if ok && before > 20 && after.is_empty() {
                0
            } else {
                eprintln!("before {before} got {got:?} after {after:?}");
                1
            }
        });
        cleanup(&m);
        exited_ok(st);
    }

    /// The daemon's end closes (the daemon was killed): the launcher stops every run, and exits
    /// only once nothing is left.
    #[test]
    fn the_launcher_stops_every_run_when_the_daemon_goes() {
        let m = marker("orphaned");
        let st = crate::testutil::in_child(|| {
            let l = spawn().expect("spawn launcher");
            let Some((_, _out)) = launch_marked(&l, 1, &m, STUBBORN, 300, true) else {
                return 2;
            };
            let Some((_, _out2)) = launch_marked(&l, 2, &m, STUBBORN, 300, true) else {
                return 2;
            };
            let before = marked(&m).len();
            let pid = Pid::from_raw(l.pid as i32);
            drop(l);
            let exit = waitpid(pid, None);
            let after = marked(&m);
            if before >= 6 && matches!(exit, Ok(WaitStatus::Exited(_, 0))) && after.is_empty() {
                0
            } else {
                eprintln!("before {before} exit {exit:?} after {after:?}");
                1
            }
        });
        cleanup(&m);
        exited_ok(st);
    }

    /// A launch deadline (the approval hook's timeout) stops the run.
    #[test]
    fn a_deadline_stops_the_run() {
        let st = with_launcher(|l| {
            let mut s = spec(1, &["sleep", "100"]);
            s.deadline_ms = Some(200);
            let got = run(l, s, vec![], dev_null());
            let want = FromLauncher::Exited {
                id: 1,
                code: None,
                signal: Some(libc::SIGTERM),
                end: RunEnd {
                    stopped: true,
                    ..RunEnd::default()
                },
            };
            if got.last() == Some(&want) {
                0
            } else {
                eprintln!("{got:?}");
                1
            }
        });
        exited_ok(st);
    }

    /// The program gets the caller's umask, not the launcher's.
    #[test]
    fn the_program_gets_the_umask_it_is_given() {
        let st = with_launcher(|l| {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            let mut s = spec(1, &["sh", "-c", "umask"]);
            s.umask = Some(0o027);
            run(l, s, vec![], w);
            let mut out = String::new();
            use std::io::Read;
            std::fs::File::from(r).read_to_string(&mut out).unwrap();
            if out.trim() == "0027" {
                0
            } else {
                eprintln!("{out:?}");
                1
            }
        });
        exited_ok(st);
    }

    #[test]
    fn done_reports_round_trip() {
        let end = RunEnd {
            stopped: true,
            leftovers: false,
            killed: true,
            lost: false,
            unkillable: 3,
        };
        for status in [Status::Code(7), Status::Signal(9), Status::Unknown] {
            assert_eq!(decode_done(&encode_done(status, &end)), Some((status, end)));
        }
        assert_eq!(decode_done(&[MSG_DONE; 11]), None);
        assert_eq!(decode_done(&[MSG_PID; 12]), None);
    }
}
