//! `config.toml`: daemon settings, remote backends and the services mapped onto them. Unknown
//! keys are errors (a typo must not silently leave a protection off), and every error names the
//! file and the key.
//!
//! ```toml
//! [backends.bao]
//! kind = "openbao"                 # or "vault": the same KV v2 and AppRole API
//! address = "https://bao.example:8200"    # or "unix:///run/openbao/bao.sock"
//! ca_file = "/etc/agentkeys/bao-ca.pem"   # optional: trust only this CA
//! # socket_owner = "openbao"       # unix:// only: the uid (or user) the server runs as
//! # allow_plain_http = true        # http://127.0.0.1:8200 only with this: see `check_address`
//! mount = "secret"                 # KV v2 mount (default "secret")
//! approle = { role_id_file = "/etc/agentkeys/role-id", secret_id_file = "/etc/agentkeys/secret-id" }
//! # or: token_file = "/etc/agentkeys/bao-token"
//! timeout = "5s"                   # per HTTP request (default 5 s)
//!
//! [services.gh]
//! backend = "bao"
//! path = "secret/github"           # as `bao kv get` takes it: the mount, then the secret's path
//! field = "token"
//! cache_ttl = "5m"                 # optional policy, as `agentkeys store` flags set it locally
//! high_value = false
//! allow_inline = false
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 256 * 1024;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[daemon]`.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// `[backends.NAME]`: remote secret stores.
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    /// `[services.NAME]`: services read from a remote backend instead of the local vault.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// `[proxy]`: the credential-injecting proxy.
    #[serde(default)]
    pub proxy: ProxyConfig,
}

/// `[proxy]`: the credential-injecting proxy (a process of its own, see `agentkeys-proxy`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Start the proxy (default true). Off: `run --proxy` is refused.
    pub enabled: bool,
    /// Where it listens: a loopback address and port (`127.0.0.1:0`, the default, picks a free
    /// port at each start).
    pub listen: String,
    /// PEM file of the CA that upstream servers' certificates are checked against, instead of
    /// the system roots (for tests and private APIs).
    pub upstream_ca_file: Option<PathBuf>,
    /// The system roots written into the CA bundle programs get (with the agentkeys CA); none:
    /// the first of the usual distribution paths that exists.
    pub system_ca_file: Option<PathBuf>,
    /// Wait for the audit log's sync before each injection (default false: the `inject` record
    /// is written before the value leaves, and on disk within 5 ms).
    pub sync_audit: bool,
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            enabled: true,
            listen: "127.0.0.1:0".into(),
            upstream_ca_file: None,
            system_ca_file: None,
            sync_audit: false,
        }
    }
}

/// The kinds of remote backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// OpenBao.
    Openbao,
    /// HashiCorp Vault: the same KV v2, AppRole and token API.
    Vault,
    /// The owner's agentkeysd, over TLS to one of its network listeners, with a pinned
    /// certificate fingerprint and a remote agent's token (see [`crate::remote`]).
    Agentkeys,
}

/// `[backends.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `openbao` or `vault`.
    pub kind: BackendKind,
    /// `https://host[:port]`, `unix:///path/to/socket`, or plain `http://` to a loopback
    /// address with `allow_plain_http`.
    pub address: String,
    /// PEM file of the CA(s) to trust instead of the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// Accept a plain `http://` loopback address: any local user who binds its port first
    /// receives the daemon's credentials and can answer its reads. Off by default.
    #[serde(default)]
    pub allow_plain_http: bool,
    /// For a `unix://` address: a user name or uid, besides the daemon's own uid and root,
    /// that may own the socket, the directories above it and the server process.
    pub socket_owner: Option<String>,
    /// The KV v2 mount.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// A file holding a token for the daemon (renewed if renewable; re-read when refused).
    pub token_file: Option<PathBuf>,
    /// The daemon's own AppRole identity.
    pub approle: Option<AppRoleConfig>,
    /// Limit on each HTTP request, connection included.
    #[serde(default = "default_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// `kind = "agentkeys"` only: the SHA-256 of the owner's daemon's certificate
    /// (`sha256:...`, as `agentkeys remote info` prints it); nothing is sent to a server whose
    /// certificate differs.
    pub fingerprint: Option<String>,
}

/// `approle = { ... }` of a backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRoleConfig {
    /// File holding the role_id.
    pub role_id_file: PathBuf,
    /// File holding the secret_id (mode 0600 or tighter).
    pub secret_id_file: PathBuf,
    /// Where the AppRole auth method is mounted (default `approle`).
    #[serde(default = "default_approle_mount")]
    pub mount: String,
}

