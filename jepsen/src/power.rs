//! Power loss and file corruption, done to the data directory of a broker that is down.
//!
//! Power loss reads the broker's sync journal (`WEFT_SYNC_JOURNAL`, written by a broker built with
//! the test-only `sync-journal` feature): one line per durable event, `S <len> <path>` (at least
//! the first `<len>` bytes of `<path>` are durable) or `R <len> <path>` (`<path>` now durably holds
//! exactly `<len>` bytes). Each partition file is cut back to what it durably held, plus a torn
//! tail (part of the lost bytes, or garbage), and files never synced disappear, as after a power
//! failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::Rng;

/// What the first `upto` bytes of the journal say each file durably holds (path -> length), and
/// the files replaced whole after that point.
pub fn durable_lengths(
    journal: &Path,
    upto: usize,
) -> Result<(HashMap<PathBuf, u64>, Vec<PathBuf>)> {
    let text = std::fs::read_to_string(journal)
        .with_context(|| format!("reading the sync journal {}", journal.display()))?;
    let upto = text[..upto.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let replaced_later = text[upto..]
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let (kind, len, path) = (parts.next()?, parts.next()?, parts.next()?);
            (kind == "R" && len != "0").then(|| PathBuf::from(path))
        })
        .collect();
    let mut lengths: HashMap<PathBuf, u64> = HashMap::new();
    for line in text[..upto].lines() {
        let mut parts = line.splitn(3, ' ');
        let (Some(kind), Some(len), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("malformed journal line {line:?}");
        };
        let len: u64 = len
            .parse()
            .with_context(|| format!("journal line {line:?}"))?;
        let path = PathBuf::from(path);
        match kind {
            "R" => {
                lengths.insert(path, len);
            }
            "S" => {
                let entry = lengths.entry(path).or_insert(0);
                *entry = (*entry).max(len);
            }
            other => bail!("unknown journal record {other:?}"),
        }
    }
    Ok((lengths, replaced_later))
}

/// Every file under `root` whose directory holds segment data files (`*.log`): the partition logs.
pub fn partition_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    collect_partition_files(root, &mut out)?;
    out.sort();
    Ok(out)
}

fn collect_partition_files(root: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    let mut files = Vec::new();
    let mut is_log_dir = false;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            collect_partition_files(&path, out)?;
        } else {
            is_log_dir |= path.extension().is_some_and(|e| e == "log");
            files.push(path);
        }
    }
    if is_log_dir {
        out.extend(files);
    }
    Ok(())
}

/// A power loss at the moment the journal was `journal_len` bytes long: each partition file
/// keeps what was synced by then; the rest of a segment data file is lost, kept in part, or
/// replaced by garbage; files not yet synced disappear. Files replaced whole after the moment
/// (snapshots, log metadata) cannot be rolled back, so the moment then moves to the end of the
/// journal. Returns how many files lost bytes.
pub fn power_loss(
    data_dir: &Path,
    journal: &Path,
    journal_len: usize,
    rng: &mut impl Rng,
) -> Result<usize> {
    let (durable, replaced_later) = durable_lengths(journal, journal_len)?;
    let durable = if replaced_later.iter().any(|p| {
        p.extension()
            .is_none_or(|e| e != "index" && e != "timeindex")
    }) {
        durable_lengths(journal, usize::MAX)?.0
    } else {
        durable
    };
    let files = partition_files(data_dir)?;
    let mut cut = 0;
    for path in files {
        let Some(&synced) = durable.get(&path) else {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the unsynced {}", path.display()))?;
            cut += 1;
            continue;
        };
        let content =
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let synced = (synced as usize).min(content.len());
        let unsynced = &content[synced..];
        if unsynced.is_empty() {
            continue;
        }
        cut += 1;
        let mut kept = content[..synced].to_vec();
        if path.extension().is_some_and(|e| e == "log") {
            match rng.random_range(0..3) {
                0 => {}
                1 => kept.extend_from_slice(&unsynced[..rng.random_range(0..=unsynced.len())]),
                _ => kept.extend((0..rng.random_range(1..2000)).map(|_| rng.random::<u8>())),
            }
        }
        std::fs::write(&path, kept).with_context(|| format!("cutting {} back", path.display()))?;
    }
    Ok(cut)
}

/// The segment data files (longer than a header) under `data_dir`: partitions' only, or the
/// controller's too.
fn segment_files(data_dir: &Path, partitions_only: bool) -> Result<Vec<PathBuf>> {
    Ok(partition_files(data_dir)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter(|p| !partitions_only || p.components().any(|c| c.as_os_str() == "topics"))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 64))
        .collect())
}

