//! `agentkeys store | list | delete`: the local vault, as the owner (agents list through the
//! daemon, which filters by scope).

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use agentkeys_hardening::page::MAX_SECRET_LEN;
use agentkeys_proto::client::ClientError;
use agentkeys_proto::wire::{RequestBody, ResponseBody, ServiceInfo};
use agentkeys_state::init::open_owner;
use agentkeys_state::vault::{
    DeliveryKind, Policy, PutOutcome, VaultIndex, delete_secret, put_secret, validate_service_name,
};
use zeroize::Zeroizing;

use crate::CliError;
use crate::ctx::{self, Caller};

/// Options of `store`.
pub(crate) struct StoreOpts {
    pub service: String,
    pub high_value: bool,
    pub cache_ttl: Option<Duration>,
    pub allow_inline: bool,
    pub raw: bool,
    pub inject_host: Vec<String>,
    pub inject_header: Vec<String>,
    pub inject_query: Vec<String>,
    pub deliver: Option<Vec<String>>,
}

/// The policy `store` writes, every proxy part checked (before the secret is read).
fn store_policy(o: &StoreOpts) -> Result<Policy, CliError> {
    let deliver = match &o.deliver {
        None => None,
        Some(words) => Some(
            words
                .iter()
                .map(|w| DeliveryKind::parse(w.trim()))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let (inject_hosts, inject_headers, inject_query, deliver) = agentkeys_state::inject::normalise(
        &o.inject_host,
        &o.inject_header,
        &o.inject_query,
        deliver.as_deref(),
    )?;
    // `--deliver inline` is the same permission as --allow-inline.
    let allow_inline = o.allow_inline
        || deliver
            .as_ref()
            .is_some_and(|d| d.contains(&DeliveryKind::Inline));
    Ok(Policy {
        high_value: o.high_value,
        cache_ttl_secs: o.cache_ttl.map_or(0, |d| d.as_secs()),
        allow_inline,
        inject_hosts,
        inject_headers,
        inject_query,
        deliver,
    })
}

pub(crate) fn store(caller: &Caller, o: StoreOpts) -> Result<(), CliError> {
    ctx::require_owner(caller, "store")?;
    validate_service_name(&o.service)?;
    let home = ctx::home()?;
    let (_, dek) = open_owner(&home)?;
    let policy = store_policy(&o)?;
    let secret = read_secret(&o.service, o.raw)?;
    let outcome = put_secret(&home, &dek, &o.service, &secret, policy.clone())?;
    drop(secret);
    let verb = match outcome {
        PutOutcome::Created => "Stored",
        PutOutcome::Replaced => "Replaced",
    };
    eprintln!("{verb} {} in the vault{}", o.service, policy_words(&policy));
    ctx::notify_daemon(&home)?;
    Ok(())
}

fn policy_words(p: &Policy) -> String {
    let mut w = Vec::new();
    if p.high_value {
        w.push("high-value: needs approval".to_string());
    }
    if p.cache_ttl_secs > 0 {
        w.push(format!("cached up to {}s", p.cache_ttl_secs));
    }
    if p.allow_inline {
        w.push("inline delivery allowed".into());
    }
    if !p.inject_hosts.is_empty() {
        w.push(format!("proxy injects into {}", p.inject_hosts.join(" ")));
    }
    if p.deliver.is_some() {
        w.push(format!("delivered only as {}", p.allowed_kinds()));
    }
    if w.is_empty() {
        String::new()
    } else {
        format!("; {}", w.join(", "))
    }
}

/// Reads the secret from stdin: hidden prompt on a terminal, all bytes from a pipe. One trailing
/// newline is dropped unless `raw` (so `echo $TOKEN | agentkeys store x` does what people mean).
fn read_secret(service: &str, raw: bool) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let stdin = std::io::stdin();
    // Capacity reserved up front: the buffer never reallocates, so no partial copy is left.
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_SECRET_LEN + 2));
    if stdin.is_terminal() {
        eprint!("Secret for {service} (input hidden): ");
        std::io::stderr().flush().map_err(CliError::Output)?;
        let _echo = EchoOff::new(&stdin)?;
        let mut line = Zeroizing::new(String::with_capacity(4096));
        // ECHONL stays on, so the terminal itself moves to the next line.
        stdin.read_line(&mut line).map_err(CliError::Output)?;
        buf.extend_from_slice(line.as_bytes());
    } else {
        stdin
            .lock()
            .take(MAX_SECRET_LEN as u64 + 2)
            .read_to_end(&mut buf)
            .map_err(CliError::Output)?;
    }
    if !raw {
        let n = buf.len();
        if buf.ends_with(b"\r\n") {
            buf.truncate(n - 2);
        } else if buf.ends_with(b"\n") {
            buf.truncate(n - 1);
        }
    }
    if buf.is_empty() {
        return Err(CliError::Input(
            "no secret on stdin (nothing stored)".into(),
        ));
    }
    if buf.len() > MAX_SECRET_LEN {
        return Err(CliError::Input(format!(
            "the secret is larger than {MAX_SECRET_LEN} bytes (nothing stored)"
        )));
    }
    Ok(buf)
}

