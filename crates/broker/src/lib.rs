//! The agentkeys broker daemon (`agentkeysd`).
//!
//! - [`startup`]: the hardening sequence, in phases, run before anything else.
//! - [`config`]: the `config.toml` file.
//! - [`backends`], [`openbao`]: where secrets come from: the local vault or OpenBao / Vault KV v2
//!   with the daemon's own AppRole identity.
//! - [`keys`]: guarded (pkey-protected) secret pages: the DEK, cached credentials.
//! - [`approvals`]: pending requests, the owner's decisions, grants for high-value services.
//! - [`auditor`]: the audit trail with group commit: records written in order, syncs shared.
//! - [`cache`]: cached credentials, idle and TTL eviction.
//! - [`run`], [`launch`], [`pump`]: daemon-mediated `run`: the launcher link, the masked output.
//! - [`proxy`]: the credential-injecting proxy's link, run registrations, injection decisions.
//! - [`delivery`]: `get_credential`: scope, fetch, audit, fd or inline delivery, drop.
//! - [`sessions`]: owner and agent sessions, authentication bound to the peer's uid.
//! - [`shared`]: the state every connection shares ([`shared::Shared`]).
//! - [`server`]: socket, accept loop, peer check, connection caps, shutdown.
//! - [`listen`]: network (TLS) listeners for remote agents; [`remote`]: the `kind = "agentkeys"`
//!   backend, this daemon as a remote agent of the owner's.
//! - [`connection`]: one client: handshake, requests, responses.
//! - [`mask`]: streaming masker for `run` output: secrets and their encodings become `********`.
#![forbid(unsafe_code)]

pub mod approvals;
pub mod auditor;
pub mod backends;
pub mod cache;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod jail;
pub mod keys;
pub mod launch;
pub mod listen;
pub mod mask;
pub mod openbao;
pub mod proxy;
pub mod pump;
pub mod remote;
pub mod run;
pub mod server;
pub mod sessions;
pub mod shared;
pub mod startup;
