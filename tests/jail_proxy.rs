//! The jail and the credential-injecting proxy together (issues 15 and 16): `agentkeys jail
//! --proxy VAR=SERVICE` and `agentkeys jail --net proxy [--allow-host HOST[:PORT]]`, with the
//! real daemon and its proxy process, a real HTTPS server on 127.0.0.1 with a test CA
//! (`agentkeys_e2e::https`), and curl and Python inside the jail; as root and as a non-root
//! owner (a uid of its own through `setpriv`, with a home of its own), like `tests/jail.rs`.
//!
//! What is shown: inside the jail VAR holds a placeholder, the server receives the value, and
//! neither the jail's environment nor the memory of its processes ever holds it; the CA bundle
//! is readable inside while agentkeys' state is not; with `--net proxy` the proxy is the only
//! way out (a direct TCP connection to a local server's port, TCP and UDP to an outside
//! address, DNS and raw sockets all fail), an `--allow-host` is reached, any other host is
//! refused (403) and audited `deny` with the host, also over plain http, by IP, with a `Host`
//! header naming another host, or with a placeholder sent to an allowed host; a `run` of the
//! jail's session has no network at all.
//!
//! Everything lives under the target directory (`CARGO_TARGET_TMPDIR`), not /tmp: the jail
//! gives the agent a private /tmp.
#![forbid(unsafe_code)]

#[path = "support/jail_owner.rs"]
mod jail_owner;
use jail_owner::all;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use agentkeys_e2e::https::HttpsServer;
use agentkeys_e2e::{bin, contains, is_root, memory_find, text, wait_until};

/// The uid of the non-root owner the suite also runs as.
const OTHER_UID: u32 = 4243;
const VALUE: &str = "ghp_JailProxyRealValue4c3b2a1f0e9d";
const PYTHON: &str = "/usr/bin/python3";

/// Why this kernel or machine cannot run these tests, if it cannot.
fn unsupported() -> Option<String> {
    if let Some(why) = jail_owner::jail_unsupported() {
        return Some(why);
    }
    let ok = Command::new("unshare")
        .args(["-U", "-m", "-p", "-n", "-f", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Some("unprivileged user, mount, PID and network namespaces are unavailable".into());
    }
    if Command::new("curl").arg("--version").output().is_err() {
        return Some("curl is not installed".into());
    }
    if !Path::new(PYTHON).exists() {
        return Some(format!("{PYTHON} is not installed"));
    }
    None
}

macro_rules! skip_unless_supported {
    ($name:expr) => {
        if let Some(why) = unsupported() {
            println!("SKIP {}: {why}", $name);
            return;
        }
    };
}

/// One owner's installation (the jail suites' [`jail_owner::Owner`]: HOME, `$AGENTKEYS_HOME`
/// at its default place, a project, a daemon) whose proxy trusts the test server's CA; the
/// service `gh` injected into `127.0.0.1:PORT` (proxy-only), an agent `a` with `gh` in scope.
struct Owner(jail_owner::Owner);

impl std::ops::Deref for Owner {
    type Target = jail_owner::Owner;
    fn deref(&self) -> &jail_owner::Owner {
        &self.0
    }
}

fn owners(tag: &str, srv: &HttpsServer) -> Vec<Owner> {
    let mut v = vec![Owner::new(tag, None, srv)];
    if is_root() {
        v.push(Owner::new(tag, Some(OTHER_UID), srv));
    } else {
        println!("SKIP {tag} as another uid: not root");
    }
    v
}

impl Owner {
    fn new(tag: &str, uid: Option<u32>, srv: &HttpsServer) -> Owner {
        let mut o = jail_owner::Owner::bare(
            &format!("jailproxy-{tag}"),
            uid,
            &["home", "proj"],
            &[("test-ca.pem", srv.ca_pem.as_bytes())],
        );
        let out = o.run(&["init"]);
        assert!(out.status.success(), "init: {}", text(&out));
        let cfg = o.akhome().join("config.toml");
        let existing = std::fs::read_to_string(&cfg).unwrap_or_default();
        let conf = format!(
            "{existing}\n[proxy]\nupstream_ca_file = \"{}\"\n",
            o.base.join("test-ca.pem").display()
        );
        let out = o
            .command("sh", &["-c", "cat > \"$0\"", cfg.to_str().unwrap()])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(conf.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success(), "config: {}", text(&out));
        let host = format!("127.0.0.1:{}", srv.port());
        let out = o.store("gh", VALUE, &["--inject-host", &host, "--deliver", "proxy"]);
        assert!(out.status.success(), "store: {}", text(&out));
        let out = o.run(&["agent", "add", "a", "--scope", "gh"]);
        assert!(out.status.success(), "agent add: {}", text(&out));
        o.start_daemon();
        Owner(o)
    }

    /// `agentkeys jail --agent a [extra] -- sh -c SCRIPT`, with `PORT` the server's port.
    fn jail_cmd(&self, extra: &[&str], script: &str, port: u16) -> Command {
        self.jail_cmd_env(extra, script, &[("PORT", port)])
    }

    /// The same with several port variables (`PORT`, `PORT2`).
    fn jail_cmd_env(&self, extra: &[&str], script: &str, ports: &[(&str, u16)]) -> Command {
        let mut c = self.0.jail_cmd(extra, script);
        for (k, v) in ports {
            c.env(k, v.to_string());
        }
        c
    }

    fn jail(&self, extra: &[&str], script: &str, port: u16) -> Output {
        self.jail_cmd(extra, script, port)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The audit records of `event` whose detail contains `needle`.
    fn audited(&self, event: &str, needle: &str) -> bool {
        self.audit().lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|r| {
                r["event"] == event && r["detail"].as_str().is_some_and(|d| d.contains(needle))
            })
        })
    }
}

