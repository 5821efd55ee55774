//! The hardening self-test: one structured report of what protects a process, item by item,
//! each `ok`, `degraded` or `missing` with a detail line, and whether the item is *required*.
//! `agentkeys doctor` prints it as a table or JSON; `agentkeysd` logs it at start.
//!
//! Required are the protections the process itself puts in place (for the daemon: dumpable,
//! core limit, no_new_privs, seccomp, capabilities, tracer, the wiping allocator; for a client
//! only those it applies to itself): one that is not `ok` is a failure. Features of the machine
//! (`memfd_secret`, memory protection keys, Yama's `ptrace_scope`) are optional, the process
//! degrades without them, unless the configuration makes them required ([`Requirements`]:
//! `require_secretmem`, `require_pkeys`, `require_ptrace_scope`). [`Report::failures`] is what
//! decides an exit status; a missing optional feature is reported, never a failure.
//!
//! [`Report::for_current_process`] asks the process itself (prctl, getrlimit, probes);
//! [`Report::for_pid`] reads what `/proc/PID` shows of another process, which is enough for
//! the sandbox items but not for dumpable or the allocator.

use std::fmt::Write as _;

use serde::Serialize;

use crate::process::{self, ProcStatus, PtraceScope};
use crate::{alloc, page, pkey};

/// How an item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// In place.
    Ok,
    /// Present in a weaker form (a fallback, a soft limit, a kernel without the feature's
    /// strongest mode).
    Degraded,
    /// Not in place.
    Missing,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::Missing => "missing",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// Stable machine name, e.g. `seccomp`.
    pub name: String,
    /// Ok, degraded or missing.
    pub status: Status,
    /// What was found, in words.
    pub detail: String,
    /// Whether anything but `ok` is a failure of this process (else the process runs without
    /// it, weaker, and says so).
    pub required: bool,
}

/// Which process a report is about: what it must have done to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `agentkeysd`: every process-hardening step is required.
    Daemon,
    /// A client (`agentkeys`): it turns dumps off and runs on the wiping allocator; the sandbox
    /// items apply to the daemon, not to it.
    Client,
}

/// Machine features the configuration makes required (`[daemon] require_secretmem`,
/// `require_pkeys`, `require_ptrace_scope`); all optional by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requirements {
    /// `memfd_secret` (no degraded fallback).
    pub secretmem: bool,
    /// Memory protection keys.
    pub pkeys: bool,
    /// Yama's `ptrace_scope` at 1 or above.
    pub ptrace_scope: bool,
}

/// A self-test report for one process.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Which process this describes (e.g. `agentkeys`, `agentkeysd`).
    pub process: String,
    /// Its pid.
    pub pid: u32,
    /// The items, in a fixed order.
    pub items: Vec<Item>,
}

fn item(name: &str, status: Status, detail: impl Into<String>) -> Item {
    Item {
        name: name.to_string(),
        status,
        detail: detail.into(),
        required: false,
    }
}

fn unreadable(name: &str, what: &str, e: impl std::fmt::Display) -> Item {
    item(name, Status::Missing, format!("could not read {what}: {e}"))
}

/// Items any process status shows: no_new_privs, seccomp, capabilities, tracer, locked memory.
fn status_items(st: &ProcStatus, items: &mut Vec<Item>) {
    items.push(match st.get_u64("NoNewPrivs") {
        Some(1) => item("no_new_privs", Status::Ok, "NoNewPrivs 1"),
        Some(v) => item("no_new_privs", Status::Missing, format!("NoNewPrivs {v}")),
        None => item(
            "no_new_privs",
            Status::Missing,
            "no NoNewPrivs line in status",
        ),
    });
    items.push(match st.get_u64("Seccomp") {
        Some(2) => item(
            "seccomp",
            Status::Ok,
            format!(
                "Seccomp 2 (filter, {} installed)",
                st.get_u64("Seccomp_filters").unwrap_or(0)
            ),
        ),
        Some(1) => item("seccomp", Status::Ok, "Seccomp 1 (strict mode)"),
        Some(v) => item(
            "seccomp",
            Status::Missing,
            format!("Seccomp {v}: no filter"),
        ),
        None => item("seccomp", Status::Missing, "kernel without seccomp"),
    });
    items.push(match st.get_hex("CapEff") {
        Some(0) => item("capabilities", Status::Ok, "CapEff 0"),
        Some(v) => item("capabilities", Status::Missing, format!("CapEff {v:016x}")),
        None => item("capabilities", Status::Missing, "no CapEff line in status"),
    });
    items.push(match st.get_u64("TracerPid") {
        Some(0) => item("tracer", Status::Ok, "TracerPid 0"),
        Some(p) => item("tracer", Status::Missing, format!("traced by pid {p}")),
        None => item("tracer", Status::Missing, "no TracerPid line in status"),
    });
    items.push(match st.get_u64("VmLck") {
        Some(kb) => item("locked_memory", Status::Ok, format!("VmLck {kb} kB")),
        None => item("locked_memory", Status::Missing, "no VmLck line in status"),
    });
}

