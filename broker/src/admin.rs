//! Admin HTTP (axum): health, readiness, Prometheus metrics, a JSON API under `/v1`, and the
//! OpenAPI document generated from these handlers (`/openapi.json`). Errors are JSON bodies with
//! a 4xx/5xx status.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::error::BrokerError;
use crate::grpc::topic_admin::{apply_mask, resolve_config};
use crate::node::Node;
use crate::raft::TopicMeta;
use crate::topic::Fsync;

/// An error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable reason, e.g. TOPIC_NOT_FOUND.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Offending fields, for invalid requests.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

/// One invalid field.
#[derive(Debug, Serialize, ToSchema)]
pub struct FieldError {
    /// Field path.
    pub field: String,
    /// What is wrong.
    pub description: String,
}

/// Largest request body the admin API reads (its requests are small JSON documents).
pub const ADMIN_BODY_BYTES_MAX: usize = 64 * 1024;

/// A failed admin request: a broker error, or a refusal of the HTTP request itself.
#[derive(Debug)]
pub enum ApiError {
    /// A broker error, mapped to its HTTP status.
    Broker(BrokerError),
    /// An HTTP-level refusal (body too large, method not allowed).
    Http {
        /// The status.
        status: StatusCode,
        /// Machine-readable reason.
        code: &'static str,
        /// Human-readable message.
        message: String,
    },
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        ApiError::Broker(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = match self {
            ApiError::Broker(error) => error.clipped(),
            ApiError::Http {
                status,
                code,
                message,
            } => {
                let error = ErrorDetail {
                    code: code.into(),
                    message,
                    fields: Vec::new(),
                };
                return (status, Json(ErrorBody { error })).into_response();
            }
        };
        let status = match &error {
            BrokerError::TopicNotFound(_)
            | BrokerError::PartitionNotFound { .. }
            | BrokerError::GroupNotFound(_) => StatusCode::NOT_FOUND,
            BrokerError::TopicExists(_) => StatusCode::CONFLICT,
            BrokerError::InvalidArgument(_) | BrokerError::OffsetOutOfRange { .. } => {
                StatusCode::BAD_REQUEST
            }
            BrokerError::BatchTooLarge { .. } | BrokerError::TooManyRecords { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            BrokerError::Overloaded(_) | BrokerError::LimitReached { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            BrokerError::SequenceGap { .. }
            | BrokerError::DuplicateSequence { .. }
            | BrokerError::UnknownProducer { .. }
            | BrokerError::ProducerFenced { .. }
            | BrokerError::StaleGeneration { .. }
            | BrokerError::NotAssigned { .. }
            | BrokerError::GroupNotEmpty(_)
            | BrokerError::Conflict(_) => StatusCode::CONFLICT,
            BrokerError::Unavailable { .. }
            | BrokerError::TransferUnderWay { .. }
            | BrokerError::NoTransferTarget { .. } => StatusCode::SERVICE_UNAVAILABLE,
            BrokerError::Remote(status) => match status.0.code() {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition => {
                    StatusCode::CONFLICT
                }
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
                tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
                tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            BrokerError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            BrokerError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            BrokerError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            BrokerError::DataLoss { .. } | BrokerError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let fields = match &error {
            BrokerError::InvalidArgument(violations) => violations
                .iter()
                .map(|v| FieldError {
                    field: v.field.clone(),
                    description: v.description.clone(),
                })
                .collect(),
            _ => Vec::new(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: error.reason().to_string(),
                message: error.to_string(),
                fields,
            },
        };
        (status, Json(body)).into_response()
    }
}

/// A path's parameters ([`Path`]), refused as a JSON 400 naming `path` when they do not parse
/// (axum's own rejection is a plain-text body).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::Broker(BrokerError::invalid(
                "path",
                rejection.body_text(),
            ))),
        }
    }
}

fn bad_json(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::Http {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "BODY_TOO_LARGE",
            message: format!("the request body is larger than {ADMIN_BODY_BYTES_MAX} bytes"),
        };
    }
    ApiError::Broker(BrokerError::invalid("body", rejection.body_text()))
}

/// Health.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// "ok", "ready" or "not ready".
    pub status: String,
    /// For readiness: the hosted partitions that do not serve yet, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ready: Vec<NotReadyView>,
}

/// A hosted partition that does not serve.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotReadyView {
    /// "topic/partition".
    pub partition: String,
    /// "opening", "replaying" or "down".
    pub phase: String,
    /// Why it is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A topic.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopicView {
    /// Name.
    pub name: String,
    /// Unique id.
    pub topic_id: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Replication factor.
    pub replication_factor: u32,
    /// Retention by bytes per partition.
    pub retention_bytes: Option<u64>,
    /// Retention by age.
    pub retention_ms: Option<u64>,
    /// Largest batch.
    pub max_message_bytes: u32,
    /// "always" or "interval".
    pub fsync_policy: String,
    /// Sync interval for "interval".
    pub fsync_interval_ms: Option<u32>,
    /// Segment size.
    pub segment_bytes: u64,
    /// Creation time.
    pub created_at_ms: i64,
    /// Some partition has fewer replicas than `replication_factor` (too few brokers), or, as
    /// its leader here sees it, fewer in sync.
    pub under_replicated: bool,
    /// Partitions with offsets.
    pub partition_details: Vec<PartitionView>,
}

/// A partition.
#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionView {
    /// Partition number.
    pub partition: u32,
    /// Leader node id (0 when none).
    pub leader_id: u64,
    /// Replica node ids.
    pub replicas: Vec<u64>,
    /// Replicas caught up with the leader (known when this broker leads the partition).
    pub in_sync_replicas: Vec<u64>,
    /// Fewer replicas than the replication factor, or fewer in sync.
    pub under_replicated: bool,
    /// While the replicas move: the brokers they move to (empty otherwise).
    pub moving_to: Vec<u64>,
    /// Oldest retained offset.
    pub log_start_offset: u64,
    /// Offset after the last committed record.
    pub high_watermark: u64,
    /// Offset after the last record.
    pub log_end_offset: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Damaged ranges of durable data found so far (never served: reads of them answer
    /// DATA_LOSS).
    pub damaged: Vec<DamageView>,
}

