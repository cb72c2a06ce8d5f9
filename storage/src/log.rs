//! A partition log: a directory of segments, appended at the tail, read by offset or Raft index,
//! truncated at the tail (Raft conflicts) and purged at the head (retention, snapshots).
//!
//! Invariants (checked by `debug_assert!` and by the property tests):
//! - segments are ordered by base offset, which strictly increases; only the last one is written;
//! - offsets are dense: a segment's base offset is its predecessor's next offset, and every batch
//!   starts at the offset after the previous batch; Raft indexes increase by one per entry;
//! - every segment but the last is fully synced and has index files; `durable` never runs ahead of
//!   what fdatasync has confirmed.

use std::fs;
use std::path::{Path, PathBuf};

use crate::codec::{Batch, EntryKind, le_u32, le_u64};
use crate::config::LogConfig;
use crate::error::{Error, IoContext, Result};
use crate::segment::{self, ReadEnd, ScanMode, Segment, Visit};
use crate::tail::TailCache;

const LOG_META_FILE: &str = "log.meta";
const LOG_META_MAGIC: [u8; 8] = *b"WFTLOG01";
const LOG_META_VERSION: u32 = 1;

/// A position in the log: the offset the next record takes and the Raft index the next entry takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogPosition {
    /// Offset of the next record.
    pub next_offset: u64,
    /// Raft index of the next entry.
    pub next_index: u64,
}

/// Where an appended batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of its first record.
    pub base_offset: u64,
    /// Offset after its last record.
    pub next_offset: u64,
    /// Its Raft index.
    pub index: u64,
}

/// A torn tail removed by recovery: bytes written after the last fsync that did not fully reach
/// the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment data file.
    pub segment: PathBuf,
    /// Where the file was cut.
    pub position: u64,
    /// How many bytes were removed.
    pub bytes_removed: u64,
}

/// Damage found in data that had been durable. It is never served; reads of it fail with
/// [`Error::Corruption`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptionFound {
    /// The segment data file.
    pub segment: PathBuf,
    /// Position of the first damaged byte range.
    pub position: u64,
    /// Where valid data resumes in the same file, if it does.
    pub resumes_at: Option<u64>,
    /// What check failed.
    pub detail: String,
}

/// A range of Raft entries that cannot be read because their bytes are damaged, bounded by the
/// intact entries around it: found by [`PartitionLog::map_damage`] when a read runs into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    /// The segment data file.
    pub segment: PathBuf,
    /// Position of the first damaged byte.
    pub position: u64,
    /// Where intact frames resume in the same file, if they do.
    pub resumes_at: Option<u64>,
    /// Raft index of the first damaged entry.
    pub first_index: u64,
    /// Raft index of the first intact entry after the damage (or the log's end).
    pub next_index: u64,
    /// Offset of the first record lost.
    pub first_offset: u64,
    /// Offset of the first intact record after the damage (or the log's end).
    pub next_offset: u64,
    /// A term for the lost entries, from the intact entries around them (they lie between those
    /// entries' terms); None when neither side is known.
    pub term: Option<u64>,
    /// What check failed.
    pub detail: String,
}

/// What opening the log found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// True when the log had been closed cleanly (the tail needed no scan).
    pub clean_shutdown: bool,
    /// The torn tail that was cut off, if any.
    pub torn_tail: Option<TornTail>,
    /// Damage in durable data.
    pub corruptions: Vec<CorruptionFound>,
    /// Segments whose index files were missing, stale or damaged and were rebuilt.
    pub rebuilt_indexes: Vec<PathBuf>,
    /// Why `log.meta` (the log's start) was written again from the first segment: it failed
    /// its checks.
    pub rebuilt_log_meta: Option<String>,
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeReport {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Data bytes deleted.
    pub bytes_deleted: u64,
    /// The log's first offset afterwards.
    pub start_offset: u64,
}

/// What a purged segment's data file is renamed to end with until its removal deletes it.
const PURGED_SUFFIX: &str = ".purged";

/// The default of [`LogConfig::removal_step_bytes`]: bytes a purged segment's data file is cut
/// by per step before it is unlinked (see [`SegmentRemoval::run`]).
pub const REMOVAL_STEP_BYTES: u64 = 16 * 1024 * 1024;

/// Segments a purge took out of a log, whose files are still to be deleted: by
/// [`SegmentRemoval::run`], without the log's lock (no read or append of the log waits for it).
/// The log's new start was recorded durably before they were taken out, so a crash before the
/// removal finishes leaves files wholly before that start, which the next open deletes.
#[derive(Debug)]
#[must_use = "the purged segments' files stay on disk until the removal runs"]
pub struct SegmentRemoval {
    dir: PathBuf,
    config: LogConfig,
    segments: Vec<Segment>,
}

impl SegmentRemoval {
    /// Deletes the segments' files, then syncs the directory. Each data file is first cut from
    /// its end in steps of [`LogConfig::removal_step_bytes`], each step synced: on a filesystem mounted
    /// with online discard (ext4 `discard`) the journal commit that frees a file's blocks also
    /// discards them, and every fsync on the filesystem waits for that commit, so freeing a
    /// 256 MiB segment at once stalled every partition's syncs (34-69 ms measured) where 16 MiB
    /// steps stall them a few milliseconds each. Nothing reads these files any more: readers
    /// reach segments only through the log, under its lock, and the purge took them out.
    pub fn run(self) -> Result<()> {
        for seg in self.segments {
            // `seg.path` is the data file's name since the purge (`*.purged`, never reused):
            // a new segment of the same base offset, in a directory deleted and created again
            // meanwhile, is never touched.
            let file = seg.file()?;
            let step = self.config.removal_step_bytes.max(4096);
            let mut len = seg.data_len;
            while len > step {
                len -= step;
                file.set_len(len).io("cut purged segment", &seg.path)?;
                file.sync_data().io("fdatasync", &seg.path)?;
                segment::notify_replaced(&self.config, &seg.path, len);
            }
            drop(file);
            fs::remove_file(&seg.path).io("delete purged segment", &seg.path)?;
        }
        segment::sync_dir(&self.dir, &self.config)
    }
}

/// One partition's log. Single owner: appends, truncation and purges take `&mut self`; reads take
/// `&self` and use positioned reads, so they never disturb the writer's state.
#[derive(Debug)]
pub struct PartitionLog {
    dir: PathBuf,
    config: LogConfig,
    /// Never empty; the last segment is the active one.
    segments: Vec<Segment>,
    durable: LogPosition,
    poisoned: Option<String>,
    report: RecoveryReport,
    /// Bumped by truncation and reset, so a sync begun before them cannot claim durability after.
    generation: u64,
    /// Bumped by reset only: every segment there was is gone then.
    resets: u64,
    /// Counts reads of sealed segments, for closing the least recently used files.
    reads: std::sync::atomic::AtomicU64,
    /// The most recent record batches, for reads without the log's lock.
    tail: TailCache,
    /// Damaged ranges that reads ran into, bounded (see [`PartitionLog::map_damage`]).
    damaged: Vec<DamagedRange>,
}

/// Most damaged ranges a log remembers.
const DAMAGED_RANGES_MAX: usize = 64;

/// A sync of the active segment that can run on another thread while appends go on: made by
/// [`PartitionLog::begin_sync`], run with [`SyncTicket::sync`], and reported back with
/// [`PartitionLog::complete_sync`]. This is how a writer overlaps the next group's writes with the
/// previous group's fdatasync.
#[derive(Debug)]
pub struct SyncTicket {
    file: fs::File,
    path: PathBuf,
    segment_base: u64,
    len: u64,
    position: LogPosition,
    generation: u64,
    config: LogConfig,
}

