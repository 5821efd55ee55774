//! `agentkeys mcp` through the real daemon, driven over stdio by two independent MCP clients:
//! rmcp's client (child-process transport) and the official Python SDK (`tests/mcp_python`).
//! The tools are listed with input schemas; `run` returns masked output and the exit code;
//! `get_credential` gives no byte of a non-inline secret without fd support, the value of an
//! `--allow-inline` one, and, with an fd channel, an fd that maps to the value; out-of-scope
//! requests are error results and audited `deny`.
#![forbid(unsafe_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use agentkeys_e2e::{TestHome, bin, text, workspace_root};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation,
};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::TokioChildProcess;
use rmcp::{ServiceError, ServiceExt};
use serde_json::{Value, json};

const CANARY: &str = "ghp_AkMcpCanary5f4e3d2c1b0a99";
const INLINE: &str = "ak-inline-mcp-value-77aa55";
const OTHER: &str = "ak-out-of-scope-mcp-3141592";

/// A home with `github` (fd/run only), `pub` (--allow-inline) and `prod` (out of the agent's
/// scope) stored, a running daemon, and an agent token file for scope `github,pub`.
fn ready(tag: &str) -> (TestHome, PathBuf) {
    let mut h = TestHome::initialized(tag);
    for (args, value) in [
        (&["store", "github"][..], CANARY),
        (&["store", "pub", "--allow-inline"][..], INLINE),
        (&["store", "prod"][..], OTHER),
    ] {
        let out = h.run_stdin(args, value.as_bytes());
        assert!(out.status.success(), "{}", text(&out));
    }
    h.start_daemon(&[]);
    let token_file = h.agent_token_file("bot", "github,pub");
    (h, token_file)
}

/// `agentkeys mcp ARGS` as the agent of `token_file`, as a tokio command.
fn mcp_command(h: &TestHome, token_file: &Path, extra: &[String]) -> tokio::process::Command {
    let mut c = std::process::Command::new(bin("agentkeys"));
    c.arg("mcp").args(extra);
    h.env(&mut c);
    c.env("AGENTKEYS_TOKEN_FILE", token_file);
    let log = std::fs::File::create(h.dir.join("mcp.log")).expect("mcp log");
    c.stderr(Stdio::from(log));
    tokio::process::Command::from(c)
}

async fn connect(
    h: &TestHome,
    token_file: &Path,
    extra: &[String],
    fd_capable: bool,
) -> RunningService<RoleClient, ClientConfig> {
    let transport = TokioChildProcess::new(mcp_command(h, token_file, extra)).expect("spawn mcp");
    let mut caps = ClientCapabilities::default();
    if fd_capable {
        let mut x = std::collections::BTreeMap::new();
        x.insert("agentkeys/fd".to_string(), serde_json::Map::new());
        caps.experimental = Some(x);
    }
    let config = ClientConfig::new(caps, Implementation::new("agentkeys-e2e", "0"));
    config.serve(transport).await.expect("MCP initialize")
}

async fn call(
    c: &RunningService<RoleClient, ClientConfig>,
    name: &'static str,
    args: Value,
) -> Result<CallToolResult, ServiceError> {
    let Value::Object(args) = args else {
        panic!("arguments must be an object")
    };
    c.call_tool(CallToolRequestParams::new(name).with_arguments(args))
        .await
}

