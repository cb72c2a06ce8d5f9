//! The handle the rest of the broker uses for one partition's Raft group: open it (log, snapshot,
//! state machine, Raft), propose record batches, read its state, snapshot, purge, stop. Nothing
//! outside `raft/` sees an openraft type.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, CommittedLeaderId, Membership, StoredMembership};
use tokio::sync::watch;
use weft_storage::{LogConfig, PartitionLog, RecoveryReport};

use crate::meta::Metadata;

use super::{
    Command, Flusher, GroupId, LogId, LogReader, LogStore, NodeId, PartitionState,
    PartitionStateMachine, Peers, ProducerState, Raft, Response,
};
use crate::error::BrokerError;

/// Bytes of committed entries read at a time when a partition re-applies the tail after its
/// snapshot at open (see `PartitionStateMachine::apply_committed_tail`).
const TAIL_APPLY_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// What opening a partition group needs.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// Raft group id.
    pub group_id: GroupId,
    /// The partition directory.
    pub dir: PathBuf,
    /// This node.
    pub node_id: NodeId,
    /// This node's peer address (stored in the membership).
    pub peer_address: String,
    /// Every replica with its peer address, the first replica first; empty for a replica of one.
    /// On first start the first replica initialises the group with all of them as voters; the
    /// others wait for its leader to reach them.
    pub members: Vec<(NodeId, String)>,
    /// Segment-store configuration.
    pub log_config: LogConfig,
    /// Take a snapshot after this many record bytes were applied.
    pub snapshot_interval_bytes: u64,
    /// Forget producers idle this long (by record timestamps).
    pub producer_expiration_ms: u64,
}

/// Where a partition group stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupStatus {
    /// Current term.
    pub term: u64,
    /// Current leader, if known.
    pub leader: Option<NodeId>,
    /// Index of the last entry in the log.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry.
    pub last_applied_index: Option<u64>,
    /// Index of the last entry the snapshot covers.
    pub snapshot_index: Option<u64>,
    /// Index of the last purged entry.
    pub purged_index: Option<u64>,
}

/// What one step of a replica move did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveStep {
    /// The group's voters are the target replicas.
    Done,
    /// The target replicas vote, and this node (not one of them) passed the leadership on.
    LeadershipMoved(NodeId),
}

/// How far a follower is behind its leader's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerLag {
    /// The follower.
    pub node: NodeId,
    /// Raft entries it lacks.
    pub entries: u64,
    /// Bytes of those entries in the leader's log (from its sparse index: at most one index
    /// interval more).
    pub bytes: u64,
}

/// An outcome of a proposal, once its entry is applied: the base offset of the stored batch.
pub type Proposal = Pin<Box<dyn Future<Output = Result<u64, BrokerError>> + Send>>;

/// One partition's Raft group on this node.
#[derive(Clone)]
pub struct PartitionGroup {
    raft: Raft,
    sm: PartitionStateMachine,
    reader: LogReader,
    /// The last log index when the group was opened: it is caught up once this is applied.
    opened_at_index: Option<u64>,
    /// What the snapshot covered when the group was opened.
    opened_snapshot_index: Option<u64>,
    /// What opening the log found (a torn tail cut, damaged ranges).
    report: Arc<RecoveryReport>,
    group_id: GroupId,
    peers: Peers,
    /// While a leadership transfer runs: the node leadership goes to (0 otherwise).
    transferring_to: Arc<std::sync::atomic::AtomicU64>,
    /// When a transfer last held back the heartbeats (for how recent followers' answers are).
    pause: Arc<super::transfer::HeartbeatPause>,
    /// The term in which this replica, leading with damaged entries not repaired, first
    /// refused idempotent publishes, and when.
    lost_refusal: Arc<std::sync::Mutex<Option<(u64, std::time::Instant)>>>,
}

fn fatal(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable {
        reason: format!("partition group stopped: {e}"),
        leader: None,
    }
}

impl std::fmt::Debug for PartitionGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionGroup").finish_non_exhaustive()
    }
}

