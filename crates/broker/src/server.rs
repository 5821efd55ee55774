//! The listener (after mini-redis `server.rs`): accept, check the peer's uid before reading a
//! byte, enforce the connection caps, hand each connection to [`crate::connection`], and shut
//! down on request.
//!
//! Caps: at most `max_connections` open; at most `max_pending` that have not authenticated.
//! When the pending set is full the *oldest* pending connection is closed, so a client that
//! opens idle connections cannot lock out one that says hello promptly.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentkeys_hardening::page::PagePolicy;
use agentkeys_proto::conn::Conn;
use agentkeys_proto::wire::{self, ErrorCode, PROTOCOL_VERSION, Response, ResponseBody};
use agentkeys_state::StateError;
use agentkeys_state::audit::Event;
use agentkeys_state::home::Home;
use agentkeys_state::vault::{VaultIndex, vault_stamp};
use tokio::sync::{Notify, watch};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tracing::{debug, error, info, warn};

use crate::cache::{Cache, EvictReason};
use crate::config::DaemonConfig;
use crate::keys::KeyPage;
use crate::sessions::{Principal, Sessions};

/// State shared by every connection.
pub struct Shared {
    /// State directory.
    pub home: Home,
    /// Sessions and agents.
    pub sessions: Sessions,
    /// The DEK.
    pub key: KeyPage,
    /// Settings.
    pub cfg: DaemonConfig,
    /// Start time, for `status`.
    pub started: Instant,
    /// Open connections.
    pub conns: Mutex<ConnTable>,
    /// Set to true to stop the daemon.
    pub shutdown: watch::Sender<bool>,
    /// How the DEK and keystore are held, for the self-test.
    pub keystore_detail: String,
    /// Cached credentials (services with a cache_ttl only).
    pub cache: Cache,
    /// The audit trail (group commit); a delivery whose record cannot be written does not
    /// happen, and none is answered before its record is on disk (see [`crate::auditor`]).
    pub audit: Arc<crate::auditor::Auditor>,
    /// The parsed vault, re-read when its file changes.
    pub vault: Mutex<Option<Arc<VaultIndex>>>,
    /// The launcher, once the runtime runs (`run` is refused before).
    pub launcher: std::sync::OnceLock<Arc<crate::launch::LauncherLink>>,
    /// Pending approval requests and grants for high-value services.
    pub approvals: Mutex<crate::approvals::Approvals>,
    /// Remote backends (OpenBao / Vault) and the services mapped onto them.
    pub backends: crate::backends::Backends,
}

/// One open connection, as the server sees it.
pub struct ConnEntry {
    /// Set after hello.
    pub principal: Option<Principal>,
    /// Notified to make the connection close (revoked agent, evicted pending, shutdown).
    pub kick: Arc<Notify>,
}

/// The open connections.
#[derive(Default)]
pub struct ConnTable {
    next_id: u64,
    live: HashMap<u64, ConnEntry>,
    pending: VecDeque<u64>,
}

impl ConnTable {
    /// Number of open connections.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True when no connection is open.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

impl Shared {
    /// Writes an audit record; the error message is for the client of a refused delivery.
    ///
    /// Inside a request (see [`crate::auditor::collect_async`]) the record is written now and made
    /// durable before the request's answer is sent; elsewhere this returns once it is on disk.
    ///
    /// # Errors
    /// The record could not be written (fail closed: the caller must not deliver).
    pub fn audit(&self, ev: &Event<'_>) -> Result<(), String> {
        self.audit
            .append(ev, crate::auditor::Need::Durable)
            .map_err(|e| {
                error!("AUDIT WRITE FAILED, refusing deliveries until it works again: {e}");
                format!("the audit log cannot be written ({e}); delivery refused")
            })
    }

    /// Writes an audit record for an event that happens whatever the log says (a denial, an
    /// eviction, a `drop` after the answer is out); a failure is logged loudly. Nothing waits
    /// for it outside a request: the syncer makes it durable within
    /// [`crate::auditor::LAZY_SYNC`].
    pub fn audit_best_effort(&self, ev: &Event<'_>) {
        if let Err(e) = self.audit.append(ev, crate::auditor::Need::Lazy) {
            error!("AUDIT WRITE FAILED, refusing deliveries until it works again: {e}");
        }
    }

