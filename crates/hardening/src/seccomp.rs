//! The syscall allowlist of `agentkeysd` and its installation on every thread.
//!
//! The policy is reviewed data, not code: [`DAEMON_ALLOWLIST`] names each syscall the daemon
//! may make and says who needs it, in the manner of Firecracker's `resources/seccomp/*.json`.
//! A change to it is a security review. Anything not on the list kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`): a compromised daemon gets no second try, and a missing entry
//! shows up as a `SIGSYS` death in tests rather than as a silently degraded feature.
//! seccompiler checks the audit architecture first, so a 32-bit or foreign-ABI syscall number
//! cannot slip past a list written for the native one.
//!
//! `agentkeysd` installs the filter from its synchronous `main`, with TSYNC so that every
//! thread is covered, after `no_new_privs` and the capability drop and before the tokio runtime
//! starts. The launcher is forked *before* this point: filters survive `execve`, so the children
//! that run agents must not descend from the filtered daemon, which cannot `execve` at all.
//!
//! Where an argument can be checked, the entry says so ([`Allowed::only_if`]): `socket` only for
//! `AF_UNIX`, `clone` only for threads, `ioctl` and `prctl` only for the requests in use,
//! `prlimit64` only to read. Several entries for one syscall are alternatives (networking for the
//! OpenBao backend adds a `socket` entry for `AF_INET`/`AF_INET6` beside the `AF_UNIX` one); an
//! entry with no condition allows every call.

use std::collections::BTreeMap;

pub use seccompiler::BpfProgram;
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// One syscall the daemon may make, with the reason it is on the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// The syscall number on the architecture being built (`libc::SYS_*`).
    pub nr: libc::c_long,
    /// The syscall's name, without the `SYS_` prefix.
    pub name: &'static str,
    /// Who needs it, and for what.
    pub why: &'static str,
    /// Conditions on the arguments that must all hold; empty allows every call.
    pub only_if: &'static [ArgIs],
}

/// A condition on one argument of a syscall (arguments counted from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArgIs {
    /// The argument's low 32 bits equal the value: for `int` arguments such as a socket
    /// domain, an `ioctl` request or a `prctl` option, whose upper register half is not defined.
    Eq(u8, u32),
    /// Every bit of the mask is set in the argument (flag words such as `clone`'s).
    AllSet(u8, u64),
    /// No bit of the mask is set in the argument.
    NoneSet(u8, u64),
    /// The whole 64-bit argument is 0: a null pointer (all bits compared, so a pointer whose low
    /// half happens to be 0 does not pass).
    Zero(u8),
    /// The argument's bits under the mask equal the value (a field of a word: the type of a
    /// socket under its flags, `type & 0xf`).
    MaskedEq(u8, u64, u64),
    /// The argument (an `int` pid) is the process's own thread-group id, fixed when the filter is
    /// built (`std::process::id()` of the compiling process, which is the one that installs it).
    OwnTgid(u8),
}

/// `SOCK_TYPE_MASK` of the kernel: the socket type without `SOCK_NONBLOCK` / `SOCK_CLOEXEC`.
const SOCK_TYPE_MASK: u64 = 0xf;

