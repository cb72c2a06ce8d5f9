//! `weft.v1.Publisher`: Publish (unary) and PublishStream (pipelined; answered in request order,
//! or as stored when the caller asks with `weft-answer-order: any`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use weft_proto::internal::v1::ForwardPublishRequest;
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::publisher_server::Publisher;
use weft_proto::v1::{PublishRequest, PublishResponse};
use weft_storage::{BatchBuilder, ProducerInfo};

use super::{check_headers, deadline, now_ms, partition_for_key};
use crate::acl::{Operation, Resource};
use crate::error::BrokerError;
use crate::node::{Node, Route};
use crate::partition::seal_for_proposal;

/// Most PublishStream requests being processed at once per stream.
const STREAM_IN_FLIGHT_MAX: usize = 64;
/// Longest record header name.
const HEADER_NAME_BYTES_MAX: usize = 256;

/// How far ahead of the broker's clock a record's time may be (Kafka's
/// `log.message.timestamp.after.max.ms` default): record times move the partition's clock,
/// against which idle producers expire, and a producer whose clock is years ahead would make
/// every other producer look idle (their retries then taken as new data).
pub(crate) const RECORD_TIME_AHEAD_MAX_MS: i64 = 3_600_000;

/// The Publisher service.
#[derive(Debug, Clone)]
pub struct PublisherService {
    node: Arc<Node>,
    round_robin: Arc<AtomicU32>,
    forwarders: Arc<super::forward_stream::Forwarders>,
}

