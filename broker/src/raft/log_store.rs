//! openraft's `RaftLogStorage` over a segment-store `PartitionLog`: the Raft log of a partition is
//! the partition's data, written once.
//!
//! Write-behind with one flusher per node: `append` stamps the entries' offsets, keeps them in
//! memory (readable at once, as openraft requires) and hands them with the flush callback to the
//! node's [`Flusher`]. Its write stage writes the pending entries of every group that has some;
//! its sync stage makes them durable together (one `syncfs`, or fdatasyncs side by side), then
//! completes the callbacks. openraft waits for each append's callback before the next append of
//! the same group, so a group has at most one append pending; many groups share each round.
//!
//! No blocking I/O runs on the async runtime: writes and syncs run on the flusher's threads;
//! truncation, purges and metadata writes on the blocking pool. Readers (replication, the state
//! machine, consumers) take the log's read lock; only writes take the write lock, briefly (a
//! write to the page cache; the fdatasync runs outside the lock).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, OptionalSend, StorageIOError, Vote};
use weft_storage::{Batch, FsyncPolicy, LogPosition, PartitionLog, TailCache};

use super::entry::{from_batches, to_batches};
use super::flusher::Flusher;
use super::{Entry, GroupId, LogId, NodeId, StorageError, TypeConfig};
use crate::meta::{MetaError, Metadata, RaftKey};

/// Read entries in chunks of about this many bytes.
const READ_CHUNK_BYTES: usize = 4 << 20;
/// Damaged ranges before a log's last entry that an open maps and reads past, at most, to find
/// that entry (each in the last index interval: a few at most in practice).
const DAMAGE_BEFORE_LAST_RETRIES: usize = 16;
/// Bytes of entries after which replication's read for one AppendEntries stops (the entry that
/// reaches it is the last: a call carries up to this plus one entry): a replica catching up
/// gets many small entries a call.
pub(crate) const APPEND_BYTES_MAX: usize = 8 << 20;
/// Written entries kept in memory for the state machine to apply.
const RECENT_ENTRIES_MAX: usize = 4;
/// Larger entries are read back from the file when applied.
const RECENT_ENTRY_BYTES_MAX: usize = 8 << 20;

/// A group's log as the log store, its readers and the flusher share it.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) group: GroupId,
    log: RwLock<PartitionLog>,
    meta: Metadata,
    /// Entries at or below this index are purged: never returned.
    last_purged: Mutex<Option<LogId>>,
    /// The purge recorded in the metadata store (behind `last_purged` while a purge waits for
    /// a snapshot: see [`PurgeGate`]).
    purged_on_disk: Mutex<Option<LogId>>,
    /// Entries (each one or more batches) appended by Raft and not yet written to the log.
    pending: Mutex<VecDeque<Vec<Batch>>>,
    /// The last entries written, kept until the state machine reads them to apply them (a
    /// moment after they are flushed), so applying does not read them back from the file.
    recent: Mutex<VecDeque<Vec<Batch>>>,
    /// The last entry, written or pending.
    last_log_id: Mutex<Option<LogId>>,
    /// 0: the flush callback waits for an fdatasync (fsync before ack); otherwise the log is
    /// synced every this many milliseconds and callbacks complete once entries are written.
    sync_interval_ms: AtomicU64,
    /// The log's tail cache, for consumers' reads without the log's lock.
    tail: TailCache,
    /// Set when a snapshot was installed over a log that was filled with the entries before
    /// it (fetched from the leader): the purge openraft then asks for through the snapshot
    /// only records that those entries are out of Raft's reach, and keeps them on disk.
    keep_through: Mutex<Option<u64>>,
    /// How far the log is known committed, as saved (see `save_committed`).
    committed: Mutex<CommittedSave>,
    /// Purges wait for a durable snapshot that covers them (see [`LogReader::track_snapshots`]).
    purge_gate: Mutex<PurgeGate>,
    /// One purge at a time (a deferred one and a later one may otherwise run together).
    purging: Mutex<()>,
}

/// Purges held back until the state machine's snapshot file covers them.
#[derive(Debug, Default)]
struct PurgeGate {
    /// Whether the state machine reports its durable snapshots; until it does, purges run at once.
    tracking: bool,
    /// The last index the durable snapshot covers.
    snapshot_through: Option<u64>,
    /// The latest purge asked for past it, held back.
    deferred: Option<LogId>,
}

/// The saving of the committed index: when it was last saved, what, and the newer one
/// waiting for its turn (saved by a timer, so the last commit before a quiet spell is saved).
#[derive(Debug, Default)]
struct CommittedSave {
    at: Option<std::time::Instant>,
    saved: Option<u64>,
    waiting: Option<LogId>,
    timer: bool,
    /// The group closed: nothing more is saved (its Raft state may be deleted next).
    closed: bool,
}

/// Shortest time between two saves of a group's committed index.
const COMMITTED_SAVE_EVERY: Duration = Duration::from_secs(1);

impl Shared {
    /// Saves `committed` now (without a sync of its own: sled's flusher writes it out), under
    /// the lock, so an older index never lands after a newer one; not once the group closed.
    fn write_committed(&self, committed: LogId) -> Result<(), StorageError> {
        let mut c = self
            .committed
            .lock()
            .map_err(|_| io_error("committed index lock poisoned"))?;
        if c.closed || c.saved.is_some_and(|saved| saved >= committed.index) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&committed)
            .map_err(|e| StorageError::from(StorageIOError::write_logs(AnyError::new(&e))))?;
        self.meta
            .set_raft_unsynced(self.group, RaftKey::Committed, &bytes)
            .map_err(|e| meta_error(&e))?;
        c.saved = Some(committed.index);
        Ok(())
    }

    /// The timer's turn (or the group's close): saves the committed index that waited, if
    /// any.
    fn write_waiting_committed(&self) {
        let waiting = match self.committed.lock() {
            Ok(mut c) => {
                c.timer = false;
                let waiting = c.waiting.take();
                if waiting.is_some() {
                    c.at = Some(std::time::Instant::now());
                }
                waiting
            }
            Err(_) => None,
        };
        if let Some(committed) = waiting
            && let Err(e) = self.write_committed(committed)
        {
            tracing::warn!(group = self.group, "cannot save the committed index: {e}");
        }
    }
}

/// Groups batches read from the log into entries (the batches of one frame share a Raft index).
fn entries_of(batches: &[Batch]) -> Result<Vec<Entry>, StorageError> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < batches.len() {
        let index = batches[start].header().index;
        let end = start
            + batches[start..]
                .iter()
                .take_while(|b| b.header().index == index)
                .count();
        out.push(from_batches(&batches[start..end])?);
        start = end;
    }
    Ok(out)
}

pub(super) fn log_id_of(batch: &Batch) -> LogId {
    let h = batch.header();
    LogId::new(openraft::CommittedLeaderId::new(h.term, 0), h.index)
}

