//! Delivery benchmark: what one `get_credential` costs against a running agentkeysd, next to
//! what the kernel needs for the same work, all measured in one process and one run.
//!
//! ```text
//! bash bench/run.sh                      # builds, starts a throwaway daemon, runs this
//! AGENTKEYS_SOCKET=... AGENTKEYS_TOKEN=akt_... \
//!   target/release/examples/bench_delivery [--iters N] [--warmup N] \
//!     [--uncached SERVICE] [--cached SERVICE] [--sync-dir DIR] [--baselines-only]
//! ```
//!
//! Measurements (each: `warmup` untimed iterations, then `iters` timed ones; percentiles are
//! nearest-rank over the sorted samples):
//!
//! - `baseline_seqpacket_rtt_us`: a 64-byte message to an echo thread and back over a
//!   `SOCK_SEQPACKET` socketpair, blocking syscalls on both sides: the kernel's floor.
//! - `baseline_conn_rtt_us`: the same through [`agentkeys_proto::conn::Conn`] on tokio on both
//!   sides (the framing and runtime the client and the daemon use), no JSON, no daemon.
//! - `baseline_memfd_delivery_us`: create a `memfd_secret` page, write 40 bytes, send its fd with
//!   `SCM_RIGHTS`; the echo thread maps it ([`MappedSecret::map`]), reads it, unmaps, replies.
//!   The minimal version of what a delivery has to do.
//! - `baseline_fdatasync_us`: append a 300-byte line to a file in `--sync-dir` (default:
//!   `$AGENTKEYS_HOME`, else the temp dir) and `fdatasync` it: the price of one audit record.
//! - `daemon_whoami_rtt_us`: a `whoami` request to the daemon (no audit record, no secret).
//! - `get_fd_*`: `get_credential(service, fd)` + reading the bytes + unmapping, against the
//!   daemon, for a service without cache (fetch, deliver, drop: three audit records) and one
//!   with a `cache_ttl` (cache_hit, deliver: two records).
//!
//! The last line of stdout is one JSON object whose values are all numbers; the readable
//! report comes before it. Progress goes to stderr. No secret is ever printed: the bytes are
//! only summed so the read cannot be optimised away.
//!
//! Adding a measurement (issue 9: throughput with 8 clients, run overhead, RSS, start-up ...):
//! write a `fn(&Config, &mut Report) -> Result<(), Error>` and list it in `main`;
//! `Report::timed` records p50/p99 under a key prefix, `Report::value` a single number.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

use agentkeys_hardening::page::{MappedSecret, PagePolicy, SecretPage};
use agentkeys_proto::client::Client;
use agentkeys_proto::conn::Conn;
use agentkeys_proto::wire::{RequestBody, ResponseBody};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, recv, send, sendmsg, socketpair,
};
use secrecy::SecretString;
use tokio_seqpacket::UnixSeqpacket;

type Error = Box<dyn std::error::Error>;

const MSG_LEN: usize = 64;
const SECRET_LEN: usize = 40;

/// What to run, from arguments and environment.
struct Config {
    iters: usize,
    warmup: usize,
    uncached: String,
    cached: String,
    sync_dir: PathBuf,
    baselines_only: bool,
    /// Clients of the throughput measurement (0: skip it).
    clients: usize,
    /// Seconds of the throughput measurement.
    tput_secs: f64,
    /// `--startup BIN`: measure the daemon's start instead (see [`bench_startup`]).
    startup: Option<PathBuf>,
    startup_runs: usize,
    /// `--fill-cache PREFIX N`: fetch PREFIX-0 .. PREFIX-(N-1) twice (see [`fill_cache`]).
    fill: Option<(String, usize)>,
    /// `--remote-vs-local SOCKET`: an uncached read through the remote daemon at SOCKET
    /// (token in `BENCH_REMOTE_TOKEN`) against a local one (see [`bench_remote`]).
    remote: Option<PathBuf>,
}

