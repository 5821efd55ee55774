//! Streaming output masking for daemon-mediated `run`.
//!
//! The child's stdout and stderr each pass through a [`MaskStream`] built from one [`Masker`]
//! per run. Every occurrence of a delivered secret, or of one of its encoded forms (the
//! *patterns*, listed below), becomes [`MASK`]; every other byte passes through unchanged and in
//! order, also when an occurrence is split across reads.
//!
//! # Patterns
//! For each non-empty secret `s` (empty ones are ignored), after removing duplicates:
//! - `s` itself;
//! - base64, standard (`+/`) and URL-safe (`-_`) alphabets, each padded and unpadded;
//! - the base64 *alignment cores*, for both alphabets: when `s` sits inside a longer stream that
//!   is base64-encoded as a whole (`printf 'x%s' "$T" | base64`), its encoding depends on the
//!   stream offset `o = 0, 1, 2 (mod 3)` at which `s` starts, and its first and last characters
//!   mix in bits of the neighbouring bytes. The core for offset `o` is the unpadded encoding of
//!   `[0; o] ++ s`, characters `ceil(8*o/6)` (0, 2, 3) up to, not including, `floor(8*(o+len)/6)`:
//!   exactly the characters whose 6 bits all come from `s`. A core shorter than
//!   [`MIN_CORE_LEN`] characters is skipped, so that short secrets do not mask short random
//!   substrings of unrelated base64;
//! - hex, lower- and upper-case;
//! - URL (percent) encoding: every byte outside the unreserved set `[A-Za-z0-9-._~]` becomes
//!   `%XX`, once with upper-case and once with lower-case hex digits (a secret made only of
//!   unreserved bytes has no separate URL-encoded pattern: it equals `s`).
//!
//! # Matching
//! All occurrences of all patterns are found, overlapping ones included; the bytes they cover are
//! united, and each maximal run of covered bytes becomes one [`MASK`] (so `$T$T`, or a secret
//! overlapping another's encoding, gives a single mask). The result is the same for every way the
//! output is cut into chunks as for the whole output at once (tested against a plain batch
//! implementation), provided the stream is flushed only at its end.
//!
//! # Holdback
//! A stream holds back only the longest tail of what it has seen that is a proper prefix of some
//! pattern, so at most [`Masker::max_pattern_len`]` - 1` bytes, and usually none: output that
//! does not end in the beginning of a pattern is emitted at once. The caller flushes after a few
//! milliseconds of silence so that a prompt ending in such a prefix is not stuck; see
//! [`MaskStream::flush`] for what a flush does with the held bytes.
//!
//! # Limits
//! Masking is a seatbelt against accidents, not a boundary: a program that transforms the secret
//! in any other way (reverses it, line-wraps its base64 as `base64` does past 76 columns, i.e.
//! for secrets over 57 bytes, encodes it twice, percent-encodes only some reserved bytes...) is
//! not caught. Secrets of a few bytes mask every occurrence of those bytes in the output.
//!
//! Patterns, the tables derived from them, and the stream buffers are all in zeroize-on-drop
//! storage, sized before they are filled so that they never reallocate; none of the types here
//! implements `Debug`.

use std::ops::Deref;

use zeroize::{Zeroize, Zeroizing};

/// What every masked run of output is replaced with.
pub const MASK: &[u8] = b"********";

/// At a flush, a held-back tail of at least this many bytes is masked, a shorter one is emitted.
pub const MIN_MASKED_TAIL: usize = 4;

/// Base64 alignment cores shorter than this many characters are not patterns.
pub const MIN_CORE_LEN: usize = 8;

/// How much new output a stream scans at a time, on top of its holdback.
const BLOCK: usize = 64 * 1024;

const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";
const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// The patterns of one run's secrets, ready for matching. Built once per run; no `Debug`.
pub struct Masker {
    /// Every pattern, concatenated, in lexicographic order (so grouped by first byte).
    bytes: Zeroizing<Vec<u8>>,
    /// Pattern `k` is `bytes[offsets[k]..offsets[k + 1]]`.
    offsets: Zeroizing<Vec<usize>>,
    /// The patterns starting with byte `b` are `buckets[b]..buckets[b + 1]`.
    buckets: Zeroizing<Vec<usize>>,
    /// Whether some pattern starts with byte `b`: lets the scan skip plain output quickly.
    starts: Zeroizing<[bool; 256]>,
    max_len: usize,
}

