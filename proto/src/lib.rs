//! Weft's wire protocol: generated prost messages and tonic services.
//!
//! # Layout
//! - [`v1`]: the client API (`weft.v1`): `Publisher`, `Subscriber`, `Metadata` (read-only, for
//!   producers and consumers), `TopicAdmin`, `Cluster`. One
//!   service per concern, so a mesh can match policy on path prefixes (`/weft.v1.Publisher/`).
//! - [`internal::v1`]: the broker-to-broker API (`weft.internal.v1`): `Raft` for every Raft group,
//!   keyed by group id, `Controller` (joining the cluster, controller commands forwarded to the
//!   controller leader), and `Forward` for calls a follower hands to the leader.
//! - [`transport`]: the channel every caller uses (the Rust client, a broker calling its peers),
//!   which turns a proxy's plain HTTP answer (403, 502...) into the gRPC status it stands for.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of every file above, for gRPC reflection.
//!
//! The `.proto` sources under `proto/proto/` are the reference: every message and field is
//! documented there. Field numbers are never reused. `bytes` fields are generated as
//! [`bytes::Bytes`], so a record value is never copied between the socket and the segment store.
//!
//! This crate is a leaf: it depends on nothing else in the workspace.

#![allow(missing_docs, unreachable_pub, clippy::doc_lazy_continuation)]

pub mod otel;
pub mod quic;
pub mod tls;
pub mod transport;

/// The client API, package `weft.v1`.
pub mod v1 {
    tonic::include_proto!("weft.v1");
}

