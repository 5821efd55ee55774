//! Hostile clients against a running daemon, over raw `SOCK_SEQPACKET` sockets: random bytes
//! before and after hello, mutated requests, deeply nested JSON, oversized packets, 64 fds on
//! one message, fds on every kind of message that takes none, 1,000 connections at once (the
//! cap refuses clearly), clients that connect and never send, rapid connect/close. The daemon
//! stays up and keeps serving, its memory stays bounded (a second round costs nothing more), and
//! its fd count returns to the baseline.
//!
//! `tests/broker.rs` `hostile_clients_do_not_stop_the_daemon` checks each error code for a
//! fixed set of bad messages; this file is the volume and resource side.
#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use agentkeys_e2e::hostile_input::{TEMPLATES, hello, hostile_packet};
use agentkeys_e2e::{
    Prng, TestHome, fd_targets, open_fds, settled_fds, status_kb, text, wait_until,
};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, sendmsg,
    setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use serde_json::Value;

/// What came back on a raw connection.
#[derive(Debug)]
enum Reply {
    Json(Value),
    /// The daemon closed the connection.
    Closed,
    /// Nothing within the 5 s receive timeout.
    Silence,
}

/// A blocking client socket that can send anything: any bytes, any fds.
struct Raw(OwnedFd);

impl Raw {
    fn connect(path: &Path) -> Raw {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::seconds(5)).expect("SO_RCVTIMEO");
        setsockopt(&fd, sockopt::SendTimeout, &TimeVal::seconds(5)).expect("SO_SNDTIMEO");
        connect(fd.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("connect");
        Raw(fd)
    }

