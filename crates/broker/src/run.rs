//! `run`: the daemon launches a program with secrets in its environment (or in readable
//! files), through the launcher, and the caller never holds the plaintext. With masking (the
//! default) the program's stdout and stderr come back through daemon-side pipes and the
//! masker; without it the program gets the caller's fds directly.
//!
//! Order: validate -> per secret: scope, policy, fetch -> `run_start` and one `deliver` per
//! secret audited (fail closed) -> launch -> the daemon's copies dropped (`drop`) -> on exit,
//! output drained, `run_exit` audited.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkeys_hardening::launcher::{FromLauncher, LaunchSpec, RunEnd};
use agentkeys_hardening::page::{PagePolicy, SecretPage};
use agentkeys_proto::wire::{ErrorCode, ResponseBody};
use agentkeys_state::audit::{Event, Peer};
use agentkeys_state::vault::{DeliveryKind, validate_service_name};
use sha2::Digest;
use tokio::sync::oneshot;
use tracing::info;
use zeroize::Zeroizing;

use crate::launch::{ActiveRun, LaunchError};
use crate::mask::{MaskError, Masker};
use crate::sessions::Principal;
use crate::shared::Shared;

/// Most secrets one run may take.
pub const MAX_RUN_SECRETS: usize = 16;
/// Most arguments.
pub const MAX_ARGS: usize = 4096;

/// The request, as received.
pub struct RunRequest {
    /// argv.
    pub argv: Vec<String>,
    /// VAR -> service, as environment values.
    pub env: BTreeMap<String, String>,
    /// VAR -> service, as readable files.
    pub files: BTreeMap<String, String>,
    /// VAR -> service, as placeholders the credential-injecting proxy replaces.
    pub proxy: BTreeMap<String, String>,
    /// The caller's environment.
    pub caller_env: Vec<String>,
    /// Working directory (required, absolute).
    pub cwd: Option<String>,
    /// Mask secrets in the output.
    pub masking: bool,
    /// The caller's file-mode creation mask (at most 0o777); none: the daemon's 077.
    pub umask: Option<u32>,
}

