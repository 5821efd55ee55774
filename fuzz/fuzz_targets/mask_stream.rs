//! The output masker of `agentkeys run` (`Masker` / `MaskStream`), checked against a plain
//! reference implementation written here from the rules in mask.rs's module docs.
//!
//! The input chooses one to three secrets, an output made of random filler, pieces of the
//! secrets raw, in hex with separators (the spacing and wrapping of `xxd`, `od`, `hexdump`), in
//! base64 at any stream offset and wrapped, partly percent-encoded, cut short, and long runs
//! (past the stream's 64 KiB block), and a chunking of that output, with or without flushes
//! between chunks. Properties:
//! - the stream never holds back more than `MAX_HELD` bytes, and nothing after a flush;
//! - no flushes before the end: the stream's output equals the reference's batch masking of the
//!   whole output, for every chunking (so every piece of 8 bytes or more in any view is masked,
//!   and every byte no rule covers passes unchanged and in order);
//! - flushes between chunks (the holdback deadline): no window of any view of the output
//!   matches a secret any more, and the unmasked bytes are the input's bytes in order.
#![no_main]

use std::collections::HashSet;

use agentkeys_broker::mask::{MASK, MAX_GAP, MAX_HELD, MIN_MASKED_TAIL, MIN_PIECE, Masker};
use arbitrary::{Result, Unstructured};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use libfuzzer_sys::fuzz_target;

/// A symbol of a view: its value and the first and last output byte it stands for.
type Sym = (u8, usize, usize);

struct View {
    syms: Vec<Sym>,
    /// Still open at the end of the output (the tail rule applies).
    open: bool,
    base64: bool,
    /// A hex or base64 phase's byte in progress at the end: its bits and their count.
    partial: Option<(u8, usize)>,
    /// The run's last character (or the output's last byte).
    last: usize,
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn base64_value(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    }
}

/// The runs of a hex or base64 view: characters (value, offset), and whether each is open at
/// the end. Separators between two characters: at most MAX_GAP of space, tab, CR, LF (and `:`
/// for hex); for base64 exactly one of them must be LF.
fn runs(data: &[u8], base64: bool) -> Vec<(Vec<(u8, usize)>, bool)> {
    let value = |b| {
        if base64 {
            base64_value(b)
        } else {
            hex_value(b)
        }
    };
    let sep = |b: u8| b" \t\r\n".contains(&b) || (!base64 && b == b':');
    let mut out = Vec::new();
    let mut cur: Vec<(u8, usize)> = Vec::new();
    let (mut gap, mut lf) = (0, 0);
    for (i, &b) in data.iter().enumerate() {
        if let Some(v) = value(b) {
            if !cur.is_empty() && gap > 0 && base64 && lf != 1 {
                out.push((std::mem::take(&mut cur), false));
            }
            cur.push((v, i));
            (gap, lf) = (0, 0);
        } else if sep(b) {
            if !cur.is_empty() {
                gap += 1;
                lf += usize::from(b == b'\n');
                if gap > MAX_GAP {
                    out.push((std::mem::take(&mut cur), false));
                }
            }
        } else if !cur.is_empty() {
            out.push((std::mem::take(&mut cur), false));
        }
    }
    if !cur.is_empty() {
        out.push((cur, true));
    }
    out
}

fn views(data: &[u8]) -> Vec<View> {
    let last = data.len().saturating_sub(1);
    let mut views = vec![View {
        syms: data.iter().enumerate().map(|(i, &b)| (b, i, i)).collect(),
        open: true,
        base64: false,
        partial: None,
        last,
    }];
    let mut url = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let digits = (data.get(i + 1).copied().and_then(hex_value))
            .zip(data.get(i + 2).copied().and_then(hex_value));
        match (data[i], digits) {
            (b'%', Some((hi, lo))) => {
                url.push((hi << 4 | lo, i, i + 2));
                i += 3;
            }
            (b, _) => {
                url.push((b, i, i));
                i += 1;
            }
        }
    }
    views.push(View {
        syms: url,
        open: true,
        base64: false,
        partial: None,
        last,
    });
    for (base64, bits, aligns) in [(false, 4usize, &[0usize, 4][..]), (true, 6, &[0, 2, 4, 6])] {
        for (run, open) in runs(data, base64) {
            let bitstring: Vec<u8> = run
                .iter()
                .flat_map(|&(v, _)| (0..bits).rev().map(move |k| (v >> k) & 1))
                .collect();
            for &a in aligns {
                let mut syms = Vec::new();
                let mut start = a;
                while start + 8 <= bitstring.len() {
                    let v = bitstring[start..start + 8]
                        .iter()
                        .fold(0u8, |acc, &bit| acc << 1 | bit);
                    syms.push((v, run[start / bits].1, run[(start + 7) / bits].1));
                    start += 8;
                }
                let partial = (start < bitstring.len()).then(|| {
                    let rest = &bitstring[start..];
                    (rest.iter().fold(0u8, |acc, &bit| acc << 1 | bit), rest.len())
                });
                views.push(View {
                    syms,
                    open,
                    base64,
                    partial,
                    last: run.last().map_or(0, |c| c.1),
                });
            }
        }
    }
    views
}

