//! The proxy itself: accept, authenticate (`Proxy-Authorization`, 407 otherwise), then
//!
//! - `CONNECT host:port` to a host some placeholder of the run may go to: TLS terminated with a
//!   leaf for exactly that host (a different SNI fails the handshake), each request inside
//!   checked (`Host` must name the tunnel's host), judged by [`crate::rules`], the value asked
//!   for from the daemon and substituted, the request sent on over a TLS connection verified
//!   against the upstream roots, the answer masked for the value;
//! - `CONNECT` to any other host: tunnelled byte for byte (the client talks TLS with the real
//!   server: pinning and client certificates work);
//! - a plain-http request (absolute URI): forwarded, but refused if it carries a placeholder.
//!
//! Bounds: [`MAX_UNAUTHENTICATED`] connections without a run's credential (the oldest closed
//! for a new one; each must authenticate within [`AUTH_TIMEOUT`]), [`MAX_CONNECTIONS`]
//! authenticated ones at once, request heads of at most [`MAX_HEAD`] bytes read within
//! [`HEAD_TIMEOUT`], TLS handshakes within [`HANDSHAKE_TIMEOUT`], upstream connects within
//! [`CONNECT_TIMEOUT`], the daemon's answer within [`ANSWER_TIMEOUT`]. A run's connections
//! close when its registration goes.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use agentkeys_hardening::page::MappedSecret;
use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::Digest;
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::ca::Minter;
use crate::link::{
    FromProxy, LinkSocket, MAX_ALLOW_HOSTS, MAX_LINK_MESSAGE, MAX_PLACEHOLDERS, Received, ToProxy,
};
use crate::rules::{Rules, Verdict, shown_host};

/// Most authenticated client connections at once (before a `CONNECT` is answered; tunnels and
/// decrypted connections are a run's own).
pub const MAX_CONNECTIONS: usize = 512;
/// Most connections that have not yet shown a run's credential. Any local user can connect to
/// the loopback port: past this, the oldest such connection is closed for the new one, so idle
/// or trickling connections cannot lock the runs out.
pub const MAX_UNAUTHENTICATED: usize = 64;
/// A connection must show a run's credential within this.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// A request head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A TLS handshake (client or upstream) must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An upstream TCP connect must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The daemon must answer a value request within this.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = BoxBody<Bytes, BoxError>;
type ReqBody = BoxBody<Bytes, BoxError>;

/// The daemon's answer to a `Want`: allowed, status, reason, the value's page.
type Answer = (bool, u16, String, Option<OwnedFd>);

/// An upstream connection: HTTP/1.1, or HTTP/2 when the server chose it by ALPN.
enum UpSender {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

impl UpSender {
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            UpSender::H1(s) => s.ready().await,
            UpSender::H2(s) => s.ready().await,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            UpSender::H1(s) => s.is_closed(),
            UpSender::H2(s) => s.is_closed(),
        }
    }

    /// Sends `req`, shaped for the connection's protocol: HTTP/2 gets an absolute URI
    /// (`:scheme`, `:authority`) and no `Host`; HTTP/1.1 an origin-form URI and a `Host`.
    async fn send(
        &mut self,
        mut req: Request<ReqBody>,
        host: &str,
        port: u16,
    ) -> Result<Response<Incoming>, hyper::Error> {
        let authority = authority_of(host, port);
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        match self {
            UpSender::H1(s) => {
                if let Ok(u) = pq.parse() {
                    *req.uri_mut() = u;
                }
                // Exactly one Host, the connection's (checked to be what the client named).
                if let Ok(v) = HeaderValue::from_str(&authority) {
                    req.headers_mut().insert(hyper::header::HOST, v);
                }
                *req.version_mut() = hyper::Version::HTTP_11;
                s.send_request(req).await
            }
            UpSender::H2(s) => {
                if let Ok(u) = format!("https://{authority}{pq}").parse() {
                    *req.uri_mut() = u;
                }
                req.headers_mut().remove(hyper::header::HOST);
                *req.version_mut() = hyper::Version::HTTP_2;
                s.send_request(req).await
            }
        }
    }
}

/// `host:port` for a URI or `Host` header (IPv6 in brackets, port 443 left out).
fn authority_of(host: &str, port: u16) -> String {
    let h = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    if port == 443 {
        h
    } else {
        format!("{h}:{port}")
    }
}

/// A kept upstream connection of one decrypted client connection.
type Upstream = Arc<tokio::sync::Mutex<Option<UpSender>>>;

/// A run's registration.
struct Registration {
    reg: u64,
    pass_sha256: [u8; 32],
    rules: Rules,
    /// A `--net proxy` jail's hosts reachable without injection; `Some`: nothing else is.
    allow: Option<Vec<agentkeys_state::inject::HostPattern>>,
    /// Values handed over, kept for the service's `cache_ttl`.
    cache: Mutex<HashMap<usize, (Arc<MappedSecret>, Instant)>>,
    /// Becomes true when the registration goes: its connections close.
    gone: watch::Sender<bool>,
}

/// The proxy's shared state.
pub struct Proxy {
    minter: Minter,
    /// Upstream TLS offering h2 and http/1.1.
    upstream_tls: Arc<rustls::ClientConfig>,
    /// The same offering http/1.1 only (for upgrades).
    upstream_tls_h1: Arc<rustls::ClientConfig>,
    regs: RwLock<HashMap<u64, Arc<Registration>>>,
    users: RwLock<HashMap<String, u64>>,
    link: LinkSocket,
    next_id: AtomicU64,
    waiters: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    /// Room for the messages a request reads while it waits for its answer on the proxy's
    /// thread (see [`ANSWER_SPIN`]).
    spin_buf: Mutex<Vec<u8>>,
    /// Requests being answered (between their head and their response's head).
    in_flight: AtomicUsize,
    conns: Arc<Semaphore>,
    /// Connections not authenticated yet, oldest first (at most [`MAX_UNAUTHENTICATED`]).
    unauthenticated: Mutex<VecDeque<Arc<Gate>>>,
    /// TLS server configurations of decrypted hosts, with the leaf each was built for.
    server_cfgs: Mutex<ServerConfigs>,
    /// Results of injected requests not told to the daemon yet (encoded `Done` messages): they
    /// go together, [`DONE_DELAY`] after the first of them.
    done_queue: Mutex<Vec<Vec<u8>>>,
    /// A flush of `done_queue` is scheduled.
    done_armed: AtomicBool,
}