impl PartitionGroup {
    /// Opens the partition's log and snapshot and starts its Raft group as the single voter
    /// `node_id` (on first start). Reads the snapshot and the log's tail, never the whole log.
    pub async fn open(
        spec: GroupSpec,
        meta: Metadata,
        raft_config: Arc<openraft::Config>,
        flusher: Flusher,
        peers: Peers,
    ) -> Result<PartitionGroup, String> {
        let GroupSpec {
            group_id,
            dir,
            node_id,
            peer_address,
            members,
            log_config,
            snapshot_interval_bytes,
            producer_expiration_ms,
        } = spec;
        let open_dir = dir.clone();
        let open_config = log_config.clone();
        let log = tokio::task::spawn_blocking(move || PartitionLog::open(&open_dir, open_config))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot open the log: {e}"))?;
        let report = log.recovery_report().clone();
        if !report.corruptions.is_empty() {
            tracing::error!(dir = %dir.display(), ?report, "partition log has damaged ranges");
        }
        let store = LogStore::new(group_id, log, meta, flusher).map_err(|e| e.to_string())?;
        let reader = store.reader();
        let sm_dir = dir.clone();
        let sm_reader = reader.clone();
        let address = peer_address.clone();
        let sole_replica = members.iter().all(|(id, _)| *id == node_id);
        let sm = tokio::task::spawn_blocking(move || {
            let sm = PartitionStateMachine::open(
                sm_dir,
                log_config,
                sm_reader.clone(),
                snapshot_interval_bytes,
                producer_expiration_ms,
                sole_replica,
            )?;
            adopt_headless_log(&sm, &sm_reader, group_id, node_id, &address)?;
            Ok::<_, String>(sm)
        })
        .await
        .map_err(|e| e.to_string())??;
        fill_missing_tail(&sm, &reader, &peers, group_id, node_id).await?;
        let opened_snapshot_index = sm.state().last_applied.map(|l| l.index);
        if reader.syncs_before_ack()
            && let Some(committed) = reader.saved_committed_log_id()
        {
            let tail_sm = sm.clone();
            let entries = tokio::task::spawn_blocking(move || {
                tail_sm.apply_committed_tail(committed, TAIL_APPLY_CHUNK_BYTES)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot re-apply the committed tail: {e}"))?;
            tracing::info!(group_id, entries, committed = %committed, "re-applied the committed entries after the snapshot");
        }
        if members.len() > 1 {
            // openraft checks election timeouts on a tick (every 1.5 heartbeats), and each
            // group draws its timeout once, from a range narrower than a tick: replicas that
            // open a new partition together (on the same controller commit) tick in step and
            // stand at the same moment, election after election, splitting the votes (seen:
            // 15 to 26 s without a leader after the leader was killed). Each broker starts its
            // groups on a grid of its own (a random phase within one tick): its groups tick
            // together (their heartbeats travel in one call per peer), apart from other
            // brokers' groups.
            let tick = Duration::from_millis((raft_config.heartbeat_interval * 3 / 2).max(1));
            tokio::time::sleep(until_tick_phase(tick)).await;
        }
        let raft = Raft::new(
            node_id,
            raft_config,
            peers.network(group_id),
            store,
            sm.clone(),
        )
        .await
        .map_err(|e| format!("cannot start the Raft group: {e}"))?;
        if !raft.is_initialized().await.map_err(|e| e.to_string())? {
            let first = members.first().is_none_or(|(id, _)| *id == node_id);
            let members: BTreeMap<NodeId, BasicNode> = if members.is_empty() {
                BTreeMap::from([(node_id, BasicNode::new(peer_address))])
            } else {
                members
                    .into_iter()
                    .map(|(id, address)| (id, BasicNode::new(address)))
                    .collect()
            };
            if first {
                raft.initialize(members)
                    .await
                    .map_err(|e| format!("cannot initialise the Raft group: {e}"))?;
            }
        }
        let opened_at_index = raft.metrics().borrow().last_log_index;
        peers.register(group_id, raft.clone());
        peers.register_reader(group_id, reader.clone());
        sm.enable_backfill(peers.clone(), group_id);
        Ok(PartitionGroup {
            group_id,
            peers,
            transferring_to: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            pause: Arc::default(),
            lost_refusal: Arc::default(),
            raft,
            sm,
            reader,
            opened_at_index,
            opened_snapshot_index,
            report: Arc::new(report),
        })
    }

    /// The group's id.
    pub fn group_id(&self) -> GroupId {
        self.group_id
    }

    /// When this replica, leading in `term` with damaged entries not repaired, began refusing
    /// idempotent publishes (now, on the first call of a term).
    pub fn lost_refusal_since(&self, term: u64) -> Option<std::time::Instant> {
        let mut since = self.lost_refusal.lock().ok()?;
        match *since {
            Some((t, at)) if t == term => Some(at),
            _ => {
                let now = std::time::Instant::now();
                *since = Some((term, now));
                Some(now)
            }
        }
    }

    /// Reads the whole log once, so damage anywhere in it is found and mapped (see
    /// [`scrub_log`]). Returns the damaged ranges known afterwards.
    pub async fn scrub(&self) -> Result<usize, String> {
        scrub_log(&self.reader).await
    }

    /// Repairs the damaged ranges of this replica's log that lie within what it has applied
    /// (committed entries are the same on every replica that holds them) with the entries of
    /// another replica, read over the peer port (ReadLog) and written over the damaged bytes.
    /// Returns how many damaged ranges are left (not committed yet, or no replica could give
    /// them: retried later).
    pub async fn repair_damage(&self) -> usize {
        let (applied, nodes) = {
            let m = self.raft.metrics().borrow().clone();
            let nodes: Vec<(NodeId, String)> = m
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect();
            (m.last_applied.map(|l| l.index), nodes)
        };
        let left = repair_ranges(
            &self.reader,
            &self.peers,
            self.group_id,
            &nodes,
            Some(applied),
        )
        .await;
        self.fold_repaired().await;
        left
    }

    /// Folds into the producer table the batches of entries this replica applied as lost,
    /// once they are repaired (read back whole), and forgets lost entries purged since.
    async fn fold_repaired(&self) {
        let lost = self.sm.lost();
        for (first, next) in lost {
            let reader = self.reader.clone();
            // Read on the blocking pool: a range may span a segment.
            let read = tokio::task::spawn_blocking(move || {
                reader.with_log(|log| repaired_headers(log, first, next))
            })
            .await;
            match read {
                Ok(Ok(Repaired::Whole(headers))) => {
                    self.sm.fold_repaired(first, next, Some(headers));
                    tracing::info!(
                        group = self.group_id,
                        first,
                        next,
                        "folded the producer batches of repaired entries into the producer table"
                    );
                }
                Ok(Ok(Repaired::Purged)) => {
                    self.sm.fold_repaired(first, next, None);
                    tracing::info!(
                        group = self.group_id,
                        first,
                        next,
                        "entries applied as lost were purged since: forgotten"
                    );
                }
                _ => {}
            }
        }
    }

    /// What opening the log found.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The log, for reads.
    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    /// Watches the high watermark.
    pub fn high_watermark(&self) -> watch::Receiver<u64> {
        self.sm.high_watermark()
    }

    /// When records were last committed.
    pub fn committed_at(&self) -> std::time::Instant {
        self.sm.advanced_at()
    }

    /// The current high watermark.
    pub fn high_watermark_now(&self) -> u64 {
        *self.sm.high_watermark().borrow()
    }

    /// The idempotent producers as of the last applied entry.
    pub fn producers(&self) -> BTreeMap<u64, ProducerState> {
        self.sm.state().producers
    }

    /// A copy of the applied state.
    pub fn state(&self) -> PartitionState {
        self.sm.state()
    }

    /// Term, leader and log positions.
    pub fn status(&self) -> GroupStatus {
        let m = self.raft.metrics().borrow().clone();
        GroupStatus {
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
        }
    }

    /// Why the group stopped, if it did (a storage error, say).
    pub fn stopped(&self) -> Option<String> {
        self.raft
            .metrics()
            .borrow()
            .running_state
            .as_ref()
            .err()
            .map(ToString::to_string)
    }

    /// Resolves when the group has stopped (a storage error, say), with the reason.
    pub async fn stopped_wait(&self) -> String {
        let _ = self
            .raft
            .wait(None)
            .metrics(|m| m.running_state.is_err(), "stopped")
            .await;
        self.stopped()
            .unwrap_or_else(|| "the partition group stopped".into())
    }

    /// Resolves once the group has a leader (this node or another replica) and this replica has
    /// applied everything its log held when the group was opened: its state is then current.
    pub async fn caught_up(&self) -> Result<(), BrokerError> {
        let target = self.opened_at_index;
        self.raft
            .wait(None)
            .metrics(
                |m| {
                    m.running_state.is_err()
                        || caught_up(
                            m.current_leader.is_some(),
                            m.last_applied.map(|l| l.index),
                            m.last_log_index,
                            target,
                        )
                },
                "caught up",
            )
            .await
            .map_err(fatal)?;
        match self.stopped() {
            Some(reason) => Err(fatal(reason)),
            None => Ok(()),
        }
    }

    /// Entries and record bytes re-applied after opening (from the snapshot to the log's end at
    /// open).
    pub fn replayed(&self) -> (u64, u64) {
        let (bytes, entries) = self.sm.applied_since_open();
        let replay_entries = match (self.opened_at_index, self.opened_snapshot_index) {
            (Some(end), Some(snap)) => end.saturating_sub(snap),
            (Some(end), None) => end + 1,
            (None, _) => 0,
        };
        (replay_entries.min(entries), bytes)
    }

    /// Resolves when enough records were applied since the last snapshot to take another.
    pub async fn snapshot_due(&self) {
        self.sm.snapshot_due().await
    }

    /// Confirms this node still leads (with a quorum) and has applied every committed entry.
    /// While its leadership moves it answers UNAVAILABLE naming the target at once: confirming
    /// would send the followers a round of heartbeats, renew their leader leases, and make them
    /// refuse their votes to the target.
    pub async fn ensure_leader(&self) -> Result<(), BrokerError> {
        self.check_not_transferring()?;
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(BrokerError::Unavailable {
                    reason: "this broker does not lead the partition".into(),
                    leader: f.leader_id,
                })
            }
            Err(e) => Err(BrokerError::Unavailable {
                reason: e.to_string(),
                leader: None,
            }),
        }
    }

