//! Who may talk to the daemon: the owner session (session.enc) and the agent registry
//! (agents.enc), reloaded whenever their files change. The daemon keeps token *hashes* only.
//!
//! A connection's [`Principal`] is the exact session it authenticated with, not a name: the
//! owner's session or one agent's, identified by its token's hash. Every request re-checks it
//! with [`Sessions::check`]: a session that was revoked, has expired, or was *replaced* (a new
//! owner session from `init --force`; `agent add` of the same name, which mints a new token) is
//! refused, and its connections are closed, also while idle (the server's one-second tick).
//! Authentication binds a token to the peer's uid, for as long as the connection lives: the
//! owner must connect from the daemon's uid; an agent from the uid it was bound to (`agent add
//! --uid`), else from the daemon's uid.
//!
//! A session is also bound to the kind of link it was opened on: a remote agent's token
//! (`agent add --remote`) opens a session only on a network listener, every other token (the
//! owner's included) only on the unix socket. [`Sessions::check`] enforces it with the rest.

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use agentkeys_proto::wire::{Role, SessionInfo};
use agentkeys_state::StateError;
use agentkeys_state::agents::{AgentRecord, AgentRegistry, AgentStatus, agents_stamp, load_agents};
use agentkeys_state::audit::Who;
use agentkeys_state::home::{FileStamp, Home};
use agentkeys_state::identity::Identity;
use agentkeys_state::session::{load_owner_session, owner_session_stamp};
use agentkeys_state::token::{SessionToken, TokenHash};
use secrecy::SecretString;

use crate::keys::KeyPage;

/// The exact session a connection authenticated with. Cheap to clone (shared); compared by
/// session (the whole token hash, in constant time), never by name. No token inside, only its
/// hash, which is never shown: [`Principal::session_id`] names it.
#[derive(Clone)]
pub struct Principal(Arc<SessionRef>);

struct SessionRef {
    /// `None` for the owner, the agent's name otherwise.
    agent: Option<String>,
    /// Opened on a network listener (else on the unix socket).
    network: bool,
    /// [`TokenHash::session_id`], computed once.
    id: String,
    hash: TokenHash,
    /// An ephemeral session of `agentkeys jail`: its jail id and the token hash of the agent
    /// record it derives from (valid only while that record is).
    jail: Option<(String, TokenHash)>,
}

impl Principal {
    #[cfg(test)]
    fn new(agent: Option<String>, hash: TokenHash) -> Principal {
        Principal::on_link(agent, hash, false)
    }

    fn on_link(agent: Option<String>, hash: TokenHash, network: bool) -> Principal {
        Principal(Arc::new(SessionRef {
            agent,
            network,
            id: hash.session_id(),
            hash,
            jail: None,
        }))
    }

    /// The jail id (`j-…`) of an ephemeral jailed session; `None` otherwise.
    pub fn jail_id(&self) -> Option<&str> {
        self.0.jail.as_ref().map(|(id, _)| id.as_str())
    }

    /// The token hash of the record this session's scope and policy come from: the agent
    /// record's own for a jailed session.
    fn record_hash(&self) -> &TokenHash {
        match &self.0.jail {
            Some((_, parent)) => parent,
            None => &self.0.hash,
        }
    }

    /// An agent session with a fresh random token, for unit tests of tables keyed by sessions.
    #[cfg(test)]
    pub(crate) fn test_agent(name: &str) -> Principal {
        Principal::new(
            Some(name.to_string()),
            SessionToken::generate().expect("random").hash(),
        )
    }

    /// An owner session with a fresh random token, for unit tests.
    #[cfg(test)]
    pub(crate) fn test_owner() -> Principal {
        Principal::new(None, SessionToken::generate().expect("random").hash())
    }

    /// A session opened on a network listener: a remote agent (another host's agentkeysd).
    pub fn is_network(&self) -> bool {
        self.0.network
    }

    /// The owner's session.
    pub fn is_owner(&self) -> bool {
        self.0.agent.is_none()
    }

    /// The agent's name; `None` for the owner.
    pub fn agent_name(&self) -> Option<&str> {
        self.0.agent.as_deref()
    }