fn core_item(limit: std::io::Result<(u64, u64)>) -> Item {
    match limit {
        Ok((0, 0)) => item("rlimit_core", Status::Ok, "RLIMIT_CORE 0 (soft and hard)"),
        Ok((0, hard)) => item(
            "rlimit_core",
            Status::Degraded,
            format!("soft limit 0, hard limit {hard}: the process could raise it"),
        ),
        Ok((soft, _)) => item(
            "rlimit_core",
            Status::Missing,
            format!("RLIMIT_CORE {soft}"),
        ),
        Err(e) => unreadable("rlimit_core", "RLIMIT_CORE", e),
    }
}

fn ptrace_scope_item() -> Item {
    match process::ptrace_scope() {
        Ok(PtraceScope::Restricted) => item("ptrace_scope", Status::Ok, "1 (restricted)"),
        Ok(PtraceScope::AdminOnly) => item("ptrace_scope", Status::Ok, "2 (admin only)"),
        Ok(PtraceScope::NoAttach) => item("ptrace_scope", Status::Ok, "3 (no attach)"),
        Ok(PtraceScope::Classic) => item(
            "ptrace_scope",
            Status::Degraded,
            "0 (classic): same-uid processes may attach to dumpable processes",
        ),
        Ok(PtraceScope::NoYama) => item(
            "ptrace_scope",
            Status::Degraded,
            "kernel has no Yama: same-uid tracing is blocked only by dumpable=0",
        ),
        Ok(PtraceScope::Unrecognised(v)) => item(
            "ptrace_scope",
            Status::Degraded,
            format!("unrecognised value {v:?}"),
        ),
        Err(e) => unreadable("ptrace_scope", "kernel.yama.ptrace_scope", e),
    }
}

fn machine_items(items: &mut Vec<Item>, reqs: Requirements) {
    items.push(Item {
        required: reqs.ptrace_scope,
        ..ptrace_scope_item()
    });
    let mut secretmem = match page::memfd_secret_available() {
        Ok(()) => item("memfd_secret", Status::Ok, "available"),
        Err(e) => item(
            "memfd_secret",
            Status::Degraded,
            format!("unavailable ({e}): secret pages fall back to sealed, mlocked memfds"),
        ),
    };
    secretmem.required = reqs.secretmem;
    items.push(secretmem);
    let mut pkeys = match pkey::supported() {
        Ok(()) => item("pkeys", Status::Ok, "memory protection keys available"),
        Err(e) => item("pkeys", Status::Missing, e.to_string()),
    };
    pkeys.required = reqs.pkeys;
    items.push(pkeys);
}

impl Report {
    /// The report of the calling process, as the process sees itself, with nothing of the
    /// machine required (see [`Report::for_current_process_with`]).
    pub fn for_current_process(process: &str, role: Role) -> Report {
        Report::for_current_process_with(process, role, Requirements::default())
    }

