//! Configuration of one partition log. Every size and time has a maximum and a unit in its name.

use std::fmt;
use std::sync::Arc;

use crate::Error;

/// When appended data is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync before an append is reported durable. Group commit shares one sync among every
    /// append queued at that moment. The default.
    Always,
    /// Sync at most every `interval_ms`; appends are reported written before they are durable.
    Interval {
        /// Time between syncs, in milliseconds (1 ..= 60_000).
        interval_ms: u64,
    },
}

/// Observes every fsync the log performs. Crash tests and the fault-injection harness use it to cut
/// files back to exactly what a power loss would leave.
pub trait SyncListener: Send + Sync + fmt::Debug {
    /// At least the first `len` bytes of `path` are durable. Monotone: a smaller `len` than an
    /// earlier report (a sync begun before a later one finished) takes nothing back. A directory
    /// sync reports the directory with len 0.
    fn synced(&self, path: &std::path::Path, len: u64);
    /// `path` now durably holds exactly `len` bytes: it was created, truncated, or replaced whole.
    fn replaced(&self, path: &std::path::Path, len: u64);
}

/// Limits and policies of a partition log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Roll to a new segment before a segment's data file would exceed this.
    pub segment_bytes_max: u64,
    /// Roll to a new segment once the newest record is this much younger than the segment's first.
    pub segment_ms_max: i64,
    /// Add a sparse index entry after at least this many data bytes.
    pub index_interval_bytes: u64,
    /// Largest batch accepted by an append, encoded. Reading never depends on it: stored batches
    /// stay readable when it is lowered.
    pub batch_bytes_max: u64,
    /// When appends become durable (used by [`crate::GroupCommitter`]).
    pub fsync: FsyncPolicy,
    /// Delete the oldest segments while the log is larger than this (None: no limit).
    pub retention_bytes: Option<u64>,
    /// Delete segments whose newest record is older than this (None: keep forever).
    pub retention_ms: Option<i64>,
    /// Most sealed segments whose data file stays open (the least recently read are closed and
    /// opened again when read): file descriptors stay bounded however many segments there are.
    /// The active segment's file is open besides (with a second, `O_DIRECT`, handle when
    /// [`LogConfig::direct_io`] is on): a log holds at most this + 2 data-file descriptors.
    pub open_segments_max: usize,
    /// Bytes of the most recent record batches kept in memory for reads of the tail (see
    /// [`crate::TailCache`]); 0 keeps none.
    pub tail_cache_bytes: usize,
    /// Write the active segment with direct I/O (`O_DIRECT`, in whole 4 KiB blocks) instead of
    /// through the page cache: no copy into the kernel and no page-cache pages per append (so a
    /// container's memory limit does not carry them), but reads of data older than the tail
    /// cache then come from the disk. The sync that follows is unchanged. A filesystem that
    /// refuses direct I/O gets buffered writes, with a warning. Off by default.
    pub direct_io: bool,
    /// A purged segment's data file is cut from its end in steps of this many bytes, each
    /// synced, before it is unlinked (see [`crate::SegmentRemoval::run`]); at least 4096.
    pub removal_step_bytes: u64,
    /// Told about every fsync; for crash testing.
    pub sync_listener: Option<Arc<dyn SyncListener>>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 512 * 1024 * 1024,
            segment_ms_max: 7 * 24 * 60 * 60 * 1000,
            index_interval_bytes: 4096,
            batch_bytes_max: 16 * 1024 * 1024,
            fsync: FsyncPolicy::Always,
            retention_bytes: None,
            retention_ms: None,
            open_segments_max: 8,
            tail_cache_bytes: 2 * 1024 * 1024,
            direct_io: false,
            removal_step_bytes: crate::log::REMOVAL_STEP_BYTES,
            sync_listener: None,
        }
    }
}

impl LogConfig {
    /// Checks the values; the error names the offending key.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |key: &'static str, reason: String| Err(Error::InvalidConfig { key, reason });
        if self.removal_step_bytes < 4096 {
            return invalid(
                "removal_step_bytes",
                format!("{} is below 4096", self.removal_step_bytes),
            );
        }
        if !(4096..=u32::MAX as u64).contains(&self.segment_bytes_max) {
            return invalid(
                "segment_bytes_max",
                format!(
                    "{} is outside 4096 ..= {}",
                    self.segment_bytes_max,
                    u32::MAX
                ),
            );
        }
        if self.segment_ms_max < 1 {
            return invalid(
                "segment_ms_max",
                format!("{} must be positive", self.segment_ms_max),
            );
        }
        if self.index_interval_bytes == 0 || self.index_interval_bytes > self.segment_bytes_max {
            return invalid(
                "index_interval_bytes",
                format!(
                    "{} must be in 1 ..= segment_bytes_max",
                    self.index_interval_bytes
                ),
            );
        }
        // A batch larger than a segment is written alone into a segment of its own; the limit
        // applies to appends only (reads check lengths against the format's limit).
        let smallest = crate::BATCH_HEADER_LEN as u64;
        if !(smallest..=crate::codec::BATCH_LEN_LIMIT as u64).contains(&self.batch_bytes_max) {
            return invalid(
                "batch_bytes_max",
                format!(
                    "{} is outside {smallest} ..= {}",
                    self.batch_bytes_max,
                    crate::codec::BATCH_LEN_LIMIT
                ),
            );
        }
        if let FsyncPolicy::Interval { interval_ms } = self.fsync
            && !(1..=60_000).contains(&interval_ms)
        {
            return invalid(
                "fsync_interval_ms",
                format!("{interval_ms} is outside 1 ..= 60000"),
            );
        }
        if !(1..=100_000).contains(&self.open_segments_max) {
            return invalid(
                "open_segments_max",
                format!("{} is outside 1 ..= 100000", self.open_segments_max),
            );
        }
        if self.retention_ms.is_some_and(|ms| ms < 1) {
            return invalid("retention_ms", "must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_the_key() {
        LogConfig::default().validate().expect("defaults are valid");
        let cases: Vec<(LogConfig, &str)> = vec![
            (
                LogConfig {
                    segment_bytes_max: 10,
                    ..LogConfig::default()
                },
                "segment_bytes_max",
            ),
            (
                LogConfig {
                    index_interval_bytes: 0,
                    ..LogConfig::default()
                },
                "index_interval_bytes",
            ),
            (
                LogConfig {
                    batch_bytes_max: 2 * 1024 * 1024 * 1024,
                    ..LogConfig::default()
                },
                "batch_bytes_max",
            ),
            (
                LogConfig {
                    fsync: FsyncPolicy::Interval { interval_ms: 0 },
                    ..LogConfig::default()
                },
                "fsync_interval_ms",
            ),
            (
                LogConfig {
                    retention_ms: Some(0),
                    ..LogConfig::default()
                },
                "retention_ms",
            ),
            (
                LogConfig {
                    segment_ms_max: 0,
                    ..LogConfig::default()
                },
                "segment_ms_max",
            ),
        ];
        for (config, key) in cases {
            match config.validate() {
                Err(Error::InvalidConfig { key: got, .. }) => assert_eq!(got, key),
                other => panic!("{key}: expected InvalidConfig, got {other:?}"),
            }
        }
    }
}
