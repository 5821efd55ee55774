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

// --- Stopping a run ---------------------------------------------------------------------------
//
// A run is the program and everything it started. These tests start a program that ignores
// SIGTERM, with one descendant that left the process group and session (`setsid`) and one that
// was orphaned by a double fork, then stop the run in each way the daemon can (revocation of
// the caller, the caller killed, daemon shutdown, daemon killed) and check that every process
// carrying the run's marker is gone within the grace period plus 2 s.

/// The `kill_grace` the stop tests configure.
const GRACE: Duration = Duration::from_secs(1);

/// A program that ignores SIGTERM (inherited by all it starts), a descendant in a session of its
/// own, and an orphan of a double fork; "ready" once all are started.
const STUBBORN: &str = "trap '' TERM
setsid sh -c 'while :; do sleep 1; done' &
sh -c '(while :; do sleep 1; done) & exit 0' &
sleep 0.3
echo ready
while :; do sleep 1; done";

/// A daemon with a short `kill_grace` and the canary stored as `github`.
fn ready_with_grace(tag: &str) -> TestHome {
    let mut h = TestHome::initialized(tag);
    assert!(
        h.run_stdin(&["store", "github"], CANARY.as_bytes())
            .status
            .success()
    );
    h.write_config("[daemon]\nkill_grace = \"1s\"\n");
    h.start_daemon(&[]);
    h
}

