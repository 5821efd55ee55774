//! The client side: connect to agentkeysd, say hello with a session token, make requests.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use agentkeys_hardening::page::MappedSecret;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::conn::{Conn, RecvError};
use crate::wire::{
    self, ErrorCode, PROTOCOL_VERSION, Request, RequestBody, ResponseBody, SessionInfo, WireToken,
};

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens at the socket path.
    #[error("agentkeysd is not running (no daemon at {path}); start it with `agentkeys daemon`")]
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
    },
    /// Whatever listens at the socket path runs as a uid that is not the daemon's: nothing was
    /// sent to it (no token, no fd).
    #[error(
        "refusing to talk to the process listening at {path}: it runs as uid {uid}, not as this \
         uid ({own}), root, or AGENTKEYS_DAEMON_UID; nothing was sent to it (set \
         AGENTKEYS_DAEMON_UID to the daemon's uid if agentkeysd runs as another user)"
    )]
    WrongServer {
        /// The socket path.
        path: PathBuf,
        /// The listener's uid (`SO_PEERCRED`).
        uid: u32,
        /// Our own effective uid.
        own: u32,
    },
    /// The socket exists but cannot be used by this user.
    #[error("cannot connect to agentkeysd at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The daemon closed the connection.
    #[error(
        "agentkeysd closed the connection (this uid may not be allowed to connect, or the session ended; see the daemon log)"
    )]
    Closed,
    /// Sending or receiving failed.
    #[error("talking to agentkeysd: {0}")]
    Io(#[from] io::Error),
    /// The daemon's answer was not understood.
    #[error("unexpected answer from agentkeysd: {0}")]
    Protocol(String),
    /// A high-value service waits for a human's approval.
    #[error("{message}")]
    Pending {
        /// The approval code.
        code: String,
        /// The service.
        service: String,
        /// What the human must run.
        message: String,
    },
    /// The daemon refused the request.
    #[error("{message}")]
    Refused {
        /// The daemon's code.
        code: ErrorCode,
        /// The daemon's message.
        message: String,
    },
}

impl From<RecvError> for ClientError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Closed => ClientError::Closed,
            RecvError::Io(e) => io_error(e),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// A reset or broken pipe means the daemon closed the connection on us.
fn io_error(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ClientError::Closed,
        _ => ClientError::Io(e),
    }
}

/// An answer with the fds that came with it.
pub struct Answer {
    /// The response body (never `Error`: that becomes [`ClientError::Refused`]).
    pub body: ResponseBody,
    /// Descriptors attached to the response.
    pub fds: Vec<OwnedFd>,
}

/// A connection to agentkeysd.
pub struct Client {
    conn: Conn,
    next_id: u64,
}

/// The uid a daemon may run as besides ours and root's: `AGENTKEYS_DAEMON_UID` (for agents
/// under their own uids talking to a daemon of another user).
pub const DAEMON_UID_ENV: &str = "AGENTKEYS_DAEMON_UID";