impl SyncTicket {
    /// The position that is durable once this sync succeeds.
    pub fn position(&self) -> LogPosition {
        self.position
    }

    /// `syncfs` of the filesystem holding the segment: everything written to it, by any log,
    /// before the call is durable. A writeback error anywhere on it is reported (Linux 5.8 and
    /// later) only to the first syncfs through each open file after it happened, and never
    /// through a file opened after an earlier syncfs saw it: after a failure, sync each log
    /// with [`SyncTicket::sync`] (the broker's flusher does). Use for a round of several logs
    /// on one filesystem: one call instead of an fdatasync per file.
    pub fn sync_filesystem(&self) -> Result<()> {
        rustix::fs::syncfs(&self.file)
            .map_err(std::io::Error::from)
            .io("syncfs", &self.path)?;
        segment::notify(&self.config, &self.path, self.len);
        Ok(())
    }

    /// The filesystem (device number) that holds this ticket's file: a
    /// [`SyncTicket::sync_filesystem`] covers only tickets of the same one.
    pub fn device(&self) -> Result<u64> {
        rustix::fs::fstat(&self.file)
            .map(|stat| stat.st_dev)
            .map_err(std::io::Error::from)
            .io("fstat", &self.path)
    }

    /// Marks this ticket's data durable after a [`SyncTicket::sync_filesystem`] of another
    /// ticket on the same filesystem covered it.
    pub fn covered(&self) {
        segment::notify(&self.config, &self.path, self.len);
    }

    /// fdatasync the segment: everything written before [`PartitionLog::begin_sync`] returned.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().io("fdatasync", &self.path)?;
        segment::notify(&self.config, &self.path, self.len);
        Ok(())
    }
}

/// The work of a segment roll, prepared under the log's lock by [`PartitionLog::prepare_roll`]
/// and run without it ([`RollTicket::run`]): fdatasync the active segment, write its index files,
/// create the next segment's file and make its directory entry durable. Readers never wait
/// behind those syncs; [`PartitionLog::finish_roll`] then switches segments in a moment.
#[derive(Debug)]
pub struct RollTicket {
    file: fs::File,
    path: PathBuf,
    dir: PathBuf,
    sealed_base: u64,
    sealed_len: u64,
    index_files: segment::IndexFiles,
    next: LogPosition,
    generation: u64,
    resets: u64,
    config: LogConfig,
}

/// The next segment, created by [`RollTicket::run`], for [`PartitionLog::finish_roll`].
#[derive(Debug)]
pub struct PreparedRoll {
    segment: Segment,
}

impl RollTicket {
    /// Removes the index files [`RollTicket::run`] wrote for the sealed segment (those not
    /// written included).
    fn remove_index_files(&self) -> Result<()> {
        segment::remove_index_files_of(&self.path).map(|_| ())
    }

    /// Seals the segment and creates its successor (blocking I/O; run it without the log's lock).
    pub fn run(&self) -> Result<PreparedRoll> {
        self.file.sync_data().io("fdatasync", &self.path)?;
        segment::notify(&self.config, &self.path, self.sealed_len);
        self.index_files.write(&self.dir, &self.config)?;
        let segment = Segment::create(
            &self.dir,
            self.next.next_offset,
            self.next.next_index,
            &self.config,
        )?;
        Ok(PreparedRoll { segment })
    }
}

/// Creates `dir` and every missing parent, each made durable in its own parent: a power loss
/// soon after must not take the directory away with the entries synced in it (a file's
/// fdatasync does not make the directory entries above it durable).
fn create_dir_durably(dir: &Path, config: &LogConfig) -> Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.is_dir() {
        missing.push(at);
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    for created in missing.into_iter().rev() {
        match fs::create_dir(created) {
            Ok(()) => {}
            // Made meanwhile (another partition of the topic): its maker syncs it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).io("create log directory", created),
        }
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            segment::sync_dir(parent, config)?;
        }
    }
    Ok(())
}

