//! Daemon-mediated `agentkeys run` through the real daemon and launcher: the child has the
//! secret, the caller and the output do not; exit status, stdin, binary output, --file, the
//! seccomp split, signals, the audit trail, and a memory scan of daemon and launcher.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentkeys_e2e::{TestHome, contains, is_root, memory_contains, text};
use base64::Engine;

const CANARY: &str = "ghp_AkRunCanary7e6d5c4b3a29180";

fn ready(tag: &str) -> TestHome {
    let mut h = TestHome::initialized(tag);
    assert!(
        h.run_stdin(&["store", "github"], CANARY.as_bytes())
            .status
            .success()
    );
    h.start_daemon(&[]);
    h
}

fn encodings() -> Vec<String> {
    let b = CANARY.as_bytes();
    vec![
        CANARY.to_string(),
        base64::engine::general_purpose::STANDARD.encode(b),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
        b.iter().map(|x| format!("{x:02x}")).collect(),
        b.iter().map(|x| format!("{x:02X}")).collect(),
    ]
}

#[test]
fn the_child_has_the_secret_and_the_output_does_not() {
    let h = ready("run-env");
    // The child sees the value (compared inside the child; nothing printed).
    let out = h.run(&[
        "run",
        "--env",
        "T=github",
        "--",
        "sh",
        "-c",
        &format!("test \"$T\" = '{CANARY}'"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // Raw, base64 and hex of it are masked.
    let script = r#"echo "$T"; printf %s "$T" | base64; printf %s "$T" | od -An -tx1 | tr -d ' \n'; echo; printf %s "$T" >&2"#;
    let out = h.run(&["run", "--env", "T=github", "--", "sh", "-c", script]);
    assert!(out.status.success(), "{}", text(&out));
    let all = [out.stdout.clone(), out.stderr.clone()].concat();
    for e in encodings() {
        assert!(
            !contains(&all, e.as_bytes()),
            "output contains an encoding of the secret: {}",
            text(&out)
        );
    }
    assert!(
        contains(&out.stdout, b"********") && contains(&out.stderr, b"********"),
        "{}",
        text(&out)
    );
    // --no-masking hands the child the caller's fds.
    let out = h.run(&[
        "run",
        "--env",
        "T=github",
        "--no-masking",
        "--",
        "sh",
        "-c",
        "printf %s \"$T\"",
    ]);
    assert_eq!(out.stdout, CANARY.as_bytes(), "{}", text(&out));
}

#[test]
fn exit_status_missing_and_unexecutable_commands() {
    let h = ready("run-exit");
    assert_eq!(
        h.run(&["run", "--", "sh", "-c", "exit 7"]).status.code(),
        Some(7)
    );
    let missing = h.run(&["run", "--", "agentkeys-no-such-command"]);
    assert_eq!(missing.status.code(), Some(127), "{}", text(&missing));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
    let plain = h.dir.join("plain.txt");
    std::fs::write(&plain, "not a program").unwrap();
    let cant = h.run(&["run", "--", plain.to_str().unwrap()]);
    assert_eq!(cant.status.code(), Some(126), "{}", text(&cant));
    // Death by a signal: 128 + N.
    assert_eq!(
        h.run(&["run", "--", "sh", "-c", "kill -TERM $$"])
            .status
            .code(),
        Some(143)
    );
}

#[test]
fn stdin_passes_through_and_binary_output_is_unchanged() {
    let h = ready("run-io");
    let out = h.run_stdin(
        &["run", "--env", "T=github", "--", "cat"],
        b"hello through the launcher\n",
    );
    assert_eq!(
        out.stdout,
        b"hello through the launcher\n",
        "{}",
        text(&out)
    );
    // 1 MiB of random bytes through cat, with masking on, comes back byte-identical.
    let mut data = vec![0u8; 1 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let out = h.run_stdin(&["run", "--env", "T=github", "--", "cat"], &data);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "binary output was changed");
}

#[test]
fn file_delivery_keeps_the_secret_out_of_the_environment() {
    let h = ready("run-file");
    let script = format!(
        "test \"$(cat \"$F\")\" = '{CANARY}' && ! grep -q ghp_ /proc/self/environ && case \"$F\" in /dev/fd/*) exit 0;; *) exit 9;; esac"
    );
    let out = h.run(&["run", "--file", "F=github", "--", "sh", "-c", &script]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn the_daemon_stays_filtered_and_the_child_is_not() {
    let mut h = TestHome::initialized("run-seccomp");
    assert!(
        h.run_stdin(&["store", "github"], CANARY.as_bytes())
            .status
            .success()
    );
    let pid = h.start_daemon(&[]);
    let out = h.run(&[
        "run",
        "--",
        "sh",
        "-c",
        "grep '^Seccomp:' /proc/self/status",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Seccomp:\t0"),
        "{}",
        text(&out)
    );
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(st.contains("Seccomp:\t2"), "{st}");
    assert!(h.daemon_alive());
}

#[test]
fn signals_to_the_cli_reach_the_child() {
    let h = ready("run-signal");
    let mut c = h.cli(&[
        "run",
        "--",
        "sh",
        "-c",
        "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
    ]);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 64];
    while !contains(&seen, b"ready") {
        assert!(Instant::now() < deadline, "child never started");
        let n = stdout.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..n]);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    stdout.read_to_end(&mut seen).unwrap();
    assert_eq!(status.code(), Some(3), "{}", String::from_utf8_lossy(&seen));
    assert!(contains(&seen, b"got-term"));
}

#[test]
fn run_is_audited_without_values() {
    let h = ready("run-audit");
    assert!(
        h.run(&["run", "--env", "T=github", "--", "true"])
            .status
            .success()
    );
    let log = std::fs::read_to_string(h.home().join("audit.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    let start = kinds
        .iter()
        .position(|k| *k == "run_start")
        .expect("run_start");
    assert!(
        kinds[start..].contains(&"deliver") && kinds[start..].contains(&"run_exit"),
        "{kinds:?}"
    );
    let rs = &recs[start];
    let detail = rs["detail"].as_str().unwrap();
    assert!(
        detail.contains("program=true") && detail.contains("argv_sha256="),
        "{detail}"
    );
    let del = recs.iter().find(|r| r["event"] == "deliver").unwrap();
    assert_eq!(del["delivery"], "env");
    assert!(!log.contains(CANARY));
    assert!(h.run(&["audit", "verify"]).status.success());
}

#[test]
fn an_agent_runs_only_within_its_scope() {
    let h = ready("run-scope");
    assert!(
        h.run_stdin(&["store", "openai"], b"sk-other")
            .status
            .success()
    );
    let token = h.add_agent("gh-bot", "github", &[]);
    let ok = h.run_agent(
        &token,
        &[
            "run",
            "--env",
            "T=github",
            "--",
            "sh",
            "-c",
            "test -n \"$T\"",
        ],
    );
    assert!(ok.status.success(), "{}", text(&ok));
    let denied = h.run_agent(&token, &["run", "--env", "T=openai", "--", "true"]);
    assert_eq!(denied.status.code(), Some(5), "{}", text(&denied));
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// `mediated_run_drops_parent_copy`: after the run returns, no copy of the secret in the
/// daemon's or the launcher's readable memory.
#[test]
fn mediated_run_drops_parent_copy() {
    if !is_root() {
        eprintln!(
            "SKIP mediated_run_drops_parent_copy: reading another process's memory needs root"
        );
        return;
    }
    let mut h = TestHome::initialized("run-memscan");
    assert!(
        h.run_stdin(&["store", "github"], CANARY.as_bytes())
            .status
            .success()
    );
    let daemon = h.start_daemon(&[]);
    let launcher = *children_of(daemon)
        .first()
        .expect("the launcher is the daemon's child");
    let out = h.run(&[
        "run",
        "--env",
        "T=github",
        "--file",
        "F=github",
        "--",
        "sh",
        "-c",
        "echo \"$T\"; cat \"$F\"",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(contains(&out.stdout, b"********"));
    // The probe can see ordinary memory: the daemon knows its socket path.
    let sock = h.socket().display().to_string();
    assert!(
        memory_contains(daemon, sock.as_bytes()),
        "the scan sees nothing at all"
    );
    assert!(
        !memory_contains(daemon, CANARY.as_bytes()),
        "secret left in the daemon after run"
    );
    assert!(
        !memory_contains(launcher, CANARY.as_bytes()),
        "secret left in the launcher after run"
    );
    let _ = std::io::stderr().write_all(b"");
}

/// Revoking an agent stops its running program: the revocation is immediate, runs included.
#[test]
fn revoking_an_agent_stops_its_running_program() {
    let h = ready("run-revoke");
    let token = h.add_agent("temp", "github", &[]);
    let marker = h.dir.join("finished");
    let mut c = h.cli(&[
        "run",
        "--env",
        "T=github",
        "--",
        "sh",
        "-c",
        &format!("sleep 5; touch {}", marker.display()),
    ]);
    c.env("AGENTKEYS_TOKEN", &token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    assert!(h.run(&["agent", "revoke", "temp"]).status.success());
    let status = child.wait().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the run went on after the revocation"
    );
    assert!(!status.success(), "the run of a revoked agent succeeded");
    std::thread::sleep(Duration::from_millis(5000));
    assert!(
        !marker.exists(),
        "the program of a revoked agent ran to completion"
    );
}

/// A secret with a NUL byte cannot be an environment variable: a clear error pointing to
/// --file, which works.
#[test]
fn a_secret_with_a_nul_byte_goes_through_file_not_env() {
    let h = ready("run-nul");
    assert!(
        h.run_stdin(&["store", "binary", "--raw"], b"ab\0cd")
            .status
            .success()
    );
    let env = h.run(&["run", "--env", "T=binary", "--", "true"]);
    assert!(!env.status.success(), "{}", text(&env));
    assert!(
        String::from_utf8_lossy(&env.stderr).contains("--file"),
        "{}",
        text(&env)
    );
    let file = h.run(&[
        "run",
        "--file",
        "F=binary",
        "--",
        "sh",
        "-c",
        "test \"$(wc -c < \"$F\")\" -eq 5",
    ]);
    assert!(file.status.success(), "{}", text(&file));
}

/// `run` starts programs as the daemon's uid; an agent connecting from another uid is told so.
#[test]
fn run_from_another_uid_is_refused_clearly() {
    if !is_root() {
        eprintln!(
            "SKIP run_from_another_uid_is_refused_clearly: needs root to run a client as another uid"
        );
        return;
    }
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP run_from_another_uid_is_refused_clearly: setpriv (util-linux) is not installed"
        );
        return;
    }
    let mut h = TestHome::initialized("run-uid");
    assert!(
        h.run_stdin(&["store", "github"], CANARY.as_bytes())
            .status
            .success()
    );
    std::fs::write(
        h.home().join("config.toml"),
        "[daemon]\nsocket_group = \"nogroup\"\n",
    )
    .unwrap();
    h.start_daemon(&[]);
    let token = h.add_agent("other-uid", "github", &["--uid", "65534"]);
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(agentkeys_e2e::bin("agentkeys"))
        .args(["run", "--env", "T=github", "--", "true"]);
    h.env(&mut c);
    c.env("AGENTKEYS_TOKEN", &token).current_dir("/");
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("daemon's uid"),
        "{}",
        text(&out)
    );
    assert!(!contains(&out.stdout, CANARY.as_bytes()));
}
