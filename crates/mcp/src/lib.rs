//! The agentkeys MCP server: `agentkeys mcp` serves the `run`, `get_credential`,
//! `list_credentials` and `whoami` tools over stdio as a client of the broker.
//!
//! It connects to agentkeysd as an **agent** (never as the owner) with a fresh connection per
//! tool call, so one slow `run` never blocks another call and a revoked token takes effect on
//! the next call. What it never does:
//!
//! - put a secret into a tool result, except the bytes of a service the owner stored with
//!   `--allow-inline`;
//! - map a credential page: with an fd channel (`--fd-channel FD`) it forwards the daemon's fd
//!   over that socket unread, with a one-time handle the result names;
//! - pass its own agent token to a program it runs (`caller_env` is PATH, HOME and LANG only).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentkeys_proto::client::{Client, ClientError, Delivered};
use agentkeys_proto::wire::{ErrorCode, RequestBody, ResponseBody, Role};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{
    Peer, RoleServer, ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router,
};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

/// The tool names this server exposes, fixed by the design contract.
pub const TOOL_NAMES: [&str; 4] = ["run", "get_credential", "list_credentials", "whoami"];

/// The experimental client capability that says "I can take a credential as an fd".
pub const FD_CAPABILITY: &str = "agentkeys/fd";

/// Most bytes of stdout (and, separately, of stderr) a `run` result carries.
pub const OUTPUT_CAP: usize = 64 * 1024;
/// Most bytes of `stdin` a `run` accepts.
pub const STDIN_CAP: usize = 1024 * 1024;
/// Default and largest `run` timeouts.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `run` timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Between SIGTERM and SIGKILL when a `run` times out.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long output may keep flowing after the program exited (a background child holding the
/// pipes open must not hang the tool call).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// `--fd-channel` does not name an inherited socket.
    #[error("--fd-channel {fd}: {why}")]
    FdChannel {
        /// The fd number given.
        fd: RawFd,
        /// What is wrong with it.
        why: String,
    },
    /// The MCP transport failed.
    #[error("MCP server: {0}")]
    Serve(String),
}

/// What `agentkeys mcp` was started with.
pub struct Options {
    /// The agent's session token (from `AGENTKEYS_TOKEN` / `AGENTKEYS_TOKEN_FILE`).
    pub token: SecretString,
    /// agentkeysd's socket.
    pub socket: PathBuf,
    /// An inherited unix socket to forward credential fds over.
    pub fd_channel: Option<RawFd>,
}

/// Checks that `fd` is an open socket this process inherited (fds 0-2 are the transport).
///
/// # Errors
/// [`McpError::FdChannel`] saying what is wrong.
pub fn check_fd_channel(fd: RawFd) -> Result<(), McpError> {
    let bad = |why: &str| McpError::FdChannel {
        fd,
        why: why.to_string(),
    };
    if fd <= 2 {
        return Err(bad(
            "fds 0, 1 and 2 carry the MCP transport; pass another fd",
        ));
    }
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|_| bad("not an open file descriptor of this process"))?;
    if !target.to_string_lossy().starts_with("socket:") {
        return Err(bad("not a socket (expected an inherited unix socket)"));
    }
    Ok(())
}

/// Serves MCP on stdin/stdout until the client disconnects.
///
/// # Errors
/// [`McpError`] when the channel is unusable or the transport fails.
pub async fn serve_stdio(opts: Options) -> Result<(), McpError> {
    if let Some(fd) = opts.fd_channel {
        check_fd_channel(fd)?;
    }
    let server = AgentkeysMcp::new(opts);
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| McpError::Serve(e.to_string()))?;
    running
        .waiting()
        .await
        .map_err(|e| McpError::Serve(e.to_string()))?;
    Ok(())
}

