//! `weft.v1.TopicAdmin`: create, describe, list, update and delete topics.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use weft_proto::v1;
use weft_proto::v1::topic_admin_server::TopicAdmin;

use crate::acl::{Operation, Resource};
use crate::error::BrokerError;
use crate::node::Node;
use crate::raft::TopicMeta;
use crate::topic::{Fsync, TopicConfig};

/// Topics per ListTopics page when the request asks for none, and the most it may ask for.
const PAGE_SIZE_DEFAULT: usize = 100;
const PAGE_SIZE_MAX: usize = 1000;

/// The TopicAdmin service.
#[derive(Debug, Clone)]
pub struct TopicAdminService {
    node: Arc<Node>,
}

impl TopicAdminService {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        TopicAdminService { node }
    }
}

/// A create request's config with the broker's defaults filled in.
pub fn resolve_config(
    node: &Node,
    proto: Option<&v1::TopicConfig>,
) -> Result<TopicConfig, BrokerError> {
    let d = &node.config.topic_defaults;
    let default = v1::TopicConfig::default();
    let p = proto.unwrap_or(&default);
    let fsync = fsync_from_proto(
        p,
        if d.fsync_policy == "interval" {
            Fsync::IntervalMs(d.fsync_interval_ms)
        } else {
            Fsync::Always
        },
        d.fsync_interval_ms,
        true,
    )?;
    // One broker holds one replica: the controller places at most one replica per broker
    // registered when it applies the creation; a topic asking for more is under-replicated until
    // there are enough. The default is capped by the cluster's configured size (1 for a single
    // node), so a default topic is never under-replicated from the start.
    let wanted_rf = if p.replication_factor == 0 {
        d.replication_factor
            .min(node.configured_cluster_size())
            .max(1)
    } else {
        p.replication_factor
    };
    Ok(TopicConfig {
        partitions: if p.partitions == 0 {
            d.partitions
        } else {
            p.partitions
        },
        replication_factor: wanted_rf,
        retention_bytes: p.retention_bytes.or(d.retention_bytes),
        retention_ms: p.retention_ms.or(d.retention_ms),
        max_message_bytes: p.max_message_bytes.unwrap_or(d.max_message_bytes),
        fsync,
        segment_bytes: p.segment_bytes.unwrap_or(d.segment_bytes),
    })
}

/// The fsync policy `p` asks for. `default` is what stands without one (the topic's current
/// policy on an update, the configured default on a create); the interval policy asked without
/// an interval keeps `default`'s interval, or takes the configured `default_interval_ms`. An
/// interval given with the "always" policy is refused when `interval_named` (a create, or an
/// update whose mask names `fsync_interval_ms`), else ignored (a client that read the topic and
/// set the policy alone).
fn fsync_from_proto(
    p: &v1::TopicConfig,
    default: Fsync,
    default_interval_ms: u32,
    interval_named: bool,
) -> Result<Fsync, BrokerError> {
    match v1::FsyncPolicy::try_from(p.fsync_policy) {
        // An interval given without a policy means the interval policy.
        Ok(v1::FsyncPolicy::Unspecified) => Ok(match p.fsync_interval_ms {
            Some(ms) => Fsync::IntervalMs(ms),
            None => default,
        }),
        Ok(v1::FsyncPolicy::Always) => match p.fsync_interval_ms {
            // Never dropped unseen: the caller meant one of the two.
            Some(ms) if interval_named => Err(BrokerError::invalid(
                "config.fsync_interval_ms",
                format!(
                    "{ms} given with fsync_policy \"always\": an interval applies only to the \"interval\" policy"
                ),
            )),
            _ => Ok(Fsync::Always),
        },
        Ok(v1::FsyncPolicy::Interval) => Ok(Fsync::IntervalMs(p.fsync_interval_ms.unwrap_or(
            match default {
                Fsync::IntervalMs(ms) => ms,
                Fsync::Always => default_interval_ms,
            },
        ))),
        Err(_) => Err(BrokerError::invalid(
            "config.fsync_policy",
            format!("unknown value {}", p.fsync_policy),
        )),
    }
}

/// The protocol form of a topic config.
pub fn config_to_proto(c: &TopicConfig) -> v1::TopicConfig {
    let (policy, interval) = match c.fsync {
        Fsync::Always => (v1::FsyncPolicy::Always, None),
        Fsync::IntervalMs(ms) => (v1::FsyncPolicy::Interval, Some(ms)),
    };
    v1::TopicConfig {
        partitions: c.partitions,
        replication_factor: c.replication_factor,
        retention_bytes: c.retention_bytes,
        retention_ms: c.retention_ms,
        max_message_bytes: Some(c.max_message_bytes),
        fsync_policy: policy as i32,
        fsync_interval_ms: interval,
        segment_bytes: Some(c.segment_bytes),
    }
}

/// The protocol form of a topic, with live partition information.
pub fn topic_to_proto(node: &Node, topic: &TopicMeta) -> v1::Topic {
    let partitions: Vec<v1::PartitionInfo> = topic
        .partitions
        .iter()
        .map(|p| {
            super::cluster::partition_info(node, &topic.name, topic.config.replication_factor, p)
        })
        .collect();
    v1::Topic {
        name: topic.name.clone(),
        config: Some(config_to_proto(&topic.config)),
        under_replicated: partitions.iter().any(|p| p.under_replicated),
        partitions,
        topic_id: topic.topic_id.clone(),
        created_at_ms: topic.created_at_ms,
    }
}

