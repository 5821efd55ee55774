//! `agentkeys jail` on the daemon's side: ephemeral sessions for jails (owner-only
//! `jail_start` / `jail_exit`), audited `jail_start` and `jail_exit`. A jail's session ends
//! when its command exits (the CLI says `jail_exit`), when the owner's connection that started
//! it closes (the CLI was killed), at its TTL, or with the agent's record (revoked, expired,
//! replaced); its connections are then closed and its approval requests and grants dropped,
//! like any session's. Its `run`s are confined by the jail's policy (see `run.rs`).

use agentkeys_proto::wire::{ErrorCode, JailToken, ResponseBody, WireToken};
use agentkeys_state::audit::{Event, Peer};
use secrecy::SecretString;
use tracing::info;

use crate::sessions::Principal;
use crate::shared::Shared;

fn error(code: ErrorCode, message: impl Into<String>) -> ResponseBody {
    ResponseBody::Error {
        code,
        message: message.into(),
    }
}

/// `jail_start` from the owner's connection `conn`.
#[allow(clippy::too_many_arguments)]
pub fn start(
    shared: &Shared,
    p: &Principal,
    peer: Peer,
    conn: u64,
    agent: &str,
    ttl_secs: Option<u64>,
    policy: serde_json::Value,
    userns: Option<std::os::fd::OwnedFd>,
) -> ResponseBody {
    if !p.is_owner() {
        return error(
            ErrorCode::Forbidden,
            "only the owner may start a jail (refused inside a jail)",
        );
    }
    // The daemon confines this session's runs by the policy: it must be one.
    if let Err(e) = agentkeys_jail::JailPolicy::from_json(&policy) {
        return error(ErrorCode::BadRequest, e.to_string());
    }
    // The attached fd should be a user namespace: the launcher's `setns(CLONE_NEWUSER)`
    // checks that (EINVAL otherwise, and the run fails closed). The daemon does not look at
    // it: its seccomp allowlist has no call that would (readlink, ioctl(NS_GET_NSTYPE)).
    match shared
        .sessions
        .start_jail(agent, ttl_secs, policy, userns, conn)
    {
        Ok((jailed, token, expires)) => {
            let jail = jailed.jail_id().unwrap_or_default().to_string();
            let detail = format!(
                "jail {jail} for {} until {}",
                jailed.label(),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires)
                )
            );
            if let Err(message) = shared.audit(&Event {
                event: "jail_start",
                who: Some(p.who()),
                service: None,
                delivery: None,
                degraded: false,
                peer: Some(peer),
                outcome: "ok",
                detail: Some(&detail),
            }) {
                shared.sessions.end_jail(&jail);
                return error(ErrorCode::Internal, message);
            }
            info!(jail = %jail, "jail started");
            ResponseBody::JailStarted {
                jail,
                session: jailed.session_id().to_string(),
                expires,
                token: JailToken(WireToken(SecretString::from(token.expose().to_string()))),
            }
        }
        Err(crate::sessions::JailStartError::Agent(m)) => error(ErrorCode::NotFound, m),
        Err(e) => error(ErrorCode::Busy, e.to_string()),
    }
}

/// Ends a jail: its session is refused from now on, its connections close, its approval
/// requests and grants go; audited `jail_exit` with `how`.
pub fn end(shared: &Shared, owner: Option<&Principal>, peer: Option<Peer>, jail: &str, how: &str) {
    if let Some((agent, session)) = shared.sessions.end_jail(jail) {
        let detail = format!("jail {jail} of agent {agent:?} ({session}): {how}");
        shared.audit_best_effort(&Event {
            event: "jail_exit",
            who: owner.map(|o| o.who()),
            service: None,
            delivery: None,
            degraded: false,
            peer,
            outcome: "ok",
            detail: Some(&detail),
        });
        info!(jail = %jail, "jail ended: {how}");
        shared.kick_invalid();
        shared.sweep_approvals();
    }
}

/// `jail_exit` from the owner: the command's status.
pub fn exit(
    shared: &Shared,
    p: &Principal,
    peer: Peer,
    conn: u64,
    jail: &str,
    code: Option<i32>,
    signal: Option<i32>,
) -> ResponseBody {
    if !p.is_owner() {
        return error(ErrorCode::Forbidden, "only the owner may end a jail");
    }
    if !shared
        .sessions
        .jails_of(conn)
        .iter()
        .any(|(id, _)| id == jail)
    {
        return error(ErrorCode::NotFound, "this connection started no such jail");
    }
    let how = match (code, signal) {
        (_, Some(s)) => format!("its command was killed by signal {s}"),
        (Some(c), None) => format!("its command exited with code {c}"),
        (None, None) => "ended".to_string(),
    };
    end(shared, Some(p), Some(peer), jail, &how);
    ResponseBody::Done
}

/// Ends every jail the closing connection `conn` started (the CLI went away).
pub fn connection_closed(shared: &Shared, owner: &Principal, peer: Peer, conn: u64) {
    for (id, _) in shared.sessions.jails_of(conn) {
        end(
            shared,
            Some(owner),
            Some(peer),
            &id,
            "the owner's `agentkeys jail` went away",
        );
    }
}

/// The first jail of `conn` whose session is no longer valid, with why (for the tick: the
/// connection is told and closed, and the CLI stops the jail).
pub fn ended_jail(shared: &Shared, conn: u64) -> Option<(String, String)> {
    shared
        .sessions
        .jails_of(conn)
        .into_iter()
        .find_map(|(id, why)| why.map(|w| (id, w)))
}