/// `[services.NAME]`: a service whose secret is one field of a KV v2 secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The backend's name (a `[backends.NAME]` section).
    pub backend: String,
    /// The secret's path as `bao kv get` takes it (`secret/github`: mount, then path). For a
    /// `kind = "agentkeys"` backend: optional, the service's name on the owner's daemon.
    #[serde(default)]
    pub path: String,
    /// The field of the secret to deliver (not for a `kind = "agentkeys"` backend).
    #[serde(default)]
    pub field: String,
    /// How long the daemon may keep a copy (default 0: never).
    #[serde(default, with = "humantime_serde_compat")]
    pub cache_ttl: Duration,
    /// Never released without a human grant.
    #[serde(default)]
    pub high_value: bool,
    /// May be delivered as inline bytes.
    #[serde(default)]
    pub allow_inline: bool,
    /// Hosts the proxy may send the value to (as `agentkeys store --inject-host`).
    #[serde(default)]
    pub inject_hosts: Vec<String>,
    /// Headers besides Authorization the proxy may place the value in.
    #[serde(default)]
    pub inject_headers: Vec<String>,
    /// Query parameters the proxy may place the value in.
    #[serde(default)]
    pub inject_query: Vec<String>,
    /// Delivery kinds allowed (`["proxy"]`: proxy-only); absent: as for the local vault.
    #[serde(default)]
    pub deliver: Option<Vec<String>>,
}

impl ServiceConfig {
    /// For `kind = "agentkeys"`: the service's name on the owner's daemon (default: the same
    /// name as here).
    pub fn remote_name<'a>(&'a self, local: &'a str) -> &'a str {
        if self.path.is_empty() {
            local
        } else {
            &self.path
        }
    }

    /// The delivery policy this section gives the service.
    ///
    /// # Errors
    /// A bad host, header, query name or delivery kind, in words.
    pub fn policy(&self) -> Result<agentkeys_state::vault::Policy, String> {
        use agentkeys_state::inject::{DeliveryKind, normalise};
        let deliver = match &self.deliver {
            None => None,
            Some(words) => Some(
                words
                    .iter()
                    .map(|w| DeliveryKind::parse(w))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?,
            ),
        };
        let (inject_hosts, inject_headers, inject_query, deliver) = normalise(
            &self.inject_hosts,
            &self.inject_headers,
            &self.inject_query,
            deliver.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let allow_inline = self.allow_inline
            || deliver
                .as_ref()
                .is_some_and(|d| d.contains(&DeliveryKind::Inline));
        Ok(agentkeys_state::vault::Policy {
            high_value: self.high_value,
            cache_ttl_secs: self.cache_ttl.as_secs(),
            allow_inline,
            inject_hosts,
            inject_headers,
            inject_query,
            deliver,
        })
    }

    /// The path inside the backend's mount (`secret/github` with mount `secret` is `github`).
    pub fn path_in_mount<'a>(&'a self, mount: &str) -> &'a str {
        self.path
            .strip_prefix(mount)
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(&self.path)
    }
}

fn default_mount() -> String {
    "secret".into()
}

fn default_approle_mount() -> String {
    "approle".into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl DaemonConfig {
    /// The machine features this configuration makes required, for the self-test.
    pub fn requirements(&self) -> agentkeys_hardening::selftest::Requirements {
        agentkeys_hardening::selftest::Requirements {
            secretmem: self.require_secretmem,
            pkeys: self.require_pkeys,
            ptrace_scope: self.require_ptrace_scope,
        }
    }
}

/// Bounds on a backend's request timeout.
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(120));

/// Bounds on `output_timeout`: long enough for a reader that pauses, short enough that a run
/// whose caller stopped reading ends within the hour.
const OUTPUT_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));

/// Bounds on the masking caps: a run with one short secret needs about 1 KiB; 1 GiB per run
/// and 4 GiB in all are far beyond any sane set of secrets.
const MASK_BYTES_RANGE: (usize, usize) = (4096, 4 << 30);

