//! One flusher per node (per data disk): two threads that take the pending appends of every Raft
//! group, write them, make them durable together, and complete their flush callbacks.
//!
//! The write stage takes every flush request queued (each group has at most one: openraft waits
//! for an append's callback before the next append of that group) and writes each group's
//! pending entries to its log, then hands them to the sync stage and takes the next requests at
//! once. The sync stage takes everything written since its last sync (one write round or
//! several) and makes every log that needs it durable: by default one `syncfs` of the data
//! filesystem when two logs or more need it (measured on max-throughput-16p: ~25% more than an
//! fdatasync per file), or an fdatasync per log side by side on up to [`SYNCS_IN_PARALLEL_MAX`]
//! threads (`flush_sync = "fdatasync"`, for a filesystem shared with other writers); then it
//! completes the callbacks. So the next groups' writes overlap the previous groups' sync
//! (measured on max-throughput-16p, single node: 234k msg/s written then synced in turn, 315k
//! overlapped), and under load every sync carries many groups' entries.
//!
//! Topics with `fsync_policy = interval` are acknowledged once written; the flusher syncs their
//! logs every `fsync_interval_ms`. A power loss can lose what was acknowledged in the last
//! interval; a crash of the process alone loses nothing (the page cache survives it).
//!
//! A failed write or sync fails the callbacks of that group (openraft then stops the group and
//! the partition's supervisor reopens it from its durable state). A failed `syncfs` fails every
//! group it covered (the failure cannot be told apart per file); a failed fdatasync only its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::{Duration, Instant};

use openraft::storage::LogFlushed;

use super::TypeConfig;
use super::log_store::Shared;

/// Most fdatasyncs run at the same time in one round.
pub(super) const SYNCS_IN_PARALLEL_MAX: usize = 8;
/// Most flush requests taken into one round.
const ROUND_REQUESTS_MAX: usize = 4096;
/// Most write rounds waiting for the sync stage (the write stage then waits), and most taken
/// into one sync.
const WRITTEN_ROUNDS_MAX: usize = 64;

/// Whether `syncfs` reports writeback errors on the kernel of `release` (as
/// `/proc/sys/kernel/osrelease` reads): Linux 5.8 and later. Before, syncfs returned 0 after a
/// failed writeback, so acknowledged entries could be lost unseen. A release that does not
/// parse counts as older.
pub fn syncfs_reports_errors(release: &str) -> bool {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let number = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
    match (number(parts.next()), number(parts.next())) {
        (Some(major), Some(minor)) => (major, minor) >= (5, 8),
        _ => false,
    }
}

/// How a round makes several logs durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// One `syncfs` of the data filesystem for a round of two logs or more (an fdatasync for a
    /// lone log). Fastest on a filesystem that holds the broker's data alone (a volume of its
    /// own); it also syncs whatever else was written to that filesystem. Writeback errors are
    /// reported through it on Linux 5.8 and later.
    Syncfs,
    /// An fdatasync per log, run side by side on a pool of threads.
    Fdatasync,
}

struct Request {
    shared: Arc<Shared>,
    callback: LogFlushed<TypeConfig>,
}

/// The handle to a node's flusher (its write and sync stages, each a thread). Cloned into every
/// group's log store; the threads end once every handle is dropped (after a last sync of what
/// interval-policy groups left unsynced).
#[derive(Debug, Clone)]
pub struct Flusher {
    requests: Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("group", &self.shared.group)
            .finish()
    }
}

impl Flusher {
    /// Starts the flusher's threads. The queue is bounded by the number of groups (one request per
    /// group at most), so it takes no size.
    pub fn start(mode: SyncMode) -> std::io::Result<Flusher> {
        let (requests, queue) = mpsc::channel();
        let (to_sync, written) = mpsc::sync_channel(WRITTEN_ROUNDS_MAX);
        std::thread::Builder::new()
            .name("weft-syncer".into())
            .spawn(move || {
                let _stop = StopOnPanic("sync stage");
                sync_stage(written, mode)
            })?;
        std::thread::Builder::new()
            .name("weft-flusher".into())
            .spawn(move || {
                let _stop = StopOnPanic("write stage");
                write_stage(queue, to_sync)
            })?;
        Ok(Flusher { requests })
    }

