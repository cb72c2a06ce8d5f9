//! One segment: a data file of frames, and its sparse offset index and time index.
//!
//! A frame is one Raft entry: a 16-byte frame header followed by one encoded batch, or (frame
//! version 2) a 24-byte header that also counts the batches and their bytes, followed by several
//! batches of one entry (publishes of several producers coalesced into one entry). The frame
//! header holds a CRC over itself and the first batch's CRC and length (so every byte of the file
//! is covered by a CRC), a magic
//! number (so recovery can find the next frame after a damaged one), and `synced_len`: how many bytes
//! of this segment were durable when the frame was written. That last field is what lets recovery
//! tell a torn tail (bytes that were never synced: truncate) from corruption of durable data (report,
//! never truncate): a damaged frame followed by a valid frame whose `synced_len` lies beyond it was
//! on disk before that later frame was written.
//!
//! Index files are derived data, written whole when a segment is sealed or the log is closed, with a
//! CRC; a missing, stale or damaged index is rebuilt by scanning the data file.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::codec::{BATCH_LEN_LIMIT, Batch, BatchHeader, EntryKind, le_u32, le_u64};
use crate::config::LogConfig;
use crate::error::{Error, IoContext, Result};

/// Bytes of the frame header that precedes a one-batch entry in a data file (frame version 1).
pub const FRAME_HEADER_LEN: usize = 16;
/// Bytes of the frame header of an entry of several batches (frame version 2).
pub(crate) const MULTI_FRAME_HEADER_LEN: usize = 24;
const FRAME_MAGIC: [u8; 4] = *b"WFR1";
const MULTI_FRAME_MAGIC: [u8; 4] = *b"WFR2";
/// Bytes read to check a frame header: the longest header plus the part of the first batch the
/// frame CRC covers. Every valid frame is longer (a batch alone is at least 80 bytes).
const FRAME_PROBE_LEN: usize = MULTI_FRAME_HEADER_LEN + 8;
const INDEX_MAGIC: [u8; 8] = *b"WFTIDX01";
const TIME_INDEX_MAGIC: [u8; 8] = *b"WFTTIX01";
const INDEX_VERSION: u32 = 1;
const INDEX_HEADER_LEN: usize = 80;
const INDEX_ENTRY_LEN: usize = 24;
const TIME_INDEX_HEADER_LEN: usize = 24;
const TIME_INDEX_ENTRY_LEN: usize = 16;
/// Reads from data files are done in chunks of at least this size.
const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Direct (`O_DIRECT`) writes cover whole blocks of this size, at offsets and from buffers
/// aligned to it (4 KiB: the page size, and a multiple of every device's logical block).
pub(crate) const DIRECT_BLOCK: u64 = 4096;
/// A writing thread keeps its direct-write buffer for the next append up to this size.
const DIRECT_SCRATCH_KEPT_MAX: usize = 2 * 1024 * 1024;

thread_local! {
    /// The buffer a thread assembles direct writes in: reused, so an append touches no fresh
    /// memory (a new buffer per append would page-fault its way in).
    static DIRECT_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub(crate) fn data_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.log")
}

pub(crate) fn parse_data_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

/// Bytes of the frame header for an entry of `batches` batches.
fn header_len(batches: usize) -> usize {
    if batches == 1 {
        FRAME_HEADER_LEN
    } else {
        MULTI_FRAME_HEADER_LEN
    }
}

/// Bytes of the frame that stores `batches` (one Raft entry).
pub(crate) fn frame_len(batches: &[Batch]) -> u64 {
    (header_len(batches.len()) + batches.iter().map(Batch::len).sum::<usize>()) as u64
}

/// The frame header for `batches` (one Raft entry) written into a segment whose first
/// `synced_len` bytes are durable. One batch: version 1 (16 bytes); several: version 2 (24 bytes,
/// with the batch count and the entry's length).
pub(crate) fn frame_header(synced_len: u64, batches: &[Batch]) -> Vec<u8> {
    let len = header_len(batches.len());
    let mut header = vec![0u8; len];
    if batches.len() == 1 {
        header[4..8].copy_from_slice(&FRAME_MAGIC);
    } else {
        header[4..8].copy_from_slice(&MULTI_FRAME_MAGIC);
        header[16..20].copy_from_slice(&(batches.len() as u32).to_le_bytes());
        let entry_len: usize = batches.iter().map(Batch::len).sum();
        header[20..24].copy_from_slice(&u32::try_from(entry_len).unwrap_or(u32::MAX).to_le_bytes());
    }
    header[8..16].copy_from_slice(&synced_len.to_le_bytes());
    let first = batches.first().map_or(&[0u8; 8][..], |b| &b.bytes()[..8]);
    let crc = frame_crc(&header, first);
    header[0..4].copy_from_slice(&crc.to_le_bytes());
    header
}

fn frame_crc(header: &[u8], batch_prefix: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[4..]);
    hasher.update(batch_prefix);
    hasher.finalize()
}

/// Checks that `batches` can form one entry: one control batch alone, or record batches of one
/// Raft index and term with dense offsets.
pub(crate) fn check_entry(batches: &[Batch]) -> std::result::Result<(), String> {
    let Some(first) = batches.first() else {
        return Err("an entry needs a batch".into());
    };
    if batches.len() == 1 {
        return Ok(());
    }
    let h = first.header();
    let mut next = h.base_offset;
    for b in batches {
        let b = b.header();
        if b.kind != EntryKind::Records {
            return Err("a control batch is an entry of its own".into());
        }
        if b.index != h.index || b.term != h.term {
            return Err(format!(
                "batches of one entry carry different Raft positions ({}/{} and {}/{})",
                h.term, h.index, b.term, b.index
            ));
        }
        if b.base_offset != next {
            return Err(format!(
                "batches of one entry are not dense (offset {} after {next})",
                b.base_offset
            ));
        }
        next = b.next_offset();
    }
    Ok(())
}

/// A sparse index point: the frame at `position` starts the batch with `offset` and Raft `index`;
/// `max_ts_before` is the largest record timestamp of the segment before that frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) offset: u64,
    pub(crate) index: u64,
    pub(crate) position: u64,
    pub(crate) max_ts_before: i64,
}

/// Damage met by [`Segment::map_damage`]: where it is, the first entry it holds (by the intact
/// frames before it), and the first intact frame after it in the same file, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentDamage {
    pub(crate) position: u64,
    pub(crate) resumes_at: Option<u64>,
    pub(crate) first_index: u64,
    pub(crate) first_offset: u64,
    /// (Raft index, offset, term) of the frame where intact data resumes.
    pub(crate) resumed: Option<(u64, u64, u64)>,
    /// Term of the last intact entry before the damage.
    pub(crate) term_before: Option<u64>,
    pub(crate) detail: String,
}

/// A damaged range of a data file found by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    pub(crate) position: u64,
    /// Where valid frames resume, if they do.
    pub(crate) resumes_at: Option<u64>,
    pub(crate) detail: String,
}

