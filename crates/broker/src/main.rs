//! `agentkeysd`: parses arguments, then starts in DESIGN.md's order: fds, (detach), process
//! lock-down, state and socket while the sandbox is still open, sandbox, runtime, serve.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentkeys_broker::backends::Backends;
use agentkeys_broker::config::Config;
use agentkeys_broker::connection::daemon_report;
use agentkeys_broker::keys::KeyPage;
use agentkeys_broker::server;
use agentkeys_broker::sessions::Sessions;
use agentkeys_broker::shared::{ConnTable, Shared};
use agentkeys_broker::startup::{self, StartupOptions};
use agentkeys_hardening::alloc::WipingAllocator;
use agentkeys_hardening::page::PagePolicy;
use agentkeys_hardening::process::{self, Detached};
use agentkeys_hardening::selftest::{Report, Role};
use agentkeys_state::audit::AuditLog;
use agentkeys_state::home::Home;
use agentkeys_state::identity::load_identity;
use agentkeys_state::keystore;
use agentkeys_state::vault::VaultIndex;
use clap::Parser;
use tracing::{error, info, warn};

#[global_allocator]
static ALLOC: WipingAllocator = WipingAllocator;

/// agentkeysd: the sandboxed agentkeys credential broker.
#[derive(Debug, Parser)]
#[command(name = "agentkeysd", version, about, max_term_width = 100)]
struct Args {
    /// Stay in the foreground and log to stderr (for systemd and debugging). Without it the
    /// daemon detaches and logs to $AGENTKEYS_HOME/agentkeysd.log.
    #[arg(long)]
    foreground: bool,
    /// Start even when a debugger is attached (prints a warning; the debugger sees secrets).
    #[arg(long)]
    allow_debugger: bool,
    /// Refuse to start when kernel.yama.ptrace_scope is 0 or the kernel has no Yama.
    #[arg(long)]
    require_ptrace_scope: bool,
    /// Wipe a cached secret after this long without use (default 60s; overrides config).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_ttl: Option<Duration>,
    /// Config file (default: $AGENTKEYS_HOME/config.toml, optional).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run the full start-up hardening, print the self-test report, and exit: 0 when every
    /// required protection is in place (optional machine features, such as memory protection
    /// keys, may be missing; config.toml's require_* keys make them required). Needs no
    /// initialized state.
    #[arg(long)]
    self_test: bool,
    /// With --self-test: print JSON.
    #[arg(long, requires = "self_test")]
    json: bool,
}

/// Exit codes (sysexits): configuration or environment refused, software failure.
const EX_CONFIG: u8 = 78;
const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    // Before anything reads the environment or allocates a key (see the switch's docs).
    agentkeys_hardening::pkey::init_from_env();
    let args = Args::parse();
    let opts = StartupOptions {
        allow_debugger: args.allow_debugger,
        require_ptrace_scope: args.require_ptrace_scope,
        keep_fds: Vec::new(),
    };
    if args.self_test {
        return self_test(&args, opts);
    }
    match run(args, opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            // Before the subscriber exists (or in the parent) plain stderr is all there is.
            eprintln!("agentkeysd: refusing to start: {msg}");
            error!("refusing to start: {msg}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

/// `--self-test`: the start-up hardening, then the report. The configuration (when there is
/// one) says which machine features are required.
fn self_test(args: &Args, opts: StartupOptions) -> ExitCode {
    let cfg = match self_test_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentkeysd: refusing to start: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let opts = StartupOptions {
        require_ptrace_scope: opts.require_ptrace_scope || cfg.daemon.require_ptrace_scope,
        ..opts
    };
    let hardened = match startup::harden(&opts) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("agentkeysd: refusing to start: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    for w in &hardened.warnings {
        eprintln!("agentkeysd: WARNING: {w}");
    }
    let mut reqs = cfg.daemon.requirements();
    reqs.ptrace_scope = opts.require_ptrace_scope;
    let report = Report::for_current_process_with("agentkeysd", Role::Daemon, reqs);
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("agentkeysd: error: encoding report: {e}");
                return ExitCode::from(EX_SOFTWARE);
            }
        }
    } else {
        print!("{}", report.to_table());
    }
    let failures = report.failures();
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        let names: Vec<&str> = failures.iter().map(|i| i.name.as_str()).collect();
        eprintln!(
            "agentkeysd: self-test failed: required but not in place: {}",
            names.join(", ")
        );
        ExitCode::FAILURE
    }
}

