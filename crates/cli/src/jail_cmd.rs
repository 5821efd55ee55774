//! `agentkeys jail --agent NAME [...] -- CMD [ARGS...]`: runs CMD and everything it starts
//! confined (crate `agentkeys-jail`), acting as an ephemeral session of the registered agent
//! NAME that the daemon mints for this jail alone.
//!
//! Order: build the policy and check the kernel (refuse, naming what is missing and its fix,
//! unless `--best-effort`); start the jail's init in its namespaces while single-threaded (it
//! builds the view, then waits for the session on a pipe); ask the daemon for the session
//! (`jail_start`, sent with the hello) on a connection that stays open for the jail's life;
//! hand the token to the jail; wait for the set-up's report; then wait for CMD (through
//! init), forwarding SIGTERM and SIGHUP (Ctrl-C, Ctrl-\, Ctrl-Z and window
//! resizes reach CMD from the terminal itself); stop the jail if the daemon ends its session
//! (agent revoked, TTL); finally `jail_exit` with CMD's status, which is ours too.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use agentkeys_hardening::ns::{self, Forked};
use agentkeys_jail::apply::{self, Session};
use agentkeys_jail::policy::{Context, JailOptions, Network, PolicyBuilder};
use agentkeys_jail::{JailPolicy, Protection};
use agentkeys_proto::client::Client;
use agentkeys_proto::wire::{RequestBody, ResponseBody};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use secrecy::ExposeSecret;
use zeroize::Zeroizing;

use crate::CliError;
use crate::ctx::{self, Caller};

/// The options of `agentkeys jail`.
#[derive(Debug)]
pub(crate) struct JailOpts {
    pub agent: String,
    pub ttl: Option<Duration>,
    pub write: Vec<PathBuf>,
    pub hide: Vec<PathBuf>,
    pub show: Vec<PathBuf>,
    pub allow_socket: Vec<PathBuf>,
    pub env: Vec<String>,
    pub best_effort: bool,
    pub git_commit: bool,
    pub print_policy: bool,
    pub proxy: Vec<String>,
    pub net: String,
    pub allow_host: Vec<String>,
    pub command: Vec<String>,
}

/// `--net` and `--allow-host`, checked.
fn network_for(o: &JailOpts) -> Result<Network, CliError> {
    match o.net.as_str() {
        "host" => {
            if !o.allow_host.is_empty() {
                return Err(CliError::Input(
                    "--allow-host needs --net proxy (with --net host every host is reachable)"
                        .into(),
                ));
            }
            Ok(Network::Host)
        }
        "proxy" => {
            let mut allow_hosts = Vec::new();
            for h in &o.allow_host {
                let p = agentkeys_state::inject::HostPattern::parse(h)
                    .map_err(|e| CliError::Input(format!("--allow-host {h}: {e}")))?;
                let t = p.to_text();
                if !allow_hosts.contains(&t) {
                    allow_hosts.push(t);
                }
            }
            Ok(Network::Proxy { allow_hosts })
        }
        other => Err(CliError::Input(format!(
            "--net {other}: `host` (the host's network) or `proxy` (only agentkeys' proxy)"
        ))),
    }
}

fn policy_for(o: &JailOpts) -> Result<JailPolicy, CliError> {
    let home = ctx::home()?;
    let user_home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .ok_or_else(|| CliError::Input("HOME is not set to an absolute path".into()))?;
    let cwd = std::env::current_dir()
        .map_err(|e| CliError::Input(format!("the working directory: {e}")))?;
    let c = Context {
        home: user_home,
        agentkeys_home: home.root().to_path_buf(),
        socket: ctx::socket(&home),
        cwd,
        runtime_dir: std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute()),
        histfile: std::env::var_os("HISTFILE")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute()),
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    };
    let opts = JailOptions {
        write: o.write.clone(),
        hide: o.hide.clone(),
        show: o.show.clone(),
        allow_socket: o.allow_socket.clone(),
        env: o.env.clone(),
        best_effort: o.best_effort,
        network: Some(network_for(o)?),
        git_commit: o.git_commit,
    };
    PolicyBuilder::new(c, opts)
        .build()
        .map_err(|e| CliError::Jail(e.to_string()))
}

