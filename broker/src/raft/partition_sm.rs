//! The state machine of a partition group. The records themselves stay in the log; applying an
//! entry only advances the high watermark (the offset after the last committed record) and the
//! producers' last sequences, which deduplicate retried publishes.
//!
//! The state is small, and it is persisted as the partition's snapshot file (written atomically in
//! the partition directory): at every snapshot openraft builds (every `snapshot_interval_bytes` of
//! applied records, before a retention purge, and at a clean shutdown), and when a snapshot is
//! installed from a leader. A restart loads the snapshot and re-applies only the entries after
//! it, so neither time nor memory depend on the size of the log.

use std::collections::{BTreeMap, VecDeque};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{BasicNode, EntryPayload, OptionalSend, RaftSnapshotBuilder, StoredMembership};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use weft_storage::{Batch, BatchHeader, LogConfig, LogPosition};

use super::log_store::LogReader;
use super::{
    Command, Entry, LogId, NodeId, Response, StorageError, StoredSnapshot, TypeConfig, sm_error,
};
use super::{GroupId, Peers};

/// Bytes fetched per ReadLog call when filling a log before an installed snapshot.
const BACKFILL_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// Deadline of one such call.
const BACKFILL_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How soon a replica other than a snapshot's sender must answer a health check to be asked for
/// the entries before that snapshot.
const BACKFILL_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a fill of the log before an installed snapshot failed.
#[derive(Debug)]
enum BackfillError {
    /// The replica asked holds no entry before the snapshot.
    NothingBefore(String),
    /// Anything else (unreachable, damaged, purged meanwhile, a log that does not match).
    Failed(String),
}

impl From<String> for BackfillError {
    fn from(e: String) -> Self {
        BackfillError::Failed(e)
    }
}

/// Batches remembered per producer for answering retries (as Kafka does). The broker refuses a
/// producer more publishes in flight than this (see `SequenceCheck::Gap` and the client's
/// window), so every batch a producer may retry is still remembered.
pub const PRODUCER_BATCHES_KEPT: usize = 5;

/// Idle producers are forgotten every this many applied entries (by Raft index, so every replica
/// forgets the same ones at the same entry).
pub const PRODUCER_EXPIRY_EVERY_ENTRIES: u64 = 1024;

/// Forgets the producers whose last batch is older than `expiration_ms` before `now_ms` (a record
/// timestamp: the log's own clock, the same on every replica), except those in `keep`. Like
/// Kafka's `producer.id.expiration.ms`: a producer idle that long starts over (a new epoch).
pub fn expire_producers(
    producers: &mut BTreeMap<u64, ProducerState>,
    now_ms: i64,
    expiration_ms: u64,
    keep: impl Fn(u64) -> bool,
) -> usize {
    let before = producers.len();
    let horizon = now_ms.saturating_sub(i64::try_from(expiration_ms).unwrap_or(i64::MAX));
    producers.retain(|&id, p| p.last_timestamp_ms >= horizon || keep(id));
    before - producers.len()
}

/// Version of the snapshot payload's JSON document.
const SNAPSHOT_VERSION: u32 = 1;

/// One stored batch of an idempotent producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerBatch {
    /// Sequence of its first record.
    pub base_sequence: u64,
    /// Its record count.
    pub record_count: u32,
    /// Offset of its first record.
    pub base_offset: u64,
}

/// What the partition knows of one idempotent producer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    /// Highest epoch seen.
    pub epoch: u32,
    /// Its most recent batches, oldest first.
    pub batches: VecDeque<ProducerBatch>,
    /// Timestamp (ms since the Unix epoch) of its last stored batch, for expiry.
    #[serde(default)]
    pub last_timestamp_ms: i64,
}

/// The verdict on a publish from an idempotent producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// New and in order: append it.
    Accept,
    /// Already stored: answer with the original offsets.
    Duplicate(ProducerBatch),
    /// Stored before, but older than the batches remembered: its offsets are unknown.
    TooOld {
        /// The sequence expected next.
        expected: u64,
    },
    /// Sequences missing before it.
    Gap {
        /// The sequence expected next.
        expected: u64,
    },
    /// An epoch older than the producer's current one.
    Fenced {
        /// The current epoch.
        current: u32,
    },
}

impl ProducerState {
    /// The sequence the next batch must start at.
    pub fn next_sequence(&self) -> u64 {
        self.batches
            .back()
            .map_or(0, |b| b.base_sequence + u64::from(b.record_count))
    }

    /// Checks a batch of `record_count` records starting at `base_sequence` under `epoch`.
    pub fn check(&self, epoch: u32, base_sequence: u64, record_count: u32) -> SequenceCheck {
        if epoch < self.epoch {
            return SequenceCheck::Fenced {
                current: self.epoch,
            };
        }
        if epoch > self.epoch || self.batches.is_empty() {
            // A new producer, or a new epoch, starts its sequences at 0.
            return if base_sequence == 0 {
                SequenceCheck::Accept
            } else {
                SequenceCheck::Gap { expected: 0 }
            };
        }
        if let Some(batch) = self
            .batches
            .iter()
            .find(|b| b.base_sequence == base_sequence && b.record_count == record_count)
        {
            return SequenceCheck::Duplicate(*batch);
        }
        let expected = self.next_sequence();
        let oldest = self.batches.front().map_or(expected, |b| b.base_sequence);
        if base_sequence == expected {
            SequenceCheck::Accept
        } else if base_sequence + u64::from(record_count) <= oldest {
            // Wholly before the remembered batches: stored long ago (a producer keeps at most
            // PRODUCER_BATCHES_KEPT in flight, so its own retries never get here).
            SequenceCheck::TooOld { expected }
        } else {
            // Ahead of the next sequence, or overlapping the remembered batches.
            SequenceCheck::Gap { expected }
        }
    }

    /// Records a stored batch found late (in entries this replica applied as lost, repaired
    /// since; later batches are recorded already): kept in sequence order among the batches
    /// remembered, unless it is older than all of them with the window full, or of an epoch
    /// older than the producer's current one (a retry of it is then fenced). A newer epoch
    /// starts the window over.
    pub fn record_older(&mut self, epoch: u32, batch: ProducerBatch) {
        if epoch > self.epoch || (self.batches.is_empty() && epoch == self.epoch) {
            // A newer epoch than every batch remembered (batches after the lost range cannot
            // carry an older one): it starts the window, as `record` does.
            self.epoch = epoch;
            self.batches.clear();
            self.batches.push_back(batch);
            return;
        }
        if epoch < self.epoch
            || self
                .batches
                .iter()
                .any(|b| b.base_sequence == batch.base_sequence)
        {
            return;
        }
        let at = self
            .batches
            .iter()
            .position(|b| b.base_sequence > batch.base_sequence)
            .unwrap_or(self.batches.len());
        self.batches.insert(at, batch);
        while self.batches.len() > PRODUCER_BATCHES_KEPT {
            self.batches.pop_front();
        }
    }

    /// Records a stored batch.
    pub fn record(&mut self, epoch: u32, batch: ProducerBatch) {
        if epoch > self.epoch {
            self.epoch = epoch;
            self.batches.clear();
        }
        self.batches.push_back(batch);
        while self.batches.len() > PRODUCER_BATCHES_KEPT {
            self.batches.pop_front();
        }
    }
}