/// The configuration `--self-test` checks against: `--config`, else `config.toml` in the home
/// when there is one, else the defaults.
fn self_test_config(args: &Args) -> Result<Config, String> {
    let path = match (&args.config, Home::resolve()) {
        (Some(p), _) => p.clone(),
        (None, Ok(home)) => home.path("config.toml"),
        (None, Err(_)) => return Ok(Config::default()),
    };
    Config::load(&path, args.config.is_some()).map_err(|e| e.to_string())
}

fn init_logging() {
    let filter = std::env::var("AGENTKEYS_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // A log that cannot be written (disk full, a file size limit) must not stop the daemon:
        // reporting that failure uses `eprintln!`, which panics when stderr cannot be written
        // either, and a panic aborts the release build (tests/faults.rs).
        .log_internal_errors(false)
        .with_ansi(false)
        .try_init();
}

fn run(args: Args, opts: StartupOptions) -> Result<(), String> {
    startup::early(&opts).map_err(|e| e.to_string())?;
    let home = Home::resolve().map_err(|e| e.to_string())?;
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| home.path("config.toml"));
    let mut cfg = Config::load(&config_path, args.config.is_some()).map_err(|e| e.to_string())?;
    if let Some(ttl) = args.idle_ttl {
        cfg.daemon.idle_ttl = ttl;
    }
    let opts = StartupOptions {
        require_ptrace_scope: opts.require_ptrace_scope || cfg.daemon.require_ptrace_scope,
        ..opts
    };
    let identity = load_identity(&home).map_err(|e| e.to_string())?;
    let socket_path = agentkeys_proto::paths::socket_path(home.root());

    // Detach before any thread exists; the parent reports and exits once we serve.
    let ready = if args.foreground {
        None
    } else {
        let log_path = home.path("agentkeysd.log");
        let log = open_log(&log_path)?;
        match process::detach(log.into()).map_err(|e| e.to_string())? {
            Detached::Parent { child, ready } => {
                if ready.wait() {
                    println!("agentkeysd started (pid {child})");
                    println!("  socket: {}", socket_path.display());
                    println!("  log:    {}", log_path.display());
                    return Ok(());
                }
                return Err(format!(
                    "agentkeysd did not start; see {}",
                    log_path.display()
                ));
            }
            Detached::Child { ready } => Some(ready),
        }
    };
    init_logging();

    let hardened = startup::lock_down(&opts).map_err(|e| e.to_string())?;
    for w in &hardened.warnings {
        warn!("{w}");
        if args.foreground {
            eprintln!("agentkeysd: WARNING: {w}");
        }
    }

    if cfg.daemon.require_pkeys
        && let Err(e) = agentkeys_hardening::pkey::supported()
    {
        return Err(format!(
            "require_pkeys = true in config.toml, but {e}; remove the key to run without them \
             (the DEK and cached secrets are then plain secret pages)"
        ));
    }

    // The launcher, before anything secret is loaded (it inherits no key page or state fd) and
    // before the sandbox (its children must not inherit the daemon's seccomp filter).
    // Runs of jailed sessions are confined by their jail's policy (crate agentkeys-jail).
    agentkeys_hardening::launcher::set_confine_hook(agentkeys_jail::confine_launch);
    let launcher = agentkeys_hardening::launcher::spawn().map_err(|e| e.to_string())?;
    info!(pid = launcher.pid, "launcher started");
    // The credential-injecting proxy, a process of its own with its own seccomp filter; forked
    // now for the same reasons (no secret or state fd exists yet; the daemon's filter has no
    // fork). It waits for its CA, which needs the DEK (below).
    let proxy_helper = if cfg.proxy.enabled {
        let setup = agentkeys_broker::proxy::setup(&cfg.proxy, home.root())?;
        let h = agentkeys_hardening::helper::spawn("agentkeys-proxy", move |sock| {
            agentkeys_proxy::child_main(sock, setup)
        })
        .map_err(|e| e.to_string())?;
        info!(pid = h.pid, "proxy process started");
        Some(h)
    } else {
        None
    };

    // State, while files and the keystore are still reachable.
    let dek = keystore::load_dek(&home, &identity.keystore).map_err(|e| e.to_string())?;
    let policy = if cfg.daemon.require_secretmem {
        PagePolicy::RequireSecret
    } else {
        PagePolicy::PreferSecret
    };
    let key = KeyPage::new(&dek, policy).map_err(|e| format!("holding the DEK: {e}"))?;
    drop(dek);
    if key.describe().0.is_degraded() {
        warn!("memfd_secret is unavailable: secret pages use the DEGRADED sealed-memfd fallback");
    }
    let keystore_detail = keystore::describe(&home, &identity.keystore);
    key.with_key(|k| VaultIndex::read(&home)?.check_key(k))
        .map_err(|e| e.to_string())?;
    // The proxy's CA (created at the first start), its bundle file, and the CA key handed to
    // the proxy as a secret page. A proxy that fails to start is logged; the daemon serves
    // without it (`run --proxy` then says so).
    let proxy_ready = match proxy_helper {
        Some(h) => match agentkeys_broker::proxy::hand_over_ca(
            &home,
            &key,
            &identity.id,
            &cfg.proxy,
            policy,
            h,
        ) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!("the credential-injecting proxy is not available: {e}");
                None
            }
        },
        None => None,
    };
    let sessions = Sessions::load(
        home.clone(),
        identity,
        nix::unistd::geteuid().as_raw(),
        &key,
    )
    .map_err(|e| e.to_string())?;
    // The audit trail is opened now, while the file can still be created; appends later only
    // write and sync.
    let audit = AuditLog::open(&home).map_err(|e| format!("opening the audit log: {e}"))?;
    // Group commit: its second descriptor is taken now, before the sandbox.
    let audit = agentkeys_broker::auditor::Auditor::new(audit)
        .map_err(|e| format!("opening the audit log: {e}"))?;
    let listener = server::bind_socket(&socket_path, &cfg.daemon)?;
    // Remote backends: HTTP clients and CA files, before the sandbox. No request yet: the
    // refreshers log in once the runtime runs, so an unreachable backend does not stop the
    // daemon from serving the local vault and other backends.
    let backends = Backends::from_config(&cfg)?;
    // Network listeners (remote agents): bound now, and the TLS key unsealed now, while
    // `bind` and the home's files are reachable; served once the runtime runs.
    let network_listeners = if cfg.daemon.listen.is_empty() {
        None
    } else {
        let id = key
            .with_key(|k| agentkeys_state::tls::load_or_create_tls_identity(&home, k))
            .map_err(|e| format!("the TLS identity for [daemon] listen: {e}"))?;
        let acceptor = agentkeys_broker::listen::tls_acceptor(&id)?;
        info!(fingerprint = %id.fingerprint(), "TLS identity for network listeners");
        drop(id);
        Some((agentkeys_broker::listen::bind_all(&cfg.daemon)?, acceptor))
    };

    startup::sandbox_with(backends.network(), network_listeners.is_some())
        .map_err(|e| e.to_string())?;

    let (shutdown, _) = tokio::sync::watch::channel(false);
    let cfg_approval_ttl = cfg.daemon.approval_ttl;
    let mask_budget = agentkeys_broker::mask::MaskBudget::new(cfg.daemon.max_mask_bytes);
    let shared = Arc::new(Shared {
        home,
        sessions,
        key,
        cfg: cfg.daemon,
        started: Instant::now(),
        conns: Mutex::new(ConnTable::default()),
        shutdown,
        keystore_detail,
        cache: Default::default(),
        audit,
        vault: Mutex::new(None),
        launcher: std::sync::OnceLock::new(),
        approvals: Mutex::new(agentkeys_broker::approvals::Approvals::new(
            cfg_approval_ttl,
        )),
        backends,
        mask_budget,
        proxy: std::sync::OnceLock::new(),
    });
    let report = daemon_report(&shared);
    for item in &report.items {
        info!(item = %item.name, status = ?item.status, "self-test: {}", item.detail);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agentkeysd")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async {
        match agentkeys_broker::launch::LauncherLink::start(launcher.sock) {
            Ok(link) => {
                let _ = shared.launcher.set(link);
            }
            Err(e) => warn!("the launcher link failed; `run` is unavailable: {e}"),
        }
        if let Some(r) = proxy_ready {
            match agentkeys_broker::proxy::ProxyLink::start(
                r.sock,
                r.bundle,
                Arc::downgrade(&shared),
                r.sync_audit,
            ) {
                Ok(link) => {
                    let _ = shared.proxy.set(link);
                }
                Err(e) => warn!("the proxy link failed; `run --proxy` is unavailable: {e}"),
            }
        }
        shared.backends.start();
        if let Some((bound, acceptor)) = network_listeners {
            agentkeys_broker::listen::serve(bound, acceptor, shared.clone()).await;
        }
        let signals = shared.clone();
        tokio::spawn(async move { wait_for_signal(&signals).await });
        if let Some(r) = ready {
            r.signal();
        }
        server::serve(listener, shared.clone(), socket_path.clone()).await;
    });
    // Give connections a moment to close, then drop everything (the DEK page is wiped).
    runtime.shutdown_timeout(Duration::from_secs(2));
    // Records nobody waited for (drops, evictions at shutdown) go to disk before the exit.
    if let Err(e) = shared.audit.flush() {
        warn!("the last audit records could not be synced: {e}");
    }
    shared.audit.stop();
    let _ = std::fs::remove_file(&socket_path);
    info!("agentkeysd stopped");
    drop(shared);
    Ok(())
}

