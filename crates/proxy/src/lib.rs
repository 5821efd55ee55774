//! The agentkeys credential-injecting proxy (issue 16): programs started by `agentkeys run
//! --proxy VAR=SERVICE` hold a placeholder instead of the value, and this proxy replaces it with
//! the value only on requests to the service's own hosts.
//!
//! It runs as a process of its own, forked by `agentkeysd` before the daemon's sandbox (so the
//! daemon keeps no internet sockets for it) and hardened on its own: it inherits the daemon's
//! lock-down (dumpable 0, core limit 0, allowlisted environment), drops its capabilities, binds
//! its loopback listener, receives the CA key as a secret page, then installs its own seccomp
//! filter ([`agentkeys_hardening::seccomp::PROXY_ALLOWLIST`]: sockets and `connect`, no
//! `execve`, no `fork`, no file writes) before its runtime starts.
//!
//! - [`link`]: the messages between the daemon and the proxy.
//! - [`ca`]: the per-install CA and the leaf certificates minted with it.
//! - [`rules`]: where a placeholder may be replaced (pure functions, unit-tested).
//! - [`server`]: the proxy: authentication, CONNECT, decryption or tunnelling, substitution,
//!   masking of answers.
#![forbid(unsafe_code)]

pub mod ca;
pub mod link;
pub mod rules;
pub mod server;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use agentkeys_hardening::page::MappedSecret;
use base64::Engine;
use tracing::{error, info};

use crate::link::{FromProxy, MAX_LINK_MESSAGE, ToProxy};

/// What the proxy process needs from the daemon's configuration, read before the fork.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Where to listen (a loopback address; port 0: any free port).
    pub listen: SocketAddr,
    /// PEM of the CA upstream servers are verified against, instead of the system roots.
    pub upstream_ca_pem: Option<Vec<u8>>,
    /// `$AGENTKEYS_HOME`: the proxy writes the CA bundle there (system roots + the agentkeys CA)
    /// before its filter closes, so the daemon never reads the system roots.
    pub bundle_home: std::path::PathBuf,
    /// The system roots to copy into the bundle (`[proxy] system_ca_file`); none: the first of
    /// the distributions' usual paths that exists.
    pub system_ca_file: Option<std::path::PathBuf>,
}