/// What went wrong, and in which step.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The allowlist could not be turned into a BPF program (unknown architecture, a program
    /// too long for the kernel).
    #[error("seccomp: compile the filter: {0}")]
    Compile(#[source] seccompiler::Error),
    /// The kernel refused the program or could not synchronise it onto every thread.
    #[error("seccomp: install the filter on all threads: {0}")]
    Install(#[source] seccompiler::Error),
}

/// `prctl` option of Linux 5.17+ that names an anonymous mapping (not in the `libc` crate).
const PR_SET_VMA: u32 = 0x5356_4d41;

/// `"SYS_read"` → `"read"`, at compile time; a name without the prefix fails the build.
const fn syscall_name(sys: &'static str) -> &'static str {
    let (prefix, rest) = sys.as_bytes().split_at(4);
    assert!(
        matches!(prefix, b"SYS_"),
        "syscall constants start with SYS_"
    );
    match std::str::from_utf8(rest) {
        Ok(name) => name,
        Err(_) => panic!("syscall names are ASCII"),
    }
}

/// The syscall numbers: `libc`'s, plus the few it leaves out for an architecture.
mod sys {
    pub use libc::*;
    /// arm64 has `renameat` (38, `__ARCH_WANT_RENAMEAT`) and glibc's `rename` uses it, but the
    /// `libc` crate omits it for aarch64 glibc (38 is something else on ILP32).
    #[cfg(target_arch = "aarch64")]
    pub const SYS_renameat: c_long = 38;
}

/// `allow!(SYS_x, "why")` or `allow!(SYS_x if [ArgIs::..], "why")`: one reviewed entry.
macro_rules! allow {
    ($sys:ident, $why:literal) => {
        allow!($sys if [], $why)
    };
    ($sys:ident if [$($cond:expr),* $(,)?], $why:literal) => {
        Allowed {
            nr: sys::$sys,
            name: syscall_name(stringify!($sys)),
            why: $why,
            only_if: &[$($cond),*],
        }
    };
}

/// The syscalls `agentkeysd` may make once its filter is installed; everything else kills it.
///
/// Grouped by subsystem. Entries that exist on x86_64 only are the legacy forms that glibc
/// still uses there (`poll`, `epoll_wait`, ...); aarch64 has only the `*at`/`p*` variants.
#[rustfmt::skip]
pub const DAEMON_ALLOWLIST: &[Allowed] = &[
    // --- Threads and synchronisation (std, tokio's workers and blocking pool) ---
    allow!(SYS_clone3,
        "allowed here only so that DAEMON_ENOSYS's answer stands: that filter returns ENOSYS for \
         clone3 (whose flags seccomp cannot read), glibc then falls back to clone, checked below"),
    allow!(SYS_clone if [ArgIs::AllSet(0, libc::CLONE_THREAD as u64)],
        "glibc falls back to clone for threads when clone3 is ENOSYS; only with CLONE_THREAD, so \
         no fork through it"),
    allow!(SYS_futex, "std Mutex/Condvar/park, tokio's worker and blocking-pool parking"),
    allow!(SYS_set_robust_list, "glibc registers each new thread's robust mutex list"),
    allow!(SYS_rseq, "glibc 2.35+ registers restartable sequences for each new thread"),
    allow!(SYS_sched_yield, "std spin loops and tokio's scheduler back-off"),
    allow!(SYS_sched_getaffinity,
        "std::thread::available_parallelism; tokio sizes its pools from it"),
    allow!(SYS_getcpu,
        "mimalloc v3 picks the NUMA node of a new thread's heap with a raw getcpu syscall on \
         multi-node hosts"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_access,
        "mimalloc v3 counts NUMA nodes (access /sys/devices/system/node/nodeN) on the first new \
         thread, i.e. tokio's first worker; no more than openat allows"),
    allow!(SYS_faccessat, "the same NUMA probe on aarch64, where glibc's access() is faccessat"),
    allow!(SYS_faccessat2, "glibc's faccessat() with flags"),
    allow!(SYS_exit, "a thread returning (tokio blocking-pool threads time out and exit)"),
    allow!(SYS_exit_group, "process exit"),
    allow!(SYS_restart_syscall,
        "the kernel resumes a sleep or futex wait interrupted by a signal (SIGTERM) through it"),
    // --- Memory (mimalloc, glibc, thread stacks, secret pages) ---
    allow!(SYS_brk, "glibc's own malloc, used by libc internals beneath the Rust allocator"),
    allow!(SYS_mmap, "mimalloc arenas, thread stacks, mapping secret pages"),
    allow!(SYS_munmap, "mimalloc, thread stacks on exit, unmapping secret pages"),
    allow!(SYS_mremap, "glibc malloc grows large mmapped chunks in realloc"),
    allow!(SYS_mprotect,
        "mimalloc secure-mode guard pages, glibc thread-stack guards, read-only secret pages"),
    allow!(SYS_madvise,
        "mimalloc returns free memory (MADV_DONTNEED/FREE); secret pages use \
         MADV_DONTDUMP/WIPEONFORK"),
    allow!(SYS_mlock, "secret pages stay out of swap (memfd fallback)"),
    allow!(SYS_munlock, "releasing a locked secret page"),
    allow!(SYS_memfd_secret,
        "secret pages: memory removed from the kernel's direct map (447 on x86_64 and aarch64)"),
    allow!(SYS_memfd_create,
        "fallback secret pages: sealed, mlocked memfd when memfd_secret is unavailable"),
    allow!(SYS_pkey_alloc,
        "pkey module: a protection key for pages no thread may touch outside a closure"),
    allow!(SYS_pkey_mprotect, "pkey module: tagging secret pages with their key"),
    allow!(SYS_pkey_free, "pkey module: releasing a key"),
    // --- Signals (tokio signal driver, std's stack-overflow guard, abort) ---
    allow!(SYS_rt_sigaction, "tokio::signal installs SIGTERM/SIGINT handlers"),
    allow!(SYS_rt_sigprocmask, "glibc masks signals around thread creation and in abort()"),
    allow!(SYS_rt_sigreturn, "returning from any signal handler"),
    allow!(SYS_sigaltstack, "std gives every thread an alternate stack to report stack overflows"),
    allow!(SYS_tgkill if [ArgIs::OwnTgid(0)],
        "abort() and panic=abort raise SIGABRT on the calling thread: only to threads of the \
         daemon's own thread group (fixed when the filter is built), never to another process"),
    allow!(SYS_getpid, "abort()/raise, and logging"),
    allow!(SYS_gettid, "abort()/raise and glibc's thread bookkeeping"),
    // --- Identity and process control ---
    allow!(SYS_getuid, "peer checks compare SO_PEERCRED against our own uid"),
    allow!(SYS_geteuid, "state files are checked to be owned by our effective uid"),
    allow!(SYS_getgid, "peer and state-file checks"),
    allow!(SYS_getegid, "peer and state-file checks"),
    allow!(SYS_wait4, "reaping the launcher, our only child, forked before the filter"),
    allow!(SYS_waitid, "reaping the launcher (waitid form)"),
    allow!(SYS_prlimit64 if [ArgIs::Eq(0, 0), ArgIs::Zero(2)],
        "getrlimit (the self-test reads RLIMIT_CORE and RLIMIT_MEMLOCK at start): our own pid, \
         new_limit NULL, so limits can be read but never changed"),
    allow!(SYS_getcwd, "std's default panic hook reads the cwd to shorten backtrace paths"),
    allow!(SYS_umask, "the socket is bound under a tight umask"),
    allow!(SYS_prctl if [ArgIs::Eq(0, libc::PR_SET_NAME as u32)],
        "std names threads (tokio-runtime-worker)"),
    allow!(SYS_prctl if [ArgIs::Eq(0, PR_SET_VMA)],
        "mimalloc v3: prctl(PR_SET_VMA) names its arenas"),
    allow!(SYS_prctl if [ArgIs::Eq(0, libc::PR_GET_DUMPABLE as u32)],
        "the self-test reports that the daemon is not dumpable"),
    allow!(SYS_prctl if [ArgIs::Eq(0, libc::PR_GET_NO_NEW_PRIVS as u32)],
        "the self-test reports no_new_privs"),
    allow!(SYS_prctl if [ArgIs::Eq(0, libc::PR_GET_SECCOMP as u32)],
        "the self-test reports the seccomp mode"),
    // --- Event loop (mio under tokio) ---
    allow!(SYS_epoll_create1, "tokio: epoll reactor"),
    allow!(SYS_epoll_ctl, "tokio: registering sockets and the waker with the reactor"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_epoll_wait, "tokio: the reactor waits in epoll_wait (glibc's call on x86_64)"),
    allow!(SYS_epoll_pwait, "tokio: the reactor wait (glibc's epoll_wait on aarch64)"),
    allow!(SYS_eventfd2, "tokio: mio's waker wakes the reactor through an eventfd"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_poll, "std polls fds (glibc poll on x86_64)"),
    allow!(SYS_ppoll, "std polls fds (glibc poll on aarch64)"),
    // --- Sockets: the SOCK_SEQPACKET server and tokio's signal pipe ---
    allow!(SYS_socket if [ArgIs::Eq(0, libc::AF_UNIX as u32),
                          ArgIs::MaskedEq(1, SOCK_TYPE_MASK, libc::SOCK_STREAM as u64)],
        "AF_UNIX stream sockets (glibc's NSS may ask nscd); never SOCK_DGRAM, whose sendto/sendmsg \
         would reach any unix datagram socket by path; networking (OpenBao) adds its own entry"),
    allow!(SYS_socket if [ArgIs::Eq(0, libc::AF_UNIX as u32),
                          ArgIs::MaskedEq(1, SOCK_TYPE_MASK, libc::SOCK_SEQPACKET as u64)],
        "AF_UNIX SOCK_SEQPACKET sockets (the protocol's own type)"),
    allow!(SYS_socketpair if [ArgIs::Eq(0, libc::AF_UNIX as u32),
                              ArgIs::MaskedEq(1, SOCK_TYPE_MASK, libc::SOCK_STREAM as u64)],
        "tokio signal driver: a stream socketpair (no datagram pairs, see socket)"),
    allow!(SYS_socketpair if [ArgIs::Eq(0, libc::AF_UNIX as u32),
                              ArgIs::MaskedEq(1, SOCK_TYPE_MASK, libc::SOCK_SEQPACKET as u64)],
        "SOCK_SEQPACKET socketpairs (the launcher link's type)"),
    allow!(SYS_bind, "binding the daemon's socket in its 0700 directory"),
    allow!(SYS_listen, "the daemon's listening socket"),
    allow!(SYS_accept4, "accepting clients"),
    allow!(SYS_recvmsg, "requests, and fds received with SCM_RIGHTS"),
    allow!(SYS_sendmsg,
        "replies, and secret fds sent with SCM_RIGHTS to clients and the launcher; only on the \
         daemon's stream and seqpacket sockets (no unix datagram socket can be made, see socket), \
         where the kernel refuses (stream) or ignores (seqpacket) a destination address"),
    allow!(SYS_recvfrom, "recv() on stream sockets (tokio's signal pipe reads this way)"),
    allow!(SYS_sendto,
        "send() on sockets; a destination address is refused or ignored on the unix sockets the \
         daemon can have (see sendmsg)"),
    allow!(SYS_getsockopt, "SO_PEERCRED on accept; SO_ERROR"),
    allow!(SYS_getsockname, "tokio-seqpacket's local_addr, for logging the bound path"),
    allow!(SYS_shutdown, "closing a connection's write side"),
    // --- File descriptors and I/O ---
    allow!(SYS_read, "reading sockets, pipes and state files"),
    allow!(SYS_write,
        "writing sockets, state files, logs to stderr; the signal handler's wake-up byte"),
    allow!(SYS_readv, "vectored reads"),
    allow!(SYS_writev, "vectored writes (logging)"),
    allow!(SYS_pread64, "positioned reads of state files"),
    allow!(SYS_pwrite64, "positioned writes of state files"),
    allow!(SYS_lseek, "state files"),
    allow!(SYS_close, "every fd"),
    allow!(SYS_close_range,
        "closefrom()-style cleanup; it can only close the daemon's own descriptors"),
    allow!(SYS_dup, "duplicating an fd to send it"),
    allow!(SYS_dup3, "duplicating an fd with O_CLOEXEC"),
    allow!(SYS_fcntl,
        "CLOEXEC/NONBLOCK flags, F_DUPFD_CLOEXEC, memfd seals (F_ADD_SEALS/F_GET_SEALS)"),
    allow!(SYS_ioctl if [ArgIs::Eq(1, libc::FIONBIO as u32)], "std set_nonblocking on sockets"),
    allow!(SYS_ioctl if [ArgIs::Eq(1, libc::FIOCLEX as u32)],
        "std sets CLOEXEC on some fds with FIOCLEX"),
    allow!(SYS_ioctl if [ArgIs::Eq(1, libc::TCGETS as u32)],
        "isatty() on stderr before coloured log output"),
    allow!(SYS_pipe2,
        "pipes (O_CLOEXEC), e.g. a self-pipe; the launcher itself talks over a socketpair"),
    allow!(SYS_ftruncate, "sizing a secret memfd; truncating state files"),
    // --- State directory ---
    allow!(SYS_openat, "opening state files and directories (glibc's open on both architectures)"),
    allow!(SYS_fstat, "metadata of an open file"),
    allow!(SYS_newfstatat, "glibc's stat/fstat/opendir go through fstatat"),
    allow!(SYS_statx, "std::fs metadata"),
    allow!(SYS_getdents64, "listing the state directory"),
    allow!(SYS_fsync, "state files and their directory are synced before a rename"),
    allow!(SYS_fdatasync, "File::sync_data on state files"),
    allow!(SYS_flock, "the state directory's lock file"),
    allow!(SYS_fchmod, "tightening a state file's mode"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_chmod,
        "std::fs::set_permissions by path: glibc 2.36 chmod on x86_64 (the socket is made 0600)"),
    allow!(SYS_fchmodat, "std::fs::set_permissions by path (glibc chmod on aarch64)"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_rename, "atomic replace of a state file (glibc rename on x86_64)"),
    allow!(SYS_renameat,
        "atomic replace relative to a directory fd; glibc's rename on aarch64 (38)"),
    allow!(SYS_renameat2, "glibc's rename where renameat does not exist; RENAME_NOREPLACE"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_unlink, "removing a state file or a stale socket (glibc unlink on x86_64)"),
    allow!(SYS_unlinkat, "removing a state file or directory entry"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_mkdir, "creating the state directory (glibc mkdir on x86_64)"),
    allow!(SYS_mkdirat, "creating the state directory"),
    // --- Time and randomness ---
    allow!(SYS_clock_gettime, "Instant/SystemTime when the vDSO is unavailable"),
    allow!(SYS_clock_getres, "clock resolution (vDSO fallback)"),
    allow!(SYS_gettimeofday, "SystemTime fallback when the vDSO is unavailable"),
    allow!(SYS_nanosleep, "std::thread::sleep"),
    allow!(SYS_clock_nanosleep, "std::thread::sleep (glibc 2.31+ nanosleep)"),
    allow!(SYS_getrandom,
        "HashMap seeds, tokio's scheduler RNG, mimalloc secure-mode cookies, tokens"),
];

/// What networking adds, only when `config.toml` names a remote backend (OpenBao / Vault): a
/// daemon with only the local vault keeps `connect` and internet sockets forbidden.
///
/// `connect` cannot be limited to the backend's address (seccomp cannot read the sockaddr it
/// points to), so this list is the price of a remote backend, reviewed here. Name resolution
/// goes through glibc's `getaddrinfo` (files, then DNS over UDP): covered by the same entries
/// plus `openat`/`read` of /etc/hosts, /etc/resolv.conf, already allowed.
#[rustfmt::skip]
pub const DAEMON_NETWORK_ALLOWLIST: &[Allowed] = &[
    allow!(SYS_socket if [ArgIs::Eq(0, libc::AF_INET as u32)],
        "HTTP(S) to an IPv4 backend (TCP); DNS queries (UDP)"),
    allow!(SYS_socket if [ArgIs::Eq(0, libc::AF_INET6 as u32)],
        "HTTP(S) to an IPv6 backend (TCP); DNS queries (UDP)"),
    allow!(SYS_connect, "connecting to the backend, and to the DNS server (UDP connect)"),
    allow!(SYS_setsockopt, "TCP_NODELAY / keep-alive on backend connections"),
    allow!(SYS_getpeername, "hyper records the connected peer's address"),
    allow!(SYS_sendmmsg, "glibc's resolver sends the A and AAAA queries together"),
    allow!(SYS_uname, "glibc's resolver reads the host name for its default search domain"),
    allow!(SYS_ioctl if [ArgIs::Eq(1, libc::FIONREAD as u32)],
        "glibc's resolver asks how large a DNS answer waiting on its UDP socket is"),
];

/// What a backend on a unix socket adds (`address = "unix:///..."`, and no internet backend):
/// `connect`, and nothing else (`socket(AF_UNIX)`, `getsockopt(SO_PEERCRED)` and the reads and
/// writes are on the base list). Internet sockets stay forbidden.
///
/// `connect` cannot be limited to the backend's socket (seccomp cannot read the address): a
/// compromised daemon with such a backend can connect to any unix socket it may open.
#[rustfmt::skip]
pub const DAEMON_UNIX_BACKEND_ALLOWLIST: &[Allowed] = &[
    allow!(SYS_connect,
        "connecting to an OpenBao/Vault backend's unix socket (listener \"unix\"), whose owner, \
         directories and SO_PEERCRED the daemon checks before sending"),
];

/// What network listeners add (`[daemon] listen = ["tls://..."]`, for remote agents): the
/// listening sockets are bound before the sandbox and accepted with `accept4` (base list); the
/// accepted TCP connections get `TCP_NODELAY` (request and answer are one small message each).
/// Nothing else: no `socket`, no `connect`, no `bind` or `listen` after the sandbox.
#[rustfmt::skip]
pub const DAEMON_LISTEN_ALLOWLIST: &[Allowed] = &[
    allow!(SYS_setsockopt if [ArgIs::Eq(1, libc::IPPROTO_TCP as u32),
                              ArgIs::Eq(2, libc::TCP_NODELAY as u32)],
        "TCP_NODELAY on connections accepted from a network listener"),
];

/// The syscalls of the credential-injecting proxy (`agentkeys-proxy`, a process of its own forked
/// by the daemon before its sandbox), once its filter is installed; everything else kills it.
///
/// It is a network server and client, so it has internet sockets and `connect` (which seccomp
/// cannot limit to an address); what it does not have is what a compromised proxy would want
/// next: no `execve`, no `fork`, no file writes (`openat` only without any write or create
/// flag), no renames, unlinks, `chmod`, `mkdir`, no new secret memory of its own (it maps the
/// pages the daemon sends), no `ptrace`, no `bind`/`listen` (its listener is bound before the
/// filter).
#[rustfmt::skip]
pub const PROXY_ALLOWLIST: &[Allowed] = &[
    // --- Threads and synchronisation (tokio's workers and blocking pool) ---
    allow!(SYS_clone3,
        "allowed here only so that DAEMON_ENOSYS's answer stands (glibc falls back to clone)"),
    allow!(SYS_clone if [ArgIs::AllSet(0, libc::CLONE_THREAD as u64)],
        "threads only (CLONE_THREAD), no fork"),
    allow!(SYS_futex, "locks, condition variables, tokio's parking"),
    allow!(SYS_set_robust_list, "glibc registers each new thread's robust mutex list"),
    allow!(SYS_rseq, "glibc registers restartable sequences for each new thread"),
    allow!(SYS_sched_yield, "spin loops and tokio's back-off"),
    allow!(SYS_sched_getaffinity, "tokio sizes its pools from available_parallelism"),
    allow!(SYS_getcpu, "mimalloc picks a new thread's NUMA node"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_access, "mimalloc's NUMA probe on the first new thread"),
    allow!(SYS_faccessat, "mimalloc's NUMA probe (aarch64)"),
    allow!(SYS_faccessat2, "glibc's faccessat() with flags"),
    allow!(SYS_exit, "a thread ending (tokio's blocking pool)"),
    allow!(SYS_exit_group, "process exit"),
    allow!(SYS_restart_syscall, "a sleep or futex wait resumed after a signal"),
    // --- Memory ---
    allow!(SYS_brk, "glibc's own malloc beneath the Rust allocator (the resolver)"),
    allow!(SYS_mmap, "mimalloc, thread stacks, mapping the secret pages the daemon sends"),
    allow!(SYS_munmap, "mimalloc, thread stacks, unmapping secret pages"),
    allow!(SYS_mremap, "glibc malloc's realloc of large chunks"),
    allow!(SYS_mprotect, "mimalloc guard pages, thread-stack guards"),
    allow!(SYS_madvise, "mimalloc returns memory; MADV_DONTDUMP on mapped fallback pages"),
    allow!(SYS_mlock, "a mapped fallback secret page stays out of swap"),
    allow!(SYS_munlock, "releasing it"),
    // --- Signals ---
    allow!(SYS_rt_sigaction, "std and glibc install their handlers"),
    allow!(SYS_rt_sigprocmask, "glibc masks signals around thread creation and in abort()"),
    allow!(SYS_rt_sigreturn, "returning from a signal handler"),
    allow!(SYS_sigaltstack, "std's stack-overflow reporting on every thread"),
    allow!(SYS_tgkill if [ArgIs::OwnTgid(0)],
        "abort() and panic=abort: only to the proxy's own threads"),
    allow!(SYS_getpid, "abort()/raise, logging"),
    allow!(SYS_gettid, "abort()/raise, glibc's thread bookkeeping"),
    allow!(SYS_getuid, "glibc's resolver and NSS"),
    allow!(SYS_geteuid, "glibc's resolver and NSS"),
    allow!(SYS_prctl if [ArgIs::Eq(0, libc::PR_SET_NAME as u32)], "std names threads"),
    allow!(SYS_prctl if [ArgIs::Eq(0, PR_SET_VMA)], "mimalloc names its arenas"),
    allow!(SYS_prlimit64 if [ArgIs::Eq(0, 0), ArgIs::Zero(2)], "reading limits, never setting"),
    allow!(SYS_getcwd, "std's panic hook"),
    // --- Event loop ---
    allow!(SYS_epoll_create1, "tokio: epoll reactor"),
    allow!(SYS_epoll_ctl, "tokio: registering sockets"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_epoll_wait, "tokio: the reactor wait (x86_64)"),
    allow!(SYS_epoll_pwait, "tokio: the reactor wait"),
    allow!(SYS_eventfd2, "tokio: the reactor's waker"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_poll, "glibc's resolver waits for DNS answers"),
    allow!(SYS_ppoll, "glibc's resolver (aarch64)"),
    // --- Sockets: clients, upstream servers, DNS, the daemon link ---
    allow!(SYS_socket if [ArgIs::Eq(0, libc::AF_INET as u32)],
        "TCP to upstream servers; UDP for DNS"),
    allow!(SYS_socket if [ArgIs::Eq(0, libc::AF_INET6 as u32)],
        "TCP to upstream servers; UDP for DNS (IPv6)"),
    allow!(SYS_socket if [ArgIs::Eq(0, libc::AF_UNIX as u32),
                          ArgIs::MaskedEq(1, SOCK_TYPE_MASK, libc::SOCK_STREAM as u64)],
        "glibc's NSS may ask nscd over a unix stream socket; never a datagram socket"),
    allow!(SYS_socketpair if [ArgIs::Eq(0, libc::AF_UNIX as u32),
                              ArgIs::MaskedEq(1, SOCK_TYPE_MASK, libc::SOCK_STREAM as u64)],
        "tokio's signal driver makes a stream socketpair when the runtime starts"),
    allow!(SYS_connect, "upstream servers, DNS servers (cannot be limited to an address)"),
    allow!(SYS_accept4, "accepting clients on the listener bound before the filter"),
    allow!(SYS_setsockopt, "TCP_NODELAY on client and upstream connections"),
    allow!(SYS_getsockopt, "SO_ERROR after a non-blocking connect"),
    allow!(SYS_getpeername, "the connected peer's address"),
    allow!(SYS_getsockname, "the local address"),
    allow!(SYS_shutdown, "half-closing a tunnel"),
    allow!(SYS_recvmsg, "the daemon link (secret-page fds with SCM_RIGHTS), DNS"),
    allow!(SYS_sendmsg, "the daemon link, DNS"),
    allow!(SYS_recvfrom, "recv() on sockets, DNS answers"),
    allow!(SYS_sendto, "send() on sockets"),
    allow!(SYS_sendmmsg, "glibc's resolver sends the A and AAAA queries together"),
    allow!(SYS_uname, "glibc's resolver reads the host name"),
    allow!(SYS_ioctl if [ArgIs::Eq(1, libc::FIONREAD as u32)], "glibc's resolver: answer size"),
    allow!(SYS_ioctl if [ArgIs::Eq(1, libc::FIONBIO as u32)], "set_nonblocking"),
    allow!(SYS_ioctl if [ArgIs::Eq(1, libc::FIOCLEX as u32)], "CLOEXEC on some fds"),
    allow!(SYS_ioctl if [ArgIs::Eq(1, libc::TCGETS as u32)], "isatty() before log output"),
    // --- File descriptors, and reading (never writing) a few files ---
    allow!(SYS_read, "sockets; /etc/hosts and /etc/resolv.conf for the resolver"),
    allow!(SYS_write, "sockets; logs to stderr"),
    allow!(SYS_readv, "vectored reads"),
    allow!(SYS_writev, "vectored writes (rustls, logging)"),
    allow!(SYS_lseek, "stdio reading the resolver's files"),
    allow!(SYS_close, "every fd"),
    allow!(SYS_fcntl, "CLOEXEC/NONBLOCK flags; F_GET_SEALS on a received fallback page"),
    allow!(SYS_openat if [ArgIs::NoneSet(2, (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT
                                            | libc::O_TRUNC | libc::O_APPEND) as u64)],
        "read-only opens: the resolver's /etc files, mimalloc's /sys probe; no write, create, \
         truncate or append flag, so the proxy can change no file"),
    allow!(SYS_fstat, "metadata of an open file; checking a received secret page"),
    allow!(SYS_fstatfs, "checking a received secret page is memfd_secret or a memfd"),
    allow!(SYS_newfstatat, "glibc's stat/fstat"),
    allow!(SYS_statx, "std::fs metadata"),
    // --- Time and randomness ---
    allow!(SYS_clock_gettime, "clocks when the vDSO is unavailable"),
    allow!(SYS_clock_getres, "clock resolution"),
    allow!(SYS_gettimeofday, "SystemTime fallback"),
    allow!(SYS_nanosleep, "sleeps"),
    allow!(SYS_clock_nanosleep, "sleeps (glibc 2.31+)"),
    allow!(SYS_getrandom, "TLS keys and nonces, placeholders in tests, hash seeds"),
];

/// Compiles and installs the proxy's filters ([`DAEMON_ENOSYS`] for `clone3`, then
/// [`PROXY_ALLOWLIST`]) on every thread of the calling process.
///
/// # Errors
/// [`SeccompError::Compile`] or [`SeccompError::Install`].
pub fn install_proxy_filter() -> Result<(), SeccompError> {
    let enosys = compile_enosys(DAEMON_ENOSYS)?;
    let allow = compile(PROXY_ALLOWLIST)?;
    apply_all_threads(&enosys)?;
    apply_all_threads(&allow)
}

/// Which outward connections the daemon's filter allows: decided by the configured backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// Only the local vault: no `connect` at all.
    #[default]
    Off,
    /// Backends on unix sockets only: [`DAEMON_UNIX_BACKEND_ALLOWLIST`].
    Unix,
    /// An `https://` (or `http://`) backend: [`DAEMON_NETWORK_ALLOWLIST`] (which has `connect`,
    /// so unix-socket backends work beside it).
    Inet,
}

/// `false` is [`Network::Off`], `true` [`Network::Inet`] (the meaning the flag had before
/// unix-socket backends).
impl From<bool> for Network {
    fn from(network: bool) -> Network {
        if network { Network::Inet } else { Network::Off }
    }
}

impl Network {
    /// The extra list this setting installs beside [`DAEMON_ALLOWLIST`].
    pub fn extra(self) -> &'static [Allowed] {
        match self {
            Network::Off => &[],
            Network::Unix => DAEMON_UNIX_BACKEND_ALLOWLIST,
            Network::Inet => DAEMON_NETWORK_ALLOWLIST,
        }
    }
}

