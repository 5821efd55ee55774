//! Red team of the credential-injecting proxy (issue 16): a hostile agent with a shell under the
//! owner's uid, and a local network attacker, against the real daemon, its proxy process and a
//! real HTTPS server on 127.0.0.1 that records what it receives (`agentkeys_e2e::https`).
//!
//! Each test is an attack. Raw requests are written byte for byte inside a decrypted tunnel (our
//! own TLS client over `CONNECT`), so nothing a client library would normalise is lost: two
//! `Host` headers, absolute-form URIs naming another host, CL.TE / TE.CL / duplicate
//! `Content-Length`, obs-fold, bare LF, huge and many headers, trailers. What every test checks:
//! the value reaches the server only on requests to the service's host that were allowed, the
//! program never sees it (masked in every form the proxy sent it), refusals are audited.
//! docs/security-tests.md lists each attack with its result.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agentkeys_e2e::https::HttpsServer;
use agentkeys_e2e::{TestHome, bin, contains, text, wait_until};
use base64::Engine;

const VALUE: &str = "ghp_AkRedTeamRealValue4c3b2a1908";
const OTHER_VALUE: &str = "sk-ak-redteam-other-value-77";

/// A home with a running daemon whose proxy trusts the test server's CA: `gh` (proxy-only,
/// injected into 127.0.0.1:PORT, header x-api-key and query access_token allowed) and `other`
/// (injected into localhost:PORT: the same server under another name).
struct Env {
    h: TestHome,
    srv: HttpsServer,
    token_file: PathBuf,
}

fn setup(tag: &str) -> Env {
    let srv = HttpsServer::start();
    let mut h = TestHome::initialized(tag);
    let ca_file = h.dir.join("test-ca.pem");
    std::fs::write(&ca_file, &srv.ca_pem).unwrap();
    h.write_config(&format!(
        "[proxy]\nupstream_ca_file = \"{}\"\n",
        ca_file.display()
    ));
    let port = srv.port().to_string();
    let gh_host = format!("127.0.0.1:{port}");
    let other_host = format!("localhost:{port}");
    let gh: Vec<&str> = vec![
        "store",
        "gh",
        "--inject-host",
        &gh_host,
        "--inject-header",
        "x-api-key",
        "--inject-query",
        "access_token",
        "--deliver",
        "proxy",
    ];
    let other: Vec<&str> = vec!["store", "other", "--inject-host", &other_host];
    for (args, value) in [(gh, VALUE), (other, OTHER_VALUE)] {
        let out = h.run_stdin(&args, value.as_bytes());
        assert!(out.status.success(), "{}", text(&out));
    }
    h.start_daemon(&[]);
    let token_file = h.agent_token_file("bot", "gh,other");
    Env { h, srv, token_file }
}

/// A run that stays alive while its `keep` file exists: its environment (placeholders, proxy
/// URL with its credential).
struct Run {
    env: HashMap<String, String>,
    keep: PathBuf,
    thread: Option<std::thread::JoinHandle<Output>>,
}

impl Run {
    fn var(&self, k: &str) -> &str {
        self.env.get(k).map(String::as_str).unwrap_or("")
    }

    /// (proxy address, "user:pass").
    fn proxy(&self) -> (String, String) {
        let url = self.var("HTTPS_PROXY");
        let rest = url.strip_prefix("http://").expect("http proxy URL");
        let (cred, addr) = rest.rsplit_once('@').expect("credential in the URL");
        (addr.to_string(), cred.to_string())
    }