fn show(o: &Owner, out: &Output) -> String {
    jail_owner::show(o, out)
}

/// Every process below `root` (its children, theirs, ...), from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`: comm may hold spaces; split after the last ')'.
            let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
                continue;
            };
            if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        for (c, pp) in &parent_of {
            if *pp == p && !out.contains(c) {
                out.push(*c);
            }
        }
        i += 1;
    }
    out.remove(0);
    out
}

/// `jail --proxy GH_TOKEN=gh` started with the owner's own `GH_TOKEN` exported: inside,
/// `GH_TOKEN` holds a placeholder (the owner's value is gone, the jail's entry survives the
/// scrubbing of credential-like names); curl, Python (urllib, reading HTTPS_PROXY and
/// SSL_CERT_FILE), `agentkeys run --proxy` and a plain `agentkeys run` (inheriting the jail's
/// proxy variables, under the jail's registration) get the server the real value; the jail's
/// environment, `/proc/self/environ` and the memory of every process of the jail never hold
/// it; the CA bundle is readable inside, agentkeys' state and the CA's key are not; the
/// proxy variables the jail sets survive its environment scrubbing.
#[test]
fn jail_proxy_injects_and_the_jail_never_holds_the_value() {
    skip_unless_supported!("jail_proxy_injects_and_the_jail_never_holds_the_value");
    let srv = HttpsServer::start();
    let port = srv.port();
    for o in owners("inject", &srv) {
        srv.clear();
        let ready = o.proj().join("ready");
        let script = format!(
            r#"
            case "$GH_TOKEN" in ghp_*) echo "HOLDS_VALUE_OR_OWNERS";; "") echo NO_GH;; *) echo placeholder_ok;; esac
            test -n "$HTTPS_PROXY" && test -n "$https_proxy" && test -n "$HTTP_PROXY" && echo proxy_vars_ok
            for v in SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS GIT_SSL_CAINFO; do
              eval "f=\$$v"; test -r "$f" || echo "UNREADABLE $v=$f"
            done
            grep -q 'BEGIN CERTIFICATE' "$SSL_CERT_FILE" && echo bundle_ok
            for f in dek.key proxy-ca.enc vault.enc; do test -e "$(dirname "$SSL_CERT_FILE")/$f" && echo "STATE_VISIBLE $f"; done
            (echo x >> "$SSL_CERT_FILE") 2>/dev/null && echo BUNDLE_WRITABLE
            cat "$(dirname "$SSL_CERT_FILE")"/dek.key 2>/dev/null && echo DEK_READABLE
            curl -sS -o /dev/null -w 'curl=%{{http_code}}\n' -H "Authorization: Bearer $GH_TOKEN" "https://127.0.0.1:$PORT/curl"
            agentkeys run --proxy GH2=gh -- sh -c 'curl -sS -o /dev/null -w "run=%{{http_code}}\n" -H "Authorization: Bearer $GH2" "https://127.0.0.1:$PORT/run"'
            agentkeys run -- sh -c 'curl -sS -o /dev/null -w "run_inherited=%{{http_code}}\n" -H "Authorization: Bearer $GH_TOKEN" "https://127.0.0.1:$PORT/run-inherited"'
            {PYTHON} -c '