/// How a scan treats a damaged frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanMode {
    /// A sealed segment: everything was synced, so damage is corruption; skip past it. Zeros
    /// after its last frame are the padding of direct writes (a roll's cut of it did not reach
    /// the disk) only when its frames end where the next segment begins (`successor_base`, its
    /// base offset; None: no next segment to check against): otherwise they are frames lost to
    /// zeros, which is damage.
    Sealed { successor_base: Option<u64> },
    /// The tail segment after a crash: damage that no later frame proves durable is a torn tail.
    Tail,
}

/// What a scan found.
#[derive(Debug, Default)]
pub(crate) struct ScanReport {
    pub(crate) damage: Vec<Damage>,
    /// Tail mode: position of the torn tail (the file should be cut here), if any.
    pub(crate) torn_at: Option<u64>,
    /// Where the zero padding of a direct write begins (the file should be cut there; nothing
    /// was lost), if the file ends in such padding.
    pub(crate) padding_at: Option<u64>,
}

/// The outcome of checking the frame at one position.
enum Frame {
    Valid {
        /// The entry's batches, in offset order.
        batches: Vec<Batch>,
        synced_len: u64,
        /// Bytes of the whole frame.
        len: u64,
    },
    /// Not a valid frame: why.
    Invalid(String),
}

/// A read buffer over a data file that hands out zero-copy slices.
struct Window<'a> {
    file: &'a File,
    path: &'a Path,
    start: u64,
    buf: Bytes,
    end: u64,
    chunk: usize,
}

impl<'a> Window<'a> {
    fn new(file: &'a File, path: &'a Path, end: u64, chunk: usize) -> Self {
        Window {
            file,
            path,
            start: 0,
            buf: Bytes::new(),
            end,
            chunk: chunk.max(READ_CHUNK_BYTES),
        }
    }

    /// `len` bytes at `pos`, or None when they extend past the end.
    fn slice(&mut self, pos: u64, len: usize) -> Result<Option<Bytes>> {
        let Some(stop) = pos.checked_add(len as u64) else {
            return Ok(None);
        };
        if stop > self.end {
            return Ok(None);
        }
        if pos < self.start || stop > self.start + self.buf.len() as u64 {
            let want = (self.end - pos).min(len.max(self.chunk) as u64) as usize;
            let mut buf = BytesMut::zeroed(want);
            self.file
                .read_exact_at(&mut buf, pos)
                .io("read", self.path)?;
            self.start = pos;
            self.buf = buf.freeze();
        }
        let from = (pos - self.start) as usize;
        Ok(Some(self.buf.slice(from..from + len)))
    }

    /// The format version of the intact batch that begins the frame at `pos`, when it is one
    /// this build does not read: the frame's CRC and the batch's CRC both hold (what a newer
    /// build wrote), only the version differs. None for anything else (damage among them).
    fn newer_format(&mut self, pos: u64) -> Result<Option<u8>> {
        if crate::codec::crc_check_skipped() {
            return Ok(None);
        }
        let Some(probe) = self.slice(pos, FRAME_PROBE_LEN)? else {
            return Ok(None);
        };
        let header_len = if probe[4..8] == FRAME_MAGIC {
            FRAME_HEADER_LEN
        } else if probe[4..8] == MULTI_FRAME_MAGIC {
            MULTI_FRAME_HEADER_LEN
        } else {
            return Ok(None);
        };
        let stored = le_u32(&probe[0..4]);
        if stored != frame_crc(&probe[..header_len], &probe[header_len..header_len + 8]) {
            return Ok(None);
        }
        // (A batch begins with its CRC, then its length; the CRC covers what follows it.)
        let len = le_u32(&probe[header_len + 4..header_len + 8]) as usize;
        if !(crate::BATCH_HEADER_LEN..=BATCH_LEN_LIMIT).contains(&len) {
            return Ok(None);
        }
        let Some(batch) = self.slice(pos + header_len as u64, len)? else {
            return Ok(None);
        };
        let intact = le_u32(&batch[0..4]) == crc32fast::hash(&batch[4..]);
        let version = batch[8];
        Ok((intact && version != crate::codec::FORMAT_VERSION).then_some(version))
    }

    /// Whether the file holds only zeros from `pos` to its end, which is the end of a block and
    /// less than a block away: the padding of a direct write (see [`Writes::Direct`]).
    fn is_padding(&mut self, pos: u64) -> Result<bool> {
        let left = self.end.saturating_sub(pos);
        if left == 0 || left >= DIRECT_BLOCK || !self.end.is_multiple_of(DIRECT_BLOCK) {
            return Ok(false);
        }
        Ok(self
            .slice(pos, left as usize)?
            .is_some_and(|rest| rest.iter().all(|&b| b == 0)))
    }

