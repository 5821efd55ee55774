//! Memory protection keys (x86 PKU): secret pages no thread may touch outside a closure.
//!
//! A page tagged with our key is inaccessible to every thread whose PKRU register denies the
//! key, which is every thread by default (Linux starts threads with all keys but 0 denied, and
//! a new thread copies its creator's register). [`ProtectedPage::with_access`] opens the key
//! for reading on the calling thread only, runs a synchronous closure, and closes it again: the
//! window cannot span an `.await` (the closure is not async) nor leak to another thread.
//!
//! What this stops: stray reads and writes of cached secrets by bugs or gadgets elsewhere in the
//! process, and any other thread while one thread is inside its window. What it does not stop:
//! code that can execute `WRPKRU` itself (it is unprivileged), i.e. an attacker with arbitrary
//! code execution in the daemon. See docs/threat-model.md.

use std::io;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::sync::OnceLock;

use crate::errno::cerr;
use crate::page::{Backing, SecretPage};

/// PKRU bits per key: access-disable and write-disable.
const PKEY_DISABLE_ACCESS: u32 = 0x1;
const PKEY_DISABLE_WRITE: u32 = 0x2;

/// Errors around protection keys.
#[derive(Debug, thiserror::Error)]
pub enum PkeyError {
    /// The CPU or the kernel lacks protection keys (or all keys are taken).
    #[error("memory protection keys unsupported: {0}")]
    Unsupported(String),
    /// `pkey_mprotect` failed on a page.
    #[error("pkey_mprotect failed: {0}")]
    Mprotect(#[source] io::Error),
}

/// A protection key allocated for this process. Only one is ever allocated (see [`Pkey::get`]);
/// there are 15 in all and it is never freed.
#[derive(Debug)]
pub struct Pkey {
    key: u32,
}

static KEY: OnceLock<Result<Pkey, String>> = OnceLock::new();

/// The test switch that hides protection keys from this process, as if the CPU had none.
pub const HIDE_ENV: &str = "AGENTKEYS_HIDE_PKEYS";

/// Whether [`HIDE_ENV`] was set when [`init_from_env`] ran (or at the first key allocation).
static HIDDEN: OnceLock<bool> = OnceLock::new();

/// Reads the [`HIDE_ENV`] switch (`AGENTKEYS_HIDE_PKEYS=1`) once. Binaries call it first thing
/// in `main`, before their environment is cleaned: with it a host whose CPU has PKU runs the
/// code paths of one without (CI draws hosts of both kinds; the suite must pass on each). It only
/// ever takes a protection away, and every report says so (`pkeys`: missing, "hidden by
/// AGENTKEYS_HIDE_PKEYS"); `[daemon] require_pkeys = true` refuses to start then.
pub fn init_from_env() {
    let _ = HIDDEN.get_or_init(|| std::env::var_os(HIDE_ENV).is_some_and(|v| v == "1"));
}

impl Pkey {
    /// The process-wide key for secret pages, allocated on first use with access denied.
    ///
    /// # Errors
    /// [`PkeyError::Unsupported`] without CPU (PKU/OSPKE) or kernel support.
    pub fn get() -> Result<&'static Pkey, PkeyError> {
        KEY.get_or_init(alloc)
            .as_ref()
            .map_err(|e| PkeyError::Unsupported(e.clone()))
    }

    /// The key number (1..=15).
    pub fn number(&self) -> u32 {
        self.key
    }
}

#[cfg(target_arch = "x86_64")]
fn alloc() -> Result<Pkey, String> {
    init_from_env();
    if HIDDEN.get() == Some(&true) {
        return Err(format!("hidden by {HIDE_ENV}=1 (a test switch)"));
    }
    // CPUID leaf 7: ECX bit 3 is PKU (the CPU has keys), bit 4 OSPKE (the OS enabled them).
    let ecx = std::arch::x86_64::__cpuid_count(7, 0).ecx;
    if ecx & (1 << 3) == 0 {
        return Err("the CPU has no PKU".into());
    }
    if ecx & (1 << 4) == 0 {
        return Err("the kernel did not enable PKU (OSPKE clear)".into());
    }
    // SAFETY: pkey_alloc takes two integers (flags 0, initial rights) and returns a key or -1.
    let k = cerr(unsafe {
        libc::syscall(
            libc::SYS_pkey_alloc,
            0 as libc::c_ulong,
            PKEY_DISABLE_ACCESS as libc::c_ulong,
        )
    })
    .map_err(|e| format!("pkey_alloc: {e}"))?;
    let key = u32::try_from(k).map_err(|_| format!("pkey_alloc returned {k}"))?;
    // OSPKE (the OS enabled PKRU) is implied by a successful pkey_alloc; reading the register
    // confirms it without faulting.
    let _ = rdpkru();
    Ok(Pkey { key })
}

