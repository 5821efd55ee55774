//! Who may talk to the daemon: the owner session (session.enc) and the agent registry
//! (agents.enc), reloaded whenever their files change. The daemon keeps token *hashes* only.
//!
//! Authentication binds a token to the peer's uid: the owner must connect from the daemon's
//! uid; an agent from the uid it was bound to (`agent add --uid`), else from the daemon's uid.

use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use agentkeys_proto::wire::{Role, SessionInfo};
use agentkeys_state::StateError;
use agentkeys_state::agents::{AgentRegistry, agents_stamp, load_agents};
use agentkeys_state::home::{FileStamp, Home};
use agentkeys_state::identity::Identity;
use agentkeys_state::session::{load_owner_session, owner_session_stamp};
use agentkeys_state::token::{SessionToken, TokenHash};
use secrecy::SecretString;

use crate::keys::KeyPage;

/// Who is on a connection once it said hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The owner.
    Owner,
    /// A named agent.
    Agent(String),
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
    /// The token is valid but not from this uid.
    #[error("this session may not be used from uid {0}")]
    WrongUid(u32),
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

/// The daemon's session table.
pub struct Sessions {
    home: Home,
    identity: Identity,
    daemon_uid: u32,
    owner: RwLock<OwnerView>,
    agents: RwLock<AgentsView>,
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
        })
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
            .any(|r| r.uid == Some(uid) && r.revoked.is_none() && r.expires > now)
    }

    /// Authenticates a hello.
    ///
    /// # Errors
    /// [`AuthError`]: unknown, revoked, expired, or from the wrong uid.
    pub fn authenticate(
        &self,
        token: &SecretString,
        peer_uid: u32,
    ) -> Result<Principal, AuthError> {
        let token = SessionToken::from_secret(token.clone()).map_err(|_| AuthError::Unknown)?;
        let hash = token.hash();
        drop(token);
        {
            let o = self.owner.read().expect("owner lock");
            if o.hash.ct_eq(&hash) {
                if peer_uid != self.daemon_uid {
                    return Err(AuthError::WrongUid(peer_uid));
                }
                self.check_owner(&o)?;
                return Ok(Principal::Owner);
            }
        }
        let a = self.agents.read().expect("agents lock");
        let rec = a.registry.find_by_token(&hash).ok_or(AuthError::Unknown)?;
        if peer_uid != rec.uid.unwrap_or(self.daemon_uid) {
            return Err(AuthError::WrongUid(peer_uid));
        }
        let name = rec.name.clone();
        drop(a);
        let p = Principal::Agent(name);
        self.check(&p)?;
        Ok(p)
    }

    fn check_owner(&self, o: &OwnerView) -> Result<(), AuthError> {
        if o.expires <= now() {
            return Err(AuthError::Expired(
                "the owner".into(),
                rfc3339(o.expires),
                "run `agentkeys init --force` for a new owner session",
            ));
        }
        Ok(())
    }

    /// Whether an authenticated principal is still valid (revocation and expiry take effect
    /// on the next request).
    ///
    /// # Errors
    /// [`AuthError::Revoked`] or [`AuthError::Expired`].
    pub fn check(&self, p: &Principal) -> Result<(), AuthError> {
        match p {
            Principal::Owner => self.check_owner(&self.owner.read().expect("owner lock")),
            Principal::Agent(name) => {
                let a = self.agents.read().expect("agents lock");
                let rec = a
                    .registry
                    .get(name)
                    .ok_or_else(|| AuthError::Revoked(name.clone()))?;
                if rec.revoked.is_some() {
                    return Err(AuthError::Revoked(name.clone()));
                }
                if rec.expires <= now() {
                    return Err(AuthError::Expired(
                        format!("agent {name:?}"),
                        rfc3339(rec.expires),
                        "ask the owner for a new agent token",
                    ));
                }
                Ok(())
            }
        }
    }

    /// Session metadata for `whoami` and the welcome message.
    pub fn info(&self, p: &Principal) -> SessionInfo {
        match p {
            Principal::Owner => {
                let o = self.owner.read().expect("owner lock");
                SessionInfo {
                    identity: self.identity.id.clone(),
                    role: Role::Owner,
                    agent: None,
                    scope: vec!["*".into()],
                    created: o.created,
                    expires: o.expires,
                    uid: Some(self.daemon_uid),
                }
            }
            Principal::Agent(name) => {
                let a = self.agents.read().expect("agents lock");
                let rec = a.registry.get(name);
                SessionInfo {
                    identity: self.identity.id.clone(),
                    role: Role::Agent,
                    agent: Some(name.clone()),
                    scope: rec.map(|r| r.scope.clone()).unwrap_or_default(),
                    created: rec.map(|r| r.created).unwrap_or(0),
                    expires: rec.map(|r| r.expires).unwrap_or(0),
                    uid: rec.and_then(|r| r.uid),
                }
            }
        }
    }

    /// Whether `p` may use `service`.
    pub fn in_scope(&self, p: &Principal, service: &str) -> bool {
        match p {
            Principal::Owner => true,
            Principal::Agent(name) => {
                let a = self.agents.read().expect("agents lock");
                a.registry
                    .get(name)
                    .is_some_and(|r| r.scope.iter().any(|s| s == "*" || s == service))
            }
        }
    }

    /// The identity this daemon serves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}
