//! Test helpers: run a closure in a forked child, for anything that changes process state
//! (filters, prctl, capabilities) or is expected to die.

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};

/// Forks; the child runs `f` and `_exit`s with its return value (101 if it panicked); the
/// parent waits and returns how the child ended.
pub(crate) fn in_child(f: impl FnOnce() -> i32) -> WaitStatus {
    // SAFETY: the test harness may have other threads. The child only runs `f` (which makes
    // syscalls and may allocate: glibc's malloc, which test binaries use, resets its locks
    // across fork) and then `_exit`s without running atexit handlers or destructors.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: _exit ends the child immediately; nothing of the parent's is touched.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
    }
}

/// True when running as root (uid 0).
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether `memfd_secret` works here; prints the skip reason when it does not.
pub(crate) fn have_memfd_secret(test: &str) -> bool {
    match crate::page::memfd_secret_available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIP {test}: memfd_secret unavailable on this kernel ({e})");
            false
        }
    }
}
