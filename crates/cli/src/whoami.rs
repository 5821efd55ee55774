//! `agentkeys whoami [--json]`: identity, role, scope, expiry and time left. Never a token.

use std::io::Write;

use agentkeys_proto::wire::{Role, SessionInfo};
use agentkeys_state::init::open_owner;
use agentkeys_state::session::load_owner_session;
use serde::Serialize;

use crate::CliError;
use crate::ctx::{self, Caller};

#[derive(Serialize)]
struct Whoami<'a> {
    #[serde(flatten)]
    info: &'a SessionInfo,
    time_left_secs: u64,
}

pub(crate) fn run(caller: &Caller, json: bool) -> Result<(), CliError> {
    let home = ctx::home()?;
    let info = match caller {
        // The owner's session is local: whoami works with the daemon stopped.
        Caller::Owner => {
            let (identity, dek) = open_owner(&home)?;
            let s = load_owner_session(&home, dek.expose())?;
            if s.expires <= ctx::now() {
                return Err(CliError::Auth(format!(
                    "the owner session expired at {}; run `agentkeys init --force` for a new one",
                    ctx::when(s.expires)
                )));
            }
            SessionInfo {
                identity: identity.id,
                role: Role::Owner,
                agent: None,
                session: Some(s.token.hash().session_id()),
                scope: s.scope.clone(),
                created: s.created,
                expires: s.expires,
                uid: Some(nix::unistd::geteuid().as_raw()),
                jail: None,
            }
        }
        // An agent knows nothing but its token: the daemon answers.
        Caller::Agent(_) => {
            ctx::runtime()?.block_on(async { ctx::connect(&home, caller).await.map(|(_, i)| i) })?
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        let w = Whoami {
            info: &info,
            time_left_secs: info.expires.saturating_sub(ctx::now()),
        };
        serde_json::to_writer_pretty(&mut out, &w).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "identity  {}", info.identity)?;
    match (&info.role, &info.agent) {
        (Role::Agent, Some(name)) => match &info.jail {
            Some(j) => writeln!(out, "role      agent {name}, jailed ({j})")?,
            None => writeln!(out, "role      agent {name}")?,
        },
        _ => writeln!(out, "role      owner")?,
    }
    if let Some(session) = &info.session {
        writeln!(out, "session   {session}")?;
    }
    writeln!(out, "scope     {}", info.scope.join(","))?;
    if let Some(uid) = info.uid {
        writeln!(out, "uid       {uid}")?;
    }
    writeln!(out, "created   {}", ctx::when(info.created))?;
    writeln!(
        out,
        "expires   {} ({} left)",
        ctx::when(info.expires),
        ctx::left(info.expires)
    )?;
    Ok(())
}
