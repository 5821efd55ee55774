//! The jail's seccomp filter: a *denylist*, reviewed data like the daemon's allowlist.
//!
//! The agent must keep working normally (compilers, package managers, browsers, language
//! servers), so everything is allowed except the calls below, which answer `EPERM` (`clone3`
//! answers `ENOSYS`, so glibc falls back to `clone`, whose flags a filter can see). Each entry
//! says why it is denied. The jail's own set-up (mounts, pivot_root) is done before the filter
//! is installed; Landlock already refuses mount changes to a sandboxed process, and the filter
//! says so a second time.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::JailError;

/// A denied call: the syscall, an optional argument condition, and why.
#[derive(Debug, Clone, Copy)]
pub struct Denied {
    /// Syscall name (for the docs and messages).
    pub name: &'static str,
    /// Syscall number (x86_64).
    pub nr: i64,
    /// Deny only when this argument condition holds.
    pub when: Option<Cond>,
    /// Why.
    pub why: &'static str,
}

/// An argument condition.
#[derive(Debug, Clone, Copy)]
pub enum Cond {
    /// The 32-bit argument `index` equals `value` (ioctl requests are 32-bit in the kernel:
    /// comparing the low word alone means high bits cannot smuggle a request past the rule).
    Eq32(u8, u64),
    /// `arg & mask == mask` on the low word (a flag is set).
    FlagSet(u8, u64),
}

const CLONE_NEWUSER: u64 = libc::CLONE_NEWUSER as u64;

