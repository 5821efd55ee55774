//! Where a placeholder may be replaced by its value: the substitution rules, as pure functions
//! over a request's parts, so each rule has a unit test and the server only applies the verdict.
//!
//! A placeholder is replaced only when the request goes over a decrypted TLS connection to a
//! host its service's policy names, and only in an allowed place: the `Authorization` header
//! with the `Bearer`, `token` or `Basic` scheme (Basic decoded, so `git` with the token as its
//! password works), a header the policy names, or a query parameter the policy names. Seen
//! anywhere else the request is refused: in the path, a query parameter not named, a header not
//! named, a request to another host, a plain-http request. Placeholders are looked for in the
//! raw text and after percent-decoding (so `%61kph_...` does not slip through the URL check).

use base64::Engine;
use hyper::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use zeroize::Zeroizing;

use agentkeys_state::inject::HostPattern;

use crate::link::PlaceholderSpec;

/// The prefix of every placeholder (followed by 32 lowercase hex digits).
pub const PLACEHOLDER_PREFIX: &str = "akph_";

/// A new random placeholder: [`PLACEHOLDER_PREFIX`] and 128 random bits in hex.
///
/// # Errors
/// The kernel's random source failed.
pub fn new_placeholder() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)?;
    Ok(format!(
        "{PLACEHOLDER_PREFIX}{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// A registration's placeholders with their parsed host patterns.
pub struct Rules {
    specs: Vec<PlaceholderSpec>,
    hosts: Vec<Vec<HostPattern>>,
}

/// Where a placeholder was found in an allowed place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A header (lowercase name), `authorization` included.
    Header(String),
    /// A query parameter.
    Query(String),
}

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No placeholder in it: forward unchanged.
    Pass,
    /// Placeholders in allowed places: ask for these (distinct, ascending indices) and substitute.
    Inject(Vec<usize>),
    /// A placeholder where it may not go: 403 with this reason, audited `deny`.
    Refuse {
        /// The placeholder seen.
        index: usize,
        /// Why, for the client and the audit record.
        reason: String,
    },
}

impl Rules {
    /// Parses each spec's hosts (a host that does not parse matches nothing).
    pub fn new(specs: Vec<PlaceholderSpec>) -> Rules {
        let hosts = specs
            .iter()
            .map(|s| {
                s.hosts
                    .iter()
                    .filter_map(|h| HostPattern::parse(h).ok())
                    .collect()
            })
            .collect();
        Rules { specs, hosts }
    }

    /// The specs.
    pub fn specs(&self) -> &[PlaceholderSpec] {
        &self.specs
    }

    /// Whether any placeholder may be injected into `host:port`: then the proxy decrypts the
    /// connection; otherwise it tunnels it untouched.
    pub fn injects_into(&self, host: &str, port: u16) -> bool {
        self.hosts
            .iter()
            .any(|hs| hs.iter().any(|h| h.matches(host, port)))
    }

    fn host_ok(&self, i: usize, host: &str, port: u16) -> bool {
        self.hosts[i].iter().any(|h| h.matches(host, port))
    }