/// Where distributions keep the system's root certificates (the first that exists is used).
const SYSTEM_ROOTS: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// A certificate as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Reads at most 4 MiB of a roots file.
fn read_roots(p: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(p)?
        .take(agentkeys_state::proxy_ca::MAX_SYSTEM_ROOTS + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > agentkeys_state::proxy_ca::MAX_SYSTEM_ROOTS {
        return Err(std::io::Error::other("larger than 4 MiB"));
    }
    Ok(out)
}

/// Writes `proxy-ca.pem` and `proxy-ca-bundle.pem` (system roots, then the CA).
fn write_bundle(setup: &Setup, ca_der: &[u8]) -> Result<(), StartError> {
    let system = match &setup.system_ca_file {
        Some(p) => read_roots(p).map_err(step("proxy.system_ca_file"))?,
        None => SYSTEM_ROOTS
            .iter()
            .find_map(|p| read_roots(std::path::Path::new(p)).ok())
            .unwrap_or_default(),
    };
    if system.is_empty() {
        tracing::warn!(
            "no system root certificates found: the proxy's CA bundle holds only the agentkeys CA"
        );
    }
    let home = agentkeys_state::home::Home::at(&setup.bundle_home);
    agentkeys_state::proxy_ca::write_bundle(&home, &system, &der_to_pem(ca_der))
        .map_err(step("writing the CA bundle"))
}

/// Why the proxy did not start: the step and a message (no secret).
#[derive(Debug, thiserror::Error)]
#[error("{step}: {message}")]
pub struct StartError {
    /// The step.
    pub step: &'static str,
    /// What went wrong.
    pub message: String,
}

fn step<E: std::fmt::Display>(step: &'static str) -> impl Fn(E) -> StartError {
    move |e| StartError {
        step,
        message: e.to_string(),
    }
}

/// The proxy process's main: runs in the child [`agentkeys_hardening::helper::spawn`] forked,
/// and returns its exit code. Reports `Ready` or `Failed` to the daemon before serving.
pub fn child_main(sock: OwnedFd, setup: Setup) -> i32 {
    match prepare(&sock, &setup) {
        Ok((listener, minter, roots)) => {
            if let Err(e) = agentkeys_hardening::seccomp::install_proxy_filter() {
                let _ = server::tell_blocking(
                    &sock,
                    &FromProxy::Failed {
                        step: "seccomp".into(),
                        message: e.to_string(),
                    },
                );
                return 1;
            }
            let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            if server::tell_blocking(&sock, &FromProxy::Ready { port }).is_err() {
                return 1;
            }
            serve(sock, listener, minter, roots)
        }
        Err(e) => {
            error!("the proxy did not start: {e}");
            let _ = server::tell_blocking(
                &sock,
                &FromProxy::Failed {
                    step: e.step.into(),
                    message: e.message,
                },
            );
            1
        }
    }
}

/// Everything before the filter: capabilities, listener, trust roots, the CA from the daemon.
fn prepare(
    sock: &OwnedFd,
    setup: &Setup,
) -> Result<(std::net::TcpListener, ca::Minter, rustls::RootCertStore), StartError> {
    agentkeys_hardening::process::drop_capabilities().map_err(step("drop capabilities"))?;
    if !setup.listen.ip().is_loopback() {
        return Err(StartError {
            step: "listen",
            message: "only a loopback address".into(),
        });
    }
    let listener = std::net::TcpListener::bind(setup.listen).map_err(step("listen"))?;
    listener.set_nonblocking(true).map_err(step("listen"))?;
    let mut roots = rustls::RootCertStore::empty();
    match &setup.upstream_ca_pem {
        Some(pem) => {
            use rustls_pki_types::pem::PemObject;
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(c.map_err(step("upstream CA file"))?)
                    .map_err(step("upstream CA file"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err(StartError {
            step: "upstream roots",
            message: "no trusted root certificate found".into(),
        });
    }
    // The daemon sends the CA once it has loaded the DEK (after this fork).
    let mut buf = vec![0u8; MAX_LINK_MESSAGE];
    let ready = nix::poll::poll(
        &mut [nix::poll::PollFd::new(
            sock.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )],
        nix::poll::PollTimeout::try_from(Duration::from_secs(60))
            .unwrap_or(nix::poll::PollTimeout::MAX),
    )
    .map_err(step("waiting for the CA"))?;
    if ready == 0 {
        return Err(StartError {
            step: "waiting for the CA",
            message: "timed out".into(),
        });
    }
    let (msg, mut fds) = agentkeys_hardening::launcher::recv_msg::<ToProxy>(sock.as_fd(), &mut buf)
        .map_err(step("receiving the CA"))?
        .ok_or_else(|| StartError {
            step: "receiving the CA",
            message: "the daemon closed the link".into(),
        })?;
    let ToProxy::Init {
        ca_cert_der_b64,
        ca_name,
    } = msg
    else {
        return Err(StartError {
            step: "receiving the CA",
            message: "expected Init".into(),
        });
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(ca_cert_der_b64)
        .map_err(step("receiving the CA"))?;
    write_bundle(setup, &der)?;
    let fd = fds.pop().ok_or_else(|| StartError {
        step: "receiving the CA",
        message: "no key page".into(),
    })?;
    let page = MappedSecret::map(fd).map_err(step("mapping the CA key"))?;
    let minter = ca::Minter::new(&ca_name, der, &page).map_err(|e| StartError {
        step: "loading the CA key",
        message: format!("{e} (page of {} bytes)", page.len()),
    })?;
    drop(page);
    Ok((listener, minter, roots))
}

fn serve(
    sock: OwnedFd,
    listener: std::net::TcpListener,
    minter: ca::Minter,
    roots: rustls::RootCertStore,
) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .thread_name("agentkeys-proxy")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("proxy runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let link = match link::LinkSocket::new(sock) {
            Ok(l) => l,
            Err(e) => {
                error!("proxy link: {e}");
                return 1;
            }
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                error!("proxy listener: {e}");
                return 1;
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = match rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(b) => b,
            Err(e) => {
                error!("proxy TLS: {e}");
                return 1;
            }
        };
        let mut cfg = cfg.with_root_certificates(roots).with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        info!("proxy serving");
        server::Proxy::new(minter, Arc::new(cfg), link)
            .serve(listener)
            .await;
        0
    })
}