/// A damaged range of a partition's data.
#[derive(Debug, Serialize, ToSchema)]
pub struct DamageView {
    /// The segment file.
    pub segment: String,
    /// Byte position of the damage.
    pub position: u64,
    /// What check failed.
    pub detail: String,
}

/// A request to create a topic. Unset values take the broker's defaults.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTopicBody {
    /// Name: 1 to 249 characters of [a-zA-Z0-9._-].
    pub name: String,
    /// Partitions.
    pub partitions: Option<u32>,
    /// Replication factor, 1 to 16 (capped by the number of brokers).
    pub replication_factor: Option<u32>,
    /// Retention by bytes per partition.
    pub retention_bytes: Option<u64>,
    /// Retention by age.
    pub retention_ms: Option<u64>,
    /// Largest batch.
    pub max_message_bytes: Option<u32>,
    /// "always" or "interval".
    pub fsync_policy: Option<String>,
    /// Sync interval for "interval".
    pub fsync_interval_ms: Option<u32>,
    /// Segment size.
    pub segment_bytes: Option<u64>,
}

/// A change of a topic's configuration: only the fields present change (JSON merge patch).
/// `null` removes a retention limit.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTopicBody {
    /// Partitions: can only grow.
    pub partitions: Option<u32>,
    /// Cannot be changed (refused with 400).
    pub replication_factor: Option<u32>,
    /// Retention by bytes per partition; null: no limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    pub retention_bytes: Option<Option<u64>>,
    /// Retention by age; null: keep forever.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    pub retention_ms: Option<Option<u64>>,
    /// Largest batch.
    pub max_message_bytes: Option<u32>,
    /// Segment size (new segments).
    pub segment_bytes: Option<u64>,
    /// "always" or "interval".
    pub fsync_policy: Option<String>,
    /// Sync interval; implies "interval".
    pub fsync_interval_ms: Option<u32>,
}

/// A field that is present, maybe as null: Some(None) for null, None (by default) for absent.
fn present<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

fn fsync_policy_from_json(value: Option<&str>) -> Result<i32, BrokerError> {
    match value {
        None => Ok(0),
        Some("always") => Ok(weft_proto::v1::FsyncPolicy::Always as i32),
        Some("interval") => Ok(weft_proto::v1::FsyncPolicy::Interval as i32),
        Some(other) => Err(BrokerError::invalid(
            "fsync_policy",
            format!("{other:?} is neither \"always\" nor \"interval\""),
        )),
    }
}

/// A consumer group.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupView {
    /// Group id.
    pub group_id: String,
    /// Topic consumed.
    pub topic: String,
    /// Assignment generation.
    pub generation: u64,
    /// Live members and their partitions.
    pub members: Vec<MemberView>,
    /// Committed offsets and lag per partition.
    pub partitions: Vec<GroupPartitionView>,
    /// Total lag in records.
    pub lag: u64,
}

/// A group member.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberView {
    /// Member id.
    pub member_id: String,
    /// Assigned partitions.
    pub partitions: Vec<u32>,
    /// Whether its stream is open.
    pub connected: bool,
    /// Milliseconds since it was last heard from.
    pub idle_ms: u64,
}

/// A group's position in one partition.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupPartitionView {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Committed offset.
    pub committed_offset: u64,
    /// High watermark.
    pub high_watermark: u64,
    /// Records not yet consumed.
    pub lag: u64,
    /// Why the high watermark could not be read just now (no replica answered); absent when
    /// it was. When present, `high_watermark` is the committed offset and `lag` 0: not known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// The cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterView {
    /// Cluster id.
    pub cluster_id: String,
    /// This node.
    pub node_id: u64,
    /// Controller leader.
    pub controller_id: u64,
    /// Client address of this node.
    pub client_address: String,
    /// Number of topics.
    pub topics: usize,
    /// Number of hosted partitions.
    pub partitions: usize,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// Whether it serves.
    pub ready: bool,
    /// This broker's build's feature level (what its controller state machine understands).
    pub feature_level: u32,
    /// The highest feature level the cluster has used: a build below it may not join or run.
    pub features_in_use: u32,
    /// The cluster's brokers.
    pub brokers: Vec<BrokerView>,
    /// The partitions this broker leads, with their replicas, the replicas in sync and how far
    /// each other replica is behind (ask each broker for the partitions it leads).
    pub led_partitions: Vec<LedPartitionView>,
}

/// A partition this broker leads.
#[derive(Debug, Serialize, ToSchema)]
pub struct LedPartitionView {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Replica node ids.
    pub replicas: Vec<u64>,
    /// Replicas caught up with this leader.
    pub in_sync_replicas: Vec<u64>,
    /// Raft entries each other replica is behind, by node id.
    pub replica_lag: std::collections::BTreeMap<u64, u64>,
    /// Bytes of those entries, by node id.
    pub replica_lag_bytes: std::collections::BTreeMap<u64, u64>,
}

/// One broker of the cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct BrokerView {
    /// Node id.
    pub id: u64,
    /// Where clients reach it.
    pub client_address: String,
    /// Where peers reach it.
    pub peer_address: String,
    /// Whether it answered this broker's health check on its peer port just now (true for
    /// itself).
    pub reachable: bool,
    /// A voter of the controller group.
    pub voter: bool,
    /// It is being removed (its replicas move away; then it leaves the cluster).
    pub removing: bool,
    /// A member of the controller group that never registered (no client address): it joined
    /// and was lost before it registered, or it is still catching up. It counts toward the
    /// controller's quorum and holds back deny rules and offset resets until it registers or
    /// `POST /v1/brokers/{id}/remove` takes it out.
    pub unregistered: bool,
}