    /// Checks the frame at `pos`: frame header, frame CRC, lengths, every batch's CRC and
    /// contents, and that the batches form one entry. Lengths are checked against the format's
    /// limit, never against a configured maximum: a maximum can be lowered after larger batches
    /// were stored, and those must still read.
    fn frame(&mut self, pos: u64) -> Result<Frame> {
        let Some(probe) = self.slice(pos, FRAME_PROBE_LEN)? else {
            return Ok(Frame::Invalid(format!(
                "frame header cut short ({} bytes left)",
                self.end.saturating_sub(pos)
            )));
        };
        let (header_len, count, entry_len) = if probe[4..8] == FRAME_MAGIC {
            let len = u64::from(le_u32(&probe[FRAME_HEADER_LEN + 4..FRAME_HEADER_LEN + 8]));
            (FRAME_HEADER_LEN, 1u64, len)
        } else if probe[4..8] == MULTI_FRAME_MAGIC {
            (
                MULTI_FRAME_HEADER_LEN,
                u64::from(le_u32(&probe[16..20])),
                u64::from(le_u32(&probe[20..24])),
            )
        } else {
            return Ok(Frame::Invalid("bad frame magic".into()));
        };
        let stored = le_u32(&probe[0..4]);
        let computed = frame_crc(&probe[..header_len], &probe[header_len..header_len + 8]);
        if stored != computed {
            return Ok(Frame::Invalid(format!(
                "frame CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let synced_len = le_u64(&probe[8..16]);
        if synced_len > pos {
            // A frame records how much of the file was durable when it was written, which is
            // never past where it was written: this one was not written here (the bytes of a
            // frame inside a record found by a search past damage).
            return Ok(Frame::Invalid(format!(
                "a frame at byte {pos} says {synced_len} bytes were durable before it"
            )));
        }
        let batch_min = crate::BATCH_HEADER_LEN as u64;
        if entry_len < batch_min
            || entry_len > BATCH_LEN_LIMIT as u64
            || count == 0
            || count > entry_len / batch_min
        {
            return Ok(Frame::Invalid(format!(
                "impossible entry of {count} batches in {entry_len} bytes"
            )));
        }
        let Some(bytes) = self.slice(pos + header_len as u64, entry_len as usize)? else {
            return Ok(Frame::Invalid(format!(
                "entry of {entry_len} bytes cut short by the end of the file"
            )));
        };
        let mut batches = Vec::with_capacity(count as usize);
        let mut at = 0usize;
        for _ in 0..count {
            let len = Batch::peek_len(&bytes[at..]).unwrap_or(0);
            if len < crate::BATCH_HEADER_LEN || at + len > bytes.len() {
                return Ok(Frame::Invalid(format!(
                    "batch of {len} bytes at byte {at} does not fit the entry"
                )));
            }
            match Batch::decode(bytes.slice(at..at + len)) {
                Ok(batch) => batches.push(batch),
                Err(error) => return Ok(Frame::Invalid(error.to_string())),
            }
            at += len;
        }
        if at != bytes.len() {
            return Ok(Frame::Invalid(format!(
                "{} bytes after the entry's last batch",
                bytes.len() - at
            )));
        }
        if let Err(detail) = check_entry(&batches) {
            return Ok(Frame::Invalid(detail));
        }
        Ok(Frame::Valid {
            batches,
            synced_len,
            len: header_len as u64 + entry_len,
        })
    }
}

/// One segment of a partition log.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: u64,
    pub(crate) path: PathBuf,
    /// The data file, opened on demand and closed again when the log keeps too many open (see
    /// `LogConfig::open_segments_max`); the active segment's stays open.
    file: Mutex<Option<Arc<File>>>,
    /// When the file was last used (a counter of the log's reads), to close the least recent.
    pub(crate) last_used: AtomicU64,
    pub(crate) entries: Vec<IndexEntry>,
    pub(crate) next_offset: u64,
    /// Raft index of the first entry; None while the segment is empty.
    pub(crate) first_index: Option<u64>,
    pub(crate) next_index: u64,
    pub(crate) data_len: u64,
    /// Bytes of the data file known to be durable.
    pub(crate) synced_len: u64,
    /// Timestamp of the first record, for rolling by age.
    pub(crate) first_timestamp: Option<i64>,
    /// Largest record timestamp; i64::MIN while there are no records.
    pub(crate) max_timestamp: i64,
    last_indexed: Option<u64>,
    /// How appends reach the data file (see [`LogConfig::direct_io`]).
    writes: Writes,
    /// A sealed segment whose file ends before the next segment begins (cut short on disk):
    /// the (offset, Raft index) its frames actually end at. `next_offset` and `next_index`
    /// are then the next segment's start, and the entries in between are damage: reads of
    /// them fail, [`crate::PartitionLog::map_damage`] bounds them, a repair writes them back.
    pub(crate) lost: Option<(u64, u64)>,
    /// The tail of a log closed cleanly keeps its index files until its first append, which
    /// removes them (they describe it only as long as it does not change; an open checks they
    /// match the file's length).
    pub(crate) index_files_stale: bool,
}

/// How a segment's appends reach its data file.
#[derive(Debug)]
enum Writes {
    /// Through the page cache (also after the filesystem refused direct I/O).
    Buffered,
    /// Direct I/O not tried yet: the first append opens the file with `O_DIRECT`.
    DirectUntried,
    /// Direct I/O: whole blocks written from an aligned buffer, the last one padded with zeros
    /// (the next append writes that block again, with its bytes and the new ones). So the file
    /// may end in up to a block of zeros past `data_len`, until a roll or close trims it and a
    /// scan after a crash recognises it (see [`Segment::scan`]).
    Direct {
        file: File,
        /// The bytes of the data file's last partial block (from `data_len` rounded down to a
        /// block up to `data_len`), as on disk; None when not known (read from the file then).
        tail: Option<Vec<u8>>,
    },
}

impl Segment {
    /// Creates an empty data file; the directory entry is made durable before returning.
    pub(crate) fn create(
        dir: &Path,
        base_offset: u64,
        next_index: u64,
        config: &LogConfig,
    ) -> Result<Segment> {
        let path = dir.join(data_file_name(base_offset));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .io("create segment", &path)?;
        sync_dir(dir, config)?;
        notify_replaced(config, &path, 0);
        Ok(Segment::empty(base_offset, path, file, next_index))
    }

    fn empty(base_offset: u64, path: PathBuf, file: File, next_index: u64) -> Segment {
        Segment {
            base_offset,
            path,
            file: Mutex::new(Some(Arc::new(file))),
            last_used: AtomicU64::new(0),
            entries: Vec::new(),
            next_offset: base_offset,
            first_index: None,
            next_index,
            data_len: 0,
            synced_len: 0,
            first_timestamp: None,
            max_timestamp: i64::MIN,
            last_indexed: None,
            writes: Writes::DirectUntried,
            lost: None,
            index_files_stale: false,
        }
    }

    /// Opens an existing data file without reading it; call [`Segment::load_index`] or
    /// [`Segment::scan`] next.
    pub(crate) fn open(path: PathBuf, base_offset: u64) -> Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .io("open segment", &path)?;
        let data_len = file.metadata().io("stat segment", &path)?.len();
        let mut segment = Segment::empty(base_offset, path, file, 0);
        segment.data_len = data_len;
        segment.synced_len = data_len;
        Ok(segment)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first_index.is_none()
    }

    /// The Raft index of the segment's first entry, also when the entries it lost are all it
    /// held (see `lost`); None for an empty segment.
    pub(crate) fn start_index(&self) -> Option<u64> {
        self.first_index.or(self.lost.map(|(_, index)| index))
    }

    /// After a repair wrote `entries` as frames from `position` on, at the end of a segment
    /// that had lost them: the segment holds them, its bounds are those of its frames again.
    pub(crate) fn repaired_lost(&mut self, position: u64, entries: &[Vec<Batch>], interval: u64) {
        let mut at = position;
        for batches in entries {
            let len = frame_len(batches);
            self.observe(at, batches, len, interval);
            at += len;
        }
        self.data_len = at;
        self.synced_len = at;
        self.lost = None;
    }

    /// The data file, opened again if it was closed.
    pub(crate) fn file(&self) -> Result<Arc<File>> {
        let mut slot = self
            .file
            .lock()
            .map_err(|_| Error::Poisoned("segment file lock poisoned".into()))?;
        if let Some(file) = slot.as_ref() {
            return Ok(file.clone());
        }
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .io("open segment", &self.path)?,
        );
        *slot = Some(file.clone());
        Ok(file)
    }

    /// Whether the data file is open.
    pub(crate) fn is_open(&self) -> bool {
        self.file.lock().is_ok_and(|f| f.is_some())
    }

    /// Closes the data file (reads open it again). Readers holding it keep their handle.
    pub(crate) fn close_file(&self) {
        if let Ok(mut slot) = self.file.lock() {
            slot.take();
        }
    }

    /// Forgets the copy of the data file's last block kept for direct writes (the file was
    /// changed another way): the next direct write reads it from the file.
    pub(crate) fn forget_tail(&mut self) {
        if let Writes::Direct { tail, .. } = &mut self.writes {
            *tail = None;
        }
    }

    /// Ends direct writing (the segment is sealed): closes the `O_DIRECT` handle.
    pub(crate) fn end_writes(&mut self) {
        if matches!(self.writes, Writes::Direct { .. }) {
            self.writes = Writes::DirectUntried;
        }
    }

    /// [`Segment::trim`], and makes the cut durable when there was padding to cut.
    pub(crate) fn cut_padding(&mut self, config: &LogConfig) -> Result<()> {
        if self.trim()? {
            self.force_sync(config)?;
        }
        Ok(())
    }

    /// Cuts the zero padding that direct writes leave past `data_len` (see [`Writes::Direct`]),
    /// not synced. True when the file was longer than `data_len`.
    pub(crate) fn trim(&mut self) -> Result<bool> {
        let file = self.file()?;
        let len = file.metadata().io("stat segment", &self.path)?.len();
        if len <= self.data_len {
            return Ok(false);
        }
        file.set_len(self.data_len).io("trim segment", &self.path)?;
        Ok(true)
    }

    pub(crate) fn has_records(&self) -> bool {
        self.next_offset > self.base_offset
    }

    fn index_path(&self) -> PathBuf {
        self.path.with_extension("index")
    }

    fn time_index_path(&self) -> PathBuf {
        self.path.with_extension("timeindex")
    }

    /// Accounts for a frame of `batches` at `position` (appended or scanned).
    fn observe(&mut self, position: u64, batches: &[Batch], frame_len: u64, interval: u64) {
        let (Some(first), Some(last)) = (batches.first(), batches.last()) else {
            return;
        };
        let (first, last) = (first.header(), last.header());
        let due = self
            .last_indexed
            .is_none_or(|last| position.saturating_sub(last) >= interval);
        if due {
            self.entries.push(IndexEntry {
                offset: first.base_offset,
                index: first.index,
                position,
                max_ts_before: self.max_timestamp,
            });
            self.last_indexed = Some(position);
        }
        if self.first_index.is_none() {
            self.first_index = Some(first.index);
        }
        self.next_index = first.index + 1;
        self.next_offset = last.next_offset();
        for batch in batches {
            let h = batch.header();
            if h.kind == EntryKind::Records && h.record_count > 0 {
                self.first_timestamp.get_or_insert(h.first_timestamp_ms);
                self.max_timestamp = self.max_timestamp.max(h.max_timestamp_ms);
            }
        }
        self.data_len = position + frame_len;
    }

    /// Writes one frame holding `batches` (one Raft entry) at the end of the data file (not
    /// synced): with direct I/O when configured and the filesystem allows it, otherwise with one
    /// vectored write through the page cache (no copy of the batches; the page cache touches
    /// partial pages only at the frame's two ends).
    pub(crate) fn append(&mut self, batches: &[Batch], config: &LogConfig) -> Result<u64> {
        if self.index_files_stale {
            // (No directory sync needed: index files whose length no longer matches the data
            // file's are ignored at the next open.)
            self.remove_index_files()?;
            self.index_files_stale = false;
        }
        let position = self.data_len;
        let header = frame_header(self.synced_len, batches);
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(batches.len() + 1);
        pieces.push(&header);
        pieces.extend(batches.iter().map(|b| &b.bytes()[..]));
        let len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let at = position + len;
        let file = self.file()?;
        let written = if config.direct_io && !matches!(self.writes, Writes::Buffered) {
            self.write_direct(&file, &pieces, position, len)
        } else {
            write_all_vectored_at(&file, &pieces, position)
        };
        if let Err(error) = written {
            // Undo a partial frame so the file ends on a frame boundary again.
            self.forget_tail();
            return match file.set_len(position) {
                Ok(()) => Err(error).io("append", &self.path),
                Err(undo) => Err(Error::Poisoned(format!(
                    "append to {} failed ({error}) and could not be undone ({undo})",
                    self.path.display()
                ))),
            };
        }
        self.observe(
            position,
            batches,
            at - position,
            config.index_interval_bytes,
        );
        Ok(position)
    }

    /// Writes `pieces` (`len` bytes) at `position` with direct I/O: the block holding `position`
    /// is written again with its bytes before `position` (the same bytes as on disk, so a torn
    /// write of it changes none of them), then the pieces, then zeros to the end of the last
    /// block. Falls back to buffered writes for good when the filesystem refuses `O_DIRECT`.
    fn write_direct(
        &mut self,
        buffered: &File,
        pieces: &[&[u8]],
        position: u64,
        len: u64,
    ) -> std::io::Result<()> {
        if matches!(self.writes, Writes::DirectUntried) {
            use std::os::unix::fs::OpenOptionsExt;
            match OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(&self.path)
            {
                Ok(file) => self.writes = Writes::Direct { file, tail: None },
                Err(error)
                    if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                {
                    refused_direct_io(&self.path);
                    self.writes = Writes::Buffered;
                    return write_all_vectored_at(buffered, pieces, position);
                }
                Err(error) => return Err(error),
            }
        }
        let Writes::Direct { file, tail } = &mut self.writes else {
            return write_all_vectored_at(buffered, pieces, position);
        };
        let block = DIRECT_BLOCK as usize;
        let start = position - position % DIRECT_BLOCK;
        let head_len = (position - start) as usize;
        let mut head = match tail.take() {
            Some(known) if known.len() == head_len => known,
            _ => {
                let mut head = vec![0u8; head_len];
                buffered.read_exact_at(&mut head, start)?;
                head
            }
        };
        let total = head_len + len as usize;
        let padded = total.div_ceil(block) * block;
        let written = DIRECT_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < padded + block {
                scratch.resize(padded + block, 0);
            }
            let skip = scratch.as_ptr().align_offset(block);
            let out = &mut scratch[skip..skip + padded];
            out[..head_len].copy_from_slice(&head);
            let mut at = head_len;
            for piece in pieces {
                out[at..at + piece.len()].copy_from_slice(piece);
                at += piece.len();
            }
            out[at..].fill(0);
            let written = write_all_direct(file, out, start);
            if written.is_ok() {
                let end = position + len;
                let tail_start = (end - end % DIRECT_BLOCK - start) as usize;
                // The head's buffer holds the new last block: no allocation per append.
                head.clear();
                head.extend_from_slice(&out[tail_start..total]);
                *tail = Some(head);
            }
            if scratch.capacity() > DIRECT_SCRATCH_KEPT_MAX {
                *scratch = Vec::new();
            }
            written
        });
        match written {
            Err(error) if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                refused_direct_io(&self.path);
                self.writes = Writes::Buffered;
                write_all_vectored_at(buffered, pieces, position)
            }
            written => written,
        }
    }

    /// fdatasync the data file if anything is unsynced.
    pub(crate) fn sync(&mut self, config: &LogConfig) -> Result<()> {
        if self.synced_len == self.data_len {
            return Ok(());
        }
        self.file()?.sync_data().io("fdatasync", &self.path)?;
        self.synced_len = self.data_len;
        notify(config, &self.path, self.data_len);
        Ok(())
    }

    /// A duplicate handle to the data file, for syncing on another thread while writes go on.
    pub(crate) fn sync_handle(&self) -> Result<File> {
        self.file()?
            .try_clone()
            .io("dup segment handle", &self.path)
    }

    /// Records that a sync issued elsewhere made the first `len` bytes durable.
    pub(crate) fn mark_synced(&mut self, len: u64) {
        self.synced_len = self.synced_len.max(len.min(self.data_len));
    }

    /// fdatasync unconditionally: after a crash the page cache may hold bytes that never reached
    /// the disk, and frames written from now on claim that everything before them is durable.
    pub(crate) fn force_sync(&mut self, config: &LogConfig) -> Result<()> {
        self.file()?.sync_data().io("fdatasync", &self.path)?;
        self.synced_len = self.data_len;
        notify(config, &self.path, self.data_len);
        Ok(())
    }

    /// Rebuilds all state by reading the data file from the start, checking every frame.
    pub(crate) fn scan(
        &mut self,
        mode: ScanMode,
        first_index_hint: u64,
        config: &LogConfig,
    ) -> Result<ScanReport> {
        let file_len = self.data_len;
        let (entries, next_offset, next_index) = (Vec::new(), self.base_offset, first_index_hint);
        self.entries = entries;
        self.next_offset = next_offset;
        self.next_index = next_index;
        self.first_index = None;
        self.first_timestamp = None;
        self.max_timestamp = i64::MIN;
        self.last_indexed = None;
        self.data_len = 0;
        self.forget_tail();
        let mut report = ScanReport::default();
        let file = self.file()?;
        let path = self.path.clone();
        let mut window = Window::new(&file, &path, file_len, READ_CHUNK_BYTES);
        let mut position = 0u64;
        while position < file_len {
            let invalid = match window.frame(position)? {
                Frame::Valid { batches, len, .. } if self.continues(batches[0].header()) => {
                    self.observe(position, &batches, len, config.index_interval_bytes);
                    position += len;
                    continue;
                }
                Frame::Valid { batches, .. } => format!(
                    "entry (offset {}, index {}) does not continue the segment (offset {}, index {})",
                    batches[0].header().base_offset,
                    batches[0].header().index,
                    self.next_offset,
                    self.next_index
                ),
                Frame::Invalid(detail) => {
                    // Intact, in a format this build does not read (a build rolled back after
                    // a newer one wrote here): refused, not cut as a torn tail or mapped as
                    // damage.
                    if let Some(version) = window.newer_format(position)? {
                        return Err(Error::NewerFormat {
                            segment: path.clone(),
                            position,
                            version,
                        });
                    }
                    detail
                }
            };
            let padding_fits = match mode {
                ScanMode::Sealed {
                    successor_base: Some(next),
                } => self.next_offset == next,
                _ => true,
            };
            if padding_fits && window.is_padding(position)? {
                // The zeros a direct write leaves after the last frame: the data ends here.
                report.padding_at = Some(position);
                break;
            }
            // A damaged frame: look for the next valid frame that continues the log.
            let resume = self.resync(&mut window, position + 1)?;
            // (Asked in a tail only: a sealed segment was synced whole.)
            let proven_durable = match (mode, resume) {
                (ScanMode::Tail, Some((at, _))) => {
                    Self::proven_durable_past(&mut window, at, position)?
                }
                _ => false,
            };
            match (mode, resume) {
                (ScanMode::Tail, Some(_)) if !proven_durable => {
                    report.torn_at = Some(position);
                    break;
                }
                (ScanMode::Tail, None) => {
                    report.torn_at = Some(position);
                    break;
                }
                (_, Some((at, _))) => {
                    report.damage.push(Damage {
                        position,
                        resumes_at: Some(at),
                        detail: invalid,
                    });
                    // Force an index point at the resumed frame so reads past the damage work.
                    self.last_indexed = None;
                    self.data_len = at;
                    position = at;
                    // The damaged frames' offsets are unknown; accept the resumed frame's.
                    if let Frame::Valid { batches, .. } = window.frame(at)? {
                        self.next_offset = batches[0].header().base_offset;
                        self.next_index = batches[0].header().index;
                        // Damage in the first frame: the segment still starts where it should,
                        // so reads from its start run into the damage instead of skipping it.
                        if self.first_index.is_none() {
                            self.first_index = Some(first_index_hint);
                        }
                    }
                }
                (ScanMode::Sealed { .. }, None) => {
                    report.damage.push(Damage {
                        position,
                        resumes_at: None,
                        detail: invalid,
                    });
                    self.data_len = file_len;
                    break;
                }
            }
        }
        if report.torn_at.is_none() {
            self.data_len = self.data_len.max(position.min(file_len));
        }
        self.synced_len = self.data_len;
        Ok(report)
    }

    /// Whether a valid frame from `at` on, each continuing the one before (past further
    /// damage too, as a scan resumes past it), was written after a sync that covered
    /// `damaged`: its `synced_len` is past it. Before, the frames after a second damaged frame
    /// were not asked, so a tail whose first damage only they proved durable was cut there,
    /// durable entries and all. Stops at the first proof (a tail with many damaged frames is
    /// not read to its end for each).
    fn proven_durable_past(window: &mut Window<'_>, at: u64, damaged: u64) -> Result<bool> {
        let mut position = at;
        let (mut min_offset, mut min_index) = (0, None);
        while position < window.end {
            match window.frame(position)? {
                Frame::Valid {
                    batches,
                    synced_len,
                    len,
                } => {
                    if synced_len > damaged {
                        return Ok(true);
                    }
                    let header = batches[0].header();
                    (min_offset, min_index) = (header.base_offset, Some(header.index));
                    position += len;
                }
                Frame::Invalid(_) => {
                    match Self::resync_after(window, position + 1, min_offset, min_index)? {
                        Some((next, _, _)) => position = next,
                        None => break,
                    }
                }
            }
        }
        Ok(false)
    }

    fn continues(&self, header: &BatchHeader) -> bool {
        match self.first_index {
            None => header.base_offset == self.next_offset,
            Some(_) => header.base_offset == self.next_offset && header.index == self.next_index,
        }
    }

    /// Finds the first position at or after `from` holding a valid frame that can follow what the
    /// segment holds so far. Returns (position, that frame's synced_len).
    fn resync(&self, window: &mut Window<'_>, from: u64) -> Result<Option<(u64, u64)>> {
        let min_index = self.first_index.map(|_| self.next_index);
        Self::resync_after(window, from, self.next_offset, min_index)
            .map(|found| found.map(|(at, synced_len, _)| (at, synced_len)))
    }

    /// Finds the first position at or after `from` holding a valid frame whose offset (and Raft
    /// index, when given) are at least those given. Returns (position, that frame's synced_len,
    /// its first batch's header).
    fn resync_after(
        window: &mut Window<'_>,
        from: u64,
        min_offset: u64,
        min_index: Option<u64>,
    ) -> Result<Option<(u64, u64, BatchHeader)>> {
        let mut position = from;
        loop {
            if position + FRAME_PROBE_LEN as u64 > window.end {
                return Ok(None);
            }
            let take = (window.end - position).min(READ_CHUNK_BYTES as u64) as usize;
            let Some(chunk) = window.slice(position, take)? else {
                return Ok(None);
            };
            // A candidate frame at position + i has the magic at i + 4 .. i + 8.
            for i in 0..=take - 8 {
                let magic = &chunk[i + 4..i + 8];
                if magic != FRAME_MAGIC && magic != MULTI_FRAME_MAGIC {
                    continue;
                }
                let candidate = position + i as u64;
                if let Frame::Valid {
                    batches,
                    synced_len,
                    ..
                } = window.frame(candidate)?
                {
                    let h = batches[0].header();
                    let plausible =
                        h.base_offset >= min_offset && min_index.is_none_or(|min| h.index >= min);
                    if plausible {
                        return Ok(Some((candidate, synced_len, *h)));
                    }
                }
            }
            if position + take as u64 >= window.end {
                return Ok(None);
            }
            // The next chunk starts where this one's last candidate would have been + 1.
            position += (take - 7) as u64;
        }
    }

    /// Cuts the data file at `position` (a frame boundary), syncs, and rebuilds the state.
    pub(crate) fn truncate(&mut self, position: u64, config: &LogConfig) -> Result<()> {
        let first_index = self.start_index().unwrap_or(self.next_index);
        // Cut, it ends the log: where its frames end is where the log ends.
        self.lost = None;
        let file = self.file()?;
        file.set_len(position).io("truncate segment", &self.path)?;
        file.sync_all().io("fsync", &self.path)?;
        notify_replaced(config, &self.path, position);
        self.data_len = position;
        // Damage before the cut stays where it is: it was reported when found, and reads of it
        // fail their CRC checks.
        self.scan(
            ScanMode::Sealed {
                successor_base: None,
            },
            first_index,
            config,
        )?;
        if self.is_empty() {
            self.next_index = first_index;
        }
        Ok(())
    }

    /// Reads frames from `start` (a frame boundary) to the end of the segment, handing each
    /// batch to `visit`, which says whether to take it and whether to go on. Stops once
    /// `max_bytes` of taken batches are collected, counting whole frames: the batches of one
    /// entry are taken together or not at all, unless `visit` stops inside it (when
    /// `first_may_exceed`, at least one frame is taken if any qualifies). Every frame is checked
    /// before it is looked at; a damaged one ends the read with [`Error::Corruption`] unless
    /// batches were already taken, in which case those are returned and the next read reports
    /// the damage.
    pub(crate) fn read(
        &self,
        start: u64,
        max_bytes: usize,
        first_may_exceed: bool,
        mut visit: impl FnMut(&BatchHeader) -> Visit,
    ) -> Result<(Vec<Batch>, ReadEnd)> {
        let file = self.file()?;
        let mut window = Window::new(&file, &self.path, self.data_len, max_bytes);
        let mut position = start;
        let mut taken = Vec::new();
        let mut taken_bytes = 0usize;
        while position < self.data_len {
            let (batches, len) = match window.frame(position)? {
                Frame::Valid { batches, len, .. } => (batches, len),
                Frame::Invalid(detail) => {
                    if taken.is_empty() {
                        return Err(self.invalid_frame(&mut window, position, detail)?);
                    }
                    return Ok((taken, ReadEnd::Stopped));
                }
            };
            let mut frame_take = Vec::new();
            let mut stopped = false;
            for batch in batches {
                match visit(batch.header()) {
                    Visit::Stop => {
                        stopped = true;
                        break;
                    }
                    Visit::Skip => {}
                    Visit::Take => frame_take.push(batch),
                }
            }
            let frame_bytes: usize = frame_take.iter().map(Batch::len).sum();
            if !frame_take.is_empty()
                && (!taken.is_empty() || !first_may_exceed)
                && taken_bytes + frame_bytes > max_bytes
            {
                return Ok((taken, ReadEnd::Stopped));
            }
            taken_bytes += frame_bytes;
            taken.extend(frame_take);
            if stopped || (taken_bytes >= max_bytes && !taken.is_empty()) {
                return Ok((taken, ReadEnd::Stopped));
            }
            position += len;
        }
        Ok((taken, ReadEnd::EndOfSegment))
    }

    /// The position to start reading at for `offset`: the last index point at or before it.
    pub(crate) fn position_for_offset(&self, offset: u64) -> u64 {
        let i = self.entries.partition_point(|e| e.offset <= offset);
        if i == 0 {
            0
        } else {
            self.entries[i - 1].position
        }
    }

    /// The position to start reading at for Raft index `index`.
    pub(crate) fn position_for_index(&self, index: u64) -> u64 {
        let i = self.entries.partition_point(|e| e.index <= index);
        if i == 0 {
            0
        } else {
            self.entries[i - 1].position
        }
    }

    /// The position to start reading at to find the first record with timestamp >= `ts`.
    pub(crate) fn position_for_timestamp(&self, ts: i64) -> u64 {
        let i = self.entries.partition_point(|e| e.max_ts_before < ts);
        if i == 0 {
            0
        } else {
            self.entries[i - 1].position
        }
    }

    /// Exact frame position of Raft index `index`, by reading from the nearest index point.
    pub(crate) fn frame_position_of_index(&self, index: u64) -> Result<Option<u64>> {
        let file = self.file()?;
        let mut window = Window::new(&file, &self.path, self.data_len, READ_CHUNK_BYTES);
        let mut position = self.position_for_index(index);
        while position < self.data_len {
            match window.frame(position)? {
                Frame::Valid { batches, len, .. } => {
                    let found = batches[0].header().index;
                    if found == index {
                        return Ok(Some(position));
                    }
                    if found > index {
                        return Ok(None);
                    }
                    position += len;
                }
                Frame::Invalid(detail) => {
                    return Err(self.invalid_frame(&mut window, position, detail)?);
                }
            }
        }
        Ok(None)
    }

    /// Finds the damage that a read of Raft index `index` runs into: walks the frames from the
    /// index point before `index` and, at the first damaged one, looks for where intact frames
    /// resume. The entries in between are the damaged range; an index point is added where
    /// frames resume, so reads of later entries no longer walk through the damage. None when
    /// the frames up to `index` are intact. `first_index` is the segment's first Raft index
    /// (known from the log even when the segment's first frame is the damaged one).
    pub(crate) fn map_damage(
        &mut self,
        index: u64,
        first_index: u64,
    ) -> Result<Option<SegmentDamage>> {
        let file = self.file()?;
        let mut window = Window::new(&file, &self.path, self.data_len, READ_CHUNK_BYTES);
        let at = self.entries.partition_point(|e| e.index <= index);
        let (mut position, mut next_offset, mut next_index) = match at {
            0 => (0, self.base_offset, first_index),
            i => {
                let e = &self.entries[i - 1];
                (e.position, e.offset, e.index)
            }
        };
        let mut term = None;
        while position < self.data_len {
            let detail = match window.frame(position)? {
                Frame::Valid { batches, len, .. } => {
                    let (first, last) = (batches[0].header(), batches[batches.len() - 1].header());
                    if first.index > index {
                        return Ok(None);
                    }
                    next_offset = last.next_offset();
                    next_index = first.index + 1;
                    term = Some(first.term);
                    position += len;
                    continue;
                }
                Frame::Invalid(detail) => detail,
            };
            let resumed =
                Self::resync_after(&mut window, position + 1, next_offset, Some(next_index))?;
            let damage = SegmentDamage {
                position,
                resumes_at: resumed.map(|(at, _, _)| at),
                first_index: next_index,
                first_offset: next_offset,
                resumed: resumed.map(|(_, _, h)| (h.index, h.base_offset, h.term)),
                term_before: term,
                detail,
            };
            if let Some((at, _, h)) = resumed {
                let i = self.entries.partition_point(|e| e.position < at);
                if self.entries.get(i).is_none_or(|e| e.position != at) {
                    let max_ts_before = self
                        .entries
                        .get(i)
                        .map_or(self.max_timestamp, |e| e.max_ts_before);
                    self.entries.insert(
                        i,
                        IndexEntry {
                            offset: h.base_offset,
                            index: h.index,
                            position: at,
                            max_ts_before,
                        },
                    );
                }
            }
            return Ok(Some(damage));
        }
        Ok(None)
    }

    /// The error of a read that found the frame at `position` invalid: damage, or intact data
    /// of a newer build (see [`Error::NewerFormat`]).
    fn invalid_frame(
        &self,
        window: &mut Window<'_>,
        position: u64,
        detail: String,
    ) -> Result<Error> {
        Ok(match window.newer_format(position)? {
            Some(version) => Error::NewerFormat {
                segment: self.path.clone(),
                position,
                version,
            },
            None => self.corruption(position, detail),
        })
    }

    pub(crate) fn corruption(&self, position: u64, detail: String) -> Error {
        Error::Corruption {
            segment: self.path.clone(),
            position,
            detail,
        }
    }

    /// Writes the offset and time index files (atomically, synced). Used when the segment is sealed
    /// and when the log is closed cleanly.
    pub(crate) fn write_index_files(&self, dir: &Path, config: &LogConfig) -> Result<()> {
        self.index_files().write(dir, config)
    }

    /// The contents of the offset and time index files as the segment stands now, to write
    /// later (without the segment: a roll writes them outside the log's lock).
    pub(crate) fn index_files(&self) -> IndexFiles {
        let mut index =
            Vec::with_capacity(INDEX_HEADER_LEN + self.entries.len() * INDEX_ENTRY_LEN + 4);
        index.extend_from_slice(&INDEX_MAGIC);
        index.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        index.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        // (A segment that lost its end is written down with the bounds of its frames: the
        // next open finds the loss again.)
        let (next_offset, next_index) = self.lost.unwrap_or((self.next_offset, self.next_index));
        index.extend_from_slice(&self.base_offset.to_le_bytes());
        index.extend_from_slice(&next_offset.to_le_bytes());
        index.extend_from_slice(&self.first_index.unwrap_or(u64::MAX).to_le_bytes());
        index.extend_from_slice(&next_index.to_le_bytes());
        index.extend_from_slice(&self.data_len.to_le_bytes());
        index.extend_from_slice(&self.first_timestamp.unwrap_or(i64::MIN).to_le_bytes());
        index.extend_from_slice(&self.max_timestamp.to_le_bytes());
        index.extend_from_slice(&0u64.to_le_bytes());
        for e in &self.entries {
            index.extend_from_slice(&e.offset.to_le_bytes());
            index.extend_from_slice(&e.index.to_le_bytes());
            index.extend_from_slice(&e.position.to_le_bytes());
        }
        let crc = crc32fast::hash(&index);
        index.extend_from_slice(&crc.to_le_bytes());

        let mut time = Vec::with_capacity(
            TIME_INDEX_HEADER_LEN + self.entries.len() * TIME_INDEX_ENTRY_LEN + 4,
        );
        time.extend_from_slice(&TIME_INDEX_MAGIC);
        time.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        time.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        time.extend_from_slice(&self.data_len.to_le_bytes());
        for e in &self.entries {
            time.extend_from_slice(&e.max_ts_before.to_le_bytes());
            time.extend_from_slice(&e.offset.to_le_bytes());
        }
        let crc = crc32fast::hash(&time);
        time.extend_from_slice(&crc.to_le_bytes());
        IndexFiles {
            index_path: self.index_path(),
            index,
            time_path: self.time_index_path(),
            time,
        }
    }

    /// Deletes the index files (they go stale as soon as the segment changes).
    pub(crate) fn remove_index_files(&self) -> Result<bool> {
        remove_index_files_of(&self.path)
    }

    /// Loads the index files if they are intact and describe the data file as it is. Returns false
    /// (and leaves the segment for a scan) when they are missing, stale or damaged.
    pub(crate) fn load_index(&mut self) -> Result<bool> {
        let (Some(index), Some(time)) = (
            read_optional(&self.index_path())?,
            read_optional(&self.time_index_path())?,
        ) else {
            return Ok(false);
        };
        Ok(self.apply_index(&index, &time).is_some())
    }

    fn apply_index(&mut self, index: &[u8], time: &[u8]) -> Option<()> {
        let body = checked_body(index, &INDEX_MAGIC)?;
        let tbody = checked_body(time, &TIME_INDEX_MAGIC)?;
        if body.len() < INDEX_HEADER_LEN || tbody.len() < TIME_INDEX_HEADER_LEN {
            return None;
        }
        let count = le_u32(&body[12..16]) as usize;
        if le_u32(&body[8..12]) != INDEX_VERSION
            || le_u32(&tbody[8..12]) != INDEX_VERSION
            || le_u32(&tbody[12..16]) as usize != count
            || body.len() != INDEX_HEADER_LEN + count * INDEX_ENTRY_LEN
            || tbody.len() != TIME_INDEX_HEADER_LEN + count * TIME_INDEX_ENTRY_LEN
        {
            return None;
        }
        let base_offset = le_u64(&body[16..24]);
        let next_offset = le_u64(&body[24..32]);
        let first_index = le_u64(&body[32..40]);
        let next_index = le_u64(&body[40..48]);
        let data_len = le_u64(&body[48..56]);
        let first_timestamp = le_u64(&body[56..64]) as i64;
        let max_timestamp = le_u64(&body[64..72]) as i64;
        if base_offset != self.base_offset
            || data_len != self.data_len
            || le_u64(&tbody[16..24]) != data_len
            || next_offset < base_offset
            || (count == 0) != (data_len == 0)
        {
            return None;
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let e = &body[INDEX_HEADER_LEN + i * INDEX_ENTRY_LEN..][..INDEX_ENTRY_LEN];
            let t =
                &tbody[TIME_INDEX_HEADER_LEN + i * TIME_INDEX_ENTRY_LEN..][..TIME_INDEX_ENTRY_LEN];
            let entry = IndexEntry {
                offset: le_u64(&e[0..8]),
                index: le_u64(&e[8..16]),
                position: le_u64(&e[16..24]),
                max_ts_before: le_u64(&t[0..8]) as i64,
            };
            if le_u64(&t[8..16]) != entry.offset || entry.position >= data_len {
                return None;
            }
            if let Some(prev) = entries.last() {
                let prev: &IndexEntry = prev;
                if entry.position <= prev.position
                    || entry.offset < prev.offset
                    || entry.index <= prev.index
                    || entry.max_ts_before < prev.max_ts_before
                {
                    return None;
                }
            } else if entry.position != 0
                || entry.offset != base_offset
                || entry.index != first_index
            {
                return None;
            }
            entries.push(entry);
        }
        self.entries = entries;
        self.next_offset = next_offset;
        self.first_index = (count > 0).then_some(first_index);
        self.next_index = next_index;
        self.first_timestamp = (first_timestamp != i64::MIN).then_some(first_timestamp);
        self.max_timestamp = max_timestamp;
        self.last_indexed = self.entries.last().map(|e| e.position);
        Some(())
    }

    /// Deletes the data and index files.
    pub(crate) fn delete(self) -> Result<()> {
        self.remove_index_files()?;
        fs::remove_file(&self.path).io("delete segment", &self.path)
    }

    /// Removes the segment's files, those already gone included (a step retried after a
    /// failure part-way).
    pub(crate) fn remove_files(&self) -> Result<()> {
        remove_files_of(&self.path)
    }
}