/// `[daemon]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Wipe a cached secret after this long without use (`"60s"`).
    #[serde(with = "humantime_serde_compat")]
    pub idle_ttl: Duration,
    /// Refuse to start when ptrace_scope is 0 or Yama is absent.
    pub require_ptrace_scope: bool,
    /// Refuse the sealed-memfd fallback when memfd_secret is unavailable.
    pub require_secretmem: bool,
    /// Refuse to start without memory protection keys (an optional CPU feature otherwise:
    /// without it the DEK and cached secrets are plain secret pages).
    pub require_pkeys: bool,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Most connections that have not said hello yet; the oldest is dropped beyond this.
    pub max_pending: usize,
    /// Seconds a new connection has to say hello.
    #[serde(with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    /// How long an approval request waits for the owner (default 5 minutes).
    #[serde(with = "humantime_serde_compat")]
    pub approval_ttl: Duration,
    /// Group allowed to reach the socket (for agents under other uids): the socket becomes
    /// 0660 and its directory 0710, both of this group. The peer uid check still applies.
    pub socket_group: Option<String>,
    /// Between SIGTERM and SIGKILL when a run is stopped (revocation, a caller gone, shutdown,
    /// processes a program left behind); 100 ms to 60 s.
    #[serde(with = "humantime_serde_compat")]
    pub kill_grace: Duration,
    /// A command the launcher runs (outside the sandbox, without a shell) when a new approval
    /// request is pending: argv, the first element an absolute path; the code, the agent, the
    /// service and the shown command (empty for `read`) are appended as four arguments.
    pub approval_command: Option<Vec<String>>,
    /// How long `approval_command` may run before it is stopped; 1 s to 60 s.
    #[serde(with = "humantime_serde_compat")]
    pub approval_command_timeout: Duration,
    /// How long a masked run's output may wait on a caller that does not read it before the
    /// run is stopped (default 60 s; 1 s to 1 h).
    #[serde(with = "humantime_serde_compat")]
    pub output_timeout: Duration,
    /// Most bytes of masking tables one run may take (bytes; default 4 MiB).
    pub max_mask_bytes_per_run: usize,
    /// Most bytes of masking tables all runs together may take (bytes; default 64 MiB).
    pub max_mask_bytes: usize,
    /// Network listeners beside the unix socket, for remote agents (another host's or a VM's
    /// agentkeysd): `tls://IP:PORT` with a literal IP in a non-public range (see
    /// [`crate::listen::check_listen`]). Empty: no network listener, no network syscalls.
    pub listen: Vec<String>,
    /// Accept listen addresses outside the non-public ranges (and 0.0.0.0 / ::).
    pub allow_public_listen: bool,
    /// Most connections open at once from one source IP address on the network listeners.
    pub max_connections_per_address: usize,
    /// Most new connections one source IP address may open per minute on the network
    /// listeners; beyond it, connections are closed unread until the minute has passed.
    pub connections_per_minute_per_address: u32,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            idle_ttl: Duration::from_secs(60),
            require_ptrace_scope: false,
            require_secretmem: false,
            require_pkeys: false,
            max_connections: 512,
            max_pending: 64,
            handshake_timeout: Duration::from_secs(10),
            approval_ttl: Duration::from_secs(300),
            socket_group: None,
            kill_grace: Duration::from_secs(5),
            approval_command: None,
            approval_command_timeout: Duration::from_secs(10),
            output_timeout: Duration::from_secs(60),
            max_mask_bytes_per_run: 4 << 20,
            max_mask_bytes: 64 << 20,
            listen: Vec::new(),
            allow_public_listen: false,
            max_connections_per_address: 16,
            connections_per_minute_per_address: 120,
        }
    }
}

/// Durations as humantime strings ("60s", "5m").
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

/// Config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading failed.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Larger than the limit.
    #[error("config {path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not valid TOML or an unknown/invalid key.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What and where (TOML's message names the key and line).
        message: String,
    },
}

impl Config {
    /// Parses config text.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.message().to_string() + &location(text, e.span()),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if cfg.daemon.max_connections == 0 || cfg.daemon.max_pending == 0 {
            return Err(invalid(
                "daemon.max_connections and daemon.max_pending must be at least 1".into(),
            ));
        }
        check_range("daemon.kill_grace", cfg.daemon.kill_grace, KILL_GRACE_RANGE)
            .map_err(invalid)?;
        check_range(
            "daemon.approval_command_timeout",
            cfg.daemon.approval_command_timeout,
            HOOK_TIMEOUT_RANGE,
        )
        .map_err(invalid)?;
        if let Some(argv) = &cfg.daemon.approval_command {
            check_command(argv).map_err(|e| invalid(format!("daemon.approval_command: {e}")))?;
        }
        check_masking(&cfg.daemon).map_err(invalid)?;
        if cfg.daemon.listen.len() > crate::listen::MAX_LISTENERS {
            return Err(invalid(format!(
                "daemon.listen: at most {} addresses",
                crate::listen::MAX_LISTENERS
            )));
        }
        for (i, a) in cfg.daemon.listen.iter().enumerate() {
            crate::listen::check_listen(a, cfg.daemon.allow_public_listen)
                .map_err(|e| invalid(format!("daemon.listen[{i}]: {e}")))?;
        }
        if cfg.daemon.max_connections_per_address == 0
            || cfg.daemon.connections_per_minute_per_address == 0
        {
            return Err(invalid(
                "daemon.max_connections_per_address and daemon.connections_per_minute_per_address must be at least 1".into(),
            ));
        }
        for (name, b) in &cfg.backends {
            check_backend(name, b).map_err(invalid)?;
        }
        for (name, s) in &cfg.services {
            check_service(name, s, &cfg.backends).map_err(invalid)?;
        }
        check_proxy(&cfg.proxy).map_err(invalid)?;
        Ok(cfg)
    }

    /// Loads `path`; a missing file at the default location means defaults.
    ///
    /// # Errors
    /// [`ConfigError`] for an unreadable, oversized or invalid file.
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, ConfigError> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        // A config others can write could switch protections off: same rule as state files,
        // except that it may be readable.
        {
            use std::os::unix::fs::MetadataExt;
            let meta = file.metadata().map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let euid = nix::unistd::geteuid().as_raw();
            let problem = if !meta.is_file() {
                Some("not a regular file".to_string())
            } else if meta.uid() != euid && meta.uid() != 0 {
                Some(format!(
                    "owned by uid {}, not by {euid} or root",
                    meta.uid()
                ))
            } else if meta.mode() & 0o022 != 0 {
                Some(format!(
                    "mode {:o} lets group or others write it (chmod go-w)",
                    meta.mode() & 0o777
                ))
            } else {
                None
            };
            if let Some(message) = problem {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message,
                });
            }
        }
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        Config::parse(&text, path)
    }
}

