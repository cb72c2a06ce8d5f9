//! How Raft groups reach their peers: gRPC (`weft.internal.v1.Raft`) over the peer port.
//!
//! [`Peers`] is the node's side of it: one HTTP/2 connection per peer address, made on first use
//! and reused by every group of this node (never a dial per call), and the directory of the
//! groups open here, which [`RaftService`] serves. Every call names the cluster and the node it
//! is meant for (`weft-cluster`, `weft-target-node` metadata); a broker refuses calls meant for
//! another cluster or node (a recycled address, a stale DNS entry) with FAILED_PRECONDITION.
//! A single-node broker has no peers: openraft never calls out while its node is the only voter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use tonic::transport::Endpoint;
/// A peer connection: a proxy's plain HTTP answer on the way (a sidecar's 403 or 502) becomes
/// the gRPC status it stands for, not a decoding error; a call made for a client carries its
/// trace context.
type Channel = crate::grpc::caller::PeerChannel;
use tonic::{Request, Response, Status};
use weft_proto::internal::v1 as pb;
use weft_proto::internal::v1::raft_client::RaftClient;

use super::{GroupId, LogReader, NodeId, Raft, TypeConfig, wire};

/// Metadata key naming the cluster a peer call is meant for.
pub(super) const CLUSTER_HEADER: &str = "weft-cluster";
/// Metadata key carrying the cluster's id (once the controller stores one).
pub(super) const CLUSTER_ID_HEADER: &str = "weft-cluster-id";
/// Metadata key naming the node a peer call is meant for.
pub(super) const TARGET_NODE_HEADER: &str = "weft-target-node";

/// Largest Raft message sent or accepted on the peer port. An AppendEntries that would be larger
/// is split by openraft (the sender answers PayloadTooLarge with a smaller entry count), so one
/// entry alone must always fit: the largest batch a topic may allow
/// ([`crate::topic::MESSAGE_BYTES_MAX`]) with room to spare for the message around it (before,
/// the two were equal, and an entry of one such batch was sent and refused forever).
pub const PEER_MESSAGE_BYTES_MAX: usize = crate::topic::MESSAGE_BYTES_MAX as usize + 1024 * 1024;

/// A group that sent entries this recently is busy: its empty appends are not held back.
const BUSY_WINDOW: Duration = Duration::from_secs(2);

/// How often the leader watch ([`Peers::watch_leaders`]) looks at every group here.
const LEADER_WATCH_EVERY: Duration = Duration::from_millis(50);
/// An AppendEntries of one entry at least this large (encoded) goes as a call of its own that
/// openraft's timeout does not cut off (see `LargeAppend`).
const LARGE_APPEND_BYTES: usize = 1 << 20;
/// The slowest link a large entry is given time for: its call's deadline is one heartbeat
/// interval plus its size at this rate (an 8 MiB entry: 8.5 s with the defaults).
const LARGE_APPEND_BYTES_PER_SEC: f64 = (1u64 << 20) as f64;
/// `WEFT_TEST_ELECT_DELAY_MS`: a test hook that makes this broker stand that much later when a
/// transfer asks it to (`Raft.Elect`), as a loaded machine may.
fn elect_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("WEFT_TEST_ELECT_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    })
}

/// A transfer's hold on a replica's elections in a group (see [`Peers::hold_elections`]).
#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    term: u64,
    id: u64,
}

/// A transfer's target waiting for its leader's Elect (see
/// `HoldElectionsRequest.stand_after_ms`): from `at` until `until`, in term `term`, it stands
/// by itself if its leader is silent.
struct Standby {
    at: Instant,
    until: Instant,
    /// How long the leader must have been silent: it pauses its heartbeats once the other
    /// voters answered its holds, so its silence measures the time since the pause began (it
    /// may have begun after this target was told: the standby waits until `until` for it).
    quiet: Duration,
    term: u64,
    id: u64,
}

/// A new hold id: unique within this process, and unlikely to repeat one of an earlier run.
pub(super) fn new_hold_id() -> u64 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    NEXT.get_or_init(|| {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        std::sync::atomic::AtomicU64::new(seed | 1)
    })
    .fetch_add(2, std::sync::atomic::Ordering::Relaxed)
}

/// A peer's answer to `call` within `timeout`; what went wrong as text otherwise (the code and
/// message of a refusal, or no answer in time).
async fn answer_within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
        Err(_) => Err("no answer in time".into()),
    }
}

/// The least time a leader waits for a follower's answer to HoldElections.
const HOLD_ANSWER_MIN: Duration = Duration::from_millis(200);

/// How soon the replica that initialised a group that never had a leader asks for pre-votes
/// again (plus up to [`NEW_GROUP_JITTER_MS`]).
const NEW_GROUP_RETRY: Duration = Duration::from_millis(100);
const NEW_GROUP_JITTER_MS: u64 = 100;

/// A 64-bit mix (splitmix64's finaliser): spreads nearby seeds over the whole range.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Most bytes a ReadLog answers with.
pub(super) const READ_LOG_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Most entries openraft puts in one AppendEntries; the log reader also stops at
/// `APPEND_BYTES_MAX` of them (entries are up to a few MiB each, or a few hundred bytes).
pub(crate) const PAYLOAD_ENTRIES_MAX: u64 = 4096;

/// A follower at most this many entries behind its leader's log is in sync.
pub(crate) const IN_SYNC_ENTRIES_MAX: u64 = 16;

struct Inner {
    node_id: NodeId,
    cluster_name: String,
    /// The cluster's id once the controller stores one (empty until then): sent with every
    /// peer call, and a call naming another id is refused. Clusters share a name easily (the
    /// default), and node ids from pod ordinals repeat across them.
    cluster_id: RwLock<String>,
    /// One lazily connected channel per peer address.
    channels: Mutex<HashMap<String, Channel>>,
    /// The Raft groups open on this node.
    groups: RwLock<HashMap<GroupId, Raft>>,
    /// The logs of the partition groups open here (served to replicas catching up).
    readers: RwLock<HashMap<GroupId, LogReader>>,
    /// The node each group last received a snapshot from (its leader then).
    snapshot_from: Mutex<HashMap<GroupId, NodeId>>,
    /// Per group: the snapshot being received here, and how many of its bytes came so far
    /// (see [`RaftService::install_snapshot`]).
    snapshot_received: Mutex<HashMap<GroupId, (String, u64)>>,
    /// When each group last received an AppendEntries (a leader's heartbeat or entries) here.
    heard_at: Mutex<HashMap<GroupId, std::time::Instant>>,
    /// The highest commit index a controller leader's AppendEntries carried here since this
    /// node started (see [`Peers::controller_commit_heard`]).
    controller_commit_heard: Mutex<Option<u64>>,
    /// Per group: when it was opened here, and when this node last granted a vote in it or
    /// was seen leading it (the election watch's clock, beside `heard_at`).
    election_clock: Mutex<HashMap<GroupId, (Instant, Option<Instant>)>>,
    /// Whether this node may vote (see [`Recovery`]), and the groups where it waits.
    recovery: Mutex<(Recovery, HashMap<GroupId, Gate>)>,
    /// Called when this node comes to vote as any broker ([`Peers::on_settled`]).
    settled: Mutex<Option<SettledHook>>,
    /// The partition groups of which the controller lists this node as the only replica.
    sole_replicas: RwLock<std::collections::HashSet<GroupId>>,
    /// An operator ended this node's recovery ([`Peers::end_recovery_by_operator`]).
    ended_by_operator: std::sync::atomic::AtomicBool,
    /// When each (group, peer) last answered this node as a leader or candidate it accepts.
    contacts: Mutex<HashMap<(GroupId, NodeId), Instant>>,
    /// The address this node's peer connections leave from (its peer listen address, when that
    /// names one), so that peers and firewalls see which broker a connection comes from.
    local_ip: Option<IpAddr>,
    /// A peer's address to the local address dialled to reach it (a sidecar's outbound
    /// listener; `peer_upstreams` in the config).
    upstreams: HashMap<String, String>,
    /// TLS of peer calls (`tls.peer`), reloading; None: h2c.
    tls: Option<Arc<weft_proto::tls::Reloading<weft_proto::tls::rustls::ClientConfig>>>,
    connect_timeout: Duration,
    /// The AppendEntries batcher of each peer (node id, address).
    batchers: Mutex<HashMap<(NodeId, String), tokio::sync::mpsc::Sender<super::batch::Pending>>>,
    /// The node the controller's leadership is being handed to from this node (0: none).
    controller_transfer: std::sync::atomic::AtomicU64,
    /// Per group and target: when a transfer this node chose that target for failed last.
    transfer_failures: Mutex<HashMap<(GroupId, NodeId), Instant>>,
    /// Per peer: one large append at a time (see [`LargeAppend`]).
    large_lanes: Mutex<HashMap<NodeId, Arc<tokio::sync::Semaphore>>>,
    /// Per group: a leadership transfer under way holds this replica's elections until then, in
    /// that term; and the hold's id (see [`Peers::hold_elections`]).
    holds: Mutex<HashMap<GroupId, Hold>>,
    /// Per group: a leadership transfer to this node is under way (see [`Standby`]).
    standbys: Mutex<HashMap<GroupId, Standby>>,
    /// This broker is draining ([`Peers::set_draining`]): a transfer's target here refuses.
    draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("node_id", &self.node_id)
            .field("cluster_name", &self.cluster_name)
            .finish_non_exhaustive()
    }
}

/// See [`Peers::on_settled`].
pub type SettledHook = Box<dyn Fn() + Send + Sync>;

/// Whether a broker votes. A broker that lost its data (started with an empty data directory
/// while the cluster already counted it as a member) forgot its votes and its log: granting a
/// vote then could elect a leader that lacks committed entries. It withholds its votes in each
/// group until its log has caught up with what the group had committed when it came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// It votes.
    Normal,
    /// Its data directory was empty at start: whether the cluster knew it is not known yet.
    Undecided,
    /// It lost its data: it votes in a group once caught up there.
    Rejoining,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// No leader heard from yet.
    Waiting,
    /// Catching up to the commit index `target` that a leader of term `term` sent (the
    /// highest term heard: a deposed leader cut off from the others may be heard first, and
    /// its commit index can lack entries its successor committed with this replica's help
    /// before it lost them).
    CatchingUp {
        /// The commit index to apply.
        target: u64,
        /// The term of the leader that sent it.
        term: u64,
    },
    /// Caught up: votes.
    Open,
}

/// What the election watch does in a group (see [`Peers::watch_leaders`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// The only voter, not leading: stand at once.
    Alone,
    /// Ask the other voters for a pre-vote, and stand if a majority grants it.
    PreVote,
    /// The target of a transfer whose leader went silent before it called Elect: stand at
    /// once (the other voters hold their elections and refuse pre-votes).
    Standby,
}

/// Whether every majority of `m`'s membership (each half of a joint one) includes `me`: a
/// membership of two voters or one (see [`Peers::in_every_quorum`]).
fn in_every_quorum(m: &openraft::RaftMetrics<NodeId, BasicNode>, me: NodeId) -> bool {
    in_every_majority(m.membership_config.membership().get_joint_config(), me)
}

