//! One client connection: a hello within the handshake timeout, then requests until the client
//! leaves, its session stops being valid, or the daemon shuts down.
//!
//! Bad input never ends the daemon and never the connection of an authenticated client: an
//! oversized packet, unexpected fds, malformed JSON or an unknown kind each get an error
//! response. Before authentication, any of those closes the connection.

use std::sync::Arc;

use agentkeys_hardening::selftest::{Report, Status as ItemStatus};
use agentkeys_proto::conn::{Conn, RecvError};
use agentkeys_proto::wire::{
    self, ErrorCode, PROTOCOL_VERSION, Request, RequestBody, Response, ResponseBody, ServiceInfo,
};
use agentkeys_state::audit::{Event, Peer};
use std::os::fd::AsFd;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::delivery::AfterSend;
use crate::sessions::{AuthError, Principal};
use crate::shared::Shared;

/// How long a pending connection evicted by `max_pending` may still deliver a hello that is
/// already on its way.
const KICK_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// What a request handler decided.
pub(crate) struct Reply {
    pub(crate) body: ResponseBody,
    /// Close the connection after sending.
    pub(crate) close: bool,
    /// An fd to attach and audit to write once the answer is out.
    pub(crate) after: Option<AfterSend>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> ResponseBody {
    ResponseBody::Error {
        code,
        message: message.into(),
    }
}

/// The wire code for a session that is no longer valid.
pub(crate) fn auth_code(e: &AuthError) -> ErrorCode {
    match e {
        AuthError::Unknown | AuthError::WrongUid(_) | AuthError::WrongLink(_) => {
            ErrorCode::Unauthenticated
        }
        AuthError::Revoked(_) | AuthError::Replaced(_) | AuthError::JailEnded(_) => {
            ErrorCode::Revoked
        }
        AuthError::Expired(..) => ErrorCode::Expired,
    }
}

/// The answer for a session that is no longer valid.
fn auth_error(e: &AuthError) -> ResponseBody {
    let code = auth_code(e);
    error(code, e.to_string())
}

async fn send(conn: &Conn, id: u64, body: ResponseBody) -> bool {
    send_with(conn, id, body, &[]).await
}

async fn send_with(
    conn: &Conn,
    id: u64,
    body: ResponseBody,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> bool {
    match wire::encode(&Response {
        v: PROTOCOL_VERSION,
        id,
        body,
    }) {
        Ok(bytes) => conn.send(&bytes, fds).await.is_ok(),
        Err(e) => {
            warn!("encoding a response failed: {e}");
            false
        }
    }
}

/// Turns a receive into a request, or the error response to send instead.
fn parse(
    r: Result<agentkeys_proto::conn::Packet, RecvError>,
) -> Result<(Request, Vec<std::os::fd::OwnedFd>), Option<ResponseBody>> {
    let packet = match r {
        Ok(p) => p,
        Err(RecvError::Closed) | Err(RecvError::Io(_)) => return Err(None),
        Err(RecvError::TooLarge) => {
            return Err(Some(error(
                ErrorCode::TooLarge,
                format!("message exceeds {} bytes", wire::MAX_MESSAGE_BYTES),
            )));
        }
        Err(RecvError::TooManyFds) => {
            return Err(Some(error(
                ErrorCode::UnexpectedFd,
                "too many file descriptors on one message",
            )));
        }
    };
    let req =
        wire::decode_request(&packet.data).map_err(|e| Some(error(e.code(), e.to_string())))?;
    // Only `run` takes descriptors (the caller's stdio); anything else carrying some is
    // refused and they are closed.
    // `jail_start` takes one: the user namespace for the jail's runs.
    let takes_fds = match req.body {
        RequestBody::Run { .. } => true,
        RequestBody::JailStart { .. } => packet.fds.len() <= 1,
        _ => false,
    };
    if !packet.fds.is_empty() && !takes_fds {
        return Err(Some(error(
            ErrorCode::UnexpectedFd,
            "this request takes no file descriptors",
        )));
    }
    Ok((req, packet.fds))
}

/// Serves one connection to the end.
pub async fn run(
    mut conn: Conn,
    shared: &Arc<Shared>,
    id: u64,
    uid: u32,
    pid: i32,
    kick: Arc<Notify>,
) {
    let mut stop = shared.shutdown.subscribe();
    // Handshake: the first message must be a hello, within the timeout.
    // `biased`, receive first: a client evicted as the oldest pending connection (max_pending)
    // whose hello is already queued is served, not dropped. Only silent connections go; a
    // burst of clients connecting at once, slower to be scheduled than to be accepted, used
    // to lose some of theirs (tests/hostile.rs `a_burst_of_clients_saying_hello_at_once_is_served`).
    let first = tokio::select! {
        biased;
        r = tokio::time::timeout(shared.cfg.handshake_timeout, conn.recv()) => match r {
            Ok(r) => r,
            Err(_) => {
                debug!(conn = id, "closing: no hello within the handshake timeout");
                return;
            }
        },
        // Evicted as the oldest pending connection: its hello may be queued already without
        // the reactor having reported it yet (a new socket's first poll knows no readiness),
        // so it gets a short grace to be read. Silent connections still go.
        _ = kick.notified() => match tokio::time::timeout(KICK_GRACE, conn.recv()).await {
            Ok(r) => r,
            Err(_) => return,
        },
        _ = stop.changed() => return,
    };
    let req = match parse(first) {
        Ok((r, _)) => r,
        Err(Some(body)) => {
            send(&conn, 0, body).await;
            return;
        }
        Err(None) => return,
    };
    let principal =
        match req.body {
            RequestBody::Hello { token } => match shared
                .sessions
                .authenticate(&token.0, uid)
                .or_else(|e| match e {
                    // A token minted a moment ago (`init --force`, `agent add`) may be newer than the
                    // last reload: re-check the state files (a stat each) and try once more.
                    AuthError::Unknown => {
                        shared.refresh();
                        shared.sessions.authenticate(&token.0, uid)
                    }
                    other => Err(other),
                }) {
                Ok(p) => p,
                Err(e) => {
                    warn!(conn = id, uid, pid, "hello refused: {e}");
                    send(&conn, req.id, auth_error(&e)).await;
                    return;
                }
            },
            _ => {
                send(
                    &conn,
                    req.id,
                    error(
                        ErrorCode::Unauthenticated,
                        "the first message must be a hello with a session token",
                    ),
                )
                .await;
                return;
            }
        };
    // A kick stored while the hello waited in the queue can only be the max_pending eviction
    // (revocations kick only authenticated connections; shutdown also signals `stop`): this
    // client said hello in time, so the kick is discarded instead of closing its new session.
    let _ = tokio::time::timeout(std::time::Duration::ZERO, kick.notified()).await;
    info!(conn = id, uid, pid, principal = ?principal, "session opened");
    shared.authenticated(id, principal.clone());
    // The jails this connection starts end when it closes, however it closes.
    let _jails = JailGuard {
        shared: shared.clone(),
        owner: principal.clone(),
        peer: Peer::local(uid, pid),
        conn: id,
    };
    if !send(
        &conn,
        req.id,
        ResponseBody::Welcome(Box::new(shared.sessions.info(&principal))),
    )
    .await
    {
        return;
    }
    loop {
        let r = tokio::select! {
            r = conn.recv() => r,
            _ = kick.notified() => {
                if let Err(e) = shared.sessions.check(&principal, Some(uid)) {
                    send(&conn, 0, auth_error(&e)).await;
                    return;
                }
                // A jail this connection started has ended (its agent revoked, its TTL):
                // tell `agentkeys jail`, which stops the jail, and close.
                if let Some((jail, why)) = crate::jail::ended_jail(shared, id) {
                    send(&conn, 0, error(ErrorCode::Revoked, format!("jail {jail} ended: {why}"))).await;
                    return;
                }
                if principal.is_owner() && !*stop.borrow() && shared.sessions.check(&principal, Some(uid)).is_ok() {
                    // A kick meant for others (the owner's own session is fine): stay.
                    continue;
                }
                return;
            }
            _ = stop.changed() => return,
        };
        let (req, fds) = match parse(r) {
            Ok(r) => r,
            Err(Some(body)) => {
                if !send(&conn, 0, body).await {
                    return;
                }
                continue;
            }
            Err(None) => return,
        };
        // Revocation, expiry and replacement take effect on the next request at the latest
        // (the one-second tick closes idle connections of ended sessions).
        shared.refresh();
        if let Err(e) = shared.sessions.check(&principal, Some(uid)) {
            send(&conn, req.id, auth_error(&e)).await;
            return;
        }
        let peer = Peer::local(uid, pid);
        match &req.body {
            RequestBody::JailStart { .. } | RequestBody::JailExit { .. } => {
                let (body, ticket) = crate::auditor::collect_async(async {
                    match req.body {
                        RequestBody::JailStart {
                            agent,
                            ttl_secs,
                            policy,
                            proxy,
                        } => {
                            crate::jail::start(
                                shared,
                                &principal,
                                peer,
                                id,
                                crate::jail::StartRequest {
                                    agent: &agent,
                                    ttl_secs,
                                    policy,
                                    proxy: &proxy,
                                },
                                fds.into_iter().next(),
                            )
                            .await
                        }
                        RequestBody::JailExit { jail, code, signal } => {
                            crate::jail::exit(shared, &principal, peer, id, &jail, code, signal)
                        }
                        _ => error(ErrorCode::Internal, "unreachable"),
                    }
                })
                .await;
                let body = match shared.audit_durable(ticket).await {
                    Ok(()) => body,
                    Err(message) => error(ErrorCode::Internal, message),
                };
                if !send(&conn, req.id, body).await {
                    return;
                }
                continue;
            }
            _ => {}
        }
        if let RequestBody::Run {
            argv,
            env,
            files,
            proxy,
            caller_env,
            cwd,
            masking,
            umask,
        } = req.body
        {
            let run_req = crate::run::RunRequest {
                argv,
                env,
                files,
                proxy,
                caller_env,
                cwd,
                masking,
                umask,
            };
            if !serve_run(
                &mut conn, shared, &principal, peer, req.id, run_req, fds, &mut stop, &kick,
            )
            .await
            {
                return;
            }
            continue;
        }
        let (mut reply, ticket) =
            crate::auditor::collect_async(handle(shared, &principal, peer, req.body)).await;
        // Group commit: the request's audit records are on disk before its answer leaves.
        if let Err(message) = shared.audit_durable(ticket).await {
            reply = Reply {
                body: error(ErrorCode::Internal, message),
                close: reply.close,
                after: reply.after.map(|a| AfterSend { fd: None, ..a }),
            };
        }
        let sent = match &reply.after {
            Some(AfterSend { fd: Some(fd), .. }) => {
                send_with(&conn, req.id, reply.body, &[fd.as_fd()]).await
            }
            _ => send(&conn, req.id, reply.body).await,
        };
        if let Some(after) = reply.after {
            // The daemon's copy of a delivered page goes now; the receiver holds the memory.
            drop(after.fd);
            if let Some((service, delivery)) = after.drop {
                shared.audit_best_effort(&Event {
                    event: "drop",
                    who: Some(principal.who()),
                    service: Some(&service),
                    delivery: Some(delivery),
                    degraded: false,
                    peer: Some(peer),
                    outcome: if sent { "ok" } else { "error" },
                    detail: if sent {
                        None
                    } else {
                        Some("the answer could not be sent")
                    },
                });
            }
        }
        if !sent || reply.close {
            return;
        }
    }
}

/// Ends the jails of a connection when it closes.
struct JailGuard {
    shared: Arc<Shared>,
    owner: Principal,
    peer: Peer,
    conn: u64,
}

impl Drop for JailGuard {
    fn drop(&mut self) {
        if self.owner.is_owner() {
            crate::jail::connection_closed(&self.shared, &self.owner, self.peer, self.conn);
        }
    }
}

/// One `run`: start it, answer `run_started`, forward `signal` requests while it runs, then
/// answer `run_exit`. Returns false when the connection is finished.
///
/// The run is stopped (`stop`: SIGTERM to all of it, SIGKILL after `kill_grace`) when the
/// caller goes away, when its session ends (the connection then closes once the run is over),
/// or when the daemon shuts down; `run_exit` says why.
#[allow(clippy::too_many_arguments)]
async fn serve_run(
    conn: &mut Conn,
    shared: &Arc<Shared>,
    principal: &Principal,
    peer: Peer,
    id: u64,
    req: crate::run::RunRequest,
    fds: Vec<std::os::fd::OwnedFd>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    kick: &Notify,
) -> bool {
    use crate::run::StopReason;
    // The run's records are made durable inside `start`, before it launches (group commit).
    // A refusal (pending, denied, not found) is answered only once its records are on disk;
    // the `drop` records written after a launch need not hold up `run_started`.
    let (started, ticket) =
        crate::auditor::collect_async(crate::run::start(shared, principal, peer, req, fds)).await;
    let mut running = match started {
        Ok(r) => r,
        Err(body) => {
            let body = match shared.audit_durable(ticket).await {
                Ok(()) => body,
                Err(message) => error(ErrorCode::Internal, message),
            };
            return send(conn, id, body).await;
        }
    };
    // Held until the caller has its answer: shutdown waits for it.
    let _active = running.active.take();
    let mut stopped: Option<StopReason> = None;
    let mut caller_gone = false;
    let mut session_ended = false;
    let mut output_stalled = false;
    if !send(conn, id, ResponseBody::RunStarted { pid: running.pid }).await {
        // The caller is gone: its program goes too.
        caller_gone = true;
        stop_run(shared, &running, &mut stopped, StopReason::CallerGone).await;
    }
    if *stop.borrow() {
        stop_run(shared, &running, &mut stopped, StopReason::Shutdown).await;
    }
    let exit = loop {
        tokio::select! {
            ex = &mut running.exited => break ex.ok(),
            // The caller has not read the program's output for `output_timeout`: the pump
            // gave its fd up and drains, so the program is not blocked, but nobody sees its
            // output any more and the run would hold its tables and this connection forever.
            stalled = running.stalls.next(), if !output_stalled => {
                output_stalled = true;
                warn!(principal = ?principal, stream = stalled.stream, "the caller stopped reading the program's output: stopping the program");
                let detail = format!(
                    "{}: no write progress for {}s; program stopped",
                    stalled.stream,
                    stalled.after.as_secs()
                );
                shared.audit_best_effort(&Event {
                    event: "output_stalled",
                    who: Some(principal.who()),
                    service: None,
                    delivery: None,
                    degraded: false,
                    peer: Some(peer),
                    outcome: "error",
                    detail: Some(&detail),
                });
                stop_run(shared, &running, &mut stopped, StopReason::OutputStalled).await;
            }
            // The session ended mid-run (agent revoked, expired or replaced, a new owner
            // session): the run stops, then the connection closes. Shutdown kicks every
            // connection too; that is `stop` below.
            _ = kick.notified(), if !session_ended => {
                let reason = match shared.sessions.check(principal, Some(peer.uid)) {
                    Err(AuthError::Revoked(_)) => Some(StopReason::Revoked),
                    Err(_) => Some(StopReason::SessionEnded),
                    Ok(()) if *stop.borrow() => None,
                    Ok(()) => Some(StopReason::SessionEnded),
                };
                if let Some(reason) = reason {
                    session_ended = true;
                    warn!(principal = ?principal, "session ended during a run: stopping the program");
                    stop_run(shared, &running, &mut stopped, reason).await;
                }
            }
            r = conn.recv(), if !caller_gone => match parse(r) {
                Ok((Request { body: RequestBody::Signal { signal }, .. }, _)) => {
                    if let Some(l) = shared.launcher.get() {
                        l.signal(running.id, signal).await;
                    }
                }
                Ok((other, _)) => {
                    let _ = send(conn, other.id, error(ErrorCode::BadRequest, "a run is in progress on this connection: only `signal` is accepted until it ends")).await;
                }
                Err(Some(body)) => {
                    let _ = send(conn, 0, body).await;
                }
                Err(None) => {
                    // The caller went away (an agent harness killed the CLI): end the run.
                    caller_gone = true;
                    stop_run(shared, &running, &mut stopped, StopReason::CallerGone).await;
                }
            },
            r = stop.changed(), if stopped.is_none() => {
                if r.is_err() || *stop.borrow() {
                    stop_run(shared, &running, &mut stopped, StopReason::Shutdown).await;
                }
            }
        }
    };
    let body = crate::run::finish(shared, principal, peer, running, exit, stopped).await;
    if session_ended {
        if let Err(e) = shared.sessions.check(principal, Some(peer.uid)) {
            send(conn, id, auth_error(&e)).await;
        }
        return false;
    }
    // After a shutdown the caller gets its answer, then the connection closes.
    !caller_gone && send(conn, id, body).await && stopped != Some(StopReason::Shutdown)
}

/// Asks the launcher to stop the run, once; the first reason is the one recorded.
async fn stop_run(
    shared: &Shared,
    running: &crate::run::Running,
    stopped: &mut Option<crate::run::StopReason>,
    reason: crate::run::StopReason,
) {
    if stopped.is_some() {
        return;
    }
    *stopped = Some(reason);
    info!(reason = reason.as_str(), "stopping a run");
    if let Some(l) = shared.launcher.get() {
        l.stop(running.id).await;
    }
}

fn owner_only(p: &Principal) -> Option<Reply> {
    (!p.is_owner()).then(|| Reply {
        body: error(ErrorCode::Forbidden, "only the owner may do this"),
        close: false,
        after: None,
    })
}

/// One request other than `run` (the unix socket's loop, and `listen` for network principals).
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    p: &Principal,
    peer: Peer,
    body: RequestBody,
) -> Reply {
    let ok = |body| Reply {
        body,
        close: false,
        after: None,
    };
    match body {
        RequestBody::Hello { .. } => ok(error(
            ErrorCode::BadRequest,
            "this connection is already authenticated",
        )),
        RequestBody::Whoami {} => ok(ResponseBody::Whoami(Box::new(shared.sessions.info(p)))),
        RequestBody::Status {} => ok(ResponseBody::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_secs: shared.started.elapsed().as_secs(),
            connections: shared.conns.lock().expect("conn table").len(),
        }),
        RequestBody::SelfTest {} => owner_only(p).unwrap_or_else(|| ok(self_test(shared))),
        RequestBody::Reload {} => owner_only(p).unwrap_or_else(|| {
            shared.refresh();
            ok(ResponseBody::Done)
        }),
        RequestBody::Shutdown {} => owner_only(p).unwrap_or_else(|| {
            info!("shutdown requested by the owner");
            let _ = shared.shutdown.send(true);
            Reply {
                body: ResponseBody::Done,
                close: true,
                after: None,
            }
        }),
        RequestBody::ListServices {} => ok(list_services(shared, p)),
        RequestBody::ListPending {} => owner_only(p).unwrap_or_else(|| ok(list_pending(shared))),
        RequestBody::Approve { code, for_secs } => {
            ok(decide(shared, p, peer, &code, Some(for_secs)))
        }
        RequestBody::Deny { code } => ok(decide(shared, p, peer, &code, None)),
        RequestBody::ListGrants {} => owner_only(p).unwrap_or_else(|| ok(list_grants(shared))),
        RequestBody::RevokeGrants { id, agent, all } => {
            owner_only(p).unwrap_or_else(|| ok(revoke_grants(shared, peer, id, agent, all)))
        }
        RequestBody::Run { .. } | RequestBody::JailStart { .. } | RequestBody::JailExit { .. } => {
            ok(error(ErrorCode::Internal, "served by the connection loop"))
        }
        RequestBody::Signal { .. } => ok(error(
            ErrorCode::BadRequest,
            "no program is running on this connection",
        )),
        RequestBody::GetCredential {
            service, inline, ..
        } => {
            let d = crate::delivery::get_credential(shared, p, peer, &service, inline).await;
            Reply {
                body: d.body,
                close: false,
                after: Some(d.after),
            }
        }
    }
}

