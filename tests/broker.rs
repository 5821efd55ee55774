//! The broker daemon and the owner/agent commands, driven through the real binaries over the
//! real socket, each test in its own temporary `AGENTKEYS_HOME`.
#![forbid(unsafe_code)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentkeys_e2e::{TestHome, all_files, bin, contains, is_root, run_with_stdin, text};
use base64::Engine;
use sha2::Digest;

const CANARY: &str = "ak-canary-broker-5f0e1d2c3b4a";

fn id_from(out: &std::process::Output, prefix: &str) -> String {
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {}", text(out)));
    line[prefix.len()..]
        .split_whitespace()
        .next()
        .expect("an id")
        .to_string()
}

#[test]
fn init_is_idempotent_and_force_mints_a_new_session() {
    let h = TestHome::new("init");
    let first = h.run(&["init"]);
    assert!(first.status.success(), "{}", text(&first));
    let id = id_from(&first, "Initialized as ");
    assert!(id.starts_with("ak-"), "{id}");
    let session = std::fs::read(h.home().join("session.enc")).unwrap();
    let mode = std::fs::metadata(h.home()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "AGENTKEYS_HOME mode {mode:o}");

    let again = h.run(&["init"]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(id_from(&again, "Already initialized as "), id);
    assert_eq!(
        std::fs::read(h.home().join("session.enc")).unwrap(),
        session,
        "session.enc changed"
    );

    let forced = h.run(&["init", "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert_eq!(
        id_from(&forced, "Initialized as "),
        id,
        "identity must survive --force"
    );
    assert_ne!(
        std::fs::read(h.home().join("session.enc")).unwrap(),
        session,
        "--force kept the session"
    );
}

#[test]
fn store_list_delete_round_trip_without_plaintext_at_rest() {
    let h = TestHome::initialized("vault");
    let out = h.run_stdin(&["store", "github"], CANARY.as_bytes());
    assert!(out.status.success(), "{}", text(&out));
    let out = h.run_stdin(
        &["store", "prod-db", "--high-value", "--cache-ttl", "5m"],
        b"pw\n",
    );
    assert!(out.status.success(), "{}", text(&out));

    let list = h.run(&["list"]);
    assert!(list.status.success(), "{}", text(&list));
    let listed = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        listed.contains("github") && listed.contains("prod-db"),
        "{listed}"
    );
    assert!(
        !contains(&list.stdout, CANARY.as_bytes()),
        "list shows a value"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&h.run(&["list", "--json"]).stdout).unwrap();
    let db = json
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "prod-db")
        .unwrap();
    assert_eq!(db["high_value"], true);
    assert_eq!(db["cache_ttl_secs"], 300);

    // No file under AGENTKEYS_HOME holds the plaintext, raw or in base64.
    let b64 = base64::engine::general_purpose::STANDARD.encode(CANARY);
    for (path, bytes) in all_files(&h.home()) {
        assert!(
            !contains(&bytes, CANARY.as_bytes()),
            "plaintext in {}",
            path.display()
        );
        assert!(
            !contains(&bytes, b64.as_bytes()),
            "base64 plaintext in {}",
            path.display()
        );
    }

    let del = h.run(&["delete", "github"]);
    assert!(del.status.success(), "{}", text(&del));
    let listed = String::from_utf8_lossy(&h.run(&["list"]).stdout).to_string();
    assert!(
        !listed.contains("github") && listed.contains("prod-db"),
        "{listed}"
    );
    let missing = h.run(&["delete", "github"]);
    assert_eq!(missing.status.code(), Some(6), "{}", text(&missing));
}

#[test]
fn store_refuses_bad_input_and_changes_nothing() {
    let h = TestHome::initialized("badinput");
    let vault = std::fs::read(h.home().join("vault.enc")).unwrap();
    for (args, input) in [
        (vec!["store", "github"], &b""[..]),
        (vec!["store", "Bad Name!"], &b"x"[..]),
        (vec!["store", "../escape"], &b"x"[..]),
    ] {
        let out = h.run_stdin(&args, input);
        assert!(!out.status.success(), "accepted {args:?}: {}", text(&out));
        assert!(!out.stderr.is_empty());
    }
    let big = vec![b'x'; (1 << 20) + 10];
    assert!(!h.run_stdin(&["store", "big"], &big).status.success());
    assert_eq!(
        std::fs::read(h.home().join("vault.enc")).unwrap(),
        vault,
        "vault changed"
    );
}

