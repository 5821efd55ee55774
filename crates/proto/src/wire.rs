//! Message types. One JSON object per packet:
//!
//! ```text
//! request:  {"v":1,"id":7,"body":{"kind":"whoami"}}
//! response: {"v":1,"id":7,"body":{"kind":"whoami", ...}}
//!           {"v":1,"id":7,"body":{"kind":"error","code":"revoked","message":"..."}}
//! ```
//!
//! `v` is the protocol version; `id` is chosen by the client and echoed. Packets are capped at
//! [`MAX_MESSAGE_BYTES`] before parsing. Decoding never echoes input values into error text:
//! a token put in the wrong field must not end up in a log line.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest packet either side accepts; anything longer is refused unread.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Most file descriptors one message may carry.
pub const MAX_FDS_PER_MESSAGE: usize = 4;

/// A session token on the wire: the only place a token is serialized, and only into a
/// [`Zeroizing`] buffer by [`encode`]. No `Debug`, no `Display`.
pub struct WireToken(pub SecretString);

impl Serialize for WireToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.expose_secret())
    }
}

impl<'de> Deserialize<'de> for WireToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        SecretString::deserialize(d).map(WireToken)
    }
}

/// A request: version, id, body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Protocol version.
    pub v: u32,
    /// Client-chosen id, echoed in the response.
    pub id: u64,
    /// What is asked.
    pub body: RequestBody,
}

/// The kinds of request.
///
/// Bodies without fields are written `Kind {}` rather than as unit variants: serde ignores
/// unknown fields on unit variants of a tagged enum, and a request with fields it does not
/// understand must be refused, not half-read.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RequestBody {
    /// First message of every connection: authenticate with a session token.
    Hello {
        /// The owner's or an agent's session token.
        token: WireToken,
    },
    /// Who am I: identity, role, scope, expiry.
    Whoami {},
    /// Is the daemon alive; its version, pid and uptime.
    Status {},
    /// The daemon's hardening self-test report (owner only).
    SelfTest {},
    /// Re-read state files now and close connections of revoked agents (owner only).
    Reload {},
    /// Stop the daemon gracefully (owner only).
    Shutdown {},
    /// Services visible to the caller (names and policy, never values).
    ListServices {},
    /// A credential: by default as a `memfd_secret` fd attached to the answer; as inline
    /// bytes only when asked and the service allows it.
    GetCredential {
        /// Service name.
        service: String,
        /// Ask for inline bytes instead of an fd.
        #[serde(default)]
        inline: bool,
        /// Network listeners only (a remote daemon asking): 32 random bytes, base64, used once.
        /// The value comes back sealed under it (XChaCha20-Poly1305, `delivery: "sealed"`), so
        /// the requester's TLS buffers only ever hold ciphertext. Ignored on the unix socket.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wrap_key: Option<WireToken>,
    },
    /// Launch a program with secrets in its environment (or files). Exactly three fds are
    /// attached: the caller's stdin, stdout and stderr. The answer is `run_started`, then, when
    /// the program ends, `run_exit`; meanwhile the caller may send `signal`.
    Run {
        /// The program and its arguments.
        argv: Vec<String>,
        /// `VAR -> service`: the secret becomes the value of VAR.
        #[serde(default)]
        env: std::collections::BTreeMap<String, String>,
        /// `VAR -> service`: VAR names a readable file (`/dev/fd/N`) holding the secret.
        #[serde(default)]
        files: std::collections::BTreeMap<String, String>,
        /// `VAR -> service`: VAR holds a placeholder that the credential-injecting proxy replaces
        /// with the value on requests to the service's hosts; the program gets the proxy and CA
        /// bundle variables too.
        #[serde(default)]
        proxy: std::collections::BTreeMap<String, String>,
        /// The caller's environment, `NAME=value` (without agentkeys tokens).
        #[serde(default)]
        caller_env: Vec<String>,
        /// Working directory (absolute; the daemon refuses a run without one).
        #[serde(default)]
        cwd: Option<String>,
        /// Mask the secrets in stdout and stderr (default true).
        #[serde(default = "yes")]
        masking: bool,
        /// The caller's file-mode creation mask (at most 0o777), which the program gets;
        /// without it the program gets the daemon's 077.
        #[serde(default)]
        umask: Option<u32>,
    },
    /// Forward a signal (SIGINT, SIGTERM, SIGHUP) to the running program of this connection.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Open approval requests (owner only).
    ListPending {},
    /// Approve a request by its code (owner only): once, or for `for_secs` seconds.
    Approve {
        /// The code shown to the requester.
        code: String,
        /// A window instead of a single use.
        #[serde(default)]
        for_secs: Option<u64>,
    },
    /// Deny a request by its code (owner only).
    Deny {
        /// The code shown to the requester.
        code: String,
    },
    /// Live grants for high-value services (owner only).
    ListGrants {},
    /// Withdraw grants (owner only): exactly one of `id` (`g7`), `agent` (every grant of the
    /// agent's sessions) or `all`.
    RevokeGrants {
        /// One grant, by id.
        #[serde(default)]
        id: Option<String>,
        /// Every grant of this agent.
        #[serde(default)]
        agent: Option<String>,
        /// Every grant.
        #[serde(default)]
        all: bool,
    },
    /// Start a jail (owner only): an ephemeral session of the registered agent, handed to
    /// `agentkeys jail`; it ends when this connection closes, at `ttl_secs`, or with the agent.
    JailStart {
        /// The registered agent whose scope and policy the jail gets.
        agent: String,
        /// Lifetime in seconds (never past the agent's own expiry).
        #[serde(default)]
        ttl_secs: Option<u64>,
        /// The jail's policy (`agentkeys_jail::JailPolicy` as JSON): `run`s of the session are
        /// confined by it.
        policy: serde_json::Value,
        /// `--proxy VAR -> service`: placeholders for the jail's environment (see `Run`'s
        /// `proxy`). With this or a policy of network `proxy`, the jail gets a proxy
        /// registration of its own for its whole life.
        #[serde(default)]
        proxy: std::collections::BTreeMap<String, String>,
    },
    /// The jail's command ended (owner only): recorded in `jail_exit`, and the jail's session
    /// ends now.
    JailExit {
        /// The jail's id (`j-…`).
        jail: String,
        /// Exit code, when it exited.
        #[serde(default)]
        code: Option<i32>,
        /// Signal, when a signal killed it.
        #[serde(default)]
        signal: Option<i32>,
    },
}