import os, urllib.request
r = urllib.request.Request("https://127.0.0.1:" + os.environ["PORT"] + "/python",
    headers={{"Authorization": "Bearer " + os.environ["GH_TOKEN"]}})
print("python=%d" % urllib.request.urlopen(r).status, flush=True)
open("{ready}", "w").write("x")
import time; time.sleep(60)
' &
            wait
            "#,
            ready = ready.display()
        );
        let child = o
            .jail_cmd(&["--proxy", "GH_TOKEN=gh"], &script, port)
            .env("GH_TOKEN", "ghp_OwnersOwnExportedToken")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let got_ready = wait_until(Duration::from_secs(30), || ready.exists());
        // The memory of every process of the jail (the CLI itself is the owner's, outside).
        let mut scanned = 0;
        if got_ready {
            // (Checked from outside: a script that named the value would hold it itself.)
            for pid in descendants(child.id()) {
                scanned += 1;
                if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
                    assert!(
                        !contains(&env, VALUE.as_bytes()),
                        "[{}] jailed process {pid}'s environment holds the value",
                        o.who()
                    );
                }
                if let Some(hit) = memory_find(pid, VALUE.as_bytes()) {
                    panic!("[{}] jailed process {pid} holds the value: {hit}", o.who());
                }
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let out = child.wait_with_output().unwrap();
        let s = all(&out);
        assert!(got_ready, "python never got its answer: {}", show(&o, &out));
        assert!(scanned >= 2, "[{}] scanned {scanned} processes", o.who());
        for bad in [
            "HOLDS_VALUE_OR_OWNERS",
            "NO_GH",
            "UNREADABLE",
            "STATE_VISIBLE",
            "BUNDLE_WRITABLE",
            "DEK_READABLE",
        ] {
            assert!(!s.contains(bad), "{bad}: {}", show(&o, &out));
        }
        for good in [
            "placeholder_ok",
            "proxy_vars_ok",
            "bundle_ok",
            "curl=200",
            "run=200",
            "run_inherited=200",
            "python=200",
        ] {
            assert!(s.contains(good), "{good}: {}", show(&o, &out));
        }
        assert!(!s.contains(VALUE), "{}", show(&o, &out));
        // The CA's sealed key is there outside (so its absence inside means something).
        assert!(o.akhome().join("proxy-ca.enc").exists());
        // The server got the value from every client.
        let reqs = srv.requests();
        assert!(!s.contains("ghp_OwnersOwn"), "{}", show(&o, &out));
        for path in ["/curl", "/run", "/run-inherited", "/python"] {
            let r = reqs.iter().find(|r| r.target == path);
            let r = r.unwrap_or_else(|| panic!("[{}] no request {path}: {reqs:?}", o.who()));
            let auth = r.header("authorization").unwrap_or_default();
            assert_eq!(auth, format!("Bearer {VALUE}").as_bytes(), "{path}");
        }
        assert!(
            o.audit().contains("\"inject\""),
            "[{}] no inject record: {}",
            o.who(),
            o.audit()
        );
    }
}