impl PublisherService {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        PublisherService {
            node,
            round_robin: Arc::new(AtomicU32::new(0)),
            forwarders: Arc::default(),
        }
    }

    /// Validates, routes and appends one publish request: here when this broker leads the
    /// partition, else forwarded to the leader (`hops` counts forwards: a forwarded request is
    /// never forwarded again).
    pub async fn handle(
        &self,
        request: PublishRequest,
        timeout: Duration,
        hops: u32,
        passed_on: &PassedOn,
    ) -> Result<PublishResponse, BrokerError> {
        // A request's own trace context wins over its call's (a stream's headers are shared by
        // all its requests). A forwarded request's context is in what its broker passed on.
        check_trace_context(&request.trace_context)?;
        let own;
        let passed_on = if hops == 0 && request.trace_context.contains_key("traceparent") {
            own = passed_on.with_trace_pairs(&request.trace_context);
            &own
        } else {
            passed_on
        };
        if !weft_proto::otel::enabled() {
            return self
                .handle_traced(request, timeout, hops, passed_on, None)
                .await;
        }
        // `receive`: a child of the caller's span (the client's publish, or the span of the
        // broker that forwarded it), linked to the records' creation contexts.
        let mut attributes =
            weft_proto::otel::messaging("receive", "publish", &request.topic, None);
        attributes.push(opentelemetry::KeyValue::new(
            weft_proto::otel::BATCH_COUNT,
            request.records.len() as i64,
        ));
        attributes.push(crate::otel::node(self.node.node_id));
        attributes.push(opentelemetry::KeyValue::new("weft.forwarded", hops > 0));
        let cx = crate::otel::start(
            format!("receive {}", request.topic),
            opentelemetry::trace::SpanKind::Server,
            &passed_on.trace_context(),
            crate::otel::record_contexts(&request.records),
            attributes,
        );
        let result = self
            .handle_traced(request, timeout, hops, passed_on, Some(&cx))
            .await;
        if let Ok(response) = &result {
            crate::otel::set(
                &cx,
                opentelemetry::KeyValue::new(weft_proto::otel::OFFSET, response.base_offset as i64),
            );
        }
        crate::otel::end(&cx, &result);
        result
    }

    async fn handle_traced(
        &self,
        request: PublishRequest,
        timeout: Duration,
        hops: u32,
        passed_on: &PassedOn,
        span: Option<&opentelemetry::Context>,
    ) -> Result<PublishResponse, BrokerError> {
        let node = &self.node;
        if request.topic.is_empty() {
            return Err(BrokerError::invalid("topic", "is empty"));
        }
        if request.records.is_empty() {
            return Err(BrokerError::invalid(
                "records",
                "a publish needs at least one record",
            ));
        }
        let records_max = node.config.batch_records_max as usize;
        if request.records.len() > records_max {
            return Err(BrokerError::TooManyRecords {
                count: request.records.len() as u64,
                max: records_max as u64,
            });
        }
        for (i, record) in request.records.iter().enumerate() {
            if let Some(h) = record
                .headers
                .iter()
                .find(|h| h.key.is_empty() || h.key.len() > HEADER_NAME_BYTES_MAX)
            {
                return Err(BrokerError::invalid(
                    &format!("records[{i}].headers"),
                    format!(
                        "header name {:?} must be 1 to {HEADER_NAME_BYTES_MAX} bytes",
                        h.key
                    ),
                ));
            }
            if record.timestamp_ms < 0 {
                return Err(BrokerError::invalid(
                    &format!("records[{i}].timestamp_ms"),
                    "must not be negative",
                ));
            }
            if record.timestamp_ms > super::now_ms().saturating_add(RECORD_TIME_AHEAD_MAX_MS) {
                return Err(BrokerError::invalid(
                    &format!("records[{i}].timestamp_ms"),
                    format!(
                        "{} is more than {} ms ahead of the broker's clock (is the producer's clock right?)",
                        record.timestamp_ms, RECORD_TIME_AHEAD_MAX_MS
                    ),
                ));
            }
        }
        if request.producer_id != 0
            && request
                .base_sequence
                .checked_add(request.records.len() as u64)
                .is_none()
        {
            return Err(BrokerError::invalid(
                "base_sequence",
                "the batch's sequences would pass the end of the range: start a new epoch",
            ));
        }
        let topic = node.topic(&request.topic)?;
        let partitions = topic.config.partitions;
        let partition = match &request.target {
            Some(Target::Partition(p)) => {
                if *p >= partitions {
                    return Err(BrokerError::PartitionNotFound {
                        topic: request.topic.clone(),
                        partition: *p,
                    });
                }
                *p
            }
            Some(Target::PartitionKey(key)) if key.is_empty() => {
                return Err(BrokerError::invalid(
                    "target",
                    "partition_key is empty: give a key, or name the partition",
                ));
            }
            Some(Target::PartitionKey(key)) => partition_for_key(key, partitions),
            None if request.producer_id != 0 => {
                return Err(BrokerError::invalid(
                    "target",
                    "an idempotent publish (producer_id set) needs a partition or a partition_key",
                ));
            }
            None => self.round_robin.fetch_add(1, Ordering::Relaxed) % partitions,
        };
        if let Some(cx) = span {
            crate::otel::set(
                cx,
                opentelemetry::KeyValue::new(weft_proto::otel::PARTITION, partition.to_string()),
            );
        }
        let hosted = match node.publish_route(&topic, partition)? {
            Route::Local(hosted) => hosted,
            Route::Forward { leader, .. } if hops > 0 => {
                // The leader is named only when this broker's own replica knows it (one holding
                // none only guesses).
                let hosted_here = topic
                    .partitions
                    .get(partition as usize)
                    .is_some_and(|p| p.replicas.contains(&node.node_id));
                return Err(BrokerError::Unavailable {
                    reason: "this broker does not lead the partition".into(),
                    leader: hosted_here.then_some(leader),
                });
            }
            Route::Forward {
                leader,
                peer_address,
            } => {
                // A publish that cannot travel to the leader in one peer message (this broker
                // takes larger gRPC messages) is larger than any topic allows: refused here, as
                // the leader would (put on the stream, it would break it for every publish on it).
                let size = prost::Message::encoded_len(&request);
                if size > FORWARDED_PUBLISH_BYTES_MAX {
                    return Err(BrokerError::BatchTooLarge {
                        size: size as u64,
                        max: u64::from(topic.config.max_message_bytes),
                    });
                }
                // The leader's spans are children of this broker's.
                let passed_on = match span {
                    Some(cx) => std::borrow::Cow::Owned(passed_on.with_trace_context(cx)),
                    None => std::borrow::Cow::Borrowed(passed_on),
                };
                let forwarded = self
                    .forward(
                        request,
                        partition,
                        leader,
                        &peer_address,
                        timeout,
                        &passed_on,
                    )
                    .await;
                let hosted_here = topic
                    .partitions
                    .get(partition as usize)
                    .is_some_and(|p| p.replicas.contains(&node.node_id));
                if !hosted_here {
                    // No replica here: a publish stored shows who leads; a refusal may name
                    // the leader; no answer passes the broker over for a while.
                    node.route_hints
                        .learn_write(&topic.topic_id, partition, leader, &forwarded);
                    return forwarded;
                }
                // A replica here: a connection to the leader that failed names no leader, but
                // this replica's own group knows one (a client is pointed there, rather than
                // taking this broker for a broken one).
                return match forwarded {
                    Err(BrokerError::Unavailable {
                        reason,
                        leader: None,
                    }) => Err(BrokerError::Unavailable {
                        reason,
                        leader: node
                            .partition(&topic.name, partition)
                            .ok()
                            .and_then(|p| p.group().leader())
                            .filter(|l| *l != node.node_id),
                    }),
                    other => other,
                };
            }
        };
        let now = now_ms();
        let payload: usize = request.records.iter().map(super::record_size).sum();
        let mut builder = BatchBuilder::with_capacity(payload + request.records.len() * 40);
        for record in &request.records {
            let timestamp = if record.timestamp_ms == 0 {
                now
            } else {
                record.timestamp_ms
            };
            builder.push(
                timestamp,
                &record.key,
                &record.value,
                record
                    .headers
                    .iter()
                    .map(|h| (h.key.as_bytes(), h.value.as_ref())),
            );
        }
        let batch = seal_for_proposal(
            builder,
            ProducerInfo {
                producer_id: request.producer_id,
                producer_epoch: request.producer_epoch,
                base_sequence: request.base_sequence,
            },
        );
        let published = match span {
            None => hosted.publish(batch, timeout).await?,
            Some(cx) => {
                // `replicate`: from the batch's turn in the partition's sequencer until its
                // Raft entry is committed on a majority and applied.
                let replicate = crate::otel::child(
                    format!("replicate {}", request.topic),
                    cx,
                    vec![
                        opentelemetry::KeyValue::new(weft_proto::otel::SYSTEM, "weft"),
                        opentelemetry::KeyValue::new(
                            weft_proto::otel::DESTINATION,
                            request.topic.clone(),
                        ),
                        opentelemetry::KeyValue::new(
                            weft_proto::otel::PARTITION,
                            partition.to_string(),
                        ),
                        crate::otel::node(node.node_id),
                        opentelemetry::KeyValue::new(
                            "weft.replicas",
                            topic
                                .partitions
                                .get(partition as usize)
                                .map_or(1, |p| p.replicas.len() as i64),
                        ),
                    ],
                );
                let result = hosted.publish(batch, timeout).await;
                crate::otel::end(&replicate, &result);
                result?
            }
        };
        crate::metrics::published(
            &request.topic,
            u64::from(published.record_count),
            payload as u64,
        );
        Ok(PublishResponse {
            topic: request.topic,
            partition,
            base_offset: published.base_offset,
            record_count: published.record_count,
            duplicate: published.duplicate,
            request_id: request.request_id,
            append_time_ms: now,
        })
    }
}

