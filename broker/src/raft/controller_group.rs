//! The handle the rest of the broker uses for the controller group (group 0, cluster metadata):
//! open it, propose commands, watch the state. Nothing outside `raft/` sees an openraft type.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeSet;

use openraft::BasicNode;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::watch;
use weft_proto::internal::v1 as pb;
use weft_storage::{LogConfig, PartitionLog};

use crate::meta::Metadata;

use super::{
    CONTROLLER_GROUP, Command, ControllerCommand, ControllerResponse, ControllerState,
    ControllerStateMachine, Flusher, LogStore, NodeId, Peers, Raft, Recovery, Response,
};
use crate::error::BrokerError;

/// Segment size of the controller log.
const CONTROLLER_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// The controller snapshots after this many entries, and keeps this many entries behind its
/// snapshot (for followers a little behind); openraft purges the rest.
const CONTROLLER_SNAPSHOT_EVERY_ENTRIES: u64 = 2000;
const CONTROLLER_LOG_KEPT_ENTRIES: u64 = 500;
/// How long taking a member out of the controller group may take to commit.
const MEMBER_CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Raft settings of the controller group: those of every group, plus snapshots and purges.
pub fn controller_raft_config(mut config: openraft::Config) -> anyhow::Result<openraft::Config> {
    config.snapshot_policy =
        openraft::SnapshotPolicy::LogsSinceLast(CONTROLLER_SNAPSHOT_EVERY_ENTRIES);
    config.max_in_snapshot_log_to_keep = CONTROLLER_LOG_KEPT_ENTRIES;
    Ok(config.validate()?)
}

/// The controller group on this node.
#[derive(Clone)]
pub struct ControllerGroup {
    raft: Raft,
    sm: ControllerStateMachine,
    peers: Peers,
    /// The last index of the controller log when it was opened.
    opened_at_index: Option<u64>,
    /// Latched by [`ControllerGroup::is_current`].
    caught_up: Arc<std::sync::atomic::AtomicBool>,
    /// Why the cluster refused this broker's join, once it did (its build is below the feature
    /// level the cluster has used): the broker must stop.
    join_refused: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for ControllerGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerGroup").finish_non_exhaustive()
    }
}

