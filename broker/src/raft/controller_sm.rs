//! The controller group's state machine: the cluster's topics and their partitions' Raft groups.
//! Applying a command is deterministic; inputs were validated before they were proposed, and the
//! checks that depend on state (exists / not found) are made here, in log order.

use std::collections::BTreeMap;
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
    /// Nodes holding a replica.
    pub replicas: Vec<NodeId>,
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
    },
    /// Replace a topic's configuration (partitions may only grow).
    UpdateTopic {
        /// Name.
        name: String,
        /// New configuration.
        config: TopicConfig,
        /// Placement of added partitions.
        new_replicas: Vec<Vec<NodeId>>,
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
    },
    /// Forget a consumer group's committed offsets.
    DeleteGroup {
        /// Group id.
        group: String,
    },
    /// Record a broker's addresses (each broker registers itself once it is a member).
    RegisterBroker {
        /// Its node id.
        node_id: NodeId,
        /// Where peers reach it.
        peer_address: String,
        /// Where clients reach it.
        client_address: String,
    },
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
    /// A broker was registered.
    Registered,
    /// Group offsets were stored.
    Committed,
    /// A group's offsets were deleted (`existed`: it had any).
    GroupDeleted {
        /// Whether the group had offsets.
        existed: bool,
    },
}

/// A consumer group's committed offsets, as the controller stores them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOffsets {
    /// The highest generation that committed: a coordinator that takes the group over starts
    /// its generations above it.
    pub generation: u64,
    /// Offsets by topic id, then partition.
    pub offsets: BTreeMap<String, BTreeMap<u32, u64>>,
}

/// Everything the controller holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerState {
    /// Last applied entry.
    pub last_applied: Option<LogId>,
    /// Membership in force.
    pub last_membership: StoredMembership<NodeId, BasicNode>,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicMeta>,
    /// The next partition group id to hand out (group 0 is the controller).
    pub next_group_id: GroupId,
    /// The cluster's brokers by node id.
    #[serde(default)]
    pub brokers: BTreeMap<NodeId, BrokerMeta>,
    /// Consumer groups' committed offsets by group id (shared between state versions: a commit
    /// copies one group, not all of them).
    #[serde(default)]
    pub groups: BTreeMap<String, Arc<GroupOffsets>>,
}

impl ControllerState {
    pub(crate) fn apply(&mut self, command: &ControllerCommand) -> ControllerResponse {
        self.next_group_id = self.next_group_id.max(1);
        match command {
            ControllerCommand::CreateTopic {
                name,
                topic_id,
                config,
                created_at_ms,
                replicas,
            } => {
                if self.topics.contains_key(name) {
                    return ControllerResponse::AlreadyExists(name.clone());
                }
                let mut config = config.clone();
                let replicas = self.placement(0, config.partitions, &mut config, replicas);
                let partitions = self.place(0, &replicas);
                let topic = TopicMeta {
                    name: name.clone(),
                    topic_id: topic_id.clone(),
                    config,
                    created_at_ms: *created_at_ms,
                    partitions,
                };
                self.topics.insert(name.clone(), topic.clone());
                ControllerResponse::Topic(topic)
            }
            ControllerCommand::UpdateTopic {
                name,
                config,
                new_replicas,
            } => {
                let Some(current) = self.topics.get(name).cloned() else {
                    return ControllerResponse::NotFound(name.clone());
                };
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
                let replicas =
                    self.placement(first, config.partitions, &mut config.clone(), new_replicas);
                let more = self.place(first, &replicas);
                topic.partitions.extend(more);
                topic.config = config;
                self.topics.insert(name.clone(), topic.clone());
                ControllerResponse::Topic(topic)
            }
            ControllerCommand::RegisterBroker {
                node_id,
                peer_address,
                client_address,
            } => {
                self.brokers.insert(
                    *node_id,
                    BrokerMeta {
                        peer_address: peer_address.clone(),
                        client_address: client_address.clone(),
                        draining: false,
                    },
                );
                ControllerResponse::Registered
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
                        topic_id: topic.topic_id,
                    }
                }
                None => ControllerResponse::NotFound(name.clone()),
            },
            ControllerCommand::CommitOffsets {
                group,
                topic_id,
                generation,
                offsets,
            } => {
                if !self.topics.values().any(|t| &t.topic_id == topic_id) {
                    return ControllerResponse::NotFound(format!("topic id {topic_id}"));
                }
                let current = self.groups.get(group);
                let stored = current.and_then(|g| g.offsets.get(topic_id));
                for &(partition, offset) in offsets {
                    if let Some(&before) = stored.and_then(|s| s.get(&partition))
                        && offset < before
                    {
                        return ControllerResponse::Invalid(format!(
                            "partition {partition}: committed offsets never go backwards ({offset} < {before})"
                        ));
                    }
                }
                let entry = Arc::make_mut(self.groups.entry(group.clone()).or_default());
                entry.generation = entry.generation.max(*generation);
                let topic = entry.offsets.entry(topic_id.clone()).or_default();
                for &(partition, offset) in offsets {
                    topic.insert(partition, offset);
                }
                ControllerResponse::Committed
            }
            ControllerCommand::DeleteGroup { group } => ControllerResponse::GroupDeleted {
                existed: self.groups.remove(group).is_some(),
            },
        }
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
    /// known; the config records the factor in force), the first replica (which initialises the
    /// partition's group and is its preferred leader) rotating over the brokers so that leaders
    /// spread. With no broker registered yet, the proposer's placement stands.
    fn placement(
        &self,
        first: u32,
        end: u32,
        config: &mut TopicConfig,
        proposed: &[Vec<NodeId>],
    ) -> Vec<Vec<NodeId>> {
        let brokers: Vec<NodeId> = self.brokers.keys().copied().collect();
        if brokers.is_empty() {
            return proposed.to_vec();
        }
        // The topic keeps the factor it asked for: with fewer brokers, it is under-replicated
        // (and says so) until there are enough.
        let rf = (config.replication_factor.max(1) as usize).min(brokers.len());
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
    super::decode_snapshot(SNAPSHOT_VERSION, bytes)
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
            }),
        })
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
        self.persist(&state, bytes).await
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
        self.persist(&state, data).await?;
        self.shared.state.send_replace(Arc::new(state));
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
}
