//! Sessions and grants are exact (issue 14, items 1, 2, 3 and 8), through the real daemon: a
//! connection belongs to the session it authenticated with, not to an agent's name; expiry
//! closes idle connections; a session that was replaced gets nothing from its successor; the
//! owner is a kind, not a name; approval requests and grants belong to one session and end
//! with it; once-grants lapse; the owner lists and withdraws grants; what an agent chose is
//! escaped before it reaches the owner's terminal.
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentkeys_e2e::{TestHome, code_from, is_root, text, wait_until};
use agentkeys_proto::client::{Client, ClientError};
use agentkeys_proto::wire::ErrorCode;
use secrecy::SecretString;

const SECRET_LOW: &str = "ak-canary-low-5f0e1d2c3b4a";
const SECRET_HIGH: &str = "ak-canary-high-9a8b7c6d5e4f";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn audit(h: &TestHome) -> Vec<serde_json::Value> {
    h.audit()
}

/// `agentkeys ARGS` as the owner, but aimed at a socket nobody listens on: the state files
/// change and the daemon is not told (as when the owner works while the daemon is unreachable,
/// or two changes land between two of its reloads).
fn run_unnoticed(h: &TestHome, args: &[&str]) -> std::process::Output {
    let mut c = h.cli(args);
    c.env("AGENTKEYS_SOCKET", h.dir.join("nobody-listens.sock"))
        .stdin(Stdio::null());
    c.output().unwrap()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A daemon with `low` (plain) and `sensitive` (high-value) stored.
fn daemon(tag: &str, config: Option<&str>) -> TestHome {
    let mut h = TestHome::initialized(tag);
    for (svc, value, flags) in [
        ("low", SECRET_LOW, &[][..]),
        ("high", SECRET_HIGH, &[][..]),
        ("sensitive", SECRET_HIGH, &["--high-value"][..]),
    ] {
        let mut args = vec!["store", svc];
        args.extend_from_slice(flags);
        assert!(h.run_stdin(&args, value.as_bytes()).status.success());
    }
    if let Some(c) = config {
        h.write_config(c);
    }
    h.start_daemon(&[]);
    h
}

/// Item 1: an agent token that expires while its connection is idle is closed by the daemon's
/// one-second tick, not only at the next request.
#[test]
fn an_idle_connection_of_an_expired_session_is_closed() {
    let h = daemon("idle-expiry", None);
    let token = h.add_agent("brief", "low", &["--ttl", "2s"]);
    let started = Instant::now();
    runtime().block_on(async {
        let (mut c, info) = Client::connect_with(&h.socket(), &SecretString::from(token))
            .await
            .unwrap();
        assert_eq!(info.agent.as_deref(), Some("brief"));
        // Say nothing: the daemon must speak first, when the session expires.
        let first = tokio::time::timeout(Duration::from_secs(8), c.recv())
            .await
            .expect("the daemon did not close the idle connection of an expired session");
        match first {
            Err(ClientError::Refused {
                code: ErrorCode::Expired,
                message,
            }) => assert!(message.contains("expired"), "{message}"),
            other => panic!("expected an `expired` answer, got {:?}", other.err()),
        }
        assert!(matches!(c.recv().await, Err(ClientError::Closed)));
    });
    // Expiry is at most 2 s away (whole seconds), the tick runs every second.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Item 1: a connection is bound to its session, not to the agent's name. The agent is revoked
/// and added again under the same name with a wider scope while the daemon is not told; the old
/// connection's next request finds its session replaced: refused, closed, nothing delivered.
/// (Before, it was checked against the new record and got the new scope.)
#[test]
fn a_replaced_session_gets_nothing_from_its_successor() {
    let h = daemon("replaced", None);
    let old = h.add_agent("bot", "low", &[]);
    runtime().block_on(async {
        let (mut c, _) = Client::connect_with(&h.socket(), &SecretString::from(old.clone()))
            .await
            .unwrap();
        let low = c.get_credential("low", false).await.unwrap();
        assert_eq!(low.bytes(), SECRET_LOW.as_bytes());
        drop(low);

        for args in [
            &["agent", "revoke", "bot"][..],
            &["agent", "add", "bot", "--scope", "low,high"][..],
        ] {
            let out = run_unnoticed(&h, args);
            assert!(out.status.success(), "{}", text(&out));
        }
        // The old connection asks for what only the new session may have.
        match c.get_credential("high", false).await {
            Err(ClientError::Refused {
                code: ErrorCode::Revoked,
                message,
            }) => assert!(message.contains("replaced"), "{message}"),
            Ok(_) => panic!("the old connection got the new session's scope"),
            Err(e) => panic!("expected `revoked` (replaced), got {e}"),
        }
        assert!(matches!(c.recv().await, Err(ClientError::Closed)));
    });
    assert!(
        !audit(&h)
            .iter()
            .any(|r| r["event"] == "deliver" && r["service"] == "high"),
        "something of `high` was delivered"
    );
    // The old token is dead, on a new connection too.
    assert_eq!(h.run_agent(&old, &["read", "low"]).status.code(), Some(4));
}

/// Item 1, across uids: an agent bound to uid 65534 holds a connection; it is replaced by an
/// agent of the same name bound to the daemon's uid (daemon not told). The connection from uid
/// 65534, no longer allowed, is refused at its next request.
#[test]
fn a_connection_from_a_uid_no_longer_bound_is_refused() {
    if !is_root() {
        eprintln!(
            "SKIP a_connection_from_a_uid_no_longer_bound_is_refused: needs root to run a client as another uid"
        );
        return;
    }
    // A Python other uids can run (root's own, e.g. under pyenv, may sit in a 0700 home).
    let python = "/usr/bin/python3";
    for tool in ["setpriv", python] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!(
                "SKIP a_connection_from_a_uid_no_longer_bound_is_refused: {tool} is not installed"
            );
            return;
        }
    }
    let h = daemon("uid-rebind", Some("[daemon]\nsocket_group = \"nogroup\"\n"));
    let token = h.add_agent("nb", "low,high", &["--uid", "65534"]);
    // A client under uid 65534: hello, then one request per line of stdin, each answer's kind
    // (and error code) on stdout.
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
def call(i, body):
    s.send(json.dumps({"v": 1, "id": i, "body": body}).encode())
    data = s.recv(65536)
    if not data:
        return "closed"
    b = json.loads(data)["body"]
    return b["kind"] + ("/" + b["code"] if b["kind"] == "error" else "")
print(call(1, {"kind": "hello", "token": sys.argv[2]}), flush=True)
for i, line in enumerate(sys.stdin, start=2):
    print(call(i, {"kind": "list_services"}), flush=True)
"#;
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([python, "-c", script])
        .arg(h.socket())
        .arg(&token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
    let first = next();
    if first != "welcome" {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("no welcome ({first:?}): {}", text(&out));
    }
    writeln!(stdin, "list").unwrap();
    assert_eq!(next(), "services");

    for args in [
        &["agent", "revoke", "nb"][..],
        &["agent", "add", "nb", "--scope", "low,high"][..],
    ] {
        let out = run_unnoticed(&h, args);
        assert!(out.status.success(), "{}", text(&out));
    }
    writeln!(stdin, "list").unwrap();
    assert_eq!(
        next(),
        "error/revoked",
        "the old connection from uid 65534 was served"
    );
    drop(stdin);
    let _ = child.wait();
}

/// Item 2: `owner` (and the daemon's other names) cannot be an agent's name, and the owner's
/// requests are recorded as the owner's kind.
#[test]
fn reserved_names_cannot_be_agents() {
    let h = TestHome::initialized("reserved");
    for name in ["owner", "agentkeysd", "root"] {
        let out = h.run(&["agent", "add", name, "--scope", "low"]);
        assert!(!out.status.success(), "{name}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("reserved"),
            "{name}: {}",
            text(&out)
        );
    }
    let list = h.run(&["agent", "list", "--json"]);
    assert_eq!(json(&list), serde_json::json!([]));
}

/// Item 3: a grant belongs to the session that asked. After `agent revoke`, the grant is gone
/// (audited), and an agent added again under the same name starts with none.
#[test]
fn grants_end_with_their_session() {
    let h = daemon("grant-session", None);
    let first = h.add_agent("ops", "sensitive", &[]);
    let out = h.run_agent(&first, &["read", "sensitive"]);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    let code = code_from(&out);
    assert!(h.run(&["approve", &code, "--for", "10m"]).status.success());
    let grants = json(&h.run(&["grants", "--json"]));
    let g = &grants[0];
    assert_eq!(
        (g["role"].as_str(), g["agent"].as_str()),
        (Some("agent"), Some("ops"))
    );
    assert_eq!(g["once"], false);
    let session = g["session"].as_str().unwrap().to_string();
    assert!(session.starts_with("s-"), "{g}");
    assert!(h.run_agent(&first, &["read", "sensitive"]).status.success());

    assert!(h.run(&["agent", "revoke", "ops"]).status.success());
    assert_eq!(json(&h.run(&["grants", "--json"])), serde_json::json!([]));
    let revoked = audit(&h)
        .into_iter()
        .find(|r| r["event"] == "grant_revoked")
        .expect("the dropped grant is audited");
    assert_eq!(revoked["agent"], "ops");
    assert_eq!(revoked["session"], session.as_str());
    assert!(
        revoked["detail"]
            .as_str()
            .unwrap()
            .contains("session revoked"),
        "{revoked}"
    );

    let second = h.add_agent("ops", "sensitive", &[]);
    let again = h.run_agent(&second, &["read", "sensitive"]);
    assert_eq!(
        again.status.code(),
        Some(10),
        "the new session inherited the old one's grant: {}",
        text(&again)
    );
}

/// Item 3: the pending requests of a revoked agent are dropped (audited), not left for the
/// owner to approve for whoever gets the name next.
#[test]
fn requests_of_a_revoked_session_are_withdrawn() {
    let h = daemon("withdrawn", None);
    let token = h.add_agent("ops", "sensitive", &[]);
    let out = h.run_agent(&token, &["read", "sensitive"]);
    let code = code_from(&out);
    let pending = json(&h.run(&["pending", "--json"]));
    assert_eq!(pending[0]["code"], code.as_str());
    assert_eq!(pending[0]["role"], "agent");
    assert!(h.run(&["agent", "revoke", "ops"]).status.success());
    assert_eq!(json(&h.run(&["pending", "--json"])), serde_json::json!([]));
    assert_eq!(h.run(&["approve", &code]).status.code(), Some(6));
    let rec = audit(&h)
        .into_iter()
        .find(|r| r["event"] == "request_withdrawn")
        .expect("audited");
    assert_eq!(rec["agent"], "ops");
}

/// Item 3: a once-grant nobody uses lapses after `approval_ttl` (audited), instead of waiting
/// forever for the next matching request.
#[test]
fn an_unused_once_grant_lapses() {
    let h = daemon("once-lapses", Some("[daemon]\napproval_ttl = \"2s\"\n"));
    let token = h.add_agent("ops", "sensitive", &[]);
    let code = code_from(&h.run_agent(&token, &["read", "sensitive"]));
    assert!(h.run(&["approve", &code]).status.success());
    let grants = json(&h.run(&["grants", "--json"]));
    assert_eq!(grants[0]["once"], true);
    assert!(
        wait_until(Duration::from_secs(8), || {
            json(&h.run(&["grants", "--json"])) == serde_json::json!([])
        }),
        "the once-grant did not lapse"
    );
    assert!(
        audit(&h).iter().any(|r| r["event"] == "grant_expired"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("once-grant unused"))),
        "not audited"
    );
    let out = h.run_agent(&token, &["read", "sensitive"]);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
}