/// Everything the partition state machine holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// Last applied entry.
    pub last_applied: Option<LogId>,
    /// Membership in force.
    pub last_membership: StoredMembership<NodeId, BasicNode>,
    /// Offset after the last committed record.
    pub high_watermark: u64,
    /// Idempotent producers by id.
    pub producers: BTreeMap<u64, ProducerState>,
    /// The partition's clock: the latest record time applied (ms). A producer's last activity
    /// is this clock at its last batch, and idle producers expire against it: a producer that
    /// sends old event times is not taken for an idle one. (Absent from snapshots of earlier
    /// builds: 0 then, until the next batch.)
    #[serde(default)]
    pub clock_ms: i64,
    /// Entries this replica applied as lost (damaged on its disk), by first index, to the
    /// index after the last: their producers' batches are missing from the table until the
    /// entries are repaired from another replica and folded in
    /// ([`PartitionStateMachine::fold_repaired`]). While any is left, this replica, leading,
    /// refuses idempotent publishes (a retry of a batch stored there would be taken as new).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lost: BTreeMap<u64, u64>,
}

impl PartitionState {
    /// Records in the producer table that batch `h` of entry `index` was applied, moves the
    /// clock to its time, and every [`PRODUCER_EXPIRY_EVERY_ENTRIES`] entries forgets the
    /// producers idle for `expiration_ms` by that clock.
    fn apply_producer_batch(&mut self, h: &BatchHeader, index: u64, expiration_ms: u64) {
        self.clock_ms = self.clock_ms.max(h.max_timestamp_ms);
        if h.producer_id != 0 {
            let producer = self.producers.entry(h.producer_id).or_default();
            producer.record(
                h.producer_epoch,
                ProducerBatch {
                    base_sequence: h.base_sequence,
                    record_count: h.record_count,
                    base_offset: h.base_offset,
                },
            );
            producer.last_timestamp_ms = producer.last_timestamp_ms.max(self.clock_ms);
        }
        if index.is_multiple_of(PRODUCER_EXPIRY_EVERY_ENTRIES) {
            expire_producers(&mut self.producers, self.clock_ms, expiration_ms, |_| false);
        }
    }

    /// Where the log continues after this state: the next offset and the next Raft index.
    pub fn next_position(&self) -> LogPosition {
        LogPosition {
            next_offset: self.high_watermark,
            next_index: self.last_applied.map_or(0, |l| l.index + 1),
        }
    }
}

fn encode(state: &PartitionState) -> Result<Vec<u8>, StorageError> {
    super::encode_snapshot(SNAPSHOT_VERSION, state)
}

fn decode(bytes: &[u8]) -> Result<PartitionState, String> {
    super::decode_snapshot(SNAPSHOT_VERSION, bytes)
}

fn meta_of(state: &PartitionState) -> SnapshotMeta<NodeId, BasicNode> {
    SnapshotMeta {
        last_log_id: state.last_applied,
        last_membership: state.last_membership.clone(),
        snapshot_id: format!(
            "{}-{}-{}",
            state.last_applied.map_or(0, |l| l.leader_id.term),
            state.last_applied.map_or(0, |l| l.index),
            state.high_watermark
        ),
    }
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    log_config: LogConfig,
    reader: LogReader,
    state: Mutex<PartitionState>,
    high_watermark: watch::Sender<u64>,
    snapshot: StoredSnapshot,
    /// One snapshot file write at a time.
    snapshot_write: tokio::sync::Mutex<()>,
    /// Record bytes applied since the last snapshot, and the threshold for the next one.
    bytes_since_snapshot: AtomicU64,
    snapshot_interval_bytes: u64,
    /// Woken when `bytes_since_snapshot` passes the threshold.
    snapshot_due: Notify,
    /// Set when repaired entries were folded into the state since the last snapshot file: the
    /// next snapshot is written even with nothing applied since.
    refolded: std::sync::atomic::AtomicBool,
    /// Record bytes and entries applied since this state machine was opened.
    applied_bytes: AtomicU64,
    applied_entries: AtomicU64,
    /// Forget producers idle this long (by record timestamps).
    producer_expiration_ms: u64,
    /// When the high watermark last moved.
    advanced_at: Mutex<std::time::Instant>,
    /// Where to fetch the entries before an installed snapshot from (set once the group runs).
    backfill: std::sync::OnceLock<(Peers, GroupId)>,
    /// Snapshots installed since the state machine was opened.
    installs: watch::Sender<u64>,
}

/// A partition's state machine. Clones share state: one goes to openraft, others to the broker.
#[derive(Debug, Clone)]
pub struct PartitionStateMachine {
    shared: Arc<Shared>,
}

