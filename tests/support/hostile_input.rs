//! The hostile-input set of the unix socket (tests/hostile.rs), shared so that the same
//! messages are sent over a network listener's TLS (tests/remote.rs).

use crate::Prng;

/// A hello with `token`.
pub fn hello(token: &str) -> Vec<u8> {
    format!(r#"{{"v":1,"id":1,"body":{{"kind":"hello","token":"{token}"}}}}"#).into_bytes()
}

/// Valid requests, mutated byte by byte by the fuzz loop.
pub const TEMPLATES: &[&str] = &[
    r#"{"v":1,"id":7,"body":{"kind":"whoami"}}"#,
    r#"{"v":1,"id":8,"body":{"kind":"list_services"}}"#,
    r#"{"v":1,"id":9,"body":{"kind":"get_credential","service":"github","inline":true}}"#,
    r#"{"v":1,"id":10,"body":{"kind":"run","argv":["true"],"env":{"T":"github"}}}"#,
    r#"{"v":1,"id":11,"body":{"kind":"approve","code":"ABCDE-FGHJK","for_secs":60}}"#,
];

/// One hostile packet for an authenticated connection.
pub fn hostile_packet(rng: &mut Prng) -> Vec<u8> {
    match rng.below(6) {
        // Random bytes, sometimes looking like the start of JSON.
        0 | 1 => {
            let len = 1 + rng.below(2048) as usize;
            let mut b = rng.bytes(len);
            if rng.below(2) == 0 {
                b[0] = b'{';
            }
            b
        }
        // A valid request with a few bytes changed, inserted or cut.
        2 | 3 => {
            let mut b = TEMPLATES[rng.below(TEMPLATES.len() as u64) as usize]
                .as_bytes()
                .to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(b.len() as u64) as usize;
                match rng.below(3) {
                    0 => b[at] = rng.next_u64() as u8,
                    1 => b.insert(at, rng.next_u64() as u8),
                    _ => b.truncate(at.max(1)),
                }
            }
            b
        }
        // Deep nesting, objects or arrays, up to the size cap.
        4 => {
            let depth = 1000 + rng.below(12_000) as usize;
            let (open, close) = if rng.below(2) == 0 {
                (r#"{"a":"#, "}")
            } else {
                ("[", "]")
            };
            format!(
                r#"{{"v":1,"id":12,"body":{}1{}}}"#,
                open.repeat(depth),
                close.repeat(depth)
            )
            .into_bytes()
        }
        // Oversized: over the 64 KiB cap, up to 200 KiB.
        _ => vec![b'['; 65 * 1024 + rng.below(135 * 1024) as usize],
    }
}
