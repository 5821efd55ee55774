//! Applying a [`JailPolicy`], in a fixed order, refusing rather than continuing half-applied:
//!
//! ```text
//! agentkeys jail clones, straight into new user, mount, PID and IPC namespaces
//! ([`jail_namespaces`], [`enter_as_init`]):
//!   init    pid 1 of the new PID namespace, the caller's child; PDEATHSIG; uid/gid map;
//!           mounts (read-only root, writable roots, private tmp, /dev, /proc, hidden paths,
//!           sockets bound back, protected files), the session, pivot_root,
//!           max_user_namespaces=0; fork; then reaps and forwards signals
//!   command capabilities dropped, Landlock (filesystem, signal and abstract-socket scopes),
//!           seccomp, no_new_privs; returns to the caller's code, which execs
//!
//! the launcher's program process (a jailed session's run) forks ([`confine`]):
//!   outer   PDEATHSIG; INT/QUIT ignored; setns(the jail's user namespace for runs),
//!           unshare(NS|PID|IPC); fork
//!   init    as above (no session); command as above
//! ```
//!
//! `agentkeys jail` waits for init itself and reads the command's status from init's status
//! pipe. A run's outer process stays in the launcher's PID namespace so the launcher can wait
//! for it; it ends with the command's status. When init exits, the kernel kills everything
//! left in the namespace; when the caller dies, PDEATHSIG (SIGKILL) takes init (through outer
//! for a run), then all.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agentkeys_hardening::ns::{self, Forked};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, getpid, getppid};

use crate::policy::{JailPolicy, Protection, SESSION_DIR, SESSION_FILE};

/// Reports a failed step (its name and errno) and ends the process; never returns.
pub type Fail<'a> = &'a dyn Fn(&'static str, i32) -> std::convert::Infallible;

/// Calls `fail`, which never returns.
#[allow(unreachable_code)]
pub fn die(fail: Fail<'_>, step: &'static str, errno: i32) -> ! {
    match fail(step, errno) {}
}

/// Where the jail's init gets the session from: a pipe on which `jail_id\ntoken` arrives,
/// then EOF. Read by init only when the view is built, so the jail's set-up runs while the
/// caller asks the daemon for the session. EOF alone: the daemon refused, init exits quietly.
pub struct Session {
    /// The pipe's read end.
    pub pipe: OwnedFd,
    /// `--net proxy`: a `SOCK_SEQPACKET` socket on which init sends the caller the listening
    /// socket it bound on `127.0.0.1:PORT` in the jail's network namespace (the port comes
    /// with the session); the caller relays each connection to the proxy.
    pub relay: Option<OwnedFd>,
}

/// What the jail's command gets from its set-up: the jail's id and the environment entries the
/// caller sent with the session (`NAME=value`: the `--proxy` placeholders, the proxy's
/// address with this jail's credential, the CA bundle variables).
#[derive(Default)]
pub struct Entered {
    /// The jail's id.
    pub jail_id: String,
    /// `NAME=value` entries to add to the command's environment.
    pub env: Vec<zeroize::Zeroizing<String>>,
}

/// Largest session message (`jail_id`, token, proxy port, environment entries).
pub const MAX_SESSION_MESSAGE: usize = 32 * 1024;

/// How the outer process treats SIGTERM and SIGHUP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signals {
    /// Forward them to the command (through init): `agentkeys jail`, whose caller signals
    /// the outer process alone.
    Forward,
    /// Leave them: the launcher's supervisor signals the whole process group, which the
    /// command is part of; forwarding would deliver each twice.
    Group,
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn nix_errno(e: nix::Error) -> i32 {
    e as i32
}

/// Confines this (freshly forked, single-threaded) process per `policy`. Returns only in the
/// jail's command process, fully confined but for `execve`; the outer and init processes
/// never return. Every failure goes through `fail`, naming the step.
pub fn confine(
    policy: &JailPolicy,
    session: Option<Session>,
    userns: Option<std::os::fd::BorrowedFd<'_>>,
    parent: Option<Pid>,
    signals: Signals,
    fail: Fail<'_>,
) -> Option<Entered> {
    // --- outer ------------------------------------------------------------------------------
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        die(fail, "set parent-death signal", libc::EINVAL);
    }
    if parent.is_some_and(|p| getppid() != p) {
        // The caller died before the death signal was armed.
        ns::exit_now(1);
    }
    // Ctrl-C and Ctrl-\ reach the command straight from the terminal (it is in the caller's
    // foreground process group); the helpers must not die of them.
    ns::ignore_signals(&[libc::SIGINT, libc::SIGQUIT]);
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGHUP);
    if mask.thread_block().is_err() {
        die(fail, "block signals", libc::EINVAL);
    }
    let namespaces = policy.applies(Protection::Namespaces);
    if namespaces {
        let mut rest =
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC;
        // `--net proxy`: a network namespace of its own (a run of such a jail's session gets
        // one too, with no interface up: no network at all).
        if policy.network.is_proxy() {
            rest |= CloneFlags::CLONE_NEWNET;
        }
        match userns {
            // A run of a jailed session: the user namespace `agentkeys jail` made for its
            // runs (already mapped), then mount, PID and IPC namespaces of this run's own.
            Some(fd) => {
                if let Err(e) = nix::sched::setns(fd, CloneFlags::CLONE_NEWUSER) {
                    die(
                        fail,
                        "join the jail's user namespace for runs",
                        nix_errno(e),
                    );
                }
                if let Err(e) = unshare(rest) {
                    let step = if policy.network.is_proxy() {
                        "unshare mount, PID, IPC and network namespaces"
                    } else {
                        "unshare mount, PID and IPC namespaces"
                    };
                    die(fail, step, nix_errno(e));
                }
            }
            None => {
                if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER | rest) {
                    let step = if policy.network.is_proxy() {
                        "unshare user, mount, PID, IPC and network namespaces (--net proxy)"
                    } else {
                        "unshare user, mount, PID and IPC namespaces"
                    };
                    die(fail, step, nix_errno(e));
                }
                map_ids(policy, fail, false);
            }
        }
    }
    let (status_r, status_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => die(fail, "status pipe", nix_errno(e)),
    };
    let init = match ns::fork_single_threaded() {
        Ok(Forked::Parent(pid)) => pid,
        Ok(Forked::Child) => {
            drop(status_r);
            return init_process(policy, session, status_w, fail);
        }
        Err(e) => die(fail, "fork the jail's init", errno_of(&e)),
    };
    drop(status_w);
    outer_loop(init, status_r, signals)
}

