//! The jail's policy: plain data that says what a jail hides, what it lets the agent write,
//! which sockets stay reachable, which environment names pass and which protections are
//! required. [`PolicyBuilder`] makes one from the owner's environment and the command line;
//! [`JailPolicy::print`] shows it (`agentkeys jail --print-policy`); [`crate::apply`] applies it.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::JailError;

/// The policy format's version.
pub const POLICY_VERSION: u32 = 1;
/// Most paths of each kind a policy may name (a bound on what the daemon accepts).
pub const MAX_PATHS: usize = 256;
/// Where the jail puts the session token file, in a tmpfs only the jail sees.
pub const SESSION_DIR: &str = "/dev/agentkeys";
/// The session token file inside the jail.
pub const SESSION_FILE: &str = "/dev/agentkeys/session";
/// The daemon's socket inside the jail, bound there too, so a client that finds no
/// `AGENTKEYS_SOCKET` (an MCP host passes its servers a minimal environment) still reaches it.
pub const SESSION_SOCKET: &str = "/dev/agentkeys/agentkeysd.sock";

/// Most `--allow-host` patterns a policy may name.
pub const MAX_ALLOW_HOSTS: usize = 64;

/// The proxy's CA bundle in `$AGENTKEYS_HOME` (bound back into the jail, read-only).
pub const PROXY_CA_BUNDLE: &str = "proxy-ca-bundle.pem";

/// How the jail reaches the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// The host's network, unchanged (agents need their APIs).
    Host,
    /// `--net proxy`: a network namespace of the jail's own with only `lo`, where
    /// `127.0.0.1:PORT` (the proxy's port) is relayed by `agentkeys jail` to agentkeys'
    /// credential-injecting proxy, and to nothing else. The proxy refuses (403, audited
    /// `deny`) every host but the services' inject hosts and `allow_hosts`. A `run` of the
    /// jail's session gets a network namespace of its own with no interface up: no network.
    Proxy {
        /// `--allow-host HOST[:PORT]`: reachable through the proxy without injection
        /// (`HostPattern` text, checked by the CLI and again by the proxy).
        allow_hosts: Vec<String>,
    },
}

impl Network {
    /// `true` for [`Network::Proxy`].
    pub fn is_proxy(&self) -> bool {
        matches!(self, Network::Proxy { .. })
    }
}

/// Credentials files and directories hidden by default, relative to the home directory.
pub const DEFAULT_HIDDEN_IN_HOME: &[&str] = &[
    // Private keys and the agent's way to them (ssh-agent's socket is hidden separately).
    ".ssh",
    ".gnupg",
    ".password-store",
    // Cloud and cluster credentials.
    ".aws",
    ".azure",
    ".config/gcloud",
    ".kube/config",
    // All of ~/.docker, not only config.json: Docker Desktop's and rootless setups' sockets
    // live there (a docker socket is the host), and contexts keep TLS keys.
    ".docker",
    // Other container VMs' sockets (colima, lima, Rancher Desktop) and screen's.
    ".colima",
    ".lima",
    ".rd",
    ".screen",
    ".vault-token",
    ".terraform.d/credentials.tfrc.json",
    // Forges and package registries.
    ".netrc",
    ".git-credentials",
    ".config/gh",
    ".config/hub",
    ".npmrc",
    ".pypirc",
    ".cargo/credentials",
    ".cargo/credentials.toml",
    ".gem/credentials",
    // Keyrings and browser profiles (cookies are credentials).
    ".local/share/keyrings",
    ".mozilla",
    ".config/google-chrome",
    ".config/chromium",
    ".config/BraveSoftware",
    // agentkeys' own default token place (besides $AGENTKEYS_HOME).
    ".config/agentkeys",
    // Shell and tool histories (commands typed with secrets in them).
    ".bash_history",
    ".zsh_history",
    ".histfile",
    ".sh_history",
    ".local/share/fish/fish_history",
    ".python_history",
    ".node_repl_history",
    ".psql_history",
    ".mysql_history",
    ".sqlite_history",
    ".lesshst",
    ".viminfo",
];

/// Well-known sockets of other local services hidden by default (besides the whole of
/// `/run/user`, which holds the owner's D-Bus, systemd, gpg-agent, Wayland and PulseAudio
/// sockets, and a private `/tmp`, which hides X11's, tmux's and ssh-agent's usual places).
pub const DEFAULT_HIDDEN_SOCKETS: &[&str] = &[
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/podman",
    "/run/containerd",
    "/run/dbus",
    "/run/screen",
    "/run/tmux",
    "/run/systemd/private",
    "/run/user",
    // Container managers whose socket is outside /run (root-only: a root owner's agent is
    // uid 0, and these sockets are the host).
    "/var/lib/lxd",
    "/var/snap/lxd/common/lxd",
    "/var/lib/incus",
];

/// Files the owner's tools run by themselves, relative to each writable root: kept read-only
/// there (a read-only bind mount over each that exists). `.git` is handled apart (see
/// [`GitAccess`], [`GIT_PROTECTED_DIRS`]); `.direnv` holds what direnv puts on the owner's
/// PATH.
pub const PROTECTED_IN_WRITABLE: &[&str] = &[
    ".envrc",
    ".vscode",
    ".direnv",
    ".cargo/config",
    ".cargo/config.toml",
];

/// How much of a repository's `.git` directory the agent may write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GitAccess {
    /// The default: `.git` read-only as a whole (no `git add` or `git commit` inside the
    /// jail). Fails closed: with a writable index the agent could add a submodule whose
    /// configuration the owner's next `git status` runs (see [`crate::gitlinks`]).
    #[default]
    ReadOnly,
    /// `--git-commit`: git's own work (index, objects, refs, logs, `HEAD`, lock files,
    /// `COMMIT_EDITMSG`, `packed-refs`, rebase and merge state) is writable, so `git add` and
    /// `git commit` work; everything in it that makes git run a program or read
    /// configuration ([`GIT_PROTECTED_DIRS`], [`GIT_PROTECTED_FILES`], `commondir`) is
    /// read-only, made as a read-only placeholder when missing, and `.git` itself is a mount
    /// point, so it cannot be renamed away and replaced. The agent can add a submodule
    /// (named after the jail, not stopped).
    Commit,
}

/// Directories inside an existing `.git` directory that stay read-only as a whole with
/// [`GitAccess::Commit`] (made empty when missing): `hooks`; `info` (`attributes` picks
/// filter and diff drivers, `exclude`, `sparse-checkout`, `grafts`); `modules` (each
/// submodule's own config and hooks); `worktrees` (each linked worktree's `commondir`,
/// `gitdir`, `config.worktree`, `HEAD` and index); `remotes` and `branches` (the old ways to
/// name a remote's URL, read when the config names none).
pub const GIT_PROTECTED_DIRS: &[&str] = &[
    "hooks",
    "info",
    "modules",
    "worktrees",
    "remotes",
    "branches",
];

/// Files inside an existing `.git` directory that stay read-only with [`GitAccess::Commit`]
/// (made empty when missing): `config` (`core.fsmonitor`, `core.hooksPath`, `core.pager`,
/// `core.sshCommand`, aliases, filters, `credential.helper`, `include.path`) and
/// `config.worktree` (read when `extensions.worktreeConfig` is set).
pub const GIT_PROTECTED_FILES: &[&str] = &["config", "config.worktree"];

/// `.git/commondir` names the directory git takes `config`, `hooks`, `objects` and `refs`
/// from. An empty one makes git die ("failed to read"), so a missing one becomes a read-only
/// placeholder holding [`COMMONDIR_PLACEHOLDER`]: `.`, the git directory itself, which is
/// what git uses when there is none.
pub const GIT_COMMONDIR: &str = "commondir";

