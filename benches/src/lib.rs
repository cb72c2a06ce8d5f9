//! Weft's benchmarks.
//!
//! # Layout
//! - `benches/storage_append.rs`: durable append throughput of the segment store (group commit,
//!   fsync before ack) next to raw `write` + `fdatasync` of the same bytes in the same run.
//!
//! The load harness that runs Weft against peer brokers (NATS JetStream, Redis Streams, RabbitMQ
//! Streams) will live here too; see `benches/README.md`.
