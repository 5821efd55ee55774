//! The credential-injecting proxy (issue 16), end to end: the real daemon and its proxy
//! process, real clients (curl, Python `requests` and `httpx`, `git`, Node's `fetch`, MCP
//! clients) started with `agentkeys run --proxy`, and a real HTTPS server on 127.0.0.1 with a
//! test CA that records what it receives (`agentkeys_e2e::https`).
//!
//! What is shown: the server receives the value and the program never holds it (its
//! environment, and a memory scan of the process that made the request); a placeholder sent
//! anywhere else is refused (403) and audited `deny` with the host; a host that is not
//! injectable is tunnelled (its certificate is the upstream's); a missing or wrong proxy
//! credential, or one of a run that ended, gets 407; answers are masked.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use agentkeys_e2e::https::HttpsServer;
use agentkeys_e2e::{
    TestHome, bin, contains, is_root, memory_find, text, wait_until, workspace_root,
};

const VALUE: &str = "ghp_AkProxyRealValue7d1e0c9b8a";
const OTHER_VALUE: &str = "sk-ak-other-service-value-42";

/// A home with a running daemon whose proxy trusts the test server's CA, the services
/// `gh` (proxy-only, injected into 127.0.0.1:PORT; header x-api-key and query access_token
/// allowed) and `other` (injected into localhost:PORT), and an agent token file for both.
struct Env {
    h: TestHome,
    srv: HttpsServer,
    token_file: PathBuf,
    ca_file: PathBuf,
}

fn setup(tag: &str) -> Env {
    setup_with(tag, HttpsServer::start())
}

fn setup_with(tag: &str, srv: HttpsServer) -> Env {
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
    for (args, value) in [
        (
            vec![
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
            ],
            VALUE,
        ),
        (
            vec!["store", "other", "--inject-host", &other_host],
            OTHER_VALUE,
        ),
    ] {
        let out = h.run_stdin(&args, value.as_bytes());
        assert!(out.status.success(), "{}", text(&out));
    }
    h.start_daemon(&[]);
    let token_file = h.agent_token_file("bot", "gh,other");
    Env {
        h,
        srv,
        token_file,
        ca_file,
    }
}

impl Env {
    /// `agentkeys run --proxy MAPPINGS -- sh -c SCRIPT` as the agent; `extra` adds environment.
    fn run(&self, mappings: &[&str], script: &str, extra: &[(&str, &str)]) -> Output {
        self.run_argv(mappings, &["sh", "-c", script], extra)
    }

