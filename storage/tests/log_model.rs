//! Property test: random sequences of append / read / truncate / purge / flush / reopen against an
//! in-memory model of the log. Small segments and index intervals so every run crosses many segment
//! and index boundaries.

mod common;

use weft_storage::LogConfig;

/// A tail cache small enough that runs evict from it.
const TAIL_CACHE_BYTES: usize = 3000;

fn small_config() -> LogConfig {
    LogConfig {
        tail_cache_bytes: TAIL_CACHE_BYTES,
        // The model runs with direct writes (`direct_io`); crash.rs alternates both ways.
        direct_io: true,
        ..common::small_config()
    }
}
use proptest::prelude::*;
use weft_storage::{Batch, BatchBuilder, EntryKind, PartitionLog, ProducerInfo};

/// A record: timestamp, key, value.
type RecordSpec = (i64, Vec<u8>, Vec<u8>);

#[derive(Debug, Clone)]
enum Op {
    Append {
        records: Vec<RecordSpec>,
    },
    AppendControl {
        payload: Vec<u8>,
    },
    /// One entry of several batches (coalesced publishes of several producers).
    AppendMulti {
        batches: Vec<Vec<RecordSpec>>,
    },
    Read {
        from_frac: f64,
        max_bytes: usize,
        limit_frac: f64,
    },
    ReadEntries {
        from_frac: f64,
        max_bytes: usize,
    },
    Truncate {
        back: u64,
    },
    Purge {
        frac: f64,
    },
    Flush,
    Reopen {
        clean: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let record = (
        0i64..1_000_000,
        prop::collection::vec(any::<u8>(), 0..8),
        prop::collection::vec(any::<u8>(), 0..400),
    );
    prop_oneof![
        12 => prop::collection::vec(record.clone(), 1..6).prop_map(|records| Op::Append { records }),
        4 => prop::collection::vec(
            prop::collection::vec(
                (0i64..1_000_000, prop::collection::vec(any::<u8>(), 0..8), prop::collection::vec(any::<u8>(), 0..200)),
                1..4,
            ),
            2..4,
        )
        .prop_map(|batches| Op::AppendMulti { batches }),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(|payload| Op::AppendControl { payload }),
        4 => (0.0..1.0f64, 1usize..6000, 0.0..1.2f64).prop_map(|(from_frac, max_bytes, limit_frac)| Op::Read { from_frac, max_bytes, limit_frac }),
        2 => (0.0..1.0f64, 1usize..6000).prop_map(|(from_frac, max_bytes)| Op::ReadEntries { from_frac, max_bytes }),
        1 => (1u64..12).prop_map(|back| Op::Truncate { back }),
        1 => (0.0..1.0f64).prop_map(|frac| Op::Purge { frac }),
        2 => Just(Op::Flush),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

/// The model: the entries the log should hold, in order.
#[derive(Debug, Default)]
struct Model {
    entries: Vec<Batch>,
    next_offset: u64,
    next_index: u64,
}

impl Model {
    fn start_index(&self) -> u64 {
        self.entries
            .first()
            .map_or(self.next_index, |b| b.header().index)
    }
}

fn check_reads(log: &PartitionLog, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.end().next_offset, model.next_offset);
    prop_assert_eq!(log.end().next_index, model.next_index);
    prop_assert_eq!(
        log.first_index(),
        model.entries.first().map(|b| b.header().index)
    );
    let got = common::read_all_entries(log).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(got.len(), model.entries.len());
    for (g, m) in got.iter().zip(&model.entries) {
        prop_assert_eq!(g.bytes(), m.bytes());
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Some(PartitionLog::open(dir.path(), small_config()).expect("open"));
    let mut model = Model::default();
    // The log was opened clean and has not changed since: its tail's index files still
    // describe it, and an open after it is dropped finds it clean too.
    let mut untouched = false;
    for op in ops {
        let l = log.as_mut().expect("open log");
        let end_before = l.end();
        match op {
            Op::Append { records } => {
                let mut builder = BatchBuilder::new();
                for (ts, key, value) in &records {
                    builder.push(*ts, key, value, [(&b"h"[..], &key[..])]);
                }
                let batch = builder.seal(
                    model.next_offset,
                    3,
                    model.next_index,
                    ProducerInfo::default(),
                );
                let appended = l
                    .append(&batch)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(appended.base_offset, model.next_offset);
                model.next_offset += records.len() as u64;
                model.next_index += 1;
                model.entries.push(batch);
            }
            Op::AppendMulti { batches } => {
                let mut sealed = Vec::new();
                let mut offset = model.next_offset;
                for (producer, records) in batches.iter().enumerate() {
                    let mut builder = BatchBuilder::new();
                    for (ts, key, value) in records {
                        builder.push(*ts, key, value, []);
                    }
                    sealed.push(builder.seal(
                        offset,
                        3,
                        model.next_index,
                        ProducerInfo {
                            producer_id: producer as u64 + 1,
                            producer_epoch: 0,
                            base_sequence: 0,
                        },
                    ));
                    offset += records.len() as u64;
                }
                let appended = l
                    .append_entry(&sealed)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(appended.base_offset, model.next_offset);
                prop_assert_eq!(appended.next_offset, offset);
                model.next_offset = offset;
                model.next_index += 1;
                model.entries.extend(sealed);
            }
            Op::AppendControl { payload } => {
                let batch = Batch::control(model.next_offset, 3, model.next_index, &payload);
                l.append(&batch)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.next_index += 1;
                model.entries.push(batch);
            }
            Op::Read {
                from_frac,
                max_bytes,
                limit_frac,
            } => {
                let start = l.start_offset();
                let span = model.next_offset - start;
                let from = start + (span as f64 * from_frac) as u64;
                let limit = start + (span as f64 * limit_frac) as u64;
                let got = l
                    .read(from, max_bytes, limit)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let want: Vec<&Batch> = model
                    .entries
                    .iter()
                    .filter(|b| {
                        let h = b.header();
                        from < limit
                            && h.kind == EntryKind::Records
                            && h.record_count > 0
                            && h.next_offset() > from
                            && h.base_offset < limit.min(model.next_offset)
                    })
                    .collect();
                prop_assert_eq!(
                    got.is_empty(),
                    want.is_empty(),
                    "read {} .. {} returned {} batches",
                    from,
                    limit,
                    got.len()
                );
                // Whole entries: past max_bytes only when the first entry alone is larger.
                let total: usize = got.iter().map(Batch::len).sum();
                prop_assert!(
                    total <= max_bytes
                        || got
                            .iter()
                            .all(|b| b.header().index == got[0].header().index)
                );
                for (g, w) in got.iter().zip(&want) {
                    prop_assert_eq!(g.bytes(), w.bytes());
                }
                // The tail cache answers the same, for the offsets it holds.
                let tail = l.tail_cache();
                let (cached_from, cached_end) = tail.range();
                prop_assert_eq!(cached_end, model.next_offset);
                prop_assert!(tail.bytes() <= TAIL_CACHE_BYTES);
                match tail.read(from, max_bytes, limit) {
                    Some(cached) => {
                        prop_assert!(from >= cached_from);
                        prop_assert_eq!(cached.is_empty(), want.is_empty());
                        let total: usize = cached.iter().map(Batch::len).sum();
                        prop_assert!(total <= max_bytes || cached.len() == 1);
                        for (c, w) in cached.iter().zip(&want) {
                            prop_assert_eq!(c.bytes(), w.bytes());
                        }
                    }
                    None => prop_assert!(from < cached_from, "a miss inside the cached range"),
                }
            }
            Op::ReadEntries {
                from_frac,
                max_bytes,
            } => {
                let start = model.start_index();
                let from = start + ((model.next_index - start) as f64 * from_frac) as u64;
                let got = l
                    .read_entries(from, model.next_index, max_bytes)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let want: Vec<&Batch> = model
                    .entries
                    .iter()
                    .filter(|b| b.header().index >= from)
                    .collect();
                prop_assert_eq!(got.is_empty(), want.is_empty());
                for (g, w) in got.iter().zip(&want) {
                    prop_assert_eq!(g.bytes(), w.bytes());
                }
                // An entry is never split: the last one read is complete.
                if let Some(last) = got.last() {
                    let index = last.header().index;
                    let read = got.iter().filter(|b| b.header().index == index).count();
                    let all = model
                        .entries
                        .iter()
                        .filter(|b| b.header().index == index)
                        .count();
                    prop_assert_eq!(read, all, "entry {} split by read_entries", index);
                }
            }
            Op::Truncate { back } => {
                let start = model.start_index();
                let at = model.next_index.saturating_sub(back).max(start);
                l.truncate_from_index(at)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let keep = model
                    .entries
                    .iter()
                    .take_while(|b| b.header().index < at)
                    .count();
                if let Some(first_removed) = model.entries.get(keep) {
                    model.next_offset = first_removed.header().base_offset;
                    model.next_index = at;
                }
                model.entries.truncate(keep);
            }
            Op::Purge { frac } => {
                let start = l.start_offset();
                let target = start + ((model.next_offset - start) as f64 * frac) as u64;
                let report = l
                    .purge_before_offset(target)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Nothing at or after the target may go; what remains must be a suffix of the model.
                prop_assert!(report.start_offset <= target.max(start));
                let first = l.first_index().unwrap_or(model.next_index);
                let dropped = model
                    .entries
                    .iter()
                    .take_while(|b| b.header().index < first)
                    .count();
                prop_assert!(
                    model.entries[dropped..]
                        .iter()
                        .all(|b| b.header().index >= first)
                );
                if let Some(b) = model.entries.get(dropped) {
                    prop_assert!(b.header().base_offset <= target.max(start) || dropped == 0);
                }
                model.entries.drain(..dropped);
            }
            Op::Flush => {
                let durable = l.flush().map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(durable, l.end());
            }
            Op::Reopen { clean } => {
                let taken = log.take().expect("open log");
                if clean {
                    taken
                        .close()
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                } else {
                    drop(taken);
                }
                let reopened = PartitionLog::open(dir.path(), small_config())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let report = reopened.recovery_report();
                prop_assert_eq!(report.clean_shutdown, clean || untouched);
                untouched = report.clean_shutdown;
                prop_assert_eq!(&report.torn_tail, &None);
                prop_assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
                log = Some(reopened);
                check_reads(log.as_ref().expect("open log"), &model)?;
                continue;
            }
        }
        if log.as_ref().expect("open log").end() != end_before {
            untouched = false;
        }
        check_reads(log.as_ref().expect("open log"), &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}
