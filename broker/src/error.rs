//! The broker's error type, and its one mapping to gRPC status codes with `google.rpc` details.
//! Every client-visible failure is a real status: never an OK carrying an error.

use std::collections::HashMap;
use std::time::Duration;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use crate::topic::FieldViolation;

/// The `google.rpc.ErrorInfo` domain of Weft's errors.
pub const ERROR_DOMAIN: &str = "weft.dev";

/// Why a broker call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The answer of the broker a call was forwarded to (the partition's leader), passed on as
    /// it came: code, message and details.
    #[error("{}", .0.0.message())]
    Remote(RemoteStatus),
    /// No such topic.
    #[error("topic {0:?} not found")]
    TopicNotFound(String),
    /// No such partition.
    #[error("topic {topic:?} has no partition {partition}")]
    PartitionNotFound {
        /// Topic.
        topic: String,
        /// Requested partition.
        partition: u32,
    },
    /// No such consumer group.
    #[error("consumer group {0:?} not found")]
    GroupNotFound(String),
    /// A consumer group with live members cannot be deleted.
    #[error("consumer group {0:?} has live members")]
    GroupNotEmpty(String),
    /// The cluster is not in a state that allows the change (a partition is moving already, a
    /// broker still holds replicas).
    #[error("{0}")]
    Conflict(String),
    /// A topic of that name exists.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// Malformed request fields.
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// A batch over the limit.
    #[error("batch of {size} bytes exceeds the limit of {max} bytes")]
    BatchTooLarge {
        /// Encoded size.
        size: u64,
        /// Limit.
        max: u64,
    },
    /// A publish with more records than `batch_records_max`.
    #[error("publish of {count} records exceeds the limit of {max} records")]
    TooManyRecords {
        /// Records in the request.
        count: u64,
        /// Limit.
        max: u64,
    },
    /// A bounded queue is full: retry later.
    #[error("{0} is full, retry later")]
    Overloaded(String),
    /// A configured maximum on what clients create (consumer groups, members of a group) is
    /// reached: refused until some go away, not worth retrying at once.
    #[error("{what}: the most `{key}` allows is {max}")]
    LimitReached {
        /// What was refused, for people.
        what: String,
        /// The configuration key setting the maximum.
        key: &'static str,
        /// The maximum.
        max: u64,
    },
    /// A producer sequence gap.
    #[error("sequence gap for producer {producer_id}: expected {expected}, got {got}")]
    SequenceGap {
        /// Producer.
        producer_id: u64,
        /// Next sequence the partition expects.
        expected: u64,
        /// The request's base sequence.
        got: u64,
    },
    /// A retried batch that was stored long ago: older than the batches the partition remembers
    /// per producer, so its offsets are unknown. Not stored again.
    #[error(
        "batch of producer {producer_id} at sequence {got} was stored before; its offsets are no \
         longer remembered (next expected sequence {expected})"
    )]
    DuplicateSequence {
        /// Producer.
        producer_id: u64,
        /// Next sequence the partition expects.
        expected: u64,
        /// The request's base sequence.
        got: u64,
    },
    /// A batch from a producer the partition does not know (never seen, or forgotten after
    /// `producer_expiration_ms` idle) that does not start at sequence 0: start a new epoch.
    #[error(
        "producer {producer_id} is unknown to this partition (idle for too long?); start a new \
         epoch at sequence 0 (batch at sequence {got})"
    )]
    UnknownProducer {
        /// Producer.
        producer_id: u64,
        /// The request's base sequence.
        got: u64,
    },
    /// A producer epoch older than the current one.
    #[error("producer {producer_id} is fenced: epoch {got} is older than {current}")]
    ProducerFenced {
        /// Producer.
        producer_id: u64,
        /// Current epoch.
        current: u32,
        /// The request's epoch.
        got: u32,
    },
    /// A consumer-group commit or call from a stale generation or unknown member.
    #[error("stale generation for group {group:?}: current {current}, request {got}")]
    StaleGeneration {
        /// Group.
        group: String,
        /// Current generation.
        current: u64,
        /// The request's generation.
        got: u64,
    },
    /// A group commit of a partition the member does not own in its (current) generation: its
    /// view of the assignment is stale (same reason as [`BrokerError::StaleGeneration`]).
    #[error(
        "partition {partition} is not assigned to this member in generation {generation} of group {group:?}: rejoin"
    )]
    NotAssigned {
        /// Group.
        group: String,
        /// The partition.
        partition: u32,
        /// The (current) generation.
        generation: u64,
    },
    /// An offset outside the retained log.
    #[error("offset {offset} is outside [{start}, {end}]")]
    OffsetOutOfRange {
        /// Requested.
        offset: u64,
        /// Log start.
        start: u64,
        /// Log end.
        end: u64,
    },
    /// This node cannot serve the call now (no leader, shutting down). The operation may or may
    /// not have happened; retry with the same producer sequence.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
        /// The leader's node id, when known.
        leader: Option<u64>,
    },
    /// A transfer of a partition's leadership was asked for while another transfer of it runs
    /// (a drain, the leader balance and an operator may ask at once): try again once it ended.
    #[error("unavailable: a transfer of this leadership to node {to} is under way")]
    TransferUnderWay {
        /// The running transfer's target.
        to: u64,
        /// The leader (this broker, until the transfer ends).
        leader: u64,
    },
    /// A leadership transfer found no replica to take the leadership: no other voter answers
    /// (or there is none).
    #[error("unavailable: {reason}")]
    NoTransferTarget {
        /// Why.
        reason: String,
        /// The leader (this broker: the leadership stays).
        leader: u64,
    },
    /// The call ran past its deadline; it may or may not have happened.
    #[error("deadline exceeded: {0}")]
    Timeout(String),
    /// Stored data failed its checks; it is not served.
    #[error("data loss: {detail}")]
    DataLoss {
        /// What failed, and where.
        detail: String,
        /// The damaged file.
        segment: String,
        /// Byte position of the damage in it.
        position: u64,
    },
    /// A bug or an I/O failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller has no credentials (or bad ones) and the call needs an identity.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller's identity may not make this call (ACLs).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Longest name echoed back in an error (a hostile 10,000-character topic name would make the
