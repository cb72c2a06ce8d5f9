//! One broker node: its metadata store, the controller Raft group (topics), the partitions it
//! hosts (`registry`), and the consumer-group coordinator.
//!
//! The registry follows the controller: a reconciler task watches the controller state and
//! starts the partitions whose replicas include this node, applies configuration changes, and
//! stops and deletes the partitions of deleted topics. Each partition is opened, replayed and
//! supervised by its own task; the node serves a partition only once it is ready.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weft_storage::SledMetaStore;

use crate::meta::{Metadata, NodeIdentity};

use crate::config::Config;
use crate::error::BrokerError;
use crate::groups::{Coordinator, OffsetStore};
use crate::partition::{Partition, PartitionSpec};
use crate::raft::{
    ControllerCommand, ControllerGroup, ControllerResponse, ControllerState, Flusher, GroupOffsets,
    NodeId, Peers, SyncMode, TopicMeta, controller_raft_config, raft_config,
};
use crate::registry::{HostContext, Phase, Registry};
use crate::topic::TopicConfig;
use futures::future::BoxFuture;

/// Entries after which a partition snapshots even if few bytes were applied (many tiny entries).
const SNAPSHOT_EVERY_ENTRIES: u64 = 100_000;

/// A running broker node.
pub struct Node {
    /// Configuration in force.
    pub config: Config,
    /// This node's id.
    pub node_id: NodeId,
    /// The cluster id this broker's data directory holds (made at its first start); the
    /// cluster's own is [`Node::cluster_id`].
    pub local_cluster_id: String,
    /// Consumer groups.
    pub groups: Coordinator,
    controller: ControllerGroup,
    registry: Registry,
    peers: Peers,
    started: Instant,
    stopping: AtomicBool,
    /// Set when the broker begins to shut down (before its servers drain): long calls end or
    /// answer at once, so the drain finishes instead of waiting out the grace.
    closing: watch::Sender<bool>,
    /// Replica moves this broker drives.
    pub(crate) moves: crate::reassign::Moves,
    /// Access control (the config's part).
    acl: crate::acl::Acl,
    /// The broker's metadata store.
    meta: Metadata,
    /// Where calls for partitions this broker holds no replica of go.
    pub(crate) route_hints: crate::grpc::route_hints::RouteHints,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.local_cluster_id)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Passes of a drain at most (see [`Node::drain`]), and the pause before each pass after the
/// first.
const DRAIN_PASSES_MAX: usize = 5;
const DRAIN_PASS_PAUSE: Duration = Duration::from_millis(200);

/// Runs the preferred-leader balance every `interval` while the node lives.
async fn balance_loop(node: std::sync::Weak<Node>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.stopping.load(Ordering::SeqCst) {
            return;
        }
        node.balance_leaders().await;
    }
}

/// Where consumer groups are coordinated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coordinated {
    /// Here.
    Here,
    /// By another broker.
    There {
        /// Its node id.
        node_id: NodeId,
        /// Its peer address.
        peer_address: String,
    },
}

/// Committed group offsets in the controller group: replicated with the cluster's metadata.
#[derive(Debug)]
struct ControllerOffsets {
    controller: ControllerGroup,
    timeout: Duration,
    node_id: NodeId,
    /// The nonce of this broker's takeover of the groups while it leads the controller
    /// (set by `coordinator_loop`), None otherwise.
    takeover: Arc<std::sync::Mutex<Option<u64>>>,
}

impl OffsetStore for ControllerOffsets {
    fn group(&self, group: &str) -> Option<Arc<GroupOffsets>> {
        self.controller.state().groups.get(group).cloned()
    }

    fn groups(&self) -> Vec<String> {
        self.controller.state().groups.keys().cloned().collect()
    }

    fn generation_floor(&self) -> Option<u64> {
        // The controller leader coordinates every group, under a takeover it committed in the
        // controller log: its epoch in the high half makes the generations of this coordinator
        // exceed every one an earlier coordinator (or this one before a restart) handed out.
        let takeover = *self.takeover.lock().ok()?;
        let state = self.controller.state();
        (takeover.is_some() && state.coordinator == takeover.map(|n| (self.node_id, n)))
            .then(|| state.coordinator_epoch << 32)
    }

    fn commit(
        &self,
        group: String,
        topic_id: String,
        generation: u64,
        offsets: Vec<(u32, u64)>,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.store(ControllerCommand::CommitOffsets {
            group,
            topic_id,
            generation,
            offsets,
            reset: false,
            at_ms: wall_ms(),
        })
    }

    fn reset(
        &self,
        group: String,
        topic_id: String,
        offsets: Vec<(u32, u64)>,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        if let Err(e) = require_feature(&self.controller.state(), 1, "offset resets") {
            return Box::pin(std::future::ready(Err(e)));
        }
        self.store(ControllerCommand::CommitOffsets {
            group,
            topic_id,
            generation: 0,
            offsets,
            reset: true,
            at_ms: wall_ms(),
        })
    }

    fn stamps(&self) -> bool {
        true
    }

    fn touch(
        &self,
        group: String,
        topic_id: String,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.store(ControllerCommand::stamp(group, topic_id, wall_ms()))
    }

    fn delete(&self, group: String) -> BoxFuture<'static, Result<bool, BrokerError>> {
        let controller = self.controller.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            // (On this broker only, as `store` proposes: the coordinator checked the group.)
            match controller
                .propose_here(ControllerCommand::DeleteGroup { group }, timeout)
                .await?
            {
                ControllerResponse::GroupDeleted { existed } => Ok(existed),
                other => Err(BrokerError::Internal(format!(
                    "unexpected controller response {other:?}"
                ))),
            }
        })
    }
}

impl ControllerOffsets {
    /// Proposes a commit (or reset) of offsets to the controller, on this broker only: the
    /// coordinator checked it against its groups, which are this controller leader's. Were the
    /// leadership lost meanwhile, openraft would answer "forward to the new leader", which
    /// would apply it after the new coordinator's takeover, unchecked (a fenced member's commit
    /// stored over a new owner's): refused (UNAVAILABLE) instead, and the member retries with
    /// the new coordinator. (An entry that the new leader holds already is applied before its
    /// takeover, while the generations it was checked against were still the current ones.)
    fn store(&self, command: ControllerCommand) -> BoxFuture<'static, Result<(), BrokerError>> {
        let controller = self.controller.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match controller.propose_here(command, timeout).await? {
                ControllerResponse::Committed => Ok(()),
                ControllerResponse::Invalid(reason) => Err(BrokerError::invalid("offsets", reason)),
                ControllerResponse::NotFound(_) => Err(BrokerError::invalid(
                    "topic",
                    "the topic was deleted while the commit was under way",
                )),
                other => Err(BrokerError::Internal(format!(
                    "unexpected controller response {other:?}"
                ))),
            }
        })
    }
}

/// This broker's wall clock in ms since the epoch (0 before it).
fn wall_ms() -> u64 {
    u64::try_from(crate::grpc::now_ms()).unwrap_or(0)
}

/// Refuses `what` (CONFLICT) while a registered broker runs a build below feature `level`: it
/// would apply the command differently, and the controller's replicas would disagree.
fn require_feature(state: &ControllerState, level: u32, what: &str) -> Result<(), BrokerError> {
    match state.behind(level) {
        None => Ok(()),
        Some((node, features)) => Err(BrokerError::Conflict(format!(
            "broker {node} is at feature level {features} ({what} need {level}): an older build, \
             or not registered yet, that would not apply this as the others do: upgrade every \
             broker first"
        ))),
    }
}

/// Moves committed offsets an older build kept in this broker's metadata store into the
/// controller (where they are replicated), then deletes them here. Offsets of topics that no
/// longer exist are dropped; an offset behind one the controller has already is left behind.
async fn migrate_local_group_offsets(node: &Node, meta: &Metadata) -> Result<(), BrokerError> {
    let internal = |e: crate::meta::MetaError| BrokerError::Internal(e.to_string());
    for group in meta.groups().map_err(internal)? {
        let mut by_topic: BTreeMap<String, Vec<(u32, u64)>> = BTreeMap::new();
        for o in meta.group_offsets(&group).map_err(internal)? {
            by_topic
                .entry(o.topic_id)
                .or_default()
                .push((o.partition, o.offset));
        }
        for (topic_id, offsets) in by_topic {
            let exists = node
                .controller
                .state()
                .topics
                .values()
                .any(|t| t.topic_id == topic_id);
            if !exists {
                continue;
            }
            match node
                .propose(ControllerCommand::CommitOffsets {
                    group: group.clone(),
                    topic_id,
                    generation: 0,
                    offsets,
                    reset: false,
                    at_ms: wall_ms(),
                })
                .await?
            {
                ControllerResponse::Committed => {}
                other => tracing::info!(group = %group, "offsets not moved: {other:?}"),
            }
        }
        meta.delete_group(&group).map_err(internal)?;
        tracing::info!(group = %group, "moved committed offsets into the controller");
    }
    Ok(())
}

/// How often the controller's leader checks that a majority of the voters still answers it
/// (see [`coordinator_loop`]).
const COORDINATOR_LEASE_CHECK_EVERY: Duration = Duration::from_millis(200);

