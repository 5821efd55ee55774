//! OpenBao benchmark: a KV v2 read straight from OpenBao over HTTP next to the same read
//! through agentkeysd (uncached: the daemon reads OpenBao; cached: it copies its secret page),
//! measured in one process and one run. `bash bench/openbao.sh` sets everything up.
//!
//! ```text
//! BENCH_BAO_ADDR=http://127.0.0.1:PORT BENCH_BAO_TOKEN_FILE=F AGENTKEYS_SOCKET=... \
//! AGENTKEYS_TOKEN=akt_... target/release/examples/bench_openbao \
//!     [--iters N] [--warmup N] [--path secret/data/bench] [--field token] \
//!     [--uncached SERVICE] [--cached SERVICE]
//! ```
//!
//! - `bao_direct_http_us`: GET `/v1/<path>` with a kept-alive reqwest client (what a program
//!   talking to OpenBao itself pays per read, without TLS: the dev server is plain HTTP on
//!   loopback), the field extracted from the JSON.
//! - `bao_via_daemon_uncached_us`: `get_credential` fd delivery of a service mapped onto the
//!   same secret (the daemon's HTTP read, three audit records, a secret page), read, unmapped.
//! - `bao_via_daemon_cached_us`: the same for a service with a `cache_ttl`.
//!
//! The last line of stdout is one JSON object of numbers (p50 and p99 of each, in µs, and the
//! ratios of the daemon's figures to the direct read). No secret is printed: bytes are summed.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::time::Instant;

use agentkeys_proto::client::Client;
use secrecy::SecretString;

type Error = Box<dyn std::error::Error>;

struct Args {
    iters: usize,
    warmup: usize,
    path: String,
    field: String,
    uncached: String,
    cached: String,
}

fn args() -> Result<Args, Error> {
    let mut a = Args {
        iters: 1000,
        warmup: 100,
        path: "secret/data/bench".into(),
        field: "token".into(),
        uncached: "bao-uncached".into(),
        cached: "bao-cached".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--iters" => a.iters = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--path" => a.path = val()?,
            "--field" => a.field = val()?,
            "--uncached" => a.uncached = val()?,
            "--cached" => a.cached = val()?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    Ok(a)
}

fn env(name: &str) -> Result<String, Error> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}

/// Runs `f` `warmup` times untimed, then `iters` times timed; returns sorted µs samples.
fn measure(a: &Args, mut f: impl FnMut() -> Result<(), Error>) -> Result<Vec<f64>, Error> {
    for _ in 0..a.warmup {
        f()?;
    }
    let mut s = Vec::with_capacity(a.iters);
    for _ in 0..a.iters {
        let t = Instant::now();
        f()?;
        s.push(t.elapsed().as_secs_f64() * 1e6);
    }
    s.sort_by(f64::total_cmp);
    Ok(s)
}

/// Nearest-rank percentile of sorted samples.
fn pct(s: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn main() -> Result<(), Error> {
    let a = args()?;
    let addr = env("BENCH_BAO_ADDR")?;
    let bao_token = std::fs::read_to_string(env("BENCH_BAO_TOKEN_FILE")?)?
        .trim()
        .to_string();
    let socket = env("AGENTKEYS_SOCKET")?;
    let token = SecretString::from(env("AGENTKEYS_TOKEN")?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // Direct: what a program reading OpenBao itself pays (the daemon's TLS provider, ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("{}/v1/{}", addr.trim_end_matches('/'), a.path);
    let direct = measure(&a, || {
        rt.block_on(async {
            let resp = http
                .get(&url)
                .header("X-Vault-Token", &bao_token)
                .send()
                .await?
                .error_for_status()?;
            let body = resp.bytes().await?;
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let field = v["data"]["data"][&a.field]
                .as_str()
                .ok_or("the field is missing from the direct answer")?;
            black_box(field.bytes().map(u32::from).sum::<u32>());
            Ok::<(), Error>(())
        })
    })?;

    let (mut client, _) = rt.block_on(Client::connect_with(socket.as_ref(), &token))?;
    let mut get = |service: &str| -> Result<(), Error> {
        let d = rt
            .block_on(client.get_credential(service, false))
            .map_err(|e| format!("get_credential({service:?}): {e}"))?;
        black_box(d.bytes().iter().map(|&x| u32::from(x)).sum::<u32>());
        Ok(())
    };
    let uncached = measure(&a, || get(&a.uncached))?;
    let cached = measure(&a, || get(&a.cached))?;

    let rows = [
        (
            "bao_direct_http",
            &direct,
            "GET /v1/<path> straight to OpenBao (keep-alive)",
        ),
        (
            "bao_via_daemon_uncached",
            &uncached,
            "agentkeysd fd delivery, daemon reads OpenBao",
        ),
        (
            "bao_via_daemon_cached",
            &cached,
            "agentkeysd fd delivery from its cache",
        ),
    ];
    println!(
        "OpenBao reads, {} timed iterations each after {} warm-up (µs):",
        a.iters, a.warmup
    );
    println!("  {:<26} {:>9} {:>9}", "", "p50", "p99");
    let mut json = Vec::new();
    for (key, s, what) in rows {
        println!(
            "  {key:<26} {:>9.1} {:>9.1}   {what}",
            pct(s, 50.0),
            pct(s, 99.0)
        );
        json.push(format!("\"{key}_p50_us\":{:.1}", pct(s, 50.0)));
        json.push(format!("\"{key}_p99_us\":{:.1}", pct(s, 99.0)));
    }
    let d50 = pct(&direct, 50.0);
    let r_unc = pct(&uncached, 50.0) / d50;
    let r_c = pct(&cached, 50.0) / d50;
    println!("  daemon uncached / direct (p50): {r_unc:.2}");
    println!("  daemon cached   / direct (p50): {r_c:.2}");
    json.push(format!("\"uncached_over_direct\":{r_unc:.2}"));
    json.push(format!("\"cached_over_direct\":{r_c:.2}"));
    println!("{{{}}}", json.join(","));
    Ok(())
}
