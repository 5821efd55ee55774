//! Group commit for the audit trail.
//!
//! Every record is written (`write(2)`, in order, under one lock) the moment it happens, so the
//! hash chain and `agentkeys audit verify` are exactly as with one sync per record. Making records
//! durable is shared: one `fdatasync` covers every record whose write returned before it began,
//! so concurrent requests share syncs instead of queueing one sync each behind a mutex.
//!
//! The contract it keeps: **no answer leaves the daemon, and no program is launched, before every
//! record its request wrote is on disk.** How:
//!
//! - a request handler runs inside [`collect_async`]; every
//!   [`Auditor::append`] made inside raises the request's *ticket* (the log offset just past its
//!   record) instead of waiting; before the answer is sent (or before `run` launches) the
//!   connection awaits [`Auditor::durable`] for that ticket;
//! - an append outside any request scope that must be durable ([`Need::Durable`]) waits right
//!   there (blocking its thread) for a sync covering it, so nothing depends on the scope for
//!   correctness: the scope only turns "wait now" into "wait before the answer";
//! - records nobody waits for ([`Need::Lazy`]: `drop` after the answer is out, `evict`,
//!   `run_exit`, expiries) are synced by the syncer thread at most [`LAZY_SYNC`] after they were
//!   written, or earlier by the next sync anyone waits for.
//!
//! The syncer is one std thread started on first use (after the sandbox is installed: thread
//! creation is a `clone` with thread flags, which the seccomp policy allows for tokio's workers).
//! Until it runs, or if it cannot be started, a waiter syncs itself. Before a sync somebody
//! waits for, the syncer waits up to 200 µs for appends already under way (another request
//! between "announced" and "written"), so that the one sync covers them too; with no other
//! append under way it syncs at once.
//!
//! A failed `fdatasync` fails the log ([`AuditLog::fail`]): the waiters of every record not yet
//! covered get an error (their deliveries are refused), and every later append fails until the
//! daemon restarts and the log is reopened, as before.
//!
//! What a crash can lose: records written in the last [`LAZY_SYNC`] that no answer waited for
//! (a `drop`, `evict`, `run_exit`, `expired`, `deny` recorded outside a request); never the record
//! of a delivery that was answered or a program that was launched.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use agentkeys_state::StateError;
use agentkeys_state::audit::{AuditLog, AuditSync, Event};
use tokio::sync::watch;
use tracing::error;

/// Longest a record nobody waits for stays unsynced.
pub const LAZY_SYNC: Duration = Duration::from_millis(5);
/// Longest the syncer waits for appends under way before a sync somebody waits for.
const GATHER: Duration = Duration::from_micros(200);

tokio::task_local! {
    /// The offset the current request's records reach; see [`collect`].
    static TICKET: Cell<u64>;
}

/// Whether the caller needs its record on disk before it goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Before the request's answer (inside a request scope) or before returning (outside).
    Durable,
    /// Inside a request scope: before the answer; outside: soon (at most [`LAZY_SYNC`]).
    Lazy,
}

/// Sync progress, as the async waiters see it.
#[derive(Debug, Clone, Default)]
struct Synced {
    /// Every byte before this offset is on disk.
    upto: u64,
    /// A sync failed: nothing past `upto` will ever be durable.
    failed: Option<String>,
}

#[derive(Default)]
struct SyncState {
    /// Offset past the last record written.
    written: u64,
    /// Offset past the last durable record.
    synced: u64,
    /// Highest offset somebody waits for.
    wanted: u64,
    /// When the oldest unsynced, unwaited-for record was written.
    lazy_since: Option<Instant>,
    /// A sync is running (by the syncer or a self-syncing waiter).
    syncing: bool,
    failed: Option<String>,
    /// The syncer should finish outstanding work and end.
    stop: bool,
    /// Appends between "about to take the log lock" and "written".
    appending: usize,
    /// The syncer is waiting for `appending` to reach 0 before it syncs.
    gathering: bool,
}

/// The daemon's audit trail with group commit.
pub struct Auditor {
    log: Mutex<AuditLog>,
    path: std::path::PathBuf,
    sync: AuditSync,
    state: Mutex<SyncState>,
    /// Wakes the syncer (work to do) and blocking waiters (a sync finished).
    changed: Condvar,
    synced_tx: watch::Sender<Synced>,
    /// Set once the syncer thread runs (`Some(false)` if it could not be started).
    syncer: OnceLock<bool>,
}