/// Whether every majority of each voter set of `configs` (one, or the two halves of a joint
/// membership) includes `me`: `me` votes in each, and each has at most two voters (a majority
/// of two is both; of one, that one). Nothing at all is not.
fn in_every_majority(configs: &[std::collections::BTreeSet<NodeId>], me: NodeId) -> bool {
    !configs.is_empty()
        && configs
            .iter()
            .all(|part| part.contains(&me) && part.len() <= 2)
}

/// Whether `m` leads its group and has applied an entry of its own term: a new leader has
/// every committed entry in its log, but applies its predecessors' only once its own first
/// entry is committed.
fn leads_applied(m: &openraft::RaftMetrics<NodeId, BasicNode>) -> bool {
    m.state == openraft::ServerState::Leader
        && m.last_applied
            .is_some_and(|l| l.leader_id.term == m.current_term)
}

/// A log id for a message (term-index, or "nothing").
fn describe(id: Option<&openraft::LogId<NodeId>>) -> String {
    id.map_or_else(
        || "nothing".to_string(),
        |id| format!("{}-{}", id.leader_id.term, id.index),
    )
}

/// This node's connections to its peers, and the directory of its open Raft groups.
#[derive(Debug, Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

/// How long a failed transfer's record is kept (see [`Peers::note_transfer_failure`]).
const TRANSFER_FAILURE_KEPT: Duration = Duration::from_secs(60);

