//! Human approval for high-value services: pending requests with short codes, the owner's
//! decisions, and the grants they create.
//!
//! A request for a high-value service (from anyone) becomes *pending*: it gets a code of
//! [`CODE_CHARS`] characters from an unambiguous alphabet (5 bits each: 50 bits), expires after
//! the approval TTL (5 minutes), and a repeat of the same request (same agent, service and, for
//! `run`, the same argv) gets the same code. The owner approves (once by default, or for a
//! window) or denies it. A grant binds agent + service, and for `run` the exact argv (its
//! SHA-256): a grant for `gh pr list` does not authorize `gh repo delete x`. Wrong codes are
//! counted and, past [`MAX_WRONG_PER_MINUTE`] a minute, refused without being looked at.
//!
//! State is in memory: a restart of the daemon drops pending requests and grants (fail closed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Characters in a code (plus one dash for readability).
pub const CODE_CHARS: usize = 10;
/// Crockford's base32 alphabet: no I, L, O, U.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Wrong codes accepted per minute before further guesses are refused unread.
pub const MAX_WRONG_PER_MINUTE: usize = 20;
/// Open requests one agent may have at once, and in all: a request is cheap to make.
pub const MAX_PENDING_PER_AGENT: usize = 8;
/// Open requests in all.
pub const MAX_PENDING: usize = 128;
/// Longest approval window.
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest command line kept for display.
const MAX_COMMAND_DISPLAY: usize = 256;

/// What a grant or request is for. `argv` is the SHA-256 of a `run`'s whole request, `None` for
/// a credential fetch (`read`, `get_credential`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    /// The agent (or "owner").
    pub agent: String,
    /// The service.
    pub service: String,
    /// For `run`: SHA-256 of the whole request (see `run::request_hash`).
    pub argv: Option<String>,
}

struct Pending {
    subject: Subject,
    command: Option<String>,
    created: Instant,
    denied: bool,
}

struct Grant {
    subject: Subject,
    /// `None`: once.
    until: Option<Instant>,
}

/// Outcome of asking for a high-value service.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// A grant covers it (consumed if it was for once).
    Granted {
        /// True when the grant was single-use and is now gone.
        consumed: bool,
    },
    /// Waiting for the owner: the code and seconds left; `new` for a fresh request.
    Pending {
        /// The code.
        code: String,
        /// Seconds until it expires.
        expires_in: u64,
        /// True when this call created the request.
        new: bool,
    },
    /// The owner denied this request.
    Denied,
    /// Too many open requests (from this agent, or in all).
    Full,
}

/// Why a decision was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum DecideError {
    /// No open request has this code (or it expired).
    UnknownCode,
    /// Too many wrong codes recently.
    RateLimited,
}

/// One open request, for `agentkeys pending`.
pub struct Listed {
    /// The code.
    pub code: String,
    /// Request subject.
    pub subject: Subject,
    /// For `run`: the command line.
    pub command: Option<String>,
    /// Age.
    pub age: Duration,
    /// Time left.
    pub left: Duration,
}

/// The approval table.
pub struct Approvals {
    /// Requests that expired since the last `take_expired`, whoever noticed: all are audited.
    expired: Vec<Subject>,
    ttl: Duration,
    pending: HashMap<String, Pending>,
    grants: Vec<Grant>,
    wrong: Vec<Instant>,
}

fn new_code() -> String {
    let mut raw = [0u8; CODE_CHARS];
    // getrandom cannot fail on Linux once the pool is ready; on failure a fixed pattern would
    // be guessable, so refuse to run without randomness.
    getrandom::fill(&mut raw).expect("the kernel's random number generator is unavailable");
    let chars: String = raw
        .iter()
        .map(|b| ALPHABET[(b & 31) as usize] as char)
        .collect();
    format!("{}-{}", &chars[..5], &chars[5..])
}

