//! The controller group's state machine: the cluster's topics and their partitions' Raft groups.
//! Applying a command is deterministic; inputs were validated before they were proposed, and the
//! checks that depend on state (exists / not found) are made here, in log order.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{BasicNode, EntryPayload, OptionalSend, RaftSnapshotBuilder, StoredMembership};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    Command, Entry, GroupId, LogId, NodeId, Response, StorageError, StoredSnapshot, TypeConfig,
    current_snapshot, sm_error,
};
use crate::topic::TopicConfig;
use weft_storage::LogConfig;

/// One partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// Partition number.
    pub partition: u32,
    /// Its Raft group.
    pub group_id: GroupId,
    /// Nodes holding a replica (during a move: the old replicas, then the new ones).
    pub replicas: Vec<NodeId>,
    /// While the partition's replicas move: the replicas it moves to (the first is its
    /// preferred leader once the move is done). The partition's leader adds the new ones as
    /// learners, waits until they caught up, makes them the voters, and then proposes
    /// [`ControllerCommand::FinishMove`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<NodeId>>,
    /// While the partition's replicas move: the replicas the move added (not replicas before
    /// it). Planning reads it (a removal plans again a move stalled on a new replica that went
    /// down); no decision applied depends on it, so a state without it (written by an older
    /// build) only plans less.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adding: Vec<NodeId>,
}

/// A topic as the controller stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    /// Name.
    pub name: String,
    /// Unique id (distinct from an earlier topic of the same name).
    pub topic_id: String,
    /// Configuration in force.
    pub config: TopicConfig,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Partitions, in order.
    pub partitions: Vec<PartitionMeta>,
}

/// The topic a change was made from: its id and its configuration then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicBase {
    /// The topic's id.
    pub topic_id: String,
    /// Its configuration.
    pub config: TopicConfig,
}

/// A change to cluster metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerCommand {
    /// Create a topic on `replicas` (node ids, one list per partition).
    CreateTopic {
        /// Name.
        name: String,
        /// Unique id, chosen by the proposer.
        topic_id: String,
        /// Validated configuration.
        config: TopicConfig,
        /// Creation time.
        created_at_ms: i64,
        /// Replica placement per partition.
        replicas: Vec<Vec<NodeId>>,
        /// `replicas` stands when applied, if it is still valid then ([`PLACEMENT_LEVEL`]):
        /// the proposer placed the replicas and preferred leaders on the brokers it saw up.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        as_proposed: bool,
        /// The proposer's `partition_replicas_max` ([`REPLICAS_MAX_LEVEL`]): refused when
        /// applied if it would give a broker more partition replicas (None: not checked).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replicas_max: Option<u64>,
    },
    /// Replace a topic's configuration (partitions may only grow).
    UpdateTopic {
        /// Name.
        name: String,
        /// New configuration.
        config: TopicConfig,
        /// Placement of added partitions.
        new_replicas: Vec<Vec<NodeId>>,
        /// `new_replicas` stands when applied, if it is still valid then
        /// ([`PLACEMENT_LEVEL`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        as_proposed: bool,
        /// The topic the change was made from ([`UPDATE_BASE_LEVEL`]): when applied, a topic
        /// that is no longer this one (changed, or deleted and created again) is left as it is
        /// and the proposer is told ([`ControllerResponse::Changed`]), so a change never undoes
        /// another that came between its read and its commit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base: Option<TopicBase>,
        /// The proposer's `partition_replicas_max`, checked for the added partitions' replicas
        /// when applied ([`REPLICAS_MAX_LEVEL`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replicas_max: Option<u64>,
    },
    /// Delete a topic.
    DeleteTopic {
        /// Name.
        name: String,
    },
    /// Mark a broker as draining (or not): leaderships are not moved back to a draining broker.
    SetDraining {
        /// Its node id.
        node_id: NodeId,
        /// Draining or not.
        draining: bool,
    },
    /// Store a consumer group's committed offsets on one topic (checked by the group's
    /// coordinator before it proposes; applied only if no offset goes backwards).
    CommitOffsets {
        /// Group id.
        group: String,
        /// The topic's id.
        topic_id: String,
        /// The generation the commit was made in (0 from outside membership).
        generation: u64,
        /// (partition, offset) pairs.
        offsets: Vec<(u32, u64)>,
        /// Set the offsets even where they go backwards (an operator's reset of a group with
        /// no members).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reset: bool,
        /// The proposer's wall clock (ms since the epoch): the group was active then (its
        /// offsets' retention counts from the latest such time). 0: not said. An older build
        /// ignores it (its replica keeps no such time: only retention reads it, and takes a
        /// missing time as unknown). A commit with no offsets only stamps the group (the
        /// coordinator's way of noting a group with members active now and then).
        #[serde(default, skip_serializing_if = "is_zero")]
        at_ms: u64,
    },

    /// Forget a consumer group's committed offsets.
    DeleteGroup {
        /// Group id.
        group: String,
    },
    /// Add an ACL rule (a rule already there is left as it is).
    AddAcl(crate::acl::AclRule),
    /// Remove an ACL rule.
    RemoveAcl(crate::acl::AclRule),
    /// Move a partition's replicas to `replicas` (refused while another move of it runs, or
    /// when its replicas are no longer `from`: the plan was made on an older state).
    MoveReplicas {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// Its replicas when the move was planned.
        from: Vec<NodeId>,
        /// Where they go, the preferred leader first.
        replicas: Vec<NodeId>,
        /// The topic's id when the move was planned ([`UPDATE_BASE_LEVEL`]): a topic of that
        /// name deleted and created again since is left alone (empty: not checked).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        topic_id: String,
        /// The proposer's `partition_replicas_max`, checked for the brokers the move adds when
        /// applied ([`REPLICAS_MAX_LEVEL`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replicas_max: Option<u64>,
    },
    /// A partition's Raft group has `replicas` as its voters: the move is done.
    FinishMove {
        /// Topic id.
        topic_id: String,
        /// Partition.
        partition: u32,
        /// The replicas the move went to.
        replicas: Vec<NodeId>,
    },
    /// Mark a broker as being removed: it gets no new replicas, and once no partition has a
    /// replica on it, the controller's leader removes it from the controller group and
    /// proposes [`ControllerCommand::RemoveBroker`].
    SetRemoving {
        /// Its node id.
        node_id: NodeId,
        /// Refused when applied if no other broker that is not being removed would remain to
        /// hold the replicas ([`LAST_BROKER_CHECK_LEVEL`]): two removals asked at once, each
        /// checked against a state without the other, must not both pass.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        keep_one: bool,
    },
    /// Forget a broker (refused while a partition still has a replica on it).
    RemoveBroker {
        /// Its node id.
        node_id: NodeId,
    },
    /// Record a broker's addresses (each broker registers itself once it is a member).
    RegisterBroker {
        /// Its node id.
        node_id: NodeId,
        /// Where peers reach it.
        peer_address: String,
        /// Where clients reach it.
        client_address: String,
        /// The [`FEATURE_LEVEL`] of its build (0 from a build before levels existed).
        #[serde(default)]
        features: u32,
        /// The cluster id its data directory holds (see [`ControllerState::cluster_id`]).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        cluster_id: String,
        /// It is draining (a registration again while it drains keeps the mark; the first
        /// after a restart clears it). Proposed true only while every broker is at
        /// [`DRAINING_MARK_LEVEL`].
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        draining: bool,
    },
    /// The controller's new leader takes over coordinating the consumer groups (proposed by
    /// the leader itself, once per leadership): the coordinator epoch moves on, and with it the
    /// high half of every group generation this coordinator hands out.
    TakeOverGroups {
        /// The new coordinator.
        node_id: NodeId,
        /// Names this one leadership of it (random): a takeover counts once however often it
        /// is proposed, and a coordinator hands out generations only under its own takeover.
        nonce: u64,
    },
}

impl ControllerCommand {
    /// Stamps `group` (with offsets on `topic_id`) active at `at_ms`: a commit of no offsets,
    /// which every build reads (an older one applies it as nothing to an existing group).
    pub fn stamp(group: String, topic_id: String, at_ms: u64) -> Self {
        ControllerCommand::CommitOffsets {
            group,
            topic_id,
            generation: 0,
            offsets: Vec::new(),
            reset: false,
            at_ms,
        }
    }
}

/// A broker of the cluster, as the controller knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerMeta {
    /// Where peers reach it.
    pub peer_address: String,
    /// Where clients reach it.
    pub client_address: String,
    /// It was drained (it is about to stop): leaderships are not moved back to it until it
    /// registers again.
    #[serde(default)]
    pub draining: bool,
    /// It is being removed from the cluster: its replicas move to other brokers, and then it
    /// leaves the controller group.
    #[serde(default)]
    pub removing: bool,
    /// The [`FEATURE_LEVEL`] it registered with (0: a build before levels existed).
    #[serde(default)]
    pub features: u32,
}

/// What this build's controller state machine understands beyond what the first release did,
/// as one number a broker registers with. A command that an older broker would apply
/// differently (the controller's replicas would then disagree) is proposed only while every
/// registered broker is at the level that reads it ([`ControllerState::behind`]), as Kafka
/// gates a metadata version on every broker's support:
/// - 1: deny rules (`AclRule.permission`: an older broker stores one as an allow rule) and
///   offset resets (`CommitOffsets.reset`: an older broker applies one as a commit, and so
///   refuses it as going backwards).
/// - 2: the cluster id (`ControllerState.cluster_id`: an older broker ignores it when it
///   applies a registration and leaves it out of its snapshots, so replicas would disagree).
///   Set by the first registration applied while every broker is at level 2: at once in a
///   new cluster, after the last broker's upgrade in an older one.
/// - 3: a broker's removal refused when applied if it would leave no broker to hold the
///   replicas (`SetRemoving.keep_one`: an older broker applies it without the check).
/// - 4: a new partition's replicas placed as proposed (`CreateTopic.as_proposed`,
///   `UpdateTopic.as_proposed`: the proposer leaves out brokers that are down or draining; an
///   older broker places them by rotation over every registered broker).
/// - 5: a topic's change applied only to the topic it was made from (`UpdateTopic.base`: an
///   older broker applies it over whatever came between), and a replica move only to the topic
///   it was planned on (`MoveReplicas.topic_id`: an older broker moves the replicas of a topic
///   of that name created again since).
/// - 6: `partition_replicas_max` checked when a topic's creation, its new partitions or a
///   replica move is applied (`replicas_max`: an older broker applies them whatever a broker
///   then holds), so that two changes checked at once by their proposers against the same
///   state cannot both pass. The first change so checked raises `features_in_use` to 6.
/// - 7: a registration carries the broker's draining mark (`RegisterBroker.draining`: an
///   older broker applies one as not draining). The first such registration raises
///   `features_in_use` to 7.
pub const FEATURE_LEVEL: u32 = 7;

/// The feature level whose registrations carry the draining mark (see [`FEATURE_LEVEL`]).
pub const DRAINING_MARK_LEVEL: u32 = 7;

/// The feature level that checks `partition_replicas_max` when a placement or a move is
/// applied (see [`FEATURE_LEVEL`]).
pub(crate) const REPLICAS_MAX_LEVEL: u32 = 6;

/// The feature level that applies a topic's change only to the topic it was made from (see
/// [`FEATURE_LEVEL`]).
pub const UPDATE_BASE_LEVEL: u32 = 5;

/// The feature level that places a new partition's replicas as the proposer chose them (see
/// [`FEATURE_LEVEL`]).
pub const PLACEMENT_LEVEL: u32 = 4;

/// The feature level that checks, when a removal is applied, that a broker remains to hold the
/// replicas (see [`FEATURE_LEVEL`]).
pub const LAST_BROKER_CHECK_LEVEL: u32 = 3;

/// The feature level that stores the cluster id (see [`FEATURE_LEVEL`]).
pub const CLUSTER_ID_LEVEL: u32 = 2;

/// This build's feature level: [`FEATURE_LEVEL`], or lower under `WEFT_TEST_FEATURE_LEVEL` (a
/// test hook that makes this broker stand for an older build; it can only lower the level).
pub fn feature_level() -> u32 {
    static LEVEL: std::sync::LazyLock<u32> = std::sync::LazyLock::new(|| {
        std::env::var("WEFT_TEST_FEATURE_LEVEL")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .map_or(FEATURE_LEVEL, |v| v.min(FEATURE_LEVEL))
    });
    *LEVEL
}

/// The result of a controller command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerResponse {
    /// The topic as it now is.
    Topic(TopicMeta),
    /// The topic was deleted.
    Deleted {
        /// Its id.
        topic_id: String,
    },
    /// A topic of that name exists.
    AlreadyExists(String),
    /// No such topic.
    NotFound(String),
    /// The change is not allowed.
    Invalid(String),
    /// The topic changed after the proposer read it (`UpdateTopic.base`): nothing was applied.
    Changed(String),
    /// A broker would hold more than the proposer's `partition_replicas_max` partition
    /// replicas ([`REPLICAS_MAX_LEVEL`]): nothing was applied.
    LimitReached {
        /// Which broker, and what it holds.
        what: String,
        /// The limit.
        max: u64,
    },
    /// A broker was registered.
    Registered,
    /// Group offsets were stored.
    Committed,
    /// A group's offsets were deleted (`existed`: it had any).
    GroupDeleted {
        /// Whether the group had offsets.
        existed: bool,
    },
    /// The coordinator epoch after a takeover.
    CoordinatorEpoch(u64),
    /// An ACL rule was added or removed (`existed`: it was there before).
    Acl {
        /// Whether the rule was there before.
        existed: bool,
    },
}