    /// The report of the calling process, as the process sees itself: `role` says which
    /// process-hardening items it must have, `reqs` which machine features the configuration
    /// requires.
    pub fn for_current_process_with(process: &str, role: Role, reqs: Requirements) -> Report {
        let mut items = Vec::with_capacity(12);
        items.push(match process::is_dumpable() {
            Ok(false) => item("dumpable", Status::Ok, "Dumpable 0"),
            Ok(true) => item(
                "dumpable",
                Status::Missing,
                "Dumpable 1: core dumps and same-uid ptrace possible",
            ),
            Err(e) => unreadable("dumpable", "PR_GET_DUMPABLE", e),
        });
        items.push(core_item(process::core_limit()));
        match ProcStatus::read_self() {
            Ok(st) => status_items(&st, &mut items),
            Err(e) => items.push(unreadable("status", "/proc/self/status", e)),
        }
        machine_items(&mut items, reqs);
        items.push(if alloc::active() {
            item(
                "secure_allocator",
                Status::Ok,
                "mimalloc (secure), freed memory wiped",
            )
        } else {
            item(
                "secure_allocator",
                Status::Missing,
                "WipingAllocator is not the global allocator",
            )
        });
        let own: &[&str] = match role {
            Role::Daemon => &[
                "dumpable",
                "rlimit_core",
                "no_new_privs",
                "seccomp",
                "capabilities",
                "tracer",
                "secure_allocator",
            ],
            Role::Client => &["dumpable", "rlimit_core", "secure_allocator"],
        };
        for i in &mut items {
            if own.contains(&i.name.as_str()) {
                i.required = true;
            }
        }
        Report {
            process: process.to_string(),
            pid: std::process::id(),
            items,
        }
    }

    /// What `/proc/PID` shows of another process: core limit, no_new_privs, seccomp,
    /// capabilities, tracer and locked memory (dumpable and the allocator are not visible).
    ///
    /// # Errors
    /// The process does not exist or its status cannot be read.
    pub fn for_pid(process: &str, pid: u32) -> std::io::Result<Report> {
        let st = ProcStatus::read_pid(pid)?;
        let mut items = Vec::with_capacity(8);
        items.push(core_item(read_core_limit(pid)));
        status_items(&st, &mut items);
        Ok(Report {
            process: process.to_string(),
            pid,
            items,
        })
    }

    /// Adds an item supplied by the caller (e.g. the keystore kind, known to the CLI).
    pub fn push(&mut self, name: &str, status: Status, detail: impl Into<String>) {
        self.items.push(item(name, status, detail));
    }

    /// The item called `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Item> {
        self.items.iter().find(|i| i.name == name)
    }

    /// The worst status in the report.
    pub fn worst(&self) -> Status {
        self.items
            .iter()
            .map(|i| i.status)
            .max()
            .unwrap_or(Status::Ok)
    }

    /// Required items that are not `ok`: what makes a self-test fail.
    pub fn failures(&self) -> Vec<&Item> {
        self.items
            .iter()
            .filter(|i| i.required && i.status != Status::Ok)
            .collect()
    }

    /// Optional items that are not `ok`: weaker, reported, not a failure.
    pub fn weaker(&self) -> Vec<&Item> {
        self.items
            .iter()
            .filter(|i| !i.required && i.status != Status::Ok)
            .collect()
    }

    /// A plain-text table: one row per item.
    pub fn to_table(&self) -> String {
        let w = self
            .items
            .iter()
            .map(|i| i.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let mut out = format!("{} (pid {})\n", self.process, self.pid);
        let _ = writeln!(
            out,
            "  {:<w$}  {:<8}  {:<8}  DETAIL",
            "ITEM", "STATUS", "NEED"
        );
        for i in &self.items {
            let _ = writeln!(
                out,
                "  {:<w$}  {:<8}  {:<8}  {}",
                i.name,
                i.status.label(),
                if i.required { "required" } else { "optional" },
                i.detail
            );
        }
        out.push_str(&self.summary());
        out
    }

    /// One line (or two) saying whether every required item is in place and which optional
    /// ones are not, e.g. `required: all ok; optional, not in place here: pkeys`.
    pub fn summary(&self) -> String {
        let names = |v: Vec<&Item>| {
            v.iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let failures = self.failures();
        let mut out = if failures.is_empty() {
            "  required: all ok".to_string()
        } else {
            format!("  required but not in place: {}", names(failures))
        };
        let weaker = self.weaker();
        if !weaker.is_empty() {
            let _ = write!(out, "; optional, not in place here: {}", names(weaker));
        }
        out.push('\n');
        out
    }
}

/// `RLIMIT_CORE` of another process from `/proc/PID/limits`.
fn read_core_limit(pid: u32) -> std::io::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    parse_core_limit(&text).ok_or_else(|| std::io::Error::other("no core line in limits"))
}