/// `run` input.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct RunArgs {
    /// The program to run (looked up in PATH), e.g. "gh".
    pub command: String,
    /// Its arguments, e.g. ["pr", "list"].
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables to fill with stored credentials: {"VAR": "service"}, e.g.
    /// {"GH_TOKEN": "github"}. The program sees the secret; you never do.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Like env, but VAR names a readable file holding the secret: {"VAR": "service"}.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Through the credential-injecting proxy: {"VAR": "service"}. VAR holds a placeholder and
    /// the program's HTTPS requests go through agentkeys' proxy, which puts the real value in
    /// place of the placeholder only on requests to the service's own hosts; the program never
    /// holds the value. E.g. {"GH_TOKEN": "github"} for `gh` or `git` over HTTPS.
    #[serde(default)]
    pub proxy: BTreeMap<String, String>,
    /// Working directory (default: the MCP server's).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Text written to the program's standard input (default: none).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Seconds before the program is stopped (default 60, at most 600).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

/// `get_credential` input.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct ServiceArgs {
    /// The service name, as listed by list_credentials (e.g. "github").
    pub service: String,
}

/// The server: configuration plus the tool router.
#[derive(Clone)]
pub struct AgentkeysMcp {
    opts: Arc<Options>,
    tool_router: ToolRouter<AgentkeysMcp>,
}

