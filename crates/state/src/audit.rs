//! The audit trail: `$AGENTKEYS_HOME/audit.jsonl`, who got what and when.
//!
//! One JSON object per line, written only by the daemon through [`AuditLog`], read by the CLI
//! through [`AuditReader`], [`read_records`] and [`verify`]. A line holds names and numbers, never
//! a secret, token or token hash: [`Event`] has no field that could carry one.
//!
//! ```text
//! {"ts":1795482123456789,"seq":12,"event":"deliver","role":"agent","agent":"ci-bot","session":"s-3f9c0a51e2b7","service":"github","delivery":"fd","peer":{"uid":1000,"pid":4242},"outcome":"ok","prev":"5e1f…"}
//! ```
//!
//! Fields, in this order: `ts` (µs since the epoch), `seq` (1, 2, 3, …), `event`, `role`
//! (`owner` or `agent`: who acted, a kind, never told apart by a name), `agent` (the agent's
//! name, only for `role` `agent`), `session` (the id of the exact session: see
//! `TokenHash::session_id`), `service`, `delivery`, `degraded` (only when true), `peer`,
//! `outcome`, `detail` (optional fields are left out when unset), and `prev`: the hex SHA-256 of
//! the previous line's exact bytes without its newline, 64 zeros for the first record.
//!
//! # What the chain shows, and what it cannot
//!
//! [`verify`] finds a removed line (a `seq` gap, or a first record that is not `seq` 1), an
//! edited line (it no longer parses, or the next line's `prev` no longer matches it), and
//! reordered lines. It cannot see the removal of the *last* records or an edit of the last line
//! that keeps it a valid record: no later line vouches for them. [`VerifyReport::last`] gives the
//! head (seq and hash) to keep elsewhere for that. Nor is the chain a signature: someone who can
//! write the file as the owner can rewrite it and recompute every hash. It catches accidents,
//! careless edits and deletions, not a forger with the owner's uid.
//!
//! # Writing (fail closed)
//!
//! [`AuditLog::append`] returns `Ok` only once the whole line is in the file and `fdatasync`
//! returned; the daemon refuses a delivery whose record did not get that far. Before each write it
//! checks that the path still names the file it holds open and that the file has the size it left
//! it at: a removed, replaced, truncated or foreign-written log stops deliveries instead of
//! silently recording into a file nobody will read.
//!
//! **Group commit.** [`AuditLog::append_unsynced`] does all of that except the sync and returns
//! the offset just past the record; an [`AuditSync`] (a second descriptor of the same file, for
//! another thread) makes every record written before its `fdatasync` began durable. The daemon
//! (`agentkeys_broker::auditor`) uses the pair so that concurrent requests share syncs, and
//! answers a request only after a sync covering its records; the chain is the same either way.
//!
//! **Partial writes.** A failure before any byte reached the file (the checks above, an
//! oversized record, `write(2)` returning an error with the file size unchanged) leaves the log
//! as it was, and the next append simply tries again. A failure after bytes reached the file (a
//! short write, or `fdatasync` failing after a full one) puts the [`AuditLog`] into a failed state:
//! every later append fails until the log is opened again. [`AuditLog::open`] then repairs the
//! file exactly as after a crash: an unterminated last line gets its newline and a `recover`
//! record whose `prev` is the hash of the cut line, so the chain stays verifiable and [`verify`]
//! names the line that was lost (a line that is a whole record continuing the chain, and only
//! lost its newline, just gets the newline back).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::StateError;
use crate::home::{Home, open_state_file};

/// The audit trail's file name under the home.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// Largest record [`AuditLog::append`] writes, in bytes without the newline.
pub const MAX_RECORD: usize = 16 * 1024;
/// Longest line readers accept; anything longer is not a record of ours.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest log [`AuditLog`] opens or grows: beyond this it has to be archived (moved away).
pub const MAX_LOG: u64 = 1 << 30;
/// Longest `event`, `outcome` or `delivery` name.
const MAX_NAME: usize = 32;
/// `prev` of the first record.
const GENESIS: [u8; 32] = [0; 32];

/// The peer of a request: the process on the unix socket (`SO_PEERCRED`), or, on a network
/// listener, the source address (`addr`, with `uid` the daemon's own and `pid` 0: no process
/// credentials cross a network).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Peer {
    /// Its uid.
    pub uid: u32,
    /// Its pid.
    pub pid: i32,
    /// The source address (IP and port) of a network connection (`[daemon] listen`); absent on
    /// the unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<std::net::SocketAddr>,
}

impl Peer {
    /// A process on the unix socket.
    pub fn local(uid: u32, pid: i32) -> Peer {
        Peer {
            uid,
            pid,
            addr: None,
        }
    }
}

/// Who acted: the owner or an agent, each with the id of the exact session
/// (`TokenHash::session_id`). A kind, not a name: an agent can never pass for the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who<'a> {
    /// The owner's session.
    Owner {
        /// Its session id.
        session: &'a str,
    },
    /// An agent's session.
    Agent {
        /// The agent's name.
        name: &'a str,
        /// Its session id.
        session: &'a str,
    },
}

/// What the daemon records, the input of [`AuditLog::append`]. Names only: never a secret, token
/// or token hash.
///
/// `event`, `outcome` and `delivery` are short names made of `a-z`, `0-9` and `_`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Event<'a> {
    /// What happened: `fetch`, `deliver`, `drop`, `evict`, `deny`, `cache_hit`, `run_start`, ….
    pub event: &'a str,
    /// Who acted (none for the daemon's own events: evictions, expiries).
    pub who: Option<Who<'a>>,
    /// The service.
    pub service: Option<&'a str>,
    /// How it was delivered: `fd`, `inline`, `env` or `file`.
    pub delivery: Option<&'a str>,
    /// The fallback (a plain memfd instead of `memfd_secret`) was used.
    pub degraded: bool,
    /// The requesting process.
    pub peer: Option<Peer>,
    /// `ok`, `denied`, `error`, `not_found`, ….
    pub outcome: &'a str,
    /// A short free-form note (never a secret).
    pub detail: Option<&'a str>,
}

/// One stored record: the [`Event`] plus `ts`, `seq` and `prev`. Field order is the order on
/// disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Microseconds since the epoch.
    pub ts: u64,
    /// 1 for the first record, +1 for each one after it.
    pub seq: u64,
    /// What happened.
    pub event: String,
    /// `owner` or `agent`: the kind of session that acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The agent's name (only when `role` is `agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The id of the session that acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Delivery kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    /// The fallback memfd was used.
    #[serde(default, skip_serializing_if = "is_false")]
    pub degraded: bool,
    /// The requesting process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
    /// How it ended.
    pub outcome: String,
    /// A short note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Hex SHA-256 of the previous line (without its newline); 64 zeros for the first record.
    pub prev: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Record {
    /// Parses one line (without its newline).
    ///
    /// # Errors
    /// Why it is not a record, in words that never quote the line's content.
    pub fn from_line(line: &[u8]) -> Result<Record, String> {
        serde_json::from_slice(line).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => format!(
                    "valid JSON but not a record: a field is missing or has the wrong type (column {})",
                    e.column()
                ),
                Category::Syntax | Category::Eof | Category::Io => {
                    format!("not valid JSON (column {})", e.column())
                }
            }
        })
    }
}

/// Hex of a SHA-256.
fn hex(hash: &[u8; 32]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(64);
    for b in hash {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// An `io::Error` with its errno name when it has one ("ENOSPC: No space left on device").
fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).to_string(),
        None => e.to_string(),
    }
}