/// A move of one partition's replicas, planned from a controller state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMove {
    /// Topic name.
    pub topic: String,
    /// The topic's id.
    pub topic_id: String,
    /// Partition.
    pub partition: u32,
    /// Its replicas now.
    pub from: Vec<NodeId>,
    /// Where they go.
    pub to: Vec<NodeId>,
}

impl PlannedMove {
    /// The command that starts the move (with no limit checked when applied).
    pub fn command(&self) -> ControllerCommand {
        ControllerCommand::MoveReplicas {
            topic: self.topic.clone(),
            partition: self.partition,
            from: self.from.clone(),
            replicas: self.to.clone(),
            topic_id: self.topic_id.clone(),
            replicas_max: None,
        }
    }

    /// The command that starts the move, refused when applied if it would give a broker more
    /// than `max` partition replicas (`partition_replicas_max`).
    pub fn command_within(&self, max: usize) -> ControllerCommand {
        let mut command = self.command();
        if let ControllerCommand::MoveReplicas { replicas_max, .. } = &mut command {
            *replicas_max = Some(max as u64);
        }
        command
    }
}

impl std::fmt::Display for PlannedMove {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}: {:?} -> {:?}",
            self.topic, self.partition, self.from, self.to
        )
    }
}

/// A consumer group's committed offsets, as the controller stores them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOffsets {
    /// The highest generation that committed: a coordinator that takes the group over starts
    /// its generations above it.
    pub generation: u64,
    /// Offsets by topic id, then partition.
    pub offsets: BTreeMap<String, BTreeMap<u32, u64>>,
    /// When the group was last known active (a commit, or members seen by the coordinator),
    /// by the proposer's wall clock in ms; 0: not known (stored by an older build).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub active_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Everything the controller holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerState {
    /// Last applied entry.
    pub last_applied: Option<LogId>,
    /// Membership in force.
    pub last_membership: StoredMembership<NodeId, BasicNode>,
    /// Topics by name.
    pub topics: BTreeMap<String, Arc<TopicMeta>>,
    /// The next partition group id to hand out (group 0 is the controller).
    pub next_group_id: GroupId,
    /// The cluster's brokers by node id.
    #[serde(default)]
    pub brokers: BTreeMap<NodeId, BrokerMeta>,
    /// Consumer groups' committed offsets by group id (shared between state versions: a commit
    /// copies one group, not all of them).
    #[serde(default)]
    pub groups: BTreeMap<String, Arc<GroupOffsets>>,
    /// Bumped by every takeover of the group coordination ([`ControllerCommand::TakeOverGroups`]):
    /// the high half of the generations the coordinator hands out, so a generation number never
    /// comes back, not even when a leader restarts and leads again in the same Raft term.
    #[serde(default)]
    pub coordinator_epoch: u64,
    /// The takeover in force: (node id, nonce).
    #[serde(default)]
    pub coordinator: Option<(NodeId, u64)>,
    /// ACL rules added through the admin API or `weft acl` (sorted, no duplicates).
    #[serde(default)]
    pub acls: Vec<crate::acl::AclRule>,
    /// The highest feature level a committed command has used (a deny rule, an offset reset:
    /// see [`FEATURE_LEVEL`]). A broker of a lower level would apply this log differently: it
    /// may not join, and one running (a downgrade) stops.
    #[serde(default)]
    pub features_in_use: u32,
    /// The cluster's id, one for every broker: the data-directory id of the broker whose
    /// registration was the first applied while every broker (and every member of the
    /// controller group) was at feature level 2: in a new cluster, usually the broker that
    /// initialised it; after an upgrade from an older build, the last broker upgraded. Empty
    /// until then.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_id: String,
}

impl ControllerState {
    /// Raises `features_in_use` to what the state itself shows was used: a snapshot made by a
    /// build before the field existed has none, though it may hold deny rules (an offset reset
    /// leaves nothing to see, and is no worse for it: a broker applying one as a commit only
    /// refuses it). Every replica then agrees, whether it replayed the log or took a snapshot.
    pub fn infer_features_in_use(&mut self) {
        if self
            .acls
            .iter()
            .any(|r| r.permission == crate::acl::Permission::Deny)
        {
            self.features_in_use = self.features_in_use.max(1);
        }
    }

