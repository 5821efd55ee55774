//! The agentkeys broker daemon (`agentkeysd`).
//!
//! - [`startup`]: the hardening sequence, in phases, run before anything else.
//! - [`config`]: the `config.toml` file.
//! - [`keys`]: the DEK in a (pkey-protected) secret page.
//! - [`sessions`]: owner and agent sessions, authentication bound to the peer's uid.
//! - [`server`]: socket, accept loop, peer check, connection caps, shutdown.
//! - [`connection`]: one client: handshake, requests, responses.
#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod keys;
pub mod server;
pub mod sessions;
pub mod startup;