    /// Which placeholders occur in `text`.
    fn found_in<'a>(&'a self, text: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
        self.specs
            .iter()
            .enumerate()
            .filter(move |(_, s)| contains(text, s.placeholder.as_bytes()))
            .map(|(i, _)| i)
    }

    /// The verdict on a request to `host:port`; `tls`: over a decrypted TLS connection (a plain
    /// http request never gets a value).
    pub fn examine(
        &self,
        host: &str,
        port: u16,
        tls: bool,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Verdict {
        let mut want: Vec<usize> = Vec::new();
        let refuse = |index: usize, what: String| Verdict::Refuse {
            index,
            reason: format!(
                "the placeholder in {} of {} may not be sent {what}",
                self.specs[index].var, self.specs[index].service
            ),
        };
        // Where the request goes is checked first: wrong host or no TLS refuses any use.
        let place_ok = |i: usize| -> Result<(), String> {
            if !tls {
                return Err("over plain http (only https requests get values)".into());
            }
            if !self.host_ok(i, host, port) {
                return Err(format!(
                    "to {} (not a host its policy names)",
                    shown_host(host, port)
                ));
            }
            Ok(())
        };
        // The URL path: never a place for a credential.
        let path = uri.path().as_bytes();
        let decoded_path = percent_decode(path);
        if let Some(i) = self
            .found_in(path)
            .chain(self.found_in(&decoded_path))
            .next()
        {
            return refuse(i, "in the URL path".into());
        }
        // The query: only in parameters the policy names.
        if let Some(q) = uri.query() {
            for pair in q.split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let dk = form_decode(k.as_bytes());
                let dv = form_decode(v.as_bytes());
                if let Some(i) = self.found_in(&dk).next() {
                    return refuse(i, "as a query parameter name".into());
                }
                for i in self.found_in(&dv).collect::<Vec<_>>() {
                    let key = String::from_utf8_lossy(&dk);
                    if !self.specs[i].query.iter().any(|n| *n == key) {
                        return refuse(
                            i,
                            format!(
                                "in the query parameter {:?} (its policy does not name it)",
                                trunc(&key)
                            ),
                        );
                    }
                    if let Err(e) = place_ok(i) {
                        return refuse(i, e);
                    }
                    want.push(i);
                }
            }
        }
        // Headers: Authorization (Bearer, token, Basic) and the names the policy gives.
        for (name, value) in headers {
            let raw = value.as_bytes();
            let mut seen: Vec<usize> = self.found_in(raw).collect();
            let basic = basic_payload(name, raw);
            if let Some(decoded) = &basic {
                seen.extend(self.found_in(decoded));
            }
            seen.extend(self.found_in(&percent_decode(raw)));
            seen.sort_unstable();
            seen.dedup();
            for i in seen {
                let n = name.as_str();
                let allowed = if n == "authorization" {
                    auth_scheme_ok(raw)
                } else {
                    self.specs[i].headers.iter().any(|h| h == n)
                };
                if !allowed {
                    let what = if n == "authorization" {
                        "in the Authorization header with that scheme (Bearer, token or Basic only)"
                            .to_string()
                    } else {
                        format!("in the {n} header (its policy does not name it)")
                    };
                    return refuse(i, what);
                }
                if let Err(e) = place_ok(i) {
                    return refuse(i, e);
                }
                want.push(i);
            }
        }
        want.sort_unstable();
        want.dedup();
        if want.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Inject(want)
        }
    }

    /// Replaces every placeholder in `values` (index, value) in the request's headers and query.
    /// The new header values are built in zeroizing buffers; the `http` types copy them.
    ///
    /// # Errors
    /// A value that cannot be placed (bytes a header or URL cannot carry), in words.
    pub fn substitute(
        &self,
        values: &[(usize, &[u8])],
        uri: &mut Uri,
        headers: &mut HeaderMap,
    ) -> Result<(), &'static str> {
        let mut replaced: Vec<(HeaderName, HeaderValue)> = Vec::new();
        for (name, value) in headers.iter() {
            let raw = value.as_bytes();
            let basic = basic_payload(name, raw);
            let hits_raw = values
                .iter()
                .any(|(i, _)| contains(raw, self.specs[*i].placeholder.as_bytes()));
            let hits_basic = basic.as_ref().is_some_and(|d| {
                values
                    .iter()
                    .any(|(i, _)| contains(d, self.specs[*i].placeholder.as_bytes()))
            });
            if !hits_raw && !hits_basic {
                continue;
            }
            let new = if hits_basic && let Some(decoded) = basic {
                let plain = self.replace_all(&decoded, values);
                let enc = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&plain));
                let mut v = Zeroizing::new(Vec::with_capacity(6 + enc.len()));
                v.extend_from_slice(&raw[..6]);
                v.extend_from_slice(enc.as_bytes());
                v
            } else {
                self.replace_all(raw, values)
            };
            let mut hv = HeaderValue::from_bytes(&new)
                .map_err(|_| "the value contains bytes a header cannot carry")?;
            hv.set_sensitive(true);
            replaced.push((name.clone(), hv));
        }
        for (name, hv) in replaced {
            headers.insert(name, hv);
        }
        if let Some(q) = uri.query() {
            let hit = values
                .iter()
                .any(|(i, _)| contains(q.as_bytes(), self.specs[*i].placeholder.as_bytes()))
                || values.iter().any(|(i, _)| {
                    contains(
                        &form_decode(q.as_bytes()),
                        self.specs[*i].placeholder.as_bytes(),
                    )
                });
            if hit {
                let mut out = Zeroizing::new(String::with_capacity(q.len() + 64));
                for (n, pair) in q.split('&').enumerate() {
                    if n > 0 {
                        out.push('&');
                    }
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let dv = form_decode(v.as_bytes());
                    if values
                        .iter()
                        .any(|(i, _)| contains(&dv, self.specs[*i].placeholder.as_bytes()))
                    {
                        let plain = self.replace_all(&dv, values);
                        out.push_str(k);
                        out.push('=');
                        percent_encode_into(&plain, &mut out);
                    } else {
                        out.push_str(pair);
                    }
                }
                let mut pq = Zeroizing::new(String::with_capacity(out.len() + 256));
                pq.push_str(uri.path());
                pq.push('?');
                pq.push_str(&out);
                let mut parts = std::mem::take(uri).into_parts();
                parts.path_and_query = Some(
                    pq.parse()
                        .map_err(|_| "the value cannot be placed in the URL")?,
                );
                *uri =
                    Uri::from_parts(parts).map_err(|_| "the value cannot be placed in the URL")?;
            }
        }
        Ok(())
    }

    fn replace_all(&self, text: &[u8], values: &[(usize, &[u8])]) -> Zeroizing<Vec<u8>> {
        let extra: usize = values.iter().map(|(_, v)| v.len()).sum::<usize>() * 4;
        let mut out = Zeroizing::new(Vec::with_capacity(text.len() + extra));
        let mut i = 0;
        'outer: while i < text.len() {
            for (idx, v) in values {
                let ph = self.specs[*idx].placeholder.as_bytes();
                if text[i..].starts_with(ph) {
                    // Never reallocate a buffer that holds a value (capacity reserved above);
                    // a pathological header with many placeholders just fails to grow cleanly.
                    if out.len() + v.len() > out.capacity() {
                        break 'outer;
                    }
                    out.extend_from_slice(v);
                    i += ph.len();
                    continue 'outer;
                }
            }
            if out.len() == out.capacity() {
                break;
            }
            out.push(text[i]);
            i += 1;
        }
        out
    }
}