/// `kill_grace`: long enough for a program to clean up, short enough that a revocation is
/// prompt (the launcher clamps to the same range).
const KILL_GRACE_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));
/// `approval_command_timeout`.
const HOOK_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// Most elements of `approval_command`, and the longest one.
const MAX_COMMAND_ARGS: usize = 64;
const MAX_COMMAND_ARG_BYTES: usize = 4096;

/// A duration within `range`; the message names the key.
fn check_range(key: &str, d: Duration, range: (Duration, Duration)) -> Result<(), String> {
    if d < range.0 || d > range.1 {
        return Err(format!(
            "{key}: must be between {} and {}",
            humantime::format_duration(range.0),
            humantime::format_duration(range.1)
        ));
    }
    Ok(())
}

/// An argv to run without a shell, from a daemon whose environment has no PATH: a non-empty
/// list, bounded, the program an absolute path, no NUL byte anywhere.
fn check_command(argv: &[String]) -> Result<(), String> {
    let Some(program) = argv.first() else {
        return Err("must name a program: [\"/usr/bin/notify-send\", ...]".into());
    };
    if !program.starts_with('/') {
        return Err(format!(
            "the program {program:?} must be an absolute path (the daemon has no PATH)"
        ));
    }
    if argv.len() > MAX_COMMAND_ARGS {
        return Err(format!("at most {MAX_COMMAND_ARGS} elements"));
    }
    if argv
        .iter()
        .any(|a| a.len() > MAX_COMMAND_ARG_BYTES || a.contains('\0'))
    {
        return Err(format!(
            "each element at most {MAX_COMMAND_ARG_BYTES} bytes, without NUL bytes"
        ));
    }
    Ok(())
}

/// Checks `output_timeout` and the masking caps of `[daemon]`; the message names the key.
fn check_masking(d: &DaemonConfig) -> Result<(), String> {
    let (lo, hi) = OUTPUT_TIMEOUT_RANGE;
    if d.output_timeout < lo || d.output_timeout > hi {
        return Err(format!(
            "daemon.output_timeout: must be between {} and {}",
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        ));
    }
    let (lo, hi) = MASK_BYTES_RANGE;
    for (key, v) in [
        ("max_mask_bytes_per_run", d.max_mask_bytes_per_run),
        ("max_mask_bytes", d.max_mask_bytes),
    ] {
        if v < lo || v > hi {
            return Err(format!("daemon.{key}: must be between {lo} and {hi} bytes"));
        }
    }
    if d.max_mask_bytes < d.max_mask_bytes_per_run {
        return Err("daemon.max_mask_bytes: must be at least daemon.max_mask_bytes_per_run".into());
    }
    Ok(())
}

/// Checks one `[backends.NAME]`; the message names the key.
fn check_backend(name: &str, b: &BackendConfig) -> Result<(), String> {
    let key = format!("backends.{name}");
    check_ident(name).map_err(|e| format!("{key}: the backend name {e}"))?;
    if b.kind == BackendKind::Agentkeys {
        return check_agentkeys_backend(&key, b);
    }
    if b.fingerprint.is_some() {
        return Err(format!(
            "{key}.fingerprint: only for kind = \"agentkeys\" (an OpenBao/Vault server is checked through ca_file); remove it"
        ));
    }
    let address = check_address(&b.address).map_err(|e| format!("{key}.address: {e}"))?;
    match &address {
        Address::Http { loopback: true } if !b.allow_plain_http => {
            return Err(format!(
                "{key}.address: {:?} is plain http: any local user who binds that port first (while the server restarts, say) receives the daemon's secret_id or token and can answer its reads. Use https:// (with ca_file), a unix:// socket (listener \"unix\" in the server's config), or set {key}.allow_plain_http = true to accept that risk",
                b.address
            ));
        }
        Address::Https | Address::Unix(_) if b.allow_plain_http => {
            return Err(format!(
                "{key}.allow_plain_http: only for an http:// address; remove it"
            ));
        }
        _ => {}
    }
    if let Some(owner) = &b.socket_owner {
        if !matches!(address, Address::Unix(_)) {
            return Err(format!(
                "{key}.socket_owner: only for a unix:// address; remove it"
            ));
        }
        check_owner_name(owner).map_err(|e| format!("{key}.socket_owner: {e}"))?;
    }
    if b.ca_file.is_some() && !matches!(address, Address::Https) {
        return Err(format!(
            "{key}.ca_file: only for an https:// address (unix sockets and plain http have no TLS); remove it"
        ));
    }
    check_kv_path(&b.mount).map_err(|e| format!("{key}.mount: {e}"))?;
    match (&b.token_file, &b.approle) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{key}: give either token_file or approle, not both"
            ));
        }
        (None, None) => {
            return Err(format!(
                "{key}: the daemon needs its own identity: set approle = {{ role_id_file = ..., secret_id_file = ... }} or token_file"
            ));
        }
        (None, Some(a)) => {
            check_kv_path(&a.mount).map_err(|e| format!("{key}.approle.mount: {e}"))?
        }
        (Some(_), None) => {}
    }
    for (k, p) in [
        ("ca_file", b.ca_file.as_ref()),
        ("token_file", b.token_file.as_ref()),
        (
            "approle.role_id_file",
            b.approle.as_ref().map(|a| &a.role_id_file),
        ),
        (
            "approle.secret_id_file",
            b.approle.as_ref().map(|a| &a.secret_id_file),
        ),
    ] {
        if let Some(p) = p
            && !p.is_absolute()
        {
            return Err(format!("{key}.{k}: must be an absolute path"));
        }
    }
    if b.timeout < TIMEOUT_RANGE.0 || b.timeout > TIMEOUT_RANGE.1 {
        return Err(format!(
            "{key}.timeout: must be between {} and {}",
            humantime::format_duration(TIMEOUT_RANGE.0),
            humantime::format_duration(TIMEOUT_RANGE.1)
        ));
    }
    Ok(())
}

