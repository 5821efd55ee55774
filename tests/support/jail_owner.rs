//! The owner installation the jail suites share (`tests/jail.rs`, `tests/jail_redteam.rs`,
//! `tests/jail_proxy.rs` through [`Owner::bare`]):
//! a HOME with `$AGENTKEYS_HOME` at its default place, a project, a daemon; as the current
//! user or as a non-root uid through `setpriv`. Included by each suite with
//! `#[path = "support/jail_owner.rs"] mod jail_owner;` (it needs the suite's
//! `CARGO_TARGET_TMPDIR`).
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agentkeys_e2e::{bin, bin_dir, is_root, text};

pub static SEQ: AtomicU32 = AtomicU32::new(0);

/// The uid of the non-root owner the suite also runs as.
pub const OTHER_UID: u32 = 4242;
pub const SECRET: &str = "ghp_JailCanary0a1b2c3d4e5f6a7b8c9d";
pub const OTHER_SECRET: &str = "sk_OutOfScope9f8e7d6c5b4a39281706";
pub const ENV_CANARY: &str = "OUTSIDE_ENV_CANARY_5d1e9c";

/// Whether this kernel can run a jail for this test (unprivileged user namespaces and
/// Landlock ABI >= 6); the reason when not.
pub fn jail_unsupported() -> Option<String> {
    // The jail gives the agent private /tmp, /var/tmp and /dev/shm: a checkout (and so the
    // binaries and these tests' directories) under one of them is not visible inside.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Some(t) = ["/tmp", "/var/tmp", "/dev/shm"]
        .iter()
        .find(|t| target.starts_with(t))
    {
        return Some(format!(
            "the build directory {} lies under {t}, which a jail replaces with a private one \
             (the binaries would not be found inside); run the suite from a checkout elsewhere",
            target.display()
        ));
    }
    let ok = Command::new("unshare")
        .args(["-U", "-m", "-p", "-f", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Some("unprivileged user, mount and PID namespaces are unavailable".into());
    }
    let abi = std::fs::read_to_string("/sys/kernel/security/landlock/abi_version").ok();
    let _ = abi;
    None
}

#[allow(unused_macros)]
macro_rules! skip_unless_jail {
    ($name:expr) => {
        if let Some(why) = $crate::jail_owner::jail_unsupported() {
            println!("SKIP {}: {why}", $name);
            return;
        }
    };
}

/// One owner's installation: HOME, `$AGENTKEYS_HOME` at its default place, a project, a
/// daemon; run as the current user or as [`OTHER_UID`].
pub struct Owner {
    pub base: PathBuf,
    pub uid: Option<u32>,
    pub daemon: Option<Child>,
}

/// The owners to run a scenario as: root and a non-root uid when the tests run as root;
/// the current user alone otherwise.
pub fn owners(tag: &str) -> Vec<Owner> {
    let mut v = vec![Owner::new(tag, None)];
    if is_root() {
        v.push(Owner::new(tag, Some(OTHER_UID)));
    } else {
        println!("SKIP {tag} as another uid: not root");
    }
    v
}

impl Owner {
    /// A fresh base directory `PREFIX-PID-SEQ` under the target directory with `dirs` and
    /// `files` in it, owned by `uid` and reachable by it; nothing initialised, no daemon.
    pub fn bare(prefix: &str, uid: Option<u32>, dirs: &[&str], files: &[(&str, &[u8])]) -> Owner {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&base);
        for d in dirs {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        for (f, bytes) in files {
            std::fs::write(base.join(f), bytes).unwrap();
        }
        if let Some(u) = uid {
            let st = Command::new("chown")
                .args(["-R", &format!("{u}:{u}")])
                .arg(&base)
                .status()
                .unwrap();
            assert!(st.success());
        }
        // Traversable by the other uid.
        let mut p = base.parent().map(Path::to_path_buf);
        while let Some(d) = p {
            if d == Path::new("/") {
                break;
            }
            let mode = std::fs::metadata(&d).unwrap().permissions().mode();
            if mode & 0o005 != 0o005 && is_root() {
                let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode | 0o005));
            }
            p = d.parent().map(Path::to_path_buf);
        }
        Owner {
            base,
            uid,
            daemon: None,
        }
    }

    pub fn new(tag: &str, uid: Option<u32>) -> Owner {
        let mut o = Owner::bare(
            &format!("jail-{tag}"),
            uid,
            &["home", "proj/.git"],
            &[("home/.bashrc", b"export PS1='$ '\n")],
        );
        let out = o.run(&["init"]);
        assert!(out.status.success(), "init: {}", text(&out));
        assert!(o.store("gh", SECRET, &[]).status.success());
        assert!(o.store("other", OTHER_SECRET, &[]).status.success());
        assert!(
            o.store("deploy", SECRET, &["--high-value"])
                .status
                .success()
        );
        let out = o.run(&["agent", "add", "a", "--scope", "gh,deploy"]);
        assert!(out.status.success(), "agent add: {}", text(&out));
        o.start_daemon();
        o
    }

    pub fn who(&self) -> String {
        match self.uid {
            None => "root-or-current".into(),
            Some(u) => format!("uid {u}"),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.base.join("home")
    }

    pub fn akhome(&self) -> PathBuf {
        self.home().join(".agentkeys")
    }

    pub fn proj(&self) -> PathBuf {
        self.base.join("proj")
    }

    /// A command as this owner (through setpriv for another uid), in the project, with a
    /// clean environment.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = match self.uid {
            None => Command::new(program),
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid",
                    &u.to_string(),
                    "--regid",
                    &u.to_string(),
                    "--clear-groups",
                    "--",
                    program,
                ]);
                c
            }
        };
        c.args(args)
            .env_clear()
            .env("HOME", self.home())
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin:/usr/sbin:/sbin", bin_dir().display()),
            )
            .env("AGENTKEYS_HOME", self.akhome())
            .env("AGENTKEYS_SOCKET", self.base.join("run/agentkeysd.sock"))
            .env("LANG", "C.UTF-8")
            // The test's directories lie in the target directory, inside the repository of a
            // checkout (CI's is one): git must not find that repository from a project
            // without `.git` (the owner's `git log` would page agentkeys' history and wait).
            .env("GIT_CEILING_DIRECTORIES", &self.base)
            .current_dir(self.proj());
        c
    }

    pub fn cli(&self, args: &[&str]) -> Command {
        let b = bin("agentkeys");
        self.command(b.to_str().unwrap(), args)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cli(args).stdin(Stdio::null()).output().unwrap()
    }

    pub fn store(&self, service: &str, value: &str, extra: &[&str]) -> Output {
        let mut args = vec!["store", service];
        args.extend_from_slice(extra);
        agentkeys_e2e::run_with_stdin(self.cli(&args), value.as_bytes())
    }

    pub fn start_daemon(&mut self) {
        let b = bin("agentkeysd");
        let log = std::fs::File::create(self.base.join("daemon.log")).unwrap();
        let child = self
            .command(b.to_str().unwrap(), &["--foreground"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.run(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `agentkeys jail --agent a [extra] -- sh -c SCRIPT`.
    pub fn jail(&self, extra: &[&str], script: &str) -> Output {
        self.jail_cmd(extra, script)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn jail_cmd(&self, extra: &[&str], script: &str) -> Command {
        let mut args = vec!["jail", "--agent", "a"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", script]);
        self.cli(&args)
    }

    pub fn audit(&self) -> String {
        std::fs::read_to_string(self.akhome().join("audit.jsonl")).unwrap_or_default()
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = d.wait();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

pub fn show(o: &Owner, out: &Output) -> String {
    format!("[{}] exit {:?}\n{}", o.who(), out.status.code(), text(out))
}

pub fn all(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Pids of processes whose command line is exactly `argv`.
pub fn pids_running(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}
