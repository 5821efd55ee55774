//! The local vault, `vault.enc`.
//!
//! A JSON document, readable without the key so that `list` and policy lookups decrypt nothing:
//!
//! ```json
//! {"version":1,"dek_check":"<b64 sealed constant>",
//!  "entries":{"github":{"policy":{"high_value":false,"cache_ttl_secs":0,"allow_inline":false},
//!                       "created":1700000000,"updated":1700000000,"sealed":"<b64>"}}}
//! ```
//!
//! Each entry is sealed on its own, so a lookup opens only that entry. Its AAD is
//! `"agentkeys vault v1\0" + service + "\0" + canonical policy JSON` (the policy serialised
//! with its fields in declaration order, exactly as in the example): moving a blob to another
//! service, or editing a policy by hand (say, clearing `high_value`), makes that entry fail to
//! open. The policy read from the index is therefore only trustworthy once
//! [`VaultIndex::open_entry`] for that service has succeeded; callers decide with it and open
//! the entry before releasing anything, so a tampered policy denies instead of leaking.
//!
//! `dek_check` is a constant sealed under the DEK: it tells "wrong key" ([`StateError::DekWrong`])
//! apart from "this entry was tampered with" ([`StateError::EntryTampered`]), and lets writers
//! refuse a wrong key before they change anything.
//!
//! What this does not stop: someone who can write the file can delete entries or put back an
//! older copy of the whole file (a rollback). Only this uid (or root) can write it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agentkeys_hardening::page::MAX_SECRET_LEN;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{Dek, KEY_LEN, open, seal};
use crate::error::StateError;
use crate::home::{FileStamp, Home, StateLock, VAULT_FILE, read_state_file, write_atomic};
pub use crate::inject::DeliveryKind;
use crate::names::check_name;

/// File format version.
const VAULT_VERSION: u32 = 1;
/// AAD of the key check.
const DEK_CHECK_AAD: &[u8] = b"agentkeys vault dek_check v1";
/// Plaintext of the key check (a constant: its only job is to authenticate).
const DEK_CHECK_PLAIN: &[u8] = b"agentkeys data encryption key check";
/// Start of every entry's AAD.
const ENTRY_AAD_PREFIX: &[u8] = b"agentkeys vault v1\0";
/// Largest `vault.enc` we read: about 90 secrets of the maximum size, or many thousands of
/// ordinary ones.
const MAX_VAULT_LEN: u64 = 128 * 1024 * 1024;

/// How a service's secret may be delivered (DESIGN.md, Delivery).
///
/// The proxy fields (issue 16) are left out of the JSON when empty, so an entry stored before
/// they existed serialises to exactly the bytes it was sealed with (its AAD) and still opens
/// (`old_entries_open_after_the_policy_grew`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Policy {
    /// Never released without a human grant.
    pub high_value: bool,
    /// How long the daemon may keep a copy after delivery; 0 = wipe at once.
    pub cache_ttl_secs: u64,
    /// Whether the bytes may be returned inline in a message.
    pub allow_inline: bool,
    /// Hosts the credential-injecting proxy may send the value to
    /// ([`crate::inject::HostPattern`] text, normalised).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject_hosts: Vec<String>,
    /// Request headers (lowercase) the proxy may place the value in, besides `authorization`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject_headers: Vec<String>,
    /// Query parameters the proxy may place the value in (none unless named).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject_query: Vec<String>,
    /// The delivery kinds allowed; `None`: fd, env and file, inline with `allow_inline`, proxy
    /// when `inject_hosts` names a host (what every entry allowed before the field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver: Option<Vec<DeliveryKind>>,
}

impl Policy {
    /// Whether the value may leave the daemon this way.
    pub fn allows(&self, kind: DeliveryKind) -> bool {
        match &self.deliver {
            None => match kind {
                DeliveryKind::Fd | DeliveryKind::Env | DeliveryKind::File => true,
                DeliveryKind::Inline => self.allow_inline,
                DeliveryKind::Proxy => !self.inject_hosts.is_empty(),
            },
            Some(kinds) => {
                kinds.contains(&kind)
                    && (kind != DeliveryKind::Proxy || !self.inject_hosts.is_empty())
                    && (kind != DeliveryKind::Inline || self.allow_inline)
            }
        }
    }

    /// The kinds allowed, in words, for a refusal: `"fd, env, file"`.
    pub fn allowed_kinds(&self) -> String {
        let v: Vec<&str> = DeliveryKind::ALL
            .into_iter()
            .filter(|k| self.allows(*k))
            .map(DeliveryKind::as_str)
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}

/// What `list` shows about an entry: never its value.
#[derive(Clone, Debug, Serialize)]
pub struct EntryMeta {
    /// The service name.
    pub service: String,
    /// Its policy (authenticated only when the entry is opened; see the module doc).
    pub policy: Policy,
    /// When it was first stored, unix seconds.
    pub created: u64,
    /// When it was last stored, unix seconds.
    pub updated: u64,
}

/// One entry as held in memory: metadata and the sealed blob, no plaintext.
#[derive(Clone)]
struct Entry {
    policy: Policy,
    created: u64,
    updated: u64,
    sealed: Vec<u8>,
}

/// `vault.enc` as a file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VaultFile {
    version: u32,
    dek_check: String,
    entries: BTreeMap<String, EntryFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    policy: Policy,
    created: u64,
    updated: u64,
    sealed: String,
}