impl PartitionLog {
    /// Opens (or creates) the log in `dir`, recovering from whatever a crash left: the tail segment
    /// is scanned and a torn tail cut off, missing or damaged index files are rebuilt, and damage
    /// in durable data is recorded in [`PartitionLog::recovery_report`].
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<PartitionLog> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        create_dir_durably(&dir, &config)?;
        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir).io("list log directory", &dir)? {
            let entry = entry.io("list log directory", &dir)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") || name.ends_with(PURGED_SUFFIX) {
                // (A purged segment's data file whose removal was cut off is one of these; a
                // removal still running, of this log's instance before a reopen, may delete
                // it first.)
                let path = entry.path();
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).io("remove leftover", &path);
                    }
                    _ => {}
                }
            } else if let Some(base) = segment::parse_data_file_name(&name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();

        // A damaged log.meta with segments left: the log starts where its first segment does
        // (a purge records a segment's base, then deletes the segments before it; any it had
        // not deleted yet stay in the log). It is written again below. Before, the partition
        // never opened again. Without a segment the start is unknown: refused.
        let (start, meta_damaged) = match read_log_meta(&dir) {
            Ok(start) => (start, None),
            Err(Error::Corruption { detail, .. }) if !bases.is_empty() => (None, Some(detail)),
            Err(e) => return Err(e),
        };
        if let Some(start) = start {
            // Segments before the recorded start, which is always a segment's base: a purge
            // recorded that start and was cut off before its removal had deleted their files
            // (perhaps part-way through cutting one, see `SegmentRemoval::run`), or a reset
            // before it had deleted them or made the segment at the start (made below when
            // no segment is left). Their entries are gone for Raft.
            let first_kept = bases.partition_point(|&base| base < start.next_offset);
            if first_kept > 0 {
                for base in bases.drain(..first_kept) {
                    let path = dir.join(segment::data_file_name(base));
                    tracing::info!(segment = %path.display(), "deleting a segment purged earlier");
                    // (A removal still running may delete them first.)
                    for file in [
                        path.with_extension("index"),
                        path.with_extension("timeindex"),
                        path.clone(),
                    ] {
                        match fs::remove_file(&file) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                                return Err(e).io("delete purged segment", &file);
                            }
                            _ => {}
                        }
                    }
                }
                segment::sync_dir(&dir, &config)?;
            }
        }
        let mut report = RecoveryReport::default();
        let mut segments: Vec<Segment> = Vec::with_capacity(bases.len().max(1));
        if bases.is_empty() {
            let start = start.unwrap_or_default();
            write_log_meta(&dir, start, &config)?;
            segments.push(Segment::create(
                &dir,
                start.next_offset,
                start.next_index,
                &config,
            )?);
        }
        let last = bases.len().saturating_sub(1);
        for (i, &base) in bases.iter().enumerate() {
            let path = dir.join(segment::data_file_name(base));
            let mut seg = Segment::open(path.clone(), base)?;
            let is_tail = i == last;
            let hint = match segments.last() {
                Some(prev) => prev.next_index,
                None => start.map_or(0, |s| s.next_index),
            };
            if seg.load_index()? {
                if is_tail {
                    report.clean_shutdown = true;
                    // The tail changes from now on: its index files go before its first
                    // change. Kept until then, an open that stops early (a damaged last entry,
                    // say) leaves the log as cleanly closed as it found it: the next open does
                    // not scan the tail and take damage in it for a torn write.
                    seg.index_files_stale = true;
                }
            } else {
                let mode = if is_tail {
                    ScanMode::Tail
                } else {
                    ScanMode::Sealed {
                        successor_base: bases.get(i + 1).copied(),
                    }
                };
                let file_len = seg.data_len;
                let scan = seg.scan(mode, hint, &config)?;
                for damage in scan.damage {
                    report.corruptions.push(CorruptionFound {
                        segment: path.clone(),
                        position: damage.position,
                        resumes_at: damage.resumes_at,
                        detail: damage.detail,
                    });
                }
                if scan.padding_at.is_some() {
                    // The zeros after the last frame of a direct write: nothing to report.
                    seg.cut_padding(&config)?;
                }
                if let Some(torn) = scan.torn_at {
                    seg.truncate(torn, &config)?;
                    report.torn_tail = Some(TornTail {
                        segment: path.clone(),
                        position: torn,
                        bytes_removed: file_len - torn,
                    });
                }
                if is_tail {
                    seg.force_sync(&config)?;
                } else {
                    seg.write_index_files(&dir, &config)?;
                    report.rebuilt_indexes.push(path.clone());
                }
            }
            if seg.is_empty() {
                seg.next_index = hint;
            }
            if let Some(prev) = segments.last_mut()
                && let Some(first) = seg.first_index
                && (prev.next_offset, prev.next_index) != (seg.base_offset, first)
                && prev.next_offset <= seg.base_offset
                && prev.next_index <= first
            {
                // The previous segment ends before this one begins: its file was cut short
                // (frames lost at its end, or all of them). What it lost is damage in it, up
                // to this segment's start; reads of it fail instead of skipping to here.
                if !report.corruptions.iter().any(|c| c.segment == prev.path) {
                    report.corruptions.push(CorruptionFound {
                        segment: prev.path.clone(),
                        position: prev.data_len,
                        resumes_at: None,
                        detail: format!(
                            "the segment's frames end at offset {} index {}, but the next segment \
                             starts at offset {} index {}: the entries in between are lost \
                             (the file was cut short)",
                            prev.next_offset, prev.next_index, seg.base_offset, first
                        ),
                    });
                }
                prev.lost = Some((prev.next_offset, prev.next_index));
                prev.next_offset = seg.base_offset;
                prev.next_index = first;
            } else if let Some(prev) = segments.last() {
                let index_ok = seg.first_index.is_none_or(|first| first == prev.next_index);
                if prev.next_offset != seg.base_offset || !index_ok {
                    report.corruptions.push(CorruptionFound {
                        segment: path.clone(),
                        position: 0,
                        resumes_at: Some(0),
                        detail: format!(
                            "segment does not continue its predecessor (expected offset {} index {}, \
                             found offset {} index {:?})",
                            prev.next_offset, prev.next_index, seg.base_offset, seg.first_index
                        ),
                    });
                }
            }
            segments.push(seg);
            // At most `open_segments_max` sealed segments' files open meanwhile: the one that
            // falls out of the last ones checked is closed (reads open it again). Before, every
            // segment's file stayed open until the end of the open, and a log of more segments
            // than the process may open files failed to open at all.
            if let Some(behind) = segments
                .len()
                .checked_sub(2 + config.open_segments_max)
                .and_then(|i| segments.get(i))
            {
                behind.close_file();
            }
        }
        if let Some(detail) = meta_damaged {
            // The first entry tells the start's Raft index; an empty first segment, or one
            // whose first frame is damaged, does not (its index would come from the damaged
            // file): refused.
            let Some((next_offset, next_index)) = segments
                .first()
                .filter(|first| {
                    !report
                        .corruptions
                        .iter()
                        .any(|c| c.segment == first.path && c.position == 0)
                })
                .and_then(|first| Some((first.base_offset, first.start_index()?)))
            else {
                return Err(Error::Corruption {
                    segment: dir.join(LOG_META_FILE),
                    position: 0,
                    detail: format!(
                        "{detail}, and the first segment holds no entry to rebuild it from"
                    ),
                });
            };
            let start = LogPosition {
                next_offset,
                next_index,
            };
            write_log_meta(&dir, start, &config)?;
            tracing::error!(
                dir = %dir.display(),
                detail,
                next_offset = start.next_offset,
                next_index = start.next_index,
                "log.meta was damaged; written again from the first segment"
            );
            report.rebuilt_log_meta = Some(detail);
        }
        for corruption in &report.corruptions {
            tracing::error!(
                segment = %corruption.segment.display(),
                position = corruption.position,
                detail = %corruption.detail,
                "corruption in durable data; the damaged range will not be served"
            );
        }
        if let Some(torn) = &report.torn_tail {
            tracing::warn!(
                segment = %torn.segment.display(),
                position = torn.position,
                bytes = torn.bytes_removed,
                "cut a torn tail left by a crash"
            );
        }
        let mut log = PartitionLog {
            dir,
            config,
            segments,
            durable: LogPosition::default(),
            poisoned: None,
            report,
            generation: 0,
            resets: 0,
            reads: std::sync::atomic::AtomicU64::new(0),
            tail: TailCache::new(0, 0),
            damaged: Vec::new(),
        };
        log.durable = log.end();
        log.tail = TailCache::new(log.end().next_offset, log.config.tail_cache_bytes);
        log.trim_open_files();
        Ok(log)
    }

    /// Notes a read of segment `i`, then closes the least recently read sealed segments' files
    /// beyond `open_segments_max` (the active segment's stays open).
    fn touch(&self, i: usize) {
        let tick = self
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if let Some(seg) = self.segments.get(i) {
            seg.last_used
                .store(tick, std::sync::atomic::Ordering::Relaxed);
        }
        self.trim_open_files();
    }

    fn trim_open_files(&self) {
        let sealed = &self.segments[..self.segments.len().saturating_sub(1)];
        let mut open: Vec<&Segment> = sealed.iter().filter(|s| s.is_open()).collect();
        let max = self.config.open_segments_max;
        if open.len() <= max {
            return;
        }
        open.sort_by_key(|s| s.last_used.load(std::sync::atomic::Ordering::Relaxed));
        for seg in &open[..open.len() - max] {
            seg.close_file();
        }
    }

    /// The tail cache: the most recent record batches, readable without this log's lock.
    pub fn tail_cache(&self) -> TailCache {
        self.tail.clone()
    }

    /// Sealed segments whose data file is open now.
    pub fn open_segment_files(&self) -> usize {
        let sealed = &self.segments[..self.segments.len().saturating_sub(1)];
        sealed.iter().filter(|s| s.is_open()).count()
    }

    /// What opening the log found.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration in force.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    fn active(&self) -> &Segment {
        self.segments.last().expect("a log always has a segment")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .last_mut()
            .expect("a log always has a segment")
    }

    /// The position after the last written entry (durable or not).
    pub fn end(&self) -> LogPosition {
        let active = self.active();
        LogPosition {
            next_offset: active.next_offset,
            next_index: active.next_index,
        }
    }

    /// Whether a failed write or sync poisoned the log (it refuses appends and flushes until
    /// a reset, and what it holds past [`PartitionLog::durable`] is not to be trusted).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// The position after the last durable entry: everything before it survives a power loss.
    pub fn durable(&self) -> LogPosition {
        self.durable
    }

    /// The first retained offset.
    pub fn start_offset(&self) -> u64 {
        self.segments[0].base_offset
    }

    /// The Raft index of the first retained entry, or None when the log holds no entries.
    pub fn first_index(&self) -> Option<u64> {
        self.segments.iter().find_map(Segment::start_index)
    }

    /// Bytes of data on disk.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.data_len).sum()
    }

    /// Bytes of the entries after Raft index `index` (all of them for None), from the sparse
    /// index: an overestimate by at most one index interval. How far a replica that has entries
    /// through `index` is behind this log, in bytes.
    pub fn bytes_after_index(&self, index: Option<u64>) -> u64 {
        let Some(index) = index else {
            return self.size_bytes();
        };
        self.segments
            .iter()
            .map(|s| match s.first_index {
                Some(first) if first > index => s.data_len,
                Some(_) if s.next_index > index + 1 => {
                    s.data_len.saturating_sub(s.position_for_index(index + 1))
                }
                _ => 0,
            })
            .sum()
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Appends one batch as one entry. Its base offset and Raft index must continue the log (see
    /// [`PartitionLog::end`]). The batch is written but not durable: call [`PartitionLog::flush`]
    /// (once for many appends: that is group commit).
    pub fn append(&mut self, batch: &Batch) -> Result<Appended> {
        self.append_entry(std::slice::from_ref(batch))
    }

    /// Appends one entry made of several batches (publishes of several producers coalesced into
    /// one Raft entry): record batches sharing one Raft index and term, with dense offsets, the
    /// first continuing the log. Written as one frame, so a crash keeps all of it or none.
    pub fn append_entry(&mut self, batches: &[Batch]) -> Result<Appended> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned(reason.clone()));
        }
        segment::check_entry(batches).map_err(Error::InvalidEntry)?;
        let (first, last) = match (batches.first(), batches.last()) {
            (Some(first), Some(last)) => (*first.header(), *last.header()),
            _ => return Err(Error::InvalidEntry("an entry needs a batch".into())),
        };
        let size: u64 = batches.iter().map(|b| b.len() as u64).sum();
        if size > self.config.batch_bytes_max {
            return Err(Error::BatchTooLarge {
                size,
                max: self.config.batch_bytes_max,
            });
        }
        let end = self.end();
        if first.base_offset != end.next_offset || first.index != end.next_index {
            return Err(Error::OutOfOrder {
                expected_offset: end.next_offset,
                expected_index: end.next_index,
                offset: first.base_offset,
                index: first.index,
            });
        }
        if self.should_roll(batches)
            && let Err(error) = self.roll()
        {
            // A failed sync may have dropped pages whose error a retried sync would no longer
            // report (Linux reports a writeback error once): nothing more is trusted until the
            // log is opened again from its durable state, as after a failed flush.
            self.poisoned = Some(format!("a segment roll failed: {error}"));
            return Err(error);
        }
        let config = self.config.clone();
        match self.active_mut().append(batches, &config) {
            Ok(_) => {}
            Err(error) => {
                if let Error::Poisoned(reason) = &error {
                    self.poisoned = Some(reason.clone());
                }
                return Err(error);
            }
        }
        debug_assert_eq!(self.end().next_offset, last.next_offset());
        self.tail.appended(batches);
        Ok(Appended {
            base_offset: first.base_offset,
            next_offset: last.next_offset(),
            index: first.index,
        })
    }

    fn should_roll(&self, batches: &[Batch]) -> bool {
        let active = self.active();
        if !active.has_records() {
            // Base offsets name segments, so a segment must hold a record before the next starts.
            return false;
        }
        if active.data_len + segment::frame_len(batches) > self.config.segment_bytes_max {
            return true;
        }
        batches.iter().any(|batch| {
            let h = batch.header();
            h.kind == EntryKind::Records
                && h.record_count > 0
                && active.first_timestamp.is_some_and(|first| {
                    h.max_timestamp_ms.saturating_sub(first) >= self.config.segment_ms_max
                })
        })
    }

    /// For the writer about to append the entry `batches`: when that append would roll the
    /// active segment, the roll's work, to run without the log's lock (readers then never wait
    /// behind its syncs). Hand the outcome to [`PartitionLog::finish_roll`] before appending.
    /// None when no roll is due (the append then rolls by itself if it must).
    pub fn prepare_roll(&self, batches: &[Batch]) -> Result<Option<RollTicket>> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned(reason.clone()));
        }
        if !self.should_roll(batches) {
            return Ok(None);
        }
        let active = self.active();
        Ok(Some(RollTicket {
            file: active.sync_handle()?,
            path: active.path.clone(),
            dir: self.dir.clone(),
            sealed_base: active.base_offset,
            sealed_len: active.data_len,
            index_files: active.index_files(),
            next: self.end(),
            generation: self.generation,
            resets: self.resets,
            config: self.config.clone(),
        }))
    }

    /// Completes a roll prepared by [`PartitionLog::prepare_roll`]: the sealed segment is durable
    /// and the prepared one becomes active. When the log changed meanwhile (truncated, reset,
    /// written) the prepared segment is deleted and the next append rolls by itself. A failed
    /// roll poisons the log: after a failed fsync the page cache is not to be trusted.
    pub fn finish_roll(&mut self, ticket: RollTicket, outcome: Result<PreparedRoll>) -> Result<()> {
        let prepared = match outcome {
            Ok(prepared) => prepared,
            Err(_) if ticket.resets != self.resets => {
                // A reset replaced the log meanwhile (its failure may even come from the reset's
                // own fresh segment, made at the very path the roll wanted): nothing the roll
                // touched is part of the log now, and only index files it may have written for
                // the sealed segment, and the new segment's file should the roll have made it
                // before failing, are left to remove.
                ticket.remove_index_files()?;
                let made = self
                    .dir
                    .join(segment::data_file_name(ticket.next.next_offset));
                if !self.segments.iter().any(|s| s.path == made) {
                    segment::remove_files_of(&made)?;
                }
                return segment::sync_dir(&self.dir, &self.config);
            }
            Err(error) => {
                self.poisoned = Some(error.to_string());
                return Err(error);
            }
        };
        if let Some(reason) = &self.poisoned {
            // A sync of this log failed meanwhile (on another thread): nothing written becomes
            // durable by this roll's sync, which may have shared that file's reported error.
            let reason = reason.clone();
            self.drop_prepared(prepared)?;
            ticket.remove_index_files()?;
            segment::sync_dir(&self.dir, &self.config)?;
            return Err(Error::Poisoned(reason));
        }
        let unchanged = {
            let active = self.active();
            ticket.generation == self.generation
                && active.base_offset == ticket.sealed_base
                && active.data_len == ticket.sealed_len
                && self.end() == ticket.next
        };
        if !unchanged {
            self.drop_prepared(prepared)?;
            // The sealing wrote index files for the segment as it saw it, which no longer is
            // (the segment stays active, or is gone).
            ticket.remove_index_files()?;
            return segment::sync_dir(&self.dir, &self.config);
        }
        let active = self.active_mut();
        active.mark_synced(ticket.sealed_len);
        active.end_writes();
        // The sealed file ends at its data: its index files describe it so. The cut reaches
        // the disk with a later sync (or journal commit) of this filesystem; should a crash come
        // first, or the cut fail, the next open finds the padding by a scan (see
        // `Segment::scan`).
        if let Err(error) = active.trim() {
            tracing::warn!(segment = %active.path.display(), "could not cut a sealed segment's padding: {error}");
        }
        self.durable = ticket.next;
        self.segments.push(prepared.segment);
        // The segment sealed now keeps its file open: the least recently read beyond the bound
        // are closed (before, only reads closed them, and a log never read from its files
        // kept one open per segment).
        self.trim_open_files();
        Ok(())
    }

    /// Deletes a prepared segment that will not be used, unless a segment of the log has its
    /// file now: a reset to the same position meanwhile replaced that file with its own fresh
    /// segment, which must not be unlinked under it.
    /// Its file may be gone too: a second reset deleted the first one's segment, made at the
    /// same path.
    fn drop_prepared(&self, prepared: PreparedRoll) -> Result<()> {
        if self
            .segments
            .iter()
            .any(|s| s.path == prepared.segment.path)
        {
            return Ok(());
        }
        prepared.segment.remove_files()
    }

    /// Seals the active segment (synced, index files written) and starts a new one.
    fn roll(&mut self) -> Result<()> {
        let config = self.config.clone();
        let dir = self.dir.clone();
        let active = self.active_mut();
        active.end_writes();
        active.cut_padding(&config)?;
        active.sync(&config)?;
        active.write_index_files(&dir, &config)?;
        let (base, next_index) = (active.next_offset, active.next_index);
        self.durable = self.end();
        let segment = Segment::create(&dir, base, next_index, &config)?;
        self.segments.push(segment);
        self.trim_open_files();
        Ok(())
    }

    /// Changes the retention limits (a topic's configuration changed).
    pub fn set_retention(&mut self, retention_bytes: Option<u64>, retention_ms: Option<i64>) {
        self.config.retention_bytes = retention_bytes;
        self.config.retention_ms = retention_ms;
    }

    /// Changes the segment size limit (a topic's configuration changed): the next roll uses it.
    pub fn set_segment_bytes_max(&mut self, segment_bytes_max: u64) {
        if (4096..=u64::from(u32::MAX)).contains(&segment_bytes_max) {
            self.config.segment_bytes_max = segment_bytes_max;
        }
    }

    /// Makes everything written so far durable with one fdatasync and returns the durable position.
    pub fn flush(&mut self) -> Result<LogPosition> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned(reason.clone()));
        }
        let config = self.config.clone();
        if let Err(error) = self.active_mut().sync(&config) {
            // After a failed fsync the page cache state is unknown (fsyncgate): refuse to go on.
            self.poisoned = Some(error.to_string());
            return Err(error);
        }
        self.durable = self.end();
        Ok(self.durable)
    }

    /// Prepares a sync of everything written so far, to run on another thread; None when
    /// everything is already durable.
    pub fn begin_sync(&self) -> Result<Option<SyncTicket>> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned(reason.clone()));
        }
        let end = self.end();
        if end == self.durable {
            return Ok(None);
        }
        let active = self.active();
        Ok(Some(SyncTicket {
            file: active.sync_handle()?,
            path: active.path.clone(),
            segment_base: active.base_offset,
            len: active.data_len,
            position: end,
            generation: self.generation,
            config: self.config.clone(),
        }))
    }

    /// Takes the outcome of [`SyncTicket::sync`]. On success the ticket's position becomes durable
    /// (unless the log was truncated or reset meanwhile); on failure the log refuses further
    /// writes, because after a failed fsync the state of the page cache is unknown.
    pub fn complete_sync(
        &mut self,
        ticket: &SyncTicket,
        outcome: Result<()>,
    ) -> Result<LogPosition> {
        if let Err(error) = outcome {
            self.poisoned = Some(error.to_string());
            return Err(error);
        }
        if let Some(reason) = &self.poisoned {
            // Another sync of this log failed meanwhile: a file reports a writeback error to
            // one of its syncs only, so this one's success proves nothing.
            return Err(Error::Poisoned(reason.clone()));
        }
        if ticket.generation == self.generation {
            if let Some(seg) = self
                .segments
                .iter_mut()
                .find(|s| s.base_offset == ticket.segment_base)
            {
                seg.mark_synced(ticket.len);
            }
            if ticket.position.next_index > self.durable.next_index {
                self.durable = ticket.position;
            }
        }
        Ok(self.durable)
    }

    /// Reads record batches holding offsets from `from_offset` up to (not including)
    /// `limit_offset` (pass the commit offset, so nothing uncommitted is served). The first batch
    /// may start before `from_offset`; callers skip those records. Returns about `max_bytes` of
    /// batches, but always at least one when any qualifies. Every batch is CRC-checked first.
    pub fn read(
        &self,
        from_offset: u64,
        max_bytes: usize,
        limit_offset: u64,
    ) -> Result<Vec<Batch>> {
        let start = self.start_offset();
        let end = self.end().next_offset;
        if from_offset < start || from_offset > end {
            return Err(Error::OffsetOutOfRange {
                offset: from_offset,
                start,
                end,
            });
        }
        let limit = limit_offset.min(end);
        if from_offset >= limit {
            return Ok(Vec::new());
        }
        let first = self
            .segments
            .partition_point(|s| s.base_offset <= from_offset)
            - 1;
        self.read_segments(
            first,
            max_bytes,
            |seg| seg.position_for_offset(from_offset),
            |h| {
                if h.base_offset >= limit {
                    Visit::Stop
                } else if h.kind != EntryKind::Records || h.next_offset() <= from_offset {
                    Visit::Skip
                } else {
                    Visit::Take
                }
            },
        )
    }

    /// Reads from segment `first` on, each from `start(segment)`, until `visit` stops or about
    /// `max_bytes` are taken (at least one batch when any qualifies).
    fn read_segments(
        &self,
        first: usize,
        max_bytes: usize,
        start: impl Fn(&Segment) -> u64,
        mut visit: impl FnMut(&crate::codec::BatchHeader) -> Visit,
    ) -> Result<Vec<Batch>> {
        let mut out: Vec<Batch> = Vec::new();
        let mut budget = max_bytes.max(1);
        for (i, seg) in self.segments.iter().enumerate().skip(first) {
            let read = seg.read(start(seg), budget, out.is_empty(), &mut visit);
            self.touch(i);
            let (batches, how) = match read {
                Ok(read) => read,
                // Damage at the start of a later segment: return what was read; the next read,
                // which starts there, reports it.
                Err(Error::Corruption { .. }) if !out.is_empty() => break,
                Err(error) => return Err(error),
            };
            let bytes: usize = batches.iter().map(Batch::len).sum();
            out.extend(batches);
            budget = budget.saturating_sub(bytes);
            if how == ReadEnd::Stopped || budget == 0 {
                break;
            }
            if let Some((offset, index)) = seg.lost {
                // The segment's file ends before the next segment begins: what the read
                // wants next is lost (never skip to the next segment's entries).
                if out.is_empty() {
                    return Err(seg.corruption(
                        seg.data_len,
                        format!(
                            "the file ends here, before entries {index}..{} (offsets \
                             {offset}..{}) that the next segment follows: they were lost",
                            seg.next_index, seg.next_offset
                        ),
                    ));
                }
                break;
            }
        }
        Ok(out)
    }

    /// After a read of Raft index `index` failed with [`Error::Corruption`]: the damaged range
    /// that read ran into, bounded by the intact entries around it. Reads of entries after the
    /// range work from then on (the segment gets an index point where intact frames resume).
    /// None when the entries up to `index` read intact (a retry of the read succeeds).
    pub fn map_damage(&mut self, index: u64) -> Result<Option<DamagedRange>> {
        if let Some(known) = self
            .damaged
            .iter()
            .find(|r| r.first_index <= index && index < r.next_index)
        {
            return Ok(Some(known.clone()));
        }
        if index < self.first_index().unwrap_or(u64::MAX) || index >= self.end().next_index {
            return Ok(None);
        }
        let i = self
            .segments
            .partition_point(|s| s.start_index().is_some_and(|f| f <= index))
            .saturating_sub(1);
        let first_index = self.segments[i]
            .start_index()
            .unwrap_or(self.segments[i].next_index);
        let Some(found) = self.segments[i].map_damage(index, first_index)? else {
            return self.map_lost(i, index);
        };
        let following = self.segments.get(i + 1);
        let (next_index, next_offset, term_after) = match found.resumed {
            Some((index, offset, term)) => (index, offset, Some(term)),
            None => match following {
                Some(next) => (
                    next.first_index.unwrap_or(next.next_index),
                    next.base_offset,
                    None,
                ),
                None => (
                    self.segments[i].next_index.max(found.first_index + 1),
                    self.segments[i].next_offset.max(found.first_offset),
                    None,
                ),
            },
        };
        let range = DamagedRange {
            segment: self.segments[i].path.clone(),
            position: found.position,
            resumes_at: found.resumes_at,
            first_index: found.first_index,
            next_index: next_index.max(found.first_index + 1),
            first_offset: found.first_offset,
            next_offset: next_offset.max(found.first_offset),
            term: term_after.or(found.term_before),
            detail: found.detail,
        };
        tracing::error!(
            segment = %range.segment.display(),
            position = range.position,
            first_index = range.first_index,
            next_index = range.next_index,
            first_offset = range.first_offset,
            next_offset = range.next_offset,
            detail = %range.detail,
            "damaged entries in durable data; they are skipped and never served"
        );
        if self.damaged.len() < DAMAGED_RANGES_MAX {
            self.damaged.push(range.clone());
        }
        Ok(Some(range))
    }

    /// The entries segment `i` lost at its end (its file cut short), when `index` is one of
    /// them: the damaged range from where its frames end to the next segment's start.
    fn map_lost(&mut self, i: usize, index: u64) -> Result<Option<DamagedRange>> {
        let seg = &self.segments[i];
        let Some((first_offset, first_index)) = seg.lost else {
            return Ok(None);
        };
        if index < first_index || index >= seg.next_index {
            return Ok(None);
        }
        let (next_index, next_offset) = (seg.next_index, seg.next_offset);
        // The lost entries' terms are at most the next entry's.
        let term = match self.segments.get(i + 1) {
            Some(next) => next
                .read(0, 1, true, |_| Visit::Take)
                .ok()
                .and_then(|(batches, _)| batches.first().map(|b| b.header().term)),
            None => None,
        };
        let seg = &self.segments[i];
        let range = DamagedRange {
            segment: seg.path.clone(),
            position: seg.data_len,
            resumes_at: None,
            first_index,
            next_index,
            first_offset,
            next_offset,
            term,
            detail: format!(
                "the file ends at byte {}, before entries {first_index}..{next_index} \
                 (offsets {first_offset}..{next_offset}) that the next segment follows",
                seg.data_len
            ),
        };
        tracing::error!(
            segment = %range.segment.display(),
            position = range.position,
            first_index,
            next_index,
            first_offset,
            next_offset,
            "entries lost at the end of a segment cut short; they are skipped and never served"
        );
        if self.damaged.len() < DAMAGED_RANGES_MAX && !self.damaged.contains(&range) {
            self.damaged.push(range.clone());
        }
        Ok(Some(range))
    }

    /// The damaged ranges reads ran into so far.
    pub fn damaged_ranges(&self) -> &[DamagedRange] {
        &self.damaged
    }

    /// Repairs a damaged range with the same entries read from another replica: `entries` (the
    /// batches of each Raft index of `range.first_index .. range.next_index`, in order) are
    /// written as frames over the damaged bytes, which they must fill exactly (replicas store the
    /// leader's entries unchanged, so the same entries make frames of the same sizes), then
    /// synced; the range is then forgotten and reads go through it again. Only a range that
    /// intact frames follow (in the same segment, or a sealed segment's end) can be repaired.
    /// Err, with nothing written, when the entries do not fit the range.
    pub fn repair(&mut self, range: &DamagedRange, entries: &[Vec<Batch>]) -> Result<()> {
        let invalid = |why: String| {
            Error::InvalidEntry(format!(
                "cannot repair entries {}..{} of {}: {why}",
                range.first_index,
                range.next_index,
                range.segment.display()
            ))
        };
        let wanted = range.next_index.saturating_sub(range.first_index);
        if entries.len() as u64 != wanted {
            return Err(invalid(format!(
                "{} entries given, {wanted} needed",
                entries.len()
            )));
        }
        let mut next_offset = range.first_offset;
        for (i, batches) in entries.iter().enumerate() {
            segment::check_entry(batches).map_err(invalid)?;
            for batch in batches {
                let h = batch.header();
                if h.index != range.first_index + i as u64 {
                    return Err(invalid(format!(
                        "entry {i} has Raft index {}, not {}",
                        h.index,
                        range.first_index + i as u64
                    )));
                }
                if h.kind == EntryKind::Records {
                    if h.base_offset != next_offset {
                        return Err(invalid(format!(
                            "entry {} starts at offset {}, not {next_offset}",
                            h.index, h.base_offset
                        )));
                    }
                    next_offset = h.next_offset();
                }
            }
        }
        if next_offset != range.next_offset {
            return Err(invalid(format!(
                "the entries end at offset {next_offset}, the range at {}",
                range.next_offset
            )));
        }
        let i = self
            .segments
            .iter()
            .position(|s| s.path == range.segment)
            .ok_or_else(|| invalid("the segment is gone".into()))?;
        let sealed = i + 1 < self.segments.len();
        let lost_end = range.resumes_at.is_none()
            && sealed
            && self.segments[i].lost.is_some()
            && range.next_index == self.segments[i].next_index;
        let end = match range.resumes_at {
            Some(at) => at,
            // The entries lost at the end of a file cut short: written back in full, however
            // long the file is now.
            None if lost_end => {
                range.position + entries.iter().map(|b| segment::frame_len(b)).sum::<u64>()
            }
            None if sealed => self.segments[i].data_len,
            None => {
                return Err(invalid(
                    "no intact frame follows it in the active segment".into(),
                ));
            }
        };
        let mut bytes = Vec::with_capacity(end.saturating_sub(range.position) as usize);
        for batches in entries {
            // The bytes before the damage were durable long ago.
            bytes.extend_from_slice(&segment::frame_header(range.position, batches));
            for batch in batches {
                bytes.extend_from_slice(batch.bytes());
            }
        }
        if bytes.len() as u64 != end - range.position {
            return Err(invalid(format!(
                "the entries make {} bytes of frames, the damage spans {}",
                bytes.len(),
                end - range.position
            )));
        }
        let segment = &mut self.segments[i];
        // A direct writer's copy of the last block may hold the damaged bytes: read it again.
        segment.forget_tail();
        let file = segment.file()?;
        use std::os::unix::fs::FileExt;
        file.write_all_at(&bytes, range.position)
            .io("repair", &segment.path)?;
        if lost_end {
            // Whatever followed the damage in the file is gone too: the file ends with the
            // entries written back.
            file.set_len(end).io("cut after repair", &segment.path)?;
        }
        file.sync_data().io("sync", &segment.path)?;
        if lost_end {
            segment.repaired_lost(range.position, entries, self.config.index_interval_bytes);
            segment.write_index_files(&self.dir, &self.config)?;
        }
        segment::notify(&self.config, &segment.path, segment.data_len);
        self.damaged.retain(|d| d != range);
        Ok(())
    }

    /// Reads entries (records and control) with Raft indexes in `from_index .. until_index`, up to
    /// about `max_bytes` (at least one entry). For the Raft log store.
    pub fn read_entries(
        &self,
        from_index: u64,
        until_index: u64,
        max_bytes: usize,
    ) -> Result<Vec<Batch>> {
        let end = self.end().next_index;
        let until = until_index.min(end);
        if from_index >= until {
            return Ok(Vec::new());
        }
        let start = self.first_index().unwrap_or(end);
        if from_index < start {
            return Err(Error::OffsetOutOfRange {
                offset: from_index,
                start,
                end,
            });
        }
        let first = self
            .segments
            .partition_point(|s| s.start_index().is_some_and(|f| f <= from_index))
            .saturating_sub(1);
        self.read_segments(
            first,
            max_bytes,
            |seg| seg.position_for_index(from_index),
            |h| {
                if h.index >= until {
                    Visit::Stop
                } else if h.index < from_index {
                    Visit::Skip
                } else {
                    Visit::Take
                }
            },
        )
    }

    /// The first offset below `limit_offset` whose record timestamp is at or after
    /// `timestamp_ms`, or None when there is no such record.
    pub fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
        limit_offset: u64,
    ) -> Result<Option<u64>> {
        for (i, seg) in self.segments.iter().enumerate() {
            if seg.max_timestamp < timestamp_ms {
                continue;
            }
            let position = seg.position_for_timestamp(timestamp_ms);
            self.touch(i);
            let (batches, _) = seg.read(position, 1, true, |h| {
                if h.base_offset >= limit_offset {
                    Visit::Stop
                } else if h.kind != EntryKind::Records
                    || h.record_count == 0
                    || h.max_timestamp_ms < timestamp_ms
                {
                    Visit::Skip
                } else {
                    Visit::Take
                }
            })?;
            let Some(batch) = batches.first() else {
                return Ok(None);
            };
            return Ok(batch
                .records()
                .find(|r| r.timestamp_ms >= timestamp_ms && r.offset < limit_offset)
                .map(|r| r.offset));
        }
        Ok(None)
    }

    /// Removes every entry with Raft index `index` or later (Raft conflict resolution). Durable on
    /// return. When `index` falls inside a damaged range, the cut is at the range's first entry
    /// (there is no frame boundary inside damage): the log then ends before `index`, and the
    /// caller must take the entries from there again.
    pub fn truncate_from_index(&mut self, index: u64) -> Result<()> {
        let end = self.end();
        if index >= end.next_index {
            return Ok(());
        }
        let start = self.first_index().unwrap_or(end.next_index);
        if index < start {
            return Err(Error::OffsetOutOfRange {
                offset: index,
                start,
                end: end.next_index,
            });
        }
        let keep = self
            .segments
            .partition_point(|s| s.start_index().is_some_and(|f| f <= index))
            .max(1)
            - 1;
        // The walk to `index`'s frame may run into damaged frames before it (a replica whose
        // data was damaged, repaired later from another copy): map each (which adds an index
        // point where intact frames resume) and walk again. A cut at or inside a damaged range
        // cuts at the damage's start (inside it there is no frame boundary to cut at): the
        // log then ends at the range's first entry, before `index`.
        let mut attempts = 0;
        // Where the log ends after the cut, and the base offset of the entry there.
        let mut cut_index = index;
        let mut cut_offset = None;
        let position = loop {
            match self.segments[keep].frame_position_of_index(index) {
                // Inside the entries a segment cut short at a frame boundary lost: the log ends
                // where its frames do. (Cut inside a frame, the walk ran into the partial frame
                // and the cut is at the damage's start, below.)
                Ok(None) => {
                    if let Some((offset, first_lost)) = self.segments[keep].lost
                        && index >= first_lost
                    {
                        cut_index = first_lost;
                        cut_offset = Some(offset);
                        break Some(self.segments[keep].data_len);
                    }
                    break None;
                }
                Err(error @ Error::Corruption { .. }) => {
                    attempts += 1;
                    let range = match self.map_damage(index)? {
                        Some(range) if attempts <= DAMAGED_RANGES_MAX => range,
                        _ => return Err(error),
                    };
                    if index < range.next_index {
                        if range.segment != self.segments[keep].path {
                            return Err(error);
                        }
                        cut_index = range.first_index;
                        cut_offset = Some(range.first_offset);
                        break Some(range.position);
                    }
                }
                other => break other?,
            }
        }
        .ok_or_else(|| {
            self.segments[keep].corruption(0, format!("entry {index} missing from its segment"))
        })?;
        if cut_offset.is_none() {
            cut_offset = self
                .read_entries(index, index + 1, 1)?
                .first()
                .map(|b| b.header().base_offset);
        }
        self.generation += 1;
        let removed: Vec<Segment> = self.segments.drain(keep + 1..).collect();
        let deleted = !removed.is_empty();
        for seg in removed.into_iter().rev() {
            seg.delete()?;
        }
        if deleted {
            // The later segments' removal is durable before the cut: a crash can never leave
            // the cut segment followed by later ones (a log with a hole). Not every filesystem
            // orders an unlink before a later fsync of another file.
            segment::sync_dir(&self.dir, &self.config)?;
        }
        let config = self.config.clone();
        let seg = &mut self.segments[keep];
        seg.remove_index_files()?;
        seg.truncate(position, &config)?;
        // A damaged frame just before the cut ends the segment's scan early: the cut point,
        // not the scan, says where the log ends.
        if let Some(offset) = cut_offset
            && seg.next_index < cut_index
        {
            seg.next_index = cut_index;
            seg.next_offset = offset;
        }
        segment::sync_dir(&self.dir, &self.config)?;
        let end = self.end();
        debug_assert_eq!(end.next_index, cut_index);
        self.tail.truncated(cut_index, end.next_offset);
        self.damaged.retain(|r| r.next_index <= cut_index);
        self.durable = LogPosition {
            next_offset: self.durable.next_offset.min(end.next_offset),
            next_index: self.durable.next_index.min(end.next_index),
        };
        Ok(())
    }

    /// Deletes leading segments whose records all lie below `offset`. The active segment is never
    /// deleted, so the log may keep some records below `offset`.
    pub fn purge_before_offset(&mut self, offset: u64) -> Result<PurgeReport> {
        let count = self.segments[1..]
            .iter()
            .take_while(|next| next.base_offset <= offset)
            .count();
        let (report, removal) = self.delete_head(count)?;
        removal.run()?;
        Ok(report)
    }

    /// Deletes leading segments whose entries all have Raft index `index` or lower (after a
    /// snapshot covers them). The active segment is never deleted.
    pub fn purge_through_index(&mut self, index: u64) -> Result<PurgeReport> {
        let (report, removal) = self.purge_through_index_later(index)?;
        removal.run()?;
        Ok(report)
    }

    /// [`PartitionLog::purge_through_index`], leaving the deletion of the segments' files to the
    /// returned [`SegmentRemoval`], for the caller to run once it has let go of the log. The log
    /// starts after the purged entries (durably) when this returns.
    pub fn purge_through_index_later(
        &mut self,
        index: u64,
    ) -> Result<(PurgeReport, SegmentRemoval)> {
        let count = self.segments[..self.segments.len() - 1]
            .iter()
            .take_while(|s| s.next_index <= index + 1)
            .count();
        self.delete_head(count)
    }

    /// The Raft index of the last entry that retention (`retention_bytes`, `retention_ms` at time
    /// `now_ms`) would delete, or None when it would delete nothing. Retention deletes whole
    /// sealed segments, oldest first: those the log can do without and still hold at least
    /// `retention_bytes`, and those whose newest record is older than `now_ms - retention_ms`.
    /// Deciding deletes nothing: under Raft, the layer above first makes a snapshot cover the
    /// point, then purges through it ([`PartitionLog::purge_through_index`]).
    pub fn retention_point(&self, now_ms: i64) -> Option<u64> {
        let mut point = None;
        let mut remaining = self.size_bytes();
        for seg in &self.segments[..self.segments.len() - 1] {
            let by_size = self
                .config
                .retention_bytes
                .is_some_and(|max| remaining - seg.data_len >= max);
            let by_age = self.config.retention_ms.is_some_and(|ms| {
                seg.has_records() && seg.max_timestamp < now_ms.saturating_sub(ms)
            });
            if !(by_size || by_age) {
                break;
            }
            remaining -= seg.data_len;
            if !seg.is_empty() {
                point = Some(seg.next_index - 1);
            }
        }
        point
    }

    /// Applies retention at time `now_ms` directly (for a log without Raft above it): deletes
    /// the segments [`PartitionLog::retention_point`] names.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<PurgeReport> {
        match self.retention_point(now_ms) {
            Some(index) => self.purge_through_index(index),
            None => Ok(PurgeReport {
                start_offset: self.start_offset(),
                ..PurgeReport::default()
            }),
        }
    }

    /// Takes the first `count` segments out of the log, after recording the new start durably;
    /// their files are deleted by the returned removal.
    fn delete_head(&mut self, count: usize) -> Result<(PurgeReport, SegmentRemoval)> {
        let mut report = PurgeReport {
            start_offset: self.start_offset(),
            ..PurgeReport::default()
        };
        let mut removal = SegmentRemoval {
            dir: self.dir.clone(),
            config: self.config.clone(),
            segments: Vec::new(),
        };
        if count == 0 {
            return Ok((report, removal));
        }
        // Record the new start first, so a crash part-way never leaves an empty first segment
        // without its Raft index.
        let new_first = &self.segments[count];
        let start = LogPosition {
            next_offset: new_first.base_offset,
            next_index: new_first.start_index().unwrap_or(new_first.next_index),
        };
        write_log_meta(&self.dir, start, &self.config)?;
        for mut seg in self.segments.drain(..count) {
            report.segments_deleted += 1;
            report.bytes_deleted += seg.data_len;
            // Out of the way under the lock: the index files go, and the data file takes a
            // name no segment ever has, so the removal, which may run much later, cannot meet
            // a new file of the same name.
            seg.remove_index_files()?;
            let purged = seg.path.with_file_name(format!(
                "{}{PURGED_SUFFIX}",
                segment::data_file_name(seg.base_offset)
            ));
            fs::rename(&seg.path, &purged).io("rename purged segment", &seg.path)?;
            seg.path = purged;
            removal.segments.push(seg);
        }
        self.tail.purged(self.start_offset());
        let first = self.first_index().unwrap_or(self.end().next_index);
        self.damaged.retain(|r| r.next_index > first);
        report.start_offset = self.start_offset();
        Ok((report, removal))
    }

    /// Deletes everything and restarts the log empty at `next` (installing a snapshot, or
    /// discarding every entry). A crash at any point leaves a log that opens whole: either a
    /// prefix of the old one (the entries it lost were being discarded anyway) or the empty log
    /// at `next`. So the segments from `next`'s offset on go first, newest first, and that is
    /// made durable; then the new start is recorded; then the fresh segment is made and the
    /// segments before it go (an open that finds the start recorded deletes every segment
    /// before it, and makes the segment at the start when it is missing). A failure part-way
    /// poisons the log until a reset succeeds.
    pub fn reset(&mut self, next: LogPosition) -> Result<()> {
        self.generation += 1;
        self.resets += 1;
        self.tail.reset(next.next_offset);
        self.damaged.clear();
        let fresh = match self.reset_files(next) {
            Ok(fresh) => fresh,
            Err(error) => {
                self.poisoned = Some(format!("a reset of the log failed part-way: {error}"));
                return Err(error);
            }
        };
        // The old segments' files are gone: dropped, not deleted again.
        self.segments = vec![fresh];
        self.durable = next;
        self.poisoned = None;
        Ok(())
    }

    /// The file steps of [`PartitionLog::reset`], in their crash-safe order; the fresh segment.
    fn reset_files(&self, next: LogPosition) -> Result<Segment> {
        for seg in self
            .segments
            .iter()
            .rev()
            .filter(|s| s.base_offset >= next.next_offset)
        {
            seg.remove_files()?;
        }
        segment::sync_dir(&self.dir, &self.config)?;
        write_log_meta(&self.dir, next, &self.config)?;
        let fresh = Segment::create_or_replace(&self.dir, next, &self.config)?;
        for seg in self
            .segments
            .iter()
            .filter(|s| s.base_offset < next.next_offset)
        {
            seg.remove_files()?;
        }
        segment::sync_dir(&self.dir, &self.config)?;
        Ok(fresh)
    }

    /// After a failed write or fsync: removes every entry that was not made durable (the page
    /// cache may hold bytes that never reached the disk, or lost ones that seem written) and
    /// syncs the cut. Nothing unsynced was acknowledged under fsync-before-ack.
    pub fn discard_unsynced(&mut self) -> Result<()> {
        let durable = self.durable;
        if self.end().next_index > durable.next_index {
            self.truncate_from_index(durable.next_index)?;
        }
        Ok(())
    }

    /// Syncs everything and writes the tail's index files, so the next open needs no scan (a
    /// clean shutdown). Appends may continue afterwards: the next open sees the index files no
    /// longer describe the grown tail and scans it.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.flush()?;
        let config = self.config.clone();
        self.active_mut().cut_padding(&config)?;
        self.active().write_index_files(&self.dir, &config)
    }

    /// [`PartitionLog::checkpoint`], then closes the log.
    pub fn close(mut self) -> Result<()> {
        self.checkpoint()
    }
}

