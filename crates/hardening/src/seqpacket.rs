//! One message (with descriptors) at a time on a nonblocking `SOCK_SEQPACKET` socket, without an
//! async runtime's write registration.
//!
//! The daemon–proxy link is read by a task that registers *read* interest only. A socket an
//! async runtime registers for both directions reports `EPOLLOUT` each time the peer reads a
//! message this side sent, which woke the link's reader once more per message for nothing: on the
//! proxy's hot path (a question and an answer per injected request) that was a context switch per
//! message in each process. These are the two calls such a reader and its writer make.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use nix::sys::socket::MsgFlags;

pub use crate::peer::{Received, control_space};

/// Most descriptors one message may carry; a message with more is reported truncated (and its
/// descriptors are closed).
pub const MAX_FDS: usize = 4;

/// Reads one message without blocking (`EAGAIN`/`WouldBlock` when there is none); `space` is
/// from [`control_space`]. ([`crate::peer::recv_packet`] with `MSG_DONTWAIT` and [`MAX_FDS`].)
///
/// # Errors
/// `recvmsg(2)`'s.
pub fn recv_message(fd: BorrowedFd<'_>, buf: &mut [u8], space: &mut [u8]) -> io::Result<Received> {
    crate::peer::recv_packet(fd, buf, MAX_FDS, space, MsgFlags::MSG_DONTWAIT)
}

/// Sends one message without blocking (`WouldBlock` when the socket's buffer is full), with
/// `fds` attached when there are any.
///
/// # Errors
/// `sendmsg(2)`'s.
pub fn send_message(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    crate::peer::send_packet(fd, bytes, fds, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_EOR)
}

/// Registers `fd` with the current tokio runtime for *read* readiness only (no `EPOLLOUT`
/// wake-ups). Must run inside the runtime.
///
/// # Errors
/// The registration failed.
pub fn register_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns an open descriptor, and the `AsyncFd` owns the `OwnedFd` until it is
    // dropped (or `into_inner` gives it back): the descriptor stays open and names the same file
    // description for the registration's whole life, and `as_raw_fd` always returns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .expect("socketpair")
    }

    #[test]
    fn a_message_and_its_descriptor_arrive_whole() {
        let (a, b) = pair();
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(send_message(a.as_fd(), b"hello", &[f.as_fd()]).unwrap(), 5);
        let mut buf = [0u8; 64];
        let r = recv_message(b.as_fd(), &mut buf, &mut control_space()).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert!(!r.truncated);
        assert_eq!(r.fds.len(), 1);
        // Nothing more: WouldBlock, not a wait.
        let e = recv_message(b.as_fd(), &mut buf, &mut control_space())
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn too_long_a_message_is_reported_truncated() {
        let (a, b) = pair();
        send_message(a.as_fd(), &[7u8; 100], &[]).unwrap();
        let mut buf = [0u8; 10];
        let r = recv_message(b.as_fd(), &mut buf, &mut control_space()).unwrap();
        assert!(r.truncated);
    }

    #[test]
    fn too_many_descriptors_are_reported_truncated_and_closed() {
        let (a, b) = pair();
        let files: Vec<std::fs::File> = (0..MAX_FDS + 3)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        send_message(a.as_fd(), b"x", &fds).unwrap();
        drop(fds);
        drop(files);
        let open = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = open();
        let mut buf = [0u8; 8];
        let r = recv_message(b.as_fd(), &mut buf, &mut control_space()).unwrap();
        assert!(r.truncated);
        // The caller drops a truncated message: its descriptors close with it.
        drop(r);
        assert_eq!(open(), before, "no received descriptor stays open");
    }
}