/// The user namespace a jail's `run`s join (see [`confine`]'s `userns`), made by a short-lived
/// child: it creates the namespace and maps the owner's ids, the caller opens it, the child
/// exits; the descriptor keeps it alive. A sibling of the agent's own namespace: nothing in the
/// jail has any capability in it.
///
/// [`RunsUserns::start`] forks the child and returns at once, so that it does its part while
/// the caller goes on (forks the jail, connects to the daemon); [`RunsUserns::open`] waits for
/// it only when the namespace is needed. Dropping this lets the child go and reaps it.
pub struct RunsUserns {
    pid: Pid,
    /// The child's report: a failed step, or EOF once the maps are written.
    report: OwnedFd,
    /// Closed when the caller has opened the namespace: the child then exits.
    go: Option<OwnedFd>,
}

impl RunsUserns {
    /// Forks the child that makes the namespace. Call it while single-threaded.
    ///
    /// # Errors
    /// The step and errno that failed.
    pub fn start(policy: &JailPolicy) -> Result<Self, (&'static str, i32)> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ("user namespace for runs (pipe)", nix_errno(e)))?;
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ("user namespace for runs (pipe)", nix_errno(e)))?;
        match ns::fork_single_threaded() {
            Ok(Forked::Child) => {
                drop(r);
                drop(go_w);
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                let fail = |step: &'static str, errno: i32| -> std::convert::Infallible {
                    report(&w, step, errno);
                    ns::exit_now(1)
                };
                if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER) {
                    die(&fail, "user namespace for runs", nix_errno(e));
                }
                // Dumpable, so the parent may open /proc/PID/ns/user; it holds nothing.
                map_ids(policy, &fail, true);
                drop(w);
                // Until the parent has opened the namespace.
                let mut b = [0u8; 1];
                let _ = nix::unistd::read(&go_r, &mut b);
                ns::exit_now(0)
            }
            Ok(Forked::Parent(pid)) => Ok(RunsUserns {
                pid,
                report: r,
                go: Some(go_w),
            }),
            Err(e) => Err(("user namespace for runs (fork)", errno_of(&e))),
        }
    }

    /// Waits until the child has made and mapped the namespace, opens it, and lets the child
    /// exit (it is reaped when this is dropped).
    ///
    /// # Errors
    /// The step and errno that failed (in the child, or opening the namespace).
    pub fn open(&mut self) -> Result<OwnedFd, (&'static str, i32)> {
        let opened = match read_report(&self.report) {
            Some((_, errno)) => Err(("user namespace for runs", errno)),
            None => std::fs::File::open(format!("/proc/{}/ns/user", self.pid))
                .map(OwnedFd::from)
                .map_err(|e| ("user namespace for runs (open)", errno_of(&e))),
        };
        self.go = None;
        opened
    }
}

impl Drop for RunsUserns {
    fn drop(&mut self) {
        self.go = None;
        // The child exits once `go` is closed (it has already, when `open` was called).
        let _ = waitpid(self.pid, None);
    }
}

