//! Credentials of the process at the other end of a unix socket (`SO_PEERCRED`).
//!
//! The kernel records uid, gid and pid when the connection is made (or the socketpair created),
//! so the answer cannot be forged by the peer; check it on accept, before reading a byte
//! (as ssh-agent does).

use std::io;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// Who is on the other end of a unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PeerCred {
    /// Effective uid of the peer when it connected.
    pub uid: u32,
    /// Effective gid of the peer when it connected.
    pub gid: u32,
    /// Pid of the peer when it connected (in our pid namespace; 0 if it is not visible).
    pub pid: i32,
}

/// Reads `SO_PEERCRED` of a connected unix socket.
///
/// # Errors
/// `getsockopt(SO_PEERCRED)` failing, e.g. on a socket that is not a unix socket.
pub fn peer_credentials(sock: &impl AsFd) -> io::Result<PeerCred> {
    let c = getsockopt(sock, PeerCredentials).map_err(io::Error::from)?;
    Ok(PeerCred {
        uid: c.uid(),
        gid: c.gid(),
        pid: c.pid(),
    })
}

/// One packet received with [`recv_with_fds`] or [`recv_packet`].
pub struct Received {
    /// Bytes written into the buffer.
    pub len: usize,
    /// The descriptors that came with it (close-on-exec), owned.
    pub fds: Vec<std::os::fd::OwnedFd>,
    /// The packet did not fit (`MSG_TRUNC`), or it carried more descriptors than allowed (they
    /// are closed with this).
    pub truncated: bool,
}

/// The kernel's limit of descriptors in one message (`SCM_MAX_FD`): with room for that many,
/// the kernel never cuts the control data short (which would leave descriptors in our table
/// that nothing owns).
const SCM_MAX_FD: usize = 253;

/// Room for the control data of one packet (see [`recv_packet`]); a reader of many packets
/// makes it once.
pub fn control_space() -> Vec<u8> {
    nix::cmsg_space!([std::os::fd::RawFd; SCM_MAX_FD])
}

/// Receives one packet from a SOCK_SEQPACKET socket (blocking), taking ownership of the
/// descriptors sent with it (`SCM_RIGHTS`, `MSG_CMSG_CLOEXEC`); more than `max_fds` marks it
/// truncated. The safe wrapper every synchronous receiver uses.
///
/// # Errors
/// The OS error of `recvmsg`.
pub fn recv_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Received> {
    recv_packet(
        sock,
        buf,
        max_fds,
        &mut control_space(),
        nix::sys::socket::MsgFlags::empty(),
    )
}

/// [`recv_with_fds`] with the caller's control space (from [`control_space`]) and extra
/// `flags` (`MSG_DONTWAIT` for a nonblocking read).
///
/// # Errors
/// The OS error of `recvmsg`.
pub fn recv_packet(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    space: &mut [u8],
    flags: nix::sys::socket::MsgFlags,
) -> io::Result<Received> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(space),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    // `cmsgs` fails only when the kernel cut the control data short, which room for
    // SCM_MAX_FD descriptors rules out.
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed these descriptors in our table for this message;
                // nothing else refers to them.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC) || fds.len() > max_fds;
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated,
    })
}

/// Sends one packet with `fds` attached (`SCM_RIGHTS` when there are any), with `flags`
/// (`MSG_NOSIGNAL` is always added). Returns the bytes sent.
///
/// # Errors
/// The OS error of `sendmsg`.
pub fn send_packet(
    sock: std::os::fd::BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
    flags: nix::sys::socket::MsgFlags,
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::{AsRawFd, RawFd};
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    Ok(sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        cmsgs,
        flags | MsgFlags::MSG_NOSIGNAL,
        None,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::in_child;
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn peer_credentials_match_the_connecting_process() {
        let dir = std::env::temp_dir().join(format!("ak-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();

        let p = path.clone();
        let accepter = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let cred = peer_credentials(&conn).unwrap();
            let mut pid_bytes = [0u8; 4];
            conn.read_exact(&mut pid_bytes).unwrap();
            (cred, i32::from_ne_bytes(pid_bytes))
        });
        // A separate process connects and says its pid; the kernel's answer must agree.
        let st = in_child(move || {
            use std::io::Write;
            let mut s = UnixStream::connect(&p).unwrap();
            s.write_all(&(std::process::id() as i32).to_ne_bytes())
                .unwrap();
            0
        });
        assert!(matches!(st, nix::sys::wait::WaitStatus::Exited(_, 0)));
        let (cred, child_pid) = accepter.join().unwrap();
        assert_eq!(cred.pid, child_pid);
        assert_ne!(cred.pid, std::process::id() as i32);
        assert_eq!(cred.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(cred.gid, nix::unistd::getegid().as_raw());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn not_a_unix_socket_is_an_error() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(peer_credentials(&f).is_err());
    }
}
