//! `agentkeys pending | approve | deny`: the owner decides approval requests for high-value
//! services. Authenticated by the owner's session and uid, never by having a terminal.

use std::io::Write;
use std::time::Duration;

use agentkeys_proto::wire::{RequestBody, ResponseBody};

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
        "{:<11}  {:<16}  {:<16}  {:>5}  {:>7}  COMMAND",
        "CODE", "AGENT", "SERVICE", "AGE", "EXPIRES"
    )?;
    for r in &requests {
        writeln!(
            out,
            "{:<11}  {:<16}  {:<16}  {:>4}s  {:>6}s  {}",
            r.code,
            r.agent,
            r.service,
            r.age_secs,
            r.expires_in_secs,
            r.command.as_deref().unwrap_or("(read)")
        )?;
    }
    Ok(())
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
