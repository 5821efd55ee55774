//! Network listeners (`[daemon] listen = ["tls://IP:PORT"]`): remote agents, typically another
//! host's or a VM's agentkeysd (`kind = "agentkeys"` backend, [`crate::remote`]), reach this
//! daemon over TLS.
//!
//! - **Addresses**: `tls://` and a literal IP in a non-public range (loopback, RFC 1918, CGNAT
//!   100.64.0.0/10, link-local, ULA) unless `allow_public_listen`; `tcp://` (plaintext), names
//!   and public addresses are refused at start with the rule ([`check_listen`]). `vsock://` is
//!   not built.
//! - **TLS**: 1.3 only (no downgrade to anything older), the daemon's own key and self-signed
//!   certificate (`tls.enc`, sealed under the DEK); clients pin its fingerprint.
//! - **Framing**: the unix socket's messages, each as a 4-byte big-endian length and that many
//!   bytes of JSON; a length over [`MAX_MESSAGE_BYTES`] (or 0) is answered `too_large` (or
//!   `bad_request`) and the connection closed, before anything is read into memory.
//! - **Caps**: the daemon's `max_connections` and `max_pending` count these connections too;
//!   per source IP at most `max_connections_per_address` open and
//!   `connections_per_minute_per_address` new ones a minute (closed unread beyond). The TLS
//!   handshake and the hello share `handshake_timeout` (a slowloris client is closed then);
//!   each answer must be taken within [`WRITE_TIMEOUT`].
//! - **Who**: only a remote agent's token opens a session here (`Sessions::authenticate_network`,
//!   checked again on every request by `Sessions::check`); the owner's and local agents' tokens
//!   are refused. Every audit record of the connection carries its source address
//!   (`peer.addr`).
//! - **What**: the requests of the unix socket, except that a credential is always answered
//!   inline (no fd crosses a network: the bytes travel inside TLS, to the remote daemon, which
//!   puts them into its own secret pages), and `run` is refused: the remote daemon launches
//!   programs itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentkeys_proto::wire::{
    self, ErrorCode, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Request, RequestBody, Response,
    ResponseBody,
};
use agentkeys_state::audit::{Event, Peer};
use agentkeys_state::tls::TlsIdentity;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::connection::{Reply, auth_code, handle};
use crate::sessions::{AuthError, Principal};
use crate::shared::{ConnEntry, Shared};

/// Most `listen` addresses.
pub const MAX_LISTENERS: usize = 8;
/// How long one answer may take to be written (a client that stops reading is closed).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most source addresses the per-address table tracks; beyond, new addresses are refused until
/// entries age out.
const MAX_TRACKED_ADDRESSES: usize = 4096;

/// Whether `ip` is in a range that does not route on the public internet: loopback, RFC 1918,
/// CGNAT (100.64.0.0/10, used by Tailscale and many VM networks), link-local, IPv6 ULA
/// (fc00::/7) and IPv6 link-local (fe80::/10). IPv4-mapped IPv6 addresses count as their IPv4.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_non_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback() || (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Checks one `listen` address and returns where to bind.
///
/// # Errors
/// The rule it breaks, with the fix.
pub fn check_listen(address: &str, allow_public: bool) -> Result<SocketAddr, String> {
    let Some(rest) = address.strip_prefix("tls://") else {
        if address.starts_with("tcp://") || address.starts_with("http://") {
            return Err(format!(
                "{address:?}: plaintext TCP is never served: tokens and secrets would cross the \
                 network in clear; use tls://IP:PORT"
            ));
        }
        if address.starts_with("vsock://") {
            return Err(format!(
                "{address:?}: vsock listeners are not built in this version; use tls:// on the \
                 VM's host-only network address"
            ));
        }
        return Err(format!(
            "{address:?}: a listen address is written tls://IP:PORT"
        ));
    };
    let addr: SocketAddr = rest.parse().map_err(|_| {
        format!(
            "{address:?}: the host must be a literal IP address and the port a number \
             (tls://100.64.0.5:7777, tls://[fd00::1]:7777): a name could resolve to anything"
        )
    })?;
    if addr.port() == 0 {
        return Err(format!("{address:?}: port 0 is not a port to listen on"));
    }
    if !allow_public && (addr.ip().is_unspecified() || !is_non_public(addr.ip())) {
        return Err(format!(
            "{address:?}: {} is not in a non-public range (loopback, 10/8, 172.16/12, \
             192.168/16, 100.64/10, link-local, fc00::/7, fe80::/10); listening there would \
             expose the daemon to the internet. Set [daemon] allow_public_listen = true to \
             accept that",
            addr.ip()
        ));
    }
    Ok(addr)
}

