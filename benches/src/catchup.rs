//! `weft-bench catch-up`: how fast a replica that fell behind catches up with its leader. It
//! starts the `weft-cluster` driver's cluster, creates a topic of one partition (replication
//! factor 3), freezes one follower with SIGSTOP, and publishes through the leader until the
//! frozen follower lacks `records` records (of `record_bytes` each, `batch_records` to a
//! publish). Then the follower gets SIGCONT and the leader's own view of it (`replica_lag` in
//! ListPartitions, polled every 20 ms) is watched until it lacks nothing. The same bytes are
//! then written to a file of the same filesystem in 4 MiB writes, each followed by fdatasync:
//! the raw disk's rate, measured in the same run.
//!
//! Catch-up must outrun ingestion, or a replica that fell behind under steady load never
//! catches up: the result gives both rates and their ratio.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::Signal;
use serde::Serialize;
use weft_client::{ProducerConfig, Record};

use crate::drivers::Driver;
use crate::drivers::weft::WeftClusterDriver;
use crate::failover::wait_for_leader;

const TOPIC: &str = "catch-up";

/// What to publish while the follower is frozen.
#[derive(Debug, Clone, Copy)]
pub struct CatchUpOptions {
    /// Records published while the follower is frozen.
    pub records: u64,
    /// Bytes of each record's value.
    pub record_bytes: usize,
    /// Records per publish (the producer's `batch_records_max`).
    pub batch_records: usize,
    /// Most seconds the catch-up may take before the run fails.
    pub limit_seconds: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct CatchUpResult {
    /// The options' values.
    pub records: u64,
    pub record_bytes: usize,
    pub batch_records: usize,
    /// Raft entries and log bytes the frozen follower lacked when it was resumed (the leader's
    /// `replica_lag`).
    pub lag_entries: u64,
    pub lag_bytes: u64,
    /// Seconds the leader took to take the records from the producer (acknowledged by the
    /// leader and the other follower).
    pub ingest_seconds: f64,
    /// Seconds from SIGCONT until the leader saw the follower lack nothing.
    pub catch_up_seconds: f64,
    /// Seconds from SIGCONT until the leader first saw the follower lack fewer entries (the
    /// resumed broker answers what queued up while it was frozen, and the leader's replication
    /// to it retries: a delay that does not grow with the lag).
    pub first_progress_seconds: f64,
    /// Seconds to write `lag_bytes` to a file in 4 MiB writes, each followed by fdatasync.
    pub disk_seconds: f64,
}

impl CatchUpResult {
    /// Catch-up's rate against the leader's ingestion of the same entries (above 1: a replica
    /// behind under that load catches up).
    pub fn against_ingest(&self) -> f64 {
        self.ingest_seconds / self.catch_up_seconds.max(1e-9)
    }

    /// Catch-up's byte rate against the raw disk's.
    pub fn against_disk(&self) -> f64 {
        self.disk_seconds / self.catch_up_seconds.max(1e-9)
    }
}

/// Runs one catch-up in a cluster kept in `dir`.
pub async fn run(options: CatchUpOptions, dir: &Path) -> Result<CatchUpResult> {
    let (data, cluster) = WeftClusterDriver::start_in(dir, "weft-bench-catch-up").await?;
    let outcome = catch_up_on(&cluster, options).await;
    cluster.stop().await?;
    let mut result = outcome?;
    result.disk_seconds = raw_disk_seconds(data.path(), result.lag_bytes)?;
    Ok(result)
}

/// (entries, bytes) `follower` lacks, as `leader` sees it; None when the leader does not say.
async fn lag(cluster: &WeftClusterDriver, leader: u64, follower: u64) -> Option<(u64, u64)> {
    let client = cluster.client(leader)?;
    let partitions = tokio::time::timeout(Duration::from_secs(2), client.admin().partitions(TOPIC))
        .await
        .ok()?
        .ok()?;
    let p = partitions.first()?;
    if p.leader_id != leader {
        return None;
    }
    p.replica_lag
        .iter()
        .find(|l| l.node_id == follower)
        .map(|l| (l.entries, l.bytes))
}

async fn catch_up_on(
    cluster: &WeftClusterDriver,
    options: CatchUpOptions,
) -> Result<CatchUpResult> {
    cluster.create_topic(TOPIC, 1).await?;
    let leader = wait_for_leader(cluster, TOPIC, 1, None, Duration::from_secs(30)).await?;
    let follower = if leader == 1 { 2 } else { 1 };
    // Every replica has the partition open and follows before the freeze.
    let deadline = Instant::now() + Duration::from_secs(30);
    while lag(cluster, leader, follower).await != Some((0, 0)) {
        if Instant::now() > deadline {
            bail!("node {follower} did not follow {leader} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.signal(follower, Signal::STOP)?;
    let client = cluster.client(leader).context("no client of the leader")?;
    let producer = client.producer(ProducerConfig {
        batch_records_max: options.batch_records.max(1),
        linger: Duration::ZERO,
        ..ProducerConfig::default()
    });
    let value = bytes::Bytes::from(vec![b'c'; options.record_bytes]);
    let started = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for _ in 0..options.records {
        acks.push_back(
            producer
                .send_nowait(TOPIC, Record::new(value.clone()))
                .await?,
        );
        // Bounded: at most 64k answers outstanding.
        if acks.len() >= 65_536
            && let Some(ack) = acks.pop_front()
        {
            ack.await?;
        }
    }
    for ack in acks {
        ack.await?;
    }
    let ingest_seconds = started.elapsed().as_secs_f64();
    producer.close().await?;
    let (lag_entries, lag_bytes) = lag(cluster, leader, follower)
        .await
        .context("the leader did not report the frozen follower's lag")?;
    eprintln!(
        "node {follower} frozen; node {leader} took {} records in {ingest_seconds:.2} s: \
         {lag_entries} entries, {:.1} MiB behind",
        options.records,
        lag_bytes as f64 / f64::from(1 << 20)
    );
    cluster.signal(follower, Signal::CONT)?;
    let resumed = Instant::now();
    let limit = Duration::from_secs(options.limit_seconds);
    let mut first_progress = None;
    loop {
        let now = lag(cluster, leader, follower).await;
        if first_progress.is_none() && now.is_some_and(|(e, _)| e < lag_entries) {
            first_progress = Some(resumed.elapsed().as_secs_f64());
        }
        if now.is_some_and(|(e, _)| e == 0) {
            break;
        }
        if resumed.elapsed() > limit {
            bail!(
                "node {follower} still lacked {:?} (entries, bytes) after {limit:?}",
                lag(cluster, leader, follower).await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up_seconds = resumed.elapsed().as_secs_f64();
    Ok(CatchUpResult {
        records: options.records,
        record_bytes: options.record_bytes,
        batch_records: options.batch_records,
        lag_entries,
        lag_bytes,
        ingest_seconds,
        catch_up_seconds,
        first_progress_seconds: first_progress.unwrap_or(catch_up_seconds),
        disk_seconds: 0.0,
    })
}

/// Seconds to write `bytes` to a new file in `dir` in 4 MiB writes, each followed by fdatasync.
fn raw_disk_seconds(dir: &Path, bytes: u64) -> Result<f64> {
    let path = dir.join("raw-disk");
    let mut file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let chunk = vec![0x5au8; 4 << 20];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        file.write_all(&chunk[..n])?;
        file.sync_data()?;
        left -= n as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(seconds)
}
