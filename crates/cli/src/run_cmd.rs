//! `agentkeys run [--env VAR=SERVICE]... [--file VAR=SERVICE]... [--proxy VAR=SERVICE]...
//! [--no-masking] [--cwd DIR]
//! -- CMD [ARGS...]`: the daemon's launcher starts CMD with the secrets in its environment (or
//! in readable files); this process only passes its stdin, stdout and stderr along and never
//! holds a secret. It sends its environment, working directory and umask along. SIGINT,
//! SIGTERM and SIGHUP are forwarded; the exit status is CMD's. If this process goes away the
//! daemon stops the whole run.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::PathBuf;

use agentkeys_proto::client::ClientError;
use agentkeys_proto::wire::{ErrorCode, RequestBody, ResponseBody};
use tokio::signal::unix::{SignalKind, signal};

use crate::CliError;
use crate::ctx::{self, Caller};

/// Options of `run`.
pub(crate) struct RunOpts {
    pub env: Vec<String>,
    pub file: Vec<String>,
    pub proxy: Vec<String>,
    pub no_masking: bool,
    pub wait: bool,
    pub cwd: Option<PathBuf>,
    pub command: Vec<String>,
}

pub(crate) fn pairs(list: &[String], flag: &str) -> Result<BTreeMap<String, String>, CliError> {
    let mut map = BTreeMap::new();
    for item in list {
        let (var, service) = item
            .split_once('=')
            .filter(|(v, s)| !v.is_empty() && !s.is_empty())
            .ok_or_else(|| {
                CliError::Input(format!(
                    "{flag} takes VAR=SERVICE, e.g. {flag} GH_TOKEN=github"
                ))
            })?;
        if map.insert(var.to_string(), service.to_string()).is_some() {
            return Err(CliError::Input(format!("{var} is given twice")));
        }
    }
    Ok(map)
}

pub(crate) fn run(caller: &Caller, o: RunOpts) -> Result<(), CliError> {
    let env = pairs(&o.env, "--env")?;
    let files = pairs(&o.file, "--file")?;
    let proxy = pairs(&o.proxy, "--proxy")?;
    let cwd = match o.cwd {
        Some(d) => std::path::absolute(d).map_err(CliError::Output)?,
        None => std::env::current_dir().map_err(CliError::Output)?,
    };
    let cwd = cwd
        .into_os_string()
        .into_string()
        .map_err(|_| CliError::Input("the working directory is not valid UTF-8".into()))?;
    // The caller's environment, minus agentkeys' own tokens; non-UTF-8 entries cannot travel.
    // A name given twice (possible in a raw environment) is sent once, with the value this
    // process's own getenv sees (the first): the daemon refuses duplicates.
    let mut seen = std::collections::HashSet::new();
    let caller_env: Vec<String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| !k.is_empty() && !k.starts_with("AGENTKEYS_TOKEN"))
        .filter(|(k, _)| seen.insert(k.clone()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // The program creates files as the caller would, not with the daemon's 077.
    let umask = agentkeys_proto::client::current_umask();
    let home = ctx::home()?;
    let code = ctx::runtime()?.block_on(async {
        // Handlers first: a signal that arrives while the program starts is held and forwarded
        // once it runs, instead of killing this process with the default action.
        let (mut int, mut term, mut hup) = (
            signal(SignalKind::interrupt()).map_err(CliError::Output)?,
            signal(SignalKind::terminate()).map_err(CliError::Output)?,
            signal(SignalKind::hangup()).map_err(CliError::Output)?,
        );
        let (mut client, _) = ctx::connect(&home, caller).await?;
        let stdin = std::io::stdin();
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let mut waiting_on: Option<String> = None;
        loop {
            client
                .send(
                    RequestBody::Run {
                        argv: o.command.clone(),
                        env: env.clone(),
                        files: files.clone(),
                        proxy: proxy.clone(),
                        caller_env: caller_env.clone(),
                        cwd: Some(cwd.clone()),
                        masking: !o.no_masking,
                        umask,
                    },
                    &[stdin.as_fd(), stdout.as_fd(), stderr.as_fd()],
                )
                .await?;
            match client.recv().await {
                Ok(a) if matches!(a.body, ResponseBody::RunStarted { .. }) => break,
                Ok(a) => return Err(CliError::Client(agentkeys_proto::client::unexpected(&a.body))),
                Err(ClientError::Refused { code: ErrorCode::CommandNotFound, message }) => {
                    eprintln!("agentkeys: {message}");
                    return Ok(127);
                }
                Err(ClientError::Refused { code: ErrorCode::CannotExecute, message }) => {
                    eprintln!("agentkeys: {message}");
                    return Ok(126);
                }
                // A high-value service with --wait: ask again until the owner decides.
                Err(ClientError::Pending { message, code, service }) if o.wait => {
                    ctx::keep_waiting(&mut waiting_on, code, service, &message)?;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        loop {
            let forward = tokio::select! {
                answer = client.recv() => {
                    return match answer?.body {
                        ResponseBody::RunExit { code: Some(c), .. } => Ok(u8::try_from(c & 0xff).unwrap_or(1)),
                        ResponseBody::RunExit { signal: Some(s), .. } => Ok(u8::try_from(128 + (s & 0x7f)).unwrap_or(1)),
                        other => Err(CliError::Client(agentkeys_proto::client::unexpected(&other))),
                    };
                }
                _ = int.recv() => nix::sys::signal::Signal::SIGINT,
                _ = term.recv() => nix::sys::signal::Signal::SIGTERM,
                _ = hup.recv() => nix::sys::signal::Signal::SIGHUP,
            };
            client.send(RequestBody::Signal { signal: forward as i32 }, &[]).await?;
        }
    })?;
    if code == 0 {
        Ok(())
    } else {
        Err(CliError::Exit(code))
    }
}