/// Checks the kernel: refuses on a missing requirement, or (best effort) marks it skipped
/// and says what is lost.
fn check_kernel(policy: &mut JailPolicy) -> Result<(), CliError> {
    let missing: Vec<_> = agentkeys_jail::probe::probe_quick()
        .into_iter()
        .filter(|i| !i.ok)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !policy.best_effort {
        let list: Vec<String> = missing
            .iter()
            .map(|i| match &i.fix {
                Some(fix) => format!("{}: {} (fix: {fix})", i.name, i.detail),
                None => format!("{}: {}", i.name, i.detail),
            })
            .collect();
        return Err(CliError::Jail(format!(
            "refusing to start the jail: this kernel lacks what it needs: {}. An agent is never \
             run half-confined unless you pass --best-effort",
            list.join("; ")
        )));
    }
    for i in &missing {
        if !policy.skipped.contains(&i.protection) {
            policy.skipped.push(i.protection);
            eprintln!(
                "agentkeys jail: --best-effort: NOT applied: {} ({})",
                i.protection.loss(),
                i.detail
            );
        }
    }
    Ok(())
}

pub(crate) fn run(caller: &Caller, o: JailOpts) -> Result<(), CliError> {
    ctx::require_owner(caller, "jail")?;
    // Held before the policy is built (it decides which placeholders this jail makes).
    let lock = apply::placeholder_lock(ctx::home()?.root());
    let mut policy = policy_for(&o)?;
    check_kernel(&mut policy)?;
    if o.print_policy {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", policy.print())?;
        return Ok(());
    }
    if o.command.is_empty() {
        return Err(CliError::Input("no command given after `--`".into()));
    }
    if policy.skipped.contains(&Protection::Namespaces) {
        return Err(CliError::Jail(
            "refusing to start the jail: without a mount namespace there is no private place \
             to hand the agent its session, and agentkeys' state would stay readable"
                .into(),
        ));
    }
    if !policy.env.removed.is_empty() {
        eprintln!(
            "agentkeys jail: removed from the environment: {} (--env NAME passes one)",
            policy.env.removed.join(" ")
        );
    }
    let proxy = crate::run_cmd::pairs(&o.proxy, "--proxy")?;
    // A repository in the project with `.git` read-only: say so once, and how to open it.
    if let Some(dot_git) = policy.writable.first().map(|w| w.join(".git"))
        && policy.git == agentkeys_jail::policy::GitAccess::ReadOnly
        && dot_git.exists()
        && !policy.create_dirs.contains(&dot_git)
    {
        eprintln!(
            "agentkeys jail: .git is read-only (git add/commit fail with `index.lock': \
             Read-only file system`); --git-commit lets the agent commit (see `agentkeys \
             jail --help` for what that opens)"
        );
    }
    let home = ctx::home()?;
    let socket = ctx::socket(&home);
    let argv = apply::cstrings(&o.command)
        .ok_or_else(|| CliError::Input("a command argument contains a NUL byte".into()))?;

    // The helpers and the jail ignore Ctrl-C and Ctrl-\ (CMD gets them from the terminal and
    // decides); CMD's dispositions are reset before it execs.
    ns::ignore_signals(&[libc::SIGINT, libc::SIGQUIT]);
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let pipe = || nix::unistd::pipe2(cloexec).map_err(|e| CliError::Output(e.into()));
    let (tok_r, tok_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // `--net proxy`: the jail's init hands its loopback listener over on this pair.
    let (relay_mine, relay_theirs) = if policy.network.is_proxy() {
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| CliError::Output(e.into()))?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    // The jail's init starts straight in the jail's namespaces, as this process's child (no
    // outer process between: this CLI waits for it and reads CMD's status from `status`).
    let (status_r, status_w) = pipe()?;
    let init = match ns::fork_into_namespaces(apply::jail_namespaces(&policy)) {
        Ok(Forked::Child) => {
            drop(tok_w);
            drop(err_r);
            drop(relay_mine);
            drop(status_r);
            jail_child(&policy, &socket, tok_r, relay_theirs, err_w, status_w, argv)
        }
        Ok(Forked::Parent(pid)) => pid,
        Err(e) => {
            let step = if policy.network.is_proxy() {
                "unshare user, mount, PID, IPC and network namespaces (--net proxy)"
            } else {
                "unshare user, mount, PID and IPC namespaces"
            };
            return Err(CliError::Jail(format!(
                "setting up the jail failed at step `{step}`: {e} (are unprivileged user \
                 namespaces allowed? see `agentkeys doctor`, items jail_*)"
            )));
        }
    };
    drop(status_w);
    drop(tok_r);
    drop(err_w);
    drop(relay_theirs);
    let rt = ctx::runtime()?;
    let handoff = Handoff {
        status: status_r,
        tok_w,
        err_r,
        relay: relay_mine,
        proxy,
    };
    let mut lock = Some(lock);
    let r = rt.block_on(supervise(
        &home, caller, &o, &policy, init, handoff, &mut lock,
    ));
    // When the jail ended before it ran (supervise removes them once CMD has run).
    if let Some(lock) = lock {
        apply::remove_placeholders(&policy, lock);
    }
    // Submodules the agent added or redirected, against the listing the policy was built from
    // (see gitlinks).
    for w in agentkeys_jail::gitlinks::changes(&policy.gitlinks_before, &policy) {
        eprintln!("agentkeys jail: WARNING: {w}");
    }
    if let Err(CliError::Exit(code)) = r {
        // CMD's status is ours: end here, skipping the allocator's exit-time purge (returning
        // its arenas to the system page by page, which the exit does anyway). Everything of
        // ours is dropped by now; only stdout may hold buffered bytes.
        drop(o);
        drop(policy);
        let _ = std::io::stdout().flush();
        ns::exit_now(i32::from(code));
    }
    r
}

/// The error for a set-up step of the jail that failed with `errno`.
fn setup_failed((step, errno): (&'static str, i32)) -> CliError {
    CliError::Jail(format!(
        "setting up the jail failed at step `{step}`: {}",
        std::io::Error::from_raw_os_error(errno)
    ))
}

/// The jail's init (this CLI's child, in the jail's namespaces): builds the view once the
/// session is there, and (in CMD's process) execs.
fn jail_child(
    policy: &JailPolicy,
    socket: &std::path::Path,
    tok_r: OwnedFd,
    relay: Option<OwnedFd>,
    err_w: OwnedFd,
    status_w: OwnedFd,
    argv: Vec<std::ffi::CString>,
) -> ! {
    let fail = |step: &'static str, errno: i32| -> std::convert::Infallible {
        apply::report(&err_w, step, errno);
        ns::exit_now(125)
    };
    // Returns in CMD's process, confined; init read the session from the pipe (while this
    // CLI asked the daemon for it) and wrote it to the jail's file.
    let entered = apply::enter_as_init(policy, Session { pipe: tok_r, relay }, status_w, &fail);
    // The jail's own entries (placeholders, the proxy with the jail's credential, the CA
    // bundle) replace the owner's of the same names; `NO_PROXY` would route around the proxy.
    let names: Vec<&str> = entered
        .env
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, _)| k))
        .collect();
    let proxied = !entered.env.is_empty();
    let mut env: Vec<Zeroizing<String>> = policy
        .environment(&entered.jail_id, socket)
        .into_iter()
        .filter(|(k, _)| !names.contains(&k.as_str()))
        .filter(|(k, _)| !(proxied && (k == "NO_PROXY" || k == "no_proxy")))
        .map(|(k, v)| Zeroizing::new(format!("{k}={v}")))
        .collect();
    env.extend(entered.env.iter().cloned());
    let env: Vec<String> = env.iter().map(|e| e.to_string()).collect();
    let Some(envp) = apply::cstrings(&env) else {
        apply::report(&err_w, "environment", libc::EINVAL);
        ns::exit_now(125)
    };
    // Nothing but stdio crosses into CMD (the error pipe closes at exec).
    let keep = [std::os::fd::AsRawFd::as_raw_fd(&err_w)];
    if ns::close_fds_from(3, &keep).is_err() {
        apply::report(&err_w, "close inherited descriptors", libc::EBADF);
        ns::exit_now(125)
    }
    // PATH is searched in the jail's environment (the same PATH as the owner's).
    let e = match nix::unistd::execvpe(&argv[0], &argv, &envp) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    apply::report(&err_w, "exec", e as i32);
    ns::exit_now(if e == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    })
}