/// The open audit trail, as the daemon holds it: open once, then [`AuditLog::append`] for every
/// event. Not for concurrent use by several processes: one daemon per home writes it.
#[derive(Debug)]
pub struct AuditLog {
    /// `O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW`, mode 0600.
    file: File,
    path: PathBuf,
    /// (dev, ino) of `file`, compared with the path before every write.
    dev: u64,
    ino: u64,
    /// The file's size as this log left it.
    len: u64,
    next_seq: u64,
    /// SHA-256 of the last line.
    prev: [u8; 32],
    /// Set when bytes reached the file but the append failed: see the module docs.
    failed: Option<String>,
}

impl AuditLog {
    /// Opens (creating it, mode 0600) `audit.jsonl` in `home`, finds the last record to continue
    /// the chain from, and repairs a last line cut short by a crash (see the module docs).
    ///
    /// Reads only the tail of the file, plus one pass counting lines when there is a cut line to
    /// name.
    ///
    /// # Errors
    /// [`StateError::NotInitialized`] / [`StateError::UnsafePermissions`] for the home or a file
    /// another user could read or replace, or a symlink; [`StateError::Corrupt`] when the last
    /// complete line is not a record; [`StateError::AuditUnavailable`] when the log is over
    /// [`MAX_LOG`] or the repair cannot be written; [`StateError::Io`] when it cannot be opened or
    /// read.
    pub fn open(home: &Home) -> Result<AuditLog, StateError> {
        home.check_dir()?;
        let path = home.path(AUDIT_FILE);
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
            .open(&path)
            .map_err(|e| {
                if e.raw_os_error() == Some(Errno::ELOOP as i32) {
                    StateError::UnsafePermissions {
                        path: path.clone(),
                        detail:
                            "is a symbolic link; the audit log must be a regular file, move it away"
                                .into(),
                    }
                } else {
                    StateError::io("open", &path, e)
                }
            })?;
        // The owner, mode, type and parent checks every state file gets, on a second (read) fd;
        // the same inode as the append fd, so they apply to the file we will write.
        let reader = open_state_file(&path)?;
        let meta = file
            .metadata()
            .map_err(|e| StateError::io("examine", &path, e))?;
        let rmeta = reader
            .metadata()
            .map_err(|e| StateError::io("examine", &path, e))?;
        if (meta.dev(), meta.ino()) != (rmeta.dev(), rmeta.ino()) {
            return Err(StateError::UnsafePermissions {
                path,
                detail: "was replaced while it was being opened; retry".into(),
            });
        }
        let len = meta.len();
        if len > MAX_LOG {
            return Err(StateError::AuditUnavailable {
                path,
                reason: format!(
                    "it is {len} bytes, more than the {MAX_LOG} (1 GiB) cap; archive it (move it \
                     away) and start agentkeysd again to begin a new log"
                ),
            });
        }
        let tail = read_tail(&reader, len, &path)?;
        let mut log = AuditLog {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            len,
            next_seq: 1,
            prev: GENESIS,
            failed: None,
            path,
        };
        if let Some(last) = tail.last {
            let rec = Record::from_line(&last).map_err(|why| {
                StateError::corrupt(
                    &log.path,
                    format!(
                        "its last complete line is {why}; run `agentkeys audit verify` to find the \
                         damage, then move the file away (keep it as evidence) so agentkeysd starts \
                         a new log"
                    ),
                )
            })?;
            log.next_seq = rec
                .seq
                .checked_add(1)
                .filter(|_| rec.seq > 0)
                .ok_or_else(|| {
                    StateError::corrupt(&log.path, "its last record has an impossible seq")
                })?;
            log.prev = sha256(&last);
        }
        if let Some(cut) = tail.cut {
            match Record::from_line(&cut) {
                // Only the newline was lost: the record is whole and continues the chain.
                Ok(rec) if rec.seq == log.next_seq && rec.prev == hex(&log.prev) => {
                    log.write_line(b"\n")?;
                    log.prev = sha256(&cut);
                    log.next_seq += 1;
                }
                _ => {
                    let line = count_newlines(&reader, len, &log.path)? + 1;
                    log.recover(&cut, line)?;
                }
            }
        }
        Ok(log)
    }

    /// Writes `"\n"` and a `recover` record for a cut line (number `line`, bytes `cut`), in one
    /// write: the cut line becomes a complete (unparseable) line the `recover` record vouches for.
    fn recover(&mut self, cut: &[u8], line: u64) -> Result<(), StateError> {
        let detail = format!("record at line {line} was cut short (crash during write)");
        let rec = Record {
            ts: now_micros().map_err(|reason| self.unavailable(reason))?,
            seq: self.next_seq,
            event: "recover".into(),
            role: None,
            agent: None,
            session: None,
            service: None,
            delivery: None,
            degraded: false,
            peer: None,
            outcome: "ok".into(),
            detail: Some(detail),
            prev: hex(&sha256(cut)),
        };
        let body = serde_json::to_vec(&rec)
            .map_err(|e| self.unavailable(format!("cannot encode the record: {e}")))?;
        let mut bytes = Vec::with_capacity(body.len() + 2);
        bytes.push(b'\n');
        bytes.extend_from_slice(&body);
        bytes.push(b'\n');
        self.write_line(&bytes)?;
        self.prev = sha256(&body);
        self.next_seq += 1;
        Ok(())
    }

    /// Appends one record and makes it durable; returns it as written.
    ///
    /// Order: refuse if an earlier append failed part-way; check the path still names our file
    /// (same dev/inode) at the size we left it; encode (at most [`MAX_RECORD`] bytes); one
    /// `write(2)` of the whole line with its newline; `fdatasync`. The sequence number and hash
    /// advance only after all of that succeeded.
    ///
    /// Syscalls: `statx` (or `fstat`/`newfstatat` where statx is unavailable) on the fd and on
    /// the path, `write`, `fdatasync`, `clock_gettime` (vDSO), and the allocator's.
    ///
    /// # Errors
    /// [`StateError::AuditUnavailable`] with the reason; the caller must then refuse whatever it
    /// was about to record. Nothing was written, or (short write, failed sync) the log stays
    /// failed until opened again.
    pub fn append(&mut self, ev: &Event<'_>) -> Result<Record, StateError> {
        self.append_inner(ev, true).map(|(rec, _)| rec)
    }

    /// Appends one record *without* waiting for the disk: the same checks, encoding and single
    /// `write(2)` as [`AuditLog::append`], but no `fdatasync`. Returns the record and the file
    /// offset just past it: the record is durable once a sync that started after this call
    /// returned has completed ([`AuditSync::sync`] reports the offset it covers). This is the
    /// building block of group commit (`agentkeysd`'s auditor): records are written in order
    /// under one lock, and one `fdatasync` makes every record written before it durable.
    ///
    /// # Errors
    /// As [`AuditLog::append`], minus the sync.
    pub fn append_unsynced(&mut self, ev: &Event<'_>) -> Result<(Record, u64), StateError> {
        self.append_inner(ev, false)
    }

