//! `agentkeys doctor`: the hardening self-test of this process, the keystore, and the running
//! daemon's own report (made inside its sandbox), as a table or JSON.

use std::io::Write;

use agentkeys_hardening::selftest::{Report, Status};
use agentkeys_proto::client::ClientError;
use agentkeys_proto::wire::{RequestBody, ResponseBody};
use serde::Serialize;

use crate::CliError;
use crate::ctx::{self, Caller};

/// JSON shape of `doctor --json`: versioned, one report per process examined.
#[derive(Serialize)]
struct DoctorOutput<'a> {
    version: u32,
    reports: &'a [serde_json::Value],
    /// Why the daemon's report is absent, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    daemon: Option<String>,
}

/// The daemon's report, or why there is none.
fn daemon_report(caller: &Caller) -> Result<serde_json::Value, String> {
    let home = ctx::home().map_err(|e| e.to_string())?;
    let rt = ctx::runtime().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (mut c, _) = ctx::connect(&home, caller).await.map_err(|e| match e {
            CliError::Client(ClientError::NotRunning { .. }) => {
                "agentkeysd is not running".to_string()
            }
            other => other.to_string(),
        })?;
        match c
            .call(RequestBody::SelfTest {})
            .await
            .map_err(|e| e.to_string())?
            .body
        {
            ResponseBody::SelfTest { report } => Ok(report),
            other => Err(agentkeys_proto::client::unexpected(&other).to_string()),
        }
    })
}

pub(crate) fn run(caller: &Caller, json: bool) -> Result<(), CliError> {
    let mut mine =
        Report::for_current_process("agentkeys", agentkeys_hardening::selftest::Role::Client);
    if let Ok(home) = ctx::home()
        && let Ok(id) = agentkeys_state::identity::load_identity(&home)
    {
        let detail = agentkeys_state::keystore::describe(&home, &id.keystore);
        let status = match id.keystore {
            agentkeys_state::keystore::KeystoreKind::OsKeyring => Status::Ok,
            agentkeys_state::keystore::KeystoreKind::File => Status::Degraded,
        };
        mine.push("keystore", status, detail);
    }
    // Jail readiness (`agentkeys jail`): one item per requirement, each with its fix.
    for item in agentkeys_jail::probe::probe() {
        let (status, detail) = match (&item.ok, &item.fix) {
            (true, _) => (Status::Ok, item.detail.clone()),
            (false, Some(fix)) => (
                Status::Degraded,
                format!(
                    "{}; `agentkeys jail{}` refuses without it (fix: {fix})",
                    item.detail,
                    if item.name == "net_proxy" {
                        " --net proxy"
                    } else {
                        ""
                    }
                ),
            ),
            (false, None) => (Status::Degraded, item.detail.clone()),
        };
        mine.push(&format!("jail_{}", item.name), status, detail);
    }
    let mut reports = vec![serde_json::to_value(&mine).map_err(std::io::Error::from)?];
    let daemon = match daemon_report(caller) {
        Ok(r) => {
            reports.push(r);
            None
        }
        Err(why) => Some(why),
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &DoctorOutput {
                version: 1,
                reports: &reports,
                daemon,
            },
        )
        .map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    write!(out, "{}", mine.to_table())?;
    writeln!(
        out,
        "  (no_new_privs, seccomp and capabilities apply to agentkeysd, not to this client)"
    )?;
    writeln!(out)?;
    match (reports.get(1), daemon) {
        (Some(r), _) => write_table(&mut out, r)?,
        (None, Some(why)) => writeln!(out, "agentkeysd: {why}")?,
        (None, None) => {}
    }
    Ok(())
}

/// Prints a report received as JSON in the same layout as [`Report::to_table`].
fn write_table(out: &mut impl Write, r: &serde_json::Value) -> std::io::Result<()> {
    let items = r["items"].as_array().cloned().unwrap_or_default();
    let w = items
        .iter()
        .filter_map(|i| i["name"].as_str().map(str::len))
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(
        out,
        "{} (pid {})",
        r["process"].as_str().unwrap_or("agentkeysd"),
        r["pid"]
    )?;
    writeln!(
        out,
        "  {:<w$}  {:<8}  {:<8}  DETAIL",
        "ITEM", "STATUS", "NEED"
    )?;
    let (mut failed, mut weaker) = (Vec::new(), Vec::new());
    for i in &items {
        let name = i["name"].as_str().unwrap_or("?");
        let status = i["status"].as_str().unwrap_or("?");
        let required = i["required"].as_bool().unwrap_or(false);
        writeln!(
            out,
            "  {:<w$}  {:<8}  {:<8}  {}",
            name,
            status,
            if required { "required" } else { "optional" },
            i["detail"].as_str().unwrap_or("")
        )?;
        if status != "ok" {
            if required { &mut failed } else { &mut weaker }.push(name);
        }
    }
    // The same summary line as `Report::summary`.
    if failed.is_empty() {
        write!(out, "  required: all ok")?;
    } else {
        write!(out, "  required but not in place: {}", failed.join(", "))?;
    }
    if !weaker.is_empty() {
        write!(out, "; optional, not in place here: {}", weaker.join(", "))?;
    }
    writeln!(out)?;
    Ok(())
}