/// Compiles an allowlist into a BPF program for the running architecture: a listed syscall is
/// allowed (when its argument conditions hold), anything else kills the process.
///
/// Entries with the same number are alternatives; an unconditional one makes the others moot.
///
/// # Errors
/// [`SeccompError::Compile`] if the architecture is unsupported or the program too long.
pub fn compile(list: &[Allowed]) -> Result<BpfProgram, SeccompError> {
    let compile_err = |e: seccompiler::BackendError| SeccompError::Compile(e.into());
    // `None` is "every call", `Some(rules)` "any one of these rules".
    let mut by_nr: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for entry in list {
        let slot = by_nr.entry(entry.nr).or_insert_with(|| Some(Vec::new()));
        if entry.only_if.is_empty() {
            *slot = None;
        } else if let Some(rules) = slot {
            rules.push(rule(entry.only_if).map_err(compile_err)?);
        }
    }
    let rules = by_nr
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(compile_err)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(compile_err)?;
    filter.try_into().map_err(compile_err)
}

/// The seccompiler rule for one entry's conditions (all of which must hold).
fn rule(conds: &[ArgIs]) -> Result<SeccompRule, seccompiler::BackendError> {
    let cond = |c: &ArgIs| match *c {
        // Dword: only the low half is compared, the upper half of an int register is garbage.
        ArgIs::Eq(i, v) => {
            SeccompCondition::new(i, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v.into())
        }
        ArgIs::AllSet(i, m) => {
            SeccompCondition::new(i, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(m), m)
        }
        ArgIs::NoneSet(i, m) => {
            SeccompCondition::new(i, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(m), 0)
        }
        ArgIs::Zero(i) => SeccompCondition::new(i, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0),
        ArgIs::MaskedEq(i, m, v) => {
            SeccompCondition::new(i, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(m), v)
        }
        // A pid is an int: its low 32 bits.
        ArgIs::OwnTgid(i) => SeccompCondition::new(
            i,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(std::process::id()),
        ),
    };
    SeccompRule::new(conds.iter().map(cond).collect::<Result<_, _>>()?)
}

