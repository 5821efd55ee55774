//! `agentkeys mcp [--fd-channel FD]`: the MCP server on stdio (see the agentkeys-mcp crate).
//! It acts as an agent only: an MCP host must start it with an agent token, never the owner's.

use std::os::fd::RawFd;

use crate::CliError;
use crate::ctx::{self, Caller};

pub(crate) fn run(caller: Caller, fd_channel: Option<RawFd>) -> Result<(), CliError> {
    let Caller::Agent(token) = caller else {
        return Err(CliError::Auth(
            "`agentkeys mcp` needs an agent token: set AGENTKEYS_TOKEN_FILE (preferred) or AGENTKEYS_TOKEN \
             in the MCP host's config to a token from `agentkeys agent add NAME --scope SERVICES --out FILE`. \
             It never runs with the owner's session."
                .into(),
        ));
    };
    if !crate::ctx::jailed() {
        eprintln!(
            "agentkeys mcp: warning: not running in a jail: any process of this uid (the agent's \
             own shell commands included) can bypass this agent's scope and read the owner's \
             state; start the agent host with `agentkeys jail --agent NAME -- HOST...`"
        );
    }
    if let Some(fd) = fd_channel {
        agentkeys_mcp::check_fd_channel(fd).map_err(|e| CliError::Input(e.to_string()))?;
    }
    let home = ctx::home()?;
    let socket = ctx::socket(&home);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::Output)?;
    rt.block_on(agentkeys_mcp::serve_stdio(agentkeys_mcp::Options {
        token,
        socket,
        fd_channel,
    }))
    .map_err(|e| CliError::Daemon(e.to_string()))
}