/// A jail's session token in the `jail_started` answer: serialized only into a wiped buffer
/// by [`encode`]; its `Debug` shows no token.
pub struct JailToken(pub WireToken);

impl std::fmt::Debug for JailToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JailToken(..)")
    }
}

impl Serialize for JailToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JailToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WireToken::deserialize(d).map(JailToken)
    }
}

/// A jail's proxy registration in the `jail_started` answer: the proxy's port on 127.0.0.1
/// and `NAME=value` entries for the jail's environment (placeholders, the proxy's address with
/// the jail's own proxy credential, the CA bundle). Its `Debug` shows no value.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailProxy {
    /// The proxy's port on 127.0.0.1.
    pub port: u16,
    /// `NAME=value` entries.
    pub env: Vec<String>,
}

impl std::fmt::Debug for JailProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "JailProxy {{ port: {}, env: ({} entries) }}",
            self.port,
            self.env.len()
        )
    }
}

impl Drop for JailProxy {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        for e in &mut self.env {
            e.zeroize();
        }
    }
}

fn yes() -> bool {
    true
}

/// Every request kind, for telling "unknown kind" from "malformed".
pub const REQUEST_KINDS: &[&str] = &[
    "hello",
    "whoami",
    "status",
    "self_test",
    "reload",
    "shutdown",
    "list_services",
    "get_credential",
    "run",
    "signal",
    "list_pending",
    "approve",
    "deny",
    "list_grants",
    "revoke_grants",
    "jail_start",
    "jail_exit",
];

impl RequestBody {
    /// The kind's name, for logs and audit (never the body).
    pub fn kind(&self) -> &'static str {
        match self {
            RequestBody::Hello { .. } => "hello",
            RequestBody::Whoami {} => "whoami",
            RequestBody::Status {} => "status",
            RequestBody::SelfTest {} => "self_test",
            RequestBody::Reload {} => "reload",
            RequestBody::Shutdown {} => "shutdown",
            RequestBody::ListServices {} => "list_services",
            RequestBody::GetCredential { .. } => "get_credential",
            RequestBody::Run { .. } => "run",
            RequestBody::Signal { .. } => "signal",
            RequestBody::ListPending {} => "list_pending",
            RequestBody::Approve { .. } => "approve",
            RequestBody::Deny { .. } => "deny",
            RequestBody::ListGrants {} => "list_grants",
            RequestBody::RevokeGrants { .. } => "revoke_grants",
            RequestBody::JailStart { .. } => "jail_start",
            RequestBody::JailExit { .. } => "jail_exit",
        }
    }
}