/// `grpc-message` header too large for standard clients to accept the response).
const NAME_CHARS_MAX: usize = 128;

/// `name`, cut to [`NAME_CHARS_MAX`] characters with a marker saying how long it was.
pub fn clip(name: &str) -> String {
    if name.chars().count() <= NAME_CHARS_MAX {
        return name.to_string();
    }
    let head: String = name.chars().take(NAME_CHARS_MAX).collect();
    format!("{head}...({} characters)", name.chars().count())
}

/// A status answered by another broker, kept whole to be passed on.
#[derive(Debug, Clone)]
pub struct RemoteStatus(pub Box<tonic::Status>);

impl PartialEq for RemoteStatus {
    fn eq(&self, other: &Self) -> bool {
        self.0.code() == other.0.code()
            && self.0.message() == other.0.message()
            && self.0.details() == other.0.details()
    }
}

impl Eq for RemoteStatus {}

impl From<tonic::Status> for BrokerError {
    /// A peer broker's answer, passed on as it came; but a status this broker's own gRPC client
    /// made up because the peer never answered (a connection that broke or closed: CANCELLED,
    /// UNKNOWN, an h2 error, or any status with a transport error as its source) becomes a plain
    /// UNAVAILABLE (or DEADLINE_EXCEEDED when the client's timer expired), the codes a client
    /// retries on: the call may or may not have taken effect at the peer.
    fn from(status: tonic::Status) -> Self {
        let made_up_here = std::error::Error::source(&status).is_some()
            || matches!(status.code(), Code::Cancelled | Code::Unknown)
            || status.message().starts_with("h2 protocol error");
        if !made_up_here {
            return BrokerError::Remote(RemoteStatus(Box::new(status)));
        }
        if status.code() == Code::Cancelled && status.message() == "Timeout expired" {
            return BrokerError::Timeout(
                "a peer broker did not answer in time: the call may or may not have taken effect"
                    .into(),
            );
        }
        BrokerError::Unavailable {
            reason: format!(
                "the connection to a peer broker failed ({:?}: {}): the call may or may not have \
                 taken effect; try again",
                status.code(),
                status.message()
            ),
            leader: None,
        }
    }
}