#[cfg(not(target_arch = "x86_64"))]
fn alloc() -> Result<Pkey, String> {
    Err("protection keys are only supported on x86_64".into())
}

/// Probes for protection keys without keeping anything but the (lazily allocated) key.
///
/// # Errors
/// [`PkeyError::Unsupported`] with the reason.
pub fn supported() -> Result<(), PkeyError> {
    Pkey::get().map(drop)
}

#[cfg(target_arch = "x86_64")]
fn rdpkru() -> u32 {
    let pkru: u32;
    // SAFETY: RDPKRU reads this thread's PKRU into eax (ecx must be 0, edx is clobbered); it
    // touches no memory. Only reached after pkey_alloc succeeded, so the OS enabled PKRU.
    unsafe {
        std::arch::asm!("rdpkru", in("ecx") 0u32, out("eax") pkru, out("edx") _,
            options(nomem, nostack, preserves_flags));
    }
    pkru
}

#[cfg(target_arch = "x86_64")]
fn wrpkru(pkru: u32) {
    // SAFETY: WRPKRU sets this thread's PKRU from eax (ecx and edx must be 0). It changes which
    // memory this thread may access, so it is not marked `nomem`: the compiler must not move
    // loads or stores of protected pages across it.
    unsafe {
        std::arch::asm!("wrpkru", in("eax") pkru, in("ecx") 0u32, in("edx") 0u32,
            options(nostack, preserves_flags));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn rdpkru() -> u32 {
    0
}

#[cfg(not(target_arch = "x86_64"))]
fn wrpkru(_pkru: u32) {}

/// An open access window for one key on the current thread; closing restores the old PKRU.
/// Not `Send`: PKRU is per thread, so the guard must close on the thread that opened it.
pub(crate) struct Window {
    saved: u32,
    _not_send: PhantomData<*const ()>,
}

impl Window {
    pub(crate) fn open(key: &Pkey, write: bool) -> Window {
        let saved = rdpkru();
        let shift = 2 * key.key;
        let mut rights = saved & !((PKEY_DISABLE_ACCESS | PKEY_DISABLE_WRITE) << shift);
        if !write {
            rights |= PKEY_DISABLE_WRITE << shift;
        }
        wrpkru(rights);
        Window {
            saved,
            _not_send: PhantomData,
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        wrpkru(self.saved);
    }
}

/// A [`SecretPage`] tagged with the process's protection key: no thread can read it except
/// inside [`ProtectedPage::with_access`]. There is no `Deref` and no `Debug` on purpose.
pub struct ProtectedPage {
    page: ManuallyDrop<SecretPage>,
    key: &'static Pkey,
}

impl ProtectedPage {
    /// Tags `page` with the process key (read-only, access denied outside a window).
    ///
    /// # Errors
    /// [`PkeyError::Unsupported`] without pkeys; [`PkeyError::Mprotect`] if tagging fails. On
    /// error the page is dropped (and so wiped).
    pub fn new(page: SecretPage) -> Result<ProtectedPage, PkeyError> {
        let key = Pkey::get()?;
        let (ptr, len) = page.raw_region();
        // SAFETY: (ptr, len) is exactly the page's own live mapping; the protection stays
        // read-only and only the key changes, so existing borrows (there are none: we own
        // `page`) stay valid for reads inside a window.
        cerr(unsafe {
            libc::syscall(
                libc::SYS_pkey_mprotect,
                ptr as libc::c_ulong,
                len as libc::c_ulong,
                libc::PROT_READ as libc::c_ulong,
                key.key as libc::c_ulong,
            )
        })
        .map_err(PkeyError::Mprotect)?;
        Ok(ProtectedPage {
            page: ManuallyDrop::new(page),
            key,
        })
    }

    /// Runs `f` with read access to the secret on this thread only, then closes the window.
    ///
    /// `f` cannot return the slice (the lifetime is higher-ranked) and cannot `.await`. Do not
    /// spawn threads from inside `f`: a new thread copies the open register.
    pub fn with_access<R>(&self, f: impl for<'a> FnOnce(&'a [u8]) -> R) -> R {
        let _w = Window::open(self.key, false);
        f(&self.page)
    }

    /// What backs the page.
    pub fn backing(&self) -> Backing {
        self.page.backing()
    }

    /// Length of the secret in bytes.
    pub fn len(&self) -> usize {
        self.with_access(|s| s.len())
    }

    /// Never true: secret pages hold at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    #[cfg(test)]
    pub(crate) fn raw_ptr(&self) -> *const u8 {
        self.page.raw_region().0
    }

    /// Reads the first byte WITHOUT opening the access window: on a CPU with pkeys this faults
    /// (SIGSEGV, SEGV_PKUERR) and the process dies. Exists only for tests that prove it.
    #[cfg(feature = "fault-probe")]
    pub fn read_outside_window(&self) -> u8 {
        // SAFETY: the page is mapped and readable by its protection bits for its whole life;
        // only the protection key denies access, which turns this read into a fault, not UB.
        unsafe { std::ptr::read_volatile(self.page.raw_region().0) }
    }
}

impl Drop for ProtectedPage {
    fn drop(&mut self) {
        // The page wipes itself on drop; give this thread write access to the key meanwhile.
        let _w = Window::open(self.key, true);
        // SAFETY: `page` is dropped exactly once, here, and never touched again.
        unsafe { ManuallyDrop::drop(&mut self.page) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::PagePolicy;
    use crate::testutil::in_child;
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;

    const CANARY: &[u8] = b"ak-canary-pkey-5d1c0a77";

    fn have_pkeys(test: &str) -> bool {
        match supported() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("SKIP {test}: {e}");
                false
            }
        }
    }

    fn protected() -> ProtectedPage {
        ProtectedPage::new(SecretPage::from_bytes(CANARY, PagePolicy::PreferSecret).unwrap())
            .unwrap()
    }

    #[test]
    fn reads_inside_the_window() {
        if !have_pkeys("reads_inside_the_window") {
            return;
        }
        let st = in_child(|| {
            let p = protected();
            let ok = p.with_access(|s| s == CANARY);
            // Twice: closing the window restored a state that can be opened again.
            let ok2 = p.with_access(|s| s.len() == CANARY.len());
            drop(p); // wipes under a write window; must not fault
            if ok && ok2 { 0 } else { 1 }
        });
        assert!(matches!(st, WaitStatus::Exited(_, 0)), "child: {st:?}");
    }

    #[test]
    fn pkey_protected_pages_fault_outside_the_window() {
        if !have_pkeys("pkey_protected_pages_fault_outside_the_window") {
            return;
        }
        let st = in_child(|| {
            let p = protected();
            let _ = p.with_access(|s| s[0]);
            // SAFETY: deliberate: the page is mapped and readable by protection bits, only the
            // key denies it. The read must fault (SEGV_PKUERR); surviving it fails the test.
            let b = unsafe { std::ptr::read_volatile(p.raw_ptr()) };
            i32::from(b) + 10
        });
        assert!(
            matches!(st, WaitStatus::Signaled(_, Signal::SIGSEGV, _)),
            "expected SIGSEGV, child: {st:?}"
        );
    }

    /// `credential_zeroize_on_drop`: dropping a protected (cached) page wipes its memory; a
    /// second reference to the same pages sees zeros afterwards.
    #[test]
    fn credential_zeroize_on_drop() {
        if !have_pkeys("credential_zeroize_on_drop") {
            return;
        }
        let st = in_child(|| {
            let p = protected();
            let extra = p.page.fd().try_clone_to_owned().unwrap();
            drop(p);
            let seen = crate::page::MappedSecret::map(extra).unwrap();
            if seen.len() == CANARY.len() && seen.iter().all(|&b| b == 0) {
                0
            } else {
                1
            }
        });
        assert!(matches!(st, WaitStatus::Exited(_, 0)), "child: {st:?}");
    }

    #[test]
    fn window_is_per_thread() {
        if !have_pkeys("window_is_per_thread") {
            return;
        }
        let st = in_child(|| {
            let p = protected();
            let addr = p.raw_ptr() as usize;
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            // The reader thread exists before the window opens, so it has the default PKRU.
            let reader = std::thread::spawn(move || {
                go_rx.recv().unwrap();
                // SAFETY: deliberate read of a key-protected page from a thread without the
                // key; it must fault.
                unsafe { std::ptr::read_volatile(addr as *const u8) }
            });
            p.with_access(|_| {
                go_tx.send(()).unwrap();
                let _ = reader.join();
            });
            20
        });
        assert!(
            matches!(st, WaitStatus::Signaled(_, Signal::SIGSEGV, _)),
            "another thread read inside this thread's window: {st:?}"
        );
    }
}