/// A bound network listener (before the sandbox; served later).
pub struct Bound {
    /// The address it listens on.
    pub addr: SocketAddr,
    listener: std::net::TcpListener,
}

/// Binds every `listen` address of the config. Runs before the sandbox.
///
/// # Errors
/// A message naming the address and the OS error.
pub fn bind_all(cfg: &crate::config::DaemonConfig) -> Result<Vec<Bound>, String> {
    let mut out = Vec::new();
    for a in &cfg.listen {
        let addr = check_listen(a, cfg.allow_public_listen)?;
        let listener =
            std::net::TcpListener::bind(addr).map_err(|e| format!("listening on {a}: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listening on {a}: {e}"))?;
        let addr = listener.local_addr().unwrap_or(addr);
        out.push(Bound { addr, listener });
    }
    Ok(out)
}

/// The TLS 1.3 server configuration for the daemon's identity (ring, as the OpenBao client).
///
/// # Errors
/// A message when rustls refuses the key or certificate.
pub fn tls_acceptor(id: &TlsIdentity) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_der.to_vec()));
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(id.cert_der.clone())], key)
        .map_err(|e| format!("TLS set-up: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Per source IP: open connections and new ones in the current minute.
#[derive(Default)]
struct PerAddress {
    live: usize,
    window: Option<Instant>,
    recent: u32,
}

/// The per-address limits of the network listeners.
#[derive(Default)]
struct Limits {
    table: Mutex<HashMap<IpAddr, PerAddress>>,
}

/// Why a connection was closed unread.
enum Over {
    Open(usize),
    Rate(u32),
    Table,
}

impl Limits {
    /// Counts a new connection from `ip`, or says which limit it is over.
    fn admit(&self, ip: IpAddr, cfg: &crate::config::DaemonConfig) -> Result<(), Over> {
        let now = Instant::now();
        let minute = Duration::from_secs(60);
        let mut t = self.table.lock().expect("limits table");
        if t.len() >= MAX_TRACKED_ADDRESSES && !t.contains_key(&ip) {
            t.retain(|_, e| e.live > 0 || e.window.is_some_and(|w| now - w < minute));
            if t.len() >= MAX_TRACKED_ADDRESSES {
                return Err(Over::Table);
            }
        }
        let e = t.entry(ip).or_default();
        if e.window.is_none_or(|w| now - w >= minute) {
            e.window = Some(now);
            e.recent = 0;
        }
        if e.live >= cfg.max_connections_per_address {
            return Err(Over::Open(cfg.max_connections_per_address));
        }
        if e.recent >= cfg.connections_per_minute_per_address {
            return Err(Over::Rate(cfg.connections_per_minute_per_address));
        }
        e.recent += 1;
        e.live += 1;
        Ok(())
    }

    fn release(&self, ip: IpAddr) {
        let mut t = self.table.lock().expect("limits table");
        if let Some(e) = t.get_mut(&ip) {
            e.live = e.live.saturating_sub(1);
        }
    }
}

/// Serves every bound listener until shutdown.
pub async fn serve(bound: Vec<Bound>, acceptor: tokio_rustls::TlsAcceptor, shared: Arc<Shared>) {
    let limits = Arc::new(Limits::default());
    for b in bound {
        let listener = match tokio::net::TcpListener::from_std(b.listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(addr = %b.addr, "cannot register a network listener: {e}");
                continue;
            }
        };
        info!(addr = %b.addr, "agentkeysd serving remote agents over TLS");
        tokio::spawn(accept_loop(
            listener,
            acceptor.clone(),
            shared.clone(),
            limits.clone(),
        ));
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    limits: Arc<Limits>,
) {
    let mut stop = shared.shutdown.subscribe();
    // Refusals are logged at most once a second per listener, so a flood cannot fill the log.
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        let (sock, from) = tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept on a network listener failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(over) = limits.admit(from.ip(), &shared.cfg) {
            if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_refusal_log = Some(Instant::now());
                match over {
                    Over::Open(n) => warn!(
                        %from,
                        "refused a network connection: {n} already open from this address (max_connections_per_address)"
                    ),
                    Over::Rate(n) => warn!(
                        %from,
                        "refused a network connection: over {n} new connections a minute from this address (connections_per_minute_per_address)"
                    ),
                    Over::Table => warn!(
                        %from,
                        "refused a network connection: too many source addresses at once"
                    ),
                }
            }
            drop(sock);
            continue;
        }
        let Some((id, kick)) = register(&shared) else {
            limits.release(from.ip());
            drop(sock);
            continue;
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            serve_one(sock, from, acceptor, &shared, id, kick).await;
            shared.closed(id);
            limits.release(from.ip());
        });
    }
}