impl Masker {
    /// Builds the patterns (see the [module docs](self)) of `secrets`; empty secrets are ignored.
    #[must_use]
    pub fn new(secrets: &[&[u8]]) -> Masker {
        let mut patterns: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        for secret in secrets.iter().filter(|s| !s.is_empty()) {
            push_patterns(secret, &mut patterns);
        }
        // Sorting moves only the Vec headers, never the plaintext they point to.
        patterns.sort_unstable_by(|a, b| a.as_slice().cmp(b.as_slice()));
        patterns.dedup_by(|a, b| a.as_slice() == b.as_slice());

        let total = patterns.iter().map(|p| p.len()).sum();
        let mut bytes = Zeroizing::new(Vec::with_capacity(total));
        let mut offsets = Zeroizing::new(Vec::with_capacity(patterns.len() + 1));
        let mut buckets = Zeroizing::new(vec![0usize; 257]);
        let mut starts = Zeroizing::new([false; 256]);
        offsets.push(0);
        for p in &patterns {
            bytes.extend_from_slice(p);
            offsets.push(bytes.len());
            buckets[usize::from(p[0]) + 1] += 1;
            starts[usize::from(p[0])] = true;
        }
        for b in 0..256 {
            buckets[b + 1] += buckets[b];
        }
        let max_len = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        Masker {
            bytes,
            offsets,
            buckets,
            starts,
            max_len,
        }
    }

    /// The length of the longest pattern (0 without secrets); a stream holds back less than this.
    #[must_use]
    pub fn max_pattern_len(&self) -> usize {
        self.max_len
    }

    /// A masking stream for one output (stdout or stderr) borrowing this masker. Use
    /// [`MaskStream::new`] with an `Arc<Masker>` for a stream that owns its masker.
    #[must_use]
    pub fn stream(&self) -> MaskStream<&Masker> {
        MaskStream::new(self)
    }

    fn pattern(&self, k: usize) -> &[u8] {
        &self.bytes[self.offsets[k]..self.offsets[k + 1]]
    }

    #[cfg(test)]
    fn patterns(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.offsets.len() - 1).map(|k| self.pattern(k))
    }
}

/// Masks one output stream: [`push`](Self::push) what the child wrote, write out what it returns.
/// `M` is `&Masker` or an owning pointer such as `Arc<Masker>`. No `Debug`.
pub struct MaskStream<M: Deref<Target = Masker>> {
    masker: M,
    /// Bytes not yet final (the holdback) followed by the block being scanned. Its capacity is
    /// fixed at creation and is never exceeded, so it never reallocates.
    buf: Zeroizing<Vec<u8>>,
    /// How many leading bytes of `buf` an earlier flush already emitted; they stay in `buf` only
    /// so that a pattern they begin is still recognised when the rest of it arrives.
    emitted: usize,
    /// How many leading bytes of `buf` are covered by an occurrence that began before `buf`.
    covered: usize,
    /// Whether the last byte emitted was masked: a masked run continuing it adds no second mask.
    in_mask: bool,
}

impl<M: Deref<Target = Masker>> MaskStream<M> {
    /// A stream masking with `masker`.
    #[must_use]
    pub fn new(masker: M) -> Self {
        let capacity = masker.max_len.saturating_sub(1) + BLOCK;
        MaskStream {
            masker,
            buf: Zeroizing::new(Vec::with_capacity(capacity)),
            emitted: 0,
            covered: 0,
            in_mask: false,
        }
    }