impl ControllerGroup {
    /// Opens the controller log in `dir` and starts the group. A single node (`seeds` empty)
    /// initialises a one-voter cluster on first start and waits until it leads it and has applied
    /// its log. In a cluster (`seeds`: every broker with its peer address), the broker with the
    /// lowest id initialises a new cluster; any other broker with an empty log joins through the
    /// seeds in the background (learner, then voter); a broker with a log is a member already.
    /// A clustered broker never waits here for a quorum.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        dir: &Path,
        node_id: NodeId,
        peer_address: String,
        meta: Metadata,
        raft_config: Arc<openraft::Config>,
        flusher: Flusher,
        peers: Peers,
        seeds: Vec<(NodeId, String)>,
    ) -> anyhow::Result<ControllerGroup> {
        let dir = dir.to_path_buf();
        let log_config = LogConfig {
            // Small segments, so that purging the log behind a snapshot frees space.
            segment_bytes_max: CONTROLLER_SEGMENT_BYTES,
            sync_listener: crate::sync_journal::listener(),
            ..LogConfig::default()
        };
        let (log, sm) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            std::fs::create_dir_all(&dir)?;
            let sm = ControllerStateMachine::open(&dir, log_config.clone())
                .map_err(|e| anyhow::anyhow!("cannot open the controller snapshot: {e}"))?;
            Ok((PartitionLog::open(dir, log_config)?, sm))
        })
        .await??;
        let store = LogStore::new(CONTROLLER_GROUP, log, meta.clone(), flusher)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let reader = store.reader();
        sm.track_purges(reader.clone());
        // Other brokers repair damage in their copies of the controller log from this one.
        peers.register_reader(CONTROLLER_GROUP, reader.clone());
        repair_controller_log(&reader, &peers, node_id, &seeds, &sm).await?;
        fill_lost_controller_tail(&reader, &peers, node_id, &seeds, &sm).await?;
        let raft = Raft::new(
            node_id,
            raft_config,
            peers.network(CONTROLLER_GROUP),
            store,
            sm.clone(),
        )
        .await?;
        // Whether its log held a cluster at open, read before the group is reachable: once it
        // is registered, a leader that counts this broker as a member (one whose data was
        // wiped) may replicate to it at once, and the join below would be skipped, leaving
        // the broker undecided (never registered, never voting) for good.
        let initialized = raft.is_initialized().await?;
        peers.register(CONTROLLER_GROUP, raft.clone());
        let opened_at_index = raft.metrics().borrow().last_log_index;
        let (refused_tx, join_refused) = watch::channel(None);
        let group = ControllerGroup {
            raft: raft.clone(),
            sm,
            peers: peers.clone(),
            opened_at_index,
            caught_up: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            join_refused,
        };
        // Peer calls carry the cluster's id once the controller stores one.
        let mut ids = group.sm.watch();
        let id_peers = peers.clone();
        tokio::spawn(async move {
            loop {
                let id = ids.borrow_and_update().cluster_id.clone();
                id_peers.set_cluster_id(&id);
                if ids.changed().await.is_err() {
                    return;
                }
            }
        });
        let seed = seeds.first().is_none_or(|(first, _)| *first == node_id);
        if initialized && peers.recovery() == Recovery::Undecided {
            // Stopped after it started with an empty data directory and before it had caught
            // up everywhere: it holds part of the cluster's log again, so it is a member that
            // lost its data (a new broker would have settled that at its join).
            peers.set_recovery(Recovery::Rejoining);
        }
        if !initialized {
            // The seed initialises a new cluster only when no other broker has one: a seed that
            // lost its data joins the cluster it belonged to instead of starting a second one.
            let cluster_elsewhere = if seed && seeds.len() > 1 {
                probe_cluster(&peers, &seeds, node_id, &peer_address).await
            } else {
                Probe::NoCluster
            };
            match (seed, cluster_elsewhere) {
                (true, Probe::NoCluster) => {
                    // A new cluster: this broker lost nothing. The mark goes first, so that a
                    // stop right after the cluster starts does not leave its only broker
                    // rejoining a group it alone can elect in (a stop before the start leaves
                    // an empty log and no mark: it starts the cluster again).
                    meta.clear_recovering()?;
                    let members = BTreeMap::from([(node_id, BasicNode::new(peer_address.clone()))]);
                    raft.initialize(members).await?;
                    peers.set_recovery(Recovery::Normal);
                }
                (_, Probe::Joined { already_member }) => {
                    peers.decide_recovery(if already_member {
                        Recovery::Rejoining
                    } else {
                        Recovery::Normal
                    });
                }
                (_, Probe::NoCluster | Probe::Elsewhere) => {
                    tokio::spawn(join(
                        peers.clone(),
                        seeds.clone(),
                        node_id,
                        peer_address,
                        refused_tx,
                    ));
                }
            }
        }
        // (One that lost its data and has not caught up does not stand alone: it serves its
        // admin API meanwhile, where an operator can end its recovery.)
        if (seeds.is_empty() || (seed && seeds.len() == 1)) && peers.recovery() == Recovery::Normal
        {
            raft.wait(Some(Duration::from_secs(30)))
                .current_leader(node_id, "controller leadership")
                .await
                .map_err(|e| anyhow::anyhow!("this node did not become controller leader: {e}"))?;
            // Apply everything already in the controller log before serving.
            raft.ensure_linearizable()
                .await
                .map_err(|e| anyhow::anyhow!("controller not ready: {e}"))?;
        }
        Ok(group)
    }

    /// Why the cluster refused this broker's join (None while it has not): a broker refused
    /// stops.
    pub fn join_refused(&self) -> watch::Receiver<Option<String>> {
        self.join_refused.clone()
    }

    /// Whether this broker's copy of the controller state has caught up since it started: a
    /// leader was known and everything the controller log held at start was applied. Once true
    /// it stays true (a controller election later does not make the metadata stale).
    pub fn is_current(&self) -> bool {
        if self.caught_up.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        let m = self.raft.metrics().borrow().clone();
        let now =
            m.current_leader.is_some() && m.last_applied.map(|l| l.index) >= self.opened_at_index;
        if now {
            self.caught_up
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        now
    }

    /// The controller group's voters.
    pub fn voters(&self) -> Vec<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Whether this broker leads the controller and `node` has every controller entry.
    pub fn reaches(&self, node: NodeId) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        super::matched_index(&m, node).is_some_and(|matched| Some(matched) >= m.last_log_index)
    }

    /// Whether this broker is a member of the controller group and knows its leader.
    pub fn has_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader.is_some()
    }

    /// The applied state (topics).
    pub fn state(&self) -> Arc<ControllerState> {
        self.sm.state()
    }

    /// Watches the applied state.
    pub fn watch(&self) -> watch::Receiver<Arc<ControllerState>> {
        self.sm.watch()
    }

    /// The controller's leader.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// On the controller's leader: whether a majority of the voters has not answered it within
    /// two election timeouts (they may have elected another leader; see [`super::lost_quorum`]).
    /// Two, not one: a busy controller's answers come late now and then (its appends wait for
    /// the fsyncs of the partitions' appends they travel with), and a leadership transfer
    /// holds its heartbeats for about one; a cut-off coordinator still stops within about one
    /// election timeout of the others electing a new leader.
    pub fn lost_quorum(&self) -> bool {
        super::lost_quorum(&self.raft, &self.peers, CONTROLLER_GROUP, 2).is_some()
    }

    /// The controller group's current Raft term (a new controller leader always has a higher
    /// one than every leader before it).
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Watches who leads the controller.
    pub fn watch_leader(&self) -> tokio::sync::watch::Receiver<Option<NodeId>> {
        super::watch_leader(&self.raft)
    }

    /// The index of the last controller entry applied here.
    pub fn applied_index(&self) -> u64 {
        self.sm.state().last_applied.map_or(0, |l| l.index)
    }

    /// Waits (up to `timeout`) until this broker has applied the controller log through
    /// `index`; whether it has.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut state = self.sm.watch();
        tokio::time::timeout(timeout, async {
            loop {
                if state
                    .borrow_and_update()
                    .last_applied
                    .map_or(0, |l| l.index)
                    >= index
                {
                    return;
                }
                if state.changed().await.is_err() {
                    return futures::future::pending().await;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Proposes a command and waits (up to `timeout`) until it is applied; a broker that does
    /// not lead the controller forwards the command to the one that does.
    pub async fn propose(
        &self,
        command: ControllerCommand,
        timeout: Duration,
    ) -> Result<ControllerResponse, BrokerError> {
        self.propose_within(command, 0, timeout).await
    }

    /// Proposes `command` on this broker only: UNAVAILABLE when it does not lead the
    /// controller (never forwarded).
    pub async fn propose_here(
        &self,
        command: ControllerCommand,
        timeout: Duration,
    ) -> Result<ControllerResponse, BrokerError> {
        // As if it had been forwarded once already: a non-leader refuses instead of forwarding.
        self.propose_within(command, 1, timeout).await
    }

    async fn propose_within(
        &self,
        command: ControllerCommand,
        hops: u32,
        timeout: Duration,
    ) -> Result<ControllerResponse, BrokerError> {
        tokio::time::timeout(
            timeout,
            propose_here_or_forward(&self.raft, &self.peers, command, hops, timeout),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::Timeout(
                "controller did not commit in time".into(),
            ))
        })
    }

    /// Moves the controller's leadership (and with it the coordination of consumer groups) from
    /// this broker to `target` or the most caught-up other voter; returns the new leader.
    pub async fn transfer_leadership(
        &self,
        target: Option<NodeId>,
        avoid: &BTreeSet<NodeId>,
        timeout: Duration,
    ) -> Result<NodeId, BrokerError> {
        super::transfer_leadership(
            &self.raft,
            &self.peers,
            CONTROLLER_GROUP,
            target,
            avoid,
            timeout,
            Some(self.peers.controller_transfer()),
            None,
        )
        .await
    }

    /// On the controller's leader: takes `node` out of the controller group (a voter or a
    /// learner; nothing to do when it is neither).
    pub async fn remove_member(&self, node: NodeId) -> Result<(), BrokerError> {
        let membership = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        if !membership
            .voter_ids()
            .chain(membership.learner_ids())
            .any(|v| v == node)
        {
            return Ok(());
        }
        take_out(&self.raft, &self.peers, &membership, node).await
    }

    /// Whether `node` is a voter or a learner of the controller group (this broker's view).
    pub fn is_member(&self, node: NodeId) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node)
            .is_some()
    }

    /// The members of the controller group (voters and learners) that are not registered as
    /// brokers in `state`, with the peer address they joined with.
    pub fn unregistered_members(&self, state: &ControllerState) -> Vec<(NodeId, String)> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| !state.brokers.contains_key(id))
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect()
    }

    /// Takes `node`, a member of the controller group that never registered as a broker, out of
    /// the group (on the controller's leader; forwarded to it from any other broker). Refused
    /// while `node` answers on its peer port: a broker still catching up registers once it has.
    pub async fn remove_unregistered_member(
        &self,
        node: NodeId,
        timeout: Duration,
    ) -> Result<NodeId, BrokerError> {
        tokio::time::timeout(
            timeout,
            remove_unregistered_here_or_forward(
                &self.raft,
                &self.peers,
                || self.sm.state(),
                node,
                0,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::Timeout(format!(
                "node {node} was not taken out of the controller group in time"
            )))
        })
    }

    /// Waits (up to `timeout`) until this broker's copy of the controller state holds everything
    /// committed before the call: the leader confirms its leadership and names its read index
    /// (asked over the peer port when another broker leads), and this broker applies up to it.
    pub async fn sync_with_leader(&self, timeout: Duration) -> Result<(), BrokerError> {
        let unavailable = |reason: String| BrokerError::Unavailable {
            reason,
            leader: self.leader(),
        };
        let index = tokio::time::timeout(timeout, async {
            let metrics = self.raft.metrics().borrow().clone();
            match metrics.current_leader {
                Some(leader) if leader == metrics.id => self
                    .raft
                    .ensure_linearizable()
                    .await
                    .map(|read| read.map_or(0, |l| l.index))
                    .map_err(|e| unavailable(format!("controller read index: {e}"))),
                Some(leader) => {
                    let address = metrics
                        .membership_config
                        .membership()
                        .get_node(&leader)
                        .map(|n| n.addr.clone())
                        .ok_or_else(|| unavailable(format!("node {leader} has no address")))?;
                    let mut client = self
                        .peers
                        .controller_client(&address)
                        .map_err(unavailable)?;
                    let request = self.peers.request(leader, pb::ReadIndexRequest {}, timeout);
                    client
                        .read_index(request)
                        .await
                        .map(|r| r.into_inner().index)
                        .map_err(|s| unavailable(format!("controller read index: {}", s.message())))
                }
                None => Err(unavailable("the controller has no leader now".into())),
            }
        })
        .await
        .map_err(|_| BrokerError::Timeout("the controller's read index".into()))??;
        if self.wait_applied(index, timeout).await {
            Ok(())
        } else {
            Err(BrokerError::Timeout(format!(
                "this broker did not apply the controller log up to {index} in time"
            )))
        }
    }

    /// Stops the group.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("controller shutdown: {e}");
        }
    }
}

