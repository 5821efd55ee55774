//! The output masker of `agentkeys run` (`Masker` / `MaskStream`), checked against a plain
//! reference implementation written from the rules in mask.rs's module docs
//! (crates/broker/src/mask_reference.rs, shared with mask.rs's unit tests).
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

use agentkeys_broker::mask::{MASK, MAX_GAP, MAX_HELD, MIN_MASKED_TAIL, MIN_PIECE, Masker};
use arbitrary::{Result, Unstructured};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/broker/src/mask_reference.rs"]
mod reference;

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
            !reference::covered(&refs, &out, false).contains(&true),
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
            out == reference::mask(&refs, &data),
            "differs from the reference masking"
        );
    }
});