    fn run_argv(&self, mappings: &[&str], argv: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut args: Vec<&str> = vec!["run"];
        for m in mappings {
            args.push("--proxy");
            args.push(m);
        }
        args.push("--");
        args.extend_from_slice(argv);
        let mut c = self.h.cli(&args);
        c.env("AGENTKEYS_TOKEN_FILE", &self.token_file)
            .env("PORT", self.srv.port().to_string())
            .env("TEST_CA", &self.ca_file)
            .current_dir(&self.h.dir)
            .stdin(Stdio::null());
        for (k, v) in extra {
            c.env(k, v);
        }
        c.output().expect("agentkeys run")
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.srv.port())
    }

    /// Every audit record of `event`.
    fn audit_events(&self, event: &str) -> Vec<serde_json::Value> {
        self.h
            .audit()
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect()
    }

    /// Every `inject_result` record, once there are at least `n`: the proxy tells results in
    /// batches (up to 5 ms after the request, also after the run ended), so a test that reads
    /// them right after a run waits for them (up to 10 s).
    fn inject_results(&self, n: usize) -> Vec<serde_json::Value> {
        let start = std::time::Instant::now();
        loop {
            let got = self.audit_events("inject_result");
            if got.len() >= n || start.elapsed() > std::time::Duration::from_secs(10) {
                return got;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Nothing the server received holds the value, except on these paths.
    fn server_never_got_value_except(&self, allowed: &[&str]) {
        for r in self.srv.requests() {
            if !allowed.contains(&r.target.as_str()) {
                assert!(!contains(&r.all_bytes(), VALUE.as_bytes()), "{r:?}");
            }
        }
    }

    /// Nothing the server received holds the value.
    fn server_never_got_value(&self) {
        for r in self.srv.requests() {
            assert!(!contains(&r.all_bytes(), VALUE.as_bytes()), "{r:?}");
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn curl_gets_the_value_injected_only_on_the_service_host_and_never_holds_it() {
    let e = setup("px-curl");
    let envfile = e.h.dir.join("child-env.txt");
    let out = e.run(
        &["GH=gh"],
        &format!(
            "env > {env}; curl -sS -H \"Authorization: Bearer $GH\" {url}",
            env = envfile.display(),
            url = e.url("/user?page=2")
        ),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "ok\n");
    // The server got the real value, in the Authorization header, on this request.
    let got = e.srv.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].header("authorization"),
        Some(format!("Bearer {VALUE}").as_bytes())
    );
    assert_eq!(got[0].target, "/user?page=2");
    assert!(got[0].header("proxy-authorization").is_none());
    // A GET without a body stays one (no Content-Length: 0 added on the way).
    assert!(got[0].header("content-length").is_none(), "{:?}", got[0]);
    // The program's environment: a placeholder, the proxy and the CA bundle, never the value.
    let env = std::fs::read_to_string(&envfile).unwrap();
    assert!(!env.contains(VALUE), "the value is in the environment");
    assert!(env.contains("GH=akph_"), "{env}");
    for var in [
        "HTTPS_PROXY=http://",
        "https_proxy=",
        "HTTP_PROXY=",
        "http_proxy=",
    ] {
        assert!(env.contains(var), "{var} missing");
    }
    for var in [
        "SSL_CERT_FILE=",
        "REQUESTS_CA_BUNDLE=",
        "CURL_CA_BUNDLE=",
        "GIT_SSL_CAINFO=",
        "NODE_EXTRA_CA_CERTS=",
    ] {
        assert!(env.contains(var), "{var} missing");
    }
    // Audited: the injection (before it happened, with host, method, path without the query)
    // and its result.
    let inj = e.audit_events("inject");
    assert_eq!(inj.len(), 1, "{inj:?}");
    assert_eq!(inj[0]["service"], "gh");
    assert_eq!(inj[0]["agent"], "bot");
    assert_eq!(inj[0]["delivery"], "proxy");
    let d = inj[0]["detail"].as_str().unwrap();
    assert!(
        d.contains("host=127.0.0.1") && d.contains("method=GET") && d.contains("path=/user"),
        "{d}"
    );
    assert!(!d.contains("page=2"), "the query is not recorded: {d}");
    let res = e.inject_results(1);
    assert_eq!(res.len(), 1, "{res:?}");
    assert!(
        res[0]["detail"].as_str().unwrap().contains("status=200"),
        "{res:?}"
    );
    // The vault entry is proxy-only: no delivery kind that hands over bytes works.
    let read = e.h.run_agent_file(&e.token_file, &["read", "gh"]);
    assert!(!read.status.success());
    assert!(
        text(&read).contains("its policy allows: proxy"),
        "{}",
        text(&read)
    );
    let env_run =
        e.h.run_agent_file(&e.token_file, &["run", "--env", "T=gh", "--", "true"]);
    assert!(
        text(&env_run).contains("its policy allows: proxy"),
        "{}",
        text(&env_run)
    );
}

#[test]
fn a_placeholder_sent_anywhere_else_is_refused_with_403_and_audited() {
    let e = setup("px-refuse");
    let port = e.srv.port();
    let enc: String = "akph_".bytes().map(|b| format!("%{b:02X}")).collect();
    // Each case: a curl command line (after `curl -s -o /dev/null -w %{http_code}`), the
    // expected status, and a word of the reason.
    let cases: Vec<(String, &str, &str)> = vec![
        // Another host (decrypted there, since `other` may go to it): refused.
        (
            format!("-H \"Authorization: Bearer $GH\" https://localhost:{port}/x"),
            "403",
            "localhost",
        ),
        // The URL path, percent-encoded or not, and a query parameter the policy does not name.
        (format!("https://127.0.0.1:{port}/$GH"), "403", "URL path"),
        (
            format!("\"https://127.0.0.1:{port}/a?q=$GH\""),
            "403",
            "query parameter",
        ),
        // A header the policy does not name; Authorization with another scheme.
        (
            format!("-H \"X-Other: $GH\" https://127.0.0.1:{port}/x"),
            "403",
            "x-other",
        ),
        (
            format!("-H \"Authorization: Digest $GH\" https://127.0.0.1:{port}/x"),
            "403",
            "scheme",
        ),
        // A body.
        (
            format!("--data-binary \"x=$GH\" https://127.0.0.1:{port}/x"),
            "403",
            "body",
        ),
        // Plain http: never a value.
        (
            "-H \"Authorization: Bearer $GH\" http://127.0.0.1:9/x".to_string(),
            "403",
            "plain http",
        ),
        // The Host header names another host than the connection (SNI/Host disagree).
        (
            format!(
                "-H \"Host: localhost:{port}\" -H \"Authorization: Bearer $GH\" https://127.0.0.1:{port}/x"
            ),
            "421",
            "Host",
        ),
    ];
    let mut script = String::new();
    for (i, (args, _, _)) in cases.iter().enumerate() {
        script.push_str(&format!(
            "echo \"case {i} $(curl -s -o {dir}/body{i} -w '%{{http_code}}' {args})\"\n",
            dir = e.h.dir.display()
        ));
    }
    // Percent-encoded placeholder in the path.
    script.push_str(&format!(
        "echo \"case enc $(curl -s -o /dev/null -w '%{{http_code}}' \"https://127.0.0.1:{port}/{enc}${{GH#akph_}}\")\"\n"
    ));
    let out = e.run(&["GH=gh", "OTHER=other"], &script, &[]);
    let so = stdout(&out);
    for (i, (_, status, word)) in cases.iter().enumerate() {
        assert!(so.contains(&format!("case {i} {status}")), "case {i}: {so}");
        let body = std::fs::read_to_string(e.h.dir.join(format!("body{i}"))).unwrap_or_default();
        assert!(
            body.contains(word),
            "case {i}: body {body:?} lacks {word:?}"
        );
    }
    assert!(so.contains("case enc 403"), "{so}");
    e.server_never_got_value();
    // No request with a placeholder in a refused place reached the server, not even the body's.
    for r in e.srv.requests() {
        assert!(!contains(&r.body, b"akph_"), "{r:?}");
    }
    // Audited deny records name the host; no inject record. (The proxy reports each refusal
    // to the daemon, which writes the record just after the client got its 403.)
    wait_until(Duration::from_secs(5), || {
        e.audit_events("deny").len() > cases.len()
    });
    let denies = e.audit_events("deny");
    assert!(denies.len() >= cases.len(), "{denies:?}");
    assert!(
        denies.iter().any(|d| d["detail"]
            .as_str()
            .unwrap_or("")
            .contains("host=localhost")),
        "{denies:?}"
    );
    assert!(denies.iter().all(|d| d["delivery"] == "proxy"));
    assert!(e.audit_events("inject").is_empty());
}

#[test]
fn split_or_reflected_placeholders_and_redirects_never_carry_the_value_away() {
    let e = setup("px-split");
    let port = e.srv.port();
    let out = e.run(
        &["GH=gh"],
        &format!(
            // Split across two headers: neither half is replaced, nothing refused.
            "curl -s -H \"X-Api-Key: ${{GH%????????????????}}\" -H \"X-Api-Key: ${{GH#????????????????????}}\" https://127.0.0.1:{port}/split; echo;\n\
             # A host that reflects what it gets: the answer is masked.\n\
             curl -s -H \"X-Api-Key: $GH\" https://127.0.0.1:{port}/echo; echo;\n\
             # A redirect to another host, re-sending the header: that host is tunnelled and\n\
             # gets the placeholder only.\n\
             cat \"$SSL_CERT_FILE\" \"$TEST_CA\" > both.pem\n\
             curl -s -L --location-trusted --cacert both.pem -H \"Authorization: Bearer $GH\" \\\n\
               \"https://127.0.0.1:{port}/redirect?to=https://localhost:{port}/after\" -o /dev/null; echo done"
        ),
        &[],
    );
    let so = stdout(&out);
    assert!(so.contains("done"), "{so} {}", text(&out));
    assert!(
        !so.contains(VALUE),
        "the reflected value reached the program: {so}"
    );
    assert!(
        so.contains("\"x-api-key\":\"******************************\""),
        "{so}"
    );
    let reqs = e.srv.requests();
    let echo = reqs
        .iter()
        .find(|r| r.target == "/echo")
        .expect("echo request");
    assert_eq!(echo.header("x-api-key"), Some(VALUE.as_bytes()));
    let after = reqs
        .iter()
        .find(|r| r.target == "/after")
        .expect("redirected request");
    assert!(contains(&after.all_bytes(), b"Bearer akph_"), "{after:?}");
    assert!(!contains(&after.all_bytes(), VALUE.as_bytes()));
    let split = reqs
        .iter()
        .find(|r| r.target == "/split")
        .expect("split request");
    assert!(!contains(&split.all_bytes(), VALUE.as_bytes()));
}

/// Reads an HTTP/1.1 response head from a stream; returns the status code.
fn status_of(s: &mut impl BufRead) -> u16 {
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    loop {
        let mut l = String::new();
        if s.read_line(&mut l).unwrap() == 0 || l == "\r\n" {
            break;
        }
    }
    code
}

/// Starts a run that writes its environment to a file and stays alive while `keep` exists;
/// returns the proxy URL with this run's credential, and the thread to join.
fn long_run(e: &Env, tag: &str) -> (String, PathBuf, std::thread::JoinHandle<Output>) {
    let envfile = e.h.dir.join(format!("{tag}-env.txt"));
    let keep = e.h.dir.join(format!("{tag}-keep"));
    std::fs::write(&keep, b"").unwrap();
    let script = format!(
        "env > {env}.tmp; mv {env}.tmp {env}; while [ -e {keep} ]; do sleep 0.1; done",
        env = envfile.display(),
        keep = keep.display()
    );
    let mut args: Vec<String> = ["run", "--proxy", "GH=gh", "--", "sh", "-c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(script);
    let mut c = Command::new(bin("agentkeys"));
    c.args(&args);
    e.h.env(&mut c);
    c.env("AGENTKEYS_TOKEN_FILE", &e.token_file)
        .stdin(Stdio::null());
    let t = std::thread::spawn(move || c.output().unwrap());
    assert!(
        wait_until(Duration::from_secs(20), || envfile.exists()),
        "the run did not start"
    );
    let env = std::fs::read_to_string(&envfile).unwrap();
    let url = env
        .lines()
        .find_map(|l| l.strip_prefix("HTTPS_PROXY="))
        .expect("HTTPS_PROXY")
        .to_string();
    (url, keep, t)
}

/// `http://user:pass@127.0.0.1:port` -> (address, "user:pass").
fn parse_proxy(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (cred, addr) = rest.rsplit_once('@').unwrap();
    (addr.to_string(), cred.to_string())
}

fn connect_via(addr: &str, cred: Option<&str>, target: &str) -> (u16, TcpStream) {
    use base64::Engine;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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
    let mut r = BufReader::new(s.try_clone().unwrap());
    let code = status_of(&mut r);
    (code, s)
}

#[test]
fn another_process_without_the_runs_credential_gets_407_and_other_hosts_are_tunnelled() {
    let e = setup("px-407");
    let port = e.srv.port();
    let (url, keep, t) = long_run(&e, "a");
    let (addr, cred) = parse_proxy(&url);
    let target = format!("localhost:{port}");
    // No credential, a wrong one: 407 (with the challenge), before anything else.
    assert_eq!(connect_via(&addr, None, &target).0, 407);
    let (user, _) = cred.split_once(':').unwrap();
    assert_eq!(
        connect_via(&addr, Some(&format!("{user}:wrong")), &target).0,
        407
    );
    assert_eq!(connect_via(&addr, Some("nobody:x"), &target).0, 407);
    // With it: a host that is not injectable is a plain tunnel, so TLS goes to the real server,
    // whose certificate (issued by the test CA) is what we see.
    let (code, tcp) = connect_via(&addr, Some(&cred), &target);
    assert_eq!(code, 200);
    let leaf = tls_peer_cert(tcp, "localhost", Some(&e.srv.ca_pem));
    assert_eq!(
        leaf.as_deref(),
        Some(&e.srv.cert_der[..]),
        "the tunnel's certificate is not the upstream's"
    );
    // An injectable host is decrypted: the certificate is minted by the agentkeys CA, which
    // the test CA alone does not trust.
    let (code, tcp) = connect_via(&addr, Some(&cred), &format!("127.0.0.1:{port}"));
    assert_eq!(code, 200);
    assert!(tls_peer_cert(tcp, "127.0.0.1", Some(&e.srv.ca_pem)).is_none());
    let bundle = std::fs::read_to_string(e.h.home().join("proxy-ca-bundle.pem")).unwrap();
    let (_, tcp) = connect_via(&addr, Some(&cred), &format!("127.0.0.1:{port}"));
    let minted = tls_peer_cert(tcp, "127.0.0.1", Some(&bundle)).expect("the agentkeys CA verifies");
    assert_ne!(minted, e.srv.cert_der);
    // An SNI naming another host than the CONNECT: the handshake fails.
    let (_, tcp) = connect_via(&addr, Some(&cred), &format!("127.0.0.1:{port}"));
    assert!(tls_peer_cert(tcp, "localhost", Some(&bundle)).is_none());
    // The run ends: its credential stops working.
    std::fs::remove_file(&keep).unwrap();
    let out = t.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        wait_until(Duration::from_secs(5), || connect_via(
            &addr,
            Some(&cred),
            &target
        )
        .0 == 407),
        "the credential of an ended run still works"
    );
}

/// TLS over an established tunnel; the peer's leaf certificate when the handshake succeeds
/// against `ca_pem` as the only root.
fn tls_peer_cert(tcp: TcpStream, name: &str, ca_pem: Option<&str>) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.unwrap_or("").as_bytes()) {
        let _ = roots.add(c.ok()?);
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = rustls_pki_types::ServerName::try_from(name.to_string()).ok()?;
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), server).ok()?;
    let mut tcp = tcp;
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).is_err() {
            return None;
        }
    }
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
}

