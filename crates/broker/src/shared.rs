//! The state every connection shares ([`Shared`]): sessions, the DEK, the cache, the audit
//! trail, the vault index, approvals, backends, the launcher link and the connection table.
//! Handlers (`connection`, `delivery`, `run`, `backends`) take a `&Shared`; the listener
//! (`server`) only accepts and hands connections over. New subsystems hang off this state, not
//! off each other.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agentkeys_hardening::page::PagePolicy;
use agentkeys_proto::wire::{ErrorCode, ResponseBody};
use agentkeys_state::StateError;
use agentkeys_state::audit::{Event, Peer};
use agentkeys_state::home::Home;
use agentkeys_state::vault::{VaultIndex, vault_stamp};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::approvals::{Approvals, Check, Ended, Subject};
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
    /// Use [`Shared::with_approvals`], which audits what ends.
    pub approvals: Mutex<crate::approvals::Approvals>,
    /// Remote backends (OpenBao / Vault) and the services mapped onto them.
    pub backends: crate::backends::Backends,
    /// The memory all masked runs' tables may take at once (`[daemon] max_mask_bytes`).
    pub mask_budget: Arc<crate::mask::MaskBudget>,
    /// The credential-injecting proxy, once the runtime runs (`run --proxy` is refused without).
    pub proxy: std::sync::OnceLock<Arc<crate::proxy::ProxyLink>>,
}

/// One open connection, as the server sees it.
pub struct ConnEntry {
    /// Set after hello.
    pub principal: Option<Principal>,
    /// The peer's uid (`SO_PEERCRED` at accept), checked against the session's binding for as
    /// long as the connection lives.
    pub uid: u32,
    /// Notified to make the connection close (revoked agent, evicted pending, shutdown).
    pub kick: Arc<Notify>,
}

/// The open connections.
#[derive(Default)]
pub struct ConnTable {
    pub(crate) next_id: u64,
    pub(crate) live: HashMap<u64, ConnEntry>,
    pub(crate) pending: VecDeque<u64>,
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

