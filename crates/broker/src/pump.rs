//! Moves a program's output to the caller through the masker: one thread per stream, blocking
//! reads with a short poll timeout so that held-back bytes (a tail that could begin a secret)
//! are flushed after [`HOLDBACK`] of silence and interactive output never sticks. The masker
//! keeps matching across a flush, so a secret written in two slow pieces is still masked from
//! its fourth byte on.
//!
//! Writes to the caller have a deadline: when a write makes no progress for the run's
//! `output_timeout` (`[daemon] output_timeout`), the pump gives the caller's fd up, reports
//! [`Stalled`] (the connection then stops the run), drops its masker (the patterns go with the
//! last pump) and keeps reading the program's output, discarding it, so that the program never
//! blocks on a full pipe. A caller that never reads cannot pin a run, its patterns and its
//! connection forever.
//!
//! A write must not block past the deadline, but the caller's fd may be in blocking mode and
//! its open file is shared with the caller, so setting `O_NONBLOCK` on it would change the
//! caller's file too. Instead every write waits for `POLLOUT` (with the remaining time) and then
//! writes no more than the fd takes without blocking: sockets through `send(MSG_DONTWAIT)`,
//! pipes at most `PIPE_BUF` bytes (a pipe that polls writable has a free page), terminals at
//! most 256 bytes (the tty's wake-up threshold). When stdout and stderr are the same file the
//! two pumps share one sink and take turns, so neither fills what the other's poll saw free.
//! A writer outside the daemon sharing the pipe can still fill it between the poll and the
//! write; that write then blocks until the reader reads.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::MsgFlags;
use nix::sys::stat::SFlag;
use tokio::sync::{mpsc, oneshot};
use zeroize::{Zeroize, Zeroizing};

use crate::mask::{MaskStream, Masker};

/// Longest a held-back tail waits for more output before it is flushed.
pub const HOLDBACK: Duration = Duration::from_millis(10);
const CHUNK: usize = 64 * 1024;
/// Most bytes written to a pipe after it polled writable: `PIPE_BUF`, which a free page holds.
const PIPE_WRITE: usize = 4096;
/// Most bytes written to a terminal after it polled writable: the tty layer reports
/// `POLLOUT` below this many queued characters.
const TTY_WRITE: usize = 256;

/// A pump gave up on the caller's fd: no write made progress for `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled {
    /// `"stdout"` or `"stderr"`.
    pub stream: &'static str,
    /// The `output_timeout` that passed.
    pub after: Duration,
}

/// The stall reports of a run's pumps.
pub struct Stalls(Option<mpsc::Receiver<Stalled>>);

impl Stalls {
    /// No pumps (an unmasked run): never reports.
    #[must_use]
    pub fn none() -> Stalls {
        Stalls(None)
    }

    /// Resolves with the next stall a pump reports; never, once no pump can report one.
    /// Cancel-safe (it can be a `select!` arm).
    pub async fn next(&mut self) -> Stalled {
        if let Some(rx) = &mut self.0
            && let Some(stalled) = rx.recv().await
        {
            return stalled;
        }
        self.0 = None;
        std::future::pending().await
    }
}

/// Starts the two pumps of a masked run: `out` and `err` are each the program's end of a pipe
/// and the caller's fd. Returns a receiver per pump that resolves when the program closed its
/// end and everything was written (or given up), and the pumps' stall reports.
pub fn start(
    out: (OwnedFd, OwnedFd),
    err: (OwnedFd, OwnedFd),
    masker: &Arc<Masker>,
    output_timeout: Duration,
) -> (Vec<oneshot::Receiver<()>>, Stalls) {
    let (tx, rx) = mpsc::channel(2);
    let out_sink = Arc::new(Sink::new(out.1));
    // `2>&1`: one sink, so the two pumps take turns on it.
    let err_sink = if same_file(&out_sink.fd, &err.1) {
        drop(err.1);
        Arc::clone(&out_sink)
    } else {
        Arc::new(Sink::new(err.1))
    };
    let done = vec![
        spawn(
            out.0,
            out_sink,
            Arc::clone(masker),
            "stdout",
            output_timeout,
            tx.clone(),
        ),
        spawn(
            err.0,
            err_sink,
            Arc::clone(masker),
            "stderr",
            output_timeout,
            tx,
        ),
    ];
    (done, Stalls(Some(rx)))
}