#[test]
fn the_process_that_made_the_request_never_holds_the_value_in_memory() {
    if !is_root() {
        eprintln!(
            "SKIP the_process_that_made_the_request_never_holds_the_value_in_memory: needs root to read another process's memory"
        );
        return;
    }
    let Some(python) = python_with_requests() else {
        skip_or_fail(
            "the_process_that_made_the_request_never_holds_the_value_in_memory",
            "no Python with requests (.ci/run creates .venv-proxy)",
        );
        return;
    };
    let e = setup("px-mem");
    let pidfile = e.h.dir.join("py.pid");
    let done = e.h.dir.join("py.done");
    let keep = e.h.dir.join("py.keep");
    std::fs::write(&keep, b"").unwrap();
    let code = format!(
        "import os, time, requests\n\
         r = requests.get('{url}', headers={{'Authorization': 'Bearer ' + os.environ['GH']}})\n\
         body = r.text\n\
         open('{pid}', 'w').write(str(os.getpid()))\n\
         open('{done}', 'w').write(str(r.status_code) + ' ' + body)\n\
         while os.path.exists('{keep}'): time.sleep(0.05)\n",
        url = e.url("/echo"),
        pid = pidfile.display(),
        done = done.display(),
        keep = keep.display()
    );
    let mut c = e.h.cli(&[
        "run",
        "--proxy",
        "GH=gh",
        "--",
        python.to_str().unwrap(),
        "-c",
        &code,
    ]);
    c.env("AGENTKEYS_TOKEN_FILE", &e.token_file)
        .stdin(Stdio::null());
    let t = std::thread::spawn(move || c.output().unwrap());
    assert!(
        wait_until(Duration::from_secs(30), || done.exists()),
        "the request did not finish"
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let answer = std::fs::read_to_string(&done).unwrap();
    assert!(answer.starts_with("200 "), "{answer}");
    assert!(
        !answer.contains(VALUE),
        "the echoed value reached the program"
    );
    // The whole memory of the process that sent the request: no value (the echo answer was
    // masked by the proxy, the request held only the placeholder).
    assert_eq!(
        memory_find(pid, VALUE.as_bytes()),
        None,
        "the value is in the client's memory"
    );
    assert!(
        memory_find(pid, b"akph_").is_some(),
        "the scan sees the placeholder (sanity)"
    );
    std::fs::remove_file(&keep).unwrap();
    let out = t.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        e.srv.requests()[0].header("authorization"),
        Some(format!("Bearer {VALUE}").as_bytes())
    );
}