    fn check_not_transferring(&self) -> Result<(), BrokerError> {
        let moving_to = self
            .transferring_to
            .load(std::sync::atomic::Ordering::SeqCst);
        if moving_to != 0 {
            return Err(BrokerError::Unavailable {
                reason: "leadership is moving to another replica".into(),
                leader: Some(moving_to),
            });
        }
        Ok(())
    }

    /// Proposes encoded record batches as one entry (sealed with placeholder offsets: the log
    /// store stamps them where the entry lands, one after the other). Returns at once with a
    /// future of the first batch's stored base offset.
    pub async fn propose(&self, batches: Vec<Bytes>) -> Result<Proposal, BrokerError> {
        self.check_not_transferring()?;
        if let Some(window_ms) = self.lost_quorum() {
            // A leader cut off from a majority (a network partition): its writes cannot commit,
            // and a majority elsewhere may have a new leader already. Refuse them at once rather
            // than leave the client waiting for a timeout it cannot tell from a failure.
            return Err(BrokerError::Unavailable {
                reason: format!(
                    "this broker leads the partition but has not heard from a majority of its \
                     replicas for more than {window_ms} ms; another replica may lead it now"
                ),
                leader: None,
            });
        }
        // A snapshot installed after this entry was appended may cover it (this replica lost
        // the leadership, and the new leader had purged past its log): openraft then never
        // answers the proposal (it answers only entries it applies or truncates).
        let mut installs = self.sm.installs();
        let mut receiver = self
            .raft
            .client_write_ff(Command::Records(batches))
            .await
            .map_err(fatal)?;
        Ok(Box::pin(async move {
            let answer = tokio::select! {
                biased;
                answer = &mut receiver => answer,
                () = installed(&mut installs) => {
                    // The answer may be on its way still.
                    match tokio::time::timeout(INSTALL_ANSWER_GRACE, &mut receiver).await {
                        Ok(answer) => answer,
                        Err(_) => {
                            return Err(BrokerError::Unavailable {
                                reason: "this replica took a snapshot from the partition's \
                                         leader: the publish may or may not be stored (retry \
                                         it with the same producer sequence)"
                                    .into(),
                                leader: None,
                            });
                        }
                    }
                }
            };
            match answer {
                Ok(Ok(response)) => match response.data {
                    Response::Appended { base_offset, .. } => Ok(base_offset),
                    other => Err(BrokerError::Internal(format!(
                        "unexpected apply result {other:?}"
                    ))),
                },
                Ok(Err(ClientWriteError::ForwardToLeader(f))) => Err(BrokerError::Unavailable {
                    reason: "not the partition leader".into(),
                    leader: f.leader_id,
                }),
                Ok(Err(e)) => Err(BrokerError::Unavailable {
                    reason: e.to_string(),
                    leader: None,
                }),
                Err(_) => Err(BrokerError::Unavailable {
                    reason: "the partition group stopped before answering".into(),
                    leader: None,
                }),
            }
        }))
    }

    /// Moves this group's leadership to `target` (or to the most caught-up other voter): see
    /// [`super::transfer_leadership`]. Publishes answer UNAVAILABLE naming the target meanwhile.
    pub async fn transfer_leadership(
        &self,
        target: Option<NodeId>,
        avoid: &BTreeSet<NodeId>,
        timeout: Duration,
    ) -> Result<NodeId, BrokerError> {
        super::transfer_leadership(
            &self.raft,
            &self.peers,
            self.group_id,
            target,
            avoid,
            timeout,
            Some(&self.transferring_to),
            Some(&self.pause),
        )
        .await
    }

