//! The client gRPC services of `weft.v1`, one file per service, and what they share: request
//! metadata checks, record conversion, the Kafka-compatible key partitioner, deadlines.

pub mod caller;
pub mod cluster;
pub mod forward;
pub(crate) mod forward_stream;
pub mod group_link;
pub mod metadata;
pub mod publish;
pub mod route_hints;
pub mod subscribe;
pub mod topic_admin;

use std::time::Duration;

use weft_proto::v1;
use weft_storage::Batch;

use crate::error::BrokerError;
use crate::node::Node;

/// Checks a mirrored request header (`weft-topic`, `weft-group`: `field` is
/// `metadata.<header>`, `what` names the thing) against the body's value, so that a mesh policy
/// matching the header decides on what the call really is for.
pub(crate) fn check_mirrored(
    field: &'static str,
    what: &str,
    header: Option<&str>,
    body: &str,
) -> Result<(), BrokerError> {
    match header {
        Some(header) if header != body => Err(BrokerError::invalid(
            field,
            format!("header names {what} {header:?} but the request is for {body:?}"),
        )),
        _ => Ok(()),
    }
}

/// The value of request header `key` (empty when it is not text).
/// The ACL check of a gRPC call: may its caller do `operation` on `resource`?
pub(crate) fn authorize<T>(
    node: &Node,
    request: &tonic::Request<T>,
    operation: crate::acl::Operation,
    resource: crate::acl::Resource<'_>,
) -> Result<(), BrokerError> {
    node.authorize(&crate::auth::identity_of(request), operation, resource)
}

/// On the peer port with ACLs on: only brokers (or calls they forward) are served.
pub(crate) fn require_broker<T>(
    node: &Node,
    request: &tonic::Request<T>,
) -> Result<(), BrokerError> {
    let identity = crate::auth::identity_of(request);
    if node.acl_enabled() && !identity.broker && !identity.forwarded {
        return Err(BrokerError::PermissionDenied(format!(
            "{} is not a broker: the peer port serves brokers only (auth.broker_identities)",
            identity.principal
        )));
    }
    Ok(())
}

pub(crate) fn header<'a>(metadata: &'a tonic::metadata::MetadataMap, key: &str) -> Option<&'a str> {
    metadata.get(key).map(|v| v.to_str().unwrap_or(""))
}

/// Checks `weft-group` request metadata against the body's group (empty: no group).
pub(crate) fn check_group_header(
    metadata: &tonic::metadata::MetadataMap,
    group: &str,
) -> Result<(), BrokerError> {
    check_mirrored(
        "metadata.weft-group",
        "group",
        header(metadata, weft_proto::GROUP_HEADER),
        group,
    )
}

/// Checks `weft-topic` / `weft-partition` request metadata against the body.
pub(crate) fn check_headers(
    metadata: &tonic::metadata::MetadataMap,
    topic: &str,
    partition: Option<u32>,
) -> Result<(), BrokerError> {
    check_mirrored(
        "metadata.weft-topic",
        "topic",
        header(metadata, weft_proto::TOPIC_HEADER),
        topic,
    )?;
    if let (Some(value), Some(partition)) = (metadata.get(weft_proto::PARTITION_HEADER), partition)
    {
        let header = value.to_str().unwrap_or("");
        if header.parse::<u32>().ok() != Some(partition) {
            return Err(BrokerError::invalid(
                "metadata.weft-partition",
                format!("header names partition {header:?} but the request is for {partition}"),
            ));
        }
    }
    Ok(())
}

/// A client of node `node_id`'s Forward service at `peer_address`, counting one forwarded
/// `method` call; UNAVAILABLE naming the node when it cannot be reached.
pub(crate) fn forward_to(
    node: &Node,
    node_id: u64,
    peer_address: &str,
    method: &'static str,
) -> Result<
    weft_proto::internal::v1::forward_client::ForwardClient<crate::grpc::caller::PeerChannel>,
    BrokerError,
