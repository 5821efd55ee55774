//! Helper processes forked by `agentkeysd` before its sandbox closes, each talking to the daemon
//! over a private `SOCK_SEQPACKET` socketpair: today the credential-injecting proxy
//! (`agentkeys-proxy`). The launcher has its own fork in [`crate::launcher`], since it needs a
//! different set-up (subreaper, no seccomp).
//!
//! The child inherits the daemon's lock-down (allowlisted environment, dumpable 0, core limit
//! 0); here it closes every fd but the socket and 0-2, names itself, and asks for SIGKILL when
//! the daemon dies (so a helper never outlives it). What it does next (its own capability drop
//! and seccomp filter) is the body's job, since only the body knows what it needs first.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::errno::cerr;
use crate::process::HardenError;

/// A forked helper.
#[derive(Debug)]
pub struct Helper {
    /// The daemon's end of the socketpair (close-on-exec, blocking).
    pub sock: OwnedFd,
    /// The helper's pid.
    pub pid: u32,
}

/// Forks a helper that runs `body` with its end of a new socketpair and exits with the code it
/// returns. `name` becomes its `comm` (at most 15 bytes are kept).
///
/// # Errors
/// [`HardenError::NotSingleThreaded`] when another thread exists (forking then could copy a lock
/// another thread holds), or the failed step (`socketpair`, `fork`).
pub fn spawn(name: &str, body: impl FnOnce(OwnedFd) -> i32) -> Result<Helper, HardenError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let step = |step: &'static str| move |e: std::io::Error| HardenError::Step { step, source: e };
    let threads = crate::process::thread_count().map_err(step("fork helper"))?;
    if threads != 1 {
        return Err(HardenError::NotSingleThreaded("fork helper", threads));
    }
    let (daemon_end, helper_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| step("fork helper (socketpair)")(e.into()))?;
    let daemon_pid = std::process::id();
    let mut comm = [0u8; 16];
    for (d, s) in comm.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    // SAFETY: single-threaded (checked above): the child inherits no lock held by another thread.
    match unsafe { nix::unistd::fork() }.map_err(|e| step("fork helper")(e.into()))? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(helper_end);
            Ok(Helper {
                sock: daemon_end,
                pid: child.as_raw().unsigned_abs(),
            })
        }
        nix::unistd::ForkResult::Child => {
            drop(daemon_end);
            let code = match child_setup(&helper_end, &comm, daemon_pid) {
                Ok(()) => body(helper_end),
                Err(_) => 71,
            };
            // SAFETY: the helper ends here without running the daemon's destructors.
            unsafe { libc::_exit(code) }
        }
    }
}

fn child_setup(sock: &OwnedFd, comm: &[u8; 16], daemon_pid: u32) -> std::io::Result<()> {
    crate::process::close_inherited_fds(&[sock.as_raw_fd()]).map_err(std::io::Error::other)?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated buffer of at most 16 bytes, which `comm` is.
    cerr(unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr(), 0, 0, 0) })?;
    // SAFETY: prctl with integer arguments only.
    cerr(unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })?;
    // The daemon may have died between the fork and the prctl: then no signal will come.
    if std::os::unix::process::parent_id() != daemon_pid {
        return Err(std::io::Error::other("the daemon is gone"));
    }
    Ok(())
}