impl Peers {
    /// The peers of node `node_id` in cluster `cluster_name`; connections leave from
    /// `local_ip` when given, and go to a peer's upstream (a local proxy) when `upstreams` names
    /// one for its address.
    pub fn new(
        node_id: NodeId,
        cluster_name: &str,
        local_ip: Option<IpAddr>,
        upstreams: HashMap<String, String>,
        tls: Option<Arc<weft_proto::tls::Reloading<weft_proto::tls::rustls::ClientConfig>>>,
    ) -> Peers {
        Peers {
            inner: Arc::new(Inner {
                node_id,
                cluster_name: cluster_name.to_string(),
                cluster_id: RwLock::new(String::new()),
                channels: Mutex::new(HashMap::new()),
                groups: RwLock::new(HashMap::new()),
                readers: RwLock::new(HashMap::new()),
                snapshot_from: Mutex::new(HashMap::new()),
                snapshot_received: Mutex::new(HashMap::new()),
                heard_at: Mutex::new(HashMap::new()),
                controller_commit_heard: Mutex::new(None),
                election_clock: Mutex::new(HashMap::new()),
                recovery: Mutex::new((Recovery::Normal, HashMap::new())),
                contacts: Mutex::new(HashMap::new()),
                local_ip: local_ip.filter(|ip| !ip.is_unspecified()),
                upstreams,
                tls,
                connect_timeout: Duration::from_secs(2),
                batchers: Mutex::new(HashMap::new()),
                controller_transfer: std::sync::atomic::AtomicU64::new(0),
                transfer_failures: Mutex::new(HashMap::new()),
                large_lanes: Mutex::new(HashMap::new()),
                holds: Mutex::new(HashMap::new()),
                standbys: Mutex::new(HashMap::new()),
                settled: Mutex::new(None),
                sole_replicas: RwLock::new(std::collections::HashSet::new()),
                ended_by_operator: std::sync::atomic::AtomicBool::new(false),
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    fn touch(&self, group_id: GroupId, node: NodeId) {
        if let Ok(mut contacts) = self.inner.contacts.lock() {
            contacts.insert((group_id, node), Instant::now());
        }
    }

    /// When `node` last answered an AppendEntries or granted a vote of group `group_id` here.
    pub(super) fn last_contact(&self, group_id: GroupId, node: NodeId) -> Option<Instant> {
        self.inner
            .contacts
            .lock()
            .ok()
            .and_then(|c| c.get(&(group_id, node)).copied())
    }

    /// The network a group of this node uses.
    pub(super) fn network(&self, group_id: GroupId) -> Network {
        Network {
            group_id,
            peers: self.clone(),
        }
    }

    /// Makes `raft` reachable by peers as group `group_id`.
    pub(super) fn register(&self, group_id: GroupId, raft: Raft) {
        // (An answer to the group's previous instance may have come after it closed.)
        self.forget_contacts(group_id);
        if let Ok(mut clock) = self.inner.election_clock.lock() {
            clock.insert(group_id, (Instant::now(), None));
        }
        if let Ok(mut groups) = self.inner.groups.write() {
            groups.insert(group_id, raft);
        }
    }

    /// Stops routing peer calls to group `group_id`.
    pub(super) fn unregister(&self, group_id: GroupId) {
        if let Ok(mut groups) = self.inner.groups.write() {
            groups.remove(&group_id);
        }
        if let Ok(mut readers) = self.inner.readers.write() {
            readers.remove(&group_id);
        }
        if let Ok(mut clock) = self.inner.election_clock.lock() {
            clock.remove(&group_id);
        }
        if let Ok(mut received) = self.inner.snapshot_received.lock() {
            received.remove(&group_id);
        }
        if let Ok(mut heard) = self.inner.heard_at.lock() {
            heard.remove(&group_id);
        }
        if let Ok(mut holds) = self.inner.holds.lock() {
            holds.remove(&group_id);
        }
        if let Ok(mut standbys) = self.inner.standbys.lock() {
            standbys.remove(&group_id);
        }
    }

    /// Forgets when the replicas of group `group_id` last answered here, and when its leader
    /// was last heard (the group closed; call once its Raft core stopped, so that no late
    /// message records one again).
    pub(super) fn forget_contacts(&self, group_id: GroupId) {
        if let Ok(mut contacts) = self.inner.contacts.lock() {
            contacts.retain(|(group, _), _| *group != group_id);
        }
        if let Ok(mut heard) = self.inner.heard_at.lock() {
            heard.remove(&group_id);
        }
    }

    /// Records that a transfer of `group`'s leadership to `target`, chosen by this node, failed
    /// (see [`Peers::transfer_failed_within`]).
    pub(crate) fn note_transfer_failure(&self, group: GroupId, target: NodeId) {
        if let Ok(mut failures) = self.inner.transfer_failures.lock() {
            let now = Instant::now();
            // Old entries go (of groups since deleted, say): a failure matters for seconds.
            failures.retain(|_, at| now.duration_since(*at) < TRANSFER_FAILURE_KEPT);
            failures.insert((group, target), now);
        }
    }

    /// Whether a transfer of `group`'s leadership to `target` chosen by this node failed within
    /// `within`: the next choice passes it over (it died after it last answered, say, and
    /// would otherwise be chosen again until its answers age past a lease).
    pub(crate) fn transfer_failed_within(
        &self,
        group: GroupId,
        target: NodeId,
        within: Duration,
    ) -> bool {
        self.inner.transfer_failures.lock().is_ok_and(|failures| {
            failures
                .get(&(group, target))
                .is_some_and(|at| at.elapsed() < within)
        })
    }

    /// The node the controller's leadership is being handed to from this node (0: none):
    /// proposals are refused meanwhile, so that the target catches up and the followers' leases
    /// run out.
    pub fn controller_transfer(&self) -> &std::sync::atomic::AtomicU64 {
        &self.inner.controller_transfer
    }

    /// Sets whether this node votes (see [`Recovery`]). Becoming [`Recovery::Normal`] calls
    /// the hook of [`Peers::on_settled`] (after the mode is set).
    pub fn set_recovery(&self, recovery: Recovery) {
        if let Ok(mut r) = self.inner.recovery.lock() {
            // (Under the lock: an operator's end and a join answer may cross.)
            if recovery != Recovery::Normal
                && self
                    .inner
                    .ended_by_operator
                    .load(std::sync::atomic::Ordering::SeqCst)
            {
                return;
            }
            if r.0 != recovery {
                tracing::info!(?recovery, "voting mode");
            }
            r.0 = recovery;
        }
        if recovery == Recovery::Normal
            && let Ok(hook) = self.inner.settled.lock()
            && let Some(hook) = hook.as_ref()
        {
            hook();
        }
    }

    /// What to do when this node comes to vote as any broker: the broker clears the durable
    /// mark that makes it withhold its votes again after a restart.
    pub fn on_settled(&self, hook: SettledHook) {
        if let Ok(mut settled) = self.inner.settled.lock() {
            *settled = Some(hook);
        }
    }

    /// The partition groups of which the controller lists this node as the only replica
    /// (set by each reconcile).
    pub fn set_sole_replicas(&self, groups: std::collections::HashSet<GroupId>) {
        if let Ok(mut sole) = self.inner.sole_replicas.write() {
            *sole = groups;
        }
    }

    /// Whether the controller lists this node as the only replica of partition group
    /// `group_id` (never the controller group: a broker's own log cannot tell a cluster of one
    /// from an early prefix of a larger cluster's log).
    fn is_sole_replica(&self, group_id: GroupId) -> bool {
        self.inner
            .sole_replicas
            .read()
            .is_ok_and(|sole| sole.contains(&group_id))
    }

    /// Whether this broker refuses to be a leadership transfer's target: set while it drains
    /// (from the drain's start until it is undrained or restarts), so that a transfer another
    /// broker started before it saw the draining mark (its leader balance, an operator) does
    /// not hand it a leadership after its drain moved them all away. A leader that chose it
    /// knowing it drains (no other replica to take the leadership: `last_resort`) is not
    /// refused. Elections it wins otherwise (its leader died) still stand: they keep the
    /// partition available.
    pub fn set_draining(&self, draining: bool) {
        self.inner
            .draining
            .store(draining, std::sync::atomic::Ordering::SeqCst);
    }

    /// Why a draining target refuses a transfer (see [`Peers::set_draining`]).
    fn draining_refusal(&self) -> String {
        format!(
            "node {} is draining: it takes no leadership (undrain it first)",
            self.inner.node_id
        )
    }

    /// Whether this broker is draining (see [`Peers::set_draining`]).
    pub fn draining(&self) -> bool {
        self.inner
            .draining
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// An operator ends this node's recovery: it votes everywhere from now on, whatever a late
    /// join answer says.
    pub fn end_recovery_by_operator(&self) {
        if let Ok(_r) = self.inner.recovery.lock() {
            self.inner
                .ended_by_operator
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.set_recovery(Recovery::Normal);
    }

    /// What the cluster says at this node's join: it is new (`Normal`) or lost its data
    /// (`Rejoining`). Changes the mode only while it is still undecided (a broker that an
    /// operator made vote, or that restarted after that, keeps its mode).
    pub fn decide_recovery(&self, recovery: Recovery) {
        let undecided = self
            .inner
            .recovery
            .lock()
            .is_ok_and(|r| r.0 == Recovery::Undecided);
        if undecided {
            self.set_recovery(recovery);
        }
    }

    /// Expects group `group_id` to catch up with its leader's commit (see
    /// [`Peers::caught_up_in`]): a broker that started with an empty data directory calls it
    /// for the controller group at start.
    pub fn expect_catch_up(&self, group_id: GroupId) {
        if let Ok(mut r) = self.inner.recovery.lock() {
            r.1.entry(group_id).or_insert(Gate::Waiting);
        }
    }

    /// Whether group `group_id` here has applied what its leader had committed when this node
    /// first heard it after coming back (or leads it, or was never expected to catch up
    /// there), whatever the voting mode: an operator's end of the recovery makes the broker
    /// vote, not its controller state current.
    pub fn caught_up_in(&self, group_id: GroupId) -> bool {
        let Ok(mut r) = self.inner.recovery.lock() else {
            return false;
        };
        let Some(gate) = r.1.get_mut(&group_id) else {
            return true;
        };
        let leads = self.group(group_id).ok().is_some_and(|raft| {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            leads_applied(&m)
        });
        if leads {
            *gate = Gate::Open;
        }
        self.try_open(group_id, gate)
    }

    /// Whether this node votes (see [`Recovery`]).
    pub fn recovery(&self) -> Recovery {
        self.inner
            .recovery
            .lock()
            .map_or(Recovery::Undecided, |r| r.0)
    }

    /// Whether this node withholds its vote in group `group_id` now.
    fn withholds_vote(&self, group_id: GroupId) -> bool {
        let Ok(mut r) = self.inner.recovery.lock() else {
            return true;
        };
        match r.0 {
            Recovery::Normal => false,
            Recovery::Undecided => true,
            Recovery::Rejoining => {
                // The only replica of a partition has no other replica to lack anything
                // against: it would otherwise never settle (its own leadership does not open
                // the gate). Only where the controller says so too: the membership of a broker
                // that lost its data may be one no longer in force (see `election_due`).
                // Elected in a group of two voters (it stands there, see `in_every_quorum`):
                // the other voter's log check granted it, so it holds every committed entry;
                // a leader hears no other leader to catch up with.
                let me = self.inner.node_id;
                let (sole_voter, leads_pair) =
                    self.group(group_id).ok().map_or((false, false), |raft| {
                        let metrics = raft.metrics();
                        let m = metrics.borrow();
                        let mut voters = m.membership_config.membership().voter_ids();
                        let (first, second) = (voters.next(), voters.next());
                        let two = second.is_some() && voters.next().is_none();
                        (
                            first == Some(me) && second.is_none(),
                            two && leads_applied(&m) && in_every_quorum(&m, me),
                        )
                    });
                if sole_voter && self.is_sole_replica(group_id) {
                    return false;
                }
                let gate = r.1.entry(group_id).or_insert(Gate::Waiting);
                if leads_pair && !matches!(gate, Gate::Open) {
                    tracing::info!(
                        group = group_id,
                        "elected by the other voter of the group after losing its data: votes again"
                    );
                    *gate = Gate::Open;
                }
                !self.try_open(group_id, gate)
            }
        }
    }

    /// Whether every majority of this node's membership in group `group_id` (each half of a
    /// joint one) includes this node (a group of two voters, or one). A replica that lost its
    /// data stands in such a group even while it withholds its votes: only a replica that
    /// votes as any broker can elect it then (see [`Peers::candidate_in_every_quorum`]), and
    /// that one's log check keeps a candidate that lacks committed entries out. A group of
    /// two voters (a two-broker cluster, a topic of two replicas) would otherwise never elect
    /// while one of them rejoins.
    pub(super) fn in_every_quorum(&self, group_id: GroupId) -> bool {
        let Ok(raft) = self.group(group_id) else {
            return false;
        };
        let metrics = raft.metrics();
        let m = metrics.borrow();
        in_every_quorum(&m, self.inner.node_id)
    }

    /// What this node says in its (pre-)vote requests of group `group_id`
    /// (`candidate_in_every_quorum`): it votes there, and every majority of its membership
    /// includes it. Entries are committed by a majority of the membership in force (the last
    /// one in the log; a change to it is committed by both halves of the joint one before a
    /// new one follows), so each was acknowledged by this node and is in its log: a replica
    /// that lost its data and withholds its votes may grant this candidate its vote. A
    /// candidate that withholds its own votes never says so: its membership may come from a
    /// prefix of the log (a pair that has grown since), and two replicas that lost their data
    /// must not elect each other over the one that holds everything.
    pub(super) fn candidate_in_every_quorum(&self, group_id: GroupId) -> bool {
        !self.withholds_vote(group_id) && self.in_every_quorum(group_id)
    }

    /// Whether this node votes in every group open here now (always, unless it is rejoining
    /// after losing its data and some group has not caught up yet).
    pub fn votes_in_every_group(&self) -> bool {
        let ids: Vec<GroupId> = match self.inner.groups.read() {
            Ok(groups) => groups.keys().copied().collect(),
            Err(_) => return false,
        };
        ids.into_iter().all(|id| !self.withholds_vote(id))
    }

    /// Opens `gate` (group `group_id`) when the group has applied what it catches up to;
    /// whether it is open.
    fn try_open(&self, group_id: GroupId, gate: &mut Gate) -> bool {
        match *gate {
            Gate::Open => true,
            Gate::Waiting => false,
            Gate::CatchingUp { target, .. } => {
                let applied = self
                    .group(group_id)
                    .ok()
                    .and_then(|raft| raft.metrics().borrow().last_applied)
                    .map_or(0, |l| l.index);
                if applied >= target {
                    tracing::info!(
                        group = group_id,
                        "caught up after losing its data: votes again"
                    );
                    *gate = Gate::Open;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// A leader of term `term`'s AppendEntries reached group `group_id` here, with its commit
    /// index: the first one sets what a replica that lost its data must catch up to before it
    /// votes, and one of a later term raises it while it has not caught up. (Whether it counts
    /// as hearing from a leader is known once openraft has answered it.)
    fn heard_leader(&self, group_id: GroupId, term: u64, leader_commit: u64) {
        if let Ok(mut r) = self.inner.recovery.lock() {
            let gate = if r.0 == Recovery::Rejoining {
                Some(r.1.entry(group_id).or_insert(Gate::Waiting))
            } else {
                // (A gate expected before the mode was known, or left after an operator ended
                // the recovery: see `caught_up_in`.)
                r.1.get_mut(&group_id)
            };
            if let Some(gate) = gate {
                match *gate {
                    Gate::Waiting => {
                        *gate = Gate::CatchingUp {
                            target: leader_commit,
                            term,
                        };
                    }
                    Gate::CatchingUp {
                        target,
                        term: heard,
                    } if term > heard => {
                        *gate = Gate::CatchingUp {
                            target: target.max(leader_commit),
                            term,
                        };
                    }
                    Gate::CatchingUp { .. } | Gate::Open => {}
                }
                self.try_open(group_id, gate);
            }
        }
    }

    /// The highest commit index a controller leader's AppendEntries carried to this node since
    /// it started (None: none came yet). A broker whose controller state has applied it holds
    /// what the controller had committed when it came back, even if its own controller log
    /// had lost entries.
    pub fn controller_commit_heard(&self) -> Option<u64> {
        self.inner
            .controller_commit_heard
            .lock()
            .map_or(None, |heard| *heard)
    }

    /// Group `group_id` here hears from its leader now (see [`Peers::silent_for`]).
    fn heard_now(&self, group_id: GroupId) {
        if let Ok(mut heard) = self.inner.heard_at.lock() {
            heard.insert(group_id, std::time::Instant::now());
        }
    }

    /// How long ago group `group_id` here last received an AppendEntries from a leader (None:
    /// never, since this node started).
    pub fn silent_for(&self, group_id: GroupId) -> Option<std::time::Duration> {
        self.inner
            .heard_at
            .lock()
            .ok()
            .and_then(|h| h.get(&group_id).map(std::time::Instant::elapsed))
    }

    /// Starts this node's election watch (a task that ends when the last `Peers` handle is
    /// dropped). openraft's own election timer is off (`enable_elect: false`): every election
    /// of a replicated group starts here, and only after a pre-vote (`Raft.PreVote`, the Raft
    /// thesis' 9.6) that a majority of the group's voters granted.
    ///
    /// A voter stands once it has heard from no leader for longer than the leader's lease
    /// (`election_timeout_max`: after it, the other voters grant votes again), nor granted a
    /// vote, nor led the group itself, plus a delay of its own, half a tick to one and a half
    /// ticks (a tick is 1.5 heartbeats), drawn per node, group, term and attempt: the first to
    /// stand usually wins. It first asks the other voters
    /// whether they would vote for it; a voter says yes only when it hears from no leader
    /// either and the candidate's log is at least as up to date as its own. A pre-vote that
    /// fails, or an election that did not elect anyone, is tried again after a shorter delay
    /// (half an election timeout plus up to a tick).
    ///
    /// Without the pre-vote, openraft's timer made every voter that heard no leader stand,
    /// raising the group's term each time, whether or not it could win: a replica cut off from
    /// the others came back with a higher term and unseated the leader, and a replica whose log
    /// was behind (back from being cut off) stood again and again with ever higher terms while
    /// the leader was cut off, so that the one voter able to win kept losing its elections on
    /// terms. Seen in the fault-injection harness: 9 s without a leader on the majority side.
    ///
    /// A group that never had a leader (its log holds only the entry that initialised it) has
    /// no lease to wait out: the replica that initialised it asks for pre-votes again after 100
    /// ms, 200, 400, ... (within the first lease after opening) until the other replicas have
    /// opened the group and grant them.
    ///
    /// A single-voter group stands at once whenever it does not lead. A learner never stands,
    /// nor a broker that lost its data until it has caught up in the group.
    pub fn watch_leaders(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(LEADER_WATCH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Per group: when this node last asked for a pre-vote there, and how many times it
            // has (which varies its delay).
            let mut campaigns: HashMap<GroupId, (Instant, u64)> = HashMap::new();
            let running: Arc<Mutex<std::collections::HashSet<GroupId>>> = Arc::default();
            loop {
                every.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let peers = Peers { inner };
                let groups: Vec<(GroupId, Raft)> = peers
                    .inner
                    .groups
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .map(|(id, r)| (*id, r.clone()))
                    .collect();
                campaigns.retain(|id, _| groups.iter().any(|(g, _)| g == id));
                for (group_id, raft) in groups {
                    let campaign = campaigns.get(&group_id).copied();
                    let Some(due) = peers.election_due(group_id, &raft, campaign) else {
                        continue;
                    };
                    match due {
                        Due::Alone | Due::Standby => {
                            if due == Due::Alone {
                                tracing::info!(group = group_id, "the only voter: standing");
                            } else {
                                tracing::info!(
                                    group = group_id,
                                    "the leader handing its leadership here went silent \
                                     before it called the election: standing"
                                );
                            }
                            campaigns.insert(group_id, (Instant::now(), 0));
                            tokio::spawn(async move {
                                if let Err(e) = raft.trigger().elect().await {
                                    tracing::debug!(group = group_id, "cannot stand: {e}");
                                }
                            });
                        }
                        Due::PreVote => {
                            let mut busy = running
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            if !busy.insert(group_id) {
                                continue;
                            }
                            drop(busy);
                            let attempt = campaign.map_or(0, |(_, n)| n + 1);
                            campaigns.insert(group_id, (Instant::now(), attempt));
                            let peers = peers.clone();
                            let running = running.clone();
                            tokio::spawn(async move {
                                peers.campaign(group_id, &raft).await;
                                running
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .remove(&group_id);
                            });
                        }
                    }
                }
            }
        });
    }

    /// Whether group `group_id` (`raft`) here should stand for election now (see
    /// [`Peers::watch_leaders`]); `campaign`: when this node last asked for a pre-vote there
    /// and how many times it has.
    fn election_due(
        &self,
        group_id: GroupId,
        raft: &Raft,
        campaign: Option<(Instant, u64)>,
    ) -> Option<Due> {
        let leads = {
            let m = raft.metrics();
            let m = m.borrow();
            m.running_state.is_ok() && m.state == openraft::ServerState::Leader
        };
        if leads {
            self.led_now(group_id);
            return None;
        }
        let (me, term, alone, state, never_led) = {
            let m = raft.metrics();
            let m = m.borrow();
            if m.running_state.is_err() || m.state == openraft::ServerState::Leader {
                return None;
            }
            let membership = m.membership_config.membership();
            if !membership.voter_ids().any(|v| v == m.id) {
                return None;
            }
            let alone = membership
                .get_joint_config()
                .iter()
                .all(|c| c.len() == 1 && c.contains(&m.id));
            // Its log holds nothing past the entry that initialised the group (index 0), and
            // it knows no leader: a leader appends an entry as soon as it is elected, so no
            // leader of this group ever reached this replica.
            let never_led = m.last_log_index.is_none_or(|i| i == 0) && m.current_leader.is_none();
            (m.id, m.current_term, alone, m.state, never_led)
        };
        if self.standby_due(
            group_id,
            term,
            Duration::from_millis(raft.config().election_timeout_max),
        ) {
            return Some(Due::Standby);
        }
        if alone && self.recovery() != Recovery::Normal && !self.is_sole_replica(group_id) {
            // A broker that lost its data may hold a membership that is no longer in force (a
            // snapshot taken before the group grew, the first entries of the log as it catches
            // up): it stands alone only where the controller lists it as the only replica.
            return None;
        }
        if alone {
            // Once per term: the election of a single voter ends at once.
            let stood_this_term =
                campaign.is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1));
            return (state != openraft::ServerState::Candidate && !stood_this_term)
                .then_some(Due::Alone);
        }
        // Its leader is handing the leadership to another replica: that one stands.
        if self.held(group_id, term) {
            return None;
        }
        // A broker that lost its data stands once caught up in the group (it votes then too). One
        // still undecided (an empty data directory: a new member, or one that lost its data,
        // not yet known which) may stand, as under openraft's own timer before: a new voter
        // whose join answer was lost may be the vote the others need.
        if self.recovery() == Recovery::Rejoining
            && self.withholds_vote(group_id)
            && !self.in_every_quorum(group_id)
        {
            return None;
        }
        let config = raft.config();
        let lease = Duration::from_millis(config.election_timeout_max);
        let tick_ms = (config.heartbeat_interval * 3 / 2).max(1);
        let heard = self.silent_for(group_id).unwrap_or(Duration::MAX);
        let (opened, voted) = self
            .inner
            .election_clock
            .lock()
            .ok()
            .and_then(|c| c.get(&group_id).copied())
            .map_or((Duration::MAX, Duration::MAX), |(opened, voted)| {
                (
                    opened.elapsed(),
                    voted.map_or(Duration::MAX, |v| v.elapsed()),
                )
            });
        // A delay of its own per (node, group, term, attempt).
        let attempt = campaign.map_or(0, |(_, n)| n);
        let seed = me
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(group_id.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(term.wrapping_mul(0x94D0_49BB_1331_11EB))
            .wrapping_add(attempt);
        let jitter = Duration::from_millis(mix(seed) % tick_ms);
        if never_led && opened <= lease {
            // A new group (only the replica that initialised it is a voter yet: the others learn
            // the membership from their first leader). Its first election, which openraft
            // starts in `initialize`, fails when the other replicas have not opened the group
            // yet (they open it on the same controller commit, a moment apart). There is no
            // lease to wait out: ask for pre-votes again soon (a voter that has heard from a
            // leader still refuses), not after a lease and a tick (2.2-3.0 s for a new topic).
            // Doubling with each attempt (100 ms, 200, 400, ...: a vote round slower than the
            // retry would otherwise be overtaken by the next term), and only within the first
            // lease after opening; then as any group.
            let backoff = NEW_GROUP_RETRY.saturating_mul(1 << attempt.min(4));
            let retry = backoff + Duration::from_millis(mix(seed) % NEW_GROUP_JITTER_MS);
            // (Not before `retry` after opening either: openraft's own first election runs.)
            let due = opened > retry && campaign.is_none_or(|(at, _)| at.elapsed() > retry);
            return due.then_some(Due::PreVote);
        }
        let wait = lease + Duration::from_millis(tick_ms / 2) + jitter;
        let quiet = heard.min(opened).min(voted);
        if quiet <= wait {
            return None;
        }
        // Since the last attempt: half an election timeout plus up to a tick.
        let retry = Duration::from_millis(config.election_timeout_min / 2) + jitter;
        if campaign.is_some_and(|(at, _)| at.elapsed() <= retry) {
            return None;
        }
        Some(Due::PreVote)
    }

    /// Asks the other voters of group `group_id` (`raft`) for a pre-vote and stands for
    /// election when a majority (of each configuration, during a joint change) grants it.
    async fn campaign(&self, group_id: GroupId, raft: &Raft) {
        let (me, term, configs, others, timeout) = {
            let m = raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let others: Vec<(NodeId, String)> = membership
                .voter_ids()
                .filter(|v| *v != m.id)
                .filter_map(|v| membership.get_node(&v).map(|n| (v, n.addr.clone())))
                .collect();
            let config = raft.config();
            (
                m.id,
                m.current_term,
                membership.get_joint_config().clone(),
                others,
                Duration::from_millis(config.election_timeout_min / 2)
                    .max(Duration::from_millis(100)),
            )
        };
        let last_log_id = self.last_log_id(group_id);
        let candidate_in_every_quorum = self.candidate_in_every_quorum(group_id);
        let asked = others.into_iter().map(|(node, address)| {
            let request = pb::PreVoteRequest {
                group_id,
                term: term + 1,
                last_log_id: last_log_id.as_ref().map(wire::log_id_to),
                candidate_in_every_quorum,
            };
            async move {
                let answer = match self.raft_client(&address) {
                    Ok(mut client) => {
                        answer_within(
                            timeout,
                            client.pre_vote(self.request(node, request, timeout)),
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                (node, answer)
            }
        });
        let mut granted = std::collections::BTreeSet::from([me]);
        let mut refusals = Vec::new();
        for (node, answer) in futures::future::join_all(asked).await {
            match answer {
                Ok(a) if a.granted => {
                    granted.insert(node);
                }
                Ok(a) => refusals.push(format!("node {node}: {}", a.reason)),
                // A broker of an earlier version (a rolling upgrade) has no pre-vote: it
                // decides in the real vote, with its own lease and log checks.
                Err(e) if e.starts_with(&format!("{}:", tonic::Code::Unimplemented)) => {
                    granted.insert(node);
                }
                Err(e) => refusals.push(format!("node {node}: {e}")),
            }
        }
        let won = configs
            .iter()
            .all(|c| c.iter().filter(|v| granted.contains(v)).count() * 2 > c.len());
        if !won {
            metrics::counter!("weft_raft_pre_votes_total", "result" => "refused").increment(1);
            tracing::debug!(group = group_id, term, ?refusals, "pre-vote refused");
            return;
        }
        metrics::counter!("weft_raft_pre_votes_total", "result" => "granted").increment(1);
        // Still no leader, and still in the term the pre-vote was asked for?
        {
            let m = raft.metrics();
            let m = m.borrow();
            if m.state == openraft::ServerState::Leader
                || m.current_term != term
                || self.held(group_id, term)
                || self
                    .silent_for(group_id)
                    .is_some_and(|s| s < Duration::from_millis(raft.config().election_timeout_min))
            {
                return;
            }
        }
        tracing::info!(
            group = group_id,
            term,
            "no leader heard from and a majority granted a pre-vote: standing for election"
        );
        metrics::counter!("weft_raft_prompt_elections_total").increment(1);
        if let Err(e) = raft.trigger().elect().await {
            tracing::debug!(group = group_id, "cannot stand for election: {e}");
        }
    }

    /// The answer of group `group_id` (`raft`) here to a pre-vote (see [`Peers::watch_leaders`]).
    fn answer_pre_vote(&self, raft: &Raft, request: &pb::PreVoteRequest) -> pb::PreVoteResponse {
        let group_id = request.group_id;
        let lease_ms = raft.config().election_timeout_max;
        let (term, leads) = {
            let m = raft.metrics();
            let m = m.borrow();
            // A leader that has not heard from a quorum within its lease (openraft 0.9 has no
            // check-quorum: it leads on, cut off) does not stand in the way.
            let leads = m.state == openraft::ServerState::Leader
                && m.millis_since_quorum_ack.is_some_and(|ms| ms <= lease_ms);
            (m.current_term, leads)
        };
        let lease = Duration::from_millis(lease_ms);
        let refuse = |reason: String| pb::PreVoteResponse {
            granted: false,
            term,
            reason,
        };
        if self.withholds_vote(group_id) && !request.candidate_in_every_quorum {
            return refuse("this replica lost its data and withholds its votes".into());
        }
        if leads {
            return refuse("this replica leads the group, with a quorum".into());
        }
        if self.held(group_id, term) {
            return refuse("a transfer of the group's leadership is under way".into());
        }
        if let Some(silence) = self.silent_for(group_id).filter(|s| *s <= lease) {
            return refuse(format!(
                "this replica heard from a leader {} ms ago",
                silence.as_millis()
            ));
        }
        let candidate = request.last_log_id.map(wire::log_id_from);
        let own = self.last_log_id(group_id);
        if candidate < own {
            return refuse(format!(
                "the candidate's log ends at {}, this replica's at {}",
                describe(candidate.as_ref()),
                describe(own.as_ref())
            ));
        }
        pb::PreVoteResponse {
            granted: true,
            term,
            reason: String::new(),
        }
    }

    /// The last entry of group `group_id`'s log here (its last purged entry when it holds none).
    fn last_log_id(&self, group_id: GroupId) -> Option<openraft::LogId<NodeId>> {
        self.inner
            .readers
            .read()
            .ok()
            .and_then(|r| r.get(&group_id).cloned())
            .and_then(|reader| reader.last_log_id())
    }

    /// Holds this node's elections in group `group_id` (no standing, no pre-vote granted) for
    /// `hold` or until its term moves past `term`: a transfer of the group's leadership is under
    /// way (see [`Peers::hold_elections`]). A zero `hold` ends the hold named `id` only.
    fn hold_here(&self, group_id: GroupId, term: u64, hold: Duration, id: u64) {
        let Ok(mut holds) = self.inner.holds.lock() else {
            return;
        };
        if hold.is_zero() {
            if holds.get(&group_id).is_some_and(|h| h.id == id) {
                holds.remove(&group_id);
            }
            return;
        }
        // (Both locks, holds first as everywhere: a hold and a standby of different
        // transfers do not coexist. Ids grow within a leader's process, so in one term a
        // larger id is a later transfer: a late message of an earlier one changes nothing.)
        let Ok(mut standbys) = self.inner.standbys.lock() else {
            return;
        };
        if standbys
            .get(&group_id)
            .is_some_and(|s| s.term == term && s.id > id)
        {
            return;
        }
        if standbys.get(&group_id).is_some_and(|s| s.id != id) {
            standbys.remove(&group_id);
        }
        holds.insert(
            group_id,
            Hold {
                until: Instant::now() + hold,
                term,
                id,
            },
        );
    }

    /// Makes this node, the target of a transfer of group `group_id`'s leadership in term
    /// `term`, stand by itself after `stand_after` if its leader's Elect has not come by then
    /// (a zero `stand_after` forgets the standby named `id`: the transfer failed).
    fn stand_by(
        &self,
        group_id: GroupId,
        term: u64,
        stand_after: Duration,
        lease: Duration,
        id: u64,
    ) {
        // (Both locks, holds first: see `hold_here`.)
        let Ok(mut holds) = self.inner.holds.lock() else {
            return;
        };
        let Ok(mut standbys) = self.inner.standbys.lock() else {
            return;
        };
        if stand_after.is_zero() {
            if standbys.get(&group_id).is_some_and(|s| s.id == id) {
                standbys.remove(&group_id);
            }
            return;
        }
        if holds
            .get(&group_id)
            .is_some_and(|h| h.term == term && h.id > id)
        {
            return;
        }
        holds.remove(&group_id);
        let at = Instant::now() + stand_after;
        standbys.insert(
            group_id,
            Standby {
                at,
                until: at + lease,
                quiet: stand_after,
                term,
                id,
            },
        );
        drop(standbys);
        drop(holds);
        tracing::info!(
            group = group_id,
            term,
            "the target of a leadership transfer: standing by"
        );
    }

    /// Whether this node, the target of a transfer in group `group_id` (now in term `term`),
    /// should stand by itself now: the leader's Elect is overdue and the leader has been silent
    /// for the standby's time (at least a lease). Once only.
    fn standby_due(&self, group_id: GroupId, term: u64, lease: Duration) -> bool {
        let Ok(mut standbys) = self.inner.standbys.lock() else {
            return false;
        };
        let now = Instant::now();
        match standbys.get(&group_id) {
            None => false,
            Some(s) if s.term != term || now > s.until => {
                standbys.remove(&group_id);
                false
            }
            Some(s) if now < s.at => false,
            Some(s) => {
                // (Not used up by a leader that went quiet later than expected: it may still
                // until `until`.)
                let quiet = s.quiet.max(lease);
                let due = self
                    .silent_for(group_id)
                    .is_none_or(|silence| silence >= quiet);
                if due {
                    standbys.remove(&group_id);
                }
                due
            }
        }
    }

    /// Whether a transfer holds this node's elections in group `group_id`, now in term `term`.
    fn held(&self, group_id: GroupId, term: u64) -> bool {
        let Ok(mut holds) = self.inner.holds.lock() else {
            return false;
        };
        match holds.get(&group_id) {
            Some(h) if h.until > Instant::now() && h.term == term => true,
            Some(_) => {
                holds.remove(&group_id);
                false
            }
            None => false,
        }
    }

    /// On the leader of group `group_id` (`raft`), before it holds back its heartbeats to hand
    /// the leadership to `target`: asks every other voter but the target, and this node, to
    /// stand for no election and grant no pre-vote for `hold` (or until the term moves on; a
    /// zero `hold` ends the hold named `hold_id`: the transfer failed).
    /// Otherwise a follower whose lease runs out during the pause, as it must for the target to
    /// win, may stand first and take the leadership meant for the target (seen on a loaded
    /// 2-core machine). Best effort: a voter that does not answer in time (or a broker of an
    /// earlier version) is not waited for; it only races the target as before.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn hold_elections(
        &self,
        group_id: GroupId,
        raft: &Raft,
        target: NodeId,
        hold: Duration,
        stand_after: Duration,
        hold_id: u64,
        last_resort: bool,
    ) -> Option<String> {
        let (me, term, others) = {
            let m = raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let others: Vec<(NodeId, String)> = membership
                .voter_ids()
                .filter(|v| *v != m.id)
                .filter_map(|v| membership.get_node(&v).map(|n| (v, n.addr.clone())))
                .collect();
            (m.id, m.current_term, others)
        };
        self.hold_here(group_id, term, hold, hold_id);
        let timeout = Duration::from_millis(raft.config().heartbeat_interval).max(HOLD_ANSWER_MIN);
        let asked = others.into_iter().map(|(node, address)| {
            let request = pb::HoldElectionsRequest {
                group_id,
                leader_id: me,
                term,
                target,
                hold_ms: u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
                hold_id,
                // (The target holds nothing: it stands by instead.)
                stand_after_ms: if node == target {
                    u64::try_from(stand_after.as_millis()).unwrap_or(u64::MAX)
                } else {
                    0
                },
                last_resort,
            };
            async move {
                let answer = match self.raft_client(&address) {
                    Ok(mut client) => {
                        let call = client.hold_elections(self.request(node, request, timeout));
                        answer_within(timeout, call).await
                    }
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(a) if a.held => None,
                    Ok(a) if a.refused && node == target => Some(a.reason),
                    Ok(a) => {
                        tracing::debug!(
                            group = group_id,
                            node,
                            reason = a.reason,
                            "elections not held"
                        );
                        None
                    }
                    Err(e) => {
                        tracing::debug!(group = group_id, node, "elections not held: {e}");
                        None
                    }
                }
            }
        });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .flatten()
            .next()
    }

    /// This node grants a vote in group `group_id`: the candidate gets its time to win before
    /// this node stands itself. Returns what [`Peers::vote_refused`] needs to undo it: the
    /// instant set and the one before.
    fn voted_now(&self, group_id: GroupId) -> Option<(Instant, Option<Instant>)> {
        let mut clock = self.inner.election_clock.lock().ok()?;
        let entry = clock.get_mut(&group_id)?;
        let now = Instant::now();
        Some((now, entry.1.replace(now)))
    }

    /// The vote [`Peers::voted_now`] was set for before the decision (`marked`) was refused:
    /// the clock goes back to what it was, unless something set it since.
    fn vote_refused(&self, group_id: GroupId, marked: Option<(Instant, Option<Instant>)>) {
        if let Some((set, before)) = marked
            && let Ok(mut clock) = self.inner.election_clock.lock()
            && let Some(entry) = clock.get_mut(&group_id)
            && entry.1 == Some(set)
        {
            entry.1 = before;
        }
    }

    /// This node leads group `group_id` now (the election watch saw it). Once it no longer
    /// does, the next leader gets its time to win, and to be heard, before this node stands
    /// itself: a leader that handed its leadership over (a transfer) or met a higher term has
    /// heard from no other leader, and stood at once after stepping down (before the new
    /// leader's first heartbeat reached it, or the other voter's hold ended with the term),
    /// often winning the election meant for the transfer's target (seen on a loaded 2-core
    /// machine in 2 of 5 runs of the test
    /// `cluster::a_transfer_goes_to_its_target_even_when_the_target_is_slow_to_stand`).
    fn led_now(&self, group_id: GroupId) {
        let _ = self.voted_now(group_id);
    }

    /// Serves the log of group `group_id` to replicas catching up (ReadLog).
    pub(super) fn register_reader(&self, group_id: GroupId, reader: LogReader) {
        if let Ok(mut readers) = self.inner.readers.write() {
            readers.insert(group_id, reader);
        }
    }

    /// This node's id.
    pub(super) fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The node group `group_id` last received a snapshot from.
    pub(super) fn snapshot_sender(&self, group_id: GroupId) -> Option<NodeId> {
        self.inner
            .snapshot_from
            .lock()
            .ok()
            .and_then(|m| m.get(&group_id).copied())
    }

    /// Reads stored entries `from_index .. until_index` (about `max_bytes`) of group
    /// `group_id` from node `node` at `address`.
    pub(super) async fn read_log(
        &self,
        node: NodeId,
        address: &str,
        request: pb::ReadLogRequest,
        timeout: Duration,
    ) -> Result<pb::ReadLogResponse, String> {
        let mut client = self.raft_client(address)?;
        client
            .read_log(self.request(node, request, timeout))
            .await
            .map(Response::into_inner)
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    }

    pub(super) fn group(&self, group_id: GroupId) -> Result<Raft, Status> {
        self.inner
            .groups
            .read()
            .ok()
            .and_then(|g| g.get(&group_id).cloned())
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "Raft group {group_id} is not open on node {}",
                    self.inner.node_id
                ))
            })
    }

    fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut channels = self
            .inner
            .channels
            .lock()
            .map_err(|_| "peer channel table poisoned".to_string())?;
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let dialled = self
            .inner
            .upstreams
            .get(address)
            .map_or(address, String::as_str);
        // With TLS the URI stays http://: the TLS connector below does the handshake (tonic
        // refuses https:// URIs unless it does TLS itself, and its TLS does not reload).
        let endpoint = Endpoint::from_shared(format!("http://{dialled}"))
            .map_err(|e| format!("bad peer address {dialled:?}: {e}"))?
            .connect_timeout(self.inner.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .local_address(self.inner.local_ip);
        let connection = match &self.inner.tls {
            // TLS (peer mutual TLS): this broker's certificate, the peers' CA, the server
            // named by the address dialled (a sidecar upstream is a local proxy, which then
            // terminates it).
            Some(tls) => endpoint.connect_with_connector_lazy(weft_proto::tls::TlsConnector::new(
                tls.clone(),
                self.inner.local_ip,
                self.inner.connect_timeout,
            )),
            None => endpoint.connect_lazy(),
        };
        let channel = Channel::new(weft_proto::transport::Transport::new(connection));
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// Sends one group's AppendEntries to `target` at `address` through that peer's batcher
    /// (see `batch.rs`), and waits for its result.
    async fn append_batched(
        &self,
        target: NodeId,
        address: &str,
        request: pb::AppendEntriesRequest,
        urgent: bool,
        timeout: Duration,
    ) -> Result<pb::AppendEntriesResponse, Status> {
        let queue = {
            let mut batchers = self
                .inner
                .batchers
                .lock()
                .map_err(|_| Status::internal("batcher table poisoned"))?;
            batchers
                .entry((target, address.to_string()))
                .or_insert_with(|| super::batch::start(self.clone(), target, address.to_string()))
                .clone()
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        queue
            .send(super::batch::Pending {
                request,
                urgent,
                timeout,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("the peer's batcher stopped"))?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Status::unavailable("the peer's batcher dropped the append")),
            Err(_) => Err(Status::deadline_exceeded("AppendEntries timed out")),
        }
    }

    /// The lane of `target`'s large appends: one crosses the link at a time.
    fn large_lane(&self, target: NodeId) -> Arc<tokio::sync::Semaphore> {
        let mut lanes = self
            .inner
            .large_lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        lanes
            .entry(target)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1)))
            .clone()
    }

    /// Whether the broker `target` at `address` answers a health check on its peer port within
    /// `timeout` (over this node's connection to it, dialled if needed).
    pub async fn ping(&self, target: NodeId, address: &str, timeout: Duration) -> bool {
        let Ok(channel) = self.channel(address) else {
            return false;
        };
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let request = self.request(
            target,
            tonic_health::pb::HealthCheckRequest::default(),
            timeout,
        );
        // The peer port's health says SERVING for the whole server ("") while it runs.
        tokio::time::timeout(timeout, client.check(request))
            .await
            .is_ok_and(|answer| {
                answer.is_ok_and(|a| {
                    a.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                })
            })
    }

    /// A client of the `Raft` service of the broker at `address`.
    pub(super) fn raft_client(&self, address: &str) -> Result<RaftClient<Channel>, String> {
        Ok(RaftClient::new(self.channel(address)?)
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX))
    }

    /// A client of the `Forward` service of the broker at `address`.
    pub fn forward_client(
        &self,
        address: &str,
    ) -> Result<pb::forward_client::ForwardClient<Channel>, String> {
        Ok(
            pb::forward_client::ForwardClient::new(self.channel(address)?)
                .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX),
        )
    }

    /// A client of the `Controller` service of the broker at `address`.
    pub(super) fn controller_client(
        &self,
        address: &str,
    ) -> Result<pb::controller_client::ControllerClient<Channel>, String> {
        Ok(pb::controller_client::ControllerClient::new(
            self.channel(address)?,
        ))
    }

    /// Records the cluster's id as the controller stores it (empty: none yet).
    pub fn set_cluster_id(&self, id: &str) {
        if let Ok(mut ours) = self.inner.cluster_id.write()
            && *ours != id
        {
            *ours = id.to_string();
        }
    }

    /// A peer request to node `target`, with the cluster and target metadata and a deadline.
    pub fn request<T>(&self, target: NodeId, message: T, timeout: Duration) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(timeout);
        let metadata = request.metadata_mut();
        if let Ok(v) = self.inner.cluster_name.parse() {
            metadata.insert(CLUSTER_HEADER, v);
        }
        if let Ok(id) = self.inner.cluster_id.read()
            && !id.is_empty()
            && let Ok(v) = id.parse()
        {
            metadata.insert(CLUSTER_ID_HEADER, v);
        }
        if let Ok(v) = target.to_string().parse() {
            metadata.insert(TARGET_NODE_HEADER, v);
        }
        request
    }

    /// Checks that a peer call is meant for this cluster and node.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let metadata = request.metadata();
        let cluster = metadata
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if cluster != self.inner.cluster_name {
            return Err(Status::failed_precondition(format!(
                "this broker belongs to cluster {:?}, not {cluster:?}",
                self.inner.cluster_name
            )));
        }
        // Checked when both sides know the id (a broker still joining, or of a build before
        // the id was sent, knows none).
        let id = metadata
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Ok(ours) = self.inner.cluster_id.read()
            && !ours.is_empty()
            && !id.is_empty()
            && *ours != id
        {
            return Err(Status::failed_precondition(format!(
                "this broker belongs to cluster {:?} of id {ours}, not to the one of id {id}",
                self.inner.cluster_name
            )));
        }
        let target = metadata
            .get(TARGET_NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<NodeId>().ok());
        if target != Some(self.inner.node_id) {
            return Err(Status::failed_precondition(format!(
                "this broker is node {}, not {}",
                self.inner.node_id,
                target.map_or_else(|| "unnamed".to_string(), |t| t.to_string())
            )));
        }
        Ok(())
    }
}

