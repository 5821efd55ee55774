//! What an OpenBao / Vault server answers, parsed without a network: login and renewal
//! (`auth`), `lookup-self`, a KV v2 read, an error list; and the token arithmetic built on the
//! numbers in them. The backend calls these on every answer; the `backend_answer` fuzz target
//! and the property tests below call them with whatever bytes and numbers they like.
//!
//! Every number a server sends is bounded before use: a TTL above [`MAX_TOKEN_TTL`] is taken
//! as that maximum, and instants are computed with checked arithmetic, so no answer can
//! overflow `Instant + Duration` (a panic, which aborts the release build: before this, a
//! `lease_duration` of 2^63 killed the daemon at start-up, a crash loop under `Restart=`).
//! Error messages never quote a value or a token: they name the answer, a position, a field
//! name (bounded and cleaned) or a JSON kind.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

/// The longest token TTL the daemon believes: 32 days, Vault's and OpenBao's default system
/// max TTL (768 h). A longer TTL is taken as this one: the daemon renews or logs in sooner than
/// it had to, never later, and no instant it computes can overflow.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(768 * 3600);
/// Shortest time between two renewals, however short the TTL.
pub const MIN_REFRESH: Duration = Duration::from_millis(200);
/// Longest token accepted from a server (it is sent back in a header on every request).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Most field names an error lists, and the most characters shown of each.
const MAX_NAMES: usize = 20;
const MAX_NAME_CHARS: usize = 64;

/// An answer that is not what the API promises. Never quotes a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// Not JSON, or JSON of the wrong shape (a number where a string belongs, a negative or
    /// fractional TTL, ...).
    #[error(
        "the {what} answer is not valid JSON of the expected shape (line {line}, column {column})"
    )]
    Malformed {
        /// Which answer (`auth`, `lookup-self`, `KV`).
        what: &'static str,
        /// Where the parser stopped.
        line: usize,
        /// Where the parser stopped.
        column: usize,
    },
    /// A section the answer must have is missing.
    #[error("the {what} answer has no {section}")]
    Missing {
        /// Which answer.
        what: &'static str,
        /// Which section.
        section: &'static str,
    },
    /// The token is empty, too long, or not visible ASCII (it must fit a header).
    #[error(
        "the auth answer's token is empty, longer than {MAX_TOKEN_LEN} bytes, or not visible ASCII"
    )]
    BadToken,
    /// The KV answer has `data` but no `data.data`: a KV version 1 mount.
    #[error("the answer has no data.data (a KV version 1 mount?)")]
    NotKv2,
    /// The secret's version is deleted or destroyed (`data.data` is null).
    #[error("the secret's current version is deleted or destroyed")]
    Deleted,
    /// The field exists but is not a string.
    #[error("field {field:?} is {kind}, not a string")]
    FieldType {
        /// The field asked for.
        field: String,
        /// The JSON kind it has.
        kind: &'static str,
    },
    /// No such field; the names there are (at most 20, each cleaned and cut to 64 characters).
    #[error("no field {field:?} (fields: {names})")]
    NoField {
        /// The field asked for.
        field: String,
        /// The fields the secret has, or `none`.
        names: String,
    },
}

fn malformed(what: &'static str, e: &serde_json::Error) -> AnswerError {
    AnswerError::Malformed {
        what,
        line: e.line(),
        column: e.column(),
    }
}

/// A token's lifetime as a server states it, bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The TTL, at most [`MAX_TOKEN_TTL`]; zero: the token does not expire.
    pub ttl: Duration,
    /// The token can be renewed.
    pub renewable: bool,
    /// The server stated a TTL above [`MAX_TOKEN_TTL`] (logged at debug level).
    pub clamped: bool,
}

impl Lease {
    /// A lease of `secs` seconds as a server sent it: anything above [`MAX_TOKEN_TTL`] is
    /// [`MAX_TOKEN_TTL`].
    pub fn from_secs(secs: u64, renewable: bool) -> Lease {
        let clamped = secs > MAX_TOKEN_TTL.as_secs();
        Lease {
            ttl: Duration::from_secs(secs.min(MAX_TOKEN_TTL.as_secs())),
            renewable,
            clamped,
        }
    }
}

/// When a token expires and when the refresher acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTimes {
    /// None: the token does not expire.
    pub expires: Option<Instant>,
    /// None: nothing to refresh.
    pub refresh_at: Option<Instant>,
}

