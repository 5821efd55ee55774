//! Streaming output masking for daemon-mediated `run`.
//!
//! The child's stdout and stderr each pass through a [`MaskStream`] built from one [`Masker`]
//! per run. Every piece of a delivered secret that is [`MIN_PIECE`] (8) bytes or longer, found
//! in the output as it is or in one of the encoded layouts below, becomes [`MASK`]; every other
//! byte passes through unchanged and in order, also when a piece is split across reads.
//!
//! # Views
//! The output is read in four ways at once. Each *view* is a sequence of *symbols* (byte
//! values), each symbol standing for a span of output bytes:
//! - **raw**: every output byte is a symbol;
//! - **url**: as raw, except that `%XX` (`X` a hex digit of either case) is one symbol, the byte
//!   `0xXX`, spanning the three bytes: URL (percent) encoding of any or all bytes;
//! - **hex**: hex digits (`0-9 a-f A-F`) form *runs*; between two digits of a run there may be
//!   up to [`MAX_GAP`] (8) bytes of space, tab, CR, LF or `:`, which are skipped (`xxd -p`
//!   wrapping, `od -An -tx1` and `hexdump -C` spacing, `xxd` groups, `aa:bb:cc`); any other
//!   byte ends the run. Each run is decoded into bytes twice, pairing its digits from the first
//!   and from the second one (bit offsets 0 and 4); a decoded byte spans its two digits;
//! - **base64**: characters of the standard and URL-safe alphabets (`A-Z a-z 0-9 + / - _`)
//!   form runs; between two characters of a run there may be one line break (LF or CRLF), with
//!   spaces or tabs around it, MAX_GAP bytes in all, which is skipped (`base64` wraps at 76,
//!   `openssl base64` at 64, indented PEM and YAML blocks); `=` or any other byte ends the run.
//!   Each run is decoded into bytes four ways, taking its bit string from bit 0, 2, 4 and 6
//!   (so a secret is found at whatever offset the encoder met it); a decoded byte spans the
//!   characters that hold its bits.
//!
//! # What is masked
//! - **Pieces**: every [`MIN_PIECE`] consecutive symbols of a view that equal
//!   [`MIN_PIECE`] consecutive bytes of a secret at least that long; every run of symbols equal
//!   to a whole secret shorter than that (so a short secret is masked whole, not in parts). A
//!   match covers the output bytes from the start of its first symbol to the end of its last,
//!   skipped separators included. Up to two `=` right after a base64 match are covered too.
//!   Longer matches are unions of these windows: a whole secret, a prefix (`head -c`), a suffix
//!   (`cut -c5-`), the pieces of a secret split over lines or streams, each 8 bytes or more.
//! - **Tails**: when the stream is flushed (at its end, and after the caller's holdback
//!   deadline, a few milliseconds of silence), the last symbols of each view that are still open
//!   (at most 7) and equal a substring of a secret are covered if they are [`MIN_MASKED_TAIL`]
//!   (4) or more (with the characters of a hex or base64 byte in progress that continues them):
//!   a secret printed slowly, or cut short at the end of the output, shows at most 3 symbols
//!   before the mask.
//! - The union of everything covered becomes masks: each maximal run of covered bytes is one
//!   [`MASK`]. The result is the same for every way the output is cut into chunks as for the
//!   whole output at once (tested against a plain batch implementation), provided the stream is
//!   flushed only at its end.
//!
//! # Holdback
//! A stream holds back only the bytes a later match or a flush could still cover: the last
//! symbols of each view that equal a substring of a secret (at most 7 symbols, and the bytes
//! after them), an unfinished `%X` escape, and the character of a hex or base64 byte in
//! progress whose bits could begin a piece; at most [`MAX_HELD`] bytes, and none after output that no view can continue. The
//! caller flushes after a few milliseconds of silence so that a prompt is not stuck; the views
//! keep matching across a flush, so a piece completed after it is masked from there on.
//!
//! # Limits
//! Masking is a seatbelt against accidents, not a boundary. Not masked: pieces shorter than
//! 8 bytes (at a line break of a hex dump's or base64's layout that this does not skip, at a
//! split between stdout and stderr, or anywhere a program cuts the secret into short parts), and
//! any other transformation (`rev`, `tr`, one character per line, a space between characters
//! as `od -c` prints them, compression, encryption, base32, double encodings, `hexdump` without
//! `-C` (byte-swapped words), `xxd -i`, `\x` escapes). A
//! secret that contains common text masks that text wherever it appears (a PEM key masks other
//! PEM blocks' `-----BEGIN ` lines, a JSON credential masks its key names in other JSON), and a
//! secret of a few bytes masks every occurrence of those bytes.
//!
//! # Memory
//! The masker keeps no encoded forms, only one table of the secrets' own 8-byte windows (8
//! bytes each, sorted), the last 7 suffixes of each secret (for substrings near its end), and a
//! filter of keyed-hash bits (a random key per masker) that lets plain output skip the table:
//! about 10 bytes per secret byte ([`Masker::footprint`], capped per run and per daemon by the
//! caller through [`MaskBudget`]). Every table and buffer is zeroize-on-drop and sized before
//! it is filled, so none reallocates; identical secrets are counted once; no type that holds
//! anything derived from a secret implements `Debug`.

use std::hash::BuildHasher;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use zeroize::{Zeroize, Zeroizing};

/// What every masked run of output is replaced with.
pub const MASK: &[u8] = b"********";

/// The shortest piece of a secret masked on its own: 8 bytes (16 hex digits, 11 base64
/// characters). Secrets shorter than this are masked only whole.
pub const MIN_PIECE: usize = 8;

/// At a flush, an open tail of at least this many symbols that is a piece of a secret is
/// masked; a shorter one is emitted.
pub const MIN_MASKED_TAIL: usize = 4;

/// Most separator bytes skipped between two characters of a hex or base64 run.
pub const MAX_GAP: usize = 8;

/// Most bytes a stream ever holds back: 15 hex digits (7 decoded bytes and half of the next),
/// each followed by up to [`MAX_GAP`] separators.
pub const MAX_HELD: usize = (2 * (MIN_PIECE - 1) + 1) * (MAX_GAP + 1);

/// How much new output a stream scans at a time, on top of its holdback.
const BLOCK: usize = 64 * 1024;

/// Window length in symbols, as used in shifts and lane lengths.
const W: u32 = MIN_PIECE as u32;

/// Classes of a byte in the hex and base64 views: values below 64 are characters.
const SEP: u8 = 0xFD;
const PAD: u8 = 0xFE;
const OTHER: u8 = 0xFF;

const fn hex_classes() -> [u8; 256] {
    let mut t = [OTHER; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t[b' ' as usize] = SEP;
    t[b'\t' as usize] = SEP;
    t[b'\r' as usize] = SEP;
    t[b'\n' as usize] = SEP;
    t[b':' as usize] = SEP;
    t
}

const fn base64_classes() -> [u8; 256] {
    let mut t = [OTHER; 256];
    let mut i = 0;
    while i < 26 {
        t[b'A' as usize + i] = i as u8;
        t[b'a' as usize + i] = 26 + i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = 52 + i as u8;
        i += 1;
    }
    t[b'+' as usize] = 62;
    t[b'-' as usize] = 62;
    t[b'/' as usize] = 63;
    t[b'_' as usize] = 63;
    t[b'=' as usize] = PAD;
    t[b' ' as usize] = SEP;
    t[b'\t' as usize] = SEP;
    t[b'\r' as usize] = SEP;
    t[b'\n' as usize] = SEP;
    t
}

static HEX_CLASS: [u8; 256] = hex_classes();
static BASE64_CLASS: [u8; 256] = base64_classes();

/// The secrets of one run, ready for matching. Built once per run; no `Debug`.
pub struct Masker {
    table: Table,
    footprint: usize,
    /// The share of the daemon's budget this masker holds, given back when it is dropped.
    _reservation: Option<MaskReservation>,
}

/// Why a masker could not be built within its caps.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// The run's secrets need more table memory than one run may take.
    #[error(
        "masking these secrets needs {need} bytes of tables, more than [daemon] max_mask_bytes_per_run ({cap} bytes): raise it in config.toml, or run with --no-masking"
    )]
    OverRunCap {
        /// What the tables would take.
        need: usize,
        /// `max_mask_bytes_per_run`.
        cap: usize,
    },
    /// The daemon's masking budget is taken by other runs.
    #[error(
        "masking these secrets needs {need} bytes of tables, but only {free} of [daemon] max_mask_bytes ({cap} bytes) are free while other masked runs are in progress: try again when they end, or run with --no-masking"
    )]
    OverDaemonBudget {
        /// What the tables would take.
        need: usize,
        /// What is left of the budget.
        free: usize,
        /// `max_mask_bytes`.
        cap: usize,
    },
}