/// Terminal echo off while alive.
struct EchoOff {
    saved: Option<nix::sys::termios::Termios>,
}

impl EchoOff {
    fn new(stdin: &std::io::Stdin) -> Result<EchoOff, CliError> {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        let saved = tcgetattr(stdin).map_err(|e| CliError::Output(e.into()))?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        quiet.local_flags.insert(LocalFlags::ECHONL);
        tcsetattr(stdin, SetArg::TCSANOW, &quiet).map_err(|e| CliError::Output(e.into()))?;
        Ok(EchoOff { saved: Some(saved) })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(s) = self.saved.take() {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                &s,
            );
        }
    }
}

pub(crate) fn list(caller: &Caller, json: bool) -> Result<(), CliError> {
    let home = ctx::home()?;
    let ask_daemon = || {
        ctx::runtime()?.block_on(async {
            let (mut c, _) = ctx::connect(&home, caller).await?;
            match c.call(RequestBody::ListServices {}).await?.body {
                ResponseBody::Services { services } => Ok(services),
                other => Err(CliError::Client(agentkeys_proto::client::unexpected(
                    &other,
                ))),
            }
        })
    };
    let services: Vec<ServiceInfo> = match caller {
        // The owner asks the running daemon, which also knows the services of remote
        // backends (config.toml); without a daemon, the local vault is listed.
        Caller::Owner => match ask_daemon() {
            Ok(s) => s,
            Err(CliError::Client(ClientError::NotRunning { .. })) => {
                open_owner(&home)?;
                let local: Vec<ServiceInfo> = VaultIndex::read(&home)?
                    .list()
                    .into_iter()
                    .map(|m| ServiceInfo {
                        name: m.service,
                        high_value: m.policy.high_value,
                        cache_ttl_secs: m.policy.cache_ttl_secs,
                        allow_inline: m.policy.allow_inline,
                        backend: None,
                        deliver: m.policy.deliver.is_some().then(|| m.policy.allowed_kinds()),
                        inject_hosts: m.policy.inject_hosts,
                    })
                    .collect();
                if !json {
                    eprintln!(
                        "(agentkeysd is not running: the local vault only; services of remote backends are listed by a running daemon)"
                    );
                }
                local
            }
            Err(e) => return Err(e),
        },
        Caller::Agent(_) => ask_daemon()?,
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &services).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if services.is_empty() {
        writeln!(
            out,
            "no services stored (add one with `agentkeys store NAME`)"
        )?;
        return Ok(());
    }
    let w = services
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(7)
        .max(7);
    writeln!(
        out,
        "{:<w$}  {:<10}  {:<9}  {:<6}  SOURCE",
        "SERVICE", "HIGH-VALUE", "CACHE-TTL", "INLINE"
    )?;
    for s in &services {
        let ttl = if s.cache_ttl_secs == 0 {
            "-".to_string()
        } else {
            format!("{}s", s.cache_ttl_secs)
        };
        writeln!(
            out,
            "{:<w$}  {:<10}  {:<9}  {:<6}  {}",
            s.name,
            if s.high_value { "yes" } else { "no" },
            ttl,
            if s.allow_inline { "yes" } else { "no" },
            s.backend.as_deref().unwrap_or("vault")
        )?;
    }
    Ok(())
}

pub(crate) fn delete(caller: &Caller, service: &str) -> Result<(), CliError> {
    ctx::require_owner(caller, "delete")?;
    validate_service_name(service)?;
    let home = ctx::home()?;
    let (_, dek) = open_owner(&home)?;
    if !delete_secret(&home, &dek, service)? {
        return Err(CliError::NotFound(format!(
            "no service named {service:?} in the vault"
        )));
    }
    eprintln!("Deleted {service}");
    ctx::notify_daemon(&home)?;
    Ok(())
}