/// What a `commondir` placeholder holds.
pub const COMMONDIR_PLACEHOLDER: &str = ".\n";

/// Made as an empty read-only directory, or kept read-only, at a writable root where git
/// might find no valid `.git` (none in the working directory; one the agent can write, with
/// [`GitAccess::Commit`]): git then takes the directory itself for a bare repository when it
/// holds a `HEAD` file, `objects/` and `refs/`, and reads its `config` (`core.pager` runs at the
/// owner's next `git log`). A directory is never a valid `HEAD`, and `git add` never adds an
/// empty one.
pub const BARE_REPOSITORY_GUARD: &str = "HEAD";

/// NixOS's system profile, under the hidden `/run`: the same symbolic link (into the
/// read-only `/nix/store`) made again there when it exists; bound back read-only if it is not
/// a link.
pub const NIXOS_CURRENT_SYSTEM: &str = "/run/current-system";

/// Among [`PROTECTED_IN_WRITABLE`], what is made (empty) when missing so the agent cannot
/// create it: directories. `.vscode` is where tasks that run on opening the folder live. (A
/// missing `.git` in the working directory is made too, whatever [`GitAccess`]: an empty
/// `.git` directory is not a repository, git looks further up as without it.)
pub const PLACEHOLDER_DIRS_IN_WRITABLE: &[&str] = &[".vscode"];

/// The same for files: an empty `.envrc` (direnv runs a new one only once the owner allows
/// it, but one it knows by path and hash is replaced by the agent's otherwise).
pub const PLACEHOLDER_FILES_IN_WRITABLE: &[&str] = &[".envrc"];

/// The same for a writable root inside the home directory (`--write ~/.config`): paths
/// relative to the home directory that stay read-only if they fall inside it. Directories
/// among them ([`PROTECTED_DIRS_IN_HOME`]) are created empty when missing.
pub const PROTECTED_IN_HOME: &[&str] = &[
    ".config/systemd",
    ".config/autostart",
    ".config/environment.d",
    ".config/fish",
    ".config/git",
    ".config/nvim",
    ".config/direnv",
    ".local/bin",
    ".local/share/applications",
    ".local/share/systemd",
    ".cargo/bin",
    ".cargo/env",
    ".cargo/config",
    ".cargo/config.toml",
];

/// Directories among [`PROTECTED_IN_HOME`] (created when missing so the agent cannot create
/// them: `~/.config/git/config` is read by every git the owner runs, `~/.local/bin` and
/// `~/.cargo/bin` are on the owner's PATH).
pub const PROTECTED_DIRS_IN_HOME: &[&str] = &[
    ".config/systemd",
    ".config/autostart",
    ".config/environment.d",
    ".config/fish",
    ".config/git",
    ".config/nvim",
    ".config/direnv",
    ".local/bin",
    ".local/share/applications",
    ".local/share/systemd",
    ".cargo/bin",
];

/// Environment variables that point at sockets or displays of other services: removed.
pub const SOCKET_POINTERS: &[&str] = &[
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "DBUS_SESSION_BUS_ADDRESS",
    "DBUS_SYSTEM_BUS_ADDRESS",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "WAYLAND_SOCKET",
    "XAUTHORITY",
    "GPG_AGENT_INFO",
    "DOCKER_HOST",
    "CONTAINER_HOST",
    "TMUX",
    "TMUX_PANE",
    "STY",
    "PULSE_SERVER",
    "KRB5CCNAME",
    "VAULT_ADDR",
    "BAO_ADDR",
];

/// Name fragments (upper-cased name contains one) that mark a variable as a credential.
pub const CREDENTIAL_FRAGMENTS: &[&str] = &[
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "PASSPHRASE",
    "KEY",
    "CREDENTIAL",
    "AUTH",
    "COOKIE",
    "SESSION",
    "PRIVATE",
    "SIGNATURE",
    "APIKEY",
];

/// Words (between `_` or the name's ends) that mark a variable as a credential: `GITLAB_PAT`,
/// `MYSQL_PWD`, `SENTRY_DSN`; as words, so `LD_LIBRARY_PATH` and `PWD` are not caught.
pub const CREDENTIAL_WORDS: &[&str] = &["PAT", "PWD", "DSN"];

/// Names that contain a fragment but are not credentials: passed.
pub const NOT_CREDENTIALS: &[&str] = &[
    "KEYTIMEOUT",
    "XDG_SESSION_TYPE",
    "XDG_SESSION_CLASS",
    "PWD",
    "OLDPWD",
];

/// Whether an environment value carries a credential whatever its name: a URL with a
/// password or a token in its user part (`postgres://app:pw@db/x`, `https://ghp_...@github.com`,
/// `PIP_INDEX_URL=https://__token__:pypi-...@...`). A plain user name (`ssh://git@host`) is
/// not one.
pub fn env_value_is_credential(value: &str) -> bool {
    value.match_indices("://").any(|(i, _)| {
        let rest = &value[i + 3..];
        let end = rest
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        match authority.rfind('@') {
            Some(at) if at > 0 => {
                let user = &authority[..at];
                user.contains(':') || user.len() >= 16
            }
            _ => false,
        }
    })
}

/// Whether the environment variable `name` is removed, and why (`credential`, `socket`,
/// `agentkeys`); `None`: it passes.
pub fn env_removal_reason(name: &str) -> Option<&'static str> {
    let up = name.to_ascii_uppercase();
    if up.starts_with("AGENTKEYS_") {
        return Some("agentkeys");
    }
    if SOCKET_POINTERS.contains(&up.as_str()) {
        return Some("socket");
    }
    if NOT_CREDENTIALS.contains(&up.as_str()) {
        return None;
    }
    if CREDENTIAL_FRAGMENTS.iter().any(|f| up.contains(f))
        || up.split('_').any(|w| CREDENTIAL_WORDS.contains(&w))
    {
        return Some("credential");
    }
    None
}

/// Which environment names pass into the jail (values are never part of a policy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvPolicy {
    /// Names removed from the owner's environment (credentials, socket pointers, agentkeys').
    pub removed: Vec<String>,
    /// Names passed on purpose with `--env` although they match the pattern.
    pub passed: Vec<String>,
}

/// The protections a jail applies; each one can be required (the default) or, with
/// `--best-effort`, skipped where the kernel lacks it (and then listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protection {
    /// User, mount, PID and IPC namespaces: the hidden paths, read-only view, private /tmp,
    /// hidden sockets, and processes outside the jail made unnameable.
    Namespaces,
    /// Landlock: the filesystem layer, and (ABI 6) signals and abstract unix sockets scoped
    /// to the jail.
    Landlock,
    /// The seccomp filter (ptrace, TIOCSTI, new user namespaces, mount, keyctl, bpf, ...).
    Seccomp,
}

impl Protection {
    /// What is lost without it, for `--best-effort`'s list.
    pub fn loss(self) -> &'static str {
        match self {
            Protection::Namespaces => {
                "no user/mount/PID namespaces: agentkeys' state, credential files and service \
                 sockets are NOT hidden, the filesystem is NOT read-only, and outside processes \
                 stay visible"
            }
            Protection::Landlock => {
                "no Landlock: signals to outside processes and abstract unix sockets are NOT \
                 scoped to the jail, and there is no second filesystem layer"
            }
            Protection::Seccomp => "no seccomp filter",
        }
    }
}

