//! Session tokens and their hashes.
//!
//! A token is `akt_` followed by 43 base64url characters (32 random bytes, no padding): 256 bits,
//! so an unsalted SHA-256 is enough to store it. The daemon keeps only [`TokenHash`]es for agents
//! and compares them in constant time.
//!
//! Neither type implements `Debug`, `Display` or `Serialize`, so a token cannot reach a log or a
//! message by accident:
//!
//! ```compile_fail
//! let t = agentkeys_state::token::SessionToken::generate().unwrap();
//! println!("{:?}", t);
//! ```
//! ```compile_fail
//! let t = agentkeys_state::token::SessionToken::generate().unwrap();
//! println!("{}", t);
//! ```
//! ```compile_fail
//! let h = agentkeys_state::token::SessionToken::generate().unwrap().hash();
//! println!("{:?}", h);
//! ```

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::StateError;

/// Every token starts with this, so a leaked one is recognisable (secret scanners) and a
/// wrong value is caught before it is hashed.
pub const TOKEN_PREFIX: &str = "akt_";
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// base64url, no padding, of [`TOKEN_BYTES`].
const TOKEN_B64_LEN: usize = 43;
/// Characters in a whole token.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + TOKEN_B64_LEN;

/// A session token (owner or agent). Wraps [`secrecy::SecretString`]: wiped on drop, readable
/// only through [`SessionToken::expose`].
pub struct SessionToken(SecretString);

impl SessionToken {
    /// A new random token.
    ///
    /// # Errors
    /// [`StateError::Random`] when the kernel cannot supply random bytes.
    pub fn generate() -> Result<SessionToken, StateError> {
        let mut raw = Zeroizing::new([0u8; TOKEN_BYTES]);
        getrandom::fill(&mut raw[..]).map_err(StateError::Random)?;
        let mut b64 = Zeroizing::new([0u8; TOKEN_B64_LEN]);
        let n = URL_SAFE_NO_PAD
            .encode_slice(&raw[..], &mut b64[..])
            .map_err(|_| StateError::Encrypt)?;
        debug_assert_eq!(n, TOKEN_B64_LEN);
        // Exact capacity: the String is never reallocated and becomes the Box<str> inside the
        // SecretString without a copy.
        let mut s = String::with_capacity(TOKEN_LEN);
        s.push_str(TOKEN_PREFIX);
        s.push_str(std::str::from_utf8(&b64[..]).map_err(|_| StateError::Encrypt)?);
        Ok(SessionToken(SecretString::from(s)))
    }

    /// Takes a token from outside (environment, token file, sealed file) after checking its
    /// shape: prefix, length, base64url alphabet, canonical encoding. Surrounding whitespace is
    /// an error, not silently trimmed, so callers strip a token file's newline explicitly.
    ///
    /// # Errors
    /// [`StateError::InvalidToken`] naming the part of the shape that is wrong, never the token.
    pub fn from_secret(s: SecretString) -> Result<SessionToken, StateError> {
        check_shape(s.expose_secret())?;
        Ok(SessionToken(s))
    }

    /// The token text, for sending it to the daemon or showing it once.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// SHA-256 of the token's bytes.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.expose().as_bytes()).into())
    }

    /// The inner secret (for tests that prove the wrapping).
    #[cfg(test)]
    fn inner(&self) -> &SecretString {
        &self.0
    }
}

// The SecretString inside wipes the token when it is dropped.
impl ZeroizeOnDrop for SessionToken {}

fn check_shape(t: &str) -> Result<(), StateError> {
    let bad = |detail| Err(StateError::InvalidToken { detail });
    if t.trim() != t {
        return bad("it has leading or trailing whitespace (strip the newline of a token file)");
    }
    let Some(body) = t.strip_prefix(TOKEN_PREFIX) else {
        return bad("it does not start with `akt_`");
    };
    if body.len() != TOKEN_B64_LEN {
        return bad("wrong length: a token is `akt_` and 43 characters");
    }
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad("characters outside base64url (A-Z a-z 0-9 - _)");
    }
    // The last character carries 2 padding bits that must be zero; decoding checks it.
    let mut raw = Zeroizing::new([0u8; TOKEN_BYTES + 2]);
    match URL_SAFE_NO_PAD.decode_slice(body, &mut raw[..]) {
        Ok(TOKEN_BYTES) => Ok(()),
        _ => bad("not a canonical base64url encoding of 32 bytes"),
    }
}

