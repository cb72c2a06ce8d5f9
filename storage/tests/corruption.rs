//! Bit flips in durable data. Every flip must be detected: the read that reaches the damaged frame
//! fails with `Error::Corruption` naming the segment file and the frame's position, and nothing
//! read before it differs from what was written.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use rand::Rng;
use weft_storage::{Batch, DamagedRange, Error, FRAME_HEADER_LEN, LogConfig, PartitionLog};

/// Frame start positions and synced_len fields of a pristine data file.
fn frames(bytes: &[u8]) -> Vec<(usize, usize, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let batch_len =
            u32::from_le_bytes(bytes[pos + 20..pos + 24].try_into().expect("4 bytes")) as usize;
        let synced = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().expect("8 bytes"));
        let len = FRAME_HEADER_LEN + batch_len;
        out.push((pos, len, synced));
        pos += len;
    }
    assert_eq!(pos, bytes.len());
    out
}

/// The log's data files, in order.
fn data_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

fn snapshot(dir: &Path) -> HashMap<PathBuf, Vec<u8>> {
    fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = fs::read(&p).expect("read");
            (p, bytes)
        })
        .collect()
}

fn restore(dir: &Path, files: &HashMap<PathBuf, Vec<u8>>) {
    for entry in fs::read_dir(dir).expect("ls") {
        let path = entry.expect("entry").path();
        if path.is_file() && !files.contains_key(&path) {
            fs::remove_file(&path).expect("rm");
        }
    }
    for (path, bytes) in files {
        fs::write(path, bytes).expect("restore");
    }
}

/// Reads the whole log by offset and by Raft index. Returns the first error of each, checking that
/// every batch returned before it equals the pristine one.
fn read_until_error(log: &PartitionLog, pristine: &[Batch]) -> (Option<Error>, Option<Error>) {
    let by_index: HashMap<u64, &Batch> = pristine.iter().map(|b| (b.header().index, b)).collect();
    let end = log.end();
    let mut offset_error = None;
    let mut from = log.start_offset();
    while from < end.next_offset {
        match log.read(from, 4096, end.next_offset) {
            Ok(batches) => {
                assert!(!batches.is_empty());
                for b in &batches {
                    assert_eq!(
                        b.bytes(),
                        by_index[&b.header().index].bytes(),
                        "corrupted bytes served"
                    );
                }
                from = batches.last().expect("some").header().next_offset();
            }
            Err(e) => {
                offset_error = Some(e);
                break;
            }
        }
    }
    let mut index_error = None;
    let mut from = log.first_index().unwrap_or(end.next_index);
    while from < end.next_index {
        match log.read_entries(from, end.next_index, 4096) {
            Ok(batches) => {
                for b in &batches {
                    assert_eq!(
                        b.bytes(),
                        by_index[&b.header().index].bytes(),
                        "corrupted bytes served"
                    );
                }
                from = batches.last().expect("some").header().index + 1;
            }
            Err(e) => {
                index_error = Some(e);
                break;
            }
        }
    }
    (offset_error, index_error)
}

fn assert_names(error: Option<Error>, file: &Path, frame_start: usize, what: &str) {
    match error {
        Some(Error::Corruption {
            segment, position, ..
        }) => {
            assert_eq!(segment, file, "{what}: names the segment");
            assert_eq!(
                position, frame_start as u64,
                "{what}: names the damaged frame's position"
            );
        }
        other => panic!(
            "{what}: flip in {} frame at {frame_start} not detected: {other:?}",
            file.display()
        ),
    }
}

#[test]
fn every_bit_flip_in_a_cleanly_closed_log_is_detected() {
    let seed = seed("every_bit_flip_in_a_cleanly_closed_log_is_detected");
    let mut rng = rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    for _ in 0..120 {
        append_random(&mut log, &mut rng, 200);
    }
    let pristine = read_all_entries(&log).expect("read");
    log.close().expect("close");
    let files = snapshot(dir.path());
    let data: Vec<&PathBuf> = {
        let mut d: Vec<_> = files
            .keys()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        d.sort();
        d
    };
    let trials = 400;
    for trial in 0..trials {
        restore(dir.path(), &files);
        let file = data[rng.random_range(0..data.len())];
        let bytes = &files[file];
        let at = rng.random_range(0..bytes.len());
        let mut flipped = bytes.clone();
        flipped[at] ^= 1 << rng.random_range(0..8);
        fs::write(file, &flipped).expect("flip");
        let (frame_start, _, _) = frames(bytes)
            .into_iter()
            .find(|(s, l, _)| (*s..s + l).contains(&at))
            .expect("frame");

        let log = PartitionLog::open(dir.path(), small_config()).expect("open after a flip");
        let what = format!("seed {seed} trial {trial}, byte {at}");
        let (by_offset, by_index) = read_until_error(&log, &pristine);
        assert_names(by_index, file, frame_start, &format!("{what} (by index)"));
        // Reads by offset must detect every flip in a frame that holds records (control entries,
        // which hold none, are checked by the reads by index above).
        if frame_holds_records(bytes, frame_start) {
            assert_names(by_offset, file, frame_start, &format!("{what} (by offset)"));
        }
    }
}

fn frame_holds_records(bytes: &[u8], frame_start: usize) -> bool {
    let at = frame_start + FRAME_HEADER_LEN + 12;
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) > 0
}