fn topic_view(node: &Node, topic: &TopicMeta) -> TopicView {
    let info = crate::grpc::topic_admin::topic_to_proto(node, topic);
    let (fsync_policy, fsync_interval_ms) = match topic.config.fsync {
        Fsync::Always => ("always".to_string(), None),
        Fsync::IntervalMs(ms) => ("interval".to_string(), Some(ms)),
    };
    TopicView {
        name: topic.name.clone(),
        topic_id: topic.topic_id.clone(),
        partitions: topic.config.partitions,
        replication_factor: topic.config.replication_factor,
        retention_bytes: topic.config.retention_bytes,
        retention_ms: topic.config.retention_ms,
        max_message_bytes: topic.config.max_message_bytes,
        fsync_policy,
        fsync_interval_ms,
        segment_bytes: topic.config.segment_bytes,
        created_at_ms: topic.created_at_ms,
        under_replicated: info.under_replicated,
        partition_details: info
            .partitions
            .into_iter()
            .map(|p| PartitionView {
                partition: p.partition,
                leader_id: p.leader_id,
                replicas: p.replicas,
                in_sync_replicas: p.in_sync_replicas,
                under_replicated: p.under_replicated,
                moving_to: p.moving_to,
                log_start_offset: p.log_start_offset,
                high_watermark: p.high_watermark,
                log_end_offset: p.log_end_offset,
                size_bytes: p.size_bytes,
                damaged: node
                    .partition(&topic.name, p.partition)
                    .map(|hosted| {
                        hosted
                            .damage()
                            .into_iter()
                            .map(|d| DamageView {
                                segment: d.segment,
                                position: d.position,
                                detail: d.detail,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect(),
    }
}

type AppState = Arc<Node>;

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        not_ready: Vec::new(),
    })
}

/// Readiness: every partition this node hosts is open, caught up and serving. A 503 lists the
/// partitions that are not, with their phase (opening, replaying, down) and why a partition is
/// down (a full disk, say).
#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn readyz(State(node): State<AppState>) -> (StatusCode, Json<Health>) {
    let not_ready: Vec<NotReadyView> = node
        .not_ready()
        .into_iter()
        .map(|n| NotReadyView {
            partition: n.partition,
            phase: n.phase,
            reason: n.reason,
        })
        .collect();
    if node.is_ready() {
        (
            StatusCode::OK,
            Json(Health {
                status: "ready".into(),
                not_ready,
            }),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "not ready".into(),
                not_ready,
            }),
        )
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(node): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&node),
    )
}

/// The cluster as this node sees it.
#[utoipa::path(get, path = "/v1/cluster", responses((status = 200, body = ClusterView)))]
async fn cluster(State(node): State<AppState>) -> Json<ClusterView> {
    let state = node.controller_state();
    Json(ClusterView {
        cluster_id: node.cluster_id(),
        node_id: node.node_id,
        controller_id: node.controller_leader().unwrap_or(0),
        client_address: node.config.client_address(),
        topics: state.topics.len(),
        partitions: node.partitions().len(),
        uptime_seconds: node.uptime().as_secs(),
        ready: node.is_ready(),
        feature_level: crate::raft::feature_level(),
        features_in_use: state.features_in_use,
        brokers: crate::grpc::cluster::status(&node)
            .await
            .nodes
            .into_iter()
            .map(|n| BrokerView {
                id: n.id,
                client_address: n.client_address,
                peer_address: n.peer_address,
                reachable: n.reachable,
                voter: n.voter,
                removing: n.removing,
                unregistered: n.unregistered,
            })
            .collect(),
        led_partitions: node
            .partitions()
            .into_iter()
            .filter(|p| p.group().is_leader())
            .map(|p| {
                let lag = p.group().follower_lag();
                LedPartitionView {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    replicas: state
                        .topics
                        .get(&p.topic)
                        .and_then(|t| t.partitions.get(p.partition as usize))
                        .map(|m| m.replicas.clone())
                        .unwrap_or_default(),
                    in_sync_replicas: p.group().in_sync_replicas().unwrap_or_default(),
                    replica_lag: lag.iter().map(|l| (l.node, l.entries)).collect(),
                    replica_lag_bytes: lag.iter().map(|l| (l.node, l.bytes)).collect(),
                }
            })
            .collect(),
    })
}

/// Every topic.
#[utoipa::path(get, path = "/v1/topics", responses((status = 200, body = [TopicView])))]
async fn list_topics(
    State(node): State<AppState>,
    axum::extract::Extension(identity): axum::extract::Extension<crate::auth::Identity>,
) -> Json<Vec<TopicView>> {
    let state = node.controller_state();
    Json(
        state
            .topics
            .values()
            .filter(|t| {
                node.allowed(
                    &identity,
                    crate::acl::Operation::Describe,
                    crate::acl::Resource::Topic(&t.name),
                )
            })
            .map(|t| topic_view(&node, t))
            .collect(),
    )
}