/// Proposes `command` here when this broker leads the controller, else forwards it once to the
/// leader over the peer port.
async fn propose_here_or_forward(
    raft: &Raft,
    peers: &Peers,
    command: ControllerCommand,
    hops: u32,
    timeout: Duration,
) -> Result<ControllerResponse, BrokerError> {
    // While this leader hands the controller over, proposals are refused (UNAVAILABLE naming
    // the target; callers retry there): entries appended meanwhile would keep the target
    // behind and renew the followers' leases, and the target's election would fail (seen: a
    // broker being removed could not hand the controller over, twice 30 s, while group commits
    // kept coming).
    refuse_while_handing_over(peers)?;
    let forward = match raft
        .client_write(Command::Controller(command.clone()))
        .await
    {
        Ok(response) => {
            return match response.data {
                Response::Controller(r) => Ok(r),
                other => Err(BrokerError::Internal(format!(
                    "unexpected controller response {other:?}"
                ))),
            };
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) if hops == 0 => f,
        Err(e) => {
            return Err(BrokerError::Unavailable {
                reason: format!("controller: {e}"),
                leader: raft.metrics().borrow().current_leader,
            });
        }
    };
    let (Some(leader), Some(node)) = (forward.leader_id, forward.leader_node) else {
        return Err(BrokerError::Unavailable {
            reason: "the controller has no leader now".into(),
            leader: None,
        });
    };
    let bytes = serde_json::to_vec(&command).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let request = peers.request(
        leader,
        pb::ProposeRequest {
            command: bytes.into(),
            hops: hops + 1,
        },
        timeout,
    );
    let unavailable = |reason: String| BrokerError::Unavailable {
        reason,
        leader: Some(leader),
    };
    let mut client = peers.controller_client(&node.addr).map_err(&unavailable)?;
    let response = client
        .propose(request)
        .await
        .map_err(|s| unavailable(format!("controller leader {leader}: {}", s.message())))?;
    serde_json::from_slice(&response.into_inner().response)
        .map_err(|e| BrokerError::Internal(format!("controller response: {e}")))
}

