//! The `kind = "agentkeys"` backend: this daemon is a remote agent of the owner's agentkeysd,
//! reached over TLS on one of its network listeners ([`crate::listen`]).
//!
//! ```toml
//! [backends.owner]
//! kind = "agentkeys"
//! address = "tls://100.64.0.5:7777"
//! fingerprint = "sha256:..."          # `agentkeys remote info` on the owner's host
//! token_file = "/home/me/.config/agentkeys/owner.token"  # `agent add NAME --remote --out`
//! timeout = "5s"
//!
//! [services.github]
//! backend = "owner"
//! # path = "gh"                       # its name on the owner's daemon, if different
//! ```
//!
//! - **Pinning**: the owner's certificate must hash (SHA-256, whole DER) to `fingerprint`;
//!   names, CAs and dates play no part. The check is inside the TLS handshake, so nothing of
//!   ours, not even the hello, is sent to a server that fails it. A new certificate on the
//!   owner's side (its `tls.enc` replaced) is refused until the pin is updated: never trusted
//!   on first sight.
//! - **Link**: TLS 1.3 only, one long-lived connection, the unix socket's messages in
//!   length-prefixed frames ([`crate::listen::read_frame`]). Requests are serialised on it.
//!   A stale connection (the owner's daemon restarted) is replaced once within the same
//!   request; when connecting fails, further attempts wait a back-off (0.5 s doubling to 5 s),
//!   during which requests fail at once with `unavailable`; the next request after it
//!   reconnects. No background work.
//! - **Values** arrive inline (base64 inside TLS), are checked against the announced length,
//!   decoded into a zeroizing buffer and put into this daemon's secret pages by the caller
//!   (`delivery`, `run`); never logged.
//! - **Pending**: a high-value service on the owner's side answers `pending` with a code;
//!   it reaches this daemon's agent as a `pending` answer carrying the code, and the owner
//!   approves it on the owner's host. The grant belongs to this daemon's session there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentkeys_proto::wire::{
    self, ErrorCode, PROTOCOL_VERSION, Request, RequestBody, ResponseBody, SessionInfo, WireToken,
};
use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::config::BackendConfig;
use crate::listen::{read_frame, write_frame};

/// First wait after a failed connection attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest approval code accepted from the owner's daemon.
const MAX_CODE: usize = 32;

/// Parses `tls://IP:PORT` (a literal IP: the certificate is pinned, a name would only add a
/// resolver to trust).
///
/// # Errors
/// The expected form.
pub fn parse_address(address: &str) -> Result<SocketAddr, String> {
    let form = "the owner's daemon is written tls://IP:PORT (a literal IP address and its \
                listen port, as `agentkeys remote info` prints them)";
    let rest = address
        .strip_prefix("tls://")
        .ok_or_else(|| format!("{address:?}: {form}"))?;
    let addr: SocketAddr = rest.parse().map_err(|_| format!("{address:?}: {form}"))?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(format!("{address:?}: {form}"));
    }
    Ok(addr)
}

/// Why a read through the owner's daemon failed. Messages never carry a value or the token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// Not reachable (refused, timed out, TLS failed, the link broke), or backing off.
    #[error("backend {backend:?} (the owner's agentkeysd at {address}) is unavailable: {detail}")]
    Unavailable {
        /// The backend's name.
        backend: String,
        /// `tls://IP:PORT`.
        address: String,
        /// What failed.
        detail: String,
    },
    /// The owner's certificate is not the pinned one: nothing was sent.
    #[error(
        "backend {backend:?} (the owner's agentkeysd at {address}) presented certificate {seen}, not the pinned {pinned}: nothing was sent. If the owner made a new certificate, compare `agentkeys remote info` on the owner's host and update fingerprint in config.toml"
    )]
    Fingerprint {
        /// The backend's name.
        backend: String,
        /// `tls://IP:PORT`.
        address: String,
        /// What it presented.
        seen: String,
        /// What is pinned.
        pinned: String,
    },
    /// The owner's daemon refused this daemon's token (revoked, expired, replaced, unknown, or
    /// not a remote agent's).
    #[error("backend {backend:?}: the owner's agentkeysd refused this daemon's token: {detail}")]
    Auth {
        /// The backend's name.
        backend: String,
        /// Its reason (bounded, control characters removed).
        detail: String,
    },
    /// The owner's daemon answered the request with a refusal (scope, not found, ...).
    #[error("backend {backend:?}: the owner's agentkeysd refused: {detail}")]
    Refused {
        /// The backend's name.
        backend: String,
        /// Its wire code, passed on.
        code: ErrorCode,
        /// Its reason (bounded, control characters removed).
        detail: String,
    },
    /// A high-value service waits for the owner's approval.
    #[error("the owner's agentkeysd holds {service:?} for approval (code {code})")]
    Pending {
        /// The approval code on the owner's daemon.
        code: String,
        /// The service (its name here).
        service: String,
        /// Seconds until the request expires there.
        expires_in_secs: u64,
        /// The owner's identity, for the message.
        owner: String,
    },
    /// An answer that is not what the protocol promises.
    #[error("backend {backend:?} gave an unexpected answer: {detail}")]
    Protocol {
        /// The backend's name.
        backend: String,
        /// What was wrong.
        detail: String,
    },
}