/// Creates a topic.
#[utoipa::path(post, path = "/v1/topics", request_body = CreateTopicBody,
    responses((status = 201, body = TopicView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_topic(
    State(node): State<AppState>,
    axum::extract::Extension(identity): axum::extract::Extension<crate::auth::Identity>,
    body: Result<Json<CreateTopicBody>, JsonRejection>,
) -> Result<(StatusCode, Json<TopicView>), ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    node.authorize(
        &identity,
        crate::acl::Operation::Create,
        crate::acl::Resource::Topic(&body.name),
    )?;
    // Absent is the broker's default; 0 (which gRPC cannot tell from absent) is refused here.
    for (field, value) in [
        ("config.partitions", body.partitions),
        ("config.replication_factor", body.replication_factor),
    ] {
        if value == Some(0) {
            return Err(BrokerError::invalid(
                field,
                "must be at least 1 (leave it out for the broker's default)",
            )
            .into());
        }
    }
    let fsync_policy = fsync_policy_from_json(body.fsync_policy.as_deref())?;
    let proto = weft_proto::v1::TopicConfig {
        partitions: body.partitions.unwrap_or(0),
        replication_factor: body.replication_factor.unwrap_or(0),
        retention_bytes: body.retention_bytes,
        retention_ms: body.retention_ms,
        max_message_bytes: body.max_message_bytes,
        fsync_policy,
        fsync_interval_ms: body.fsync_interval_ms,
        segment_bytes: body.segment_bytes,
    };
    let config = resolve_config(&node, Some(&proto))?;
    let topic = node.create_topic(&body.name, config).await?;
    Ok((StatusCode::CREATED, Json(topic_view(&node, &topic))))
}

/// Describes a topic.
#[utoipa::path(get, path = "/v1/topics/{name}", params(("name" = String, Path, description = "Topic name")),
    responses((status = 200, body = TopicView), (status = 404, body = ErrorBody)))]
async fn describe_topic(
    State(node): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<TopicView>, ApiError> {
    let topic = node.topic_named("name", &name)?;
    Ok(Json(topic_view(&node, &topic)))
}

/// Changes a topic's configuration: the fields present in the body change, the others stay.
#[utoipa::path(patch, path = "/v1/topics/{name}", params(("name" = String, Path, description = "Topic name")),
    request_body = UpdateTopicBody,
    responses((status = 200, body = TopicView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_topic(
    State(node): State<AppState>,
    ApiPath(name): ApiPath<String>,
    body: Result<Json<UpdateTopicBody>, JsonRejection>,
) -> Result<Json<TopicView>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    let mut paths = Vec::new();
    let mut mark = |present: bool, path: &str| {
        if present {
            paths.push(path.to_string());
        }
    };
    mark(body.partitions.is_some(), "partitions");
    mark(body.replication_factor.is_some(), "replication_factor");
    mark(body.retention_bytes.is_some(), "retention_bytes");
    mark(body.retention_ms.is_some(), "retention_ms");
    mark(body.max_message_bytes.is_some(), "max_message_bytes");
    mark(body.segment_bytes.is_some(), "segment_bytes");
    mark(
        body.fsync_policy.is_some() || body.fsync_interval_ms.is_some(),
        "fsync_policy",
    );
    mark(body.fsync_interval_ms.is_some(), "fsync_interval_ms");
    let update = weft_proto::v1::TopicConfig {
        partitions: body.partitions.unwrap_or(0),
        replication_factor: body.replication_factor.unwrap_or(0),
        retention_bytes: body.retention_bytes.flatten(),
        retention_ms: body.retention_ms.flatten(),
        max_message_bytes: body.max_message_bytes,
        fsync_policy: fsync_policy_from_json(body.fsync_policy.as_deref())?,
        fsync_interval_ms: body.fsync_interval_ms,
        segment_bytes: body.segment_bytes,
    };
    let topic = node
        .update_topic(&name, |current| apply_mask(&node, current, &update, &paths))
        .await?;
    Ok(Json(topic_view(&node, &topic)))
}

/// Deletes a topic and its data.
#[utoipa::path(delete, path = "/v1/topics/{name}", params(("name" = String, Path, description = "Topic name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_topic(
    State(node): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    node.delete_topic(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn group_view(node: &Arc<Node>, id: &str) -> Result<GroupView, ApiError> {
    let d = crate::grpc::group_link::describe(node, id, 0).await?;
    Ok(GroupView {
        group_id: d.group_id,
        topic: d.topic,
        generation: d.generation,
        lag: d.lag,
        members: d
            .members
            .into_iter()
            .map(|m| MemberView {
                member_id: m.member_id,
                partitions: m.partitions,
                connected: m.connected,
                idle_ms: m.idle_ms,
            })
            .collect(),
        partitions: d
            .partitions
            .into_iter()
            .map(|p| GroupPartitionView {
                topic: p.topic,
                partition: p.partition,
                committed_offset: p.committed_offset,
                high_watermark: p.high_watermark,
                lag: p.lag,
                unavailable: (!p.unavailable.is_empty()).then_some(p.unavailable),
            })
            .collect(),
    })
}

/// The broker's log filter.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogLevel {
    /// `tracing` filter directives: `info`, `debug`, `warn,weft_broker::raft=debug`...
    pub filter: String,
}

fn log_level_error(e: crate::logging::LogLevelError) -> ApiError {
    match e {
        crate::logging::LogLevelError::Invalid(reason) => {
            ApiError::Broker(BrokerError::invalid("filter", reason))
        }
        e @ crate::logging::LogLevelError::NotInstalled => ApiError::Http {
            status: StatusCode::CONFLICT,
            code: "LOGGING_NOT_MANAGED",
            message: e.to_string(),
        },
    }
}

/// The log filter in force.
#[utoipa::path(get, path = "/v1/log-level", responses((status = 200, body = LogLevel), (status = 409, body = ErrorBody)))]
async fn get_log_level() -> Result<Json<LogLevel>, ApiError> {
    let filter = crate::logging::current().map_err(log_level_error)?;
    Ok(Json(LogLevel { filter }))
}

/// Changes the log filter while the broker runs (until it restarts: the config's `log_level`
/// or `WEFT_LOG` then applies again).
#[utoipa::path(put, path = "/v1/log-level", request_body = LogLevel,
    responses((status = 200, body = LogLevel), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn put_log_level(
    body: Result<Json<LogLevel>, JsonRejection>,
) -> Result<Json<LogLevel>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    crate::logging::set(&body.filter).map_err(log_level_error)?;
    Ok(Json(body))
}

/// Which replica a partition's leadership should move to.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferBody {
    /// The replica to lead; absent: the most caught-up other replica.
    pub node_id: Option<u64>,
}

/// Where a partition's leadership went.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaderView {
    /// The new leader.
    pub leader_id: u64,
}