fn open_log(path: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc_o_cloexec())
        .open(path)
        .map_err(|e| format!("opening log {}: {e}", path.display()))
}

/// O_CLOEXEC without depending on libc here (std opens with it anyway on Linux).
fn libc_o_cloexec() -> i32 {
    nix::fcntl::OFlag::O_CLOEXEC.bits()
}

async fn wait_for_signal(shared: &Shared) {
    use tokio::signal::unix::{SignalKind, signal};
    // SIGXFSZ: a lowered RLIMIT_FSIZE (any process of this uid can set one with prlimit) used to
    // kill the daemon at its next audit write. Handled, the write fails with EFBIG and the
    // delivery is refused (fail closed) until the limit is raised (tests/faults.rs).
    match signal(SignalKind::from_raw(
        nix::sys::signal::Signal::SIGXFSZ as i32,
    )) {
        Ok(mut xfsz) => {
            tokio::spawn(async move {
                while xfsz.recv().await.is_some() {
                    warn!(
                        "SIGXFSZ: a file size limit (RLIMIT_FSIZE) stops a write; deliveries whose audit record cannot be written are refused"
                    );
                }
            });
        }
        Err(e) => warn!("cannot handle SIGXFSZ (a file size limit would stop the daemon): {e}"),
    }
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop the daemon with `agentkeys daemon stop`");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    let _ = shared.shutdown.send(true);
}