impl BrokerError {
    /// The same error with every user-supplied name clipped for echoing back.
    pub fn clipped(self) -> Self {
        match self {
            BrokerError::TopicNotFound(n) => BrokerError::TopicNotFound(clip(&n)),
            BrokerError::TopicExists(n) => BrokerError::TopicExists(clip(&n)),
            BrokerError::GroupNotFound(n) => BrokerError::GroupNotFound(clip(&n)),
            BrokerError::GroupNotEmpty(n) => BrokerError::GroupNotEmpty(clip(&n)),
            BrokerError::PartitionNotFound { topic, partition } => BrokerError::PartitionNotFound {
                topic: clip(&topic),
                partition,
            },
            BrokerError::StaleGeneration {
                group,
                current,
                got,
            } => BrokerError::StaleGeneration {
                group: clip(&group),
                current,
                got,
            },
            BrokerError::NotAssigned {
                group,
                partition,
                generation,
            } => BrokerError::NotAssigned {
                group: clip(&group),
                partition,
                generation,
            },
            BrokerError::InvalidArgument(violations) => BrokerError::InvalidArgument(
                violations
                    .into_iter()
                    .map(|v| FieldViolation {
                        field: clip(&v.field),
                        description: clip_text(&v.description),
                    })
                    .collect(),
            ),
            BrokerError::Unavailable { reason, leader } => BrokerError::Unavailable {
                reason: clip_text(&reason),
                leader,
            },
            BrokerError::PermissionDenied(message) => {
                BrokerError::PermissionDenied(clip_text(&message))
            }
            BrokerError::Unauthenticated(message) => {
                BrokerError::Unauthenticated(clip_text(&message))
            }
            BrokerError::LimitReached { what, key, max } => BrokerError::LimitReached {
                what: clip_text(&what),
                key,
                max,
            },
            other => other,
        }
    }

    /// The group's current generation, when this refused a commit because the member's
    /// generation was replaced (STALE_GENERATION), whether this broker refused it or the
    /// group's coordinator did on another broker (a forwarded call's answer).
    pub fn replaced_generation(&self) -> Option<u64> {
        match self {
            BrokerError::StaleGeneration { current, .. } => Some(*current),
            BrokerError::Remote(status) => {
                let info = status.0.get_details_error_info()?;
                if info.reason != "STALE_GENERATION" {
                    return None;
                }
                info.metadata.get("current_generation")?.parse().ok()
            }
            _ => None,
        }
    }

    /// The machine-readable reason, whether this broker made the error or it is a peer's
    /// answer (its ErrorInfo reason; empty when it has none).
    pub fn reason_anywhere(&self) -> String {
        match self {
            BrokerError::Remote(status) => status
                .0
                .get_details_error_info()
                .map(|info| info.reason)
                .unwrap_or_default(),
            other => other.reason().to_string(),
        }
    }

    /// The leader this UNAVAILABLE names (its `leader_id`), whether this broker made it or it
    /// is a peer's answer.
    pub fn named_leader(&self) -> Option<u64> {
        match self {
            BrokerError::Unavailable { leader, .. } => *leader,
            BrokerError::Remote(status) if status.0.code() == Code::Unavailable => {
                let info = status.0.get_details_error_info()?;
                info.metadata.get("leader_id")?.parse().ok()
            }
            _ => None,
        }
        .filter(|&id| id != 0)
    }