#[test]
fn flips_in_the_tail_after_a_crash_are_reported_never_served() {
    let seed = seed("flips_in_the_tail_after_a_crash_are_reported_never_served");
    let mut rng = rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    // One big segment so everything is in the tail; flush every few appends (group commit).
    let config = LogConfig {
        segment_bytes_max: 1 << 20,
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    for i in 0..80 {
        append_random(&mut log, &mut rng, 200);
        if i % 3 == 2 {
            log.flush().expect("flush");
        }
    }
    log.flush().expect("flush");
    let pristine = read_all_entries(&log).expect("read");
    drop(log); // unclean: the next open scans the tail
    let file = fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("data");
    // Only frames: flips in a direct write's zero padding are tested in log_basics.
    cut_direct_padding(dir.path(), &config);
    let files = snapshot(dir.path());
    let layout = frames(&files[&file]);
    let (mut as_corruption, mut as_torn) = (0, 0);
    for trial in 0..300 {
        restore(dir.path(), &files);
        let bytes = &files[&file];
        let at = rng.random_range(0..bytes.len());
        let mut flipped = bytes.clone();
        flipped[at] ^= 1 << rng.random_range(0..8);
        fs::write(&file, &flipped).expect("flip");
        let (frame_start, _, _) = *layout
            .iter()
            .find(|(s, l, _)| (*s..s + l).contains(&at))
            .expect("frame");
        // Durable beyond doubt when a later frame was written after a sync that covered this one.
        let proven = layout
            .iter()
            .any(|(s, _, synced)| *s > frame_start && *synced as usize > frame_start);

        let log = PartitionLog::open(dir.path(), config.clone()).expect("open after a flip");
        let report = log.recovery_report();
        let what = format!("seed {seed} trial {trial}, byte {at}, frame {frame_start}");
        if proven {
            assert!(
                report
                    .corruptions
                    .iter()
                    .any(|c| c.segment == file && c.position == frame_start as u64),
                "{what}: durable damage must be reported as corruption: {report:?}"
            );
            assert_eq!(
                report.torn_tail, None,
                "{what}: durable data must not be cut"
            );
            let (_, by_index) = read_until_error(&log, &pristine);
            assert_names(by_index, &file, frame_start, &what);
            as_corruption += 1;
        } else {
            // The last group before the crash: indistinguishable from a torn write, so it is cut and
            // reported as a torn tail at that frame (the replicas hold it; see FORMAT.md).
            let torn = report.torn_tail.as_ref().expect("reported as a torn tail");
            assert_eq!(torn.position, frame_start as u64, "{what}");
            let (e1, e2) = read_until_error(&log, &pristine);
            assert!(
                e1.is_none() && e2.is_none(),
                "{what}: the rest reads cleanly"
            );
            as_torn += 1;
        }
    }
    assert!(
        as_corruption > as_torn,
        "most of the tail is provably durable ({as_corruption} vs {as_torn})"
    );
}

/// A read that runs into damage returns what it read before it, also when the damage is the
/// first frame of the next segment; the read that starts at the damage fails; `map_damage`
/// bounds the damaged range by the intact entries around it, after which every entry past the
/// range reads again, by Raft index and by offset.
#[test]
fn damaged_ranges_are_bounded_by_the_intact_entries_around_them() {
    for first_frame in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rng(21);
        let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
        let expected: Vec<Expected> = (0..300)
            .map(|_| append_random(&mut log, &mut rng, 200))
            .collect();
        log.close().expect("close");

        let segments = data_files(dir.path());
        assert!(segments.len() > 4, "several segments");
        let victim = &segments[segments.len() / 2];
        let mut bytes = fs::read(victim).expect("read");
        let positions = frames(&bytes);
        let (position, len, _) = if first_frame {
            positions[0]
        } else {
            positions[positions.len() / 2]
        };
        bytes[position + len - 3] ^= 0x40;
        fs::write(victim, &bytes).expect("damage");

        let mut log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
        let end = log.end().next_index;
        let mut from = log.first_index().expect("entries");
        let error = loop {
            match log.read_entries(from, end, 64 * 1024) {
                Ok(batches) => {
                    assert!(!batches.is_empty(), "a read at {from} returned nothing");
                    for batch in &batches {
                        let want = &expected[batch.header().index as usize];
                        assert_eq!(batch.bytes(), &want.bytes, "an intact entry");
                    }
                    from = batches.last().expect("batches").header().index + 1;
                    assert!(from < end, "read past the damage without an error");
                }
                Err(error) => break error,
            }
        };
        match &error {
            Error::Corruption {
                segment,
                position: at,
                ..
            } => {
                assert_eq!(segment, victim);
                assert_eq!(*at, position as u64, "the damaged frame is named");
            }
            other => panic!("expected corruption, got {other:?}"),
        }

        let range = log
            .map_damage(from)
            .expect("map damage")
            .expect("a damaged range");
        assert_eq!(range.segment, *victim);
        assert_eq!(range.position, position as u64);
        assert_eq!(range.resumes_at, Some((position + len) as u64));
        assert_eq!(range.first_index, from);
        assert_eq!(range.next_index, from + 1, "one entry is damaged");
        assert_eq!(range.first_offset, expected[from as usize].base_offset);
        assert_eq!(range.next_offset, expected[from as usize + 1].base_offset);
        assert_eq!(range.term, Some(1));
        assert_eq!(log.damaged_ranges(), std::slice::from_ref(&range));
        assert_eq!(log.map_damage(from).expect("again"), Some(range.clone()));

        // Everything after the range reads, by index and by offset.
        let mut next = range.next_index;
        while next < end {
            let batches = log
                .read_entries(next, end, 64 * 1024)
                .expect("after the damage");
            for batch in &batches {
                assert_eq!(
                    batch.bytes(),
                    &expected[batch.header().index as usize].bytes
                );
            }
            next = batches.last().expect("batches").header().index + 1;
        }
        let after = log
            .read(range.next_offset, 1 << 20, log.end().next_offset)
            .expect("read by offset after the damage");
        assert!(!after.is_empty());
        assert!(after[0].header().base_offset <= range.next_offset);
        assert!(after[0].header().next_offset() > range.next_offset);
        // The damaged entry itself still fails.
        assert!(matches!(
            log.read_entries(from, from + 1, 1),
            Err(Error::Corruption { .. })
        ));
    }
}

