//! The OpenBao / HashiCorp Vault backend: KV v2 reads with the daemon's own identity.
//!
//! The daemon logs in with its own AppRole (or a token file an operator provisions for it),
//! never with a human's token. Its token is a [`SecretString`], sent only as the
//! `X-Vault-Token` header marked sensitive. A background task renews it at about two thirds of
//! its TTL; when renewal is refused, or the server caps the renewal because the token's max
//! TTL is near, the daemon logs in afresh. Logins are single-flight and at most one per
//! [`MIN_LOGIN_INTERVAL`] per backend, whoever asks (the refresher or a read that found no
//! token), so an outage or a wrong secret_id cannot turn into a login storm; the refresher
//! backs off exponentially (1 s to 30 s, with jitter) while failures last.
//!
//! Credentials go only to a server whose identity the daemon has checked: `https://` with
//! certificate verification (the host's roots or `ca_file`), or a `unix://` socket whose
//! owner, directory chain and listening process the daemon checks before every request
//! ([`unix`]). Plain `http://` (loopback only) takes `allow_plain_http = true`, and then the
//! log warns at start and `doctor` reports the backend `degraded`.
//!
//! Every request has a time limit (`timeout` in the config, connection included), redirects
//! are not followed (a redirect would carry the token elsewhere), no proxy is used, and
//! response bodies are read into zeroize-on-drop buffers of at most [`MAX_BODY`] bytes. Every
//! number in an answer is bounded before use and the token arithmetic is checked ([`answer`]):
//! no answer can make the daemon panic. Errors name the backend, its address and the path,
//! never a value or a token.

pub mod answer;
pub mod unix;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentkeys_proto::wire::ErrorCode;
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::config::{Address, BackendConfig, check_address, is_loopback};
use answer::{AnswerError, Lease, first_error};
use unix::{SocketTrustError, Trusted, UnixError, UnixTransport};

/// Largest response body read from a backend.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest credential file (token, role_id, secret_id) read.
const MAX_CRED_FILE: u64 = 4096;
/// At most one login per backend in this interval.
pub const MIN_LOGIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between the refresher's attempts while a backend is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A token this close to its expiry is not used; a fresh one is obtained first.
const EXPIRY_MARGIN: Duration = Duration::from_millis(250);

/// Why a read from a backend failed. Messages name the backend, address and path; never a
/// value, a token or a secret_id.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// No connection (refused, unreachable, DNS, TLS).
    #[error("backend {backend:?} ({address}) is unreachable: {detail}")]
    Unreachable {
        /// The backend's name.
        backend: String,
        /// Its address.
        address: String,
        /// What failed.
        detail: String,
    },
    /// The server's identity could not be established (a unix socket whose owner, directory
    /// chain or listening process is not trusted): nothing was sent.
    #[error("backend {backend:?} ({address}) is not trusted, nothing was sent: {detail}")]
    Untrusted {
        /// The backend's name.
        backend: String,
        /// Its address.
        address: String,
        /// What failed the check.
        detail: String,
    },
    /// No answer in time.
    #[error("backend {backend:?} ({address}) did not answer within {secs:.1} s")]
    Timeout {
        /// The backend's name.
        backend: String,
        /// Its address.
        address: String,
        /// The limit.
        secs: f64,
    },
    /// The daemon's own login was refused (wrong secret_id, revoked token, ...).
    #[error("backend {backend:?} refused the daemon's login: {detail}")]
    Auth {
        /// The backend's name.
        backend: String,
        /// What the server or the check said.
        detail: String,
    },
    /// The daemon's identity may not read the path.
    #[error(
        "backend {backend:?} denied the daemon's identity access to {path:?} (check the policy of its AppRole)"
    )]
    Denied {
        /// The backend's name.
        backend: String,
        /// The KV path.
        path: String,
    },
    /// No secret at the path.
    #[error("backend {backend:?} has no secret at {path:?}")]
    NotFound {
        /// The backend's name.
        backend: String,
        /// The KV path.
        path: String,
    },
    /// The secret has no such field, or it is not a string.
    #[error("secret {path:?} in backend {backend:?}: {detail}")]
    Field {
        /// The backend's name.
        backend: String,
        /// The KV path.
        path: String,
        /// Which field and what is wrong with it.
        detail: String,
    },
    /// An answer that is not what the API promises.
    #[error("backend {backend:?} gave an unexpected answer: {detail}")]
    Protocol {
        /// The backend's name.
        backend: String,
        /// What was wrong.
        detail: String,
    },
}