    /// A broker whose build is below feature `level`, with its level, if any: one registered
    /// with a lower level, or a member of the controller group not registered yet (its build is
    /// not known: level 0). A command needing `level` could be applied differently there.
    pub fn behind(&self, level: u32) -> Option<(NodeId, u32)> {
        let registered = self
            .brokers
            .iter()
            .filter(|(_, b)| b.features < level)
            .map(|(id, b)| (*id, b.features));
        let unregistered = self
            .last_membership
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| !self.brokers.contains_key(id))
            .map(|id| (id, 0));
        registered.chain(unregistered).min()
    }

    pub(crate) fn apply(&mut self, command: &ControllerCommand) -> ControllerResponse {
        self.next_group_id = self.next_group_id.max(1);
        match command {
            ControllerCommand::CreateTopic {
                name,
                topic_id,
                config,
                created_at_ms,
                replicas,
                as_proposed,
                replicas_max,
            } => {
                if self.topics.contains_key(name) {
                    return ControllerResponse::AlreadyExists(name.clone());
                }
                let mut config = config.clone();
                let features = self.features_in_use;
                let replicas =
                    self.placement(0, config.partitions, &mut config, replicas, *as_proposed);
                if let Some(refused) = self.past_replicas_max(*replicas_max, &replicas, features) {
                    return refused;
                }
                let partitions = self.place(0, &replicas);
                let topic = TopicMeta {
                    name: name.clone(),
                    topic_id: topic_id.clone(),
                    config,
                    created_at_ms: *created_at_ms,
                    partitions,
                };
                self.topics.insert(name.clone(), Arc::new(topic.clone()));
                ControllerResponse::Topic(topic)
            }
            ControllerCommand::UpdateTopic {
                name,
                config,
                new_replicas,
                as_proposed,
                base,
                replicas_max,
            } => {
                let Some(current) = self.topics.get(name).map(|t| TopicMeta::clone(t)) else {
                    return ControllerResponse::NotFound(name.clone());
                };
                if let Some(base) = base
                    && self.behind(UPDATE_BASE_LEVEL).is_none()
                {
                    // An older build would apply the change whatever the topic is now.
                    self.features_in_use = self.features_in_use.max(UPDATE_BASE_LEVEL);
                    if base.topic_id != current.topic_id || base.config != current.config {
                        return ControllerResponse::Changed(name.clone());
                    }
                }
                if config.partitions < current.config.partitions {
                    return ControllerResponse::Invalid(format!(
                        "partitions can only grow ({} -> {})",
                        current.config.partitions, config.partitions
                    ));
                }
                let added = (config.partitions - current.config.partitions) as usize;
                if new_replicas.len() != added {
                    return ControllerResponse::Invalid(
                        "placement for added partitions is missing".into(),
                    );
                }
                let mut topic = current;
                let first = topic.partitions.len() as u32;
                let mut config = config.clone();
                // The replication factor stays what the topic has.
                config.replication_factor = topic.config.replication_factor;
                let features = self.features_in_use;
                let replicas = self.placement(
                    first,
                    config.partitions,
                    &mut config.clone(),
                    new_replicas,
                    *as_proposed,
                );
                if let Some(refused) = self.past_replicas_max(*replicas_max, &replicas, features) {
                    return refused;
                }
                let more = self.place(first, &replicas);
                topic.partitions.extend(more);
                topic.config = config;
                self.topics.insert(name.clone(), Arc::new(topic.clone()));
                ControllerResponse::Topic(topic)
            }
            ControllerCommand::RegisterBroker {
                node_id,
                peer_address,
                client_address,
                features,
                cluster_id,
                draining,
            } => {
                self.brokers.insert(
                    *node_id,
                    BrokerMeta {
                        peer_address: peer_address.clone(),
                        client_address: client_address.clone(),
                        draining: false,
                        // A broker being removed stays so when it registers again.
                        removing: self.brokers.get(node_id).is_some_and(|b| b.removing),
                        features: *features,
                    },
                );
                // Checked when applied too, with this registration's level (the proposer's
                // state may be behind a broker of an older build joining meanwhile, which
                // applies the mark as not draining).
                if *draining && self.behind(DRAINING_MARK_LEVEL).is_none() {
                    self.features_in_use = self.features_in_use.max(DRAINING_MARK_LEVEL);
                    if let Some(broker) = self.brokers.get_mut(node_id) {
                        broker.draining = true;
                    }
                }
                // Once every broker stores it (an older build would leave it out of its
                // snapshots), and from then on no older build may join or run.
                if self.cluster_id.is_empty()
                    && !cluster_id.is_empty()
                    && self.behind(CLUSTER_ID_LEVEL).is_none()
                {
                    self.cluster_id.clone_from(cluster_id);
                    self.features_in_use = self.features_in_use.max(CLUSTER_ID_LEVEL);
                }
                ControllerResponse::Registered
            }
            ControllerCommand::TakeOverGroups { node_id, nonce } => {
                if self.coordinator != Some((*node_id, *nonce)) {
                    // Above the epoch before and, for generations handed out before epochs
                    // existed (their high half was the controller's term), above the term of
                    // this entry.
                    let term = self.last_applied.map_or(0, |l| l.leader_id.term);
                    self.coordinator_epoch = (self.coordinator_epoch + 1).max(term + 1);
                    self.coordinator = Some((*node_id, *nonce));
                }
                ControllerResponse::CoordinatorEpoch(self.coordinator_epoch)
            }
            ControllerCommand::MoveReplicas {
                topic,
                partition,
                from,
                replicas,
                topic_id,
                replicas_max,
            } => self.move_replicas(topic, topic_id, *partition, from, replicas, *replicas_max),
            ControllerCommand::FinishMove {
                topic_id,
                partition,
                replicas,
            } => {
                let Some(topic) = self
                    .topics
                    .values_mut()
                    .find(|t| &t.topic_id == topic_id)
                    .map(Arc::make_mut)
                else {
                    return ControllerResponse::NotFound(format!("topic id {topic_id}"));
                };
                let Some(meta) = topic.partitions.get_mut(*partition as usize) else {
                    return ControllerResponse::NotFound(format!("partition {partition}"));
                };
                if meta.target.as_ref() != Some(replicas) {
                    return ControllerResponse::Invalid(format!(
                        "partition {partition} is not moving to {replicas:?}"
                    ));
                }
                meta.replicas = replicas.clone();
                meta.target = None;
                meta.adding.clear();
                ControllerResponse::Topic(topic.clone())
            }
            ControllerCommand::SetRemoving { node_id, keep_one } => {
                // Only while every broker (and controller member) reads the check as applied
                // here: one of an older build that joined after the removal was proposed
                // applies it without, and so does every replica then.
                if *keep_one && self.behind(LAST_BROKER_CHECK_LEVEL).is_none() {
                    self.features_in_use = self.features_in_use.max(LAST_BROKER_CHECK_LEVEL);
                    let another = self
                        .brokers
                        .iter()
                        .any(|(id, b)| id != node_id && !b.removing);
                    if self.brokers.contains_key(node_id) && !another {
                        return ControllerResponse::Invalid(format!(
                            "node {node_id} is the last broker that could hold the replicas"
                        ));
                    }
                }
                match self.brokers.get_mut(node_id) {
                    Some(broker) => {
                        broker.removing = true;
                        ControllerResponse::Registered
                    }
                    None => ControllerResponse::NotFound(format!("broker {node_id}")),
                }
            }
            ControllerCommand::RemoveBroker { node_id } => {
                if let Some(p) = self.partitions_on(*node_id).next() {
                    return ControllerResponse::Invalid(format!(
                        "broker {node_id} still has a replica of {p}"
                    ));
                }
                match self.brokers.remove(node_id) {
                    Some(_) => ControllerResponse::Registered,
                    None => ControllerResponse::NotFound(format!("broker {node_id}")),
                }
            }
            ControllerCommand::SetDraining { node_id, draining } => {
                if let Some(broker) = self.brokers.get_mut(node_id) {
                    broker.draining = *draining;
                }
                ControllerResponse::Registered
            }
            ControllerCommand::DeleteTopic { name } => match self.topics.remove(name) {
                Some(topic) => {
                    // A deleted topic takes its groups' committed offsets with it.
                    self.groups.retain(|_, g| {
                        if g.offsets.contains_key(&topic.topic_id) {
                            Arc::make_mut(g).offsets.remove(&topic.topic_id);
                        }
                        !g.offsets.is_empty()
                    });
                    ControllerResponse::Deleted {
                        topic_id: topic.topic_id.clone(),
                    }
                }
                None => ControllerResponse::NotFound(name.clone()),
            },
            ControllerCommand::CommitOffsets {
                group,
                topic_id,
                generation,
                offsets,
                reset,
                at_ms,
            } => {
                if !self.topics.values().any(|t| &t.topic_id == topic_id) {
                    return ControllerResponse::NotFound(format!("topic id {topic_id}"));
                }
                let current = self.groups.get(group);
                let stored = current.and_then(|g| g.offsets.get(topic_id));
                for &(partition, offset) in offsets {
                    if let Some(&before) = stored.and_then(|s| s.get(&partition))
                        && offset < before
                        && !reset
                    {
                        return ControllerResponse::Invalid(format!(
                            "partition {partition}: committed offsets never go backwards ({offset} < {before})"
                        ));
                    }
                }
                if *reset {
                    self.features_in_use = self.features_in_use.max(1);
                }
                let entry = Arc::make_mut(self.groups.entry(group.clone()).or_default());
                entry.generation = entry.generation.max(*generation);
                // A commit without a time (from an older build) makes the time unknown: the
                // group was active then, and a time stamped before is stale.
                entry.active_ms = if *at_ms == 0 && !offsets.is_empty() {
                    0
                } else {
                    entry.active_ms.max(*at_ms)
                };
                let topic = entry.offsets.entry(topic_id.clone()).or_default();
                for &(partition, offset) in offsets {
                    topic.insert(partition, offset);
                }
                ControllerResponse::Committed
            }
            ControllerCommand::DeleteGroup { group } => ControllerResponse::GroupDeleted {
                existed: self.groups.remove(group).is_some(),
            },
            ControllerCommand::AddAcl(rule) => {
                if let Err(reason) = rule.validate() {
                    return ControllerResponse::Invalid(reason);
                }
                let mut rule = rule.clone();
                rule.operations.sort_unstable();
                rule.operations.dedup();
                let existed = self.acls.contains(&rule);
                if rule.permission == crate::acl::Permission::Deny {
                    self.features_in_use = self.features_in_use.max(1);
                }
                if !existed {
                    self.acls.push(rule);
                    self.acls.sort();
                }
                ControllerResponse::Acl { existed }
            }
            ControllerCommand::RemoveAcl(rule) => {
                let mut rule = rule.clone();
                rule.operations.sort_unstable();
                rule.operations.dedup();
                let before = self.acls.len();
                self.acls.retain(|r| *r != rule);
                ControllerResponse::Acl {
                    existed: self.acls.len() != before,
                }
            }
        }
    }

    fn move_replicas(
        &mut self,
        topic: &str,
        topic_id: &str,
        partition: u32,
        from: &[NodeId],
        replicas: &[NodeId],
        replicas_max: Option<u64>,
    ) -> ControllerResponse {
        if replicas.is_empty() {
            return ControllerResponse::Invalid("a partition needs at least one replica".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for node in replicas {
            if !seen.insert(*node) {
                return ControllerResponse::Invalid(format!("node {node} appears twice"));
            }
            match self.brokers.get(node) {
                None => {
                    return ControllerResponse::Invalid(format!(
                        "node {node} is not a broker of this cluster"
                    ));
                }
                Some(b) if b.removing && !from.contains(node) => {
                    return ControllerResponse::Invalid(format!(
                        "node {node} is being removed from the cluster"
                    ));
                }
                Some(_) => {}
            }
        }
        let Some(current_id) = self.topics.get(topic).map(|t| t.topic_id.clone()) else {
            return ControllerResponse::NotFound(topic.to_string());
        };
        if !topic_id.is_empty() && self.behind(UPDATE_BASE_LEVEL).is_none() {
            // An older build would move the replicas of whatever topic has the name now.
            self.features_in_use = self.features_in_use.max(UPDATE_BASE_LEVEL);
            if current_id != topic_id {
                return ControllerResponse::Invalid(format!(
                    "topic {topic:?} was deleted and created again since the move was planned"
                ));
            }
        }
        // The brokers the move gives a replica (one they neither hold nor are getting).
        let gaining: Vec<Vec<NodeId>> = match self
            .topics
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
        {
            Some(p) if p.replicas == from => vec![
                replicas
                    .iter()
                    .filter(|n| {
                        !p.replicas.contains(n) && !p.target.as_ref().is_some_and(|t| t.contains(n))
                    })
                    .copied()
                    .collect(),
            ],
            _ => Vec::new(),
        };
        let features = self.features_in_use;
        if let Some(refused) = self.past_replicas_max(replicas_max, &gaining, features) {
            return refused;
        }
        let Some(meta) = self.topics.get_mut(topic).map(Arc::make_mut) else {
            return ControllerResponse::NotFound(topic.to_string());
        };
        let Some(p) = meta.partitions.get_mut(partition as usize) else {
            return ControllerResponse::NotFound(format!("{topic}/{partition}"));
        };
        // A running move may be redirected (or undone): the replicas then are the old and the
        // new ones, and the plan must have seen them.
        if p.replicas != from {
            return ControllerResponse::Invalid(format!(
                "{topic}/{partition} has replicas {:?} now, not {from:?}",
                p.replicas
            ));
        }
        if p.target.is_none() && p.replicas == replicas {
            // Already there.
        } else {
            let before: Vec<NodeId> = p
                .replicas
                .iter()
                .filter(|n| !p.adding.contains(n))
                .copied()
                .collect();
            let mut all = p.replicas.clone();
            all.extend(replicas.iter().filter(|n| !p.replicas.contains(n)));
            p.adding = all
                .iter()
                .filter(|n| !before.contains(n))
                .copied()
                .collect();
            p.replicas = all;
            p.target = Some(replicas.to_vec());
        }
        ControllerResponse::Topic(meta.clone())
    }

    /// A placement to propose for partitions `first .. end` of a topic asking for
    /// `replication_factor` replicas (capped by the brokers that are registered and not being
    /// removed). Each partition's first replica (it initialises the group and is the preferred
    /// leader) is the broker of `usable` (up, serving, not draining: what the proposer sees)
    /// with the fewest preferred leaderships (of this topic first, then of the cluster), then
    /// the fewest replicas; the others are the usable brokers with the fewest replicas (the
    /// same way), and only when too few are usable, brokers that
    /// are down or draining (they catch up once back; the group needs a majority of its
    /// replicas up). Leaders so spread over the brokers that are up, whatever the topics'
    /// partition counts; a broker that is down leads no new partition, which would stay
    /// leaderless until it came back.
    pub fn propose_placement(
        &self,
        first: u32,
        end: u32,
        replication_factor: u32,
        usable: &BTreeSet<NodeId>,
    ) -> Vec<Vec<NodeId>> {
        let eligible = self.eligible_brokers();
        let Some(&fallback) = eligible.first() else {
            return Vec::new();
        };
        let rf = (replication_factor.max(1) as usize).min(eligible.len());
        let mut replicas = self.replica_counts();
        let mut leaders: BTreeMap<NodeId, usize> = eligible.iter().map(|b| (*b, 0)).collect();
        for t in self.topics.values() {
            for p in &t.partitions {
                if let Some(c) = p
                    .target
                    .as_ref()
                    .unwrap_or(&p.replicas)
                    .first()
                    .and_then(|b| leaders.get_mut(b))
                {
                    *c += 1;
                }
            }
        }
        // What this topic's partitions placed so far give each broker: the topic spreads its
        // own leaders and replicas first (a new empty broker would otherwise lead all of a new
        // topic's partitions, and take all its publishes), then the cluster's.
        let mut own_leaders: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut own_replicas: BTreeMap<NodeId, usize> = BTreeMap::new();
        (first..end)
            .map(|_| {
                let mut chosen: Vec<NodeId> = Vec::with_capacity(rf);
                // Usable brokers first, then the others; within each, the least loaded.
                let count =
                    |m: &BTreeMap<NodeId, usize>, b: &NodeId| m.get(b).copied().unwrap_or(0);
                let rank = |b: &NodeId, by_leaders: bool| {
                    let (l, r) = (count(&leaders, b), count(&replicas, b));
                    let (ol, or) = (count(&own_leaders, b), count(&own_replicas, b));
                    (
                        !usable.contains(b),
                        if by_leaders {
                            (ol, l, or, r)
                        } else {
                            (or, r, ol, l)
                        },
                        *b,
                    )
                };
                let leader = eligible
                    .iter()
                    .min_by_key(|b| rank(b, true))
                    .copied()
                    .unwrap_or(fallback);
                chosen.push(leader);
                let mut others: Vec<NodeId> =
                    eligible.iter().filter(|b| **b != leader).copied().collect();
                others.sort_by_key(|b| rank(b, false));
                chosen.extend(others.into_iter().take(rf - 1));
                *leaders.entry(leader).or_default() += 1;
                *own_leaders.entry(leader).or_default() += 1;
                for b in &chosen {
                    *replicas.entry(*b).or_default() += 1;
                    *own_replicas.entry(*b).or_default() += 1;
                }
                chosen
            })
            .collect()
    }

    /// Brokers that may receive replicas: registered and not being removed.
    fn eligible_brokers(&self) -> Vec<NodeId> {
        self.brokers
            .iter()
            .filter(|(_, b)| !b.removing)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The partition replicas `node` holds or is getting: a moving partition counts on its
    /// replicas (those leaving stay until the move ends, however long that takes) and on its
    /// target. What `partition_replicas_max` bounds.
    pub fn replicas_on(&self, node: NodeId) -> usize {
        self.topics
            .values()
            .flat_map(|t| &t.partitions)
            .filter(|p| {
                p.replicas.contains(&node) || p.target.as_ref().is_some_and(|t| t.contains(&node))
            })
            .count()
    }

    /// With `max` (the proposer's `partition_replicas_max`) and every broker at
    /// [`REPLICAS_MAX_LEVEL`]: the refusal of `placed` (replica lists) if it would give a broker
    /// more than `max` partition replicas, counting what it holds or is getting. Every check of
    /// a command that gives some broker a replica raises `features_in_use` to
    /// [`REPLICAS_MAX_LEVEL`] (as levels 3 and 5 do: a build rolled back below it would apply a
    /// refusal differently); a refused command changes nothing else (`features_in_use` is what
    /// it was before the command, `features`, raised).
    fn past_replicas_max(
        &mut self,
        max: Option<u64>,
        placed: &[Vec<NodeId>],
        features: u32,
    ) -> Option<ControllerResponse> {
        let max = max?;
        if self.behind(REPLICAS_MAX_LEVEL).is_some() {
            return None;
        }
        let mut adding: BTreeMap<NodeId, usize> = BTreeMap::new();
        for &node in placed.iter().flatten() {
            *adding.entry(node).or_default() += 1;
        }
        if adding.is_empty() {
            // Nothing to refuse (a growth by no partition, a move that gives no broker a new
            // replica): an older build applies it alike.
            return None;
        }
        self.features_in_use = self.features_in_use.max(REPLICAS_MAX_LEVEL);
        // A broker holds at most one replica of each partition: while the cluster has fewer
        // partitions than the limit leaves room for (the usual case), no broker can pass it,
        // and the partitions need not be counted (every replica applies every command).
        let partitions: usize = self.topics.values().map(|t| t.partitions.len()).sum();
        if adding
            .values()
            .all(|&more| (partitions + more) as u64 <= max)
        {
            return None;
        }
        for (node, more) in adding {
            let held = self.replicas_on(node);
            if (held + more) as u64 > max {
                self.features_in_use = features.max(REPLICAS_MAX_LEVEL);
                return Some(ControllerResponse::LimitReached {
                    what: format!(
                        "broker {node} holds {held} partition replicas and cannot take {more} more"
                    ),
                    max,
                });
            }
        }
        None
    }

    /// [`ControllerState::replicas_on`] of every registered broker.
    fn replicas_held(&self) -> BTreeMap<NodeId, usize> {
        self.brokers
            .keys()
            .map(|&b| (b, self.replicas_on(b)))
            .collect()
    }

    /// Replicas per eligible broker (a moving partition counts where it goes).
    fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> = self
            .eligible_brokers()
            .into_iter()
            .map(|b| (b, 0))
            .collect();
        for t in self.topics.values() {
            for p in &t.partitions {
                for r in p.target.as_ref().unwrap_or(&p.replicas) {
                    if let Some(c) = counts.get_mut(r) {
                        *c += 1;
                    }
                }
            }
        }
        counts
    }

    /// Moves that first give every under-replicated partition the replicas its topic asked for,
    /// as far as eligible brokers allow (a partition shrunk by a broker's removal, or placed
    /// while the cluster had fewer brokers, gets them back once brokers are added), each on the
    /// eligible broker with the fewest replicas; then spread replicas evenly over the eligible
    /// brokers (no two brokers more than one replica apart, as far as partitions allow) and
    /// then preferred leaders (the first replica) the same way, moving as few replicas as it
    /// can: what to run after adding a broker. Partitions already moving are left alone.
    pub fn plan_rebalance(&self) -> Vec<PlannedMove> {
        self.plan_rebalance_onto(&self.eligible_brokers().into_iter().collect(), usize::MAX)
    }

    /// [`ControllerState::plan_rebalance`] placing replicas and preferred leaders only on the
    /// brokers of `usable` (up, serving, not draining: what the proposer sees), and giving no
    /// broker more than `max` replicas (`partition_replicas_max`); replicas on other brokers
    /// stay where they are.
    pub fn plan_rebalance_onto(&self, usable: &BTreeSet<NodeId>, max: usize) -> Vec<PlannedMove> {
        let mut counts = self.replica_counts();
        // What each broker holds or is getting, against `max` (a replica planned to leave a
        // broker stays there until its move ends: it does not make room).
        let mut held = self.replicas_held();
        let room =
            |held: &BTreeMap<NodeId, usize>, b: &NodeId| held.get(b).copied().unwrap_or(0) < max;
        counts.retain(|b, _| usable.contains(b));
        let mut plan: BTreeMap<(String, u32), Vec<NodeId>> = BTreeMap::new();
        let still: Vec<(String, u32, Vec<NodeId>)> = self
            .topics
            .values()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .filter(|p| p.target.is_none())
                    .map(|p| (t.name.clone(), p.partition, p.replicas.clone()))
            })
            .collect();
        let replicas_of = |plan: &BTreeMap<(String, u32), Vec<NodeId>>, t: &str, p: u32, r| {
            plan.get(&(t.to_string(), p)).cloned().unwrap_or(r)
        };
        // The replication factor back, where brokers allow.
        for (t, p, r) in &still {
            let asked = self
                .topics
                .get(t)
                .map_or(0, |meta| meta.config.replication_factor.max(1) as usize);
            let mut grown = r.clone();
            while grown.len() < asked {
                let Some(b) = counts
                    .iter()
                    .filter(|(b, _)| !grown.contains(b) && room(&held, b))
                    .min_by_key(|(b, c)| (**c, **b))
                    .map(|(b, _)| *b)
                else {
                    break;
                };
                counts.entry(b).and_modify(|c| *c += 1);
                *held.entry(b).or_default() += 1;
                grown.push(b);
            }
            if grown.len() > r.len() {
                plan.insert((t.clone(), *p), grown);
            }
        }
        let total: usize = counts.values().sum();
        for _ in 0..=total {
            let (Some((&most, &high)), Some((&least, &low))) = (
                counts
                    .iter()
                    .max_by_key(|(id, c)| (**c, std::cmp::Reverse(**id))),
                counts.iter().min_by_key(|(id, c)| (**c, **id)),
            ) else {
                break;
            };
            if high <= low + 1 || !room(&held, &least) {
                break;
            }
            let candidate = still.iter().find_map(|(t, p, r)| {
                let current = replicas_of(&plan, t, *p, r.clone());
                (current.contains(&most) && !current.contains(&least))
                    .then(|| (t.clone(), *p, current))
            });
            let Some((t, p, mut current)) = candidate else {
                break;
            };
            for r in current.iter_mut() {
                if *r == most {
                    *r = least;
                }
            }
            plan.insert((t, p), current);
            counts.entry(most).and_modify(|c| *c -= 1);
            counts.entry(least).and_modify(|c| *c += 1);
            *held.entry(least).or_default() += 1;
        }
        // Preferred leaders: the first replica of each partition, spread the same way.
        let mut firsts: BTreeMap<NodeId, usize> = self
            .eligible_brokers()
            .into_iter()
            .filter(|b| usable.contains(b))
            .map(|b| (b, 0))
            .collect();
        for (t, p, r) in &still {
            if let Some(first) = replicas_of(&plan, t, *p, r.clone()).first()
                && let Some(c) = firsts.get_mut(first)
            {
                *c += 1;
            }
        }
        for _ in 0..=still.len() {
            let Some((&most, &high)) = firsts
                .iter()
                .max_by_key(|(id, c)| (**c, std::cmp::Reverse(**id)))
            else {
                break;
            };
            let swap = still.iter().find_map(|(t, p, r)| {
                let current = replicas_of(&plan, t, *p, r.clone());
                if current.first() != Some(&most) {
                    return None;
                }
                let (i, _) = current
                    .iter()
                    .enumerate()
                    .skip(1)
                    .filter(|(_, n)| firsts.get(n).is_some_and(|c| c + 1 < high))
                    .min_by_key(|(_, n)| firsts.get(n).copied().unwrap_or(usize::MAX))?;
                Some((t.clone(), *p, current, i))
            });
            let Some((t, p, mut current, i)) = swap else {
                break;
            };
            current.swap(0, i);
            firsts.entry(most).and_modify(|c| *c -= 1);
            firsts.entry(current[0]).and_modify(|c| *c += 1);
            plan.insert((t, p), current);
        }
        still
            .into_iter()
            .filter_map(|(topic, partition, from)| {
                let to = plan.remove(&(topic.clone(), partition))?;
                let topic_id = self.topics.get(&topic)?.topic_id.clone();
                (to != from).then_some(PlannedMove {
                    topic,
                    topic_id,
                    partition,
                    from,
                    to,
                })
            })
            .collect()
    }

    /// The brokers that running moves add replicas on.
    pub fn move_targets(&self) -> BTreeSet<NodeId> {
        self.topics
            .values()
            .flat_map(|t| &t.partitions)
            .filter(|p| p.target.is_some())
            .flat_map(|p| p.adding.iter().copied())
            .collect()
    }

    /// Moves that take every replica off `node` (each to the eligible broker with the fewest
    /// replicas that the partition is not on yet; a partition with no such broker shrinks and is
    /// under-replicated; a running move to `node` is redirected), and the partitions that no
    /// other broker can hold.
    pub fn plan_removal(&self, node: NodeId) -> (Vec<PlannedMove>, Vec<String>) {
        self.plan_removal_onto(
            node,
            &self.eligible_brokers().into_iter().collect(),
            &BTreeSet::new(),
            usize::MAX,
        )
    }

    /// [`ControllerState::plan_removal`] moving replicas only to the brokers of `usable` (up,
    /// serving, not draining: what the proposer sees). A move already taking a partition off
    /// `node` whose new replicas include a broker of `down` (down for a while: it went down
    /// after the move began) is planned again too: it would hold the removal for as long as that
    /// broker stays down. A new replica's broker that is only not usable now (slow to answer a
    /// check, draining) keeps its move and what it caught up. No broker is given more than `max`
    /// replicas (`partition_replicas_max`): a partition that only full brokers could take waits
    /// (it is not shrunk) until one has room or another broker joins.
    pub fn plan_removal_onto(
        &self,
        node: NodeId,
        usable: &BTreeSet<NodeId>,
        down: &BTreeSet<NodeId>,
        max: usize,
    ) -> (Vec<PlannedMove>, Vec<String>) {
        let mut counts = self.replica_counts();
        counts.remove(&node);
        counts.retain(|b, _| usable.contains(b));
        // What each broker holds or is getting, against `max`.
        let mut held = self.replicas_held();
        let room =
            |held: &BTreeMap<NodeId, usize>, b: &NodeId| held.get(b).copied().unwrap_or(0) < max;
        let (mut moves, mut stuck) = (Vec::new(), Vec::new());
        for t in self.topics.values() {
            for p in &t.partitions {
                // Where the partition is going (a move that already takes it off `node`
                // needs nothing more, unless it stalls on a new replica that is down; one
                // that goes to `node` is redirected).
                let going = p.target.as_ref().unwrap_or(&p.replicas);
                let stalled: BTreeSet<NodeId> = match &p.target {
                    Some(target) if p.replicas.contains(&node) => target
                        .iter()
                        .filter(|b| p.adding.contains(b) && down.contains(b))
                        .copied()
                        .collect(),
                    _ => BTreeSet::new(),
                };
                if !going.contains(&node) && stalled.is_empty() {
                    continue;
                }
                // Each replica to leave (`node`, and stalled new ones) gets the usable broker
                // with the fewest replicas that the partition is not going to yet, and that has
                // room. Counted as planned only if the move is (a partition left waiting keeps
                // no broker's room).
                let (counts_before, held_before) = (counts.clone(), held.clone());
                let mut to: Vec<NodeId> = Vec::new();
                let mut missing = false;
                for r in going {
                    if *r != node && !stalled.contains(r) {
                        to.push(*r);
                        continue;
                    }
                    let replacement = counts
                        .iter()
                        .filter(|(b, _)| !going.contains(b) && !to.contains(b) && room(&held, b))
                        .min_by_key(|(b, c)| (**c, **b))
                        .map(|(b, _)| *b);
                    match replacement {
                        Some(b) => {
                            counts.entry(b).and_modify(|c| *c += 1);
                            *held.entry(b).or_default() += 1;
                            to.push(b);
                        }
                        None => missing = true,
                    }
                }
                let others: Vec<NodeId> = self
                    .eligible_brokers()
                    .into_iter()
                    .filter(|b| *b != node && !going.contains(b) && !to.contains(b))
                    .collect();
                let waiting = if !missing {
                    None
                } else if others.iter().any(|b| !counts.contains_key(b)) {
                    // A broker could take it but is not usable now (down, draining, slow to
                    // answer): planned again later rather than shrunk for good.
                    Some("the brokers that could take it are not usable now".to_string())
                } else if !others.is_empty() {
                    // Usable brokers, but full: planned again once one has room or another
                    // broker joins, rather than shrunk for good.
                    Some(format!(
                        "the brokers that could take it hold partition_replicas_max ({max}) \
                         replicas each"
                    ))
                } else if !stalled.is_empty() {
                    // No other broker at all: the running move waits for its target.
                    Some("its move waits for a broker that is down".to_string())
                } else if to.is_empty() {
                    Some("no other broker to hold it".to_string())
                } else {
                    None
                };
                if let Some(why) = waiting.or_else(|| {
                    to.is_empty()
                        .then(|| "no other broker to hold it".to_string())
                }) {
                    stuck.push(format!("{}/{}: {why}", t.name, p.partition));
                    (counts, held) = (counts_before, held_before);
                    continue;
                }
                moves.push(PlannedMove {
                    topic: t.name.clone(),
                    topic_id: t.topic_id.clone(),
                    partition: p.partition,
                    from: p.replicas.clone(),
                    to,
                });
            }
        }
        (moves, stuck)
    }

    /// [`ControllerState::plan_removal_onto`] for several brokers being removed at once, in
    /// order: each plan starts from the state the plans before it leave (their moves applied),
    /// so it counts the replicas they send to each broker. Planned each from the same state,
    /// two removals both sent their replicas to the broker with the fewest (an empty new one
    /// took every replica of both). The plan of each broker, with its stuck partitions; a
    /// partition on several of them is redirected by the later plan, whose move must be
    /// proposed once the earlier one is applied.
    pub fn plan_removals_onto(
        &self,
        nodes: &[NodeId],
        usable: &BTreeSet<NodeId>,
        down: &BTreeSet<NodeId>,
        max: usize,
    ) -> Vec<(NodeId, Vec<PlannedMove>, Vec<String>)> {
        let mut after = self.clone();
        let mut plans = Vec::with_capacity(nodes.len());
        for &node in nodes {
            let (plan, stuck) = after.plan_removal_onto(node, usable, down, max);
            for m in &plan {
                after.apply(&m.command());
            }
            plans.push((node, plan, stuck));
        }
        plans
    }

    /// "topic/partition" of every partition with a replica (or a replica to be) on `node`.
    pub fn partitions_on(&self, node: NodeId) -> impl Iterator<Item = String> + '_ {
        self.topics.values().flat_map(move |t| {
            t.partitions
                .iter()
                .filter(move |p| {
                    p.replicas.contains(&node)
                        || p.target.as_ref().is_some_and(|r| r.contains(&node))
                })
                .map(move |p| format!("{}/{}", t.name, p.partition))
        })
    }

    /// The committed offset of `group` on `topic_id`/`partition`.
    pub fn committed(&self, group: &str, topic_id: &str, partition: u32) -> Option<u64> {
        self.groups
            .get(group)?
            .offsets
            .get(topic_id)?
            .get(&partition)
            .copied()
    }

    /// Replicas of partitions `first .. end`, decided here, in log order, from the brokers
    /// registered so far: `replication_factor` of them per partition (capped by the brokers
    /// known; the config records the factor in force).
    ///
    /// With `as_proposed`, while every broker places at [`PLACEMENT_LEVEL`], the proposer's
    /// placement stands if it is still valid here (see [`ControllerState::propose_placement`]:
    /// it leaves out brokers that are down or draining). Otherwise the first replica (which
    /// initialises the partition's group and is its preferred leader) rotates over the
    /// registered brokers, so that leaders spread. With no broker registered yet, the
    /// proposer's placement stands.
    fn placement(
        &mut self,
        first: u32,
        end: u32,
        config: &mut TopicConfig,
        proposed: &[Vec<NodeId>],
        as_proposed: bool,
    ) -> Vec<Vec<NodeId>> {
        let brokers: Vec<NodeId> = self
            .brokers
            .iter()
            .filter(|(_, b)| !b.removing)
            .map(|(id, _)| *id)
            .collect();
        if brokers.is_empty() {
            return proposed.to_vec();
        }
        // The topic keeps the factor it asked for: with fewer brokers, it is under-replicated
        // (and says so) until there are enough.
        let rf = (config.replication_factor.max(1) as usize).min(brokers.len());
        if as_proposed && self.behind(PLACEMENT_LEVEL).is_none() {
            let valid = proposed.len() == (end - first) as usize
                && proposed.iter().all(|replicas| {
                    let distinct: BTreeSet<&NodeId> = replicas.iter().collect();
                    replicas.len() == rf
                        && distinct.len() == rf
                        && replicas.iter().all(|r| brokers.contains(r))
                });
            if valid {
                // Only a placement kept as proposed is one an older build would not make.
                self.features_in_use = self.features_in_use.max(PLACEMENT_LEVEL);
                return proposed.to_vec();
            }
        }
        (first..end)
            .map(|p| {
                (0..rf)
                    .map(|k| brokers[(p as usize + k) % brokers.len()])
                    .collect()
            })
            .collect()
    }

    fn place(&mut self, first: u32, replicas: &[Vec<NodeId>]) -> Vec<PartitionMeta> {
        replicas
            .iter()
            .enumerate()
            .map(|(i, nodes)| {
                let group_id = self.next_group_id;
                self.next_group_id += 1;
                PartitionMeta {
                    partition: first + i as u32,
                    group_id,
                    replicas: nodes.clone(),
                    target: None,
                    adding: Vec::new(),
                }
            })
            .collect()
    }
}