fn error_result(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

fn structured(text: String, value: serde_json::Value) -> CallToolResult {
    let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
    r.structured_content = Some(value);
    r
}

/// The daemon's refusal as a sentence for a model (never a value: the daemon never puts one in
/// an error).
fn describe_refusal(e: &ClientError) -> String {
    match e {
        ClientError::Refused { code, message } => {
            let what = match code {
                ErrorCode::Forbidden => "denied",
                ErrorCode::NotFound => "not found",
                ErrorCode::Unauthenticated | ErrorCode::Revoked | ErrorCode::Expired => {
                    "the agent session is not valid (the owner must mint a new token with `agentkeys agent add`)"
                }
                ErrorCode::Busy => "agentkeysd is busy, try again",
                ErrorCode::Unavailable => {
                    "the secret store behind agentkeysd is unavailable; try again later"
                }
                _ => "refused",
            };
            let code = serde_json::to_value(code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!("agentkeys: {what} ({code}): {message}")
        }
        ClientError::Pending {
            code,
            service,
            message,
        } => {
            format!(
                "agentkeys: approval required (pending, code {code}) for {service:?}: {message}"
            )
        }
        other => format!("agentkeys: {other}"),
    }
}

/// PATH, HOME and LANG of this process: what a program run through `run` starts with. Never
/// an `AGENTKEYS_TOKEN*` variable.
fn minimal_env() -> Vec<String> {
    ["PATH", "HOME", "LANG"]
        .iter()
        .filter_map(|k| {
            let v = std::env::var_os(k)?.into_string().ok()?;
            Some(format!("{k}={v}"))
        })
        .collect()
}

/// Reads a pipe to its end, keeping at most [`OUTPUT_CAP`] bytes.
async fn drain(fd: OwnedFd) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut truncated = false;
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return (out, false);
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = OUTPUT_CAP - out.len();
                if n > room {
                    truncated = true;
                }
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (out, truncated)
}

fn run_result(
    exit_code: i32,
    stdout: &[u8],
    stderr: &[u8],
    truncated: bool,
    timed_out: bool,
) -> CallToolResult {
    let stdout = String::from_utf8_lossy(stdout).into_owned();
    let stderr = String::from_utf8_lossy(stderr).into_owned();
    let mut text = format!("exit_code: {exit_code}");
    if timed_out {
        text.push_str(" (timed out: stopped by agentkeys)");
    }
    if truncated {
        text.push_str(&format!(
            " (output truncated to {OUTPUT_CAP} bytes per stream)"
        ));
    }
    text.push_str(&format!("\n--- stdout\n{stdout}\n--- stderr\n{stderr}"));
    structured(
        text,
        json!({
            "exit_code": exit_code,
            "stdout": stdout,
            "stderr": stderr,
            "truncated": truncated,
            "timed_out": timed_out,
        }),
    )
}

/// Sends `fd` with `msg` over the channel socket, without blocking.
fn forward_fd(channel: RawFd, msg: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [fd.as_raw_fd()];
    let cmsgs = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(msg)];
    let n = sendmsg::<()>(
        channel,
        &iov,
        &cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if n != msg.len() {
        return Err(std::io::Error::other("short send on the fd channel"));
    }
    Ok(())
}

/// A one-time handle naming one forwarded fd.
fn new_handle() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)?;
    Ok(format!(
        "akfd_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

impl AgentkeysMcp {
    /// A server for these options.
    pub fn new(opts: Options) -> AgentkeysMcp {
        AgentkeysMcp {
            opts: Arc::new(opts),
            tool_router: Self::tool_router(),
        }
    }

    /// A fresh, authenticated connection; refuses an owner session.
    async fn connect(&self) -> Result<Client, CallToolResult> {
        let (client, info) = Client::connect_with(&self.opts.socket, &self.opts.token)
            .await
            .map_err(|e| error_result(describe_refusal(&e)))?;
        if info.role != Role::Agent {
            return Err(error_result(
                "agentkeys mcp refuses to act with the owner's session: the MCP host must pass an agent token (`agentkeys agent add NAME --scope ... --out FILE`, then AGENTKEYS_TOKEN_FILE=FILE)",
            ));
        }
        Ok(client)
    }
}

#[tool_router(router = tool_router)]
impl AgentkeysMcp {
    /// run
    #[tool(
        name = "run",
        description = "Run a program with stored credentials injected into its environment, and get its exit code, stdout and stderr. Use this whenever a command needs a credential: map an environment variable to a stored service name and the program receives the secret, while you never see it. Any occurrence of a secret in the output is replaced by ******** before it reaches you. Example: {\"command\":\"gh\",\"args\":[\"pr\",\"list\"],\"env\":{\"GH_TOKEN\":\"github\"}}. Use `files` instead of `env` for programs that read a secret from a file path ({\"VAR\":\"service\"}: VAR holds the path). Call list_credentials to see which service names exist. Output is capped at 64 KiB per stream (truncated=true beyond); the program is stopped after timeout_secs (default 60, max 600; timed_out=true). exit_code 127 means the command was not found, 126 that it could not be executed, 128+N that signal N ended it."
    )]
    async fn run(&self, Parameters(a): Parameters<RunArgs>) -> CallToolResult {
        self.do_run(a).await
    }

    /// get_credential
    #[tool(
        name = "get_credential",
        description = "Fetch one stored credential for a runtime that can hold it safely. Values are not shown to you: when your MCP client supports the agentkeys/fd capability the secret is handed to the client as a file descriptor and you get only a one-time handle; otherwise only services the owner explicitly stored with --allow-inline are returned as text. For everything else this returns an error: use the `run` tool with an env mapping instead, e.g. {\"command\":\"gh\",\"args\":[\"pr\",\"list\"],\"env\":{\"GH_TOKEN\":\"github\"}}."
    )]
    async fn get_credential(
        &self,
        peer: Peer<RoleServer>,
        Parameters(a): Parameters<ServiceArgs>,
    ) -> CallToolResult {
        let fd_capable = peer.peer_info().is_some_and(|info| {
            info.capabilities
                .experimental
                .as_ref()
                .is_some_and(|x| x.contains_key(FD_CAPABILITY))
        });
        match (fd_capable, self.opts.fd_channel) {
            (true, Some(channel)) => self.credential_fd(channel, &a.service).await,
            _ => self.credential_inline(&a.service).await,
        }
    }

    /// list_credentials
    #[tool(
        name = "list_credentials",
        description = "List the credentials this agent may use: service names and their policy (high_value: needs a human's approval; allow_inline: get_credential may return it as text). Values are never shown. To use a credential, call `run` with an env mapping, e.g. {\"command\":\"gh\",\"args\":[\"pr\",\"list\"],\"env\":{\"GH_TOKEN\":\"github\"}}."
    )]
    async fn list_credentials(&self) -> CallToolResult {
        let mut client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return r,
        };
        match client.call(RequestBody::ListServices {}).await {
            Ok(answer) => match answer.body {
                ResponseBody::Services { services } => {
                    let mut text = String::new();
                    if services.is_empty() {
                        text.push_str("no credentials in this agent's scope");
                    }
                    for s in &services {
                        text.push_str(&format!(
                            "{} (high_value: {}, allow_inline: {})\n",
                            s.name, s.high_value, s.allow_inline
                        ));
                    }
                    structured(text, json!({ "services": services }))
                }
                other => error_result(format!("unexpected answer {}", other.kind())),
            },
            Err(e) => error_result(describe_refusal(&e)),
        }
    }

    /// whoami
    #[tool(
        name = "whoami",
        description = "Show which agent identity this MCP server acts as: agent name, the services in its scope, and when its session expires (unix seconds). Never shows a token or a credential value."
    )]
    async fn whoami(&self) -> CallToolResult {
        let mut client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return r,
        };
        match client.call(RequestBody::Whoami {}).await {
            Ok(answer) => match answer.body {
                ResponseBody::Whoami(info) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let agent = info.agent.clone().unwrap_or_default();
                    let mut text = format!(
                        "agent: {agent}\nscope: {}\nexpires: {} (in {} s)",
                        info.scope.join(", "),
                        info.expires,
                        info.expires.saturating_sub(now)
                    );
                    // `agentkeys jail`: say so (the session is the jail's, ended with it).
                    if let Some(j) = &info.jail {
                        text.push_str(&format!("\njailed: {j}"));
                    }
                    structured(
                        text,
                        json!({
                            "agent": agent,
                            "identity": info.identity,
                            "scope": info.scope,
                            "created": info.created,
                            "expires": info.expires,
                            "expires_in_secs": info.expires.saturating_sub(now),
                            "jail": info.jail,
                        }),
                    )
                }
                other => error_result(format!("unexpected answer {}", other.kind())),
            },
            Err(e) => error_result(describe_refusal(&e)),
        }
    }
}