/// The network of one group: clients to the group's peers.
#[derive(Debug, Clone)]
pub(super) struct Network {
    group_id: GroupId,
    peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            group_id: self.group_id,
            target,
            address: node.addr.clone(),
            peers: self.peers.clone(),
            last_entries: None,
            large: None,
            stalled: None,
        }
    }
}

/// One group's client of one peer (sharing the node's connection to that peer).
#[derive(Debug)]
pub(super) struct PeerClient {
    group_id: GroupId,
    target: NodeId,
    address: String,
    peers: Peers,
    /// When this group last sent this peer entries.
    last_entries: Option<Instant>,
    /// The append of one large entry still on its way, or answered a moment ago (see
    /// [`LargeAppend`]).
    large: Option<LargeAppend>,
    /// The last single entry that found no answer in time, how many of its own calls ran out
    /// of time, and when its first append started: its next append goes as a call of its own,
    /// given longer each time.
    stalled: Option<Stalled>,
}

/// An AppendEntries of one entry of at least [`LARGE_APPEND_BYTES`] (or one that found no answer
/// in time through the batcher), sent as a call of its own in a task that outlives openraft's
/// wait. openraft gives every append one heartbeat interval and then sends the same entry again:
/// an entry that takes longer to cross the link and be made durable there (8 MiB over 100
/// Mbit/s: 0.7 s) was cut off and sent again, forever. Its retries of the same entry (same vote,
/// same previous log id), alone or followed by later entries, wait for this call instead, so
/// each retry gets a turn at the answer, and the entry crosses once. The task keeps its answer
/// for a moment after it finishes (openraft's retry may come up to a heartbeat interval after
/// the last wait gave up). A peer's large appends cross one at a time (`Peers::large_lane`):
/// each call's deadline counts from when its turn comes, so several groups' large entries to
/// one slow peer do not share its bandwidth and run out of time together, again and again.
#[derive(Debug)]
struct LargeAppend {
    key: LargeAppendKey,
    /// When the first append of this entry asked for it (for `weft_raft_rpc_seconds`).
    started: Instant,
    /// How many large appends of this entry ran out of time before this one.
    attempts: u32,
    task: tokio::task::JoinHandle<Result<pb::AppendEntriesResponse, Status>>,
    /// When the task finished (set by it).
    finished: Arc<std::sync::OnceLock<Instant>>,
}