    fn end(mut self) -> Output {
        std::fs::remove_file(&self.keep).unwrap();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Env {
    fn long_run(&self, tag: &str) -> Run {
        self.long_run_with(tag, &["GH=gh", "OTHER=other"], &self.token_file)
    }

    fn long_run_with(&self, tag: &str, mappings: &[&str], token_file: &std::path::Path) -> Run {
        let envfile = self.h.dir.join(format!("{tag}-env.txt"));
        let keep = self.h.dir.join(format!("{tag}-keep"));
        std::fs::write(&keep, b"").unwrap();
        let script = format!(
            "env > {env}.tmp; mv {env}.tmp {env}; while [ -e {keep} ]; do sleep 0.1; done",
            env = envfile.display(),
            keep = keep.display()
        );
        let mut c = Command::new(bin("agentkeys"));
        c.arg("run");
        for m in mappings {
            c.args(["--proxy", m]);
        }
        c.args(["--", "sh", "-c"]).arg(script);
        self.h.env(&mut c);
        c.env("AGENTKEYS_TOKEN_FILE", token_file)
            .stdin(Stdio::null());
        let thread = std::thread::spawn(move || c.output().unwrap());
        assert!(
            wait_until(Duration::from_secs(20), || envfile.exists()),
            "the run did not start"
        );
        let env = std::fs::read_to_string(&envfile)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Run {
            env,
            keep,
            thread: Some(thread),
        }
    }

    /// `agentkeys run --proxy GH=gh --proxy OTHER=other -- sh -c SCRIPT` as the agent.
    fn run(&self, script: &str) -> Output {
        let mut c = self.h.cli(&[
            "run",
            "--proxy",
            "GH=gh",
            "--proxy",
            "OTHER=other",
            "--",
            "sh",
            "-c",
            script,
        ]);
        c.env("AGENTKEYS_TOKEN_FILE", &self.token_file)
            .env("PORT", self.srv.port().to_string())
            .current_dir(&self.h.dir)
            .stdin(Stdio::null());
        c.output().expect("agentkeys run")
    }

    fn audit_events(&self, event: &str) -> Vec<serde_json::Value> {
        self.h
            .audit()
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect()
    }

    /// The value reached the server only on requests whose target is in `allowed`, each with
    /// exactly one `Host` header naming the service's host.
    fn value_only_on(&self, allowed: &[&str]) {
        let want_host = format!("127.0.0.1:{}", self.srv.port());
        for r in self.srv.requests() {
            if !contains(&r.all_bytes(), VALUE.as_bytes()) {
                continue;
            }
            let path = r.target.split('?').next().unwrap_or("");
            assert!(
                allowed.contains(&path),
                "the value reached the server on {:?}",
                r.target
            );
            let hosts: Vec<&Vec<u8>> = r
                .headers
                .iter()
                .filter(|(n, _)| n == "host")
                .map(|(_, v)| v)
                .collect();
            if r.version == "HTTP/1.1" {
                assert_eq!(
                    hosts,
                    vec![&want_host.as_bytes().to_vec()],
                    "{:?}: the value went with these Host headers",
                    r.target
                );
            }
        }
    }
}

/// Reads an HTTP/1.1 response head; (status, head text).
fn read_head(s: &mut impl BufRead) -> (u16, String) {
    let mut head = String::new();
    let mut line = String::new();
    if s.read_line(&mut line).unwrap_or(0) == 0 {
        return (0, head);
    }
    head.push_str(&line);
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    loop {
        let mut l = String::new();
        if s.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
        head.push_str(&l);
    }
    (code, head)
}

/// `CONNECT target` through the proxy with `cred`; the status and the stream.
fn connect_via(addr: &str, cred: Option<&str>, target: &str) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = cred
        .map(|c| {
            format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        })
        .unwrap_or_default();
    write!(
        s,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n"
    )
    .unwrap();
    // Byte by byte: nothing after the head may be consumed (it is TLS).
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let code = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, s)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// TLS over a decrypted tunnel to 127.0.0.1, trusting the agentkeys CA bundle.
fn tls_in(tcp: TcpStream, bundle: &str) -> Tls {
    tls_named(tcp, bundle, "127.0.0.1")
}

/// TLS over a tunnel with `name` as the server name, trusting the agentkeys CA bundle.
fn tls_named(tcp: TcpStream, bundle: &str, name: &str) -> Tls {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(bundle.as_bytes()).flatten() {
        let _ = roots.add(c);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Sends `raw` (split into `pieces` writes, flushed one by one) in a fresh decrypted tunnel to
/// the `gh` host and reads everything until the proxy closes: (status of the first answer,
/// all bytes read).
fn raw_exchange(e: &Env, run: &Run, pieces: &[&[u8]]) -> (u16, Vec<u8>) {
    let (addr, cred) = run.proxy();
    let bundle = std::fs::read_to_string(e.h.home().join("proxy-ca-bundle.pem")).unwrap();
    let (code, tcp) = connect_via(&addr, Some(&cred), &format!("127.0.0.1:{}", e.srv.port()));
    assert_eq!(code, 200, "CONNECT refused");
    let mut tls = tls_in(tcp, &bundle);
    for p in pieces {
        if tls.write_all(p).and_then(|_| tls.flush()).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let mut all = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
        if all.len() > 4 << 20 {
            break;
        }
    }
    let mut r = BufReader::new(&all[..]);
    let (code, _) = read_head(&mut r);
    (code, all)
}

/// Two hosts named in one request: the proxy must not let the server pick another virtual host
/// than the one the connection (and the policy check) is for.
#[test]
fn a_request_naming_two_hosts_never_carries_the_value() {
    let e = setup("rt-hosts");
    let run = e.long_run("a");
    let ph = run.var("GH").to_string();
    assert!(ph.starts_with("akph_"), "no placeholder: {:?}", run.env);
    let port = e.srv.port();
    let cases: Vec<(&str, String)> = vec![
        // Two Host headers: the first names the tunnel's host, the second another.
        (
            "/two-hosts",
            format!(
                "GET /two-hosts HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: localhost:{port}\r\nAuthorization: Bearer {ph}\r\nConnection: close\r\n\r\n"
            ),
        ),
        (
            "/two-hosts-rev",
            format!(
                "GET /two-hosts-rev HTTP/1.1\r\nHost: localhost:{port}\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ph}\r\nConnection: close\r\n\r\n"
            ),
        ),
        // An absolute-form URI naming another host than the Host header and the tunnel.
        (
            "/absolute",
            format!(
                "GET https://localhost:{port}/absolute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ph}\r\nConnection: close\r\n\r\n"
            ),
        ),
        // Host with a trailing dot, in capitals: the same host (the server gets one clean Host).
        (
            "/dot",
            format!(
                "GET /dot HTTP/1.1\r\nHost: 127.0.0.1.:{port}\r\nAuthorization: Bearer {ph}\r\nConnection: close\r\n\r\n"
            ),
        ),
        // No port in Host: port 443, another authority than the tunnel's.
        (
            "/noport",
            format!(
                "GET /noport HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ph}\r\nConnection: close\r\n\r\n"
            ),
        ),
    ];
    let mut results = Vec::new();
    for (target, raw) in &cases {
        let (code, all) = raw_exchange(&e, &run, &[raw.as_bytes()]);
        assert!(
            !contains(&all, VALUE.as_bytes()),
            "{target}: value in answer"
        );
        results.push((*target, code));
    }
    println!("rt-hosts: {results:?}");
    let code = |t: &str| results.iter().find(|(x, _)| *x == t).unwrap().1;
    assert!(
        [400, 421].contains(&code("/two-hosts")),
        "two Host headers: {}",
        code("/two-hosts")
    );
    assert!([400, 421].contains(&code("/two-hosts-rev")));
    assert!([400, 421].contains(&code("/absolute")));
    assert_eq!(code("/noport"), 421);
    assert_eq!(code("/dot"), 200);
    e.value_only_on(&["/dot"]);
    // Each refusal that carried the placeholder is audited `deny` with the connection's host.
    assert!(
        wait_until(Duration::from_secs(5), || e
            .audit_events("deny")
            .iter()
            .filter(|d| d["detail"]
                .as_str()
                .unwrap_or("")
                .contains("another host than the connection"))
            .count()
            >= 4),
        "{:?}",
        e.audit_events("deny")
    );
    let out = run.end();
    assert!(out.status.success(), "{}", text(&out));
}

/// Request smuggling against the proxy's parser: bytes that one side could read as a second
/// request (to another host, with the placeholder in a header) never become one that carries
/// the value, and the value goes only with the one request allowed.
#[test]
fn smuggled_requests_never_carry_the_value() {
    let e = setup("rt-smuggle");
    let run = e.long_run("a");
    let ph = run.var("GH").to_string();
    let port = e.srv.port();
    let inner = format!(
        "GET /smuggled HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {ph}\r\n\r\n"
    );
    let n = inner.len();
    let head = |extra: &str| {
        format!(
            "POST /outer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ph}\r\nConnection: close\r\n{extra}"
        )
    };
    let many: String = (0..3000).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let huge = format!("X-Huge: {}\r\n", "a".repeat(70 * 1024));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "CL.TE",
            format!(
                "{}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{inner}",
                head(""),
                5 + n
            )
            .into_bytes(),
        ),
        (
            "TE.CL",
            format!(
                "{}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
                head(""),
                n
            )
            .into_bytes(),
        ),
        (
            "two Content-Length",
            format!(
                "{}Content-Length: 0\r\nContent-Length: {n}\r\n\r\n{inner}",
                head("")
            )
            .into_bytes(),
        ),
        (
            "TE obfuscated",
            format!(
                "{}Transfer-Encoding: xchunked\r\nContent-Length: {n}\r\n\r\n{inner}",
                head("")
            )
            .into_bytes(),
        ),
        (
            "obs-fold",
            format!(
                "{}X-Fold: a\r\n Host: localhost:{port}\r\nContent-Length: 0\r\n\r\n",
                head("")
            )
            .into_bytes(),
        ),
        (
            "bare LF",
            format!(
                "POST /outer HTTP/1.1\nHost: 127.0.0.1:{port}\nAuthorization: Bearer {ph}\nContent-Length: 0\n\n{inner}"
            )
            .into_bytes(),
        ),
        (
            "many headers",
            format!("{}{many}Content-Length: 0\r\n\r\n", head("")).into_bytes(),
        ),
        (
            "huge header",
            format!("{}{huge}Content-Length: 0\r\n\r\n", head("")).into_bytes(),
        ),
        (
            "chunk extension and trailer",
            format!(
                "{}Transfer-Encoding: chunked\r\nTrailer: X-Api-Key\r\n\r\n3;ext={ph}\r\nabc\r\n0\r\nX-Api-Key: {ph}\r\n\r\n",
                head("")
            )
            .into_bytes(),
        ),
    ];
    let mut seen = Vec::new();
    for (name, raw) in &cases {
        // Sent whole, and split into 7-byte TCP writes (the head across many segments).
        let (code, all) = raw_exchange(&e, &run, &[raw]);
        assert!(!contains(&all, VALUE.as_bytes()), "{name}: value in answer");
        let pieces: Vec<&[u8]> = raw.chunks(7).collect();
        let pieces = if pieces.len() > 200 {
            vec![&raw[..]]
        } else {
            pieces
        };
        let (code2, all2) = raw_exchange(&e, &run, &pieces);
        assert!(
            !contains(&all2, VALUE.as_bytes()),
            "{name}: value in answer"
        );
        seen.push((*name, code, code2));
    }
    println!("rt-smuggle: {seen:?}");
    // A placeholder in a chunked body's trailer is refused like one in the body.
    let trailer = seen
        .iter()
        .find(|(n, _, _)| *n == "chunk extension and trailer")
        .unwrap();
    assert_eq!(trailer.1, 403, "{seen:?}");
    // Never a request the server saw as /smuggled with the value, nor the value with a Host
    // other than the tunnel's, nor a placeholder in a trailer passed on.
    e.value_only_on(&["/outer"]);
    for r in e.srv.requests() {
        if r.target == "/smuggled" {
            assert!(!contains(&r.all_bytes(), VALUE.as_bytes()), "{r:?}");
        }
    }
    let out = run.end();
    assert!(out.status.success(), "{}", text(&out));
}

/// The placeholder changed so that a naive matcher misses it (encoded, case changed, split), or
/// another run's placeholder, or this run's placeholder through another run's proxy credential:
/// none of them is ever replaced by the value.
#[test]
fn disguised_and_foreign_placeholders_never_become_the_value() {
    let e = setup("rt-disguise");
    let a = e.long_run("a");
    let ph_a = a.var("GH").to_string();
    let proxy_a = a.var("HTTPS_PROXY").to_string();
    let script = format!(
        "set -u\n\
         u=https://127.0.0.1:$PORT\n\
         up=$(printf %s \"$GH\" | tr a-z A-Z)\n\
         b64=$(printf %s \"$GH\" | base64 -w0)\n\
         pct=$(printf %s \"$GH\" | od -An -tx1 | tr -d ' \\n' | sed 's/../%&/g')\n\
         c() {{ n=$1; shift; echo \"$n $(curl -s -o /dev/null -w '%{{http_code}}' \"$@\" 2>/dev/null)\"; }}\n\
         c upper -H \"Authorization: Bearer $up\" $u/upper\n\
         c b64 -H \"X-Api-Key: $b64\" $u/b64\n\
         c pct-other -H \"Authorization: Bearer $pct\" https://localhost:$PORT/pct-other\n\
         c pct-hdr -H \"X-Api-Key: $pct\" $u/pct-hdr\n\
         c second-auth -H \"Authorization: Bearer $GH\" -H \"Authorization: Digest $GH\" $u/second-auth\n\
         c proxy-auth -H \"Proxy-Authorization: Bearer $GH\" $u/proxy-auth\n\
         c foreign -H \"Authorization: Bearer {ph_a}\" $u/foreign\n\
         c cross -x '{proxy_a}' -H \"Authorization: Bearer $GH\" $u/cross\n\
         c query-name \"$u/query-name?$GH=1\"\n\
         c query-other \"$u/query-other?token=$GH\"\n\
         c query-ok \"$u/query-ok?access_token=$GH\"\n"
    );
    let out = e.run(&script);
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("rt-disguise:\n{so}");
    assert!(!so.contains(VALUE));
    let code = |name: &str| -> String {
        so.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or("?")
            .to_string()
    };
    // Placeholders the proxy does not recognise pass as the text they are; a recognised one in
    // a refused place is a 403.
    assert_eq!(code("upper"), "200");
    assert_eq!(code("b64"), "200");
    assert_eq!(code("pct-other"), "403");
    assert_eq!(code("pct-hdr"), "200");
    assert_eq!(code("second-auth"), "403");
    assert_eq!(code("proxy-auth"), "403");
    assert_eq!(code("foreign"), "200");
    assert_eq!(code("cross"), "200");
    assert_eq!(code("query-name"), "403");
    assert_eq!(code("query-other"), "403");
    assert_eq!(code("query-ok"), "200");
    // x-api-key percent-encoded is not the placeholder (a header is not URL-decoded by servers)
    // and the server gets it as sent; only /query-ok gets the value.
    e.value_only_on(&["/query-ok"]);
    for r in e.srv.requests() {
        if r.target.starts_with("/foreign") {
            assert!(contains(&r.all_bytes(), ph_a.as_bytes()), "{r:?}");
        }
    }
    let denies = e.audit_events("deny");
    assert!(denies.len() >= 5, "{denies:?}");
    let out = a.end();
    assert!(out.status.success(), "{}", text(&out));
}

/// A host that reflects what it received: the program sees the value in no form the proxy
/// sent it in (raw, in a Basic header as base64, in the query as percent-encoding).
#[test]
fn reflected_values_are_masked_in_every_form_the_proxy_sent() {
    let e = setup("rt-reflect");
    let script = "u=https://127.0.0.1:$PORT\n\
         curl -s -u \"x-access-token:$GH\" $u/echo; echo\n\
         curl -s -H \"Authorization: Bearer $GH\" $u/echo; echo\n\
         curl -s \"$u/echo?access_token=$GH\"; echo\n\
         echo \"compressed $(curl -s -o compressed.out -w '%{http_code}' -H \"X-Api-Key: $GH\" $u/compressed-echo)\"\n\
         cat compressed.out; echo\n\
         echo end\n";
    let out = e.run(script);
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(so.contains("end"), "{}", text(&out));
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{VALUE}"));
    assert!(!so.contains(VALUE), "the value reflected: {so}");
    assert!(
        !so.contains(&basic),
        "the Basic credential reflected unmasked: {so}"
    );
    // A server that compresses although identity was asked: the answer is withheld (it
    // cannot be masked), saying why.
    assert!(so.contains("compressed 502"), "{so}");
    assert!(so.contains("answered compressed (gzip)"), "{so}");
    // The server did get it each time.
    let got = e
        .srv
        .requests()
        .iter()
        .filter(|r| {
            (r.target.starts_with("/echo") || r.target == "/compressed-echo")
                && contains(&r.all_bytes(), VALUE.as_bytes())
        })
        .count()
        + e.srv
            .requests()
            .iter()
            .filter(|r| contains(&r.all_bytes(), basic.as_bytes()))
            .count();
    assert_eq!(got, 4, "{:?}", e.srv.requests());
}

/// The proxy process killed (by the agent, which shares the owner's uid): requests fail, no
/// value goes anywhere, the daemon keeps serving and says `run --proxy` is unavailable.
#[test]
fn a_killed_proxy_fails_closed() {
    let e = setup("rt-kill");
    let run = e.long_run("a");
    let daemon = e.h.daemon_pid();
    let kids = std::fs::read_to_string(format!("/proc/{daemon}/task/{daemon}/children")).unwrap();
    let proxy = kids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "agentkeys-proxy")
        })
        .expect("the proxy process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(
        Duration::from_secs(5),
        || !std::path::Path::new(&format!("/proc/{proxy}/comm")).exists()
            || std::fs::read_to_string(format!("/proc/{proxy}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    ));
    // The old run's proxy URL: nothing listens (or nothing answers).
    let (addr, _) = run.proxy();
    let refused = match TcpStream::connect(&addr) {
        Err(_) => true,
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n");
            let mut b = [0u8; 1];
            !matches!(s.read(&mut b), Ok(1))
        }
    };
    assert!(refused, "a killed proxy still answers");
    // A new run with --proxy is refused with a clear error; the daemon still serves.
    let out = e.run("echo started");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("started"));
    assert!(text(&out).contains("proxy"), "{}", text(&out));
    let status = e.h.run(&["status"]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(!contains(
        &e.srv.requests().concat_bytes(),
        VALUE.as_bytes()
    ));
    let _ = run.end();
}

trait AllBytes {
    fn concat_bytes(&self) -> Vec<u8>;
}

impl AllBytes for Vec<agentkeys_e2e::https::Received> {
    fn concat_bytes(&self) -> Vec<u8> {
        self.iter().flat_map(|r| r.all_bytes()).collect()
    }
}

/// Any local user (any uid) can connect to the proxy's loopback port. Connections that never
/// authenticate (idle, or trickling half a head) must not lock the runs out: here more of them
/// than the proxy's connection cap, then a run's request.
#[test]
fn idle_unauthenticated_connections_do_not_lock_a_run_out() {
    let e = setup("rt-flood");
    let run = e.long_run("a");
    let (addr, _) = run.proxy();
    let mut idle = Vec::new();
    for i in 0..700 {
        match TcpStream::connect(&addr) {
            Ok(mut s) => {
                if i % 2 == 0 {
                    let _ = s.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nX-Slow: ");
                }
                idle.push(s);
            }
            Err(_) => break,
        }
    }
    println!("rt-flood: {} idle connections open", idle.len());
    let out = e.run(
        "curl -s -o /dev/null -w '%{http_code}' --max-time 20 -H \"Authorization: Bearer $GH\" https://127.0.0.1:$PORT/after-flood",
    );
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        so,
        "200",
        "a run locked out by idle connections: {}",
        text(&out)
    );
    e.value_only_on(&["/after-flood"]);
    drop(idle);
    let _ = run.end();
}

