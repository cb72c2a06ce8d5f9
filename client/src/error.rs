//! The client's error type: gRPC statuses decoded into what a caller acts on.

use tonic::Code;
use tonic_types::StatusExt;

/// Errors of the Weft client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The broker answered with an error status.
    #[error("{code:?}: {message}")]
    Status {
        /// gRPC code.
        code: Code,
        /// The broker's message.
        message: String,
        /// `google.rpc.ErrorInfo` reason (e.g. SEQUENCE_GAP, TOPIC_NOT_FOUND), empty if none.
        reason: String,
        /// The node the broker names as the leader (its ErrorInfo `leader_id`), in an
        /// UNAVAILABLE answer of a broker that does not lead.
        leader_id: Option<u64>,
    },
    /// The broker could not be reached.
    #[error("cannot reach the broker at {endpoint}: {message}")]
    Connect {
        /// The endpoint tried.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// Invalid arguments to a client call.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The producer or consumer was closed.
    #[error("closed")]
    Closed,
    /// No answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let info = status.get_details_error_info();
        // Only a Weft broker's hint (a proxy in between may answer with details of its own).
        let leader_id = info
            .as_ref()
            .filter(|i| i.domain == "weft.dev")
            .and_then(|i| i.metadata.get("leader_id"))
            .and_then(|id| id.parse::<u64>().ok())
            .filter(|id| *id != 0);
        Error::Status {
            code: status.code(),
            message: status.message().to_string(),
            reason: info.map(|i| i.reason).unwrap_or_default(),
            leader_id,
        }
    }
}

impl Error {
    /// The gRPC code, if the broker answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The ErrorInfo reason, if any.
    pub fn reason(&self) -> &str {
        match self {
            Error::Status { reason, .. } => reason,
            _ => "",
        }
    }

    /// Whether retrying the same request may succeed (the broker is unavailable, overloaded, or
    /// did not answer in time). For publishes the outcome of the failed attempt is unknown; an
    /// idempotent producer retries with the same sequence, so nothing is stored twice.
    pub fn is_retriable(&self) -> bool {
        match self {
            // A batch over a limit is refused every time, and a configured maximum reached
            // (groups, members of a group) holds until someone leaves; an overloaded queue
            // drains in moments.
            Error::Status { reason, .. }
                if reason == "BATCH_TOO_LARGE"
                    || reason == "TOO_MANY_RECORDS"
                    || reason == "LIMIT_REACHED" =>
            {
                false
            }
            Error::Status { code, .. } => {
                matches!(
                    code,
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::ResourceExhausted
                        | Code::Aborted
                        | Code::Unknown
                        // An HTTP/2 stream reset or protocol error (a broker restarting, a
                        // proxy in between).
                        | Code::Cancelled
                        | Code::Internal
                )
            }
            Error::Connect { .. } | Error::Timeout(_) => true,
            Error::InvalidArgument(_) | Error::Closed => false,
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