/// UNAVAILABLE, naming the target, while this broker hands the controller's leadership over.
fn refuse_while_handing_over(peers: &Peers) -> Result<(), BrokerError> {
    let moving_to = peers
        .controller_transfer()
        .load(std::sync::atomic::Ordering::SeqCst);
    if moving_to == 0 {
        return Ok(());
    }
    Err(BrokerError::Unavailable {
        reason: format!("the controller's leadership is moving to node {moving_to}"),
        leader: Some(moving_to),
    })
}

/// How long the controller leader's health check of a member it is asked to remove may take.
const MEMBER_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// [`ControllerGroup::remove_unregistered_member`] on the controller's leader, or forwarded to
/// it once (`hops` counts forwards). Answers the leader that took the member out.
async fn remove_unregistered_here_or_forward(
    raft: &Raft,
    peers: &Peers,
    state: impl Fn() -> Arc<ControllerState>,
    node: NodeId,
    hops: u32,
) -> Result<NodeId, BrokerError> {
    let metrics = raft.metrics().borrow().clone();
    let Some(leader) = metrics.current_leader else {
        return Err(BrokerError::Unavailable {
            reason: "the controller has no leader now".into(),
            leader: None,
        });
    };
    // As for proposals: a membership change appended while this leader hands the controller
    // over would keep the target behind and its election would fail.
    if leader == metrics.id {
        refuse_while_handing_over(peers)?;
    }
    if leader != metrics.id {
        let unavailable = |reason: String| BrokerError::Unavailable {
            reason,
            leader: Some(leader),
        };
        if hops > 0 {
            return Err(unavailable(format!(
                "not the controller leader (node {leader} is)"
            )));
        }
        let address = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .ok_or_else(|| unavailable("the controller leader's address is unknown".into()))?;
        let request = peers.request(
            leader,
            pb::RemoveMemberRequest {
                node_id: node,
                hops: hops + 1,
            },
            PROPOSE_TIMEOUT,
        );
        let mut client = peers.controller_client(&address).map_err(&unavailable)?;
        return match client.remove_member(request).await {
            Ok(response) => Ok(response.into_inner().leader_id),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                Err(BrokerError::Conflict(format!(
                    "the controller leader (node {leader}) runs an earlier build, which cannot \
                     take a member that never registered out of the controller group; upgrade \
                     it first"
                )))
            }
            Err(status) => Err(status.into()),
        };
    }
    // Read as of now: a registration committed before this call counts.
    raft.ensure_linearizable()
        .await
        .map_err(|e| BrokerError::Unavailable {
            reason: format!("not the controller leader now: {e}"),
            leader: None,
        })?;
    if state().brokers.contains_key(&node) {
        return Err(BrokerError::Conflict(format!(
            "node {node} has registered as a broker: remove it as one (its replicas move first)"
        )));
    }
    let membership = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    let Some(address) = membership.get_node(&node).map(|n| n.addr.clone()) else {
        return Err(BrokerError::invalid(
            "node_id",
            format!("node {node} is not a broker or a member of this cluster"),
        ));
    };
    if peers.ping(node, &address, MEMBER_PING_TIMEOUT).await {
        return Err(BrokerError::Conflict(format!(
            "node {node} joined the controller group and has not registered yet, but it answers \
             at {address}: it registers once it has caught up; stop it first to take it out"
        )));
    }
    take_out(raft, peers, &membership, node).await?;
    tracing::info!(
        node,
        %address,
        "took a member that never registered out of the controller group"
    );
    Ok(metrics.id)
}