/// What the CLI keeps of the jail's start: init's status pipe, the session's pipe
/// (`jail_id\ntoken` on `tok_w`), the set-up's report (`err_r`), the `--net proxy` relay and
/// the `--proxy` mappings.
struct Handoff {
    /// init's report of how CMD ended (`[b'x', code]` or `[b's', signal]`), read once init
    /// has exited.
    status: OwnedFd,
    tok_w: OwnedFd,
    err_r: OwnedFd,
    /// `--net proxy`: where the jail's init sends its loopback listener.
    relay: Option<OwnedFd>,
    /// `--proxy VAR -> service`.
    proxy: std::collections::BTreeMap<String, String>,
}

/// The CLI's side while the jail runs.
async fn supervise(
    home: &agentkeys_state::home::Home,
    caller: &Caller,
    o: &JailOpts,
    policy: &JailPolicy,
    init: Pid,
    handoff: Handoff,
    lock: &mut Option<apply::PlaceholderLock>,
) -> Result<(), CliError> {
    let Handoff {
        status: status_r,
        tok_w,
        err_r,
        relay,
        proxy,
    } = handoff;
    use tokio::signal::unix::{SignalKind, signal};
    let abandon = |tok_w: OwnedFd| {
        drop(tok_w);
        let _ = waitpid(init, None);
    };
    let connected = match ctx::token(home, caller) {
        Ok(token) => Client::connect(&ctx::socket(home))
            .await
            .map(|c| (c, token))
            .map_err(CliError::from),
        Err(e) => Err(e),
    };
    let (mut client, token) = match connected {
        Ok(c) => c,
        Err(e) => {
            abandon(tok_w);
            return Err(e);
        }
    };
    // The hello and `jail_start` in one go: the daemon answers the hello before it reads the
    // next request (and closes, reading nothing more, when it refuses it), so this saves a
    // round trip without letting anything through unauthenticated. The hello goes first, so
    // the daemon checks it while this makes the runs' user namespace.
    let hello = client
        .send(
            RequestBody::Hello {
                token: agentkeys_proto::wire::WireToken(token),
            },
            &[],
        )
        .await;
    // The user namespace the jail's `run`s join (made here, where mapping the owner's uid is
    // allowed even for root; the daemon's launcher may not map uid 0 itself). Its helper is
    // forked after the jail's init (which the start waits for) and while the daemon answers
    // the hello; still single-threaded (a current-thread runtime, nothing blocking spawned).
    let mut runs = match apply::RunsUserns::start(policy) {
        Ok(r) => r,
        Err(failed) => {
            abandon(tok_w);
            return Err(setup_failed(failed));
        }
    };
    let policy_json = match serde_json::to_value(policy) {
        Ok(v) => v,
        Err(e) => {
            abandon(tok_w);
            return Err(std::io::Error::from(e).into());
        }
    };
    let run_userns = match runs.open() {
        Ok(fd) => fd,
        Err(failed) => {
            abandon(tok_w);
            return Err(setup_failed(failed));
        }
    };
    let sent = match hello {
        Ok(_) => {
            client
                .send(
                    RequestBody::JailStart {
                        agent: o.agent.clone(),
                        ttl_secs: o.ttl.map(|d| d.as_secs().max(1)),
                        policy: policy_json,
                        proxy,
                    },
                    &[std::os::fd::AsFd::as_fd(&run_userns)],
                )
                .await
        }
        Err(e) => Err(e),
    };
    drop(run_userns);
    // The hello's answer first: a refusal (or `busy`) is queued even when a send failed.
    let welcome = client.recv().await;
    let started = match (welcome.map(|a| a.body), sent) {
        (Ok(ResponseBody::Welcome(_)), Ok(_)) => client.recv().await,
        (Ok(ResponseBody::Welcome(_)), Err(e)) => Err(e),
        (Ok(other), _) => Err(agentkeys_proto::client::unexpected(&other)),
        (Err(e), _) => Err(e),
    };
    // The helper has long exited (it went when its namespace was opened): reaped now, so that
    // no zombie of it stays among the jail's processes.
    drop(runs);
    let mut proxy_port = None;
    let (jail, session) = match started.map(|a| a.body) {
        Ok(ResponseBody::JailStarted {
            jail,
            session,
            token,
            proxy,
            ..
        }) => {
            let mut msg = Zeroizing::new(Vec::with_capacity(jail.len() + 1 + 256));
            msg.extend_from_slice(jail.as_bytes());
            msg.push(b'\n');
            msg.extend_from_slice(token.0.0.expose_secret().as_bytes());
            if let Some(p) = &proxy {
                // `\nport` then `\nNAME=value` per entry (none holds a newline: the daemon
                // makes them; one that did is refused here rather than split).
                msg.extend_from_slice(format!("\n{}", p.port).as_bytes());
                for e in &p.env {
                    if e.contains('\n') {
                        abandon(tok_w);
                        return Err(CliError::Jail(
                            "the daemon's proxy environment holds a newline".into(),
                        ));
                    }
                    msg.push(b'\n');
                    msg.extend_from_slice(e.as_bytes());
                }
                proxy_port = Some(p.port);
            }
            if msg.len() > apply::MAX_SESSION_MESSAGE {
                abandon(tok_w);
                return Err(CliError::Jail(
                    "the jail's session message is too long".into(),
                ));
            }
            if nix::unistd::write(&tok_w, &msg).is_err() {
                // The set-up failed before it needed the session: say at which step.
                abandon(tok_w);
                let why = match apply::read_report(&err_r) {
                    Some((step, errno)) => format!(
                        "setting up the jail failed at step `{step}`: {}",
                        std::io::Error::from_raw_os_error(errno)
                    ),
                    None => "the jail went away before it started".into(),
                };
                let _ = client
                    .send(
                        RequestBody::JailExit {
                            jail: jail.clone(),
                            code: None,
                            signal: None,
                        },
                        &[],
                    )
                    .await;
                return Err(CliError::Jail(why));
            }
            drop(tok_w);
            (jail, session)
        }
        Ok(other) => {
            abandon(tok_w);
            return Err(agentkeys_proto::client::unexpected(&other).into());
        }
        Err(e) => {
            abandon(tok_w);
            return Err(e.into());
        }
    };
    // A short blocking read: the set-up reports a failure, or EOF once CMD has exec'd.
    let report = apply::read_report(&err_r);
    drop(err_r);
    if let Some((step, errno)) = report {
        let status = wait_exit(init, &status_r);
        let _ = client
            .call(RequestBody::JailExit {
                jail: jail.clone(),
                code: status.0,
                signal: status.1,
            })
            .await;
        let err = std::io::Error::from_raw_os_error(errno);
        if step == "exec" {
            eprintln!("agentkeys jail: cannot run {}: {err}", o.command[0]);
            return Err(CliError::Exit(if errno == libc::ENOENT {
                127
            } else {
                126
            }));
        }
        let hint = if step.starts_with("unshare") {
            " (are unprivileged user namespaces allowed? see `agentkeys doctor`, items jail_*)"
        } else {
            ""
        };
        return Err(CliError::Jail(format!(
            "setting up the jail failed at step `{step}`: {err}{hint}"
        )));
    }
    // `--net proxy`: init sent its listener before CMD started; relay it to the proxy.
    let _relay_task = match (relay, proxy_port) {
        (Some(relay), Some(port)) => Some(start_relay(&relay, port)?),
        (Some(_), None) => {
            return Err(CliError::Jail(
                "--net proxy: the daemon gave no proxy port".into(),
            ));
        }
        _ => None,
    };
    eprintln!(
        "agentkeys jail: {jail} started for agent {:?} (session {session})",
        o.agent
    );
    let mut chld = signal(SignalKind::child()).map_err(CliError::Output)?;
    let mut term = signal(SignalKind::terminate()).map_err(CliError::Output)?;
    let mut hup = signal(SignalKind::hangup()).map_err(CliError::Output)?;
    let mut ended: Option<String> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        if let Some(st) = try_exit(init, &status_r) {
            break st;
        }
        let deadline =
            kill_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = chld.recv() => {}
            _ = term.recv() => { let _ = kill(init, Signal::SIGTERM); }
            _ = hup.recv() => { let _ = kill(init, Signal::SIGHUP); }
            r = client.recv(), if ended.is_none() => {
                // The daemon ended the jail's session (agent revoked, TTL, daemon stopping):
                // the jail stops too (SIGTERM, SIGKILL after 3 s).
                let why = match r {
                    Err(e) => e.to_string(),
                    Ok(_) => "unexpected message from agentkeysd".into(),
                };
                eprintln!("agentkeys jail: {why}; stopping the jail");
                ended = Some(why);
                let _ = kill(init, Signal::SIGTERM);
                kill_at = Some(tokio::time::Instant::now() + Duration::from_secs(3));
            }
            _ = tokio::time::sleep_until(deadline), if kill_at.is_some() => {
                let _ = kill(init, Signal::SIGKILL);
                kill_at = None;
            }
        }
    };
    // The jail's processes are gone: its placeholders go before `jail_exit`, whose durable
    // audit record would otherwise share the file system's journal commit with the removals.
    if let Some(lock) = lock.take() {
        apply::remove_placeholders(policy, lock);
    }
    if ended.is_none() {
        // Sent, not waited for: the daemon handles it before it sees this connection close,
        // and ends the jail on the close anyway. Saves a round trip and a sync per jail.
        let _ = client
            .send(
                RequestBody::JailExit {
                    jail,
                    code: status.0,
                    signal: status.1,
                },
                &[],
            )
            .await;
    }
    let code = match status {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    };
    if ended.is_some() && code == 0 {
        return Err(CliError::Exit(4));
    }
    Err(CliError::Exit(u8::try_from(code).unwrap_or(1)))
}