/// The jail's policy. Plain data: printed by `--print-policy`, sent to the daemon so a `run`
/// of the jailed session is confined by the same rules, and applied by [`crate::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailPolicy {
    /// [`POLICY_VERSION`].
    pub version: u32,
    /// The uid and gid mapped to themselves in the jail's user namespace (the owner's).
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// The working directory (writable).
    pub cwd: PathBuf,
    /// Writable roots besides the private temporary directories: the working directory and
    /// `--write` paths. Everything else is read-only.
    pub writable: Vec<PathBuf>,
    /// Fresh, empty, private tmpfs mounts (writable).
    pub private_tmp: Vec<PathBuf>,
    /// Hidden: an empty read-only tmpfs over a directory, an empty read-only file over a file.
    pub hidden: Vec<PathBuf>,
    /// Bound back into hidden directories, same path (agentkeys' socket, `--allow-socket`,
    /// `--show` of a path inside a hidden directory).
    pub reveal: Vec<PathBuf>,
    /// Read-only inside writable roots (files the owner's tools run by themselves).
    pub protected: Vec<PathBuf>,
    /// Directories created (empty) before being made read-only, so the agent cannot create
    /// them.
    pub create_dirs: Vec<PathBuf>,
    /// Files created (empty) before being made read-only, for the same reason (`.envrc`).
    /// `agentkeys jail` removes what it created, if still empty, when the jail ends.
    #[serde(default)]
    pub create_files: Vec<PathBuf>,
    /// `.git/commondir` files created holding [`COMMONDIR_PLACEHOLDER`] before being made
    /// read-only (an empty one would break git); removed the same way, if they still hold it.
    #[serde(default)]
    pub create_commondir: Vec<PathBuf>,
    /// How much of `.git` the agent may write ([`GitAccess`]).
    #[serde(default)]
    pub git: GitAccess,
    /// agentkeys' socket, also bound at [`SESSION_SOCKET`] in a jail with a session.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// The network.
    pub network: Network,
    /// The environment filter.
    pub env: EnvPolicy,
    /// Protections applied; with `best_effort` false, a missing one refuses the jail.
    pub protections: Vec<Protection>,
    /// Protections that were skipped because the kernel lacks them (`--best-effort` only).
    #[serde(default)]
    pub skipped: Vec<Protection>,
    /// Run half-confined when a protection is missing (and list it) instead of refusing.
    pub best_effort: bool,
    /// The submodules of each writable root as listed while the policy was built, kept for
    /// [`crate::gitlinks::changes`] after the jail (the owner's side only: never printed or
    /// sent).
    #[serde(skip)]
    pub gitlinks_before: crate::gitlinks::Snapshot,
}

/// Options from the command line.
#[derive(Debug, Clone, Default)]
pub struct JailOptions {
    /// `--write PATH`.
    pub write: Vec<PathBuf>,
    /// `--hide PATH`.
    pub hide: Vec<PathBuf>,
    /// `--show PATH`.
    pub show: Vec<PathBuf>,
    /// `--allow-socket PATH`.
    pub allow_socket: Vec<PathBuf>,
    /// `--env NAME`.
    pub env: Vec<String>,
    /// `--best-effort`.
    pub best_effort: bool,
    /// `--net` (default [`Network::Host`]).
    pub network: Option<Network>,
    /// `--git-commit`: git's own work in `.git` writable ([`GitAccess::Commit`]); `.git`
    /// read-only as a whole without it.
    pub git_commit: bool,
}

/// What the owner's side knows when building a policy (passed in, so tests can build one for
/// any home).
#[derive(Debug, Clone)]
pub struct Context {
    /// The owner's home directory.
    pub home: PathBuf,
    /// `$AGENTKEYS_HOME` (resolved).
    pub agentkeys_home: PathBuf,
    /// The daemon's socket (kept reachable).
    pub socket: PathBuf,
    /// The working directory.
    pub cwd: PathBuf,
    /// `$XDG_RUNTIME_DIR`, if set.
    pub runtime_dir: Option<PathBuf>,
    /// `$HISTFILE`, if set.
    pub histfile: Option<PathBuf>,
    /// The owner's uid and gid.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
}

