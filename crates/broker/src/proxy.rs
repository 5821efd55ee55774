//! The daemon's side of the credential-injecting proxy (`agentkeys-proxy`, a process of its own):
//! the link over a private socketpair, the registrations of runs started with `--proxy`, and
//! the decision on each injection the proxy asks for.
//!
//! A run with `--proxy VAR=SERVICE` gets a [`Registration`]: a random placeholder per variable,
//! a proxy user and password of its own (the proxy holds only the password's hash), and the
//! environment its program needs. For every request the proxy wants to inject into, the daemon
//! checks that the run's session is still valid, the service in its scope, `proxy` delivery
//! allowed and the host named by the service's policy; for a high-value service it needs a
//! grant (see [`Shared::high_value`]); then it writes the `inject` record (durable before the
//! answer: no record, no injection) and answers with the value as a secret page, or tells the
//! proxy to use the copy it holds while the service's `cache_ttl` runs.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use agentkeys_hardening::page::SecretPage;
use agentkeys_proxy::link::{FromProxy, LinkSocket, MAX_LINK_MESSAGE, PlaceholderSpec, ToProxy};
use agentkeys_proxy::rules::new_placeholder;
use agentkeys_state::audit::{Event, Peer};
use agentkeys_state::inject::HostPattern;
use agentkeys_state::vault::DeliveryKind;
use base64::Engine;
use sha2::Digest;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::sessions::Principal;
use crate::shared::Shared;

/// The environment variables that name the proxy (both cases: curl reads only the lower-case
/// `http_proxy`, Go and others the upper case).
pub const PROXY_VARS: [&str; 4] = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"];

/// The variables common clients read a CA bundle from: OpenSSL-based tools, Go and Python's ssl
/// (`SSL_CERT_FILE`), requests (`REQUESTS_CA_BUNDLE`), curl (`CURL_CA_BUNDLE`), git
/// (`GIT_SSL_CAINFO`), Node (`NODE_EXTRA_CA_CERTS`, added to its own roots), pip (`PIP_CERT`),
/// the AWS SDKs (`AWS_CA_BUNDLE`), cargo (`CARGO_HTTP_CAINFO`), Deno (`DENO_CERT`), httplib2.
pub const CA_VARS: [&str; 10] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "AWS_CA_BUNDLE",
    "CARGO_HTTP_CAINFO",
    "DENO_CERT",
    "HTTPLIB2_CA_CERTS",
];

/// Variables removed from a proxied run's environment: a `NO_PROXY` would send requests around
/// the proxy (and their placeholders nowhere useful).
pub const REMOVED_VARS: [&str; 2] = ["NO_PROXY", "no_proxy"];

struct Reg {
    principal: Principal,
    peer: Peer,
    specs: Vec<PlaceholderSpec>,
}

impl Reg {
    /// Its principal, peer and placeholder `index` (if there is one).
    fn info(&self, index: Option<usize>) -> (Principal, Peer, Option<PlaceholderSpec>) {
        (
            self.principal.clone(),
            self.peer,
            index.and_then(|i| self.specs.get(i)).cloned(),
        )
    }
}

/// How long an ended run's registration is kept for the results the proxy tells after the run
/// ended (it batches them: see `DONE_DELAY` in the proxy), and how many such are kept at most.
const ENDED_KEPT: Duration = Duration::from_secs(30);
const ENDED_MAX: usize = 256;

/// The link to the proxy process.
pub struct ProxyLink {
    tx: mpsc::UnboundedSender<(Vec<u8>, Option<OwnedFd>)>,
    /// The socket, for answers sent straight from the task that decided them.
    sock: Arc<LinkSocket>,
    /// The proxy's port on 127.0.0.1 once it said `Ready` (`Some(Err)`: it failed at start).
    ready: tokio::sync::watch::Sender<Option<Result<u16, String>>>,
    /// The CA bundle file programs get.
    pub bundle: PathBuf,
    regs: Mutex<HashMap<u64, Reg>>,
    /// Registrations of runs that ended, newest last: only to record results told late (never
    /// to decide an injection).
    ended: Mutex<std::collections::VecDeque<(u64, Reg, std::time::Instant)>>,
    next_reg: AtomicU64,
    shared: Weak<Shared>,
    /// Wait for the audit sync before each injection (`[proxy] sync_audit`).
    sync_audit: bool,
}

