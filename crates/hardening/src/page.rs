//! Secret pages: memory for one secret that ordinary reads of the process cannot reach.
//!
//! A [`SecretPage`] is backed by `memfd_secret(2)`: its pages are removed from the kernel's
//! direct map, so neither `/proc/PID/mem` (even as root) nor a core dump nor the kernel itself
//! through the direct map can read them, and the kernel zeroes them when the last reference goes.
//! `read(2)` on such an fd fails (EINVAL): the only way in is `mmap`.
//!
//! Where the kernel lacks `memfd_secret`, the page falls back to a `memfd` that is mlocked,
//! excluded from dumps and sealed against resizing and new writable mappings. That fallback is
//! *degraded* (root can read it, the kernel does not zero it on free) and callers must say so;
//! [`PagePolicy::RequireSecret`] refuses it instead.
//!
//! The secret's length travels as the file's size (`ftruncate` once, `fstat` on the other side),
//! so no header is needed and a receiver cannot be told a length that disagrees with the memory.
//!
//! Lifecycle on the sending side: create and fill ([`SecretPage::new_with`]), mapped read-only
//! from then on; either drop it (wiped, unmapped, closed) or hand its fd to another process
//! ([`SecretPage::into_fd`]: unmapped without wiping, because the memory is now the receiver's).
//! The receiving side maps a received fd read-only with [`MappedSecret::map`].

use std::fmt;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::errno::cerr;

/// Largest secret a page holds. Secret pages count against `RLIMIT_MEMLOCK` (8 MiB here), so
/// this bounds what one request can pin; credentials (tokens, keys, kubeconfigs) are far smaller.
pub const MAX_SECRET_LEN: usize = 1 << 20;

/// `statfs` magic of the secretmem filesystem (`SECRETMEM_MAGIC` in linux/magic.h).
const SECRETMEM_MAGIC: i64 = 0x5345_434d;
/// `statfs` magic of tmpfs/shmem, where `memfd_create` files live.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// What backs a secret page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// `memfd_secret`: out of the kernel direct map, zeroed by the kernel on free.
    MemfdSecret,
    /// mlocked, sealed `memfd`: the degraded fallback.
    SealedMemfd,
}

impl Backing {
    /// True for the fallback, which deliveries must report as `degraded`.
    pub fn is_degraded(self) -> bool {
        self == Backing::SealedMemfd
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backing::MemfdSecret => "memfd_secret",
            Backing::SealedMemfd => "sealed memfd (degraded)",
        })
    }
}

/// Which backing a new page may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PagePolicy {
    /// `memfd_secret`, or the degraded fallback when the kernel lacks it.
    #[default]
    PreferSecret,
    /// `memfd_secret` or an error (`require_secretmem = true`).
    RequireSecret,
    /// Always the fallback: for tests and for checking the degraded path on purpose.
    ForceFallback,
}

