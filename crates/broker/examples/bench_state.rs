//! State-side benchmarks for issue 9, without a daemon: the local vault at 100,000 entries, the
//! audit trail's group commit, and seeding a home with many cached services for the daemon's
//! memory figures. Run by `bench/run.sh`; each subcommand prints its readable lines to stdout
//! and, as its last line, one JSON object of numbers.
//!
//! ```text
//! bench_state vault --dir DIR [--entries 100000] [--lookups 2000]
//! bench_state audit --dir DIR [--secs 2] [--threads 8]
//! AGENTKEYS_HOME=... bench_state seed --count 10000 --prefix c [--cache-ttl 600]
//! ```
//!
//! - `vault`: a fresh home in DIR, `entries` random 40-byte secrets stored with one write
//!   ([`put_secrets`]), then `VaultIndex::read` (parse only: decrypts nothing) and `lookups`
//!   timed lookups of random services: `meta` + `open_entry` (one entry decrypted).
//!   `vault_lookup_us_100k` is their p50.
//! - `audit`: a fresh home in DIR (put it on the disk the real audit log lives on), the daemon's
//!   [`Auditor`], `threads` threads each appending `deliver` records and waiting for each to be
//!   durable, for `secs` seconds; then the same with one thread (one sync per record).
//! - `seed`: `count` services `PREFIX-N` with 40-byte random secrets and the given `cache_ttl`
//!   into `$AGENTKEYS_HOME` (initialized), one write.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentkeys_broker::auditor::{Auditor, Need};
use agentkeys_state::audit::{AuditLog, Event, Peer};
use agentkeys_state::crypto::Dek;
use agentkeys_state::home::Home;
use agentkeys_state::vault::{Policy, VaultIndex, put_secrets};
use agentkeys_state::{init, open_owner};
use zeroize::Zeroizing;

type Error = Box<dyn std::error::Error>;

const SECRET_LEN: usize = 40;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let cmd = args
        .next()
        .ok_or("usage: bench_state vault|audit|seed [options]")?;
    let mut opts = std::collections::HashMap::new();
    while let Some(k) = args.next() {
        let v = args.next().ok_or_else(|| format!("{k} needs a value"))?;
        opts.insert(k, v);
    }
    let num = |k: &str, d: u64| -> Result<u64, Error> {
        opts.get(k).map_or(Ok(d), |v| {
            v.parse().map_err(|_| format!("{k} {v:?}").into())
        })
    };
    let dir = || -> PathBuf {
        opts.get("--dir")
            .map_or_else(std::env::temp_dir, PathBuf::from)
    };
    match cmd.as_str() {
        "vault" => vault(&dir(), num("--entries", 100_000)?, num("--lookups", 2000)?),
        "audit" => audit(&dir(), num("--secs", 2)?, num("--threads", 8)?),
        "seed" => seed(
            num("--count", 10_000)?,
            opts.get("--prefix").map_or("c", String::as_str),
            num("--cache-ttl", 600)?,
        ),
        other => Err(format!("unknown subcommand {other:?}").into()),
    }
}

/// A fresh 0700 directory under `dir`, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: &Path, tag: &str) -> Result<Scratch, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let p = dir.join(format!("agentkeys-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::DirBuilder::new().mode(0o700).create(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` random secrets of [`SECRET_LEN`] bytes, in one wiped buffer.
fn random_secrets(n: usize) -> Result<Zeroizing<Vec<u8>>, Error> {
    let mut buf = Zeroizing::new(vec![0u8; n * SECRET_LEN]);
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    // Printable, like real tokens (and never a NUL, which env delivery refuses).
    for b in buf.iter_mut() {
        *b = b'A' + (*b % 26);
    }
    Ok(buf)
}

/// Stores `names[i]` = the i-th `SECRET_LEN` bytes of `secrets`, all with `policy`, in one write.
fn store(
    home: &Home,
    dek: &Dek,
    names: &[String],
    secrets: &[u8],
    policy: Policy,
) -> Result<(), Error> {
    put_secrets(
        home,
        dek,
        names
            .iter()
            .zip(secrets.chunks_exact(SECRET_LEN))
            .map(|(s, v)| (s.as_str(), v, policy.clone())),
    )?;
    Ok(())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    sorted[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1]
}

