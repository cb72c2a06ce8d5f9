//! Durable append throughput of the segment store next to the raw disk limit, in the same run.
//!
//! For each batch size (records of 1 KiB), `appenders` threads append through one
//! [`GroupCommitter`] under the default fsync-before-ack policy, each keeping `in-flight` batches
//! queued like a pipelined producer. The raw limit writes the very same encoded bytes with plain
//! `write` + `fdatasync` in the best pattern those appenders could produce: `appenders x in-flight`
//! batches, then one fdatasync. The ratio is Weft's disk MB/s over raw's. A second raw run writes
//! the same number of batches per fdatasync as Weft actually achieved ("matched"), which isolates
//! the cost of the storage path from how well the load grouped.
//!
//! ```text
//! cargo bench -p weft-bench --bench storage_append -- [--seconds 3] [--appenders 4] [--in-flight 2]
//!     [--sizes 1,16,64,256,1024] [--dir PATH] [--json PATH]
//! ```

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_storage::{
    BatchBuilder, FRAME_HEADER_LEN, GroupCommitter, LogConfig, PartitionLog, ProducerInfo,
    SyncListener,
};

const RECORD_BYTES: usize = 1024;

#[derive(Debug)]
struct Args {
    seconds: f64,
    appenders: usize,
    in_flight: usize,
    sizes: Vec<usize>,
    dir: Option<PathBuf>,
    json: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        seconds: 3.0,
        appenders: 4,
        in_flight: 2,
        sizes: vec![1, 16, 64, 256, 1024],
        dir: None,
        json: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/bench-results/storage_append.json"
        )),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--appenders" => args.appenders = value()?.parse().context("--appenders")?,
            "--in-flight" => args.in_flight = value()?.parse().context("--in-flight")?,
            "--sizes" => {
                args.sizes = value()?
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()
                    .context("--sizes")?
            }
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            "--json" => args.json = PathBuf::from(value()?),
            // cargo bench passes --bench; ignore harness flags.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    if args.appenders == 0 || args.in_flight == 0 || args.sizes.is_empty() || args.seconds <= 0.0 {
        bail!("--appenders, --in-flight, --sizes and --seconds must be positive");
    }
    Ok(args)
}

#[derive(Debug, Default)]
struct SyncCounter(AtomicUsize);

impl SyncListener for SyncCounter {
    fn replaced(&self, _path: &Path, _len: u64) {}