/// Most relayed connections open at once (the proxy has its own bound too).
const MAX_RELAYED: usize = 256;

/// Takes the jail's loopback listener from init and relays every connection made to it to the
/// proxy on the host's `127.0.0.1:port`, and to nothing else: the jail names no destination,
/// so the relay cannot be used to reach another address or port. Dropping the handle (the
/// jail ended) stops it.
fn start_relay(relay: &OwnedFd, port: u16) -> Result<RelayTask, CliError> {
    let mut buf = [0u8; 64];
    let got = agentkeys_hardening::launcher::recv_msg::<String>(
        std::os::fd::AsFd::as_fd(relay),
        &mut buf,
    )
    .map_err(|e| CliError::Jail(format!("--net proxy: receiving the jail's listener: {e}")))?;
    let Some((_, mut fds)) = got else {
        return Err(CliError::Jail(
            "--net proxy: the jail sent no listener".into(),
        ));
    };
    let fd = fds
        .pop()
        .ok_or_else(|| CliError::Jail("--net proxy: the jail sent no listener".into()))?;
    let std_l = std::net::TcpListener::from(fd);
    std_l.set_nonblocking(true).map_err(CliError::Output)?;
    let listener = tokio::net::TcpListener::from_std(std_l).map_err(CliError::Output)?;
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_RELAYED));
    let task = tokio::spawn(async move {
        let target = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        loop {
            let Ok((mut inside, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue; // dropped: too many at once
            };
            tokio::spawn(async move {
                let _permit = permit;
                let _ = inside.set_nodelay(true);
                let connect = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::TcpStream::connect(target),
                );
                if let Ok(Ok(mut out)) = connect.await {
                    let _ = out.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut out).await;
                }
            });
        }
    });
    Ok(RelayTask(task))
}

