//! Secret pages the daemon keeps: the data encryption key, and cached credentials.
//!
//! A [`GuardedPage`] is a secret page tagged with the process protection key where the CPU has
//! pkeys, so no thread can read it outside [`GuardedPage::with`]; elsewhere it is a plain secret
//! page. The DEK is loaded once at start, before the sandbox closes ([`KeyPage`]).

use agentkeys_hardening::page::{Backing, PageError, PagePolicy, SecretPage};
use agentkeys_hardening::pkey::ProtectedPage;
use agentkeys_state::crypto::{Dek, KEY_LEN};

/// A secret page, pkey-protected where possible.
pub enum GuardedPage {
    /// Tagged with the process protection key.
    Protected(ProtectedPage),
    /// No pkeys on this CPU: a plain secret page.
    Plain(SecretPage),
}

impl GuardedPage {
    /// Copies `bytes` into a new secret page and protects it.
    ///
    /// # Errors
    /// [`PageError`] when no secret page can be made (or the fallback is refused).
    pub fn new(bytes: &[u8], policy: PagePolicy) -> Result<GuardedPage, PageError> {
        let page = SecretPage::from_bytes(bytes, policy)?;
        Ok(match ProtectedPage::new(page) {
            Ok(p) => GuardedPage::Protected(p),
            // No pkeys: the page was dropped (wiped); make a plain one.
            Err(_) => GuardedPage::Plain(SecretPage::from_bytes(bytes, policy)?),
        })
    }

    /// Runs `f` with the bytes readable (on this thread only, for pkey-protected pages).
    pub fn with<R>(&self, f: impl for<'a> FnOnce(&'a [u8]) -> R) -> R {
        match self {
            GuardedPage::Protected(p) => p.with_access(f),
            GuardedPage::Plain(p) => f(p),
        }
    }

    /// What backs the page, and whether a pkey guards it.
    pub fn describe(&self) -> (Backing, bool) {
        match self {
            GuardedPage::Protected(p) => (p.backing(), true),
            GuardedPage::Plain(p) => (p.backing(), false),
        }
    }

    /// A fresh secret page holding a copy, for delivery (copied inside the access window).
    ///
    /// # Errors
    /// [`PageError`] when the copy's page cannot be made.
    pub fn copy_out(&self, policy: PagePolicy) -> Result<SecretPage, PageError> {
        self.with(|bytes| SecretPage::from_bytes(bytes, policy))
    }
}

/// The DEK in a guarded secret page.
pub struct KeyPage(GuardedPage);

impl KeyPage {
    /// Copies `dek` into a new guarded page (the caller drops `dek`, which wipes it).
    ///
    /// # Errors
    /// [`PageError`] when no secret page can be made (or the fallback is refused).
    pub fn new(dek: &Dek, policy: PagePolicy) -> Result<KeyPage, PageError> {
        GuardedPage::new(dek.expose(), policy).map(KeyPage)
    }

    /// Runs `f` with the key readable.
    pub fn with_key<R>(&self, f: impl FnOnce(&[u8; KEY_LEN]) -> R) -> R {
        self.0.with(|s| {
            let key: &[u8; KEY_LEN] = s
                .try_into()
                .expect("the key page holds exactly KEY_LEN bytes");
            f(key)
        })
    }

    /// What backs the page, and whether a pkey guards it.
    pub fn describe(&self) -> (Backing, bool) {
        self.0.describe()
    }
}