#[test]
fn wrong_or_missing_key_is_a_clear_error_and_changes_nothing() {
    let h = TestHome::initialized("dek");
    assert!(
        h.run_stdin(&["store", "github"], CANARY.as_bytes())
            .status
            .success()
    );
    let key_path = h.home().join("dek.key");
    assert!(
        key_path.exists(),
        "this machine has no OS keyring: the DEK must be in a key file"
    );
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let good_key = std::fs::read(&key_path).unwrap();
    let vault = std::fs::read(h.home().join("vault.enc")).unwrap();

    // A different key of the right shape.
    let mut other = good_key.clone();
    for b in other.iter_mut() {
        *b = b.wrapping_add(1);
    }
    std::fs::write(&key_path, &other).unwrap();
    let out = h.run_stdin(&["store", "npm"], b"x");
    assert!(!out.status.success(), "{}", text(&out));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("key"), "unclear error: {msg}");
    assert_eq!(
        std::fs::read(h.home().join("vault.enc")).unwrap(),
        vault,
        "vault changed under a wrong key"
    );

    std::fs::remove_file(&key_path).unwrap();
    let out = h.run(&["list"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dek.key"),
        "error does not say where: {}",
        text(&out)
    );
    assert_eq!(std::fs::read(h.home().join("vault.enc")).unwrap(), vault);

    std::fs::write(&key_path, &good_key).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(h.run(&["list"]).status.success());
}

#[test]
fn concurrent_stores_all_survive() {
    let h = TestHome::initialized("concurrent");
    let children: Vec<_> = (0..8)
        .map(|i| {
            let mut c = h.cli(&["store", &format!("svc{i}")]);
            c.stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = c.spawn().unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(format!("secret-{i}").as_bytes())
                .unwrap();
            child
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json: serde_json::Value =
        serde_json::from_slice(&h.run(&["list", "--json"]).stdout).unwrap();
    let names: Vec<_> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    for i in 0..8 {
        assert!(names.contains(&format!("svc{i}")), "svc{i} lost: {names:?}");
    }
}

fn status_field(pid: u32, key: &str) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in status"))
}

#[test]
fn running_daemon_is_sandboxed_and_its_socket_private() {
    let mut h = TestHome::initialized("sandbox");
    let pid = h.start_daemon(&[]);
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(
        status_field(pid, "CapEff"),
        "0000000000000000",
        "also when started as root"
    );
    assert_eq!(status_field(pid, "TracerPid"), "0");
    let vmlck: u64 = status_field(pid, "VmLck")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(vmlck > 0, "the DEK page should be locked: VmLck {vmlck} kB");

    // Dumpable is not in /proc/PID/status: the daemon reports it from inside (doctor).
    let doc = h.run(&["doctor", "--json"]);
    assert!(doc.status.success(), "{}", text(&doc));
    let v: serde_json::Value = serde_json::from_slice(&doc.stdout).unwrap();
    let daemon = v["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["process"] == "agentkeysd")
        .expect("daemon report");
    for item in [
        "dumpable",
        "rlimit_core",
        "no_new_privs",
        "seccomp",
        "capabilities",
        "tracer",
    ] {
        let i = daemon["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == item)
            .unwrap();
        assert_eq!(i["status"], "ok", "{item}: {i}");
    }
    let ks = daemon["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "keystore")
        .unwrap();
    assert!(ks["detail"].as_str().unwrap().contains("key file"), "{ks}");

    let dir = h.socket().parent().unwrap().to_path_buf();
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(h.socket()).unwrap().mode() & 0o777, 0o600);
    assert!(h.daemon_alive());
}

#[test]
fn daemon_under_strace_refuses_unless_allowed() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("SKIP daemon_under_strace_refuses_unless_allowed: strace is not installed");
        return;
    }
    let h = TestHome::initialized("strace");
    let mut c = Command::new("strace");
    c.args(["-f", "-o", "/dev/null"])
        .arg(bin("agentkeysd"))
        .arg("--foreground");
    h.env(&mut c);
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tracer check"),
        "{}",
        text(&out)
    );

    let mut c = Command::new("strace");
    c.args(["-f", "-o", "/dev/null"])
        .arg(bin("agentkeysd"))
        .args(["--foreground", "--allow-debugger"]);
    h.env(&mut c);
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !h.run(&["status"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "daemon under strace --allow-debugger did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(h.run(&["daemon", "stop"]).status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WARNING") && err.contains("debugger"), "{err}");
}

