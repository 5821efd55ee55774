//! The global allocator of both binaries: mimalloc built `secure` (guard pages, encrypted free
//! lists, randomised allocation), wrapped so that every freed block is wiped first.
//!
//! mimalloc does not clear memory on free, so plaintext that passed through an ordinary heap
//! buffer (a decoded JSON field, a decrypted vault entry before it reaches a secret page) would
//! otherwise linger until the block is reused. Wiping is done with `explicit_bzero`, which the
//! optimiser cannot remove. `realloc` is alloc + copy + wipe old + free, so growing a buffer
//! never leaves its old contents behind.
//!
//! Install it with
//! `#[global_allocator] static ALLOC: agentkeys_hardening::alloc::WipingAllocator = WipingAllocator;`
//! What it cannot do: wipe stack copies, registers, or memory the kernel holds (socket buffers).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

use mimalloc::MiMalloc;

/// Set once this allocator has served an allocation, so the self-test can tell it is installed.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// mimalloc (secure) that wipes blocks before freeing them.
#[derive(Debug, Default, Clone, Copy)]
pub struct WipingAllocator;

/// Whether [`WipingAllocator`] has served any allocation in this process (true when it is the
/// global allocator: the runtime allocates before `main`).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

fn mark_active() {
    // Load first: a store to a shared cache line on every allocation would make threads contend.
    if !ACTIVE.load(Ordering::Relaxed) {
        ACTIVE.store(true, Ordering::Relaxed);
    }
}

/// Zeroes `len` bytes at `ptr` in a way the optimiser keeps.
///
/// # Safety
/// `ptr..ptr+len` must be valid for writes.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: guaranteed by the caller; explicit_bzero is memset that cannot be elided.
    unsafe { libc::explicit_bzero(ptr.cast(), len) };
}

// SAFETY: every method forwards to MiMalloc, which upholds the GlobalAlloc contract; the only
// addition is wiping a block the caller is giving back, which is ours to write until it is freed.
unsafe impl GlobalAlloc for WipingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        mark_active();
        // SAFETY: same contract as our caller's.
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        mark_active();
        // SAFETY: same contract as our caller's.
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller hands back a live block of layout.size() bytes that it owned.
        unsafe { wipe(ptr, layout.size()) };
        // SAFETY: same contract as our caller's.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size, rounded up to align, does not overflow isize
        // and align is a valid alignment (it came from `layout`).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: new_layout has non-zero size (the caller guarantees new_size > 0).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live, distinct, and at least min(old, new) bytes long.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: the old block is live with `layout` and not used again; dealloc wipes it.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const PATTERN: &[u8; 32] = b"ak-heap-canary-0f1e2d3c4b5a6978!";

    /// Reads our own memory through /proc/self/mem: a syscall, not a Rust access, so looking
    /// at a freed block is not a use-after-free.
    fn peek(addr: usize, len: usize) -> Vec<u8> {
        let f = std::fs::File::open("/proc/self/mem").unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, addr as u64).unwrap();
        buf
    }

    fn count_pattern(hay: &[u8]) -> usize {
        hay.windows(PATTERN.len()).filter(|w| w == PATTERN).count()
    }

    /// Allocates, fills with the pattern, frees through `a`, and returns how many copies of the
    /// pattern remain in the freed block.
    fn leftover_after_free(a: &dyn GlobalAlloc) -> usize {
        let layout = Layout::from_size_align(4096, 16).unwrap();
        // SAFETY: non-zero layout; the block is written within bounds and freed exactly once.
        let p = unsafe { a.alloc(layout) };
        assert!(!p.is_null());
        for i in 0..(4096 / PATTERN.len()) {
            // SAFETY: i*32+32 <= 4096, inside the block.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    PATTERN.as_ptr(),
                    p.add(i * PATTERN.len()),
                    PATTERN.len(),
                )
            };
        }
        assert_eq!(count_pattern(&peek(p as usize, 4096)), 128);
        // SAFETY: p came from a.alloc(layout).
        unsafe { a.dealloc(p, layout) };
        count_pattern(&peek(p as usize, 4096))
    }

    #[test]
    fn freed_blocks_are_wiped() {
        // Control: plain mimalloc leaves the plaintext behind, so the probe can see it...
        assert!(
            leftover_after_free(&MiMalloc) > 100,
            "probe cannot see freed memory"
        );
        // ...and the wiping allocator leaves none.
        assert_eq!(leftover_after_free(&WipingAllocator), 0);
        assert!(active());
    }

    #[test]
    fn realloc_wipes_the_old_block() {
        let a = WipingAllocator;
        let layout = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: non-zero layout; writes stay in bounds; realloc's new size is non-zero.
        let (old, new) = unsafe {
            let p = a.alloc(layout);
            std::ptr::copy_nonoverlapping(PATTERN.as_ptr(), p, PATTERN.len());
            let q = a.realloc(p, layout, 1 << 16);
            (p, q)
        };
        assert_ne!(old, new);
        assert_eq!(
            count_pattern(&peek(new as usize, 64)),
            1,
            "contents not moved"
        );
        assert_eq!(
            count_pattern(&peek(old as usize, 64)),
            0,
            "old block not wiped"
        );
        // SAFETY: new came from realloc with this size and alignment.
        unsafe { a.dealloc(new, Layout::from_size_align(1 << 16, 8).unwrap()) };
    }
}
