//! Secret pages the daemon keeps: the data encryption key, and cached credentials.
//!
//! A [`GuardedPage`] is secret memory tagged with the process protection key where the CPU has
//! pkeys, so no thread can read it outside [`GuardedPage::with`]; elsewhere it is a plain secret
//! page. Small secrets (up to [`MAX_SLAB_SECRET`] bytes) share pages: a slot in the process's
//! [`SecretSlab`] for their page policy, so thousands of cached secrets fit the memlock limit;
//! larger ones, and every secret where pkeys are missing, get a page each. The DEK is loaded
//! once at start, before the sandbox closes, into a page of its own ([`KeyPage`]).

use std::sync::OnceLock;

use agentkeys_hardening::page::{Backing, PageError, PagePolicy, SecretPage};
use agentkeys_hardening::pkey::ProtectedPage;
use agentkeys_hardening::slab::{MAX_SLAB_SECRET, SecretSlab, SlabSecret};
use agentkeys_state::crypto::{Dek, KEY_LEN};

/// The shared slab for `policy`, or `None` where there are no pkeys (or for the fallback
/// policy, which only delivery copies use).
fn slab(policy: PagePolicy) -> Option<&'static SecretSlab> {
    static PREFER: OnceLock<Option<SecretSlab>> = OnceLock::new();
    static REQUIRE: OnceLock<Option<SecretSlab>> = OnceLock::new();
    let cell = match policy {
        PagePolicy::PreferSecret => &PREFER,
        PagePolicy::RequireSecret => &REQUIRE,
        PagePolicy::ForceFallback => return None,
    };
    cell.get_or_init(|| SecretSlab::new(policy).ok()).as_ref()
}

/// A secret page, pkey-protected where possible.
pub enum GuardedPage {
    /// Tagged with the process protection key.
    Protected(ProtectedPage),
    /// No pkeys on this CPU: a plain secret page.
    Plain(SecretPage),
    /// A slot in a shared, pkey-protected secret page (small secrets).
    Slab(SlabSecret),
}

impl GuardedPage {
    /// Copies `bytes` into protected secret memory: a slab slot when small and pkeys exist,
    /// else a page of its own.
    ///
    /// # Errors
    /// [`PageError`] when no secret memory can be had (or the fallback is refused).
    pub fn new(bytes: &[u8], policy: PagePolicy) -> Result<GuardedPage, PageError> {
        if bytes.len() <= MAX_SLAB_SECRET
            && let Some(slab) = slab(policy)
        {
            return slab.store(bytes).map(GuardedPage::Slab);
        }
        GuardedPage::own_page(bytes, policy)
    }

    /// Copies `bytes` into a secret page of its own, protected where pkeys exist.
    ///
    /// # Errors
    /// [`PageError`] when no secret page can be made (or the fallback is refused).
    pub fn own_page(bytes: &[u8], policy: PagePolicy) -> Result<GuardedPage, PageError> {
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
            GuardedPage::Slab(s) => s.with(f),
        }
    }

    /// What backs the page, and whether a pkey guards it.
    pub fn describe(&self) -> (Backing, bool) {
        match self {
            GuardedPage::Protected(p) => (p.backing(), true),
            GuardedPage::Plain(p) => (p.backing(), false),
            GuardedPage::Slab(s) => (s.backing(), true),
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
        GuardedPage::own_page(dek.expose(), policy).map(KeyPage)
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
