//! Where a service's value may go: the delivery kinds a policy allows ([`DeliveryKind`]), and for
//! the credential-injecting proxy the hosts its value may be sent to ([`HostPattern`]) and the
//! header and query-parameter names it may be placed in.
//!
//! These are parsed from the owner's `agentkeys store` flags and from `config.toml`
//! (`[services.X]`), stored in a vault entry's policy (and so authenticated by its AAD), and
//! matched by the daemon and the proxy. Every parser bounds its input and never repeats it in an
//! error message beyond a short, escaped excerpt.

use serde::{Deserialize, Serialize};

use crate::StateError;

/// Most hosts, headers or query parameters one policy may name.
pub const MAX_INJECT_ITEMS: usize = 32;

/// One way a service's value may leave the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryKind {
    /// A secret page's fd (`agentkeys read`, a managed runtime).
    Fd,
    /// The bytes in the answer (`agentkeys read --inline`).
    Inline,
    /// An environment variable of a program the daemon launches (`agentkeys run --env`).
    Env,
    /// A readable file of a program the daemon launches (`agentkeys run --file`).
    File,
    /// Only through the credential-injecting proxy: no agent process ever holds the bytes.
    Proxy,
}

impl DeliveryKind {
    /// Every kind, in display order.
    pub const ALL: [DeliveryKind; 5] = [
        DeliveryKind::Fd,
        DeliveryKind::Inline,
        DeliveryKind::Env,
        DeliveryKind::File,
        DeliveryKind::Proxy,
    ];

    /// The kind's name (as in `--deliver` and `deliver = [...]`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryKind::Fd => "fd",
            DeliveryKind::Inline => "inline",
            DeliveryKind::Env => "env",
            DeliveryKind::File => "file",
            DeliveryKind::Proxy => "proxy",
        }
    }

    /// Parses a kind's name.
    ///
    /// # Errors
    /// [`StateError::InvalidPolicy`] naming the allowed words.
    pub fn parse(s: &str) -> Result<DeliveryKind, StateError> {
        DeliveryKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| invalid("a delivery kind is one of fd, inline, env, file, proxy"))
    }
}

fn invalid(detail: impl Into<String>) -> StateError {
    StateError::InvalidPolicy {
        detail: detail.into(),
    }
}

/// A short, printable excerpt of rejected input, for an error message.
fn excerpt(s: &str) -> String {
    let cut: String = s.chars().take(40).collect();
    format!("{:?}", cut)
}

/// A host the proxy may send a service's value to: an exact name, `*.` plus a name (exactly one
/// more label in front of it), or an IP literal (`127.0.0.1`, `[::1]`); with an optional port
/// (without one: 443 only). Stored and compared in lowercase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    /// `true` for `*.name`.
    wildcard: bool,
    /// The name (after `*.`), lowercase, without brackets for IPv6.
    name: String,
    /// The port (443 when the pattern gives none).
    port: u16,
}

/// Longest DNS name.
const MAX_HOST_LEN: usize = 253;