    /// The session's id (`s-` and 12 hex digits), safe to show.
    pub fn session_id(&self) -> &str {
        &self.0.id
    }

    /// Who this is, for audit records.
    pub fn who(&self) -> Who<'_> {
        match &self.0.agent {
            None => Who::Owner {
                session: &self.0.id,
            },
            Some(name) => Who::Agent {
                name,
                session: &self.0.id,
            },
        }
    }

    /// For messages and logs: `the owner (s-…)` or `agent "NAME" (s-…)`.
    pub fn label(&self) -> String {
        match (&self.0.agent, self.jail_id()) {
            (None, _) => format!("the owner ({})", self.0.id),
            (Some(name), None) => format!("agent {name:?} ({})", self.0.id),
            (Some(name), Some(j)) => format!("agent {name:?} ({}, jailed {j})", self.0.id),
        }
    }

    /// The role, for wire answers.
    pub fn role(&self) -> Role {
        if self.is_owner() {
            Role::Owner
        } else {
            Role::Agent
        }
    }
}

impl PartialEq for Principal {
    fn eq(&self, other: &Principal) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.agent == other.0.agent && self.0.hash.ct_eq(&other.0.hash))
    }
}

impl Eq for Principal {}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The label only: no hash, no token.
        f.write_str(&self.label())
    }
}

/// Why a session is refused. Messages are for the client and the log; never a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No session has this token (coarse on purpose).
    #[error("unknown session token")]
    Unknown,
    /// The agent was revoked.
    #[error("the session of agent {0:?} was revoked")]
    Revoked(String),
    /// The session is past its expiry.
    #[error("the session of {0} expired at {1}; {2}")]
    Expired(String, String, &'static str),
    /// A newer session took its place: `init --force` for the owner, `agent add` of the same
    /// name for an agent.
    #[error("{0}")]
    Replaced(String),
    /// The token is valid but not from this uid.
    #[error("this session may not be used from uid {0}")]
    WrongUid(u32),
    /// The token is valid, but not on this kind of link: a remote agent's token on the unix
    /// socket, or a local token (the owner's or a local agent's) on a network listener.
    #[error("{0}")]
    WrongLink(&'static str),
    /// The jail this ephemeral session belonged to has ended.
    #[error("the jail {0} has ended, and its session with it")]
    JailEnded(String),
}

/// [`AuthError::WrongLink`] for a local token on a network listener.
const LOCAL_ON_NETWORK: &str = "this token is not valid on a network listener: only a remote \
     agent's token is (`agentkeys agent add NAME --scope ... --remote`)";
/// [`AuthError::WrongLink`] for a remote agent's token on the unix socket.
const REMOTE_ON_SOCKET: &str = "this is a remote agent's token: it is valid only on the daemon's \
     network listener, not on the unix socket";

impl AuthError {
    /// Why a session ended, in the words of audit details (`session revoked`, ...).
    pub fn ended(&self) -> &'static str {
        match self {
            AuthError::Unknown => "session unknown",
            AuthError::Revoked(_) => "session revoked",
            AuthError::Expired(..) => "session expired",
            AuthError::Replaced(_) => "session replaced",
            AuthError::WrongUid(_) => "session used from another uid",
            AuthError::WrongLink(_) => "session used on the wrong kind of link",
            AuthError::JailEnded(_) => "jail ended",
        }
    }
}

/// Which state files changed in a [`Sessions::refresh`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Changed {
    /// A new owner session (`init --force`): the old owner token is dead.
    pub owner: bool,
    /// The agent registry.
    pub agents: bool,
}

struct OwnerView {
    hash: TokenHash,
    created: u64,
    expires: u64,
    stamp: Option<FileStamp>,
}

struct AgentsView {
    registry: AgentRegistry,
    stamp: Option<FileStamp>,
}

/// Most jails open at once.
pub const MAX_JAILS: usize = 64;

