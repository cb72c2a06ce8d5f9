//! Helpers shared by the storage integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft_storage::{Batch, BatchBuilder, LogConfig, PartitionLog, ProducerInfo, SyncListener};

/// What a test appended: enough to check every byte that comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub index: u64,
    pub base_offset: u64,
    pub bytes: bytes::Bytes,
}

/// A small log config that rolls often, so tests cross segment boundaries.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 8 * 1024,
        index_interval_bytes: 512,
        batch_bytes_max: 4 * 1024,
        ..LogConfig::default()
    }
}

/// A record batch with `count` records of pseudo-random content derived from `seed`.
pub fn make_batch(
    rng: &mut StdRng,
    count: usize,
    value_max: usize,
    base_offset: u64,
    term: u64,
    index: u64,
) -> Batch {
    let mut builder = BatchBuilder::new();
    for _ in 0..count {
        let ts = 1_700_000_000_000 + rng.random_range(0..100_000i64);
        let key: Vec<u8> = (0..rng.random_range(0..8)).map(|_| rng.random()).collect();
        let value: Vec<u8> = (0..rng.random_range(0..=value_max))
            .map(|_| rng.random())
            .collect();
        let header_value: Vec<u8> = (0..rng.random_range(0..4)).map(|_| rng.random()).collect();
        builder.push(ts, &key, &value, [(&b"traceparent"[..], &header_value[..])]);
    }
    builder.seal(
        base_offset,
        term,
        index,
        ProducerInfo {
            producer_id: 1,
            producer_epoch: 0,
            base_sequence: base_offset,
        },
    )
}

/// Appends a random batch (sometimes a control entry) at the log's end and returns what to expect.
pub fn append_random(log: &mut PartitionLog, rng: &mut StdRng, value_max: usize) -> Expected {
    let end = log.end();
    let batch = if rng.random_ratio(1, 10) {
        let payload: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
        Batch::control(end.next_offset, 1, end.next_index, &payload)
    } else {
        let count = rng.random_range(1..6);
        make_batch(rng, count, value_max, end.next_offset, 1, end.next_index)
    };
    log.append(&batch).expect("append");
    Expected {
        index: end.next_index,
        base_offset: end.next_offset,
        bytes: batch.bytes().clone(),
    }
}

/// Every entry of the log, read by Raft index.
pub fn read_all_entries(log: &PartitionLog) -> weft_storage::Result<Vec<Batch>> {
    let end = log.end().next_index;
    let mut from = log.first_index().unwrap_or(end);
    let mut out = Vec::new();
    while from < end {
        let batches = log.read_entries(from, end, 64 * 1024)?;
        assert!(
            !batches.is_empty(),
            "read_entries({from}, {end}) returned nothing"
        );
        from = batches.last().expect("non-empty").header().index + 1;
        out.extend(batches);
    }
    Ok(out)
}

/// Records the last durable length of every file, as a power loss would leave it.
#[derive(Debug, Default)]
pub struct SyncRecorder {
    pub synced: Mutex<HashMap<PathBuf, u64>>,
    /// Number of data-file syncs seen.
    pub data_syncs: std::sync::atomic::AtomicUsize,
}

impl SyncListener for SyncRecorder {
    fn replaced(&self, path: &Path, len: u64) {
        self.synced
            .lock()
            .expect("lock")
            .insert(path.to_path_buf(), len);
    }

    fn synced(&self, path: &Path, len: u64) {
        let mut synced = self.synced.lock().expect("lock");
        let entry = synced.entry(path.to_path_buf()).or_insert(0);
        *entry = (*entry).max(len);
        drop(synced);
        if path.extension().is_some_and(|e| e == "log") {
            self.data_syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl SyncRecorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn synced_len(&self, path: &Path) -> Option<u64> {
        self.synced.lock().expect("lock").get(path).copied()
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Seed from WEFT_TEST_SEED, else a fresh one; always printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("WEFT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: seed {seed} (replay with WEFT_TEST_SEED={seed})");
    seed
}

/// Cuts the zeros a direct write leaves after the last frame of the log in `dir` (left by a
/// crash: a log dropped without closing) the way the log does, by opening it, and drops it again
/// without closing: the files then hold only frames, and the next open still scans the tail.
pub fn cut_direct_padding(dir: &Path, config: &LogConfig) {
    drop(PartitionLog::open(dir, config.clone()).expect("open to cut the padding"));
}