    /// One invalid field.
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        BrokerError::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        match self {
            BrokerError::Remote(status) => status.0.code(),
            BrokerError::TopicNotFound(_)
            | BrokerError::PartitionNotFound { .. }
            | BrokerError::GroupNotFound(_) => Code::NotFound,
            BrokerError::TopicExists(_) => Code::AlreadyExists,
            BrokerError::InvalidArgument(_) => Code::InvalidArgument,
            BrokerError::BatchTooLarge { .. }
            | BrokerError::TooManyRecords { .. }
            | BrokerError::Overloaded(_)
            | BrokerError::LimitReached { .. } => Code::ResourceExhausted,
            BrokerError::SequenceGap { .. }
            | BrokerError::DuplicateSequence { .. }
            | BrokerError::UnknownProducer { .. }
            | BrokerError::ProducerFenced { .. }
            | BrokerError::StaleGeneration { .. }
            | BrokerError::NotAssigned { .. }
            | BrokerError::GroupNotEmpty(_)
            | BrokerError::Conflict(_) => Code::FailedPrecondition,
            BrokerError::OffsetOutOfRange { .. } => Code::OutOfRange,
            BrokerError::Unavailable { .. }
            | BrokerError::TransferUnderWay { .. }
            | BrokerError::NoTransferTarget { .. } => Code::Unavailable,
            BrokerError::Timeout(_) => Code::DeadlineExceeded,
            BrokerError::DataLoss { .. } => Code::DataLoss,
            BrokerError::Internal(_) => Code::Internal,
            BrokerError::Unauthenticated(_) => Code::Unauthenticated,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
        }
    }

    /// The machine-readable reason in `ErrorInfo`.
    pub fn reason(&self) -> &'static str {
        match self {
            BrokerError::Remote(_) => "FORWARDED",
            BrokerError::TopicNotFound(_) => "TOPIC_NOT_FOUND",
            BrokerError::PartitionNotFound { .. } => "PARTITION_NOT_FOUND",
            BrokerError::GroupNotFound(_) => "GROUP_NOT_FOUND",
            BrokerError::GroupNotEmpty(_) => "GROUP_NOT_EMPTY",
            BrokerError::Conflict(_) => "CONFLICT",
            BrokerError::TopicExists(_) => "TOPIC_EXISTS",
            BrokerError::InvalidArgument(_) => "INVALID_ARGUMENT",
            BrokerError::BatchTooLarge { .. } => "BATCH_TOO_LARGE",
            BrokerError::TooManyRecords { .. } => "TOO_MANY_RECORDS",
            BrokerError::Overloaded(_) => "OVERLOADED",
            BrokerError::LimitReached { .. } => "LIMIT_REACHED",
            BrokerError::SequenceGap { .. } => "SEQUENCE_GAP",
            BrokerError::DuplicateSequence { .. } => "DUPLICATE_SEQUENCE",
            BrokerError::UnknownProducer { .. } => "UNKNOWN_PRODUCER",
            BrokerError::ProducerFenced { .. } => "PRODUCER_FENCED",
            BrokerError::StaleGeneration { .. } | BrokerError::NotAssigned { .. } => {
                "STALE_GENERATION"
            }
            BrokerError::OffsetOutOfRange { .. } => "OFFSET_OUT_OF_RANGE",
            BrokerError::Unavailable { .. }
            | BrokerError::TransferUnderWay { .. }
            | BrokerError::NoTransferTarget { .. } => "UNAVAILABLE",
            BrokerError::Timeout(_) => "TIMEOUT",
            BrokerError::DataLoss { .. } => "DATA_LOSS",
            BrokerError::Internal(_) => "INTERNAL",
            BrokerError::Unauthenticated(_) => "UNAUTHENTICATED",
            BrokerError::PermissionDenied(_) => "PERMISSION_DENIED",
        }
    }
}

/// Free text that may quote user input, cut to a size any header accepts.
fn clip_text(text: &str) -> String {
    const TEXT_CHARS_MAX: usize = 512;
    if text.chars().count() <= TEXT_CHARS_MAX {
        return text.to_string();
    }
    let head: String = text.chars().take(TEXT_CHARS_MAX).collect();
    format!("{head}...")
}