/// An ephemeral session of `agentkeys jail`: minted by the daemon, kept only here (never in
/// agents.enc), with the scope and uid binding of the agent record it derives from.
struct JailSession {
    id: String,
    agent: String,
    hash: TokenHash,
    parent: TokenHash,
    created: u64,
    expires: u64,
    /// The jail's policy, so a `run` of this session is confined by the same rules.
    policy: serde_json::Value,
    /// The user namespace `agentkeys jail` made for the jail's runs, if it sent one.
    userns: Option<Arc<std::os::fd::OwnedFd>>,
    /// The owner's connection that started it: it ends with it.
    conn: u64,
}

/// Why a jail could not start.
#[derive(Debug, thiserror::Error)]
pub enum JailStartError {
    /// No such agent, or it is revoked or expired.
    #[error("{0}")]
    Agent(String),
    /// Too many jails.
    #[error("too many jails are open ({MAX_JAILS}); end one first")]
    TooMany,
    /// No randomness for the token.
    #[error("minting the jail's session token failed")]
    Token,
}

/// The daemon's session table.
pub struct Sessions {
    home: Home,
    identity: Identity,
    daemon_uid: u32,
    owner: RwLock<OwnerView>,
    agents: RwLock<AgentsView>,
    jails: RwLock<Vec<JailSession>>,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

fn read_owner(home: &Home, key: &KeyPage) -> Result<OwnerView, StateError> {
    let stamp = owner_session_stamp(home);
    let s = key.with_key(|k| load_owner_session(home, k))?;
    Ok(OwnerView {
        hash: s.token.hash(),
        created: s.created,
        expires: s.expires,
        stamp,
    })
}

fn read_agents(home: &Home, key: &KeyPage) -> Result<AgentsView, StateError> {
    let stamp = agents_stamp(home);
    let registry = key.with_key(|k| load_agents(home, k))?;
    Ok(AgentsView { registry, stamp })
}

impl Sessions {
    /// Loads both files.
    ///
    /// # Errors
    /// A [`StateError`] naming the file (wrong key, corrupt, loose permissions).
    pub fn load(
        home: Home,
        identity: Identity,
        daemon_uid: u32,
        key: &KeyPage,
    ) -> Result<Sessions, StateError> {
        let owner = read_owner(&home, key)?;
        let agents = read_agents(&home, key)?;
        Ok(Sessions {
            home,
            identity,
            daemon_uid,
            owner: RwLock::new(owner),
            agents: RwLock::new(agents),
            jails: RwLock::new(Vec::new()),
        })
    }

    /// Starts a jail for the registered agent `name`: a fresh ephemeral session with that
    /// agent's scope and policy, valid while the agent's record is, until `ttl_secs` (never
    /// past the record's own expiry), and until the jail ends. Returns the jailed principal
    /// and its token (handed to the jail, never stored).
    ///
    /// # Errors
    /// [`JailStartError`].
    pub fn start_jail(
        &self,
        name: &str,
        ttl_secs: Option<u64>,
        policy: serde_json::Value,
        userns: Option<std::os::fd::OwnedFd>,
        conn: u64,
    ) -> Result<(Principal, SessionToken, u64), JailStartError> {
        let now = now();
        let (parent, rec_expires) = {
            let a = self.agents.read().expect("agents lock");
            let rec = a.registry.get(name).ok_or_else(|| {
                JailStartError::Agent(format!(
                    "no agent named {name:?} (see `agentkeys agent list`)"
                ))
            })?;
            match rec.status(now) {
                AgentStatus::Active => {}
                AgentStatus::Revoked => {
                    return Err(JailStartError::Agent(format!("agent {name:?} is revoked")));
                }
                AgentStatus::Expired => {
                    return Err(JailStartError::Agent(format!(
                        "agent {name:?} has expired; add it again"
                    )));
                }
            }
            (rec.token_hash.clone(), rec.expires)
        };
        let expires = match ttl_secs {
            Some(t) => now.saturating_add(t).min(rec_expires),
            None => rec_expires,
        };
        let token = SessionToken::generate().map_err(|_| JailStartError::Token)?;
        let hash = token.hash();
        let sid = hash.session_id();
        let id = format!("j-{}", sid.trim_start_matches("s-"));
        let mut j = self.jails.write().expect("jails lock");
        if j.len() >= MAX_JAILS {
            return Err(JailStartError::TooMany);
        }
        j.push(JailSession {
            id: id.clone(),
            agent: name.to_string(),
            hash: hash.clone(),
            parent: parent.clone(),
            created: now,
            expires,
            policy,
            userns: userns.map(Arc::new),
            conn,
        });
        let p = Principal(Arc::new(SessionRef {
            agent: Some(name.to_string()),
            network: false,
            id: sid,
            hash,
            jail: Some((id, parent)),
        }));
        Ok((p, token, expires))
    }

