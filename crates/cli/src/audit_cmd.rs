//! `agentkeys audit [--follow] [--json]` and `agentkeys audit verify`: show and check the audit
//! trail agentkeysd writes to `$AGENTKEYS_HOME/audit.jsonl`.
//!
//! Owner only: the trail says which agent got which secret, when. The file is read directly (no
//! daemon needed), through the same owner/mode checks as every state file.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::Path;
use std::thread;
use std::time::{Duration, UNIX_EPOCH};

use agentkeys_state::audit::{self, AUDIT_FILE, AuditReader, Peer, RawLine, Record};
use clap::Subcommand;

use crate::CliError;
use crate::ctx::{self, Caller};

/// How often `--follow` looks for new records.
const POLL: Duration = Duration::from_millis(200);

/// The last microsecond RFC 3339 can show (9999-12-31T23:59:59.999999Z).
const MAX_RFC3339_MICROS: u64 = 253_402_300_800 * 1_000_000 - 1;

/// `agentkeys audit` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum AuditAction {
    /// Check the hash chain; exit 7 naming the first bad record when it is broken.
    Verify,
}

/// Runs `agentkeys audit ...`.
pub(crate) fn run(
    caller: &Caller,
    action: Option<AuditAction>,
    follow: bool,
    json: bool,
) -> Result<(), CliError> {
    ctx::require_owner(caller, "audit")?;
    let home = ctx::home()?;
    let path = home.path(AUDIT_FILE);
    match action {
        Some(AuditAction::Verify) => verify(&path),
        None => show(&path, follow, json),
    }
}

fn verify(path: &Path) -> Result<(), CliError> {
    let report = audit::verify(path)?;
    let mut out = io::stdout().lock();
    if report.missing {
        writeln!(out, "audit log intact: 0 records (no log yet)")?;
        return Ok(());
    }
    if let Some(bad) = report.first_bad {
        for note in &report.notes {
            eprintln!("note: {note}");
        }
        let seq = bad.seq.map(|s| format!(" (seq {s})")).unwrap_or_default();
        return Err(CliError::AuditBroken(format!(
            "audit log broken at line {}{seq}: {}",
            bad.line, bad.reason
        )));
    }
    writeln!(
        out,
        "audit log intact: {} record{}",
        report.records,
        if report.records == 1 { "" } else { "s" }
    )?;
    for note in &report.notes {
        writeln!(out, "  note: {note}")?;
    }
    if let Some((seq, hash)) = &report.last {
        // The chain cannot show that its last records were removed; this head, kept elsewhere,
        // can.
        writeln!(out, "  last record: seq {seq}, sha256 {hash}")?;
    }
    Ok(())
}

fn show(path: &Path, follow: bool, json: bool) -> Result<(), CliError> {
    let mut reader = match AuditReader::open(path) {
        Ok(r) => r,
        Err(e) if e.is_not_found() => {
            if !follow {
                writeln!(io::stdout(), "no audit log yet at {}", path.display())?;
                return Ok(());
            }
            eprintln!(
                "no audit log yet at {}; waiting for agentkeysd to write one",
                path.display()
            );
            wait_for(path)?
        }
        Err(e) => return Err(e.into()),
    };
    loop {
        drain(&mut reader, json)?;
        if !follow {
            if let Some(n) = reader.pending() {
                eprintln!(
                    "agentkeys: line {n} has no newline yet (being written, or cut short by a \
                     crash); not shown"
                );
            }
            return Ok(());
        }
        // Archived or removed: once its last lines are printed, go on with the new file.
        if reader.replaced() {
            // Lines appended between the drain above and the move: print them before switching.
            drain(&mut reader, json)?;
            eprintln!(
                "agentkeys: {} was replaced; following the new file",
                path.display()
            );
            reader = wait_for(path)?;
            continue;
        }
        thread::sleep(POLL);
    }
}

/// Prints every complete line not printed yet.
fn drain(reader: &mut AuditReader, json: bool) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    while let Some(line) = reader.next_line()? {
        print_line(&mut out, &line, json)?;
    }
    out.flush()?;
    Ok(())
}

/// Polls until the log can be opened.
fn wait_for(path: &Path) -> Result<AuditReader, CliError> {
    loop {
        match AuditReader::open(path) {
            Ok(r) => return Ok(r),
            Err(e) if e.is_not_found() => thread::sleep(POLL),
            Err(e) => return Err(e.into()),
        }
    }
}

