//! [`StateError`]: every way reading or writing state can fail.
//!
//! Each variant names what failed and where, and its message says what to do about it. No
//! variant carries a secret: not a key, token, token hash or plaintext, and not a rejected name
//! or token either (a user who pastes a secret into the wrong argument must not see it echoed
//! into a terminal log). Authentication failures stay coarse: "does not open", never why.

use std::io;
use std::path::PathBuf;

/// Errors of the state crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// No `identity.json` under the home.
    #[error("agentkeys is not initialized at {}: run `agentkeys init`", home.display())]
    NotInitialized {
        /// The home that was looked at.
        home: PathBuf,
    },

    /// `$AGENTKEYS_HOME` / `$HOME` cannot be used.
    #[error("cannot use {var} as the agentkeys home: {detail}")]
    InvalidHome {
        /// The variable that was read.
        var: &'static str,
        /// What is wrong with it and what to do.
        detail: String,
    },

    /// A state file or directory has an owner, type or mode that would let someone else read or
    /// replace it.
    #[error("refusing {}: {detail}", path.display())]
    UnsafePermissions {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong, with the fix.
        detail: String,
    },

    /// The data encryption key is not where the identity says it is.
    #[error(
        "the data encryption key is missing: looked in {location}; restore it from backup, or if it \
         is lost the vault cannot be opened (move the home away and run `agentkeys init`)"
    )]
    DekMissing {
        /// Where it was looked for, and why it was not there.
        location: String,
    },

    /// The key that was found does not open a sealed file.
    #[error(
        "the data encryption key does not open {}: wrong or replaced key, or the file was modified; \
         restore the key (or the file) from backup",
        file.display()
    )]
    DekWrong {
        /// The file that did not open.
        file: PathBuf,
    },

    /// One vault entry fails authentication although the key is right.
    #[error(
        "vault entry `{service}` in {} fails authentication: its data was modified, copied from another \
         entry, or its policy was edited by hand; store the secret again with `agentkeys store {service}`",
        path.display()
    )]
    EntryTampered {
        /// The service whose entry failed.
        service: String,
        /// The vault file.
        path: PathBuf,
    },

    /// The home is initialized but has no owner session.
    #[error("no owner session at {}: run `agentkeys init --force` to mint a new one", path.display())]
    SessionMissing {
        /// Where it should be.
        path: PathBuf,
    },

    /// A file does not have the expected format.
    #[error("{} is damaged: {detail}; restore it from backup", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (never its content).
        detail: String,
    },

    /// A file is larger than any file of its kind can legitimately be.
    #[error("{} is {len} bytes, more than the {max} a file of its kind may have; is it the right file?", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The cap.
        max: u64,
    },

    /// An operating-system call failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "rename", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The error from the kernel.
        #[source]
        source: io::Error,
    },

    /// Another writer holds the state lock for too long.
    #[error(
        "another agentkeys command has held {} for {secs} s; retry, or find the stuck process with `fuser {}`",
        path.display(),
        path.display()
    )]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        secs: u64,
    },

    /// A service or agent name breaks the naming rule. The name itself is not repeated.
    #[error("invalid {kind} name: {detail}")]
    InvalidName {
        /// "service" or "agent".
        kind: &'static str,
        /// Which rule it breaks, and the rule.
        detail: String,
    },

    /// An agent scope list is not usable.
    #[error("invalid scope: {detail}")]
    InvalidScope {
        /// What is wrong with it.
        detail: String,
    },

    /// A secret is empty or too large. Its content is never part of the message.
    #[error("invalid secret: {detail}")]
    InvalidSecret {
        /// What is wrong with it.
        detail: String,
    },

    /// A service's delivery or injection policy is not usable (a bad host pattern, header
    /// name, delivery kind).
    #[error("invalid policy: {detail}")]
    InvalidPolicy {
        /// What is wrong with it.
        detail: String,
    },

    /// A session lifetime is zero or too long.
    #[error("invalid lifetime: {detail}")]
    InvalidTtl {
        /// What is wrong with it.
        detail: String,
    },

    /// A session token does not have the shape of one. The token is never repeated.
    #[error("malformed session token: {detail}")]
    InvalidToken {
        /// Which part of the shape is wrong.
        detail: &'static str,
    },

    /// An active agent of that name exists.
    #[error(
        "agent `{name}` already exists and is active until {expires} (unix time); revoke it first \
         with `agentkeys agent revoke {name}`"
    )]
    AgentExists {
        /// The agent.
        name: String,
        /// When its session expires.
        expires: u64,
    },

    /// No agent of that name is registered.
    #[error("no agent named `{name}`: see `agentkeys agent list`")]
    NoSuchAgent {
        /// The agent.
        name: String,
    },

    /// No vault entry for that service.
    #[error(
        "no secret stored for `{service}`: see `agentkeys list`, or store one with `agentkeys store {service}`"
    )]
    NoSuchService {
        /// The service.
        service: String,
    },

    /// `init` found state that a fresh init would destroy.
    #[error("refusing to initialize {}: {detail}", home.display())]
    InitConflict {
        /// The home.
        home: PathBuf,
        /// What would be lost and what to do.
        detail: String,
    },

    /// A key of the wrong length was given.
    #[error("a data encryption key is {expected} bytes, got {got}")]
    KeyLength {
        /// Bytes required.
        expected: usize,
        /// Bytes given.
        got: usize,
    },

    /// Authenticated decryption failed (wrong key, wrong context, or modified data).
    /// Callers that know the file turn this into [`StateError::DekWrong`] or
    /// [`StateError::EntryTampered`].
    #[error("decryption failed: wrong key, or the data was modified")]
    Decrypt,

    /// Encryption failed (only for inputs beyond the cipher's limits).
    #[error("encryption failed: input too large for the cipher")]
    Encrypt,

    /// The kernel's random source failed.
    #[error("cannot get random bytes from the kernel: {0}")]
    Random(getrandom::Error),

    /// The system clock is before 1970 or beyond 2^64 seconds.
    #[error("the system clock is not usable (before 1970?): fix the clock and retry")]
    Clock,

    /// The audit trail cannot be opened or a record cannot be written. Whatever was to be
    /// recorded must not happen (fail closed).
    #[error(
        "audit log {} is unavailable: {reason}; nothing is delivered without an audit record",
        path.display()
    )]
    AuditUnavailable {
        /// The log file.
        path: PathBuf,
        /// What failed, with the errno where there is one, and what to do.
        reason: String,
    },

    /// The OS keyring failed.
    #[error("OS keyring (Secret Service) failed to {op}: {detail}")]
    Keyring {
        /// What was being done.
        op: &'static str,
        /// The keyring's message (never the key).
        detail: String,
    },
}

impl StateError {
    /// Shorthand for [`StateError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StateError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`StateError::Corrupt`].
    pub(crate) fn corrupt(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        StateError::Corrupt {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// True for an [`StateError::Io`] whose cause is "no such file".
    pub fn is_not_found(&self) -> bool {
        matches!(self, StateError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}
