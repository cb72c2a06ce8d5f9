//! Group commit: one thread owns a [`PartitionLog`]; appenders queue batches on a bounded channel;
//! the thread appends everything queued, then makes it durable with one fdatasync, then completes
//! every appender. Throughput comes from sharing that fsync, never from skipping it.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::codec::{BatchBuilder, ProducerInfo};
use crate::config::FsyncPolicy;
use crate::error::{Error, Result};
use crate::log::{Appended, LogPosition, PartitionLog};

/// Most batches appended before one fsync.
const GROUP_BATCHES_MAX: usize = 4096;
/// Most bytes appended before one fsync.
const GROUP_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The outcome of one queued append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Where the batch went.
    pub appended: Appended,
    /// The log's durable position when the append was completed. Under [`FsyncPolicy::Always`] it
    /// always covers the batch; under `Interval` it may not yet.
    pub durable: LogPosition,
}

impl Committed {
    /// Whether this batch is on disk.
    pub fn is_durable(&self) -> bool {
        self.durable.next_index > self.appended.index
    }
}

type Completion = Box<dyn FnOnce(Result<Committed>) + Send>;

struct Job {
    records: BatchBuilder,
    producer: ProducerInfo,
    done: Completion,
}

/// A thread that owns a partition log and group-commits appends to it.
#[derive(Debug)]
pub struct GroupCommitter {
    sender: Option<SyncSender<Job>>,
    worker: Option<JoinHandle<Result<PartitionLog>>>,
}

impl GroupCommitter {
    /// Starts the committer thread. At most `queue_depth` appends wait; more block their callers.
    /// Entries are stamped with Raft term `term` and consecutive indexes.
    pub fn spawn(log: PartitionLog, term: u64, queue_depth: usize) -> Result<GroupCommitter> {
        let (sender, receiver) = mpsc::sync_channel(queue_depth.max(1));
        let worker = thread::Builder::new()
            .name("weft-group-commit".into())
            .spawn(move || run(log, term, receiver))
            .map_err(|e| Error::Io {
                op: "spawn group committer",
                path: Default::default(),
                source: std::sync::Arc::new(e),
            })?;
        Ok(GroupCommitter {
            sender: Some(sender),
            worker: Some(worker),
        })
    }

    /// Queues `records` (blocking while the queue is full); `done` runs on the committer thread
    /// once the batch is committed under the log's fsync policy, or failed.
    pub fn append(
        &self,
        records: BatchBuilder,
        producer: ProducerInfo,
        done: impl FnOnce(Result<Committed>) + Send + 'static,
    ) -> Result<()> {
        let sender = self.sender.as_ref().ok_or(Error::Closed)?;
        sender
            .send(Job {
                records,
                producer,
                done: Box::new(done),
            })
            .map_err(|_| Error::Closed)
    }

    /// Queues `records` and waits for the result.
    pub fn append_wait(&self, records: BatchBuilder, producer: ProducerInfo) -> Result<Committed> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.append(records, producer, move |result| {
            let _ = tx.send(result);
        })?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// Completes everything queued, syncs, stops the thread and returns the log.
    pub fn close(mut self) -> Result<PartitionLog> {
        self.sender.take();
        let worker = self.worker.take().ok_or(Error::Closed)?;
        worker
            .join()
            .map_err(|_| Error::Poisoned("group committer thread panicked".into()))?
    }
}

impl Drop for GroupCommitter {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn run(mut log: PartitionLog, term: u64, receiver: Receiver<Job>) -> Result<PartitionLog> {
    let policy = log.config().fsync;
    let mut last_sync = Instant::now();
    let mut jobs: Vec<Job> = Vec::new();
    let mut results: Vec<Result<Appended>> = Vec::new();
    loop {
        let first = match policy {
            FsyncPolicy::Always => match receiver.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
            FsyncPolicy::Interval { interval_ms } => {
                let interval = Duration::from_millis(interval_ms);
                let wait = interval.saturating_sub(last_sync.elapsed());
                match receiver.recv_timeout(wait) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        if log.durable() != log.end() {
                            // A failed interval sync poisons the log; later appends report it.
                            let _ = log.flush();
                        }
                        last_sync = Instant::now();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        let mut group_bytes = first.records.encoded_len();
        jobs.push(first);
        while jobs.len() < GROUP_BATCHES_MAX && group_bytes < GROUP_BYTES_MAX {
            match receiver.try_recv() {
                Ok(job) => {
                    group_bytes += job.records.encoded_len();
                    jobs.push(job);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        for job in &mut jobs {
            let end = log.end();
            let records = std::mem::take(&mut job.records);
            let batch = records.seal(end.next_offset, term, end.next_index, job.producer);
            results.push(log.append(&batch));
        }
        let sync = match policy {
            FsyncPolicy::Always => Some(log.flush()),
            FsyncPolicy::Interval { interval_ms } => {
                if last_sync.elapsed() >= Duration::from_millis(interval_ms) {
                    last_sync = Instant::now();
                    Some(log.flush())
                } else {
                    None
                }
            }
        };
        let durable = log.durable();
        for (job, result) in jobs.drain(..).zip(results.drain(..)) {
            let outcome = match (&sync, result) {
                (_, Err(error)) => Err(error),
                (Some(Err(error)), Ok(_)) => Err(error.clone()),
                (_, Ok(appended)) => Ok(Committed { appended, durable }),
            };
            (job.done)(outcome);
        }
    }
    log.flush()?;
    Ok(log)
}
