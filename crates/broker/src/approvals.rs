//! Human approval for high-value services: pending requests with short codes, the owner's
//! decisions, and the grants they create.
//!
//! A request for a high-value service (from anyone) becomes *pending*: it gets a code of
//! [`CODE_CHARS`] characters from an unambiguous alphabet (5 bits each: 50 bits), expires after
//! the approval TTL (5 minutes), and a repeat of the same request (same session, service and,
//! for `run`, the same request hash) gets the same code. The owner approves (once by default, or
//! for a window) or denies it. A grant binds the exact session that asked (not its agent's name:
//! an agent added again under the same name starts with none), the service, and for `run` the
//! SHA-256 of the whole request: a grant for `gh pr list` does not authorize `gh repo delete x`.
//! A once-grant unused for the approval TTL expires. Requests and grants of a session that ends
//! (revoked, expired, replaced) are dropped ([`Approvals::prune`]). Everything that ends is
//! reported through [`Approvals::take_ended`], for the audit trail. Wrong codes are counted and,
//! past [`MAX_WRONG_PER_MINUTE`] a minute, refused without being looked at.
//!
//! State is in memory: a restart of the daemon drops pending requests and grants (fail closed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::sessions::Principal;

/// Characters in a code (plus one dash for readability).
pub const CODE_CHARS: usize = 10;
/// Crockford's base32 alphabet: no I, L, O, U.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Wrong codes accepted per minute before further guesses are refused unread.
pub const MAX_WRONG_PER_MINUTE: usize = 20;
/// Open requests one session may have at once: a request is cheap to make.
pub const MAX_PENDING_PER_AGENT: usize = 8;
/// Open requests in all.
pub const MAX_PENDING: usize = 128;
/// Longest approval window.
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a grant or request is for: the exact session that asked, the service, and for `run`
/// the SHA-256 of the whole request (`None` for a credential fetch: `read`, `get_credential`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The session that asked.
    pub principal: Principal,
    /// The service (for a `run` with several high-value services: their names joined by `,`).
    pub service: String,
    /// For `run`: SHA-256 of the whole request (see `run::request_hash`); for a proxy
    /// injection: SHA-256 of host, port, method and path (`proxy::proxy_request_hash`).
    pub argv: Option<String>,
    /// What a `--for` window grant of this request binds instead of `argv`: for a proxy
    /// injection the host alone (`proxy::proxy_host_hash`), so a window covers the agent
    /// session, the service and the host while a once-grant covers the one request. `None`
    /// for `read` and `run` (a window binds exactly what a once-grant binds).
    pub wider: Option<String>,
}

struct Pending {
    subject: Subject,
    command: Option<String>,
    created: Instant,
    denied: bool,
}

struct Grant {
    id: u64,
    subject: Subject,
    command: Option<String>,
    once: bool,
    granted: Instant,
    /// A window's end, or for a once-grant the moment it lapses unused.
    until: Instant,
}