    /// Waits until every audit record up to `ticket` (from [`crate::auditor::collect_async`]) is on
    /// disk; the error message is for the client whose answer is then withheld.
    ///
    /// # Errors
    /// The sync failed: the answer must not be sent.
    pub async fn audit_durable(&self, ticket: u64) -> Result<(), String> {
        self.audit.durable(ticket).await.map_err(|e| {
            error!("AUDIT SYNC FAILED, refusing deliveries: {e}");
            format!("the audit log cannot be written ({e}); delivery refused")
        })
    }

    /// The secret-page policy: memfd_secret, with or without the degraded fallback.
    pub fn page_policy(&self) -> PagePolicy {
        if self.cfg.require_secretmem {
            PagePolicy::RequireSecret
        } else {
            PagePolicy::PreferSecret
        }
    }

    /// The vault as it is now on disk: re-read when its file changed, which also empties the
    /// cache (a cached value may have been replaced or deleted).
    ///
    /// # Errors
    /// The vault cannot be read.
    pub fn vault_index(&self) -> Result<Arc<VaultIndex>, StateError> {
        let stamp = vault_stamp(&self.home);
        let mut slot = self.vault.lock().expect("vault lock");
        if let Some(v) = slot.as_ref()
            && v.stamp() == stamp
        {
            return Ok(v.clone());
        }
        let fresh = Arc::new(VaultIndex::read(&self.home)?);
        let changed = slot.is_some();
        *slot = Some(fresh.clone());
        drop(slot);
        if changed {
            self.evicted(self.cache.clear(EvictReason::VaultChanged));
        }
        Ok(fresh)
    }

    /// Audits cache evictions.
    fn evicted(&self, gone: Vec<(String, EvictReason)>) {
        for (service, reason) in gone {
            info!(service, reason = reason.as_str(), "evicted cached secret");
            self.audit_best_effort(&Event {
                event: "evict",
                agent: None,
                service: Some(&service),
                delivery: None,
                degraded: false,
                peer: None,
                outcome: "ok",
                detail: Some(reason.as_str()),
            });
        }
    }

    /// Evicts idle and expired cache entries (called every second).
    pub fn sweep_cache(&self) {
        if !self.cache.is_empty() {
            // A vault change (a value replaced or deleted by the owner) empties the cache now,
            // not only at the next request that reads the vault.
            if let Err(e) = self.vault_index() {
                warn!("checking the vault for changes failed: {e}");
            }
            self.evicted(self.cache.sweep(self.cfg.idle_ttl));
        }
    }