/// Checks a `kind = "agentkeys"` backend: `tls://IP:PORT`, a pinned fingerprint, a token
/// file, and none of the OpenBao keys.
fn check_agentkeys_backend(key: &str, b: &BackendConfig) -> Result<(), String> {
    crate::remote::parse_address(&b.address).map_err(|e| format!("{key}.address: {e}"))?;
    let Some(fp) = &b.fingerprint else {
        return Err(format!(
            "{key}.fingerprint: required: the owner's daemon's certificate fingerprint, as `agentkeys remote info` prints it on the owner's host"
        ));
    };
    agentkeys_state::tls::parse_fingerprint(fp).map_err(|e| format!("{key}.fingerprint: {e}"))?;
    let Some(token_file) = &b.token_file else {
        return Err(format!(
            "{key}.token_file: required: the file holding the remote agent's token (`agentkeys agent add NAME --remote --out FILE` on the owner's host)"
        ));
    };
    if !token_file.is_absolute() {
        return Err(format!("{key}.token_file: must be an absolute path"));
    }
    for (k, set) in [
        ("approle", b.approle.is_some()),
        ("ca_file", b.ca_file.is_some()),
        ("socket_owner", b.socket_owner.is_some()),
        ("allow_plain_http", b.allow_plain_http),
        ("mount", b.mount != default_mount()),
    ] {
        if set {
            return Err(format!(
                "{key}.{k}: not for kind = \"agentkeys\" (its server is pinned by fingerprint and it logs in with token_file); remove it"
            ));
        }
    }
    if b.timeout < TIMEOUT_RANGE.0 || b.timeout > TIMEOUT_RANGE.1 {
        return Err(format!(
            "{key}.timeout: must be between {} and {}",
            humantime::format_duration(TIMEOUT_RANGE.0),
            humantime::format_duration(TIMEOUT_RANGE.1)
        ));
    }
    Ok(())
}

/// Checks one `[services.NAME]`.
fn check_service(
    name: &str,
    s: &ServiceConfig,
    backends: &BTreeMap<String, BackendConfig>,
) -> Result<(), String> {
    let key = format!("services.{name}");
    agentkeys_state::vault::validate_service_name(name).map_err(|e| format!("{key}: {e}"))?;
    let Some(backend) = backends.get(&s.backend) else {
        return Err(format!(
            "{key}.backend: no [backends.{}] section",
            s.backend
        ));
    };
    if backend.kind == BackendKind::Agentkeys {
        if !s.path.is_empty() {
            agentkeys_state::vault::validate_service_name(&s.path).map_err(|e| {
                format!("{key}.path: the service's name on the owner's daemon: {e}")
            })?;
        }
        if !s.field.is_empty() {
            return Err(format!(
                "{key}.field: not for a kind = \"agentkeys\" backend (it delivers whole services); remove it"
            ));
        }
        return Ok(());
    }
    check_kv_path(&s.path).map_err(|e| format!("{key}.path: {e}"))?;
    if s.field.is_empty() || s.field.len() > 256 || s.field.chars().any(char::is_control) {
        return Err(format!(
            "{key}.field: must be 1 to 256 characters without control characters"
        ));
    }
    s.policy().map_err(|e| format!("{key}: {e}"))?;
    Ok(())
}

/// Checks `[proxy]`: it listens on a loopback address only (it serves local programs; on
/// another address any host on the network could try its credentials).
fn check_proxy(p: &ProxyConfig) -> Result<(), String> {
    let addr: std::net::SocketAddr = p
        .listen
        .parse()
        .map_err(|_| "proxy.listen: must be IP:PORT, e.g. 127.0.0.1:0".to_string())?;
    if !addr.ip().is_loopback() {
        return Err("proxy.listen: must be a loopback address (127.0.0.1 or ::1)".into());
    }
    Ok(())
}

/// A backend name: like a service name.
fn check_ident(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 64 of a-z 0-9 _ -".into())
    }
}

/// A mount or secret path: segments of `A-Z a-z 0-9 . _ -` separated by single slashes, no `.`
/// or `..` segment (a path must not climb out of the mount it names).
fn check_kv_path(s: &str) -> Result<(), String> {
    let seg_ok = |seg: &str| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if !s.is_empty() && s.len() <= 512 && s.split('/').all(seg_ok) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a path of A-Z a-z 0-9 . _ - segments separated by single slashes (no leading or trailing slash, no . or ..)"
        ))
    }
}

