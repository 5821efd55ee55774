//! `agentkeys jail` on the daemon's side: ephemeral sessions for jails (owner-only
//! `jail_start` / `jail_exit`), audited `jail_start` and `jail_exit`. A jail's session ends
//! when its command exits (the CLI says `jail_exit`), when the owner's connection that started
//! it closes (the CLI was killed), at its TTL, or with the agent's record (revoked, expired,
//! replaced); its connections are then closed and its approval requests and grants dropped,
//! like any session's. Its `run`s are confined by the jail's policy (see `run.rs`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use agentkeys_proto::wire::{ErrorCode, JailProxy, JailToken, ResponseBody, WireToken};
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

/// The proxy registrations of running jails (`--proxy`, `--net proxy`), by jail id: each lives
/// as long as its jail (dropped, so unregistered, in [`end`]). The daemon runs one `Shared` per
/// process.
static JAIL_PROXY: Mutex<BTreeMap<String, crate::proxy::Registration>> =
    Mutex::new(BTreeMap::new());

/// What `jail_start` asks for.
pub struct StartRequest<'a> {
    /// The registered agent.
    pub agent: &'a str,
    /// Lifetime.
    pub ttl_secs: Option<u64>,
    /// The jail's policy (JSON).
    pub policy: serde_json::Value,
    /// `--proxy VAR -> service`.
    pub proxy: &'a BTreeMap<String, String>,
}

/// `jail_start` from the owner's connection `conn`.
pub async fn start(
    shared: &Shared,
    p: &Principal,
    peer: Peer,
    conn: u64,
    req: StartRequest<'_>,
    userns: Option<std::os::fd::OwnedFd>,
) -> ResponseBody {
    let StartRequest {
        agent,
        ttl_secs,
        policy,
        proxy,
    } = req;
    if !p.is_owner() {
        return error(
            ErrorCode::Forbidden,
            "only the owner may start a jail (refused inside a jail)",
        );
    }
    // The daemon confines this session's runs by the policy: it must be one.
    let parsed = match agentkeys_jail::JailPolicy::from_json(&policy) {
        Ok(p) => p,
        Err(e) => return error(ErrorCode::BadRequest, e.to_string()),
    };
    let allow_hosts = match &parsed.network {
        agentkeys_jail::policy::Network::Proxy { allow_hosts } => {
            for h in allow_hosts {
                if let Err(e) = agentkeys_state::inject::HostPattern::parse(h) {
                    return error(ErrorCode::BadRequest, format!("--allow-host: {e}"));
                }
            }
            Some(allow_hosts.clone())
        }
        agentkeys_jail::policy::Network::Host => None,
    };
    let wants_proxy = !proxy.is_empty() || allow_hosts.is_some();
    let link = match (wants_proxy, shared.proxy.get()) {
        (false, _) => None,
        (true, Some(l)) => Some(l.clone()),
        (true, None) => {
            return error(
                ErrorCode::Internal,
                "the credential-injecting proxy is not running ([proxy] enabled = false, or it \
                 failed at start; see the daemon log): `jail --proxy` and `--net proxy` need it",
            );
        }
    };
    // The attached fd should be a user namespace: the launcher's `setns(CLONE_NEWUSER)`
    // checks that (EINVAL otherwise, and the run fails closed). The daemon does not look at
    // it: its seccomp allowlist has no call that would (readlink, ioctl(NS_GET_NSTYPE)).
    match shared
        .sessions
        .start_jail(agent, ttl_secs, policy, userns, conn)
    {
        Ok((jailed, token, expires)) => {
            let jail = jailed.jail_id().unwrap_or_default().to_string();
            // The jail's proxy registration, under the jail's own session (its placeholders
            // work for nobody else; the daemon checks that session at each injection).
            let proxy = match &link {
                None => None,
                Some(link) => {
                    let reg = match crate::proxy::check_mappings(shared, &jailed, peer, proxy) {
                        Ok(mappings) => link
                            .register_confined(&jailed, peer, &mappings, allow_hosts)
                            .await
                            .map_err(|e| (ErrorCode::Internal, e.0)),
                        Err(e) => Err(e),
                    };
                    let reg = match reg {
                        Ok(r) => r,
                        Err((code, message)) => {
                            shared.sessions.end_jail(&jail);
                            return error(code, message);
                        }
                    };
                    let port = match link.port().await {
                        Ok(p) => p,
                        Err(e) => {
                            shared.sessions.end_jail(&jail);
                            return error(
                                ErrorCode::Internal,
                                format!("the credential-injecting proxy is not available: {e}"),
                            );
                        }
                    };
                    let env = reg.env.clone();
                    JAIL_PROXY
                        .lock()
                        .expect("jail proxy registrations")
                        .insert(jail.clone(), reg);
                    Some(JailProxy { port, env })
                }
            };
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
                JAIL_PROXY
                    .lock()
                    .expect("jail proxy registrations")
                    .remove(&jail);
                return error(ErrorCode::Internal, message);
            }
            info!(jail = %jail, "jail started");
            ResponseBody::JailStarted {
                jail,
                session: jailed.session_id().to_string(),
                expires,
                token: JailToken(WireToken(SecretString::from(token.expose().to_string()))),
                proxy,
            }
        }
        Err(crate::sessions::JailStartError::Agent(m)) => error(ErrorCode::NotFound, m),
        Err(e) => error(ErrorCode::Busy, e.to_string()),
    }
}

/// Ends a jail: its session is refused from now on, its connections close, its approval
/// requests and grants go; audited `jail_exit` with `how`.
pub fn end(shared: &Shared, owner: Option<&Principal>, peer: Option<Peer>, jail: &str, how: &str) {
    // Its proxy credential and placeholders stop working, its proxy connections close.
    JAIL_PROXY
        .lock()
        .expect("jail proxy registrations")
        .remove(jail);
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
