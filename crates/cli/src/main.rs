//! `agentkeys`: the command-line client of agentkeysd.
//!
//! `main` hardens the process (no dumps, no core file), parses arguments and hands them to
//! [`run`]; one place ([`CliError::exit_code`]) turns an error into a message and exit code.
#![forbid(unsafe_code)]

mod doctor;

use std::process::ExitCode;

use agentkeys_hardening::{alloc::WipingAllocator, process};
use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: WipingAllocator = WipingAllocator;

/// agentkeys: a hardened credential broker for AI agents.
#[derive(Debug, Parser)]
#[command(name = "agentkeys", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report how this machine and agentkeys' processes are hardened.
    Doctor {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Everything the CLI can fail with; each maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// A hardening step of the CLI itself failed.
    #[error("hardening the agentkeys process: {0}")]
    Harden(#[from] process::HardenError),
    /// Writing output failed (e.g. a closed pipe).
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Harden(_) => 70, // EX_SOFTWARE: the environment refused a safety step
            CliError::Output(_) => 74, // EX_IOERR
        }
    }
}

/// The CLI is itself a managed runtime: it may map secret pages, so it must not dump core and
/// must not be readable through ptrace or /proc/PID/mem by other same-uid processes.
fn harden_client() -> Result<(), CliError> {
    process::set_dumpable(false)?;
    process::set_core_limit_zero()?;
    Ok(())
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Doctor { json } => doctor::run(json),
    }
}

fn main() -> ExitCode {
    let result = harden_client().and_then(|()| run(Cli::parse()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`agentkeys doctor | head`) is not worth a message.
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::from(141)
        }
        Err(e) => {
            eprintln!("agentkeys: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
