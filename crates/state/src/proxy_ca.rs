//! The credential-injecting proxy's CA, per installation: `proxy-ca.enc` holds its certificate
//! and its private key sealed under the DEK (AAD `agentkeys proxy-ca v1\0` + the certificate, so
//! a key cannot be paired with another certificate); `proxy-ca.pem` is the certificate alone and
//! `proxy-ca-bundle.pem` the system roots followed by it, for the programs `run --proxy` starts
//! (both public, 0600 like every state file: programs run as the same uid).
//!
//! The daemon creates the CA at its first start with a proxy (before its sandbox closes; see
//! the architecture's contract changes) and the proxy process writes the bundle at each start
//! (before its filter): generating them needs the certificate code of `agentkeys-proxy`, so this
//! module only stores and loads what it is given.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{KEY_LEN, open, seal};
use crate::error::StateError;
use crate::home::{Home, StateLock, read_state_file, write_atomic};

/// The sealed CA.
pub const CA_FILE: &str = "proxy-ca.enc";
/// The CA certificate (PEM).
pub const CA_PEM_FILE: &str = "proxy-ca.pem";
/// System roots plus the CA certificate (PEM).
pub const BUNDLE_FILE: &str = "proxy-ca-bundle.pem";
const AAD_PREFIX: &[u8] = b"agentkeys proxy-ca v1\0";
const MAX_CA_LEN: u64 = 64 * 1024;
/// Largest system root bundle copied into the bundle file.
pub const MAX_SYSTEM_ROOTS: u64 = 4 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaFile {
    version: u32,
    name: String,
    cert_der: String,
    sealed_key: String,
}

/// The CA as loaded. No `Debug`: it holds the private key.
pub struct ProxyCa {
    /// Its subject common name.
    pub name: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key: Zeroizing<Vec<u8>>,
}

fn aad(cert_der: &[u8]) -> Vec<u8> {
    [AAD_PREFIX, cert_der].concat()
}

/// Loads the CA, `None` when there is none yet.
///
/// # Errors
/// The file is unreadable, malformed, or does not open with this key.
pub fn load(home: &Home, key: &[u8; KEY_LEN]) -> Result<Option<ProxyCa>, StateError> {
    let path = home.path(CA_FILE);
    let Some((bytes, _)) = read_state_file(&path, MAX_CA_LEN)? else {
        return Ok(None);
    };
    let f: CaFile = serde_json::from_slice(&bytes)
        .map_err(|e| StateError::corrupt(&path, format!("not the CA file ({e})")))?;
    if f.version != 1 || f.name.len() > 128 {
        return Err(StateError::corrupt(&path, "unknown version or bad name"));
    }
    let cert_der = STANDARD
        .decode(&f.cert_der)
        .map_err(|_| StateError::corrupt(&path, "certificate is not base64"))?;
    let sealed = STANDARD
        .decode(&f.sealed_key)
        .map_err(|_| StateError::corrupt(&path, "key is not base64"))?;
    let key = open(key, &aad(&cert_der), &sealed)
        .map_err(|_| StateError::corrupt(&path, "the CA key does not open with this DEK"))?;
    Ok(Some(ProxyCa {
        name: f.name,
        cert_der,
        key,
    }))
}

/// Stores a new CA (under the state lock) and its certificate as PEM.
///
/// # Errors
/// The lock, the sealing or a write failed.
pub fn store(
    home: &Home,
    key: &[u8; KEY_LEN],
    ca: &ProxyCa,
    cert_pem: &str,
) -> Result<(), StateError> {
    let _lock = StateLock::acquire(home)?;
    let sealed = seal(key, &aad(&ca.cert_der), &ca.key)?;
    let f = CaFile {
        version: 1,
        name: ca.name.clone(),
        cert_der: STANDARD.encode(&ca.cert_der),
        sealed_key: STANDARD.encode(sealed),
    };
    let mut bytes = serde_json::to_vec(&f)
        .map_err(|e| StateError::corrupt(home.path(CA_FILE), format!("cannot serialise ({e})")))?;
    bytes.push(b'\n');
    write_atomic(home.root(), CA_PEM_FILE, cert_pem.as_bytes())?;
    write_atomic(home.root(), CA_FILE, &bytes)
}

/// Writes the bundle programs get: `system_roots` (PEM, may be empty) and then the CA's PEM.
/// Rewritten at each start, so a changed system store is picked up.
///
/// # Errors
/// A write failed.
pub fn write_bundle(home: &Home, system_roots: &[u8], cert_pem: &str) -> Result<(), StateError> {
    let _lock = StateLock::acquire(home)?;
    let mut out = Vec::with_capacity(system_roots.len() + cert_pem.len() + 64);
    out.extend_from_slice(system_roots);
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(b"# agentkeys proxy CA (this installation)\n");
    out.extend_from_slice(cert_pem.as_bytes());
    write_atomic(home.root(), CA_PEM_FILE, cert_pem.as_bytes())?;
    write_atomic(home.root(), BUNDLE_FILE, &out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempHome;

    #[test]
    fn the_ca_round_trips_and_is_bound_to_its_certificate() {
        let t = TempHome::new("proxyca");
        let home = Home::at(t.path().to_path_buf());
        let key = [7u8; KEY_LEN];
        assert!(load(&home, &key).unwrap().is_none());
        let ca = ProxyCa {
            name: "n".into(),
            cert_der: b"cert".to_vec(),
            key: Zeroizing::new(b"private".to_vec()),
        };
        store(&home, &key, &ca, "PEM\n").unwrap();
        let back = load(&home, &key).unwrap().unwrap();
        assert_eq!(&back.key[..], b"private");
        assert_eq!(back.cert_der, b"cert");
        assert!(load(&home, &[8u8; KEY_LEN]).is_err());
        // Another certificate with this key: refused.
        let path = home.path(CA_FILE);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["cert_der"] = STANDARD.encode(b"other").into();
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(load(&home, &key).is_err());
        write_bundle(&home, b"ROOTS", "PEM\n").unwrap();
        let b = std::fs::read_to_string(home.path(BUNDLE_FILE)).unwrap();
        assert!(b.starts_with("ROOTS\n#") && b.ends_with("PEM\n"));
    }
}
