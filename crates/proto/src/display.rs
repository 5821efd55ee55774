//! Showing text that someone else chose on the owner's terminal.
//!
//! Agent names, service names, the command and working directory of a `run` waiting for
//! approval, audit records (which anyone with the owner's uid can edit): all of it may come from
//! an agent, and a terminal interprets some characters. [`escape`] is the one function every
//! place that prints such text goes through (`agentkeys pending`, `agentkeys grants`, `agentkeys
//! audit`, the `approval_command` hook's arguments), so that a request cannot move the cursor,
//! clear a line, reorder what is shown (bidi overrides and isolates), hide characters
//! (zero-width and other format characters) or start a new line that looks like another request.
//!
//! The escaping is unambiguous: a backslash is shown as `\\`, so an escaped character can never
//! be confused with the same text typed literally.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` is shown escaped: control characters (C0, DEL, C1), the line and paragraph
/// separators, and Unicode format characters (general category Cf: bidi marks, embeddings,
/// overrides and isolates, zero-width characters, invisible operators, the byte order mark,
/// interlinear annotation, tag characters, ...), plus the backslash that starts an escape.
pub fn is_risky(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c,
            '\u{00ad}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061c}'
            | '\u{06dd}'
            | '\u{070f}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}')
}

/// `s` with every [risky](is_risky) character escaped: `\\` for a backslash, `\n`, `\r`, `\t`
/// for those, `\u{…}` (the code point in hex) for the rest. Borrowed when nothing needs it.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_risky) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_risky(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// One argument as a POSIX shell would need it: unchanged when it is made only of characters
/// no shell treats specially, else in single quotes (a `'` inside becomes `'\''`). For showing a
/// command; pass the result through [`escape`] before it reaches a terminal.
pub fn shell_quote(arg: &str) -> Cow<'_, str> {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        Cow::Borrowed(arg)
    } else {
        Cow::Owned(format!("'{}'", arg.replace('\'', "'\\''")))
    }
}

/// `s` cut to at most `max` bytes on a character boundary, with ` [...]` appended when cut.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{} [...]", &s[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_unchanged_and_borrowed() {
        for s in ["gh pr list", "héllo wörld", "日本語", "a'b \"c\" $d"] {
            assert!(matches!(escape(s), Cow::Borrowed(x) if x == s), "{s}");
        }
    }

    #[test]
    fn controls_bidi_and_format_characters_are_escaped() {
        let cases = [
            ("\x1b[2J", r"\u{1b}[2J"),
            ("a\nb", r"a\nb"),
            ("a\rb\tc", r"a\rb\tc"),
            ("\u{7f}\u{85}", r"\u{7f}\u{85}"),
            ("x\u{202e}gpj.exe", r"x\u{202e}gpj.exe"),
            ("\u{2066}\u{2069}", r"\u{2066}\u{2069}"),
            ("\u{200b}\u{200d}\u{feff}", r"\u{200b}\u{200d}\u{feff}"),
            ("\u{2028}\u{2029}", r"\u{2028}\u{2029}"),
            ("\u{061c}\u{00ad}", r"\u{61c}\u{ad}"),
            ("\u{e0041}", r"\u{e0041}"),
            (r"a\u{1b}", r"a\\u{1b}"),
        ];
        for (input, want) in cases {
            let got = escape(input);
            assert_eq!(got, want, "{input:?}");
            assert!(!got.chars().any(|c| is_risky(c) && c != '\\'), "{got:?}");
        }
    }

    #[test]
    fn escaping_is_unambiguous() {
        // A literal `\u{1b}` typed by an agent and a real ESC never look the same.
        assert_ne!(escape(r"\u{1b}"), escape("\u{1b}"));
    }

    #[test]
    fn shell_quoting_and_truncation() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcdef", 3), "abc [...]");
        // Never cuts inside a character.
        assert_eq!(truncate("aé", 2), "a [...]");
    }
}
