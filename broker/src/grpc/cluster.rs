//! `weft.v1.Cluster`: cluster status and partition placement.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use weft_proto::v1;
use weft_proto::v1::cluster_server::Cluster;

use crate::acl::{Operation, Resource};
use crate::node::Node;
use crate::raft::PartitionMeta;

/// The Cluster service.
#[derive(Debug, Clone)]
pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        ClusterService { node }
    }
}

/// Placement and live offsets of one partition.
pub fn partition_info(
    node: &Node,
    topic: &str,
    replication_factor: u32,
    meta: &PartitionMeta,
) -> v1::PartitionInfo {
    let mut info = v1::PartitionInfo {
        topic: topic.to_string(),
        partition: meta.partition,
        replicas: meta.replicas.clone(),
        under_replicated: meta.replicas.len() < replication_factor as usize,
        moving_to: meta.target.clone().unwrap_or_default(),
        ..Default::default()
    };
    if let Ok(partition) = node.partition(topic, meta.partition) {
        let bounds = partition.bounds();
        let (term, leader) = partition.leadership();
        info.leader_id = leader.unwrap_or(0);
        // Where clients reach the leader: smart clients send its publishes there directly.
        info.leader_address = match leader {
            Some(id) if id == node.node_id => node.config.client_address(),
            Some(id) => node
                .controller_state()
                .brokers
                .get(&id)
                .map(|b| b.client_address.clone())
                .unwrap_or_default(),
            None => String::new(),
        };
        info.replica_lag = partition
            .group()
            .follower_lag()
            .into_iter()
            .map(|lag| v1::ReplicaLag {
                node_id: lag.node,
                entries: lag.entries,
                bytes: lag.bytes,
            })
            .collect();
        if let Some(in_sync) = partition.group().in_sync_replicas() {
            info.under_replicated |= in_sync.len() < meta.replicas.len();
            info.in_sync_replicas = in_sync;
        }
        info.log_start_offset = bounds.log_start;
        info.high_watermark = bounds.high_watermark;
        info.log_end_offset = bounds.log_end;
        info.size_bytes = bounds.size_bytes;
        info.leader_term = term;
    }
    info
}

/// How long the status waits for each broker's answer to its health check.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1000);