/// Errors creating or mapping a secret page. Each variant names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// A secret must have at least one byte.
    #[error("refusing an empty secret")]
    Empty,
    /// Over [`MAX_SECRET_LEN`].
    #[error("secret of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Requested length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `memfd_secret` failed and the policy refuses the fallback.
    #[error(
        "memfd_secret is unavailable ({0}) and the memfd fallback is refused (require_secretmem)"
    )]
    SecretMemRequired(#[source] io::Error),
    /// A system call failed; `step` names it.
    #[error("secret page: {step} failed: {source}")]
    Os {
        /// The failed step, e.g. `mmap` or `mlock`.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A received fd is not a sealed memfd or memfd_secret of a sane size.
    #[error("received fd is not a secret page: {0}")]
    NotASecretPage(&'static str),
}

impl PageError {
    pub(crate) fn os(step: &'static str) -> impl FnOnce(io::Error) -> PageError {
        move |source| PageError::Os { step, source }
    }
}

pub(crate) fn page_size() -> usize {
    // sysconf(_SC_PAGESIZE) cannot fail on Linux; 4096 is the floor on every supported arch.
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(4096)
}

fn round_to_pages(len: usize) -> usize {
    let ps = page_size();
    len.div_ceil(ps) * ps
}

/// A new, empty memfd for a secret page under `policy`: `memfd_secret`, or the sealable memfd
/// fallback where the policy allows it, with which one it is.
pub(crate) fn new_backing(policy: PagePolicy) -> Result<(OwnedFd, Backing), PageError> {
    Ok(match policy {
        PagePolicy::ForceFallback => (
            memfd_sealable().map_err(PageError::os("memfd_create"))?,
            Backing::SealedMemfd,
        ),
        PagePolicy::RequireSecret => (
            memfd_secret().map_err(PageError::SecretMemRequired)?,
            Backing::MemfdSecret,
        ),
        PagePolicy::PreferSecret => match memfd_secret() {
            Ok(fd) => (fd, Backing::MemfdSecret),
            Err(_) => (
                memfd_sealable().map_err(PageError::os("memfd_create"))?,
                Backing::SealedMemfd,
            ),
        },
    })
}

fn check_len(len: usize) -> Result<(), PageError> {
    if len == 0 {
        return Err(PageError::Empty);
    }
    if len > MAX_SECRET_LEN {
        return Err(PageError::TooLarge {
            len,
            max: MAX_SECRET_LEN,
        });
    }
    Ok(())
}

/// Creates a `memfd_secret` fd (close-on-exec).
pub(crate) fn memfd_secret() -> io::Result<OwnedFd> {
    // SAFETY: memfd_secret takes one flags word and returns a new fd or -1; no memory is passed.
    let fd =
        cerr(unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC as libc::c_ulong) })?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates the fallback: a close-on-exec memfd that accepts seals.
pub(crate) fn memfd_sealable() -> io::Result<OwnedFd> {
    let name = c"agentkeys-secret";
    // SAFETY: name is a valid NUL-terminated string; the call returns a new fd or -1.
    let fd = cerr(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: fresh descriptor from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether this kernel gives out `memfd_secret` fds at all (probe; creates and closes one).
pub fn memfd_secret_available() -> io::Result<()> {
    memfd_secret().map(drop)
}

/// A mapping this process owns: `len` bytes of secret in `map_len` bytes of pages.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
    /// Owned secret pages are wiped before unmapping; received ones (read-only) are not.
    pub(crate) wipe_on_drop: bool,
}

impl Mapping {
    /// Maps `map_len` bytes of `fd` shared with `prot`.
    pub(crate) fn new(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int) -> io::Result<Mapping> {
        let map_len = round_to_pages(len);
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) of a file we hold open; it
        // aliases no Rust object. MAP_FAILED is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        let m = Mapping {
            ptr,
            len,
            map_len,
            wipe_on_drop: false,
        };
        // A launcher or any other child forked later must not inherit the secret mapping.
        m.madvise(libc::MADV_DONTFORK)?;
        Ok(m)
    }

    pub(crate) fn madvise(&self, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: the range is exactly our own live mapping; advice changes no Rust-visible memory.
        cerr(unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.map_len, advice) }).map(drop)
    }

    fn mprotect(&self, prot: libc::c_int) -> io::Result<()> {
        // SAFETY: the range is exactly our own live mapping; no reference into it is live across
        // a protection change that would invalidate it (callers change protection only between
        // uses).
        cerr(unsafe { libc::mprotect(self.ptr.as_ptr().cast(), self.map_len, prot) }).map(drop)
    }

    pub(crate) fn mlock(&self) -> io::Result<()> {
        // SAFETY: locks our own live mapping; no memory is read or written.
        cerr(unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.map_len) }).map(drop)
    }

    /// Zeroes the whole mapping; the mapping must be writable.
    fn wipe(&mut self) {
        // SAFETY: the mapping is live, writable (callers ensure it), map_len bytes long, and
        // exclusively borrowed. explicit_bzero is not elided by the optimiser.
        unsafe { libc::explicit_bzero(self.ptr.as_ptr().cast(), self.map_len) };
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len lies inside a live, readable mapping that lives as long as
        // `self`; the memory is only written while no shared borrow exists (fill, wipe).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for as_slice, with an exclusive borrow and a writable mapping.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn raw(&self) -> (*mut u8, usize) {
        (self.ptr.as_ptr(), self.map_len)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Make the pages writable again to wipe them. If that fails the unmap still happens;
        // memfd_secret memory is then zeroed by the kernel on free.
        if self.wipe_on_drop && self.mprotect(libc::PROT_READ | libc::PROT_WRITE).is_ok() {
            self.wipe();
        }
        // SAFETY: unmaps exactly our own mapping; no borrow of it outlives `self`.
        let _ = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

// SAFETY: the mapping is plain shared memory with no thread affinity; access goes through
// &/&mut borrows of the owner, so the usual Send/Sync reasoning for a Box<[u8]> applies.
unsafe impl Send for Mapping {}
// SAFETY: see Send; shared access is read-only.
unsafe impl Sync for Mapping {}

/// One secret in memory the rest of the process cannot read by accident, owned by this process.
///
/// Mapped read-only after it is filled; derefs to exactly the secret's bytes; on drop the pages
/// are wiped (the mapping's drop), unmapped and the fd closed. There is deliberately no `Debug` or `Display`.
pub struct SecretPage {
    map: Mapping,
    fd: OwnedFd,
    backing: Backing,
}

impl SecretPage {
    /// Creates a page for `len` bytes, lets `fill` write them, then maps it read-only.
    ///
    /// `fill` gets exactly `len` writable bytes, initially zero; build the secret there
    /// directly rather than copying from a heap buffer.
    ///
    /// # Errors
    /// [`PageError::Empty`] / [`PageError::TooLarge`] for a bad length;
    /// [`PageError::SecretMemRequired`] when the policy refuses the fallback;
    /// [`PageError::Os`] naming the step (`mmap` fails with ENOMEM/EAGAIN once the memlock
    /// limit is reached).
    pub fn new_with(
        len: usize,
        policy: PagePolicy,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<SecretPage, PageError> {
        check_len(len)?;
        let (fd, backing) = new_backing(policy)?;
        let size = libc::off_t::try_from(len).map_err(|_| PageError::TooLarge {
            len,
            max: MAX_SECRET_LEN,
        })?;
        nix::unistd::ftruncate(&fd, size)
            .map_err(|e| PageError::os("ftruncate")(io::Error::from(e)))?;
        let mut map = Mapping::new(fd.as_fd(), len, libc::PROT_READ | libc::PROT_WRITE)
            .map_err(PageError::os("mmap"))?;
        map.wipe_on_drop = true;
        if backing == Backing::SealedMemfd {
            // memfd_secret pages are unevictable and never dumped by construction; the
            // fallback needs both asked for.
            map.mlock().map_err(PageError::os("mlock"))?;
            map.madvise(libc::MADV_DONTDUMP)
                .map_err(PageError::os("madvise(MADV_DONTDUMP)"))?;
        }
        fill(map.as_mut_slice());
        map.mprotect(libc::PROT_READ)
            .map_err(PageError::os("mprotect(PROT_READ)"))?;
        if backing == Backing::SealedMemfd {
            // No resizing and no new writable mapping or write(2) by anyone holding the fd.
            // F_SEAL_WRITE would fail (EBUSY) while our own shared mapping exists.
            let seals = libc::F_SEAL_SHRINK
                | libc::F_SEAL_GROW
                | libc::F_SEAL_FUTURE_WRITE
                | libc::F_SEAL_SEAL;
            // SAFETY: fcntl on our own fd with an integer argument.
            cerr(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })
                .map_err(PageError::os("fcntl(F_ADD_SEALS)"))?;
        }
        Ok(SecretPage { map, fd, backing })
    }

    /// Creates a page holding a copy of `bytes`. The caller remains responsible for wiping
    /// `bytes`; prefer [`SecretPage::new_with`] to build the secret in place.
    ///
    /// # Errors
    /// As for [`SecretPage::new_with`].
    pub fn from_bytes(bytes: &[u8], policy: PagePolicy) -> Result<SecretPage, PageError> {
        SecretPage::new_with(bytes.len(), policy, |dst| dst.copy_from_slice(bytes))
    }

    /// What backs this page.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The fd, to send with `SCM_RIGHTS` while this page stays alive.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Gives up this process's mapping *without wiping* and returns the fd for hand-over.
    ///
    /// The memory is shared with whoever receives the fd, so wiping here would destroy the
    /// receiver's copy. `memfd_secret` pages are zeroed by the kernel when the last fd and
    /// mapping go; the degraded fallback's are not (see docs/threat-model.md).
    pub fn into_fd(self) -> OwnedFd {
        let SecretPage { mut map, fd, .. } = self;
        map.wipe_on_drop = false;
        drop(map);
        fd
    }

    pub(crate) fn raw_region(&self) -> (*mut u8, usize) {
        self.map.raw()
    }
}

impl Deref for SecretPage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_slice()
    }
}