impl Shared {
    pub(super) fn log(&self) -> Result<RwLockReadGuard<'_, PartitionLog>, StorageError> {
        self.log
            .read()
            .map_err(|_| io_error("partition log lock poisoned"))
    }

    pub(super) fn log_mut(&self) -> Result<RwLockWriteGuard<'_, PartitionLog>, StorageError> {
        self.log
            .write()
            .map_err(|_| io_error("partition log lock poisoned"))
    }

    fn last_purged(&self) -> Option<LogId> {
        self.last_purged.lock().map(|g| *g).unwrap_or(None)
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.last_log_id.lock().map(|g| *g).unwrap_or(None)
    }

    fn set_last_log_id(&self, id: Option<LogId>) {
        if let Ok(mut last) = self.last_log_id.lock() {
            *last = id;
        }
    }

    /// The sync interval, or None for fsync before ack.
    pub(super) fn sync_interval_ms(&self) -> Option<u64> {
        match self.sync_interval_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// Writes the pending entries to the log (page cache). Called by the flusher's write stage
    /// (the log's only writer).
    pub(super) fn write_pending(&self) -> Result<(), String> {
        let entries: Vec<Vec<Batch>> = match self.pending.lock() {
            Ok(pending) => pending.iter().cloned().collect(),
            Err(_) => return Err("pending entries lock poisoned".into()),
        };
        if entries.is_empty() {
            return Ok(());
        }
        let mut log = self.log_mut().map_err(|e| e.to_string())?;
        for entry in &entries {
            // A segment roll syncs the sealed segment and creates the next: without the lock, so
            // consumers' reads never wait behind those syncs (this thread is the only writer).
            if let Some(roll) = log.prepare_roll(entry).map_err(|e| e.to_string())? {
                drop(log);
                let prepared = roll.run();
                log = self.log_mut().map_err(|e| e.to_string())?;
                log.finish_roll(roll, prepared).map_err(|e| e.to_string())?;
            }
            log.append_entry(entry).map_err(|e| e.to_string())?;
        }
        drop(log);
        if let Ok(mut pending) = self.pending.lock() {
            pending.drain(..entries.len());
        }
        if let Ok(mut recent) = self.recent.lock() {
            for entry in entries {
                let bytes: usize = entry.iter().map(Batch::len).sum();
                if bytes <= RECENT_ENTRY_BYTES_MAX {
                    recent.push_back(entry);
                } else {
                    // Kept out: the entries kept stay a run without gaps (`take_recent`).
                    recent.clear();
                }
            }
            while recent.len() > RECENT_ENTRIES_MAX {
                recent.pop_front();
            }
        }
        Ok(())
    }

    /// Takes the entries `start .. end` from the recently written ones, if they are all there.
    fn take_recent(&self, start: u64, end: u64) -> Option<Vec<Vec<Batch>>> {
        let mut recent = self.recent.lock().ok()?;
        let first = recent.front()?.first()?.header().index;
        let last = recent.back()?.first()?.header().index;
        if start < first || end > last + 1 || start >= end {
            return None;
        }
        // Applied now: no one reads them from here again. Moved out, not cloned; entries before
        // `start` were read already, those from `end` on stay.
        let index = |e: &Vec<Batch>| e.first().map_or(0, |b| b.header().index);
        let keep_from = recent.partition_point(|e| index(e) < end);
        // Every entry of the range, or none (openraft checks only the first and the last).
        let from = recent.partition_point(|e| index(e) < start);
        if u64::try_from(keep_from - from).ok() != Some(end - start) {
            return None;
        }
        let rest = recent.split_off(keep_from);
        let taken: Vec<Vec<Batch>> = std::mem::replace(&mut *recent, rest)
            .into_iter()
            .filter(|e| index(e) >= start)
            .collect();
        Some(taken)
    }

    fn record_purged(&self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&log_id)
            .map_err(|e| StorageError::from(StorageIOError::write_logs(AnyError::new(&e))))?;
        self.meta
            .set_raft(self.group, RaftKey::LastPurged, &bytes)
            .map_err(|e| meta_error(&e))?;
        if let Ok(mut purged) = self.purged_on_disk.lock() {
            *purged = Some(log_id);
        }
        self.purge_in_memory(log_id);
        Ok(())
    }

    /// Entries through `log_id` are out of Raft's reach from now on (never read, never held
    /// in memory), whatever the disk holds yet.
    fn purge_in_memory(&self, log_id: LogId) {
        if let Ok(mut purged) = self.last_purged.lock() {
            *purged = (*purged).max(Some(log_id));
        }
        if let Ok(mut recent) = self.recent.lock() {
            recent.retain(|e| e.first().is_some_and(|b| b.header().index > log_id.index));
        }
        if let Ok(mut last) = self.last_log_id.lock()
            && *last < Some(log_id)
        {
            *last = Some(log_id);
        }
    }

    /// Entries `start .. end`: from the log, then from the pending ones not yet written.
    fn read(&self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        self.read_limited(start, end, usize::MAX)
            .map(|(entries, _)| entries)
    }

    /// Entries `start .. end`, stopping after the first whose batches take the total to
    /// `max_bytes` or beyond (at least one entry when the range holds one), and their bytes.
    fn read_limited(
        &self,
        start: u64,
        end: u64,
        max_bytes: usize,
    ) -> Result<(Vec<Entry>, usize), StorageError> {
        let mut bytes = 0usize;
        let start = match self.last_purged() {
            Some(purged) => start.max(purged.index + 1),
            None => start,
        };
        let mut out: Vec<Entry> = Vec::new();
        let mut from = start;
        let mut retried_at = None;
        // The flusher may write (and drain from the pending ones) the entries at `from` between
        // the log read and the pending lock: the log is then read again (a short answer would
        // stop a group that applies them). Bounded: each pass finds them written.
        for pass in 0.. {
            while from < end {
                let batches = {
                    let log = self.log()?;
                    let written_end = log.end().next_index;
                    if from >= written_end {
                        break;
                    }
                    let first = log.first_index().unwrap_or(written_end);
                    if from < first {
                        // Purged physically: start at what is there.
                        from = first;
                        if from >= end {
                            break;
                        }
                    }
                    let chunk = READ_CHUNK_BYTES.min(max_bytes.saturating_sub(bytes)).max(1);
                    match log.read_entries(from, end.min(written_end), chunk) {
                        Ok(batches) => batches,
                        Err(error @ weft_storage::Error::Corruption { .. }) => {
                            drop(log);
                            let range = self
                                .log_mut()?
                                .map_damage(from)
                                .map_err(|e| read_error(from, &e))?;
                            match range {
                                // Never for the controller: its state machine must apply every
                                // entry (its damaged entries are repaired before it starts).
                                Some(range)
                                    if range.first_index <= from
                                        && from < range.next_index
                                        && self.group != super::CONTROLLER_GROUP =>
                                {
                                    // Damaged entries: stand-ins move the state machine past them.
                                    let until = range.next_index.min(end).min(written_end);
                                    let term = range
                                        .term
                                        .or(out.last().map(|e| e.log_id.leader_id.term))
                                        .unwrap_or(0);
                                    for index in from..until {
                                        out.push(Entry {
                                            log_id: LogId::new(
                                                openraft::CommittedLeaderId::new(term, 0),
                                                index,
                                            ),
                                            payload: openraft::EntryPayload::Normal(
                                                super::Command::Lost {
                                                    next_offset: range.next_offset,
                                                },
                                            ),
                                        });
                                    }
                                    from = until;
                                    continue;
                                }
                                // The damage lies before `from` and intact entries resume before it:
                                // reads now start where they resume.
                                _ if retried_at != Some(from) => {
                                    retried_at = Some(from);
                                    continue;
                                }
                                _ => return Err(read_error(from, &error)),
                            }
                        }
                        Err(error) => return Err(read_error(from, &error)),
                    }
                };
                let Some(last) = batches.last() else { break };
                from = last.header().index + 1;
                bytes = bytes.saturating_add(batches.iter().map(Batch::len).sum());
                out.extend(entries_of(&batches)?);
                if bytes >= max_bytes {
                    return Ok((out, bytes));
                }
            }
            if from < end
                && let Ok(pending) = self.pending.lock()
            {
                // Only entries that continue what was read (the ones at `from` may have been
                // written and drained meanwhile: see above).
                for entry in pending.iter() {
                    let index = entry.first().map_or(0, |b| b.header().index);
                    if index < from {
                        continue;
                    }
                    if index != from || index >= end || bytes >= max_bytes {
                        break;
                    }
                    bytes = bytes.saturating_add(entry.iter().map(Batch::len).sum());
                    out.push(from_batches(entry)?);
                    from = index + 1;
                }
            }
            if from >= end || bytes >= max_bytes || pass >= 3 {
                break;
            }
            if self.log()?.end().next_index <= from {
                break;
            }
        }
        Ok((out, bytes))
    }
}

