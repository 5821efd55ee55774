//! The listener (after mini-redis `server.rs`): accept, check the peer's uid before reading a
//! byte, enforce the connection caps, hand each connection to [`crate::connection`], and shut
//! down on request.
//!
//! Caps: at most `max_connections` open; at most `max_pending` that have not authenticated.
//! When the pending set is full the *oldest* pending connection is closed, so a client that
//! opens idle connections cannot lock out one that says hello promptly.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentkeys_proto::conn::Conn;
use agentkeys_proto::wire::{self, ErrorCode, PROTOCOL_VERSION, Response, ResponseBody};
use tokio::sync::Notify;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tracing::{debug, info, warn};

use crate::config::DaemonConfig;
use crate::shared::{ConnEntry, Shared};

/// Creates the socket's directory if needed and checks it, removes a stale socket, binds and
/// listens. Runs before the sandbox closes; the returned fd becomes the listener later.
///
/// # Errors
/// A message naming the path and the problem.
pub fn bind_socket(path: &Path, cfg: &DaemonConfig) -> Result<OwnedFd, String> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
    };
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    let dir = path
        .parent()
        .ok_or_else(|| format!("socket path {} has no directory", path.display()))?;
    let group = match &cfg.socket_group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .map_err(|e| format!("looking up socket_group {name:?}: {e}"))?
                .ok_or_else(|| format!("socket_group {name:?} does not exist"))?,
        ),
        None => None,
    };
    // A directory we create gets the mode we want; an existing one is checked, never changed
    // (AGENTKEYS_SOCKET=/tmp/x.sock must not make /tmp private, nor socket_group open the home).
    let dir_mode = if group.is_some() { 0o710 } else { 0o700 };
    let created = !dir.exists();
    if created {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
            .map_err(|e| format!("setting mode {dir_mode:o} on {}: {e}", dir.display()))?;
        if let Some(g) = &group {
            nix::unistd::chown(dir, None, Some(g.gid))
                .map_err(|e| format!("chgrp {}: {e}", dir.display()))?;
        }
    }
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(format!(
            "socket directory {} is owned by uid {}, not by this daemon's uid {euid}",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    match &group {
        None if mode & 0o077 != 0 => {
            return Err(format!(
                "socket directory {} has mode {mode:o}: group and others must have no access \
                 (chmod 700 it, or point AGENTKEYS_SOCKET into a private directory)",
                dir.display()
            ));
        }
        Some(g) if mode != 0o710 || meta.gid() != g.gid.as_raw() => {
            return Err(format!(
                "with socket_group the socket needs a directory of its own, mode 710 and group {}: \
                 {} has mode {mode:o}; set AGENTKEYS_SOCKET to a path in a directory that does not \
                 exist yet (agentkeysd creates it)",
                g.name,
                dir.display()
            ));
        }
        _ => {}
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ));
        }
        if seqpacket_answers(path) {
            return Err(format!(
                "another agentkeysd is already listening at {}",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("removing stale socket {}: {e}", path.display()))?;
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| format!("creating socket: {e}"))?;
    let addr = UnixAddr::new(path).map_err(|e| format!("socket path {}: {e}", path.display()))?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
        .map_err(|e| format!("binding {}: {e}", path.display()))?;
    let sock_mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(sock_mode))
        .map_err(|e| format!("setting mode {sock_mode:o} on {}: {e}", path.display()))?;
    if let Some(g) = &group {
        nix::unistd::chown(path, None, Some(g.gid))
            .map_err(|e| format!("chgrp {}: {e}", path.display()))?;
    }
    listen(&fd, Backlog::new(128).expect("128 is a valid backlog"))
        .map_err(|e| format!("listening on {}: {e}", path.display()))?;
    Ok(fd)
}

/// Whether something accepts SOCK_SEQPACKET connections at `path`.
fn seqpacket_answers(path: &Path) -> bool {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).is_ok()
}