/// Reads the log by Raft index until a read fails with corruption, and maps the damaged range
/// there.
fn first_damaged_range(log: &mut PartitionLog) -> DamagedRange {
    let end_index = log.end().next_index;
    let mut from = log.first_index().expect("entries");
    loop {
        match log.read_entries(from, end_index, 64 * 1024) {
            Ok(batches) => from = batches.last().expect("batches").header().index + 1,
            Err(Error::Corruption { .. }) => break,
            Err(other) => panic!("{other}"),
        }
    }
    log.map_damage(from)
        .expect("map damage")
        .expect("a damaged range")
}

/// The entries with Raft indexes `indexes`, one batch each, as appended.
fn entries_of(expected: &[Expected], indexes: std::ops::Range<u64>) -> Vec<Vec<Batch>> {
    indexes
        .map(|i| vec![Batch::decode(expected[i as usize].bytes.clone()).expect("batch")])
        .collect()
}

/// A damaged range is repaired with the same entries from another replica: the frames written
/// over it fill it exactly, every entry reads again (also after a reopen), and the range is
/// forgotten. Entries that do not fit the range are refused and nothing is written.
#[test]
fn a_damaged_range_is_repaired_with_the_same_entries_from_another_copy() {
    for first_frame in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rng(33);
        let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
        let expected: Vec<Expected> = (0..300)
            .map(|_| append_random(&mut log, &mut rng, 200))
            .collect();
        log.close().expect("close");
        let segments = data_files(dir.path());
        let victim = &segments[segments.len() / 2];
        let pristine = fs::read(victim).expect("read");
        let mut bytes = pristine.clone();
        let positions = frames(&bytes);
        // Zero two whole frames and a bit of a third (a chunk lost), or flip one bit.
        let (position, _, _) = if first_frame {
            positions[0]
        } else {
            positions[positions.len() / 2]
        };
        let at = positions
            .iter()
            .position(|p| p.0 == position)
            .expect("frame");
        let end = positions.get(at + 2).map_or(bytes.len(), |p| p.0 + 5);
        bytes[position..end].fill(0);
        fs::write(victim, &bytes).expect("damage");

        let mut log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
        let end_index = log.end().next_index;
        let range = first_damaged_range(&mut log);
        let entries = entries_of(&expected, range.first_index..range.next_index);

        // The wrong entries are refused: one too few, or another range's.
        assert!(log.repair(&range, &entries[1..]).is_err());
        let shifted = entries_of(&expected, range.first_index + 1..range.next_index + 1);
        assert!(log.repair(&range, &shifted).is_err());
        assert_eq!(log.damaged_ranges(), std::slice::from_ref(&range));

        log.repair(&range, &entries).expect("repair");
        assert!(log.damaged_ranges().is_empty());
        let check = |log: &PartitionLog| {
            let mut next = log.first_index().expect("entries");
            while next < end_index {
                let batches = log
                    .read_entries(next, end_index, 64 * 1024)
                    .expect("every entry reads again");
                for batch in &batches {
                    assert_eq!(
                        batch.bytes(),
                        &expected[batch.header().index as usize].bytes
                    );
                }
                next = batches.last().expect("batches").header().index + 1;
            }
        };
        check(&log);
        drop(log);
        let log = PartitionLog::open(dir.path(), small_config()).expect("reopen after repair");
        assert!(
            log.recovery_report().corruptions.is_empty(),
            "{:?}",
            log.recovery_report()
        );
        check(&log);
    }
}

/// Raft truncates a replica's log (a conflict with the leader) at or after damaged entries of
/// the same segment, before the damage was repaired. It failed on the damage ("when Write
/// Logs: corrupt data ... batch CRC mismatch", found by `weft-jepsen long`, corruption-minority:
/// the partition's Raft group stopped for good), and a cut just after a damaged frame left the
/// log's end one entry short. Now: a cut after the damage is exact, a cut at or inside the
/// damage cuts at its start, and the offsets go on from the cut.
#[test]
fn truncation_after_at_or_inside_damaged_entries_works() {
    // Where the cut falls: after the damaged entries, at the first, inside them (two damaged).
    for case in ["after", "at", "inside"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rng(33);
        let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
        let expected: Vec<Expected> = (0..300)
            .map(|_| append_random(&mut log, &mut rng, 200))
            .collect();
        log.close().expect("close");
        let segments = data_files(dir.path());
        let victim = &segments[segments.len() / 2];
        let mut bytes = fs::read(victim).expect("read");
        let positions = frames(&bytes);
        assert!(positions.len() >= 3, "frames after the damaged one");
        let (position, len, _) = positions[positions.len() / 2];
        bytes[position + len - 3] ^= 0x40;
        if case == "inside" {
            // A damaged range of two entries: the first frame's header is unreadable, so the
            // search for where intact frames resume passes the second (damaged too).
            bytes[position] ^= 0xff;
            let (position, len, _) = positions[positions.len() / 2 + 1];
            bytes[position + len - 3] ^= 0x40;
        }
        fs::write(victim, &bytes).expect("damage");

        let mut log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
        // The damaged entry: the first index whose read fails.
        let end = log.end().next_index;
        let damaged = (log.first_index().expect("entries")..end)
            .find(|&i| log.read_entries(i, i + 1, 1 << 20).is_err())
            .expect("a damaged entry");
        let asked = match case {
            "after" => damaged + 1,
            "at" => damaged,
            _ => damaged + 1,
        };
        if case == "inside" {
            assert!(
                log.read_entries(asked, asked + 1, 1 << 20).is_err(),
                "two damaged entries"
            );
        }
        log.truncate_from_index(asked)
            .unwrap_or_else(|e| panic!("truncate at {asked} (damage at {damaged}): {e}"));
        // Inside damage the cut is at the damage's first entry.
        // Inside damage the cut is at the damage's start when the frames there cannot be told
        // apart (the search for where frames resume passed them), else exactly at the entry.
        let cut = log.end().next_index;
        if case == "inside" {
            assert!(
                cut == asked || cut == damaged,
                "cut at {cut}, asked {asked}"
            );
        }
        assert_eq!(log.end().next_index, cut);
        assert_eq!(
            log.end().next_offset,
            expected[cut as usize].base_offset,
            "the offsets go on from the cut"
        );
        log.close().expect("close");

        let log = PartitionLog::open(dir.path(), small_config()).expect("reopen after the cut");
        assert_eq!(log.end().next_index, cut, "the cut is durable");
        for i in log.first_index().expect("entries")..cut {
            let read = log.read_entries(i, i + 1, 1 << 20);
            if i == damaged {
                assert!(matches!(read, Err(Error::Corruption { .. })), "entry {i}");
            } else {
                let batches = read.unwrap_or_else(|e| panic!("entry {i}: {e}"));
                assert_eq!(batches[0].bytes(), &expected[i as usize].bytes, "entry {i}");
            }
        }
        // The log goes on from the cut.
        let mut log = log;
        let next = log.end();
        assert_eq!(next.next_index, cut);
        append_random(&mut log, &mut rng, 200);
        assert_eq!(log.end().next_index, cut + 1);
    }
}

