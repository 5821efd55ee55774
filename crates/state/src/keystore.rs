//! Where the DEK lives: the OS keyring where one is reachable, else a 0600 key file.
//!
//! - [`KeystoreKind::OsKeyring`]: the Secret Service (GNOME Keyring, KWallet) through
//!   keyring-core, entry service `agentkeys`, user = the home's path. Only with the `os-keyring`
//!   cargo feature (off by default), only on Linux, and only when `DBUS_SESSION_BUS_ADDRESS` is
//!   set and a Secret Service answers a write-then-read probe.
//! - [`KeystoreKind::File`]: `<home>/dek.key`, exactly the 32 raw key bytes (no encoding, so no
//!   intermediate text copy of the key), mode 0600, read through the same owner/mode checks as
//!   every state file. Any process running as this uid can read it; `doctor` says so via
//!   [`describe`].
//!
//! There is never an in-memory store: if neither works, `init` fails.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::crypto::{Dek, KEY_LEN};
use crate::error::StateError;
use crate::home::{DEK_FILE, Home, open_state_file, write_atomic};

/// Where an identity's DEK is kept (recorded in `identity.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeystoreKind {
    /// The OS keyring (Secret Service).
    OsKeyring,
    /// The 0600 key file `<home>/dek.key`.
    File,
}

/// Service name of the keyring entry.
#[cfg_attr(
    not(all(feature = "os-keyring", target_os = "linux")),
    allow(dead_code)
)]
const KEYRING_SERVICE: &str = "agentkeys";

/// Generates a DEK and stores it: in the OS keyring if one is reachable (see the module doc),
/// else in `<home>/dek.key`. Call under [`crate::StateLock`].
///
/// # Errors
/// [`StateError::Random`] when no key can be generated; [`StateError::Io`] when the key file
/// cannot be written.
pub fn store_new_dek(home: &Home) -> Result<(Dek, KeystoreKind), StateError> {
    let dek = Dek::generate()?;
    #[cfg(all(feature = "os-keyring", target_os = "linux"))]
    if os::store(home, &dek).is_ok() {
        // A key file left by an earlier, interrupted init must not linger next to a keyring key.
        let _ = std::fs::remove_file(home.path(DEK_FILE));
        return Ok((dek, KeystoreKind::OsKeyring));
    }
    write_atomic(home.root(), DEK_FILE, dek.expose())?;
    Ok((dek, KeystoreKind::File))
}

/// Loads the DEK from where `kind` says it is.
///
/// # Errors
/// [`StateError::DekMissing`] saying where it looked; [`StateError::Corrupt`] for a key file of
/// the wrong size; [`StateError::UnsafePermissions`] for a key file others could read.
pub fn load_dek(home: &Home, kind: &KeystoreKind) -> Result<Dek, StateError> {
    match kind {
        KeystoreKind::File => load_file(home),
        KeystoreKind::OsKeyring => load_keyring(home),
    }
}

/// A one-line description of where the DEK is and what that protects, for `doctor`.
pub fn describe(home: &Home, kind: &KeystoreKind) -> String {
    match kind {
        KeystoreKind::File => format!(
            "0600 key file {} ({}: any process of this uid can read it)",
            home.path(DEK_FILE).display(),
            if cfg!(all(feature = "os-keyring", target_os = "linux")) {
                "no OS keyring was reachable at init"
            } else {
                "this build has no OS keyring support (cargo feature `os-keyring`)"
            }
        ),
        KeystoreKind::OsKeyring => format!(
            "OS keyring (Secret Service), service `{KEYRING_SERVICE}`, user `{}`{}",
            home.root().display(),
            if cfg!(all(feature = "os-keyring", target_os = "linux")) {
                ""
            } else {
                " (this build cannot reach it: built without the `os-keyring` feature)"
            }
        ),
    }
}

fn load_file(home: &Home) -> Result<Dek, StateError> {
    let path = home.path(DEK_FILE);
    let mut file = match open_state_file(&path) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => {
            return Err(StateError::DekMissing {
                location: format!("key file {} (it does not exist)", path.display()),
            });
        }
        Err(e) => return Err(e),
    };
    let len = file
        .metadata()
        .map_err(|e| StateError::io("examine", &path, e))?
        .len();
    if len != KEY_LEN as u64 {
        return Err(StateError::corrupt(
            &path,
            format!("a key file holds exactly {KEY_LEN} bytes, this one has {len}"),
        ));
    }
    // Read straight into the key's final (heap, wiped-on-drop) home: no intermediate buffer.
    Dek::fill_with(|k| file.read_exact(k)).map_err(|e| StateError::io("read", &path, e))
}

#[cfg(all(feature = "os-keyring", target_os = "linux"))]
fn load_keyring(home: &Home) -> Result<Dek, StateError> {
    os::load(home)
}