/// Starts a pump from `src` (the program's end of a pipe) to `sink`; the receiver resolves
/// when the program closed its end and everything was written or given up.
fn spawn(
    src: OwnedFd,
    sink: Arc<Sink>,
    masker: Arc<Masker>,
    stream: &'static str,
    output_timeout: Duration,
    stalls: mpsc::Sender<Stalled>,
) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("agentkeysd-mask".into())
        .spawn(move || {
            pump(&src, &sink, masker, stream, output_timeout, &stalls);
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start an output pump: {e}");
    }
    rx
}

fn pump(
    src: &OwnedFd,
    sink: &Sink,
    masker: Arc<Masker>,
    name: &'static str,
    output_timeout: Duration,
    stalls: &mpsc::Sender<Stalled>,
) {
    // `None` once the caller's side is given up: the output is then read and discarded.
    let mut stream = Some(MaskStream::new(masker));
    let mut buf = Zeroizing::new(vec![0u8; CHUNK]);
    let mut out: Vec<u8> = Vec::with_capacity(2 * CHUNK);
    loop {
        let held = stream.as_ref().map_or(0, MaskStream::held);
        let timeout = if held > 0 {
            PollTimeout::try_from(HOLDBACK).unwrap_or(PollTimeout::NONE)
        } else {
            PollTimeout::NONE
        };
        let mut fds = [PollFd::new(src.as_fd(), PollFlags::POLLIN)];
        let eof = match poll(&mut fds, timeout) {
            Ok(0) => {
                if let Some(s) = &mut stream {
                    s.flush(&mut out);
                }
                false
            }
            Ok(_) => match nix::unistd::read(src, &mut buf) {
                Ok(0) => true,
                Ok(n) => {
                    if let Some(s) = &mut stream {
                        s.push(&buf[..n], &mut out);
                    }
                    buf[..n].zeroize();
                    false
                }
                Err(Errno::EINTR | Errno::EAGAIN) => continue,
                Err(_) => true,
            },
            Err(Errno::EINTR) => continue,
            Err(_) => true,
        };
        if eof && let Some(s) = &mut stream {
            s.flush(&mut out);
        }
        if !out.is_empty() {
            match sink.write_all(&out, output_timeout) {
                Written::All => {}
                Written::Closed => stream = None,
                Written::Stalled => {
                    tracing::warn!(
                        stream = name,
                        "the caller has not read the program's output for {}s: giving it up",
                        output_timeout.as_secs()
                    );
                    let _ = stalls.try_send(Stalled {
                        stream: name,
                        after: output_timeout,
                    });
                    stream = None;
                }
            }
            out.zeroize();
        }
        if eof {
            return;
        }
    }
}

/// What became of a write to the caller.
enum Written {
    /// Everything went out.
    All,
    /// The caller's side is closed or failed (or an earlier write gave it up).
    Closed,
    /// No progress for the whole deadline: given up now.
    Stalled,
}

/// How much a write may take at once without blocking, by the kind of file.
#[derive(Clone, Copy)]
enum Kind {
    Socket,
    Pipe,
    Terminal,
    Other,
}

/// The caller's fd for one output, shared by both pumps when stdout and stderr are one file.
struct Sink {
    fd: OwnedFd,
    kind: Kind,
    /// Whether it is still written to; the lock also makes the pumps take turns.
    open: Mutex<bool>,
}

impl Sink {
    fn new(fd: OwnedFd) -> Sink {
        let kind = match nix::sys::stat::fstat(&fd) {
            Ok(st) => match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFSOCK => Kind::Socket,
                SFlag::S_IFIFO => Kind::Pipe,
                SFlag::S_IFCHR => Kind::Terminal,
                _ => Kind::Other,
            },
            Err(_) => Kind::Other,
        };
        Sink {
            fd,
            kind,
            open: Mutex::new(true),
        }
    }

    /// Writes all of `data`, giving the fd up when a write makes no progress for `timeout`.
    fn write_all(&self, mut data: &[u8], timeout: Duration) -> Written {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if !*open {
            return Written::Closed;
        }
        let mut progress = Instant::now();
        while !data.is_empty() {
            let waited = progress.elapsed();
            if waited >= timeout {
                *open = false;
                return Written::Stalled;
            }
            let wait = PollTimeout::try_from(timeout - waited).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT)];
            match poll(&mut fds, wait) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(_) => {
                    *open = false;
                    return Written::Closed;
                }
            }
            let wrote = match self.kind {
                Kind::Socket => nix::sys::socket::send(
                    self.fd.as_raw_fd(),
                    data,
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                ),
                Kind::Pipe => nix::unistd::write(&self.fd, &data[..data.len().min(PIPE_WRITE)]),
                Kind::Terminal => nix::unistd::write(&self.fd, &data[..data.len().min(TTY_WRITE)]),
                Kind::Other => nix::unistd::write(&self.fd, data),
            };
            match wrote {
                Ok(n) => {
                    data = &data[n..];
                    if n > 0 {
                        progress = Instant::now();
                    }
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                // EPIPE and the like: the reader is gone.
                Err(_) => {
                    *open = false;
                    return Written::Closed;
                }
            }
        }
        Written::All
    }
}