    /// A second handle on the log's file, for a thread that makes appended records durable
    /// while other threads append. Take it while the process may still `dup` (before seccomp).
    ///
    /// # Errors
    /// [`StateError::Io`] when the descriptor cannot be duplicated.
    pub fn sync_handle(&self) -> Result<AuditSync, StateError> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| StateError::io("duplicate", &self.path, e))?;
        Ok(AuditSync {
            file,
            path: self.path.clone(),
        })
    }

    /// Marks the log failed (a sync through an [`AuditSync`] failed): every later append fails
    /// until the log is opened again, as after a failed `fdatasync` in [`AuditLog::append`].
    pub fn fail(&mut self, reason: impl Into<String>) {
        if self.failed.is_none() {
            self.failed = Some(reason.into());
        }
    }

    /// The file offset just past the last record written (durable or not).
    pub fn written(&self) -> u64 {
        self.len
    }

    fn append_inner(&mut self, ev: &Event<'_>, sync: bool) -> Result<(Record, u64), StateError> {
        if let Some(why) = &self.failed {
            return Err(self.unavailable(format!(
                "an earlier write failed part-way ({why}); restart agentkeysd so it reopens and \
                 repairs the log"
            )));
        }
        self.check_same_file()?;
        check_name("event", ev.event).map_err(|r| self.unavailable(r))?;
        check_name("outcome", ev.outcome).map_err(|r| self.unavailable(r))?;
        if let Some(d) = ev.delivery {
            check_name("delivery", d).map_err(|r| self.unavailable(r))?;
        }
        let (role, agent, session) = match ev.who {
            None => (None, None, None),
            Some(Who::Owner { session }) => (Some("owner"), None, Some(session)),
            Some(Who::Agent { name, session }) => (Some("agent"), Some(name), Some(session)),
        };
        let record = Record {
            ts: now_micros().map_err(|r| self.unavailable(r))?,
            seq: self.next_seq,
            event: ev.event.to_owned(),
            role: role.map(str::to_owned),
            agent: agent.map(str::to_owned),
            session: session.map(str::to_owned),
            service: ev.service.map(str::to_owned),
            delivery: ev.delivery.map(str::to_owned),
            degraded: ev.degraded,
            peer: ev.peer,
            outcome: ev.outcome.to_owned(),
            detail: ev.detail.map(str::to_owned),
            prev: hex(&self.prev),
        };
        let mut line = serde_json::to_vec(&record)
            .map_err(|e| self.unavailable(format!("cannot encode the record: {e}")))?;
        if line.len() > MAX_RECORD {
            return Err(self.unavailable(format!(
                "the record would be {} bytes, more than the {MAX_RECORD} a record may have",
                line.len()
            )));
        }
        let hash = sha256(&line);
        line.push(b'\n');
        self.write_line_with(&line, sync)?;
        self.prev = hash;
        // Cannot overflow: next_seq was checked at open and grows by one per record.
        self.next_seq = self.next_seq.saturating_add(1);
        Ok((record, self.len))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `seq` the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn unavailable(&self, reason: impl Into<String>) -> StateError {
        StateError::AuditUnavailable {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The path still names the file we hold, and nobody else changed its size. One `statx` of
    /// the path, no `fstat` of the descriptor: when the path names our inode, that inode is
    /// linked (so not removed) and the path's size is the descriptor's; when it names another,
    /// or nothing, the log was replaced or removed either way. (Two calls per record were a
    /// syscall too many on every delivery and every injected request.)
    fn check_same_file(&self) -> Result<(), StateError> {
        let at_path = match fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.unavailable(
                    "the file was removed while agentkeysd had it open; restart agentkeysd to \
                     start a new log",
                ));
            }
            Err(e) => {
                return Err(self.unavailable(format!("cannot examine it: {}", describe(&e))));
            }
        };
        if (at_path.dev(), at_path.ino()) != (self.dev, self.ino) {
            return Err(self.unavailable(
                "the file was replaced (moved away, or another file renamed over it) while \
                 agentkeysd had it open; restart agentkeysd to continue in the file now there",
            ));
        }
        if at_path.len() != self.len {
            return Err(self.unavailable(format!(
                "its size changed behind agentkeysd's back ({} bytes expected, {} found): another \
                 process wrote to it or truncated it; run `agentkeys audit verify` and restart \
                 agentkeysd",
                self.len,
                at_path.len()
            )));
        }
        Ok(())
    }

    /// One `write(2)` of `bytes`, then `fdatasync`; see the module docs for what a failure leaves.
    fn write_line(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        self.write_line_with(bytes, true)
    }

    /// One `write(2)` of `bytes`, then `fdatasync` when `sync`.
    fn write_line_with(&mut self, bytes: &[u8], sync: bool) -> Result<(), StateError> {
        let want = bytes.len() as u64;
        if self.len.saturating_add(want) > MAX_LOG {
            return Err(self.unavailable(format!(
                "the log would grow past the {MAX_LOG} (1 GiB) cap; archive it (move it away) and \
                 restart agentkeysd to begin a new log"
            )));
        }
        let written = loop {
            match (&self.file).write(bytes) {
                Ok(n) => break n,
                // Nothing was written: trying again cannot tear a line.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let reason = format!("write failed: {}", describe(&e));
                    // write(2) reports an error only when it wrote nothing; if the size says
                    // otherwise, the file holds a torn line and must be repaired by a reopen.
                    if self.file.metadata().map(|m| m.len()).ok() != Some(self.len) {
                        self.failed = Some(reason.clone());
                    }
                    return Err(self.unavailable(reason));
                }
            }
        };
        if written as u64 != want {
            let reason =
                format!("short write: {written} of {want} bytes (disk full, or a file size limit)");
            self.failed = Some(reason.clone());
            return Err(self.unavailable(reason));
        }
        self.len += want;
        if !sync {
            return Ok(());
        }
        if let Err(e) = self.file.sync_data() {
            // The line is in the file but may not survive a crash; reporting success would let a
            // delivery happen that the disk may forget. A reopen continues after it.
            let reason = format!(
                "fdatasync failed: {} (the record may not be on disk)",
                describe(&e)
            );
            self.failed = Some(reason.clone());
            return Err(self.unavailable(reason));
        }
        Ok(())
    }
}

/// A handle that makes records written through an [`AuditLog`] durable, usable from another
/// thread than the appender (it holds its own descriptor of the same open file).
#[derive(Debug)]
pub struct AuditSync {
    file: File,
    path: PathBuf,
}

impl AuditSync {
    /// `fdatasync` of the log: every record whose `write(2)` returned before this call began is
    /// on disk when it returns `Ok`.
    ///
    /// # Errors
    /// [`StateError::AuditUnavailable`] when `fdatasync` fails: the records since the last good
    /// sync may not be on disk; the caller must fail the log ([`AuditLog::fail`]).
    pub fn sync(&self) -> Result<(), StateError> {
        self.file
            .sync_data()
            .map_err(|e| StateError::AuditUnavailable {
                path: self.path.clone(),
                reason: format!(
                    "fdatasync failed: {} (the record may not be on disk)",
                    describe(&e)
                ),
            })
    }
}

/// `event`, `outcome` and `delivery` are names: `[a-z0-9_]{1,32}`.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        // The value is not repeated: a bug that passes the wrong string must not print it.
        Err(format!(
            "the {what} name is not 1 to {MAX_NAME} of a-z, 0-9 and _ (a bug in the caller)"
        ))
    }
}

fn now_micros() -> Result<u64, String> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_micros()).ok())
        .ok_or_else(|| "the system clock is before 1970; fix the clock".to_string())
}

/// The end of the log: its last complete line, and an unterminated line after it.
struct Tail {
    last: Option<Vec<u8>>,
    cut: Option<Vec<u8>>,
}