    /// One step of moving the group's voters to `target` (node ids with peer addresses), on its
    /// leader: adds the new replicas as learners and waits until they have every entry, then
    /// makes `target` the voters when this leader is one of them ([`MoveStep::Done`]), or else
    /// adds them as voters and moves the leadership to one of them
    /// ([`MoveStep::LeadershipMoved`]: the new leader takes the next step), preferring the one
    /// that comes first in `seniority` (the partition's replicas, the old ones first) among
    /// those not in `avoid` (brokers draining or being removed).
    pub async fn move_step(
        &self,
        target: &[(NodeId, String)],
        seniority: &[NodeId],
        avoid: &BTreeSet<NodeId>,
        timeout: Duration,
    ) -> Result<MoveStep, BrokerError> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            return Err(BrokerError::Unavailable {
                reason: "this broker does not lead the group".into(),
                leader: m.current_leader,
            });
        }
        let membership = m.membership_config.membership().clone();
        let unavailable = |what: &str, e: &dyn std::fmt::Display| BrokerError::Unavailable {
            reason: format!("{what}: {e}"),
            leader: Some(m.id),
        };
        for (id, address) in target {
            if membership.get_node(id).is_none() {
                // Blocking: returns once the learner has caught up (or the timeout ends the
                // wait; it stays a learner and keeps catching up).
                match tokio::time::timeout(
                    timeout,
                    self.raft
                        .add_learner(*id, BasicNode::new(address.clone()), true),
                )
                .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(unavailable(&format!("adding node {id}"), &e)),
                    Err(_) => {
                        return Err(BrokerError::Timeout(format!(
                            "node {id} is still catching up"
                        )));
                    }
                }
            }
        }
        // The new replicas must have every entry before they count toward a majority. The
        // voters that stay need not: a majority of each configuration commits, so one of them
        // down (a broker under maintenance) must not hold the move up (before, the move waited
        // for it, and tried again every 30 s, for as long as it was down).
        let last = self.raft.metrics().borrow().last_log_index;
        let voters_before: BTreeSet<NodeId> = membership.voter_ids().collect();
        for (id, _) in target
            .iter()
            .filter(|(id, _)| *id != m.id && !voters_before.contains(id))
        {
            self.raft
                .wait(Some(timeout))
                .metrics(
                    |m| super::matched_index(m, *id) >= last,
                    "the new replica has every entry",
                )
                .await
                .map_err(|e| BrokerError::Timeout(format!("node {id} is catching up: {e}")))?;
        }
        let ids: BTreeSet<NodeId> = target.iter().map(|(id, _)| *id).collect();
        // The voters the change makes (the target; or, this leader leaving, the target with
        // the voters now) must have a majority that answers: from the joint configuration on,
        // every commit needs one. Before, a removal that shrank a partition onto a replica that
        // was down ([1,2,3] -> [1,3], 3 down) stopped it committing for as long as 3 stayed
        // down, and every later change of its voters (an undo) was refused meanwhile.
        let lease = Duration::from_millis(self.raft.config().election_timeout_max);
        // This leader leaving, the target must have one too: the replica it hands the
        // leadership to makes the target the voters next (before, the union alone was checked,
        // and the leadership moved to a replica that could then not take the step).
        let next_voters: Vec<BTreeSet<NodeId>> = if ids.contains(&m.id) {
            vec![ids.clone()]
        } else {
            vec![voters_before.union(&ids).copied().collect(), ids.clone()]
        };
        // Answers received after this point prove it: one received a moment before a broker
        // died would not (a lease lets a dead broker count for seconds).
        let asked_at = std::time::Instant::now();
        let heartbeat = Duration::from_millis(self.raft.config().heartbeat_interval.max(1));
        loop {
            let short = next_voters.iter().find_map(|voters| {
                let up = voters
                    .iter()
                    .filter(|id| {
                        **id == m.id
                            || self
                                .peers
                                .last_contact(self.group_id, **id)
                                .is_some_and(|t| t > asked_at)
                    })
                    .count();
                (up * 2 <= voters.len()).then_some((up, voters))
            });
            let Some((up, voters)) = short else { break };
            if asked_at.elapsed() >= lease + heartbeat {
                return Err(BrokerError::Unavailable {
                    reason: format!(
                        "only {up} of the voters {voters:?} the move makes answer: they could \
                         not commit (the partition would stop taking writes); the move waits \
                         for them"
                    ),
                    leader: Some(m.id),
                });
            }
            tokio::time::sleep((heartbeat / 4).max(Duration::from_millis(10))).await;
        }
        if ids.contains(&m.id) {
            self.membership_change(
                openraft::ChangeMembers::ReplaceAllVoters(ids.clone()),
                timeout,
                "changing the voters",
            )
            .await?;
            // Learners of an earlier target that this one dropped.
            let stray: BTreeSet<NodeId> = self
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .learner_ids()
                .filter(|l| !ids.contains(l))
                .collect();
            if !stray.is_empty() {
                self.membership_change(
                    openraft::ChangeMembers::RemoveNodes(stray),
                    timeout,
                    "removing learners",
                )
                .await?;
            }
            return Ok(MoveStep::Done);
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if !ids.is_subset(&voters) {
            self.membership_change(
                openraft::ChangeMembers::AddVoterIds(ids.clone()),
                timeout,
                "adding the voters",
            )
            .await?;
        }
        // A replica that held the partition before the move takes over when there is one; else
        // the first new one. Only one that has every entry: one that is down (or far behind)
        // could not take over, and choosing it failed the step again and again.
        let now = self.raft.metrics().borrow().clone();
        // (A replica that went down after it matched everything still shows as matched: it
        // must have answered lately too, as a transfer's target must.)
        let caught_up = |id: &NodeId| {
            super::matched_index(&now, *id) >= last
                && self
                    .peers
                    .last_contact(self.group_id, *id)
                    .is_some_and(|t| self.pause.age(t) <= lease)
        };
        // Not one draining or being removed when another can take it (one that drains refuses
        // it), then by seniority.
        let rank = |id: &NodeId| {
            (
                avoid.contains(id),
                seniority.iter().position(|s| s == id).unwrap_or(usize::MAX),
            )
        };
        let to = target
            .iter()
            .map(|(id, _)| *id)
            .filter(caught_up)
            .min_by_key(rank)
            .or_else(|| target.iter().map(|(id, _)| *id).min_by_key(rank));
        let leader = self
            .transfer_leadership(to, &BTreeSet::new(), timeout)
            .await?;
        Ok(MoveStep::LeadershipMoved(leader))
    }

    /// One membership change, waited for at most `timeout` (a change that cannot commit, say
    /// because a new voter died, is tried again by the next step instead of holding it).
    async fn membership_change(
        &self,
        change: openraft::ChangeMembers<NodeId, BasicNode>,
        timeout: Duration,
        what: &str,
    ) -> Result<(), BrokerError> {
        match tokio::time::timeout(timeout, self.raft.change_membership(change, false)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::Unavailable {
                reason: format!("{what}: {e}"),
                leader: self.leader(),
            }),
            Err(_) => Err(BrokerError::Timeout(format!(
                "{what}: not committed in time"
            ))),
        }
    }

    /// Whether this replica leads the group and `node` has every entry of its log.
    pub fn has_every_entry(&self, node: NodeId) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        super::matched_index(&m, node).is_some_and(|matched| Some(matched) >= m.last_log_index)
    }

    /// On the leader: how far each other voter is behind this log, in entries (the whole log when
    /// it has matched nothing yet) and in bytes of the entries it lacks. Empty on a follower.
    pub fn follower_lag(&self) -> Vec<FollowerLag> {
        let m = self.raft.metrics().borrow().clone();
        let end = m.last_log_index.map_or(0, |i| i + 1);
        let Some(replication) = m.replication.as_ref() else {
            return Vec::new();
        };
        replication
            .iter()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, matched)| {
                let matched = matched.map(|l| l.index);
                let have = matched.map_or(0, |i| i + 1);
                let entries = end.saturating_sub(have);
                let bytes = if entries == 0 {
                    0
                } else {
                    self.reader
                        .with_log(|log| log.bytes_after_index(matched))
                        .unwrap_or(0)
                };
                FollowerLag {
                    node: *id,
                    entries,
                    bytes,
                }
            })
            .collect()
    }

    /// On the leader: the replicas in sync (the leader, and every follower at most
    /// `IN_SYNC_ENTRIES_MAX` (16) entries behind its log that answered it within a maximum
    /// election timeout: a replica that went down with every entry is not in sync for long);
    /// None on a follower. The time a leadership transfer held back the heartbeats does not
    /// count (see [`PartitionGroup::contact_age`]).
    pub fn in_sync_replicas(&self) -> Option<Vec<NodeId>> {
        if !self.is_leader() {
            return None;
        }
        let window = Duration::from_millis(self.raft.config().election_timeout_max);
        let mut in_sync = vec![self.raft.metrics().borrow().id];
        in_sync.extend(
            self.follower_lag()
                .into_iter()
                .filter(|lag| {
                    lag.entries <= super::network::IN_SYNC_ENTRIES_MAX
                        && self.contact_age(lag.node) <= window
                })
                .map(|lag| lag.node),
        );
        in_sync.sort_unstable();
        Some(in_sync)
    }

    /// How long ago replica `node` last answered this leader (MAX: never), less the time
    /// leadership transfers held back the heartbeats since: the followers had nothing to
    /// answer meanwhile.
    fn contact_age(&self, node: NodeId) -> Duration {
        self.peers
            .last_contact(self.group_id, node)
            .map_or(Duration::MAX, |t| self.pause.age(t))
    }

    /// On a leader that has not heard from a majority of its voters (itself included) within an
    /// election timeout: that timeout (ms). None otherwise (a single voter always has its quorum).
    pub fn lost_quorum(&self) -> Option<u64> {
        super::lost_quorum(&self.raft, &self.peers, self.group_id, 1)
    }

    /// Watches who leads the group (a task maps openraft's metrics; it ends with the group).
    pub fn watch_leader(&self) -> tokio::sync::watch::Receiver<Option<NodeId>> {
        super::watch_leader(&self.raft)
    }

    /// Whether this replica leads the group now.
    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.current_leader == Some(m.id)
    }

    /// The group's leader, if known (no copy of the metrics: it is asked on every publish).
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The current Raft term of this replica.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// On a follower: how long the leader has been silent (no AppendEntries or heartbeat), when
    /// that is longer than an election timeout - the leader is cut off or gone, and an election
    /// is likely under way. None on the leader, or while the leader is heard from.
    pub fn leader_silent(&self) -> Option<Duration> {
        let (leader, id) = {
            let m = self.raft.metrics().borrow().clone();
            (m.current_leader, m.id)
        };
        if leader.is_none_or(|l| l == id) {
            return None;
        }
        let limit = Duration::from_millis(self.raft.config().election_timeout_max);
        self.peers
            .silent_for(self.group_id)
            .filter(|silence| *silence > limit)
    }

    /// Builds a snapshot of everything applied and waits (up to `timeout`) until it is written.
    pub async fn snapshot_now(&self, timeout: Duration) -> Result<(), BrokerError> {
        let applied = self.raft.metrics().borrow().last_applied;
        if applied.is_none() || self.raft.metrics().borrow().snapshot >= applied {
            return Ok(());
        }
        self.raft.trigger().snapshot().await.map_err(fatal)?;
        self.raft
            .wait(Some(timeout))
            .metrics(
                |m| m.running_state.is_err() || m.snapshot >= applied,
                "snapshot written",
            )
            .await
            .map_err(|e| BrokerError::Timeout(format!("snapshot: {e}")))?;
        Ok(())
    }

    /// Deletes the log through Raft index `index` (whole segments), after making sure a snapshot
    /// covers it: retention as a Raft purge. Returns once the purge is requested; openraft runs it
    /// when no replication still needs those entries.
    pub async fn purge_through(&self, index: u64, timeout: Duration) -> Result<(), BrokerError> {
        let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index);
        let Some(index) = applied.map(|a| a.min(index)) else {
            return Ok(());
        };
        if self.raft.metrics().borrow().snapshot.map(|l| l.index) < Some(index) {
            self.snapshot_now(timeout).await?;
        }
        self.raft.trigger().purge_log(index).await.map_err(fatal)
    }

    /// Marks the group's first two entries (the initial membership, at term 0, and the first
    /// leader's blank entry) as purged, once a snapshot covers them. They hold no records, and
    /// without them the log starts within one term: opening it no longer makes openraft probe
    /// entries across the log to find where terms change (reads of whole entries that a damaged
    /// range could fail). Nothing is deleted from disk.
    pub async fn forget_bootstrap_entries(&self) -> Result<(), BrokerError> {
        if self.status().purged_index.is_some() {
            return Ok(());
        }
        // A new group has just elected itself: its blank entry is applied a moment later.
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.running_state.is_err() || m.last_applied.map(|l| l.index) >= Some(1),
                "bootstrap entries applied",
            )
            .await
            .map_err(|e| BrokerError::Timeout(format!("bootstrap entries: {e}")))?;
        self.purge_through(1, Duration::from_secs(30)).await
    }

    /// Stops the group. With `snapshot`, first snapshots everything applied, so the next open
    /// replays nothing; then the log's tail gets its index files (no scan at the next open). A
    /// log that a failed write or fsync poisoned instead drops what it wrote and never synced:
    /// its page cache is not to be trusted, and nothing unsynced was acknowledged under fsync
    /// before ack. A group stopped for another reason keeps it (synced now): under
    /// `fsync_policy = interval` it was acknowledged, and only a power loss may take it.
    pub async fn shutdown(&self, snapshot: bool) {
        let failed = self.stopped().is_some();
        if snapshot
            && !failed
            && let Err(e) = self.snapshot_now(Duration::from_secs(10)).await
        {
            tracing::warn!("snapshot at shutdown: {e}");
        }
        self.peers.unregister(self.group_id);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        self.peers.forget_contacts(self.group_id);
        self.reader.close_committed();
        let reader = self.reader.clone();
        let closed = tokio::task::spawn_blocking(move || {
            reader.with_log_mut(|log| {
                if failed && log.is_poisoned() {
                    return log.discard_unsynced();
                }
                match log.checkpoint() {
                    // The sync failed: the log is poisoned now.
                    Err(error) if log.is_poisoned() => {
                        tracing::warn!("closing the log: {error}");
                        log.discard_unsynced()
                    }
                    other => other,
                }
            })
        })
        .await;
        match closed {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("closing the log: {e}"),
            Ok(Err(e)) => tracing::warn!("closing the log: {e}"),
            Err(e) => tracing::warn!("closing the log: {e}"),
        }
    }

    /// Changes when appends become durable.
    pub fn set_fsync(&self, policy: weft_storage::FsyncPolicy) {
        self.reader.set_fsync(policy);
    }
}