/// Installs `prog` on every thread of the process (`SECCOMP_FILTER_FLAG_TSYNC`), after setting
/// `no_new_privs`. Irreversible.
///
/// # Errors
/// [`SeccompError::Install`] if the kernel refuses the program, or a thread cannot be
/// synchronised (it already has a filter this one does not extend).
pub fn apply_all_threads(prog: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter_all_threads(prog).map_err(SeccompError::Install)
}

/// Syscalls the daemon is told do not exist (ENOSYS) rather than allowed or killed.
///
/// `clone3` passes its flags in memory, where seccomp cannot look, so allowing it would allow
/// `fork`. glibc treats ENOSYS from `clone3` as "old kernel" and creates the thread with
/// `clone`, whose flags [`DAEMON_ALLOWLIST`] does check (`CLONE_THREAD` required).
#[rustfmt::skip]
pub const DAEMON_ENOSYS: &[Allowed] = &[
    allow!(SYS_clone3, "flags unreadable by seccomp: force glibc's fallback to the checked clone"),
];

/// Compiles a list whose calls all fail with ENOSYS; everything else is allowed (by this
/// program: the allowlist, installed beside it, still decides).
///
/// # Errors
/// [`SeccompError::Compile`] if the architecture is unsupported.
pub fn compile_enosys(list: &[Allowed]) -> Result<BpfProgram, SeccompError> {
    let compile_err = |e: seccompiler::BackendError| SeccompError::Compile(e.into());
    let rules = list.iter().map(|e| (e.nr, Vec::new())).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(compile_err)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(compile_err)?;
    filter.try_into().map_err(compile_err)
}

