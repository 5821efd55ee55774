//! `agentkeys agent add | list | revoke`: child sessions for agents. A token is shown once and
//! only its hash is kept (sealed in agents.enc).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use agentkeys_state::agents::{add_agent_with, load_agents, revoke_agent};
use agentkeys_state::init::open_owner;
use serde::Serialize;

use crate::CliError;
use crate::ctx::{self, Caller};

/// Options of `agent add`.
pub(crate) struct AddOpts {
    pub name: String,
    pub scope: Vec<String>,
    pub ttl: Duration,
    pub uid: Option<u32>,
    pub out: Option<std::path::PathBuf>,
    pub remote: bool,
}

pub(crate) fn add(caller: &Caller, o: AddOpts) -> Result<(), CliError> {
    ctx::require_owner(caller, "agent add")?;
    let home = ctx::home()?;
    let (_, dek) = open_owner(&home)?;
    if let Some(path) = &o.out
        && path.exists()
    {
        return Err(CliError::Input(format!(
            "{} already exists; refusing to overwrite it",
            path.display()
        )));
    }
    let (rec, token) = add_agent_with(&home, &dek, &o.name, &o.scope, o.ttl, o.uid, o.remote)?;
    eprintln!(
        "{} {:?} added (session {}): scope {}, expires {} ({}){}",
        if rec.remote {
            "Remote agent (network listeners only)"
        } else {
            "Agent"
        },
        rec.name,
        rec.token_hash.session_id(),
        rec.scope.join(","),
        ctx::when(rec.expires),
        ctx::left(rec.expires),
        rec.uid
            .map(|u| format!(", bound to uid {u}"))
            .unwrap_or_default()
    );
    match &o.out {
        Some(path) => {
            write_token_file(path, token.expose())?;
            eprintln!(
                "Token written to {} (mode 0600); give the agent AGENTKEYS_TOKEN_FILE={}",
                path.display(),
                path.display()
            );
        }
        None => {
            eprintln!(
                "The token is shown once. Give it to the agent as AGENTKEYS_TOKEN (or in a file named by AGENTKEYS_TOKEN_FILE):"
            );
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", token.expose())?;
        }
    }
    drop(token);
    ctx::notify_daemon(&home)?;
    Ok(())
}

fn write_token_file(path: &Path, token: &str) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CliError::Input(format!("creating {}: {e}", path.display())))?;
    f.write_all(token.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|e| CliError::Input(format!("writing {}: {e}", path.display())))
}

#[derive(Serialize)]
struct AgentRow {
    name: String,
    session: String,
    scope: Vec<String>,
    uid: Option<u32>,
    created: u64,
    expires: u64,
    status: &'static str,
    /// Its token works only on network listeners.
    remote: bool,
}

pub(crate) fn list(caller: &Caller, json: bool) -> Result<(), CliError> {
    ctx::require_owner(caller, "agent list")?;
    let home = ctx::home()?;
    let (_, dek) = open_owner(&home)?;
    let reg = load_agents(&home, dek.expose())?;
    let now = ctx::now();
    let rows: Vec<AgentRow> = reg
        .agents
        .iter()
        .map(|a| AgentRow {
            name: a.name.clone(),
            session: a.token_hash.session_id(),
            scope: a.scope.clone(),
            uid: a.uid,
            created: a.created,
            expires: a.expires,
            status: if a.revoked.is_some() {
                "revoked"
            } else if a.expires <= now {
                "expired"
            } else {
                "active"
            },
            remote: a.remote,
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if rows.is_empty() {
        writeln!(
            out,
            "no agents (add one with `agentkeys agent add NAME --scope SERVICE`)"
        )?;
        return Ok(());
    }
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    writeln!(
        out,
        "{:<w$}  {:<14}  {:<8}  {:<20}  {:<6}  SCOPE",
        "AGENT", "SESSION", "STATUS", "EXPIRES", "UID"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<w$}  {:<14}  {:<8}  {:<20}  {:<6}  {}",
            r.name,
            r.session,
            r.status,
            ctx::when(r.expires),
            if r.remote {
                "remote".into()
            } else {
                r.uid.map_or_else(|| "-".into(), |u| u.to_string())
            },
            r.scope.join(",")
        )?;
    }
    Ok(())
}

pub(crate) fn revoke(caller: &Caller, name: &str) -> Result<(), CliError> {
    ctx::require_owner(caller, "agent revoke")?;
    let home = ctx::home()?;
    let (_, dek) = open_owner(&home)?;
    revoke_agent(&home, &dek, name)?;
    if ctx::notify_daemon(&home)? {
        eprintln!(
            "Agent {name:?} revoked; agentkeysd closed its connections, stopped its programs and dropped its approval requests and grants"
        );
    } else {
        eprintln!("Agent {name:?} revoked (agentkeysd is not running)");
    }
    Ok(())
}
