//! A real HTTPS server on 127.0.0.1 for the proxy tests (tests/proxy.rs) and the bench: a test
//! CA of its own (rcgen), a certificate for `127.0.0.1`, `::1` and `localhost`, HTTP/1.1 over
//! rustls, and a record of every request it receives (method, path and query, headers, body).
//!
//! Routes: `/echo` answers with the request's headers and target as JSON (a host that
//! reflects credentials); `/compressed-echo` answers them marked `Content-Encoding: gzip` whatever was asked;
//! `/redirect?to=URL` answers 302 to URL; `/git/...` is `git http-backend` as a
//! CGI (Basic auth required: the password must be [`HttpsServer::git_password`]); anything else
//! answers `ok`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Headers, lowercase names, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
}

impl Received {
    /// The first header of that name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Everything received, as bytes (to search for a value or a placeholder).
    pub fn all_bytes(&self) -> Vec<u8> {
        let mut v = format!("{} {}\n", self.method, self.target).into_bytes();
        for (n, h) in &self.headers {
            v.extend_from_slice(n.as_bytes());
            v.extend_from_slice(b": ");
            v.extend_from_slice(h);
            v.push(b'\n');
        }
        v.extend_from_slice(&self.body);
        v
    }
}

/// The server; stops when dropped.
pub struct HttpsServer {
    /// Its address (127.0.0.1 and an ephemeral port).
    pub addr: SocketAddr,
    /// The test CA's certificate (PEM): clients and the proxy's `upstream_ca_file` trust it.
    pub ca_pem: String,
    /// The server's own certificate (DER), to tell it apart from one the proxy minted.
    pub cert_der: Vec<u8>,
    log: Arc<Mutex<Vec<Received>>>,
    git: Arc<Mutex<Option<(PathBuf, String)>>>,
    _rt: tokio::runtime::Runtime,
}

impl HttpsServer {
    /// Starts a server on 127.0.0.1 with a fresh test CA, HTTP/1.1 only.
    pub fn start() -> HttpsServer {
        HttpsServer::start_with(false)
    }

    /// Starts a server that also speaks HTTP/2 when the client picks it by ALPN.
    pub fn start_h2() -> HttpsServer {
        HttpsServer::start_with(true)
    }

