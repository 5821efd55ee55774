//! The agentkeys wire protocol, shared by the daemon, the CLI, the MCP server and managed
//! runtimes.
//!
//! - [`wire`]: message types, version, size and fd caps, decoding that never echoes input.
//! - [`conn`]: one SOCK_SEQPACKET connection, packets with SCM_RIGHTS fds, caps enforced.
//! - [`client`]: connect, hello with a session token, requests.
//! - [`paths`]: where the socket is.
//! - [`display`]: escaping text someone else chose before it reaches the owner's terminal.
#![forbid(unsafe_code)]

pub mod client;
pub mod conn;
pub mod display;
pub mod paths;
pub mod wire;