impl Auditor {
    /// Wraps an open log. Call before the sandbox: it duplicates the log's descriptor.
    ///
    /// # Errors
    /// The descriptor cannot be duplicated.
    pub fn new(log: AuditLog) -> Result<Arc<Auditor>, StateError> {
        let sync = log.sync_handle()?;
        let at = log.written();
        Ok(Arc::new(Auditor {
            path: log.path().to_path_buf(),
            log: Mutex::new(log),
            sync,
            state: Mutex::new(SyncState {
                written: at,
                synced: at,
                wanted: at,
                ..SyncState::default()
            }),
            changed: Condvar::new(),
            synced_tx: watch::Sender::new(Synced {
                upto: at,
                failed: None,
            }),
            syncer: OnceLock::new(),
        }))
    }

    /// Writes one record now (fail closed: an error means nothing may be delivered on its
    /// account), and arranges for it to be durable as `need` says (see the module docs).
    ///
    /// # Errors
    /// The record could not be written, or (waiting outside a request) its sync failed.
    pub fn append(self: &Arc<Self>, ev: &Event<'_>, need: Need) -> Result<(), StateError> {
        // Announce the append, so a sync about to start can wait for it and cover it too.
        self.state.lock().expect("audit sync lock").appending += 1;
        // Whether this record started a lazy period: only then does the syncer need waking (to
        // start its LAZY_SYNC clock); while one runs, it wakes by itself when the clock runs out.
        // Waking it on every record cost two context switches per record on a busy daemon.
        let mut started_lazy = false;
        let written = {
            let mut log = self.log.lock().expect("audit lock");
            let r = log.append_unsynced(ev);
            // Under the log lock, so `written` only grows in file order.
            let mut st = self.state.lock().expect("audit sync lock");
            st.appending -= 1;
            if let Ok((_, end)) = &r {
                st.written = *end;
                if st.lazy_since.is_none() {
                    st.lazy_since = Some(Instant::now());
                    started_lazy = true;
                }
            }
            if st.gathering && st.appending == 0 {
                self.changed.notify_all();
            }
            r
        };
        let (_, end) = written?;
        self.ensure_syncer();
        if started_lazy {
            self.changed.notify_all();
        }
        if TICKET.try_with(|t| t.set(t.get().max(end))).is_ok() {
            // Inside a request: the connection waits before answering.
            return Ok(());
        }
        match need {
            Need::Durable => self.wait_blocking(end),
            Need::Lazy => Ok(()),
        }
    }

    /// Waits (without blocking a runtime thread) until every record up to `ticket` is on disk.
    /// A ticket of 0 (the request wrote nothing) returns at once.
    ///
    /// # Errors
    /// A sync failed before covering `ticket`.
    pub async fn durable(self: &Arc<Self>, ticket: u64) -> Result<(), StateError> {
        if ticket == 0 {
            return Ok(());
        }
        if self.ensure_syncer() {
            self.want(ticket);
            let mut rx = self.synced_tx.subscribe();
            let s = rx
                .wait_for(|s| s.upto >= ticket || s.failed.is_some())
                .await
                .map(|s| s.clone())
                .unwrap_or_else(|_| Synced {
                    upto: 0,
                    failed: Some("the audit syncer stopped".into()),
                });
            return self.outcome(s.upto, s.failed, ticket);
        }
        self.wait_blocking(ticket)
    }

    /// Waits (blocking this thread) until every record up to `ticket` is on disk, syncing itself
    /// when no syncer thread does.
    ///
    /// # Errors
    /// A sync failed before covering `ticket`.
    pub fn wait_blocking(&self, ticket: u64) -> Result<(), StateError> {
        let threaded = self.syncer.get() == Some(&true);
        let mut st = self.state.lock().expect("audit sync lock");
        st.wanted = st.wanted.max(ticket);
        self.changed.notify_all();
        loop {
            if st.synced >= ticket || st.failed.is_some() {
                let (upto, failed) = (st.synced, st.failed.clone());
                drop(st);
                return self.outcome(upto, failed, ticket);
            }
            if !threaded && !st.syncing {
                st = self.sync_once(st);
                continue;
            }
            st = self.changed.wait(st).expect("audit sync lock");
        }
    }

    /// Makes everything written so far durable (shutdown).
    ///
    /// # Errors
    /// The sync failed.
    pub fn flush(&self) -> Result<(), StateError> {
        let written = self.state.lock().expect("audit sync lock").written;
        self.wait_blocking(written)
    }

