//! The tail cache: a log's most recently appended record batches, kept in memory (the batches'
//! own buffers, shared, not copied) up to a byte budget, so that consumers that keep up read
//! without the log's lock, without a system call and without re-checking CRCs. A read that
//! starts before the cached range misses, and the caller reads the segments instead (on a
//! thread that may block).
//!
//! The log updates its cache inside every method that changes the log (append, truncate, purge,
//! reset), so the cache always holds a suffix of the log's records: the same batches, at the same
//! offsets.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::codec::{Batch, EntryKind};

#[derive(Debug, Default)]
struct Inner {
    /// Record batches in offset order, dense: each starts where the previous ends.
    batches: VecDeque<Batch>,
    bytes: usize,
    /// The log's next offset: the end of the cached range.
    end_offset: u64,
}

/// A handle to a log's tail cache; cheap to clone, read without the log's lock.
#[derive(Debug, Clone)]
pub struct TailCache {
    inner: Arc<Mutex<Inner>>,
    bytes_max: usize,
}

impl TailCache {
    pub(crate) fn new(end_offset: u64, bytes_max: usize) -> TailCache {
        TailCache {
            inner: Arc::new(Mutex::new(Inner {
                end_offset,
                ..Inner::default()
            })),
            bytes_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves at worst a stale cache; recover the guard and
        // let the next change of the log reset it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record batches holding offsets from `from_offset` up to (not including) `limit_offset`,
    /// about `max_bytes` of them (at least one when any qualifies), exactly as
    /// [`crate::PartitionLog::read`] returns them; None when `from_offset` lies outside the cached
    /// range (read the log then).
    pub fn read(
        &self,
        from_offset: u64,
        max_bytes: usize,
        limit_offset: u64,
    ) -> Option<Vec<Batch>> {
        let inner = self.lock();
        let start = inner
            .batches
            .front()
            .map_or(inner.end_offset, |b| b.header().base_offset);
        if from_offset < start || from_offset > inner.end_offset {
            return None;
        }
        if from_offset >= limit_offset {
            return Some(Vec::new());
        }
        let first = inner
            .batches
            .partition_point(|b| b.header().next_offset() <= from_offset);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for batch in inner.batches.range(first..) {
            if batch.header().base_offset >= limit_offset
                || (!out.is_empty() && bytes + batch.len() > max_bytes)
            {
                break;
            }
            bytes += batch.len();
            out.push(batch.clone());
        }
        Some(out)
    }

    /// The cached range of offsets: `(first, end)`.
    pub fn range(&self) -> (u64, u64) {
        let inner = self.lock();
        let start = inner
            .batches
            .front()
            .map_or(inner.end_offset, |b| b.header().base_offset);
        (start, inner.end_offset)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// An entry was appended at the log's end.
    pub(crate) fn appended(&self, batches: &[Batch]) {
        let mut inner = self.lock();
        for batch in batches {
            let h = batch.header();
            if h.kind != EntryKind::Records || h.record_count == 0 {
                continue;
            }
            debug_assert_eq!(h.base_offset, inner.end_offset, "dense offsets");
            inner.end_offset = h.next_offset();
            if batch.len() > self.bytes_max {
                // Too large to keep: the cache restarts empty after it.
                inner.batches.clear();
                inner.bytes = 0;
                continue;
            }
            inner.bytes += batch.len();
            inner.batches.push_back(batch.clone());
        }
        while inner.bytes > self.bytes_max {
            match inner.batches.pop_front() {
                Some(old) => inner.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The log was truncated: its entries from Raft index `index` on are gone, and its next
    /// offset is `end_offset`.
    pub(crate) fn truncated(&self, index: u64, end_offset: u64) {
        let mut inner = self.lock();
        while inner
            .batches
            .back()
            .is_some_and(|b| b.header().index >= index || b.header().next_offset() > end_offset)
        {
            if let Some(gone) = inner.batches.pop_back() {
                inner.bytes -= gone.len();
            }
        }
        inner.end_offset = end_offset;
    }

    /// The log's head was deleted: it now starts at `start_offset`.
    pub(crate) fn purged(&self, start_offset: u64) {
        let mut inner = self.lock();
        while inner
            .batches
            .front()
            .is_some_and(|b| b.header().base_offset < start_offset)
        {
            if let Some(gone) = inner.batches.pop_front() {
                inner.bytes -= gone.len();
            }
        }
    }

    /// The log restarted empty at `end_offset`.
    pub(crate) fn reset(&self, end_offset: u64) {
        let mut inner = self.lock();
        inner.batches.clear();
        inner.bytes = 0;
        inner.end_offset = end_offset;
    }
}