/// SHA-256 of a session token. What the agent registry keeps instead of the token; written only
/// inside sealed files. No `Debug`, `Display` or `Serialize`; compare with [`TokenHash::ct_eq`].
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Constant-time equality.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }

    /// The id of the session this token opens: `s-` and 12 hex digits of SHA-256 over a fixed
    /// label and this hash. It names one exact session in audit records, `agentkeys grants` and
    /// `agentkeys pending` (an agent added again under the same name gets a new one). It is a
    /// one-way function of the hash, which is one of a token of 256 random bits, so it may be
    /// shown: it helps find neither. Only the daemon's own comparisons decide who a session is,
    /// and they use the whole hash.
    pub fn session_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"agentkeys session id v1\0");
        h.update(self.0);
        let d = h.finalize();
        let mut s = String::with_capacity(14);
        s.push_str("s-");
        for b in &d[..6] {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        s
    }

    /// Lowercase hex, for the sealed registry only.
    pub(crate) fn to_hex(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(64));
        for b in self.0 {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        s
    }

    /// Parses [`TokenHash::to_hex`] output. `None` unless exactly 64 lowercase hex digits.
    pub(crate) fn from_hex(s: &str) -> Option<TokenHash> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
        }
        Some(TokenHash(out))
    }

    /// The raw digest, for tests that look for it in files.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl ConstantTimeEq for TokenHash {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::marker::PhantomData;

    // Autoref specialisation: on a `&&Probe<T>` receiver, the `&Probe` impl (needing
    // `T: Debug`) matches before auto-deref reaches the fallback `Probe` impl; decided at
    // compile time for concrete `T`.
    struct Probe<T>(PhantomData<T>);
    trait HasDebug {
        fn debug_impl(&self) -> bool {
            true
        }
    }
    impl<T: std::fmt::Debug> HasDebug for &Probe<T> {}
    trait NoDebug {
        fn debug_impl(&self) -> bool {
            false
        }
    }
    impl<T> NoDebug for Probe<T> {}
    trait HasDisplay {
        fn display_impl(&self) -> bool {
            true
        }
    }
    impl<T: std::fmt::Display> HasDisplay for &Probe<T> {}
    trait NoDisplay {
        fn display_impl(&self) -> bool {
            false
        }
    }
    impl<T> NoDisplay for Probe<T> {}

    #[test]
    #[allow(
        clippy::needless_borrow,
        reason = "the double borrow is the specialisation probe"
    )]
    fn session_token_is_secret_string() {
        // Type level: the inner value is a secrecy::SecretString, read through expose_secret.
        fn inner_is_secret_string(t: &SessionToken) -> &str {
            let s: &SecretString = t.inner();
            s.expose_secret()
        }
        let t = SessionToken::generate().unwrap();
        assert_eq!(inner_is_secret_string(&t), t.expose());

        // No Debug / Display on the token or its hash (the probe proves the probe works, too).
        assert!((&&Probe::<String>(PhantomData)).debug_impl());
        assert!((&&Probe::<String>(PhantomData)).display_impl());
        assert!(!(&&Probe::<Vec<u8>>(PhantomData)).display_impl());
        assert!(!(&&Probe::<SessionToken>(PhantomData)).debug_impl());
        assert!(!(&&Probe::<SessionToken>(PhantomData)).display_impl());
        assert!(!(&&Probe::<TokenHash>(PhantomData)).debug_impl());
        assert!(!(&&Probe::<TokenHash>(PhantomData)).display_impl());

        // Wiped on drop.
        fn assert_zod<T: ZeroizeOnDrop>() {}
        assert_zod::<SessionToken>();
        assert_zod::<SecretString>();
        assert_zod::<TokenHash>();
    }

    #[test]
    fn generated_tokens_have_the_documented_shape() {
        let t = SessionToken::generate().unwrap();
        assert_eq!(t.expose().len(), TOKEN_LEN);
        assert!(t.expose().starts_with("akt_"));
        check_shape(t.expose()).unwrap();
        assert_ne!(t.expose(), SessionToken::generate().unwrap().expose());
        let again = SessionToken::from_secret(SecretString::from(t.expose())).unwrap();
        assert!(again.hash().ct_eq(&t.hash()));
    }

    #[test]
    fn from_secret_rejects_bad_shapes_without_echoing() {
        let good = SessionToken::generate().unwrap().expose().to_owned();
        let body = &good[4..];
        let cases = [
            format!("{good}\n"),
            format!("akx_{body}"),
            format!("akt_{}", &body[1..]),
            format!("akt_{}=", &body[1..]),
            format!("akt_{}!", &body[1..]),
            // 'B' sets a padding bit in the last character: not canonical.
            format!("akt_{}B", &body[..42]),
            String::new(),
        ];
        for c in cases {
            let err = SessionToken::from_secret(SecretString::from(c.clone()))
                .err()
                .expect("accepted a malformed token");
            let msg = err.to_string();
            assert!(matches!(err, StateError::InvalidToken { .. }));
            if c.len() > 8 {
                assert!(!msg.contains(&c[4..12]), "error echoes the token: {msg}");
            }
        }
    }

    #[test]
    fn hash_hex_round_trip_and_ct_eq() {
        let t = SessionToken::generate().unwrap();
        let h = t.hash();
        let hex = h.to_hex();
        assert_eq!(hex.len(), 64);
        let back = TokenHash::from_hex(&hex).unwrap();
        assert!(back.ct_eq(&h));
        assert!(!SessionToken::generate().unwrap().hash().ct_eq(&h));
        assert!(TokenHash::from_hex(&hex[..63]).is_none());
        assert!(
            TokenHash::from_hex(&hex.to_uppercase()).is_none()
                || hex.chars().all(|c| c.is_ascii_digit())
        );
        // Known answer: SHA-256 of the token bytes.
        let expect: [u8; 32] = Sha256::digest(t.expose().as_bytes()).into();
        assert_eq!(h.bytes(), &expect);
    }

    #[test]
    fn session_ids_are_stable_distinct_and_not_the_hash() {
        let t = SessionToken::generate().unwrap();
        let id = t.hash().session_id();
        assert_eq!(id, t.hash().session_id(), "stable");
        assert!(id.starts_with("s-") && id.len() == 14, "{id}");
        assert!(id[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        let other = SessionToken::generate().unwrap().hash().session_id();
        assert_ne!(id, other);
        // Not a piece of the hash's hex, nor of the token.
        assert!(!t.hash().to_hex().contains(&id[2..]));
        assert!(!t.expose().contains(&id[2..]));
    }
}