/// An entry whose append found no answer in time (see [`PeerClient::stalled`]).
#[derive(Debug, Clone, Copy)]
struct Stalled {
    key: LargeAppendKey,
    attempts: u32,
    started: Instant,
}

/// The most a call of its own is given beyond what the entry needs at
/// [`LARGE_APPEND_BYTES_PER_SEC`], however often it ran out of time before.
const LARGE_APPEND_EXTRA_MAX: Duration = Duration::from_secs(30);

type LargeAppendKey = (
    openraft::Vote<NodeId>,
    Option<openraft::LogId<NodeId>>,
    openraft::LogId<NodeId>,
);

impl Drop for LargeAppend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

fn network_error<E: std::error::Error>(
    message: impl std::fmt::Display,
) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&AnyError::error(message.to_string())))
}

fn status_error<E: std::error::Error>(status: &Status) -> RPCError<NodeId, BasicNode, E> {
    let error = AnyError::error(format!("{}: {}", status.code(), status.message()));
    match status.code() {
        // Not listening, refused or not open there: back off before retrying.
        tonic::Code::Unavailable | tonic::Code::FailedPrecondition => {
            RPCError::Unreachable(Unreachable::new(&error))
        }
        _ => RPCError::Network(NetworkError::new(&error)),
    }
}

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, String> {
        self.peers.raft_client(&self.address)
    }

    /// The peer's answer to an append sent `started`, of `count` entries.
    fn answered(
        &self,
        sent: Result<pb::AppendEntriesResponse, Status>,
        started: Instant,
        count: u64,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let peer = self.target.to_string();
        metrics::histogram!("weft_raft_rpc_seconds", "rpc" => "append_entries", "peer" => peer.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("weft_raft_append_entries_per_call", "peer" => peer)
            .record(count as f64);
        let response = sent.map_err(|s| status_error(&s))?;
        let response = wire::append_response_from(response).map_err(network_error)?;
        if !matches!(response, AppendEntriesResponse::HigherVote(_)) {
            self.peers.touch(self.group_id, self.target);
        }
        Ok(response)
    }

    /// Starts the append of one entry (`message`, `size` encoded bytes) as a call of its own,
    /// given a heartbeat interval (`ttl`) plus as long as the entry needs at
    /// [`LARGE_APPEND_BYTES_PER_SEC`], twice that for each earlier call of it that ran out of
    /// time (at most [`LARGE_APPEND_EXTRA_MAX`] more). An entry of [`LARGE_APPEND_BYTES`] or
    /// more waits for the peer's lane (one at a time), and its time counts from its turn; a
    /// smaller one (it stalled in the batcher) goes at once.
    fn start_large(
        &mut self,
        key: LargeAppendKey,
        message: pb::AppendEntriesRequest,
        size: usize,
        ttl: Duration,
        started: Instant,
    ) -> RpcResult<()> {
        let (attempts, started) = match self.stalled {
            Some(stalled) if stalled.key == key => (stalled.attempts, stalled.started),
            _ => (0, started),
        };
        let base = ttl + Duration::from_secs_f64(size as f64 / LARGE_APPEND_BYTES_PER_SEC);
        let limit = base + (base * ((1 << attempts.min(4)) - 1)).min(LARGE_APPEND_EXTRA_MAX);
        // Unreachable (openraft backs off), as the batcher reports it.
        let mut client = self
            .peers
            .raft_client(&self.address)
            .map_err(|e| status_error(&Status::unavailable(e)))?;
        let (peers, target) = (self.peers.clone(), self.target);
        let lane = (size >= LARGE_APPEND_BYTES).then(|| peers.large_lane(target));
        let finished = Arc::new(std::sync::OnceLock::new());
        let done = finished.clone();
        metrics::counter!("weft_raft_large_appends_total", "peer" => target.to_string())
            .increment(1);
        let task = tokio::spawn(async move {
            let turn = match lane {
                Some(lane) => lane.acquire_owned().await.map(Some),
                None => Ok(None),
            };
            let answer = match turn {
                Ok(_turn) => {
                    let request = peers.request(target, message, limit);
                    tokio::time::timeout(limit, client.append_entries(request))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Status::deadline_exceeded(format!(
                                "no answer from node {target} within {} ms",
                                limit.as_millis()
                            )))
                        })
                        .map(Response::into_inner)
                }
                Err(_) => Err(Status::unavailable("the peer's large-append lane closed")),
            };
            let _ = done.set(Instant::now());
            answer
        });
        self.large = Some(LargeAppend {
            key,
            started,
            attempts,
            task,
            finished,
        });
        Ok(())
    }

    /// Waits for the running large append's answer a little less than `ttl`, as for other
    /// appends; a call still running then is kept for openraft's retry. Returns the answer and
    /// when the entry's first append started.
    async fn join_large(
        &mut self,
        ttl: Duration,
    ) -> RpcResult<(Result<pb::AppendEntriesResponse, Status>, Instant)> {
        let Some(large) = self.large.as_mut() else {
            return Err(network_error("no large append to wait for"));
        };
        match tokio::time::timeout(ttl.mul_f64(0.9), &mut large.task).await {
            Ok(joined) => {
                let (key, started, attempts) = (large.key, large.started, large.attempts);
                self.large = None;
                let answer = joined
                    .unwrap_or_else(|e| Err(Status::internal(format!("the call failed: {e}"))));
                if answer
                    .as_ref()
                    .is_err_and(|s| s.code() == tonic::Code::DeadlineExceeded)
                {
                    self.stalled = Some(Stalled {
                        key,
                        attempts: attempts + 1,
                        started,
                    });
                }
                Ok((answer, started))
            }
            Err(_) => {
                metrics::counter!("weft_raft_large_append_waits_total", "peer" => self.target.to_string())
                    .increment(1);
                Err(network_error(format!(
                    "entry {} is still on its way; openraft's retry will wait for it",
                    large.key.2
                )))
            }
        }
    }

    fn request<T>(&self, message: T, option: &RPCOption) -> Request<T> {
        self.peers.request(self.target, message, option.hard_ttl())
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let count = rpc.entries.len() as u64;
        let message = wire::append_to(self.group_id, &rpc).map_err(network_error)?;
        let size = prost::Message::encoded_len(&message);
        if size > PEER_MESSAGE_BYTES_MAX && count > 1 {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(count / 2),
            ));
        }
        let started = Instant::now();
        if count > 0 {
            self.last_entries = Some(started);
        }
        let ttl = option.hard_ttl();
        // A large append this request does not continue goes: a new vote, an entry the follower
        // has since taken, an answer kept past its moment.
        if self.large.as_ref().is_some_and(|large| {
            large.key.0 != rpc.vote
                || rpc
                    .prev_log_id
                    .is_some_and(|prev| prev.index >= large.key.2.index)
                || large
                    .finished
                    .get()
                    .is_some_and(|at| started.duration_since(*at) > ttl)
        }) {
            self.large = None;
        }
        let key = rpc
            .entries
            .first()
            .map(|entry| (rpc.vote, rpc.prev_log_id, entry.log_id));
        if let Some(key) = key {
            if self.large.as_ref().is_some_and(|large| large.key == key) {
                // openraft's retry of an entry on its way (alone, or followed by later entries
                // once its hint for fewer entries ran out): wait for it; it answers for that
                // entry.
                let (sent, first) = self.join_large(ttl).await?;
                let response = self.answered(sent, first, 1)?;
                return Ok(match response {
                    AppendEntriesResponse::Success if count > 1 => {
                        AppendEntriesResponse::PartialSuccess(Some(key.2))
                    }
                    other => other,
                });
            }
            let stalled = self.stalled.is_some_and(|stalled| stalled.key == key);
            if count > 1 && stalled {
                // Its own call ended without the entry crossing (or it stalled in the batcher):
                // not again with later entries through the batcher, but alone.
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(1),
                ));
            }
            if count == 1 && (size >= LARGE_APPEND_BYTES || stalled) {
                self.start_large(key, message, size, ttl, started)?;
                let (sent, first) = self.join_large(ttl).await?;
                return self.answered(sent, first, count);
            }
        }
        // A busy group's empty appends carry its commit index and go at once; an idle group's
        // heartbeats may wait a moment for others to the same peer.
        let urgent = self
            .last_entries
            .is_some_and(|t| started.duration_since(t) < BUSY_WINDOW);
        // Our own deadline comes a little before openraft's (which would drop this call and
        // retry the same entries): an append of several entries that found no answer in time
        // (a slow link, a busy peer) is retried at once with half as many.
        let ttl = ttl.mul_f64(0.9);
        let sent = tokio::time::timeout(
            ttl,
            self.peers
                .append_batched(self.target, &self.address, message, urgent, ttl),
        )
        .await;
        // Halved only on this timer (or the batcher's, of the same length): not when the
        // connection broke (Cancelled at once), nor for another error the peer or the batcher
        // reported.
        let sent = match sent {
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => None,
            Ok(sent) => Some(sent),
            Err(_) => None,
        };
        let Some(sent) = sent else {
            if count <= 1 {
                // A single entry that did not cross in time goes on its own next time.
                if let Some(key) = key {
                    self.stalled = Some(Stalled {
                        key,
                        attempts: 0,
                        started,
                    });
                }
                return Err(network_error("no answer in time"));
            }
            metrics::counter!("weft_raft_append_halved_total", "peer" => self.target.to_string())
                .increment(1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(count / 2),
            ));
        };
        self.answered(sent, started, count)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let message = wire::snapshot_to(self.group_id, &rpc);
        let mut client = self.client().map_err(network_error)?;
        let response = client
            .install_snapshot(self.request(message, &option))
            .await
            .map_err(|s| status_error(&s))?;
        let vote = wire::vote_from(response.into_inner().vote).map_err(network_error)?;
        Ok(InstallSnapshotResponse { vote })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let mut message = wire::vote_request_to(self.group_id, &rpc);
        message.candidate_in_every_quorum = self.peers.candidate_in_every_quorum(self.group_id);
        let mut client = self.client().map_err(network_error)?;
        let response = client
            .vote(self.request(message, &option))
            .await
            .map_err(|s| status_error(&s))?;
        let response = wire::vote_response_from(response.into_inner()).map_err(network_error)?;
        if response.vote_granted {
            self.peers.touch(self.group_id, self.target);
        }
        Ok(response)
    }
}