/// A wildcard policy lets the agent make the proxy mint a certificate for any name under it:
/// many names, long names. The leaf and TLS-configuration caches are bounded, so the proxy's
/// memory stays bounded and it keeps serving.
#[test]
fn minting_leaves_for_many_long_names_stays_bounded() {
    let e = setup("rt-mint");
    let out = e.h.run_stdin(
        &["store", "wild", "--inject-host", "*.example.test"],
        b"ak-wild-value-0042",
    );
    assert!(out.status.success(), "{}", text(&out));
    let token = e.h.agent_token_file("wildbot", "wild");
    let run = e.long_run_with("w", &["W=wild"], &token);
    let (addr, cred) = run.proxy();
    let bundle = std::fs::read_to_string(e.h.home().join("proxy-ca-bundle.pem")).unwrap();
    let daemon = e.h.daemon_pid();
    let proxy: u32 = std::fs::read_to_string(format!("/proc/{daemon}/task/{daemon}/children"))
        .unwrap()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "agentkeys-proxy")
        })
        .expect("the proxy process");
    let long = "a".repeat(55);
    let handshake = |i: usize| -> bool {
        let name = format!("{i}-{long}.example.test");
        let (code, tcp) = connect_via(&addr, Some(&cred), &format!("{name}:443"));
        if code != 200 {
            eprintln!("rt-mint: CONNECT {i}: {code}");
            return false;
        }
        let mut tls = tls_named(tcp, &bundle, &name);
        while tls.conn.is_handshaking() {
            if let Err(err) = tls.conn.complete_io(&mut tls.sock) {
                eprintln!("rt-mint: handshake {i}: {err}");
                return false;
            }
        }
        true
    };
    // Warm up, then the resident size; then more names than the caches keep.
    for i in 0..50 {
        assert!(handshake(i), "no leaf minted for name {i}");
    }
    let before = agentkeys_e2e::status_kb(proxy, "VmRSS");
    let n = 1300;
    let ok = (50..n).filter(|&i| handshake(i)).count();
    let after = agentkeys_e2e::status_kb(proxy, "VmRSS");
    println!(
        "rt-mint: {ok} of {} handshakes, proxy RSS {before} -> {after} KiB",
        n - 50
    );
    assert_eq!(ok, n - 50, "the proxy stopped minting");
    assert!(
        after < before + 48 * 1024,
        "the proxy grew from {before} to {after} KiB for {n} names"
    );
    // Still serving a name it has seen and a new one.
    assert!(handshake(1));
    assert!(handshake(n + 1));
    let _ = run.end();
}

