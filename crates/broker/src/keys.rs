//! The daemon's data encryption key: loaded once at start, before the sandbox closes, into a
//! secret page that is pkey-protected where the CPU has protection keys. It is only readable
//! inside [`KeyPage::with_key`], on the calling thread, for the duration of one closure.

use agentkeys_hardening::page::{Backing, PageError, PagePolicy, SecretPage};
use agentkeys_hardening::pkey::ProtectedPage;
use agentkeys_state::crypto::{Dek, KEY_LEN};

/// The DEK in a secret page.
pub enum KeyPage {
    /// Tagged with the process protection key.
    Protected(ProtectedPage),
    /// No pkeys on this CPU: a plain secret page.
    Plain(SecretPage),
}

impl KeyPage {
    /// Copies `dek` into a new secret page (the caller drops `dek`, which wipes it).
    ///
    /// # Errors
    /// [`PageError`] when no secret page can be made (or the fallback is refused).
    pub fn new(dek: &Dek, policy: PagePolicy) -> Result<KeyPage, PageError> {
        let page = SecretPage::from_bytes(dek.expose(), policy)?;
        Ok(match ProtectedPage::new(page) {
            Ok(p) => KeyPage::Protected(p),
            // Unsupported pkeys: the page was dropped (wiped); make a plain one.
            Err(_) => KeyPage::Plain(SecretPage::from_bytes(dek.expose(), policy)?),
        })
    }

    /// Runs `f` with the key readable.
    pub fn with_key<R>(&self, f: impl FnOnce(&[u8; KEY_LEN]) -> R) -> R {
        let call = |s: &[u8]| {
            let key: &[u8; KEY_LEN] = s
                .try_into()
                .expect("the key page holds exactly KEY_LEN bytes");
            f(key)
        };
        match self {
            KeyPage::Protected(p) => p.with_access(call),
            KeyPage::Plain(p) => call(p),
        }
    }

    /// What backs the page, and whether a pkey guards it.
    pub fn describe(&self) -> (Backing, bool) {
        match self {
            KeyPage::Protected(p) => (p.backing(), true),
            KeyPage::Plain(p) => (p.backing(), false),
        }
    }
}