/// Reads at most two maximal lines from the end of the file: enough for the last complete line
/// and a cut one after it, whatever the file's size.
fn read_tail(file: &File, len: u64, path: &Path) -> Result<Tail, StateError> {
    if len == 0 {
        return Ok(Tail {
            last: None,
            cut: None,
        });
    }
    let window = len.min(2 * (MAX_LINE as u64 + 1));
    let start = len - window;
    // window <= 2 * (MAX_LINE + 1), so this fits in usize and is a bounded allocation.
    let mut buf = vec![0u8; window as usize];
    file.read_exact_at(&mut buf, start)
        .map_err(|e| StateError::io("read", path, e))?;
    let too_long = || {
        StateError::corrupt(
            path,
            "its last line is longer than any record; run `agentkeys audit verify`, then move the \
             file away (keep it as evidence) so agentkeysd starts a new log",
        )
    };
    // `end`: index of the newline that ends the last complete line.
    let (end, cut) = if buf.last() == Some(&b'\n') {
        (buf.len() - 1, None)
    } else {
        match buf.iter().rposition(|&b| b == b'\n') {
            Some(i) => (i, Some(buf[i + 1..].to_vec())),
            None if start == 0 && buf.len() <= MAX_LINE => {
                return Ok(Tail {
                    last: None,
                    cut: Some(buf),
                });
            }
            None => return Err(too_long()),
        }
    };
    if cut.as_ref().is_some_and(|c| c.len() > MAX_LINE) {
        return Err(too_long());
    }
    let begin = match buf[..end].iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if start == 0 => 0,
        None => return Err(too_long()),
    };
    if end - begin > MAX_LINE {
        return Err(too_long());
    }
    Ok(Tail {
        last: Some(buf[begin..end].to_vec()),
        cut,
    })
}

/// Newlines in the first `len` bytes of `file` (only needed to name a cut line).
fn count_newlines(file: &File, len: u64, path: &Path) -> Result<u64, StateError> {
    let mut buf = vec![0u8; MAX_LINE];
    let mut off = 0u64;
    let mut count = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], off)
            .map_err(|e| StateError::io("read", path, e))?;
        count += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        off += n as u64;
    }
    Ok(count)
}

/// One line of the log as read.
#[derive(Debug, Clone)]
pub struct RawLine {
    /// 1-based line number.
    pub number: u64,
    /// The line without its newline; empty when `too_long`.
    pub bytes: Vec<u8>,
    /// The line is longer than [`MAX_LINE`] (and was skipped, not kept in memory).
    pub too_long: bool,
}

/// Reads the log line by line with a bounded buffer; for `agentkeys audit` (also `--follow`:
/// at the end it returns `None`, keeps an unterminated line back, and a later call returns what
/// was appended since).
#[derive(Debug)]
pub struct AuditReader {
    path: PathBuf,
    reader: BufReader<File>,
    dev: u64,
    ino: u64,
    /// Complete lines returned so far.
    lines: u64,
    /// The current line so far (not yet terminated).
    partial: Vec<u8>,
    /// The current line has passed MAX_LINE: skip to its newline.
    overlong: bool,
}

impl AuditReader {
    /// Opens the log at `path` with the state-file checks (owner, mode, type, parent).
    ///
    /// # Errors
    /// As [`open_state_file`]; a missing file is an [`StateError::Io`] for which
    /// [`StateError::is_not_found`] is true.
    pub fn open(path: &Path) -> Result<AuditReader, StateError> {
        let file = open_state_file(path)?;
        let meta = file
            .metadata()
            .map_err(|e| StateError::io("examine", path, e))?;
        Ok(AuditReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(MAX_LINE, file),
            dev: meta.dev(),
            ino: meta.ino(),
            lines: 0,
            partial: Vec::new(),
            overlong: false,
        })
    }

    /// The next complete line, or `None` when no complete line is left (yet).
    ///
    /// # Errors
    /// [`StateError::Io`] when reading fails.
    pub fn next_line(&mut self) -> Result<Option<RawLine>, StateError> {
        loop {
            let avail = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StateError::io("read", &self.path, e)),
            };
            if avail.is_empty() {
                return Ok(None);
            }
            let (chunk, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (&avail[..i], true),
                None => (avail, false),
            };
            if !self.overlong {
                if self.partial.len() + chunk.len() > MAX_LINE {
                    self.overlong = true;
                    self.partial = Vec::new();
                } else {
                    self.partial.extend_from_slice(chunk);
                }
            }
            let used = chunk.len() + usize::from(done);
            self.reader.consume(used);
            if done {
                self.lines += 1;
                let too_long = std::mem::take(&mut self.overlong);
                return Ok(Some(RawLine {
                    number: self.lines,
                    bytes: std::mem::take(&mut self.partial),
                    too_long,
                }));
            }
        }
    }

    /// The number of an unterminated line read so far at the end (a record being written, or one
    /// cut short by a crash), if there is one.
    pub fn pending(&self) -> Option<u64> {
        (self.overlong || !self.partial.is_empty()).then_some(self.lines + 1)
    }

    /// Whether the path now names another file, or none (the log was archived or removed).
    pub fn replaced(&self) -> bool {
        fs::symlink_metadata(&self.path)
            .map_or(true, |m| (m.dev(), m.ino()) != (self.dev, self.ino))
    }

    /// The path read.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every record with its line number, for `agentkeys audit`. A line that is not a record yields
/// an error and reading goes on; an unterminated last line yields an error at the end.
///
/// # Errors
/// As [`AuditReader::open`]; then per item [`StateError::Corrupt`] (naming the line, never
/// quoting it) or [`StateError::Io`] (after which the iterator ends).
pub fn read_records(
    path: &Path,
) -> Result<impl Iterator<Item = Result<(u64, Record), StateError>>, StateError> {
    let mut reader = AuditReader::open(path)?;
    let mut done = false;
    Ok(std::iter::from_fn(move || {
        if done {
            return None;
        }
        match reader.next_line() {
            Ok(Some(line)) if line.too_long => Some(Err(StateError::corrupt(
                &reader.path,
                format!("line {} is longer than any record", line.number),
            ))),
            Ok(Some(line)) => Some(
                Record::from_line(&line.bytes)
                    .map(|r| (line.number, r))
                    .map_err(|why| {
                        StateError::corrupt(&reader.path, format!("line {} is {why}", line.number))
                    }),
            ),
            Ok(None) => {
                done = true;
                reader.pending().map(|n| {
                    Err(StateError::corrupt(
                        &reader.path,
                        format!("line {n} has no newline: being written, or cut short by a crash"),
                    ))
                })
            }
            Err(e) => {
                done = true;
                Some(Err(e))
            }
        }
    }))
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Records checked (up to the first bad one).
    pub records: u64,
    /// Things worth knowing that do not break the chain (a repaired crash, a line being written).
    pub notes: Vec<String>,
    /// The first record that breaks the chain, if any.
    pub first_bad: Option<BadRecord>,
    /// There is no log file (yet).
    pub missing: bool,
    /// The last good record's seq and the hex SHA-256 of its line: the head of the chain, to keep
    /// elsewhere, since the chain alone cannot show that records after it were removed.
    pub last: Option<(u64, String)>,
}

/// Where and why the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// 1-based line number.
    pub line: u64,
    /// The record's seq, when the line parses.
    pub seq: Option<u64>,
    /// What is wrong and what it means.
    pub reason: String,
}

