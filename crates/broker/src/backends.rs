//! Where a service's secret comes from: the local vault (the embedded default) or a remote
//! backend named in `config.toml`. A service configured under `[services.NAME]` is read from
//! its backend, even if the local vault also has an entry of that name (the config is the
//! operator's decision; `agentkeys list` shows the backend).
//!
//! [`Shared::resolve`] finds a service and its policy; [`Shared::fetch_plain`] reads its
//! plaintext into a zeroizing buffer. Scope, approval, cache and audit stay with the callers
//! (`delivery`, `run`), which decide in what order they happen.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentkeys_hardening::seccomp::Network;
use agentkeys_proto::wire::{self, ErrorCode};
use agentkeys_state::vault::{Policy, VaultIndex};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::config::{BackendKind, Config};
use crate::openbao::{BackendError, OpenBao};
use crate::remote::{RemoteDaemon, RemoteError};
use crate::sessions::Principal;
use crate::shared::Shared;

/// A remote backend: an OpenBao / Vault server, or the owner's agentkeysd (`kind =
/// "agentkeys"`).
#[derive(Clone)]
pub enum Backend {
    /// OpenBao or Vault (KV v2).
    Bao(Arc<OpenBao>),
    /// The owner's agentkeysd over TLS.
    Agentkeys(Arc<RemoteDaemon>),
}

impl Backend {
    /// The backend's name.
    pub fn name(&self) -> &str {
        match self {
            Backend::Bao(b) => b.name(),
            Backend::Agentkeys(r) => r.name(),
        }
    }

    fn health(&self) -> (bool, String) {
        match self {
            Backend::Bao(b) => b.health(),
            Backend::Agentkeys(r) => r.health(),
        }
    }
}

/// A service read from a remote backend.
pub struct RemoteService {
    /// The backend.
    pub backend: Backend,
    /// The secret's path inside the backend's mount; for `kind = "agentkeys"`, the service's
    /// name on the owner's daemon.
    pub path: String,
    /// The field delivered (OpenBao / Vault only).
    pub field: String,
    /// Delivery policy from `config.toml`.
    pub policy: Policy,
}

/// The remote backends and the services mapped onto them.
#[derive(Default)]
pub struct Backends {
    backends: BTreeMap<String, Backend>,
    services: BTreeMap<String, RemoteService>,
}

impl Backends {
    /// Builds every configured backend (HTTP clients, trust roots). Reads CA files: call
    /// before the sandbox. Makes no request.
    ///
    /// # Errors
    /// A message naming the backend and the problem.
    pub fn from_config(cfg: &Config) -> Result<Backends, String> {
        let mut backends = BTreeMap::new();
        for (name, b) in &cfg.backends {
            let backend = match b.kind {
                BackendKind::Agentkeys => Backend::Agentkeys(Arc::new(RemoteDaemon::new(name, b)?)),
                BackendKind::Openbao | BackendKind::Vault => {
                    Backend::Bao(Arc::new(OpenBao::new(name, b)?))
                }
            };
            backends.insert(name.clone(), backend);
        }
        let mut services = BTreeMap::new();
        for (name, s) in &cfg.services {
            let backend = backends
                .get(&s.backend)
                .cloned()
                .ok_or_else(|| format!("services.{name}.backend: no [backends.{}]", s.backend))?;
            let path = match &backend {
                Backend::Bao(b) => s.path_in_mount(b.mount()).to_string(),
                Backend::Agentkeys(_) => s.remote_name(name).to_string(),
            };
            services.insert(
                name.clone(),
                RemoteService {
                    path,
                    backend,
                    field: s.field.clone(),
                    policy: s.policy().map_err(|e| format!("services.{name}: {e}"))?,
                },
            );
        }
        Ok(Backends { backends, services })
    }

    /// True when no remote backend is configured: the daemon needs no network.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// What the daemon's seccomp filter must allow for these backends: nothing without one,
    /// only `connect` when every backend is on a unix socket, internet sockets otherwise.
    pub fn network(&self) -> Network {
        if self.backends.is_empty() {
            Network::Off
        } else if self
            .backends
            .values()
            .all(|b| matches!(b, Backend::Bao(b) if b.is_unix()))
        {
            Network::Unix
        } else {
            Network::Inet
        }
    }

    /// A service mapped onto a backend.
    pub fn service(&self, name: &str) -> Option<&RemoteService> {
        self.services.get(name)
    }

    /// Every remote service, by name.
    pub fn services(&self) -> impl Iterator<Item = (&String, &RemoteService)> {
        self.services.iter()
    }

    /// Each backend: its name, whether it holds a usable token, its state in words (never a
    /// token), for `agentkeys doctor`.
    pub fn health(&self) -> Vec<(String, bool, String)> {
        self.backends
            .iter()
            .map(|(n, b)| {
                let (ok, detail) = b.health();
                (n.clone(), ok, detail)
            })
            .collect()
    }

    /// Starts each OpenBao backend's token refresher (it logs in at once). Needs the runtime.
    /// An agentkeys backend connects on its first request.
    pub fn start(&self) {
        for b in self.backends.values() {
            if let Backend::Bao(b) = b {
                info!(backend = b.name(), "starting the token refresher");
                tokio::spawn(b.clone().refresh_forever());
            }
        }
    }
}

