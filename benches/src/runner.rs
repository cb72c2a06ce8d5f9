//! Runs one workload against one driver.
//!
//! Producers follow the workload's schedule: at a fixed rate, message `i` of a producer is due at
//! `origin + i / rate`, and both of its latencies are measured from that intended time, so a
//! stall (a slow acknowledgement holding the in-flight window full, a slow client queue) delays
//! every message behind it in the figures instead of hiding them (no coordinated omission). At
//! rate 0 a message is due when the window has room. The payload's first 8 bytes carry the
//! intended time, so consumers measure end-to-end latency from it too. Messages due during the
//! warm-up are counted but not measured.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

use crate::drivers::{self, BenchConsumer, BenchProducer, DriverSpec, Kind};
use crate::progress::Progress;
use crate::result::{Counts, GroupCount, Latency, RunResult, Second};
use crate::workload::{KeyDistribution, Workload};

/// Settings of a run that are not part of the workload.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where started systems keep their data (a fresh directory inside, removed afterwards).
    pub data_dir: PathBuf,
    /// How long to wait after the last send for outstanding acknowledgements, and for consumers
    /// to catch up.
    pub drain_timeout: Duration,
    /// Progress display.
    pub progress: bool,
}

/// Block size of the raw disk baseline.
pub const DISK_BLOCK_BYTES: usize = 1024 * 1024;

const HISTOGRAM_MAX_US: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros().min(u128::from(HISTOGRAM_MAX_US)) as u64).max(1)
}

/// Counters shared by the tasks of a run.
#[derive(Debug)]
struct Shared {
    origin: Instant,
    warmup_end: Instant,
    end: Instant,
    sent: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    consumed: AtomicU64,
    acked_measured: AtomicU64,
    consumed_measured: AtomicU64,
    acked_per_topic: Vec<AtomicU64>,
    producers_done: AtomicBool,
    drain_deadline: OnceLock<Instant>,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, e: impl std::fmt::Display) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 10 {
            errors.push(e.to_string());
        }
    }

    fn in_window(&self, t: Instant) -> bool {
        t >= self.warmup_end && t < self.end
    }

    fn second(&self, t: Instant) -> usize {
        t.saturating_duration_since(self.origin).as_secs() as usize
    }
}

/// What a producer or consumer task measured.
struct Measured {
    latency: Histogram<u64>,
    per_second: Vec<u64>,
}

impl Measured {
    fn new() -> Measured {
        Measured {
            latency: histogram(),
            per_second: Vec::new(),
        }
    }