/// `weft.internal.v1.Raft` on the peer port: hands each call to the group it names.
#[derive(Debug, Clone)]
pub struct RaftService {
    peers: Peers,
}

impl RaftService {
    /// Serves the groups registered in `peers`.
    pub fn new(peers: Peers) -> RaftService {
        RaftService { peers }
    }
}

impl RaftService {
    /// One group's AppendEntries.
    async fn append_one(
        &self,
        message: pb::AppendEntriesRequest,
    ) -> Result<pb::AppendEntriesResponse, Status> {
        let started = Instant::now();
        let raft = self.peers.group(message.group_id)?;
        let group_id = message.group_id;
        let rpc = wire::append_from(message).map_err(malformed)?;
        let with_entries = !rpc.entries.is_empty();
        let leader_commit = rpc.leader_commit.map_or(0, |l| l.index);
        let leader_term = rpc.vote.leader_id().term;
        let response = raft.append_entries(rpc).await.map_err(raft_failed)?;
        // Heard from a leader: one in this replica's term or a later one (an append that a
        // higher vote here refused came from a deposed leader, which steps down on the answer:
        // its commit index is no target to catch up to either).
        if !matches!(response, AppendEntriesResponse::HigherVote(_)) {
            self.peers.heard_now(group_id);
            self.peers
                .heard_leader(group_id, leader_term, leader_commit);
            if group_id == super::CONTROLLER_GROUP
                && let Ok(mut heard) = self.peers.inner.controller_commit_heard.lock()
            {
                *heard = (*heard).max(Some(leader_commit));
            }
        }
        if with_entries {
            // On the follower: from the call's arrival to the entries stored and synced.
            metrics::histogram!("weft_raft_append_serve_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        Ok(wire::append_response_to(&response))
    }
}

/// The most bytes of one snapshot a group receives (a partition's snapshot holds its producer
/// table and a controller's its topics and committed offsets: far smaller).
const SNAPSHOT_RECEIVED_BYTES_MAX: u64 = 1 << 30;

fn malformed(e: wire::Malformed) -> Status {
    Status::invalid_argument(e.to_string())
}

fn raft_failed(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the Raft group cannot take the call: {e}"))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        self.peers.check(&request)?;
        Ok(Response::new(self.append_one(request.into_inner()).await?))
    }

    async fn append_entries_batch(
        &self,
        request: Request<pb::AppendEntriesBatchRequest>,
    ) -> Result<Response<pb::AppendEntriesBatchResponse>, Status> {
        self.peers.check(&request)?;
        let requests = request.into_inner().requests;
        let results = futures::future::join_all(requests.into_iter().map(|message| async move {
            match self.append_one(message).await {
                Ok(response) => pb::AppendEntriesResult {
                    response: Some(response),
                    ..pb::AppendEntriesResult::default()
                },
                Err(status) => pb::AppendEntriesResult {
                    response: None,
                    code: status.code() as i32,
                    message: status.message().to_string(),
                },
            }
        }))
        .await;
        Ok(Response::new(pb::AppendEntriesBatchResponse { results }))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.peers.check(&request)?;
        let message = request.into_inner();
        let raft = self.peers.group(message.group_id)?;
        if self.peers.withholds_vote(message.group_id) && !message.candidate_in_every_quorum {
            return Err(Status::unavailable(format!(
                "node {} lost its data and withholds its vote in group {} until it has caught up",
                self.peers.inner.node_id, message.group_id
            )));
        }
        let group_id = message.group_id;
        let rpc = wire::vote_request_from(message).map_err(malformed)?;
        // Counted as granted before openraft decides: it moves this node to the candidate's
        // term as it grants, and the election watch, seeing a new term with no leader heard
        // and no hold (a hold ends with its term), could otherwise ask for pre-votes in
        // between and take the election from the candidate. Undone if refused.
        let marked = self.peers.voted_now(group_id);
        let response = raft.vote(rpc).await;
        if !matches!(&response, Ok(r) if r.vote_granted) {
            self.peers.vote_refused(group_id, marked);
        }
        let response = response.map_err(raft_failed)?;
        Ok(Response::new(wire::vote_response_to(&response)))
    }

    async fn pre_vote(
        &self,
        request: Request<pb::PreVoteRequest>,
    ) -> Result<Response<pb::PreVoteResponse>, Status> {
        self.peers.check(&request)?;
        let message = request.into_inner();
        let raft = self.peers.group(message.group_id)?;
        Ok(Response::new(self.peers.answer_pre_vote(&raft, &message)))
    }

    async fn hold_elections(
        &self,
        request: Request<pb::HoldElectionsRequest>,
    ) -> Result<Response<pb::HoldElectionsResponse>, Status> {
        self.peers.check(&request)?;
        let message = request.into_inner();
        let raft = self.peers.group(message.group_id)?;
        let (term, leader) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.current_term, m.current_leader)
        };
        if term != message.term || leader != Some(message.leader_id) {
            return Ok(Response::new(pb::HoldElectionsResponse {
                held: false,
                reason: format!(
                    "this replica is in term {term} with leader {leader:?}, not term {} with leader {}",
                    message.term, message.leader_id
                ),
                refused: false,
            }));
        }
        // At most a few leases, whatever the leader asked (0 ends a hold).
        let lease = Duration::from_millis(raft.config().election_timeout_max);
        let cap = lease.saturating_mul(4);
        if message.target == self.peers.inner.node_id {
            if message.hold_ms != 0 && self.peers.draining() && !message.last_resort {
                return Ok(Response::new(pb::HoldElectionsResponse {
                    held: false,
                    reason: self.peers.draining_refusal(),
                    refused: true,
                }));
            }
            let stand_after = if message.hold_ms == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(message.stand_after_ms).min(cap)
            };
            if message.hold_ms != 0 && stand_after.is_zero() {
                // (A leader of an earlier version asks the target to hold: it holds nothing.)
                return Ok(Response::new(pb::HoldElectionsResponse {
                    held: false,
                    reason: "this replica is the transfer's target".into(),
                    refused: false,
                }));
            }
            self.peers
                .stand_by(message.group_id, term, stand_after, lease, message.hold_id);
            return Ok(Response::new(pb::HoldElectionsResponse {
                held: false,
                reason: "this replica is the transfer's target: it stands by".into(),
                refused: false,
            }));
        }
        let hold = Duration::from_millis(message.hold_ms).min(cap);
        self.peers
            .hold_here(message.group_id, term, hold, message.hold_id);
        Ok(Response::new(pb::HoldElectionsResponse {
            held: true,
            reason: String::new(),
            refused: false,
        }))
    }

    async fn read_log(
        &self,
        request: Request<pb::ReadLogRequest>,
    ) -> Result<Response<pb::ReadLogResponse>, Status> {
        self.peers.check(&request)?;
        let message = request.into_inner();
        let reader = self
            .peers
            .inner
            .readers
            .read()
            .ok()
            .and_then(|r| r.get(&message.group_id).cloned())
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "the log of group {} is not open here",
                    message.group_id
                ))
            })?;
        let max_bytes = usize::try_from(message.max_bytes)
            .unwrap_or(usize::MAX)
            .clamp(1, READ_LOG_BYTES_MAX);
        let read = tokio::task::spawn_blocking(move || {
            reader.with_log(|log| {
                let first = log.first_index().unwrap_or(log.end().next_index);
                let from = message.from_index.max(first);
                log.read_entries(from, message.until_index, max_bytes)
                    .map(|batches| (first, batches))
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::unavailable(format!("cannot read the log: {e}")))?;
        let (first_index, batches) = read;
        Ok(Response::new(pb::ReadLogResponse {
            first_index,
            batches: batches.iter().map(|b| b.bytes().clone()).collect(),
        }))
    }

    async fn elect(
        &self,
        request: Request<pb::ElectRequest>,
    ) -> Result<Response<pb::ElectResponse>, Status> {
        self.peers.check(&request)?;
        let raft = self.peers.group(request.get_ref().group_id)?;
        let asked = request.get_ref();
        if asked.term != 0 {
            // A call that comes late (another election ran meanwhile) or twice must not make
            // this node stand against the leader elected since: 0.9 leaders step down for a
            // higher term, and the group would have none until the next election.
            let (term, leader, voted_for) = {
                let metrics = raft.metrics().borrow().clone();
                let voted_for = metrics.vote.leader_id().voted_for();
                (metrics.current_term, metrics.current_leader, voted_for)
            };
            let me = self.peers.node_id();
            if term > asked.term && (leader == Some(me) || voted_for == Some(me)) {
                // Standing already (it stood by itself when this call was slow to come): done.
                return Ok(Response::new(pb::ElectResponse {}));
            }
            if term != asked.term || leader.is_some_and(|l| l != asked.leader_id) {
                return Err(Status::failed_precondition(format!(
                    "a stale call to stand: it is for term {} under node {}; this node is in \
                     term {term} under {}",
                    asked.term,
                    asked.leader_id,
                    leader.map_or_else(|| "no known leader".to_string(), |l| format!("node {l}"))
                )));
            }
        }
        // (Its answer to the hold said so already; a leader that did not ask first learns it
        // here.)
        if self.peers.draining() && !request.get_ref().last_resort {
            return Err(Status::failed_precondition(self.peers.draining_refusal()));
        }
        // The leader's call came: no standing by itself any more.
        if let Ok(mut standbys) = self.peers.inner.standbys.lock() {
            standbys.remove(&request.get_ref().group_id);
        }
        if let Some(delay) = elect_delay() {
            tokio::time::sleep(delay).await;
        }
        raft.trigger().elect().await.map_err(raft_failed)?;
        Ok(Response::new(pb::ElectResponse {}))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotChunk>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        self.peers.check(&request)?;
        let message = request.into_inner();
        let raft = self.peers.group(message.group_id)?;
        let group_id = message.group_id;
        let rpc = wire::snapshot_from(message).map_err(malformed)?;
        // openraft writes a chunk at its offset into the snapshot's buffer, which grows to the
        // offset first: a chunk far past what came (a peer's defect, or a forged call) would
        // make the broker allocate without limit. Chunks follow each other, bounded in total.
        let id = rpc.meta.snapshot_id.clone();
        let end = rpc.offset.saturating_add(rpc.data.len() as u64);
        if end > SNAPSHOT_RECEIVED_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "snapshot {id:?} would exceed {SNAPSHOT_RECEIVED_BYTES_MAX} bytes (chunk ending at {end})"
            )));
        }
        // Counted before openraft takes the chunk (a call cancelled while it writes must not
        // leave the count behind what was written), when openraft will take it: its vote is
        // not below this node's (openraft's own test). A vote that rises meanwhile at most lets
        // one chunk more through, and the total stays bounded. Checked and counted under one
        // lock: two chunks at once (of two snapshots) see each other's count.
        let current = raft.metrics().borrow().vote;
        let taken = rpc.vote >= current;
        {
            let mut received = self
                .peers
                .inner
                .snapshot_received
                .lock()
                .map_err(|_| Status::internal("snapshot counts lock poisoned"))?;
            let bytes = received
                .get(&group_id)
                .filter(|(at, _)| *at == id)
                .map(|(_, bytes)| *bytes);
            if rpc.offset > 0 && bytes.is_none_or(|bytes| rpc.offset > bytes) {
                return Err(Status::invalid_argument(format!(
                    "snapshot {id:?} chunk at offset {} does not follow the {} bytes received",
                    rpc.offset,
                    bytes.unwrap_or(0)
                )));
            }
            if taken {
                let bytes = if rpc.offset == 0 {
                    0
                } else {
                    bytes.unwrap_or(0)
                };
                received.insert(group_id, (id, bytes.max(end)));
            }
        }
        // A leader sending a snapshot is heard from, like one sending entries; a deposed one
        // (its chunks refused) is not, nor is it a source to fill the log from.
        if taken {
            self.peers.heard_now(group_id);
            if let (Some(leader), Ok(mut senders)) = (
                rpc.vote.leader_id().voted_for(),
                self.peers.inner.snapshot_from.lock(),
            ) {
                senders.insert(group_id, leader);
            }
        }
        let response = raft.install_snapshot(rpc).await.map_err(raft_failed)?;
        Ok(Response::new(pb::InstallSnapshotResponse {
            vote: Some(wire::vote_to(&response.vote)),
        }))
    }
}