/// Follows who leads the controller (the coordinator of every group is its leader). When this
/// broker stops leading, or leads in a new term, it forgets the groups it coordinated; when it
/// starts leading (also after a restart, in the same term) it takes the groups over: it
/// commits a [`ControllerCommand::TakeOverGroups`] and hands out no generation before that.
///
/// A leader that has not heard from a majority of the controller's voters within two election
/// timeouts (cut off from them: they may have elected another leader, and openraft 0.9 keeps an
/// isolated leader believing it leads) stops coordinating as if it had lost the leadership:
/// its members' streams end and their clients join again, through the brokers that reach the
/// new coordinator. Before, both coordinated the same groups at once (records delivered to two
/// members; the old side's commits could not be stored). Heard from again, it takes the
/// groups over anew (a new epoch fences the generations it gave out before).
async fn coordinator_loop(node: Weak<Node>, takeover: Arc<std::sync::Mutex<Option<u64>>>) {
    let Some(mut leaders) = node.upgrade().map(|n| n.controller.watch_leader()) else {
        return;
    };
    let mut led_in: Option<u64> = None;
    loop {
        let leader = *leaders.borrow_and_update();
        let Some(node) = node.upgrade() else { return };
        let term = node.controller.term();
        let leads = leader == Some(node.node_id);
        let cut_off = leads && node.controller.lost_quorum();
        let leads_in = (leads && !cut_off).then_some(term);
        if leads_in != led_in {
            if cut_off && led_in.is_some() {
                tracing::warn!(
                    "no answer from most of the controller's voters: no longer coordinating the consumer groups"
                );
            }
            if let Ok(mut t) = takeover.lock() {
                *t = None;
            }
            // Also on taking the groups over, the first time too: until its takeover is
            // committed and the members had time to rejoin, this broker does not know them.
            node.groups.reset();
            if leads_in.is_some() {
                let nonce = uuid::Uuid::new_v4().as_u64_pair().0;
                if let Ok(mut t) = takeover.lock() {
                    *t = Some(nonce);
                }
                tokio::spawn(take_over_groups(
                    Arc::downgrade(&node),
                    takeover.clone(),
                    nonce,
                ));
            }
            led_in = leads_in;
        }
        drop(node);
        tokio::select! {
            changed = leaders.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(COORDINATOR_LEASE_CHECK_EVERY), if leads => {}
        }
    }
}