/// A response: version, the request's id, body.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// The id of the request this answers (0 when the request could not be parsed).
    pub id: u64,
    /// The answer.
    pub body: ResponseBody,
}

/// Who a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The human who ran `agentkeys init`.
    Owner,
    /// A named agent with a scoped child session.
    Agent,
}

/// Session metadata; never a token or a token hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The identity id (`ak-...`).
    pub identity: String,
    /// Owner or agent.
    pub role: Role,
    /// The agent's name (agents only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The id of this exact session (`s-` and 12 hex digits): names it in audit records,
    /// `agentkeys pending` and `agentkeys grants`. Not a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Services the session may use (`*` for all).
    pub scope: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds.
    pub expires: u64,
    /// The uid an agent is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The jail (`j-…`) of an ephemeral `agentkeys jail` session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<String>,
}

/// A service as listed: name and policy, never the value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Service name.
    pub name: String,
    /// Needs a human's approval before release.
    pub high_value: bool,
    /// Seconds the daemon may keep it cached (0: never).
    pub cache_ttl_secs: u64,
    /// May be delivered as inline bytes.
    pub allow_inline: bool,
    /// The remote backend it is read from; absent for the local vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Hosts the credential-injecting proxy may send it to (none: not for the proxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject_hosts: Vec<String>,
    /// The delivery kinds allowed, when the policy restricts them (`"proxy"`: proxy-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver: Option<String>,
}

/// One open approval request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingInfo {
    /// The code.
    pub code: String,
    /// Whether the owner or an agent asked.
    pub role: Role,
    /// The agent that asked (absent when the owner did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The id of the exact session that asked.
    pub session: String,
    /// For which service.
    pub service: String,
    /// For `run`: the arguments (shell-quoted) and the working directory, as the requester
    /// gave them, cut to a bounded length; raw text: escape it before showing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Seconds since the request.
    pub age_secs: u64,
    /// Seconds until it expires.
    pub expires_in_secs: u64,
}

/// One live grant for a high-value service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantInfo {
    /// `g` and a number: what `agentkeys grants revoke` takes.
    pub id: String,
    /// Whether it was granted to the owner or to an agent.
    pub role: Role,
    /// The agent (absent for the owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The id of the exact session it belongs to.
    pub session: String,
    /// The service (several, joined by `,`, for one `run`).
    pub service: String,
    /// For `run`: the command it covers (raw text: escape it before showing it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Single use (else a window).
    pub once: bool,
    /// Seconds since it was granted.
    pub age_secs: u64,
    /// Seconds until it ends (a once-grant lapses unused then).
    pub expires_in_secs: u64,
}