/// A condition in words, for the policy document.
fn describe_condition(c: &ArgIs) -> String {
    match *c {
        ArgIs::Eq(i, v) => format!("arg{i} == {v:#x}"),
        ArgIs::AllSet(i, m) => format!("arg{i} has all of {m:#x}"),
        ArgIs::NoneSet(i, m) => format!("arg{i} has none of {m:#x}"),
        ArgIs::Zero(i) => format!("arg{i} == NULL"),
        ArgIs::MaskedEq(i, m, v) => format!("arg{i} & {m:#x} == {v:#x}"),
        ArgIs::OwnTgid(i) => format!("arg{i} == the daemon's own pid"),
    }
}

/// The daemon's seccomp policy as a Markdown document: every list, every entry with its
/// conditions and its reason. `docs/seccomp-policy.md` is this text for x86_64, and a unit test
/// fails when the two differ, so the documented policy is the installed one (regenerate with
/// `AGENTKEYS_BLESS=1 cargo test -p agentkeys-hardening seccomp_policy_doc_is_current`).
pub fn policy_markdown() -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# agentkeysd's seccomp policy ({})\n\n\
         Generated from `crates/hardening/src/seccomp.rs` by `seccomp::policy_markdown()`; the \
         unit test `seccomp_policy_doc_is_current` fails when this file and the filter differ. \
         Anything not listed kills the daemon (`SECCOMP_RET_KILL_PROCESS`). Several rows for one \
         syscall are alternatives; a row's conditions must all hold. Arguments count from 0.\n",
        std::env::consts::ARCH
    );
    let lists: [(&str, &str, &[Allowed]); 6] = [
        (
            "Answered with ENOSYS (a first filter)",
            "These calls fail with `ENOSYS` whatever the allowlist says.",
            DAEMON_ENOSYS,
        ),
        (
            "Always allowed (`DAEMON_ALLOWLIST`)",
            "The daemon's whole syscall surface without a remote backend.",
            DAEMON_ALLOWLIST,
        ),
        (
            "Added when every remote backend is on a unix socket (`DAEMON_UNIX_BACKEND_ALLOWLIST`)",
            "`connect` cannot be limited to the backend's socket: with it, a compromised daemon \
             can connect to any unix socket it may open.",
            DAEMON_UNIX_BACKEND_ALLOWLIST,
        ),
        (
            "Added when a backend is reached over TCP (`DAEMON_NETWORK_ALLOWLIST`)",
            "`connect` cannot be limited to the backend's address: with these, a compromised \
             daemon can connect anywhere.",
            DAEMON_NETWORK_ALLOWLIST,
        ),
        (
            "Added when a network listener is configured (`DAEMON_LISTEN_ALLOWLIST`)",
            "The listening sockets are bound before the sandbox; accepting uses `accept4` from the \
             base list. A `kind = \"agentkeys\"` backend (the client side) uses \
             `DAEMON_NETWORK_ALLOWLIST` instead.",
            DAEMON_LISTEN_ALLOWLIST,
        ),
        (
            "The credential-injecting proxy's own process (`PROXY_ALLOWLIST`)",
            "Not the daemon's filter: the proxy (forked before the daemon's sandbox) installs this \
             one on itself, beside the same ENOSYS program. It has internet sockets and \
             `connect`, but no `execve`, no `fork`, no file it can write.",
            PROXY_ALLOWLIST,
        ),
    ];
    for (title, note, list) in lists {
        let _ = writeln!(out, "## {title}\n\n{note}\n");
        let _ = writeln!(out, "| syscall | only if | why |\n|---|---|---|");
        for e in list {
            let only = if e.only_if.is_empty() {
                "always".to_string()
            } else {
                e.only_if
                    .iter()
                    .map(describe_condition)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let why = e.why.split_whitespace().collect::<Vec<_>>().join(" ");
            let _ = writeln!(out, "| `{}` | {only} | {why} |", e.name);
        }
        out.push('\n');
    }
    out
}