impl BackendError {
    /// The wire code the caller gets.
    pub fn code(&self) -> ErrorCode {
        match self {
            BackendError::NotFound { .. } | BackendError::Field { .. } => ErrorCode::NotFound,
            _ => ErrorCode::Unavailable,
        }
    }

    /// A fixed phrase for the audit record.
    pub fn audit_detail(&self) -> &'static str {
        match self {
            BackendError::Unreachable { .. } => "backend unreachable",
            BackendError::Untrusted { .. } => "backend not trusted",
            BackendError::Timeout { .. } => "backend timed out",
            BackendError::Auth { .. } => "backend login refused",
            BackendError::Denied { .. } => "backend denied access",
            BackendError::NotFound { .. } => "no secret at the backend path",
            BackendError::Field { .. } => "no such field in the backend secret",
            BackendError::Protocol { .. } => "unexpected backend answer",
        }
    }
}

/// How the daemon proves who it is.
enum AuthMethod {
    /// A token an operator provisions in a file (re-read when the server refuses the old one).
    TokenFile(PathBuf),
    /// AppRole: role_id and secret_id from files, read at each login.
    AppRole {
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
        mount: String,
    },
}

/// The daemon's current token.
struct Token {
    value: SecretString,
    /// Bumped at each login; a 403 invalidates only the token it was answered to.
    generation: u64,
    /// The TTL granted at login (bounded): a renewal granting less means the max TTL is near.
    login_ttl: Duration,
    /// None: the token does not expire (a root or periodic token without TTL).
    expires: Option<Instant>,
    /// When the refresher acts next.
    refresh_at: Option<Instant>,
    renewable: bool,
    /// The next refresh is a login, not a renewal.
    relogin: bool,
}

impl Token {
    fn usable(&self, now: Instant) -> bool {
        // Checked: `expires` is bounded, but `now + margin` must not panic either way.
        self.expires
            .is_none_or(|e| now.checked_add(EXPIRY_MARGIN).is_some_and(|m| e > m))
    }
}

/// The last login attempt, for single-flight logins and the rate limit.
#[derive(Default)]
struct LoginGate {
    last_attempt: Option<Instant>,
    last_error: Option<BackendError>,
}

/// How requests reach the server.
enum Transport {
    /// `https://` (or `http://` with `allow_plain_http`): reqwest, with `base` the URL
    /// without a trailing slash.
    Http {
        client: reqwest::Client,
        base: String,
    },
    /// `unix://`: one checked connection per request.
    Unix(UnixTransport),
}

/// One configured OpenBao / Vault backend.
pub struct OpenBao {
    name: String,
    address: String,
    mount: String,
    auth: AuthMethod,
    transport: Transport,
    /// `allow_plain_http` is in use: `doctor` reports the backend degraded.
    plain_http: bool,
    timeout: Duration,
    token: Mutex<Option<Arc<Token>>>,
    generation: AtomicU64,
    gate: tokio::sync::Mutex<LoginGate>,
}