fn print_line(out: &mut impl Write, line: &RawLine, json: bool) -> Result<(), CliError> {
    if line.too_long {
        eprintln!(
            "agentkeys: line {} is longer than any record; skipped (see `agentkeys audit verify`)",
            line.number
        );
        return Ok(());
    }
    match Record::from_line(&line.bytes) {
        Err(why) => eprintln!(
            "agentkeys: line {} is {why}; skipped (see `agentkeys audit verify`)",
            line.number
        ),
        Ok(_) if json => {
            // Exactly as stored (a line that parses as a record is valid JSON).
            out.write_all(&line.bytes)?;
            out.write_all(b"\n")?;
        }
        Ok(rec) => writeln!(out, "{}", human(&rec))?,
    }
    Ok(())
}

/// `2026-11-24T01:02:03.456789Z  #12  deliver  agent=ci-bot  service=github  delivery=fd
/// peer=1000/4242  ok degraded (detail)`; a network peer shows `from=IP:PORT` instead of
/// `peer=`.
fn human(r: &Record) -> String {
    let mut s = if r.ts <= MAX_RFC3339_MICROS {
        humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(r.ts)).to_string()
    } else {
        format!("ts={}", r.ts)
    };
    let _ = write!(s, "  #{}  {}", r.seq, clean(&r.event));
    match (r.role.as_deref(), &r.agent) {
        (Some("owner"), _) => s.push_str("  owner"),
        (_, Some(name)) => {
            let _ = write!(s, "  agent={}", clean(name));
        }
        (Some(other), None) => {
            let _ = write!(s, "  role={}", clean(other));
        }
        (None, None) => {}
    }
    for (key, value) in [
        ("session", &r.session),
        ("service", &r.service),
        ("delivery", &r.delivery),
    ] {
        if let Some(v) = value {
            let _ = write!(s, "  {key}={}", clean(v));
        }
    }
    match r.peer {
        // A network connection: its source address (uid and pid mean nothing there).
        Some(Peer {
            addr: Some(addr), ..
        }) => {
            let _ = write!(s, "  from={addr}");
        }
        Some(p) => {
            let _ = write!(s, "  peer={}/{}", p.uid, p.pid);
        }
        None => {}
    }
    let _ = write!(s, "  {}", clean(&r.outcome));
    if r.degraded {
        s.push_str(" degraded");
    }
    if let Some(d) = &r.detail {
        let _ = write!(s, " ({})", clean(d));
    }
    s
}

/// Escapes what could drive the terminal or disguise a line (an edited log is anyone's text):
/// the one escaping function of every owner-facing display.
fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    agentkeys_proto::display::escape(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record {
            ts: 1_795_482_123_456_789,
            seq: 12,
            event: "deliver".into(),
            role: Some("agent".into()),
            agent: Some("ci-bot".into()),
            session: Some("s-0123456789ab".into()),
            service: Some("github".into()),
            delivery: Some("fd".into()),
            degraded: false,
            peer: Some(Peer::local(1000, 4242)),
            outcome: "ok".into(),
            detail: None,
            prev: "0".repeat(64),
        }
    }

    #[test]
    fn audit_human_form() {
        let ts = humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(rec().ts));
        assert_eq!(
            human(&rec()),
            format!(
                "{ts}  #12  deliver  agent=ci-bot  session=s-0123456789ab  service=github  delivery=fd  peer=1000/4242  ok"
            )
        );
        let r = Record {
            role: Some("owner".into()),
            agent: None,
            ..rec()
        };
        assert!(
            human(&r).contains("  deliver  owner  session=s-0123456789ab  "),
            "{}",
            human(&r)
        );
        let r = Record {
            degraded: true,
            detail: Some("fallback memfd".into()),
            role: None,
            agent: None,
            session: None,
            peer: None,
            ..rec()
        };
        assert_eq!(
            human(&r),
            format!(
                "{ts}  #12  deliver  service=github  delivery=fd  ok degraded (fallback memfd)"
            )
        );
        let r = Record {
            peer: Some(Peer {
                uid: 1000,
                pid: 0,
                addr: Some("100.64.0.7:40123".parse().unwrap()),
            }),
            ..rec()
        };
        assert!(
            human(&r).contains("  delivery=fd  from=100.64.0.7:40123  ok"),
            "{}",
            human(&r)
        );
        let r = Record {
            ts: u64::MAX,
            detail: Some("\u{1b}[2J\u{202e}x".into()),
            ..rec()
        };
        let h = human(&r);
        assert!(h.starts_with("ts=18446744073709551615  #12"), "{h}");
        assert!(h.ends_with(r"(\u{1b}[2J\u{202e}x)"), "{h}");
    }
}