fn parse_core_limit(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("Max core file size"))?;
    let mut nums = line["Max core file size".len()..]
        .split_whitespace()
        .map(|v| {
            if v == "unlimited" {
                Some(u64::MAX)
            } else {
                v.parse().ok()
            }
        });
    Some((nums.next()??, nums.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_core_limits() {
        let text = "Limit Soft Limit Hard Limit Units\n\
                    Max core file size        0                    unlimited            bytes\n";
        assert_eq!(parse_core_limit(text), Some((0, u64::MAX)));
        assert_eq!(
            parse_core_limit("Max core file size 0 0 bytes"),
            Some((0, 0))
        );
        assert_eq!(parse_core_limit("nothing here"), None);
    }

    #[test]
    fn report_has_every_design_item_and_serialises() {
        let r = Report::for_current_process("test", Role::Daemon);
        for name in [
            "dumpable",
            "rlimit_core",
            "no_new_privs",
            "seccomp",
            "capabilities",
            "tracer",
            "locked_memory",
            "ptrace_scope",
            "memfd_secret",
            "pkeys",
            "secure_allocator",
        ] {
            assert!(r.get(name).is_some(), "report lacks {name}");
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["pid"], std::process::id());
        assert!(
            json["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| { matches!(i["status"].as_str(), Some("ok" | "degraded" | "missing")) })
        );
        assert!(
            json["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["required"].is_boolean())
        );
        let table = r.to_table();
        assert!(table.lines().count() == r.items.len() + 3, "{table}");
    }

    #[test]
    fn machine_features_are_optional_unless_required() {
        let r = Report::for_current_process("test", Role::Daemon);
        for name in ["memfd_secret", "pkeys", "ptrace_scope", "locked_memory"] {
            assert!(!r.get(name).unwrap().required, "{name}");
        }
        for name in ["dumpable", "seccomp", "capabilities", "secure_allocator"] {
            assert!(r.get(name).unwrap().required, "{name}");
        }
        // The test harness has no seccomp filter: that is a failure of a daemon, not a client.
        assert!(r.failures().iter().any(|i| i.name == "seccomp"));
        let c = Report::for_current_process("test", Role::Client);
        assert!(!c.get("seccomp").unwrap().required);
        assert!(c.failures().iter().all(|i| i.name != "seccomp"));
        // Required by configuration.
        let all = Requirements {
            secretmem: true,
            pkeys: true,
            ptrace_scope: true,
        };
        let r = Report::for_current_process_with("test", Role::Client, all);
        for name in ["memfd_secret", "pkeys", "ptrace_scope"] {
            let i = r.get(name).unwrap();
            assert!(i.required, "{name}");
            assert_eq!(
                r.failures().iter().any(|f| f.name == name),
                i.status != Status::Ok,
                "{name}"
            );
        }
        let summary = r.summary();
        assert!(summary.starts_with("  required"), "{summary}");
    }

    #[test]
    fn report_reflects_real_process_state() {
        // The test harness is dumpable and untraced, with no seccomp filter: the report must
        // say exactly that, not a hard-coded "ok".
        let r = Report::for_current_process("test", Role::Daemon);
        let dumpable = process::is_dumpable().unwrap();
        assert_eq!(r.get("dumpable").unwrap().status == Status::Ok, !dumpable);
        let st = ProcStatus::read_self().unwrap();
        let seccomp_on = st.get_u64("Seccomp") == Some(2);
        assert_eq!(r.get("seccomp").unwrap().status == Status::Ok, seccomp_on);
        assert_eq!(
            r.get("ptrace_scope").unwrap().status == Status::Ok,
            matches!(
                process::ptrace_scope().unwrap(),
                PtraceScope::Restricted | PtraceScope::AdminOnly | PtraceScope::NoAttach
            )
        );
    }

    #[test]
    fn report_for_pid_reads_another_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let r = Report::for_pid("sleep", child.id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(r.pid, child.id());
        assert!(r.get("seccomp").is_some() && r.get("rlimit_core").is_some());
        assert!(Report::for_pid("gone", u32::MAX - 1).is_err());
    }
}