/// Longest a request waits for the daemon's answer on the proxy's thread (reading the link
/// itself, yielding the CPU between looks) before it waits as a task, when it is the only
/// request in flight. A proxy that sleeps as soon as it has asked sleeps through most of the
/// answer's time (a few tens of microseconds), and waking it costs as much again where an idle
/// CPU halts (a virtual machine's vCPU): the requests client's keep-alive GET through the proxy
/// went from 1.44-1.49 times direct to 1.34-1.38 in three A/B pairs (docs/performance.md).
/// With other requests in flight the proxy has their work to do and does not wait like this.
const ANSWER_SPIN: Duration = Duration::from_micros(100);

/// Longest the result of an injected request waits to be told to the daemon. Telling each
/// result on its own woke the daemon a second time per injected request. Sending the waiting
/// results right behind the next question saved that wake-up but put their records on the
/// question's path: the daemon, woken on the proxy's CPU, wrote them before it slept and the
/// proxy went on (p50 through the proxy 2-4% higher than with this timer alone). So they go
/// in one batch, off any request's path. What this costs: an `inject_result` record lands up
/// to this much later (after the run's end too: the daemon keeps an ended run's registration
/// for such late results), and a proxy killed in that window loses the results it held (its
/// `inject` records were written before the values left).
const DONE_DELAY: Duration = Duration::from_millis(5);

/// One request counted in [`Proxy::in_flight`] while it lives.
struct InFlight(Arc<Proxy>);

impl InFlight {
    fn enter(p: &Arc<Proxy>) -> InFlight {
        p.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(p.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Host -> (leaf, TLS server configuration serving it).
type ServerConfigs = HashMap<String, (Arc<CertifiedKey>, Arc<rustls::ServerConfig>)>;

/// Most TLS server configurations kept (one per decrypted host; past it they are built anew).
const MAX_SERVER_CONFIGS: usize = 1024;

/// One client connection's admission: unauthenticated until its first request with a run's
/// credential, then holding one of [`MAX_CONNECTIONS`] permits.
struct Gate {
    /// Closes the connection (it was the oldest unauthenticated one when the list was full).
    evict: Notify,
    authenticated: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

fn full(status: StatusCode, msg: impl Into<String>) -> Response<RespBody> {
    let mut text = msg.into();
    text.push('\n');
    let mut r = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn path_only(uri: &Uri) -> String {
    let p = uri.path();
    let cut: String = p.chars().take(256).collect();
    if cut.is_empty() { "/".into() } else { cut }
}

/// `host:port` of an authority; `default_port` when it has none.
fn split_authority(a: &str, default_port: u16) -> Option<(String, u16)> {
    if a.is_empty() || a.len() > 300 {
        return None;
    }
    let (h, p) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let p = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        (h.to_string(), p)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (a.to_string(), default_port),
        }
    };
    if h.is_empty() || p == 0 {
        return None;
    }
    Some((h.trim_end_matches('.').to_ascii_lowercase(), p))
}

/// Whether every authority `req` names is `host:port`, and it names one: at most one `Host`
/// header, and the URI's authority (absolute form, HTTP/2 `:authority`) the same host when both
/// are there.
fn names_only(req: &Request<Incoming>, host: &str, port: u16) -> bool {
    let is_it = |a: &str| split_authority(a, 443).is_some_and(|(h, p)| h == host && p == port);
    let mut hosts = req.headers().get_all(hyper::header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return false;
    }
    let by_header = match first {
        Some(v) => match v.to_str() {
            Ok(t) if is_it(t) => true,
            _ => return false,
        },
        None => false,
    };
    let by_uri = match req.uri().authority() {
        Some(a) if is_it(a.as_str()) => true,
        Some(_) => return false,
        None => false,
    };
    by_header || by_uri
}

/// The certificate resolver of one decrypted connection: the leaf of the CONNECT host, and no
/// certificate at all (a failed handshake) for an SNI naming another host.
#[derive(Debug)]
struct OneHost {
    host: String,
    leaf: Arc<CertifiedKey>,
}

impl ResolvesServerCert for OneHost {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(sni) if !sni.trim_end_matches('.').eq_ignore_ascii_case(&self.host) => None,
            _ => Some(self.leaf.clone()),
        }
    }
}

impl Proxy {
    /// Builds the proxy around its daemon link and CA.
    pub fn new(
        minter: Minter,
        upstream_tls: Arc<rustls::ClientConfig>,
        link: LinkSocket,
    ) -> Arc<Proxy> {
        let mut h2 = (*upstream_tls).clone();
        h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut h1 = (*upstream_tls).clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(Proxy {
            minter,
            upstream_tls: Arc::new(h2),
            upstream_tls_h1: Arc::new(h1),
            regs: RwLock::new(HashMap::new()),
            users: RwLock::new(HashMap::new()),
            link,
            next_id: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
            spin_buf: Mutex::new(vec![0u8; MAX_LINK_MESSAGE]),
            in_flight: AtomicUsize::new(0),
            conns: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            unauthenticated: Mutex::new(VecDeque::new()),
            server_cfgs: Mutex::new(HashMap::new()),
            done_queue: Mutex::new(Vec::new()),
            done_armed: AtomicBool::new(false),
        })
    }

