//! The batch format: one Raft entry = one batch = a fixed header, then records (or an opaque control
//! payload), protected by a CRC32. The bytes are documented in `storage/FORMAT.md`; this file is the
//! only code that reads or writes them.
//!
//! A [`Batch`] is always validated: it can only be made by [`BatchBuilder::seal`],
//! [`Batch::control`] or [`Batch::decode`], and decoding checks the CRC, every length and every
//! record, so iterating records afterwards cannot fail and never reads out of bounds. Decoding never
//! allocates more than a small constant: all record data stays in the input [`Bytes`].

use bytes::{BufMut, Bytes, BytesMut};

/// Current batch format version (byte 8 of the header).
pub const FORMAT_VERSION: u8 = 1;
/// Bytes of the fixed batch header.
pub const BATCH_HEADER_LEN: usize = 80;
/// Smallest encoded record: length, offset delta, timestamp, key length, value length, header count.
const RECORD_MIN_LEN: usize = 4 + 4 + 8 + 4 + 4 + 4;
/// Largest batch the codec will accept at all (the log's configured maximum is usually lower).
pub const BATCH_LEN_LIMIT: usize = 1 << 30;

/// Why bytes are not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Fewer bytes than the header or the declared length needs.
    #[error("truncated batch: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The declared length is impossible.
    #[error("invalid batch length {0}")]
    BadLength(u64),
    /// The CRC does not match the bytes.
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc {
        /// CRC stored in the batch.
        stored: u32,
        /// CRC computed over the bytes.
        computed: u32,
    },
    /// A format version this build does not know.
    #[error("unknown batch format version {0}")]
    BadVersion(u8),
    /// An entry kind this build does not know.
    #[error("unknown entry kind {0}")]
    BadKind(u8),
    /// A field that must be zero in this version is not.
    #[error("reserved field {0} is not zero")]
    Reserved(&'static str),
    /// The records section does not match the header.
    #[error("invalid records: {0}")]
    BadRecords(String),
}

/// What an entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Records with dense offsets `base_offset .. base_offset + record_count`.
    Records,
    /// An opaque payload for the layer above (a Raft blank or membership entry, say). It takes a
    /// Raft index but no offsets: `record_count` is 0.
    Control,
}

impl EntryKind {
    fn code(self) -> u8 {
        match self {
            EntryKind::Records => 0,
            EntryKind::Control => 1,
        }
    }

    fn from_code(code: u8) -> Result<Self, CodecError> {
        match code {
            0 => Ok(EntryKind::Records),
            1 => Ok(EntryKind::Control),
            other => Err(CodecError::BadKind(other)),
        }
    }
}

/// The decoded fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Records or control.
    pub kind: EntryKind,
    /// Reserved flags (compression, transactions); 0 in format version 1.
    pub attributes: u16,
    /// Number of records (0 for control entries).
    pub record_count: u32,
    /// Offset of the first record; for control entries, the offset the next record will take.
    pub base_offset: u64,
    /// Raft term of the leader that created the entry.
    pub term: u64,
    /// Raft log index of the entry.
    pub index: u64,
    /// Timestamp of the first record (ms since the Unix epoch); 0 for control entries.
    pub first_timestamp_ms: i64,
    /// Largest record timestamp; 0 for control entries.
    pub max_timestamp_ms: i64,
    /// Idempotent producer id, 0 if none.
    pub producer_id: u64,
    /// Producer epoch.
    pub producer_epoch: u32,
    /// Producer sequence of the first record.
    pub base_sequence: u64,
}

impl BatchHeader {
    /// The offset after the last record of this batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

/// Producer identity stamped on a batch for deduplication.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerInfo {
    /// Producer id, 0 for none.
    pub producer_id: u64,
    /// Producer epoch.
    pub producer_epoch: u32,
    /// Sequence of the first record.
    pub base_sequence: u64,
}