fn list_pending(shared: &Shared) -> ResponseBody {
    let requests = shared
        .with_approvals(None, |a| a.list())
        .into_iter()
        .map(|l| agentkeys_proto::wire::PendingInfo {
            code: l.code,
            role: l.subject.principal.role(),
            agent: l.subject.principal.agent_name().map(str::to_string),
            session: l.subject.principal.session_id().to_string(),
            service: l.subject.service,
            command: l.command,
            age_secs: l.age.as_secs(),
            expires_in_secs: l.left.as_secs(),
        })
        .collect();
    ResponseBody::PendingList { requests }
}

fn list_grants(shared: &Shared) -> ResponseBody {
    let grants = shared
        .with_approvals(None, |a| a.grants())
        .into_iter()
        .map(|g| agentkeys_proto::wire::GrantInfo {
            id: g.id,
            role: g.subject.principal.role(),
            agent: g.subject.principal.agent_name().map(str::to_string),
            session: g.subject.principal.session_id().to_string(),
            service: g.subject.service,
            command: g.command,
            once: g.once,
            age_secs: g.age.as_secs(),
            expires_in_secs: g.left.as_secs(),
        })
        .collect();
    ResponseBody::GrantList { grants }
}

/// `agentkeys grants revoke`: the owner withdraws one grant, an agent's, or all; each is
/// audited `grant_revoked` (`by the owner`).
fn revoke_grants(
    shared: &Shared,
    peer: Peer,
    id: Option<String>,
    agent: Option<String>,
    all: bool,
) -> ResponseBody {
    use crate::approvals::Withdraw;
    let which = match (id.as_deref(), agent.as_deref(), all) {
        (Some(id), None, false) => Withdraw::One(id),
        (None, Some(name), false) => Withdraw::Agent(name),
        (None, None, true) => Withdraw::All,
        _ => {
            return error(
                ErrorCode::BadRequest,
                "name exactly one of: a grant id, an agent, or all",
            );
        }
    };
    let count = shared.with_approvals(Some(peer), |a| a.revoke(which));
    if count == 0 && matches!(which, Withdraw::One(_)) {
        return error(
            ErrorCode::NotFound,
            "no live grant has that id (see `agentkeys grants`)",
        );
    }
    ResponseBody::GrantsRevoked { count }
}