    /// Takes the next chunk of output and appends to `out` the bytes that are final: masked
    /// occurrences and bytes that cannot be part of one. Keeps back (see [`held`](Self::held))
    /// only a tail that is a proper prefix of a pattern, so fewer than
    /// [`Masker::max_pattern_len`] bytes. An empty chunk does nothing.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.masker.max_len == 0 {
            out.extend_from_slice(chunk);
            return;
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            // The holdback is shorter than the longest pattern, so there is always a block of room.
            let room = self.buf.capacity() - self.buf.len();
            let (piece, tail) = rest.split_at(room.min(rest.len()));
            self.buf.extend_from_slice(piece);
            self.scan(false, out);
            rest = tail;
        }
    }

    /// Emits what is held back: at the end of the output, or when the caller's holdback deadline
    /// (a few milliseconds of silence) has passed. Complete occurrences are masked as always. The
    /// held tail is a proper prefix of a pattern: if it is [`MIN_MASKED_TAIL`] (4) bytes or
    /// longer it is masked too, because a truncated secret (`head -c 20`) or the first half of a
    /// secret written in two pieces is still mostly secret, and four matching bytes are rarely a
    /// coincidence; a shorter tail is emitted unchanged, because one to three bytes give little
    /// away and masking them would eat common endings of output that just happen to begin a
    /// pattern. Either way the stream keeps matching after a flush: if the next push completes
    /// the pattern, the rest of it is masked as well (at most the three bytes emitted unchanged
    /// are then shown).
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if self.masker.max_len > 0 {
            self.scan(true, out);
        }
    }

    /// How many bytes have been pushed but not yet emitted.
    #[must_use]
    pub fn held(&self) -> usize {
        self.buf.len() - self.emitted
    }

    /// Scans `buf`, emits every byte that is final (all of them at a flush), and keeps the rest.
    fn scan(&mut self, flush: bool, out: &mut Vec<u8>) {
        let masker = &*self.masker;
        let buf: &[u8] = &self.buf;
        let n = buf.len();
        // End of the union of the occurrences found so far.
        let mut cover_end = self.covered;
        // Start of the run of plain bytes not yet copied to `out`.
        let mut plain_from = self.emitted;
        let mut in_mask = self.in_mask;
        // Where the kept tail starts: the first position at which a pattern runs past the end.
        let mut keep_from = n;
        let emitted = self.emitted;

        let mut i = 0;
        'positions: while i < n {
            if cover_end <= i && i >= emitted {
                // Plain output that begins no pattern: skip it in one go.
                let plain = buf[i..]
                    .iter()
                    .position(|&b| masker.starts[usize::from(b)])
                    .unwrap_or(n - i);
                if plain > 0 {
                    in_mask = false;
                    i += plain;
                    continue;
                }
            }
            let candidates =
                masker.buckets[usize::from(buf[i])]..masker.buckets[usize::from(buf[i]) + 1];
            for k in candidates {
                let pattern = masker.pattern(k);
                let rest = &buf[i..];
                if rest.len() >= pattern.len() {
                    if rest[..pattern.len()] == *pattern {
                        cover_end = cover_end.max(i + pattern.len());
                    }
                } else if *rest == pattern[..rest.len()] {
                    if !flush {
                        keep_from = i;
                        break 'positions;
                    }
                    // The first such position gives the longest tail; later ones are inside it.
                    if rest.len() >= MIN_MASKED_TAIL {
                        cover_end = n;
                    }
                }
            }
            if i < emitted {
                i += 1;
                continue;
            }
            if cover_end > i {
                if plain_from < i {
                    out.extend_from_slice(&buf[plain_from..i]);
                }
                if !in_mask {
                    out.extend_from_slice(MASK);
                    in_mask = true;
                }
                plain_from = i + 1;
            } else {
                in_mask = false;
            }
            i += 1;
        }
        if plain_from < keep_from {
            out.extend_from_slice(&buf[plain_from..keep_from]);
        }
        self.in_mask = in_mask;

        if flush {
            // Everything is emitted, but the bytes stay for matching what comes next.
            self.emitted = n;
            self.covered = cover_end;
        } else {
            self.emitted = self.emitted.saturating_sub(keep_from);
            self.covered = cover_end.saturating_sub(keep_from);
            let kept = n - keep_from;
            self.buf.copy_within(keep_from.., 0);
            // Wipe what was scanned (it may hold occurrences), then drop it.
            self.buf[kept..].zeroize();
            self.buf.truncate(kept);
        }
    }
}

/// Appends the patterns of one non-empty secret to `patterns` (duplicates are removed later).
fn push_patterns(secret: &[u8], patterns: &mut Vec<Zeroizing<Vec<u8>>>) {
    patterns.push(Zeroizing::new(secret.to_vec()));
    for alphabet in [BASE64_STANDARD, BASE64_URL] {
        patterns.push(base64(secret, alphabet, true));
        patterns.push(base64(secret, alphabet, false));
        for offset in 0..3 {
            if let Some(core) = base64_core(secret, offset, alphabet) {
                patterns.push(core);
            }
        }
    }
    for digits in [HEX_LOWER, HEX_UPPER] {
        let mut hex = Zeroizing::new(Vec::with_capacity(2 * secret.len()));
        for &b in secret {
            hex.push(digits[usize::from(b >> 4)]);
            hex.push(digits[usize::from(b & 15)]);
        }
        patterns.push(hex);
        patterns.push(percent(secret, digits));
    }
}