/// The parsed vault: names, policies and sealed blobs. Holds no plaintext.
pub struct VaultIndex {
    path: PathBuf,
    stamp: Option<FileStamp>,
    dek_check: Option<Vec<u8>>,
    entries: BTreeMap<String, Entry>,
}

/// Whether [`put_secret`] added an entry or replaced one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// There was none.
    Created,
    /// The old value is gone.
    Replaced,
}

/// Validates a service name: `[a-z0-9][a-z0-9._-]{0,63}`.
///
/// # Errors
/// [`StateError::InvalidName`] saying which rule it breaks (without repeating it).
pub fn validate_service_name(s: &str) -> Result<(), StateError> {
    check_name(
        "service",
        s,
        b"._-",
        "1 to 64 of a-z 0-9 . _ - (lowercase), starting with a letter or digit",
    )
}

/// The AAD that binds an entry to its service and policy.
fn entry_aad(service: &str, policy: &Policy) -> Vec<u8> {
    // Serialising a struct of bools, integers and string lists cannot fail; the field order is
    // fixed by the declaration and empty proxy fields are left out, which is what makes this
    // canonical (and keeps entries sealed before those fields existed readable).
    let policy_json = serde_json::to_vec(policy).unwrap_or_default();
    let mut aad =
        Vec::with_capacity(ENTRY_AAD_PREFIX.len() + service.len() + 1 + policy_json.len());
    aad.extend_from_slice(ENTRY_AAD_PREFIX);
    aad.extend_from_slice(service.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&policy_json);
    aad
}

impl VaultIndex {
    /// Reads and parses `vault.enc` (decrypting nothing). A missing file is an empty vault in an
    /// initialized home.
    ///
    /// # Errors
    /// [`StateError::NotInitialized`] when the file is missing and the home is not initialized;
    /// [`StateError::Corrupt`] for a malformed file; file-access errors.
    pub fn read(home: &Home) -> Result<VaultIndex, StateError> {
        let path = home.path(VAULT_FILE);
        let Some((bytes, stamp)) = read_state_file(&path, MAX_VAULT_LEN)? else {
            if !home.is_initialized() {
                return Err(StateError::NotInitialized {
                    home: home.root().to_path_buf(),
                });
            }
            return Ok(VaultIndex {
                path,
                stamp: None,
                dek_check: None,
                entries: BTreeMap::new(),
            });
        };
        let mut index = VaultIndex::parse(path, &bytes)?;
        index.stamp = Some(stamp);
        Ok(index)
    }

    /// Parses the bytes of a `vault.enc` read from `path` (decrypting nothing). [`read`](Self::read)
    /// uses it; it is public so that the parser can be fuzzed without a home directory. The
    /// result has no [`stamp`](Self::stamp): it was not read from a file here.
    ///
    /// # Errors
    /// [`StateError::Corrupt`] naming `path` for a malformed vault.
    pub fn parse(path: PathBuf, bytes: &[u8]) -> Result<VaultIndex, StateError> {
        let file: VaultFile = serde_json::from_slice(bytes)
            .map_err(|e| StateError::corrupt(&path, format!("not a valid vault ({e})")))?;
        if file.version != VAULT_VERSION {
            return Err(StateError::corrupt(
                &path,
                format!("vault format version {} is not supported", file.version),
            ));
        }
        let decode = |what: &str, b64: &str| {
            STANDARD
                .decode(b64)
                .map_err(|_| StateError::corrupt(&path, format!("{what} is not valid base64")))
        };
        let dek_check = decode("dek_check", &file.dek_check)?;
        let mut entries = BTreeMap::new();
        for (service, e) in file.entries {
            if validate_service_name(&service).is_err() {
                return Err(StateError::corrupt(
                    &path,
                    "an entry has an invalid service name",
                ));
            }
            let sealed = decode(&format!("entry `{service}`"), &e.sealed)?;
            entries.insert(
                service,
                Entry {
                    policy: e.policy,
                    created: e.created,
                    updated: e.updated,
                    sealed,
                },
            );
        }
        Ok(VaultIndex {
            path,
            stamp: None,
            dek_check: Some(dek_check),
            entries,
        })
    }

    /// An empty vault for `home` with a key check sealed under `key` (for `init`).
    fn new_empty(home: &Home, key: &[u8; KEY_LEN]) -> Result<VaultIndex, StateError> {
        Ok(VaultIndex {
            path: home.path(VAULT_FILE),
            stamp: None,
            dek_check: Some(seal(key, DEK_CHECK_AAD, DEK_CHECK_PLAIN)?),
            entries: BTreeMap::new(),
        })
    }