/// A running program.
pub struct Running {
    /// Launch id, for signals and `stop`.
    pub id: u64,
    /// pid.
    pub pid: u32,
    /// Resolves when the run has ended (the program and everything it started are gone).
    pub exited: oneshot::Receiver<FromLauncher>,
    /// Counts the run as open (daemon shutdown waits for it); the connection keeps it until
    /// the caller has its answer.
    pub active: Option<ActiveRun>,
    /// Reports from the output pumps that the caller stopped reading (never without masking):
    /// the run should then be stopped.
    pub stalls: crate::pump::Stalls,
    pumps: Vec<oneshot::Receiver<()>>,
    started: Instant,
    program: String,
    /// The run's proxy registration: its placeholders work until the run has ended.
    proxy: Option<crate::proxy::Registration>,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> ResponseBody {
    ResponseBody::Error {
        code,
        message: message.into(),
    }
}

fn valid_var(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128
}

/// A printable program name for the audit trail: the basename, restricted to a safe alphabet.
fn program_name(argv0: &str) -> String {
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    let clean: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
        .take(64)
        .collect();
    if clean.is_empty() { "?".into() } else { clean }
}

/// SHA-256 of everything that decides what a run does: argv, working directory, the secret
/// mappings, masking, the umask, and the caller's environment (PATH, LD_PRELOAD, ... decide
/// which program runs and how). An approval for a `run` is bound to this, so an approved `true`
/// cannot be replayed with another PATH or directory. The environment is hashed sorted, which
/// binds exactly what the program gets only because [`validate`] refuses a name given twice
/// (with duplicates, the first entry wins at exec, and both orders would hash the same).
pub fn request_hash(req: &RunRequest) -> String {
    let mut h = sha2::Sha256::new();
    let mut field = |tag: &str, value: &str| {
        h.update(tag.as_bytes());
        h.update([0u8]);
        h.update(value.as_bytes());
        h.update([0u8]);
    };
    for a in &req.argv {
        field("argv", a);
    }
    field("cwd", req.cwd.as_deref().unwrap_or(""));
    for (k, v) in &req.env {
        field("env", &format!("{k}={v}"));
    }
    for (k, v) in &req.files {
        field("file", &format!("{k}={v}"));
    }
    for (k, v) in &req.proxy {
        field("proxy", &format!("{k}={v}"));
    }
    field("masking", if req.masking { "1" } else { "0" });
    // The umask decides the modes of every file the program creates.
    field(
        "umask",
        &req.umask.map(|m| format!("{m:o}")).unwrap_or_default(),
    );
    let mut env: Vec<&String> = req.caller_env.iter().collect();
    env.sort();
    for e in env {
        field("caller_env", e);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Longest command kept for the owner's display (`agentkeys pending`, `agentkeys grants`, the
/// `approval_command` hook): the grant binds the whole request, the display is bounded.
const MAX_COMMAND_DISPLAY: usize = 256;

/// The command as the owner is shown it: each argument shell-quoted, then the working directory,
/// also quoted; cut to [`MAX_COMMAND_DISPLAY`] bytes. Raw text: whoever prints it escapes it
/// (`agentkeys_proto::display::escape`), since an agent chose every byte of it.
fn shown_command(req: &RunRequest) -> String {
    use agentkeys_proto::display::{shell_quote, truncate};
    let quoted: Vec<_> = req.argv.iter().map(|a| shell_quote(a)).collect();
    let full = format!(
        "{}  (in {})",
        quoted.join(" "),
        req.cwd.as_deref().map_or("?".into(), shell_quote)
    );
    truncate(&full, MAX_COMMAND_DISPLAY).into_owned()
}

/// SHA-256 of the argv, NUL-separated: identifies the exact command without recording it.
pub fn argv_hash(argv: &[String]) -> String {
    let mut h = sha2::Sha256::new();
    for a in argv {
        h.update(a.as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn validate(req: &RunRequest) -> Result<(), ResponseBody> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(refuse(ErrorCode::BadRequest, "run needs a command"));
    }
    if req.argv.len() > MAX_ARGS {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("at most {MAX_ARGS} arguments"),
        ));
    }
    if req.env.len() + req.files.len() + req.proxy.len() > MAX_RUN_SECRETS {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("at most {MAX_RUN_SECRETS} secrets per run"),
        ));
    }
    for (var, service) in req.env.iter().chain(&req.files).chain(&req.proxy) {
        if !valid_var(var) {
            return Err(refuse(
                ErrorCode::BadRequest,
                "invalid variable name (use letters, digits and _)",
            ));
        }
        if validate_service_name(service).is_err() {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("invalid service name for {var}"),
            ));
        }
    }
    if req.env.keys().any(|k| req.files.contains_key(k)) {
        return Err(refuse(
            ErrorCode::BadRequest,
            "a variable is given both as --env and --file",
        ));
    }
    if req
        .proxy
        .keys()
        .any(|k| req.env.contains_key(k) || req.files.contains_key(k))
    {
        return Err(refuse(
            ErrorCode::BadRequest,
            "a variable is given both as --proxy and --env or --file",
        ));
    }
    // Without one the program would run wherever the daemon happened to start.
    if !req.cwd.as_deref().is_some_and(|c| c.starts_with('/')) {
        return Err(refuse(
            ErrorCode::BadRequest,
            "run needs an absolute working directory",
        ));
    }
    if req.umask.is_some_and(|m| m > 0o777) {
        return Err(refuse(ErrorCode::BadRequest, "umask must be at most 0777"));
    }
    check_caller_env(&req.caller_env)?;
    if req
        .argv
        .iter()
        .chain(&req.caller_env)
        .any(|s| s.contains('\0'))
    {
        return Err(refuse(
            ErrorCode::BadRequest,
            "arguments and environment may not contain NUL bytes",
        ));
    }
    Ok(())
}

/// The caller's environment must be `NAME=value` entries with distinct, non-empty names: with
/// a name given twice, which entry the program sees is decided at exec, not by the request hash
/// (which sorts the entries), so an approval could be replayed with the order swapped.
fn check_caller_env(env: &[String]) -> Result<(), ResponseBody> {
    let mut names = std::collections::HashSet::with_capacity(env.len());
    for e in env {
        let Some((name, _)) = e.split_once('=') else {
            return Err(refuse(
                ErrorCode::BadRequest,
                "every environment entry must be NAME=value",
            ));
        };
        if name.is_empty() {
            return Err(refuse(
                ErrorCode::BadRequest,
                "an environment entry has an empty name",
            ));
        }
        if !names.insert(name) {
            let shown: String = name.chars().take(64).collect();
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("the environment gives {shown:?} more than once"),
            ));
        }
    }
    Ok(())
}

