//! `agentkeys remote info`: what the operator of another host (or VM) needs to reach this
//! daemon's network listener: the pinned fingerprint of its TLS certificate (made and sealed in
//! `tls.enc` on first use) and the exact `config.toml` lines for the other side.

use std::io::Write;

use agentkeys_state::init::open_owner;
use agentkeys_state::tls::load_or_create_tls_identity;
use serde::Serialize;

use crate::CliError;
use crate::ctx::{self, Caller};

/// Largest config.toml read here (the daemon enforces the same).
const MAX_CONFIG_BYTES: u64 = 256 * 1024;

#[derive(Serialize)]
struct Info {
    identity: String,
    fingerprint: String,
    listen: Vec<String>,
}

/// The `[daemon] listen` addresses of config.toml, if any (the daemon checks them; this only
/// shows them).
fn listen_addresses(home: &agentkeys_state::home::Home) -> Vec<String> {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(home.path("config.toml")) else {
        return Vec::new();
    };
    let mut text = String::new();
    if f.take(MAX_CONFIG_BYTES).read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    let Ok(v) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    v.get("daemon")
        .and_then(|d| d.get("listen"))
        .and_then(|l| l.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn info(caller: &Caller, json: bool) -> Result<(), CliError> {
    ctx::require_owner(caller, "remote info")?;
    let home = ctx::home()?;
    let (identity, dek) = open_owner(&home)?;
    let tls = load_or_create_tls_identity(&home, dek.expose())?;
    let info = Info {
        identity: identity.id.clone(),
        fingerprint: tls.fingerprint(),
        listen: listen_addresses(&home),
    };
    drop(tls);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &info).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "identity:    {}", info.identity)?;
    writeln!(out, "fingerprint: {}", info.fingerprint)?;
    let address = match info.listen.iter().find(|a| a.starts_with("tls://")) {
        Some(a) => {
            writeln!(out, "listening:   {}", info.listen.join(", "))?;
            a.clone()
        }
        None => {
            writeln!(
                out,
                "listening:   nowhere yet: add `listen = [\"tls://IP:PORT\"]` under [daemon] in {} \
                 and restart agentkeysd",
                home.path("config.toml").display()
            )?;
            "tls://IP:PORT".to_string()
        }
    };
    writeln!(
        out,
        "\n1. Here, mint the remote daemon's token (valid only on the network listener):\n\n   \
         agentkeys agent add NAME --scope SERVICE,... --remote --out NAME.token\n\n\
         2. Copy NAME.token to the other host (mode 0600, in a private directory), and put this \
         in its $AGENTKEYS_HOME/config.toml:\n"
    )?;
    writeln!(out, "[backends.owner]")?;
    writeln!(out, "kind = \"agentkeys\"")?;
    writeln!(out, "address = \"{address}\"")?;
    writeln!(out, "fingerprint = \"{}\"", info.fingerprint)?;
    writeln!(out, "token_file = \"/path/to/NAME.token\"")?;
    writeln!(out)?;
    writeln!(
        out,
        "[services.SERVICE]   # one section per service its agents use"
    )?;
    writeln!(out, "backend = \"owner\"")?;
    Ok(())
}
