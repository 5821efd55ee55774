//! Process hardening steps, in the order a daemon takes them at start (after ssh-agent's
//! `main` and Firecracker's `sanitize_process`):
//!
//! 1. [`fix_std_fds`]: fds 0-2 open (on /dev/null if closed), so a later `open` can never
//!    become "stdout" by accident.
//! 2. [`close_inherited_fds`]: nothing a parent leaked stays open.
//! 3. [`sanitize_env`]: only allowlisted environment variables survive.
//! 4. [`set_dumpable`] `(false)` and [`set_core_limit_zero`]: no core files, no same-uid
//!    ptrace or `/proc/PID/mem` access.
//! 5. [`check_tracer`]: refuse to run under a debugger.
//! 6. [`ptrace_scope`] and [`assess_ptrace_scope`]: report how the kernel limits ptrace.
//! 7. [`set_no_new_privs`] then [`drop_capabilities`].
//!
//! Each step returns an error naming itself; callers stop at the first failure.

use std::ffi::OsString;
use std::io;
use std::os::fd::RawFd;

use crate::errno::cerr;

/// Errors of the hardening steps that are decisions rather than failed syscalls.
#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    /// A syscall of a named step failed.
    #[error("{step} failed: {source}")]
    Step {
        /// Which step.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `TracerPid` is not 0.
    #[error(
        "tracer check: process is being traced by pid {0}; refusing to run (--allow-debugger overrides)"
    )]
    Traced(u32),
    /// ptrace_scope is weaker than required.
    #[error("ptrace_scope check: {0}")]
    PtraceScope(String),
    /// A step that must run single-threaded found other threads.
    #[error("{0} must run before any other thread exists ({1} threads found)")]
    NotSingleThreaded(&'static str, u32),
}

fn step_err(name: &'static str) -> impl FnOnce(io::Error) -> HardenError {
    move |source| HardenError::Step { step: name, source }
}

fn prctl(op: libc::c_int, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: every prctl operation used in this module takes integer arguments only (no
    // pointers); unused trailing arguments are passed as 0 as the man page requires.
    cerr(unsafe {
        libc::prctl(
            op,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
}

// --- 1, 2: file descriptors -------------------------------------------------------------

/// Makes sure fds 0, 1 and 2 are open, opening `/dev/null` on any that is closed.
///
/// # Errors
/// `fix fds 0-2` with the OS error if `/dev/null` cannot be opened.
pub fn fix_std_fds() -> Result<(), HardenError> {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on an integer fd only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // The lowest free descriptor is `fd` itself, since 0..fd are open by now.
            // SAFETY: a NUL-terminated path literal and integer flags.
            let nfd = cerr(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) })
                .map_err(step_err("fix fds 0-2"))?;
            if nfd != fd {
                return Err(step_err("fix fds 0-2")(io::Error::other(format!(
                    "/dev/null opened as fd {nfd}, expected {fd}"
                ))));
            }
        }
    }
    Ok(())
}

/// Closes every fd from 3 upwards except those in `keep`.
///
/// Call it at start, before this process opens anything of its own: closing an fd that a Rust
/// object owns would leave that object pointing at whatever reuses the number.
///
/// # Errors
/// `close inherited fds` with the OS error.
pub fn close_inherited_fds(keep: &[RawFd]) -> Result<(), HardenError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd >= 3)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for k in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if k > first {
            let last = if k == u32::MAX { u32::MAX } else { k - 1 };
            // SAFETY: closes a range of descriptors; per the contract above none of them is
            // owned by a live Rust object.
            cerr(unsafe { libc::close_range(first, last, 0) })
                .map_err(step_err("close inherited fds"))?;
        }
        first = k.saturating_add(1);
    }
    Ok(())
}