/// Checks the whole chain, streaming, and reports the first bad record.
///
/// A missing file or an empty one is 0 records and intact (`missing` says which). A line cut
/// short by a crash and followed by the `recover` record [`AuditLog::open`] writes is a note,
/// not a break; so is an unterminated last line (a record being written, or a crash the daemon
/// has not repaired yet).
///
/// # Errors
/// [`StateError::UnsafePermissions`] for a file another user could write, [`StateError::Io`]
/// when it cannot be read. A broken chain is not an error: see [`VerifyReport::first_bad`].
pub fn verify(path: &Path) -> Result<VerifyReport, StateError> {
    let mut reader = match AuditReader::open(path) {
        Ok(r) => r,
        Err(e) if e.is_not_found() => {
            return Ok(VerifyReport {
                missing: true,
                notes: vec![format!("no audit log at {} yet", path.display())],
                ..VerifyReport::default()
            });
        }
        Err(e) => return Err(e),
    };
    let mut chain = Chain::default();
    while let Some(line) = reader.next_line()? {
        if let Err(bad) = chain.feed(&line) {
            return Ok(chain.report(Some(bad)));
        }
    }
    if let Some(cut) = chain.cut.take() {
        return Ok(chain.report(Some(cut.bad())));
    }
    if let Some(n) = reader.pending() {
        chain.notes.push(format!(
            "line {n} has no newline at the end: a record being written right now, or one cut \
             short by a crash (agentkeysd repairs that when it next opens the log); not counted"
        ));
    }
    Ok(chain.report(None))
}

/// A line that does not parse, kept until the next line says whether it was a crash.
struct Cut {
    line: u64,
    hash: [u8; 32],
    why: String,
}

impl Cut {
    fn bad(self) -> BadRecord {
        BadRecord {
            line: self.line,
            seq: None,
            reason: format!(
                "{}: the line was edited or damaged (a crash-cut line would be followed by a \
                 `recover` record)",
                self.why
            ),
        }
    }
}

/// The state of [`verify`] between lines.
#[derive(Default)]
struct Chain {
    records: u64,
    notes: Vec<String>,
    /// (line, seq, hash) of the last good record.
    last: Option<(u64, u64, [u8; 32])>,
    cut: Option<Cut>,
}

impl Chain {
    fn feed(&mut self, line: &RawLine) -> Result<(), BadRecord> {
        let n = line.number;
        if line.too_long {
            if let Some(cut) = self.cut.take() {
                return Err(cut.bad());
            }
            return Err(BadRecord {
                line: n,
                seq: None,
                reason: format!("the line is longer than {MAX_LINE} bytes: not a record"),
            });
        }
        let hash = sha256(&line.bytes);
        let rec = match Record::from_line(&line.bytes) {
            Ok(r) => r,
            Err(why) => {
                if let Some(cut) = self.cut.take() {
                    return Err(cut.bad());
                }
                self.cut = Some(Cut { line: n, hash, why });
                return Ok(());
            }
        };
        let expected = self.last.map_or(1, |(_, seq, _)| seq.saturating_add(1));
        if let Some(cut) = self.cut.take() {
            if rec.event == "recover" && rec.seq == expected && rec.prev == hex(&cut.hash) {
                self.notes.push(format!(
                    "line {} was cut short by a crash during a write: that record is lost; the \
                     `recover` record at line {n} (seq {}) marks the repair",
                    cut.line, rec.seq
                ));
                self.accept(n, &rec, hash);
                return Ok(());
            }
            return Err(cut.bad());
        }
        let bad = |reason: String| BadRecord {
            line: n,
            seq: Some(rec.seq),
            reason,
        };
        if rec.seq != expected {
            return Err(bad(match self.last {
                None => format!(
                    "seq does not start at 1 (the first record has seq {}): the start of the log \
                     was removed",
                    rec.seq
                ),
                Some((_, prev_seq, _)) if rec.seq > expected => format!(
                    "seq {} follows {prev_seq}: record(s) removed before this line, or lines \
                     reordered",
                    rec.seq
                ),
                Some((_, prev_seq, _)) => format!(
                    "seq {} follows {prev_seq}: lines reordered or duplicated",
                    rec.seq
                ),
            }));
        }
        match self.last {
            None if rec.prev != hex(&GENESIS) => {
                return Err(bad(
                    "prev of the first record is not 64 zeros: the start of the log was removed, \
                     or this line was edited"
                        .into(),
                ));
            }
            Some((l, _, h)) if rec.prev != hex(&h) => {
                return Err(bad(format!(
                    "prev hash does not match line {l}: line {l} was edited, or a line was \
                     removed before this one (or this line's prev was edited)"
                )));
            }
            _ => {}
        }
        self.accept(n, &rec, hash);
        Ok(())
    }

    fn accept(&mut self, line: u64, rec: &Record, hash: [u8; 32]) {
        self.records += 1;
        self.last = Some((line, rec.seq, hash));
    }