/// A command line as the owner sees it: control characters escaped (so a request cannot
/// disguise itself on a terminal), cut to a bounded length.
pub(crate) fn display_command(c: &str) -> String {
    let mut out = String::with_capacity(c.len().min(MAX_COMMAND_DISPLAY) + 8);
    for ch in c.chars() {
        if out.len() >= MAX_COMMAND_DISPLAY {
            out.push_str(" [...]");
            break;
        }
        if ch.is_control() {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    out
}

/// How a stored (normalised) code is shown: two groups of five.
fn display(key: &str) -> String {
    format!("{}-{}", &key[..5], &key[5..])
}

/// Codes are compared without the dash and case-insensitively (humans type them).
fn normalise(code: &str) -> String {
    code.chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

impl Approvals {
    /// A table whose requests live `ttl`.
    pub fn new(ttl: Duration) -> Approvals {
        Approvals {
            expired: Vec::new(),
            ttl,
            pending: HashMap::new(),
            grants: Vec::new(),
            wrong: Vec::new(),
        }
    }

    /// Removes expired requests and grants; returns the expired requests (for the audit).
    pub fn sweep(&mut self) -> Vec<(String, Subject)> {
        let now = Instant::now();
        self.grants.retain(|g| g.until.is_none_or(|u| u > now));
        let ttl = self.ttl;
        let mut gone = Vec::new();
        self.pending.retain(|code, p| {
            let keep = now.duration_since(p.created) < ttl;
            if !keep {
                gone.push((code.clone(), p.subject.clone()));
            }
            keep
        });
        self.expired.extend(gone.iter().map(|(_, s)| s.clone()));
        gone
    }

    /// Every request that expired since the last call, for the audit trail.
    pub fn take_expired(&mut self) -> Vec<Subject> {
        std::mem::take(&mut self.expired)
    }

    /// Asks for `subject`: a grant, the pending request (created if needed), or a denial.
    pub fn check(&mut self, subject: &Subject, command: Option<String>) -> Check {
        let now = Instant::now();
        self.sweep();
        if let Some(i) = self.grants.iter().position(|g| &g.subject == subject) {
            let once = self.grants[i].until.is_none();
            if once {
                self.grants.remove(i);
            }
            return Check::Granted { consumed: once };
        }
        if let Some((code, p)) = self.pending.iter().find(|(_, p)| &p.subject == subject) {
            if p.denied {
                return Check::Denied;
            }
            let left = self.ttl.saturating_sub(now.duration_since(p.created));
            return Check::Pending {
                code: display(code),
                expires_in: left.as_secs(),
                new: false,
            };
        }
        let open_here = self
            .pending
            .values()
            .filter(|p| p.subject.agent == subject.agent && !p.denied)
            .count();
        if open_here >= MAX_PENDING_PER_AGENT || self.pending.len() >= MAX_PENDING {
            return Check::Full;
        }
        let command = command.map(|c| display_command(&c));
        let code = new_code();
        self.pending.insert(
            normalise(&code),
            Pending {
                subject: subject.clone(),
                command,
                created: now,
                denied: false,
            },
        );
        Check::Pending {
            code,
            expires_in: self.ttl.as_secs(),
            new: true,
        }
    }

    fn wrong_code(&mut self) -> DecideError {
        let now = Instant::now();
        self.wrong
            .retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        self.wrong.push(now);
        DecideError::UnknownCode
    }

    fn find(&mut self, code: &str) -> Result<String, DecideError> {
        let now = Instant::now();
        self.wrong
            .retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        if self.wrong.len() >= MAX_WRONG_PER_MINUTE {
            return Err(DecideError::RateLimited);
        }
        self.sweep();
        let key = normalise(code);
        match self.pending.get(&key) {
            Some(p) if !p.denied => Ok(key),
            _ => Err(self.wrong_code()),
        }
    }

    /// Approves: once (`window` None) or for a window. Returns the subject.
    ///
    /// # Errors
    /// [`DecideError`] for an unknown or expired code, or too many wrong codes.
    pub fn approve(
        &mut self,
        code: &str,
        window: Option<Duration>,
    ) -> Result<Subject, DecideError> {
        let key = self.find(code)?;
        let Some(p) = self.pending.remove(&key) else {
            return Err(DecideError::UnknownCode);
        };
        // Clamped, and computed without overflow: a window is a decision, not a crash.
        let until = window.map(|w| {
            let now = Instant::now();
            now.checked_add(w.min(MAX_WINDOW)).unwrap_or(now)
        });
        self.grants.push(Grant {
            subject: p.subject.clone(),
            until,
        });
        Ok(p.subject)
    }

    /// Denies: the request stays (as denied) until it expires, so a repeat is refused.
    ///
    /// # Errors
    /// As [`Approvals::approve`].
    pub fn deny(&mut self, code: &str) -> Result<Subject, DecideError> {
        let key = self.find(code)?;
        let Some(p) = self.pending.get_mut(&key) else {
            return Err(DecideError::UnknownCode);
        };
        p.denied = true;
        Ok(p.subject.clone())
    }

    /// Open (not denied) requests.
    pub fn list(&mut self) -> Vec<Listed> {
        self.sweep();
        let now = Instant::now();
        let mut out: Vec<Listed> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.denied)
            .map(|(k, p)| Listed {
                code: display(k),
                subject: p.subject.clone(),
                command: p.command.clone(),
                age: now.duration_since(p.created),
                left: self.ttl.saturating_sub(now.duration_since(p.created)),
            })
            .collect();
        out.sort_by_key(|l| std::cmp::Reverse(l.left));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subj(agent: &str, service: &str, argv: Option<&str>) -> Subject {
        Subject {
            agent: agent.into(),
            service: service.into(),
            argv: argv.map(str::to_string),
        }
    }

    #[test]
    fn codes_are_unambiguous_and_long_enough() {
        let mut a = Approvals::new(Duration::from_secs(300));
        let Check::Pending {
            code, new: true, ..
        } = a.check(&subj("a", "db", None), None)
        else {
            panic!()
        };
        assert_eq!(code.len(), CODE_CHARS + 1);
        assert!(
            code.chars()
                .all(|c| c == '-' || ALPHABET.contains(&(c as u8))),
            "{code}"
        );
        assert!(!code.contains(['I', 'L', 'O', 'U']));
        // The same request gets the same code.
        let Check::Pending {
            code: again,
            new: false,
            ..
        } = a.check(&subj("a", "db", None), None)
        else {
            panic!()
        };
        assert_eq!(code, again);
    }

    #[test]
    fn once_grant_is_used_once_and_window_repeats() {
        let mut a = Approvals::new(Duration::from_secs(300));
        let s = subj("a", "db", None);
        let Check::Pending { code, .. } = a.check(&s, None) else {
            panic!()
        };
        assert_eq!(a.approve(&code.to_lowercase(), None).unwrap(), s);
        assert_eq!(a.check(&s, None), Check::Granted { consumed: true });
        assert!(matches!(
            a.check(&s, None),
            Check::Pending { new: true, .. }
        ));
        let Check::Pending { code, .. } = a.check(&s, None) else {
            panic!()
        };
        a.approve(&code, Some(Duration::from_secs(600))).unwrap();
        for _ in 0..3 {
            assert_eq!(a.check(&s, None), Check::Granted { consumed: false });
        }
    }

    #[test]
    fn grants_bind_the_exact_command() {
        let mut a = Approvals::new(Duration::from_secs(300));
        let list = subj("a", "gh", Some("hash-of-gh-pr-list"));
        let delete = subj("a", "gh", Some("hash-of-gh-repo-delete"));
        let Check::Pending { code, .. } = a.check(&list, Some("gh pr list".into())) else {
            panic!()
        };
        a.approve(&code, Some(Duration::from_secs(600))).unwrap();
        assert!(matches!(a.check(&delete, None), Check::Pending { .. }));
        assert!(matches!(
            a.check(&subj("other", "gh", Some("hash-of-gh-pr-list")), None),
            Check::Pending { .. }
        ));
        assert_eq!(a.check(&list, None), Check::Granted { consumed: false });
    }

    #[test]
    fn deny_sticks_and_expired_requests_cannot_be_approved() {
        let mut a = Approvals::new(Duration::from_millis(50));
        let s = subj("a", "db", None);
        let Check::Pending { code, .. } = a.check(&s, None) else {
            panic!()
        };
        a.deny(&code).unwrap();
        assert_eq!(a.check(&s, None), Check::Denied);
        assert_eq!(a.approve(&code, None), Err(DecideError::UnknownCode));
        let s2 = subj("b", "db", None);
        let Check::Pending { code, .. } = a.check(&s2, None) else {
            panic!()
        };
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(a.approve(&code, None), Err(DecideError::UnknownCode));
    }

    #[test]
    fn requests_are_capped_commands_escaped_and_windows_clamped() {
        let mut a = Approvals::new(Duration::from_secs(300));
        for i in 0..MAX_PENDING_PER_AGENT {
            assert!(matches!(
                a.check(&subj("a", "db", Some(&i.to_string())), None),
                Check::Pending { .. }
            ));
        }
        assert_eq!(
            a.check(&subj("a", "db", Some("one more")), None),
            Check::Full
        );
        assert!(matches!(
            a.check(&subj("b", "db", None), None),
            Check::Pending { .. }
        ));
        let Check::Pending { code, .. } = a.check(
            &subj("c", "db", Some("x")),
            Some(format!("ls \x1b[2K\r{}", "y".repeat(1000))),
        ) else {
            panic!()
        };
        let listed = a.list().into_iter().find(|l| l.code == code).unwrap();
        let shown = listed.command.unwrap();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.len() < 300, "{}", shown.len());
        // A window far beyond the clamp does not overflow.
        assert!(
            a.approve(&code, Some(Duration::from_secs(u64::MAX)))
                .is_ok()
        );
        assert_eq!(
            a.check(&subj("c", "db", Some("x")), None),
            Check::Granted { consumed: false }
        );
    }

    #[test]
    fn a_thousand_wrong_guesses_approve_nothing() {
        let mut a = Approvals::new(Duration::from_secs(300));
        let s = subj("a", "db", None);
        let Check::Pending { code, .. } = a.check(&s, None) else {
            panic!()
        };
        let mut limited = 0;
        for i in 0..1000 {
            let guess = format!("{:05}-{:05}", i, 1000 - i);
            match a.approve(&guess, None) {
                Ok(_) => panic!("a wrong guess approved something"),
                Err(DecideError::RateLimited) => limited += 1,
                Err(DecideError::UnknownCode) => {}
            }
        }
        assert!(
            limited >= 1000 - MAX_WRONG_PER_MINUTE,
            "rate limit did not engage ({limited})"
        );
        // The real request is still pending and not granted.
        assert!(matches!(a.check(&s, None), Check::Pending { code: c, .. } if c == code));
    }
}