/// A secret page received from another process, mapped read-only.
///
/// Derefs to exactly the secret's bytes; on drop it is unmapped and the fd closed. No `Debug`.
pub struct MappedSecret {
    map: Mapping,
    _fd: OwnedFd,
    backing: Backing,
}

impl MappedSecret {
    /// Maps a received fd after checking it is a secret page: a `memfd_secret` file, or a memfd
    /// sealed against growing, shrinking and writing, of 1..=[`MAX_SECRET_LEN`] bytes.
    ///
    /// # Errors
    /// [`PageError::NotASecretPage`] when the fd is anything else (a pipe, a regular file, an
    /// unsealed memfd); [`PageError::Os`] when `fstat`, `fstatfs` or `mmap` fail.
    pub fn map(fd: OwnedFd) -> Result<MappedSecret, PageError> {
        let st = nix::sys::stat::fstat(&fd).map_err(|e| PageError::os("fstat")(e.into()))?;
        if (st.st_mode & libc::S_IFMT) != libc::S_IFREG {
            return Err(PageError::NotASecretPage("not a regular memory file"));
        }
        let len =
            usize::try_from(st.st_size).map_err(|_| PageError::NotASecretPage("negative size"))?;
        if len == 0 || len > MAX_SECRET_LEN {
            return Err(PageError::NotASecretPage("size out of range"));
        }
        let fs = nix::sys::statfs::fstatfs(&fd).map_err(|e| PageError::os("fstatfs")(e.into()))?;
        let magic = i64::from(fs.filesystem_type().0 as u32);
        let backing = match magic {
            SECRETMEM_MAGIC => Backing::MemfdSecret,
            TMPFS_MAGIC => {
                // SAFETY: fcntl(F_GET_SEALS) on an fd we own; integer result only.
                let seals = cerr(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
                    .map_err(|_| PageError::NotASecretPage("memfd without seals"))?;
                let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
                let write = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;
                if seals & need != need || seals & write == 0 {
                    return Err(PageError::NotASecretPage("memfd is not sealed"));
                }
                Backing::SealedMemfd
            }
            _ => return Err(PageError::NotASecretPage("not memfd_secret or memfd")),
        };
        let map = Mapping::new(fd.as_fd(), len, libc::PROT_READ).map_err(PageError::os("mmap"))?;
        if backing == Backing::SealedMemfd {
            map.mlock().map_err(PageError::os("mlock"))?;
            map.madvise(libc::MADV_DONTDUMP)
                .map_err(PageError::os("madvise(MADV_DONTDUMP)"))?;
        }
        Ok(MappedSecret {
            map,
            _fd: fd,
            backing,
        })
    }

    /// What backs the received page; deliveries of the fallback are `degraded`.
    pub fn backing(&self) -> Backing {
        self.backing
    }
}

impl Deref for MappedSecret {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{have_memfd_secret, in_child};
    use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
    use nix::sys::wait::WaitStatus;
    use std::io::{IoSlice, IoSliceMut};
    use std::os::unix::net::UnixStream;

