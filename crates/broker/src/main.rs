//! `agentkeysd`: parses arguments, hardens itself, and reports.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use agentkeys_broker::startup::{self, StartupOptions};
use agentkeys_hardening::alloc::WipingAllocator;
use agentkeys_hardening::selftest::{Report, Status};
use clap::Parser;

#[global_allocator]
static ALLOC: WipingAllocator = WipingAllocator;

/// agentkeysd: the sandboxed agentkeys credential broker.
#[derive(Debug, Parser)]
#[command(name = "agentkeysd", version, about, max_term_width = 100)]
struct Args {
    /// Start even when a debugger is attached (prints a warning; the debugger sees secrets).
    #[arg(long)]
    allow_debugger: bool,
    /// Refuse to start when kernel.yama.ptrace_scope is 0 or the kernel has no Yama.
    #[arg(long)]
    require_ptrace_scope: bool,
    /// Run the full start-up hardening, print the self-test report, and exit
    /// (0 when nothing is missing).
    #[arg(long)]
    self_test: bool,
    /// With --self-test: print JSON.
    #[arg(long, requires = "self_test")]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = StartupOptions {
        allow_debugger: args.allow_debugger,
        require_ptrace_scope: args.require_ptrace_scope,
        keep_fds: Vec::new(),
    };
    let hardened = match startup::harden(&opts) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("agentkeysd: refusing to start: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    for w in &hardened.warnings {
        eprintln!("agentkeysd: WARNING: {w}");
    }
    let report = Report::for_current_process("agentkeysd");
    if args.self_test {
        if args.json {
            match serde_json::to_string_pretty(&report) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("agentkeysd: error: encoding report: {e}");
                    return ExitCode::from(70);
                }
            }
        } else {
            print!("{}", report.to_table());
        }
        return if report.worst() == Status::Missing {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    eprint!("{}", report.to_table());
    eprintln!("agentkeysd: the socket server is not built yet; use --self-test to check hardening");
    ExitCode::from(2)
}
