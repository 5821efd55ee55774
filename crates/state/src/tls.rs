//! The daemon's TLS identity for network listeners (`[daemon] listen = ["tls://..."]`): an
//! ECDSA P-256 key and a self-signed certificate, made on first use (the daemon's start with a
//! listener, or `agentkeys remote info`) and sealed under the DEK in `tls.enc` (AAD
//! `agentkeys tls.enc v1`), so the private key is never on disk in clear.
//!
//! Clients do not trust the certificate through a CA or its names: they pin its SHA-256
//! fingerprint ([`fingerprint`], `sha256:` and 64 hex digits), which `agentkeys remote info`
//! prints. A new identity (after `tls.enc` is removed) has a new fingerprint, which every
//! remote daemon refuses until its operator pins the new one.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::{KEY_LEN, open, seal};
use crate::error::StateError;
use crate::home::{Home, StateLock, read_state_file, write_atomic};

/// The sealed identity's file name in the home.
pub const TLS_FILE: &str = "tls.enc";
/// Associated data of `tls.enc`.
const TLS_AAD: &[u8] = b"agentkeys tls.enc v1";
/// Largest plausible `tls.enc`.
const MAX_TLS_LEN: u64 = 64 * 1024;
/// Plaintext format version.
const TLS_VERSION: u32 = 1;

/// The daemon's certificate (DER) and private key (PKCS#8 DER, wiped on drop). No `Debug`.
pub struct TlsIdentity {
    /// The self-signed certificate, DER. Public.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Zeroizing<Vec<u8>>,
}

impl TlsIdentity {
    /// The certificate's pin: `sha256:` and 64 lowercase hex digits.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }
}

/// `sha256:` and the 64 lowercase hex digits of SHA-256 over a DER certificate.
pub fn fingerprint(cert_der: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = Sha256::digest(cert_der);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses a pinned fingerprint as `remote info` prints it: `sha256:` then 64 hex digits (either
/// case; `:` between byte pairs allowed). Returns the 32 bytes.
///
/// # Errors
/// A message saying what form is expected (the input is not repeated).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    const FORM: &str =
        "must be \"sha256:\" followed by 64 hex digits, as `agentkeys remote info` prints it";
    let hex = s.strip_prefix("sha256:").ok_or(FORM)?;
    let digits: Vec<u8> = hex.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(FORM.into());
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|_| FORM)?;
        out[i] = u8::from_str_radix(text, 16).map_err(|_| FORM)?;
    }
    Ok(out)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    v: u32,
    /// Base64 DER.
    cert: String,
    /// Base64 PKCS#8 DER.
    key: String,
}