    fn report(self, first_bad: Option<BadRecord>) -> VerifyReport {
        VerifyReport {
            records: self.records,
            notes: self.notes,
            first_bad,
            missing: false,
            last: self.last.map(|(_, seq, h)| (seq, hex(&h))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{TempHome, all_files};
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn fetch(service: &str) -> Event<'_> {
        Event {
            event: "fetch",
            who: Some(Who::Agent {
                name: "ci-bot",
                session: "s-0123456789ab",
            }),
            service: Some(service),
            peer: Some(Peer::local(1000, 4242)),
            outcome: "ok",
            ..Event::default()
        }
    }

    /// A home with a log of `n` records; returns the records as `append` returned them.
    fn log_with(t: &TempHome, n: usize) -> Vec<Record> {
        let mut log = AuditLog::open(&t.home()).unwrap();
        (0..n)
            .map(|i| {
                let service = format!("svc{i}");
                log.append(&fetch(&service)).unwrap()
            })
            .collect()
    }

    fn lines_of(path: &Path) -> Vec<Vec<u8>> {
        let bytes = fs::read(path).unwrap();
        assert_eq!(bytes.last(), Some(&b'\n'));
        bytes[..bytes.len() - 1]
            .split(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[Vec<u8>]) {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        fs::write(path, out).unwrap();
    }

    fn bad_of(path: &Path) -> BadRecord {
        let r = verify(path).unwrap();
        r.first_bad
            .unwrap_or_else(|| panic!("verify passed: {} records, notes {:?}", r.records, r.notes))
    }

    fn reason_of(e: StateError) -> String {
        match e {
            StateError::AuditUnavailable { reason, .. } => reason,
            other => panic!("expected AuditUnavailable, got {other}"),
        }
    }

    #[test]
    fn append_verify_round_trip() {
        let t = TempHome::new("audit-rt");
        let recs = log_with(&t, 5);
        let path = t.home().path(AUDIT_FILE);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let lines = lines_of(&path);
        assert_eq!(lines.len(), 5);
        for (i, rec) in recs.iter().enumerate() {
            assert_eq!(rec.seq, i as u64 + 1);
            let want = if i == 0 {
                "0".repeat(64)
            } else {
                hex(&sha256(&lines[i - 1]))
            };
            assert_eq!(rec.prev, want, "record {i}");
            assert_eq!(&Record::from_line(&lines[i]).unwrap(), rec);
        }
        assert!(recs.windows(2).all(|w| w[0].ts <= w[1].ts));

        let report = verify(&path).unwrap();
        assert_eq!(report.records, 5);
        assert!(report.first_bad.is_none() && report.notes.is_empty() && !report.missing);
        assert_eq!(report.last, Some((5, hex(&sha256(&lines[4])))));

        let read: Vec<_> = read_records(&path).unwrap().map(Result::unwrap).collect();
        let want: Vec<_> = recs
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, r)| (i as u64 + 1, r))
            .collect();
        assert_eq!(read, want);

        // Reopening continues the chain.
        let mut log = AuditLog::open(&t.home()).unwrap();
        assert_eq!(log.next_seq(), 6);
        let r6 = log.append(&fetch("github")).unwrap();
        assert_eq!(
            (r6.seq, r6.prev.as_str()),
            (6, hex(&sha256(&lines[4])).as_str())
        );
        assert_eq!(verify(&path).unwrap().records, 6);
        assert_eq!(log.path(), path);
    }

    #[test]
    fn audit_line_format_and_exact_keys() {
        let t = TempHome::new("audit-format");
        let mut log = AuditLog::open(&t.home()).unwrap();
        let full = Event {
            event: "deliver",
            who: Some(Who::Agent {
                name: "ci-bot",
                session: "s-0123456789ab",
            }),
            service: Some("github"),
            delivery: Some("fd"),
            degraded: true,
            peer: Some(Peer::local(1000, 4242)),
            outcome: "ok",
            detail: Some("fallback memfd"),
        };
        let r1 = log.append(&full).unwrap();
        let r2 = log
            .append(&Event {
                event: "fetch",
                outcome: "ok",
                ..Event::default()
            })
            .unwrap();
        let r3 = log
            .append(&Event {
                event: "approve",
                who: Some(Who::Owner {
                    session: "s-aaaaaaaaaaaa",
                }),
                outcome: "ok",
                ..Event::default()
            })
            .unwrap();
        let r4 = log
            .append(&Event {
                event: "deliver",
                who: Some(Who::Agent {
                    name: "vm1",
                    session: "s-bbbbbbbbbbbb",
                }),
                peer: Some(Peer {
                    uid: 1000,
                    pid: 0,
                    addr: Some("100.64.0.7:40123".parse().unwrap()),
                }),
                outcome: "ok",
                ..Event::default()
            })
            .unwrap();
        let lines = lines_of(log.path());
        let zeros = "0".repeat(64);
        // A network peer: its source address inside `peer`, nowhere else.
        assert_eq!(
            String::from_utf8(lines[3].clone()).unwrap(),
            format!(
                r#"{{"ts":{},"seq":4,"event":"deliver","role":"agent","agent":"vm1","session":"s-bbbbbbbbbbbb","peer":{{"uid":1000,"pid":0,"addr":"100.64.0.7:40123"}},"outcome":"ok","prev":"{}"}}"#,
                r4.ts,
                hex(&sha256(&lines[2]))
            )
        );
        // The owner is a kind (`role`), never an `agent` name.
        assert_eq!(
            String::from_utf8(lines[2].clone()).unwrap(),
            format!(
                r#"{{"ts":{},"seq":3,"event":"approve","role":"owner","session":"s-aaaaaaaaaaaa","outcome":"ok","prev":"{}"}}"#,
                r3.ts,
                hex(&sha256(&lines[1]))
            )
        );
        assert_eq!(
            String::from_utf8(lines[0].clone()).unwrap(),
            format!(
                r#"{{"ts":{},"seq":1,"event":"deliver","role":"agent","agent":"ci-bot","session":"s-0123456789ab","service":"github","delivery":"fd","degraded":true,"peer":{{"uid":1000,"pid":4242}},"outcome":"ok","detail":"fallback memfd","prev":"{zeros}"}}"#,
                r1.ts
            )
        );
        assert_eq!(
            String::from_utf8(lines[1].clone()).unwrap(),
            format!(
                r#"{{"ts":{},"seq":2,"event":"fetch","outcome":"ok","prev":"{}"}}"#,
                r2.ts,
                hex(&sha256(&lines[0]))
            )
        );
        // Exactly these keys, nothing else: there is no field a secret or token could ride in.
        let keys = |l: &[u8]| -> Vec<String> {
            let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(l).unwrap();
            v.keys().cloned().collect()
        };
        let mut all = keys(&lines[0]);
        all.sort();
        let mut want = vec![
            "ts", "seq", "event", "role", "agent", "session", "service", "delivery", "degraded",
            "peer", "outcome", "detail", "prev",
        ];
        want.sort_unstable();
        assert_eq!(all, want);
        let mut min = keys(&lines[1]);
        min.sort();
        assert_eq!(min, vec!["event", "outcome", "prev", "seq", "ts"]);
        // ts is microseconds: within a minute of now.
        let now = now_micros().unwrap();
        assert!(r1.ts <= now && now - r1.ts < 60_000_000);
    }

    #[test]
    fn audit_rejects_bad_names_and_oversized_records_without_writing() {
        let t = TempHome::new("audit-names");
        let mut log = AuditLog::open(&t.home()).unwrap();
        log.append(&fetch("a")).unwrap();
        let before = fs::read(log.path()).unwrap();
        for ev in [
            Event {
                event: "",
                outcome: "ok",
                ..Event::default()
            },
            Event {
                event: "Fetch now",
                outcome: "ok",
                ..Event::default()
            },
            Event {
                event: "fetch",
                outcome: "ok\n{",
                ..Event::default()
            },
            Event {
                event: "fetch",
                outcome: "ok",
                delivery: Some("fd\"x"),
                ..Event::default()
            },
        ] {
            let reason = reason_of(log.append(&ev).unwrap_err());
            assert!(reason.contains("name"), "{reason}");
        }
        let big = "x".repeat(MAX_RECORD);
        let reason = reason_of(
            log.append(&Event {
                detail: Some(&big),
                ..fetch("a")
            })
            .unwrap_err(),
        );
        assert!(reason.contains("more than the 16384"), "{reason}");
        assert_eq!(fs::read(log.path()).unwrap(), before, "nothing written");
        // Nothing consumed either: the chain goes on.
        assert_eq!(log.append(&fetch("b")).unwrap().seq, 2);
        assert_eq!(verify(log.path()).unwrap().records, 2);
    }

    #[test]
    fn audit_deleting_any_line_is_named() {
        const N: usize = 6;
        let t = TempHome::new("audit-del");
        log_with(&t, N);
        let path = t.home().path(AUDIT_FILE);
        let lines = lines_of(&path);
        for k in 0..N {
            let mut cut = lines.clone();
            cut.remove(k);
            write_lines(&path, &cut);
            let line = k as u64 + 1;
            if k == N - 1 {
                // The known limit: nothing after the last record vouches for it, so its removal
                // leaves a valid, shorter chain. VerifyReport::last is the head to compare.
                let r = verify(&path).unwrap();
                assert!(r.first_bad.is_none());
                assert_eq!(r.records, N as u64 - 1);
                assert_eq!(r.last.unwrap().0, N as u64 - 1);
                continue;
            }
            let bad = bad_of(&path);
            assert_eq!(bad.line, line, "deleted line {line}: {bad:?}");
            assert_eq!(bad.seq, Some(line + 1));
            if k == 0 {
                assert!(
                    bad.reason.contains("start of the log was removed"),
                    "{bad:?}"
                );
            } else {
                assert!(
                    bad.reason.starts_with(&format!(
                        "seq {} follows {}: record(s) removed",
                        line + 1,
                        line - 1
                    )),
                    "{bad:?}"
                );
            }
        }
    }

    #[test]
    fn audit_editing_any_byte_is_named() {
        const N: usize = 4;
        let t = TempHome::new("audit-edit");
        log_with(&t, N);
        let path = t.home().path(AUDIT_FILE);
        let lines = lines_of(&path);
        for k in 0..N {
            let line = k as u64 + 1;
            for pos in 0..lines[k].len() {
                let mut edited = lines.clone();
                let b = edited[k][pos];
                edited[k][pos] = if b ^ 1 == b'\n' { b ^ 2 } else { b ^ 1 };
                write_lines(&path, &edited);
                let r = verify(&path).unwrap();
                match r.first_bad {
                    Some(bad) if bad.line == line => {}
                    // A still-valid edit is caught by the next line's prev, which names this one.
                    Some(bad) if bad.line == line + 1 => assert!(
                        bad.reason.contains(&format!("does not match line {line}")),
                        "{bad:?}"
                    ),
                    Some(bad) => panic!("edit of line {line} byte {pos} reported as {bad:?}"),
                    // The same limit as deleting the last line: a valid edit of the last record
                    // has no later line to contradict it.
                    None => assert_eq!(k, N - 1, "edit of line {line} byte {pos} not detected"),
                }
            }
        }
        // Named explicitly: an edit that breaks the JSON, and one that keeps it valid.
        let mut edited = lines.clone();
        edited[1][0] = b'#';
        write_lines(&path, &edited);
        let bad = bad_of(&path);
        assert_eq!((bad.line, bad.seq), (2, None));
        assert!(bad.reason.starts_with("not valid JSON"), "{bad:?}");

        let mut edited = lines.clone();
        let s = String::from_utf8(edited[1].clone()).unwrap();
        edited[1] = s
            .replace("\"outcome\":\"ok\"", "\"outcome\":\"no\"")
            .into_bytes();
        write_lines(&path, &edited);
        let bad = bad_of(&path);
        assert_eq!((bad.line, bad.seq), (3, Some(3)));
        assert!(
            bad.reason
                .starts_with("prev hash does not match line 2: line 2 was edited"),
            "{bad:?}"
        );
    }

    #[test]
    fn audit_reordered_lines_are_bad() {
        let t = TempHome::new("audit-order");
        log_with(&t, 5);
        let path = t.home().path(AUDIT_FILE);
        let lines = lines_of(&path);
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        write_lines(&path, &swapped);
        let bad = bad_of(&path);
        assert_eq!((bad.line, bad.seq), (2, Some(3)));
        assert!(bad.reason.contains("seq 3 follows 1"), "{bad:?}");

        let mut swapped = lines.clone();
        swapped.swap(0, 4);
        write_lines(&path, &swapped);
        let bad = bad_of(&path);
        assert_eq!(bad.line, 1);
        assert!(bad.reason.contains("start of the log"), "{bad:?}");

        // A duplicated line.
        let mut dup = lines.clone();
        dup.insert(3, lines[2].clone());
        write_lines(&path, &dup);
        let bad = bad_of(&path);
        assert_eq!(bad.line, 4);
        assert!(bad.reason.contains("reordered or duplicated"), "{bad:?}");
    }

    #[test]
    fn audit_truncated_last_line_is_recovered_on_reopen() {
        let t = TempHome::new("audit-crash");
        log_with(&t, 4);
        let path = t.home().path(AUDIT_FILE);
        let full = fs::read(&path).unwrap();
        let lines = lines_of(&path);
        // A crash in the middle of writing record 4.
        let cut_at = full.len() - 1 - lines[3].len() / 2;
        fs::write(&path, &full[..cut_at]).unwrap();
        let cut = full[full.len() - 1 - lines[3].len()..cut_at].to_vec();

        // Before the daemon repairs it: a note, the three whole records intact.
        let r = verify(&path).unwrap();
        assert!(r.first_bad.is_none());
        assert_eq!(r.records, 3);
        assert!(
            r.notes[0].starts_with("line 4 has no newline"),
            "{:?}",
            r.notes
        );

        let mut log = AuditLog::open(&t.home()).unwrap();
        assert_eq!(log.next_seq(), 5);
        let after = lines_of(&path);
        assert_eq!(after.len(), 5);
        assert_eq!(after[3], cut);
        let rec = Record::from_line(&after[4]).unwrap();
        assert_eq!(rec.event, "recover");
        assert_eq!(rec.outcome, "ok");
        assert_eq!(rec.seq, 4);
        assert_eq!(rec.prev, hex(&sha256(&cut)));
        assert_eq!(
            rec.detail.as_deref(),
            Some("record at line 4 was cut short (crash during write)")
        );

        let r = verify(&path).unwrap();
        assert!(r.first_bad.is_none(), "{:?}", r.first_bad);
        assert_eq!(r.records, 4);
        assert_eq!(r.notes.len(), 1);
        assert!(
            r.notes[0].starts_with("line 4 was cut short") && r.notes[0].contains("line 5 (seq 4)"),
            "{:?}",
            r.notes
        );

        // The chain goes on after the repair.
        assert_eq!(log.append(&fetch("x")).unwrap().seq, 5);
        let r = verify(&path).unwrap();
        assert!(r.first_bad.is_none());
        assert_eq!(r.records, 5);

        // A removed `recover` record leaves the cut line bare: that is a break at the cut line.
        let mut l = lines_of(&path);
        l.remove(4);
        write_lines(&path, &l);
        let bad = bad_of(&path);
        assert_eq!((bad.line, bad.seq), (4, None));
        assert!(bad.reason.starts_with("not valid JSON"), "{bad:?}");
    }

    #[test]
    fn audit_lost_newline_only_is_restored() {
        let t = TempHome::new("audit-nl");
        log_with(&t, 3);
        let path = t.home().path(AUDIT_FILE);
        let full = fs::read(&path).unwrap();
        fs::write(&path, &full[..full.len() - 1]).unwrap();
        let mut log = AuditLog::open(&t.home()).unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            full,
            "just the newline added back"
        );
        assert_eq!(log.append(&fetch("x")).unwrap().seq, 4);
        let r = verify(&path).unwrap();
        assert!(r.first_bad.is_none() && r.notes.is_empty(), "{r:?}");
        assert_eq!(r.records, 4);
    }

