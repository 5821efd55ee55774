//! Human approval for high-value services, through the real daemon: pending codes, approve
//! (once or for a window) and deny, grants bound to the exact command, expiry, and agents that
//! try to decide.
#![forbid(unsafe_code)]

use std::time::Duration;

use agentkeys_e2e::{TestHome, code_from, text};

const CANARY: &str = "ak-canary-approval-0b1c2d3e4f5a";

fn audit_events(h: &TestHome) -> Vec<serde_json::Value> {
    std::fs::read_to_string(h.home().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn setup(tag: &str, config: Option<&str>) -> (TestHome, String) {
    let mut h = TestHome::initialized(tag);
    assert!(
        h.run_stdin(&["store", "sensitive", "--high-value"], CANARY.as_bytes())
            .status
            .success()
    );
    if let Some(c) = config {
        std::fs::write(h.home().join("config.toml"), c).unwrap();
    }
    h.start_daemon(&[]);
    let token = h.add_agent("ops-bot", "sensitive", &[]);
    (h, token)
}

/// `high_value_release_pending`.
#[test]
fn high_value_release_pending() {
    let (h, token) = setup("approve", None);
    let out = h.run_agent(&token, &["read", "sensitive"]);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    assert!(out.stdout.is_empty(), "secret bytes on a pending read");
    let code = code_from(&out);
    assert_eq!(code.len(), 11, "{code}");

    let pending = h.run(&["pending", "--json"]);
    assert!(pending.status.success(), "{}", text(&pending));
    let list: serde_json::Value = serde_json::from_slice(&pending.stdout).unwrap();
    let req = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["code"] == code.as_str())
        .expect("listed");
    assert_eq!(req["agent"], "ops-bot");
    assert_eq!(req["service"], "sensitive");

    // Approved once: one read succeeds, the next is pending again.
    assert!(h.run(&["approve", &code]).status.success());
    let ok = h.run_agent(&token, &["read", "sensitive"]);
    assert_eq!(ok.stdout, CANARY.as_bytes(), "{}", text(&ok));
    let again = h.run_agent(&token, &["read", "sensitive"]);
    assert_eq!(again.status.code(), Some(10), "{}", text(&again));

    // For a window: repeated reads work.
    let code = code_from(&again);
    assert!(h.run(&["approve", &code, "--for", "10m"]).status.success());
    for _ in 0..3 {
        assert_eq!(
            h.run_agent(&token, &["read", "sensitive"]).stdout,
            CANARY.as_bytes()
        );
    }
    let kinds: Vec<String> = audit_events(&h)
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    for k in ["pending", "approve", "grant_used"] {
        assert!(
            kinds.iter().any(|x| x == k),
            "no {k} in the audit: {kinds:?}"
        );
    }
}

#[test]
fn deny_refuses_and_wrong_codes_approve_nothing() {
    let (h, token) = setup("deny", None);
    let out = h.run_agent(&token, &["read", "sensitive"]);
    let code = code_from(&out);
    assert!(h.run(&["deny", &code]).status.success());
    let refused = h.run_agent(&token, &["read", "sensitive"]);
    assert_eq!(refused.status.code(), Some(5), "{}", text(&refused));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("denied"));
    assert!(refused.stdout.is_empty());
    let wrong = h.run(&["approve", "ZZZZZ-ZZZZZ"]);
    assert_eq!(wrong.status.code(), Some(6), "{}", text(&wrong));
    assert!(
        audit_events(&h)
            .iter()
            .any(|r| r["event"] == "approve" && r["outcome"] == "error")
    );
}

#[test]
fn an_expired_request_cannot_be_approved() {
    let (h, token) = setup("expire", Some("[daemon]\napproval_ttl = \"1s\"\n"));
    let out = h.run_agent(&token, &["read", "sensitive"]);
    let code = code_from(&out);
    std::thread::sleep(Duration::from_millis(2500));
    let late = h.run(&["approve", &code]);
    assert_eq!(late.status.code(), Some(6), "{}", text(&late));
    assert!(audit_events(&h).iter().any(|r| r["event"] == "expired"));
    assert_eq!(
        h.run_agent(&token, &["read", "sensitive"]).status.code(),
        Some(10)
    );
}

#[test]
fn a_grant_for_one_command_does_not_authorize_another() {
    let (h, token) = setup("argv", None);
    let list = [
        "run",
        "--env",
        "T=sensitive",
        "--",
        "sh",
        "-c",
        "echo gh pr list",
    ];
    let out = h.run_agent(&token, &list);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    let pending: serde_json::Value =
        serde_json::from_slice(&h.run(&["pending", "--json"]).stdout).unwrap();
    assert!(
        pending[0]["command"]
            .as_str()
            .unwrap()
            .contains("gh pr list"),
        "{pending}"
    );
    assert!(
        h.run(&["approve", &code_from(&out), "--for", "10m"])
            .status
            .success()
    );
    let ok = h.run_agent(&token, &list);
    assert!(ok.status.success(), "{}", text(&ok));
    let other = h.run_agent(
        &token,
        &[
            "run",
            "--env",
            "T=sensitive",
            "--",
            "sh",
            "-c",
            "echo gh repo delete x",
        ],
    );
    assert_eq!(
        other.status.code(),
        Some(10),
        "another command was authorized: {}",
        text(&other)
    );
}