    fn send(&self, data: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
        let iov = [IoSlice::new(data)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(self.0.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
    }

    fn reply(&self) -> Reply {
        let mut buf = vec![0u8; 128 * 1024];
        match recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) | Err(Errno::ECONNRESET) => Reply::Closed,
            Ok(n) => Reply::Json(serde_json::from_slice(&buf[..n]).expect("replies are JSON")),
            Err(Errno::EAGAIN) => Reply::Silence,
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// The `body.code` of an error reply (panics on anything else).
    fn error_code(&self) -> String {
        match self.reply() {
            Reply::Json(v) if v["body"]["kind"] == "error" => {
                v["body"]["code"].as_str().unwrap_or("").to_string()
            }
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    fn hello(path: &Path, token: &str) -> Raw {
        let c = Raw::connect(path);
        c.send(&hello(token), &[]).expect("send hello");
        match c.reply() {
            Reply::Json(v) if v["body"]["kind"] == "welcome" => c,
            other => panic!("hello: {other:?}"),
        }
    }
}

/// Random packets before hello: each gets an error (or, for an empty packet, nothing) and the
/// connection is closed.
fn before_hello(socket: &Path, rng: &mut Prng, n: usize) {
    for i in 0..n {
        let c = Raw::connect(socket);
        let packet = if i == 0 {
            Vec::new()
        } else {
            hostile_packet(rng)
        };
        c.send(&packet, &[]).expect("send");
        match c.reply() {
            Reply::Json(v) => {
                assert_eq!(v["body"]["kind"], "error", "{v}");
                assert!(matches!(c.reply(), Reply::Closed), "not closed after {v}");
            }
            Reply::Closed => assert!(packet.is_empty(), "closed without an answer"),
            Reply::Silence => panic!("no answer to a hostile first packet"),
        }
    }
}

/// Random packets after hello, on one connection: each gets an answer, and the connection
/// still works afterwards.
fn after_hello(socket: &Path, token: &str, rng: &mut Prng, n: usize) {
    let c = Raw::hello(socket, token);
    for i in 0..n {
        let packet = hostile_packet(rng);
        c.send(&packet, &[]).expect("send");
        match c.reply() {
            Reply::Json(_) => {}
            other => panic!("packet {i} ({} bytes): {other:?}", packet.len()),
        }
    }
    c.send(TEMPLATES[0].as_bytes(), &[]).unwrap();
    match c.reply() {
        Reply::Json(v) => assert_eq!(v["body"]["kind"], "whoami", "{v}"),
        other => panic!("whoami after the fuzz: {other:?}"),
    }
}

/// Descriptors where none belong: 64 on one message (before and after hello), 1-4 on every
/// kind that takes none, the wrong number on `run`.
fn fds_everywhere(socket: &Path, token: &str) {
    let (r, _w) = nix::unistd::pipe().unwrap();
    let many = vec![r.as_raw_fd(); 64];
    let c = Raw::connect(socket);
    c.send(&hello(token), &many).unwrap();
    assert_eq!(c.error_code(), "unexpected_fd");
    assert!(matches!(c.reply(), Reply::Closed));

    let c = Raw::hello(socket, token);
    c.send(TEMPLATES[0].as_bytes(), &many).unwrap();
    assert_eq!(c.error_code(), "unexpected_fd", "64 fds");
    for (i, t) in TEMPLATES.iter().enumerate() {
        for n in 1..=4 {
            let is_run = t.contains(r#""kind":"run""#);
            if is_run && n == 3 {
                continue;
            }
            c.send(t.as_bytes(), &many[..n]).unwrap();
            let code = c.error_code();
            if !is_run {
                assert_eq!(code, "unexpected_fd", "template {i} with {n} fds");
            }
        }
    }
    c.send(&hello(token), &many[..2]).unwrap();
    assert_eq!(c.error_code(), "unexpected_fd");
    c.send(TEMPLATES[0].as_bytes(), &[]).unwrap();
    assert!(matches!(c.reply(), Reply::Json(v) if v["body"]["kind"] == "whoami"));
}

/// 1,000 connections at once, each saying hello: up to the cap (512) are served, every other
/// one gets a clear `busy` answer; the CLI says so too while the cap is reached.
fn thousand_connections(h: &TestHome, token: &str) -> (usize, usize) {
    let mut open = Vec::new();
    let (mut welcome, mut busy) = (0, 0);
    for _ in 0..1000 {
        let c = Raw::connect(&h.socket());
        // EPIPE: the daemon refused (busy) and closed before the hello arrived; its answer is
        // queued all the same.
        if let Err(e) = c.send(&hello(token), &[]) {
            assert_eq!(e, Errno::EPIPE, "send hello");
        }
        match c.reply() {
            Reply::Json(v) if v["body"]["kind"] == "welcome" => welcome += 1,
            Reply::Json(v) if v["body"]["code"] == "busy" => {
                assert!(
                    v["body"]["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("connection limit"),
                    "{v}"
                );
                busy += 1;
            }
            other => panic!("connection {}: {other:?}", welcome + busy),
        }
        open.push(c);
    }
    let out = h.run(&["status"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connection limit"),
        "{}",
        text(&out)
    );
    drop(open);
    (welcome, busy)
}

/// Clients that connect and never send: closed by the daemon (max_pending at once, the rest
/// at the handshake timeout), each within 5 s.
fn silent_clients(socket: &Path, n: usize) -> Duration {
    let start = Instant::now();
    let conns: Vec<_> = (0..n).map(|_| Raw::connect(socket)).collect();
    for (i, c) in conns.iter().enumerate() {
        assert!(
            matches!(c.reply(), Reply::Closed),
            "silent connection {i} was not closed"
        );
    }
    start.elapsed()
}

fn rapid_connect_close(socket: &Path, n: usize) {
    for _ in 0..n {
        drop(Raw::connect(socket));
    }
}

/// Raises this process's soft RLIMIT_NOFILE to `want` (within the hard limit).
fn room_for_fds(want: u64) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if soft >= want {
        return Ok(());
    }
    if hard < 1100 {
        return Err(format!(
            "the hard RLIMIT_NOFILE ({hard}) leaves no room for 1,000 connections"
        ));
    }
    setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).map_err(|e| e.to_string())
}

/// Waits until the daemon's fd count is back to `base` (root), else for two seconds.
fn back_to(pid: u32, base: Option<usize>, round: usize) {
    match base {
        Some(base) => assert!(
            wait_until(Duration::from_secs(10), || open_fds(pid) <= Some(base)),
            "round {round}: daemon fds {base} before, {:?} after: {:?}",
            open_fds(pid),
            fd_targets(pid)
        ),
        None => std::thread::sleep(Duration::from_secs(2)),
    }
}

#[test]
fn hostile_clients_leave_the_daemon_up_with_bounded_memory_and_fds() {
    let mut h = TestHome::initialized("hostile2");
    h.write_config("[daemon]\nhandshake_timeout = \"1s\"\n");
    assert!(
        h.run_stdin(&["store", "github"], b"hostile-value")
            .status
            .success()
    );
    // The daemon keeps the limit it was started with; this process needs room for 1,000
    // connections of its own (the soft limit is often 1024).
    let pid = h.start_daemon(&[]);
    if let Err(why) = room_for_fds(2048) {
        println!("SKIP hostile_clients_leave_the_daemon_up_with_bounded_memory_and_fds: {why}");
        return;
    }
    let token = h.add_agent("probe", "github", &[]);
    let socket = h.socket();
    let mut rng = Prng::from_env("hostile");
    let fds_base = settled_fds(pid);
    let rss_base = status_kb(pid, "VmRSS");
    let mut rss_after = Vec::new();
    for round in 1..=2 {
        let t = Instant::now();
        before_hello(&socket, &mut rng, 200);
        after_hello(&socket, &token, &mut rng, 2000);
        fds_everywhere(&socket, &token);
        let (welcome, busy) = thousand_connections(&h, &token);
        assert_eq!(welcome + busy, 1000);
        assert!(
            welcome >= 500 && busy >= 480,
            "{welcome} served, {busy} busy"
        );
        // The 1,000 are closed on the daemon's side before the next step needs free slots.
        back_to(pid, fds_base, round);
        let silent = silent_clients(&socket, 100);
        rapid_connect_close(&socket, 3000);
        assert!(h.daemon_alive(), "daemon died:\n{}", h.daemon_log());
        // Closed connections leave the table when their task runs: wait for that, then the
        // daemon serves as before.
        back_to(pid, fds_base, round);
        let st = h.run(&["status"]);
        assert!(st.status.success(), "{}", text(&st));
        let rss = status_kb(pid, "VmRSS");
        println!(
            "hostile round {round}: {:.1} s; 1000 connections: {welcome} served, {busy} refused \
             busy; 100 silent connections closed within {:.2} s; daemon VmRSS {rss_base} kB at \
             start, {rss} kB now, VmHWM {} kB; fds {:?} at start, {:?} now",
            t.elapsed().as_secs_f64(),
            silent.as_secs_f64(),
            status_kb(pid, "VmHWM"),
            fds_base,
            open_fds(pid),
        );
        rss_after.push(rss);
    }
    if fds_base.is_none() {
        println!(
            "SKIP part of hostile_clients_leave_the_daemon_up_with_bounded_memory_and_fds: \
             counting the daemon's fds needs root"
        );
    }
    // Bounded: a second identical round does not grow the daemon. The leak this catches is one
    // per connection: 1,000 connections hold 64 KiB buffers each, so leaking them adds at least
    // 64 MB a round. What glibc's per-thread arenas keep cached after a round is not a leak and
    // varies from run to run (VmRSS after a round measured 30 to 60 MB from a 22 MB start on
    // a 2-core machine under load, in either order of the two rounds), hence a 48 MB bound,
    // below the smallest leak it must catch and above that noise.
    assert!(
        rss_after[1] <= rss_after[0] + 48 * 1024,
        "daemon memory grew from {} kB to {} kB between two identical rounds",
        rss_after[0],
        rss_after[1]
    );
}

/// 200 clients connect and say hello at once, more than `max_pending` (64) before the daemon
/// gets to read them: every one is served. (The oldest pending connection used to be evicted
/// even when its hello was already queued.)
#[test]
fn a_burst_of_clients_saying_hello_at_once_is_served() {
    let mut h = TestHome::initialized("burst");
    h.start_daemon(&[]);
    let token = h.add_agent("burst", "*", &[]);
    let conns: Vec<_> = (0..200)
        .map(|_| {
            let c = Raw::connect(&h.socket());
            c.send(&hello(&token), &[]).unwrap();
            c
        })
        .collect();
    for (i, c) in conns.iter().enumerate() {
        match c.reply() {
            Reply::Json(v) if v["body"]["kind"] == "welcome" => {}
            other => panic!("client {i} of a burst of 200: {other:?}"),
        }
    }
    assert!(h.daemon_alive());
}
