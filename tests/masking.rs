//! Output masking of `agentkeys run` through the real daemon, with the real tools that print a
//! secret in pieces or in a layout: `head -c`, `cut`, `tail`, a split between stdout and stderr,
//! `xxd -p`, `xxd`, `od -An -tx1`, `hexdump -C`, `base64` (wrapped and not), `openssl base64`,
//! a secret printed one character at a time; a caller that never reads its output; the caps on
//! masking memory. Each checks that no 8-byte piece of the secret, raw, in hex or in base64 (at
//! any alignment, either alphabet), is left in the output, also across a layout's line breaks
//! and spaces. Failure messages name the form and offset of a leaked piece, never the piece.
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentkeys_e2e::{TestHome, contains, text, wait_until};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

/// A 40-byte test canary (a dummy value, not a credential).
const TOKEN: &str = "ghp_E2eMaskCanary0123456789abcdefGHIJKLM";
/// The shortest piece the masker masks on its own.
const PIECE: usize = 8;

/// A 100-byte printable canary: long enough for `base64` to wrap it over two lines.
fn long_secret() -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let body: String = (0..92)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(alphabet[(x % alphabet.len() as u64) as usize])
        })
        .collect();
    format!("sk-long-{body}")
}

fn ready(tag: &str, config: Option<&str>, secrets: &[(&str, &str)]) -> TestHome {
    let mut h = TestHome::initialized(tag);
    for (service, value) in secrets {
        let out = h.run_stdin(&["store", service], value.as_bytes());
        assert!(out.status.success(), "store {service}: {}", text(&out));
    }
    if let Some(c) = config {
        h.write_config(c);
    }
    h.start_daemon(&[]);
    h
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Names the first 8-byte piece of `secret` found in `out` raw, as hex (either case) or as
/// base64 (the characters that depend on the piece alone, at each of the three alignments,
/// either alphabet), also once the layout's whitespace and colons are removed.
fn leaked_piece(out: &[u8], secret: &[u8]) -> Option<String> {
    let flat: Vec<u8> = out
        .iter()
        .copied()
        .filter(|b| !b" \t\r\n:".contains(b))
        .collect();
    for i in 0..=secret.len().saturating_sub(PIECE) {
        let piece = &secret[i..(i + PIECE).min(secret.len())];
        if contains(out, piece) || contains(&flat, piece) {
            return Some(format!("a raw piece at byte {i}"));
        }
        let h = hex(piece);
        if contains(&flat, h.as_bytes()) || contains(&flat, h.to_uppercase().as_bytes()) {
            return Some(format!("a hex piece at byte {i}"));
        }
        for o in 0..3 {
            let mut stream = vec![0u8; o];
            stream.extend_from_slice(piece);
            for engine in [&STANDARD, &URL_SAFE_NO_PAD] {
                let enc = engine.encode(&stream).into_bytes();
                let (first, end) = ((8 * o).div_ceil(6), 8 * (o + piece.len()) / 6);
                if contains(&flat, &enc[first..end]) {
                    return Some(format!("a base64 piece at byte {i}, alignment {o}"));
                }
            }
        }
    }
    None
}

/// Runs `script` under `sh -c` with `T` mapped to `service`; checks it succeeded and that
/// neither stream holds a piece; returns (stdout, stderr).
fn masked_run(h: &TestHome, service: &str, script: &str, secret: &str) -> (Vec<u8>, Vec<u8>) {
    let mapping = format!("T={service}");
    let out = h.run(&["run", "--env", &mapping, "--", "sh", "-c", script]);
    assert!(
        out.status.success(),
        "{script}: exit {:?}",
        out.status.code()
    );
    for (name, stream) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        if let Some(leak) = leaked_piece(stream, secret.as_bytes()) {
            panic!("{script}: {name} holds {leak}");
        }
    }
    (out.stdout, out.stderr)
}