    /// A high-value service: `Ok` when a grant covers this request (audited `grant_used`),
    /// else the answer to send: `pending` with a code (audited `pending`), or a refusal after
    /// the owner denied it (audited `deny`). `run` is (argv SHA-256, command line).
    pub fn high_value(
        &self,
        agent: &str,
        peer: agentkeys_state::audit::Peer,
        service: &str,
        run: Option<(&str, &str)>,
    ) -> Result<(), agentkeys_proto::wire::ResponseBody> {
        use crate::approvals::{Check, Subject};
        use agentkeys_proto::wire::{ErrorCode, ResponseBody};
        let subject = Subject {
            agent: agent.to_string(),
            service: service.to_string(),
            argv: run.map(|(h, _)| h.to_string()),
        };
        let detail = run.map(|(h, _)| format!("request_sha256={h}"));
        fn ev<'a>(
            event: &'a str,
            outcome: &'a str,
            detail: Option<&'a str>,
            agent: &'a str,
            service: &'a str,
            peer: agentkeys_state::audit::Peer,
        ) -> Event<'a> {
            Event {
                event,
                agent: Some(agent),
                service: Some(service),
                delivery: None,
                degraded: false,
                peer: Some(peer),
                outcome,
                detail,
            }
        }
        let check = self
            .approvals
            .lock()
            .expect("approvals")
            .check(&subject, run.map(|(_, c)| c.to_string()));
        match check {
            Check::Granted { consumed } => {
                let d = format!(
                    "{}{}",
                    if consumed { "once" } else { "window" },
                    detail
                        .as_deref()
                        .map(|d| format!(" {d}"))
                        .unwrap_or_default()
                );
                self.audit(&ev("grant_used", "ok", Some(&d), agent, service, peer))
                    .map_err(|e| ResponseBody::Error {
                        code: ErrorCode::Internal,
                        message: e,
                    })
            }
            Check::Full => {
                self.audit_best_effort(&ev(
                    "deny",
                    "denied",
                    Some("too many open approval requests"),
                    agent,
                    service,
                    peer,
                ));
                Err(ResponseBody::Error {
                    code: ErrorCode::Busy,
                    message: "too many approval requests are open; wait for the owner to decide or for them to expire".into(),
                })
            }
            Check::Denied => {
                self.audit_best_effort(&ev(
                    "deny",
                    "denied",
                    Some("denied by the owner"),
                    agent,
                    service,
                    peer,
                ));
                Err(ResponseBody::Error {
                    code: ErrorCode::Forbidden,
                    message: format!("the owner denied this request for {service:?}"),
                })
            }
            Check::Pending {
                code,
                expires_in,
                new,
            } => {
                if new {
                    self.audit_best_effort(&ev(
                        "pending",
                        "pending",
                        detail.as_deref(),
                        agent,
                        service,
                        peer,
                    ));
                }
                Err(ResponseBody::Pending {
                    message: format!(
                        "{service:?} is high-value: a human must approve this request. The owner runs `agentkeys approve {code}` (or `agentkeys deny {code}`); it expires in {expires_in} s."
                    ),
                    code,
                    service: service.to_string(),
                    expires_in_secs: expires_in,
                })
            }
        }
    }

    /// Expires old approval requests (audited `expired`).
    pub fn sweep_approvals(&self) {
        let gone = {
            let mut a = self.approvals.lock().expect("approvals");
            a.sweep();
            a.take_expired()
        };
        for subject in gone {
            self.audit_best_effort(&Event {
                event: "expired",
                agent: Some(&subject.agent),
                service: Some(&subject.service),
                delivery: None,
                degraded: false,
                peer: None,
                outcome: "ok",
                detail: Some("approval request expired"),
            });
        }
    }

    /// Wipes the whole cache (shutdown).
    pub fn clear_cache(&self) {
        self.evicted(self.cache.clear(EvictReason::Shutdown));
    }

    /// Marks a connection authenticated.
    pub fn authenticated(&self, id: u64, p: Principal) {
        let mut t = self.conns.lock().expect("conn table");
        t.pending.retain(|&x| x != id);
        if let Some(e) = t.live.get_mut(&id) {
            e.principal = Some(p);
        }
    }

    /// Removes a closed connection.
    pub fn closed(&self, id: u64) {
        let mut t = self.conns.lock().expect("conn table");
        t.pending.retain(|&x| x != id);
        t.live.remove(&id);
    }

    /// Re-reads state files if they changed and closes connections whose agent is no longer
    /// valid. Called periodically and on `reload`.
    pub fn refresh(&self) {
        match self.sessions.refresh(&self.key) {
            Ok(changed) if changed.owner || changed.agents => self.kick_invalid(changed.owner),
            Ok(_) => {}
            Err(e) => warn!("state changed but could not be reloaded (keeping the old view): {e}"),
        }
    }

    /// Closes connections whose session is no longer valid; with `owner_changed` (a new owner
    /// session from `init --force`), every owner connection, since they used the old token.
    fn kick_invalid(&self, owner_changed: bool) {
        let t = self.conns.lock().expect("conn table");
        for (id, e) in &t.live {
            if let Some(p) = &e.principal
                && ((owner_changed && *p == Principal::Owner) || self.sessions.check(p).is_err())
            {
                info!(conn = id, principal = ?p, "closing connection: session no longer valid");
                e.kick.notify_one();
            }
        }
    }
}

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
    let t = shared.conns.lock().expect("conn table");
    for e in t.live.values() {
        e.kick.notify_one();
    }
    drop(t);
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