    /// The path it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stamp of the version that was read (`None` if there was no file).
    pub fn stamp(&self) -> Option<FileStamp> {
        self.stamp
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry's metadata, sorted by service name.
    pub fn list(&self) -> Vec<EntryMeta> {
        self.entries
            .iter()
            .map(|(service, e)| meta_of(service, e))
            .collect()
    }

    /// One entry's metadata.
    pub fn meta(&self, service: &str) -> Option<EntryMeta> {
        self.entries.get(service).map(|e| meta_of(service, e))
    }

    /// Checks that `key` is the vault's key. A vault without a key check (a missing file)
    /// accepts any key: there is nothing sealed to protect yet.
    ///
    /// # Errors
    /// [`StateError::DekWrong`] naming the vault file.
    pub fn check_key(&self, key: &[u8; KEY_LEN]) -> Result<(), StateError> {
        let Some(check) = &self.dek_check else {
            return Ok(());
        };
        match open(key, DEK_CHECK_AAD, check) {
            Ok(p) if p.as_slice() == DEK_CHECK_PLAIN => Ok(()),
            _ => Err(StateError::DekWrong {
                file: self.path.clone(),
            }),
        }
    }

    /// Decrypts the entry for `service` only; `Ok(None)` if there is none. The plaintext is
    /// wiped when dropped; copy it into a secret page and drop it promptly.
    ///
    /// # Errors
    /// [`StateError::DekWrong`] when `key` is not the vault's key; [`StateError::EntryTampered`]
    /// when the key is right but this entry does not open (modified, moved, or policy edited).
    pub fn open_entry(
        &self,
        key: &[u8; KEY_LEN],
        service: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StateError> {
        let Some(entry) = self.entries.get(service) else {
            return Ok(None);
        };
        match open(key, &entry_aad(service, &entry.policy), &entry.sealed) {
            Ok(plain) => Ok(Some(plain)),
            Err(_) => {
                // Tell a wrong key apart from a damaged entry.
                self.check_key(key)?;
                Err(StateError::EntryTampered {
                    service: service.to_owned(),
                    path: self.path.clone(),
                })
            }
        }
    }

    /// Serialises and atomically writes the index. Call under [`StateLock`].
    fn write(&self, home: &Home) -> Result<(), StateError> {
        let Some(check) = &self.dek_check else {
            // Unreachable by construction: writers add a check before writing.
            return Err(StateError::corrupt(&self.path, "no key check to write"));
        };
        let file = VaultFile {
            version: VAULT_VERSION,
            dek_check: STANDARD.encode(check),
            entries: self
                .entries
                .iter()
                .map(|(k, e)| {
                    (
                        k.clone(),
                        EntryFile {
                            policy: e.policy.clone(),
                            created: e.created,
                            updated: e.updated,
                            sealed: STANDARD.encode(&e.sealed),
                        },
                    )
                })
                .collect(),
        };
        let mut bytes = serde_json::to_vec(&file)
            .map_err(|e| StateError::corrupt(&self.path, format!("cannot serialise ({e})")))?;
        bytes.push(b'\n');
        write_atomic(home.root(), VAULT_FILE, &bytes)
    }
}

fn meta_of(service: &str, e: &Entry) -> EntryMeta {
    EntryMeta {
        service: service.to_owned(),
        policy: e.policy.clone(),
        created: e.created,
        updated: e.updated,
    }
}

/// Writes an empty vault with a key check (for `init`). Call under [`StateLock`].
pub(crate) fn write_empty_vault(home: &Home, key: &[u8; KEY_LEN]) -> Result<(), StateError> {
    VaultIndex::new_empty(home, key)?.write(home)
}

/// The stamp of `vault.enc` (take it *before* reading; [`VaultIndex::stamp`] is exact).
pub fn vault_stamp(home: &Home) -> Option<FileStamp> {
    FileStamp::of_path(&home.path(VAULT_FILE))
}

/// Lock, check initialized, read, check the key: the common start of every vault write.
fn begin_write(home: &Home, dek: &Dek) -> Result<(StateLock, VaultIndex), StateError> {
    // Checked before taking the lock so an uninitialized home is not touched (no lock file);
    // nothing un-initializes a home, so the answer cannot change while we wait.
    if !home.is_initialized() {
        return Err(StateError::NotInitialized {
            home: home.root().to_path_buf(),
        });
    }
    let lock = StateLock::acquire(home)?;
    let index = VaultIndex::read(home)?;
    index.check_key(dek.expose())?;
    Ok((lock, index))
}

/// Stores `secret` for `service` with `policy`, replacing any previous value. Under
/// [`StateLock`]: read, check the key, seal, insert, write atomically.
///
/// # Errors
/// [`StateError::InvalidName`], [`StateError::InvalidSecret`] (empty, or over
/// [`MAX_SECRET_LEN`]); [`StateError::NotInitialized`]; [`StateError::DekWrong`]; file and lock
/// errors. Nothing is written on error.
pub fn put_secret(
    home: &Home,
    dek: &Dek,
    service: &str,
    secret: &[u8],
    policy: Policy,
) -> Result<PutOutcome, StateError> {
    validate_service_name(service)?;
    if secret.is_empty() {
        return Err(StateError::InvalidSecret {
            detail: "it is empty; pipe the secret on standard input".into(),
        });
    }
    if secret.len() > MAX_SECRET_LEN {
        return Err(StateError::InvalidSecret {
            detail: format!(
                "it is {} bytes; at most {MAX_SECRET_LEN} bytes (1 MiB) are supported",
                secret.len()
            ),
        });
    }
    let (_lock, mut index) = begin_write(home, dek)?;
    let outcome = index.insert_sealed(dek, service, secret, policy, crate::now()?)?;
    index.finish_write(home, dek)?;
    Ok(outcome)
}

/// Stores many secrets with one lock and one atomic write (an import, or a benchmark's vault of
/// 100,000 entries: [`put_secret`] rewrites the whole file per entry). Each is checked as in
/// [`put_secret`]; the first bad one refuses the whole batch and nothing is written.
///
/// # Errors
/// As [`put_secret`].
pub fn put_secrets<'a>(
    home: &Home,
    dek: &Dek,
    items: impl IntoIterator<Item = (&'a str, &'a [u8], Policy)>,
) -> Result<usize, StateError> {
    let (_lock, mut index) = begin_write(home, dek)?;
    let now = crate::now()?;
    let mut n = 0;
    for (service, secret, policy) in items {
        validate_service_name(service)?;
        if secret.is_empty() || secret.len() > MAX_SECRET_LEN {
            return Err(StateError::InvalidSecret {
                detail: format!(
                    "the secret for {service:?} is empty or over {MAX_SECRET_LEN} bytes"
                ),
            });
        }
        index.insert_sealed(dek, service, secret, policy, now)?;
        n += 1;
    }
    index.finish_write(home, dek)?;
    Ok(n)
}

impl VaultIndex {
    /// Seals `secret` under the DEK and puts it in the index (not yet on disk), keeping the
    /// creation time of an entry it replaces.
    fn insert_sealed(
        &mut self,
        dek: &Dek,
        service: &str,
        secret: &[u8],
        policy: Policy,
        now: u64,
    ) -> Result<PutOutcome, StateError> {
        let sealed = seal(dek.expose(), &entry_aad(service, &policy), secret)?;
        let (created, outcome) = match self.entries.get(service) {
            Some(old) => (old.created, PutOutcome::Replaced),
            None => (now, PutOutcome::Created),
        };
        self.entries.insert(
            service.to_owned(),
            Entry {
                policy,
                created,
                updated: now,
                sealed,
            },
        );
        Ok(outcome)
    }

