//! Fuzz-style test of the batch decoder: random bytes and mutations of valid batches must never
//! panic, and decoding must never allocate more than a small multiple of the input, whatever the
//! lengths and counts inside claim. A counting global allocator measures the largest single
//! allocation made while decoding.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use proptest::prelude::*;
use weft_storage::{Batch, BatchBuilder, ProducerInfo};

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only records sizes in const thread-locals,
// which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = TRACKING.try_with(|t| {
            if t.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
            }
        });
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Decodes and, if valid, reads every record; returns the largest allocation made meanwhile.
fn decode_measured(bytes: Bytes) -> (bool, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let ok = match Batch::decode(bytes) {
        Ok(batch) => {
            let mut n = 0usize;
            for record in batch.records() {
                n += record.value.len() + record.headers.len();
            }
            std::hint::black_box(n);
            true
        }
        Err(error) => {
            std::hint::black_box(error.to_string());
            false
        }
    };
    TRACKING.with(|t| t.set(false));
    (ok, LARGEST.with(Cell::get))
}

/// (timestamp, key, value, headers) of a generated record.
type TestRecord = (i64, Vec<u8>, Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

fn valid_batch(records: &[TestRecord]) -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    for (ts, key, value, headers) in records {
        builder.push(
            *ts,
            key,
            value,
            headers.iter().map(|(k, v)| (&k[..], &v[..])),
        );
    }
    builder
        .seal(10, 2, 3, ProducerInfo::default())
        .bytes()
        .to_vec()
}

/// Rewrites the CRC so that mutations reach the structural checks behind it.
fn fix_crc(bytes: &mut [u8]) {
    if bytes.len() >= 8 {
        let crc = crc32fast::hash(&bytes[4..]);
        bytes[..4].copy_from_slice(&crc.to_le_bytes());
    }
}

fn record() -> impl Strategy<Value = TestRecord> {
    (
        any::<i64>(),
        prop::collection::vec(any::<u8>(), 0..16),
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(
            (
                prop::collection::vec(any::<u8>(), 0..8),
                prop::collection::vec(any::<u8>(), 0..8),
            ),
            0..4,
        ),
    )
}

#[derive(Debug, Clone)]
enum Mutation {
    Set { at: usize, value: u8 },
    SetU32 { at: usize, value: u32 },
    Truncate { len: usize },
    Extend { bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        // Lengths and counts near the limits: the classic over-allocation trigger.
        (
            any::<usize>(),
            prop_oneof![
                Just(u32::MAX),
                Just(u32::MAX / 2),
                Just(1 << 20),
                any::<u32>()
            ]
        )
            .prop_map(|(at, value)| Mutation::SetU32 { at, value }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(|bytes| Mutation::Extend { bytes }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Set { at, value } if !bytes.is_empty() => {
            let i = at % bytes.len();
            bytes[i] = *value;
        }
        Mutation::SetU32 { at, value } if bytes.len() >= 4 => {
            let i = at % (bytes.len() - 3);
            bytes[i..i + 4].copy_from_slice(&value.to_le_bytes());
        }
        Mutation::Truncate { len } if !bytes.is_empty() => bytes.truncate(len % bytes.len()),
        Mutation::Extend { bytes: extra } => bytes.extend_from_slice(extra),
        _ => {}
    }
}

fn allocation_bound(input_len: usize) -> usize {
    // Header vectors hold two spans (32 bytes) per 8 input bytes at most; error messages are short.
    4 * input_len + 1024
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_or_over_allocate(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let len = bytes.len();
        let (_, largest) = decode_measured(Bytes::from(bytes));
        prop_assert!(largest <= allocation_bound(len), "{largest} bytes allocated for {len} input bytes");
    }

    #[test]
    fn mutated_batches_never_panic_or_over_allocate(
        records in prop::collection::vec(record(), 0..8),
        mutations in prop::collection::vec(mutation(), 1..4),
        keep_crc_valid in any::<bool>(),
    ) {
        let mut bytes = valid_batch(&records);
        let original = bytes.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        if keep_crc_valid {
            fix_crc(&mut bytes);
        }
        let len = bytes.len();
        let (ok, largest) = decode_measured(Bytes::from(bytes.clone()));
        prop_assert!(largest <= allocation_bound(len), "{largest} bytes allocated for {len} input bytes");
        if !keep_crc_valid && bytes != original {
            prop_assert!(!ok, "a mutation without a CRC fix must be rejected");
        }
    }

    #[test]
    fn valid_batches_always_decode(records in prop::collection::vec(record(), 0..8)) {
        let bytes = valid_batch(&records);
        let batch = Batch::decode(Bytes::from(bytes)).expect("valid batch decodes");
        let decoded: Vec<_> = batch.records().collect();
        prop_assert_eq!(decoded.len(), records.len());
        for (r, (ts, key, value, headers)) in decoded.iter().zip(&records) {
            prop_assert_eq!(r.timestamp_ms, *ts);
            prop_assert_eq!(r.key.as_ref(), &key[..]);
            prop_assert_eq!(r.value.as_ref(), &value[..]);
            prop_assert_eq!(r.headers.len(), headers.len());
        }
    }
}

#[test]
fn the_allocation_meter_sees_allocations() {
    // The headers of a decoded record are collected into a Vec: the meter must see it, or the
    // bounds above would prove nothing.
    let bytes = valid_batch(&[(
        1,
        b"k".to_vec(),
        b"v".to_vec(),
        vec![(b"a".to_vec(), b"b".to_vec()); 3],
    )]);
    let (ok, largest) = decode_measured(Bytes::from(bytes));
    assert!(ok);
    assert!(largest > 0, "allocation meter recorded nothing");
}
