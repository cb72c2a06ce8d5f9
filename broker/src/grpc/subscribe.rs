//! `weft.v1.Subscriber`: Fetch (unary long-poll), Subscribe (credit-based stream, optionally as a
//! consumer-group member), CommitOffsets, GetOffsets.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_proto::v1;
use weft_proto::v1::start_position::Position;
use weft_proto::v1::subscribe_request::Request as Inbound;
use weft_proto::v1::subscribe_response::Event;
use weft_proto::v1::subscriber_server::Subscriber;
use weft_proto::v1::{
    Assignment, CommitAck, CommitOffsetsRequest, CommitOffsetsResponse, Delivery, FetchRequest,
    FetchResponse, GetOffsetsRequest, GetOffsetsResponse, Heartbeat, PartitionOffset,
    PartitionOffsets, StartPosition, SubscribeRequest, SubscribeResponse, SubscribeStart,
};

use super::group_link::{self, GroupLink, Joining};
use super::{check_group_header, check_headers, check_mirrored, now_ms, record_size, to_records};
use crate::acl::{Operation, Resource};
use crate::error::BrokerError;
use crate::groups::GroupView;
use crate::grpc::route_hints::Purpose;
use crate::node::Node;

/// How long a commit past this broker's view of a partition's high watermark waits for the view
/// to catch up (a replica learns of a commit a heartbeat after its leader) before it is refused.
const COMMIT_HIGH_WATERMARK_WAIT: Duration = Duration::from_secs(2);

/// How long a stream waits, in all, for the partitions given to it that cannot be placed yet
/// (see `start_offsets`: not open yet, or no replica answers) before it goes on without them:
/// the session reads no heartbeats meanwhile.
const NEW_PARTITION_WAIT: Duration = Duration::from_secs(3);

/// How long a session waits, in all, at each heartbeat for the start offsets of partitions of
/// its assignment that could not be placed before (see `Session::place_unplaced`).
const PLACE_AGAIN_WAIT: Duration = Duration::from_millis(500);

/// What an answer needs to reach a caller that waits `left` more: a tenth of it, at most
/// 200 ms.
fn answer_margin(left: Duration) -> Duration {
    (left / 10).min(Duration::from_millis(200))
}

/// Messages buffered towards one subscriber before the session waits.
const STREAM_BUFFER: usize = 16;
/// How long one delivery round waits, in all, for the brokers that hold partitions this one
/// does not: a partition whose holder does not answer by then is skipped for the round (the
/// stream goes on with the other partitions, and with its heartbeats between rounds).
const REMOTE_DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The Subscriber service.
#[derive(Debug, Clone)]
pub struct SubscriberService {
    node: Arc<Node>,
}