    /// Serves until the daemon link closes (the daemon is gone).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let reader = self.clone();
        let mut link_task = tokio::spawn(async move { reader.read_link().await });
        loop {
            tokio::select! {
                _ = &mut link_task => {
                    info!("the daemon link closed: the proxy stops");
                    return;
                }
                a = listener.accept() => match a {
                    Ok((tcp, _)) => {
                        let gate = self.admit();
                        let this = self.clone();
                        tokio::spawn(async move {
                            let _ = tcp.set_nodelay(true);
                            this.serve_client(tcp, gate).await;
                        });
                    }
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    async fn read_link(&self) {
        let mut buf = vec![0u8; MAX_LINK_MESSAGE];
        while let Ok(r) = self.link.recv(&mut buf).await {
            if !self.take_packet(r, &buf) {
                break;
            }
        }
        // Every waiting request fails closed.
        self.waiters.lock().expect("waiters").clear();
    }

    /// Handles one packet read from the link, by its reader task or by a request waiting for
    /// its answer ([`Proxy::answer_soon`]). `false`: the daemon's end is closed.
    fn take_packet(&self, r: Received, buf: &[u8]) -> bool {
        // A message cut short (or with more descriptors than any message has) is not read as a
        // shorter one; its descriptors are closed.
        if r.truncated {
            return true;
        }
        if r.len == 0 && r.fds.is_empty() {
            return false;
        }
        match serde_json::from_slice::<ToProxy>(&buf[..r.len]) {
            Ok(msg) => self.on_message(msg, r.fds),
            Err(e) => warn!("unreadable message from the daemon: {e}"),
        }
        true
    }

    fn on_message(&self, msg: ToProxy, mut fds: Vec<OwnedFd>) {
        match msg {
            ToProxy::Register {
                reg,
                user,
                pass_sha256,
                placeholders,
                allow_hosts,
            } => {
                let mut hash = [0u8; 32];
                let ok = pass_sha256.len() == 64
                    && pass_sha256.is_ascii()
                    && (0..32).all(|i| {
                        u8::from_str_radix(&pass_sha256[2 * i..2 * i + 2], 16)
                            .map(|b| hash[i] = b)
                            .is_ok()
                    });
                if !ok
                    || placeholders.len() > MAX_PLACEHOLDERS
                    || user.len() > 64
                    || allow_hosts
                        .as_ref()
                        .is_some_and(|a| a.len() > MAX_ALLOW_HOSTS)
                {
                    warn!(reg, "refusing a malformed registration");
                    return;
                }
                // A pattern that does not parse fails closed: the registration is refused
                // (its program's requests get 407), never widened.
                let allow = match allow_hosts
                    .map(|a| {
                        a.iter()
                            .map(|h| agentkeys_state::inject::HostPattern::parse(h))
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()
                {
                    Ok(a) => a,
                    Err(_) => {
                        warn!(reg, "refusing a registration with a malformed allowed host");
                        return;
                    }
                };
                let r = Arc::new(Registration {
                    reg,
                    pass_sha256: hash,
                    rules: Rules::new(placeholders),
                    allow,
                    cache: Mutex::new(HashMap::new()),
                    gone: watch::Sender::new(false),
                });
                self.regs.write().expect("regs").insert(reg, r);
                self.users.write().expect("users").insert(user, reg);
                debug!(reg, "registered");
            }
            ToProxy::Unregister { reg } => {
                self.users.write().expect("users").retain(|_, r| *r != reg);
                if let Some(r) = self.regs.write().expect("regs").remove(&reg) {
                    r.cache.lock().expect("cache").clear();
                    r.gone.send_replace(true);
                }
                debug!(reg, "unregistered");
            }
            ToProxy::Answer {
                id,
                ok,
                status,
                reason,
            } => {
                if let Some(tx) = self.waiters.lock().expect("waiters").remove(&id) {
                    let _ = tx.send((ok, status, reason, fds.pop()));
                }
            }
            ToProxy::Init { .. } => warn!("a second Init is ignored"),
        }
    }

    async fn tell(&self, msg: &FromProxy) {
        if let Some(bytes) = encode(msg) {
            self.send_encoded(&bytes).await;
        }
    }

    async fn send_encoded(&self, bytes: &[u8]) {
        if let Err(e) = self.link.send(bytes, &[]).await {
            warn!("telling the daemon failed: {e}");
        }
    }

    /// The registration whose credential the request carries.
    fn authenticate(&self, req: &Request<Incoming>) -> Option<Arc<Registration>> {
        let v = req.headers().get(hyper::header::PROXY_AUTHORIZATION)?;
        let raw = v.as_bytes();
        if raw.len() < 6 || !raw[..6].eq_ignore_ascii_case(b"basic ") || raw.len() > 1024 {
            return None;
        }
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(raw[6..].trim_ascii())
                .ok()?,
        );
        let colon = decoded.iter().position(|&b| b == b':')?;
        let user = std::str::from_utf8(&decoded[..colon]).ok()?;
        let pass = &decoded[colon + 1..];
        let reg = *self.users.read().expect("users").get(user)?;
        let r = self.regs.read().expect("regs").get(&reg)?.clone();
        let h: [u8; 32] = sha2::Sha256::digest(pass).into();
        bool::from(h.ct_eq(&r.pass_sha256)).then_some(r)
    }

    /// A new connection, unauthenticated: the oldest unauthenticated one is closed when there
    /// are [`MAX_UNAUTHENTICATED`] already.
    fn admit(&self) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            evict: Notify::new(),
            authenticated: AtomicBool::new(false),
            permit: Mutex::new(None),
        });
        let mut list = self.unauthenticated.lock().expect("unauthenticated");
        if list.len() >= MAX_UNAUTHENTICATED
            && let Some(old) = list.pop_front()
        {
            debug!("closing the oldest unauthenticated connection for a new one");
            old.evict.notify_one();
        }
        list.push_back(gate.clone());
        gate
    }

    fn forget(&self, gate: &Arc<Gate>) {
        self.unauthenticated
            .lock()
            .expect("unauthenticated")
            .retain(|g| !Arc::ptr_eq(g, gate));
    }

    /// The connection showed a run's credential: it leaves the unauthenticated list and takes
    /// one of [`MAX_CONNECTIONS`] permits (false: none left).
    fn promote(&self, gate: &Arc<Gate>) -> bool {
        if gate.authenticated.load(Ordering::Acquire) {
            return true;
        }
        let Ok(permit) = self.conns.clone().try_acquire_owned() else {
            return false;
        };
        *gate.permit.lock().expect("permit") = Some(permit);
        gate.authenticated.store(true, Ordering::Release);
        self.forget(gate);
        true
    }

    async fn serve_client(self: Arc<Self>, tcp: TcpStream, gate: Arc<Gate>) {
        let this = self.clone();
        let g = gate.clone();
        let svc = service_fn(move |req| {
            let (this, g) = (this.clone(), g.clone());
            async move { Ok::<_, Infallible>(this.handle(req, &g).await) }
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.max_buf_size(MAX_HEAD)
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT);
        let conn = b.serve_connection(TokioIo::new(tcp), svc).with_upgrades();
        // Unauthenticated connections: closed after AUTH_TIMEOUT, or when evicted.
        let deadline = async {
            tokio::time::sleep(AUTH_TIMEOUT).await;
            if gate.authenticated.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = conn => if let Err(e) = r { debug!("client connection: {e}") },
            _ = gate.evict.notified() => debug!("evicted an unauthenticated connection"),
            _ = deadline => debug!("closed a connection that did not authenticate in time"),
        }
        self.forget(&gate);
        gate.permit.lock().expect("permit").take();
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        gate: &Arc<Gate>,
    ) -> Response<RespBody> {
        let Some(reg) = self.authenticate(&req) else {
            debug!("407: no or a wrong proxy credential");
            let mut r = full(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "agentkeys proxy: this proxy serves only programs started by agentkeys with their own credential",
            );
            r.headers_mut().insert(
                hyper::header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"agentkeys\""),
            );
            return r;
        };
        if !self.promote(gate) {
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                "agentkeys proxy: too many connections",
            );
        }
        if req.method() == Method::CONNECT {
            return self.connect(reg, req).await;
        }
        self.plain_http(reg, req).await
    }

