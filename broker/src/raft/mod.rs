//! Everything that touches openraft lives in this module; the rest of the broker uses the small
//! handles it exports.
//!
//! # Layout
//! - [`TypeConfig`], [`Command`], [`Response`]: what a Raft entry carries and what applying it returns.
//! - `entry`: the mapping between openraft entries and segment-store batches. A partition's Raft
//!   log **is** its partition log: record batches are stored once, as Raft entries.
//! - `log_store`: [`LogStore`], openraft's `RaftLogStorage` over a `weft_storage::PartitionLog`,
//!   write-behind: appends are kept in memory until the node's flusher writes them.
//! - `flusher`: [`Flusher`], one thread per node that writes every group's pending appends and
//!   makes them durable together (one round, fdatasyncs side by side), then completes them.
//! - `partition_sm` / `controller_sm`: the state machines of partition groups (high watermark,
//!   producer sequences) and of the controller group (topics).
//! - `network`: how groups reach their peers.
//! - [`PartitionGroup`], [`ControllerGroup`]: the handles the rest of the broker uses; they open a
//!   group, propose, snapshot, purge and stop it.

// openraft's storage traits dictate `StorageError` (208 bytes) as the error of every call; boxing it
// in our helpers would only add conversions.
#![allow(clippy::result_large_err)]

mod batch;
mod controller_group;
mod controller_sm;
mod entry;
mod flusher;
mod log_store;
mod network;
mod partition_group;
mod partition_sm;
mod transfer;
mod wire;

use std::io::Cursor;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use controller_group::{ControllerGroup, ControllerService, controller_raft_config};
pub use controller_sm::{
    BrokerMeta, CLUSTER_ID_LEVEL, ControllerCommand, ControllerResponse, ControllerState,
    ControllerStateMachine, DRAINING_MARK_LEVEL, FEATURE_LEVEL, GroupOffsets,
    LAST_BROKER_CHECK_LEVEL, PLACEMENT_LEVEL, PartitionMeta, PlannedMove, TopicBase, TopicMeta,
    UPDATE_BASE_LEVEL, feature_level,
};
pub use flusher::{Flusher, SyncMode, syncfs_reports_errors};
pub use log_store::{LogReader, LogStore};
pub use network::{PEER_MESSAGE_BYTES_MAX, Peers, RaftService, Recovery, SettledHook};
pub use partition_group::{
    FollowerLag, GroupSpec, GroupStatus, MoveStep, PartitionGroup, Proposal,
};
pub use partition_sm::{
    PRODUCER_BATCHES_KEPT, PRODUCER_EXPIRY_EVERY_ENTRIES, PartitionState, PartitionStateMachine,
    ProducerBatch, ProducerState, SequenceCheck, expire_producers,
};
pub(crate) use transfer::transfer_leadership;

/// Node ids are u64: the StatefulSet ordinal + 1, or 1 for a single node.
pub type NodeId = u64;

/// A Raft group id: 0 is the controller, partitions get ids from the controller.
pub type GroupId = u64;

/// The controller group's id.
pub const CONTROLLER_GROUP: GroupId = 0;

openraft::declare_raft_types!(
    /// Weft's openraft types.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle type.
pub type Raft = openraft::Raft<TypeConfig>;
/// Raft settings (timing, snapshots) of a group.
pub type RaftConfig = openraft::Config;
/// A Raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A Raft log id: (term, index) in single-term-leader mode.
pub type LogId = openraft::LogId<NodeId>;
/// The last built or installed snapshot: its metadata and bytes.
pub(crate) type StoredSnapshot =
    std::sync::Mutex<Option<(openraft::SnapshotMeta<NodeId, openraft::BasicNode>, Vec<u8>)>>;

/// On a group's leader: the index of the last entry `node` is known to hold (None when it
/// holds none, or this node does not lead).
pub(crate) fn matched_index(
    m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>,
    node: NodeId,
) -> Option<u64> {
    m.replication
        .as_ref()
        .and_then(|r| r.get(&node))
        .and_then(|l| l.map(|l| l.index))
}

/// A state-machine error as openraft wants it.
pub(crate) fn sm_error(e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::write_state_machine(openraft::AnyError::error(e.to_string())).into()
}

/// A snapshot's payload: `{"version": .., "state": ..}` in JSON.
pub(crate) fn encode_snapshot<S: Serialize>(
    version: u32,
    state: &S,
) -> Result<Vec<u8>, StorageError> {
    #[derive(Serialize)]
    struct Document<'a, S> {
        version: u32,
        state: &'a S,
    }
    serde_json::to_vec(&Document { version, state }).map_err(sm_error)
}

/// The state in a snapshot payload written by [`encode_snapshot`] at `version`.
pub(crate) fn decode_snapshot<S: serde::de::DeserializeOwned>(
    version: u32,
    bytes: &[u8],
) -> Result<S, String> {
    #[derive(Deserialize)]
    struct Document<S> {
        version: u32,
        state: S,
    }
    let document: Document<S> =
        serde_json::from_slice(bytes).map_err(|e| format!("undecodable snapshot: {e}"))?;
    if document.version != version {
        return Err(format!(
            "snapshot version {} is not known to this build",
            document.version
        ));
    }
    Ok(document.state)
}

