//! `get_credential`: check scope and policy, fetch from the vault or a remote backend (or copy
//! from the cache) into a secret page, write the audit record, and only then deliver: the page's fd travels with the
//! answer (`SCM_RIGHTS`), or, for services that allow it, the bytes inline. Afterwards the
//! daemon's copy is closed and `drop` is audited, unless the service is cached.
//!
//! Every step that fails refuses the delivery; a delivery whose audit record cannot be written
//! does not happen.

use std::os::fd::OwnedFd;
use std::time::Duration;

use agentkeys_hardening::page::SecretPage;
use agentkeys_proto::wire::{ErrorCode, ResponseBody};
use agentkeys_state::audit::{Event, Peer};
use agentkeys_state::vault::{DeliveryKind, validate_service_name};
use base64::Engine;
use tracing::{debug, warn};
use zeroize::Zeroizing;

use crate::keys::GuardedPage;
use crate::sessions::Principal;
use crate::shared::Shared;

/// What must happen after the answer is sent.
pub struct AfterSend {
    /// The delivered page's fd: attached to the answer, then closed.
    pub fd: Option<OwnedFd>,
    /// Audit `drop` for this (service, delivery) once the answer is out.
    pub drop: Option<(String, &'static str)>,
}

/// A reply with what goes along with it.
pub struct Delivery {
    /// The answer.
    pub body: ResponseBody,
    /// Fd to attach, audit to write after sending.
    pub after: AfterSend,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Delivery {
    Delivery {
        body: ResponseBody::Error {
            code,
            message: message.into(),
        },
        after: AfterSend {
            fd: None,
            drop: None,
        },
    }
}

/// Serves one `get_credential`.
pub async fn get_credential(
    shared: &Shared,
    p: &Principal,
    peer: Peer,
    service: &str,
    inline: bool,
) -> Delivery {
    let ev = |event, outcome, delivery, degraded, detail| Event {
        event,
        who: Some(p.who()),
        service: Some(service),
        delivery,
        degraded,
        peer: Some(peer),
        outcome,
        detail,
    };
    if validate_service_name(service).is_err() {
        return refuse(ErrorCode::BadRequest, "invalid service name");
    }
    let kind = if inline { "inline" } else { "fd" };
    if !shared.sessions.in_scope(p, service) {
        shared.audit_best_effort(&ev(
            "deny",
            "denied",
            Some(kind),
            false,
            Some("outside the agent's scope"),
        ));
        return refuse(
            ErrorCode::Forbidden,
            format!(
                "{} may not use service {service:?} (outside its scope)",
                p.label()
            ),
        );
    }
    // Before the vault is consulted: a value read from a vault that changes meanwhile is not
    // cached (see `Cache::generation`).
    let generation = shared.cache.generation();
    let resolved = match shared.resolve(service) {
        Ok(r) => r,
        Err(e) => return refuse(e.code, e.message),
    };
    let Some(resolved) = resolved else {
        shared.audit_best_effort(&ev(
            "deny",
            "not_found",
            Some(kind),
            false,
            Some("no such service"),
        ));
        return refuse(ErrorCode::NotFound, format!("no service named {service:?}"));
    };
    let policy = resolved.policy.clone();
    let want = if inline {
        DeliveryKind::Inline
    } else {
        DeliveryKind::Fd
    };
    // A policy that names its delivery kinds (a proxy-only service, say) refuses the others;
    // a policy without the list keeps the old rule below (inline only with allow_inline).
    if policy.deliver.is_some() && !policy.allows(want) {
        shared.audit_best_effort(&ev(
            "deny",
            "denied",
            Some(kind),
            false,
            Some("delivery kind not allowed"),
        ));
        return refuse(
            ErrorCode::Forbidden,
            format!(
                "{service:?} may not be delivered as {kind}; its policy allows: {}",
                policy.allowed_kinds()
            ),
        );
    }
    // A network principal (another host's daemon) always takes the value inline, inside TLS:
    // no fd crosses a network. allow_inline governs local agents.
    if inline && !policy.allow_inline && !p.is_network() {
        shared.audit_best_effort(&ev(
            "deny",
            "denied",
            Some(kind),
            false,
            Some("inline delivery not allowed"),
        ));
        return refuse(
            ErrorCode::Forbidden,
            format!(
                "{service:?} does not allow inline delivery: take it as an fd (`agentkeys read {service}` or a managed runtime) or let the daemon launch the program (`agentkeys run`)"
            ),
        );
    }
    // After every other check: a once-grant is used up only by a request that then succeeds.
    if policy.high_value
        && let Err(body) = shared.high_value(p, peer, service, None)
    {
        return Delivery {
            body,
            after: AfterSend {
                fd: None,
                drop: None,
            },
        };
    }
    let page_policy = shared.page_policy();
    let cache_ttl = Duration::from_secs(policy.cache_ttl_secs);

    // The delivery page: a copy from the cache, or a fresh fetch.
    let cached = if cache_ttl.is_zero() {
        None
    } else {
        match shared.cache.copy(service, page_policy) {
            Ok(c) => c,
            Err(e) => return refuse(ErrorCode::Internal, format!("making a secret page: {e}")),
        }
    };
    let page = match cached {
        Some(page) => {
            if let Err(e) = shared.audit(&ev("cache_hit", "ok", None, false, None)) {
                return refuse(ErrorCode::Internal, e);
            }
            page
        }
        None => {
            let plaintext: Zeroizing<Vec<u8>> = match shared
                .fetch_plain(p, service, &resolved)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    if let Some(detail) = e.audit {
                        let outcome = if e.answer.is_some() {
                            "pending"
                        } else {
                            "error"
                        };
                        shared.audit_best_effort(&ev("fetch", outcome, None, false, Some(detail)));
                    }
                    return Delivery {
                        body: e.into_body(),
                        after: AfterSend {
                            fd: None,
                            drop: None,
                        },
                    };
                }
            };
            let note = resolved.fetch_note();
            let fetched = Event {
                detail: note.as_deref(),
                ..ev("fetch", "ok", None, false, None)
            };
            if let Err(e) = shared.audit(&fetched) {
                return refuse(ErrorCode::Internal, e);
            }
            let page = match SecretPage::from_bytes(&plaintext, page_policy) {
                Ok(p) => p,
                Err(e) => return refuse(ErrorCode::Internal, format!("making a secret page: {e}")),
            };
            if !cache_ttl.is_zero() {
                match GuardedPage::new(&plaintext, page_policy) {
                    Ok(g) => {
                        if !shared.cache.insert(service, g, cache_ttl, generation) {
                            debug!(service, "not caching: the vault changed during the read");
                        }
                    }
                    Err(e) => warn!(service, "not caching: {e}"),
                }
            }
            page
        }
    };
    let degraded = page.backing().is_degraded();
    // Inline bytes travel base64 in one answer: refuse before anything is recorded as delivered.
    if inline && page.len().div_ceil(3) * 4 + 1024 > agentkeys_proto::wire::MAX_MESSAGE_BYTES {
        return refuse(
            ErrorCode::BadRequest,
            format!(
                "{service:?} is too large for inline delivery ({} bytes); take it as an fd",
                page.len()
            ),
        );
    }
    if let Err(e) = shared.audit(&ev("deliver", "ok", Some(kind), degraded, None)) {
        return refuse(ErrorCode::Internal, e);
    }
    let len = page.len();
    // Cached services keep the daemon's copy (evicted later); others drop theirs now.
    let drop = cache_ttl
        .is_zero()
        .then(|| (service.to_string(), if inline { "inline" } else { "fd" }));
    if inline {
        let value = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*page));
        std::mem::drop(page); // not handed over: wiped here
        debug!(service, principal = ?p, "delivered inline");
        return Delivery {
            body: ResponseBody::Credential {
                service: service.to_string(),
                delivery: "inline".into(),
                degraded,
                len,
                value_b64: Some(value.to_string()),
            },
            after: AfterSend { fd: None, drop },
        };
    }
    debug!(service, principal = ?p, "delivering fd");
    Delivery {
        body: ResponseBody::Credential {
            service: service.to_string(),
            delivery: "fd".into(),
            degraded,
            len,
            value_b64: None,
        },
        after: AfterSend {
            fd: Some(page.into_fd()),
            drop,
        },
    }
}