    async fn connect(
        self: Arc<Self>,
        reg: Arc<Registration>,
        req: Request<Incoming>,
    ) -> Response<RespBody> {
        let Some((host, port)) = req
            .uri()
            .authority()
            .and_then(|a| split_authority(a.as_str(), 443))
        else {
            return full(
                StatusCode::BAD_REQUEST,
                "agentkeys proxy: CONNECT needs host:port",
            );
        };
        // The CONNECT authority itself is never a place for a placeholder.
        if let Some(i) = reg
            .rules
            .specs()
            .iter()
            .position(|s| host.contains(&s.placeholder))
        {
            let reason = "a placeholder in the CONNECT host".to_string();
            self.refused(&reg, Some(i), &host, "CONNECT", "", &reason)
                .await;
            return full(StatusCode::FORBIDDEN, format!("agentkeys proxy: {reason}"));
        }
        let mut gone = reg.gone.subscribe();
        let injects = reg.rules.injects_into(&host, port);
        if !injects && let Some(resp) = self.confined(&reg, &host, port, "CONNECT", "").await {
            return resp;
        }
        // A `--net proxy` jail's allowed host is decrypted too (SNI, Host and placeholders
        // checked on every request; nothing is injected there).
        if injects || reg.allow.is_some() {
            let this = self.clone();
            tokio::spawn(async move {
                let up = tokio::select! {
                    u = hyper::upgrade::on(req) => u,
                    _ = gone.wait_for(|g| *g) => return,
                };
                match up {
                    Ok(up) => this.decrypt(reg, host, port, TokioIo::new(up)).await,
                    Err(e) => debug!("CONNECT upgrade failed: {e}"),
                }
            });
            return Response::new(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            );
        }
        // Any other host: a plain tunnel to whatever the name resolves to.
        let upstream = match connect_tcp(&host, port).await {
            Ok(s) => s,
            Err(e) => {
                return full(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "agentkeys proxy: cannot reach {}: {e}",
                        shown_host(&host, port)
                    ),
                );
            }
        };
        tokio::spawn(async move {
            let up = tokio::select! {
                u = hyper::upgrade::on(req) => u,
                _ = gone.wait_for(|g| *g) => return,
            };
            if let Ok(up) = up {
                let mut client = TokioIo::new(up);
                let mut upstream = upstream;
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    _ = gone.wait_for(|g| *g) => {}
                }
            }
        });
        Response::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    /// The TLS server configuration of decrypted connections to `host`: one per host and leaf,
    /// kept (at most [`MAX_SERVER_CONFIGS`]) so that a client's next connection resumes its TLS
    /// session instead of a full handshake; built again when the minter renews the leaf.
    fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let leaf = self
            .minter
            .leaf(host)
            .map_err(|e| format!("minting a certificate failed: {e}"))?;
        if let Some((l, cfg)) = self.server_cfgs.lock().expect("server configs").get(host)
            && Arc::ptr_eq(l, &leaf)
        {
            return Ok(cfg.clone());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneHost {
                host: host.to_string(),
                leaf: leaf.clone(),
            }));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        let mut all = self.server_cfgs.lock().expect("server configs");
        if all.len() >= MAX_SERVER_CONFIGS {
            all.clear();
        }
        all.insert(host.to_string(), (leaf, cfg.clone()));
        Ok(cfg)
    }

    async fn decrypt(
        self: Arc<Self>,
        reg: Arc<Registration>,
        host: String,
        port: u16,
        io: TokioIo<hyper::upgrade::Upgraded>,
    ) {
        let cfg = match self.server_config(&host) {
            Ok(c) => c,
            Err(e) => {
                warn!("TLS for a decrypted connection: {e}");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let upstream: Upstream = Arc::new(tokio::sync::Mutex::new(None));
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                debug!("client TLS handshake failed: {e}");
                return;
            }
            Err(_) => return,
        };
        let mut gone = reg.gone.subscribe();
        let this = self.clone();
        let svc = service_fn(move |req| {
            let (this, reg, host, upstream) =
                (this.clone(), reg.clone(), host.clone(), upstream.clone());
            async move {
                let _busy = InFlight::enter(&this);
                Ok::<_, Infallible>(this.inner(reg, &host, port, upstream, req).await)
            }
        });
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            // HTTP/2 with the client: heads bounded like HTTP/1.1's, at most 100 streams.
            let mut b =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            b.max_header_list_size(MAX_HEAD as u32)
                .max_concurrent_streams(100)
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(HEAD_TIMEOUT);
            let conn = b.serve_connection(TokioIo::new(tls), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!("decrypted h2 connection: {e}") },
                _ = gone.wait_for(|g| *g) => {}
            }
            return;
        }
        let mut b = hyper::server::conn::http1::Builder::new();
        b.max_buf_size(MAX_HEAD)
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT);
        let conn = b.serve_connection(TokioIo::new(tls), svc).with_upgrades();
        tokio::select! {
            r = conn => if let Err(e) = r { debug!("decrypted connection: {e}") },
            _ = gone.wait_for(|g| *g) => {}
        }
    }

    /// One request inside a decrypted connection to `host:port`.
    async fn inner(
        self: Arc<Self>,
        reg: Arc<Registration>,
        host: &str,
        port: u16,
        upstream: Upstream,
        mut req: Request<Incoming>,
    ) -> Response<RespBody> {
        let method = req.method().to_string();
        let path = path_only(req.uri());
        // Every authority the request names (its `Host` header, the authority of an
        // absolute-form URI or HTTP/2's `:authority`) must be the tunnel's host: a request for
        // another host over this connection would otherwise get this host's values (SNI and
        // Host must agree). One `Host` header at most: with two, a server behind a shared
        // front end could pick the second (another virtual host on the same address).
        if !names_only(&req, host, port) {
            // A placeholder sent this way is an attempt worth recording.
            let seen = match reg
                .rules
                .examine(host, port, true, req.uri(), req.headers())
            {
                Verdict::Inject(v) => v.first().copied(),
                Verdict::Refuse { index, .. } => Some(index),
                Verdict::Pass => None,
            };
            if seen.is_some() {
                let reason = "the Host header names another host than the connection";
                self.refused(&reg, seen, host, &method, &path, reason).await;
            }
            return full(
                StatusCode::MISDIRECTED_REQUEST,
                "agentkeys proxy: the Host header names another host than the connection",
            );
        }
        let verdict = reg
            .rules
            .examine(host, port, true, req.uri(), req.headers());
        // The first request of a connection opens the upstream connection while the daemon
        // decides (nothing is sent on it before then); later ones find it open.
        if !matches!(verdict, Verdict::Refuse { .. })
            && !req.headers().contains_key(hyper::header::UPGRADE)
            && let Ok(mut guard) = upstream.clone().try_lock_owned()
            && guard.is_none()
        {
            let (this, host) = (self.clone(), host.to_string());
            tokio::spawn(async move {
                if let Ok(s) = this.upstream_tls(&host, port, true).await {
                    *guard = Some(s);
                }
            });
        }
        let mut values: Vec<(usize, Arc<MappedSecret>)> = Vec::new();
        match verdict {
            Verdict::Refuse { index, reason } => {
                self.refused(&reg, Some(index), host, &method, &path, &reason)
                    .await;
                return full(
                    StatusCode::FORBIDDEN,
                    format!("agentkeys proxy: refused: {reason}"),
                );
            }
            Verdict::Pass => {}
            Verdict::Inject(indices) => {
                for i in indices {
                    match self.value(&reg, i, host, port, &method, &path).await {
                        Ok(v) => values.push((i, v)),
                        Err(resp) => return resp,
                    }
                }
            }
        }
        let injected = !values.is_empty();
        let mut sent_headers: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        if injected {
            let pairs: Vec<(usize, &[u8])> = values.iter().map(|(i, v)| (*i, &v[..])).collect();
            let (mut parts, body) = req.into_parts();
            if let Err(e) = reg
                .rules
                .substitute(&pairs, &mut parts.uri, &mut parts.headers)
            {
                return full(StatusCode::BAD_GATEWAY, format!("agentkeys proxy: {e}"));
            }
            // The Basic credentials as sent (base64 of `user:value`), to mask in the answer.
            for v in parts.headers.get_all(hyper::header::AUTHORIZATION) {
                let raw = v.as_bytes();
                if raw.len() > 6 && raw[..6].eq_ignore_ascii_case(b"basic ") {
                    sent_headers.push(Zeroizing::new(raw[6..].trim_ascii().to_vec()));
                }
            }
            // Masking needs the answer uncompressed.
            parts.headers.insert(
                hyper::header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            req = Request::from_parts(parts, body);
        }
        let client_upgrade = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        parts.headers.remove(hyper::header::PROXY_AUTHORIZATION);
        parts.headers.remove("proxy-connection");
        // An upgrade needs HTTP/1.1 upstream: it gets a connection of its own.
        let upgrade = parts.headers.contains_key(hyper::header::UPGRADE);
        let (body, found) = ScanBody::boxed_for(body, &reg.rules);
        let out = Request::from_parts(parts, body);
        let own: Upstream = Arc::new(tokio::sync::Mutex::new(None));
        let upstream = if upgrade { own } else { upstream };
        let mut guard = upstream.lock().await;
        // A kept connection that the server closed meanwhile (or that is not ready for the
        // next request) is replaced.
        if let Some(s) = guard.as_mut()
            && s.ready().await.is_err()
        {
            *guard = None;
        }
        if guard.as_ref().is_none_or(|s| s.is_closed()) {
            match self.upstream_tls(host, port, !upgrade).await {
                Ok(s) => *guard = Some(s),
                Err(e) => {
                    self.done(&reg, &values, host, &method, &path, 0);
                    return full(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "agentkeys proxy: cannot reach {}: {e}",
                            shown_host(host, port)
                        ),
                    );
                }
            }
        }
        let Some(sender) = guard.as_mut() else {
            return full(
                StatusCode::BAD_GATEWAY,
                "agentkeys proxy: no upstream connection",
            );
        };
        // HTTP/2 multiplexes: a clone of the sender, and the lock goes before the exchange.
        let sent = match sender {
            UpSender::H2(h2) => {
                let mut mine = UpSender::H2(h2.clone());
                drop(guard);
                mine.send(out, host, port).await
            }
            UpSender::H1(_) => {
                let r = sender.send(out, host, port).await;
                drop(guard);
                r
            }
        };
        let hit = found.lock().expect("scan").take();
        if let Some(i) = hit {
            let reason = format!(
                "the placeholder in {} of {} may not be sent in a request body",
                reg.rules.specs()[i].var,
                reg.rules.specs()[i].service
            );
            self.refused(&reg, Some(i), host, &method, &path, &reason)
                .await;
            *upstream.lock().await = None;
            return full(
                StatusCode::FORBIDDEN,
                format!("agentkeys proxy: refused: {reason}"),
            );
        }
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                self.done(&reg, &values, host, &method, &path, 0);
                *upstream.lock().await = None;
                return full(
                    StatusCode::BAD_GATEWAY,
                    format!("agentkeys proxy: upstream: {e}"),
                );
            }
        };
        self.done(&reg, &values, host, &method, &path, resp.status().as_u16());
        // The answer is masked for the values in every form this request sent them in (raw,
        // base64 in a Basic header, percent-encoded in the query): headers here (a 101's too),
        // the body and its trailers below.
        let masks = if injected {
            sent_forms(&values, &sent_headers)
        } else {
            Vec::new()
        };
        mask_headers(resp.headers_mut(), &masks);
        // A compressed answer cannot be masked: injected requests ask for `identity`, and a
        // server that compresses anyway gets its answer withheld (fail closed), since one that
        // reflects the value would hand it to the program inside the compressed bytes.
        if injected
            && !resp.body().is_end_stream()
            && let Some(enc) = resp.headers().get(hyper::header::CONTENT_ENCODING)
            && !enc
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"identity")
        {
            let shown: String = String::from_utf8_lossy(enc.as_bytes())
                .chars()
                .filter(|c| !c.is_control())
                .take(40)
                .collect();
            warn!(
                reg = reg.reg,
                host, "withheld a compressed answer ({shown})"
            );
            *upstream.lock().await = None;
            return full(
                StatusCode::BAD_GATEWAY,
                format!(
                    "agentkeys proxy: {} answered compressed ({shown}) although the proxy asked for identity; an answer to a request carrying a credential is passed on only where it can be masked",
                    shown_host(host, port)
                ),
            );
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // A websocket (or other upgrade): the upstream connection becomes the tunnel.
            *upstream.lock().await = None;
            let server_upgrade = hyper::upgrade::on(&mut resp);
            let mut gone = reg.gone.subscribe();
            tokio::spawn(async move {
                if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                    let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut s) => {}
                        _ = gone.wait_for(|g| *g) => {}
                    }
                }
            });
            let (parts, body) = resp.into_parts();
            return Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed());
        }
        let (parts, body) = resp.into_parts();
        if injected {
            return Response::from_parts(parts, MaskBody::new(body, masks).boxed());
        }
        Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
    }

    /// Asks the daemon whether placeholder `i` may be injected into this request: the value
    /// (a fresh page, or the copy held while its `cache_ttl` runs), or the refusal as a response.
    async fn value(
        &self,
        reg: &Registration,
        i: usize,
        host: &str,
        port: u16,
        method: &str,
        path: &str,
    ) -> Result<Arc<MappedSecret>, Response<RespBody>> {
        let cached = {
            let c = reg.cache.lock().expect("cache");
            c.get(&i)
                .filter(|(_, until)| Instant::now() < *until)
                .map(|(v, _)| v.clone())
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = oneshot::channel();
        self.waiters.lock().expect("waiters").insert(id, tx);
        self.tell(&FromProxy::Want {
            id,
            reg: reg.reg,
            index: i,
            host: host.to_string(),
            port,
            method: method.to_string(),
            path: path.to_string(),
            cached: cached.is_some(),
        })
        .await;
        let soon = if self.in_flight.load(Ordering::Relaxed) <= 1 {
            self.answer_soon(&mut rx)
        } else {
            None
        };
        let answer = match soon {
            Some(a) => Ok(Ok(a)),
            None => tokio::time::timeout(ANSWER_TIMEOUT, rx).await,
        };
        self.waiters.lock().expect("waiters").remove(&id);
        let (ok, status, reason, fd) = match answer {
            Ok(Ok(a)) => a,
            _ => {
                return Err(full(
                    StatusCode::BAD_GATEWAY,
                    "agentkeys proxy: the daemon did not answer; nothing was sent",
                ));
            }
        };
        if !ok {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
            return Err(full(status, format!("agentkeys proxy: {reason}")));
        }
        match (fd, cached) {
            (Some(fd), _) => {
                let page = MappedSecret::map(fd).map_err(|e| {
                    full(
                        StatusCode::BAD_GATEWAY,
                        format!("agentkeys proxy: the value's page is unusable: {e}"),
                    )
                })?;
                let page = Arc::new(page);
                let ttl = Duration::from_secs(reg.rules.specs()[i].cache_ttl_secs);
                // A TTL too large for the clock (`--cache-ttl 1000y`) is a checked add, not a
                // panic: such a value is kept until the run ends.
                if !ttl.is_zero() {
                    let now = Instant::now();
                    let until = now
                        .checked_add(ttl)
                        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
                        .unwrap_or(now);
                    reg.cache
                        .lock()
                        .expect("cache")
                        .insert(i, (page.clone(), until));
                }
                Ok(page)
            }
            (None, Some(v)) => Ok(v),
            (None, None) => Err(full(
                StatusCode::BAD_GATEWAY,
                "agentkeys proxy: the daemon sent no value",
            )),
        }
    }

    /// Waits up to [`ANSWER_SPIN`] on this thread for the daemon's answer, reading the link
    /// itself (what it reads is handled as the link's reader would), yielding the CPU between
    /// looks. `None`: no answer yet (or the link is gone); the caller waits as a task.
    fn answer_soon(&self, rx: &mut oneshot::Receiver<Answer>) -> Option<Answer> {
        let end = Instant::now() + ANSWER_SPIN;
        let mut buf = self.spin_buf.lock().expect("spin buffer");
        loop {
            match rx.try_recv() {
                Ok(a) => return Some(a),
                Err(oneshot::error::TryRecvError::Closed) => return None,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if Instant::now() >= end {
                return None;
            }
            match self.link.try_recv(&mut buf) {
                Ok(Some(r)) => {
                    if !self.take_packet(r, &buf) {
                        return None;
                    }
                }
                Ok(None) => std::thread::yield_now(),
                Err(_) => return None,
            }
        }
    }

    /// Queues the results of a request the values were injected into (see [`DONE_DELAY`]).
    fn done(
        self: &Arc<Self>,
        reg: &Registration,
        values: &[(usize, Arc<MappedSecret>)],
        host: &str,
        method: &str,
        path: &str,
        status: u16,
    ) {
        if values.is_empty() {
            return;
        }
        {
            let mut q = self.done_queue.lock().expect("done queue");
            for (i, _) in values {
                let msg = FromProxy::Done {
                    reg: reg.reg,
                    index: *i,
                    host: host.to_string(),
                    method: method.to_string(),
                    path: path.to_string(),
                    status,
                };
                q.extend(encode(&msg));
            }
        }
        if !self.done_armed.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(DONE_DELAY).await;
                this.flush_done().await;
            });
        }
    }

    /// Tells the daemon every queued result (the scheduled flush, which a later result then
    /// schedules again).
    async fn flush_done(&self) {
        self.done_armed.store(false, Ordering::Release);
        let queued = std::mem::take(&mut *self.done_queue.lock().expect("done queue"));
        for bytes in queued {
            self.send_encoded(&bytes).await;
        }
    }

    async fn refused(
        &self,
        reg: &Registration,
        index: Option<usize>,
        host: &str,
        method: &str,
        path: &str,
        reason: &str,
    ) {
        info!(reg = reg.reg, host, "refused: {reason}");
        self.tell(&FromProxy::Refused {
            reg: reg.reg,
            index,
            host: host.chars().take(256).collect(),
            method: method.chars().take(16).collect(),
            path: path.to_string(),
            reason: reason.chars().take(300).collect(),
        })
        .await;
    }

    /// A verified TLS connection to `host:port`: HTTP/2 when `h2` and the server picks it by
    /// ALPN, else HTTP/1.1.
    async fn upstream_tls(&self, host: &str, port: u16, h2: bool) -> Result<UpSender, String> {
        let tcp = connect_tcp(host, port).await?;
        let name = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => rustls_pki_types::ServerName::IpAddress(ip.into()),
            Err(_) => rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|_| "not a valid server name".to_string())?,
        };
        let cfg = if h2 {
            self.upstream_tls.clone()
        } else {
            self.upstream_tls_h1.clone()
        };
        let connector = tokio_rustls::TlsConnector::from(cfg);
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS: {e}"))?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!("upstream h2 connection: {e}");
                }
            });
            return Ok(UpSender::H2(sender));
        }
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!("upstream connection: {e}");
            }
        });
        Ok(UpSender::H1(sender))
    }

    /// For a `--net proxy` jail's registration: `None` when `host:port` is one of its allowed
    /// hosts (or the registration is not confined), else the 403 to answer, after reporting
    /// the attempt (audited `deny` with the host).
    async fn confined(
        &self,
        reg: &Registration,
        host: &str,
        port: u16,
        method: &str,
        path: &str,
    ) -> Option<Response<RespBody>> {
        let allow = reg.allow.as_ref()?;
        if allow.iter().any(|h| h.matches(host, port)) {
            return None;
        }
        let shown = shown_host(host, port);
        let reason = format!(
            "{shown} is not an allowed host of this jail (agentkeys jail --net proxy: only the \
             services' inject hosts and --allow-host hosts are reachable)"
        );
        self.refused(reg, None, host, method, path, &reason).await;
        Some(full(
            StatusCode::FORBIDDEN,
            format!("agentkeys proxy: refused: {reason}"),
        ))
    }

    /// A plain-http request (absolute URI): forwarded unless it carries a placeholder.
    async fn plain_http(
        &self,
        reg: Arc<Registration>,
        req: Request<Incoming>,
    ) -> Response<RespBody> {
        let method = req.method().to_string();
        let path = path_only(req.uri());
        let Some((host, port)) = req
            .uri()
            .authority()
            .and_then(|a| split_authority(a.as_str(), 80))
        else {
            return full(
                StatusCode::BAD_REQUEST,
                "agentkeys proxy: a proxy request needs an absolute http:// URL",
            );
        };
        if req.uri().scheme_str() != Some("http") {
            return full(
                StatusCode::BAD_REQUEST,
                "agentkeys proxy: only http:// URLs without CONNECT",
            );
        }
        if let Some(resp) = self.confined(&reg, &host, port, &method, &path).await {
            return resp;
        }
        match reg
            .rules
            .examine(&host, port, false, req.uri(), req.headers())
        {
            Verdict::Pass => {}
            Verdict::Refuse { index, reason } => {
                self.refused(&reg, Some(index), &host, &method, &path, &reason)
                    .await;
                return full(
                    StatusCode::FORBIDDEN,
                    format!("agentkeys proxy: refused: {reason}"),
                );
            }
            Verdict::Inject(v) => {
                let reason = "a placeholder over plain http (only https requests get values)";
                self.refused(&reg, v.first().copied(), &host, &method, &path, reason)
                    .await;
                return full(
                    StatusCode::FORBIDDEN,
                    format!("agentkeys proxy: refused: {reason}"),
                );
            }
        }
        let (mut parts, body) = req.into_parts();
        parts.headers.remove(hyper::header::PROXY_AUTHORIZATION);
        parts.headers.remove("proxy-connection");
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        parts.uri = match pq.parse() {
            Ok(u) => u,
            Err(_) => return full(StatusCode::BAD_REQUEST, "agentkeys proxy: bad URL"),
        };
        let (body, found) = ScanBody::boxed_for(body, &reg.rules);
        let out = Request::from_parts(parts, body);
        let tcp = match connect_tcp(&host, port).await {
            Ok(t) => t,
            Err(e) => {
                return full(
                    StatusCode::BAD_GATEWAY,
                    format!("agentkeys proxy: cannot reach {host}: {e}"),
                );
            }
        };
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
                Ok(x) => x,
                Err(e) => return full(StatusCode::BAD_GATEWAY, format!("agentkeys proxy: {e}")),
            };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let sent = sender.send_request(out).await;
        let hit = found.lock().expect("scan").take();
        if let Some(i) = hit {
            let reason = "a placeholder in a request body";
            self.refused(&reg, Some(i), &host, &method, &path, reason)
                .await;
            return full(
                StatusCode::FORBIDDEN,
                format!("agentkeys proxy: refused: {reason}"),
            );
        }
        match sent {
            Ok(r) => {
                let (p, b) = r.into_parts();
                Response::from_parts(p, b.map_err(|e| Box::new(e) as BoxError).boxed())
            }
            Err(e) => full(
                StatusCode::BAD_GATEWAY,
                format!("agentkeys proxy: upstream: {e}"),
            ),
        }
    }
}