#[cfg(test)]
mod cluster_id_tests {
    use super::*;

    /// A peer call from another cluster of the same name (the default) is refused once both
    /// sides know their cluster's id. Before, the name alone was checked, so a recycled
    /// address reached a broker of the same node id in another cluster and was served.
    #[test]
    fn a_call_from_a_cluster_of_the_same_name_and_another_id_is_refused() {
        let ours = Peers::new(2, "weft", None, HashMap::new(), None);
        let theirs = Peers::new(1, "weft", None, HashMap::new(), None);
        let call = |from: &Peers| from.request(2, (), Duration::from_secs(1));
        assert!(ours.check(&call(&theirs)).is_ok(), "no id known yet");
        ours.set_cluster_id("id-ours");
        assert!(
            ours.check(&call(&theirs)).is_ok(),
            "the caller knows none yet"
        );
        theirs.set_cluster_id("id-theirs");
        let refused = ours.check(&call(&theirs)).expect_err("another cluster");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("id-theirs"), "{refused:?}");
        theirs.set_cluster_id("id-ours");
        assert!(ours.check(&call(&theirs)).is_ok(), "the same cluster");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hold lasts its time, in its term only, and a zero hold ends it (a failed transfer).
    #[test]
    fn a_hold_ends_with_its_time_its_term_or_a_release() {
        let peers = Peers::new(1, "test", None, HashMap::new(), None);
        let minute = Duration::from_secs(60);
        assert!(!peers.held(7, 3), "nothing held yet");
        peers.hold_here(7, 3, minute, 1);
        assert!(peers.held(7, 3));
        assert!(!peers.held(8, 3), "another group");
        assert!(!peers.held(7, 4), "the term moved on");
        assert!(!peers.held(7, 3), "a hold the term left behind is gone");
        peers.hold_here(7, 3, minute, 1);
        peers.hold_here(7, 3, Duration::ZERO, 1);
        assert!(!peers.held(7, 3), "released");
        // A failed transfer's late release does not end the next transfer's hold.
        peers.hold_here(7, 3, minute, 3);
        peers.hold_here(7, 3, Duration::ZERO, 1);
        assert!(peers.held(7, 3), "another transfer's release");
        peers.hold_here(7, 3, Duration::ZERO, 3);
        assert!(!peers.held(7, 3), "its own release");
        peers.hold_here(7, 3, Duration::from_millis(30), 5);
        std::thread::sleep(Duration::from_millis(40));
        assert!(!peers.held(7, 3), "ran out");
        peers.hold_here(7, 3, minute, 7);
        peers.unregister(7);
        assert!(!peers.held(7, 3), "the group closed here");
        assert_ne!(new_hold_id(), new_hold_id());
    }