/// Reads the whole log once, in chunks (the log's lock is held for one chunk at a time),
/// so damage anywhere in it is found and mapped (see [`PartitionLog::map_damage`]), not only
/// where a read happens to run into it. Returns the damaged ranges known afterwards.
pub(super) async fn scrub_log(reader: &LogReader) -> Result<usize, String> {
    const CHUNK_BYTES: usize = 1024 * 1024;
    let reader = reader.clone();
    let (mut from, end) = reader
        .with_log(|log| (log.first_index(), log.end().next_index))
        .map_err(|e| e.to_string())?;
    let Some(mut from_index) = from.take() else {
        return Ok(0);
    };
    while from_index < end {
        let reader = reader.clone();
        let at = from_index;
        let next = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let read = reader
                .with_log(|log| log.read_entries(at, end, CHUNK_BYTES))
                .map_err(|e| e.to_string())?;
            match read {
                Ok(batches) => Ok(batches.last().map_or(end, |b| b.header().index + 1)),
                Err(weft_storage::Error::Corruption { .. }) => {
                    let range = reader
                        .with_log_mut(|log| log.map_damage(at))
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    // Past the damage (or one entry on, if it could not be bounded).
                    Ok(range.map_or(at + 1, |r| r.next_index.max(at + 1)))
                }
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .map_err(|e| e.to_string())??;
        from_index = next.max(from_index + 1);
        // A gentle pace: the scrub shares the disk with the partition's traffic.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reader
        .with_log(|log| log.damaged_ranges().len())
        .map_err(|e| e.to_string())
}

/// What a lost range of entries reads back as.
enum Repaired {
    /// Every entry, intact: the headers of their record batches, in log order.
    Whole(Vec<weft_storage::BatchHeader>),
    /// No longer in the log (purged by retention).
    Purged,
    /// Damaged still, or not all there.
    NotYet,
}

/// Reads entries `first .. next` of `log` back for [`PartitionGroup::fold_repaired`].
fn repaired_headers(log: &PartitionLog, first: u64, next: u64) -> Repaired {
    let Some(start) = log.first_index() else {
        return Repaired::NotYet;
    };
    if next <= start {
        return Repaired::Purged;
    }
    let mut headers = Vec::new();
    let mut from = first;
    while from < next {
        let Ok(batches) = log.read_entries(from, next, 1 << 20) else {
            return Repaired::NotYet;
        };
        let Some(last) = batches.last() else {
            return Repaired::NotYet;
        };
        let until = last.header().index + 1;
        let mut expected = from;
        for batch in &batches {
            let h = *batch.header();
            if h.index == expected {
                expected += 1;
            } else if h.index + 1 != expected {
                // An entry missing in between.
                return Repaired::NotYet;
            }
            if h.kind == weft_storage::EntryKind::Records {
                headers.push(h);
            }
        }
        from = until;
    }
    Repaired::Whole(headers)
}

/// Repairs the damaged ranges of a replica's log (group `group_id`) that lie within `applied`
/// (committed entries are the same on every replica that holds them; None: every range) with
/// the entries of another replica of `nodes`, read over the peer port (ReadLog) and written
/// over the damaged bytes. Returns how many damaged ranges are left.
pub(super) async fn repair_ranges(
    reader: &LogReader,
    peers: &Peers,
    group_id: GroupId,
    nodes: &[(NodeId, String)],
    applied: Option<Option<u64>>,
) -> usize {
    let Ok(ranges) = reader.with_log(|log| log.damaged_ranges().to_vec()) else {
        return 0;
    };
    let mut left = 0;
    for range in ranges {
        if let Some(applied) = applied
            && applied.is_none_or(|a| range.next_index > a + 1)
        {
            left += 1;
            continue;
        }
        let mut repaired = false;
        for (node, address) in nodes {
            let entries = match fetch_entries(
                peers,
                group_id,
                (*node, address),
                range.first_index,
                range.next_index,
            )
            .await
            {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::info!(
                        group = group_id,
                        from = node,
                        "cannot read entries {}..{} to repair them: {e}",
                        range.first_index,
                        range.next_index
                    );
                    continue;
                }
            };
            let writer = reader.clone();
            let target = range.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                writer.with_log_mut(|log| log.repair(&target, &entries))
            })
            .await;
            match outcome {
                Ok(Ok(Ok(()))) => {
                    tracing::warn!(
                        group = group_id,
                        from = node,
                        segment = %range.segment.display(),
                        position = range.position,
                        first_index = range.first_index,
                        next_index = range.next_index,
                        "repaired damaged entries with another replica's copy"
                    );
                    metrics::counter!("weft_partition_repaired_ranges_total").increment(1);
                    repaired = true;
                    break;
                }
                Ok(Ok(Err(e))) => {
                    tracing::warn!(
                        group = group_id,
                        from = node,
                        "cannot repair entries {}..{}: {e}",
                        range.first_index,
                        range.next_index
                    );
                }
                other => {
                    tracing::warn!(group = group_id, "repair failed: {other:?}");
                }
            }
        }
        if !repaired {
            left += 1;
        }
    }
    left
}