/// The memory all maskers of a daemon may hold at once (`[daemon] max_mask_bytes`). Shared by
/// every run; each masker holds a [`MaskReservation`] until it is dropped.
pub struct MaskBudget {
    cap: usize,
    used: Mutex<usize>,
}

impl MaskBudget {
    /// A budget of `cap` bytes.
    #[must_use]
    pub fn new(cap: usize) -> Arc<MaskBudget> {
        Arc::new(MaskBudget {
            cap,
            used: Mutex::new(0),
        })
    }

    /// Bytes currently reserved by live maskers.
    #[must_use]
    pub fn used(&self) -> usize {
        *self
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `bytes` from the budget until the returned reservation is dropped.
    ///
    /// # Errors
    /// [`MaskError::OverDaemonBudget`] when less than `bytes` is free.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Result<MaskReservation, MaskError> {
        let mut used = self
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let free = self.cap.saturating_sub(*used);
        if bytes > free {
            return Err(MaskError::OverDaemonBudget {
                need: bytes,
                free,
                cap: self.cap,
            });
        }
        *used += bytes;
        Ok(MaskReservation {
            budget: Arc::clone(self),
            bytes,
        })
    }
}

/// A share of a [`MaskBudget`], given back on drop.
pub struct MaskReservation {
    budget: Arc<MaskBudget>,
    bytes: usize,
}

impl Drop for MaskReservation {
    fn drop(&mut self) {
        let mut used = self
            .budget
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *used = used.saturating_sub(self.bytes);
    }
}

/// The distinct non-empty secrets, by content.
fn distinct<'a>(secrets: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut list: Vec<&[u8]> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
    list.sort_unstable();
    list.dedup();
    list
}

/// Entry counts of the table for some distinct secrets.
struct Sizes {
    grams: usize,
    pieces: usize,
    bloom_words: usize,
}

impl Sizes {
    fn of(secrets: &[&[u8]]) -> Sizes {
        let mut grams = 0usize;
        let mut pieces = 0usize;
        let mut wholes = 0usize;
        for s in secrets {
            let len = s.len();
            if len >= MIN_PIECE {
                grams = grams.saturating_add(len - MIN_PIECE + 1);
                pieces += MIN_PIECE - 1;
            } else {
                pieces += len;
                wholes += 1;
            }
        }
        // About 16 filter bits per entry, in whole 64-bit words, a power of two of them.
        let words = grams
            .saturating_add(wholes)
            .div_ceil(4)
            .max(MIN_BLOOM_WORDS)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX);
        Sizes {
            grams,
            pieces,
            bloom_words: words,
        }
    }

    fn bytes(&self) -> usize {
        self.grams
            .saturating_mul(8)
            .saturating_add(self.pieces.saturating_mul(16))
            .saturating_add(self.bloom_words.saturating_mul(8))
            .saturating_add(std::mem::size_of::<Masker>())
    }
}

/// The smallest filter: 1024 bits.
const MIN_BLOOM_WORDS: usize = 16;

impl Masker {
    /// A masker for `secrets` (empty ones are ignored, identical ones counted once), outside
    /// any budget: for tests and tools. The daemon uses [`Masker::with_budget`].
    #[must_use]
    pub fn new(secrets: &[&[u8]]) -> Masker {
        let secrets = distinct(secrets);
        let sizes = Sizes::of(&secrets);
        Masker {
            footprint: sizes.bytes(),
            table: Table::build(&secrets, &sizes),
            _reservation: None,
        }
    }

    /// A masker whose tables take at most `per_run` bytes and come out of `budget` until it
    /// is dropped. Checked before anything derived from the secrets is allocated.
    ///
    /// # Errors
    /// [`MaskError::OverRunCap`] or [`MaskError::OverDaemonBudget`].
    pub fn with_budget(
        secrets: &[&[u8]],
        per_run: usize,
        budget: &Arc<MaskBudget>,
    ) -> Result<Masker, MaskError> {
        let secrets = distinct(secrets);
        let sizes = Sizes::of(&secrets);
        let need = sizes.bytes();
        if need > per_run {
            return Err(MaskError::OverRunCap { need, cap: per_run });
        }
        let reservation = budget.reserve(need)?;
        Ok(Masker {
            footprint: need,
            table: Table::build(&secrets, &sizes),
            _reservation: Some(reservation),
        })
    }

    /// The bytes a masker for `secrets` takes (what the caps are checked against): its tables
    /// (an upper bound: identical windows are removed after the tables are sized) and itself.
    #[must_use]
    pub fn footprint(secrets: &[&[u8]]) -> usize {
        Sizes::of(&distinct(secrets)).bytes()
    }

    /// This masker's [`footprint`](Self::footprint).
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.footprint
    }

    /// True without secrets: streams then pass everything through at once.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.table.grams.is_empty() && self.table.pieces.is_empty()
    }

    /// A masking stream for one output (stdout or stderr) borrowing this masker. Use
    /// [`MaskStream::new`] with an `Arc<Masker>` for a stream that owns its masker.
    #[must_use]
    pub fn stream(&self) -> MaskStream<&Masker> {
        MaskStream::new(self)
    }
}

/// The secrets' windows, for exact lookups and substring queries. No `Debug`.
struct Table {
    /// Every [`MIN_PIECE`]-byte window of the secrets that long, big-endian in a `u64`, sorted,
    /// without duplicates.
    grams: Zeroizing<Vec<u64>>,
    /// Shorter pieces: the last 7 suffixes of each long secret (so that every substring near
    /// its end is the prefix of something stored) and every suffix of each short secret. Each
    /// is `key << 8 | len << 1 | whole`, `key` the bytes left-aligned in a `u64` (zeros after),
    /// `whole` set for a short secret itself; sorted, without duplicates.
    pieces: Zeroizing<Vec<u128>>,
    /// A blocked Bloom filter over the grams and the whole short secrets: two bits in one word
    /// per entry, placed by a keyed multiplicative hash. Plain output skips the binary search.
    bloom: Zeroizing<Vec<u64>>,
    /// `64 - log2(bloom.len())`: the hash's top bits pick the word.
    word_shift: u32,
    /// The hash keys, random per masker.
    keys: Zeroizing<[u64; 2]>,
    /// Bit `k` set: some secret is exactly `k` (< 8) bytes long.
    whole_lens: u32,
    /// Bit `b` set: byte `b` occurs in a secret (so it begins a piece).
    present: Zeroizing<[u64; 4]>,
    /// The fewest bits a decoded run needs before any window can match: 64, or 8 times the
    /// shortest short secret.
    min_bits: u64,
}

/// A piece entry: see [`Table::pieces`].
fn piece(bytes: &[u8], whole: bool) -> u128 {
    let mut key = 0u64;
    for (i, &b) in bytes.iter().take(MIN_PIECE).enumerate() {
        key |= u64::from(b) << (56 - 8 * i);
    }
    let len = bytes.len().min(MIN_PIECE) as u128;
    (u128::from(key) << 8) | (len << 1) | u128::from(whole)
}

/// The low `k` bytes of a window (`k` in 1..=8).
fn low(w: u64, k: u32) -> u64 {
    if k >= 8 {
        w
    } else {
        w & ((1u64 << (8 * k)) - 1)
    }
}

