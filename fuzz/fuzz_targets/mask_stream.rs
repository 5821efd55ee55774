//! The output masker of `agentkeys run` (`Masker` / `MaskStream`), checked against a plain
//! reference implementation written here from the promises in mask.rs's module docs.
//!
//! The input chooses one to three secrets, an output made of random filler, whole or truncated
//! encoded forms of the secrets and long runs (past the stream's 64 KiB block), and a chunking of
//! that output, with or without flushes between chunks. Properties:
//! - no flushes before the end: the stream's output equals the reference's batch masking of the
//!   whole output, for every chunking (so no pattern is left, and every byte that is not part of
//!   an occurrence passes unchanged and in order), and the stream holds back less than the
//!   longest pattern;
//! - flushes between chunks (the holdback deadline): no pattern is left in the output, and the
//!   unmasked bytes are the input's bytes in order.
#![no_main]

use std::collections::BTreeSet;

use agentkeys_broker::mask::{MASK, Masker};
use arbitrary::{Result, Unstructured};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use libfuzzer_sys::fuzz_target;

/// Base64 cores shorter than this are not patterns (`MIN_CORE_LEN`).
const MIN_CORE_LEN: usize = 8;
/// A held tail this long or longer is masked at a flush (`MIN_MASKED_TAIL`).
const MIN_MASKED_TAIL: usize = 4;

/// Every pattern of `secret`, as the module docs define them, computed without the masker.
fn patterns_of(secret: &[u8], set: &mut BTreeSet<Vec<u8>>) {
    if secret.is_empty() {
        return;
    }
    set.insert(secret.to_vec());
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        set.insert(engine.encode(secret).into_bytes());
    }
    // Alignment cores: the characters of the base64 of `filler ++ secret ++ filler` whose six
    // bits all come from the secret, for the secret at stream offsets 0, 1 and 2.
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for offset in 0..3usize {
            let mut stream = vec![0xC3u8; offset];
            stream.extend_from_slice(secret);
            stream.extend_from_slice(&[0x3C; 3]);
            let enc = engine.encode(&stream).into_bytes();
            let (lo, hi) = (offset * 8, (offset + secret.len()) * 8);
            let core: Vec<u8> = (0..enc.len())
                .filter(|j| j * 6 >= lo && j * 6 + 6 <= hi)
                .map(|j| enc[j])
                .collect();
            if core.len() >= MIN_CORE_LEN {
                set.insert(core);
            }
        }
    }
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    set.insert(hex.to_uppercase().into_bytes());
    set.insert(hex.into_bytes());
    for upper in [true, false] {
        let mut pct = String::new();
        for &b in secret {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                pct.push(char::from(b));
            } else if upper {
                pct.push_str(&format!("%{b:02X}"));
            } else {
                pct.push_str(&format!("%{b:02x}"));
            }
        }
        set.insert(pct.into_bytes());
    }
}