/// Base64 of `input`, padded with `=` or not.
fn base64(input: &[u8], alphabet: &[u8; 64], pad: bool) -> Zeroizing<Vec<u8>> {
    let len = if pad {
        input.len().div_ceil(3) * 4
    } else {
        (input.len() * 4).div_ceil(3)
    };
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    for group in input.chunks(3) {
        let bits = group
            .iter()
            .enumerate()
            .fold(0u32, |acc, (j, &b)| acc | (u32::from(b) << (16 - 8 * j)));
        // 1, 2, 3 input bytes give 2, 3, 4 characters.
        for j in 0..=group.len() {
            out.push(alphabet[((bits >> (18 - 6 * j)) & 63) as usize]);
        }
        if pad {
            let len = out.len();
            out.resize(len + 3 - group.len(), b'=');
        }
    }
    out
}

/// The characters of the base64 of a stream holding `secret` at `offset` (mod 3) that depend on
/// `secret` alone, or `None` when there are fewer than [`MIN_CORE_LEN`].
fn base64_core(secret: &[u8], offset: usize, alphabet: &[u8; 64]) -> Option<Zeroizing<Vec<u8>>> {
    let first = (8 * offset).div_ceil(6);
    let end = 8 * (offset + secret.len()) / 6;
    if end < first + MIN_CORE_LEN {
        return None;
    }
    let mut shifted = Zeroizing::new(Vec::with_capacity(offset + secret.len()));
    shifted.resize(offset, 0);
    shifted.extend_from_slice(secret);
    let mut core = base64(&shifted, alphabet, false);
    core.truncate(end);
    core.drain(..first);
    Some(core)
}