    /// A replica that lost its data catches up to the commit index sent by the leader of the
    /// highest term it heard: a deposed leader heard first (cut off from its successor, not
    /// from this replica) may not know of entries its successor committed.
    #[test]
    fn a_later_leaders_commit_raises_the_catch_up_target() {
        let peers = Peers::new(1, "test", None, HashMap::new(), None);
        peers.set_recovery(Recovery::Rejoining);
        let gate = |peers: &Peers| peers.inner.recovery.lock().unwrap().1.get(&7).copied();
        assert_eq!(gate(&peers), None);
        peers.heard_leader(7, 5, 8);
        assert_eq!(gate(&peers), Some(Gate::CatchingUp { target: 8, term: 5 }));
        peers.heard_leader(7, 5, 9);
        assert_eq!(
            gate(&peers),
            Some(Gate::CatchingUp { target: 8, term: 5 }),
            "the same leader's later commits are no target (it would move for ever)"
        );
        peers.heard_leader(7, 6, 10);
        assert_eq!(
            gate(&peers),
            Some(Gate::CatchingUp {
                target: 10,
                term: 6
            })
        );
        peers.heard_leader(7, 7, 4);
        assert_eq!(
            gate(&peers),
            Some(Gate::CatchingUp {
                target: 10,
                term: 7
            }),
            "never lowered"
        );
        peers.heard_leader(7, 5, 30);
        assert_eq!(
            gate(&peers),
            Some(Gate::CatchingUp {
                target: 10,
                term: 7
            })
        );
        assert!(peers.withholds_vote(7), "group 7 has applied nothing here");
    }

    /// A candidate is in every majority only where each voter set it belongs to has at most
    /// two voters including it: a withholding replica may grant it then (every committed entry
    /// was acknowledged by it), and never otherwise.
    #[test]
    fn every_majority_includes_a_candidate_only_in_sets_of_two_or_one() {
        use std::collections::BTreeSet;
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<NodeId>>();
        assert!(in_every_majority(&[set(&[1])], 1), "the only voter");
        assert!(in_every_majority(&[set(&[1, 2])], 1), "one of two");
        assert!(in_every_majority(&[set(&[1, 2])], 2), "the other of two");
        assert!(
            !in_every_majority(&[set(&[1, 2, 3])], 1),
            "2 and 3 are a majority of three"
        );
        assert!(
            !in_every_majority(&[set(&[2, 3])], 1),
            "not a voter: a learner"
        );
        assert!(
            !in_every_majority(&[set(&[2])], 1),
            "another's group of one"
        );
        assert!(!in_every_majority(&[], 1), "no membership yet");
        // Joint memberships: every half must hold.
        assert!(
            in_every_majority(&[set(&[1, 2]), set(&[1, 3])], 1),
            "in both pairs of a replacement"
        );
        assert!(
            in_every_majority(&[set(&[1, 2]), set(&[1])], 1),
            "shrinking from two to one"
        );
        assert!(
            !in_every_majority(&[set(&[1, 2]), set(&[1, 2, 3])], 1),
            "growing from two to three: 2 and 3 are a majority of the new half"
        );
        assert!(
            !in_every_majority(&[set(&[1, 2, 3]), set(&[1, 2])], 1),
            "shrinking from three to two: 2 and 3 are a majority of the old half"
        );
        assert!(
            !in_every_majority(&[set(&[1, 2]), set(&[2, 3])], 1),
            "not a voter of the new half"
        );
        assert!(
            !in_every_majority(&[set(&[2, 3]), set(&[1, 2])], 1),
            "not a voter of the old half"
        );
    }
}