/// The denylist. Order does not matter.
pub const JAIL_DENYLIST: &[Denied] = &[
    Denied {
        name: "ptrace",
        nr: libc::SYS_ptrace,
        when: None,
        why: "reading or steering another process (the daemon's launched programs hold secrets)",
    },
    Denied {
        name: "process_vm_readv",
        nr: libc::SYS_process_vm_readv,
        when: None,
        why: "reads another process's memory",
    },
    Denied {
        name: "process_vm_writev",
        nr: libc::SYS_process_vm_writev,
        when: None,
        why: "writes another process's memory",
    },
    Denied {
        name: "pidfd_getfd",
        nr: libc::SYS_pidfd_getfd,
        when: None,
        why: "copies a descriptor out of another process",
    },
    Denied {
        name: "kcmp",
        nr: libc::SYS_kcmp,
        when: None,
        why: "probes other processes' descriptors and memory (a ptrace-class check)",
    },
    Denied {
        name: "ioctl(TIOCSTI)",
        nr: libc::SYS_ioctl,
        when: Some(Cond::Eq32(1, libc::TIOCSTI)),
        why: "pushes keystrokes into the owner's terminal (legacy_tiocsti is 1 on many machines)",
    },
    Denied {
        name: "ioctl(TIOCLINUX)",
        nr: libc::SYS_ioctl,
        when: Some(Cond::Eq32(1, libc::TIOCLINUX)),
        why: "virtual-console selection paste: input injection on a VT",
    },
    Denied {
        name: "ioctl(TIOCCONS)",
        nr: libc::SYS_ioctl,
        when: Some(Cond::Eq32(1, libc::TIOCCONS)),
        why: "redirects console output to a terminal of the agent's choosing",
    },
    Denied {
        name: "ioctl(TIOCSETD)",
        nr: libc::SYS_ioctl,
        when: Some(Cond::Eq32(1, libc::TIOCSETD)),
        why: "changes the terminal's line discipline (kernel attack surface, no agent needs it)",
    },
    Denied {
        name: "unshare(CLONE_NEWUSER)",
        nr: libc::SYS_unshare,
        when: Some(Cond::FlagSet(0, CLONE_NEWUSER)),
        why: "a new user namespace would give the power to unmount what hides a path",
    },
    Denied {
        name: "clone(CLONE_NEWUSER)",
        nr: libc::SYS_clone,
        when: Some(Cond::FlagSet(0, CLONE_NEWUSER)),
        why: "the same through clone",
    },
    Denied {
        name: "setns",
        nr: libc::SYS_setns,
        when: None,
        why: "entering another namespace (the host's, through an inherited or /proc fd)",
    },
    Denied {
        name: "mount",
        nr: libc::SYS_mount,
        when: None,
        why: "changing the jail's view (its set-up is done before the filter)",
    },
    Denied {
        name: "umount2",
        nr: libc::SYS_umount2,
        when: None,
        why: "unmounting what hides a path",
    },
    Denied {
        name: "pivot_root",
        nr: libc::SYS_pivot_root,
        when: None,
        why: "changing the root",
    },
    Denied {
        name: "chroot",
        nr: libc::SYS_chroot,
        when: None,
        why: "changing the root",
    },
    Denied {
        name: "open_tree",
        nr: libc::SYS_open_tree,
        when: None,
        why: "the new mount API",
    },
    Denied {
        name: "move_mount",
        nr: libc::SYS_move_mount,
        when: None,
        why: "the new mount API",
    },
    Denied {
        name: "fsopen",
        nr: libc::SYS_fsopen,
        when: None,
        why: "the new mount API",
    },
    Denied {
        name: "fsconfig",
        nr: libc::SYS_fsconfig,
        when: None,
        why: "the new mount API",
    },
    Denied {
        name: "fsmount",
        nr: libc::SYS_fsmount,
        when: None,
        why: "the new mount API",
    },
    Denied {
        name: "fspick",
        nr: libc::SYS_fspick,
        when: None,
        why: "the new mount API",
    },
    Denied {
        name: "mount_setattr",
        nr: libc::SYS_mount_setattr,
        when: None,
        why: "making a read-only mount writable",
    },
    Denied {
        name: "open_by_handle_at",
        nr: libc::SYS_open_by_handle_at,
        when: None,
        why: "opens files by handle, around the mount view",
    },
    Denied {
        name: "keyctl",
        nr: libc::SYS_keyctl,
        when: None,
        why: "the owner's kernel keyrings (session and user keyrings are shared by uid)",
    },
    Denied {
        name: "add_key",
        nr: libc::SYS_add_key,
        when: None,
        why: "the owner's kernel keyrings",
    },
    Denied {
        name: "request_key",
        nr: libc::SYS_request_key,
        when: None,
        why: "the owner's kernel keyrings",
    },
    Denied {
        name: "bpf",
        nr: libc::SYS_bpf,
        when: None,
        why: "kernel attack surface; no agent needs it",
    },
    Denied {
        name: "perf_event_open",
        nr: libc::SYS_perf_event_open,
        when: None,
        why: "observes other processes; kernel attack surface",
    },
    Denied {
        name: "userfaultfd",
        nr: libc::SYS_userfaultfd,
        when: None,
        why: "a classic exploitation aid (stalls kernel copies)",
    },
    Denied {
        name: "io_uring_setup",
        nr: libc::SYS_io_uring_setup,
        when: None,
        why: "io_uring's operations run past this filter (a seccomp filter sees only the \
              submitting call), and it is a large kernel attack surface; programs fall back \
              to ordinary calls",
    },
    Denied {
        name: "io_uring_enter",
        nr: libc::SYS_io_uring_enter,
        when: None,
        why: "io_uring (see io_uring_setup)",
    },
    Denied {
        name: "io_uring_register",
        nr: libc::SYS_io_uring_register,
        when: None,
        why: "io_uring (see io_uring_setup)",
    },
    Denied {
        name: "kexec_load",
        nr: libc::SYS_kexec_load,
        when: None,
        why: "loads a kernel",
    },
    Denied {
        name: "kexec_file_load",
        nr: libc::SYS_kexec_file_load,
        when: None,
        why: "loads a kernel",
    },
    Denied {
        name: "init_module",
        nr: libc::SYS_init_module,
        when: None,
        why: "loads kernel code",
    },
    Denied {
        name: "finit_module",
        nr: libc::SYS_finit_module,
        when: None,
        why: "loads kernel code",
    },
    Denied {
        name: "delete_module",
        nr: libc::SYS_delete_module,
        when: None,
        why: "unloads kernel code",
    },
    Denied {
        name: "acct",
        nr: libc::SYS_acct,
        when: None,
        why: "process accounting (host-wide)",
    },
    Denied {
        name: "swapon",
        nr: libc::SYS_swapon,
        when: None,
        why: "host-wide",
    },
    Denied {
        name: "swapoff",
        nr: libc::SYS_swapoff,
        when: None,
        why: "host-wide",
    },
    Denied {
        name: "reboot",
        nr: libc::SYS_reboot,
        when: None,
        why: "host-wide",
    },
    Denied {
        name: "quotactl",
        nr: libc::SYS_quotactl,
        when: None,
        why: "host-wide",
    },
];

