//! The agent registry, sealed in `agents.enc`.
//!
//! Each agent has a name, a scope (service names or `*`), an optional uid it must connect as,
//! an expiry, an optional revocation time, and the SHA-256 of its token. The token itself is
//! shown once by `agent add` and never stored. The whole registry is one sealed blob (AAD
//! `agentkeys agents.enc v1`), so not even the hashes or the names appear in a file in clear.
//! Plaintext: `{"v":1,"agents":[{"name":…,"scope":[…],"uid":…,"created":…,"expires":…,
//! "revoked":…,"token_hash":"<64 hex>","remote":true}]}` (`remote` only for remote agents; files
//! written before it existed load as local agents).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{Dek, KEY_LEN, open, seal};
use crate::error::StateError;
use crate::home::{AGENTS_FILE, FileStamp, Home, StateLock, read_state_file, write_atomic};
use crate::names::check_name;
use crate::token::{SessionToken, TokenHash};
use crate::vault::{VaultIndex, validate_service_name};

/// Associated data of `agents.enc`.
const AGENTS_AAD: &[u8] = b"agentkeys agents.enc v1";
/// Largest plausible `agents.enc`.
const MAX_AGENTS_LEN: u64 = 16 * 1024 * 1024;
/// Plaintext format version.
const AGENTS_VERSION: u32 = 1;
/// Longest agent session. Long enough for service agents, short enough that a forgotten token
/// dies eventually.
pub const MAX_AGENT_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Most scope entries per agent.
const MAX_SCOPE: usize = 256;

/// One registered agent. No `Debug`: it holds a token hash.
#[derive(Clone)]
pub struct AgentRecord {
    /// `[a-z0-9][a-z0-9_-]{0,63}`.
    pub name: String,
    /// Service names it may use, or `["*"]`.
    pub scope: Vec<String>,
    /// The uid it must connect as, if bound to one.
    pub uid: Option<u32>,
    /// When it was added, unix seconds.
    pub created: u64,
    /// When its session expires, unix seconds.
    pub expires: u64,
    /// When it was revoked, unix seconds.
    pub revoked: Option<u64>,
    /// SHA-256 of its token.
    pub token_hash: TokenHash,
    /// A remote principal (`agent add --remote`, typically another host's agentkeysd): its
    /// token is valid only on the daemon's network listeners, never on the unix socket; a
    /// local agent's token is valid only on the unix socket.
    pub remote: bool,
}

/// Whether an agent's session is usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Usable.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked (takes precedence over expired).
    Revoked,
}

impl AgentRecord {
    /// Its status at `now` (unix seconds).
    pub fn status(&self, now: u64) -> AgentStatus {
        if self.revoked.is_some() {
            AgentStatus::Revoked
        } else if now >= self.expires {
            AgentStatus::Expired
        } else {
            AgentStatus::Active
        }
    }

    /// Whether its scope covers `service`.
    pub fn allows(&self, service: &str) -> bool {
        self.scope.iter().any(|s| s == "*" || s == service)
    }
}

/// All registered agents (revoked and expired ones included, so they get a clear error).
#[derive(Clone, Default)]
pub struct AgentRegistry {
    /// The agents, sorted by name.
    pub agents: Vec<AgentRecord>,
}

impl AgentRegistry {
    /// The agent whose token hashes to `h`. Compares against every record in constant time and
    /// does not stop at the first match, so timing says nothing about which hash matched.
    /// The caller checks [`AgentRecord::status`].
    pub fn find_by_token(&self, h: &TokenHash) -> Option<&AgentRecord> {
        let mut found = None;
        for rec in &self.agents {
            if rec.token_hash.ct_eq(h) {
                found = Some(rec);
            }
        }
        found
    }

    /// The agent named `name`.
    pub fn get(&self, name: &str) -> Option<&AgentRecord> {
        self.agents.iter().find(|a| a.name == name)
    }
}

#[derive(Serialize)]
struct StoredOut<'a> {
    v: u32,
    agents: Vec<AgentOut<'a>>,
}

#[derive(Serialize)]
struct AgentOut<'a> {
    name: &'a str,
    scope: &'a [String],
    uid: Option<u32>,
    created: u64,
    expires: u64,
    revoked: Option<u64>,
    token_hash: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    remote: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredIn<'a> {
    v: u32,
    #[serde(borrow)]
    agents: Vec<AgentIn<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentIn<'a> {
    name: String,
    scope: Vec<String>,
    uid: Option<u32>,
    created: u64,
    expires: u64,
    revoked: Option<u64>,
    #[serde(borrow)]
    token_hash: &'a str,
    /// Absent in files written before remote agents existed: a local agent.
    #[serde(default)]
    remote: bool,
}