/// Enters a network connection into the connection table (the unix socket's caps apply:
/// `max_connections`, and `max_pending` closes the oldest connection without a hello).
fn register(shared: &Shared) -> Option<(u64, Arc<Notify>)> {
    let kick = Arc::new(Notify::new());
    let evict = {
        let mut t = shared.conns.lock().expect("conn table");
        if t.live.len() >= shared.cfg.max_connections {
            drop(t);
            warn!(
                "refused a network connection: {} connections open (max_connections)",
                shared.cfg.max_connections
            );
            return None;
        }
        t.next_id += 1;
        let id = t.next_id;
        t.live.insert(
            id,
            ConnEntry {
                principal: None,
                // No uid crosses a network; the daemon's own stands in (remote sessions are
                // bound to none, see `Sessions::check`).
                uid: nix::unistd::geteuid().as_raw(),
                kick: kick.clone(),
            },
        );
        t.pending.push_back(id);
        let mut evict = None;
        if t.pending.len() > shared.cfg.max_pending
            && let Some(old) = t.pending.pop_front()
        {
            evict = t.live.get(&old).map(|e| e.kick.clone());
        }
        (id, evict)
    };
    let (id, evict) = evict;
    if let Some(k) = evict {
        k.notify_one();
    }
    Some((id, kick))
}

/// Why no frame was read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream (cleanly, or mid-frame).
    #[error("connection closed")]
    Closed,
    /// The length prefix is over the cap (nothing of the body was read).
    #[error("message exceeds {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    /// A zero length.
    #[error("empty message")]
    Empty,
    /// Socket or TLS error.
    #[error("receive failed: {0}")]
    Io(std::io::Error),
}

/// Reads one frame: a 4-byte big-endian length, then that many bytes, into a buffer wiped on
/// drop. The length is checked before anything else is read.
///
/// # Errors
/// [`FrameError`].
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Zeroizing<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(eof_or_io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooLarge);
    }
    let mut buf = Zeroizing::new(vec![0u8; len]);
    r.read_exact(&mut buf).await.map_err(eof_or_io)?;
    Ok(buf)
}

fn eof_or_io(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Closed
    } else {
        FrameError::Io(e)
    }
}

/// Writes one frame (length, bytes) and flushes.
///
/// # Errors
/// The I/O error; a message over the cap is refused before anything is written.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    if bytes.is_empty() || bytes.len() > MAX_MESSAGE_BYTES {
        return Err(std::io::Error::other("a frame must hold 1 to 64 KiB"));
    }
    // One buffer, one TLS record where it fits: the length alone would cost a record of its own.
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len() + 4));
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    w.write_all(&out).await?;
    w.flush().await
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, id: u64, body: ResponseBody) -> bool {
    let bytes = match wire::encode(&Response {
        v: PROTOCOL_VERSION,
        id,
        body,
    }) {
        Ok(b) => b,
        Err(e) => {
            warn!("encoding a response failed: {e}");
            return false;
        }
    };
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, write_frame(w, &bytes)).await,
        Ok(Ok(()))
    )
}

fn error(code: ErrorCode, message: impl Into<String>) -> ResponseBody {
    ResponseBody::Error {
        code,
        message: message.into(),
    }
}