    /// Stops the syncer thread after it synced everything written.
    pub fn stop(&self) {
        let mut st = self.state.lock().expect("audit sync lock");
        st.stop = true;
        drop(st);
        self.changed.notify_all();
    }

    /// The seq the next record gets (for tests and status).
    pub fn next_seq(&self) -> u64 {
        self.log.lock().expect("audit lock").next_seq()
    }

    fn outcome(&self, upto: u64, failed: Option<String>, ticket: u64) -> Result<(), StateError> {
        if upto >= ticket {
            return Ok(());
        }
        let reason = failed.unwrap_or_else(|| "the record was not synced".into());
        Err(StateError::AuditUnavailable {
            path: self.path.clone(),
            reason,
        })
    }

    fn want(&self, ticket: u64) {
        let mut st = self.state.lock().expect("audit sync lock");
        if ticket > st.wanted {
            st.wanted = ticket;
            drop(st);
            self.changed.notify_all();
        }
    }

    /// Starts the syncer on first use; true when it runs.
    fn ensure_syncer(self: &Arc<Self>) -> bool {
        *self.syncer.get_or_init(|| {
            let me = Arc::downgrade(self);
            match std::thread::Builder::new()
                .name("agentkeysd-audit".into())
                .spawn(move || syncer(me))
            {
                Ok(_) => true,
                Err(e) => {
                    error!("cannot start the audit syncer thread ({e}); syncing inline");
                    false
                }
            }
        })
    }

    /// One `fdatasync` covering everything written so far; called and returns with the lock.
    fn sync_once<'a>(
        &'a self,
        mut st: std::sync::MutexGuard<'a, SyncState>,
    ) -> std::sync::MutexGuard<'a, SyncState> {
        let target = st.written;
        st.syncing = true;
        st.lazy_since = None;
        drop(st);
        let r = self.sync.sync();
        if let Err(e) = &r {
            error!("AUDIT SYNC FAILED, refusing deliveries until agentkeysd restarts: {e}");
            self.log.lock().expect("audit lock").fail(e.to_string());
        }
        let mut st = self.state.lock().expect("audit sync lock");
        st.syncing = false;
        match r {
            Ok(()) => st.synced = st.synced.max(target),
            Err(e) => {
                st.failed.get_or_insert_with(|| e.to_string());
            }
        }
        if st.written > st.synced && st.lazy_since.is_none() && st.failed.is_none() {
            st.lazy_since = Some(Instant::now());
        }
        self.synced_tx.send_replace(Synced {
            upto: st.synced,
            failed: st.failed.clone(),
        });
        self.changed.notify_all();
        st
    }
}

/// The syncer thread: syncs as soon as someone waits, or [`LAZY_SYNC`] after an unwaited record.
fn syncer(me: std::sync::Weak<Auditor>) {
    let Some(a) = me.upgrade() else { return };
    let mut st = a.state.lock().expect("audit sync lock");
    loop {
        if st.failed.is_some() || (st.stop && st.written <= st.synced) {
            return;
        }
        if st.syncing {
            st = a.changed.wait(st).expect("audit sync lock");
            continue;
        }
        let behind = st.written > st.synced;
        if behind && (st.wanted > st.synced || st.stop) {
            // Group commit: appends already under way (other requests writing their records)
            // are worth waiting a moment for: the same sync then covers them.
            let until = Instant::now() + GATHER;
            while st.appending > 0 && !st.stop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st.gathering = true;
                st = a.changed.wait_timeout(st, left).expect("audit sync lock").0;
            }
            st.gathering = false;
            st = a.sync_once(st);
            continue;
        }
        if behind && let Some(since) = st.lazy_since {
            let left = LAZY_SYNC.saturating_sub(since.elapsed());
            if left.is_zero() {
                st = a.sync_once(st);
                continue;
            }
            st = a.changed.wait_timeout(st, left).expect("audit sync lock").0;
            continue;
        }
        st = a.changed.wait(st).expect("audit sync lock");
    }
}

/// Runs a request handler so that its audit records raise a ticket instead of waiting; returns
/// its result and the ticket to pass to [`Auditor::durable`] before answering.
pub async fn collect_async<R>(f: impl std::future::Future<Output = R>) -> (R, u64) {
    TICKET
        .scope(Cell::new(0), async {
            let r = f.await;
            (r, TICKET.with(Cell::get))
        })
        .await
}