fn io_error(message: &str) -> StorageError {
    StorageIOError::write_logs(AnyError::error(message)).into()
}

fn read_error(index: u64, error: &weft_storage::Error) -> StorageError {
    StorageIOError::read_log_at_index(index, AnyError::new(error)).into()
}

fn meta_error(error: &MetaError) -> StorageError {
    StorageIOError::write_logs(AnyError::new(error)).into()
}

fn write_error(error: &weft_storage::Error) -> StorageError {
    StorageIOError::write_logs(AnyError::new(error)).into()
}

fn join_error(error: tokio::task::JoinError) -> StorageError {
    io_error(&format!("blocking storage task failed: {error}"))
}

/// Runs blocking storage work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(join_error)?
}

/// The Raft log store of one group.
#[derive(Debug)]
pub struct LogStore {
    shared: Arc<Shared>,
    flusher: Flusher,
}

/// A cloneable reader of a group's log, for replication, the state machine and consumers.
#[derive(Debug)]
pub struct LogReader {
    shared: Arc<Shared>,
    /// The broker-wide budget of bytes read for followers far behind ([`catch_up_budget`]).
    budget: Arc<tokio::sync::Semaphore>,
    /// Replication's reader of a follower far behind: its share of the budget for the entries
    /// it last read, held until openraft asks for more (one AppendEntries in flight per
    /// follower: by then the last was answered or abandoned) and at most [`CATCH_UP_HOLD`].
    held: Arc<Mutex<Held>>,
}

/// A share of the catch-up budget, and which read took it.
#[derive(Debug, Default)]
struct Held {
    read: u64,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Clone for LogReader {
    fn clone(&self) -> Self {
        LogReader {
            shared: self.shared.clone(),
            budget: self.budget.clone(),
            held: Arc::default(),
        }
    }
}

/// Bytes of entries read for followers far behind, over every group of this broker, that may
/// be held at once (waiting to go, or on their way): a broker coming back behind in many
/// partitions is sent this much at a time at full speed, not [`APPEND_BYTES_MAX`] for each.
const CATCH_UP_BYTES_MAX: usize = 8 * APPEND_BYTES_MAX;

/// What a read for a follower far behind takes when the budget is spent (without a share of
/// it: replication never waits for the budget, so heartbeats keep going).
const CATCH_UP_FALLBACK_BYTES: usize = 256 << 10;

/// Longest a reader holds its share after a read. An AppendEntries is abandoned after one
/// heartbeat interval (500 ms by default), and the batcher then drops its bytes.
const CATCH_UP_HOLD: Duration = Duration::from_secs(2);

/// The broker-wide budget of [`CATCH_UP_BYTES_MAX`], in KiB.
fn catch_up_budget() -> Arc<tokio::sync::Semaphore> {
    static BUDGET: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    BUDGET
        .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(CATCH_UP_BYTES_MAX >> 10)))
        .clone()
}

impl LogStore {
    /// Wraps an opened log; `flusher` makes its appends durable.
    pub fn new(
        group: GroupId,
        log: PartitionLog,
        meta: Metadata,
        flusher: Flusher,
    ) -> Result<LogStore, StorageError> {
        let last_purged = meta
            .raft(group, RaftKey::LastPurged)
            .map_err(|e| StorageError::from(StorageIOError::read_logs(AnyError::new(&e))))?
            .map(|bytes| serde_json::from_slice::<LogId>(&bytes))
            .transpose()
            .map_err(|e| StorageError::from(StorageIOError::read_logs(AnyError::new(&e))))?;
        let mut log = log;
        let last_in_log = match log.first_index() {
            Some(_) => {
                let end = log.end().next_index;
                let mut read = log.read_entries(end - 1, end, 1);
                // The read walks from the index point before the last entry and may run into
                // damage before that entry: mapped, the damage gets an index point where intact
                // frames resume, and the read is tried again from there (each pass maps another
                // range, closer to the end).
                for _ in 0..DAMAGE_BEFORE_LAST_RETRIES {
                    if !matches!(read, Err(weft_storage::Error::Corruption { .. })) {
                        break;
                    }
                    match log.map_damage(end - 1) {
                        Ok(Some(range)) if range.next_index < end => {
                            read = log.read_entries(end - 1, end, 1);
                        }
                        _ => break,
                    }
                }
                match read {
                    Ok(batches) => batches.first().map(log_id_of),
                    // The last entries are damaged (found only now when the log was closed
                    // cleanly: its tail was not scanned). Their terms are unknown, and this
                    // replica must claim no log it does not hold: they are cut, as the damaged
                    // end of a log that was not closed cleanly is (`storage/FORMAT.md`). A log
                    // then shorter than its known commit is filled from the other replicas
                    // before this one votes (`fill_missing_tail`).
                    Err(error @ weft_storage::Error::Corruption { .. }) => {
                        let Some(range) = log
                            .map_damage(end - 1)
                            .map_err(|e| read_error(end - 1, &e))?
                            .filter(|range| range.next_index >= end)
                        else {
                            return Err(read_error(end - 1, &error));
                        };
                        tracing::error!(
                            group,
                            first_index = range.first_index,
                            end,
                            "the last entries of a log closed cleanly are damaged: cut, to be \
                             fetched again from the other replicas: {error}"
                        );
                        log.truncate_from_index(range.first_index)
                            .map_err(|e| read_error(range.first_index, &e))?;
                        let end = log.end().next_index;
                        match log.first_index() {
                            Some(first) if first < end => log
                                .read_entries(end - 1, end, 1)
                                .map_err(|e| read_error(end - 1, &e))?
                                .first()
                                .map(log_id_of),
                            _ => None,
                        }
                    }
                    Err(error) => return Err(read_error(end - 1, &error)),
                }
            }
            None => None,
        };
        let sync_interval_ms = match log.config().fsync {
            FsyncPolicy::Always => 0,
            FsyncPolicy::Interval { interval_ms } => interval_ms.max(1),
        };
        let tail = log.tail_cache();
        let shared = Arc::new(Shared {
            tail,
            group,
            log: RwLock::new(log),
            meta,
            last_purged: Mutex::new(last_purged),
            purged_on_disk: Mutex::new(last_purged),
            pending: Mutex::new(VecDeque::new()),
            recent: Mutex::new(VecDeque::new()),
            last_log_id: Mutex::new(last_in_log),
            sync_interval_ms: AtomicU64::new(sync_interval_ms),
            keep_through: Mutex::new(None),
            committed: Mutex::default(),
            purge_gate: Mutex::default(),
            purging: Mutex::new(()),
        });
        Ok(LogStore { shared, flusher })
    }

    /// A reader sharing this store's log.
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
            budget: catch_up_budget(),
            held: Arc::default(),
        }
    }
}

impl LogReader {
    /// The id of the log's last entry (of the last purged one when it holds none).
    pub fn last_log_id(&self) -> Option<LogId> {
        self.shared.last_log_id().max(self.shared.last_purged())
    }

    /// The log's tail cache: its most recent record batches, read without the log's lock.
    pub fn tail_cache(&self) -> &TailCache {
        &self.shared.tail
    }

