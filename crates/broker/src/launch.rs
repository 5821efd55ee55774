//! The daemon's side of the launcher socketpair: send launch requests with their fds, match
//! the launcher's answers (`started`/`failed`, later `exited`) to the waiting runs by id, ask
//! for runs to stop, and count the runs still open (shutdown waits for them).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agentkeys_hardening::launcher::{FromLauncher, LaunchSpec, MAX_LAUNCH_MESSAGE, ToLauncher};
use tokio::sync::{oneshot, watch};
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
    /// Runs started and not yet finished by their connection (see [`ActiveRun`]).
    active: watch::Sender<usize>,
}

/// Counts one open run until dropped: held by the connection serving it until its `run_exit`
/// is audited and answered, so shutdown can wait for that.
pub struct ActiveRun(Arc<LauncherLink>);

impl Drop for ActiveRun {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n = n.saturating_sub(1));
    }
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
    /// Resolves when the run has ended (the program and every process it started are gone).
    pub exited: oneshot::Receiver<FromLauncher>,
    /// Counts the run as open until dropped.
    pub active: ActiveRun,
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
            active: watch::Sender::new(0),
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
        self: &Arc<Self>,
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
        if w.add_fds(fds).is_err() {
            self.waiters.lock().expect("launcher waiters").remove(&id);
            return Err(LaunchError::Unavailable("too many file descriptors".into()));
        }
        if let Err(e) = self.sock.send_with_ancillary(&bytes, &mut w).await {
            self.waiters.lock().expect("launcher waiters").remove(&id);
            return Err(LaunchError::Unavailable(format!(
                "sending to the launcher: {e}"
            )));
        }
        match started_rx.await {
            Ok(FromLauncher::Started { pid, .. }) => {
                self.active.send_modify(|n| *n += 1);
                Ok(Started {
                    id,
                    pid,
                    exited: exited_rx,
                    active: ActiveRun(self.clone()),
                })
            }
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
        self.send(&ToLauncher::Signal { id, signal }).await;
    }

    /// Asks the launcher to stop a run: SIGTERM to the program's group and every process of
    /// the run, SIGKILL to what is left after the grace period. Its `exited` resolves once
    /// nothing of it is left.
    pub async fn stop(&self, id: u64) {
        self.send(&ToLauncher::Stop { id }).await;
    }

    async fn send(&self, msg: &ToLauncher) {
        if let Ok(bytes) = serde_json::to_vec(msg)
            && let Err(e) = self.sock.send(&bytes).await
        {
            warn!("sending to the launcher: {e}");
        }
    }

    /// Waits until every run has been finished by its connection, at most `limit`; false when
    /// some were still open then.
    pub async fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.active.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// `approval_command`s running at once, at most: each new pending request starts one, and a
/// burst of requests must not become a burst of processes.
pub const MAX_HOOKS: usize = 8;

static HOOKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Releases a hook's slot when its task ends.
struct HookSlot;

impl Drop for HookSlot {
    fn drop(&mut self) {
        HOOKS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs the configured `approval_command` for a new pending request, through the launcher
/// (outside the sandbox, without a shell), with `code`, `agent`, `service` and the shown
/// `command` (empty for `read`) appended as four arguments; stdin, stdout and stderr are
/// `/dev/null`. Returns at once: the request is answered whatever the hook does. A hook that
/// cannot start, exits non-zero or outlives `approval_command_timeout` (then it is stopped
/// like a run) is logged, by its program path and status only: its arguments hold the code,
/// which is never logged.
pub fn approval_hook(
    shared: &crate::shared::Shared,
    code: &str,
    agent: &str,
    service: &str,
    command: &str,
) {
    let Some(base) = &shared.cfg.approval_command else {
        return;
    };
    let program = base.first().cloned().unwrap_or_default();
    let Some(link) = shared.launcher.get().cloned() else {
        warn!(
            program,
            "approval_command not run: the launcher is not running"
        );
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if HOOKS.fetch_add(1, Ordering::Relaxed) >= MAX_HOOKS {
        HOOKS.fetch_sub(1, Ordering::Relaxed);
        warn!(
            program,
            "approval_command not run: {MAX_HOOKS} are still running"
        );
        return;
    }
    let slot = HookSlot;
    let mut argv = base.clone();
    argv.extend([code, agent, service, command].map(String::from));
    // The daemon's own (allowlisted) environment, so a desktop notifier finds its session bus;
    // a PATH for scripts, since the daemon has none.
    // (`vars_os`: `vars` panics on an entry that is not UTF-8, and a panic aborts the daemon.)
    let mut env: Vec<String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k != "PATH")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.push("PATH=/usr/local/bin:/usr/bin:/bin".into());
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let spec = LaunchSpec {
        id: 0,
        argv,
        env,
        secret_env: Vec::new(),
        files: Vec::new(),
        cwd: Some("/".into()),
        umask: None,
        kill_grace_ms: ms(shared.cfg.kill_grace),
        deadline_ms: Some(ms(shared.cfg.approval_command_timeout)),
        confine: None,
        confine_userns: false,
    };
    runtime.spawn(async move {
        let _slot = slot;
        let null = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            Ok(f) => OwnedFd::from(f),
            Err(e) => {
                warn!(program, "approval_command not run: opening /dev/null: {e}");
                return;
            }
        };
        let fds = [null.as_fd(), null.as_fd(), null.as_fd()];
        let started = link.launch(spec, &fds).await;
        drop(null);
        let exited = match started {
            Ok(s) => s.exited.await,
            Err(LaunchError::Failed { errno, step }) => {
                warn!(
                    program,
                    "approval_command could not be started ({step}): {}",
                    std::io::Error::from_raw_os_error(errno)
                );
                return;
            }
            Err(LaunchError::Unavailable(m)) => {
                warn!(program, "approval_command could not be started: {m}");
                return;
            }
        };
        match exited {
            Ok(FromLauncher::Exited {
                code: Some(0), end, ..
            }) if !end.stopped => tracing::debug!(program, "approval_command ran"),
            Ok(FromLauncher::Exited { end, .. }) if end.stopped => warn!(
                program,
                "approval_command was stopped: it ran longer than approval_command_timeout"
            ),
            Ok(FromLauncher::Exited { code, signal, .. }) => warn!(
                program,
                ?code,
                ?signal,
                "approval_command failed (the request is pending all the same)"
            ),
            _ => warn!(program, "approval_command: the launcher went away"),
        }
    });
}
