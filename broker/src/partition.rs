//! One partition on this broker: its Raft group (the segment-store log is the Raft log, see
//! `raft::PartitionGroup`) and the actor that orders publishes.
//!
//! Publishing: requests go through a bounded queue to the partition's publish actor
//! (`sequencer.rs`), which checks producers' sequences and coalesces what queues up into Raft
//! entries. A batch is acknowledged once its entry is applied: committed, and durably on disk
//! under the topic's fsync policy.
//!
//! Reading: consumers read the log by offset up to the high watermark (the offset after the last
//! applied record), so nothing they see can later be lost. Fetch long-polls on a watch channel.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::sequencer::PublishJob;
use weft_storage::{Batch, ProducerInfo};

use crate::error::BrokerError;
use crate::raft::{GroupId, GroupStatus, NodeId, PartitionGroup};
use crate::topic::TopicConfig;

/// Where a published batch was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Offset of its first record.
    pub base_offset: u64,
    /// Records stored.
    pub record_count: u32,
    /// True when it had been stored before (a retry).
    pub duplicate: bool,
}

/// The bounds of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Oldest retained offset.
    pub log_start: u64,
    /// Offset after the last committed record.
    pub high_watermark: u64,
    /// Offset after the last record in the log.
    pub log_end: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
}

/// What identifies a hosted partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpec {
    /// Topic name.
    pub topic: String,
    /// Topic id.
    pub topic_id: String,
    /// Partition number.
    pub partition: u32,
    /// Raft group id.
    pub group_id: GroupId,
    /// Topic configuration.
    pub config: TopicConfig,
    /// Every replica (this node included) with its peer address, the first replica first.
    pub members: Vec<(NodeId, String)>,
}

/// A damaged range of a partition's durable data: found when the log was opened, or by a read.
/// It is never served; reads of it answer DATA_LOSS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub segment: String,
    /// Byte position of the damage in it.
    pub position: u64,
    /// What check failed.
    pub detail: String,
}

/// Most damaged ranges remembered per partition.
const DAMAGE_KEPT_MAX: usize = 64;

/// A partition hosted on this broker, with its Raft group open.
pub struct Partition {
    /// Topic name.
    pub topic: String,
    /// Topic id.
    pub topic_id: String,
    /// Partition number.
    pub partition: u32,
    /// Raft group id.
    pub group_id: GroupId,
    dir: PathBuf,
    group: PartitionGroup,
    config: Mutex<TopicConfig>,
    jobs: mpsc::Sender<PublishJob>,
    /// The broker's room for queued publishes, by bytes (see [`Partition::publish`]).
    queue_bytes: PartitionQueueBytes,
    ready: AtomicBool,
    /// Set once the partition stops on this broker (its topic deleted, its replica moved, a
    /// reopen after a storage error, the broker stopping): wakes the reads waiting on it.
    stopped: watch::Sender<bool>,
    damage: Mutex<Vec<Damage>>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("group_id", &self.group_id)
            .finish_non_exhaustive()
    }
}

/// The room for publishes queued on a broker, all partitions together, by bytes
/// (`publish_queue_bytes_max`): a permit per byte. One partition holds at most
/// [`PARTITION_SHARE`] of it, so a partition whose queue does not drain (its disk stalled, its
/// leader cut off) leaves the others room.
#[derive(Debug, Clone)]
pub struct QueueBytes {
    room: Arc<tokio::sync::Semaphore>,
    capacity: usize,
}

/// The part of the broker's publish-queue bytes one partition may hold: 1 / this.
pub const PARTITION_SHARE: usize = 4;

impl QueueBytes {
    /// Room for `capacity` bytes.
    pub fn new(capacity: u64) -> QueueBytes {
        let capacity = usize::try_from(capacity)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        QueueBytes {
            room: Arc::new(tokio::sync::Semaphore::new(capacity)),
            capacity,
        }
    }

    /// A partition's way into this room, with its own share.
    fn for_partition(&self) -> PartitionQueueBytes {
        let share = (self.capacity / PARTITION_SHARE).max(1);
        PartitionQueueBytes {
            broker: self.clone(),
            own: Arc::new(tokio::sync::Semaphore::new(share)),
            share,
        }
    }
}

