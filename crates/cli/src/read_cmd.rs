//! `agentkeys read SERVICE`: the CLI as a managed runtime. The daemon sends a `memfd_secret`
//! fd; it is mapped read-only, exactly its bytes go to stdout, and it is unmapped and closed.
//! Meant for pipes into programs that read a secret from stdin, not for terminals.

use crate::CliError;
use crate::ctx::{self, Caller};

pub(crate) fn run(
    caller: &Caller,
    service: &str,
    inline: bool,
    wait: bool,
) -> Result<(), CliError> {
    let home = ctx::home()?;
    ctx::runtime()?.block_on(async {
        let (mut c, _) = ctx::connect(&home, caller).await?;
        let mut waiting_on: Option<String> = None;
        let secret = loop {
            match c.get_credential(service, inline).await {
                Err(agentkeys_proto::client::ClientError::Pending { message, code, service }) if wait => {
                    ctx::keep_waiting(&mut waiting_on, code, service, &message)?;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                other => break other?,
            }
        };
        if secret.degraded() {
            eprintln!("agentkeys: warning: delivered through the degraded sealed-memfd fallback (no memfd_secret)");
        }
        // Straight from the page to fd 1 with write(2): std's stdout buffer would keep a copy
        // of the value in the heap for the rest of the process (tests/canary.rs).
        let stdout = std::io::stdout().lock();
        let mut rest = secret.bytes();
        while !rest.is_empty() {
            match nix::unistd::write(&stdout, rest) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                Ok(n) => rest = &rest[n..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
        }
        Ok(())
    })
}