/// One record header: an ordered name/value pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// Header name (UTF-8 by convention of the layers above; bytes here).
    pub key: Bytes,
    /// Header value.
    pub value: Bytes,
}

/// A record read from a batch. Key, value and headers are slices of the batch's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Offset in the partition.
    pub offset: u64,
    /// Creation time, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Key; empty when none.
    pub key: Bytes,
    /// Value.
    pub value: Bytes,
    /// Headers in their original order.
    pub headers: Vec<RecordHeader>,
}

/// A validated batch: header fields plus the complete encoded bytes (header, records, CRC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    header: BatchHeader,
    bytes: Bytes,
}

/// Accumulates records, then seals them into a [`Batch`] once offsets and the Raft position are known.
///
/// ```
/// use weft_storage::{BatchBuilder, ProducerInfo};
/// let mut builder = BatchBuilder::new();
/// builder.push(1_700_000_000_000, b"key", b"value", [(&b"traceparent"[..], &b"00-..."[..])]);
/// let batch = builder.seal(0, 1, 1, ProducerInfo::default());
/// let records: Vec<_> = batch.records().collect();
/// assert_eq!(records[0].value.as_ref(), b"value");
/// assert_eq!(records[0].headers[0].key.as_ref(), b"traceparent");
/// ```
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    record_count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty builder with room for `bytes` of records.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = BytesMut::with_capacity(BATCH_HEADER_LEN + bytes);
        buf.put_bytes(0, BATCH_HEADER_LEN);
        BatchBuilder {
            buf,
            record_count: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: i64::MIN,
        }
    }

    /// Appends a record. Its offset is the batch's base offset plus its position in the batch.
    pub fn push<'a>(
        &mut self,
        timestamp_ms: i64,
        key: &[u8],
        value: &[u8],
        headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) {
        let start = self.buf.len();
        self.buf.put_u32_le(0); // length, patched below
        self.buf.put_u32_le(self.record_count);
        self.buf.put_i64_le(timestamp_ms);
        put_bytes(&mut self.buf, key);
        put_bytes(&mut self.buf, value);
        let count_at = self.buf.len();
        self.buf.put_u32_le(0);
        let mut header_count = 0u32;
        for (name, value) in headers {
            put_bytes(&mut self.buf, name);
            put_bytes(&mut self.buf, value);
            header_count += 1;
        }
        self.buf[count_at..count_at + 4].copy_from_slice(&header_count.to_le_bytes());
        let len = u32::try_from(self.buf.len() - start - 4).unwrap_or(u32::MAX);
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        if self.record_count == 0 {
            self.first_timestamp_ms = timestamp_ms;
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        self.record_count += 1;
    }

    /// Number of records pushed so far.
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// Encoded size of the batch if sealed now.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Writes the header and CRC and returns the finished batch.
    pub fn seal(self, base_offset: u64, term: u64, index: u64, producer: ProducerInfo) -> Batch {
        let header = BatchHeader {
            kind: EntryKind::Records,
            attributes: 0,
            record_count: self.record_count,
            base_offset,
            term,
            index,
            first_timestamp_ms: if self.record_count == 0 {
                0
            } else {
                self.first_timestamp_ms
            },
            max_timestamp_ms: if self.record_count == 0 {
                0
            } else {
                self.max_timestamp_ms
            },
            producer_id: producer.producer_id,
            producer_epoch: producer.producer_epoch,
            base_sequence: producer.base_sequence,
        };
        Batch::finish(header, self.buf)
    }
}