impl Table {
    fn build(secrets: &[&[u8]], sizes: &Sizes) -> Table {
        let mut grams = Zeroizing::new(Vec::with_capacity(sizes.grams));
        let mut pieces = Zeroizing::new(Vec::with_capacity(sizes.pieces));
        let mut whole_lens = 0u32;
        let mut present = Zeroizing::new([0u64; 4]);
        let mut w = Zeroizing::new(0u64);
        for s in secrets {
            for &b in s.iter() {
                present[usize::from(b >> 6)] |= 1 << (b & 63);
            }
            if s.len() >= MIN_PIECE {
                for (i, &b) in s.iter().enumerate() {
                    *w = (*w << 8) | u64::from(b);
                    if i + 1 >= MIN_PIECE {
                        grams.push(*w);
                    }
                }
                for i in s.len() + 1 - MIN_PIECE..s.len() {
                    pieces.push(piece(&s[i..], false));
                }
            } else {
                whole_lens |= 1 << s.len();
                for i in 0..s.len() {
                    pieces.push(piece(&s[i..], i == 0));
                }
            }
        }
        // In place: no reallocation (dedup only moves entries down and truncates; the tail
        // left in the spare capacity is wiped with the rest on drop).
        grams.sort_unstable();
        grams.dedup();
        pieces.sort_unstable();
        // The same piece as a suffix and as a whole short secret: one entry, whole.
        let mut kept = 0;
        for i in 0..pieces.len() {
            let p = pieces[i];
            if kept > 0 && pieces[kept - 1] >> 1 == p >> 1 {
                pieces[kept - 1] |= p & 1;
            } else {
                pieces[kept] = p;
                kept += 1;
            }
        }
        pieces[kept..].zeroize();
        pieces.truncate(kept);

        let state = std::collections::hash_map::RandomState::new();
        let keys = Zeroizing::new([
            state.hash_one(0x6b65_7930u64),
            state.hash_one(0x6b65_7931u64) | 1,
        ]);
        let words = sizes.bloom_words;
        let mut table = Table {
            grams,
            pieces,
            bloom: Zeroizing::new(vec![0u64; words]),
            word_shift: 64 - words.trailing_zeros(),
            keys,
            whole_lens,
            present,
            min_bits: 8 * u64::from(if whole_lens == 0 {
                W
            } else {
                whole_lens.trailing_zeros()
            }),
        };
        for i in 0..table.grams.len() {
            let (word, bits) = table.probe(table.grams[i], W);
            table.bloom[word] |= bits;
        }
        for i in 0..table.pieces.len() {
            let p = table.pieces[i];
            if p & 1 == 1 {
                let k = (p as u32 & 0xff) >> 1;
                let key = ((p >> 8) as u64) >> (64 - 8 * k);
                let (word, bits) = table.probe(key, k);
                table.bloom[word] |= bits;
            }
        }
        table
    }

    /// The filter word and its two bits for a window of `k` symbols (right-aligned in `key`).
    #[inline(always)]
    fn probe(&self, key: u64, k: u32) -> (usize, u64) {
        let h = (key ^ self.keys[0] ^ (u64::from(k) << 59)).wrapping_mul(self.keys[1]);
        let word = (h >> self.word_shift) as usize;
        // The next 12 bits below the word index place the two bits.
        let below = h >> (self.word_shift - 12);
        (word, (1u64 << (below & 63)) | (1u64 << ((below >> 6) & 63)))
    }

    #[inline(always)]
    fn maybe(&self, key: u64, k: u32) -> bool {
        let (word, bits) = self.probe(key, k);
        self.bloom[word] & bits == bits
    }

    /// Whether the 8 symbols in `w` are a window of a secret.
    #[inline(always)]
    fn has_gram(&self, w: u64) -> bool {
        self.maybe(w, W) && self.grams.binary_search(&w).is_ok()
    }

    /// Whether the low `k` (< 8) bytes of `key` are a whole secret.
    #[inline]
    fn has_whole(&self, key: u64, k: u32) -> bool {
        self.maybe(key, k)
            && self
                .pieces
                .binary_search(&((u128::from(key << (64 - 8 * k)) << 8) | u128::from(k << 1 | 1)))
                .is_ok()
    }

    /// Whether the low `nbits` (1..64) bits of `key` begin a gram or a stored piece: whether
    /// they are the first bits of a byte-aligned substring of a secret.
    fn is_prefix(&self, key: u64, nbits: u32) -> bool {
        let shift = 64 - nbits;
        let lo = key << shift;
        let hi = lo | ((1u64 << shift) - 1);
        let i = self.grams.partition_point(|&g| g < lo);
        if self.grams.get(i).is_some_and(|&g| g <= hi) {
            return true;
        }
        // Pieces beginning with these bits are adjacent; at most 7 of them are too short to
        // hold them all (one per length), so this loop is short.
        let mut j = self.pieces.partition_point(|&p| ((p >> 8) as u64) < lo);
        while let Some(&p) = self.pieces.get(j) {
            if (p >> 8) as u64 > hi {
                break;
            }
            if 8 * ((p as u32 & 0xff) >> 1) >= nbits {
                return true;
            }
            j += 1;
        }
        false
    }

    /// Whether the low `t` bytes of `key` (`t` in 1..8) are a substring of a secret.
    fn is_piece(&self, key: u64, t: u32) -> bool {
        self.is_prefix(key, 8 * t)
    }

    /// Whether some byte of a secret begins with the `r` (1..8) bits of `value`: whether a
    /// hex or base64 byte of which only these bits have arrived could begin a piece.
    fn begins_piece(&self, value: u64, r: u32) -> bool {
        let first = (value << (8 - r)) as usize & 0xff;
        (first..first + (1 << (8 - r))).any(|b| self.present[b >> 6] >> (b & 63) & 1 == 1)
    }

    /// How many of the newest bytes `w` (`len` of them; at most 7 count), followed by the `r`
    /// bits `value` of the byte being decoded, begin a substring of a secret; `None` if not
    /// even those bits do.
    fn partial_tail(&self, w: u64, len: u32, value: u64, r: u32) -> Option<u32> {
        if !self.begins_piece(value, r) {
            return None;
        }
        let mut t = 0;
        while t < len.min(W - 1) && self.is_prefix((low(w, t + 1) << r) | value, 8 * (t + 1) + r) {
            t += 1;
        }
        Some(t)
    }

    /// The number of symbols of the longest match ending at the newest of the `len` symbols in
    /// `w`, among windows longer than `skip` symbols (the url view skips windows the raw view
    /// saw).
    #[inline(always)]
    fn longest_match(&self, w: u64, len: u32, skip: u32) -> Option<u32> {
        if len >= W && skip < W && self.has_gram(w) {
            return Some(W);
        }
        if self.whole_lens == 0 {
            return None;
        }
        // Whole short secrets of at most `len` and more than `skip` bytes, longest first.
        let mut lens = self.whole_lens & ((2u32 << len.min(7)) - 1) & !((2u32 << skip.min(7)) - 1);
        while lens != 0 {
            let k = 31 - lens.leading_zeros();
            if self.has_whole(low(w, k), k) {
                return Some(k);
            }
            lens &= !(1 << k);
        }
        None
    }

    /// How many of the newest of the `len` symbols in `w` (at most 7) form a substring of a
    /// secret.
    fn open_tail(&self, w: u64, len: u32) -> u32 {
        let mut t = 0;
        while t < len.min(W - 1) && self.is_piece(low(w, t + 1), t + 1) {
            t += 1;
        }
        t
    }
}

/// The newest symbols of the url view or of one decoding phase of a hex or base64 run.
#[derive(Clone, Default, Zeroize)]
struct Lane {
    /// The last 8 symbols, newest in the low byte.
    w: u64,
    /// How many symbols the lane has (in its current run), up to 8.
    len: u32,
    /// Symbols pushed in all, to index `starts`.
    count: u64,
    /// Where each of the last 8 symbols starts in the output (absolute offset).
    starts: [u64; 8],
    /// Where the newest symbol ends.
    end: u64,
}

impl Lane {
    #[inline(always)]
    fn push(&mut self, sym: u8, start: u64, end: u64) {
        self.w = (self.w << 8) | u64::from(sym);
        self.starts[(self.count & 7) as usize] = start;
        self.count = self.count.wrapping_add(1);
        self.end = end;
        self.len = (self.len + 1).min(W);
    }

    /// Where the `k`-th newest symbol starts (`k` in 1..=len).
    #[inline(always)]
    fn start_of(&self, k: u32) -> u64 {
        self.starts[(self.count.wrapping_sub(u64::from(k)) & 7) as usize]
    }

    /// The lane of the last `len` raw bytes, the newest at `end`.
    fn of_raw(w: u64, len: u32, end: u64) -> Lane {
        let mut lane = Lane {
            w,
            len,
            count: 8,
            starts: [0; 8],
            end,
        };
        for k in 1..=len {
            lane.starts[(8 - k) as usize] = end + 1 - u64::from(k);
        }
        lane
    }
}

/// The url view: raw bytes, `%XX` decoded. Its lane is kept only while a decoded escape is
/// among its last 8 symbols, or may come next: elsewhere its windows are the raw view's, which
/// are checked already, and at the next `%` it starts over from the raw view's last bytes.
#[derive(Clone, Zeroize)]
struct UrlView {
    lane: Lane,
    /// An escape in progress: `%` and maybe its first digit.
    pending: [u8; 2],
    npending: u8,
    /// Where its `%` is.
    pending_at: u64,
    /// Symbols pushed since the last decoded escape (0: the newest is one), up to 8: a window
    /// of `k` symbols holds an escape when this is below `k`.
    esc_age: u32,
}