/// The status of the cluster as this node sees it; a broker is reachable when it answered this
/// node's health check on its peer port just now (all asked at once, each for at most
/// [`PING_TIMEOUT`]).
pub async fn status(node: &Node) -> v1::ClusterStatus {
    let state = node.controller_state();
    v1::ClusterStatus {
        cluster_id: node.cluster_id(),
        controller_id: node.controller_leader().unwrap_or(0),
        nodes: if state.brokers.is_empty() {
            vec![v1::Node {
                id: node.node_id,
                client_address: node.config.client_address(),
                peer_address: node.config.peer_address(),
                reachable: true,
                voter: true,
                removing: false,
                unregistered: false,
            }]
        } else {
            let voters = node.controller_voters();
            let peers = node.peers();
            // The registered brokers, then the controller members that never registered.
            let mut nodes: Vec<v1::Node> = state
                .brokers
                .iter()
                .map(|(id, b)| v1::Node {
                    id: *id,
                    client_address: b.client_address.clone(),
                    peer_address: b.peer_address.clone(),
                    reachable: false,
                    voter: voters.contains(id),
                    removing: b.removing,
                    unregistered: false,
                })
                .collect();
            nodes.extend(
                node.unregistered_controller_members(&state)
                    .into_iter()
                    .map(|(id, peer_address)| v1::Node {
                        id,
                        client_address: String::new(),
                        peer_address,
                        reachable: false,
                        voter: voters.contains(&id),
                        removing: false,
                        unregistered: true,
                    }),
            );
            let reachable = futures::future::join_all(nodes.iter().map(|n| {
                let (id, address) = (n.id, n.peer_address.clone());
                async move { id == node.node_id || peers.ping(id, &address, PING_TIMEOUT).await }
            }))
            .await;
            for (n, reachable) in nodes.iter_mut().zip(reachable) {
                n.reachable = reachable;
            }
            nodes
        },
        topic_count: state.topics.len() as u32,
        partition_count: state
            .topics
            .values()
            .map(|t| t.partitions.len() as u32)
            .sum(),
        answering_node_id: node.node_id,
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn get_cluster_status(
        &self,
        request: Request<v1::GetClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let started = Instant::now();
        super::authorize(&self.node, &request, Operation::Describe, Resource::Cluster)?;
        let result = Ok(Response::new(status(&self.node).await));
        crate::metrics::rpc("GetClusterStatus", started, &result);
        result
    }

    async fn list_partitions(
        &self,
        request: Request<v1::ListPartitionsRequest>,
    ) -> Result<Response<v1::ListPartitionsResponse>, Status> {
        let started = Instant::now();
        super::authorize(&self.node, &request, Operation::Describe, Resource::Cluster)?;
        let state = self.node.controller_state();
        let wanted = &request.get_ref().topic;
        let result = if !wanted.is_empty() && !state.topics.contains_key(wanted) {
            Err(Status::from(crate::error::BrokerError::TopicNotFound(
                wanted.clone(),
            )))
        } else {
            let partitions = state
                .topics
                .values()
                .filter(|t| wanted.is_empty() || &t.name == wanted)
                .flat_map(|t| {
                    t.partitions.iter().map(move |p| {
                        partition_info(&self.node, &t.name, t.config.replication_factor, p)
                    })
                })
                .collect();
            Ok(Response::new(v1::ListPartitionsResponse { partitions }))
        };
        crate::metrics::rpc("ListPartitions", started, &result);
        result
    }

    async fn transfer_leadership(
        &self,
        request: Request<v1::TransferLeadershipRequest>,
    ) -> Result<Response<v1::TransferLeadershipResponse>, Status> {
        let started = Instant::now();
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        let r = request.into_inner();
        let to = (r.to_node_id != 0).then_some(r.to_node_id);
        let result = self
            .node
            .transfer_leadership(&r.topic, r.partition, to)
            .await
            .map(|leader_id| Response::new(v1::TransferLeadershipResponse { leader_id }))
            .map_err(Status::from);
        crate::metrics::rpc("TransferLeadership", started, &result);
        result
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        let started = Instant::now();
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        // Answered before the caller's deadline (the time it gave, at most request_timeout_ms).
        let budget = crate::node::drain_budget(super::deadline(request.metadata(), &self.node));
        let (moved, kept) = self.node.drain(budget).await;
        let result = Ok(Response::new(v1::DrainResponse { moved, kept }));
        crate::metrics::rpc("Drain", started, &result);
        result
    }

    async fn undrain(
        &self,
        request: Request<v1::UndrainRequest>,
    ) -> Result<Response<v1::UndrainResponse>, Status> {
        let started = Instant::now();
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        let result = self
            .node
            .undrain()
            .await
            .map(|was_draining| Response::new(v1::UndrainResponse { was_draining }))
            .map_err(Status::from);
        crate::metrics::rpc("Undrain", started, &result);
        result
    }

    async fn end_recovery(
        &self,
        request: Request<v1::EndRecoveryRequest>,
    ) -> Result<Response<v1::EndRecoveryResponse>, Status> {
        let started = Instant::now();
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        let r = request.into_inner();
        let result = self
            .node
            .end_recovery(r.node_id, r.accept_data_loss)
            .map(|was| {
                Response::new(v1::EndRecoveryResponse {
                    was: was.into(),
                    node_id: self.node.node_id,
                })
            })
            .map_err(Status::from);
        crate::metrics::rpc("EndRecovery", started, &result);
        result
    }

    async fn move_partition(
        &self,
        request: Request<v1::MovePartitionRequest>,
    ) -> Result<Response<v1::PartitionInfo>, Status> {
        let started = Instant::now();
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        let r = request.into_inner();
        let result = match self
            .node
            .move_partition(&r.topic, r.partition, r.replicas)
            .await
        {
            Ok(meta) => {
                let rf = self
                    .node
                    .controller_state()
                    .topics
                    .get(&r.topic)
                    .map_or(0, |t| t.config.replication_factor);
                Ok(Response::new(partition_info(
                    &self.node, &r.topic, rf, &meta,
                )))
            }
            Err(e) => Err(Status::from(e)),
        };
        crate::metrics::rpc("MovePartition", started, &result);
        result
    }

    async fn rebalance(
        &self,
        request: Request<v1::RebalanceRequest>,
    ) -> Result<Response<v1::ReassignResponse>, Status> {
        let started = Instant::now();
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        let result = self
            .node
            .rebalance()
            .await
            .map(|(started, waiting)| {
                Response::new(v1::ReassignResponse {
                    started,
                    waiting,
                    done: Vec::new(),
                })
            })
            .map_err(Status::from);
        crate::metrics::rpc("Rebalance", started, &result);
        result
    }

    async fn remove_broker(
        &self,
        request: Request<v1::RemoveBrokerRequest>,
    ) -> Result<Response<v1::ReassignResponse>, Status> {
        let started = Instant::now();
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        let node_id = request.into_inner().node_id;
        let result = self
            .node
            .remove_broker(node_id)
            .await
            .map(|r| {
                Response::new(v1::ReassignResponse {
                    started: r.started,
                    waiting: r.waiting,
                    done: r.done,
                })
            })
            .map_err(Status::from);
        crate::metrics::rpc("RemoveBroker", started, &result);
        result
    }

    async fn list_acls(
        &self,
        request: Request<v1::ListAclsRequest>,
    ) -> Result<Response<v1::ListAclsResponse>, Status> {
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        let (enabled, config_rules, stored_rules) = self.node.acl_rules();
        Ok(Response::new(v1::ListAclsResponse {
            enabled,
            config_rules: config_rules.iter().map(rule_to_proto).collect(),
            stored_rules: stored_rules.iter().map(rule_to_proto).collect(),
        }))
    }

    async fn add_acl(
        &self,
        request: Request<v1::AclRule>,
    ) -> Result<Response<v1::AclChangeResponse>, Status> {
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        let rule = rule_from_proto(request.get_ref())?;
        let caller = crate::auth::identity_of(&request);
        let existed = self.node.change_acl(rule, true, &caller).await?;
        Ok(Response::new(v1::AclChangeResponse { existed }))
    }

    async fn remove_acl(
        &self,
        request: Request<v1::AclRule>,
    ) -> Result<Response<v1::AclChangeResponse>, Status> {
        super::authorize(&self.node, &request, Operation::Admin, Resource::Cluster)?;
        let rule = rule_from_proto(request.get_ref())?;
        let caller = crate::auth::identity_of(&request);
        let existed = self.node.change_acl(rule, false, &caller).await?;
        Ok(Response::new(v1::AclChangeResponse { existed }))
    }
}

fn rule_to_proto(rule: &crate::acl::AclRule) -> v1::AclRule {
    v1::AclRule {
        identity: rule.identity.clone(),
        resource: rule.resource.clone(),
        operations: rule
            .operations
            .iter()
            .map(|o| o.as_str().to_string())
            .collect(),
        permission: rule.permission.as_str().to_string(),
    }
}

fn rule_from_proto(rule: &v1::AclRule) -> Result<crate::acl::AclRule, crate::error::BrokerError> {
    let operations = rule
        .operations
        .iter()
        .map(|o| {
            Operation::parse(o).ok_or_else(|| {
                crate::error::BrokerError::invalid(
                    "operations",
                    format!(
                        "{o:?} is none of publish, subscribe, commit, describe, create, alter, delete, admin, all"
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let permission = crate::acl::Permission::parse(&rule.permission).ok_or_else(|| {
        crate::error::BrokerError::invalid(
            "permission",
            format!("{:?} is neither \"allow\" nor \"deny\"", rule.permission),
        )
    })?;
    let rule = crate::acl::AclRule {
        identity: rule.identity.clone(),
        resource: rule.resource.clone(),
        operations,
        permission,
    };
    rule.validate()
        .map_err(|reason| crate::error::BrokerError::invalid("rule", reason))?;
    Ok(rule)
}