/// What kind of address a backend has (see [`check_address`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `https://host[:port]`: the server's identity is its certificate.
    Https,
    /// `http://host[:port]`: no identity at all. Accepted (with `allow_plain_http`) only when
    /// `loopback`.
    Http {
        /// The host is a loopback address.
        loopback: bool,
    },
    /// `unix:///path`: the server's identity is the owner of the socket and of the directories
    /// above it, and the uid of the process that listens on it.
    Unix(PathBuf),
}

/// Longest unix socket path: `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Checks a backend address: `https://host[:port]`, `http://` (refused here unless to a
/// loopback address; `check_backend` wants `allow_plain_http` for that too), or
/// `unix:///absolute/path` (the syntax of `VAULT_ADDR` / `BAO_ADDR`). No user, path, query or
/// fragment in a URL; a socket path is absolute, without `.`/`..` components, `%`, `?`, `#`,
/// control characters, and fits `sun_path`.
///
/// # Errors
/// What is wrong, and the fix.
pub fn check_address(address: &str) -> Result<Address, String> {
    if let Some(path) = address.strip_prefix("unix://") {
        return check_socket_path(path).map(Address::Unix);
    }
    let url = reqwest::Url::parse(address).map_err(|e| format!("{address:?} is not a URL: {e}"))?;
    if url.scheme() == "unix" {
        return Err(format!(
            "{address:?}: a unix socket is written unix:///absolute/path (three slashes)"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain a user name or password".into());
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{address:?} must be scheme://host[:port] without a path, query or fragment"
        ));
    }
    match url.scheme() {
        "https" => Ok(Address::Https),
        "http" if is_loopback(&url) => Ok(Address::Http { loopback: true }),
        "http" => Err(format!(
            "{address:?}: plain http:// is never allowed off the loopback (127.0.0.0/8, ::1, localhost): the token would cross the network in clear; use https://"
        )),
        other => Err(format!(
            "{address:?}: scheme {other:?} is not https, unix or http"
        )),
    }
}

/// The path of a `unix://` address.
fn check_socket_path(path: &str) -> Result<PathBuf, String> {
    let shape = "a unix socket is written unix:///absolute/path";
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not absolute: {shape}"));
    }
    if path.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "the socket path is {} bytes long; at most {MAX_SOCKET_PATH} fit in a socket address",
            path.len()
        ));
    }
    if path.ends_with('/') || path.contains("//") {
        return Err(format!("{path:?}: {shape}, naming the socket file"));
    }
    if path.chars().any(|c| c.is_control() || "%?#".contains(c)) {
        return Err(format!(
            "{path:?}: no control characters, %, ? or # in a socket path"
        ));
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!("{path:?}: no . or .. components in a socket path"));
    }
    Ok(PathBuf::from(path))
}

/// A `socket_owner`: a user name (as `useradd` allows) or a numeric uid.
fn check_owner_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        && !s.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a user name or uid (1 to 32 of A-Z a-z 0-9 _ - .)"
        ))
    }
}