fn is_substring(secrets: &[Vec<u8>], piece: &[u8]) -> bool {
    secrets
        .iter()
        .any(|s| s.windows(piece.len()).any(|w| w == piece))
}

/// Which output bytes the rules cover; `tails`: apply the end-of-output tail rule.
fn covered(secrets: &[Vec<u8>], data: &[u8], tails: bool) -> Vec<bool> {
    let grams: HashSet<&[u8]> = secrets
        .iter()
        .filter(|s| s.len() >= MIN_PIECE)
        .flat_map(|s| s.windows(MIN_PIECE))
        .collect();
    let shorts: HashSet<&[u8]> = secrets
        .iter()
        .map(Vec::as_slice)
        .filter(|s| !s.is_empty() && s.len() < MIN_PIECE)
        .collect();
    let mut lens: Vec<usize> = shorts.iter().map(|s| s.len()).collect();
    lens.sort_unstable();
    lens.dedup();
    lens.push(MIN_PIECE);
    let mut covered = vec![false; data.len()];
    let mut pads = Vec::new();
    for view in views(data) {
        let values: Vec<u8> = view.syms.iter().map(|s| s.0).collect();
        for i in 0..values.len() {
            for &k in &lens {
                let Some(window) = values.get(i..i + k) else {
                    continue;
                };
                let hit = if k == MIN_PIECE {
                    grams.contains(window)
                } else {
                    shorts.contains(window)
                };
                if hit {
                    let end = view.syms[i + k - 1].2;
                    covered[view.syms[i].1..=end].fill(true);
                    if view.base64 {
                        pads.push(end);
                    }
                }
            }
        }
        if tails && view.open {
            let n = values.len();
            let t = (1..=n.min(MIN_PIECE - 1))
                .take_while(|&t| is_substring(secrets, &values[n - t..]))
                .last()
                .unwrap_or(0);
            if t >= MIN_MASKED_TAIL {
                covered[view.syms[n - t].1..=view.syms[n - 1].2].fill(true);
            }
            // A byte in progress that continues the tail: covered to the run's last character.
            if let Some((v, r)) = view.partial {
                let continues = |t: usize| {
                    secrets.iter().any(|s| {
                        (0..s.len()).any(|i| {
                            i + t < s.len()
                                && s[i..i + t] == values[n - t..]
                                && s[i + t] >> (8 - r) == v
                        })
                    })
                };
                if let Some(t) = (0..=n.min(MIN_PIECE - 1))
                    .take_while(|&t| continues(t))
                    .last()
                    && t >= MIN_MASKED_TAIL
                {
                    covered[view.syms[n - t].1..=view.last].fill(true);
                }
            }
        }
    }
    for e in pads {
        if data.get(e + 1) == Some(&b'=') {
            covered[e + 1] = true;
            if data.get(e + 2) == Some(&b'=') {
                covered[e + 2] = true;
            }
        }
    }
    covered
}

/// Batch masking of a whole output: one mask per maximal covered run.
fn reference(secrets: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
    let covered = covered(secrets, data, true);
    let mut out = Vec::with_capacity(data.len());
    for i in 0..data.len() {
        if !covered[i] {
            out.push(data[i]);
        } else if i == 0 || !covered[i - 1] {
            out.extend_from_slice(MASK);
        }
    }
    out
}

/// A secret: arbitrary bytes, or token-like bytes from a small alphabet so that pieces,
/// encodings, neighbours and other secrets collide often.
fn secret(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let len = u.int_in_range(1..=48)?;
    let small = u.arbitrary::<bool>()?;
    (0..len)
        .map(|_| {
            if small {
                Ok(*u.choose(b"ab0/+\0\n=%-_Zz9 :")?)
            } else {
                u.arbitrary::<u8>()
            }
        })
        .collect()
}