/// A run's use of the proxy: unregistered (its placeholders and credential stop working, the
/// proxy drops its copies and closes its connections) when dropped.
pub struct Registration {
    link: Arc<ProxyLink>,
    /// Registration id.
    pub reg: u64,
    /// `NAME=value` entries for the program's environment: the placeholders, the proxy
    /// variables with this run's credential, the CA bundle variables.
    pub env: Vec<String>,
    /// Every variable name in `env` (the caller's entries of these names are dropped).
    pub names: Vec<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.link.unregister(self.reg);
    }
}

/// Why a mapping cannot go through the proxy, for the caller.
pub struct RegisterError(pub String);

impl ProxyLink {
    /// Takes over the daemon's end of the link (the CA was sent; the proxy says `Ready` or
    /// `Failed` when its start is done, which [`ProxyLink::port`] waits for) and starts its
    /// reader and writer. Must run inside the runtime.
    ///
    /// # Errors
    /// The socket cannot be registered with the runtime.
    pub fn start(
        fd: OwnedFd,
        bundle: PathBuf,
        shared: Weak<Shared>,
        sync_audit: bool,
    ) -> std::io::Result<Arc<ProxyLink>> {
        let sock = Arc::new(LinkSocket::new(fd)?);
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<u8>, Option<OwnedFd>)>();
        let link = Arc::new(ProxyLink {
            tx,
            sock: sock.clone(),
            ready: tokio::sync::watch::Sender::new(None),
            bundle,
            regs: Mutex::new(HashMap::new()),
            ended: Mutex::new(std::collections::VecDeque::new()),
            next_reg: AtomicU64::new(1),
            shared,
            sync_audit,
        });
        let writer = sock.clone();
        tokio::spawn(async move {
            while let Some((bytes, fd)) = rx.recv().await {
                let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
                if let Err(e) = writer.send(&bytes, &fds).await {
                    warn!("sending to the proxy failed: {e}");
                }
            }
        });
        let reader = link.clone();
        tokio::spawn(async move { reader.read(sock).await });
        Ok(link)
    }

    fn send(&self, msg: &ToProxy, fd: Option<OwnedFd>) {
        match serde_json::to_vec(msg) {
            Ok(b) if b.len() <= MAX_LINK_MESSAGE => {
                let _ = self.tx.send((b, fd));
            }
            _ => warn!("a message to the proxy is too large"),
        }
    }

    async fn read(self: Arc<Self>, sock: Arc<LinkSocket>) {
        let mut buf = vec![0u8; MAX_LINK_MESSAGE];
        loop {
            // Descriptors the proxy has no business sending are closed with the message.
            let n = match sock.recv(&mut buf).await {
                Ok(r) if r.truncated => continue,
                Ok(r) if r.len > 0 => r.len,
                _ => break,
            };
            let msg: FromProxy = match serde_json::from_slice(&buf[..n]) {
                Ok(m) => m,
                Err(e) => {
                    warn!("unreadable message from the proxy: {e}");
                    continue;
                }
            };
            match msg {
                FromProxy::Want { .. } => {
                    // Decided right here when it can be (a local or cached value: nothing to
                    // wait for), saving two thread hand-offs per injected request; a request
                    // that must wait (a remote backend) goes on as a task of its own.
                    let mut fut = Box::pin(self.clone().want(msg));
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    if fut.as_mut().poll(&mut cx).is_pending() {
                        tokio::spawn(fut);
                    }
                }
                FromProxy::Done {
                    reg,
                    index,
                    host,
                    method,
                    path,
                    status,
                } => self.audit_done(reg, index, &host, &method, &path, status),
                FromProxy::Refused {
                    reg,
                    index,
                    host,
                    method,
                    path,
                    reason,
                } => self.audit_refused(reg, index, &host, &method, &path, &reason),
                FromProxy::Ready { port } => {
                    info!(port, "the credential-injecting proxy listens on 127.0.0.1");
                    self.ready.send_replace(Some(Ok(port)));
                }
                FromProxy::Failed { step, message } => {
                    warn!("the credential-injecting proxy failed at {step}: {message}");
                    self.ready
                        .send_replace(Some(Err(format!("it failed at {step}: {message}"))));
                }
            }
        }
        warn!("the proxy is gone: `run --proxy` is unavailable until agentkeysd restarts");
        self.ready.send_modify(|r| {
            if !matches!(r, Some(Err(_))) {
                *r = Some(Err("it exited; see the daemon log".into()));
            }
        });
    }

    /// The proxy's port, once it is ready (waits up to 30 s for its start to finish).
    ///
    /// # Errors
    /// Why the proxy is not available.
    pub async fn port(&self) -> Result<u16, String> {
        let mut rx = self.ready.subscribe();
        let got = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| r.is_some()))
            .await
            .map_err(|_| "it did not finish starting within 30 s".to_string())?
            .map_err(|_| "it is gone".to_string())?
            .clone();
        got.unwrap_or_else(|| Err("not started".into()))
    }

    /// Registers a run's `--proxy` mappings (VAR -> service, each already checked against scope
    /// and policy by the caller) and builds its environment.
    ///
    /// # Errors
    /// Randomness failed, or too many mappings.
    pub async fn register(
        self: &Arc<Self>,
        p: &Principal,
        peer: Peer,
        mappings: &[Mapping],
    ) -> Result<Registration, RegisterError> {
        self.register_confined(p, peer, mappings, None).await
    }

    /// [`ProxyLink::register`] for a jail: `allow_hosts` `Some` for `--net proxy` (the hosts
    /// reachable without injection; every other host is refused and audited `deny`).
    ///
    /// # Errors
    /// As [`ProxyLink::register`]; too many allowed hosts.
    pub async fn register_confined(
        self: &Arc<Self>,
        p: &Principal,
        peer: Peer,
        mappings: &[Mapping],
        allow_hosts: Option<Vec<String>>,
    ) -> Result<Registration, RegisterError> {
        // A session of a `--net proxy` jail is confined wherever it registers (its `run`s,
        // the MCP `run` tool): otherwise a run could hand the jail an unconfined proxy
        // credential, and the jail's relay would carry it anywhere.
        let allow_hosts = match allow_hosts {
            Some(a) => Some(a),
            None => self.shared.upgrade().and_then(|s| jail_allow_hosts(&s, p)),
        };
        if allow_hosts
            .as_ref()
            .is_some_and(|a| a.len() > agentkeys_proxy::link::MAX_ALLOW_HOSTS)
        {
            return Err(RegisterError("too many --allow-host hosts".into()));
        }
        let port = self.port().await.map_err(|e| {
            RegisterError(format!(
                "the credential-injecting proxy is not available: {e}"
            ))
        })?;
        if mappings.len() > agentkeys_proxy::link::MAX_PLACEHOLDERS {
            return Err(RegisterError("too many --proxy mappings".into()));
        }
        let rnd = |e: getrandom::Error| RegisterError(format!("randomness: {e}"));
        let mut specs = Vec::with_capacity(mappings.len());
        let mut env = Vec::new();
        let mut names = Vec::new();
        for (var, service, policy) in mappings {
            let placeholder = new_placeholder().map_err(rnd)?;
            env.push(format!("{var}={placeholder}"));
            names.push(var.clone());
            specs.push(PlaceholderSpec {
                placeholder,
                var: var.clone(),
                service: service.clone(),
                hosts: policy.inject_hosts.clone(),
                headers: policy.inject_headers.clone(),
                query: policy.inject_query.clone(),
                cache_ttl_secs: policy.cache_ttl_secs,
            });
        }
        let reg = self.next_reg.fetch_add(1, Ordering::Relaxed);
        let mut pass = [0u8; 24];
        getrandom::fill(&mut pass).map_err(rnd)?;
        let pass = Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pass));
        let user = format!("akrun{reg}");
        let pass_sha256: String = sha2::Sha256::digest(pass.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let url = Zeroizing::new(format!(
            "http://{user}:{}@127.0.0.1:{}",
            pass.as_str(),
            port
        ));
        for v in PROXY_VARS {
            env.push(format!("{v}={}", url.as_str()));
            names.push(v.into());
        }
        let bundle = self.bundle.display().to_string();
        for v in CA_VARS {
            env.push(format!("{v}={bundle}"));
            names.push(v.into());
        }
        names.extend(REMOVED_VARS.iter().map(|s| s.to_string()));
        self.regs.lock().expect("proxy regs").insert(
            reg,
            Reg {
                principal: p.clone(),
                peer,
                specs: specs.clone(),
            },
        );
        self.send(
            &ToProxy::Register {
                reg,
                user,
                pass_sha256,
                placeholders: specs,
                allow_hosts,
            },
            None,
        );
        Ok(Registration {
            link: self.clone(),
            reg,
            env,
            names,
        })
    }

    fn unregister(&self, reg: u64) {
        let gone = self.regs.lock().expect("proxy regs").remove(&reg);
        if let Some(r) = gone {
            let mut ended = self.ended.lock().expect("proxy ended regs");
            let now = std::time::Instant::now();
            while ended
                .front()
                .is_some_and(|(_, _, at)| now.duration_since(*at) > ENDED_KEPT)
                || ended.len() >= ENDED_MAX
            {
                ended.pop_front();
            }
            ended.push_back((reg, r, now));
        }
        self.send(&ToProxy::Unregister { reg }, None);
    }

    /// Who a registration was for and its placeholder `index`, also for a run that ended
    /// meanwhile (to record what the proxy tells of its requests after the end).
    fn reg_info_any(
        &self,
        reg: u64,
        index: Option<usize>,
    ) -> Option<(Principal, Peer, Option<PlaceholderSpec>)> {
        if let Some(r) = self.regs.lock().expect("proxy regs").get(&reg) {
            return Some(r.info(index));
        }
        let ended = self.ended.lock().expect("proxy ended regs");
        ended
            .iter()
            .find(|(id, _, _)| *id == reg)
            .map(|(_, r, _)| r.info(index))
    }

    /// Sends the answer to a `Want` from the task that decided it.
    async fn answer(&self, id: u64, result: Result<Option<OwnedFd>, (u16, String)>) {
        let (msg, fd) = match result {
            Ok(fd) => (
                ToProxy::Answer {
                    id,
                    ok: true,
                    status: 0,
                    reason: String::new(),
                },
                fd,
            ),
            Err((status, reason)) => (
                ToProxy::Answer {
                    id,
                    ok: false,
                    status,
                    reason,
                },
                None,
            ),
        };
        let Ok(bytes) = serde_json::to_vec(&msg) else {
            return;
        };
        let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
        let r = self.sock.send(&bytes, &fds).await;
        if let Err(e) = r {
            warn!("answering the proxy failed: {e}");
        }
    }

    async fn want(self: Arc<Self>, msg: FromProxy) {
        let FromProxy::Want {
            id,
            reg,
            index,
            host,
            port,
            method,
            path,
            cached,
        } = msg
        else {
            return;
        };
        let Some(shared) = self.shared.upgrade() else {
            return self
                .answer(id, Err((503, "the daemon is stopping".into())))
                .await;
        };
        let w = Want {
            reg,
            index,
            host: &host,
            port,
            method: &method,
            path: &path,
            cached,
        };
        if !self.sync_audit {
            // The inject record is written before the value leaves (a write error refuses);
            // the syncer puts it on disk within LAZY_SYNC.
            let result = decide(&shared, &self, w, false).await;
            return self.answer(id, result).await;
        }
        let (result, ticket) = crate::auditor::collect_async(decide(&shared, &self, w, true)).await;
        // `sync_audit`: the inject record is on disk before the value leaves.
        let result = match (result, shared.audit_durable(ticket).await) {
            (Ok(fd), Ok(())) => Ok(fd),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err((503, e)),
        };
        self.answer(id, result).await;
    }

    /// Who a live registration is for and its placeholder `index` (what a decision reads: never
    /// an ended run's).
    fn reg_info(&self, reg: u64, index: usize) -> Option<(Principal, Peer, PlaceholderSpec)> {
        let regs = self.regs.lock().expect("proxy regs");
        let (p, peer, spec) = regs.get(&reg)?.info(Some(index));
        Some((p, peer, spec?))
    }

    fn audit_done(
        &self,
        reg: u64,
        index: usize,
        host: &str,
        method: &str,
        path: &str,
        status: u16,
    ) {
        let (Some(shared), Some((p, peer, Some(spec)))) =
            (self.shared.upgrade(), self.reg_info_any(reg, Some(index)))
        else {
            return;
        };
        let detail = format!(
            "var={} host={} method={} path={} status={status}",
            spec.var,
            clip(host, 256),
            clip(method, 16),
            clip(path, 256)
        );
        shared.audit_best_effort(&Event {
            event: "inject_result",
            who: Some(p.who()),
            service: Some(&spec.service),
            delivery: Some("proxy"),
            degraded: false,
            peer: Some(peer),
            outcome: if status == 0 { "error" } else { "ok" },
            detail: Some(&detail),
        });
    }

    fn audit_refused(
        &self,
        reg: u64,
        index: Option<usize>,
        host: &str,
        method: &str,
        path: &str,
        reason: &str,
    ) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let Some((p, peer, spec)) = self.reg_info_any(reg, index) else {
            return;
        };
        let service = spec.map(|s| s.service);
        let detail = format!(
            "proxy refused: host={} method={} path={}: {}",
            clip(host, 256),
            clip(method, 16),
            clip(path, 256),
            clip(reason, 300)
        );
        shared.audit_best_effort(&Event {
            event: "deny",
            who: Some(p.who()),
            service: service.as_deref(),
            delivery: Some("proxy"),
            degraded: false,
            peer: Some(peer),
            outcome: "denied",
            detail: Some(&detail),
        });
    }
}