/// A Python with `requests` and `httpx`: `$AGENTKEYS_TEST_PROXY_PYTHON`, else `.venv-proxy`.
fn python_with_requests() -> Option<PathBuf> {
    let cands: Vec<PathBuf> = std::env::var_os("AGENTKEYS_TEST_PROXY_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([workspace_root().join(".venv-proxy/bin/python")])
        .collect();
    cands.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import requests, httpx"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A tool `.ci/run` installs must be there under CI; elsewhere its absence is a SKIP.
fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why}, but CI=true and .ci/run installs it");
    }
    eprintln!("SKIP {test}: {why}");
}

#[test]
fn python_requests_and_httpx_through_the_proxy() {
    let Some(python) = python_with_requests() else {
        skip_or_fail(
            "python_requests_and_httpx_through_the_proxy",
            "no Python with requests and httpx (.ci/run creates .venv-proxy)",
        );
        return;
    };
    let e = setup("px-py");
    let code = format!(
        "import os, requests, httpx\n\
         a = requests.get('{u1}', headers={{'Authorization': 'token ' + os.environ['GH']}})\n\
         b = httpx.get('{u2}', params={{'access_token': os.environ['GH']}})\n\
         c = httpx.post('{u3}', headers={{'x-api-key': os.environ['GH']}}, content=b'{{\"a\": 1}}')\n\
         print(a.status_code, b.status_code, c.status_code)\n",
        u1 = e.url("/requests"),
        u2 = e.url("/httpx"),
        u3 = e.url("/post")
    );
    let out = e.run_argv(&["GH=gh"], &[python.to_str().unwrap(), "-c", &code], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out).trim(), "200 200 200");
    let reqs = e.srv.requests();
    let by = |t: &str| {
        reqs.iter()
            .find(|r| r.target.starts_with(t))
            .unwrap()
            .clone()
    };
    assert_eq!(
        by("/requests").header("authorization"),
        Some(format!("token {VALUE}").as_bytes())
    );
    assert_eq!(by("/httpx").target, format!("/httpx?access_token={VALUE}"));
    let post = by("/post");
    assert_eq!(post.header("x-api-key"), Some(VALUE.as_bytes()));
    assert_eq!(post.body, b"{\"a\": 1}");
    assert_eq!(e.audit_events("inject").len(), 3);
    // Each injection's result is recorded, including those told after the run ended.
    let results = e.inject_results(3);
    assert_eq!(results.len(), 3, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r["detail"].as_str().unwrap().contains("status=200")),
        "{results:?}"
    );
}

