//! Behaviour of the partition log, one feature at a time, on real files.

mod common;

use std::sync::Arc;

use common::*;
use weft_storage::{
    Batch, BatchBuilder, Error, FsyncPolicy, GroupCommitter, LogConfig, LogPosition, PartitionLog,
    ProducerInfo,
};

#[test]
fn appends_roll_segments_and_survive_clean_and_unclean_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(1);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let mut expected: Vec<Expected> = (0..300)
        .map(|_| append_random(&mut log, &mut rng, 200))
        .collect();
    assert!(
        log.segment_count() > 5,
        "small segments roll: {}",
        log.segment_count()
    );
    log.flush().expect("flush");
    let check = |log: &PartitionLog, expected: &[Expected]| {
        let got = read_all_entries(log).expect("read");
        assert_eq!(got.len(), expected.len());
        for (batch, want) in got.iter().zip(expected) {
            assert_eq!(batch.bytes(), &want.bytes);
        }
    };
    check(&log, &expected);
    log.close().expect("close");

    let log = PartitionLog::open(dir.path(), small_config()).expect("reopen clean");
    assert!(log.recovery_report().clean_shutdown);
    assert_eq!(log.recovery_report().torn_tail, None);
    check(&log, &expected);
    drop(log); // not closed, but not changed either: the tail's index files still hold
    let log = PartitionLog::open(dir.path(), small_config()).expect("reopen unchanged");
    assert!(log.recovery_report().clean_shutdown);
    check(&log, &expected);
    let mut log = log;
    expected.push(append_random(&mut log, &mut rng, 200));
    log.flush().expect("flush");
    drop(log); // changed, not closed: the next open scans the tail

    let log = PartitionLog::open(dir.path(), small_config()).expect("reopen unclean");
    let report = log.recovery_report();
    assert!(!report.clean_shutdown);
    assert_eq!(report.torn_tail, None);
    assert!(report.corruptions.is_empty());
    check(&log, &expected);
}

#[test]
fn read_by_offset_respects_limit_and_max_bytes_and_skips_control_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(2);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let expected: Vec<Expected> = (0..200)
        .map(|_| append_random(&mut log, &mut rng, 300))
        .collect();
    let end = log.end().next_offset;

    for from in [0, 1, end / 3, end / 2, end - 1] {
        let limit = (from + 40).min(end);
        let batches = log.read(from, 2048, limit).expect("read");
        assert!(!batches.is_empty(), "read from {from} found nothing");
        let first = batches[0].header();
        assert!(
            first.base_offset <= from && from < first.next_offset(),
            "first batch holds {from}"
        );
        let total: usize = batches.iter().map(Batch::len).sum();
        assert!(
            batches.len() == 1 || total <= 2048,
            "byte limit kept: {total}"
        );
        for pair in batches.windows(2) {
            assert_eq!(
                pair[0].header().next_offset(),
                pair[1].header().base_offset,
                "dense"
            );
        }
        for batch in &batches {
            assert!(
                batch.header().base_offset < limit,
                "nothing at or past the limit"
            );
            assert_eq!(batch.header().kind, weft_storage::EntryKind::Records);
            let want = expected
                .iter()
                .find(|e| e.index == batch.header().index)
                .expect("known");
            assert_eq!(batch.bytes(), &want.bytes);
        }
    }
    // At the limit: nothing. Past the end or before the start: an error.
    assert!(log.read(10, 1024, 10).expect("read").is_empty());
    assert!(matches!(
        log.read(end + 1, 1024, u64::MAX),
        Err(Error::OffsetOutOfRange { .. })
    ));
    // One batch is returned even when it is larger than max_bytes.
    assert_eq!(log.read(0, 1, end).expect("read").len(), 1);
}

#[test]
fn offsets_for_timestamps_match_a_brute_force_search() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(3);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    for _ in 0..150 {
        append_random(&mut log, &mut rng, 100);
    }
    let end = log.end().next_offset;
    let mut all = Vec::new();
    let mut from = 0;
    while from < end {
        let batches = log.read(from, 1 << 20, end).expect("read");
        for batch in &batches {
            all.extend(batch.records().filter(|r| r.offset >= from));
        }
        from = batches.last().expect("some").header().next_offset();
    }
    assert_eq!(all.len() as u64, end);
    for target in (1_699_999_990_000i64..1_700_000_110_000).step_by(3_333) {
        let want = all
            .iter()
            .find(|r| r.timestamp_ms >= target)
            .map(|r| r.offset);
        assert_eq!(
            log.offset_for_timestamp(target, end).expect("lookup"),
            want,
            "target {target}"
        );
    }
    // The limit hides later records.
    let limit = end / 2;
    let target = 1_700_000_050_000;
    let want = all
        .iter()
        .find(|r| r.timestamp_ms >= target && r.offset < limit)
        .map(|r| r.offset);
    assert_eq!(
        log.offset_for_timestamp(target, limit).expect("lookup"),
        want
    );
}

#[test]
fn truncation_removes_the_suffix_across_segments_and_appends_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(4);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let mut expected: Vec<Expected> = (0..200)
        .map(|_| append_random(&mut log, &mut rng, 200))
        .collect();
    log.flush().expect("flush");
    let segments_before = log.segment_count();
    let cut = expected[60].clone();
    log.truncate_from_index(cut.index).expect("truncate");
    expected.truncate(60);
    assert!(log.segment_count() < segments_before);
    assert_eq!(
        log.end(),
        LogPosition {
            next_offset: cut.base_offset,
            next_index: cut.index
        }
    );
    assert!(
        log.durable().next_index <= cut.index,
        "durable never runs ahead of the log"
    );
    for _ in 0..50 {
        expected.push(append_random(&mut log, &mut rng, 200));
    }
    drop(log);
    let log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
    let got = read_all_entries(&log).expect("read");
    assert_eq!(
        got.iter().map(|b| b.bytes().clone()).collect::<Vec<_>>(),
        expected.iter().map(|e| e.bytes.clone()).collect::<Vec<_>>()
    );
    // Truncating before the first entry is refused; at or past the end is a no-op.
    let mut log = log;
    let end = log.end();
    log.truncate_from_index(end.next_index + 5).expect("no-op");
    assert_eq!(log.end(), end);
}