/// Calls answered `ENOSYS` instead, so libraries fall back to a form the filter can inspect.
pub const JAIL_ENOSYS: &[Denied] = &[
    Denied {
        name: "clone3",
        nr: libc::SYS_clone3,
        when: None,
        why: "its flags are in memory a filter cannot read; glibc falls back to clone on ENOSYS",
    },
    Denied {
        name: "openat2",
        nr: libc::SYS_openat2,
        when: None,
        why: "its mode is in memory a filter cannot read (see the set-ID rules); callers fall \
              back to openat",
    },
];

/// A call that can give a file the set-user-ID or set-group-ID bit: refused (EPERM) when its
/// mode argument has either bit (and, for `open`/`openat`, when it creates a file). A root
/// owner's agent is uid 0: without this, `chmod 4755` on a copy of a shell in the project made
/// a set-user-ID-root program that any other local user could run to become root outside the
/// jail (nosuid holds only inside it); a non-root owner's would lend the owner's uid. As
/// systemd's `RestrictSUIDSGID=`.
#[derive(Debug, Clone, Copy)]
pub struct SetIdRule {
    /// Syscall name.
    pub name: &'static str,
    /// Syscall number (x86_64).
    pub nr: i64,
    /// The argument holding the mode.
    pub mode_arg: u8,
    /// The argument holding `open` flags, for calls that set a mode only when creating.
    pub flags_arg: Option<u8>,
}

/// `S_ISUID`, `S_ISGID`.
const SET_ID_BITS: [u64; 2] = [0o4000, 0o2000];
/// `O_CREAT`, `__O_TMPFILE`: the open flags that create a file with the given mode.
const CREATE_FLAGS: [u64; 2] = [libc::O_CREAT as u64, 0o20_000_000];

/// The calls that set a mode.
pub const JAIL_SET_ID: &[SetIdRule] = &[
    SetIdRule {
        name: "chmod",
        nr: libc::SYS_chmod,
        mode_arg: 1,
        flags_arg: None,
    },
    SetIdRule {
        name: "fchmod",
        nr: libc::SYS_fchmod,
        mode_arg: 1,
        flags_arg: None,
    },
    SetIdRule {
        name: "fchmodat",
        nr: libc::SYS_fchmodat,
        mode_arg: 2,
        flags_arg: None,
    },
    SetIdRule {
        name: "fchmodat2",
        nr: 452,
        mode_arg: 2,
        flags_arg: None,
    },
    SetIdRule {
        name: "mknod",
        nr: libc::SYS_mknod,
        mode_arg: 1,
        flags_arg: None,
    },
    SetIdRule {
        name: "mknodat",
        nr: libc::SYS_mknodat,
        mode_arg: 2,
        flags_arg: None,
    },
    SetIdRule {
        name: "creat",
        nr: libc::SYS_creat,
        mode_arg: 1,
        flags_arg: None,
    },
    SetIdRule {
        name: "open",
        nr: libc::SYS_open,
        mode_arg: 2,
        flags_arg: Some(1),
    },
    SetIdRule {
        name: "openat",
        nr: libc::SYS_openat,
        mode_arg: 3,
        flags_arg: Some(2),
    },
];