/// The expiry and refresh time of a token granted `ttl` at `now`. A zero TTL is a token
/// without expiry. Otherwise the refresher acts at two thirds of the TTL, at least
/// [`MIN_REFRESH`] after `now` and never after the expiry. Any `ttl` is accepted: above
/// [`MAX_TOKEN_TTL`] it is that maximum, and an instant that cannot be represented is taken as
/// `now` (the token is replaced at once, within the login rate limit) rather than panicking.
pub fn token_times(ttl: Duration, now: Instant) -> TokenTimes {
    if ttl.is_zero() {
        return TokenTimes {
            expires: None,
            refresh_at: None,
        };
    }
    let ttl = ttl.min(MAX_TOKEN_TTL);
    // `ttl - ttl / 3` is two thirds without the overflow of `ttl * 2`.
    let refresh = (ttl - ttl / 3).max(MIN_REFRESH).min(ttl);
    TokenTimes {
        expires: Some(now.checked_add(ttl).unwrap_or(now)),
        refresh_at: Some(now.checked_add(refresh).unwrap_or(now)),
    }
}

/// The `increment` a renewal asks for: the TTL granted at login, in whole seconds, bounded.
pub fn renew_increment(login_ttl: Duration) -> Vec<u8> {
    format!(
        "{{\"increment\":\"{}s\"}}",
        login_ttl.min(MAX_TOKEN_TTL).as_secs()
    )
    .into_bytes()
}

#[derive(Deserialize)]
struct AuthAnswer {
    auth: Option<AuthBody>,
}

#[derive(Deserialize)]
struct AuthBody {
    client_token: SecretString,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

/// A login or renewal answer (`/v1/auth/.../login`, `renew-self`): the token and its lease.
///
/// # Errors
/// [`AnswerError`]: not the expected JSON (a TTL that is negative, fractional or beyond u64
/// included), no `auth`, a token that is empty, over [`MAX_TOKEN_LEN`] or not visible ASCII.
pub fn parse_auth_answer(body: &[u8]) -> Result<(SecretString, Lease), AnswerError> {
    let parsed: AuthAnswer = serde_json::from_slice(body).map_err(|e| malformed("auth", &e))?;
    let auth = parsed.auth.ok_or(AnswerError::Missing {
        what: "auth",
        section: "auth section",
    })?;
    let t = auth.client_token.expose_secret();
    if t.is_empty() || t.len() > MAX_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AnswerError::BadToken);
    }
    Ok((
        auth.client_token,
        Lease::from_secs(auth.lease_duration, auth.renewable),
    ))
}

#[derive(Deserialize)]
struct LookupAnswer {
    data: Option<LookupBody>,
}

#[derive(Deserialize)]
struct LookupBody {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

/// A `lookup-self` answer: the token's remaining TTL and whether it is renewable.
///
/// # Errors
/// [`AnswerError`]: not the expected JSON, no `data`.
pub fn parse_lookup_answer(body: &[u8]) -> Result<Lease, AnswerError> {
    let parsed: LookupAnswer =
        serde_json::from_slice(body).map_err(|e| malformed("lookup-self", &e))?;
    let data = parsed.data.ok_or(AnswerError::Missing {
        what: "lookup-self",
        section: "data",
    })?;
    Ok(Lease::from_secs(data.ttl, data.renewable))
}

#[derive(Deserialize)]
struct KvAnswer {
    data: Option<KvData>,
}

#[derive(Deserialize)]
struct KvData {
    /// Absent in a KV v1 answer; null for a deleted or destroyed version.
    #[serde(default, deserialize_with = "present_or_null")]
    data: Option<Option<serde_json::Map<String, serde_json::Value>>>,
}

/// Tells a present `null` (Some(None)) from an absent field (None, via `default`).
fn present_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<serde_json::Map<String, serde_json::Value>>>, D::Error> {
    Option::deserialize(d).map(Some)
}

/// Extracts string field `field` of a KV v2 read answer into a zeroizing buffer. The parsed
/// document's other strings are freed (and wiped by the daemon's allocator) on return.
///
/// # Errors
/// [`AnswerError`]: not the expected JSON, no `data`, a KV v1 answer, a deleted version, no
/// such field, a field that is not a string.
pub fn parse_kv_field(body: &[u8], field: &str) -> Result<Zeroizing<Vec<u8>>, AnswerError> {
    let answer: KvAnswer = serde_json::from_slice(body).map_err(|e| malformed("KV", &e))?;
    let mut map = match answer.data.map(|d| d.data) {
        Some(Some(Some(map))) => map,
        Some(Some(None)) => return Err(AnswerError::Deleted),
        Some(None) => return Err(AnswerError::NotKv2),
        None => {
            return Err(AnswerError::Missing {
                what: "KV",
                section: "data",
            });
        }
    };
    match map.remove(field) {
        Some(serde_json::Value::String(s)) => Ok(Zeroizing::new(s.into_bytes())),
        Some(other) => Err(AnswerError::FieldType {
            field: field.to_string(),
            kind: json_kind(&other),
        }),
        None => {
            // Names only (never values), bounded and cleaned: they reach the caller and the log.
            let mut names: Vec<String> = map
                .keys()
                .take(MAX_NAMES)
                .map(|n| clean(n, MAX_NAME_CHARS))
                .collect();
            names.sort_unstable();
            Err(AnswerError::NoField {
                field: field.to_string(),
                names: if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                },
            })
        }
    }
}