/// What to do with a frame that is not a request.
struct Refusal {
    /// The answer (`None`: close silently, the peer is gone).
    body: Option<ResponseBody>,
    /// Close after answering: a bad length leaves the stream out of step.
    close: bool,
}

/// A frame as a request, or what to answer instead.
fn parse(r: Result<Zeroizing<Vec<u8>>, FrameError>) -> Result<Request, Refusal> {
    let bytes = match r {
        Ok(b) => b,
        Err(FrameError::Closed | FrameError::Io(_)) => {
            return Err(Refusal {
                body: None,
                close: true,
            });
        }
        Err(FrameError::TooLarge) => {
            return Err(Refusal {
                body: Some(error(
                    ErrorCode::TooLarge,
                    format!("message exceeds {MAX_MESSAGE_BYTES} bytes; closing the connection"),
                )),
                close: true,
            });
        }
        Err(FrameError::Empty) => {
            return Err(Refusal {
                body: Some(error(
                    ErrorCode::BadRequest,
                    "empty message; closing the connection",
                )),
                close: true,
            });
        }
    };
    // A malformed message in a well-formed frame: answered, and the stream stays in step.
    wire::decode_request(&bytes).map_err(|e| Refusal {
        body: Some(error(e.code(), e.to_string())),
        close: false,
    })
}

/// One network connection: TLS, a hello within the handshake timeout, then requests.
async fn serve_one(
    sock: TcpStream,
    from: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: &Arc<Shared>,
    id: u64,
    kick: Arc<Notify>,
) {
    let mut stop = shared.shutdown.subscribe();
    let deadline = tokio::time::Instant::now() + shared.cfg.handshake_timeout;
    // The TLS handshake and the hello share the handshake timeout: a client that trickles
    // bytes (slowloris) is closed when it runs out.
    let opened = async {
        let mut tls = acceptor
            .accept(sock)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let first = read_frame(&mut tls).await;
        Ok::<_, String>((tls, first))
    };
    let (mut tls, first) = tokio::select! {
        biased;
        r = tokio::time::timeout_at(deadline, opened) => match r {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                debug!(%from, "closing: {e}");
                return;
            }
            Err(_) => {
                debug!(%from, "closing: no TLS handshake and hello within the handshake timeout");
                return;
            }
        },
        // Evicted as the oldest connection without a hello (max_pending).
        _ = kick.notified() => return,
        _ = stop.changed() => return,
    };
    let req = match parse(first) {
        Ok(r) => r,
        Err(refusal) => {
            if let Some(body) = refusal.body {
                send(&mut tls, 0, body).await;
            }
            return;
        }
    };
    let principal = match req.body {
        RequestBody::Hello { token } => {
            let r = shared
                .sessions
                .authenticate_network(&token.0)
                .or_else(|e| match e {
                    AuthError::Unknown => {
                        shared.refresh();
                        shared.sessions.authenticate_network(&token.0)
                    }
                    other => Err(other),
                });
            drop(token);
            match r {
                Ok(p) => p,
                Err(e) => {
                    warn!(conn = id, %from, "hello refused on a network listener: {e}");
                    send(&mut tls, req.id, error(auth_code(&e), e.to_string())).await;
                    return;
                }
            }
        }
        _ => {
            send(
                &mut tls,
                req.id,
                error(
                    ErrorCode::Unauthenticated,
                    "the first message must be a hello with a session token",
                ),
            )
            .await;
            return;
        }
    };
    let _ = tokio::time::timeout(Duration::ZERO, kick.notified()).await;
    info!(conn = id, %from, principal = ?principal, "network session opened");
    shared.authenticated(id, principal.clone());
    if !send(
        &mut tls,
        req.id,
        ResponseBody::Welcome(Box::new(shared.sessions.info(&principal))),
    )
    .await
    {
        return;
    }
    let peer = Peer {
        uid: nix::unistd::geteuid().as_raw(),
        pid: 0,
        addr: Some(from),
    };
    loop {
        let r = tokio::select! {
            r = read_frame(&mut tls) => r,
            _ = kick.notified() => {
                if let Err(e) = shared.sessions.check(&principal, None) {
                    send(&mut tls, 0, error(auth_code(&e), e.to_string())).await;
                }
                return;
            }
            _ = stop.changed() => return,
        };
        let req = match parse(r) {
            Ok(r) => r,
            Err(Refusal { body: None, .. }) => return,
            Err(Refusal {
                body: Some(body),
                close,
            }) => {
                if !send(&mut tls, 0, body).await || close {
                    return;
                }
                continue;
            }
        };
        shared.refresh();
        if let Err(e) = shared.sessions.check(&principal, None) {
            send(&mut tls, req.id, error(auth_code(&e), e.to_string())).await;
            return;
        }
        let (reply, ticket) =
            crate::auditor::collect_async(network_request(shared, &principal, peer, req.body))
                .await;
        let mut reply = reply;
        if let Err(message) = shared.audit_durable(ticket).await {
            reply = Reply {
                body: error(ErrorCode::Internal, message),
                close: reply.close,
                after: reply.after,
            };
        }
        let sent = send(&mut tls, req.id, reply.body).await;
        if let Some(after) = reply.after
            && let Some((service, delivery)) = after.drop
        {
            shared.audit_best_effort(&Event {
                event: "drop",
                who: Some(principal.who()),
                service: Some(&service),
                delivery: Some(delivery),
                degraded: false,
                peer: Some(peer),
                outcome: if sent { "ok" } else { "error" },
                detail: if sent {
                    None
                } else {
                    Some("the answer could not be sent")
                },
            });
        }
        if !sent || reply.close {
            let _ = tls.shutdown().await;
            return;
        }
    }
}