/// Connects to `host:port` (resolving a name), within [`CONNECT_TIMEOUT`].
async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, String> {
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let fut = async {
        // An IP literal needs no resolver (getaddrinfo runs on the blocking pool).
        let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host(&target)
                .await
                .map_err(|e| format!("resolving: {e}"))?
                .take(8)
                .collect(),
        };
        let mut last = String::from("no address");
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| "connect timed out".to_string())?
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A byte string an answer is masked for: a value's page, or a form of it the proxy sent
/// (base64 in a Basic header, percent-encoded in a query), in a zeroizing buffer.
enum Masked {
    Page(Arc<MappedSecret>),
    Form(Zeroizing<Vec<u8>>),
}

impl std::ops::Deref for Masked {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Masked::Page(p) => p,
            Masked::Form(f) => f,
        }
    }
}

/// The values and every form of them a request carried: the raw bytes, each Basic credential
/// (`basic`: the base64 text sent) that decodes to one holding a value, and each value
/// percent-encoded as a query parameter carries it.
fn sent_forms(values: &[(usize, Arc<MappedSecret>)], basic: &[Zeroizing<Vec<u8>>]) -> Vec<Masked> {
    let mut out: Vec<Masked> = values
        .iter()
        .map(|(_, v)| Masked::Page(v.clone()))
        .collect();
    for b in basic {
        let holds = base64::engine::general_purpose::STANDARD
            .decode(&b[..])
            .ok()
            .map(Zeroizing::new)
            .is_some_and(|d| values.iter().any(|(_, v)| contains(&d, v)));
        if holds {
            out.push(Masked::Form(b.clone()));
        }
    }
    for (_, v) in values {
        let mut enc = Zeroizing::new(String::with_capacity(v.len() * 3));
        crate::rules::percent_encode_into(v, &mut enc);
        if enc.as_bytes() != &v[..] {
            out.push(Masked::Form(Zeroizing::new(enc.as_bytes().to_vec())));
        }
    }
    out
}