    fn synced(&self, path: &Path, _len: u64) {
        if path.extension().is_some_and(|e| e == "log") {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Measured {
    appends: u64,
    disk_bytes: u64,
    payload_bytes: u64,
    fsyncs: usize,
    elapsed: Duration,
}

fn make_records(records: usize) -> Vec<Vec<u8>> {
    (0..records)
        .map(|i| (0..RECORD_BYTES).map(|j| (i * 31 + j * 7) as u8).collect())
        .collect()
}

fn run_weft(
    dir: &Path,
    records: usize,
    appenders: usize,
    in_flight: usize,
    seconds: f64,
) -> Result<Measured> {
    let counter = Arc::new(SyncCounter::default());
    let config = LogConfig {
        segment_bytes_max: 1 << 30,
        batch_bytes_max: 64 << 20,
        sync_listener: Some(counter.clone()),
        ..LogConfig::default()
    };
    let log = PartitionLog::open(dir, config).context("open log")?;
    let committer = Arc::new(GroupCommitter::spawn(log, 1, appenders * in_flight)?);
    let values = Arc::new(make_records(records));
    let stop = Arc::new(AtomicBool::new(false));
    let appends = Arc::new(AtomicU64::new(0));
    let disk_bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..appenders)
        .map(|_| {
            let (committer, values, stop, appends, disk_bytes) = (
                committer.clone(),
                values.clone(),
                stop.clone(),
                appends.clone(),
                disk_bytes.clone(),
            );
            std::thread::spawn(move || -> Result<()> {
                // Each appender keeps `in_flight` batches queued, like a pipelined producer.
                let (done_tx, done_rx) = std::sync::mpsc::channel();
                let mut outstanding = 0;
                loop {
                    while outstanding < in_flight && !stop.load(Ordering::Relaxed) {
                        let mut builder =
                            BatchBuilder::with_capacity(records * (RECORD_BYTES + 32));
                        for value in values.iter() {
                            builder.push(1_700_000_000_000, b"", value, []);
                        }
                        let frame = (builder.encoded_len() + FRAME_HEADER_LEN) as u64;
                        let done_tx = done_tx.clone();
                        committer.append(builder, ProducerInfo::default(), move |result| {
                            let _ = done_tx.send(result.map(|c| (c, frame)));
                        })?;
                        outstanding += 1;
                    }
                    if outstanding == 0 {
                        return Ok(());
                    }
                    let (committed, frame) = done_rx.recv()??;
                    outstanding -= 1;
                    if !committed.is_durable() {
                        bail!("acknowledged before durable");
                    }
                    appends.fetch_add(1, Ordering::Relaxed);
                    disk_bytes.fetch_add(frame, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("appender panicked"))??;
    }
    let elapsed = start.elapsed();
    let committer = Arc::into_inner(committer).context("committer still shared")?;
    committer.close()?;
    let appends = appends.load(Ordering::Relaxed);
    Ok(Measured {
        appends,
        disk_bytes: disk_bytes.load(Ordering::Relaxed),
        payload_bytes: appends * (records * RECORD_BYTES) as u64,
        fsyncs: counter.0.load(Ordering::Relaxed),
        elapsed,
    })
}

/// The same frame bytes, `group` writes then one fdatasync, for `seconds`.
fn run_raw(dir: &Path, records: usize, group: usize, seconds: f64) -> Result<Measured> {
    let mut builder = BatchBuilder::with_capacity(records * (RECORD_BYTES + 32));
    for value in make_records(records) {
        builder.push(1_700_000_000_000, b"", &value, []);
    }
    let batch = builder.seal(0, 1, 0, ProducerInfo::default());
    let mut frame = vec![0u8; FRAME_HEADER_LEN];
    frame.extend_from_slice(batch.bytes());
    let path = dir.join("raw.data");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let (mut appends, mut fsyncs) = (0u64, 0usize);
    while Instant::now() < deadline {
        for _ in 0..group {
            file.write_all(&frame)?;
        }
        file.sync_data()?;
        appends += group as u64;
        fsyncs += 1;
    }
    let elapsed = start.elapsed();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Measured {
        appends,
        disk_bytes: appends * frame.len() as u64,
        payload_bytes: appends * (records * RECORD_BYTES) as u64,
        fsyncs,
        elapsed,
    })
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let base = match &args.dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))?,
    };
    println!(
        "storage_append: {} appenders x {} in flight, 1 KiB records, fsync before ack, {} s per run, in {}",
        args.appenders,
        args.in_flight,
        args.seconds,
        base.path().display()
    );
    println!(
        "{:>8} {:>9} | {:>10} {:>10} {:>9} {:>8} | {:>10} {:>9} {:>6} | {:>11} {:>6}",
        "records",
        "batch KiB",
        "weft MB/s",
        "payload",
        "appends/s",
        "per sync",
        "raw MB/s",
        "syncs/s",
        "ratio",
        "matched raw",
        "ratio"
    );
    let mut rows = Vec::new();
    for &records in &args.sizes {
        let weft_dir = base.path().join(format!("weft-{records}"));
        let weft = run_weft(
            &weft_dir,
            records,
            args.appenders,
            args.in_flight,
            args.seconds,
        )?;
        std::fs::remove_dir_all(&weft_dir)?;
        let group = args.appenders * args.in_flight;
        let raw = run_raw(base.path(), records, group, args.seconds)?;
        let weft_mb = mb_per_s(weft.disk_bytes, weft.elapsed);
        let raw_mb = mb_per_s(raw.disk_bytes, raw.elapsed);
        let ratio = weft_mb / raw_mb;
        let per_sync = weft.appends as f64 / weft.fsyncs.max(1) as f64;
        // The same bytes per fsync as Weft achieved: isolates the storage path's own cost from how
        // well this load happened to group.
        let matched_group = (per_sync.round() as usize).max(1);
        let matched = run_raw(base.path(), records, matched_group, args.seconds)?;
        let matched_mb = mb_per_s(matched.disk_bytes, matched.elapsed);
        println!(
            "{:>8} {:>9.1} | {:>10.1} {:>10.1} {:>9.0} {:>8.2} | {:>10.1} {:>9.0} {:>6.2} | {:>11.1} {:>6.2}",
            records,
            (records * RECORD_BYTES) as f64 / 1024.0,
            weft_mb,
            mb_per_s(weft.payload_bytes, weft.elapsed),
            weft.appends as f64 / weft.elapsed.as_secs_f64(),
            per_sync,
            raw_mb,
            raw.fsyncs as f64 / raw.elapsed.as_secs_f64(),
            ratio,
            matched_mb,
            weft_mb / matched_mb
        );
        rows.push(serde_json::json!({
            "records_per_batch": records,
            "record_bytes": RECORD_BYTES,
            "appenders": args.appenders,
            "in_flight_per_appender": args.in_flight,
            "weft": {
                "disk_mb_per_s": weft_mb,
                "payload_mb_per_s": mb_per_s(weft.payload_bytes, weft.elapsed),
                "appends_per_s": weft.appends as f64 / weft.elapsed.as_secs_f64(),
                "fsyncs": weft.fsyncs,
                "appends_per_fsync": per_sync,
            },
            "raw": {
                "disk_mb_per_s": raw_mb,
                "fsyncs_per_s": raw.fsyncs as f64 / raw.elapsed.as_secs_f64(),
                "writes_per_fsync": group,
            },
            "ratio_weft_to_raw": ratio,
            "raw_matched": {
                "disk_mb_per_s": matched_mb,
                "writes_per_fsync": matched_group,
            },
            "ratio_weft_to_raw_matched": weft_mb / matched_mb,
        }));
    }
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let result = serde_json::json!({
        "benchmark": "storage_append",
        "durability": "fsync before ack (FsyncPolicy::Always, group commit)",
        "seconds_per_run": args.seconds,
        "rows": rows,
    });
    std::fs::write(&args.json, serde_json::to_vec_pretty(&result)?)?;
    println!("results: {}", args.json.display());
    Ok(())
}