/// What a read visitor wants done with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Visit {
    Take,
    Skip,
    Stop,
}

/// Why a segment read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadEnd {
    /// The visitor or the byte limit stopped it.
    Stopped,
    /// It ran off the end of the segment; the next segment may continue.
    EndOfSegment,
}

fn checked_body<'a>(file: &'a [u8], magic: &[u8; 8]) -> Option<&'a [u8]> {
    if file.len() < 12 || &file[..8] != magic {
        return None;
    }
    let (body, crc) = file.split_at(file.len() - 4);
    (crc32fast::hash(body) == le_u32(crc)).then_some(body)
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).io("read index", path),
    }
}

/// Warns, once per process, that a filesystem refused direct I/O (each segment then falls back on
/// its own, quietly).
fn refused_direct_io(path: &Path) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            path = %path.display(),
            "the filesystem refuses direct I/O: segments are written through the page cache"
        );
    }
}

/// Writes `buf` (whole aligned blocks) at `offset` through an `O_DIRECT` handle, retrying short
/// writes (which end on a block boundary when they happen).
fn write_all_direct(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0usize;
    // Bounded: every turn writes at least one byte or fails.
    while done < buf.len() {
        match rustix::io::pwrite(file, &buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "direct write wrote nothing",
                ));
            }
            Ok(n) if n % DIRECT_BLOCK as usize != 0 && done + n < buf.len() => {
                return Err(std::io::Error::other(format!(
                    "direct write stopped inside a block ({n} of {} bytes)",
                    buf.len() - done
                )));
            }
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes every piece, in order, at `offset` with `pwritev`, retrying short writes.
fn write_all_vectored_at(file: &File, pieces: &[&[u8]], offset: u64) -> std::io::Result<()> {
    let mut pieces: Vec<&[u8]> = pieces.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut offset = offset;
    // Bounded: every turn writes at least one byte or fails.
    while !pieces.is_empty() {
        // IOV_MAX is 1024 on Linux.
        let slices: Vec<std::io::IoSlice<'_>> = pieces
            .iter()
            .take(1024)
            .map(|p| std::io::IoSlice::new(p))
            .collect();
        let mut written = match rustix::io::pwritev(file, &slices, offset) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += written as u64;
        while written > 0 {
            let first = pieces[0];
            if written >= first.len() {
                written -= first.len();
                pieces.remove(0);
            } else {
                pieces[0] = &first[written..];
                written = 0;
            }
        }
    }
    Ok(())
}