/// Fetches one secret for a run (cache, vault or remote backend), with its audit record.
async fn fetch(
    shared: &Shared,
    p: &Principal,
    peer: Peer,
    service: &str,
    kind: DeliveryKind,
) -> Result<Zeroizing<Vec<u8>>, ResponseBody> {
    let ev = |event, outcome, detail| Event {
        event,
        who: Some(p.who()),
        service: Some(service),
        delivery: None,
        degraded: false,
        peer: Some(peer),
        outcome,
        detail,
    };
    if !shared.sessions.in_scope(p, service) {
        shared.audit_best_effort(&ev("deny", "denied", Some("outside the agent's scope")));
        return Err(refuse(
            ErrorCode::Forbidden,
            format!(
                "{} may not use service {service:?} (outside its scope)",
                p.label()
            ),
        ));
    }
    // Before the vault is consulted: see `Cache::generation`.
    let generation = shared.cache.generation();
    let resolved = shared
        .resolve(service)
        .map_err(|e| refuse(e.code, e.message))?;
    let Some(resolved) = resolved else {
        shared.audit_best_effort(&ev("deny", "not_found", Some("no such service")));
        return Err(refuse(
            ErrorCode::NotFound,
            format!("no service named {service:?}"),
        ));
    };
    if !resolved.policy.allows(kind) {
        shared.audit_best_effort(&ev("deny", "denied", Some("delivery kind not allowed")));
        return Err(refuse(
            ErrorCode::Forbidden,
            format!(
                "{service:?} may not be delivered as {}; its policy allows: {}",
                kind.as_str(),
                resolved.policy.allowed_kinds()
            ),
        ));
    }
    // High-value services were approved for the whole request before any fetch (see `start`).
    let cache_ttl = Duration::from_secs(resolved.policy.cache_ttl_secs);
    if !cache_ttl.is_zero()
        && let Ok(Some(copy)) = shared.cache.copy(service, shared.page_policy())
    {
        shared
            .audit(&ev("cache_hit", "ok", None))
            .map_err(|e| refuse(ErrorCode::Internal, e))?;
        let mut out = Zeroizing::new(Vec::with_capacity(copy.len()));
        out.extend_from_slice(&copy);
        return Ok(out);
    }
    let plaintext = match shared.fetch_plain(p, service, &resolved).await {
        Ok(p) => p,
        Err(e) => {
            if let Some(detail) = e.audit {
                let outcome = if e.answer.is_some() {
                    "pending"
                } else {
                    "error"
                };
                shared.audit_best_effort(&ev("fetch", outcome, Some(detail)));
            }
            // `pending` from the owner's daemon reaches the caller with its code.
            return Err(e.into_body());
        }
    };
    let note = resolved.fetch_note();
    shared
        .audit(&ev("fetch", "ok", note.as_deref()))
        .map_err(|e| refuse(ErrorCode::Internal, e))?;
    if !cache_ttl.is_zero()
        && let Ok(g) = crate::keys::GuardedPage::new(&plaintext, shared.page_policy())
    {
        shared.cache.insert(service, g, cache_ttl, generation);
    }
    Ok(plaintext)
}

