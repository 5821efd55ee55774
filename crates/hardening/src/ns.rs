//! The few raw operations `agentkeys jail` (crate `agentkeys-jail`) needs that have no safe
//! wrapper in `nix`: forking (checked single-threaded, also straight into new namespaces),
//! ending a process without destructors,
//! recursive mount attributes (`mount_setattr`), signal dispositions, and closing every
//! descriptor above 2 before `execve`.
//!
//! Everything else the jail does (unshare, mount, pivot_root, Landlock, seccomp) goes through
//! safe APIs in the jail crate itself; this module keeps its `unsafe` here, as STYLE.md asks.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;

use nix::unistd::Pid;

use crate::errno::cerr;

/// Which side of a fork this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The parent, with the child's pid.
    Parent(Pid),
    /// The child.
    Child,
}

/// Forks, refusing unless this process has exactly one thread: the child may then allocate
/// and take locks freely (no other thread can have held one at the fork).
///
/// # Errors
/// `EDEADLK`-style refusal (as [`io::ErrorKind::Other`]) when other threads exist; the fork's
/// OS error.
pub fn fork_single_threaded() -> io::Result<Forked> {
    let threads = crate::process::thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork safely: this process has {threads} threads"
        )));
    }
    // SAFETY: single-threaded (checked above), so the child inherits no lock held by another
    // thread and may allocate; both sides continue as ordinary Rust code.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// Like [`fork_single_threaded`], but the child starts in the new namespaces `flags` names
/// (`CLONE_NEWUSER`, `CLONE_NEWNS`, `CLONE_NEWPID`, ...; `clone(2)` with the namespace flags,
/// as bubblewrap does): with `CLONE_NEWPID` the child is pid 1 of the new PID namespace and
/// still the caller's own child, so no intermediate process is needed to enter it.
///
/// # Errors
/// Refusal when other threads exist; the clone's OS error (`EPERM`, `ENOSPC`, `EINVAL`:
/// namespaces refused or exhausted).
pub fn fork_into_namespaces(flags: libc::c_int) -> io::Result<Forked> {
    let ns_only = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    // Namespace flags only: CLONE_VM, CLONE_THREAD, CLONE_SETTLS... would break the
    // fork-like contract below.
    if flags & !ns_only != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let threads = crate::process::thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork safely: this process has {threads} threads"
        )));
    }
    // SAFETY: the raw clone system call with namespace flags only (checked above) and
    // SIGCHLD, no CLONE_VM and no new stack, is fork(2) into new namespaces: the child gets a
    // copy of the address space and continues on its copy of this stack. glibc's fork-time
    // bookkeeping does not run in the child; with a single thread (checked above) no lock
    // can be held by another thread, and nothing the child uses depends on the rest (the
    // thread id cached in glibc's thread descriptor keeps the parent's value; raise/abort ask
    // the kernel for the current one).
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_ulong::try_from(flags | libc::SIGCHLD).unwrap_or(0),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match r {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(
            i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?,
        ))),
    }
}

/// Ends this process now with `code`, without running destructors or atexit handlers (a
/// forked helper must not flush or drop what belongs to its parent).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes an integer and never returns.
    unsafe { libc::_exit(code) }
}