/// `host` or `host:port` for messages (port 443 left out).
pub fn shown_host(host: &str, port: u16) -> String {
    let h = trunc(host);
    if port == 443 {
        h
    } else {
        format!("{h}:{port}")
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// `Authorization: Basic <b64>`: the decoded `user:password` (zeroizing), else `None`.
fn basic_payload(name: &HeaderName, raw: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if name.as_str() != "authorization"
        || raw.len() < 6
        || !raw[..6].eq_ignore_ascii_case(b"basic ")
    {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(raw[6..].trim_ascii())
        .ok()
        .map(Zeroizing::new)
}

/// The Authorization schemes a placeholder may travel in.
fn auth_scheme_ok(raw: &[u8]) -> bool {
    let scheme = raw.split(|&b| b == b' ').next().unwrap_or(b"");
    [&b"bearer"[..], b"token", b"basic"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `%XX` decoded (invalid escapes kept as they are).
pub fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && i + 2 < s.len()
            && let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Form decoding of a query part: `+` is a space, then `%XX`.
fn form_decode(s: &[u8]) -> Vec<u8> {
    let plus: Vec<u8> = s
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&plus)
}

pub(crate) fn percent_encode_into(b: &[u8], out: &mut String) {
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(c >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(c & 15)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PH: &str = "akph_00112233445566778899aabbccddeeff";
    const PH2: &str = "akph_ffeeddccbbaa99887766554433221100";

    fn rules() -> Rules {
        Rules::new(vec![
            PlaceholderSpec {
                placeholder: PH.into(),
                var: "GH".into(),
                service: "github".into(),
                hosts: vec!["api.github.com".into(), "127.0.0.1:8443".into()],
                headers: vec!["x-api-key".into()],
                query: vec!["access_token".into()],
                cache_ttl_secs: 0,
            },
            PlaceholderSpec {
                placeholder: PH2.into(),
                var: "OTHER".into(),
                service: "other".into(),
                hosts: vec!["other.example".into()],
                headers: vec![],
                query: vec![],
                cache_ttl_secs: 0,
            },
        ])
    }

    fn req(uri: &str, headers: &[(&str, String)]) -> (Uri, HeaderMap) {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        (uri.parse().unwrap(), h)
    }

    fn verdict(host: &str, uri: &str, headers: &[(&str, String)]) -> Verdict {
        let (u, h) = req(uri, headers);
        rules().examine(host, 443, true, &u, &h)
    }

    fn refused(v: Verdict) -> String {
        match v {
            Verdict::Refuse { reason, .. } => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn allowed_places_inject() {
        for (name, value) in [
            ("authorization", format!("Bearer {PH}")),
            ("authorization", format!("token {PH}")),
            (
                "authorization",
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("x-access-token:{PH}"))
                ),
            ),
            ("x-api-key", PH.to_string()),
        ] {
            assert_eq!(
                verdict("api.github.com", "/user", &[(name, value.clone())]),
                Verdict::Inject(vec![0]),
                "{name}: {value}"
            );
        }
        assert_eq!(
            verdict("api.github.com", &format!("/x?a=1&access_token={PH}"), &[]),
            Verdict::Inject(vec![0])
        );
        assert_eq!(verdict("api.github.com", "/user", &[]), Verdict::Pass);
    }

    #[test]
    fn other_places_and_hosts_refuse() {
        let bearer = [("authorization", format!("Bearer {PH}"))];
        assert!(refused(verdict("evil.example", "/", &bearer)).contains("evil.example"));
        assert!(refused(verdict("api.github.com", &format!("/{PH}"), &[])).contains("URL path"));
        let enc: String = PH.bytes().map(|b| format!("%{b:02X}")).collect();
        assert!(refused(verdict("api.github.com", &format!("/{enc}"), &[])).contains("URL path"));
        assert!(refused(verdict("api.github.com", &format!("/?q={PH}"), &[])).contains("\"q\""));
        assert!(
            refused(verdict("api.github.com", &format!("/?{PH}=1"), &[]))
                .contains("parameter name")
        );
        assert!(
            refused(verdict(
                "api.github.com",
                "/",
                &[("x-other", PH.to_string())]
            ))
            .contains("x-other")
        );
        assert!(
            refused(verdict(
                "api.github.com",
                "/",
                &[("authorization", format!("Digest {PH}"))]
            ))
            .contains("scheme")
        );
        // Another service's placeholder on this host: its own policy does not name the host.
        let other = [("authorization", format!("Bearer {PH2}"))];
        assert!(refused(verdict("api.github.com", "/", &other)).contains("OTHER"));
        // Wrong port, plain http.
        let (u, h) = req("/", &bearer);
        assert!(matches!(
            rules().examine("127.0.0.1", 9443, true, &u, &h),
            Verdict::Refuse { .. }
        ));
        assert!(matches!(
            rules().examine("127.0.0.1", 8443, true, &u, &h),
            Verdict::Inject(_)
        ));
        assert!(
            refused(rules().examine("api.github.com", 443, false, &u, &h)).contains("plain http")
        );
    }

    #[test]
    fn split_placeholders_are_neither_injected_nor_leak_anything() {
        let (a, b) = PH.split_at(10);
        assert_eq!(
            verdict(
                "api.github.com",
                "/",
                &[("x-api-key", a.into()), ("x-api-key", b.into())]
            ),
            Verdict::Pass
        );
    }

    #[test]
    fn substitution_replaces_in_headers_basic_and_query() {
        let r = rules();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("git:{PH}"));
        let (mut u, mut h) = req(
            &format!("/p?x=1&access_token={PH}"),
            &[
                ("authorization", format!("Basic {basic}")),
                ("x-api-key", format!("k {PH}")),
                ("accept", "*/*".into()),
            ],
        );
        r.substitute(&[(0, b"s3cr et/+")], &mut u, &mut h).unwrap();
        let auth = h["authorization"].to_str().unwrap();
        let dec = base64::engine::general_purpose::STANDARD
            .decode(&auth[6..])
            .unwrap();
        assert_eq!(dec, b"git:s3cr et/+");
        assert_eq!(h["x-api-key"], "k s3cr et/+");
        assert_eq!(u.query().unwrap(), "x=1&access_token=s3cr%20et%2F%2B");
        assert!(h["x-api-key"].is_sensitive());
        let (mut u, mut h) = req("/", &[("x-api-key", PH.to_string())]);
        assert!(r.substitute(&[(0, b"a\r\nb")], &mut u, &mut h).is_err());
    }

    #[test]
    fn placeholders_are_random() {
        let a = new_placeholder().unwrap();
        let b = new_placeholder().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), PLACEHOLDER_PREFIX.len() + 32);
    }
}