/// Appends `piece` in a layout chosen by the input.
fn lay_out(u: &mut Unstructured<'_>, piece: &[u8], data: &mut Vec<u8>) -> Result<()> {
    match u.int_in_range(0..=5)? {
        0 => data.extend_from_slice(piece),
        // Hex, either case, with the separators of the common dump tools (or too many).
        1 => {
            let seps: [&[u8]; 7] = [b"", b" ", b"  ", b"\n", b":", b"\n ", b"         "];
            let upper = u.arbitrary::<bool>()?;
            for &b in piece {
                let d = format!("{b:02x}");
                data.extend_from_slice(if upper { d.to_uppercase() } else { d }.as_bytes());
                data.extend_from_slice(u.choose(&seps)?);
            }
        }
        // Base64 of the piece inside other bytes, either alphabet, wrapped or not.
        2 => {
            let before = u.int_in_range(0..=3)?;
            let mut stream = u.bytes(before.min(u.len()))?.to_vec();
            stream.extend_from_slice(piece);
            let after = u.int_in_range(0..=2)?;
            stream.extend_from_slice(u.bytes(after.min(u.len()))?);
            let enc = if u.arbitrary::<bool>()? {
                STANDARD.encode(&stream)
            } else {
                URL_SAFE_NO_PAD.encode(&stream)
            };
            let width = *u.choose(&[3usize, 4, 7, 64, 76, 4096])?;
            let eol: &[u8] = u.choose(&[&b"\n"[..], b"\r\n", b"\n    ", b" "])?;
            for line in enc.as_bytes().chunks(width) {
                data.extend_from_slice(line);
                data.extend_from_slice(eol);
            }
        }
        // Percent-encoding of some bytes, either case.
        3 => {
            for &b in piece {
                if u.arbitrary::<bool>()? {
                    let d = if u.arbitrary::<bool>()? {
                        format!("%{b:02X}")
                    } else {
                        format!("%{b:02x}")
                    };
                    data.extend_from_slice(d.as_bytes());
                } else {
                    data.push(b);
                }
            }
        }
        // The piece cut short (a truncated secret, or one split by a flush).
        4 => {
            let len = u.int_in_range(0..=piece.len())?;
            data.extend_from_slice(&piece[..len]);
        }
        // An unfinished escape or a lone `=`.
        _ => data.extend_from_slice(u.choose(&[&b"%"[..], b"%4", b"=", b"=="])?),
    }
    Ok(())
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
            0..=9 => {
                let len = u.int_in_range(0..=64)?;
                data.extend_from_slice(u.bytes(len.min(u.len()))?);
            }
            // A piece of a secret (a whole one, a prefix, a suffix, a middle), in a layout.
            10..=29 => {
                let s = u.choose(&secrets)?;
                let start = u.int_in_range(0..=s.len() - 1)?;
                let end = u.int_in_range(start + 1..=s.len())?;
                let piece = s[start..end].to_vec();
                lay_out(u, &piece, &mut data)?;
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
        // With flushes the checks below look at the output itself; keep `*` (the mask) out of
        // everything else so that masks stand apart.
        for v in secrets.iter_mut().chain(std::iter::once(&mut data)) {
            for b in v.iter_mut().filter(|b| **b == b'*') {
                *b = b'+';
            }
        }
    }
    let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
    let masker = Masker::new(&refs);

    let mut stream = masker.stream();
    let mut out = Vec::new();
    let mut rest = data.as_slice();
    for &(size, flush) in cuts.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        stream.push(chunk, &mut out);
        assert!(stream.held() <= MAX_HELD, "held back more than MAX_HELD");
        if flush {
            stream.flush(&mut out);
            assert_eq!(stream.held(), 0);
        }
        rest = tail;
    }
    stream.flush(&mut out);
    assert_eq!(stream.held(), 0);

    if flushing {
        assert!(
            !covered(&secrets, &out, false).contains(&true),
            "a piece of a secret left in the output"
        );
        // The unmasked bytes are the input's, once each and in order.
        let mut input = data.iter();
        assert!(
            out.iter()
                .filter(|&&b| b != b'*')
                .all(|b| input.any(|d| d == b)),
            "unmasked bytes changed"
        );
    } else {
        assert!(
            out == reference(&secrets, &data),
            "differs from the reference masking"
        );
    }
});