#[test]
fn git_clone_and_push_over_https_with_the_token_as_password() {
    if Command::new("git").arg("--version").output().is_err() {
        skip_or_fail(
            "git_clone_and_push_over_https_with_the_token_as_password",
            "no git",
        );
        return;
    }
    let e = setup("px-git");
    // A bare repository with one commit, served by `git http-backend` behind the test server;
    // the server accepts only the real token as the Basic password.
    let root = e.h.dir.join("repos");
    std::fs::create_dir_all(&root).unwrap();
    let work = e.h.dir.join("seed");
    let git = |dir: &Path, args: &[&str]| {
        let o = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {}", text(&o));
    };
    git(&root, &["init", "-q", "--bare", "-b", "main", "r.git"]);
    git(&root.join("r.git"), &["config", "http.receivepack", "true"]);
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("README"), "hello\n").unwrap();
    git(&work, &["add", "README"]);
    git(
        &work,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@e",
            "commit",
            "-q",
            "-m",
            "one",
        ],
    );
    git(
        &work,
        &["push", "-q", root.join("r.git").to_str().unwrap(), "main"],
    );
    e.srv.serve_git(root.clone(), VALUE);
    let url = e.url("/git/r.git");
    let script = format!(
        "set -e; export HOME=$PWD GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0\n\
         git clone -q \"https://x-access-token:$GH@{rest}\" clone\n\
         cd clone; echo two >> README\n\
         git -c user.name=agent -c user.email=a@e commit -q -am two\n\
         git push -q origin main\n\
         echo pushed",
        rest = url.strip_prefix("https://").unwrap()
    );
    let out = e.run(&["GH=gh"], &script, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("pushed"));
    // The push arrived: the bare repository's main has two commits.
    let log = Command::new("git")
        .args(["log", "--oneline", "main"])
        .current_dir(root.join("r.git"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&log.stdout).lines().count(), 2);
    // The clone's config keeps the URL as given: the placeholder, not the value.
    let cfg = std::fs::read_to_string(e.h.dir.join("clone/.git/config")).unwrap();
    assert!(cfg.contains("akph_") && !cfg.contains(VALUE));
    assert!(e.audit_events("inject").len() >= 2);
}

#[test]
fn node_fetch_through_the_proxy() {
    let Ok(v) = Command::new("node").arg("--version").output() else {
        eprintln!("SKIP node_fetch_through_the_proxy: no node");
        return;
    };
    // NODE_USE_ENV_PROXY (fetch honours HTTP(S)_PROXY) exists from Node 24.5 and 22.21. Before
    // that, the built-in `fetch` takes the proxy from a global dispatcher: undici's
    // `EnvHttpProxyAgent` (npm `undici`, which `.ci/run` installs into .node-undici where
    // node is older), as README says.
    let ver = String::from_utf8_lossy(&v.stdout)
        .trim()
        .trim_start_matches('v')
        .to_string();
    let mut it = ver.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    let env_proxy = major > 24 || (major == 24 && minor >= 5) || (major == 22 && minor >= 21);
    let prelude = if env_proxy {
        String::new()
    } else {
        let undici = std::env::var_os("AGENTKEYS_TEST_UNDICI")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(".node-undici/node_modules/undici"));
        if !undici.join("package.json").exists() {
            eprintln!(
                "SKIP node_fetch_through_the_proxy: node {ver} has no NODE_USE_ENV_PROXY (22.21+ or 24.5+) and there is no npm undici at {} (.ci/run installs it where npm is)",
                undici.display()
            );
            return;
        }
        format!(
            "const u = require({:?}); u.setGlobalDispatcher(new u.EnvHttpProxyAgent()); ",
            undici.display().to_string()
        )
    };
    let e = setup("px-node");
    let code = format!(
        "{prelude}fetch('{url}', {{headers: {{authorization: 'Bearer ' + process.env.GH}}}}).then(r => r.text()).then(t => console.log(t.trim()))",
        url = e.url("/node")
    );
    let out = e.run_argv(
        &["GH=gh"],
        &["node", "-e", &code],
        &[("NODE_USE_ENV_PROXY", "1")],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out).trim(), "ok");
    let r = e.srv.requests();
    assert_eq!(
        r[0].header("authorization"),
        Some(format!("Bearer {VALUE}").as_bytes())
    );
}