/// The relay's task, aborted when dropped.
struct RelayTask(tokio::task::JoinHandle<()>);

impl Drop for RelayTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn decode(ws: WaitStatus) -> Option<(Option<i32>, Option<i32>)> {
    match ws {
        WaitStatus::Exited(_, c) => Some((Some(c), None)),
        WaitStatus::Signaled(_, s, _) => Some((None, Some(s as i32))),
        _ => None,
    }
}

/// How CMD ended, once init has: init's report (`[b'x', code]` or `[b's', signal]`), else
/// init's own status (killed before CMD ended).
fn ended(ws: (Option<i32>, Option<i32>), status: &OwnedFd) -> (Option<i32>, Option<i32>) {
    let mut b = [0u8; 2];
    match nix::unistd::read(status, &mut b) {
        Ok(2) if b[0] == b'x' => (Some(i32::from(b[1])), None),
        Ok(2) if b[0] == b's' => (None, Some(i32::from(b[1]))),
        _ => ws,
    }
}

fn try_exit(pid: Pid, status: &OwnedFd) -> Option<(Option<i32>, Option<i32>)> {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(ws) => decode(ws).map(|s| ended(s, status)),
        Err(_) => Some((None, None)),
    }
}

fn wait_exit(pid: Pid, status: &OwnedFd) -> (Option<i32>, Option<i32>) {
    loop {
        match waitpid(pid, None) {
            Ok(ws) => {
                if let Some(s) = decode(ws) {
                    return ended(s, status);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return (None, None),
        }
    }
}