impl SubscriberService {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        SubscriberService { node }
    }

    /// Serves a Fetch from this broker's replica, or forwards it once to a broker holding one;
    /// `answer_by`: when its caller stops waiting (its deadline), if it said.
    pub async fn fetch_inner(
        &self,
        request: FetchRequest,
        hops: u32,
        answer_by: Option<Instant>,
    ) -> Result<FetchResponse, BrokerError> {
        let config = &self.node.config;
        let topic = self.node.topic(&request.topic)?;
        if let Some(holder) = self.holder_elsewhere(&topic, request.partition) {
            let partition = request.partition;
            // One long poll in all, however many replicas are asked: each is asked to wait only
            // what is left of it (and no longer than this broker lets a poll wait). Before,
            // every replica asked after one that failed waited the whole `max_wait_ms` again.
            // Within the caller's deadline too: the poll ends early enough for the replica's
            // answer to come back in time, and a replica that has not answered a little before
            // the deadline is given up, and so passed over (`RouteHints::learn_read`). Before,
            // the caller went away first, and a replica that did not answer (paused) taught
            // this broker nothing: every read went to it again.
            let now = Instant::now();
            let mut polled_until = now
                + Duration::from_millis(
                    u64::from(request.max_wait_ms).min(config.fetch_wait_ms_max),
                );
            if let Some(by) = answer_by {
                let left = by.saturating_duration_since(now);
                polled_until = polled_until.min(now + left.saturating_sub(answer_margin(left) * 2));
            }
            let fetched = self.read_elsewhere(&topic, partition, holder, hops, |holder| {
                let now = Instant::now();
                let left = polled_until.saturating_duration_since(now);
                let request = FetchRequest {
                    max_wait_ms: u32::try_from(left.as_millis()).unwrap_or(u32::MAX),
                    ..request.clone()
                };
                let mut timeout = Duration::from_millis(config.request_timeout_ms) + left;
                if let Some(by) = answer_by {
                    let caller_left = by.saturating_duration_since(now);
                    timeout = timeout.min(caller_left.saturating_sub(answer_margin(caller_left)));
                }
                self.forward_fetch(request, holder, hops, timeout)
            });
            // A long poll waiting at another broker ends too when this one shuts down.
            return tokio::select! {
                fetched = fetched => fetched,
                () = self.node.closing() => Err(self.node.closing_error()),
            };
        }
        let partition = self.node.partition(&request.topic, request.partition)?;
        let limit = config.fetch_bytes_max as usize;
        let max_bytes = if request.max_bytes == 0 {
            limit
        } else {
            (request.max_bytes as usize).min(limit)
        };
        let wait =
            Duration::from_millis(u64::from(request.max_wait_ms).min(config.fetch_wait_ms_max));
        // A long poll answers with what there is when the broker begins to shut down.
        let batches = tokio::select! {
            biased;
            read = partition.read(request.offset, max_bytes, request.min_bytes as usize, wait) => read?,
            () = self.node.closing(), if !wait.is_zero() => {
                partition.read(request.offset, max_bytes, 0, Duration::ZERO).await?
            }
        };
        let records = to_records(
            &batches,
            request.offset,
            request.max_records as usize,
            max_bytes,
        );
        let bounds = partition.bounds();
        let next_offset = records.last().map_or(request.offset, |r| r.offset + 1);
        Ok(FetchResponse {
            topic: request.topic,
            partition: request.partition,
            records,
            high_watermark: bounds.high_watermark,
            log_start_offset: bounds.log_start,
            next_offset,
        })
    }

    /// When this broker holds no replica of `partition`: a broker that does (the leader a
    /// replica named last, else the first replica not found unreachable lately: see
    /// [`crate::grpc::route_hints`]).
    fn holder_elsewhere(&self, topic: &crate::raft::TopicMeta, partition: u32) -> Option<u64> {
        topic
            .partitions
            .get(partition as usize)
            .filter(|p| !p.replicas.contains(&self.node.node_id))
            .and_then(|p| {
                self.node
                    .route_hints
                    .pick(&topic.topic_id, partition, &p.replicas, Purpose::Read)
            })
    }

    /// Runs `call` (a read forwarded to a replica of `partition`, this broker holding none)
    /// against `first`, then, while a replica did not answer or cannot serve the partition
    /// now, against another (a read is safe to repeat), each replica at most once. Before, a
    /// read went to one replica only, and failed whenever that one did.
    async fn read_elsewhere<T, F, Fut>(
        &self,
        topic: &crate::raft::TopicMeta,
        partition: u32,
        first: u64,
        hops: u32,
        call: F,
    ) -> Result<T, BrokerError>
    where
        F: Fn(u64) -> Fut,
        Fut: std::future::Future<Output = Result<T, BrokerError>>,
        T: crate::grpc::route_hints::Watermarked,
    {
        let replicas = topic
            .partitions
            .get(partition as usize)
            .map(|p| p.replicas.clone())
            .unwrap_or_default();
        let mut holder = first;
        let mut tried = Vec::new();
        loop {
            let mut result = call(holder).await;
            tried.push(holder);
            // (A forwarded call, `hops` > 0, was refused here without calling anyone.)
            if hops > 0
                || !self.node.route_hints.learn_read(
                    &topic.topic_id,
                    partition,
                    holder,
                    &mut result,
                )
            {
                return result;
            }
            let next = self
                .node
                .route_hints
                .pick(&topic.topic_id, partition, &replicas, Purpose::Read)
                .filter(|n| !tried.contains(n))
                .or_else(|| replicas.iter().copied().find(|n| !tried.contains(n)));
            match next {
                Some(next) => holder = next,
                None => return result,
            }
        }
    }

    /// The peer address of `holder`, a broker a call is forwarded to (once: `hops` 0).
    fn holder_address(&self, holder: u64, hops: u32) -> Result<String, BrokerError> {
        if hops > 0 {
            // No leader named: `holder` is only this broker's guess (the forwarding broker's
            // copy of the metadata placed a replica here; it asks another replica).
            return Err(BrokerError::Unavailable {
                reason: "this broker holds no replica of the partition".into(),
                leader: None,
            });
        }
        self.node
            .controller_state()
            .brokers
            .get(&holder)
            .map(|b| b.peer_address.clone())
            .ok_or_else(|| BrokerError::Unavailable {
                reason: format!("node {holder}, which holds the partition, is not known yet"),
                leader: Some(holder),
            })
    }

    /// Whether `offset` is within what the leader of `topic`/`partition` has committed, for an
    /// offset past this broker's replica's high watermark: a follower learns of commits after
    /// its leader (several seconds after a new leader was elected), and a consumer that read
    /// from the leader may commit through it. False when this broker's replica leads (its high
    /// watermark was the answer) or it holds none (the replica asked was a holder elsewhere).
    /// UNAVAILABLE while the leader is unknown or does not answer: ask again.
    async fn committed_on_leader(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<bool, BrokerError> {
        let Ok(hosted) = self.node.partition(topic, partition) else {
            return Ok(false);
        };
        let group = hosted.group();
        let unknown = |reason: String| BrokerError::Unavailable {
            reason,
            leader: group.leader(),
        };
        if group.is_leader() {
            // A leader holds every committed entry: past its log end nothing was acknowledged.
            // Up to it, the entries may be committed already (a new leader learns the commits
            // of the term before only with its own first entry): wait for them. Before, such a
            // commit was refused as past the high watermark, a final error.
            if offset > hosted.bounds().log_end {
                return Ok(false);
            }
            let mut high_watermark = hosted.watch_high_watermark();
            let wait = Duration::from_millis(self.node.config.request_timeout_ms);
            return match tokio::time::timeout(wait, high_watermark.wait_for(|h| *h >= offset)).await
            {
                Ok(Ok(_)) => Ok(true),
                _ => Err(unknown(format!(
                    "partition {partition}: offset {offset} is written on this leader and not \
                     committed yet; ask again"
                ))),
            };
        }
        let Some(leader) = group.leader() else {
            return Err(unknown(format!(
                "partition {partition}: offset {offset} is past this replica's high watermark, \
                 and its leader is not known now"
            )));
        };
        let request = GetOffsetsRequest {
            topic: topic.into(),
            partitions: vec![partition],
            group_id: String::new(),
            timestamp_ms: None,
        };
        match self.forward_offsets(request, leader, 0).await {
            Ok(bounds) => Ok(offset <= bounds.high_watermark),
            Err(e) => Err(unknown(format!(
                "partition {partition}: offset {offset} is past this replica's high watermark, \
                 and its leader (node {leader}) could not be asked: {e}"
            ))),
        }
    }

    /// Hands one partition's GetOffsets to `holder` (this broker has no replica of it).
    async fn forward_offsets(
        &self,
        request: GetOffsetsRequest,
        holder: u64,
        hops: u32,
    ) -> Result<PartitionOffsets, BrokerError> {
        let address = self.holder_address(holder, hops)?;
        let call = self.node.peers().request(
            holder,
            weft_proto::internal::v1::ForwardGetOffsetsRequest {
                request: Some(request),
                hops: 1,
                from_node_id: self.node.node_id,
            },
            Duration::from_millis(self.node.config.request_timeout_ms),
        );
        let mut client = super::forward_to(&self.node, holder, &address, "GetOffsets")?;
        client
            .get_offsets(call)
            .await?
            .into_inner()
            .partitions
            .into_iter()
            .next()
            .ok_or_else(|| BrokerError::Internal(format!("node {holder} answered no offsets")))
    }

    /// Hands a Fetch to `holder`, a broker with a replica of the partition (this one has none).
    async fn forward_fetch(
        &self,
        request: FetchRequest,
        holder: u64,
        hops: u32,
        timeout: Duration,
    ) -> Result<FetchResponse, BrokerError> {
        let address = self.holder_address(holder, hops)?;
        let call = self.node.peers().request(
            holder,
            weft_proto::internal::v1::ForwardFetchRequest {
                request: Some(request),
                hops: 1,
                from_node_id: self.node.node_id,
            },
            timeout,
        );
        let mut client = super::forward_to(&self.node, holder, &address, "Fetch")?;
        Ok(client.fetch(call).await?.into_inner())
    }

    /// CommitOffsets (and offset resets: `reset`), checked and stored; also the admin API's.
    pub(crate) async fn commit_inner(
        &self,
        request: &CommitOffsetsRequest,
    ) -> Result<CommitOffsetsResponse, BrokerError> {
        let topic = self.node.topic(&request.topic)?;
        if request.offsets.is_empty() {
            return Err(BrokerError::invalid("offsets", "nothing to commit"));
        }
        if request.member_id.is_empty() && request.generation != 0 {
            return Err(BrokerError::invalid(
                "generation",
                "a commit without a member id comes from outside the group's membership: \
                 generation 0",
            ));
        }
        if request.reset && (!request.member_id.is_empty() || request.generation != 0) {
            return Err(BrokerError::invalid(
                "reset",
                "a reset comes from outside membership: member_id empty, generation 0",
            ));
        }
        if request.reset {
            // Checked here too, before the reset travels to the group's coordinator: one of an
            // older build would take it for a plain commit.
            self.node.require_feature(1, "offset resets").await?;
        }
        self.check_offsets(
            &request.topic,
            topic.config.partitions,
            &request.offsets,
            request.reset,
        )
        .await?;
        let committed = group_link::commit(&self.node, request, &topic.topic_id, 0).await?;
        Ok(CommitOffsetsResponse {
            offsets: committed
                .into_iter()
                .map(|(partition, offset)| PartitionOffset { partition, offset })
                .collect(),
        })
    }

    /// Checks offsets to commit to `topic` (of `partitions` partitions) before they go to the
    /// group's coordinator, for a unary commit (or a reset) and a member's stream alike: each
    /// partition named once and existing, each offset at most the high watermark (a replica
    /// behind is waited for a moment), a reset's at least the log start.
    async fn check_offsets(
        &self,
        topic: &str,
        partitions: u32,
        offsets: &[PartitionOffset],
        reset: bool,
    ) -> Result<(), BrokerError> {
        let mut named = std::collections::BTreeSet::new();
        for o in offsets {
            if !named.insert(o.partition) {
                return Err(BrokerError::invalid(
                    "offsets",
                    format!("partition {} is named twice", o.partition),
                ));
            }
            if o.partition >= partitions {
                return Err(BrokerError::PartitionNotFound {
                    topic: topic.to_string(),
                    partition: o.partition,
                });
            }
            // A replica learns of a commit a heartbeat after its leader: a consumer that read
            // up to the leader's high watermark may commit through a broker whose replica has
            // not caught up yet. Wait a moment for it before refusing the offset.
            let patience = tokio::time::Instant::now() + COMMIT_HIGH_WATERMARK_WAIT;
            let bounds = loop {
                let bounds = self.partition_offsets(topic, o.partition, None).await?;
                if o.offset <= bounds.high_watermark || tokio::time::Instant::now() >= patience {
                    break bounds;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if o.offset > bounds.high_watermark
                && !self
                    .committed_on_leader(topic, o.partition, o.offset)
                    .await?
            {
                return Err(BrokerError::invalid(
                    "offsets",
                    format!(
                        "partition {}: offset {} is past the high watermark {}",
                        o.partition, o.offset, bounds.high_watermark
                    ),
                ));
            }
            // A group set back before the log start would only be moved up to it on its next
            // read: a reset names a retained offset.
            if reset && o.offset < bounds.log_start_offset {
                return Err(BrokerError::invalid(
                    "offsets",
                    format!(
                        "partition {}: offset {} is before the log start {} (retention removed it)",
                        o.partition, o.offset, bounds.log_start_offset
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One partition's offsets (and the first offset at `timestamp_ms`), from this broker's
    /// replica or from a broker holding one.
    async fn partition_offsets(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: Option<i64>,
    ) -> Result<PartitionOffsets, BrokerError> {
        let request = GetOffsetsRequest {
            topic: topic.into(),
            partitions: vec![partition],
            group_id: String::new(),
            timestamp_ms,
        };
        self.offsets_inner(&request, 0)
            .await?
            .partitions
            .into_iter()
            .next()
            .ok_or_else(|| BrokerError::Internal("no offsets for the partition".into()))
    }

    /// Whether this broker holds no replica of `topic`/`partition` (its reads are forwarded).
    /// (Reads the shared controller state; no copy of the topic: it runs per partition on
    /// every delivery round.)
    fn is_remote(&self, topic: &str, partition: u32) -> bool {
        self.node
            .controller_state()
            .topics
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
            .is_some_and(|p| !p.replicas.contains(&self.node.node_id))
    }

    /// Serves GetOffsets from this broker's replicas, forwarding the partitions it holds none of
    /// (once: `hops` 0).
    pub async fn offsets_inner(
        &self,
        request: &GetOffsetsRequest,
        hops: u32,
    ) -> Result<GetOffsetsResponse, BrokerError> {
        let topic = self.node.topic(&request.topic)?;
        if !request.group_id.is_empty() {
            crate::groups::validate_group_id(&request.group_id)?;
            // Committed offsets are read from this broker's copy of the controller state: bring
            // it up to what was committed before this call (a commit made through another
            // broker is seen).
            self.node.sync_controller().await?;
        }
        let partitions: Vec<u32> = if request.partitions.is_empty() {
            (0..topic.config.partitions).collect()
        } else {
            // Each partition once: the answer's size follows the topic, not the request.
            if request.partitions.len() > topic.config.partitions as usize {
                return Err(BrokerError::invalid(
                    "partitions",
                    format!(
                        "names {} partitions; topic {:?} has {}",
                        request.partitions.len(),
                        request.topic,
                        topic.config.partitions
                    ),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for &p in &request.partitions {
                if p >= topic.config.partitions {
                    return Err(BrokerError::PartitionNotFound {
                        topic: request.topic.clone(),
                        partition: p,
                    });
                }
                if !seen.insert(p) {
                    return Err(BrokerError::invalid(
                        "partitions",
                        format!("partition {p} is named twice"),
                    ));
                }
            }
            request.partitions.clone()
        };
        let mut out = Vec::with_capacity(partitions.len());
        for p in partitions {
            if let Some(holder) = self.holder_elsewhere(&topic, p) {
                let one = GetOffsetsRequest {
                    partitions: vec![p],
                    ..request.clone()
                };
                let answer = self
                    .read_elsewhere(&topic, p, holder, hops, |holder| {
                        self.forward_offsets(one.clone(), holder, hops)
                    })
                    .await?;
                out.push(answer);
                continue;
            }
            let partition = self.node.partition(&request.topic, p)?;
            let bounds = partition.bounds();
            let committed_offset = if request.group_id.is_empty() {
                None
            } else {
                self.node
                    .groups
                    .committed(&request.group_id, &topic.topic_id, p)?
            };
            let timestamp_offset = match request.timestamp_ms {
                Some(ts) => Some(partition.offset_for_timestamp(ts).await?),
                None => None,
            };
            out.push(PartitionOffsets {
                partition: p,
                log_start_offset: bounds.log_start,
                high_watermark: bounds.high_watermark,
                log_end_offset: bounds.log_end,
                committed_offset,
                timestamp_offset,
            });
        }
        Ok(GetOffsetsResponse { partitions: out })
    }
}

/// [`describe_group`], with the high watermarks (and so the lag) of the partitions this broker
/// holds no replica of asked of brokers that do. For DescribeGroup and the admin API,
/// answered by the group's coordinator (also for a describe forwarded to it: those reads are
/// its own, one hop each). A partition whose high watermark cannot be read now (no replica
/// answers) says so in its `unavailable`, the rest of the description stands.
pub async fn describe_group_everywhere(
    node: &Arc<Node>,
    group_id: &str,
) -> Result<v1::GroupDescription, BrokerError> {
    let mut d = describe_group(node, group_id)?;
    let mut elsewhere: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for p in &d.partitions {
        if node.partition(&p.topic, p.partition).is_err() {
            elsewhere
                .entry(p.topic.clone())
                .or_default()
                .push(p.partition);
        }
    }
    if elsewhere.is_empty() {
        return Ok(d);
    }
    let service = SubscriberService::new(node.clone());
    for (topic, partitions) in elsewhere {
        // One partition at a time: one that cannot be read leaves the others known.
        for partition in partitions {
            let request = v1::GetOffsetsRequest {
                topic: topic.clone(),
                partitions: vec![partition],
                ..Default::default()
            };
            let answer = service.offsets_inner(&request, 0).await;
            let Some(p) = d
                .partitions
                .iter_mut()
                .find(|p| p.topic == topic && p.partition == partition)
            else {
                continue;
            };
            match answer.map(|a| a.partitions.first().map(|o| o.high_watermark)) {
                Ok(Some(high_watermark)) => {
                    p.high_watermark = high_watermark;
                    p.lag = high_watermark.saturating_sub(p.committed_offset);
                }
                Ok(None) => p.unavailable = "no offsets in the answer".into(),
                Err(e) => p.unavailable = e.to_string(),
            }
        }
    }
    d.lag = d.partitions.iter().map(|p| p.lag).sum();
    Ok(d)
}

/// A consumer group with its members, commits and lag, from what this broker holds: a
/// partition it holds no replica of shows its committed offset as its high watermark (see
/// [`describe_group_everywhere`]).
pub fn describe_group(node: &Node, group_id: &str) -> Result<v1::GroupDescription, BrokerError> {
    let d = node
        .groups
        .describe(group_id)?
        .ok_or_else(|| BrokerError::GroupNotFound(group_id.into()))?;
    let topics = node.controller_state();
    let name_of = |topic_id: &str| {
        topics
            .topics
            .values()
            .find(|t| t.topic_id == topic_id)
            .map(|t| t.name.clone())
    };
    let partitions: Vec<v1::GroupPartition> = d
        .committed
        .iter()
        .filter_map(|c| {
            // Offsets of a topic deleted a moment ago are being forgotten: not shown.
            let topic = name_of(&c.topic_id)?;
            let high_watermark = node
                .partition(&topic, c.partition)
                .map_or(c.offset, |p| p.bounds().high_watermark);
            Some(v1::GroupPartition {
                topic,
                partition: c.partition,
                committed_offset: c.offset,
                high_watermark,
                lag: high_watermark.saturating_sub(c.offset),
                unavailable: String::new(),
            })
        })
        .collect();
    let topic = if d.topic.is_empty() {
        partitions
            .first()
            .map(|p| p.topic.clone())
            .unwrap_or_default()
    } else {
        d.topic
    };
    if d.members.is_empty() && partitions.is_empty() {
        return Err(BrokerError::GroupNotFound(group_id.into()));
    }
    Ok(v1::GroupDescription {
        group_id: d.group_id,
        topic,
        generation: d.generation,
        members: d
            .members
            .into_iter()
            .map(|m| v1::GroupMember {
                member_id: m.member_id,
                partitions: m.partitions,
                connected: m.connected,
                idle_ms: m.idle_ms,
            })
            .collect(),
        lag: partitions.iter().map(|p| p.lag).sum(),
        partitions,
    })
}

type SubscribeStream =
    Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Subscriber for SubscriberService {
    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let started = Instant::now();
        let result = async {
            check_headers(
                request.metadata(),
                &request.get_ref().topic,
                Some(request.get_ref().partition),
            )?;
            super::authorize(
                &self.node,
                &request,
                Operation::Subscribe,
                Resource::Topic(&request.get_ref().topic),
            )?;
            let answer_by = request
                .metadata()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(weft_proto::parse_grpc_timeout)
                .and_then(|t| started.checked_add(t));
            if !weft_proto::otel::enabled() {
                return self.fetch_inner(request.into_inner(), 0, answer_by).await;
            }
            let caller = weft_proto::otel::metadata_context(request.metadata());
            let request = request.into_inner();
            let (topic, partition) = (request.topic.clone(), request.partition);
            let result = self.fetch_inner(request, 0, answer_by).await;
            if let Ok(response) = &result
                && !response.records.is_empty()
            {
                let cx = delivery_span(
                    "fetch",
                    &topic,
                    partition,
                    None,
                    &response.records,
                    self.node.node_id,
                    &caller,
                );
                crate::otel::end(&cx, &result);
            }
            result
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        crate::metrics::rpc("Fetch", started, &result);
        result
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<SubscribeStream>, Status> {
        let started = Instant::now();
        let header_topic = request
            .metadata()
            .get(weft_proto::TOPIC_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let header_group =
            super::header(request.metadata(), weft_proto::GROUP_HEADER).map(str::to_string);
        let identity = crate::auth::identity_of(&request);
        let mut inbound = request.into_inner();
        let result = async {
            let first = crate::grpc::first_message(&self.node, &mut inbound, "start")
                .await?
                .map_err(|s| BrokerError::invalid("request", s.message().to_string()))?;
            let Some(SubscribeRequest {
                request: Some(Inbound::Start(start)),
            }) = first
            else {
                return Err(BrokerError::invalid(
                    "request",
                    "the first message of a Subscribe stream must be `start`",
                ));
            };
            check_mirrored(
                "metadata.weft-topic",
                "topic",
                header_topic.as_deref(),
                &start.topic,
            )?;
            check_mirrored(
                "metadata.weft-group",
                "group",
                header_group.as_deref(),
                &start.group_id,
            )?;
            // Checked on the start message's topic and group, whatever the headers say.
            authorize_subscribe(&self.node, &identity, &start)?;
            Session::open(self.node.clone(), identity, start, inbound).await
        }
        .await
        .map_err(Status::from);
        let result =
            result.map(|rx| Response::new(Box::pin(ReceiverStream::new(rx)) as SubscribeStream));
        crate::metrics::rpc("Subscribe", started, &result);
        result
    }

    async fn commit_offsets(
        &self,
        request: Request<CommitOffsetsRequest>,
    ) -> Result<Response<CommitOffsetsResponse>, Status> {
        let started = Instant::now();
        let result = match check_headers(request.metadata(), &request.get_ref().topic, None)
            .and_then(|()| check_group_header(request.metadata(), &request.get_ref().group_id))
            .and_then(|()| {
                super::authorize(
                    &self.node,
                    &request,
                    Operation::Commit,
                    Resource::Group(&request.get_ref().group_id),
                )
            })
            .and_then(|()| {
                // Rewinding or skipping a group is altering it, more than committing.
                if !request.get_ref().reset {
                    return Ok(());
                }
                super::authorize(
                    &self.node,
                    &request,
                    Operation::Alter,
                    Resource::Group(&request.get_ref().group_id),
                )
            }) {
            Ok(()) => self.commit_inner(request.get_ref()).await,
            Err(e) => Err(e),
        }
        .map(Response::new)
        .map_err(Status::from);
        crate::metrics::rpc("CommitOffsets", started, &result);
        result
    }

    async fn list_groups(
        &self,
        request: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        let started = Instant::now();
        let identity = crate::auth::identity_of(&request);
        let result = group_link::list(&self.node, 0)
            .await
            .map(|group_ids| {
                // Only the groups the caller may describe.
                let group_ids = group_ids
                    .into_iter()
                    .filter(|g| {
                        self.node
                            .allowed(&identity, Operation::Describe, Resource::Group(g))
                    })
                    .collect();
                Response::new(v1::ListGroupsResponse { group_ids })
            })
            .map_err(Status::from);
        crate::metrics::rpc("ListGroups", started, &result);
        result
    }

    async fn describe_group(
        &self,
        request: Request<v1::DescribeGroupRequest>,
    ) -> Result<Response<v1::GroupDescription>, Status> {
        let started = Instant::now();
        let result = async {
            check_group_header(request.metadata(), &request.get_ref().group_id)?;
            super::authorize(
                &self.node,
                &request,
                Operation::Describe,
                Resource::Group(&request.get_ref().group_id),
            )?;
            group_link::describe(&self.node, &request.get_ref().group_id, 0).await
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        crate::metrics::rpc("DescribeGroup", started, &result);
        result
    }

    async fn delete_group(
        &self,
        request: Request<v1::DeleteGroupRequest>,
    ) -> Result<Response<v1::DeleteGroupResponse>, Status> {
        let started = Instant::now();
        let result = async {
            check_group_header(request.metadata(), &request.get_ref().group_id)?;
            super::authorize(
                &self.node,
                &request,
                Operation::Delete,
                Resource::Group(&request.get_ref().group_id),
            )?;
            group_link::delete(&self.node, &request.get_ref().group_id, 0).await
        }
        .await
        .map(|()| Response::new(v1::DeleteGroupResponse {}))
        .map_err(Status::from);
        crate::metrics::rpc("DeleteGroup", started, &result);
        result
    }

    async fn leave_group(
        &self,
        request: Request<v1::LeaveGroupRequest>,
    ) -> Result<Response<v1::LeaveGroupResponse>, Status> {
        let started = Instant::now();
        let r = request.get_ref();
        let result = async {
            check_group_header(request.metadata(), &r.group_id)?;
            super::authorize(
                &self.node,
                &request,
                Operation::Subscribe,
                Resource::Group(&r.group_id),
            )?;
            group_link::leave(&self.node, &r.group_id, &r.member_id, 0).await
        }
        .await
        .map(|left| Response::new(v1::LeaveGroupResponse { left }))
        .map_err(Status::from);
        crate::metrics::rpc("LeaveGroup", started, &result);
        result
    }

    async fn get_offsets(
        &self,
        request: Request<GetOffsetsRequest>,
    ) -> Result<Response<GetOffsetsResponse>, Status> {
        let started = Instant::now();
        let result = match check_headers(request.metadata(), &request.get_ref().topic, None)
            .and_then(|()| check_group_header(request.metadata(), &request.get_ref().group_id))
            .and_then(|()| {
                super::authorize(
                    &self.node,
                    &request,
                    Operation::Describe,
                    Resource::Topic(&request.get_ref().topic),
                )
            })
            .and_then(|()| {
                if request.get_ref().group_id.is_empty() {
                    return Ok(());
                }
                super::authorize(
                    &self.node,
                    &request,
                    Operation::Describe,
                    Resource::Group(&request.get_ref().group_id),
                )
            }) {
            // Within the call's deadline (timestamp lookups read the disk; forwards wait on
            // peers).
            Ok(()) => tokio::time::timeout(
                super::deadline(request.metadata(), &self.node),
                self.offsets_inner(request.get_ref(), 0),
            )
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::Timeout(
                    "the offsets were not found within the call's deadline".into(),
                ))
            }),
            Err(e) => Err(e),
        }
        .map(Response::new)
        .map_err(Status::from);
        crate::metrics::rpc("GetOffsets", started, &result);
        result
    }
}

/// How a Subscribe stream ended without an error to report.
enum Ended {
    /// The client ended its side of the stream: a deliberate close.
    ClientClosed,
    /// The connection broke.
    Broken,
}

/// Whether the stored ACL rules in `watch` differ from `seen` (then kept as seen).
fn rules_changed(
    watch: &mut watch::Receiver<Arc<crate::raft::ControllerState>>,
    seen: &mut Vec<crate::acl::AclRule>,
) -> bool {
    let state = watch.borrow_and_update();
    if state.acls == *seen {
        return false;
    }
    seen.clone_from(&state.acls);
    true
}

/// Whether `identity` may read what `start` names: its topic, and its group if any.
fn authorize_subscribe(
    node: &Node,
    identity: &crate::auth::Identity,
    start: &SubscribeStart,
) -> Result<(), BrokerError> {
    node.authorize(
        identity,
        Operation::Subscribe,
        Resource::Topic(&start.topic),
    )?;
    if !start.group_id.is_empty() {
        node.authorize(
            identity,
            Operation::Subscribe,
            Resource::Group(&start.group_id),
        )?;
    }
    Ok(())
}

/// A replica's offsets, as [`start_position`] needs them.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    log_start: u64,
    high_watermark: u64,
    /// The first offset at the asked timestamp, if one was asked.
    at_timestamp: Option<u64>,
}

/// Runs `work` (a step of a group member's session that may take seconds: its commit's
/// proposal, the wait for the group's commits in flight, the start offsets of a new
/// assignment) and heartbeats the member meanwhile: the session reads none of the member's own
/// heartbeats until it is done. Before, a member whose session was shorter than such a step
/// expired while its stream waited, and its group rebalanced.
async fn kept_alive<T>(
    member: Option<&GroupLink>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let Some(member) = member else {
        return work.await;
    };
    tokio::pin!(work);
    // Four times per session timeout, the first once the work has taken that long (a step
    // done at once says nothing of whether the client is alive).
    let every = (member.session / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = beat.tick() => {
                // (A member gone meanwhile is found at its next message.)
                let _ = member.heartbeat();
            }
        }
    }
}

/// Where a stream starts reading a partition: where the client says it resumes, else the
/// group's committed offset, else the asked start position.
///
/// A group member's position (resumed or committed) is only raised to the log's start
/// (retention may have removed it), never lowered to `bounds`' high watermark: that is the
/// serving replica's, which may lag the leader the position was read from. Lowered, the member
/// re-read records committed already, and its next commit, behind the stored offset, was
/// refused (a commit never goes backwards). A position past the high watermark waits for the
/// replica. Outside a group a resumed position is kept within the replica's range (nothing
/// checked it: past the end it would skip records, a topic created again say; lowered, a few
/// records come twice).
fn start_position(
    resume: Option<u64>,
    member: bool,
    committed: Option<u64>,
    start: Option<&Position>,
    bounds: Bounds,
) -> u64 {
    let clamp = |o: u64| o.clamp(bounds.log_start, bounds.high_watermark);
    match (resume, committed) {
        (Some(offset), _) if !member => return clamp(offset),
        (Some(offset), _) | (None, Some(offset)) => return offset.max(bounds.log_start),
        (None, None) => {}
    }
    match start {
        Some(Position::Earliest(_)) => bounds.log_start,
        Some(Position::Offset(o)) => clamp(*o),
        Some(Position::TimestampMs(_)) => bounds.at_timestamp.unwrap_or(bounds.high_watermark),
        Some(Position::Latest(_)) | None => bounds.high_watermark,
    }
}

/// One open Subscribe stream.
struct Session {
    node: Arc<Node>,
    /// Who opened the stream: checked again whenever the access rules change.
    identity: crate::auth::Identity,
    start: SubscribeStart,
    topic_id: String,
    group: Option<GroupLink>,
    view: Option<watch::Receiver<Arc<GroupView>>>,
    generation: u64,
    positions: BTreeMap<u32, u64>,
    /// The partition the next delivery round starts at: the one after the last partition
    /// delivered from, so one with a backlog larger than the credit cannot take every round.
    next_first: u32,
    /// Partitions held elsewhere that had nothing at their position at the last read: not read
    /// again until the long poll on them (kept across the session's rounds) says they have.
    remote_idle: BTreeSet<u32>,
    /// Counts assignments: a long poll made before the last one polls old positions.
    assignments: u64,
    /// Partitions of the assignment that could not be placed (no start offset: none of their
    /// replicas answered): left out of what the subscriber was told it owns, tried again at
    /// every heartbeat, and given to it with a new Assignment once placed.
    unplaced: BTreeSet<u32>,
    /// Per partition, the position this stream's deliveries (or a skip past retention) took it
    /// to since it was assigned: within the high watermark. A position it started from (a
    /// committed offset, or an offset the subscriber resumed from) is not in it: it may lie
    /// past the high watermark.
    delivered: BTreeMap<u32, u64>,
    resume: HashMap<u32, u64>,
    credit_records: u64,
    credit_bytes: u64,
    tx: mpsc::Sender<Result<SubscribeResponse, Status>>,
    /// Control messages (assignments, commit acknowledgements) that found the stream's queue
    /// full, in order: sent as room comes, before any further delivery (see
    /// [`Session::send_control`]).
    pending: VecDeque<Result<SubscribeResponse, Status>>,
    /// A place in the stream's queue kept for the stream's last word (the error that ends it):
    /// the session puts it there and ends at once, even when its subscriber stopped reading
    /// (who gets it, after what was queued before it, once it reads again).
    last_word: Option<mpsc::OwnedPermit<Result<SubscribeResponse, Status>>>,
}

/// Control messages a session holds while its subscriber does not read; at this many it stops
/// reading the subscriber's messages (and taking new assignments) until some are sent.
const PENDING_CONTROL_MAX: usize = 64;

fn subscriber_gone() -> BrokerError {
    BrokerError::Unavailable {
        reason: "subscriber went away".into(),
        leader: None,
    }
}

fn event(event: Event) -> Result<SubscribeResponse, Status> {
    Ok(SubscribeResponse { event: Some(event) })
}

impl Session {
    /// Validates the start message, joins the group if any, and starts the session task.
    async fn open(
        node: Arc<Node>,
        identity: crate::auth::Identity,
        start: SubscribeStart,
        inbound: Streaming<SubscribeRequest>,
    ) -> Result<mpsc::Receiver<Result<SubscribeResponse, Status>>, BrokerError> {
        let topic = node.topic(&start.topic)?;
        if !start.group_id.is_empty() && !start.partitions.is_empty() {
            return Err(BrokerError::invalid(
                "partitions",
                "a group member is assigned its partitions: name none with a group_id",
            ));
        }
        let max_session_ms = crate::groups::SESSION_TIMEOUT_MAX.as_millis();
        let min_session_ms = crate::groups::SESSION_TIMEOUT_MIN.as_millis();
        let session_ms = u128::from(start.session_timeout_ms);
        if session_ms > max_session_ms || (session_ms > 0 && session_ms < min_session_ms) {
            return Err(BrokerError::invalid(
                "session_timeout_ms",
                format!(
                    "{session_ms} ms: must be 0 (the broker's default) or between \
                     {min_session_ms} and {max_session_ms} ms"
                ),
            ));
        }
        let mut named = std::collections::HashSet::new();
        for &p in &start.partitions {
            if !named.insert(p) {
                return Err(BrokerError::invalid(
                    "partitions",
                    format!("partition {p} is named twice"),
                ));
            }
            if p >= topic.config.partitions {
                return Err(BrokerError::PartitionNotFound {
                    topic: start.topic.clone(),
                    partition: p,
                });
            }
        }
        let (group, view) = if start.group_id.is_empty() {
            (None, None)
        } else {
            let session = (start.session_timeout_ms > 0)
                .then(|| Duration::from_millis(u64::from(start.session_timeout_ms)));
            let joining = Joining {
                group_id: start.group_id.clone(),
                member_id: (!start.member_id.is_empty()).then(|| start.member_id.clone()),
                topic: start.topic.clone(),
                topic_id: topic.topic_id.clone(),
                partitions: topic.config.partitions,
                session,
            };
            let (link, view) = group_link::join(&node, joining).await?;
            (Some(link), Some(view))
        };
        // One more place than the buffer: kept for the stream's last word.
        let (tx, rx) = mpsc::channel(STREAM_BUFFER + 1);
        let last_word = tx.clone().try_reserve_owned().ok();
        let credit = start.credit.unwrap_or_default();
        let session = Session {
            resume: start
                .resume
                .iter()
                .map(|o| (o.partition, o.offset))
                .collect(),
            credit_records: u64::from(credit.records),
            credit_bytes: credit.bytes,
            node,
            identity,
            start,
            topic_id: topic.topic_id.clone(),
            group,
            view,
            generation: 0,
            positions: BTreeMap::new(),
            next_first: 0,
            remote_idle: BTreeSet::new(),
            assignments: 0,
            unplaced: BTreeSet::new(),
            delivered: BTreeMap::new(),
            tx,
            pending: VecDeque::new(),
            last_word,
        };
        tokio::spawn(session.run(inbound));
        Ok(rx)
    }

    /// Where delivery of each of `partitions` starts ([`Self::start_offset`]), and the ones
    /// that cannot be placed yet: not open here yet (added to the topic just now: its replicas
    /// open and elect a leader within about an election timeout), or held by brokers that do
    /// not answer. Those are tried again (when `again`) until `patience` has passed in all (one
    /// wait for every partition, not one each), then left unplaced: the stream goes on with the
    /// others rather than ending (a partition whose only replica is down ended it at every
    /// reconnect).
    async fn start_offsets(
        &self,
        partitions: &[u32],
        patience: Duration,
        again: bool,
    ) -> Result<(BTreeMap<u32, u64>, BTreeSet<u32>), BrokerError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut placed = BTreeMap::new();
        let mut waiting: Vec<u32> = partitions.to_vec();
        loop {
            let mut still = Vec::new();
            for p in waiting {
                match tokio::time::timeout_at(deadline, self.start_offset(p)).await {
                    Ok(Ok(offset)) => {
                        placed.insert(p, offset);
                    }
                    // (Here, or answered by the broker holding the partition.)
                    Ok(Err(e)) if e.code() == tonic::Code::Unavailable => still.push(p),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => still.push(p),
                }
            }
            if !again || still.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok((placed, still.into_iter().collect()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            waiting = still;
        }
    }

    /// Where delivery of `partition` starts: resume offset > group commit > start position.
    async fn start_offset(&self, partition: u32) -> Result<u64, BrokerError> {
        let service = SubscriberService::new(self.node.clone());
        let timestamp = match self.start.start.as_ref().and_then(|s| s.position.as_ref()) {
            Some(Position::TimestampMs(ts)) => Some(*ts),
            _ => None,
        };
        // This broker's replica, or (it holds none) the offsets of a broker that does.
        let (log_start, high_watermark, at_timestamp) =
            if service.is_remote(&self.start.topic, partition) {
                let o = service
                    .partition_offsets(&self.start.topic, partition, timestamp)
                    .await?;
                (o.log_start_offset, o.high_watermark, o.timestamp_offset)
            } else {
                let hosted = self.node.partition(&self.start.topic, partition)?;
                let bounds = hosted.bounds();
                let at = match timestamp {
                    Some(ts) => Some(hosted.offset_for_timestamp(ts).await?),
                    None => None,
                };
                (bounds.log_start, bounds.high_watermark, at)
            };
        let committed = match (&self.group, self.resume.contains_key(&partition)) {
            (Some(member), false) => {
                self.node
                    .groups
                    .committed(&member.group_id, &self.topic_id, partition)?
            }
            _ => None,
        };
        Ok(start_position(
            self.resume.get(&partition).copied(),
            self.group.is_some(),
            committed,
            self.start.start.as_ref().and_then(|s| s.position.as_ref()),
            Bounds {
                log_start,
                high_watermark,
                at_timestamp,
            },
        ))
    }

    /// Takes a new set of partitions (in a group, those `view` gives this member), keeping
    /// positions of those kept: owned at this stream's previous assignment and, in a group,
    /// held without a break since (a member whose stream missed a whole generation, busy
    /// when the group rebalanced twice, may find a partition it had that another member held
    /// in between, read and committed further: it starts over from the commit; before, it
    /// went on from its own older position, read those records again, and its commit was
    /// refused as going backwards).
    async fn assign(
        &mut self,
        partitions: Vec<u32>,
        view: Option<&GroupView>,
    ) -> Result<(), BrokerError> {
        let generation = view.map_or(0, |v| v.generation);
        // A resume offset kept for a partition left unplaced at the first assignment places it
        // in a later one only if this member held it without a break since (another member
        // may have read and committed further in between).
        if self.group.is_some() && self.assignments > 0 {
            let previous = self.generation;
            self.resume
                .retain(|p, _| view.is_some_and(|v| v.held_since(*p, previous)));
        }
        let kept: Vec<u32> = partitions
            .iter()
            .copied()
            .filter(|p| {
                self.positions.contains_key(p)
                    && view.is_none_or(|v| v.held_since(*p, self.generation))
            })
            .collect();
        // A partition new to this member: its previous owner's commits in flight are stored
        // (or refused) before its committed offset is read. (On the coordinator's broker; a
        // view from another broker's coordinator was sent after it waited the same way.)
        if let Some(member) = &self.group
            && partitions.len() > kept.len()
        {
            kept_alive(
                Some(member),
                self.node.groups.settle_commits(&member.group_id),
            )
            .await;
        }
        // Owned at the previous assignment, but not kept: they start again.
        let restarted: Vec<u32> = partitions
            .iter()
            .copied()
            .filter(|p| self.positions.contains_key(p) && !kept.contains(p))
            .collect();
        let new: Vec<u32> = partitions
            .iter()
            .copied()
            .filter(|p| !kept.contains(p))
            .collect();
        let (mut positions, unplaced) = kept_alive(
            self.group.as_ref(),
            self.start_offsets(&new, NEW_PARTITION_WAIT, true),
        )
        .await?;
        for p in &kept {
            if let Some(&position) = self.positions.get(p) {
                positions.insert(*p, position);
            }
        }
        if !unplaced.is_empty() {
            tracing::info!(
                topic = %self.start.topic,
                group = %self.start.group_id,
                ?unplaced,
                "partitions given to a subscriber cannot be read now: it goes on without them, and they are tried again"
            );
        }
        self.store_start_positions(&positions, &kept, generation);
        self.delivered.retain(|p, _| kept.contains(p));
        self.positions = positions;
        self.unplaced = unplaced;
        self.generation = generation;
        self.remote_idle.clear();
        // The client's resume offsets say where it was when this stream opened: they place the
        // first assignment only (and, of it, the partitions left unplaced, once placed). A
        // partition given back later (after a rebalance took it away) starts at the group's
        // commit, which its owner meanwhile moved on; before, the resume offset won again, the
        // records in between came again, and the member's next commit was refused as going
        // backwards.
        if self.group.is_some() {
            let unplaced = &self.unplaced;
            self.resume.retain(|p, _| unplaced.contains(p));
        }
        self.assignments += 1;
        self.send_assignment(restarted).await
    }

    /// Tells the subscriber what it owns now: the placed partitions and where each starts (or,
    /// owned before on this stream, how far it was delivered); `restarted` as in
    /// `Assignment::restarted_partitions`.
    async fn send_assignment(&mut self, restarted: Vec<u32>) -> Result<(), BrokerError> {
        let generation = self.generation;
        let (group_id, member_id) = match &self.group {
            Some(m) => (m.group_id.clone(), m.member_id.clone()),
            None => (String::new(), String::new()),
        };
        // What the group's coordinator holds the member to (its default when the member asked
        // for none: before, this broker's default was reported, and a member connected through
        // a broker whose default is longer than the coordinator's heartbeated too seldom).
        let session_timeout_ms = self.group.as_ref().map_or(0, |member| {
            u32::try_from(member.session.as_millis()).unwrap_or(u32::MAX)
        });
        let assignment = Assignment {
            group_id,
            member_id,
            generation,
            session_timeout_ms,
            partitions: self
                .positions
                .iter()
                .map(|(&partition, &offset)| PartitionOffset { partition, offset })
                .collect(),
            restarted_partitions: restarted,
            heartbeat_ms: u32::try_from(self.node.config.stream_heartbeat_ms).unwrap_or(u32::MAX),
        };
        self.send_control(event(Event::Assignment(assignment)))
            .await
    }

    /// Places what can be placed now of the partitions left unplaced at the last assignment:
    /// each gets its start offset (one try each, within [`PLACE_AGAIN_WAIT`] in all: the
    /// session reads nothing else meanwhile), and
    /// the subscriber a new Assignment of the same generation that adds them (it keeps its own
    /// positions in the others).
    async fn place_unplaced(&mut self) -> Result<(), BrokerError> {
        let waiting: Vec<u32> = self.unplaced.iter().copied().collect();
        let (placed, unplaced) = self
            .start_offsets(&waiting, PLACE_AGAIN_WAIT, false)
            .await?;
        if placed.is_empty() {
            return Ok(());
        }
        tracing::info!(
            topic = %self.start.topic,
            group = %self.start.group_id,
            placed = ?placed.keys().collect::<Vec<_>>(),
            "partitions of a subscriber's assignment can be read again"
        );
        self.store_start_positions(&placed, &[], self.generation);
        if self.group.is_some() {
            // Placed now, from its resume offset if it had one: a later assignment that gives
            // it back starts at the group's commit.
            self.resume.retain(|p, _| !placed.contains_key(p));
        }
        self.positions.extend(placed);
        self.unplaced = unplaced;
        self.send_assignment(Vec::new()).await
    }

    /// A partition its group never committed on starts where the start position put it now
    /// ("latest", a time): that is stored as the group's commit at once, as Kafka's consumer
    /// commits the position it reset to (of `positions`, those not `kept` from the previous
    /// assignment). A member given the partition next starts there too; before, it took
    /// "latest" again, later, and what was published in between went to nobody (the first
    /// member had read none of it, or had not committed yet). ("Earliest" is not stored: taken
    /// again later it finds the same records, or fewer after retention.)
    fn store_start_positions(&self, positions: &BTreeMap<u32, u64>, kept: &[u32], generation: u64) {
        let earliest = matches!(
            self.start.start.as_ref().and_then(|s| s.position.as_ref()),
            Some(Position::Earliest(_))
        );
        if let Some(member) = &self.group
            && !earliest
        {
            let fresh: Vec<PartitionOffset> = positions
                .iter()
                .filter(|(p, _)| !kept.contains(p) && !self.resume.contains_key(p))
                .filter(|(p, _)| {
                    matches!(
                        self.node
                            .groups
                            .committed(&member.group_id, &self.topic_id, **p),
                        Ok(None)
                    )
                })
                .map(|(&partition, &offset)| PartitionOffset { partition, offset })
                .collect();
            if !fresh.is_empty() {
                let request = CommitOffsetsRequest {
                    group_id: member.group_id.clone(),
                    member_id: member.member_id.clone(),
                    generation,
                    topic: self.start.topic.clone(),
                    offsets: fresh,
                    reset: false,
                };
                // In the background: the stream goes on reading its member's heartbeats
                // meanwhile (a slow controller must not expire it). Every step of the commit
                // has its own timeout; one around it all could end it while its proposal is
                // still on the way, and release the group's commit lock before it is stored.
                // Refused (the group moved on meanwhile, or the member's own commit came
                // first: never stored below it), the next owner resolves its own start, as
                // before.
                let node = self.node.clone();
                let topic_id = self.topic_id.clone();
                tokio::spawn(async move {
                    if let Err(e) = group_link::commit(&node, &request, &topic_id, 0).await {
                        tracing::debug!(group = %request.group_id, "start positions not stored: {e}");
                    }
                });
            }
        }
    }

    async fn send(&self, message: Result<SubscribeResponse, Status>) -> Result<(), BrokerError> {
        self.tx.send(message).await.map_err(|_| subscriber_gone())
    }

    /// Sends a control message without waiting for room: when the stream's queue is full (the
    /// subscriber is not reading), it waits in `pending` and the session goes on reading the
    /// subscriber's messages, its heartbeats among them. Waiting here instead let a slow
    /// member's session expire while its client heartbeated (a commit acknowledgement or a new
    /// assignment stuck behind deliveries it had not read). `pending` stays bounded: at
    /// [`PENDING_CONTROL_MAX`] the session reads no more of the subscriber's messages and takes
    /// no new assignment until some are sent ([`Session::serve`]). Waiting here for room
    /// instead held the session, stuck (deaf to its maximum age and to the broker's stop), for
    /// as long as the subscriber kept its connection without reading.
    async fn send_control(
        &mut self,
        message: Result<SubscribeResponse, Status>,
    ) -> Result<(), BrokerError> {
        if !self.pending.is_empty() {
            self.pending.push_back(message);
            return Ok(());
        }
        match self.tx.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(message)) => {
                self.pending.push_back(message);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(subscriber_gone()),
        }
    }

    /// NOT_FOUND once the stream's topic is gone, deleted (and perhaps created again under its
    /// name: partitions are found by name, and the new topic's must not be read from the old
    /// one's positions). This broker's copy of the metadata: a copy behind sees it later.
    fn check_topic(&self) -> Result<(), BrokerError> {
        let state = self.node.controller_state();
        match state.topics.get(&self.start.topic) {
            Some(topic) if topic.topic_id == self.topic_id => Ok(()),
            _ => Err(BrokerError::TopicNotFound(self.start.topic.clone())),
        }
    }

    /// Delivers what credit allows from every owned partition, without waiting. Returns whether
    /// anything was sent, or a position moved past what retention removed (either way, the
    /// caller delivers again at once).
    async fn deliver(&mut self) -> Result<bool, BrokerError> {
        self.check_topic()?;
        let mut sent = false;
        let mut owned: Vec<(u32, u64)> = self.positions.iter().map(|(&p, &o)| (p, o)).collect();
        let first = owned.partition_point(|(p, _)| *p < self.next_first);
        owned.rotate_left(first);
        // One deadline for the round's reads of partitions held elsewhere: holders that do not
        // answer cost the round at most that, however many partitions they hold.
        let remote_deadline = tokio::time::Instant::now() + REMOTE_DELIVERY_TIMEOUT;
        for (p, position) in owned {
            if self.credit_records == 0 || self.credit_bytes == 0 {
                break;
            }
            // The stream's queue is full (the subscriber is not reading: its HTTP/2 window is
            // full too): waiting here for room would stop the session reading the subscriber's
            // messages, its heartbeats among them. The session loop waits for room instead,
            // and sends the control messages waiting first (an assignment precedes the
            // deliveries of its generation).
            if self.tx.capacity() == 0 || !self.pending.is_empty() {
                break;
            }
            let max_bytes = (self
                .credit_bytes
                .min(u64::from(self.node.config.fetch_bytes_max)))
                as usize;
            let service = SubscriberService::new(self.node.clone());
            if service.is_remote(&self.start.topic, p) {
                if self.remote_idle.contains(&p) {
                    continue;
                }
                if tokio::time::Instant::now() >= remote_deadline {
                    // Tried at a later round.
                    continue;
                }
                if self
                    .deliver_remote(&service, p, position, max_bytes, remote_deadline)
                    .await?
                {
                    sent = true;
                    self.next_first = p.saturating_add(1);
                } else {
                    self.remote_idle.insert(p);
                }
                continue;
            }
            let hosted = match self.node.partition(&self.start.topic, p) {
                Ok(hosted) => hosted,
                // Not open here right now (opening, or down after a storage error): the other
                // partitions go on; this one is read again once it is back.
                Err(e) if e.code() == tonic::Code::Unavailable => continue,
                Err(e) => return Err(e),
            };
            let high_watermark = hosted.high_watermark();
            if position >= high_watermark {
                continue;
            }
            let batches = match hosted.read(position, max_bytes, 0, Duration::ZERO).await {
                Ok(batches) => batches,
                Err(BrokerError::OffsetOutOfRange { start, .. }) if position < start => {
                    // Retention removed what this subscriber had not read: skip to what is left,
                    // and deliver again at once (no new record need come to wake the stream).
                    self.positions.insert(p, start);
                    self.delivered.insert(p, start);
                    sent = true;
                    continue;
                }
                Err(e) if e.code() == tonic::Code::Unavailable => continue,
                Err(e) => return Err(e),
            };
            let records = to_records(&batches, position, self.credit_records as usize, max_bytes);
            let Some(last) = records.last() else { continue };
            let next = last.offset + 1;
            let bytes: u64 = records.iter().map(|r| record_size(r) as u64).sum();
            self.credit_records = self.credit_records.saturating_sub(records.len() as u64);
            self.credit_bytes = self.credit_bytes.saturating_sub(bytes);
            self.positions.insert(p, next);
            self.delivered.insert(p, next);
            if next >= high_watermark {
                // Caught up with the last commit: how long after it the records go out.
                metrics::histogram!("weft_delivery_seconds")
                    .record(hosted.group().committed_at().elapsed().as_secs_f64());
            }
            let span = self.deliver_span(p, &records);
            let result = self
                .send(event(Event::Delivery(Delivery {
                    partition: p,
                    records,
                    high_watermark,
                })))
                .await;
            if let Some(cx) = span {
                crate::otel::end(&cx, &result);
            }
            result?;
            sent = true;
            self.next_first = p.saturating_add(1);
        }
        Ok(sent)
    }

    /// Delivers what credit allows of partition `p`, which this broker holds no replica of:
    /// read from a broker that does (Forward.Fetch, without waiting). Whether anything was sent
    /// (or the position moved).
    async fn deliver_remote(
        &mut self,
        service: &SubscriberService,
        p: u32,
        position: u64,
        max_bytes: usize,
        deadline: tokio::time::Instant,
    ) -> Result<bool, BrokerError> {
        let request = FetchRequest {
            topic: self.start.topic.clone(),
            partition: p,
            offset: position,
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            max_wait_ms: 0,
            min_bytes: 0,
            max_records: u32::try_from(self.credit_records).unwrap_or(u32::MAX),
        };
        let answer = tokio::time::timeout_at(
            deadline,
            service.fetch_inner(request, 0, Some(deadline.into_std())),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::Unavailable {
                reason: "no broker holding the partition answered in time".into(),
                leader: None,
            })
        });
        let response = match answer {
            Ok(response) => response,
            // No replica can be read right now (its brokers down or cut off): the stream goes
            // on with the other partitions, and reads this one again at the next round.
            Err(e) if e.code() == tonic::Code::Unavailable => return Ok(false),
            Err(e) => {
                match retained_range(&e) {
                    // Retention removed what this subscriber had not read: skip to what is left.
                    Some((start, _)) if position < start => {
                        self.positions.insert(p, start);
                        self.delivered.insert(p, start);
                        return Ok(true);
                    }
                    // Past what the replica read from has committed (a position read from one
                    // further ahead): nothing to deliver yet.
                    Some((_, end)) if position > end => return Ok(false),
                    _ => return Err(e),
                }
            }
        };
        let Some(last) = response.records.last() else {
            return Ok(false);
        };
        let next = last.offset + 1;
        let bytes: u64 = response.records.iter().map(|r| record_size(r) as u64).sum();
        self.credit_records = self
            .credit_records
            .saturating_sub(response.records.len() as u64);
        self.credit_bytes = self.credit_bytes.saturating_sub(bytes);
        self.positions.insert(p, next);
        self.delivered.insert(p, next);
        let span = self.deliver_span(p, &response.records);
        let result = self
            .send(event(Event::Delivery(Delivery {
                partition: p,
                records: response.records,
                high_watermark: response.high_watermark,
            })))
            .await;
        if let Some(cx) = span {
            crate::otel::end(&cx, &result);
        }
        result?;
        Ok(true)
    }

    /// With tracing on, the `deliver` span of records sent to this subscriber: a child of the
    /// first record's creation context, linked to every record's.
    fn deliver_span(&self, p: u32, records: &[v1::Record]) -> Option<opentelemetry::Context> {
        if !weft_proto::otel::enabled() {
            return None;
        }
        Some(delivery_span(
            "deliver",
            &self.start.topic,
            p,
            (!self.start.group_id.is_empty()).then_some(self.start.group_id.as_str()),
            records,
            self.node.node_id,
            &opentelemetry::Context::new(),
        ))
    }

    /// Long polls of the partitions held elsewhere that had nothing at their position, one per
    /// partition not polled yet (`polling`): a Fetch forwarded to a broker that holds it,
    /// waiting up to `wait`. Each resolves with its partition once it has a record there,
    /// answered empty after its wait, or failed (after `wait`, so a holder that is down is
    /// asked again only that often). They own what they need, so the session keeps them across
    /// its rounds: a round woken by a commit neither cancels them nor starts others (before,
    /// every commit of any partition sent a new one per such partition).
    fn remote_polls(&self, wait: Duration, polling: &BTreeSet<u32>) -> Vec<(u32, RemotePoll)> {
        let service = SubscriberService::new(self.node.clone());
        self.positions
            .iter()
            .filter(|(p, _)| {
                self.remote_idle.contains(p)
                    && !polling.contains(p)
                    && service.is_remote(&self.start.topic, **p)
            })
            .map(|(&p, &offset)| {
                let service = service.clone();
                let request = FetchRequest {
                    topic: self.start.topic.clone(),
                    partition: p,
                    offset,
                    max_bytes: 1,
                    max_wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
                    min_bytes: 1,
                    max_records: 1,
                };
                let assignment = self.assignments;
                let poll: RemotePoll = Box::pin(async move {
                    if service.fetch_inner(request, 0, None).await.is_err() {
                        tokio::time::sleep(wait).await;
                    }
                    (assignment, p)
                });
                (p, poll)
            })
            .collect()
    }

    async fn handle_inbound(&mut self, message: SubscribeRequest) -> Result<(), BrokerError> {
        if let Some(member) = &self.group {
            member.heartbeat().map_err(|e| match e {
                BrokerError::Unavailable { .. } => e,
                _ => BrokerError::StaleGeneration {
                    group: member.group_id.clone(),
                    current: self.generation,
                    got: self.generation,
                },
            })?;
        }
        match message.request {
            Some(Inbound::Credit(credit)) => {
                self.credit_records = self
                    .credit_records
                    .saturating_add(u64::from(credit.records));
                self.credit_bytes = self.credit_bytes.saturating_add(credit.bytes);
            }
            Some(Inbound::Heartbeat(_)) | None => {}
            Some(Inbound::Commit(commit)) => {
                let Some(member) = &self.group else {
                    return Err(BrokerError::invalid(
                        "commit",
                        "only group members commit over the stream",
                    ));
                };
                let partitions = self.node.topic(&self.start.topic)?.config.partitions;
                if let Some(o) = commit.offsets.iter().find(|o| o.partition >= partitions) {
                    return Err(BrokerError::PartitionNotFound {
                        topic: self.start.topic.clone(),
                        partition: o.partition,
                    });
                }
                if commit.generation < self.generation && !commit.offsets.is_empty() {
                    // Sent before this stream's last reassignment reached the client: refused
                    // (nothing committed), the stream goes on.
                    let ack = CommitAck {
                        generation: commit.generation,
                        offsets: Vec::new(),
                    };
                    return self.send_control(event(Event::CommitAck(ack))).await;
                }
                // Checked as a unary commit is (an offset past the high watermark would be
                // stored, and every later commit of the partition refused as going backwards).
                // An offset within what this stream delivered is within the high watermark:
                // only those past it, and those of partitions this stream was given but does
                // not read (left out of its assignment while their replicas do not answer), are
                // looked up (a replica elsewhere may be asked). A partition this stream was not
                // given is the coordinator's to refuse. (Past what it delivered, not past its
                // position: a position it started from, an offset the subscriber resumed from,
                // may lie past the high watermark. Before, a commit of such an offset was
                // stored unchecked.)
                let mut named = std::collections::BTreeSet::new();
                if let Some(o) = commit.offsets.iter().find(|o| !named.insert(o.partition)) {
                    return Err(BrokerError::invalid(
                        "offsets",
                        format!("partition {} is named twice", o.partition),
                    ));
                }
                let beyond: Vec<PartitionOffset> = commit
                    .offsets
                    .iter()
                    .filter(|o| match self.positions.get(&o.partition) {
                        Some(_) => {
                            o.offset > self.delivered.get(&o.partition).copied().unwrap_or(0)
                        }
                        None => self.unplaced.contains(&o.partition),
                    })
                    .cloned()
                    .collect();
                if !beyond.is_empty() {
                    kept_alive(
                        Some(member),
                        SubscriberService::new(self.node.clone()).check_offsets(
                            &self.start.topic,
                            partitions,
                            &beyond,
                            false,
                        ),
                    )
                    .await?;
                }
                let request = CommitOffsetsRequest {
                    topic: self.start.topic.clone(),
                    group_id: member.group_id.clone(),
                    member_id: member.member_id.clone(),
                    generation: commit.generation,
                    offsets: commit.offsets.clone(),
                    reset: false,
                };
                let committing = group_link::commit(&self.node, &request, &self.topic_id, 0);
                let committed = match kept_alive(Some(member), committing).await {
                    Ok(committed) => committed,
                    // From a generation that a rebalance has since replaced: nothing is
                    // committed and the stream goes on (its new assignment follows). An
                    // acknowledgement with no offsets says so.
                    // (Refused here, or by the coordinator on another broker.)
                    Err(e)
                        if e.replaced_generation()
                            .is_some_and(|current| commit.generation < current)
                            && !commit.offsets.is_empty() =>
                    {
                        Vec::new()
                    }
                    Err(e) => return Err(e),
                };
                let ack = CommitAck {
                    generation: commit.generation,
                    offsets: committed
                        .into_iter()
                        .map(|(partition, offset)| PartitionOffset { partition, offset })
                        .collect(),
                };
                self.send_control(event(Event::CommitAck(ack))).await?;
            }
            Some(Inbound::Start(_)) => {
                return Err(BrokerError::invalid(
                    "start",
                    "a stream is started only once",
                ));
            }
        }
        Ok(())
    }

    async fn run(mut self, mut inbound: Streaming<SubscribeRequest>) {
        let outcome = self.serve(&mut inbound).await;
        let left = matches!(outcome, Ok(Ended::ClientClosed));
        // Acknowledgements still waiting go before the end, as long as the subscriber takes
        // them within a call's timeout: one that stopped reading does not hold the session.
        let patience = Duration::from_millis(self.node.config.request_timeout_ms);
        let flushed = tokio::time::timeout(patience, async {
            while let Some(queued) = self.pending.pop_front() {
                if self.tx.send(queued).await.is_err() {
                    break;
                }
            }
        })
        .await;
        if flushed.is_err() {
            tracing::debug!(
                topic = %self.start.topic,
                group = %self.start.group_id,
                left = self.pending.len(),
                "a subscriber read none of its last answers in time; the stream ends without them"
            );
        }
        if let Err(error) = outcome {
            tracing::debug!(topic = %self.start.topic, group = %self.start.group_id, "a stream ends: {error}");
            // In the place kept for it: the session does not wait for a subscriber that
            // stopped reading.
            if let Some(permit) = self.last_word.take() {
                permit.send(Err(Status::from(error)));
            }
        }
        if let Some(member) = &self.group {
            tracing::debug!(group = %member.group_id, member = %member.member_id, left, "a member's stream ended");
            // A clean close (the client ended its side): leave now, so the others rebalance at
            // once. A broken or rotated stream keeps the member until its session expires.
            member.end(left);
        }
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<SubscribeRequest>,
    ) -> Result<Ended, BrokerError> {
        let config = self.node.config.clone();
        let age_limit = tokio::time::sleep(Duration::from_millis(config.stream_age_ms_max));
        tokio::pin!(age_limit);
        let closing = self.node.closing();
        tokio::pin!(closing);
        let mut heartbeat =
            tokio::time::interval(Duration::from_millis(config.stream_heartbeat_ms));
        heartbeat.tick().await;
        // The stored access rules live in the controller's state: when it changes, the caller
        // is checked again, so a rule taken away (or a deny rule added) ends the stream, as it
        // would refuse the caller's next Fetch.
        let mut rules = self.node.acl_enabled().then(|| {
            let mut rules = self.node.controller_watch();
            let acls = rules.borrow_and_update().acls.clone();
            (rules, acls)
        });
        authorize_subscribe(&self.node, &self.identity, &self.start)?;
        let mut view = self.view.take();
        let (member, incarnation) = self
            .group
            .as_ref()
            .map(|m| (m.member_id.clone(), m.incarnation))
            .unwrap_or_default();
        // The first assignment.
        match &mut view {
            Some(view) => {
                let current = view.borrow_and_update().clone();
                let mine = current
                    .assignments
                    .get(&member)
                    .cloned()
                    .unwrap_or_default();
                self.assign(mine, Some(&current)).await?;
            }
            None => {
                let topic = self.node.topic(&self.start.topic)?;
                let all: Vec<u32> = if self.start.partitions.is_empty() {
                    (0..topic.config.partitions).collect()
                } else {
                    self.start.partitions.clone()
                };
                self.assign(all, None).await?;
            }
        }
        // Waits for room in the stream's queue (a sender of its own: `self` is borrowed by the
        // other arms).
        let room = self.tx.clone();
        // The long polls of the idle partitions held elsewhere, and which partitions they are
        // for (of the current assignment).
        let mut remote_polls: futures::stream::FuturesUnordered<RemotePoll> =
            futures::stream::FuturesUnordered::new();
        let mut polling: BTreeSet<u32> = BTreeSet::new();
        let mut polled_for = self.assignments;
        loop {
            // A rule change seen while waiting on something else counts before delivering.
            if let Some((watch, acls)) = &mut rules
                && watch.has_changed().unwrap_or(false)
                && rules_changed(watch, acls)
            {
                authorize_subscribe(&self.node, &self.identity, &self.start)?;
            }
            // Watch the high watermarks before delivering and mark them seen: a batch committed
            // while we deliver wakes the wait below, instead of waiting for a heartbeat.
            let mut watermarks: Vec<watch::Receiver<u64>> = self
                .positions
                .keys()
                .filter_map(|&p| self.node.partition(&self.start.topic, p).ok())
                .map(|p| {
                    let mut w = p.watch_high_watermark();
                    w.borrow_and_update();
                    w
                })
                .collect();
            let delivered = self.deliver().await?;
            let has_credit = self.credit_records > 0 && self.credit_bytes > 0;
            // A full queue, or control messages waiting: send them and deliver again once it
            // has room, reading the subscriber meanwhile.
            let full = self.tx.capacity() == 0 || !self.pending.is_empty();
            // So many answers wait that the subscriber's next messages (or a new assignment)
            // wait too: they would add more.
            let backlog = self.pending.len() >= PENDING_CONTROL_MAX;
            let remote_wait = Duration::from_millis(config.stream_heartbeat_ms);
            if polled_for != self.assignments {
                // Polls of the positions of an earlier assignment.
                remote_polls = futures::stream::FuturesUnordered::new();
                polling.clear();
                polled_for = self.assignments;
            }
            for (p, poll) in self.remote_polls(remote_wait, &polling) {
                polling.insert(p);
                remote_polls.push(poll);
            }
            let data = async {
                if watermarks.is_empty() {
                    return futures::future::pending::<()>().await;
                }
                let changes = watermarks.iter_mut().map(|w| Box::pin(w.changed()));
                let _ = futures::future::select_all(changes).await;
            };
            let polled = !remote_polls.is_empty();
            let group_change = async {
                match &mut view {
                    Some(view) => match view.changed().await {
                        Ok(()) => Some(view.borrow_and_update().clone()),
                        Err(_) => None,
                    },
                    None => futures::future::pending().await,
                }
            };
            // Wakes only when the stored rules changed, not on every change of the controller's
            // state (every committed offset is one), so streams do not deliver again for those.
            let rules_change = async {
                let Some((watch, acls)) = &mut rules else {
                    return futures::future::pending::<()>().await;
                };
                loop {
                    if watch.changed().await.is_err() {
                        // The controller stopped: the broker is stopping.
                        return futures::future::pending::<()>().await;
                    }
                    if rules_changed(watch, acls) {
                        return;
                    }
                }
            };
            tokio::select! {
                biased;
                message = inbound.message(), if !backlog => match message {
                    Ok(Some(message)) => self.handle_inbound(message).await?,
                    Ok(None) => return Ok(Ended::ClientClosed),
                    Err(_) => return Ok(Ended::Broken),
                },
                () = rules_change => authorize_subscribe(&self.node, &self.identity, &self.start)?,
                current = group_change, if !backlog => {
                    let Some(current) = current else {
                        // The group's coordinator forgot it (another broker coordinates now,
                        // every member expired, or its topic was deleted: then NOT_FOUND).
                        self.check_topic()?;
                        return Err(BrokerError::Unavailable {
                            reason: "the consumer group's membership ended (its coordinator changed); rejoin with your member id".into(),
                            leader: None,
                        });
                    };
                    // `WEFT_TEST_GROUP_CHANGE_DELAY_MS`: a test hook that makes the session take
                    // a changed view that much later (a session busy when its group rebalanced
                    // twice sees only the second view).
                    let current = match (crate::test_hook_ms("WEFT_TEST_GROUP_CHANGE_DELAY_MS"), &mut view) {
                        (Some(delay), Some(view)) => {
                            tokio::time::sleep(delay).await;
                            view.borrow_and_update().clone()
                        }
                        _ => current,
                    };
                    let current = Some(current);
                    if let Some(current) = &current
                        && current.incarnations.get(&member) != Some(&incarnation)
                    {
                        // Another stream took this member id (or the member expired).
                        return Err(BrokerError::StaleGeneration {
                            group: self.start.group_id.clone(),
                            current: current.generation,
                            got: self.generation,
                        });
                    }
                    if let Some(current) = current
                        && current.generation != self.generation
                    {
                        let mine = current.assignments.get(&member).cloned().unwrap_or_default();
                        tracing::debug!(member = %member, generation = current.generation, "reassigned");
                        self.assign(mine, Some(&current)).await?;
                    }
                }
                () = &mut closing => return Err(self.node.closing_error()),
                () = &mut age_limit => {
                    return Err(BrokerError::Unavailable {
                        reason: format!("stream reached its maximum age of {} ms; resume from your last offsets", config.stream_age_ms_max),
                        leader: None,
                    });
                }
                () = data, if has_credit && !delivered && !full => {}
                // Whatever else goes on (a local partition delivering round after round, no
                // credit): a partition held elsewhere whose poll answered is read again at the
                // next round, which starts after the last partition delivered from.
                answered = futures::StreamExt::next(&mut remote_polls), if polled => {
                    if let Some((assignment, p)) = answered
                        && assignment == self.assignments
                    {
                        polling.remove(&p);
                        self.remote_idle.remove(&p);
                    }
                }
                () = futures::future::ready(()), if delivered && !full => {}
                permit = room.reserve(), if full => {
                    let permit = permit.map_err(|_| subscriber_gone())?;
                    if let Some(message) = self.pending.pop_front() {
                        permit.send(message);
                    }
                }
                _ = heartbeat.tick(), if !full => {
                    tracing::debug!(
                        topic = %self.start.topic,
                        group = %self.start.group_id,
                        credit_records = self.credit_records,
                        credit_bytes = self.credit_bytes,
                        positions = ?self.positions,
                        "subscription heartbeat"
                    );
                    self.send(event(Event::Heartbeat(Heartbeat { time_ms: now_ms() }))).await?;
                    if !self.unplaced.is_empty() {
                        self.place_unplaced().await?;
                    }
                }
            }
        }
    }
}

/// A session's long poll of a partition held elsewhere (see `Session::remote_polls`): resolves
/// with the assignment it was made for and the partition.
type RemotePoll = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, u32)> + Send>>;

/// The log start an OFFSET_OUT_OF_RANGE answer names (a local error or a forwarded status).
pub(crate) fn retained_range(error: &BrokerError) -> Option<(u64, u64)> {
    match error {
        BrokerError::OffsetOutOfRange { start, end, .. } => Some((*start, *end)),
        BrokerError::Remote(status) => {
            let details = tonic_types::StatusExt::get_error_details(&*status.0);
            let metadata = &details.error_info()?.metadata;
            let offset = |key: &str| metadata.get(key)?.parse().ok();
            Some((offset("log_start_offset")?, offset("log_end_offset")?))
        }
        _ => None,
    }
}

/// The start position a client means by "earliest".
pub fn earliest() -> StartPosition {
    StartPosition {
        position: Some(Position::Earliest(
            weft_proto::v1::start_position::Earliest {},
        )),
    }
}

/// The span of records handed to a consumer (`deliver` on a Subscribe stream, `fetch` for a
/// Fetch): a child of the caller's span when it has one, else of the first record's creation
/// context; linked to the records' contexts.
fn delivery_span(
    operation: &'static str,
    topic: &str,
    partition: u32,
    group: Option<&str>,
    records: &[v1::Record],
    node_id: u64,
    caller: &opentelemetry::Context,
) -> opentelemetry::Context {
    use opentelemetry::KeyValue;
    let mut attributes = weft_proto::otel::messaging("receive", operation, topic, Some(partition));
    attributes.push(KeyValue::new(
        weft_proto::otel::BATCH_COUNT,
        records.len() as i64,
    ));
    if let Some(first) = records.first() {
        attributes.push(KeyValue::new(weft_proto::otel::OFFSET, first.offset as i64));
    }
    if let Some(group) = group {
        attributes.push(KeyValue::new(
            weft_proto::otel::CONSUMER_GROUP,
            group.to_string(),
        ));
    }
    attributes.push(crate::otel::node(node_id));
    crate::otel::start(
        format!("{operation} {topic}"),
        opentelemetry::trace::SpanKind::Server,
        caller,
        crate::otel::record_contexts(records),
        attributes,
    )
}

#[cfg(test)]
mod tests {
    use weft_proto::v1::start_position::{Earliest, Latest};

    use super::*;

    /// A replica 100 offsets behind the leader, with records 10..900.
    const LAGGING: Bounds = Bounds {
        log_start: 10,
        high_watermark: 900,
        at_timestamp: None,
    };

    /// A committed (or resumed) position past the serving replica's high watermark is kept: the
    /// stream waits there for the replica. Before, it was lowered to that high watermark, the
    /// member re-read what its group had committed, and its next commit was refused as going
    /// backwards (found by helper-63's review).
    #[test]
    fn a_committed_position_past_a_lagging_replica_is_kept() {
        assert_eq!(start_position(None, true, Some(1000), None, LAGGING), 1000);
        assert_eq!(
            start_position(Some(950), true, Some(1000), None, LAGGING),
            950
        );
        assert_eq!(
            start_position(Some(950), false, None, None, LAGGING),
            900,
            "outside a group, a resumed position stays within the replica's range"
        );
    }

    /// Positions retention passed start at the log's start; asked positions stay in the range.
    #[test]
    fn positions_start_within_what_the_replica_holds() {
        assert_eq!(start_position(None, true, Some(3), None, LAGGING), 10);
        assert_eq!(start_position(Some(3), true, None, None, LAGGING), 10);
        let earliest = Position::Earliest(Earliest {});
        assert_eq!(
            start_position(None, true, None, Some(&earliest), LAGGING),
            10
        );
        let latest = Position::Latest(Latest {});
        assert_eq!(
            start_position(None, true, None, Some(&latest), LAGGING),
            900
        );
        assert_eq!(start_position(None, true, None, None, LAGGING), 900);
        assert_eq!(
            start_position(None, true, None, Some(&Position::Offset(5000)), LAGGING),
            900
        );
        assert_eq!(
            start_position(None, true, None, Some(&Position::Offset(2)), LAGGING),
            10
        );
        let at = Bounds {
            at_timestamp: Some(42),
            ..LAGGING
        };
        assert_eq!(
            start_position(None, true, None, Some(&Position::TimestampMs(7)), at),
            42
        );
        assert_eq!(
            start_position(None, true, None, Some(&Position::TimestampMs(7)), LAGGING),
            900
        );
    }
}
