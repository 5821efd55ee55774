//! What an OpenBao / Vault server answers (`agentkeys_broker::openbao::answer`), fed arbitrary
//! bytes as a login or renewal, a `lookup-self`, a KV v2 read and an error list; and the token
//! arithmetic fed the numbers in them and numbers taken straight from the input.
//!
//! Properties: no panic (before issue 14, a `lease_duration` of 2^63 overflowed
//! `Instant + Duration` and aborted the daemon); every accepted lease is at most
//! `MAX_TOKEN_TTL` and equals a reference read with `serde_json::Value` (clamped); the times
//! built from any TTL are after `now`, refresh no later than expiry, expiry within the cap; an
//! accepted token fits a header; an accepted KV field equals the reference's string; an error
//! never quotes the input (fixed phrases and numbers, or field names bounded and cleaned); the
//! renewal increment is bounded; `first_error` is at most 200 characters without control
//! characters.
#![no_main]

use std::time::{Duration, Instant};

use agentkeys_broker::openbao::MAX_BODY;
use agentkeys_broker::openbao::answer::{
    AnswerError, MAX_TOKEN_LEN, MAX_TOKEN_TTL, first_error, parse_auth_answer, parse_kv_field,
    parse_lookup_answer, renew_increment, token_times,
};
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;

/// The times of a TTL: bounded, ordered, never panicking.
fn check_times(ttl: Duration, now: Instant) {
    let t = token_times(ttl, now);
    match (t.expires, t.refresh_at) {
        (None, None) => assert!(ttl.is_zero()),
        (Some(e), Some(r)) => {
            assert!(e > now && e <= now + MAX_TOKEN_TTL);
            assert!(r > now && r <= e);
        }
        other => panic!("expiry and refresh must come together: {other:?}"),
    }
}

/// An error's text: the variants that carry no input are short ASCII; the field-name list is
/// bounded and has no control characters.
fn check_error(e: &AnswerError) {
    let text = e.to_string();
    assert!(!text.chars().any(char::is_control), "{text:?}");
    match e {
        AnswerError::NoField { .. } => assert!(text.chars().count() <= 20 * 66 + 64),
        _ => assert!(text.is_ascii() && text.len() <= 160, "{text:?}"),
    }
}

/// A member of `v` as serde's derived `Deserialize` finds it: by name in an object, by
/// position in an array (a struct also deserializes from a sequence of its fields).
fn member<'a>(v: &'a serde_json::Value, name: &str, index: usize) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m.get(name),
        serde_json::Value::Array(a) => a.get(index),
        _ => None,
    }
}

/// The reference TTL of an accepted answer: the number at `path` (absent or null: 0), clamped.
fn reference_ttl(doc: &serde_json::Value, path: &[(&str, usize)]) -> Duration {
    let mut cur = Some(doc);
    for (name, index) in path {
        cur = cur.and_then(|v| member(v, name, *index));
    }
    let secs = cur.filter(|v| !v.is_null()).map_or(0, |v| {
        v.as_u64()
            .expect("the parser accepted a TTL that is not a u64")
    });
    Duration::from_secs(secs.min(MAX_TOKEN_TTL.as_secs()))
}

/// The reference document of an answer the parser accepted, if `serde_json::Value` can hold
/// it. Parts of an answer the answer types do not read are skipped the way serde skips unknown
/// fields (`IgnoredAny`): without `Value`'s limit of 128 levels of nesting and without checking
/// that the bytes of a string are UTF-8. Such an input has no reference; but it must then at
/// least be a document serde's skipping accepts, else the parser accepted what is not JSON.
fn reference_doc<'a>(
    data: &[u8],
    reference: &'a Result<serde_json::Value, serde_json::Error>,
) -> Option<&'a serde_json::Value> {
    match reference {
        Ok(doc) => Some(doc),
        Err(e) => {
            if let Err(skip) = serde_json::from_slice::<serde::de::IgnoredAny>(data) {
                panic!("the parser accepted an answer that is not JSON: {e}; {skip}");
            }
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The daemon reads at most this much of an answer.
    if data.len() > MAX_BODY {
        return;
    }
    let now = Instant::now();
    let reference: Result<serde_json::Value, serde_json::Error> = serde_json::from_slice(data);

    match parse_auth_answer(data) {
        Ok((token, lease)) => {
            let t = token.expose_secret();
            assert!(!t.is_empty() && t.len() <= MAX_TOKEN_LEN);
            assert!(t.bytes().all(|b| b.is_ascii_graphic()));
            assert!(lease.ttl <= MAX_TOKEN_TTL);
            if let Some(doc) = reference_doc(data, &reference) {
                let want = reference_ttl(doc, &[("auth", 0), ("lease_duration", 1)]);
                assert_eq!(lease.ttl, want);
            }
            check_times(lease.ttl, now);
            let _ = renew_increment(lease.ttl);
        }
        Err(e) => check_error(&e),
    }

    match parse_lookup_answer(data) {
        Ok(lease) => {
            if let Some(doc) = reference_doc(data, &reference) {
                assert_eq!(lease.ttl, reference_ttl(doc, &[("data", 0), ("ttl", 0)]));
            }
            check_times(lease.ttl, now);
        }
        Err(e) => check_error(&e),
    }

    for field in ["token", ""] {
        match parse_kv_field(data, field) {
            Ok(value) => {
                if let Some(doc) = reference_doc(data, &reference) {
                    let want = member(doc, "data", 0)
                        .and_then(|d| member(d, "data", 0))
                        .and_then(|d| d.get(field))
                        .and_then(|v| v.as_str())
                        .expect("the reference has the string field");
                    assert_eq!(&value[..], want.as_bytes());
                }
            }
            Err(e) => check_error(&e),
        }
    }

    if let Some(m) = first_error(data) {
        assert!(m.chars().count() <= 200 && !m.chars().any(char::is_control));
    }

    // Numbers straight from the input: any u64 of seconds and nanoseconds.
    if data.len() >= 12 {
        let secs = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let nanos = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes")) % 1_000_000_000;
        let ttl = Duration::new(secs, nanos);
        check_times(ttl, now);
        let inc = renew_increment(ttl);
        assert!(inc.len() <= "{\"increment\":\"2764800s\"}".len());
    }
});