    /// Adds the key check if the vault has none yet, and writes the file atomically.
    fn finish_write(&mut self, home: &Home, dek: &Dek) -> Result<(), StateError> {
        if self.dek_check.is_none() {
            self.dek_check = Some(seal(dek.expose(), DEK_CHECK_AAD, DEK_CHECK_PLAIN)?);
        }
        self.write(home)
    }
}

/// Deletes the entry for `service`; `Ok(false)` (and nothing written) if there was none.
///
/// # Errors
/// [`StateError::InvalidName`]; [`StateError::NotInitialized`]; [`StateError::DekWrong`] (a
/// wrong key means something is off: nothing is changed); file and lock errors.
pub fn delete_secret(home: &Home, dek: &Dek, service: &str) -> Result<bool, StateError> {
    validate_service_name(service)?;
    let (_lock, mut index) = begin_write(home, dek)?;
    if index.entries.remove(service).is_none() {
        return Ok(false);
    }
    index.write(home)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{init, open_owner};
    use crate::testutil::{TempHome, all_files, contains};
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use std::fs;

    fn initialized(tag: &str) -> (TempHome, Home, Dek) {
        let t = TempHome::new(tag);
        let home = t.home();
        init(&home, false).unwrap();
        let (_, dek) = open_owner(&home).unwrap();
        (t, home, dek)
    }

    #[test]
    fn put_secrets_writes_a_batch_once_and_refuses_a_bad_one_whole() {
        let (_t, home, dek) = initialized("batch");
        let names: Vec<String> = (0..50).map(|i| format!("svc-{i}")).collect();
        let secret = b"batch secret value";
        let n = put_secrets(
            &home,
            &dek,
            names
                .iter()
                .map(|s| (s.as_str(), &secret[..], Policy::default())),
        )
        .unwrap();
        assert_eq!(n, 50);
        for s in &names {
            assert_eq!(get(&home, &dek, s).as_deref(), Some(&secret[..]));
        }
        let before = fs::read(home.path(VAULT_FILE)).unwrap();
        let bad = [
            ("ok-one", &secret[..], Policy::default()),
            ("Bad Name", &secret[..], Policy::default()),
        ];
        assert!(put_secrets(&home, &dek, bad).is_err());
        assert_eq!(
            fs::read(home.path(VAULT_FILE)).unwrap(),
            before,
            "nothing written"
        );
    }

    fn get(home: &Home, dek: &Dek, service: &str) -> Option<Vec<u8>> {
        VaultIndex::read(home)
            .unwrap()
            .open_entry(dek.expose(), service)
            .unwrap()
            .map(|z| z.to_vec())
    }

    /// Rewrites `vault.enc` through its JSON.
    fn edit_vault(home: &Home, f: impl FnOnce(&mut serde_json::Value)) {
        let mut v: serde_json::Value =
            serde_json::from_slice(&fs::read(home.path(VAULT_FILE)).unwrap()).unwrap();
        f(&mut v);
        write_atomic(home.root(), VAULT_FILE, &serde_json::to_vec(&v).unwrap()).unwrap();
    }

    #[test]
    fn vault_put_get_list_delete() {
        let (_t, home, dek) = initialized("vault");
        assert!(VaultIndex::read(&home).unwrap().is_empty());
        let p = Policy {
            high_value: true,
            cache_ttl_secs: 60,
            allow_inline: false,
            ..Policy::default()
        };
        assert_eq!(
            put_secret(&home, &dek, "github", b"ghp_one", p.clone()).unwrap(),
            PutOutcome::Created
        );
        put_secret(&home, &dek, "aws.prod", b"AKIA", Policy::default()).unwrap();
        assert_eq!(get(&home, &dek, "github").unwrap(), b"ghp_one");
        let created = VaultIndex::read(&home)
            .unwrap()
            .meta("github")
            .unwrap()
            .created;
        assert_eq!(
            put_secret(&home, &dek, "github", b"ghp_two", p.clone()).unwrap(),
            PutOutcome::Replaced
        );
        assert_eq!(get(&home, &dek, "github").unwrap(), b"ghp_two");

        let index = VaultIndex::read(&home).unwrap();
        assert_eq!(index.stamp(), vault_stamp(&home));
        let list = index.list();
        let names: Vec<_> = list.iter().map(|m| m.service.as_str()).collect();
        assert_eq!(names, ["aws.prod", "github"]);
        assert_eq!(list[1].policy, p);
        assert_eq!(list[1].created, created);
        assert!(index.open_entry(dek.expose(), "nope").unwrap().is_none());

        assert!(delete_secret(&home, &dek, "github").unwrap());
        let stamp = vault_stamp(&home);
        assert!(!delete_secret(&home, &dek, "github").unwrap());
        assert_eq!(vault_stamp(&home), stamp, "deleting nothing writes nothing");
        assert!(get(&home, &dek, "github").is_none());
        assert_eq!(get(&home, &dek, "aws.prod").unwrap(), b"AKIA");
    }

    #[test]
    fn parse_reads_what_read_reads_without_a_stamp() {
        let (_t, home, dek) = initialized("parse");
        put_secret(&home, &dek, "github", b"v", Policy::default()).unwrap();
        let bytes = fs::read(home.path(VAULT_FILE)).unwrap();
        let read = VaultIndex::read(&home).unwrap();
        let parsed = VaultIndex::parse(home.path(VAULT_FILE), &bytes).unwrap();
        assert!(read.stamp().is_some() && parsed.stamp().is_none());
        assert_eq!(parsed.path(), read.path());
        assert_eq!(parsed.len(), 1);
        assert_eq!(
            parsed
                .open_entry(dek.expose(), "github")
                .unwrap()
                .map(|z| z.to_vec()),
            Some(b"v".to_vec())
        );
        let err = VaultIndex::parse(home.path(VAULT_FILE), b"{\"version\":1")
            .err()
            .unwrap();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn canonical_policy_aad_is_pinned() {
        // Changing this string orphans every stored entry: bump the AAD version instead.
        let aad = entry_aad(
            "svc",
            &Policy {
                high_value: true,
                cache_ttl_secs: 5,
                allow_inline: false,
                ..Policy::default()
            },
        );
        assert_eq!(
            aad,
            b"agentkeys vault v1\0svc\0{\"high_value\":true,\"cache_ttl_secs\":5,\"allow_inline\":false}"
        );
    }

    #[test]
    fn old_entries_open_after_the_policy_grew() {
        // An entry sealed before the proxy fields existed: its AAD is the three-field JSON.
        // Default (empty) proxy fields serialise to exactly that, so it still opens.
        let p = Policy {
            high_value: true,
            cache_ttl_secs: 5,
            allow_inline: false,
            ..Policy::default()
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"high_value":true,"cache_ttl_secs":5,"allow_inline":false}"#
        );
        let (_t, home, dek) = initialized("grew");
        // The exact bytes the old code sealed with (field order of the old struct).
        let old_json = r#"{"high_value":false,"cache_ttl_secs":0,"allow_inline":true}"#;
        let old_policy: serde_json::Value = serde_json::from_str(old_json).unwrap();
        let aad = [ENTRY_AAD_PREFIX, b"old", b"\0", old_json.as_bytes()].concat();
        let sealed = seal(dek.expose(), &aad, b"old-value").unwrap();
        put_secret(&home, &dek, "keep", b"v", Policy::default()).unwrap();
        edit_vault(&home, |v| {
            v["entries"]["old"] = serde_json::json!({
                "policy": old_policy,
                "created": 1, "updated": 1,
                "sealed": STANDARD.encode(&sealed),
            })
        });
        let index = VaultIndex::read(&home).unwrap();
        assert_eq!(
            &index.open_entry(dek.expose(), "old").unwrap().unwrap()[..],
            b"old-value"
        );
        // A proxy policy is part of the AAD: editing its hosts by hand breaks the entry.
        let proxy = Policy {
            inject_hosts: vec!["api.github.com".into()],
            deliver: Some(vec![DeliveryKind::Proxy]),
            ..Policy::default()
        };
        put_secret(&home, &dek, "gh", b"ghp", proxy.clone()).unwrap();
        let index = VaultIndex::read(&home).unwrap();
        assert_eq!(index.meta("gh").unwrap().policy, proxy);
        assert!(index.open_entry(dek.expose(), "gh").unwrap().is_some());
        edit_vault(&home, |v| {
            v["entries"]["gh"]["policy"]["inject_hosts"] = serde_json::json!(["evil.example"])
        });
        assert!(
            VaultIndex::read(&home)
                .unwrap()
                .open_entry(dek.expose(), "gh")
                .is_err()
        );
    }

    #[test]
    fn policy_allows_kinds() {
        let legacy = Policy::default();
        assert!(legacy.allows(DeliveryKind::Fd) && legacy.allows(DeliveryKind::Env));
        assert!(!legacy.allows(DeliveryKind::Inline) && !legacy.allows(DeliveryKind::Proxy));
        let proxy_only = Policy {
            inject_hosts: vec!["a.com".into()],
            deliver: Some(vec![DeliveryKind::Proxy]),
            ..Policy::default()
        };
        assert!(proxy_only.allows(DeliveryKind::Proxy));
        assert!(!proxy_only.allows(DeliveryKind::Fd) && !proxy_only.allows(DeliveryKind::Env));
        assert_eq!(proxy_only.allowed_kinds(), "proxy");
    }

    #[test]
    fn entry_swap_is_detected() {
        let (_t, home, dek) = initialized("swap");
        put_secret(&home, &dek, "github", b"github-secret", Policy::default()).unwrap();
        put_secret(&home, &dek, "npm", b"npm-secret", Policy::default()).unwrap();
        edit_vault(&home, |v| {
            let blob = v["entries"]["github"]["sealed"].clone();
            v["entries"]["npm"]["sealed"] = blob;
        });
        let index = VaultIndex::read(&home).unwrap();
        let err = index.open_entry(dek.expose(), "npm").unwrap_err();
        assert!(matches!(err, StateError::EntryTampered { .. }), "{err}");
        assert!(err.to_string().contains("npm"));
        // The other entry is unaffected.
        assert_eq!(
            &index.open_entry(dek.expose(), "github").unwrap().unwrap()[..],
            b"github-secret"
        );
        // Renaming an entry is a swap too.
        edit_vault(&home, |v| {
            let e = v["entries"]["github"].clone();
            v["entries"]["gitlab"] = e;
        });
        assert!(matches!(
            VaultIndex::read(&home)
                .unwrap()
                .open_entry(dek.expose(), "gitlab"),
            Err(StateError::EntryTampered { .. })
        ));
    }

    #[test]
    fn policy_tamper_is_detected() {
        let (_t, home, dek) = initialized("policy");
        let p = Policy {
            high_value: true,
            ..Policy::default()
        };
        put_secret(&home, &dek, "bank", b"pin", p.clone()).unwrap();
        for (field, value) in [
            ("high_value", serde_json::json!(false)),
            ("cache_ttl_secs", serde_json::json!(3600)),
            ("allow_inline", serde_json::json!(true)),
        ] {
            put_secret(&home, &dek, "bank", b"pin", p.clone()).unwrap();
            edit_vault(&home, |v| v["entries"]["bank"]["policy"][field] = value);
            let index = VaultIndex::read(&home).unwrap();
            assert!(
                matches!(
                    index.open_entry(dek.expose(), "bank"),
                    Err(StateError::EntryTampered { .. })
                ),
                "{field} edit not detected"
            );
        }
    }

    #[test]
    fn no_plaintext_in_files() {
        let (_t, home, dek) = initialized("canary");
        let canary = format!(
            "CANARY-{:016x}-{:016x}",
            getrandom::u64().unwrap(),
            getrandom::u64().unwrap()
        );
        put_secret(&home, &dek, "canary", canary.as_bytes(), Policy::default()).unwrap();
        // Also a rewrite, so a stale temp file would show up too.
        put_secret(&home, &dek, "other", b"x", Policy::default()).unwrap();
        let mut needles = vec![canary.as_bytes().to_vec()];
        let hex: String = canary.bytes().map(|b| format!("{b:02x}")).collect();
        needles.push(hex.into_bytes());
        // base64 at each of the three alignments, without the edge characters that depend on
        // neighbouring bytes.
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            for pad in 0..3 {
                let mut input = vec![0u8; pad];
                input.extend_from_slice(canary.as_bytes());
                let enc = engine.encode(&input);
                needles.push(enc.as_bytes()[4..enc.len() - 4].to_vec());
            }
        }
        let files = all_files(home.root());
        assert!(
            files.len() >= 4,
            "expected identity, dek, session, vault, lock"
        );
        for (path, bytes) in files {
            for n in &needles {
                assert!(
                    !contains(&bytes, n),
                    "{} contains the canary",
                    path.display()
                );
            }
        }
        assert_eq!(get(&home, &dek, "canary").unwrap(), canary.as_bytes());
    }