impl PublisherService {
    /// Hands a publish to the partition's leader over the peer port, after every publish this
    /// broker forwarded to that partition before (one ordered stream per partition and leader),
    /// with the caller's deadline, trace context and request id; passes its answer on as it
    /// came.
    async fn forward(
        &self,
        mut request: PublishRequest,
        partition: u32,
        leader: u64,
        peer_address: &str,
        timeout: Duration,
        passed_on: &PassedOn,
    ) -> Result<PublishResponse, BrokerError> {
        request.target = Some(Target::Partition(partition));
        // Its trace context travels in `passed_on` (this broker's span, or the request's own).
        request.trace_context.clear();
        // Given up a little before the caller does, so that the caller hears why, and this
        // broker learns from a leader that answered nothing (it learns nothing from a call its
        // caller dropped first: the caller's timer starts before this broker's).
        let timeout = answer_before(timeout);
        let forwarded = ForwardPublishRequest {
            request: Some(request),
            partition,
            hops: 1,
            from_node_id: self.node.node_id,
            // The leader gives up sooner again, so that its answer (stored, or not in time)
            // arrives within this broker's wait: a leader that answered nothing by then is
            // taken for one that stopped answering (see `Forwarders::publish`).
            timeout_ms: forwarded_timeout_ms(answer_before(timeout)),
            passed_on: passed_on.to_map(),
        };
        self.forwarders
            .publish(&self.node, leader, peer_address, forwarded, timeout)
            .await
    }
}

