//! The client trusts nothing it has not checked (issue 14, item 11): whoever listens at the
//! socket path must run as the daemon's uid before a token or an fd is sent; a token file is
//! read only when it passes the state-file checks; and the quickstart shows what it runs.
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentkeys_e2e::{TestHome, bin_dir, is_root, text, workspace_root};

/// Runs `cmd`, killing it after `limit` (a command that hangs is a failure, not a stuck test).
fn run_bounded(mut cmd: Command, limit: Duration) -> Option<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Item 11: `AGENTKEYS_TOKEN_FILE` is read with the state-file checks: a FIFO does not hang the
/// CLI, a symlink is not followed, a file others can read or a directory others can write is
/// refused, each with a clear message; a proper 0600 file works.
#[test]
fn a_token_file_is_read_only_after_the_state_file_checks() {
    let mut h = TestHome::initialized("tokenfile");
    h.start_daemon(&[]);
    let good = h.agent_token_file("bot", "github");
    let whoami = |file: &std::path::Path| {
        let mut c = h.cli(&["whoami"]);
        c.env("AGENTKEYS_TOKEN_FILE", file);
        run_bounded(c, Duration::from_secs(10))
    };
    let out = whoami(&good).expect("whoami hung");
    assert!(out.status.success(), "{}", text(&out));

    let dir = h.dir.join("tokens");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let loose = dir.join("loose");
    std::fs::copy(&good, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open_dir = h.dir.join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let in_open = open_dir.join("token");
    std::fs::copy(&good, &in_open).unwrap();
    std::fs::set_permissions(&in_open, std::fs::Permissions::from_mode(0o600)).unwrap();

    for (file, want) in [
        (&fifo, "not a regular file"),
        (&link, "symbolic link"),
        (&loose, "chmod 600"),
        (&in_open, "chmod 700"),
    ] {
        let out = whoami(file).unwrap_or_else(|| panic!("whoami hung on {}", file.display()));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            file.display(),
            text(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("AGENTKEYS_TOKEN_FILE") && err.contains(want),
            "{}: {err}",
            file.display()
        );
    }
}

/// Item 11: the client checks who listens at the socket path (`SO_PEERCRED`) before it sends
/// anything. A process of another uid squatting the path gets no token and no fd; with
/// `AGENTKEYS_DAEMON_UID` naming that uid the client talks to it (so the check is what stopped
/// it).
#[test]
fn the_client_checks_who_listens_before_sending_anything() {
    if !is_root() {
        eprintln!(
            "SKIP the_client_checks_who_listens_before_sending_anything: needs root to listen as another uid"
        );
        return;
    }
    let python = "/usr/bin/python3";
    for tool in ["setpriv", python] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!(
                "SKIP the_client_checks_who_listens_before_sending_anything: {tool} is not installed"
            );
            return;
        }
    }
    let h = TestHome::new("squatter");
    let dir = h.dir.join("squat");
    std::fs::create_dir(&dir).unwrap();
    nix::unistd::chown(
        &dir,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .unwrap();
    let sock = dir.join("agentkeysd.sock");
    let got = dir.join("received");
    // The squatter: accepts connections and records how many bytes and fds each sends.
    let script = r#"
import socket, sys, os
path, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(path); os.chmod(path, 0o777); s.listen(8)
open(log, "w").close()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        data, anc, _, _ = c.recvmsg(65536, socket.CMSG_SPACE(64))
    except OSError:
        data, anc = b"", []
    with open(log, "a") as f:
        f.write(f"{len(data)} {sum(len(d) for _, _, d in anc) // 4}\n")
    c.close()
"#;
    let mut squatter = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([python, "-c", script])
        .arg(&sock)
        .arg(&got)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(squatter.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
    }
    let token_like = "akt_0000000000000000000000000000000000000000000";
    let as_agent = |args: &[&str], daemon_uid: Option<&str>| {
        let mut c = h.cli(args);
        c.env("AGENTKEYS_SOCKET", &sock)
            .env("AGENTKEYS_TOKEN", token_like);
        if let Some(u) = daemon_uid {
            c.env("AGENTKEYS_DAEMON_UID", u);
        }
        run_bounded(c, Duration::from_secs(10)).expect("the CLI hung")
    };
    for args in [
        &["whoami"][..],
        &["run", "--", "true"][..],
        &["read", "github"][..],
    ] {
        let out = as_agent(args, None);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("refusing to talk") && err.contains("65534"),
            "{args:?}: {err}"
        );
    }
    let received = std::fs::read_to_string(&got).unwrap();
    assert!(
        received.lines().all(|l| l == "0 0"),
        "the squatter received bytes or fds: {received:?}"
    );
    // Told that uid 65534 is the daemon's, the client speaks: the check is what held it back.
    let _ = as_agent(&["whoami"], Some("65534"));
    let received = std::fs::read_to_string(&got).unwrap();
    assert!(
        received.lines().any(|l| l != "0 0"),
        "nothing reached the listener even when allowed: {received:?}"
    );
    let _ = squatter.kill();
    let _ = squatter.wait();
}

/// Item 11: the quickstart runs, and each step runs the very text it shows (`step` evaluates
/// the string it prints).
#[test]
fn the_quickstart_runs_what_it_shows() {
    let h = TestHome::new("quickstart");
    let mut c = Command::new("bash");
    c.arg(workspace_root().join("examples/quickstart.sh"))
        .env("AGENTKEYS_BIN", bin_dir())
        .env("TMPDIR", &h.dir)
        .env_remove("AGENTKEYS_HOME")
        .env_remove("AGENTKEYS_SOCKET")
        .env_remove("XDG_RUNTIME_DIR");
    let out = run_bounded(c, Duration::from_secs(120)).expect("quickstart hung");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        shown.contains("$ AGENTKEYS_TOKEN=$TOKEN agentkeys run --env GH_TOKEN=github -- sh -c 'echo \"the child sees $GH_TOKEN\"; printf %s \"$GH_TOKEN\" | base64'"),
        "{shown}"
    );
    assert!(
        shown.contains("the child sees ********\n********\n"),
        "{shown}"
    );
    assert!(shown.contains("(refused, exit 5)"), "{shown}");
    let script = std::fs::read_to_string(workspace_root().join("examples/quickstart.sh")).unwrap();
    assert!(
        script.contains("eval \"$1\""),
        "the quickstart's step() must run the text it shows"
    );
}