impl RemoteError {
    /// The wire code this daemon's caller gets.
    pub fn code(&self) -> ErrorCode {
        match self {
            RemoteError::Refused { code, .. } => match code {
                ErrorCode::Forbidden | ErrorCode::NotFound | ErrorCode::BadRequest => *code,
                _ => ErrorCode::Unavailable,
            },
            _ => ErrorCode::Unavailable,
        }
    }

    /// A fixed phrase for the audit record.
    pub fn audit_detail(&self) -> &'static str {
        match self {
            RemoteError::Unavailable { .. } => "owner's daemon unavailable",
            RemoteError::Fingerprint { .. } => "owner's daemon certificate not the pinned one",
            RemoteError::Auth { .. } => "owner's daemon refused this daemon's token",
            RemoteError::Refused { .. } => "owner's daemon refused the request",
            RemoteError::Pending { .. } => "pending approval on the owner's daemon",
            RemoteError::Protocol { .. } => "unexpected answer from the owner's daemon",
        }
    }

    /// The `pending` answer for this daemon's caller, for [`RemoteError::Pending`].
    pub fn pending_answer(&self) -> Option<ResponseBody> {
        match self {
            RemoteError::Pending {
                code,
                service,
                expires_in_secs,
                owner,
            } => Some(ResponseBody::Pending {
                code: code.clone(),
                service: service.clone(),
                expires_in_secs: *expires_in_secs,
                message: format!(
                    "{service:?} is high-value on the owner's agentkeysd ({owner}): the owner \
                     approves it there with `agentkeys approve {code}` (or denies it), then ask \
                     again"
                ),
            }),
            _ => None,
        }
    }
}

/// Associated data of a sealed value: this prefix, then the service's name on the owner's side.
const SEALED_AAD: &[u8] = b"agentkeys sealed value v1\0";

/// Seals `plain` under a requester's one-time `key` (XChaCha20-Poly1305, random nonce), bound
/// to `service`: what the owner's daemon sends a network principal.
///
/// # Errors
/// The cipher's error (not expected).
pub fn seal_value(
    key: &[u8; 32],
    service: &str,
    plain: &[u8],
) -> Result<Vec<u8>, agentkeys_state::StateError> {
    let aad = [SEALED_AAD, service.as_bytes()].concat();
    agentkeys_state::crypto::seal(key, &aad, plain)
}

/// Opens what [`seal_value`] made.
///
/// # Errors
/// Wrong key, service or any changed bit.
pub fn open_value(
    key: &[u8; 32],
    service: &str,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, agentkeys_state::StateError> {
    let aad = [SEALED_AAD, service.as_bytes()].concat();
    agentkeys_state::crypto::open(key, &aad, sealed)
}

/// A `wrap_key` from the wire: exactly 32 bytes, base64.
pub fn parse_wrap_key(k: &secrecy::SecretString) -> Option<Zeroizing<[u8; 32]>> {
    use secrecy::ExposeSecret;
    let mut bytes = Zeroizing::new(Vec::with_capacity(48));
    base64::engine::general_purpose::STANDARD
        .decode_vec(k.expose_secret().as_bytes(), &mut bytes)
        .ok()?;
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return None;
    }
    key.copy_from_slice(&bytes);
    Some(key)
}