/// Damages the segment data files of a broker that is down: in a few of them, random bit flips,
/// truncation, a chunk of zeros where data was, or a chunk rolled back to older bytes. Returns a
/// description of each.
pub fn corrupt(data_dir: &Path, rng: &mut impl Rng) -> Result<Vec<String>> {
    // Partitions' and the controller's segment files.
    let segments = segment_files(data_dir, false)?;
    let mut done = Vec::new();
    if segments.is_empty() {
        return Ok(done);
    }
    for _ in 0..rng.random_range(1..=3usize) {
        let path = &segments[rng.random_range(0..segments.len())];
        let mut content =
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let len = content.len();
        let what = match rng.random_range(0..4) {
            3 if len > 2 => {
                // An older chunk where newer data was (a lost or misdirected write): bytes from
                // earlier in the file copied over later ones.
                let to = rng.random_range(1..len);
                let from = rng.random_range(0..to);
                let n = rng.random_range(1..=4096).min(len - to).min(to - from);
                content.copy_within(from..from + n, to);
                format!("{n} bytes at {to} rolled back to those at {from}")
            }
            0 => {
                let flips = rng.random_range(1..=8);
                for _ in 0..flips {
                    let at = rng.random_range(0..len);
                    content[at] ^= 1 << rng.random_range(0..8);
                }
                format!("{flips} bit flips")
            }
            1 => {
                let keep = rng.random_range(0..len);
                content.truncate(keep);
                format!("truncated from {len} to {keep} bytes")
            }
            _ => {
                let at = rng.random_range(0..len);
                let n = rng.random_range(1..=4096).min(len - at);
                content[at..at + n].fill(0);
                format!("{n} bytes at {at} zeroed")
            }
        };
        std::fs::write(path, &content).with_context(|| format!("writing {}", path.display()))?;
        done.push(format!("{}: {what}", path.display()));
    }
    Ok(done)
}

/// Changes one character of the checksum part of 8 to 32 stored values (`s<N>-<M>-<8 hex>`) in
/// one to three partition segment files of a broker that is down: damage inside records only,
/// which nothing but a batch CRC catches (frames and record headers stay intact). For the
/// crc-off canary. Returns a description of each.
pub fn flip_bits(data_dir: &Path, rng: &mut impl Rng) -> Result<Vec<String>> {
    let segments = segment_files(data_dir, true)?;
    let mut done = Vec::new();
    if segments.is_empty() {
        return Ok(done);
    }
    for _ in 0..rng.random_range(1..=3usize) {
        let path = &segments[rng.random_range(0..segments.len())];
        let mut content =
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let checksums = value_checksums(&content);
        if checksums.is_empty() {
            continue;
        }
        let count = rng.random_range(8..=32).min(checksums.len());
        for _ in 0..count {
            let at = checksums[rng.random_range(0..checksums.len())] + rng.random_range(0..8);
            content[at] ^= 1;
        }
        std::fs::write(path, &content).with_context(|| format!("writing {}", path.display()))?;
        done.push(format!("{}: {count} values changed", path.display()));
    }
    Ok(done)
}

/// Where the 8-hex-digit checksums of stored values (`s<N>-<M>-<8 hex>`) start in `bytes`.
fn value_checksums(bytes: &[u8]) -> Vec<usize> {
    let digits = |from: usize| {
        bytes[from..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b's' {
            let a = digits(i + 1);
            let dash1 = i + 1 + a;
            if a > 0 && bytes.get(dash1) == Some(&b'-') {
                let b = digits(dash1 + 1);
                let dash2 = dash1 + 1 + b;
                if b > 0
                    && bytes.get(dash2) == Some(&b'-')
                    && bytes
                        .get(dash2 + 1..dash2 + 9)
                        .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
                {
                    out.push(dash2 + 1);
                    i = dash2 + 9;
                    continue;
                }
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{make_value, value_is_intact};

    #[test]
    fn stored_values_are_found_and_changed_values_fail_their_check() {
        let a = make_value(3, 17);
        let b = make_value(12, 4001);
        let mut bytes = b"\x00\x07frame\x01".to_vec();
        bytes.extend_from_slice(a.as_bytes());
        bytes.extend_from_slice(b"\x02s1-x-12345678\x03");
        bytes.extend_from_slice(b.as_bytes());
        bytes.push(4);
        let found = value_checksums(&bytes);
        assert_eq!(found.len(), 2, "{found:?}");
        for at in found {
            let mut changed = bytes.clone();
            changed[at + 3] ^= 1;
            let text = String::from_utf8_lossy(&changed).into_owned();
            let values: Vec<&str> = text
                .split(|c: char| c.is_control())
                .filter(|part| part.starts_with('s') && !part.contains('x'))
                .collect();
            assert_eq!(values.len(), 2, "{values:?}");
            assert_eq!(
                values.iter().filter(|v| !value_is_intact(v)).count(),
                1,
                "exactly the changed value fails its check: {values:?}"
            );
        }
    }
}