/// `approve` (`approve: Some(window)`) or `deny` (`None`): only the owner decides; an agent's
/// attempt is refused and audited, as are wrong codes.
fn decide(
    shared: &Shared,
    p: &Principal,
    peer: Peer,
    code: &str,
    approve: Option<Option<u64>>,
) -> ResponseBody {
    use crate::approvals::DecideError;
    let event = if approve.is_some() { "approve" } else { "deny" };
    let ev = |service, outcome, detail| Event {
        event,
        who: Some(p.who()),
        service,
        delivery: None,
        degraded: false,
        peer: Some(peer),
        outcome,
        detail,
    };
    if !p.is_owner() {
        shared.audit_best_effort(&ev(
            None,
            "denied",
            Some("only the owner decides approval requests"),
        ));
        return error(
            ErrorCode::Forbidden,
            "only the owner may approve or deny requests",
        );
    }
    let result = shared.with_approvals(None, |a| match approve {
        Some(window) => a
            .approve(code, window.map(std::time::Duration::from_secs))
            .map(|(s, g)| (s, Some(g))),
        None => a.deny(code).map(|s| (s, None)),
    });
    match result {
        Ok((subject, grant)) => {
            let whom = subject.principal.label();
            let grant = grant.map(|g| format!("{g} ")).unwrap_or_default();
            let detail = match approve {
                Some(Some(secs)) => format!("{grant}for {whom} for {secs} s"),
                Some(None) => format!("{grant}for {whom} once"),
                None => format!("for {whom}"),
            };
            shared.audit_best_effort(&ev(Some(&subject.service), "ok", Some(&detail)));
            ResponseBody::Done
        }
        Err(e) => {
            let (code, message, detail) = match e {
                DecideError::UnknownCode => (
                    ErrorCode::NotFound,
                    "no open request has that code (wrong, expired, or already decided)",
                    "unknown code",
                ),
                DecideError::RateLimited => (
                    ErrorCode::Busy,
                    "too many wrong codes in the last minute; wait and try again",
                    "rate limited",
                ),
            };
            shared.audit_best_effort(&ev(None, "error", Some(detail)));
            error(code, message)
        }
    }
}

