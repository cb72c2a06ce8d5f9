//! Criterion micro-benchmarks of the hot paths under the broker: the batch codec (encode,
//! decode and record iteration) and the segment store (append without sync, append + fsync,
//! read back).
//!
//! ```text
//! cargo bench -p weft-bench --bench micro             # all
//! cargo bench -p weft-bench --bench micro -- codec    # a filter
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use weft_storage::{Batch, BatchBuilder, LogConfig, PartitionLog, ProducerInfo};

const VALUE_BYTES: usize = 1024;

fn build(records: usize) -> Batch {
    let value = vec![0x5au8; VALUE_BYTES];
    let mut builder = BatchBuilder::with_capacity(records * (VALUE_BYTES + 64));
    for i in 0..records {
        builder.push(
            1_700_000_000_000 + i as i64,
            b"key",
            &value,
            [(
                &b"traceparent"[..],
                &b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..],
            )],
        );
    }
    builder.seal(0, 1, 0, ProducerInfo::default())
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for records in [1usize, 100, 1000] {
        let batch = build(records);
        group.throughput(Throughput::Bytes(batch.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", records), &records, |b, &n| {
            b.iter(|| black_box(build(n)))
        });
        let bytes: Bytes = batch.bytes().clone();
        group.bench_with_input(BenchmarkId::new("decode", records), &bytes, |b, bytes| {
            b.iter(|| black_box(Batch::decode(bytes.clone()).expect("valid batch")))
        });
        group.bench_with_input(
            BenchmarkId::new("decode+records", records),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let batch = Batch::decode(bytes.clone()).expect("valid batch");
                    let mut total = 0usize;
                    for record in batch.records() {
                        total += record.value.len();
                    }
                    black_box(total)
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("restamp", records), &batch, |b, batch| {
            b.iter(|| black_box(batch.clone().restamp(1000, 2, 7)))
        });
        // What the log store does to a leader's proposal: restamp bytes it holds alone (in
        // place; the copy that makes them unique is set up outside the timing).
        group.bench_with_input(
            BenchmarkId::new("restamp-in-place", records),
            &bytes,
            |b, bytes| {
                b.iter_batched(
                    || Batch::decode(Bytes::copy_from_slice(bytes)).expect("valid batch"),
                    |batch| black_box(batch.restamp(1000, 2, 7)),
                    criterion::BatchSize::LargeInput,
                )
            },
        );
    }
    group.finish();
}

/// Appends `batch` at the log's end, `iters` times, in a fresh log; returns the time spent.
fn append_run(batch: &Batch, iters: u64, sync_every: Option<u64>) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = PartitionLog::open(dir.path(), LogConfig::default()).expect("open log");
    let start = Instant::now();
    for i in 0..iters {
        let end = log.end();
        let stamped = batch.clone().restamp(end.next_offset, 1, end.next_index);
        log.append(&stamped).expect("append");
        if sync_every.is_some_and(|n| (i + 1) % n == 0) {
            log.flush().expect("flush");
        }
    }
    let elapsed = start.elapsed();
    drop(log);
    elapsed
}

fn storage(c: &mut Criterion) {
    let mut group = c.benchmark_group("storage");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for records in [16usize, 256] {
        let batch = build(records);
        group.throughput(Throughput::Bytes(batch.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("append-no-sync", records),
            &batch,
            |b, batch| b.iter_custom(|iters| append_run(batch, iters, None)),
        );
        group.bench_with_input(
            BenchmarkId::new("append+fsync", records),
            &batch,
            |b, batch| b.iter_custom(|iters| append_run(batch, iters, Some(1))),
        );
    }
    // Reading back: 64 MiB of 256-record batches, read 1 MiB at a time from the page cache.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = PartitionLog::open(dir.path(), LogConfig::default()).expect("open log");
    let batch = build(256);
    while log.size_bytes() < 64 << 20 {
        let end = log.end();
        log.append(&batch.clone().restamp(end.next_offset, 1, end.next_index))
            .expect("append");
    }
    log.flush().expect("flush");
    let end = log.end().next_offset;
    group.throughput(Throughput::Bytes(1 << 20));
    let mut from = 0u64;
    group.bench_function("read-1MiB", |b| {
        b.iter(|| {
            let batches = log.read(from, 1 << 20, end).expect("read");
            from = batches
                .last()
                .map(|b| b.header().next_offset())
                .filter(|next| *next < end)
                .unwrap_or(0);
            black_box(batches.len())
        })
    });
    group.finish();
}

criterion_group!(benches, codec, storage);
criterion_main!(benches);
