//! The identity: a stable id for this installation, when it was created, and where its DEK is.
//!
//! `identity.json` holds nothing secret but is still 0600 and checked like every state file:
//! whoever can edit it can point us at another keystore. `init` writes it last, so its presence
//! means the rest of the state is complete.

use serde::{Deserialize, Serialize};

use crate::error::StateError;
use crate::home::{Home, IDENTITY_FILE, read_state_file};
use crate::keystore::KeystoreKind;

/// Largest plausible `identity.json`.
const MAX_IDENTITY_LEN: u64 = 64 * 1024;

/// Who this installation is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `ak-` and 16 lowercase hex digits, random; shown as `Initialized as <id>`.
    pub id: String,
    /// Creation time, unix seconds.
    pub created: u64,
    /// Where the DEK is kept.
    pub keystore: KeystoreKind,
}

impl Identity {
    /// A new identity with a random id.
    ///
    /// # Errors
    /// [`StateError::Random`] / [`StateError::Clock`].
    pub(crate) fn generate(keystore: KeystoreKind) -> Result<Identity, StateError> {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(StateError::Random)?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Identity {
            id: format!("ak-{hex}"),
            created: crate::now()?,
            keystore,
        })
    }

    /// Whether `id` has the shape [`Identity::generate`] gives it.
    fn valid_id(id: &str) -> bool {
        id.strip_prefix("ak-").is_some_and(|h| {
            h.len() == 16
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    }
}

/// Reads `identity.json`.
///
/// # Errors
/// [`StateError::NotInitialized`] when it does not exist; [`StateError::UnsafePermissions`],
/// [`StateError::Corrupt`], [`StateError::TooLarge`] or [`StateError::Io`] otherwise.
pub fn load_identity(home: &Home) -> Result<Identity, StateError> {
    let path = home.path(IDENTITY_FILE);
    let Some((bytes, _)) = read_state_file(&path, MAX_IDENTITY_LEN)? else {
        return Err(StateError::NotInitialized {
            home: home.root().to_path_buf(),
        });
    };
    let identity: Identity = serde_json::from_slice(&bytes)
        .map_err(|e| StateError::corrupt(&path, format!("not a valid identity ({e})")))?;
    if !Identity::valid_id(&identity.id) {
        return Err(StateError::corrupt(
            &path,
            "the id is not of the form ak-<16 hex digits>",
        ));
    }
    Ok(identity)
}

/// Serialises an identity for `init`.
pub(crate) fn identity_json(identity: &Identity) -> Result<Vec<u8>, StateError> {
    let mut v = serde_json::to_vec_pretty(identity).map_err(|e| StateError::Corrupt {
        path: IDENTITY_FILE.into(),
        detail: format!("cannot serialise ({e})"),
    })?;
    v.push(b'\n');
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::write_atomic;
    use crate::testutil::TempHome;

    #[test]
    fn identity_round_trip_and_validation() {
        let t = TempHome::new("identity");
        let home = t.home();
        assert!(matches!(
            load_identity(&home),
            Err(StateError::NotInitialized { .. })
        ));
        let id = Identity::generate(KeystoreKind::File).unwrap();
        assert!(Identity::valid_id(&id.id), "{}", id.id);
        write_atomic(home.root(), IDENTITY_FILE, &identity_json(&id).unwrap()).unwrap();
        assert_eq!(load_identity(&home).unwrap(), id);
        let text = std::fs::read_to_string(home.path(IDENTITY_FILE)).unwrap();
        assert!(text.contains("\"keystore\": \"file\""), "{text}");

        write_atomic(
            home.root(),
            IDENTITY_FILE,
            br#"{"id":"nope","created":1,"keystore":"file"}"#,
        )
        .unwrap();
        assert!(matches!(
            load_identity(&home),
            Err(StateError::Corrupt { .. })
        ));
        write_atomic(home.root(), IDENTITY_FILE, b"{").unwrap();
        assert!(matches!(
            load_identity(&home),
            Err(StateError::Corrupt { .. })
        ));
    }
}
