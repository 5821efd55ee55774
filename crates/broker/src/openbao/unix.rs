//! A backend on a unix socket (`address = "unix:///run/openbao/bao.sock"`; OpenBao and Vault
//! serve one with a `listener "unix"` block), and the checks that make the daemon sure whom it
//! sends its secret_id or token to.
//!
//! Plain http on the loopback has no server identity: any local user who binds the port first
//! (while the server restarts, say) gets the daemon's credentials. A unix socket has one, and
//! the daemon checks it before every request:
//!
//! 1. **The path** ([`check_socket_chain`]), as ssh's StrictModes does: every directory from `/`
//!    down to the socket, and the socket itself, is owned by a trusted uid ([`Trusted`]: root,
//!    and `socket_owner` or else the daemon's own uid), no directory is writable by group or
//!    others (a sticky world-writable
//!    directory such as /tmp included: another user could bind the name while the real socket
//!    is gone), no component is a symbolic link, and the last one is a socket. Nobody else can
//!    then put another socket at that path.
//! 2. **The server** (`SO_PEERCRED` of the connected socket: the uid of the process that called
//!    `listen`): a trusted uid, or the connection is closed before a byte is sent.
//!
//! Each request has its own connection (a unix-socket connect costs microseconds), so both
//! checks hold for every byte of every request. What remains: any process running as a trusted
//! uid can serve that socket.
//!
//! HTTP/1.1 over the socket is hyper's client connection (reqwest can reach a unix socket but
//! gives no access to the connected socket, so it cannot check the peer).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, USER_AGENT};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use zeroize::Zeroizing;

use super::MAX_BODY;

/// The uids the daemon trusts to run its backend server and to own the socket's path: root,
/// and `socket_owner` if it is set, else the daemon's own uid.
///
/// With `socket_owner` the daemon's own uid is *not* trusted: a prompt-injected agent runs as
/// that uid, and must not be able to put a socket at the path or answer on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted {
    /// The one uid besides root.
    uid: u32,
    /// `uid` is the configured `socket_owner` (not the daemon's own uid).
    configured: bool,
}

impl Trusted {
    /// Root and `owner` (the resolved `socket_owner`), or root and the daemon's effective uid.
    pub fn new(owner: Option<u32>) -> Trusted {
        match owner {
            Some(uid) => Trusted {
                uid,
                configured: true,
            },
            None => Trusted {
                uid: nix::unistd::geteuid().as_raw(),
                configured: false,
            },
        }
    }

    /// Whether `uid` is one of them.
    pub fn contains(&self, uid: u32) -> bool {
        uid == 0 || uid == self.uid
    }

    /// Who is trusted, in words, for messages.
    fn describe(&self) -> String {
        match (self.configured, self.uid) {
            (true, uid) => format!("root or socket_owner (uid {uid})"),
            (false, 0) => {
                "root, the daemon's uid (set socket_owner if another user runs the server)".into()
            }
            (false, uid) => format!(
                "root or the daemon's uid {uid} (set socket_owner if another user runs the server)"
            ),
        }
    }
}

/// The socket, or a directory above it, could let someone else answer in the server's place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketTrustError {
    /// A component does not exist (yet): checked again at each connection.
    #[error("{path} does not exist")]
    Missing {
        /// The first missing component.
        path: PathBuf,
    },
    /// `lstat` failed otherwise.
    #[error("checking {path}: {detail}")]
    Stat {
        /// The component.
        path: PathBuf,
        /// The OS error.
        detail: String,
    },
    /// A symbolic link: whoever owns its directory could point it elsewhere.
    #[error("{path} is a symbolic link; name the real path of the socket")]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// Not a directory where one must be.
    #[error("{path} is not a directory")]
    NotDirectory {
        /// The component.
        path: PathBuf,
    },
    /// The last component is not a socket.
    #[error("{path} is not a socket")]
    NotSocket {
        /// The file.
        path: PathBuf,
    },
    /// Owned by a uid the daemon does not trust.
    #[error("{path} is owned by uid {uid}, not by {trusted}")]
    Owner {
        /// The component.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Who would be trusted, in words.
        trusted: String,
    },
    /// A directory that group or others may write to: they could replace the socket.
    #[error(
        "directory {path} has mode {mode:04o}: group or others can write to it and so replace the socket (while the server restarts, say); chmod go-w it or put the socket elsewhere"
    )]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The process listening on the socket runs as an untrusted uid.
    #[error("the server listening on {path} runs as uid {uid}, not as {trusted}")]
    Peer {
        /// The socket.
        path: PathBuf,
        /// The listener's uid (`SO_PEERCRED`).
        uid: u32,
        /// Who would be trusted, in words.
        trusted: String,
    },
}