impl Default for UrlView {
    fn default() -> Self {
        UrlView {
            lane: Lane::default(),
            pending: [0; 2],
            npending: 0,
            pending_at: 0,
            esc_age: W,
        }
    }
}

/// A hex (`BITS` 4, 2 phases) or base64 (`BITS` 6, 4 phases) view: the current run's bit
/// string, decoded from bit offsets `0, STEP, ..` (mod 8), `STEP = 8 / PHASES`.
///
/// Phase `i` (offset `a = i * STEP`) decodes the bytes at bits `a + 8j .. a + 8j + 8` of the
/// run. Once a run has two characters, each new character completes one byte of `BITS / STEP`
/// phases: the byte ending `shift` bits before the run's end, for `shift` in `0, STEP, ..`
/// below `BITS`, belongs to the phase at offset `(bits - shift) mod 8`, and the 8 bytes of
/// that phase ending there are bits `shift .. shift + 64` of `acc`. A byte spans the characters
/// holding its bits (two, at these offsets).
#[derive(Zeroize)]
struct Decoder<const BITS: u32, const PHASES: usize> {
    /// The run's newest bits (at least 8 bytes and a byte in progress), newest lowest.
    acc: u128,
    /// Characters in the run so far.
    count: u64,
    /// Where the run's last 32 characters are, by character number mod 32 (8 decoded bytes
    /// and a byte in progress take at most 17 hex digits).
    chars: [u64; 32],
    /// Separator bytes since the last character, and how many of them were LF.
    gap: u32,
    lf: u32,
    /// A run is in progress (no other byte and no overlong gap since its last character).
    open: bool,
}

impl<const BITS: u32, const PHASES: usize> Default for Decoder<BITS, PHASES> {
    fn default() -> Self {
        Decoder {
            acc: 0,
            count: 0,
            chars: [0; 32],
            gap: 0,
            lf: 0,
            open: false,
        }
    }
}

impl<const BITS: u32, const PHASES: usize> Decoder<BITS, PHASES> {
    const STEP: u64 = 8 / PHASES as u64;

    /// Whether the gap since the last character lets the run go on: any gap of hex
    /// separators (its length is checked as it grows); for base64, exactly one line break.
    #[inline(always)]
    fn gap_continues(&self) -> bool {
        self.gap == 0 || BITS == 4 || self.lf == 1
    }

    /// Where character `c` of the run is.
    #[inline(always)]
    fn char_at(&self, c: u64) -> u64 {
        self.chars[(c & 31) as usize]
    }

    /// Where the `k`-th newest byte of a phase whose newest byte ends at bit `e` starts.
    #[inline(always)]
    fn start_of(&self, e: u64, k: u32) -> u64 {
        self.char_at((e - 8 * u64::from(k)) / u64::from(BITS))
    }

    /// Phase `i`'s completed bytes in this run: how many (up to 8), where the newest ends (its
    /// bit offset) and the last 8 of them; `None` before its first.
    fn phase(&self, i: usize) -> Option<(u32, u64, u64)> {
        let a = i as u64 * Self::STEP;
        let n = self.count * u64::from(BITS);
        if n < a + 8 {
            return None;
        }
        let done = (n - a) / 8;
        let e = a + 8 * done;
        Some((done.min(8) as u32, e, (self.acc >> (n - e)) as u64))
    }

    /// Feeds one byte of class `class` at `p`; calls `hit(start, end)` for each match.
    #[inline(always)]
    fn step(&mut self, table: &Table, class: u8, b: u8, p: u64, hit: &mut impl FnMut(u64, u64)) {
        if class >= 64 {
            if class == SEP && self.open {
                self.gap += 1;
                self.lf += u32::from(b == b'\n');
                self.open = self.gap as usize <= MAX_GAP;
            } else {
                self.open = false;
            }
            return;
        }
        if !self.open || !self.gap_continues() {
            self.count = 0;
            self.open = true;
        }
        self.gap = 0;
        self.lf = 0;
        self.acc = (self.acc << BITS) | u128::from(class);
        self.chars[(self.count & 31) as usize] = p;
        self.count += 1;
        let n = self.count * u64::from(BITS);
        // Too few bits yet for a window or a whole short secret in any phase.
        if n < table.min_bits {
            return;
        }
        let mut shift = 0;
        while shift < u64::from(BITS) {
            let e = n - shift;
            let a = e % 8;
            if e >= a + 8 {
                let len = ((e - a) / 8).min(8) as u32;
                if let Some(k) = table.longest_match((self.acc >> shift) as u64, len, 0) {
                    hit(self.start_of(e, k), p);
                }
            }
            shift += Self::STEP;
        }
    }

    /// Phase `i`'s byte in progress: how many of its bits have arrived and their value (it
    /// starts in the newest character).
    fn partial(&self, i: usize) -> Option<(u32, u64)> {
        let a = i as u64 * Self::STEP;
        let n = self.count * u64::from(BITS);
        if n <= a {
            return None;
        }
        let r = ((n - a) % 8) as u32;
        (r > 0).then(|| (r, (self.acc as u64) & ((1 << r) - 1)))
    }

    /// Where the run's newest character is.
    fn last_char(&self) -> u64 {
        self.char_at(self.count.wrapping_sub(1))
    }

    /// The earliest output offset this view may still cover: the start of the longest open
    /// tail of a phase (a flush may cover it through the run's last character), else the
    /// newest character if it begins a byte that could begin a piece.
    fn hold_from(&self, table: &Table) -> Option<u64> {
        if !self.open {
            return None;
        }
        let mut from: Option<u64> = None;
        for i in 0..PHASES {
            let tail = self
                .phase(i)
                .map(|(len, e, w)| (table.open_tail(w, len), e))
                .filter(|&(t, _)| t > 0);
            let at = if let Some((t, e)) = tail {
                self.start_of(e, t)
            } else if let Some((r, value)) = self.partial(i)
                && table.begins_piece(value, r)
            {
                self.last_char()
            } else {
                continue;
            };
            from = Some(from.map_or(at, |f| f.min(at)));
        }
        from
    }

    /// At a flush: covers each phase's open tail of [`MIN_MASKED_TAIL`] bytes or more, through
    /// the run's newest character when the byte in progress continues it.
    fn flush_tails(&self, table: &Table, hit: &mut impl FnMut(u64, u64)) {
        if !self.open {
            return;
        }
        let min = MIN_MASKED_TAIL as u32;
        for i in 0..PHASES {
            let Some((len, e, w)) = self.phase(i) else {
                continue;
            };
            let t = table.open_tail(w, len);
            if t >= min {
                hit(self.start_of(e, t), self.char_at((e - 1) / u64::from(BITS)));
            }
            if let Some((r, value)) = self.partial(i)
                && let Some(t) = table.partial_tail(w, len, value, r)
                && t >= min
            {
                hit(self.start_of(e, t), self.last_char());
            }
        }
    }
}

/// Masks one output stream: [`push`](Self::push) what the child wrote, write out what it returns.
/// `M` is `&Masker` or an owning pointer such as `Arc<Masker>`. No `Debug`.
pub struct MaskStream<M: Deref<Target = Masker>> {
    masker: M,
    /// Bytes not yet emitted. Its capacity is fixed at creation and never exceeded, so it never
    /// reallocates.
    buf: Zeroizing<Vec<u8>>,
    /// Bit `i` set: `buf[i]` is covered.
    covered: Zeroizing<Vec<u64>>,
    /// Output offset of `buf[0]`.
    base: u64,
    /// Whether the last byte emitted was masked: a masked run continuing it adds no second mask.
    in_mask: bool,
    views: Views,
}

/// The state of the four views.
#[derive(Default, Zeroize)]
struct Views {
    /// The raw view: the last 8 bytes, how many there are (up to 8), where the newest is.
    raw: u64,
    raw_len: u32,
    raw_end: u64,
    url: UrlView,
    hex: Decoder<4, 2>,
    b64: Decoder<6, 4>,
    /// Where a `=` may extend a base64 match, and how many more may.
    pad_at: u64,
    pad_left: u8,
}

impl<M: Deref<Target = Masker>> Drop for MaskStream<M> {
    fn drop(&mut self) {
        self.views.zeroize();
    }
}

impl<M: Deref<Target = Masker>> MaskStream<M> {
    /// A stream masking with `masker`.
    #[must_use]
    pub fn new(masker: M) -> Self {
        let capacity = MAX_HELD + BLOCK;
        MaskStream {
            masker,
            buf: Zeroizing::new(Vec::with_capacity(capacity)),
            covered: Zeroizing::new(vec![0u64; capacity.div_ceil(64)]),
            base: 0,
            in_mask: false,
            views: Views::default(),
        }
    }