/// The URL's host is a loopback IP literal or `localhost` (which the backend pins to 127.0.0.1).
pub fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// " (line N)" for a byte span, if any.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| {
        let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
        format!(" (line {line})")
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        let p = Path::new("c.toml");
        let c = Config::parse("", p).unwrap();
        assert_eq!(c.daemon.idle_ttl, Duration::from_secs(60));
        let c = Config::parse("[daemon]\nidle_ttl = \"2s\"\nmax_connections = 3\n", p).unwrap();
        assert_eq!(c.daemon.idle_ttl, Duration::from_secs(2));
        assert_eq!(c.daemon.max_connections, 3);
    }

    #[test]
    fn errors_name_the_key() {
        let p = Path::new("c.toml");
        let e = Config::parse("[daemon]\nidle_tll = \"2s\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("idle_tll") && e.contains("line 2"), "{e}");
        let e = Config::parse("[daemon]\nidle_ttl = \"soon\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("soon") && e.contains("c.toml"), "{e}");
        let e = Config::parse("[demon]\n", p).unwrap_err().to_string();
        assert!(e.contains("demon"), "{e}");
        assert!(Config::parse("[daemon]\nmax_pending = 0\n", p).is_err());
    }

    #[test]
    fn kill_grace_and_approval_command_are_bounded_and_named() {
        let p = Path::new("c.toml");
        let c = Config::parse("", p).unwrap();
        assert_eq!(c.daemon.kill_grace, Duration::from_secs(5));
        assert!(c.daemon.approval_command.is_none());
        let c = Config::parse(
            "[daemon]\nkill_grace = \"1s\"\napproval_command = [\"/usr/bin/notify-send\", \"agentkeys\"]\napproval_command_timeout = \"3s\"\n",
            p,
        )
        .unwrap();
        assert_eq!(c.daemon.kill_grace, Duration::from_secs(1));
        assert_eq!(
            c.daemon.approval_command.as_deref(),
            Some(&["/usr/bin/notify-send".to_string(), "agentkeys".to_string()][..])
        );
        assert_eq!(c.daemon.approval_command_timeout, Duration::from_secs(3));
        for (text, key) in [
            ("kill_grace = \"10ms\"", "daemon.kill_grace"),
            ("kill_grace = \"2m\"", "daemon.kill_grace"),
            (
                "approval_command_timeout = \"0s\"",
                "daemon.approval_command_timeout",
            ),
            ("approval_command = []", "daemon.approval_command"),
            ("approval_command = [\"notify-send\"]", "absolute"),
            ("approval_command = [\"/bin/x\", \"a\\u0000b\"]", "NUL"),
        ] {
            let e = Config::parse(&format!("[daemon]\n{text}\n"), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn output_timeout_and_masking_caps() {
        let p = Path::new("c.toml");
        let d = Config::parse("", p).unwrap().daemon;
        assert_eq!(d.output_timeout, Duration::from_secs(60));
        assert_eq!(d.max_mask_bytes_per_run, 4 << 20);
        assert_eq!(d.max_mask_bytes, 64 << 20);
        let d = Config::parse(
            "[daemon]\noutput_timeout = \"2s\"\nmax_mask_bytes_per_run = 65536\nmax_mask_bytes = 131072\n",
            p,
        )
        .unwrap()
        .daemon;
        assert_eq!(d.output_timeout, Duration::from_secs(2));
        assert_eq!(
            (d.max_mask_bytes_per_run, d.max_mask_bytes),
            (65536, 131072)
        );
        for (text, key) in [
            ("output_timeout = \"0s\"", "output_timeout"),
            ("output_timeout = \"2h\"", "output_timeout"),
            ("max_mask_bytes_per_run = 100", "max_mask_bytes_per_run"),
            ("max_mask_bytes = 99999999999", "max_mask_bytes"),
            (
                "max_mask_bytes_per_run = 65536\nmax_mask_bytes = 4096",
                "at least daemon.max_mask_bytes_per_run",
            ),
            ("max_mask_bytes = -1", "line 2"),
        ] {
            let e = Config::parse(&format!("[daemon]\n{text}\n"), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn backends_and_services() {
        let p = Path::new("c.toml");
        let text = r#"
[backends.bao]
kind = "openbao"
address = "unix:///run/openbao/bao.sock"
socket_owner = "openbao"
approle = { role_id_file = "/r", secret_id_file = "/s" }

[backends.v]
kind = "vault"
address = "https://vault.example:8200"
mount = "kv/team"
token_file = "/t"
timeout = "2s"

[services.gh]
backend = "bao"
path = "secret/github"
field = "token"
cache_ttl = "5m"
high_value = true
"#;
        let c = Config::parse(text, p).unwrap();
        let b = &c.backends["bao"];
        assert_eq!(b.kind, BackendKind::Openbao);
        assert_eq!(b.mount, "secret");
        assert_eq!(b.timeout, Duration::from_secs(5));
        assert_eq!(b.approle.as_ref().unwrap().mount, "approle");
        assert_eq!(c.backends["v"].mount, "kv/team");
        assert_eq!(b.socket_owner.as_deref(), Some("openbao"));
        assert!(!b.allow_plain_http);
        let gh = &c.services["gh"];
        assert_eq!(gh.cache_ttl, Duration::from_secs(300));
        assert!(gh.high_value && !gh.allow_inline);
        assert_eq!(gh.path_in_mount("secret"), "github");
        assert_eq!(gh.path_in_mount("other"), "secret/github");
    }

    #[test]
    fn only_loopback_may_use_plain_http() {
        for ok in [
            "http://127.0.0.1:8200",
            "http://127.9.9.9:1",
            "http://[::1]:8200",
            "http://localhost:8200",
            "https://bao.example",
            "https://10.0.0.1:8200/",
        ] {
            assert!(check_address(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("http://10.0.0.1:8200", "loopback"),
            ("http://localhost.evil.example", "loopback"),
            ("http://[::ffff:10.0.0.1]:1", "loopback"),
            ("ftp://127.0.0.1", "scheme"),
            ("https://b/v1/secret", "without a path"),
            ("https://b?x=1", "without a path"),
            ("https://user@b", "user name"),
            ("bao:8200", "scheme"),
        ] {
            let e = check_address(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// Item 4 of issue 14: plain http to the loopback needs the explicit opt-in, and the keys
    /// that belong to one kind of address are refused on the others.
    #[test]
    fn plain_http_needs_the_opt_in_and_keys_fit_the_address() {
        let p = Path::new("c.toml");
        let backend = |address: &str, extra: &str| {
            format!(
                "[backends.bao]\nkind = \"openbao\"\naddress = \"{address}\"\ntoken_file = \"/t\"\n{extra}"
            )
        };
        let e = Config::parse(&backend("http://127.0.0.1:8200", ""), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backends.bao.address")
                && e.contains("allow_plain_http = true")
                && e.contains("unix://"),
            "{e}"
        );
        let c = Config::parse(
            &backend("http://127.0.0.1:8200", "allow_plain_http = true\n"),
            p,
        )
        .unwrap();
        assert!(c.backends["bao"].allow_plain_http);
        // The opt-in never reaches beyond the loopback.
        let e = Config::parse(
            &backend("http://10.0.0.1:8200", "allow_plain_http = true\n"),
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("never allowed off the loopback"), "{e}");
        for (address, extra, key) in [
            (
                "https://b:8200",
                "allow_plain_http = true\n",
                "allow_plain_http",
            ),
            (
                "unix:///run/b.sock",
                "allow_plain_http = true\n",
                "allow_plain_http",
            ),
            ("https://b:8200", "socket_owner = \"bao\"\n", "socket_owner"),
            (
                "unix:///run/b.sock",
                "socket_owner = \"-x\"\n",
                "socket_owner",
            ),
            ("unix:///run/b.sock", "ca_file = \"/ca.pem\"\n", "ca_file"),
        ] {
            let e = Config::parse(&backend(address, extra), p)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("backends.bao.{key}")),
                "{address} {extra}: {e}"
            );
        }
    }

    #[test]
    fn unix_socket_addresses_are_checked() {
        assert_eq!(
            check_address("unix:///run/openbao/bao.sock").unwrap(),
            Address::Unix(PathBuf::from("/run/openbao/bao.sock"))
        );
        let long = format!("unix:///{}", "a".repeat(MAX_SOCKET_PATH));
        for (bad, why) in [
            ("unix://run/bao.sock", "not absolute"),
            ("unix:/run/bao.sock", "three slashes"),
            ("unix:///run/../etc/bao.sock", ".."),
            ("unix:///run/./bao.sock", ".."),
            ("unix:///run/openbao/", "naming the socket file"),
            ("unix:///run//bao.sock", "naming the socket file"),
            ("unix:///run/bao.sock?x=1", "no control characters"),
            ("unix:///run/b%2Fao.sock", "no control characters"),
            ("unix:///run/b\nao.sock", "no control characters"),
            (long.as_str(), "at most 107"),
        ] {
            let e = check_address(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn kv_paths_cannot_climb() {
        for ok in ["secret", "kv/team-a", "a.b/c_d"] {
            assert!(check_kv_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/secret", "secret/", "a//b", "../x", "a/./b", "a b", "a%2F..", "é",
        ] {
            assert!(check_kv_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agentkeys_backends_and_listeners() {
        let p = Path::new("c.toml");
        let fp = format!("sha256:{}", "ab".repeat(32));
        let good = format!(
            "[daemon]\nlisten = [\"tls://100.64.0.5:7777\"]\n\n[backends.owner]\nkind = \"agentkeys\"\naddress = \"tls://10.0.0.1:7777\"\nfingerprint = \"{fp}\"\ntoken_file = \"/etc/ak/owner.token\"\n\n[services.github]\nbackend = \"owner\"\n\n[services.gh2]\nbackend = \"owner\"\npath = \"github\"\n"
        );
        let c = Config::parse(&good, p).unwrap();
        assert_eq!(c.daemon.listen, vec!["tls://100.64.0.5:7777".to_string()]);
        assert_eq!(c.services["github"].remote_name("github"), "github");
        assert_eq!(c.services["gh2"].remote_name("gh2"), "github");
        // Each mistake names its key.
        for (bad, key) in [
            (
                good.replace("tls://10.0.0.1", "https://10.0.0.1"),
                "backends.owner.address",
            ),
            (good.replace(&fp, "sha256:00"), "backends.owner.fingerprint"),
            (
                good.replace(&format!("fingerprint = \"{fp}\"\n"), ""),
                "backends.owner.fingerprint",
            ),
            (
                good.replace("token_file = \"/etc/ak/owner.token\"\n", ""),
                "backends.owner.token_file",
            ),
            (
                good.replace("/etc/ak/owner.token", "owner.token"),
                "backends.owner.token_file",
            ),
            (
                good.replace(
                    "kind = \"agentkeys\"\n",
                    "kind = \"agentkeys\"\nca_file = \"/x\"\n",
                ),
                "backends.owner.ca_file",
            ),
            (
                good.replace("path = \"github\"", "path = \"github\"\nfield = \"token\""),
                "services.gh2.field",
            ),
            (
                good.replace("path = \"github\"", "path = \"Git/Hub\""),
                "services.gh2.path",
            ),
            (
                good.replace("tls://100.64.0.5:7777", "tcp://100.64.0.5:7777"),
                "daemon.listen[0]",
            ),
            (
                good.replace("tls://100.64.0.5:7777", "tls://1.1.1.1:7777"),
                "daemon.listen[0]",
            ),
        ] {
            let e = Config::parse(&bad, p).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        // The public opt-in.
        let public = good
            .replace("tls://100.64.0.5:7777", "tls://1.1.1.1:7777")
            .replace("[daemon]\n", "[daemon]\nallow_public_listen = true\n");
        assert!(Config::parse(&public, p).is_ok());
        // A fingerprint belongs to kind = "agentkeys" only.
        let e = Config::parse(
            &format!("[backends.b]\nkind = \"openbao\"\naddress = \"https://b:8200\"\ntoken_file = \"/t\"\nfingerprint = \"{fp}\"\n"),
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("backends.b.fingerprint"), "{e}");
    }
}