    #[test]
    fn wrong_dek_gives_dek_wrong_and_changes_nothing() {
        let (_t, home, dek) = initialized("wrongdek");
        put_secret(&home, &dek, "github", b"v1", Policy::default()).unwrap();
        let before = fs::read(home.path(VAULT_FILE)).unwrap();
        let wrong = Dek::generate().unwrap();
        let err = put_secret(&home, &wrong, "github", b"v2", Policy::default()).unwrap_err();
        assert!(matches!(err, StateError::DekWrong { .. }), "{err}");
        assert!(err.to_string().contains("vault.enc"), "{err}");
        assert!(matches!(
            put_secret(&home, &wrong, "new", b"v2", Policy::default()),
            Err(StateError::DekWrong { .. })
        ));
        assert!(matches!(
            delete_secret(&home, &wrong, "github"),
            Err(StateError::DekWrong { .. })
        ));
        assert!(matches!(
            VaultIndex::read(&home)
                .unwrap()
                .open_entry(wrong.expose(), "github"),
            Err(StateError::DekWrong { .. })
        ));
        assert_eq!(fs::read(home.path(VAULT_FILE)).unwrap(), before);
    }

    #[test]
    fn bad_input_changes_nothing() {
        let (_t, home, dek) = initialized("badinput");
        put_secret(&home, &dek, "keep", b"v", Policy::default()).unwrap();
        let before = fs::read(home.path(VAULT_FILE)).unwrap();
        for bad in [
            "",
            "GitHub",
            ".git",
            "-x",
            "a/b",
            "a b",
            "ä",
            &"a".repeat(65),
        ] {
            let err = put_secret(&home, &dek, bad, b"v", Policy::default()).unwrap_err();
            assert!(
                matches!(
                    err,
                    StateError::InvalidName {
                        kind: "service",
                        ..
                    }
                ),
                "{bad:?}"
            );
        }
        validate_service_name(&"a".repeat(64)).unwrap();
        validate_service_name("0.a_b-c").unwrap();
        assert!(matches!(
            put_secret(&home, &dek, "x", b"", Policy::default()),
            Err(StateError::InvalidSecret { .. })
        ));
        let big = vec![b'a'; MAX_SECRET_LEN + 1];
        assert!(matches!(
            put_secret(&home, &dek, "x", &big, Policy::default()),
            Err(StateError::InvalidSecret { .. })
        ));
        assert_eq!(fs::read(home.path(VAULT_FILE)).unwrap(), before);
        // The largest allowed secret round-trips.
        let max = vec![b'z'; MAX_SECRET_LEN];
        put_secret(&home, &dek, "max", &max, Policy::default()).unwrap();
        assert_eq!(get(&home, &dek, "max").unwrap().len(), MAX_SECRET_LEN);
    }

