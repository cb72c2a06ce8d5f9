//! The Weft broker.
//!
//! # Layout
//! - [`raft`]: everything that touches openraft: type config, the segment-store log adapter, the
//!   partition and controller state machines, the peer network.
//! - [`topic`]: topic configuration and validation.
//! - [`config`]: the broker's configuration (file, environment, flags).

pub mod config;
pub mod raft;
pub mod topic;
