//! Where the daemon's socket lives (DESIGN.md, Wire protocol):
//! `$AGENTKEYS_SOCKET`, else `$XDG_RUNTIME_DIR/agentkeys/agentkeysd.sock`, else
//! `$AGENTKEYS_HOME/agentkeysd.sock`.

use std::path::{Path, PathBuf};

/// The socket path for a daemon whose state lives in `home`.
pub fn socket_path(home: &Path) -> PathBuf {
    socket_path_from(
        std::env::var_os("AGENTKEYS_SOCKET").map(PathBuf::from),
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        home,
    )
}

/// [`socket_path`] with the environment passed in (testable).
pub fn socket_path_from(
    socket: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    home: &Path,
) -> PathBuf {
    match (socket, runtime_dir) {
        (Some(s), _) if !s.as_os_str().is_empty() => s,
        (_, Some(r)) if r.is_absolute() => r.join("agentkeys").join("agentkeysd.sock"),
        _ => home.join("agentkeysd.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_order() {
        let home = Path::new("/h/.agentkeys");
        assert_eq!(
            socket_path_from(Some("/s.sock".into()), Some("/run/user/1".into()), home),
            PathBuf::from("/s.sock")
        );
        assert_eq!(
            socket_path_from(None, Some("/run/user/1".into()), home),
            PathBuf::from("/run/user/1/agentkeys/agentkeysd.sock")
        );
        assert_eq!(
            socket_path_from(None, Some("relative".into()), home),
            home.join("agentkeysd.sock")
        );
        assert_eq!(
            socket_path_from(None, None, home),
            home.join("agentkeysd.sock")
        );
    }
}