/// The `--allow-host` list of `p`'s jail when it is a `--net proxy` jail (an unreadable policy
/// confines to nothing allowed); `None` outside a jail or with the host's network.
fn jail_allow_hosts(shared: &Shared, p: &Principal) -> Option<Vec<String>> {
    let (policy, _) = shared.sessions.jail_policy(p)?;
    match agentkeys_jail::JailPolicy::from_json(&policy) {
        Ok(jp) => match jp.network {
            agentkeys_jail::policy::Network::Proxy { allow_hosts } => Some(allow_hosts),
            agentkeys_jail::policy::Network::Host => None,
        },
        Err(_) => Some(Vec::new()),
    }
}

fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

struct Want<'a> {
    reg: u64,
    index: usize,
    host: &'a str,
    port: u16,
    method: &'a str,
    path: &'a str,
    cached: bool,
}

/// Whether the value may be injected into this request, and the value (`None`: use the copy
/// the proxy holds). Every refusal is audited `deny`; an allowed injection `inject`.
async fn decide(
    shared: &Shared,
    link: &ProxyLink,
    w: Want<'_>,
    durable: bool,
) -> Result<Option<OwnedFd>, (u16, String)> {
    let Some((p, peer, spec)) = link.reg_info(w.reg, w.index) else {
        return Err((403, "this run has ended".into()));
    };
    let service = spec.service.as_str();
    let target = format!(
        "var={} host={} method={} path={}",
        spec.var,
        clip(w.host, 256),
        clip(w.method, 16),
        clip(w.path, 256)
    );
    let deny = |why: &str| {
        shared.audit_best_effort(&Event {
            event: "deny",
            who: Some(p.who()),
            service: Some(service),
            delivery: Some("proxy"),
            degraded: false,
            peer: Some(peer),
            outcome: "denied",
            detail: Some(&format!("{target}: {why}")),
        });
    };
    if let Err(e) = shared.sessions.check(&p, None) {
        deny("session ended");
        return Err((403, format!("the run's session has ended: {e}")));
    }
    if !shared.sessions.in_scope(&p, service) {
        deny("outside the agent's scope");
        return Err((403, format!("{service:?} is outside the agent's scope")));
    }
    let resolved = match shared.resolve(service) {
        Ok(Some(r)) => r,
        Ok(None) => {
            deny("no such service");
            return Err((403, format!("no service named {service:?}")));
        }
        Err(e) => return Err((502, e.message)),
    };
    let policy = resolved.policy.clone();
    if !policy.allows(DeliveryKind::Proxy) {
        deny("proxy delivery not allowed");
        return Err((
            403,
            format!(
                "{service:?} may not be used through the proxy; its policy allows: {}",
                policy.allowed_kinds()
            ),
        ));
    }
    // The policy as it is now, not as it was when the run started.
    let host_ok = policy
        .inject_hosts
        .iter()
        .filter_map(|h| HostPattern::parse(h).ok())
        .any(|h| h.matches(w.host, w.port));
    if !host_ok {
        deny("host not named by the service's policy");
        return Err((
            403,
            format!("{service:?} may not be sent to {}", clip(w.host, 256)),
        ));
    }
    if policy.high_value {
        // Bound to the session, the service, the host, the method and the path.
        let bound = proxy_request_hash(w.host, w.port, w.method, w.path);
        let shown = format!(
            "proxy: {} https://{}{}{}",
            clip(w.method, 16),
            clip(w.host, 256),
            if w.port == 443 {
                String::new()
            } else {
                format!(":{}", w.port)
            },
            clip(w.path, 256)
        );
        let subject = crate::approvals::Subject {
            principal: p.clone(),
            service: service.to_string(),
            argv: Some(bound),
            wider: Some(proxy_host_hash(w.host, w.port)),
        };
        if let Err(body) = shared.high_value_subject(&p, peer, service, subject, Some(&shown)) {
            return Err(match body {
                agentkeys_proto::wire::ResponseBody::Pending { message, .. } => {
                    (403, format!("approval required: {message}"))
                }
                agentkeys_proto::wire::ResponseBody::Error { message, .. } => (403, message),
                _ => (403, "refused".into()),
            });
        }
    }
    let cache_ttl = Duration::from_secs(policy.cache_ttl_secs);
    let record = |detail: &str| {
        let ev = Event {
            event: "inject",
            who: Some(p.who()),
            service: Some(service),
            delivery: Some("proxy"),
            degraded: false,
            peer: Some(peer),
            outcome: "ok",
            detail: Some(detail),
        };
        if durable {
            shared.audit(&ev)
        } else {
            shared.audit_written(&ev)
        }
        .map_err(|e| (503, e))
    };
    if w.cached && !cache_ttl.is_zero() {
        record(&format!("{target} value=proxy_copy"))?;
        return Ok(None);
    }
    let plaintext: Zeroizing<Vec<u8>> = if let Ok(Some(copy)) = (!cache_ttl.is_zero())
        .then(|| shared.cache.copy(service, shared.page_policy()))
        .transpose()
        .map(Option::flatten)
    {
        let mut out = Zeroizing::new(Vec::with_capacity(copy.len()));
        out.extend_from_slice(&copy);
        out
    } else {
        match shared.fetch_plain(&p, service, &resolved).await {
            Ok(v) => v,
            Err(e) => {
                if let Some(detail) = e.audit {
                    deny(detail);
                }
                return Err((502, e.message));
            }
        }
    };
    let page = SecretPage::from_bytes(&plaintext, shared.page_policy())
        .map_err(|e| (502, format!("making a secret page: {e}")))?;
    drop(plaintext);
    record(&target)?;
    debug!(service, host = w.host, "injecting");
    Ok(Some(page.into_fd()))
}