/// Starts a run. `fds` are the caller's stdin, stdout, stderr.
///
/// # Errors
/// The error answer for the caller; nothing was launched.
pub async fn start(
    shared: &Arc<Shared>,
    p: &Principal,
    peer: Peer,
    req: RunRequest,
    fds: Vec<OwnedFd>,
) -> Result<Running, ResponseBody> {
    if fds.len() != 3 {
        return Err(refuse(
            ErrorCode::UnexpectedFd,
            "run takes exactly three fds: stdin, stdout, stderr",
        ));
    }
    if peer.uid != nix::unistd::geteuid().as_raw() {
        return Err(refuse(
            ErrorCode::Forbidden,
            "run starts programs as the daemon's uid; callers of other uids are not supported in this version",
        ));
    }
    validate(&req)?;
    let Some(launcher) = shared.launcher.get().cloned() else {
        return Err(refuse(ErrorCode::Internal, "the launcher is not running"));
    };
    let program = program_name(&req.argv[0]);
    let hash = argv_hash(&req.argv);
    // Proxy mappings: checked before anything is fetched or approved (nothing is fetched for
    // them now: the daemon decides at each request the proxy wants to inject into).
    let proxy_link = if req.proxy.is_empty() {
        None
    } else {
        let Some(link) = shared.proxy.get().cloned() else {
            return Err(refuse(
                ErrorCode::Internal,
                "the credential-injecting proxy is not running ([proxy] enabled = false, or it failed at start; see the daemon log)",
            ));
        };
        Some(link)
    };
    let proxy_mappings = match &proxy_link {
        Some(_) => crate::proxy::check_mappings(shared, p, peer, &req.proxy)
            .map_err(|(code, message)| refuse(code, message))?,
        None => Vec::new(),
    };
    // Registered now (a failure changes nothing); dropped, so unregistered, on any later
    // failure, else when the run has ended.
    let registration = match &proxy_link {
        Some(link) => Some(
            link.register(p, peer, &proxy_mappings)
                .await
                .map_err(|e| refuse(ErrorCode::Internal, e.0))?,
        ),
        None => None,
    };

    // Fetch every secret first: nothing is audited as delivered unless all are available.
    let command = shown_command(&req);
    let bound = request_hash(&req);
    let run = (bound.as_str(), command.as_str());
    // One approval for the whole run: every high-value service it names, under one code, so a
    // run with two of them is not stuck using up one once-grant while asking for the other.
    let mut high: Vec<&str> = Vec::new();
    for svc in req.env.values().chain(req.files.values()) {
        if shared.sessions.in_scope(p, svc)
            && let Some(r) = shared.resolve(svc).map_err(|e| refuse(e.code, e.message))?
            && r.policy.high_value
        {
            high.push(svc);
        }
    }
    high.sort_unstable();
    high.dedup();
    if !high.is_empty() {
        shared.high_value(p, peer, &high.join(","), Some(run))?;
    }
    let mut plain: Vec<(String, String, bool, Zeroizing<Vec<u8>>)> = Vec::new();
    for (var, service) in &req.env {
        plain.push((
            var.clone(),
            service.clone(),
            false,
            fetch(shared, p, peer, service, DeliveryKind::Env).await?,
        ));
    }
    for (var, service) in &req.files {
        plain.push((
            var.clone(),
            service.clone(),
            true,
            fetch(shared, p, peer, service, DeliveryKind::File).await?,
        ));
    }
    // The masker first: a run whose masking tables would not fit its cap or the daemon's
    // budget is refused before anything is delivered.
    let masker = if req.masking {
        let secrets: Vec<&[u8]> = plain.iter().map(|(_, _, _, b)| b.as_slice()).collect();
        match Masker::with_budget(
            &secrets,
            shared.cfg.max_mask_bytes_per_run,
            &shared.mask_budget,
        ) {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                let (code, outcome) = match e {
                    MaskError::OverRunCap { .. } => (ErrorCode::BadRequest, "denied"),
                    MaskError::OverDaemonBudget { .. } => (ErrorCode::Busy, "busy"),
                };
                shared.audit_best_effort(&Event {
                    event: "deny",
                    who: Some(p.who()),
                    service: None,
                    delivery: None,
                    degraded: false,
                    peer: Some(peer),
                    outcome,
                    detail: Some("masking tables over their cap"),
                });
                return Err(refuse(code, e.to_string()));
            }
        }
    } else {
        None
    };
    // Environment secrets in memfd_secret pages (the child maps them); file secrets in sealed,
    // readable memfds (a program must be able to read(2) them).
    let mut pages: Vec<SecretPage> = Vec::with_capacity(plain.len());
    for (_, _, is_file, bytes) in &plain {
        let policy = if *is_file {
            PagePolicy::ForceFallback
        } else {
            shared.page_policy()
        };
        pages.push(
            SecretPage::from_bytes(bytes, policy)
                .map_err(|e| refuse(ErrorCode::Internal, format!("making a secret page: {e}")))?,
        );
    }
    let secret_names: Vec<(String, String, bool)> = plain
        .iter()
        .map(|(v, s, f, _)| (v.clone(), s.clone(), *f))
        .collect();
    drop(plain);

    let mut detail = format!(
        "program={program} argv_sha256={hash} masking={}",
        req.masking
    );
    if !proxy_mappings.is_empty() {
        let m: Vec<String> = proxy_mappings
            .iter()
            .map(|(v, s, _)| format!("{v}:{s}"))
            .collect();
        detail.push_str(&format!(" proxy={}", m.join(",")));
    }
    let start_ev = Event {
        event: "run_start",
        who: Some(p.who()),
        service: None,
        delivery: None,
        degraded: false,
        peer: Some(peer),
        outcome: "ok",
        detail: Some(&detail),
    };
    shared
        .audit(&start_ev)
        .map_err(|e| refuse(ErrorCode::Internal, e))?;
    for ((_, service, is_file), page) in secret_names.iter().zip(&pages) {
        shared
            .audit(&Event {
                event: "deliver",
                who: Some(p.who()),
                service: Some(service),
                delivery: Some(if *is_file { "file" } else { "env" }),
                degraded: page.backing().is_degraded() && !*is_file,
                peer: Some(peer),
                outcome: "ok",
                detail: None,
            })
            .map_err(|e| refuse(ErrorCode::Internal, e))?;
    }

    // stdout/stderr: through the masker, or the caller's own fds.
    let mut fds = fds.into_iter();
    let (stdin, out, err) = (
        fds.next().expect("3 fds"),
        fds.next().expect("3 fds"),
        fds.next().expect("3 fds"),
    );
    let mut pumps = Vec::new();
    let mut stalls = crate::pump::Stalls::none();
    let (child_out, child_err) = match &masker {
        Some(m) => {
            let (r1, w1) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| refuse(ErrorCode::Internal, format!("pipe: {e}")))?;
            let (r2, w2) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| refuse(ErrorCode::Internal, format!("pipe: {e}")))?;
            (pumps, stalls) =
                crate::pump::start((r1, out), (r2, err), m, shared.cfg.output_timeout);
            (w1, w2)
        }
        None => (out, err),
    };
    // The pumps hold the masker now; it goes (and its budget comes back) with the last one.
    drop(masker);
    let proxy_names: &[String] = registration.as_ref().map_or(&[], |r| &r.names);
    let mut env: Vec<String> = req
        .caller_env
        .into_iter()
        .filter(|e| {
            let name = e.split('=').next().unwrap_or("");
            !name.starts_with("AGENTKEYS_TOKEN")
                && !secret_names.iter().any(|(v, _, _)| v == name)
                && !proxy_names.iter().any(|v| v == name)
        })
        .collect();
    if let Some(r) = &registration {
        env.extend(r.env.iter().cloned());
    }
    let (secret_env, files): (Vec<_>, Vec<_>) = secret_names.iter().partition(|(_, _, f)| !*f);
    let jail = shared.sessions.jail_policy(p);
    let spec = LaunchSpec {
        id: 0,
        argv: req.argv,
        env,
        secret_env: secret_env.iter().map(|(v, _, _)| v.clone()).collect(),
        files: files.iter().map(|(v, _, _)| v.clone()).collect(),
        cwd: req.cwd,
        umask: req.umask,
        kill_grace_ms: u64::try_from(shared.cfg.kill_grace.as_millis()).unwrap_or(u64::MAX),
        deadline_ms: None,
        // A jailed session's program is confined by its jail's policy (issue 15).
        confine: jail.as_ref().map(|(policy, _)| policy.clone()),
        confine_userns: jail.as_ref().is_some_and(|(_, ns)| ns.is_some()),
    };
    // Pages in the order the launcher expects: env secrets, then files.
    let mut ordered: Vec<&SecretPage> = Vec::new();
    for want_file in [false, true] {
        for ((_, _, is_file), page) in secret_names.iter().zip(&pages) {
            if *is_file == want_file {
                ordered.push(page);
            }
        }
    }
    let mut send: Vec<BorrowedFd<'_>> = vec![stdin.as_fd(), child_out.as_fd(), child_err.as_fd()];
    send.extend(ordered.iter().map(|p| p.fd()));
    if let Some((_, Some(ns))) = &jail {
        send.push(ns.as_fd());
    }
    // Nothing is launched before its fetch, run_start and deliver records are on disk.
    shared
        .audit_durable(crate::auditor::current_ticket())
        .await
        .map_err(|e| refuse(ErrorCode::Internal, e))?;
    let launched = launcher.launch(spec, &send).await;
    drop(send);
    // The daemon's copies go now, launched or not; the child has mapped (or the launch failed).
    drop((stdin, child_out, child_err));
    for ((_, service, is_file), page) in secret_names.iter().zip(pages) {
        drop(page.into_fd());
        shared.audit_best_effort(&Event {
            event: "drop",
            who: Some(p.who()),
            service: Some(service),
            delivery: Some(if *is_file { "file" } else { "env" }),
            degraded: false,
            peer: Some(peer),
            outcome: "ok",
            detail: None,
        });
    }
    match launched {
        Ok(s) => {
            info!(pid = s.pid, program, principal = ?p, "run started");
            Ok(Running {
                id: s.id,
                pid: s.pid,
                exited: s.exited,
                active: Some(s.active),
                stalls,
                pumps,
                started: Instant::now(),
                program,
                proxy: registration,
            })
        }
        Err(e) => {
            let (code, message) = match e {
                LaunchError::Failed { errno, step } if step == "exec" && errno == nix::errno::Errno::ENOENT as i32 => {
                    (ErrorCode::CommandNotFound, format!("command not found: {program}"))
                }
                LaunchError::Failed { errno, step } if step == "exec" => (
                    ErrorCode::CannotExecute,
                    format!("cannot execute {program}: {}", std::io::Error::from_raw_os_error(errno)),
                ),
                LaunchError::Failed { errno, step } if step == "chdir" => (
                    ErrorCode::BadRequest,
                    format!("cannot change to the working directory: {}", std::io::Error::from_raw_os_error(errno)),
                ),
                LaunchError::Failed { errno, step } if step == "secret" && errno == nix::errno::Errno::EILSEQ as i32 => (
                    ErrorCode::BadRequest,
                    "a secret cannot be put in an environment variable (it contains a NUL byte); use --file".to_string(),
                ),
                LaunchError::Failed { errno, step } if step == "secret" => (
                    ErrorCode::Internal,
                    format!("the program could not map its secret: {}", std::io::Error::from_raw_os_error(errno)),
                ),
                LaunchError::Failed { errno, step } => (
                    ErrorCode::CannotExecute,
                    format!("starting {program} failed at {step}: {}", std::io::Error::from_raw_os_error(errno)),
                ),
                LaunchError::Unavailable(m) => (ErrorCode::Internal, m),
            };
            for p in pumps {
                let _ = p.await;
            }
            shared.audit_best_effort(&Event {
                event: "run_exit",
                who: Some(p.who()),
                service: None,
                delivery: None,
                degraded: false,
                peer: Some(peer),
                outcome: "error",
                detail: Some(&format!("program={program} not started")),
            });
            Err(refuse(code, message))
        }
    }
}