    #[test]
    fn audit_crash_during_first_write_is_recovered() {
        let t = TempHome::new("audit-crash1");
        let path = t.home().path(AUDIT_FILE);
        fs::write(&path, br#"{"ts":1,"seq":1,"ev"#).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let mut log = AuditLog::open(&t.home()).unwrap();
        assert_eq!(log.next_seq(), 2);
        log.append(&fetch("a")).unwrap();
        let r = verify(&path).unwrap();
        assert!(r.first_bad.is_none(), "{:?}", r.first_bad);
        assert_eq!(r.records, 2);
        assert!(
            r.notes[0].starts_with("line 1 was cut short"),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn audit_append_fails_closed_when_file_removed() {
        let t = TempHome::new("audit-rm");
        let mut log = AuditLog::open(&t.home()).unwrap();
        log.append(&fetch("a")).unwrap();
        let held = File::open(log.path()).unwrap();
        let len = held.metadata().unwrap().len();
        fs::remove_file(log.path()).unwrap();
        let reason = reason_of(log.append(&fetch("b")).unwrap_err());
        assert!(reason.contains("removed"), "{reason}");
        // Nothing was written anywhere: not in the home, not in the unlinked file.
        assert!(all_files(t.path()).is_empty());
        assert_eq!(held.metadata().unwrap().len(), len);
        // And it stays refused.
        assert!(log.append(&fetch("c")).is_err());
        assert!(all_files(t.path()).is_empty());
    }

    #[test]
    fn audit_append_fails_closed_when_file_replaced() {
        let t = TempHome::new("audit-replace");
        let mut log = AuditLog::open(&t.home()).unwrap();
        log.append(&fetch("a")).unwrap();
        let held = File::open(log.path()).unwrap();
        let len = held.metadata().unwrap().len();
        let other = t.home().path("other");
        fs::write(&other, b"not the log\n").unwrap();
        fs::rename(&other, log.path()).unwrap();
        let reason = reason_of(log.append(&fetch("b")).unwrap_err());
        assert!(reason.contains("replaced"), "{reason}");
        assert_eq!(fs::read(log.path()).unwrap(), b"not the log\n");
        assert_eq!(held.metadata().unwrap().len(), len);
        assert_eq!(all_files(t.path()).len(), 1);
    }

    #[test]
    fn audit_append_fails_closed_when_size_changed() {
        let t = TempHome::new("audit-size");
        let mut log = AuditLog::open(&t.home()).unwrap();
        log.append(&fetch("a")).unwrap();
        let before = fs::read(log.path()).unwrap();
        // Another writer.
        let mut f = OpenOptions::new().append(true).open(log.path()).unwrap();
        f.write_all(b"{\"forged\":1}\n").unwrap();
        let reason = reason_of(log.append(&fetch("b")).unwrap_err());
        assert!(reason.contains("size changed"), "{reason}");
        // Truncated back below what we wrote.
        f.set_len(10).unwrap();
        assert!(reason_of(log.append(&fetch("b")).unwrap_err()).contains("size changed"));
        // Restored exactly: appends resume (only size and identity are checked per write).
        fs::write(log.path(), &before).unwrap();
        assert_eq!(log.append(&fetch("c")).unwrap().seq, 2);
    }

    #[test]
    fn audit_failed_log_refuses_until_reopened_and_repaired() {
        let t = TempHome::new("audit-failed");
        let mut log = AuditLog::open(&t.home()).unwrap();
        log.append(&fetch("a")).unwrap();
        // What a short write leaves: part of a line. (Simulated: a real one needs a full disk at
        // the right byte.)
        let mut f = OpenOptions::new().append(true).open(log.path()).unwrap();
        f.write_all(br#"{"ts":1,"seq":2,"event":"fe"#).unwrap();
        log.len = f.metadata().unwrap().len();
        log.failed = Some("short write: 27 of 150 bytes (disk full, or a file size limit)".into());
        let reason = reason_of(log.append(&fetch("b")).unwrap_err());
        assert!(
            reason.starts_with("an earlier write failed part-way (short write"),
            "{reason}"
        );
        drop(log);
        let mut log = AuditLog::open(&t.home()).unwrap();
        assert_eq!(log.append(&fetch("c")).unwrap().seq, 3);
        let r = verify(log.path()).unwrap();
        assert!(r.first_bad.is_none(), "{:?}", r.first_bad);
        assert_eq!(r.records, 3);
        assert!(
            r.notes[0].starts_with("line 2 was cut short"),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn audit_open_checks_the_file() {
        let t = TempHome::new("audit-open");
        let home = t.home();
        let path = home.path(AUDIT_FILE);
        fs::write(&path, b"").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = AuditLog::open(&home).unwrap_err();
        assert!(matches!(err, StateError::UnsafePermissions { .. }), "{err}");
        assert!(matches!(
            verify(&path),
            Err(StateError::UnsafePermissions { .. })
        ));
        fs::remove_file(&path).unwrap();

        std::os::unix::fs::symlink(home.path("elsewhere"), &path).unwrap();
        let err = AuditLog::open(&home).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!home.path("elsewhere").exists());
        fs::remove_file(&path).unwrap();

        // A last complete line that is not a record: refuse to continue an unreadable chain.
        fs::write(&path, b"garbage\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = AuditLog::open(&home).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("audit verify"), "{err}");

        // Over the cap (sparse, so it costs no disk).
        let f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(MAX_LOG + 1).unwrap();
        let reason = reason_of(AuditLog::open(&home).unwrap_err());
        assert!(reason.contains("1 GiB"), "{reason}");

        // Uninitialised (missing) home.
        let gone = Home::at(t.path().join("nope"));
        assert!(matches!(
            AuditLog::open(&gone),
            Err(StateError::NotInitialized { .. })
        ));
    }

    #[test]
    fn audit_verify_missing_empty_and_overlong() {
        let t = TempHome::new("audit-verify");
        let path = t.home().path(AUDIT_FILE);
        let r = verify(&path).unwrap();
        assert!(r.missing && r.records == 0 && r.first_bad.is_none());
        assert!(r.notes[0].contains("no audit log"), "{:?}", r.notes);
        assert!(read_records(&path).map(|_| ()).unwrap_err().is_not_found());

        drop(AuditLog::open(&t.home()).unwrap());
        let r = verify(&path).unwrap();
        assert!(!r.missing && r.records == 0 && r.first_bad.is_none() && r.notes.is_empty());

        log_with(&t, 3);
        let mut lines = lines_of(&path);
        lines.insert(1, vec![b'x'; MAX_LINE + 10]);
        write_lines(&path, &lines);
        let bad = bad_of(&path);
        assert_eq!((bad.line, bad.seq), (2, None));
        assert!(bad.reason.contains("longer than"), "{bad:?}");
        let items: Vec<_> = read_records(&path).unwrap().collect();
        assert_eq!(items.len(), 4);
        assert!(
            items[1]
                .as_ref()
                .is_err_and(|e| e.to_string().contains("line 2"))
        );
        assert_eq!(items[2].as_ref().unwrap().0, 3);
    }

    #[test]
    fn audit_reader_holds_back_a_partial_line() {
        let t = TempHome::new("audit-follow");
        let mut log = AuditLog::open(&t.home()).unwrap();
        log.append(&fetch("a")).unwrap();
        let mut reader = AuditReader::open(log.path()).unwrap();
        assert_eq!(reader.next_line().unwrap().unwrap().number, 1);
        assert!(reader.next_line().unwrap().is_none());
        let mut f = OpenOptions::new().append(true).open(log.path()).unwrap();
        f.write_all(b"{\"half").unwrap();
        assert!(reader.next_line().unwrap().is_none());
        assert_eq!(reader.pending(), Some(2));
        f.write_all(b"\":1}\n").unwrap();
        let l = reader.next_line().unwrap().unwrap();
        assert_eq!((l.number, l.bytes.as_slice()), (2, &b"{\"half\":1}"[..]));
        assert_eq!(reader.pending(), None);
        assert!(!reader.replaced());
        fs::remove_file(log.path()).unwrap();
        assert!(reader.replaced());
    }

    /// Unmounts (and removes) a tmpfs mount point on drop, also when the test panics.
    struct Mount(PathBuf);

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = fs::remove_dir(&self.0);
        }
    }

    #[test]
    fn audit_write_fails_closed_on_full_disk() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP audit_write_fails_closed_on_full_disk: needs root and mount");
            return;
        }
        let t = TempHome::new("audit-enospc");
        let dir = t.path().join("mnt");
        fs::create_dir(&dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!(
                "SKIP audit_write_fails_closed_on_full_disk: needs root and mount (mount failed)"
            );
            return;
        }
        let mount = Mount(dir.clone());
        let home = Home::at(&dir);
        let mut log = AuditLog::open(&home).unwrap();

        // Fill the file system to the last byte.
        let filler_path = dir.join("filler");
        let mut filler = File::create(&filler_path).unwrap();
        let chunk = [0x55u8; 512];
        loop {
            match filler.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(Errno::ENOSPC as i32) => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
        let reason = reason_of(log.append(&fetch("github")).unwrap_err());
        assert!(reason.contains("ENOSPC"), "{reason}");
        assert_eq!(
            fs::metadata(log.path()).unwrap().len(),
            0,
            "nothing written"
        );
        // write(2) failed without writing: the log is not failed, only full; once space is back
        // the next append works and the chain is whole.
        drop(filler);
        fs::remove_file(&filler_path).unwrap();
        let rec = log.append(&fetch("github")).unwrap();
        assert_eq!(rec.seq, 1);
        let r = verify(log.path()).unwrap();
        assert!(r.first_bad.is_none() && r.records == 1);
        drop(log);
        drop(mount);
    }
}