/// Number of threads in this process (from `/proc/self/status`).
///
/// # Errors
/// Reading or parsing `/proc/self/status`.
pub fn thread_count() -> io::Result<u32> {
    use std::io::Read;
    // Into a buffer on the stack, without parsing every line: called before each fork of
    // `agentkeys jail`, whose children would otherwise copy the heap pages this allocates.
    let mut buf = [0u8; 8192];
    let mut got = 0;
    let mut f = std::fs::File::open("/proc/self/status")?;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[..got]
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"Threads:"))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// Removes every environment variable whose name is not in `allow`.
///
/// # Errors
/// [`HardenError::NotSingleThreaded`] if another thread exists: changing the environment
/// while another thread may read it is undefined behaviour in glibc.
pub fn sanitize_env(allow: &[&str]) -> Result<(), HardenError> {
    let threads = thread_count().map_err(step_err("sanitize environment"))?;
    if threads != 1 {
        return Err(HardenError::NotSingleThreaded(
            "sanitize environment",
            threads,
        ));
    }
    let doomed: Vec<OsString> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| !k.to_str().is_some_and(|k| allow.contains(&k)))
        .collect();
    for k in doomed {
        // SAFETY: checked above that this is the only thread, so nothing reads the
        // environment concurrently.
        unsafe { std::env::remove_var(&k) };
    }
    Ok(())
}

// --- 4: dumps ---------------------------------------------------------------------------

/// Sets `PR_SET_DUMPABLE`. Off means: no core dump, `/proc/PID/mem` and ptrace attach only for
/// `CAP_SYS_PTRACE`, `/proc/PID/*` owned by root.
///
/// # Errors
/// `set dumpable` with the OS error.
pub fn set_dumpable(on: bool) -> Result<(), HardenError> {
    prctl(libc::PR_SET_DUMPABLE, libc::c_ulong::from(on))
        .map(drop)
        .map_err(step_err("set dumpable"))
}

/// Whether the process is dumpable (`PR_GET_DUMPABLE`).
///
/// # Errors
/// The OS error from prctl.
pub fn is_dumpable() -> io::Result<bool> {
    prctl(libc::PR_GET_DUMPABLE, 0).map(|v| v != 0)
}

/// Sets `RLIMIT_CORE` to 0 (soft and hard): no core file even if dumpable comes back on.
///
/// # Errors
/// `set RLIMIT_CORE 0` with the OS error.
pub fn set_core_limit_zero() -> Result<(), HardenError> {
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| step_err("set RLIMIT_CORE 0")(e.into()))
}

/// The current `RLIMIT_CORE` as (soft, hard).
///
/// # Errors
/// The OS error from getrlimit.
pub fn core_limit() -> io::Result<(u64, u64)> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CORE).map_err(Into::into)
}

/// The current `RLIMIT_MEMLOCK` as (soft, hard), in bytes. Secret pages count against it.
///
/// # Errors
/// The OS error from getrlimit.
pub fn memlock_limit() -> io::Result<(u64, u64)> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK).map_err(Into::into)
}

/// Locks `buf`'s pages in memory (no swap). There is no `mlockall(MCL_FUTURE)` helper on
/// purpose: the whole heap would not fit in an 8 MiB memlock limit.
///
/// # Errors
/// `mlock` with the OS error (ENOMEM / EAGAIN at the memlock limit).
pub fn mlock(buf: &[u8]) -> Result<(), HardenError> {
    // SAFETY: locks the pages under a live slice; no memory is read or written.
    cerr(unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) })
        .map(drop)
        .map_err(step_err("mlock"))
}

/// Unlocks pages locked with [`mlock`].
///
/// # Errors
/// `munlock` with the OS error.
pub fn munlock(buf: &[u8]) -> Result<(), HardenError> {
    // SAFETY: as for mlock.
    cerr(unsafe { libc::munlock(buf.as_ptr().cast(), buf.len()) })
        .map(drop)
        .map_err(step_err("munlock"))
}

// --- 5: tracer --------------------------------------------------------------------------