impl AgentkeysMcp {
    async fn credential_fd(&self, channel: RawFd, service: &str) -> CallToolResult {
        let mut client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let answer = match client
            .call(RequestBody::GetCredential {
                service: service.to_string(),
                inline: false,
                wrap_key: None,
            })
            .await
        {
            Ok(a) => a,
            Err(e) => return error_result(describe_refusal(&e)),
        };
        let (len, degraded) = match answer.body {
            ResponseBody::Credential {
                len,
                degraded,
                ref delivery,
                ..
            } if delivery == "fd" => (len, degraded),
            ref other => return error_result(format!("unexpected answer {}", other.kind())),
        };
        let Some(fd) = answer.fds.into_iter().next() else {
            return error_result("agentkeysd sent no fd");
        };
        let handle = match new_handle() {
            Ok(h) => h,
            Err(e) => return error_result(format!("no randomness for a handle: {e}")),
        };
        let mut msg = json!({
            "handle": handle,
            "service": service,
            "len": len,
            "degraded": degraded,
        })
        .to_string();
        msg.push('\n');
        // The page is forwarded unread and our copy closed when `fd` drops.
        if let Err(e) = forward_fd(channel, msg.as_bytes(), fd.as_fd()) {
            return error_result(format!("forwarding the fd over --fd-channel failed: {e}"));
        }
        structured(
            format!(
                "{service}: delivered to the client's runtime as a file descriptor; handle {handle} ({len} bytes). The value is not shown."
            ),
            json!({
                "service": service,
                "delivery": "fd",
                "handle": handle,
                "len": len,
                "degraded": degraded,
            }),
        )
    }