    /// Asks for `shared`'s pending entries to be written and made durable; `callback` is
    /// completed when they are (or when that failed).
    pub(super) fn flush(
        &self,
        shared: Arc<Shared>,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), String> {
        self.requests
            .send(Request { shared, callback })
            .map_err(|_| "the flusher has stopped".to_string())
    }
}

/// Ends the process when the flusher thread it lives in panics. Without that thread no entry
/// of any group becomes durable again: every partition would stop taking writes while the
/// broker went on answering as if alive. Ended, it is restarted (by Kubernetes, or systemd)
/// and recovers from its data directory; nothing acknowledged is lost, since an entry is
/// acknowledged only once synced.
struct StopOnPanic(&'static str);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let message = format!(
                "the flusher's {} panicked: no write can be made durable any more; the broker stops (started again, it recovers from its data directory)",
                self.0
            );
            tracing::error!("{message}");
            eprintln!("{message}");
            std::process::abort();
        }
    }
}

/// A group whose log holds written, unsynced entries acknowledged under the interval policy.
struct Unsynced {
    shared: Arc<Shared>,
    due: Instant,
}

/// What the write stage hands to the sync stage: requests whose entries it wrote (or failed
/// to), in the order they came.
struct Written {
    requests: Vec<Request>,
    outcomes: Vec<Result<(), String>>,
    started: Instant,
}

