//! Packed secret pages: many small secrets sharing `memfd_secret` pages, pkey-protected.
//!
//! One [`SecretPage`](crate::page::SecretPage) per cached secret costs a whole page of locked
//! memory (and an fd): 10,000 cached 40-byte tokens would need 40 MiB, five times the usual
//! 8 MiB `RLIMIT_MEMLOCK`. A [`SecretSlab`] cuts pages into fixed slots (64 to 2048 bytes, one
//! size class per page) and hands out a [`SlabSecret`] per slot: the same 10,000 tokens fit in
//! 157 pages (628 KiB).
//!
//! What each slot keeps from a secret page: the memory is `memfd_secret` (out of the direct
//! map; the degraded mlocked memfd where the kernel lacks it and the policy allows), excluded
//! from forked children (`MADV_DONTFORK`), and tagged with the process protection key, so no
//! thread reads or writes it outside [`SlabSecret::with`] (read window) or the store and wipe
//! (write window, on the calling thread only). A slot is wiped (`explicit_bzero`) when its
//! secret is dropped; a page is wiped and unmapped when its last secret goes.
//!
//! What it gives up: secrets on one page share its fate (a read window opens the key for every
//! pkey-protected page on that thread, which is already true of [`ProtectedPage`]s), and a slab
//! page is mapped read-write (the key's write-disable bit, set in read windows and outside any
//! window, is what stops writes). The slab needs pkeys: without them callers keep one read-only
//! page per secret.
//!
//! [`ProtectedPage`]: crate::pkey::ProtectedPage

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, Weak};

use crate::errno::cerr;
use crate::page::{Backing, Mapping, PageError, PagePolicy, page_size};
use crate::pkey::{Pkey, PkeyError, Window};

/// Slot sizes, one class per page; a secret takes the smallest slot that holds it.
pub const SLOT_SIZES: [usize; 6] = [64, 128, 256, 512, 1024, 2048];
/// Largest secret a slab holds; larger ones get a page of their own.
pub const MAX_SLAB_SECRET: usize = 2048;

/// One page of slots.
struct SlabPage {
    map: Mapping,
    key: &'static Pkey,
    backing: Backing,
    slot: usize,
    /// Free slot indices (wiped).
    free: Mutex<Vec<usize>>,
}

impl SlabPage {
    fn new(slot: usize, policy: PagePolicy, key: &'static Pkey) -> Result<SlabPage, PageError> {
        let ps = page_size();
        let (fd, backing) = crate::page::new_backing(policy)?;
        let size = libc::off_t::try_from(ps).map_err(|_| PageError::Empty)?;
        nix::unistd::ftruncate(&fd, size)
            .map_err(|e| PageError::os("ftruncate")(std::io::Error::from(e)))?;
        let mut map = Mapping::new(fd.as_fd(), ps, libc::PROT_READ | libc::PROT_WRITE)
            .map_err(PageError::os("mmap"))?;
        // The mapping keeps the file alive; the fd is not needed (nobody else gets this memory).
        drop(fd);
        map.wipe_on_drop = true;
        if backing == Backing::SealedMemfd {
            map.mlock().map_err(PageError::os("mlock"))?;
            map.madvise(libc::MADV_DONTDUMP)
                .map_err(PageError::os("madvise(MADV_DONTDUMP)"))?;
        }
        let (ptr, len) = map.raw();
        // SAFETY: (ptr, len) is exactly our own fresh mapping, which no Rust reference points
        // into yet; only the key changes (the protection stays read-write).
        cerr(unsafe {
            libc::syscall(
                libc::SYS_pkey_mprotect,
                ptr as libc::c_ulong,
                len as libc::c_ulong,
                (libc::PROT_READ | libc::PROT_WRITE) as libc::c_ulong,
                key.number() as libc::c_ulong,
            )
        })
        .map_err(PageError::os("pkey_mprotect"))?;
        // Highest index last, so slots are handed out from the start of the page.
        let free = (0..ps / slot).rev().collect();
        Ok(SlabPage {
            map,
            key,
            backing,
            slot,
            free: Mutex::new(free),
        })
    }

    /// Start of slot `i`.
    fn slot_ptr(&self, i: usize) -> *mut u8 {
        let (ptr, len) = self.map.raw();
        debug_assert!((i + 1) * self.slot <= len);
        // SAFETY: i < len / slot (indices come only from `free`, built from that range), so the
        // offset stays inside our mapping.
        unsafe { ptr.add(i * self.slot) }
    }
}

impl Drop for SlabPage {
    fn drop(&mut self) {
        // Fields drop after this body, when a window opened here is closed again: so wipe the
        // whole page here, inside a write window, and tell the mapping not to wipe again.
        let _w = Window::open(self.key, true);
        let (ptr, len) = self.map.raw();
        // SAFETY: our own live, read-write mapping of `len` bytes; no SlabSecret (and so no
        // borrow) refers to it any more (each holds an Arc of this page).
        unsafe { libc::explicit_bzero(ptr.cast(), len) };
        // Already wiped; the mapping's own wipe would fault outside the window. (The munmap
        // needs no access rights.)
        self.map.wipe_on_drop = false;
    }
}