fn compile_set_id() -> Result<BpfProgram, JailError> {
    let err = |e: seccompiler::BackendError| JailError::Seccomp(e.to_string());
    let bit = |arg: u8, b: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(b), b)
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for r in JAIL_SET_ID {
        for id in SET_ID_BITS {
            let mode = bit(r.mode_arg, id).map_err(err)?;
            match r.flags_arg {
                None => rules
                    .entry(r.nr)
                    .or_default()
                    .push(SeccompRule::new(vec![mode]).map_err(err)?),
                Some(f) => {
                    for c in CREATE_FLAGS {
                        let rule = SeccompRule::new(vec![mode.clone(), bit(f, c).map_err(err)?])
                            .map_err(err)?;
                        rules.entry(r.nr).or_default().push(rule);
                    }
                }
            }
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

fn compile(list: &[Denied], errno: u32) -> Result<BpfProgram, JailError> {
    let err = |e: seccompiler::BackendError| JailError::Seccomp(e.to_string());
    // `None`: denied whatever the arguments (seccompiler writes that as an empty rule list).
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for d in list {
        let cond = match d.when {
            None => {
                map.insert(d.nr, None);
                continue;
            }
            Some(Cond::Eq32(i, v)) => {
                SeccompCondition::new(i, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
            }
            Some(Cond::FlagSet(i, m)) => {
                SeccompCondition::new(i, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(m), m)
            }
        }
        .map_err(err)?;
        let rule = SeccompRule::new(vec![cond]).map_err(err)?;
        if let Some(v) = map.entry(d.nr).or_insert_with(|| Some(Vec::new())) {
            v.push(rule);
        }
    }
    let rules: BTreeMap<i64, Vec<SeccompRule>> = map
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))
}

/// A filter of its own for the x32 ABI: its syscall numbers (bit 30 set) would reach the same
/// kernel functions under other numbers than the list names, so every one is refused.
fn x32_filter() -> BpfProgram {
    use seccompiler::sock_filter;
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JGE_K: u16 = 0x35;
    const BPF_RET_K: u16 = 0x06;
    let ret_eperm = 0x0005_0000 | libc::EPERM as u32; // SECCOMP_RET_ERRNO | EPERM
    let ret_allow = 0x7fff_0000; // SECCOMP_RET_ALLOW
    vec![
        // seccomp_data.nr is at offset 0.
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: BPF_JGE_K,
            jt: 0,
            jf: 1,
            k: 0x4000_0000,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: ret_eperm,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: ret_allow,
        },
    ]
}

/// The filters, compiled (the arch is checked by each; a foreign arch kills the process).
///
/// # Errors
/// [`JailError::Seccomp`] when a rule does not compile (a bug, caught by the unit test).
pub fn filters() -> Result<Vec<BpfProgram>, JailError> {
    Ok(vec![
        compile(JAIL_DENYLIST, libc::EPERM as u32)?,
        compile(JAIL_ENOSYS, libc::ENOSYS as u32)?,
        compile_set_id()?,
        x32_filter(),
    ])
}

/// Installs the filters on this thread (the jail's command is single-threaded at this point).
/// Needs no_new_privs (set by the Landlock step, or here).
///
/// # Errors
/// [`JailError::Seccomp`].
pub fn install() -> Result<(), JailError> {
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| JailError::Seccomp(format!("no_new_privs: {e}")))?;
    for f in filters()? {
        seccompiler::apply_filter(&f).map_err(|e| JailError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// The list as a Markdown table (docs/jail.md and `--print-policy`).
pub fn denylist_markdown() -> String {
    let mut s = String::from("| call | answer | why |\n|---|---|---|\n");
    for (list, answer) in [(JAIL_DENYLIST, "EPERM"), (JAIL_ENOSYS, "ENOSYS")] {
        for d in list {
            s.push_str(&format!("| `{}` | {answer} | {} |\n", d.name, d.why));
        }
    }
    for r in JAIL_SET_ID {
        let when = match r.flags_arg {
            None => format!("mode (arg {}) has S_ISUID or S_ISGID", r.mode_arg),
            Some(f) => format!(
                "creating (O_CREAT or O_TMPFILE in arg {f}) with S_ISUID or S_ISGID in the mode (arg {})",
                r.mode_arg
            ),
        };
        s.push_str(&format!(
            "| `{}`, {when} | EPERM | a set-ID program (the owner's uid, root for a root owner) another user could run outside the jail |\n",
            r.name
        ));
    }
    s.push_str(
        "| every x32-ABI call (nr >= 0x40000000) | EPERM | the same calls under other numbers |\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_denylist_compiles() {
        let f = filters().unwrap();
        assert_eq!(f.len(), 4);
        assert!(denylist_markdown().contains("TIOCSTI"));
    }
}