    #[test]
    fn invalid_name_error_does_not_echo_the_input() {
        let err = validate_service_name("ghp_SECRETlooking").unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
        assert!(err.to_string().contains("character 5"), "{err}");
    }

    #[test]
    fn uninitialized_and_corrupt_vaults() {
        let t = TempHome::new("uninit");
        let home = t.home();
        assert!(matches!(
            VaultIndex::read(&home),
            Err(StateError::NotInitialized { .. })
        ));
        let dek = Dek::generate().unwrap();
        assert!(matches!(
            put_secret(&home, &dek, "x", b"v", Policy::default()),
            Err(StateError::NotInitialized { .. })
        ));
        let (_t, home, dek) = initialized("corrupt");
        write_atomic(
            home.root(),
            VAULT_FILE,
            b"{\"version\":2,\"dek_check\":\"\",\"entries\":{}}",
        )
        .unwrap();
        let err = VaultIndex::read(&home).err().unwrap();
        assert!(err.to_string().contains("version 2"), "{err}");
        write_atomic(home.root(), VAULT_FILE, b"not json").unwrap();
        assert!(matches!(
            VaultIndex::read(&home),
            Err(StateError::Corrupt { .. })
        ));
        assert!(matches!(
            put_secret(&home, &dek, "x", b"v", Policy::default()),
            Err(StateError::Corrupt { .. })
        ));
        // A deleted vault in an initialized home is empty, and the next put recreates it.
        fs::remove_file(home.path(VAULT_FILE)).unwrap();
        assert!(VaultIndex::read(&home).unwrap().is_empty());
        put_secret(&home, &dek, "x", b"v", Policy::default()).unwrap();
        VaultIndex::read(&home)
            .unwrap()
            .check_key(dek.expose())
            .unwrap();
    }

