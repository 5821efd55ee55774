//! Moves a program's output to the caller through the masker: one thread per stream, blocking
//! reads with a short poll timeout so that held-back bytes (a tail that could begin a secret)
//! are flushed after [`HOLDBACK`] of silence and interactive output never sticks. The masker
//! keeps matching across a flush, so a secret written in two slow pieces is still masked from
//! its fourth byte on.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::sync::oneshot;
use zeroize::{Zeroize, Zeroizing};

use crate::mask::{MaskStream, Masker};

/// Longest a held-back tail waits for more output before it is flushed.
pub const HOLDBACK: Duration = Duration::from_millis(10);
const CHUNK: usize = 64 * 1024;

/// Starts a pump from `src` (the program's end of a pipe) to `dst` (the caller's fd); the
/// receiver resolves when the program closed its end and everything was written.
pub fn spawn(src: OwnedFd, dst: OwnedFd, masker: Arc<Masker>) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("agentkeysd-mask".into())
        .spawn(move || {
            pump(&src, &dst, masker);
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start an output pump: {e}");
    }
    rx
}

fn pump(src: &OwnedFd, dst: &OwnedFd, masker: Arc<Masker>) {
    let mut stream = MaskStream::new(masker);
    let mut buf = Zeroizing::new(vec![0u8; CHUNK]);
    let mut out: Vec<u8> = Vec::with_capacity(2 * CHUNK);
    let mut sink_open = true;
    loop {
        let timeout = if stream.held() > 0 {
            PollTimeout::try_from(HOLDBACK).unwrap_or(PollTimeout::NONE)
        } else {
            PollTimeout::NONE
        };
        let mut fds = [PollFd::new(src.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => {
                stream.flush(&mut out);
            }
            Ok(_) => match nix::unistd::read(src, &mut buf) {
                Ok(0) => {
                    stream.flush(&mut out);
                    write_all(dst, &out, &mut sink_open);
                    return;
                }
                Ok(n) => {
                    stream.push(&buf[..n], &mut out);
                    buf[..n].zeroize();
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                Err(_) => {
                    stream.flush(&mut out);
                    write_all(dst, &out, &mut sink_open);
                    return;
                }
            },
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => {
                stream.flush(&mut out);
                write_all(dst, &out, &mut sink_open);
                return;
            }
        }
        write_all(dst, &out, &mut sink_open);
        out.clear();
    }
}

/// Writes everything (waiting on a non-blocking fd); once the caller's side is closed, output
/// is drained and discarded so the program never blocks on a full pipe.
fn write_all(dst: &OwnedFd, mut data: &[u8], open: &mut bool) {
    while *open && !data.is_empty() {
        match nix::unistd::write(dst, data) {
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                let mut fds = [PollFd::new(dst.as_fd(), PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::from(100u8));
            }
            Err(_) => *open = false,
        }
    }
}
