//! Sealing: XChaCha20-Poly1305 with a fresh random 24-byte nonce per seal.
//!
//! A sealed blob is `nonce (24) || ciphertext || tag (16)`. Random 192-bit nonces never collide
//! in practice, so no nonce counter has to be kept in sync across processes. The associated data
//! (AAD) binds each blob to its place (file, version, vault entry and policy), so a blob moved
//! elsewhere fails to open.
//!
//! [`seal`] and [`open`] take the raw key, not a [`Dek`], so the daemon can keep its key in a
//! pkey-protected secret page and call them inside an access window.

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, SecretBox};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::StateError;

/// Length of the data encryption key.
pub const KEY_LEN: usize = 32;
/// Length of the random nonce at the front of a sealed blob.
pub const NONCE_LEN: usize = 24;
/// Length of the authentication tag at the end of a sealed blob.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// The data encryption key: 32 random bytes on the heap (moving a `Dek` moves a pointer, not
/// the key), wiped on drop. Deliberately without `Debug`, `Display`, `Clone` or `Serialize`.
pub struct Dek(SecretBox<[u8; KEY_LEN]>);

impl Dek {
    /// A new key from the kernel's random source, generated in place.
    ///
    /// # Errors
    /// [`StateError::Random`] when the kernel cannot supply random bytes.
    pub fn generate() -> Result<Dek, StateError> {
        Dek::fill_with(|k| getrandom::fill(k)).map_err(StateError::Random)
    }

    /// A key written in place (on the heap, where it stays) by `fill`; wiped if `fill` fails.
    pub(crate) fn fill_with<E>(
        fill: impl FnOnce(&mut [u8; KEY_LEN]) -> Result<(), E>,
    ) -> Result<Dek, E> {
        let mut result = Ok(());
        let key = SecretBox::init_with_mut(|k: &mut [u8; KEY_LEN]| result = fill(k));
        // On error `key` is dropped here, which wipes whatever `fill` wrote.
        result.map(|()| Dek(key))
    }

    /// A key from exactly [`KEY_LEN`] bytes (copied; the caller wipes its own buffer).
    ///
    /// # Errors
    /// [`StateError::KeyLength`] for any other length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Dek, StateError> {
        if bytes.len() != KEY_LEN {
            return Err(StateError::KeyLength {
                expected: KEY_LEN,
                got: bytes.len(),
            });
        }
        Ok(Dek(SecretBox::init_with_mut(|k: &mut [u8; KEY_LEN]| {
            k.copy_from_slice(bytes);
        })))
    }

    /// The key bytes, for [`seal`] / [`open`] or for copying into a protected page.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }
}

// The SecretBox inside wipes the key when the Dek is dropped.
impl ZeroizeOnDrop for Dek {}

/// Seals `plaintext` under `key`, binding it to `aad`. Returns `nonce || ciphertext || tag`.
///
/// # Errors
/// [`StateError::Random`] when no nonce can be drawn, [`StateError::Encrypt`] for inputs beyond
/// the cipher's limit (256 GiB).
pub fn seal(key: &[u8; KEY_LEN], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, StateError> {
    let cipher = XChaCha20Poly1305::new(key.into());
    // Sized once, so the buffer holding plaintext (before it is encrypted in place) never
    // reallocates and leaves a copy behind.
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    out.resize(NONCE_LEN, 0);
    getrandom::fill(&mut out[..NONCE_LEN]).map_err(StateError::Random)?;
    out.extend_from_slice(plaintext);
    let (nonce, body) = out.split_at_mut(NONCE_LEN);
    let nonce = XNonce::try_from(&*nonce).map_err(|_| StateError::Encrypt)?;
    match cipher.encrypt_inout_detached(&nonce, aad, body.into()) {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            Ok(out)
        }
        Err(_) => {
            out.zeroize();
            Err(StateError::Encrypt)
        }
    }
}

/// Opens a blob made by [`seal`] with the same `key` and `aad`. The plaintext buffer is
/// allocated once with its exact size (it never reallocates) and is wiped when dropped.
///
/// # Errors
/// [`StateError::Decrypt`] when the blob is too short, the key or AAD differ, or any bit was
/// changed. The error says nothing more (coarse on purpose).
pub fn open(
    key: &[u8; KEY_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, StateError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(StateError::Decrypt);
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce = XNonce::try_from(nonce).map_err(|_| StateError::Decrypt)?;
    let tag = chacha20poly1305::Tag::try_from(tag).map_err(|_| StateError::Decrypt)?;
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut buf = Zeroizing::new(Vec::with_capacity(ciphertext.len()));
    buf.extend_from_slice(ciphertext);
    // The tag is verified before anything is decrypted; on failure `buf` (still ciphertext) is
    // wiped on drop anyway.
    cipher
        .decrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into(), &tag)
        .map_err(|_| StateError::Decrypt)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip() {
        let dek = Dek::generate().unwrap();
        let sealed = seal(dek.expose(), b"ctx", b"hello").unwrap();
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        let opened = open(dek.expose(), b"ctx", &sealed).unwrap();
        assert_eq!(&opened[..], b"hello");
        assert_eq!(opened.capacity(), 5, "exact capacity: never reallocated");
        // Fresh nonce each time.
        assert_ne!(seal(dek.expose(), b"ctx", b"hello").unwrap(), sealed);
        // Empty plaintext is fine at this level.
        let e = seal(dek.expose(), b"", b"").unwrap();
        assert!(open(dek.expose(), b"", &e).unwrap().is_empty());
    }

    #[test]
    fn open_fails_on_wrong_key_aad_or_any_flipped_bit() {
        let dek = Dek::generate().unwrap();
        let other = Dek::generate().unwrap();
        let sealed = seal(dek.expose(), b"ctx", b"secret bytes").unwrap();
        assert!(matches!(
            open(other.expose(), b"ctx", &sealed),
            Err(StateError::Decrypt)
        ));
        assert!(matches!(
            open(dek.expose(), b"ctx2", &sealed),
            Err(StateError::Decrypt)
        ));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                open(dek.expose(), b"ctx", &bad).is_err(),
                "bit flip at {i} opened"
            );
        }
        assert!(open(dek.expose(), b"ctx", &sealed[..SEAL_OVERHEAD - 1]).is_err());
        assert!(open(dek.expose(), b"ctx", &sealed[..sealed.len() - 1]).is_err());
    }

    #[test]
    fn dek_from_bytes_checks_length() {
        assert!(matches!(
            Dek::from_bytes(&[0u8; 31]),
            Err(StateError::KeyLength { got: 31, .. })
        ));
        let k = Dek::from_bytes(&[7u8; 32]).unwrap();
        assert_eq!(k.expose(), &[7u8; 32]);
        let a = Dek::generate().unwrap();
        let b = Dek::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn dek_is_zeroize_on_drop() {
        fn assert_zod<T: ZeroizeOnDrop>() {}
        assert_zod::<Dek>();
    }
}