/// Sends one request on an open decrypted connection and reads its answer (a
/// `Content-Length` body); (status, body), or (0, empty) when the connection is gone.
fn exchange_on(tls: &mut Tls, raw: &[u8]) -> (u16, Vec<u8>) {
    if tls.write_all(raw).and_then(|_| tls.flush()).is_err() {
        return (0, Vec::new());
    }
    let mut r = BufReader::new(tls);
    let (code, head) = read_head(&mut r);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).is_err() {
        return (0, Vec::new());
    }
    (code, body)
}

/// The agent revoked while its run holds a decrypted keep-alive connection, with a value the
/// proxy may cache (`--cache-ttl 10m`) and one it may not: the next request on that same
/// connection gets no value, nor does a new connection.
#[test]
fn revoking_the_agent_stops_injection_on_open_connections() {
    let e = setup("rt-revoke");
    let host = format!("127.0.0.1:{}", e.srv.port());
    let out = e.h.run_stdin(
        &[
            "store",
            "cached",
            "--inject-host",
            &host,
            "--inject-header",
            "x-cached",
            "--cache-ttl",
            "10m",
        ],
        b"ak-cached-value-31337",
    );
    assert!(out.status.success(), "{}", text(&out));
    let token = e.h.agent_token_file("revokee", "gh,cached");
    let run = e.long_run_with("r", &["GH=gh", "C=cached"], &token);
    let (gh, c) = (run.var("GH").to_string(), run.var("C").to_string());
    let (addr, cred) = run.proxy();
    let bundle = std::fs::read_to_string(e.h.home().join("proxy-ca-bundle.pem")).unwrap();
    let (code, tcp) = connect_via(&addr, Some(&cred), &host);
    assert_eq!(code, 200);
    let mut tls = tls_in(tcp, &bundle);
    let req = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {gh}\r\nX-Cached: {c}\r\n\r\n"
        )
    };
    let (code, _) = exchange_on(&mut tls, req("/before").as_bytes());
    assert_eq!(code, 200, "the first request");
    let out = e.h.run(&["agent", "revoke", "revokee"]);
    assert!(out.status.success(), "{}", text(&out));
    let (code, body) = exchange_on(&mut tls, req("/after-same-conn").as_bytes());
    println!(
        "rt-revoke: same connection after revocation: {code} {}",
        String::from_utf8_lossy(&body).trim()
    );
    assert_ne!(code, 200, "injected after revocation");
    let (code, tcp) = connect_via(&addr, Some(&cred), &host);
    if code == 200 {
        let mut tls = tls_in(tcp, &bundle);
        let (code, _) = exchange_on(&mut tls, req("/after-new-conn").as_bytes());
        assert_ne!(code, 200, "injected after revocation on a new connection");
    }
    for r in e.srv.requests() {
        if r.target.starts_with("/after") {
            assert!(!contains(&r.all_bytes(), VALUE.as_bytes()), "{r:?}");
            assert!(!contains(&r.all_bytes(), b"ak-cached-value-31337"), "{r:?}");
        }
    }
    let _ = run.end();
}