/// What a drain did.
#[derive(Debug, Serialize, ToSchema)]
pub struct DrainView {
    /// Partitions whose leadership moved away ("topic/partition -> node N").
    pub moved: Vec<String>,
    /// Partitions still led here, with why.
    pub kept: Vec<String>,
}

/// What an undrain did.
#[derive(Debug, Serialize, ToSchema)]
pub struct UndrainView {
    /// Whether the broker was marked as draining before.
    pub was_draining: bool,
}

/// Ending a broker's recovery after it lost its data.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndRecoveryBody {
    /// The broker meant (another broker refuses: 400).
    pub node_id: u64,
    /// Must be true: records acknowledged before the loss may be lost.
    pub accept_data_loss: bool,
}

/// What ending the recovery did.
#[derive(Debug, Serialize, ToSchema)]
pub struct EndRecoveryView {
    /// The voting mode before: "normal" (nothing to end), "undecided" or "rejoining".
    pub was: String,
    /// The answering broker.
    pub node_id: u64,
}

/// Makes this broker vote in every group at once although it lost its data and has not caught
/// up everywhere (it withholds its votes until then). Unsafe: a leader elected with its vote
/// may lack records acknowledged before the loss; for a group most of whose replicas lost their
/// data, which cannot elect otherwise (also a broker that cannot join because the controller
/// has no quorum without its vote).
#[utoipa::path(post, path = "/v1/recovery/end", request_body = EndRecoveryBody,
    responses((status = 200, body = EndRecoveryView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
async fn end_recovery(
    State(node): State<AppState>,
    body: Result<Json<EndRecoveryBody>, JsonRejection>,
) -> Result<Json<EndRecoveryView>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    let was = node.end_recovery(body.node_id, body.accept_data_loss)?;
    Ok(Json(EndRecoveryView {
        was: was.into(),
        node_id: node.node_id,
    }))
}

/// Moves a partition's leadership to another replica. Send it to the partition's leader (another
/// broker answers 503 naming the leader).
#[utoipa::path(post, path = "/v1/topics/{name}/partitions/{partition}/leader",
    params(("name" = String, Path, description = "Topic name"), ("partition" = u32, Path, description = "Partition")),
    request_body = TransferBody,
    responses((status = 200, body = LeaderView), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn transfer_leadership(
    State(node): State<AppState>,
    ApiPath((name, partition)): ApiPath<(String, u32)>,
    body: Result<Json<TransferBody>, JsonRejection>,
) -> Result<Json<LeaderView>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    let leader_id = node
        .transfer_leadership(&name, partition, body.node_id)
        .await
        .map_err(|e| match e {
            // The body's field is `node_id` (`to_node_id` is the gRPC request's).
            BrokerError::InvalidArgument(violations) => BrokerError::InvalidArgument(
                violations
                    .into_iter()
                    .map(|mut v| {
                        if v.field == "to_node_id" {
                            v.field = "node_id".into();
                        }
                        v
                    })
                    .collect(),
            ),
            other => other,
        })?;
    Ok(Json(LeaderView { leader_id }))
}

/// Moves every partition leadership this broker holds to other replicas (a Kubernetes preStop
/// hook calls it before the broker stops).
#[utoipa::path(post, path = "/v1/drain", responses((status = 200, body = DrainView)))]
async fn drain(State(node): State<AppState>) -> Json<DrainView> {
    let budget = crate::node::drain_budget(std::time::Duration::from_millis(
        node.config.request_timeout_ms,
    ));
    let (moved, kept) = node.drain(budget).await;
    Json(DrainView { moved, kept })
}

/// Clears this broker's draining mark (a drain sets it, a restart clears it): a broker drained
/// and kept running gets new replicas and its preferred leaderships back.
#[utoipa::path(delete, path = "/v1/drain", responses((status = 200, body = UndrainView),
    (status = 503, body = ErrorBody)))]
async fn undrain(State(node): State<AppState>) -> Result<Json<UndrainView>, ApiError> {
    let was_draining = node.undrain().await?;
    Ok(Json(UndrainView { was_draining }))
}

/// Every consumer group, with members and lag.
#[utoipa::path(get, path = "/v1/groups", responses((status = 200, body = [GroupView])))]
async fn list_groups(
    State(node): State<AppState>,
    axum::extract::Extension(identity): axum::extract::Extension<crate::auth::Identity>,
) -> Result<Json<Vec<GroupView>>, ApiError> {
    let mut out = Vec::new();
    for id in crate::grpc::group_link::list(&node, 0).await? {
        if !node.allowed(
            &identity,
            crate::acl::Operation::Describe,
            crate::acl::Resource::Group(&id),
        ) {
            continue;
        }
        match group_view(&node, &id).await {
            Ok(view) => out.push(view),
            // Deleted (or its offsets expired) since the listing: not a group any more.
            Err(ApiError::Broker(e))
                if tonic::Status::from(e.clone()).code() == tonic::Code::NotFound => {}
            // Any other failure (the coordinator moving, a peer not answering) fails the
            // listing: a 200 leaving groups out would say they do not exist.
            Err(e) => return Err(e),
        }
    }
    Ok(Json(out))
}