impl PartitionStateMachine {
    /// Opens the state machine of the partition in `dir`, from its snapshot file if there is one.
    /// `reader` is the partition's log (installing a snapshot may restart it). Blocking: it reads
    /// a small file. With `sole_replica` (a partition with no other replica to take a snapshot
    /// from), a damaged snapshot file is set aside and the state rebuilt from the log: the
    /// whole log, or (`adopt_headless_log`) the state right before its first entry, with an
    /// empty producer table, then its entries. Before, the partition never opened again. A
    /// replicated partition still refuses it (its membership is not in the log alone).
    pub fn open(
        dir: PathBuf,
        log_config: LogConfig,
        reader: LogReader,
        snapshot_interval_bytes: u64,
        producer_expiration_ms: u64,
        sole_replica: bool,
    ) -> Result<Self, String> {
        let stored = match weft_storage::snapshot::read_snapshot(&dir) {
            Ok(stored) => stored,
            Err(e @ weft_storage::Error::Corruption { .. }) if sole_replica => {
                let path = dir.join(weft_storage::snapshot::SNAPSHOT_FILE);
                let aside = dir.join("snapshot.damaged");
                tracing::error!(
                    snapshot = %path.display(),
                    "{e}; the state is rebuilt from the log (the damaged file is kept as {})",
                    aside.display()
                );
                std::fs::rename(&path, &aside).map_err(|e| {
                    format!(
                        "cannot set the damaged snapshot {} aside: {e}",
                        path.display()
                    )
                })?;
                // A log that still holds every entry forgets a purge recorded over them; one
                // whose first entries are gone keeps it, and is given a snapshot at its start
                // by `adopt_headless_log`.
                reader
                    .forget_purge_of_a_whole_log()
                    .map_err(|e| e.to_string())?;
                None
            }
            Err(e) => return Err(e.to_string()),
        };
        let (state, snapshot) = match stored {
            Some(bytes) => {
                let state = decode(&bytes)
                    .map_err(|e| format!("{}: {e}", dir.join("snapshot").display()))?;
                let meta = meta_of(&state);
                (state, Some((meta, bytes)))
            }
            None => (PartitionState::default(), None),
        };
        // Purges wait for a snapshot file that covers them.
        reader.track_snapshots(state.last_applied.map(|l| l.index));
        Ok(PartitionStateMachine {
            shared: Arc::new(Shared {
                high_watermark: watch::Sender::new(state.high_watermark),
                dir,
                log_config,
                reader,
                state: Mutex::new(state),
                snapshot: Mutex::new(snapshot),
                snapshot_write: tokio::sync::Mutex::new(()),
                bytes_since_snapshot: AtomicU64::new(0),
                snapshot_interval_bytes: snapshot_interval_bytes.max(1),
                snapshot_due: Notify::new(),
                refolded: std::sync::atomic::AtomicBool::new(false),
                installs: watch::Sender::new(0),
                applied_bytes: AtomicU64::new(0),
                applied_entries: AtomicU64::new(0),
                producer_expiration_ms,
                advanced_at: Mutex::new(std::time::Instant::now()),
                backfill: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Replaces the state and its snapshot file (blocking): used once, to give a log whose
    /// prefix was deleted without a snapshot (by an older build) the snapshot it lacks.
    pub(crate) fn reset_to(&self, state: PartitionState) -> Result<(), String> {
        let bytes = encode(&state).map_err(|e| e.to_string())?;
        weft_storage::snapshot::write_snapshot(&self.shared.dir, &bytes, &self.shared.log_config)
            .map_err(|e| e.to_string())?;
        self.shared
            .high_watermark
            .send_replace(state.high_watermark);
        *self.shared.snapshot.lock().map_err(|e| e.to_string())? = Some((meta_of(&state), bytes));
        if let Some(index) = state.last_applied.map(|l| l.index) {
            self.shared
                .reader
                .snapshot_persisted(index)
                .map_err(|e| e.to_string())?;
        }
        *self.shared.state.lock().map_err(|e| e.to_string())? = state;
        Ok(())
    }

    /// Lets an installed snapshot fill the log with the entries before it, fetched from the
    /// replica that sent it, or failing that from another replica (group `group_id` over
    /// `peers`).
    pub(super) fn enable_backfill(&self, peers: Peers, group_id: GroupId) {
        let _ = self.shared.backfill.set((peers, group_id));
    }

    /// Fills the log, emptied, with the entries before the snapshot at `next` that `node` (at
    /// `address`) still holds, from its first one: the records a replica needs to hold
    /// everything the partition retains. Ends with the log at `next`, durable, its last entry
    /// the snapshot's last one (`last`: same index and term, so by Raft's log matching every
    /// entry fetched is the committed one; a replica that was cut off may hold entries of an
    /// earlier term at those indexes). Each call starts the log over.
    ///
    /// Nothing else writes the log meanwhile: openraft 0.9 answers the install only once the
    /// state machine has installed the snapshot (`Command::Respond` under
    /// `Condition::StateMachineCommand`), and runs none of the group's later commands before
    /// that answer, so an append of the entries after the snapshot (a leader elected during
    /// the install sends them at once) waits until this returns. The group answers no one
    /// meanwhile either (votes and heartbeats wait too): a long filling keeps this replica out
    /// of elections for its length.
    ///
    /// `WEFT_TEST_BACKFILL_DELAY_MS`: a test hook that makes each fetch wait that long first
    /// (a filling long enough for a leader change).
    async fn backfill(
        &self,
        peers: &Peers,
        group_id: GroupId,
        node: NodeId,
        address: &str,
        next: LogPosition,
        last: Option<LogId>,
    ) -> Result<u64, BackfillError> {
        let reader = self.shared.reader.clone();
        let mut cursor = 0u64;
        let mut started = false;
        let mut fetched = 0u64;
        let want = last.map(|l| (l.index, l.leader_id.term));
        // (index, term) of the last entry appended so far.
        let mut last_fetched: Option<(u64, u64)> = None;
        while cursor < next.next_index {
            if let Some(delay) = crate::test_hook_ms("WEFT_TEST_BACKFILL_DELAY_MS") {
                tracing::warn!(
                    group = group_id,
                    ?delay,
                    "WEFT_TEST_BACKFILL_DELAY_MS: fetching the next entries before the snapshot later"
                );
                tokio::time::sleep(delay).await;
            }
            let request = weft_proto::internal::v1::ReadLogRequest {
                group_id,
                from_index: cursor,
                until_index: next.next_index,
                max_bytes: BACKFILL_CHUNK_BYTES,
            };
            let response = peers
                .read_log(node, address, request, BACKFILL_CALL_TIMEOUT)
                .await?;
            if started && response.first_index > cursor {
                return Err(BackfillError::Failed(format!(
                    "node {node} purged its log past {cursor} while it was being fetched"
                )));
            }
            let batches = response
                .batches
                .into_iter()
                .map(Batch::decode)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("a fetched entry is damaged: {e}"))?;
            let Some(first) = batches.first().map(|b| *b.header()) else {
                return Err(BackfillError::NothingBefore(format!(
                    "node {node} has no entries before the snapshot"
                )));
            };
            if let Some((index, term)) = last_fetched {
                super::partition_group::still_holds(peers, group_id, (node, address), index, term)
                    .await?;
            }
            let last_index = batches.last().map_or(first.index, |b| b.header().index);
            if last_index + 1 == next.next_index {
                // The snapshot's last entry, checked before it is written: a log ending where
                // the snapshot resumes is kept as it is (`fill_missing_tail`) if the broker
                // stops before this fill is over.
                let got = batches.last().map(|b| (b.header().index, b.header().term));
                if got != want {
                    return Err(BackfillError::Failed(format!(
                        "node {node}'s entries end at (index, term) {got:?}, not at the \
                         snapshot's last entry {want:?}"
                    )));
                }
            }
            last_fetched = batches.last().map(|b| (b.header().index, b.header().term));
            fetched += batches.iter().map(|b| b.len() as u64).sum::<u64>();
            let reset = (!started).then_some(LogPosition {
                next_offset: first.base_offset,
                next_index: first.index,
            });
            started = true;
            let reader = reader.clone();
            tokio::task::spawn_blocking(move || {
                reader
                    .with_log_mut(|log| -> Result<(), String> {
                        if let Some(start) = reset {
                            log.reset(start).map_err(|e| e.to_string())?;
                        }
                        let mut i = 0;
                        while i < batches.len() {
                            let index = batches[i].header().index;
                            let n = batches[i..]
                                .iter()
                                .take_while(|b| b.header().index == index)
                                .count();
                            log.append_entry(&batches[i..i + n])
                                .map_err(|e| e.to_string())?;
                            i += n;
                        }
                        log.flush().map(|_| ()).map_err(|e| e.to_string())
                    })
                    .map_err(|e| e.to_string())?
            })
            .await
            .map_err(|e| e.to_string())??;
            cursor = last_index + 1;
        }
        let end = reader
            .with_log_mut(|log| log.checkpoint().map(|()| log.end()))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if end != next {
            return Err(BackfillError::Failed(format!(
                "the fetched entries end at {end:?}, not where the snapshot resumes ({next:?})"
            )));
        }
        if last_fetched != want {
            return Err(BackfillError::Failed(format!(
                "node {node}'s entries end at (index, term) {last_fetched:?}, not at the \
                 snapshot's last entry {want:?}"
            )));
        }
        Ok(fetched)
    }

    /// A copy of the current state.
    pub fn state(&self) -> PartitionState {
        self.shared
            .state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The entries applied as lost and not folded back yet (see [`PartitionState::lost`]),
    /// without copying the rest of the state.
    pub fn lost(&self) -> BTreeMap<u64, u64> {
        self.shared
            .state
            .lock()
            .map(|s| s.lost.clone())
            .unwrap_or_default()
    }

    /// Folds the producer batches of entries `first .. next`, applied as lost and repaired
    /// since (`batches`: their headers, in log order), into the producer table, and forgets
    /// that range. `batches` None: the range is no longer in the log (purged), so it is only
    /// forgotten. Does nothing if `first .. next` is not a lost range.
    pub fn fold_repaired(&self, first: u64, next: u64, batches: Option<Vec<BatchHeader>>) {
        let Ok(mut state) = self.shared.state.lock() else {
            return;
        };
        if state.lost.get(&first) != Some(&next) {
            return;
        }
        let clock = state.clock_ms;
        // The partition's clock as the other replicas had it when they applied each entry: at
        // least every timestamp up to it in the range.
        let mut clock_then = 0i64;
        for h in batches.unwrap_or_default() {
            clock_then = clock_then.max(h.max_timestamp_ms);
            if h.producer_id == 0 {
                continue;
            }
            let producer = state.producers.entry(h.producer_id).or_default();
            producer.record_older(
                h.producer_epoch,
                ProducerBatch {
                    base_sequence: h.base_sequence,
                    record_count: h.record_count,
                    base_offset: h.base_offset,
                },
            );
            // The producer was active then, later than anything remembered of it before the
            // lost range (it would otherwise expire here before it does on the other replicas).
            producer.last_timestamp_ms = producer.last_timestamp_ms.max(clock_then);
            if producer.last_timestamp_ms == 0 {
                // Found only now, with no timestamp: idle from now on, by the partition's clock.
                producer.last_timestamp_ms = clock;
            }
        }
        state.lost.remove(&first);
        self.shared.refolded.store(true, Ordering::Relaxed);
    }

    /// Whether a snapshot file exists (was loaded or written).
    pub fn has_snapshot(&self) -> bool {
        self.shared.snapshot.lock().is_ok_and(|s| s.is_some())
    }

    /// Counts the snapshots installed from the leader (a proposal of this replica's that a
    /// snapshot covered is never answered by openraft: see [`super::PartitionGroup::propose`]).
    pub fn installs(&self) -> watch::Receiver<u64> {
        self.shared.installs.subscribe()
    }

    /// Watches the high watermark (for long-polling consumers).
    pub fn high_watermark(&self) -> watch::Receiver<u64> {
        self.shared.high_watermark.subscribe()
    }

    /// When the high watermark last moved (records were committed).
    pub fn advanced_at(&self) -> std::time::Instant {
        self.shared
            .advanced_at
            .lock()
            .map(|a| *a)
            .unwrap_or_else(|_| std::time::Instant::now())
    }

    /// Record bytes and entries applied since the state machine was opened.
    pub fn applied_since_open(&self) -> (u64, u64) {
        (
            self.shared.applied_bytes.load(Ordering::Relaxed),
            self.shared.applied_entries.load(Ordering::Relaxed),
        )
    }

    /// Resolves when `snapshot_interval_bytes` of records were applied since the last snapshot.
    pub async fn snapshot_due(&self) {
        loop {
            let notified = self.shared.snapshot_due.notified();
            if self.shared.bytes_since_snapshot.load(Ordering::Relaxed)
                >= self.shared.snapshot_interval_bytes
            {
                return;
            }
            notified.await;
        }
    }

    fn apply_one(
        &self,
        state: &mut PartitionState,
        entry: &Entry,
    ) -> Result<(Response, u64), StorageError> {
        state.last_applied = Some(entry.log_id);
        Ok(match &entry.payload {
            EntryPayload::Blank => (Response::Empty, 0),
            EntryPayload::Membership(m) => {
                state.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                (Response::Empty, 0)
            }
            EntryPayload::Normal(Command::Controller(_)) => (Response::Empty, 0),
            EntryPayload::Normal(Command::Lost { next_offset }) => {
                state.high_watermark = state.high_watermark.max(*next_offset);
                let index = entry.log_id.index;
                match state.lost.range(..=index).next_back() {
                    Some((&first, &next)) if next == index => {
                        state.lost.insert(first, index + 1);
                    }
                    Some((_, &next)) if next > index => {}
                    _ => {
                        state.lost.insert(index, index + 1);
                    }
                }
                (Response::Empty, 0)
            }
            EntryPayload::Normal(Command::Records(batches)) => {
                let first_offset = state.high_watermark;
                let mut bytes = 0u64;
                for batch in batches {
                    // Applied entries come from the log reader, which checked every batch in
                    // full: only the header is needed here.
                    let h = Batch::header_of(batch).map_err(sm_error)?;
                    if h.base_offset != state.high_watermark {
                        return Err(sm_error(format!(
                            "entry {} has a batch at offset {} but the partition's next offset is {}",
                            entry.log_id.index, h.base_offset, state.high_watermark
                        )));
                    }
                    state.high_watermark = h.next_offset();
                    bytes += batch.len() as u64;
                    state.apply_producer_batch(
                        &h,
                        entry.log_id.index,
                        self.shared.producer_expiration_ms,
                    );
                }
                (
                    Response::Appended {
                        base_offset: first_offset,
                        record_count: state.high_watermark - first_offset,
                    },
                    bytes,
                )
            }
        })
    }

    /// Applies `entries` (committed, in order) to the state: the high watermark, the producers,
    /// and the counters that time snapshots.
    fn apply_entries(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Vec<Response>, StorageError> {
        let mut responses = Vec::new();
        let mut bytes = 0u64;
        let high_watermark = {
            let mut state = self.shared.state.lock().map_err(sm_error)?;
            for entry in entries {
                let (response, size) = self.apply_one(&mut state, &entry)?;
                responses.push(response);
                bytes += size;
            }
            state.high_watermark
        };
        if bytes > 0
            && let Ok(mut at) = self.shared.advanced_at.lock()
        {
            *at = std::time::Instant::now();
        }
        self.shared.high_watermark.send_replace(high_watermark);
        self.shared
            .applied_entries
            .fetch_add(responses.len() as u64, Ordering::Relaxed);
        self.shared
            .applied_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        let since = self
            .shared
            .bytes_since_snapshot
            .fetch_add(bytes, Ordering::Relaxed)
            + bytes;
        if since >= self.shared.snapshot_interval_bytes {
            self.shared.snapshot_due.notify_waiters();
        }
        Ok(responses)
    }

    /// Applies the entries after the snapshot through `committed` before the Raft group starts,
    /// reading at most about `chunk_bytes` of them at a time. `committed` is the log id the log
    /// store saved as committed (under fsync before ack); it is used only when the log holds
    /// that very entry (by Raft's log matching, every entry before it is then the committed
    /// one too). Without this, once a leader commits again openraft applies the whole tail
    /// after the snapshot from one read, so a restarting broker held up to
    /// `snapshot_interval_bytes` of records in memory for every partition at once. Blocking.
    /// A read that fails stops it early (openraft then meets the same entry, as before).
    /// Returns the entries applied.
    pub(crate) fn apply_committed_tail(
        &self,
        committed: LogId,
        chunk_bytes: usize,
    ) -> Result<u64, StorageError> {
        let start = self
            .state()
            .last_applied
            .map_or(0, |applied| applied.index + 1);
        let end = committed.index + 1;
        if start >= end {
            return Ok(0);
        }
        let reader = &self.shared.reader;
        match reader.read_limited(committed.index, end, 1) {
            Ok(at) if at.first().map(|e| e.log_id) == Some(committed) => {}
            _ => return Ok(0),
        }
        let mut next = start;
        let mut applied = 0u64;
        while next < end {
            let entries = match reader.read_limited(next, end, chunk_bytes) {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::warn!(index = next, %error, "re-applying the committed tail stopped early");
                    break;
                }
            };
            // Only a run without gaps from `next` (a log purged past it starts later).
            let run = entries
                .iter()
                .zip(next..)
                .take_while(|(e, index)| e.log_id.index == *index)
                .count();
            if run == 0 {
                break;
            }
            let entries: Vec<Entry> = entries.into_iter().take(run).collect();
            next += run as u64;
            applied += run as u64;
            self.apply_entries(entries)?;
        }
        Ok(applied)
    }

    /// Writes `state` as the snapshot file, unless a snapshot at or after it exists already.
    /// The log's purges wait for it: call [`PartitionStateMachine::report_snapshot`] next.
    async fn persist(&self, state: PartitionState) -> Result<Snapshot<TypeConfig>, StorageError> {
        let _writing = self.shared.snapshot_write.lock().await;
        let current = self.shared.snapshot.lock().map_err(sm_error)?.clone();
        let refolded = self.shared.refolded.swap(false, Ordering::Relaxed);
        // The file is kept when it is later than `state` (an install wrote it while this build
        // ran: the log may be purged through it, so an older state must never replace it; a
        // repair's refold then waits for the next build), or as late and nothing was refolded.
        if let Some((meta, bytes)) = current
            && (meta.last_log_id > state.last_applied
                || (meta.last_log_id == state.last_applied && !refolded))
        {
            if refolded {
                self.shared.refolded.store(true, Ordering::Relaxed);
            }
            return Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(bytes)),
            });
        }
        let bytes = encode(&state)?;
        let dir = self.shared.dir.clone();
        let config = self.shared.log_config.clone();
        let payload = bytes.clone();
        let written = tokio::task::spawn_blocking(move || {
            weft_storage::snapshot::write_snapshot(&dir, &payload, &config)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) && refolded {
            self.shared.refolded.store(true, Ordering::Relaxed);
        }
        written.map_err(sm_error)?.map_err(sm_error)?;
        let meta = meta_of(&state);
        *self.shared.snapshot.lock().map_err(sm_error)? = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }

    /// Tells the log that the snapshot file covers it through `snapshot`'s last entry: a purge
    /// held back until then runs now.
    async fn report_snapshot(
        &self,
        snapshot: &SnapshotMeta<NodeId, BasicNode>,
    ) -> Result<(), StorageError> {
        let Some(index) = snapshot.last_log_id.map(|l| l.index) else {
            return Ok(());
        };
        let reader = self.shared.reader.clone();
        tokio::task::spawn_blocking(move || reader.snapshot_persisted(index))
            .await
            .map_err(sm_error)?
    }
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (state, covered) = {
            let state = self.shared.state.lock().map_err(sm_error)?;
            (
                state.clone(),
                self.shared.bytes_since_snapshot.load(Ordering::Relaxed),
            )
        };
        let built = meta_of(&state);
        let snapshot = self.persist(state).await?;
        // What this build covers, not the snapshot file's (`persist` answers with a later one
        // when there is: a snapshot being installed meanwhile, whose purge waits for its own
        // report, after the install made the log ready for it).
        self.report_snapshot(&built).await?;
        // Bytes applied while the file was written count towards the next snapshot.
        let _ = self.shared.bytes_since_snapshot.fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |b| Some(b.saturating_sub(covered)),
        );
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for PartitionStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let state = self.shared.state.lock().map_err(sm_error)?;
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.apply_entries(entries)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state = decode(&data).map_err(sm_error)?;
        if state.last_applied != meta.last_log_id {
            return Err(sm_error(format!(
                "snapshot {} holds state at {:?}",
                meta.snapshot_id, state.last_applied
            )));
        }
        // A log that does not reach the snapshot is filled with the entries before it that the
        // sender (or, failing that, another replica) still holds, so this replica holds every
        // retained record; or, failing that, restarts right after it, at the snapshot's offsets.
        // A log that holds the snapshot's last entry keeps going.
        let next = state.next_position();
        // Behind: the log ends before the snapshot, or at its index but not at its offset.
        // openraft may purge the log through the snapshot before installing it: a purge past
        // the end of an empty log restarts it at the snapshot's index with the offset it had
        // (0), and such a log must restart at the snapshot's offset too (the next entry is
        // stamped there). Seen with a replica added to a partition whose leader had purged.
        let behind = self.shared.reader.with_log(|log| {
            let end = log.end();
            end.next_index < next.next_index || (end.next_index == next.next_index && end != next)
        })?;
        // The snapshot file first: a crash before the log below is filled or restarted leaves
        // a log that ends before the snapshot, filled again at the next open
        // (`fill_missing_tail`). The other way round, it left a log restarted after a state
        // that was never written.
        let persisted = self.persist(state.clone()).await?;
        // openraft purges the log through every snapshot it installs: that purge keeps
        // whatever the log holds (`keep_through`), only out of Raft's reach: entries the leader
        // wrote too (a log whose entry at the snapshot's index differs was cut back to its
        // commit first, and is behind). Records go only by retention; before, a log that held the snapshot's last entry lost its sealed segments
        // through it, records a consumer reading from this replica still asked for.
        self.shared.reader.keep_through(next.next_index - 1);
        if behind {
            // Then the purge through the snapshot is recorded before the log changes: a crash
            // while it is filled must not leave a log whose first entries are gone with no
            // purge recorded before them (openraft would look for them at the next start, and
            // fail).
            self.report_snapshot(&persisted.meta).await?;
            // From the sender first, then, if that fails (its copy damaged, say), from the
            // other replicas in turn.
            let mut sources: Vec<(Peers, GroupId, NodeId, String)> = Vec::new();
            if let Some((peers, group_id)) = self.shared.backfill.get() {
                let sender = peers.snapshot_sender(*group_id);
                let membership = meta.last_membership.membership();
                let mut nodes: Vec<(NodeId, String)> = membership
                    .nodes()
                    .filter(|(id, _)| **id != peers.node_id())
                    .map(|(id, n)| (*id, n.addr.clone()))
                    .collect();
                nodes.sort_by_key(|(id, _)| Some(*id) != sender);
                sources.extend(
                    nodes
                        .into_iter()
                        .map(|(id, address)| (peers.clone(), *group_id, id, address)),
                );
            }
            let mut filled = false;
            let mut nothing_before = false;
            for (i, (peers, group_id, node, address)) in sources.into_iter().enumerate() {
                // Another replica is asked only if it answers a health check at once: an
                // unreachable one would hold this group (which answers no one meanwhile) for
                // a whole call's timeout.
                if i > 0 && !peers.ping(node, &address, BACKFILL_PING_TIMEOUT).await {
                    tracing::warn!(
                        group = group_id,
                        from = node,
                        "cannot fetch the entries before the installed snapshot from this replica: it does not answer"
                    );
                    continue;
                }
                match self
                    .backfill(&peers, group_id, node, &address, next, meta.last_log_id)
                    .await
                {
                    Ok(bytes) => {
                        tracing::info!(
                            group = group_id,
                            from = node,
                            bytes,
                            "fetched the entries before the installed snapshot"
                        );
                        filled = true;
                        break;
                    }
                    Err(BackfillError::NothingBefore(e)) if i == 0 => {
                        // The sender (the leader) keeps nothing before its snapshot: nor need
                        // this replica.
                        tracing::info!(
                            group = group_id,
                            from = node,
                            "no entries before the installed snapshot to fetch: {e}"
                        );
                        nothing_before = true;
                        break;
                    }
                    Err(BackfillError::NothingBefore(e) | BackfillError::Failed(e)) => {
                        tracing::warn!(
                            group = group_id,
                            from = node,
                            "cannot fetch the entries before the installed snapshot from this replica: {e}"
                        );
                    }
                }
            }
            if !filled {
                if !nothing_before {
                    tracing::warn!(
                        snapshot = %meta.snapshot_id,
                        "no replica gave the entries before the installed snapshot; this replica starts after it"
                    );
                }
                self.shared
                    .reader
                    .with_log_mut(|log| log.reset(next))?
                    .map_err(sm_error)?;
            }
        }
        let high_watermark = state.high_watermark;
        *self.shared.state.lock().map_err(sm_error)? = state;
        // Now openraft's purge through the snapshot may run.
        self.report_snapshot(&persisted.meta).await?;
        self.shared.bytes_since_snapshot.store(0, Ordering::Relaxed);
        self.shared.high_watermark.send_replace(high_watermark);
        self.shared.installs.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.shared.snapshot.lock().map_err(sm_error)?.clone();
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base_sequence: u64, record_count: u32, base_offset: u64) -> ProducerBatch {
        ProducerBatch {
            base_sequence,
            record_count,
            base_offset,
        }
    }

    #[test]
    fn sequence_checks() {
        let mut p = ProducerState::default();
        // (epoch, base sequence, count) -> expected verdict, applied in order.
        assert_eq!(p.check(0, 0, 3), SequenceCheck::Accept);
        p.record(0, batch(0, 3, 100));
        assert_eq!(p.check(0, 3, 2), SequenceCheck::Accept);
        p.record(0, batch(3, 2, 103));
        assert_eq!(
            p.check(0, 0, 3),
            SequenceCheck::Duplicate(batch(0, 3, 100)),
            "retry of the first batch"
        );
        assert_eq!(
            p.check(0, 3, 2),
            SequenceCheck::Duplicate(batch(3, 2, 103)),
            "retry of the last batch"
        );
        assert_eq!(p.check(0, 9, 1), SequenceCheck::Gap { expected: 5 }, "gap");
        assert_eq!(
            p.check(0, 4, 1),
            SequenceCheck::Gap { expected: 5 },
            "overlap"
        );
        assert_eq!(
            p.check(1, 7, 1),
            SequenceCheck::Gap { expected: 0 },
            "a new epoch starts at 0"
        );
        assert_eq!(p.check(1, 0, 1), SequenceCheck::Accept);
        p.record(1, batch(0, 1, 105));
        assert_eq!(
            p.check(0, 5, 1),
            SequenceCheck::Fenced { current: 1 },
            "old epoch fenced"
        );
        for i in 1..10 {
            p.record(1, batch(i, 1, 105 + i));
        }
        assert_eq!(
            p.batches.len(),
            PRODUCER_BATCHES_KEPT,
            "bounded memory per producer"
        );
        assert_eq!(p.next_sequence(), 10);
        assert_eq!(
            p.check(1, 1, 1),
            SequenceCheck::TooOld { expected: 10 },
            "a retry older than the remembered batches is not a gap"
        );
        assert_eq!(
            p.check(1, 5, 1),
            SequenceCheck::Duplicate(batch(5, 1, 110)),
            "the oldest remembered batch"
        );
    }

    /// A producer is idle by the partition's clock (the latest record time applied), not by
    /// its own record times: one that sends event times two days old stays known while it
    /// publishes, and is forgotten once idle for the expiration by that clock. Before, it was
    /// forgotten at the next expiry pass, and a retry of its last batch (its answer lost)
    /// came back UNKNOWN_PRODUCER: the client started a new epoch and stored the batch again.
    #[test]
    fn a_producer_sending_old_record_times_is_not_idle() {
        let day = 86_400_000i64;
        let now = 1_800_000_000_000i64;
        let header = |producer_id: u64, base_sequence: u64, time: i64| BatchHeader {
            kind: weft_storage::EntryKind::Records,
            attributes: 0,
            record_count: 1,
            base_offset: 0,
            term: 1,
            index: 0,
            first_timestamp_ms: time,
            max_timestamp_ms: time,
            producer_id,
            producer_epoch: 0,
            base_sequence,
        };
        let mut state = PartitionState::default();
        let expiration = u64::try_from(day).expect("ms");
        let entries = 3 * PRODUCER_EXPIRY_EVERY_ENTRIES;
        for index in 1..=entries {
            let t = now + i64::try_from(index).expect("small");
            // Producer 1 sends event times two days old; producer 2 current ones.
            state.apply_producer_batch(&header(1, index, t - 2 * day), index, expiration);
            state.apply_producer_batch(&header(2, index, t), index, expiration);
        }
        assert!(
            state.producers.contains_key(&1),
            "an active producer expired"
        );
        assert!(state.producers.contains_key(&2));
        assert_eq!(state.clock_ms, now + i64::try_from(entries).expect("small"));
        // Producer 1 goes quiet for longer than the expiration by the partition's clock.
        let later = state.clock_ms + day + 1;
        let index = 4 * PRODUCER_EXPIRY_EVERY_ENTRIES;
        state.apply_producer_batch(&header(2, entries + 1, later), index, expiration);
        assert!(!state.producers.contains_key(&1), "an idle producer stays");
        assert!(state.producers.contains_key(&2));
    }

    #[test]
    fn idle_producers_expire_by_record_time_unless_kept() {
        let mut producers = BTreeMap::new();
        for (id, last) in [(1u64, 1_000i64), (2, 5_000), (3, 9_000)] {
            producers.insert(
                id,
                ProducerState {
                    last_timestamp_ms: last,
                    ..ProducerState::default()
                },
            );
        }
        // At 10 000 with a 4 500 ms expiration: 1 and 2 are idle, 2 is kept (in flight).
        assert_eq!(
            expire_producers(&mut producers, 10_000, 4_500, |id| id == 2),
            1
        );
        assert_eq!(producers.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(
            expire_producers(&mut producers, 10_000, 4_500, |_| false),
            1
        );
        assert_eq!(
            expire_producers(&mut producers, i64::MIN, u64::MAX, |_| false),
            0
        );
    }

    /// Seen in a 300 s fault-injection run: a replica added to a partition whose leader had
    /// purged its log got the leader's snapshot, but openraft purged the replica's (empty) log
    /// through the snapshot before installing it; the purge left the log ending at the
    /// snapshot's index with offset 0, the install took it for a log that reaches the
    /// snapshot, and the next entry (stamped at the snapshot's offset) could not be stored:
    /// "continues at offset 0", and the partition restarted for good.
    #[tokio::test]
    async fn a_snapshot_installed_after_the_purge_through_it_restarts_the_log_at_its_offsets() {
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().expect("temp dir");
        let log = weft_storage::PartitionLog::open(dir.path().join("log"), LogConfig::default())
            .expect("log");
        let meta = crate::meta::Metadata::new(Arc::new(
            weft_storage::SledMetaStore::open(dir.path().join("meta")).expect("meta"),
        ));
        let flusher =
            crate::raft::Flusher::start(crate::raft::SyncMode::Fdatasync).expect("flusher");
        let mut store = crate::raft::LogStore::new(5, log, meta, flusher).expect("store");
        let reader = store.reader();
        std::fs::create_dir_all(dir.path().join("sm")).expect("state machine dir");
        let mut sm = PartitionStateMachine::open(
            dir.path().join("sm"),
            LogConfig::default(),
            reader.clone(),
            1 << 20,
            60_000,
            false,
        )
        .expect("state machine");
        let last = LogId::new(openraft::CommittedLeaderId::new(3, 0), 7098);
        store.purge(last).await.expect("purge");
        let state = PartitionState {
            last_applied: Some(last),
            high_watermark: 13_594,
            ..PartitionState::default()
        };
        let snapshot_meta = meta_of(&state);
        let bytes = encode(&state).expect("encode");
        sm.install_snapshot(&snapshot_meta, Box::new(Cursor::new(bytes)))
            .await
            .expect("install");
        let end = reader.with_log(|log| log.end()).expect("log");
        assert_eq!(
            end,
            LogPosition {
                next_offset: 13_594,
                next_index: 7099
            }
        );
    }

    /// A snapshot installed on a replica whose log already holds the snapshot's last entry (and
    /// more) takes no record away: openraft purges through every snapshot it installs, and that
    /// purge deleted the sealed segments up to the snapshot, records still inside the topic's
    /// retention that a consumer reading from this replica asked for (helper-121: only retention
    /// deletes records).
    #[tokio::test]
    async fn a_snapshot_installed_over_a_log_that_holds_it_deletes_no_record() {
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = LogConfig {
            segment_bytes_max: 4096,
            ..LogConfig::default()
        };
        let mut log =
            weft_storage::PartitionLog::open(dir.path().join("log"), config.clone()).expect("log");
        // Entries 1 to 30, one record of 1 KiB each (offsets 0 to 29), over several segments.
        for index in 1..=30 {
            crate::raft::log_store::tests::append_record(&mut log, index, &[7u8; 1024]);
        }
        log.flush().expect("flush");
        assert!(log.segment_count() > 3, "{} segments", log.segment_count());
        let meta = crate::meta::Metadata::new(Arc::new(
            weft_storage::SledMetaStore::open(dir.path().join("meta")).expect("meta"),
        ));
        let (mut store, reader, mut sm) = partition_over(dir.path(), log, config, &meta);
        // The snapshot ends at entry 20 (offset 19): the log holds it and ten entries more.
        let last = LogId::new(openraft::CommittedLeaderId::new(1, 0), 20);
        let state = PartitionState {
            last_applied: Some(last),
            high_watermark: 20,
            ..PartitionState::default()
        };
        let bytes = encode(&state).expect("encode");
        sm.install_snapshot(&meta_of(&state), Box::new(Cursor::new(bytes)))
            .await
            .expect("install");
        // What openraft does right after.
        store.purge(last).await.expect("purge");
        let (start, end) = reader
            .with_log(|log| (log.start_offset(), log.end()))
            .expect("log");
        assert_eq!(start, 0, "no record deleted");
        assert_eq!(
            end,
            LogPosition {
                next_offset: 30,
                next_index: 31
            }
        );
        let read = reader
            .with_log(|log| log.read(0, 1 << 20, 30))
            .expect("log")
            .expect("the first record reads");
        assert!(!read.is_empty(), "offset 0 reads");
    }

    /// Entries applied as lost (damaged on this replica) are recorded, so a leader knows its
    /// producer table misses their batches; once repaired, their batches are folded in and a
    /// retry of one is answered as the duplicate it is (before, the table never had them, and
    /// the retry was stored again).
    #[tokio::test]
    async fn lost_entries_are_recorded_and_their_batches_folded_in_once_repaired() {
        use openraft::storage::RaftStateMachine;
        let dir = tempfile::tempdir().expect("temp dir");
        let meta = crate::meta::Metadata::new(Arc::new(
            weft_storage::SledMetaStore::open(dir.path().join("meta")).expect("meta"),
        ));
        let (_store, _reader, mut sm) = open_partition(dir.path(), &meta);
        let lost = |index| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(Command::Lost { next_offset: 5 }),
        };
        // Producer 9 is known from before, at sequence 10 (its later batch came after).
        sm.shared.state.lock().expect("state").producers.insert(
            9,
            ProducerState {
                epoch: 0,
                batches: [batch(12, 1, 20)].into(),
                last_timestamp_ms: 1,
            },
        );
        // Producer 11 is known at epoch 0; in the lost range it started epoch 1.
        sm.shared.state.lock().expect("state").producers.insert(
            11,
            ProducerState {
                epoch: 0,
                batches: [batch(3, 1, 1)].into(),
                last_timestamp_ms: 1,
            },
        );
        sm.apply([lost(1), lost(2)]).await.expect("applied");
        sm.apply([lost(4)]).await.expect("applied");
        assert_eq!(sm.state().lost, BTreeMap::from([(1, 3), (4, 5)]));
        assert_eq!(sm.state().high_watermark, 5);
        let header = |producer_id, base_sequence, record_count, base_offset| BatchHeader {
            kind: weft_storage::EntryKind::Records,
            attributes: 0,
            record_count,
            base_offset,
            term: 1,
            index: 1,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
            producer_id,
            producer_epoch: 0,
            base_sequence,
        };
        // Not a lost range: nothing happens.
        sm.fold_repaired(1, 2, Some(vec![header(7, 0, 2, 0)]));
        assert!(!sm.state().producers.contains_key(&7));
        sm.fold_repaired(
            1,
            3,
            Some(vec![
                header(7, 0, 2, 0),
                BatchHeader {
                    max_timestamp_ms: 500,
                    ..header(9, 10, 2, 2)
                },
                BatchHeader {
                    max_timestamp_ms: 700,
                    ..header(0, 0, 1, 4)
                },
                BatchHeader {
                    producer_epoch: 1,
                    ..header(11, 0, 1, 4)
                },
            ]),
        );
        let state = sm.state();
        assert_eq!(state.lost, BTreeMap::from([(4, 5)]));
        assert_eq!(
            state.producers[&7].check(0, 0, 2),
            SequenceCheck::Duplicate(batch(0, 2, 0))
        );
        assert_eq!(state.producers[&7].check(0, 2, 1), SequenceCheck::Accept);
        assert_eq!(
            state.producers[&9].check(0, 10, 2),
            SequenceCheck::Duplicate(batch(10, 2, 2))
        );
        assert_eq!(state.producers[&9].check(0, 13, 1), SequenceCheck::Accept);
        assert_eq!(
            state.producers[&9].last_timestamp_ms, 500,
            "a batch found late is the producer's latest activity"
        );
        assert_eq!(
            state.producers[&11].check(1, 0, 1),
            SequenceCheck::Duplicate(batch(0, 1, 4)),
            "a newer epoch's batch found late starts the window over"
        );
        assert_eq!(state.producers[&11].check(1, 1, 1), SequenceCheck::Accept);
        assert_eq!(
            state.producers[&11].last_timestamp_ms, 700,
            "the partition's clock then counts every timestamp before it in the range"
        );
        // A range purged since is forgotten.
        sm.fold_repaired(4, 5, None);
        assert!(sm.state().lost.is_empty());
    }

    /// A partition's log store, reader and state machine over `dir` and `meta` (as a broker
    /// opens them).
    fn open_partition(
        dir: &std::path::Path,
        meta: &crate::meta::Metadata,
    ) -> (crate::raft::LogStore, LogReader, PartitionStateMachine) {
        let log =
            weft_storage::PartitionLog::open(dir.join("log"), LogConfig::default()).expect("log");
        partition_over(dir, log, LogConfig::default(), meta)
    }

    /// [`open_partition`] over `log`, opened already with `config`.
    fn partition_over(
        dir: &std::path::Path,
        log: weft_storage::PartitionLog,
        config: LogConfig,
        meta: &crate::meta::Metadata,
    ) -> (crate::raft::LogStore, LogReader, PartitionStateMachine) {
        let meta = meta.clone();
        let flusher =
            crate::raft::Flusher::start(crate::raft::SyncMode::Fdatasync).expect("flusher");
        let store = crate::raft::LogStore::new(5, log, meta, flusher).expect("store");
        let reader = store.reader();
        std::fs::create_dir_all(dir.join("sm")).expect("state machine dir");
        let sm = PartitionStateMachine::open(
            dir.join("sm"),
            config,
            reader.clone(),
            1 << 20,
            60_000,
            false,
        )
        .expect("state machine");
        (store, reader, sm)
    }

    /// A log whose prefix was deleted without a snapshot (by an older build) is adopted with a
    /// snapshot and a recorded purge through its first entry. A crash between the two left the
    /// snapshot written and the purge not recorded: the next open skipped the adoption (a
    /// snapshot existed), the log started past a purge nobody recorded, and openraft refused
    /// to open the group, at every attempt. Now the purge a snapshot covers is recorded.
    #[tokio::test]
    async fn a_purge_a_snapshot_covers_is_recorded_when_a_crash_lost_it() {
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().expect("temp dir");
        let meta = crate::meta::Metadata::new(Arc::new(
            weft_storage::SledMetaStore::open(dir.path().join("meta")).expect("meta"),
        ));
        {
            // A log that starts at index 5, offset 5.
            let mut log =
                weft_storage::PartitionLog::open(dir.path().join("log"), LogConfig::default())
                    .expect("log");
            log.reset(LogPosition {
                next_offset: 5,
                next_index: 5,
            })
            .expect("reset");
            for index in 5..8 {
                crate::raft::log_store::tests::append_record(&mut log, index, b"v");
            }
            log.flush().expect("flush");
            log.close().expect("close");
        }
        let purged = LogId::new(openraft::CommittedLeaderId::new(1, 0), 4);
        {
            // The adoption's snapshot is written; the broker stops before the purge's record.
            let (_store, _reader, sm) = open_partition(dir.path(), &meta);
            sm.reset_to(PartitionState {
                last_applied: Some(purged),
                high_watermark: 5,
                ..PartitionState::default()
            })
            .expect("snapshot");
        }
        let (mut store, reader, sm) = open_partition(dir.path(), &meta);
        assert_eq!(
            store
                .get_log_state()
                .await
                .expect("state")
                .last_purged_log_id,
            None
        );
        crate::raft::partition_group::adopt_headless_log(&sm, &reader, 5, 1, "127.0.0.1:1")
            .expect("adopt");
        assert_eq!(
            store
                .get_log_state()
                .await
                .expect("state")
                .last_purged_log_id,
            Some(purged)
        );
    }

    /// openraft 0.9 purges the log through a snapshot it installs as soon as it hands the
    /// snapshot to the state machine, without waiting for the state machine to write it. A
    /// crash in between left the purge recorded and the snapshot not: the broker restarted from
    /// an older state with the entries after it gone, and the group could not apply them.
    /// Now the purge waits until the snapshot file covers it.
    #[tokio::test]
    async fn a_purge_through_a_snapshot_not_yet_written_waits_for_it() {
        use openraft::storage::{RaftLogStorage, RaftStateMachine};
        let dir = tempfile::tempdir().expect("temp dir");
        let last = LogId::new(openraft::CommittedLeaderId::new(3, 0), 7098);
        // The metadata store outlives the "restarts" below (sled holds a lock on its files).
        let meta = crate::meta::Metadata::new(Arc::new(
            weft_storage::SledMetaStore::open(dir.path().join("meta")).expect("meta"),
        ));
        {
            let (mut store, _reader, _sm) = open_partition(dir.path(), &meta);
            store.purge(last).await.expect("purge");
            // The broker stops here, before the state machine installed the snapshot.
        }
        let (mut store, _reader, mut sm) = open_partition(dir.path(), &meta);
        let purged = store
            .get_log_state()
            .await
            .expect("log state")
            .last_purged_log_id;
        let (applied, _) = sm.applied_state().await.expect("applied");
        assert!(
            purged <= applied,
            "the log is purged through {purged:?}, past the state it restarts from ({applied:?})"
        );
        // The install done, the purge runs.
        store.purge(last).await.expect("purge");
        let state = PartitionState {
            last_applied: Some(last),
            high_watermark: 13_594,
            ..PartitionState::default()
        };
        let bytes = encode(&state).expect("encode");
        sm.install_snapshot(&meta_of(&state), Box::new(Cursor::new(bytes)))
            .await
            .expect("install");
        let purged = store
            .get_log_state()
            .await
            .expect("log state")
            .last_purged_log_id;
        assert_eq!(purged, Some(last));
        drop((store, sm));
        let (mut store, reader, mut sm) = open_partition(dir.path(), &meta);
        let purged = store
            .get_log_state()
            .await
            .expect("log state")
            .last_purged_log_id;
        let (applied, _) = sm.applied_state().await.expect("applied");
        assert_eq!((purged, applied), (Some(last), Some(last)));
        assert_eq!(
            reader.with_log(|log| log.end()).expect("log"),
            LogPosition {
                next_offset: 13_594,
                next_index: 7099
            }
        );
    }

    /// openraft builds snapshots on a task of their own: a build that started before an
    /// install finds the installed snapshot file, later than its own state, and answers with
    /// it. Its report must not let the install's purge run before the install has made the log
    /// ready for it (found by review: the purge reset the log while the install was filling
    /// it with the entries before the snapshot).
    #[tokio::test]
    async fn a_build_answered_with_a_later_snapshot_does_not_release_its_purge() {
        use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder};
        let dir = tempfile::tempdir().expect("temp dir");
        let meta = crate::meta::Metadata::new(Arc::new(
            weft_storage::SledMetaStore::open(dir.path().join("meta")).expect("meta"),
        ));
        let (mut store, reader, sm) = open_partition(dir.path(), &meta);
        // The state machine has applied through entry 10 (and a snapshot covers it).
        let applied = LogId::new(openraft::CommittedLeaderId::new(3, 0), 10);
        sm.reset_to(PartitionState {
            last_applied: Some(applied),
            ..PartitionState::default()
        })
        .expect("state");
        let last = LogId::new(openraft::CommittedLeaderId::new(3, 0), 7098);
        let before = reader.with_log(|log| log.end()).expect("log");
        // The install's purge, held back; the install has written its snapshot file.
        store.purge(last).await.expect("purge");
        let installed = PartitionState {
            last_applied: Some(last),
            high_watermark: 13_594,
            ..PartitionState::default()
        };
        sm.persist(installed).await.expect("persist");
        // A build of the (older) state the state machine still holds.
        let mut builder = sm.clone();
        let built = builder.build_snapshot().await.expect("build");
        assert_eq!(
            built.meta.last_log_id,
            Some(last),
            "answered with the later file"
        );
        assert_eq!(
            reader.with_log(|log| log.end()).expect("log"),
            before,
            "the log is left to the install"
        );
    }