#[test]
fn purge_and_retention_delete_whole_old_segments_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(5);
    let config = LogConfig {
        retention_bytes: Some(20 * 1024),
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config).expect("open");
    let expected: Vec<Expected> = (0..300)
        .map(|_| append_random(&mut log, &mut rng, 200))
        .collect();
    let size = log.size_bytes();
    let report = log.apply_retention(i64::MAX).expect("retention");
    assert!(report.segments_deleted > 0);
    assert!(
        log.size_bytes() >= 20 * 1024,
        "keeps at least retention_bytes"
    );
    assert!(
        log.size_bytes() < 20 * 1024 + 8 * 1024 + 4096,
        "deletes what is beyond: {}",
        log.size_bytes()
    );
    assert_eq!(size - report.bytes_deleted, log.size_bytes());
    assert_eq!(report.start_offset, log.start_offset());

    // What remains is exactly the expected suffix.
    let start = log.start_offset();
    let got = read_all_entries(&log).expect("read");
    let suffix: Vec<_> = expected
        .iter()
        .filter(|e| e.index >= log.first_index().expect("entries"))
        .collect();
    assert_eq!(got.len(), suffix.len());
    assert_eq!(got[0].header().base_offset, start);
    assert!(
        matches!(
            log.read(start.saturating_sub(1), 100, u64::MAX),
            Err(Error::OffsetOutOfRange { .. })
        ) || start == 0
    );

    // Purge by offset never removes anything at or after the offset.
    let target = expected[250].base_offset;
    log.purge_before_offset(target).expect("purge");
    assert!(log.start_offset() <= target);
    assert!(!log.read(target, 100, u64::MAX).expect("read").is_empty());

    // Age: everything older than the newest record is gone, except the active segment.
    let mut aged = PartitionLog::open(
        dir.path(),
        LogConfig {
            retention_ms: Some(1),
            ..small_config()
        },
    )
    .expect("reopen");
    let report = aged.apply_retention(1_800_000_000_000).expect("retention");
    assert!(report.segments_deleted > 0);
    assert_eq!(aged.segment_count(), 1);
    drop(aged);
    let reopened = PartitionLog::open(dir.path(), small_config()).expect("reopen after purge");
    assert_eq!(reopened.segment_count(), 1);
}

#[test]
fn damaged_or_missing_index_files_are_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(6);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let expected: Vec<Expected> = (0..200)
        .map(|_| append_random(&mut log, &mut rng, 200))
        .collect();
    log.close().expect("close");
    let mut indexes: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "index" || e == "timeindex")
        })
        .collect();
    indexes.sort();
    assert!(indexes.len() >= 6);
    std::fs::remove_file(&indexes[0]).expect("rm");
    let mut damaged = std::fs::read(&indexes[2]).expect("read");
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x10;
    std::fs::write(&indexes[2], damaged).expect("write");
    std::fs::write(&indexes[4], b"garbage").expect("write");

    let log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
    assert!(
        log.recovery_report().rebuilt_indexes.len() >= 2,
        "{:?}",
        log.recovery_report()
    );
    assert!(log.recovery_report().corruptions.is_empty());
    let got = read_all_entries(&log).expect("read");
    assert_eq!(got.len(), expected.len());
    for (batch, want) in got.iter().zip(&expected) {
        assert_eq!(batch.bytes(), &want.bytes);
    }
    for offset in [0, 17, 100, expected.last().expect("some").base_offset] {
        let batches = log.read(offset, 1, u64::MAX).expect("read");
        assert!(
            batches[0].header().base_offset <= offset && offset < batches[0].header().next_offset()
        );
    }
}

#[test]
fn out_of_order_and_oversized_appends_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(7);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    append_random(&mut log, &mut rng, 10);
    let end = log.end();
    let wrong_offset = make_batch(&mut rng, 1, 10, end.next_offset + 1, 1, end.next_index);
    assert!(matches!(
        log.append(&wrong_offset),
        Err(Error::OutOfOrder { .. })
    ));
    let wrong_index = make_batch(&mut rng, 1, 10, end.next_offset, 1, end.next_index + 1);
    assert!(matches!(
        log.append(&wrong_index),
        Err(Error::OutOfOrder { .. })
    ));
    let mut big = BatchBuilder::new();
    big.push(0, b"", &vec![7u8; 5000], []);
    let big = big.seal(end.next_offset, 1, end.next_index, ProducerInfo::default());
    assert!(matches!(log.append(&big), Err(Error::BatchTooLarge { .. })));
    assert_eq!(log.end(), end, "failed appends change nothing");
    // Invalid configs are refused at open, naming the key.
    let bad = LogConfig {
        index_interval_bytes: 0,
        ..small_config()
    };
    match PartitionLog::open(dir.path(), bad) {
        Err(Error::InvalidConfig { key, .. }) => assert_eq!(key, "index_interval_bytes"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn reset_restarts_the_log_at_a_position_and_remembers_it_across_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(8);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    for _ in 0..50 {
        append_random(&mut log, &mut rng, 100);
    }
    let next = LogPosition {
        next_offset: 5000,
        next_index: 700,
    };
    log.reset(next).expect("reset");
    assert_eq!(log.end(), next);
    assert_eq!(log.start_offset(), 5000);
    drop(log);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
    assert_eq!(log.end(), next, "an empty log remembers where it starts");
    let e = append_random(&mut log, &mut rng, 100);
    assert_eq!((e.base_offset, e.index), (5000, 700));
}

/// A roll whose sealing runs after the log was truncated (the sealing runs outside the log's
/// lock) leaves no index files describing the segment as it was: the segment stays active,
/// and a crash when it happened to be as long again would have opened it as cleanly closed from
/// those files (wrong end, index points inside frames). Before, finish_roll dropped the
/// prepared segment but kept the stale index files.
#[test]
fn a_roll_sealed_after_a_truncation_leaves_no_stale_index_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let mut rng = rng(83);
    let (roll, active) = loop {
        let end = log.end();
        let batch = make_batch(&mut rng, 3, 200, end.next_offset, 1, end.next_index);
        if let Some(roll) = log
            .prepare_roll(std::slice::from_ref(&batch))
            .expect("prepare")
        {
            break (roll, log.segment_count());
        }
        log.append(&batch).expect("append");
    };
    log.flush().expect("flush");
    let last = log.end().next_index - 1;
    log.truncate_from_index(last).expect("truncate");
    let outcome = roll.run();
    log.finish_roll(roll, outcome)
        .expect("finish after a truncation");
    assert_eq!(
        log.segment_count(),
        active,
        "the prepared segment was dropped"
    );
    let mut data: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    data.sort();
    let active = data.last().expect("a segment");
    for extension in ["index", "timeindex"] {
        assert!(
            !active.with_extension(extension).exists(),
            "{} describes the active segment as the roll saw it",
            active.with_extension(extension).display()
        );
    }
    let end = log.end();
    drop(log);
    let log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
    assert!(log.recovery_report().corruptions.is_empty());
    assert_eq!(log.end(), end);
}