/// One consumer group: members, assignments, committed offsets and lag.
#[utoipa::path(get, path = "/v1/groups/{id}", params(("id" = String, Path, description = "Group id")),
    responses((status = 200, body = GroupView), (status = 404, body = ErrorBody)))]
async fn describe_group(
    State(node): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<GroupView>, ApiError> {
    Ok(Json(group_view(&node, &id).await?))
}

/// Deletes a consumer group's committed offsets (409 while it has live members).
#[utoipa::path(delete, path = "/v1/groups/{id}", params(("id" = String, Path, description = "Group id")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_group(
    State(node): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    crate::grpc::group_link::delete(&node, &id, 0).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One partition's offset.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionOffsetBody {
    /// The partition.
    pub partition: u32,
    /// The offset: the next record the group reads there.
    pub offset: u64,
}

/// A group's offsets to set on one topic.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetOffsetsBody {
    /// The topic.
    pub topic: String,
    /// Where each named partition's committed offset goes, backwards or forwards, within the
    /// retained log (between the log start and the high watermark).
    pub offsets: Vec<PartitionOffsetBody>,
}

/// The offsets set.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResetOffsetsView {
    /// The group.
    pub group_id: String,
    /// The topic.
    pub topic: String,
    /// The committed offsets now.
    pub offsets: Vec<PartitionOffsetBody>,
}

/// Sets a consumer group's committed offsets on a topic, backwards (to read again) or forwards
/// (to skip), as `weft group reset-offsets --execute` does (needs alter and commit on the group;
/// 409 while the group has live members, 400 for an offset outside the retained log).
#[utoipa::path(put, path = "/v1/groups/{id}/offsets", params(("id" = String, Path, description = "Group id")),
    request_body = ResetOffsetsBody,
    responses((status = 200, body = ResetOffsetsView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn reset_group_offsets(
    State(node): State<AppState>,
    ApiPath(id): ApiPath<String>,
    axum::extract::Extension(identity): axum::extract::Extension<crate::auth::Identity>,
    body: Result<Json<ResetOffsetsBody>, JsonRejection>,
) -> Result<Json<ResetOffsetsView>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    // The route needs alter (`required`); a reset is a commit as well, as over gRPC.
    node.authorize(
        &identity,
        crate::acl::Operation::Commit,
        crate::acl::Resource::Group(&id),
    )?;
    let request = weft_proto::v1::CommitOffsetsRequest {
        group_id: id.clone(),
        topic: body.topic.clone(),
        offsets: body
            .offsets
            .iter()
            .map(|o| weft_proto::v1::PartitionOffset {
                partition: o.partition,
                offset: o.offset,
            })
            .collect(),
        reset: true,
        ..Default::default()
    };
    let stored = crate::grpc::subscribe::SubscriberService::new(node.clone())
        .commit_inner(&request)
        .await?;
    Ok(Json(ResetOffsetsView {
        group_id: id,
        topic: body.topic,
        offsets: stored
            .offsets
            .into_iter()
            .map(|o| PartitionOffsetBody {
                partition: o.partition,
                offset: o.offset,
            })
            .collect(),
    }))
}

/// Where a partition's replicas go.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    /// The brokers to hold its replicas, the preferred leader first.
    pub replicas: Vec<u64>,
}

/// Moves started by a rebalance or a removal.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReassignView {
    /// Moves started ("topic/partition: [from] -> [to]").
    pub started: Vec<String>,
    /// Partitions left for now, with why (call again once their running move is done).
    pub waiting: Vec<String>,
    /// Changes made at once: a controller member that never registered, taken out of the
    /// controller group by a broker removal.
    pub done: Vec<String>,
}

/// Starts moving a partition's replicas (the partition's leader ends the move once the new
/// replicas have caught up; `moving_to` is empty again then).
#[utoipa::path(post, path = "/v1/topics/{name}/partitions/{partition}/replicas",
    params(("name" = String, Path, description = "Topic"), ("partition" = u32, Path, description = "Partition")),
    request_body = MoveBody,
    responses((status = 202, body = PartitionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn move_partition(
    State(node): State<AppState>,
    ApiPath((name, partition)): ApiPath<(String, u32)>,
    body: Result<Json<MoveBody>, JsonRejection>,
) -> Result<(StatusCode, Json<PartitionView>), ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    node.move_partition(&name, partition, body.replicas).await?;
    let topic = node.topic(&name)?;
    let view = topic_view(&node, &topic)
        .partition_details
        .into_iter()
        .find(|p| p.partition == partition)
        .ok_or_else(|| BrokerError::PartitionNotFound {
            topic: name.clone(),
            partition,
        })?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Starts the moves that spread replicas and preferred leaders evenly over the brokers (after
/// adding one).
#[utoipa::path(post, path = "/v1/rebalance", responses((status = 202, body = ReassignView)))]
async fn rebalance(
    State(node): State<AppState>,
) -> Result<(StatusCode, Json<ReassignView>), ApiError> {
    let (started, waiting) = node.rebalance().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ReassignView {
            started,
            waiting,
            done: Vec::new(),
        }),
    ))
}

