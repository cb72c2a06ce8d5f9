//! Weft's benchmarks.
//!
//! # Layout
//! - The `weft-bench` binary (`src/main.rs`): declared workloads (`workloads/*.toml`) run against
//!   Weft and peer brokers (NATS JetStream, Redis Streams) on the same machine, at declared
//!   durability, with latency measured from each message's intended send time. Modules:
//!   [`workload`] (the files), [`drivers`] (one per system, plus the raw-disk baseline in
//!   [`runner`]), [`runner`] (one run), [`compare`] (alternating rounds, medians, ratios to
//!   Weft), [`result`] (the JSON result and its checks), [`chart`] (SVG and PNG),
//!   [`progress`]; [`restart`] (`weft-bench restart`: time to serve a large partition again
//!   after a clean restart and after kill -9, and peak memory meanwhile).
//! - `benches/micro.rs`: criterion micro-benchmarks of the batch codec and the storage
//!   append/read path.
//! - `benches/storage_append.rs`: durable append throughput of the segment store (group commit,
//!   fsync before ack) next to raw `write` + `fdatasync` of the same bytes in the same run.
//! - `benches/broker_publish.rs`: an in-process broker's publish throughput and latency.
//!
//! See `benches/README.md` for the method, the commands and the latest figures.

pub mod catchup;
pub mod chart;
pub mod compare;
pub mod drivers;
pub mod failover;
pub mod progress;
pub mod restart;
pub mod result;
pub mod runner;
pub mod workload;