    const CANARY: &[u8] = b"ak-canary-7f3e9b2c-page-test-0123456789";

    fn send_fd(sock: &UnixStream, fd: BorrowedFd<'_>) {
        let fds = [fd.as_raw_fd()];
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
    }

    fn recv_fd(sock: &UnixStream) -> OwnedFd {
        let mut buf = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFdAlias; 1]);
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("recvmsg");
        for c in msg.cmsgs().expect("cmsgs") {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel installed this descriptor in our table for us alone.
                return unsafe { OwnedFd::from_raw_fd(fds[0]) };
            }
        }
        panic!("no fd received");
    }
    type RawFdAlias = std::os::fd::RawFd;

    /// The smaps block of the mapping starting at `addr`.
    fn smaps_block(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        let header = lines.next().expect("mapping in smaps").to_string();
        let rest = lines.take_while(|l| !l.contains('-') || l.contains(':'));
        std::iter::once(header)
            .chain(rest.map(str::to_string))
            .collect()
    }

    fn smaps_field(addr: usize, key: &str) -> u64 {
        smaps_block(addr)
            .iter()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("field in smaps")
    }

    fn smaps_flags(addr: usize) -> Vec<String> {
        smaps_block(addr)
            .iter()
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .expect("VmFlags in smaps")
    }

    #[test]
    fn memfd_secret_round_trip() {
        if !have_memfd_secret("memfd_secret_round_trip") {
            return;
        }
        let page = SecretPage::from_bytes(CANARY, PagePolicy::RequireSecret).unwrap();
        assert_eq!(page.backing(), Backing::MemfdSecret);
        assert!(!page.backing().is_degraded());
        assert_eq!(&*page, CANARY);
        // read(2) cannot reach secretmem: the fd can only be mapped.
        let mut buf = [0u8; 8];
        let err = nix::unistd::read(page.fd(), &mut buf).unwrap_err();
        assert_eq!(err, nix::errno::Errno::EINVAL);

        // Another process receives the fd over SCM_RIGHTS, maps it and sees the same bytes.
        let (parent_sock, child_sock) = UnixStream::pair().unwrap();
        let status = std::thread::scope(|s| {
            let sender = s.spawn(|| send_fd(&parent_sock, page.fd()));
            let st = in_child(|| {
                let fd = recv_fd(&child_sock);
                match MappedSecret::map(fd) {
                    Ok(m) if &*m == CANARY && m.backing() == Backing::MemfdSecret => 0,
                    Ok(_) => 1,
                    Err(_) => 2,
                }
            });
            sender.join().unwrap();
            st
        });
        assert!(
            matches!(status, WaitStatus::Exited(_, 0)),
            "child: {status:?}"
        );
    }

    #[test]
    fn wiped_on_drop() {
        if !have_memfd_secret("wiped_on_drop") {
            return;
        }
        let page = SecretPage::from_bytes(CANARY, PagePolicy::RequireSecret).unwrap();
        // A second reference to the same memory outlives the page.
        let extra = page.fd().try_clone_to_owned().unwrap();
        drop(page);
        let seen = MappedSecret::map(extra).unwrap();
        assert_eq!(seen.len(), CANARY.len());
        assert!(seen.iter().all(|&b| b == 0), "page not wiped on drop");
    }

    #[test]
    fn into_fd_hands_over_without_wiping() {
        if !have_memfd_secret("into_fd_hands_over_without_wiping") {
            return;
        }
        let page = SecretPage::from_bytes(CANARY, PagePolicy::PreferSecret).unwrap();
        let fd = page.into_fd();
        let m = MappedSecret::map(fd).unwrap();
        assert_eq!(&*m, CANARY);
    }

    #[test]
    fn fallback_when_forced_is_degraded_sealed_and_locked() {
        let page = SecretPage::from_bytes(CANARY, PagePolicy::ForceFallback).unwrap();
        assert_eq!(page.backing(), Backing::SealedMemfd);
        assert!(page.backing().is_degraded());
        assert_eq!(&*page, CANARY);
        let locked = smaps_field(page.raw_region().0 as usize, "Locked:");
        assert!(locked >= 4, "fallback page not mlocked: Locked {locked} kB");
        assert!(
            smaps_flags(page.raw_region().0 as usize).contains(&"dd".to_string()),
            "not MADV_DONTDUMP"
        );
        // Sealed: no write(2), no resize.
        assert!(nix::unistd::write(page.fd(), b"overwrite").is_err());
        assert!(nix::unistd::ftruncate(page.fd(), 1).is_err());
        // The receiving side accepts it and reports it degraded.
        let m = MappedSecret::map(page.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(m.backing(), Backing::SealedMemfd);
        assert_eq!(&*m, CANARY);
    }

    /// A kernel without memfd_secret, made real for one child process: a seccomp filter that
    /// answers ENOSYS to memfd_secret and allows everything else.
    fn without_memfd_secret(f: impl FnOnce() -> i32) -> WaitStatus {
        use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
        let arch = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        let filter = SeccompFilter::new(
            [(libc::SYS_memfd_secret, vec![])].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .unwrap();
        let prog: seccompiler::BpfProgram = filter.try_into().unwrap();
        in_child(move || {
            seccompiler::apply_filter(&prog).expect("apply filter");
            f()
        })
    }

    #[test]
    fn prefer_secret_falls_back_and_require_secret_refuses() {
        let st = without_memfd_secret(|| {
            let fallback = match SecretPage::from_bytes(CANARY, PagePolicy::PreferSecret) {
                Ok(p) if p.backing() == Backing::SealedMemfd && &*p == CANARY => 0,
                _ => return 1,
            };
            match SecretPage::from_bytes(CANARY, PagePolicy::RequireSecret) {
                Err(PageError::SecretMemRequired(e)) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    fallback
                }
                _ => 2,
            }
        });
        assert!(matches!(st, WaitStatus::Exited(_, 0)), "child: {st:?}");
    }

    #[test]
    fn rejects_empty_and_oversized() {
        assert!(matches!(
            SecretPage::from_bytes(b"", PagePolicy::PreferSecret),
            Err(PageError::Empty)
        ));
        assert!(matches!(
            SecretPage::new_with(MAX_SECRET_LEN + 1, PagePolicy::PreferSecret, |_| {}),
            Err(PageError::TooLarge { .. })
        ));
    }

    #[test]
    fn receiver_rejects_fds_that_are_not_secret_pages() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(matches!(
            MappedSecret::map(r),
            Err(PageError::NotASecretPage(_))
        ));

        let file =
            std::fs::File::open("/etc/hostname").or_else(|_| std::fs::File::open("/proc/self/exe"));
        let file: OwnedFd = file.unwrap().into();
        assert!(matches!(
            MappedSecret::map(file),
            Err(PageError::NotASecretPage(_))
        ));

        // An unsealed memfd could be rewritten by the sender after we checked it.
        let fd = memfd_sealable().unwrap();
        nix::unistd::write(&fd, b"not sealed").unwrap();
        assert!(matches!(
            MappedSecret::map(fd),
            Err(PageError::NotASecretPage(_))
        ));
    }

    #[test]
    fn build_in_place_sees_zeroed_buffer_of_exact_length() {
        let page = SecretPage::new_with(5, PagePolicy::PreferSecret, |buf| {
            assert_eq!(buf, &[0u8; 5]);
            buf.copy_from_slice(b"abcde");
        })
        .unwrap();
        assert_eq!(&*page, b"abcde");
    }
}
