//! `agentkeys daemon [stop]` and `agentkeys status`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use agentkeys_proto::client::ClientError;
use agentkeys_proto::wire::{RequestBody, ResponseBody};

use crate::CliError;
use crate::ctx::{self, Caller};

/// `agentkeysd` next to this executable, else from PATH.
fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("agentkeysd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("agentkeysd"))
}

/// Starts agentkeysd in the background; it detaches itself and its first process exits once
/// the socket is ready, printing where the log is.
pub(crate) fn start(caller: &Caller, extra: &[String]) -> Result<(), CliError> {
    ctx::require_owner(caller, "daemon")?;
    let home = ctx::home()?;
    agentkeys_state::init::open_owner(&home)?;
    if let Ok(pid) = running_pid(caller) {
        println!("agentkeysd is already running (pid {pid})");
        return Ok(());
    }
    let bin = daemon_binary();
    let status = Command::new(&bin)
        .args(extra)
        .status()
        .map_err(|e| CliError::Input(format!("cannot run {}: {e}", bin.display())))?;
    if !status.success() {
        return Err(CliError::Daemon(format!(
            "agentkeysd did not start (exit {}); its log is {}",
            status
                .code()
                .map_or_else(|| "by signal".into(), |c| c.to_string()),
            home.path("agentkeysd.log").display()
        )));
    }
    Ok(())
}

fn running_pid(caller: &Caller) -> Result<u32, CliError> {
    let home = ctx::home()?;
    ctx::runtime()?.block_on(async {
        let (mut c, _) = ctx::connect(&home, caller).await?;
        match c.call(RequestBody::Status {}).await?.body {
            ResponseBody::Status { pid, .. } => Ok(pid),
            other => Err(CliError::Client(agentkeys_proto::client::unexpected(
                &other,
            ))),
        }
    })
}

/// Asks the daemon to stop and waits for its socket to go.
pub(crate) fn stop(caller: &Caller) -> Result<(), CliError> {
    ctx::require_owner(caller, "daemon stop")?;
    let home = ctx::home()?;
    let socket = ctx::socket(&home);
    let asked = ctx::runtime()?.block_on(async {
        match ctx::connect(&home, caller).await {
            Ok((mut c, _)) => c
                .call(RequestBody::Shutdown {})
                .await
                .map(|_| true)
                .map_err(CliError::from),
            Err(CliError::Client(ClientError::NotRunning { .. })) => Ok(false),
            Err(e) => Err(e),
        }
    })?;
    if !asked {
        println!("agentkeysd is not running");
        return Ok(());
    }
    // The daemon first stops its running programs (SIGKILL after `kill_grace`, at most 60 s).
    let limit = Duration::from_secs(75);
    let deadline = Instant::now() + limit;
    let mut told = false;
    while socket.exists() && Instant::now() < deadline {
        if !told && deadline - Instant::now() < limit - Duration::from_secs(3) {
            eprintln!("agentkeys: waiting for agentkeysd to stop its running programs...");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if socket.exists() {
        return Err(CliError::Daemon(format!(
            "agentkeysd was asked to stop but {} is still there after {}s",
            socket.display(),
            limit.as_secs()
        )));
    }
    println!("agentkeysd stopped");
    Ok(())
}

/// Exit 0 when the daemon answers; otherwise a one-line hint and a non-zero exit.
pub(crate) fn status(caller: &Caller, json: bool) -> Result<(), CliError> {
    let home = ctx::home()?;
    let socket = ctx::socket(&home);
    let body = ctx::runtime()?.block_on(async {
        let (mut c, _) = ctx::connect(&home, caller).await?;
        Ok::<_, CliError>(c.call(RequestBody::Status {}).await?.body)
    })?;
    let ResponseBody::Status {
        version,
        pid,
        uptime_secs,
        connections,
    } = body
    else {
        return Err(CliError::Client(agentkeys_proto::client::unexpected(&body)));
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"running": true, "version": version, "pid": pid, "uptime_secs": uptime_secs,
                "connections": connections, "socket": socket})
        );
    } else {
        println!(
            "agentkeysd {version} is running: pid {pid}, up {}, {connections} connection(s), socket {}",
            humantime::format_duration(Duration::from_secs(uptime_secs)),
            socket.display()
        );
    }
    Ok(())
}