/// Why entries could not be fetched from a replica.
#[derive(Debug)]
pub(super) enum FetchError {
    /// The replica no longer holds the first entry asked for (retention purged it).
    Purged(String),
    /// Anything else (unreachable, damaged, an unexpected answer): worth another try.
    Failed(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Purged(why) | FetchError::Failed(why) => f.write_str(why),
        }
    }
}

/// Checks, after a later chunk of a fetch was read, that `node` still holds the last entry of the
/// chunks read before it (`index`, with term `term`). A replica's log changes only by losing a
/// suffix (entries of an earlier term, overwritten by a leader) and growing again; an entry of the
/// same index and term is the same entry, with the same entries before it. So if that entry is
/// still there after the later read, the later chunk continues the earlier ones: they are one log,
/// not entries from before and after such a change.
pub(super) async fn still_holds(
    peers: &Peers,
    group_id: GroupId,
    (node, address): (NodeId, &str),
    index: u64,
    term: u64,
) -> Result<(), String> {
    let request = weft_proto::internal::v1::ReadLogRequest {
        group_id,
        from_index: index,
        until_index: index + 1,
        max_bytes: 1,
    };
    let response = peers
        .read_log(node, address, request, Duration::from_secs(30))
        .await?;
    let found = response
        .batches
        .into_iter()
        .next()
        .map(weft_storage::Batch::decode)
        .transpose()
        .map_err(|e| format!("a fetched entry is damaged: {e}"))?
        .map(|b| (b.header().index, b.header().term));
    if found == Some((index, term)) {
        Ok(())
    } else {
        Err(format!(
            "node {node}'s log changed while it was being read: entry {index} of term {term} is \
             now {found:?} (index, term)"
        ))
    }
}

/// Entries `from .. until` of group `group_id` from `node`'s log (over the peer port: ReadLog),
/// grouped by Raft index. Read in chunks that are checked to be one log ([`still_holds`]).
pub(super) async fn fetch_entries(
    peers: &Peers,
    group_id: GroupId,
    (node, address): (NodeId, &str),
    from: u64,
    until: u64,
) -> Result<Vec<Vec<weft_storage::Batch>>, FetchError> {
    let mut entries: Vec<Vec<weft_storage::Batch>> = Vec::new();
    let mut cursor = from;
    while cursor < until {
        let request = weft_proto::internal::v1::ReadLogRequest {
            group_id,
            from_index: cursor,
            until_index: until,
            max_bytes: 4 * 1024 * 1024,
        };
        let response = peers
            .read_log(node, address, request, Duration::from_secs(30))
            .await
            .map_err(FetchError::Failed)?;
        if response.first_index > cursor {
            return Err(FetchError::Purged(format!(
                "node {node} no longer holds entry {cursor}"
            )));
        }

        // ReadLog answers whole entries: the batches of one Raft index travel together.
        let start = cursor;
        let previous = entries
            .last()
            .map(|e| (e[0].header().index, e[0].header().term));
        for bytes in response.batches {
            let batch = weft_storage::Batch::decode(bytes)
                .map_err(|e| FetchError::Failed(format!("a fetched entry is damaged: {e}")))?;
            let index = batch.header().index;
            if index < start || index >= until {
                continue;
            }
            match entries.last_mut() {
                Some(last) if last[0].header().index == index => last.push(batch),
                _ => entries.push(vec![batch]),
            }
            cursor = index + 1;
        }
        if cursor == start {
            return Err(FetchError::Failed(format!(
                "node {node} returned none of entries {cursor}..{until}"
            )));
        }
        if let Some((index, term)) = previous {
            still_holds(peers, group_id, (node, address), index, term)
                .await
                .map_err(FetchError::Failed)?;
        }
    }
    Ok(entries)
}