/// Starts moving every replica off a broker; once none is left it leaves the cluster (it is no
/// longer listed in `/v1/cluster`) and can be stopped.
#[utoipa::path(post, path = "/v1/brokers/{id}/remove", params(("id" = u64, Path, description = "Node id")),
    responses((status = 202, body = ReassignView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove_broker(
    State(node): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<(StatusCode, Json<ReassignView>), ApiError> {
    let removal = node.remove_broker(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ReassignView {
            started: removal.started,
            waiting: removal.waiting,
            done: removal.done,
        }),
    ))
}

/// The OpenAPI document of this API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Weft admin API",
        description = "Health, metrics and administration of a Weft broker."
    ),
    paths(
        healthz,
        readyz,
        metrics,
        cluster,
        list_topics,
        create_topic,
        describe_topic,
        update_topic,
        delete_topic,
        list_groups,
        describe_group,
        delete_group,
        reset_group_offsets,
        transfer_leadership,
        drain,
        undrain,
        end_recovery,
        get_log_level,
        put_log_level,
        move_partition,
        rebalance,
        remove_broker,
        whoami,
        list_acls,
        add_acl,
        remove_acl
    ),
    components(schemas(
        crate::auth::Identity,
        crate::auth::Source,
        crate::acl::AclRule,
        crate::acl::Operation,
        AclsView,
        AclChange,
        Health,
        NotReadyView,
        LogLevel,
        ErrorBody,
        ErrorDetail,
        FieldError,
        TopicView,
        PartitionView,
        DamageView,
        CreateTopicBody,
        UpdateTopicBody,
        GroupView,
        MemberView,
        GroupPartitionView,
        ClusterView,
        TransferBody,
        LeaderView,
        DrainView,
        UndrainView,
        EndRecoveryBody,
        EndRecoveryView,
        BrokerView,
        LedPartitionView,
        MoveBody,
        PartitionOffsetBody,
        ResetOffsetsBody,
        ResetOffsetsView,
        ReassignView
    ))
)]
pub struct ApiDoc;

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_pretty_json().unwrap_or_default(),
    )
}

async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::Http {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "METHOD_NOT_ALLOWED",
        message: format!("{method} is not allowed here; see /openapi.json"),
    }
}

async fn not_found() -> (StatusCode, Json<ErrorBody>) {
    let error = ErrorDetail {
        code: "NOT_FOUND".into(),
        message: "no such endpoint; see /openapi.json".into(),
        fields: Vec::new(),
    };
    (StatusCode::NOT_FOUND, Json(ErrorBody { error }))
}

/// Gives each request its caller's [`Identity`](crate::auth::Identity), or answers 401 / 403
/// with a JSON body (and an audit line). Probes (`/healthz`, `/readyz`, `/metrics`) carry no
/// credentials and are let through as anonymous.
async fn identify(
    State((auth, node)): State<(crate::auth::Authenticator, AppState)>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let conn = request
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::tls::AdminConn>>()
        .map(|c| c.0.0.clone());
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics");
    match auth.identify(request.headers(), conn.as_ref()) {
        Ok(identity) => {
            if let Some((operation, resource)) = required(request.method(), request.uri().path())
                && let Err(denied) = node.authorize(&identity, operation, resource.as_ref())
            {
                return ApiError::Broker(denied).into_response();
            }
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Err(_) if probe => {
            request
                .extensions_mut()
                .insert(crate::auth::Identity::anonymous());
            next.run(request).await
        }
        Err(refusal) => {
            crate::auth::audit_refusal("admin", request.uri().path(), conn.as_ref(), &refusal);
            let (status, code, message) = match refusal {
                crate::auth::Refusal::Unauthenticated(m) => {
                    (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", m)
                }
                crate::auth::Refusal::Denied(m) => (StatusCode::FORBIDDEN, "PERMISSION_DENIED", m),
            };
            let error = ErrorDetail {
                code: code.into(),
                message,
                fields: Vec::new(),
            };
            (status, Json(ErrorBody { error })).into_response()
        }
    }
}

/// A resource named by an admin path.
enum PathResource {
    Topic(String),
    Group(String),
    Cluster,
}

impl PathResource {
    fn as_ref(&self) -> crate::acl::Resource<'_> {
        match self {
            PathResource::Topic(t) => crate::acl::Resource::Topic(t),
            PathResource::Group(g) => crate::acl::Resource::Group(g),
            PathResource::Cluster => crate::acl::Resource::Cluster,
        }
    }
}

/// What an admin route needs (ACLs): the same operations as the gRPC calls it mirrors. None:
/// open (probes, the OpenAPI document, whoami), or checked in the handler (creating a topic,
/// whose name is in the body; lists, filtered to what the caller may describe).
fn required(
    method: &axum::http::Method,
    path: &str,
) -> Option<(crate::acl::Operation, PathResource)> {
    use crate::acl::Operation;
    use axum::http::Method;
    // Decoded as the router decodes them for the handlers: `%62illing` must be checked as the
    // `billing` the handler acts on.
    let decoded: Vec<std::borrow::Cow<'_, str>> = path
        .trim_matches('/')
        .split('/')
        .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy())
        .collect();
    let segments: Vec<&str> = decoded.iter().map(|s| s.as_ref()).collect();
    let read = *method == Method::GET || *method == Method::HEAD;
    match segments.as_slice() {
        ["v1", "cluster"] => Some((Operation::Describe, PathResource::Cluster)),
        ["v1", "log-level"] if read => Some((Operation::Describe, PathResource::Cluster)),
        ["v1", "log-level" | "drain" | "rebalance" | "acls"]
        | ["v1", "recovery", ..]
        | ["v1", "brokers", ..]
        | ["v1", "topics", _, "partitions", ..] => Some((Operation::Admin, PathResource::Cluster)),
        ["v1", "topics", name] => {
            let operation = match *method {
                Method::PATCH => Operation::Alter,
                Method::DELETE => Operation::Delete,
                _ => Operation::Describe,
            };
            Some((operation, PathResource::Topic((*name).to_string())))
        }
        ["v1", "groups", id, "offsets"] => {
            Some((Operation::Alter, PathResource::Group((*id).to_string())))
        }
        ["v1", "groups", id] => {
            let operation = if *method == Method::DELETE {
                Operation::Delete
            } else {
                Operation::Describe
            };
            Some((operation, PathResource::Group((*id).to_string())))
        }
        _ => None,
    }
}