/// A repair inside the last block of the active segment stays repaired when the log then writes
/// with direct I/O: the writer's copy of that block (read before the repair, damage included)
/// is not written back over the repaired bytes.
#[test]
fn a_repair_in_the_last_block_survives_later_direct_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(34);
    let config = LogConfig {
        direct_io: true,
        segment_bytes_max: 1 << 20,
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let mut expected: Vec<Expected> = (0..6)
        .map(|_| append_random(&mut log, &mut rng, 40))
        .collect();
    log.close().expect("close");
    let segment = fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("data file");
    let mut bytes = fs::read(&segment).expect("read");
    assert!(bytes.len() < 4096, "every frame in the one last block");
    let positions = frames(&bytes);
    let (position, len, _) = positions[2];
    bytes[position + len / 2] ^= 0x10;
    fs::write(&segment, &bytes).expect("damage");

    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("reopen");
    let range = first_damaged_range(&mut log);
    assert!(range.resumes_at.is_some(), "intact frames follow it");
    // A direct write reads the last block, damage included, before the repair.
    expected.push(append_random(&mut log, &mut rng, 40));
    log.flush().expect("flush");
    let entries = entries_of(&expected, range.first_index..range.next_index);
    log.repair(&range, &entries).expect("repair");
    // The next direct write covers the same block again.
    expected.push(append_random(&mut log, &mut rng, 40));
    log.flush().expect("flush");
    drop(log);

    let log = PartitionLog::open(dir.path(), config).expect("reopen after the repair");
    assert!(
        log.recovery_report().corruptions.is_empty(),
        "the repair was undone: {:?}",
        log.recovery_report()
    );
    let got = read_all_entries(&log).expect("every entry reads");
    assert_eq!(got.len(), expected.len());
    for (batch, want) in got.iter().zip(&expected) {
        assert_eq!(batch.bytes(), &want.bytes);
    }
}

/// Frames at the end of a sealed segment that read back as zeros (a lost write, or a
/// filesystem's zero-filled blocks after a crash) look like the padding a direct write leaves
/// when the file ends on a block boundary. Real padding (a roll's cut of it had not reached the
/// disk) is cut at open with nothing reported; zeros in place of frames that the next segment
/// continues from are reported as corruption, and a read of the lost entries fails instead of
/// skipping them (before: the zeros were cut as padding and reads by offset jumped the gap).
#[test]
fn zeroed_frames_at_the_end_of_a_sealed_segment_are_damage_not_padding() {
    let seed = seed("zeroed_frames_at_the_end_of_a_sealed_segment_are_damage_not_padding");
    let mut rng = rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config();
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    while log.segment_count() < 3 {
        append_random(&mut log, &mut rng, 150);
        log.flush().expect("flush");
    }
    let pristine = read_all_entries(&log).expect("read");
    log.close().expect("close");
    let files = snapshot(dir.path());
    let mut data: Vec<&PathBuf> = files
        .keys()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    data.sort();
    // The first sealed segment, its index files gone (as after a crash during the roll that
    // sealed it), so the next open scans it; its file made to end on a block boundary.
    let sealed = data[0].clone();
    let original = &files[&sealed];
    let layout = frames(original);
    let end = original.len().next_multiple_of(4096);
    let without_index = |bytes: &[u8]| {
        restore(dir.path(), &files);
        fs::write(&sealed, bytes).expect("write");
        for ext in ["index", "timeindex"] {
            fs::remove_file(sealed.with_extension(ext)).expect("remove index file");
        }
    };

    // Real padding: zeros after the last frame.
    let mut padded = original.clone();
    padded.resize(end, 0);
    assert!(padded.len() > original.len(), "seed {seed}: padding added");
    without_index(&padded);
    let log = PartitionLog::open(dir.path(), config.clone()).expect("open with padding");
    let report = log.recovery_report();
    assert!(
        report.corruptions.is_empty() && report.torn_tail.is_none(),
        "seed {seed}: padding is not damage: {report:?}"
    );
    let (by_offset, by_index) = read_until_error(&log, &pristine);
    assert!(
        by_offset.is_none() && by_index.is_none(),
        "seed {seed}: everything reads after padding: {by_offset:?} {by_index:?}"
    );
    assert_eq!(
        read_all_entries(&log).expect("read").len(),
        pristine.len(),
        "seed {seed}"
    );
    drop(log);
    assert_eq!(
        fs::metadata(&sealed).expect("stat").len(),
        original.len() as u64,
        "seed {seed}: the padding was cut"
    );

    // Zeros in place of the last frames, up to the same block boundary.
    let (zeroed_from, _, _) = *layout
        .iter()
        .find(|(start, _, _)| end - start < 4096)
        .expect("a frame within a block of the end");
    let mut zeroed = original.clone();
    zeroed[zeroed_from..].fill(0);
    zeroed.resize(end, 0);
    without_index(&zeroed);
    let log = PartitionLog::open(dir.path(), config.clone()).expect("open after the zeros");
    let report = log.recovery_report();
    assert!(
        report
            .corruptions
            .iter()
            .any(|c| c.segment == sealed && c.position == zeroed_from as u64),
        "seed {seed}: zeroed frames of a sealed segment must be reported where they begin: {report:?}"
    );
    let (by_offset, by_index) = read_until_error(&log, &pristine);
    assert_names(by_offset, &sealed, zeroed_from, "read by offset");
    assert_names(by_index, &sealed, zeroed_from, "read by index");
}