/// The kinds of response.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResponseBody {
    /// Hello accepted (boxed: the largest answer, kept off every other one's size).
    Welcome(Box<SessionInfo>),
    /// Answer to `whoami`.
    Whoami(Box<SessionInfo>),
    /// Answer to `status`.
    Status {
        /// agentkeysd's version.
        version: String,
        /// Its pid.
        pid: u32,
        /// Seconds since start.
        uptime_secs: u64,
        /// Open client connections.
        connections: usize,
    },
    /// Answer to `self_test`: the daemon's own report (see agentkeys-hardening `selftest`).
    SelfTest {
        /// The report as JSON.
        report: serde_json::Value,
    },
    /// Answer to `list_services`.
    Services {
        /// The visible services.
        services: Vec<ServiceInfo>,
    },
    /// Answer to `get_credential`. With `delivery: "fd"` one fd is attached: a `memfd_secret`
    /// (or, `degraded`, a sealed memfd) whose size is the secret's length; map it read-only.
    /// `"inline"`: the bytes in `value_b64`; `"sealed"` (network listeners): `value_b64` is the
    /// value sealed under the request's `wrap_key`.
    Credential {
        /// The service.
        service: String,
        /// `fd` or `inline`.
        delivery: String,
        /// True when the fd is the sealed-memfd fallback rather than `memfd_secret`.
        degraded: bool,
        /// Length of the secret in bytes.
        len: usize,
        /// Inline delivery only: the bytes, base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value_b64: Option<String>,
    },
    /// The program of a `run` is running.
    RunStarted {
        /// Its pid.
        pid: u32,
    },
    /// The program of a `run` ended (its output has been delivered).
    RunExit {
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal, when a signal killed it.
        signal: Option<i32>,
    },
    /// A high-value service needs a human's approval first.
    Pending {
        /// The approval code (give it to the owner).
        code: String,
        /// The service.
        service: String,
        /// Seconds until the request expires.
        expires_in_secs: u64,
        /// What happened and what the human must run.
        message: String,
    },
    /// Answer to `list_pending`.
    PendingList {
        /// Open requests.
        requests: Vec<PendingInfo>,
    },
    /// Answer to `list_grants`.
    GrantList {
        /// Live grants.
        grants: Vec<GrantInfo>,
    },
    /// Answer to `revoke_grants`: how many grants were withdrawn.
    GrantsRevoked {
        /// How many.
        count: usize,
    },
    /// Answer to `jail_start`.
    JailStarted {
        /// The jail's id (`j-…`).
        jail: String,
        /// The ephemeral session's id (`s-…`).
        session: String,
        /// Unix seconds when the session expires.
        expires: u64,
        /// The session's token, for the jail's private token file only.
        token: JailToken,
        /// The jail's use of the credential-injecting proxy (with `proxy` mappings or a
        /// `--net proxy` policy): the proxy's port and the environment entries.
        #[serde(default)]
        proxy: Option<JailProxy>,
    },
    /// The request was carried out.
    Done,
    /// The request failed.
    Error {
        /// Stable machine-readable code.
        code: ErrorCode,
        /// What happened and what to do, for a human.
        message: String,
    },
}

impl ResponseBody {
    /// The kind's name, for messages (never the body: an inline credential is in it).
    pub fn kind(&self) -> &'static str {
        match self {
            ResponseBody::Welcome(_) => "welcome",
            ResponseBody::Whoami(_) => "whoami",
            ResponseBody::Status { .. } => "status",
            ResponseBody::SelfTest { .. } => "self_test",
            ResponseBody::Services { .. } => "services",
            ResponseBody::Credential { .. } => "credential",
            ResponseBody::RunStarted { .. } => "run_started",
            ResponseBody::RunExit { .. } => "run_exit",
            ResponseBody::Pending { .. } => "pending",
            ResponseBody::PendingList { .. } => "pending_list",
            ResponseBody::GrantList { .. } => "grant_list",
            ResponseBody::GrantsRevoked { .. } => "grants_revoked",
            ResponseBody::JailStarted { .. } => "jail_started",
            ResponseBody::Done => "done",
            ResponseBody::Error { .. } => "error",
        }
    }
}

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON or not a valid request.
    BadRequest,
    /// Over [`MAX_MESSAGE_BYTES`].
    TooLarge,
    /// A `kind` this daemon does not know.
    UnknownKind,
    /// A `v` this daemon does not speak.
    UnsupportedVersion,
    /// File descriptors on a message that takes none, or too many.
    UnexpectedFd,
    /// No valid hello yet, or an unknown token.
    Unauthenticated,
    /// The agent's session was revoked.
    Revoked,
    /// The session expired.
    Expired,
    /// Authenticated, but not allowed (scope, or owner-only request).
    Forbidden,
    /// No such service or agent.
    NotFound,
    /// Too many connections; try again.
    Busy,
    /// A failure inside the daemon; details are in its log.
    Internal,
    /// `run`: the program was not found (the CLI exits 127).
    CommandNotFound,
    /// `run`: the program could not be executed (the CLI exits 126).
    CannotExecute,
    /// A remote backend could not be reached in time or refused the daemon's own login; the
    /// daemon retries by itself (the CLI exits 69).
    Unavailable,
}

/// Why a packet could not be decoded. Messages carry positions, never input values.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// `v` missing or not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version (this daemon speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion,
    /// `body.kind` is not a known kind.
    #[error("unknown request kind")]
    UnknownKind,
    /// Anything else.
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownKind => ErrorCode::UnknownKind,
            DecodeError::Malformed(_) => ErrorCode::BadRequest,
        }
    }
}