#[test]
fn proxy_mappings_are_checked_at_run_start() {
    let e = setup("px-check");
    // A service without inject hosts: refused, naming the kinds allowed and the flag.
    let out = e.h.run_stdin(&["store", "plain"], b"v");
    assert!(out.status.success());
    let token = e.h.agent_token_file("bot2", "plain,gh");
    let mut c = e.h.cli(&["run", "--proxy", "P=plain", "--", "true"]);
    c.env("AGENTKEYS_TOKEN_FILE", &token).stdin(Stdio::null());
    let o = c.output().unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("may not be used through the proxy") && t.contains("--inject-host"),
        "{t}"
    );
    // Out of scope.
    let mut c = e.h.cli(&["run", "--proxy", "O=other", "--", "true"]);
    c.env("AGENTKEYS_TOKEN_FILE", &token).stdin(Stdio::null());
    let o = c.output().unwrap();
    assert!(text(&o).contains("outside its scope"), "{}", text(&o));
    // Bad policies are refused when stored.
    for args in [
        &["store", "x", "--inject-host", "*.com"][..],
        &["store", "x", "--deliver", "proxy"][..],
        &[
            "store",
            "x",
            "--inject-host",
            "a.com",
            "--inject-header",
            "Host",
        ][..],
        &["store", "x", "--deliver", "carrier-pigeon"][..],
    ] {
        let o = e.h.run_stdin(args, b"v");
        assert!(!o.status.success(), "{args:?}");
        assert!(
            text(&o).contains("invalid policy"),
            "{args:?}: {}",
            text(&o)
        );
    }
}

#[test]
fn a_stalled_client_and_a_huge_head_do_not_hold_the_proxy() {
    let e = setup("px-slow");
    let (url, keep, t) = long_run(&e, "s");
    let (addr, _) = parse_proxy(&url);
    // Huge header: refused (431 or the connection closed), the proxy still serves.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let big = "a".repeat(200 * 1024);
    let _ = write!(s, "GET http://x/ HTTP/1.1\r\nX-Big: {big}\r\n\r\n");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    assert!(
        buf.is_empty() || buf.starts_with("HTTP/1.1 431"),
        "{buf:.80}"
    );
    // A client that never finishes its head, while others are served.
    let mut stall = TcpStream::connect(&addr).unwrap();
    stall
        .write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")
        .unwrap();
    assert_eq!(connect_via(&addr, None, "localhost:1").0, 407);
    drop(stall);
    std::fs::remove_file(&keep).unwrap();
    let _ = t.join();
}

#[test]
fn high_value_injection_needs_a_grant_bound_to_host_method_and_path() {
    let mut e = setup("px-hv");
    let port = e.srv.port();
    let out = e.h.run_stdin(
        &[
            "store",
            "bank",
            "--high-value",
            "--inject-host",
            &format!("127.0.0.1:{port}"),
        ],
        b"bank-value-123456",
    );
    assert!(out.status.success());
    let _ = &mut e;
    let token = e.h.agent_token_file("hv", "bank");
    let script = |path: &str| {
        format!(
            "curl -s -o {d}/hv-body -w '%{{http_code}}' -H \"Authorization: Bearer $B\" https://127.0.0.1:{port}{path}",
            d = e.h.dir.display()
        )
    };
    let run = |path: &str| {
        let mut c =
            e.h.cli(&["run", "--proxy", "B=bank", "--", "sh", "-c", &script(path)]);
        c.env("AGENTKEYS_TOKEN_FILE", &token).stdin(Stdio::null());
        let o = c.output().unwrap();
        (
            stdout(&o),
            std::fs::read_to_string(e.h.dir.join("hv-body")).unwrap_or_default(),
        )
    };
    // No grant: 403 naming the approval command; the request waits for the owner.
    let (code, body) = run("/pay");
    assert_eq!(code, "403");
    assert!(body.contains("agentkeys approve"), "{body}");
    let pending = e.h.run(&["pending", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&pending.stdout).unwrap();
    let req = &list[0];
    assert!(
        req["command"]
            .as_str()
            .unwrap()
            .contains("GET https://127.0.0.1"),
        "{req}"
    );
    let code_ = req["code"].as_str().unwrap().to_string();
    assert!(e.h.run(&["approve", &code_]).status.success());
    // The once-grant covers exactly that request (same session is not needed across runs:
    // the grant is bound to the agent session), once.
    let (code, _) = run("/pay");
    assert_eq!(code, "200");
    let (code, _) = run("/pay");
    assert_eq!(code, "403", "a once-grant was used twice");
    let (code, _) = run("/other-path");
    assert_eq!(code, "403");
    assert_eq!(
        e.srv
            .requests()
            .iter()
            .filter(|r| r.header("authorization") == Some(b"Bearer bank-value-123456"))
            .count(),
        1
    );
    // A window (`approve --for`) covers the agent session, the service and the host: any
    // method and path there, for its duration.
    let list: serde_json::Value =
        serde_json::from_slice(&e.h.run(&["pending", "--json"]).stdout).unwrap();
    let code_ = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["command"].as_str().unwrap_or("").contains("/other-path"))
        .unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        e.h.run(&["approve", &code_, "--for", "10m"])
            .status
            .success()
    );
    assert_eq!(run("/other-path").0, "200");
    assert_eq!(run("/third").0, "200");
    let grants = e.audit_events("grant_used");
    assert!(
        grants
            .iter()
            .any(|g| g["detail"].as_str().unwrap_or("").contains("window")),
        "{grants:?}"
    );
}

