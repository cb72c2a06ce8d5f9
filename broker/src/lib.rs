//! The Weft broker.
//!
//! # Layout
//! - [`raft`]: everything that touches openraft: type config, the segment-store log adapter, the
//!   partition and controller state machines, the peer network.
//! - [`topic`]: topic configuration and validation.
//! - [`config`]: the broker's configuration (file, environment, flags).
//! - [`error`]: the broker's error type and its mapping to gRPC statuses.
//! - [`node`]: one broker node: metadata, controller, hosted partitions, groups.
//! - [`partition`]: a hosted partition: publishing, reads, retention.
//! - [`sequencer`]: a partition's publish actor: producer sequences, reordering, coalescing
//!   publishes into Raft entries.
//! - [`registry`]: the hosted partitions and the supervisor task of each (open, replay, serve,
//!   snapshot, retention, reopen after a storage error).
//! - [`groups`]: the consumer-group coordinator.
//! - [`meta`]: the broker's typed metadata (node identity, Raft state, group offsets) in the
//!   storage crate's key/value store.
//! - [`grpc`]: the client gRPC services, one file per service.
//! - [`admin`]: the admin HTTP API and its OpenAPI document.
//! - [`logging`]: log output (text or JSON) and its filter, changeable at run time.
//! - [`metrics`]: Prometheus metrics.
//! - [`sync_journal`]: the test-only record of every sync (feature `sync-journal`).
//! - [`server`]: `run(config, listeners, shutdown)`; `main.rs` is a thin wrapper.

pub mod acl;
pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
pub mod groups;
pub mod grpc;
pub mod logging;
pub mod meta;
pub mod metrics;
pub mod node;
pub mod otel;
pub mod partition;
pub mod raft;
pub mod reassign;
pub mod registry;
pub mod sequencer;
pub mod server;
pub mod sync_journal;
pub mod tls;
pub mod topic;

/// The milliseconds of test hook `var` (a `WEFT_TEST_*_MS` environment variable), if set to a
/// number: the delays tests use to open a race window deterministically.
pub(crate) fn test_hook_ms(var: &str) -> Option<std::time::Duration> {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
}