/// Version of the controller snapshot's JSON document.
const SNAPSHOT_VERSION: u32 = 1;

fn encode(state: &ControllerState) -> Result<Vec<u8>, StorageError> {
    super::encode_snapshot(SNAPSHOT_VERSION, state)
}

fn decode(bytes: &[u8]) -> Result<ControllerState, String> {
    let mut state: ControllerState = super::decode_snapshot(SNAPSHOT_VERSION, bytes)?;
    state.infer_features_in_use();
    if state.features_in_use < CLUSTER_ID_LEVEL {
        // A build of level 1 set the id from the first registration, whatever the others'
        // levels; replaying its log on this build sets none (its registrations are below
        // level 2). Every replica agrees: the id is set again once every broker is at level 2.
        state.cluster_id.clear();
    }
    Ok(state)
}

fn meta_of(state: &ControllerState) -> SnapshotMeta<NodeId, BasicNode> {
    SnapshotMeta {
        last_log_id: state.last_applied,
        last_membership: state.last_membership.clone(),
        snapshot_id: format!(
            "{}-{}",
            state.last_applied.map_or(0, |l| l.leader_id.term),
            state.last_applied.map_or(0, |l| l.index)
        ),
    }
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    log_config: LogConfig,
    state: watch::Sender<Arc<ControllerState>>,
    snapshot: StoredSnapshot,
    /// One snapshot file write at a time.
    snapshot_write: tokio::sync::Mutex<()>,
    /// The controller log, told of each snapshot written (its purges wait for one).
    reader: std::sync::OnceLock<super::LogReader>,
}