/// The daemon's two programs. The kernel runs every installed filter and the most severe
/// answer wins (kill > errno > allow): the ENOSYS program turns `clone3` into ENOSYS although
/// the allowlist allows it, and the allowlist kills anything it does not list.
pub struct DaemonFilter {
    enosys: BpfProgram,
    allow: BpfProgram,
}

impl DaemonFilter {
    /// Compiles [`DAEMON_ENOSYS`] and [`DAEMON_ALLOWLIST`], plus what `network` needs
    /// ([`Network::extra`]: nothing, `connect` for unix-socket backends, or
    /// [`DAEMON_NETWORK_ALLOWLIST`]). `false`/`true` still mean off/internet.
    ///
    /// # Errors
    /// [`SeccompError::Compile`].
    pub fn compile(network: impl Into<Network>) -> Result<DaemonFilter, SeccompError> {
        DaemonFilter::compile_with(network, false)
    }

    /// [`DaemonFilter::compile`], plus [`DAEMON_LISTEN_ALLOWLIST`] when `listen` (the daemon
    /// serves network listeners).
    ///
    /// # Errors
    /// [`SeccompError::Compile`].
    pub fn compile_with(
        network: impl Into<Network>,
        listen: bool,
    ) -> Result<DaemonFilter, SeccompError> {
        let extra = network.into().extra();
        let listen: &[Allowed] = if listen { DAEMON_LISTEN_ALLOWLIST } else { &[] };
        let allow = if extra.is_empty() && listen.is_empty() {
            compile(DAEMON_ALLOWLIST)?
        } else {
            let all: Vec<Allowed> = DAEMON_ALLOWLIST
                .iter()
                .chain(extra)
                .chain(listen)
                .copied()
                .collect();
            compile(&all)?
        };
        Ok(DaemonFilter {
            enosys: compile_enosys(DAEMON_ENOSYS)?,
            allow,
        })
    }

    /// Installs both programs on all threads. The ENOSYS one goes first: once the allowlist is
    /// in place, `seccomp(2)` itself is no longer allowed.
    ///
    /// # Errors
    /// [`SeccompError::Install`].
    pub fn install(&self) -> Result<(), SeccompError> {
        apply_all_threads(&self.enosys)?;
        apply_all_threads(&self.allow)
    }
}

/// Compiles the daemon's filters and installs them on all threads: the last hardening step of
/// `agentkeysd` before its runtime starts.
///
/// # Errors
/// The step that failed, [`SeccompError::Compile`] or [`SeccompError::Install`].
pub fn install_daemon_filter(network: impl Into<Network>) -> Result<(), SeccompError> {
    DaemonFilter::compile(network)?.install()
}