/// `path` made absolute against `base` and normalised lexically (`.` and `..` removed; `..`
/// never climbs above `/`).
pub fn absolute(base: &Path, path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// `path` resolved through every symlink when it exists; otherwise its lexical form.
fn resolve(base: &Path, path: &Path) -> PathBuf {
    let abs = absolute(base, path);
    // One stat first: most of the default hidden paths do not exist, and canonicalising a
    // missing path reads every component as a link before it fails (the same answer).
    if std::fs::metadata(&abs).is_err() {
        return abs;
    }
    std::fs::canonicalize(&abs).unwrap_or(abs)
}

fn under(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
}

/// Builds a [`JailPolicy`].
#[derive(Debug)]
pub struct PolicyBuilder {
    ctx: Context,
    opts: JailOptions,
}

impl PolicyBuilder {
    /// A builder for this context and these options.
    pub fn new(ctx: Context, opts: JailOptions) -> PolicyBuilder {
        PolicyBuilder { ctx, opts }
    }

    /// The policy, with every path resolved and checked.
    ///
    /// # Errors
    /// [`JailError::Policy`] naming the offending path: a writable root that is or contains
    /// the home directory or `/`, that lies inside a hidden path, or that does not exist; an
    /// `--allow-socket` that is not a socket; a protected path that is a symbolic link.
    pub fn build(self) -> Result<JailPolicy, JailError> {
        let ctx = &self.ctx;
        let cwd = resolve(&ctx.cwd, Path::new("."));
        let home = resolve(&ctx.cwd, &ctx.home);
        let bad = |p: &Path, why: &str| JailError::Policy(format!("{}: {why}", p.display()));

        // Hidden: agentkeys' state first, then the default set, then --hide.
        let mut hidden: BTreeSet<PathBuf> = BTreeSet::new();
        hidden.insert(resolve(&cwd, &ctx.agentkeys_home));
        hidden.insert(absolute(&cwd, &ctx.agentkeys_home));
        for rel in DEFAULT_HIDDEN_IN_HOME {
            hidden.insert(resolve(&cwd, &home.join(rel)));
        }
        if let Some(h) = &ctx.histfile {
            hidden.insert(resolve(&cwd, h));
        }
        for s in DEFAULT_HIDDEN_SOCKETS {
            hidden.insert(resolve(&cwd, Path::new(s)));
        }
        if let Some(r) = &ctx.runtime_dir {
            hidden.insert(resolve(&cwd, r));
        }
        for h in &self.opts.hide {
            let p = resolve(&cwd, h);
            if !p.exists() {
                return Err(bad(h, "--hide: no such file or directory"));
            }
            hidden.insert(p);
        }
        // --show: drop an exact entry, else bind the path back inside a hidden directory.
        let mut reveal: BTreeSet<PathBuf> = BTreeSet::new();
        for s in &self.opts.show {
            let p = resolve(&cwd, s);
            let a = absolute(&cwd, s);
            let ak = resolve(&cwd, &ctx.agentkeys_home);
            if under(&p, &ak) || under(&a, &ak) {
                return Err(bad(s, "--show cannot reveal agentkeys' state"));
            }
            if !(hidden.remove(&p) | hidden.remove(&a)) {
                if !p.exists() {
                    return Err(bad(s, "--show: no such file or directory"));
                }
                reveal.insert(p);
            }
        }
        // All of /run: the owner's other local services listen there (PostgreSQL's socket
        // with peer authentication takes the agent for the owner; a root owner's agent is uid
        // 0 without capabilities, and every root-only socket there, libvirt's, containerd's,
        // systemd's, would take it for root). The resolver's file is bound back when
        // /etc/resolv.conf points there.
        hidden.insert(PathBuf::from("/run"));
        if let Ok(r) = std::fs::canonicalize("/etc/resolv.conf")
            && r.starts_with("/run")
        {
            reveal.insert(r);
        }
        // NixOS: every program is reached through /run/current-system (its sw/bin is on PATH),
        // a symbolic link into the read-only /nix/store: made again in the hidden /run (a
        // path bound back that is not a link or a socket is read-only). Not /run/wrappers:
        // its programs are set-ID.
        if std::fs::metadata(NIXOS_CURRENT_SYSTEM).is_ok() {
            reveal.insert(PathBuf::from(NIXOS_CURRENT_SYSTEM));
        }
        // Sockets kept reachable: agentkeys' own, and --allow-socket.
        let socket = resolve(&cwd, &ctx.socket);
        reveal.insert(socket.clone());
        // The proxy's CA bundle (system roots and the agentkeys CA's certificate: public), so
        // programs of the jail and its runs given `--proxy` trust the proxy. Bound read-only,
        // by itself; the CA's key (sealed, in another file) stays hidden with the rest.
        reveal.insert(resolve(&cwd, &ctx.agentkeys_home).join(PROXY_CA_BUNDLE));
        for s in &self.opts.allow_socket {
            let p = resolve(&cwd, s);
            use std::os::unix::fs::FileTypeExt;
            match std::fs::metadata(&p) {
                Ok(m) if m.file_type().is_socket() => {
                    reveal.insert(p);
                }
                Ok(_) => return Err(bad(s, "--allow-socket: not a unix socket")),
                Err(e) => return Err(bad(s, &format!("--allow-socket: {e}"))),
            }
        }

        // Writable roots: the working directory and --write.
        let mut writable: Vec<PathBuf> = vec![cwd.clone()];
        for w in &self.opts.write {
            let p = resolve(&cwd, w);
            if !writable.contains(&p) {
                writable.push(p);
            }
        }
        for (i, w) in writable.iter().enumerate() {
            let what = if i == 0 {
                "the working directory"
            } else {
                "--write"
            };
            if !w.exists() {
                return Err(bad(w, &format!("{what}: no such file or directory")));
            }
            if w == Path::new("/") || under(&home, w) {
                return Err(bad(
                    w,
                    &format!(
                        "{what} would make your home directory (or /) writable, where the agent \
                         could plant shell start-up files; run the jail from a project \
                         directory, and give --write for the few places it must write"
                    ),
                ));
            }
            if let Some(h) = hidden.iter().find(|h| under(w, h)) {
                return Err(bad(
                    w,
                    &format!("{what} lies inside a hidden path ({})", h.display()),
                ));
            }
        }

        // Protected files inside writable roots.
        let mut protected: BTreeSet<PathBuf> = BTreeSet::new();
        let mut create_dirs: BTreeSet<PathBuf> = BTreeSet::new();
        let mut create_files: BTreeSet<PathBuf> = BTreeSet::new();
        let mut create_commondir: BTreeSet<PathBuf> = BTreeSet::new();
        let mut gitlinks_before = crate::gitlinks::Snapshot::default();
        let git = if self.opts.git_commit {
            GitAccess::Commit
        } else {
            GitAccess::ReadOnly
        };
        for (i, root) in writable.iter().enumerate() {
            if !root.is_dir() {
                continue;
            }
            let dot_git = root.join(".git");
            check_not_symlink(&dot_git)?;
            let git_meta = std::fs::symlink_metadata(&dot_git);
            // Where git could find no valid `.git` (none in the project, or one the agent can
            // break), it would take the root itself for a bare repository: no `HEAD` there.
            let guard = match &git_meta {
                Ok(m) => m.is_dir() && git == GitAccess::Commit,
                Err(_) => i == 0,
            };
            if guard {
                let p = root.join(BARE_REPOSITORY_GUARD);
                check_not_symlink(&p)?;
                if std::fs::symlink_metadata(&p).is_err() {
                    create_dirs.insert(p.clone());
                }
                protected.insert(p);
            }
            match git_meta {
                // A repository: its git directory with what runs programs read-only (the
                // directory itself is pinned as their parent), or all of it.
                Ok(m) if m.is_dir() && git == GitAccess::Commit => {
                    for rel in GIT_PROTECTED_DIRS {
                        let p = dot_git.join(rel);
                        check_not_symlink(&p)?;
                        if std::fs::symlink_metadata(&p).is_err() {
                            create_dirs.insert(p.clone());
                        }
                        protected.insert(p);
                    }
                    for rel in GIT_PROTECTED_FILES {
                        let p = dot_git.join(rel);
                        check_not_symlink(&p)?;
                        if std::fs::symlink_metadata(&p).is_err() {
                            create_files.insert(p.clone());
                        }
                        protected.insert(p);
                    }
                    let p = dot_git.join(GIT_COMMONDIR);
                    check_not_symlink(&p)?;
                    if std::fs::symlink_metadata(&p).is_err() {
                        create_commondir.insert(p.clone());
                    }
                    protected.insert(p);
                }
                // A worktree's or submodule's `.git` file (`gitdir: ...`), or `.git` whole. A
                // link inside it (`hooks -> ../.githooks`) would lead git to what the agent
                // can write: refused as in the default mode.
                Ok(m) => {
                    if m.is_dir() {
                        for rel in GIT_PROTECTED_DIRS
                            .iter()
                            .chain(GIT_PROTECTED_FILES)
                            .chain(&[GIT_COMMONDIR])
                        {
                            check_not_symlink(&dot_git.join(rel))?;
                        }
                    }
                    protected.insert(dot_git);
                }
                // None in the project: an empty, read-only placeholder (no `git init`).
                Err(_) if i == 0 => {
                    create_dirs.insert(dot_git.clone());
                    protected.insert(dot_git);
                }
                Err(_) => {}
            }
            // Existing submodules (gitlinks in the index): the owner's `git status` here runs
            // a `git status` in each populated one, which reads its own config. A populated
            // one's `.git` (a file naming the git directory, or an embedded directory)
            // read-only whole in both modes, and the git directory a `.git` file names too
            // when a writable root holds it; an unpopulated one's directory read-only (no
            // `.git` may appear); their directories are pinned as parents (`mv sub sub2`
            // cannot carry it away).
            let listed = crate::gitlinks::listing(root);
            for sub in listed.iter().flat_map(|l| l.keys()) {
                protect_submodule(root, sub, &writable, &mut protected, &mut create_dirs, 0)?;
            }
            if let Some(links) = listed {
                gitlinks_before.0.push((root.clone(), links));
            }
            // A root inside a repository (the jail run in a subdirectory of a monorepo): the
            // gitlinks of the nearest one above that lie in the root, the same way (the
            // owner's `git status` there recurses into them).
            if std::fs::symlink_metadata(root.join(".git")).is_err()
                && let Some(top) = root
                    .ancestors()
                    .skip(1)
                    .find(|a| std::fs::symlink_metadata(a.join(".git")).is_ok())
            {
                for sub in crate::gitlinks::paths(top) {
                    let dir = absolute(top, Path::new(&sub));
                    if under(&dir, root) && dir != *root {
                        protect_submodule(
                            top,
                            &sub,
                            &writable,
                            &mut protected,
                            &mut create_dirs,
                            0,
                        )?;
                    }
                }
            }
            // Hooks the owner's git runs from elsewhere (`core.hooksPath`, husky's `.husky/_`):
            // read-only too when a writable root holds them.
            if let Some(hp) = hooks_path(root, &home) {
                let hp = resolve(root, &hp);
                if let Some(r) = writable.iter().find(|w| under(&hp, w)) {
                    if hp == *r {
                        return Err(bad(
                            &hp,
                            "is git's core.hooksPath: a writable hooks directory lets the agent \
                             plant what your git runs; point core.hooksPath elsewhere",
                        ));
                    }
                    check_not_symlink(&hp)?;
                    if !hp.exists() {
                        placeholder_dir(&hp, r, &mut create_dirs);
                    }
                    protected.insert(hp);
                }
            }
            for rel in PROTECTED_IN_WRITABLE {
                let p = root.join(rel);
                check_not_symlink(&p)?;
                if std::fs::symlink_metadata(&p).is_ok() {
                    protected.insert(p);
                } else if i > 0 {
                    // Placeholders in the working directory (the project) only.
                } else if PLACEHOLDER_DIRS_IN_WRITABLE.contains(rel) {
                    create_dirs.insert(p.clone());
                    protected.insert(p);
                } else if PLACEHOLDER_FILES_IN_WRITABLE.contains(rel) {
                    create_files.insert(p.clone());
                    protected.insert(p);
                }
            }
            for rel in PROTECTED_IN_HOME {
                let p = home.join(rel);
                if !under(&p, root) {
                    continue;
                }
                check_not_symlink(&p)?;
                if p.exists() {
                    protected.insert(p);
                } else if PROTECTED_DIRS_IN_HOME.contains(rel) {
                    placeholder_dir(&p, root, &mut create_dirs);
                    protected.insert(p);
                }
            }
        }
        // Directories on the owner's PATH inside a writable root: the owner's shell runs
        // programs from them by name (`~/.cargo/bin/cargo`, a direnv layout's bin).
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path).filter(|d| d.is_absolute()) {
                let d = resolve(&cwd, &dir);
                let Some(root) = writable.iter().find(|w| under(&d, w)) else {
                    continue;
                };
                if d == *root {
                    return Err(bad(
                        &d,
                        "is on your PATH: a writable PATH directory lets the agent replace the \
                         programs your shell runs by name; give --write for what it must write \
                         instead",
                    ));
                }
                check_not_symlink(&d)?;
                if !d.exists() {
                    placeholder_dir(&d, root, &mut create_dirs);
                }
                protected.insert(d);
            }
        }
        // A --write inside a protected path would be read-only anyway: say so.
        for w in writable.iter().skip(1) {
            if let Some(r) = writable
                .iter()
                .find(|r| *r != w && under(w, &r.join(".git")))
            {
                return Err(bad(
                    w,
                    &format!(
                        "--write lies inside {}, git's directory: what git runs there stays \
                         read-only in a jail (give --git-commit to let the agent commit)",
                        r.join(".git").display()
                    ),
                ));
            }
            if let Some(p) = protected.iter().find(|p| under(w, p)) {
                return Err(bad(
                    w,
                    &format!(
                        "--write lies inside {}, which stays read-only in a jail (the owner's \
                         tools run what is there by themselves)",
                        p.display()
                    ),
                ));
            }
        }

        // Environment: names only.
        let mut removed = Vec::new();
        let mut passed = Vec::new();
        for (k, v) in std::env::vars_os() {
            let Some(k) = k.to_str() else { continue };
            let in_value = v.to_str().is_some_and(env_value_is_credential);
            if env_removal_reason(k).is_some() || in_value {
                if self.opts.env.iter().any(|e| e == k) && !k.starts_with("AGENTKEYS_") {
                    passed.push(k.to_string());
                } else {
                    removed.push(k.to_string());
                }
            }
        }
        removed.sort();
        passed.sort();

        let private_tmp: Vec<PathBuf> = ["/tmp", "/var/tmp", "/dev/shm"]
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.is_dir() || p == Path::new("/dev/shm"))
            .collect();
        let policy = JailPolicy {
            version: POLICY_VERSION,
            uid: ctx.uid,
            gid: ctx.gid,
            cwd,
            writable,
            private_tmp,
            hidden: hidden.into_iter().collect(),
            reveal: reveal.into_iter().collect(),
            protected: protected.into_iter().collect(),
            create_dirs: create_dirs.into_iter().collect(),
            create_files: create_files.into_iter().collect(),
            create_commondir: create_commondir.into_iter().collect(),
            git,
            socket: Some(socket),
            network: self.opts.network.clone().unwrap_or(Network::Host),
            env: EnvPolicy { removed, passed },
            protections: vec![
                Protection::Namespaces,
                Protection::Landlock,
                Protection::Seccomp,
            ],
            skipped: Vec::new(),
            best_effort: self.opts.best_effort,
            gitlinks_before,
        };
        policy.validate()?;
        Ok(policy)
    }
}