/// Checks that only trusted uids can have put the socket at `path` (see the module docs):
/// every directory from `/` down, and the socket. `path` is absolute (the config checked it).
///
/// # Errors
/// [`SocketTrustError`] for the first component that fails, [`SocketTrustError::Missing`] if
/// one does not exist.
pub fn check_socket_chain(path: &Path, trusted: &Trusted) -> Result<(), SocketTrustError> {
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs {
        let meta = lstat(dir)?;
        if meta.file_type().is_symlink() {
            return Err(SocketTrustError::Symlink { path: dir.into() });
        }
        if !meta.is_dir() {
            return Err(SocketTrustError::NotDirectory { path: dir.into() });
        }
        owned_by_trusted(dir, &meta, trusted)?;
        // Group or other write (with or without the sticky bit): someone else can create,
        // rename or (sticky: after the server's socket is gone) claim the name. POSIX ACLs that
        // grant write show as group write in the mode (the ACL mask).
        if meta.mode() & 0o022 != 0 {
            return Err(SocketTrustError::Writable {
                path: dir.into(),
                mode: meta.mode() & 0o7777,
            });
        }
    }
    let meta = lstat(path)?;
    if meta.file_type().is_symlink() {
        return Err(SocketTrustError::Symlink { path: path.into() });
    }
    if !meta.file_type().is_socket() {
        return Err(SocketTrustError::NotSocket { path: path.into() });
    }
    owned_by_trusted(path, &meta, trusted)
}

fn lstat(path: &Path) -> Result<std::fs::Metadata, SocketTrustError> {
    std::fs::symlink_metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => SocketTrustError::Missing { path: path.into() },
        _ => SocketTrustError::Stat {
            path: path.into(),
            detail: e.to_string(),
        },
    })
}

fn owned_by_trusted(
    path: &Path,
    meta: &std::fs::Metadata,
    trusted: &Trusted,
) -> Result<(), SocketTrustError> {
    if trusted.contains(meta.uid()) {
        Ok(())
    } else {
        Err(SocketTrustError::Owner {
            path: path.into(),
            uid: meta.uid(),
            trusted: trusted.describe(),
        })
    }
}

/// A `socket_owner` as a uid: a number, or a user name looked up in the user database (before
/// the sandbox: NSS reads files).
///
/// # Errors
/// No such user, or the lookup failed.
pub fn resolve_owner(spec: &str) -> Result<u32, String> {
    if let Ok(uid) = spec.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(spec) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!(
            "no user named {spec:?} (give the user the server runs as, or its uid)"
        )),
        Err(e) => Err(format!("looking up user {spec:?}: {e}")),
    }
}