/// `jail --net proxy --allow-host localhost:PORT --proxy GH=gh`: the proxy is the only way
/// out. Injection to the service's host works; the allowed host is reached (decrypted and
/// checked, nothing injected); a direct TCP connection to the server's port, TCP and UDP to an
/// outside address, DNS and a raw socket fail; CONNECT to another host (by IP too), a plain
/// http request to another host, a `Host` header naming another host than the allowed one, and
/// a placeholder sent to the allowed host are refused, the refusals audited `deny` with the
/// host; a `run` of the jail's session has no network at all.
#[test]
fn net_proxy_leaves_only_the_proxy() {
    skip_unless_supported!("net_proxy_leaves_only_the_proxy");
    let srv = HttpsServer::start();
    let port = srv.port();
    // Another server on the same address: `localhost:PORT2` is not an allowed host.
    let srv2 = HttpsServer::start();
    let port2 = srv2.port();
    for o in owners("netproxy", &srv) {
        srv.clear();
        srv2.clear();
        let allow = format!("localhost:{port}");
        let script = format!(
            r#"
            curl -sS -o /dev/null -w 'inject=%{{http_code}}\n' -H "Authorization: Bearer $GH" "https://127.0.0.1:$PORT/inject"
            curl -sS -o /dev/null -w 'allowed=%{{http_code}}\n' "https://localhost:$PORT/allowed"
            curl -sS -o /dev/null -w 'allowed_ph=%{{http_code}}\n' -H "Authorization: Bearer $GH" "https://localhost:$PORT/allowed-ph"
            curl -sS -o /dev/null -w 'misdirected=%{{http_code}}\n' -H "Host: 127.0.0.2:$PORT" "https://localhost:$PORT/misdirected"
            curl -sSk -o /dev/null -w 'other_ip=%{{http_code}}\n' "https://127.0.0.2:$PORT/other-ip" 2>/dev/null; echo "other_ip_exit=$?"
            curl -sS -o /dev/null -w 'other_name=%{{http_code}}\n' "https://example.invalid/" 2>/dev/null; echo "other_name_exit=$?"
            curl -sSk -o /dev/null "https://localhost:$PORT2/other-port" 2>/dev/null; echo "other_port_exit=$?"
            curl -sS -o /dev/null -w 'plain=%{{http_code}}\n' "http://127.0.0.2:$PORT/plain"
            curl -sS -o /dev/null --noproxy '*' --max-time 10 "https://127.0.0.1:$PORT/direct" 2>/dev/null; echo "direct_exit=$?"
            {PYTHON} - <<'EOF'
import socket, os
port = int(os.environ["PORT"])
def attempt(name, f):
    try:
        f(); print(name + "=OPEN")
    except OSError as e:
        print(name + "=blocked " + (e.strerror or str(e)))
def tcp(addr):
    s = socket.socket(); s.settimeout(5); s.connect(addr); s.close()
attempt("tcp_local", lambda: tcp(("127.0.0.1", port)))
attempt("tcp_out", lambda: tcp(("1.1.1.1", 443)))
attempt("udp_out", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("1.1.1.1", 53)))
attempt("dns", lambda: socket.getaddrinfo("example.com", 443))
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
def tcp6():
    s = socket.socket(socket.AF_INET6); s.settimeout(5); s.connect(("2606:4700:4700::1111", 443))
attempt("tcp6_out", tcp6)
# An SNI naming another host over a CONNECT to the allowed host: no certificate, no request.
import ssl, base64, urllib.parse
u = urllib.parse.urlparse(os.environ["HTTPS_PROXY"])
s = socket.create_connection((u.hostname, u.port), timeout=10)
cred = base64.b64encode(("%s:%s" % (urllib.parse.unquote(u.username), urllib.parse.unquote(u.password))).encode()).decode()
s.sendall(("CONNECT localhost:%d HTTP/1.1\r\nHost: localhost:%d\r\nProxy-Authorization: Basic %s\r\n\r\n" % (port, port, cred)).encode())
head = b""
while b"\r\n\r\n" not in head:
    b = s.recv(1)
    if not b: break
    head += b
print("sni_connect=" + head.split(b"\r\n")[0].decode())
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
try:
    t = ctx.wrap_socket(s, server_hostname="evil.example")
    t.sendall(b"GET /sni HTTP/1.1\r\nHost: evil.example\r\n\r\n"); t.recv(100)
    print("sni_other=OPEN")
except (ssl.SSLError, OSError) as e:
    print("sni_other=blocked")
EOF
            agentkeys run -- sh -c 'curl -sS -o /dev/null --max-time 10 "https://127.0.0.1:$PORT/from-run" 2>/dev/null; echo "run_exit=$?"'
            # A run's own proxy credential, handed to the jail, is confined like the jail's.
            agentkeys run --proxy X=gh -- sh -c 'printf %s "$HTTPS_PROXY" > run-proxy-url.tmp; mv run-proxy-url.tmp run-proxy-url; sleep 4' &
            i=0; while [ ! -s run-proxy-url ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
            curl -sSk -o /dev/null --proxy "$(cat run-proxy-url)" "https://localhost:$PORT2/run-cred" 2>/dev/null; echo "run_cred_exit=$?"
            curl -sS -o /dev/null -w 'run_cred_allowed=%{{http_code}}\n' --proxy "$(cat run-proxy-url)" "https://localhost:$PORT/run-cred-allowed"
            kill %1 2>/dev/null; wait
            "#
        );
        let out = o
            .jail_cmd_env(
                &["--net", "proxy", "--allow-host", &allow, "--proxy", "GH=gh"],
                &script,
                &[("PORT", port), ("PORT2", port2)],
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let s = all(&out);
        println!("{}", show(&o, &out));
        for good in [
            "inject=200",
            "allowed=200",
            "allowed_ph=403",
            "misdirected=421",
            "plain=403",
        ] {
            assert!(s.contains(good), "{good}: {}", show(&o, &out));
        }
        // CONNECT refused: curl reports the proxy's 403 as a failed CONNECT (exit 56).
        assert!(s.contains("run_cred_allowed=200"), "{}", show(&o, &out));
        for bad in [
            "other_ip_exit=0",
            "other_name_exit=0",
            "other_port_exit=0",
            "direct_exit=0",
            "run_exit=0",
            "run_cred_exit=0",
        ] {
            assert!(!s.contains(bad), "{bad}: {}", show(&o, &out));
        }
        assert!(s.contains("sni_connect=HTTP/1.1 200"), "{}", show(&o, &out));
        for name in [
            "tcp_local",
            "tcp_out",
            "udp_out",
            "dns",
            "raw",
            "tcp6_out",
            "sni_other",
        ] {
            assert!(
                s.contains(&format!("{name}=blocked")),
                "{name}: {}",
                show(&o, &out)
            );
        }
        assert!(s.contains("run_exit="), "{}", show(&o, &out));
        let reqs = srv.requests();
        let targets: Vec<&str> = reqs.iter().map(|r| r.target.as_str()).collect();
        assert!(targets.contains(&"/inject"), "{targets:?}");
        assert!(targets.contains(&"/allowed"), "{targets:?}");
        for t in [
            "/allowed-ph",
            "/misdirected",
            "/other-ip",
            "/plain",
            "/direct",
            "/from-run",
            "/run-cred",
            "/sni",
        ] {
            assert!(!targets.contains(&t), "{t} reached the server: {targets:?}");
        }
        assert!(
            srv2.requests().is_empty(),
            "[{}] the other server was reached: {:?}",
            o.who(),
            srv2.requests()
        );
        let inj = reqs.iter().find(|r| r.target == "/inject").unwrap();
        assert_eq!(
            inj.header("authorization").unwrap_or_default(),
            format!("Bearer {VALUE}").as_bytes()
        );
        // Nothing else the server got holds the value (the allowed host got no injection).
        for r in &reqs {
            if r.target != "/inject" {
                assert!(!contains(&r.all_bytes(), VALUE.as_bytes()), "{r:?}");
            }
        }
        for host in [
            "127.0.0.2",
            "example.invalid",
            &format!("localhost:{port2}"),
        ] {
            assert!(
                o.audited("deny", host),
                "[{}] no deny record for {host}: {}",
                o.who(),
                o.audit()
            );
        }
        assert!(
            o.audited("deny", &format!("localhost:{port}")),
            "[{}] no deny record for the placeholder to the allowed host: {}",
            o.who(),
            o.audit()
        );
        assert!(!s.contains(VALUE), "{}", show(&o, &out));
    }
}

/// Without `--proxy`, `--net proxy` alone still gets the jail a proxy credential: allowed
/// hosts only. `--print-policy` shows the network rule; `--allow-host` without `--net proxy`
/// and a malformed host are refused with a clear message.
#[test]
fn net_proxy_policy_and_options() {
    skip_unless_supported!("net_proxy_policy_and_options");
    let srv = HttpsServer::start();
    let port = srv.port();
    let o = Owner::new("policy", None, &srv);
    let allow = format!("localhost:{port}");
    let out = o.jail(
        &["--net", "proxy", "--allow-host", &allow, "--print-policy"],
        "true",
        port,
    );
    let s = all(&out);
    assert!(out.status.success(), "{s}");
    assert!(s.contains("\"proxy\"") && s.contains(&allow), "{s}");
    let out = o.jail(&["--allow-host", "example.com"], "true", port);
    assert!(!out.status.success());
    assert!(
        all(&out).contains("--allow-host needs --net proxy"),
        "{}",
        all(&out)
    );
    let out = o.jail(
        &["--net", "proxy", "--allow-host", "bad host!"],
        "true",
        port,
    );
    assert!(!out.status.success());
    assert!(
        all(&out).contains("--allow-host bad host!"),
        "{}",
        all(&out)
    );
    let out = o.jail(&["--net", "wide"], "true", port);
    assert!(!out.status.success());
    assert!(all(&out).contains("--net wide"), "{}", all(&out));
    // --net proxy without --proxy: the allowed host is reached, the service's is refused
    // (no placeholder was asked for, so its host is just another host here).
    let script = r#"
        curl -sS -o /dev/null -w 'allowed=%{http_code}\n' "https://localhost:$PORT/a"
        curl -sS -o /dev/null "https://127.0.0.1:$PORT/b" 2>/dev/null; echo "service_exit=$?"
    "#;
    let out = o.jail(&["--net", "proxy", "--allow-host", &allow], script, port);
    let s = all(&out);
    assert!(s.contains("allowed=200"), "{s}");
    assert!(!s.contains("service_exit=0"), "{s}");
}

/// Without network namespaces (`user.max_net_namespaces=0` in a user namespace of the test's
/// own) `--net proxy` refuses, naming the step, exit 70; it never runs with the host's network.
#[test]
fn net_proxy_refuses_without_network_namespaces() {
    skip_unless_supported!("net_proxy_refuses_without_network_namespaces");
    let srv = HttpsServer::start();
    for o in owners("nonet", &srv) {
        let jail = bin("agentkeys");
        let script = format!(
            "echo 0 > /proc/sys/user/max_net_namespaces || exit 99; \
             {} jail --agent a --net proxy -- sh -c 'echo RAN'; echo \"exit=$?\"",
            jail.display()
        );
        let out = o
            .command("unshare", &["-U", "-r", "sh", "-c", &script])
            .output()
            .unwrap();
        let s = all(&out);
        if out.status.code() == Some(99) {
            println!("SKIP net_proxy_refuses_without_network_namespaces: cannot set the sysctl");
            continue;
        }
        println!("{}", show(&o, &out));
        assert!(!s.contains("RAN"), "{}", show(&o, &out));
        assert!(s.contains("exit=70"), "{}", show(&o, &out));
        assert!(
            s.contains("network namespaces (--net proxy)"),
            "{}",
            show(&o, &out)
        );
    }
}