/// One request of a network principal.
async fn network_request(
    shared: &Arc<Shared>,
    p: &Principal,
    peer: Peer,
    body: RequestBody,
) -> Reply {
    let plain = |body| Reply {
        body,
        close: false,
        after: None,
    };
    match body {
        RequestBody::Run { .. } => plain(error(
            ErrorCode::Forbidden,
            "run is not served over a network link: the remote daemon launches programs \
             itself (`agentkeys run` on the agent's host), with values it fetches from here",
        )),
        RequestBody::Signal { .. } => plain(error(
            ErrorCode::BadRequest,
            "no program is running on this connection",
        )),
        // No fd crosses a network: the value travels inline inside TLS, whatever the
        // service's allow_inline (which governs local agents), sealed under the requester's
        // one-time key so that its TLS buffers hold only ciphertext.
        RequestBody::GetCredential {
            service, wrap_key, ..
        } => {
            let Some(key) = wrap_key.and_then(|k| crate::remote::parse_wrap_key(&k.0)) else {
                return plain(error(
                    ErrorCode::BadRequest,
                    "over a network link get_credential needs wrap_key (32 random bytes, \
                     base64, used once): the value is sealed under it",
                ));
            };
            let d = crate::delivery::get_credential(shared, p, peer, &service, true).await;
            Reply {
                body: seal_answer(d.body, &key),
                close: false,
                after: Some(d.after),
            }
        }
        other => handle(shared, p, peer, other).await,
    }
}

