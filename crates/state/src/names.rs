//! Name rules shared by services and agents.
//!
//! A rejected name is described (length, position of the first bad character) but never
//! repeated: people paste secrets into the wrong argument, and an error must not echo one.

use crate::error::StateError;

/// Longest name.
pub(crate) const MAX_NAME_LEN: usize = 64;

/// Checks `[a-z0-9][a-z0-9{extra}]{0,63}`, where `extra` are the punctuation characters allowed
/// after the first one; `rule` describes the whole rule for the message.
pub(crate) fn check_name(
    kind: &'static str,
    name: &str,
    extra: &[u8],
    rule: &str,
) -> Result<(), StateError> {
    let bad = |detail: String| {
        Err(StateError::InvalidName {
            kind,
            detail: format!("{detail}; {kind} names are {rule}"),
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad(format!("it has {} characters", name.chars().count()));
    }
    for (i, b) in name.bytes().enumerate() {
        let ok = b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && extra.contains(&b));
        if !ok {
            // Every byte before `i` is ASCII, so `i + 1` is also the (1-based) character position.
            return bad(format!("character {} is not allowed", i + 1));
        }
    }
    Ok(())
}