/// A store of small secrets packed into shared pkey-protected secret pages.
pub struct SecretSlab {
    key: &'static Pkey,
    policy: PagePolicy,
    /// Pages per size class. Weak: a page lives exactly as long as one of its secrets.
    classes: Mutex<Vec<Vec<Weak<SlabPage>>>>,
}

impl SecretSlab {
    /// A slab whose pages follow `policy` (memfd_secret, or the degraded fallback).
    ///
    /// # Errors
    /// [`PkeyError::Unsupported`] without protection keys: callers keep one page per secret.
    pub fn new(policy: PagePolicy) -> Result<SecretSlab, PkeyError> {
        Ok(SecretSlab {
            key: Pkey::get()?,
            policy,
            classes: Mutex::new(vec![Vec::new(); SLOT_SIZES.len()]),
        })
    }

    /// Copies `bytes` into a free slot (a new page when every page of its class is full).
    ///
    /// # Errors
    /// [`PageError::Empty`]; [`PageError::TooLarge`] over [`MAX_SLAB_SECRET`]; a new page
    /// could not be made ([`PageError::Os`], e.g. `mmap` at the memlock limit, or
    /// [`PageError::SecretMemRequired`]).
    pub fn store(&self, bytes: &[u8]) -> Result<SlabSecret, PageError> {
        if bytes.is_empty() {
            return Err(PageError::Empty);
        }
        let Some(class) = SLOT_SIZES.iter().position(|&s| s >= bytes.len()) else {
            return Err(PageError::TooLarge {
                len: bytes.len(),
                max: MAX_SLAB_SECRET,
            });
        };
        let (page, slot) = {
            let mut classes = self.classes.lock().expect("slab lock");
            let pages = &mut classes[class];
            pages.retain(|w| w.strong_count() > 0);
            let found = pages.iter().filter_map(Weak::upgrade).find_map(|p| {
                let slot = p.free.lock().expect("slab page lock").pop();
                slot.map(|s| (p, s))
            });
            match found {
                Some(f) => f,
                None => {
                    let p = Arc::new(SlabPage::new(SLOT_SIZES[class], self.policy, self.key)?);
                    pages.push(Arc::downgrade(&p));
                    let s = p
                        .free
                        .lock()
                        .expect("slab page lock")
                        .pop()
                        .ok_or(PageError::Empty)?;
                    (p, s)
                }
            }
        };
        {
            let _w = Window::open(self.key, true);
            // SAFETY: the slot is ours alone (just taken from the free list), `slot` bytes long
            // and inside the live mapping; `bytes` is a separate Rust slice no longer than the
            // slot; this thread's write window for the key is open.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), page.slot_ptr(slot), bytes.len());
            }
        }
        Ok(SlabSecret {
            page,
            slot,
            len: bytes.len(),
        })
    }

    /// Pages currently mapped (for tests and the self-test).
    pub fn pages(&self) -> usize {
        self.classes
            .lock()
            .expect("slab lock")
            .iter()
            .flatten()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// One secret in a slab slot. No `Debug`, no `Deref`: read it inside [`SlabSecret::with`].
pub struct SlabSecret {
    page: Arc<SlabPage>,
    slot: usize,
    len: usize,
}

impl SlabSecret {
    /// Runs `f` with read access to the secret on this thread only (see
    /// [`ProtectedPage::with_access`](crate::pkey::ProtectedPage::with_access)).
    pub fn with<R>(&self, f: impl for<'a> FnOnce(&'a [u8]) -> R) -> R {
        let _w = Window::open(self.page.key, false);
        // SAFETY: the slot is inside the live mapping (the Arc keeps the page), holds `len`
        // initialised bytes, and is written only by `store` (before this secret existed) and
        // by our own drop (which cannot run while `&self` is borrowed); the read window is open
        // on this thread for the closure's whole run and the slice cannot escape it.
        let s = unsafe { std::slice::from_raw_parts(self.page.slot_ptr(self.slot), self.len) };
        f(s)
    }

    /// What backs the page.
    pub fn backing(&self) -> Backing {
        self.page.backing
    }

    /// Length of the secret.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a slab secret holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Reads the first byte WITHOUT opening the access window: on a CPU with pkeys this faults
    /// (SIGSEGV, SEGV_PKUERR). Exists only for tests that prove it.
    #[cfg(any(test, feature = "fault-probe"))]
    pub fn read_outside_window(&self) -> u8 {
        // SAFETY: the slot is mapped readable for the page's whole life; only the protection
        // key denies access, which turns this read into a fault, not UB.
        unsafe { std::ptr::read_volatile(self.page.slot_ptr(self.slot)) }
    }
}