/// Takes `node` (a voter or a learner of `membership`) out of the controller group. A voter is
/// taken out only while a majority of the voters left answers a ping: the change commits in a
/// joint configuration that needs them, and without them the controller would commit nothing
/// (topics, offsets, takeovers) until they came back. Bounded by [`MEMBER_CHANGE_TIMEOUT`].
async fn take_out(
    raft: &Raft,
    peers: &Peers,
    membership: &openraft::Membership<NodeId, BasicNode>,
    node: NodeId,
) -> Result<(), BrokerError> {
    let leader = || raft.metrics().borrow().current_leader;
    let change = if membership.voter_ids().any(|v| v == node) {
        let me = raft.metrics().borrow().id;
        let left: Vec<NodeId> = membership.voter_ids().filter(|v| *v != node).collect();
        let pings = left.iter().map(|&v| async move {
            let answers = v == me
                || match membership.get_node(&v) {
                    Some(n) => peers.ping(v, &n.addr, MEMBER_PING_TIMEOUT).await,
                    None => false,
                };
            answers.then_some(v)
        });
        let answering: Vec<NodeId> = futures::future::join_all(pings)
            .await
            .into_iter()
            .flatten()
            .collect();
        if answering.len() * 2 <= left.len() {
            return Err(BrokerError::Unavailable {
                reason: format!(
                    "taking node {node} out of the controller group would leave voters {left:?}, \
                     of which only {answering:?} answer: not a majority; bring the others \
                     back first"
                ),
                leader: leader(),
            });
        }
        openraft::ChangeMembers::RemoveVoters(BTreeSet::from([node]))
    } else {
        openraft::ChangeMembers::RemoveNodes(BTreeSet::from([node]))
    };
    tokio::time::timeout(MEMBER_CHANGE_TIMEOUT, raft.change_membership(change, false))
        .await
        .map_err(|_| {
            BrokerError::Timeout(format!(
                "taking node {node} out of the controller group did not commit within {} s",
                MEMBER_CHANGE_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| BrokerError::Unavailable {
            reason: format!("removing node {node} from the controller group: {e}"),
            leader: leader(),
        })?;
    Ok(())
}

/// What a seed with an empty controller log learned from the other brokers.
enum Probe {
    /// None of them has a cluster (or none answered): this is the first start.
    NoCluster,
    /// One of them has a cluster that could not take the join yet (no leader right now).
    Elsewhere,
    /// It joined a cluster (being a member of it already, or not).
    Joined {
        /// It was a member already: it lost its data.
        already_member: bool,
    },
}

/// How long a seed with an empty controller log asks the other brokers whether they have a
/// cluster before it starts one.
const PROBE_WINDOW: Duration = Duration::from_secs(5);

/// Asks the other brokers (for up to [`PROBE_WINDOW`]) whether a cluster exists, joining it
/// when one does. Every broker answering that its log is empty ends the probe at once; a
/// broker that answers anything else but an empty log (or does not answer in time) means a
/// cluster exists, and the seed keeps joining it rather than starting one. Only brokers that
/// are all empty or not listening let it start a cluster.
async fn probe_cluster(
    peers: &Peers,
    seeds: &[(NodeId, String)],
    node_id: NodeId,
    peer_address: &str,
) -> Probe {
    let deadline = tokio::time::Instant::now() + PROBE_WINDOW;
    let others: Vec<&(NodeId, String)> = seeds.iter().filter(|(id, _)| *id != node_id).collect();
    let mut elsewhere = false;
    loop {
        let mut empty = 0;
        for (seed, address) in &others {
            let request = peers.request(
                *seed,
                pb::JoinRequest {
                    node_id,
                    peer_address: peer_address.to_string(),
                    hops: 0,
                    features: super::feature_level(),
                },
                JOIN_TIMEOUT.min(Duration::from_secs(2)),
            );
            let Ok(mut client) = peers.controller_client(address) else {
                continue;
            };
            match client.join(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    tracing::info!(
                        leader = response.leader_id,
                        already_member = response.already_member,
                        "joined the cluster the other brokers have"
                    );
                    return Probe::Joined {
                        already_member: response.already_member,
                    };
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => empty += 1,
                // Not listening (yet): says nothing either way.
                Err(status) if status.message().contains("tcp connect error") => {}
                Err(status) => {
                    // A broker that is up and not empty (it has no leader right now, or its
                    // leader does not answer): a cluster exists. Never start a second one.
                    tracing::info!(
                        seed,
                        "asking whether a cluster exists: {}",
                        status.message()
                    );
                    elsewhere = true;
                }
            }
        }
        if empty == others.len() {
            return Probe::NoCluster;
        }
        if tokio::time::Instant::now() >= deadline {
            return if elsewhere {
                Probe::Elsewhere
            } else {
                Probe::NoCluster
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Joins the controller group through the seeds: asks each in turn (any broker forwards to the
/// controller leader) until one has added this broker, backing off between rounds. Runs until it
/// succeeds, or until the cluster refuses this broker for good (ABORTED: its build is below the
/// feature level the cluster has used), which it reports through `refused`. A refusal naming
/// another level (a follower of an older build forwarded the join and dropped the level) is
/// not for good: it asks the next seed.
async fn join(
    peers: Peers,
    seeds: Vec<(NodeId, String)>,
    node_id: NodeId,
    peer_address: String,
    refused: watch::Sender<Option<String>>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        for (seed, address) in seeds.iter().filter(|(id, _)| *id != node_id) {
            let request = peers.request(
                *seed,
                pb::JoinRequest {
                    node_id,
                    peer_address: peer_address.clone(),
                    hops: 0,
                    features: super::feature_level(),
                },
                JOIN_TIMEOUT,
            );
            let result = match peers.controller_client(address) {
                Ok(mut client) => client.join(request).await,
                Err(e) => Err(tonic::Status::unavailable(e)),
            };
            match result {
                Ok(response) => {
                    let response = response.into_inner();
                    tracing::info!(
                        leader = response.leader_id,
                        already_member = response.already_member,
                        "joined the controller group"
                    );
                    peers.decide_recovery(if response.already_member {
                        Recovery::Rejoining
                    } else {
                        Recovery::Normal
                    });
                    return;
                }
                Err(status) if refuses_this_build(&status) => {
                    tracing::error!(seed, %address, "the cluster refused this broker: {}", status.message());
                    let _ = refused.send(Some(status.message().to_string()));
                    return;
                }
                Err(status) => {
                    tracing::info!(seed, %address, "cannot join through this broker yet: {}", status.message())
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// `WEFT_TEST_JOIN_DELAY_MS`: a test hook that makes the controller leader wait that long
/// between checking a joining broker's feature level and adding it as a learner (the window
/// in which a command can raise the level past the joiner's build).
fn join_delay() -> Option<Duration> {
    crate::test_hook_ms("WEFT_TEST_JOIN_DELAY_MS")
}

/// The ErrorInfo reason of a join refused for its feature level.
const FEATURE_LEVEL_TOO_LOW: &str = "FEATURE_LEVEL_TOO_LOW";

/// The refusal of broker `node`'s join: its build's level `features` is below `in_use`.
fn join_refused(node: NodeId, features: u32, in_use: u32) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let details = ErrorDetails::with_error_info(
        FEATURE_LEVEL_TOO_LOW,
        crate::error::ERROR_DOMAIN,
        [
            ("features".to_string(), features.to_string()),
            ("in_use".to_string(), in_use.to_string()),
        ],
    );
    tonic::Status::with_error_details(
        tonic::Code::Aborted,
        format!(
            "broker {node} is at feature level {features}, and this cluster has used level \
             {in_use} (deny rules, offset resets, its cluster id): it would apply the controller log \
             differently; run a newer build there"
        ),
        details,
    )
}

/// Whether `status` refuses this broker's join for good: ABORTED for a feature level, the level
/// the leader saw being this build's own (not a level lost on the way).
fn refuses_this_build(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt;
    status.code() == tonic::Code::Aborted
        && status.get_details_error_info().is_some_and(|info| {
            info.reason == FEATURE_LEVEL_TOO_LOW
                && info.metadata.get("features") == Some(&super::feature_level().to_string())
        })
}

/// How long a forwarded proposal may take at the leader.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a join may take (adding a learner waits until it has caught up).
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// `weft.internal.v1.Controller` on the peer port.
#[derive(Debug, Clone)]
pub struct ControllerService {
    peers: Peers,
    state: watch::Receiver<Arc<ControllerState>>,
}

impl ControllerService {
    /// Serves the controller group registered in `peers`, whose applied state `state` is.
    pub fn new(peers: Peers, state: watch::Receiver<Arc<ControllerState>>) -> ControllerService {
        ControllerService { peers, state }
    }

    fn leader_address(raft: &Raft) -> Option<(NodeId, String)> {
        let metrics = raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let node = metrics
            .membership_config
            .membership()
            .get_node(&leader)?
            .clone();
        Some((leader, node.addr))
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for ControllerService {
    async fn join(
        &self,
        request: tonic::Request<pb::JoinRequest>,
    ) -> Result<tonic::Response<pb::JoinResponse>, tonic::Status> {
        self.peers.check(&request)?;
        let raft = self.peers.group(CONTROLLER_GROUP)?;
        let message = request.into_inner();
        if message.node_id == 0 || message.peer_address.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "a join needs a node id and a peer address",
            ));
        }
        if !raft
            .is_initialized()
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
        {
            return Err(tonic::Status::failed_precondition(
                "this broker's controller log is empty: no cluster here yet",
            ));
        }
        let metrics = raft.metrics().borrow().clone();
        if metrics.current_leader != Some(metrics.id) {
            let Some((leader, address)) = Self::leader_address(&raft) else {
                return Err(tonic::Status::unavailable(
                    "the controller has no leader now",
                ));
            };
            if message.hops > 0 {
                return Err(tonic::Status::unavailable(format!(
                    "not the controller leader (node {leader} is)"
                )));
            }
            let request = self.peers.request(
                leader,
                pb::JoinRequest {
                    hops: message.hops + 1,
                    ..message
                },
                JOIN_TIMEOUT,
            );
            let mut client = self
                .peers
                .controller_client(&address)
                .map_err(tonic::Status::unavailable)?;
            return client.join(request).await;
        }
        // A build below the feature level this controller log has used would apply it
        // differently (a deny rule as an allow rule): it may not join. Read as of now.
        raft.ensure_linearizable().await.map_err(|e| {
            tonic::Status::unavailable(format!("not the controller leader now: {e}"))
        })?;
        let in_use = self.state.borrow().features_in_use;
        if message.features < in_use {
            // ABORTED, not FAILED_PRECONDITION: a joining seed reads FAILED_PRECONDITION as
            // "no cluster here yet", and must never start a second cluster. The level seen goes
            // into ErrorInfo: a joiner stops only when it is its own (a follower of an older
            // build that forwarded the join dropped the level, which then reads 0).
            return Err(join_refused(message.node_id, message.features, in_use));
        }
        let membership = metrics.membership_config.membership().clone();
        let is_voter = membership.voter_ids().any(|id| id == message.node_id);
        // A broker registered before lost its data (a first join that failed half way and is
        // retried is not registered yet: it registers once it has joined).
        let already_member = self.state.borrow().brokers.contains_key(&message.node_id);
        if !is_voter {
            if let Some(delay) = join_delay() {
                tracing::warn!(?delay, "WEFT_TEST_JOIN_DELAY_MS: adding the learner later");
                tokio::time::sleep(delay).await;
            }
            let node = BasicNode::new(message.peer_address.clone());
            raft.add_learner(message.node_id, node.clone(), false)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("adding the learner: {e}")))?;
            // A command applied between the check above and the learner's entry did not count
            // this broker (it was no member yet) and may have raised the level past its build,
            // which would apply that command differently. From the learner's entry on, every
            // command counts it (unregistered: level 0), so this second read is final.
            raft.ensure_linearizable().await.map_err(|e| {
                tonic::Status::unavailable(format!("not the controller leader now: {e}"))
            })?;
            let in_use = self.state.borrow().features_in_use;
            if message.features < in_use {
                raft.change_membership(
                    openraft::ChangeMembers::RemoveNodes(BTreeSet::from([message.node_id])),
                    false,
                )
                .await
                .map_err(|e| {
                    tonic::Status::unavailable(format!("taking the refused learner out: {e}"))
                })?;
                tracing::warn!(
                    node = message.node_id,
                    features = message.features,
                    in_use,
                    "the feature level rose while a broker joined: took it out and refused it"
                );
                return Err(join_refused(message.node_id, message.features, in_use));
            }
            // Waits for the learner to catch up (an entry appending the same learner again).
            raft.add_learner(message.node_id, node, true)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("adding the learner: {e}")))?;
            raft.change_membership(
                openraft::ChangeMembers::AddVoterIds(BTreeSet::from([message.node_id])),
                false,
            )
            .await
            .map_err(|e| tonic::Status::unavailable(format!("promoting the voter: {e}")))?;
            tracing::info!(
                node = message.node_id,
                address = %message.peer_address,
                "a broker joined the controller group"
            );
        }
        Ok(tonic::Response::new(pb::JoinResponse {
            leader_id: metrics.id,
            already_member,
        }))
    }

    async fn read_index(
        &self,
        request: tonic::Request<pb::ReadIndexRequest>,
    ) -> Result<tonic::Response<pb::ReadIndexResponse>, tonic::Status> {
        self.peers.check(&request)?;
        let raft = self.peers.group(CONTROLLER_GROUP)?;
        let read = raft.ensure_linearizable().await.map_err(|e| {
            tonic::Status::unavailable(format!("not the controller leader now: {e}"))
        })?;
        Ok(tonic::Response::new(pb::ReadIndexResponse {
            index: read.map_or(0, |l| l.index),
        }))
    }

    async fn remove_member(
        &self,
        request: tonic::Request<pb::RemoveMemberRequest>,
    ) -> Result<tonic::Response<pb::RemoveMemberResponse>, tonic::Status> {
        self.peers.check(&request)?;
        let raft = self.peers.group(CONTROLLER_GROUP)?;
        let message = request.into_inner();
        let leader_id = tokio::time::timeout(
            PROPOSE_TIMEOUT,
            remove_unregistered_here_or_forward(
                &raft,
                &self.peers,
                || self.state.borrow().clone(),
                message.node_id,
                message.hops,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::Timeout(
                "the member was not taken out in time".into(),
            ))
        })
        .map_err(tonic::Status::from)?;
        Ok(tonic::Response::new(pb::RemoveMemberResponse { leader_id }))
    }

    async fn propose(
        &self,
        request: tonic::Request<pb::ProposeRequest>,
    ) -> Result<tonic::Response<pb::ProposeResponse>, tonic::Status> {
        self.peers.check(&request)?;
        let timeout = PROPOSE_TIMEOUT;
        let raft = self.peers.group(CONTROLLER_GROUP)?;
        let message = request.into_inner();
        let command: ControllerCommand = serde_json::from_slice(&message.command)
            .map_err(|e| tonic::Status::invalid_argument(format!("controller command: {e}")))?;
        let response = propose_here_or_forward(&raft, &self.peers, command, message.hops, timeout)
            .await
            .map_err(tonic::Status::from)?;
        let bytes =
            serde_json::to_vec(&response).map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(pb::ProposeResponse {
            response: bytes.into(),
        }))
    }
}

/// Finds damage anywhere in the controller log (it is small: it is read whole) and repairs it
/// with another broker's copy of the same entries before the group starts. The controller's
/// state machine must apply every entry: a damaged one skipped would leave this broker with
/// metadata that differs from the others' (seen by the fault-injection harness: a broker
/// answered TOPIC_NOT_FOUND for minutes after its controller log was damaged, and opened
/// partitions under group ids the others had given to other partitions). Retries while no
/// broker can give the entries; a broker with no other broker to ask refuses to start.
async fn repair_controller_log(
    reader: &super::LogReader,
    peers: &Peers,
    node_id: NodeId,
    seeds: &[(NodeId, String)],
    sm: &ControllerStateMachine,
) -> anyhow::Result<()> {
    let damaged = super::partition_group::scrub_log(reader)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the controller log: {e}"))?;
    if damaged == 0 {
        return Ok(());
    }
    let nodes = other_brokers(node_id, seeds, sm);
    if nodes.is_empty() {
        anyhow::bail!(
            "the controller log has {damaged} damaged range(s) and there is no other broker to \
             repair them from; restore the data directory from a backup"
        );
    }
    tracing::warn!(
        damaged,
        "the controller log is damaged; repairing it from another broker before the controller starts"
    );
    let mut pause = Duration::from_millis(500);
    loop {
        let left =
            super::partition_group::repair_ranges(reader, peers, CONTROLLER_GROUP, &nodes, None)
                .await;
        if left == 0 {
            tracing::warn!("repaired the controller log");
            return Ok(());
        }
        tracing::warn!(
            left,
            "damaged controller log entries not repaired yet (no broker could give them); retrying"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

/// The brokers other than `node_id` that may hold the controller log: the seeds and the
/// members of the membership in force.
fn other_brokers(
    node_id: NodeId,
    seeds: &[(NodeId, String)],
    sm: &ControllerStateMachine,
) -> Vec<(NodeId, String)> {
    let mut nodes: BTreeMap<NodeId, String> = seeds.iter().cloned().collect();
    let state = sm.state();
    for (id, node) in state.last_membership.membership().nodes() {
        nodes.entry(*id).or_insert_with(|| node.addr.clone());
    }
    nodes.remove(&node_id);
    nodes.into_iter().collect()
}

/// A controller log that ends before the last entry this broker knew committed (the log id
/// the log store saved, under fsync before ack) lost part of its durable tail while the broker
/// was down (a failing disk, a partial restore). The entries after the snapshot through that
/// one are fetched from another broker and appended before the group starts: without them
/// this broker could vote for a candidate that lacks them, and a committed entry would be lost.
/// They are taken only when the last of them carries the saved log id (so, by Raft's log
/// matching, all of them are the committed ones: a broker that was cut off may hold entries of
/// an earlier term at those indexes). Entries the snapshot covers are never fetched (the
/// snapshot holds their state): a log ending before the snapshot restarts right after it.
/// Retries while no broker can give them; when a broker answers that it purged them (a
/// snapshot of its own covers them), the group starts without them and catches up from the
/// leader. A broker with no other broker to ask refuses to start.
async fn fill_lost_controller_tail(
    reader: &super::LogReader,
    peers: &Peers,
    node_id: NodeId,
    seeds: &[(NodeId, String)],
    sm: &ControllerStateMachine,
) -> anyhow::Result<()> {
    let Some(committed) = reader.saved_committed_log_id() else {
        return Ok(());
    };
    if !reader.syncs_before_ack() {
        return Ok(());
    }
    let log_end = || {
        reader
            .with_log(|log| log.end())
            .map_err(|e| anyhow::anyhow!("cannot read the controller log: {e}"))
    };
    let snapshot = sm.state().last_applied;
    let applied_next = snapshot.map_or(0, |l| l.index + 1);
    if committed.index < applied_next.max(log_end()?.next_index) {
        return Ok(());
    }
    let nodes = other_brokers(node_id, seeds, sm);
    if nodes.is_empty() {
        anyhow::bail!(
            "the controller log ends at entry {} but entries through {} were committed, and \
             there is no other broker to fetch them from; restore the data directory from a \
             backup",
            log_end()?.next_index,
            committed.index
        );
    }
    if let Some(snapshot) = snapshot
        && log_end()?.next_index < applied_next
    {
        // The log restarts right after the snapshot, recorded as purged through it.
        reader
            .record_purged(snapshot)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        reader
            .with_log_mut(|log| {
                let next_offset = log.end().next_offset;
                log.reset(weft_storage::LogPosition {
                    next_offset,
                    next_index: applied_next,
                })
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    tracing::warn!(
        log_end = log_end()?.next_index,
        committed_through = committed.index,
        "the controller log lost entries this broker knew committed; fetching them from another broker before the controller starts"
    );
    let want = committed.index + 1;
    let mut pause = Duration::from_millis(500);
    loop {
        for (node, address) in &nodes {
            let from = log_end()?.next_index;
            if from >= want {
                return Ok(());
            }
            let entries = match super::partition_group::fetch_entries(
                peers,
                CONTROLLER_GROUP,
                (*node, address),
                from,
                want,
            )
            .await
            {
                Ok(entries) => entries,
                Err(super::partition_group::FetchError::Purged(why)) => {
                    tracing::warn!(
                        from = node,
                        "another broker purged the controller entries this log lost ({why}); starting without them: the leader sends them, or its snapshot"
                    );
                    return Ok(());
                }
                Err(e) => {
                    tracing::info!(from = node, "cannot fetch the lost controller entries: {e}");
                    continue;
                }
            };
            let last = entries
                .last()
                .and_then(|e| e.first())
                .map(super::log_store::log_id_of);
            if last != Some(committed) {
                tracing::info!(
                    from = node,
                    "the controller entries fetched end at {last:?}, not at the entry saved as committed ({committed:?}); not taken"
                );
                continue;
            }
            let writer = reader.clone();
            let filled = tokio::task::spawn_blocking(move || writer.append_fetched(&entries))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            match filled {
                Ok(filled) if filled.next_index == want => {
                    tracing::warn!(
                        from = node,
                        entries = want - from,
                        "fetched the entries the controller log had lost"
                    );
                    metrics::counter!("weft_controller_refetched_tails_total").increment(1);
                    return Ok(());
                }
                Ok(filled) => anyhow::bail!(
                    "the controller entries fetched from node {node} end at entry {}, not at {want}",
                    filled.next_index
                ),
                Err(e) => tracing::warn!(
                    from = node,
                    "cannot append the fetched controller entries: {e}"
                ),
            }
        }
        tracing::warn!("the lost controller entries could not be fetched yet; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal naming this build's level stops the join; one naming another level (a
    /// follower of an older build forwarded the join and dropped the level: it reads 0), or an
    /// ABORTED without the refusal's details, does not.
    #[test]
    fn a_join_stops_only_on_a_refusal_of_its_own_level() {
        let own = super::super::feature_level();
        assert!(refuses_this_build(&join_refused(2, own, own + 1)));
        assert!(!refuses_this_build(&join_refused(2, own + 1, own + 2)));
        if own > 0 {
            assert!(!refuses_this_build(&join_refused(2, 0, own)));
        }
        assert!(!refuses_this_build(&tonic::Status::aborted("other")));
        let status = join_refused(9, 0, 1);
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert!(
            status.message().contains("broker 9 is at feature level 0")
                && status.message().contains("has used level 1"),
            "{status:?}"
        );
    }
}