/// The ACL rules in force.
#[derive(Debug, Serialize, ToSchema)]
pub struct AclsView {
    /// Whether calls are checked at all (`acl.enabled`).
    pub enabled: bool,
    /// This broker's config-file rules.
    pub config_rules: Vec<crate::acl::AclRule>,
    /// The rules stored in the controller (`POST /v1/acls`, `weft acl add`).
    pub stored_rules: Vec<crate::acl::AclRule>,
}

/// Lists the ACL rules in force (needs admin on cluster).
#[utoipa::path(get, path = "/v1/acls", responses((status = 200, body = AclsView), (status = 403, body = ErrorBody)))]
async fn list_acls(State(node): State<AppState>) -> Json<AclsView> {
    let (enabled, config_rules, stored_rules) = node.acl_rules();
    Json(AclsView {
        enabled,
        config_rules,
        stored_rules,
    })
}

/// Whether a rule was stored before a change.
#[derive(Debug, Serialize, ToSchema)]
pub struct AclChange {
    /// The rule was stored before.
    pub existed: bool,
}

/// Adds an allow or deny rule to the controller (needs admin on cluster; a deny rule that would
/// refuse the caller admin on cluster is refused).
#[utoipa::path(post, path = "/v1/acls", request_body = crate::acl::AclRule,
    responses((status = 200, body = AclChange), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn add_acl(
    State(node): State<AppState>,
    axum::extract::Extension(identity): axum::extract::Extension<crate::auth::Identity>,
    body: Result<Json<crate::acl::AclRule>, JsonRejection>,
) -> Result<Json<AclChange>, ApiError> {
    let Json(rule) = body.map_err(bad_json)?;
    let existed = node.change_acl(rule, true, &identity).await?;
    Ok(Json(AclChange { existed }))
}

/// Removes a rule stored in the controller (needs admin on cluster).
#[utoipa::path(delete, path = "/v1/acls", request_body = crate::acl::AclRule,
    responses((status = 200, body = AclChange), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn remove_acl(
    State(node): State<AppState>,
    axum::extract::Extension(identity): axum::extract::Extension<crate::auth::Identity>,
    body: Result<Json<crate::acl::AclRule>, JsonRejection>,
) -> Result<Json<AclChange>, ApiError> {
    let Json(rule) = body.map_err(bad_json)?;
    let existed = node.change_acl(rule, false, &identity).await?;
    Ok(Json(AclChange { existed }))
}

/// Who this broker takes the caller to be: the identity its ACLs and audit lines use (from a
/// bearer token, a trusted sidecar's header, or the TLS client certificate).
#[utoipa::path(get, path = "/v1/whoami", responses((status = 200, body = crate::auth::Identity), (status = 401, body = ErrorBody)))]
async fn whoami(
    axum::extract::Extension(identity): axum::extract::Extension<crate::auth::Identity>,
) -> Json<crate::auth::Identity> {
    Json(identity)
}

/// How much longer than its steps an admin request may take before it is answered 504
/// ([`request_limit`]), and an admin connection may send nothing past that before it is
/// closed ([`crate::tls::AdminListener`]).
pub const REQUEST_LIMIT_MARGIN: Duration = Duration::from_secs(2);

/// The steps an admin request may take, each waiting up to `request_timeout_ms` (a removal:
/// a read of the controller state, a proposal, the moves, another read).
const REQUEST_LIMIT_STEPS: u32 = 4;

/// The most an admin request takes, its body's arrival included: [`REQUEST_LIMIT_STEPS`] times
/// `request_timeout_ms`, and [`REQUEST_LIMIT_MARGIN`].
pub fn request_limit(config: &crate::config::Config) -> Duration {
    Duration::from_millis(config.request_timeout_ms) * REQUEST_LIMIT_STEPS + REQUEST_LIMIT_MARGIN
}

/// Answers 504 (a JSON error) an admin request that takes longer than [`request_limit`]: one
/// whose body stops coming, or whose handler retries for longer. Before, nothing bounded
/// either: a caller that sent half a body held its request open for good.
async fn time_limit(
    State(limit): State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Broker(BrokerError::Timeout(format!(
            "the request took longer than {} ms (its body did not come, or the change did not \
             finish): it may or may not have taken effect",
            limit.as_millis()
        )))
        .into_response(),
    }
}

/// The admin router; `auth` identifies callers.
pub fn router(node: Arc<Node>, auth: crate::auth::Authenticator) -> Router {
    let limit = request_limit(&node.config);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/cluster", get(cluster))
        .route("/v1/topics", get(list_topics).post(create_topic))
        .route(
            "/v1/topics/{name}",
            get(describe_topic).patch(update_topic).delete(delete_topic),
        )
        .route(
            "/v1/topics/{name}/partitions/{partition}/leader",
            axum::routing::post(transfer_leadership),
        )
        .route(
            "/v1/topics/{name}/partitions/{partition}/replicas",
            axum::routing::post(move_partition),
        )
        .route("/v1/drain", axum::routing::post(drain).delete(undrain))
        .route("/v1/recovery/end", axum::routing::post(end_recovery))
        .route("/v1/log-level", get(get_log_level).put(put_log_level))
        .route("/v1/rebalance", axum::routing::post(rebalance))
        .route(
            "/v1/brokers/{id}/remove",
            axum::routing::post(remove_broker),
        )
        .route("/v1/groups", get(list_groups))
        .route("/v1/groups/{id}", get(describe_group).delete(delete_group))
        .route(
            "/v1/groups/{id}/offsets",
            axum::routing::put(reset_group_offsets),
        )
        .route("/v1/whoami", get(whoami))
        .route("/v1/acls", get(list_acls).post(add_acl).delete(remove_acl))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(
            (auth, node.clone()),
            identify,
        ))
        .layer(axum::middleware::from_fn_with_state(limit, time_limit))
        .with_state(node)
}