    /// Takes the next chunk of output and appends to `out` the bytes that are final: masks and
    /// bytes no match can cover any more. Keeps back (see [`held`](Self::held)) at most
    /// [`MAX_HELD`] bytes. An empty chunk does nothing.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.masker.is_empty() {
            out.extend_from_slice(chunk);
            return;
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            // The holdback is at most MAX_HELD, so there is always a block of room.
            let room = self.buf.capacity() - self.buf.len();
            let (piece, tail) = rest.split_at(room.min(rest.len()));
            let from = self.buf.len();
            self.buf.extend_from_slice(piece);
            self.scan(from);
            let keep_from = self.hold_from();
            self.emit(keep_from, out);
            rest = tail;
        }
    }

    /// Emits what is held back: at the end of the output, or when the caller's holdback
    /// deadline (a few milliseconds of silence) has passed. Each view's open tail that is a
    /// substring of a secret is masked if it is [`MIN_MASKED_TAIL`] (4) symbols or longer (for
    /// this, an unfinished `%X` counts as plain bytes, and a hex or base64 byte in progress that
    /// continues the tail is part of it): a truncated secret (`head -c 6`) or the start of a
    /// secret printed slowly is still mostly secret, and four matching bytes are rarely a
    /// coincidence; a shorter tail is emitted unchanged, because one to three bytes give little
    /// away and masking them would eat common endings of output. Either way the views keep
    /// matching after a flush (an unfinished escape may still complete): if later output
    /// completes a piece, the rest of it is masked as well (at most the three symbols emitted
    /// unchanged are then shown).
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if self.masker.is_empty() {
            return;
        }
        let table = &self.masker.table;
        let (views, base, covered) = (&mut self.views, self.base, &mut self.covered);
        let mut hit = |s: u64, e: u64| cover(covered, base, s, e);
        let min = MIN_MASKED_TAIL as u32;
        let t = table.open_tail(views.raw, views.raw_len);
        if t >= min {
            hit(views.raw_end + 1 - u64::from(t), views.raw_end);
        }
        if views.url.esc_age < W || views.url.npending > 0 {
            let mut url = Zeroizing::new(views.url.clone());
            settle_url(table, &mut url, &mut hit);
            let t = table.open_tail(url.lane.w, url.lane.len);
            if t >= min {
                hit(url.lane.start_of(t), url.lane.end);
            }
        }
        views.hex.flush_tails(table, &mut hit);
        views.b64.flush_tails(table, &mut hit);
        let all = self.buf.len();
        self.emit(all, out);
    }

    /// How many bytes have been pushed but not yet emitted.
    #[must_use]
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// Runs the views over `buf[from..]`, marking what they cover.
    fn scan(&mut self, from: usize) {
        let table = &self.masker.table;
        let (views, base, covered) = (&mut self.views, self.base, &mut self.covered);
        let mut hit = |s: u64, e: u64| cover(covered, base, s, e);
        for (i, &b) in self.buf.iter().enumerate().skip(from) {
            views.step(table, b, base + i as u64, &mut hit);
        }
    }

    /// The index in `buf` from which bytes must stay: the earliest offset any view may still
    /// cover.
    fn hold_from(&self) -> usize {
        let table = &self.masker.table;
        let v = &self.views;
        let end = self.base + self.buf.len() as u64;
        let mut from = end;
        let t = table.open_tail(v.raw, v.raw_len);
        if t > 0 {
            from = from.min(v.raw_end + 1 - u64::from(t));
        }
        if v.url.npending > 0 {
            from = from.min(v.url.pending_at);
        }
        // The url view's newest symbols differ from the raw view's when an escape is among
        // them or may come next.
        if v.url.esc_age < W - 1 || v.url.npending > 0 {
            let t = table.open_tail(v.url.lane.w, v.url.lane.len);
            if t > 0 {
                from = from.min(v.url.lane.start_of(t));
            }
        }
        for f in [v.hex.hold_from(table), v.b64.hold_from(table)]
            .into_iter()
            .flatten()
        {
            from = from.min(f);
        }
        // Bytes emitted before a flush stay emitted. No view holds more than MAX_HELD bytes
        // (see its definition); the bound is enforced so that the buffer always has room.
        debug_assert!(
            end - from.min(end) <= MAX_HELD as u64,
            "held {}",
            end - from
        );
        (from.max(self.base).max(end.saturating_sub(MAX_HELD as u64)) - self.base) as usize
    }

    /// Writes `buf[..upto]` to `out`, each covered run as one mask, and drops it from `buf`.
    fn emit(&mut self, upto: usize, out: &mut Vec<u8>) {
        let mut i = 0;
        while i < upto {
            let masked = bit(&self.covered, i);
            let j = next_change(&self.covered, i, upto, masked);
            if masked {
                if !self.in_mask {
                    out.extend_from_slice(MASK);
                    self.in_mask = true;
                }
            } else {
                out.extend_from_slice(&self.buf[i..j]);
                self.in_mask = false;
            }
            i = j;
        }
        let len = self.buf.len();
        let kept = len - upto;
        self.buf.copy_within(upto.., 0);
        // Wipe what was emitted (it may hold secrets), then drop it.
        self.buf[kept..].zeroize();
        self.buf.truncate(kept);
        // The kept bytes' marks move down with them (at most MAX_HELD of them).
        let mut keep = [0u64; MAX_HELD.div_ceil(64)];
        for k in 0..kept {
            if bit(&self.covered, upto + k) {
                keep[k / 64] |= 1 << (k % 64);
            }
        }
        self.covered[..len.div_ceil(64)].fill(0);
        self.covered[..keep.len()].copy_from_slice(&keep);
        self.base += upto as u64;
    }
}

impl Views {
    /// Feeds one output byte `b` at offset `p` to every view.
    #[inline(always)]
    fn step(&mut self, table: &Table, b: u8, p: u64, hit: &mut impl FnMut(u64, u64)) {
        // The url view first: at a `%` it takes the raw view's bytes before it.
        if b == b'%' || self.url.npending > 0 || self.url.esc_age < W {
            self.url_step(table, b, p, hit);
        }
        self.raw = (self.raw << 8) | u64::from(b);
        self.raw_len = (self.raw_len + 1).min(W);
        self.raw_end = p;
        if let Some(k) = table.longest_match(self.raw, self.raw_len, 0) {
            hit(p + 1 - u64::from(k), p);
        }
        let class = BASE64_CLASS[usize::from(b)];
        // Most bytes of binary output are in neither alphabet, and no run is open.
        if class == OTHER && !self.hex.open && !self.b64.open {
            return;
        }
        self.hex.step(table, HEX_CLASS[usize::from(b)], b, p, hit);
        if class == PAD && self.pad_left > 0 && p == self.pad_at {
            hit(p, p);
            self.pad_at = p + 1;
            self.pad_left -= 1;
        }
        let mut b64_hit = |s: u64, e: u64| {
            hit(s, e);
            self.pad_at = e + 1;
            self.pad_left = 2;
        };
        self.b64.step(table, class, b, p, &mut b64_hit);
    }

    /// The url view's share of [`Views::step`].
    fn url_step(&mut self, table: &Table, b: u8, p: u64, hit: &mut impl FnMut(u64, u64)) {
        let u = &mut self.url;
        let is_hex = HEX_CLASS[usize::from(b)] < 16;
        match u.npending {
            0 if b != b'%' => url_push(table, u, b, p, p, false, hit),
            0 => {
                if u.esc_age >= W {
                    // The lane went stale while it equalled the raw view: take that.
                    u.lane = Lane::of_raw(self.raw, self.raw_len, p.wrapping_sub(1));
                }
                u.pending[0] = b;
                u.npending = 1;
                u.pending_at = p;
            }
            1 if is_hex => {
                u.pending[1] = b;
                u.npending = 2;
            }
            2 if is_hex => {
                let hi = HEX_CLASS[usize::from(u.pending[1])];
                let lo = HEX_CLASS[usize::from(b)];
                u.npending = 0;
                u.pending[1] = 0;
                url_push(table, u, (hi << 4) | lo, u.pending_at, p, true, hit);
            }
            _ => {
                // Not an escape after all: its bytes are plain symbols, then `b` starts over.
                settle_url(table, u, hit);
                if b == b'%' || u.esc_age < W {
                    self.url_step(table, b, p, hit);
                }
            }
        }
    }
}

