//! Everything agentkeys keeps under `$AGENTKEYS_HOME` (default `~/.agentkeys`, mode 0700).
//!
//! Used by the CLI for owner commands that need no daemon (`init`, `store`, `delete`, `list`,
//! `agent add/list/revoke`, `whoami` as owner), and by the daemon, which loads the DEK once at
//! start and re-reads the session, agent and vault files when their [`FileStamp`] changes.
//!
//! Modules:
//! - [`home`]: the home directory; [`open_state_file`] (owner/mode checks on every read),
//!   [`write_atomic`] (temp, fsync, rename, fsync dir) and [`StateLock`] (one writer at a time).
//! - [`crypto`]: XChaCha20-Poly1305 [`seal`] / [`open`] and the [`Dek`].
//! - [`keystore`]: where the DEK lives: OS keyring (feature `os-keyring`) or a 0600 key file.
//! - [`identity`]: `identity.json`, the stable id of this installation.
//! - [`token`]: [`SessionToken`] (a `SecretString`) and its [`TokenHash`].
//! - [`session`]: the owner's master session, sealed in `session.enc`.
//! - [`agents`]: the agent registry (token hashes, scopes, expiry, revocation), sealed in
//!   `agents.enc`.
//! - [`tls`]: the daemon's TLS key and self-signed certificate (`tls.enc`), and fingerprints.
//! - [`inject`]: delivery kinds and the proxy's host, header and query rules of a policy.
//! - [`proxy_ca`]: the credential-injecting proxy's CA (`proxy-ca.enc`, sealed) and bundle.
//! - [`vault`]: the local vault `vault.enc`, each entry sealed on its own.
//! - [`audit`]: the audit trail `audit.jsonl` (hash-chained JSON lines): [`audit::AuditLog`]
//!   for the daemon, [`audit::verify`] and [`audit::AuditReader`] for the CLI.
//! - [`mod@init`]: [`init()`] / `init --force` and [`open_owner`].
//! - [`error`]: the one error type, [`StateError`].
//!
//! Files, all 0600 in the 0700 home:
//!
//! | file            | content                                  | sealed (AAD)                      |
//! |-----------------|------------------------------------------|-----------------------------------|
//! | `identity.json` | id, created, keystore kind (written last) | no (not secret)                   |
//! | `dek.key`       | the 32 raw DEK bytes (no keyring only)    | no: the file mode protects it      |
//! | `session.enc`   | owner token, created, expires, scope      | whole file (`agentkeys session.enc v1`) |
//! | `agents.enc`    | agents with token hashes                  | whole file (`agentkeys agents.enc v1`)  |
//! | `vault.enc`     | names, policies, times; sealed values     | per entry (service + policy)      |
//! | `tls.enc`       | the daemon's TLS key and certificate (listeners) | whole file (`agentkeys tls.enc v1`) |
//! | `audit.jsonl`   | audit records (names, never secrets)      | no: hash-chained, daemon appends  |
//! | `state.lock`    | empty; `flock`ed by writers               | n/a                               |
//! | `jail.lock`     | empty; `flock`ed by `agentkeys jail` (shared while a jail runs, exclusive to remove its placeholders) | n/a |
//!
//! Secrets (DEK, tokens, plaintext) live only in types that wipe themselves on drop and have no
//! `Debug` or `Display`; no error message carries one.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agents;
pub mod audit;
pub mod crypto;
pub mod error;
pub mod home;
pub mod identity;
pub mod init;
pub mod inject;
pub mod keystore;
mod names;
pub mod proxy_ca;
pub mod session;
pub mod tls;
pub mod token;
pub mod vault;

#[cfg(test)]
mod testutil;

pub use agents::{
    AgentRecord, AgentRegistry, AgentStatus, add_agent, add_agent_with, agents_stamp, load_agents,
    revoke_agent, validate_agent_name,
};
pub use crypto::{Dek, KEY_LEN, open, seal};
pub use error::StateError;
pub use home::{FileStamp, Home, StateLock, open_state_file, write_atomic};
pub use identity::{Identity, load_identity};
pub use init::{DEFAULT_OWNER_TTL, InitOutcome, init, open_owner};
pub use keystore::{KeystoreKind, describe, load_dek, store_new_dek};
pub use session::{OwnerSession, load_owner_session, owner_session_stamp};
pub use token::{SessionToken, TokenHash};
pub use vault::{
    EntryMeta, Policy, PutOutcome, VaultIndex, delete_secret, put_secret, put_secrets,
    validate_service_name, vault_stamp,
};

/// Now, in unix seconds.
///
/// # Errors
/// [`StateError::Clock`] when the clock is before 1970.
pub fn now() -> Result<u64, StateError> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| StateError::Clock)
}