fn put_bytes(buf: &mut BytesMut, bytes: &[u8]) {
    buf.put_u32_le(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    buf.put_slice(bytes);
}

impl Batch {
    /// A control entry: an opaque payload that takes Raft index `index` but no offsets.
    pub fn control(base_offset: u64, term: u64, index: u64, payload: &[u8]) -> Batch {
        let mut buf = BytesMut::with_capacity(BATCH_HEADER_LEN + payload.len());
        buf.put_bytes(0, BATCH_HEADER_LEN);
        buf.put_slice(payload);
        let header = BatchHeader {
            kind: EntryKind::Control,
            attributes: 0,
            record_count: 0,
            base_offset,
            term,
            index,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
            producer_id: 0,
            producer_epoch: 0,
            base_sequence: 0,
        };
        Batch::finish(header, buf)
    }

    fn finish(header: BatchHeader, mut buf: BytesMut) -> Batch {
        Batch::write_header(&header, &mut buf);
        let crc = crc32fast::hash(&buf[4..]);
        buf[0..4].copy_from_slice(&crc.to_le_bytes());
        let bytes = buf.freeze();
        debug_assert!(
            Batch::decode(bytes.clone()).is_ok(),
            "sealed batch must decode"
        );
        Batch { header, bytes }
    }

    /// Writes `header` (all but the CRC) into the first [`BATCH_HEADER_LEN`] bytes of `buf`.
    fn write_header(header: &BatchHeader, buf: &mut BytesMut) {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let h = &mut buf[..BATCH_HEADER_LEN];
        h[4..8].copy_from_slice(&len.to_le_bytes());
        h[8] = FORMAT_VERSION;
        h[9] = header.kind.code();
        h[10..12].copy_from_slice(&header.attributes.to_le_bytes());
        h[12..16].copy_from_slice(&header.record_count.to_le_bytes());
        h[16..24].copy_from_slice(&header.base_offset.to_le_bytes());
        h[24..32].copy_from_slice(&header.term.to_le_bytes());
        h[32..40].copy_from_slice(&header.index.to_le_bytes());
        h[40..48].copy_from_slice(&header.first_timestamp_ms.to_le_bytes());
        h[48..56].copy_from_slice(&header.max_timestamp_ms.to_le_bytes());
        h[56..64].copy_from_slice(&header.producer_id.to_le_bytes());
        h[64..68].copy_from_slice(&header.producer_epoch.to_le_bytes());
        h[68..76].copy_from_slice(&header.base_sequence.to_le_bytes());
        h[76..80].copy_from_slice(&0u32.to_le_bytes());
    }

    /// The same batch re-sealed at another position: new base offset, Raft term and index, new CRC.
    /// A leader proposes records before it knows where they land; its log store restamps them.
    /// Restamps in place when this is the only handle on the bytes (no copy), else in a copy.
    ///
    /// The new CRC is the old one adjusted for the header bytes that changed (CRC-32 is linear:
    /// the change of the header, shifted past the records, is combined into the stored value),
    /// so a restamp costs the header, not the batch. The records are not read again: if they
    /// no longer match the stored CRC, the new CRC does not match them either, and every read
    /// reports the damage as it would have before.
    pub fn restamp(self, base_offset: u64, term: u64, index: u64) -> Batch {
        let mut buf = match self.bytes.try_into_mut() {
            Ok(unique) => unique,
            Err(shared) => BytesMut::from(&shared[..]),
        };
        let header = BatchHeader {
            base_offset,
            term,
            index,
            ..self.header
        };
        let mut before = [0u8; BATCH_HEADER_LEN];
        before.copy_from_slice(&buf[..BATCH_HEADER_LEN]);
        Batch::write_header(&header, &mut buf);
        let old_crc = Batch::peek_crc(&before).unwrap_or(0);
        let mut change = [0u8; BATCH_HEADER_LEN - 4];
        for (c, (a, b)) in change
            .iter_mut()
            .zip(before[4..].iter().zip(&buf[4..BATCH_HEADER_LEN]))
        {
            *c = a ^ b;
        }
        let crc = old_crc ^ crc_of_change(&change, (buf.len() - BATCH_HEADER_LEN) as u64);
        buf[0..4].copy_from_slice(&crc.to_le_bytes());
        let bytes = buf.freeze();
        #[cfg(debug_assertions)]
        {
            let mut old = crc32fast::Hasher::new();
            old.update(&before[4..]);
            old.update(&bytes[BATCH_HEADER_LEN..]);
            if old.finalize() == old_crc {
                debug_assert_eq!(
                    crc,
                    crc32fast::hash(&bytes[4..]),
                    "a restamp's CRC matches the bytes when the old one did"
                );
                debug_assert!(
                    Batch::decode(bytes.clone()).is_ok(),
                    "a restamped batch must decode"
                );
            }
        }
        Batch { header, bytes }
    }

    /// Reads the declared total length from the first 8 bytes of an encoded batch, if present.
    pub fn peek_len(bytes: &[u8]) -> Option<usize> {
        let len = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
        Some(len as usize)
    }

    /// The stored CRC of an encoded batch (first 4 bytes), if present.
    pub fn peek_crc(bytes: &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?))
    }

    /// Validates `bytes` as exactly one batch: length, CRC, version, kind, reserved fields and, for
    /// record batches, every record. Extra bytes after the declared length are an error.
    pub fn decode(bytes: Bytes) -> Result<Batch, CodecError> {
        if bytes.len() < BATCH_HEADER_LEN {
            return Err(CodecError::Truncated {
                need: BATCH_HEADER_LEN,
                have: bytes.len(),
            });
        }
        let len = Batch::peek_len(&bytes).unwrap_or(0);
        if !(BATCH_HEADER_LEN..=BATCH_LEN_LIMIT).contains(&len) {
            return Err(CodecError::BadLength(len as u64));
        }
        if len > bytes.len() {
            return Err(CodecError::Truncated {
                need: len,
                have: bytes.len(),
            });
        }
        if len < bytes.len() {
            return Err(CodecError::BadLength(len as u64));
        }
        let stored = Batch::peek_crc(&bytes).unwrap_or(0);
        let computed = crc32fast::hash(&bytes[4..]);
        if stored != computed && !crc_check_skipped() {
            return Err(CodecError::BadCrc { stored, computed });
        }
        let header = parse_header(&bytes[..BATCH_HEADER_LEN])?;
        match header.kind {
            EntryKind::Control => {
                if header.record_count != 0 {
                    return Err(CodecError::BadRecords("control entry with records".into()));
                }
            }
            EntryKind::Records => validate_records(&header, &bytes[BATCH_HEADER_LEN..])?,
        }
        Ok(Batch { header, bytes })
    }

    /// The header of an encoded batch, without checking its CRC or its records: for bytes already
    /// validated by [`Batch::decode`] (a read from the log checks every batch), where only the
    /// header is needed. Checks the length, version, kind and reserved fields.
    pub fn header_of(bytes: &[u8]) -> Result<BatchHeader, CodecError> {
        let Some(h) = bytes.get(..BATCH_HEADER_LEN) else {
            return Err(CodecError::Truncated {
                need: BATCH_HEADER_LEN,
                have: bytes.len(),
            });
        };
        let len = Batch::peek_len(bytes).unwrap_or(0);
        if len != bytes.len() {
            return Err(CodecError::BadLength(len as u64));
        }
        parse_header(h)
    }

    /// The header fields.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The complete encoded batch, as stored and replicated.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The encoded bytes, taken out of the batch.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Encoded length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when the batch holds no records (control entries, or an empty record batch).
    pub fn is_empty(&self) -> bool {
        self.header.record_count == 0
    }

    /// The stored CRC32 (over everything after the CRC field).
    pub fn crc(&self) -> u32 {
        Batch::peek_crc(&self.bytes).unwrap_or(0)
    }

    /// The payload after the header: encoded records, or a control entry's opaque bytes.
    pub fn payload(&self) -> Bytes {
        self.bytes.slice(BATCH_HEADER_LEN..)
    }

    /// The records, in offset order. Empty for control entries.
    pub fn records(&self) -> RecordIter {
        let payload = match self.header.kind {
            EntryKind::Records => self.payload(),
            EntryKind::Control => Bytes::new(),
        };
        RecordIter {
            payload,
            position: 0,
            base_offset: self.header.base_offset,
            remaining: match self.header.kind {
                EntryKind::Records => self.header.record_count,
                EntryKind::Control => 0,
            },
        }
    }
}