    fn count_at(&mut self, second: usize) {
        // Bounded by the run's length (warm-up + duration + drain timeout).
        if self.per_second.len() <= second {
            self.per_second.resize(second + 1, 0);
        }
        self.per_second[second] += 1;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs `workload` against the system `spec` names, starting it (and stopping it) unless the spec
/// points at a running one.
pub async fn run(
    workload: &Workload,
    spec: &DriverSpec,
    options: &RunOptions,
) -> Result<RunResult> {
    workload.validate()?;
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("creating {}", options.data_dir.display()))?;
    // Whatever was deleted or written before this run (an earlier round's data directory) is
    // settled first, so that it does not land inside this run's measurement.
    settle_filesystem(&options.data_dir);
    let dir = tempfile::Builder::new()
        .prefix(&format!("weft-bench-{}-", spec.kind.name()))
        .tempdir_in(&options.data_dir)
        .context("creating the run's data directory")?;
    let result = if spec.kind == Kind::Disk {
        run_disk(workload, spec, options, dir.path()).await
    } else {
        run_system(workload, spec, options, dir.path()).await
    };
    // Remove the run's data now and make the removal durable, rather than at the next round's
    // first fsync: on a filesystem mounted with `discard` (this machine's root), the journal
    // commit that frees a run's gigabytes also discards them, and every fsync waits behind it.
    // Measured: removing a 2 GiB file during latency-5k put a 340 ms stall in that run (e2e
    // p99 296 ms); with the removal synced before it, p99 2.6 ms.
    if let Err(e) = dir.close() {
        eprintln!("warning: removing the run's data directory: {e}");
    }
    settle_filesystem(&options.data_dir);
    result
}

async fn run_system(
    workload: &Workload,
    spec: &DriverSpec,
    options: &RunOptions,
    dir: &Path,
) -> Result<RunResult> {
    let started_at_ms = unix_ms();
    let driver = drivers::start(spec, dir)
        .await
        .with_context(|| format!("starting {}", spec.label()))?;
    let outcome = drive(workload, spec, options, driver.as_ref()).await;
    let stopped = driver.shutdown().await;
    let mut result = outcome?;
    stopped.with_context(|| format!("stopping {}", spec.label()))?;
    result.started_at_ms = started_at_ms;
    Ok(result)
}

/// `syncfs` of the filesystem holding `dir`: writes back what is dirty there and commits the
/// journal, with whatever frees and discards it carries. A failure only costs a quieter run, so
/// it is logged, not returned.
pub fn settle_filesystem(dir: &Path) {
    let synced = std::fs::File::open(dir).and_then(|f| rustix::fs::syncfs(&f).map_err(Into::into));
    if let Err(e) = synced {
        eprintln!("warning: syncing the filesystem of {}: {e}", dir.display());
    }
}

async fn drive(
    workload: &Workload,
    spec: &DriverSpec,
    options: &RunOptions,
    driver: &dyn drivers::Driver,
) -> Result<RunResult> {
    // Unique topic names, so a shared running system can be reused between runs.
    let tag = format!("{:x}", unix_ms() % 0xff_ffff);
    let topics: Vec<String> = (0..workload.topics)
        .map(|t| format!("{}-{tag}-{t}", workload.name))
        .collect();
    for topic in &topics {
        driver
            .create_topic(topic, workload.partitions_per_topic)
            .await?;
    }

    // Consumers first, so they are subscribed before the first message.
    let mut consumers = Vec::new();
    for (t, topic) in topics.iter().enumerate() {
        for g in 0..workload.consumer_groups_per_topic {
            let group = format!("g{g}");
            let group_count = Arc::new(AtomicU64::new(0));
            for c in 0..workload.consumers_per_group {
                let partitions: Vec<u32> = (0..workload.partitions_per_topic)
                    .filter(|p| p % workload.consumers_per_group == c)
                    .collect();
                let consumer = driver.consumer(topic, &partitions, &group).await?;
                consumers.push((t, format!("{topic}/{group}"), group_count.clone(), consumer));
            }
        }
    }
    let mut producers = Vec::new();
    for (t, topic) in topics.iter().enumerate() {
        for _ in 0..workload.producers_per_topic {
            producers.push((
                t,
                driver
                    .producer(topic, workload.partitions_per_topic, workload.in_flight)
                    .await?,
            ));
        }
    }

    let origin = Instant::now() + Duration::from_millis(20);
    let warmup = Duration::from_secs_f64(workload.warmup_seconds);
    let duration = Duration::from_secs_f64(workload.duration_seconds);
    let shared = Arc::new(Shared {
        origin,
        warmup_end: origin + warmup,
        end: origin + warmup + duration,
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        acked_measured: AtomicU64::new(0),
        consumed_measured: AtomicU64::new(0),
        acked_per_topic: topics.iter().map(|_| AtomicU64::new(0)).collect(),
        producers_done: AtomicBool::new(false),
        drain_deadline: OnceLock::new(),
        errors: Mutex::new(Vec::new()),
    });

    let progress = Progress::start(
        options.progress,
        format!("{} on {}", workload.name, spec.label()),
        warmup + duration,
        {
            let shared = shared.clone();
            move || {
                (
                    shared.sent.load(Ordering::Relaxed),
                    shared.acked.load(Ordering::Relaxed),
                    shared.consumed.load(Ordering::Relaxed),
                )
            }
        },
    );

    let mut consumer_tasks = Vec::new();
    let mut groups: Vec<(usize, String, Arc<AtomicU64>)> = Vec::new();
    for (t, group, count, consumer) in consumers {
        if !groups.iter().any(|(_, g, _)| *g == group) {
            groups.push((t, group.clone(), count.clone()));
        }
        consumer_tasks.push(tokio::spawn(consume(shared.clone(), t, count, consumer)));
    }

    let total_producers = producers.len() as u64;
    let per_producer_rate = workload.producer_rate as f64 / total_producers as f64;
    let base_payload = {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut buf = vec![0u8; workload.message_size];
        rng.fill(&mut buf[..]);
        Bytes::from(buf)
    };
    let mut producer_tasks = Vec::new();
    for (index, (t, producer)) in producers.into_iter().enumerate() {
        producer_tasks.push(tokio::spawn(produce(
            shared.clone(),
            ProducerPlan {
                index: index as u32,
                topic: t,
                rate: per_producer_rate,
                window: workload.in_flight,
                partitions: workload.partitions_per_topic,
                keys: workload.key_distribution,
                key_count: workload.key_count,
                payload: base_payload.clone(),
                drain_timeout: options.drain_timeout,
            },
            producer,
        )));
    }

    let mut publish = histogram();
    let mut timeline_acked: Vec<u64> = Vec::new();
    for task in producer_tasks {
        let measured = task.await.context("producer task panicked")?;
        publish.add(&measured.latency).ok();
        merge(&mut timeline_acked, &measured.per_second);
    }
    let _ = shared
        .drain_deadline
        .set(Instant::now() + options.drain_timeout);
    shared.producers_done.store(true, Ordering::Release);

    let mut end_to_end = histogram();
    let mut timeline_consumed: Vec<u64> = Vec::new();
    for task in consumer_tasks {
        let measured = task.await.context("consumer task panicked")?;
        end_to_end.add(&measured.latency).ok();
        merge(&mut timeline_consumed, &measured.per_second);
    }
    progress.finish();

    let measured_seconds = duration.as_secs_f64();
    let acked_measured = shared.acked_measured.load(Ordering::Relaxed) as f64;
    let counts = Counts {
        sent: shared.sent.load(Ordering::Relaxed),
        acked: shared.acked.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        consumed: shared.consumed.load(Ordering::Relaxed),
        consumed_per_group: groups
            .iter()
            .map(|(t, group, count)| GroupCount {
                group: group.clone(),
                acked_on_topic: shared.acked_per_topic[*t].load(Ordering::Relaxed),
                consumed: count.load(Ordering::Relaxed),
            })
            .collect(),
    };
    let len = timeline_acked.len().max(timeline_consumed.len());
    let timeline = (0..len)
        .map(|s| Second {
            second: s as u64,
            acked: timeline_acked.get(s).copied().unwrap_or(0),
            consumed: timeline_consumed.get(s).copied().unwrap_or(0),
        })
        .collect();
    let errors = shared
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut result = RunResult {
        format: crate::result::RESULT_FORMAT,
        harness: format!("weft-bench {}", env!("CARGO_PKG_VERSION")),
        workload: workload.clone(),
        driver: spec.kind.name().to_string(),
        durability: spec.durability,
        durability_detail: spec.durability_detail(),
        endpoint: spec
            .endpoint
            .clone()
            .unwrap_or_else(|| "started by the harness on 127.0.0.1".into()),
        started_at_ms: 0,
        measured_seconds,
        msgs_per_sec: acked_measured / measured_seconds,
        mb_per_sec: acked_measured * workload.message_size as f64 / measured_seconds / 1e6,
        consumed_msgs_per_sec: shared.consumed_measured.load(Ordering::Relaxed) as f64
            / measured_seconds,
        publish_latency_ms: Latency::from_histogram(&publish),
        end_to_end_latency_ms: Latency::from_histogram(&end_to_end),
        counts,
        timeline,
        errors,
        checks: Default::default(),
    };
    result.compute_checks();
    Ok(result)
}

fn merge(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

struct ProducerPlan {
    index: u32,
    topic: usize,
    rate: f64,
    window: usize,
    partitions: u32,
    keys: KeyDistribution,
    key_count: u32,
    payload: Bytes,
    drain_timeout: Duration,
}

type Outcome = (Instant, Result<()>);

async fn produce(
    shared: Arc<Shared>,
    plan: ProducerPlan,
    mut producer: Box<dyn BenchProducer>,
) -> Measured {
    let mut measured = Measured::new();
    let mut in_flight = FuturesUnordered::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(plan.index) + 1);
    let interval = (plan.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / plan.rate));
    // Round-robin keys are made once, not per message.
    let round_robin: Vec<Bytes> = match plan.keys {
        KeyDistribution::RoundRobin => (0..plan.key_count)
            .map(|k| Bytes::from(format!("key-{k}")))
            .collect(),
        _ => Vec::new(),
    };
    let handle = |outcome: Outcome, measured: &mut Measured| {
        let (intended, result) = outcome;
        let now = Instant::now();
        match result {
            Ok(()) => {
                shared.acked.fetch_add(1, Ordering::Relaxed);
                shared.acked_per_topic[plan.topic].fetch_add(1, Ordering::Relaxed);
                if shared.in_window(now) {
                    shared.acked_measured.fetch_add(1, Ordering::Relaxed);
                }
                if intended >= shared.warmup_end {
                    measured
                        .latency
                        .record(micros(now.saturating_duration_since(intended)))
                        .ok();
                }
                measured.count_at(shared.second(now));
            }
            Err(e) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                shared.error(format!("{e:#}"));
            }
        }
    };
    let mut i: u64 = 0;
    let mut consecutive_failures = 0u32;
    let mut arena = Arena::default();
    loop {
        // Wait for the due time (fixed rate) and for room in the window, taking acknowledgements
        // meanwhile. At rate 0 a message is due as soon as there is room.
        let due = interval.map(|interval| shared.origin + interval.mul_f64(i as f64));
        if due.is_some_and(|due| due >= shared.end) {
            break;
        }
        let wait_until = due.unwrap_or(shared.origin);
        loop {
            let now = Instant::now();
            if now >= wait_until && in_flight.len() < plan.window {
                break;
            }
            let wake = tokio::time::sleep_until(wait_until.max(now).into());
            tokio::select! {
                Some(outcome) = in_flight.next(), if !in_flight.is_empty() => handle(outcome, &mut measured),
                _ = wake, if now < wait_until => {}
            }
        }
        let intended = match due {
            Some(due) => due,
            None => {
                let now = Instant::now();
                if now >= shared.end {
                    break;
                }
                now
            }
        };
        let partition = match plan.keys {
            KeyDistribution::None => {
                ((u64::from(plan.index) + i) % u64::from(plan.partitions)) as u32
            }
            _ => 0,
        };
        let key = match plan.keys {
            KeyDistribution::None => None,
            KeyDistribution::Random => Some(arena.copy(&rng.random::<[u8; 16]>())),
            KeyDistribution::RoundRobin => {
                Some(round_robin[(i % round_robin.len() as u64) as usize].clone())
            }
        };
        let partition = match &key {
            Some(key) => weft_proto::partition_for_key(key, plan.partitions),
            None => partition,
        };
        let payload = arena.stamp(&plan.payload, intended - shared.origin, plan.index, i);
        shared.sent.fetch_add(1, Ordering::Relaxed);
        match producer.send(partition, key, payload).await {
            Ok(ack) => {
                consecutive_failures = 0;
                in_flight.push(ack.map(move |r| (intended, r)));
            }
            Err(e) => {
                handle((intended, Err(e)), &mut measured);
                consecutive_failures += 1;
                if consecutive_failures >= 100 {
                    shared.error("producer gave up after 100 failed sends in a row");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        i += 1;
    }
    // Outstanding acknowledgements, bounded by the drain timeout.
    let deadline = tokio::time::Instant::now() + plan.drain_timeout;
    while !in_flight.is_empty() {
        match tokio::time::timeout_at(deadline, in_flight.next()).await {
            Ok(Some(outcome)) => handle(outcome, &mut measured),
            Ok(None) => break,
            Err(_) => {
                let left = in_flight.len() as u64;
                shared.failed.fetch_add(left, Ordering::Relaxed);
                shared.error(format!(
                    "{left} messages not acknowledged within {:?} after the run",
                    plan.drain_timeout
                ));
                break;
            }
        }
    }
    drop(in_flight);
    if let Err(e) = tokio::time::timeout(plan.drain_timeout, producer.close())
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("producer close timed out")))
    {
        shared.error(format!("closing a producer: {e:#}"));
    }
    measured
}

