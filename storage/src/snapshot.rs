//! The snapshot file of a partition directory: the state the layer above derived from the log up
//! to some entry (for Weft's partitions: next offset, last applied Raft entry, membership,
//! producer table), so that a restart reads the snapshot and the log after it, never the whole
//! log, and so that the log's prefix can be purged.
//!
//! The payload is opaque bytes here. The file is replaced atomically (a temporary file, fsync,
//! rename, directory fsync), so a crash leaves either the old snapshot or the new one; a damaged
//! file is an error, never half-trusted. Layout (FORMAT.md): magic `WFTSNP01`, version u32, payload
//! length u64, payload, CRC32 over everything before it.

use std::fs;
use std::path::Path;

use crate::codec::{le_u32, le_u64};
use crate::config::LogConfig;
use crate::error::{Error, IoContext, Result};
use crate::segment::{sync_dir, write_file_atomically};

/// Name of the snapshot file inside a partition directory.
pub const SNAPSHOT_FILE: &str = "snapshot";
const MAGIC: [u8; 8] = *b"WFTSNP01";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8;
/// Largest snapshot payload accepted when reading (a bound on what a damaged length can ask for).
pub const SNAPSHOT_BYTES_MAX: usize = 1 << 30;

/// Replaces the snapshot in `dir` with `payload`, durably, before returning.
pub fn write_snapshot(dir: &Path, payload: &[u8], config: &LogConfig) -> Result<()> {
    if payload.len() > SNAPSHOT_BYTES_MAX {
        return Err(Error::InvalidConfig {
            key: "snapshot",
            reason: format!(
                "a snapshot of {} bytes exceeds {SNAPSHOT_BYTES_MAX}",
                payload.len()
            ),
        });
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    write_file_atomically(&dir.join(SNAPSHOT_FILE), &bytes, config)?;
    sync_dir(dir, config)
}

/// The payload of the snapshot in `dir`, or None when there is none.
pub fn read_snapshot(dir: &Path) -> Result<Option<Vec<u8>>> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).io("read snapshot", &path),
    };
    let damaged = |detail: String| Error::Corruption {
        segment: path.clone(),
        position: 0,
        detail,
    };
    if bytes.len() < HEADER_LEN + 4 || bytes[..8] != MAGIC {
        return Err(damaged("not a snapshot file (magic or length)".into()));
    }
    let version = le_u32(&bytes[8..12]);
    if version != VERSION {
        return Err(damaged(format!("unknown snapshot version {version}")));
    }
    let len = le_u64(&bytes[12..20]);
    if len > SNAPSHOT_BYTES_MAX as u64 || HEADER_LEN as u64 + len + 4 != bytes.len() as u64 {
        return Err(damaged(format!(
            "payload length {len} does not match the file's {} bytes",
            bytes.len()
        )));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = le_u32(crc);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(damaged(format!(
            "snapshot CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    Ok(Some(body[HEADER_LEN..].to_vec()))
}