#[derive(Deserialize)]
struct ErrorsAnswer {
    #[serde(default)]
    errors: Vec<String>,
}

/// The first non-blank message of an `{"errors": [...]}` answer, without control characters
/// and at most 200 characters (servers do not echo secrets in these, but the length and the
/// characters are ours to bound).
pub fn first_error(body: &[u8]) -> Option<String> {
    let parsed: ErrorsAnswer = serde_json::from_slice(body).ok()?;
    let first = parsed.errors.into_iter().find(|m| !m.trim().is_empty())?;
    Some(clean(&first, 200).trim().to_string())
}

/// At most `max` characters of `s`, control characters replaced by spaces.
fn clean(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect()
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn auth(lease: &str) -> String {
        format!(
            r#"{{"auth":{{"client_token":"s.abc","lease_duration":{lease},"renewable":true}}}}"#
        )
    }

    /// Item 5 of issue 14: a `lease_duration` near 2^63 overflowed `Instant + Duration` and
    /// `Duration * 2` (a panic, i.e. an abort of the release daemon). Now it is clamped.
    #[test]
    fn huge_lease_duration_is_clamped_not_a_panic() {
        let now = Instant::now();
        for secs in [u64::MAX, 1u64 << 63, u64::MAX / 2 + 1, 768 * 3600 + 1] {
            let (_, lease) = parse_auth_answer(auth(&secs.to_string()).as_bytes()).unwrap();
            assert_eq!(lease.ttl, MAX_TOKEN_TTL);
            assert!(lease.clamped && lease.renewable);
            let t = token_times(lease.ttl, now);
            assert_eq!(t.expires, Some(now + MAX_TOKEN_TTL));
            assert!(t.refresh_at.unwrap() < t.expires.unwrap());
        }
        let (_, lease) = parse_auth_answer(auth("3600").as_bytes()).unwrap();
        assert_eq!(
            (lease.ttl, lease.clamped),
            (Duration::from_secs(3600), false)
        );
        let lookup = br#"{"data":{"ttl":18446744073709551615,"renewable":false}}"#;
        assert_eq!(parse_lookup_answer(lookup).unwrap().ttl, MAX_TOKEN_TTL);
        assert_eq!(
            renew_increment(Duration::MAX),
            format!("{{\"increment\":\"{}s\"}}", 768 * 3600).into_bytes()
        );
    }

    /// Numbers that are not a u64 are refused with a position, never quoted.
    #[test]
    fn numbers_that_are_not_a_ttl_are_refused_without_quoting() {
        for bad in [
            "-1",
            "-9223372036854775808",
            "1.5",
            "1e308",
            "1e400",
            "18446744073709551616",
            "\"3600\"",
            "null",
        ] {
            let e = parse_auth_answer(auth(bad).as_bytes()).unwrap_err();
            assert!(
                matches!(e, AnswerError::Malformed { what: "auth", .. }),
                "{bad}: {e}"
            );
            assert!(!e.to_string().contains("s.abc"), "{e}");
        }
        // A token in the wrong place is not quoted either.
        let e = parse_auth_answer(br#"{"auth":{"client_token":5,"lease_duration":"s.tok"}}"#)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s.tok"), "{e}");
    }

    #[test]
    fn tokens_must_fit_a_header() {
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        for bad in ["", "s.a b", "s.\u{e9}", "s.\\n", long.as_str()] {
            let body = format!(r#"{{"auth":{{"client_token":"{bad}"}}}}"#);
            assert_eq!(
                parse_auth_answer(body.as_bytes()).unwrap_err(),
                AnswerError::BadToken,
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_auth_answer(br#"{"auth":null}"#),
            Err(AnswerError::Missing { .. })
        ));
    }

    #[test]
    fn kv_answers_are_read_strictly_and_errors_never_quote_values() {
        let ok = br#"{"data":{"data":{"token":"s3cret","n":5},"metadata":{}}}"#;
        assert_eq!(&*parse_kv_field(ok, "token").unwrap(), b"s3cret");
        let e = parse_kv_field(ok, "n").unwrap_err().to_string();
        assert!(e.contains("is a number, not a string"), "{e}");
        let e = parse_kv_field(ok, "nope").unwrap_err().to_string();
        assert!(
            e.contains("fields: n, token") && !e.contains("s3cret"),
            "{e}"
        );
        let deleted = br#"{"data":{"data":null,"metadata":{"deletion_time":"x"}}}"#;
        assert_eq!(
            parse_kv_field(deleted, "token").unwrap_err(),
            AnswerError::Deleted
        );
        let v1 = br#"{"data":{"token":"s3cret"}}"#;
        assert_eq!(
            parse_kv_field(v1, "token").unwrap_err(),
            AnswerError::NotKv2
        );
        let broken = br#"{"data":{"data":{"token":"s3cret""#;
        let e = parse_kv_field(broken, "token").unwrap_err().to_string();
        assert!(e.contains("not valid JSON") && !e.contains("s3cret"), "{e}");
    }

    /// Field names from the server reach the caller and the log: at most 20, each at most 64
    /// characters, no control characters (a name cannot forge a log line or blow the 64 KiB
    /// answer).
    #[test]
    fn field_names_in_errors_are_bounded_and_clean() {
        let mut data = serde_json::Map::new();
        for i in 0..100 {
            data.insert(format!("{i:03}\n{}", "x".repeat(10_000)), "v".into());
        }
        let body = serde_json::json!({"data": {"data": data}}).to_string();
        let e = parse_kv_field(body.as_bytes(), "nope")
            .unwrap_err()
            .to_string();
        assert!(e.len() < 20 * 70 + 100, "{} bytes", e.len());
        assert!(!e.contains('\n'));
    }

    #[test]
    fn first_error_is_bounded_and_clean() {
        let long = format!("{{\"errors\":[\"\", \"bad\\nthing {}\"]}}", "x".repeat(500));
        let e = first_error(long.as_bytes()).unwrap();
        assert!(e.starts_with("bad thing"));
        assert_eq!(e.chars().count(), 200);
        assert!(first_error(b"not json").is_none());
        assert!(first_error(br#"{"errors":[]}"#).is_none());
    }

    /// Extreme TTLs as a server could state them, in seconds.
    fn extreme_secs() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(u64::MAX),
            Just(1 << 63),
            Just((1 << 63) - 1),
            Just(u64::MAX / 2 + 1),
            Just(MAX_TOKEN_TTL.as_secs()),
            Just(MAX_TOKEN_TTL.as_secs() + 1),
            any::<u64>(),
            0u64..100_000,
        ]
    }

    proptest! {
        /// Whatever TTL a server states, the token arithmetic neither panics nor yields an
        /// expiry beyond the cap, and refreshes before (or at) expiry, after `now`.
        #[test]
        fn token_arithmetic_never_panics_and_stays_bounded(
            secs in extreme_secs(),
            nanos in 0u32..1_000_000_000,
            renewable in any::<bool>(),
        ) {
            let now = Instant::now();
            let lease = Lease::from_secs(secs, renewable);
            prop_assert!(lease.ttl <= MAX_TOKEN_TTL);
            prop_assert_eq!(lease.clamped, secs > MAX_TOKEN_TTL.as_secs());
            for ttl in [lease.ttl, Duration::new(secs, nanos), Duration::MAX] {
                let t = token_times(ttl, now);
                match (t.expires, t.refresh_at) {
                    (None, None) => prop_assert!(ttl.is_zero()),
                    (Some(e), Some(r)) => {
                        prop_assert!(e > now && e <= now + MAX_TOKEN_TTL);
                        prop_assert!(r > now && r <= e);
                    }
                    other => prop_assert!(false, "{:?}", other),
                }
            }
            let inc = String::from_utf8(renew_increment(Duration::new(secs, nanos))).unwrap();
            let n: u64 = inc
                .trim_start_matches("{\"increment\":\"")
                .trim_end_matches("s\"}")
                .parse()
                .unwrap();
            prop_assert!(n <= MAX_TOKEN_TTL.as_secs());
        }

        /// Login, renewal and lookup answers with extreme numbers (as JSON text: integers of
        /// any size and sign, floats, exponents) parse to a bounded lease or a clean error.
        #[test]
        fn auth_answers_with_extreme_numbers_parse_to_bounded_leases(
            int in any::<i128>(),
            float in any::<f64>(),
            exp in -400i32..400,
            pick in 0u8..4,
        ) {
            let number = match pick {
                0 => int.to_string(),
                1 => format!("{float:?}"),
                2 => format!("1e{exp}"),
                _ => format!("{}{}", u64::MAX, "9".repeat((int.unsigned_abs() % 40) as usize)),
            };
            let leases = [
                parse_auth_answer(auth(&number).as_bytes()).map(|(_, l)| l),
                parse_lookup_answer(
                    format!(r#"{{"data":{{"ttl":{number},"renewable":true}}}}"#).as_bytes(),
                ),
            ];
            for lease in leases {
                match lease {
                    Ok(l) => {
                        prop_assert!(l.ttl <= MAX_TOKEN_TTL);
                        let _ = token_times(l.ttl, Instant::now());
                    }
                    Err(AnswerError::Malformed { .. }) => {}
                    Err(e) => prop_assert!(false, "{}", e),
                }
            }
        }
    }
}