impl OpenBao {
    /// Builds the backend: for `https://` the HTTP client and its trust roots (the `ca_file`
    /// only, or the host's trust store); for `unix://` the trusted uids and a first check of
    /// the socket's path (a socket not there yet is checked at each connection). Reads files
    /// and the user database, so it runs before the sandbox. Makes no request.
    ///
    /// # Errors
    /// A message naming the backend's key and what is wrong (CA file unreadable, no roots,
    /// a socket or directory another uid controls, an unknown `socket_owner`, ...).
    pub fn new(name: &str, cfg: &BackendConfig) -> Result<OpenBao, String> {
        let key = format!("backends.{name}");
        let address = check_address(&cfg.address).map_err(|e| format!("{key}.address: {e}"))?;
        // Plain http has no server identity: reported as degraded for as long as it is in use.
        let plain_http = matches!(address, Address::Http { .. });
        let transport = match address {
            Address::Unix(path) => {
                let owner = cfg
                    .socket_owner
                    .as_deref()
                    .map(unix::resolve_owner)
                    .transpose()
                    .map_err(|e| format!("{key}.socket_owner: {e}"))?;
                let trusted = Trusted::new(owner);
                match unix::check_socket_chain(&path, &trusted) {
                    Ok(()) => {}
                    Err(SocketTrustError::Missing { path: missing }) => warn!(
                        backend = name,
                        "{} does not exist yet: the socket is checked before each request",
                        missing.display()
                    ),
                    Err(e) => {
                        return Err(format!(
                            "{key}.address: the daemon would not know whom it sends its credentials to: {e}"
                        ));
                    }
                }
                Transport::Unix(UnixTransport { path, trusted })
            }
            Address::Https | Address::Http { .. } => Transport::Http {
                client: http_client(&key, cfg)?,
                base: cfg.address.trim_end_matches('/').to_string(),
            },
        };
        if plain_http {
            warn!(
                backend = name,
                "{}: plain http (allow_plain_http = true): any local user who binds that port first, while the server restarts for instance, receives the daemon's credentials and can answer its reads; use https:// or a unix:// socket",
                cfg.address
            );
        }
        let auth = match (&cfg.token_file, &cfg.approle) {
            (Some(f), None) => AuthMethod::TokenFile(f.clone()),
            (None, Some(a)) => AuthMethod::AppRole {
                role_id_file: a.role_id_file.clone(),
                secret_id_file: a.secret_id_file.clone(),
                mount: a.mount.clone(),
            },
            _ => return Err(format!("{key}: give token_file or approle")),
        };
        Ok(OpenBao {
            name: name.to_string(),
            address: cfg.address.trim_end_matches('/').to_string(),
            mount: cfg.mount.clone(),
            auth,
            transport,
            plain_http,
            timeout: cfg.timeout,
            token: Mutex::new(None),
            generation: AtomicU64::new(0),
            gate: tokio::sync::Mutex::new(LoginGate::default()),
        })
    }

    /// Whether requests go over a unix socket (the daemon needs `connect` but no internet
    /// socket for it).
    pub fn is_unix(&self) -> bool {
        matches!(self.transport, Transport::Unix(_))
    }

    /// The backend's name in `config.toml`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The KV v2 mount.
    pub fn mount(&self) -> &str {
        &self.mount
    }

    /// A short state for `status` and logs: never the token.
    pub fn describe(&self) -> String {
        let now = Instant::now();
        match self.current() {
            Some(t) => match t.expires {
                Some(e) => format!(
                    "logged in, token valid for {:.0} s more",
                    e.saturating_duration_since(now).as_secs_f64()
                ),
                None => "logged in, token without expiry".into(),
            },
            None => "not logged in".into(),
        }
    }

    /// Whether the daemon holds a usable token over a checked transport, and the state in
    /// words (with the last login error, if the last attempt failed): for `agentkeys doctor`.
    /// A plain-http backend is never ok, logged in or not. Never the token.
    pub fn health(&self) -> (bool, String) {
        let ok = !self.plain_http && self.current().is_some_and(|t| t.usable(Instant::now()));
        let mut detail = format!("{} at {}: {}", self.name, self.address, self.describe());
        if self.plain_http {
            detail.push_str(
                "; plain http (allow_plain_http = true): any local user who binds the port first receives the daemon's credentials",
            );
        }
        match self.gate.try_lock() {
            Ok(g) => {
                if let Some(e) = &g.last_error {
                    detail.push_str(&format!("; last login failed: {e}"));
                }
            }
            Err(_) => detail.push_str("; a login is in progress"),
        }
        (ok, detail)
    }

    fn current(&self) -> Option<Arc<Token>> {
        self.token.lock().expect("token lock").clone()
    }