/// SHA-256 of what a proxy once-grant binds besides session and service: host, port, method
/// and path (without the query).
pub fn proxy_request_hash(host: &str, port: u16, method: &str, path: &str) -> String {
    let mut h = sha2::Sha256::new();
    for part in ["proxy", host, &port.to_string(), method, path] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of what a proxy window grant (`approve --for`) binds besides session and service:
/// the host and port.
pub fn proxy_host_hash(host: &str, port: u16) -> String {
    let mut h = sha2::Sha256::new();
    for part in ["proxy-host", host, &port.to_string()] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// One checked `--proxy` mapping: variable, service, the service's policy.
pub type Mapping = (String, String, agentkeys_state::vault::Policy);

/// Checks a run's `--proxy` mappings and returns each with its policy: the service in scope,
/// known, and allowing `proxy` delivery. Refusals are audited `deny` and say which kinds the
/// policy allows.
///
/// # Errors
/// The answer for the caller.
pub fn check_mappings(
    shared: &Shared,
    p: &Principal,
    peer: Peer,
    proxy: &BTreeMap<String, String>,
) -> Result<Vec<Mapping>, (agentkeys_proto::wire::ErrorCode, String)> {
    use agentkeys_proto::wire::ErrorCode;
    let mut out = Vec::new();
    for (var, service) in proxy {
        let deny = |why: &str| {
            shared.audit_best_effort(&Event {
                event: "deny",
                who: Some(p.who()),
                service: Some(service),
                delivery: Some("proxy"),
                degraded: false,
                peer: Some(peer),
                outcome: "denied",
                detail: Some(why),
            })
        };
        if !shared.sessions.in_scope(p, service) {
            deny("outside the agent's scope");
            return Err((
                ErrorCode::Forbidden,
                format!(
                    "{} may not use service {service:?} (outside its scope)",
                    p.label()
                ),
            ));
        }
        let resolved = shared.resolve(service).map_err(|e| (e.code, e.message))?;
        let Some(r) = resolved else {
            deny("no such service");
            return Err((ErrorCode::NotFound, format!("no service named {service:?}")));
        };
        if !r.policy.allows(DeliveryKind::Proxy) {
            deny("proxy delivery not allowed");
            let hint = if r.policy.inject_hosts.is_empty() {
                " (store it with --inject-host HOST to name where the proxy may send it)"
            } else {
                ""
            };
            return Err((
                ErrorCode::Forbidden,
                format!(
                    "{service:?} may not be used through the proxy; its policy allows: {}{hint}",
                    r.policy.allowed_kinds()
                ),
            ));
        }
        out.push((var.clone(), service.clone(), r.policy.clone()));
    }
    info!(count = out.len(), "proxy mappings checked");
    Ok(out)
}

/// What the proxy process needs from `[proxy]`, read before it is forked.
///
/// # Errors
/// `proxy.listen` is not an address, or `proxy.upstream_ca_file` cannot be read.
pub fn setup(
    cfg: &crate::config::ProxyConfig,
    home: &std::path::Path,
) -> Result<agentkeys_proxy::Setup, String> {
    let listen = cfg
        .listen
        .parse()
        .map_err(|_| "proxy.listen: not IP:PORT".to_string())?;
    let upstream_ca_pem = match &cfg.upstream_ca_file {
        Some(p) => Some(read_bounded(p).map_err(|e| format!("proxy.upstream_ca_file: {e}"))?),
        None => None,
    };
    Ok(agentkeys_proxy::Setup {
        listen,
        upstream_ca_pem,
        bundle_home: home.to_path_buf(),
        system_ca_file: cfg.system_ca_file.clone(),
    })
}

fn read_bounded(p: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut out = Vec::new();
    f.take(agentkeys_state::proxy_ca::MAX_SYSTEM_ROOTS + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    if out.len() as u64 > agentkeys_state::proxy_ca::MAX_SYSTEM_ROOTS {
        return Err(format!("{}: larger than 4 MiB", p.display()));
    }
    Ok(out)
}

/// The proxy, set up: the daemon's end of its link, its port, the bundle file.
pub struct ProxyReady {
    /// The link.
    pub sock: OwnedFd,
    /// The CA bundle file programs get.
    pub bundle: PathBuf,
    /// `[proxy] sync_audit`.
    pub sync_audit: bool,
}

/// At start, before the sandbox: loads the proxy's CA (creating it the first time) and hands it
/// to the proxy (the key as a secret page); the proxy then finishes its start on its own.
///
/// # Errors
/// A message naming the step.
pub fn hand_over_ca(
    home: &agentkeys_state::home::Home,
    key: &crate::keys::KeyPage,
    install_id: &str,
    cfg: &crate::config::ProxyConfig,
    policy: agentkeys_hardening::page::PagePolicy,
    helper: agentkeys_hardening::helper::Helper,
) -> Result<ProxyReady, String> {
    use agentkeys_state::proxy_ca;
    let loaded = key
        .with_key(|k| proxy_ca::load(home, k))
        .map_err(|e| format!("loading the proxy CA: {e}"))?;
    let ca = match loaded {
        Some(ca) => ca,
        None => {
            let name = format!("agentkeys proxy CA {}", clip(install_id, 64));
            let (der, pem, pkcs8) = agentkeys_proxy::ca::generate_ca(&name)
                .map_err(|e| format!("creating the proxy CA: {e}"))?;
            let ca = proxy_ca::ProxyCa {
                name,
                cert_der: der,
                key: pkcs8,
            };
            key.with_key(|k| proxy_ca::store(home, k, &ca, &pem))
                .map_err(|e| format!("storing the proxy CA: {e}"))?;
            info!("created the proxy CA ({})", proxy_ca::CA_FILE);
            ca
        }
    };
    // The bundle file is written by the proxy itself, before its filter (see
    // `agentkeys_proxy::Setup::bundle_home`): the daemon never reads the system roots.
    let page = SecretPage::from_bytes(&ca.key, policy)
        .map_err(|e| format!("a secret page for the CA key: {e}"))?;
    drop(ca.key);
    // Handed over, not wiped: the page is the proxy's memory too, and wiping it now could zero
    // it before the proxy reads it (the kernel zeroes memfd_secret pages when both let go).
    let page = page.into_fd();
    agentkeys_hardening::launcher::send_msg(
        helper.sock.as_fd(),
        &ToProxy::Init {
            ca_cert_der_b64: base64::engine::general_purpose::STANDARD.encode(&ca.cert_der),
            ca_name: ca.name,
        },
        &[page.as_fd()],
    )
    .map_err(|e| {
        // A proxy that failed before it took the CA said why, then exited.
        let mut buf = vec![0u8; MAX_LINK_MESSAGE];
        match agentkeys_hardening::launcher::recv_msg::<FromProxy>(helper.sock.as_fd(), &mut buf) {
            Ok(Some((FromProxy::Failed { step, message }, _))) => {
                format!("the proxy failed at {step}: {message}")
            }
            _ => format!("sending the CA to the proxy: {e}"),
        }
    })?;
    drop(page);
    // Its `Ready` (or `Failed`) is read by the link once the runtime runs: the daemon does not
    // wait for the proxy's start (loading the trust roots, writing the bundle).
    Ok(ProxyReady {
        sock: helper.sock,
        bundle: home.path(proxy_ca::BUNDLE_FILE),
        sync_audit: cfg.sync_audit,
    })
}