/// Names the daemon uses for itself or for the owner: no agent may be called one of them, so
/// that no record, listing or message can make an agent look like the owner or like agentkeys.
/// (Owner and agents are different kinds everywhere; these names are reserved on top of that,
/// for the humans reading.)
pub const RESERVED_AGENT_NAMES: &[&str] = &[
    "owner",
    "root",
    "daemon",
    "system",
    "agentkeys",
    "agentkeysd",
    "launcher",
    "jail",
    "proxy",
    "remote",
];

/// Validates an agent name: `[a-z0-9][a-z0-9_-]{0,63}`, not one of [`RESERVED_AGENT_NAMES`].
///
/// # Errors
/// [`StateError::InvalidName`] saying which rule it breaks (without repeating it, unless it is
/// a reserved name).
pub fn validate_agent_name(name: &str) -> Result<(), StateError> {
    check_agent_syntax(name)?;
    if RESERVED_AGENT_NAMES.contains(&name) {
        return Err(StateError::InvalidName {
            kind: "agent",
            detail: format!(
                "{name:?} is reserved for agentkeys itself or the owner; choose another name"
            ),
        });
    }
    Ok(())
}

/// The syntax rule alone: what `revoke` accepts, so that an agent registered under a name that
/// was reserved later can still be revoked.
fn check_agent_syntax(name: &str) -> Result<(), StateError> {
    check_name(
        "agent",
        name,
        b"_-",
        "1 to 64 of a-z 0-9 _ - (lowercase), starting with a letter or digit",
    )
}

/// Reads and opens `agents.enc`; a missing file is an empty registry.
///
/// # Errors
/// [`StateError::DekWrong`] when `dek` does not open it, [`StateError::Corrupt`] for malformed
/// content, plus the file-access errors of [`crate::open_state_file`].
pub fn load_agents(home: &Home, dek: &[u8; KEY_LEN]) -> Result<AgentRegistry, StateError> {
    let path = home.path(AGENTS_FILE);
    let Some((sealed, _)) = read_state_file(&path, MAX_AGENTS_LEN)? else {
        return Ok(AgentRegistry::default());
    };
    let plain =
        open(dek, AGENTS_AAD, &sealed).map_err(|_| StateError::DekWrong { file: path.clone() })?;
    let stored: StoredIn<'_> = serde_json::from_slice(&plain)
        .map_err(|_| StateError::corrupt(&path, "the sealed agent registry is not valid"))?;
    if stored.v != AGENTS_VERSION {
        return Err(StateError::corrupt(
            &path,
            format!(
                "agent registry format version {} is not supported",
                stored.v
            ),
        ));
    }
    let mut agents = Vec::with_capacity(stored.agents.len());
    for a in stored.agents {
        let token_hash = TokenHash::from_hex(a.token_hash)
            .ok_or_else(|| StateError::corrupt(&path, "an agent's token hash is malformed"))?;
        agents.push(AgentRecord {
            name: a.name,
            scope: a.scope,
            uid: a.uid,
            created: a.created,
            expires: a.expires,
            revoked: a.revoked,
            token_hash,
            remote: a.remote,
        });
    }
    Ok(AgentRegistry { agents })
}

/// Seals the registry into `agents.enc`. Call under [`StateLock`].
fn write_agents(home: &Home, dek: &[u8; KEY_LEN], reg: &AgentRegistry) -> Result<(), StateError> {
    // The hex strings live (zeroizing) until the plaintext is sealed.
    let hexes: Vec<Zeroizing<String>> = reg.agents.iter().map(|a| a.token_hash.to_hex()).collect();
    let out = StoredOut {
        v: AGENTS_VERSION,
        agents: reg
            .agents
            .iter()
            .zip(&hexes)
            .map(|(a, h)| AgentOut {
                name: &a.name,
                scope: &a.scope,
                uid: a.uid,
                created: a.created,
                expires: a.expires,
                revoked: a.revoked,
                token_hash: h.as_str(),
                remote: a.remote,
            })
            .collect(),
    };
    // Generous capacity so the buffer holding hashes rarely reallocates while filling (and the
    // binaries' allocator wipes freed blocks when it does).
    let cap = 64
        + reg
            .agents
            .iter()
            .map(|a| 256 + a.name.len() + a.scope.iter().map(|s| s.len() + 4).sum::<usize>())
            .sum::<usize>();
    let mut plain = Zeroizing::new(Vec::with_capacity(cap));
    serde_json::to_writer(&mut *plain, &out).map_err(|e| StateError::Corrupt {
        path: home.path(AGENTS_FILE),
        detail: format!("cannot serialise the agent registry ({e})"),
    })?;
    let sealed = seal(dek, AGENTS_AAD, &plain)?;
    write_atomic(home.root(), AGENTS_FILE, &sealed)
}