    /// Ends a jail (its session is refused from now on). Returns the agent's name and the
    /// session id if it was open.
    pub fn end_jail(&self, id: &str) -> Option<(String, String)> {
        let mut j = self.jails.write().expect("jails lock");
        let pos = j.iter().position(|s| s.id == id)?;
        let s = j.remove(pos);
        Some((s.agent, s.hash.session_id()))
    }

    /// The jails a connection started, with the reason each is no longer valid (`None`
    /// while it is).
    pub fn jails_of(&self, conn: u64) -> Vec<(String, Option<String>)> {
        let ids: Vec<(String, String, TokenHash, TokenHash)> = self
            .jails
            .read()
            .expect("jails lock")
            .iter()
            .filter(|s| s.conn == conn)
            .map(|s| {
                (
                    s.id.clone(),
                    s.agent.clone(),
                    s.hash.clone(),
                    s.parent.clone(),
                )
            })
            .collect();
        ids.into_iter()
            .map(|(id, agent, hash, parent)| {
                let p = Principal(Arc::new(SessionRef {
                    agent: Some(agent),
                    network: false,
                    id: hash.session_id(),
                    hash,
                    jail: Some((id.clone(), parent)),
                }));
                let why = self.check(&p, None).err().map(|e| e.to_string());
                (id, why)
            })
            .collect()
    }

    /// The policy of a jailed session (for confining its `run`s) and the user namespace made
    /// for them; `None` outside any jail.
    pub fn jail_policy(
        &self,
        p: &Principal,
    ) -> Option<(serde_json::Value, Option<Arc<std::os::fd::OwnedFd>>)> {
        let id = p.jail_id()?;
        self.jails
            .read()
            .expect("jails lock")
            .iter()
            .find(|s| s.id == id)
            .map(|s| (s.policy.clone(), s.userns.clone()))
    }

    /// Re-reads whichever file changed and says which did.
    ///
    /// # Errors
    /// A file changed but cannot be read: the old view stays in force.
    pub fn refresh(&self, key: &KeyPage) -> Result<Changed, StateError> {
        let mut changed = Changed::default();
        if owner_session_stamp(&self.home) != self.owner.read().expect("owner lock").stamp {
            let fresh = read_owner(&self.home, key)?;
            let mut o = self.owner.write().expect("owner lock");
            changed.owner = !o.hash.ct_eq(&fresh.hash);
            *o = fresh;
        }
        if agents_stamp(&self.home) != self.agents.read().expect("agents lock").stamp {
            let fresh = read_agents(&self.home, key)?;
            *self.agents.write().expect("agents lock") = fresh;
            changed.agents = true;
        }
        Ok(changed)
    }

    /// Whether a connection from `uid` may be read at all: the daemon's uid, or a uid bound
    /// to an agent that is neither revoked nor expired.
    pub fn uid_allowed(&self, uid: u32) -> bool {
        if uid == self.daemon_uid {
            return true;
        }
        let now = now();
        let a = self.agents.read().expect("agents lock");
        a.registry
            .agents
            .iter()
            .any(|r| r.uid == Some(uid) && r.status(now) == AgentStatus::Active)
    }

    /// Authenticates a hello on the unix socket from `peer_uid`: the exact session the token
    /// opens.
    ///
    /// # Errors
    /// [`AuthError`]: unknown, revoked, expired, from the wrong uid, or a remote agent's token.
    pub fn authenticate(
        &self,
        token: &SecretString,
        peer_uid: u32,
    ) -> Result<Principal, AuthError> {
        self.authenticate_on(token, Some(peer_uid))
    }