> {
    let client = node
        .peers()
        .forward_client(peer_address)
        .map_err(|reason| BrokerError::Unavailable {
            reason,
            leader: Some(node_id),
        })?;
    metrics::counter!("weft_forwarded_calls_total", "method" => method).increment(1);
    Ok(client)
}

/// The deadline of a call: the client's `grpc-timeout`, capped by `request_timeout_ms`.
pub(crate) fn deadline(metadata: &tonic::metadata::MetadataMap, node: &Node) -> Duration {
    let ceiling = Duration::from_millis(node.config.request_timeout_ms);
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(weft_proto::parse_grpc_timeout)
        .map_or(ceiling, |d| d.min(ceiling))
}

pub use weft_proto::{murmur2, partition_for_key};

/// Answers a request larger than `grpc_message_bytes_max` with RESOURCE_EXHAUSTED, as gRPC
/// convention has it (tonic's decoder says OUT_OF_RANGE).
pub(crate) fn oversized_requests_are_resource_exhausted(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let too_large = headers
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == b"11")
        && headers.get("grpc-message").is_some_and(|m| {
            // Percent-encoded on the wire (spaces as %20).
            m.as_bytes()
                .starts_with(b"Error,%20decoded%20message%20length%20too%20large")
        });
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        let message = headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .map(|m| m.replace("Error,%20decoded", "request%20refused:%20decoded"))
            .and_then(|m| http::HeaderValue::from_str(&m).ok());
        if let Some(message) = message {
            headers.insert("grpc-message", message);
        }
    }
    response
}

/// Converts stored batches to protocol records, from `from_offset`, at most `max_records`
/// (0 = no limit) and about `max_bytes` (at least one record).
pub(crate) fn to_records(
    batches: &[Batch],
    from_offset: u64,
    max_records: usize,
    max_bytes: usize,
) -> Vec<v1::Record> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for batch in batches {
        for record in batch.records() {
            if record.offset < from_offset {
                continue;
            }
            let size = record.key.len()
                + record.value.len()
                + record
                    .headers
                    .iter()
                    .map(|h| h.key.len() + h.value.len())
                    .sum::<usize>();
            if !out.is_empty()
                && (bytes + size > max_bytes || (max_records > 0 && out.len() >= max_records))
            {
                return out;
            }
            bytes += size;
            out.push(v1::Record {
                key: record.key,
                value: record.value,
                timestamp_ms: record.timestamp_ms,
                headers: record
                    .headers
                    .into_iter()
                    .map(|h| v1::Header {
                        key: String::from_utf8_lossy(&h.key).into_owned(),
                        value: h.value,
                    })
                    .collect(),
                offset: record.offset,
            });
        }
    }
    out
}

/// Bytes of a record as counted against credits and limits.
pub(crate) fn record_size(record: &v1::Record) -> usize {
    record.key.len()
        + record.value.len()
        + record
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.len())
            .sum::<usize>()
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The first message of a client stream, waited for at most `request_timeout_ms` (a client
/// that opens a stream and sends nothing would hold its task until the connection died, and a
/// clean shutdown for its whole grace period): DEADLINE_EXCEEDED past that, UNAVAILABLE when
/// the broker stops meanwhile. `what` names the message expected.
pub(crate) async fn first_message<T>(
    node: &crate::node::Node,
    inbound: &mut tonic::Streaming<T>,
    what: &str,
) -> Result<Result<Option<T>, tonic::Status>, crate::error::BrokerError> {
    let limit = std::time::Duration::from_millis(node.config.request_timeout_ms);
    tokio::select! {
        first = tokio::time::timeout(limit, inbound.message()) => first.map_err(|_| {
            crate::error::BrokerError::Timeout(format!(
                "the stream's first message (`{what}`) did not come within {} ms",
                limit.as_millis()
            ))
        }),
        () = node.closing() => Err(node.closing_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            weft_proto::parse_grpc_timeout("5S"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            weft_proto::parse_grpc_timeout("250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(weft_proto::parse_grpc_timeout("x"), None);
        assert_eq!(weft_proto::parse_grpc_timeout(""), None);
    }
}
