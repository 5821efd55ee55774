//! Memory canary scans (root: reads `/proc/PID/mem` of the daemon, the launcher, the CLI and
//! `agentkeys mcp`) after each delivery kind (fd, inline, env, file, MCP), and the exposure
//! windows the threat model states, measured: the time from the end of an operation until a
//! process's resident readable memory no longer holds the canary. Figures are printed as
//! `canary: ...` lines (and copied into docs/security-tests.md). Assertion messages never show
//! the canary.
//!
//! `tests/delivery.rs` `credential_dropped_after_delivery` and `tests/run.rs`
//! `mediated_run_drops_parent_copy` are the basic daemon and launcher scans; this file adds the
//! client processes, the windows and the MCP paths.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use agentkeys_e2e::{TestHome, is_root, memory_find, text, wait_until};
use serde_json::{Value, json};

const CANARY: &str = "ak-canary-scan-4e1f9a7b2c6d8e03";

fn skip(name: &str) -> bool {
    if !is_root() {
        println!("SKIP {name}: reading another process's memory needs root");
        return true;
    }
    false
}

/// A home with `svc` (fd and run only) and `open` (`--allow-inline`) both holding the canary,
/// and a running daemon; returns the daemon's and the launcher's pids.
fn ready(tag: &str) -> (TestHome, u32, u32) {
    let mut h = TestHome::initialized(tag);
    for args in [
        &["store", "svc"][..],
        &["store", "open", "--allow-inline"][..],
    ] {
        let out = h.run_stdin(args, CANARY.as_bytes());
        assert!(out.status.success(), "{}", text(&out));
    }
    let daemon = h.start_daemon(&[]);
    let launcher = std::fs::read_to_string(format!("/proc/{daemon}/task/{daemon}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("the launcher is the daemon's child")
        .parse()
        .unwrap();
    (h, daemon, launcher)
}

/// Whether the canary is in `pid`'s resident readable memory.
fn holds(pid: u32) -> bool {
    where_is(pid).is_some()
}

/// The region holding the canary in `pid`, printed (never the canary itself).
fn where_is(pid: u32) -> Option<String> {
    let at = memory_find(pid, CANARY.as_bytes());
    if let Some(region) = &at {
        println!("canary: found in pid {pid} at {region}");
    }
    at
}

/// Polls `pid` until the canary is gone: the time from `t0` to the end of the first clean scan,
/// or `None` after 5 s. A scan reads every resident page (hundreds of milliseconds for a debug
/// daemon on a busy machine), so the figure is an upper bound: the first scan's duration is
/// printed with it.
fn gone_after(pid: u32, t0: Instant) -> Option<Duration> {
    let deadline = t0 + Duration::from_secs(5);
    let mut first = true;
    loop {
        let scan = Instant::now();
        let at = if first {
            where_is(pid)
        } else {
            memory_find(pid, CANARY.as_bytes())
        };
        if first {
            println!(
                "canary: first scan of pid {pid} started {:.0} ms after the event, took {:.0} ms: {}",
                (scan - t0).as_secs_f64() * 1000.0,
                scan.elapsed().as_secs_f64() * 1000.0,
                if at.is_some() { "found" } else { "clean" }
            );
        }
        first = false;
        if at.is_none() {
            return Some(t0.elapsed());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("still there after 5 s".into(), |d| {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    })
}

/// A pipe whose buffer is already full: a process writing to it blocks in `write(2)`.
fn full_pipe() -> (OwnedFd, OwnedFd) {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let (r, w) = nix::unistd::pipe().unwrap();
    fcntl(&w, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let chunk = [b'.'; 4096];
    while nix::unistd::write(&w, &chunk).is_ok() {}
    while nix::unistd::write(&w, &chunk[..1]).is_ok() {}
    fcntl(&w, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
    (r, w)
}

/// `agentkeys read ARGS` with stdout on a full pipe: returns once the CLI has received the
/// credential and is blocked writing it (`/proc/PID/syscall`: write on fd 1), with the pipe's
/// read end to drain it.
fn blocked_read(h: &TestHome, args: &[&str]) -> (Child, OwnedFd) {
    let (r, w) = full_pipe();
    let child = h
        .cli(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let blocked = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{pid}/syscall"))
            .is_ok_and(|s| s.starts_with("1 0x1 "))
    });
    assert!(blocked, "agentkeys read never blocked writing its stdout");
    (child, r)
}

/// Drains the pipe after `child` exits; returns what it wrote after the filler.
fn drain(mut child: Child, r: OwnedFd) -> Vec<u8> {
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        std::fs::File::from(r).read_to_end(&mut all).unwrap();
        all
    });
    let st = child.wait().unwrap();
    assert!(st.success(), "agentkeys read failed");
    let all = reader.join().unwrap();
    let start = all.iter().rposition(|&b| b == b'.').map_or(0, |i| i + 1);
    all[start..].to_vec()
}

/// The scan is not blind: `pid` is seen to hold its socket path (in its environment).
fn assert_sees(h: &TestHome, pid: u32, who: &str) {
    let sock = h.socket().display().to_string();
    assert!(
        memory_find(pid, sock.as_bytes()).is_some(),
        "the scan of {who} (pid {pid}) sees nothing at all"
    );
}

/// fd delivery: while `agentkeys read` writes the value out, neither it nor the daemon holds
/// the canary in readable memory (the CLI writes straight from the secret page).
#[test]
fn canary_fd_delivery() {
    if skip("canary_fd_delivery") {
        return;
    }
    let (h, daemon, _) = ready("canary-fd");
    let (cli, r) = blocked_read(&h, &["read", "svc"]);
    let t0 = Instant::now();
    let cli_holds = holds(cli.id());
    assert_sees(&h, cli.id(), "agentkeys read");
    let daemon_window = gone_after(daemon, t0);
    let out = drain(cli, r);
    assert!(out == CANARY.as_bytes(), "read printed the wrong bytes");
    println!(
        "canary: fd delivery: CLI while writing: {}; daemon clean {} after the CLI got the fd",
        if cli_holds { "HOLDS IT" } else { "clean" },
        ms(daemon_window)
    );
    assert!(
        !cli_holds,
        "canary found in `agentkeys read` while it wrote the value"
    );
    assert!(
        daemon_window.is_some(),
        "canary found in the daemon (pid {daemon}) 5 s after an fd delivery"
    );
}

/// Inline delivery: the decoded bytes are in the CLI while it writes them (by design: inline
/// means bytes in the client); the daemon's encode buffer is wiped.
#[test]
fn canary_inline_delivery() {
    if skip("canary_inline_delivery") {
        return;
    }
    let (h, daemon, _) = ready("canary-inline");
    let (cli, r) = blocked_read(&h, &["read", "open", "--inline"]);
    let t0 = Instant::now();
    let cli_holds = holds(cli.id());
    let daemon_window = gone_after(daemon, t0);
    let out = drain(cli, r);
    assert!(
        out == CANARY.as_bytes(),
        "read --inline printed the wrong bytes"
    );
    println!(
        "canary: inline delivery: CLI while writing: {} (expected: inline bytes live in the \
         client); daemon clean {} after the answer",
        if cli_holds { "holds it" } else { "clean" },
        ms(daemon_window)
    );
    assert!(
        daemon_window.is_some(),
        "canary found in the daemon (pid {daemon}) 5 s after an inline delivery"
    );
}

/// `run` with env and file delivery, masked and not: during the run the launcher and the CLI
/// never hold the canary; the daemon holds the masking tables while the program's output is
/// open (the stated window: the secret's 8-byte windows, each a big-endian `u64`, so in memory
/// as byte-reversed 8-byte pieces, never the secret as one string), and nothing without
/// masking; after the run it is clean.
#[test]
fn canary_run_env_and_file() {
    if skip("canary_run_env_and_file") {
        return;
    }
    let (h, daemon, launcher) = ready("canary-run");
    for masking in [true, false] {
        let mut args = vec!["run", "--env", "T=svc", "--file", "F=svc"];
        if !masking {
            args.push("--no-masking");
        }
        // The program prints the value once (masked, or to /dev/null) and stays for a moment.
        args.extend([
            "--",
            "sh",
            "-c",
            "echo \"$T\"; cat \"$F\" >/dev/null; sleep 4",
        ]);
        let mut cli = h
            .cli(&args)
            .stdin(Stdio::null())
            .stdout(if masking {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let c = holds(cli.id());
        assert_sees(&h, cli.id(), "agentkeys run");
        let l = holds(launcher);
        let d = holds(daemon);
        // The masker's first 8-byte window, as it lies in memory.
        let gram = u64::from_be_bytes(CANARY.as_bytes()[..8].try_into().unwrap()).to_ne_bytes();
        let tables = memory_find(daemon, &gram).is_some();
        assert!(
            cli.try_wait().unwrap().is_none(),
            "the program ended before the scans were done: no figures"
        );
        let out = cli.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let t0 = Instant::now();
        let after = gone_after(daemon, t0);
        // The tables went with the run's output: wiped, not just freed.
        assert!(
            memory_find(daemon, &gram).is_none(),
            "masking tables left in the daemon (pid {daemon}) after the run"
        );
        println!(
            "canary: run --env/--file{}: during the run daemon {}, launcher {}, CLI {}; daemon \
             clean {} after the run ended",
            if masking { "" } else { " --no-masking" },
            match (d, tables) {
                (true, _) => "HOLDS IT",
                (false, true) => "clean (holds the masking tables)",
                (false, false) => "clean",
            },
            if l { "HOLDS IT" } else { "clean" },
            if c { "HOLDS IT" } else { "clean" },
            ms(after)
        );
        assert!(
            !l,
            "canary found in the launcher (pid {launcher}) during a run"
        );
        assert!(!c, "canary found in the `agentkeys run` CLI during a run");
        if masking {
            assert!(
                tables,
                "the masking tables were not found: the scan may be blind"
            );
            assert!(
                !d,
                "canary found as one string in the daemon (pid {daemon}) during a masked run"
            );
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains(CANARY),
                "unmasked output"
            );
        } else {
            assert!(
                !d,
                "canary found in the daemon (pid {daemon}) during an unmasked run"
            );
        }
        assert!(
            after.is_some(),
            "canary found in the daemon (pid {daemon}) 5 s after a run"
        );
        assert!(
            !holds(launcher),
            "canary found in the launcher (pid {launcher}) after a run"
        );
    }
}

/// `agentkeys mcp` driven over stdio with plain JSON-RPC lines.
struct Mcp {
    child: Child,
    out: BufReader<ChildStdout>,
    next: u64,
}

impl Mcp {
    fn start(h: &TestHome, token_file: &std::path::Path, fd_channel: Option<i32>) -> Mcp {
        let mut c = h.cli(&["mcp"]);
        if let Some(fd) = fd_channel {
            c.args(["--fd-channel", &fd.to_string()]);
        }
        let mut child = c
            .env("AGENTKEYS_TOKEN_FILE", token_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut m = Mcp {
            child,
            out,
            next: 1,
        };
        let caps = if fd_channel.is_some() {
            json!({"experimental": {"agentkeys/fd": {}}})
        } else {
            json!({})
        };
        m.request(
            "initialize",
            json!({"protocolVersion": "2025-03-26", "capabilities": caps,
                   "clientInfo": {"name": "canary", "version": "0"}}),
        );
        m.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        m
    }

    fn send(&mut self, v: &Value) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{v}").unwrap();
        stdin.flush().unwrap();
    }

    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let mut line = String::new();
            assert!(
                self.out.read_line(&mut line).unwrap() > 0,
                "mcp closed stdout"
            );
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["id"] == id {
                return v;
            }
        }
    }

    fn tool(&mut self, name: &str, args: Value) -> Value {
        let r = self.request("tools/call", json!({"name": name, "arguments": args}));
        assert!(r["result"].is_object(), "{name}: no result");
        r["result"].clone()
    }
}

impl Drop for Mcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// MCP: after `run`, after `get_credential` over the fd channel (forwarded unmapped) the MCP
/// process holds no canary; after an inline `get_credential` (the value goes to the model, by
/// the owner's choice) the window until it is gone is measured.
#[test]
fn canary_mcp() {
    if skip("canary_mcp") {
        return;
    }
    let (h, daemon, launcher) = ready("canary-mcp");
    let token_file = h.agent_token_file("bot", "svc,open");
    let (ours, theirs) = agentkeys_e2e::fd_channel_pair();
    let mut m = Mcp::start(&h, &token_file, Some(theirs.as_raw_fd()));
    drop(theirs);
    let pid = m.child.id();
    assert_sees(&h, pid, "agentkeys mcp");

    let r = m.tool(
        "run",
        json!({"command": "sh", "args": ["-c", "echo \"$T\""], "env": {"T": "svc"}}),
    );
    assert!(!r.to_string().contains(CANARY), "unmasked run result");
    let t0 = Instant::now();
    let after_run = gone_after(pid, t0);

    let r = m.tool("get_credential", json!({"service": "svc"}));
    assert_eq!(
        r["structuredContent"]["delivery"], "fd",
        "not delivered over the fd channel"
    );
    let t0 = Instant::now();
    let after_fd = gone_after(pid, t0);

    // Inline needs a client without the fd capability (an fd-capable one gets an fd).
    drop(m);
    let mut m = Mcp::start(&h, &token_file, None);
    let pid = m.child.id();
    let r = m.tool("get_credential", json!({"service": "open"}));
    assert!(r.to_string().contains(CANARY), "inline value not returned");
    let t0 = Instant::now();
    let inline_first = holds(pid);
    let after_inline = gone_after(pid, t0);
    let daemon_after = gone_after(daemon, Instant::now());
    println!(
        "canary: MCP: mcp process clean {} after `run`, {} after get_credential (fd channel); \
         after an inline get_credential it {} at the first scan, clean {}; daemon clean {}; \
         launcher {}",
        ms(after_run),
        ms(after_fd),
        if inline_first { "held it" } else { "was clean" },
        ms(after_inline),
        ms(daemon_after),
        if holds(launcher) { "HOLDS IT" } else { "clean" },
    );
    drop(ours);
    assert!(
        after_run.is_some(),
        "canary found in the MCP process (pid {pid}) 5 s after `run`"
    );
    assert!(
        after_fd.is_some(),
        "canary found in the MCP process (pid {pid}) 5 s after an fd-channel delivery"
    );
    assert!(
        daemon_after.is_some(),
        "canary found in the daemon (pid {daemon}) after MCP deliveries"
    );
    assert!(
        !holds(launcher),
        "canary found in the launcher (pid {launcher}) after an MCP run"
    );
}