/// One partition's room in its broker's publish-queue bytes (see [`QueueBytes`]).
#[derive(Debug)]
struct PartitionQueueBytes {
    broker: QueueBytes,
    own: Arc<tokio::sync::Semaphore>,
    share: usize,
}

impl PartitionQueueBytes {
    /// Room for a batch of `bytes` (one larger than all of it takes all of it), or OVERLOADED.
    fn take(&self, bytes: usize) -> Result<QueueRoom, BrokerError> {
        let wanted = |limit: usize| u32::try_from(bytes.min(limit)).unwrap_or(u32::MAX);
        let own = self
            .own
            .clone()
            .try_acquire_many_owned(wanted(self.share))
            .map_err(|_| {
                BrokerError::Overloaded(format!(
                    "this partition's share of the broker's publish queues ({} bytes, a \
                     quarter of publish_queue_bytes_max)",
                    self.share
                ))
            })?;
        let broker = self
            .broker
            .room
            .clone()
            .try_acquire_many_owned(wanted(self.broker.capacity))
            .map_err(|_| {
                BrokerError::Overloaded(format!(
                    "the broker's publish queues (publish_queue_bytes_max, {} bytes)",
                    self.broker.capacity
                ))
            })?;
        Ok(QueueRoom {
            _own: own,
            _broker: broker,
        })
    }
}

/// A queued publish's room in its partition's share and its broker's publish-queue bytes,
/// given back when dropped.
#[derive(Debug)]
pub struct QueueRoom {
    _own: tokio::sync::OwnedSemaphorePermit,
    _broker: tokio::sync::OwnedSemaphorePermit,
}

impl Partition {
    /// Wraps an opened group and starts the publish actor. The partition is not ready until
    /// [`Partition::set_ready`] (its group has caught up).
    pub fn start(
        spec: PartitionSpec,
        dir: &Path,
        group: PartitionGroup,
        queue_max: usize,
        queue_bytes: QueueBytes,
        producer_expiration_ms: u64,
        producers_max: usize,
    ) -> Arc<Partition> {
        let (jobs, queue) = mpsc::channel(queue_max.max(1));
        tokio::spawn(crate::sequencer::run(
            group.clone(),
            queue,
            producer_expiration_ms,
            producers_max,
        ));
        let damage = group
            .recovery_report()
            .corruptions
            .iter()
            .map(|c| Damage {
                segment: c.segment.display().to_string(),
                position: c.position,
                detail: c.detail.clone(),
            })
            .collect();
        Arc::new(Partition {
            topic: spec.topic,
            topic_id: spec.topic_id,
            partition: spec.partition,
            group_id: spec.group_id,
            dir: dir.to_path_buf(),
            group,
            config: Mutex::new(spec.config),
            jobs,
            queue_bytes: queue_bytes.for_partition(),
            ready: AtomicBool::new(false),
            stopped: watch::Sender::new(false),
            damage: Mutex::new(damage),
        })
    }

    /// The damaged ranges found so far.
    pub fn damage(&self) -> Vec<Damage> {
        let mut damage = self.damage.lock().map(|d| d.clone()).unwrap_or_default();
        // Ranges the Raft log reader ran into (and skipped) while applying or replicating.
        let skipped = self
            .group
            .reader()
            .with_log(|log| log.damaged_ranges().to_vec())
            .unwrap_or_default();
        for range in skipped {
            let segment = range.segment.display().to_string();
            if !damage
                .iter()
                .any(|d| d.segment == segment && d.position == range.position)
            {
                damage.push(Damage {
                    segment,
                    position: range.position,
                    detail: range.detail,
                });
            }
        }
        damage
    }

    /// Forgets the damage that is no longer in the log (repaired from another replica). Call
    /// after the log has been scrubbed: every damaged range is then known to the log.
    pub fn forget_repaired(&self) {
        let Ok(ranges) = self
            .group
            .reader()
            .with_log(|log| log.damaged_ranges().to_vec())
        else {
            return;
        };
        if let Ok(mut damage) = self.damage.lock() {
            damage.retain(|d| {
                ranges.iter().any(|r| {
                    r.segment.display().to_string() == d.segment && r.position == d.position
                })
            });
        }
    }