/// The configuration `current` becomes when the fields named in `paths` take their values from
/// `update` (UpdateTopic's field mask; the admin API's PATCH builds the same).
pub fn apply_mask(
    node: &Node,
    current: &TopicConfig,
    update: &v1::TopicConfig,
    paths: &[String],
) -> Result<TopicConfig, BrokerError> {
    if paths.is_empty() {
        return Err(BrokerError::invalid(
            "update_mask",
            "name the fields to change, e.g. \"retention_ms\"",
        ));
    }
    let mut next = current.clone();
    for path in paths {
        match path.trim_start_matches("config.") {
            "partitions" => next.partitions = update.partitions,
            "retention_bytes" => next.retention_bytes = update.retention_bytes,
            "retention_ms" => next.retention_ms = update.retention_ms,
            "max_message_bytes" => {
                next.max_message_bytes = update
                    .max_message_bytes
                    .unwrap_or(node.config.topic_defaults.max_message_bytes)
            }
            "segment_bytes" => {
                next.segment_bytes = update
                    .segment_bytes
                    .unwrap_or(node.config.topic_defaults.segment_bytes)
            }
            "fsync_policy" | "fsync_interval_ms" => {
                next.fsync = fsync_from_proto(
                    update,
                    current.fsync,
                    node.config.topic_defaults.fsync_interval_ms,
                    paths
                        .iter()
                        .any(|p| p.trim_start_matches("config.") == "fsync_interval_ms"),
                )?
            }
            "replication_factor" => {
                return Err(BrokerError::invalid(
                    "update_mask",
                    "replication_factor cannot be changed",
                ));
            }
            other => {
                return Err(BrokerError::invalid(
                    "update_mask",
                    format!("unknown field {other:?}"),
                ));
            }
        }
    }
    Ok(next)
}

fn record<T>(
    method: &'static str,
    started: Instant,
    result: Result<T, BrokerError>,
) -> Result<Response<T>, Status> {
    let result = result.map(Response::new).map_err(Status::from);
    crate::metrics::rpc(method, started, &result);
    result
}

#[tonic::async_trait]
impl TopicAdmin for TopicAdminService {
    async fn create_topic(
        &self,
        request: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::Topic>, Status> {
        let started = Instant::now();
        let identity = crate::auth::identity_of(&request);
        let request = request.into_inner();
        let result = async {
            self.node
                .authorize(&identity, Operation::Create, Resource::Topic(&request.name))?;
            let config = resolve_config(&self.node, request.config.as_ref())?;
            let topic = self.node.create_topic(&request.name, config).await?;
            Ok(topic_to_proto(&self.node, &topic))
        }
        .await;
        record("CreateTopic", started, result)
    }

    async fn get_topic(
        &self,
        request: Request<v1::GetTopicRequest>,
    ) -> Result<Response<v1::Topic>, Status> {
        let started = Instant::now();
        let result = super::authorize(
            &self.node,
            &request,
            Operation::Describe,
            Resource::Topic(&request.get_ref().name),
        )
        .and_then(|()| self.node.topic_named("name", &request.get_ref().name))
        .map(|t| topic_to_proto(&self.node, &t));
        record("GetTopic", started, result)
    }

    async fn list_topics(
        &self,
        request: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        let started = Instant::now();
        let identity = crate::auth::identity_of(&request);
        let request = request.into_inner();
        let size = match request.page_size as usize {
            0 => PAGE_SIZE_DEFAULT,
            n => n.min(PAGE_SIZE_MAX),
        };
        let after = request.page_token;
        // The token is the last topic name of the previous page.
        if !after.is_empty() && crate::topic::validate_name(&after).is_err() {
            return record(
                "ListTopics",
                started,
                Err(BrokerError::invalid(
                    "page_token",
                    "not a next_page_token from a previous response",
                )),
            );
        }
        let state = self.node.controller_state();
        let mut page: Vec<&TopicMeta> = state
            .topics
            .values()
            .filter(|t| after.is_empty() || t.name.as_str() > after.as_str())
            // Only the topics the caller may describe.
            .filter(|t| {
                self.node
                    .allowed(&identity, Operation::Describe, Resource::Topic(&t.name))
            })
            .take(size + 1)
            .map(|t| &**t)
            .collect();
        let next_page_token = if page.len() > size {
            page.truncate(size);
            page.last().map(|t| t.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let result = Ok(v1::ListTopicsResponse {
            topics: page
                .into_iter()
                .map(|t| topic_to_proto(&self.node, t))
                .collect(),
            next_page_token,
        });
        record("ListTopics", started, result)
    }

    async fn update_topic(
        &self,
        request: Request<v1::UpdateTopicRequest>,
    ) -> Result<Response<v1::Topic>, Status> {
        let started = Instant::now();
        let identity = crate::auth::identity_of(&request);
        let request = request.into_inner();
        let result = async {
            self.node
                .authorize(&identity, Operation::Alter, Resource::Topic(&request.name))?;
            let update = request.config.unwrap_or_default();
            let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
            let topic = self
                .node
                .update_topic(&request.name, |current| {
                    apply_mask(&self.node, current, &update, &paths)
                })
                .await?;
            Ok(topic_to_proto(&self.node, &topic))
        }
        .await;
        record("UpdateTopic", started, result)
    }

    async fn delete_topic(
        &self,
        request: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        let started = Instant::now();
        let result = match super::authorize(
            &self.node,
            &request,
            Operation::Delete,
            Resource::Topic(&request.get_ref().name),
        ) {
            Ok(()) => self.node.delete_topic(&request.get_ref().name).await,
            Err(e) => Err(e),
        }
        .map(|topic_id| v1::DeleteTopicResponse { topic_id });
        record("DeleteTopic", started, result)
    }
}