/// The `TracerPid` of this process (0 when nobody traces it).
///
/// # Errors
/// Reading or parsing `/proc/self/status`.
pub fn tracer_pid() -> io::Result<u32> {
    ProcStatus::read_self()?
        .get_u64("TracerPid")
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| io::Error::other("no TracerPid: line in /proc/self/status"))
}

/// Outcome of the tracer check when it does not refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracerCheck {
    /// Nobody traces this process.
    Untraced,
    /// Traced, and allowed by `--allow-debugger`: the caller must warn loudly.
    TracedAllowed(u32),
}

/// Refuses (an error) when a tracer is attached, unless `allow_debugger`.
///
/// # Errors
/// [`HardenError::Traced`] with the tracer's pid, or a step error if status cannot be read.
pub fn check_tracer(allow_debugger: bool) -> Result<TracerCheck, HardenError> {
    match tracer_pid().map_err(step_err("tracer check"))? {
        0 => Ok(TracerCheck::Untraced),
        pid if allow_debugger => Ok(TracerCheck::TracedAllowed(pid)),
        pid => Err(HardenError::Traced(pid)),
    }
}

// --- 6: ptrace scope --------------------------------------------------------------------

/// `kernel.yama.ptrace_scope`, or the absence of Yama.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum PtraceScope {
    /// 0: classic — any process may attach to another of the same uid (if dumpable).
    Classic,
    /// 1: only a parent (or a declared tracer) may attach.
    Restricted,
    /// 2: only CAP_SYS_PTRACE may attach.
    AdminOnly,
    /// 3: nobody may attach.
    NoAttach,
    /// The kernel has no Yama (no `/proc/sys/kernel/yama`).
    NoYama,
    /// The file exists but says something else.
    Unrecognised(String),
}

const PTRACE_SCOPE_PATH: &str = "/proc/sys/kernel/yama/ptrace_scope";

/// Parses the content of the ptrace_scope file; `None` means the file does not exist.
pub fn parse_ptrace_scope(content: Option<&str>) -> PtraceScope {
    match content.map(str::trim) {
        None => PtraceScope::NoYama,
        Some("0") => PtraceScope::Classic,
        Some("1") => PtraceScope::Restricted,
        Some("2") => PtraceScope::AdminOnly,
        Some("3") => PtraceScope::NoAttach,
        Some(other) => PtraceScope::Unrecognised(other.chars().take(32).collect()),
    }
}

/// Reads `kernel.yama.ptrace_scope` from procfs.
///
/// # Errors
/// Any read error other than "not found" (which means no Yama).
pub fn ptrace_scope() -> io::Result<PtraceScope> {
    match std::fs::read_to_string(PTRACE_SCOPE_PATH) {
        Ok(s) => Ok(parse_ptrace_scope(Some(&s))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(parse_ptrace_scope(None)),
        Err(e) => Err(e),
    }
}

/// Whether a ptrace scope is acceptable: `Ok(None)` fine, `Ok(Some(warning))` weak but
/// allowed, `Err` when `require` is set and the scope is weaker than 1.
///
/// # Errors
/// [`HardenError::PtraceScope`] when `require` and the scope is 0, absent or unrecognised.
pub fn assess_ptrace_scope(
    scope: &PtraceScope,
    require: bool,
) -> Result<Option<String>, HardenError> {
    let weak = match scope {
        PtraceScope::Restricted | PtraceScope::AdminOnly | PtraceScope::NoAttach => {
            return Ok(None);
        }
        PtraceScope::Classic => {
            "kernel.yama.ptrace_scope is 0: any same-uid process may attach to dumpable processes; \
             agentkeysd relies on dumpable=0 alone (set ptrace_scope to 1 or more)"
                .to_string()
        }
        PtraceScope::NoYama => {
            "the kernel has no Yama LSM (no kernel.yama.ptrace_scope): protection against \
             same-uid tracing rests on dumpable=0 alone"
                .to_string()
        }
        PtraceScope::Unrecognised(v) => {
            format!("kernel.yama.ptrace_scope has an unrecognised value {v:?}")
        }
    };
    if require {
        Err(HardenError::PtraceScope(format!(
            "{weak}; refusing to start (ptrace scope required)"
        )))
    } else {
        Ok(Some(weak))
    }
}

// --- 7: privileges ----------------------------------------------------------------------

/// Sets `PR_SET_NO_NEW_PRIVS`: no execve can ever grant privileges again (setuid, file caps).
///
/// # Errors
/// `set no_new_privs` with the OS error.
pub fn set_no_new_privs() -> Result<(), HardenError> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1)
        .map(drop)
        .map_err(step_err("set no_new_privs"))
}

