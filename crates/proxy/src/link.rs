//! Messages between the daemon and the proxy process: JSON, one per `SOCK_SEQPACKET` packet of
//! at most [`MAX_LINK_MESSAGE`] bytes, secret pages attached as fds (`SCM_RIGHTS`). A message is
//! `{"kind": ..., "body": {...}}`, the tag first: serde reads it in one pass, where a tag among
//! the fields (`{"kind": ..., "id": ...}`) made it buffer every field of every message first.
//!
//! The daemon decides; the proxy asks. The proxy knows which placeholders a run may use and
//! where (so it can refuse early and decide which connections to decrypt), but it never holds a
//! value it has not asked for, and it asks for each injected request: the daemon checks the
//! session, scope, policy and approval, writes the audit record, and only then answers (with a
//! page, or "use the copy you hold" while the service's `cache_ttl` runs).

use serde::{Deserialize, Serialize};

/// Largest message either side sends or accepts.
pub const MAX_LINK_MESSAGE: usize = 64 * 1024;

/// Most placeholders one registration holds.
pub const MAX_PLACEHOLDERS: usize = 16;

/// Most `--allow-host` patterns one registration holds.
pub const MAX_ALLOW_HOSTS: usize = 64;

/// One placeholder of a run: what the agent's program sees instead of the value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlaceholderSpec {
    /// The placeholder text (random, never derived from the value).
    pub placeholder: String,
    /// The environment variable that holds it (for audit records and messages).
    pub var: String,
    /// The service whose value replaces it.
    pub service: String,
    /// Hosts the value may go to (`HostPattern` text).
    pub hosts: Vec<String>,
    /// Headers (lowercase) besides `authorization` it may be placed in.
    pub headers: Vec<String>,
    /// Query parameters it may be placed in.
    pub query: Vec<String>,
    /// How long the proxy may keep the value after the daemon handed it over (0: not at all).
    pub cache_ttl_secs: u64,
}

/// From the daemon to the proxy.
#[derive(Debug, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    content = "body",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum ToProxy {
    /// Once, at start: the CA certificate (DER, base64) and its name; the CA's private key
    /// (PKCS#8 DER) comes as an attached secret page.
    Init {
        /// The CA certificate, DER, base64.
        ca_cert_der_b64: String,
        /// The CA's subject common name (the leaf certificates' issuer).
        ca_name: String,
    },
    /// A run's placeholders and the proxy credential its program uses.
    Register {
        /// Registration id.
        reg: u64,
        /// The proxy user name (`Proxy-Authorization: Basic`), not secret.
        user: String,
        /// SHA-256 (hex) of the proxy password; the proxy never holds the password itself.
        pass_sha256: String,
        /// The placeholders.
        placeholders: Vec<PlaceholderSpec>,
        /// A jail with `--net proxy` (whose only way out is this proxy): the hosts
        /// (`HostPattern` text) it may reach without injection. `Some`: every request to a host
        /// neither here nor among the placeholders' hosts is refused (403) and reported
        /// [`FromProxy::Refused`]; the allowed hosts are decrypted like injected ones, so that
        /// SNI, `Host` and placeholders are checked on them too. `None`: any host is tunnelled.
        #[serde(default)]
        allow_hosts: Option<Vec<String>>,
    },
    /// The run ended (or its session did): its credential and placeholders stop working and the
    /// proxy drops what it cached for it.
    Unregister {
        /// Registration id.
        reg: u64,
    },
    /// The answer to [`FromProxy::Want`]: allowed (the value attached as a page, or none when the
    /// proxy may use the copy it holds), or refused with the HTTP status and a reason.
    Answer {
        /// The `Want`'s id.
        id: u64,
        /// Allowed.
        ok: bool,
        /// Refused: the status for the client (403, 407, 502, ...).
        #[serde(default)]
        status: u16,
        /// Refused: why, for the client (never a value).
        #[serde(default)]
        reason: String,
    },
}

/// From the proxy to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    content = "body",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum FromProxy {
    /// Set up: listening on this port.
    Ready {
        /// The TCP port on the loopback address.
        port: u16,
    },
    /// Set up failed: which step, and the error (no secret in it).
    Failed {
        /// The step.
        step: String,
        /// The error.
        message: String,
    },
    /// A request with a placeholder in an allowed place, about to go to an allowed host: may
    /// the value be injected? `cached`: the proxy holds a live copy (no page needed).
    Want {
        /// Request id (for the answer).
        id: u64,
        /// Registration.
        reg: u64,
        /// Index of the placeholder in the registration.
        index: usize,
        /// Host (from the tunnel, checked against SNI and Host).
        host: String,
        /// Port.
        port: u16,
        /// HTTP method.
        method: String,
        /// Path without the query.
        path: String,
        /// The proxy holds a copy of the value.
        cached: bool,
    },
    /// The upstream's answer to an injected request (audited with its status).
    Done {
        /// Registration.
        reg: u64,
        /// Index of the placeholder.
        index: usize,
        /// Host.
        host: String,
        /// Method.
        method: String,
        /// Path without the query.
        path: String,
        /// HTTP status, or 0 when no answer came.
        status: u16,
    },
    /// A request refused by the proxy's own rules (a placeholder where it may not go); audited
    /// `deny` with the host, the exfiltration signal an owner wants.
    Refused {
        /// Registration.
        reg: u64,
        /// Index of the placeholder seen (if one was).
        index: Option<usize>,
        /// Host.
        host: String,
        /// Method.
        method: String,
        /// Path without the query.
        path: String,
        /// Why (fixed phrases, no request data beyond the above).
        reason: String,
    },
}

