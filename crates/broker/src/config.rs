//! `config.toml`: daemon settings. Unknown keys are errors (a typo must not silently leave a
//! protection off), and every error names the file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 256 * 1024;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[daemon]`.
    #[serde(default)]
    pub daemon: DaemonConfig,
}

/// `[daemon]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Wipe a cached secret after this long without use (`"60s"`).
    #[serde(with = "humantime_serde_compat")]
    pub idle_ttl: Duration,
    /// Refuse to start when ptrace_scope is 0 or Yama is absent.
    pub require_ptrace_scope: bool,
    /// Refuse the sealed-memfd fallback when memfd_secret is unavailable.
    pub require_secretmem: bool,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Most connections that have not said hello yet; the oldest is dropped beyond this.
    pub max_pending: usize,
    /// Seconds a new connection has to say hello.
    #[serde(with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    /// How long an approval request waits for the owner (default 5 minutes).
    #[serde(with = "humantime_serde_compat")]
    pub approval_ttl: Duration,
    /// Group allowed to reach the socket (for agents under other uids): the socket becomes
    /// 0660 and its directory 0710, both of this group. The peer uid check still applies.
    pub socket_group: Option<String>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            idle_ttl: Duration::from_secs(60),
            require_ptrace_scope: false,
            require_secretmem: false,
            max_connections: 512,
            max_pending: 64,
            handshake_timeout: Duration::from_secs(10),
            approval_ttl: Duration::from_secs(300),
            socket_group: None,
        }
    }
}

/// Durations as humantime strings ("60s", "5m").
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

/// Config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading failed.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Larger than the limit.
    #[error("config {path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not valid TOML or an unknown/invalid key.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What and where (TOML's message names the key and line).
        message: String,
    },
}

impl Config {
    /// Parses config text.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.message().to_string() + &location(text, e.span()),
        })?;
        if cfg.daemon.max_connections == 0 || cfg.daemon.max_pending == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "daemon.max_connections and daemon.max_pending must be at least 1".into(),
            });
        }
        Ok(cfg)
    }

    /// Loads `path`; a missing file at the default location means defaults.
    ///
    /// # Errors
    /// [`ConfigError`] for an unreadable, oversized or invalid file.
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, ConfigError> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        // A config others can write could switch protections off: same rule as state files,
        // except that it may be readable.
        {
            use std::os::unix::fs::MetadataExt;
            let meta = file.metadata().map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let euid = nix::unistd::geteuid().as_raw();
            let problem = if !meta.is_file() {
                Some("not a regular file".to_string())
            } else if meta.uid() != euid && meta.uid() != 0 {
                Some(format!(
                    "owned by uid {}, not by {euid} or root",
                    meta.uid()
                ))
            } else if meta.mode() & 0o022 != 0 {
                Some(format!(
                    "mode {:o} lets group or others write it (chmod go-w)",
                    meta.mode() & 0o777
                ))
            } else {
                None
            };
            if let Some(message) = problem {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message,
                });
            }
        }
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        Config::parse(&text, path)
    }
}

/// " (line N)" for a byte span, if any.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| {
        let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
        format!(" (line {line})")
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        let p = Path::new("c.toml");
        let c = Config::parse("", p).unwrap();
        assert_eq!(c.daemon.idle_ttl, Duration::from_secs(60));
        let c = Config::parse("[daemon]\nidle_ttl = \"2s\"\nmax_connections = 3\n", p).unwrap();
        assert_eq!(c.daemon.idle_ttl, Duration::from_secs(2));
        assert_eq!(c.daemon.max_connections, 3);
    }

    #[test]
    fn errors_name_the_key() {
        let p = Path::new("c.toml");
        let e = Config::parse("[daemon]\nidle_tll = \"2s\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("idle_tll") && e.contains("line 2"), "{e}");
        let e = Config::parse("[daemon]\nidle_ttl = \"soon\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("soon") && e.contains("c.toml"), "{e}");
        let e = Config::parse("[demon]\n", p).unwrap_err().to_string();
        assert!(e.contains("demon"), "{e}");
        assert!(Config::parse("[daemon]\nmax_pending = 0\n", p).is_err());
    }
}