/// Writes the identity uid/gid maps of the new user namespace (the owner's ids map to
/// themselves; `setgroups` denied, as an unprivileged process must).
fn map_ids(policy: &JailPolicy, fail: Fail<'_>, stay_dumpable: bool) {
    // A non-dumpable process's /proc/self/ files belong to root: the maps could not be
    // written. Dumpable only for these three writes (nothing of the jail runs yet: outside
    // its PID namespace, or its init before it forks anything).
    if agentkeys_hardening::process::set_dumpable(true).is_err() {
        die(fail, "make the maps writable (dumpable)", libc::EPERM);
    }
    let write = |path: &str, text: String, step: &'static str| {
        if let Err(e) = std::fs::write(path, text) {
            die(fail, step, errno_of(&e));
        }
    };
    write(
        "/proc/self/setgroups",
        "deny".into(),
        "deny setgroups in the user namespace",
    );
    // Mapping uid 0 needs CAP_SETFCAP (Linux 5.12+): the launcher of a daemon running as
    // root has dropped it, so a jailed session's `run` fails closed there (EPERM at
    // `confine`) rather than run unconfined.
    write(
        "/proc/self/uid_map",
        format!("{0} {0} 1\n", policy.uid),
        "write uid_map",
    );
    write(
        "/proc/self/gid_map",
        format!("{0} {0} 1\n", policy.gid),
        "write gid_map",
    );
    if !stay_dumpable && agentkeys_hardening::process::set_dumpable(false).is_err() {
        die(fail, "not dumpable again", libc::EPERM);
    }
}

/// The outer process: forwards SIGTERM/SIGHUP to init (with [`Signals::Forward`]), waits for
/// it and ends the way the command ended.
fn outer_loop(init: Pid, status_r: OwnedFd, signals: Signals) -> ! {
    let sigfd = match SignalFd::with_flags(&signal_mask(), SfdFlags::SFD_CLOEXEC) {
        Ok(f) => f,
        Err(_) => {
            let _ = kill(init, Signal::SIGKILL);
            ns::exit_now(125)
        }
    };
    // Nothing of the caller's stays open here: the error pipe must see EOF once the command
    // has exec'd, and no secret fd of a launched run may linger.
    let keep = [sigfd.as_fd().as_raw_fd(), status_r.as_raw_fd()];
    let _ = ns::close_fds_from(3, &keep);
    loop {
        match sigfd.read_signal() {
            Ok(Some(info)) => {
                let sig = info.ssi_signo as i32;
                if (sig == libc::SIGTERM || sig == libc::SIGHUP) && signals == Signals::Forward {
                    let _ = nix::sys::signal::kill(init, Signal::try_from(sig).ok());
                }
                if sig == libc::SIGCHLD {
                    match waitpid(init, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::Exited(_, code)) => finish(&status_r, code),
                        Ok(WaitStatus::Signaled(_, s, _)) => finish_signal(s as i32),
                        _ => {}
                    }
                }
            }
            Ok(None) => {}
            Err(_) => ns::exit_now(125),
        }
    }
}

fn signal_mask() -> SigSet {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGHUP);
    mask
}

/// Ends the outer process as the command ended: init wrote `[b'x', code]` or `[b's', sig]`.
fn finish(status_r: &OwnedFd, init_code: i32) -> ! {
    let mut b = [0u8; 2];
    match nix::unistd::read(status_r, &mut b) {
        Ok(2) if b[0] == b's' => finish_signal(i32::from(b[1])),
        Ok(2) if b[0] == b'x' => ns::exit_now(i32::from(b[1])),
        _ => ns::exit_now(init_code),
    }
}

/// Dies of the command's signal, so the caller sees the same status.
fn finish_signal(sig: i32) -> ! {
    ns::default_signals();
    if let Ok(s) = Signal::try_from(sig) {
        let _ = kill(getpid(), s);
    }
    ns::exit_now(128 + sig)
}

/// The namespaces `agentkeys jail` starts its init in (for
/// [`agentkeys_hardening::ns::fork_into_namespaces`]): user, mount, PID and IPC, and network
/// with `--net proxy`.
pub fn jail_namespaces(policy: &JailPolicy) -> libc::c_int {
    let mut flags =
        libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC;
    if policy.network.is_proxy() {
        flags |= libc::CLONE_NEWNET;
    }
    flags
}

/// `agentkeys jail`'s init, started by the caller straight into the jail's namespaces
/// ([`jail_namespaces`]; no outer process: the caller waits for init itself, signals it, and
/// reads the command's status from `status_w`'s pipe: `[b'x', code]` or `[b's', signal]`).
/// Maps its own ids, then is init as in [`confine`]. Returns only in the command's process,
/// confined but for `execve`. Call it in the fresh child, first thing.
pub fn enter_as_init(
    policy: &JailPolicy,
    session: Session,
    status_w: OwnedFd,
    fail: Fail<'_>,
) -> Entered {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        die(fail, "set parent-death signal", libc::EINVAL);
    }
    // (The caller's death before this point: the session pipe is at EOF, and init ends when
    // it reads it, before anything runs.)
    ns::ignore_signals(&[libc::SIGINT, libc::SIGQUIT]);
    if signal_mask().thread_block().is_err() {
        die(fail, "block signals", libc::EINVAL);
    }
    if !policy.applies(Protection::Namespaces) {
        die(fail, "enter the jail's namespaces", libc::ENOSYS);
    }
    map_ids(policy, fail, false);
    init_process(policy, Some(session), status_w, fail).unwrap_or_default()
}