/// Commits this broker's takeover `nonce` of the consumer groups, retrying while it is still
/// the takeover in force (this broker leads the controller in the same term).
async fn take_over_groups(
    node: Weak<Node>,
    takeover: Arc<std::sync::Mutex<Option<u64>>>,
    nonce: u64,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let current = takeover.lock().map(|t| *t == Some(nonce)).unwrap_or(false);
        let Some(node) = node.upgrade().filter(|_| current) else {
            return;
        };
        if node.stopping.load(Ordering::SeqCst) {
            return;
        }
        let command = ControllerCommand::TakeOverGroups {
            node_id: node.node_id,
            nonce,
        };
        let timeout = Duration::from_millis(node.config.request_timeout_ms);
        match node.controller.propose_here(command, timeout).await {
            Ok(ControllerResponse::CoordinatorEpoch(epoch)) => {
                tracing::info!(epoch, "took the consumer groups over");
                // (Unless it no longer is the takeover in force: a reset came meanwhile.) No
                // group with offsets in the state applied through the takeover (a new cluster):
                // no members anywhere to wait for. (Not whether a coordinator came before: the
                // state read before the takeover applied may not hold the log replayed yet.)
                if takeover.lock().map(|t| *t == Some(nonce)).unwrap_or(false) {
                    let nobody = node.controller.state().groups.is_empty();
                    node.groups.took_over(Instant::now(), nobody);
                }
                return;
            }
            Ok(other) => {
                tracing::warn!("unexpected answer to a group takeover: {other:?}");
                return;
            }
            Err(e) => tracing::info!("cannot take the consumer groups over yet: {e}"),
        }
        drop(node);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Registers this broker in the controller once it has joined, retrying until it has.
async fn register_loop(weak: std::sync::Weak<Node>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(mut node) = weak.upgrade() else {
            return;
        };
        if node.stopping.load(Ordering::SeqCst) {
            return;
        }
        // Only once this broker's join is settled: the controller leader tells a joining broker
        // that lost its data by finding it registered, so a broker that registered while its
        // own join was still being retried (its first attempt added it, the answer was lost)
        // would take itself for one that lost its data and withhold its votes in every group
        // (seen with five brokers joining at once: new partitions got no leader).
        let joined = node.peers().recovery() != crate::raft::Recovery::Undecided;
        if joined && node.controller.has_leader() {
            if let Some(delay) = register_delay() {
                // Test hook: a broker lost between its join and its registration.
                tracing::warn!(?delay, "WEFT_TEST_REGISTER_DELAY_MS: registering later");
                drop(node);
                tokio::time::sleep(delay).await;
                let Some(again) = weak.upgrade() else { return };
                node = again;
            }
            match node.register_broker().await {
                Ok(()) => {
                    tracing::info!(node = node.node_id, "registered in the controller");
                    drop(node);
                    keep_feature_level_registered(weak).await;
                    return;
                }
                Err(e) => tracing::info!("cannot register in the controller yet: {e}"),
            }
        }
        drop(node);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Clears the mark of a broker that started with an empty data directory in a cluster
/// ([`Metadata::recovering`]) once it votes as any broker: at once when the cluster said it is
/// new; after it lost its data, once every group open here has caught up with what its leader
/// had committed and every partition it holds serves. Checked every second.
async fn settle_recovery(weak: Weak<Node>, meta: Metadata) {
    use crate::raft::Recovery;
    // Test hook: `WEFT_TEST_SETTLE_AFTER_MS` holds the broker short of settling that long (a
    // broker stopped while it catches up).
    if let Some(ms) = std::env::var("WEFT_TEST_SETTLE_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(node) = weak.upgrade() else { return };
        if node.stopping.load(Ordering::SeqCst) {
            return;
        }
        let peers = node.peers();
        let settled = match peers.recovery() {
            Recovery::Normal => true,
            Recovery::Undecided => false,
            Recovery::Rejoining => node.settled_after_data_loss(),
        };
        if !settled {
            continue;
        }
        // Becoming Normal clears the mark too (`Peers::on_settled`); cleared here as well in
        // case that failed.
        if peers.recovery() == Recovery::Rejoining {
            peers.set_recovery(Recovery::Normal);
        }
        match meta.clear_recovering() {
            Ok(()) => {
                tracing::info!(
                    "settled after starting with an empty data directory: votes in every group"
                );
                return;
            }
            Err(e) => tracing::warn!("cannot clear the recovering mark yet: {e}"),
        }
    }
}

/// `WEFT_TEST_REGISTER_DELAY_MS`: a test hook that makes a joining broker wait that long after
/// its join before it registers (the window in which a broker lost between the two is a member
/// of the controller group that never registered).
fn register_delay() -> Option<Duration> {
    crate::test_hook_ms("WEFT_TEST_REGISTER_DELAY_MS")
}

/// How often a broker whose registration lost its feature level registers again.
const REREGISTER_INTERVAL: Duration = Duration::from_secs(3);

/// Registers again while the controller records this broker below its build's feature level:
/// during a rolling upgrade the registration may have gone through a controller leader of an
/// older build, which drops the level it does not know (or a snapshot such a leader made may
/// have). Also while no cluster id is stored though every broker could store it. At most once
/// per [`REREGISTER_INTERVAL`], until the level (and the id) is recorded.
async fn keep_feature_level_registered(weak: std::sync::Weak<Node>) {
    let (node_id, mut state) = match weak.upgrade() {
        Some(node) => (node.node_id, node.controller_watch()),
        None => return,
    };
    // Its own level recorded too low; or every broker is at the level that stores the cluster
    // id and none is stored (the last broker of an older build was removed, so no registration
    // came after it): a registration sets it.
    let behind = |state: &ControllerState| {
        state.brokers.get(&node_id).is_some_and(|b| {
            b.features < crate::raft::feature_level()
                || (state.cluster_id.is_empty()
                    && crate::raft::feature_level() >= crate::raft::CLUSTER_ID_LEVEL
                    && state.behind(crate::raft::CLUSTER_ID_LEVEL).is_none())
        })
    };
    loop {
        if behind(&state.borrow_and_update()) {
            tokio::time::sleep(REREGISTER_INTERVAL).await;
            let Some(node) = weak.upgrade() else { return };
            if node.stopping.load(Ordering::SeqCst) {
                return;
            }
            if behind(&node.controller_state()) {
                match node.register_broker().await {
                    Ok(()) => tracing::info!(
                        node = node_id,
                        level = crate::raft::feature_level(),
                        "registered again: the controller had this broker below its feature \
                         level, or stored no cluster id"
                    ),
                    Err(e) => tracing::info!("cannot register again yet: {e}"),
                }
            }
            continue;
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Where a call for a partition is served.
#[derive(Debug)]
pub enum Route {
    /// Here.
    Local(Arc<Partition>),
    /// By another broker, the partition's leader, over the peer port.
    Forward {
        /// Its node id.
        leader: NodeId,
        /// Its peer address.
        peer_address: String,
    },
}

/// Why a node is not ready, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    /// "topic/partition".
    pub partition: String,
    /// Its phase: opening, replaying or down.
    pub phase: String,
    /// Why it is down, when it is.
    pub reason: Option<String>,
}

impl Node {
    /// The node's peer connections and the Raft groups it serves on the peer port.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Opens the data directory and starts the controller group (initialising a new cluster on
    /// first start). Partitions open in the background: [`Node::not_ready`] says which are not
    /// serving yet.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Node>> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data_dir {}: {e}", config.data_dir.display())
        })?;
        let store = SledMetaStore::open(config.data_dir.join("meta"))?;
        let meta = Metadata::new(Arc::new(store));
        let seeds = config.peer_list()?;
        let identity = match meta.node_identity()? {
            Some(identity) if identity.node_id != config.node_id => anyhow::bail!(
                "data_dir {} belongs to node {}, but node_id is {}",
                config.data_dir.display(),
                identity.node_id,
                config.node_id
            ),
            Some(identity) => identity,
            None => {
                let identity = NodeIdentity {
                    node_id: config.node_id,
                    cluster_id: uuid::Uuid::new_v4().to_string(),
                };
                // In a cluster, marked until this broker has settled that it is new, or caught
                // up after losing its data (see `Metadata::recovering`).
                meta.create_node_identity(&identity, !seeds.is_empty())?;
                identity
            }
        };
        let recovering = !seeds.is_empty() && meta.recovering()?;
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mode = if config.flush_sync == "fdatasync" {
            SyncMode::Fdatasync
        } else if !crate::raft::syncfs_reports_errors(&release) {
            tracing::warn!(
                kernel = release.trim(),
                "flush_sync = \"syncfs\" needs Linux 5.8 or later (an older kernel's syncfs does \
                 not report writeback errors): each log is synced with its own fdatasync instead"
            );
            SyncMode::Fdatasync
        } else {
            SyncMode::Syncfs
        };
        let flusher = Flusher::start(mode)
            .map_err(|e| anyhow::anyhow!("cannot start the flusher thread: {e}"))?;
        let peers = Peers::new(
            config.node_id,
            &config.cluster_name,
            Some(config.peer_listen.ip()),
            config.peer_upstream_map()?,
            crate::tls::peer_client(&config)?,
        );
        peers.watch_leaders();
        if recovering {
            // Its controller state is not trusted until it has caught up (see
            // `Node::reconcile`), whatever the voting mode becomes.
            peers.expect_catch_up(crate::raft::CONTROLLER_GROUP);
        }
        {
            let meta = meta.clone();
            peers.on_settled(Box::new(move || {
                if let Err(e) = meta.clear_recovering() {
                    tracing::warn!("cannot clear the recovering mark: {e}");
                }
            }));
        }
        if recovering {
            // An empty data directory in a cluster: a first start, or a broker that lost its
            // data. It votes only once the cluster has said which (and, if it lost its data,
            // once it has caught up in each group). So does one that was stopped before that
            // (its mark stays until then): with its identity alone it would vote at once, with
            // a log that may lack what it had acknowledged before it lost its data. (The
            // controller group makes it rejoining when its log already holds the cluster.)
            peers.set_recovery(crate::raft::Recovery::Undecided);
        }
        let controller = ControllerGroup::open(
            &config.data_dir.join("controller"),
            config.node_id,
            config.peer_address(),
            meta.clone(),
            Arc::new(controller_raft_config(raft_config(
                &config.cluster_name,
                config.raft_heartbeat_ms,
                config.raft_election_timeout_ms,
                None,
            )?)?),
            flusher.clone(),
            peers.clone(),
            seeds,
        )
        .await?;
        let partition_raft = Arc::new(raft_config(
            &config.cluster_name,
            config.raft_heartbeat_ms,
            config.raft_election_timeout_ms,
            Some(SNAPSHOT_EVERY_ENTRIES),
        )?);
        let registry = Registry::new(HostContext {
            node_id: config.node_id,
            peer_address: config.peer_address(),
            topics_dir: config.data_dir.join("topics"),
            meta: meta.clone(),
            raft_config: partition_raft,
            queue_max: config.publish_queue_max as usize,
            queue_bytes: crate::partition::QueueBytes::new(config.publish_queue_bytes_max),
            retention_interval: Duration::from_millis(config.retention_check_interval_ms),
            snapshot_interval_bytes: config.snapshot_interval_bytes,
            read_cache_bytes: usize::try_from(config.partition_read_cache_bytes)
                .unwrap_or(usize::MAX),
            direct_io: config.direct_io,
            producer_expiration_ms: config.producer_expiration_ms,
            producers_per_partition_max: config.producers_per_partition_max as usize,
            flusher,
            peers: peers.clone(),
        });
        let takeover = Arc::new(std::sync::Mutex::new(None));
        let groups = Coordinator::with_limits(
            Arc::new(ControllerOffsets {
                controller: controller.clone(),
                timeout: Duration::from_millis(config.request_timeout_ms),
                node_id: config.node_id,
                takeover: takeover.clone(),
            }),
            Duration::from_millis(config.session_timeout_ms),
            crate::groups::GroupLimits {
                groups: config.groups_max as usize,
                members: config.group_members_max as usize,
                offsets_retention: Duration::from_millis(config.offsets_retention_ms),
            },
        );
        let node = Arc::new(Node {
            node_id: config.node_id,
            local_cluster_id: identity.cluster_id,
            groups,
            controller,
            registry,
            peers,
            started: Instant::now(),
            stopping: AtomicBool::new(false),
            closing: watch::Sender::new(false),
            moves: Default::default(),
            acl: crate::acl::Acl::new(config.acl.enabled, config.acl.rules.clone()),
            meta: meta.clone(),
            route_hints: Default::default(),
            config,
        });
        let state = node.controller.state();
        let moved = meta.migrate_legacy_group_offsets(&|name| {
            state.topics.get(name).map(|t| t.topic_id.clone())
        })?;
        if moved > 0 {
            tracing::info!(moved, "moved committed group offsets to topic ids");
        }
        if recovering {
            tokio::spawn(settle_recovery(Arc::downgrade(&node), meta.clone()));
        }
        let done = node.reconcile().await;
        tokio::spawn(reconcile_loop(
            Arc::downgrade(&node),
            node.controller.watch(),
            done,
        ));
        node.groups.start_reaper();
        tokio::spawn(coordinator_loop(Arc::downgrade(&node), takeover));
        if node.config.peers.is_empty() {
            // A single node leads its controller already: register at once, and take the
            // consumer groups over before serving (joins would answer UNAVAILABLE until then).
            node.register_broker().await?;
            tokio::spawn(keep_feature_level_registered(Arc::downgrade(&node)));
            let patience = Instant::now() + Duration::from_millis(node.config.request_timeout_ms);
            while !node.groups.taken_over() && Instant::now() < patience {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            migrate_local_group_offsets(&node, &meta).await?;
        } else {
            let (weak, meta) = (Arc::downgrade(&node), meta.clone());
            tokio::spawn(async move {
                for _ in 0..600 {
                    let Some(node) = weak.upgrade() else { return };
                    if node.controller.is_current() {
                        match migrate_local_group_offsets(&node, &meta).await {
                            Ok(()) => return,
                            Err(e) => tracing::info!("cannot move group offsets yet: {e}"),
                        }
                    }
                    drop(node);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            tokio::spawn(register_loop(Arc::downgrade(&node)));
            tokio::spawn(crate::reassign::reassign_loop(Arc::downgrade(&node)));
            if node.config.leader_balance_interval_ms > 0 {
                tokio::spawn(balance_loop(
                    Arc::downgrade(&node),
                    Duration::from_millis(node.config.leader_balance_interval_ms),
                ));
            }
        }
        Ok(node)
    }

    /// The cluster's id: the one the controller holds (every broker of a cluster shows the
    /// same), or this broker's own before it knows one.
    pub fn cluster_id(&self) -> String {
        let state = self.controller_state();
        if state.cluster_id.is_empty() {
            self.local_cluster_id.clone()
        } else {
            state.cluster_id.clone()
        }
    }

    /// Records this broker's addresses in the controller.
    async fn register_broker(&self) -> Result<(), BrokerError> {
        let peer_address = self.config.peer_address();
        let client_address = self.config.client_address();
        // Always proposed (registering again changes nothing): this broker's copy of the
        // controller state may lag behind the log. A wiped broker added again found its old
        // registration in the part of the log it had applied, skipped the proposal, and then
        // applied its own removal: it never registered and never became ready.
        self.propose(ControllerCommand::RegisterBroker {
            node_id: self.node_id,
            peer_address,
            client_address,
            features: crate::raft::feature_level(),
            cluster_id: self.local_cluster_id.clone(),
            // (A broker of an older build would apply the mark as not draining.)
            draining: self.peers.draining()
                && self
                    .controller_state()
                    .behind(crate::raft::DRAINING_MARK_LEVEL)
                    .is_none(),
        })
        .await
        .map(|_| ())
    }

    /// Whether this broker, rejoining after it lost its data, has caught up everywhere: it
    /// knows the controller's state as of now and is registered there, every partition the
    /// controller gives it is open and caught up here (one that reconcile has not opened yet,
    /// or that is down, counts as not caught up: its group would vote at once after a restart
    /// once settled) and every group open here votes.
    fn settled_after_data_loss(&self) -> bool {
        // The votes first: the controller group's gate opens once it has applied what its
        // leader had committed, so the state read after it lists every partition this broker
        // held before it lost its data.
        if self.stopping.load(Ordering::SeqCst)
            || !self.controller.is_current()
            || !self.peers.votes_in_every_group()
        {
            return false;
        }
        let state = self.controller.state();
        if !state.brokers.contains_key(&self.node_id) {
            return false;
        }
        let slots: HashMap<(String, u32), Phase> = self
            .registry
            .slots()
            .into_iter()
            .map(|(key, slot)| (key, slot.phase()))
            .collect();
        let every_partition_open = state.topics.values().all(|topic| {
            topic
                .partitions
                .iter()
                .filter(|p| p.replicas.contains(&self.node_id))
                .all(|p| {
                    matches!(
                        slots.get(&(topic.name.clone(), p.partition)),
                        Some(Phase::Ready(_))
                    )
                })
        });
        every_partition_open && self.is_ready() && self.peers.votes_in_every_group()
    }

    /// Whether the node serves: every hosted partition is open and caught up.
    pub fn is_ready(&self) -> bool {
        !self.stopping.load(Ordering::SeqCst) && !self.is_closing() && self.not_ready().is_empty()
    }

    /// Begins the shutdown: streams (Subscribe, PublishStream and their peer-port forms) end
    /// with UNAVAILABLE, long-poll Fetches answer with what they have, and the node says it is
    /// not ready. Calls already taken still finish; [`Node::shutdown`] stops the groups after.
    pub fn begin_closing(&self) {
        self.closing.send_replace(true);
    }

    /// Whether the shutdown has begun ([`Node::begin_closing`]).
    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Resolves once the shutdown has begun (at once if it has). Owns what it needs, so a
    /// long call can hold it beside its other futures.
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }

    /// The UNAVAILABLE answer that ends a long call when the broker shuts down.
    pub(crate) fn closing_error(&self) -> BrokerError {
        BrokerError::Unavailable {
            reason: "the broker is shutting down; carry on through another broker (resume from \
                     your last offsets)"
                .into(),
            leader: None,
        }
    }

    /// The hosted partitions that do not serve yet, and why.
    pub fn not_ready(&self) -> Vec<NotReady> {
        let mut waiting = Vec::new();
        if !self.config.peers.is_empty() {
            if !self.controller.is_current() {
                waiting.push(NotReady {
                    partition: "controller".into(),
                    phase: "joining".into(),
                    reason: Some("no controller leader known, or its log not applied yet".into()),
                });
            } else if !self.peers.caught_up_in(crate::raft::CONTROLLER_GROUP) {
                waiting.push(NotReady {
                    partition: "controller".into(),
                    phase: "catching-up".into(),
                    reason: Some(
                        "this broker started with an empty data directory: its copy of the \
                         controller state has not caught up yet (no partition opens before)"
                            .into(),
                    ),
                });
            } else if !self.controller.state().brokers.contains_key(&self.node_id) {
                waiting.push(NotReady {
                    partition: "controller".into(),
                    phase: "registering".into(),
                    reason: Some("this broker is not registered in the controller yet".into()),
                });
            }
        }
        waiting.extend(self.registry.slots().into_iter().filter_map(
            |((topic, partition), slot)| {
                let phase = slot.phase();
                match &phase {
                    Phase::Ready(_) => None,
                    Phase::Down { reason } => Some(NotReady {
                        partition: format!("{topic}/{partition}"),
                        phase: phase.name().into(),
                        reason: Some(reason.clone()),
                    }),
                    _ => Some(NotReady {
                        partition: format!("{topic}/{partition}"),
                        phase: phase.name().into(),
                        reason: None,
                    }),
                }
            },
        ));
        waiting
    }

    /// Seconds since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The controller state (topics).
    pub fn controller_state(&self) -> Arc<ControllerState> {
        self.controller.state()
    }

    /// Why the cluster refused this broker's join, once it has (see
    /// [`ControllerGroup::join_refused`]).
    pub fn join_refused(&self) -> watch::Receiver<Option<String>> {
        self.controller.join_refused()
    }

    /// Watches the controller state.
    pub fn controller_watch(&self) -> watch::Receiver<Arc<ControllerState>> {
        self.controller.watch()
    }

    /// The controller's leader.
    pub fn controller_leader(&self) -> Option<NodeId> {
        self.controller.leader()
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Result<Arc<TopicMeta>, BrokerError> {
        self.topic_named("topic", name)
    }

    /// The topic a request names in `field`: INVALID_ARGUMENT (naming the field) when the name
    /// cannot be a topic's, NOT_FOUND when there is no such topic.
    pub fn topic_named(&self, field: &str, name: &str) -> Result<Arc<TopicMeta>, BrokerError> {
        if let Err(violation) = crate::topic::validate_name(name) {
            return Err(BrokerError::invalid(field, violation.description));
        }
        // Without the controller's leader as a hint: a call about a topic's partition would
        // take it for the partition's leader (the producer goes straight to the node a hint
        // names).
        self.metadata_current().map_err(|e| match e {
            BrokerError::Unavailable { reason, .. } => BrokerError::Unavailable {
                reason,
                leader: None,
            },
            other => other,
        })?;
        self.controller_state()
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::TopicNotFound(name.into()))
    }

    /// UNAVAILABLE while this broker's copy of the cluster metadata may be behind (a clustered
    /// broker that has just started or joined): it must not answer "not found" for a topic the
    /// cluster has.
    pub fn metadata_current(&self) -> Result<(), BrokerError> {
        if self.config.peers.is_empty()
            || (self.controller.is_current()
                && self.controller.state().brokers.contains_key(&self.node_id))
        {
            return Ok(());
        }
        Err(BrokerError::Unavailable {
            reason: "this broker's copy of the cluster metadata is not current yet".into(),
            leader: self.controller.leader(),
        })
    }

    /// A hosted partition that serves; UNAVAILABLE (with the reason) while it opens, replays or
    /// is down.
    pub fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>, BrokerError> {
        let meta = self.topic(topic)?;
        if partition >= meta.config.partitions {
            return Err(BrokerError::PartitionNotFound {
                topic: topic.into(),
                partition,
            });
        }
        match self.registry.slot(topic, partition) {
            Some(slot) if slot.topic_id() == meta.topic_id => slot.serving(),
            _ => Err(BrokerError::Unavailable {
                reason: format!("partition {topic}/{partition} is not open yet"),
                leader: None,
            }),
        }
    }

    /// Where a publish to `topic`/`partition` goes: here when this broker leads the partition
    /// (or nobody is known to), else the leader's peer address. A partition not hosted here
    /// goes to its first replica (its preferred leader), which forwards no further.
    pub fn publish_route(&self, meta: &TopicMeta, partition: u32) -> Result<Route, BrokerError> {
        let topic = meta.name.as_str();
        let hosted_here = meta
            .partitions
            .get(partition as usize)
            .is_some_and(|p| p.replicas.contains(&self.node_id));
        let leader = if hosted_here {
            let local = self.partition(topic, partition)?;
            match local.group().leader() {
                Some(leader) if leader != self.node_id => {
                    if let Some(silence) = local.group().leader_silent() {
                        // Forwarding to a leader cut off from this broker would only wait out
                        // the caller's deadline: say at once that it is unavailable.
                        return Err(BrokerError::Unavailable {
                            reason: format!(
                                "node {} has not heard from node {leader}, the leader of \
                                 {topic}/{partition}, for {} ms; an election is likely under way",
                                self.node_id,
                                silence.as_millis()
                            ),
                            leader: None,
                        });
                    }
                    leader
                }
                _ => return Ok(Route::Local(local)),
            }
        } else {
            // No replica here: the one the answers to earlier forwarded calls point to.
            match meta.partitions.get(partition as usize).and_then(|p| {
                self.route_hints.pick(
                    &meta.topic_id,
                    partition,
                    &p.replicas,
                    crate::grpc::route_hints::Purpose::Write,
                )
            }) {
                Some(replica) => replica,
                None => {
                    return Err(BrokerError::PartitionNotFound {
                        topic: topic.into(),
                        partition,
                    });
                }
            }
        };
        match self.controller.state().brokers.get(&leader) {
            Some(broker) => Ok(Route::Forward {
                leader,
                peer_address: broker.peer_address.clone(),
            }),
            None => Err(BrokerError::Unavailable {
                reason: format!(
                    "the leader of {topic}/{partition} (node {leader}) is not known yet"
                ),
                leader: Some(leader),
            }),
        }
    }

    /// How many brokers the configuration names (its peers; 1 for a single node).
    pub fn configured_cluster_size(&self) -> u32 {
        self.config
            .peer_list()
            .map_or(1, |peers| peers.len().max(1) as u32)
    }

    /// Where consumer groups are coordinated: here (this broker leads the controller) or at the
    /// controller's leader, with its peer address.
    pub fn coordinator(&self) -> Result<Coordinated, BrokerError> {
        match self.controller.leader() {
            Some(leader) if leader == self.node_id => Ok(Coordinated::Here),
            Some(leader) => match self.controller.state().brokers.get(&leader) {
                Some(broker) => Ok(Coordinated::There {
                    node_id: leader,
                    peer_address: broker.peer_address.clone(),
                }),
                None => Err(BrokerError::Unavailable {
                    reason: format!("the group coordinator (node {leader}) is not registered yet"),
                    leader: Some(leader),
                }),
            },
            None => Err(BrokerError::Unavailable {
                reason: "no group coordinator: the controller has no leader".into(),
                leader: None,
            }),
        }
    }

    /// The index of the last controller entry applied here.
    pub fn controller_applied_index(&self) -> u64 {
        self.controller.applied_index()
    }

    /// Waits until this broker's copy of the controller state holds everything committed before
    /// the call (a no-op on a single node).
    pub async fn sync_controller(&self) -> Result<(), BrokerError> {
        if self.config.peers.is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        self.controller.sync_with_leader(timeout).await
    }

    /// Waits (up to `timeout`) until this broker applied the controller log through `index`.
    pub async fn wait_controller_applied(&self, index: u64, timeout: Duration) -> bool {
        self.controller.wait_applied(index, timeout).await
    }

    /// Moves a partition's leadership from this broker (which must lead it) to `to`, or to the
    /// most caught-up other replica. Returns the new leader.
    pub async fn transfer_leadership(
        &self,
        topic: &str,
        partition: u32,
        to: Option<NodeId>,
    ) -> Result<NodeId, BrokerError> {
        let meta = self.topic(topic)?;
        let placed = meta.partitions.get(partition as usize).ok_or_else(|| {
            BrokerError::PartitionNotFound {
                topic: topic.into(),
                partition,
            }
        })?;
        if !placed.replicas.contains(&self.node_id) {
            // Asked of a broker holding no replica: say so, and which broker most likely leads
            // (learned from earlier forwarded calls, else the first replica), as a replica
            // that does not lead names its leader.
            let leader = self.route_hints.pick(
                &meta.topic_id,
                partition,
                &placed.replicas,
                crate::grpc::route_hints::Purpose::Write,
            );
            return Err(BrokerError::Unavailable {
                reason: format!(
                    "node {} holds no replica of {topic}/{partition} (its replicas are on nodes \
                     {:?}); send the transfer to its leader{}",
                    self.node_id,
                    placed.replicas,
                    leader.map_or(String::new(), |l| format!(", most likely node {l}"))
                ),
                leader,
            });
        }
        let hosted = self.partition(topic, partition)?;
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let leader = hosted
            .group()
            .transfer_leadership(to, &self.leadership_avoided(), timeout)
            .await?;
        tracing::info!(topic, partition, leader, "moved the partition's leadership");
        Ok(leader)
    }

    /// Makes this broker (node `node_id`: the caller names the broker it means) vote in every
    /// group at once, although it lost its data and has not caught up everywhere (see
    /// `raft::Recovery`); clears its durable mark. Unsafe, so `accept_data_loss` must say the
    /// caller knows. Returns the voting mode it had.
    pub fn end_recovery(
        &self,
        node_id: NodeId,
        accept_data_loss: bool,
    ) -> Result<&'static str, BrokerError> {
        use crate::raft::Recovery;
        if node_id != self.node_id {
            return Err(BrokerError::invalid(
                "node_id",
                format!(
                    "this is node {}, not node {node_id}: ask the broker you mean",
                    self.node_id
                ),
            ));
        }
        if !accept_data_loss {
            return Err(BrokerError::invalid(
                "accept_data_loss",
                "must be true: a leader elected with this broker's vote before it has caught up \
                 may lack records acknowledged before it lost its data",
            ));
        }
        let was = match self.peers.recovery() {
            Recovery::Normal => "normal",
            // (Not joined yet: maybe because the controller has no quorum without this vote.)
            Recovery::Undecided => "undecided",
            Recovery::Rejoining => "rejoining",
        };
        if was != "normal" {
            tracing::warn!(
                was,
                "recovery ended by an operator: this broker votes in every group although it \
                 has not caught up everywhere after losing its data"
            );
            self.peers.end_recovery_by_operator();
        }
        // (The mode's hook clears the mark too, but only logs a failure.)
        self.meta.clear_recovering().map_err(|e| {
            BrokerError::Internal(format!(
                "this broker votes now, but its recovering mark could not be cleared (after a \
                 restart it withholds its votes again): {e}"
            ))
        })?;
        Ok(was)
    }

    /// Moves every partition leadership this broker holds to other replicas, side by side.
    /// Returns the partitions moved and those kept (with why), all within `budget` (the
    /// caller's deadline, a preStop hook's say): at most a quarter of it to mark this broker as
    /// draining; when this broker leads the controller, a quarter (at least two leases) kept
    /// for the controller's leadership, moved last; the partitions in the rest. No transfer
    /// starts with less time left than one takes. Before, each step had a whole
    /// `request_timeout_ms`, so a drain could run three times that, past the hook's deadline,
    /// and the controller's hand-off (the last step) was what it cut.
    pub async fn drain(&self, budget: Duration) -> (Vec<String>, Vec<String>) {
        let started = tokio::time::Instant::now();
        let end = started + budget;
        // From now on it refuses to be a transfer's target, also of transfers other brokers
        // chose before they saw its draining mark.
        self.peers.set_draining(true);
        let lease = self.transfer_lease();
        let reserve =
            if self.config.peers.is_empty() || self.controller.leader() != Some(self.node_id) {
                Duration::ZERO
            } else {
                // (The partitions keep at least half.)
                (budget / 4).max(lease * 2).min(budget / 2)
            };
        let timeout = budget.saturating_sub(reserve);
        // Unmarked, the other brokers' leader balance hands this broker its preferred
        // leaderships back within moments: the caller (a preStop hook) is told, in `kept`.
        // Before, the failure was only logged and the drain answered as if all went well.
        let mut unmarked = None;
        let mark = async {
            tokio::time::timeout(
                budget / 4,
                self.propose(ControllerCommand::SetDraining {
                    node_id: self.node_id,
                    draining: true,
                }),
            )
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::Timeout(
                    "the controller did not take the mark in time".into(),
                ))
            })
        };
        if !self.config.peers.is_empty()
            && let Err(e) = mark.await
        {
            tracing::warn!("cannot mark this broker as draining: {e}");
            unmarked = Some(format!(
                "draining mark: this broker could not be marked as draining ({e}); leader \
                 balancing may hand leaderships back to it"
            ));
        }
        // Passes until this broker leads no partition it has not given up on, all within one
        // `timeout`: a partition that elected this broker while a pass ran (its election began
        // before the drain), or that a leader balance which had not yet seen this broker
        // draining handed back, is moved too. One outcome per partition, the last.
        let deadline = started + timeout;
        let avoided = &self.leadership_avoided();
        let mut outcomes: BTreeMap<String, Result<NodeId, BrokerError>> = BTreeMap::new();
        for pass in 0..DRAIN_PASSES_MAX {
            if pass > 0 {
                tokio::time::sleep(DRAIN_PASS_PAUSE).await;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let leading: Vec<Arc<Partition>> = self
                .partitions()
                .into_iter()
                .filter(|p| p.group().is_leader())
                .filter(|p| {
                    let name = format!("{}/{}", p.topic, p.partition);
                    !matches!(outcomes.get(&name), Some(Err(_)))
                })
                .collect();
            if leading.is_empty() || left.is_zero() {
                break;
            }
            let results = futures::future::join_all(leading.iter().map(|p| async move {
                let name = format!("{}/{}", p.topic, p.partition);
                let group = p.group();
                let me = self.node_id;
                let outcome = move_away(
                    left,
                    lease,
                    || {
                        // (One reading of the metrics for both.)
                        let leader = group.leader();
                        (leader == Some(me), leader)
                    },
                    |within| group.transfer_leadership(None, avoided, within),
                )
                .await;
                (name, outcome)
            }))
            .await;
            outcomes.extend(results);
        }
        // Led here still, with no failure to tell (the time ran out before a pass came to it,
        // or it came back after a pass moved it): kept, said so. Before, a drain whose time
        // ran out left them out of its answer, and a caller saw nothing kept.
        for p in self
            .partitions()
            .into_iter()
            .filter(|p| p.group().is_leader())
        {
            let name = format!("{}/{}", p.topic, p.partition);
            if !matches!(outcomes.get(&name), Some(Err(_))) {
                outcomes.insert(
                    name,
                    Err(BrokerError::Timeout(format!(
                        "still led here: the drain's {} ms ran out before it moved",
                        budget.as_millis()
                    ))),
                );
            }
        }
        let (mut moved, mut kept) = (Vec::new(), Vec::new());
        for (name, outcome) in outcomes {
            match outcome {
                Ok(leader) => moved.push(format!("{name} -> node {leader}")),
                Err(e) => kept.push(format!("{name}: {e}")),
            }
        }
        // The controller last (it coordinates the consumer groups: their members rejoin the
        // new leader once, instead of when this broker stops).
        if !self.config.peers.is_empty() && self.controller.leader() == Some(self.node_id) {
            let controller = &self.controller;
            let me = self.node_id;
            let outcome = move_away(
                end.saturating_duration_since(tokio::time::Instant::now()),
                lease,
                || {
                    let leader = controller.leader();
                    (leader == Some(me), leader)
                },
                |within| controller.transfer_leadership(None, avoided, within),
            )
            .await;
            match outcome {
                Ok(leader) => moved.push(format!("controller -> node {leader}")),
                Err(e) => kept.push(format!("controller: {e}")),
            }
        }
        kept.extend(unmarked);
        tracing::info!(
            moved = moved.len(),
            kept = kept.len(),
            "drained partition leaderships"
        );
        (moved, kept)
    }

    /// Clears this broker's draining mark (which [`Node::drain`] sets and a restart clears), so
    /// it gets new replicas and its preferred leaderships back. Returns whether it was marked.
    pub async fn undrain(&self) -> Result<bool, BrokerError> {
        let was = self
            .controller_state()
            .brokers
            .get(&self.node_id)
            .is_some_and(|b| b.draining);
        // The local mark first: a registration meanwhile (at a build upgrade) must not carry
        // the draining mark back after this.
        self.peers.set_draining(false);
        if !self.config.peers.is_empty() {
            self.propose(ControllerCommand::SetDraining {
                node_id: self.node_id,
                draining: false,
            })
            .await?;
        }
        Ok(was)
    }

    /// One pass of the preferred-leader balance: each partition this broker leads whose first
    /// replica (its preferred leader) is another broker, registered, not draining and caught up
    /// gets its leadership moved back there, one partition at a time. So leaders stay spread
    /// after elections and come back to a broker that returns.
    pub async fn balance_leaders(&self) -> usize {
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let mut moved = 0;
        for partition in self.partitions() {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            // Read for each partition: a pass takes seconds, and a broker may begin draining
            // meanwhile (a leadership its drain just moved away is not handed back).
            let state = self.controller.state();
            let Some(preferred) = state
                .topics
                .get(&partition.topic)
                .and_then(|t| t.partitions.get(partition.partition as usize))
                // A moving partition's leadership is the move's business.
                .filter(|p| p.target.is_none())
                .and_then(|p| p.replicas.first().copied())
            else {
                continue;
            };
            let group = partition.group();
            let eligible = preferred != self.node_id
                && state
                    .brokers
                    .get(&preferred)
                    .is_some_and(|b| !b.draining && !b.removing)
                && group.is_leader()
                && group.has_every_entry(preferred);
            if !eligible {
                continue;
            }
            match group
                .transfer_leadership(Some(preferred), &BTreeSet::new(), timeout)
                .await
            {
                Ok(leader) => {
                    moved += 1;
                    tracing::info!(topic = %partition.topic, partition = partition.partition, leader, "moved leadership back to the preferred replica");
                }
                Err(e) => {
                    tracing::info!(topic = %partition.topic, partition = partition.partition, "leadership stays here for now: {e}");
                }
            }
        }
        moved
    }

    /// The voters of the controller group.
    pub fn controller_voters(&self) -> Vec<NodeId> {
        self.controller.voters()
    }

    /// The controller group's members that never registered as brokers, with their peer
    /// addresses (see [`crate::raft::ControllerGroup::unregistered_members`]).
    pub fn unregistered_controller_members(
        &self,
        state: &ControllerState,
    ) -> Vec<(NodeId, String)> {
        self.controller.unregistered_members(state)
    }

    /// Whether `node` is a member of the controller group (a voter or a learner), as this
    /// broker's copy of the group's membership says.
    pub fn is_controller_member(&self, node: NodeId) -> bool {
        self.controller.is_member(node)
    }

    /// Takes `node`, a controller member that never registered, out of the controller group.
    pub(crate) async fn remove_unregistered_member(
        &self,
        node: NodeId,
    ) -> Result<NodeId, BrokerError> {
        self.controller
            .remove_unregistered_member(node, Duration::from_millis(self.config.request_timeout_ms))
            .await
    }

    /// Whether this broker, leading the controller, has heard from `node` (it has replicated the
    /// controller log to it). False when this broker does not lead the controller.
    pub fn reaches(&self, node: NodeId) -> bool {
        self.controller.reaches(node)
    }

    /// Every hosted partition that serves, in (topic, partition) order.
    pub fn partitions(&self) -> Vec<Arc<Partition>> {
        self.registry
            .slots()
            .into_iter()
            .filter_map(|(_, slot)| match slot.phase() {
                Phase::Ready(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    /// Every hosted partition with its phase, in (topic, partition) order.
    pub fn hosted(&self) -> Vec<((String, u32), Phase)> {
        self.registry
            .slots()
            .into_iter()
            .map(|(key, slot)| (key, slot.phase()))
            .collect()
    }

    /// Proposes a controller command (through the controller's leader) and waits until it is
    /// applied there.
    pub(crate) async fn propose(
        &self,
        command: ControllerCommand,
    ) -> Result<ControllerResponse, BrokerError> {
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        self.controller.propose(command, timeout).await
    }

    /// Whether the node is shutting down.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Moves the controller's leadership from this broker to another voter.
    pub(crate) async fn transfer_controller(
        &self,
        timeout: Duration,
    ) -> Result<NodeId, BrokerError> {
        self.controller
            .transfer_leadership(None, &self.leadership_avoided(), timeout)
            .await
    }

    /// The least time a leadership transfer takes: the followers' leases (a maximum election
    /// timeout) run out before the target stands, and its election follows.
    fn transfer_lease(&self) -> Duration {
        let election = Duration::from_millis(self.config.raft_election_timeout_ms);
        election + election / 4 + Duration::from_millis(500)
    }

    /// Brokers a leadership is not handed to when another replica can take it: those draining
    /// (about to stop) or being removed, as this broker's copy of the controller's state says.
    fn leadership_avoided(&self) -> BTreeSet<NodeId> {
        self.controller_state()
            .brokers
            .iter()
            .filter(|(_, b)| b.draining || b.removing)
            .map(|(id, _)| *id)
            .collect()
    }

    /// On the controller's leader: takes `node` out of the controller group.
    pub(crate) async fn remove_controller_member(&self, node: NodeId) -> Result<(), BrokerError> {
        self.controller.remove_member(node).await
    }

    /// A proposed placement for partitions `first .. end`, from this broker's view of the
    /// brokers: preferred leaders on the brokers up and serving, spread by load (see
    /// [`ControllerState::propose_placement`]), and whether it is to stand as proposed (every
    /// broker at [`crate::raft::PLACEMENT_LEVEL`]; otherwise the controller places the replicas
    /// again when it applies the command, by rotation over the brokers registered at that
    /// point of its log).
    async fn place(
        &self,
        first: u32,
        end: u32,
        replication_factor: u32,
    ) -> (Vec<Vec<NodeId>>, bool) {
        let state = self.controller.state();
        let as_proposed =
            !state.brokers.is_empty() && state.behind(crate::raft::PLACEMENT_LEVEL).is_none();
        if as_proposed {
            let usable = self.usable_brokers(&state).await;
            let placed = state.propose_placement(first, end, replication_factor, &usable);
            if !placed.is_empty() {
                return (placed, true);
            }
        }
        let mut brokers: Vec<NodeId> = state.brokers.keys().copied().collect();
        if brokers.is_empty() {
            brokers.push(self.node_id);
        }
        let rf = (replication_factor.max(1) as usize).min(brokers.len());
        let placed = (first..end)
            .map(|p| {
                (0..rf)
                    .map(|k| brokers[(p as usize + k) % brokers.len()])
                    .collect()
            })
            .collect();
        (placed, false)
    }

    /// Refuses (LIMIT_REACHED) replicas `placed` that would give a broker more than this
    /// broker's `partition_replicas_max` partition replicas. Counted from this broker's copy of
    /// the metadata (a partition that moves counts on its old and its new replicas); the
    /// controller checks again when it applies the placement, so two topics created at the
    /// same moment cannot both pass. Moves, rebalances and removals check the same limit when
    /// they plan (`reassign.rs`).
    fn room_for_replicas(&self, placed: &[Vec<NodeId>]) -> Result<(), BrokerError> {
        let max = self.config.partition_replicas_max as usize;
        let mut adding: BTreeMap<NodeId, usize> = BTreeMap::new();
        for &node in placed.iter().flatten() {
            *adding.entry(node).or_default() += 1;
        }
        let state = self.controller.state();
        for (&node, &more) in &adding {
            let now = state.replicas_on(node);
            if now + more > max {
                return Err(BrokerError::LimitReached {
                    what: format!(
                        "broker {node} holds {now} partition replicas and cannot take {more} more"
                    ),
                    key: "partition_replicas_max",
                    max: max as u64,
                });
            }
        }
        Ok(())
    }

    fn controller_result(response: ControllerResponse) -> Result<TopicMeta, BrokerError> {
        match response {
            ControllerResponse::Topic(t) => Ok(t),
            ControllerResponse::AlreadyExists(name) => Err(BrokerError::TopicExists(name)),
            ControllerResponse::NotFound(name) => Err(BrokerError::TopicNotFound(name)),
            ControllerResponse::Invalid(reason) => Err(BrokerError::invalid("config", reason)),
            ControllerResponse::Changed(name) => Err(BrokerError::Conflict(format!(
                "topic {name:?} changed while this change was made: try again"
            ))),
            ControllerResponse::LimitReached { what, max } => Err(BrokerError::LimitReached {
                what,
                key: "partition_replicas_max",
                max,
            }),
            ControllerResponse::Deleted { .. }
            | ControllerResponse::Registered
            | ControllerResponse::CoordinatorEpoch(_)
            | ControllerResponse::Acl { .. }
            | ControllerResponse::Committed
            | ControllerResponse::GroupDeleted { .. } => Err(BrokerError::Internal(format!(
                "unexpected controller response {response:?}"
            ))),
        }
    }

    /// What is wrong with a topic's `config`: its own limits, a record size this broker's gRPC
    /// listener would refuse (`grpc_message_bytes_max`), so no publish of it could arrive, and
    /// a replication factor above [`crate::topic::REPLICATION_FACTOR_MAX`]. Only a change
    /// checks the last two: a topic made by an older build or through a broker with a larger
    /// limit keeps its values through other changes.
    fn topic_config_violations(
        &self,
        config: &TopicConfig,
        current: Option<&TopicConfig>,
    ) -> Vec<crate::topic::FieldViolation> {
        crate::topic::config_violations(config, current, self.config.grpc_message_bytes_max)
    }

    /// Creates a topic and waits until its partitions serve here.
    pub async fn create_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<TopicMeta, BrokerError> {
        crate::topic::validate_name(name).map_err(|v| BrokerError::InvalidArgument(vec![v]))?;
        let violations = self.topic_config_violations(&config, None);
        if !violations.is_empty() {
            return Err(BrokerError::InvalidArgument(violations));
        }
        let (replicas, as_proposed) = self
            .place(0, config.partitions, config.replication_factor)
            .await;
        if self.room_for_replicas(&replicas).is_err() {
            // Near the limit: with the metadata as of now (this broker's copy may be behind a
            // deletion), a topic that exists is ALREADY_EXISTS (what "create unless it exists"
            // callers look for), whatever room is left.
            self.sync_controller().await?;
            if self.controller.state().topics.contains_key(name) {
                return Err(BrokerError::TopicExists(name.into()));
            }
            self.room_for_replicas(&replicas)?;
        }
        let command = ControllerCommand::CreateTopic {
            name: name.into(),
            topic_id: uuid::Uuid::new_v4().to_string(),
            config,
            created_at_ms: now_ms(),
            replicas,
            as_proposed,
            // Checked again when applied: two creations checked here at once against the same
            // metadata cannot both pass.
            replicas_max: Some(u64::from(self.config.partition_replicas_max)),
        };
        let topic = Self::controller_result(self.propose(command).await?)?;
        self.wait_for_partitions(&topic).await?;
        Ok(topic)
    }

    /// Changes a topic's configuration to what `change` makes of the current one. The change is
    /// committed only over the topic it was made from: when another change came between (from
    /// this broker or another), it is made again from the topic as it now is.
    pub async fn update_topic(
        &self,
        name: &str,
        change: impl Fn(&TopicConfig) -> Result<TopicConfig, BrokerError>,
    ) -> Result<TopicMeta, BrokerError> {
        const ATTEMPTS: usize = 16;
        for _ in 0..ATTEMPTS {
            // What the controller has committed so far, so the change is made from it.
            self.sync_controller().await?;
            let current = self.topic_named("name", name)?;
            let config = change(&current.config)?;
            let violations = self.topic_config_violations(&config, Some(&current.config));
            if !violations.is_empty() {
                return Err(BrokerError::InvalidArgument(violations));
            }
            if config.replication_factor != current.config.replication_factor {
                return Err(BrokerError::invalid(
                    "config.replication_factor",
                    "cannot be changed",
                ));
            }
            if config.partitions < current.config.partitions {
                return Err(BrokerError::invalid("config.partitions", "can only grow"));
            }
            let (new_replicas, as_proposed) = self
                .place(
                    current.config.partitions,
                    config.partitions,
                    config.replication_factor,
                )
                .await;
            self.room_for_replicas(&new_replicas)?;
            let command = ControllerCommand::UpdateTopic {
                name: name.into(),
                config,
                new_replicas,
                as_proposed,
                base: Some(crate::raft::TopicBase {
                    topic_id: current.topic_id.clone(),
                    config: current.config.clone(),
                }),
                replicas_max: Some(u64::from(self.config.partition_replicas_max)),
            };
            match self.propose(command).await? {
                ControllerResponse::Changed(_) => continue,
                response => {
                    let topic = Self::controller_result(response)?;
                    self.wait_for_partitions(&topic).await?;
                    return Ok(topic);
                }
            }
        }
        Err(BrokerError::Conflict(format!(
            "topic {name:?} changed {ATTEMPTS} times while this change was made: try again"
        )))
    }

    /// Deletes a topic and its data.
    /// Whether `identity` may do `operation` on `resource` (the config's ACL rules and the
    /// controller's); PERMISSION_DENIED / UNAUTHENTICATED with an audit line when not.
    pub fn authorize(
        &self,
        identity: &crate::auth::Identity,
        operation: crate::acl::Operation,
        resource: crate::acl::Resource<'_>,
    ) -> Result<(), BrokerError> {
        if !self.acl.enabled() {
            return Ok(());
        }
        let state = self.controller_state();
        self.acl.check(identity, operation, resource, &state.acls)
    }

    /// Whether ACL checks are on.
    pub fn acl_enabled(&self) -> bool {
        self.acl.enabled()
    }

    /// [`Node::authorize`] as a yes or no (for filtering lists), without an audit line.
    pub fn allowed(
        &self,
        identity: &crate::auth::Identity,
        operation: crate::acl::Operation,
        resource: crate::acl::Resource<'_>,
    ) -> bool {
        !self.acl.enabled()
            || self
                .acl
                .allows(identity, operation, resource, &self.controller_state().acls)
    }

    /// The ACL rules in force: whether checks are on, the config file's rules and the
    /// controller's.
    pub fn acl_rules(&self) -> (bool, Vec<crate::acl::AclRule>, Vec<crate::acl::AclRule>) {
        (
            self.acl.enabled(),
            self.acl.config_rules().to_vec(),
            self.controller_state().acls.clone(),
        )
    }

    /// Refuses `what` (CONFLICT) while a broker of the cluster may run a build below feature
    /// `level` (read from the controller state as of now, not this broker's possibly older
    /// copy): it would apply the command differently, and the controller's replicas would
    /// disagree.
    pub async fn require_feature(&self, level: u32, what: &str) -> Result<(), BrokerError> {
        self.sync_controller().await?;
        require_feature(&self.controller_state(), level, what)
    }

    /// Adds (`add`) or removes an ACL rule in the controller; whether it was there before.
    pub async fn change_acl(
        &self,
        rule: crate::acl::AclRule,
        add: bool,
        caller: &crate::auth::Identity,
    ) -> Result<bool, BrokerError> {
        rule.validate()
            .map_err(|reason| BrokerError::invalid("rule", reason))?;
        // A deny rule that took ACL changes away from the caller could only be removed by
        // turning ACLs off on every broker.
        if add
            && !caller.broker
            && rule.permission == crate::acl::Permission::Deny
            && rule.allows(
                &caller.principal,
                crate::acl::Operation::Admin,
                crate::acl::Resource::Cluster,
            )
        {
            return Err(BrokerError::invalid(
                "rule",
                format!(
                    "this deny rule would refuse {} admin on cluster, and with it the removal of \
                     the rule: name the identities or resources to deny more narrowly",
                    caller.principal
                ),
            ));
        }
        if add && rule.permission == crate::acl::Permission::Deny {
            self.require_feature(1, "deny rules").await?;
        }
        // Checked against this broker's copy of the rules (two adds checked at once may pass
        // it by one each). Before, rules were stored without limit.
        let max = self.config.acl_rules_max;
        if add && self.controller_state().acls.len() >= max as usize {
            let mut normalized = rule.clone();
            normalized.operations.sort_unstable();
            normalized.operations.dedup();
            if !self.controller_state().acls.contains(&normalized) {
                return Err(BrokerError::LimitReached {
                    what: "a new ACL rule".into(),
                    key: "acl_rules_max",
                    max: u64::from(max),
                });
            }
        }
        let command = if add {
            ControllerCommand::AddAcl(rule)
        } else {
            ControllerCommand::RemoveAcl(rule)
        };
        match self.propose(command).await? {
            ControllerResponse::Acl { existed } => Ok(existed),
            ControllerResponse::Invalid(reason) => Err(BrokerError::invalid("rule", reason)),
            other => Err(BrokerError::Internal(format!(
                "unexpected ACL response {other:?}"
            ))),
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<String, BrokerError> {
        self.topic_named("name", name)?;
        match self
            .propose(ControllerCommand::DeleteTopic { name: name.into() })
            .await?
        {
            ControllerResponse::Deleted { topic_id } => Ok(topic_id),
            ControllerResponse::NotFound(name) => Err(BrokerError::TopicNotFound(name)),
            other => Err(BrokerError::Internal(format!(
                "unexpected delete response {other:?}"
            ))),
        }
    }

    async fn wait_for_partitions(&self, topic: &TopicMeta) -> Result<(), BrokerError> {
        let deadline = Instant::now() + Duration::from_millis(self.config.request_timeout_ms);
        let mut changes = self.registry.watch_changes();
        loop {
            changes.borrow_and_update();
            let serving = topic
                .partitions
                .iter()
                .filter(|p| p.replicas.contains(&self.node_id))
                .all(|p| self.partition(&topic.name, p.partition).is_ok());
            if serving {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, changes.changed()).await.is_err() {
                return Err(BrokerError::Timeout(format!(
                    "partitions of {} did not open in time",
                    topic.name
                )));
            }
        }
    }

    /// Makes the hosted partitions match the controller state.
    /// Returns false when it did nothing yet: a broker that started with an empty data
    /// directory in a cluster opens no partition until its copy of the controller state has
    /// caught up with what the controller had committed when it came back (an earlier state
    /// may give it a partition as the only replica that has more replicas now, which it would
    /// start as a group of its own), even after an operator ended its recovery.
    async fn reconcile(&self) -> bool {
        if !self.peers.caught_up_in(crate::raft::CONTROLLER_GROUP) {
            return false;
        }
        // (The state as of now, read after the gate's check.)
        let state = &*self.controller.state();
        self.peers.set_sole_replicas(
            state
                .topics
                .values()
                .flat_map(|topic| topic.partitions.iter())
                .filter(|p| p.replicas == [self.node_id])
                .map(|p| p.group_id)
                .collect(),
        );
        let wanted: Vec<PartitionSpec> = state
            .topics
            .values()
            .flat_map(|topic| {
                topic
                    .partitions
                    .iter()
                    .filter(|p| p.replicas.contains(&self.node_id))
                    .filter_map(|p| {
                        // Every replica's address must be known (each broker registers itself
                        // once it has joined); until then the partition waits.
                        let members: Option<Vec<(NodeId, String)>> = p
                            .replicas
                            .iter()
                            .map(|id| {
                                let address = match state.brokers.get(id) {
                                    Some(b) => Some(b.peer_address.clone()),
                                    None if *id == self.node_id => Some(self.config.peer_address()),
                                    None => None,
                                };
                                address.map(|a| (*id, a))
                            })
                            .collect();
                        Some(PartitionSpec {
                            topic: topic.name.clone(),
                            topic_id: topic.topic_id.clone(),
                            partition: p.partition,
                            group_id: p.group_id,
                            config: topic.config.clone(),
                            members: members?,
                        })
                    })
            })
            .collect();
        self.registry.reconcile(wanted).await;
        // The state as of now: a topic created and joined during the reconcile above is in it
        // (a group of a topic missing from it leaves memory).
        let state = self.controller.state();
        self.groups.topic_partitions(
            &state
                .topics
                .values()
                .map(|t| (t.topic_id.as_str(), t.config.partitions))
                .collect(),
        );
        true
    }

    /// Whether the sweep of partitions this broker no longer hosts may run: once its
    /// controller state holds what the controller had committed when this broker came back.
    /// Its own controller log is not enough: a log that lost entries (a failing disk, a
    /// restore) replays to an older state, in which topics created since are unknown. So a
    /// broker with peers waits for the commit index a controller leader sent it (`target`
    /// keeps the first one seen) and applies through it, or leads the controller; a single
    /// node has only its own log.
    fn sweep_due(&self, target: &mut Option<u64>) -> bool {
        if !self.controller.is_current() {
            return false;
        }
        if self.config.peers.is_empty() {
            return true;
        }
        if self.controller.leader() == Some(self.node_id) {
            // A leader holds every committed entry (it hears no leader's commit index), and
            // has applied them all once it applied an entry of its own term.
            return self
                .controller
                .state()
                .last_applied
                .is_some_and(|l| l.leader_id.term == self.controller.term());
        }
        if target.is_none() {
            *target = self.peers.controller_commit_heard();
        }
        target.is_some_and(|t| self.controller.applied_index() >= t)
    }

    /// Removes what this broker keeps of partitions it no longer hosts and holds no slot for:
    /// their data directories and Raft state, left by a topic deleted or a replica moved away
    /// while it was down (a reconcile removes only partitions open here when the change
    /// arrives). Called between reconciles, once [`Node::sweep_due`]: every partition
    /// directory was made for a state no newer than this one, so a partition whose topic id it
    /// lacks was deleted, and one whose replicas (and replicas being added) leave this broker
    /// out was moved away. A partition it cannot place (a topic id it knows, a partition
    /// number past the topic's) stays, and so does its Raft state. Nothing is removed when
    /// Raft state is stored here for a group the state has not numbered yet (a state older
    /// than what this broker hosted after all).
    async fn remove_unhosted(&self) {
        let state = self.controller.state();
        let stored = match self.meta.raft_groups() {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!("cannot list the Raft groups stored here: {e}");
                return;
            }
        };
        if let Some(unknown) = stored
            .iter()
            .find(|g| **g != crate::raft::CONTROLLER_GROUP && **g >= state.next_group_id)
        {
            tracing::warn!(
                group_id = unknown,
                next_group_id = state.next_group_id,
                "Raft state is stored here for a group the controller state has not numbered yet: the state is older than this broker's data, and nothing it does not list is removed"
            );
            return;
        }
        let me = self.node_id;
        // Whether the state leaves this partition here (hosted, or not placeable): one answer
        // for its directory and its Raft state.
        let keeps = move |p: Option<&crate::raft::PartitionMeta>| {
            p.is_none_or(|p| p.replicas.contains(&me) || p.adding.contains(&me))
        };
        let known = state.clone();
        let removed = self
            .registry
            .remove_unheld(move |topic_id, partition| {
                known
                    .topics
                    .values()
                    .find(|t| t.topic_id == topic_id)
                    .is_some_and(|t| keeps(t.partitions.get(partition as usize)))
            })
            .await;
        for (topic_id, partition) in &removed {
            tracing::info!(
                topic_id,
                partition,
                "removed the data of a partition this broker no longer hosts (its topic was deleted, or its replica moved away, while the broker was down)"
            );
        }
        // Their Raft state: only of groups the state numbers and leaves this broker out of
        // (every group stored here is numbered: checked above). The controller's, the
        // partitions held here and those the state leaves here stay.
        let mut kept = self.registry.held_groups();
        kept.insert(crate::raft::CONTROLLER_GROUP);
        kept.extend(
            state
                .topics
                .values()
                .flat_map(|t| t.partitions.iter())
                .filter(|p| keeps(Some(p)))
                .map(|p| p.group_id),
        );
        for group_id in stored.into_iter().filter(|g| !kept.contains(g)) {
            match self.meta.delete_raft_group(group_id) {
                Ok(()) => tracing::info!(
                    group_id,
                    "removed the Raft state of a group this broker no longer hosts"
                ),
                Err(e) => tracing::warn!(
                    group_id,
                    "cannot delete the Raft state of a group this broker no longer hosts: {e}"
                ),
            }
        }
    }

    /// Stops every Raft group, snapshotting each partition so the next start replays nothing.
    /// Acknowledged data is already durable.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.registry.shutdown().await;
        self.controller.shutdown().await;
    }
}

async fn reconcile_loop(
    node: std::sync::Weak<Node>,
    mut state: watch::Receiver<Arc<ControllerState>>,
    mut done: bool,
) {
    // Whether the data left by partitions this broker no longer hosts has been removed (once
    // per start, once the controller state here holds what the controller had committed when
    // this broker came back: see `Node::sweep_due`), and the commit index that waits for.
    let mut swept = false;
    let mut sweep_target = None;
    loop {
        let changed = if done && swept {
            if state.changed().await.is_err() {
                return;
            }
            true
        } else {
            // Deferred (see `Node::reconcile`), or the sweep waits for the controller state to
            // be current: tried again soon, changed or not.
            match tokio::time::timeout(Duration::from_millis(250), state.changed()).await {
                Ok(Err(_)) => return,
                Ok(Ok(())) => true,
                Err(_) => false,
            }
        };
        let Some(node) = node.upgrade() else { return };
        if node.stopping.load(Ordering::SeqCst) {
            return;
        }
        if changed || !done {
            // (Marks the state seen; reconcile reads the latest itself.)
            state.borrow_and_update();
            done = node.reconcile().await;
        }
        if done && !swept && node.sweep_due(&mut sweep_target) {
            node.remove_unhosted().await;
            swept = true;
        }
    }
}

/// Moves a group's leadership away from this broker (a drain) within `timeout`: `leads` says
/// whether this broker leads it and who does, `transfer` moves it within the time given.
/// Returns the new leader. A transfer of it already under way (the leader balance, an operator,
/// a broker removal) is waited for, and the group counts as moved once another broker leads it.
/// A transfer that failed is tried again while time is left (its target may have died since it
/// last answered: the next choice leaves it out once its answers are older than a lease), but
/// not one that found no replica to take the leadership at all. The last failure is the answer.
/// No transfer starts with less than `least` left (it would hold back the group's heartbeats and
/// proposals, then be cut off).
async fn move_away<L, T, F>(
    timeout: Duration,
    least: Duration,
    leads: L,
    transfer: T,
) -> Result<NodeId, BrokerError>
where
    L: Fn() -> (bool, Option<NodeId>),
    T: Fn(Duration) -> F,
    F: std::future::Future<Output = Result<NodeId, BrokerError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut failed: Option<BrokerError> = None;
    loop {
        if let (false, Some(leader)) = leads() {
            return Ok(leader);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() || left < least {
            return Err(failed.unwrap_or_else(|| {
                BrokerError::Timeout(format!(
                    "the leadership did not move in time ({} ms left, a transfer takes about {} \
                     ms)",
                    left.as_millis(),
                    least.as_millis()
                ))
            }));
        }
        // (A transfer gives each of its steps the time it is given: bounded as a whole here.)
        let outcome = tokio::time::timeout(left, transfer(left))
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::Timeout(
                    "the leadership did not move in time".into(),
                ))
            });
        match outcome {
            Ok(leader) => return Ok(leader),
            // Another transfer of it runs (or ran, or an election moved it): look again shortly.
            Err(BrokerError::TransferUnderWay { .. }) => {
                tokio::time::sleep(DRAIN_RECHECK.min(left)).await;
            }
            Err(_) if !leads().0 => {
                tokio::time::sleep(DRAIN_RECHECK.min(left)).await;
            }
            Err(e @ (BrokerError::NoTransferTarget { .. } | BrokerError::InvalidArgument(_))) => {
                return Err(e);
            }
            Err(e) => {
                tracing::info!("a transfer failed ({e}); trying again");
                failed = Some(e);
                tokio::time::sleep(DRAIN_RETRY_PAUSE.min(left)).await;
            }
        }
    }
}

/// The time a drain takes at most when its caller waits `deadline` for the answer: a tenth
/// less (at most 2 s less), for the answer to reach the caller in time.
pub(crate) fn drain_budget(deadline: Duration) -> Duration {
    deadline.saturating_sub((deadline / 10).min(Duration::from_secs(2)))
}

/// How long a drain waits before it tries again to move a leadership whose transfer failed.
const DRAIN_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// How often a drain looks again at a partition whose leadership another transfer is moving.
const DRAIN_RECHECK: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A drain waits for a transfer of the same group that another caller runs, and counts the
    /// group as moved once another broker leads it; any other refusal while this broker leads
    /// is the drain's answer, and a transfer that outlasts the drain's time ends it.
    #[tokio::test]
    async fn a_drain_waits_for_a_transfer_under_way() {
        let under_way = || BrokerError::TransferUnderWay { to: 3, leader: 1 };
        let calls = AtomicU32::new(0);
        let moved = AtomicBool::new(false);
        let outcome = move_away(
            Duration::from_secs(10),
            Duration::ZERO,
            || {
                if moved.load(Ordering::SeqCst) {
                    (false, Some(3))
                } else {
                    (true, Some(1))
                }
            },
            |_| async {
                if calls.fetch_add(1, Ordering::SeqCst) == 2 {
                    moved.store(true, Ordering::SeqCst);
                }
                Err(under_way())
            },
        )
        .await;
        assert_eq!(outcome.expect("moved by the other transfer"), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "looked again twice");

        let calls = AtomicU32::new(0);
        let outcome = move_away(
            Duration::from_secs(10),
            Duration::ZERO,
            || (true, Some(1)),
            |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(BrokerError::NoTransferTarget {
                    reason: "the partition has no other replica that answers to lead it".into(),
                    leader: 1,
                })
            },
        )
        .await;
        assert!(
            matches!(outcome, Err(BrokerError::NoTransferTarget { .. })),
            "{outcome:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "not tried again");

        // A transfer whose target failed it (died since it last answered) is tried again, and
        // the next one moves the leadership. Before, the first failure was the drain's answer.
        let calls = AtomicU32::new(0);
        let outcome = move_away(
            Duration::from_secs(10),
            Duration::ZERO,
            || (true, Some(1)),
            |_| async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(BrokerError::Unavailable {
                        reason: "the connection to node 3 failed".into(),
                        leader: Some(1),
                    }),
                    _ => Ok(2),
                }
            },
        )
        .await;
        assert_eq!(outcome.expect("moved at the second try"), 2);
        // Failing until the time is up, the last failure is the answer.
        let outcome = move_away(
            Duration::from_millis(500),
            Duration::ZERO,
            || (true, Some(1)),
            |_| async {
                Err(BrokerError::Unavailable {
                    reason: "the connection to node 3 failed".into(),
                    leader: Some(1),
                })
            },
        )
        .await;
        assert!(
            matches!(outcome, Err(BrokerError::Unavailable { .. })),
            "{outcome:?}"
        );

        let outcome = move_away(
            Duration::from_millis(350),
            Duration::ZERO,
            || (true, Some(1)),
            |_| async { Err(under_way()) },
        )
        .await;
        assert!(
            matches!(outcome, Err(BrokerError::Timeout(_))),
            "{outcome:?}"
        );
    }
}