/// Parses and checks the fixed header (`h` is exactly [`BATCH_HEADER_LEN`] bytes).
fn parse_header(h: &[u8]) -> Result<BatchHeader, CodecError> {
    if h[8] != FORMAT_VERSION {
        return Err(CodecError::BadVersion(h[8]));
    }
    let header = BatchHeader {
        kind: EntryKind::from_code(h[9])?,
        attributes: le_u16(&h[10..12]),
        record_count: le_u32(&h[12..16]),
        base_offset: le_u64(&h[16..24]),
        term: le_u64(&h[24..32]),
        index: le_u64(&h[32..40]),
        first_timestamp_ms: le_u64(&h[40..48]) as i64,
        max_timestamp_ms: le_u64(&h[48..56]) as i64,
        producer_id: le_u64(&h[56..64]),
        producer_epoch: le_u32(&h[64..68]),
        base_sequence: le_u64(&h[68..76]),
    };
    if header.attributes != 0 {
        return Err(CodecError::Reserved("attributes"));
    }
    if le_u32(&h[76..80]) != 0 {
        return Err(CodecError::Reserved("reserved"));
    }
    if header
        .base_offset
        .checked_add(u64::from(header.record_count))
        .is_none()
    {
        return Err(CodecError::BadRecords("offset range overflows".into()));
    }
    Ok(header)
}