/// Whether `no_new_privs` is set.
///
/// # Errors
/// The OS error from prctl.
pub fn no_new_privs() -> io::Result<bool> {
    prctl(libc::PR_GET_NO_NEW_PRIVS, 0).map(|v| v != 0)
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Capability number of CAP_SETPCAP (linux/capability.h); libc does not export it.
const CAP_SETPCAP: u32 = 8;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The highest capability number this kernel knows.
fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops every capability: the bounding set (when allowed), the ambient set, and the
/// effective, permitted and inheritable sets, then checks the effective set is empty.
///
/// Works as root and as an unprivileged user (where the sets are already empty; the bounding
/// set then stays as it is, which `no_new_privs` makes harmless).
///
/// # Errors
/// `drop capabilities` with the OS error, or if a capability survives.
pub fn drop_capabilities() -> Result<(), HardenError> {
    let err = step_err("drop capabilities");
    // The bounding set limits what any future execve could gain; dropping needs CAP_SETPCAP.
    let caps = effective_caps().map_err(step_err("drop capabilities (capget)"))?;
    if caps & (1u64 << CAP_SETPCAP) != 0 {
        for cap in 0..=cap_last_cap() {
            match prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) {
                Ok(_) => {}
                // Capabilities newer than this libc's view of the kernel: nothing to drop.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(step_err("drop capabilities (bounding set)")(e)),
            }
        }
    }
    match prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    ) {
        Ok(_) => {}
        // Kernels before 4.3 have no ambient set.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(step_err("drop capabilities (ambient set)")(e)),
    }
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, both valid for the call.
    cerr(unsafe { libc::syscall(libc::SYS_capset, &raw mut hdr, data.as_ptr()) })
        .map_err(step_err("drop capabilities (capset)"))?;
    let left = effective_caps().map_err(step_err("drop capabilities (verify)"))?;
    if left != 0 {
        return Err(err(io::Error::other(format!(
            "CapEff is {left:#x} after the drop"
        ))));
    }
    Ok(())
}

/// The effective capability set as a bit mask (capget).
///
/// # Errors
/// The OS error from capget.
pub fn effective_caps() -> io::Result<u64> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two data structs into our array and may update the header.
    cerr(unsafe { libc::syscall(libc::SYS_capget, &raw mut hdr, data.as_mut_ptr()) })?;
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

// --- detaching ------------------------------------------------------------------------

/// The two ends of a fork into the background.
pub enum Detached {
    /// The original process: wait for the child's readiness, then exit.
    Parent {
        /// The detached child's pid.
        child: u32,
        /// Becomes readable when the child is ready (or has died).
        ready: ReadyWait,
    },
    /// The detached child: a new session, stdio redirected; signal readiness when serving.
    Child {
        /// Write end of the readiness pipe.
        ready: ReadySignal,
    },
}

/// Parent side of the readiness pipe.
pub struct ReadyWait(std::os::fd::OwnedFd);

