//! openraft's `RaftLogStorage` over a segment-store `PartitionLog`: the Raft log of a partition is
//! the partition's data, written once.
//!
//! Group commit: `append` writes the entries at once (so they are readable when it returns, as
//! openraft requires) and hands the flush callback to this store's flusher task. The flusher takes
//! every callback queued, runs one fdatasync on a blocking thread while later appends keep
//! writing, then completes them all. The vote and the purge point live in the metadata store
//! (sled), durably.
//!
//! The `PartitionLog` sits behind one mutex shared by the writer (openraft's storage task), the
//! flusher and readers (replication, the state machine, consumers). Every hold is short: a write
//! or read to the page cache; the fdatasync itself runs outside the lock.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, OptionalSend, StorageIOError, Vote};
use tokio::sync::mpsc;
use weft_storage::{LogPosition, PartitionLog};

use crate::meta::{MetaError, Metadata, RaftKey};

use super::entry::{from_batch, to_batch};
use super::{Entry, GroupId, LogId, NodeId, StorageError, TypeConfig};

/// Most flush callbacks waiting for the flusher.
const FLUSH_QUEUE_MAX: usize = 4096;
/// Read entries in chunks of about this many bytes.
const READ_CHUNK_BYTES: usize = 4 << 20;

#[derive(Debug)]
struct Shared {
    group: GroupId,
    log: Mutex<PartitionLog>,
    meta: Metadata,
    /// Entries at or below this index are purged: never returned.
    last_purged: Mutex<Option<LogId>>,
}

impl Shared {
    fn log(&self) -> Result<MutexGuard<'_, PartitionLog>, StorageError> {
        self.log
            .lock()
            .map_err(|_| io_error("partition log lock poisoned"))
    }

    fn last_purged(&self) -> Option<LogId> {
        self.last_purged.lock().map(|g| *g).unwrap_or(None)
    }

    fn record_purged(&self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&log_id)
            .map_err(|e| StorageError::from(StorageIOError::write_logs(AnyError::new(&e))))?;
        self.meta
            .set_raft(self.group, RaftKey::LastPurged, &bytes)
            .map_err(|e| meta_error(&e))?;
        if let Ok(mut purged) = self.last_purged.lock() {
            *purged = Some(log_id);
        }
        Ok(())
    }

    fn read(&self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let start = match self.last_purged() {
            Some(purged) => start.max(purged.index + 1),
            None => start,
        };
        let mut out = Vec::new();
        let mut from = start;
        while from < end {
            let batches = {
                let log = self.log()?;
                let first = log.first_index().unwrap_or(log.end().next_index);
                if from < first {
                    // Purged physically: start at what is there.
                    from = first;
                    if from >= end {
                        break;
                    }
                }
                log.read_entries(from, end, READ_CHUNK_BYTES)
                    .map_err(|e| read_error(from, &e))?
            };
            let Some(last) = batches.last() else { break };
            from = last.header().index + 1;
            for batch in &batches {
                out.push(from_batch(batch)?);
            }
        }
        Ok(out)
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

/// The Raft log store of one group.
#[derive(Debug)]
pub struct LogStore {
    shared: Arc<Shared>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// A cloneable reader of a group's log, for replication, the state machine and consumers.
#[derive(Debug, Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl LogStore {
    /// Wraps an opened log. Must be called inside a tokio runtime (it starts the flusher task).
    pub fn new(
        group: GroupId,
        log: PartitionLog,
        meta: Metadata,
    ) -> Result<LogStore, StorageError> {
        let last_purged = meta
            .raft(group, RaftKey::LastPurged)
            .map_err(|e| StorageError::from(StorageIOError::read_logs(AnyError::new(&e))))?
            .map(|bytes| serde_json::from_slice::<LogId>(&bytes))
            .transpose()
            .map_err(|e| StorageError::from(StorageIOError::read_logs(AnyError::new(&e))))?;
        let shared = Arc::new(Shared {
            group,
            log: Mutex::new(log),
            meta,
            last_purged: Mutex::new(last_purged),
        });
        let (flusher, queue) = mpsc::channel(FLUSH_QUEUE_MAX);
        tokio::spawn(flush_loop(shared.clone(), queue));
        Ok(LogStore { shared, flusher })
    }

    /// A reader sharing this store's log.
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }
}

impl LogReader {
    /// Runs `f` with the partition log locked (reads by offset for consumers).
    pub fn with_log<T>(&self, f: impl FnOnce(&PartitionLog) -> T) -> Result<T, StorageError> {
        let log = self.shared.log()?;
        Ok(f(&log))
    }

