//! An independent batch reference of the output masker's rules (the module docs of mask.rs),
//! written plainly for checking `Masker` and `MaskStream` against: by mask.rs's unit tests and
//! property tests, and by the `mask_stream` fuzz target, which both include this file with
//! `#[path]`. Not part of the daemon (never compiled into it). The includer's scope provides
//! `MASK`, `MAX_GAP`, `MIN_MASKED_TAIL` and `MIN_PIECE`.

use std::collections::HashSet;

use super::{MASK, MAX_GAP, MIN_MASKED_TAIL, MIN_PIECE};

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
                    (
                        rest.iter().fold(0u8, |acc, &bit| acc << 1 | bit),
                        rest.len(),
                    )
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

fn is_substring(secrets: &[&[u8]], piece: &[u8]) -> bool {
    secrets
        .iter()
        .any(|s| s.windows(piece.len()).any(|w| w == piece))
}

/// Which output bytes the rules cover; `tails`: apply the end-of-output tail rule.
pub fn covered(secrets: &[&[u8]], data: &[u8], tails: bool) -> Vec<bool> {
    let grams: HashSet<&[u8]> = secrets
        .iter()
        .filter(|s| s.len() >= MIN_PIECE)
        .flat_map(|s| s.windows(MIN_PIECE))
        .collect();
    let shorts: HashSet<&[u8]> = secrets
        .iter()
        .copied()
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
pub fn mask(secrets: &[&[u8]], data: &[u8]) -> Vec<u8> {
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