#[test]
fn pieces_cut_by_head_cut_tail_and_a_stream_split_are_masked() {
    let h = ready("mask-pieces", None, &[("github", TOKEN)]);
    for script in [
        r#"printf %s "$T" | head -c 20; echo"#,
        r#"printf %s "$T" | cut -c5-"#,
        r#"printf %s "$T" | tail -c 12; echo"#,
        r#"echo "token=$T"; echo "again: $T!""#,
    ] {
        let (out, _) = masked_run(&h, "github", script, TOKEN);
        assert!(contains(&out, b"********"), "{script}: nothing masked");
    }
    // The first 20 bytes on stdout, the other 20 on stderr: each stream masks its own piece.
    let script = r#"printf %s "$T" | head -c 20; printf %s "$T" | tail -c +21 >&2"#;
    let (out, err) = masked_run(&h, "github", script, TOKEN);
    assert_eq!(out, b"********");
    assert_eq!(err, b"********");
}

#[test]
fn hex_dumps_show_no_piece_of_the_secret() {
    let h = ready("mask-hex", None, &[("github", TOKEN)]);
    // The checker is not blind: unmasked, the same layouts show pieces.
    if have("xxd") {
        for cmd in ["xxd", "xxd -p"] {
            let script = format!(r#"printf '%s%s\n' '12345' "$T" | {cmd}"#);
            let out = h.run(&[
                "run",
                "--no-masking",
                "--env",
                "T=github",
                "--",
                "sh",
                "-c",
                &script,
            ]);
            assert!(
                leaked_piece(&out.stdout, TOKEN.as_bytes()).is_some(),
                "{cmd}"
            );
        }
    }
    for (tool, cmd) in [
        ("xxd", "xxd -p"),
        ("xxd", "xxd"),
        ("xxd", "xxd -u -p"),
        ("od", "od -An -tx1"),
        ("od", "od -tx1"),
        ("hexdump", "hexdump -C"),
    ] {
        if !have(tool) {
            eprintln!(
                "SKIP hex_dumps_show_no_piece_of_the_secret ({cmd}): {tool} is not installed"
            );
            continue;
        }
        // The secret at several offsets within the dump's lines.
        for prefix in ["", "12345", "0123456789abcde"] {
            let script = format!(r#"printf '%s%s\n' '{prefix}' "$T" | {cmd}"#);
            let (out, _) = masked_run(&h, "github", &script, TOKEN);
            assert!(contains(&out, b"********"), "{script}: nothing masked");
        }
    }
}

#[test]
fn base64_layouts_show_no_piece_of_the_secret() {
    let long = long_secret();
    let h = ready("mask-b64", None, &[("long", &long)]);
    let mut cmds = vec![("base64", "base64"), ("base64", "base64 -w 0")];
    if have("openssl") {
        cmds.push(("openssl", "openssl base64"));
    } else {
        eprintln!(
            "SKIP base64_layouts_show_no_piece_of_the_secret (openssl base64): openssl is not installed"
        );
    }
    for (tool, cmd) in cmds {
        if !have(tool) {
            eprintln!(
                "SKIP base64_layouts_show_no_piece_of_the_secret ({cmd}): {tool} is not installed"
            );
            continue;
        }
        // Offsets 0, 1 and 2 of the encoded stream: every alignment of the encoding.
        for prefix in ["", "x", "xy", "{\"k\":\""] {
            let script = format!(r#"printf '%s%s' '{prefix}' "$T" | {cmd}"#);
            let (out, _) = masked_run(&h, "long", &script, &long);
            assert!(contains(&out, b"********"), "{script}: nothing masked");
            // Wrapped output stays wrapped: the line break after the last character remains.
            if !cmd.ends_with("-w 0") {
                assert!(out.ends_with(b"\n"), "{script}: the layout was eaten");
            }
        }
    }
}

#[test]
fn a_secret_printed_slowly_shows_at_most_three_bytes() {
    let h = ready("mask-slow", None, &[("github", TOKEN)]);
    // One character every 30 ms: the pump flushes its holdback (10 ms) between them.
    let script = r#"printf %s "$T" | fold -w1 | while IFS= read -r c; do printf %s "$c"; sleep 0.03; done; echo"#;
    let (out, _) = masked_run(&h, "github", script, TOKEN);
    let shown = out
        .iter()
        .position(|&b| b == b'*')
        .expect("the secret was masked");
    assert!(shown <= 3, "{shown} bytes shown before the mask");
    assert_eq!(&out[..shown], &TOKEN.as_bytes()[..shown]);
    assert_eq!(&out[shown..], b"********\n");
}

#[test]
fn a_caller_that_never_reads_does_not_pin_the_run() {
    let h = ready(
        "mask-stall",
        Some("[daemon]\noutput_timeout = \"1s\"\n"),
        &[("github", TOKEN)],
    );
    // The caller's stdout is a pipe nobody reads; the program writes forever.
    let started = Instant::now();
    let mut cli = h
        .cli(&[
            "run",
            "--env",
            "T=github",
            "--",
            "yes",
            "output nobody reads",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn agentkeys run");
    let mut status = None;
    // The deadline is the behaviour under test: 1 s of no progress, then SIGTERM.
    assert!(
        wait_until(Duration::from_secs(30), || {
            status = cli.try_wait().expect("wait");
            status.is_some()
        }),
        "the run was still pinned after 30 s"
    );
    let status = status.expect("exited");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(status.code(), Some(143), "the program ends by SIGTERM");
    let audit = h.audit();
    let stalled = audit
        .iter()
        .find(|r| r["event"] == "output_stalled")
        .expect("an output_stalled record");
    assert_eq!(stalled["outcome"], "error");
    assert!(
        stalled["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("stdout:"),
        "{stalled}"
    );
    assert!(
        audit.iter().any(|r| r["event"] == "run_exit"
            && r["detail"].as_str().unwrap_or("").contains("signal 15")),
        "run_exit records the SIGTERM"
    );
    // The connection and the daemon are fine: the next run works.
    let out = h.run(&["run", "--env", "T=github", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn masking_caps_refuse_a_run_and_the_budget_comes_back() {
    // A 300-byte secret takes about 3.6 KiB of tables: one run fits a 4096-byte budget, two
    // at once do not. A 2000-byte secret does not fit the per-run cap at all.
    let mid = long_secret().repeat(3);
    let big = long_secret().repeat(20);
    let h = ready(
        "mask-caps",
        Some("[daemon]\nmax_mask_bytes_per_run = 4096\nmax_mask_bytes = 4096\n"),
        &[("mid", &mid), ("big", &big)],
    );
    let delivered = |h: &TestHome| h.audit().iter().filter(|r| r["event"] == "deliver").count();

    // Over the per-run cap: refused before delivery, with the cap and the way out named.
    let before = delivered(&h);
    let out = h.run(&["run", "--env", "T=big", "--", "true"]);
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("max_mask_bytes_per_run") && msg.contains("--no-masking"),
        "{msg}"
    );
    assert_eq!(delivered(&h), before, "nothing delivered");
    assert!(
        h.audit().iter().any(|r| r["event"] == "deny"
            && r["detail"] == "masking tables over their cap"
            && r["outcome"] == "denied"),
        "the refusal is audited"
    );
    let out = h.run(&["run", "--no-masking", "--env", "T=big", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out));

    // One masked run holds the daemon's budget; a second at the same time is told to wait.
    let marker = h.dir.join("first-running");
    let script = format!("touch '{}'; sleep 2", marker.display());
    let mut first = h
        .cli(&["run", "--env", "T=mid", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the first run");
    assert!(
        wait_until(Duration::from_secs(20), || marker.exists()),
        "the first run did not start"
    );
    let second = h.run(&["run", "--env", "T=mid", "--", "true"]);
    assert!(!second.status.success());
    let msg = String::from_utf8_lossy(&second.stderr);
    assert!(
        msg.contains("max_mask_bytes") && msg.contains("other masked runs"),
        "{msg}"
    );
    assert!(first.wait().expect("first run").success());
    // Its masker is gone with its output: the budget is back.
    let again = h.run(&["run", "--env", "T=mid", "--", "sh", "-c", "echo \"$T\""]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(again.stdout, b"********\n");
}