/// A service found, with its policy and where to read it.
pub struct Resolved<'a> {
    /// Delivery policy.
    pub policy: Policy,
    /// The backend's name, or None for the local vault.
    pub backend: Option<&'a str>,
    source: Source<'a>,
}

enum Source<'a> {
    Local(Arc<VaultIndex>),
    Remote(&'a RemoteService),
}

/// A read that failed: the caller's answer, and a fixed phrase for the audit record when the
/// failure is one to audit.
pub struct FetchError {
    /// Wire code.
    pub code: ErrorCode,
    /// For the caller (never a value).
    pub message: String,
    /// For the audit record's `detail`.
    pub audit: Option<&'static str>,
    /// An answer other than an error for the caller: `pending` from the owner's daemon (a
    /// high-value service there), which reaches this daemon's agent with its code.
    pub answer: Option<Box<wire::ResponseBody>>,
}

impl FetchError {
    /// The caller's answer: [`FetchError::answer`] if there is one, else the error.
    pub fn into_body(self) -> wire::ResponseBody {
        match self.answer {
            Some(body) => *body,
            None => wire::ResponseBody::Error {
                code: self.code,
                message: self.message,
            },
        }
    }
}

impl From<RemoteError> for FetchError {
    fn from(e: RemoteError) -> FetchError {
        FetchError {
            code: e.code(),
            audit: Some(e.audit_detail()),
            answer: e.pending_answer().map(Box::new),
            message: e.to_string(),
        }
    }
}

impl From<BackendError> for FetchError {
    fn from(e: BackendError) -> FetchError {
        FetchError {
            code: e.code(),
            audit: Some(e.audit_detail()),
            message: e.to_string(),
            answer: None,
        }
    }
}

impl Resolved<'_> {
    /// For the `fetch` audit record of a service read through the owner's daemon: which
    /// backend, and who this daemon is there (`via backend owner: ak-… as remote agent "vm1"
    /// (s-…)`); `None` for other sources.
    pub fn fetch_note(&self) -> Option<String> {
        match &self.source {
            Source::Remote(RemoteService {
                backend: Backend::Agentkeys(d),
                ..
            }) => d.session_note(),
            _ => None,
        }
    }
}

impl Shared {
    /// Finds `service`: a remote mapping first, else the local vault.
    ///
    /// # Errors
    /// The local vault could not be read.
    pub fn resolve(&self, service: &str) -> Result<Option<Resolved<'_>>, FetchError> {
        if let Some(r) = self.backends.service(service) {
            return Ok(Some(Resolved {
                policy: r.policy.clone(),
                backend: Some(r.backend.name()),
                source: Source::Remote(r),
            }));
        }
        let index = self.vault_index().map_err(|e| {
            warn!("reading the vault failed: {e}");
            FetchError {
                code: ErrorCode::Internal,
                message: "the vault could not be read; see the daemon log".into(),
                audit: None,
                answer: None,
            }
        })?;
        Ok(index.meta(service).map(|m| Resolved {
            policy: m.policy,
            backend: None,
            source: Source::Local(index.clone()),
        }))
    }

    /// Reads the plaintext of a resolved service for `p`. No cache, no audit: the caller does
    /// both. A remote read can take a while, so `p`'s session is checked again after it: a
    /// session revoked or expired meanwhile gets nothing.
    ///
    /// # Errors
    /// [`FetchError`] with the answer for the caller.
    pub async fn fetch_plain(
        &self,
        p: &Principal,
        service: &str,
        resolved: &Resolved<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, FetchError> {
        match &resolved.source {
            Source::Local(index) => match self.key.with_key(|k| index.open_entry(k, service)) {
                Ok(Some(p)) => Ok(p),
                Ok(None) => Err(FetchError {
                    code: ErrorCode::NotFound,
                    message: format!("no service named {service:?}"),
                    audit: None,
                    answer: None,
                }),
                Err(e) => {
                    warn!(service, "fetch failed: {e}");
                    Err(FetchError {
                        code: ErrorCode::Internal,
                        message: format!("fetching {service:?} failed: {e}"),
                        audit: Some("vault entry failed to open"),
                        answer: None,
                    })
                }
            },
            Source::Remote(r) => {
                let started = std::time::Instant::now();
                let out = match &r.backend {
                    Backend::Bao(b) => b.read(&r.path, &r.field).await.map_err(|e| {
                        warn!(service, "{e}");
                        FetchError::from(e)
                    }),
                    Backend::Agentkeys(d) => d.read(&r.path, service).await.map_err(|e| {
                        if !matches!(e, RemoteError::Pending { .. }) {
                            warn!(service, "{e}");
                        }
                        FetchError::from(e)
                    }),
                };
                let took = started.elapsed();
                if took > Duration::from_secs(1) {
                    info!(
                        service,
                        backend = r.backend.name(),
                        "backend read took {took:?}"
                    );
                }
                let plaintext = out?;
                self.sessions.check(p, None).map_err(|e| FetchError {
                    code: crate::connection::auth_code(&e),
                    message: e.to_string(),
                    audit: None,
                    answer: None,
                })?;
                Ok(plaintext)
            }
        }
    }
}