/// A frame found by searching past damage counts only if it could have been written there: a
/// genuine frame never says more bytes were durable before it than its own position. A record
/// may carry the bytes of a whole Weft frame (an archived segment, a crafted value); before,
/// when a crash tore the frame holding such a record, the embedded frame's claimed durable
/// length made the scan report the torn tail as damage to durable data, and accept the embedded
/// frame as an entry of the log, with whatever offset and index it carried.
#[test]
fn a_frame_inside_a_record_never_proves_a_torn_tail_durable() {
    let mut rng = rng(84);
    // The frame to embed: an entry far ahead, written after 40 KiB were synced.
    let other = tempfile::tempdir().expect("tempdir");
    let big = LogConfig {
        segment_bytes_max: 1 << 20,
        ..small_config()
    };
    let mut log = PartitionLog::open(other.path(), big.clone()).expect("open");
    log.reset(weft_storage::LogPosition {
        next_offset: 1_000_000,
        next_index: 1_000_000,
    })
    .expect("reset");
    while log.end().next_offset < 1_000_100 {
        append_random(&mut log, &mut rng, 400);
    }
    log.flush().expect("flush");
    let file = other.path().join(format!("{:020}.log", 1_000_000));
    let at = fs::metadata(&file).expect("stat").len() as usize;
    assert!(at > 20_000, "{at}");
    append_random(&mut log, &mut rng, 400);
    drop(log);
    let embedded = fs::read(&file).expect("read")[at..].to_vec();

    // A log whose last entry carries that frame as a record value, then a crash that tore the
    // start of that entry's frame.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = PartitionLog::open(dir.path(), big).expect("open");
    for _ in 0..5 {
        append_random(&mut log, &mut rng, 200);
    }
    log.flush().expect("flush");
    let kept = read_all_entries(&log).expect("read");
    let end = log.end();
    let mut builder = weft_storage::BatchBuilder::new();
    builder.push(1_700_000_000_000, b"k", &embedded, []);
    let batch = builder.seal(
        end.next_offset,
        1,
        end.next_index,
        weft_storage::ProducerInfo {
            producer_id: 1,
            producer_epoch: 0,
            base_sequence: end.next_offset,
        },
    );
    log.append(&batch).expect("append");
    let data = dir.path().join(format!("{:020}.log", 0));
    let torn_at =
        fs::metadata(&data).expect("stat").len() - batch.len() as u64 - FRAME_HEADER_LEN as u64;
    drop(log);
    let mut bytes = fs::read(&data).expect("read");
    for b in &mut bytes[torn_at as usize..torn_at as usize + 16] {
        *b = 0xa5;
    }
    fs::write(&data, &bytes).expect("write");

    let log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
    let report = log.recovery_report();
    assert!(report.corruptions.is_empty(), "{report:?}");
    assert_eq!(
        report.torn_tail.as_ref().map(|t| t.position),
        Some(torn_at),
        "{report:?}"
    );
    assert_eq!(log.end(), end, "the log ends where the torn entry began");
    let got = read_all_entries(&log).expect("read");
    assert_eq!(got.len(), kept.len());
    for (got, want) in got.iter().zip(&kept) {
        assert_eq!(got.bytes(), want.bytes());
    }
}

