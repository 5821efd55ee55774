//! `agentkeys doctor`: the hardening self-test of this process (and, once the broker runs, of
//! the daemon), as a table or JSON.

use std::io::Write;

use agentkeys_hardening::selftest::Report;
use serde::Serialize;

use crate::CliError;

/// JSON shape of `doctor --json`: versioned, one report per process examined.
#[derive(Serialize)]
struct DoctorOutput<'a> {
    version: u32,
    reports: &'a [Report],
}

pub(crate) fn run(json: bool) -> Result<(), CliError> {
    let reports = [Report::for_current_process("agentkeys")];
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &DoctorOutput {
                version: 1,
                reports: &reports,
            },
        )
        .map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        for r in &reports {
            write!(out, "{}", r.to_table())?;
        }
        writeln!(
            out,
            "\nno_new_privs, seccomp and capabilities apply to agentkeysd, not to this client."
        )?;
    }
    Ok(())
}