/// The daemon's own report, made inside its sandbox, plus what only the daemon knows.
pub fn daemon_report(shared: &Shared) -> Report {
    let mut r = Report::for_current_process_with(
        "agentkeysd",
        agentkeys_hardening::selftest::Role::Daemon,
        shared.cfg.requirements(),
    );
    r.push(
        "keystore",
        keystore_status(&shared.keystore_detail),
        shared.keystore_detail.clone(),
    );
    let (backing, pkey) = shared.key.describe();
    let status = if backing.is_degraded() {
        ItemStatus::Degraded
    } else {
        ItemStatus::Ok
    };
    r.push(
        "key_page",
        status,
        format!(
            "DEK in {backing}{}",
            if pkey {
                ", pkey-protected"
            } else {
                ", no pkey"
            }
        ),
    );
    // Remote backends: degraded while the daemon holds no usable token for one.
    for (name, ok, detail) in shared.backends.health() {
        let status = if ok {
            ItemStatus::Ok
        } else {
            ItemStatus::Degraded
        };
        r.push(&format!("backend_{name}"), status, detail);
    }
    r
}

/// A key file is weaker than an OS keyring: reported as degraded.
pub fn keystore_status(detail: &str) -> ItemStatus {
    if detail.contains("key file") {
        ItemStatus::Degraded
    } else {
        ItemStatus::Ok
    }
}