/// The write stage: takes every flush request queued, writes each group's pending entries,
/// and hands them to the sync stage; then takes the next requests while that stage syncs.
/// Once every handle is dropped it tells the sync stage to close (that stage then syncs what
/// is left and ends).
fn write_stage(queue: Receiver<Request>, to_sync: SyncSender<Option<Written>>) {
    // Tests: the write stage panics at its first round once this file exists.
    let panic_on = std::env::var_os("WEFT_TEST_FLUSHER_PANIC_FILE")
        .filter(|path| !path.is_empty())
        .map(std::path::PathBuf::from);
    while let Ok(request) = queue.recv() {
        if panic_on.as_ref().is_some_and(|file| file.exists()) {
            panic!("WEFT_TEST_FLUSHER_PANIC_FILE: the write stage panics, as a test asked");
        }
        let mut requests = vec![request];
        while requests.len() < ROUND_REQUESTS_MAX {
            match queue.try_recv() {
                Ok(request) => requests.push(request),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        // One after another: side by side measured no faster, the device's bandwidth being the
        // limit while they run.
        let outcomes = requests.iter().map(|r| r.shared.write_pending()).collect();
        metrics::histogram!("weft_flush_write_seconds").record(started.elapsed().as_secs_f64());
        let written = Written {
            requests,
            outcomes,
            started,
        };
        if let Err(mpsc::SendError(Some(written))) = to_sync.send(Some(written)) {
            // The sync stage is gone (it panicked): nothing written is reported durable.
            fail(written, "the flusher's sync stage has stopped");
            return;
        }
    }
    let _ = to_sync.send(None);
}

/// Fails every callback of `written`.
fn fail(written: Written, why: &str) {
    for request in written.requests {
        request
            .callback
            .log_io_completed(Err(std::io::Error::other(why.to_string())));
    }
}

/// The sync stage: takes everything written since its last sync (one write round or several),
/// makes it durable together, and completes the callbacks; syncs interval-policy logs when due.
fn sync_stage(written: Receiver<Option<Written>>, mut mode: SyncMode) {
    let mut unsynced: HashMap<usize, Unsynced> = HashMap::new();
    let pool = match Pool::start(SYNCS_IN_PARALLEL_MAX - 1) {
        Ok(pool) => Some(pool),
        Err(e) => {
            tracing::warn!("no sync threads ({e}): the flusher syncs one file at a time");
            None
        }
    };
    loop {
        let wait = unsynced
            .values()
            .map(|u| u.due.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(Duration::from_secs(3600));
        let mut rounds = Vec::new();
        let mut closing = false;
        match written.recv_timeout(wait) {
            Ok(Some(round)) => rounds.push(round),
            Ok(None) | Err(RecvTimeoutError::Disconnected) => closing = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
        while !closing && rounds.len() < WRITTEN_ROUNDS_MAX {
            match written.try_recv() {
                Ok(Some(round)) => rounds.push(round),
                Ok(None) => closing = true,
                Err(_) => break,
            }
        }
        if sync_round(rounds, &mut unsynced, closing, pool.as_ref(), mode) == Synced::SyncfsFailed {
            // A writeback error reaches only the first syncfs that sees it (per open file, and
            // never a file opened after it was seen): a later round led by a file opened since
            // (a new segment) would report another log's lost pages as durable. An fdatasync
            // reports each file's own errors, whoever saw them first.
            tracing::error!(
                "syncfs failed: the flusher syncs each log with its own fdatasync from now on"
            );
            mode = SyncMode::Fdatasync;
        }
        if closing {
            return;
        }
    }
}

/// A log's identity within a round.
fn key(shared: &Arc<Shared>) -> usize {
    Arc::as_ptr(shared) as usize
}

/// How a sync round went, for the sync stage's choice of mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Synced {
    Done,
    /// A `syncfs` failed (every log it covered failed with it).
    SyncfsFailed,
}

/// One sync round over what the write stage wrote: sync, then complete.
fn sync_round(
    rounds: Vec<Written>,
    unsynced: &mut HashMap<usize, Unsynced>,
    closing: bool,
    pool: Option<&Pool>,
    mode: SyncMode,
) -> Synced {
    let started = rounds.first().map(|r| r.started);
    let mut requests = Vec::new();
    let mut written = Vec::new();
    for round in rounds {
        requests.extend(round.requests);
        written.extend(round.outcomes);
    }
    // Which logs to sync now: fsync-before-ack groups just written, and interval groups due.
    let now = Instant::now();
    // Logs by identity (a round may hold thousands of groups: no linear searches).
    let mut to_sync: Vec<Arc<Shared>> = Vec::new();
    let mut position: HashMap<usize, usize> = HashMap::new();
    let mut add = |shared: &Arc<Shared>, to_sync: &mut Vec<Arc<Shared>>| {
        position.entry(key(shared)).or_insert_with(|| {
            to_sync.push(shared.clone());
            to_sync.len() - 1
        });
    };
    for (request, outcome) in requests.iter().zip(&written) {
        // Closing: interval-policy groups are synced now too (no later round would).
        if outcome.is_ok() && (closing || request.shared.sync_interval_ms().is_none()) {
            add(&request.shared, &mut to_sync);
        }
    }
    unsynced.retain(|_, u| {
        if closing || u.due <= now || u.shared.sync_interval_ms().is_none() {
            add(&u.shared, &mut to_sync);
            false
        } else {
            true
        }
    });
    let (synced, outcome, syncs) = sync_all(&to_sync, pool, mode);
    metrics::counter!("weft_flush_fsyncs_total").increment(syncs as u64);
    if !to_sync.is_empty() {
        metrics::histogram!("weft_flush_sync_seconds").record(now.elapsed().as_secs_f64());
    }
    // Complete the callbacks, in the order the requests came.
    for (request, outcome) in requests.into_iter().zip(written) {
        let outcome = outcome.and_then(|()| {
            match position.get(&key(&request.shared)) {
                Some(&i) => synced[i].clone(),
                None => {
                    // Interval policy: acknowledged once written; synced when due.
                    if let Some(ms) = request.shared.sync_interval_ms() {
                        unsynced
                            .entry(key(&request.shared))
                            .or_insert_with(|| Unsynced {
                                shared: request.shared.clone(),
                                due: Instant::now() + Duration::from_millis(ms),
                            });
                    }
                    Ok(())
                }
            }
        });
        if let Err(e) = &outcome {
            tracing::error!(
                group = request.shared.group,
                "log write or sync failed: {e}"
            );
        }
        request
            .callback
            .log_io_completed(outcome.map_err(std::io::Error::other));
    }
    if !to_sync.is_empty() {
        metrics::counter!("weft_flush_rounds_total").increment(1);
        if let Some(started) = started {
            metrics::histogram!("weft_flush_round_seconds").record(started.elapsed().as_secs_f64());
        }
    }
    outcome
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run the flusher's fdatasyncs, so that one round's syncs run side by side (threads
/// started once, not per round).
struct Pool {
    jobs: Sender<Job>,
}

impl Pool {
    fn start(threads: usize) -> std::io::Result<Pool> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for n in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("weft-sync-{n}"))
                .spawn(move || {
                    loop {
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        job();
                    }
                })?;
        }
        Ok(Pool { jobs })
    }
}

/// Runs `work` on every item side by side: the calling thread takes the first item, the pool
/// the others (the calling thread all of them without a pool). The outcomes, in order; None for
/// a job that ended without one (it panicked).
fn side_by_side<I, T>(pool: Option<&Pool>, items: Vec<I>, work: fn(I) -> T) -> Vec<Option<T>>
where
    I: Send + 'static,
    T: Send + 'static,
{
    let mut items = items.into_iter();
    let Some(first) = items.next() else {
        return Vec::new();
    };
    let (reply, replies) = mpsc::channel::<(usize, T)>();
    let mut outcomes: Vec<Option<T>> = Vec::new();
    outcomes.push(None);
    for (i, item) in items.enumerate() {
        let i = i + 1;
        outcomes.push(None);
        let reply = reply.clone();
        let job: Job = Box::new(move || {
            let _ = reply.send((i, work(item)));
        });
        match pool {
            Some(pool) => {
                if let Err(mpsc::SendError(job)) = pool.jobs.send(job) {
                    job();
                }
            }
            None => job(),
        }
    }
    outcomes[0] = Some(work(first));
    drop(reply);
    // Bounded: one reply per job, and the channel ends once every job has run or been dropped.
    for (i, outcome) in replies.iter() {
        outcomes[i] = Some(outcome);
    }
    outcomes
}

/// Syncs every log: with [`SyncMode::Syncfs`], one `syncfs` per filesystem holding two logs or
/// more; otherwise an fdatasync per log, side by side (the flusher's thread runs the first
/// itself, the pool the others). The outcome per log, in order, and the syncs made.
fn sync_all(
    logs: &[Arc<Shared>],
    pool: Option<&Pool>,
    mode: SyncMode,
) -> (Vec<Result<(), String>>, Synced, usize) {
    // Prepare each log's sync under its lock; the fdatasync itself runs outside it.
    let mut tickets: Vec<Result<Option<weft_storage::SyncTicket>, String>> = logs
        .iter()
        .map(|shared| {
            let log = shared.log().map_err(|e| e.to_string())?;
            log.begin_sync().map_err(|e| e.to_string())
        })
        .collect();
    let mut outcomes: Vec<Option<weft_storage::Result<()>>> =
        tickets.iter().map(|_| None).collect();
    let mut syncfs_failed = false;
    let mut syncs = 0;
    if mode == SyncMode::Syncfs {
        // One syncfs per filesystem that holds two logs or more of the round: a syncfs makes
        // only its own filesystem durable, and the data directory's parts may be other mounts
        // (the topics on a volume of their own, say). A log alone on its filesystem, or whose
        // filesystem is unknown, gets its own fdatasync below.
        let mut by_device: std::collections::BTreeMap<u64, Vec<usize>> =
            std::collections::BTreeMap::new();
        for (i, ticket) in tickets.iter().enumerate() {
            if let Ok(Some(ticket)) = ticket
                && let Ok(device) = ticket.device()
            {
                by_device.entry(device).or_default().push(i);
            }
        }
        for members in by_device.values().filter(|m| m.len() >= 2) {
            let outcome = match &tickets[members[0]] {
                Ok(Some(t)) => t.sync_filesystem(),
                _ => Ok(()),
            };
            for &i in members {
                if let Ok(Some(t)) = &tickets[i] {
                    t.covered();
                }
                outcomes[i] = Some(outcome.clone());
            }
            syncs += 1;
            syncfs_failed |= outcome.is_err();
        }
    }
    let synced_by = if syncfs_failed {
        Synced::SyncfsFailed
    } else {
        Synced::Done
    };
    let live: Vec<(usize, weft_storage::SyncTicket)> = tickets
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| outcomes[*i].is_none())
        .filter_map(|(i, slot)| match std::mem::replace(slot, Ok(None)) {
            Ok(Some(ticket)) => Some((i, ticket)),
            other => {
                *slot = other;
                None
            }
        })
        .collect();
    let indices: Vec<usize> = live.iter().map(|(i, _)| *i).collect();
    let synced = side_by_side(pool, live, |(i, ticket)| {
        let outcome = ticket.sync();
        (i, ticket, outcome)
    });
    for (&i, done) in indices.iter().zip(synced) {
        match done {
            Some((_, ticket, outcome)) => {
                outcomes[i] = Some(outcome);
                tickets[i] = Ok(Some(ticket));
            }
            // Never reported durable: the sync did not run to its end.
            None => tickets[i] = Err("the log's sync did not run".into()),
        }
    }
    syncs += indices.len();
    (finish(logs, tickets, outcomes), synced_by, syncs)
}

/// Reports each sync's outcome to its log.
fn finish(
    logs: &[Arc<Shared>],
    tickets: Vec<Result<Option<weft_storage::SyncTicket>, String>>,
    outcomes: Vec<Option<weft_storage::Result<()>>>,
) -> Vec<Result<(), String>> {
    logs.iter()
        .zip(tickets)
        .zip(outcomes)
        .map(|((shared, ticket), outcome)| match ticket {
            Err(e) => Err(e),
            Ok(None) => Ok(()),
            Ok(Some(ticket)) => {
                let outcome = outcome.unwrap_or_else(|| {
                    Err(weft_storage::Error::Poisoned("sync did not run".into()))
                });
                let mut log = shared.log_mut().map_err(|e| e.to_string())?;
                log.complete_sync(&ticket, outcome)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .collect()
}

#[cfg(test)]
mod syncfs_tests {
    use super::syncfs_reports_errors;

    /// syncfs is trusted only where it reports writeback errors (Linux 5.8 and later): on an
    /// older kernel the flusher syncs each log with its own fdatasync.
    #[test]
    fn syncfs_is_trusted_from_linux_5_8() {
        for release in ["5.8.0", "5.10.0-28-amd64", "6.1.0-13-cloud-amd64", "10.0"] {
            assert!(syncfs_reports_errors(release), "{release}");
        }
        for release in [
            "4.18.0-553.el8_10.x86_64",
            "5.4.0-42-generic",
            "4.14.336-257.562.amzn2.x86_64",
            "5.7.19",
            "",
            "unknown",
        ] {
            assert!(!syncfs_reports_errors(release), "{release}");
        }
    }
}

#[cfg(test)]
mod sync_tests {
    use super::{SyncMode, sync_all};
    use std::os::unix::fs::MetadataExt;

    /// A `syncfs` makes only its own filesystem durable. Two logs of a round on two filesystems
    /// (the topics on a volume of their own, the controller's log on another) each get their
    /// own sync. Before, the round's first log's filesystem was synced and both were reported
    /// durable: acknowledged records on the other filesystem were never synced.
    #[test]
    fn one_syncfs_never_covers_logs_on_two_filesystems() {
        let memory = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
        let disk = tempfile::tempdir().expect("temp dir");
        let device = |dir: &tempfile::TempDir| std::fs::metadata(dir.path()).expect("stat").dev();
        assert_ne!(
            device(&memory),
            device(&disk),
            "the test needs /dev/shm and the temp dir on two filesystems"
        );
        let (_a, on_memory) = super::super::log_store::tests::unsynced_store(memory.path(), 3);
        let (_b, on_disk) = super::super::log_store::tests::unsynced_store(disk.path(), 3);
        let (_c, on_disk_too) =
            super::super::log_store::tests::unsynced_store(&disk.path().join("other"), 3);
        let logs = [on_memory, on_disk, on_disk_too];
        let (outcomes, _, syncs) = sync_all(&logs, None, SyncMode::Syncfs);
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        // One syncfs for the two logs on the disk, an fdatasync for the one in memory.
        assert_eq!(syncs, 2);
        for log in &logs {
            let log = log.log().expect("log");
            assert_eq!(log.durable(), log.end());
        }
    }
}