/// Whether the process listening at the other end of `conn` may be told anything: its uid
/// (`SO_PEERCRED`, recorded by the kernel when it called `listen`) is ours, root's, or the one
/// `AGENTKEYS_DAEMON_UID` names. Anyone who can create a socket at the path (a stale socket's
/// directory another user can write to, `AGENTKEYS_SOCKET` pointed elsewhere) would otherwise
/// receive the token of the next hello and the stdio fds of the next `run`.
fn check_server(conn: &Conn, path: &Path) -> Result<(), ClientError> {
    let cred = agentkeys_hardening::peer::peer_credentials(conn.socket())?;
    let own = nix::unistd::geteuid().as_raw();
    let configured = std::env::var(DAEMON_UID_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    if cred.uid == own || cred.uid == 0 || Some(cred.uid) == configured {
        Ok(())
    } else {
        Err(ClientError::WrongServer {
            path: path.to_path_buf(),
            uid: cred.uid,
            own,
        })
    }
}

impl Client {
    /// Connects to the daemon's socket and checks who listens there (see [`DAEMON_UID_ENV`])
    /// before anything is sent.
    ///
    /// # Errors
    /// [`ClientError::NotRunning`] when nothing listens there; [`ClientError::WrongServer`]
    /// when another uid does; [`ClientError::Connect`] else.
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        match Conn::connect(path).await {
            Ok(conn) => {
                check_server(&conn, path)?;
                Ok(Client { conn, next_id: 1 })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(ClientError::NotRunning {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => Err(ClientError::Connect {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Connects and authenticates in one step.
    ///
    /// # Errors
    /// As [`Client::connect`] and [`Client::hello`].
    pub async fn connect_with(
        path: &Path,
        token: &SecretString,
    ) -> Result<(Client, SessionInfo), ClientError> {
        let mut c = Client::connect(path).await?;
        let info = c.hello(token).await?;
        Ok((c, info))
    }

    /// Authenticates the connection.
    ///
    /// # Errors
    /// [`ClientError::Refused`] with `unauthenticated`, `revoked` or `expired`.
    pub async fn hello(&mut self, token: &SecretString) -> Result<SessionInfo, ClientError> {
        let body = RequestBody::Hello {
            token: WireToken(token.clone()),
        };
        if let Err(e) = self.send(body, &[]).await {
            // A daemon at its connection limit answers `busy` and closes, possibly before the
            // hello arrived (EPIPE here): its reason is still queued for us.
            return Err(match self.recv().await {
                Err(refused @ ClientError::Refused { .. }) => refused,
                _ => e,
            });
        }
        match self.recv().await?.body {
            ResponseBody::Welcome(info) => Ok(*info),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a request with fds attached and returns its id, without waiting.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn send(
        &mut self,
        body: RequestBody,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = wire::encode(&Request {
            v: PROTOCOL_VERSION,
            id,
            body,
        })?;
        self.conn.send(&bytes, fds).await.map_err(io_error)?;
        Ok(id)
    }

    /// Waits for the daemon's next answer (after [`Client::send`]).
    ///
    /// # Errors
    /// [`ClientError::Refused`] for an error answer; transport errors.
    pub async fn recv(&mut self) -> Result<Answer, ClientError> {
        let packet = self.conn.recv().await?;
        let resp = wire::decode_response(&packet.data)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        match resp.body {
            ResponseBody::Error { code, message } => Err(ClientError::Refused { code, message }),
            ResponseBody::Pending {
                code,
                service,
                message,
                ..
            } => Err(ClientError::Pending {
                code,
                service,
                message,
            }),
            body => Ok(Answer {
                body,
                fds: packet.fds,
            }),
        }
    }

    /// Sends a request and waits for its answer.
    ///
    /// # Errors
    /// [`ClientError::Refused`] when the daemon answers with an error; transport errors.
    pub async fn call(&mut self, body: RequestBody) -> Result<Answer, ClientError> {
        self.send(body, &[]).await?;
        self.recv().await
    }
}

/// A credential as received.
pub enum Delivered {
    /// A secret page mapped read-only (unmapped and closed on drop).
    Fd(MappedSecret),
    /// Inline bytes (wiped on drop).
    Inline(Zeroizing<Vec<u8>>),
}

impl Delivered {
    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Delivered::Fd(m) => m,
            Delivered::Inline(b) => b,
        }
    }

    /// Whether the daemon used the degraded sealed-memfd fallback.
    pub fn degraded(&self) -> bool {
        matches!(self, Delivered::Fd(m) if m.backing().is_degraded())
    }
}

impl Client {
    /// Asks for a credential: as an fd (the default) or, with `inline`, as bytes.
    ///
    /// # Errors
    /// [`ClientError::Refused`] (scope, not found, inline not allowed, approval needed);
    /// [`ClientError::Protocol`] when the answer carries no fd, a bad fd, or a length that does
    /// not match the page.
    pub async fn get_credential(
        &mut self,
        service: &str,
        inline: bool,
    ) -> Result<Delivered, ClientError> {
        let answer = self
            .call(RequestBody::GetCredential {
                service: service.to_string(),
                inline,
                wrap_key: None,
            })
            .await?;
        let (len, value_b64, delivery) = match answer.body {
            ResponseBody::Credential {
                len,
                value_b64,
                delivery,
                ..
            } => (len, value_b64, delivery),
            other => return Err(unexpected(&other)),
        };
        let mut fds = answer.fds.into_iter();
        match (delivery.as_str(), value_b64) {
            ("fd", None) => {
                let fd = fds
                    .next()
                    .ok_or_else(|| ClientError::Protocol("fd delivery without an fd".into()))?;
                let mapped =
                    MappedSecret::map(fd).map_err(|e| ClientError::Protocol(e.to_string()))?;
                if mapped.len() != len {
                    return Err(ClientError::Protocol(
                        "delivered page does not match the announced length".into(),
                    ));
                }
                Ok(Delivered::Fd(mapped))
            }
            ("inline", Some(b64)) => {
                use base64::Engine;
                let b64 = Zeroizing::new(b64);
                let mut out = Zeroizing::new(Vec::with_capacity(b64.len()));
                base64::engine::general_purpose::STANDARD
                    .decode_vec(b64.as_bytes(), &mut out)
                    .map_err(|_| ClientError::Protocol("inline value is not base64".into()))?;
                Ok(Delivered::Inline(out))
            }
            _ => Err(ClientError::Protocol(format!(
                "unknown delivery {delivery:?}"
            ))),
        }
    }
}

/// An answer of the wrong kind.
pub fn unexpected(body: &ResponseBody) -> ClientError {
    // By kind only: a `credential` answer carries the secret for inline delivery.
    ClientError::Protocol(format!("unexpected answer of kind {}", body.kind()))
}

/// This process's file-mode creation mask, for the `umask` of a `run` request, read from the
/// `Umask:` line of `/proc/self/status` (`umask(2)` cannot read it without changing it, and
/// another thread could create a file meanwhile). `None` on kernels without that line.
pub fn current_umask() -> Option<u32> {
    let st = agentkeys_hardening::process::ProcStatus::read_self().ok()?;
    u32::from_str_radix(st.get("Umask")?, 8)
        .ok()
        .filter(|m| *m <= 0o777)
}

#[cfg(test)]
mod umask_tests {
    #[test]
    fn current_umask_is_read_without_changing_it() {
        // The harness's umask is whatever it is; reading twice must agree and stay in range.
        let a = super::current_umask().expect("a kernel with Umask: in /proc/self/status");
        assert!(a <= 0o777);
        assert_eq!(super::current_umask(), Some(a));
    }
}