/// Batch masking of a whole output: the union of all occurrences, the flush rule for a held
/// tail, one mask per maximal covered run.
fn reference(patterns: &BTreeSet<Vec<u8>>, data: &[u8]) -> Vec<u8> {
    let n = data.len();
    let mut covered = vec![false; n];
    for p in patterns {
        let mut from = 0;
        while let Some(at) = find(&data[from..], p) {
            let i = from + at;
            covered[i..i + p.len()].fill(true);
            from = i + 1;
        }
    }
    // The longest tail that is a proper prefix of a pattern (shorter than the longest one).
    let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
    let tail = (n.saturating_sub(longest)..n).find(|&i| {
        patterns
            .iter()
            .any(|p| p.len() > n - i && p.starts_with(&data[i..]))
    });
    if let Some(i) = tail
        && n - i >= MIN_MASKED_TAIL
    {
        covered[i..].fill(true);
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if !covered[i] {
            out.push(data[i]);
        } else if i == 0 || !covered[i - 1] {
            out.extend_from_slice(MASK);
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, _) = needle.split_first()?;
    let last = haystack.len().checked_sub(needle.len())?;
    // Compare whole slices only where the first byte matches: libFuzzer hooks every memcmp.
    (0..=last).find(|&i| haystack[i] == first && haystack[i..i + needle.len()] == *needle)
}

/// A secret: arbitrary bytes, or token-like bytes from a small alphabet so that encodings,
/// neighbours and other secrets collide often.
fn secret(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let len = u.int_in_range(1..=48)?;
    let small = u.arbitrary::<bool>()?;
    (0..len)
        .map(|_| {
            if small {
                Ok(*u.choose(b"ab0/+\0\n=%-_Zz9")?)
            } else {
                u.arbitrary::<u8>()
            }
        })
        .collect()
}

struct Case {
    secrets: Vec<Vec<u8>>,
    data: Vec<u8>,
    /// Chunk sizes (cycled) and whether to flush after each chunk.
    cuts: Vec<(usize, bool)>,
}

fn case(u: &mut Unstructured<'_>) -> Result<Case> {
    let count = u.int_in_range(1..=3)?;
    let secrets = (0..count).map(|_| secret(u)).collect::<Result<Vec<_>>>()?;
    let mut set = BTreeSet::new();
    for s in &secrets {
        patterns_of(s, &mut set);
    }
    let list: Vec<Vec<u8>> = set.into_iter().collect();
    let flushing = u.arbitrary::<bool>()?;
    let cuts = u
        .arbitrary_iter::<(u16, bool)>()?
        .take(16)
        .map(|r| r.map(|(size, flush)| (usize::from(size % 2048) + 1, flushing && flush)))
        .collect::<Result<Vec<_>>>()?;
    let cuts = if cuts.is_empty() {
        vec![(usize::MAX, false)]
    } else {
        cuts
    };
    let mut data = Vec::new();
    // Long runs only matter, and are only affordable, when the output is pushed at once.
    let mut long_run_used = cuts[0].0 != usize::MAX;
    let parts = u.int_in_range(0..=12)?;
    for _ in 0..parts {
        match u.int_in_range(0..=31)? {
            // Random filler.
            0..=11 => {
                let len = u.int_in_range(0..=64)?;
                data.extend_from_slice(u.bytes(len.min(u.len()))?);
            }
            // A whole pattern.
            12..=20 => data.extend_from_slice(u.choose(&list)?),
            // The beginning of one (a truncated secret, or one split by a flush).
            21..=29 => {
                let p = u.choose(&list)?;
                let len = u.int_in_range(1..=p.len())?;
                data.extend_from_slice(&p[..len]);
            }
            // A run of one byte: short, or (once per input, and only when the whole output is
            // pushed at once: it is slow to check) long enough to cross the stream's 64 KiB
            // scan block.
            30 => {
                let byte = u.arbitrary::<u8>()?;
                let len = u.int_in_range(1..=300)?;
                data.resize(data.len() + len, byte);
            }
            _ if !long_run_used => {
                long_run_used = true;
                let byte = u.arbitrary::<u8>()?;
                let len = u.int_in_range(1..=70_000)?;
                data.resize(data.len() + len, byte);
            }
            _ => {}
        }
    }
    Ok(Case {
        secrets,
        data,
        cuts,
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(Case {
        mut secrets,
        mut data,
        cuts,
    }) = case(&mut Unstructured::new(bytes))
    else {
        return;
    };
    let flushing = cuts.iter().any(|&(_, flush)| flush);
    if flushing {
        // With flushes, the check below removes the masks; keep `*` out of everything else.
        for v in secrets.iter_mut().chain(std::iter::once(&mut data)) {
            for b in v.iter_mut().filter(|b| **b == b'*') {
                *b = b'+';
            }
        }
    }
    let mut patterns = BTreeSet::new();
    for s in &secrets {
        patterns_of(s, &mut patterns);
    }
    let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
    let masker = Masker::new(&refs);
    let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
    assert_eq!(
        masker.max_pattern_len(),
        longest,
        "pattern set differs from the reference"
    );

    let mut stream = masker.stream();
    let mut out = Vec::new();
    let mut rest = data.as_slice();
    for &(size, flush) in cuts.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        stream.push(chunk, &mut out);
        assert!(
            stream.held() < longest.max(1),
            "held back a whole pattern or more"
        );
        if flush {
            stream.flush(&mut out);
            assert_eq!(stream.held(), 0);
        }
        rest = tail;
    }
    stream.flush(&mut out);
    assert_eq!(stream.held(), 0);

    if flushing {
        for p in &patterns {
            assert!(
                find(&out, p).is_none(),
                "a secret or encoding left in the output"
            );
        }
        // The unmasked bytes are the input's, once each and in order.
        let mut input = data.iter();
        assert!(
            out.iter()
                .filter(|&&b| b != b'*')
                .all(|b| input.any(|d| d == b)),
            "unmasked bytes changed"
        );
    } else {
        // A pattern made of `*` can be found in the mask itself; every other one is gone.
        for p in patterns.iter().filter(|p| !p.contains(&b'*')) {
            assert!(
                find(&out, p).is_none(),
                "a secret or encoding left in the output"
            );
        }
        assert!(
            out == reference(&patterns, &data),
            "differs from the reference masking"
        );
    }
});