    /// Runs `f` with the partition log read-locked (reads by offset for consumers).
    pub fn with_log<T>(&self, f: impl FnOnce(&PartitionLog) -> T) -> Result<T, StorageError> {
        let log = self.shared.log()?;
        Ok(f(&log))
    }

    /// From now on, a purge waits until the state machine's snapshot file covers it
    /// (`through`: the last index the snapshot on disk covers now, if there is one): the state
    /// machine reports each snapshot it writes with [`LogReader::snapshot_persisted`]. Without
    /// this, a purge runs at once.
    pub fn track_snapshots(&self, through: Option<u64>) {
        let mut gate = self
            .shared
            .purge_gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        gate.tracking = true;
        gate.snapshot_through = gate.snapshot_through.max(through);
    }

    /// The state machine's snapshot file now covers the log through `index`: runs the purge
    /// held back until then, if any (blocking: it may delete or reset segments).
    pub fn snapshot_persisted(&self, index: u64) -> Result<(), StorageError> {
        let due = {
            let mut gate = self
                .shared
                .purge_gate
                .lock()
                .map_err(|_| io_error("purge gate lock poisoned"))?;
            gate.snapshot_through = gate.snapshot_through.max(Some(index));
            gate.deferred.take_if(|d| d.index <= index)
        };
        match due {
            Some(log_id) => self.shared.purge_now(log_id),
            None => Ok(()),
        }
    }

    /// Records that the log is purged through `log_id`, durably (in the metadata store) before
    /// anything is deleted: a crash after deleting segments must not forget that they are gone.
    pub fn record_purged(&self, log_id: LogId) -> Result<(), StorageError> {
        self.shared.record_purged(log_id)
    }

    /// Records that the log is purged through `log_id` exactly, durably: also when a purge
    /// further on was recorded (a state machine whose snapshot was lost is given one at the
    /// log's start, and re-applies the entries after it: a purge past them would keep them
    /// from being read). Only before the group starts.
    pub fn record_purged_exactly(&self, log_id: LogId) -> Result<(), StorageError> {
        self.shared.record_purged(log_id)?;
        if let Ok(mut last) = self.shared.last_purged.lock() {
            *last = Some(log_id);
        }
        Ok(())
    }

    /// Forgets the recorded purge, durably, when the log still holds every entry from the
    /// first through the purged one (a purge deletes whole segments only, and none was
    /// deleted yet): a state machine whose snapshot was lost is then rebuilt by applying them
    /// all. Only before the group starts. Returns whether it forgot one.
    pub fn forget_purge_of_a_whole_log(&self) -> Result<bool, StorageError> {
        let Some(purged) = self.shared.last_purged() else {
            return Ok(false);
        };
        let whole = {
            let log = self.shared.log()?;
            log.first_index() == Some(0)
                && log.start_offset() == 0
                && log.end().next_index > purged.index
        };
        if !whole {
            return Ok(false);
        }
        self.shared
            .meta
            .delete_raft_key(self.shared.group, RaftKey::LastPurged)
            .map_err(|e| meta_error(&e))?;
        if let Ok(mut on_disk) = self.shared.purged_on_disk.lock() {
            *on_disk = None;
        }
        if let Ok(mut last) = self.shared.last_purged.lock() {
            *last = None;
        }
        Ok(true)
    }

    /// Runs `f` with the partition log locked for writing.
    pub fn with_log_mut<T>(
        &self,
        f: impl FnOnce(&mut PartitionLog) -> T,
    ) -> Result<T, StorageError> {
        let mut log = self.shared.log_mut()?;
        Ok(f(&mut log))
    }

    /// Entries `start .. end`, stopping after the first whose batches take their total to
    /// `max_bytes` or beyond (at least one entry when the range holds one). Blocking.
    pub fn read_limited(
        &self,
        start: u64,
        end: u64,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.shared
            .read_limited(start, end, max_bytes)
            .map(|(entries, _)| entries)
    }

    /// The last entry purged (recorded), if any.
    pub fn last_purged(&self) -> Option<LogId> {
        self.shared.last_purged()
    }

    /// The log index saved as committed (a lower bound of what was committed: saved lazily),
    /// if any.
    pub fn saved_committed(&self) -> Option<u64> {
        self.saved_committed_log_id().map(|id| id.index)
    }

    /// The log id saved as committed (see [`LogReader::saved_committed`]).
    pub fn saved_committed_log_id(&self) -> Option<LogId> {
        let bytes = self
            .shared
            .meta
            .raft(self.shared.group, RaftKey::Committed)
            .ok()??;
        serde_json::from_slice::<LogId>(&bytes).ok()
    }

    /// At the group's close, once its Raft core stopped: saves the committed index still
    /// waiting for its timer (the last commit before a clean stop), then saves nothing more
    /// (the group's Raft state may be deleted next, and a later instance saves its own).
    pub fn close_committed(&self) {
        self.shared.write_waiting_committed();
        if let Ok(mut c) = self.shared.committed.lock() {
            c.closed = true;
        }
    }

    /// The committed index this broker last saved for the group since it started (saved
    /// lazily, without a sync of its own: durable once the metadata store's flusher ran).
    pub fn committed_saved_index(&self) -> Option<u64> {
        self.shared.committed.lock().ok().and_then(|c| c.saved)
    }

    /// Whether entries become durable before they are acknowledged (fsync before ack), so a
    /// committed entry is durable on a majority of the replicas.
    pub fn syncs_before_ack(&self) -> bool {
        self.shared.sync_interval_ms().is_none()
    }

    /// Appends whole entries fetched from another replica, before the Raft group starts (a log
    /// that lost part of its durable tail), makes them durable, and moves the store's last log
    /// id to the last of them (what openraft reads when it starts). Returns the log's end.
    pub fn append_fetched(&self, entries: &[Vec<Batch>]) -> Result<LogPosition, String> {
        let mut log = self.shared.log_mut().map_err(|e| e.to_string())?;
        for entry in entries {
            log.append_entry(entry).map_err(|e| e.to_string())?;
        }
        log.flush().map_err(|e| e.to_string())?;
        log.checkpoint().map_err(|e| e.to_string())?;
        let end = log.end();
        drop(log);
        if let Some(last) = entries.last().and_then(|e| e.first()) {
            self.shared.set_last_log_id(Some(log_id_of(last)));
        }
        Ok(end)
    }

    /// The next purge through `index` or before records the purge without deleting anything
    /// (see `Shared::keep_through`).
    pub fn keep_through(&self, index: u64) {
        if let Ok(mut keep) = self.shared.keep_through.lock() {
            *keep = Some(index);
        }
    }

    /// Changes when appends become durable: fsync before the flush callback, or every interval.
    pub fn set_fsync(&self, policy: FsyncPolicy) {
        let ms = match policy {
            FsyncPolicy::Always => 0,
            FsyncPolicy::Interval { interval_ms } => interval_ms.max(1),
        };
        self.shared.sync_interval_ms.store(ms, Ordering::Relaxed);
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        self.shared.read(start, end)
    }