    /// Authenticates a hello on a network listener: only a remote agent's token opens a
    /// session there.
    ///
    /// # Errors
    /// [`AuthError`]: unknown, revoked, expired, or not a remote agent's token.
    pub fn authenticate_network(&self, token: &SecretString) -> Result<Principal, AuthError> {
        self.authenticate_on(token, None)
    }

    /// `peer_uid` `None`: a network listener.
    fn authenticate_on(
        &self,
        token: &SecretString,
        peer_uid: Option<u32>,
    ) -> Result<Principal, AuthError> {
        let network = peer_uid.is_none();
        let token = SessionToken::from_secret(token.clone()).map_err(|_| AuthError::Unknown)?;
        let hash = token.hash();
        drop(token);
        let owner = self.owner.read().expect("owner lock").hash.ct_eq(&hash);
        let jailed = {
            let j = self.jails.read().expect("jails lock");
            j.iter().find(|s| s.hash.ct_eq(&hash)).map(|s| {
                Principal(Arc::new(SessionRef {
                    agent: Some(s.agent.clone()),
                    // A jail's token is for the unix socket inside the jail: on a network
                    // listener `check` refuses it (the wrong kind of link).
                    network,
                    id: hash.session_id(),
                    hash: hash.clone(),
                    jail: Some((s.id.clone(), s.parent.clone())),
                }))
            })
        };
        let p = if owner {
            Principal::on_link(None, hash, network)
        } else if let Some(p) = jailed {
            p
        } else {
            let a = self.agents.read().expect("agents lock");
            let rec = a.registry.find_by_token(&hash).ok_or(AuthError::Unknown)?;
            Principal::on_link(Some(rec.name.clone()), hash, network)
        };
        self.check(&p, peer_uid)?;
        Ok(p)
    }

    /// Whether `p`'s session is still the one in force: not revoked, not expired, not replaced,
    /// used on the kind of link its token is for (a remote agent's on a network listener, any
    /// other on the unix socket), and (with `peer_uid`, unix socket only) used from the uid it
    /// is bound to. Called on every request and by the one-second tick for every open
    /// connection.
    ///
    /// # Errors
    /// The [`AuthError`] that ends the session.
    pub fn check(&self, p: &Principal, peer_uid: Option<u32>) -> Result<(), AuthError> {
        match p.agent_name() {
            None => {
                let o = self.owner.read().expect("owner lock");
                if !o.hash.ct_eq(&p.0.hash) {
                    return Err(AuthError::Replaced(
                        "this owner session was replaced by a newer one (`agentkeys init --force`); \
                         connect again"
                            .into(),
                    ));
                }
                if o.expires <= now() {
                    return Err(AuthError::Expired(
                        "the owner".into(),
                        rfc3339(o.expires),
                        "run `agentkeys init --force` for a new owner session",
                    ));
                }
                // The owner never acts over a network.
                if p.is_network() {
                    return Err(AuthError::WrongLink(LOCAL_ON_NETWORK));
                }
                match peer_uid {
                    Some(uid) if uid != self.daemon_uid => Err(AuthError::WrongUid(uid)),
                    _ => Ok(()),
                }
            }
            Some(name) => {
                // A jailed session: valid while its jail is open and before its own expiry,
                // then on the agent record's terms (revoked, expired, replaced end it too).
                let mut jail_expires = None;
                if let Some(id) = p.jail_id() {
                    let j = self.jails.read().expect("jails lock");
                    let Some(s) = j.iter().find(|s| s.id == id && s.hash.ct_eq(&p.0.hash)) else {
                        return Err(AuthError::JailEnded(id.to_string()));
                    };
                    jail_expires = Some(s.expires);
                }
                if let Some(exp) = jail_expires
                    && exp <= now()
                {
                    return Err(AuthError::Expired(
                        format!("the jail {} of agent {name:?}", p.jail_id().unwrap_or("")),
                        rfc3339(exp),
                        "start the jail again",
                    ));
                }
                let a = self.agents.read().expect("agents lock");
                let Some(rec) = self.record_of(&a, p) else {
                    // Gone from the registry: replaced under the same name, or removed.
                    return Err(if a.registry.get(name).is_some() {
                        AuthError::Replaced(format!(
                            "the session of agent {name:?} was replaced by a newer one \
                             (`agentkeys agent add {name}`); use the new token"
                        ))
                    } else {
                        AuthError::Revoked(name.to_string())
                    });
                };
                match rec.status(now()) {
                    AgentStatus::Revoked => return Err(AuthError::Revoked(name.to_string())),
                    AgentStatus::Expired => {
                        return Err(AuthError::Expired(
                            format!("agent {name:?}"),
                            rfc3339(rec.expires),
                            "ask the owner for a new agent token",
                        ));
                    }
                    AgentStatus::Active => {}
                }
                match (rec.remote, p.is_network()) {
                    (true, false) => return Err(AuthError::WrongLink(REMOTE_ON_SOCKET)),
                    (false, true) => return Err(AuthError::WrongLink(LOCAL_ON_NETWORK)),
                    _ => {}
                }
                if p.is_network() {
                    // No uid on a network link (remote agents are bound to none).
                    return Ok(());
                }
                // A jail runs as the owner who started it: its session is bound to the
                // daemon's uid whatever the agent record's binding.
                let bound = if p.jail_id().is_some() {
                    self.daemon_uid
                } else {
                    rec.uid.unwrap_or(self.daemon_uid)
                };
                match peer_uid {
                    Some(uid) if uid != bound => Err(AuthError::WrongUid(uid)),
                    _ => Ok(()),
                }
            }
        }
    }

