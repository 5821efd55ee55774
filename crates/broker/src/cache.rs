//! Cached credentials: only for services stored with a `cache_ttl`. Each lives in guarded
//! secret memory (a slot of a shared pkey-protected secret page when small, see
//! [`crate::keys`]); a use within the TTL copies it into a fresh delivery page (inside the pkey
//! window) instead of fetching again; dropping an entry wipes its memory. An entry is wiped and evicted after `idle_ttl` without use,
//! after its `cache_ttl`, when the vault changes, and at shutdown.
//!
//! Every [`Cache::clear`] starts a new *generation*. A request takes the generation before it
//! resolves the service, and its insert is refused if the cache was cleared since: a value read
//! from a vault that changed meanwhile (replaced or deleted by the owner) never enters the cache
//! after the change emptied it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentkeys_hardening::page::{PageError, PagePolicy, SecretPage};

use crate::keys::GuardedPage;

struct Entry {
    page: GuardedPage,
    fetched: Instant,
    last_used: Instant,
    ttl: Duration,
}

/// Why an entry left the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EvictReason {
    /// Not used for `idle_ttl`.
    Idle,
    /// Older than its `cache_ttl`.
    Expired,
    /// The vault changed (the value may have been replaced or deleted).
    VaultChanged,
    /// The daemon is stopping.
    Shutdown,
}

impl EvictReason {
    /// The word used in the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::Idle => "idle",
            EvictReason::Expired => "cache_ttl",
            EvictReason::VaultChanged => "vault changed",
            EvictReason::Shutdown => "shutdown",
        }
    }
}

/// The cache.
#[derive(Default)]
pub struct Cache {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<String, Entry>,
    /// Bumped by every [`Cache::clear`].
    generation: u64,
}

impl Cache {
    /// A delivery copy of a live entry, refreshing its idle timer; `None` on a miss.
    ///
    /// # Errors
    /// [`PageError`] if the copy's page cannot be made.
    pub fn copy(&self, service: &str, policy: PagePolicy) -> Result<Option<SecretPage>, PageError> {
        let mut entries = self.entries.lock().expect("cache lock");
        let Some(e) = entries.map.get_mut(service) else {
            return Ok(None);
        };
        if e.fetched.elapsed() >= e.ttl {
            // Expired entries are swept by the timer; never serve one.
            return Ok(None);
        }
        e.last_used = Instant::now();
        e.page.copy_out(policy).map(Some)
    }

    /// The current generation: take it before resolving a service whose value may be cached.
    pub fn generation(&self) -> u64 {
        self.entries.lock().expect("cache lock").generation
    }

    /// Keeps a copy of a secret fetched during `generation` for `ttl`; returns whether it was
    /// kept. Refused (the page wiped) when the cache was cleared since: the value may be one
    /// the owner replaced or deleted.
    pub fn insert(&self, service: &str, page: GuardedPage, ttl: Duration, generation: u64) -> bool {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.generation != generation {
            return false; // `page` is wiped when it drops
        }
        let old = entries.map.insert(
            service.to_string(),
            Entry {
                page,
                fetched: now,
                last_used: now,
                ttl,
            },
        );
        drop(entries);
        drop(old); // a replaced entry is wiped here
        true
    }

    /// Wipes and removes entries idle for `idle_ttl` or older than their TTL; returns them.
    pub fn sweep(&self, idle_ttl: Duration) -> Vec<(String, EvictReason)> {
        let mut entries = self.entries.lock().expect("cache lock");
        let mut gone = Vec::new();
        entries.map.retain(|name, e| {
            let reason = if e.fetched.elapsed() >= e.ttl {
                Some(EvictReason::Expired)
            } else if e.last_used.elapsed() >= idle_ttl {
                Some(EvictReason::Idle)
            } else {
                None
            };
            if let Some(r) = reason {
                gone.push((name.clone(), r));
            }
            reason.is_none()
        });
        gone
    }

    /// Wipes everything (vault changed, shutdown) and starts a new generation; returns what
    /// was there.
    pub fn clear(&self, reason: EvictReason) -> Vec<(String, EvictReason)> {
        let mut entries = self.entries.lock().expect("cache lock");
        entries.generation += 1;
        let gone = entries.map.keys().map(|k| (k.clone(), reason)).collect();
        entries.map.clear();
        gone
    }