/// Item 3: the owner lists live grants and withdraws one, or all of an agent's; agents may do
/// neither.
#[test]
fn the_owner_lists_and_withdraws_grants() {
    let h = daemon("withdraw", None);
    let a = h.add_agent("alpha", "sensitive", &[]);
    let b = h.add_agent("beta", "sensitive", &[]);
    for (token, window) in [(&a, Some("10m")), (&b, None)] {
        let code = code_from(&h.run_agent(token, &["read", "sensitive"]));
        let mut args = vec!["approve", code.as_str()];
        if let Some(w) = window {
            args.extend(["--for", w]);
        }
        assert!(h.run(&args).status.success());
    }
    let table = h.run(&["grants"]);
    let shown = String::from_utf8_lossy(&table.stdout);
    assert!(
        shown.contains("alpha") && shown.contains("beta") && shown.contains("window"),
        "{}",
        text(&table)
    );
    let grants = json(&h.run(&["grants", "--json"]));
    let id_of = |agent: &str| {
        grants
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["agent"] == agent)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (ga, _gb) = (id_of("alpha"), id_of("beta"));

    // Agents can neither list nor withdraw.
    assert_eq!(h.run_agent(&a, &["grants"]).status.code(), Some(5));
    assert_eq!(
        h.run_agent(&a, &["grants", "revoke", "--all"])
            .status
            .code(),
        Some(5)
    );
    assert_eq!(h.run(&["grants", "revoke", "g999"]).status.code(), Some(6));
    assert_eq!(h.run(&["grants", "revoke"]).status.code(), Some(2));

    assert!(h.run(&["grants", "revoke", &ga]).status.success());
    let out = h.run(&["grants", "revoke", "--agent", "beta"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Withdrew 1 grant"),
        "{}",
        text(&out)
    );
    assert_eq!(json(&h.run(&["grants", "--json"])), serde_json::json!([]));
    for token in [&a, &b] {
        assert_eq!(
            h.run_agent(token, &["read", "sensitive"]).status.code(),
            Some(10)
        );
    }
    let revoked: Vec<_> = audit(&h)
        .into_iter()
        .filter(|r| r["event"] == "grant_revoked")
        .collect();
    assert_eq!(revoked.len(), 2, "{revoked:?}");
    assert!(revoked.iter().all(|r| {
        r["detail"]
            .as_str()
            .is_some_and(|d| d.contains("by the owner"))
            && r["peer"]["uid"].is_u64()
    }));
}

/// Item 8: what an agent chose (arguments, working directory) reaches the owner's `pending`
/// escaped: no control, bidi or other format character gets to the terminal, and the working
/// directory is quoted.
#[test]
fn pending_escapes_what_an_agent_chose() {
    let h = daemon("escape", None);
    let token = h.add_agent("ops", "sensitive", &[]);
    let dir = h.dir.join("work \u{2066}dir\u{2069}");
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = h.cli(&[
        "run",
        "--env",
        "T=sensitive",
        "--",
        "echo",
        "\u{1b}[2J\u{1b}[1A\rok \u{202e}txt.exe\u{200b}",
    ]);
    c.env("AGENTKEYS_TOKEN", &token)
        .current_dir(&dir)
        .stdin(Stdio::null());
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    let listed = h.run(&["pending"]);
    assert!(listed.status.success(), "{}", text(&listed));
    let shown = String::from_utf8(listed.stdout.clone()).unwrap();
    let risky = |c: char| {
        (c.is_control() && c != '\n')
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    assert!(
        !shown.chars().any(risky),
        "raw control/format characters: {shown:?}"
    );
    for want in [
        r"\u{1b}[2J",
        r"\u{202e}",
        r"\u{200b}",
        r"\r",
        r"'/",
        r"\u{2066}dir\u{2069}'",
    ] {
        assert!(shown.contains(want), "{want} not in {shown:?}");
    }
}

/// Whoami names the exact session, for the owner and for an agent, and the audit trail names
/// the same one.
#[test]
fn whoami_names_the_session_the_audit_trail_names() {
    let h = daemon("session-id", None);
    let token = h.add_agent("ops", "low", &[]);
    let who = json(&h.run_agent(&token, &["whoami", "--json"]));
    let session = who["session"].as_str().unwrap().to_string();
    assert!(h.run_agent(&token, &["read", "low"]).status.success());
    let rec = audit(&h)
        .into_iter()
        .find(|r| r["event"] == "deliver")
        .unwrap();
    assert_eq!(rec["session"], session.as_str());
    assert_eq!(rec["role"], "agent");
    let owner = json(&h.run(&["whoami", "--json"]));
    assert_eq!(owner["role"], "owner");
    assert_ne!(owner["session"], session.as_str());
}