/// The jail's init: pid 1 of the new PID namespace.
fn init_process(
    policy: &JailPolicy,
    session: Option<Session>,
    status_w: OwnedFd,
    fail: Fail<'_>,
) -> Option<Entered> {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        die(fail, "set parent-death signal", libc::EINVAL);
    }
    let _ = nix::sys::prctl::set_name(c"agentkeys-jail");
    let mut jail_id = None;
    if policy.applies(Protection::Namespaces) {
        if let Err((step, errno)) = build_view(policy, session.as_ref(), &mut jail_id) {
            die(fail, step, errno);
        }
        drop(session);
    } else if session.is_some() {
        // Without namespaces there is no private place for the token: refuse.
        die(
            fail,
            "hand the session in (needs the mount namespace)",
            libc::ENOSYS,
        );
    }
    if let Err(e) = std::env::set_current_dir(&policy.cwd) {
        die(fail, "enter the working directory", errno_of(&e));
    }
    let cmd = match ns::fork_single_threaded() {
        Ok(Forked::Parent(pid)) => pid,
        Ok(Forked::Child) => {
            drop(status_w);
            command_process(policy, fail);
            return jail_id;
        }
        Err(e) => die(fail, "fork the command", errno_of(&e)),
    };
    init_loop(cmd, status_w)
}

