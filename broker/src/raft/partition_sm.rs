//! The state machine of a partition group. The records themselves stay in the log; applying an
//! entry only advances the high watermark (the offset after the last committed record) and the
//! producers' last sequences, which deduplicate retried publishes.

use std::collections::{BTreeMap, VecDeque};
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{BasicNode, EntryPayload, OptionalSend, RaftSnapshotBuilder, StoredMembership};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weft_storage::Batch;

use super::{
    Command, Entry, LogId, NodeId, Response, StorageError, StoredSnapshot, TypeConfig,
    current_snapshot, sm_error, take_snapshot,
};

/// Batches remembered per producer for answering retries (as Kafka does).
pub const PRODUCER_BATCHES_KEPT: usize = 5;

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
}

/// The verdict on a publish from an idempotent producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// New and in order: append it.
    Accept,
    /// Already stored: answer with the original offsets.
    Duplicate(ProducerBatch),
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
        // Anything else out of order is a gap: ahead of the next sequence, or a retry older than
        // the batches remembered, or one that overlaps them.
        let expected = self.next_sequence();
        if base_sequence == expected {
            SequenceCheck::Accept
        } else {
            SequenceCheck::Gap { expected }
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
}

#[derive(Debug)]
struct Shared {
    state: Mutex<PartitionState>,
    high_watermark: watch::Sender<u64>,
    snapshot: StoredSnapshot,
}

/// A partition's state machine. Clones share state: one goes to openraft, others to the broker.
#[derive(Debug, Clone)]
pub struct PartitionStateMachine {
    shared: Arc<Shared>,
}

impl Default for PartitionStateMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl PartitionStateMachine {
    /// An empty state machine.
    pub fn new() -> Self {
        PartitionStateMachine {
            shared: Arc::new(Shared {
                state: Mutex::new(PartitionState::default()),
                high_watermark: watch::Sender::new(0),
                snapshot: Mutex::new(None),
            }),
        }
    }

    /// A copy of the current state.
    pub fn state(&self) -> PartitionState {
        self.shared
            .state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Watches the high watermark (for long-polling consumers).
    pub fn high_watermark(&self) -> watch::Receiver<u64> {
        self.shared.high_watermark.subscribe()
    }

    fn apply_one(state: &mut PartitionState, entry: &Entry) -> Result<Response, StorageError> {
        state.last_applied = Some(entry.log_id);
        Ok(match &entry.payload {
            EntryPayload::Blank => Response::Empty,
            EntryPayload::Membership(m) => {
                state.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                Response::Empty
            }
            EntryPayload::Normal(Command::Controller(_)) => Response::Empty,
            EntryPayload::Normal(Command::Records(bytes)) => {
                // Applied entries come from the log reader, which checked every batch in full:
                // only the header is needed here.
                let h = Batch::header_of(bytes).map_err(sm_error)?;
                state.high_watermark = h.next_offset();
                if h.producer_id != 0 {
                    state.producers.entry(h.producer_id).or_default().record(
                        h.producer_epoch,
                        ProducerBatch {
                            base_sequence: h.base_sequence,
                            record_count: h.record_count,
                            base_offset: h.base_offset,
                        },
                    );
                }
                Response::Appended {
                    base_offset: h.base_offset,
                    record_count: h.record_count,
                }
            }
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let state = self.state();
        take_snapshot(
            &self.shared.snapshot,
            &state,
            state.last_applied,
            state.last_membership.clone(),
        )
    }
}

impl RaftStateMachine<TypeConfig> for PartitionStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let state = self.state();
        Ok((state.last_applied, state.last_membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let high_watermark = {
            let mut state = self.shared.state.lock().map_err(sm_error)?;
            for entry in entries {
                responses.push(Self::apply_one(&mut state, &entry)?);
            }
            state.high_watermark
        };
        self.shared.high_watermark.send_replace(high_watermark);
        Ok(responses)
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
        let state: PartitionState = serde_json::from_slice(&data).map_err(sm_error)?;
        let high_watermark = state.high_watermark;
        *self.shared.state.lock().map_err(sm_error)? = state;
        *self.shared.snapshot.lock().map_err(sm_error)? = Some((meta.clone(), data));
        self.shared.high_watermark.send_replace(high_watermark);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        current_snapshot(&self.shared.snapshot)
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
    }
}
