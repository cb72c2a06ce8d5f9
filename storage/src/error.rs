//! The storage error type: every fault of the world (I/O, corrupt bytes, bad arguments) is a value
//! here, never a panic.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::codec::CodecError;

/// Errors of the segment store and the metadata store. Cloneable, so one failed group commit can be
/// reported to every appender that shared it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
    /// Stored bytes fail their checks. Nothing from this range is returned.
    #[error("corrupt data in {} at byte {position}: {detail}", segment.display())]
    Corruption {
        /// The segment (or index) file.
        segment: PathBuf,
        /// Byte position of the damaged frame in that file.
        position: u64,
        /// What check failed.
        detail: String,
    },
    /// A batch handed to the store is malformed.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] CodecError),
    /// Batches that cannot form one entry (mixed Raft positions, offsets not dense, a control
    /// batch among record batches).
    #[error("invalid entry: {0}")]
    InvalidEntry(String),
    /// An append whose offset or Raft index does not continue the log.
    #[error(
        "append out of order: log expects offset {expected_offset} index {expected_index}, \
         batch has offset {offset} index {index}"
    )]
    OutOfOrder {
        /// Next offset of the log.
        expected_offset: u64,
        /// Next Raft index of the log.
        expected_index: u64,
        /// Base offset of the batch.
        offset: u64,
        /// Raft index of the batch.
        index: u64,
    },
    /// A batch larger than `batch_bytes_max`.
    #[error("batch of {size} bytes exceeds batch_bytes_max {max}")]
    BatchTooLarge {
        /// Encoded size.
        size: u64,
        /// Configured maximum.
        max: u64,
    },
    /// A read or truncation outside the log.
    #[error("offset {offset} is outside the log [{start}, {end})")]
    OffsetOutOfRange {
        /// Requested offset (or Raft index).
        offset: u64,
        /// First available.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// A configuration value is invalid.
    #[error("invalid config {key}: {reason}")]
    InvalidConfig {
        /// The key, as named in config files.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// An earlier write failed half-way and could not be undone; reopen the log to recover.
    #[error("log is unusable after an earlier failure, reopen it: {0}")]
    Poisoned(String),
    /// The metadata store failed or holds an undecodable value.
    #[error("metadata store: {0}")]
    Meta(String),
    /// The group committer has stopped.
    #[error("the group committer has stopped")]
    Closed,
    /// Intact stored data in a format this build does not read (a newer build wrote it): the
    /// log is not opened, and nothing is cut or skipped. Run a build that reads it.
    #[error(
        "{} at byte {position} holds data in format version {version}, which this build does          not read (it reads version {}): a newer build wrote it; run that build again",
        segment.display(),
        crate::codec::FORMAT_VERSION
    )]
    NewerFormat {
        /// The segment file.
        segment: PathBuf,
        /// Byte position of the frame.
        position: u64,
        /// The version found.
        version: u8,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn io(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn io(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.to_path_buf(),
            source: Arc::new(source),
        })
    }
}