/// Why an exchange over the socket failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum UnixError {
    /// A check failed: nothing was sent.
    #[error(transparent)]
    Untrusted(#[from] SocketTrustError),
    /// The connection could not be made.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// HTTP over the connection failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The request could not be built (a header value).
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// The transport of a `unix://` backend.
pub(super) struct UnixTransport {
    pub(super) path: PathBuf,
    pub(super) trusted: Trusted,
}

impl UnixTransport {
    /// Checks the path, connects, checks the listener's uid, then sends one HTTP/1.1 request
    /// for `api_path` (`/v1/...`) and reads the answer (None: larger than [`MAX_BODY`]).
    /// `headers` are added as given (the token header already marked sensitive).
    pub(super) async fn exchange(
        &self,
        method: Method,
        api_path: &str,
        headers: Vec<(&'static str, HeaderValue)>,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Option<Zeroizing<Vec<u8>>>), UnixError> {
        check_socket_chain(&self.path, &self.trusted)?;
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| UnixError::Connect {
                path: self.path.clone(),
                source,
            })?;
        // The uid that called listen(2), as the kernel recorded it: checked before a byte goes.
        let peer = stream.peer_cred().map_err(|e| SocketTrustError::Stat {
            path: self.path.clone(),
            detail: format!("SO_PEERCRED: {e}"),
        })?;
        if !self.trusted.contains(peer.uid()) {
            return Err(SocketTrustError::Peer {
                path: self.path.clone(),
                uid: peer.uid(),
                trusted: self.trusted.describe(),
            }
            .into());
        }

        let mut req = hyper::Request::builder()
            .method(method)
            .uri(api_path)
            .header(HOST, "localhost")
            .header(
                USER_AGENT,
                concat!("agentkeysd/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in headers {
            req = req.header(name, value);
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;

        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let exchange = async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let mut body = resp.into_body();
            let mut buf = Zeroizing::new(Vec::new());
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    if buf.len().saturating_add(data.len()) > MAX_BODY {
                        return Ok((status, None));
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok::<_, hyper::Error>((status, Some(buf)))
        };
        // The connection is driven here, not in a spawned task: when the caller's time limit
        // drops this future, the socket closes with it.
        let mut exchange = std::pin::pin!(exchange);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            r = &mut exchange => Ok(r?),
            c = &mut conn => {
                // The server may close right after its answer; what it sent is still read.
                c?;
                Ok(exchange.await?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A scratch directory whose own chain the check accepts (beside the test binary, in the
    /// target directory), or None after printing why the test is skipped.
    fn scratch(test: &str) -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let base = exe
            .parent()?
            .join(format!("ak-chain-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).ok()?;
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).ok()?;
        let probe = base.join("probe.sock");
        let _l = std::os::unix::net::UnixListener::bind(&probe).ok()?;
        match check_socket_chain(&probe, &Trusted::new(None)) {
            Ok(()) => {
                std::fs::remove_file(&probe).ok()?;
                Some(base)
            }
            Err(e) => {
                eprintln!("SKIP {test}: the target directory's own chain is not trusted: {e}");
                let _ = std::fs::remove_dir_all(&base);
                None
            }
        }
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    const NOBODY: u32 = 65534;

    #[test]
    fn a_socket_in_a_private_chain_passes() {
        let Some(base) = scratch("ok") else { return };
        let dir = base.join("run");
        std::fs::create_dir(&dir).unwrap();
        let sock = dir.join("bao.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let trusted = Trusted::new(None);
        assert_eq!(check_socket_chain(&sock, &trusted), Ok(()));
        // Missing: the first component that is not there.
        assert_eq!(
            check_socket_chain(&dir.join("nope/bao.sock"), &trusted),
            Err(SocketTrustError::Missing {
                path: dir.join("nope")
            })
        );
        // Not a socket.
        let file = dir.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            check_socket_chain(&file, &trusted),
            Err(SocketTrustError::NotSocket { .. })
        ));
        assert!(matches!(
            check_socket_chain(&file.join("x.sock"), &trusted),
            Err(SocketTrustError::NotDirectory { .. })
        ));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused_sticky_or_not() {
        let Some(base) = scratch("writable") else {
            return;
        };
        let dir = base.join("run");
        std::fs::create_dir(&dir).unwrap();
        let sock = dir.join("bao.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for mode in [0o777, 0o1777, 0o775, 0o757] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = check_socket_chain(&sock, &Trusted::new(None)).unwrap_err();
            assert_eq!(
                e,
                SocketTrustError::Writable {
                    path: dir.clone(),
                    mode
                }
            );
            assert!(e.to_string().contains("chmod go-w"), "{e}");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(check_socket_chain(&sock, &Trusted::new(None)), Ok(()));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn symlinks_are_refused_in_the_chain_and_as_the_socket() {
        let Some(base) = scratch("symlink") else {
            return;
        };
        let real = base.join("real");
        std::fs::create_dir(&real).unwrap();
        let sock = real.join("bao.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let link_dir = base.join("link");
        std::os::unix::fs::symlink(&real, &link_dir).unwrap();
        let trusted = Trusted::new(None);
        assert_eq!(
            check_socket_chain(&link_dir.join("bao.sock"), &trusted),
            Err(SocketTrustError::Symlink {
                path: link_dir.clone()
            })
        );
        let link_sock = real.join("swapped.sock");
        std::os::unix::fs::symlink(&sock, &link_sock).unwrap();
        let e = check_socket_chain(&link_sock, &trusted).unwrap_err();
        assert_eq!(e, SocketTrustError::Symlink { path: link_sock });
        assert!(e.to_string().contains("real path"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn owners_other_than_the_trusted_uids_are_refused() {
        if !is_root() {
            eprintln!(
                "SKIP owners_other_than_the_trusted_uids_are_refused: needs root to chown to another uid"
            );
            return;
        }
        let Some(base) = scratch("owner") else { return };
        let dir = base.join("run");
        std::fs::create_dir(&dir).unwrap();
        let sock = dir.join("bao.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::os::unix::fs::lchown(&sock, Some(NOBODY), None).unwrap();
        let e = check_socket_chain(&sock, &Trusted::new(None)).unwrap_err();
        assert!(
            matches!(&e, SocketTrustError::Owner { uid: NOBODY, path, .. } if *path == sock),
            "{e:?}"
        );
        assert!(e.to_string().contains("set socket_owner"), "{e}");
        // socket_owner names that uid: accepted.
        assert_eq!(
            check_socket_chain(&sock, &Trusted::new(Some(NOBODY))),
            Ok(())
        );
        // A directory of another uid (mode 0755): its owner could swap the socket.
        std::os::unix::fs::lchown(&sock, Some(0), None).unwrap();
        std::os::unix::fs::lchown(&dir, Some(NOBODY), None).unwrap();
        assert!(matches!(
            check_socket_chain(&sock, &Trusted::new(None)),
            Err(SocketTrustError::Owner { uid: NOBODY, .. })
        ));
        assert_eq!(
            check_socket_chain(&sock, &Trusted::new(Some(NOBODY))),
            Ok(())
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// With `socket_owner` set, the daemon's own uid is no longer trusted (an agent runs as
    /// it); root always is.
    #[test]
    fn socket_owner_replaces_the_daemon_uid() {
        let daemon = Trusted {
            uid: 4242,
            configured: false,
        };
        assert!(daemon.contains(4242) && daemon.contains(0) && !daemon.contains(NOBODY));
        let owner = Trusted {
            uid: NOBODY,
            configured: true,
        };
        assert!(owner.contains(NOBODY) && owner.contains(0) && !owner.contains(4242));
        assert!(owner.describe().contains("socket_owner (uid 65534)"));
        assert!(daemon.describe().contains("set socket_owner"));
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(Trusted::new(None).uid, me);
        if me != 0 {
            assert!(!Trusted::new(Some(NOBODY)).contains(me));
        }
    }

    #[test]
    fn tmp_itself_is_refused() {
        // /tmp is world-writable and sticky on every usual system; skip where it is not.
        let Ok(meta) = std::fs::metadata("/tmp") else {
            eprintln!("SKIP tmp_itself_is_refused: no /tmp");
            return;
        };
        if meta.mode() & 0o1777 != 0o1777 {
            eprintln!("SKIP tmp_itself_is_refused: /tmp is not mode 1777 here");
            return;
        }
        let e = check_socket_chain(Path::new("/tmp/bao.sock"), &Trusted::new(None)).unwrap_err();
        assert!(
            matches!(e, SocketTrustError::Writable { ref path, mode: 0o1777 } if path == Path::new("/tmp")),
            "{e:?}"
        );
    }

    #[test]
    fn owners_resolve_by_name_or_number() {
        assert_eq!(resolve_owner("0"), Ok(0));
        assert_eq!(resolve_owner("4242"), Ok(4242));
        assert_eq!(resolve_owner("root"), Ok(0));
        let e = resolve_owner("no-such-user-ak").unwrap_err();
        assert!(e.contains("no user named"), "{e}");
    }
}