    #[test]
    fn concurrent_puts_from_threads_all_survive() {
        let (_t, home, _) = initialized("threads");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let home = home.clone();
                std::thread::spawn(move || {
                    let (_, dek) = open_owner(&home).unwrap();
                    put_secret(
                        &home,
                        &dek,
                        &format!("svc{i}"),
                        format!("secret-{i}").as_bytes(),
                        Policy::default(),
                    )
                    .unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let (_, dek) = open_owner(&home).unwrap();
        let index = VaultIndex::read(&home).unwrap();
        assert_eq!(index.len(), 8);
        for i in 0..8 {
            let v = index
                .open_entry(dek.expose(), &format!("svc{i}"))
                .unwrap()
                .unwrap();
            assert_eq!(&v[..], format!("secret-{i}").as_bytes());
        }
    }

    const CHILD_HOME: &str = "AGENTKEYS_STATE_TEST_CHILD_HOME";
    const CHILD_SERVICE: &str = "AGENTKEYS_STATE_TEST_CHILD_SERVICE";

    /// Run by `concurrent_puts_from_processes_all_survive` in child processes.
    #[test]
    #[ignore = "helper: runs only as a child of concurrent_puts_from_processes_all_survive"]
    fn concurrent_put_child() {
        let (Some(home), Some(service)) = (
            std::env::var_os(CHILD_HOME),
            std::env::var(CHILD_SERVICE).ok(),
        ) else {
            return;
        };
        let home = Home::at(PathBuf::from(home));
        let (_, dek) = open_owner(&home).unwrap();
        put_secret(&home, &dek, &service, service.as_bytes(), Policy::default()).unwrap();
    }

    const CHILD_LOOP: &str = "AGENTKEYS_STATE_TEST_CHILD_LOOP";

    /// Run by `kill_9_during_put_leaves_vault_readable`: stores large secrets until killed.
    #[test]
    #[ignore = "helper: runs only as a child of kill_9_during_put_leaves_vault_readable"]
    fn looping_put_child() {
        let Some(home) = std::env::var_os(CHILD_LOOP) else {
            return;
        };
        let home = Home::at(PathBuf::from(home));
        let (_, dek) = open_owner(&home).unwrap();
        let big = vec![b'k'; MAX_SECRET_LEN];
        for i in 0.. {
            put_secret(
                &home,
                &dek,
                &format!("big{}", i % 4),
                &big,
                Policy::default(),
            )
            .unwrap();
        }
    }

    #[test]
    fn kill_9_during_put_leaves_vault_readable() {
        let (_t, home, dek) = initialized("kill9");
        put_secret(&home, &dek, "before", b"kept", Policy::default()).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "vault::tests::looping_put_child",
                "--ignored",
                "-q",
            ])
            .env(CHILD_LOOP, home.root())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Let it get through a few writes, then SIGKILL it wherever it is.
        std::thread::sleep(std::time::Duration::from_millis(700));
        child.kill().unwrap();
        child.wait().unwrap();
        let _lock = StateLock::acquire(&home).unwrap();
        let index = VaultIndex::read(&home).unwrap();
        index.check_key(dek.expose()).unwrap();
        assert_eq!(
            &index.open_entry(dek.expose(), "before").unwrap().unwrap()[..],
            b"kept"
        );
        for m in index.list() {
            index.open_entry(dek.expose(), &m.service).unwrap().unwrap();
        }
        let leftovers = fs::read_dir(home.root())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".agentkeys-tmp.")
            })
            .count();
        assert_eq!(leftovers, 0, "the lock removes a killed writer's temp file");
    }

    #[test]
    fn concurrent_puts_from_processes_all_survive() {
        let (_t, home, dek) = initialized("procs");
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..8)
            .map(|i| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "vault::tests::concurrent_put_child",
                        "--ignored",
                        "--test-threads=1",
                        "-q",
                    ])
                    .env(CHILD_HOME, home.root())
                    .env(CHILD_SERVICE, format!("proc{i}"))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        let index = VaultIndex::read(&home).unwrap();
        assert_eq!(index.len(), 8, "a concurrent writer lost another's entry");
        for i in 0..8 {
            let s = format!("proc{i}");
            assert_eq!(
                &index.open_entry(dek.expose(), &s).unwrap().unwrap()[..],
                s.as_bytes()
            );
        }
    }
}