/// `core.hooksPath` as the owner's git sees it in the repository at `root` (all config scopes;
/// `~/` expanded; relative to `root`, where git runs hooks), when `root` holds a `.git`.
fn hooks_path(root: &Path, home: &Path) -> Option<PathBuf> {
    std::fs::symlink_metadata(root.join(".git")).ok()?;
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["config", "--get", "core.hooksPath"])
        .env("GIT_DIR", root.join(".git"))
        .env("GIT_WORK_TREE", root)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let v = text.trim_end_matches(['\n', '\r']);
    if v.is_empty() {
        return None;
    }
    Some(match v.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => PathBuf::from(v),
    })
}

/// Records the placeholder directory `d` and its missing ancestors below `root`, so that
/// `agentkeys jail` removes them all (if empty) when the jail ends.
fn placeholder_dir(d: &Path, root: &Path, create_dirs: &mut BTreeSet<PathBuf>) {
    let mut p = Some(d);
    while let Some(q) = p {
        if q == root || !under(q, root) || q.exists() {
            break;
        }
        create_dirs.insert(q.to_path_buf());
        p = q.parent();
    }
}

/// Protects the submodule at `root`/`sub` (a gitlink in the index; see
/// [`PolicyBuilder::build`]) so the agent can neither rewrite its `.git` nor give it one:
/// a populated one's `.git` read-only (and the git directory a `.git` file names, when a
/// writable root holds it); an unpopulated one's directory read-only whole, made as an empty
/// placeholder when missing (the owner's `git status` would run the config of a `.git` the
/// agent put there); a file in the way read-only (a mount point: not replaceable by a
/// directory). A link on the way refuses the jail: the agent could replace it. The same for
/// the submodules of a populated one, `depth` levels down.
fn protect_submodule(
    root: &Path,
    sub: &str,
    writable: &[PathBuf],
    protected: &mut BTreeSet<PathBuf>,
    create_dirs: &mut BTreeSet<PathBuf>,
    depth: usize,
) -> Result<(), JailError> {
    let dir = absolute(root, Path::new(sub));
    if !under(&dir, root) || dir == root {
        return Ok(());
    }
    // Down from the root (the index names the path; the working tree is the agent's).
    let mut cur = root.to_path_buf();
    for c in dir.strip_prefix(root).unwrap_or(Path::new("")).components() {
        cur.push(c);
        check_not_symlink(&cur)?;
        match std::fs::symlink_metadata(&cur) {
            Err(_) => {
                placeholder_dir(&dir, root, create_dirs);
                protected.insert(dir);
                return Ok(());
            }
            Ok(m) if !m.is_dir() => {
                protected.insert(cur);
                return Ok(());
            }
            Ok(_) => {}
        }
    }
    let dot_git = dir.join(".git");
    check_not_symlink(&dot_git)?;
    let Ok(m) = std::fs::symlink_metadata(&dot_git) else {
        // Not populated: no `.git` may appear in it.
        protected.insert(dir);
        return Ok(());
    };
    if m.is_dir() {
        for rel in GIT_PROTECTED_DIRS
            .iter()
            .chain(GIT_PROTECTED_FILES)
            .chain(&[GIT_COMMONDIR])
        {
            check_not_symlink(&dot_git.join(rel))?;
        }
    } else if m.is_file() {
        // `gitdir: PATH`: where that git directory lies in a writable root (not in a path
        // already read-only), it is the agent's to rewrite: read-only whole too.
        let text = read_gitdir_file(&dot_git);
        if let Some(target) = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("gitdir: "))
            .map(str::trim_end)
            .filter(|t| !t.is_empty())
        {
            let target = absolute(&dir, Path::new(target));
            check_not_symlink(&target)?;
            let target = resolve(&dir, &target);
            let in_protected = protected.iter().any(|p| under(&target, p));
            if writable.iter().any(|w| under(&target, w))
                && !in_protected
                && std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir())
            {
                protected.insert(target);
            }
        }
    }
    protected.insert(dot_git);
    // Its own submodules: the owner's `git status` recurses into them too (their gitlinks
    // are in its index, read-only now; their directories are in the working tree).
    let inner = crate::gitlinks::paths(&dir);
    if !inner.is_empty() && depth >= MAX_SUBMODULE_DEPTH {
        return Err(JailError::Policy(format!(
            "{}: submodules nested more than {MAX_SUBMODULE_DEPTH} deep; the jail keeps each \
             one's .git read-only and stops there",
            dir.display()
        )));
    }
    for sub in inner {
        protect_submodule(&dir, &sub, writable, protected, create_dirs, depth + 1)?;
    }
    Ok(())
}

