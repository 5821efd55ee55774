//! The hardening self-test: one structured report of what protects a process, item by item,
//! each `ok`, `degraded` or `missing` with a detail line. `agentkeys doctor` prints it as a
//! table or JSON; `agentkeysd` logs it at start.
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

fn machine_items(items: &mut Vec<Item>) {
    items.push(ptrace_scope_item());
    items.push(match page::memfd_secret_available() {
        Ok(()) => item("memfd_secret", Status::Ok, "available"),
        Err(e) => item(
            "memfd_secret",
            Status::Degraded,
            format!("unavailable ({e}): secret pages fall back to sealed, mlocked memfds"),
        ),
    });
    items.push(match pkey::supported() {
        Ok(()) => item("pkeys", Status::Ok, "memory protection keys available"),
        Err(e) => item("pkeys", Status::Missing, e.to_string()),
    });
}

impl Report {
    /// The report of the calling process, as the process sees itself.
    pub fn for_current_process(process: &str) -> Report {
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
        machine_items(&mut items);
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
        let _ = writeln!(out, "  {:<w$}  {:<8}  DETAIL", "ITEM", "STATUS");
        for i in &self.items {
            let _ = writeln!(
                out,
                "  {:<w$}  {:<8}  {}",
                i.name,
                i.status.label(),
                i.detail
            );
        }
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
        let r = Report::for_current_process("test");
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
        let table = r.to_table();
        assert!(table.lines().count() == r.items.len() + 2, "{table}");
    }

    #[test]
    fn report_reflects_real_process_state() {
        // The test harness is dumpable and untraced, with no seccomp filter: the report must
        // say exactly that, not a hard-coded "ok".
        let r = Report::for_current_process("test");
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
