//! Who is calling and how to reach the daemon.
//!
//! An agent is whoever has `AGENTKEYS_TOKEN` or `AGENTKEYS_TOKEN_FILE` set; everyone else is the
//! owner, whose token the CLI reads from `session.enc` with the DEK when it needs the daemon.

use std::io::Read;
use std::path::{Path, PathBuf};

use agentkeys_proto::client::{Client, ClientError};
use agentkeys_proto::wire::SessionInfo;
use agentkeys_state::home::Home;
use agentkeys_state::session::load_owner_session;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::CliError;

/// Largest token file read.
const MAX_TOKEN_FILE: u64 = 4096;

/// The caller's identity for this run.
pub(crate) enum Caller {
    /// No agent token in the environment: the owner.
    Owner,
    /// An agent token from `AGENTKEYS_TOKEN` or `AGENTKEYS_TOKEN_FILE`.
    Agent(SecretString),
}

impl Caller {
    /// From the environment.
    pub(crate) fn from_env() -> Result<Caller, CliError> {
        if let Some(t) = std::env::var_os("AGENTKEYS_TOKEN") {
            let t = t
                .into_string()
                .map_err(|_| CliError::Input("AGENTKEYS_TOKEN is not valid UTF-8".into()))?;
            return Ok(Caller::Agent(SecretString::from(t.trim().to_string())));
        }
        if let Some(path) = std::env::var_os("AGENTKEYS_TOKEN_FILE") {
            return read_token_file(Path::new(&path)).map(Caller::Agent);
        }
        // Inside `agentkeys jail` the session needs no variable: the jail's own token file
        // is there, in a tmpfs only the jail sees. Never the owner inside a jail.
        if jailed() {
            return read_token_file(Path::new(agentkeys_jail::policy::SESSION_FILE))
                .map(Caller::Agent);
        }
        Ok(Caller::Owner)
    }

    pub(crate) fn is_agent(&self) -> bool {
        matches!(self, Caller::Agent(_))
    }
}

/// Reads `AGENTKEYS_TOKEN_FILE` with the checks every state file gets
/// (`agentkeys_state::home::open_state_file`): a regular file (not a symlink, FIFO or device:
/// opened without following links and without blocking), ours, mode 0600 or tighter, in a
/// directory of ours that others cannot write; at most 4 KiB.
fn read_token_file(path: &Path) -> Result<SecretString, CliError> {
    let bad =
        |why: String| CliError::Input(format!("AGENTKEYS_TOKEN_FILE {}: {why}", path.display()));
    let file = agentkeys_state::home::open_state_file(path).map_err(|e| bad(e.to_string()))?;
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_TOKEN_FILE as usize + 1));
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| bad(format!("reading it: {e}")))?;
    if buf.len() as u64 > MAX_TOKEN_FILE {
        return Err(bad("too large to be a token".into()));
    }
    let text = std::str::from_utf8(&buf).map_err(|_| bad("not UTF-8".into()))?;
    Ok(SecretString::from(text.trim().to_string()))
}

/// Whether this process runs inside `agentkeys jail`: the jail's session file exists (the jail
/// makes it; nothing outside a jail has `/dev/agentkeys`), whatever the environment says.
pub(crate) fn jailed() -> bool {
    std::fs::symlink_metadata(agentkeys_jail::policy::SESSION_FILE).is_ok()
}

/// Refuses owner-only commands when an agent token is set, and inside a jail.
pub(crate) fn require_owner(caller: &Caller, what: &str) -> Result<(), CliError> {
    if jailed() {
        return Err(CliError::Forbidden(format!(
            "`agentkeys {what}` is for the owner: refused inside a jail (this is agent session \
             of the jail {})",
            std::env::var("AGENTKEYS_JAIL").unwrap_or_else(|_| "you are in".into())
        )));
    }
    if caller.is_agent() {
        return Err(CliError::Forbidden(format!(
            "`agentkeys {what}` is for the owner; AGENTKEYS_TOKEN/AGENTKEYS_TOKEN_FILE is set, so this is an agent"
        )));
    }
    Ok(())
}

/// The state directory.
pub(crate) fn home() -> Result<Home, CliError> {
    Ok(Home::resolve()?)
}

/// The daemon's socket for this home.
pub(crate) fn socket(home: &Home) -> PathBuf {
    // Inside a jail without AGENTKEYS_SOCKET (an MCP host gives its servers a minimal
    // environment): the jail binds the daemon's socket next to the session file.
    if std::env::var_os("AGENTKEYS_SOCKET").is_none() && jailed() {
        return PathBuf::from(agentkeys_jail::policy::SESSION_SOCKET);
    }
    agentkeys_proto::paths::socket_path(home.root())
}

/// The token to say hello with.
pub(crate) fn token(home: &Home, caller: &Caller) -> Result<SecretString, CliError> {
    match caller {
        Caller::Agent(t) => Ok(t.clone()),
        Caller::Owner => {
            let (_, dek) = agentkeys_state::init::open_owner(home)?;
            let session = load_owner_session(home, dek.expose())?;
            Ok(SecretString::from(session.token.expose().to_string()))
        }
    }
}

/// A one-thread runtime for the client's few requests.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Output)
}

/// Connects and says hello.
pub(crate) async fn connect(
    home: &Home,
    caller: &Caller,
) -> Result<(Client, SessionInfo), CliError> {
    let token = token(home, caller)?;
    Ok(Client::connect_with(&socket(home), &token).await?)
}

/// Tells a running daemon to re-read state (after a change made here). Not running is fine.
pub(crate) fn notify_daemon(home: &Home) -> Result<bool, CliError> {
    let rt = runtime()?;
    rt.block_on(async {
        match connect(home, &Caller::Owner).await {
            Ok((mut c, _)) => {
                c.call(agentkeys_proto::wire::RequestBody::Reload {})
                    .await?;
                Ok(true)
            }
            Err(CliError::Client(ClientError::NotRunning { .. })) => Ok(false),
            Err(e) => Err(e),
        }
    })
}

/// Unix seconds now.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 for unix seconds.
pub(crate) fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// "29d 23h" style time left, or "expired".
pub(crate) fn left(expires: u64) -> String {
    let now = now();
    if expires <= now {
        return "expired".into();
    }
    let secs = expires - now;
    // Whole minutes are precise enough for a human.
    let rounded = std::time::Duration::from_secs(secs - secs % 60);
    if rounded.is_zero() {
        format!("{secs}s")
    } else {
        humantime::format_duration(rounded).to_string()
    }
}

/// One `pending` answer while `--wait`ing: announce the first, and stop (as still pending) when a
/// new code shows that the request expired undecided, rather than start over unannounced.
pub(crate) fn keep_waiting(
    waiting_on: &mut Option<String>,
    code: String,
    service: String,
    message: &str,
) -> Result<(), CliError> {
    match waiting_on {
        None => {
            eprintln!("agentkeys: waiting for approval: {message}");
            *waiting_on = Some(code);
            Ok(())
        }
        Some(first) if *first != code => Err(CliError::Client(ClientError::Pending {
            code: first.clone(),
            service,
            message: "the request expired without a decision".into(),
        })),
        Some(_) => Ok(()),
    }
}