#[cfg(not(all(feature = "os-keyring", target_os = "linux")))]
fn load_keyring(home: &Home) -> Result<Dek, StateError> {
    Err(StateError::DekMissing {
        location: format!(
            "the OS keyring (service `{KEYRING_SERVICE}`, user `{}`), which this build cannot reach: \
             it was built without the `os-keyring` feature; use a build with it",
            home.root().display()
        ),
    })
}

/// The Secret Service through keyring-core.
#[cfg(all(feature = "os-keyring", target_os = "linux"))]
mod os {
    use keyring_core::api::CredentialStoreApi;
    use subtle::ConstantTimeEq;
    use zbus_secret_service_keyring_store::Store;
    use zeroize::Zeroizing;

    use super::{KEY_LEN, KEYRING_SERVICE};
    use crate::crypto::Dek;
    use crate::error::StateError;
    use crate::home::Home;

    /// Why the keyring cannot be used, in words fit for a user (never containing key bytes:
    /// only variants that carry platform messages are formatted).
    fn why(e: &keyring_core::Error) -> String {
        use keyring_core::Error as E;
        match e {
            E::NoEntry => "no such entry".into(),
            E::PlatformFailure(p) | E::NoStorageAccess(p) => p.to_string(),
            E::Invalid(what, why) => format!("invalid {what}: {why}"),
            _ => "unexpected keyring error".into(),
        }
    }

    fn entry(home: &Home) -> Result<keyring_core::Entry, String> {
        // Without a session bus address zbus would try autolaunch; we want "not reachable".
        if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none_or(|v| v.is_empty()) {
            return Err("no D-Bus session (DBUS_SESSION_BUS_ADDRESS is unset)".into());
        }
        let store = Store::new().map_err(|e| why(&e))?;
        let user = home.root().to_string_lossy();
        store
            .build(KEYRING_SERVICE, &user, None)
            .map_err(|e| why(&e))
    }

    /// Stores the key and reads it back: a keyring that accepts writes but cannot return them
    /// (locked, no prompt possible on a headless host) counts as unreachable.
    pub(super) fn store(home: &Home, dek: &Dek) -> Result<(), String> {
        let entry = entry(home)?;
        entry.set_secret(dek.expose()).map_err(|e| why(&e))?;
        let back = Zeroizing::new(entry.get_secret().map_err(|e| why(&e))?);
        if back.len() == KEY_LEN && bool::from(back.as_slice().ct_eq(dek.expose())) {
            Ok(())
        } else {
            let _ = entry.delete_credential();
            Err("the keyring returned a different value".into())
        }
    }

    pub(super) fn load(home: &Home) -> Result<Dek, StateError> {
        let location = |why: &str| StateError::DekMissing {
            location: format!(
                "the OS keyring (service `{KEYRING_SERVICE}`, user `{}`): {why}",
                home.root().display()
            ),
        };
        let entry = entry(home).map_err(|w| location(&w))?;
        let secret = Zeroizing::new(entry.get_secret().map_err(|e| location(&why(&e)))?);
        Dek::from_bytes(&secret).map_err(|_| location("the stored key has the wrong length"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempHome;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn file_keystore_round_trip() {
        let t = TempHome::new("keystore");
        let home = t.home();
        let (dek, kind) = store_new_dek(&home).unwrap();
        if kind == KeystoreKind::File {
            let path = home.path(DEK_FILE);
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert_eq!(meta.len(), 32);
            assert!(describe(&home, &kind).contains("0600 key file"));
        }
        let back = load_dek(&home, &kind).unwrap();
        assert_eq!(back.expose(), dek.expose());
    }

    #[test]
    fn missing_dek_file_names_the_path() {
        let t = TempHome::new("nodek");
        let home = t.home();
        let err = load_dek(&home, &KeystoreKind::File).err().unwrap();
        assert!(matches!(err, StateError::DekMissing { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains(&home.path(DEK_FILE).display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn bad_dek_file_is_refused() {
        let t = TempHome::new("baddek");
        let home = t.home();
        write_atomic(home.root(), DEK_FILE, &[1u8; 31]).unwrap();
        assert!(matches!(
            load_dek(&home, &KeystoreKind::File),
            Err(StateError::Corrupt { .. })
        ));
        write_atomic(home.root(), DEK_FILE, &[1u8; 32]).unwrap();
        std::fs::set_permissions(home.path(DEK_FILE), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        assert!(matches!(
            load_dek(&home, &KeystoreKind::File),
            Err(StateError::UnsafePermissions { .. })
        ));
    }

    #[cfg(not(all(feature = "os-keyring", target_os = "linux")))]
    #[test]
    fn keyring_identity_without_feature_says_why() {
        let t = TempHome::new("nokeyring");
        let err = load_dek(&t.home(), &KeystoreKind::OsKeyring).err().unwrap();
        assert!(err.to_string().contains("os-keyring"), "{err}");
    }
}