    /// What replication sends in one AppendEntries: entries until one takes them to
    /// [`APPEND_BYTES_MAX`] (openraft asks for up to `max_payload_entries`).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        // openraft asks again once the last AppendEntries was answered or abandoned.
        let read = {
            let mut held = self
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            held.permit = None;
            held.read += 1;
            held.read
        };
        // A follower close behind gets entries just written (in the page cache, or still in
        // memory): read at once, as a hop to the blocking pool costs a busy group more than the
        // read. A follower far behind gets older entries, perhaps from the disk (however few
        // openraft asks for: it asks for fewer after a timed-out append).
        let last = self.shared.last_log_id().map_or(0, |l| l.index);
        if last.saturating_sub(start) < super::network::IN_SYNC_ENTRIES_MAX {
            return Ok(self.shared.read_limited(start, end, APPEND_BYTES_MAX)?.0);
        }
        let units = u32::try_from(APPEND_BYTES_MAX >> 10).unwrap_or(u32::MAX);
        let permit = self.budget.clone().try_acquire_many_owned(units).ok();
        let max_bytes = if permit.is_some() {
            APPEND_BYTES_MAX
        } else {
            CATCH_UP_FALLBACK_BYTES
        };
        let shared = self.shared.clone();
        let (entries, bytes) = blocking(move || shared.read_limited(start, end, max_bytes)).await?;
        if let Some(mut permit) = permit {
            // Keep a share for what was read; give the rest back.
            let keep = (bytes >> 10).clamp(1, units as usize);
            drop(permit.split(units as usize - keep));
            {
                let mut held = self
                    .held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if held.read == read {
                    held.permit = Some(permit);
                }
            }
            let held = Arc::downgrade(&self.held);
            tokio::spawn(async move {
                tokio::time::sleep(CATCH_UP_HOLD).await;
                if let Some(held) = held.upgrade() {
                    let mut held = held
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if held.read == read {
                        held.permit = None;
                    }
                }
            });
        }
        Ok(entries)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    /// The log store's own reads are the state machine's (entries to apply) and openraft's
    /// startup scans: recently written entries come from memory, once.
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        let purged = self.shared.last_purged().map_or(0, |p| p.index + 1);
        if start >= purged
            && let Some(entries) = self.shared.take_recent(start, end)
        {
            return entries.iter().map(|e| from_batches(e)).collect();
        }
        self.shared.read(start, end)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.shared.last_purged();
        let last_log_id = match (self.shared.last_log_id(), last_purged_log_id) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(vote)
            .map_err(|e| StorageError::from(StorageIOError::write_vote(AnyError::new(&e))))?;
        let shared = self.shared.clone();
        blocking(move || {
            shared
                .meta
                .set_raft(shared.group, RaftKey::Vote, &bytes)
                .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
        })
        .await
    }

    /// Saves, at most once a second and without a sync of its own, how far the log is known
    /// committed: a lower bound, which a later open checks the log against (a log cut short
    /// below it lost committed entries, fetched again before the group may vote). A commit
    /// that comes sooner waits for a timer, so the last one before a quiet spell is saved too.
    /// Only under fsync before ack: otherwise committed entries may be lost by design.
    /// openraft reads none of it back (`read_committed` stays the default): a bound behind a
    /// purge would break its startup invariants.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let Some(committed) = committed else {
            return Ok(());
        };
        if self.shared.sync_interval_ms().is_some() {
            return Ok(());
        }
        let wait = {
            let mut c = self
                .shared
                .committed
                .lock()
                .map_err(|_| io_error("committed index lock poisoned"))?;
            match c.at.map(|t| t.elapsed()) {
                Some(elapsed) if elapsed < COMMITTED_SAVE_EVERY => {
                    c.waiting = Some(committed);
                    let arm = !c.timer;
                    c.timer = true;
                    arm.then(|| COMMITTED_SAVE_EVERY - elapsed)
                }
                _ => {
                    c.at = Some(std::time::Instant::now());
                    c.waiting = None;
                    drop(c);
                    return self.shared.write_committed(committed);
                }
            }
        };
        if let Some(wait) = wait {
            // A weak handle: a store dropped meanwhile saves nothing more (nor does a group
            // that closed: see `LogReader::close_committed`).
            let shared = Arc::downgrade(&self.shared);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if let Some(shared) = shared.upgrade() {
                    shared.write_waiting_committed();
                }
            });
        }
        Ok(())
    }

    /// The saved vote, always read back as not granted (uncommitted), whatever it was saved as.
    /// openraft 0.9 makes a replica whose vote was committed for itself leader again at once, in
    /// the same term, with whatever its log holds now. A log that lost its tail while the
    /// broker was down (a failing disk, a partial restore) then hands out again the Raft
    /// indexes its lost entries had in that term; the other replicas hold entries under those
    /// same log ids and keep theirs, so the copies part for good (seen by the fault-injection
    /// harness on the controller group). Read back uncommitted, the vote still stops this
    /// replica from voting for anyone else in that term, and it leads again only after winning
    /// an election in a later term, which a replica with a shorter log than the others cannot.
    /// A single voter elects itself at once (`Peers::watch_leaders`).
    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let bytes = self
            .shared
            .meta
            .raft(self.shared.group, RaftKey::Vote)
            .map_err(|e| StorageError::from(StorageIOError::read_vote(AnyError::new(&e))))?;
        let vote: Option<Vote<NodeId>> = bytes
            .map(|b| serde_json::from_slice(&b))
            .transpose()
            .map_err(|e| StorageError::from(StorageIOError::read_vote(AnyError::new(&e))))?;
        Ok(vote.map(|v| Vote {
            committed: false,
            ..v
        }))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let last_purged = self.shared.last_purged().map(|p| p.index);
        let mut stamped = Vec::new();
        {
            let mut pending = self
                .shared
                .pending
                .lock()
                .map_err(|_| io_error("pending entries lock poisoned"))?;
            // Where the next entry goes: after the pending ones, or the log's end.
            let mut next = match pending.back().and_then(|e| e.last()) {
                Some(b) => LogPosition {
                    next_offset: b.header().next_offset(),
                    next_index: b.header().index + 1,
                },
                None => self.shared.log()?.end(),
            };
            for entry in entries {
                if last_purged.is_some_and(|p| entry.log_id.index <= p) {
                    // Purged already: it could never be read, so it is not stored.
                    continue;
                }
                if entry.log_id.index != next.next_index {
                    if !pending.is_empty() || self.shared.log()?.first_index().is_some() {
                        return Err(io_error(&format!(
                            "append of entry {} does not continue the log at {}",
                            entry.log_id.index, next.next_index
                        )));
                    }
                    // An empty log (new, or purged past its end) starts wherever Raft says.
                    next.next_index = entry.log_id.index;
                    let restart = next;
                    self.shared
                        .log_mut()?
                        .reset(restart)
                        .map_err(|e| write_error(&e))?;
                }
                let index = entry.log_id.index;
                let batches = to_batches(entry, next.next_offset)?;
                next = LogPosition {
                    next_offset: batches
                        .last()
                        .map_or(next.next_offset, |b| b.header().next_offset()),
                    next_index: index + 1,
                };
                stamped.push(batches);
            }
            let Some(last) = stamped.last().and_then(|e| e.first()) else {
                drop(pending);
                callback.log_io_completed(Ok(()));
                return Ok(());
            };
            self.shared.set_last_log_id(Some(log_id_of(last)));
            pending.extend(stamped);
        }
        self.flusher
            .flush(self.shared.clone(), callback)
            .map_err(|e| io_error(&e))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        blocking(move || {
            if let Ok(mut pending) = shared.pending.lock() {
                pending.retain(|e| e.first().is_some_and(|b| b.header().index < log_id.index));
            }
            if let Ok(mut recent) = shared.recent.lock() {
                recent.retain(|e| e.first().is_some_and(|b| b.header().index < log_id.index));
            }
            let mut log = shared.log_mut()?;
            let result = match log.first_index() {
                Some(first) if log_id.index <= first => {
                    let next = LogPosition {
                        next_offset: log.start_offset(),
                        next_index: log_id.index,
                    };
                    log.reset(next).map_err(|e| write_error(&e))
                }
                Some(_) => log
                    .truncate_from_index(log_id.index)
                    .map_err(|e| write_error(&e)),
                None => Ok(()),
            };
            let end = log.end().next_index;
            if result.is_ok() && end < log_id.index {
                // The cut fell inside damaged entries and took them too (no frame boundary
                // inside damage): openraft believes the entries before the cut are here. The
                // group restarts from what the log holds, and the leader sends them again.
                drop(log);
                return Err(io_error(&format!(
                    "entries {end}..{} were damaged and cut with the conflicting entries from {}; \
                     the group restarts to take them from the leader again",
                    log_id.index, log_id.index
                )));
            }
            let last = match log.first_index() {
                Some(_) => log
                    .read_entries(end - 1, end, 1)
                    .map_err(|e| read_error(end - 1, &e))?
                    .first()
                    .map(log_id_of),
                None => None,
            };
            drop(log);
            shared.set_last_log_id(last);
            result
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        blocking(move || {
            {
                let mut gate = shared
                    .purge_gate
                    .lock()
                    .map_err(|_| io_error("purge gate lock poisoned"))?;
                if gate.tracking && gate.snapshot_through.is_none_or(|t| log_id.index > t) {
                    // openraft purges through a snapshot it installs as soon as it hands the
                    // snapshot to the state machine, before the state machine has written it:
                    // recorded now, a crash in between would leave the log purged past the
                    // state the broker restarts from, with the entries in between gone.
                    // Out of Raft's reach at once, as openraft expects; recorded and deleted
                    // once the snapshot is written.
                    gate.deferred = gate.deferred.max(Some(log_id));
                    drop(gate);
                    shared.purge_in_memory(log_id);
                    return Ok(());
                }
            }
            shared.purge_now(log_id)
        })
        .await
    }
}

