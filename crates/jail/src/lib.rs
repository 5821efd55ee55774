//! `agentkeys jail`: confines an agent and everything it starts, so that under the owner's
//! own uid it gets only its scope (issue 15). One small crate whose only job is to confine,
//! in the style of bubblewrap and Firecracker's jailer:
//!
//! - [`policy`]: [`JailPolicy`], plain printable data (hidden, writable, protected, sockets,
//!   environment names, required protections), and the builder from the owner's environment;
//! - [`probe`]: whether the kernel has what a jail needs, each missing item with its fix;
//! - [`apply`]: the fixed order (namespaces, uid/gid maps, mounts and pivot, Landlock,
//!   seccomp, no_new_privs), each error naming its step, the jail's init and signals;
//! - [`landlock`]: the Landlock ruleset and scopes;
//! - [`seccomp`]: the denylist, reviewed data with a reason per entry.
//!
//! No `unsafe` here: forking, `_exit`, `mount_setattr` and signal dispositions are safe
//! functions of `agentkeys_hardening::ns`.
#![forbid(unsafe_code)]

pub mod apply;
pub mod gitlinks;
pub mod landlock;
pub mod policy;
pub mod probe;
pub mod seccomp;

pub use policy::{JailOptions, JailPolicy, Protection};

/// Why a jail could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The policy is refused (a path, a count, the version).
    #[error("jail policy: {0}")]
    Policy(String),
    /// The Landlock step.
    #[error("Landlock: {0}")]
    Landlock(String),
    /// The seccomp step.
    #[error("seccomp: {0}")]
    Seccomp(String),
}

/// The launcher's confinement hook (`agentkeys_hardening::launcher::set_confine_hook`): a
/// `run` of a jailed session is confined by the jail's policy, in namespaces of its own that
/// the jail's agent cannot name. Returns only in the confined program's process.
pub fn confine_launch(
    policy: &serde_json::Value,
    userns: Option<std::os::fd::BorrowedFd<'_>>,
    fail: &dyn Fn(&'static str, i32) -> std::convert::Infallible,
) {
    let policy = match JailPolicy::from_json(policy) {
        Ok(p) => p,
        Err(_) => apply::die(fail, "jail policy", libc::EINVAL),
    };
    let _ = apply::confine(
        &policy,
        None,
        userns,
        Some(nix::unistd::getppid()),
        apply::Signals::Group,
        fail,
    );
}