/// Iterator over the records of a validated batch.
#[derive(Debug)]
pub struct RecordIter {
    payload: Bytes,
    position: usize,
    base_offset: u64,
    remaining: u32,
}

impl Iterator for RecordIter {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        if self.remaining == 0 {
            return None;
        }
        let payload = &self.payload;
        let mut headers = Vec::new();
        let parsed = parse_record(payload, self.position, |k, v| {
            headers.push(RecordHeader {
                key: payload.slice(k.0..k.1),
                value: payload.slice(v.0..v.1),
            })
        });
        match parsed {
            Ok((parsed, next)) => {
                self.position = next;
                self.remaining -= 1;
                Some(Record {
                    offset: self.base_offset + u64::from(parsed.offset_delta),
                    timestamp_ms: parsed.timestamp_ms,
                    key: self.payload.slice(parsed.key.0..parsed.key.1),
                    value: self.payload.slice(parsed.value.0..parsed.value.1),
                    headers,
                })
            }
            Err(error) => {
                // Unreachable for a decoded batch: decode validated every record.
                debug_assert!(false, "validated batch failed to parse: {error}");
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining as usize, Some(self.remaining as usize))
    }
}

type Span = (usize, usize);

struct ParsedRecord {
    offset_delta: u32,
    timestamp_ms: i64,
    key: Span,
    value: Span,
}