    /// A build of an older state that a repair refolded meanwhile (the flag says "write even at
    /// the same index") must not write that older state over a later installed snapshot: the
    /// log is purged through the later one, so a restart from the older file would need
    /// entries that are gone (from helper-64's review).
    #[tokio::test]
    async fn a_refolded_build_never_writes_an_older_state_over_a_later_snapshot() {
        use openraft::storage::RaftSnapshotBuilder;
        let dir = tempfile::tempdir().expect("temp dir");
        let meta = crate::meta::Metadata::new(Arc::new(
            weft_storage::SledMetaStore::open(dir.path().join("meta")).expect("meta"),
        ));
        let (_store, _reader, sm) = open_partition(dir.path(), &meta);
        let applied = LogId::new(openraft::CommittedLeaderId::new(3, 0), 10);
        sm.reset_to(PartitionState {
            last_applied: Some(applied),
            lost: BTreeMap::from([(1, 3)]),
            ..PartitionState::default()
        })
        .expect("state");
        let later = LogId::new(openraft::CommittedLeaderId::new(3, 0), 7098);
        sm.persist(PartitionState {
            last_applied: Some(later),
            high_watermark: 13_594,
            ..PartitionState::default()
        })
        .await
        .expect("persist the installed snapshot");
        sm.fold_repaired(1, 3, None);
        let mut builder = sm.clone();
        let built = builder.build_snapshot().await.expect("build");
        assert_eq!(
            built.meta.last_log_id,
            Some(later),
            "answered with the later file"
        );
        let stored = weft_storage::snapshot::read_snapshot(&dir.path().join("sm"))
            .expect("read")
            .expect("a snapshot file");
        assert_eq!(
            decode(&stored).expect("decode").last_applied,
            Some(later),
            "the later snapshot stays on disk"
        );
    }

    #[test]
    fn snapshot_documents_round_trip_and_unknown_versions_are_refused() {
        let mut state = PartitionState {
            high_watermark: 42,
            ..PartitionState::default()
        };
        state.producers.insert(
            7,
            ProducerState {
                epoch: 2,
                batches: VecDeque::from([batch(10, 5, 37)]),
                last_timestamp_ms: 1,
            },
        );
        let bytes = encode(&state).expect("encode");
        assert_eq!(decode(&bytes).expect("decode"), state);
        let future =
            serde_json::to_vec(&serde_json::json!({"version": 99, "state": state})).expect("json");
        assert!(decode(&future).expect_err("unknown version").contains("99"));
        assert!(decode(b"{").is_err());
    }
}