impl Config {
    fn parse() -> Result<Config, Error> {
        let env_num = |k: &str, d: usize| -> Result<usize, Error> {
            match std::env::var(k) {
                Ok(v) => v
                    .parse()
                    .map_err(|_| format!("{k}={v:?} is not a number").into()),
                Err(_) => Ok(d),
            }
        };
        let mut c = Config {
            iters: env_num("BENCH_ITERS", 2000)?,
            warmup: env_num("BENCH_WARMUP", 200)?,
            uncached: "bench-uncached".into(),
            cached: "bench-cached".into(),
            sync_dir: std::env::var_os("AGENTKEYS_HOME")
                .map_or_else(std::env::temp_dir, PathBuf::from),
            baselines_only: false,
            clients: env_num("BENCH_CLIENTS", 8)?,
            tput_secs: env_num("BENCH_TPUT_SECS", 3)? as f64,
            startup: None,
            startup_runs: env_num("BENCH_STARTUP_RUNS", 5)?,
            fill: None,
            remote: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--iters" => c.iters = val()?.parse()?,
                "--warmup" => c.warmup = val()?.parse()?,
                "--uncached" => c.uncached = val()?,
                "--cached" => c.cached = val()?,
                "--sync-dir" => c.sync_dir = val()?.into(),
                "--baselines-only" => c.baselines_only = true,
                "--clients" => c.clients = val()?.parse()?,
                "--startup" => c.startup = Some(val()?.into()),
                "--remote-vs-local" => c.remote = Some(val()?.into()),
                "--fill-cache" => {
                    let prefix = val()?;
                    c.fill = Some((prefix, val()?.parse()?));
                }
                "-h" | "--help" => {
                    eprintln!(
                        "usage: bench_delivery [--iters N] [--warmup N] [--uncached SVC] [--cached SVC] [--sync-dir DIR] [--baselines-only] [--clients N]\n\
                         \x20      bench_delivery --startup AGENTKEYSD | --fill-cache PREFIX N\n\
                         env: AGENTKEYS_SOCKET, AGENTKEYS_TOKEN or AGENTKEYS_TOKEN_FILE, BENCH_ITERS, BENCH_WARMUP"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (see --help)").into()),
            }
        }
        if c.iters == 0 {
            return Err("--iters must be at least 1".into());
        }
        Ok(c)
    }
}

/// Summary of one timed series, in microseconds.
struct Stats {
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Stats {
    fn of(mut us: Vec<f64>) -> Stats {
        us.sort_by(f64::total_cmp);
        let n = us.len();
        // Nearest rank: the smallest sample with at least p% of samples at or below it.
        let pct = |p: f64| us[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Stats {
            min: us[0],
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: us[n - 1],
            mean: us.iter().sum::<f64>() / n as f64,
        }
    }
}

/// The readable report and the JSON metrics, in the order they were measured.
#[derive(Default)]
struct Report {
    rows: Vec<(String, Stats)>,
    notes: Vec<String>,
    metrics: Vec<(String, f64)>,
}

impl Report {
    /// Runs `op` `warmup` times untimed, then `iters` times timed; records `<key>_us` (p50)
    /// and, with `p99`, `<key_p99>` as well. Returns the p50.
    fn timed(
        &mut self,
        cfg: &Config,
        label: &str,
        p50_key: &str,
        p99_key: Option<&str>,
        mut op: impl FnMut() -> Result<(), Error>,
    ) -> Result<f64, Error> {
        eprintln!("  {label}: {} warm-up + {} timed", cfg.warmup, cfg.iters);
        for _ in 0..cfg.warmup {
            op()?;
        }
        let mut us = Vec::with_capacity(cfg.iters);
        for _ in 0..cfg.iters {
            let t = Instant::now();
            op()?;
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let s = Stats::of(us);
        let p50 = s.p50;
        self.value(p50_key, s.p50);
        if let Some(k) = p99_key {
            self.value(k, s.p99);
        }
        self.rows.push((label.to_string(), s));
        Ok(p50)
    }

    fn value(&mut self, key: &str, v: f64) {
        self.metrics.push((key.to_string(), v));
    }

    fn get(&self, key: &str) -> Option<f64> {
        self.metrics.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// `num / den` as `key`, when both were measured.
    fn ratio(&mut self, key: &str, num: &str, den: &str) {
        if let (Some(n), Some(d)) = (self.get(num), self.get(den))
            && d > 0.0
        {
            self.value(key, n / d);
        }
    }

    fn print(&self, cfg: &Config) -> Result<(), Error> {
        println!("agentkeys delivery benchmark");
        println!(
            "  {} timed iterations after {} warm-up; times in microseconds\n",
            cfg.iters, cfg.warmup
        );
        println!(
            "  {:<52} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
            "measurement", "min", "p50", "p90", "p99", "max", "mean"
        );
        for (label, s) in &self.rows {
            println!(
                "  {:<52} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>8.1}",
                label, s.min, s.p50, s.p90, s.p99, s.max, s.mean
            );
        }
        let ratios: Vec<_> = self
            .metrics
            .iter()
            .filter(|(k, _)| k.contains("_over_"))
            .collect();
        if !ratios.is_empty() {
            println!();
            for (k, v) in ratios {
                println!("  {k:<52} {v:>8.2}x");
            }
        }
        if !self.notes.is_empty() {
            println!();
            for n in &self.notes {
                println!("  note: {n}");
            }
        }
        println!();
        self.print_json()
    }

    fn print_json(&self) -> Result<(), Error> {
        let mut json = serde_json::Map::new();
        for (k, v) in &self.metrics {
            // Whole numbers as integers, the rest to 0.01.
            let n = if v.fract() == 0.0 && v.abs() < 9.0e15 {
                serde_json::Number::from(*v as i64)
            } else {
                serde_json::Number::from_f64((v * 100.0).round() / 100.0)
                    .ok_or_else(|| format!("{k} is not a finite number"))?
            };
            json.insert(k.clone(), n.into());
        }
        println!("{}", serde_json::Value::Object(json));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Baselines: no daemon involved.

fn seqpacket_pair(nonblocking: bool) -> Result<(OwnedFd, OwnedFd), Error> {
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if nonblocking {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        flags,
    )?)
}

/// Echoes every packet until the peer closes.
fn echo_thread(fd: OwnedFd) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; MSG_LEN];
        while let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            if n == 0 || send(fd.as_raw_fd(), &buf[..n], MsgFlags::empty()).is_err() {
                break;
            }
        }
    })
}

fn bench_seqpacket(cfg: &Config, r: &mut Report) -> Result<(), Error> {
    let (a, b) = seqpacket_pair(false)?;
    let echo = echo_thread(b);
    let msg = [0x5au8; MSG_LEN];
    let mut buf = [0u8; MSG_LEN];
    r.timed(
        cfg,
        "seqpacket round trip, 64 B (blocking)",
        "baseline_seqpacket_rtt_us",
        Some("baseline_seqpacket_rtt_p99_us"),
        || {
            send(a.as_raw_fd(), &msg, MsgFlags::empty())?;
            let n = recv(a.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if n != MSG_LEN {
                return Err("short echo".into());
            }
            Ok(())
        },
    )?;
    drop(a);
    echo.join().map_err(|_| "echo thread panicked")?;
    Ok(())
}

/// The same round trip through the protocol's `Conn` on tokio, on both sides.
fn bench_conn(cfg: &Config, r: &mut Report) -> Result<(), Error> {
    let (a, b) = seqpacket_pair(true)?;
    let echo = std::thread::spawn(move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let mut conn = Conn::new(UnixSeqpacket::try_from(b).map_err(|e| e.to_string())?);
            while let Ok(p) = conn.recv().await {
                if conn.send(&p.data, &[]).await.is_err() {
                    break;
                }
            }
            Ok(())
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut conn = rt.block_on(async { UnixSeqpacket::try_from(a).map(Conn::new) })?;
    let msg = [0x5au8; MSG_LEN];
    r.timed(
        cfg,
        "Conn round trip, 64 B (tokio both sides)",
        "baseline_conn_rtt_us",
        None,
        || {
            rt.block_on(async {
                conn.send(&msg, &[]).await?;
                let p = conn.recv().await?;
                if p.data.len() != MSG_LEN {
                    return Err::<(), Error>("short echo".into());
                }
                Ok(())
            })
        },
    )?;
    drop(conn);
    drop(rt);
    echo.join().map_err(|_| "echo thread panicked")??;
    Ok(())
}

/// Receives one packet and the fd that came with it (blocking).
fn recv_with_fd(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<Option<OwnedFd>, Error> {
    // The hardening crate owns the one place that turns received fds into OwnedFd.
    let got = agentkeys_hardening::peer::recv_with_fds(sock, buf, 1)?;
    if got.len == 0 && got.fds.is_empty() {
        return Ok(None);
    }
    got.fds
        .into_iter()
        .next()
        .map(Some)
        .ok_or_else(|| "message without an fd".into())
}

/// Create page, write, send fd; peer maps, reads, unmaps, replies.
fn bench_memfd(cfg: &Config, r: &mut Report) -> Result<(), Error> {
    let policy = PagePolicy::RequireSecret;
    if let Err(e) = SecretPage::from_bytes(&[0u8; 1], policy) {
        return Err(format!(
            "memfd_secret is not usable here ({e}); the delivery baseline needs it"
        )
        .into());
    }
    let (a, b) = seqpacket_pair(false)?;
    let echo = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = [0u8; MSG_LEN];
        loop {
            let fd = match recv_with_fd(b.as_fd(), &mut buf) {
                Ok(Some(fd)) => fd,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let m = MappedSecret::map(fd).map_err(|e| e.to_string())?;
            let sum: u32 = m.iter().map(|&x| u32::from(x)).sum();
            black_box(sum);
            drop(m);
            send(b.as_raw_fd(), &buf, MsgFlags::empty()).map_err(|e| e.to_string())?;
        }
    });
    // Stand-in bytes (not a credential), different each run.
    let mut fill = [0u8; SECRET_LEN];
    for (i, x) in fill.iter_mut().enumerate() {
        *x = (std::process::id() as usize ^ i.wrapping_mul(131)) as u8;
    }
    let msg = [0x5au8; MSG_LEN];
    let mut buf = [0u8; MSG_LEN];
    r.timed(
        cfg,
        "memfd_secret delivery (create, send fd, map, read)",
        "baseline_memfd_delivery_us",
        Some("baseline_memfd_delivery_p99_us"),
        || {
            let page = SecretPage::from_bytes(&fill, policy)?;
            let fd = page.into_fd();
            let fds = [fd.as_raw_fd()];
            sendmsg::<()>(
                a.as_raw_fd(),
                &[IoSlice::new(&msg)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )?;
            drop(fd);
            recv(a.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            Ok(())
        },
    )?;
    drop(a);
    echo.join().map_err(|_| "echo thread panicked")??;
    Ok(())
}

/// One audit-sized append + fdatasync on the filesystem the audit log lives on.
fn bench_fdatasync(cfg: &Config, r: &mut Report) -> Result<(), Error> {
    let path = cfg
        .sync_dir
        .join(format!(".bench-fdatasync-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let line = {
        let mut l = vec![b'x'; 299];
        l.push(b'\n');
        l
    };
    let res = r.timed(
        cfg,
        "append 300 B + fdatasync (one audit record)",
        "baseline_fdatasync_us",
        Some("baseline_fdatasync_p99_us"),
        || {
            f.write_all(&line)?;
            f.sync_data()?;
            Ok(())
        },
    );
    drop(f);
    let _ = std::fs::remove_file(&path);
    res.map(drop)
}

// ---------------------------------------------------------------------------------------------
// Against the daemon.

fn token() -> Result<SecretString, Error> {
    if let Ok(t) = std::env::var("AGENTKEYS_TOKEN") {
        return Ok(SecretString::from(t));
    }
    let file = std::env::var("AGENTKEYS_TOKEN_FILE")
        .map_err(|_| "set AGENTKEYS_TOKEN or AGENTKEYS_TOKEN_FILE (an agent token)")?;
    Ok(SecretString::from(
        std::fs::read_to_string(file)?.trim().to_string(),
    ))
}

fn bench_daemon(cfg: &Config, r: &mut Report) -> Result<(), Error> {
    let socket = std::env::var_os("AGENTKEYS_SOCKET").ok_or("set AGENTKEYS_SOCKET")?;
    let token = token()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut client, info) = rt.block_on(Client::connect_with(socket.as_ref(), &token))?;
    drop(token);
    drop(info);

    r.timed(
        cfg,
        "daemon whoami round trip (no audit)",
        "daemon_whoami_rtt_us",
        None,
        || match rt.block_on(client.call(RequestBody::Whoami {}))?.body {
            ResponseBody::Whoami(_) => Ok(()),
            _ => Err("whoami: unexpected answer".into()),
        },
    )?;

    let mut degraded = false;
    let mut get = |service: &str| -> Result<(), Error> {
        let d = rt
            .block_on(client.get_credential(service, false))
            .map_err(|e| format!("get_credential({service:?}): {e}"))?;
        degraded |= d.degraded();
        let sum: u32 = d.bytes().iter().map(|&x| u32::from(x)).sum();
        black_box(sum);
        drop(d); // unmapped and closed
        Ok(())
    };
    let uncached = cfg.uncached.clone();
    let cached = cfg.cached.clone();
    r.timed(
        cfg,
        &format!("get_credential fd, uncached ({uncached})"),
        "get_fd_p50_us",
        Some("get_fd_p99_us"),
        || get(&uncached),
    )?;
    r.timed(
        cfg,
        &format!("get_credential fd, cached ({cached})"),
        "get_fd_cached_p50_us",
        Some("get_fd_cached_p99_us"),
        || get(&cached),
    )?;
    if degraded {
        r.note("the daemon delivered DEGRADED pages (sealed memfd, not memfd_secret)");
    }
    r.note(
        "every uncached delivery writes 3 audit records (fetch, deliver, drop), a cached one 2 \
         (cache_hit, deliver); the answer waits for one group-committed fdatasync covering the \
         request's records (compare with baseline_fdatasync_us); `drop` is synced after",
    );
    Ok(())
}

/// Remote agents (issue 17): an uncached `get_credential` (fd) through a remote daemon whose
/// service is read from the owner's daemon over loopback TLS (`kind = "agentkeys"`), against
/// the same uncached read from the owner's daemon directly. The two alternate, one of each per
/// iteration, so both see the same machine. `remote_read_over_local` is the p50 ratio.
fn bench_remote(
    cfg: &Config,
    remote_socket: &std::path::Path,
    r: &mut Report,
) -> Result<(), Error> {
    let socket = std::env::var_os("AGENTKEYS_SOCKET").ok_or("set AGENTKEYS_SOCKET")?;
    let token = token()?;
    let remote_token = SecretString::from(
        std::env::var("BENCH_REMOTE_TOKEN").map_err(|_| "set BENCH_REMOTE_TOKEN")?,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut local, _) = rt.block_on(Client::connect_with(socket.as_ref(), &token))?;
    let (mut remote, _) = rt.block_on(Client::connect_with(remote_socket, &remote_token))?;
    drop(token);
    drop(remote_token);
    let service = cfg.uncached.clone();
    let get = |c: &mut Client| -> Result<f64, Error> {
        let t = Instant::now();
        let d = rt
            .block_on(c.get_credential(&service, false))
            .map_err(|e| format!("get_credential({service:?}): {e}"))?;
        let sum: u32 = d.bytes().iter().map(|&x| u32::from(x)).sum();
        black_box(sum);
        drop(d);
        Ok(t.elapsed().as_secs_f64() * 1e6)
    };
    eprintln!(
        "  remote vs local uncached read: {} warm-up + {} timed each",
        cfg.warmup, cfg.iters
    );
    for _ in 0..cfg.warmup {
        get(&mut local)?;
        get(&mut remote)?;
    }
    let (mut l, mut m) = (Vec::new(), Vec::new());
    for _ in 0..cfg.iters {
        l.push(get(&mut local)?);
        m.push(get(&mut remote)?);
    }
    let (l, m) = (Stats::of(l), Stats::of(m));
    r.value("local_uncached_p50_us", l.p50);
    r.value("remote_uncached_p50_us", m.p50);
    r.value("remote_uncached_p99_us", m.p99);
    r.rows
        .push((format!("get_credential fd, uncached, local ({service})"), l));
    r.rows.push((
        format!("get_credential fd, uncached, through a remote daemon over TLS ({service})"),
        m,
    ));
    r.ratio(
        "remote_read_over_local",
        "remote_uncached_p50_us",
        "local_uncached_p50_us",
    );
    r.note(
        "remote: agent -> remote daemon (unix socket) -> owner's daemon (TLS 1.3 over loopback, \
         one long-lived link) -> back; both daemons write their audit records",
    );
    Ok(())
}

/// `clients` threads, each with its own connection and runtime, doing uncached `get_credential`
/// fd deliveries back to back for `tput_secs`: deliveries per second across all of them.
fn bench_throughput(cfg: &Config, r: &mut Report) -> Result<(), Error> {
    if cfg.clients == 0 {
        return Ok(());
    }
    let socket = std::env::var_os("AGENTKEYS_SOCKET").ok_or("set AGENTKEYS_SOCKET")?;
    eprintln!(
        "  throughput: {} clients x {:.0} s of uncached get_credential",
        cfg.clients, cfg.tput_secs
    );
    let go = std::sync::Arc::new(std::sync::Barrier::new(cfg.clients + 1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..cfg.clients {
        let (socket, go, stop) = (socket.clone(), go.clone(), stop.clone());
        let service = cfg.uncached.clone();
        let token = token()?;
        handles.push(std::thread::spawn(move || -> Result<Vec<f64>, String> {
            let run = || -> Result<Vec<f64>, Error> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let (mut client, _) = rt.block_on(Client::connect_with(socket.as_ref(), &token))?;
                drop(token);
                for _ in 0..20 {
                    drop(rt.block_on(client.get_credential(&service, false))?);
                }
                go.wait();
                let mut us = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let d = rt.block_on(client.get_credential(&service, false))?;
                    black_box(d.bytes().len());
                    drop(d);
                    us.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok(us)
            };
            run().map_err(|e| e.to_string())
        }));
    }
    go.wait();
    let t = Instant::now();
    std::thread::sleep(std::time::Duration::from_secs_f64(cfg.tput_secs));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| "a client thread panicked")??);
    }
    let secs = t.elapsed().as_secs_f64();
    let rate = all.len() as f64 / secs;
    r.value(
        &format!("deliveries_per_s_{}clients", cfg.clients),
        rate.round(),
    );
    let s = Stats::of(all);
    r.value("get_fd_p50_us_under_load", s.p50);
    r.value("get_fd_p99_us_under_load", s.p99);
    r.rows.push((
        format!(
            "get_credential fd, uncached, {} clients at once",
            cfg.clients
        ),
        s,
    ));
    r.note(format!(
        "{} clients: {rate:.0} uncached deliveries/s ({secs:.1} s)",
        cfg.clients
    ));
    Ok(())
}

/// VmRSS (KiB) of a process.
fn rss_kib(pid: u32) -> Result<f64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no VmRSS in /proc/PID/status".into())
}

/// Starts `agentkeysd --foreground` (state from the environment) `startup_runs` times: the time
/// from spawn until a `whoami` is answered on a fresh connection (`startup_ms`, median), and the
/// daemon's VmRSS right after that (`idle_rss_kib`, median); each daemon is stopped with SIGTERM.
fn bench_startup(cfg: &Config, bin: &std::path::Path, r: &mut Report) -> Result<(), Error> {
    let socket = std::env::var_os("AGENTKEYS_SOCKET").ok_or("set AGENTKEYS_SOCKET")?;
    let token = token()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut ms = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..cfg.startup_runs.max(1) {
        let t = Instant::now();
        let mut child = std::process::Command::new(bin)
            .arg("--foreground")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let answered = loop {
            if let Ok((mut c, _)) = rt.block_on(Client::connect_with(socket.as_ref(), &token))
                && let Ok(resp) = rt.block_on(c.call(RequestBody::Whoami {}))
                && matches!(resp.body, ResponseBody::Whoami(_))
            {
                break true;
            }
            if child.try_wait()?.is_some() || t.elapsed().as_secs() > 20 {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_micros(250));
        };
        let took = t.elapsed().as_secs_f64() * 1e3;
        let idle = rss_kib(child.id());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        child.wait()?;
        if !answered {
            return Err("agentkeysd did not answer (or exited) within 20 s".into());
        }
        ms.push(took);
        rss.push(idle?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    r.value("startup_ms", median(ms.clone()));
    r.value("idle_rss_kib", median(rss.clone()));
    r.note(format!(
        "startup (spawn until a whoami is answered): {:?} ms; VmRSS just after: {:?} KiB",
        ms.iter()
            .map(|m| (m * 10.0).round() / 10.0)
            .collect::<Vec<_>>(),
        rss
    ));
    Ok(())
}

/// Fetches `PREFIX-0 .. PREFIX-(n-1)` twice over one connection (the first pass fills the
/// cache, the second should be all cache hits; the caller counts them in the audit log).
fn fill_cache(prefix: &str, n: usize, r: &mut Report) -> Result<(), Error> {
    let socket = std::env::var_os("AGENTKEYS_SOCKET").ok_or("set AGENTKEYS_SOCKET")?;
    let token = token()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut client, _) = rt.block_on(Client::connect_with(socket.as_ref(), &token))?;
    for pass in ["fill_cache_ms", "cached_pass_ms"] {
        let t = Instant::now();
        for i in 0..n {
            let d = rt
                .block_on(client.get_credential(&format!("{prefix}-{i}"), false))
                .map_err(|e| format!("get_credential({prefix}-{i}): {e}"))?;
            black_box(d.bytes().len());
        }
        r.value(pass, t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let cfg = Config::parse()?;
    if let Some(bin) = &cfg.startup {
        let mut r = Report::default();
        bench_startup(&cfg, bin, &mut r)?;
        for n in &r.notes {
            println!("  note: {n}");
        }
        return r.print_json();
    }
    if let Some(sock) = &cfg.remote {
        let mut r = Report::default();
        bench_remote(&cfg, sock, &mut r)?;
        r.print(&cfg)?;
        return Ok(());
    }
    if let Some((prefix, n)) = &cfg.fill {
        let mut r = Report::default();
        fill_cache(prefix, *n, &mut r)?;
        return r.print_json();
    }
    let mut r = Report::default();
    eprintln!("baselines (no daemon):");
    bench_seqpacket(&cfg, &mut r)?;
    bench_conn(&cfg, &mut r)?;
    bench_memfd(&cfg, &mut r)?;
    bench_fdatasync(&cfg, &mut r)?;
    if cfg.baselines_only {
        r.note("--baselines-only: the daemon was not measured");
    } else {
        eprintln!("daemon:");
        bench_daemon(&cfg, &mut r)?;
        bench_throughput(&cfg, &mut r)?;
    }
    r.ratio(
        "get_fd_p50_over_baseline",
        "get_fd_p50_us",
        "baseline_memfd_delivery_us",
    );
    r.ratio(
        "get_fd_p99_over_baseline",
        "get_fd_p99_us",
        "baseline_memfd_delivery_us",
    );
    r.ratio(
        "get_fd_cached_p50_over_baseline",
        "get_fd_cached_p50_us",
        "baseline_memfd_delivery_us",
    );
    r.value("iterations", cfg.iters as f64);
    r.print(&cfg)
}