/// Masks every occurrence of `masks` in header values.
fn mask_headers(headers: &mut hyper::http::HeaderMap, masks: &[Masked]) {
    if masks.is_empty() {
        return;
    }
    for v in headers.values_mut() {
        let b = v.as_bytes();
        if masks.iter().any(|s| contains(b, s)) {
            let mut m = b.to_vec();
            for s in masks {
                mask_in_place(&mut m, s);
            }
            *v = HeaderValue::from_bytes(&m).unwrap_or_else(|_| HeaderValue::from_static("*"));
        }
    }
}

/// Replaces every occurrence of `secret` with as many `*` (same length: a Content-Length stays
/// right).
fn mask_in_place(buf: &mut [u8], secret: &[u8]) {
    if secret.is_empty() || buf.len() < secret.len() {
        return;
    }
    let mut i = 0;
    while i + secret.len() <= buf.len() {
        if &buf[i..i + secret.len()] == secret {
            buf[i..i + secret.len()].fill(b'*');
            i += secret.len();
        } else {
            i += 1;
        }
    }
}

/// A request body passed on while it is scanned for placeholders: the last
/// `longest placeholder - 1` bytes are held back until more come, so a placeholder is seen
/// before any of it leaves whole; when one is found the body fails (the upstream request is cut)
/// and the request is answered 403.
struct ScanBody {
    inner: Incoming,
    needles: Vec<Vec<u8>>,
    hold: Vec<u8>,
    keep: usize,
    found: Arc<Mutex<Option<usize>>>,
    ended: bool,
    failed: Arc<AtomicBool>,
    /// Trailers (checked), sent after the held bytes.
    trailers: Option<hyper::http::HeaderMap>,
}

