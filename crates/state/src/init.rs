//! `agentkeys init [--force]`, and [`open_owner`], the usual first step of every owner command.
//!
//! A fresh init writes, under [`StateLock`]: the DEK (keystore), `session.enc`, an empty
//! `vault.enc` with its key check, and `identity.json` last. An init killed half-way therefore
//! leaves a home that is still "not initialized", and the next init starts over (overwriting the
//! partial files, which hold nothing yet).

use std::time::Duration;

use crate::crypto::Dek;
use crate::error::StateError;
use crate::home::{AGENTS_FILE, Home, IDENTITY_FILE, StateLock, write_atomic};
use crate::identity::{Identity, identity_json, load_identity};
use crate::keystore::{load_dek, store_new_dek};
use crate::session::{OwnerSession, write_owner_session};
use crate::vault::{VaultIndex, write_empty_vault};

/// Lifetime of an owner session minted by `init`.
pub const DEFAULT_OWNER_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What [`init`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitOutcome {
    /// A new identity, DEK, owner session and empty vault: print `Initialized as <id>`.
    Initialized(Identity),
    /// Already initialized and no `--force`: nothing changed. Print `Already initialized as <id>`.
    AlreadyInitialized(Identity),
    /// `--force` on an initialized home: a new owner session; identity, DEK and vault unchanged.
    SessionRenewed(Identity),
}

impl InitOutcome {
    /// The identity, whichever the outcome.
    pub fn identity(&self) -> &Identity {
        match self {
            InitOutcome::Initialized(i)
            | InitOutcome::AlreadyInitialized(i)
            | InitOutcome::SessionRenewed(i) => i,
        }
    }
}

/// Initializes `home`, or with `force` mints a new owner session for an initialized one.
///
/// - Fresh: creates the home (0700), the identity, a DEK ([`store_new_dek`]), an owner session
///   valid for [`DEFAULT_OWNER_TTL`] with scope `["*"]`, an empty vault; `identity.json` last.
/// - Initialized, no `force`: changes nothing (not even a lock file) and returns
///   [`InitOutcome::AlreadyInitialized`].
/// - Initialized, `force`: loads the existing DEK and checks it against the vault (never
///   replaces it: that would orphan every stored secret), then writes a new `session.enc`.
///   The old owner token stops working.
///
/// # Errors
/// [`StateError::UnsafePermissions`] for a home others can reach; [`StateError::InitConflict`]
/// when `identity.json` is missing but stored secrets or agents exist (a fresh init would make
/// them unreadable); with `force`: [`StateError::DekMissing`] / [`StateError::DekWrong`]; file,
/// lock and keystore errors.
pub fn init(home: &Home, force: bool) -> Result<InitOutcome, StateError> {
    if home.is_initialized() && !force {
        home.check_dir()?;
        return Ok(InitOutcome::AlreadyInitialized(load_identity(home)?));
    }
    home.ensure_dir()?;
    let _lock = StateLock::acquire(home)?;
    let now = crate::now()?;

    if home.is_initialized() {
        let identity = load_identity(home)?;
        if !force {
            // Another init finished while we waited for the lock.
            return Ok(InitOutcome::AlreadyInitialized(identity));
        }
        let dek = load_dek(home, &identity.keystore)?;
        VaultIndex::read(home)?.check_key(dek.expose())?;
        let session = OwnerSession::mint(now, DEFAULT_OWNER_TTL)?;
        write_owner_session(home, dek.expose(), &session)?;
        return Ok(InitOutcome::SessionRenewed(identity));
    }

    refuse_orphaning(home)?;
    let (dek, keystore) = store_new_dek(home)?;
    let mut identity = Identity::generate(keystore)?;
    identity.created = now;
    let session = OwnerSession::mint(now, DEFAULT_OWNER_TTL)?;
    write_owner_session(home, dek.expose(), &session)?;
    write_empty_vault(home, dek.expose())?;
    write_atomic(home.root(), IDENTITY_FILE, &identity_json(&identity)?)?;
    Ok(InitOutcome::Initialized(identity))
}

/// A home without `identity.json` may still hold a vault with entries or an agent registry
/// (someone deleted the identity). A fresh init would replace the DEK and make them unreadable:
/// refuse, and say what to do.
fn refuse_orphaning(home: &Home) -> Result<(), StateError> {
    let conflict = |detail: String| StateError::InitConflict {
        home: home.root().to_path_buf(),
        detail,
    };
    let vault = home.path(crate::home::VAULT_FILE);
    if vault.exists() {
        // read() reports NotInitialized only for a missing file, which this is not.
        let index = VaultIndex::read(home)?;
        if !index.is_empty() {
            return Err(conflict(format!(
                "{IDENTITY_FILE} is missing but {} holds {} secret(s) that a new key could not open; \
                 restore {IDENTITY_FILE} from backup, or move {} away to start over",
                vault.display(),
                index.len(),
                vault.display()
            )));
        }
    }
    let agents = home.path(AGENTS_FILE);
    if agents.exists() {
        return Err(conflict(format!(
            "{IDENTITY_FILE} is missing but {} exists; restore {IDENTITY_FILE} from backup, or move \
             {} away to start over",
            agents.display(),
            agents.display()
        )));
    }
    Ok(())
}

/// What every owner command without a daemon starts with: checks the home is initialized and
/// private, loads the identity and the DEK, and verifies the DEK against the vault's key check.
///
/// # Errors
/// [`StateError::NotInitialized`]; [`StateError::UnsafePermissions`]; [`StateError::DekMissing`];
/// [`StateError::DekWrong`]; file and keystore errors.
pub fn open_owner(home: &Home) -> Result<(Identity, Dek), StateError> {
    if !home.is_initialized() {
        return Err(StateError::NotInitialized {
            home: home.root().to_path_buf(),
        });
    }
    home.check_dir()?;
    let identity = load_identity(home)?;
    let dek = load_dek(home, &identity.keystore)?;
    VaultIndex::read(home)?.check_key(dek.expose())?;
    Ok((identity, dek))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::{DEK_FILE, SESSION_FILE, VAULT_FILE};
    use crate::keystore::KeystoreKind;
    use crate::session::load_owner_session;
    use crate::testutil::TempHome;
    use crate::vault::{Policy, put_secret};
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_idempotent() {
        let t = TempHome::new("idem");
        let home = Home::at(t.path().join("home"));
        let first = init(&home, false).unwrap();
        let InitOutcome::Initialized(id) = first else {
            panic!("expected Initialized");
        };
        assert!(id.id.starts_with("ak-") && id.id.len() == 19, "{}", id.id);
        assert_eq!(id.keystore, KeystoreKind::File);
        assert_eq!(
            fs::metadata(home.root()).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let session = fs::read(home.path(SESSION_FILE)).unwrap();
        let identity = fs::read(home.path(IDENTITY_FILE)).unwrap();
        let vault = fs::read(home.path(VAULT_FILE)).unwrap();
        let dek = fs::read(home.path(DEK_FILE)).unwrap();

        let second = init(&home, false).unwrap();
        assert_eq!(second, InitOutcome::AlreadyInitialized(id.clone()));
        assert_eq!(fs::read(home.path(SESSION_FILE)).unwrap(), session);
        assert_eq!(fs::read(home.path(IDENTITY_FILE)).unwrap(), identity);
        assert_eq!(fs::read(home.path(VAULT_FILE)).unwrap(), vault);
        assert_eq!(fs::read(home.path(DEK_FILE)).unwrap(), dek);

        // Every state file is 0600.
        for f in [SESSION_FILE, IDENTITY_FILE, VAULT_FILE, DEK_FILE] {
            let mode = fs::metadata(home.path(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
    }

    #[test]
    fn init_force_recreates() {
        let t = TempHome::new("force");
        let home = t.home();
        let id = init(&home, false).unwrap().identity().clone();
        let (_, dek) = open_owner(&home).unwrap();
        put_secret(&home, &dek, "github", b"still-here", Policy::default()).unwrap();
        let old = load_owner_session(&home, dek.expose()).unwrap();

        let out = init(&home, true).unwrap();
        assert_eq!(out, InitOutcome::SessionRenewed(id.clone()));
        let (id2, dek2) = open_owner(&home).unwrap();
        assert_eq!(id2, id);
        assert_eq!(dek2.expose(), dek.expose(), "the DEK is never replaced");
        let new = load_owner_session(&home, dek.expose()).unwrap();
        assert!(!new.token.hash().ct_eq(&old.token.hash()));
        assert_eq!(new.scope, vec!["*".to_string()]);
        assert_eq!(new.expires - new.created, DEFAULT_OWNER_TTL.as_secs());
        let index = VaultIndex::read(&home).unwrap();
        assert_eq!(
            &index.open_entry(dek2.expose(), "github").unwrap().unwrap()[..],
            b"still-here"
        );
    }

    #[test]
    fn init_force_with_missing_or_wrong_dek_changes_nothing() {
        let t = TempHome::new("forcedek");
        let home = t.home();
        init(&home, false).unwrap();
        let session = fs::read(home.path(SESSION_FILE)).unwrap();

        // Wrong key in the key file.
        let good = fs::read(home.path(DEK_FILE)).unwrap();
        write_atomic(home.root(), DEK_FILE, &[9u8; 32]).unwrap();
        let err = init(&home, true).unwrap_err();
        assert!(matches!(err, StateError::DekWrong { .. }), "{err}");
        assert!(matches!(
            open_owner(&home),
            Err(StateError::DekWrong { .. })
        ));

        // No key file at all.
        fs::remove_file(home.path(DEK_FILE)).unwrap();
        let err = init(&home, true).unwrap_err();
        assert!(matches!(err, StateError::DekMissing { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&home.path(DEK_FILE).display().to_string()),
            "{err}"
        );
        assert!(
            !home.path(DEK_FILE).exists(),
            "a missing DEK is never silently recreated"
        );
        assert_eq!(fs::read(home.path(SESSION_FILE)).unwrap(), session);

        write_atomic(home.root(), DEK_FILE, &good).unwrap();
        open_owner(&home).unwrap();
    }

    #[test]
    fn unsafe_home_is_refused() {
        let t = TempHome::new("unsafehome");
        let home = t.home();
        init(&home, false).unwrap();
        fs::set_permissions(home.root(), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            init(&home, false),
            Err(StateError::UnsafePermissions { .. })
        ));
        assert!(matches!(
            open_owner(&home),
            Err(StateError::UnsafePermissions { .. })
        ));
        fs::set_permissions(home.root(), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(home.path(VAULT_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = open_owner(&home).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn init_refuses_to_orphan_a_vault_without_identity() {
        let t = TempHome::new("orphan");
        let home = t.home();
        init(&home, false).unwrap();
        let (_, dek) = open_owner(&home).unwrap();
        put_secret(&home, &dek, "github", b"x", Policy::default()).unwrap();
        fs::remove_file(home.path(IDENTITY_FILE)).unwrap();
        let vault = fs::read(home.path(VAULT_FILE)).unwrap();
        let err = init(&home, false).unwrap_err();
        assert!(matches!(err, StateError::InitConflict { .. }), "{err}");
        assert_eq!(fs::read(home.path(VAULT_FILE)).unwrap(), vault);
        assert!(matches!(
            open_owner(&home),
            Err(StateError::NotInitialized { .. })
        ));
    }

    #[test]
    fn interrupted_init_starts_over() {
        let t = TempHome::new("interrupted");
        let home = t.home();
        init(&home, false).unwrap();
        // Simulate a kill before identity.json was written: the rest is there, empty.
        fs::remove_file(home.path(IDENTITY_FILE)).unwrap();
        assert!(matches!(
            init(&home, false).unwrap(),
            InitOutcome::Initialized(_)
        ));
        open_owner(&home).unwrap();
    }

    #[test]
    fn open_owner_on_uninitialized_home() {
        let t = TempHome::new("none");
        let err = open_owner(&Home::at(t.path().join("nope"))).err().unwrap();
        assert!(err.to_string().contains("agentkeys init"), "{err}");
    }
}