/// A sealed segment cut short (a file system that lost the end of a file, a mistaken
/// `truncate`): at a frame boundary, to nothing, or inside its first frame, with its index
/// files kept or gone. The entries it lost, up to the next segment, are damage: reported at
/// open, a read of them by offset or by Raft index fails naming the segment (never skipping
/// to the next segment's entries), and `map_damage` bounds them by the next segment's first
/// entry, so a replica can repair them. Everything before the cut still reads.
#[test]
fn a_sealed_segment_cut_short_is_damage_never_a_gap() {
    for (cut, keep_index, victim_at) in [
        ("at a frame boundary", true, 1),
        ("at a frame boundary", false, 1),
        ("to nothing", true, 1),
        ("to nothing", false, 0),
        ("inside its first frame", true, 1),
        ("inside its first frame", false, 0),
    ] {
        {
            let what = format!("segment {victim_at} cut {cut}, index files kept: {keep_index}");
            let dir = tempfile::tempdir().expect("tempdir");
            let mut rng = rng(97);
            let config = small_config();
            let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
            while log.segment_count() < 4 {
                append_random(&mut log, &mut rng, 150);
                log.flush().expect("flush");
            }
            let pristine = read_all_entries(&log).expect("read");
            log.close().expect("close");
            let data = data_files(dir.path());
            let victim = data[victim_at].clone();
            let bytes = fs::read(&victim).expect("read");
            let layout = frames(&bytes);
            assert!(layout.len() >= 4, "{what}: frames in the segment");
            let header_at = |position: usize| {
                let len = layout.iter().find(|f| f.0 == position).expect("a frame").1;
                *Batch::decode(bytes::Bytes::copy_from_slice(
                    &bytes[position + FRAME_HEADER_LEN..position + len],
                ))
                .expect("batch")
                .header()
            };
            let (len, lost_from) = match cut {
                "at a frame boundary" => (layout[layout.len() / 2].0, layout[layout.len() / 2].0),
                "to nothing" => (0, 0),
                _ => (10, 0),
            };
            let lost = header_at(lost_from);
            let following = fs::read(&data[victim_at + 1]).expect("read");
            let next = *Batch::decode(bytes::Bytes::copy_from_slice(
                &following[FRAME_HEADER_LEN..frames(&following)[0].1],
            ))
            .expect("the next segment's first entry")
            .header();
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&victim)
                .expect("open");
            file.set_len(len as u64).expect("cut");
            drop(file);
            if !keep_index {
                for ext in ["index", "timeindex"] {
                    let _ = fs::remove_file(victim.with_extension(ext));
                }
            }

            let mut log = PartitionLog::open(dir.path(), config.clone()).expect("reopen");
            let report = log.recovery_report();
            assert!(
                !report.corruptions.is_empty(),
                "{what}: the cut is reported: {report:?}"
            );
            let end = log.end();
            assert_eq!(
                end.next_index,
                pristine.last().expect("entries").header().index + 1,
                "{what}"
            );
            match log.read(lost.base_offset, 4096, end.next_offset) {
                Err(Error::Corruption { segment, .. }) => assert_eq!(segment, victim, "{what}"),
                other => panic!(
                    "{what}: a read of lost offset {} answered {:?}",
                    lost.base_offset,
                    other.map(|b| b.iter().map(|b| b.header().base_offset).collect::<Vec<_>>())
                ),
            }
            match log.read_entries(lost.index, end.next_index, 4096) {
                Err(Error::Corruption { segment, .. }) => assert_eq!(segment, victim, "{what}"),
                other => panic!(
                    "{what}: a read of lost index {} answered {:?}",
                    lost.index,
                    other.map(|b| b.iter().map(|b| b.header().index).collect::<Vec<_>>())
                ),
            }
            let range = log
                .map_damage(lost.index)
                .expect("map damage")
                .unwrap_or_else(|| panic!("{what}: no damaged range at {}", lost.index));
            assert_eq!(range.segment, victim, "{what}");
            assert_eq!(range.first_index, lost.index, "{what}");
            assert_eq!(range.next_index, next.index, "{what}");
            assert_eq!(range.first_offset, lost.base_offset, "{what}");
            assert_eq!(range.next_offset, next.base_offset, "{what}");
            // Before the cut and after the lost range, everything reads.
            let first = log.first_index().expect("entries");
            if lost.index > first {
                let before = log
                    .read_entries(first, lost.index, 1 << 20)
                    .expect("before");
                assert_eq!(
                    before.last().expect("some").header().index,
                    lost.index - 1,
                    "{what}"
                );
            }
            let after = log
                .read_entries(next.index, end.next_index, 1 << 20)
                .expect("after the lost range");
            assert_eq!(after[0].header().index, next.index, "{what}");

            // Repaired with the same entries from another copy: every entry reads again, also
            // after a reopen, which finds nothing wrong.
            let entries: Vec<Vec<Batch>> = (range.first_index..range.next_index)
                .map(|i| {
                    pristine
                        .iter()
                        .filter(|b| b.header().index == i)
                        .cloned()
                        .collect()
                })
                .collect();
            assert!(
                log.repair(&range, &entries[1..]).is_err(),
                "{what}: one entry short"
            );
            log.repair(&range, &entries).expect("repair");
            assert!(log.damaged_ranges().is_empty(), "{what}");
            let check = |log: &PartitionLog| {
                let got = read_all_entries(log).expect("every entry reads");
                assert_eq!(got.len(), pristine.len(), "{what}");
                for (got, want) in got.iter().zip(&pristine) {
                    assert_eq!(got.bytes(), want.bytes(), "{what}");
                }
                let (by_offset, by_index) = read_until_error(log, &pristine);
                assert!(by_offset.is_none() && by_index.is_none(), "{what}");
            };
            check(&log);
            drop(log);
            let log = PartitionLog::open(dir.path(), config.clone()).expect("reopen");
            assert!(
                log.recovery_report().corruptions.is_empty(),
                "{what}: {:?}",
                log.recovery_report()
            );
            check(&log);
        }
    }
}

/// Raft truncates a log inside the entries a segment cut short lost (a conflict with a new
/// leader), the file cut at a frame boundary or inside a frame: the log then ends where the
/// segment's intact frames end (the partial frame cut off too), and goes on from there.
#[test]
fn a_truncation_inside_the_entries_a_cut_segment_lost_ends_the_log_there() {
    for extra in [0usize, 10] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rng(98);
        let config = small_config();
        let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
        while log.segment_count() < 4 {
            append_random(&mut log, &mut rng, 150);
            log.flush().expect("flush");
        }
        log.close().expect("close");
        let data = data_files(dir.path());
        let bytes = fs::read(&data[1]).expect("read");
        let layout = frames(&bytes);
        let (cut, len, _) = layout[layout.len() / 2];
        let lost = *Batch::decode(bytes::Bytes::copy_from_slice(
            &bytes[cut + FRAME_HEADER_LEN..cut + len],
        ))
        .expect("batch")
        .header();
        fs::OpenOptions::new()
            .write(true)
            .open(&data[1])
            .expect("open")
            .set_len((cut + extra) as u64)
            .expect("cut");

        let mut log = PartitionLog::open(dir.path(), config.clone()).expect("reopen");
        log.truncate_from_index(lost.index + 1).expect("truncate");
        assert_eq!(
            log.end().next_index,
            lost.index,
            "{extra}: the log ends where the frames do"
        );
        assert_eq!(log.end().next_offset, lost.base_offset, "{extra}");
        assert_eq!(
            fs::metadata(&data[1]).expect("stat").len(),
            cut as u64,
            "{extra}: the partial frame is cut off"
        );
        assert!(log.map_damage(lost.index).expect("map").is_none());
        let end = log.end();
        let fresh = make_batch(&mut rng, 2, 50, end.next_offset, 2, end.next_index);
        log.append_entry(&[fresh]).expect("append after the cut");
        log.flush().expect("flush");
        let got = read_all_entries(&log).expect("read");
        assert_eq!(got.last().expect("entries").header().index, lost.index);
        drop(log);
        let log = PartitionLog::open(dir.path(), config).expect("reopen");
        assert_eq!(log.end().next_index, lost.index + 1, "{extra}");
        assert!(log.recovery_report().corruptions.is_empty(), "{extra}");
        read_all_entries(&log).expect("every entry reads");
    }
}