/// On the leader of `raft`'s group (`group_id`): Some(the window in ms) when a majority of its
/// voters has not answered it (an AppendEntries, a vote) within `timeouts` election timeouts:
/// the others may have elected another leader meanwhile (openraft 0.9 has no leader lease: an
/// isolated leader keeps believing it leads). None otherwise, and off the leader.
pub(crate) fn lost_quorum(
    raft: &Raft,
    peers: &Peers,
    group_id: GroupId,
    timeouts: u32,
) -> Option<u64> {
    let (me, voters) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        if m.current_leader != Some(m.id) {
            return None;
        }
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        (m.id, voters)
    };
    if voters.len() <= 1 {
        // A single voter is its own quorum (every publish of a single node asks).
        return None;
    }
    let window = std::time::Duration::from_millis(raft.config().election_timeout_min) * timeouts;
    let mut ages: Vec<std::time::Duration> = voters
        .iter()
        .map(|&v| {
            if v == me {
                std::time::Duration::ZERO
            } else {
                // The time since, pauses included: a transfer's wait counts here (its
                // followers may have elected another leader meanwhile).
                peers
                    .last_contact(group_id, v)
                    .map_or(std::time::Duration::MAX, |t| t.elapsed())
            }
        })
        .collect();
    ages.sort_unstable();
    // The youngest contact a majority has had with this leader.
    let majority_age = ages.get(voters.len() / 2).copied()?;
    (majority_age > window).then(|| u64::try_from(window.as_millis()).unwrap_or(u64::MAX))
}

/// Watches who leads `raft`'s group (a task maps openraft's metrics; it ends with the group
/// or when nobody watches any more).
pub(crate) fn watch_leader(raft: &Raft) -> tokio::sync::watch::Receiver<Option<NodeId>> {
    let mut metrics = raft.metrics();
    let (tx, rx) = tokio::sync::watch::channel(metrics.borrow().current_leader);
    tokio::spawn(async move {
        while metrics.changed().await.is_ok() {
            let leader = metrics.borrow().current_leader;
            tx.send_if_modified(|current| {
                let changed = *current != leader;
                *current = leader;
                changed
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// The snapshot last taken or installed.
pub(crate) fn current_snapshot(
    stored: &StoredSnapshot,
) -> Result<Option<openraft::storage::Snapshot<TypeConfig>>, StorageError> {
    let current = stored.lock().map_err(sm_error)?.clone();
    Ok(current.map(|(meta, data)| openraft::storage::Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(data)),
    }))
}

/// A storage error as openraft wants it.
pub type StorageError = openraft::StorageError<NodeId>;

/// What a Raft entry carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Record batches for a partition, in the segment-store encoding: one entry, stored as one
    /// frame (the publishes of several producers, coalesced). The leader proposes them with
    /// placeholder position fields; the log store stamps offsets, term and index where the entry
    /// lands, the batches' offsets following each other.
    Records(Vec<Bytes>),
    /// A change to cluster metadata (controller group only).
    Controller(ControllerCommand),
    /// Stands in for an entry whose bytes are damaged on this broker's disk (never proposed,
    /// never stored): made by the log store when a read runs into a damaged range, so the state
    /// machine moves past it. The range's records end before `next_offset`; applying it moves
    /// the partition's next offset there. Its records are lost on this broker (reads of them
    /// answer DATA_LOSS); its producers' sequence numbers are unknown.
    Lost {
        /// The offset of the first intact record after the damaged range.
        next_offset: u64,
    },
}

/// What applying an entry returns to the proposer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Where an entry's record batches were stored: the first at `base_offset`, each of the
    /// others right after the one before.
    Appended {
        /// Offset of the entry's first record.
        base_offset: u64,
        /// Records in the entry.
        record_count: u64,
    },
    /// The result of a controller command.
    Controller(ControllerResponse),
    /// Nothing to report (blank and membership entries, or a command for the wrong group).
    Empty,
}

/// Raft timing and snapshot settings for one group. `snapshot_every_entries`: build a snapshot
/// after that many applied entries (partitions also snapshot by applied bytes, before a purge and
/// at shutdown); None: never. Raft never purges the log by itself: a partition's log is its data,
/// and retention purges it explicitly (after a snapshot covers what it deletes).
pub fn raft_config(
    cluster_name: &str,
    heartbeat_ms: u64,
    election_timeout_ms: u64,
    snapshot_every_entries: Option<u64>,
) -> anyhow::Result<openraft::Config> {
    let config = openraft::Config {
        cluster_name: cluster_name.to_string(),
        heartbeat_interval: heartbeat_ms,
        election_timeout_min: election_timeout_ms,
        // openraft makes the maximum the leader's lease too: a follower that has a leader waits
        // lease + a random timeout before it stands, so a narrow range fails over sooner.
        election_timeout_max: election_timeout_ms + election_timeout_ms / 4,
        snapshot_policy: match snapshot_every_entries {
            Some(entries) => openraft::SnapshotPolicy::LogsSinceLast(entries),
            None => openraft::SnapshotPolicy::Never,
        },
        max_in_snapshot_log_to_keep: u64::MAX,
        max_payload_entries: network::PAYLOAD_ENTRIES_MAX,
        // Elections start from the election watch, after a pre-vote (`Peers::watch_leaders`).
        enable_elect: false,
        ..Default::default()
    };
    Ok(config.validate()?)
}