    /// Writes an audit record that must exist before what it records happens (a write error
    /// refuses), without waiting for the sync: it is on disk within
    /// [`crate::auditor::LAZY_SYNC`]. The proxy's `inject` records use it unless
    /// `[proxy] sync_audit` asks for a sync per injection (see the architecture's decisions).
    ///
    /// # Errors
    /// The record could not be written.
    pub fn audit_written(&self, ev: &Event<'_>) -> Result<(), String> {
        self.audit
            .append(ev, crate::auditor::Need::Lazy)
            .map_err(|e| {
                error!("AUDIT WRITE FAILED, refusing deliveries until it works again: {e}");
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
                who: None,
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
    /// the owner denied it (audited `deny`). `run` is (request SHA-256, the command as the owner
    /// is shown it).
    pub fn high_value(
        &self,
        p: &Principal,
        peer: Peer,
        service: &str,
        run: Option<(&str, &str)>,
    ) -> Result<(), ResponseBody> {
        let subject = Subject {
            principal: p.clone(),
            service: service.to_string(),
            argv: run.map(|(h, _)| h.to_string()),
            wider: None,
        };
        self.high_value_subject(p, peer, service, subject, run.map(|(_, c)| c))
    }

    /// [`Shared::high_value`] for a prepared subject (the proxy's, whose `wider` lets a window
    /// bind the host); `shown` is what the owner is shown of the request.
    pub fn high_value_subject(
        &self,
        p: &Principal,
        peer: Peer,
        service: &str,
        subject: Subject,
        shown: Option<&str>,
    ) -> Result<(), ResponseBody> {
        let run = subject.argv.clone().zip(shown);
        let run = run.as_ref().map(|(h, c)| (h.as_str(), *c));
        let detail = run.map(|(h, _)| format!("request_sha256={h}"));
        let ev = |event, outcome, detail| Event {
            event,
            who: Some(p.who()),
            service: Some(service),
            delivery: None,
            degraded: false,
            peer: Some(peer),
            outcome,
            detail,
        };
        let check =
            self.with_approvals(None, |a| a.check(&subject, run.map(|(_, c)| c.to_string())));
        match check {
            Check::Granted { grant, consumed } => {
                let d = format!(
                    "{grant} {}{}",
                    if consumed { "once" } else { "window" },
                    detail
                        .as_deref()
                        .map(|d| format!(" {d}"))
                        .unwrap_or_default()
                );
                self.audit(&ev("grant_used", "ok", Some(&d)))
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
                ));
                Err(ResponseBody::Error {
                    code: ErrorCode::Busy,
                    message: "too many approval requests are open; wait for the owner to decide or for them to expire".into(),
                })
            }
            Check::Denied => {
                self.audit_best_effort(&ev("deny", "denied", Some("denied by the owner")));
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
                    self.audit_best_effort(&ev("pending", "pending", detail.as_deref()));
                    // The owner's notification, with what an agent chose escaped as
                    // `agentkeys pending` shows it.
                    let escape = agentkeys_proto::display::escape;
                    let shown = run.map(|(_, c)| escape(c).into_owned()).unwrap_or_default();
                    let who = p.agent_name().map_or("(owner)".into(), escape);
                    crate::launch::approval_hook(self, &code, &who, service, &shown);
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

    /// Expires old approval requests and grants, and drops those of sessions that ended
    /// (revoked, expired, replaced); each is audited (`expired`, `request_withdrawn`,
    /// `grant_expired`, `grant_revoked`). Called every second and after a state reload.
    pub fn sweep_approvals(&self) {
        self.with_approvals(None, |a| {
            a.prune(|p| self.sessions.check(p, None).err().map(|e| e.ended()));
            a.sweep();
        });
    }

    /// Runs `f` on the approval table, then audits whatever ended meanwhile (whichever
    /// operation noticed it first: a check, a listing, a decision, the tick), after the lock
    /// is released. `peer` is the owner's process when the owner ends something (withdrawing a
    /// grant); `None` when it ended by itself.
    pub fn with_approvals<T>(&self, peer: Option<Peer>, f: impl FnOnce(&mut Approvals) -> T) -> T {
        let (out, ended) = {
            let mut a = self.approvals.lock().expect("approvals");
            let out = f(&mut a);
            (out, a.take_ended())
        };
        for e in &ended {
            self.audit_ended(e, peer);
        }
        out
    }

    /// The audit record of something that ended in the approval table. `peer` is the owner's
    /// process when the owner caused it.
    fn audit_ended(&self, e: &Ended, peer: Option<Peer>) {
        let (event, subject, detail) = match e {
            Ended::RequestExpired(s) => ("expired", s, "approval request expired".to_string()),
            Ended::RequestWithdrawn(s, why) => (
                "request_withdrawn",
                s,
                format!("approval request dropped: {why}"),
            ),
            Ended::GrantExpired {
                grant,
                subject,
                once,
            } => (
                "grant_expired",
                subject,
                if *once {
                    format!("{grant} once-grant unused")
                } else {
                    format!("{grant} window ended")
                },
            ),
            Ended::GrantRevoked {
                grant,
                subject,
                why,
            } => ("grant_revoked", subject, format!("{grant} {why}")),
        };
        self.audit_best_effort(&Event {
            event,
            who: Some(subject.principal.who()),
            service: Some(&subject.service),
            delivery: None,
            degraded: false,
            peer,
            outcome: "ok",
            detail: Some(&detail),
        });
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

    /// Re-reads state files if they changed; on a change, closes the connections and drops the
    /// approval requests and grants of sessions that are no longer valid. Called on every
    /// request, every second and on `reload`.
    pub fn refresh(&self) {
        match self.sessions.refresh(&self.key) {
            Ok(changed) if changed.owner || changed.agents => {
                self.kick_invalid();
                self.sweep_approvals();
            }
            Ok(_) => {}
            Err(e) => warn!("state changed but could not be reloaded (keeping the old view): {e}"),
        }
    }

    /// Closes every connection whose session is no longer valid: revoked, expired (noticed
    /// here by the one-second tick, not only at the connection's next request), replaced, or
    /// used from a uid its session is not bound to.
    pub fn kick_invalid(&self) {
        let t = self.conns.lock().expect("conn table");
        for (id, e) in &t.live {
            if let Some(p) = &e.principal
                && let Err(why) = self.sessions.check(p, Some(e.uid))
            {
                info!(conn = id, principal = ?p, "closing connection: {why}");
                e.kick.notify_one();
            } else if e.principal.as_ref().is_some_and(|p| p.is_owner())
                && let Some((jail, why)) = crate::jail::ended_jail(self, *id)
            {
                // `agentkeys jail` is told, and stops the jail.
                info!(conn = id, jail = %jail, "a jail's session ended: {why}");
                e.kick.notify_one();
            }
        }
    }
}