/// The link socket of either side: read by one task that registers *read* interest only, written
/// by anyone without the runtime (see [`agentkeys_hardening::seqpacket`] for why: a socket
/// registered for both directions woke its reader once more for every message it sent).
pub struct LinkSocket {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    /// The reader's room for control data, made once (not per message).
    space: std::sync::Mutex<Vec<u8>>,
}

/// What [`LinkSocket::recv`] read.
pub use agentkeys_hardening::seqpacket::Received;

/// Longest a send waits for room in a full socket buffer before it fails.
const SEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

impl LinkSocket {
    /// Takes over one end of the link (made nonblocking here). Must run inside the runtime.
    ///
    /// # Errors
    /// The descriptor cannot be made nonblocking or registered with the runtime.
    pub fn new(fd: std::os::fd::OwnedFd) -> std::io::Result<LinkSocket> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
        fcntl(
            &fd,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(std::io::Error::from)?;
        let fd = agentkeys_hardening::seqpacket::register_readable(fd)?;
        Ok(LinkSocket {
            fd,
            space: std::sync::Mutex::new(agentkeys_hardening::seqpacket::control_space()),
        })
    }

    /// The next message (one reader at a time).
    ///
    /// # Errors
    /// The socket failed; a message of 0 bytes without descriptors is the peer's end.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<Received> {
        use std::os::fd::AsFd;
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                let mut space = self.space.lock().expect("link control space");
                agentkeys_hardening::seqpacket::recv_message(fd.get_ref().as_fd(), buf, &mut space)
            }) {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(r) => return r,
                Err(_would_block) => {}
            }
        }
    }

    /// The next message if one is already waiting, read without the runtime (`None` when none
    /// is): for a request that waits briefly for its answer on its own thread.
    ///
    /// # Errors
    /// The socket failed.
    pub fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<Option<Received>> {
        use std::os::fd::AsFd;
        let mut space = self.space.lock().expect("link control space");
        match agentkeys_hardening::seqpacket::recv_message(
            self.fd.get_ref().as_fd(),
            buf,
            &mut space,
        ) {
            Ok(r) => Ok(Some(r)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends one message with `fds` attached. It does not wait for the runtime: a full buffer
    /// (the peer not reading) is retried every 200 µs for up to 10 s, then an error.
    ///
    /// # Errors
    /// The socket failed, or stayed full.
    pub async fn send(
        &self,
        bytes: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> std::io::Result<()> {
        use std::os::fd::AsFd;
        let start = std::time::Instant::now();
        loop {
            match agentkeys_hardening::seqpacket::send_message(
                self.fd.get_ref().as_fd(),
                bytes,
                fds,
            ) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(std::io::Error::other(format!(
                        "sent {n} of {} bytes",
                        bytes.len()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > SEND_PATIENCE {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the link stayed full for 10 s (the other side does not read)",
                        ));
                    }
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_recv_reads_a_waiting_message_and_otherwise_says_none_at_once() {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = (LinkSocket::new(a).unwrap(), LinkSocket::new(b).unwrap());
            let mut buf = vec![0u8; 64];
            // Nothing waiting: no wait, no message.
            assert!(a.try_recv(&mut buf).unwrap().is_none());
            b.send(b"{\"kind\":\"x\"}", &[]).await.unwrap();
            let r = a.try_recv(&mut buf).unwrap().expect("the waiting message");
            assert_eq!(&buf[..r.len], b"{\"kind\":\"x\"}");
            assert!(!r.truncated && r.fds.is_empty());
            assert!(a.try_recv(&mut buf).unwrap().is_none());
            // The other end gone: a message of 0 bytes, as `recv` reports it.
            drop(b);
            let r = a.try_recv(&mut buf).unwrap().expect("the end");
            assert!(r.len == 0 && r.fds.is_empty());
        });
    }

    #[test]
    fn messages_carry_their_tag_first_and_refuse_unknown_fields() {
        let want = FromProxy::Want {
            id: 7,
            reg: 1,
            index: 0,
            host: "api.github.com".into(),
            port: 443,
            method: "GET".into(),
            path: "/user".into(),
            cached: true,
        };
        let bytes = serde_json::to_vec(&want).unwrap();
        assert!(bytes.starts_with(br#"{"kind":"want","body":{"id":7,"#));
        let back: FromProxy = serde_json::from_slice(&bytes).unwrap();
        assert!(matches!(
            back,
            FromProxy::Want {
                id: 7,
                cached: true,
                ..
            }
        ));
        // An answer's defaults still apply; a field nobody defined is refused, in the body or
        // beside it.
        let a: ToProxy =
            serde_json::from_slice(br#"{"kind":"answer","body":{"id":3,"ok":true}}"#).unwrap();
        assert!(matches!(
            a,
            ToProxy::Answer {
                id: 3,
                ok: true,
                status: 0,
                ..
            }
        ));
        for bad in [
            &br#"{"kind":"answer","body":{"id":3,"ok":true,"extra":1}}"#[..],
            br#"{"kind":"answer","body":{"id":3,"ok":true},"extra":1}"#,
            br#"{"kind":"nonsense","body":{}}"#,
        ] {
            assert!(serde_json::from_slice::<ToProxy>(bad).is_err());
        }
    }
}