/// Inside [`collect_async`]: the ticket so far (records written by this request until now).
pub fn current_ticket() -> u64 {
    TICKET.try_with(Cell::get).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentkeys_state::audit::{Peer, verify};
    use agentkeys_state::home::Home;
    use std::os::unix::fs::DirBuilderExt;

    /// A fresh 0700 home under the temp dir, removed on drop.
    struct TempHome {
        home: Home,
        dir: std::path::PathBuf,
    }

    impl TempHome {
        fn new() -> TempHome {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "agentkeys-auditor-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
            TempHome {
                home: Home::at(&dir),
                dir,
            }
        }
    }

    impl Drop for TempHome {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn ev(i: usize) -> (String, Peer) {
        (format!("svc-{i}"), Peer::local(1, 2))
    }

    fn event<'a>(svc: &'a str, peer: Peer) -> Event<'a> {
        Event {
            event: "deliver",
            who: Some(agentkeys_state::audit::Who::Owner {
                session: "s-000000000000",
            }),
            service: Some(svc),
            delivery: Some("fd"),
            degraded: false,
            peer: Some(peer),
            outcome: "ok",
            detail: None,
        }
    }

    /// Many threads appending concurrently, each waiting for durability: the chain verifies and
    /// every record is present exactly once.
    #[test]
    fn group_commit_concurrent_appends_keep_a_verifiable_chain() {
        let t = TempHome::new();
        let a = Auditor::new(AuditLog::open(&t.home).unwrap()).unwrap();
        let threads = 8;
        let per = 200;
        let hs: Vec<_> = (0..threads)
            .map(|n| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        let (svc, peer) = ev(n * 1000 + i);
                        let need = if i % 3 == 0 {
                            Need::Lazy
                        } else {
                            Need::Durable
                        };
                        a.append(&event(&svc, peer), need).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        a.flush().unwrap();
        let path = t.home.path(agentkeys_state::audit::AUDIT_FILE);
        let report = verify(&path).unwrap();
        assert!(report.first_bad.is_none(), "{:?}", report.first_bad);
        assert_eq!(report.records, (threads * per) as u64);
        let mut seen: Vec<String> = agentkeys_state::audit::read_records(&path)
            .unwrap()
            .map(|r| r.unwrap().1.service.unwrap())
            .collect();
        seen.sort();
        let mut want: Vec<String> = (0..threads)
            .flat_map(|n| (0..per).map(move |i| ev(n * 1000 + i).0))
            .collect();
        want.sort();
        assert_eq!(seen, want);
        a.stop();
    }

    /// A durable append outside a request returns only once a sync covered it; inside a request
    /// scope the ticket is the offset past the request's last record and `durable` covers it.
    #[test]
    fn durable_waits_cover_the_ticket() {
        let t = TempHome::new();
        let a = Auditor::new(AuditLog::open(&t.home).unwrap()).unwrap();
        let (svc, peer) = ev(1);
        a.append(&event(&svc, peer), Need::Durable).unwrap();
        {
            let st = a.state.lock().unwrap();
            assert!(st.synced >= st.written && st.written > 0);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ticket = rt.block_on(async {
            let ((), ticket) = collect_async(async {
                a.append(&event("inside", peer), Need::Durable).unwrap();
                a.append(&event("inside2", peer), Need::Lazy).unwrap();
            })
            .await;
            a.durable(ticket).await.unwrap();
            ticket
        });
        let st = a.state.lock().unwrap();
        assert_eq!(
            ticket, st.written,
            "the ticket is the offset past the last record"
        );
        assert!(st.synced >= ticket);
        let len = std::fs::metadata(t.home.path(agentkeys_state::audit::AUDIT_FILE))
            .unwrap()
            .len();
        assert_eq!(len, ticket);
        drop(st);
        a.stop();
    }

    /// Lazy records outside a request are synced by the syncer without anyone waiting.
    #[test]
    fn lazy_records_get_synced_by_the_syncer() {
        let t = TempHome::new();
        let a = Auditor::new(AuditLog::open(&t.home).unwrap()).unwrap();
        let (svc, peer) = ev(2);
        a.append(&event(&svc, peer), Need::Lazy).unwrap();
        let mut rx = a.synced_tx.subscribe();
        let written = a.state.lock().unwrap().written;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.upto >= written))
                .await
                .expect("the syncer synced the lazy record")
                .unwrap();
        });
        a.stop();
    }
}