impl Drop for SlabSecret {
    fn drop(&mut self) {
        {
            let _w = Window::open(self.page.key, true);
            // SAFETY: our own slot (nobody else holds its index), inside the live mapping,
            // `slot` bytes; the write window is open on this thread. explicit_bzero is not
            // elided.
            unsafe { libc::explicit_bzero(self.page.slot_ptr(self.slot).cast(), self.page.slot) };
        }
        self.page
            .free
            .lock()
            .expect("slab page lock")
            .push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{have_memfd_secret, in_child};
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;

    fn have_pkeys(test: &str) -> bool {
        match crate::pkey::supported() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("SKIP {test}: {e}");
                false
            }
        }
    }

    /// Stored secrets read back exactly, several per page, each class in its own pages; a
    /// freed slot is reused and comes back wiped; pages go when their last secret does.
    #[test]
    fn slab_packs_reads_back_and_frees() {
        if !have_pkeys("slab_packs_reads_back_and_frees") || !have_memfd_secret("slab") {
            return;
        }
        let st = in_child(|| {
            let slab = SecretSlab::new(PagePolicy::RequireSecret).unwrap();
            let secrets: Vec<Vec<u8>> = (0..200u32)
                .map(|i| format!("tok-{i:04}-{}", "x".repeat((i % 50) as usize)).into_bytes())
                .collect();
            let stored: Vec<SlabSecret> = secrets.iter().map(|s| slab.store(s).unwrap()).collect();
            let ok = stored
                .iter()
                .zip(&secrets)
                .all(|(st, s)| st.with(|b| b == &s[..]) && st.backing() == Backing::MemfdSecret);
            // 200 secrets of 9..58 bytes (64-byte slots, 64 per page): 4 pages, not 200.
            let pages = slab.pages();
            if !ok || pages != 4 {
                return 1;
            }
            // Free one, store a shorter one: same slot, and its tail was wiped.
            let (page, slot) = (stored[5].page.clone(), stored[5].slot);
            let mut stored = stored;
            drop(stored.remove(5));
            let again = slab.store(b"ab").unwrap();
            if !Arc::ptr_eq(&again.page, &page) || again.slot != slot {
                return 2;
            }
            let tail_clean = {
                let _w = Window::open(page.key, false);
                // SAFETY: test read of a slot inside the read window; 64 bytes of the page.
                let full = unsafe { std::slice::from_raw_parts(page.slot_ptr(slot), 64) };
                full[..2] == *b"ab" && full[2..].iter().all(|&b| b == 0)
            };
            if !tail_clean {
                return 3;
            }
            drop(page);
            drop(again);
            drop(stored);
            if slab.pages() != 0 {
                return 4;
            }
            0
        });
        assert!(matches!(st, WaitStatus::Exited(_, 0)), "child: {st:?}");
    }

    #[test]
    fn slab_refuses_empty_and_large() {
        if !have_pkeys("slab_refuses_empty_and_large") {
            return;
        }
        let st = in_child(|| {
            let slab = SecretSlab::new(PagePolicy::PreferSecret).unwrap();
            let empty = matches!(slab.store(b""), Err(PageError::Empty));
            let large = matches!(
                slab.store(&[1u8; MAX_SLAB_SECRET + 1]),
                Err(PageError::TooLarge { .. })
            );
            let max = slab
                .store(&[7u8; MAX_SLAB_SECRET])
                .unwrap()
                .with(|b| b.len() == MAX_SLAB_SECRET && b.iter().all(|&x| x == 7));
            if empty && large && max { 0 } else { 1 }
        });
        assert!(matches!(st, WaitStatus::Exited(_, 0)), "child: {st:?}");
    }

    /// Reading a slab secret outside its window faults.
    #[test]
    fn slab_secrets_fault_outside_the_window() {
        if !have_pkeys("slab_secrets_fault_outside_the_window") {
            return;
        }
        let st = in_child(|| {
            let slab = SecretSlab::new(PagePolicy::PreferSecret).unwrap();
            let s = slab.store(b"ak-canary-slab-77").unwrap();
            let _ = s.with(|b| b[0]);
            i32::from(s.read_outside_window()) + 10
        });
        assert!(
            matches!(st, WaitStatus::Signaled(_, Signal::SIGSEGV, _)),
            "expected SIGSEGV, child: {st:?}"
        );
    }

    /// 10,000 small secrets fit far below an 8 MiB memlock limit (one page each would not).
    #[test]
    fn ten_thousand_small_secrets_fit_in_8_mib_of_locked_pages() {
        if !have_pkeys("ten_thousand_small_secrets") || !have_memfd_secret("slab 10k") {
            return;
        }
        let st = in_child(|| {
            let limit = 8 * 1024 * 1024;
            if nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_MEMLOCK,
                limit,
                limit,
            )
            .is_err()
            {
                return 2;
            }
            let slab = SecretSlab::new(PagePolicy::RequireSecret).unwrap();
            let all: Result<Vec<SlabSecret>, _> = (0..10_000u32)
                .map(|i| slab.store(format!("ghp_{i:036}").as_bytes()))
                .collect();
            match all {
                Ok(v) if v.len() == 10_000 && slab.pages() == 157 => 0,
                _ => 1,
            }
        });
        assert!(matches!(st, WaitStatus::Exited(_, 0)), "child: {st:?}");
    }
}