/// How long until this process's next tick grid point: a random phase within one `tick`, drawn
/// once per process, on a grid that starts at the Unix epoch (the same clock for every process
/// on a machine). `WEFT_TEST_TICK_PHASE_MS` fixes the phase instead: a test hook that lines
/// brokers' ticks up, the worst case for split votes.
fn until_tick_phase(tick: Duration) -> Duration {
    static PHASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let tick_ns = u64::try_from(tick.as_nanos()).unwrap_or(u64::MAX).max(1);
    let phase = *PHASE.get_or_init(|| {
        std::env::var("WEFT_TEST_TICK_PHASE_MS")
            .ok()
            .and_then(|ms| ms.parse::<u64>().ok())
            .map_or_else(
                || uuid::Uuid::new_v4().as_u64_pair().0,
                |ms| ms.saturating_mul(1_000_000),
            )
    }) % tick_ns;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            u64::try_from(d.as_nanos() % u128::from(tick_ns)).unwrap_or(0)
        });
    Duration::from_nanos((phase + tick_ns - now) % tick_ns)
}

/// Whether a replica that opened with its log ending at `target` has caught up: a leader is
/// known (this node, or another replica) and what its log held at open is applied, or, when
/// the log now ends before that (the entries past it were never committed: a new leader's
/// log replaced them), everything it holds is applied. Before, such a replica waited to apply
/// up to `target` itself, and stayed "replaying" (not ready) until the partition's new
/// entries passed it, for good when no more came (seen by the fault-injection harness after a
/// power loss of every node: one replica had synced entries the others had not).
fn caught_up(
    leader_known: bool,
    applied: Option<u64>,
    last_log_index: Option<u64>,
    target: Option<u64>,
) -> bool {
    leader_known && (applied >= target || (last_log_index < target && applied >= last_log_index))
}

/// A log that ends before what this replica knows was committed lost part of its durable tail
/// (its file cut short while the broker was down: a failing disk, a partial restore). Known
/// committed: what the snapshot says was applied, and, under fsync before ack, the committed
/// index the log store saved. openraft would take entries the snapshot covers as purged and
/// never send them again, leaving this replica's copy with a hole for good; and a replica
/// missing committed entries must not vote before it has them again (with them it could help
/// elect a leader that lacks them). So they are fetched from another replica and appended before
/// the Raft group starts. Err while no replica can give them: the partition stays down and is
/// opened again later. When every replica answered that retention purged them, or the topic
/// acknowledges before fsync (losing them is what it accepted), the log restarts after the
/// snapshot, as an installed snapshot does.
async fn fill_missing_tail(
    sm: &PartitionStateMachine,
    reader: &LogReader,
    peers: &Peers,
    group_id: GroupId,
    node_id: NodeId,
) -> Result<(), String> {
    let state = sm.state();
    let next = state.next_position();
    let end = reader
        .with_log(|log| log.end())
        .map_err(|e| e.to_string())?;
    let fresh = end.next_index == 0 && state.last_applied.is_none();
    let committed = if reader.syncs_before_ack() && !fresh {
        reader.saved_committed_log_id()
    } else {
        None
    };
    let committed_next = committed.map(|c| c.index + 1);
    let want = next.next_index.max(committed_next.unwrap_or(0));
    // The id of the last entry wanted, known committed: entries fetched are taken only when
    // the last of them carries it (then, by Raft's log matching, all of them are the committed
    // ones: a replica that was cut off may hold entries of an earlier term at those indexes).
    let want_last = if committed_next == Some(want) {
        committed
    } else {
        state.last_applied
    };
    if end.next_index >= want {
        return Ok(());
    }
    tracing::warn!(
        group_id,
        log_end = end.next_index,
        applied_through = next.next_index.saturating_sub(1),
        committed_through = want - 1,
        "the log lost entries this replica knew committed; fetching them from another replica before it may vote"
    );
    let nodes: Vec<(NodeId, String)> = state
        .last_membership
        .membership()
        .nodes()
        .filter(|(id, _)| **id != node_id)
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    // The log's last entry: the entries fetched must continue it. A log that ends before the
    // snapshot may end in entries of an earlier term that were never committed (a replica cut
    // off before it was sent the snapshot, stopped before the install filled its log); the
    // fetched ones, committed, then hold another entry at that index.
    let own_last = reader
        .with_log(|log| {
            let first = log.first_index()?;
            let last = end.next_index.checked_sub(1).filter(|l| *l >= first)?;
            let batches = log.read_entries(last, last + 1, 1).ok()?;
            batches.first().map(super::log_store::log_id_of)
        })
        .map_err(|e| e.to_string())?;
    let from = own_last.map_or(end.next_index, |l| l.index);
    let mut errors = Vec::new();
    let mut purged = 0;
    for (node, address) in &nodes {
        let fetched = match fetch_entries(peers, group_id, (*node, address), from, want).await {
            // A replica whose log starts right after this one's last entry (retention deleted
            // the segments before it) holds every entry wanted but not the one to compare.
            Err(FetchError::Purged(_)) if own_last.is_some() => {
                fetch_entries(peers, group_id, (*node, address), end.next_index, want)
                    .await
                    .map(|entries| (entries, None))
            }
            other => other.map(|entries| (entries, own_last)),
        };
        let (mut entries, compare) = match fetched {
            Ok(fetched) => fetched,
            Err(e) => {
                purged += usize::from(matches!(e, FetchError::Purged(_)));
                errors.push(e.to_string());
                continue;
            }
        };
        let last = entries
            .last()
            .and_then(|e| e.first())
            .map(super::log_store::log_id_of);
        if last != want_last {
            errors.push(format!(
                "node {node}: the entries end at {last:?}, not at the committed {want_last:?}"
            ));
            continue;
        }
        if let Some(own) = compare {
            let fetched = entries
                .first()
                .and_then(|e| e.first())
                .map(super::log_store::log_id_of);
            if fetched != Some(own) {
                tracing::warn!(
                    group_id,
                    ?own,
                    ?fetched,
                    "the log ends in an entry that is not the committed one at its index; it restarts after the snapshot"
                );
                reader
                    .with_log_mut(|log| log.reset(next))
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                return Err(format!(
                    "the log ended in entry {own:?}, which the committed log holds as \
                     {fetched:?}: restarted after the snapshot, the rest is fetched at the next \
                     open"
                ));
            }
            entries.remove(0);
        }
        let writer = reader.clone();
        let filled = tokio::task::spawn_blocking(move || writer.append_fetched(&entries))
            .await
            .map_err(|e| e.to_string())?;
        match filled {
            Ok(filled)
                if filled.next_index == want && (want != next.next_index || filled == next) =>
            {
                tracing::warn!(
                    group_id,
                    from = node,
                    entries = want - end.next_index,
                    "fetched the entries the log had lost"
                );
                metrics::counter!("weft_partition_refetched_tails_total").increment(1);
                return Ok(());
            }
            Ok(filled) => {
                return Err(format!(
                    "the entries fetched from node {node} end at {filled:?}, not at entry {want} \
                     (the snapshot resumes at {next:?})"
                ));
            }
            Err(e) => errors.push(format!("node {node}: {e}")),
        }
    }
    let accepted_loss = !reader.syncs_before_ack();
    if (!nodes.is_empty() && purged == nodes.len()) || accepted_loss {
        if end.next_index >= next.next_index {
            tracing::warn!(
                group_id,
                "no replica holds the committed entries this log lost (the topic acknowledges before fsync); going on without them"
            );
            return Ok(());
        }
        tracing::warn!(
            group_id,
            "no replica holds the entries this log lost (purged, or the topic acknowledges before fsync); the log restarts after the snapshot"
        );
        return reader
            .with_log_mut(|log| log.reset(next))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string());
    }
    Err(format!(
        "the log ends at entry {} but entries through {} were committed, and no replica could \
         give the missing ones yet: {}",
        end.next_index,
        want - 1,
        if errors.is_empty() {
            "this replica has no peers".to_string()
        } else {
            errors.join("; ")
        }
    ))
}