fn vault(dir: &Path, entries: u64, lookups: u64) -> Result<(), Error> {
    let scratch = Scratch::new(dir, "vault")?;
    let home = Home::at(&scratch.0);
    init(&home, false)?;
    let (_, dek) = open_owner(&home)?;
    let n = entries as usize;
    let names: Vec<String> = (0..n).map(|i| format!("svc-{i}")).collect();
    let secrets = random_secrets(n)?;
    let t = Instant::now();
    store(&home, &dek, &names, &secrets, Policy::default())?;
    let write_ms = t.elapsed().as_secs_f64() * 1e3;
    let size = std::fs::metadata(home.path("vault.enc"))?.len();
    let t = Instant::now();
    let index = VaultIndex::read(&home)?;
    let read_ms = t.elapsed().as_secs_f64() * 1e3;
    if index.len() != n {
        return Err(format!("the vault has {} entries, not {n}", index.len()).into());
    }
    let mut pick = random_secrets(lookups as usize)?;
    let mut us = Vec::with_capacity(lookups as usize);
    for i in 0..lookups as usize {
        let chunk = &pick[i * SECRET_LEN..i * SECRET_LEN + 8];
        let r = u64::from_le_bytes(chunk.try_into().expect("8 bytes")) as usize % n;
        let name = &names[r];
        let t = Instant::now();
        let meta = index.meta(name).ok_or("lookup: missing entry")?;
        let plain = index
            .open_entry(dek.expose(), &meta.service)?
            .ok_or("open_entry: missing entry")?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        if plain[..] != secrets[r * SECRET_LEN..(r + 1) * SECRET_LEN] {
            return Err("open_entry returned another secret".into());
        }
    }
    pick.iter_mut().for_each(|b| *b = 0);
    us.sort_by(f64::total_cmp);
    let (p50, p99) = (pct(&us, 50.0), pct(&us, 99.0));
    println!(
        "local vault with {n} entries ({:.1} MiB vault.enc)",
        size as f64 / 1048576.0
    );
    println!("  store all (one write)                       {write_ms:>10.1} ms");
    println!("  VaultIndex::read (parse, no decrypt)        {read_ms:>10.1} ms");
    println!(
        "  lookup + open_entry, p50 / p99              {p50:>10.1} / {p99:.1} us ({lookups} lookups)"
    );
    println!(
        "{{\"vault_lookup_us_100k\":{p50:.2},\"vault_lookup_p99_us_100k\":{p99:.2},\"vault_read_ms_100k\":{read_ms:.1},\"vault_entries\":{n}}}"
    );
    Ok(())
}

fn audit(dir: &Path, secs: u64, threads: u64) -> Result<(), Error> {
    let run = |threads: u64| -> Result<f64, Error> {
        let scratch = Scratch::new(dir, &format!("audit{threads}"))?;
        let home = Home::at(&scratch.0);
        let a = Auditor::new(AuditLog::open(&home)?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let hs: Vec<_> = (0..threads)
            .map(|n| {
                let (a, stop, count) = (a.clone(), stop.clone(), count.clone());
                std::thread::spawn(move || -> Result<(), String> {
                    let svc = format!("svc-{n}");
                    while !stop.load(Ordering::Relaxed) {
                        a.append(
                            &Event {
                                event: "deliver",
                                who: Some(agentkeys_state::audit::Who::Agent {
                                    name: "bench",
                                    session: "s-000000000000",
                                }),
                                service: Some(&svc),
                                delivery: Some("fd"),
                                degraded: false,
                                peer: Some(Peer::local(1000, 4242)),
                                outcome: "ok",
                                detail: None,
                            },
                            Need::Durable,
                        )
                        .map_err(|e| e.to_string())?;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.join().map_err(|_| "an audit thread panicked")??;
        }
        let rate = count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
        a.stop();
        let report = agentkeys_state::audit::verify(&home.path("audit.jsonl"))?;
        if report.first_bad.is_some() || report.records != count.load(Ordering::Relaxed) {
            return Err("the benchmark's audit log does not verify".into());
        }
        Ok(rate)
    };
    let many = run(threads)?;
    let one = run(1)?;
    println!("audit trail, durable appends (each waits for its fdatasync), {secs} s each:");
    println!("  {threads} threads (group commit)                   {many:>10.0} records/s");
    println!("  1 thread (one sync per record)              {one:>10.0} records/s");
    println!(
        "{{\"audit_records_per_s\":{many:.0},\"audit_records_per_s_1thread\":{one:.0},\"audit_threads\":{threads}}}"
    );
    Ok(())
}

fn seed(count: u64, prefix: &str, cache_ttl: u64) -> Result<(), Error> {
    let home = Home::at(std::env::var_os("AGENTKEYS_HOME").ok_or("set AGENTKEYS_HOME")?);
    let (_, dek) = open_owner(&home)?;
    let n = count as usize;
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let secrets = random_secrets(n)?;
    let policy = Policy {
        cache_ttl_secs: cache_ttl,
        ..Policy::default()
    };
    store(&home, &dek, &names, &secrets, policy)?;
    eprintln!(
        "bench_state: stored {n} services {prefix}-0..{prefix}-{}",
        n - 1
    );
    Ok(())
}