    /// The registry record of an agent principal: the one whose token hash is the principal's
    /// (constant-time scan) and whose name matches.
    fn record_of<'a>(&self, a: &'a AgentsView, p: &Principal) -> Option<&'a AgentRecord> {
        a.registry
            .find_by_token(p.record_hash())
            .filter(|r| Some(r.name.as_str()) == p.agent_name())
    }

    /// Session metadata for `whoami` and the welcome message.
    pub fn info(&self, p: &Principal) -> SessionInfo {
        match p.agent_name() {
            None => {
                let o = self.owner.read().expect("owner lock");
                SessionInfo {
                    identity: self.identity.id.clone(),
                    role: Role::Owner,
                    agent: None,
                    session: Some(p.session_id().to_string()),
                    scope: vec!["*".into()],
                    created: o.created,
                    expires: o.expires,
                    uid: Some(self.daemon_uid),
                    jail: None,
                }
            }
            Some(name) => {
                let a = self.agents.read().expect("agents lock");
                let rec = self.record_of(&a, p);
                let jail = p.jail_id().and_then(|id| {
                    let j = self.jails.read().expect("jails lock");
                    j.iter()
                        .find(|s| s.id == id)
                        .map(|s| (s.created, s.expires))
                });
                SessionInfo {
                    identity: self.identity.id.clone(),
                    role: Role::Agent,
                    agent: Some(name.to_string()),
                    session: Some(p.session_id().to_string()),
                    scope: rec.map(|r| r.scope.clone()).unwrap_or_default(),
                    created: jail.map(|j| j.0).or(rec.map(|r| r.created)).unwrap_or(0),
                    expires: jail.map(|j| j.1).or(rec.map(|r| r.expires)).unwrap_or(0),
                    uid: if p.jail_id().is_some() {
                        Some(self.daemon_uid)
                    } else {
                        rec.and_then(|r| r.uid)
                    },
                    jail: p.jail_id().map(str::to_string),
                }
            }
        }
    }

    /// Whether `p` may use `service`: the owner every service, an agent those the scope of its
    /// own session's record names.
    pub fn in_scope(&self, p: &Principal, service: &str) -> bool {
        if p.is_owner() {
            return true;
        }
        let a = self.agents.read().expect("agents lock");
        self.record_of(&a, p).is_some_and(|r| r.allows(service))
    }

    /// The identity this daemon serves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}