/// Why the daemon stopped a run (for `run_exit`'s detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The caller's agent was revoked.
    Revoked,
    /// The caller's session ended otherwise (expired, or a new owner session).
    SessionEnded,
    /// The caller disconnected.
    CallerGone,
    /// The daemon is shutting down.
    Shutdown,
    /// The caller stopped reading the program's output for `output_timeout`.
    OutputStalled,
}

impl StopReason {
    /// The word in the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Revoked => "revoked",
            StopReason::SessionEnded => "session_ended",
            StopReason::CallerGone => "caller_gone",
            StopReason::Shutdown => "shutdown",
            StopReason::OutputStalled => "output_stalled",
        }
    }
}

/// Waits for the output to drain after the run ended, audits `run_exit`, and returns the
/// answer for the caller. `stopped`: why the daemon asked for the run to stop, if it did.
pub async fn finish(
    shared: &Shared,
    p: &Principal,
    peer: Peer,
    run: Running,
    exit: Option<FromLauncher>,
    stopped: Option<StopReason>,
) -> ResponseBody {
    let (code, signal, end) = match exit {
        Some(FromLauncher::Exited {
            code, signal, end, ..
        }) => (code, signal, end),
        _ => (None, None, RunEnd::default()),
    };
    // The run is over: its placeholders and proxy credential stop working now.
    drop(run.proxy);
    for pump in run.pumps {
        let _ = pump.await;
    }
    let status = match (code, signal) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ if end.lost => "unknown (its supervisor was killed)".into(),
        _ => "unknown (launcher gone)".into(),
    };
    let mut detail = format!(
        "program={} status={status} duration_ms={}",
        run.program,
        run.started.elapsed().as_millis()
    );
    if let Some(r) = stopped {
        detail.push_str(" stopped=");
        detail.push_str(r.as_str());
    }
    if end.leftovers {
        detail.push_str(" leftovers=stopped");
    }
    if stopped.is_some() || end.leftovers || end.lost {
        detail.push_str(if end.killed {
            " sigkill=yes"
        } else {
            " sigkill=no"
        });
    }
    if end.lost {
        detail.push_str(" supervisor=lost");
    }
    if end.unkillable > 0 {
        detail.push_str(&format!(" unkillable={}", end.unkillable));
    }
    let ended = code.is_some() || signal.is_some() || end.lost;
    shared.audit_best_effort(&Event {
        event: "run_exit",
        who: Some(p.who()),
        service: None,
        delivery: None,
        degraded: false,
        peer: Some(peer),
        outcome: if ended { "ok" } else { "error" },
        detail: Some(&detail),
    });
    if !ended {
        return refuse(
            ErrorCode::Internal,
            "the launcher went away while the program ran",
        );
    }
    if code.is_none() && signal.is_none() {
        return refuse(
            ErrorCode::Internal,
            "the program's supervisor was killed; its processes were stopped and its status is unknown",
        );
    }
    ResponseBody::RunExit { code, signal }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(caller_env: &[&str]) -> RunRequest {
        RunRequest {
            argv: vec!["true".into()],
            env: BTreeMap::new(),
            files: BTreeMap::new(),
            proxy: BTreeMap::new(),
            caller_env: caller_env.iter().map(|s| s.to_string()).collect(),
            cwd: Some("/".into()),
            masking: true,
            umask: None,
        }
    }

    fn refusal(r: Result<(), ResponseBody>) -> String {
        match r {
            Err(ResponseBody::Error {
                code: ErrorCode::BadRequest,
                message,
            }) => message,
            Err(_) => "another answer".into(),
            Ok(()) => "accepted".into(),
        }
    }

    #[test]
    fn caller_env_names_must_be_distinct_non_empty_and_assigned() {
        assert!(validate(&req(&["PATH=/bin", "HOME=/root", "EMPTY="])).is_ok());
        for env in [
            &["PATH=/usr/bin", "PATH=/tmp/evil"][..],
            &["PATH=/tmp/evil", "PATH=/usr/bin"][..],
            &["A=1", "B=2", "A=1"][..],
        ] {
            assert!(
                refusal(validate(&req(env))).contains("more than once"),
                "{env:?}"
            );
        }
        assert!(refusal(validate(&req(&["PATH"]))).contains("NAME=value"));
        assert!(refusal(validate(&req(&["=x"]))).contains("empty name"));
        // A value may hold '=' (only the first one splits).
        assert!(validate(&req(&["OPTS=a=b", "X=="])).is_ok());
    }

    #[test]
    fn a_run_needs_an_absolute_cwd_and_a_umask_of_nine_bits() {
        for cwd in [None, Some(""), Some("rel/dir")] {
            let mut r = req(&[]);
            r.cwd = cwd.map(str::to_string);
            assert!(
                refusal(validate(&r)).contains("absolute working directory"),
                "{cwd:?}"
            );
        }
        let mut r = req(&[]);
        r.umask = Some(0o777);
        assert!(validate(&r).is_ok());
        r.umask = Some(0o1000);
        assert!(refusal(validate(&r)).contains("umask"));
    }

    #[test]
    fn the_request_hash_binds_the_umask_and_the_environment() {
        let base = req(&["PATH=/bin"]);
        let mut m022 = req(&["PATH=/bin"]);
        m022.umask = Some(0o022);
        let mut m027 = req(&["PATH=/bin"]);
        m027.umask = Some(0o027);
        let other = req(&["PATH=/tmp"]);
        let hashes = [
            request_hash(&base),
            request_hash(&m022),
            request_hash(&m027),
            request_hash(&other),
        ];
        for i in 0..hashes.len() {
            for j in i + 1..hashes.len() {
                assert_ne!(hashes[i], hashes[j], "{i} {j}");
            }
        }
        assert_eq!(
            request_hash(&m022),
            request_hash(&{
                let mut r = req(&["PATH=/bin"]);
                r.umask = Some(0o022);
                r
            })
        );
    }
}