/// Turns an unfinished escape into plain symbols.
fn settle_url(table: &Table, u: &mut UrlView, hit: &mut impl FnMut(u64, u64)) {
    let n = u.npending;
    u.npending = 0;
    let at = u.pending_at;
    if n >= 1 {
        url_push(table, u, b'%', at, at, false, hit);
    }
    if n >= 2 {
        let d = u.pending[1];
        u.pending[1] = 0;
        url_push(table, u, d, at + 1, at + 1, false, hit);
    }
}

/// Pushes one url symbol and checks the windows that hold an escape (the raw view checks the
/// others, which are the same bytes).
#[inline]
fn url_push(
    table: &Table,
    u: &mut UrlView,
    sym: u8,
    start: u64,
    end: u64,
    escape: bool,
    hit: &mut impl FnMut(u64, u64),
) {
    u.lane.push(sym, start, end);
    u.esc_age = if escape { 0 } else { (u.esc_age + 1).min(W) };
    if u.esc_age < W
        && let Some(k) = table.longest_match(u.lane.w, u.lane.len, u.esc_age)
    {
        hit(u.lane.start_of(k), end);
    }
}

/// Marks output offsets `s..=e` as covered, from `base` (bytes before it are emitted already).
fn cover(covered: &mut [u64], base: u64, s: u64, e: u64) {
    let s = s.max(base);
    if s > e {
        return;
    }
    let (mut i, last) = ((s - base) as usize, (e - base) as usize);
    while i <= last {
        if i % 64 == 0 && last - i >= 63 {
            covered[i / 64] = u64::MAX;
            i += 64;
        } else {
            covered[i / 64] |= 1 << (i % 64);
            i += 1;
        }
    }
}

fn bit(bits: &[u64], i: usize) -> bool {
    bits[i / 64] >> (i % 64) & 1 == 1
}

/// The first index in `from..to` whose bit is not `v` (or `to`).
fn next_change(bits: &[u64], from: usize, to: usize, v: bool) -> usize {
    let mut i = from;
    while i < to {
        let word = if v { !bits[i / 64] } else { bits[i / 64] } >> (i % 64);
        if word != 0 {
            return (i + word.trailing_zeros() as usize).min(to);
        }
        i = (i / 64 + 1) * 64;
    }
    to
}

