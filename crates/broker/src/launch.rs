//! The daemon's side of the launcher socketpair: send launch requests with their fds, match
//! the launcher's answers (`started`/`failed`, later `exited`) to the waiting runs by id.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agentkeys_hardening::launcher::{FromLauncher, LaunchSpec, MAX_LAUNCH_MESSAGE, ToLauncher};
use tokio::sync::oneshot;
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::AncillaryMessageWriter;
use tracing::warn;

#[derive(Default)]
struct Waiter {
    started: Option<oneshot::Sender<FromLauncher>>,
    exited: Option<oneshot::Sender<FromLauncher>>,
}

/// The link to the launcher.
pub struct LauncherLink {
    sock: UnixSeqpacket,
    next_id: AtomicU64,
    waiters: Mutex<HashMap<u64, Waiter>>,
}

/// Why a program did not start.
#[derive(Debug)]
pub enum LaunchError {
    /// The launcher reported a failed step with an errno.
    Failed {
        /// errno.
        errno: i32,
        /// The step (`exec`, `chdir`, `secret`, ...).
        step: String,
    },
    /// The launcher is gone or the request could not be sent.
    Unavailable(String),
}

/// A started program.
pub struct Started {
    /// Launch id (for signals).
    pub id: u64,
    /// Its pid.
    pub pid: u32,
    /// Resolves when it exits.
    pub exited: oneshot::Receiver<FromLauncher>,
}

#[repr(C, align(8))]
struct CmsgBuf([u8; 512]);

impl LauncherLink {
    /// Takes over the daemon's end of the socketpair and starts reading answers. Must run
    /// inside the runtime.
    ///
    /// # Errors
    /// The socket cannot be registered with the runtime.
    pub fn start(fd: OwnedFd) -> std::io::Result<Arc<LauncherLink>> {
        // The socketpair was made blocking (the launcher's end stays so); tokio needs ours
        // non-blocking, or a read would block a worker thread.
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        let link = Arc::new(LauncherLink {
            sock: UnixSeqpacket::try_from(fd)?,
            next_id: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
        });
        let reader = link.clone();
        tokio::spawn(async move { reader.read_answers().await });
        Ok(link)
    }

    async fn read_answers(&self) {
        let mut buf = vec![0u8; MAX_LAUNCH_MESSAGE];
        loop {
            let n = match self.sock.recv(&mut buf).await {
                Ok(info) if info.bytes_read() > 0 => info.bytes_read(),
                _ => break,
            };
            let msg: FromLauncher = match serde_json::from_slice(&buf[..n]) {
                Ok(m) => m,
                Err(e) => {
                    warn!("unreadable message from the launcher: {e}");
                    continue;
                }
            };
            let mut w = self.waiters.lock().expect("launcher waiters");
            match &msg {
                FromLauncher::Started { id, .. } | FromLauncher::Failed { id, .. } => {
                    if let Some(tx) = w.get_mut(id).and_then(|x| x.started.take()) {
                        let _ = tx.send(msg.clone());
                    }
                    if matches!(msg, FromLauncher::Failed { .. }) {
                        w.remove(id);
                    }
                }
                FromLauncher::Exited { id, .. } => {
                    if let Some(tx) = w.remove(id).and_then(|x| x.exited) {
                        let _ = tx.send(msg.clone());
                    }
                }
            }
        }
        warn!("the launcher is gone: `run` is unavailable until agentkeysd restarts");
        // Dropping the senders wakes every waiting run with an error.
        self.waiters.lock().expect("launcher waiters").clear();
    }

    /// Starts a program. `fds`: stdin, stdout, stderr, then the secret and file fds.
    ///
    /// # Errors
    /// [`LaunchError`]: the launcher's failure, or an unavailable launcher.
    pub async fn launch(
        &self,
        mut spec: LaunchSpec,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Started, LaunchError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        spec.id = id;
        let (started_tx, started_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        self.waiters.lock().expect("launcher waiters").insert(
            id,
            Waiter {
                started: Some(started_tx),
                exited: Some(exited_tx),
            },
        );
        let bytes = serde_json::to_vec(&ToLauncher::Launch(spec))
            .map_err(|e| LaunchError::Unavailable(e.to_string()))?;
        if bytes.len() > MAX_LAUNCH_MESSAGE {
            self.waiters.lock().expect("launcher waiters").remove(&id);
            return Err(LaunchError::Unavailable(
                "the request (arguments and environment) is too large".into(),
            ));
        }
        let mut cmsg = CmsgBuf([0u8; 512]);
        let mut w = AncillaryMessageWriter::new(&mut cmsg.0);
        w.add_fds(fds)
            .map_err(|_| LaunchError::Unavailable("too many file descriptors".into()))?;
        if let Err(e) = self.sock.send_with_ancillary(&bytes, &mut w).await {
            self.waiters.lock().expect("launcher waiters").remove(&id);
            return Err(LaunchError::Unavailable(format!(
                "sending to the launcher: {e}"
            )));
        }
        match started_rx.await {
            Ok(FromLauncher::Started { pid, .. }) => Ok(Started {
                id,
                pid,
                exited: exited_rx,
            }),
            Ok(FromLauncher::Failed { errno, step, .. }) => {
                Err(LaunchError::Failed { errno, step })
            }
            Ok(FromLauncher::Exited { .. }) | Err(_) => {
                Err(LaunchError::Unavailable("the launcher is gone".into()))
            }
        }
    }

    /// Forwards a signal to a running program's process group.
    pub async fn signal(&self, id: u64, signal: i32) {
        if let Ok(bytes) = serde_json::to_vec(&ToLauncher::Signal { id, signal }) {
            let _ = self.sock.send(&bytes).await;
        }
    }
}