/// Where a producer's payloads and keys are written: one large buffer cut into messages, so
/// a message costs no allocation of its own and every copy a client keeps of it (for a retry,
/// say) is a reference count, as in a client that reuses its buffers. A new buffer is taken
/// when one is used up; each is freed once its last message is dropped.
#[derive(Default)]
struct Arena {
    buf: BytesMut,
}

/// Bytes per arena buffer.
const ARENA_BYTES: usize = 256 * 1024;

impl Arena {
    fn room(&mut self, len: usize) {
        if self.buf.capacity() < len {
            self.buf = BytesMut::with_capacity(ARENA_BYTES.max(len));
        }
    }

    /// A copy of `bytes`.
    fn copy(&mut self, bytes: &[u8]) -> Bytes {
        self.room(bytes.len());
        self.buf.extend_from_slice(bytes);
        self.buf.split().freeze()
    }

    /// The payload: intended send time (ns since the run's origin), producer index and
    /// sequence, then the workload's random filler.
    fn stamp(&mut self, base: &Bytes, intended: Duration, producer: u32, sequence: u64) -> Bytes {
        self.room(base.len());
        self.buf.put_u64_le(intended.as_nanos() as u64);
        self.buf.put_u32_le(producer);
        self.buf.put_u32_le(sequence as u32);
        self.buf.extend_from_slice(&base[16..]);
        self.buf.split().freeze()
    }
}