/// Parses the record starting at `at`, handing each header's (name, value) spans to `on_header`;
/// returns the record and the position after it. Bounds-checked everywhere and allocation-free, so
/// validating a batch costs no allocation per record.
fn parse_record(
    payload: &[u8],
    at: usize,
    mut on_header: impl FnMut(Span, Span),
) -> Result<(ParsedRecord, usize), CodecError> {
    let bad = |what: &str| CodecError::BadRecords(format!("{what} at payload byte {at}"));
    let len = read_u32(payload, at).ok_or_else(|| bad("record length past the end"))? as usize;
    let end = at
        .checked_add(4)
        .and_then(|p| p.checked_add(len))
        .filter(|&end| end <= payload.len())
        .ok_or_else(|| bad("record longer than the batch"))?;
    if len < RECORD_MIN_LEN - 4 {
        return Err(bad("record too short"));
    }
    let record = &payload[..end];
    let mut p = at + 4;
    let offset_delta = read_u32(record, p).ok_or_else(|| bad("offset delta"))?;
    p += 4;
    let timestamp_ms = read_u64(record, p).ok_or_else(|| bad("timestamp"))? as i64;
    p += 8;
    let (key, next) = read_span(record, p).ok_or_else(|| bad("key"))?;
    let (value, next) = read_span(record, next).ok_or_else(|| bad("value"))?;
    p = next;
    let header_count = read_u32(record, p).ok_or_else(|| bad("header count"))? as usize;
    p += 4;
    // Each header needs at least 8 bytes, so the count can never justify more than that.
    if header_count > (end - p) / 8 {
        return Err(bad("header count larger than the record"));
    }
    for _ in 0..header_count {
        let (name, next) = read_span(record, p).ok_or_else(|| bad("header name"))?;
        let (value, next) = read_span(record, next).ok_or_else(|| bad("header value"))?;
        on_header(name, value);
        p = next;
    }
    if p != end {
        return Err(bad("record length does not match its fields"));
    }
    Ok((
        ParsedRecord {
            offset_delta,
            timestamp_ms,
            key,
            value,
        },
        end,
    ))
}

/// How the CRC-32 of a message changes when its first `change.len()` bytes are XORed with
/// `change` and `rest` bytes follow unchanged: the CRC of the change alone, less that of as many
/// zero bytes (what CRC-32's initial and final XOR add), shifted past the `rest` bytes (zlib's
/// `crc32_combine` with a zero second CRC, as crc32fast implements it).
fn crc_of_change(change: &[u8; BATCH_HEADER_LEN - 4], rest: u64) -> u32 {
    let linear = crc32fast::hash(change) ^ crc32fast::hash(&[0u8; BATCH_HEADER_LEN - 4]);
    let mut shifted = crc32fast::Hasher::new_with_initial_len(linear, change.len() as u64);
    shifted.combine(&crc32fast::Hasher::new_with_initial_len(0, rest));
    shifted.finalize()
}

fn validate_records(header: &BatchHeader, payload: &[u8]) -> Result<(), CodecError> {
    let count = header.record_count as usize;
    if count > payload.len() / RECORD_MIN_LEN {
        return Err(CodecError::BadRecords(format!(
            "{count} records cannot fit in {} bytes",
            payload.len()
        )));
    }
    let mut position = 0;
    let mut max_timestamp = i64::MIN;
    for i in 0..count {
        let (record, next) = parse_record(payload, position, |_, _| {})?;
        if record.offset_delta as usize != i {
            return Err(CodecError::BadRecords(format!(
                "record {i} has offset delta {}",
                record.offset_delta
            )));
        }
        if i == 0 && record.timestamp_ms != header.first_timestamp_ms {
            return Err(CodecError::BadRecords(
                "first timestamp does not match the header".into(),
            ));
        }
        max_timestamp = max_timestamp.max(record.timestamp_ms);
        position = next;
    }
    if position != payload.len() {
        return Err(CodecError::BadRecords(format!(
            "{} bytes after the last record",
            payload.len() - position
        )));
    }
    if count > 0 && max_timestamp != header.max_timestamp_ms {
        return Err(CodecError::BadRecords(
            "max timestamp does not match the records".into(),
        ));
    }
    if count == 0 && (header.first_timestamp_ms != 0 || header.max_timestamp_ms != 0) {
        return Err(CodecError::BadRecords("empty batch with timestamps".into()));
    }
    Ok(())
}

