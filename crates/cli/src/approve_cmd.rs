//! `agentkeys pending | approve | deny | grants`: the owner decides approval requests for
//! high-value services and sees and withdraws the grants. Authenticated by the owner's session
//! and uid, never by having a terminal. Everything an agent chose (its name, the command and
//! directory of a `run`) is shown through `agentkeys_proto::display::escape`.

use std::io::Write;
use std::time::Duration;

use agentkeys_proto::display::escape;
use agentkeys_proto::wire::{RequestBody, ResponseBody, Role};

use crate::CliError;
use crate::ctx::{self, Caller};

fn call(caller: &Caller, body: RequestBody) -> Result<ResponseBody, CliError> {
    let home = ctx::home()?;
    ctx::runtime()?.block_on(async {
        let (mut c, _) = ctx::connect(&home, caller).await?;
        Ok(c.call(body).await?.body)
    })
}

pub(crate) fn pending(caller: &Caller, json: bool) -> Result<(), CliError> {
    let ResponseBody::PendingList { requests } = call(caller, RequestBody::ListPending {})? else {
        return Err(CliError::Input("unexpected answer from agentkeysd".into()));
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &requests).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if requests.is_empty() {
        writeln!(out, "no pending requests")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<11}  {:<16}  {:<14}  {:<16}  {:>5}  {:>7}  COMMAND",
        "CODE", "AGENT", "SESSION", "SERVICE", "AGE", "EXPIRES"
    )?;
    for r in &requests {
        writeln!(
            out,
            "{:<11}  {:<16}  {:<14}  {:<16}  {:>4}s  {:>6}s  {}",
            escape(&r.code),
            who(&r.role, r.agent.as_deref()),
            escape(&r.session),
            escape(&r.service),
            r.age_secs,
            r.expires_in_secs,
            escape(r.command.as_deref().unwrap_or("(read)"))
        )?;
    }
    Ok(())
}

/// The requester or grantee as a kind: `(owner)` (which no agent name can be: names are
/// `[a-z0-9][a-z0-9_-]*`), or the agent's name, escaped.
fn who(role: &Role, agent: Option<&str>) -> String {
    match (role, agent) {
        (Role::Owner, _) => "(owner)".into(),
        (Role::Agent, Some(name)) => escape(name).into_owned(),
        (Role::Agent, None) => "(agent?)".into(),
    }
}

pub(crate) fn approve(
    caller: &Caller,
    code: &str,
    window: Option<Duration>,
) -> Result<(), CliError> {
    // No local owner check: the daemon refuses an agent's attempt and audits it.
    call(
        caller,
        RequestBody::Approve {
            code: code.to_string(),
            for_secs: window.map(|w| w.as_secs().max(1)),
        },
    )?;
    match window {
        Some(w) => eprintln!("Approved {code} for {}", humantime::format_duration(w)),
        None => eprintln!("Approved {code} (once)"),
    }
    Ok(())
}

pub(crate) fn deny(caller: &Caller, code: &str) -> Result<(), CliError> {
    call(
        caller,
        RequestBody::Deny {
            code: code.to_string(),
        },
    )?;
    eprintln!("Denied {code}");
    Ok(())
}

/// `agentkeys grants [--json]`: the live grants for high-value services.
pub(crate) fn grants(caller: &Caller, json: bool) -> Result<(), CliError> {
    let ResponseBody::GrantList { grants } = call(caller, RequestBody::ListGrants {})? else {
        return Err(CliError::Input("unexpected answer from agentkeysd".into()));
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &grants).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if grants.is_empty() {
        writeln!(out, "no grants")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<6}  {:<16}  {:<14}  {:<16}  {:<6}  {:>8}  COMMAND",
        "GRANT", "AGENT", "SESSION", "SERVICE", "KIND", "LEFT"
    )?;
    for g in &grants {
        writeln!(
            out,
            "{:<6}  {:<16}  {:<14}  {:<16}  {:<6}  {:>7}s  {}",
            escape(&g.id),
            who(&g.role, g.agent.as_deref()),
            escape(&g.session),
            escape(&g.service),
            if g.once { "once" } else { "window" },
            g.expires_in_secs,
            escape(g.command.as_deref().unwrap_or("(read)"))
        )?;
    }
    Ok(())
}

/// Which grants `agentkeys grants revoke` withdraws.
pub(crate) enum Which {
    /// One, by id.
    One(String),
    /// Every grant of this agent.
    Agent(String),
    /// All of them.
    All,
}

/// `agentkeys grants revoke ID | --agent NAME | --all`.
pub(crate) fn revoke_grants(caller: &Caller, which: Which) -> Result<(), CliError> {
    let (id, agent, all) = match which {
        Which::One(id) => (Some(id), None, false),
        Which::Agent(name) => (None, Some(name), false),
        Which::All => (None, None, true),
    };
    let ResponseBody::GrantsRevoked { count } =
        call(caller, RequestBody::RevokeGrants { id, agent, all })?
    else {
        return Err(CliError::Input("unexpected answer from agentkeysd".into()));
    };
    eprintln!(
        "Withdrew {count} grant{}",
        if count == 1 { "" } else { "s" }
    );
    Ok(())
}