/// The broker-to-broker API.
pub mod internal {
    /// Package `weft.internal.v1`.
    pub mod v1 {
        tonic::include_proto!("weft.internal.v1");
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` of all Weft protocol files (and the well-known types
/// they import), for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weft_descriptor.bin"));

/// Request metadata key that mirrors the topic of a request, for mesh policy and metrics.
pub const TOPIC_HEADER: &str = "weft-topic";
/// Request metadata key that mirrors the partition of a request, for mesh policy and metrics.
pub const PARTITION_HEADER: &str = "weft-partition";
/// Request metadata key that mirrors the consumer group of a group call (Subscribe as a group
/// member, CommitOffsets, GetOffsets of a group, DescribeGroup, DeleteGroup, LeaveGroup), for
/// mesh policy by group. The broker refuses a call whose header and body disagree.
pub const GROUP_HEADER: &str = "weft-group";

/// PublishStream request metadata key: `any` lets the broker answer the stream's requests in
/// the order they are stored rather than the order they were sent (a partition's answer never
/// waits behind another partition's); the client matches answers by `request_id`, which must
/// then be unique on the stream. Absent (or any other value): answers come in request order.
pub const ANSWER_ORDER_HEADER: &str = "weft-answer-order";
/// Trailer of a PublishStream that a failing request ended: that request's `request_id`.
pub const REQUEST_ID_TRAILER: &str = "weft-request-id";
/// Trailer of a PublishStream that a request the broker could not read ended (one larger than its
/// gRPC message limit, say): the `request_id` of the last request it read whole (0 for none).
/// The unreadable request is the one sent after that, and it was not stored.
pub const REQUEST_AFTER_TRAILER: &str = "weft-request-after";

/// Peer-call metadata key: the identity of the caller a broker forwards a call for
/// (percent-encoded), believed by the receiving broker only from a broker identity.
pub const CALLER_PRINCIPAL_HEADER: &str = "weft-caller-principal";
/// Peer-call metadata key: where that identity came from (token, sidecar, certificate,
/// anonymous).
pub const CALLER_SOURCE_HEADER: &str = "weft-caller-source";

/// A `grpc-timeout` header value as gRPC writes it (digits and a unit: H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Kafka's murmur2 hash, as its default partitioner uses it.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = SEED ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    for (i, &b) in tail.iter().enumerate().rev() {
        h ^= u32::from(b) << (8 * i);
    }
    if !tail.is_empty() {
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition a `PublishRequest.partition_key` selects: murmur2 made positive, modulo the
/// partition count (Kafka's default partitioner), so clients and brokers agree.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) as u32 & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn murmur2_matches_kafka() {
        // Vectors from Kafka's UtilsTest.
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()), expected, "{input}");
        }
        assert!((0..1000).all(|i| partition_for_key(format!("k{i}").as_bytes(), 7) < 7));
    }

    #[test]
    fn descriptor_set_lists_every_service() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let mut services: Vec<String> = set
            .file
            .iter()
            .flat_map(|file| {
                let package = file.package().to_string();
                file.service
                    .iter()
                    .map(move |service| format!("{package}.{}", service.name()))
            })
            .collect();
        services.sort();
        assert_eq!(
            services,
            [
                "weft.internal.v1.Controller",
                "weft.internal.v1.Forward",
                "weft.internal.v1.Raft",
                "weft.v1.Cluster",
                "weft.v1.Metadata",
                "weft.v1.Publisher",
                "weft.v1.Subscriber",
                "weft.v1.TopicAdmin",
            ]
        );
    }

    #[test]
    fn record_values_are_bytes_and_round_trip() {
        let record = v1::Record {
            key: bytes::Bytes::from_static(b"k"),
            value: bytes::Bytes::from_static(b"value"),
            timestamp_ms: 42,
            headers: vec![v1::Header {
                key: "traceparent".into(),
                value: bytes::Bytes::from_static(
                    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            }],
            offset: 7,
        };
        let encoded = record.encode_to_vec();
        let decoded = v1::Record::decode(bytes::Bytes::from(encoded)).expect("decodes");
        assert_eq!(decoded, record);
    }

    #[test]
    fn every_message_and_field_is_documented() {
        // protox keeps source info; every message, field, service and method needs a comment.
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let mut undocumented = Vec::new();
        let mut files = 0;
        for file in set.file.iter().filter(|f| f.name().starts_with("weft/")) {
            files += 1;
            let info = file.source_code_info.as_ref().expect("source info kept");
            let documented: std::collections::HashSet<Vec<i32>> = info
                .location
                .iter()
                .filter(|l| {
                    l.leading_comments
                        .as_deref()
                        .is_some_and(|c| !c.trim().is_empty())
                        || l.trailing_comments
                            .as_deref()
                            .is_some_and(|c| !c.trim().is_empty())
                })
                .map(|l| l.path.clone())
                .collect();
            // FileDescriptorProto: message_type = 4, service = 6; DescriptorProto: field = 2,
            // nested_type = 3; ServiceDescriptorProto: method = 2.
            fn walk(
                prefix: Vec<i32>,
                message: &prost_types::DescriptorProto,
                documented: &std::collections::HashSet<Vec<i32>>,
                file: &str,
                out: &mut Vec<String>,
            ) {
                if !documented.contains(&prefix) {
                    out.push(format!("{file}: message {}", message.name()));
                }
                for (i, field) in message.field.iter().enumerate() {
                    let mut path = prefix.clone();
                    path.extend([2, i as i32]);
                    if !documented.contains(&path) {
                        out.push(format!("{file}: field {}.{}", message.name(), field.name()));
                    }
                }
                for (i, nested) in message.nested_type.iter().enumerate() {
                    if nested.options.as_ref().is_some_and(|o| o.map_entry()) {
                        continue;
                    }
                    let mut path = prefix.clone();
                    path.extend([3, i as i32]);
                    walk(path, nested, documented, file, out);
                }
            }
            for (i, message) in file.message_type.iter().enumerate() {
                walk(
                    vec![4, i as i32],
                    message,
                    &documented,
                    file.name(),
                    &mut undocumented,
                );
            }
            for (i, service) in file.service.iter().enumerate() {
                if !documented.contains(&vec![6, i as i32]) {
                    undocumented.push(format!("{}: service {}", file.name(), service.name()));
                }
                for (j, method) in service.method.iter().enumerate() {
                    if !documented.contains(&vec![6, i as i32, 2, j as i32]) {
                        undocumented.push(format!("{}: rpc {}", file.name(), method.name()));
                    }
                }
            }
        }
        assert!(files >= 7, "the weft/ .proto files were checked ({files})");
        assert!(undocumented.is_empty(), "undocumented: {undocumented:#?}");
    }
}