/// The plain batch reference of the rules above that the tests check against (shared with the
/// `mask_stream` fuzz target).
#[cfg(test)]
#[path = "mask_reference.rs"]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use proptest::prelude::*;
    use std::sync::Arc;

    // ---- Helpers. ---------------------------------------------------------------------------

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
            assert!(stream.held() <= MAX_HELD, "held {}", stream.held());
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

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The output with the layout separators of the views (whitespace and `:`) removed: a
    /// checker that does not share the masker's run rules.
    fn collapsed(out: &[u8]) -> Vec<u8> {
        out.iter()
            .copied()
            .filter(|b| !b" \t\r\n:".contains(b))
            .collect()
    }

    /// Names the first 8-byte piece of `secret` found in `out` as raw bytes, hex or base64
    /// (any alignment, either alphabet), also across the whitespace of a layout. Never the
    /// piece itself.
    fn leaked_piece(out: &[u8], secret: &[u8]) -> Option<String> {
        let flat = collapsed(out);
        for i in 0..=secret.len().saturating_sub(MIN_PIECE) {
            let piece = &secret[i..(i + MIN_PIECE).min(secret.len())];
            if contains(out, piece) || contains(&flat, piece) {
                return Some(format!("raw piece at {i}"));
            }
            let h = hex(piece);
            if contains(&flat, h.as_bytes()) || contains(&flat, h.to_uppercase().as_bytes()) {
                return Some(format!("hex piece at {i}"));
            }
            for o in 0..3 {
                let mut stream = vec![0u8; o];
                stream.extend_from_slice(piece);
                for engine in [&STANDARD, &URL_SAFE_NO_PAD] {
                    let enc = engine.encode(&stream).into_bytes();
                    // The characters whose 6 bits all come from the piece.
                    let first = (8 * o).div_ceil(6);
                    let end = 8 * (o + piece.len()) / 6;
                    if end > first + 4 && contains(&flat, &enc[first..end]) {
                        return Some(format!("base64 piece at {i}, offset {o}"));
                    }
                }
            }
        }
        None
    }

    // ---- Layouts of common tools, written here from their documented formats. -------------

    /// `xxd -p`: 30 bytes (60 digits) per line.
    fn xxd_p(data: &[u8]) -> Vec<u8> {
        data.chunks(30)
            .flat_map(|c| format!("{}\n", hex(c)).into_bytes())
            .collect()
    }

    /// `od -An -tx1`: 16 bytes per line, each ` xx`.
    fn od_x1(data: &[u8]) -> Vec<u8> {
        data.chunks(16)
            .flat_map(|c| {
                let mut l: String = c.iter().map(|b| format!(" {b:02x}")).collect();
                l.push('\n');
                l.into_bytes()
            })
            .collect()
    }

    fn printable(c: &[u8]) -> String {
        c.iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect()
    }

    /// `hexdump -C`: offset, 16 bytes as `xx ` with an extra space after 8, `|ascii|`.
    fn hexdump_c(data: &[u8]) -> Vec<u8> {
        let mut out = String::new();
        for (n, c) in data.chunks(16).enumerate() {
            out.push_str(&format!("{:08x}  ", n * 16));
            for (j, b) in c.iter().enumerate() {
                out.push_str(&format!("{b:02x} "));
                if j == 7 {
                    out.push(' ');
                }
            }
            out.push_str(&format!(" |{}|\n", printable(c)));
        }
        out.into_bytes()
    }

    /// `xxd`: offset, 16 bytes in groups of two (`xxxx `), ascii.
    fn xxd(data: &[u8]) -> Vec<u8> {
        let mut out = String::new();
        for (n, c) in data.chunks(16).enumerate() {
            out.push_str(&format!("{:08x}: ", n * 16));
            for pair in c.chunks(2) {
                out.push_str(&hex(pair));
                out.push(' ');
            }
            out.push_str(&format!(" {}\n", printable(c)));
        }
        out.into_bytes()
    }

    /// `base64 -w WIDTH`.
    fn base64_wrapped(data: &[u8], width: usize, eol: &str) -> Vec<u8> {
        STANDARD
            .encode(data)
            .as_bytes()
            .chunks(width)
            .flat_map(|l| [l, eol.as_bytes()].concat())
            .collect()
    }

    // ---- Tests. -----------------------------------------------------------------------------

    const TOKEN: &[u8] = b"ghp_16C7e42F292c6912E7710c838347Ae178B4a";

    #[test]
    fn whole_secret_and_its_encodings_are_masked() {
        let secret: &[u8] = b"tok:\xfb\xff/+ en~ and more";
        let masker = Masker::new(&[secret]);
        let forms: Vec<Vec<u8>> = vec![
            secret.to_vec(),
            STANDARD.encode(secret).into_bytes(),
            URL_SAFE_NO_PAD.encode(secret).into_bytes(),
            hex(secret).into_bytes(),
            hex(secret).to_uppercase().into_bytes(),
            secret
                .iter()
                .flat_map(|b| format!("%{b:02X}").into_bytes())
                .collect(),
            b"tok%3a%FB%ff%2F%2b%20en~%20and more".to_vec(),
        ];
        for (n, form) in forms.iter().enumerate() {
            let mut data = b"before ".to_vec();
            data.extend_from_slice(form);
            data.extend_from_slice(b" after\n");
            assert_eq!(
                mask_all(&masker, &data),
                b"before ******** after\n",
                "form {n}"
            );
        }
    }

    #[test]
    fn pieces_of_eight_bytes_are_masked_shorter_ones_are_not() {
        let masker = Masker::new(&[TOKEN]);
        // head -c 20, cut -c5-, a middle piece, each followed by more output.
        for piece in [&TOKEN[..20], &TOKEN[4..], &TOKEN[10..18]] {
            let mut data = b"x ".to_vec();
            data.extend_from_slice(piece);
            data.extend_from_slice(b"\ny\n");
            assert_eq!(mask_all(&masker, &data), b"x ********\ny\n");
        }
        // Seven bytes inside a line: not a piece.
        let mut data = b"x ".to_vec();
        data.extend_from_slice(&TOKEN[10..17]);
        data.extend_from_slice(b" y\n");
        assert_eq!(mask_all(&masker, &data), data);
        // A secret split in pieces of at least 8, each on its own line or between other text.
        let mut data = TOKEN[..15].to_vec();
        data.extend_from_slice(b"\n-- ");
        data.extend_from_slice(&TOKEN[15..]);
        data.push(b'\n');
        assert_eq!(mask_all(&masker, &data), b"********\n-- ********\n");
    }

    #[test]
    fn short_secrets_are_masked_whole_only() {
        let masker = Masker::new(&[b"pin4321"]);
        assert_eq!(mask_all(&masker, b"a pin4321 b"), b"a ******** b");
        assert_eq!(mask_all(&masker, b"a pin432 b"), b"a pin432 b");
        assert_eq!(mask_all(&masker, b"a 70696e34333231 b"), b"a ******** b");
        assert_eq!(mask_all(&masker, b"a cGluNDMyMQ== b"), b"a ******** b");
    }

    #[test]
    fn hex_dump_layouts_show_no_piece() {
        // A 40-byte secret inside a binary stream, at every offset within a 16- and 30-byte line.
        for offset in 0..30 {
            let mut data = pseudo_random(offset, 5 + offset as u64);
            data.extend_from_slice(TOKEN);
            data.extend_from_slice(&pseudo_random(7, 9));
            let masker = Masker::new(&[TOKEN]);
            for (name, layout) in [
                ("xxd -p", xxd_p(&data)),
                ("od -An -tx1", od_x1(&data)),
                ("hexdump -C", hexdump_c(&data)),
                ("xxd", xxd(&data)),
            ] {
                let out = mask_all(&masker, &layout);
                assert_eq!(leaked_piece(&out, TOKEN), None, "{name}, offset {offset}");
                assert!(contains(&out, MASK), "{name}, offset {offset}");
            }
        }
    }

    #[test]
    fn wrapped_and_unwrapped_hex_and_base64_are_masked_entirely() {
        // Layouts this masker joins across line breaks are masked whole, not piece by piece.
        let secret = pseudo_random(100, 77);
        let masker = Masker::new(&[&secret]);
        for (layout, lead) in [
            (xxd_p(&secret), ""),
            // od's lines begin with a space, which is before the first digit.
            (od_x1(&secret), " "),
            (base64_wrapped(&secret, 76, "\n"), ""),
            (base64_wrapped(&secret, 64, "\n"), ""),
            (base64_wrapped(&secret, 64, "\r\n"), ""),
            (base64_wrapped(&secret, 4096, "\n"), ""),
        ] {
            let mut data = b"begin\n".to_vec();
            data.extend_from_slice(&layout);
            data.extend_from_slice(b"end\n");
            let out = mask_all(&masker, &data);
            // The masked run ends at the last character; the final line break stays.
            let want = format!("begin\n{lead}********\nend\n");
            let eol = if contains(&layout, b"\r\n") {
                "\r\n"
            } else {
                "\n"
            };
            let want = want.replacen("********\n", &format!("********{eol}"), 1);
            assert_eq!(String::from_utf8_lossy(&out), want);
        }
        // Indented base64 (a PEM block in YAML): the indentation after each break is skipped.
        let wrapped = base64_wrapped(&secret, 64, "\n");
        let indented: Vec<u8> = wrapped
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .flat_map(|l| [b"    ".as_slice(), l, b"\n"].concat())
            .collect();
        assert_eq!(mask_all(&masker, &indented), b"    ********\n");
    }

    #[test]
    fn secret_embedded_in_a_base64_stream_at_every_offset() {
        let secret: &[u8] = b"ghp_xK9mQ2vL8nR4tY7wZ1aB3cD5";
        let masker = Masker::new(&[secret]);
        for prefix_len in 0..7 {
            for suffix_len in 0..4 {
                let mut stream = pseudo_random(prefix_len, 7 + prefix_len as u64);
                stream.extend_from_slice(secret);
                stream.extend_from_slice(&pseudo_random(suffix_len, 99));
                let encoded = STANDARD.encode(&stream).into_bytes();
                let out = mask_all(&masker, &encoded);
                assert_eq!(leaked_piece(&out, secret), None, "offset {prefix_len}");
                // The neighbours' own characters stay.
                assert!(
                    out.starts_with(&encoded[..prefix_len * 4 / 3]),
                    "offset {prefix_len}"
                );
            }
        }
        // `printf 'x%s' "$T" | base64`: the first two characters mix in the `x`; the rest,
        // padding included, is the secret's.
        let mut shell = b"x".to_vec();
        shell.extend_from_slice(secret);
        let encoded = STANDARD.encode(&shell).into_bytes();
        let mut want = encoded[..1].to_vec();
        want.extend_from_slice(MASK);
        assert_eq!(mask_all(&masker, &encoded), want);
    }

    #[test]
    fn url_encoding_of_any_bytes_is_masked() {
        let secret: &[u8] = b"p@ss/w0rd+with spaces";
        let masker = Masker::new(&[secret]);
        for form in [
            "p%40ss%2Fw0rd%2Bwith%20spaces",
            "p%40ss%2fw0rd%2bwith%20spaces",
            "p@ss%2Fw0rd+with%20spaces",
            "%70%40%73%73/w0rd+with spaces",
        ] {
            let data = format!("url=https://h/?k={form}&x=1\n");
            assert_eq!(
                mask_all(&masker, data.as_bytes()),
                b"url=https://h/?k=********&x=1\n",
                "{form}"
            );
        }
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
        assert!(masker.is_empty());
        let data = pseudo_random(100_000, 1);
        assert_eq!(stream_chunks(&masker, &data, &[1, 4096, 7]), data);
        assert!(Masker::new(&[b""]).is_empty());
    }

    #[test]
    fn flush_rule_for_held_tail() {
        let masker = Masker::new(&[b"ghp_abcdefghijkl"]);
        // Three bytes of a secret at the end pass; four are masked.
        assert_eq!(mask_all(&masker, b"ends with ghp"), b"ends with ghp");
        assert_eq!(mask_all(&masker, b"ends with ghp_"), b"ends with ********");
        assert_eq!(mask_all(&masker, b"ends with hijk"), b"ends with ********");
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
        // Flushed bytes are never emitted twice, also while the views still match on them.
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
    fn a_secret_printed_one_byte_at_a_time_shows_at_most_three() {
        let masker = Masker::new(&[TOKEN]);
        for form in [
            TOKEN.to_vec(),
            hex(TOKEN).into_bytes(),
            STANDARD.encode(TOKEN).into_bytes(),
        ] {
            let mut stream = masker.stream();
            let mut out = Vec::new();
            for &b in &form {
                stream.push(&[b], &mut out);
                stream.flush(&mut out);
            }
            stream.push(b"\n", &mut out);
            stream.flush(&mut out);
            // At most 3 symbols: 3 bytes, 7 hex digits or 5 base64 characters.
            let shown = out.iter().position(|&b| b == b'*').expect("masked");
            assert!(shown <= 7, "{shown} shown");
            assert_eq!(&out[shown..], b"********\n");
        }
    }

    #[test]
    fn stated_limits_pass_unmasked() {
        // What the docs say is not masked, checked so that the statement stays true.
        let masker = Masker::new(&[TOKEN]);
        let reversed: Vec<u8> = TOKEN.iter().rev().copied().collect();
        let per_line: Vec<u8> = TOKEN.iter().flat_map(|&b| [b, b'\n']).collect();
        let spaced: Vec<u8> = TOKEN.iter().flat_map(|&b| [b' ', b' ', b' ', b]).collect();
        for (name, out) in [("rev", reversed), ("per line", per_line), ("od -c", spaced)] {
            let mut data = out;
            data.extend_from_slice(b"\n");
            assert_eq!(mask_all(&masker, &data), data, "{name}");
        }
        // A piece of 7 bytes at a line edge of `hexdump -C` (the secret at offset 9): its hex
        // and its ASCII-column bytes stay; the 16-byte lines after it are masked.
        let mut data = vec![b'.'; 9];
        data.extend_from_slice(TOKEN);
        let out = mask_all(&masker, &hexdump_c(&data));
        assert!(contains(
            &out,
            b"2e 67 68 70 5f 31 36 43  |.........ghp_16C|"
        ));
        assert!(contains(&out, &TOKEN[..7]));
        assert!(!contains(&out, &TOKEN[7..15]));
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
    fn common_text_in_a_secret_is_masked_elsewhere() {
        // The false-positive cost, stated in the docs: a PEM key masks other PEM blocks'
        // armour lines, a JSON credential its key names in other JSON.
        let pem = b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n";
        let masker = Masker::new(&[pem]);
        let cert = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            mask_all(&masker, cert),
            b"********CERTIFICATE********B********CERTIFICATE********"
        );
        let json = br#"{"type": "service_account", "private_key": "k"}"#;
        let masker = Masker::new(&[json]);
        assert_eq!(
            mask_all(&masker, br#"{"type": "user", "name": "x"}"#),
            br#"********user", "name": "x"}"#
        );
        // A random token masks nothing in ordinary text.
        let masker = Masker::new(&[TOKEN]);
        let text = b"The quick brown fox jumps over the lazy dog 0123456789 abcdef ABCDEF\n";
        assert_eq!(mask_all(&masker, text), text);
    }

    #[test]
    fn identical_secrets_are_counted_once_and_budgets_are_kept() {
        let secret = pseudo_random(4096, 3);
        let one = Masker::footprint(&[&secret]);
        assert_eq!(Masker::footprint(&[&secret, &secret, b""]), one);
        // About ten bytes per secret byte for a few KiB.
        assert!(one < 12 * 4096, "{one}");
        assert!(one > 8 * 4096, "{one}");
        let budget = MaskBudget::new(3 * one);
        let a = Masker::with_budget(&[&secret], one, &budget).expect("fits");
        assert_eq!(a.bytes(), one);
        assert_eq!(budget.used(), one);
        let e = Masker::with_budget(&[&secret], one - 1, &budget)
            .err()
            .expect("over the run cap");
        assert!(matches!(e, MaskError::OverRunCap { .. }));
        assert!(e.to_string().contains("max_mask_bytes_per_run"), "{e}");
        let b = Masker::with_budget(&[&secret], one, &budget).expect("fits");
        let c = Masker::with_budget(&[&secret], one, &budget).expect("fits");
        let e = Masker::with_budget(&[&secret], one, &budget)
            .err()
            .expect("over the daemon's budget");
        assert!(
            matches!(e, MaskError::OverDaemonBudget { free: 0, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("max_mask_bytes"), "{e}");
        drop((a, b));
        assert_eq!(budget.used(), one);
        drop(c);
        assert_eq!(budget.used(), 0);
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
        // Text-like output, where many bytes are hex digits and base64 characters.
        let text: Vec<u8> = data
            .iter()
            .map(|b| b"0123456789abcdefghp_sk- \n"[usize::from(b % 25)])
            .collect();
        let start = std::time::Instant::now();
        let out = mask_all(&masker, &text);
        let text_elapsed = start.elapsed();
        assert_eq!(out, text);
        // Base64 text wrapped at 76, the densest case for the views.
        let b64 = base64_wrapped(&data, 76, "\n");
        let start = std::time::Instant::now();
        let out = mask_all(&masker, &b64);
        let b64_elapsed = start.elapsed();
        assert_eq!(out, b64);
        let mbps = |len: usize, t: std::time::Duration| len as f64 / 1e6 / t.as_secs_f64();
        println!(
            "mask throughput: random binary {:.0} MB/s, hex-like text {:.0} MB/s, wrapped base64 {:.0} MB/s ({} bytes of tables)",
            mbps(data.len(), elapsed),
            mbps(text.len(), text_elapsed),
            mbps(b64.len(), b64_elapsed),
            masker.bytes(),
        );
    }

    // ---- Properties. ------------------------------------------------------------------------

    fn secret_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            // Arbitrary bytes, NUL and newline included.
            prop::collection::vec(any::<u8>(), 1..40),
            // Token-like: a small alphabet, so pieces, encodings and neighbours collide often.
            prop::collection::vec(prop::sample::select(b"ab0/+\0\n=%-_ :".to_vec()), 1..40),
        ]
    }

    /// One part of a generated output: something derived from a secret, in some layout.
    fn layout_strategy() -> impl Strategy<Value = (usize, usize, usize, u8, u64)> {
        // (which secret, piece start, piece length, layout, layout seed)
        (0usize..3, 0usize..40, 1usize..48, 0u8..6, any::<u64>())
    }

    /// Writes `piece` in layout `kind`: raw; hex with separators; base64 of it inside other
    /// bytes, wrapped; percent-encoded in part; cut short.
    fn lay_out(piece: &[u8], kind: u8, seed: u64, out: &mut Vec<u8>) {
        let noise = pseudo_random(8, seed);
        match kind {
            0 => out.extend_from_slice(piece),
            1 => {
                let seps: [&[u8]; 6] = [b"", b" ", b"  ", b"\n", b":", b"\n         "];
                for (i, b) in piece.iter().enumerate() {
                    let digits = format!("{b:02x}");
                    let digits = if noise[i % 8] & 1 == 1 {
                        digits.to_uppercase()
                    } else {
                        digits
                    };
                    out.extend_from_slice(digits.as_bytes());
                    out.extend_from_slice(seps[usize::from(noise[(i + 3) % 8]) % seps.len()]);
                }
            }
            2 | 3 => {
                let mut stream = noise[..usize::from(noise[0] % 4)].to_vec();
                stream.extend_from_slice(piece);
                stream.extend_from_slice(&noise[..usize::from(noise[1] % 3)]);
                let width = [4, 7, 64, 76, 1000][usize::from(noise[2]) % 5];
                let eol = if kind == 2 { "\n" } else { "\r\n  " };
                out.extend_from_slice(&base64_wrapped(&stream, width, eol));
            }
            4 => {
                for (i, &b) in piece.iter().enumerate() {
                    if noise[i % 8] & 2 == 2 {
                        out.extend_from_slice(format!("%{b:02x}").as_bytes());
                    } else {
                        out.push(b);
                    }
                }
            }
            _ => out.extend_from_slice(&piece[..piece.len() / 2]),
        }
    }

    fn build_output(
        secrets: &[Vec<u8>],
        filler: &[Vec<u8>],
        parts: &[(usize, usize, usize, u8, u64)],
    ) -> Vec<u8> {
        let mut data = Vec::new();
        for (i, f) in filler.iter().enumerate() {
            data.extend_from_slice(f);
            if let Some(&(which, start, len, kind, seed)) = parts.get(i) {
                let s = &secrets[which % secrets.len()];
                let start = start % s.len();
                let end = (start + len).min(s.len());
                lay_out(&s[start..end], kind, seed, &mut data);
            }
        }
        data
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn streaming_equals_the_reference_for_any_chunking(
            secrets in prop::collection::vec(secret_strategy(), 1..4),
            filler in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 1..7),
            parts in prop::collection::vec(layout_strategy(), 6),
            sizes in prop::collection::vec(1usize..90, 1..8),
        ) {
            let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
            let data = build_output(&secrets, &filler, &parts);
            let masker = Masker::new(&refs);
            let out = stream_chunks(&masker, &data, &sizes);
            prop_assert_eq!(&out, &reference::mask(&refs, &data));
            prop_assert_eq!(out, mask_all(&masker, &data));
        }

        #[test]
        fn midstream_flushes_leave_no_piece(
            secrets in prop::collection::vec(secret_strategy(), 1..3),
            filler in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 1..6),
            parts in prop::collection::vec(layout_strategy(), 6),
            cuts in prop::collection::vec((1usize..50, any::<bool>()), 1..10),
        ) {
            // No `*` in the secrets or the output's own bytes, so that the masks stand apart.
            let no_star = |v: &[u8]| -> Vec<u8> {
                v.iter().map(|&b| if b == b'*' { b'+' } else { b }).collect()
            };
            let secrets: Vec<Vec<u8>> = secrets.iter().map(|s| no_star(s)).collect();
            let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
            let data = no_star(&build_output(&secrets, &filler, &parts));
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
                prop_assert!(stream.held() <= MAX_HELD);
                if flush {
                    stream.flush(&mut out);
                    prop_assert_eq!(stream.held(), 0);
                }
                rest = tail;
            }
            stream.flush(&mut out);
            // No window of any view of the output matches any more.
            prop_assert!(!reference::covered(&refs, &out, false).contains(&true), "a piece left in the output");
            // The bytes that were not masked come out once each, in order.
            let mut input = data.iter();
            prop_assert!(
                out.iter().filter(|&&b| b != b'*').all(|b| input.any(|d| d == b)),
                "plain bytes changed"
            );
        }

        #[test]
        fn output_without_secrets_is_unchanged(
            secrets in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 1..3),
            data in prop::collection::vec(any::<u8>(), 0..4096),
            sizes in prop::collection::vec(1usize..600, 1..5),
        ) {
            let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
            // "No secret": nothing the rules cover, tails included.
            prop_assume!(reference::mask(&refs, &data) == data);
            let masker = Masker::new(&refs);
            prop_assert_eq!(stream_chunks(&masker, &data, &sizes), data);
        }
    }
}
