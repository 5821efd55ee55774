//! One SOCK_SEQPACKET connection: whole packets in and out, file descriptors alongside.
//!
//! Receiving enforces the caps before anything is parsed: a packet longer than
//! [`MAX_MESSAGE_BYTES`] is reported as too large (the kernel discards the excess: the next
//! packet starts clean), and a packet whose fds did not fit the control buffer (`MSG_CTRUNC`)
//! or exceed [`MAX_FDS_PER_MESSAGE`] is refused with every received fd closed. Fds arrive with
//! close-on-exec set atomically (`MSG_CMSG_CLOEXEC`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};
use zeroize::{Zeroize, Zeroizing};

use crate::wire::{MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES};

/// Control-message buffer, aligned for `cmsghdr`; room for a few more fds than allowed so that
/// "too many" is seen as such rather than as a truncation.
#[repr(C, align(8))]
struct CmsgBuf([u8; 256]);

/// A received packet.
pub struct Packet {
    /// The bytes, wiped when dropped.
    pub data: Zeroizing<Vec<u8>>,
    /// Descriptors that came with it (closed on drop unless taken).
    pub fds: Vec<OwnedFd>,
}

/// Why a receive produced no packet.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// Longer than the cap; discarded.
    #[error("message exceeds {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    /// More fds than a message may carry, or more than fit; all were closed.
    #[error("message carried too many file descriptors")]
    TooManyFds,
    /// Socket error.
    #[error("receive failed: {0}")]
    Io(#[from] io::Error),
}

/// A connected SOCK_SEQPACKET socket with a reusable receive buffer.
pub struct Conn {
    sock: UnixSeqpacket,
    buf: Zeroizing<Vec<u8>>,
}

impl Conn {
    /// Wraps an accepted or connected socket.
    pub fn new(sock: UnixSeqpacket) -> Conn {
        Conn {
            sock,
            // One byte more than the cap would not tell us anything: SEQPACKET reports
            // truncation itself (MSG_TRUNC), so the buffer is exactly the cap.
            buf: Zeroizing::new(vec![0u8; MAX_MESSAGE_BYTES]),
        }
    }

    /// Connects to a daemon's socket.
    ///
    /// The connect itself is blocking, bounded by a 5 s send timeout: on a unix socket a
    /// non-blocking connect that finds the listen backlog full fails with EAGAIN and is *not*
    /// in progress (tokio-seqpacket's async connect then returns an unconnected socket), while
    /// a blocking one waits for the daemon to accept.
    ///
    /// # Errors
    /// The OS error (ENOENT: no socket; ECONNREFUSED: a stale socket; EACCES: not ours;
    /// EAGAIN: the daemon did not accept within 5 s).
    pub async fn connect(path: &Path) -> io::Result<Conn> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, UnixAddr, connect, setsockopt, socket, sockopt,
        };
        use nix::sys::time::{TimeVal, TimeValLike};
        use std::os::fd::AsRawFd;

        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::SendTimeout, &TimeVal::seconds(5))?;
        let addr = UnixAddr::new(path)?;
        connect(fd.as_raw_fd(), &addr)?;
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        UnixSeqpacket::try_from(fd).map(Conn::new)
    }

    /// The underlying socket (for peer credentials).
    pub fn socket(&self) -> &UnixSeqpacket {
        &self.sock
    }

    /// Receives one packet.
    ///
    /// # Errors
    /// [`RecvError`]; after `TooLarge` or `TooManyFds` the connection is still usable.
    pub async fn recv(&mut self) -> Result<Packet, RecvError> {
        let mut cmsg = CmsgBuf([0u8; 256]);
        let (info, anc) = self
            .sock
            .recv_with_ancillary(&mut self.buf, &mut cmsg.0)
            .await?;
        let n = info.bytes_read();
        let ctrunc = anc.is_truncated();
        // Take ownership of every fd first, so that whatever happens next closes them.
        let mut fds = Vec::new();
        for msg in anc.into_messages() {
            if let OwnedAncillaryMessage::FileDescriptors(set) = msg {
                fds.extend(set);
            }
        }
        let data = Zeroizing::new(self.buf[..n].to_vec());
        self.buf[..n].zeroize();
        if info.truncated() {
            return Err(RecvError::TooLarge);
        }
        if ctrunc || fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(RecvError::TooManyFds);
        }
        if n == 0 && fds.is_empty() {
            return Err(RecvError::Closed);
        }
        Ok(Packet { data, fds })
    }

    /// Sends one packet with optional fds.
    ///
    /// # Errors
    /// The OS error (EPIPE when the peer is gone).
    pub async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.is_empty() {
            self.sock.send(data).await?;
        } else {
            let mut cmsg = CmsgBuf([0u8; 256]);
            let mut w = AncillaryMessageWriter::new(&mut cmsg.0);
            w.add_fds(fds)
                .map_err(|_| io::Error::other("too many fds for one message"))?;
            self.sock.send_with_ancillary(data, &mut w).await?;
        }
        Ok(())
    }

    /// Consumes the connection, returning the socket.
    pub fn into_socket(self) -> UnixSeqpacket {
        self.sock
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_async_fd().as_fd()
    }
}