fn read_span(bytes: &[u8], at: usize) -> Option<(Span, usize)> {
    let len = read_u32(bytes, at)? as usize;
    let start = at.checked_add(4)?;
    let end = start.checked_add(len)?;
    (end <= bytes.len()).then_some(((start, end), end))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

pub(crate) fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Whether the test-only canary switched batch CRC checks off (never, without the
/// `unsafe-canaries` feature).
pub(crate) fn crc_check_skipped() -> bool {
    #[cfg(feature = "unsafe-canaries")]
    {
        crate::canary::batch_crc_skipped()
    }
    #[cfg(not(feature = "unsafe-canaries"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Batch {
        let mut b = BatchBuilder::new();
        b.push(10, b"k1", b"v1", []);
        b.push(
            5,
            b"",
            b"v2",
            [(&b"h"[..], &b"x"[..]), (&b"h"[..], &b"y"[..])],
        );
        b.push(30, b"k3", b"", []);
        b.seal(
            100,
            2,
            7,
            ProducerInfo {
                producer_id: 9,
                producer_epoch: 1,
                base_sequence: 40,
            },
        )
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let batch = sample();
        let decoded = Batch::decode(batch.bytes().clone()).expect("decodes");
        assert_eq!(decoded, batch);
        let h = decoded.header();
        assert_eq!(
            (h.base_offset, h.term, h.index, h.record_count),
            (100, 2, 7, 3)
        );
        assert_eq!((h.first_timestamp_ms, h.max_timestamp_ms), (10, 30));
        assert_eq!(
            (h.producer_id, h.producer_epoch, h.base_sequence),
            (9, 1, 40)
        );
        let records: Vec<Record> = decoded.records().collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records[1].offset, 101);
        assert_eq!(records[1].timestamp_ms, 5);
        assert_eq!(records[1].key.as_ref(), b"");
        assert_eq!(records[1].headers.len(), 2);
        assert_eq!(records[1].headers[1].value.as_ref(), b"y");
        assert_eq!(records[2].value.as_ref(), b"");
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let bytes = sample().bytes().to_vec();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Batch::decode(Bytes::from(flipped)).is_err(),
                "flip of bit {bit} accepted"
            );
        }
    }

    #[test]
    fn restamp_moves_a_batch_and_keeps_its_records() {
        let batch = sample();
        let moved = batch.clone().restamp(500, 9, 77);
        let decoded = Batch::decode(moved.bytes().clone()).expect("restamped batch decodes");
        let h = decoded.header();
        assert_eq!((h.base_offset, h.term, h.index), (500, 9, 77));
        assert_eq!((h.producer_id, h.base_sequence), (9, 40));
        assert_eq!(decoded.payload(), batch.payload());
        assert_eq!(decoded.records().nth(2).map(|r| r.offset), Some(502));
    }

    /// A batch of `values` (each a record) sealed at the proposal placeholder, as a leader's
    /// publish path seals it.
    fn proposal(values: &[Vec<u8>], producer_id: u64) -> Batch {
        let mut b = BatchBuilder::new();
        for (i, v) in values.iter().enumerate() {
            b.push(i as i64 * 3, &v[..v.len().min(3)], v, []);
        }
        b.seal(
            0,
            0,
            0,
            ProducerInfo {
                producer_id,
                producer_epoch: 2,
                base_sequence: 17,
            },
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

        /// The CRC a restamp derives from the old one equals the CRC of the restamped bytes,
        /// whatever the records and the new position (sizes from empty records to tens of KiB,
        /// so the shift past the records covers many lengths).
        #[test]
        fn a_restamps_crc_is_the_crc_of_its_bytes(
            values in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4000), 1..12),
            producer_id in proptest::prelude::any::<u64>(),
            base_offset in proptest::prelude::any::<u64>(),
            term in proptest::prelude::any::<u64>(),
            index in proptest::prelude::any::<u64>(),
            again in proptest::prelude::any::<(u64, u64, u64)>(),
        ) {
            let batch = proposal(&values, producer_id);
            let moved = batch.clone().restamp(base_offset, term, index);
            proptest::prop_assert_eq!(
                Batch::peek_crc(moved.bytes()),
                Some(crc32fast::hash(&moved.bytes()[4..]))
            );
            let decoded = Batch::decode(moved.bytes().clone()).expect("restamped batch decodes");
            proptest::prop_assert_eq!(
                (decoded.header().base_offset, decoded.header().term, decoded.header().index),
                (base_offset, term, index)
            );
            proptest::prop_assert_eq!(decoded.payload(), batch.payload());
            // Restamped twice (a stamped batch moved again): still its bytes' CRC.
            let twice = moved.restamp(again.0, again.1, again.2);
            proptest::prop_assert_eq!(
                Batch::peek_crc(twice.bytes()),
                Some(crc32fast::hash(&twice.bytes()[4..]))
            );
        }
    }

    #[test]
    fn records_damaged_before_a_restamp_stay_damaged_after_it() {
        let values: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 300]).collect();
        let batch = proposal(&values, 5);
        let len = batch.len();
        for at in [BATCH_HEADER_LEN, BATCH_HEADER_LEN + 1000, len - 1] {
            let mut damaged = BytesMut::from(&batch.bytes()[..]);
            damaged[at] ^= 0x40;
            let stand_in = Batch {
                header: *batch.header(),
                bytes: damaged.freeze(),
            };
            let moved = stand_in.restamp(1000, 3, 44);
            assert!(
                matches!(
                    Batch::decode(moved.bytes().clone()),
                    Err(CodecError::BadCrc { .. })
                ),
                "a flip at byte {at} of the records passed a restamp unnoticed"
            );
        }
    }

    #[test]
    fn restamp_reuses_bytes_it_holds_alone_and_leaves_shared_bytes_alone() {
        let batch = sample();
        let original = batch.bytes().clone();
        // Shared: the other handle must still read the old stamp.
        let copied = batch.clone().restamp(500, 9, 77);
        assert_ne!(
            copied.bytes().as_ptr(),
            original.as_ptr(),
            "shared bytes are copied"
        );
        assert_eq!(
            Batch::decode(original.clone()).expect("intact").header(),
            batch.header()
        );
        drop(original);
        // Alone: stamped where it lies, and still a valid batch.
        let at = batch.bytes().as_ptr();
        let moved = batch.restamp(600, 10, 78);
        assert_eq!(
            moved.bytes().as_ptr(),
            at,
            "a unique buffer is restamped in place"
        );
        let h = *Batch::decode(moved.bytes().clone())
            .expect("decodes")
            .header();
        assert_eq!((h.base_offset, h.term, h.index), (600, 10, 78));
    }

    #[test]
    fn header_of_reads_the_header_of_a_valid_batch() {
        let batch = sample();
        assert_eq!(
            &Batch::header_of(batch.bytes()).expect("header"),
            batch.header()
        );
        assert!(Batch::header_of(&batch.bytes()[..40]).is_err(), "truncated");
        assert!(
            Batch::header_of(&batch.bytes()[..batch.len() - 1]).is_err(),
            "length mismatch"
        );
    }

    #[test]
    fn control_entries_carry_payload_and_no_records() {
        let batch = Batch::control(5, 3, 11, b"membership");
        let decoded = Batch::decode(batch.bytes().clone()).expect("decodes");
        assert_eq!(decoded.header().kind, EntryKind::Control);
        assert_eq!(decoded.payload().as_ref(), b"membership");
        assert_eq!(decoded.records().count(), 0);
        assert_eq!(decoded.header().next_offset(), 5);
    }

    #[test]
    fn trailing_and_missing_bytes_are_rejected() {
        let bytes = sample().bytes().to_vec();
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            Batch::decode(Bytes::from(longer)),
            Err(CodecError::BadLength(_))
        ));
        assert!(matches!(
            Batch::decode(Bytes::from(bytes[..bytes.len() - 1].to_vec())),
            Err(CodecError::Truncated { .. })
        ));
    }
}