impl Shared {
    /// Purges the log through `log_id` (see [`LogStore::purge`]); nothing when it is purged
    /// that far already.
    fn purge_now(&self, log_id: LogId) -> Result<(), StorageError> {
        let _one = self
            .purging
            .lock()
            .map_err(|_| io_error("purge lock poisoned"))?;
        if self.purged_on_disk.lock().map(|p| *p).unwrap_or(None) >= Some(log_id) {
            return Ok(());
        }
        // Durable first: a crash after deleting segments must not forget that they are gone.
        self.record_purged(log_id)?;
        let kept = self
            .keep_through
            .lock()
            .ok()
            .and_then(|mut k| k.take_if(|k| log_id.index <= *k));
        if kept.is_some() {
            // A snapshot installed over a log filled up to it: keep the entries (records
            // consumers read), only out of Raft's reach now.
            if self.last_log_id() < Some(log_id) {
                self.set_last_log_id(Some(log_id));
            }
            return Ok(());
        }
        let mut log = self.log_mut()?;
        let end = log.end();
        if log_id.index + 1 >= end.next_index {
            log.reset(LogPosition {
                next_offset: end.next_offset,
                next_index: log_id.index + 1,
            })
            .map_err(|e| write_error(&e))?;
            drop(log);
            if self.last_log_id() < Some(log_id) {
                self.set_last_log_id(Some(log_id));
            }
            Ok(())
        } else {
            let (_, removal) = log
                .purge_through_index_later(log_id.index)
                .map_err(|e| write_error(&e))?;
            drop(log);
            remove_in_background(removal);
            Ok(())
        }
    }
}

/// Purged segments waiting for the deleting thread, at most.
const REMOVALS_QUEUED_MAX: usize = 64;

/// Deletes purged segments' files on the node's deleting thread, so that neither the
/// partition's Raft core (which waits for a purge) nor its appends and reads wait for them (see
/// [`weft_storage::SegmentRemoval::run`]). When that thread's queue is full, or it cannot be
/// started, the caller deletes them itself. The purge stands whatever happens to the files (the
/// log starts after their entries already); files left behind are deleted when the log is next
/// opened.
fn remove_in_background(removal: weft_storage::SegmentRemoval) {
    static QUEUE: std::sync::OnceLock<
        Option<std::sync::mpsc::SyncSender<weft_storage::SegmentRemoval>>,
    > = std::sync::OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<weft_storage::SegmentRemoval>(REMOVALS_QUEUED_MAX);
        let started = std::thread::Builder::new()
            .name("weft-purge".into())
            .spawn(move || {
                for removal in rx {
                    run_removal(removal);
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(error) => {
                tracing::warn!(%error, "cannot start the thread that deletes purged segments");
                None
            }
        }
    });
    let removal = match queue {
        Some(tx) => match tx.try_send(removal) {
            Ok(()) => return,
            Err(
                std::sync::mpsc::TrySendError::Full(r)
                | std::sync::mpsc::TrySendError::Disconnected(r),
            ) => r,
        },
        None => removal,
    };
    run_removal(removal);
}