    /// Maps a storage error, remembering (and logging, once) damage it reports.
    fn storage_error(&self, error: weft_storage::Error) -> BrokerError {
        let error = storage_error(error);
        if let BrokerError::DataLoss {
            detail,
            segment,
            position,
        } = &error
            && let Ok(mut damage) = self.damage.lock()
            && !damage
                .iter()
                .any(|d| &d.segment == segment && d.position == *position)
            && damage.len() < DAMAGE_KEPT_MAX
        {
            tracing::error!(topic = %self.topic, partition = self.partition, %segment, position, "damaged data found by a read; it is not served: {detail}");
            damage.push(Damage {
                segment: segment.clone(),
                position: *position,
                detail: detail.clone(),
            });
        }
        error
    }

    /// The Raft group.
    pub fn group(&self) -> &PartitionGroup {
        &self.group
    }

    /// Marks the partition as serving (its state is current).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Whether the partition serves.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The topic configuration in force.
    pub fn config(&self) -> TopicConfig {
        self.config.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Applies a changed topic configuration (limits, retention).
    pub fn set_config(&self, config: TopicConfig) {
        let log_config = config.log_config();
        let _ = self.group.reader().with_log_mut(|log| {
            log.set_retention(log_config.retention_bytes, log_config.retention_ms);
            log.set_segment_bytes_max(log_config.segment_bytes_max);
        });
        self.group.set_fsync(log_config.fsync);
        if let Ok(mut current) = self.config.lock() {
            *current = config;
        }
    }

    /// The partition's data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Publishes a batch (sealed with placeholder offsets). Waits at most `timeout`.
    pub async fn publish(&self, batch: Batch, timeout: Duration) -> Result<Published, BrokerError> {
        let max = self
            .config
            .lock()
            .map_or(u64::from(TopicConfig::default().max_message_bytes), |c| {
                u64::from(c.max_message_bytes)
            });
        if batch.len() as u64 > max {
            return Err(BrokerError::BatchTooLarge {
                size: batch.len() as u64,
                max,
            });
        }
        // Room in the broker's publish queues, by bytes (a batch larger than all of it takes
        // all of it): held until the partition's publish actor has taken the batch.
        let room = self.queue_bytes.take(batch.len())?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(PublishJob {
                batch,
                reply,
                queued: tokio::time::Instant::now(),
                room: Some(room),
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => BrokerError::Overloaded(format!(
                    "publish queue of {}/{}",
                    self.topic, self.partition
                )),
                mpsc::error::TrySendError::Closed(_) => unavailable("partition is shutting down"),
            })?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unavailable("partition is shutting down")),
            Err(_) => Err(BrokerError::Timeout(format!(
                "publish to {}/{} not committed in time",
                self.topic, self.partition
            ))),
        }
    }

    /// The partition's bounds.
    pub fn bounds(&self) -> Bounds {
        let high_watermark = self.group.high_watermark_now();
        self.group
            .reader()
            .with_log(|log| Bounds {
                log_start: log.start_offset(),
                high_watermark: high_watermark.max(log.start_offset()),
                log_end: log.end().next_offset,
                size_bytes: log.size_bytes(),
            })
            .unwrap_or(Bounds {
                log_start: 0,
                high_watermark,
                log_end: high_watermark,
                size_bytes: 0,
            })
    }

    /// The high watermark, without the log's lock (which the flusher holds while it writes):
    /// what a consumer's delivery loop checks on every round.
    pub fn high_watermark(&self) -> u64 {
        self.group.high_watermark_now()
    }

    /// Watches the high watermark.
    pub fn watch_high_watermark(&self) -> watch::Receiver<u64> {
        self.group.high_watermark()
    }

    /// Reads committed record batches from `offset`, waiting up to `max_wait` for at least
    /// `min_bytes` (capped by `max_bytes`) when there is less. The first batch may start before
    /// `offset`. Each wake-up reads only what was committed since the last read.
    pub async fn read(
        &self,
        offset: u64,
        max_bytes: usize,
        min_bytes: usize,
        max_wait: Duration,
    ) -> Result<Vec<Batch>, BrokerError> {
        let max_bytes = max_bytes.max(1);
        let min_bytes = min_bytes.clamp(1, max_bytes);
        let deadline = Instant::now() + max_wait;
        let mut watermark = self.group.high_watermark();
        let tail = self.group.reader().tail_cache().clone();
        // The dirty-read canary (test-only builds): read what is written, committed or not.
        let dirty = crate::sync_journal::read_uncommitted();
        let limit = |high_watermark: u64| {
            if dirty {
                self.bounds().log_end.max(high_watermark)
            } else {
                high_watermark
            }
        };
        // Below the high watermark the read itself finds an offset retention removed (the tail
        // cache holds nothing before the log start; the segments refuse it), so the usual read
        // of a consumer that keeps up takes no lock. At or past it, check the range here.
        let committed_now = *watermark.borrow();
        if dirty || offset >= committed_now {
            let bounds = self.bounds();
            if !dirty && offset > bounds.high_watermark && !self.group.is_leader() {
                // A follower learns of commits after its leader: past what it has committed,
                // the offset may well be committed on the leader (a consumer that read there,
                // or through a replica further ahead). Only the leader can say it is out of
                // range; a follower says to ask again (there, or here once it caught up).
                return Err(BrokerError::Unavailable {
                    reason: format!(
                        "offset {offset} is past the high watermark {} of this replica, which \
                         does not lead the partition; its leader may have committed it",
                        bounds.high_watermark
                    ),
                    leader: self.group.leader(),
                });
            }
            // A leader holds every committed entry, so past its log end nothing was ever
            // acknowledged. Up to its log end are entries it may not have seen committed yet (a
            // new leader learns the commits of the term before only with its own first entry):
            // a reader there waits for them. Before, it was told OUT_OF_RANGE, a final error,
            // for an offset the cluster may have acknowledged already.
            let end = if self.group.is_leader() {
                bounds.high_watermark.max(bounds.log_end)
            } else {
                bounds.high_watermark
            };
            if offset < bounds.log_start || offset > limit(end) {
                return Err(BrokerError::OffsetOutOfRange {
                    offset,
                    start: bounds.log_start,
                    end: bounds.high_watermark,
                });
            }
        }
        let mut out: Vec<Batch> = Vec::new();
        let mut bytes = 0usize;
        let mut next = offset;
        loop {
            // Seen before reading: a batch committed while we read wakes the wait below.
            let high_watermark = limit(*watermark.borrow_and_update());
            if next < high_watermark && bytes < max_bytes {
                // A consumer that keeps up reads from the tail cache: memory, no lock, no system
                // call. Older data comes from the segments, on a blocking thread (it may wait for
                // the disk), never on the async runtime.
                let batches = match tail.read(next, max_bytes - bytes, high_watermark) {
                    Some(batches) => {
                        metrics::counter!("weft_read_cache_reads_total", "result" => "hit")
                            .increment(1);
                        Ok(batches)
                    }
                    None => {
                        metrics::counter!("weft_read_cache_reads_total", "result" => "miss")
                            .increment(1);
                        self.read_segments(next, max_bytes - bytes, high_watermark)
                            .await?
                    }
                };
                let batches = match batches {
                    Ok(batches) => batches,
                    // Retention removed what was to be read next: answer with what we have.
                    Err(BrokerError::OffsetOutOfRange { .. }) if !out.is_empty() => return Ok(out),
                    // The segments name their end; a reader's range ends at the high watermark.
                    Err(BrokerError::OffsetOutOfRange { offset, start, .. }) => {
                        return Err(BrokerError::OffsetOutOfRange {
                            offset,
                            start,
                            end: high_watermark.max(start),
                        });
                    }
                    Err(e) => return Err(e),
                };
                for batch in batches {
                    bytes += batch.len();
                    next = next.max(batch.header().next_offset());
                    out.push(batch);
                }
            }
            if bytes >= min_bytes || Instant::now() >= deadline {
                return Ok(out);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // (Subscribed only to wait: `wait_for` sees a stop made before it.)
            let mut stopped = self.stopped.subscribe();
            tokio::select! {
                waited = tokio::time::timeout(left, watermark.changed()) => match waited {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(unavailable("partition is shutting down")),
                    Err(_) => return Ok(out),
                },
                // Before, a long poll on a partition stopped meanwhile (its topic deleted and
                // created again, say) waited out its whole wait on the old instance, then
                // answered with nothing and the old bounds.
                _ = stopped.wait_for(|stopped| *stopped) => {
                    return Err(unavailable(
                        "the partition stopped on this broker (its topic deleted, its replica \
                         moved, or reopening); ask again",
                    ));
                }
            }
        }
    }

    /// Reads from the segments on a blocking thread.
    async fn read_segments(
        &self,
        from: u64,
        max_bytes: usize,
        limit: u64,
    ) -> Result<Result<Vec<Batch>, BrokerError>, BrokerError> {
        let reader = self.group.reader().clone();
        let read = tokio::task::spawn_blocking(move || {
            reader
                .with_log(|log| log.read(from, max_bytes, limit))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?
        .map_err(BrokerError::Internal)?;
        Ok(read.map_err(|e| self.storage_error(e)))
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`; the high watermark
    /// when there is none. Searches the segments on a blocking thread.
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<u64, BrokerError> {
        let high_watermark = self.bounds().high_watermark;
        let reader = self.group.reader().clone();
        let found = tokio::task::spawn_blocking(move || {
            reader
                .with_log(|log| log.offset_for_timestamp(timestamp_ms, high_watermark))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?
        .map_err(BrokerError::Internal)?
        .map_err(|e| self.storage_error(e))?;
        Ok(found.unwrap_or(high_watermark))
    }

    /// Applies the topic's retention: decides which old segments go, makes a snapshot cover
    /// them, and purges them through Raft. Returns the Raft index purged through, if any.
    pub async fn apply_retention(&self, now_ms: i64) -> Result<Option<u64>, BrokerError> {
        let point = self
            .group
            .reader()
            .with_log(|log| log.retention_point(now_ms))
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        let Some(index) = point else { return Ok(None) };
        if self.group.status().purged_index >= Some(index) {
            return Ok(None);
        }
        self.group
            .purge_through(index, Duration::from_secs(30))
            .await?;
        Ok(Some(index))
    }

    /// The Raft term of the current leadership, and the leader.
    pub fn leadership(&self) -> (u64, Option<NodeId>) {
        let status = self.group.status();
        (status.term, status.leader)
    }

    /// Term, leader and log positions of the group.
    pub fn status(&self) -> GroupStatus {
        self.group.status()
    }

    /// Stops the Raft group; with `snapshot`, snapshots first so the next open replays nothing.
    /// Every acknowledged batch is durable already.
    pub async fn shutdown(&self, snapshot: bool) {
        self.ready.store(false, Ordering::SeqCst);
        self.stopped.send_replace(true);
        self.group.shutdown(snapshot).await;
    }
}

fn unavailable(reason: &str) -> BrokerError {
    BrokerError::Unavailable {
        reason: reason.into(),
        leader: None,
    }
}

pub(crate) fn storage_error(error: weft_storage::Error) -> BrokerError {
    match error {
        weft_storage::Error::OffsetOutOfRange { offset, start, end } => {
            BrokerError::OffsetOutOfRange { offset, start, end }
        }
        weft_storage::Error::Corruption {
            ref segment,
            position,
            ..
        } => BrokerError::DataLoss {
            detail: error.to_string(),
            segment: segment.display().to_string(),
            position,
        },
        other => BrokerError::Internal(other.to_string()),
    }
}

/// The placeholder position a leader seals proposals with (the log store restamps them).
pub fn seal_for_proposal(builder: weft_storage::BatchBuilder, producer: ProducerInfo) -> Batch {
    builder.seal(0, 0, 0, producer)
}