fn self_test(shared: &Shared) -> ResponseBody {
    match serde_json::to_value(daemon_report(shared)) {
        Ok(report) => ResponseBody::SelfTest { report },
        Err(e) => error(ErrorCode::Internal, format!("encoding the report: {e}")),
    }
}

fn list_services(shared: &Shared, p: &Principal) -> ResponseBody {
    let index = match shared.vault_index() {
        Ok(i) => i,
        Err(e) => {
            warn!("reading the vault failed: {e}");
            return error(
                ErrorCode::Internal,
                "the vault could not be read; see the daemon log",
            );
        }
    };
    // Remote services shadow local entries of the same name (see `backends`).
    let mut services: Vec<ServiceInfo> = index
        .list()
        .into_iter()
        .filter(|m| shared.backends.service(&m.service).is_none())
        .map(|m| ServiceInfo {
            name: m.service,
            high_value: m.policy.high_value,
            cache_ttl_secs: m.policy.cache_ttl_secs,
            allow_inline: m.policy.allow_inline,
            backend: None,
            deliver: m.policy.deliver.is_some().then(|| m.policy.allowed_kinds()),
            inject_hosts: m.policy.inject_hosts,
        })
        .chain(shared.backends.services().map(|(name, r)| ServiceInfo {
            name: name.clone(),
            high_value: r.policy.high_value,
            cache_ttl_secs: r.policy.cache_ttl_secs,
            allow_inline: r.policy.allow_inline,
            backend: Some(r.backend.name().to_string()),
            deliver: r.policy.deliver.is_some().then(|| r.policy.allowed_kinds()),
            inject_hosts: r.policy.inject_hosts.clone(),
        }))
        .filter(|s| shared.sessions.in_scope(p, &s.name))
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    ResponseBody::Services { services }
}
