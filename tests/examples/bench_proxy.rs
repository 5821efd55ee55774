//! The credential-injecting proxy's figures (`bash bench/run.sh` runs this): the same client and
//! the same local HTTPS server (`agentkeys_e2e::https`), direct and through the proxy with the
//! value injected into every request.
//!
//! `bench_proxy BIN_DIR` sets up a throwaway home (its proxy trusting the server's test CA, a
//! service injected into the server), starts `agentkeysd`, and runs itself under
//! `agentkeys run --proxy GH=svc` as the client (`bench_proxy --client`), which measures:
//!
//! - keep-alive GETs, one client, a direct GET and a proxied one in turn: p50 each way
//!   (`proxy_p50_over_direct`);
//! - 8 clients for a few seconds each way: requests per second (`proxy_rps_8clients`);
//! - a new connection: TCP, (CONNECT,) TLS handshake, p50 each way (`proxy_handshake_over_direct`),
//!   and the same plus its first GET (`proxy_first_request_over_direct`, where the proxy also
//!   opens its upstream connection and asks the daemon).
//!
//! The last stdout line is a JSON object of numbers.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const VALUE: &str = "ghp_BenchProxyValue0123456789abcdef";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        client(&args[2], &args[3]);
        return;
    }
    let bin = std::path::PathBuf::from(args.get(1).expect("usage: bench_proxy BIN_DIR"));
    orchestrate(&bin);
}