fn run_removal(removal: weft_storage::SegmentRemoval) {
    if let Err(error) = removal.run() {
        tracing::warn!(%error, "could not delete purged segments; the next open of the log will");
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::raft::Command;
    use bytes::Bytes;
    use openraft::{CommittedLeaderId, EntryPayload};
    use weft_storage::MemoryMetaStore;
    use weft_storage::{BatchBuilder, LogConfig, ProducerInfo};

    /// Appends entry `index` to `log`: one batch of one record of `value` (after a blank entry
    /// 0 when the log is empty).
    pub(in crate::raft) fn append_record(log: &mut PartitionLog, index: u64, value: &[u8]) {
        if log.end().next_index == 0 {
            let blank = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 0), 0),
                payload: EntryPayload::Blank,
            };
            log.append_entry(&to_batches(blank, 0).expect("encodes"))
                .expect("appends");
        }
        let mut records = BatchBuilder::new();
        records.push(0, b"", value, []);
        let batch = records.seal(0, 0, 0, ProducerInfo::default());
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(Command::Records(vec![batch.bytes().clone()])),
        };
        let batches = to_batches(entry, log.end().next_offset).expect("encodes");
        log.append_entry(&batches).expect("appends");
    }

    /// A log of `count` entries from index 1, each one batch of one record of `value_bytes`.
    fn log_of(dir: &std::path::Path, count: u64, value_bytes: usize) -> PartitionLog {
        let mut log = PartitionLog::open(dir, LogConfig::default()).expect("opens");
        let value = vec![7u8; value_bytes];
        for index in 1..=count {
            append_record(&mut log, index, &value);
        }
        log.flush().expect("flushes");
        log
    }

    fn bytes_of(entries: &[Entry]) -> Vec<usize> {
        entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(Command::Records(batches)) => {
                    batches.iter().map(Bytes::len).sum()
                }
                _ => 0,
            })
            .collect()
    }

    fn reader_of(log: PartitionLog, budget_bytes: usize) -> (LogStore, LogReader) {
        let meta = Metadata::new(Arc::new(MemoryMetaStore::new()));
        let flusher = Flusher::start(super::super::flusher::SyncMode::Fdatasync).expect("flusher");
        let store = LogStore::new(9, log, meta, flusher).expect("store");
        let mut reader = store.reader();
        reader.budget = Arc::new(tokio::sync::Semaphore::new(budget_bytes >> 10));
        (store, reader)
    }

    /// A log store in `dir` holding `count` entries written but not synced, and its shared state
    /// (what the flusher syncs).
    pub(in crate::raft) fn unsynced_store(
        dir: &std::path::Path,
        count: u64,
    ) -> (LogStore, Arc<Shared>) {
        let mut log = PartitionLog::open(dir, LogConfig::default()).expect("opens");
        for index in 1..=count {
            append_record(&mut log, index, &[7u8; 100]);
        }
        let (store, _reader) = reader_of(log, 1 << 20);
        let shared = store.shared.clone();
        (store, shared)
    }

    fn held(reader: &LogReader) -> Option<usize> {
        reader
            .held
            .lock()
            .expect("lock")
            .permit
            .as_ref()
            .map(tokio::sync::OwnedSemaphorePermit::num_permits)
    }

    /// A vote saved as committed (this replica led its term) reads back uncommitted, for the
    /// same leader and term: openraft would otherwise make the replica leader again at once in
    /// that term, with whatever its log holds after the restart.
    /// The last entry of a log closed cleanly is damaged while the broker is down: the store
    /// opens (before, it failed on the entry, and the next attempt cut it as a torn tail), the
    /// damaged entry is cut (its term unknown, the replica must not claim it), and the log's
    /// last id is the entry before it.
    #[tokio::test]
    async fn a_damaged_last_entry_of_a_cleanly_closed_log_is_cut_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = log_of(dir.path(), 6, 100);
        let end = log.end().next_index;
        log.close().expect("close");
        let segment = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").path())
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .expect("a segment");
        let mut bytes = std::fs::read(&segment).expect("read");
        let at = bytes.len() - 3;
        bytes[at] ^= 0x20;
        std::fs::write(&segment, &bytes).expect("damage");

        let log = PartitionLog::open(dir.path(), LogConfig::default()).expect("open");
        assert!(log.recovery_report().clean_shutdown);
        let (mut store, _reader) = reader_of(log, 1 << 20);
        let state = store.get_log_state().await.expect("state");
        assert_eq!(
            state.last_log_id.map(|id| id.index),
            Some(end - 2),
            "{state:?}"
        );
        let entries = store
            .try_get_log_entries(0..end - 1)
            .await
            .expect("the entries before it read");
        assert_eq!(entries.len() as u64, end - 1);
    }

    /// At open a partition applies the committed entries after its snapshot itself, a chunk at
    /// a time (see `PartitionStateMachine::apply_committed_tail`): only through the entry saved
    /// as committed, and only when the log holds that very entry (a replica cut off may hold
    /// other entries at those indexes, never committed).
    #[tokio::test]
    async fn the_committed_tail_is_applied_at_open_only_through_the_committed_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_store, reader) = reader_of(log_of(&dir.path().join("log"), 20, 1000), 1 << 20);
        let sm = super::super::partition_sm::PartitionStateMachine::open(
            dir.path().to_path_buf(),
            LogConfig::default(),
            reader.clone(),
            1 << 30,
            60_000,
            false,
        )
        .expect("state machine");
        let id = |term, index| LogId::new(CommittedLeaderId::new(term, 0), index);
        // The log holds entry 12 of term 1, not of term 2: nothing is applied.
        assert_eq!(sm.apply_committed_tail(id(2, 12), 1).expect("apply"), 0);
        assert_eq!(sm.state().last_applied, None);
        // Past the log's end: nothing either.
        assert_eq!(sm.apply_committed_tail(id(1, 25), 1).expect("apply"), 0);
        // Through entry 12, one entry per read: the blank entry 0 and the records of 1 to 12.
        assert_eq!(sm.apply_committed_tail(id(1, 12), 1).expect("apply"), 13);
        let state = sm.state();
        assert_eq!(state.last_applied, Some(id(1, 12)));
        assert_eq!(state.high_watermark, 12);
        assert_eq!(*sm.high_watermark().borrow(), 12);
        // From there, in one read.
        assert_eq!(sm.apply_committed_tail(id(1, 12), 1).expect("apply"), 0);
        assert_eq!(
            sm.apply_committed_tail(id(1, 20), 1 << 20).expect("apply"),
            8
        );
        assert_eq!(sm.state().high_watermark, 20);
        assert_eq!(sm.applied_since_open().1, 21);
    }

    /// Flips a byte in the value of record `nth` (0-based: entry `nth + 1`) of a closed
    /// `log_of` log with `value_bytes` values in `dir`.
    fn damage_record(dir: &std::path::Path, nth: usize, value_bytes: usize) {
        let segment = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").path())
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .expect("a segment");
        let mut bytes = std::fs::read(&segment).expect("read");
        let value = vec![7u8; value_bytes];
        let at = bytes
            .windows(value_bytes)
            .enumerate()
            .filter(|(_, w)| *w == value.as_slice())
            .map(|(i, _)| i)
            .scan(None, |last: &mut Option<usize>, i| {
                // One match per record: the first position of each run.
                let new = last.is_none_or(|l| i >= l + value_bytes);
                if new {
                    *last = Some(i);
                }
                Some(new.then_some(i))
            })
            .flatten()
            .nth(nth)
            .expect("the record's value");
        bytes[at + value_bytes / 2] ^= 0x20;
        std::fs::write(&segment, &bytes).expect("damage");
    }

    /// Damage in an entry before the last of a cleanly closed log, in the same index interval:
    /// the read of the last entry runs into it. Before, the store took the damage for the last
    /// entries' and cut the log there, intact entries and all (acknowledged records, lost for
    /// good on a single replica).
    #[tokio::test]
    async fn damage_before_the_last_entry_of_a_cleanly_closed_log_cuts_nothing_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = log_of(dir.path(), 6, 100);
        let end = log.end().next_index;
        log.close().expect("close");
        damage_record(dir.path(), 2, 100);
        let log = PartitionLog::open(dir.path(), LogConfig::default()).expect("open");
        assert!(log.recovery_report().clean_shutdown);
        let (mut store, _reader) = reader_of(log, 1 << 20);
        let state = store.get_log_state().await.expect("state");
        assert_eq!(
            state.last_log_id.map(|id| id.index),
            Some(end - 1),
            "{state:?}"
        );
        let entries = store
            .try_get_log_entries(4..end)
            .await
            .expect("the entries after the damage read");
        assert_eq!(
            entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            (4..end).collect::<Vec<_>>()
        );
    }

    /// A read that starts after damaged entries of the same index interval runs into them.
    /// Before, it answered with the entries from the damage's end on, ahead of the ones asked
    /// for (openraft then found the wrong entries and stopped the group, open after open).
    #[tokio::test]
    async fn a_read_after_damaged_entries_starts_where_it_was_asked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = log_of(dir.path(), 40, 100);
        log.close().expect("close");
        damage_record(dir.path(), 4, 100);
        let log = PartitionLog::open(dir.path(), LogConfig::default()).expect("open");
        let (mut store, _reader) = reader_of(log, 1 << 20);
        let entries = store
            .try_get_log_entries(8..11)
            .await
            .expect("the entries after the damage read");
        assert_eq!(
            entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [8, 9, 10]
        );
        // The damaged entry itself reads as a stand-in.
        let entries = store.try_get_log_entries(5..6).await.expect("a stand-in");
        assert!(
            matches!(
                entries.as_slice(),
                [Entry {
                    payload: EntryPayload::Normal(Command::Lost { .. }),
                    ..
                }]
            ),
            "{entries:?}"
        );
    }

    #[tokio::test]
    async fn a_committed_vote_reads_back_uncommitted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, _reader) = reader_of(log_of(dir.path(), 2, 10), 1 << 20);
        assert_eq!(store.read_vote().await.expect("read"), None);
        store
            .save_vote(&Vote::new_committed(7, 3))
            .await
            .expect("save");
        let read = store.read_vote().await.expect("read").expect("a vote");
        assert_eq!(read, Vote::new(7, 3));
        assert!(!read.is_committed());
        store.save_vote(&Vote::new(8, 2)).await.expect("save");
        assert_eq!(
            store.read_vote().await.expect("read"),
            Some(Vote::new(8, 2))
        );
    }

    /// The committed index is saved at most once a second; one that comes sooner is saved by
    /// a timer (the last commit before a quiet spell: before, it was not saved until the next
    /// commit came), a clean close saves the one waiting, and nothing is saved after it.
    #[tokio::test]
    async fn the_last_commit_before_a_quiet_spell_is_saved() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, reader) = reader_of(log_of(dir.path(), 5, 10), 1 << 20);
        let id = |index| Some(LogId::new(CommittedLeaderId::new(1, 0), index));
        store.save_committed(id(1)).await.expect("save");
        assert_eq!(
            reader.saved_committed(),
            Some(1),
            "the first is saved at once"
        );
        store.save_committed(id(2)).await.expect("save");
        store.save_committed(id(3)).await.expect("save");
        assert_eq!(
            reader.saved_committed(),
            Some(1),
            "within a second of the last save"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reader.saved_committed() != Some(3) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            reader.saved_committed(),
            Some(3),
            "the timer saved the last one"
        );
        assert_eq!(reader.committed_saved_index(), Some(3));
        store.save_committed(id(4)).await.expect("save");
        assert_eq!(reader.saved_committed(), Some(3));
        reader.close_committed();
        assert_eq!(
            reader.saved_committed(),
            Some(4),
            "the close saved the one waiting"
        );
        store.save_committed(id(5)).await.expect("save");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(reader.saved_committed(), Some(4), "nothing after the close");
    }

    /// An entry too large to keep in memory after its write is read back from the log with the
    /// entries around it (before, the entries kept around it were taken without it: the state
    /// machine skipped it, or stopped).
    #[tokio::test]
    async fn entries_to_apply_around_one_too_large_to_keep_come_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, _reader) = reader_of(log_of(dir.path(), 4, 10), 1 << 20);
        let record = |index: u64, offset: u64, bytes: usize| {
            let mut records = BatchBuilder::new();
            records.push(0, b"", &vec![3u8; bytes], []);
            let batch = records.seal(0, 0, 0, ProducerInfo::default());
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
                payload: EntryPayload::Normal(Command::Records(vec![batch.bytes().clone()])),
            };
            to_batches(entry, offset).expect("encodes")
        };
        let blank = Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 0), 7),
            payload: EntryPayload::Blank,
        };
        {
            let mut pending = store.shared.pending.lock().expect("lock");
            pending.push_back(record(5, 4, 100));
            pending.push_back(record(6, 5, RECENT_ENTRY_BYTES_MAX + 1024));
            pending.push_back(to_batches(blank, 6).expect("encodes"));
        }
        store.shared.write_pending().expect("writes");
        let entries = store.try_get_log_entries(5..8).await.expect("reads");
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, vec![5, 6, 7]);
        assert!(
            bytes_of(&entries)[1] > RECENT_ENTRY_BYTES_MAX,
            "entry 6 whole"
        );
    }

    #[tokio::test]
    async fn an_append_for_a_replica_far_behind_carries_many_entries_up_to_a_byte_budget() {
        let dir = tempfile::tempdir().expect("temp dir");
        // 300 entries of about 64 KiB: the budget holds about 128 of them, more than the 16
        // entries an AppendEntries carried before, and fewer than openraft asks for.
        let (_store, mut reader) =
            reader_of(log_of(dir.path(), 300, 64 * 1024), CATCH_UP_BYTES_MAX);
        let total = CATCH_UP_BYTES_MAX >> 10;

        let entries = reader
            .limited_get_log_entries(1, 1 + super::super::network::PAYLOAD_ENTRIES_MAX)
            .await
            .expect("reads");
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(
            indexes,
            (1..=indexes.len() as u64).collect::<Vec<_>>(),
            "a prefix of the range, in order"
        );
        let sizes = bytes_of(&entries);
        let read: usize = sizes.iter().sum();
        assert!(
            read >= APPEND_BYTES_MAX && read - sizes[sizes.len() - 1] < APPEND_BYTES_MAX,
            "stops at the first entry that reaches the budget: {} entries, {read} bytes",
            entries.len()
        );
        assert!(entries.len() > 100, "{} entries", entries.len());
        // Until openraft asks again, the reader holds a share of the broker's budget for what
        // it read, and no more.
        let share = held(&reader).expect("a share held");
        assert_eq!(share, (read >> 10).min(APPEND_BYTES_MAX >> 10));
        assert_eq!(reader.budget.available_permits(), total - share);
        // A clone (the state machine's reader, say) holds nothing of it.
        assert_eq!(held(&reader.clone()), None);

        // The next call gives it back; a short range (a replica in sync) comes whole, from
        // either end of the log, without a share.
        let entries = reader
            .limited_get_log_entries(290, 301)
            .await
            .expect("reads");
        assert_eq!(entries.len(), 11);
        assert_eq!(entries.last().map(|e| e.log_id.index), Some(300));
        assert_eq!(held(&reader), None);
        assert_eq!(reader.budget.available_permits(), total);
        // A long range is read on the blocking pool, the same way; its share is what it read
        // (51 entries of 64 KiB: about 3.2 MiB of the 8).
        let entries = reader
            .limited_get_log_entries(250, 301)
            .await
            .expect("reads");
        assert_eq!(entries.len(), 51);
        let read: usize = bytes_of(&entries).iter().sum();
        assert!(read < APPEND_BYTES_MAX / 2, "{read}");
        assert_eq!(held(&reader), Some(read >> 10));
        assert_eq!(reader.budget.available_permits(), total - (read >> 10));
        // A reader asked nothing more gives its share back after a while.
        let asked = std::time::Instant::now();
        while held(&reader).is_some() && asked.elapsed() < CATCH_UP_HOLD * 5 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(asked.elapsed() >= CATCH_UP_HOLD - Duration::from_millis(100));
        assert_eq!(held(&reader), None);
        assert_eq!(reader.budget.available_permits(), total);
        // Unlimited reads (the state machine's, openraft's) still return the whole range.
        let entries = reader.try_get_log_entries(1..301).await.expect("reads");
        assert_eq!(entries.len(), 300);
    }

    #[tokio::test]
    async fn with_the_budget_spent_a_replica_far_behind_gets_small_appends_at_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_store, mut reader) = reader_of(log_of(dir.path(), 300, 64 * 1024), 0);
        // At once: replication never waits for the budget.
        let entries = tokio::time::timeout(
            Duration::from_secs(10),
            reader.limited_get_log_entries(1, 301),
        )
        .await
        .expect("does not wait for the budget")
        .expect("reads");
        let sizes = bytes_of(&entries);
        let read: usize = sizes.iter().sum();
        assert!(!entries.is_empty());
        assert!(
            read - sizes[sizes.len() - 1] < CATCH_UP_FALLBACK_BYTES,
            "{} entries, {read} bytes",
            entries.len()
        );
        assert_eq!(held(&reader), None);
    }

    #[tokio::test]
    async fn an_entry_larger_than_the_budget_comes_last_or_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = log_of(dir.path(), 40, 64 * 1024);
        let (_store, mut reader) = reader_of(log, CATCH_UP_BYTES_MAX);
        {
            let mut log = reader.shared.log_mut().expect("log");
            let big = vec![7u8; APPEND_BYTES_MAX + 1024];
            for index in 41..=42 {
                append_record(&mut log, index, &big);
            }
            log.flush().expect("flushes");
        }
        // Forty small entries, then the large one that reaches the budget, last.
        let entries = reader.limited_get_log_entries(1, 43).await.expect("reads");
        assert_eq!(
            entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            (1..=41).collect::<Vec<_>>()
        );
        // From the large ones on: one a call.
        for start in 41..=42 {
            let entries = reader
                .limited_get_log_entries(start, 43)
                .await
                .expect("reads");
            assert_eq!(
                entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
                vec![start]
            );
        }
    }
}