impl ReadyWait {
    /// Blocks until the child signals readiness (true) or exits without doing so (false).
    pub fn wait(self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match nix::unistd::read(&self.0, &mut b) {
                Ok(1) => return b[0] == b'1',
                Ok(_) => return false,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// Child side of the readiness pipe.
pub struct ReadySignal(std::os::fd::OwnedFd);

impl ReadySignal {
    /// Tells the waiting parent that the daemon is serving.
    pub fn signal(self) {
        let _ = nix::unistd::write(&self.0, b"1");
    }
}

/// Forks into the background: the child starts a new session (no controlling terminal),
/// takes `/dev/null` as stdin and `log` as stdout and stderr. Must run before any thread exists.
///
/// # Errors
/// [`HardenError::NotSingleThreaded`], or the failing step (pipe, fork, setsid, dup2).
pub fn detach(log: std::os::fd::OwnedFd) -> Result<Detached, HardenError> {
    let threads = thread_count().map_err(step_err("detach"))?;
    if threads != 1 {
        return Err(HardenError::NotSingleThreaded("detach", threads));
    }
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| step_err("detach (pipe)")(e.into()))?;
    // SAFETY: only one thread exists (checked above), so the child inherits no lock held by
    // another thread; both sides continue with ordinary code.
    match unsafe { nix::unistd::fork() }.map_err(|e| step_err("detach (fork)")(e.into()))? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            drop(log);
            Ok(Detached::Parent {
                child: child.as_raw().unsigned_abs(),
                ready: ReadyWait(r),
            })
        }
        nix::unistd::ForkResult::Child => {
            drop(r);
            nix::unistd::setsid().map_err(|e| step_err("detach (setsid)")(e.into()))?;
            let null = std::fs::OpenOptions::new()
                .read(true)
                .open("/dev/null")
                .map_err(step_err("detach (open /dev/null)"))?;
            nix::unistd::dup2_stdin(&null).map_err(|e| step_err("detach (stdin)")(e.into()))?;
            nix::unistd::dup2_stdout(&log).map_err(|e| step_err("detach (stdout)")(e.into()))?;
            nix::unistd::dup2_stderr(&log).map_err(|e| step_err("detach (stderr)")(e.into()))?;
            Ok(Detached::Child {
                ready: ReadySignal(w),
            })
        }
    }
}

/// Sets the file-mode creation mask (the daemon uses 0o077: every file and socket it creates
/// is private to its uid unless it widens one on purpose).
pub fn set_umask(mask: u32) {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        mask as libc::mode_t,
    ));
}

// --- /proc/PID/status ---------------------------------------------------------------------

/// The `Key:\tvalue` lines of `/proc/PID/status`, bounded in size.
#[derive(Debug, Clone)]
pub struct ProcStatus {
    lines: Vec<(String, String)>,
}

impl ProcStatus {
    /// Parses status text. Lines without a colon are ignored.
    pub fn parse(text: &str) -> ProcStatus {
        let lines = text
            .lines()
            .take(200)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        ProcStatus { lines }
    }

    /// This process's status.
    ///
    /// # Errors
    /// Reading `/proc/self/status`.
    pub fn read_self() -> io::Result<ProcStatus> {
        Self::read_path("/proc/self/status")
    }

    /// Another process's status (world-readable, also for non-dumpable processes).
    ///
    /// # Errors
    /// Reading `/proc/PID/status` (e.g. no such process).
    pub fn read_pid(pid: u32) -> io::Result<ProcStatus> {
        Self::read_path(&format!("/proc/{pid}/status"))
    }