impl HostPattern {
    /// Parses `api.github.com`, `*.githubusercontent.com`, `127.0.0.1:8443`, `[::1]:8443`.
    ///
    /// # Errors
    /// [`StateError::InvalidPolicy`] saying which rule the pattern breaks.
    pub fn parse(s: &str) -> Result<HostPattern, StateError> {
        if s.is_empty() || s.len() > MAX_HOST_LEN + 8 {
            return Err(invalid(
                "an inject host is 1 to 253 characters, plus a port",
            ));
        }
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, s),
        };
        let (host, port) = split_host_port(rest)
            .ok_or_else(|| invalid(format!("inject host {}: bad port", excerpt(s))))?;
        let name = host.to_ascii_lowercase();
        let is_ip = name.parse::<std::net::IpAddr>().is_ok();
        if is_ip {
            if wildcard {
                return Err(invalid(format!(
                    "inject host {}: no wildcard on an IP address",
                    excerpt(s)
                )));
            }
        } else if !valid_dns_name(&name) {
            return Err(invalid(format!(
                "inject host {}: a host name is labels of a-z, 0-9 and -, separated by dots",
                excerpt(s)
            )));
        } else if wildcard && !name.contains('.') {
            return Err(invalid(format!(
                "inject host {}: a wildcard needs at least two labels after `*.`",
                excerpt(s)
            )));
        }
        Ok(HostPattern {
            wildcard,
            name,
            port: port.unwrap_or(443),
        })
    }

    /// Whether a request's host (the TLS server name, `Host`, `:authority`) and port match.
    /// `host` is compared in lowercase, without a trailing dot.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if port != self.port {
            return false;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if self.wildcard {
            // Exactly one label in front: `*.example.com` matches `a.example.com`, not
            // `example.com` or `a.b.example.com`.
            match host.strip_suffix(self.name.as_str()) {
                Some(front) => {
                    front.len() >= 2
                        && front.ends_with('.')
                        && !front[..front.len() - 1].contains('.')
                        && valid_label(&front[..front.len() - 1])
                }
                None => false,
            }
        } else {
            host == self.name
        }
    }

    /// The pattern as the owner wrote it (normalised).
    pub fn to_text(&self) -> String {
        let host = if self.name.contains(':') {
            format!("[{}]", self.name)
        } else {
            self.name.clone()
        };
        let star = if self.wildcard { "*." } else { "" };
        if self.port == 443 {
            format!("{star}{host}")
        } else {
            format!("{star}{host}:{}", self.port)
        }
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`. `None` for a bad port or bracket.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        if after.is_empty() {
            return Some((h, None));
        }
        let p = after.strip_prefix(':')?;
        return Some((h, Some(parse_port(p)?)));
    }
    match s.rsplit_once(':') {
        // A bare IPv6 address without brackets has several colons: not a port.
        Some((h, p)) if !h.contains(':') => Some((h, Some(parse_port(p)?))),
        Some(_) => Some((s, None)),
        None => Some((s, None)),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n != 0)
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

fn valid_dns_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= MAX_HOST_LEN && n.split('.').all(valid_label)
}

/// Checks a header name the value may be placed in (`x-api-key`): an HTTP token of at most 64
/// characters; returns it in lowercase. `authorization` is always allowed and need not be named.
///
/// # Errors
/// [`StateError::InvalidPolicy`].
pub fn parse_header_name(s: &str) -> Result<String, StateError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if !ok {
        return Err(invalid(format!(
            "inject header {}: 1 to 64 of A-Z a-z 0-9 - _",
            excerpt(s)
        )));
    }
    let lower = s.to_ascii_lowercase();
    // Headers that decide where or how a request goes are never a place for a credential.
    if matches!(
        lower.as_str(),
        "host" | "content-length" | "transfer-encoding" | "connection" | "upgrade" | "te"
    ) || lower.starts_with("proxy-")
    {
        return Err(invalid(format!(
            "inject header {}: that header cannot carry a credential",
            excerpt(s)
        )));
    }
    Ok(lower)
}

/// Checks a query parameter name the value may be placed in: 1 to 64 of `A-Z a-z 0-9 . _ -`.
///
/// # Errors
/// [`StateError::InvalidPolicy`].
pub fn parse_query_name(s: &str) -> Result<String, StateError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(invalid(format!(
            "inject query parameter {}: 1 to 64 of A-Z a-z 0-9 . _ -",
            excerpt(s)
        )));
    }
    Ok(s.to_string())
}

/// A policy's proxy part, normalised: hosts, headers, query parameters, delivery kinds.
pub type Normalised = (
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Option<Vec<DeliveryKind>>,
);

/// Checks the proxy part of a policy and returns it normalised: every host parsed, header names
/// lowercase, no duplicates, at most [`MAX_INJECT_ITEMS`] of each; `proxy` delivery needs at
/// least one host.
///
/// # Errors
/// [`StateError::InvalidPolicy`] naming the first problem.
pub fn normalise(
    hosts: &[String],
    headers: &[String],
    query: &[String],
    deliver: Option<&[DeliveryKind]>,
) -> Result<Normalised, StateError> {
    for (what, list) in [("hosts", hosts), ("headers", headers), ("query", query)] {
        if list.len() > MAX_INJECT_ITEMS {
            return Err(invalid(format!(
                "at most {MAX_INJECT_ITEMS} inject {what} per service"
            )));
        }
    }
    let mut h: Vec<String> = Vec::new();
    for s in hosts {
        let t = HostPattern::parse(s)?.to_text();
        if !h.contains(&t) {
            h.push(t);
        }
    }
    let mut hd: Vec<String> = Vec::new();
    for s in headers {
        let t = parse_header_name(s)?;
        if t != "authorization" && !hd.contains(&t) {
            hd.push(t);
        }
    }
    let mut q: Vec<String> = Vec::new();
    for s in query {
        let t = parse_query_name(s)?;
        if !q.contains(&t) {
            q.push(t);
        }
    }
    let d = match deliver {
        None => None,
        Some(kinds) => {
            let mut v: Vec<DeliveryKind> = kinds.to_vec();
            v.sort();
            v.dedup();
            if v.is_empty() {
                return Err(invalid("--deliver needs at least one kind"));
            }
            if v.contains(&DeliveryKind::Proxy) && h.is_empty() {
                return Err(invalid(
                    "proxy delivery needs at least one inject host (--inject-host)",
                ));
            }
            Some(v)
        }
    };
    if (!hd.is_empty() || !q.is_empty()) && h.is_empty() {
        return Err(invalid(
            "inject headers and query parameters need at least one inject host",
        ));
    }
    Ok((h, hd, q, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_parse_and_match() {
        let p = HostPattern::parse("API.GitHub.com").unwrap();
        assert!(p.matches("api.github.com", 443));
        assert!(p.matches("api.github.com.", 443));
        assert!(!p.matches("api.github.com", 8443));
        assert!(!p.matches("github.com", 443));
        assert!(!p.matches("xapi.github.com", 443));
        let w = HostPattern::parse("*.example.com").unwrap();
        assert!(w.matches("a.example.com", 443));
        assert!(!w.matches("example.com", 443));
        assert!(!w.matches("a.b.example.com", 443));
        assert!(!w.matches(".example.com", 443));
        assert!(!w.matches("aexample.com", 443));
        let ip = HostPattern::parse("127.0.0.1:8443").unwrap();
        assert!(ip.matches("127.0.0.1", 8443));
        assert!(!ip.matches("127.0.0.2", 8443));
        assert!(!ip.matches("localhost", 8443));
        let v6 = HostPattern::parse("[::1]:9").unwrap();
        assert!(v6.matches("[::1]", 9));
        assert_eq!(v6.to_text(), "[::1]:9");
        assert_eq!(w.to_text(), "*.example.com");
        for bad in [
            "",
            "*.com",
            "*.1.2.3.4",
            "a..b",
            "-a.com",
            "a.com:0",
            "a.com:99999",
            "a.com:x",
            "a b.com",
            "*.*.a.com",
            "a.com/x",
            "ä.com",
            "[::1",
            "a.com:",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    /// Red team (tests/proxy_redteam.rs has the end-to-end part): names built to look like an
    /// allowed host to a careless matcher.
    #[test]
    fn host_patterns_resist_lookalikes() {
        let w = HostPattern::parse("*.github.com").unwrap();
        let exact = HostPattern::parse("github.com").unwrap();
        for evil in [
            "evil.github.com.attacker.net",
            "github.com.attacker.net",
            "attacker-github.com",
            "attackergithub.com",
            "a.b.github.com",
            "a..github.com",
            ".github.com",
            "evil.github.com\0.attacker.net",
            "evil.github.com:443",
            "evil.github.com/x",
            "evil.github.com@attacker.net",
            "xn--github-8ya.com",
        ] {
            assert!(!w.matches(evil, 443), "{evil}");
            assert!(!exact.matches(evil, 443), "{evil}");
        }
        // Case and one trailing dot are the same name; another port is not.
        assert!(w.matches("EVIL.GitHub.COM", 443));
        assert!(w.matches("evil.github.com.", 443));
        assert!(!w.matches("evil.github.com", 8443));
        assert!(exact.matches("GITHUB.COM.", 443));
        assert!(!exact.matches("github.com", 80));
        // IP literals: only the exact address, no other spelling of it.
        let ip = HostPattern::parse("127.0.0.1:8443").unwrap();
        for other in [
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "::ffff:127.0.0.1",
            "127.0.0.1.nip.io",
        ] {
            assert!(!ip.matches(other, 8443), "{other}");
        }
        let v6 = HostPattern::parse("[::1]:9").unwrap();
        assert!(v6.matches("::1", 9));
        assert!(!v6.matches("0:0:0:0:0:0:0:1x", 9));
    }

    #[test]
    fn header_and_query_names_are_checked() {
        assert_eq!(parse_header_name("X-Api-Key").unwrap(), "x-api-key");
        for bad in [
            "",
            "a b",
            "host",
            "Proxy-Authorization",
            "a:b",
            "Transfer-Encoding",
        ] {
            assert!(parse_header_name(bad).is_err(), "{bad}");
        }
        assert!(parse_query_name("access_token").is_ok());
        assert!(parse_query_name("a=b").is_err());
    }

    #[test]
    fn normalise_needs_hosts_for_proxy_and_dedups() {
        let (h, hd, q, d) = normalise(
            &["a.com".into(), "A.com".into()],
            &["Authorization".into(), "X-K".into()],
            &[],
            Some(&[DeliveryKind::Proxy, DeliveryKind::Proxy]),
        )
        .unwrap();
        assert_eq!(h, ["a.com"]);
        assert_eq!(hd, ["x-k"]);
        assert!(q.is_empty());
        assert_eq!(d, Some(vec![DeliveryKind::Proxy]));
        assert!(normalise(&[], &[], &[], Some(&[DeliveryKind::Proxy])).is_err());
        assert!(normalise(&[], &["x-k".into()], &[], None).is_err());
        assert!(normalise(&[], &[], &[], Some(&[])).is_err());
    }
}