/// Describes a serde_json error by category and position only.
fn describe(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "invalid JSON",
        Category::Data => "JSON of the wrong shape for this request",
        Category::Eof => "truncated JSON",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// The envelope fields alone, to report version and kind errors before shape errors.
#[derive(Deserialize)]
struct Probe {
    v: Option<u32>,
    body: Option<ProbeBody>,
}

#[derive(Deserialize)]
struct ProbeBody {
    kind: Option<String>,
}

/// Decodes a request packet.
///
/// # Errors
/// [`DecodeError`] saying what is wrong, without quoting the input.
pub fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(describe(&e)))?;
    if probe.v != Some(PROTOCOL_VERSION) {
        return Err(DecodeError::UnsupportedVersion);
    }
    let kind = probe.body.and_then(|b| b.kind);
    if !kind.as_deref().is_some_and(|k| REQUEST_KINDS.contains(&k)) {
        return Err(DecodeError::UnknownKind);
    }
    serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(describe(&e)))
}

/// Decodes a response packet.
///
/// # Errors
/// [`DecodeError`] when the daemon's answer is not understood.
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    let r: Response =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(describe(&e)))?;
    if r.v != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion);
    }
    Ok(r)
}

/// Serializes a message into a buffer that is wiped when dropped (a hello carries a token).
///
/// # Errors
/// Serialization failures (not expected for these types), or a message over the size cap.
pub fn encode<T: Serialize>(msg: &T) -> std::io::Result<Zeroizing<Vec<u8>>> {
    // Reserve up front so the buffer never reallocates and leaves a partial copy behind.
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    serde_json::to_writer(&mut *buf, msg).map_err(std::io::Error::other)?;
    if buf.len() > MAX_MESSAGE_BYTES {
        return Err(std::io::Error::other(format!(
            "message of {} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit",
            buf.len()
        )));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let req = Request {
            v: 1,
            id: 9,
            body: RequestBody::Hello {
                token: WireToken(SecretString::from("akt_example")),
            },
        };
        let bytes = encode(&req).unwrap();
        let back = decode_request(&bytes).unwrap();
        assert_eq!(back.id, 9);
        match back.body {
            RequestBody::Hello { token } => assert_eq!(token.0.expose_secret(), "akt_example"),
            _ => panic!("wrong kind"),
        }
        let w = decode_request(br#"{"v":1,"id":1,"body":{"kind":"whoami"}}"#).unwrap();
        assert_eq!(w.body.kind(), "whoami");
    }

    #[test]
    fn decode_errors_are_classified_and_never_echo_input() {
        let secret = "akt_SHOULD_NOT_BE_ECHOED";
        let cases: [(String, ErrorCode); 6] = [
            ("not json".into(), ErrorCode::BadRequest),
            (
                format!(r#"{{"v":2,"id":1,"body":{{"kind":"whoami","x":"{secret}"}}}}"#),
                ErrorCode::UnsupportedVersion,
            ),
            (
                format!(r#"{{"v":1,"id":1,"body":{{"kind":"{secret}"}}}}"#),
                ErrorCode::UnknownKind,
            ),
            (
                format!(r#"{{"v":1,"id":1,"body":{{"kind":"hello","token":7,"t":"{secret}"}}}}"#),
                ErrorCode::BadRequest,
            ),
            (
                format!(r#"{{"v":1,"id":"{secret}","body":{{"kind":"whoami"}}}}"#),
                ErrorCode::BadRequest,
            ),
            (
                r#"{"v":1,"id":1,"body":{"kind":"whoami","extra":true}}"#.into(),
                ErrorCode::BadRequest,
            ),
        ];
        for (input, code) in cases {
            let e = decode_request(input.as_bytes())
                .err()
                .unwrap_or_else(|| panic!("accepted {input}"));
            assert_eq!(e.code(), code, "{input}");
            assert!(!e.to_string().contains("SHOULD_NOT"), "{e}");
        }
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(decode_request(deep.as_bytes()).is_err());
    }

    #[test]
    fn oversized_encode_is_refused() {
        let big = ResponseBody::Error {
            code: ErrorCode::Internal,
            message: "x".repeat(MAX_MESSAGE_BYTES),
        };
        assert!(
            encode(&Response {
                v: 1,
                id: 1,
                body: big
            })
            .is_err()
        );
    }
}