/// The controller state machine. Clones share state; [`ControllerStateMachine::watch`] lets the
/// broker react to every change. Its snapshot is a file in the controller's directory, written
/// atomically whenever openraft builds or installs one, so the controller log can be purged
/// behind it and a restart reads the snapshot plus the log's tail.
#[derive(Debug, Clone)]
pub struct ControllerStateMachine {
    shared: Arc<Shared>,
}

impl ControllerStateMachine {
    /// The controller state machine kept in `dir`, from its snapshot file if there is one
    /// (blocking: it reads the file).
    pub fn open(dir: &Path, log_config: LogConfig) -> Result<Self, String> {
        let stored = weft_storage::snapshot::read_snapshot(dir).map_err(|e| e.to_string())?;
        let (state, snapshot) = match stored {
            Some(bytes) => {
                let state = decode(&bytes)
                    .map_err(|e| format!("{}: {e}", dir.join("snapshot").display()))?;
                let meta = meta_of(&state);
                (state, Some((meta, bytes)))
            }
            None => (ControllerState::default(), None),
        };
        Ok(ControllerStateMachine {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                log_config,
                state: watch::Sender::new(Arc::new(state)),
                snapshot: Mutex::new(snapshot),
                snapshot_write: tokio::sync::Mutex::new(()),
                reader: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Makes the controller log's purges wait for a snapshot file that covers them (see
    /// `LogReader::track_snapshots`): set once, before the group starts.
    pub fn track_purges(&self, reader: super::LogReader) {
        let through = self.shared.snapshot.lock().ok().and_then(|s| {
            s.as_ref()
                .and_then(|(meta, _)| meta.last_log_id.map(|l| l.index))
        });
        reader.track_snapshots(through);
        let _ = self.shared.reader.set(reader);
    }

    /// Tells the log that the snapshot file covers it through `snapshot`'s last entry: a purge
    /// held back until then runs now.
    async fn report_snapshot(
        &self,
        snapshot: &SnapshotMeta<NodeId, BasicNode>,
    ) -> Result<(), StorageError> {
        let (Some(reader), Some(index)) = (
            self.shared.reader.get().cloned(),
            snapshot.last_log_id.map(|l| l.index),
        ) else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || reader.snapshot_persisted(index))
            .await
            .map_err(sm_error)?
    }

    /// The current state.
    pub fn state(&self) -> Arc<ControllerState> {
        self.shared.state.borrow().clone()
    }

    /// Watches the state.
    pub fn watch(&self) -> watch::Receiver<Arc<ControllerState>> {
        self.shared.state.subscribe()
    }

    /// Writes `bytes` (the encoding of `state`) as the snapshot file, unless a snapshot at or
    /// after it exists already.
    async fn persist(
        &self,
        state: &ControllerState,
        bytes: Vec<u8>,
    ) -> Result<Snapshot<TypeConfig>, StorageError> {
        let _writing = self.shared.snapshot_write.lock().await;
        let current = self.shared.snapshot.lock().map_err(sm_error)?.clone();
        if let Some((meta, bytes)) = current
            && meta.last_log_id >= state.last_applied
        {
            return Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(bytes)),
            });
        }
        let dir = self.shared.dir.clone();
        let config = self.shared.log_config.clone();
        let payload = bytes.clone();
        tokio::task::spawn_blocking(move || {
            weft_storage::snapshot::write_snapshot(&dir, &payload, &config)
        })
        .await
        .map_err(sm_error)?
        .map_err(sm_error)?;
        let meta = meta_of(state);
        *self.shared.snapshot.lock().map_err(sm_error)? = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ControllerStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let state = self.state();
        let bytes = encode(&state)?;
        let snapshot = self.persist(&state, bytes).await?;
        self.report_snapshot(&snapshot.meta).await?;
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for ControllerStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let state = self.state();
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Tests: a broker whose copy of the metadata lags behind the controller's leader.
        if let Some(delay) = crate::test_hook_ms("WEFT_TEST_CONTROLLER_APPLY_DELAY_MS") {
            tokio::time::sleep(delay).await;
        }
        let mut state = (*self.state()).clone();
        let mut responses = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            responses.push(match &entry.payload {
                EntryPayload::Blank => Response::Empty,
                EntryPayload::Membership(m) => {
                    state.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    Response::Empty
                }
                EntryPayload::Normal(Command::Controller(command)) => {
                    Response::Controller(state.apply(command))
                }
                EntryPayload::Normal(Command::Records(_) | Command::Lost { .. }) => Response::Empty,
            });
        }
        self.shared.state.send_replace(Arc::new(state));
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
        _meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state = decode(&data).map_err(sm_error)?;
        let persisted = self.persist(&state, data).await?;
        self.shared.state.send_replace(Arc::new(state));
        // Now openraft's purge through the snapshot may run.
        self.report_snapshot(&persisted.meta).await?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        current_snapshot(&self.shared.snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, partitions: u32) -> ControllerCommand {
        ControllerCommand::CreateTopic {
            name: name.into(),
            topic_id: format!("id-{name}"),
            config: TopicConfig {
                partitions,
                ..TopicConfig::default()
            },
            created_at_ms: 1,
            replicas: vec![vec![1]; partitions as usize],
            as_proposed: false,
            replicas_max: None,
        }
    }

    #[test]
    fn topic_lifecycle_in_log_order() {
        let mut state = ControllerState::default();
        let topic = match state.apply(&create("a", 2)) {
            ControllerResponse::Topic(t) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            topic
                .partitions
                .iter()
                .map(|p| p.group_id)
                .collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(
            state.apply(&create("a", 1)),
            ControllerResponse::AlreadyExists("a".into())
        );
        let grown = ControllerCommand::UpdateTopic {
            name: "a".into(),
            config: TopicConfig {
                partitions: 3,
                ..TopicConfig::default()
            },
            new_replicas: vec![vec![1]],
            as_proposed: false,
            replicas_max: None,
            base: None,
        };
        match state.apply(&grown) {
            ControllerResponse::Topic(t) => {
                assert_eq!(t.partitions.len(), 3);
                assert_eq!(t.partitions[2].group_id, 3, "group ids are never reused");
            }
            other => panic!("{other:?}"),
        }
        let shrunk = ControllerCommand::UpdateTopic {
            name: "a".into(),
            config: TopicConfig {
                partitions: 1,
                ..TopicConfig::default()
            },
            new_replicas: vec![],
            as_proposed: false,
            replicas_max: None,
            base: None,
        };
        assert!(matches!(
            state.apply(&shrunk),
            ControllerResponse::Invalid(_)
        ));
        assert_eq!(
            state.apply(&ControllerCommand::DeleteTopic { name: "a".into() }),
            ControllerResponse::Deleted {
                topic_id: "id-a".into()
            }
        );
        assert_eq!(
            state.apply(&ControllerCommand::DeleteTopic { name: "a".into() }),
            ControllerResponse::NotFound("a".into())
        );
        match state.apply(&create("a", 1)) {
            ControllerResponse::Topic(t) => assert_eq!(t.partitions[0].group_id, 4),
            other => panic!("{other:?}"),
        }
    }

    /// A broker registered by a build before feature levels (its entry has no `features`) holds
    /// the cluster below level 1 until it registers again from a newer build.
    #[test]
    fn an_older_brokers_registration_holds_the_feature_level_back() {
        let mut state = ControllerState::default();
        register(&mut state, 1);
        let old: ControllerCommand = serde_json::from_str(
            r#"{"RegisterBroker":{"node_id":2,"peer_address":"127.0.0.2:7401","client_address":"127.0.0.2:7400"}}"#,
        )
        .expect("an older build's entry decodes");
        state.apply(&old);
        assert_eq!(state.behind(1), Some((2, 0)));
        assert_eq!(state.behind(0), None);
        // An older snapshot's broker (no `features` field) reads as level 0 too.
        let mut snapshot = serde_json::to_value(&state).expect("encode");
        snapshot["brokers"]["1"]
            .as_object_mut()
            .expect("broker 1")
            .remove("features");
        let decoded: ControllerState = serde_json::from_value(snapshot).expect("decode");
        assert_eq!(decoded.behind(1), Some((1, 0)));
        register(&mut state, 2);
        assert_eq!(state.behind(FEATURE_LEVEL), None);
    }

    /// Commits stamp their group active at the proposer's time, and a commit of no offsets
    /// only stamps it (offsets, generation and feature level unchanged); stamps never go
    /// back, survive the state's encoding, and a group encoded without one (an older build's)
    /// reads as unknown, as does one an older build's commit reached after a stamp.
    #[test]
    fn commits_stamp_their_group_active() {
        let mut state = ControllerState::default();
        state.apply(&topic_rf("a", 1, 1));
        let commit =
            |offsets: Vec<(u32, u64)>, generation, at_ms| ControllerCommand::CommitOffsets {
                group: "g".into(),
                topic_id: "id-a".into(),
                generation,
                offsets,
                reset: false,
                at_ms,
            };
        assert_eq!(
            state.apply(&commit(vec![(0, 5)], 3, 1_000)),
            ControllerResponse::Committed
        );
        assert_eq!(
            state.apply(&commit(Vec::new(), 0, 2_000)),
            ControllerResponse::Committed
        );
        assert_eq!(
            state.apply(&commit(Vec::new(), 0, 1_500)),
            ControllerResponse::Committed
        );
        let g = state.groups["g"].clone();
        assert_eq!((g.active_ms, g.generation), (2_000, 3));
        assert_eq!(g.offsets["id-a"][&0], 5);
        assert_eq!(state.features_in_use, 0);
        let encoded = serde_json::to_string(&*g).expect("encode");
        let decoded: GroupOffsets = serde_json::from_str(&encoded).expect("decode");
        assert_eq!(decoded, *g);
        let older: GroupOffsets =
            serde_json::from_str(r#"{"generation":3,"offsets":{"id-a":{"0":5}}}"#).expect("decode");
        assert_eq!(older.active_ms, 0);
        // An older build's commit (no time) after the stamp: the time is unknown again.
        assert_eq!(
            state.apply(&commit(vec![(0, 6)], 3, 0)),
            ControllerResponse::Committed
        );
        assert_eq!(state.groups["g"].active_ms, 0);
    }

    /// The feature level in use rises with the first command that needs it (a deny rule, an
    /// offset reset), never with what every build reads (an allow rule, a commit), and an older
    /// snapshot (no field) reads as none used.
    #[test]
    fn commands_that_need_a_level_record_it_as_in_use() {
        use crate::acl::{AclRule, Operation, Permission};
        let mut state = ControllerState::default();
        // A build of level 1: the cluster id (level 2) is not set.
        register_at(&mut state, 1, 1);
        let mut rule = AclRule {
            identity: "intern".into(),
            resource: "topic:a".into(),
            operations: vec![Operation::Publish],
            permission: Permission::Allow,
        };
        state.apply(&ControllerCommand::AddAcl(rule.clone()));
        state.apply(&topic_rf("a", 1, 1));
        let commit = |reset| ControllerCommand::CommitOffsets {
            group: "g".into(),
            topic_id: "id-a".into(),
            generation: 1,
            offsets: vec![(0, 0)],
            reset,
            at_ms: 0,
        };
        assert_eq!(state.apply(&commit(false)), ControllerResponse::Committed);
        assert_eq!(state.features_in_use, 0);
        assert_eq!(state.apply(&commit(true)), ControllerResponse::Committed);
        assert_eq!(state.features_in_use, 1);
        let mut other = ControllerState::default();
        rule.permission = Permission::Deny;
        other.apply(&ControllerCommand::AddAcl(rule));
        assert_eq!(other.features_in_use, 1);
        let mut snapshot = serde_json::to_value(&other).expect("encode");
        snapshot
            .as_object_mut()
            .expect("object")
            .remove("features_in_use");
        let mut decoded: ControllerState = serde_json::from_value(snapshot).expect("decode");
        assert_eq!(decoded.features_in_use, 0);
        // Read as a snapshot, its deny rule shows the level was used.
        decoded.infer_features_in_use();
        assert_eq!(decoded.features_in_use, 1);
        let bytes = super::encode(&decoded).expect("encode");
        assert_eq!(super::decode(&bytes).expect("decode").features_in_use, 1);
    }

    /// A change of `name`'s retention (and nothing else) made from `base`.
    fn retention_change(name: &str, base: &TopicMeta, retention_ms: u64) -> ControllerCommand {
        ControllerCommand::UpdateTopic {
            name: name.into(),
            config: TopicConfig {
                retention_ms: Some(retention_ms),
                ..base.config.clone()
            },
            new_replicas: vec![],
            as_proposed: false,
            replicas_max: None,
            base: Some(TopicBase {
                topic_id: base.topic_id.clone(),
                config: base.config.clone(),
            }),
        }
    }

    /// Two changes made from the same topic: the second is refused as made from a topic that
    /// has changed (it would put the first one's fields back); so is one made from a topic of
    /// the same name that was deleted and created again. While a broker below the level runs,
    /// the change applies as an older build applies it.
    #[test]
    fn a_topic_change_applies_only_over_the_topic_it_was_made_from() {
        let mut state = ControllerState::default();
        register(&mut state, 1);
        let ControllerResponse::Topic(base) = state.apply(&create("a", 1)) else {
            panic!("created")
        };
        let ControllerResponse::Topic(first) = state.apply(&retention_change("a", &base, 1000))
        else {
            panic!("the first change applies")
        };
        assert_eq!(first.config.retention_ms, Some(1000));
        assert_eq!(state.features_in_use, UPDATE_BASE_LEVEL);
        assert_eq!(
            state.apply(&retention_change("a", &base, 2000)),
            ControllerResponse::Changed("a".into())
        );
        assert_eq!(
            state.topics["a"].config.retention_ms,
            Some(1000),
            "unchanged"
        );
        // Made again from the topic as it now is: applied.
        let ControllerResponse::Topic(second) = state.apply(&retention_change("a", &first, 2000))
        else {
            panic!("the change made again applies")
        };
        assert_eq!(second.config.retention_ms, Some(2000));
        // A topic of that name created again.
        state.apply(&ControllerCommand::DeleteTopic { name: "a".into() });
        let mut again = create("a", 1);
        if let ControllerCommand::CreateTopic { topic_id, .. } = &mut again {
            *topic_id = "id-a-again".into();
        }
        let ControllerResponse::Topic(recreated) = state.apply(&again) else {
            panic!("created again")
        };
        let mut stale = second.clone();
        stale.config = recreated.config.clone();
        assert_eq!(
            state.apply(&retention_change("a", &stale, 3000)),
            ControllerResponse::Changed("a".into())
        );
        // A broker of level 4 in the cluster: applied whatever the topic is now.
        let mut older = ControllerState::default();
        register(&mut older, 1);
        register_at(&mut older, 2, UPDATE_BASE_LEVEL - 1);
        let ControllerResponse::Topic(base) = older.apply(&create("a", 1)) else {
            panic!("created")
        };
        older.apply(&retention_change("a", &base, 1000));
        let ControllerResponse::Topic(t) = older.apply(&retention_change("a", &base, 2000)) else {
            panic!("applied as a level-4 build applies it")
        };
        assert_eq!(t.config.retention_ms, Some(2000));
        assert!(older.features_in_use < UPDATE_BASE_LEVEL);
    }

    fn register(state: &mut ControllerState, node: NodeId) {
        register_at(state, node, FEATURE_LEVEL);
    }

    /// A broker registering again while it drains (a build upgrade's registration) keeps its
    /// draining mark; its first registration after a restart (not draining) clears it.
    #[test]
    fn a_registration_carries_the_draining_mark() {
        let mut state = ControllerState::default();
        let register = |state: &mut ControllerState, draining: bool| {
            state.apply(&ControllerCommand::RegisterBroker {
                node_id: 2,
                peer_address: "127.0.0.2:7401".into(),
                client_address: "127.0.0.2:7400".into(),
                features: FEATURE_LEVEL,
                cluster_id: String::new(),
                draining,
            });
            state.brokers.get(&2).map(|b| b.draining)
        };
        assert_eq!(register(&mut state, false), Some(false));
        state.apply(&ControllerCommand::SetDraining {
            node_id: 2,
            draining: true,
        });
        assert_eq!(register(&mut state, true), Some(true));
        assert_eq!(state.features_in_use, DRAINING_MARK_LEVEL);
        assert_eq!(register(&mut state, false), Some(false));
        // With a broker of an older build registered (it applies the mark as not draining),
        // the mark is not applied, nor the level raised, whatever the proposer saw.
        let mut mixed = ControllerState::default();
        register_at(&mut mixed, 3, DRAINING_MARK_LEVEL - 1);
        assert_eq!(register(&mut mixed, true), Some(false));
        assert!(mixed.features_in_use < DRAINING_MARK_LEVEL);
        // An entry of an older build (no field) reads as not draining.
        let older: ControllerCommand = serde_json::from_str(
            r#"{"RegisterBroker":{"node_id":2,"peer_address":"a","client_address":"b"}}"#,
        )
        .expect("an older entry reads");
        assert!(matches!(
            older,
            ControllerCommand::RegisterBroker {
                draining: false,
                ..
            }
        ));
    }

    /// Registers `node` as a build of feature level `features`.
    fn register_at(state: &mut ControllerState, node: NodeId, features: u32) {
        state.apply(&ControllerCommand::RegisterBroker {
            node_id: node,
            peer_address: format!("127.0.0.{node}:7401"),
            client_address: format!("127.0.0.{node}:7400"),
            features,
            cluster_id: format!("cluster-of-{node}"),
            draining: false,
        });
    }

    /// A new cluster's id is its first registered broker's, whoever registers later. In a
    /// cluster with a broker of an older build (which would drop the id from its snapshots),
    /// the id waits until that broker registers on a build of level 2; the level is then in
    /// use (no older build may run again), also as read from a snapshot without the field.
    #[test]
    fn the_cluster_id_is_set_once_every_broker_stores_it() {
        let mut state = ControllerState::default();
        register(&mut state, 1);
        register(&mut state, 2);
        assert_eq!(state.cluster_id, "cluster-of-1");
        assert_eq!(state.features_in_use, CLUSTER_ID_LEVEL);
        let bytes = super::encode(&state).expect("encode");
        assert_eq!(
            super::decode(&bytes).expect("decode").cluster_id,
            "cluster-of-1"
        );

        let mut upgrading = ControllerState::default();
        let old: ControllerCommand = serde_json::from_str(
            r#"{"RegisterBroker":{"node_id":3,"peer_address":"127.0.0.3:7401","client_address":"127.0.0.3:7400"}}"#,
        )
        .expect("an older build's entry decodes");
        upgrading.apply(&old);
        register_at(&mut upgrading, 2, 1);
        register(&mut upgrading, 1);
        assert_eq!(upgrading.cluster_id, "", "node 3 (level 0) would drop it");
        register(&mut upgrading, 3);
        assert_eq!(upgrading.cluster_id, "", "node 2 (level 1) would drop it");
        assert_eq!(upgrading.features_in_use, 0);
        register(&mut upgrading, 2);
        assert_eq!(upgrading.cluster_id, "cluster-of-2");
        assert_eq!(upgrading.features_in_use, CLUSTER_ID_LEVEL);
        register(&mut upgrading, 1);
        assert_eq!(upgrading.cluster_id, "cluster-of-2");

        let bytes = super::encode(&upgrading).expect("encode");
        assert_eq!(
            super::decode(&bytes).expect("decode").cluster_id,
            "cluster-of-2"
        );

        // A snapshot of a level-1 build that set an id without the gate (as one briefly did)
        // reads without it, as a replay of its log on this build gives.
        let mut early = ControllerState::default();
        register_at(&mut early, 1, 1);
        early.cluster_id = "cluster-of-1".into();
        let bytes = super::encode(&early).expect("encode");
        let decoded = super::decode(&bytes).expect("decode");
        assert_eq!(
            (decoded.cluster_id.as_str(), decoded.features_in_use),
            ("", 0)
        );
        let mut replayed = ControllerState::default();
        register_at(&mut replayed, 1, 1);
        assert_eq!(replayed.cluster_id, decoded.cluster_id);
    }

    fn topic_rf(name: &str, partitions: u32, rf: u32) -> ControllerCommand {
        ControllerCommand::CreateTopic {
            name: name.into(),
            topic_id: format!("id-{name}"),
            config: TopicConfig {
                partitions,
                replication_factor: rf,
                ..TopicConfig::default()
            },
            created_at_ms: 1,
            replicas: vec![vec![1]; partitions as usize],
            as_proposed: false,
            replicas_max: None,
        }
    }

    /// Applies the moves as the partitions' leaders would end them.
    fn run_moves(state: &mut ControllerState, plan: &[PlannedMove]) {
        for m in plan {
            match state.apply(&m.command()) {
                ControllerResponse::Topic(_) => {}
                other => panic!("{m}: {other:?}"),
            }
            let topic_id = state.topics[&m.topic].topic_id.clone();
            assert_eq!(
                state.apply(&ControllerCommand::FinishMove {
                    topic_id,
                    partition: m.partition,
                    replicas: m.to.clone(),
                }),
                ControllerResponse::Topic(TopicMeta::clone(&state.topics[&m.topic])).clone_with(
                    |t| {
                        t.partitions[m.partition as usize].replicas = m.to.clone();
                        t.partitions[m.partition as usize].target = None;
                        t.partitions[m.partition as usize].adding.clear();
                    }
                )
            );
        }
    }

    impl ControllerResponse {
        fn clone_with(self, f: impl FnOnce(&mut TopicMeta)) -> ControllerResponse {
            match self {
                ControllerResponse::Topic(mut t) => {
                    f(&mut t);
                    ControllerResponse::Topic(t)
                }
                other => other,
            }
        }
    }

    fn per_broker(state: &ControllerState) -> (BTreeMap<NodeId, usize>, BTreeMap<NodeId, usize>) {
        let (mut replicas, mut firsts) = (BTreeMap::new(), BTreeMap::new());
        for id in state.brokers.keys() {
            replicas.insert(*id, 0);
            firsts.insert(*id, 0);
        }
        for t in state.topics.values() {
            for p in &t.partitions {
                let mut unique = p.replicas.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!(unique.len(), p.replicas.len(), "{p:?}");
                for r in &p.replicas {
                    *replicas.entry(*r).or_default() += 1;
                }
                *firsts.entry(p.replicas[0]).or_default() += 1;
            }
        }
        (replicas, firsts)
    }

    fn spread(counts: &BTreeMap<NodeId, usize>) -> usize {
        counts.values().max().unwrap() - counts.values().min().unwrap()
    }

    #[test]
    fn a_rebalance_spreads_replicas_and_leaders_over_an_added_broker() {
        let mut state = ControllerState::default();
        for node in 1..=3 {
            register(&mut state, node);
        }
        state.apply(&topic_rf("a", 6, 3));
        state.apply(&topic_rf("b", 5, 2));
        register(&mut state, 4);
        let (before, _) = per_broker(&state);
        assert_eq!(before[&4], 0);
        let plan = state.plan_rebalance();
        assert!(!plan.is_empty());
        run_moves(&mut state, &plan);
        let (replicas, firsts) = per_broker(&state);
        assert!(spread(&replicas) <= 1, "{replicas:?}");
        assert!(spread(&firsts) <= 1, "{firsts:?}");
        assert_eq!(replicas.values().sum::<usize>(), 6 * 3 + 5 * 2);
        for t in state.topics.values() {
            for p in &t.partitions {
                assert_eq!(p.replicas.len() as u32, t.config.replication_factor);
                assert_eq!(p.target, None);
            }
        }
        // Balanced: nothing more to do.
        assert_eq!(state.plan_rebalance(), Vec::new());
    }

    /// A broker's removal shrinks partitions that no other broker can take (three brokers, a
    /// factor of 3); a broker added later gets them back to the factor their topic asked for
    /// at the next rebalance. Before, a rebalance only moved replicas around: the partitions
    /// stayed under-replicated for good.
    #[test]
    fn a_rebalance_gives_shrunk_partitions_their_factor_back() {
        let mut state = ControllerState::default();
        for node in 1..=3 {
            register(&mut state, node);
        }
        state.apply(&topic_rf("a", 4, 3));
        state.apply(&ControllerCommand::SetRemoving {
            node_id: 3,
            keep_one: true,
        });
        let (plan, stuck) = state.plan_removal(3);
        assert!(stuck.is_empty());
        run_moves(&mut state, &plan);
        assert_eq!(
            state.apply(&ControllerCommand::RemoveBroker { node_id: 3 }),
            ControllerResponse::Registered
        );
        assert!(
            state.topics["a"]
                .partitions
                .iter()
                .all(|p| p.replicas.len() == 2),
            "shrunk: {:?}",
            state.topics["a"].partitions
        );
        register(&mut state, 4);
        let plan = state.plan_rebalance();
        run_moves(&mut state, &plan);
        for p in &state.topics["a"].partitions {
            assert_eq!(p.replicas.len(), 3, "{p:?}");
            assert!(p.replicas.contains(&4), "{p:?}");
        }
        let (replicas, _) = per_broker(&state);
        assert!(spread(&replicas) <= 1, "{replicas:?}");
        // Nothing more to do, and a factor above the brokers' count asks for no more.
        assert_eq!(state.plan_rebalance(), Vec::new());
        state.apply(&topic_rf("b", 2, 5));
        assert!(
            state
                .plan_rebalance()
                .iter()
                .all(|m| m.to.len() == m.from.len()),
            "{:?}",
            state.plan_rebalance()
        );
    }

    /// Moves go only to the brokers the proposer found usable (up, serving, not draining):
    /// before, a rebalance or a removal sent replicas to the broker with the fewest, even one
    /// that was down or about to stop, and the move waited for it for as long as it stayed
    /// down (a removal that needed that move never finished).
    #[test]
    fn moves_go_only_to_usable_brokers() {
        let mut state = ControllerState::default();
        for node in 1..=3 {
            register(&mut state, node);
        }
        state.apply(&topic_rf("a", 6, 2));
        register(&mut state, 4);
        let all: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        assert!(
            state
                .plan_rebalance_onto(&all, usize::MAX)
                .iter()
                .any(|m| m.to.contains(&4)),
            "an empty broker gets replicas"
        );
        let without_4: BTreeSet<NodeId> = [1, 2, 3].into();
        let plan = state.plan_rebalance_onto(&without_4, usize::MAX);
        assert!(plan.iter().all(|m| !m.to.contains(&4)), "{plan:?}");
        let (plan, stuck) = state.plan_removal_onto(1, &without_4, &BTreeSet::new(), usize::MAX);
        assert!(stuck.is_empty());
        assert!(!plan.is_empty());
        for m in &plan {
            assert!(!m.to.contains(&4) && !m.to.contains(&1), "{m}");
        }
        // A partition whose only possible new home is not usable now waits (planned again
        // later) rather than shrink for good.
        state.apply(&topic_rf("c", 1, 3));
        let c0 = state.topics["c"].partitions[0].replicas.clone();
        assert_eq!(c0, [1, 2, 3]);
        let (plan, stuck) =
            state.plan_removal_onto(1, &[2, 3].into(), &BTreeSet::new(), usize::MAX);
        assert!(plan.iter().all(|m| m.topic != "c"), "{plan:?}");
        assert!(stuck.iter().any(|s| s.starts_with("c/0")), "{stuck:?}");
    }

    /// Rebalances and removals give no broker more than `max` replicas: a new broker is filled
    /// up to the limit only, and a partition that only full brokers could take waits (it is not
    /// shrunk).
    #[test]
    fn moves_give_no_broker_more_than_its_limit() {
        let mut state = ControllerState::default();
        for node in 1..=3 {
            register(&mut state, node);
        }
        state.apply(&topic_rf("a", 6, 2));
        register(&mut state, 4);
        let all: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        let to_4 = |plan: &[PlannedMove]| plan.iter().filter(|m| m.to.contains(&4)).count();
        assert_eq!(to_4(&state.plan_rebalance_onto(&all, usize::MAX)), 3);
        assert_eq!(to_4(&state.plan_rebalance_onto(&all, 1)), 1);
        assert_eq!(to_4(&state.plan_rebalance_onto(&all, 4)), 3);
        // Brokers 1-3 hold 4 replicas each and broker 4 none: with a limit of 4, the 4
        // replicas of broker 1 can only go to broker 4.
        let (plan, stuck) = state.plan_removal_onto(1, &all, &BTreeSet::new(), 4);
        assert!(stuck.is_empty(), "{stuck:?}");
        assert_eq!(to_4(&plan), 4, "{plan:?}");
        let (plan, stuck) = state.plan_removal_onto(1, &all, &BTreeSet::new(), 3);
        assert_eq!(to_4(&plan), 3, "{plan:?}");
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        assert!(stuck[0].contains("partition_replicas_max (3)"), "{stuck:?}");
        assert!(
            plan.iter().all(|m| m.to.len() == 2),
            "none shrinks: {plan:?}"
        );
    }

    /// `partition_replicas_max` is checked again when a placement or a move is applied: two
    /// creations, two growths or two moves checked by their proposers against the same state
    /// (each broker checks its own copy before it proposes) cannot both pass. A refused one
    /// changes nothing (no group id handed out). With a broker of level 5 (which applies them
    /// without the check), every replica applies them unchecked too, as before.
    #[test]
    fn changes_checked_against_the_same_state_cannot_both_pass_the_limit() {
        let with_limit = |mut command: ControllerCommand, max: u64| {
            if let ControllerCommand::CreateTopic {
                as_proposed,
                replicas_max,
                ..
            } = &mut command
            {
                *as_proposed = true;
                *replicas_max = Some(max);
            }
            command
        };
        // Two brokers; every partition of "a" and "b" placed on broker 1 alone (RF 1).
        let mut state = ControllerState::default();
        register(&mut state, 1);
        register(&mut state, 2);
        assert!(matches!(
            state.apply(&with_limit(topic_rf("a", 2, 1), 3)),
            ControllerResponse::Topic(_)
        ));
        let groups = state.next_group_id;
        match state.apply(&with_limit(topic_rf("b", 2, 1), 3)) {
            ControllerResponse::LimitReached { what, max } => {
                assert_eq!(max, 3);
                assert!(what.contains("broker 1 holds 2"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!state.topics.contains_key("b"));
        assert_eq!(state.next_group_id, groups);
        assert_eq!(state.features_in_use, REPLICAS_MAX_LEVEL);
        // Growing "a" by two partitions on broker 1: past the limit too.
        let mut config = state.topics["a"].config.clone();
        config.partitions = 4;
        let grow = ControllerCommand::UpdateTopic {
            name: "a".into(),
            config,
            new_replicas: vec![vec![1], vec![1]],
            as_proposed: true,
            base: None,
            replicas_max: Some(3),
        };
        assert!(
            matches!(state.apply(&grow), ControllerResponse::LimitReached { .. }),
            "growth past the limit"
        );
        assert_eq!(state.topics["a"].partitions.len(), 2);
        // Both partitions of "a" planned onto broker 2 from the same state, limit 1: the first
        // move is applied, the second refused (broker 2 is getting one already).
        let plan: Vec<PlannedMove> = (0..2)
            .map(|p| PlannedMove {
                topic: "a".into(),
                topic_id: "id-a".into(),
                partition: p,
                from: vec![1],
                to: vec![2],
            })
            .collect();
        assert!(matches!(
            state.apply(&plan[0].command_within(1)),
            ControllerResponse::Topic(_)
        ));
        assert!(
            matches!(
                state.apply(&plan[1].command_within(1)),
                ControllerResponse::LimitReached { .. }
            ),
            "a second move onto a full broker"
        );
        assert_eq!(state.topics["a"].partitions[1].target, None);
        // A broker of level 5 applies them unchecked: so does every replica.
        let mut older = ControllerState::default();
        register(&mut older, 1);
        register_at(&mut older, 2, REPLICAS_MAX_LEVEL - 1);
        for name in ["a", "b"] {
            assert!(matches!(
                older.apply(&with_limit(topic_rf(name, 2, 1), 3)),
                ControllerResponse::Topic(_)
            ));
        }
        assert!(older.features_in_use < REPLICAS_MAX_LEVEL);
    }

    /// At the limit exactly: a broker may reach `partition_replicas_max`, not pass it, whether
    /// the cluster's partitions are few enough to skip the count or not.
    #[test]
    fn a_broker_may_reach_the_limit_and_not_pass_it() {
        let on = |name: &str, broker: NodeId| ControllerCommand::CreateTopic {
            name: name.into(),
            topic_id: format!("id-{name}"),
            config: TopicConfig {
                partitions: 1,
                replication_factor: 1,
                ..TopicConfig::default()
            },
            created_at_ms: 1,
            replicas: vec![vec![broker]],
            as_proposed: true,
            replicas_max: Some(3),
        };
        let mut state = ControllerState::default();
        register(&mut state, 1);
        register(&mut state, 2);
        for name in ["a", "b", "c"] {
            assert!(
                matches!(state.apply(&on(name, 1)), ControllerResponse::Topic(_)),
                "{name}: broker 1 reaches 3"
            );
        }
        assert!(matches!(
            state.apply(&on("d", 1)),
            ControllerResponse::LimitReached { max: 3, .. }
        ));
        assert!(matches!(
            state.apply(&on("d", 2)),
            ControllerResponse::Topic(_)
        ));
    }

    /// The limit counts what a broker holds or is getting: a replica moving off a broker still
    /// counts there until its move ends, and a rebalance giving an under-replicated partition
    /// its factor back puts no replica on a full broker (helper-89).
    #[test]
    fn the_limit_counts_replicas_still_leaving_and_bounds_the_factor_regrown() {
        let mut state = ControllerState::default();
        register(&mut state, 1);
        // Placed with one broker: a factor of 1, under-replicated.
        state.apply(&topic_rf("a", 3, 2));
        register(&mut state, 2);
        register(&mut state, 3);
        let all: BTreeSet<NodeId> = [1, 2, 3].into();
        let grown = |plan: &[PlannedMove]| plan.iter().filter(|m| m.to.len() == 2).count();
        assert_eq!(grown(&state.plan_rebalance_onto(&all, usize::MAX)), 3);
        // Brokers 2 and 3 have room for one replica each.
        let plan = state.plan_rebalance_onto(&all, 1);
        assert_eq!(grown(&plan), 2, "{plan:?}");
        for b in [2, 3] {
            assert_eq!(
                plan.iter().filter(|m| m.to.contains(&b)).count(),
                1,
                "{plan:?}"
            );
        }
        // a/0 moves from 1 to 2: until the move ends, both hold it.
        let moving = PlannedMove {
            topic: "a".into(),
            topic_id: state.topics["a"].topic_id.clone(),
            partition: 0,
            from: vec![1],
            to: vec![2],
        };
        assert!(matches!(
            state.apply(&moving.command()),
            ControllerResponse::Topic(_)
        ));
        assert_eq!(state.replicas_on(1), 3, "still leaving, still held");
        assert_eq!(state.replicas_on(2), 1);
    }

    /// A removal whose move sends a replica to a broker that then goes down is planned again
    /// onto a usable broker (before, the move waited for that broker for as long as it stayed
    /// down, and the removal with it); with no other broker, it waits. A broker that only
    /// missed a check keeps its move (before, one slow answer sent the move elsewhere and threw
    /// away what the new replica had caught up).
    #[test]
    fn a_removal_plans_again_a_move_whose_new_replica_went_down() {
        let mut state = ControllerState::default();
        for node in 1..=5 {
            register(&mut state, node);
        }
        let all: BTreeSet<NodeId> = [1, 2, 3, 4, 5].into();
        create_proposed(&mut state, "m", 1, 3, &[1, 2, 3].into());
        assert_eq!(state.topics["m"].partitions[0].replicas, [1, 2, 3]);
        state.apply(&ControllerCommand::SetRemoving {
            node_id: 3,
            keep_one: true,
        });
        // The removal sends partition 0 to 4 (fewest replicas first: 4 and 5 have none).
        let (plan, stuck) = state.plan_removal_onto(3, &all, &BTreeSet::new(), usize::MAX);
        assert!(stuck.is_empty(), "{stuck:?}");
        let first = plan.iter().find(|m| m.topic == "m").expect("a move of m/0");
        assert_eq!(first.to, [1, 2, 4]);
        assert!(matches!(
            state.apply(&first.command()),
            ControllerResponse::Topic(_)
        ));
        // While 4 answers, the move stands.
        let (plan, _) = state.plan_removal_onto(3, &all, &BTreeSet::new(), usize::MAX);
        assert!(plan.iter().all(|m| m.topic != "m"), "{plan:?}");
        // 4 misses a check (busy): not usable for new moves, but its move stands.
        let (plan, _) =
            state.plan_removal_onto(3, &[1, 2, 3, 5].into(), &BTreeSet::new(), usize::MAX);
        assert!(plan.iter().all(|m| m.topic != "m"), "{plan:?}");
        // 4 stays down: the move goes to 5 instead.
        let (plan, stuck) =
            state.plan_removal_onto(3, &[1, 2, 3, 5].into(), &[4].into(), usize::MAX);
        assert!(stuck.is_empty(), "{stuck:?}");
        let again = plan
            .iter()
            .find(|m| m.topic == "m")
            .expect("m/0 planned again");
        assert_eq!(again.to, [1, 2, 5]);
        assert_eq!(again.from, [1, 2, 3, 4]);
        assert!(matches!(
            state.apply(&again.command()),
            ControllerResponse::Topic(_)
        ));
        assert_eq!(state.topics["m"].partitions[0].target, Some(vec![1, 2, 5]));
        // 5 goes down too, 4 still down: nothing usable to go to; the move waits.
        let (plan, stuck) =
            state.plan_removal_onto(3, &[1, 2, 3].into(), &[4, 5].into(), usize::MAX);
        assert!(plan.iter().all(|m| m.topic != "m"), "{plan:?}");
        assert!(stuck.iter().any(|s| s.starts_with("m/0")), "{stuck:?}");
    }

    /// Two brokers removed at once share their replicas out over the others: planned each from
    /// the same state (as the controller's tick did), both removals sent every replica to the
    /// one empty broker, which ended with twice what the others held.
    #[test]
    fn brokers_removed_together_do_not_pile_their_replicas_onto_one_broker() {
        let mut state = ControllerState::default();
        for node in 1..=5 {
            register(&mut state, node);
        }
        create_proposed(&mut state, "a", 10, 2, &[1, 2, 3, 4, 5].into());
        register(&mut state, 6);
        for node in [1, 2] {
            state.apply(&ControllerCommand::SetRemoving {
                node_id: node,
                keep_one: true,
            });
        }
        let usable: BTreeSet<NodeId> = [3, 4, 5, 6].into();
        let plans = state.plan_removals_onto(&[1, 2], &usable, &BTreeSet::new(), usize::MAX);
        assert_eq!(plans.len(), 2);
        let mut after = state.clone();
        let mut refused = Vec::new();
        for (node, plan, stuck) in &plans {
            assert!(stuck.is_empty(), "{node}: {stuck:?}");
            assert!(!plan.is_empty(), "{node} has replicas to move");
            // Started in turn, as the tick proposes them.
            for m in plan {
                if !matches!(after.apply(&m.command()), ControllerResponse::Topic(_)) {
                    refused.push(m.to_string());
                }
            }
        }
        let counts = after.replica_counts();
        assert_eq!(counts.get(&1), None, "{counts:?}");
        assert_eq!(counts.get(&2), None, "{counts:?}");
        assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
        let (least, most) = (counts.values().min(), counts.values().max());
        assert!(
            most.zip(least).is_some_and(|(m, l)| m - l <= 1),
            "replicas per broker after both removals: {counts:?}"
        );
        // A partition on both brokers is redirected by the second plan, from what the first
        // left: every move is accepted.
        assert_eq!(refused, Vec::<String>::new());
    }

    /// Creates `name` as the proposer does: placed on what `usable` holds, to stand as
    /// proposed while every broker reads that.
    fn create_proposed(
        state: &mut ControllerState,
        name: &str,
        partitions: u32,
        rf: u32,
        usable: &BTreeSet<NodeId>,
    ) -> ControllerResponse {
        let ControllerCommand::CreateTopic {
            name,
            topic_id,
            config,
            created_at_ms,
            ..
        } = topic_rf(name, partitions, rf)
        else {
            unreachable!()
        };
        let replicas = state.propose_placement(0, partitions, rf, usable);
        state.apply(&ControllerCommand::CreateTopic {
            name,
            topic_id,
            config,
            created_at_ms,
            replicas,
            as_proposed: state.behind(PLACEMENT_LEVEL).is_none(),
            replicas_max: None,
        })
    }

    fn preferred_leaders(state: &ControllerState) -> Vec<NodeId> {
        state
            .topics
            .values()
            .flat_map(|t| t.partitions.iter().map(|p| p.replicas[0]))
            .collect()
    }

    /// A new partition is led only by a broker that is up: one whose first replica was down
    /// stayed without a leader (its group is started by its first replica) until that broker
    /// came back. Brokers that are down still take the other replicas when too few are up, so
    /// the topic keeps its replication factor. Before, partitions rotated over every registered
    /// broker, down or not.
    #[test]
    fn new_partitions_are_led_by_brokers_that_are_up() {
        let mut state = ControllerState::default();
        for node in 1..=3 {
            register_at(&mut state, node, FEATURE_LEVEL);
        }
        let up: BTreeSet<NodeId> = [1, 2].into();
        let ControllerResponse::Topic(topic) = create_proposed(&mut state, "t", 6, 3, &up) else {
            panic!("created")
        };
        assert_eq!(state.features_in_use, PLACEMENT_LEVEL);
        for p in &topic.partitions {
            assert_ne!(p.replicas[0], 3, "{p:?}");
            let mut sorted = p.replicas.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [1, 2, 3], "the factor is kept: {p:?}");
        }
        let firsts = preferred_leaders(&state);
        assert_eq!(firsts.iter().filter(|b| **b == 1).count(), 3, "{firsts:?}");
        // With a factor of 2 and two brokers up, the one down gets nothing.
        let ControllerResponse::Topic(two) = create_proposed(&mut state, "u", 4, 2, &up) else {
            panic!("created")
        };
        assert!(two.partitions.iter().all(|p| !p.replicas.contains(&3)));
    }

    /// Topics of one partition each spread their leaders over the brokers (each placed where
    /// the fewest partitions are led): before, every one of them was led by the first broker.
    #[test]
    fn single_partition_topics_spread_their_leaders() {
        let mut state = ControllerState::default();
        for node in 1..=3 {
            register_at(&mut state, node, FEATURE_LEVEL);
        }
        let all: BTreeSet<NodeId> = [1, 2, 3].into();
        for name in ["a", "b", "c", "d", "e", "f"] {
            create_proposed(&mut state, name, 1, 3, &all);
        }
        let firsts = preferred_leaders(&state);
        for node in 1..=3 {
            assert_eq!(
                firsts.iter().filter(|b| **b == node).count(),
                2,
                "{firsts:?}"
            );
        }
    }

    /// A broker that joined empty does not lead every partition of the next topic (it has the
    /// fewest leaderships of the cluster): the topic spreads its own leaders first.
    #[test]
    fn a_new_topic_spreads_its_leaders_even_onto_an_unbalanced_cluster() {
        let mut state = ControllerState::default();
        for node in 1..=3 {
            register_at(&mut state, node, FEATURE_LEVEL);
        }
        let all: BTreeSet<NodeId> = [1, 2, 3].into();
        create_proposed(&mut state, "old", 9, 3, &all);
        register_at(&mut state, 4, FEATURE_LEVEL);
        let all: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        let ControllerResponse::Topic(topic) = create_proposed(&mut state, "new", 8, 3, &all)
        else {
            panic!("created")
        };
        let led_by_4 = topic
            .partitions
            .iter()
            .filter(|p| p.replicas[0] == 4)
            .count();
        assert_eq!(led_by_4, 2, "{:?}", topic.partitions);
    }

    /// The proposed placement stands only while every broker reads it (an older broker places
    /// by rotation, and the controller's replicas must agree), and only if it is still valid
    /// when applied (a broker being removed meanwhile, a factor not kept): otherwise the
    /// rotation places the partitions.
    #[test]
    fn a_proposed_placement_stands_only_when_every_broker_reads_it_and_it_is_valid() {
        let up: BTreeSet<NodeId> = [2, 3].into();
        let mut older = ControllerState::default();
        register_at(&mut older, 1, LAST_BROKER_CHECK_LEVEL);
        for node in 2..=3 {
            register_at(&mut older, node, FEATURE_LEVEL);
        }
        let command = |replicas: Vec<Vec<NodeId>>| ControllerCommand::CreateTopic {
            name: "t".into(),
            topic_id: "id-t".into(),
            config: TopicConfig {
                partitions: 1,
                replication_factor: 2,
                ..TopicConfig::default()
            },
            created_at_ms: 1,
            replicas,
            as_proposed: true,
            replicas_max: None,
        };
        let ControllerResponse::Topic(t) = older.apply(&command(vec![vec![3, 2]])) else {
            panic!("created")
        };
        assert_eq!(
            t.partitions[0].replicas,
            [1, 2],
            "rotation on an older cluster"
        );
        assert!(older.features_in_use < PLACEMENT_LEVEL);

        let mut current = ControllerState::default();
        for node in 1..=3 {
            register_at(&mut current, node, FEATURE_LEVEL);
        }
        assert_eq!(current.propose_placement(0, 1, 2, &up), [vec![2, 3]]);
        for invalid in [vec![vec![3]], vec![vec![3, 3]], vec![vec![3, 9]], vec![]] {
            let mut state = current.clone();
            let ControllerResponse::Topic(t) = state.apply(&command(invalid.clone())) else {
                panic!("created")
            };
            assert_eq!(
                t.partitions[0].replicas,
                [1, 2],
                "{invalid:?} is not placed"
            );
            assert!(
                state.features_in_use < PLACEMENT_LEVEL,
                "a placement by rotation uses no new level"
            );
        }
        let ControllerResponse::Topic(t) = current.apply(&command(vec![vec![3, 2]])) else {
            panic!("created")
        };
        assert_eq!(t.partitions[0].replicas, [3, 2]);
    }

    /// Two removals asked at once, each checked against a state without the other, are
    /// checked again when applied: the second would leave no broker to hold the replicas, and
    /// is refused. Before, both were applied: every broker was being removed, no removal could
    /// finish, and no new topic could be placed. The check is a feature level of its own (an
    /// older broker applies the removal without it).
    #[test]
    fn removals_that_would_leave_no_broker_are_refused_when_applied() {
        let mut state = ControllerState::default();
        for node in 1..=2 {
            register(&mut state, node);
        }
        let removing = |node_id| ControllerCommand::SetRemoving {
            node_id,
            keep_one: true,
        };
        assert_eq!(state.apply(&removing(1)), ControllerResponse::Registered);
        assert!(matches!(
            state.apply(&removing(2)),
            ControllerResponse::Invalid(_)
        ));
        assert!(!state.brokers[&2].removing);
        assert_eq!(state.features_in_use, LAST_BROKER_CHECK_LEVEL);
        // An older broker registered since the removal was proposed: applied without the
        // check, as that broker applies it.
        let mut joined = ControllerState::default();
        for node in 1..=2 {
            register(&mut joined, node);
        }
        register_at(&mut joined, 3, CLUSTER_ID_LEVEL);
        joined.apply(&removing(1));
        joined.apply(&removing(3));
        assert_eq!(joined.apply(&removing(2)), ControllerResponse::Registered);
        assert!(joined.features_in_use < LAST_BROKER_CHECK_LEVEL);
        // Without the flag (proposed while a broker is at an older level), as before.
        let mut older = ControllerState::default();
        for node in 1..=2 {
            register(&mut older, node);
        }
        for node_id in 1..=2 {
            assert_eq!(
                older.apply(&ControllerCommand::SetRemoving {
                    node_id,
                    keep_one: false
                }),
                ControllerResponse::Registered
            );
        }
        assert!(older.features_in_use < LAST_BROKER_CHECK_LEVEL);
    }

    #[test]
    fn a_removal_moves_every_replica_off_the_broker_and_keeps_the_factor() {
        let mut state = ControllerState::default();
        for node in 1..=4 {
            register(&mut state, node);
        }
        state.apply(&topic_rf("a", 8, 3));
        state.apply(&ControllerCommand::SetRemoving {
            node_id: 2,
            keep_one: true,
        });
        assert!(matches!(
            state.apply(&ControllerCommand::RemoveBroker { node_id: 2 }),
            ControllerResponse::Invalid(_)
        ));
        let (plan, stuck) = state.plan_removal(2);
        assert!(stuck.is_empty());
        run_moves(&mut state, &plan);
        assert_eq!(state.partitions_on(2).count(), 0);
        for p in &state.topics["a"].partitions {
            assert_eq!(p.replicas.len(), 3, "{p:?}");
        }
        let (replicas, _) = per_broker(&state);
        let others: BTreeMap<NodeId, usize> =
            replicas.into_iter().filter(|(id, _)| *id != 2).collect();
        assert!(spread(&others) <= 1, "{others:?}");
        // A new topic is not placed on it.
        match state.apply(&topic_rf("c", 3, 3)) {
            ControllerResponse::Topic(t) => {
                assert!(t.partitions.iter().all(|p| !p.replicas.contains(&2)))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            state.apply(&ControllerCommand::RemoveBroker { node_id: 2 }),
            ControllerResponse::Registered
        );
        assert!(!state.brokers.contains_key(&2));
    }

    /// A move planned on a topic that was then deleted and created again under the same name
    /// (the same placement) is refused; before, it moved the new topic's replicas.
    #[test]
    fn a_move_planned_on_a_deleted_topic_leaves_the_new_one_alone() {
        let mut state = ControllerState::default();
        for node in 1..=4 {
            register(&mut state, node);
        }
        state.apply(&topic_rf("a", 1, 3));
        let from = state.topics["a"].partitions[0].replicas.clone();
        let planned = PlannedMove {
            topic: "a".into(),
            topic_id: state.topics["a"].topic_id.clone(),
            partition: 0,
            from: from.clone(),
            to: vec![4, 2, 3],
        };
        state.apply(&ControllerCommand::DeleteTopic { name: "a".into() });
        let mut again = topic_rf("a", 1, 3);
        if let ControllerCommand::CreateTopic { topic_id, .. } = &mut again {
            *topic_id = "id-a-again".into();
        }
        state.apply(&again);
        assert_eq!(
            state.topics["a"].partitions[0].replicas, from,
            "same placement"
        );
        match state.apply(&planned.command()) {
            ControllerResponse::Invalid(reason) => {
                assert!(reason.contains("created again"), "{reason}")
            }
            other => panic!("a move planned on the deleted topic: {other:?}"),
        }
        assert_eq!(state.topics["a"].partitions[0].target, None);
        assert_eq!(state.features_in_use, UPDATE_BASE_LEVEL);
        // Planned on the topic as it is: applied.
        let planned = PlannedMove {
            topic_id: "id-a-again".into(),
            ..planned
        };
        assert!(matches!(
            state.apply(&planned.command()),
            ControllerResponse::Topic(_)
        ));
    }

    #[test]
    fn moves_are_checked_against_the_state_they_were_planned_on() {
        let mut state = ControllerState::default();
        for node in 1..=4 {
            register(&mut state, node);
        }
        state.apply(&topic_rf("a", 1, 3));
        let from = state.topics["a"].partitions[0].replicas.clone();
        assert_eq!(from, [1, 2, 3]);
        let to_four = ControllerCommand::MoveReplicas {
            topic: "a".into(),
            partition: 0,
            from: from.clone(),
            replicas: vec![4, 2, 3],
            topic_id: String::new(),
            replicas_max: None,
        };
        let moving = match state.apply(&to_four) {
            ControllerResponse::Topic(t) => t.partitions[0].clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            moving.replicas,
            [1, 2, 3, 4],
            "old and new replicas meanwhile"
        );
        assert_eq!(moving.target.as_deref(), Some(&[4, 2, 3][..]));
        // Planned on the state before the move: refused.
        assert!(matches!(
            state.apply(&to_four),
            ControllerResponse::Invalid(_)
        ));
        // Unknown brokers and repeated ones are refused.
        for bad in [vec![9], vec![1, 1], vec![]] {
            let command = ControllerCommand::MoveReplicas {
                topic: "a".into(),
                partition: 0,
                from: moving.replicas.clone(),
                replicas: bad.clone(),
                topic_id: String::new(),
                replicas_max: None,
            };
            assert!(
                matches!(state.apply(&command), ControllerResponse::Invalid(_)),
                "{bad:?}"
            );
        }
        // Redirected (undone) while it runs: the end of the first move is refused.
        let back = ControllerCommand::MoveReplicas {
            topic: "a".into(),
            partition: 0,
            from: moving.replicas.clone(),
            replicas: from.clone(),
            topic_id: String::new(),
            replicas_max: None,
        };
        assert!(matches!(state.apply(&back), ControllerResponse::Topic(_)));
        let finish = |replicas: Vec<NodeId>| ControllerCommand::FinishMove {
            topic_id: "id-a".into(),
            partition: 0,
            replicas,
        };
        assert!(matches!(
            state.apply(&finish(vec![4, 2, 3])),
            ControllerResponse::Invalid(_)
        ));
        assert!(matches!(
            state.apply(&finish(from.clone())),
            ControllerResponse::Topic(_)
        ));
        assert_eq!(state.topics["a"].partitions[0].replicas, from);
        assert_eq!(state.topics["a"].partitions[0].target, None);
    }
}
