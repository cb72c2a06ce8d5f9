//! `weft-bench restart`: how long a broker takes to serve a large partition again after a
//! restart, and how much memory it uses meanwhile. It builds a partition of `--size-gib` through
//! a real broker (fsync before ack), then restarts that broker twice: once cleanly (SIGTERM: the
//! partition snapshots everything at shutdown) and once after kill -9 (the tail after the last
//! snapshot is re-applied). For each it reports the time from process start until the partition
//! answers with its full high watermark, and the process's peak resident memory (`VmHWM`, which
//! the kernel keeps for the process's whole life, restart included).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use weft_client::{Client, ProducerConfig, Record, TopicSettings};

use crate::drivers::weft::{LISTEN_ON_FREE_PORTS, broker_binary, ready_address};

/// One restart, measured.
#[derive(Debug, Clone, Serialize)]
pub struct RestartFigures {
    /// "clean" (SIGTERM) or "crash" (kill -9).
    pub kind: String,
    /// Seconds from process start until the partition answered with its full high watermark.
    pub serve_seconds: f64,
    /// Peak resident memory of the restarted process, MiB.
    pub peak_rss_mib: f64,
    /// Entries and record bytes the partition re-applied (the broker's own metrics).
    pub replayed_entries: f64,
    /// Record bytes re-applied.
    pub replayed_bytes: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RestartResult {
    /// Bytes of the partition's log on disk.
    pub log_bytes: u64,
    /// Records in it.
    pub records: u64,
    /// Seconds it took to build (fsync before ack).
    pub build_seconds: f64,
    /// The restarts.
    pub restarts: Vec<RestartFigures>,
}

struct Broker {
    child: Child,
    client_addr: String,
    admin_addr: String,
}

fn spawn(binary: &Path, data_dir: &Path) -> Result<(Broker, Instant)> {
    let started = Instant::now();
    let mut child = Command::new(binary)
        .arg("--data-dir")
        .arg(data_dir)
        .args(LISTEN_ON_FREE_PORTS)
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("broker stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the broker's ready line")?;
    if !line.starts_with("weft-broker ready:") {
        let _ = child.kill();
        bail!("the broker did not start: {line:?}");
    }
    Ok((
        Broker {
            client_addr: ready_address(&line, "client=")?,
            admin_addr: ready_address(&line, "admin=")?,
            child,
        },
        started,
    ))
}

/// Peak resident memory of `pid` in MiB (the kernel's `VmHWM`).
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmHWM in /proc status")?;
    Ok(kb / 1024.0)
}

/// A sample of the broker's Prometheus metrics, over plain HTTP/1.1.
fn metric(admin: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(admin) else {
        return f64::NAN;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return f64::NAN;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

async fn wait_serving(client_addr: &str, high_watermark: u64, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(client) = Client::connect([client_addr]).await
            && let Ok(offsets) = client.admin().offsets("restart", None).await
            && offsets
                .first()
                .is_some_and(|o| o.high_watermark == high_watermark)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the partition did not serve within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Builds a partition of `size_bytes` in `data_dir` and measures two restarts.
pub async fn run(size_bytes: u64, data_dir: &Path) -> Result<RestartResult> {
    let binary = broker_binary()?;
    let dir: PathBuf = data_dir.join(format!("weft-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (mut broker, _) = spawn(&binary, &dir)?;
    let client = Client::connect([broker.client_addr.as_str()]).await?;
    client
        .admin()
        .create_topic_with(
            "restart",
            TopicSettings {
                partitions: 1,
                ..TopicSettings::default()
            },
        )
        .await?;
    let producer = client.producer(ProducerConfig::default());
    let record_bytes = 16 * 1024;
    let records = size_bytes.div_ceil(record_bytes as u64);
    let value = bytes::Bytes::from(vec![b'w'; record_bytes]);
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    for i in 0..records {
        acks.push(
            producer
                .send_nowait("restart", Record::new(value.clone()).partition(0))
                .await?,
        );
        // Bounded: at most 4 096 answers outstanding.
        while acks.len() >= 4096 {
            acks.next().await.context("ack")??;
        }
        if i % 65_536 == 0 && i > 0 {
            eprintln!(
                "built {:.1} GiB of {:.1}",
                (i * record_bytes as u64) as f64 / (1u64 << 30) as f64,
                size_bytes as f64 / (1u64 << 30) as f64
            );
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    producer.close().await?;
    let build_seconds = started.elapsed().as_secs_f64();
    let log_bytes = metric(
        &broker.admin_addr,
        r#"weft_partition_size_bytes{topic="restart",partition="0"}"#,
    ) as u64;

    let mut restarts = Vec::new();
    let mut records = records;
    for kind in ["clean", "crash"] {
        if kind == "crash" {
            // Publish some more after the clean restart's snapshot: the crash leaves it as the
            // tail to re-apply.
            let client = Client::connect([broker.client_addr.as_str()]).await?;
            let producer = client.producer(ProducerConfig::default());
            let extra = (48u64 << 20) / record_bytes as u64;
            let mut acks = FuturesUnordered::new();
            for _ in 0..extra {
                acks.push(
                    producer
                        .send_nowait("restart", Record::new(value.clone()).partition(0))
                        .await?,
                );
            }
            while let Some(ack) = acks.next().await {
                ack?;
            }
            producer.close().await?;
            records += extra;
        }
        if kind == "clean" {
            let pid = rustix::process::Pid::from_raw(broker.child.id() as i32)
                .context("the broker's pid")?;
            rustix::process::kill_process(pid, rustix::process::Signal::TERM)
                .context("SIGTERM to the broker")?;
        } else {
            broker.child.kill()?;
        }
        broker.child.wait()?;
        let (next, started) = spawn(&binary, &dir)?;
        broker = next;
        wait_serving(&broker.client_addr, records, Duration::from_secs(600)).await?;
        let serve_seconds = started.elapsed().as_secs_f64();
        restarts.push(RestartFigures {
            kind: kind.into(),
            serve_seconds,
            peak_rss_mib: peak_rss_mib(broker.child.id())?,
            replayed_entries: metric(
                &broker.admin_addr,
                r#"weft_partition_replayed_entries{topic="restart",partition="0"}"#,
            ),
            replayed_bytes: metric(
                &broker.admin_addr,
                r#"weft_partition_replayed_bytes{topic="restart",partition="0"}"#,
            ),
        });
    }
    let _ = broker.child.kill();
    let _ = broker.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(parent) = dir.parent() {
        crate::runner::settle_filesystem(parent);
    }
    Ok(RestartResult {
        log_bytes,
        records,
        build_seconds,
        restarts,
    })
}
