//! Audit-trail lines (`Record::from_line`, used by `audit verify`, `audit show` and the daemon's
//! recovery of the last record), fed arbitrary bytes.
//!
//! Properties: no panic; an accepted record serialises to a line that parses back to the same
//! record; an error's text never quotes the line (a fixed phrase plus a column number).
#![no_main]

use agentkeys_state::audit::{MAX_LINE, Record};
use libfuzzer_sys::fuzz_target;

const ALLOWED: &[&str] = &[
    "valid JSON but not a record: a field is missing or has the wrong type (column )",
    "not valid JSON (column )",
];

fuzz_target!(|data: &[u8]| {
    // Readers skip longer lines without parsing them.
    if data.len() > MAX_LINE {
        return;
    }
    match Record::from_line(data) {
        Ok(rec) => {
            let line = serde_json::to_vec(&rec).expect("a record serialises");
            let back = Record::from_line(&line).expect("a serialised record parses");
            assert_eq!(back, rec);
        }
        Err(text) => {
            let text: String = text.chars().filter(|c| !c.is_ascii_digit()).collect();
            assert!(
                ALLOWED.contains(&text.as_str()),
                "unexpected error text: {text:?}"
            );
        }
    }
});