/// A purge that leaves first a segment cut to nothing records the log's start at the first
/// entry it lost, not at the next segment's: the lost entries stay damage (repairable), not
/// a hole below the log's start.
#[test]
fn a_purge_keeps_the_start_of_a_first_segment_that_lost_its_frames() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(100);
    let config = small_config();
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    while log.segment_count() < 4 {
        append_random(&mut log, &mut rng, 150);
        log.flush().expect("flush");
    }
    log.close().expect("close");
    let data = data_files(dir.path());
    let bytes = fs::read(&data[1]).expect("read");
    let first_lost = *Batch::decode(bytes::Bytes::copy_from_slice(
        &bytes[FRAME_HEADER_LEN..frames(&bytes)[0].1],
    ))
    .expect("batch")
    .header();
    fs::OpenOptions::new()
        .write(true)
        .open(&data[1])
        .expect("open")
        .set_len(0)
        .expect("cut");

    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("reopen");
    log.purge_through_index(first_lost.index - 1)
        .expect("purge");
    assert_eq!(log.first_index(), Some(first_lost.index));
    drop(log);
    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    assert_eq!(log.first_index(), Some(first_lost.index));
    assert!(matches!(
        log.read_entries(first_lost.index, log.end().next_index, 4096),
        Err(Error::Corruption { .. })
    ));
}

/// The last frame of a log closed cleanly is damaged while the node is down. The open that
/// finds the tail clean trusts its index files; if it stops there (its caller failed on the
/// damaged entry), the next open finds the log as cleanly closed as before, and does not take
/// the damage for a torn write and cut it without a word (before, the first open removed the
/// tail's index files, so the second one scanned the tail and cut the damage as a torn tail).
#[test]
fn an_open_that_stops_early_leaves_a_cleanly_closed_log_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(99);
    let config = small_config();
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    for _ in 0..20 {
        append_random(&mut log, &mut rng, 150);
    }
    log.flush().expect("flush");
    let end = log.end();
    log.close().expect("close");
    let data = data_files(dir.path());
    let tail = data.last().expect("segments").clone();
    let mut bytes = fs::read(&tail).expect("read");
    let (last, len, _) = *frames(&bytes).last().expect("frames");
    bytes[last + len - 2] ^= 0x10;
    fs::write(&tail, &bytes).expect("damage");

    for attempt in 0..2 {
        let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
        let report = log.recovery_report();
        assert!(
            report.clean_shutdown && report.torn_tail.is_none(),
            "open {attempt}: {report:?}"
        );
        assert_eq!(log.end(), end, "open {attempt}: nothing cut");
        assert!(
            matches!(
                log.read_entries(end.next_index - 1, end.next_index, 1),
                Err(Error::Corruption { .. })
            ),
            "open {attempt}: the damaged entry is not served"
        );
        drop(log);
    }
    // Once the log changes, the index files that described it go.
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    log.truncate_from_index(end.next_index - 1)
        .expect("truncate");
    append_random(&mut log, &mut rng, 150);
    log.flush().expect("flush");
    drop(log);
    let log = PartitionLog::open(dir.path(), config).expect("open");
    assert!(!log.recovery_report().clean_shutdown);
    assert_eq!(log.end().next_index, end.next_index);
}

/// Intact data in a format version this build does not read (a newer build wrote it, then the
/// broker was rolled back after a crash) is refused with an error naming the version: the log
/// does not open, and nothing is cut. Before, the frame read as invalid, the tail scan took it
/// for a torn write and deleted it and everything after it (helper-111).
#[test]
fn a_newer_format_version_is_refused_never_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_bytes_max: 1 << 20,
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let mut rng = rng(31);
    for _ in 0..3 {
        append_random(&mut log, &mut rng, 200);
        log.flush().expect("flush");
    }
    drop(log); // unclean: the next open scans the tail
    cut_direct_padding(dir.path(), &config);
    let (file, bytes, start) = newer_last_batch(dir.path());
    match PartitionLog::open(dir.path(), config.clone()) {
        Err(Error::NewerFormat {
            version, position, ..
        }) => {
            assert_eq!((version, position), (2, start as u64));
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(log) => panic!(
            "opened: torn tail {:?}, damage {:?}",
            log.recovery_report().torn_tail,
            log.recovery_report().corruptions
        ),
    }
    assert_eq!(
        fs::read(&file).expect("read").len(),
        bytes.len(),
        "nothing was cut"
    );
    // Closed cleanly (the tail is not scanned at the next open): its read says so too, not
    // that the entry is damaged.
    fs::remove_dir_all(dir.path()).expect("clear");
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    for _ in 0..3 {
        append_random(&mut log, &mut rng, 200);
    }
    log.close().expect("close");
    cut_direct_padding(dir.path(), &config);
    newer_last_batch(dir.path());
    let log = PartitionLog::open(dir.path(), config).expect("a cleanly closed log opens");
    match read_all_entries(&log) {
        Err(Error::NewerFormat { version: 2, .. }) => {}
        other => panic!("read: {other:?}"),
    }
}