#[test]
fn mcp_run_with_a_proxy_mapping_through_rmcp() {
    let e = setup("px-mcp");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use rmcp::ServiceExt;
        use rmcp::model::{
            CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation,
        };
        let mut c = Command::new(bin("agentkeys"));
        c.arg("mcp");
        e.h.env(&mut c);
        c.env("AGENTKEYS_TOKEN_FILE", &e.token_file)
            .stderr(Stdio::null());
        let transport =
            rmcp::transport::TokioChildProcess::new(tokio::process::Command::from(c)).unwrap();
        let config = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("px", "0"),
        );
        let client = config.serve(transport).await.unwrap();
        let tools = client.list_all_tools().await.unwrap();
        let run = tools.iter().find(|t| t.name == "run").unwrap();
        let schema = serde_json::to_value(&run.input_schema).unwrap();
        assert!(schema["properties"].get("proxy").is_some(), "{schema}");
        let args = serde_json::json!({
            "command": "sh",
            "args": ["-c", format!("curl -s -H \"Authorization: Bearer $GH\" {}", e.url("/echo"))],
            "proxy": {"GH": "gh"},
        });
        let serde_json::Value::Object(args) = args else {
            unreachable!()
        };
        let r = client
            .call_tool(CallToolRequestParams::new("run").with_arguments(args))
            .await
            .unwrap();
        let whole = serde_json::to_string(&r).unwrap();
        assert!(!whole.contains(VALUE), "{whole}");
        assert!(whole.contains("******"), "{whole}");
        let _ = client.cancel().await;
    });
    let r = e.srv.requests();
    assert_eq!(
        r[0].header("authorization"),
        Some(format!("Bearer {VALUE}").as_bytes())
    );
}

#[test]
fn mcp_run_with_a_proxy_mapping_through_the_python_sdk() {
    let python = std::env::var_os("AGENTKEYS_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv-mcp/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import mcp.client.stdio"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail(
            "mcp_run_with_a_proxy_mapping_through_the_python_sdk",
            "no Python with the mcp SDK (.ci/run creates .venv-mcp)",
        );
        return;
    }
    let e = setup("px-mcp-py");
    let script = workspace_root().join("tests/mcp_python/proxy_client.py");
    let mut c = Command::new(&python);
    c.arg(&script).arg(bin("agentkeys"));
    e.h.env(&mut c);
    c.env("AGENTKEYS_TOKEN_FILE", &e.token_file)
        .env("AK_VALUE", VALUE)
        .env("AK_URL", e.url("/echo"));
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("OK python mcp proxy client"),
        "{}",
        text(&out)
    );
    let r = e.srv.requests();
    assert_eq!(
        r[0].header("authorization"),
        Some(format!("Bearer {VALUE}").as_bytes())
    );
}

/// The daemon's child named `agentkeys-proxy`.
fn proxy_pid(h: &TestHome) -> u32 {
    let daemon = h.daemon_pid();
    let kids = std::fs::read_to_string(format!("/proc/{daemon}/task/{daemon}/children")).unwrap();
    kids.split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "agentkeys-proxy")
        })
        .expect("the proxy process")
}

#[test]
fn the_proxy_process_is_hardened_and_keeps_no_value_after_a_run() {
    let e = setup("px-hard");
    let pid = proxy_pid(&e.h);
    // The daemon serves before the proxy has finished its start (it reports `Ready` when its
    // filter is on): wait for that.
    let status_now = || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || status_now()
        .lines()
        .any(
            |l| l.starts_with("Seccomp:") && l.trim_end().ends_with('2')
        )));
    let status = status_now();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(field("Seccomp:"), "2", "no seccomp filter");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("CapEff:"), "0000000000000000");
    // Its only fds: stdio, the daemon link, the listener, the reactor's.
    let out = e.run(
        &["GH=gh"],
        &format!(
            "curl -s -H \"Authorization: Bearer $GH\" {}",
            e.url("/echo")
        ),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stdout(&out).contains(VALUE));
    if !is_root() {
        eprintln!(
            "SKIP the_proxy_process_is_hardened_and_keeps_no_value_after_a_run (memory part): needs root"
        );
        return;
    }
    // The scan sees this process's memory at all (a literal of the binary).
    assert!(
        memory_find(pid, b"agentkeys proxy: refused").is_some(),
        "the scan found nothing"
    );
    // `gh` has no cache_ttl: once the request is done the proxy unmapped its page, and what it
    // built from it (the header, TLS records) was freed and wiped by the allocator.
    assert!(
        wait_until(Duration::from_secs(5), || memory_find(
            pid,
            VALUE.as_bytes()
        )
        .is_none()),
        "the value stays in the proxy's memory: {:?}",
        memory_find(pid, VALUE.as_bytes())
    );
    assert_eq!(
        memory_find(e.h.daemon_pid(), VALUE.as_bytes()),
        None,
        "in the daemon's memory"
    );
}