impl Segment {
    /// A new empty segment at `next`, replacing any file of the same name.
    fn create_or_replace(dir: &Path, next: LogPosition, config: &LogConfig) -> Result<Segment> {
        let path = dir.join(segment::data_file_name(next.next_offset));
        if path.exists() {
            let old = Segment::open(path.clone(), next.next_offset)?;
            old.delete()?;
        }
        Segment::create(dir, next.next_offset, next.next_index, config)
    }
}

fn write_log_meta(dir: &Path, start: LogPosition, config: &LogConfig) -> Result<()> {
    let mut bytes = Vec::with_capacity(36);
    bytes.extend_from_slice(&LOG_META_MAGIC);
    bytes.extend_from_slice(&LOG_META_VERSION.to_le_bytes());
    bytes.extend_from_slice(&start.next_offset.to_le_bytes());
    bytes.extend_from_slice(&start.next_index.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let path = dir.join(LOG_META_FILE);
    let tmp = dir.join(format!("{LOG_META_FILE}.tmp"));
    fs::write(&tmp, &bytes).io("write", &tmp)?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .io("fsync", &tmp)?;
    fs::rename(&tmp, &path).io("rename", &path)?;
    segment::notify_replaced(config, &path, bytes.len() as u64);
    segment::sync_dir(dir, config)
}

fn read_log_meta(dir: &Path) -> Result<Option<LogPosition>> {
    let path = dir.join(LOG_META_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).io("read", &path),
    };
    let valid = bytes.len() == 32
        && bytes[..8] == LOG_META_MAGIC
        && le_u32(&bytes[8..12]) == LOG_META_VERSION
        && crc32fast::hash(&bytes[..28]) == le_u32(&bytes[28..32]);
    if !valid {
        return Err(Error::Corruption {
            segment: path,
            position: 0,
            detail: "log.meta fails its checks".into(),
        });
    }
    Ok(Some(LogPosition {
        next_offset: le_u64(&bytes[12..20]),
        next_index: le_u64(&bytes[20..28]),
    }))
}