fn intended_of(payload: &[u8]) -> Option<Duration> {
    let nanos = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    Some(Duration::from_nanos(nanos))
}

async fn consume(
    shared: Arc<Shared>,
    topic: usize,
    group_count: Arc<AtomicU64>,
    mut consumer: Box<dyn BenchConsumer>,
) -> Measured {
    let mut measured = Measured::new();
    loop {
        if shared.producers_done.load(Ordering::Acquire) {
            let target = shared.acked_per_topic[topic].load(Ordering::Relaxed);
            if group_count.load(Ordering::Relaxed) >= target {
                break;
            }
            if shared
                .drain_deadline
                .get()
                .is_some_and(|d| Instant::now() >= *d)
            {
                shared.error(format!(
                    "a consumer group received {} of {target} acknowledged messages before the drain timeout",
                    group_count.load(Ordering::Relaxed)
                ));
                break;
            }
        }
        match consumer.poll(Duration::from_millis(100)).await {
            Ok(payloads) => {
                let now = Instant::now();
                let since_origin = now.saturating_duration_since(shared.origin);
                for payload in &payloads {
                    shared.consumed.fetch_add(1, Ordering::Relaxed);
                    group_count.fetch_add(1, Ordering::Relaxed);
                    if shared.in_window(now) {
                        shared.consumed_measured.fetch_add(1, Ordering::Relaxed);
                    }
                    measured.count_at(shared.second(now));
                    match intended_of(payload) {
                        Some(intended) if shared.origin + intended >= shared.warmup_end => {
                            measured
                                .latency
                                .record(micros(since_origin.saturating_sub(intended)))
                                .ok();
                        }
                        Some(_) => {}
                        None => shared.error("a consumed payload shorter than 8 bytes"),
                    }
                }
            }
            Err(e) => {
                shared.error(format!("consumer: {e:#}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                if shared.producers_done.load(Ordering::Acquire)
                    && shared
                        .drain_deadline
                        .get()
                        .is_some_and(|d| Instant::now() >= *d)
                {
                    break;
                }
            }
        }
    }
    if let Err(e) = consumer.close().await {
        shared.error(format!("closing a consumer: {e:#}"));
    }
    measured
}

/// The raw disk: the workload's bytes written in 1 MiB blocks, each followed by fdatasync, for
/// the same warm-up and duration, in the same directory the brokers use. Messages count as
/// acknowledged when their block is synced; there are no consumers.
async fn run_disk(
    workload: &Workload,
    spec: &DriverSpec,
    options: &RunOptions,
    dir: &std::path::Path,
) -> Result<RunResult> {
    let started_at_ms = unix_ms();
    let path = dir.join("disk-baseline.bin");
    let message_size = workload.message_size;
    let warmup = Duration::from_secs_f64(workload.warmup_seconds);
    let duration = Duration::from_secs_f64(workload.duration_seconds);
    let per_block = (DISK_BLOCK_BYTES / message_size).max(1);
    let block = vec![0xa5u8; per_block * message_size];
    let progress_state = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let progress = Progress::start(
        options.progress,
        format!("{} on {}", workload.name, spec.label()),
        warmup + duration,
        {
            let state = progress_state.clone();
            move || {
                let n = state.0.load(Ordering::Relaxed);
                (n, n, 0)
            }
        },
    );
    let state = progress_state.clone();
    let measured = tokio::task::spawn_blocking(move || -> Result<_> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let origin = Instant::now();
        let (warmup_end, end) = (origin + warmup, origin + warmup + duration);
        let mut latency = histogram();
        let mut per_second: Vec<u64> = Vec::new();
        let mut measured_messages = 0u64;
        let mut written = 0u64;
        // Bounded: at most 64 GiB, then the file starts over (the disk would fill otherwise).
        while Instant::now() < end {
            let t0 = Instant::now();
            file.write_all(&block)?;
            file.sync_data()?;
            let now = Instant::now();
            written += block.len() as u64;
            if written >= 64 << 30 {
                file.set_len(0)?;
                file.sync_all()?;
                written = 0;
                use std::io::Seek;
                file.seek(std::io::SeekFrom::Start(0))?;
            }
            state.0.fetch_add(per_block as u64, Ordering::Relaxed);
            if now >= warmup_end && now < end {
                measured_messages += per_block as u64;
                latency.record(micros(now - t0)).ok();
            }
            let s = now.duration_since(origin).as_secs() as usize;
            if per_second.len() <= s {
                per_second.resize(s + 1, 0);
            }
            per_second[s] += per_block as u64;
        }
        Ok((latency, per_second, measured_messages))
    })
    .await
    .context("disk task panicked")??;
    progress.finish();
    let (latency, per_second, measured_messages) = measured;
    let total = progress_state.0.load(Ordering::Relaxed);
    let measured_seconds = duration.as_secs_f64();
    let mut result = RunResult {
        format: crate::result::RESULT_FORMAT,
        harness: format!("weft-bench {}", env!("CARGO_PKG_VERSION")),
        workload: workload.clone(),
        driver: "disk".into(),
        durability: spec.durability,
        durability_detail: spec.durability_detail(),
        endpoint: format!("{}", options.data_dir.display()),
        started_at_ms,
        measured_seconds,
        msgs_per_sec: measured_messages as f64 / measured_seconds,
        mb_per_sec: measured_messages as f64 * message_size as f64 / measured_seconds / 1e6,
        consumed_msgs_per_sec: 0.0,
        // The "publish" latency of the disk is one block's write + fdatasync.
        publish_latency_ms: Latency::from_histogram(&latency),
        end_to_end_latency_ms: None,
        counts: Counts {
            sent: total,
            acked: total,
            ..Counts::default()
        },
        timeline: per_second
            .iter()
            .enumerate()
            .map(|(s, n)| Second {
                second: s as u64,
                acked: *n,
                consumed: 0,
            })
            .collect(),
        errors: Vec::new(),
        checks: Default::default(),
    };
    result.compute_checks();
    if total == 0 {
        bail!("the disk baseline wrote nothing");
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_the_intended_time() {
        let base = Bytes::from(vec![9u8; 64]);
        let mut arena = Arena::default();
        let payload = arena.stamp(&base, Duration::from_micros(123_456), 3, 42);
        assert_eq!(payload.len(), 64);
        assert_eq!(intended_of(&payload), Some(Duration::from_micros(123_456)));
        assert_eq!(&payload[16..], &base[16..]);
        assert_eq!(intended_of(&payload[..4]), None);
    }

    #[test]
    fn arena_messages_stay_apart_across_buffers() {
        // Enough messages to fill several buffers: each keeps its own bytes.
        let base = Bytes::from(vec![7u8; 1000]);
        let mut arena = Arena::default();
        let messages: Vec<(Bytes, Bytes)> = (0..1000u64)
            .map(|i| {
                let key = arena.copy(&i.to_le_bytes());
                let payload = arena.stamp(&base, Duration::from_nanos(i), 1, i);
                (key, payload)
            })
            .collect();
        for (i, (key, payload)) in messages.iter().enumerate() {
            assert_eq!(&key[..], &(i as u64).to_le_bytes());
            assert_eq!(payload.len(), 1000);
            assert_eq!(intended_of(payload), Some(Duration::from_nanos(i as u64)));
            assert_eq!(&payload[12..16], &(i as u32).to_le_bytes());
            assert_eq!(&payload[16..], &base[16..]);
        }
    }
}
