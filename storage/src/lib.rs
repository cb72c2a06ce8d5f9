//! Weft's segment store: the durable, CRC-checked, group-committed log behind every partition, and
//! the small metadata store beside it.
//!
//! # Layout
//! - [`codec`]: the batch format (header, records, CRC32). One Raft entry is one batch.
//! - `segment`: one data file of frames plus its sparse offset and time indexes; scanning with
//!   torn-tail/corruption classification.
//! - [`log`]: [`PartitionLog`], a directory of segments: append (an entry of one or several
//!   batches, as one frame), flush (group commit), read by
//!   offset, by Raft index and by timestamp, truncate suffix, purge prefix, retention, recovery.
//! - [`commit`]: [`GroupCommitter`], a thread that owns a log and shares one fdatasync among every
//!   append queued at that moment.
//! - [`meta`]: [`MetaStore`]: small durable metadata in named key spaces (sled, or in memory).
//! - [`snapshot`]: the partition directory's snapshot file, replaced atomically.
//!
//! # Boundaries
//! This crate is synchronous and knows nothing of the network: it depends on no async runtime,
//! gRPC, Raft or protocol crate (a test checks that with `cargo metadata`). It deals in bytes,
//! offsets, Raft terms and indexes, and its own types. The on-disk format is specified in
//! `storage/FORMAT.md` and versioned in every batch, frame and index file.
//!
//! # Promises
//! - An append reported durable ([`PartitionLog::flush`], [`Committed::is_durable`]) survives a
//!   power loss.
//! - Bytes that fail a CRC are never returned: reads fail with [`Error::Corruption`] naming the file
//!   and position.
//! - Nothing here panics on bad bytes: malformed input is an [`Error`] or a [`CodecError`].

#[cfg(feature = "unsafe-canaries")]
pub mod canary;
pub mod codec;
pub mod commit;
pub mod config;
mod error;
pub mod log;
pub mod meta;
mod segment;
pub mod snapshot;
mod tail;

pub use codec::{
    BATCH_HEADER_LEN, Batch, BatchBuilder, BatchHeader, CodecError, EntryKind, FORMAT_VERSION,
    ProducerInfo, Record, RecordHeader,
};
pub use commit::{Committed, GroupCommitter};
pub use config::{FsyncPolicy, LogConfig, SyncListener};
pub use error::{Error, Result};
pub use log::{
    Appended, CorruptionFound, DamagedRange, LogPosition, PartitionLog, PreparedRoll, PurgeReport,
    REMOVAL_STEP_BYTES, RecoveryReport, RollTicket, SegmentRemoval, SyncTicket, TornTail,
};
pub use meta::{MemoryMetaStore, MetaOp, MetaStore, SledMetaStore};
pub use segment::FRAME_HEADER_LEN;
pub use tail::TailCache;
