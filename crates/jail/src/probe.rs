//! Whether this machine can run a jail: one item per requirement, each naming the fix when it
//! is missing. `agentkeys jail` refuses on a missing one (unless `--best-effort`);
//! `agentkeys doctor` lists them.

use agentkeys_hardening::ns::{self, Forked};
use serde::Serialize;

use crate::policy::Protection;

/// One requirement.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// Short name (`user_namespaces`, `landlock`, `seccomp`).
    pub name: &'static str,
    /// The protection it enables.
    pub protection: Protection,
    /// Whether it is there.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it, when missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn sysctl(path: &str) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Probes the kernel thoroughly (`agentkeys doctor`): forks a short-lived child to try a user
/// namespace when this process is single-threaded; otherwise reads the sysctls alone.
pub fn probe() -> Vec<Item> {
    vec![
        user_namespaces(true),
        landlock(),
        seccomp(),
        net_namespace(),
    ]
}

/// `agentkeys jail --net proxy` only: a network namespace inside the jail's user namespace
/// (then `lo` brought up in it). Not needed by a jail with the host's network.
fn net_namespace() -> Item {
    use nix::sched::{CloneFlags, unshare};
    let mut item = Item {
        name: "net_proxy",
        protection: Protection::Namespaces,
        ok: false,
        detail: String::new(),
        fix: None,
    };
    let tried = in_child(
        || match unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET) {
            Ok(()) => match ns::loopback_up() {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(libc::EIO).clamp(1, 255),
            },
            Err(e) => (e as i32).clamp(1, 255),
        },
    );
    match tried {
        Some(0) => {
            item.ok = true;
            item.detail = "`agentkeys jail --net proxy` can make its network namespace (and \
                           needs the daemon's proxy: [proxy] enabled, the default)"
                .into();
        }
        Some(errno) => {
            item.detail = format!(
                "`agentkeys jail --net proxy` cannot make a network namespace in a user \
                 namespace: {} (jails with the host's network are unaffected)",
                std::io::Error::from_raw_os_error(errno)
            );
            item.fix = Some(
                "allow unprivileged user namespaces (see jail_user_namespaces); a container \
                 may also need CLONE_NEWNET allowed by its seccomp profile"
                    .into(),
            );
        }
        None => {
            item.ok = true;
            item.detail = "not tried (this process is multi-threaded)".into();
        }
    }
    item
}

/// The quick probe `agentkeys jail` runs before every start: the sysctls and the Landlock ABI,
/// no fork (a namespace the kernel still refuses fails the jail's own step, which names it).
pub fn probe_quick() -> Vec<Item> {
    vec![user_namespaces(false), landlock(), seccomp()]
}

fn user_namespaces(try_it: bool) -> Item {
    let mut item = Item {
        name: "user_namespaces",
        protection: Protection::Namespaces,
        ok: false,
        detail: String::new(),
        fix: None,
    };
    if sysctl("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        item.detail = "kernel.unprivileged_userns_clone is 0".into();
        item.fix = Some("sysctl -w kernel.unprivileged_userns_clone=1".into());
        return item;
    }
    if sysctl("/proc/sys/user/max_user_namespaces") == Some(0) {
        item.detail = "user.max_user_namespaces is 0".into();
        item.fix = Some("sysctl -w user.max_user_namespaces=15000".into());
        return item;
    }
    let apparmor = sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1);
    let tried = if try_it { try_unshare() } else { None };
    match tried {
        Some(0) => {
            item.ok = true;
            item.detail = "unprivileged user, mount, PID and IPC namespaces work".into();
        }
        Some(errno) => {
            let e = std::io::Error::from_raw_os_error(errno);
            item.detail = format!("creating a user namespace failed: {e}");
            item.fix = Some(if apparmor {
                "AppArmor restricts unprivileged user namespaces: sysctl -w \
                 kernel.apparmor_restrict_unprivileged_userns=0, or give agentkeys an AppArmor \
                 profile with `userns,`"
                    .into()
            } else if errno == libc::ENOSPC {
                "sysctl -w user.max_user_namespaces=15000".into()
            } else {
                "enable unprivileged user namespaces (kernel.unprivileged_userns_clone=1, \
                 user.max_user_namespaces > 0)"
                    .into()
            });
        }
        None => {
            item.ok = !apparmor;
            item.detail = if apparmor {
                "kernel.apparmor_restrict_unprivileged_userns is 1".into()
            } else {
                "sysctls allow unprivileged user namespaces".into()
            };
            if apparmor {
                item.fix = Some("sysctl -w kernel.apparmor_restrict_unprivileged_userns=0".into());
            }
        }
    }
    item
}

/// `Some(0)` when a child could create the namespaces, `Some(errno)` when not, `None` when
/// not tried.
fn try_unshare() -> Option<i32> {
    use nix::sched::{CloneFlags, unshare};
    in_child(|| {
        let flags = CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC;
        match unshare(flags) {
            Ok(()) => 0,
            Err(e) => (e as i32).clamp(1, 255),
        }
    })
}

/// Runs `attempt` in a forked child (so that what it changes, namespaces above all, stays
/// there) and returns its exit code: 0 for success, an errno otherwise (EIO when the child
/// did not exit normally); `None` when no child could be forked.
fn in_child(attempt: impl FnOnce() -> i32) -> Option<i32> {
    match ns::fork_single_threaded() {
        Ok(Forked::Child) => ns::exit_now(attempt()),
        Ok(Forked::Parent(pid)) => match nix::sys::wait::waitpid(pid, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => Some(code),
            _ => Some(libc::EIO),
        },
        Err(_) => None,
    }
}

fn landlock() -> Item {
    let mut item = Item {
        name: "landlock",
        protection: Protection::Landlock,
        ok: false,
        detail: String::new(),
        fix: None,
    };
    match ns::landlock_abi() {
        Ok(v) if v >= crate::landlock::REQUIRED_ABI => {
            item.ok = true;
            item.detail = format!("Landlock ABI {v}");
        }
        Ok(v) => {
            item.detail = format!(
                "Landlock ABI {v}; the jail needs ABI {} (signal and abstract-socket scoping)",
                crate::landlock::REQUIRED_ABI
            );
            item.fix = Some("a kernel of 6.12 or later".into());
        }
        Err(e) => {
            item.detail = format!("Landlock unavailable: {e}");
            item.fix = Some(
                "a kernel with CONFIG_SECURITY_LANDLOCK and `landlock` in the lsm= boot list"
                    .into(),
            );
        }
    }
    item
}

fn seccomp() -> Item {
    let ok = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Seccomp:")))
        .unwrap_or(false);
    Item {
        name: "seccomp",
        protection: Protection::Seccomp,
        ok,
        detail: if ok {
            "seccomp filters available".into()
        } else {
            "no seccomp in this kernel".into()
        },
        fix: (!ok).then(|| "a kernel with CONFIG_SECCOMP_FILTER".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_name_each_requirement_and_a_fix_when_missing() {
        let items = probe_quick();
        let names: Vec<_> = items.iter().map(|i| i.name).collect();
        assert_eq!(names, ["user_namespaces", "landlock", "seccomp"]);
        for i in &items {
            assert!(!i.detail.is_empty());
            assert!(i.ok || i.fix.is_some(), "{}: missing without a fix", i.name);
        }
    }
}