/// How much sooner than its caller a broker gives up a publish it forwarded (at most a tenth of
/// the caller's time), and the leader sooner again.
const FORWARD_ANSWER_MARGIN: Duration = Duration::from_millis(200);

/// `time` less what its answer needs to reach whoever waits `time` ([`FORWARD_ANSWER_MARGIN`]).
fn answer_before(time: Duration) -> Duration {
    time.saturating_sub((time / 10).min(FORWARD_ANSWER_MARGIN))
}

/// The `timeout_ms` a forwarded publish carries for the time its caller has left: whole
/// milliseconds, rounded up, never 0 (which tells the leader no timeout was given, so it would
/// wait up to `request_timeout_ms` for a caller that gave up within a millisecond).
fn forwarded_timeout_ms(left: Duration) -> u32 {
    u32::try_from(left.as_micros().div_ceil(1000))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Largest publish forwarded to a partition's leader: what a peer message carries, less room
/// for the rest of the forwarded request. Larger than any batch a topic may allow.
const FORWARDED_PUBLISH_BYTES_MAX: usize = crate::raft::PEER_MESSAGE_BYTES_MAX - 64 * 1024;

/// Longest `trace_context` value taken (W3C's limit for `tracestate`; a `traceparent` is 55).
const TRACE_CONTEXT_VALUE_BYTES_MAX: usize = 512;

/// Whether a `trace_context` value is printable ASCII of at most
/// [`TRACE_CONTEXT_VALUE_BYTES_MAX`] bytes.
fn usable_trace_value(value: &str) -> bool {
    value.len() <= TRACE_CONTEXT_VALUE_BYTES_MAX && value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A request's `trace_context`: `traceparent` and `tracestate` only; a `traceparent` must be
/// usable ([`usable_trace_value`]). An unusable `tracestate` is not an error: W3C lets any hop
/// drop it, and it is dropped ([`PassedOn::with_trace_pairs`]).
fn check_trace_context(
    pairs: &std::collections::HashMap<String, String>,
) -> Result<(), BrokerError> {
    for (key, value) in pairs {
        if key != "traceparent" && key != "tracestate" {
            return Err(BrokerError::invalid(
                "trace_context",
                format!("takes `traceparent` and `tracestate`, not {key:?}"),
            ));
        }
        if key == "traceparent" && !usable_trace_value(value) {
            return Err(BrokerError::invalid(
                &format!("trace_context.{key}"),
                format!(
                    "must be printable ASCII of at most {TRACE_CONTEXT_VALUE_BYTES_MAX} bytes \
                     ({} bytes given)",
                    value.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Request metadata a forwarded call carries on: W3C trace context and the request id.
#[derive(Debug, Clone, Default)]
pub struct PassedOn(
    Vec<(
        &'static str,
        tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    )>,
);

impl PassedOn {
    const KEYS: [&'static str; 5] = [
        "traceparent",
        "tracestate",
        "x-request-id",
        weft_proto::CALLER_PRINCIPAL_HEADER,
        weft_proto::CALLER_SOURCE_HEADER,
    ];
    /// The trace keys, copied from the caller's metadata (the identity keys never are: they
    /// come from the identity the broker established).
    const TRACE_KEYS: usize = 3;

    /// Picks what to pass on from a call: its trace context and its caller's identity.
    pub fn from_request<T>(request: &tonic::Request<T>) -> PassedOn {
        let metadata = request.metadata();
        let mut pairs: Vec<_> = Self::KEYS[..Self::TRACE_KEYS]
            .iter()
            .filter_map(|key| metadata.get(*key).map(|v| (*key, v.clone())))
            .collect();
        let identity = crate::auth::identity_of(request);
        if !identity.broker {
            for (key, value) in identity.forwarded_pairs() {
                if let Ok(value) = value.parse() {
                    pairs.push((key, value));
                }
            }
        }
        PassedOn(pairs)
    }

    /// The caller's trace context (its `traceparent` / `tracestate`).
    pub fn trace_context(&self) -> opentelemetry::Context {
        weft_proto::otel::extract(self.0.iter().map(|(k, v)| (*k, v.as_bytes())))
    }

    /// The same, with `cx` as the trace context passed on (the span of the broker passing it).
    pub fn with_trace_context(&self, cx: &opentelemetry::Context) -> PassedOn {
        let trace = weft_proto::otel::inject(cx);
        if trace.is_empty() {
            return self.clone();
        }
        let mut pairs: Vec<_> = self
            .0
            .iter()
            .filter(|(k, _)| *k != "traceparent" && *k != "tracestate")
            .cloned()
            .collect();
        for (key, value) in trace {
            if let Ok(value) = value.parse() {
                pairs.push((key, value));
            }
        }
        PassedOn(pairs)
    }

    /// The same, with the trace context of a request's own `trace_context` field (checked by
    /// [`check_trace_context`]).
    pub fn with_trace_pairs(&self, pairs: &std::collections::HashMap<String, String>) -> PassedOn {
        let mut out: Vec<_> = self
            .0
            .iter()
            .filter(|(k, _)| *k != "traceparent" && *k != "tracestate")
            .cloned()
            .collect();
        for key in ["traceparent", "tracestate"] {
            if let Some(value) = pairs
                .get(key)
                .filter(|v| usable_trace_value(v))
                .and_then(|v| v.parse().ok())
            {
                out.push((key, value));
            }
        }
        PassedOn(out)
    }

    /// The identity of the caller this is passed on for, if it carries one.
    pub fn identity(&self) -> Option<crate::auth::Identity> {
        let get = |key: &str| {
            self.0
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.to_str().ok())
        };
        crate::auth::Identity::from_forwarded(
            get(weft_proto::CALLER_PRINCIPAL_HEADER)?,
            get(weft_proto::CALLER_SOURCE_HEADER),
        )
    }

    /// As a map, for calls that carry it in their message (one per request on a stream).
    pub fn to_map(&self) -> std::collections::HashMap<String, String> {
        self.0
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect()
    }

    /// From a map a forwarded message carried (unknown keys and bad values are dropped).
    pub fn from_map(map: &std::collections::HashMap<String, String>) -> PassedOn {
        PassedOn(
            Self::KEYS
                .iter()
                .filter_map(|key| Some((*key, map.get(*key)?.parse().ok()?)))
                .collect(),
        )
    }
}

/// The status that ends a publish stream whose next request could not be read: one larger than
/// `grpc_message_bytes_max` (tonic's OUT_OF_RANGE) is refused as RESOURCE_EXHAUSTED with reason
/// BATCH_TOO_LARGE, as a unary publish that large is. Either way the trailer
/// `weft-request-after` names the last request read whole (`after`, 0 for none): the
/// unreadable one is the request sent after it, and it was surely not stored.
fn unreadable_request(status: Status, after: u64, grpc_max: u64) -> Status {
    let too_large = status.code() == tonic::Code::OutOfRange
        && status
            .message()
            .starts_with("Error, decoded message length too large");
    let mut status = if too_large {
        // "... found {size} bytes, the limit is: {max} bytes"
        let size = status
            .message()
            .split("found ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Status::from(BrokerError::BatchTooLarge {
            size,
            max: grpc_max,
        })
    } else {
        status
    };
    status
        .metadata_mut()
        .insert(weft_proto::REQUEST_AFTER_TRAILER, after.into());
    status
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<PublishResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Publisher for PublisherService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let started = Instant::now();
        let timeout = deadline(request.metadata(), &self.node);
        let result = async {
            let partition = match &request.get_ref().target {
                Some(Target::Partition(p)) => Some(*p),
                _ => None,
            };
            check_headers(request.metadata(), &request.get_ref().topic, partition)?;
            super::authorize(
                &self.node,
                &request,
                Operation::Publish,
                Resource::Topic(&request.get_ref().topic),
            )?;
            let passed_on = PassedOn::from_request(&request);
            self.handle(request.into_inner(), timeout, 0, &passed_on)
                .await
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        crate::metrics::rpc("Publish", started, &result);
        result
    }

    type PublishStreamStream = ResponseStream;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let started = Instant::now();
        let timeout = deadline(request.metadata(), &self.node);
        let header_topic = request
            .metadata()
            .get(weft_proto::TOPIC_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let any_order = request
            .metadata()
            .get(weft_proto::ANSWER_ORDER_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"any"));
        let service = self.clone();
        let passed_on = PassedOn::from_request(&request);
        let identity = crate::auth::identity_of(&request);
        // When the broker begins to shut down, the stream takes no more requests; those taken
        // are answered, then it ends with UNAVAILABLE (the client carries on elsewhere).
        let cut = Arc::new(AtomicBool::new(false));
        let closing = {
            let (cut, closing) = (cut.clone(), self.node.closing());
            async move {
                closing.await;
                cut.store(true, Ordering::SeqCst);
            }
        };
        let inbound = request.into_inner().take_until(closing);
        let node = self.node.clone();
        // Requests are handed to their partitions in arrival order (each future enqueues its
        // batch on first poll, and both `buffered` and `buffer_unordered` first poll them in
        // order); answers come back in request order, or as each is stored with `any_order`.
        // The first failure ends the stream with its status, naming its request in a trailer.
        // The id of the last request read whole: a request too large to read has no id to
        // name, so its failure names the one before it (`weft-request-after`).
        let mut read_whole = 0u64;
        let grpc_max = u64::from(self.node.config.grpc_message_bytes_max);
        let requests = inbound.map(move |item| {
            let service = service.clone();
            let header_topic = header_topic.clone();
            let passed_on = passed_on.clone();
            let identity = identity.clone();
            let after = read_whole;
            if let Ok(request) = &item {
                read_whole = request.request_id;
            }
            async move {
                let request = item.map_err(|status| unreadable_request(status, after, grpc_max))?;
                let request_id = request.request_id;
                let named = move |mut status: Status| {
                    status
                        .metadata_mut()
                        .insert(weft_proto::REQUEST_ID_TRAILER, request_id.into());
                    status
                };
                // Each request names its topic: each is checked, header or not.
                service
                    .node
                    .authorize(
                        &identity,
                        Operation::Publish,
                        Resource::Topic(&request.topic),
                    )
                    .map_err(|e| named(Status::from(e)))?;
                if let Some(topic) = &header_topic
                    && topic != &request.topic
                {
                    return Err(named(Status::from(BrokerError::invalid(
                        "metadata.weft-topic",
                        format!(
                            "header names topic {topic:?} but a request is for {:?}",
                            request.topic
                        ),
                    ))));
                }
                service
                    .handle(request, timeout, 0, &passed_on)
                    .await
                    .map_err(|e| named(Status::from(e)))
            }
        });
        let answers: ResponseStream = if any_order {
            Box::pin(requests.buffer_unordered(STREAM_IN_FLIGHT_MAX))
        } else {
            Box::pin(requests.buffered(STREAM_IN_FLIGHT_MAX))
        };
        let ended = futures::stream::once(async move {
            cut.load(Ordering::SeqCst)
                .then(|| Err(Status::from(node.closing_error())))
        })
        .filter_map(futures::future::ready);
        let responses = answers.chain(ended).scan(false, |failed, item| {
            // Stop after the first error so later requests are not reported as applied.
            if *failed {
                return futures::future::ready(None);
            }
            *failed = item.is_err();
            futures::future::ready(Some(item))
        });
        let result: Result<(), Status> = Ok(());
        crate::metrics::rpc("PublishStream", started, &result);
        Ok(Response::new(Box::pin(responses)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A caller with less than a millisecond left is forwarded with 1 ms, not 0 (which the
    /// leader reads as "no timeout given" and waits `request_timeout_ms`); partial
    /// milliseconds round up, and a timeout past u32 milliseconds is capped.
    #[test]
    fn a_forwarded_publish_never_carries_a_zero_timeout() {
        assert_eq!(forwarded_timeout_ms(Duration::ZERO), 1);
        assert_eq!(forwarded_timeout_ms(Duration::from_micros(400)), 1);
        assert_eq!(forwarded_timeout_ms(Duration::from_micros(1_500)), 2);
        assert_eq!(forwarded_timeout_ms(Duration::from_millis(30_000)), 30_000);
        assert_eq!(
            forwarded_timeout_ms(Duration::from_secs(u64::MAX / 4)),
            u32::MAX
        );
    }

    fn pairs(entries: &[(&str, String)]) -> std::collections::HashMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn value(passed_on: &PassedOn, key: &str) -> Option<String> {
        passed_on
            .0
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.to_str().ok().map(str::to_string))
    }

    /// A request's trace context: other keys and a bad traceparent are refused; a tracestate
    /// too long for any header is dropped, not refused (W3C lets a hop drop it).
    #[test]
    fn a_requests_trace_context_is_checked_and_a_long_tracestate_dropped() {
        assert!(check_trace_context(&pairs(&[("baggage", "k=v".into())])).is_err());
        assert!(check_trace_context(&pairs(&[("traceparent", "0".repeat(600))])).is_err());
        assert!(check_trace_context(&pairs(&[("traceparent", "a\nb".into())])).is_err());
        let long_state = pairs(&[
            ("traceparent", PARENT.into()),
            ("tracestate", "v=1,".repeat(300)),
        ]);
        assert!(check_trace_context(&long_state).is_ok());
        let base = PassedOn(vec![
            ("traceparent", "00-aa-bb-01".parse().expect("value")),
            ("tracestate", "old=1".parse().expect("value")),
        ]);
        let applied = base.with_trace_pairs(&long_state);
        assert_eq!(value(&applied, "traceparent").as_deref(), Some(PARENT));
        assert_eq!(value(&applied, "tracestate"), None, "dropped");
        let short = pairs(&[("traceparent", PARENT.into()), ("tracestate", "v=1".into())]);
        assert_eq!(
            value(&base.with_trace_pairs(&short), "tracestate").as_deref(),
            Some("v=1")
        );
    }
}