/// Outcome of asking for a high-value service.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// A grant covers it (consumed if it was for once).
    Granted {
        /// The grant's id (`g` and a number).
        grant: String,
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
    /// Too many open requests (from this session, or in all).
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

/// One live grant, for `agentkeys grants`.
pub struct GrantListed {
    /// `g` and a number, unique for the daemon's lifetime.
    pub id: String,
    /// What it covers.
    pub subject: Subject,
    /// For `run`: the command line.
    pub command: Option<String>,
    /// Single use.
    pub once: bool,
    /// Since it was granted.
    pub age: Duration,
    /// Until it ends (a once-grant: until it lapses unused).
    pub left: Duration,
}

/// Something that ended without a request in flight: for the audit trail.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// A request reached the approval TTL undecided.
    RequestExpired(Subject),
    /// A request's session ended (revoked, expired, replaced): the reason.
    RequestWithdrawn(Subject, &'static str),
    /// A grant ran out: a window's end, or a once-grant unused for the approval TTL.
    GrantExpired {
        /// Its id.
        grant: String,
        /// What it covered.
        subject: Subject,
        /// Whether it was a once-grant.
        once: bool,
    },
    /// A grant was taken back: by the owner, or because its session ended (the reason).
    GrantRevoked {
        /// Its id.
        grant: String,
        /// What it covered.
        subject: Subject,
        /// `by the owner`, `session revoked`, ...
        why: &'static str,
    },
}

/// The approval table.
pub struct Approvals {
    /// What ended since the last `take_ended`, whoever noticed: all of it is audited.
    ended: Vec<Ended>,
    ttl: Duration,
    pending: HashMap<String, Pending>,
    grants: Vec<Grant>,
    next_grant: u64,
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

fn grant_name(id: u64) -> String {
    format!("g{id}")
}

impl Approvals {
    /// A table whose requests live `ttl` (and once-grants lapse after `ttl` unused).
    pub fn new(ttl: Duration) -> Approvals {
        Approvals {
            ended: Vec::new(),
            ttl,
            pending: HashMap::new(),
            grants: Vec::new(),
            next_grant: 1,
            wrong: Vec::new(),
        }
    }

    /// Removes expired requests and grants (recorded for [`Approvals::take_ended`]).
    pub fn sweep(&mut self) {
        let now = Instant::now();
        let ended = &mut self.ended;
        self.grants.retain(|g| {
            let keep = g.until > now;
            if !keep {
                ended.push(Ended::GrantExpired {
                    grant: grant_name(g.id),
                    subject: g.subject.clone(),
                    once: g.once,
                });
            }
            keep
        });
        let ttl = self.ttl;
        self.pending.retain(|_, p| {
            let keep = now.duration_since(p.created) < ttl;
            if !keep {
                ended.push(Ended::RequestExpired(p.subject.clone()));
            }
            keep
        });
    }

    /// Drops the requests and grants of sessions that ended: `ended(principal)` says why a
    /// session is no longer valid (`None` while it is).
    pub fn prune(&mut self, mut ended: impl FnMut(&Principal) -> Option<&'static str>) {
        let out = &mut self.ended;
        let mut verdicts: Vec<(Principal, Option<&'static str>)> = Vec::new();
        let mut why = |p: &Principal| {
            if let Some((_, v)) = verdicts.iter().find(|(q, _)| q == p) {
                return *v;
            }
            let v = ended(p);
            verdicts.push((p.clone(), v));
            v
        };
        self.grants.retain(|g| match why(&g.subject.principal) {
            None => true,
            Some(reason) => {
                out.push(Ended::GrantRevoked {
                    grant: grant_name(g.id),
                    subject: g.subject.clone(),
                    why: reason,
                });
                false
            }
        });
        self.pending.retain(|_, p| match why(&p.subject.principal) {
            None => true,
            Some(reason) => {
                out.push(Ended::RequestWithdrawn(p.subject.clone(), reason));
                false
            }
        });
    }

    /// Everything that ended since the last call, for the audit trail.
    pub fn take_ended(&mut self) -> Vec<Ended> {
        std::mem::take(&mut self.ended)
    }

    /// Asks for `subject`: a grant, the pending request (created if needed), or a denial.
    /// `command` is the request as the owner will be shown it (already escaped).
    pub fn check(&mut self, subject: &Subject, command: Option<String>) -> Check {
        let now = Instant::now();
        self.sweep();
        // A window widened at approval (see `Subject::wider`) covers every request whose
        // `wider` it names.
        let covers = |g: &Grant| {
            &g.subject == subject
                || (subject.wider.is_some()
                    && g.subject.wider.is_none()
                    && g.subject.argv == subject.wider
                    && g.subject.principal == subject.principal
                    && g.subject.service == subject.service)
        };
        if let Some(i) = self.grants.iter().position(covers) {
            let once = self.grants[i].once;
            let grant = grant_name(self.grants[i].id);
            if once {
                self.grants.remove(i);
            }
            return Check::Granted {
                grant,
                consumed: once,
            };
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
            .filter(|p| p.subject.principal == subject.principal && !p.denied)
            .count();
        if open_here >= MAX_PENDING_PER_AGENT || self.pending.len() >= MAX_PENDING {
            return Check::Full;
        }
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

    /// Approves: once (`window` None: it lapses if unused for the approval TTL) or for a
    /// window. Returns the subject and the new grant's id.
    ///
    /// # Errors
    /// [`DecideError`] for an unknown or expired code, or too many wrong codes.
    pub fn approve(
        &mut self,
        code: &str,
        window: Option<Duration>,
    ) -> Result<(Subject, String), DecideError> {
        let key = self.find(code)?;
        let Some(p) = self.pending.remove(&key) else {
            return Err(DecideError::UnknownCode);
        };
        let now = Instant::now();
        // Clamped, and computed without overflow: a window is a decision, not a crash.
        let span = window.map_or(self.ttl, |w| w.min(MAX_WINDOW));
        let until = now.checked_add(span).unwrap_or(now);
        let id = self.next_grant;
        self.next_grant += 1;
        // A window for a proxy request binds its host, not its method and path.
        let subject = match (&window, &p.subject.wider) {
            (Some(_), Some(w)) => Subject {
                argv: Some(w.clone()),
                wider: None,
                ..p.subject.clone()
            },
            _ => p.subject.clone(),
        };
        self.grants.push(Grant {
            id,
            subject,
            command: p.command,
            once: window.is_none(),
            granted: now,
            until,
        });
        Ok((p.subject, grant_name(id)))
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

    /// Open (not denied) requests, newest first.
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

    /// Live grants, oldest first.
    pub fn grants(&mut self) -> Vec<GrantListed> {
        self.sweep();
        let now = Instant::now();
        self.grants
            .iter()
            .map(|g| GrantListed {
                id: grant_name(g.id),
                subject: g.subject.clone(),
                command: g.command.clone(),
                once: g.once,
                age: now.duration_since(g.granted),
                left: g.until.saturating_duration_since(now),
            })
            .collect()
    }

    /// Withdraws grants for the owner: the one with `id` (`g7`), or every grant of the agent
    /// named `agent` (all its sessions), or every grant. Returns how many went (each recorded
    /// for [`Approvals::take_ended`] as revoked `by the owner`).
    pub fn revoke(&mut self, which: Withdraw<'_>) -> usize {
        self.sweep();
        let out = &mut self.ended;
        let before = self.grants.len();
        self.grants.retain(|g| {
            let hit = match which {
                Withdraw::One(id) => grant_name(g.id).eq_ignore_ascii_case(id.trim()),
                Withdraw::Agent(name) => g.subject.principal.agent_name() == Some(name),
                Withdraw::All => true,
            };
            if hit {
                out.push(Ended::GrantRevoked {
                    grant: grant_name(g.id),
                    subject: g.subject.clone(),
                    why: "by the owner",
                });
            }
            !hit
        });
        before - self.grants.len()
    }
}

/// Which grants [`Approvals::revoke`] withdraws.
#[derive(Debug, Clone, Copy)]
pub enum Withdraw<'a> {
    /// One grant, by id.
    One(&'a str),
    /// Every grant of an agent (by name, all its sessions).
    Agent(&'a str),
    /// Every grant.
    All,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Subjects for sessions made up per test: `sessions` keeps one session per agent name.
    struct Sessions(Vec<(String, Principal)>);

    impl Sessions {
        fn new() -> Sessions {
            Sessions(Vec::new())
        }

        fn of(&mut self, agent: &str) -> Principal {
            if let Some((_, p)) = self.0.iter().find(|(n, _)| n == agent) {
                return p.clone();
            }
            let p = Principal::test_agent(agent);
            self.0.push((agent.to_string(), p.clone()));
            p
        }

        fn subj(&mut self, agent: &str, service: &str, argv: Option<&str>) -> Subject {
            Subject {
                principal: self.of(agent),
                service: service.into(),
                argv: argv.map(str::to_string),
                wider: None,
            }
        }
    }

    fn granted(c: &Check, once: bool) -> bool {
        matches!(c, Check::Granted { consumed, .. } if *consumed == once)
    }

    #[test]
    fn codes_are_unambiguous_and_long_enough() {
        let mut ss = Sessions::new();
        let mut a = Approvals::new(Duration::from_secs(300));
        let Check::Pending {
            code, new: true, ..
        } = a.check(&ss.subj("a", "db", None), None)
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
        } = a.check(&ss.subj("a", "db", None), None)
        else {
            panic!()
        };
        assert_eq!(code, again);
    }

    #[test]
    fn once_grant_is_used_once_and_window_repeats() {
        let mut ss = Sessions::new();
        let mut a = Approvals::new(Duration::from_secs(300));
        let s = ss.subj("a", "db", None);
        let Check::Pending { code, .. } = a.check(&s, None) else {
            panic!()
        };
        let (subject, grant) = a.approve(&code.to_lowercase(), None).unwrap();
        assert_eq!(subject, s);
        assert_eq!(grant, "g1");
        assert!(granted(&a.check(&s, None), true));
        assert!(matches!(
            a.check(&s, None),
            Check::Pending { new: true, .. }
        ));
        let Check::Pending { code, .. } = a.check(&s, None) else {
            panic!()
        };
        a.approve(&code, Some(Duration::from_secs(600))).unwrap();
        for _ in 0..3 {
            assert!(granted(&a.check(&s, None), false));
        }
    }

    #[test]
    fn grants_bind_the_exact_command_and_session() {
        let mut ss = Sessions::new();
        let mut a = Approvals::new(Duration::from_secs(300));
        let list = ss.subj("a", "gh", Some("hash-of-gh-pr-list"));
        let delete = ss.subj("a", "gh", Some("hash-of-gh-repo-delete"));
        let Check::Pending { code, .. } = a.check(&list, Some("gh pr list".into())) else {
            panic!()
        };
        a.approve(&code, Some(Duration::from_secs(600))).unwrap();
        assert!(matches!(a.check(&delete, None), Check::Pending { .. }));
        assert!(matches!(
            a.check(&ss.subj("other", "gh", Some("hash-of-gh-pr-list")), None),
            Check::Pending { .. }
        ));
        // Another session of an agent with the same name (revoked and added again) has no
        // grant: grants belong to sessions, not names.
        let same_name_new_session = Subject {
            principal: Principal::test_agent("a"),
            ..list.clone()
        };
        assert!(matches!(
            a.check(&same_name_new_session, None),
            Check::Pending { .. }
        ));
        assert!(granted(&a.check(&list, None), false));
    }

    /// Issue 16: a once-grant of a proxy request covers that request (host, method, path)
    /// once; a `--for` window covers the agent session, service and host, any method and path.
    #[test]
    fn proxy_windows_bind_the_host_and_once_grants_the_request() {
        let mut a = Approvals::new(Duration::from_secs(300));
        let agent = Principal::test_agent("a");
        let req = |path: &str, host: &str| Subject {
            principal: agent.clone(),
            service: "bank".into(),
            argv: Some(format!("{host} GET {path}")),
            wider: Some(format!("host {host}")),
        };
        let Check::Pending { code, .. } = a.check(&req("/pay", "h1"), None) else {
            panic!()
        };
        a.approve(&code, None).unwrap();
        assert!(matches!(
            a.check(&req("/other", "h1"), None),
            Check::Pending { .. }
        ));
        assert!(matches!(
            a.check(&req("/pay", "h1"), None),
            Check::Granted { consumed: true, .. }
        ));
        assert!(matches!(
            a.check(&req("/pay", "h1"), None),
            Check::Pending { .. }
        ));
        let Check::Pending { code, .. } = a.check(&req("/x", "h2"), None) else {
            panic!()
        };
        a.approve(&code, Some(Duration::from_secs(60))).unwrap();
        assert!(matches!(
            a.check(&req("/y", "h2"), None),
            Check::Granted {
                consumed: false,
                ..
            }
        ));
        assert!(matches!(
            a.check(&req("/z", "h2"), None),
            Check::Granted {
                consumed: false,
                ..
            }
        ));
        assert!(!matches!(
            a.check(&req("/y", "h3"), None),
            Check::Granted { .. }
        ));
    }

    /// Issue 14, item 2: the owner is a kind, not a name. An agent called `owner` (refused by
    /// `agent add` now; a registry from before could hold one) never uses the owner's grants.
    #[test]
    fn an_agent_named_owner_does_not_share_the_owners_grants() {
        let mut a = Approvals::new(Duration::from_secs(300));
        let owner = Subject {
            principal: Principal::test_owner(),
            service: "db".into(),
            argv: None,
            wider: None,
        };
        let Check::Pending { code, .. } = a.check(&owner, None) else {
            panic!()
        };
        a.approve(&code, Some(Duration::from_secs(600))).unwrap();
        let impostor = Subject {
            principal: Principal::test_agent("owner"),
            ..owner.clone()
        };
        assert_ne!(impostor.principal, owner.principal);
        assert!(matches!(a.check(&impostor, None), Check::Pending { .. }));
        assert!(granted(&a.check(&owner, None), false));
    }

    #[test]
    fn deny_sticks_and_expired_requests_cannot_be_approved() {
        let mut ss = Sessions::new();
        let mut a = Approvals::new(Duration::from_millis(50));
        let s = ss.subj("a", "db", None);
        let Check::Pending { code, .. } = a.check(&s, None) else {
            panic!()
        };
        a.deny(&code).unwrap();
        assert_eq!(a.check(&s, None), Check::Denied);
        assert_eq!(a.approve(&code, None), Err(DecideError::UnknownCode));
        let s2 = ss.subj("b", "db", None);
        let Check::Pending { code, .. } = a.check(&s2, None) else {
            panic!()
        };
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(a.approve(&code, None), Err(DecideError::UnknownCode));
        let ended = a.take_ended();
        assert!(ended.contains(&Ended::RequestExpired(s2)), "{ended:?}");
    }

    #[test]
    fn an_unused_once_grant_lapses_after_the_approval_ttl() {
        let mut ss = Sessions::new();
        let mut a = Approvals::new(Duration::from_millis(50));
        let s = ss.subj("a", "db", None);
        let Check::Pending { code, .. } = a.check(&s, None) else {
            panic!()
        };
        a.approve(&code, None).unwrap();
        assert_eq!(a.grants().len(), 1);
        std::thread::sleep(Duration::from_millis(80));
        a.sweep();
        assert!(a.grants().is_empty());
        assert!(a.take_ended().contains(&Ended::GrantExpired {
            grant: "g1".into(),
            subject: s.clone(),
            once: true
        }));
        // Not usable any more: a new request.
        assert!(matches!(
            a.check(&s, None),
            Check::Pending { new: true, .. }
        ));
    }

    #[test]
    fn ended_sessions_lose_their_requests_and_grants() {
        let mut ss = Sessions::new();
        let mut a = Approvals::new(Duration::from_secs(300));
        let (gone, stays) = (ss.subj("gone", "db", None), ss.subj("stays", "db", None));
        for s in [&gone, &stays] {
            let Check::Pending { code, .. } = a.check(s, None) else {
                panic!()
            };
            a.approve(&code, Some(Duration::from_secs(600))).unwrap();
        }
        let pending_gone = ss.subj("gone", "other", None);
        assert!(matches!(
            a.check(&pending_gone, None),
            Check::Pending { .. }
        ));
        let dead = gone.principal.clone();
        a.prune(|p| (*p == dead).then_some("session revoked"));
        let ended = a.take_ended();
        assert!(ended.contains(&Ended::GrantRevoked {
            grant: "g1".into(),
            subject: gone.clone(),
            why: "session revoked"
        }));
        assert!(ended.contains(&Ended::RequestWithdrawn(pending_gone, "session revoked")));
        assert_eq!(ended.len(), 2, "{ended:?}");
        let live: Vec<String> = a.grants().into_iter().map(|g| g.id).collect();
        assert_eq!(live, vec!["g2".to_string()]);
        assert!(a.list().is_empty());
    }

    #[test]
    fn the_owner_withdraws_one_grant_or_all_of_an_agents() {
        let mut ss = Sessions::new();
        let mut a = Approvals::new(Duration::from_secs(300));
        for (agent, svc) in [("a", "x"), ("a", "y"), ("b", "x")] {
            let Check::Pending { code, .. } = a.check(&ss.subj(agent, svc, None), None) else {
                panic!()
            };
            a.approve(&code, Some(Duration::from_secs(600))).unwrap();
        }
        assert_eq!(a.revoke(Withdraw::One("g9")), 0);
        assert_eq!(a.revoke(Withdraw::One("G3")), 1);
        assert_eq!(a.revoke(Withdraw::Agent("a")), 2);
        assert!(a.grants().is_empty());
        let ended = a.take_ended();
        assert_eq!(ended.len(), 3);
        assert!(ended.iter().all(|e| matches!(
            e,
            Ended::GrantRevoked {
                why: "by the owner",
                ..
            }
        )));
    }

    #[test]
    fn requests_are_capped_and_windows_clamped() {
        let mut ss = Sessions::new();
        let mut a = Approvals::new(Duration::from_secs(300));
        for i in 0..MAX_PENDING_PER_AGENT {
            assert!(matches!(
                a.check(&ss.subj("a", "db", Some(&i.to_string())), None),
                Check::Pending { .. }
            ));
        }
        assert_eq!(
            a.check(&ss.subj("a", "db", Some("one more")), None),
            Check::Full
        );
        assert!(matches!(
            a.check(&ss.subj("b", "db", None), None),
            Check::Pending { .. }
        ));
        let c = ss.subj("c", "db", Some("x"));
        let Check::Pending { code, .. } = a.check(&c, Some("ls".into())) else {
            panic!()
        };
        // A window far beyond the clamp does not overflow.
        assert!(
            a.approve(&code, Some(Duration::from_secs(u64::MAX)))
                .is_ok()
        );
        assert!(granted(&a.check(&c, None), false));
        let g = a.grants().into_iter().next().unwrap();
        assert!(g.left <= MAX_WINDOW && g.command.as_deref() == Some("ls"));
    }

    #[test]
    fn a_thousand_wrong_guesses_approve_nothing() {
        let mut ss = Sessions::new();
        let mut a = Approvals::new(Duration::from_secs(300));
        let s = ss.subj("a", "db", None);
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
