//! Start-up hardening of agentkeysd, in the order DESIGN.md fixes, all before any thread or
//! runtime exists. A failed step stops the daemon with an error naming the step.

use std::os::fd::RawFd;

use agentkeys_hardening::process::{self, HardenError, TracerCheck};
use agentkeys_hardening::seccomp::{self, SeccompError};

/// Environment variables the daemon keeps; everything else is removed at start.
pub const ENV_ALLOWLIST: &[&str] = &[
    "AGENTKEYS_HOME",
    "AGENTKEYS_SOCKET",
    "AGENTKEYS_LOG",
    "RUST_LOG",
    "XDG_RUNTIME_DIR",
    "HOME",
    "TZ",
    // An `os-keyring` build reads the DEK from the Secret Service before the sandbox closes.
    "DBUS_SESSION_BUS_ADDRESS",
];

/// Choices that change how strict start-up is.
#[derive(Debug, Clone, Default)]
pub struct StartupOptions {
    /// Start even when a tracer is attached (with a loud warning).
    pub allow_debugger: bool,
    /// Refuse to start when ptrace_scope is 0 or the kernel has no Yama.
    pub require_ptrace_scope: bool,
    /// Inherited fds to keep open (e.g. a socket handed over by a service manager).
    pub keep_fds: Vec<RawFd>,
}

/// What start-up found that the operator must hear about.
#[derive(Debug, Default)]
pub struct Hardened {
    /// Warnings to print loudly (tracer allowed, weak ptrace scope).
    pub warnings: Vec<String>,
}

/// A start-up step failed; the daemon must not run.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A process hardening step failed or refused.
    #[error(transparent)]
    Harden(#[from] HardenError),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(#[from] SeccompError),
}

/// Step 1: fds 0-2 and inherited fds, then a private umask. First thing in `main`.
///
/// # Errors
/// The step that failed.
pub fn early(opts: &StartupOptions) -> Result<(), StartupError> {
    process::fix_std_fds()?;
    process::close_inherited_fds(&opts.keep_fds)?;
    // Every file and socket the daemon creates is private unless it widens one on purpose.
    process::set_umask(0o077);
    Ok(())
}

/// Step 2: environment, dumps, tracer, ptrace scope. Single-threaded, after any detach.
///
/// # Errors
/// The step that failed or refused.
pub fn lock_down(opts: &StartupOptions) -> Result<Hardened, StartupError> {
    let mut out = Hardened::default();
    process::sanitize_env(ENV_ALLOWLIST)?;
    process::set_dumpable(false)?;
    process::set_core_limit_zero()?;
    if let TracerCheck::TracedAllowed(pid) = process::check_tracer(opts.allow_debugger)? {
        out.warnings.push(format!(
            "running under a debugger (tracer pid {pid}) because --allow-debugger was given: \
             the tracer can read every secret this daemon handles"
        ));
    }
    let scope = process::ptrace_scope().map_err(|source| HardenError::Step {
        step: "ptrace_scope check",
        source,
    })?;
    if let Some(w) = process::assess_ptrace_scope(&scope, opts.require_ptrace_scope)? {
        out.warnings.push(w);
    }
    Ok(out)
}

/// Step 3: no_new_privs, capabilities, seccomp. The launcher (daemon-mediated run) is forked
/// before this: filters are inherited across exec, so children must not descend from the
/// filtered daemon. Nothing that needs a syscall outside the allowlist may come after it.
/// `network` is what the configured backends need ([`seccomp::Network`]; `false`/`true` are
/// off/internet).
///
/// # Errors
/// The step that failed.
pub fn sandbox(network: impl Into<seccomp::Network>) -> Result<(), StartupError> {
    sandbox_with(network, false)
}

/// [`sandbox`], with the network-listener additions to the filter when `listen`.
///
/// # Errors
/// As [`sandbox`].
pub fn sandbox_with(
    network: impl Into<seccomp::Network>,
    listen: bool,
) -> Result<(), StartupError> {
    process::set_no_new_privs()?;
    process::drop_capabilities()?;
    seccomp::install_daemon_filter_with(network, listen)?;
    Ok(())
}

/// Every step, in order (used by `--self-test`, which has no state to load in between).
///
/// # Errors
/// The first step that fails, named in the error.
pub fn harden(opts: &StartupOptions) -> Result<Hardened, StartupError> {
    early(opts)?;
    let out = lock_down(opts)?;
    sandbox(false)?;
    Ok(out)
}