/// Refused connections waiting for their client to hang up (see [`refuse`]).
static LINGERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sends one error, then discards (never parses) what the client sends until it hangs up, for at
/// most a second, and closes. Closing a unix socket with unread data makes the kernel report
/// ECONNRESET to the peer *before* the queued error: a client that sent its hello at once (the
/// CLI does) would see a reset instead of the reason (tests/hostile.rs). At most 128 refused
/// connections linger; beyond that only what is already queued is discarded before closing.
async fn refuse(sock: UnixSeqpacket, code: ErrorCode, message: &str) {
    use agentkeys_proto::conn::RecvError;
    use std::sync::atomic::Ordering;
    let mut conn = Conn::new(sock);
    let sent = match wire::encode(&Response {
        v: PROTOCOL_VERSION,
        id: 0,
        body: ResponseBody::Error {
            code,
            message: message.to_string(),
        },
    }) {
        Ok(bytes) => conn.send(&bytes, &[]).await.is_ok(),
        Err(_) => false,
    };
    if !sent {
        return;
    }
    // Past 128 lingering, only what is already queued is discarded (a zero timeout polls once).
    let linger = if LINGERING.fetch_add(1, Ordering::Relaxed) < 128 {
        Duration::from_secs(1)
    } else {
        Duration::ZERO
    };
    let _ = tokio::time::timeout(linger, async {
        while !matches!(conn.recv().await, Err(RecvError::Closed | RecvError::Io(_))) {}
    })
    .await;
    LINGERING.fetch_sub(1, Ordering::Relaxed);
}

/// Accepts connections until shutdown.
pub async fn serve(listener: OwnedFd, shared: Arc<Shared>, socket_path: PathBuf) {
    let mut listener = match UnixSeqpacketListener::try_from(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot register the listening socket: {e}");
            let _ = shared.shutdown.send(true);
            return;
        }
    };
    let mut stop = shared.shutdown.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    info!(socket = %socket_path.display(), "agentkeysd serving");
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {
                shared.refresh();
                // Expiry is a matter of time, not of a file changing: every second, every
                // connection's session is checked.
                shared.kick_invalid();
                shared.sweep_cache();
                shared.sweep_approvals();
            }
            r = listener.accept() => match r {
                Ok(sock) => accept_one(sock, &shared),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    // Ask every connection to close, and wipe the cache.
    for e in shared.conns.lock().expect("conn table").live.values() {
        e.kick.notify_one();
    }
    // Their runs are being stopped (SIGTERM, SIGKILL after kill_grace): wait until each has
    // ended and its `run_exit` is written, a little longer than the launcher may take.
    if let Some(l) = shared.launcher.get() {
        let limit = shared.cfg.kill_grace
            + agentkeys_hardening::launcher::SUPERVISOR_SLACK
            + Duration::from_secs(2);
        if !l.wait_idle(limit).await {
            warn!(
                "runs still open {limit:?} after shutdown began; exiting (the launcher stops them)"
            );
        }
    }
    shared.clear_cache();
}

fn accept_one(sock: UnixSeqpacket, shared: &Arc<Shared>) {
    // The peer's credentials come from the kernel at connect time: checked before any read.
    let (uid, pid) = match sock.peer_cred() {
        Ok(c) => (c.uid(), c.pid().unwrap_or(0)),
        Err(e) => {
            warn!("dropping connection: cannot read peer credentials: {e}");
            return;
        }
    };
    if !shared.sessions.uid_allowed(uid) {
        warn!(
            uid,
            pid, "refused connection: uid is not allowed (not the daemon's, not bound to an agent)"
        );
        drop(sock);
        return;
    }
    let kick = Arc::new(Notify::new());
    let (id, evict) = {
        let mut t = shared.conns.lock().expect("conn table");
        if t.live.len() >= shared.cfg.max_connections {
            drop(t);
            warn!(
                uid,
                pid,
                "refused connection: {} connections open (max_connections)",
                shared.cfg.max_connections
            );
            tokio::spawn(refuse(
                sock,
                ErrorCode::Busy,
                "agentkeysd is at its connection limit; try again shortly",
            ));
            return;
        }
        t.next_id += 1;
        let id = t.next_id;
        t.live.insert(
            id,
            ConnEntry {
                principal: None,
                uid,
                kick: kick.clone(),
            },
        );
        t.pending.push_back(id);
        let mut evict = None;
        if t.pending.len() > shared.cfg.max_pending
            && let Some(old) = t.pending.pop_front()
        {
            evict = t.live.get(&old).map(|e| e.kick.clone());
        }
        (id, evict)
    };
    if let Some(k) = evict {
        debug!("closing the oldest connection that has not said hello (max_pending)");
        k.notify_one();
    }
    debug!(conn = id, uid, pid, "accepted");
    let shared = shared.clone();
    tokio::spawn(async move {
        crate::connection::run(Conn::new(sock), &shared, id, uid, pid, kick).await;
        shared.closed(id);
    });
}