impl ScanBody {
    /// The body to send on: empty when the client sent none (so no `Content-Length: 0` is
    /// added to a GET), else the scanning wrapper.
    fn boxed_for(inner: Incoming, rules: &Rules) -> (ReqBody, Arc<Mutex<Option<usize>>>) {
        let scan = ScanBody::new(inner, rules);
        let found = scan.found.clone();
        if scan.inner.is_end_stream() {
            let empty = http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed();
            return (empty, found);
        }
        (scan.boxed(), found)
    }

    fn new(inner: Incoming, rules: &Rules) -> ScanBody {
        let needles: Vec<Vec<u8>> = rules
            .specs()
            .iter()
            .map(|s| s.placeholder.as_bytes().to_vec())
            .collect();
        let keep = needles
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        ScanBody {
            inner,
            needles,
            hold: Vec::new(),
            keep,
            found: Arc::new(Mutex::new(None)),
            ended: false,
            failed: Arc::new(AtomicBool::new(false)),
            trailers: None,
        }
    }

    fn check(&self, buf: &[u8]) -> Option<usize> {
        self.needles.iter().position(|n| contains(buf, n))
    }
}

impl Body for ScanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.failed.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err("placeholder in the body".into())));
        }
        loop {
            if self.ended {
                if self.hold.is_empty() {
                    return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
                }
                let rest = std::mem::take(&mut self.hold);
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.ended = true;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => data,
                        // Trailers: no place for a placeholder either (raw or percent-encoded).
                        Err(other) => {
                            if let Ok(t) = other.into_trailers() {
                                let hit = t.values().find_map(|v| {
                                    let raw = v.as_bytes();
                                    self.check(raw)
                                        .or_else(|| self.check(&crate::rules::percent_decode(raw)))
                                });
                                if let Some(i) = hit {
                                    *self.found.lock().expect("scan") = Some(i);
                                    self.failed.store(true, Ordering::Relaxed);
                                    return Poll::Ready(Some(Err(
                                        "placeholder in the trailers".into()
                                    )));
                                }
                                self.trailers = Some(t);
                            }
                            self.ended = true;
                            continue;
                        }
                    };
                    let mut buf = std::mem::take(&mut self.hold);
                    buf.extend_from_slice(&frame);
                    if let Some(i) = self.check(&buf) {
                        *self.found.lock().expect("scan") = Some(i);
                        self.failed.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err("placeholder in the body".into())));
                    }
                    let cut = buf.len().saturating_sub(self.keep);
                    self.hold = buf.split_off(cut);
                    if !buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.hold.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body with every occurrence of the injected values replaced by `*` (same length),
