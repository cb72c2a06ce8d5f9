//! One broker node: its metadata store, the controller Raft group (topics), the partitions it
//! hosts, and the consumer-group coordinator.
//!
//! The partition registry follows the controller: a reconciler task watches the controller state
//! and opens the partitions whose replicas include this node, applies configuration changes, and
//! closes and deletes the partitions of deleted topics. Each partition owns its own state (Raft
//! group, actor); the registry is only a map from names to them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openraft::BasicNode;
use tokio::sync::watch;
use weft_storage::{LogConfig, Metadata, NodeIdentity, PartitionLog, SledMetaStore};

use crate::config::Config;
use crate::error::BrokerError;
use crate::groups::Coordinator;
use crate::partition::{Partition, PartitionSpec};
use crate::raft::{
    CONTROLLER_GROUP, Command, ControllerCommand, ControllerResponse, ControllerState,
    ControllerStateMachine, LogStore, Network, NodeId, Raft, Response, TopicMeta, raft_config,
};
use crate::topic::TopicConfig;

type PartitionKey = (String, u32);

/// A running broker node.
pub struct Node {
    /// Configuration in force.
    pub config: Config,
    /// This node's id.
    pub node_id: NodeId,
    /// The cluster's id.
    pub cluster_id: String,
    /// Consumer groups.
    pub groups: Coordinator,
    meta: Metadata,
    controller: Raft,
    controller_sm: ControllerStateMachine,
    partitions: RwLock<HashMap<PartitionKey, Arc<Partition>>>,
    reconciled: watch::Sender<u64>,
    raft_config: Arc<openraft::Config>,
    ready: AtomicBool,
    started: Instant,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Node {
    /// Opens the data directory, starts the controller group (initialising a new cluster on first
    /// start) and the partitions this node hosts.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Node>> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data_dir {}: {e}", config.data_dir.display())
        })?;
        let store = SledMetaStore::open(config.data_dir.join("meta"))?;
        let meta = Metadata::new(Arc::new(store));
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
                meta.set_node_identity(&identity)?;
                identity
            }
        };
        let raft_config = Arc::new(raft_config(
            &config.cluster_name,
            config.raft_heartbeat_ms,
            config.raft_election_timeout_ms,
            false,
        )?);
        let controller_log =
            PartitionLog::open(config.data_dir.join("controller"), LogConfig::default())?;
        let store = LogStore::new(CONTROLLER_GROUP, controller_log, meta.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let controller_sm = ControllerStateMachine::new();
        let controller = Raft::new(
            config.node_id,
            raft_config.clone(),
            Network,
            store,
            controller_sm.clone(),
        )
        .await?;
        if !controller.is_initialized().await? {
            let members = BTreeMap::from([(
                config.node_id,
                BasicNode::new(config.peer_listen.to_string()),
            )]);
            controller.initialize(members).await?;
        }
        controller
            .wait(Some(Duration::from_secs(30)))
            .current_leader(config.node_id, "controller leadership")
            .await
            .map_err(|e| anyhow::anyhow!("this node did not become controller leader: {e}"))?;
        // Apply everything already in the controller log before serving.
        controller
            .ensure_linearizable()
            .await
            .map_err(|e| anyhow::anyhow!("controller not ready: {e}"))?;

        let groups = Coordinator::new(
            meta.clone(),
            Duration::from_millis(config.session_timeout_ms),
        );
        let node = Arc::new(Node {
            node_id: config.node_id,
            cluster_id: identity.cluster_id,
            groups,
            meta,
            controller,
            controller_sm,
            partitions: RwLock::new(HashMap::new()),
            reconciled: watch::Sender::new(0),
            raft_config,
            ready: AtomicBool::new(false),
            started: Instant::now(),
            config,
        });
        node.reconcile(&node.controller_sm.state()).await;
        tokio::spawn(reconcile_loop(
            Arc::downgrade(&node),
            node.controller_sm.watch(),
        ));
        tokio::spawn(retention_loop(Arc::downgrade(&node)));
        node.groups.start_reaper();
        node.ready.store(true, Ordering::SeqCst);
        Ok(node)
    }

    /// Whether the node serves: controller led here and partitions open.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Seconds since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The controller state (topics).
    pub fn controller_state(&self) -> Arc<ControllerState> {
        self.controller_sm.state()
    }

    /// The controller's leader.
    pub fn controller_leader(&self) -> Option<NodeId> {
        self.controller.metrics().borrow().current_leader
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Result<TopicMeta, BrokerError> {
        self.controller_state()
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::TopicNotFound(name.into()))
    }

    /// A hosted partition.
    pub fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>, BrokerError> {
        let meta = self.topic(topic)?;
        if partition >= meta.config.partitions {
            return Err(BrokerError::PartitionNotFound {
                topic: topic.into(),
                partition,
            });
        }
        self.partitions
            .read()
            .map_err(|_| BrokerError::Internal("partition registry poisoned".into()))?
            .get(&(topic.to_string(), partition))
            .filter(|p| p.topic_id == meta.topic_id)
            .cloned()
            .ok_or_else(|| BrokerError::Unavailable {
                reason: format!("partition {topic}/{partition} is not open yet"),
                leader: None,
            })
    }

    /// All hosted partitions, in (topic, partition) order.
    pub fn partitions(&self) -> Vec<Arc<Partition>> {
        let mut all: Vec<Arc<Partition>> = self
            .partitions
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        all
    }

    async fn propose(&self, command: ControllerCommand) -> Result<ControllerResponse, BrokerError> {
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let write = self.controller.client_write(Command::Controller(command));
        match tokio::time::timeout(timeout, write).await {
            Err(_) => Err(BrokerError::Timeout(
                "controller did not commit in time".into(),
            )),
            Ok(Err(e)) => Err(BrokerError::Unavailable {
                reason: format!("controller: {e}"),
                leader: self.controller_leader(),
            }),
            Ok(Ok(response)) => match response.data {
                Response::Controller(r) => Ok(r),
                other => Err(BrokerError::Internal(format!(
                    "unexpected controller response {other:?}"
                ))),
            },
        }
    }

    fn controller_result(response: ControllerResponse) -> Result<TopicMeta, BrokerError> {
        match response {
            ControllerResponse::Topic(t) => Ok(t),
            ControllerResponse::AlreadyExists(name) => Err(BrokerError::TopicExists(name)),
            ControllerResponse::NotFound(name) => Err(BrokerError::TopicNotFound(name)),
            ControllerResponse::Invalid(reason) => Err(BrokerError::invalid("config", reason)),
            ControllerResponse::Deleted { .. } => {
                Err(BrokerError::Internal("unexpected delete response".into()))
            }
        }
    }

    /// Creates a topic and waits until its partitions are open here.
    pub async fn create_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<TopicMeta, BrokerError> {
        crate::topic::validate_name(name).map_err(|v| BrokerError::InvalidArgument(vec![v]))?;
        let violations = config.validate();
        if !violations.is_empty() {
            return Err(BrokerError::InvalidArgument(violations));
        }
        // One broker: every partition has one replica, here.
        let replicas = vec![vec![self.node_id]; config.partitions as usize];
        let command = ControllerCommand::CreateTopic {
            name: name.into(),
            topic_id: uuid::Uuid::new_v4().to_string(),
            config,
            created_at_ms: now_ms(),
            replicas,
        };
        let topic = Self::controller_result(self.propose(command).await?)?;
        self.wait_for_partitions(&topic).await?;
        Ok(topic)
    }

    /// Changes a topic's configuration.
    pub async fn update_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<TopicMeta, BrokerError> {
        let current = self.topic(name)?;
        let violations = config.validate();
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
        let added = (config.partitions - current.config.partitions) as usize;
        let command = ControllerCommand::UpdateTopic {
            name: name.into(),
            config,
            new_replicas: vec![vec![self.node_id]; added],
        };
        let topic = Self::controller_result(self.propose(command).await?)?;
        self.wait_for_partitions(&topic).await?;
        Ok(topic)
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, name: &str) -> Result<String, BrokerError> {
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
        let mut reconciled = self.reconciled.subscribe();
        loop {
            let open = topic
                .partitions
                .iter()
                .all(|p| self.partition(&topic.name, p.partition).is_ok());
            if open {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || tokio::time::timeout(left, reconciled.changed())
                    .await
                    .is_err()
            {
                return Err(BrokerError::Timeout(format!(
                    "partitions of {} did not open in time",
                    topic.name
                )));
            }
        }
    }

    fn partition_dir(&self, topic_id: &str, partition: u32) -> PathBuf {
        self.config
            .data_dir
            .join("topics")
            .join(topic_id)
            .join(partition.to_string())
    }

    /// Makes the open partitions match the controller state.
    async fn reconcile(&self, state: &ControllerState) {
        let mut wanted: HashMap<PartitionKey, (PartitionSpec, bool)> = HashMap::new();
        for topic in state.topics.values() {
            for p in &topic.partitions {
                if p.replicas.contains(&self.node_id) {
                    let spec = PartitionSpec {
                        topic: topic.name.clone(),
                        topic_id: topic.topic_id.clone(),
                        partition: p.partition,
                        group_id: p.group_id,
                        config: topic.config.clone(),
                    };
                    wanted.insert((topic.name.clone(), p.partition), (spec, true));
                }
            }
        }
        let running: Vec<Arc<Partition>> = self.partitions();
        let mut gone_topics: HashSet<String> = HashSet::new();
        for partition in &running {
            let key = (partition.topic.clone(), partition.partition);
            match wanted.get_mut(&key) {
                Some((spec, open)) if spec.topic_id == partition.topic_id => {
                    *open = false;
                    if partition.config() != spec.config {
                        partition.set_config(spec.config.clone());
                    }
                }
                _ => {
                    if let Ok(mut map) = self.partitions.write() {
                        map.remove(&key);
                    }
                    partition.shutdown().await;
                    gone_topics.insert(partition.topic_id.clone());
                }
            }
        }
        for topic_id in gone_topics {
            if !state.topics.values().any(|t| t.topic_id == topic_id) {
                let dir = self.config.data_dir.join("topics").join(&topic_id);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), "cannot delete the data of a deleted topic: {e}");
                }
            }
        }
        for (key, (spec, open)) in wanted {
            if !open {
                continue;
            }
            let dir = self.partition_dir(&spec.topic_id, spec.partition);
            let opened = Partition::open(
                spec,
                &dir,
                self.node_id,
                self.config.peer_listen.to_string(),
                self.meta.clone(),
                self.raft_config.clone(),
                self.config.publish_queue_max as usize,
            )
            .await;
            match opened {
                Ok(partition) => {
                    if let Ok(mut map) = self.partitions.write() {
                        map.insert(key, partition);
                    }
                }
                Err(e) => {
                    tracing::error!(topic = %key.0, partition = key.1, "cannot open partition: {e:#}")
                }
            }
        }
        self.reconciled.send_modify(|generation| *generation += 1);
    }

    /// Stops every Raft group. Acknowledged data is already durable.
    pub async fn shutdown(&self) {
        self.ready.store(false, Ordering::SeqCst);
        for partition in self.partitions() {
            partition.shutdown().await;
        }
        if let Err(e) = self.controller.shutdown().await {
            tracing::warn!("controller shutdown: {e}");
        }
    }
}

async fn reconcile_loop(
    node: std::sync::Weak<Node>,
    mut state: watch::Receiver<Arc<ControllerState>>,
) {
    loop {
        if state.changed().await.is_err() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let current = state.borrow_and_update().clone();
        node.reconcile(&current).await;
    }
}

async fn retention_loop(node: std::sync::Weak<Node>) {
    loop {
        let Some(interval) = node.upgrade().map(|n| n.config.retention_check_interval_ms) else {
            return;
        };
        tokio::time::sleep(Duration::from_millis(interval)).await;
        let Some(node) = node.upgrade() else { return };
        for partition in node.partitions() {
            match partition.apply_retention(now_ms()) {
                Ok(report) if report.segments_deleted > 0 => tracing::info!(
                    topic = %partition.topic,
                    partition = partition.partition,
                    segments = report.segments_deleted,
                    bytes = report.bytes_deleted,
                    "retention deleted old segments"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(topic = %partition.topic, partition = partition.partition, "retention: {e}")
                }
            }
        }
    }
}
