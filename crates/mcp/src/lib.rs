//! The agentkeys MCP server: `agentkeys mcp` serves the `run`, `get_credential`,
//! `list_credentials` and `whoami` tools over stdio as a client of the broker.
//!
//! Not built yet: this crate reserves the place in the workspace layout (see
//! `docs/architecture.md`). The tools land with the MCP issue.
#![forbid(unsafe_code)]

/// The tool names this server will expose, fixed by the design contract.
pub const TOOL_NAMES: [&str; 4] = ["run", "get_credential", "list_credentials", "whoami"];
