//! The owner's master session, sealed in `session.enc`.
//!
//! The file is one sealed blob (see [`crate::crypto`]) with AAD `agentkeys session.enc v1`; its
//! plaintext is JSON `{"v":1,"token":"akt_…","created":…,"expires":…,"scope":["*"]}`. The token
//! itself is stored (not only its hash) because the owner's CLI reads it to authenticate to the
//! daemon; the DEK is what protects it.

use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{KEY_LEN, open, seal};
use crate::error::StateError;
use crate::home::{FileStamp, Home, SESSION_FILE, read_state_file, write_atomic};
use crate::token::SessionToken;

/// Associated data of `session.enc`.
const SESSION_AAD: &[u8] = b"agentkeys session.enc v1";
/// Largest plausible `session.enc`.
const MAX_SESSION_LEN: u64 = 64 * 1024;
/// Plaintext format version.
const SESSION_VERSION: u32 = 1;

/// The owner's master session. No `Debug`: it holds the token.
pub struct OwnerSession {
    /// The owner's token.
    pub token: SessionToken,
    /// When it was minted, unix seconds.
    pub created: u64,
    /// When it stops being accepted, unix seconds.
    pub expires: u64,
    /// What it may reach: `["*"]` for the owner.
    pub scope: Vec<String>,
}

impl OwnerSession {
    /// A new owner session valid for `ttl` from `now`, scope `["*"]`.
    ///
    /// # Errors
    /// [`StateError::Random`]; [`StateError::InvalidTtl`] if the expiry overflows.
    pub(crate) fn mint(now: u64, ttl: Duration) -> Result<OwnerSession, StateError> {
        Ok(OwnerSession {
            token: SessionToken::generate()?,
            created: now,
            expires: now
                .checked_add(ttl.as_secs())
                .ok_or_else(|| StateError::InvalidTtl {
                    detail: "the expiry does not fit in 64-bit unix time".into(),
                })?,
            scope: vec!["*".into()],
        })
    }

    /// Whether it has expired at `now` (unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires
    }

    /// Time left at `now`; zero once expired.
    pub fn remaining(&self, now: u64) -> Duration {
        Duration::from_secs(self.expires.saturating_sub(now))
    }
}

/// The plaintext as written (borrows the token, so no extra copy of it is made).
#[derive(Serialize)]
struct StoredOut<'a> {
    v: u32,
    token: &'a str,
    created: u64,
    expires: u64,
    scope: &'a [String],
}

/// The plaintext as read; the token is borrowed from the (wiped-on-drop) plaintext buffer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredIn<'a> {
    v: u32,
    #[serde(borrow)]
    token: &'a str,
    created: u64,
    expires: u64,
    scope: Vec<String>,
}

/// Reads and opens `session.enc`. Expiry is not checked here: see [`OwnerSession::is_expired`].
///
/// # Errors
/// [`StateError::SessionMissing`] when there is none, [`StateError::DekWrong`] when `dek` does
/// not open it, [`StateError::Corrupt`] when its content is malformed, plus the file-access
/// errors of [`crate::open_state_file`].
pub fn load_owner_session(home: &Home, dek: &[u8; KEY_LEN]) -> Result<OwnerSession, StateError> {
    let path = home.path(SESSION_FILE);
    let Some((sealed, _)) = read_state_file(&path, MAX_SESSION_LEN)? else {
        if !home.is_initialized() {
            return Err(StateError::NotInitialized {
                home: home.root().to_path_buf(),
            });
        }
        return Err(StateError::SessionMissing { path });
    };
    let plain =
        open(dek, SESSION_AAD, &sealed).map_err(|_| StateError::DekWrong { file: path.clone() })?;
    let stored: StoredIn<'_> = serde_json::from_slice(&plain)
        .map_err(|_| StateError::corrupt(&path, "the sealed session is not valid"))?;
    if stored.v != SESSION_VERSION {
        return Err(StateError::corrupt(
            &path,
            format!("session format version {} is not supported", stored.v),
        ));
    }
    // `String::from` allocates exactly the token's length; the SecretString takes it over.
    let token = SessionToken::from_secret(SecretString::from(String::from(stored.token)))
        .map_err(|_| StateError::corrupt(&path, "the sealed token is malformed"))?;
    Ok(OwnerSession {
        token,
        created: stored.created,
        expires: stored.expires,
        scope: stored.scope,
    })
}

/// Seals `session` into `session.enc`. Call under [`crate::StateLock`].
pub(crate) fn write_owner_session(
    home: &Home,
    dek: &[u8; KEY_LEN],
    session: &OwnerSession,
) -> Result<(), StateError> {
    let out = StoredOut {
        v: SESSION_VERSION,
        token: session.token.expose(),
        created: session.created,
        expires: session.expires,
        scope: &session.scope,
    };
    // Generous capacity so the buffer holding the token does not reallocate while filling.
    let cap = 256 + session.scope.iter().map(|s| s.len() + 8).sum::<usize>();
    let mut plain = Zeroizing::new(Vec::with_capacity(cap));
    serde_json::to_writer(&mut *plain, &out).map_err(|e| StateError::Corrupt {
        path: home.path(SESSION_FILE),
        detail: format!("cannot serialise the session ({e})"),
    })?;
    let sealed = seal(dek, SESSION_AAD, &plain)?;
    write_atomic(home.root(), SESSION_FILE, &sealed)
}

/// The stamp of `session.enc`, so the daemon knows when to reload it. Take the stamp *before*
/// loading: a write in between then shows as a changed stamp next time, never as a missed one.
pub fn owner_session_stamp(home: &Home) -> Option<FileStamp> {
    FileStamp::of_path(&home.path(SESSION_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;
    use crate::testutil::TempHome;

    #[test]
    fn owner_session_round_trip_and_wrong_key() {
        let t = TempHome::new("session");
        let home = t.home();
        let dek = Dek::generate().unwrap();
        let s = OwnerSession::mint(1000, Duration::from_secs(60)).unwrap();
        write_owner_session(&home, dek.expose(), &s).unwrap();
        let back = load_owner_session(&home, dek.expose()).unwrap();
        assert_eq!(back.token.expose(), s.token.expose());
        assert_eq!((back.created, back.expires), (1000, 1060));
        assert_eq!(back.scope, vec!["*".to_string()]);
        assert!(!back.is_expired(1059) && back.is_expired(1060));
        assert_eq!(back.remaining(1050), Duration::from_secs(10));

        let stamp = owner_session_stamp(&home).unwrap();
        let other = Dek::generate().unwrap();
        assert!(matches!(
            load_owner_session(&home, other.expose()),
            Err(StateError::DekWrong { .. })
        ));
        assert_eq!(owner_session_stamp(&home), Some(stamp));

        // The token does not appear in the file.
        let bytes = std::fs::read(home.path(SESSION_FILE)).unwrap();
        assert!(!crate::testutil::contains(
            &bytes,
            s.token.expose().as_bytes()
        ));
    }

    #[test]
    fn missing_session_is_explained() {
        let t = TempHome::new("nosession");
        let home = t.home();
        let dek = Dek::generate().unwrap();
        assert!(matches!(
            load_owner_session(&home, dek.expose()),
            Err(StateError::NotInitialized { .. })
        ));
        write_atomic(home.root(), crate::home::IDENTITY_FILE, b"{}").unwrap();
        let err = load_owner_session(&home, dek.expose()).err().unwrap();
        assert!(err.to_string().contains("init --force"), "{err}");
    }
}
