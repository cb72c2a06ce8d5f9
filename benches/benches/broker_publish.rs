//! A single-node broker on loopback (its own runtime and threads, in this process), driven through
//! `weft-client`, at the default durability (fsync before acknowledgement):
//!
//! 1. throughput: one pipelined producer publishing 1 KiB records as fast as acknowledgements allow;
//! 2. latency: a fixed rate, with a consumer subscribed; publish-acknowledgement and end-to-end
//!    latencies measured from each record's *intended* send time on the schedule (so a stall
//!    delays everything behind it in the figures, with no coordinated omission).
//!
//! ```text
//! cargo bench -p weft-bench --bench broker_publish -- [--seconds 5] [--rate 5000] [--record-bytes 1024]
//!     [--only throughput|latency]
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use weft_client::{Client, ConsumerConfig, ProducerConfig, Record, StartFrom};

struct Args {
    only: Option<String>,
    seconds: f64,
    rate: u64,
    record_bytes: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        only: None,
        seconds: 5.0,
        rate: 5000,
        record_bytes: 1024,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => args.seconds = value()?.parse()?,
            "--rate" => args.rate = value()?.parse()?,
            "--record-bytes" => args.record_bytes = value()?.parse()?,
            "--only" => args.only = Some(value()?),
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// Starts a broker on its own runtime; returns its client address and a stop handle.
fn start_broker(
    dir: &std::path::Path,
) -> Result<(
    String,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
)> {
    let config = weft_broker::config::Config {
        data_dir: dir.to_path_buf(),
        client_listen: "127.0.0.1:0".parse()?,
        peer_listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        ..weft_broker::config::Config::default()
    };
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("broker runtime");
        runtime.block_on(async move {
            let listeners = weft_broker::server::Listeners::bind(&config)
                .await
                .expect("bind");
            let client = listeners.client.local_addr().expect("addr");
            addr_tx.send(client.to_string()).expect("send addr");
            weft_broker::server::run(config, listeners, async {
                let _ = stop_rx.await;
            })
            .await
            .expect("broker run");
        });
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .context("broker did not start")?;
    Ok((addr, stop_tx, thread))
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "  {name:<22} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  max {:>8.2} ms  (n={})",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.9) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    );
}

async fn throughput(client: &Client, args: &Args) -> Result<()> {
    client.admin().create_topic("throughput", 1).await?;
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(5),
        ..ProducerConfig::default()
    });
    let value = bytes::Bytes::from(vec![b'x'; args.record_bytes]);
    let mut outstanding = VecDeque::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut acked = 0u64;
    while Instant::now() < deadline {
        outstanding.push_back(
            producer
                .send_nowait("throughput", Record::new(value.clone()).partition(0))
                .await?,
        );
        // Bounded: at most 50 000 unanswered records.
        while outstanding.len() >= 50_000 {
            if let Some(ack) = outstanding.pop_front() {
                ack.await?;
                acked += 1;
            }
        }
    }
    for ack in outstanding {
        ack.await?;
        acked += 1;
    }
    let elapsed = start.elapsed();
    producer.close().await?;
    let rate = acked as f64 / elapsed.as_secs_f64();
    println!(
        "throughput: one pipelined producer, {} B records, 1 partition, fsync before ack: {:.0} msg/s, {:.1} MB/s ({} records in {:.2} s)",
        args.record_bytes,
        rate,
        rate * args.record_bytes as f64 / 1e6,
        acked,
        elapsed.as_secs_f64()
    );
    Ok(())
}

async fn latency(client: &Client, args: &Args) -> Result<()> {
    client.admin().create_topic("latency", 1).await?;
    let mut consumer = client
        .consumer(ConsumerConfig::new("latency").start(StartFrom::Latest))
        .await?;
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..ProducerConfig::default()
    });
    let total = (args.rate as f64 * args.seconds) as u64;
    let origin = Instant::now() + Duration::from_millis(100);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let value = vec![b'x'; args.record_bytes.saturating_sub(16)];
    // The consumer: end-to-end latency from the intended send time carried in the record.
    let reader = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        let mut seen = 0;
        while seen < total {
            let Some(message) = consumer.next_timeout(Duration::from_secs(30)).await? else {
                break;
            };
            let intended_us = u64::from_le_bytes(message.value[..8].try_into().unwrap_or_default());
            let now_us = micros(origin.elapsed());
            h.record(now_us.saturating_sub(intended_us).max(1)).ok();
            seen += 1;
        }
        anyhow::Ok((h, seen))
    });
    let mut acks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let intended = origin + interval * i as u32;
        tokio::time::sleep_until(intended.into()).await;
        let mut payload = ((i as u32 as u64) * interval.as_micros() as u64)
            .to_le_bytes()
            .to_vec();
        payload.extend_from_slice(&value);
        let ack = producer
            .send_nowait("latency", Record::new(payload).partition(0))
            .await?;
        acks.push((
            intended,
            tokio::spawn(async move { ack.await.map(|_| Instant::now()) }),
        ));
    }
    let mut publish = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for (intended, ack) in acks {
        let acked_at = ack.await??;
        publish
            .record(micros(acked_at.saturating_duration_since(intended)).max(1))
            .ok();
    }
    producer.close().await?;
    let (end_to_end, seen) = reader.await??;
    println!(
        "latency: fixed {} msg/s for {:.0} s, {} B records, 1 partition, fsync before ack (measured from the intended send time):",
        args.rate, args.seconds, args.record_bytes
    );
    report("publish -> ack", &publish);
    report("publish -> consumed", &end_to_end);
    if seen < total {
        bail!("the consumer saw only {seen} of {total} records");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))?;
    let (addr, stop, broker) = start_broker(dir.path())?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        let client = Client::connect([addr.as_str()]).await?;
        if args.only.as_deref() != Some("latency") {
            throughput(&client, &args).await?;
        }
        if args.only.as_deref() != Some("throughput") {
            latency(&client, &args).await?;
        }
        anyhow::Ok(())
    });
    let _ = stop.send(());
    let _ = broker.join();
    result
}