/// init's loop: reap everything (orphans are reparented to pid 1), forward SIGTERM/SIGHUP to
/// the command, and exit when the command exits (the kernel then kills what is left).
fn init_loop(cmd: Pid, status_w: OwnedFd) -> ! {
    let sigfd = match SignalFd::with_flags(&signal_mask(), SfdFlags::SFD_CLOEXEC) {
        Ok(f) => f,
        Err(_) => ns::exit_now(125),
    };
    let keep = [sigfd.as_fd().as_raw_fd(), status_w.as_raw_fd()];
    let _ = ns::close_fds_from(3, &keep);
    loop {
        match sigfd.read_signal() {
            Ok(Some(info)) => {
                let sig = info.ssi_signo as i32;
                if sig == libc::SIGTERM || sig == libc::SIGHUP {
                    let _ = kill(cmd, Signal::try_from(sig).ok());
                    continue;
                }
                loop {
                    match waitpid(
                        Pid::from_raw(-1),
                        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                    ) {
                        Ok(WaitStatus::Exited(pid, code)) if pid == cmd => {
                            let _ = nix::unistd::write(&status_w, &[b'x', code as u8]);
                            ns::exit_now(code)
                        }
                        Ok(WaitStatus::Signaled(pid, s, _)) if pid == cmd => {
                            let _ = nix::unistd::write(&status_w, &[b's', s as i32 as u8]);
                            ns::exit_now(128 + s as i32)
                        }
                        Ok(WaitStatus::StillAlive) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            Ok(None) => {}
            Err(_) => ns::exit_now(125),
        }
    }
}

/// The command's process: capabilities, Landlock, seccomp. Returns to the caller, which
/// execs.
fn command_process(policy: &JailPolicy, fail: Fail<'_>) {
    ns::default_signals();
    if !policy.applies(Protection::Namespaces) {
        // No PID namespace to end it with init: die with it.
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    }
    // Full capabilities in the jail's user namespace would let it remount; none survive.
    if agentkeys_hardening::process::drop_capabilities().is_err() {
        die(fail, "drop capabilities", libc::EPERM);
    }
    if policy.applies(Protection::Landlock)
        && let Err(e) = crate::landlock::restrict(policy)
    {
        let _ = e;
        die(fail, "Landlock", libc::EPERM);
    }
    if policy.applies(Protection::Seccomp) && crate::seccomp::install().is_err() {
        die(fail, "seccomp filter", libc::EINVAL);
    }
    if nix::sys::prctl::set_no_new_privs().is_err() {
        die(fail, "no_new_privs", libc::EINVAL);
    }
}

type StepResult = Result<(), (&'static str, i32)>;

fn m(
    step: &'static str,
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> StepResult {
    mount(src, target, fstype, flags, data).map_err(|e| (step, nix_errno(e)))
}

fn io(step: &'static str) -> impl Fn(std::io::Error) -> (&'static str, i32) {
    move |e| (step, errno_of(&e))
}

/// `/newroot` + an absolute path.
fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Builds the jail's filesystem view and pivots into it (see the module docs for the order).
fn build_view(
    policy: &JailPolicy,
    session: Option<&Session>,
    jail_id: &mut Option<Entered>,
) -> StepResult {
    let none: Option<&Path> = None;
    let nofs: Option<&str> = None;
    // Nothing we mount propagates back to the owner's namespace.
    m(
        "make mounts private",
        none,
        Path::new("/"),
        nofs,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    // A scratch tmpfs becomes the root for a while; the old root is reached as /oldroot and
    // the jail's view is assembled at /newroot (bubblewrap's method).
    m(
        "scratch tmpfs",
        Some(Path::new("tmpfs")),
        Path::new("/tmp"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m"),
    )?;
    let mk = |p: &str| {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(p)
            .map_err(io("scratch directories"))
    };
    mk("/tmp/newroot")?;
    mk("/tmp/oldroot")?;
    std::fs::write("/tmp/empty", b"").map_err(io("scratch empty file"))?;
    std::fs::set_permissions("/tmp/empty", std::fs::Permissions::from_mode(0o444))
        .map_err(io("scratch empty file"))?;
    nix::unistd::pivot_root("/tmp", "/tmp/oldroot")
        .map_err(|e| ("pivot to scratch", nix_errno(e)))?;
    std::env::set_current_dir("/").map_err(io("pivot to scratch"))?;
    let old = Path::new("/oldroot");
    let new = Path::new("/newroot");

    // 1. Everything, read-only, nosuid, nodev.
    m(
        "bind the root read-only",
        Some(old),
        new,
        nofs,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    ns::mount_setattr_recursive(
        new,
        ns::MOUNT_ATTR_RDONLY | ns::MOUNT_ATTR_NOSUID | ns::MOUNT_ATTR_NODEV,
    )
    .map_err(io("make the root read-only, nosuid, nodev"))?;

    // 2. Private temporary directories.
    for t in &policy.private_tmp {
        let dst = inside(new, t);
        if !dst.is_dir() {
            continue;
        }
        m(
            "private tmp",
            Some(Path::new("tmpfs")),
            &dst,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        )?;
    }

    // 3. Writable roots: fresh binds of the owner's (writable) mounts, nosuid and nodev;
    // after the private tmp, so a writable root under /tmp is bound into it.
    for w in &policy.writable {
        let src = inside(old, w);
        let dst = inside(new, w);
        no_symlink(&dst, "bind a writable path")?;
        if !dst.exists() {
            // Under a private tmp (a fresh tmpfs): make the mount point.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&dst)
                .map_err(io("bind a writable path (mount point)"))?;
        }
        m(
            "bind a writable path",
            Some(&src),
            &dst,
            nofs,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        ns::mount_setattr_recursive(&dst, ns::MOUNT_ATTR_NOSUID | ns::MOUNT_ATTR_NODEV)
            .map_err(io("make a writable path nosuid, nodev"))?;
    }

    // 4. A minimal /dev (no disks, no other terminals), a new devpts; the session file and
    // the daemon's socket come last (8b), when everything else is in place.
    build_dev(old, new)?;

    // 5. A fresh /proc for the new PID namespace: outside processes have no entry in it.
    m(
        "mount /proc",
        Some(Path::new("proc")),
        &inside(new, Path::new("/proc")),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;

    // 5b. The kernel's global knobs in the fresh /proc read-only. A root owner's agent is
    // uid 0 (mapped to itself), and /proc/sys and these files check only the owner's write
    // bit, not a capability: it could otherwise set `kernel.core_pattern` (a program the
    // kernel runs as root, outside any jail, at the next crash) or `kernel.modprobe`. First
    // the defence in depth that needs a writable /proc/sys: no user namespace can be created
    // below this one (the seccomp filter refuses CLONE_NEWUSER too; best effort).
    let _ = std::fs::write(
        inside(new, Path::new("/proc/sys/user/max_user_namespaces")),
        "0",
    );
    for p in PROC_READ_ONLY {
        let dst = inside(new, Path::new(p));
        if std::fs::symlink_metadata(&dst).is_err() {
            continue;
        }
        m(
            "make /proc's kernel settings read-only",
            Some(&dst),
            &dst,
            nofs,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        remount_ro(&dst, "make /proc's kernel settings read-only")?;
    }

    // 6. Hidden paths: an empty tmpfs over directories, an empty file over anything else.
    // Sorted, so a parent is covered before its children (which then no longer exist).
    let mut hidden_dirs: Vec<PathBuf> = Vec::new();
    for h in &policy.hidden {
        let dst = inside(new, h);
        let Ok(meta) = std::fs::symlink_metadata(&dst) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            return Err(("hide a path", libc::ELOOP));
        }
        if meta.is_dir() {
            m(
                "hide a directory",
                Some(Path::new("tmpfs")),
                &dst,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=0700,size=64k"),
            )?;
            hidden_dirs.push(h.clone());
        } else {
            m(
                "hide a file",
                // /tmp/empty before the pivot to the scratch root.
                Some(Path::new("/empty")),
                &dst,
                nofs,
                MsFlags::MS_BIND,
                None,
            )?;
            remount_ro(&dst, "hide a file (read-only)")?;
        }
    }

    // 7. Paths bound back into hidden directories: agentkeys' socket, --allow-socket, --show.
    for r in &policy.reveal {
        let src = inside(old, r);
        let dst = inside(new, r);
        let under_hidden = hidden_dirs.iter().any(|h| r.starts_with(h));
        if !under_hidden && std::fs::symlink_metadata(&dst).is_ok() {
            continue; // not hidden: already reachable
        }
        // A symbolic link (NixOS's /run/current-system, into /nix/store): the same link,
        // which resolves in the jail's own (read-only) view.
        if let Ok(target) = std::fs::read_link(&src) {
            if let Some(parent) = dst.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(io("bind a path back (directories)"))?;
            }
            std::os::unix::fs::symlink(&target, &dst).map_err(io("bind a path back (link)"))?;
            continue;
        }
        // Hidden, or not visible at all (under the private /tmp): bound back.
        let Ok(meta) = std::fs::metadata(&src) else {
            continue; // not there (the daemon's socket before it starts): nothing to bind
        };
        if let Some(parent) = dst.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io("bind a path back (directories)"))?;
        }
        if meta.is_dir() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dst)
                .map_err(io("bind a path back"))?;
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&dst)
                .map_err(io("bind a path back"))?;
        }
        m(
            "bind a path back",
            Some(&src),
            &dst,
            nofs,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        // Read-only unless a socket (connecting needs no writable mount): a path shown again
        // is for reading (`--show`, NixOS's /run/current-system).
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            ns::mount_setattr_recursive(
                &dst,
                ns::MOUNT_ATTR_RDONLY | ns::MOUNT_ATTR_NOSUID | ns::MOUNT_ATTR_NODEV,
            )
            .map_err(io("bind a path back (read-only)"))?;
        }
    }
    for h in &hidden_dirs {
        remount_ro(&inside(new, h), "hide a directory (read-only)")?;
    }

    // 8. Files the owner's tools run by themselves stay read-only inside writable roots.
    for d in &policy.create_dirs {
        let dst = inside(new, d);
        no_symlink(&dst, "create a protected directory")?;
        if !dst.exists() {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .recursive(true)
                .create(&dst)
                .map_err(io("create a protected directory"))?;
        }
    }
    for f in &policy.create_files {
        let dst = inside(new, f);
        no_symlink(&dst, "create a protected file")?;
        if std::fs::symlink_metadata(&dst).is_err() {
            if let Some(parent) = dst.parent() {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .recursive(true)
                    .create(parent)
                    .map_err(io("create a protected file"))?;
            }
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&dst)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(("create a protected file", errno_of(&e))),
            }
        }
    }
    // `.git/commondir` placeholders hold `.` (the git directory itself): git dies on an
    // empty one.
    for f in &policy.create_commondir {
        let dst = inside(new, f);
        no_symlink(&dst, "create a protected file")?;
        if std::fs::symlink_metadata(&dst).is_err() {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&dst)
            {
                Ok(mut file) => {
                    std::io::Write::write_all(
                        &mut file,
                        crate::policy::COMMONDIR_PLACEHOLDER.as_bytes(),
                    )
                    .map_err(io("create a protected file"))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(("create a protected file", errno_of(&e))),
            }
        }
    }
    // Directories between a writable root and a protected path become mount points of their
    // own (still writable): a mount point cannot be renamed away, so the protected path cannot
    // be left behind under another name and recreated without protection (`mv .cargo .cargo2
    // && mkdir .cargo`, `mv node_modules nm && mkdir -p node_modules/.bin`).
    let mut pins: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
    for p in &policy.protected {
        let Some(root) = policy
            .writable
            .iter()
            .filter(|w| p.starts_with(w))
            .max_by_key(|w| w.as_os_str().len())
        else {
            continue;
        };
        let mut a = p.parent();
        while let Some(d) = a {
            if d == root.as_path() || !d.starts_with(root) {
                break;
            }
            pins.insert(d.to_path_buf());
            a = d.parent();
        }
    }
    for d in &pins {
        let dst = inside(new, d);
        if !std::fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        m(
            "pin a directory above a protected path",
            Some(&dst),
            &dst,
            nofs,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
    }
    for p in &policy.protected {
        let dst = inside(new, p);
        if std::fs::symlink_metadata(&dst).is_err() {
            continue;
        }
        no_symlink(&dst, "protect a path")?;
        m(
            "protect a path",
            Some(&dst),
            &dst,
            nofs,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        ns::mount_setattr_recursive(&dst, ns::MOUNT_ATTR_RDONLY | ns::MOUNT_ATTR_NOSUID)
            .map_err(io("protect a path (read-only)"))?;
    }

    // 8b. The session: read only now, so that all of the above runs while the caller asks
    // the daemon for it; then /dev read-only.
    enter_session(old, new, session, policy.socket.as_deref(), jail_id)?;

    // 9. Into the new root; the scratch root and the old tree go away.
    std::env::set_current_dir(new).map_err(io("pivot_root"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| ("pivot_root", nix_errno(e)))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| ("detach the old root", nix_errno(e)))?;
    std::env::set_current_dir("/").map_err(io("pivot_root"))?;
    Ok(())
}

/// Parts of /proc made read-only in the jail (what container runtimes make read-only or
/// mask): global sysctls, the magic SysRq trigger, IRQ affinities, bus and filesystem
/// settings.
pub const PROC_READ_ONLY: &[&str] = &[
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
    "/proc/acpi",
    "/proc/scsi",
    "/proc/driver",
];
/// `--net proxy`, in the jail's network namespace: `lo` up, a listener on `127.0.0.1:port`
/// (the proxy's own port, so the addresses the daemon hands out work inside too), sent to
/// the caller, which relays each connection to the proxy and to nothing else. Nothing in the
/// jail keeps the listener: it accepts nothing itself.
fn proxy_listener(relay: &OwnedFd, port: u16) -> StepResult {
    ns::loopback_up().map_err(io("--net proxy: bring lo up"))?;
    let l = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))
        .map_err(io("--net proxy: listen on the jail's loopback"))?;
    let fd = OwnedFd::from(l);
    agentkeys_hardening::launcher::send_msg(relay.as_fd(), &"listener", &[fd.as_fd()])
        .map_err(io("--net proxy: hand the listener over"))?;
    Ok(())
}

fn no_symlink(p: &Path, step: &'static str) -> StepResult {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => Err((step, libc::ELOOP)),
        _ => Ok(()),
    }
}

fn remount_ro(p: &Path, step: &'static str) -> StepResult {
    m(
        step,
        None,
        p,
        None,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
}

/// /dev: a tmpfs with null, zero, full, random, urandom and tty bound in, a new devpts
/// instance (ptys made inside), a private /dev/shm and the usual links ([`enter_session`] adds
/// the session file and makes it read-only).
fn build_dev(old: &Path, new: &Path) -> StepResult {
    let dev = inside(new, Path::new("/dev"));
    m(
        "mount /dev",
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )?;
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        let dst = dev.join(n);
        std::fs::write(&dst, b"").map_err(io("populate /dev"))?;
        m(
            "populate /dev",
            Some(&old.join("dev").join(n)),
            &dst,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    dev_dir(dev.join("pts"), 0o755)?;
    dev_dir(dev.join("shm"), 0o1777)?;
    // A new devpts instance; without it (some containers) only ptys are unavailable.
    if m(
        "mount /dev/pts",
        Some(Path::new("devpts")),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )
    .is_ok()
    {
        let _ = std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"));
    }
    m(
        "mount /dev/shm",
        Some(Path::new("tmpfs")),
        &dev.join("shm"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link)).map_err(io("populate /dev"))?;
    }
    Ok(())
}

/// A directory in the jail's /dev with `mode`.
fn dev_dir(p: PathBuf, mode: u32) -> StepResult {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(&p)
        .map_err(io("populate /dev"))
}

/// The session file and the daemon's socket in the jail's /dev (the session read from the
/// caller's pipe now), then /dev read-only.
fn enter_session(
    old: &Path,
    new: &Path,
    session: Option<&Session>,
    socket: Option<&Path>,
    jail_id: &mut Option<Entered>,
) -> StepResult {
    let dev = inside(new, Path::new("/dev"));
    if let Some(s) = session {
        // Now the session is needed: `jail_id\ntoken[\nport[\nNAME=value]...]`, or EOF
        // alone (refused: end quietly).
        let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_SESSION_MESSAGE]);
        let mut got = 0;
        while got < buf.len() {
            match nix::unistd::read(&s.pipe, &mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(("receive the session", nix_errno(e))),
            }
        }
        let Some(nl) = buf[..got].iter().position(|&b| b == b'\n') else {
            ns::exit_now(0)
        };
        let id = String::from_utf8_lossy(&buf[..nl]).into_owned();
        let rest = &buf[nl + 1..got];
        let (token, extra) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        let mut lines = extra.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        let port: u16 = match lines.next() {
            None => 0,
            Some(p) => std::str::from_utf8(p)
                .ok()
                .and_then(|p| p.parse().ok())
                .ok_or(("receive the session (proxy port)", libc::EINVAL))?,
        };
        let mut env = Vec::new();
        for l in lines {
            let e = std::str::from_utf8(l)
                .map_err(|_| ("receive the session (environment)", libc::EINVAL))?;
            if !e.contains('=') || e.contains('\0') {
                return Err(("receive the session (environment)", libc::EINVAL));
            }
            env.push(zeroize::Zeroizing::new(e.to_string()));
        }
        *jail_id = Some(Entered { jail_id: id, env });
        if let Some(relay) = &s.relay {
            if port == 0 {
                return Err(("--net proxy: no proxy port", libc::EINVAL));
            }
            proxy_listener(relay, port)?;
        }
        let dir = inside(new, Path::new(SESSION_DIR));
        dev_dir(dir, 0o700)?;
        let file = inside(new, Path::new(SESSION_FILE));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(io("write the session file"))?;
        std::io::Write::write_all(&mut f, token).map_err(io("write the session file"))?;
        if let Some(sock) = socket {
            let dst = inside(new, Path::new(crate::policy::SESSION_SOCKET));
            std::fs::write(&dst, b"").map_err(io("bind the daemon's socket"))?;
            m(
                "bind the daemon's socket",
                Some(&inside(old, sock)),
                &dst,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
    }
    remount_ro(&dev, "make /dev read-only").or_else(|_| {
        // noexec/nodev flags as mounted; only read-only matters here.
        m(
            "make /dev read-only",
            None,
            &dev,
            None,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NOEXEC,
            None,
        )
    })
}

/// The error pipe's writer side for callers: `step\0errno` then EOF.
pub fn report(fd: &impl AsFd, step: &str, errno: i32) {
    let mut msg = Vec::with_capacity(step.len() + 8);
    msg.extend_from_slice(step.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&errno.to_le_bytes());
    let _ = nix::unistd::write(fd, &msg);
}

/// Reads a report written by [`report`]: `None` at a clean EOF (the command exec'd).
pub fn read_report(fd: &OwnedFd) -> Option<(String, i32)> {
    let mut buf = [0u8; 512];
    let mut got = 0;
    loop {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == buf.len() {
                    break;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    if got == 0 {
        return None;
    }
    let data = &buf[..got];
    let nul = data.iter().position(|&b| b == 0)?;
    let step = String::from_utf8_lossy(&data[..nul]).into_owned();
    let errno = data
        .get(nul + 1..nul + 5)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_le_bytes)
        .unwrap_or(libc::EIO);
    Some((step, errno))
}

/// argv/env to C strings for the exec (no NUL inside any).
pub fn cstrings(items: &[String]) -> Option<Vec<CString>> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).ok())
        .collect()
}