impl From<BrokerError> for tonic::Status {
    fn from(error: BrokerError) -> tonic::Status {
        if let BrokerError::Remote(status) = error {
            return *status.0;
        }
        let error = error.clipped();
        let mut details = ErrorDetails::new();
        let mut metadata = HashMap::new();
        match &error {
            BrokerError::InvalidArgument(violations) => {
                for v in violations {
                    details.add_bad_request_violation(&v.field, &v.description);
                }
            }
            BrokerError::TopicNotFound(name) | BrokerError::TopicExists(name) => {
                details.set_resource_info("weft.v1.Topic", name, "", error.to_string());
            }
            BrokerError::GroupNotFound(group) | BrokerError::GroupNotEmpty(group) => {
                details.set_resource_info("weft.v1.ConsumerGroup", group, "", error.to_string());
            }
            BrokerError::PartitionNotFound { topic, partition } => {
                details.set_resource_info(
                    "weft.v1.Partition",
                    format!("{topic}/{partition}"),
                    "",
                    error.to_string(),
                );
            }
            BrokerError::BatchTooLarge { size, max } => {
                metadata.insert("size_bytes".into(), size.to_string());
                metadata.insert("max_bytes".into(), max.to_string());
            }
            BrokerError::TooManyRecords { count, max } => {
                metadata.insert("records".into(), count.to_string());
                metadata.insert("max_records".into(), max.to_string());
            }
            BrokerError::Overloaded(_) => {
                details.set_retry_info(Some(Duration::from_millis(100)));
            }
            BrokerError::LimitReached { what, key, max } => {
                details.add_quota_failure_violation(*key, what.clone());
                metadata.insert("limit".into(), (*key).to_string());
                metadata.insert("max".into(), max.to_string());
            }
            BrokerError::SequenceGap { expected, got, .. }
            | BrokerError::DuplicateSequence { expected, got, .. } => {
                metadata.insert("expected_sequence".into(), expected.to_string());
                metadata.insert("sequence".into(), got.to_string());
            }
            BrokerError::UnknownProducer { got, .. } => {
                metadata.insert("sequence".into(), got.to_string());
            }
            BrokerError::ProducerFenced { current, .. } => {
                metadata.insert("current_epoch".into(), current.to_string());
            }
            BrokerError::StaleGeneration { current, .. } => {
                metadata.insert("current_generation".into(), current.to_string());
            }
            BrokerError::NotAssigned {
                generation,
                partition,
                ..
            } => {
                metadata.insert("current_generation".into(), generation.to_string());
                metadata.insert("partition".into(), partition.to_string());
            }
            BrokerError::OffsetOutOfRange { start, end, .. } => {
                metadata.insert("log_start_offset".into(), start.to_string());
                metadata.insert("log_end_offset".into(), end.to_string());
            }
            BrokerError::Unavailable { leader, .. } => {
                details.set_retry_info(Some(Duration::from_millis(200)));
                if let Some(leader) = leader {
                    metadata.insert("leader_id".into(), leader.to_string());
                }
            }
            BrokerError::NoTransferTarget { leader, .. } => {
                details.set_retry_info(Some(Duration::from_millis(200)));
                metadata.insert("leader_id".into(), leader.to_string());
            }
            BrokerError::TransferUnderWay { to, leader } => {
                details.set_retry_info(Some(Duration::from_millis(200)));
                metadata.insert("leader_id".into(), leader.to_string());
                metadata.insert("transfer_to_node_id".into(), to.to_string());
            }
            BrokerError::DataLoss {
                segment, position, ..
            } => {
                metadata.insert("segment".into(), segment.clone());
                metadata.insert("position".into(), position.to_string());
            }
            BrokerError::Conflict(reason) => {
                details.add_precondition_failure_violation("STATE", "cluster", reason.clone());
            }
            BrokerError::Timeout(_)
            | BrokerError::Internal(_)
            | BrokerError::Remote(_)
            | BrokerError::Unauthenticated(_)
            | BrokerError::PermissionDenied(_) => {}
        }
        details.set_error_info(error.reason(), ERROR_DOMAIN, metadata);
        tonic::Status::with_error_details(error.code(), error.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_clipped_in_statuses() {
        let long = "x".repeat(10_000);
        let status = tonic::Status::from(BrokerError::TopicNotFound(long.clone()));
        assert!(status.message().len() < 300, "{}", status.message().len());
        assert!(status.message().contains("(10000 characters)"));
        let status = tonic::Status::from(BrokerError::invalid("name", format!("bad {long}")));
        assert!(status.message().len() < 1200);
        assert_eq!(clip("short"), "short");
    }

    /// Seen in a CI run: a publish forwarded to a leader that was killed answered the client
    /// CANCELLED ("operation was canceled", made up by this broker's own client when the
    /// connection closed), a code clients do not retry on.
    #[test]
    fn a_broken_connection_to_a_peer_is_unavailable_not_passed_on() {
        for made_up in [
            tonic::Status::cancelled("operation was canceled"),
            tonic::Status::unknown("h2 protocol error: error reading a body from connection"),
            tonic::Status::internal("h2 protocol error: connection reset"),
        ] {
            let status = tonic::Status::from(BrokerError::from(made_up));
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains("may or may not"), "{status:?}");
        }
        let expired = tonic::Status::from(BrokerError::from(tonic::Status::cancelled(
            tonic::TimeoutExpired(()).to_string(),
        )));
        assert_eq!(expired.code(), Code::DeadlineExceeded, "{expired:?}");
        // What a peer broker really answered is passed on as it came.
        let answered = tonic::Status::from(BrokerError::from(tonic::Status::internal(
            "the partition log is damaged",
        )));
        assert_eq!(answered.code(), Code::Internal);
        assert_eq!(answered.message(), "the partition log is damaged");
        let answered = tonic::Status::from(BrokerError::from(tonic::Status::not_found("no")));
        assert_eq!(answered.code(), Code::NotFound);
    }

    /// A coordinator's STALE_GENERATION reads the same through a forwarded call's answer;
    /// a partition another member owns (same reason, current generation) is told apart by the
    /// generation, and other refusals are not stale.
    #[test]
    fn a_replaced_generation_is_known_from_a_remote_answer_too() {
        let stale = BrokerError::StaleGeneration {
            group: "g".into(),
            current: 9,
            got: 7,
        };
        assert_eq!(stale.replaced_generation(), Some(9));
        let remote = BrokerError::from(tonic::Status::from(stale));
        assert!(matches!(remote, BrokerError::Remote(_)), "{remote:?}");
        assert_eq!(remote.replaced_generation(), Some(9));
        let not_assigned = BrokerError::from(tonic::Status::from(BrokerError::NotAssigned {
            group: "g".into(),
            partition: 1,
            generation: 7,
        }));
        assert_eq!(not_assigned.replaced_generation(), Some(7));
        let other = BrokerError::from(tonic::Status::from(BrokerError::invalid("offsets", "no")));
        assert_eq!(other.replaced_generation(), None);
        assert_eq!(BrokerError::Timeout("t".into()).replaced_generation(), None);
    }

    #[test]
    fn statuses_carry_codes_and_details() {
        let status = tonic::Status::from(BrokerError::invalid("records", "empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "records");

        let status = tonic::Status::from(BrokerError::SequenceGap {
            producer_id: 1,
            expected: 5,
            got: 9,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "SEQUENCE_GAP");
        assert_eq!(
            info.metadata.get("expected_sequence").map(String::as_str),
            Some("5")
        );

        let status = tonic::Status::from(BrokerError::Overloaded("queue".into()));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.get_details_retry_info().is_some());

        let status = tonic::Status::from(BrokerError::TopicNotFound("t".into()));
        assert_eq!(status.code(), Code::NotFound);
    }
}