#[test]
fn daemon_command_starts_in_background_and_stops() {
    let h = TestHome::initialized("bg");
    assert_eq!(
        h.run(&["status"]).status.code(),
        Some(3),
        "status without a daemon"
    );
    let start = h.run(&["daemon"]);
    assert!(start.status.success(), "{}", text(&start));
    let said = String::from_utf8_lossy(&start.stdout);
    assert!(
        said.contains("log:") && said.contains("agentkeysd.log"),
        "{said}"
    );
    let st = h.run(&["status"]);
    assert!(st.status.success(), "{}", text(&st));
    assert!(String::from_utf8_lossy(&h.run(&["daemon"]).stdout).contains("already running"));
    let stop = h.run(&["daemon", "stop"]);
    assert!(stop.status.success(), "{}", text(&stop));
    let after = h.run(&["status"]);
    assert_eq!(after.status.code(), Some(3), "{}", text(&after));
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("agentkeys daemon"),
        "no hint: {}",
        text(&after)
    );
}

/// `whoami_prints_metadata`: as owner and as agent, identity, role, scope, expiry, time left.
#[test]
fn whoami_prints_metadata() {
    let mut h = TestHome::initialized("whoami-meta");
    h.start_daemon(&[]);
    let token = h.add_agent("ci-bot", "github,npm", &["--ttl", "2h"]);

    let owner = h.run(&["whoami"]);
    assert!(owner.status.success(), "{}", text(&owner));
    let o = String::from_utf8_lossy(&owner.stdout).to_string();
    for want in ["identity", "ak-", "owner", "scope", "expires", "left"] {
        assert!(o.contains(want), "owner whoami lacks {want}: {o}");
    }
    let agent = h.run_agent(&token, &["whoami"]);
    assert!(agent.status.success(), "{}", text(&agent));
    let a = String::from_utf8_lossy(&agent.stdout).to_string();
    for want in ["agent ci-bot", "github,npm", "expires", "left"] {
        assert!(a.contains(want), "agent whoami lacks {want}: {a}");
    }
    let aj = h.run_agent(&token, &["whoami", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&aj.stdout).unwrap();
    assert_eq!(v["agent"], "ci-bot");
    assert_eq!(v["role"], "agent");
    assert_eq!(v["scope"], serde_json::json!(["github", "npm"]));
    let left = v["time_left_secs"].as_u64().unwrap();
    assert!((3600..=7200).contains(&left), "time left {left}");
    let oj: serde_json::Value =
        serde_json::from_slice(&h.run(&["whoami", "--json"]).stdout).unwrap();
    assert_eq!(oj["role"], "owner");
    assert_eq!(oj["identity"], v["identity"]);
}

/// `whoami_no_token`: neither the agent token nor its hash (raw, hex, base64) appears in any
/// output, in the daemon's log, or in any file under AGENTKEYS_HOME.
#[test]
fn whoami_no_token() {
    let mut h = TestHome::initialized("whoami-token");
    h.start_daemon(&[]);
    let token = h.add_agent("ci-bot", "github,npm", &["--ttl", "2h"]);
    let hash = sha2::Sha256::digest(token.as_bytes());
    let needles: Vec<Vec<u8>> = vec![
        token.as_bytes().to_vec(),
        token.as_bytes()["akt_".len()..].to_vec(),
        hash.to_vec(),
        hash.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes(),
        hash.iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
            .into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(hash)
            .into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(hash)
            .into_bytes(),
    ];
    let outputs = vec![
        h.run(&["whoami"]),
        h.run(&["whoami", "--json"]),
        h.run_agent(&token, &["whoami"]),
        h.run_agent(&token, &["whoami", "--json"]),
        h.run_agent(&token, &["status"]),
        h.run_agent(&token, &["list"]),
        h.run(&["agent", "list"]),
        h.run(&["agent", "list", "--json"]),
        h.run(&["doctor", "--json"]),
        h.run(&["agent", "revoke", "ci-bot"]),
        h.run_agent(&token, &["whoami"]),
    ];
    let mut haystacks: Vec<(String, Vec<u8>)> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            (
                format!("output #{i}"),
                [o.stdout.clone(), o.stderr.clone()].concat(),
            )
        })
        .collect();
    haystacks.push(("daemon log".into(), h.daemon_log().into_bytes()));
    for (p, b) in all_files(&h.home()) {
        haystacks.push((p.display().to_string(), b));
    }
    for (what, hay) in &haystacks {
        for n in &needles {
            assert!(!contains(hay, n), "token or its hash found in {what}");
        }
    }
}