    fn read_path(path: &str) -> io::Result<ProcStatus> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)?
            .take(64 * 1024)
            .read_to_string(&mut text)?;
        Ok(ProcStatus::parse(&text))
    }

    /// The raw value of a key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A decimal value (the first word, so `VmLck: 12 kB` gives 12).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.split_whitespace().next()?.parse().ok()
    }

    /// A hexadecimal value such as `CapEff`.
    pub fn get_hex(&self, key: &str) -> Option<u64> {
        u64::from_str_radix(self.get(key)?, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{in_child, is_root};
    use nix::sys::ptrace;
    use nix::sys::signal::{Signal, raise};
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};

    fn exited_ok(st: WaitStatus) {
        assert!(matches!(st, WaitStatus::Exited(_, 0)), "child: {st:?}");
    }

    #[test]
    fn rlimit_core_zero() {
        exited_ok(in_child(|| {
            set_core_limit_zero().unwrap();
            if core_limit().unwrap() == (0, 0) {
                0
            } else {
                1
            }
        }));
    }

    #[test]
    fn dumpable_off() {
        exited_ok(in_child(|| {
            if !is_dumpable().unwrap() {
                return 2; // the harness itself should start dumpable
            }
            set_dumpable(false).unwrap();
            if is_dumpable().unwrap() { 1 } else { 0 }
        }));
    }

    #[test]
    fn no_new_privs_set() {
        exited_ok(in_child(|| {
            set_no_new_privs().unwrap();
            let st = ProcStatus::read_self().unwrap();
            if no_new_privs().unwrap() && st.get_u64("NoNewPrivs") == Some(1) {
                0
            } else {
                1
            }
        }));
    }

    #[test]
    fn tracer_pid_check() {
        // Untraced: passes.
        exited_ok(in_child(|| match check_tracer(false) {
            Ok(TracerCheck::Untraced) => 0,
            _ => 1,
        }));
        // Traced (PTRACE_TRACEME, the parent is the tracer): refused, or allowed with a pid
        // when --allow-debugger is given.
        // SAFETY: the child only makes syscalls, reads /proc/self/status and _exits.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = (|| {
                    ptrace::traceme().ok()?;
                    raise(Signal::SIGSTOP).ok()?;
                    let refused =
                        matches!(check_tracer(false), Err(HardenError::Traced(p)) if p > 0);
                    let allowed =
                        matches!(check_tracer(true), Ok(TracerCheck::TracedAllowed(p)) if p > 0);
                    Some(if refused && allowed { 0 } else { 1 })
                })()
                .unwrap_or(2);
                // SAFETY: leave the child without running the harness's destructors.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                let st = waitpid(child, None).unwrap();
                assert!(
                    matches!(st, WaitStatus::Stopped(_, Signal::SIGSTOP)),
                    "{st:?}"
                );
                ptrace::cont(child, None).unwrap();
                exited_ok(waitpid(child, None).unwrap());
            }
        }
    }

    #[test]
    fn ptrace_scope_check_warns() {
        assert_eq!(parse_ptrace_scope(Some("0\n")), PtraceScope::Classic);
        assert_eq!(parse_ptrace_scope(Some("1\n")), PtraceScope::Restricted);
        assert_eq!(parse_ptrace_scope(Some("2")), PtraceScope::AdminOnly);
        assert_eq!(parse_ptrace_scope(Some("3")), PtraceScope::NoAttach);
        assert_eq!(parse_ptrace_scope(None), PtraceScope::NoYama);
        assert_eq!(
            parse_ptrace_scope(Some("9")),
            PtraceScope::Unrecognised("9".into())
        );
        // 0 warns, and refuses when required.
        let w = assess_ptrace_scope(&PtraceScope::Classic, false)
            .unwrap()
            .unwrap();
        assert!(w.contains("ptrace_scope is 0"), "{w}");
        assert!(matches!(
            assess_ptrace_scope(&PtraceScope::Classic, true),
            Err(HardenError::PtraceScope(_))
        ));
        // No Yama is its own result, with its own words.
        let w = assess_ptrace_scope(&PtraceScope::NoYama, false)
            .unwrap()
            .unwrap();
        assert!(w.contains("no Yama"), "{w}");
        assert!(assess_ptrace_scope(&PtraceScope::NoYama, true).is_err());
        // 1..3 are fine either way.
        for s in [
            PtraceScope::Restricted,
            PtraceScope::AdminOnly,
            PtraceScope::NoAttach,
        ] {
            assert!(assess_ptrace_scope(&s, true).unwrap().is_none());
        }
        // The real machine reads without error, and matches what procfs has.
        let real = ptrace_scope().unwrap();
        let exists = std::path::Path::new(PTRACE_SCOPE_PATH).exists();
        assert_eq!(real == PtraceScope::NoYama, !exists);
    }

    #[test]
    fn caps_dropped() {
        if !is_root() {
            eprintln!(
                "SKIP caps_dropped: needs root (an unprivileged process has no capabilities to drop)"
            );
            return;
        }
        exited_ok(in_child(|| {
            if effective_caps().unwrap() == 0 {
                return 2; // root should start with capabilities
            }
            drop_capabilities().unwrap();
            let st = ProcStatus::read_self().unwrap();
            let ok = st.get_hex("CapEff") == Some(0)
                && st.get_hex("CapPrm") == Some(0)
                && st.get_hex("CapInh") == Some(0)
                && st.get_hex("CapAmb") == Some(0)
                && st.get_hex("CapBnd") == Some(0);
            if ok { 0 } else { 1 }
        }));
    }

    #[test]
    fn std_fds_reopened_on_dev_null() {
        exited_ok(in_child(|| {
            // SAFETY: closing stdout in a throwaway child; nothing else uses it.
            unsafe { libc::close(1) };
            fix_std_fds().unwrap();
            match std::fs::read_link("/proc/self/fd/1") {
                Ok(p) if p == std::path::Path::new("/dev/null") => 0,
                _ => 1,
            }
        }));
    }

    #[test]
    fn inherited_fds_closed_except_kept() {
        exited_ok(in_child(|| {
            use std::os::fd::IntoRawFd;
            let a = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
            let b = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
            let c = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
            close_inherited_fds(&[b]).unwrap();
            // SAFETY: F_GETFD only queries the descriptor table.
            let open = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
            if !open(a) && open(b) && !open(c) && open(0) && open(1) && open(2) {
                0
            } else {
                1
            }
        }));
    }

    #[test]
    fn env_allowlist() {
        exited_ok(in_child(|| {
            // SAFETY: a forked child has exactly one thread.
            unsafe {
                std::env::set_var("AK_KEEP_ME", "1");
                std::env::set_var("AK_DROP_ME", "1");
            }
            sanitize_env(&["AK_KEEP_ME", "PATH"]).unwrap();
            let names: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
            let ok = std::env::var_os("AK_KEEP_ME").is_some()
                && std::env::var_os("AK_DROP_ME").is_none()
                && names.iter().all(|k| k == "AK_KEEP_ME" || k == "PATH");
            if ok { 0 } else { 1 }
        }));
    }

    #[test]
    fn env_sanitising_refuses_with_other_threads() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        let r = sanitize_env(&[]);
        tx.send(()).unwrap();
        t.join().unwrap().unwrap();
        assert!(
            matches!(r, Err(HardenError::NotSingleThreaded(_, n)) if n >= 2),
            "{r:?}"
        );
        assert!(std::env::var_os("PATH").is_some() || std::env::vars_os().next().is_some());
    }

    #[test]
    fn mlock_locks_and_unlocks() {
        let buf = vec![7u8; 8192];
        mlock(&buf).unwrap();
        munlock(&buf).unwrap();
        assert!(memlock_limit().unwrap().0 > 0);
    }

    #[test]
    fn status_parser_reads_fields() {
        let st = ProcStatus::parse(
            "Name:\tx\nTracerPid:\t42\nCapEff:\t00000000000000ff\nVmLck:\t  12 kB\n",
        );
        assert_eq!(st.get_u64("TracerPid"), Some(42));
        assert_eq!(st.get_hex("CapEff"), Some(0xff));
        assert_eq!(st.get_u64("VmLck"), Some(12));
        assert_eq!(st.get("Name"), Some("x"));
        assert_eq!(st.get("Nope"), None);
    }
}