/// across chunk boundaries (the last `longest value - 1` bytes are held until more come).
struct MaskBody<B = Incoming> {
    inner: B,
    secrets: Vec<Masked>,
    hold: Vec<u8>,
    keep: usize,
    ended: bool,
    /// Trailers (masked), sent after the held bytes.
    trailers: Option<hyper::http::HeaderMap>,
}

impl<B> MaskBody<B> {
    fn new(inner: B, secrets: Vec<Masked>) -> MaskBody<B> {
        let keep = secrets
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        MaskBody {
            inner,
            secrets,
            hold: Vec::new(),
            keep,
            ended: false,
            trailers: None,
        }
    }
}

impl<B> Body for MaskBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.ended {
                if self.hold.is_empty() {
                    return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
                }
                let rest = std::mem::take(&mut self.hold);
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.ended = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        // Trailers end the body: masked, and sent after what is held.
                        Err(other) => {
                            if let Ok(mut t) = other.into_trailers() {
                                mask_headers(&mut t, &self.secrets);
                                self.trailers = Some(t);
                            }
                            self.ended = true;
                            continue;
                        }
                    };
                    let mut buf = std::mem::take(&mut self.hold);
                    buf.extend_from_slice(&data);
                    for s in &self.secrets {
                        mask_in_place(&mut buf, s);
                    }
                    let cut = buf.len().saturating_sub(self.keep);
                    self.hold = buf.split_off(cut);
                    if !buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.hold.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A message to the daemon as sent on the link (`None`: it cannot be encoded within
/// [`MAX_LINK_MESSAGE`]).
fn encode(msg: &FromProxy) -> Option<Vec<u8>> {
    serde_json::to_vec(msg)
        .ok()
        .filter(|b| b.len() <= MAX_LINK_MESSAGE)
}

/// Sends the daemon one message from the synchronous start-up code (before the runtime).
///
/// # Errors
/// The OS error.
pub fn tell_blocking(sock: &OwnedFd, msg: &FromProxy) -> std::io::Result<()> {
    agentkeys_hardening::launcher::send_msg(sock.as_fd(), msg, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split() {
        assert_eq!(
            split_authority("Api.GitHub.com:443", 443),
            Some(("api.github.com".into(), 443))
        );
        assert_eq!(split_authority("a.com", 443), Some(("a.com".into(), 443)));
        assert_eq!(
            split_authority("[::1]:8443", 443),
            Some(("::1".into(), 8443))
        );
        assert_eq!(
            split_authority("a.com.:80", 443),
            Some(("a.com".into(), 80))
        );
        assert_eq!(split_authority("a.com:x", 443), None);
        assert_eq!(split_authority("a.com:0", 443), None);
        assert_eq!(split_authority("", 443), None);
    }

    /// A body of the given frames (data and trailers).
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    /// Red team: a value reflected split across frames, and in trailers (HTTP/2, or chunked
    /// HTTP/1.1), is masked; the held bytes come before the trailers.
    #[test]
    fn answers_are_masked_across_frames_and_in_trailers() {
        let secret = b"s3cr3t-VALUE-xyz";
        let mut trailers = hyper::http::HeaderMap::new();
        trailers.insert("x-echo", HeaderValue::from_static("got s3cr3t-VALUE-xyz."));
        let frames = Frames(VecDeque::from([
            Frame::data(Bytes::from_static(b"aa s3cr3t-VA")),
            Frame::data(Bytes::from_static(b"LUE-xyz bb s3")),
            Frame::data(Bytes::from_static(b"cr3t-VALUE-xyz")),
            Frame::trailers(trailers),
        ]));
        let body = MaskBody::new(frames, vec![Masked::Form(Zeroizing::new(secret.to_vec()))]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got = rt.block_on(body.collect()).ok().unwrap();
        let t = got.trailers().cloned().expect("trailers kept");
        assert_eq!(t["x-echo"], "got ****************.");
        assert_eq!(
            &got.to_bytes()[..],
            b"aa **************** bb ****************"
        );
    }

    #[test]
    fn masking_keeps_the_length() {
        let mut b = b"xx secret yy secretsecret".to_vec();
        mask_in_place(&mut b, b"secret");
        assert_eq!(b, b"xx ****** yy ************");
    }
}