/// A reset to the log's end while a roll's sealing ran (a snapshot installed there) makes its
/// fresh segment where the roll made its next one; the roll then finds the log changed and
/// drops its segment, and must not unlink the reset's, which is now the active one. Before, it
/// did: what was appended after the reset went to an unlinked file and was gone at the next open.
#[test]
fn a_roll_dropped_after_a_reset_to_its_position_keeps_the_resets_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let mut rng = rng(85);
    let roll = prepare_next_roll(&mut log, &mut rng);
    let outcome = roll.run();
    let at = log.end();
    log.reset(at).expect("reset to the end");
    log.finish_roll(roll, outcome)
        .expect("finish after a reset");
    appends_survive_reopen(dir.path(), log, &mut rng);
}

/// Runs appends until the next one would roll; the roll's ticket.
fn prepare_next_roll(
    log: &mut PartitionLog,
    rng: &mut rand::rngs::StdRng,
) -> weft_storage::RollTicket {
    loop {
        let end = log.end();
        let batch = make_batch(rng, 3, 200, end.next_offset, 1, end.next_index);
        if let Some(roll) = log
            .prepare_roll(std::slice::from_ref(&batch))
            .expect("prepare")
        {
            return roll;
        }
        log.append(&batch).expect("append");
    }
}

/// Appends five entries to `log`, syncs, reopens it and checks that exactly those are read.
fn appends_survive_reopen(
    dir: &std::path::Path,
    mut log: PartitionLog,
    rng: &mut rand::rngs::StdRng,
) {
    let appended: Vec<_> = (0..5)
        .map(|_| append_random(&mut log, rng, 100).bytes)
        .collect();
    log.flush().expect("flush");
    drop(log);
    let log = PartitionLog::open(dir, small_config()).expect("reopen");
    assert!(log.recovery_report().corruptions.is_empty());
    let got: Vec<_> = read_all_entries(&log)
        .expect("read")
        .iter()
        .map(|b| b.bytes().clone())
        .collect();
    assert_eq!(got, appended, "what was appended after the reset survives");
}

/// A reset to the log's end while a roll runs makes the very file the roll is about to create:
/// the roll then fails ("create segment": the file exists). That failure concerns a log the
/// reset already replaced. Before, it poisoned the freshly reset log, so every append failed
/// until the partition's group restarted.
#[test]
fn a_roll_that_fails_on_the_file_a_reset_made_leaves_the_reset_log_usable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let mut rng = rng(86);
    let roll = prepare_next_roll(&mut log, &mut rng);
    let at = log.end();
    log.reset(at).expect("reset to the end");
    let outcome = roll.run();
    assert!(outcome.is_err(), "the roll's segment file exists already");
    log.finish_roll(roll, outcome)
        .expect("a roll overtaken by a reset is dropped, not an error");
    assert!(!log.is_poisoned());
    appends_survive_reopen(dir.path(), log, &mut rng);
}

/// A truncation (not a reset) while a roll runs keeps the segment the roll seals: a failed
/// roll must still poison the log, as its fdatasync of that segment may have failed, and a
/// retried sync would not report the error again. Before, any change of the log while the
/// roll ran was taken for a reset and the failure dropped (found by helper-65's review).
#[test]
fn a_roll_that_fails_after_a_truncation_still_poisons_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let mut rng = rng(88);
    let roll = prepare_next_roll(&mut log, &mut rng);
    // The roll's new segment cannot be made: a directory stands at its path.
    let blocker = dir
        .path()
        .join(format!("{:020}.log", log.end().next_offset));
    std::fs::create_dir(&blocker).expect("blocker");
    let last = log.end().next_index - 1;
    log.truncate_from_index(last)
        .expect("truncate the last entry");
    let outcome = roll.run();
    assert!(outcome.is_err(), "the roll fails");
    assert!(log.finish_roll(roll, outcome).is_err());
    assert!(
        log.is_poisoned(),
        "the sealed segment's sync may have failed"
    );
}

/// Two resets while a roll runs: the first replaces the roll's new segment with its own, the
/// second deletes that one. Before, dropping the prepared segment then failed (its file was
/// gone), and the failure reached the writer as an error of the reset log.
#[test]
fn a_roll_dropped_after_two_resets_finishes_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let mut rng = rng(87);
    let roll = prepare_next_roll(&mut log, &mut rng);
    let outcome = roll.run();
    let at = log.end();
    log.reset(at).expect("reset to the end");
    log.reset(weft_storage::LogPosition {
        next_offset: at.next_offset + 1_000,
        next_index: at.next_index + 10,
    })
    .expect("reset forwards");
    log.finish_roll(roll, outcome)
        .expect("a roll overtaken by two resets is dropped, not an error");
    appends_survive_reopen(dir.path(), log, &mut rng);
}