/// A marker no other test uses, put into the run's environment.
fn new_marker(tag: &str) -> String {
    format!(
        "ak-stop-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Pids (other than `skip`) whose environment holds `AK_STOP_MARK=<marker>`.
fn marked(marker: &str, skip: u32) -> Vec<u32> {
    let needle = format!("AK_STOP_MARK={marker}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != skip)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .collect()
}

/// The session id of a process (field 6 of /proc/PID/stat).
fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// The daemon's open connections, from `agentkeys status --json` (its own included).
fn connections(h: &TestHome) -> u64 {
    let out = h.run(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["connections"].as_u64().unwrap()
}

/// `agentkeys run` of [`STUBBORN`] (as an agent when `token` is given), once every process of
/// it is up.
struct StubbornRun {
    cli: std::process::Child,
    marker: String,
}

impl StubbornRun {
    fn start(h: &TestHome, token: Option<&str>, tag: &str) -> StubbornRun {
        let marker = new_marker(tag);
        let mut c = h.cli(&["run", "--env", "T=github", "--", "sh", "-c", STUBBORN]);
        c.env("AK_STOP_MARK", &marker)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(t) = token {
            c.env("AGENTKEYS_TOKEN", t);
        }
        let mut cli = c.spawn().unwrap();
        let mut stdout = cli.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while !contains(&seen, b"ready") {
            let n = stdout.read(&mut buf).unwrap();
            assert!(n > 0, "the program ended before it was ready");
            seen.extend_from_slice(&buf[..n]);
        }
        // Keep reading (and discarding) so the program never blocks on a full pipe.
        std::thread::spawn(move || while stdout.read(&mut buf).is_ok_and(|n| n > 0) {});
        let run = StubbornRun { cli, marker };
        let procs = run.processes();
        assert!(
            procs.len() >= 3,
            "expected the program, the setsid child and the orphan: {procs:?}"
        );
        let sessions: std::collections::BTreeSet<_> =
            procs.iter().filter_map(|&p| session_of(p)).collect();
        assert!(
            sessions.len() >= 2,
            "no process left the program's session: {procs:?} {sessions:?}"
        );
        run
    }

    fn processes(&self) -> Vec<u32> {
        marked(&self.marker, self.cli.id())
    }

    /// Every marked process is gone within `bound` of now.
    fn assert_gone_within(&self, bound: Duration) {
        let left = Instant::now();
        let gone = agentkeys_e2e::wait_until(bound, || self.processes().is_empty());
        assert!(
            gone,
            "processes of the run still alive {:?} after {:?}: {:?}",
            left.elapsed(),
            bound,
            self.processes()
        );
    }

    /// The CLI's exit status, waiting at most `bound` (killed and failed after that).
    fn wait_cli(&mut self, bound: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(st) = self.cli.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.cli.kill();
                let _ = self.cli.wait();
                panic!("agentkeys run did not end within {bound:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for StubbornRun {
    fn drop(&mut self) {
        // A failed test must not leave its processes behind.
        let _ = self.cli.kill();
        let _ = self.cli.wait();
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The `detail` of the last `run_exit` record.
fn last_run_exit(h: &TestHome) -> String {
    h.audit()
        .iter()
        .rev()
        .find(|r| r["event"] == "run_exit")
        .and_then(|r| r["detail"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn revoking_the_caller_stops_every_process_of_its_run() {
    let h = ready_with_grace("stop-revoke");
    let token = h.add_agent("temp", "github", &[]);
    let before = connections(&h);
    let mut run = StubbornRun::start(&h, Some(&token), "revoke");
    assert!(h.run(&["agent", "revoke", "temp"]).status.success());
    run.assert_gone_within(GRACE + Duration::from_secs(2));
    assert!(!run.wait_cli(Duration::from_secs(5)).success());
    assert!(
        agentkeys_e2e::wait_until(Duration::from_secs(3), || connections(&h) == before),
        "the daemon still holds the run's connection"
    );
    let detail = last_run_exit(&h);
    assert!(
        detail.contains("stopped=revoked") && detail.contains("sigkill=yes"),
        "{detail}"
    );
}

#[test]
fn a_caller_killed_with_sigkill_stops_every_process_of_its_run() {
    let h = ready_with_grace("stop-caller");
    let before = connections(&h);
    let mut run = StubbornRun::start(&h, None, "caller");
    run.cli.kill().unwrap();
    run.cli.wait().unwrap();
    run.assert_gone_within(GRACE + Duration::from_secs(2));
    assert!(
        agentkeys_e2e::wait_until(Duration::from_secs(3), || connections(&h) == before),
        "the daemon still holds the run's connection"
    );
    assert!(
        agentkeys_e2e::wait_until(Duration::from_secs(2), || last_run_exit(&h)
            .contains("stopped=caller_gone")),
        "{}",
        last_run_exit(&h)
    );
}

#[test]
fn daemon_stop_stops_every_process_of_a_run_first() {
    let mut h = ready_with_grace("stop-shutdown");
    let mut run = StubbornRun::start(&h, None, "shutdown");
    let out = h.run(&["daemon", "stop"]);
    assert!(out.status.success(), "{}", text(&out));
    run.assert_gone_within(GRACE + Duration::from_secs(2));
    // The caller was told how its program ended (SIGKILL: 128 + 9).
    assert_eq!(run.wait_cli(Duration::from_secs(5)).code(), Some(137));
    assert!(
        agentkeys_e2e::wait_until(Duration::from_secs(5), || !h.daemon_alive()),
        "the daemon did not exit"
    );
    let detail = last_run_exit(&h);
    assert!(
        detail.contains("stopped=shutdown") && detail.contains("sigkill=yes"),
        "{detail}"
    );
}

#[test]
fn a_daemon_killed_with_sigkill_leaves_no_process_of_a_run() {
    let mut h = ready_with_grace("stop-kill9");
    let daemon = h.daemon_pid();
    let launcher = *children_of(daemon)
        .first()
        .expect("the launcher is the daemon's child");
    let run = StubbornRun::start(&h, None, "kill9");
    h.kill_daemon();
    run.assert_gone_within(GRACE + Duration::from_secs(2));
    assert!(
        agentkeys_e2e::wait_until(Duration::from_secs(2), || !std::path::Path::new(&format!(
            "/proc/{launcher}"
        ))
        .exists()
            || std::fs::read_to_string(format!("/proc/{launcher}/stat"))
                .is_ok_and(|s| s.contains(") Z "))),
        "the launcher did not exit after stopping the run"
    );
}

#[test]
fn a_program_that_exits_leaving_a_background_child_ends_the_run_without_it() {
    let h = ready_with_grace("stop-leftover");
    let marker = new_marker("leftover");
    let started = Instant::now();
    let mut c = h.cli(&[
        "run",
        "--env",
        "T=github",
        "--",
        "sh",
        "-c",
        "trap '' TERM; (while :; do sleep 1; done) & sleep 0.2; exit 4",
    ]);
    c.env("AK_STOP_MARK", &marker).stdin(Stdio::null());
    let mut cli = c.spawn().unwrap();
    let cli_pid = cli.id();
    let deadline = Instant::now() + GRACE + Duration::from_secs(4);
    let status = loop {
        if let Some(st) = cli.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = cli.kill();
            for pid in marked(&marker, cli_pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            panic!("the run did not end: its background child kept it going");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(4), "the exit status is the program's");
    assert!(
        started.elapsed() < GRACE + Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        marked(&marker, cli_pid).is_empty(),
        "the background child outlived the run"
    );
    let detail = last_run_exit(&h);
    assert!(
        detail.contains("status=exit 4")
            && detail.contains("leftovers=stopped")
            && detail.contains("sigkill=yes"),
        "{detail}"
    );
}

// --- What a run request must say --------------------------------------------------------------

/// Sends one `run` over a raw client (the CLI always sends a directory and a clean
/// environment) and returns the refusal's code and message.
fn raw_run_refusal(h: &TestHome, token: &str, caller_env: &[&str], cwd: Option<&str>) -> String {
    use agentkeys_proto::client::{Client, ClientError};
    use agentkeys_proto::wire::RequestBody;
    use std::os::fd::AsFd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tok = secrecy::SecretString::from(token.to_string());
    rt.block_on(async {
        let (mut c, _) = Client::connect_with(&h.socket(), &tok).await.unwrap();
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        let body = RequestBody::Run {
            argv: vec!["true".into()],
            env: Default::default(),
            files: Default::default(),
            proxy: Default::default(),
            caller_env: caller_env.iter().map(|s| s.to_string()).collect(),
            cwd: cwd.map(str::to_string),
            masking: true,
            umask: None,
        };
        c.send(body, &[null.as_fd(), null.as_fd(), null.as_fd()])
            .await
            .unwrap();
        match c.recv().await {
            Err(ClientError::Refused { code, message }) => format!("{code:?}: {message}"),
            Ok(a) => panic!("the run was not refused: {}", a.body.kind()),
            Err(e) => panic!("{e}"),
        }
    })
}

/// With a name given twice the first entry wins at exec, and the request hash (which sorts the
/// entries) is the same for both orders: an approval for one would run the other. So a name
/// given twice is refused, as are entries without `=` and empty names.
#[test]
fn a_run_environment_with_a_name_twice_is_refused_in_either_order() {
    let h = ready("run-dup-env");
    let token = h.add_agent("raw", "github", &[]);
    for env in [
        &["PATH=/usr/bin:/bin", "PATH=/tmp/evil"][..],
        &["PATH=/tmp/evil", "PATH=/usr/bin:/bin"][..],
    ] {
        let r = raw_run_refusal(&h, &token, env, Some("/"));
        assert!(
            r.starts_with("BadRequest") && r.contains("\"PATH\" more than once"),
            "{r}"
        );
    }
    let r = raw_run_refusal(&h, &token, &["PATH"], Some("/"));
    assert!(
        r.starts_with("BadRequest") && r.contains("NAME=value"),
        "{r}"
    );
    let r = raw_run_refusal(&h, &token, &["=x"], Some("/"));
    assert!(
        r.starts_with("BadRequest") && r.contains("empty name"),
        "{r}"
    );
    // Nothing was started, nothing audited as started.
    assert!(!h.audit().iter().any(|r| r["event"] == "run_start"));
}

/// A run without a working directory would run wherever the daemon started.
#[test]
fn a_run_without_a_working_directory_is_refused() {
    let h = ready("run-no-cwd");
    let token = h.add_agent("raw", "github", &[]);
    let r = raw_run_refusal(&h, &token, &["PATH=/usr/bin:/bin"], None);
    assert!(
        r.starts_with("BadRequest") && r.contains("run needs an absolute working directory"),
        "{r}"
    );
    let r = raw_run_refusal(&h, &token, &["PATH=/usr/bin:/bin"], Some("relative/dir"));
    assert!(r.contains("run needs an absolute working directory"), "{r}");
}

/// The program creates files with the caller's umask, not the daemon's 077.
#[test]
fn a_run_gets_the_callers_umask() {
    let h = ready("run-umask");
    for (mask, want) in [("022", "0022"), ("027", "0027")] {
        let mut c = std::process::Command::new("/bin/sh");
        c.args([
            "-c",
            &format!("umask {mask}; exec \"$0\" run -- sh -c umask"),
        ])
        .arg(agentkeys_e2e::bin("agentkeys"));
        h.env(&mut c);
        let out = c.stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
    }
}

// --- approval_command -------------------------------------------------------------------------

/// A daemon with `sensitive` stored high-value and `approval_command` set to `hook` (plus one
/// fixed argument) and the given timeout; returns it with an agent's token.
fn with_hook(tag: &str, hook: &std::path::Path, timeout: &str) -> (TestHome, String) {
    let mut h = TestHome::initialized(tag);
    assert!(
        h.run_stdin(&["store", "sensitive", "--high-value"], CANARY.as_bytes())
            .status
            .success()
    );
    h.write_config(&format!(
        "[daemon]\nkill_grace = \"1s\"\napproval_command = [{:?}, \"fixed\"]\napproval_command_timeout = {timeout:?}\n",
        hook.display().to_string()
    ));
    h.start_daemon(&[]);
    let token = h.add_agent("ops-bot", "sensitive", &[]);
    (h, token)
}

/// An executable shell script at `path`.
fn script(path: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The approval code from a pending answer on stderr.
fn code_in(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let at = err.find("agentkeys approve ").expect("a code") + "agentkeys approve ".len();
    err[at..]
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .next()
        .unwrap()
        .to_string()
}

/// A new pending request runs the hook once, with the code, the agent, the service and the
/// command as `agentkeys pending` shows it as separate arguments; a repeat of the same request
/// does not run it again. The code is not written to the daemon's log.
#[test]
fn approval_command_gets_code_agent_service_and_command() {
    let dir = TestHome::new("hook-args-dir");
    let out_file = dir.dir.join("calls");
    let hook = dir.dir.join("hook");
    script(
        &hook,
        &format!(
            "for a in \"$@\"; do printf '%s|' \"$a\"; done >> {}; echo >> {}",
            out_file.display(),
            out_file.display()
        ),
    );
    let (h, token) = with_hook("hook-args", &hook, "5s");
    let args = ["run", "--env", "T=sensitive", "--", "echo", "two words"];
    let out = h.run_agent(&token, &args);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    let code = code_in(&out);
    assert!(
        agentkeys_e2e::wait_until(Duration::from_secs(5), || out_file.exists()),
        "the hook did not run: {}",
        h.daemon_log()
    );
    // The same request again: pending with the same code, no second notification.
    let again = h.run_agent(&token, &args);
    assert_eq!(code_in(&again), code);
    std::thread::sleep(Duration::from_millis(500));
    let calls = std::fs::read_to_string(&out_file).unwrap();
    let cwd = std::env::current_dir().unwrap();
    let want = format!(
        "fixed|{code}|ops-bot|sensitive|echo 'two words'  (in {})|\n",
        cwd.display()
    );
    assert_eq!(calls, want);
    assert!(!h.daemon_log().contains(&code), "the code was logged");
}

/// A hook that fails (cannot be executed, or exits non-zero) is logged; the request is
/// answered `pending` all the same.
#[test]
fn a_failing_approval_command_is_logged_and_the_request_still_pending() {
    let dir = TestHome::new("hook-fail-dir");
    let failing = dir.dir.join("failing");
    script(&failing, "exit 3");
    for (hook, log) in [
        (failing, "approval_command failed"),
        (
            dir.dir.join("no-such-hook"),
            "approval_command could not be started",
        ),
    ] {
        let (h, token) = with_hook("hook-fail", &hook, "5s");
        let out = h.run_agent(&token, &["read", "sensitive"]);
        assert_eq!(out.status.code(), Some(10), "{}", text(&out));
        assert!(out.stdout.is_empty());
        assert!(
            agentkeys_e2e::wait_until(Duration::from_secs(5), || h.daemon_log().contains(log)),
            "{log:?} not in the log:\n{}",
            h.daemon_log()
        );
    }
}

/// A hook that hangs does not hold up the answer (it still runs when the answer is in), and is
/// stopped after `approval_command_timeout`.
#[test]
fn a_hanging_approval_command_does_not_delay_the_answer_and_is_stopped() {
    let dir = TestHome::new("hook-hang-dir");
    let pid_file = dir.dir.join("pid");
    let hook = dir.dir.join("hang");
    script(
        &hook,
        &format!(
            "trap '' TERM; echo $$ > {}.tmp; mv {}.tmp {}; exec sleep 1000",
            pid_file.display(),
            pid_file.display(),
            pid_file.display()
        ),
    );
    let timeout = Duration::from_secs(3);
    let (h, token) = with_hook("hook-hang", &hook, "3s");
    let asked = Instant::now();
    let out = h.run_agent(&token, &["read", "sensitive"]);
    let answered = asked.elapsed();
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    assert!(
        agentkeys_e2e::wait_until(Duration::from_secs(2), || pid_file.exists()),
        "the hook did not start"
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        answered < timeout && std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the answer waited for the hook ({answered:?})"
    );
    let gone = agentkeys_e2e::wait_until(timeout + GRACE + Duration::from_secs(2), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    if !gone {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(gone, "the hanging hook was not stopped");
    assert!(
        agentkeys_e2e::wait_until(Duration::from_secs(2), || h
            .daemon_log()
            .contains("approval_command was stopped")),
        "{}",
        h.daemon_log()
    );
}