#[test]
fn large_bodies_stream_both_ways_and_upgrades_pass() {
    let e = setup("px-stream");
    let port = e.srv.port();
    let big = e.h.dir.join("big.bin");
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &data).unwrap();
    let out = e.run(
        &["GH=gh"],
        &format!(
            "curl -s -o /dev/null -w '%{{http_code}} ' -H \"Authorization: Bearer $GH\" --data-binary @{big} https://127.0.0.1:{port}/upload;\n\
             curl -s -H \"Authorization: Bearer $GH\" 'https://127.0.0.1:{port}/big?n=8000000' | wc -c",
            big = big.display()
        ),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let so = stdout(&out);
    assert!(so.starts_with("200 "), "{so}");
    assert_eq!(so.split_whitespace().last(), Some("8000000"), "{so}");
    let up = e
        .srv
        .requests()
        .into_iter()
        .find(|r| r.target == "/upload")
        .unwrap();
    assert_eq!(up.body.len(), data.len());
    assert!(up.body == data, "the uploaded body changed on the way");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {VALUE}").as_bytes())
    );

    // An upgrade (websocket-style) through a decrypted connection: the value in the upgrade
    // request, then bytes both ways.
    let (url, keep, t) = long_run(&e, "ws");
    let env = std::fs::read_to_string(e.h.dir.join("ws-env.txt")).unwrap();
    let ph = env
        .lines()
        .find_map(|l| l.strip_prefix("GH="))
        .unwrap()
        .to_string();
    let (addr, cred) = parse_proxy(&url);
    let (code, tcp) = connect_via(&addr, Some(&cred), &format!("127.0.0.1:{port}"));
    assert_eq!(code, 200);
    let bundle = std::fs::read_to_string(e.h.home().join("proxy-ca-bundle.pem")).unwrap();
    let mut tls = tls_stream(tcp, "127.0.0.1", &bundle);
    write!(
        tls,
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nAuthorization: Bearer {ph}\r\n\r\n"
    )
    .unwrap();
    tls.flush().unwrap();
    let mut r = BufReader::new(tls);
    assert_eq!(status_of(&mut r), 101);
    let tls = r.get_mut();
    tls.write_all(b"ping through the tunnel").unwrap();
    tls.flush().unwrap();
    let mut got = [0u8; 23];
    r.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping through the tunnel");
    let ws = e
        .srv
        .requests()
        .into_iter()
        .find(|r| r.target == "/ws")
        .unwrap();
    assert_eq!(
        ws.header("authorization"),
        Some(format!("Bearer {VALUE}").as_bytes())
    );
    // A placeholder in the CONNECT authority: 403, audited.
    let (code, _) = connect_via(&addr, Some(&cred), &format!("{ph}.example:443"));
    assert_eq!(code, 403);
    // (The proxy reports the refusal to the daemon, which writes the record just after.)
    assert!(wait_until(Duration::from_secs(5), || {
        e.audit_events("deny")
            .iter()
            .any(|d| d["detail"].as_str().unwrap_or("").contains("CONNECT host"))
    }));
    std::fs::remove_file(&keep).unwrap();
    let _ = t.join();
}

/// A TLS client stream over an established tunnel, trusting `ca_pem` only.
fn tls_stream(
    tcp: TcpStream,
    name: &str,
    ca_pem: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let _ = roots.add(c.unwrap());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), server).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

#[test]
fn http2_on_both_sides_when_client_and_server_offer_it() {
    let e = setup_with("px-h2", HttpsServer::start_h2());
    let port = e.srv.port();
    let out = e.run(
        &["GH=gh"],
        &format!(
            "curl -s --http2 -o /dev/null -w '%{{http_version}} %{{http_code}}' -H \"Authorization: Bearer $GH\" https://127.0.0.1:{port}/h2;\n\
             echo; curl -s --http2 -o /dev/null -w '%{{http_code}}' -H \"Authorization: Bearer $GH\" https://127.0.0.1:{port}/$GH;\n\
             echo; curl -s --http2 -o /dev/null -w '%{{http_code}}' -H \"Host: $GH\" -H \"Authorization: Bearer $GH\" https://127.0.0.1:{port}/a"
        ),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let so = stdout(&out);
    let mut lines = so.lines();
    // curl spoke HTTP/2 with the proxy, and the proxy HTTP/2 with the server.
    assert_eq!(lines.next(), Some("2 200"), "{so}");
    assert_eq!(
        lines.next(),
        Some("403"),
        "the path rule under HTTP/2: {so}"
    );
    // A placeholder as the `:authority` pseudo-header: another host than the connection's.
    assert_eq!(lines.next(), Some("421"), "{so}");
    let r = e.srv.requests();
    let h2 = r
        .iter()
        .find(|q| q.target == "/h2")
        .expect("the h2 request");
    assert_eq!(h2.version, "HTTP/2.0");
    assert_eq!(
        h2.header("authorization"),
        Some(format!("Bearer {VALUE}").as_bytes())
    );
    e.server_never_got_value_except(&["/h2"]);
}

#[test]
fn a_proxy_that_cannot_start_leaves_the_daemon_serving_and_says_why() {
    // Its port is taken: the proxy fails at `listen`; the daemon serves everything else, and
    // `run --proxy` names the reason.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut h = TestHome::initialized("px-fail");
    h.write_config(&format!("[proxy]\nlisten = \"127.0.0.1:{port}\"\n"));
    let out = h.run_stdin(&["store", "gh", "--inject-host", "api.github.com"], b"v");
    assert!(out.status.success());
    h.start_daemon(&[]);
    assert!(h.run(&["status"]).status.success());
    let o = h.run(&["run", "--proxy", "GH=gh", "--", "true"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("proxy is not running"), "{}", text(&o));
    assert!(
        h.daemon_log().contains("the proxy failed at listen"),
        "{}",
        h.daemon_log()
    );
    // Without the proxy (`enabled = false`) the refusal says so too.
    let mut h2 = TestHome::initialized("px-off");
    h2.write_config("[proxy]\nenabled = false\n");
    assert!(
        h2.run_stdin(&["store", "gh", "--inject-host", "api.github.com"], b"v")
            .status
            .success()
    );
    h2.start_daemon(&[]);
    let o = h2.run(&["run", "--proxy", "GH=gh", "--", "true"]);
    assert!(text(&o).contains("not running"), "{}", text(&o));
    assert!(
        h2.run(&["run", "--env", "T=gh", "--", "true"])
            .status
            .success()
    );
    drop(taken);
}