/// Rewrites the last batch of `dir`'s last data file as a newer build would write it (format
/// version 2, both CRCs right): the file, its new bytes, and the frame's position.
fn newer_last_batch(dir: &Path) -> (PathBuf, Vec<u8>, usize) {
    let file = data_files(dir).pop().expect("a data file");
    let mut bytes = fs::read(&file).expect("read");
    let (start, len, _) = *frames(&bytes).last().expect("frames");
    let batch = start + FRAME_HEADER_LEN..start + len;
    bytes[batch.start + 8] = 2;
    let crc = crc32fast::hash(&bytes[batch.start + 4..batch.end]);
    bytes[batch.start..batch.start + 4].copy_from_slice(&crc.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[start + 4..start + FRAME_HEADER_LEN]);
    hasher.update(&bytes[batch.start..batch.start + 8]);
    let crc = hasher.finalize();
    bytes[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    fs::write(&file, &bytes).expect("write");
    (file, bytes, start)
}

/// Two damaged frames in the tail after a crash, the second being the first frame written
/// after a sync that covered the first: the frames after the second prove both durable, so
/// both are reported as corruption and nothing is cut. Before, only the valid frames that ran
/// on from the first damage without a break were asked for proof; they ended at the second
/// damage before any of them proved the first, so the tail was cut at the first damage and
/// every entry written after it (acknowledged, and durable) was deleted.
#[test]
fn a_second_damaged_frame_does_not_hide_the_proof_that_the_first_was_durable() {
    let mut rng = rng(seed(
        "a_second_damaged_frame_does_not_hide_the_proof_that_the_first_was_durable",
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_bytes_max: 1 << 20,
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    // Groups of three entries, each group synced (group commit): a frame proves durable what
    // the groups before its own hold.
    for i in 0..30 {
        append_random(&mut log, &mut rng, 200);
        if i % 3 == 2 {
            log.flush().expect("flush");
        }
    }
    let end = log.end();
    let pristine = read_all_entries(&log).expect("read");
    drop(log); // unclean: the next open scans the tail
    cut_direct_padding(dir.path(), &config);
    let file = data_files(dir.path()).pop().expect("data");
    let bytes = fs::read(&file).expect("read");
    let layout = frames(&bytes);
    assert_eq!(layout.len(), 30);
    // The first frame of the fourth group, and the first of the fifth: the first frame that
    // proves the fourth group durable, and the one before the rest of the fifth group (which
    // proves it too).
    let (first, _, _) = layout[9];
    let (second, _, _) = layout[12];
    assert!(
        layout[10..12]
            .iter()
            .all(|(_, _, s)| (*s as usize) <= first)
    );
    assert!(layout[13..].iter().all(|(_, _, s)| (*s as usize) > first));
    assert!(layout[15..].iter().all(|(_, _, s)| (*s as usize) > second));
    let mut damaged = bytes.clone();
    for (start, len, _) in [layout[9], layout[12]] {
        damaged[start + len / 2] ^= 0x10;
    }
    fs::write(&file, &damaged).expect("damage");

    let log = PartitionLog::open(dir.path(), config).expect("open after the damage");
    let report = log.recovery_report();
    assert_eq!(report.torn_tail, None, "durable entries cut: {report:?}");
    let positions: Vec<u64> = report.corruptions.iter().map(|c| c.position).collect();
    assert_eq!(positions, [first as u64, second as u64], "{report:?}");
    assert_eq!(log.end(), end, "the log still ends where it did");
    let (by_offset, by_index) = read_until_error(&log, &pristine);
    assert_names(by_offset, &file, first, "a read by offset");
    assert_names(by_index, &file, first, "a read by index");
}

/// A damaged `log.meta` (the log's start, written by purges) is written again from the first
/// segment, whose first entry tells where the log starts: the log opens with the start and
/// entries it had, and says so in its recovery report. Before, the open failed on it for good
/// and the partition never opened again. Without a segment to rebuild it from, it is refused.
#[test]
fn a_damaged_log_meta_is_rebuilt_from_the_first_segment() {
    let mut rng = rng(seed("a_damaged_log_meta_is_rebuilt_from_the_first_segment"));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config();
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let expected: Vec<Expected> = (0..300)
        .map(|_| append_random(&mut log, &mut rng, 200))
        .collect();
    log.purge_through_index(expected[150].index).expect("purge");
    let (start, first_index, end) = (log.start_offset(), log.first_index(), log.end());
    assert!(start > 0, "the purge moved the start");
    let kept = read_all_entries(&log).expect("read");
    drop(log);
    let meta = dir.path().join("log.meta");
    let mut bytes = fs::read(&meta).expect("log.meta");
    bytes[14] ^= 0x01;
    fs::write(&meta, &bytes).expect("damage");

    let log = PartitionLog::open(dir.path(), config.clone()).expect("opens");
    assert!(
        log.recovery_report().rebuilt_log_meta.is_some(),
        "{:?}",
        log.recovery_report()
    );
    assert_eq!(
        (log.start_offset(), log.first_index(), log.end()),
        (start, first_index, end)
    );
    let got = read_all_entries(&log).expect("read");
    assert_eq!(got.len(), kept.len());
    for (got, want) in got.iter().zip(&kept) {
        assert_eq!(got.bytes(), want.bytes());
    }
    drop(log);
    let log = PartitionLog::open(dir.path(), config.clone()).expect("opens again");
    assert_eq!(
        log.recovery_report().rebuilt_log_meta,
        None,
        "written again"
    );
    assert_eq!(log.start_offset(), start);
    drop(log);

    // No segment left to tell the start: refused, naming the file.
    let empty = tempfile::tempdir().expect("tempdir");
    fs::write(empty.path().join("log.meta"), &bytes).expect("damaged log.meta alone");
    match PartitionLog::open(empty.path(), config) {
        Err(Error::Corruption { segment, .. }) => assert!(segment.ends_with("log.meta")),
        other => panic!(
            "a damaged log.meta alone must be refused: {:?}",
            other.map(|_| ())
        ),
    }
}