    async fn credential_inline(&self, service: &str) -> CallToolResult {
        let mut client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return r,
        };
        match client.get_credential(service, true).await {
            Ok(Delivered::Inline(bytes)) => {
                let value = Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned());
                structured(
                    value.to_string(),
                    json!({
                        "service": service,
                        "delivery": "inline",
                        "value": value.as_str(),
                    }),
                )
            }
            Ok(Delivered::Fd(_)) => {
                error_result("agentkeysd answered with an fd to an inline request")
            }
            Err(ClientError::Refused {
                code: ErrorCode::Forbidden,
                message,
            }) if message.contains("inline") => error_result(format!(
                "agentkeys: {service:?} cannot be shown: the owner did not allow inline delivery for it, and this MCP client cannot take it as a file descriptor. Values are never shown. Use the `run` tool with an env mapping so the program gets the secret instead, e.g. {{\"command\":\"gh\",\"args\":[\"pr\",\"list\"],\"env\":{{\"GH_TOKEN\":\"{service}\"}}}}."
            )),
            Err(e) => error_result(describe_refusal(&e)),
        }
    }

    async fn do_run(&self, a: RunArgs) -> CallToolResult {
        use nix::fcntl::OFlag;
        use nix::unistd::pipe2;

        let timeout = match a.timeout_secs {
            None => DEFAULT_TIMEOUT,
            Some(t) if t.is_finite() && t > 0.0 => {
                Duration::from_secs_f64(t.min(MAX_TIMEOUT.as_secs_f64()))
            }
            Some(_) => return error_result("timeout_secs must be a positive number of seconds"),
        };
        if a.stdin.as_ref().is_some_and(|s| s.len() > STDIN_CAP) {
            return error_result(format!("stdin is larger than {STDIN_CAP} bytes"));
        }
        let cwd = match a.cwd {
            Some(c) => std::path::absolute(&c),
            None => std::env::current_dir(),
        };
        let cwd = match cwd.map(|p| p.into_os_string().into_string()) {
            Ok(Ok(c)) => c,
            _ => {
                return error_result(
                    "the working directory is not usable (not found or not UTF-8)",
                );
            }
        };
        let mut client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let pipes = (|| -> nix::Result<_> {
            Ok((
                pipe2(OFlag::O_CLOEXEC)?,
                pipe2(OFlag::O_CLOEXEC)?,
                pipe2(OFlag::O_CLOEXEC)?,
            ))
        })();
        let ((in_r, in_w), (out_r, out_w), (err_r, err_w)) = match pipes {
            Ok(p) => p,
            Err(e) => return error_result(format!("creating pipes: {e}")),
        };
        let mut argv = vec![a.command];
        argv.extend(a.args);
        let sent = client
            .send(
                RequestBody::Run {
                    argv,
                    env: a.env,
                    files: a.files,
                    proxy: a.proxy,
                    caller_env: minimal_env(),
                    cwd: Some(cwd),
                    masking: true,
                    // The program creates files as this server would, not with the daemon's 077.
                    umask: agentkeys_proto::client::current_umask(),
                },
                &[in_r.as_fd(), out_w.as_fd(), err_w.as_fd()],
            )
            .await;
        // The child-side ends live on in the daemon; ours must close so EOF can arrive.
        drop((in_r, out_w, err_w));
        if let Err(e) = sent {
            return error_result(describe_refusal(&e));
        }
        let stdout_task = tokio::spawn(drain(out_r));
        let stderr_task = tokio::spawn(drain(err_r));
        let stdin_data = a.stdin.unwrap_or_default();
        let stdin_task = tokio::spawn(async move {
            if let Ok(mut tx) = tokio::net::unix::pipe::Sender::from_owned_fd(in_w) {
                // EPIPE (the program does not read stdin) is fine.
                let _ = tx.write_all(stdin_data.as_bytes()).await;
            }
        });
        let abort_all = || {
            stdin_task.abort();
            stdout_task.abort();
            stderr_task.abort();
        };

        match client.recv().await {
            Ok(ans) if matches!(ans.body, ResponseBody::RunStarted { .. }) => {}
            Ok(ans) => {
                abort_all();
                return error_result(format!("unexpected answer {}", ans.body.kind()));
            }
            Err(ClientError::Refused {
                code: code @ (ErrorCode::CommandNotFound | ErrorCode::CannotExecute),
                message,
            }) => {
                abort_all();
                let exit = if code == ErrorCode::CommandNotFound {
                    127
                } else {
                    126
                };
                return run_result(
                    exit,
                    b"",
                    format!("agentkeys: {message}\n").as_bytes(),
                    false,
                    false,
                );
            }
            Err(e) => {
                abort_all();
                return error_result(describe_refusal(&e));
            }
        }

        let mut timed_out = false;
        let exit = match tokio::time::timeout(timeout, client.recv()).await {
            Ok(r) => r,
            Err(_) => {
                timed_out = true;
                let term = nix::sys::signal::Signal::SIGTERM as i32;
                let kill = nix::sys::signal::Signal::SIGKILL as i32;
                let _ = client.send(RequestBody::Signal { signal: term }, &[]).await;
                match tokio::time::timeout(KILL_GRACE, client.recv()).await {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = client.send(RequestBody::Signal { signal: kill }, &[]).await;
                        match tokio::time::timeout(Duration::from_secs(10), client.recv()).await {
                            Ok(r) => r,
                            Err(_) => {
                                abort_all();
                                return error_result(
                                    "the program did not stop after SIGKILL; gave up waiting",
                                );
                            }
                        }
                    }
                }
            }
        };
        let exit_code = match exit {
            Ok(ans) => match ans.body {
                ResponseBody::RunExit { code: Some(c), .. } => c,
                ResponseBody::RunExit {
                    signal: Some(s), ..
                } => 128 + s,
                other => {
                    abort_all();
                    return error_result(format!("unexpected answer {}", other.kind()));
                }
            },
            Err(e) => {
                abort_all();
                return error_result(describe_refusal(&e));
            }
        };
        stdin_task.abort();
        let collect = |task: tokio::task::JoinHandle<(Vec<u8>, bool)>| async move {
            let abort = task.abort_handle();
            match tokio::time::timeout(DRAIN_GRACE, task).await {
                Ok(Ok(r)) => r,
                _ => {
                    abort.abort();
                    (Vec::new(), true)
                }
            }
        };
        let (stdout, t1) = collect(stdout_task).await;
        let (stderr, t2) = collect(stderr_task).await;
        run_result(exit_code, &stdout, &stderr, t1 || t2, timed_out)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for AgentkeysMcp {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = Implementation::new("agentkeys", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "agentkeys lets you use stored credentials without seeing them. To run a command that needs a credential, call `run` with an env mapping, e.g. {\"command\":\"gh\",\"args\":[\"pr\",\"list\"],\"env\":{\"GH_TOKEN\":\"github\"}}; secrets in the output are masked. list_credentials shows the service names you may use."
                .into(),
        );
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> AgentkeysMcp {
        AgentkeysMcp::new(Options {
            token: SecretString::from("akt_test".to_string()),
            socket: PathBuf::from("/nonexistent/agentkeysd.sock"),
            fd_channel: None,
        })
    }

    #[test]
    fn the_router_serves_exactly_the_contract_tools() {
        let mut names: Vec<String> = server()
            .tool_router
            .list_all()
            .iter()
            .map(|t| t.name.to_string())
            .collect();
        names.sort();
        let mut want = TOOL_NAMES.map(str::to_string).to_vec();
        want.sort();
        assert_eq!(names, want);
        for t in server().tool_router.list_all() {
            let d = t.description.as_deref().unwrap_or_default();
            assert!(d.len() > 80, "{} needs a description for a model", t.name);
        }
    }

    #[test]
    fn fd_channel_must_be_an_inherited_socket() {
        for fd in [0, 1, 2] {
            assert!(check_fd_channel(fd).is_err());
        }
        assert!(check_fd_channel(987_654).is_err());
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(check_fd_channel(f.as_raw_fd()).is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check_fd_channel(a.as_raw_fd()).is_ok());
    }

    #[test]
    fn minimal_env_never_carries_a_token() {
        for e in minimal_env() {
            assert!(
                e.starts_with("PATH=") || e.starts_with("HOME=") || e.starts_with("LANG="),
                "{e}"
            );
        }
    }

    #[test]
    fn run_result_has_text_and_structured_content() {
        let r = run_result(3, b"out", b"err", false, true);
        let s = r.structured_content.clone().unwrap();
        assert_eq!(s["exit_code"], 3);
        assert_eq!(s["timed_out"], true);
        assert!(
            r.content[0]
                .as_text()
                .unwrap()
                .text
                .contains("exit_code: 3")
        );
        assert_ne!(r.is_error, Some(true));
    }

    #[tokio::test]
    async fn no_daemon_is_an_error_result() {
        let r = server().list_credentials().await;
        assert_eq!(r.is_error, Some(true));
        let text = &r.content[0].as_text().unwrap().text;
        assert!(text.contains("not running"), "{text}");
    }
}