/// A fresh one-time key, and its wire form.
fn new_wrap_key() -> Result<(Zeroizing<[u8; 32]>, WireToken), String> {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut *key).map_err(|e| format!("random wrap key: {e}"))?;
    let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*key));
    Ok((
        key,
        WireToken(secrecy::SecretString::from(text.as_str().to_string())),
    ))
}

/// Text from the other daemon, for our messages: bounded, without control characters.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect::<String>()
}

/// The pinned-certificate check, run inside the TLS handshake.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// The fingerprint the server presented last time it did not match, for the error.
    mismatch: Mutex<Option<String>>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let seen: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if bool::from(seen.ct_eq(&self.pin)) {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.mismatch.lock().expect("pin lock") =
                Some(agentkeys_state::tls::fingerprint(end_entity.as_ref()));
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The open link and what the owner's daemon said about this daemon's session.
struct Link {
    tls: TlsStream<TcpStream>,
    next_id: u64,
}

/// Connection attempts and what is known of the other side, for back-off and `doctor`.
#[derive(Default)]
struct Health {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// `ak-… as agent "vm1" (s-…)`, from the last welcome.
    session: Option<String>,
    owner: Option<String>,
}

/// One `kind = "agentkeys"` backend.
pub struct RemoteDaemon {
    name: String,
    address: String,
    addr: SocketAddr,
    pinned: String,
    token_file: PathBuf,
    timeout: Duration,
    connector: tokio_rustls::TlsConnector,
    verifier: Arc<Pinned>,
    link: tokio::sync::Mutex<Option<Link>>,
    health: Mutex<Health>,
}

impl RemoteDaemon {
    /// Builds the backend from its checked config. Makes no connection.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn new(name: &str, cfg: &BackendConfig) -> Result<RemoteDaemon, String> {
        let key = format!("backends.{name}");
        let addr = parse_address(&cfg.address).map_err(|e| format!("{key}.address: {e}"))?;
        let fp = cfg
            .fingerprint
            .as_deref()
            .ok_or_else(|| format!("{key}.fingerprint: required"))?;
        let pin = agentkeys_state::tls::parse_fingerprint(fp)
            .map_err(|e| format!("{key}.fingerprint: {e}"))?;
        let token_file = cfg
            .token_file
            .clone()
            .ok_or_else(|| format!("{key}.token_file: required"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(Pinned {
            pin,
            provider: provider.clone(),
            mismatch: Mutex::new(None),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("{key}: TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        let mut pinned = String::from("sha256:");
        for b in pin {
            pinned.push_str(&format!("{b:02x}"));
        }
        Ok(RemoteDaemon {
            name: name.to_string(),
            address: cfg.address.clone(),
            addr,
            pinned,
            token_file,
            timeout: cfg.timeout,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            verifier,
            link: tokio::sync::Mutex::new(None),
            health: Mutex::new(Health::default()),
        })
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// For `agentkeys doctor`: whether the last attempt worked, and the state in words.
    pub fn health(&self) -> (bool, String) {
        let h = self.health.lock().expect("health lock");
        let mut detail = format!(
            "{} at {} (pinned {}): ",
            self.name, self.address, self.pinned
        );
        let ok = h.failures == 0;
        match (&h.session, &h.last_error) {
            (_, Some(e)) if h.failures > 0 => detail.push_str(&format!("failing: {e}")),
            (Some(s), _) => detail.push_str(&format!("connected as {s}")),
            (None, _) => detail.push_str("not connected yet (connects on the first request)"),
        }
        (ok, detail)
    }

    /// `owner's daemon ak-… as agent "vm1" (s-…)`: who this daemon is over there, for audit
    /// details (known once connected).
    pub fn session_note(&self) -> Option<String> {
        self.health
            .lock()
            .expect("health lock")
            .session
            .as_ref()
            .map(|s| format!("via backend {}: {s}", self.name))
    }

    fn unavailable(&self, detail: impl Into<String>) -> RemoteError {
        RemoteError::Unavailable {
            backend: self.name.clone(),
            address: self.address.clone(),
            detail: detail.into(),
        }
    }

    /// Reads `service` (its name on the owner's daemon; `local` is its name here), within the
    /// backend's timeout all told.
    ///
    /// # Errors
    /// [`RemoteError`].
    pub async fn read(
        &self,
        service: &str,
        local: &str,
    ) -> Result<Zeroizing<Vec<u8>>, RemoteError> {
        match tokio::time::timeout(self.timeout, self.read_unbounded(service, local)).await {
            Ok(r) => r,
            Err(_) => {
                // The link may hold half an exchange: it is not reused.
                if let Ok(mut l) = self.link.try_lock() {
                    *l = None;
                }
                self.failed(format!(
                    "no answer within {:.1} s",
                    self.timeout.as_secs_f64()
                ));
                Err(self.unavailable(format!(
                    "no answer within {:.1} s",
                    self.timeout.as_secs_f64()
                )))
            }
        }
    }

    async fn read_unbounded(
        &self,
        service: &str,
        local: &str,
    ) -> Result<Zeroizing<Vec<u8>>, RemoteError> {
        let mut link = self.link.lock().await;
        // A link that was open before this request may have died meanwhile (the owner's
        // daemon restarted): one fresh connection is tried at once in that case.
        let reused = link.is_some();
        if link.is_none() {
            *link = Some(self.connect().await?);
        }
        let first = self
            .ask(link.as_mut().expect("link just set"), service)
            .await;
        let answer = match first {
            Err(Broken(detail)) if reused => {
                info!(backend = %self.name, "the link to the owner's daemon broke ({detail}); reconnecting");
                *link = None;
                *link = Some(self.connect().await?);
                self.ask(link.as_mut().expect("link just set"), service)
                    .await
            }
            other => other,
        };
        let answer = match answer {
            Ok(a) => a,
            Err(Broken(detail)) => {
                *link = None;
                self.failed(detail.clone());
                return Err(self.unavailable(format!("the link broke: {detail}")));
            }
        };
        self.answer(answer, service, local, &mut link)
    }

    /// Turns the owner's answer into the value or the error.
    fn answer(
        &self,
        answer: Answer,
        service: &str,
        local: &str,
        link: &mut Option<Link>,
    ) -> Result<Zeroizing<Vec<u8>>, RemoteError> {
        let Answer { body, key } = answer;
        let protocol = |detail: &str| RemoteError::Protocol {
            backend: self.name.clone(),
            detail: detail.to_string(),
        };
        match body {
            ResponseBody::Credential {
                service: s,
                len,
                delivery,
                value_b64: Some(v),
                ..
            } => {
                // Ciphertext: the value is sealed under this request's one-time key.
                if s != service || delivery != "sealed" {
                    *link = None;
                    return Err(protocol("a credential for another service, or not sealed"));
                }
                let sealed_len = len.saturating_add(agentkeys_state::crypto::SEAL_OVERHEAD);
                if v.len() != sealed_len.div_ceil(3).saturating_mul(4) {
                    *link = None;
                    return Err(protocol("a credential whose length does not match"));
                }
                let sealed = base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .map_err(|_| protocol("a credential that is not base64"))?;
                let out = open_value(&key, service, &sealed)
                    .map_err(|_| protocol("a sealed credential that does not open"))?;
                drop(key);
                if out.len() != len {
                    return Err(protocol("a credential whose length does not match"));
                }
                Ok(out)
            }
            ResponseBody::Pending {
                code,
                service: s,
                expires_in_secs,
                ..
            } => {
                let code_ok = !code.is_empty()
                    && code.len() <= MAX_CODE
                    && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if !code_ok || s != service {
                    *link = None;
                    return Err(protocol("a pending answer without a valid code"));
                }
                let owner = self
                    .health
                    .lock()
                    .expect("health lock")
                    .owner
                    .clone()
                    .unwrap_or_else(|| "the owner's host".into());
                Err(RemoteError::Pending {
                    code,
                    service: local.to_string(),
                    expires_in_secs: expires_in_secs.min(24 * 3600),
                    owner,
                })
            }
            ResponseBody::Error { code, message } => {
                let detail = clean(&message);
                match code {
                    ErrorCode::Unauthenticated | ErrorCode::Revoked | ErrorCode::Expired => {
                        // The owner's daemon closes the connection after this.
                        *link = None;
                        self.failed(format!("token refused: {detail}"));
                        Err(RemoteError::Auth {
                            backend: self.name.clone(),
                            detail,
                        })
                    }
                    code => Err(RemoteError::Refused {
                        backend: self.name.clone(),
                        code,
                        detail,
                    }),
                }
            }
            other => {
                *link = None;
                Err(protocol(&format!(
                    "a {:?} answer to get_credential",
                    other.kind()
                )))
            }
        }
    }

    /// One request and its answer on an open link, under a fresh one-time wrap key.
    async fn ask(&self, link: &mut Link, service: &str) -> Result<Answer, Broken> {
        link.next_id += 1;
        let id = link.next_id;
        let (key, wire_key) = new_wrap_key().map_err(Broken)?;
        let req = Request {
            v: PROTOCOL_VERSION,
            id,
            body: RequestBody::GetCredential {
                service: service.to_string(),
                inline: true,
                wrap_key: Some(wire_key),
            },
        };
        let bytes = wire::encode(&req).map_err(|e| Broken(e.to_string()))?;
        write_frame(&mut link.tls, &bytes)
            .await
            .map_err(|e| Broken(format!("sending: {e}")))?;
        loop {
            let frame = read_frame(&mut link.tls)
                .await
                .map_err(|e| Broken(format!("receiving: {e}")))?;
            let resp =
                wire::decode_response(&frame).map_err(|e| Broken(format!("its answer: {e}")))?;
            // id 0: something about the connection itself (a revocation notice before it
            // closes); answered as the request's outcome.
            if resp.id == id || resp.id == 0 {
                return Ok(Answer {
                    body: resp.body,
                    key,
                });
            }
        }
    }

    /// Connects, checks the pinned certificate inside the TLS handshake, reads the token file
    /// and says hello. Respects the back-off after failures.
    async fn connect(&self) -> Result<Link, RemoteError> {
        {
            let h = self.health.lock().expect("health lock");
            if let Some(at) = h.retry_at
                && Instant::now() < at
            {
                let wait = at - Instant::now();
                return Err(self.unavailable(format!(
                    "{}; next attempt in {:.1} s",
                    h.last_error.as_deref().unwrap_or("the last attempt failed"),
                    wait.as_secs_f64()
                )));
            }
        }
        match self.connect_now().await {
            Ok(l) => Ok(l),
            Err(e) => {
                let detail = match &e {
                    RemoteError::Unavailable { detail, .. } => detail.clone(),
                    other => other.to_string(),
                };
                self.failed(detail);
                Err(e)
            }
        }
    }

    fn failed(&self, detail: String) {
        let mut h = self.health.lock().expect("health lock");
        h.failures = h.failures.saturating_add(1);
        let wait = FIRST_BACKOFF
            .saturating_mul(1u32 << h.failures.saturating_sub(1).min(4))
            .min(MAX_BACKOFF);
        h.retry_at = Some(Instant::now() + wait);
        warn!(backend = %self.name, "the owner's daemon: {detail}; next attempt in {:.1} s at the earliest", wait.as_secs_f64());
        h.last_error = Some(detail);
    }

    async fn connect_now(&self) -> Result<Link, RemoteError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| self.unavailable(format!("connecting: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let server = ServerName::IpAddress(self.addr.ip().into());
        *self.verifier.mismatch.lock().expect("pin lock") = None;
        let tls = match self.connector.connect(server, tcp).await {
            Ok(t) => t,
            Err(e) => {
                if let Some(seen) = self.verifier.mismatch.lock().expect("pin lock").take() {
                    return Err(RemoteError::Fingerprint {
                        backend: self.name.clone(),
                        address: self.address.clone(),
                        seen,
                        pinned: self.pinned.clone(),
                    });
                }
                return Err(self.unavailable(format!("TLS handshake: {e}")));
            }
        };
        let token = crate::openbao::read_cred_file(&self.token_file, true)
            .map_err(|e| self.unavailable(format!("token_file: {e}")))?;
        let mut link = Link { tls, next_id: 1 };
        let hello = wire::encode(&Request {
            v: PROTOCOL_VERSION,
            id: 1,
            body: RequestBody::Hello {
                token: WireToken(token),
            },
        })
        .map_err(|e| self.unavailable(e.to_string()))?;
        write_frame(&mut link.tls, &hello)
            .await
            .map_err(|e| self.unavailable(format!("sending the hello: {e}")))?;
        drop(hello);
        let frame = read_frame(&mut link.tls)
            .await
            .map_err(|e| self.unavailable(format!("waiting for the welcome: {e}")))?;
        let resp = wire::decode_response(&frame).map_err(|e| RemoteError::Protocol {
            backend: self.name.clone(),
            detail: format!("its welcome: {e}"),
        })?;
        match resp.body {
            ResponseBody::Welcome(info) => {
                self.welcomed(&info);
                Ok(link)
            }
            ResponseBody::Error { message, .. } => Err(RemoteError::Auth {
                backend: self.name.clone(),
                detail: clean(&message),
            }),
            other => Err(RemoteError::Protocol {
                backend: self.name.clone(),
                detail: format!("a {:?} answer to the hello", other.kind()),
            }),
        }
    }

    fn welcomed(&self, info: &SessionInfo) {
        let who = format!(
            "{} as remote agent {:?} ({})",
            clean(&info.identity),
            clean(info.agent.as_deref().unwrap_or("?")),
            clean(info.session.as_deref().unwrap_or("?"))
        );
        info!(backend = %self.name, "connected to the owner's daemon: {who}");
        let mut h = self.health.lock().expect("health lock");
        h.failures = 0;
        h.retry_at = None;
        h.last_error = None;
        h.owner = Some(clean(&info.identity));
        h.session = Some(who);
    }
}

/// The link broke mid-request (write or read failed, or an unreadable answer).
struct Broken(String);

/// An answer and the one-time key its value is sealed under.
struct Answer {
    body: ResponseBody,
    key: Zeroizing<[u8; 32]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_literal_tls() {
        assert_eq!(
            parse_address("tls://127.0.0.1:7777").unwrap(),
            "127.0.0.1:7777".parse().unwrap()
        );
        assert!(parse_address("tls://[fd00::1]:7777").is_ok());
        for bad in [
            "tcp://127.0.0.1:7777",
            "https://127.0.0.1:7777",
            "tls://owner.example:7777",
            "tls://127.0.0.1",
            "tls://127.0.0.1:0",
            "tls://0.0.0.0:7777",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_service() {
        let (key, wire) = new_wrap_key().unwrap();
        let back = parse_wrap_key(&wire.0).unwrap();
        assert_eq!(*back, *key);
        let sealed = seal_value(&key, "github", b"value").unwrap();
        assert_eq!(&*open_value(&key, "github", &sealed).unwrap(), b"value");
        assert!(open_value(&key, "gitlab", &sealed).is_err());
        let (other, _) = new_wrap_key().unwrap();
        assert!(open_value(&other, "github", &sealed).is_err());
        for bad in ["", "AAAA", &"A".repeat(44), "not base64!"] {
            assert!(
                parse_wrap_key(&secrecy::SecretString::from(bad)).is_none(),
                "{bad}"
            );
        }
    }

    /// The pin decides alone: the right certificate passes, any other fails, and the one it
    /// saw is kept for the error message.
    #[test]
    fn the_pin_decides() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        let pin = agentkeys_state::tls::parse_fingerprint(&agentkeys_state::tls::fingerprint(
            der.as_ref(),
        ))
        .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v = Pinned {
            pin,
            provider: provider.clone(),
            mismatch: Mutex::new(None),
        };
        let name = ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
        assert!(
            v.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        let mut other = pin;
        other[0] ^= 1;
        let w = Pinned {
            pin: other,
            provider,
            mismatch: Mutex::new(None),
        };
        assert!(
            w.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .is_err()
        );
        assert_eq!(
            w.mismatch.lock().unwrap().as_deref(),
            Some(agentkeys_state::tls::fingerprint(der.as_ref()).as_str())
        );
    }
}