fn orchestrate(bin: &std::path::Path) {
    use std::process::{Command, Stdio};
    let srv = agentkeys_e2e::https::HttpsServer::start();
    let dir = std::env::temp_dir().join(format!("ak-bench-proxy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let home = dir.join("home");
    let sock = dir.join("run/agentkeysd.sock");
    let ca = dir.join("test-ca.pem");
    std::fs::write(&ca, &srv.ca_pem).unwrap();
    let ak = |args: &[&str], input: Option<&[u8]>| {
        let mut c = Command::new(bin.join("agentkeys"));
        c.args(args)
            .env("AGENTKEYS_HOME", &home)
            .env("AGENTKEYS_SOCKET", &sock)
            .env_remove("AGENTKEYS_TOKEN")
            .env_remove("AGENTKEYS_TOKEN_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut ch = c.spawn().unwrap();
        if let Some(i) = input {
            std::io::Write::write_all(ch.stdin.as_mut().unwrap(), i).unwrap();
        }
        drop(ch.stdin.take());
        let o = ch.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "agentkeys {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    ak(&["init"], None);
    std::fs::write(
        home.join("config.toml"),
        format!("[proxy]\nupstream_ca_file = \"{}\"\n", ca.display()),
    )
    .unwrap();
    let host = format!("127.0.0.1:{}", srv.port());
    // `BENCH_PROXY_CACHE_TTL` (default 10m): how long the proxy may keep the value after the
    // daemon handed it over; 0s makes every request fetch a fresh secret page.
    let ttl = std::env::var("BENCH_PROXY_CACHE_TTL").unwrap_or_else(|_| "10m".into());
    ak(
        &[
            "store",
            "svc",
            "--inject-host",
            &host,
            "--deliver",
            "proxy",
            "--cache-ttl",
            &ttl,
        ],
        Some(VALUE.as_bytes()),
    );
    let mut daemon = Command::new(bin.join("agentkeysd"))
        .arg("--foreground")
        .env("AGENTKEYS_HOME", &home)
        .env("AGENTKEYS_SOCKET", &sock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agentkeysd.log")).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let token = ak(&["agent", "add", "benchproxy", "--scope", "svc"], None);
    let token = token.lines().last().unwrap().trim().to_string();
    let me = std::env::current_exe().unwrap();
    let out = Command::new(bin.join("agentkeys"))
        .args(["run", "--no-masking", "--proxy", "GH=svc", "--"])
        .arg(&me)
        .args(["--client", &srv.port().to_string(), ca.to_str().unwrap()])
        .env("AGENTKEYS_HOME", &home)
        .env("AGENTKEYS_SOCKET", &sock)
        .env("AGENTKEYS_TOKEN", &token)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    let _ = Command::new(bin.join("agentkeys"))
        .args(["daemon", "stop"])
        .env("AGENTKEYS_HOME", &home)
        .env("AGENTKEYS_SOCKET", &sock)
        .output();
    let _ = daemon.wait();
    // Every injected request reached the server with the value.
    let got = srv.requests();
    let with_value = got
        .iter()
        .filter(|r| r.header("authorization") == Some(format!("Bearer {VALUE}").as_bytes()))
        .count();
    eprintln!("bench_proxy: the server saw the value in {with_value} requests");
    // BENCH_KEEP=1 (as for bench/run.sh): keep the directory (the daemon's log, the audit log).
    if std::env::var_os("BENCH_KEEP").is_some() {
        eprintln!("bench_proxy: kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(out.success(), "the client failed");
}

type Sender = SendRequest<Empty<Bytes>>;

struct Cfg {
    port: u16,
    direct_tls: Arc<rustls::ClientConfig>,
    proxy_tls: Arc<rustls::ClientConfig>,
    proxy_addr: String,
    proxy_auth: String,
    auth: String,
}

fn tls_config(pem: &[u8]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
        let _ = roots.add(c.unwrap());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

async fn connect(cfg: &Cfg, via_proxy: bool) -> Sender {
    let tcp = if via_proxy {
        let mut tcp = TcpStream::connect(&cfg.proxy_addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let target = format!("127.0.0.1:{}", cfg.port);
        tcp.write_all(
            format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {}\r\n\r\n",
                cfg.proxy_auth
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut r = BufReader::new(tcp);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.contains(" 200"), "CONNECT: {line}");
        loop {
            let mut l = String::new();
            r.read_line(&mut l).await.unwrap();
            if l == "\r\n" || l.is_empty() {
                break;
            }
        }
        r.into_inner()
    } else {
        let tcp = TcpStream::connect(("127.0.0.1", cfg.port)).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp
    };
    let tls_cfg = if via_proxy {
        &cfg.proxy_tls
    } else {
        &cfg.direct_tls
    };
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = tokio_rustls::TlsConnector::from(tls_cfg.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(cfg: &Cfg, s: &mut Sender) {
    let req = hyper::Request::get("/bench")
        .header("host", format!("127.0.0.1:{}", cfg.port))
        .header("authorization", &cfg.auth)
        .body(Empty::new())
        .unwrap();
    s.ready().await.unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
}

fn p50(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Keep-alive GET p50, direct and through the proxy: two connections, timed in turn (a direct
/// GET, then a proxied one, `n` times), so that both see the same moments of the machine. Timing
/// one side in a block and then the other let a noisy neighbour's minute land on one side only:
/// on the 2-vCPU guest the ratio swung from 1.2 to 1.7 between runs minutes apart.
async fn latency(cfg: &Cfg, n: usize) -> (u64, u64) {
    let mut d = connect(cfg, false).await;
    let mut p = connect(cfg, true).await;
    for _ in 0..n / 10 {
        get(cfg, &mut d).await;
        get(cfg, &mut p).await;
    }
    let (mut vd, mut vp) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        get(cfg, &mut d).await;
        vd.push(t.elapsed().as_micros() as u64);
        let t = Instant::now();
        get(cfg, &mut p).await;
        vp.push(t.elapsed().as_micros() as u64);
    }
    (p50(vd), p50(vp))
}

async fn throughput(cfg: Arc<Cfg>, via: bool, clients: usize, secs: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (cfg, stop, count) = (cfg.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = connect(&cfg, via).await;
            while !stop.load(Ordering::Relaxed) {
                get(&cfg, &mut s).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

async fn handshakes(cfg: &Cfg, via: bool, n: usize, with_get: bool) -> u64 {
    let mut v = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let t = Instant::now();
        let mut s = connect(cfg, via).await;
        if with_get {
            get(cfg, &mut s).await;
        }
        let us = t.elapsed().as_micros() as u64;
        if i >= 5 {
            v.push(us);
        }
    }
    p50(v)
}

fn client(port: &str, ca: &str) {
    use base64::Engine;
    let port: u16 = port.parse().unwrap();
    let url = std::env::var("HTTPS_PROXY").expect("HTTPS_PROXY");
    let rest = url.strip_prefix("http://").unwrap();
    let (cred, addr) = rest.rsplit_once('@').unwrap();
    let bundle = std::fs::read(std::env::var("SSL_CERT_FILE").unwrap()).unwrap();
    let cfg = Arc::new(Cfg {
        port,
        direct_tls: tls_config(&std::fs::read(ca).unwrap()),
        proxy_tls: tls_config(&bundle),
        proxy_addr: addr.to_string(),
        proxy_auth: base64::engine::general_purpose::STANDARD.encode(cred),
        // BENCH_PROXY_NO_INJECT=1: no placeholder (the proxy passes the request on without
        // asking the daemon): what decrypting and forwarding alone cost.
        auth: if std::env::var_os("BENCH_PROXY_NO_INJECT").is_some() {
            "Bearer not-a-placeholder".into()
        } else {
            format!("Bearer {}", std::env::var("GH").unwrap())
        },
    });
    let n: usize = std::env::var("BENCH_PROXY_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let secs: u64 = std::env::var("BENCH_TPUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (direct, proxied) = latency(&cfg, n).await;
        let rps_direct = throughput(cfg.clone(), false, 8, secs).await;
        let rps_proxy = throughput(cfg.clone(), true, 8, secs).await;
        let hs_direct = handshakes(&cfg, false, 200, false).await;
        let hs_proxy = handshakes(&cfg, true, 200, false).await;
        let first_direct = handshakes(&cfg, false, 200, true).await;
        let first_proxy = handshakes(&cfg, true, 200, true).await;
        let r = |a: f64, b: f64| (a / b * 100.0).round() / 100.0;
        println!("credential-injecting proxy (same client and local HTTPS server; value injected into every proxied request):");
        println!("  minimal client (hyper + rustls, Rust):");
        println!("  keep-alive GET p50          direct {direct} us, proxy {proxied} us, ratio {}", r(proxied as f64, direct as f64));
        println!("  8 clients                   direct {rps_direct:.0} req/s, proxy {rps_proxy:.0} req/s, ratio {}", r(rps_proxy, rps_direct));
        println!("  new connection handshake    direct {hs_direct} us, proxy {hs_proxy} us, ratio {}", r(hs_proxy as f64, hs_direct as f64));
        println!("  new connection + first GET  direct {first_direct} us, proxy {first_proxy} us, ratio {}", r(first_proxy as f64, first_direct as f64));
        let py = python_client(port, ca, n, secs);
        println!(
            "{{{py}\"proxy_get_p50_us_hyper\":{proxied},\"direct_get_p50_us_hyper\":{direct},\"proxy_p50_over_direct_hyper\":{},\"proxy_rps_8clients_hyper\":{rps_proxy:.0},\"direct_rps_8clients_hyper\":{rps_direct:.0},\"proxy_rps_8clients_over_direct_hyper\":{},\"proxy_handshake_p50_us_hyper\":{hs_proxy},\"direct_handshake_p50_us_hyper\":{hs_direct},\"proxy_handshake_over_direct_hyper\":{},\"proxy_first_request_p50_us_hyper\":{first_proxy},\"direct_first_request_p50_us_hyper\":{first_direct},\"proxy_first_request_over_direct_hyper\":{}}}",
            r(proxied as f64, direct as f64),
            r(rps_proxy, rps_direct),
            r(hs_proxy as f64, hs_direct as f64),
            r(first_proxy as f64, first_direct as f64),
        );
    });
}

/// The same three measurements with Python's `requests` (a `Session`, keep-alive), the client
/// most agent tools are: `$BENCH_PROXY_PYTHON`, else `.venv-proxy`. Returns the JSON members
/// (with a trailing comma) or nothing when no such Python exists.
fn python_client(port: u16, ca: &str, n: usize, secs: u64) -> String {
    let cands: Vec<std::path::PathBuf> = std::env::var_os("BENCH_PROXY_PYTHON")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain([std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-proxy/bin/python")])
        .collect();
    let Some(py) = cands.into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import requests"])
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        eprintln!(
            "bench_proxy: no Python with requests (BENCH_PROXY_PYTHON or .venv-proxy): requests figures skipped"
        );
        return String::new();
    };
    let out = std::process::Command::new(py)
        .args([
            "-c",
            PY_BENCH,
            &port.to_string(),
            ca,
            &n.min(2000).to_string(),
            &secs.to_string(),
        ])
        .output()
        .expect("python");
    if !out.status.success() {
        eprintln!(
            "bench_proxy: the requests client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::new();
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = text.lines().collect();
    let json = lines.pop().unwrap_or("{}");
    for l in lines {
        println!("{l}");
    }
    let inner = json.trim().trim_start_matches('{').trim_end_matches('}');
    if inner.is_empty() {
        String::new()
    } else {
        format!("{inner},")
    }
}

const PY_BENCH: &str = r#"
import json, multiprocessing as mp, os, statistics, sys, time
import requests
port, ca, n, secs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
url = f"https://127.0.0.1:{port}/bench"
auth = {"Authorization": "Bearer " + os.environ["GH"]}
def session(via):
    s = requests.Session()
    s.trust_env = False
    if via:
        s.proxies = {"https": os.environ["HTTPS_PROXY"]}
        s.verify = os.environ["SSL_CERT_FILE"]
    else:
        s.verify = fair_ca
    return s
# The direct client verifies against a bundle of the same size as the proxied one (the system
# roots plus the test CA): loading a bundle is part of every new connection in requests.
import tempfile
fair_ca = os.path.join(tempfile.mkdtemp(), "direct-bundle.pem")
try:
    with open(fair_ca, "w") as f:
        f.write(open(os.environ["SSL_CERT_FILE"]).read() + "\n" + open(ca).read())
except OSError:
    fair_ca = ca
def lat(n):
    # Timed in turn, a direct GET then a proxied one, so both see the same moments of the machine.
    sd, sp = session(False), session(True)
    for _ in range(n // 10):
        sd.get(url, headers=auth); sp.get(url, headers=auth)
    vd, vp = [], []
    for _ in range(n):
        t = time.perf_counter(); sd.get(url, headers=auth); vd.append(time.perf_counter() - t)
        t = time.perf_counter(); sp.get(url, headers=auth); vp.append(time.perf_counter() - t)
    return statistics.median(vd) * 1e6, statistics.median(vp) * 1e6
def worker(via, q):
    s = session(via); c = 0; end = time.time() + secs
    while time.time() < end:
        s.get(url, headers=auth); c += 1
    q.put(c)
def tput(via):
    q = mp.Queue(); ps = [mp.Process(target=worker, args=(via, q)) for _ in range(8)]
    for p in ps: p.start()
    total = sum(q.get() for _ in ps)
    for p in ps: p.join()
    return total / secs
def hs(via, n):
    v = []
    for _ in range(n):
        s = session(via); t = time.perf_counter(); s.get(url, headers=auth); v.append(time.perf_counter() - t); s.close()
    return statistics.median(v) * 1e6
d, p = lat(n)
rd, rp = tput(False), tput(True)
hd, hp = hs(False, 100), hs(True, 100)
r = lambda a, b: round(a / b, 2)
print(f"  requests keep-alive GET p50 direct {d:.0f} us, proxy {p:.0f} us, ratio {r(p, d)}")
print(f"  requests 8 clients          direct {rd:.0f} req/s, proxy {rp:.0f} req/s, ratio {r(rp, rd)}")
print(f"  requests new connection     direct {hd:.0f} us, proxy {hp:.0f} us, ratio {r(hp, hd)} (handshake and first GET)")
print(json.dumps({"proxy_get_p50_us": round(p), "direct_get_p50_us": round(d), "proxy_p50_over_direct": r(p, d),
  "proxy_rps_8clients": round(rp), "direct_rps_8clients": round(rd), "proxy_rps_8clients_over_direct": r(rp, rd),
  "proxy_handshake_p50_us": round(hp), "direct_handshake_p50_us": round(hd), "proxy_handshake_over_direct": r(hp, hd)},
  separators=(",", ":")))
"#;
