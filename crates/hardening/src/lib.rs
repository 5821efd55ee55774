//! Every `unsafe` line of agentkeys lives in this crate, behind safe functions.
//!
//! - [`page`]: secret pages. `memfd_secret` memory written once, mapped read-only, wiped on
//!   drop, handed to other processes as a file descriptor; the receiving side maps such an fd.
//!   Falls back to an mlocked, sealed `memfd` (reported *degraded*) unless told to refuse.
//! - [`pkey`]: memory protection keys. Pages that no thread can touch except inside a closure.
//! - [`slab`]: small secrets packed into shared pkey-protected secret pages (the cache), so
//!   thousands fit the memlock limit.
//! - [`process`]: process hardening steps, in the order a daemon takes them: fds 0-2, inherited
//!   fds, environment, dumpable, core limit, tracer, ptrace scope, no_new_privs, capabilities.
//! - [`seccomp`]: the syscall allowlist (reviewed data) and its installation on all threads.
//! - [`launcher`]: the process, forked before the sandbox, that starts programs for `run`
//!   (each under a supervisor of its own) and stops them.
//! - [`ns`]: the raw steps of `agentkeys jail` (checked fork, `_exit`, recursive mount
//!   attributes, signal dispositions, closing fds before exec).
//! - [`helper`]: helper processes the daemon forks before its sandbox (the proxy).
//! - [`proctree`]: the processes below this one, found through `/proc` and held by pidfds.
//! - [`peer`]: credentials of the process at the other end of a unix socket.
//! - [`alloc`]: the global allocator for both binaries: mimalloc (secure) that wipes on free.
//! - [`selftest`]: the structured hardening report behind `agentkeys doctor`.
//!
//! Each function returns `io::Result` (or an error enum carrying one) through [`errno::cerr`];
//! a step that fails is an error naming the step, never a silent warning.

pub mod alloc;
pub mod errno;
pub mod helper;
pub mod launcher;
pub mod ns;
pub mod page;
pub mod peer;
pub mod pkey;
pub mod process;
pub mod proctree;
pub mod seccomp;
pub mod selftest;
pub mod seqpacket;
pub mod slab;

#[cfg(test)]
mod testutil;
