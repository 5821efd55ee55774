//! `agentkeys`: the command-line client of agentkeysd.
//!
//! `main` hardens the process (no dumps, no core file), parses arguments and hands them to
//! [`run`]; one place ([`CliError::exit_code`]) turns an error into a message and exit code.
//!
//! - owner commands that need no daemon work on `$AGENTKEYS_HOME` directly (`init`, `store`,
//!   `list`, `delete`, `agent ...`, `whoami`), then tell a running daemon to reload;
//! - agents (`AGENTKEYS_TOKEN` / `AGENTKEYS_TOKEN_FILE`) only ever talk to the daemon.
#![forbid(unsafe_code)]

mod agent_cmd;
mod approve_cmd;
mod audit_cmd;
mod ctx;
mod daemon_cmd;
mod doctor;
mod init_cmd;
mod jail_cmd;
mod mcp_cmd;
mod read_cmd;
mod remote_cmd;
mod run_cmd;
mod vault_cmd;
mod whoami;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentkeys_hardening::{alloc::WipingAllocator, process};
use agentkeys_proto::client::ClientError;
use agentkeys_proto::wire::ErrorCode;
use agentkeys_state::StateError;
use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: WipingAllocator = WipingAllocator;

/// agentkeys: a hardened credential broker for AI agents.
#[derive(Debug, Parser)]
#[command(name = "agentkeys", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the identity, the data encryption key and the owner session.
    Init {
        /// Mint a new owner session (the identity, key and vault stay).
        #[arg(long)]
        force: bool,
    },
    /// Start agentkeysd in the background (`agentkeys daemon stop` stops it).
    Daemon {
        #[command(subcommand)]
        action: Option<DaemonAction>,
    },
    /// Exit 0 when agentkeysd answers; otherwise print a hint and exit 3.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Store a secret read from stdin (never from the command line).
    Store {
        /// Service name, e.g. github.
        service: String,
        /// Release only after a human approves each request.
        #[arg(long)]
        high_value: bool,
        /// Let the daemon keep it cached this long after a fetch (e.g. 5m; default: no cache).
        #[arg(long, value_parser = humantime::parse_duration)]
        cache_ttl: Option<Duration>,
        /// Allow delivery as inline bytes (default: fd delivery or `run` only).
        #[arg(long)]
        allow_inline: bool,
        /// Keep a trailing newline from stdin (by default one is dropped).
        #[arg(long)]
        raw: bool,
        /// A host the credential-injecting proxy may send the value to (repeatable): an exact
        /// name, `*.` plus a name (one label), or an IP; `:PORT` for another port than 443.
        #[arg(long = "inject-host", value_name = "HOST")]
        inject_host: Vec<String>,
        /// A request header (besides Authorization) the proxy may place the value in
        /// (repeatable), e.g. x-api-key.
        #[arg(long = "inject-header", value_name = "NAME")]
        inject_header: Vec<String>,
        /// A query parameter the proxy may place the value in (repeatable; none by default).
        #[arg(long = "inject-query", value_name = "NAME")]
        inject_query: Vec<String>,
        /// The delivery kinds allowed, comma-separated: fd, inline, env, file, proxy (default:
        /// fd, env, file; inline with --allow-inline; proxy with an --inject-host). `proxy`
        /// alone makes the service proxy-only: no agent ever receives its bytes.
        #[arg(long, value_name = "KINDS", value_delimiter = ',')]
        deliver: Option<Vec<String>>,
    },
    /// List stored services and their policy (never values).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a credential's exact bytes to stdout (received as an fd, mapped, unmapped).
    Read {
        /// Service name.
        service: String,
        /// For a high-value service: wait until the owner decides (or the request expires).
        #[arg(long)]
        wait: bool,
        /// Ask for inline bytes instead of an fd (only for services stored with --allow-inline).
        #[arg(long)]
        inline: bool,
    },
    /// Run a program with secrets in its environment; the daemon launches it and masks the
    /// secrets in its output. Exit status is the program's (127: not found, 126: cannot run).
    /// The run is the program and everything it starts: it is stopped (SIGTERM, SIGKILL after
    /// `kill_grace`) if this command goes away, and what it leaves running is stopped when it
    /// exits.
    Run {
        /// VAR=SERVICE: the secret becomes the value of VAR (repeatable).
        #[arg(long = "env", value_name = "VAR=SERVICE")]
        env: Vec<String>,
        /// VAR=SERVICE: VAR names a readable file holding the secret, kept out of the
        /// environment (repeatable).
        #[arg(long = "file", value_name = "VAR=SERVICE")]
        file: Vec<String>,
        /// VAR=SERVICE: VAR holds a placeholder, and the credential-injecting proxy (named in
        /// HTTPS_PROXY/HTTP_PROXY with this run's own credential, its CA in SSL_CERT_FILE and
        /// the like) puts the value in place of it only on requests to the service's hosts;
        /// the program never holds the value (repeatable).
        #[arg(long = "proxy", value_name = "VAR=SERVICE")]
        proxy: Vec<String>,
        /// Give the program this terminal directly (no masking of its output).
        #[arg(long)]
        no_masking: bool,
        /// For high-value services: wait until the owner decides (or the request expires).
        #[arg(long)]
        wait: bool,
        /// Working directory (default: the current one).
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// List requests waiting for your approval (high-value services).
    Pending {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a request by its code: once, or for a window (--for 10m).
    Approve {
        /// The code the requester was shown.
        code: String,
        /// Allow repeats of the same request for this long instead of once.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        window: Option<Duration>,
    },
    /// Deny a request by its code.
    Deny {
        /// The code the requester was shown.
        code: String,
    },
    /// List the grants the owner gave for high-value services; `grants revoke` withdraws them.
    #[command(args_conflicts_with_subcommands = true)]
    Grants {
        #[command(subcommand)]
        action: Option<GrantsAction>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a stored service.
    Delete {
        /// Service name.
        service: String,
    },
    /// Manage agents: scoped, expiring child sessions.
    Agent {
        #[command(subcommand)]
        action: AgentAction,
    },
    /// This daemon's network identity for remote daemons: its TLS certificate's fingerprint
    /// and the config lines for the other host (owner only).
    Remote {
        #[command(subcommand)]
        action: RemoteAction,
    },
    /// Show the identity, role, scope and expiry of this session (never a token).
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report how this machine and agentkeys' processes are hardened.
    Doctor {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the MCP tools (run, get_credential, list_credentials, whoami) on stdio, as the
    /// agent of AGENTKEYS_TOKEN_FILE / AGENTKEYS_TOKEN (for MCP hosts; never the owner).
    Mcp {
        /// An inherited unix socket to hand credential fds to a runtime advertising the
        /// `agentkeys/fd` capability.
        #[arg(long, value_name = "FD")]
        fd_channel: Option<i32>,
    },
    /// Run an agent (CMD and everything it starts) in a jail, as an ephemeral session of the
    /// registered agent NAME: agentkeys' state, credential files, shell history, other
    /// processes and the owner's service sockets out of reach; writes only in the working
    /// directory, a private /tmp and --write paths; the owner's environment minus credentials.
    /// Exit status is CMD's (128+N for a signal); 70 when the jail cannot be set up.
    Jail {
        /// The registered agent whose scope and policy the jail gets.
        #[arg(long)]
        agent: String,
        /// End the jail's session after this long (default: the agent's own expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Also writable (repeatable); never your home directory itself, nor a hidden path.
        #[arg(long, value_name = "PATH")]
        write: Vec<PathBuf>,
        /// Also hidden (repeatable).
        #[arg(long, value_name = "PATH")]
        hide: Vec<PathBuf>,
        /// Re-allow a path of the default hidden set (repeatable); never agentkeys' state.
        #[arg(long, value_name = "PATH")]
        show: Vec<PathBuf>,
        /// Keep this unix socket reachable (repeatable).
        #[arg(long, value_name = "PATH")]
        allow_socket: Vec<PathBuf>,
        /// Pass this environment variable although it looks like a credential (repeatable).
        #[arg(long = "env", value_name = "NAME")]
        env: Vec<String>,
        /// Where the kernel lacks a protection, run without it and list it (default: refuse).
        #[arg(long)]
        best_effort: bool,
        /// Let the agent `git add`/`git commit` inside the jail: git's own work in `.git`
        /// (index, objects, refs) becomes writable; what makes git run a program or read
        /// configuration (config, hooks, info, modules, worktrees, commondir) stays read-only.
        /// Without it `.git` is read-only as a whole. What it opens: with a writable index the
        /// agent can add a submodule of its own (`git init sub`, a `core.fsmonitor` in its
        /// config, `git add sub`), and your next `git status` in the project (a shell prompt
        /// runs one constantly) runs that program outside the jail. agentkeys only names such
        /// submodules in a WARNING after the jail; it cannot stop them while it runs. `git
        /// config --global diff.ignoreSubmodules all` keeps `git status` out of submodules.
        #[arg(long)]
        git_commit: bool,
        /// Print the jail's policy (what is hidden, writable, protected, which sockets and
        /// environment names, the network rule) and exit.
        #[arg(long)]
        print_policy: bool,
        /// VAR=SERVICE: VAR holds a placeholder in the jail's environment, and the
        /// credential-injecting proxy (named in HTTPS_PROXY/HTTP_PROXY with this jail's own
        /// credential, its CA in SSL_CERT_FILE and the like) puts the value in place of it
        /// only on requests to the service's hosts (repeatable).
        #[arg(long = "proxy", value_name = "VAR=SERVICE")]
        proxy: Vec<String>,
        /// The jail's network: `host` (default: the host's network) or `proxy` (a network
        /// namespace whose only way out is agentkeys' proxy: the services' inject hosts and
        /// --allow-host hosts; everything else refused and audited).
        #[arg(long, value_name = "host|proxy", default_value = "host")]
        net: String,
        /// With --net proxy: a host the jail may reach through the proxy without injection
        /// (repeatable): `api.openai.com`, `*.pythonhosted.org`, `registry.npmjs.org:443`;
        /// without a port, 443 only.
        #[arg(long, value_name = "HOST[:PORT]")]
        allow_host: Vec<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Show the audit trail (who got which secret, when); `audit verify` checks its hash chain.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        action: Option<audit_cmd::AuditAction>,
        /// Keep printing records as agentkeysd appends them.
        #[arg(long)]
        follow: bool,
        /// Print the records exactly as stored (JSON lines).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DaemonAction {
    /// Start agentkeysd (the default).
    Start {
        /// Extra arguments for agentkeysd (e.g. --idle-ttl 30s).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Stop agentkeysd.
    Stop,
}

#[derive(Debug, Subcommand)]
enum GrantsAction {
    /// Withdraw a grant by its id (`g7`), every grant of an agent, or all of them.
    Revoke {
        /// The grant's id, as `agentkeys grants` shows it.
        #[arg(required_unless_present_any = ["agent", "all"], conflicts_with_all = ["agent", "all"])]
        id: Option<String>,
        /// Every grant of this agent (all its sessions).
        #[arg(long, conflicts_with = "all")]
        agent: Option<String>,
        /// Every grant.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RemoteAction {
    /// The TLS fingerprint to pin and the exact config.toml lines for the remote host (makes
    /// the daemon's TLS key, sealed in tls.enc, if there is none yet).
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AgentAction {
    /// Mint a session for an agent; its token is printed once, alone on stdout.
    Add {
        /// Agent name ([a-z0-9_-], up to 64).
        name: String,
        /// Services it may use, comma-separated (`*` for all).
        #[arg(long, value_delimiter = ',', required = true)]
        scope: Vec<String>,
        /// Lifetime of the session.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The uid the agent runs as (default: this uid).
        #[arg(long)]
        uid: Option<u32>,
        /// Write the token to this new file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A remote principal (another host's agentkeysd): the token works only on this
        /// daemon's network listeners (`[daemon] listen`), never on the unix socket.
        #[arg(long, conflicts_with = "uid")]
        remote: bool,
    },
    /// List agents (never tokens).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent now; its open connections are closed.
    Revoke {
        /// Agent name.
        name: String,
    },
}

/// Everything the CLI can fail with; each maps to one exit code (see README, "Exit codes").
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// A hardening step of the CLI itself failed.
    #[error("hardening the agentkeys process: {0}")]
    Harden(#[from] process::HardenError),
    /// State under $AGENTKEYS_HOME.
    #[error("{0}")]
    State(#[from] StateError),
    /// Talking to the daemon.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// Bad input (stdin, files, environment).
    #[error("{0}")]
    Input(String),
    /// Not allowed for this caller.
    #[error("{0}")]
    Forbidden(String),
    /// Session refused (owner session expired).
    #[error("{0}")]
    Auth(String),
    /// No such service or agent.
    #[error("{0}")]
    NotFound(String),
    /// The daemon could not be started or stopped.
    #[error("{0}")]
    Daemon(String),
    /// Writing output failed (e.g. a closed pipe).
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    /// `audit verify` found a broken hash chain.
    #[error("{0}")]
    AuditBroken(String),
    /// `agentkeys jail`: a missing kernel feature or a failed set-up step.
    #[error("{0}")]
    Jail(String),
    /// `run`: the program's own exit status, passed on without a message.
    #[error("exit status {0}")]
    Exit(u8),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Client(ClientError::NotRunning { .. }) => 3,
            CliError::Client(ClientError::Pending { .. }) => 10,
            CliError::Client(ClientError::Refused { code, .. }) => match code {
                ErrorCode::Unauthenticated | ErrorCode::Revoked | ErrorCode::Expired => 4,
                ErrorCode::Forbidden => 5,
                ErrorCode::NotFound => 6,
                ErrorCode::Unavailable => 69, // EX_UNAVAILABLE: a remote backend is down
                _ => 1,
            },
            CliError::Auth(_) => 4,
            CliError::Forbidden(_) => 5,
            CliError::NotFound(_) => 6,
            CliError::AuditBroken(_) => 7,
            CliError::Harden(_) => 70, // EX_SOFTWARE: the environment refused a safety step
            CliError::Jail(_) => 70,
            CliError::Output(_) => 74, // EX_IOERR
            CliError::Exit(code) => *code,
            _ => 1,
        }
    }
}

/// The CLI is itself a managed runtime: it may map secret pages, so it must not dump core and
/// must not be readable through ptrace or /proc/PID/mem by other same-uid processes.
fn harden_client() -> Result<(), CliError> {
    process::set_dumpable(false)?;
    process::set_core_limit_zero()?;
    Ok(())
}

fn run(cli: Cli) -> Result<(), CliError> {
    let caller = ctx::Caller::from_env()?;
    match cli.command {
        Command::Init { force } => {
            ctx::require_owner(&caller, "init")?;
            init_cmd::run(force)
        }
        Command::Daemon { action } => match action {
            None => daemon_cmd::start(&caller, &[]),
            Some(DaemonAction::Start { args }) => daemon_cmd::start(&caller, &args),
            Some(DaemonAction::Stop) => daemon_cmd::stop(&caller),
        },
        Command::Status { json } => daemon_cmd::status(&caller, json),
        Command::Store {
            service,
            high_value,
            cache_ttl,
            allow_inline,
            raw,
            inject_host,
            inject_header,
            inject_query,
            deliver,
        } => vault_cmd::store(
            &caller,
            vault_cmd::StoreOpts {
                service,
                high_value,
                cache_ttl,
                allow_inline,
                raw,
                inject_host,
                inject_header,
                inject_query,
                deliver,
            },
        ),
        Command::List { json } => vault_cmd::list(&caller, json),
        Command::Read {
            service,
            inline,
            wait,
        } => read_cmd::run(&caller, &service, inline, wait),
        Command::Run {
            env,
            file,
            proxy,
            no_masking,
            wait,
            cwd,
            command,
        } => run_cmd::run(
            &caller,
            run_cmd::RunOpts {
                env,
                file,
                proxy,
                no_masking,
                wait,
                cwd,
                command,
            },
        ),
        Command::Pending { json } => approve_cmd::pending(&caller, json),
        Command::Approve { code, window } => approve_cmd::approve(&caller, &code, window),
        Command::Deny { code } => approve_cmd::deny(&caller, &code),
        Command::Grants { action, json } => match action {
            None => approve_cmd::grants(&caller, json),
            Some(GrantsAction::Revoke { id, agent, all }) => {
                let which = match (id, agent, all) {
                    (Some(id), _, _) => approve_cmd::Which::One(id),
                    (None, Some(name), _) => approve_cmd::Which::Agent(name),
                    (None, None, _) => approve_cmd::Which::All,
                };
                approve_cmd::revoke_grants(&caller, which)
            }
        },
        Command::Delete { service } => vault_cmd::delete(&caller, &service),
        Command::Agent { action } => match action {
            AgentAction::Add {
                name,
                scope,
                ttl,
                uid,
                out,
                remote,
            } => agent_cmd::add(
                &caller,
                agent_cmd::AddOpts {
                    name,
                    scope,
                    ttl,
                    uid,
                    out,
                    remote,
                },
            ),
            AgentAction::List { json } => agent_cmd::list(&caller, json),
            AgentAction::Revoke { name } => agent_cmd::revoke(&caller, &name),
        },
        Command::Remote {
            action: RemoteAction::Info { json },
        } => remote_cmd::info(&caller, json),
        Command::Whoami { json } => whoami::run(&caller, json),
        Command::Doctor { json } => doctor::run(&caller, json),
        Command::Jail {
            agent,
            ttl,
            write,
            hide,
            show,
            allow_socket,
            env,
            best_effort,
            git_commit,
            print_policy,
            proxy,
            net,
            allow_host,
            command,
        } => jail_cmd::run(
            &caller,
            jail_cmd::JailOpts {
                agent,
                ttl,
                write,
                hide,
                show,
                allow_socket,
                env,
                best_effort,
                git_commit,
                print_policy,
                proxy,
                net,
                allow_host,
                command,
            },
        ),
        Command::Mcp { fd_channel } => mcp_cmd::run(caller, fd_channel),
        Command::Audit {
            action,
            follow,
            json,
        } => audit_cmd::run(&caller, action, follow, json),
    }
}

fn main() -> ExitCode {
    // Before anything reads the environment or allocates a key (see the switch's docs).
    agentkeys_hardening::pkey::init_from_env();
    let result = harden_client().and_then(|()| run(Cli::parse()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`agentkeys doctor | head`) is not worth a message.
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::from(141)
        }
        Err(CliError::Client(ClientError::Pending { message, .. })) => {
            eprintln!("agentkeys: approval required: {message}");
            ExitCode::from(10)
        }
        // `run` passes the program's status on; the program said what it had to say.
        Err(CliError::Exit(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("agentkeys: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap checks the whole command definition (conflicting settings, duplicate flags).
    #[test]
    fn command_line_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