/// An inline credential answer, its value sealed under `key` (`delivery: "sealed"`); any other
/// answer unchanged. The plaintext copies are wiped.
fn seal_answer(body: ResponseBody, key: &Zeroizing<[u8; 32]>) -> ResponseBody {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    match body {
        ResponseBody::Credential {
            service,
            degraded,
            len,
            value_b64: Some(v),
            ..
        } => {
            let v = Zeroizing::new(v);
            let mut plain = Zeroizing::new(Vec::with_capacity(len));
            if b64.decode_vec(v.as_bytes(), &mut plain).is_err() {
                return error(ErrorCode::Internal, "sealing the value failed");
            }
            match crate::remote::seal_value(key, &service, &plain) {
                Ok(sealed) => ResponseBody::Credential {
                    service,
                    delivery: "sealed".into(),
                    degraded,
                    len,
                    value_b64: Some(b64.encode(sealed)),
                },
                Err(_) => error(ErrorCode::Internal, "sealing the value failed"),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_follow_the_rules() {
        for ok in [
            "tls://127.0.0.1:7777",
            "tls://10.1.2.3:1",
            "tls://172.16.0.1:7777",
            "tls://172.31.255.255:7777",
            "tls://192.168.1.1:7777",
            "tls://100.64.0.5:7777",
            "tls://100.127.255.254:7777",
            "tls://169.254.1.1:7777",
            "tls://[::1]:7777",
            "tls://[fd00::1]:7777",
            "tls://[fe80::1]:7777",
            "tls://[::ffff:10.0.0.1]:7777",
        ] {
            assert!(
                check_listen(ok, false).is_ok(),
                "{ok}: {:?}",
                check_listen(ok, false)
            );
        }
        let cases: &[(&str, &str)] = &[
            ("tcp://127.0.0.1:7777", "plaintext TCP is never served"),
            ("http://127.0.0.1:7777", "plaintext TCP is never served"),
            ("127.0.0.1:7777", "tls://IP:PORT"),
            ("vsock://3:7777", "not built"),
            ("tls://localhost:7777", "literal IP"),
            ("tls://agentkeys.example:7777", "literal IP"),
            ("tls://127.0.0.1", "literal IP"),
            ("tls://127.0.0.1:0", "port 0"),
            ("tls://8.8.8.8:7777", "non-public range"),
            ("tls://100.128.0.1:7777", "non-public range"),
            ("tls://172.32.0.1:7777", "non-public range"),
            ("tls://0.0.0.0:7777", "non-public range"),
            ("tls://[::]:7777", "non-public range"),
            ("tls://[2001:db8::1]:7777", "non-public range"),
            ("tls://[::ffff:8.8.8.8]:7777", "non-public range"),
        ];
        for (bad, why) in cases {
            let e = check_listen(bad, false).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // The opt-in lifts the range rule only.
        assert!(check_listen("tls://8.8.8.8:7777", true).is_ok());
        assert!(check_listen("tls://0.0.0.0:7777", true).is_ok());
        assert!(check_listen("tcp://8.8.8.8:7777", true).is_err());
    }

    #[tokio::test]
    async fn frames_are_capped_before_reading() {
        // A length over the cap is refused without reading (or allocating) the body.
        let mut over: &[u8] = &((MAX_MESSAGE_BYTES as u32 + 1).to_be_bytes());
        assert!(matches!(
            read_frame(&mut over).await,
            Err(FrameError::TooLarge)
        ));
        let mut huge: &[u8] = &u32::MAX.to_be_bytes();
        assert!(matches!(
            read_frame(&mut huge).await,
            Err(FrameError::TooLarge)
        ));
        let mut empty: &[u8] = &0u32.to_be_bytes();
        assert!(matches!(
            read_frame(&mut empty).await,
            Err(FrameError::Empty)
        ));
        // Cut short: closed, not a partial message.
        let mut cut: &[u8] = &[0, 0, 0, 9, b'{'];
        assert!(matches!(
            read_frame(&mut cut).await,
            Err(FrameError::Closed)
        ));
        // A round trip.
        let mut out = Vec::new();
        write_frame(&mut out, b"{\"v\":1}").await.unwrap();
        let mut r: &[u8] = &out;
        assert_eq!(&read_frame(&mut r).await.unwrap()[..], b"{\"v\":1}");
        assert!(
            write_frame(&mut out, &vec![b'x'; MAX_MESSAGE_BYTES + 1])
                .await
                .is_err()
        );
    }

    #[test]
    fn per_address_limits() {
        let cfg = crate::config::DaemonConfig {
            max_connections_per_address: 2,
            connections_per_minute_per_address: 3,
            ..Default::default()
        };
        let l = Limits::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.admit(a, &cfg).is_ok());
        assert!(l.admit(a, &cfg).is_ok());
        assert!(matches!(l.admit(a, &cfg), Err(Over::Open(2))));
        // Another address is not affected.
        assert!(l.admit(b, &cfg).is_ok());
        l.release(a);
        assert!(
            l.admit(a, &cfg).is_ok(),
            "a closed connection frees its place"
        );
        l.release(a);
        // Three new connections this minute already: the rate limit holds although one is free.
        assert!(matches!(l.admit(a, &cfg), Err(Over::Rate(3))));
    }
}