    /// Reads `field` of the KV v2 secret at `path` (inside the mount), answering within the
    /// backend's `timeout` all told: a read that has to log in first, or to tell a 403 apart,
    /// shares that one budget (a login cut short is retried by the next caller or the
    /// refresher).
    ///
    /// # Errors
    /// [`BackendError`]: unreachable, timeout, login refused, denied, not found, no field.
    pub async fn read(&self, path: &str, field: &str) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        tokio::time::timeout(self.timeout, self.read_unbounded(path, field))
            .await
            .unwrap_or_else(|_| Err(self.timeout_err()))
    }

    async fn read_unbounded(
        &self,
        path: &str,
        field: &str,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let url = format!("/v1/{}/data/{}", self.mount, path);
        let shown = format!("{}/{}", self.mount, path);
        let mut retried = false;
        loop {
            let token = self.token_for_use().await?;
            let (status, body) = self
                .send(Method::GET, &url, Some(&token.value), None)
                .await?;
            match status {
                StatusCode::OK => return self.field_of(&body, &shown, field),
                StatusCode::NOT_FOUND => {
                    return Err(BackendError::NotFound {
                        backend: self.name.clone(),
                        path: shown,
                    });
                }
                // A 403 is a token the server no longer knows (restarted, revoked, expired
                // early) or a policy that does not cover the path. `lookup-self` tells which:
                // a token the server still knows means the policy.
                StatusCode::FORBIDDEN if !retried && !self.token_known(&token).await? => {
                    retried = true;
                    debug!(backend = %self.name, "403 with a token the server forgot: logging in again");
                    self.invalidate(token.generation);
                }
                StatusCode::FORBIDDEN => {
                    return Err(BackendError::Denied {
                        backend: self.name.clone(),
                        path: shown,
                    });
                }
                other => return Err(self.unexpected(other, &body)),
            }
        }
    }

    /// Extracts one string field from a KV v2 answer ([`answer::parse_kv_field`]), with
    /// errors that name this backend and the path.
    fn field_of(
        &self,
        body: &[u8],
        shown: &str,
        field: &str,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        answer::parse_kv_field(body, field).map_err(|e| match e {
            AnswerError::Deleted => BackendError::NotFound {
                backend: self.name.clone(),
                path: shown.to_string(),
            },
            AnswerError::FieldType { .. } | AnswerError::NoField { .. } => BackendError::Field {
                backend: self.name.clone(),
                path: shown.to_string(),
                detail: e.to_string(),
            },
            AnswerError::NotKv2 => BackendError::Protocol {
                backend: self.name.clone(),
                detail: format!(
                    "the answer for {shown:?} has no data.data: is {:?} a KV version 2 mount?",
                    self.mount
                ),
            },
            other => self.protocol(other),
        })
    }

    fn protocol(&self, e: AnswerError) -> BackendError {
        BackendError::Protocol {
            backend: self.name.clone(),
            detail: e.to_string(),
        }
    }

    /// A token that is valid now: the current one, or a fresh login (single-flight, rate
    /// limited).
    async fn token_for_use(&self) -> Result<Arc<Token>, BackendError> {
        if let Some(t) = self.current()
            && t.usable(Instant::now())
        {
            return Ok(t);
        }
        self.login_gated(false).await
    }

    /// Whether the server still knows `token` (`lookup-self` answers 200).
    async fn token_known(&self, token: &Token) -> Result<bool, BackendError> {
        let url = "/v1/auth/token/lookup-self";
        let (status, _) = self
            .send(Method::GET, url, Some(&token.value), None)
            .await?;
        Ok(status == StatusCode::OK)
    }

    /// Drops the token answered with a 403, unless a newer one replaced it already.
    fn invalidate(&self, generation: u64) {
        let mut slot = self.token.lock().expect("token lock");
        if slot.as_ref().is_some_and(|t| t.generation == generation) {
            *slot = None;
        }
    }

    /// Logs in unless another caller did so while this one waited. A login attempted less
    /// than [`MIN_LOGIN_INTERVAL`] ago is not repeated: its error is returned. `force` logs in
    /// even when a usable token exists (the refresher's re-login near the max TTL).
    async fn login_gated(&self, force: bool) -> Result<Arc<Token>, BackendError> {
        let seen = self.current().map(|t| t.generation);
        let mut gate = self.gate.lock().await;
        if let Some(t) = self.current()
            && t.usable(Instant::now())
            && (!force || Some(t.generation) != seen)
        {
            return Ok(t);
        }
        // One reading of the clock: `MIN_LOGIN_INTERVAL - at.elapsed()` read twice could
        // subtract a larger second reading and panic.
        if let Some(since) = gate.last_attempt.map(|at| at.elapsed())
            && since < MIN_LOGIN_INTERVAL
        {
            match &gate.last_error {
                Some(err) => return Err(err.clone()),
                // The last login succeeded moments ago and its token is already gone: wait
                // out the interval rather than log in at the rate requests arrive.
                None => tokio::time::sleep(MIN_LOGIN_INTERVAL.saturating_sub(since)).await,
            }
        }
        gate.last_attempt = Some(Instant::now());
        // If this caller's time runs out mid-login (see `read`), the attempt counts as timed out.
        gate.last_error = Some(self.timeout_err());
        match self.login().await {
            Ok(t) => {
                gate.last_error = None;
                let t = Arc::new(t);
                *self.token.lock().expect("token lock") = Some(t.clone());
                info!(backend = %self.name, "logged in ({})", self.describe());
                Ok(t)
            }
            Err(e) => {
                warn!(backend = %self.name, "login failed: {e}");
                gate.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// One login: AppRole, or the token file (checked with `lookup-self`).
    async fn login(&self) -> Result<Token, BackendError> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        match &self.auth {
            AuthMethod::AppRole {
                role_id_file,
                secret_id_file,
                mount,
            } => {
                let role_id = read_cred_file(role_id_file, false).map_err(|e| self.auth_err(e))?;
                let secret_id =
                    read_cred_file(secret_id_file, true).map_err(|e| self.auth_err(e))?;
                #[derive(serde::Serialize)]
                struct Login<'a> {
                    role_id: &'a str,
                    secret_id: &'a str,
                }
                let body = Zeroizing::new(
                    serde_json::to_vec(&Login {
                        role_id: role_id.expose_secret(),
                        secret_id: secret_id.expose_secret(),
                    })
                    .map_err(|e| self.auth_err(format!("encoding the login: {e}")))?,
                );
                let url = format!("/v1/auth/{mount}/login");
                let (status, answer) = self
                    .send(Method::POST, &url, None, Some(body.to_vec()))
                    .await?;
                match status {
                    StatusCode::OK => self.token_from(&answer, generation, None),
                    StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                        Err(self.auth_err(
                            first_error(&answer)
                                .unwrap_or_else(|| format!("HTTP {}", status.as_u16())),
                        ))
                    }
                    other => Err(self.unexpected(other, &answer)),
                }
            }
            AuthMethod::TokenFile(path) => {
                let value = read_cred_file(path, true).map_err(|e| self.auth_err(e))?;
                let url = "/v1/auth/token/lookup-self";
                let (status, answer) = self.send(Method::GET, url, Some(&value), None).await?;
                match status {
                    StatusCode::OK => {
                        let lease =
                            answer::parse_lookup_answer(&answer).map_err(|e| self.protocol(e))?;
                        Ok(self.token_with(value, generation, lease))
                    }
                    StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                        Err(self.auth_err(format!("the token in {} is not valid", path.display())))
                    }
                    other => Err(self.unexpected(other, &answer)),
                }
            }
        }
    }

    /// A token from a login or renewal answer. `renewing` is the token being renewed (the
    /// answer repeats it, but the one we hold is kept, with its generation and login TTL).
    fn token_from(
        &self,
        answer: &[u8],
        generation: u64,
        renewing: Option<&Token>,
    ) -> Result<Token, BackendError> {
        let (client_token, lease) =
            answer::parse_auth_answer(answer).map_err(|e| self.protocol(e))?;
        match renewing {
            None => Ok(self.token_with(client_token, generation, lease)),
            Some(old) => {
                let mut t = self.token_with(old.value.clone(), old.generation, lease);
                t.login_ttl = old.login_ttl;
                // The server grants less than a full TTL when the max TTL is near: the
                // next refresh logs in afresh, at two thirds of what is left.
                t.relogin = lease.ttl < old.login_ttl;
                Ok(t)
            }
        }
    }

    /// A token with the times of `lease` from now (bounded, checked: [`answer::token_times`]).
    fn token_with(&self, value: SecretString, generation: u64, lease: Lease) -> Token {
        if lease.clamped {
            debug!(
                backend = %self.name,
                "the server granted a token TTL above {} s: taken as {} s",
                answer::MAX_TOKEN_TTL.as_secs(),
                answer::MAX_TOKEN_TTL.as_secs()
            );
        }
        let times = answer::token_times(lease.ttl, Instant::now());
        Token {
            value,
            generation,
            login_ttl: lease.ttl,
            expires: times.expires,
            refresh_at: times.refresh_at,
            renewable: lease.renewable,
            relogin: false,
        }
    }

    /// Renews the current token (`renew-self`).
    async fn renew(&self, t: &Token) -> Result<Token, BackendError> {
        let url = "/v1/auth/token/renew-self";
        let body = answer::renew_increment(t.login_ttl);
        let (status, answer) = self
            .send(Method::POST, url, Some(&t.value), Some(body))
            .await?;
        match status {
            StatusCode::OK => self.token_from(&answer, t.generation, Some(t)),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED | StatusCode::BAD_REQUEST => Err(self
                .auth_err(
                    first_error(&answer)
                        .unwrap_or_else(|| format!("renewal refused (HTTP {})", status.as_u16())),
                )),
            other => Err(self.unexpected(other, &answer)),
        }
    }

    /// The refresher: renews before expiry, logs in again when renewal is refused or capped,
    /// backs off while the backend fails. Runs until the runtime stops.
    pub async fn refresh_forever(self: Arc<Self>) {
        let mut failures: u32 = 0;
        loop {
            let now = Instant::now();
            let wait = if failures > 0 {
                backoff(failures)
            } else {
                match self.current() {
                    Some(t) => match t.refresh_at {
                        Some(at) => at.saturating_duration_since(now),
                        // No expiry: nothing to do; look again later (a 403 clears it).
                        None => Duration::from_secs(60),
                    },
                    None => Duration::ZERO,
                }
            };
            tokio::time::sleep(wait).await;
            let result = match self.current() {
                Some(t) if t.renewable && !t.relogin && t.usable(Instant::now()) => {
                    match self.renew(&t).await {
                        Ok(renewed) => {
                            let mut slot = self.token.lock().expect("token lock");
                            if slot.as_ref().is_some_and(|c| c.generation == t.generation) {
                                *slot = Some(Arc::new(renewed));
                            }
                            drop(slot);
                            debug!(backend = %self.name, "token renewed ({})", self.describe());
                            Ok(())
                        }
                        Err(e @ (BackendError::Auth { .. } | BackendError::Protocol { .. })) => {
                            // Refused: the token is no good; a login follows at once.
                            info!(backend = %self.name, "renewal refused, logging in again: {e}");
                            self.invalidate(t.generation);
                            self.login_gated(false).await.map(drop)
                        }
                        Err(e) => Err(e),
                    }
                }
                Some(t) if t.refresh_at.is_none() && t.usable(Instant::now()) => Ok(()),
                _ => self.login_gated(true).await.map(drop),
            };
            match result {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_power_of_two() {
                        warn!(backend = %self.name, failures, "token refresh failed: {e}");
                    }
                }
            }
        }
    }

    /// One HTTP exchange for `api_path` (`/v1/...`) with the time limit; the body is read
    /// into a bounded, zeroizing buffer.
    async fn send(
        &self,
        method: Method,
        api_path: &str,
        token: Option<&SecretString>,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>), BackendError> {
        let token = match token {
            Some(t) => {
                let mut value = HeaderValue::from_str(t.expose_secret()).map_err(|_| {
                    self.auth_err("the token contains characters not allowed in a header".into())
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let answer = match &self.transport {
            Transport::Http { client, base } => {
                let mut req = client.request(method, format!("{base}{api_path}"));
                if let Some(t) = token {
                    req = req.header("X-Vault-Token", t);
                }
                if let Some(b) = body {
                    req = req.header("Content-Type", "application/json").body(b);
                }
                let exchange = async {
                    let mut resp = req.send().await?;
                    let status = resp.status();
                    let mut buf = Zeroizing::new(Vec::new());
                    while let Some(chunk) = resp.chunk().await? {
                        if buf.len().saturating_add(chunk.len()) > MAX_BODY {
                            return Ok((status, None));
                        }
                        buf.extend_from_slice(&chunk);
                    }
                    Ok::<_, reqwest::Error>((status, Some(buf)))
                };
                match tokio::time::timeout(self.timeout, exchange).await {
                    Err(_) => return Err(self.timeout_err()),
                    Ok(Err(e)) if e.is_timeout() => return Err(self.timeout_err()),
                    Ok(Err(e)) => return Err(self.unreachable(error_chain(&e))),
                    Ok(Ok(answer)) => answer,
                }
            }
            Transport::Unix(unix) => {
                let headers = token.map(|t| ("X-Vault-Token", t)).into_iter().collect();
                let exchange = unix.exchange(method, api_path, headers, body);
                match tokio::time::timeout(self.timeout, exchange).await {
                    Err(_) => return Err(self.timeout_err()),
                    // Logged by the caller (the read, the login, the refresher), as other
                    // failures are.
                    Ok(Err(UnixError::Untrusted(e))) => {
                        return Err(BackendError::Untrusted {
                            backend: self.name.clone(),
                            address: self.address.clone(),
                            detail: e.to_string(),
                        });
                    }
                    Ok(Err(e)) => return Err(self.unreachable(error_chain(&e))),
                    Ok(Ok(answer)) => answer,
                }
            }
        };
        match answer {
            (_, None) => Err(BackendError::Protocol {
                backend: self.name.clone(),
                detail: format!("an answer larger than {MAX_BODY} bytes"),
            }),
            (status, Some(buf)) => Ok((status, buf)),
        }
    }

    fn unreachable(&self, detail: String) -> BackendError {
        BackendError::Unreachable {
            backend: self.name.clone(),
            address: self.address.clone(),
            detail,
        }
    }

    fn timeout_err(&self) -> BackendError {
        BackendError::Timeout {
            backend: self.name.clone(),
            address: self.address.clone(),
            secs: self.timeout.as_secs_f64(),
        }
    }

    fn auth_err(&self, detail: String) -> BackendError {
        BackendError::Auth {
            backend: self.name.clone(),
            detail,
        }
    }

    fn unexpected(&self, status: StatusCode, body: &[u8]) -> BackendError {
        let said = first_error(body)
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let detail = match status {
            StatusCode::SERVICE_UNAVAILABLE => format!("HTTP 503, sealed or in standby{said}"),
            s => format!("HTTP {}{said}", s.as_u16()),
        };
        if status.is_server_error() {
            BackendError::Unreachable {
                backend: self.name.clone(),
                address: self.address.clone(),
                detail,
            }
        } else {
            BackendError::Protocol {
                backend: self.name.clone(),
                detail,
            }
        }
    }
}

/// The reqwest client of an `https://` (or opted-in `http://`) backend: its trust roots are
/// the `ca_file` only, or the host's trust store.
fn http_client(key: &str, cfg: &BackendConfig) -> Result<reqwest::Client, String> {
    let url = reqwest::Url::parse(&cfg.address).map_err(|e| format!("{key}.address: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &cfg.ca_file {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("{key}.ca_file {}: {e}", ca.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{key}.ca_file {}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{key}.ca_file {}: no PEM certificate in it",
                ca.display()
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("{key}.ca_file {}: {e}", ca.display()))?;
        }
    } else if url.scheme() == "https" {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(format!(
                "{key}: no system CA certificates found; set ca_file"
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{key}: TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .https_only(url.scheme() == "https")
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("agentkeysd/", env!("CARGO_PKG_VERSION")));
    // `localhost` is allowed over plain http because it is the loopback: make it so,
    // whatever /etc/hosts or a resolver says.
    if is_loopback(&url)
        && url
            .host_str()
            .is_some_and(|h| h.eq_ignore_ascii_case("localhost"))
    {
        let port = url.port_or_known_default().unwrap_or(8200);
        builder = builder.resolve("localhost", ([127, 0, 0, 1], port).into());
    }
    builder
        .build()
        .map_err(|e| format!("{key}: HTTP client: {e}"))
}

/// The refresher's wait after `failures` failures in a row: 1 s doubling to 30 s, plus up to
/// a quarter of random jitter so that many daemons do not retry in step.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(MAX_BACKOFF);
    let mut r = [0u8; 2];
    let jitter = if getrandom::fill(&mut r).is_ok() {
        base / 4 * u32::from(u16::from_le_bytes(r)) / u32::from(u16::MAX)
    } else {
        Duration::ZERO
    };
    base + jitter
}

/// An error and its causes, innermost last ("error sending request ...: tcp connect error:
/// Connection refused (os error 111)"), bounded.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    // The outermost message repeats the URL; the causes say what happened.
    let shown = if parts.len() > 1 {
        parts[1..].join(": ")
    } else {
        parts.join(": ")
    };
    shown.chars().take(300).collect()
}

/// Reads a small credential file (role_id, secret_id, token): trimmed, non-empty, visible
/// ASCII. `private` files must not be readable by group or others and must belong to us or
/// root, as ssh treats a private key.
pub(crate) fn read_cred_file(path: &Path, private: bool) -> Result<SecretString, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if private {
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != euid && meta.uid() != 0 {
            return Err(format!(
                "{} is owned by uid {}, not by {euid} or root",
                path.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{} has mode {:o}: group and others must have no access (chmod 600)",
                path.display(),
                meta.mode() & 0o777
            ));
        }
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(256));
    file.take(MAX_CRED_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if buf.len() as u64 > MAX_CRED_FILE {
        return Err(format!(
            "{} is larger than {MAX_CRED_FILE} bytes",
            path.display()
        ));
    }
    let text = std::str::from_utf8(&buf)
        .map_err(|_| format!("{} is not text", path.display()))?
        .trim();
    if text.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{} holds characters other than visible ASCII",
            path.display()
        ));
    }
    Ok(SecretString::from(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> OpenBao {
        let cfg: crate::config::Config = toml::from_str(
            "[backends.b]\nkind = \"openbao\"\naddress = \"https://127.0.0.1:1\"\ntoken_file = \"/t\"\n",
        )
        .unwrap();
        OpenBao::new("b", &cfg.backends["b"]).unwrap()
    }

    #[test]
    fn kv_errors_name_the_backend_and_path_never_values() {
        let b = backend();
        let ok = br#"{"data":{"data":{"token":"s3cret","n":5},"metadata":{}}}"#;
        assert_eq!(&*b.field_of(ok, "secret/x", "token").unwrap(), b"s3cret");
        let e = b
            .field_of(ok, "secret/x", "nope")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("secret \"secret/x\" in backend \"b\"")
                && e.contains("fields: n, token")
                && !e.contains("s3cret"),
            "{e}"
        );
        let deleted = br#"{"data":{"data":null,"metadata":{"deletion_time":"x"}}}"#;
        assert!(matches!(
            b.field_of(deleted, "secret/x", "token"),
            Err(BackendError::NotFound { .. })
        ));
        let v1 = br#"{"data":{"token":"s3cret"}}"#;
        let e = b
            .field_of(v1, "secret/x", "token")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("KV version 2") && !e.contains("s3cret"), "{e}");
    }

    /// Item 5 of issue 14: a login answer with `lease_duration` 2^63 (or u64::MAX) panicked in
    /// `Instant + Duration` (an abort of the release daemon, at start-up: a crash loop). The
    /// token is now built with a clamped TTL, and a renewal of it too.
    #[test]
    fn huge_lease_duration_does_not_abort() {
        let b = backend();
        for ttl in [u64::MAX, 1u64 << 63, u64::MAX / 2 + 1] {
            let answer = format!(
                r#"{{"auth":{{"client_token":"s.x","lease_duration":{ttl},"renewable":true}}}}"#
            );
            let t = b.token_from(answer.as_bytes(), 1, None).unwrap();
            assert!(t.usable(Instant::now()));
            assert_eq!(t.login_ttl, answer::MAX_TOKEN_TTL);
            let renewed = b.token_from(answer.as_bytes(), 1, Some(&t)).unwrap();
            assert!(!renewed.relogin && renewed.expires.is_some());
        }
    }

    /// Plain http is reported degraded by `doctor` whatever the token state, however the
    /// scheme is spelled (an upper-case `HTTP://` escaped a prefix test at first).
    #[test]
    fn plain_http_is_degraded_even_when_logged_in() {
        for address in ["http://127.0.0.1:1", "HTTP://127.0.0.1:1"] {
            let text = format!(
                "[backends.p]\nkind = \"openbao\"\naddress = \"{address}\"\nallow_plain_http = true\ntoken_file = \"/t\"\n"
            );
            let cfg = crate::config::Config::parse(&text, Path::new("c.toml")).unwrap();
            let b = OpenBao::new("p", &cfg.backends["p"]).unwrap();
            let answer = br#"{"auth":{"client_token":"s.x","lease_duration":3600}}"#;
            let t = b.token_from(answer, 1, None).unwrap();
            *b.token.lock().unwrap() = Some(Arc::new(t));
            let (ok, detail) = b.health();
            assert!(!ok, "{address}: {detail}");
            assert!(
                detail.contains("token valid for") && detail.contains("plain http"),
                "{detail}"
            );
        }
        let (ok, detail) = backend().health();
        assert!(!ok && !detail.contains("plain http"), "{detail}");
        assert!(!backend().is_unix());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b1 = backoff(1);
        assert!(b1 >= Duration::from_secs(1) && b1 <= Duration::from_millis(1250));
        let b3 = backoff(3);
        assert!(b3 >= Duration::from_secs(4) && b3 <= Duration::from_secs(5));
        let b20 = backoff(20);
        assert!(b20 >= Duration::from_secs(30) && b20 <= Duration::from_millis(37_500));
    }

    #[test]
    fn cred_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ak-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret-id");
        std::fs::write(&f, "  abc-123\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_cred_file(&f, true).err().unwrap();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(read_cred_file(&f, false).is_ok(), "role_id may be readable");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = read_cred_file(&f, true).unwrap();
        assert_eq!(s.expose_secret(), "abc-123");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_cred_file(&f, true).err().unwrap().contains("empty"));
        std::fs::write(&f, "a b").unwrap();
        assert!(
            read_cred_file(&f, true)
                .err()
                .unwrap()
                .contains("visible ASCII")
        );
        std::fs::write(&f, vec![b'a'; 5000]).unwrap();
        assert!(read_cred_file(&f, true).err().unwrap().contains("larger"));
        assert!(read_cred_file(&dir.join("missing"), true).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