fn audit(h: &TestHome) -> Vec<Value> {
    std::fs::read_to_string(h.home().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

fn is_error(r: &CallToolResult) -> bool {
    r.is_error == Some(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_run_credentials_and_scope_with_rmcp() {
    let (h, token_file) = ready("mcp-rmcp");
    let c = connect(&h, &token_file, &[], false).await;

    // The four tools, each with an input schema.
    let tools = c.list_all_tools().await.expect("tools/list");
    let mut names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        ["get_credential", "list_credentials", "run", "whoami"]
    );
    let run_tool = tools.iter().find(|t| t.name == "run").unwrap();
    let schema = serde_json::to_value(&run_tool.input_schema).unwrap();
    for field in [
        "command",
        "args",
        "env",
        "files",
        "cwd",
        "stdin",
        "timeout_secs",
    ] {
        assert!(
            schema["properties"].get(field).is_some(),
            "run schema lacks {field}: {schema}"
        );
    }
    assert!(
        run_tool
            .description
            .as_deref()
            .unwrap_or_default()
            .contains("GH_TOKEN")
    );
    let gc = tools.iter().find(|t| t.name == "get_credential").unwrap();
    let schema = serde_json::to_value(&gc.input_schema).unwrap();
    assert!(schema["properties"].get("service").is_some(), "{schema}");

    // whoami and list_credentials: scope and names, no values.
    let who = call(&c, "whoami", json!({})).await.unwrap();
    assert!(!is_error(&who), "{who:?}");
    let s = who.structured_content.clone().unwrap();
    assert_eq!(s["agent"], "bot");
    assert_eq!(s["scope"], json!(["github", "pub"]));
    let list = call(&c, "list_credentials", json!({})).await.unwrap();
    assert!(!is_error(&list), "{list:?}");
    let s = list.structured_content.clone().unwrap();
    let listed: Vec<&str> = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert!(listed.contains(&"github") && listed.contains(&"pub"), "{s}");
    assert!(!listed.contains(&"prod"), "{s}");
    let all = serde_json::to_string(&list).unwrap();
    assert!(!all.contains(CANARY) && !all.contains(INLINE));

    // run with an env mapping: the child has the secret, the output is masked.
    let r = call(
        &c,
        "run",
        json!({
            "command": "sh",
            "args": ["-c", "echo \"token=$GH_TOKEN\"; printf %s \"$GH_TOKEN\" >&2; read line; echo \"in=$line\"; test \"$GH_TOKEN\" = \"$WANT\" || exit 9; exit 3"],
            "env": {"GH_TOKEN": "github"},
            "stdin": "hello\n",
        }),
    )
    .await
    .unwrap();
    let whole = serde_json::to_string(&r).unwrap();
    assert!(!whole.contains(CANARY), "secret in the run result: {whole}");
    let s = r.structured_content.clone().unwrap();
    // $WANT is unset, so the comparison fails: exit 9 proves the child saw a non-empty value.
    assert_eq!(s["exit_code"], 9, "{whole}");
    assert!(
        s["stdout"].as_str().unwrap().contains("token=********"),
        "{whole}"
    );
    assert!(
        s["stdout"].as_str().unwrap().contains("in=hello"),
        "{whole}"
    );
    assert!(
        s["stderr"].as_str().unwrap().contains("********"),
        "{whole}"
    );
    assert_eq!(s["truncated"], false);
    assert_eq!(s["timed_out"], false);
    assert!(
        r.content[0]
            .as_text()
            .unwrap()
            .text
            .contains("exit_code: 9")
    );
    // The plain exit code comes back, and the child really has the secret.
    let r = call(
        &c,
        "run",
        json!({"command": "sh", "args": ["-c", format!("test \"$T\" = '{CANARY}' && exit 3")], "env": {"T": "github"}}),
    )
    .await
    .unwrap();
    assert_eq!(r.structured_content.as_ref().unwrap()["exit_code"], 3);
    // The MCP server's own token is not passed on.
    let r = call(
        &c,
        "run",
        json!({"command": "sh", "args": ["-c", "env | grep -c '^AGENTKEYS_TOKEN' || true"]}),
    )
    .await
    .unwrap();
    assert_eq!(
        r.structured_content.as_ref().unwrap()["stdout"]
            .as_str()
            .unwrap()
            .trim(),
        "0"
    );
    // Not found, truncation, timeout.
    let r = call(&c, "run", json!({"command": "agentkeys-no-such-command"}))
        .await
        .unwrap();
    assert_eq!(
        r.structured_content.as_ref().unwrap()["exit_code"],
        127,
        "{r:?}"
    );
    let r = call(
        &c,
        "run",
        json!({"command": "sh", "args": ["-c", "head -c 200000 /dev/zero | tr '\\0' x"]}),
    )
    .await
    .unwrap();
    let s = r.structured_content.clone().unwrap();
    assert_eq!(s["truncated"], true);
    assert_eq!(s["stdout"].as_str().unwrap().len(), 64 * 1024);
    let r = call(
        &c,
        "run",
        json!({"command": "sleep", "args": ["30"], "timeout_secs": 1}),
    )
    .await
    .unwrap();
    let s = r.structured_content.clone().unwrap();
    assert_eq!(s["timed_out"], true, "{s}");
    assert_eq!(s["exit_code"], 128 + 15, "{s}");

    // get_credential without fd support on a non-inline service: an error, no secret byte.
    let r = call(&c, "get_credential", json!({"service": "github"}))
        .await
        .unwrap();
    assert!(is_error(&r), "{r:?}");
    let whole = serde_json::to_string(&r).unwrap();
    assert!(!whole.contains(CANARY), "{whole}");
    assert!(
        !whole.contains(&CANARY[..12]),
        "part of the secret in: {whole}"
    );
    assert!(whole.contains("run"), "{whole}");
    // An --allow-inline service returns its value.
    let r = call(&c, "get_credential", json!({"service": "pub"}))
        .await
        .unwrap();
    assert!(!is_error(&r), "{r:?}");
    assert_eq!(r.structured_content.as_ref().unwrap()["value"], INLINE);

    // Out of scope: error results, audited deny.
    let r = call(&c, "get_credential", json!({"service": "prod"}))
        .await
        .unwrap();
    assert!(is_error(&r), "{r:?}");
    assert!(!serde_json::to_string(&r).unwrap().contains(OTHER));
    let r = call(
        &c,
        "run",
        json!({"command": "sh", "args": ["-c", "echo $X"], "env": {"X": "prod"}}),
    )
    .await
    .unwrap();
    assert!(is_error(&r), "{r:?}");
    assert!(!serde_json::to_string(&r).unwrap().contains(OTHER));
    let denies = audit(&h)
        .into_iter()
        .filter(|r| r["service"] == "prod" && r["event"] == "deny")
        .count();
    assert!(denies >= 2, "audit: {:?}", audit(&h));

    c.cancel().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_start_without_an_agent_token() {
    let h = TestHome::initialized("mcp-notoken");
    let out = h.run(&["mcp"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent token"), "{err}");
    assert!(err.contains("AGENTKEYS_TOKEN_FILE"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_channel_delivers_an_fd_that_maps_to_the_value() {
    use agentkeys_hardening::page::MappedSecret;
    use nix::fcntl::{FcntlArg, OFlag, fcntl};

    let (h, token_file) = ready("mcp-fd");
    // Our end close-on-exec; the child's end inheritable, its number passed on the command line.
    let (ours, theirs) = agentkeys_e2e::fd_channel_pair();
    let extra = vec!["--fd-channel".to_string(), theirs.as_raw_fd().to_string()];
    let c = connect(&h, &token_file, &extra, true).await;
    drop(theirs);
    fcntl(&ours, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let mut chan = agentkeys_proto::conn::Conn::new(
        tokio_seqpacket::UnixSeqpacket::try_from(ours).expect("seqpacket"),
    );

    let r = call(&c, "get_credential", json!({"service": "github"}))
        .await
        .unwrap();
    assert!(!is_error(&r), "{r:?}");
    let whole = serde_json::to_string(&r).unwrap();
    assert!(!whole.contains(CANARY), "{whole}");
    let s = r.structured_content.clone().unwrap();
    assert_eq!(s["delivery"], "fd");
    let handle = s["handle"].as_str().unwrap().to_string();

    let packet = tokio::time::timeout(std::time::Duration::from_secs(10), chan.recv())
        .await
        .expect("fd within 10 s")
        .expect("packet");
    let msg: Value = serde_json::from_slice(&packet.data).unwrap();
    assert_eq!(msg["handle"], handle);
    assert_eq!(msg["service"], "github");
    let fd = packet.fds.into_iter().next().expect("an fd");
    let page = MappedSecret::map(fd).expect("map");
    assert_eq!(&page[..], CANARY.as_bytes());

    // Out of scope still refused on the fd path, and audited.
    let r = call(&c, "get_credential", json!({"service": "prod"}))
        .await
        .unwrap();
    assert!(is_error(&r), "{r:?}");
    assert!(
        audit(&h)
            .iter()
            .any(|r| r["service"] == "prod" && r["event"] == "deny")
    );
    c.cancel().await.expect("close");
}

/// The Python interpreter with the `mcp` SDK: `$AGENTKEYS_TEST_PYTHON` (set by `.ci/run`), else
/// `python3` when it can import `mcp`.
fn python_with_mcp() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AGENTKEYS_TEST_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = workspace_root().join(".venv-mcp/bin/python");
    for cand in [venv, PathBuf::from("python3")] {
        let ok = std::process::Command::new(&cand)
            .args(["-c", "import mcp.client.stdio"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(cand);
        }
    }
    None
}

#[test]
fn the_same_flows_with_the_python_sdk() {
    let Some(python) = python_with_mcp() else {
        println!(
            "SKIP: no Python with the `mcp` SDK (set AGENTKEYS_TEST_PYTHON, or run .ci/run which creates .venv-mcp)"
        );
        return;
    };
    let (h, token_file) = ready("mcp-py");
    let script = workspace_root().join("tests/mcp_python/client.py");
    let mut c = std::process::Command::new(&python);
    c.arg(&script).arg(bin("agentkeys"));
    h.env(&mut c);
    c.env("AGENTKEYS_TOKEN_FILE", &token_file)
        .env("AK_CANARY", CANARY)
        .env("AK_INLINE", INLINE)
        .env("AK_OTHER", OTHER)
        .stdin(Stdio::null());
    let out = c.output().expect("run python");
    assert!(
        out.status.success(),
        "python MCP client failed: {}\n--- mcp log\n{}",
        text(&out),
        std::fs::read_to_string(h.dir.join("mcp.log")).unwrap_or_default()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("OK python mcp client"), "{}", text(&out));
    assert!(
        !stdout.contains(CANARY) && !stdout.contains(OTHER),
        "{}",
        text(&out)
    );
    let denies = audit(&h)
        .into_iter()
        .filter(|r| r["service"] == "prod" && r["event"] == "deny")
        .count();
    assert!(denies >= 2, "audit: {:?}", audit(&h));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_value_tools_return_a_pending_result_with_the_code() {
    let mut h = TestHome::initialized("mcp-pending");
    // --allow-inline too: without it this client could never take the value, so the request is
    // refused before anyone is asked to approve it.
    let out = h.run_stdin(
        &["store", "vaulted", "--high-value", "--allow-inline"],
        CANARY.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out));
    h.start_daemon(&[]);
    let token_file = h.agent_token_file("bot", "vaulted");
    let c = connect(&h, &token_file, &[], false).await;
    for (tool, args) in [
        ("get_credential", serde_json::json!({"service": "vaulted"})),
        (
            "run",
            serde_json::json!({"command": "true", "env": {"T": "vaulted"}}),
        ),
    ] {
        let r = call(&c, tool, args).await.expect("tool call");
        assert!(is_error(&r), "{tool} was not refused");
        let whole = serde_json::to_string(&r).unwrap();
        assert!(
            whole.contains("agentkeys approve "),
            "{tool}: no approval command in {whole}"
        );
        assert!(whole.contains("pending"), "{tool}: {whole}");
        assert!(
            !whole.contains(CANARY),
            "{tool}: secret in the pending result"
        );
    }
    assert!(audit(&h).iter().any(|r| r["event"] == "pending"));
    c.cancel().await.ok();
}