#[test]
fn an_agent_cannot_approve_and_is_audited() {
    let (h, token) = setup("agentapprove", None);
    let out = h.run_agent(&token, &["read", "sensitive"]);
    let code = code_from(&out);
    let attempt = h.run_agent(&token, &["approve", &code]);
    assert_eq!(attempt.status.code(), Some(5), "{}", text(&attempt));
    let rec = audit_events(&h)
        .into_iter()
        .find(|r| r["event"] == "approve" && r["outcome"] == "denied")
        .expect("the attempt is audited");
    assert_eq!(rec["agent"], "ops-bot");
    // Still pending: the agent's attempt approved nothing.
    assert_eq!(
        h.run_agent(&token, &["read", "sensitive"]).status.code(),
        Some(10)
    );
}

#[test]
fn wait_blocks_until_the_owner_decides() {
    let (h, token) = setup("wait", None);
    let mut c = h.cli(&["read", "sensitive", "--wait"]);
    c.env("AGENTKEYS_TOKEN", &token)
        .stdin(std::process::Stdio::null());
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    // Find the request the waiting read made, then approve it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        let list: serde_json::Value =
            serde_json::from_slice(&h.run(&["pending", "--json"]).stdout).unwrap();
        if let Some(c) = list
            .as_array()
            .and_then(|a| a.first())
            .and_then(|r| r["code"].as_str())
        {
            break c.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pending request appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(h.run(&["approve", &code]).status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.stdout, CANARY.as_bytes(), "{}", text(&out));
}

/// An approval covers the exact request: the same argv with another PATH (which decides which
/// program runs) is a new request.
#[test]
fn an_approved_run_cannot_be_replayed_with_another_path() {
    let (h, token) = setup("replay", None);
    let args = ["run", "--env", "T=sensitive", "--", "true"];
    let first = h.run_agent(&token, &args);
    assert_eq!(first.status.code(), Some(10), "{}", text(&first));
    let pending: serde_json::Value =
        serde_json::from_slice(&h.run(&["pending", "--json"]).stdout).unwrap();
    assert!(
        pending[0]["command"].as_str().unwrap().contains("(in "),
        "{pending}"
    );
    assert!(
        h.run(&["approve", &code_from(&first), "--for", "10m"])
            .status
            .success()
    );
    assert!(h.run_agent(&token, &args).status.success());
    let evil = h.dir.join("evil");
    std::fs::create_dir_all(&evil).unwrap();
    let mut c = h.cli(&args);
    c.env("AGENTKEYS_TOKEN", &token)
        .env("PATH", format!("{}:/usr/bin:/bin", evil.display()));
    let replay = c.stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(
        replay.status.code(),
        Some(10),
        "a changed PATH reused the approval: {}",
        text(&replay)
    );
}

#[test]
fn a_huge_approval_window_is_clamped_not_fatal() {
    let (mut h, token) = setup("window", None);
    let out = h.run_agent(&token, &["read", "sensitive"]);
    assert!(
        h.run(&["approve", &code_from(&out), "--for", "500000000000years"])
            .status
            .success()
    );
    assert_eq!(
        h.run_agent(&token, &["read", "sensitive"]).stdout,
        CANARY.as_bytes()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(h.daemon_alive(), "daemon died:\n{}", h.daemon_log());
}

/// One code covers every high-value service of a run: approved once, the run goes through.
#[test]
fn one_approval_covers_a_run_with_two_high_value_services() {
    let (h, _) = setup("two", None);
    assert!(
        h.run_stdin(&["store", "second", "--high-value"], b"two-two")
            .status
            .success()
    );
    let token = h.add_agent("both", "sensitive,second", &[]);
    let args = [
        "run",
        "--env",
        "A=sensitive",
        "--env",
        "B=second",
        "--",
        "sh",
        "-c",
        "test -n \"$A\" && test -n \"$B\"",
    ];
    let first = h.run_agent(&token, &args);
    assert_eq!(first.status.code(), Some(10), "{}", text(&first));
    assert!(h.run(&["approve", &code_from(&first)]).status.success());
    let ok = h.run_agent(&token, &args);
    assert!(ok.status.success(), "{}", text(&ok));
}

#[test]
fn wait_stops_when_the_request_expires() {
    let (h, token) = setup("waitexpire", Some("[daemon]\napproval_ttl = \"1s\"\n"));
    let started = std::time::Instant::now();
    let out = h.run_agent(&token, &["read", "sensitive", "--wait"]);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{}",
        text(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(out.stdout.is_empty());
}