    fn start_with(h2: bool) -> HttpsServer {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agentkeys e2e test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        p.subject_alt_names.push(rcgen::SanType::IpAddress(
            std::net::Ipv4Addr::LOCALHOST.into(),
        ));
        p.subject_alt_names.push(rcgen::SanType::IpAddress(
            std::net::Ipv6Addr::LOCALHOST.into(),
        ));
        let cert = p.signed_by(&key, &issuer).expect("cert");
        let cert_der = cert.der().to_vec();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        cfg.alpn_protocols = if h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let log: Arc<Mutex<Vec<Received>>> = Arc::default();
        let git: Arc<Mutex<Option<(PathBuf, String)>>> = Arc::default();
        let (log2, git2) = (log.clone(), git.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, log, git) = (acceptor.clone(), log2.clone(), git2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = hyper::service::service_fn(move |req| {
                        let (log, git) = (log.clone(), git.clone());
                        async move { Ok::<_, Infallible>(handle(req, log, git).await) }
                    });
                    if is_h2 {
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                        return;
                    }
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        HttpsServer {
            addr,
            ca_pem: ca_cert.pem(),
            cert_der,
            log,
            git,
            _rt: rt,
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Received> {
        self.log.lock().expect("log").clone()
    }

    /// Forgets what was received.
    pub fn clear(&self) {
        self.log.lock().expect("log").clear();
    }

    /// Serves `root` (a directory of bare repositories) under `/git/`, with Basic auth whose
    /// password must be `password`.
    pub fn serve_git(&self, root: PathBuf, password: &str) {
        *self.git.lock().expect("git") = Some((root, password.to_string()));
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(
    mut req: Request<Incoming>,
    log: Arc<Mutex<Vec<Received>>>,
    git: Arc<Mutex<Option<(PathBuf, String)>>>,
) -> Response<Full<Bytes>> {
    // `/ws`: an upgrade (websocket-style) whose connection then echoes every byte.
    if req.uri().path() == "/ws" && req.headers().contains_key(hyper::header::UPGRADE) {
        let rec = Received {
            method: req.method().to_string(),
            target: "/ws".into(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: Vec::new(),
            version: format!("{:?}", req.version()),
        };
        log.lock().expect("log").push(rec);
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = up.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = respond(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
        r.headers_mut().insert(
            hyper::header::UPGRADE,
            hyper::http::HeaderValue::from_static("websocket"),
        );
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::http::HeaderValue::from_static("upgrade"),
        );
        return r;
    }
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers: Vec<(String, Vec<u8>)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let rec = Received {
        method: method.clone(),
        target: target.clone(),
        headers: headers.clone(),
        body: body.clone(),
        version,
    };
    log.lock().expect("log").push(rec);
    let path = target.split('?').next().unwrap_or("").to_string();
    let query = target
        .split_once('?')
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    if path == "/compressed-echo" {
        // A server that compresses whatever the client asked for (the body is marked gzip; the
        // proxy cannot look inside, so it must not pass it on).
        let text: String = headers
            .iter()
            .map(|(n, v)| format!("{n}: {}\n", String::from_utf8_lossy(v)))
            .collect();
        let mut r = respond(StatusCode::OK, text);
        r.headers_mut().insert(
            hyper::header::CONTENT_ENCODING,
            hyper::http::HeaderValue::from_static("gzip"),
        );
        return r;
    }
    if path == "/echo" {
        let mut map: HashMap<String, String> = headers
            .iter()
            .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        // The request target too (a host that reflects the query it got).
        map.insert(":target".into(), target.clone());
        let text = serde_json::to_string(&map).unwrap_or_default();
        return respond(StatusCode::OK, text);
    }
    if path == "/big" {
        // `/big?n=N`: N bytes of a repeating pattern, streamed in 64 KiB frames would need a
        // streaming body; one large frame is enough to cross the proxy's buffers.
        let n: usize = query
            .strip_prefix("n=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            .min(64 << 20);
        let body: Vec<u8> = (0..n).map(|i| b"0123456789abcdef"[i % 16]).collect();
        return respond(StatusCode::OK, body);
    }
    if path == "/redirect" {
        let to = query.strip_prefix("to=").unwrap_or("/").to_string();
        let mut r = respond(StatusCode::FOUND, "moved");
        if let Ok(v) = hyper::http::HeaderValue::from_str(&to) {
            r.headers_mut().insert(hyper::header::LOCATION, v);
        }
        return r;
    }
    if let Some(rest) = path.strip_prefix("/git") {
        let cfg = git.lock().expect("git").clone();
        let Some((root, password)) = cfg else {
            return respond(StatusCode::NOT_FOUND, "no git here");
        };
        let auth = headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let user = basic_user_if(&auth, &password);
        let Some(user) = user else {
            let mut r = respond(StatusCode::UNAUTHORIZED, "auth needed");
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::http::HeaderValue::from_static("Basic realm=\"git\""),
            );
            return r;
        };
        return cgi_git(&root, &method, rest, &query, &headers, body, &user).await;
    }
    respond(StatusCode::OK, "ok\n")
}

/// The Basic user name when the password is `want`.
fn basic_user_if(auth: &[u8], want: &str) -> Option<String> {
    use base64::Engine;
    let s = std::str::from_utf8(auth).ok()?;
    let b = s.strip_prefix("Basic ")?;
    let dec = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
    let dec = String::from_utf8(dec).ok()?;
    let (u, p) = dec.split_once(':')?;
    (p == want).then(|| u.to_string())
}

/// `git http-backend` as a CGI program.
async fn cgi_git(
    root: &std::path::Path,
    method: &str,
    path_info: &str,
    query: &str,
    headers: &[(String, Vec<u8>)],
    body: Vec<u8>,
    user: &str,
) -> Response<Full<Bytes>> {
    use tokio::io::AsyncWriteExt;
    let ctype = headers
        .iter()
        .find(|(n, _)| n == "content-type")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", ctype)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (n, v) in headers {
        if n == "git-protocol" {
            cmd.env("GIT_PROTOCOL", String::from_utf8_lossy(v).into_owned());
        }
    }
    let Ok(mut child) = cmd.spawn() else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, "no git");
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let Ok(out) = child.wait_with_output().await else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, "git failed");
    };
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((at, sep)) = split else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, "bad CGI output");
    };
    let head = String::from_utf8_lossy(&raw[..at]).into_owned();
    let mut r = respond(StatusCode::OK, Bytes::copy_from_slice(&raw[at + sep..]));
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            if let Some(code) = v.split(' ').next().and_then(|c| c.parse::<u16>().ok())
                && let Ok(s) = StatusCode::from_u16(code)
            {
                *r.status_mut() = s;
            }
        } else if let (Ok(n), Ok(val)) = (
            hyper::http::HeaderName::from_bytes(k.trim().as_bytes()),
            hyper::http::HeaderValue::from_str(v),
        ) {
            r.headers_mut().append(n, val);
        }
    }
    r
}
