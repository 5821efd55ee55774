//! The daemon's request decoder, fed raw packets as a client could send them.
//!
//! Properties: no panic; an accepted request re-encodes to bytes that decode to the same request
//! (same canonical encoding, id and kind); an error's text never quotes the input (it is a fixed
//! phrase plus line and column numbers). The client's response decoder gets the same bytes
//! (no panic; an accepted response re-encodes to one that decodes).
#![no_main]

use agentkeys_proto::wire::{
    DecodeError, MAX_MESSAGE_BYTES, decode_request, decode_response, encode,
};
use libfuzzer_sys::fuzz_target;

/// An error message with its digits removed must be one of these: anything else could be input.
const ALLOWED: &[&str] = &[
    "unsupported protocol version (this daemon speaks )",
    "unknown request kind",
    "malformed message: read error at line  column ",
    "malformed message: invalid JSON at line  column ",
    "malformed message: JSON of the wrong shape for this request at line  column ",
    "malformed message: truncated JSON at line  column ",
];

fn check_error(e: &DecodeError) {
    let text: String = e
        .to_string()
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .collect();
    assert!(
        ALLOWED.contains(&text.as_str()),
        "unexpected decode error text: {text:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    // The connection refuses longer packets unread; the decoder is only ever given these.
    if data.len() > MAX_MESSAGE_BYTES {
        return;
    }
    match decode_request(data) {
        Ok(req) => {
            // Re-encoding can exceed the cap (escapes grow), which `encode` refuses cleanly.
            if let Ok(first) = encode(&req) {
                let again = decode_request(&first).expect("a re-encoded request decodes");
                assert_eq!(again.id, req.id);
                assert_eq!(again.body.kind(), req.body.kind());
                let second = encode(&again).expect("same size as before");
                assert_eq!(*first, *second, "encoding is not canonical");
            }
        }
        Err(e) => check_error(&e),
    }
    if let Ok(resp) = decode_response(data)
        && let Ok(first) = encode(&resp)
    {
        // Compared by id and kind only: a self-test report may hold floats, which
        // serde_json does not promise to parse back to the same bits.
        let again = decode_response(&first).expect("a re-encoded response decodes");
        assert_eq!(again.id, resp.id);
        assert_eq!(again.body.kind(), resp.body.kind());
    }
});
