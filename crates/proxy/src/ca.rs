//! The per-install agentkeys CA and the leaf certificates the proxy mints with it.
//!
//! The daemon creates the CA once ([`generate_ca`]) and keeps its key sealed under the DEK; the
//! proxy receives the key as a secret page at start and builds a [`Minter`], which mints a leaf
//! for a host the first time a run's program opens a decrypted connection to it. Leaves are
//! ECDSA P-256, valid for [`LEAF_LIFETIME`] and cached per host until [`LEAF_RENEW`] before their
//! end. The CA's identity (subject, key usages, key id method) is fixed by [`ca_params`], so the
//! proxy rebuilds the issuer from the name alone and needs no certificate parser.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

/// How long a leaf certificate is valid.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A cached leaf is replaced this long before it ends.
pub const LEAF_RENEW: Duration = Duration::from_secs(3600);
/// How long the CA is valid.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Most leaves kept (one per host a run decrypts); past it the cache starts again.
const MAX_LEAVES: usize = 1024;

/// What went wrong with the CA or a leaf.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Generating a key or signing a certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls would not take the key.
    #[error("loading a key into rustls failed: {0}")]
    Load(#[from] rustls::Error),
    /// A host name that cannot be a certificate name.
    #[error("the host cannot be named in a certificate")]
    BadHost,
}

/// The CA's fixed identity for `name` (its subject common name).
pub fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "agentkeys");
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// A new CA: certificate DER, certificate PEM, PKCS#8 private key DER.
pub type NewCa = (Vec<u8>, String, Zeroizing<Vec<u8>>);

/// A new CA ([`NewCa`]).
///
/// # Errors
/// [`CaError::Generate`].
pub fn generate_ca(name: &str) -> Result<NewCa, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = ca_params(name);
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + CA_LIFETIME).into();
    let cert = p.self_signed(&key)?;
    Ok((
        cert.der().to_vec(),
        cert.pem(),
        Zeroizing::new(key.serialize_der()),
    ))
}

/// Mints and caches leaf certificates signed by the CA.
pub struct Minter {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    leaves: Mutex<HashMap<String, (Arc<CertifiedKey>, SystemTime)>>,
}

impl Minter {
    /// Builds the issuer from the CA's name, certificate and PKCS#8 key.
    ///
    /// # Errors
    /// [`CaError::Generate`] when the key does not parse.
    pub fn new(ca_name: &str, ca_der: Vec<u8>, key_pkcs8: &[u8]) -> Result<Minter, CaError> {
        let key = KeyPair::try_from(key_pkcs8)?;
        Ok(Minter {
            issuer: Issuer::new(ca_params(ca_name), key),
            ca_der: CertificateDer::from(ca_der),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The leaf for `host` (a DNS name or an IP literal, lowercase): cached, or minted now.
    ///
    /// # Errors
    /// [`CaError`] when minting fails.
    pub fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let now = SystemTime::now();
        {
            let cache = self.leaves.lock().expect("leaf cache");
            if let Some((k, until)) = cache.get(host)
                && until.duration_since(now).unwrap_or_default() > LEAF_RENEW
            {
                return Ok(k.clone());
            }
        }
        let until = now + LEAF_LIFETIME;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(|_| CaError::BadHost)?),
        };
        p.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        p.distinguished_name = dn;
        p.not_before = (now - Duration::from_secs(300)).into();
        p.not_after = until.into();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        // The leaf key's DER goes to rustls by value (freed memory is wiped by the allocator).
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))?;
        let ck = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.ca_der.clone()],
            signing,
        ));
        let mut cache = self.leaves.lock().expect("leaf cache");
        if cache.len() >= MAX_LEAVES {
            cache.clear();
        }
        cache.insert(host.to_string(), (ck.clone(), until));
        Ok(ck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_chains_to_the_ca_and_is_cached() {
        let (der, pem, key) = generate_ca("agentkeys test CA").unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let m = Minter::new("agentkeys test CA", der.clone(), &key).unwrap();
        let a = m.leaf("api.example.com").unwrap();
        let b = m.leaf("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let ip = m.leaf("127.0.0.1").unwrap();
        assert_eq!(ip.cert.len(), 2);
        // Verify the chain with webpki against the CA as the only root.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(der)).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let name = rustls_pki_types::ServerName::try_from("api.example.com").unwrap();
        verifier
            .verify_server_cert(
                &a.cert[0],
                &a.cert[1..],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
        let other = rustls_pki_types::ServerName::try_from("evil.example.com").unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &a.cert[0],
                    &[],
                    &other,
                    &[],
                    rustls_pki_types::UnixTime::now()
                )
                .is_err()
        );
    }
}