#[test]
fn agent_token_can_go_to_a_private_file() {
    let mut h = TestHome::initialized("tokenfile");
    h.start_daemon(&[]);
    let path = h.dir.join("bot.token");
    let out = h.run(&[
        "agent",
        "add",
        "bot",
        "--scope",
        "github",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout.is_empty(),
        "token printed although --out was given"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    let mut c = h.cli(&["whoami"]);
    c.env("AGENTKEYS_TOKEN_FILE", &path).stdin(Stdio::null());
    let who = c.output().unwrap();
    assert!(
        String::from_utf8_lossy(&who.stdout).contains("agent bot"),
        "{}",
        text(&who)
    );
    // Never overwrites an existing file.
    let again = h.run(&[
        "agent",
        "add",
        "bot2",
        "--scope",
        "github",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(!again.status.success(), "{}", text(&again));
}

#[test]
fn sigterm_stops_the_daemon_gracefully() {
    let mut h = TestHome::initialized("sigterm");
    let pid = h.start_daemon(&[]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.daemon_alive() {
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!h.socket().exists(), "socket left behind");
    assert!(h.daemon_log().contains("SIGTERM"), "{}", h.daemon_log());
    assert_eq!(h.run(&["status"]).status.code(), Some(3));
    // And it starts again on the same socket path.
    h.start_daemon(&[]);
}

#[test]
fn store_from_a_terminal_does_not_echo_the_secret() {
    if Command::new("python3")
        .arg("-c")
        .arg("import pty")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!(
            "SKIP store_from_a_terminal_does_not_echo_the_secret: python3 with the pty module is needed for a terminal"
        );
        return;
    }
    let h = TestHome::initialized("tty");
    // python3 runs `agentkeys store ttysvc` on a pseudo-terminal, types the secret, and prints
    // everything the terminal showed.
    let script = r#"
import os, pty, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], [sys.argv[1], "store", "ttysvc"])
out = b""
time.sleep(0.3)
out += os.read(fd, 4096)
os.write(fd, sys.argv[2].encode() + bytes([10]))
while True:
    try:
        d = os.read(fd, 4096)
    except OSError:
        break
    if not d:
        break
    out += d
_, st = os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
sys.exit(os.waitstatus_to_exitcode(st))
"#;
    let mut c = Command::new("python3");
    c.arg("-c").arg(script).arg(bin("agentkeys")).arg(CANARY);
    h.env(&mut c);
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("input hidden"), "{shown}");
    assert!(
        !shown.contains(CANARY),
        "the terminal echoed the secret: {shown}"
    );
    let listed = String::from_utf8_lossy(&h.run(&["list"]).stdout).to_string();
    assert!(listed.contains("ttysvc"), "{listed}");
}

#[test]
fn revoked_and_expired_sessions_get_clear_errors() {
    let mut h = TestHome::initialized("revoke");
    h.start_daemon(&[]);
    let token = h.add_agent("temp", "github", &[]);
    assert!(h.run_agent(&token, &["whoami"]).status.success());

    // An open connection of the agent is closed by the revocation.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = h.socket();
    let tok = secrecy::SecretString::from(token.clone());
    let mut held = rt
        .block_on(agentkeys_proto::client::Client::connect_with(&socket, &tok))
        .unwrap()
        .0;
    let out = h.run(&["agent", "revoke", "temp"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = rt.block_on(held.call(agentkeys_proto::wire::RequestBody::Whoami {}));
    assert!(
        after.is_err(),
        "revoked agent's open connection still answered"
    );

    let out = h.run_agent(&token, &["whoami"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revoked"),
        "{}",
        text(&out)
    );

    let short = h.add_agent("brief", "github", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let out = h.run_agent(&short, &["whoami"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{}",
        text(&out)
    );

    let out = h.run_agent(
        "akt_0000000000000000000000000000000000000000000",
        &["whoami"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
}

#[test]
fn agents_cannot_run_owner_commands() {
    let mut h = TestHome::initialized("agentowner");
    h.start_daemon(&[]);
    let token = h.add_agent("a1", "github", &[]);
    for args in [
        vec!["store", "x"],
        vec!["agent", "add", "b", "--scope", "x"],
        vec!["delete", "x"],
        vec!["init"],
    ] {
        let out = h.run_agent(&token, &args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {}", text(&out));
    }
}

#[test]
fn agent_list_is_scoped() {
    let mut h = TestHome::initialized("scope");
    assert!(h.run_stdin(&["store", "github"], b"g").status.success());
    assert!(h.run_stdin(&["store", "openai"], b"o").status.success());
    h.start_daemon(&[]);
    let token = h.add_agent("gh-only", "github", &[]);
    let out = h.run_agent(&token, &["list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["github"]);
}

#[test]
fn connection_from_a_uid_that_is_not_allowed_is_closed_unread() {
    if !is_root() {
        eprintln!(
            "SKIP connection_from_a_uid_that_is_not_allowed_is_closed_unread: needs root to run a client as another uid"
        );
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!(
            "SKIP connection_from_a_uid_that_is_not_allowed_is_closed_unread: setpriv (util-linux) is not installed"
        );
        return;
    }
    let mut h = TestHome::initialized("uid");
    // Let group nogroup reach the socket, so the daemon's own uid check is what decides.
    std::fs::write(
        h.home().join("config.toml"),
        "[daemon]\nsocket_group = \"nogroup\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        h.home().join("config.toml"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    h.start_daemon(&[]);
    let as_nobody = |token: &str| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("agentkeys"))
            .arg("whoami");
        h.env(&mut c);
        c.env("AGENTKEYS_TOKEN", token).stdin(Stdio::null());
        c.output().unwrap()
    };
    let owner_token_like = "akt_0000000000000000000000000000000000000000000";
    let out = as_nobody(owner_token_like);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("closed the connection"),
        "{}",
        text(&out)
    );
    let log = h.daemon_log();
    assert!(
        log.contains("refused connection") && log.contains("65534"),
        "daemon log:\n{log}"
    );
    assert!(
        !log.contains("hello refused"),
        "the daemon read the refused peer's message:\n{log}"
    );

    // Bound to uid 65534, an agent connects from there.
    let token = h.add_agent("nobody-agent", "github", &["--uid", "65534"]);
    let out = as_nobody(&token);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nobody-agent"));
    // The owner's uid cannot use that agent's token.
    assert_eq!(h.run_agent(&token, &["whoami"]).status.code(), Some(4));
}

#[test]
fn state_files_with_loose_permissions_are_refused() {
    let h = TestHome::initialized("perms");
    std::fs::set_permissions(
        h.home().join("vault.enc"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = h.run(&["list"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vault.enc"),
        "{}",
        text(&out)
    );
}

#[test]
fn invalid_config_is_a_clear_error() {
    let h = TestHome::initialized("config");
    std::fs::write(
        h.home().join("config.toml"),
        "[daemon]\nidel_ttl = \"5s\"\n",
    )
    .unwrap();
    let mut c = Command::new(bin("agentkeysd"));
    c.arg("--foreground");
    h.env(&mut c);
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("idel_ttl") && err.contains("config.toml"),
        "{err}"
    );
}

/// The daemon's next answer on `conn`, as JSON.
async fn reply(conn: &mut agentkeys_proto::conn::Conn) -> serde_json::Value {
    let p = tokio::time::timeout(Duration::from_secs(5), conn.recv())
        .await
        .expect("daemon answers")
        .expect("a reply");
    serde_json::from_slice(&p.data).expect("reply is JSON")
}

#[test]
fn hostile_clients_do_not_stop_the_daemon() {
    use agentkeys_proto::conn::Conn;
    let mut h = TestHome::initialized("hostile");
    h.start_daemon(&[]);
    let token = h.add_agent("probe", "*", &[]);
    let socket = h.socket();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Before hello: garbage gets an error and the connection is closed.
        let mut c = Conn::connect(&socket).await.unwrap();
        c.send(b"\x00\xffnot json", &[]).await.unwrap();
        assert_eq!(reply(&mut c).await["body"]["code"], "bad_request");
        assert!(c.recv().await.is_err(), "connection should be closed");

        // After hello, every bad message gets an error and the connection keeps working.
        let mut c = Conn::connect(&socket).await.unwrap();
        let hello = format!(r#"{{"v":1,"id":1,"body":{{"kind":"hello","token":"{token}"}}}}"#);
        c.send(hello.as_bytes(), &[]).await.unwrap();
        assert_eq!(reply(&mut c).await["body"]["kind"], "welcome");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{".to_vec(), "bad_request"),
            (
                br#"{"v":1,"id":2,"body":{"kind":"launch_missiles"}}"#.to_vec(),
                "unknown_kind",
            ),
            (
                br#"{"v":9,"id":3,"body":{"kind":"whoami"}}"#.to_vec(),
                "unsupported_version",
            ),
            (vec![b' '; 70 * 1024], "too_large"),
            (
                format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
                "bad_request",
            ),
        ];
        for (msg, code) in cases {
            c.send(&msg, &[]).await.unwrap();
            assert_eq!(reply(&mut c).await["body"]["code"], code);
        }
        // A file descriptor on a message that takes none.
        let (r, _w) = nix::unistd::pipe().unwrap();
        use std::os::fd::AsFd;
        c.send(br#"{"v":1,"id":4,"body":{"kind":"whoami"}}"#, &[r.as_fd()])
            .await
            .unwrap();
        assert_eq!(reply(&mut c).await["body"]["code"], "unexpected_fd");
        c.send(br#"{"v":1,"id":5,"body":{"kind":"whoami"}}"#, &[])
            .await
            .unwrap();
        assert_eq!(reply(&mut c).await["body"]["kind"], "whoami");

        // 300 idle connections: each is served, refused or closed; none takes the daemon down.
        let mut idle = Vec::new();
        for _ in 0..300 {
            if let Ok(c) = Conn::connect(&socket).await {
                idle.push(c);
            }
        }
        let mut fresh = Conn::connect(&socket).await.unwrap();
        fresh.send(hello.as_bytes(), &[]).await.unwrap();
        assert_eq!(
            reply(&mut fresh).await["body"]["kind"],
            "welcome",
            "a new client was locked out"
        );
        drop(idle);
    });
    assert!(h.daemon_alive(), "daemon died:\n{}", h.daemon_log());
    assert!(h.run(&["status"]).status.success());
    // The stdin helper is exercised here too: a token piped to an agent file works.
    let f = h.dir.join("token");
    std::fs::write(&f, format!("{token}\n")).unwrap();
    // Token files get the state-file checks: 0600, like `agent add --out` writes them.
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = h.cli(&["whoami"]);
    c.env("AGENTKEYS_TOKEN_FILE", &f);
    assert!(run_with_stdin(c, b"").status.success());
}

#[test]
fn init_force_closes_connections_of_the_old_owner_session() {
    let mut h = TestHome::initialized("ownerkick");
    h.start_daemon(&[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = h.socket();
    // The owner's token, read the way the owner's CLI reads it.
    let home = agentkeys_state::home::Home::at(h.home());
    let (_, dek) = agentkeys_state::init::open_owner(&home).unwrap();
    let session = agentkeys_state::session::load_owner_session(&home, dek.expose()).unwrap();
    let owner_tok = secrecy::SecretString::from(session.token.expose().to_string());
    drop(session);
    let (mut held_owner, _) = rt
        .block_on(agentkeys_proto::client::Client::connect_with(
            &socket, &owner_tok,
        ))
        .unwrap();
    let agent = secrecy::SecretString::from(h.add_agent("watcher", "*", &[]));
    let (mut held_agent, _) = rt
        .block_on(agentkeys_proto::client::Client::connect_with(
            &socket, &agent,
        ))
        .unwrap();

    let out = h.run(&["init", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    let r = rt.block_on(held_owner.call(agentkeys_proto::wire::RequestBody::Whoami {}));
    assert!(
        r.is_err(),
        "a connection of the old owner session still answered"
    );
    // The old token is refused on a new connection; the CLI works with the new session.
    let again = rt.block_on(agentkeys_proto::client::Client::connect_with(
        &socket, &owner_tok,
    ));
    assert!(
        again.is_err(),
        "old owner token accepted after init --force"
    );
    assert!(h.run(&["status"]).status.success());
    // Agents are untouched by a new owner session.
    assert!(
        rt.block_on(held_agent.call(agentkeys_proto::wire::RequestBody::Whoami {}))
            .is_ok()
    );
}

#[test]
fn config_writable_by_others_is_refused() {
    let h = TestHome::initialized("configperm");
    let cfg = h.home().join("config.toml");
    std::fs::write(&cfg, "[daemon]\nidle_ttl = \"5s\"\n").unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut c = Command::new(bin("agentkeysd"));
    c.arg("--foreground");
    h.env(&mut c);
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.toml") && err.contains("write"),
        "{err}"
    );
}

#[test]
fn an_existing_open_socket_directory_is_refused_not_changed() {
    let h = TestHome::initialized("sockdir");
    let open_dir = h.dir.join("shared");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = Command::new(bin("agentkeysd"));
    c.arg("--foreground");
    h.env(&mut c);
    c.env("AGENTKEYS_SOCKET", open_dir.join("s.sock"));
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("755"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::metadata(&open_dir).unwrap().mode() & 0o777,
        0o755,
        "directory mode was changed"
    );
}