    /// Number of cached secrets.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("cache lock").map.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the entry for `service` is guarded by a protection key.
    pub fn is_pkey_protected(&self, service: &str) -> Option<bool> {
        self.entries
            .lock()
            .expect("cache lock")
            .map
            .get(service)
            .map(|e| e.page.describe().1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guarded(b: &[u8]) -> GuardedPage {
        GuardedPage::new(b, PagePolicy::PreferSecret).unwrap()
    }

    #[test]
    fn hit_copies_and_miss_is_none() {
        let c = Cache::default();
        assert!(c.copy("gh", PagePolicy::PreferSecret).unwrap().is_none());
        c.insert("gh", guarded(b"tok"), Duration::from_secs(60), 0);
        let copy = c.copy("gh", PagePolicy::PreferSecret).unwrap().unwrap();
        assert_eq!(&*copy, b"tok");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn idle_and_ttl_eviction() {
        let c = Cache::default();
        c.insert("idle", guarded(b"a"), Duration::from_secs(60), 0);
        c.insert("old", guarded(b"b"), Duration::from_millis(0), 0);
        // An expired entry is never served, even before the sweep.
        assert!(c.copy("old", PagePolicy::PreferSecret).unwrap().is_none());
        let mut gone = c.sweep(Duration::from_secs(3600));
        gone.sort();
        assert_eq!(gone, vec![("old".to_string(), EvictReason::Expired)]);
        let gone = c.sweep(Duration::ZERO);
        assert_eq!(gone, vec![("idle".to_string(), EvictReason::Idle)]);
        assert!(c.is_empty());
    }

    /// `pkey_protected_pages`: a cached page faults when read outside its access window. The
    /// faulting read runs in a child process (this test binary, re-run on the ignored test
    /// below), which must die of SIGSEGV.
    #[test]
    fn pkey_protected_pages() {
        if let Err(e) = agentkeys_hardening::pkey::supported() {
            eprintln!("SKIP pkey_protected_pages: {e}");
            return;
        }
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cache::tests::pkey_fault_child",
                "--ignored",
                "--test-threads=1",
            ])
            .env("AK_PKEY_FAULT_CHILD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(
            status.signal(),
            Some(11),
            "expected SIGSEGV, child ended with {status:?}"
        );
    }

    #[test]
    #[ignore = "run by pkey_protected_pages in a child process; it must die"]
    fn pkey_fault_child() {
        assert_eq!(
            std::env::var("AK_PKEY_FAULT_CHILD").as_deref(),
            Ok("1"),
            "run only as a child"
        );
        agentkeys_hardening::process::set_core_limit_zero().unwrap();
        let c = Cache::default();
        c.insert("gh", guarded(b"tok"), Duration::from_secs(60), 0);
        // Inside the window: fine.
        assert_eq!(
            c.copy("gh", PagePolicy::PreferSecret)
                .unwrap()
                .unwrap()
                .len(),
            3
        );
        let entries = c.entries.lock().unwrap();
        let _ = match &entries.map["gh"].page {
            GuardedPage::Protected(p) => p.read_outside_window(),
            GuardedPage::Slab(s) => s.read_outside_window(),
            GuardedPage::Plain(_) => panic!("cached page is not pkey-protected"),
        };
        // Reaching here means the read did not fault: the parent sees a normal exit and fails.
    }

    #[test]
    fn cached_pages_are_pkey_protected_where_pkeys_exist() {
        let c = Cache::default();
        c.insert("gh", guarded(b"tok"), Duration::from_secs(60), 0);
        let expected = agentkeys_hardening::pkey::supported().is_ok();
        if !expected {
            eprintln!(
                "SKIP (partly) cached_pages_are_pkey_protected_where_pkeys_exist: no pkeys here"
            );
        }
        assert_eq!(c.is_pkey_protected("gh"), Some(expected));
    }

    #[test]
    fn a_value_read_before_a_clear_is_not_cached_after_it() {
        let c = Cache::default();
        // A request takes the generation, then reads the vault; meanwhile another request
        // notices the vault changed and empties the cache.
        let generation = c.generation();
        c.clear(EvictReason::VaultChanged);
        assert!(!c.insert("gh", guarded(b"stale"), Duration::from_secs(60), generation));
        assert!(c.copy("gh", PagePolicy::PreferSecret).unwrap().is_none());
        // A read that started after the clear is cached.
        assert!(c.insert(
            "gh",
            guarded(b"new"),
            Duration::from_secs(60),
            c.generation()
        ));
        assert_eq!(
            &*c.copy("gh", PagePolicy::PreferSecret).unwrap().unwrap(),
            b"new"
        );
    }

    #[test]
    fn clear_wipes_everything() {
        let c = Cache::default();
        c.insert("a", guarded(b"1"), Duration::from_secs(60), 0);
        c.insert("b", guarded(b"2"), Duration::from_secs(60), 0);
        assert_eq!(c.clear(EvictReason::Shutdown).len(), 2);
        assert!(c.is_empty());
    }
}