/// A log whose prefix was deleted without a snapshot (retention before snapshots existed) cannot
/// be opened by Raft: its first entries are gone and nothing says what they held. Give it the
/// snapshot it lacks: the state right before its first entry, with an empty producer table (the
/// deleted batches can no longer be retried anyway), and record that prefix as purged.
pub(super) fn adopt_headless_log(
    sm: &PartitionStateMachine,
    reader: &LogReader,
    group_id: GroupId,
    node_id: NodeId,
    peer_address: &str,
) -> Result<(), String> {
    let (first_index, start_offset, first_term) = reader
        .with_log(|log| {
            let end = log.end();
            let first = log.first_index().unwrap_or(end.next_index);
            let term = match log.first_index() {
                Some(first) => log
                    .read_entries(first, first + 1, 1)
                    .ok()
                    .and_then(|b| b.first().map(|b| b.header().term)),
                None => None,
            };
            (first, log.start_offset(), term)
        })
        .map_err(|e| e.to_string())?;
    if first_index == 0 {
        return Ok(());
    }
    let purged = LogId::new(
        CommittedLeaderId::new(first_term.unwrap_or(1), 0),
        first_index - 1,
    );
    if sm.has_snapshot() {
        // Adopted before, or a snapshot that covers the missing prefix: the purge through it
        // must be recorded too. A crash between the snapshot's write and the purge's record
        // left the log starting past a purge that was never recorded, and openraft, finding
        // no entry at its start, refused to open the group, at every attempt.
        let covered = sm
            .state()
            .last_applied
            .is_some_and(|applied| applied.index >= purged.index);
        let recorded = reader
            .last_purged()
            .is_some_and(|p| p.index >= purged.index);
        if covered && !recorded {
            tracing::warn!(
                group_id,
                first_index,
                "the log starts after a purge its snapshot covers that was not recorded: recording it"
            );
            let purged = match sm.state().last_applied {
                Some(applied) if applied.index == purged.index => applied,
                _ => purged,
            };
            reader.record_purged(purged).map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    tracing::warn!(
        group_id,
        first_index,
        "the log's prefix was deleted without a snapshot; adopting it with a synthesized snapshot"
    );
    let membership = Membership::new(
        vec![BTreeSet::from([node_id])],
        BTreeMap::from([(node_id, BasicNode::new(peer_address))]),
    );
    let state = PartitionState {
        last_applied: Some(purged),
        last_membership: StoredMembership::new(Some(purged), membership),
        high_watermark: start_offset,
        producers: BTreeMap::new(),
        clock_ms: 0,
        lost: BTreeMap::new(),
    };
    sm.reset_to(state)?;
    // Exactly there: a purge recorded further on (with a snapshot that was lost since, the
    // file damaged) would keep the entries after it from being re-applied.
    reader
        .record_purged_exactly(purged)
        .map_err(|e| e.to_string())
}

/// How long a proposal waits for its answer after a snapshot was installed over the log.
const INSTALL_ANSWER_GRACE: Duration = Duration::from_secs(1);

/// Resolves once a snapshot is installed (never, once the state machine is gone).
async fn installed(installs: &mut tokio::sync::watch::Receiver<u64>) {
    if installs.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::{Repaired, caught_up, repaired_headers};
    use crate::raft::{Command, Entry, LogId};
    use openraft::{CommittedLeaderId, EntryPayload};
    use weft_storage::{BatchBuilder, LogConfig, PartitionLog, ProducerInfo};

    /// Repaired entries read back with their record batches' headers (what the producer
    /// table folds in); a range not all in the log yet is not whole.
    #[test]
    fn repaired_entries_read_back_with_their_producer_batches() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = PartitionLog::open(dir.path(), LogConfig::default()).expect("opens");
        let entry = |index: u64, payload| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload,
        };
        let append = |log: &mut PartitionLog, e: Entry| {
            let batches =
                crate::raft::entry::to_batches(e, log.end().next_offset).expect("encodes");
            log.append_entry(&batches).expect("appends");
        };
        append(&mut log, entry(0, EntryPayload::Blank));
        for index in 1..=3u64 {
            let batches = (0..2u64)
                .map(|i| {
                    let mut records = BatchBuilder::new();
                    records.push(0, b"", b"v", []);
                    records
                        .seal(
                            0,
                            0,
                            0,
                            ProducerInfo {
                                producer_id: 40 + i,
                                producer_epoch: 0,
                                base_sequence: index,
                            },
                        )
                        .bytes()
                        .clone()
                })
                .collect();
            append(
                &mut log,
                entry(index, EntryPayload::Normal(Command::Records(batches))),
            );
        }
        log.flush().expect("flushes");
        match repaired_headers(&log, 2, 4) {
            Repaired::Whole(headers) => {
                let seen: Vec<(u64, u64)> = headers
                    .iter()
                    .map(|h| (h.producer_id, h.base_sequence))
                    .collect();
                assert_eq!(seen, [(40, 2), (41, 2), (40, 3), (41, 3)]);
            }
            _ => panic!("entries 2..4 are whole"),
        }
        assert!(matches!(repaired_headers(&log, 3, 6), Repaired::NotYet));
    }

    /// A replica opened with entries 0..=120 in its log; the leader's log replaced 101..=120
    /// (never committed) and holds 0..=100, all applied here: caught up. Before, it waited
    /// for 120 to be applied, for as long as no new entries came.
    #[test]
    fn a_replica_whose_uncommitted_tail_was_replaced_is_caught_up() {
        assert!(caught_up(true, Some(100), Some(100), Some(120)));
        // Not before everything it holds is applied, nor without a leader.
        assert!(!caught_up(true, Some(90), Some(100), Some(120)));
        assert!(!caught_up(false, Some(100), Some(100), Some(120)));
        // The usual case: its log reaches the open point, which must be applied.
        assert!(!caught_up(true, Some(110), Some(130), Some(120)));
        assert!(caught_up(true, Some(120), Some(130), Some(120)));
        // An empty log at open.
        assert!(caught_up(true, None, None, None));
    }
}
