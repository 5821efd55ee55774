//! The processes of a run, for stopping it: every descendant of this process, found through
//! `/proc` and held through pidfds.
//!
//! A pid read from `/proc` names a process only until that process is reaped; after that the
//! number can be given to an unrelated process, and a signal sent by number would reach it. So
//! each process found is opened as a pidfd and checked *after* the open: its parent (from
//! `/proc/PID/stat`) must be the process it was listed under, and both must still hold their
//! pids (a signal 0 through the pidfd is delivered or refused, not "no such process"). A
//! process that has exited but was not reaped (a zombie) keeps its pid, so the check holds for
//! it too. Every signal then goes through the pidfd, which can never reach another process.
//!
//! The listing is `/proc/PID/task/TID/children` (every thread's children); where the kernel
//! lacks it (`CONFIG_PROC_CHILDREN`), a scan of every `/proc/PID/stat` for its parent.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::errno::cerr;

/// One process, held by a pidfd.
pub struct Proc {
    pid: i32,
    fd: OwnedFd,
}

/// What a signal sent through a pidfd did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The kernel accepted it.
    Delivered,
    /// The process has been reaped.
    Gone,
    /// The process exists but may not be signalled by us (another uid, e.g. after a setuid
    /// program changed its real uid).
    Refused,
}

/// How many processes a round of signals reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Delivered.
    pub delivered: usize,
    /// Refused (see [`Sent::Refused`]).
    pub refused: usize,
}

impl Proc {
    /// Opens a pidfd for `pid`.
    ///
    /// # Errors
    /// `ESRCH` when no such process exists; `EMFILE` and friends when no fd is left.
    pub fn open(pid: i32) -> std::io::Result<Proc> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = cerr(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Proc { pid, fd })
    }

    /// Its pid (valid while [`Proc::alive`] says so).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `sig` (0: only checks) to exactly this process.
    pub fn signal(&self, sig: i32) -> Sent {
        // SAFETY: pidfd_send_signal with our own pidfd, a signal number, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        match cerr(r) {
            Ok(_) => Sent::Delivered,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Sent::Refused,
            Err(_) => Sent::Gone,
        }
    }

    /// Whether it still holds its pid (running, stopped, or exited but not reaped).
    pub fn alive(&self) -> bool {
        self.signal(0) != Sent::Gone
    }
}

/// Sends `sig` to each process; counts what was delivered and what was refused.
pub fn signal_all(procs: &[Proc], sig: i32) -> Tally {
    let mut t = Tally::default();
    for p in procs {
        match p.signal(sig) {
            Sent::Delivered => t.delivered += 1,
            Sent::Refused => t.refused += 1,
            Sent::Gone => {}
        }
    }
    t
}

/// Every descendant of this process, except the children in `exclude` and everything below
/// them, each verified as described in the module documentation. A process that forks or
/// exits during the walk may be missed: callers repeat the walk until nothing is left.
pub fn descendants(exclude: &[i32]) -> Vec<Proc> {
    let me = std::process::id() as i32;
    let mut found: Vec<Proc> = listed_children(me)
        .into_iter()
        .filter(|c| !exclude.contains(c))
        .filter_map(|c| verified_child(c, me))
        .collect();
    let mut i = 0;
    while i < found.len() {
        let x = found[i].pid;
        let batch: Vec<Proc> = listed_children(x)
            .into_iter()
            .filter_map(|c| verified_child(c, x))
            .collect();
        // The listing was x's only if x still held its pid after it was read.
        if found[i].alive() {
            found.extend(batch);
        }
        i += 1;
    }
    found
}

/// A pidfd for `child` if, once opened, it is still a child of `parent`.
fn verified_child(child: i32, parent: i32) -> Option<Proc> {
    // EMFILE (a very large tree) skips the process this round; the next walk finds it.
    let p = Proc::open(child).ok()?;
    let ppid = parent_of(child)?;
    // Still holding its pid after the read: the stat line was this process's.
    (p.alive() && ppid == parent).then_some(p)
}

/// The parent pid of `pid` (the field after the state in `/proc/PID/stat`; the command name
/// before it is in parentheses and may itself contain spaces and parentheses).
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_ppid(&stat)
}

fn parse_ppid(stat: &str) -> Option<i32> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_ascii_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// The children of `pid`, as the kernel lists them (possibly stale: see [`descendants`]).
fn listed_children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut listed = false;
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            listed = true;
            out.extend(
                s.split_ascii_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    if !listed && !children_files_exist() {
        return scan_children(pid);
    }
    out
}

/// Whether this kernel has `/proc/PID/task/TID/children` (`CONFIG_PROC_CHILDREN`).
fn children_files_exist() -> bool {
    std::path::Path::new("/proc/thread-self/children").exists()
}

/// Every process whose parent is `pid`, by a scan of `/proc` (kernels without the children
/// files).
fn scan_children(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| parent_of(p) == Some(pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_past_a_command_name_with_parentheses() {
        assert_eq!(parse_ppid("42 (a) b (c)) S 17 42 42 0"), Some(17));
        assert_eq!(parse_ppid("42 (sh) R 1 42"), Some(1));
        assert_eq!(parse_ppid("garbage"), None);
        assert_eq!(parse_ppid("42 (sh)"), None);
    }

    /// A grandchild whose parent is still alive is found, through its parent; the caller's
    /// own process and excluded subtrees are not.
    #[test]
    fn descendants_include_grandchildren_and_skip_excluded_subtrees() {
        let st = crate::testutil::in_child(|| {
            let spawn = |script: &str| {
                std::process::Command::new("/bin/sh")
                    .args(["-c", script])
                    .spawn()
                    .expect("sh")
            };
            let mut a = spawn("sleep 30 & wait");
            let mut b = spawn("sleep 30 & wait");
            std::thread::sleep(std::time::Duration::from_millis(300));
            let all: Vec<i32> = descendants(&[]).iter().map(Proc::pid).collect();
            let some: Vec<i32> = descendants(&[b.id() as i32])
                .iter()
                .map(Proc::pid)
                .collect();
            let ok = all.len() == 4
                && all.contains(&(a.id() as i32))
                && some.len() == 2
                && some.contains(&(a.id() as i32))
                && !some.contains(&(b.id() as i32))
                && !all.contains(&(std::process::id() as i32));
            let t = signal_all(&descendants(&[]), libc::SIGKILL);
            let _ = (a.wait(), b.wait());
            if ok && t.delivered == 4 && t.refused == 0 {
                0
            } else {
                eprintln!("all {all:?} some {some:?} tally {t:?}");
                1
            }
        });
        assert!(
            matches!(st, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{st:?}"
        );
    }
}