/// How deep submodules inside submodules are followed (more refuses the jail).
const MAX_SUBMODULE_DEPTH: usize = 8;

/// The first bytes of a `.git` file (never through a link, never blocking on a FIFO).
fn read_gitdir_file(p: &Path) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut v = Vec::new();
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
    {
        let _ = f.take(4096).read_to_end(&mut v);
    }
    String::from_utf8(v).unwrap_or_default()
}

fn check_not_symlink(p: &Path) -> Result<(), JailError> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => Err(JailError::Policy(format!(
            "{} is a symbolic link; the jail keeps it read-only and will not follow a link \
             there (remove it, or look at what planted it)",
            p.display()
        ))),
        _ => Ok(()),
    }
}

impl JailPolicy {
    /// Checks a policy received from elsewhere (the daemon checks the one a jail sends): the
    /// version, absolute normalised paths without NUL, bounded counts.
    ///
    /// # Errors
    /// [`JailError::Policy`] saying what is wrong.
    pub fn validate(&self) -> Result<(), JailError> {
        if self.version != POLICY_VERSION {
            return Err(JailError::Policy(format!(
                "policy version {} (this build speaks {POLICY_VERSION})",
                self.version
            )));
        }
        let lists: [(&str, &Vec<PathBuf>); 8] = [
            ("writable", &self.writable),
            ("private_tmp", &self.private_tmp),
            ("hidden", &self.hidden),
            ("reveal", &self.reveal),
            ("protected", &self.protected),
            ("create_dirs", &self.create_dirs),
            ("create_files", &self.create_files),
            ("create_commondir", &self.create_commondir),
        ];
        for (name, list) in lists {
            if list.len() > MAX_PATHS {
                return Err(JailError::Policy(format!(
                    "{name}: more than {MAX_PATHS} paths"
                )));
            }
            for p in list.iter().chain(std::iter::once(&self.cwd)) {
                let ok = p.is_absolute()
                    && absolute(Path::new("/"), p) == *p
                    && !p.as_os_str().as_encoded_bytes().contains(&0);
                if !ok {
                    return Err(JailError::Policy(format!(
                        "{name}: not an absolute, normalised path"
                    )));
                }
            }
        }
        if self.writable.first() != Some(&self.cwd) {
            return Err(JailError::Policy(
                "the working directory must be the first writable root".into(),
            ));
        }
        if let Network::Proxy { allow_hosts } = &self.network {
            if allow_hosts.len() > MAX_ALLOW_HOSTS {
                return Err(JailError::Policy(format!(
                    "more than {MAX_ALLOW_HOSTS} --allow-host hosts"
                )));
            }
            let ok = |h: &String| {
                !h.is_empty()
                    && h.len() <= 270
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:*[]".contains(&b))
            };
            if !allow_hosts.iter().all(ok) {
                return Err(JailError::Policy(
                    "--allow-host: a host name, *.name, or IP, with an optional :port".into(),
                ));
            }
        }
        if self.env.removed.len() + self.env.passed.len() > 4 * MAX_PATHS {
            return Err(JailError::Policy("too many environment names".into()));
        }
        Ok(())
    }

    /// Whether a protection is to be applied (required, or not skipped).
    pub fn applies(&self, p: Protection) -> bool {
        self.protections.contains(&p) && !self.skipped.contains(&p)
    }

