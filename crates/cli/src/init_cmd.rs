//! `agentkeys init [--force]`.

use agentkeys_state::init::{InitOutcome, init};

use crate::CliError;
use crate::ctx;

pub(crate) fn run(force: bool) -> Result<(), CliError> {
    let home = ctx::home()?;
    match init(&home, force)? {
        InitOutcome::Initialized(id) => {
            println!("Initialized as {}", id.id);
            eprintln!("  state:    {}", home.root().display());
            eprintln!(
                "  keystore: {}",
                agentkeys_state::keystore::describe(&home, &id.keystore)
            );
        }
        InitOutcome::AlreadyInitialized(id) => println!("Already initialized as {}", id.id),
        InitOutcome::SessionRenewed(id) => {
            println!("Initialized as {} (new owner session)", id.id);
            // A running daemon must stop accepting the old owner token at once.
            if ctx::notify_daemon(&home)? {
                eprintln!("  agentkeysd reloaded the owner session");
            }
        }
    }
    Ok(())
}