/// Whether two fds are the same file (device and inode).
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    match (nix::sys::stat::fstat(a), nix::sys::stat::fstat(b)) {
        (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe")
    }

    #[test]
    fn output_is_masked_and_delivered() {
        let masker = Arc::new(Masker::new(&[b"hunter2hunter2"]));
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        let (caller_out_r, caller_out_w) = pipe();
        let (caller_err_r, caller_err_w) = pipe();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (done, _stalls) = start(
            (out_r, caller_out_w),
            (err_r, caller_err_w),
            &masker,
            Duration::from_secs(5),
        );
        nix::unistd::write(&out_w, b"a hunter2hunter2 b\n").expect("write");
        nix::unistd::write(&err_w, b"hunter2").expect("write");
        nix::unistd::write(&err_w, b"hunter2!").expect("write");
        drop((out_w, err_w));
        rt.block_on(async {
            for d in done {
                d.await.expect("pump ended");
            }
        });
        let mut got = String::new();
        std::fs::File::from(caller_out_r)
            .read_to_string(&mut got)
            .expect("read");
        assert_eq!(got, "a ******** b\n");
        got.clear();
        std::fs::File::from(caller_err_r)
            .read_to_string(&mut got)
            .expect("read");
        assert_eq!(got, "********!");
    }

    #[test]
    fn a_caller_that_never_reads_is_given_up_and_the_program_is_drained() {
        // The caller's pipe fills (nobody reads it); the pump reports a stall after the
        // deadline, then keeps reading the program's output so the writer never blocks.
        let masker = Arc::new(Masker::new(&[b"0123456789"]));
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        let (_caller_r, caller_w) = pipe();
        let (_caller_err_r, caller_err_w) = pipe();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let (done, mut stalls) = start(
            (out_r, caller_w),
            (err_r, caller_err_w),
            &masker,
            Duration::from_secs(1),
        );
        drop(err_w);
        // 4 MiB: far more than a pipe holds. The writer finishes only if the pump drains.
        let writer = std::thread::spawn(move || {
            let block = vec![b'x'; 64 * 1024];
            let mut file = std::fs::File::from(out_w);
            for _ in 0..64 {
                std::io::Write::write_all(&mut file, &block).expect("program write");
            }
        });
        let stalled = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), stalls.next())
                .await
                .expect("a stall report")
        });
        assert_eq!(
            stalled,
            Stalled {
                stream: "stdout",
                after: Duration::from_secs(1)
            }
        );
        writer
            .join()
            .expect("the program was never blocked for good");
        rt.block_on(async {
            for d in done {
                d.await.expect("pump ended");
            }
        });
        // The masker went with the pumps.
        assert_eq!(Arc::strong_count(&masker), 1);
    }

    #[test]
    fn stdout_and_stderr_on_one_pipe_share_a_sink() {
        let masker = Arc::new(Masker::new(&[b"0123456789"]));
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        let (caller_r, caller_w) = pipe();
        // A second fd for the same pipe, as `2>&1` gives.
        let caller_w2: OwnedFd = caller_w.try_clone().expect("dup");
        assert!(same_file(&caller_w, &caller_w2));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (done, _stalls) = start(
            (out_r, caller_w),
            (err_r, caller_w2),
            &masker,
            Duration::from_secs(5),
        );
        nix::unistd::write(&out_w, b"out 0123456789\n").expect("write");
        drop(out_w);
        nix::unistd::write(&err_w, b"err\n").expect("write");
        drop(err_w);
        rt.block_on(async {
            for d in done {
                d.await.expect("pump ended");
            }
        });
        let mut got = String::new();
        std::fs::File::from(caller_r)
            .read_to_string(&mut got)
            .expect("read");
        assert!(
            got.contains("out ********\n") && got.contains("err\n"),
            "{got}"
        );
    }
}