    /// The policy as indented JSON, for `--print-policy` and `agentkeys whoami` inside.
    pub fn print(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("(unprintable: {e})"))
    }

    /// From JSON (the daemon's copy), validated.
    ///
    /// # Errors
    /// [`JailError::Policy`] when it does not parse or validate.
    pub fn from_json(v: &serde_json::Value) -> Result<JailPolicy, JailError> {
        let p: JailPolicy = serde_json::from_value(v.clone())
            .map_err(|e| JailError::Policy(format!("not a jail policy: {e}")))?;
        p.validate()?;
        Ok(p)
    }

    /// The environment for the jailed command: the owner's, minus the removed names, plus
    /// what the jail itself sets (the token file, the socket, the jail marker).
    pub fn environment(&self, jail_id: &str, socket: &Path) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !self.env.removed.contains(k))
            .filter(|(k, _)| env_removal_reason(k).is_none() || self.env.passed.contains(k))
            .filter(|(k, v)| !env_value_is_credential(v) || self.env.passed.contains(k))
            .collect();
        env.push(("AGENTKEYS_TOKEN_FILE".into(), SESSION_FILE.into()));
        env.push(("AGENTKEYS_JAIL".into(), jail_id.into()));
        env.push((
            "AGENTKEYS_SOCKET".into(),
            socket.to_string_lossy().into_owned(),
        ));
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(root: &Path) -> Context {
        let home = root.join("home");
        let project = root.join("project");
        std::fs::create_dir_all(home.join(".agentkeys")).unwrap();
        std::fs::create_dir_all(project.join(".git")).unwrap();
        Context {
            home: home.clone(),
            agentkeys_home: home.join(".agentkeys"),
            socket: home.join(".agentkeys/agentkeysd.sock"),
            cwd: project,
            runtime_dir: None,
            histfile: None,
            uid: 1000,
            gid: 1000,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ak-jail-policy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn hidden_set_covers_state_credentials_history_and_sockets() {
        let d = tmp("hidden");
        let c = ctx(&d);
        let p = PolicyBuilder::new(c.clone(), JailOptions::default())
            .build()
            .unwrap();
        for rel in [".agentkeys", ".ssh", ".aws", ".bash_history", ".config/gh"] {
            assert!(p.hidden.contains(&c.home.join(rel)), "{rel} not hidden");
        }
        assert!(p.hidden.contains(&PathBuf::from("/run/user")));
        assert!(p.hidden.contains(&PathBuf::from("/run/docker.sock")));
        // agentkeys' socket is bound back.
        assert!(p.reveal.contains(&c.socket));
        // By default .git is read-only whole (fail closed), no placeholder inside, no HEAD
        // guard (git finds a valid, read-only .git).
        assert_eq!(p.git, GitAccess::ReadOnly);
        assert!(p.protected.contains(&c.cwd.join(".git")));
        assert!(p.create_commondir.is_empty());
        assert!(!p.protected.contains(&c.cwd.join("HEAD")));
        assert!(
            !p.create_dirs
                .iter()
                .any(|d| d.starts_with(c.cwd.join(".git")))
        );
        // --git-commit: in .git, what makes git run a program or read configuration is
        // read-only, missing parts are placeholders (commondir holding `.`), .git itself is
        // not (commits work).
        let cm = PolicyBuilder::new(
            c.clone(),
            JailOptions {
                git_commit: true,
                ..Default::default()
            },
        )
        .build()
        .unwrap();
        assert_eq!(cm.git, GitAccess::Commit);
        assert!(!cm.protected.contains(&c.cwd.join(".git")));
        for rel in [
            "config",
            "config.worktree",
            "hooks",
            "info",
            "modules",
            "worktrees",
        ] {
            assert!(
                cm.protected.contains(&c.cwd.join(".git").join(rel)),
                "{rel}"
            );
        }
        assert!(cm.create_dirs.contains(&c.cwd.join(".git/hooks")));
        assert!(cm.create_files.contains(&c.cwd.join(".git/config")));
        assert_eq!(cm.create_commondir, vec![c.cwd.join(".git/commondir")]);
        assert!(cm.protected.contains(&c.cwd.join(".git/commondir")));
        // No bare repository in the project itself while `.git` is writable.
        assert!(cm.create_dirs.contains(&c.cwd.join("HEAD")));
        assert!(cm.protected.contains(&c.cwd.join("HEAD")));
        // A worktree's `.git` file: read-only whole.
        std::fs::remove_dir_all(c.cwd.join(".git")).unwrap();
        std::fs::write(c.cwd.join(".git"), "gitdir: /elsewhere/.git/worktrees/p\n").unwrap();
        for git_commit in [false, true] {
            let wt = PolicyBuilder::new(
                c.clone(),
                JailOptions {
                    git_commit,
                    ..Default::default()
                },
            )
            .build()
            .unwrap();
            assert!(wt.protected.contains(&c.cwd.join(".git")));
            assert!(wt.create_commondir.is_empty());
        }
        std::fs::remove_file(c.cwd.join(".git")).unwrap();
        std::fs::create_dir_all(c.cwd.join(".git")).unwrap();
        assert!(p.create_dirs.contains(&c.cwd.join(".vscode")));
        assert!(p.create_files.contains(&c.cwd.join(".envrc")));
        assert!(p.protected.contains(&c.cwd.join(".envrc")));
        assert_eq!(p.writable, vec![c.cwd.clone()]);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn existing_submodules_git_is_protected_in_both_modes() {
        // Populated (`lib`: an embedded `.git`; `ext`: a `.git` file naming `extgit`) and
        // unpopulated (`empty`, `gone`) gitlinks, in both git modes.
        let d = tmp("submodules");
        let c = ctx(&d);
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(&c.cwd)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", &c.home)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "git {args:?}");
        };
        if std::process::Command::new("git")
            .arg("--version")
            .output()
            .is_err()
        {
            println!("SKIP existing_submodules_git_is_protected_in_both_modes: no git");
            return;
        }
        std::fs::remove_dir_all(c.cwd.join(".git")).unwrap();
        let extgit = c.cwd.join("extgit");
        git(&["init", "-q", "."]);
        git(&["init", "-q", "lib"]);
        git(&["-C", "lib", "commit", "-q", "--allow-empty", "-m", "l"]);
        git(&[
            "init",
            "-q",
            "--separate-git-dir",
            extgit.to_str().unwrap(),
            "ext",
        ]);
        git(&["-C", "ext", "commit", "-q", "--allow-empty", "-m", "e"]);
        git(&["add", "lib", "ext"]);
        // Two unpopulated gitlinks: `empty` (an empty directory) and `gone` (none).
        let sha = std::process::Command::new("git")
            .arg("-C")
            .arg(c.cwd.join("lib"))
            .args(["rev-parse", "HEAD"])
            .output()
            .unwrap();
        let sha = String::from_utf8(sha.stdout).unwrap();
        for name in ["empty", "gone"] {
            let info = format!("160000,{},{name}", sha.trim());
            git(&["update-index", "--add", "--cacheinfo", &info]);
        }
        std::fs::create_dir(c.cwd.join("empty")).unwrap();
        // One inside `lib`, not populated.
        let info = format!("160000,{},inner", sha.trim());
        git(&["-C", "lib", "update-index", "--add", "--cacheinfo", &info]);
        for git_commit in [false, true] {
            let p = PolicyBuilder::new(
                c.clone(),
                JailOptions {
                    git_commit,
                    ..Default::default()
                },
            )
            .build()
            .unwrap();
            for rel in [
                "lib/.git",
                "ext/.git",
                "extgit",
                "empty",
                "gone",
                "lib/inner",
            ] {
                assert!(
                    p.protected.contains(&c.cwd.join(rel)),
                    "{rel} ({git_commit})"
                );
            }
            assert!(p.create_dirs.contains(&c.cwd.join("gone")));
            assert!(p.create_dirs.contains(&c.cwd.join("lib/inner")));
            assert!(!p.create_dirs.contains(&c.cwd.join("empty")));
        }
        // A link at a protected place in a submodule's git directory refuses the jail.
        std::fs::create_dir_all(c.cwd.join("hk")).unwrap();
        std::fs::remove_dir_all(c.cwd.join("lib/.git/hooks")).unwrap();
        std::os::unix::fs::symlink("../../hk", c.cwd.join("lib/.git/hooks")).unwrap();
        let e = PolicyBuilder::new(c.clone(), JailOptions::default())
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("hooks is a symbolic link"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn submodules_of_an_enclosing_repository_are_protected() {
        // The jail in `mono/app` (no `.git` of its own): `mono`'s gitlinks under it count.
        let d = tmp("enclosing");
        let mut c = ctx(&d);
        if std::process::Command::new("git")
            .arg("--version")
            .output()
            .is_err()
        {
            println!("SKIP submodules_of_an_enclosing_repository_are_protected: no git");
            return;
        }
        let mono = d.join("mono");
        std::fs::create_dir_all(mono.join("app/lib")).unwrap();
        std::fs::create_dir_all(mono.join("other/x")).unwrap();
        let git = |dir: &Path, args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", &c.home)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "git {args:?}");
        };
        git(&mono, &["init", "-q", "."]);
        git(&mono.join("app/lib"), &["init", "-q", "."]);
        git(
            &mono.join("app/lib"),
            &["commit", "-q", "--allow-empty", "-m", "l"],
        );
        git(&mono.join("other/x"), &["init", "-q", "."]);
        git(
            &mono.join("other/x"),
            &["commit", "-q", "--allow-empty", "-m", "x"],
        );
        git(&mono, &["add", "app/lib", "other/x"]);
        c.cwd = mono.join("app");
        let p = PolicyBuilder::new(c.clone(), JailOptions::default())
            .build()
            .unwrap();
        assert!(p.protected.contains(&mono.join("app/lib/.git")));
        // Outside the writable root: read-only anyway, not listed.
        assert!(!p.protected.contains(&mono.join("other/x/.git")));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn writable_set_refuses_home_root_and_hidden_places() {
        let d = tmp("writable");
        let c = ctx(&d);
        for (w, want) in [
            (c.home.clone(), "home directory"),
            (PathBuf::from("/"), "home directory"),
            (c.home.join(".agentkeys"), "inside a hidden path"),
            (d.join("missing"), "no such file"),
        ] {
            let e = PolicyBuilder::new(
                c.clone(),
                JailOptions {
                    write: vec![w.clone()],
                    ..Default::default()
                },
            )
            .build()
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{w:?}: {e}");
        }
        // `..` is resolved before the checks: project/../home is the home directory.
        let e = PolicyBuilder::new(
            c.clone(),
            JailOptions {
                write: vec![PathBuf::from("../home")],
                ..Default::default()
            },
        )
        .build()
        .unwrap_err()
        .to_string();
        assert!(e.contains("home directory"), "{e}");
        // A symlink to the agentkeys home is resolved and refused.
        std::os::unix::fs::symlink(c.home.join(".agentkeys"), c.cwd.join("out")).unwrap();
        let e = PolicyBuilder::new(
            c.clone(),
            JailOptions {
                write: vec![PathBuf::from("out")],
                ..Default::default()
            },
        )
        .build()
        .unwrap_err()
        .to_string();
        assert!(e.contains("inside a hidden path"), "{e}");
        // The working directory in the home directory itself is refused.
        let mut at_home = c.clone();
        at_home.cwd = c.home.clone();
        let e = PolicyBuilder::new(at_home, JailOptions::default())
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("working directory"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn symlinked_protected_path_is_refused() {
        let d = tmp("symlink");
        let c = ctx(&d);
        // `.git/hooks -> ../.githooks` (a writable directory), in both git modes.
        std::fs::create_dir_all(c.cwd.join(".githooks")).unwrap();
        std::os::unix::fs::symlink("../.githooks", c.cwd.join(".git/hooks")).unwrap();
        for git_commit in [false, true] {
            let e = PolicyBuilder::new(
                c.clone(),
                JailOptions {
                    git_commit,
                    ..Default::default()
                },
            )
            .build()
            .unwrap_err()
            .to_string();
            assert!(e.contains("hooks is a symbolic link"), "{e}");
        }
        std::fs::remove_file(c.cwd.join(".git/hooks")).unwrap();
        std::os::unix::fs::symlink("/tmp/x", c.cwd.join(".envrc")).unwrap();
        let e = PolicyBuilder::new(c, JailOptions::default())
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn show_and_hide_adjust_the_set_but_never_reveal_state() {
        let d = tmp("show");
        let c = ctx(&d);
        std::fs::create_dir_all(c.home.join(".aws")).unwrap();
        std::fs::write(c.home.join("notes"), b"x").unwrap();
        let p = PolicyBuilder::new(
            c.clone(),
            JailOptions {
                show: vec![c.home.join(".aws")],
                hide: vec![c.home.join("notes")],
                ..Default::default()
            },
        )
        .build()
        .unwrap();
        assert!(!p.hidden.contains(&c.home.join(".aws")));
        assert!(p.hidden.contains(&c.home.join("notes")));
        let e = PolicyBuilder::new(
            c.clone(),
            JailOptions {
                show: vec![c.home.join(".agentkeys/dek.key")],
                ..Default::default()
            },
        )
        .build()
        .unwrap_err()
        .to_string();
        assert!(e.contains("agentkeys' state"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn env_filter_removes_credentials_sockets_and_agentkeys() {
        for (name, want) in [
            ("GITHUB_TOKEN", Some("credential")),
            ("OPENAI_API_KEY", Some("credential")),
            ("AWS_SECRET_ACCESS_KEY", Some("credential")),
            ("PGPASSWORD", Some("credential")),
            ("SSH_AUTH_SOCK", Some("socket")),
            ("DISPLAY", Some("socket")),
            ("DBUS_SESSION_BUS_ADDRESS", Some("socket")),
            ("AGENTKEYS_TOKEN", Some("agentkeys")),
            ("AGENTKEYS_HOME", Some("agentkeys")),
            ("PATH", None),
            ("HOME", None),
            ("TERM", None),
            ("LANG", None),
            ("XDG_SESSION_TYPE", None),
            // Paths to CA bundles are not credentials (an early pattern with CERT removed
            // them and broke TLS inside the jail).
            ("SSL_CERT_FILE", None),
            ("NODE_EXTRA_CA_CERTS", None),
            // Words, not fragments: *_PATH names are not personal access tokens.
            ("GITLAB_PAT", Some("credential")),
            ("MYSQL_PWD", Some("credential")),
            ("SENTRY_DSN", Some("credential")),
            ("LD_LIBRARY_PATH", None),
            ("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", None),
            ("PWD", None),
            ("OLDPWD", None),
        ] {
            assert_eq!(env_removal_reason(name), want, "{name}");
        }
        for (value, cred) in [
            ("postgres://app:pw@db.internal/x", true),
            ("https://__token__:pypi-abc@pypi.example/simple", true),
            ("https://ghp_0123456789abcdef0123@github.com/o/r", true),
            ("redis://:secret@cache:6379", true),
            ("ssh://git@github.com/o/r", false),
            ("https://example.com/a@b", false),
            ("/usr/bin:/bin", false),
            ("mailto:someone@example.com", false),
        ] {
            assert_eq!(env_value_is_credential(value), cred, "{value}");
        }
    }

    #[test]
    fn path_dirs_and_home_tool_dirs_in_writable_roots_are_protected() {
        let d = tmp("pathdirs");
        let c = ctx(&d);
        std::fs::create_dir_all(c.home.join(".cargo/bin")).unwrap();
        std::fs::create_dir_all(c.home.join(".config")).unwrap();
        let p = PolicyBuilder::new(
            c.clone(),
            JailOptions {
                write: vec![c.home.join(".cargo"), c.home.join(".config")],
                ..Default::default()
            },
        )
        .build()
        .unwrap();
        // ~/.cargo/bin is protected whether or not it is on PATH; ~/.config/git is a
        // placeholder; only the working directory gets .envrc/.vscode placeholders.
        assert!(p.protected.contains(&c.home.join(".cargo/bin")));
        assert!(p.create_dirs.contains(&c.home.join(".config/git")));
        assert!(p.protected.contains(&c.home.join(".config/git")));
        assert!(!p.create_files.contains(&c.home.join(".config/.envrc")));
        // --write inside .git is refused.
        let e = PolicyBuilder::new(
            c.clone(),
            JailOptions {
                write: vec![c.cwd.join(".git")],
                ..Default::default()
            },
        )
        .build()
        .unwrap_err()
        .to_string();
        assert!(e.contains("stays read-only"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn net_proxy_round_trips_and_bad_hosts_are_refused() {
        let d = tmp("netproxy");
        let c = ctx(&d);
        let p = PolicyBuilder::new(
            c.clone(),
            JailOptions {
                network: Some(Network::Proxy {
                    allow_hosts: vec!["api.openai.com".into(), "*.pypi.org:8443".into()],
                }),
                ..Default::default()
            },
        )
        .build()
        .unwrap();
        assert!(p.network.is_proxy());
        // The proxy's CA bundle (public) is bound back; nothing else of agentkeys' home.
        assert!(p.reveal.contains(&c.agentkeys_home.join(PROXY_CA_BUNDLE)));
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(JailPolicy::from_json(&v).unwrap(), p);
        assert!(p.print().contains("api.openai.com"));
        let mut bad = p.clone();
        bad.network = Network::Proxy {
            allow_hosts: vec!["evil.com/x".into()],
        };
        assert!(bad.validate().is_err());
        let mut bad = p;
        bad.network = Network::Proxy {
            allow_hosts: vec!["a.com".into(); MAX_ALLOW_HOSTS + 1],
        };
        assert!(bad.validate().is_err());
        // Without --net the host's network.
        let p = PolicyBuilder::new(c, JailOptions::default())
            .build()
            .unwrap();
        assert_eq!(p.network, Network::Host);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn policy_round_trips_and_validation_refuses_relative_paths() {
        let d = tmp("json");
        let p = PolicyBuilder::new(ctx(&d), JailOptions::default())
            .build()
            .unwrap();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(JailPolicy::from_json(&v).unwrap(), p);
        let mut bad = p.clone();
        bad.hidden.push(PathBuf::from("relative"));
        assert!(bad.validate().is_err());
        let mut bad = p.clone();
        bad.hidden.push(PathBuf::from("/a/../b"));
        assert!(bad.validate().is_err());
        let mut bad = p;
        bad.version = 99;
        assert!(bad.validate().is_err());
        std::fs::remove_dir_all(d).unwrap();
    }
}