/// A segment's index files, made by [`Segment::index_files`].
#[derive(Debug)]
pub(crate) struct IndexFiles {
    index_path: PathBuf,
    index: Vec<u8>,
    time_path: PathBuf,
    time: Vec<u8>,
}

impl IndexFiles {
    /// Writes both files atomically and makes them durable.
    pub(crate) fn write(&self, dir: &Path, config: &LogConfig) -> Result<()> {
        write_file_atomically(&self.index_path, &self.index, config)?;
        write_file_atomically(&self.time_path, &self.time, config)?;
        sync_dir(dir, config)
    }
}

pub(crate) fn write_file_atomically(path: &Path, bytes: &[u8], config: &LogConfig) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    {
        let file = File::create(&tmp).io("create", &tmp)?;
        file.write_all_at(bytes, 0).io("write", &tmp)?;
        file.sync_all().io("fsync", &tmp)?;
    }
    fs::rename(&tmp, path).io("rename", path)?;
    notify_replaced(config, path, bytes.len() as u64);
    Ok(())
}

/// fsync a directory so created, renamed and deleted entries are durable.
/// Deletes the index files of the data file at `data_path` (those already gone included);
/// whether there were any.
pub(crate) fn remove_index_files_of(data_path: &Path) -> Result<bool> {
    let mut removed = false;
    for path in [
        data_path.with_extension("index"),
        data_path.with_extension("timeindex"),
    ] {
        match fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).io("remove index", &path),
        }
    }
    Ok(removed)
}

/// Removes a segment's data file and its index files, those already gone included.
pub(crate) fn remove_files_of(data_path: &Path) -> Result<()> {
    remove_index_files_of(data_path)?;
    match fs::remove_file(data_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).io("delete segment", data_path)
        }
        _ => Ok(()),
    }
}

pub(crate) fn sync_dir(dir: &Path, config: &LogConfig) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .io("fsync directory", dir)?;
    notify(config, dir, 0);
    Ok(())
}

pub(crate) fn notify(config: &LogConfig, path: &Path, len: u64) {
    if let Some(listener) = &config.sync_listener {
        listener.synced(path, len);
    }
}

pub(crate) fn notify_replaced(config: &LogConfig, path: &Path, len: u64) {
    if let Some(listener) = &config.sync_listener {
        listener.replaced(path, len);
    }
}