/// A shared `flock` every `agentkeys jail` of one owner holds for its life (on
/// `jail.lock` in `$AGENTKEYS_HOME`), so that the jail that made placeholders
/// ([`JailPolicy::create_dirs`], [`JailPolicy::create_files`],
/// [`JailPolicy::create_commondir`]) removes them only when no
/// other jail runs: another jail may have a read-only mount on one, and removing it from
/// outside would detach that mount. `None` inside: no lock could be taken (placeholders are
/// then left).
pub struct PlaceholderLock(Option<nix::fcntl::Flock<std::fs::File>>);

/// Takes the shared lock (waits while a jail is removing its placeholders).
pub fn placeholder_lock(agentkeys_home: &Path) -> PlaceholderLock {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(agentkeys_home.join("jail.lock"));
    PlaceholderLock(
        file.ok()
            .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockShared).ok()),
    )
}

/// Removes the placeholders this jail made, if they are still what it made (an empty
/// regular file, an empty directory) and no other jail runs; called once the jail's
/// processes are gone. Best effort: a placeholder left behind is empty and read-only.
pub fn remove_placeholders(policy: &JailPolicy, lock: PlaceholderLock) {
    if policy.create_files.is_empty()
        && policy.create_dirs.is_empty()
        && policy.create_commondir.is_empty()
    {
        return;
    }
    let Some(lock) = lock.0 else { return };
    if lock
        .relock(nix::fcntl::FlockArg::LockExclusiveNonblock)
        .is_err()
    {
        return; // another jail runs
    }
    // The agent may have replaced a directory above a placeholder by a symbolic link (only
    // the placeholder itself was a mount point): nothing is removed through one.
    let direct = |p: &Path| {
        p.parent()
            .is_some_and(|d| std::fs::canonicalize(d).is_ok_and(|c| c == d))
    };
    for f in &policy.create_files {
        if direct(f)
            && std::fs::symlink_metadata(f).is_ok_and(|m| m.file_type().is_file() && m.len() == 0)
        {
            let _ = std::fs::remove_file(f);
        }
    }
    for f in &policy.create_commondir {
        if direct(f)
            && std::fs::symlink_metadata(f).is_ok_and(|m| {
                m.file_type().is_file()
                    && m.len() == crate::policy::COMMONDIR_PLACEHOLDER.len() as u64
            })
            && std::fs::read(f).is_ok_and(|b| b == crate::policy::COMMONDIR_PLACEHOLDER.as_bytes())
        {
            let _ = std::fs::remove_file(f);
        }
    }
    // Deepest first; remove_dir fails on a directory that is not empty.
    for d in policy.create_dirs.iter().rev() {
        if direct(d) && std::fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_dir()) {
            let _ = std::fs::remove_dir(d);
        }
    }
    drop(lock);
}