/// [`install_daemon_filter`] with [`DAEMON_LISTEN_ALLOWLIST`] added when `listen`.
///
/// # Errors
/// As [`install_daemon_filter`].
pub fn install_daemon_filter_with(
    network: impl Into<Network>,
    listen: bool,
) -> Result<(), SeccompError> {
    DaemonFilter::compile_with(network, listen)?.install()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    use std::collections::HashSet;

    /// Exit code of a child whose filter did not install (distinct from the bodies' codes).
    const INSTALL_FAILED: i32 = 99;

    /// Runs `body` in a forked child under `prog` and returns how the child ended. The program is
    /// compiled by the caller, before the fork: the test harness is multi-threaded, so the child
    /// must not allocate (another thread may have held the allocator's lock at the fork).
    fn run_filtered(filter: &DaemonFilter, body: fn() -> i32) -> WaitStatus {
        // SAFETY: the child only makes raw syscalls (prctl, seccomp, the body's) and `_exit`s;
        // it touches no lock, allocator or stdio that another thread might have held.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                // No core file for the SIGSYS death we expect.
                let _ = nix::sys::prctl::set_dumpable(false);
                let code = match filter.install() {
                    Ok(()) => body(),
                    Err(_) => INSTALL_FAILED,
                };
                // SAFETY: `_exit` ends the child without running the parent's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    fn daemon_filter() -> DaemonFilter {
        DaemonFilter::compile(false).expect("the daemon filters compile")
    }

    fn assert_sigsys(status: WaitStatus) {
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "expected death by SIGSYS, got {status:?}"
        );
    }

    /// The proxy's two programs, as `install_proxy_filter` installs them.
    fn proxy_filter() -> DaemonFilter {
        DaemonFilter {
            enosys: compile_enosys(DAEMON_ENOSYS).expect("enosys"),
            allow: compile(PROXY_ALLOWLIST).expect("the proxy filter compiles"),
        }
    }

    #[test]
    fn the_proxy_filter_kills_execve_fork_ptrace_and_writes() {
        assert_sigsys(run_filtered(&proxy_filter(), || {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and argv/envp arrays that outlive the call.
            unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
            0
        }));
        assert_sigsys(run_filtered(&proxy_filter(), || {
            // SAFETY: a fork spelled as clone(SIGCHLD); the grandchild, if any, exits at once.
            let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            if pid == 0 {
                // SAFETY: ends the unexpected grandchild without running any Rust code.
                unsafe { libc::_exit(0) };
            }
            0
        }));
        assert_sigsys(run_filtered(&proxy_filter(), || {
            // SAFETY: PTRACE_TRACEME takes no pointers.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            0
        }));
        for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_CREAT] {
            let status = run_filtered_with(&proxy_filter(), flags, |flags| {
                // SAFETY: a NUL-terminated path literal and integer flags.
                unsafe {
                    libc::openat(
                        libc::AT_FDCWD,
                        c"/tmp/ak-proxy-filter".as_ptr(),
                        flags,
                        0o600,
                    )
                };
                0
            });
            assert_sigsys(status);
        }
    }

    #[test]
    fn the_proxy_filter_allows_sockets_and_reading() {
        let status = run_filtered(&proxy_filter(), || {
            // SAFETY: socket takes no pointers; openat gets a NUL-terminated literal.
            unsafe {
                let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if s < 0 {
                    return 1;
                }
                libc::close(s);
                let f = libc::openat(
                    libc::AT_FDCWD,
                    c"/etc/hosts".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                );
                if f < 0 {
                    return 2;
                }
                libc::close(f);
            }
            0
        });
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    }

    /// [`run_filtered`] with an argument for the body.
    fn run_filtered_with(filter: &DaemonFilter, arg: i32, body: fn(i32) -> i32) -> WaitStatus {
        // SAFETY: as in `run_filtered`.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let _ = nix::sys::prctl::set_dumpable(false);
                let code = match filter.install() {
                    Ok(()) => body(arg),
                    Err(_) => INSTALL_FAILED,
                };
                // SAFETY: `_exit` ends the child without running the parent's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    #[test]
    fn forbidden_syscall_kills() {
        assert_sigsys(run_filtered(&daemon_filter(), || {
            // SAFETY: PTRACE_TRACEME takes no pointers; it never returns under the filter.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            0
        }));
    }

    #[test]
    fn allowed_syscalls_survive() {
        let status = run_filtered(&daemon_filter(), || {
            let mut fds = [0; 2];
            // SAFETY: raw syscalls on a local array and a fresh anonymous mapping that is
            // unmapped before return; no Rust object aliases any of it.
            unsafe {
                if libc::getpid() <= 0 || libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                    return 1;
                }
                if libc::write(fds[1], b"x".as_ptr().cast(), 1) != 1 {
                    return 2;
                }
                let (prot, flags) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE);
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    prot,
                    flags | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED || libc::munmap(p, 4096) != 0 {
                    return 3;
                }
                let unix =
                    libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
                if unix < 0 || libc::close(unix) != 0 {
                    return 4;
                }
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_CORE, &mut lim) != 0 {
                    return 5;
                }
                // Its result depends on the kernel (ENOSYS unless secretmem is enabled);
                // reaching the next line is what counts.
                let fd = libc::syscall(libc::SYS_memfd_secret, 0);
                if fd >= 0 {
                    libc::close(fd as i32);
                }
            }
            0
        });
        assert_eq!(status, WaitStatus::Exited(status.pid().expect("pid"), 0));
    }

    #[test]
    fn clone3_is_enosys_and_threads_still_start() {
        let status = run_filtered(&daemon_filter(), || {
            // SAFETY: clone3 with a null args pointer; under the filter it never runs.
            let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            if r != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
                return 1;
            }
            // glibc falls back to clone(CLONE_THREAD | ...), which the allowlist admits.
            match std::thread::spawn(|| 7).join() {
                Ok(7) => 0,
                _ => 2,
            }
        });
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    }

    #[test]
    fn execve_is_killed() {
        assert_sigsys(run_filtered(&daemon_filter(), || {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and argv/envp arrays that outlive the call.
            unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
            0
        }));
    }

    #[test]
    fn fork_through_clone_is_killed() {
        assert_sigsys(run_filtered(&daemon_filter(), || {
            // A fork spelled as clone(SIGCHLD): no CLONE_THREAD, so the filter must refuse it.
            // SAFETY: with a null stack the child (if any) continues here and exits at once.
            let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            if pid == 0 {
                // SAFETY: ends the unexpected grandchild without running any Rust code.
                unsafe { libc::_exit(0) };
            }
            0
        }));
    }

    #[test]
    fn inet_socket_is_killed() {
        assert_sigsys(run_filtered(&daemon_filter(), || {
            // SAFETY: socket takes no pointers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            0
        }));
    }

    #[test]
    fn network_list_allows_inet_sockets_and_connect_only_when_asked() {
        let with_net = DaemonFilter::compile(true).expect("compile");
        let code = run_filtered(&with_net, || {
            // SAFETY: socket takes no pointers; the fd is closed below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                return 1;
            }
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 9u16.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `addr` is a valid sockaddr_in that outlives the call. Refused (nothing
            // listens on port 9) is fine: the point is that the call is not killed.
            unsafe {
                libc::connect(
                    fd,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                libc::close(fd);
            }
            0
        });
        assert!(
            matches!(code, WaitStatus::Exited(_, 0)),
            "with the network list, socket+connect must be allowed: {code:?}"
        );
        // Without it, connect stays forbidden (AF_UNIX socket first, which is allowed).
        assert_sigsys(run_filtered(&daemon_filter(), || {
            // SAFETY: socket takes no pointers; connect with a null address never gets far.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::connect(fd, std::ptr::null(), 0);
            }
            0
        }));
        // Raw and packet sockets stay forbidden either way.
        assert_sigsys(run_filtered(&with_net, || {
            // SAFETY: socket takes no pointers.
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            0
        }));
    }

    /// A unix-socket backend gets `connect` (to a unix socket: here a listener of our own) but
    /// still no internet socket.
    #[test]
    fn unix_backend_list_allows_connect_but_no_inet_socket() {
        let dir = std::env::temp_dir().join(format!("ak-seccomp-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        // The address is built before the fork: the child must not allocate.
        let mut addr = libc::sockaddr_un {
            sun_family: libc::AF_UNIX as libc::sa_family_t,
            sun_path: [0; 108],
        };
        for (d, s) in addr
            .sun_path
            .iter_mut()
            .zip(path.as_os_str().as_encoded_bytes())
        {
            *d = *s as libc::c_char;
        }
        static ADDR: std::sync::OnceLock<libc::sockaddr_un> = std::sync::OnceLock::new();
        let _ = ADDR.set(addr);
        let unix = DaemonFilter::compile(Network::Unix).expect("compile");
        let status = run_filtered(&unix, || {
            let Some(addr) = ADDR.get() else { return 1 };
            // SAFETY: socket takes no pointers; `addr` is a valid sockaddr_un in a static that
            // outlives the call; the fd is closed below.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    return 2;
                }
                let r = libc::connect(
                    fd,
                    (addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                );
                libc::close(fd);
                if r != 0 {
                    return 3;
                }
            }
            0
        });
        assert!(
            matches!(status, WaitStatus::Exited(_, 0)),
            "connect to a unix socket under Network::Unix: {status:?}"
        );
        assert_sigsys(run_filtered(&unix, || {
            // SAFETY: socket takes no pointers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            0
        }));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn setrlimit_is_killed() {
        assert_sigsys(run_filtered(&daemon_filter(), || {
            let lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `lim` outlives the call; lowering a limit is harmless if it got through.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
            0
        }));
    }

    #[test]
    fn every_entry_has_a_reason() {
        // Every list that is installed together with the base list.
        for network in [Network::Off, Network::Unix, Network::Inet] {
            entries_have_reasons_and_no_duplicates(network.extra());
            // A daemon may serve network listeners with any kind of backend.
            assert!(DaemonFilter::compile_with(network, true).is_ok());
        }
        entries_have_reasons_and_no_duplicates(DAEMON_LISTEN_ALLOWLIST);
    }

    fn entries_have_reasons_and_no_duplicates(extra: &[Allowed]) {
        let both: Vec<Allowed> = DAEMON_ALLOWLIST.iter().chain(extra).copied().collect();
        let mut seen = HashSet::new();
        for e in &both {
            assert!(
                !e.name.is_empty() && !e.why.trim().is_empty(),
                "{} needs a reason",
                e.name
            );
            assert!(seen.insert((e.nr, e.only_if)), "{} is listed twice", e.name);
        }
        // A number appears more than once only as alternative conditions, never beside an
        // unconditional entry that would make them moot (in either list, or across them).
        for e in both.iter().filter(|e| e.only_if.is_empty()) {
            let n = both.iter().filter(|o| o.nr == e.nr).count();
            assert_eq!(
                n, 1,
                "{} is allowed outright and also listed with conditions",
                e.name
            );
        }
        for e in &both {
            let same_name = both.iter().find(|o| o.name == e.name).unwrap();
            assert_eq!(same_name.nr, e.nr, "{} names two numbers", e.name);
        }
    }

    /// Issue 14, item 9: `tgkill` reaches the daemon's own threads only, never another process
    /// (it used to be allowed for any target, so a compromised daemon could kill any same-uid
    /// process).
    #[test]
    fn tgkill_only_reaches_the_own_thread_group() {
        // The filter must carry the pid of the process that installs it: compiled in the child.
        let own = crate::testutil::in_child(|| {
            let Ok(f) = DaemonFilter::compile(false) else {
                return 2;
            };
            if f.install().is_err() {
                return INSTALL_FAILED;
            }
            // SAFETY: signal 0 to our own thread: checks permission, sends nothing.
            let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) };
            if r == 0 { 0 } else { 1 }
        });
        assert!(matches!(own, WaitStatus::Exited(_, 0)), "{own:?}");
        let parent = std::process::id() as i32;
        let other = crate::testutil::in_child(move || {
            let Ok(f) = DaemonFilter::compile(false) else {
                return 2;
            };
            if f.install().is_err() {
                return INSTALL_FAILED;
            }
            // SAFETY: signal 0 (nothing is sent) to the test process, another thread group.
            unsafe { libc::syscall(libc::SYS_tgkill, parent, parent, 0) };
            0
        });
        assert_sigsys(other);
    }

    /// Issue 14, item 9: no unix datagram socket can be made, so `sendto`/`sendmsg` cannot
    /// reach a datagram socket by path (journald's, another program's); stream and seqpacket
    /// sockets still work.
    #[test]
    fn unix_datagram_sockets_are_killed() {
        for kind in [libc::SOCK_STREAM, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC] {
            let st = crate::testutil::in_child(move || {
                let Ok(f) = DaemonFilter::compile(false) else {
                    return 2;
                };
                if f.install().is_err() {
                    return INSTALL_FAILED;
                }
                // SAFETY: socket and close take integers only.
                let fd = unsafe { libc::socket(libc::AF_UNIX, kind, 0) };
                // SAFETY: as above.
                if fd < 0 || unsafe { libc::close(fd) } != 0 {
                    return 1;
                }
                0
            });
            assert!(matches!(st, WaitStatus::Exited(_, 0)), "{kind}: {st:?}");
        }
        assert_sigsys(run_filtered(&daemon_filter(), || {
            // SAFETY: socket takes integers only.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            0
        }));
        assert_sigsys(run_filtered(&daemon_filter(), || {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid array of two ints for the call.
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) };
            0
        }));
    }

    /// The documented policy is the installed one: `docs/seccomp-policy.md` is generated from
    /// these lists (x86_64), and the threat model points to it.
    #[test]
    fn seccomp_policy_doc_is_current() {
        if std::env::consts::ARCH != "x86_64" {
            eprintln!(
                "SKIP seccomp_policy_doc_is_current: docs/seccomp-policy.md describes x86_64"
            );
            return;
        }
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/seccomp-policy.md");
        let want = policy_markdown();
        if std::env::var_os("AGENTKEYS_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/seccomp-policy.md differs from the filter: run `AGENTKEYS_BLESS=1 cargo test -p \
             agentkeys-hardening seccomp_policy_doc_is_current` and review the diff"
        );
        for e in DAEMON_ALLOWLIST
            .iter()
            .chain(DAEMON_NETWORK_ALLOWLIST)
            .chain(DAEMON_UNIX_BACKEND_ALLOWLIST)
        {
            assert!(have.contains(&format!("`{}`", e.name)), "{}", e.name);
        }
    }

    #[test]
    fn dangerous_syscalls_are_absent() {
        let denied = [
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_kexec_load,
            libc::SYS_mount,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_connect,
            libc::SYS_kill,
            libc::SYS_setns,
            libc::SYS_unshare,
        ];
        for nr in denied {
            let hit = DAEMON_ALLOWLIST.iter().find(|e| e.nr == nr);
            assert!(hit.is_none(), "{} must not be allowed", hit.unwrap().name);
        }
    }
}