/// `MOUNT_ATTR_RDONLY`: read-only.
pub const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
/// `MOUNT_ATTR_NOSUID`: set-user-id and file capabilities ignored.
pub const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
/// `MOUNT_ATTR_NODEV`: device files unusable.
pub const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets mount attributes on `path`'s mount and every mount below it (`mount_setattr(2)` with
/// `AT_RECURSIVE`), in one step: unlike a remount per mount, attributes the kernel locked
/// (inherited from a more privileged namespace) are kept, and none can be missed.
///
/// # Errors
/// The OS error (`ENOSYS` before Linux 5.12).
pub fn mount_setattr_recursive(path: &Path, set: u64) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a NUL-terminated path, a valid mount_attr struct and its exact size.
    cerr(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            (libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW) as libc::c_uint,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// Ignores each signal in `sigs` (SIG_IGN). Ignored dispositions survive `execve`: reset them
/// with [`default_signals`] before starting a program.
pub fn ignore_signals(sigs: &[i32]) {
    for &sig in sigs {
        // SAFETY: setting a disposition to SIG_IGN takes integers only.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

/// Every signal back to its default disposition, and an empty signal mask: what a program
/// expects to start with.
pub fn default_signals() {
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
}

/// Closes every descriptor from `first` upwards except those in `keep`. Only for a process
/// about to `execve` or to live on without any Rust object owning those descriptors (a forked
/// helper): closing an fd a live object owns would leave it pointing at a reused number.
///
/// # Errors
/// The OS error.
pub fn close_fds_from(first: RawFd, keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd >= first as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = u32::try_from(first).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    for k in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if k > from {
            let last = if k == u32::MAX { u32::MAX } else { k - 1 };
            // SAFETY: closes a range of descriptors; per the contract above none is owned by
            // a live Rust object.
            cerr(unsafe { libc::close_range(from, last, 0) })?;
        }
        from = k.saturating_add(1);
    }
    Ok(())
}

/// Marks every descriptor from `first` upwards close-on-exec (nothing is closed now).
///
/// # Errors
/// The OS error.
pub fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: marks a range of descriptors close-on-exec; integer arguments only.
    cerr(unsafe { libc::close_range(first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) })?;
    Ok(())
}

/// `ioctl(fd, TIOCSTI, &c)`: pushes one byte into a terminal's input queue. Exists only so
/// the tests can show the jail's seccomp filter refuses it.
///
/// # Errors
/// The OS error (`EPERM` under the jail's filter, `EIO`/`EPERM` where `legacy_tiocsti` is 0).
pub fn tiocsti(fd: RawFd, byte: u8) -> io::Result<()> {
    // SAFETY: TIOCSTI reads one byte from a valid pointer; the fd is only an integer here.
    cerr(unsafe { libc::ioctl(fd, libc::TIOCSTI, &raw const byte) })?;
    Ok(())
}

/// The Landlock ABI version this kernel offers (`landlock_create_ruleset` with
/// `LANDLOCK_CREATE_RULESET_VERSION`).
///
/// # Errors
/// `ENOSYS` (not built in) or `EOPNOTSUPP` (built in, disabled at boot).
pub fn landlock_abi() -> io::Result<i32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: a NULL attribute pointer with size 0 and the VERSION flag only queries.
    let v = cerr(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    })?;
    i32::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Brings the loopback interface of this process's network namespace up
/// (`SIOCGIFFLAGS`/`SIOCSIFFLAGS` on `lo` with `IFF_UP`): a fresh network namespace has `lo`
/// down. Needs `CAP_NET_ADMIN` over the namespace (its user namespace's owner has it).
///
/// # Errors
/// The OS error.
pub fn loopback_up() -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket() takes integers and returns a new descriptor or -1.
    let fd =
        cerr(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket() and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS writes the flags into the `ifreq` we own, named `lo`.
    cerr(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) })?;
    // SAFETY: the union's `ifru_flags` member is the one SIOCGIFFLAGS filled in.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the `ifreq` we own and initialised above.
    cerr(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const req) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_refuses_with_threads() {
        // The test harness runs tests on threads of its own: more than one thread here.
        let n = crate::process::thread_count().unwrap();
        if n == 1 {
            println!("SKIP fork_refuses_with_threads: the harness runs single-threaded");
            return;
        }
        let e = fork_single_threaded().unwrap_err();
        assert!(e.to_string().contains("threads"), "{e}");
        let e = fork_into_namespaces(libc::CLONE_NEWUSER | libc::CLONE_NEWPID).unwrap_err();
        assert!(e.to_string().contains("threads"), "{e}");
    }

    #[test]
    fn fork_into_namespaces_takes_namespace_flags_only() {
        for bad in [
            libc::CLONE_VM,
            libc::CLONE_THREAD,
            libc::CLONE_FILES,
            libc::CLONE_SETTLS,
        ] {
            let e = fork_into_namespaces(libc::CLONE_NEWUSER | bad).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad:#x}: {e}");
        }
    }
}