/// Checks and normalises a scope list: at least one entry, each a service name or `*`,
/// duplicates dropped (first occurrence kept).
fn normalise_scope(scope: &[String]) -> Result<Vec<String>, StateError> {
    if scope.is_empty() {
        return Err(StateError::InvalidScope {
            detail: "it is empty; give service names (e.g. --scope github,npm) or `*` for all"
                .into(),
        });
    }
    if scope.len() > MAX_SCOPE {
        return Err(StateError::InvalidScope {
            detail: format!("{} entries, at most {MAX_SCOPE}", scope.len()),
        });
    }
    let mut out: Vec<String> = Vec::with_capacity(scope.len());
    for (i, s) in scope.iter().enumerate() {
        if s != "*" {
            validate_service_name(s).map_err(|e| StateError::InvalidScope {
                detail: format!("entry {}: {e}", i + 1),
            })?;
        }
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

/// Checks that `dek` is the key of this home before anything is written with it.
fn verify_dek(home: &Home, dek: &Dek) -> Result<(), StateError> {
    VaultIndex::read(home)?.check_key(dek.expose())
}

/// Mints a child session for a new agent and registers it. An unrevoked, unexpired agent of the
/// same name is an error; a revoked or expired one is replaced. Returns the record and the token,
/// which exists nowhere else: show it once.
///
/// # Errors
/// [`StateError::InvalidName`], [`StateError::InvalidScope`], [`StateError::InvalidTtl`] for bad
/// input; [`StateError::AgentExists`]; [`StateError::NotInitialized`]; [`StateError::DekWrong`];
/// file and lock errors. Nothing is written on error.
pub fn add_agent(
    home: &Home,
    dek: &Dek,
    name: &str,
    scope: &[String],
    ttl: Duration,
    uid: Option<u32>,
) -> Result<(AgentRecord, SessionToken), StateError> {
    add_agent_with(home, dek, name, scope, ttl, uid, false)
}

/// [`add_agent`] for a local (`remote` false) or a remote agent (`agent add --remote`: its
/// token is valid only on network listeners). A remote agent cannot be bound to a uid (no uid
/// crosses a network).
///
/// # Errors
/// As [`add_agent`]; [`StateError::InvalidScope`] for a remote agent with a uid.
pub fn add_agent_with(
    home: &Home,
    dek: &Dek,
    name: &str,
    scope: &[String],
    ttl: Duration,
    uid: Option<u32>,
    remote: bool,
) -> Result<(AgentRecord, SessionToken), StateError> {
    validate_agent_name(name)?;
    if remote && uid.is_some() {
        return Err(StateError::InvalidScope {
            detail: "a remote agent connects over the network, where no uid is known: \
                     leave out --uid"
                .into(),
        });
    }
    let scope = normalise_scope(scope)?;
    if ttl.as_secs() == 0 || ttl > MAX_AGENT_TTL {
        return Err(StateError::InvalidTtl {
            detail: format!(
                "an agent session lasts from 1 second to {} days",
                MAX_AGENT_TTL.as_secs() / 86400
            ),
        });
    }
    let (_lock, mut reg) = begin_write(home, dek)?;
    let now = crate::now()?;
    if let Some(existing) = reg.get(name)
        && existing.status(now) == AgentStatus::Active
    {
        return Err(StateError::AgentExists {
            name: name.to_owned(),
            expires: existing.expires,
        });
    }
    reg.agents.retain(|a| a.name != name);
    let token = SessionToken::generate()?;
    let record = AgentRecord {
        name: name.to_owned(),
        scope,
        uid,
        created: now,
        expires: now + ttl.as_secs(),
        revoked: None,
        token_hash: token.hash(),
        remote,
    };
    reg.agents.push(record.clone());
    reg.agents.sort_by(|a, b| a.name.cmp(&b.name));
    write_agents(home, dek.expose(), &reg)?;
    Ok((record, token))
}

/// The registry under [`StateLock`], after checking the home is initialized and `dek` is its key.
fn begin_write(home: &Home, dek: &Dek) -> Result<(StateLock, AgentRegistry), StateError> {
    if !home.is_initialized() {
        return Err(StateError::NotInitialized {
            home: home.root().to_path_buf(),
        });
    }
    let lock = StateLock::acquire(home)?;
    verify_dek(home, dek)?;
    let reg = load_agents(home, dek.expose())?;
    Ok((lock, reg))
}

/// Revokes an agent at once. Revoking a revoked agent changes nothing and returns its record.
///
/// # Errors
/// [`StateError::NoSuchAgent`]; [`StateError::NotInitialized`]; [`StateError::DekWrong`]; file
/// and lock errors.
pub fn revoke_agent(home: &Home, dek: &Dek, name: &str) -> Result<AgentRecord, StateError> {
    check_agent_syntax(name)?;
    let (_lock, mut reg) = begin_write(home, dek)?;
    let now = crate::now()?;
    let Some(rec) = reg.agents.iter_mut().find(|a| a.name == name) else {
        return Err(StateError::NoSuchAgent {
            name: name.to_owned(),
        });
    };
    if rec.revoked.is_some() {
        return Ok(rec.clone());
    }
    rec.revoked = Some(now);
    let out = rec.clone();
    write_agents(home, dek.expose(), &reg)?;
    Ok(out)
}

/// The stamp of `agents.enc`, so the daemon knows when to reload it (take it *before* loading).
pub fn agents_stamp(home: &Home) -> Option<FileStamp> {
    FileStamp::of_path(&home.path(AGENTS_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{InitOutcome, init, open_owner};
    use crate::testutil::{TempHome, all_files, contains};
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

    fn initialized(tag: &str) -> (TempHome, Home, Dek) {
        let t = TempHome::new(tag);
        let home = t.home();
        assert!(matches!(
            init(&home, false).unwrap(),
            InitOutcome::Initialized(_)
        ));
        let (_, dek) = open_owner(&home).unwrap();
        (t, home, dek)
    }

    fn scope(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn agent_add_revoke_find_by_token() {
        let (_t, home, dek) = initialized("agents");
        let day = Duration::from_secs(86400);
        let (rec, token) = add_agent(
            &home,
            &dek,
            "ci-bot",
            &scope(&["github", "npm", "github"]),
            day,
            Some(1000),
        )
        .unwrap();
        assert_eq!(rec.scope, scope(&["github", "npm"]));
        assert_eq!(rec.uid, Some(1000));
        let (_, token2) = add_agent(&home, &dek, "all", &scope(&["*"]), day, None).unwrap();

        let reg = load_agents(&home, dek.expose()).unwrap();
        assert_eq!(reg.agents.len(), 2);
        let found = reg.find_by_token(&token.hash()).unwrap();
        assert_eq!(found.name, "ci-bot");
        assert!(found.allows("github") && !found.allows("openai"));
        assert_eq!(reg.find_by_token(&token2.hash()).unwrap().name, "all");
        assert!(reg.get("all").unwrap().allows("anything"));
        assert!(
            reg.find_by_token(&SessionToken::generate().unwrap().hash())
                .is_none()
        );

        // Active agent of the same name: refused, registry unchanged.
        let before = std::fs::read(home.path(AGENTS_FILE)).unwrap();
        let err = add_agent(&home, &dek, "ci-bot", &scope(&["x"]), day, None)
            .err()
            .unwrap();
        assert!(matches!(err, StateError::AgentExists { .. }), "{err}");
        assert_eq!(std::fs::read(home.path(AGENTS_FILE)).unwrap(), before);

        // Revoke: immediate, idempotent; then the name can be reused with a new token.
        let now = crate::now().unwrap();
        let r = revoke_agent(&home, &dek, "ci-bot").unwrap();
        assert_eq!(r.status(now), AgentStatus::Revoked);
        let reg = load_agents(&home, dek.expose()).unwrap();
        assert_eq!(
            reg.find_by_token(&token.hash()).unwrap().status(now),
            AgentStatus::Revoked
        );
        let again = revoke_agent(&home, &dek, "ci-bot").unwrap();
        assert_eq!(again.revoked, r.revoked);
        assert!(matches!(
            revoke_agent(&home, &dek, "ghost"),
            Err(StateError::NoSuchAgent { .. })
        ));
        let (_, token3) = add_agent(&home, &dek, "ci-bot", &scope(&["github"]), day, None).unwrap();
        let reg = load_agents(&home, dek.expose()).unwrap();
        assert!(reg.find_by_token(&token.hash()).is_none(), "old token gone");
        assert_eq!(
            reg.find_by_token(&token3.hash()).unwrap().status(now),
            AgentStatus::Active
        );
    }

    #[test]
    fn agent_input_validation_changes_nothing() {
        let (_t, home, dek) = initialized("agentval");
        let day = Duration::from_secs(86400);
        for bad in [
            "",
            "Bot",
            "-bot",
            "bot.x",
            "bot name",
            &"a".repeat(65),
            "owner",
            "agentkeysd",
        ] {
            assert!(
                matches!(
                    add_agent(&home, &dek, bad, &scope(&["*"]), day, None),
                    Err(StateError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
        validate_agent_name(&"a".repeat(64)).unwrap();
        validate_agent_name("0bot_1-x").unwrap();
        assert!(matches!(
            add_agent(&home, &dek, "b", &[], day, None),
            Err(StateError::InvalidScope { .. })
        ));
        assert!(matches!(
            add_agent(&home, &dek, "b", &scope(&["GitHub"]), day, None),
            Err(StateError::InvalidScope { .. })
        ));
        assert!(matches!(
            add_agent(&home, &dek, "b", &scope(&["*"]), Duration::ZERO, None),
            Err(StateError::InvalidTtl { .. })
        ));
        assert!(matches!(
            add_agent(&home, &dek, "b", &scope(&["*"]), MAX_AGENT_TTL + day, None),
            Err(StateError::InvalidTtl { .. })
        ));
        assert!(!home.path(AGENTS_FILE).exists());

        let wrong = Dek::generate().unwrap();
        assert!(matches!(
            add_agent(&home, &wrong, "b", &scope(&["*"]), day, None),
            Err(StateError::DekWrong { .. })
        ));
        assert!(!home.path(AGENTS_FILE).exists());
    }

    #[test]
    fn token_and_hash_never_in_any_file_in_clear() {
        let (_t, home, dek) = initialized("agentleak");
        let (rec, token) = add_agent(
            &home,
            &dek,
            "leaky",
            &scope(&["*"]),
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        let hash = rec.token_hash.bytes().to_vec();
        let hex = rec.token_hash.to_hex();
        let mut needles: Vec<Vec<u8>> = vec![
            token.expose().as_bytes().to_vec(),
            token.expose().as_bytes()[4..].to_vec(),
            hash.clone(),
            hex.as_bytes().to_vec(),
            hex.to_uppercase().into_bytes(),
            b"leaky".to_vec(),
        ];
        for e in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            let b = e.encode(&hash);
            // Drop the last characters, which depend on what follows in a longer encoding.
            needles.push(b.as_bytes()[..40].to_vec());
        }
        for (path, bytes) in all_files(home.root()) {
            for n in &needles {
                assert!(
                    !contains(&bytes, n),
                    "{} contains a token, its hash or the agent name",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn agents_file_with_wrong_key_or_tampered_is_refused() {
        let (_t, home, dek) = initialized("agenttamper");
        add_agent(
            &home,
            &dek,
            "a",
            &scope(&["*"]),
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        let other = Dek::generate().unwrap();
        assert!(matches!(
            load_agents(&home, other.expose()),
            Err(StateError::DekWrong { .. })
        ));
        let stamp = agents_stamp(&home).unwrap();
        let mut bytes = std::fs::read(home.path(AGENTS_FILE)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        write_atomic(home.root(), AGENTS_FILE, &bytes).unwrap();
        assert_ne!(agents_stamp(&home).unwrap(), stamp);
        assert!(load_agents(&home, dek.expose()).is_err());
    }

    #[test]
    fn remote_agents_round_trip_and_old_files_load_as_local() {
        let (_t, home, dek) = initialized("agents-remote");
        let day = Duration::from_secs(86400);
        add_agent(&home, &dek, "local", &scope(&["*"]), day, None).unwrap();
        add_agent_with(&home, &dek, "vm1", &scope(&["github"]), day, None, true).unwrap();
        let reg = load_agents(&home, dek.expose()).unwrap();
        assert!(!reg.get("local").unwrap().remote);
        assert!(reg.get("vm1").unwrap().remote);
        // A local record is written exactly as before remote agents existed (no `remote` key),
        // so files of older versions, which lack the key, load as local agents.
        let sealed = std::fs::read(home.path(AGENTS_FILE)).unwrap();
        let plain = open(dek.expose(), AGENTS_AAD, &sealed).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        let agents = v["agents"].as_array().unwrap();
        assert!(
            agents[0].get("remote").is_none(),
            "a local agent has no remote key"
        );
        assert_eq!(agents[1]["remote"], serde_json::Value::Bool(true));
        // No uid crosses a network: a remote agent bound to one is refused, nothing written.
        let err = add_agent_with(&home, &dek, "vm2", &scope(&["*"]), day, Some(1000), true)
            .err()
            .unwrap();
        assert!(err.to_string().contains("--uid"), "{err}");
        assert!(
            load_agents(&home, dek.expose())
                .unwrap()
                .get("vm2")
                .is_none()
        );
    }
}