/// Percent-encoding of every byte outside `[A-Za-z0-9-._~]`, with the given hex digits.
fn percent(secret: &[u8], digits: &[u8; 16]) -> Zeroizing<Vec<u8>> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    let len = secret
        .iter()
        .map(|&b| if unreserved(b) { 1 } else { 3 })
        .sum();
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    for &b in secret {
        if unreserved(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[
                b'%',
                digits[usize::from(b >> 4)],
                digits[usize::from(b & 15)],
            ]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    /// The patterns of `secret`, computed independently of the code under test: base64 by the
    /// `base64` crate, hex and percent-encoding with `format!`.
    fn expected_patterns(secret: &[u8]) -> BTreeSet<Vec<u8>> {
        let mut set = BTreeSet::new();
        if secret.is_empty() {
            return set;
        }
        set.insert(secret.to_vec());
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            set.insert(engine.encode(secret).into_bytes());
        }
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            for offset in 0..3usize {
                // Embed the secret after `offset` filler bytes, followed by filler, and keep the
                // characters whose bits lie entirely inside the secret.
                let mut stream = vec![0xA5u8; offset];
                stream.extend_from_slice(secret);
                stream.extend_from_slice(&[0x5A; 3]);
                let enc = engine.encode(&stream).into_bytes();
                let (lo, hi) = (offset * 8, (offset + secret.len()) * 8);
                let core: Vec<u8> = (0..enc.len())
                    .filter(|j| j * 6 >= lo && j * 6 + 6 <= hi)
                    .map(|j| enc[j])
                    .collect();
                if core.len() >= 8 {
                    set.insert(core);
                }
            }
        }
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        set.insert(hex.clone().into_bytes());
        set.insert(hex.to_uppercase().into_bytes());
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
        set
    }

    fn expected_set(secrets: &[&[u8]]) -> BTreeSet<Vec<u8>> {
        secrets.iter().flat_map(|s| expected_patterns(s)).collect()
    }

    /// Plain batch masking of a whole output: union of all occurrences, the flush rule for the
    /// tail, one mask per maximal covered run.
    fn batch(patterns: &BTreeSet<Vec<u8>>, data: &[u8]) -> Vec<u8> {
        let n = data.len();
        let mut covered = vec![false; n];
        for p in patterns {
            for i in 0..n {
                if data[i..].starts_with(p) {
                    covered[i..i + p.len()].fill(true);
                }
            }
        }
        let tail = (0..n).find(|&i| {
            patterns
                .iter()
                .any(|p| p.len() > n - i && p.starts_with(&data[i..]))
        });
        if let Some(i) = tail
            && n - i >= 4
        {
            covered[i..].fill(true);
        }
        let mut out = Vec::new();
        for i in 0..n {
            if !covered[i] {
                out.push(data[i]);
            } else if i == 0 || !covered[i - 1] {
                out.extend_from_slice(MASK);
            }
        }
        out
    }

    /// Streams `data` in chunks of the given sizes (cycled), then flushes.
    fn stream_chunks(masker: &Masker, data: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut stream = masker.stream();
        let mut out = Vec::new();
        let mut rest = data;
        for &size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            stream.push(chunk, &mut out);
            assert!(stream.held() < masker.max_pattern_len().max(1));
            rest = tail;
        }
        stream.flush(&mut out);
        assert_eq!(stream.held(), 0);
        out
    }

    fn mask_all(masker: &Masker, data: &[u8]) -> Vec<u8> {
        stream_chunks(masker, data, &[usize::MAX])
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// A small deterministic generator, so the big-data tests need no extra dependency.
    fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn patterns_match_independent_encodings() {
        let secrets: [&[u8]; 8] = [
            b"ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            b"a",
            b"ab",
            b"abc/+?=&",
            b"\0\n\xff binary \x7f\x80",
            b"sk-.*[a-z]+$(^)\\",
            b"exactly6",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij0123456789~",
        ];
        for secret in secrets {
            let masker = Masker::new(&[secret]);
            let got: BTreeSet<Vec<u8>> = masker.patterns().map(<[u8]>::to_vec).collect();
            assert_eq!(got.len(), masker.patterns().count(), "duplicates kept");
            assert_eq!(
                got,
                expected_patterns(secret),
                "{}",
                String::from_utf8_lossy(secret)
            );
        }
        let both = Masker::new(&[b"first-secret", b"", b"second/secret"]);
        let got: BTreeSet<Vec<u8>> = both.patterns().map(<[u8]>::to_vec).collect();
        assert_eq!(got, expected_set(&[b"first-secret", b"second/secret"]));
    }

    #[test]
    fn each_encoding_is_masked() {
        let secret: &[u8] = b"tok:\xfb\xff/+ en~";
        let masker = Masker::new(&[secret]);
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let pct_upper = "tok%3A%FB%FF%2F%2B%20en~";
        let forms: Vec<Vec<u8>> = vec![
            secret.to_vec(),
            STANDARD.encode(secret).into_bytes(),
            STANDARD_NO_PAD.encode(secret).into_bytes(),
            URL_SAFE.encode(secret).into_bytes(),
            URL_SAFE_NO_PAD.encode(secret).into_bytes(),
            hex.clone().into_bytes(),
            hex.to_uppercase().into_bytes(),
            pct_upper.as_bytes().to_vec(),
            // The letters of this secret are lower-case already: only the hex digits change.
            pct_upper.to_lowercase().into_bytes(),
        ];
        for form in forms {
            let mut data = b"before ".to_vec();
            data.extend_from_slice(&form);
            data.extend_from_slice(b" after\n");
            assert_eq!(
                mask_all(&masker, &data),
                b"before ******** after\n",
                "{}",
                String::from_utf8_lossy(&form)
            );
        }
    }

    #[test]
    fn lowercase_percent_encoding_is_masked() {
        // `pct_upper.to_lowercase()` above also lowercases letters of the secret; check the
        // exact lower-hex form separately.
        let masker = Masker::new(&[b"a/B"]);
        assert_eq!(mask_all(&masker, b"x a%2fB y"), b"x ******** y");
        assert_eq!(mask_all(&masker, b"x a%2FB y"), b"x ******** y");
        assert_eq!(mask_all(&masker, b"x a%2fb y"), b"x a%2fb y");
    }

    #[test]
    fn secret_embedded_in_base64_stream_at_every_offset() {
        let secret: &[u8] = b"ghp_xK9mQ2vL8nR4tY7wZ1aB3cD5";
        let masker = Masker::new(&[secret]);
        for engine in [&STANDARD, &URL_SAFE_NO_PAD] {
            for prefix_len in 0..7 {
                for suffix_len in 0..4 {
                    let mut stream = pseudo_random(prefix_len, 7 + prefix_len as u64);
                    stream.extend_from_slice(secret);
                    stream.extend_from_slice(&pseudo_random(suffix_len, 99));
                    let encoded = engine.encode(&stream).into_bytes();
                    let out = mask_all(&masker, &encoded);
                    // The secret's 28 bytes leave a core of at least 36 characters, replaced by
                    // one mask; everything else (neighbours, mixed boundary characters) stays.
                    assert!(contains(&out, MASK), "offset {prefix_len}");
                    assert!(
                        out.len() + 36 <= encoded.len() + MASK.len(),
                        "offset {prefix_len}"
                    );
                }
            }
        }
        // `printf 'x%s' "$T" | base64`: two characters mix in the `x`, two the end and padding.
        let mut shell = b"x".to_vec();
        shell.extend_from_slice(secret);
        let encoded = STANDARD.encode(&shell).into_bytes();
        let mut want = encoded[..2].to_vec();
        want.extend_from_slice(MASK);
        want.extend_from_slice(&encoded[encoded.len() - 2..]);
        assert_eq!(mask_all(&masker, &encoded), want);
    }

    #[test]
    fn short_secrets_have_no_alignment_cores() {
        // 5 bytes: cores of 6, 5 and 5 characters, all under MIN_CORE_LEN.
        let masker = Masker::new(&[b"12345"]);
        let cores: Vec<&[u8]> = masker.patterns().filter(|p| p.len() < 7).collect();
        assert_eq!(cores, [b"12345".as_slice()]);
    }

    #[test]
    fn secret_split_at_every_point() {
        let secret: &[u8] = b"s3cr3t\0\nvalue";
        let masker = Masker::new(&[secret]);
        let mut data = b"line one\nthe value is ".to_vec();
        data.extend_from_slice(secret);
        data.extend_from_slice(b" ok\n");
        let want = b"line one\nthe value is ******** ok\n";
        for split in 0..=data.len() {
            let out = stream_chunks(&masker, &data, &[split, usize::MAX]);
            assert_eq!(out, want, "split at {split}");
        }
        for size in 1..=data.len() {
            assert_eq!(
                stream_chunks(&masker, &data, &[size]),
                want,
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn pattern_split_across_three_chunks() {
        let secret: &[u8] = b"correct horse battery staple";
        let masker = Masker::new(&[secret]);
        let mut data = b"<<".to_vec();
        data.extend_from_slice(STANDARD.encode(secret).as_bytes());
        data.extend_from_slice(b">>");
        for a in 1..data.len() {
            for b in a..data.len() {
                let mut stream = masker.stream();
                let mut out = Vec::new();
                stream.push(&data[..a], &mut out);
                stream.push(&data[a..b], &mut out);
                stream.push(&data[b..], &mut out);
                stream.flush(&mut out);
                assert_eq!(out, b"<<********>>", "splits {a} {b}");
            }
        }
    }

    #[test]
    fn overlapping_and_nested_secrets_are_united() {
        let masker = Masker::new(&[b"abcdef", b"defghi"]);
        assert_eq!(mask_all(&masker, b"x abcdefghi y"), b"x ******** y");
        let nested = Masker::new(&[b"inner", b"outer-inner-outer"]);
        assert_eq!(
            mask_all(&nested, b"1 outer-inner-outer 2 inner 3"),
            b"1 ******** 2 ******** 3"
        );
        // Adjacent occurrences form one masked run; separated ones stay separate.
        let repeated = Masker::new(&[b"token123"]);
        assert_eq!(mask_all(&repeated, b"token123token123"), MASK);
        assert_eq!(
            mask_all(&repeated, b"token123 token123\n"),
            b"******** ********\n"
        );
        // Periodic secret overlapping itself.
        let periodic = Masker::new(&[b"abab"]);
        assert_eq!(mask_all(&periodic, b"-ababab-"), b"-********-");
    }

    #[test]
    fn mask_and_empty_chunks_pass_through() {
        let masker = Masker::new(&[b"hunter2hunter2"]);
        let mut stream = masker.stream();
        let mut out = Vec::new();
        stream.push(b"", &mut out);
        stream.push(b"******** is not a secret, ", &mut out);
        stream.push(b"", &mut out);
        stream.push(b"hunter2", &mut out);
        assert_eq!(stream.held(), 7);
        stream.push(b"", &mut out);
        stream.push(b"hunter2", &mut out);
        stream.push(b"\n", &mut out);
        stream.flush(&mut out);
        stream.flush(&mut out);
        assert_eq!(out, b"******** is not a secret, ********\n");
    }

    #[test]
    fn regex_special_and_binary_secrets() {
        let secrets: [&[u8]; 3] = [b".*+?[](){}|^$\\", b"\0\0\n\0", b"\n"];
        let masker = Masker::new(&secrets);
        let data = b"a .*+?[](){}|^$\\ b \0\0\n\0 c\nd";
        assert_eq!(mask_all(&masker, data), b"a ******** b ******** c********d");
    }

    #[test]
    fn no_secrets_pass_everything() {
        let masker = Masker::new(&[]);
        assert_eq!(masker.max_pattern_len(), 0);
        let data = pseudo_random(100_000, 1);
        assert_eq!(stream_chunks(&masker, &data, &[1, 4096, 7]), data);
        assert_eq!(Masker::new(&[b""]).max_pattern_len(), 0);
    }

    #[test]
    fn flush_rule_for_held_tail() {
        let masker = Masker::new(&[b"ghp_abcdefghijkl"]);
        // Three bytes of a secret at the end pass; four are masked.
        assert_eq!(mask_all(&masker, b"ends with ghp"), b"ends with ghp");
        assert_eq!(mask_all(&masker, b"ends with ghp_"), b"ends with ********");
        assert_eq!(
            mask_all(&masker, b"ends with ghp_abcdefghijk"),
            b"ends with ********"
        );
        // A flush mid-stream (holdback deadline) keeps matching: the rest is masked as well.
        let mut stream = masker.stream();
        let mut out = Vec::new();
        stream.push(b"x ghp_abc", &mut out);
        assert_eq!(out, b"x ");
        stream.flush(&mut out);
        assert_eq!(out, b"x ********");
        assert_eq!(stream.held(), 0);
        stream.push(b"defghijkl y", &mut out);
        stream.flush(&mut out);
        assert_eq!(out, b"x ******** y");
        // A short flushed tail is shown; the rest of the secret still is not.
        let mut stream = masker.stream();
        let mut out = Vec::new();
        stream.push(b"x gh", &mut out);
        stream.flush(&mut out);
        assert_eq!(out, b"x gh");
        stream.push(b"p_abcdefghijkl y", &mut out);
        assert_eq!(out, b"x gh******** y");
        // Flushed bytes are never emitted twice, also while they are still held for matching.
        let mut stream = masker.stream();
        let mut out = Vec::new();
        stream.push(b"x gh", &mut out);
        stream.flush(&mut out);
        stream.push(b"p", &mut out);
        assert_eq!(stream.held(), 1);
        stream.push(b"!", &mut out);
        stream.flush(&mut out);
        assert_eq!(out, b"x ghp!");
        // A false alarm: the flushed prefix was masked, what follows is not.
        let mut stream = masker.stream();
        let mut out = Vec::new();
        stream.push(b"ghp_a", &mut out);
        stream.flush(&mut out);
        stream.push(b"nd more", &mut out);
        stream.flush(&mut out);
        assert_eq!(out, b"********nd more");
    }

    #[test]
    fn owned_stream_with_arc() {
        let masker = Arc::new(Masker::new(&[b"0123456789"]));
        let mut stream = MaskStream::new(Arc::clone(&masker));
        let mut out = Vec::new();
        std::thread::spawn(move || {
            stream.push(b"<0123456789>", &mut out);
            stream.flush(&mut out);
            assert_eq!(out, b"<********>");
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn one_mib_of_random_bytes_is_unchanged_and_throughput() {
        let secrets: [&[u8]; 3] = [
            b"ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            b"sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ012345",
            b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10",
        ];
        let masker = Masker::new(&secrets);
        let data = pseudo_random(1 << 20, 0x9E37_79B9_7F4A_7C15);
        let start = std::time::Instant::now();
        let out = stream_chunks(&masker, &data, &[65536, 4096, 1, 100_000]);
        let elapsed = start.elapsed();
        assert!(out == data, "random data changed");
        // Text-like output, where many positions begin some pattern.
        let text: Vec<u8> = data
            .iter()
            .map(|b| b"0123456789abcdefghp_sk- \n"[usize::from(b % 25)])
            .collect();
        let start = std::time::Instant::now();
        let out = mask_all(&masker, &text);
        let text_elapsed = start.elapsed();
        assert_eq!(out, text);
        println!(
            "mask throughput: random binary {:.0} MB/s, hex-like text {:.0} MB/s ({} patterns)",
            1.048_576 / elapsed.as_secs_f64(),
            1.048_576 / text_elapsed.as_secs_f64(),
            masker.offsets.len() - 1,
        );
    }

    fn secret_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            // Arbitrary bytes, NUL and newline included.
            prop::collection::vec(any::<u8>(), 1..40),
            // Token-like: a small alphabet, so encodings and neighbours collide more often.
            prop::collection::vec(prop::sample::select(b"ab0/+\0\n=%-_".to_vec()), 1..40),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn masking_never_leaks_under_random_chunking(
            secrets in prop::collection::vec(secret_strategy(), 1..3),
            filler in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..30), 1..8),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 8),
            sizes in prop::collection::vec(1usize..70, 1..10),
        ) {
            let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
            let patterns = expected_set(&refs);
            let list: Vec<&Vec<u8>> = patterns.iter().collect();
            // Filler, then a secret or an encoded form, then filler, ...
            let mut data = Vec::new();
            for (i, part) in filler.iter().enumerate() {
                data.extend_from_slice(part);
                if i + 1 < filler.len() {
                    data.extend_from_slice(list[picks[i].index(list.len())]);
                }
            }
            let masker = Masker::new(&refs);
            let out = stream_chunks(&masker, &data, &sizes);
            for p in &patterns {
                // A pattern made of `*` can be found in the mask itself; every encoding is not.
                if !p.contains(&b'*') {
                    prop_assert!(!contains(&out, p), "pattern left in output");
                }
            }
            prop_assert_eq!(out, batch(&patterns, &data));
        }

        #[test]
        fn masking_never_leaks_with_midstream_flushes(
            secret in secret_strategy(),
            filler in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 1..6),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 6),
            cuts in prop::collection::vec((1usize..50, any::<bool>()), 1..10),
        ) {
            // No `*` in the output's own bytes, so that removing the masks leaves only them.
            let no_star = |v: &[u8]| -> Vec<u8> {
                v.iter().map(|&b| if b == b'*' { b'+' } else { b }).collect()
            };
            let secret = no_star(&secret);
            let patterns = expected_patterns(&secret);
            let list: Vec<&Vec<u8>> = patterns.iter().collect();
            let mut data = Vec::new();
            for (i, part) in filler.iter().enumerate() {
                data.extend_from_slice(&no_star(part));
                if i + 1 < filler.len() {
                    data.extend_from_slice(list[picks[i].index(list.len())]);
                }
            }
            let masker = Masker::new(&[&secret]);
            let mut stream = masker.stream();
            let mut out = Vec::new();
            // Whether every flush found nothing held back, so had nothing to decide.
            let mut flushes_were_empty = true;
            let mut rest = data.as_slice();
            let sizes: Vec<usize> = cuts.iter().map(|&(size, _)| size).collect();
            for &(size, flush) in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at(size.min(rest.len()));
                stream.push(chunk, &mut out);
                if flush {
                    flushes_were_empty &= stream.held() == 0;
                    stream.flush(&mut out);
                    prop_assert_eq!(stream.held(), 0);
                }
                rest = tail;
            }
            stream.flush(&mut out);
            for p in &patterns {
                prop_assert!(!contains(&out, p), "pattern left in output");
            }
            // The bytes that were not masked come out once each, in order.
            let plain: Vec<u8> = out.iter().copied().filter(|&b| b != b'*').collect();
            let mut input = data.iter();
            prop_assert!(plain.iter().all(|b| input.any(|d| d == b)), "plain bytes changed");
            if flushes_were_empty {
                prop_assert_eq!(out, stream_chunks(&masker, &data, &sizes));
            }
        }

        #[test]
        fn output_without_secrets_is_unchanged(
            secrets in prop::collection::vec(prop::collection::vec(any::<u8>(), 8..40), 1..3),
            data in prop::collection::vec(any::<u8>(), 0..4096),
            sizes in prop::collection::vec(1usize..600, 1..5),
        ) {
            let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
            let patterns = expected_set(&refs);
            // "No secret": no pattern, and no tail of four or more bytes beginning one.
            prop_assume!(batch(&patterns, &data) == data);
            let masker = Masker::new(&refs);
            prop_assert_eq!(stream_chunks(&masker, &data, &sizes), data);
        }
    }
}