    /// Records that the log is purged through `log_id`, durably (in the metadata store) before
    /// anything is deleted: a crash after deleting segments must not forget that they are gone.
    pub fn record_purged(&self, log_id: LogId) -> Result<(), StorageError> {
        self.shared.record_purged(log_id)
    }

    /// Runs `f` with the partition log locked for writing.
    pub fn with_log_mut<T>(
        &self,
        f: impl FnOnce(&mut PartitionLog) -> T,
    ) -> Result<T, StorageError> {
        let mut log = self.shared.log()?;
        Ok(f(&mut log))
    }
}

/// Completes flush callbacks in groups: one fdatasync for everything queued.
async fn flush_loop(shared: Arc<Shared>, mut queue: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    let mut waiting = Vec::new();
    while let Some(first) = queue.recv().await {
        waiting.push(first);
        while let Ok(more) = queue.try_recv() {
            waiting.push(more);
        }
        let outcome = sync(&shared).await;
        for callback in waiting.drain(..) {
            callback.log_io_completed(match &outcome {
                Ok(()) => Ok(()),
                Err(message) => Err(std::io::Error::other(message.clone())),
            });
        }
    }
}

async fn sync(shared: &Arc<Shared>) -> Result<(), String> {
    let ticket = {
        let log = shared.log().map_err(|e| e.to_string())?;
        log.begin_sync().map_err(|e| e.to_string())?
    };
    let Some(ticket) = ticket else { return Ok(()) };
    let (ticket, outcome) = tokio::task::spawn_blocking(move || {
        let outcome = ticket.sync();
        (ticket, outcome)
    })
    .await
    .map_err(|e| format!("fsync task failed: {e}"))?;
    let mut log = shared.log().map_err(|e| e.to_string())?;
    log.complete_sync(&ticket, outcome)
        .map(|_| ())
        .map_err(|e| e.to_string())
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
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        self.shared.read(start, end)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.shared.last_purged();
        let last_in_log = {
            let log = self.shared.log()?;
            let end = log.end().next_index;
            match log.first_index() {
                Some(_) if end > 0 => log
                    .read_entries(end - 1, end, 1)
                    .map_err(|e| read_error(end - 1, &e))?
                    .first()
                    .map(|b| {
                        LogId::new(
                            openraft::CommittedLeaderId::new(b.header().term, 0),
                            b.header().index,
                        )
                    }),
                _ => None,
            }
        };
        let last_log_id = match (last_in_log, last_purged_log_id) {
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
        self.shared
            .meta
            .set_raft(self.shared.group, RaftKey::Vote, &bytes)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let bytes = self
            .shared
            .meta
            .raft(self.shared.group, RaftKey::Vote)
            .map_err(|e| StorageError::from(StorageIOError::read_vote(AnyError::new(&e))))?;
        bytes
            .map(|b| serde_json::from_slice(&b))
            .transpose()
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
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
        {
            let last_purged = self.shared.last_purged().map(|p| p.index);
            let mut log = self.shared.log()?;
            for entry in entries {
                if last_purged.is_some_and(|p| entry.log_id.index <= p) {
                    // Purged already: it could never be read, so it is not stored.
                    continue;
                }
                let end = log.end();
                if log.first_index().is_none() && entry.log_id.index != end.next_index {
                    // An empty log (new, or purged past its end) starts wherever Raft says.
                    log.reset(LogPosition {
                        next_offset: end.next_offset,
                        next_index: entry.log_id.index,
                    })
                    .map_err(|e| write_error(&e))?;
                }
                let batch = to_batch(&entry, log.end().next_offset)?;
                log.append(&batch).map_err(|e| write_error(&e))?;
            }
        }
        self.flusher
            .send(callback)
            .await
            .map_err(|_| io_error("the log flusher has stopped"))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut log = self.shared.log()?;
        match log.first_index() {
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
        }
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Durable first: a crash after deleting segments must not forget that they are gone.
        self.shared.record_purged(log_id)?;
        let mut log = self.shared.log()?;
        let end = log.end();
        if log_id.index + 1 >= end.next_index {
            log.reset(LogPosition {
                next_offset: end.next_offset,
                next_index: log_id.index + 1,
            })
            .map_err(|e| write_error(&e))
        } else {
            log.purge_through_index(log_id.index)
                .map(|_| ())
                .map_err(|e| write_error(&e))
        }
    }
}