/// A roll that fails poisons the log, as a failed flush does: its sync may have failed, and a
/// retried sync would not report again the writeback error of pages it dropped (so the entries
/// before the roll would have counted as durable). Before, the next append simply tried the roll
/// again. Here the roll fails at its new segment (a directory stands where its file would go).
#[test]
fn a_failed_roll_poisons_the_log_until_it_is_opened_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(82);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let mut failed = None;
    for _ in 0..200 {
        let blocker = dir
            .path()
            .join(format!("{:020}.log", log.end().next_offset));
        if blocker.exists() {
            // The active segment's own file (it is empty).
            append_random(&mut log, &mut rng, 200);
            continue;
        }
        std::fs::create_dir(&blocker).expect("mkdir");
        let end = log.end();
        let batch = make_batch(&mut rng, 3, 200, end.next_offset, 1, end.next_index);
        match log.append_entry(std::slice::from_ref(&batch)) {
            Ok(_) => std::fs::remove_dir(&blocker).expect("rmdir"),
            Err(error) => {
                failed = Some((error, blocker, batch));
                break;
            }
        }
    }
    let (error, blocker, batch) = failed.expect("a roll ran into the directory");
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    std::fs::remove_dir(&blocker).expect("rmdir");
    match log.append_entry(std::slice::from_ref(&batch)) {
        Err(Error::Poisoned(reason)) => assert!(reason.contains("roll"), "{reason}"),
        other => panic!("expected the log poisoned, got {other:?}"),
    }
    let end = log.end();
    drop(log);
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
    assert!(log.recovery_report().corruptions.is_empty());
    assert_eq!(log.end(), end);
    log.append_entry(&[batch])
        .expect("appends again once reopened");
}

/// A listener that "crashes" (panics) right after its `n`th event once armed: a process that
/// dies just after that file step.
#[derive(Debug, Default)]
struct CrashAfter {
    left: std::sync::atomic::AtomicUsize,
}

impl CrashAfter {
    fn event(&self) {
        use std::sync::atomic::Ordering;
        let left = self.left.load(Ordering::SeqCst);
        if left > 0 {
            self.left.store(left - 1, Ordering::SeqCst);
            if left == 1 {
                panic!("simulated crash");
            }
        }
    }
}

impl weft_storage::SyncListener for CrashAfter {
    fn synced(&self, _: &std::path::Path, _: u64) {
        self.event();
    }
    fn replaced(&self, _: &std::path::Path, _: u64) {
        self.event();
    }
}

/// A crash after any file step of a reset leaves a log that opens whole: a prefix of the old
/// log, or the empty log at the reset's position; either way appends continue it. Before, a
/// reset that discarded every entry (to the log's first position) made its fresh segment
/// first and deleted the old ones after it, so a crash between them left an empty first
/// segment followed by old ones ("does not continue its predecessor": reported as damage, and
/// discarded entries back after a hole); and a reset forwards (a snapshot) that recorded its
/// start but had not yet made its segment reopened ending at the old end, not at the start.
#[test]
fn a_crash_at_any_step_of_a_reset_leaves_a_log_that_opens_whole() {
    let mut rng = rng(81);
    for forwards in [false, true] {
        for crash_after in 1.. {
            let dir = tempfile::tempdir().expect("tempdir");
            let crash = Arc::new(CrashAfter::default());
            let config = LogConfig {
                sync_listener: Some(crash.clone()),
                ..small_config()
            };
            let mut log = PartitionLog::open(dir.path(), config).expect("open");
            for _ in 0..60 {
                append_random(&mut log, &mut rng, 200);
            }
            log.flush().expect("flush");
            assert!(log.segment_count() > 3, "{}", log.segment_count());
            let old = read_all_entries(&log).expect("read");
            let first = LogPosition {
                next_offset: log.start_offset(),
                next_index: log.first_index().expect("entries"),
            };
            let next = if forwards {
                LogPosition {
                    next_offset: log.end().next_offset + 1000,
                    next_index: log.end().next_index + 100,
                }
            } else {
                first
            };
            crash
                .left
                .store(crash_after, std::sync::atomic::Ordering::SeqCst);
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| log.reset(next)));
            crash.left.store(0, std::sync::atomic::Ordering::SeqCst);
            let finished = match outcome {
                Ok(reset) => {
                    reset.expect("reset");
                    true
                }
                Err(_) => false,
            };
            drop(log);
            let mut log = PartitionLog::open(dir.path(), small_config()).expect("reopen");
            let case = format!("forwards {forwards}, crash after event {crash_after}");
            let report = log.recovery_report();
            assert!(report.corruptions.is_empty(), "{case}: {report:?}");
            let kept = read_all_entries(&log).expect("read");
            if log.end() == next {
                assert!(kept.is_empty(), "{case}");
            } else {
                assert!(!finished, "{case}: the reset finished");
                assert_eq!(log.start_offset(), first.next_offset, "{case}");
                assert!(kept.len() <= old.len(), "{case}");
                for (got, want) in kept.iter().zip(&old) {
                    assert_eq!(got.bytes(), want.bytes(), "{case}");
                }
            }
            let end = log.end();
            let e = append_random(&mut log, &mut rng, 100);
            assert_eq!(
                (e.base_offset, e.index),
                (end.next_offset, end.next_index),
                "{case}"
            );
            if finished {
                assert_eq!(end, next, "{case}");
                break;
            }
            assert!(crash_after < 50, "{case}: the reset never finished");
        }
    }
}

