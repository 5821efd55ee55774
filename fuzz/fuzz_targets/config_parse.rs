//! `config.toml` parsing (`Config::parse`), fed arbitrary text.
//!
//! Properties: no panic (the error location code slices the text by TOML's byte spans); an
//! accepted config keeps the limits the parser promises; an error names the file.
#![no_main]

use std::path::Path;

use agentkeys_broker::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

/// `Config::load` reads at most this much (`MAX_CONFIG_BYTES` in config.rs).
const MAX_CONFIG_BYTES: usize = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_CONFIG_BYTES {
        return;
    }
    // `load` reads the file into a String, so non-UTF-8 never reaches `parse`.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/fuzz/config.toml");
    match Config::parse(text, path) {
        Ok(cfg) => {
            assert!(cfg.daemon.max_connections >= 1);
            assert!(cfg.daemon.max_pending >= 1);
        }
        Err(e) => {
            assert!(matches!(e, ConfigError::Invalid { .. }));
            assert!(
                e.to_string().contains("/fuzz/config.toml"),
                "error does not name the file"
            );
        }
    }
});