/// Reads `tls.enc`; `None` when there is none yet.
///
/// # Errors
/// [`StateError::DekWrong`] when `dek` does not open it, [`StateError::Corrupt`] for malformed
/// content, plus the file-access errors of [`crate::open_state_file`].
pub fn load_tls_identity(
    home: &Home,
    dek: &[u8; KEY_LEN],
) -> Result<Option<TlsIdentity>, StateError> {
    use base64::Engine;
    let path = home.path(TLS_FILE);
    let Some((sealed, _)) = read_state_file(&path, MAX_TLS_LEN)? else {
        return Ok(None);
    };
    let plain =
        open(dek, TLS_AAD, &sealed).map_err(|_| StateError::DekWrong { file: path.clone() })?;
    let stored: Zeroizing<Stored> = Zeroizing::new(
        serde_json::from_slice(&plain)
            .map_err(|_| StateError::corrupt(&path, "the sealed TLS identity is not valid"))?,
    );
    if stored.v != TLS_VERSION {
        return Err(StateError::corrupt(
            &path,
            format!("TLS identity format version {} is not supported", stored.v),
        ));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let bad = || StateError::corrupt(&path, "the sealed TLS identity is not valid");
    let cert_der = b64.decode(&stored.cert).map_err(|_| bad())?;
    let key_der = Zeroizing::new(b64.decode(&stored.key).map_err(|_| bad())?);
    Ok(Some(TlsIdentity { cert_der, key_der }))
}

impl zeroize::Zeroize for Stored {
    fn zeroize(&mut self) {
        self.key.zeroize();
    }
}

/// The daemon's TLS identity, made and sealed into `tls.enc` if there is none yet (under
/// [`StateLock`], so a daemon and `remote info` starting together make one, not two).
///
/// # Errors
/// As [`load_tls_identity`]; [`StateError::Random`] / [`StateError::Corrupt`] when the key
/// cannot be made; file and lock errors.
pub fn load_or_create_tls_identity(
    home: &Home,
    dek: &[u8; KEY_LEN],
) -> Result<TlsIdentity, StateError> {
    if let Some(id) = load_tls_identity(home, dek)? {
        return Ok(id);
    }
    if !home.is_initialized() {
        return Err(StateError::NotInitialized {
            home: home.root().to_path_buf(),
        });
    }
    let _lock = StateLock::acquire(home)?;
    // Made by another process while we waited for the lock.
    if let Some(id) = load_tls_identity(home, dek)? {
        return Ok(id);
    }
    crate::vault::VaultIndex::read(home)?.check_key(dek)?;
    let id = generate(home)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let stored = Zeroizing::new(Stored {
        v: TLS_VERSION,
        cert: b64.encode(&id.cert_der),
        key: b64.encode(&*id.key_der),
    });
    let mut plain = Zeroizing::new(Vec::with_capacity(4096));
    serde_json::to_writer(&mut *plain, &*stored)
        .map_err(|e| StateError::corrupt(home.path(TLS_FILE), format!("cannot serialise ({e})")))?;
    let sealed = seal(dek, TLS_AAD, &plain)?;
    write_atomic(home.root(), TLS_FILE, &sealed)?;
    Ok(id)
}

/// A fresh P-256 key and a self-signed certificate for it. Its names do not matter (clients pin
/// the fingerprint); its validity is long for the same reason.
fn generate(home: &Home) -> Result<TlsIdentity, StateError> {
    let path = home.path(TLS_FILE);
    let fail = |what: &str, e: rcgen::Error| {
        StateError::corrupt(&path, format!("cannot make the TLS identity: {what}: {e}"))
    };
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| fail("key", e))?;
    let mut params = rcgen::CertificateParams::new(vec!["agentkeysd".to_string()])
        .map_err(|e| fail("parameters", e))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "agentkeysd");
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2125, 1, 1);
    let cert = params
        .self_signed(&key)
        .map_err(|e| fail("certificate", e))?;
    Ok(TlsIdentity {
        cert_der: cert.der().to_vec(),
        key_der: Zeroizing::new(key.serialize_der()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{InitOutcome, init, open_owner};
    use crate::testutil::{TempHome, all_files, contains};

    #[test]
    fn identity_is_made_once_sealed_and_reloaded() {
        let t = TempHome::new("tls");
        let home = t.home();
        assert!(matches!(
            init(&home, false).unwrap(),
            InitOutcome::Initialized(_)
        ));
        let (_, dek) = open_owner(&home).unwrap();
        assert!(load_tls_identity(&home, dek.expose()).unwrap().is_none());
        let a = load_or_create_tls_identity(&home, dek.expose()).unwrap();
        let b = load_or_create_tls_identity(&home, dek.expose()).unwrap();
        assert_eq!(a.cert_der, b.cert_der, "made once, then loaded");
        assert_eq!(*a.key_der, *b.key_der);
        // The private key is in no file in clear.
        for (path, bytes) in all_files(home.root()) {
            assert!(
                !contains(&bytes, &a.key_der),
                "the private key is in clear in {}",
                path.display()
            );
        }
        // The fingerprint round-trips through the parser, in either case and with colons.
        let fp = a.fingerprint();
        assert_eq!(fp.len(), 71);
        let bytes = parse_fingerprint(&fp).unwrap();
        assert_eq!(
            parse_fingerprint(&fp.to_uppercase().replacen("SHA256", "sha256", 1)).unwrap(),
            bytes
        );
        let colons: String = fp.as_bytes()[7..]
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(
            parse_fingerprint(&format!("sha256:{colons}")).unwrap(),
            bytes
        );
        // A wrong key does not open it.
        let other = crate::crypto::Dek::generate().unwrap();
        assert!(matches!(
            load_tls_identity(&home, other.expose()),
            Err(StateError::DekWrong { .. })
        ));
    }

    #[test]
    fn malformed_fingerprints_are_refused_without_echo() {
        for bad in [
            "",
            "sha256:",
            "md5:00",
            "sha256:zz",
            &format!("sha256:{}", "0".repeat(63)),
        ] {
            let e = parse_fingerprint(bad).unwrap_err();
            assert!(e.contains("64 hex digits"), "{e}");
        }
    }
}