#[test]
fn group_committer_shares_fsyncs_and_hands_out_dense_offsets() {
    /// A slow disk: every data sync takes at least 5 ms more, so appends from the other threads
    /// queue up behind it whatever the machine's speed (a tmpfs syncs in no time), and the next
    /// sync must take them all.
    #[derive(Debug)]
    struct SlowSyncs(Arc<SyncRecorder>);
    impl weft_storage::SyncListener for SlowSyncs {
        fn synced(&self, path: &std::path::Path, len: u64) {
            if path.extension().is_some_and(|e| e == "log") {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            self.0.synced(path, len);
        }
        fn replaced(&self, path: &std::path::Path, len: u64) {
            self.0.replaced(path, len);
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = SyncRecorder::new();
    let config = LogConfig {
        sync_listener: Some(Arc::new(SlowSyncs(recorder.clone()))),
        ..LogConfig::default()
    };
    let log = PartitionLog::open(dir.path(), config).expect("open");
    let committer = Arc::new(GroupCommitter::spawn(log, 1, 64).expect("spawn"));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let committer = committer.clone();
            std::thread::spawn(move || {
                (0..100)
                    .map(|i| {
                        let mut builder = BatchBuilder::new();
                        builder.push(
                            i,
                            format!("{t}").as_bytes(),
                            format!("{t}-{i}").as_bytes(),
                            [],
                        );
                        builder.push(i, b"", b"second", []);
                        let committed = committer
                            .append_wait(builder, ProducerInfo::default())
                            .expect("append");
                        assert!(
                            committed.is_durable(),
                            "Always policy: durable on completion"
                        );
                        (committed.appended, format!("{t}-{i}"))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut results: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    let committer = Arc::into_inner(committer).expect("sole owner");
    let log = committer.close().expect("close");
    results.sort_by_key(|(a, _)| a.base_offset);
    for (i, (appended, _)) in results.iter().enumerate() {
        assert_eq!(appended.base_offset, 2 * i as u64, "dense, unique offsets");
        assert_eq!(appended.index, i as u64);
    }
    for (appended, value) in &results {
        let batches = log.read(appended.base_offset, 1, u64::MAX).expect("read");
        let first = batches[0].records().next().expect("record");
        assert_eq!(first.value.as_ref(), value.as_bytes());
    }
    assert_eq!(log.durable(), log.end());
    // 400 appends from 4 threads, each waiting for its append to be durable, behind syncs of at
    // least 5 ms: the other threads' appends wait through each sync, so a sync serves several.
    let syncs = recorder
        .data_syncs
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        syncs <= 300,
        "{syncs} data syncs for 400 appends: group commit is not grouping"
    );
}

#[test]
fn interval_policy_acknowledges_before_the_sync_and_syncs_soon_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        fsync: FsyncPolicy::Interval { interval_ms: 20 },
        ..LogConfig::default()
    };
    let log = PartitionLog::open(dir.path(), config).expect("open");
    let committer = GroupCommitter::spawn(log, 1, 16).expect("spawn");
    let mut builder = BatchBuilder::new();
    builder.push(1, b"", b"v", []);
    let first = committer
        .append_wait(builder, ProducerInfo::default())
        .expect("append");
    assert_eq!(first.appended.base_offset, 0);
    // Bounded wait for the interval sync to cover the batch.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut builder = BatchBuilder::new();
        builder.push(1, b"", b"v", []);
        let later = committer
            .append_wait(builder, ProducerInfo::default())
            .expect("append");
        if later.durable.next_index > first.appended.index {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "interval sync never happened"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let log = committer.close().expect("close");
    assert_eq!(log.durable(), log.end());
}

#[test]
fn frames_larger_than_a_lowered_batch_limit_still_read_after_an_unclean_reopen() {
    // A topic's largest batch may be lowered after large batches were stored: the limit is for
    // appends only, and recovery never mistakes an older, larger frame for damage.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(11);
    let big_config = LogConfig {
        segment_bytes_max: 1 << 20,
        batch_bytes_max: 256 * 1024,
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), big_config).expect("open");
    let mut expected = Vec::new();
    for _ in 0..3 {
        let end = log.end();
        let mut builder = BatchBuilder::new();
        builder.push(1, b"k", &vec![9u8; 200 * 1024], []);
        let batch = builder.seal(end.next_offset, 1, end.next_index, ProducerInfo::default());
        log.append(&batch).expect("append a 200 KiB batch");
        expected.push(batch);
        expected.push_small(&mut log, &mut rng);
    }
    log.flush().expect("flush");
    drop(log); // no close: the next open scans the tail
    let small = LogConfig {
        segment_bytes_max: 1 << 20,
        batch_bytes_max: 4 * 1024,
        ..small_config()
    };
    let log = PartitionLog::open(dir.path(), small).expect("reopen with a lower limit");
    let report = log.recovery_report();
    assert!(report.torn_tail.is_none(), "nothing was torn: {report:?}");
    assert!(
        report.corruptions.is_empty(),
        "nothing is damaged: {report:?}"
    );
    let got = read_all_entries(&log).expect("read");
    assert_eq!(got.len(), expected.len());
    for (got, want) in got.iter().zip(&expected) {
        assert_eq!(got.bytes(), want.bytes());
    }
}

trait PushSmall {
    fn push_small(&mut self, log: &mut PartitionLog, rng: &mut rand::rngs::StdRng);
}

impl PushSmall for Vec<Batch> {
    fn push_small(&mut self, log: &mut PartitionLog, rng: &mut rand::rngs::StdRng) {
        let end = log.end();
        let batch = make_batch(rng, 3, 50, end.next_offset, 1, end.next_index);
        log.append(&batch).expect("append");
        self.push(batch);
    }
}

#[test]
fn retention_point_names_the_last_entry_of_the_segments_retention_would_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(12);
    let config = LogConfig {
        retention_bytes: Some(20 * 1024),
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config).expect("open");
    assert_eq!(
        log.retention_point(i64::MAX),
        None,
        "an empty log keeps all"
    );
    for _ in 0..300 {
        append_random(&mut log, &mut rng, 200);
    }
    let point = log
        .retention_point(i64::MAX)
        .expect("old segments are beyond retention_bytes");
    // Deciding deletes nothing.
    assert_eq!(log.first_index(), Some(0));
    let size = log.size_bytes();
    // Purging through the point deletes exactly what apply_retention would.
    let report = log.purge_through_index(point).expect("purge");
    assert!(report.segments_deleted > 0);
    assert_eq!(log.first_index(), Some(point + 1), "whole segments only");
    assert!(log.size_bytes() >= 20 * 1024);
    assert_eq!(size - report.bytes_deleted, log.size_bytes());
    assert_eq!(
        log.retention_point(i64::MAX),
        None,
        "nothing more to delete"
    );
}

#[test]
fn an_entry_of_several_batches_is_one_frame_kept_or_cut_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(13);
    let config = LogConfig {
        segment_bytes_max: 1 << 20,
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    append_random(&mut log, &mut rng, 50);
    let end = log.end();
    let a = make_batch(&mut rng, 2, 50, end.next_offset, 1, end.next_index);
    let b = make_batch(&mut rng, 3, 50, end.next_offset + 2, 1, end.next_index);
    // Batches that cannot form one entry are refused.
    let wrong_index = make_batch(&mut rng, 1, 50, end.next_offset + 2, 1, end.next_index + 1);
    assert!(matches!(
        log.append_entry(&[a.clone(), wrong_index]),
        Err(Error::InvalidEntry(_))
    ));
    let gap = make_batch(&mut rng, 1, 50, end.next_offset + 5, 1, end.next_index);
    assert!(matches!(
        log.append_entry(&[a.clone(), gap]),
        Err(Error::InvalidEntry(_))
    ));
    let appended = log.append_entry(&[a.clone(), b.clone()]).expect("append");
    assert_eq!(appended.base_offset, end.next_offset);
    assert_eq!(appended.next_offset, end.next_offset + 5);
    assert_eq!(log.end().next_index, end.next_index + 1, "one Raft index");
    log.flush().expect("flush");
    // Reads by index return the entry's batches together; reads by offset find the second.
    let entry = log
        .read_entries(end.next_index, end.next_index + 1, 1)
        .expect("read entry");
    assert_eq!(entry.len(), 2, "an entry is never split by a read");
    assert_eq!(entry[1].bytes(), b.bytes());
    let from_b = log
        .read(end.next_offset + 3, 1 << 20, u64::MAX)
        .expect("read by offset");
    assert_eq!(from_b[0].bytes(), b.bytes());

    // A torn write of a later two-batch entry: the whole frame is cut at reopen.
    let end2 = log.end();
    let c = make_batch(&mut rng, 2, 50, end2.next_offset, 1, end2.next_index);
    let d = make_batch(&mut rng, 2, 50, end2.next_offset + 2, 1, end2.next_index);
    log.append_entry(&[c, d]).expect("append");
    drop(log);
    let data = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("segment");
    cut_direct_padding(dir.path(), &config);
    let len = std::fs::metadata(&data).expect("stat").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .expect("open segment");
    file.set_len(len - 40).expect("tear the last frame");
    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    assert!(log.recovery_report().torn_tail.is_some());
    assert_eq!(
        log.end(),
        end2,
        "the torn entry is gone whole, the one before stays"
    );
    let kept = log
        .read_entries(end.next_index, end.next_index + 1, 1)
        .expect("read");
    assert_eq!(kept.len(), 2);
}

#[test]
fn open_segment_files_stay_bounded_and_closed_ones_reopen_on_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(14);
    let config = LogConfig {
        open_segments_max: 3,
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let expected: Vec<Expected> = (0..400)
        .map(|_| append_random(&mut log, &mut rng, 200))
        .collect();
    assert!(log.segment_count() > 10, "{} segments", log.segment_count());
    // Rolls close files too, not only reads (a log nobody reads from its files kept one
    // open per segment).
    assert!(
        log.open_segment_files() <= 3,
        "{} sealed segment files open after the appends",
        log.open_segment_files()
    );
    // Read everything, twice, from the start: every segment's file is used.
    for _ in 0..2 {
        let got = read_all_entries(&log).expect("read");
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g.bytes(), &e.bytes);
        }
        assert!(
            log.open_segment_files() <= 3,
            "{} sealed segment files open",
            log.open_segment_files()
        );
    }
    // Reopening the log opens no more than the bound either.
    drop(log);
    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    assert!(log.open_segment_files() <= 3);
    assert_eq!(read_all_entries(&log).expect("read").len(), expected.len());
}

/// A roll prepared under the lock and run outside it: the sealed segment is synced and indexed,
/// the next one is the one the roll created, and a log that changed meanwhile throws the
/// prepared segment away (the append then rolls by itself).
#[test]
fn prepared_rolls_seal_outside_the_lock_and_yield_to_a_changed_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = SyncRecorder::new();
    let config = LogConfig {
        sync_listener: Some(recorder.clone()),
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let mut rng = rng(11);
    use rand::Rng;
    let mut expected = Vec::new();
    let mut prepared_rolls = 0;
    for _ in 0..300 {
        let end = log.end();
        let count = rng.random_range(1..6);
        let batch = make_batch(&mut rng, count, 200, end.next_offset, 1, end.next_index);
        if let Some(roll) = log
            .prepare_roll(std::slice::from_ref(&batch))
            .expect("prepare")
        {
            let sealed = log.end();
            let segments = log.segment_count();
            let outcome = roll.run();
            log.finish_roll(roll, outcome).expect("finish");
            prepared_rolls += 1;
            assert_eq!(
                log.segment_count(),
                segments + 1,
                "the prepared segment is active"
            );
            assert_eq!(
                log.durable(),
                sealed,
                "everything before the roll is durable"
            );
        }
        let segments = log.segment_count();
        log.append(&batch).expect("append");
        assert_eq!(
            log.segment_count(),
            segments,
            "the append did not roll again"
        );
        expected.push(batch.bytes().clone());
    }
    assert!(prepared_rolls > 5, "rolls happened: {prepared_rolls}");
    // Every sealed segment was synced whole by its roll.
    let mut sealed: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    sealed.sort();
    sealed.pop();
    for path in &sealed {
        let len = std::fs::metadata(path).expect("stat").len();
        assert_eq!(
            recorder.synced_len(path),
            Some(len),
            "{} synced",
            path.display()
        );
        assert!(
            path.with_extension("index").exists(),
            "{} indexed",
            path.display()
        );
    }

    // A roll whose log is truncated before it finishes: the prepared segment goes.
    log.flush().expect("flush");
    let batch = loop {
        let end = log.end();
        let batch = make_batch(&mut rng, 3, 200, end.next_offset, 1, end.next_index);
        if log
            .prepare_roll(std::slice::from_ref(&batch))
            .expect("prepare")
            .is_some()
        {
            break batch;
        }
        log.append(&batch).expect("append");
        expected.push(batch.bytes().clone());
    };
    let roll = log
        .prepare_roll(std::slice::from_ref(&batch))
        .expect("prepare")
        .expect("a roll is due");
    let outcome = roll.run();
    let last = log.end().next_index - 1;
    log.truncate_from_index(last).expect("truncate");
    expected.pop();
    let segments = log.segment_count();
    log.finish_roll(roll, outcome)
        .expect("finish after a truncation");
    assert_eq!(
        log.segment_count(),
        segments,
        "the prepared segment was dropped"
    );
    let end = log.end();
    let batch = make_batch(&mut rng, 3, 200, end.next_offset, 1, end.next_index);
    log.append(&batch).expect("append after the dropped roll");
    expected.push(batch.bytes().clone());
    log.flush().expect("flush");
    drop(log);

    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    assert!(log.recovery_report().corruptions.is_empty());
    let got: Vec<_> = read_all_entries(&log)
        .expect("read")
        .iter()
        .map(|b| b.bytes().clone())
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn bytes_after_an_index_measure_what_a_replica_there_lacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rng(seed("bytes_after_index"));
    let mut log = PartitionLog::open(dir.path(), small_config()).expect("open");
    let expected: Vec<Expected> = (0..300)
        .map(|_| append_random(&mut log, &mut rng, 200))
        .collect();
    assert!(log.segment_count() > 5);
    assert_eq!(log.bytes_after_index(None), log.size_bytes());
    let last = expected.last().expect("entries").index;
    assert_eq!(log.bytes_after_index(Some(last)), 0);
    assert_eq!(log.bytes_after_index(Some(last + 10)), 0);
    let largest = expected
        .iter()
        .map(|e| e.bytes.len() as u64)
        .max()
        .unwrap_or(0);
    let mut previous = u64::MAX;
    for (i, entry) in expected.iter().enumerate() {
        let after = &expected[i + 1..];
        // Each frame holds its batch plus a small header; the sparse index may start the count
        // up to one index interval (and one frame) early.
        let payload: u64 = after.iter().map(|e| e.bytes.len() as u64).sum();
        let got = log.bytes_after_index(Some(entry.index));
        assert!(got >= payload, "index {}: {got} < {payload}", entry.index);
        let slack = 64 * after.len() as u64 + small_config().index_interval_bytes + largest + 64;
        assert!(
            got <= payload + slack,
            "index {}: {got} > {payload} + {slack}",
            entry.index
        );
        assert!(got <= previous, "never grows with the index");
        previous = got;
    }
}

/// The data files of `dir`, oldest first.
fn data_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// Whether files in `dir` can be opened for direct I/O (a filesystem that refuses it gets
/// buffered writes, which leave no padding).
fn direct_io_works(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let works = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(dir.join("probe"))
        .is_ok();
    if !works {
        eprintln!("this filesystem refuses O_DIRECT: only the buffered fallback is checked");
    }
    works
}

#[test]
fn direct_writes_pad_the_last_block_and_every_open_cuts_the_padding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let direct = direct_io_works(dir.path());
    let _ = std::fs::remove_file(dir.path().join("probe"));
    let mut rng = rng(21);
    let config = LogConfig {
        direct_io: true,
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let mut expected: Vec<Expected> = (0..200)
        .map(|_| append_random(&mut log, &mut rng, 200))
        .collect();
    log.flush().expect("flush");
    assert!(log.segment_count() > 3, "small segments roll");
    let check = |log: &PartitionLog, expected: &[Expected], what: &str| {
        let got = read_all_entries(log).expect("read");
        assert_eq!(got.len(), expected.len(), "{what}");
        for (batch, want) in got.iter().zip(expected) {
            assert_eq!(batch.bytes(), &want.bytes, "{what}");
        }
    };
    check(&log, &expected, "written");
    drop(log); // unclean: the tail keeps its padding
    let files = data_files(dir.path());
    let tail = files.last().expect("a segment").clone();
    let padded = std::fs::metadata(&tail).expect("stat").len();
    if direct {
        assert_eq!(padded % 4096, 0, "direct writes leave whole blocks");
    }
    let tail_bytes = std::fs::read(&tail).expect("read tail");
    let zeros = tail_bytes.iter().rev().take_while(|&&b| b == 0).count();

    // A reopen after the crash cuts the padding: nothing reported, nothing lost.
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("reopen unclean");
    let report = log.recovery_report().clone();
    assert_eq!(report.torn_tail, None, "padding is not a torn tail");
    assert!(report.corruptions.is_empty(), "{report:?}");
    check(&log, &expected, "after an unclean reopen");
    let cut = std::fs::metadata(&tail).expect("stat").len();
    assert!(
        cut <= padded && padded - cut <= zeros as u64,
        "only zeros cut"
    );
    if direct {
        assert!(padded > cut && padded - cut < 4096, "{padded} -> {cut}");
    }

    // Appends continue inside the block the padding was cut from.
    for _ in 0..30 {
        expected.push(append_random(&mut log, &mut rng, 200));
    }
    log.flush().expect("flush");
    check(&log, &expected, "appended after the reopen");
    log.close().expect("close");

    // A clean close leaves every file at its data: the index files match, nothing is scanned.
    let log = PartitionLog::open(dir.path(), config.clone()).expect("reopen clean");
    let report = log.recovery_report().clone();
    assert!(report.clean_shutdown, "{report:?}");
    assert!(
        report.rebuilt_indexes.is_empty(),
        "sealed segments were trimmed at their roll: {report:?}"
    );
    check(&log, &expected, "after a clean reopen");

    // Damage in the padding is a torn tail: cut, and no entry lost.
    let mut log = log;
    for _ in 0..3 {
        expected.push(append_random(&mut log, &mut rng, 50));
    }
    log.flush().expect("flush");
    drop(log);
    let tail = data_files(dir.path()).last().expect("a segment").clone();
    let mut bytes = std::fs::read(&tail).expect("read tail");
    let len = bytes.len();
    if direct {
        assert_eq!(bytes[len - 1], 0, "the last block is padded");
        bytes[len - 1] = 0x5a;
        std::fs::write(&tail, &bytes).expect("damage the padding");
        let log = PartitionLog::open(dir.path(), config).expect("reopen after damage");
        let report = log.recovery_report().clone();
        assert!(report.torn_tail.is_some(), "{report:?}");
        assert!(report.corruptions.is_empty(), "{report:?}");
        check(&log, &expected, "after damage in the padding");
    }
}

/// A purge records the log's new start first and leaves the files to a `SegmentRemoval`, which
/// cuts each data file in synced steps before unlinking it. A removal cut off part-way (a crash:
/// one file already cut short, the others whole) is finished by the next open, which deletes
/// every segment wholly before the recorded start instead of reading the cut one as damage or
/// serving purged records again.
#[test]
fn purged_segments_are_cut_in_steps_and_a_cut_off_removal_is_finished_by_the_next_open() {
    #[derive(Debug, Default)]
    struct Cuts(std::sync::Mutex<Vec<(std::path::PathBuf, u64)>>);
    impl weft_storage::SyncListener for Cuts {
        fn synced(&self, _: &std::path::Path, _: u64) {}
        fn replaced(&self, path: &std::path::Path, len: u64) {
            self.0.lock().expect("lock").push((path.to_path_buf(), len));
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cuts = Arc::new(Cuts::default());
    let config = LogConfig {
        segment_bytes_max: 64 * 1024,
        removal_step_bytes: 4096,
        sync_listener: Some(cuts.clone()),
        ..small_config()
    };
    let mut rng = rng(11);
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let expected: Vec<Expected> = (0..400)
        .map(|_| append_random(&mut log, &mut rng, 400))
        .collect();
    log.flush().expect("flush");
    let before = data_files(dir.path());
    assert!(before.len() > 4, "segments: {}", before.len());

    // A purge whose removal runs: the files go, each cut in 4 KiB steps first.
    let (report, removal) = log
        .purge_through_index_later(expected[100].index)
        .expect("purge");
    assert!(report.segments_deleted > 0);
    let removed: Vec<_> = before[..report.segments_deleted].to_vec();
    for path in &removed {
        // Renamed out of the way (a new segment of that base, after the directory was deleted
        // and made again, is never touched), and still there until the removal runs.
        assert!(!path.exists(), "{} renamed", path.display());
        assert!(purged_name(path).exists(), "{} kept", path.display());
    }
    removal.run().expect("removal");
    for path in &removed {
        let path = &purged_name(path);
        assert!(!path.exists(), "{} deleted", path.display());
        let steps: Vec<u64> = cuts
            .0
            .lock()
            .expect("lock")
            .iter()
            .filter(|(p, _)| p == path)
            .map(|&(_, len)| len)
            .collect();
        // (Earlier reports of the file: its creation and sealing.) The last ones are the cuts:
        // 4 KiB apart, down to at most 4 KiB.
        let cuts = steps
            .windows(2)
            .rev()
            .take_while(|w| w[0] == w[1] + 4096)
            .count();
        assert!(
            cuts >= 2 && steps.last().is_some_and(|&l| l > 0 && l <= 4096),
            "{}: cut in 4 KiB steps, got {steps:?}",
            path.display()
        );
    }

    // A purge cut off part-way: the first file already cut short (mid-frame), the rest whole.
    // The second file is back under its own name (the crash came before its rename reached the
    // disk): the open deletes it because it lies wholly before the recorded start.
    let files = data_files(dir.path());
    let (report, removal) = log
        .purge_through_index_later(expected[250].index)
        .expect("purge");
    let start = report.start_offset;
    let purged: Vec<_> = files[..report.segments_deleted].to_vec();
    assert!(purged.len() >= 2, "purged segments: {}", purged.len());
    std::fs::rename(purged_name(&purged[1]), &purged[1]).expect("rename back");
    let first = std::fs::OpenOptions::new()
        .write(true)
        .open(purged_name(&purged[0]))
        .expect("open");
    let len = first.metadata().expect("stat").len();
    first.set_len(len / 2 + 3).expect("cut");
    drop(first);
    drop(removal); // never run: the crash
    drop(log);

    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    let recovery = log.recovery_report();
    assert!(
        recovery.corruptions.is_empty(),
        "the cut purged file is not damage: {:?}",
        recovery.corruptions
    );
    assert_eq!(
        log.start_offset(),
        start,
        "purged records are not served again"
    );
    for path in &purged {
        assert!(!path.exists(), "{} deleted at open", path.display());
        assert!(
            !purged_name(path).exists(),
            "{} deleted at open",
            path.display()
        );
    }
    let got = read_all_entries(&log).expect("read");
    let first_index = log.first_index().expect("entries");
    let suffix: Vec<_> = expected.iter().filter(|e| e.index >= first_index).collect();
    assert_eq!(got.len(), suffix.len());
    assert_eq!(got[0].header().base_offset, start);
    for (batch, want) in got.iter().zip(&suffix) {
        assert_eq!(batch.bytes(), &want.bytes);
    }
}

/// The name a purged segment's data file has until its removal deletes it.
fn purged_name(path: &std::path::Path) -> std::path::PathBuf {
    let name = path.file_name().expect("name").to_string_lossy();
    path.with_file_name(format!("{name}.purged"))
}

/// A log opened in a directory that does not exist yet makes every directory it creates
/// durable in its parent (topics/<id>/<partition>: a power loss soon after must not drop the
/// directory with the entries synced in it). Before, only the log's own directory was synced.
#[test]
fn a_new_log_directory_is_made_durable_in_its_parents() {
    let root = tempfile::tempdir().expect("tempdir");
    let recorder = SyncRecorder::new();
    let config = LogConfig {
        sync_listener: Some(recorder.clone()),
        ..small_config()
    };
    let dir = root.path().join("topics").join("topic-id").join("0");
    let log = PartitionLog::open(&dir, config).expect("open");
    drop(log);
    let synced = recorder.synced.lock().expect("lock");
    for parent in [
        root.path().to_path_buf(),
        root.path().join("topics"),
        root.path().join("topics").join("topic-id"),
    ] {
        assert!(
            synced.contains_key(&parent),
            "{} not synced: {:?}",
            parent.display(),
            synced.keys().collect::<Vec<_>>()
        );
    }
}
